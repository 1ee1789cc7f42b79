//! Deliveries while ingest runs: closed-loop, uncapped single-event ingest on C connections to
//! an account with W webhooks (only the engine's own push-back holds it back; a 429/503 is
//! honoured for its `Retry-After`), then ingest stops and the backlog drains. Per run:
//! events accepted/s, deliveries/s during the window and once ingest stops, 202 → arrival of
//! every delivery of the window's events, the engine's own lag per stage, threads' CPU, VmRSS.
//!
//! With push-back nothing may be left to drain, so with fan-out a *ceiling probe* measures
//! "once ingest stops" in the same run: batches of a priority event type (never held) build a
//! backlog of ~8 s of deliveries, sending stops, and the drain is counted per second from when
//! the engine has written every delivery of the burst (fan-out and creation are ingest's
//! work). One probe's figure moved by ±30 % between runs, so `--probes` (3) run back to back
//! and their median is the ceiling.
//!
//! Used by the `lag` phases (issue 12's table, on the classic engine) and the `flow` phases
//! (issue 20's table, each on a fresh engine with the defaults).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::json;

use super::{Ctx, BATCH_SIZE, PROBE_EVENT};
use crate::client::{connect, request, send, Scrape};
use crate::loadgen::{join_all, Producer};
use crate::procstat::{status_bytes, Cpu};
use crate::receiver::PathId;
use crate::report::{Cell, Pcts, Place, Report, Shown, Val};

#[derive(Debug, Clone, Default)]
pub struct LagResult {
    pub webhooks: usize,
    pub conns: usize,
    pub window_s: f64,
    pub accepted_per_s: f64,
    pub refused: u64,
    pub refused_statuses: String,
    pub io_errors: u64,
    pub delivered_per_s: f64,
    /// Mean over the drain's full seconds that ended with deliveries still outstanding.
    pub after_per_s: Option<f64>,
    /// Deliveries received per second of the window.
    pub series_during: Vec<u64>,
    /// The engine's own delivery lag (`kyberhook_delivery_lag_seconds`), the largest of ten
    /// samples per second of the window.
    pub engine_lag_max: Vec<f64>,
    /// The same per stage (fanout, scheduler, dispatcher): which one lagged.
    pub engine_lag_stages: Vec<[f64; 3]>,
    /// The largest `kyberhook_deliveries_scheduled` sampled in the window.
    pub scheduled_max: f64,
    /// `kyberhook_ingest_held_total` over the window.
    pub held: f64,
    pub series_after: Vec<u64>,
    pub backlog_end: u64,
    pub drain_s: f64,
    pub drained: bool,
    /// 202 → arrival of every delivery of the events acknowledged in the window.
    pub lag: Pcts,
    /// Send → 202 of the window's events.
    pub service: Pcts,
    pub lag_missing: u64,
    pub duplicates: u64,
    pub cpu_during: String,
    pub cpu_after: String,
    /// The database server's CPU per delivery received in the window, ms (`--backend
    /// postgres`).
    pub postgres_ms_per_delivery: Option<f64>,
    pub rss_end: u64,
    pub rss_drained: u64,
    /// How `after_per_s` was measured when the push-back left no backlog at the stop: the
    /// probe whose ceiling was the median.
    pub probe: Option<Probe>,
    /// Every probe's ceiling, lowest first.
    pub probe_ceilings: Vec<f64>,
}

/// The ceiling probe of a run (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct Probe {
    pub events: u64,
    pub backlog: u64,
    pub drain_s: f64,
    pub drained: bool,
    pub series: Vec<u64>,
    /// Leading seconds of `series` that ended with deliveries still owed.
    pub full: usize,
    /// Leading seconds of `series` before the engine had written every delivery of the
    /// burst (fan-out and creation, not yet a drain).
    pub creating: usize,
    /// Deliveries per second from the stop over the full seconds, creation included.
    pub from_stop_per_s: Option<f64>,
    pub cpu: String,
}

impl LagResult {
    pub fn ratio(&self) -> Option<f64> {
        self.after_per_s
            .filter(|a| *a > 0.0)
            .map(|a| self.delivered_per_s / a)
    }
}

