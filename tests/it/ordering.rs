//! Ordered delivery (`ordering: "fifo"`), black-box: the real engine (and, across a SIGKILL,
//! the real binary) delivering to a real HTTPS receiver that records the order of arrival and
//! how many requests it was serving at once, and fails chosen events.

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// How the receiver answers the `attempt`-th request (1-based) for event `n`.
pub(crate) type Rule = dyn Fn(u64, u32) -> u16 + Send + Sync;

/// One request the receiver got: the event's `data.n` and the status it answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hit {
    pub(crate) n: u64,
    pub(crate) status: u16,
}

#[derive(Default)]
struct Seen {
    hits: Mutex<Vec<Hit>>,
    attempts: Mutex<HashMap<u64, u32>>,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
    /// While set, every request is answered 503 (an endpoint that is down).
    down: AtomicBool,
}

/// A real HTTPS endpoint on 127.0.0.1 that keeps every request open for `hold` (so that
/// overlapping attempts would be seen) and answers by `rule`.
pub(crate) struct OrderReceiver {
    pub(crate) url: String,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OrderReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OrderReceiver {
    pub(crate) async fn start(pki: &Pki, hold: Duration, rule: Box<Rule>) -> OrderReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
        let seen = Arc::new(Seen::default());
        let rule: Arc<Rule> = Arc::from(rule);
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, seen, rule) = (acceptor.clone(), s.clone(), rule.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (seen, rule) = (seen.clone(), rule.clone());
                        async move {
                            let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            seen.most_in_flight.fetch_max(now, Ordering::SeqCst);
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let event: Value = serde_json::from_slice(&body).unwrap();
                            let n = event["data"]["n"].as_u64().unwrap();
                            let attempt = {
                                let mut a = seen.attempts.lock().unwrap();
                                let a = a.entry(n).or_insert(0);
                                *a += 1;
                                *a
                            };
                            let status = if seen.down.load(Ordering::SeqCst) {
                                503
                            } else {
                                rule(n, attempt)
                            };
                            tokio::time::sleep(hold).await;
                            seen.hits.lock().unwrap().push(Hit { n, status });
                            seen.in_flight.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(b"ok")))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        OrderReceiver {
            url: format!("https://127.0.0.1:{}/hook", addr.port()),
            seen,
            task,
        }
    }

    pub(crate) fn hits(&self) -> Vec<Hit> {
        self.seen.hits.lock().unwrap().clone()
    }

    /// The events answered 2xx, in the order they were.
    /// Waits until events 1..=`n` have each arrived once, then checks that their first
    /// arrivals came in that order (a redelivery of an attempt in flight may come again later).
    pub(crate) async fn wait_first_arrivals_in_order(&self, n: u64, wait: Duration) {
        let first_arrivals = || {
            let mut seen = std::collections::HashSet::new();
            self.delivered()
                .into_iter()
                .filter(|k| seen.insert(*k))
                .collect::<Vec<u64>>()
        };
        let deadline = Instant::now() + wait;
        while (first_arrivals().len() as u64) < n {
            assert!(
                Instant::now() < deadline,
                "delivered {:?}; requests {:?}",
                first_arrivals(),
                self.hits()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            first_arrivals(),
            (1..=n).collect::<Vec<u64>>(),
            "requests {:?}",
            self.hits()
        );
    }

    pub(crate) fn delivered(&self) -> Vec<u64> {
        self.hits()
            .iter()
            .filter(|h| (200..300).contains(&h.status))
            .map(|h| h.n)
            .collect()
    }

    async fn wait_delivered(&self, n: usize, wait: Duration) {
        let deadline = Instant::now() + wait;
        while self.delivered().len() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} events delivered within {wait:?}; requests: {:?}",
                self.delivered().len(),
                self.hits()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn most_in_flight(&self) -> usize {
        self.seen.most_in_flight.load(Ordering::SeqCst)
    }
}

/// The first event (by `n`) that some later event was answered 2xx ahead of, if any.
fn overtaken(delivered: &[u64]) -> Option<(u64, u64)> {
    delivered
        .windows(2)
        .find(|w| w[1] < w[0])
        .map(|w| (w[1], w[0]))
}

