//! Start-up recovery with a large stored schedule: how long until the engine is ready, and
//! how much memory each scheduled delivery costs once it is back in the timing wheel.
//!
//! `cargo bench --bench recovery` (1 M scheduled deliveries; `-- --n 100000` for fewer).
//! Prints the fill time, restart-to-ready time, the process RSS growth across start-up, and
//! the wheel alone: RSS growth of a `Wheel<Due>` holding N entries (bytes per entry).

use std::time::{Duration, Instant};

use kyberhook::ids::{AccountId, DeliveryId, EventId, WebhookId};
use kyberhook::model::{DeliveryRecord, EventRecord};
use kyberhook::scheduler::Due;
use kyberhook::store::embedded::SledStore;
use kyberhook::store::DeliveryWrites;
use kyberhook::wheel::Wheel;

/// The `kyberhook` binary's allocator, so the figures are the ones production gets.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn dir_size(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    let n = arg("--n", 1_000_000);
    let now = kyberhook::model::now_ms();
    let span = 14 * 86_400_000u64;

    // The wheel alone.
    let before = rss_bytes();
    let mut wheel: Wheel<Due> = Wheel::with_capacity(now, n);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..n as u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let id = DeliveryId {
            seq: i,
            webhook: WebhookId(7),
        };
        wheel.insert(
            now + x % span,
            Due {
                id,
                token: i,
                when: now + x % span,
            },
        );
    }
    let wheel_bytes = rss_bytes().saturating_sub(before);
    let per_entry = wheel_bytes as f64 / n as f64;
    drop(wheel);

    // A store holding n scheduled deliveries of one event each.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let fill = Instant::now();
    {
        let store = SledStore::open(&data, false).unwrap();
        let account = AccountId::parse("acc_bench").unwrap();
        let event = EventRecord {
            seq: 0,
            id: EventId::parse("evt_bench").unwrap(),
            account_id: account,
            event: "user.login".into(),
            body: b"{}".to_vec(),
        };
        let mut batch = Vec::with_capacity(10_000);
        for i in 0..n as u64 {
            let id = DeliveryId {
                seq: kyberhook::ids::seq_floor(now) + i,
                webhook: WebhookId(7),
            };
            let mut r = DeliveryRecord::new(id, &event, now, false);
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            r.next_attempt_ms = Some(now + 60_000 + x % span);
            batch.push(r);
            if batch.len() == 10_000 {
                store
                    .apply_delivery_writes(&DeliveryWrites::created(std::mem::take(&mut batch)))
                    .unwrap();
            }
        }
        store
            .apply_delivery_writes(&DeliveryWrites::created(batch))
            .unwrap();
        store.make_durable().unwrap();
    }
    let fill_secs = fill.elapsed().as_secs_f64();

    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = \"{}\"\n[log]\nlevel = \"warn\"\n",
        data.display()
    );
    let config = kyberhook::config::Config::from_toml(&toml, "bench").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let rss_before = rss_bytes();
    let started = Instant::now();
    let (ready_secs, scheduled, rss_after) = rt.block_on(async {
        let engine = kyberhook::Engine::start(config).await.unwrap();
        while !engine.is_ready() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let ready = started.elapsed().as_secs_f64();
        let scheduled = engine.scheduled();
        let rss = rss_bytes();
        engine.shutdown().await;
        (ready, scheduled, rss)
    });
    println!("scheduled deliveries          {n}");
    println!(
        "store fill                    {fill_secs:.1} s ({:.0} deliveries/s)",
        n as f64 / fill_secs
    );
    println!(
        "data dir                      {:.1} MiB",
        dir_size(&data) as f64 / (1 << 20) as f64
    );
    println!(
        "restart to ready              {ready_secs:.2} s   (scheduled after recovery: {scheduled})"
    );
    println!(
        "RSS growth over start-up      {:.1} MiB (includes sled's page cache)",
        rss_after.saturating_sub(rss_before) as f64 / (1 << 20) as f64
    );
    println!(
        "wheel alone                   {:.1} MiB = {per_entry:.1} bytes per scheduled delivery",
        wheel_bytes as f64 / (1 << 20) as f64
    );
    assert_eq!(
        scheduled, n,
        "every stored schedule entry is back in the wheel"
    );
}
