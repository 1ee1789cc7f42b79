//! The `flow` phases: issue 20's table, measured as users see it. Per run (`--flow`, default
//! 1 webhook × 32 / 64 / 256 connections and 10 webhooks × the same): a fresh engine with the
//! default config except an unlimited plan and the loopback allowlist (and `--set`), closed-
//! loop producers sending `--event-bytes` (600) byte events, the receivers in their own
//! processes; measured like a lag run ([`super::lag::run`]): events created/s, deliveries/s
//! during ingest and once it stops, 202 → arrival p50 / p99.

use super::lag::{self, LagResult};
use super::{body, create_account, create_webhooks, event_of_size, Ctx};
use crate::engine::{BenchEngine, Shape};
use crate::options::Opts;
use crate::report::{Cell, Place, Report, Val};

pub async fn run(ctx: &Ctx, n: usize, webhooks: usize, conns: usize) -> LagResult {
    let engine = BenchEngine::start(
        &ctx.engine_rt,
        &ctx.opts,
        ctx.pki.as_deref(),
        Shape::Defaults,
        &[],
    )
    .await;
    let ctx = &ctx.on(&engine);
    let account = format!("acc_flow{webhooks}x{conns}_{n}");
    let path = ctx.recv.path(true).await;
    create_account(ctx, &account).await;
    create_webhooks(ctx, &account, path, 0, webhooks).await;
    let event = body(&event_of_size(&account, ctx.opts.event_bytes));
    let r = lag::run(ctx, path, &account, webhooks, conns, event).await;
    let _ = engine.shutdown().await;
    r
}

pub fn report(r: &mut Report, run: &LagResult, opts: &Opts) {
    run.report(
        r,
        Cell::text("flow (")
            .f("event_bytes", Val::Int(opts.event_bytes as u64))
            .t("-byte events, default engine config, receiver ")
            .f("receiver_mode", Val::Text(opts.receiver_mode.to_string()))
            .t(")"),
        Place::Item("flow".into()),
        "issue 20 item 2: >= 0.8 and lag p99 <= 500 ms",
        opts.max_lag.as_deref().unwrap_or("default"),
    );
}
