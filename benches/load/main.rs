//! End-to-end load bench of kyberhook on this machine (harness = false: a plain `main`).
//!
//! ```text
//! cargo bench --bench load                    # full run (30 s delivery/latency windows)
//! cargo bench --bench load -- --quick         # short run (5 s windows)
//! cargo bench --bench load -- --json          # also print the figures as one JSON object
//! cargo bench --bench load -- --no-fsync      # storage.fsync = false: what durability costs
//! cargo bench --bench load -- --phases flow,isolation --quick   # issue 20's table and cases
//! cargo bench --bench load -- --backend postgres --nodes 2 --quick   # two nodes, SIGKILL of one
//! flags: --conns N (256)  --secs S (30; quick 5)  --rps-secs S (15; quick 3)
//!        --warmup S (3; quick 1)  --rate EV/S (1000)  --fanouts 1,10
//!        --receivers K (1 receiver process; webhooks spread over K)  --max-backlog N (50000)
//!        --receiver-latency MODE (instant | fixed:MS | load[:BASE:PER] | status:CODE | hang,
//!          joined with +; how the receivers answer unless a phase says otherwise)
//!        --receiver-tls (HTTPS receivers with a throw-away CA instead of plain HTTP)
//!        --drain-secs S (120; quick 60)  --probes N (3: ceiling probes per run, median)
//!        --fanout-ingest single|batch|both (both)
//!        --latency-webhooks N (1; 0 measures ingest latency alone)  --latency-conns N (32)
//!        --phases healthz,ingest,batch,fanout,latency,retention,lag,paced,flow,isolation,cluster
//!          (all but cluster)
//!        --retention S (10: storage.retention of the retention phase)  --retention-run S (90; quick 40)
//!        --lag WxC,... (webhooks x connections of the lag phases, and of the flow phases
//!          unless --flow is given)  --flow WxC,... (1x32,1x64,1x256,10x32,10x64,10x256)
//!        --quota N (max_scheduled_per_account)  --max-lag D (delivery.max_lag; 0s: no lag
//!          push-back)  --paced-rate N (250)  --event-bytes N (600: flow and isolation events)
//!        --set SECTION.KEY=VALUE (flow and isolation engines' config, repeatable, e.g.
//!          delivery.max_in_flight_per_webhook=1024)
//!        --isolation a,b,c (all)  --isolation-conns N (32 per producer)  --slow-ms MS (300)
//!        --fail-mode MODE (status:503: how case c's endpoint fails)
//!        --nodes N (2: the cluster phase's kyberhook processes; alone, runs only that phase)
//!        --cluster WxC,... (1x32,10x32: its runs)
//!        --divide (the default: the nodes divide 16 accounts) | --standby (one node serves)
//!        --backend sled|postgres (sled)  --postgres-url postgres://USER@HOST:PORT (the cluster
//!          of --backend postgres; else KYBERHOOK_BENCH_POSTGRES_URL, else the bench starts a
//!          throw-away one with .ci/postgres and stops it at the end; each engine gets a fresh
//!          database, and the `postgres` CPU group is the server's processes)
//! ```
//!
//! Three kinds of process share the machine, everything on 127.0.0.1: this one runs the
//! engine (its own tokio runtime, one worker per CPU, a durable store with `storage.fsync =
//! true` in a fresh temp dir, plan `bench` with unlimited events/s) and the load generator
//! (keep-alive HTTP/1.1 connections, hyper `client::conn::http1`, each a task sending back to
//! back, on a second runtime); the receivers are this bench re-executed as child processes
//! (`--receiver-child`, see `receiver/child.rs`), each plain HTTP/1.1 (or HTTPS) on ONE tokio
//! thread, answering per a configurable mode, counting requests per phase, recording the
//! first arrival of each delivery for 202 → arrival latency and counting repeated delivery
//! ids. A receiver in its own process answers as late as a real endpoint on a busy machine
//! would: an instant in-process answer hid the engine's per-webhook slot bottleneck (issue
//! 20).
//!
//! Phases, each with a warm-up that is not counted (the classic phases 1–8 on one engine with
//! 1024 slots and 256 per webhook, as the README's figures were measured):
//! 1. `healthz`: `GET /healthz` closed loop → `healthz_rps`;
//! 2. `ingest`: `POST /v1/events` closed loop, no webhook subscribed → `ingest_rps`;
//! 3. `batch`: `POST /v1/events/batch` with 100 events per request → `batch_events_per_s`;
//! 4. `fanout`: per fan-out F (1 and 10 webhooks on one account) and ingest mode (single
//!    events, then batches of 100): closed-loop ingest for the window, throttled only when
//!    the outstanding deliveries exceed `--max-backlog`; `deliveries_per_s` = requests the
//!    receiver got during the window / window length; then the backlog drains (bounded);
//! 5. `latency`: open loop at `--rate` events/s to one webhook: intended send → 202 and
//!    intended send → first attempt at the receiver;
//! 6. `retention`: a second engine with `storage.retention = --retention` seconds under
//!    batch fan-out to 10 webhooks: data dir size every 2 s (it must level off), purge rate;
//! 7. `paced`: open loop at `--paced-rate` events/s to one webhook, engine CPU per event;
//! 8. `lag` (issue 12), per `--lag` WxC: closed-loop, uncapped single-event ingest on C
//!    connections to W webhooks: deliveries/s during the window, 202 → arrival of every
//!    delivery, the engine's own lag per stage, threads' CPU, VmRSS; then ingest stops and
//!    the drain gives "once ingest stops" — with push-back nothing is left to drain, so with
//!    fan-out a *ceiling probe* measures it: batches of a priority event type (never held)
//!    build ~8 s of deliveries, sending stops, and the drain is counted per second from when
//!    the engine has written every delivery of the burst;
//! 9. `flow` (issue 20's table), per `--flow` WxC: the `lag` measurement, each run on a fresh
//!    engine with the default config except the unlimited plan and the loopback allowlist,
//!    `--event-bytes` events;
//! 10. `isolation` (issue 20 item 3), each case on a fresh default engine: (a) a slow
//!     account's endpoint beside a fast one's, (b) a slow webhook beside fast ones in one
//!     account, (c) an endpoint that fails for a while and recovers, its requests in flight
//!     sampled every 100 ms (see `phases/isolation.rs`);
//! 11. `cluster` (issue 22; only with `--backend postgres`, and only when `--phases` or
//!     `--nodes` asks for it), per `--cluster` WxC: `--nodes` real `kyberhook serve`
//!     processes on one fresh database, producers spread over all of them (dividing the work:
//!     16 accounts); a third into the window one node (`--standby`: the serving node) is
//!     SIGKILLed: created and delivered per second before and after, how long until the
//!     others hold its partitions (another serves), the longest pause in arrivals, lost
//!     deliveries and duplicates once drained, and whether the killed node rejoins (see
//!     `phases/cluster.rs`).
//!
//! All figures go into one report (`report.rs`), printed as a table and, with `--json`, as
//! one JSON object from the same values. Peak RSS is this process's VmHWM (engine and load
//! generator); the receivers' CPU is shown as the `receiver` group. Every loop is bounded in
//! time and count; `--quick` with every phase took 4.6 minutes on 2 cores (load average ~9).

