use crate::common;
use common::*;

use std::collections::BTreeSet;

use http::{Method, StatusCode};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Any valid https URL: these tests never send events, so nothing is ever called.
const URL: &str = "https://hooks.example.com/kyber";

const WEBHOOK_FIELDS: [&str; 18] = [
    "id",
    "account_id",
    "name",
    "url",
    "description",
    "events",
    "ip_allowlist",
    "status",
    "disabled_reason",
    "consecutive_failures",
    "signature_scheme",
    "ordering",
    "max_concurrency",
    "concurrency_limit",
    "backlog",
    "secret_rotation_ends_at",
    "created_at",
    "updated_at",
];

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not a JSON object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Asserts the status and the contract's error body `{"error": {"code", "message"}}`.
#[track_caller]
fn assert_error(got: (StatusCode, Value), status: StatusCode, code: &str) {
    let (s, v) = got;
    assert_eq!(s, status, "expected {status} {code}, got {s}: {v}");
    assert_eq!(keys(&v), set(&["error"]), "error body: {v}");
    assert_eq!(
        keys(&v["error"]),
        set(&["code", "message"]),
        "error body: {v}"
    );
    assert_eq!(v["error"]["code"], code, "error body: {v}");
    let message = v["error"]["message"].as_str().expect("message is a string");
    assert!(!message.is_empty(), "empty error message: {v}");
}

