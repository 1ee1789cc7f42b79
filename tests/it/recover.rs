//! Recover (issue 14 item 5): `POST …/webhooks/{id}/recover {"since", "until"?}` re-sends the
//! webhook's deliveries that ended `failed` in the window — same ids, new attempts, paced by
//! the plan's rate — and refuses windows longer than the retention.

use crate::common;

use std::time::{Duration, SystemTime};

use common::*;
use http::{Method, StatusCode};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[tokio::test]
async fn recover_re_sends_what_failed_in_the_window_with_the_same_ids_at_the_plan_s_rate() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    rx.set_default(Reply::Status(500));
    let e = TestEngine::start(&pki, "retry_schedule = [\"100ms\"]", "").await;
    let (acc, _) = e.account("acc_recover", "starter").await;
    let hook = e.webhook(&acc, &rx.url, &["*"]).await;
    let wh = hook["id"].as_str().unwrap();
    let since = SystemTime::now();
    // Eight deliveries fail (two attempts each) inside the window ...
    for n in 0..8 {
        e.event(&acc, "user.login", json!({ "n": n })).await;
    }
    let first = rx.wait_for(16, WAIT).await;
    let mut in_window: Vec<String> = first
        .iter()
        .map(|r| r.header("x-kyberaccess-delivery"))
        .collect();
    in_window.sort();
    in_window.dedup();
    assert_eq!(in_window.len(), 8);
    for id in &in_window {
        e.wait_delivery(&acc, id, WAIT, |d| d["status"] == "failed")
            .await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let until = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // ... and one after it.
    e.event(&acc, "user.login", json!({ "n": "late" })).await;
    let late = rx.wait_for(18, WAIT).await[16].header("x-kyberaccess-delivery");
    e.wait_delivery(&acc, &late, WAIT, |d| d["status"] == "failed")
        .await;

    rx.set_default(Reply::Status(200));
    let path = format!("/v1/accounts/{acc}/webhooks/{wh}/recover");
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            &path,
            Some(json!({"since": stamp(since), "until": stamp(until)})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v, json!({"recovered": 8}));
    let all = rx.wait_for(26, WAIT).await;
    let again = &all[18..];
    let mut ids: Vec<String> = again
        .iter()
        .map(|r| r.header("x-kyberaccess-delivery"))
        .collect();
    ids.sort();
    assert_eq!(ids, in_window, "the same delivery ids, each once");
    // The starter plan (10/s, burst 5) paces them: the last three wait for their slots.
    let span = again.last().unwrap().at - again[0].at;
    assert!(span >= Duration::from_millis(200), "not paced: {span:?}");
    for id in &in_window {
        let d = e
            .wait_delivery(&acc, id, WAIT, |d| d["status"] == "delivered")
            .await;
        assert_eq!(d["attempt_count"], 3, "{d}");
    }
    rx.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(
        rx.count(),
        26,
        "the delivery that failed after the window is not re-sent"
    );
    let (_, d) = e
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/{acc}/deliveries/{late}"),
            None,
        )
        .await;
    assert_eq!(d["status"], "failed");

    // A second recover of the same window finds nothing failed any more.
    let (s, v) = e
        .api
        .admin(Method::POST, &path, Some(json!({"since": stamp(since)})))
        .await;
    assert_eq!((s, v), (StatusCode::ACCEPTED, json!({"recovered": 1})));
    e.stop().await;
}

#[tokio::test]
async fn recover_refuses_bad_windows_with_clear_codes() {
    let pki = pki();
    let data = tempfile::tempdir().unwrap();
    let toml = config_toml(data.path(), &pki.ca_file, "", "");
    let mut config = kyberhook::config::Config::from_toml(&toml, "test").unwrap();
    config.storage.retention = Duration::from_secs(2 * 3600);
    let e = TestEngine::start_with(config, data).await;
    let (acc, _) = e.account("acc_recover_bad", "enterprise").await;
    let hook = e.webhook(&acc, "https://127.0.0.1:9/hook", &["*"]).await;
    let wh = hook["id"].as_str().unwrap();
    let path = format!("/v1/accounts/{acc}/webhooks/{wh}/recover");
    let now = SystemTime::now();
    let hours = |h: u64| stamp(now - Duration::from_secs(h * 3600));
    for (body, status, code) in [
        (json!({"since": hours(3)}), 400, "recover_window_too_long"),
        (
            json!({"since": hours(5), "until": hours(2)}),
            400,
            "recover_window_too_long",
        ),
        (json!({"since": "yesterday"}), 400, "invalid_timestamp"),
        (
            json!({"since": hours(1), "until": "soon"}),
            400,
            "invalid_timestamp",
        ),
        (
            json!({"since": hours(1), "until": hours(2)}),
            400,
            "invalid_recover_window",
        ),
        (json!({}), 400, "invalid_request"),
        (
            json!({"since": hours(1), "extra": 1}),
            400,
            "invalid_request",
        ),
    ] {
        let (s, v) = e.api.admin(Method::POST, &path, Some(body.clone())).await;
        assert_eq!(s.as_u16(), status, "{body} → {v}");
        assert_eq!(v["error"]["code"], code, "{body} → {v}");
    }
    // Within the retention: fine (nothing failed yet).
    let (s, v) = e
        .api
        .admin(Method::POST, &path, Some(json!({"since": hours(1)})))
        .await;
    assert_eq!((s, v), (StatusCode::ACCEPTED, json!({"recovered": 0})));
    e.stop().await;
}