/// One run: `fanout` webhooks of `account` already point at `path` (recording arrivals);
/// `conns` producers send `body`.
pub async fn run(
    ctx: &Ctx,
    path: PathId,
    account: &str,
    fanout: usize,
    conns: usize,
    body: Bytes,
) -> LagResult {
    let recv = ctx.recv.clone();
    let warmup = Duration::from_secs(ctx.opts.warmup);
    let window = Duration::from_secs(ctx.opts.secs);
    let hard = Instant::now() + warmup + window + Duration::from_secs(30);
    let producer = Producer::start(ctx.api, conns, body, hard);
    let outstanding = {
        let (p, recv) = (producer.clone(), recv.clone());
        move || {
            (p.acked.load(Ordering::Relaxed) * fanout as u64).saturating_sub(recv.received(path))
        }
    };
    tokio::time::sleep(warmup).await;
    let mut r = LagResult {
        webhooks: fanout,
        conns,
        ..Default::default()
    };
    recv.refresh().await;
    producer.window(true);
    let (t0, cpu0) = (Instant::now(), Cpu::now(&recv));
    let m0 = Scrape::get(ctx.metrics).await;
    let (recv0, acked0, refused0) = (
        recv.received(path),
        producer.acked.load(Ordering::Relaxed),
        producer.refused.load(Ordering::Relaxed),
    );
    let mut last = recv0;
    let end = t0 + window;
    let mut tick = t0;
    while tick < end {
        tick += Duration::from_secs(1);
        let mut lag_max: f64 = 0.0;
        let mut stages = [0.0f64; 3];
        let mut sample = Instant::now();
        while sample < tick.min(end) {
            sample = (sample + Duration::from_millis(100)).min(tick.min(end));
            tokio::time::sleep_until(sample.into()).await;
            let m = Scrape::get(ctx.metrics).await;
            for (i, stage) in ["\"fanout\"", "\"scheduler\"", "\"dispatcher\""]
                .iter()
                .enumerate()
            {
                let v = m.sum("kyberhook_delivery_lag_seconds", Some(stage));
                stages[i] = stages[i].max(v);
                lag_max = lag_max.max(v);
            }
            r.scheduled_max = r
                .scheduled_max
                .max(m.sum("kyberhook_deliveries_scheduled", None));
        }
        r.engine_lag_max.push(lag_max);
        r.engine_lag_stages.push(stages);
        let now = recv.received(path);
        r.series_during.push(now - last);
        last = now;
    }
    producer.window(false);
    recv.refresh().await;
    let t1 = Instant::now();
    let (recv1, acked1, refused1) = (
        recv.received(path),
        producer.acked.load(Ordering::Relaxed),
        producer.refused.load(Ordering::Relaxed),
    );
    let m1 = Scrape::get(ctx.metrics).await;
    r.held =
        m1.sum("kyberhook_ingest_held_total", None) - m0.sum("kyberhook_ingest_held_total", None);
    let cpu1 = Cpu::now(&recv);
    r.rss_end = status_bytes("VmRSS:");
    producer.stop().await;
    let secs = (t1 - t0).as_secs_f64();
    r.window_s = secs;
    r.delivered_per_s = (recv1 - recv0) as f64 / secs;
    r.accepted_per_s = (acked1 - acked0) as f64 / secs;
    r.refused = refused1 - refused0;
    r.io_errors = producer.io_errors.load(Ordering::Relaxed);
    r.refused_statuses = producer.statuses();
    r.cpu_during = cpu1.since(&cpu0).top(secs, 7);
    let pg_s = cpu1.since(&cpu0).postgres_s();
    if ctx.opts.postgres && pg_s > 0.0 && recv1 > recv0 {
        r.postgres_ms_per_delivery = Some(pg_s * 1000.0 / (recv1 - recv0) as f64);
    }
    r.backlog_end = outstanding();

    // Drain: per-second deliveries until nothing is outstanding (bounded).
    let t2 = Instant::now();
    let deadline = t2 + Duration::from_secs(ctx.opts.drain_secs);
    let mut last = recv.received(path);
    let mut full_secs = Vec::new();
    let mut tick = t2;
    let mut cpu_drain = None;
    while outstanding() > 0 && Instant::now() < deadline {
        tick += Duration::from_secs(1);
        while Instant::now() < tick && outstanding() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let now = recv.received(path);
        r.series_after.push(now - last);
        if outstanding() > 0 {
            full_secs.push(now - last);
            cpu_drain = Some((Instant::now(), Cpu::now(&recv)));
        }
        last = now;
    }
    r.drain_s = t2.elapsed().as_secs_f64();
    r.drained = outstanding() == 0;
    if !full_secs.is_empty() {
        r.after_per_s = Some(full_secs.iter().sum::<u64>() as f64 / full_secs.len() as f64);
    }
    if let Some((at, c)) = cpu_drain {
        let wall = (at - t2).as_secs_f64();
        if wall > 0.5 {
            r.cpu_after = c.since(&cpu1).top(wall, 7);
        }
    }
    r.rss_drained = status_bytes("VmRSS:");

    let acks = producer.take_acks();
    r.service = Pcts::of(producer.take_service());
    let arrivals = recv.take_arrivals(path).await;
    // With the push-back on, ingest stops with (almost) nothing owed, so the rate the engine
    // reaches once ingest stops is not seen above: it is measured in the same run by a probe
    // (with fan-out only: one webhook's deliveries keep up with ingest).
    if r.after_per_s.is_none() && r.drained && fanout > 1 {
        // One probe's ceiling moved by ±30 % from run to run (what else the two cores were
        // doing in those 8 s), so several run back to back and the median counts.
        let want = ((r.delivered_per_s * 8.0) as u64).max(100_000);
        let mut probes = Vec::with_capacity(ctx.opts.probes);
        for _ in 0..ctx.opts.probes {
            probes.push(ceiling_probe(ctx, path, account, fanout, want).await);
        }
        probes.sort_by(|a, b| {
            a.full_secs()
                .unwrap_or(0.0)
                .total_cmp(&b.full_secs().unwrap_or(0.0))
        });
        r.probe_ceilings = probes.iter().filter_map(Probe::full_secs).collect();
        let median = probes.swap_remove(probes.len() / 2);
        r.after_per_s = median.full_secs();
        r.probe = Some(median);
    }
    let acked_at: HashMap<&str, u64> = acks.iter().map(|(id, at)| (&**id, *at)).collect();
    let mut lags = Vec::with_capacity(acks.len() * fanout);
    for a in &arrivals {
        if let Some(ack) = acked_at.get(&*a.event) {
            lags.push(Duration::from_nanos(a.ns.saturating_sub(*ack)));
        }
    }
    r.lag_missing = (acks.len() * fanout).saturating_sub(lags.len()) as u64;
    r.lag = Pcts::of(lags);
    recv.refresh().await;
    r.duplicates = recv.dups(path);
    recv.forget(path).await;
    r
}