/// Asserts an error status with the contract's error shape, whatever its code.
#[track_caller]
fn assert_error_status(got: (StatusCode, Value), status: StatusCode) {
    let (s, v) = got;
    assert_eq!(s, status, "expected {status}, got {s}: {v}");
    let code = v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code: {v}"));
    assert!(
        !code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
        "error code is not snake_case: {v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

#[track_caller]
fn assert_time(v: &Value) {
    let text = v
        .as_str()
        .unwrap_or_else(|| panic!("not a time string: {v}"));
    assert!(text.ends_with('Z'), "not UTC: {text}");
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("not RFC 3339 ({e}): {text}"));
}

#[track_caller]
fn assert_webhook_shape(v: &Value) {
    assert_eq!(keys(v), set(&WEBHOOK_FIELDS), "webhook fields: {v}");
    assert!(v["id"].as_str().unwrap().starts_with("wh_"), "{v}");
    assert_time(&v["created_at"]);
    assert_time(&v["updated_at"]);
    assert!(v["consecutive_failures"].is_u64(), "{v}");
    assert!(
        v["events"].is_array() && v["ip_allowlist"].is_array(),
        "{v}"
    );
}

fn without_secret(v: &Value) -> Value {
    let mut v = v.clone();
    v.as_object_mut().unwrap().remove("secret");
    v
}

fn hooks_path(acc: &str) -> String {
    format!("/v1/accounts/{acc}/webhooks")
}

fn hook_path(acc: &str, hook: &Value) -> String {
    format!(
        "/v1/accounts/{acc}/webhooks/{}",
        hook["id"].as_str().unwrap()
    )
}

async fn create_hook(e: &TestEngine, token: &str, acc: &str, body: Value) -> (StatusCode, Value) {
    e.api
        .call(Method::POST, &hooks_path(acc), Some(token), Some(body))
        .await
}

fn hook_body(name: &str) -> Value {
    json!({"name": name, "url": URL, "events": ["visitor.checked_in"]})
}

async fn list_ids(e: &TestEngine, acc: &str, query: &str) -> (Vec<String>, Value) {
    let (s, v) = e
        .api
        .admin(Method::GET, &format!("{}{query}", hooks_path(acc)), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(keys(&v), set(&["data", "next_cursor"]), "{v}");
    let ids = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap().to_string())
        .collect();
    (ids, v)
}

async fn engine() -> TestEngine {
    TestEngine::start(&pki(), "", "").await
}

// ---------------------------------------------------------------------------------------------
// Probes, catalog, routing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn healthz_needs_no_auth_and_event_types_lists_the_catalog() {
    let e = engine().await;
    let (s, h, v) = e.api.raw(Method::GET, "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!({"status": "ok"}));
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));

    let (s, v) = e.api.admin(Method::GET, "/v1/event-types", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(keys(&v), set(&["data"]));
    // Objects since issue 14 (name, family, description, example); tests/semantics.rs checks
    // their content.
    let types: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(types.len(), 21, "{v}");
    for t in [
        "visitor.checked_in",
        "screening.watchlist_hit",
        "emergency.lockdown_activated",
        "settings.updated",
    ] {
        assert!(types.contains(&t), "{t} missing from {v}");
    }

    // The catalog needs a token; an account key may read it.
    assert_error(
        e.api.call(Method::GET, "/v1/event-types", None, None).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let (_, key) = e.account("acc_types", "starter").await;
    let (s, v2) = e
        .api
        .call(Method::GET, "/v1/event-types", Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v2, v);
    e.stop().await;
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405_in_json() {
    let e = engine().await;
    e.account("acc_r", "starter").await;
    for path in [
        "/nope",
        "/v1",
        "/v1/accounts/acc_r/nothing",
        "/v1/accounts/acc_r/webhooks/wh_1/secret/x",
    ] {
        let (s, h, v) = e.api.raw(Method::GET, path, Some(ADMIN), None).await;
        assert!(h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        assert_error((s, v), StatusCode::NOT_FOUND, "not_found");
    }
    for (method, path) in [
        (Method::DELETE, "/v1/event-types"),
        (Method::GET, "/v1/accounts"),
        (Method::PUT, "/v1/accounts/acc_r"),
        (Method::POST, "/v1/accounts/acc_r"),
        (Method::GET, "/v1/accounts/acc_r/api-key"),
        (Method::DELETE, "/v1/accounts/acc_r/webhooks"),
        (Method::GET, "/v1/events"),
        (
            Method::GET,
            "/v1/accounts/acc_r/webhooks/wh_0000000000000001/secret/rotate",
        ),
        (Method::POST, "/healthz"),
    ] {
        let (s, h, v) = e.api.raw(method.clone(), path, Some(ADMIN), None).await;
        assert!(
            h["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{method} {path}"
        );
        assert_error((s, v), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    }
    e.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Accounts
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn account_create_returns_the_account_and_its_key_once() {
    let e = engine().await;
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            "/v1/accounts",
            Some(json!({"name": "Acme", "plan": "professional"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(
        keys(&v),
        set(&["id", "name", "plan", "created_at", "api_key"]),
        "{v}"
    );
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("acc_") && id.len() > 4, "{v}");
    assert_eq!(v["name"], "Acme");
    assert_eq!(v["plan"], "professional");
    assert_time(&v["created_at"]);
    let key = v["api_key"].as_str().unwrap();
    assert!(key.len() >= 16, "{v}");

    // GET shows the same account without the key.
    let (s, got) = e
        .api
        .admin(Method::GET, &format!("/v1/accounts/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{got}");
    assert_eq!(keys(&got), set(&["id", "name", "plan", "created_at"]));
    assert_eq!(got, without_key(&v));
    // The key works on the account's own routes.
    let (s, list) = e
        .api
        .call(Method::GET, &hooks_path(id), Some(key), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{list}");
    assert_eq!(list, json!({"data": [], "next_cursor": null}));

    // An operator-chosen id, every plan.
    for (i, plan) in ["starter", "professional", "enterprise"].iter().enumerate() {
        let want = format!("acc_custom{i}");
        let (s, v) = e
            .api
            .admin(
                Method::POST,
                "/v1/accounts",
                Some(json!({"name": "X", "plan": plan, "id": want})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(v["id"], want.as_str());
        assert_eq!(v["plan"], *plan);
    }
    // Two accounts never share a key.
    let (_, k1) = e.account("acc_k1", "starter").await;
    let (_, k2) = e.account("acc_k2", "starter").await;
    assert_ne!(k1, k2);
    e.stop().await;
}

fn without_key(v: &Value) -> Value {
    let mut v = v.clone();
    v.as_object_mut().unwrap().remove("api_key");
    v
}

#[tokio::test]
async fn account_create_rejects_bad_input() {
    let e = engine().await;
    e.account("acc_dup", "starter").await;
    let post = |body: Value| e.api.admin(Method::POST, "/v1/accounts", Some(body));
    assert_error(
        post(json!({"name": "again", "plan": "enterprise", "id": "acc_dup"})).await,
        StatusCode::CONFLICT,
        "account_exists",
    );
    assert_error(
        post(json!({"name": "n", "plan": "platinum"})).await,
        StatusCode::BAD_REQUEST,
        "invalid_plan",
    );
    assert_error_status(
        post(json!({"plan": "starter"})).await,
        StatusCode::BAD_REQUEST,
    );
    assert_error_status(post(json!({"name": "n"})).await, StatusCode::BAD_REQUEST);
    assert_error_status(
        post(json!({"name": "", "plan": "starter"})).await,
        StatusCode::BAD_REQUEST,
    );
    assert_error_status(
        post(json!({"name": "n", "plan": "starter", "colour": "red"})).await,
        StatusCode::BAD_REQUEST,
    );
    assert_error_status(
        post(json!({"name": 42, "plan": "starter"})).await,
        StatusCode::BAD_REQUEST,
    );
    assert_error_status(
        post(json!({"name": "n", "plan": ["starter"]})).await,
        StatusCode::BAD_REQUEST,
    );
    assert_error_status(
        post(json!({"name": "n", "plan": "starter", "id": "has space"})).await,
        StatusCode::BAD_REQUEST,
    );
    assert_error_status(post(json!(["name", "plan"])).await, StatusCode::BAD_REQUEST);

    let raw = |body: &'static [u8]| {
        e.api.raw(
            Method::POST,
            "/v1/accounts",
            Some(ADMIN),
            Some(body.to_vec()),
        )
    };
    for body in [
        &b"{\"name\": \"n\", \"plan\": "[..],
        b"not json",
        b"{\"name\":\"n\",\"plan\":\"starter\"} trailing",
        b"",
    ] {
        let (s, _, v) = raw(body).await;
        assert_error_status((s, v), StatusCode::BAD_REQUEST);
    }
    let (s, _, v) = raw(b"{oops").await;
    assert_error((s, v), StatusCode::BAD_REQUEST, "invalid_json");
    let (s, _, v) = e
        .api
        .raw(Method::POST, "/v1/accounts", Some(ADMIN), None)
        .await;
    assert_error_status((s, v), StatusCode::BAD_REQUEST);

    // None of those created anything: the duplicate still has its original plan.
    let (s, v) = e.api.admin(Method::GET, "/v1/accounts/acc_dup", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["plan"], "starter");
    assert_eq!(v["name"], "acc_dup");
    assert_error(
        e.api
            .admin(Method::GET, "/v1/accounts/acc_missing", None)
            .await,
        StatusCode::NOT_FOUND,
        "account_not_found",
    );
    e.stop().await;
}

#[tokio::test]
async fn account_patch_changes_name_and_plan() {
    let e = engine().await;
    let (acc, key) = e.account("acc_p", "starter").await;
    let path = format!("/v1/accounts/{acc}");
    let (_, before) = e.api.admin(Method::GET, &path, None).await;

    let (s, v) = e
        .api
        .admin(Method::PATCH, &path, Some(json!({"name": "Renamed Inc"})))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(keys(&v), set(&["id", "name", "plan", "created_at"]));
    assert_eq!(v["name"], "Renamed Inc");
    assert_eq!(v["plan"], "starter");
    assert_eq!(v["created_at"], before["created_at"]);

    let (s, v) = e
        .api
        .admin(Method::PATCH, &path, Some(json!({"plan": "enterprise"})))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["plan"], "enterprise");
    assert_eq!(v["name"], "Renamed Inc");
    let (s, got) = e.api.admin(Method::GET, &path, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got, v);

    let (s, v) = e
        .api
        .admin(
            Method::PATCH,
            &path,
            Some(json!({"name": "Both", "plan": "professional"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["name"].as_str(), v["plan"].as_str()),
        (Some("Both"), Some("professional"))
    );

    assert_error(
        e.api
            .admin(Method::PATCH, &path, Some(json!({"plan": "gold"})))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_plan",
    );
    assert_error_status(
        e.api
            .admin(Method::PATCH, &path, Some(json!({"id": "acc_other"})))
            .await,
        StatusCode::BAD_REQUEST,
    );
    assert_error_status(
        e.api
            .admin(Method::PATCH, &path, Some(json!({"name": 7})))
            .await,
        StatusCode::BAD_REQUEST,
    );
    assert_error_status(
        e.api
            .admin(Method::PATCH, &path, Some(json!({"name": ""})))
            .await,
        StatusCode::BAD_REQUEST,
    );
    let (s, _, v) = e
        .api
        .raw(Method::PATCH, &path, Some(ADMIN), Some(b"{".to_vec()))
        .await;
    assert_error((s, v), StatusCode::BAD_REQUEST, "invalid_json");
    // Failed patches changed nothing.
    let (_, got) = e.api.admin(Method::GET, &path, None).await;
    assert_eq!(
        (got["name"].as_str(), got["plan"].as_str()),
        (Some("Both"), Some("professional"))
    );

    assert_error(
        e.api
            .admin(
                Method::PATCH,
                "/v1/accounts/acc_nobody",
                Some(json!({"name": "x"})),
            )
            .await,
        StatusCode::NOT_FOUND,
        "account_not_found",
    );
    // Accounts are admin business.
    assert_error(
        e.api
            .call(
                Method::PATCH,
                &path,
                Some(&key),
                Some(json!({"plan": "enterprise"})),
            )
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    e.stop().await;
}

#[tokio::test]
async fn a_plan_change_lifts_the_webhook_limit_at_once() {
    let e = engine().await;
    let (acc, key) = e.account("acc_limit", "starter").await;
    for i in 0..3 {
        let (s, v) = create_hook(&e, &key, &acc, hook_body(&format!("h{i}"))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    assert_error(
        create_hook(&e, &key, &acc, hook_body("h3")).await,
        StatusCode::FORBIDDEN,
        "plan_limit_reached",
    );
    assert_error(
        create_hook(&e, ADMIN, &acc, hook_body("h3")).await,
        StatusCode::FORBIDDEN,
        "plan_limit_reached",
    );
    let (ids, _) = list_ids(&e, &acc, "").await;
    assert_eq!(ids.len(), 3);

    let (s, v) = e
        .api
        .admin(
            Method::PATCH,
            &format!("/v1/accounts/{acc}"),
            Some(json!({"plan": "professional"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["plan"], "professional");
    let (s, v) = create_hook(&e, &key, &acc, hook_body("h3")).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["name"], "h3");
    let (ids, _) = list_ids(&e, &acc, "").await;
    assert_eq!(ids.len(), 4);

    // Deleting one frees a slot on a full plan; downgrading below the count blocks new ones.
    let (s, v) = e
        .api
        .admin(
            Method::PATCH,
            &format!("/v1/accounts/{acc}"),
            Some(json!({"plan": "starter"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_error(
        create_hook(&e, &key, &acc, hook_body("h4")).await,
        StatusCode::FORBIDDEN,
        "plan_limit_reached",
    );
    let (s, _) = e
        .api
        .admin(
            Method::DELETE,
            &format!("{}/{}", hooks_path(&acc), ids[0]),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = e
        .api
        .admin(
            Method::DELETE,
            &format!("{}/{}", hooks_path(&acc), ids[1]),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = create_hook(&e, &key, &acc, hook_body("h5")).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    e.stop().await;
}

#[tokio::test]
async fn account_delete_cascades_and_revokes_the_key() {
    let e = engine().await;
    let (acc, key) = e.account("acc_del", "professional").await;
    let (other, other_key) = e.account("acc_keep", "starter").await;
    let h1 = e.webhook(&acc, URL, &["*"]).await;
    let _h2 = e.webhook(&acc, URL, &["emergency.*"]).await;
    let kept = e.webhook(&other, URL, &["*"]).await;
    let path = format!("/v1/accounts/{acc}");

    assert_error(
        e.api.call(Method::DELETE, &path, Some(&key), None).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let (s, _, v) = e.api.raw(Method::DELETE, &path, Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(v, Value::Null, "a 204 has no body");

    assert_error(
        e.api.admin(Method::GET, &path, None).await,
        StatusCode::NOT_FOUND,
        "account_not_found",
    );
    assert_error(
        e.api.admin(Method::DELETE, &path, None).await,
        StatusCode::NOT_FOUND,
        "account_not_found",
    );
    assert_error_status(
        e.api.admin(Method::GET, &hooks_path(&acc), None).await,
        StatusCode::NOT_FOUND,
    );
    assert_error_status(
        e.api.admin(Method::GET, &hook_path(&acc, &h1), None).await,
        StatusCode::NOT_FOUND,
    );
    assert_error(
        e.api
            .call(Method::GET, &hooks_path(&acc), Some(&key), None)
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        e.api
            .call(Method::GET, "/v1/event-types", Some(&key), None)
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );

    // The other account is untouched.
    let (s, v) = e
        .api
        .call(
            Method::GET,
            &hook_path(&other, &kept),
            Some(&other_key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, without_secret(&kept));

    // Re-creating the id starts from nothing: the old webhooks are really gone.
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            "/v1/accounts",
            Some(json!({"name": "again", "plan": "starter", "id": acc})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (ids, _) = list_ids(&e, &acc, "").await;
    assert!(ids.is_empty(), "old webhooks survived the account: {ids:?}");
    assert_error_status(
        e.api.admin(Method::GET, &hook_path(&acc, &h1), None).await,
        StatusCode::NOT_FOUND,
    );
    assert_error(
        e.api
            .call(Method::GET, &hooks_path(&acc), Some(&key), None)
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let new_key = v["api_key"].as_str().unwrap();
    assert_ne!(new_key, key);
    let (s, _) = e
        .api
        .call(Method::GET, &hooks_path(&acc), Some(new_key), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    e.stop().await;
}

#[tokio::test]
async fn api_key_rotation_revokes_the_old_key() {
    let e = engine().await;
    let (acc, old) = e.account("acc_rot", "starter").await;
    let hook = e.webhook(&acc, URL, &["*"]).await;
    let rotate = format!("/v1/accounts/{acc}/api-key");

    assert_error(
        e.api.call(Method::POST, &rotate, Some(&old), None).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let (s, v) = e.api.admin(Method::POST, &rotate, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(keys(&v), set(&["api_key"]));
    let new = v["api_key"].as_str().unwrap().to_string();
    assert_ne!(new, old);

    assert_error(
        e.api
            .call(Method::GET, &hooks_path(&acc), Some(&old), None)
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let (s, v) = e
        .api
        .call(Method::GET, &hook_path(&acc, &hook), Some(&new), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, without_secret(&hook));

    // Rotating again revokes the second key too.
    let (s, v) = e.api.admin(Method::POST, &rotate, None).await;
    assert_eq!(s, StatusCode::OK);
    let third = v["api_key"].as_str().unwrap();
    assert_error(
        e.api
            .call(Method::GET, &hooks_path(&acc), Some(&new), None)
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let (s, _) = e
        .api
        .call(Method::GET, &hooks_path(&acc), Some(third), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    // The account itself is unchanged.
    let (s, v) = e
        .api
        .admin(Method::GET, &format!("/v1/accounts/{acc}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (v["name"].as_str(), v["plan"].as_str()),
        (Some("acc_rot"), Some("starter"))
    );

    assert_error(
        e.api
            .admin(Method::POST, "/v1/accounts/acc_ghost/api-key", None)
            .await,
        StatusCode::NOT_FOUND,
        "account_not_found",
    );
    e.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Authentication and scoping
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_or_wrong_tokens_are_401() {
    let e = engine().await;
    let (acc, key) = e.account("acc_auth", "starter").await;
    let path = hooks_path(&acc);
    for token in [
        None,
        Some("wrong-token"),
        Some(""),
        Some("test-admin-token-x"),
        Some(&key[..key.len() - 1]),
    ] {
        assert_error(
            e.api.call(Method::GET, &path, token, None).await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        );
        assert_error(
            e.api
                .call(
                    Method::POST,
                    "/v1/accounts",
                    token,
                    Some(json!({"name": "n", "plan": "starter"})),
                )
                .await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        );
    }
    // Not a bearer token.
    let req = http::Request::get(format!("{}{path}", e.api.base))
        .header("authorization", format!("Basic {ADMIN}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // The admin token works.
    let (s, v) = e.api.admin(Method::GET, &path, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    e.stop().await;
}

#[tokio::test]
async fn an_account_key_reaches_only_its_own_webhook_routes() {
    let e = engine().await;
    let (a, key_a) = e.account("acc_a", "enterprise").await;
    let (b, key_b) = e.account("acc_b", "enterprise").await;
    let hook_b = e.webhook(&b, URL, &["*"]).await;

    // Every webhook route works with the account's own key.
    let (s, hook) = create_hook(&e, &key_a, &a, hook_body("mine")).await;
    assert_eq!(s, StatusCode::CREATED, "{hook}");
    assert_eq!(hook["account_id"], a.as_str());
    let p = hook_path(&a, &hook);
    let (s, v) = e
        .api
        .call(Method::GET, &hooks_path(&a), Some(&key_a), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["data"], json!([without_secret(&hook)]));
    let (s, v) = e.api.call(Method::GET, &p, Some(&key_a), None).await;
    assert_eq!((s, v), (StatusCode::OK, without_secret(&hook)));
    let (s, v) = e
        .api
        .call(Method::GET, &format!("{p}/secret"), Some(&key_a), None)
        .await;
    assert_eq!((s, v), (StatusCode::OK, json!({"secret": hook["secret"]})));
    let (s, v) = e
        .api
        .call(
            Method::POST,
            &format!("{p}/secret/rotate"),
            Some(&key_a),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_ne!(v["secret"], hook["secret"]);
    let (s, v) = e
        .api
        .call(
            Method::PATCH,
            &p,
            Some(&key_a),
            Some(json!({"name": "renamed"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["name"], "renamed");
    let (s, v) = e.api.call(Method::DELETE, &p, Some(&key_a), None).await;
    assert_eq!((s, v), (StatusCode::NO_CONTENT, Value::Null));

    // Another account's routes look like they do not exist.
    let pb = hook_path(&b, &hook_b);
    for (method, path, body) in [
        (Method::GET, hooks_path(&b), None),
        (Method::POST, hooks_path(&b), Some(hook_body("intruder"))),
        (Method::GET, pb.clone(), None),
        (Method::GET, format!("{pb}/secret"), None),
        (Method::POST, format!("{pb}/secret/rotate"), None),
        (Method::PATCH, pb.clone(), Some(json!({"status": "paused"}))),
        (Method::DELETE, pb.clone(), None),
        (Method::GET, format!("/v1/accounts/{b}"), None),
        (Method::GET, hooks_path("acc_does_not_exist"), None),
    ] {
        let got = e.api.call(method.clone(), &path, Some(&key_a), body).await;
        assert_error_status(got, StatusCode::NOT_FOUND);
    }
    // Nothing of B changed.
    let (s, v) = e.api.call(Method::GET, &pb, Some(&key_b), None).await;
    assert_eq!((s, v), (StatusCode::OK, without_secret(&hook_b)));
    let (_, v) = e
        .api
        .call(Method::GET, &format!("{pb}/secret"), Some(&key_b), None)
        .await;
    assert_eq!(v["secret"], hook_b["secret"]);
    let (ids, _) = list_ids(&e, &b, "").await;
    assert_eq!(ids, vec![hook_b["id"].as_str().unwrap().to_string()]);

    // Admin-only routes refuse an account key with 403.
    assert_error(
        e.api
            .call(
                Method::POST,
                "/v1/accounts",
                Some(&key_a),
                Some(json!({"name": "n", "plan": "starter"})),
            )
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        e.api
            .call(
                Method::POST,
                "/v1/events",
                Some(&key_a),
                Some(json!({"account_id": a, "event": "visitor.checked_in", "data": {}})),
            )
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        e.api
            .call(
                Method::POST,
                "/v1/events/batch",
                Some(&key_a),
                Some(json!({"events": [{"account_id": a, "event": "visitor.checked_in", "data": {}}]})),
            )
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    e.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Webhooks
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn webhook_create_returns_the_contract_object_and_a_secret() {
    let e = engine().await;
    let (acc, _) = e.account("acc_w", "enterprise").await;
    let body = json!({
        "name": "Front desk",
        "url": "https://hooks.example.com/a?x=1",
        "description": "desk feed",
        "events": ["visitor.checked_in", "emergency.*"],
        "ip_allowlist": ["203.0.113.0/24", "2001:db8::/32", "198.51.100.7"],
    });
    let (s, v) = create_hook(&e, ADMIN, &acc, body.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let mut want = set(&WEBHOOK_FIELDS);
    want.insert("secret".into());
    assert_eq!(keys(&v), want, "{v}");
    assert!(v["secret"].as_str().unwrap().starts_with("whsec_"), "{v}");
    assert!(
        v["secret"].as_str().unwrap().len() > "whsec_".len() + 16,
        "{v}"
    );
    let hook = without_secret(&v);
    assert_webhook_shape(&hook);
    assert_eq!(v["account_id"], acc.as_str());
    assert_eq!(v["name"], "Front desk");
    assert_eq!(v["url"], body["url"]);
    assert_eq!(v["description"], "desk feed");
    assert_eq!(v["events"], body["events"]);
    assert_eq!(v["ip_allowlist"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["status"], "active");
    assert_eq!(v["disabled_reason"], Value::Null);
    assert_eq!(v["consecutive_failures"], 0);
    assert_eq!(v["created_at"], v["updated_at"]);

    // Minimal body: optional fields default.
    let (s, m) = create_hook(
        &e,
        ADMIN,
        &acc,
        json!({"name": "min", "url": URL, "events": ["*"]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{m}");
    assert_webhook_shape(&without_secret(&m));
    assert_eq!(m["events"], json!(["*"]));
    assert_eq!(m["ip_allowlist"], json!([]));
    assert_eq!(m["description"], Value::Null);
    assert_ne!(m["id"], v["id"]);
    assert_ne!(m["secret"], v["secret"]);

    // Family wildcards of every family and exact names are accepted.
    for events in [
        json!(["emergency.*"]),
        json!(["*"]),
        json!(["visitor.*", "screening.*", "user.login"]),
        json!(["settings.updated"]),
    ] {
        let (s, h) = create_hook(
            &e,
            ADMIN,
            &acc,
            json!({"name": "w", "url": URL, "events": events}),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{h}");
        assert_eq!(h["events"], events);
    }
    e.stop().await;
}

#[tokio::test]
async fn webhook_create_rejects_bad_input() {
    let e = engine().await;
    let (acc, key) = e.account("acc_bad", "starter").await;
    let with = |field: &str, value: Value| {
        let mut b = hook_body("bad");
        b[field] = value;
        b
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            with("url", json!("http://hooks.example.com/x")),
            "invalid_url",
        ),
        (with("url", json!("not a url")), "invalid_url"),
        (with("url", json!("https://")), "invalid_url"),
        (
            with("url", json!("ftp://hooks.example.com/x")),
            "invalid_url",
        ),
        (with("url", json!("/relative/path")), "invalid_url"),
        (with("url", json!("")), "invalid_url"),
        (
            with("events", json!(["visitor.exploded"])),
            "invalid_events",
        ),
        (
            with("events", json!(["visitor.checked_in", "nope"])),
            "invalid_events",
        ),
        (with("events", json!(["nonsense.*"])), "invalid_events"),
        (with("events", json!(["visitor.**"])), "invalid_events"),
        (with("events", json!([])), "invalid_events"),
        (
            with("ip_allowlist", json!(["10.0.0.0/33"])),
            "invalid_ip_allowlist",
        ),
        (
            with("ip_allowlist", json!(["not-a-cidr"])),
            "invalid_ip_allowlist",
        ),
        (
            with("ip_allowlist", json!(["203.0.113.0/24", "300.1.1.1"])),
            "invalid_ip_allowlist",
        ),
        (with("name", json!("")), "invalid_name"),
    ];
    for (body, code) in cases {
        let got = create_hook(&e, &key, &acc, body.clone()).await;
        assert!(
            got.0 == StatusCode::BAD_REQUEST,
            "{body} -> {} {}",
            got.0,
            got.1
        );
        assert_error(got, StatusCode::BAD_REQUEST, code);
    }
    // Missing fields, unknown fields, wrong types, malformed JSON.
    for body in [
        json!({"url": URL, "events": ["*"]}),
        json!({"name": "n", "events": ["*"]}),
        json!({"name": "n", "url": URL}),
        with("secret", json!("whsec_mine")),
        with("status", json!("paused")),
        with("events", json!("visitor.checked_in")),
        with("url", json!(443)),
        with("ip_allowlist", json!("10.0.0.0/8")),
        with("description", json!(["d"])),
    ] {
        let got = create_hook(&e, &key, &acc, body.clone()).await;
        assert!(
            got.0 == StatusCode::BAD_REQUEST,
            "{body} -> {} {}",
            got.0,
            got.1
        );
        assert_error_status(got, StatusCode::BAD_REQUEST);
    }
    for raw in [&b"{\"name\":"[..], b"[1,2", b"", b"null"] {
        let (s, _, v) = e
            .api
            .raw(
                Method::POST,
                &hooks_path(&acc),
                Some(&key),
                Some(raw.to_vec()),
            )
            .await;
        assert_error_status((s, v), StatusCode::BAD_REQUEST);
    }
    // Under an unknown account.
    assert_error(
        create_hook(&e, ADMIN, "acc_none", hook_body("x")).await,
        StatusCode::NOT_FOUND,
        "account_not_found",
    );

    // Nothing was created, so the starter plan still has all three slots.
    let (ids, _) = list_ids(&e, &acc, "").await;
    assert!(ids.is_empty(), "{ids:?}");
    for i in 0..3 {
        let (s, v) = create_hook(&e, &key, &acc, hook_body(&format!("ok{i}"))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    e.stop().await;
}

#[tokio::test]
async fn http_urls_are_accepted_when_require_https_is_off() {
    let e = TestEngine::start(&pki(), "require_https = false", "").await;
    let (acc, _) = e.account("acc_http", "starter").await;
    let (s, v) = create_hook(
        &e,
        ADMIN,
        &acc,
        json!({"name": "h", "url": "http://hooks.example.com/x", "events": ["*"]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["url"], "http://hooks.example.com/x");
    assert_error(
        create_hook(
            &e,
            ADMIN,
            &acc,
            json!({"name": "h", "url": "ftp://hooks.example.com/x", "events": ["*"]}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_url",
    );
    e.stop().await;
}

#[tokio::test]
async fn webhook_list_is_newest_first_without_secrets_and_pages() {
    let e = engine().await;
    let (acc, key) = e.account("acc_list", "enterprise").await;
    let mut created = Vec::new();
    for i in 0..7 {
        let (s, v) = create_hook(&e, &key, &acc, hook_body(&format!("hook {i}"))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        created.push(v);
    }
    let newest_first: Vec<String> = created
        .iter()
        .rev()
        .map(|h| h["id"].as_str().unwrap().to_string())
        .collect();

    let (ids, v) = list_ids(&e, &acc, "").await;
    assert_eq!(ids, newest_first, "not newest first");
    assert_eq!(v["next_cursor"], Value::Null);
    for (item, made) in v["data"]
        .as_array()
        .unwrap()
        .iter()
        .zip(created.iter().rev())
    {
        assert!(
            item.get("secret").is_none(),
            "a list item shows its secret: {item}"
        );
        assert_webhook_shape(item);
        assert_eq!(*item, without_secret(made));
    }

    // Pages of 3: 3 + 3 + 1, cursors chain, and together they are the whole list.
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    let mut sizes = Vec::new();
    loop {
        let query = match &cursor {
            Some(c) => format!("?limit=3&cursor={c}"),
            None => "?limit=3".to_string(),
        };
        let (page, v) = list_ids(&e, &acc, &query).await;
        sizes.push(page.len());
        paged.extend(page);
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(sizes.len() < 10, "paging does not end");
    }
    assert_eq!(sizes, vec![3, 3, 1]);
    assert_eq!(paged, newest_first);

    // Exactly one full page: no further cursor.
    let (page, v) = list_ids(&e, &acc, "?limit=7").await;
    assert_eq!(page, newest_first);
    assert_eq!(v["next_cursor"], Value::Null);
    let (page, v) = list_ids(&e, &acc, "?limit=1").await;
    assert_eq!(page, newest_first[..1]);
    assert!(v["next_cursor"].is_string(), "{v}");
    let (page, _) = list_ids(&e, &acc, "?limit=1000").await;
    assert_eq!(page.len(), 7);

    for q in [
        "?limit=0",
        "?limit=1001",
        "?limit=-1",
        "?limit=ten",
        "?limit=",
        "?colour=red",
    ] {
        let got = e
            .api
            .admin(Method::GET, &format!("{}{q}", hooks_path(&acc)), None)
            .await;
        assert_error_status(got, StatusCode::BAD_REQUEST);
    }
    let got = e
        .api
        .admin(Method::GET, &format!("{}?limit=0", hooks_path(&acc)), None)
        .await;
    assert_error(got, StatusCode::BAD_REQUEST, "invalid_query");
    let got = e
        .api
        .admin(
            Method::GET,
            &format!("{}?cursor=garbage", hooks_path(&acc)),
            None,
        )
        .await;
    assert_error_status(got, StatusCode::BAD_REQUEST);
    e.stop().await;
}

#[tokio::test]
async fn paging_goes_on_when_the_cursor_webhook_is_deleted() {
    let e = engine().await;
    let (acc, _) = e.account("acc_cur", "professional").await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            e.webhook(&acc, URL, &["*"]).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    ids.reverse();
    let (page, v) = list_ids(&e, &acc, "?limit=2").await;
    assert_eq!(page, ids[..2]);
    let cursor = v["next_cursor"]
        .as_str()
        .expect("a next cursor")
        .to_string();
    // The last webhook of the page goes away before the next page is asked for.
    let (s, _) = e
        .api
        .admin(
            Method::DELETE,
            &format!("{}/{}", hooks_path(&acc), ids[1]),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (page, v) = list_ids(&e, &acc, &format!("?limit=2&cursor={cursor}")).await;
    assert_eq!(page, ids[2..4], "the page after a deleted cursor webhook");
    let cursor = v["next_cursor"]
        .as_str()
        .expect("a next cursor")
        .to_string();
    let (page, v) = list_ids(&e, &acc, &format!("?limit=2&cursor={cursor}")).await;
    assert_eq!(page, ids[4..]);
    assert_eq!(v["next_cursor"], Value::Null);
    e.stop().await;
}

#[tokio::test]
async fn webhook_get_secret_and_rotation() {
    let e = engine().await;
    let (acc, _) = e.account("acc_sec", "starter").await;
    let created = e.webhook(&acc, URL, &["visitor.*"]).await;
    let p = hook_path(&acc, &created);

    let (s, v) = e.api.admin(Method::GET, &p, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v.get("secret").is_none(), "GET shows the secret: {v}");
    assert_webhook_shape(&v);
    assert_eq!(v, without_secret(&created));

    let (s, v) = e.api.admin(Method::GET, &format!("{p}/secret"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"secret": created["secret"]}));

    let (s, rotated) = e
        .api
        .admin(Method::POST, &format!("{p}/secret/rotate"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{rotated}");
    assert_eq!(keys(&rotated), set(&["secret", "secret_rotation_ends_at"]));
    let new = rotated["secret"].as_str().unwrap();
    assert!(new.starts_with("whsec_"), "{rotated}");
    assert_ne!(rotated["secret"], created["secret"]);
    let (s, v) = e.api.admin(Method::GET, &format!("{p}/secret"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["secret"], new);

    // Rotation changes nothing else visible.
    let (_, after) = e.api.admin(Method::GET, &p, None).await;
    for f in ["id", "name", "url", "events", "status", "created_at"] {
        assert_eq!(after[f], created[f], "{f} changed on rotation");
    }
    // A second rotation differs again.
    let (_, again) = e
        .api
        .admin(Method::POST, &format!("{p}/secret/rotate"), None)
        .await;
    assert_ne!(again["secret"], rotated["secret"]);
    assert_ne!(again["secret"], created["secret"]);
    e.stop().await;
}

#[tokio::test]
async fn webhook_patch_updates_fields_and_status() {
    let e = engine().await;
    let (acc, _) = e.account("acc_patch", "starter").await;
    let created = e.webhook(&acc, URL, &["visitor.checked_in"]).await;
    let p = hook_path(&acc, &created);
    let patch = |body: Value| e.api.admin(Method::PATCH, &p, Some(body));

    // url change keeps the secret.
    let (s, v) = patch(json!({"url": "https://other.example.net/new"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_webhook_shape(&v);
    assert!(v.get("secret").is_none());
    assert_eq!(v["url"], "https://other.example.net/new");
    assert_eq!(v["id"], created["id"]);
    assert_eq!(v["created_at"], created["created_at"]);
    let updated = humantime::parse_rfc3339(v["updated_at"].as_str().unwrap()).unwrap();
    let born = humantime::parse_rfc3339(created["created_at"].as_str().unwrap()).unwrap();
    assert!(updated >= born);
    let (_, sec) = e.api.admin(Method::GET, &format!("{p}/secret"), None).await;
    assert_eq!(
        sec["secret"], created["secret"],
        "a url change replaced the secret"
    );

    // The other fields.
    let (s, v) = patch(json!({
        "name": "renamed",
        "description": "now described",
        "events": ["emergency.*", "*"],
        "ip_allowlist": ["192.0.2.0/24"],
    }))
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["name"], "renamed");
    assert_eq!(v["description"], "now described");
    assert_eq!(v["events"], json!(["emergency.*", "*"]));
    assert_eq!(v["ip_allowlist"], json!(["192.0.2.0/24"]));
    assert_eq!(
        v["url"], "https://other.example.net/new",
        "an untouched field changed"
    );
    let (_, got) = e.api.admin(Method::GET, &p, None).await;
    assert_eq!(got, v);

    // Pause and resume.
    let (s, v) = patch(json!({"status": "paused"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "paused");
    let (_, got) = e.api.admin(Method::GET, &p, None).await;
    assert_eq!(got["status"], "paused");
    let (ids, list) = list_ids(&e, &acc, "").await;
    assert_eq!(ids.len(), 1);
    assert_eq!(list["data"][0]["status"], "paused");
    let (s, v) = patch(json!({"status": "active"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "active");
    assert_eq!(v["disabled_reason"], Value::Null);
    assert_eq!(v["consecutive_failures"], 0);

    // Refused patches change nothing.
    let (_, before) = e.api.admin(Method::GET, &p, None).await;
    assert_error(
        patch(json!({"status": "disabled"})).await,
        StatusCode::BAD_REQUEST,
        "invalid_status",
    );
    assert_error(
        patch(json!({"status": "sleeping"})).await,
        StatusCode::BAD_REQUEST,
        "invalid_status",
    );
    assert_error(
        patch(json!({"url": "http://insecure.example.com/"})).await,
        StatusCode::BAD_REQUEST,
        "invalid_url",
    );
    assert_error(
        patch(json!({"url": "::not a url::"})).await,
        StatusCode::BAD_REQUEST,
        "invalid_url",
    );
    assert_error(
        patch(json!({"events": ["visitor.teleported"]})).await,
        StatusCode::BAD_REQUEST,
        "invalid_events",
    );
    assert_error(
        patch(json!({"ip_allowlist": ["1.2.3.4/99"]})).await,
        StatusCode::BAD_REQUEST,
        "invalid_ip_allowlist",
    );
    assert_error(
        patch(json!({"name": "   "})).await,
        StatusCode::BAD_REQUEST,
        "invalid_name",
    );
    assert_error_status(
        patch(json!({"secret": "whsec_mine"})).await,
        StatusCode::BAD_REQUEST,
    );
    assert_error_status(
        patch(json!({"consecutive_failures": 0})).await,
        StatusCode::BAD_REQUEST,
    );
    assert_error_status(
        patch(json!({"name": "ok", "bogus": true})).await,
        StatusCode::BAD_REQUEST,
    );
    assert_error_status(patch(json!({"status": 1})).await, StatusCode::BAD_REQUEST);
    assert_error_status(
        patch(json!({"events": "visitor.checked_in"})).await,
        StatusCode::BAD_REQUEST,
    );
    let (s, _, v) = e
        .api
        .raw(
            Method::PATCH,
            &p,
            Some(ADMIN),
            Some(b"{\"name\": ".to_vec()),
        )
        .await;
    assert_error((s, v), StatusCode::BAD_REQUEST, "invalid_json");
    let (_, after) = e.api.admin(Method::GET, &p, None).await;
    assert_eq!(after, before, "a refused PATCH changed the webhook");
    e.stop().await;
}

#[tokio::test]
async fn webhook_delete_and_unknown_ids_are_404() {
    let e = engine().await;
    let (acc, _) = e.account("acc_gone", "starter").await;
    let (other, _) = e.account("acc_else", "starter").await;
    let doomed = e.webhook(&acc, URL, &["*"]).await;
    let survivor = e.webhook(&acc, URL, &["*"]).await;
    let foreign = e.webhook(&other, URL, &["*"]).await;
    let p = hook_path(&acc, &doomed);

    let (s, _, v) = e.api.raw(Method::DELETE, &p, Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(v, Value::Null, "a 204 has no body");
    for (method, path, body) in [
        (Method::GET, p.clone(), None),
        (Method::DELETE, p.clone(), None),
        (Method::PATCH, p.clone(), Some(json!({"name": "x"}))),
        (Method::GET, format!("{p}/secret"), None),
        (Method::POST, format!("{p}/secret/rotate"), None),
    ] {
        assert_error(
            e.api.admin(method, &path, body).await,
            StatusCode::NOT_FOUND,
            "webhook_not_found",
        );
    }
    let (ids, _) = list_ids(&e, &acc, "").await;
    assert_eq!(ids, vec![survivor["id"].as_str().unwrap().to_string()]);

    // Ids that never existed or are not webhook ids.
    for id in [
        "wh_0000000000000000",
        "wh_ffffffffffffffff",
        "wh_nothex",
        "acc_gone",
        "x",
    ] {
        let path = format!("{}/{id}", hooks_path(&acc));
        assert_error(
            e.api.admin(Method::GET, &path, None).await,
            StatusCode::NOT_FOUND,
            "webhook_not_found",
        );
        assert_error(
            e.api.admin(Method::DELETE, &path, None).await,
            StatusCode::NOT_FOUND,
            "webhook_not_found",
        );
    }

    // Another account's webhook under the wrong account path: 404 even for the admin.
    let wrong = hook_path(&acc, &foreign);
    for (method, path, body) in [
        (Method::GET, wrong.clone(), None),
        (
            Method::PATCH,
            wrong.clone(),
            Some(json!({"status": "paused"})),
        ),
        (Method::GET, format!("{wrong}/secret"), None),
        (Method::POST, format!("{wrong}/secret/rotate"), None),
        (Method::DELETE, wrong.clone(), None),
    ] {
        assert_error(
            e.api.admin(method, &path, body).await,
            StatusCode::NOT_FOUND,
            "webhook_not_found",
        );
    }
    let (s, v) = e
        .api
        .admin(Method::GET, &hook_path(&other, &foreign), None)
        .await;
    assert_eq!((s, v), (StatusCode::OK, without_secret(&foreign)));
    let (_, v) = e
        .api
        .admin(
            Method::GET,
            &format!("{}/secret", hook_path(&other, &foreign)),
            None,
        )
        .await;
    assert_eq!(v["secret"], foreign["secret"]);
    e.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Body size
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn oversize_bodies_are_413_and_the_server_stays_healthy() {
    let e = engine().await;
    let (acc, key) = e.account("acc_big", "starter").await;
    assert_eq!(e.config.server.max_body_bytes, 65536);
    let big_name = "x".repeat(70_000);
    let cases: Vec<(&str, String, Vec<u8>)> = vec![
        (ADMIN, "/v1/accounts".into(), serde_json::to_vec(&json!({"name": big_name, "plan": "starter"})).unwrap()),
        (&key, hooks_path(&acc), serde_json::to_vec(&json!({"name": big_name, "url": URL, "events": ["*"]})).unwrap()),
        (
            ADMIN,
            "/v1/events".into(),
            serde_json::to_vec(&json!({"account_id": acc, "event": "visitor.checked_in", "data": {"blob": big_name}})).unwrap(),
        ),
        (ADMIN, "/v1/accounts".into(), vec![b'{'; 200_000]),
    ];
    for (token, path, body) in cases {
        let (s, h, v) = e
            .api
            .raw(Method::POST, &path, Some(token), Some(body))
            .await;
        assert!(h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        assert_error((s, v), StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    }
    // Just under the limit is parsed normally (here: refused for its name, not its size).
    let tail = r#""name":"","plan":"starter"}"#;
    let body = format!("{{{}{tail}", " ".repeat(65536 - 1 - tail.len())).into_bytes();
    assert_eq!(body.len(), 65536);
    let (s, _, v) = e
        .api
        .raw(Method::POST, "/v1/accounts", Some(ADMIN), Some(body))
        .await;
    assert_error((s, v), StatusCode::BAD_REQUEST, "invalid_name");

    let (s, v) = e.api.call(Method::GET, "/healthz", None, None).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"status": "ok"})));
    let (s, v) = create_hook(&e, &key, &acc, hook_body("after")).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (ids, _) = list_ids(&e, &acc, "").await;
    assert_eq!(ids.len(), 1, "an oversize create left something behind");
    e.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Persistence
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn accounts_webhooks_and_keys_survive_a_restart() {
    // The PKI's files must outlive the restart (the config names its CA file).
    let pki = pki();
    let mut e = TestEngine::start(&pki, "", "").await;
    let (a, old_key) = e.account("acc_persist", "starter").await;
    let (b, key_b) = e.account("acc_second", "enterprise").await;
    let h1 = e.webhook(&a, URL, &["visitor.*"]).await;
    let (s, h2) = create_hook(
        &e,
        ADMIN,
        &a,
        json!({"name": "full", "url": URL, "description": "d", "events": ["emergency.*"], "ip_allowlist": ["203.0.113.0/24"]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{h2}");
    let h3 = e.webhook(&a, URL, &["*"]).await;
    let hb = e.webhook(&b, URL, &["*"]).await;
    let deleted = e.webhook(&b, URL, &["*"]).await;
    let (s, _) = e
        .api
        .admin(Method::DELETE, &hook_path(&b, &deleted), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = e
        .api
        .admin(
            Method::PATCH,
            &hook_path(&a, &h1),
            Some(json!({"status": "paused"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, rotated) = e
        .api
        .admin(
            Method::POST,
            &format!("{}/secret/rotate", hook_path(&a, &h3)),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = e
        .api
        .admin(
            Method::PATCH,
            &format!("/v1/accounts/{b}"),
            Some(json!({"name": "Second Ltd"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = e
        .api
        .admin(Method::POST, &format!("/v1/accounts/{a}/api-key"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let new_key = v["api_key"].as_str().unwrap().to_string();

    // Everything the API shows, before.
    let snapshot = |e: &TestEngine| {
        let api = e.api.clone();
        let (a, b) = (a.clone(), b.clone());
        let hooks = [
            (a.clone(), h1.clone()),
            (a.clone(), h2.clone()),
            (a.clone(), h3.clone()),
            (b.clone(), hb.clone()),
        ];
        async move {
            let mut out = Vec::new();
            for acc in [&a, &b] {
                out.push(
                    api.admin(Method::GET, &format!("/v1/accounts/{acc}"), None)
                        .await,
                );
                out.push(api.admin(Method::GET, &hooks_path(acc), None).await);
            }
            for (acc, h) in &hooks {
                out.push(api.admin(Method::GET, &hook_path(acc, h), None).await);
                out.push(
                    api.admin(Method::GET, &format!("{}/secret", hook_path(acc, h)), None)
                        .await,
                );
            }
            out
        }
    };
    let before = snapshot(&e).await;
    assert!(
        before.iter().all(|(s, _)| *s == StatusCode::OK),
        "{before:?}"
    );

    e.restart().await;

    let after = snapshot(&e).await;
    assert_eq!(
        after, before,
        "the API shows something else after a restart"
    );
    // Spot checks of what the snapshot holds.
    assert_eq!(after[0].1["plan"], "starter");
    assert_eq!(after[2].1["name"], "Second Ltd");
    assert_eq!(after[1].1["data"].as_array().unwrap().len(), 3);
    assert_eq!(after[3].1["data"].as_array().unwrap().len(), 1);
    assert_eq!(after[4].1["status"], "paused");
    assert_eq!(after[7].1["secret"], h2["secret"]);
    assert_eq!(after[9].1["secret"], rotated["secret"]);
    assert_eq!(after[11].1["secret"], hb["secret"]);

    // Keys: the rotated-out one stays revoked, the current ones work.
    assert_error(
        e.api
            .call(Method::GET, &hooks_path(&a), Some(&old_key), None)
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let (s, v) = e
        .api
        .call(Method::GET, &hooks_path(&a), Some(&new_key), None)
        .await;
    assert_eq!((s, &v), (StatusCode::OK, &before[1].1));
    let (s, _) = e
        .api
        .call(Method::GET, &hooks_path(&b), Some(&key_b), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_error_status(
        e.api
            .call(Method::GET, &hooks_path(&b), Some(&new_key), None)
            .await,
        StatusCode::NOT_FOUND,
    );
    // The deleted webhook stays deleted, the plan limit still holds, ids still conflict.
    assert_error(
        e.api
            .admin(Method::GET, &hook_path(&b, &deleted), None)
            .await,
        StatusCode::NOT_FOUND,
        "webhook_not_found",
    );
    assert_error(
        create_hook(&e, &new_key, &a, hook_body("fourth")).await,
        StatusCode::FORBIDDEN,
        "plan_limit_reached",
    );
    assert_error(
        e.api
            .admin(
                Method::POST,
                "/v1/accounts",
                Some(json!({"name": "x", "plan": "starter", "id": a})),
            )
            .await,
        StatusCode::CONFLICT,
        "account_exists",
    );
    e.stop().await;
}