pub(crate) fn event(account: &str, n: u64) -> Value {
    json!({"account_id": account, "event": "visitor.checked_in", "data": {"n": n}})
}

pub(crate) async fn create_hook(api: &Api, account: &str, url: &str, ordering: &str) -> Value {
    let (s, v) = api
        .admin(
            Method::POST,
            &format!("/v1/accounts/{account}/webhooks"),
            Some(json!({"name": "ordered", "url": url, "events": ["*"], "ordering": ordering})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v
}

const EVENTS: u64 = 24;

/// 24 events to a webhook with `ordering`: the first 12 in one batch (created together, all
/// due at once), the rest one by one while event 3 — whose first two attempts are answered
/// 500 — is still being retried. Returns the receiver once every event was delivered.
async fn deliver_with_a_failing_third(ordering: &str) -> OrderReceiver {
    let pki = pki();
    let rx = OrderReceiver::start(
        &pki,
        Duration::from_millis(10),
        Box::new(|n, attempt| if n == 3 && attempt <= 2 { 500 } else { 200 }),
    )
    .await;
    let engine = TestEngine::start(
        &pki,
        "retry_schedule = [\"50ms\", \"100ms\"]\nmax_in_flight_per_webhook = 8",
        "",
    )
    .await;
    let (account, _) = engine.account("acc_order", "enterprise").await;
    let hook = create_hook(&engine.api, &account, &rx.url, ordering).await;
    assert_eq!(hook["ordering"], ordering);
    let batch: Vec<Value> = (1..=12).map(|n| event(&account, n)).collect();
    let (s, v) = engine
        .api
        .admin(
            Method::POST,
            "/v1/events/batch",
            Some(json!({ "events": batch })),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    for n in 13..=EVENTS {
        let (s, v) = engine
            .api
            .admin(Method::POST, "/v1/events", Some(event(&account, n)))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    }
    rx.wait_delivered(EVENTS as usize, Duration::from_secs(30))
        .await;
    // Nothing more comes: each event was delivered once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    engine.stop().await;
    rx
}

#[tokio::test]
async fn a_fifo_webhook_gets_every_event_once_in_order_through_failures_and_retries() {
    let rx = deliver_with_a_failing_third("fifo").await;
    assert_eq!(rx.delivered(), (1..=EVENTS).collect::<Vec<_>>());
    // Every request — failed ones included — came in event order: nothing behind event 3 was
    // even tried while it was being retried.
    let tried: Vec<u64> = rx.hits().iter().map(|h| h.n).collect();
    assert!(
        tried.windows(2).all(|w| w[0] <= w[1]),
        "requests out of order: {tried:?}"
    );
    assert_eq!(
        rx.hits().iter().filter(|h| h.n == 3).count(),
        3,
        "event 3: two failures, then delivered"
    );
    assert_eq!(rx.most_in_flight(), 1, "one attempt at a time");
}

/// The same run without ordering: later events overtake the retried one — what the fifo test
/// would see if the gate let them through.
#[tokio::test]
async fn without_ordering_later_events_overtake_a_retried_one() {
    let rx = deliver_with_a_failing_third("none").await;
    let mut delivered = rx.delivered();
    assert!(
        overtaken(&delivered).is_some(),
        "no overtake seen; the fifo test would prove nothing: {delivered:?}"
    );
    delivered.sort_unstable();
    assert_eq!(delivered, (1..=EVENTS).collect::<Vec<_>>());
}

#[tokio::test]
async fn switching_a_fifo_webhook_to_none_releases_the_deliveries_held_behind_its_head() {
    let pki = pki();
    // Event 1 fails for a long while; the others would succeed.
    let rx = OrderReceiver::start(
        &pki,
        Duration::from_millis(1),
        Box::new(|n, _| if n == 1 { 500 } else { 200 }),
    )
    .await;
    let engine = TestEngine::start(&pki, "retry_schedule = [\"300ms\", \"20s\"]", "").await;
    let (account, _) = engine.account("acc_switch", "enterprise").await;
    let hook = create_hook(&engine.api, &account, &rx.url, "fifo").await;
    for n in 1..=5 {
        let (s, v) = engine
            .api
            .admin(Method::POST, "/v1/events", Some(event(&account, n)))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    }
    // Event 1 fails twice (first attempt, then its retry after 300 ms); 2..5 wait behind it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx.hits().len() < 2 {
        assert!(Instant::now() < deadline, "{:?}", rx.hits());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rx.hits().iter().all(|h| h.n == 1), "{:?}", rx.hits());
    assert!(rx.delivered().is_empty());
    // The operator sees the four held behind event 1 (once fan-out, which follows the 202s,
    // has made them and they came due).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = engine.api.text(&engine.metrics_url()).await;
        if metrics
            .lines()
            .any(|l| l == "kyberhook_fifo_deliveries_waiting 4")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(rx.delivered().is_empty());

    let (s, v) = engine
        .api
        .admin(
            Method::PATCH,
            &format!(
                "/v1/accounts/{account}/webhooks/{}",
                hook["id"].as_str().unwrap()
            ),
            Some(json!({"ordering": "none"})),
        )
        .await;
    assert_eq!((s, &v["ordering"]), (StatusCode::OK, &json!("none")), "{v}");
    // 2..5 go now, long before event 1's next attempt (20 s away).
    rx.wait_delivered(4, Duration::from_secs(5)).await;
    let mut delivered = rx.delivered();
    delivered.sort_unstable();
    assert_eq!(delivered, vec![2, 3, 4, 5]);
    engine.stop().await;
}

async fn post(api: &Api, account: &str, kind: &str, n: u64) {
    let (s, v) = api
        .admin(
            Method::POST,
            "/v1/events",
            Some(json!({"account_id": account, "event": kind, "data": {"n": n}})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
}

/// Waits until the receiver has seen `n` requests.
async fn wait_hits(rx: &OrderReceiver, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx.hits().len() < n {
        assert!(Instant::now() < deadline, "{:?}", rx.hits());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_priority_event_does_not_jump_the_queue_of_a_fifo_webhook() {
    let pki = pki();
    // Event 1's first two attempts fail; it is delivered on its third.
    let rx = OrderReceiver::start(
        &pki,
        Duration::from_millis(1),
        Box::new(|n, attempt| if n == 1 && attempt <= 2 { 500 } else { 200 }),
    )
    .await;
    let engine = TestEngine::start(&pki, "retry_schedule = [\"200ms\", \"200ms\"]", "").await;
    let (account, _) = engine.account("acc_prio", "starter").await;
    create_hook(&engine.api, &account, &rx.url, "fifo").await;
    post(&engine.api, &account, "visitor.checked_in", 1).await;
    post(&engine.api, &account, "visitor.checked_in", 2).await;
    wait_hits(&rx, 1).await;
    // A safety event (delivery.priority_events) while event 1 is being retried.
    post(&engine.api, &account, "emergency.lockdown_activated", 3).await;
    rx.wait_delivered(3, Duration::from_secs(10)).await;
    assert_eq!(rx.delivered(), vec![1, 2, 3], "order wins: {:?}", rx.hits());
    engine.stop().await;
}

#[tokio::test]
async fn pausing_a_fifo_webhook_ends_the_deliveries_waiting_behind_its_head() {
    let pki = pki();
    let rx = OrderReceiver::start(&pki, Duration::from_millis(1), Box::new(|_, _| 500)).await;
    let engine = TestEngine::start(&pki, "retry_schedule = [\"20s\"]", "").await;
    let (account, _) = engine.account("acc_pause", "enterprise").await;
    let hook = create_hook(&engine.api, &account, &rx.url, "fifo").await;
    let hook_id = hook["id"].as_str().unwrap();
    for n in 1..=4 {
        post(&engine.api, &account, "visitor.checked_in", n).await;
    }
    // Event 1 failed and waits 20 s for its retry; 2..4 (all fanned out: fan-out follows the
    // 202) wait behind it.
    wait_hits(&rx, 1).await;
    let list = format!("/v1/accounts/{account}/webhooks/{hook_id}/deliveries");
    engine
        .poll(&list, Duration::from_secs(5), |v| {
            let all = v["data"].as_array().unwrap();
            all.len() == 4 && all.iter().any(|d| d["status"] == "retrying")
        })
        .await;
    let (s, _) = engine
        .api
        .admin(
            Method::PATCH,
            &format!("/v1/accounts/{account}/webhooks/{hook_id}"),
            Some(json!({"status": "paused"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // The three waiting ones end `failed` with the usual note, long before 1's retry is due;
    // 1 keeps its retry (it ends when that comes due, as for any webhook).
    let v = engine
        .poll(&list, Duration::from_secs(5), |v| {
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["status"] == "failed")
                .count()
                == 3
        })
        .await;
    for d in v["data"].as_array().unwrap() {
        if d["status"] == "failed" {
            let (_, detail) = engine
                .api
                .admin(
                    Method::GET,
                    &format!(
                        "/v1/accounts/{account}/deliveries/{}",
                        d["id"].as_str().unwrap()
                    ),
                    None,
                )
                .await;
            assert!(
                detail["note"].as_str().unwrap_or("").contains("paused"),
                "{detail}"
            );
        } else {
            assert_eq!(d["status"], "retrying", "{d}");
        }
    }
    assert_eq!(rx.hits().len(), 1, "nothing else reached the endpoint");
    engine.stop().await;
}

#[tokio::test]
async fn a_webhook_switched_to_fifo_holds_new_events_behind_its_retrying_delivery() {
    let pki = pki();
    let rx = OrderReceiver::start(
        &pki,
        Duration::from_millis(1),
        Box::new(|n, attempt| if n == 1 && attempt == 1 { 500 } else { 200 }),
    )
    .await;
    let engine = TestEngine::start(&pki, "retry_schedule = [\"1500ms\"]", "").await;
    let (account, _) = engine.account("acc_switch_on", "enterprise").await;
    let hook = create_hook(&engine.api, &account, &rx.url, "none").await;
    post(&engine.api, &account, "visitor.checked_in", 1).await;
    wait_hits(&rx, 1).await;
    // Event 1 failed and is retried in 1.5 s. Now the webhook becomes fifo: the engine reads
    // its open deliveries (event 1) and holds everything after it.
    let (s, v) = engine
        .api
        .admin(
            Method::PATCH,
            &format!(
                "/v1/accounts/{account}/webhooks/{}",
                hook["id"].as_str().unwrap()
            ),
            Some(json!({"ordering": "fifo"})),
        )
        .await;
    assert_eq!((s, &v["ordering"]), (StatusCode::OK, &json!("fifo")), "{v}");
    post(&engine.api, &account, "visitor.checked_in", 2).await;
    post(&engine.api, &account, "visitor.checked_in", 3).await;
    rx.wait_delivered(3, Duration::from_secs(10)).await;
    assert_eq!(rx.delivered(), vec![1, 2, 3], "{:?}", rx.hits());
    engine.stop().await;
}

#[tokio::test]
async fn ordering_is_set_on_create_and_patch_shown_everywhere_and_checked() {
    let pki = pki();
    let engine = TestEngine::start(&pki, "", "").await;
    let (account, _) = engine.account("acc_ordering_api", "enterprise").await;
    let base = format!("/v1/accounts/{account}/webhooks");
    let url = "https://127.0.0.1:9/hook";

    // Without the field: "none", in the create answer and when read back.
    let plain = engine.webhook(&account, url, &["*"]).await;
    assert_eq!(plain["ordering"], "none");
    let fifo = create_hook(&engine.api, &account, url, "fifo").await;
    assert_eq!(fifo["ordering"], "fifo");
    let fifo_path = format!("{base}/{}", fifo["id"].as_str().unwrap());
    let (s, v) = engine.api.admin(Method::GET, &fifo_path, None).await;
    assert_eq!((s, &v["ordering"]), (StatusCode::OK, &json!("fifo")));
    let (_, list) = engine.api.admin(Method::GET, &base, None).await;
    let mut listed: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["ordering"].as_str().unwrap())
        .collect();
    listed.sort_unstable();
    assert_eq!(listed, ["fifo", "none"]);

    // PATCH to none and back; other fields untouched.
    let (s, v) = engine
        .api
        .admin(Method::PATCH, &fifo_path, Some(json!({"ordering": "none"})))
        .await;
    assert_eq!((s, &v["ordering"]), (StatusCode::OK, &json!("none")), "{v}");
    assert_eq!(v["name"], "ordered");
    let (_, v) = engine.api.admin(Method::GET, &fifo_path, None).await;
    assert_eq!(v["ordering"], "none");
    let (s, v) = engine
        .api
        .admin(Method::PATCH, &fifo_path, Some(json!({"name": "renamed"})))
        .await;
    assert_eq!((s, &v["ordering"]), (StatusCode::OK, &json!("none")), "{v}");

    // Bad values: 400 invalid_ordering naming the allowed values, and nothing changes.
    for bad in ["FIFO", "sequential", ""] {
        let (s, v) = engine
            .api
            .admin(
                Method::POST,
                &base,
                Some(json!({"name": "x", "url": url, "events": ["*"], "ordering": bad})),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["code"], "invalid_ordering", "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("\"none\"") && message.contains("\"fifo\""),
            "{message}"
        );
        let (s, v) = engine
            .api
            .admin(Method::PATCH, &fifo_path, Some(json!({"ordering": bad})))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["code"], "invalid_ordering", "{v}");
    }
    let (s, v) = engine
        .api
        .admin(Method::PATCH, &fifo_path, Some(json!({"ordering": 1})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (_, list) = engine.api.admin(Method::GET, &base, None).await;
    assert_eq!(
        count(&list),
        2,
        "no webhook was created by a refused request"
    );

    // The field survives a restart (it is stored, not only in memory).
    let (s, _) = engine
        .api
        .admin(Method::PATCH, &fifo_path, Some(json!({"ordering": "fifo"})))
        .await;
    assert_eq!(s, StatusCode::OK);
    let mut engine = engine;
    engine.restart().await;
    let (_, v) = engine.api.admin(Method::GET, &fifo_path, None).await;
    assert_eq!(v["ordering"], "fifo");
    engine.stop().await;
}

// ---- across a SIGKILL of the real binary ----

#[tokio::test]
async fn a_fifo_backlog_held_by_a_failing_endpoint_survives_sigkill_and_arrives_in_order() {
    let pki = pki();
    let rx = OrderReceiver::start(&pki, Duration::from_millis(2), Box::new(|_, _| 200)).await;
    rx.seen.down.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    // Retries every 100 ms for long enough that event 1 is still being retried at the kill.
    let schedule = vec!["\"100ms\""; 40].join(", ");
    let toml = config_toml(
        &dir.path().join("data"),
        &pki.ca_file,
        &format!("retry_schedule = [{schedule}]"),
        "[log]\nformat = \"json\"\nlevel = \"info\"",
    );
    let config = dir.path().join("config.toml");
    std::fs::write(&config, toml).unwrap();

    let mut p = spawn(&config);
    let (s, v) = p
        .api
        .admin(
            Method::POST,
            "/v1/accounts",
            Some(json!({"name": "crash", "plan": "enterprise", "id": "acc_fifo_crash"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    create_hook(&p.api, "acc_fifo_crash", &rx.url, "fifo").await;
    const N: u64 = 30;
    for n in 1..=N {
        let (s, v) = p
            .api
            .admin(Method::POST, "/v1/events", Some(event("acc_fifo_crash", n)))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    }
    // The endpoint is down: event 1 is retried, and nothing behind it is tried.
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx.hits().len() < 4 {
        assert!(Instant::now() < deadline, "{:?}", rx.hits());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.child.kill().unwrap(); // SIGKILL
    p.child.wait().unwrap();
    let before = rx.hits();
    assert!(before.iter().all(|h| h.n == 1), "{before:?}");

    // The endpoint recovers; the restarted engine delivers the whole backlog, in order.
    rx.seen.down.store(false, Ordering::SeqCst);
    let _p = spawn(&config);
    rx.wait_delivered(N as usize, Duration::from_secs(60)).await;
    assert_eq!(rx.delivered(), (1..=N).collect::<Vec<_>>());
    let tried: Vec<u64> = rx.hits()[before.len()..].iter().map(|h| h.n).collect();
    assert!(
        tried.windows(2).all(|w| w[0] <= w[1]),
        "requests after the restart out of order: {tried:?}"
    );
    assert_eq!(rx.most_in_flight(), 1, "one attempt at a time");
}
