//! The delivery pipeline end to end: durable ingest, fan-out, signed HTTPS requests to real
//! local receivers, the delivery log, the test tool, manual retry and deletion cascades.

use crate::common;
use crate::tools;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

/// Runs one of the guide's verifiers (python3 or node) over captured requests.
fn run_verifier(program: &str, script: &str, items: &Value) -> String {
    let path = format!("{}/tests/verifiers/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut child = tools::command(program)
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} must be installed to run the guide's verifier: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(items.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{program} verifier rejected a request: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn events_reach_exactly_the_subscribed_endpoints_with_the_contract_request() {
    let pki = pki();
    let exact = Receiver::start(pki.server.clone()).await;
    let family = Receiver::start(pki.server.clone()).await;
    let all = Receiver::start(pki.server.clone()).await;
    let other_type = Receiver::start(pki.server.clone()).await;
    let paused = Receiver::start(pki.server.clone()).await;
    let other_account = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(&pki, "", "").await;
    let (acc, _) = e.account("acc_main", "enterprise").await;
    let (acc2, _) = e.account("acc_other", "enterprise").await;
    let h_exact = e.webhook(&acc, &exact.url, &["visitor.checked_in"]).await;
    let h_family = e.webhook(&acc, &family.url, &["visitor.*"]).await;
    let h_all = e.webhook(&acc, &all.url, &["*"]).await;
    e.webhook(&acc, &other_type.url, &["emergency.*", "user.login"])
        .await;
    let h_paused = e.webhook(&acc, &paused.url, &["*"]).await;
    let (s, v) = e
        .api
        .admin(
            Method::PATCH,
            &format!(
                "/v1/accounts/{acc}/webhooks/{}",
                h_paused["id"].as_str().unwrap()
            ),
            Some(json!({"status": "paused"})),
        )
        .await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("paused")));
    e.webhook(&acc2, &other_account.url, &["*"]).await;

    let data = json!({"visitor": {"id": "vis_1", "first_name": "Jane", "tags": ["a", "b"], "n": 1.5}, "badge_number": "V-0042", "id_scanned": true});
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            "/v1/events",
            Some(json!({"account_id": acc, "event": "visitor.checked_in", "data": data, "id": "evt_guide_1", "timestamp": "2025-01-15T09:30:00Z"})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["id"], "evt_guide_1");

    let mut captured = Vec::new();
    for (rx, hook) in [(&exact, &h_exact), (&family, &h_family), (&all, &h_all)] {
        let got = rx.next(WAIT).await;
        assert_eq!(got.path, "/hook");
        assert_eq!(got.header("content-type"), "application/json");
        assert!(
            got.header("user-agent").starts_with("kyberhook/"),
            "{}",
            got.header("user-agent")
        );
        assert_eq!(got.header("x-kyberaccess-event"), "visitor.checked_in");
        let delivery = got.header("x-kyberaccess-delivery");
        assert!(delivery.starts_with("dlv_"), "{delivery}");
        let ts = got.header("x-kyberaccess-timestamp");
        let ts_num: u64 = ts.parse().expect("unix seconds");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(ts_num.abs_diff(now) < 60);
        // Exactly the contract's compact body, in the contract's key order.
        let expected_body = format!(
            r#"{{"id":"evt_guide_1","event":"visitor.checked_in","timestamp":"2025-01-15T09:30:00Z","data":{},"account_id":"{acc}"}}"#,
            serde_json::to_string(&data).unwrap()
        );
        assert_eq!(String::from_utf8(got.body.to_vec()).unwrap(), expected_body);
        let secret = hook["secret"].as_str().unwrap();
        assert_eq!(
            got.header("x-kyberaccess-signature"),
            expected_signature(secret, &ts, &got.body)
        );
        captured.push(json!({
            "secret": secret,
            "timestamp": ts,
            "signature": got.header("x-kyberaccess-signature"),
            "body": String::from_utf8(got.body.to_vec()).unwrap(),
        }));
    }
    // A wrong secret must fail both verifiers (so they can fail at all).
    let mut tampered = captured[0].clone();
    tampered["secret"] = json!("whsec_wrong");
    assert_eq!(
        run_verifier("python3", "verify.py", &Value::Array(captured.clone()))
            .matches("OK")
            .count(),
        3
    );
    assert_eq!(
        run_verifier("node", "verify.js", &Value::Array(captured.clone()))
            .matches("OK")
            .count(),
        3
    );
    for (program, script) in [("python3", "verify.py"), ("node", "verify.js")] {
        let path = format!("{}/tests/verifiers/{script}", env!("CARGO_MANIFEST_DIR"));
        let mut child = tools::command(program)
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(json!([tampered]).to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "{program} accepted a wrong secret");
    }

    other_type.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(paused.count(), 0);
    assert_eq!(other_account.count(), 0);
    assert_eq!(exact.count(), 1);
    assert_eq!(all.count(), 1);

    // The other account's event reaches only the other account.
    e.event(&acc2, "user.login", json!({"user": "x"})).await;
    let got = other_account.next(WAIT).await;
    assert_eq!(got.json()["account_id"], acc2.as_str());
    all.assert_quiet(Duration::from_millis(200)).await;
    e.stop().await;
}

