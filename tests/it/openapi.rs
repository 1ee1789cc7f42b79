//! The API reference (`docs/openapi.json`, served at `GET /v1/openapi.json`) against the
//! router: the same routes both ways, every route of the router's table served by a real
//! engine, and the document valid OpenAPI 3.1 by PyPI's `openapi-spec-validator`.
//!
//! The validator is installed on first use (tests/it/tools.rs, under target/test-tools/);
//! when it cannot be had the validation test fails, unless `KYBERHOOK_SKIP_OPENAPI_VALIDATOR=1`
//! says to skip it.

use crate::common;
use crate::tools;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use http::{Method, StatusCode};
use kyberhook::api::{OPENAPI_JSON, ROUTES};
use serde_json::{json, Value};

/// Routes of the contract's second round whose handlers other engineers are landing this
/// session: documented already, allowed to be missing from the router until they land. Once
/// one is in `ROUTES`, this test says to remove it here.
const PENDING: &[(&str, &str)] = &[];

fn document() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let text = std::fs::read_to_string(path).unwrap();
    assert_eq!(text, OPENAPI_JSON, "the binary embeds docs/openapi.json");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in [
            "get", "put", "post", "delete", "options", "head", "patch", "trace",
        ] {
            if item.get(method).is_some() {
                routes.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    routes
}

fn owned(routes: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    routes
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect()
}

#[test]
fn the_document_names_exactly_the_routes_the_router_serves() {
    let documented = documented_routes(&document());
    let served = owned(ROUTES);
    let pending = owned(PENDING);
    let landed: Vec<_> = pending.intersection(&served).collect();
    assert!(
        landed.is_empty(),
        "{landed:?} landed in api::ROUTES: remove it from PENDING in tests/openapi.rs"
    );
    let undocumented: Vec<_> = served.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "served but missing from docs/openapi.json: {undocumented:?}"
    );
    let unserved: Vec<_> = documented
        .difference(&served)
        .filter(|r| !pending.contains(*r))
        .collect();
    assert!(
        unserved.is_empty(),
        "in docs/openapi.json but not served (api::ROUTES): {unserved:?}"
    );
}

/// A concrete path for a pattern: ids that parse but name nothing.
fn concrete(pattern: &str) -> String {
    pattern
        .replace("{account_id}", "acc_probe")
        .replace("{webhook_id}", "wh_00000000000000ff")
        .replace("{delivery_id}", "dlv_00000000000000ff00000000000000ff")
}

#[tokio::test]
async fn every_route_in_the_table_is_served_and_nothing_else() {
    let pki = pki();
    let e = TestEngine::start(&pki, "", "").await;
    // /readyz is 503 until recovery is done; probe once it is.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !e.engine.as_ref().unwrap().is_ready() {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for (method, pattern) in ROUTES {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let path = concrete(pattern);
        let (status, body) = e.api.admin(method.clone(), &path, Some(json!({}))).await;
        let code = body["error"]["code"].as_str().unwrap_or("");
        assert!(
            status != StatusCode::METHOD_NOT_ALLOWED && code != "not_found",
            "{method} {pattern} is in api::ROUTES but not served: {status} {body}"
        );
        assert!(
            !status.is_server_error(),
            "{method} {path}: {status} {body}"
        );
    }

    // What is not in the table is refused with the contract's errors.
    let (s, v) = e.api.admin(Method::PUT, "/v1/accounts", None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{v}");
    assert_eq!(v["error"]["code"], "method_not_allowed");
    let (s, v) = e.api.admin(Method::GET, "/v1/nothing/here", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "not_found");

    // Every field an answer carries is documented, and every required field is there.
    let doc = document();
    let (s, account) = e
        .api
        .admin(
            Method::POST,
            "/v1/accounts",
            Some(json!({"name": "docs", "plan": "starter", "id": "acc_docs"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{account}");
    conforms(&doc, "Account", &account, &["api_key"]);
    let (s, hook) = e
        .api
        .admin(
            Method::POST,
            "/v1/accounts/acc_docs/webhooks",
            Some(json!({"name": "docs", "url": "https://docs.invalid/hook", "events": ["*"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{hook}");
    conforms(&doc, "Webhook", &hook, &["secret"]);
    e.event("acc_docs", "visitor.checked_in", json!({"n": 1}))
        .await;
    let list = e
        .poll(
            "/v1/accounts/acc_docs/deliveries",
            std::time::Duration::from_secs(10),
            |v| count(v) == 1,
        )
        .await;
    conforms(&doc, "Delivery", &list["data"][0], &[]);
    let (s, types) = e.api.admin(Method::GET, "/v1/event-types", None).await;
    assert_eq!(s, StatusCode::OK);
    conforms(&doc, "EventType", &types["data"][0], &[]);

    // The document is served as it is in the repository, to any valid token only.
    let (s, served) = e.api.admin(Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(served, document());
    let (s, _) = e
        .api
        .call(Method::GET, "/v1/openapi.json", None, None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    e.stop().await;
}

/// `value`'s fields are all properties of the document's schema `name` (or `extra`), and the
/// schema's required fields are all in `value`.
fn conforms(doc: &Value, name: &str, value: &Value, extra: &[&str]) {
    let schema = &doc["components"]["schemas"][name];
    let props = schema["properties"].as_object().expect("schema properties");
    let object = value.as_object().expect("a JSON object");
    for key in object.keys() {
        assert!(
            props.contains_key(key) || extra.contains(&key.as_str()),
            "{name}: the API returns {key:?}, docs/openapi.json does not document it"
        );
    }
    for key in schema["required"].as_array().into_iter().flatten() {
        let key = key.as_str().unwrap();
        assert!(
            object.contains_key(key),
            "{name}: docs/openapi.json requires {key:?}, the API does not return it: {value}"
        );
    }
}

#[test]
fn the_document_is_valid_openapi_3_1() {
    let Some(mut validator) = tools::python_with("openapi-spec-validator") else {
        return;
    };
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let out = validator
        .args(["-m", "openapi_spec_validator"])
        .arg(&path)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "openapi-spec-validator refused docs/openapi.json:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
