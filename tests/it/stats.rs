//! Delivery statistics and the operator's figures through the API, against the real engine and
//! real HTTPS receivers: per-webhook buckets by outcome that equal the delivery log, survive a
//! restart and follow retention; `GET /v1/admin/stats`; and the delivery log's exact
//! `event_id` / `delivery_id` filters with paging that stays stable while deliveries arrive.

use crate::common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

fn sum(v: &Value, field: &str) -> u64 {
    v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b[field].as_u64().unwrap())
        .sum()
}

async fn log_count(eng: &TestEngine, hook: &str, status: &str) -> usize {
    let (s, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{hook}/deliveries?status={status}&limit=1000"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    count(&v)
}

#[tokio::test]
async fn webhook_stats_match_the_delivery_log_survive_a_restart_and_follow_retention() {
    let pki = pki();
    let mut eng = TestEngine::start(&pki, "", "").await;
    let (_, key) = eng.account("acme", "enterprise").await;
    eng.account("other", "starter").await;
    let good = Receiver::start(pki.server.clone()).await;
    let bad = Receiver::start(pki.server.clone()).await;
    bad.set_default(Reply::Status(500));
    let ok_hook = eng.webhook("acme", &good.url, &["*"]).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let bad_hook = eng.webhook("acme", &bad.url, &["*"]).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 0..3 {
        eng.event("acme", "visitor.checked_in", json!({ "n": i }))
            .await;
    }
    // Test sends are not counted.
    let (s, _) = eng
        .api
        .admin(
            Method::POST,
            &format!("/v1/accounts/acme/webhooks/{ok_hook}/test"),
            Some(json!({"event": "visitor.checked_in"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // Retries ["500ms", "1s"]: every delivery to the failing endpoint fails three times.
    let ok_path = format!("/v1/accounts/acme/webhooks/{ok_hook}/stats");
    let bad_path = format!("/v1/accounts/acme/webhooks/{bad_hook}/stats?window=24h");
    let ok = eng
        .poll(&ok_path, Duration::from_secs(10), |v| {
            sum(v, "delivered") == 3
        })
        .await;
    let failing = eng
        .poll(&bad_path, Duration::from_secs(15), |v| {
            sum(v, "failed") == 3
        })
        .await;
    assert_eq!(ok["window"], "24h");
    let buckets = ok["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 24, "every hour of the window, oldest first");
    let last = &buckets[23];
    assert_eq!(last["delivered"], 3);
    assert!(last["p50_ms"].as_u64().is_some() && last["p95_ms"].as_u64().is_some());
    assert!(buckets[0]["p50_ms"].is_null(), "no attempt, no time");
    let starts: Vec<&str> = buckets
        .iter()
        .map(|b| b["start"].as_str().unwrap())
        .collect();
    assert!(starts.windows(2).all(|w| w[0] < w[1]));
    assert!(starts[23].ends_with(":00:00Z"), "{}", starts[23]);
    assert_eq!(
        (sum(&failing, "retrying"), sum(&failing, "delivered")),
        (6, 0)
    );
    // Every delivery took one attempt (or ended failed): the counts are the log's, but for
    // the test send, which the log lists and the figures leave out.
    assert_eq!(
        sum(&ok, "delivered") as usize + 1,
        log_count(&eng, &ok_hook, "delivered").await
    );
    assert_eq!(
        sum(&failing, "failed") as usize,
        log_count(&eng, &bad_hook, "failed").await
    );

    let week = eng
        .poll(
            &format!("{ok_path}?window=7d"),
            Duration::from_secs(1),
            |_| true,
        )
        .await;
    assert_eq!(week["buckets"].as_array().unwrap().len(), 7);
    assert!(week["buckets"][6]["start"]
        .as_str()
        .unwrap()
        .ends_with("T00:00:00Z"));
    assert_eq!(sum(&week, "delivered"), 3);

    // Scope and strictness.
    let (s, _) = eng
        .api
        .call(Method::GET, &ok_path, Some(key.as_str()), None)
        .await;
    assert_eq!(s, StatusCode::OK, "the account's own key reads it");
    let (_, other_key) = eng.account("third", "starter").await;
    let (s, v) = eng
        .api
        .call(Method::GET, &ok_path, Some(other_key.as_str()), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/other/webhooks/{ok_hook}/stats"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "another account's webhook: {v}");
    for bad_query in [
        "?window=1h",
        "?window=24h&window=7d",
        "?limit=5",
        "?since=x",
    ] {
        let (s, v) = eng
            .api
            .admin(Method::GET, &format!("{ok_path}{bad_query}"), None)
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad_query}: {v}");
        assert_eq!(v["error"]["code"], "invalid_query");
    }

    // A restart keeps the figures.
    eng.restart().await;
    let (s, again) = eng.api.admin(Method::GET, &ok_path, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again["buckets"], ok["buckets"]);
    let (_, again) = eng.api.admin(Method::GET, &bad_path, None).await;
    assert_eq!(again["buckets"], failing["buckets"]);

    // Retention: a pass whose cutoff is past this hour takes the history and its figures.
    let purger = eng.engine.as_ref().unwrap().purger().unwrap();
    let cutoff = kyberhook::model::now_ms() + 2 * 3_600_000;
    tokio::task::spawn_blocking(move || purger.pass(cutoff, &|| true).unwrap())
        .await
        .unwrap();
    let (_, purged) = eng.api.admin(Method::GET, &ok_path, None).await;
    assert_eq!(sum(&purged, "delivered"), 0, "{purged}");
    assert_eq!(log_count(&eng, &ok_hook, "delivered").await, 0);

    // Deleting a webhook deletes its figures with its history.
    let (s, _) = eng
        .api
        .admin(
            Method::DELETE,
            &format!("/v1/accounts/acme/webhooks/{bad_hook}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = eng.api.admin(Method::GET, &bad_path, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    eng.stop().await;
}

#[tokio::test]
async fn admin_stats_show_the_engine_s_last_hour_backlog_and_webhooks() {
    let pki = pki();
    let eng = TestEngine::start(&pki, "retry_schedule = [\"1h\"]", "").await;
    let (_, key) = eng.account("acme", "starter").await;
    eng.account("quiet", "starter").await;
    let good = Receiver::start(pki.server.clone()).await;
    let bad = Receiver::start(pki.server.clone()).await;
    bad.set_default(Reply::Status(503));
    eng.webhook("acme", &good.url, &["*"]).await;
    eng.webhook("acme", &bad.url, &["*"]).await;
    for i in 0..4 {
        eng.event("acme", "visitor.checked_in", json!({ "n": i }))
            .await;
    }
    good.wait_for(4, Duration::from_secs(10)).await;
    bad.wait_for(4, Duration::from_secs(10)).await;
    let v = eng
        .poll("/v1/admin/stats", Duration::from_secs(10), |v| {
            let minutes = v["last_hour"].as_array().unwrap();
            let total = |f: &str| minutes.iter().map(|m| m[f].as_u64().unwrap()).sum::<u64>();
            total("delivered") == 4 && total("failed") == 4 && v["backlog"]["total"] == 4
        })
        .await;
    let minutes = v["last_hour"].as_array().unwrap();
    assert_eq!(minutes.len(), 60);
    assert_eq!(
        minutes
            .iter()
            .map(|m| m["events"].as_u64().unwrap())
            .sum::<u64>(),
        4,
        "the events this engine ingested"
    );
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["uptime_seconds"].as_u64().is_some());
    assert!(v["started_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        v["webhooks"],
        json!({"active": 2, "paused": 0, "disabled": 0})
    );
    // The failing endpoint's deliveries wait for their retry in an hour.
    assert_eq!(
        v["backlog"]["top_accounts"],
        json!([{"account_id": "acme", "name": "acme", "plan": "starter", "waiting": 4}])
    );
    assert_eq!(v["accounts_over_quota"], json!([]));
    assert!(v["storage"]["store_bytes"].as_u64().unwrap() > 0);
    assert!(v["storage"]["disk_free_bytes"].as_u64().unwrap() > 0);
    assert!(v["delivery_lag_ms"].as_u64().is_some());
    for stage in ["fanout", "scheduler", "dispatcher"] {
        assert!(
            v["delivery_lag_stages_ms"][stage].as_u64().is_some(),
            "{stage}"
        );
    }
    // Operator only; strict query.
    let (s, _) = eng
        .api
        .call(Method::GET, "/v1/admin/stats", Some(key.as_str()), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = eng
        .api
        .admin(Method::GET, "/v1/admin/stats?x=1", None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    eng.stop().await;
}

#[tokio::test]
async fn the_log_finds_exact_event_and_delivery_ids_and_pages_stay_stable_while_deliveries_arrive()
{
    let pki = pki();
    let eng = TestEngine::start(&pki, "", "").await;
    eng.account("acme", "enterprise").await;
    eng.account("other", "starter").await;
    let rx = Receiver::start(pki.server.clone()).await;
    let a = eng.webhook("acme", &rx.url, &["*"]).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = eng.webhook("acme", &rx.url, &["*"]).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut event_ids = Vec::new();
    for i in 0..5 {
        event_ids.push(
            eng.event("acme", "visitor.checked_in", json!({ "n": i }))
                .await,
        );
    }
    let (s, v) = eng
        .api
        .admin(
            Method::POST,
            "/v1/events",
            Some(json!({"account_id": "acme", "event": "visitor.checked_out", "data": {}, "id": "crm-42"})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    // Every delivery settled (the receiver answers 200), so the rows below cannot change.
    let all = eng
        .poll(
            "/v1/accounts/acme/deliveries?limit=100",
            Duration::from_secs(10),
            |v| {
                count(v) == 12
                    && v["data"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|d| d["status"] == "delivered")
            },
        )
        .await;

    // event_id: both deliveries of the event on the account's log, one on a webhook's.
    let third = &event_ids[2];
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/deliveries?event_id={third}"),
            None,
        )
        .await;
    assert_eq!(count(&v), 2, "{v}");
    assert!(v["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["event_id"] == third.as_str()));
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{a}/deliveries?event_id={third}"),
            None,
        )
        .await;
    assert_eq!(count(&v), 1);
    assert_eq!(v["data"][0]["webhook_id"], a.as_str());
    // A producer-chosen id, combined with another filter.
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            "/v1/accounts/acme/deliveries?event_id=crm-42&event=visitor.checked_out",
            None,
        )
        .await;
    assert_eq!(count(&v), 2, "{v}");
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            "/v1/accounts/acme/deliveries?event_id=crm-42&event=visitor.checked_in",
            None,
        )
        .await;
    assert_eq!(count(&v), 0);

    // delivery_id: exactly that one, within the listing's scope.
    let one = all["data"][7]["id"].as_str().unwrap().to_string();
    let owner = all["data"][7]["webhook_id"].as_str().unwrap().to_string();
    let other_hook = if owner == a { &b } else { &a };
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/deliveries?delivery_id={one}"),
            None,
        )
        .await;
    assert_eq!(count(&v), 1);
    assert_eq!(v["data"][0], all["data"][7]);
    assert!(v["next_cursor"].is_null());
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/webhooks/{other_hook}/deliveries?delivery_id={one}"),
            None,
        )
        .await;
    assert_eq!(count(&v), 0, "not this webhook's");
    let (_, v) = eng
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/acme/deliveries?delivery_id={one}&status=failed"),
            None,
        )
        .await;
    assert_eq!(count(&v), 0, "the other filters still apply");
    // Another account's ids name nothing; malformed ones are 400s.
    for q in [
        format!("/v1/accounts/other/deliveries?delivery_id={one}"),
        format!("/v1/accounts/other/deliveries?event_id={third}"),
        "/v1/accounts/acme/deliveries?event_id=evt_ffffffffffffffff".to_string(),
        "/v1/accounts/acme/deliveries?delivery_id=dlv_nothing".to_string(),
    ] {
        let (s, v) = eng.api.admin(Method::GET, &q, None).await;
        assert_eq!((s, count(&v)), (StatusCode::OK, 0), "{q}: {v}");
    }
    for q in [
        "delivery_id=42",
        "event_id=",
        "delivery_id=dlv_1&delivery_id=dlv_2",
    ] {
        let (s, v) = eng
            .api
            .admin(
                Method::GET,
                &format!("/v1/accounts/acme/deliveries?{q}"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
    }

    // Paging while deliveries arrive: the next page continues where the first ended.
    let (_, page1) = eng
        .api
        .admin(Method::GET, "/v1/accounts/acme/deliveries?limit=5", None)
        .await;
    for i in 0..3 {
        eng.event("acme", "visitor.checked_in", json!({ "late": i }))
            .await;
    }
    eng.poll(
        "/v1/accounts/acme/deliveries?limit=100",
        Duration::from_secs(10),
        |v| count(v) == 18,
    )
    .await;
    let mut seen: Vec<Value> = page1["data"].as_array().unwrap().clone();
    let mut cursor = page1["next_cursor"].as_str().map(str::to_string);
    while let Some(c) = cursor {
        let (_, page) = eng
            .api
            .admin(
                Method::GET,
                &format!("/v1/accounts/acme/deliveries?limit=5&cursor={c}"),
                None,
            )
            .await;
        seen.extend(page["data"].as_array().unwrap().iter().cloned());
        cursor = page["next_cursor"].as_str().map(str::to_string);
    }
    let ids: Vec<&str> = seen.iter().map(|d| d["id"].as_str().unwrap()).collect();
    let before: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, before, "every delivery of before, once, in order");
    eng.stop().await;
}