mod client;
mod engine;
mod loadgen;
mod options;
mod phases;
mod postgres;
mod procstat;
mod receiver;
mod report;

use std::sync::Arc;
use std::time::Duration;

use engine::{BenchEngine, Shape};
use phases::{cluster, fanout, flow, isolation, lag, latency, retention, rps, Ctx};
use procstat::{du, loadavg, status_bytes};
use receiver::Receivers;
use report::{Cell, Place, Report, Val};

/// The same allocator as the `kyberhook` binary, so the bench measures what runs in production.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--receiver-child") {
        receiver::child::main(&args[1..]);
    }
    let mut opts = options::parse(args);
    // Stops the bench's own PostgreSQL, if it started one, when main returns.
    let _cluster = (opts.postgres && opts.postgres_url.is_none()).then(|| {
        let (url, cluster) = postgres::start_cluster();
        opts.postgres_url = Some(url);
        cluster
    });
    let opts = Arc::new(opts);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let engine_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus)
        .thread_name("engine")
        .enable_all()
        .build()
        .expect("engine runtime");
    let bench_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus)
        .thread_name("loadgen")
        .enable_all()
        .build()
        .expect("bench runtime");

    let pki = opts.receiver_tls.then(|| Arc::new(receiver::pki()));
    let recv = Arc::new(Receivers::start(
        opts.receivers,
        opts.receiver_mode,
        pki.as_deref(),
    ));
    let poller = {
        let _in_runtime = bench_rt.enter();
        recv.spawn_poller()
    };
    let engine = bench_rt.block_on(BenchEngine::start(
        engine_rt.handle(),
        &opts,
        pki.as_deref(),
        Shape::Classic,
        &[],
    ));
    let ctx = Ctx {
        opts: opts.clone(),
        recv: recv.clone(),
        pki: pki.clone(),
        engine_rt: engine_rt.handle().clone(),
        api: engine.api(),
        metrics: engine.metrics(),
    };
    let load_start = loadavg();
    eprintln!(
        "load bench ({}): {cpus} CPUs, {} connections, windows: rps {} s, fan-out/latency {} s, warm-up {} s; receivers {} ({})",
        opts.mode_name(),
        opts.conns,
        opts.rps_secs,
        opts.secs,
        opts.warmup,
        recv.urls.join(" "),
        opts.receiver_mode
    );

    let mut report = Report::default();
    report
        .section("run", Place::Root)
        .row(
            "bench",
            Cell::fig("mode", Val::Text(opts.mode_name().into())),
            Cell::fig("cpus", Val::Int(cpus as u64))
                .t(" CPUs, ")
                .f("conns", Val::Int(opts.conns as u64))
                .t(" connections, fsync ")
                .f("fsync", Val::Flag(opts.fsync, "on", "off")),
        )
        .row(
            "receivers",
            Cell::fig("receivers", Val::Int(recv.urls.len() as u64)),
            Cell::text("process(es), one thread each, ")
                .f(
                    "receiver_tls",
                    Val::Flag(opts.receiver_tls, "HTTPS", "plain HTTP"),
                )
                .t(", answering ")
                .f("receiver_mode", Val::Text(opts.receiver_mode.to_string())),
        );
    let (events_only, main_totals) =
        bench_rt.block_on(async {
            let run = |name: &str| opts.runs(name);
            let r = |ph: &str, msg: &str| {
                let on = run(ph);
                if on {
                    eprintln!("phase: {msg}");
                }
                on
            };
            let healthz = if r("healthz", "GET /healthz") {
                Some(rps::closed_loop(&ctx, rps::healthz_workload(&ctx)).await)
            } else {
                None
            };
            phases::create_account(&ctx, "acc_ingest").await;
            let ingest = if r("ingest", "POST /v1/events (no webhook)") {
                Some(rps::closed_loop(&ctx, rps::ingest_workload(&ctx, "acc_ingest", None)).await)
            } else {
                None
            };
            let batch = if r("batch", "POST /v1/events/batch x100 (no webhook)") {
                Some(rps::closed_loop(&ctx, rps::batch_workload(&ctx, "acc_ingest", None)).await)
            } else {
                None
            };
            rps::report(
                &mut report,
                opts.conns,
                healthz.as_ref(),
                ingest.as_ref(),
                batch.as_ref(),
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            let m = client::Scrape::get(ctx.metrics).await;
            let events_only = (
                m.sum("kyberhook_events_ingested_total", None),
                du(engine.data.path()),
                ingest.map_or(0, |i| i.ok_total) + batch.map_or(0, |b| b.items_total),
                status_bytes("VmRSS:"),
            );

            if opts.runs("fanout") {
                let mut n = 0;
                for &f in &opts.fanouts {
                    for &mode in &opts.fanout_ingest {
                        n += 1;
                        eprintln!(
                            "phase: deliveries with {f} webhook(s), {} ingest",
                            mode.name()
                        );
                        fanout::run(&ctx, n, f, mode).await.report(
                            &mut report,
                            recv.urls.len(),
                            opts.max_backlog,
                        );
                    }
                }
            } else {
                report.skipped("deliveries (fanout)", Place::Key("fanout".into()));
            }
            if r("latency", "latency, open loop") {
                latency::run(&ctx, opts.rate, "acc_latency", opts.latency_webhooks)
                    .await
                    .report_latency(&mut report);
            } else {
                report.skipped("latency", Place::Key("latency".into()));
            }
            if r("paced", "paced, open loop to 1 webhook") {
                latency::run(&ctx, opts.paced_rate, "acc_paced", 1)
                    .await
                    .report_paced(&mut report);
            } else {
                report.skipped("paced", Place::Key("paced".into()));
            }
            if opts.runs("lag") {
                for (i, &(w, c)) in opts.lag.iter().enumerate() {
                    eprintln!(
                        "phase: lag, {w} webhook(s), {c} connections, uncapped single-event ingest"
                    );
                    let account = format!("acc_lag{w}x{c}_{i}");
                    let path = recv.path(true).await;
                    phases::create_account(&ctx, &account).await;
                    phases::create_webhooks(&ctx, &account, path, 0, w).await;
                    let body = phases::body(&phases::event_json(&account));
                    let title = Cell::text("lag: closed-loop single-event ingest, uncapped").when(
                        opts.quota.is_some(),
                        Cell::text(" (max_scheduled_per_account = ")
                            .f("quota", Val::opt(opts.quota.map(Val::Int)))
                            .t(")"),
                    );
                    lag::run(&ctx, path, &account, w, c, body).await.report(
                        &mut report,
                        title,
                        Place::Item("lag".into()),
                        "issue 12 item 1: >= 0.8 with 10 webhooks and 64 connections",
                        opts.max_lag.as_deref().unwrap_or("50ms"),
                    );
                }
            } else {
                report.skipped("lag", Place::Key("lag".into()));
            }
            // The metrics are process-wide: the main engine's totals before other engines start.
            let main_totals = client::Scrape::get(ctx.metrics).await;
            if opts.runs("flow") {
                for (i, &(w, c)) in opts.flow.iter().enumerate() {
                    eprintln!(
                        "phase: flow, {w} webhook(s) x {c} connections, fresh default engine"
                    );
                    flow::report(&mut report, &flow::run(&ctx, i, w, c).await, &opts);
                }
            } else {
                report.skipped("flow", Place::Key("flow".into()));
            }
            if opts.runs("isolation") {
                let case = |c: &str| opts.cases.iter().any(|x| x == c);
                if case("a") {
                    eprintln!("phase: isolation a, slow account beside a fast one");
                    isolation::case_a(&ctx)
                        .await
                        .report(&mut report, opts.slow_ms);
                }
                if case("b") {
                    eprintln!("phase: isolation b, slow webhook beside fast ones");
                    isolation::case_b(&ctx)
                        .await
                        .report(&mut report, opts.slow_ms);
                }
                if case("c") {
                    eprintln!("phase: isolation c, an endpoint fails and recovers");
                    isolation::case_c(&ctx).await.report(&mut report);
                }
            } else {
                report.skipped("isolation", Place::Key("isolation".into()));
            }
            if r("retention", "retention under fan-out to 10 webhooks") {
                retention::run(&ctx).await.report(&mut report);
            } else {
                report.skipped("retention", Place::Key("retention".into()));
            }
            if opts.runs("cluster") {
                for &(w, c) in &opts.cluster {
                    eprintln!(
                    "phase: cluster, {} nodes {}, {w} webhook(s) x {c} connections, SIGKILL of {}",
                    opts.nodes,
                    if opts.divide { "dividing the work" } else { "(one serving, standbys)" },
                    if opts.divide { "one" } else { "the serving node" }
                );
                    cluster::run(&ctx, opts.nodes, w, c)
                        .await
                        .report(&mut report);
                }
            }
            (events_only, main_totals)
        });

    let peak_rss = status_bytes("VmHWM:");
    let rss = status_bytes("VmRSS:");
    let ingested_total = main_totals.sum("kyberhook_events_ingested_total", None);
    let attempts_total = main_totals.sum("kyberhook_delivery_attempts_total", None);
    bench_rt.block_on(recv.refresh());
    let odd = recv.odd();
    let (stopped, data) = bench_rt.block_on(engine.shutdown());
    let data_bytes = du(data.path());
    let load_end = loadavg();

    let (ev_only_metric, ev_only_bytes, ev_only_acked, rss_ingest) = events_only;
    let per_m = |bytes: u64, events: f64| {
        if events > 0.0 {
            (bytes as f64 / events * 1e6) as u64
        } else {
            0
        }
    };
    let mut checks = Vec::new();
    if (ev_only_metric - ev_only_acked as f64).abs() > 0.5 {
        checks.push(format!(
            "kyberhook_events_ingested_total {ev_only_metric} != 202s counted {ev_only_acked}"
        ));
    }
    if odd > 0 {
        checks.push(format!(
            "{odd} receiver requests without phase path or delivery id"
        ));
    }
    if !stopped {
        checks.push("engine shutdown took over 60 s".into());
    }
    report
        .section("process and disk", Place::Root)
        .row(
            "peak RSS (VmHWM)",
            Cell::fig("peak_rss_bytes", Val::Mib(peak_rss, 0)),
            Cell::text(
                "bench process: engine + load generator (VmRSS after the no-webhook phases ",
            )
            .f("rss_after_ingest_bytes", Val::Mib(rss_ingest, 0))
            .t(", at end ")
            .f("rss_end_bytes", Val::Mib(rss, 0))
            .t(")"),
        )
        .row(
            "data dir per 1M events (ingest only)",
            Cell::fig(
                "data_dir_bytes_per_million_events_ingest_only",
                Val::Mib(per_m(ev_only_bytes, ev_only_metric), 0),
            ),
            Cell::fig("data_dir_bytes_ingest_only", Val::Mib(ev_only_bytes, 1))
                .t(" for ")
                .f("events_ingest_only", Val::Num(ev_only_metric))
                .t(" events after the no-webhook phases"),
        )
        .row(
            "data dir per 1M events (everything)",
            Cell::fig(
                "data_dir_bytes_per_million_events_final",
                Val::Mib(per_m(data_bytes, ingested_total), 0),
            ),
            Cell::fig("data_dir_bytes_final", Val::Mib(data_bytes, 1))
                .t(" after shutdown for ")
                .f("events_ingested_total", Val::Num(ingested_total))
                .t(" events, ")
                .f("delivery_attempts_total", Val::Num(attempts_total))
                .t(" attempts (the main engine's phases)"),
        )
        .row(
            "machine load average (1/5/15 min)",
            Cell::fig("loadavg_start", Val::Text(load_start))
                .t(" -> ")
                .f("loadavg_end", Val::Text(load_end)),
            Cell::text("at start -> at end; the bench itself keeps ~2 busy"),
        )
        .row(
            "consistency checks",
            Cell::fig("checks_ok", Val::Flag(checks.is_empty(), "ok", "FAIL")),
            Cell::fig("checks", Val::Text(checks.join("; "))),
        );

    print!("{}", report.table());
    if opts.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.json()).expect("JSON of plain values")
        );
    }
    recv.stop();
    poller.abort();
    drop(ctx);
    engine_rt.shutdown_timeout(Duration::from_secs(5));
    bench_rt.shutdown_timeout(Duration::from_secs(5));
}
