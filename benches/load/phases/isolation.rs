//! The `isolation` phases (issue 20 item 3), each on a fresh engine with the defaults (plus
//! `--set`), closed-loop producers of `--event-bytes` events on `--isolation-conns`
//! connections each:
//!
//! - **a**: account A's endpoint answers after `--slow-ms` (300 ms), account B's is fast; both
//!   produce as fast as they can. B's 202 → arrival p50 / p99 and whether B's ingest was held
//!   or refused: B's 429 / 503 answers and its send → 202 times (a held request is a slow
//!   one; `kyberhook_ingest_held_total` is engine-wide, shown beside them).
//! - **b**: one account, one slow webhook (`--slow-ms`) and nine fast ones: the fast ones'
//!   202 → arrival p50 / p99 (and the slow one's).
//! - **c**: one webhook whose endpoint answers after 50 ms (so its requests are in flight at
//!   all), then fails (`--fail-mode`, default `status:503`, after the same 50 ms) for a stage,
//!   then recovers; each stage `--secs` / 3 (at least 5 s). The receiver's count of the
//!   endpoint's requests in flight is sampled every 100 ms: before, during (it should fall
//!   to at most half within 2 s) and after (back up). `delivery.auto_disable_after` is raised
//!   for this case, so the webhook is not disabled by its failures, which would end its
//!   requests for another reason.

use std::time::{Duration, Instant};

use http::{Method, StatusCode};

use super::{body, create_account, create_webhooks, event_of_size, Ctx};
use crate::client::{api_json, Scrape};
use crate::engine::{BenchEngine, Shape};
use crate::loadgen::{Ack, Producer};
use crate::receiver::mode::{Delay, Mode};
use crate::receiver::{Arrival, PathId};
use crate::report::{Cell, Pcts, Place, Report, Shown, Val};

/// What one producer (account) saw in a case's window.
#[derive(Debug, Clone, Default)]
pub struct Side {
    pub accepted_per_s: f64,
    pub refused_429: u64,
    pub refused_503: u64,
    pub statuses: String,
    pub io_errors: u64,
    /// Send → 202.
    pub service: Pcts,
    /// 202 → arrival of the window's events' deliveries.
    pub lag: Pcts,
    pub missing: u64,
}

fn side(p: &Producer, window_s: f64, acks: &[Ack], arrivals: &[Arrival], hooks: usize) -> Side {
    let acked_at: std::collections::HashMap<&str, u64> =
        acks.iter().map(|(id, at)| (&**id, *at)).collect();
    let lags: Vec<Duration> = arrivals
        .iter()
        .filter_map(|a| {
            let ack = acked_at.get(&*a.event)?;
            Some(Duration::from_nanos(a.ns.saturating_sub(*ack)))
        })
        .collect();
    Side {
        accepted_per_s: acks.len() as f64 / window_s,
        refused_429: p.refused_with(429),
        refused_503: p.refused_with(503),
        statuses: p.statuses(),
        io_errors: p.io_errors.load(std::sync::atomic::Ordering::Relaxed),
        service: Pcts::of(p.take_service()),
        missing: (acks.len() * hooks).saturating_sub(lags.len()) as u64,
        lag: Pcts::of(lags),
    }
}

async fn defaults_engine(ctx: &Ctx, extra: &[(String, String, String)]) -> BenchEngine {
    BenchEngine::start(
        &ctx.engine_rt,
        &ctx.opts,
        ctx.pki.as_deref(),
        Shape::Defaults,
        extra,
    )
    .await
}

fn slow(ctx: &Ctx) -> Mode {
    Mode {
        delay: Delay::Fixed(Duration::from_millis(ctx.opts.slow_ms)),
        ..Mode::default()
    }
}

/// Waits (bounded by `--drain-secs`) until `path` has received `want` requests.
async fn wait_for(ctx: &Ctx, path: PathId, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(ctx.opts.drain_secs);
    while ctx.recv.received(path) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Debug, Clone, Default)]
pub struct CaseA {
    pub window_s: f64,
    pub a: Side,
    pub b: Side,
    pub held: f64,
}

