//! What a receiver's answer asks of us (issue 14 item 4): `Retry-After` on a 429 or 503 puts
//! the next attempt no earlier than asked (never before the schedule, never past a day), and a
//! `410 Gone` disables the webhook at once and ends its open deliveries `failed`.

use crate::common;

use std::time::{Duration, SystemTime};

use common::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn retry_after_in_seconds_or_as_a_date_delays_the_next_attempt_but_never_below_the_schedule()
{
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    // An HTTP date 6 s ahead (truncated to whole seconds); it is read ~2 s from now, after the
    // first Retry-After, so it asks for at least ~2.9 s more.
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(6));
    rx.script([
        Reply::RetryAfter(503, "2".into()),
        Reply::RetryAfter(429, date),
        // Asks for less than the schedule: the schedule stands.
        Reply::RetryAfter(503, "0".into()),
        // A 500's Retry-After is not a request to wait.
        Reply::RetryAfter(500, "30".into()),
        Reply::Status(200),
    ]);
    let e = TestEngine::start(
        &pki,
        "retry_schedule = [\"300ms\", \"300ms\", \"300ms\", \"300ms\"]",
        "",
    )
    .await;
    let (acc, _) = e.account("acc_retry_after", "enterprise").await;
    e.webhook(&acc, &rx.url, &["*"]).await;
    e.event(&acc, "user.login", json!({})).await;
    let got = rx.wait_for(5, WAIT).await;
    let gaps: Vec<Duration> = got.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(
        gaps[0] >= Duration::from_millis(1_950) && gaps[0] < Duration::from_millis(3_000),
        "Retry-After: 2 → {gaps:?}"
    );
    assert!(
        gaps[1] >= Duration::from_millis(2_000) && gaps[1] < Duration::from_millis(5_000),
        "Retry-After as a date → {gaps:?}"
    );
    for (i, gap) in gaps.iter().enumerate().skip(2) {
        assert!(
            *gap >= Duration::from_millis(280) && *gap < Duration::from_millis(1_200),
            "gap {i} should follow the schedule: {gaps:?}"
        );
    }
    let dlv = got[0].header("x-kyberaccess-delivery");
    let d = e
        .wait_delivery(&acc, &dlv, WAIT, |d| d["status"] == "delivered")
        .await;
    assert_eq!(d["attempt_count"], 5, "{d}");
    e.stop().await;
}

#[tokio::test]
async fn a_410_disables_the_webhook_at_once_and_ends_its_open_deliveries_failed() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    // A fails and waits 30 s for its retry; B's endpoint then says it is gone.
    rx.script([Reply::Status(500), Reply::Status(410)]);
    let e = TestEngine::start(&pki, "retry_schedule = [\"30s\", \"30s\"]", "").await;
    let (acc, _) = e.account("acc_gone", "enterprise").await;
    let hook = e.webhook(&acc, &rx.url, &["*"]).await;
    let wh = hook["id"].as_str().unwrap();
    e.event(&acc, "user.login", json!({"n": 1})).await;
    let a = rx.next(WAIT).await.header("x-kyberaccess-delivery");
    e.wait_delivery(&acc, &a, WAIT, |d| d["status"] == "retrying")
        .await;
    e.event(&acc, "user.login", json!({"n": 2})).await;
    let b = rx.next(WAIT).await.header("x-kyberaccess-delivery");

    let v = e
        .poll(&format!("/v1/accounts/{acc}/webhooks/{wh}"), WAIT, |v| {
            v["status"] == "disabled"
        })
        .await;
    let reason = v["disabled_reason"].as_str().unwrap();
    assert!(reason.contains("410 Gone") && reason.contains(&b), "{v}");
    let b = e
        .wait_delivery(&acc, &b, WAIT, |d| d["status"] == "failed")
        .await;
    assert!(b["note"].as_str().unwrap().contains("410 Gone"), "{b}");
    assert!(b["next_attempt_at"].is_null(), "{b}");
    assert_eq!(b["attempt_count"], 1);
    // A ends at once, not when its retry would have come due.
    let a = e
        .wait_delivery(&acc, &a, Duration::from_secs(3), |d| {
            d["status"] == "failed"
        })
        .await;
    assert!(a["note"].as_str().unwrap().contains("410 Gone"), "{a}");
    assert_eq!(a["attempt_count"], 1);
    // Nothing more is sent, new events included.
    e.event(&acc, "user.login", json!({"n": 3})).await;
    rx.assert_quiet(Duration::from_millis(500)).await;
    assert_eq!(rx.count(), 2);
    e.stop().await;
}