#[tokio::test]
async fn idempotent_ingest_and_batch_partial_errors() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(&pki, "", "").await;
    let (acc, _) = e.account("acc_idem", "enterprise").await;
    e.webhook(&acc, &rx.url, &["*"]).await;
    for _ in 0..3 {
        let (s, v) = e
            .api
            .admin(
                Method::POST,
                "/v1/events",
                Some(
                    json!({"account_id": acc, "event": "user.login", "data": {}, "id": "same-id"}),
                ),
            )
            .await;
        assert_eq!(
            (s, v["id"].as_str()),
            (StatusCode::ACCEPTED, Some("same-id"))
        );
    }
    rx.next(WAIT).await;
    rx.assert_quiet(Duration::from_millis(300)).await;

    let (s, v) = e
        .api
        .admin(
            Method::POST,
            "/v1/events/batch",
            Some(json!({"events": [
                {"account_id": acc, "event": "user.login", "data": {"n": 1}},
                {"account_id": acc, "event": "no.such_type", "data": {}},
                {"account_id": "acc_missing", "event": "user.login", "data": {}},
                {"account_id": acc, "event": "user.login", "data": {}, "surprise": 1},
                {"account_id": acc, "event": "user.login", "data": {"n": 2}, "id": "b-2"},
                {"account_id": acc, "event": "user.login", "data": {"n": 3}, "id": "same-id"},
                {"account_id": acc, "event": "user.login", "data": "not an object"},
            ]})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 7);
    assert!(r[0]["id"].as_str().unwrap().starts_with("evt_"));
    assert_eq!(r[1]["error"]["code"], "unknown_event_type");
    assert_eq!(r[2]["error"]["code"], "unknown_account");
    assert_eq!(r[3]["error"]["code"], "invalid_request");
    assert_eq!(r[4]["id"], "b-2");
    assert_eq!(r[5]["id"], "same-id");
    assert_eq!(r[6]["error"]["code"], "invalid_request");
    let got = rx.wait_for(3, WAIT).await;
    rx.assert_quiet(Duration::from_millis(300)).await;
    let mut ns: Vec<i64> = got[1..]
        .iter()
        .map(|g| g.json()["data"]["n"].as_i64().unwrap())
        .collect();
    ns.sort();
    assert_eq!(ns, vec![1, 2]);
    // A minted id is written into the body when the event is committed, and re-posting an
    // event under it is a duplicate like any producer-chosen id.
    let minted = r[0]["id"].as_str().unwrap().to_string();
    let first = got.iter().find(|g| g.json()["data"]["n"] == 1).unwrap();
    assert_eq!(first.json()["id"], minted.as_str());
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            "/v1/events",
            Some(json!({"account_id": acc, "event": "user.login", "data": {"n": 9}, "id": minted})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["id"], minted.as_str());
    rx.assert_quiet(Duration::from_millis(300)).await;

    // Single-event errors.
    for (body, status, code) in [
        (
            json!({"account_id": acc, "event": "nope.nope", "data": {}}),
            422,
            "unknown_event_type",
        ),
        (
            json!({"account_id": "acc_nobody", "event": "user.login", "data": {}}),
            422,
            "unknown_account",
        ),
        (
            json!({"account_id": acc, "event": "user.login"}),
            400,
            "invalid_request",
        ),
        (
            json!({"account_id": acc, "event": "user.login", "data": {}, "timestamp": "yesterday"}),
            400,
            "invalid_request",
        ),
        (
            json!({"account_id": acc, "event": "user.login", "data": {}, "id": "has space"}),
            400,
            "invalid_request",
        ),
    ] {
        let (s, v) = e
            .api
            .admin(Method::POST, "/v1/events", Some(body.clone()))
            .await;
        assert_eq!(
            (s.as_u16(), v["error"]["code"].as_str()),
            (status, Some(code)),
            "{body} -> {v}"
        );
    }
    let big: Vec<Value> = (0..1001)
        .map(|_| json!({"account_id": acc, "event": "user.login", "data": {}}))
        .collect();
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            "/v1/events/batch",
            Some(json!({"events": big})),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("batch_too_large"))
    );
    e.stop().await;
}

