//! Phase 4: deliveries per fan-out F (webhooks on one account) and ingest mode (single events
//! or batches of 100): closed-loop ingest for the window, throttled only while the outstanding
//! deliveries (acknowledged events × F − received) exceed `--max-backlog`, so the engine is
//! kept saturated without an unbounded backlog; then the backlog drains (bounded) before the
//! next phase.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::rps::{batch_workload, ingest_workload};
use super::{create_account, create_webhooks, Ctx};
use crate::client::Scrape;
use crate::loadgen::{join_all, spawn_closed_loop, Counters, Gate};
use crate::options::IngestMode;
use crate::procstat::status_bytes;
use crate::report::{Cell, Place, Report, Val};

#[derive(Debug, Clone, Default)]
pub struct FanoutResult {
    pub webhooks: usize,
    pub mode: IngestMode,
    pub deliveries_per_s: f64,
    pub ingest_events_per_s: f64,
    pub window_s: f64,
    pub backlog_start: u64,
    pub backlog_end: u64,
    pub backlog_max: u64,
    pub scheduled_gauge_end: f64,
    pub scheduled_gauge_max: f64,
    pub throttled_fraction: f64,
    pub kept_up: bool,
    pub drained: bool,
    pub drain_s: f64,
    pub left_after_drain: u64,
    pub duplicates: u64,
    pub attempt_failures: f64,
    pub receiver_connections: u64,
    pub ingest_other_statuses: String,
    pub ingest_io_errors: u64,
    pub attempt_ms_mean: f64,
    pub rss_after: u64,
}

pub async fn run(ctx: &Ctx, n: usize, fanout: usize, mode: IngestMode) -> FanoutResult {
    let account = format!("acc_fanout{fanout}_{n}");
    let path = ctx.recv.path(false).await;
    create_account(ctx, &account).await;
    create_webhooks(ctx, &account, path, 0, fanout).await;
    let recv = ctx.recv.clone();
    let counters = Arc::new(Counters::default());
    let outstanding = {
        let (c, recv) = (counters.clone(), recv.clone());
        move || {
            ((c.items.load(Ordering::Relaxed) + c.items_in_flight.load(Ordering::Relaxed))
                * fanout as u64)
                .saturating_sub(recv.received(path))
        }
    };
    let max_backlog = ctx.opts.max_backlog;
    let gate: Gate = {
        let o = outstanding.clone();
        Arc::new(move || o() < max_backlog)
    };
    let work = Arc::new(match mode {
        IngestMode::Single => ingest_workload(ctx, &account, Some(gate)),
        IngestMode::Batch => batch_workload(ctx, &account, Some(gate)),
    });
    let warmup = Duration::from_secs(ctx.opts.warmup);
    let window = Duration::from_secs(ctx.opts.secs);
    recv.refresh().await;
    let conns0 = recv.accepted();
    let m0 = Scrape::get(ctx.metrics).await;
    let hard = Instant::now() + warmup + window + Duration::from_secs(30);
    let handles = spawn_closed_loop(ctx.api, ctx.opts.conns, work, counters.clone(), hard);
    tokio::time::sleep(warmup).await;

    let mut r = FanoutResult {
        webhooks: fanout,
        mode,
        ..Default::default()
    };
    recv.refresh().await;
    let t0 = Instant::now();
    let (recv0, ok0, thr0) = (
        recv.received(path),
        counters.items.load(Ordering::Relaxed),
        counters.throttled_ns.load(Ordering::Relaxed),
    );
    r.backlog_start = outstanding();
    // Sample once a second (bounded by the window).
    let end = t0 + window;
    while Instant::now() < end {
        let next = (Instant::now() + Duration::from_secs(1)).min(end);
        tokio::time::sleep_until(next.into()).await;
        let g = Scrape::get(ctx.metrics)
            .await
            .sum("kyberhook_deliveries_scheduled", None);
        r.scheduled_gauge_max = r.scheduled_gauge_max.max(g);
        r.scheduled_gauge_end = g;
        r.backlog_max = r.backlog_max.max(outstanding());
    }
    recv.refresh().await;
    let t1 = Instant::now();
    let (recv1, ok1, thr1) = (
        recv.received(path),
        counters.items.load(Ordering::Relaxed),
        counters.throttled_ns.load(Ordering::Relaxed),
    );
    r.backlog_end = outstanding();
    counters.stop.store(true, Ordering::Relaxed);
    join_all(handles, Duration::from_secs(35)).await;
    let secs = (t1 - t0).as_secs_f64();
    r.window_s = secs;
    r.deliveries_per_s = (recv1 - recv0) as f64 / secs;
    r.ingest_events_per_s = (ok1 - ok0) as f64 / secs;
    r.throttled_fraction = (thr1 - thr0) as f64 / 1e9 / (secs * ctx.opts.conns as f64);
    let delivered = recv1 - recv0;
    r.kept_up = r.throttled_fraction < 0.01
        && r.backlog_end <= r.backlog_start + (delivered / 20).max(2_000);
    r.ingest_other_statuses = counters.other_statuses();
    r.ingest_io_errors = counters.io_errors.load(Ordering::Relaxed);

    // Drain (bounded) so the next phase starts clean.
    let t = Instant::now();
    let deadline = t + Duration::from_secs(ctx.opts.drain_secs);
    while outstanding() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    recv.refresh().await;
    r.drain_s = t.elapsed().as_secs_f64();
    r.left_after_drain = outstanding();
    r.drained = r.left_after_drain == 0;
    r.duplicates = recv.dups(path);
    r.receiver_connections = recv.accepted() - conns0;
    let m1 = Scrape::get(ctx.metrics).await;
    r.attempt_failures = m1.sum("kyberhook_delivery_attempts_total", Some("failure"))
        - m0.sum("kyberhook_delivery_attempts_total", Some("failure"));
    let n = m1.sum("kyberhook_delivery_attempt_duration_seconds_count", None)
        - m0.sum("kyberhook_delivery_attempt_duration_seconds_count", None);
    let s = m1.sum("kyberhook_delivery_attempt_duration_seconds_sum", None)
        - m0.sum("kyberhook_delivery_attempt_duration_seconds_sum", None);
    r.attempt_ms_mean = if n > 0.0 { s / n * 1e3 } else { 0.0 };
    recv.forget(path).await;
    r.rss_after = status_bytes("VmRSS:");
    r
}

