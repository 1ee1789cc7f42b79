//! Phases 1–3: closed-loop requests with no webhook subscribed — `GET /healthz` (the HTTP
//! ceiling), single-event `POST /v1/events` (durable ingest) and `POST /v1/events/batch` with
//! 100 events per request — each a warm-up and a measured window, plus the group commit's
//! figures from `/metrics` over the window.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::json;

use super::{event_json, Ctx, BATCH_SIZE};
use crate::client::{request, Scrape};
use crate::loadgen::{join_all, spawn_closed_loop, Counters, Gate, Workload};
use crate::report::{Cell, Place, Report, Val};

#[derive(Debug, Clone, Default)]
pub struct RpsResult {
    pub ok_per_s: f64,
    pub items_per_s: f64,
    pub window_s: f64,
    pub ok_total: u64,
    pub items_total: u64,
    pub io_errors: u64,
    pub item_errors: u64,
    pub other_statuses: String,
    pub commits_per_s: f64,
    pub events_per_commit: f64,
    pub flush_ms_mean: f64,
}

pub fn healthz_workload(ctx: &Ctx) -> Workload {
    let api = ctx.api;
    Workload {
        make: Arc::new(move || request(api, Method::GET, "/healthz", None)),
        expect: StatusCode::OK,
        items_per_ok: 1,
        gate: None,
    }
}

pub fn ingest_workload(ctx: &Ctx, account: &str, gate: Option<Gate>) -> Workload {
    let (api, body) = (ctx.api, Bytes::from(event_json(account).to_string()));
    Workload {
        make: Arc::new(move || request(api, Method::POST, "/v1/events", Some(body.clone()))),
        expect: StatusCode::ACCEPTED,
        items_per_ok: 1,
        gate,
    }
}

pub fn batch_workload(ctx: &Ctx, account: &str, gate: Option<Gate>) -> Workload {
    let one = event_json(account);
    let (api, body) = (
        ctx.api,
        Bytes::from(json!({"events": vec![one; BATCH_SIZE]}).to_string()),
    );
    Workload {
        make: Arc::new(move || request(api, Method::POST, "/v1/events/batch", Some(body.clone()))),
        expect: StatusCode::ACCEPTED,
        items_per_ok: BATCH_SIZE as u64,
        gate,
    }
}

/// Runs a closed-loop workload: warm-up, then a measured window.
pub async fn closed_loop(ctx: &Ctx, work: Workload) -> RpsResult {
    let counters = Arc::new(Counters::default());
    let warmup = Duration::from_secs(ctx.opts.warmup);
    let window = Duration::from_secs(ctx.opts.rps_secs);
    let hard = Instant::now() + warmup + window + Duration::from_secs(30);
    let handles = spawn_closed_loop(
        ctx.api,
        ctx.opts.conns,
        Arc::new(work),
        counters.clone(),
        hard,
    );
    tokio::time::sleep(warmup).await;
    let m0 = Scrape::get(ctx.metrics).await;
    let (t0, ok0, it0) = (
        Instant::now(),
        counters.ok.load(Ordering::Relaxed),
        counters.items.load(Ordering::Relaxed),
    );
    tokio::time::sleep(window).await;
    let (t1, ok1, it1) = (
        Instant::now(),
        counters.ok.load(Ordering::Relaxed),
        counters.items.load(Ordering::Relaxed),
    );
    counters.stop.store(true, Ordering::Relaxed);
    let m1 = Scrape::get(ctx.metrics).await;
    join_all(handles, Duration::from_secs(35)).await;
    let secs = (t1 - t0).as_secs_f64();
    let delta = |name: &str| m1.sum(name, None) - m0.sum(name, None);
    let commits = delta("kyberhook_wal_batch_events_count");
    let events = delta("kyberhook_wal_batch_events_sum");
    let flush_s = delta("kyberhook_wal_flush_seconds_sum");
    RpsResult {
        ok_per_s: (ok1 - ok0) as f64 / secs,
        items_per_s: (it1 - it0) as f64 / secs,
        window_s: secs,
        ok_total: counters.ok.load(Ordering::Relaxed),
        items_total: counters.items.load(Ordering::Relaxed),
        io_errors: counters.io_errors.load(Ordering::Relaxed),
        item_errors: counters.item_errors.load(Ordering::Relaxed),
        other_statuses: counters.other_statuses(),
        commits_per_s: commits / secs,
        events_per_commit: if commits > 0.0 { events / commits } else { 0.0 },
        flush_ms_mean: if commits > 0.0 {
            flush_s / commits * 1e3
        } else {
            0.0
        },
    }
}

