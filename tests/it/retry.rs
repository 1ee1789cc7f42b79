//! Retries on the configured schedule, terminal failures, failure kinds, auto-disable, and what
//! happens to a retry whose webhook was paused meanwhile.

use crate::common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn retries_follow_the_schedule_with_the_same_delivery_and_body() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    rx.script([Reply::Status(503), Reply::Status(503), Reply::Status(200)]);
    let e = TestEngine::start(&pki, "retry_schedule = [\"500ms\", \"1s\"]", "").await;
    let (acc, _) = e.account("acc_retry", "enterprise").await;
    let hook = e.webhook(&acc, &rx.url, &["*"]).await;
    let secret = hook["secret"].as_str().unwrap();
    e.event(&acc, "screening.watchlist_hit", json!({"x": 1}))
        .await;
    let got = rx.wait_for(3, WAIT).await;
    rx.assert_quiet(Duration::from_millis(1500)).await;
    assert_eq!(rx.count(), 3);
    let dlv = got[0].header("x-kyberaccess-delivery");
    for g in &got {
        assert_eq!(g.header("x-kyberaccess-delivery"), dlv);
        assert_eq!(g.body, got[0].body);
        let ts = g.header("x-kyberaccess-timestamp");
        assert_eq!(
            g.header("x-kyberaccess-signature"),
            expected_signature(secret, &ts, &g.body)
        );
    }
    let gap1 = got[1].at - got[0].at;
    let gap2 = got[2].at - got[1].at;
    assert!(
        gap1 >= Duration::from_millis(480) && gap1 < Duration::from_millis(900),
        "first gap {gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(980) && gap2 < Duration::from_millis(1500),
        "second gap {gap2:?}"
    );
    let d = e
        .wait_delivery(&acc, &dlv, WAIT, |d| d["status"] == "delivered")
        .await;
    let codes: Vec<u64> = d["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["response_code"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, vec![503, 503, 200]);
    let numbers: Vec<u64> = d["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, vec![1, 2, 3]);
    assert_eq!(d["attempt_count"], 3);
    assert_eq!(d["response_code"], 200);
    e.stop().await;
}

#[tokio::test]
async fn an_exhausted_schedule_ends_failed_with_no_further_attempt() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    rx.set_default(Reply::Status(500));
    let e = TestEngine::start(&pki, "retry_schedule = [\"200ms\", \"200ms\"]", "").await;
    let (acc, _) = e.account("acc_exhaust", "enterprise").await;
    e.webhook(&acc, &rx.url, &["*"]).await;
    e.event(&acc, "user.login", json!({})).await;
    let got = rx.wait_for(3, WAIT).await;
    let dlv = got[0].header("x-kyberaccess-delivery");
    let d = e
        .wait_delivery(&acc, &dlv, WAIT, |d| d["status"] == "failed")
        .await;
    assert_eq!(d["attempt_count"], 3);
    assert!(d["next_attempt_at"].is_null());
    rx.assert_quiet(Duration::from_millis(800)).await;
    assert_eq!(rx.count(), 3);
    e.stop().await;
}

