//! Plan rate limits, tenant isolation under load, slow endpoints, and ingest backpressure.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::json;

/// The largest number of requests inside any window of `width` (sliding over arrival times).
pub(crate) fn max_in_window(times: &[Instant], width: Duration) -> usize {
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= width {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

#[tokio::test]
async fn plans_pace_each_account_and_a_plan_change_applies_at_once() {
    let pki = pki();
    let slow_acc = Receiver::start(pki.server.clone()).await;
    let fast_acc = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(
        &pki,
        "",
        "[plans.starter]\nmax_webhooks = 3\nevents_per_second = 5\n[plans.professional]\nmax_webhooks = 10\nevents_per_second = 50\n",
    )
    .await;
    let (starter, _) = e.account("acc_starter", "starter").await;
    let (ent, _) = e.account("acc_ent", "enterprise").await;
    e.webhook(&starter, &slow_acc.url, &["visitor.*"]).await;
    e.webhook(&starter, &slow_acc.url, &["*"]).await;
    e.webhook(&ent, &fast_acc.url, &["*"]).await;

    let events: Vec<_> = (0..20)
        .map(|i| json!({"account_id": starter, "event": "visitor.checked_in", "data": {"i": i}}))
        .collect();
    let started = Instant::now();
    let (s, _) = e
        .api
        .admin(
            Method::POST,
            "/v1/events/batch",
            Some(json!({"events": events})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let ent_events: Vec<_> = (0..10)
        .map(|i| json!({"account_id": ent, "event": "user.login", "data": {"i": i}}))
        .collect();
    let (s, _) = e
        .api
        .admin(
            Method::POST,
            "/v1/events/batch",
            Some(json!({"events": ent_events})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);

    // The enterprise account is not held up by the starter account's backlog.
    let ent_got = fast_acc.wait_for(10, Duration::from_secs(3)).await;
    assert!(ent_got.last().unwrap().at - started < Duration::from_secs(3));

    let got = slow_acc.wait_for(40, Duration::from_secs(20)).await;
    let times: Vec<Instant> = got.iter().map(|g| g.at).collect();
    let span = *times.last().unwrap() - times[0];
    assert!(
        span >= Duration::from_secs(7),
        "40 deliveries at 5/s took only {span:?}"
    );
    let peak = max_in_window(&times, Duration::from_secs(1));
    assert!(peak <= 10, "{peak} deliveries in one second at 5/s");
    slow_acc.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(slow_acc.count(), 40, "none dropped, none doubled");

    // Upgrade: the next burst goes at 50/s.
    let (s, v) = e
        .api
        .admin(
            Method::PATCH,
            &format!("/v1/accounts/{starter}"),
            Some(json!({"plan": "professional"})),
        )
        .await;
    assert_eq!(
        (s, v["plan"].as_str()),
        (StatusCode::OK, Some("professional"))
    );
    let events: Vec<_> = (0..20)
        .map(|i| json!({"account_id": starter, "event": "visitor.checked_in", "data": {"j": i}}))
        .collect();
    let t = Instant::now();
    e.api
        .admin(
            Method::POST,
            "/v1/events/batch",
            Some(json!({"events": events})),
        )
        .await;
    let got = slow_acc.wait_for(80, Duration::from_secs(5)).await;
    let burst = got.last().unwrap().at - t;
    assert!(
        burst < Duration::from_secs(3),
        "40 deliveries at 50/s took {burst:?}"
    );
    e.stop().await;
}

#[tokio::test]
async fn a_slow_endpoint_does_not_slow_a_fast_one() {
    let pki = pki();
    let slow = Receiver::start(pki.server.clone()).await;
    slow.set_default(Reply::Slow(Duration::from_secs(5), 200));
    let fast = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(&pki, "timeout = \"1s\"\nmax_in_flight = 8\nmax_in_flight_per_webhook = 4\nretry_schedule = [\"1h\"]", "").await;
    let (acc, _) = e.account("acc_mixed", "enterprise").await;
    e.webhook(&acc, &slow.url, &["*"]).await;
    e.webhook(&acc, &fast.url, &["*"]).await;
    let t = Instant::now();
    let events: Vec<_> = (0..40)
        .map(|i| json!({"account_id": acc, "event": "user.login", "data": {"i": i}}))
        .collect();
    e.api
        .admin(
            Method::POST,
            "/v1/events/batch",
            Some(json!({"events": events})),
        )
        .await;
    // The slow endpoint alone would hold every slot for 40 / 4 × 1 s = 10 s.
    let got = fast.wait_for(40, Duration::from_secs(5)).await;
    assert!(
        got.last().unwrap().at - t < Duration::from_secs(4),
        "fast endpoint slowed: {:?}",
        got.last().unwrap().at - t
    );
    // At most 4 at a time, each held for the 1 s timeout.
    let window = (Instant::now() - t).as_secs() as usize + 1;
    assert!(
        slow.count() <= 4 * window,
        "the slow endpoint got {} attempts in {window} s with 4 slots",
        slow.count()
    );
    e.stop().await;
}

#[tokio::test]
async fn overload_answers_503_with_retry_after_and_every_acknowledged_event_is_delivered() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    rx.set_default(Reply::Slow(Duration::from_millis(100), 200));
    let e = TestEngine::start(
        &pki,
        // The lag push-back off: it would hold ingest to the endpoint's pace (20 ms of lag),
        // so whether the quota is ever reached would depend on timing; this test is the quota's.
        "max_scheduled = 30\nmax_in_flight_per_webhook = 2\nmax_lag = \"0s\"",
        "",
    )
    .await;
    let (acc, _) = e.account("acc_overload", "enterprise").await;
    e.webhook(&acc, &rx.url, &["*"]).await;
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..200 {
        let (s, h, v) = e
            .api
            .raw(
                Method::POST,
                "/v1/events",
                Some(ADMIN),
                Some(
                    serde_json::to_vec(
                        &json!({"account_id": acc, "event": "user.login", "data": {"i": i}}),
                    )
                    .unwrap(),
                ),
            )
            .await;
        match s {
            StatusCode::ACCEPTED => acked.push(v["id"].as_str().unwrap().to_string()),
            StatusCode::SERVICE_UNAVAILABLE => {
                refused += 1;
                assert_eq!(v["error"]["code"], "overloaded");
                assert_eq!(h.get("retry-after").unwrap(), "1");
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(refused > 0, "never pushed back");
    assert!(acked.len() >= 30, "accepted only {}", acked.len());
    let got = rx.wait_for(acked.len(), Duration::from_secs(20)).await;
    let ids: std::collections::HashSet<String> = got
        .iter()
        .map(|g| g.json()["id"].as_str().unwrap().to_string())
        .collect();
    for id in &acked {
        assert!(ids.contains(id), "acknowledged {id} was not delivered");
    }
    // Once the backlog drained, ingest is accepted again.
    e.event(&acc, "user.login", json!({"after": true})).await;
    e.stop().await;
}
