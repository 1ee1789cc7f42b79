//! Flow control: each webhook's adaptive concurrency limit, the customer's `max_concurrency`,
//! the backlog a webhook shows, and push-back that holds only the account whose deliveries
//! wait because of the engine.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common;
use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

/// A plan without a rate, so that the endpoints are what limits delivery.
const UNLIMITED: &str = "[plans.unlimited]\nevents_per_second = 0\n";

/// Posts `n` events to `account` in one batch (admin); returns the status.
async fn post_batch(api: &Api, account: &str, n: usize) -> StatusCode {
    let events: Vec<Value> = (0..n)
        .map(|i| json!({"account_id": account, "event": "visitor.checked_in", "data": {"i": i}}))
        .collect();
    let (s, _) = api
        .admin(
            Method::POST,
            "/v1/events/batch",
            Some(json!({"events": events})),
        )
        .await;
    s
}

/// The receiver's in-flight count, sampled every 10 ms for `span`: the highest seen.
async fn peak_in_flight(r: &Receiver, span: Duration) -> usize {
    let end = Instant::now() + span;
    let mut peak = 0;
    while Instant::now() < end {
        peak = peak.max(r.in_flight.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_starts_refusing_gets_half_the_requests_within_two_seconds_then_more_again(
) {
    let pki = pki();
    let r = Receiver::start(pki.server.clone()).await;
    r.set_default(Reply::Slow(Duration::from_millis(40), 200));
    // Retries come back quickly, so refused deliveries keep the endpoint loaded.
    let e = TestEngine::start(
        &pki,
        "retry_schedule = [\"100ms\", \"100ms\", \"100ms\", \"100ms\", \"100ms\"]\nmax_lag = \"0s\"\nauto_disable_after = 1000000",
        UNLIMITED,
    )
    .await;
    let (acc, _) = e.account("flow", "unlimited").await;
    let hook = e.webhook(&acc, &r.url, &["*"]).await;
    assert_eq!(hook["concurrency_limit"], 64, "{hook}");
    assert_eq!(hook["max_concurrency"], Value::Null);
    // Keep the endpoint busy: 2 000 events/s offered (64 slots × 25/s each carry 1 600/s)
    // for as long as the test runs (at most 30 s).
    let producer = {
        let api = Api::new(e.engine.as_ref().unwrap().api_addr());
        let acc = acc.clone();
        tokio::spawn(async move {
            for _ in 0..600 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                post_batch(&api, &acc, 100).await;
            }
        })
    };
    let healthy = peak_in_flight(&r, Duration::from_millis(1500)).await;
    assert!(
        healthy >= 60,
        "a healthy endpoint had only {healthy} requests at once"
    );
    // The endpoint starts answering 503.
    r.set_default(Reply::Slow(Duration::from_millis(40), 503));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refusing = peak_in_flight(&r, Duration::from_millis(500)).await;
    assert!(
        refusing * 2 <= healthy,
        "2 s after the endpoint started refusing it still had {refusing} requests at once (healthy: {healthy})"
    );
    let path = format!(
        "/v1/accounts/{acc}/webhooks/{}",
        hook["id"].as_str().unwrap()
    );
    let (_, v) = e.api.admin(Method::GET, &path, None).await;
    let limit = v["concurrency_limit"].as_u64().unwrap();
    assert!(limit * 2 <= 64, "limit {limit} while refusing: {v}");
    assert!(v["backlog"]["waiting"].as_u64().unwrap() > 0, "{v}");
    assert!(v["backlog"]["oldest_waiting_ms"].as_u64().is_some(), "{v}");
    // It recovers: the limit and the requests in flight come back up.
    r.set_default(Reply::Slow(Duration::from_millis(40), 200));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let again = peak_in_flight(&r, Duration::from_millis(300)).await;
        if again >= healthy * 3 / 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "in flight stayed at {again} after the endpoint recovered (healthy: {healthy})"
        );
    }
    producer.abort();
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_cap_bounds_the_requests_in_flight_and_is_shown() {
    let pki = pki();
    let r = Receiver::start(pki.server.clone()).await;
    r.set_default(Reply::Slow(Duration::from_millis(200), 200));
    let e = TestEngine::start(&pki, "", UNLIMITED).await;
    let (acc, _) = e.account("capped", "unlimited").await;
    let base = format!("/v1/accounts/{acc}/webhooks");
    // Bad caps are 400s naming the field.
    for bad in [json!(0), json!(-1), json!(1.5), json!("8"), json!(10_001)] {
        let (s, v) = e
            .api
            .admin(
                Method::POST,
                &base,
                Some(json!({"name": "h", "url": r.url, "events": ["*"], "max_concurrency": bad})),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
    let (s, hook) = e
        .api
        .admin(
            Method::POST,
            &base,
            Some(json!({"name": "h", "url": r.url, "events": ["*"], "max_concurrency": 3})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{hook}");
    assert_eq!(hook["max_concurrency"], 3);
    assert_eq!(hook["concurrency_limit"], 3);
    let id = hook["id"].as_str().unwrap();
    // 3 at a time, 200 ms each: 200 events keep it busy well past the cap's removal.
    assert_eq!(post_batch(&e.api, &acc, 100).await, StatusCode::ACCEPTED);
    assert_eq!(post_batch(&e.api, &acc, 100).await, StatusCode::ACCEPTED);
    r.wait_for(3, Duration::from_secs(10)).await;
    let peak = peak_in_flight(&r, Duration::from_millis(600)).await;
    assert!((1..=3).contains(&peak), "cap 3, {peak} at once");
    let (_, v) = e
        .api
        .admin(Method::GET, &format!("{base}/{id}"), None)
        .await;
    assert!(v["backlog"]["waiting"].as_u64().unwrap() > 0, "{v}");
    // Null lifts the cap; an absent field leaves it as it is.
    let (s, v) = e
        .api
        .admin(
            Method::PATCH,
            &format!("{base}/{id}"),
            Some(json!({"name": "renamed"})),
        )
        .await;
    assert_eq!(
        (s, v["max_concurrency"].clone()),
        (StatusCode::OK, json!(3))
    );
    let (s, v) = e
        .api
        .admin(
            Method::PATCH,
            &format!("{base}/{id}"),
            Some(json!({"max_concurrency": null})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["max_concurrency"], Value::Null);
    let peak = peak_in_flight(&r, Duration::from_millis(800)).await;
    assert!(peak > 3, "the cap was lifted but only {peak} ran at once");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_holds_only_its_own_accounts_ingest() {
    let pki = pki();
    let slow = Receiver::start(pki.server.clone()).await;
    slow.set_default(Reply::Slow(Duration::from_millis(300), 200));
    let fast = Receiver::start(pki.server.clone()).await;
    // A low engine ceiling makes account A's endpoint the engine's bottleneck at once.
    let e = TestEngine::start(
        &pki,
        "max_in_flight_per_webhook = 2\nmax_lag = \"50ms\"\nmax_lag_hold = \"300ms\"",
        UNLIMITED,
    )
    .await;
    let (a, _) = e.account("slowco", "unlimited").await;
    let (b, _) = e.account("fastco", "unlimited").await;
    e.webhook(&a, &slow.url, &["*"]).await;
    e.webhook(&b, &fast.url, &["*"]).await;
    assert_eq!(post_batch(&e.api, &a, 100).await, StatusCode::ACCEPTED);
    // A's deliveries wait behind its 2 slots: its lag climbs past max_lag …
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let page = e.api.text(&e.metrics_url()).await;
        let lag = metric_sample(&page, "kyberhook_delivery_lag_seconds{stage=\"slots\"}");
        if lag.is_some_and(|l| l > 0.1) {
            break;
        }
        assert!(Instant::now() < deadline, "no slot lag showed: {lag:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // … so A's next events are held, then refused with 503 deliveries_lagging …
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            "/v1/events",
            Some(json!({"account_id": a, "event": "visitor.checked_in", "data": {}})),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "deliveries_lagging", "{v}");
    // … while B is never held: each event is accepted at once and delivered promptly.
    for i in 0..20 {
        let started = Instant::now();
        e.event(&b, "visitor.checked_in", json!({"i": i})).await;
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "B's event {i} took {:?}",
            started.elapsed()
        );
    }
    let got = fast.wait_for(20, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 20);
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_webhook_does_not_delay_the_accounts_other_webhooks() {
    let pki = pki();
    let slow = Receiver::start(pki.server.clone()).await;
    slow.set_default(Reply::Slow(Duration::from_millis(300), 200));
    let fast = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(&pki, "max_in_flight_per_webhook = 2", UNLIMITED).await;
    let (a, _) = e.account("mixed", "unlimited").await;
    e.webhook(&a, &slow.url, &["*"]).await;
    e.webhook(&a, &fast.url, &["*"]).await;
    let started = Instant::now();
    assert_eq!(post_batch(&e.api, &a, 50).await, StatusCode::ACCEPTED);
    // The fast endpoint gets all 50 long before the slow one (2 at a time, 300 ms each) could.
    fast.wait_for(50, Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the fast webhook waited {:?}",
        started.elapsed()
    );
    assert!(slow.count() < 50, "the slow one should still be working");
    e.stop().await;
}