#[tokio::test]
async fn timeouts_redirects_tls_and_connection_failures_are_failed_attempts_with_errors() {
    let pki = pki();
    let slow = Receiver::start(pki.server.clone()).await;
    slow.set_default(Reply::Slow(Duration::from_secs(3), 200));
    let redirect = Receiver::start(pki.server.clone()).await;
    redirect.set_default(Reply::Redirect);
    let untrusted = Receiver::start(pki.untrusted.clone()).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        format!("https://127.0.0.1:{port}/hook")
    };
    let e = TestEngine::start(&pki, "timeout = \"300ms\"\nretry_schedule = [\"1h\"]", "").await;
    let (acc, _) = e.account("acc_fail", "enterprise").await;
    let cases = [
        (slow.url.clone(), "timed out"),
        (redirect.url.clone(), "redirect"),
        (untrusted.url.clone(), "certificate"),
        (closed.clone(), "onnect"),
    ];
    let mut hooks = Vec::new();
    for (url, _) in &cases {
        hooks.push(
            e.webhook(&acc, url, &["user.login"]).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    e.event(&acc, "user.login", json!({})).await;
    for (hook, (url, needle)) in hooks.iter().zip(&cases) {
        let detail = e
            .newest_delivery(&acc, hook, WAIT, |d| d["status"] == "retrying")
            .await;
        let err = detail["attempts"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            err.contains(needle),
            "{url}: expected {needle:?} in {err:?}"
        );
    }
    // The redirect target was never followed; the slow endpoint got exactly one request.
    assert_eq!(redirect.count(), 1);
    assert_eq!(slow.count(), 1);
    e.stop().await;
}

#[tokio::test]
async fn consecutive_failures_disable_a_webhook_and_patch_active_re_enables_it() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    rx.set_default(Reply::Status(500));
    let e = TestEngine::start(
        &pki,
        "retry_schedule = [\"100ms\"]\nauto_disable_after = 3",
        "",
    )
    .await;
    let (acc, _) = e.account("acc_disable", "enterprise").await;
    let hook = e.webhook(&acc, &rx.url, &["*"]).await;
    let wh = hook["id"].as_str().unwrap();
    let path = format!("/v1/accounts/{acc}/webhooks/{wh}");
    let failures = |v: &serde_json::Value| v["consecutive_failures"].as_u64().unwrap();
    // Event A: a failure, then a success that resets the count.
    rx.script([Reply::Status(500), Reply::Status(200)]);
    e.event(&acc, "user.login", json!({"n": 1})).await;
    let a = rx.wait_for(2, WAIT).await;
    e.wait_delivery(&acc, &a[0].header("x-kyberaccess-delivery"), WAIT, |d| {
        d["status"] == "delivered"
    })
    .await;
    // The writer updates the webhook's count just after the drain that settled the delivery.
    let v = e.poll(&path, WAIT, |v| failures(v) == 0).await;
    assert_eq!((failures(&v), v["status"].as_str()), (0, Some("active")));
    // Event B: two failures (the schedule's end); still active.
    e.event(&acc, "user.login", json!({"n": 2})).await;
    let b = rx.wait_for(4, WAIT).await;
    e.wait_delivery(&acc, &b[2].header("x-kyberaccess-delivery"), WAIT, |d| {
        d["status"] == "failed"
    })
    .await;
    let v = e.poll(&path, WAIT, |v| failures(v) == 2).await;
    assert_eq!((failures(&v), v["status"].as_str()), (2, Some("active")));
    // Event C: the third consecutive failure disables the webhook.
    e.event(&acc, "user.login", json!({"n": 3})).await;
    rx.wait_for(5, WAIT).await;
    let v = e.poll(&path, WAIT, |v| v["status"] == "disabled").await;
    assert!(
        v["disabled_reason"]
            .as_str()
            .unwrap()
            .contains("3 consecutive"),
        "{v}"
    );
    assert_eq!(failures(&v), 3);
    // C's retry comes due while disabled: not sent. New events are skipped.
    let before = rx.count();
    e.event(&acc, "user.login", json!({"n": 9})).await;
    rx.assert_quiet(Duration::from_millis(400)).await;
    assert_eq!(rx.count(), before, "a disabled webhook got a delivery");

    rx.set_default(Reply::Status(200));
    let (s, v) = e
        .api
        .admin(Method::PATCH, &path, Some(json!({"status": "active"})))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "active");
    assert_eq!(v["consecutive_failures"], 0);
    assert!(v["disabled_reason"].is_null());
    e.event(&acc, "user.login", json!({"n": 10})).await;
    let got = rx.wait_for(before + 1, WAIT).await;
    assert_eq!(got.last().unwrap().json()["data"]["n"], 10);
    e.stop().await;
}

#[tokio::test]
async fn a_retry_due_while_paused_ends_failed_visibly_and_can_be_retried_by_hand() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    rx.script([Reply::Status(500)]);
    let e = TestEngine::start(&pki, "retry_schedule = [\"300ms\"]", "").await;
    let (acc, _) = e.account("acc_pause", "enterprise").await;
    let hook = e.webhook(&acc, &rx.url, &["*"]).await;
    let wh = hook["id"].as_str().unwrap();
    e.event(&acc, "user.login", json!({})).await;
    let first = rx.next(WAIT).await;
    let dlv = first.header("x-kyberaccess-delivery");
    let (s, _) = e
        .api
        .admin(
            Method::PATCH,
            &format!("/v1/accounts/{acc}/webhooks/{wh}"),
            Some(json!({"status": "paused"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let d = e
        .wait_delivery(&acc, &dlv, WAIT, |d| d["status"] == "failed")
        .await;
    assert!(d["note"].as_str().unwrap().contains("paused"), "{d}");
    assert_eq!(rx.count(), 1);
    // While paused a manual retry is refused; once active it goes.
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            &format!("/v1/accounts/{acc}/deliveries/{dlv}/retry"),
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("webhook_not_active"))
    );
    e.api
        .admin(
            Method::PATCH,
            &format!("/v1/accounts/{acc}/webhooks/{wh}"),
            Some(json!({"status": "active"})),
        )
        .await;
    let (s, _) = e
        .api
        .admin(
            Method::POST,
            &format!("/v1/accounts/{acc}/deliveries/{dlv}/retry"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let again = rx.next(WAIT).await;
    assert_eq!(again.header("x-kyberaccess-delivery"), dlv);
    e.wait_delivery(&acc, &dlv, WAIT, |d| d["status"] == "delivered")
        .await;
    e.stop().await;
}