impl Probe {
    /// Mean deliveries per second over the drain's full seconds that ended with deliveries
    /// still owed (as `after_per_s` of a drain), from the second after the engine had
    /// written every delivery of the burst: the rate of a backlog's drain, as when ingest
    /// stops after a phase without push-back (whose deliveries were created during it).
    fn full_secs(&self) -> Option<f64> {
        let full: Vec<u64> = self
            .series
            .iter()
            .copied()
            .take(self.full)
            .skip(self.creating)
            .collect();
        (!full.is_empty()).then(|| full.iter().sum::<u64>() as f64 / full.len() as f64)
    }
}

/// Measures what the engine delivers once ingest stops, in the same run as a lag phase whose
/// push-back left nothing to drain: batches of priority events (never held) for the phase's
/// webhooks are sent as fast as they are accepted until `want` deliveries are owed, then
/// sending stops and the backlog's drain is counted per second.
async fn ceiling_probe(ctx: &Ctx, path: PathId, account: &str, fanout: usize, want: u64) -> Probe {
    let recv = ctx.recv.clone();
    recv.refresh().await;
    let base = recv.received(path);
    // Every delivery fan-out creates is first written once (`kyberhook_held_deliveries_
    // written_total`, settled or pending): the burst is all created once it has grown by
    // the number owed.
    let written = |m: &Scrape| m.sum("kyberhook_held_deliveries_written_total", None) as u64;
    let written0 = written(&Scrape::get(ctx.metrics).await);
    let acked = Arc::new(AtomicU64::new(0));
    let per_batch = BATCH_SIZE as u64;
    let events_wanted = want.div_ceil(fanout as u64);
    let body = {
        // The classic event: its size does not matter here, the count of deliveries does.
        let mut one = super::event_json(account);
        one["event"] = json!(PROBE_EVENT);
        Bytes::from(json!({"events": vec![one; BATCH_SIZE]}).to_string())
    };
    let api = ctx.api;
    let mut senders = Vec::new();
    for _ in 0..8 {
        let (acked, body) = (acked.clone(), body.clone());
        senders.push(tokio::spawn(async move {
            let Ok(mut sender) = connect(api).await else {
                return;
            };
            let hard = Instant::now() + Duration::from_secs(60);
            while acked.load(Ordering::Relaxed) < events_wanted && Instant::now() < hard {
                let req = request(api, Method::POST, "/v1/events/batch", Some(body.clone()));
                match send(&mut sender, req).await {
                    Ok(a) if a.status == StatusCode::ACCEPTED => {
                        acked.fetch_add(per_batch, Ordering::Relaxed);
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(_) => return,
                }
            }
        }));
    }
    join_all(senders, Duration::from_secs(65)).await;
    let events = acked.load(Ordering::Relaxed);
    let owed = events * fanout as u64;
    let outstanding = || owed.saturating_sub(recv.received(path) - base);
    let mut p = Probe {
        events,
        backlog: outstanding(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(ctx.opts.drain_secs);
    let mut last = recv.received(path);
    let mut tick = t0;
    let mut cpu_created = None;
    let mut cpu_full = None;
    let mut created = false;
    while outstanding() > 0 && Instant::now() < deadline {
        tick += Duration::from_secs(1);
        while Instant::now() < tick && outstanding() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let now = recv.received(path);
        p.series.push(now - last);
        if !created {
            created = written(&Scrape::get(ctx.metrics).await).saturating_sub(written0) >= owed;
            if created {
                cpu_created = Some((Instant::now(), Cpu::now(&recv)));
            }
            p.creating += 1;
        }
        if outstanding() > 0 {
            p.full += 1;
            cpu_full = Some((Instant::now(), Cpu::now(&recv)));
        }
        last = now;
    }
    p.drain_s = t0.elapsed().as_secs_f64();
    p.drained = outstanding() == 0;
    let full: Vec<u64> = p.series.iter().copied().take(p.full).collect();
    if !full.is_empty() {
        p.from_stop_per_s = Some(full.iter().sum::<u64>() as f64 / full.len() as f64);
    }
    if let (Some((from, c0)), Some((at, c))) = (cpu_created, cpu_full) {
        let wall = at.saturating_duration_since(from).as_secs_f64();
        if wall > 0.5 {
            p.cpu = c.since(&c0).top(wall, 7);
        }
    }
    // The probe's arrivals are not the window's.
    let _ = recv.take_arrivals(path).await;
    p
}

impl LagResult {
    /// The run's section: `title`, JSON at `place`; `goal` names what the ratio is held to.
    pub fn report(&self, r: &mut Report, title: Cell, place: Place, goal: &str, max_lag: &str) {
        let l = self;
        let s = r.section(
            title
                .t(": ")
                .f("webhooks", Val::Int(l.webhooks as u64))
                .t(" webhook(s) x ")
                .f("conns", Val::Int(l.conns as u64))
                .t(" connections"),
            place,
        );
        s.row(
            "created (accepted) / s",
            Cell::fig("accepted_per_s", Val::Num(l.accepted_per_s)),
            Cell::text("202s per second over ")
                .f("window_s", Val::Secs(l.window_s, 1))
                .refusals(l.refused, &l.refused_statuses, l.io_errors)
                .t("; send -> 202 p50 / p99 ")
                .f("service_ms", Val::Pcts(l.service, 1, Shown::Two)),
        );
        s.row(
            "delivered/s during load",
            Cell::fig("delivered_per_s_during", Val::Num(l.delivered_per_s)),
            Cell::text("offered ")
                .f(
                    "offered_per_s",
                    Val::Num(l.accepted_per_s * l.webhooks as f64),
                )
                .t(" /s; per second (k): ")
                .f("series_during", Val::Series(l.series_during.clone())),
        );
        s.row(
            "engine's delivery lag (push-back)",
            Cell::fig(
                "engine_lag_max_s",
                Val::Secs(l.engine_lag_max.iter().cloned().fold(0.0, f64::max), 2),
            ),
            Cell::text(format!(
                "largest of 10 samples a second of kyberhook_delivery_lag_seconds (delivery.max_lag = {max_lag}); held "
            ))
            .f("ingest_held", Val::Num(l.held))
            .t(" (kyberhook_ingest_held_total); deliveries_scheduled max ")
            .f("deliveries_scheduled_max", Val::Num(l.scheduled_max))
            .t("; per second, fanout/scheduler/dispatcher: ")
            .f(
                "engine_lag_stages_s",
                Val::List(
                    l.engine_lag_stages
                        .iter()
                        .map(|s| Val::List(s.iter().map(|v| Val::Dec(*v, 1)).collect(), "/"))
                        .collect(),
                    " ",
                ),
            ),
        );
        let after_note = match &l.probe {
            None => Cell::text("backlog at stop ")
                .f("backlog_end", Val::Int(l.backlog_end))
                .t(", drained ")
                .f("drained", Val::Flag(l.drained, "all", "NOT all"))
                .t(" in ")
                .f("drain_s", Val::Secs(l.drain_s, 1))
                .t("; per second (k): ")
                .f("series_after", Val::Series(l.series_after.clone())),
            Some(p) => Cell::text("median of ")
                .f(
                    "ceiling_probe.runs",
                    Val::Int(l.probe_ceilings.len() as u64),
                )
                .t(" ceiling probes (each, k/s: ")
                .f(
                    "ceiling_probe.ceilings",
                    Val::List(
                        l.probe_ceilings
                            .iter()
                            .map(|c| Val::Dec(c / 1000.0, 1))
                            .collect(),
                        " ",
                    ),
                )
                .t("; backlog at stop was ")
                .f("backlog_end", Val::Int(l.backlog_end))
                .t("); the median's burst of ")
                .f("ceiling_probe.events", Val::Int(p.events))
                .t(" priority events left ")
                .f("ceiling_probe.backlog", Val::Int(p.backlog))
                .t(" deliveries owed, all written by second ")
                .f("ceiling_probe.creating_s", Val::Int(p.creating as u64))
                .t(", drained ")
                .f(
                    "ceiling_probe.drained",
                    Val::Flag(p.drained, "all", "NOT all"),
                )
                .t(" in ")
                .f("ceiling_probe.drain_s", Val::Secs(p.drain_s, 1))
                .t("; mean over the full seconds after that (from the stop: ")
                .f(
                    "ceiling_probe.from_stop_per_s",
                    Val::opt(p.from_stop_per_s.map(Val::Num)),
                )
                .t("); per second (k): ")
                .f("ceiling_probe.series", Val::Series(p.series.clone())),
        };
        s.row(
            "delivered/s once ingest stops",
            Cell::fig(
                "delivered_per_s_after",
                Val::opt(l.after_per_s.map(Val::Num)),
            ),
            after_note,
        );
        s.row(
            "during / after",
            Cell::fig(
                "during_to_after",
                Val::opt(l.ratio().map(|r| Val::Dec(r, 2))),
            ),
            Cell::text(goal),
        );
        s.row(
            "lag 202 -> arrival p50 / p99 / max",
            Cell::fig("lag_ms", Val::Pcts(l.lag, 0, Shown::Max)),
            Cell::text("every delivery of the window's events (")
                .f("lag_samples", Val::Int(l.lag.n as u64))
                .t("; missing ")
                .f("lag_missing", Val::Int(l.lag_missing))
                .t(", duplicates ")
                .f("duplicates", Val::Int(l.duplicates))
                .t(")"),
        );
        s.row(
            "threads' CPU during load (cores)",
            Cell::new(),
            Cell::fig("cpu_during", Val::Text(l.cpu_during.clone())),
        );
        if let Some(ms) = l.postgres_ms_per_delivery {
            s.row(
                "PostgreSQL CPU per delivery",
                Cell::fig("postgres_ms_per_delivery", Val::Dec(ms, 3)),
                Cell::text("ms: the server's processes during the window / deliveries received"),
            );
        }
        if !l.cpu_after.is_empty() {
            s.row(
                "threads' CPU once ingest stops",
                Cell::new(),
                Cell::fig("cpu_after", Val::Text(l.cpu_after.clone())),
            );
        }
        if let Some(p) = l.probe.as_ref().filter(|p| !p.cpu.is_empty()) {
            s.row(
                "threads' CPU draining the probe",
                Cell::new(),
                Cell::fig("ceiling_probe.cpu", Val::Text(p.cpu.clone())),
            );
        }
        s.row(
            "VmRSS (bench process)",
            Cell::fig("rss_end_bytes", Val::Mib(l.rss_end, 0)),
            Cell::text("at the window's end; ")
                .f("rss_drained_bytes", Val::Mib(l.rss_drained, 0))
                .t(" after the drain"),
        );
    }
}