pub async fn case_a(ctx: &Ctx) -> CaseA {
    let engine = defaults_engine(ctx, &[]).await;
    let ctx = &ctx.on(&engine);
    let (path_a, path_b) = (ctx.recv.path(true).await, ctx.recv.path(true).await);
    ctx.recv.set_mode(path_a, None, &slow(ctx)).await;
    let mut producers = Vec::new();
    let warmup = Duration::from_secs(ctx.opts.warmup);
    let window = Duration::from_secs(ctx.opts.secs);
    let hard = Instant::now() + warmup + window + Duration::from_secs(30);
    for (account, path) in [("acc_iso_a", path_a), ("acc_iso_b", path_b)] {
        create_account(ctx, account).await;
        create_webhooks(ctx, account, path, 0, 1).await;
        let event = body(&event_of_size(account, ctx.opts.event_bytes));
        producers.push(Producer::start(
            ctx.api,
            ctx.opts.isolation_conns,
            event,
            hard,
        ));
    }
    let (pa, pb) = (&producers[0], &producers[1]);
    tokio::time::sleep(warmup).await;
    let m0 = Scrape::get(ctx.metrics).await;
    let t0 = Instant::now();
    pa.window(true);
    pb.window(true);
    tokio::time::sleep(window).await;
    pa.window(false);
    pb.window(false);
    let window_s = t0.elapsed().as_secs_f64();
    let m1 = Scrape::get(ctx.metrics).await;
    pa.stop().await;
    pb.stop().await;
    let b_acked = pb.acked.load(std::sync::atomic::Ordering::Relaxed);
    wait_for(ctx, path_b, b_acked).await;
    let (acks_a, acks_b) = (pa.take_acks(), pb.take_acks());
    let arr_a = ctx.recv.take_arrivals(path_a).await;
    let arr_b = ctx.recv.take_arrivals(path_b).await;
    let r = CaseA {
        window_s,
        a: side(pa, window_s, &acks_a, &arr_a, 1),
        b: side(pb, window_s, &acks_b, &arr_b, 1),
        held: m1.sum("kyberhook_ingest_held_total", None)
            - m0.sum("kyberhook_ingest_held_total", None),
    };
    // A's backlog is not drained: its remaining attempts end with the engine.
    ctx.recv.set_mode(path_a, None, &Mode::default()).await;
    ctx.recv.forget(path_a).await;
    ctx.recv.forget(path_b).await;
    let _ = engine.shutdown().await;
    r
}

#[derive(Debug, Clone, Default)]
pub struct CaseB {
    pub window_s: f64,
    pub fast_hooks: usize,
    /// The producer, with the fast webhooks' deliveries as its lag.
    pub fast: Side,
    pub slow: Side,
}

pub async fn case_b(ctx: &Ctx) -> CaseB {
    const FAST: usize = 9;
    let engine = defaults_engine(ctx, &[]).await;
    let ctx = &ctx.on(&engine);
    // Two paths, so that the fast webhooks' arrivals can be waited for on their own.
    let (path_slow, path_fast) = (ctx.recv.path(true).await, ctx.recv.path(true).await);
    ctx.recv.set_mode(path_slow, None, &slow(ctx)).await;
    let account = "acc_iso_mixed";
    create_account(ctx, account).await;
    create_webhooks(ctx, account, path_slow, 0, 1).await;
    create_webhooks(ctx, account, path_fast, 0, FAST).await;
    let warmup = Duration::from_secs(ctx.opts.warmup);
    let window = Duration::from_secs(ctx.opts.secs);
    let hard = Instant::now() + warmup + window + Duration::from_secs(30);
    let event = body(&event_of_size(account, ctx.opts.event_bytes));
    let p = Producer::start(ctx.api, ctx.opts.isolation_conns, event, hard);
    tokio::time::sleep(warmup).await;
    let t0 = Instant::now();
    p.window(true);
    tokio::time::sleep(window).await;
    p.window(false);
    let window_s = t0.elapsed().as_secs_f64();
    p.stop().await;
    let acked = p.acked.load(std::sync::atomic::Ordering::Relaxed);
    wait_for(ctx, path_fast, acked * FAST as u64).await;
    let acks = p.take_acks();
    let arr_fast = ctx.recv.take_arrivals(path_fast).await;
    let arr_slow = ctx.recv.take_arrivals(path_slow).await;
    let fast = side(&p, window_s, &acks, &arr_fast, FAST);
    let slow = side(&p, window_s, &acks, &arr_slow, 1);
    ctx.recv.set_mode(path_slow, None, &Mode::default()).await;
    ctx.recv.forget(path_slow).await;
    ctx.recv.forget(path_fast).await;
    let _ = engine.shutdown().await;
    CaseB {
        window_s,
        fast_hooks: FAST,
        fast,
        slow,
    }
}

