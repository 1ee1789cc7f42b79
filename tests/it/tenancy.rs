//! One tenant cannot hurt another: the per-account backlog quota, bounded delivery history,
//! rate-limited manual retries, and fan-out to thousands of webhooks.

use crate::common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// Posts raw JSON to an ingest route; returns status, `Retry-After` and the answer.
async fn post(e: &TestEngine, path: &str, body: Value) -> (StatusCode, Option<u32>, Value) {
    let (s, h, v) = e
        .api
        .raw(
            Method::POST,
            path,
            Some(ADMIN),
            Some(serde_json::to_vec(&body).unwrap()),
        )
        .await;
    let retry_after = h
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (s, retry_after, v)
}

fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|v| v.parse().ok())
}

/// Every delivery of an account (up to 1000).
async fn deliveries(e: &TestEngine, account: &str) -> Vec<Value> {
    let (s, v) = e
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/{account}/deliveries?limit=1000"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["data"].as_array().unwrap().clone()
}

#[tokio::test]
async fn an_account_over_its_backlog_quota_gets_429_and_others_are_still_delivered() {
    const QUOTA: usize = 20;
    let pki = pki();
    let dead = Receiver::start(pki.server.clone()).await;
    dead.set_default(Reply::Status(503));
    let quiet = Receiver::start(pki.server.clone()).await;
    let mut e = TestEngine::start(
        &pki,
        &format!(
            "retry_schedule = [\"1h\"]\nauto_disable_after = 1000\nmax_scheduled_per_account = {QUOTA}"
        ),
        "",
    )
    .await;
    let (noisy, _) = e.account("acc_noisy", "enterprise").await;
    let (calm, _) = e.account("acc_calm", "enterprise").await;
    let noisy_hook = e.webhook(&noisy, &dead.url, &["*"]).await;
    e.webhook(&calm, &quiet.url, &["*"]).await;

    // The noisy account's endpoint fails every attempt and its retries are an hour away, so
    // its deliveries pile up until ingest refuses it.
    let mut acked = 0;
    let refusal = loop {
        let (s, retry_after, v) = post(
            &e,
            "/v1/events",
            json!({"account_id": noisy, "event": "user.login", "data": {"n": acked}}),
        )
        .await;
        match s {
            StatusCode::ACCEPTED => acked += 1,
            StatusCode::TOO_MANY_REQUESTS => break (retry_after, v),
            other => panic!("unexpected {other}: {v}"),
        }
        assert!(acked < 10 * QUOTA, "never refused after {acked} events");
    };
    assert!(acked >= QUOTA, "refused after only {acked} events");
    let (retry_after, v) = refusal;
    assert_eq!(v["error"]["code"], "account_backlog_full", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_scheduled_per_account"),
        "{v}"
    );
    assert!(
        retry_after.is_some_and(|s| (1..=60).contains(&s)),
        "{retry_after:?}"
    );
    // Every acknowledged event has its delivery; nothing of a refused request is stored.
    e.poll(
        &format!("/v1/accounts/{noisy}/deliveries?limit=1000&status=retrying"),
        WAIT,
        |v| count(v) == acked,
    )
    .await;

    // A batch is refused whole: its own account's, and one mixing in another account too.
    let (s, retry_after, v) = post(
        &e,
        "/v1/events/batch",
        json!({"events": [
            {"account_id": noisy, "event": "user.login", "data": {}},
            {"account_id": noisy, "event": "user.logout", "data": {}},
        ]}),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("account_backlog_full"))
    );
    assert!(retry_after.is_some());
    let (s, _, v) = post(
        &e,
        "/v1/events/batch",
        json!({"events": [
            {"account_id": calm, "event": "user.login", "data": {"mixed": true}},
            {"account_id": noisy, "event": "user.login", "data": {"mixed": true}},
        ]}),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");

    // The other account is accepted and delivered at once.
    let t = Instant::now();
    let id = e
        .event(&calm, "visitor.checked_in", json!({"calm": 1}))
        .await;
    let got = quiet.next(WAIT).await;
    let calm_latency = got.at - t;
    assert_eq!(got.json()["id"], id.as_str());
    eprintln!("quiet tenant: event to delivery in {calm_latency:?} while the noisy one is refused");
    assert!(calm_latency < Duration::from_secs(5), "{calm_latency:?}");
    let (s, _, v) = post(
        &e,
        "/v1/events/batch",
        json!({"events": [{"account_id": calm, "event": "user.login", "data": {"b": 1}}]}),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    quiet.wait_for(2, WAIT).await;
    assert_eq!(
        deliveries(&e, &calm).await.len(),
        2,
        "the mixed batch left nothing behind"
    );
    assert_eq!(deliveries(&e, &noisy).await.len(), acked);
    let page = e.api.text(&e.metrics_url()).await;
    assert_eq!(
        metric(&page, "kyberhook_accounts_over_backlog_quota"),
        Some(1.0)
    );

    // The counts come back from the stored schedule after a restart.
    e.restart().await;
    let (s, _, v) = post(
        &e,
        "/v1/events",
        json!({"account_id": noisy, "event": "user.login", "data": {"after": "restart"}}),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("account_backlog_full"))
    );
    e.event(&calm, "user.login", json!({"after": "restart"}))
        .await;

    // Deleting the webhook takes its waiting deliveries along: the account has room again.
    let (s, _) = e
        .api
        .admin(
            Method::DELETE,
            &format!(
                "/v1/accounts/{noisy}/webhooks/{}",
                noisy_hook["id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    e.event(&noisy, "user.login", json!({"room": true})).await;
    let page = e.api.text(&e.metrics_url()).await;
    assert_eq!(
        metric(&page, "kyberhook_accounts_over_backlog_quota"),
        Some(0.0)
    );
    e.stop().await;
}

#[tokio::test]
async fn attempt_history_keeps_the_first_and_latest_attempts_and_caps_response_headers() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    // 50 headers of 4 KiB: 200 KiB per answer.
    rx.set_default(Reply::BigHeaders(500, 50));
    let schedule = vec!["10ms"; 24];
    let e = TestEngine::start(
        &pki,
        &format!(
            "retry_schedule = {}",
            serde_json::to_string(&schedule).unwrap()
        ),
        "",
    )
    .await;
    let (acc, _) = e.account("acc_history", "enterprise").await;
    let hook = e.webhook(&acc, &rx.url, &["*"]).await;
    e.event(&acc, "user.login", json!({})).await;
    let d = e
        .newest_delivery(&acc, hook["id"].as_str().unwrap(), WAIT, |d| {
            d["status"] == "failed"
        })
        .await;
    assert_eq!(d["attempt_count"], 25);
    let numbers: Vec<u64> = d["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["number"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = std::iter::once(1).chain(6..=25).collect();
    assert_eq!(numbers, expected, "the first and the latest 20 attempts");
    assert_eq!(d["attempts_omitted"], 4);
    for a in d["attempts"].as_array().unwrap() {
        let headers = a["response_headers"].as_object().unwrap();
        let kept: usize = headers
            .iter()
            .filter(|(k, _)| *k != "x-kyberhook-omitted-headers")
            .map(|(k, v)| k.len() + v.as_str().unwrap().len())
            .sum();
        assert!(kept <= 8192, "{kept} bytes of headers kept");
        let marker = headers["x-kyberhook-omitted-headers"].as_str().unwrap();
        assert!(marker.contains("not kept"), "{marker}");
        assert_eq!(a["response_code"], 500);
    }
    e.stop().await;
}

#[tokio::test]
async fn manual_retries_of_one_delivery_are_rate_limited_with_429() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(&pki, "", "").await;
    let (acc, _) = e.account("acc_retries", "enterprise").await;
    let hook = e.webhook(&acc, &rx.url, &["*"]).await;
    let hook = hook["id"].as_str().unwrap();
    e.event(&acc, "user.login", json!({"first": true})).await;
    let first = e
        .newest_delivery(&acc, hook, WAIT, |d| d["status"] == "delivered")
        .await;
    e.event(&acc, "user.login", json!({"second": true})).await;
    let second = e
        .newest_delivery(&acc, hook, WAIT, |d| {
            d["status"] == "delivered" && d["id"] != first["id"]
        })
        .await;
    let retry = |id: &Value| {
        let path = format!(
            "/v1/accounts/{acc}/deliveries/{}/retry",
            id.as_str().unwrap()
        );
        let e = &e;
        async move { e.api.raw(Method::POST, &path, Some(ADMIN), None).await }
    };
    for n in 0..5 {
        let (s, _, v) = retry(&first["id"]).await;
        assert_eq!(s, StatusCode::ACCEPTED, "retry {n}: {v}");
    }
    let (s, h, v) = retry(&first["id"]).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["code"], "retry_rate_limited");
    let wait: u32 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=12).contains(&wait), "Retry-After {wait}");
    // Another delivery of the same account is not held up by it.
    let (s, _, v) = retry(&second["id"]).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    // The five accepted retries were each attempted: 1 + 5 requests, and 2 for the other.
    rx.wait_for(8, WAIT).await;
    rx.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(rx.count(), 8);
    e.stop().await;
}