impl FanoutResult {
    pub fn report(&self, r: &mut Report, receivers: usize, max_backlog: u64) {
        let f = self;
        let s = r.section(
            Cell::text("deliveries, ")
                .f("webhooks", Val::Int(f.webhooks as u64))
                .t(" webhook(s), ")
                .f("receivers", Val::Int(receivers as u64))
                .t(" receiver(s), closed-loop ")
                .f("ingest", Val::Text(f.mode.name().into()))
                .t(" ingest capped at ")
                .f("max_backlog", Val::Int(max_backlog))
                .t(" outstanding"),
            Place::Item("fanout".into()),
        );
        s.row(
            "deliveries_per_s",
            Cell::fig("deliveries_per_s", Val::Num(f.deliveries_per_s)),
            Cell::text("received by the endpoint, ")
                .f("window_s", Val::Secs(f.window_s, 1))
                .t(" window"),
        );
        s.row(
            "ingest events/s during window",
            Cell::fig("ingest_events_per_s", Val::Num(f.ingest_events_per_s)),
            Cell::text(format!("x{} = ", f.webhooks))
                .f(
                    "offered_per_s",
                    Val::Num(f.ingest_events_per_s * f.webhooks as f64),
                )
                .t(" deliveries/s offered"),
        );
        s.row(
            "kept up",
            Cell::fig("kept_up", Val::Flag(f.kept_up, "yes", "no")),
            Cell::text("backlog start ")
                .f("backlog_start", Val::Int(f.backlog_start))
                .t(" -> end ")
                .f("backlog_end", Val::Int(f.backlog_end))
                .t(" (max ")
                .f("backlog_max", Val::Int(f.backlog_max))
                .t("); ingest throttled ")
                .f(
                    "ingest_throttled_fraction",
                    Val::Percent(f.throttled_fraction),
                )
                .t(" of the time"),
        );
        s.row(
            "kyberhook_deliveries_scheduled",
            Cell::fig("deliveries_scheduled_end", Val::Num(f.scheduled_gauge_end)),
            Cell::text("at window end (max sampled ")
                .f("deliveries_scheduled_max", Val::Num(f.scheduled_gauge_max))
                .t(")"),
        );
        s.row(
            "drain after window",
            Cell::fig("drain_s", Val::Secs(f.drain_s, 1)),
            Cell::fig(
                "drained",
                Val::Flag(f.drained, "all delivered", "NOT drained"),
            )
            .t(" (")
            .f("left_after_drain", Val::Int(f.left_after_drain))
            .t(" outstanding); bench process VmRSS after drain ")
            .f("rss_after_drain_bytes", Val::Mib(f.rss_after, 0)),
        );
        s.row(
            "attempt duration (mean)",
            Cell::fig("attempt_ms_mean", Val::Ms(f.attempt_ms_mean, 2)),
            Cell::text("kyberhook_delivery_attempt_duration_seconds"),
        );
        s.row(
            "failures / duplicates",
            Cell::fig("attempt_failures", Val::Num(f.attempt_failures))
                .t(" / ")
                .f("duplicates", Val::Int(f.duplicates)),
            Cell::text("failed attempts (metrics) / repeated delivery ids at the receiver; ")
                .f("receiver_connections", Val::Int(f.receiver_connections))
                .t(" connections accepted")
                .when(
                    !f.ingest_other_statuses.is_empty() || f.ingest_io_errors > 0,
                    Cell::text("; ingest errors io ")
                        .f("ingest_io_errors", Val::Int(f.ingest_io_errors))
                        .t(" status [")
                        .f(
                            "ingest_statuses",
                            Val::Text(f.ingest_other_statuses.clone()),
                        )
                        .t("]"),
                ),
        );
    }
}
