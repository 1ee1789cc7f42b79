//! Crash-loop soak: how many deliveries one crash repeats, and that none is lost.
//!
//! ```text
//! cargo bench --bench soak                       # 75 s of kills (issue 20 item 4)
//! cargo bench --bench soak -- --secs 20          # shorter
//! ```
//!
//! The real binary (`kyberhook serve`, durable store, fixed loopback port) is killed with
//! SIGKILL every 4–9 s for `--secs` seconds and started again on the same data dir, while six
//! producers post ~170 events/s (producer-chosen ids, so a request cut off by a kill is simply
//! sent again) to three accounts with two webhooks each, one of them `fifo`. The receivers are
//! real HTTPS endpoints that answer 503 to one request in ten and take 200 ms over one in
//! twenty. Afterwards the engine runs until every acknowledged event has reached every webhook
//! with a 2xx; then it prints the kills, events acknowledged, successful deliveries, the
//! deliveries lost (must be 0) and the repeated ones (a delivery id answered 2xx more than
//! once: an outcome the kill took before it was durable), in total, per kill and as a share.

#[path = "../tests/it/common.rs"]
#[allow(dead_code)]
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Pki, Receiver, Reply};
use http::{Method, StatusCode};
use serde_json::json;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const ACCOUNTS: usize = 3;
const PRODUCERS: usize = 6;
/// Events per second per producer (six: ~170/s in all).
const PER_PRODUCER: u64 = 28;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator (xorshift), so that a run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What the i-th request to a receiver gets: 503 one in ten, 200 after 200 ms one in twenty.
fn reply(i: u64) -> Reply {
    match (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % 20 {
        0 | 1 => Reply::Status(503),
        2 => Reply::Slow(Duration::from_millis(200), 200),
        _ => Reply::Status(200),
    }
}

fn is_success(r: &Reply) -> bool {
    matches!(r, Reply::Status(200) | Reply::Slow(_, 200))
}

fn write_config(dir: &std::path::Path, pki: &Pki, port: u16) -> std::path::PathBuf {
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
[metrics]
listen = "127.0.0.1:0"
[storage]
path = "{data}"
[auth]
admin_token = "{admin}"
[delivery]
timeout = "2s"
retry_schedule = ["200ms", "500ms", "1s", "2s", "2s", "2s", "2s", "2s", "2s", "2s"]
auto_disable_after = 1000000
extra_ca_files = ["{ca}"]
private_network_allowlist = ["127.0.0.0/8"]
[plans.soak]
events_per_second = 0
[log]
format = "json"
level = "warn"
"#,
        data = dir.join("data").display(),
        admin = common::ADMIN,
        ca = pki.ca_file.display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn main() {
    let secs = arg("--secs", 75);
    // A request to a killed engine panics inside the test client's task; that is expected
    // here and only noise.
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.to_string().contains("the API answered") {
            default(info);
        }
    }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(secs));
}

