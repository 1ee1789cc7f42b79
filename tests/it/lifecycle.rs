//! Lifecycle races and tenant isolation of the delivery path: changes to a webhook (pause,
//! delete, URL, secret) apply to every attempt not yet started, a manual retry during an attempt
//! runs after it, and one account's test sends cannot delay another account's deliveries.
//!
//! Each test holds deliveries queued behind a slow real HTTPS receiver with
//! `max_in_flight_per_webhook = 1`, so that "in flight" and "waiting" are distinct.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);
/// How long the slow receiver holds each request.
const SLOW: Duration = Duration::from_millis(1500);

/// An engine with one slot per webhook, an account, a webhook on `url`, and `n` events posted
/// in one batch; returns once the first attempt has reached `first` (the others then wait).
async fn queued_behind_a_slow_attempt(
    pki: &Pki,
    first: &Receiver,
    n: usize,
) -> (TestEngine, String, Value) {
    first.set_default(Reply::Slow(SLOW, 200));
    let e = TestEngine::start(
        pki,
        "timeout = \"5s\"\nmax_in_flight_per_webhook = 1\nretry_schedule = [\"1h\"]",
        "",
    )
    .await;
    let (acc, _) = e.account("acc_life", "enterprise").await;
    let hook = e.webhook(&acc, &first.url, &["user.login"]).await;
    let events: Vec<_> = (0..n)
        .map(|i| json!({"account_id": acc, "event": "user.login", "data": {"i": i}}))
        .collect();
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            "/v1/events/batch",
            Some(json!({"events": events})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    first.wait_for(1, WAIT).await;
    (e, acc, hook)
}

fn hook_path(acc: &str, hook: &Value) -> String {
    format!(
        "/v1/accounts/{acc}/webhooks/{}",
        hook["id"].as_str().unwrap()
    )
}

#[tokio::test]
async fn pausing_a_busy_webhook_stops_its_queued_deliveries() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let (e, acc, hook) = queued_behind_a_slow_attempt(&pki, &rx, 4).await;
    let (s, _) = e
        .api
        .admin(
            Method::PATCH,
            &hook_path(&acc, &hook),
            Some(json!({"status": "paused"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // The attempt in flight finishes; the three queued behind it end without an attempt.
    let list = e
        .poll(
            &format!("{}/deliveries", hook_path(&acc, &hook)),
            WAIT,
            |v| {
                v["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|d| d["status"] == "failed")
                    .count()
                    == 3
            },
        )
        .await;
    assert_eq!(rx.count(), 1, "a queued delivery reached a paused webhook");
    for d in list["data"].as_array().unwrap() {
        if d["status"] == "failed" {
            assert_eq!(d["attempt_count"], 0);
            assert!(d["note"].as_str().unwrap().contains("paused"), "{d}");
        } else {
            assert_eq!(d["status"], "delivered");
        }
    }
    e.stop().await;
}

#[tokio::test]
async fn deleting_a_busy_webhook_stops_its_queued_deliveries() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let (e, acc, hook) = queued_behind_a_slow_attempt(&pki, &rx, 4).await;
    let (s, _) = e
        .api
        .admin(Method::DELETE, &hook_path(&acc, &hook), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // Long enough for the attempt in flight to end and every queued one to have started.
    rx.assert_quiet(SLOW * 2).await;
    assert_eq!(rx.count(), 1, "a queued delivery reached a deleted webhook");
    let (_, v) = e
        .api
        .admin(Method::GET, &format!("/v1/accounts/{acc}/deliveries"), None)
        .await;
    assert_eq!(
        count(&v),
        0,
        "the deleted webhook's deliveries are gone: {v}"
    );
    e.stop().await;
}

#[tokio::test]
async fn a_url_change_sends_queued_deliveries_to_the_new_url_only() {
    let pki = pki();
    let old = Receiver::start(pki.server.clone()).await;
    let new = Receiver::start(pki.server.clone()).await;
    let (e, acc, hook) = queued_behind_a_slow_attempt(&pki, &old, 4).await;
    let (s, _) = e
        .api
        .admin(
            Method::PATCH,
            &hook_path(&acc, &hook),
            Some(json!({"url": new.url})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    new.wait_for(3, WAIT).await;
    assert_eq!(old.count(), 1, "a queued delivery went to the old URL");
    e.stop().await;
}

#[tokio::test]
async fn a_secret_rotation_signs_queued_deliveries_with_the_new_secret() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let (e, acc, hook) = queued_behind_a_slow_attempt(&pki, &rx, 4).await;
    let old_secret = hook["secret"].as_str().unwrap().to_string();
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            &format!("{}/secret/rotate", hook_path(&acc, &hook)),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let new_secret = v["secret"].as_str().unwrap().to_string();
    let got = rx.wait_for(4, WAIT).await;
    let signed_by = |r: &Received, secret: &str| {
        let expected = expected_signature(secret, &r.header("x-kyberaccess-timestamp"), &r.body);
        // With a rotation grace period the new secret's signature travels in `-Next`.
        r.header("x-kyberaccess-signature") == expected
            || r.header("x-kyberaccess-signature-next") == expected
    };
    assert!(signed_by(&got[0], &old_secret), "the attempt in flight");
    for r in &got[1..] {
        assert!(
            signed_by(r, &new_secret),
            "a queued delivery was not signed with the rotated secret"
        );
    }
    e.stop().await;
}

#[tokio::test]
async fn a_manual_retry_during_an_attempt_runs_after_it() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    rx.script([Reply::Slow(SLOW, 500)]);
    let (e, acc, _hook) = queued_behind_a_slow_attempt(&pki, &rx, 1).await;
    // `queued_behind_a_slow_attempt` made every reply slow; the retry's may be quick.
    rx.set_default(Reply::Status(200));
    let first = rx.log.lock().unwrap()[0].clone();
    let dlv = first.header("x-kyberaccess-delivery");
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            &format!("/v1/accounts/{acc}/deliveries/{dlv}/retry"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    // The attempt in flight fails (500) and its schedule says 1 h; the retry runs right after.
    let got = rx.wait_for(2, WAIT).await;
    assert_eq!(got[1].header("x-kyberaccess-delivery"), dlv);
    let d = e
        .wait_delivery(&acc, &dlv, WAIT, |d| d["status"] == "delivered")
        .await;
    assert_eq!(d["attempt_count"], 2);
    let codes: Vec<u64> = d["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["response_code"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, vec![500, 200]);
    assert!(d["next_attempt_at"].is_null());
    e.stop().await;
}

#[tokio::test]
async fn one_accounts_test_sends_do_not_delay_another_accounts_deliveries() {
    let pki = pki();
    let slow = Receiver::start(pki.server.clone()).await;
    slow.set_default(Reply::Slow(Duration::from_secs(3), 200));
    let quiet = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(
        &pki,
        "timeout = \"5s\"\nmax_in_flight = 8\nmax_test_sends_per_account = 2",
        "",
    )
    .await;
    let (noisy, _) = e.account("acc_noisy", "enterprise").await;
    let (calm, _) = e.account("acc_calm", "enterprise").await;
    let noisy_hook = e.webhook(&noisy, &slow.url, &["*"]).await;
    e.webhook(&calm, &quiet.url, &["*"]).await;

    let test_path = format!("{}/test", hook_path(&noisy, &noisy_hook));
    let tests: Vec<_> = (0..40)
        .map(|_| {
            let api = e.api.clone();
            let path = test_path.clone();
            tokio::spawn(async move {
                api.raw(
                    Method::POST,
                    &path,
                    Some(ADMIN),
                    Some(br#"{"event":"user.login"}"#.to_vec()),
                )
                .await
            })
        })
        .collect();
    // The admitted test sends are at the slow endpoint now.
    slow.wait_for(1, WAIT).await;

    let mut lags = Vec::new();
    for i in 0..5 {
        let sent = Instant::now();
        e.event(&calm, "user.login", json!({"i": i})).await;
        quiet.wait_for(i + 1, WAIT).await;
        lags.push(quiet.log.lock().unwrap()[i].at - sent);
    }
    let worst = lags.iter().max().unwrap();
    eprintln!("calm account's create->arrival while the noisy one ran test sends: {lags:?}");
    assert!(
        *worst < Duration::from_millis(750),
        "the calm account's deliveries took {lags:?} while the noisy one ran test sends"
    );

    let mut ok = 0;
    let mut refused = 0;
    for t in tests {
        let (s, headers, v) = t.await.unwrap();
        match s {
            StatusCode::OK => {
                assert_eq!(v["status"], "delivered", "{v}");
                ok += 1;
            }
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(v["error"]["code"], "too_many_test_sends", "{v}");
                let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!(wait >= 1);
                refused += 1;
            }
            other => panic!("a test send answered {other}: {v}"),
        }
    }
    assert_eq!(ok + refused, 40);
    assert!(ok >= 2, "the account's own test sends ran ({ok})");
    assert!(refused >= 30, "excess test sends were refused ({refused})");
    // At most two at once ever reached the slow endpoint: each held it for 3 s.
    let times: Vec<Instant> = slow.log.lock().unwrap().iter().map(|r| r.at).collect();
    for (i, t) in times.iter().enumerate() {
        let overlapping = times[..i]
            .iter()
            .filter(|s| *t - **s < Duration::from_millis(2900))
            .count();
        assert!(
            overlapping < 2,
            "three test sends of one account overlapped"
        );
    }
    e.stop().await;
}