#[derive(Debug, Clone, Default)]
pub struct CaseC {
    pub stage_s: f64,
    pub fail_mode: String,
    /// Requests in flight at the endpoint every 100 ms, from the start of the first stage.
    pub samples: Vec<u64>,
    pub before_mean: f64,
    /// From the failure's start until the count was first at most half of `before_mean`.
    pub to_half_s: Option<f64>,
    /// Mean from 2 s into the failure to its end.
    pub during_mean: f64,
    pub fell_in_2s: bool,
    /// From the recovery until the count was first back to half of `before_mean`.
    pub recovered_s: Option<f64>,
    /// Mean from 2 s after the recovery to the end.
    pub after_mean: f64,
    pub failed_attempts: f64,
    pub status_at_end: String,
}

pub async fn case_c(ctx: &Ctx) -> CaseC {
    // Failures are what this case is about: the webhook must stay active through them.
    let extra = [(
        "delivery".to_string(),
        "auto_disable_after".to_string(),
        "1000000".to_string(),
    )];
    let engine = defaults_engine(ctx, &extra).await;
    let ctx = &ctx.on(&engine);
    let path = ctx.recv.path(false).await;
    let base = Mode {
        delay: Delay::Fixed(Duration::from_millis(50)),
        ..Mode::default()
    };
    let failing = base.with_answer(ctx.opts.fail_mode.answer);
    ctx.recv.set_mode(path, None, &base).await;
    let account = "acc_iso_failing";
    create_account(ctx, account).await;
    let hook = create_webhooks(ctx, account, path, 0, 1).await.remove(0);
    let stage = Duration::from_secs((ctx.opts.secs / 3).max(5));
    let warmup = Duration::from_secs(ctx.opts.warmup);
    let hard = Instant::now() + warmup + stage * 3 + Duration::from_secs(30);
    let event = body(&event_of_size(account, ctx.opts.event_bytes));
    let p = Producer::start(ctx.api, ctx.opts.isolation_conns, event, hard);
    tokio::time::sleep(warmup).await;
    let m0 = Scrape::get(ctx.metrics).await;
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let tick = Duration::from_millis(100);
    let ticks_per_stage = (stage.as_millis() / tick.as_millis()) as usize;
    for i in 0..ticks_per_stage * 3 {
        if i == ticks_per_stage {
            ctx.recv.set_mode(path, None, &failing).await;
        } else if i == ticks_per_stage * 2 {
            ctx.recv.set_mode(path, None, &base).await;
        }
        tokio::time::sleep_until((t0 + tick * (i as u32 + 1)).into()).await;
        ctx.recv.refresh().await;
        samples.push(ctx.recv.in_flight(path));
    }
    let m1 = Scrape::get(ctx.metrics).await;
    p.stop().await;
    let status = api_json(
        ctx.api,
        Method::GET,
        &format!("/v1/accounts/{account}/webhooks/{hook}"),
        None,
        StatusCode::OK,
    )
    .await["status"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    ctx.recv.set_mode(path, None, &Mode::default()).await;
    let _ = engine.shutdown().await;

    let n = ticks_per_stage;
    let mean = |s: &[u64]| {
        if s.is_empty() {
            0.0
        } else {
            s.iter().sum::<u64>() as f64 / s.len() as f64
        }
    };
    let secs = |ticks: usize| ticks as f64 * tick.as_secs_f64();
    let two_s = (2_000 / tick.as_millis()) as usize;
    // The first second of the first stage is the engine filling its slots.
    let before_mean = mean(&samples[(n / 5).min(n)..n]);
    let half = before_mean / 2.0;
    let during = &samples[n..2 * n];
    let after = &samples[2 * n..];
    let to_half = during.iter().position(|&v| v as f64 <= half);
    let during_mean = mean(&during[two_s.min(n)..]);
    CaseC {
        stage_s: stage.as_secs_f64(),
        fail_mode: failing.to_string(),
        before_mean,
        to_half_s: to_half.map(|i| secs(i + 1)),
        fell_in_2s: to_half.is_some_and(|i| i < two_s) && during_mean <= half,
        during_mean,
        recovered_s: after
            .iter()
            .position(|&v| v as f64 >= half)
            .map(|i| secs(i + 1)),
        after_mean: mean(&after[two_s.min(n)..]),
        samples,
        failed_attempts: m1.sum("kyberhook_delivery_attempts_total", Some("failure"))
            - m0.sum("kyberhook_delivery_attempts_total", Some("failure")),
        status_at_end: status,
    }
}

fn side_cells(key: &str, s: &Side) -> (Cell, Cell) {
    (
        Cell::fig(format!("{key}.lag_ms"), Val::Pcts(s.lag, 0, Shown::Max)),
        Cell::text("202 -> arrival; created ")
            .f(format!("{key}.accepted_per_s"), Val::Num(s.accepted_per_s))
            .t("/s; refused 429 ")
            .f(format!("{key}.refused_429"), Val::Int(s.refused_429))
            .t(", 503 ")
            .f(format!("{key}.refused_503"), Val::Int(s.refused_503))
            .when(
                !s.statuses.is_empty(),
                Cell::text(" [")
                    .f(format!("{key}.statuses"), Val::Text(s.statuses.clone()))
                    .t("]"),
            )
            .t("; send -> 202 ")
            .f(
                format!("{key}.service_ms"),
                Val::Pcts(s.service, 1, Shown::Max),
            )
            .t("; missing ")
            .f(format!("{key}.missing"), Val::Int(s.missing))
            .when(
                s.io_errors > 0,
                Cell::text("; io errors ").f(format!("{key}.io_errors"), Val::Int(s.io_errors)),
            ),
    )
}

impl CaseA {
    pub fn report(&self, r: &mut Report, slow_ms: u64) {
        let s = r.section(
            Cell::text("isolation a: account A's endpoint answers after ")
                .f("slow_ms", Val::Int(slow_ms))
                .t(" ms, account B's at once; both produce flat out for ")
                .f("window_s", Val::Secs(self.window_s, 1)),
            Place::Key("isolation_a".into()),
        );
        let (v, n) = side_cells("b", &self.b);
        s.row("B: lag p50 / p99 / max", v, n);
        let (v, n) = side_cells("a", &self.a);
        s.row("A: lag p50 / p99 / max", v, n);
        s.row(
            "ingest held (engine-wide)",
            Cell::fig("ingest_held", Val::Num(self.held)),
            Cell::text(
                "kyberhook_ingest_held_total over the window; issue 20 item 3a: B's p99 <= 100 ms, B never held or refused",
            ),
        );
    }
}

impl CaseB {
    pub fn report(&self, r: &mut Report, slow_ms: u64) {
        let s = r.section(
            Cell::text("isolation b: one account, 1 webhook answering after ")
                .f("slow_ms", Val::Int(slow_ms))
                .t(" ms and ")
                .f("fast_webhooks", Val::Int(self.fast_hooks as u64))
                .t(" fast ones, for ")
                .f("window_s", Val::Secs(self.window_s, 1)),
            Place::Key("isolation_b".into()),
        );
        let (v, n) = side_cells("fast", &self.fast);
        s.row(
            "fast webhooks: lag p50 / p99 / max",
            v,
            n.t("; issue 20 item 3b: p99 <= 100 ms"),
        );
        s.row(
            "slow webhook: lag p50 / p99 / max",
            Cell::fig("slow.lag_ms", Val::Pcts(self.slow.lag, 0, Shown::Max)),
            Cell::text("202 -> arrival; missing ").f("slow.missing", Val::Int(self.slow.missing)),
        );
    }
}

impl CaseC {
    pub fn report(&self, r: &mut Report) {
        let c = self;
        let s = r.section(
            Cell::text("isolation c: an endpoint answering after 50 ms starts failing (")
                .f("fail_mode", Val::Text(c.fail_mode.clone()))
                .t(") and recovers; stages of ")
                .f("stage_s", Val::Secs(c.stage_s, 0)),
            Place::Key("isolation_c".into()),
        );
        s.row(
            "in flight before",
            Cell::fig("before_mean", Val::Dec(c.before_mean, 1)),
            Cell::text("mean of the receiver's count, sampled every 100 ms"),
        );
        s.row(
            "fell to <= half within 2 s",
            Cell::fig("fell_in_2s", Val::Flag(c.fell_in_2s, "yes", "NO")),
            Cell::text("first at half after ")
                .f("to_half_s", Val::opt(c.to_half_s.map(|s| Val::Secs(s, 1))))
                .t("; mean from 2 s into the failure ")
                .f("during_mean", Val::Dec(c.during_mean, 1))
                .t("; failed attempts ")
                .f("failed_attempts", Val::Num(c.failed_attempts))
                .t("; webhook ")
                .f("status_at_end", Val::Text(c.status_at_end.clone()))
                .t(" at the end; issue 20 item 3c"),
        );
        s.row(
            "back up after recovery",
            Cell::fig("after_mean", Val::Dec(c.after_mean, 1)),
            Cell::text("mean from 2 s after; back to half after ").f(
                "recovered_s",
                Val::opt(c.recovered_s.map(|s| Val::Secs(s, 1))),
            ),
        );
        s.row(
            "in flight every 100 ms",
            Cell::new(),
            Cell::fig(
                "samples",
                Val::List(c.samples.iter().map(|v| Val::Int(*v)).collect(), " "),
            ),
        );
    }
}
