//! Fan-out size (issue 11 item 4): one enterprise account with thousands of webhooks.
//!
//! Starts a real engine (own data dir, fsync on) and a real local HTTPS receiver, then
//!
//! 1. creates `--webhooks` (default 5 000) webhooks one after another through the API and
//!    reports the total time and the time of the first and the last tenth (equal when the
//!    cost per webhook does not grow with the number of webhooks);
//! 2. posts one event all of them subscribe to and reports the time to its 202 and until the
//!    receiver has every delivery, and the process's peak resident memory during that phase
//!    above what it held before it (`VmHWM` after a `clear_refs` reset, Linux only).
//!
//! Run: `cargo bench --bench fanout` (optimised), or `cargo test --bench fanout` for a debug
//! build of the engine; `-- --webhooks N` sets the count.

#[path = "../tests/it/common.rs"]
#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use common::{Receiver, TestEngine};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A line of `/proc/self/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn main() {
    let n = arg("--webhooks", 5_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let pki = common::pki();
        let rx = Receiver::start(pki.server.clone()).await;
        let e = TestEngine::start(
            &pki,
            "max_in_flight = 64",
            "[plans.enterprise]\nevents_per_second = 0\n",
        )
        .await;
        let (acc, _) = e.account("acc_fanout", "enterprise").await;

        let tenth = (n / 10).max(1);
        let started = Instant::now();
        let mut marks = Vec::new();
        for i in 0..n {
            e.webhook(&acc, &rx.url, &["user.*"]).await;
            if (i + 1) % tenth == 0 {
                marks.push(started.elapsed());
            }
        }
        let total = started.elapsed();
        let first = marks.first().copied().unwrap_or_default();
        let last = match marks.len() {
            0 | 1 => first,
            k => marks[k - 1] - marks[k - 2],
        };
        println!(
            "create {n} webhooks: {total:.2?} ({:.0} µs each); first tenth {first:.2?}, last tenth {last:.2?}",
            total.as_micros() as f64 / n as f64
        );

        // Peak memory of the fan-out phase alone: reset the high-water mark first.
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let base = status_kib("VmRSS:");
        let t = Instant::now();
        e.event(&acc, "user.login", serde_json::json!({"to": "everyone"}))
            .await;
        let acked = t.elapsed();
        rx.wait_for(n, Duration::from_secs(3_600)).await;
        let delivered = t.elapsed();
        let peak = status_kib("VmHWM:");
        println!("one event to {n} webhooks: 202 after {acked:.2?}, all delivered after {delivered:.2?}");
        match (reset, base, peak) {
            (true, Some(base), Some(peak)) => println!(
                "peak RSS during fan-out and delivery: {:.1} MiB above the {:.1} MiB held before",
                peak.saturating_sub(base) as f64 / 1024.0,
                base as f64 / 1024.0
            ),
            _ => println!("peak RSS: not available on this system"),
        }
        e.stop().await;
    });
}
