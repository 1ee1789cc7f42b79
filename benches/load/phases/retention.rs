//! Phase 6, retention: a second engine with its own data dir and `storage.retention =
//! --retention` seconds, 10 webhooks, closed-loop batch ingest (capped like the fan-out
//! phases) for `--retention-run` seconds. The data dir size is sampled every 2 s and must
//! level off once the purge starts; the purge rate is reported per second of wall time (equal
//! to the delivery rate once the data dir is level) and per second of purge work (its
//! capacity).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::rps::batch_workload;
use super::{create_account, create_webhooks, Ctx};
use crate::client::Scrape;
use crate::engine::{BenchEngine, Shape};
use crate::loadgen::{join_all, spawn_closed_loop, Counters, Gate};
use crate::procstat::du;
use crate::report::{Cell, Place, Report, Val};

#[derive(Debug, Clone, Default)]
pub struct RetentionResult {
    pub retention_s: u64,
    pub run_s: f64,
    pub deliveries_per_s: f64,
    pub purged_deliveries: f64,
    /// Purged deliveries per second of wall time, from the first purge to the end.
    pub purge_per_s: f64,
    /// Purged deliveries per second spent in purge passes (what the purge could do).
    pub purge_capacity_per_s: f64,
    pub passes: f64,
    /// (seconds since start, data dir bytes) every 2 s.
    pub sizes: Vec<(f64, u64)>,
    pub steady_bytes: u64,
    pub levelled_off: bool,
    pub errors: String,
}

pub async fn run(ctx: &Ctx) -> RetentionResult {
    let opts = &ctx.opts;
    let engine = BenchEngine::start(
        &ctx.engine_rt,
        opts,
        ctx.pki.as_deref(),
        Shape::Retention(opts.retention),
        &[],
    )
    .await;
    let ctx = &ctx.on(&engine);
    let metrics = ctx.metrics;
    let account = "acc_retention";
    let fanout = 10;
    let path = ctx.recv.path(false).await;
    create_account(ctx, account).await;
    create_webhooks(ctx, account, path, 0, fanout).await;
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
    let max_backlog = opts.max_backlog;
    let gate: Gate = {
        let o = outstanding.clone();
        Arc::new(move || o() < max_backlog)
    };
    let work = Arc::new(batch_workload(ctx, account, Some(gate)));
    let run = Duration::from_secs(opts.retention_run);
    recv.refresh().await;
    let t0 = Instant::now();
    let recv0 = recv.received(path);
    let handles = spawn_closed_loop(
        ctx.api,
        opts.conns,
        work,
        counters.clone(),
        t0 + run + Duration::from_secs(30),
    );
    let mut r = RetentionResult {
        retention_s: opts.retention,
        ..Default::default()
    };
    let purged = |m: &Scrape| m.sum("kyberhook_retention_deliveries_purged_total", None);
    let m0 = Scrape::get(metrics).await;
    let (purged0, pass_s0, passes0) = (
        purged(&m0),
        m0.sum("kyberhook_retention_pass_seconds_sum", None),
        m0.sum("kyberhook_retention_pass_seconds_count", None),
    );
    let mut first_purge: Option<(Instant, f64)> = None;
    let end = t0 + run;
    while Instant::now() < end {
        let next = (Instant::now() + Duration::from_secs(2)).min(end);
        tokio::time::sleep_until(next.into()).await;
        r.sizes
            .push((t0.elapsed().as_secs_f64(), du(engine.data.path())));
        let p = purged(&Scrape::get(metrics).await);
        if first_purge.is_none() && p > purged0 {
            first_purge = Some((Instant::now(), p));
        }
    }
    recv.refresh().await;
    let t1 = Instant::now();
    let recv1 = recv.received(path);
    let m1 = Scrape::get(metrics).await;
    counters.stop.store(true, Ordering::Relaxed);
    join_all(handles, Duration::from_secs(35)).await;
    r.run_s = (t1 - t0).as_secs_f64();
    r.deliveries_per_s = (recv1 - recv0) as f64 / r.run_s;
    r.purged_deliveries = purged(&m1) - purged0;
    if let Some((at, p)) = first_purge {
        let secs = (t1 - at).as_secs_f64();
        if secs > 0.0 {
            r.purge_per_s = (purged(&m1) - p) / secs;
        }
    }
    let pass_s = m1.sum("kyberhook_retention_pass_seconds_sum", None) - pass_s0;
    r.passes = m1.sum("kyberhook_retention_pass_seconds_count", None) - passes0;
    if pass_s > 0.0 {
        r.purge_capacity_per_s = r.purged_deliveries / pass_s;
    }
    // Level: the last third of the samples grows by under 10 % of the middle third's peak.
    let n = r.sizes.len();
    if n >= 6 {
        let mid_peak = r.sizes[n / 3..2 * n / 3]
            .iter()
            .map(|s| s.1)
            .max()
            .unwrap_or(0);
        let last = &r.sizes[2 * n / 3..];
        let last_peak = last.iter().map(|s| s.1).max().unwrap_or(0);
        r.steady_bytes = last.iter().map(|s| s.1).sum::<u64>() / last.len() as u64;
        r.levelled_off = (last_peak as f64) <= mid_peak as f64 * 1.10;
    }
    if counters.io_errors.load(Ordering::Relaxed) > 0 || !counters.other_statuses().is_empty() {
        r.errors = format!(
            "ingest io {} status [{}]",
            counters.io_errors.load(Ordering::Relaxed),
            counters.other_statuses()
        );
    }
    recv.forget(path).await;
    let _ = engine.shutdown().await;
    r
}

impl RetentionResult {
    pub fn report(&self, r: &mut Report) {
        let x = self;
        let s = r.section(
            Cell::text("retention ")
                .f("retention_s", Val::Int(x.retention_s))
                .t(" s, 10 webhooks, closed-loop batch ingest"),
            Place::Key("retention".into()),
        );
        s.row(
            "deliveries_per_s",
            Cell::fig("deliveries_per_s", Val::Num(x.deliveries_per_s)),
            Cell::text("received by the endpoint over ").f("run_s", Val::Secs(x.run_s, 0)),
        );
        s.row(
            "purge deliveries/s",
            Cell::fig("purge_per_s", Val::Num(x.purge_per_s)),
            Cell::text("wall time, first purge to end; capacity ")
                .f("purge_capacity_per_s", Val::Num(x.purge_capacity_per_s))
                .t(" /s of purge work (")
                .f("purged_deliveries", Val::Num(x.purged_deliveries))
                .t(" purged in ")
                .f("passes", Val::Num(x.passes))
                .t(" passes)")
                .when(
                    !x.errors.is_empty(),
                    Cell::text("; ").f("errors", Val::Text(x.errors.clone())),
                ),
        );
        s.row(
            "steady-state data dir",
            Cell::fig("steady_bytes", Val::Mib(x.steady_bytes, 0)),
            Cell::text("mean of the last third; levelled off: ")
                .f("levelled_off", Val::Flag(x.levelled_off, "yes", "NO"))
                .t("; samples (s: MiB) ")
                .f(
                    "sizes_s_mib",
                    Val::List(
                        x.sizes
                            .iter()
                            .map(|(t, b)| {
                                let mib = *b as f64 / 1048576.0;
                                Val::List(vec![Val::Dec(*t, 0), Val::Dec(mib, 0)], ":")
                            })
                            .collect(),
                        " ",
                    ),
                ),
        );
    }
}
