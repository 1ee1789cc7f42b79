//! Push-back (issue 12 item 2): while deliveries lag more than `delivery.max_lag` behind
//! ingest, new events wait before they are committed, for at most `delivery.max_lag_hold`,
//! then get 503 `deliveries_lagging` with `Retry-After`; safety events never wait; once the
//! deliveries catch up, events are accepted at once again.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::json;

/// One in-flight slot for the whole engine, two webhooks and an endpoint that takes 400 ms:
/// the second webhook's deliveries wait for the engine (not for their own endpoint), so the
/// engine lags behind ingest.
const LAGGING: &str =
    "max_in_flight = 1\nmax_lag = \"200ms\"\nmax_lag_hold = \"1s\"\nretry_schedule = [\"1s\"]\n";

#[tokio::test]
async fn ingest_waits_while_deliveries_lag_then_is_refused_and_safety_events_never_wait() {
    if !own_process(
        "pushback::ingest_waits_while_deliveries_lag_then_is_refused_and_safety_events_never_wait",
    ) {
        return;
    }
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    rx.set_default(Reply::Slow(Duration::from_millis(400), 200));
    let e = TestEngine::start(&pki, LAGGING, "").await;
    let (acc, _) = e.account("acc_lag", "enterprise").await;
    e.webhook(&acc, &rx.url, &["*"]).await;
    e.webhook(&acc, &rx.url, &["*"]).await;

    // Accepted at once: nothing lags yet. 6 events = 12 deliveries = ~4.8 s through one slot.
    let events: Vec<_> = (0..6)
        .map(|n| json!({"account_id": acc, "event": "visitor.checked_in", "data": {"n": n}}))
        .collect();
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            "/v1/events/batch",
            Some(json!({ "events": events })),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    rx.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;

    // A visitor event now waits for the deliveries, up to the hold, then is refused.
    let visitor = json!({"account_id": acc, "event": "visitor.checked_in", "data": {"late": true}});
    let lockdown = json!({"account_id": acc, "event": "emergency.lockdown_activated", "data": {"drill": true}});
    let api = &e.api;
    let held = async {
        let t = Instant::now();
        let (s, h, v) = api
            .raw(
                Method::POST,
                "/v1/events",
                Some(ADMIN),
                Some(serde_json::to_vec(&visitor).unwrap()),
            )
            .await;
        (s, h, v, t.elapsed())
    };
    let urgent = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        let (s, v) = api.admin(Method::POST, "/v1/events", Some(lockdown)).await;
        (s, v, t.elapsed())
    };
    let ((s, headers, v, waited), (us, uv, urgent_took)) = tokio::join!(held, urgent);
    println!(
        "visitor event answered {s} after {waited:?}; lockdown alert {us} after {urgent_took:?}"
    );
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "deliveries_lagging", "{v}");
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    assert!(
        waited >= Duration::from_millis(900),
        "refused after {waited:?}: it should have been held for max_lag_hold first"
    );
    assert_eq!(us, StatusCode::ACCEPTED, "{uv}");
    assert!(
        urgent_took < Duration::from_millis(500),
        "the lockdown alert waited {urgent_took:?}"
    );

    // Once the backlog is delivered, events are accepted at once again.
    rx.wait_for(14, Duration::from_secs(20)).await;
    let t = Instant::now();
    e.event(&acc, "visitor.checked_in", json!({"after": true}))
        .await;
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "held {:?} with nothing lagging",
        t.elapsed()
    );
    let metrics = e.api.text(&e.metrics_url()).await;
    assert!(
        metrics.contains("kyberhook_ingest_lag_refusals_total 1"),
        "{metrics}"
    );
    e.stop().await;
}

#[tokio::test]
async fn with_max_lag_zero_ingest_is_never_held() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    rx.set_default(Reply::Slow(Duration::from_millis(400), 200));
    let e = TestEngine::start(&pki, &LAGGING.replace("200ms", "0s"), "").await;
    let (acc, _) = e.account("acc_nolag", "enterprise").await;
    e.webhook(&acc, &rx.url, &["*"]).await;
    e.webhook(&acc, &rx.url, &["*"]).await;
    for n in 0..6 {
        e.event(&acc, "visitor.checked_in", json!({"n": n})).await;
    }
    rx.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let t = Instant::now();
    e.event(&acc, "visitor.checked_in", json!({"late": true}))
        .await;
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "held {:?} with push-back off",
        t.elapsed()
    );
    e.stop().await;
}