#[tokio::test]
async fn delivery_log_filters_and_pages_newest_first() {
    let pki = pki();
    let ok = Receiver::start(pki.server.clone()).await;
    let bad = Receiver::start(pki.server.clone()).await;
    bad.set_default(Reply::Status(500));
    let e = TestEngine::start(&pki, "retry_schedule = [\"1h\"]", "").await;
    let (acc, _) = e.account("acc_log", "enterprise").await;
    let h_ok = e.webhook(&acc, &ok.url, &["*"]).await;
    let h_bad = e.webhook(&acc, &bad.url, &["visitor.*"]).await;
    let before = kyberhook::model::rfc3339(kyberhook::model::now_ms() - 1000);
    for i in 0..5 {
        e.event(&acc, "visitor.checked_in", json!({"i": i})).await;
        e.event(&acc, "user.login", json!({"i": i})).await;
    }
    ok.wait_for(10, WAIT).await;
    bad.wait_for(5, WAIT).await;
    let base = format!("/v1/accounts/{acc}/deliveries");
    // Wait until every attempt's outcome is recorded.
    e.poll(&format!("{base}?status=retrying"), WAIT, |v| count(v) == 5)
        .await;
    e.poll(&format!("{base}?status=delivered"), WAIT, |v| {
        count(v) == 10
    })
    .await;
    let (s, v) = e.api.admin(Method::GET, &base, None).await;
    assert_eq!(s, StatusCode::OK);
    let all = v["data"].as_array().unwrap();
    assert_eq!(all.len(), 15);
    assert!(v["next_cursor"].is_null());
    let created: Vec<&str> = all.iter().map(|d| d["id"].as_str().unwrap()).collect();
    let mut sorted = created.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(created, sorted, "newest first");
    for d in all {
        for key in [
            "id",
            "webhook_id",
            "event_id",
            "event",
            "status",
            "attempt_count",
            "response_code",
            "response_time_ms",
            "created_at",
            "updated_at",
            "next_attempt_at",
        ] {
            assert!(d.get(key).is_some(), "{key} missing in {d}");
        }
    }

    let (_, v) = e
        .api
        .admin(Method::GET, &format!("{base}?status=delivered"), None)
        .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 10);
    let (_, v) = e
        .api
        .admin(Method::GET, &format!("{base}?status=retrying"), None)
        .await;
    let retrying = v["data"].as_array().unwrap();
    assert!(retrying
        .iter()
        .all(|d| d["response_code"] == 500 && d["next_attempt_at"].is_string()));
    let (_, v) = e
        .api
        .admin(Method::GET, &format!("{base}?event=user.login"), None)
        .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 5);
    let wh_bad = h_bad["id"].as_str().unwrap();
    let (_, v) = e
        .api
        .admin(Method::GET, &format!("{base}?webhook_id={wh_bad}"), None)
        .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 5);
    let wh_ok = h_ok["id"].as_str().unwrap();
    let (_, v) = e
        .api
        .admin(Method::GET, &format!("/v1/accounts/{acc}/webhooks/{wh_ok}/deliveries?event=visitor.checked_in&status=delivered"), None)
        .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 5);
    let (_, v) = e
        .api
        .admin(Method::GET, &format!("{base}?since={before}"), None)
        .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 15);
    let (_, v) = e
        .api
        .admin(Method::GET, &format!("{base}?until={before}"), None)
        .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 0);
    let future = kyberhook::model::rfc3339(kyberhook::model::now_ms() + 3_600_000);
    let (_, v) = e
        .api
        .admin(Method::GET, &format!("{base}?since={future}"), None)
        .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 0);

    // Paging: 4 + 4 + 4 + 3, no overlaps, same order as the full list.
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("{base}?limit=4&cursor={c}"),
            None => format!("{base}?limit=4"),
        };
        let (s, v) = e.api.admin(Method::GET, &q, None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        pages += 1;
        paged.extend(
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_string()),
        );
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 4);
    assert_eq!(paged, created);

    for q in [
        "status=nope",
        "since=yesterday",
        "limit=0",
        "limit=1001",
        "cursor=xyz",
        "event=nope.nope",
        "colour=red",
        "webhook_id=wh_0000000000000000",
    ] {
        let (s, v) = e.api.admin(Method::GET, &format!("{base}?{q}"), None).await;
        assert!(s.is_client_error(), "{q} -> {s} {v}");
        assert!(v["error"]["code"].is_string(), "{q}");
    }

    // The detail route: request headers and body, every attempt.
    let id = retrying[0]["id"].as_str().unwrap();
    let (s, v) = e
        .api
        .admin(Method::GET, &format!("{base}/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["request"]["headers"]["x-kyberaccess-delivery"], id);
    let body = v["request"]["body"].as_str().unwrap();
    let secret = h_bad["secret"].as_str().unwrap();
    let ts = v["request"]["headers"]["x-kyberaccess-timestamp"]
        .as_str()
        .unwrap();
    assert_eq!(
        v["request"]["headers"]["x-kyberaccess-signature"],
        expected_signature(secret, ts, body.as_bytes())
    );
    let attempts = v["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["number"], 1);
    assert_eq!(attempts[0]["response_code"], 500);
    assert_eq!(attempts[0]["response_body"], "answer 500");
    assert_eq!(attempts[0]["response_headers"]["x-receiver"], "test");
    assert!(attempts[0]["error"].as_str().unwrap().contains("500"));
    assert!(attempts[0]["response_time_ms"].is_u64());
    let (s, _) = e
        .api
        .admin(
            Method::GET,
            &format!("{base}/dlv_00000000000000000000000000000000"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    e.stop().await;
}

#[tokio::test]
async fn test_tool_and_manual_retry() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(&pki, "retry_schedule = [\"1h\"]", "").await;
    let (acc, _) = e.account("acc_tool", "starter").await;
    let hook = e.webhook(&acc, &rx.url, &["visitor.checked_in"]).await;
    let wh = hook["id"].as_str().unwrap();

    rx.script([Reply::Status(201)]);
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            &format!("/v1/accounts/{acc}/webhooks/{wh}/test"),
            Some(json!({"event": "emergency.lockdown_activated"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "delivered");
    assert_eq!(v["response_code"], 201);
    assert_eq!(v["response_body"], "answer 201");
    assert!(v["error"].is_null());
    assert!(v["response_time_ms"].is_u64());
    let got = rx.next(WAIT).await;
    assert_eq!(
        got.header("x-kyberaccess-event"),
        "emergency.lockdown_activated"
    );
    assert_eq!(
        got.header("x-kyberaccess-delivery"),
        v["delivery_id"].as_str().unwrap()
    );
    // The catalog's example of the type (GET /v1/event-types), under a test event id.
    assert!(got.json()["id"].as_str().unwrap().starts_with("evt_test_"));
    assert_eq!(got.json()["data"]["emergency"]["type"], "lockdown");
    assert_eq!(
        got.header("x-kyberaccess-signature"),
        expected_signature(
            hook["secret"].as_str().unwrap(),
            &got.header("x-kyberaccess-timestamp"),
            &got.body
        )
    );
    // Logged like any delivery.
    let (_, d) = e
        .api
        .admin(
            Method::GET,
            &format!(
                "/v1/accounts/{acc}/deliveries/{}",
                v["delivery_id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(d["status"], "delivered");
    assert_eq!(d["attempts"].as_array().unwrap().len(), 1);

    rx.script([Reply::Status(503)]);
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            &format!("/v1/accounts/{acc}/webhooks/{wh}/test"),
            Some(json!({"event": "visitor.checked_in"})),
        )
        .await;
    assert_eq!(
        (s, v["status"].as_str(), v["response_code"].as_u64()),
        (StatusCode::OK, Some("failed"), Some(503))
    );
    rx.next(WAIT).await;
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            &format!("/v1/accounts/{acc}/webhooks/{wh}/test"),
            Some(json!({"event": "nope.nope"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // A delivery that fails, then a manual retry: one more attempt now, same delivery id.
    rx.script([Reply::Status(500)]);
    e.event(&acc, "visitor.checked_in", json!({"k": "v"})).await;
    let first = rx.next(WAIT).await;
    let dlv = first.header("x-kyberaccess-delivery");
    e.wait_delivery(&acc, &dlv, WAIT, |d| d["status"] == "retrying")
        .await;
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            &format!("/v1/accounts/{acc}/deliveries/{dlv}/retry"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let second = rx.next(WAIT).await;
    assert_eq!(second.header("x-kyberaccess-delivery"), dlv);
    assert_eq!(second.body, first.body);
    let d = e
        .wait_delivery(&acc, &dlv, WAIT, |d| d["status"] == "delivered")
        .await;
    assert_eq!(d["attempt_count"], 2);
    assert!(d["next_attempt_at"].is_null());
    let codes: Vec<u64> = d["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["response_code"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, vec![500, 200]);
    // The superseded 1 h retry will not fire again; a retry of a delivered delivery is allowed.
    let (s, _) = e
        .api
        .admin(
            Method::POST,
            &format!("/v1/accounts/{acc}/deliveries/dlv_00000000000000000000000000000000/retry"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    e.stop().await;
}

#[tokio::test]
async fn deleting_a_webhook_or_account_deletes_its_history() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(&pki, "", "").await;
    let (acc, key) = e.account("acc_del", "enterprise").await;
    let h1 = e.webhook(&acc, &rx.url, &["*"]).await;
    let h2 = e.webhook(&acc, &rx.url, &["*"]).await;
    for _ in 0..3 {
        e.event(&acc, "user.login", json!({})).await;
    }
    rx.wait_for(6, WAIT).await;
    let base = format!("/v1/accounts/{acc}/deliveries");
    e.poll(&format!("{base}?status=delivered"), WAIT, |v| count(v) == 6)
        .await;
    let (_, v) = e.api.admin(Method::GET, &base, None).await;
    let one_of_h1 = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["webhook_id"] == h1["id"])
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let wh1 = h1["id"].as_str().unwrap();
    let (s, _) = e
        .api
        .admin(
            Method::DELETE,
            &format!("/v1/accounts/{acc}/webhooks/{wh1}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, v) = e.api.admin(Method::GET, &base, None).await;
    let left = v["data"].as_array().unwrap();
    assert_eq!(left.len(), 3);
    assert!(left.iter().all(|d| d["webhook_id"] == h2["id"]));
    let (s, _) = e
        .api
        .admin(Method::GET, &format!("{base}/{one_of_h1}"), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, _) = e
        .api
        .admin(Method::DELETE, &format!("/v1/accounts/{acc}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = e.api.admin(Method::GET, &base, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = e
        .api
        .call(
            Method::GET,
            &format!("/v1/accounts/{acc}/webhooks"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Re-created with the same id, it starts empty.
    e.account("acc_del", "enterprise").await;
    let (s, v) = e.api.admin(Method::GET, &base, None).await;
    assert_eq!(
        (s, v["data"].as_array().unwrap().len()),
        (StatusCode::OK, 0)
    );
    let (_, v) = e
        .api
        .admin(Method::GET, &format!("/v1/accounts/{acc}/webhooks"), None)
        .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 0);
    e.stop().await;
}

#[tokio::test]
async fn acknowledged_events_are_delivered_after_a_restart() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    // The endpoint is down at first: every first attempt fails and waits for its retry.
    rx.set_default(Reply::Status(503));
    let mut e = TestEngine::start(&pki, "retry_schedule = [\"1s\", \"1s\", \"1s\"]", "").await;
    let (acc, _) = e.account("acc_restart", "enterprise").await;
    e.webhook(&acc, &rx.url, &["*"]).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(e.event(&acc, "user.login", json!({"i": i})).await);
    }
    rx.wait_for(20, WAIT).await;
    e.restart().await;
    rx.set_default(Reply::Status(200));
    e.poll(
        &format!("/v1/accounts/{acc}/deliveries?status=delivered&limit=100"),
        WAIT,
        |v| count(v) == 20,
    )
    .await;
    let delivered: std::collections::HashSet<String> = rx
        .log
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap().to_string())
        .collect();
    for id in &ids {
        assert!(delivered.contains(id), "{id} never arrived");
    }
    e.stop().await;
}