async fn run(secs: u64) {
    let pki = common::pki();
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = write_config(dir.path(), &pki, port);
    let mut engine = common::spawn(&config);
    let api = engine.api.clone();

    // Three accounts, two webhooks each (the first account's second one fifo), one receiver
    // per webhook with its flaky script.
    let mut receivers = Vec::new();
    for a in 0..ACCOUNTS {
        let account = format!("acc_soak_{a}");
        let (s, v) = api
            .admin(
                Method::POST,
                "/v1/accounts",
                Some(json!({"name": account, "plan": "soak", "id": account})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        for w in 0..2 {
            let r = Receiver::start(pki.server.clone()).await;
            r.script((0..200_000).map(reply));
            let ordering = if a == 0 && w == 1 { "fifo" } else { "none" };
            let (s, v) = api
                .admin(
                    Method::POST,
                    &format!("/v1/accounts/{account}/webhooks"),
                    Some(json!({"name": "h", "url": r.url, "events": ["*"], "ordering": ordering})),
                )
                .await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
            receivers.push((a, r));
        }
    }

    // Producers: each event is posted until it gets a 202 (or the 200 of a repeat).
    let acked: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    let producing = Arc::new(AtomicBool::new(true));
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let (api, acked, producing) = (api.clone(), acked.clone(), producing.clone());
        producers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / PER_PRODUCER));
            let mut n = 0u64;
            while producing.load(Ordering::Relaxed) {
                tick.tick().await;
                let a = ((p as u64 + n) % ACCOUNTS as u64) as usize;
                let id = format!("evt_soak_{p}_{n}");
                n += 1;
                let body = json!({"account_id": format!("acc_soak_{a}"), "event": "visitor.checked_in", "id": id, "data": {"p": p}});
                let give_up = Instant::now() + Duration::from_secs(60);
                while Instant::now() < give_up {
                    // The test client panics when the engine is gone (killed): that is an
                    // unanswered request, sent again.
                    let post = tokio::spawn({
                        let (api, body) = (api.clone(), body.clone());
                        async move { api.admin(Method::POST, "/v1/events", Some(body)).await }
                    });
                    match tokio::time::timeout(Duration::from_secs(5), post).await {
                        Ok(Ok((s, _))) if s == StatusCode::ACCEPTED || s == StatusCode::OK => {
                            acked.lock().unwrap().push((a, id.clone()));
                            break;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
        }));
    }

    // The kills.
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let started = Instant::now();
    let mut kills = 0;
    loop {
        let wait = Duration::from_millis(4_000 + rng.next() % 5_001);
        if started.elapsed() + wait > Duration::from_secs(secs) {
            break;
        }
        tokio::time::sleep(wait).await;
        drop(engine); // SIGKILL and reap
        kills += 1;
        engine = common::spawn(&config);
    }
    producing.store(false, Ordering::Relaxed);
    for p in producers {
        let _ = p.await;
    }
    let acked = acked.lock().unwrap().clone();

    // Every acknowledged event must reach both of its account's webhooks with a 2xx.
    let want: HashMap<usize, HashSet<String>> =
        acked.iter().fold(HashMap::new(), |mut m, (a, id)| {
            m.entry(*a).or_default().insert(id.clone());
            m
        });
    let deadline = Instant::now() + Duration::from_secs(180);
    let (delivered, repeated, lost) = loop {
        let mut delivered = 0usize;
        let mut repeated = 0usize;
        let mut lost = 0usize;
        for (a, r) in &receivers {
            let log = r.log.lock().unwrap().clone();
            let mut by_delivery: HashMap<String, usize> = HashMap::new();
            let mut events: HashSet<String> = HashSet::new();
            for (i, got) in log.iter().enumerate() {
                if !is_success(&reply(i as u64)) {
                    continue;
                }
                *by_delivery
                    .entry(got.header("x-kyberaccess-delivery"))
                    .or_default() += 1;
                if let Some(id) = serde_json::from_slice::<serde_json::Value>(&got.body)
                    .ok()
                    .and_then(|v| v["id"].as_str().map(str::to_string))
                {
                    events.insert(id);
                }
            }
            delivered += by_delivery.values().sum::<usize>();
            repeated += by_delivery.values().map(|n| n - 1).sum::<usize>();
            lost += want.get(a).map_or(0, |w| w.difference(&events).count());
        }
        if lost == 0 || Instant::now() > deadline {
            break (delivered, repeated, lost);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    drop(engine);
    let share = 100.0 * repeated as f64 / delivered.max(1) as f64;
    println!(
        "soak: {secs} s, {kills} SIGKILLs; {} events acknowledged, {delivered} successful deliveries; lost {lost}; repeated {repeated} ({share:.2} % of successful deliveries, {:.1} per kill)",
        acked.len(),
        repeated as f64 / kills.max(1) as f64,
    );
    assert_eq!(lost, 0, "acknowledged events were lost");
}
