//! Phases 5 and 7: open loop at a fixed rate to W webhooks on a pool of connections.
//! `latency` (at `--rate`): ingest latency (intended send → 202, so queueing for a connection
//! counts) and intended send → the first attempt at the receiver; `paced` (at `--paced-rate`,
//! one webhook): the engine's CPU per event besides the same latencies.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::Semaphore;

use super::{create_account, create_webhooks, event_json, Ctx};
use crate::client::{connect, request, send, REQUEST_TIMEOUT};
use crate::loadgen::join_all;
use crate::procstat::{status_bytes, Cpu};
use crate::receiver::wall_ns;
use crate::report::{Cell, Pcts, Place, Report, Shown, Val};

#[derive(Debug, Clone, Default)]
pub struct LatencyResult {
    pub rate: u64,
    pub webhooks: usize,
    pub conns: usize,
    pub measured: usize,
    pub achieved_rate: f64,
    pub ingest: Pcts,
    pub ingest_service: Pcts,
    pub e2e: Pcts,
    pub failed: u64,
    pub fail_reasons: String,
    pub missing: usize,
    pub duplicates: u64,
    /// CPU of the bench process / of the engine's threads per measured event, from the first
    /// measured send until every measured event arrived (or the wait ran out).
    pub cpu_ms_per_event_process: f64,
    pub cpu_ms_per_event_engine: f64,
    pub cpu_threads: String,
    pub rss: u64,
}

/// (intended send, actual send, acknowledged, event id) of one measured event.
type Sample = (Instant, Instant, Instant, String);

pub async fn run(ctx: &Ctx, rate: u64, account: &str, webhooks: usize) -> LatencyResult {
    let path = ctx.recv.path(true).await;
    create_account(ctx, account).await;
    create_webhooks(ctx, account, path, 0, webhooks).await;
    let warm_n = rate * ctx.opts.warmup;
    let total = warm_n + rate * ctx.opts.secs;
    let conns = ctx.opts.latency_conns;
    // FIFO, so every connection is used every `conns` requests: the engine closes a keep-alive
    // connection that stays idle for `server.header_read_timeout` (hyper starts that timer
    // while waiting for the next request head), and a LIFO pool would leave some idle that long.
    let mut pool = VecDeque::with_capacity(conns);
    for _ in 0..conns {
        pool.push_back(connect(ctx.api).await.expect("connect"));
    }
    let pool = Arc::new(Mutex::new(pool));
    let sem = Arc::new(Semaphore::new(conns));
    let body = Bytes::from(event_json(account).to_string());
    let failed = Arc::new(AtomicU64::new(0));
    let reasons: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let samples: Arc<Mutex<Vec<Sample>>> =
        Arc::new(Mutex::new(Vec::with_capacity((total - warm_n) as usize)));
    let api = ctx.api;
    let start = Instant::now() + Duration::from_millis(20);
    // Intended send times are Instants; arrivals are wall-clock ns: one pair maps between them.
    let (base_i, base_ns) = (Instant::now(), wall_ns());
    let step_ns = 1_000_000_000f64 / rate as f64;
    let mut handles = Vec::with_capacity(total as usize);
    let mut cpu0 = None;
    for i in 0..total {
        let intended = start + Duration::from_nanos((i as f64 * step_ns) as u64);
        tokio::time::sleep_until(intended.into()).await;
        if i == warm_n {
            cpu0 = Some((Instant::now(), Cpu::now(&ctx.recv)));
        }
        let (pool, sem, body, failed, samples, reasons) = (
            pool.clone(),
            sem.clone(),
            body.clone(),
            failed.clone(),
            samples.clone(),
            reasons.clone(),
        );
        let fail = move |why: String| {
            failed.fetch_add(1, Ordering::Relaxed);
            *reasons
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(why)
                .or_default() += 1;
        };
        let measured = i >= warm_n;
        handles.push(tokio::spawn(async move {
            let Ok(_permit) = sem.acquire().await else {
                return;
            };
            let Some(mut sender) = pool.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
            else {
                fail("no connection left".into());
                return;
            };
            let sent = Instant::now();
            let res = send(
                &mut sender,
                request(api, Method::POST, "/v1/events", Some(body)),
            )
            .await;
            let done = Instant::now();
            match res {
                Ok(a) if a.status == StatusCode::ACCEPTED => {
                    pool.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_back(sender);
                    let id = serde_json::from_slice::<Value>(&a.body)
                        .ok()
                        .and_then(|v| v["id"].as_str().map(str::to_string));
                    match (measured, id) {
                        (true, Some(id)) => samples
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((intended, sent, done, id)),
                        (true, None) => fail("202 without an id".into()),
                        _ => {}
                    }
                }
                Ok(a) => {
                    pool.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_back(sender);
                    fail(format!(
                        "{} {}",
                        a.status.as_u16(),
                        String::from_utf8_lossy(&a.body[..a.body.len().min(160)])
                    ));
                }
                Err(e) => {
                    fail(format!("io: {e}"));
                    match connect(api).await {
                        Ok(s) => pool.lock().unwrap_or_else(|e| e.into_inner()).push_back(s),
                        Err(e) => fail(format!("reconnect: {e}")),
                    }
                }
            }
        }));
    }
    let sent_all = Instant::now();
    join_all(handles, REQUEST_TIMEOUT + Duration::from_secs(5)).await;
    let achieved_rate = total as f64 / (sent_all - start).as_secs_f64().max(1e-9);
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    // Wait (bounded) until every event's deliveries arrived.
    let wait = if webhooks == 0 {
        0
    } else {
        ctx.opts.drain_secs
    };
    let deadline = Instant::now() + Duration::from_secs(wait);
    let want = total * webhooks as u64;
    while ctx.recv.received(path) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (t0, c0) = cpu0.unwrap_or_else(|| (Instant::now(), Cpu::now(&ctx.recv)));
    let cpu = Cpu::now(&ctx.recv).since(&c0);
    let cpu_secs = t0.elapsed().as_secs_f64();
    let mut first: HashMap<Box<str>, u64> = HashMap::new();
    for a in ctx.recv.take_arrivals(path).await {
        let at = first.entry(a.event).or_insert(a.ns);
        *at = (*at).min(a.ns);
    }
    ctx.recv.refresh().await;
    let duplicates = ctx.recv.dups(path);
    ctx.recv.forget(path).await;
    let mut e2e = Vec::with_capacity(samples.len());
    let mut missing = 0;
    for (intended, _, _, id) in &samples {
        let intended_ns = base_ns + intended.saturating_duration_since(base_i).as_nanos() as u64;
        match first.get(id.as_str()) {
            Some(at) => e2e.push(Duration::from_nanos(at.saturating_sub(intended_ns))),
            None => missing += 1,
        }
    }
    LatencyResult {
        rate,
        webhooks,
        conns,
        measured: samples.len(),
        achieved_rate,
        ingest: Pcts::of(samples.iter().map(|s| s.2 - s.0).collect()),
        ingest_service: Pcts::of(samples.iter().map(|s| s.2 - s.1).collect()),
        e2e: Pcts::of(e2e),
        failed: failed.load(Ordering::Relaxed),
        fail_reasons: {
            let r = reasons.lock().unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<String> = r.iter().map(|(k, n)| format!("{n}x {k}")).collect();
            v.sort();
            v.join("; ")
        },
        missing,
        duplicates,
        cpu_ms_per_event_process: cpu.process_s * 1e3 / samples.len().max(1) as f64,
        cpu_ms_per_event_engine: cpu.engine_s() * 1e3 / samples.len().max(1) as f64,
        cpu_threads: cpu.top(cpu_secs, 8),
        rss: status_bytes("VmRSS:"),
    }
}