/// The three closed-loop phases' figures (`None`: the phase was skipped).
pub fn report(
    r: &mut Report,
    conns: usize,
    healthz: Option<&RpsResult>,
    ingest: Option<&RpsResult>,
    batch: Option<&RpsResult>,
) {
    let s = r.section("closed loop, no webhook subscribed", Place::Root);
    if let Some(h) = healthz {
        s.row(
            "healthz_rps",
            Cell::fig("healthz_rps", Val::Num(h.ok_per_s)),
            Cell::text(format!("GET /healthz, {conns} conns, "))
                .f("healthz_window_s", Val::Secs(h.window_s, 1)),
        );
    } else {
        s.row("healthz_rps", Cell::new(), Cell::text("skipped"));
    }
    if let Some(i) = ingest {
        s.row(
            "ingest_rps",
            Cell::fig("ingest_rps", Val::Num(i.ok_per_s)),
            Cell::text("POST /v1/events -> 202 (durable, fsync); ")
                .f("ingest_commits_per_s", Val::Num(i.commits_per_s))
                .t(" commits/s, ")
                .f("ingest_events_per_commit", Val::Dec(i.events_per_commit, 1))
                .t(" events/commit, flush ")
                .f("ingest_flush_ms_mean", Val::Ms(i.flush_ms_mean, 2)),
        );
    } else {
        s.row("ingest_rps", Cell::new(), Cell::text("skipped"));
    }
    let ratio = match (healthz, ingest) {
        (Some(h), Some(i)) if h.ok_per_s > 0.0 => Val::Dec(i.ok_per_s / h.ok_per_s, 3),
        _ => Val::None,
    };
    s.row(
        "ingest_rps / healthz_rps",
        Cell::fig("ingest_to_healthz_ratio", ratio),
        Cell::text("issue 20 item 5: >= 0.5"),
    );
    if let Some(b) = batch {
        s.row(
            "batch_events_per_s",
            Cell::fig("batch_events_per_s", Val::Num(b.items_per_s)),
            Cell::text(format!("POST /v1/events/batch x{BATCH_SIZE}: "))
                .f("batch_requests_per_s", Val::Num(b.ok_per_s))
                .t(" req/s; ")
                .f("batch_commits_per_s", Val::Num(b.commits_per_s))
                .t(" commits/s, ")
                .f("batch_events_per_commit", Val::Dec(b.events_per_commit, 0))
                .t(" events/commit, flush ")
                .f("batch_flush_ms_mean", Val::Ms(b.flush_ms_mean, 2)),
        );
    } else {
        s.row("batch_events_per_s", Cell::new(), Cell::text("skipped"));
    }
    let mut errs = Vec::new();
    for (name, r) in [("healthz", healthz), ("ingest", ingest), ("batch", batch)] {
        let Some(r) = r else { continue };
        if r.io_errors > 0 || r.item_errors > 0 || !r.other_statuses.is_empty() {
            errs.push(format!(
                "{name}: io {} item {} status [{}]",
                r.io_errors, r.item_errors, r.other_statuses
            ));
        }
    }
    s.row(
        "errors",
        Cell::fig("closed_loop_errors", Val::Int(errs.len() as u64)),
        Cell::fig("closed_loop_error_detail", Val::Text(errs.join("; "))),
    );
}
