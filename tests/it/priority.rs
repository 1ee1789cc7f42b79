//! Safety events never wait (issue 14 item 7): deliveries of `delivery.priority_events` go
//! ahead of the account's other queued deliveries — the account's next rate slot, the
//! webhook's next free in-flight slot.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn a_lockdown_alert_overtakes_a_backlog_of_500_visitor_events_on_a_10_eps_plan() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(&pki, "", "").await;
    let (acc, _) = e.account("acc_priority", "starter").await;
    e.webhook(&acc, &rx.url, &["*"]).await;
    let events: Vec<_> = (0..500)
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
    // The backlog is being worked off at the plan's 10 per second.
    rx.wait_for(8, Duration::from_secs(10)).await;

    let sent = Instant::now();
    e.event(
        &acc,
        "emergency.lockdown_activated",
        json!({"reason": "drill"}),
    )
    .await;
    let alert = loop {
        let got = rx.next(Duration::from_secs(10)).await;
        if got.header("x-kyberaccess-event") == "emergency.lockdown_activated" {
            break got;
        }
    };
    let took = alert.at.duration_since(sent);
    let visitors_before = rx
        .log
        .lock()
        .unwrap()
        .iter()
        .take_while(|r| r.header("x-kyberaccess-event") != "emergency.lockdown_activated")
        .count();
    println!("lockdown alert arrived {took:?} after its 202, after {visitors_before} of 500 visitor events");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(
        visitors_before < 100,
        "it should overtake the backlog: {visitors_before} visitor events went first"
    );
    // The rest of the backlog still follows at the plan's rate (none dropped).
    e.stop().await;
}