impl LatencyResult {
    fn title(&self, name: &str) -> Cell {
        Cell::text(format!("{name}, open loop at "))
            .f("rate", Val::Int(self.rate))
            .t(" events/s, ")
            .f("webhooks", Val::Int(self.webhooks as u64))
            .t(" webhook(s), ")
            .f("connections", Val::Int(self.conns as u64))
            .t(" connections")
    }

    /// The `latency` phase's section.
    pub fn report_latency(&self, r: &mut Report) {
        let l = self;
        let s = r.section(l.title("latency"), Place::Key("latency".into()));
        s.row(
            "events measured",
            Cell::fig("measured", Val::Int(l.measured as u64)),
            Cell::text("sent at ")
                .f("achieved_rate", Val::Num(l.achieved_rate))
                .t("/s; failed ")
                .f("failed", Val::Int(l.failed))
                .when(
                    !l.fail_reasons.is_empty(),
                    Cell::text(" (")
                        .f("fail_reasons", Val::Text(l.fail_reasons.clone()))
                        .t(")"),
                )
                .t(", no delivery seen ")
                .f("missing", Val::Int(l.missing as u64))
                .t(", duplicates ")
                .f("duplicates", Val::Int(l.duplicates)),
        );
        s.row(
            "ingest p50 / p99 / p99.9",
            Cell::fig("ingest_ms", Val::Pcts(l.ingest, 2, Shown::Tail)),
            Cell::text("intended send -> 202"),
        );
        s.row(
            "  (service time only)",
            Cell::fig(
                "ingest_service_ms",
                Val::Pcts(l.ingest_service, 2, Shown::Tail),
            ),
            Cell::text("actual send -> 202"),
        );
        s.row(
            "ingest -> first attempt p50 / p99 / p99.9",
            Cell::fig(
                "ingest_to_first_attempt_ms",
                Val::Pcts(l.e2e, 2, Shown::Tail),
            ),
            Cell::text("intended send -> request at receiver"),
        );
    }

    /// The `paced` phase's section.
    pub fn report_paced(&self, r: &mut Report) {
        let p = self;
        let s = r.section(p.title("paced"), Place::Key("paced".into()));
        s.row(
            "CPU per event (engine threads)",
            Cell::fig(
                "cpu_ms_per_event_engine",
                Val::Ms(p.cpu_ms_per_event_engine, 3),
            ),
            Cell::text("bench process ")
                .f(
                    "cpu_ms_per_event_process",
                    Val::Ms(p.cpu_ms_per_event_process, 3),
                )
                .t(" (with the load generator); ")
                .f("measured", Val::Int(p.measured as u64))
                .t(" events measured; cores: ")
                .f("cpu_threads", Val::Text(p.cpu_threads.clone())),
        );
        s.row(
            "ingest p50 / p99 / p99.9",
            Cell::fig("ingest_ms", Val::Pcts(p.ingest, 2, Shown::Tail)),
            Cell::text("intended send -> 202; failed ")
                .f("failed", Val::Int(p.failed))
                .t("; VmRSS ")
                .f("rss_bytes", Val::Mib(p.rss, 0)),
        );
        s.row(
            "ingest -> first attempt p50 / p99 / p99.9",
            Cell::fig(
                "ingest_to_first_attempt_ms",
                Val::Pcts(p.e2e, 2, Shown::Tail),
            ),
            Cell::text("missing ").f("missing", Val::Int(p.missing as u64)),
        );
    }
}