#[tokio::test]
async fn one_event_reaches_all_of_five_thousand_webhooks() {
    const HOOKS: usize = 5000;
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(
        &pki,
        "max_in_flight = 64",
        "[plans.enterprise]\nevents_per_second = 0\n",
    )
    .await;
    let (acc, _) = e.account("acc_big", "enterprise").await;
    let started = Instant::now();
    // Created 32 at a time, so that their group commits are shared.
    let mut ids: Vec<String> = Vec::with_capacity(HOOKS);
    for round in 0..HOOKS.div_ceil(32) {
        let mut set = tokio::task::JoinSet::new();
        for _ in round * 32..HOOKS.min(round * 32 + 32) {
            let (api, acc, url) = (e.api.clone(), acc.clone(), rx.url.clone());
            set.spawn(async move {
                api.admin(
                    Method::POST,
                    &format!("/v1/accounts/{acc}/webhooks"),
                    Some(json!({"name": "hook", "url": url, "events": ["user.*"]})),
                )
                .await
            });
        }
        while let Some(done) = set.join_next().await {
            let (s, v) = done.unwrap();
            assert_eq!(s, StatusCode::CREATED, "{v}");
            ids.push(v["id"].as_str().unwrap().to_string());
        }
    }
    eprintln!("{HOOKS} webhooks created in {:?}", started.elapsed());
    let t = Instant::now();
    e.event(&acc, "user.login", json!({"to": "everyone"})).await;
    let got = rx.wait_for(HOOKS, Duration::from_secs(180)).await;
    eprintln!(
        "one event delivered to {HOOKS} webhooks in {:?}",
        t.elapsed()
    );
    rx.assert_quiet(Duration::from_millis(500)).await;
    let deliveries: HashSet<String> = got
        .iter()
        .map(|r| r.header("x-kyberaccess-delivery"))
        .collect();
    assert_eq!(deliveries.len(), HOOKS, "each webhook got the event once");
    assert_eq!(rx.count(), HOOKS);
    let want: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let reached: HashSet<String> = deliveries
        .iter()
        .map(|d| {
            // dlv_ + 16 hex seq + 16 hex webhook; the webhook id is wh_ + the same 16.
            format!("wh_{}", &d[d.len() - 16..])
        })
        .collect();
    assert_eq!(reached.len(), HOOKS);
    for id in &reached {
        assert!(
            want.contains(id.as_str()),
            "{id} is not one of the account's webhooks"
        );
    }
    e.stop().await;
}
