//! Delivery semantics a receiver observes (issue 14): bodies every guide verifier accepts,
//! whatever the producer's JSON spelling; Standard Webhooks signatures checked by the official
//! libraries; secret rotation with a grace period; the readable event catalog.
//!
//! Every test delivers to real local HTTPS receivers; the verifiers are the guide's own code
//! (tests/verifiers/) and the Standard Webhooks reference libraries, run with node and python3.

use crate::common;
use crate::tools;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

/// Runs a verifier script (under tests/verifiers/) with `program` over `items` on stdin; returns
/// (success, stdout + stderr).
fn run_script(program: &str, script: &str, items: &Value) -> (bool, String) {
    let path = format!("{}/tests/verifiers/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut child = tools::command(program)
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} must be installed to run {script}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(items.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Posts one event with `data` spelled exactly as given (not re-serialised by the test).
async fn post_raw_event(e: &TestEngine, account: &str, event: &str, data: &str) {
    let body = format!(r#"{{"account_id":"{account}","event":"{event}","data":{data}}}"#);
    let (s, _, v) = e
        .api
        .raw(
            Method::POST,
            "/v1/events",
            Some(ADMIN),
            Some(body.into_bytes()),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{data}: {v}");
}

/// The `data` part of a delivered body.
fn data_of(body: &str) -> &str {
    let start = body.find(",\"data\":").unwrap() + 8;
    let end = body.rfind(",\"account_id\":").unwrap();
    &body[start..end]
}

/// Producer bodies that used to fail the guide's Node verifier (which checks
/// `JSON.stringify(req.body)`), with what `data` must look like on the wire.
fn awkward_corpus() -> Vec<(String, Option<&'static str>)> {
    let deep = format!("{}1{}", "{\"a\":[".repeat(31), "]}".repeat(31));
    vec![
        // Python's default json.dumps: non-ASCII and emoji as \u escapes.
        (
            r#"{"name": "Zo\u00eb", "city": "M\u00fcnchen", "mood": "\ud83d\ude00", "cjk": "\u6771\u4eac"}"#.into(),
            Some(r#"{"name":"Zoë","city":"München","mood":"😀","cjk":"東京"}"#),
        ),
        // Floats and exponents as other languages print them.
        (
            r#"{"a": 1.0, "b": 1E3, "c": 2.50, "d": -0, "e": 1e-7, "f": 0.1, "g": 1e21, "h": 5e-324, "i": -0.0, "j": 1.7976931348623157e308, "k": 100E-2}"#.into(),
            Some(r#"{"a":1,"b":1000,"c":2.5,"d":0,"e":1e-7,"f":0.1,"g":1e+21,"h":5e-324,"i":0,"j":1.7976931348623157e+308,"k":1}"#),
        ),
        // Integers beyond 2^53 travel as JavaScript reads them.
        (
            r#"{"id": 12345678901234567890, "n": 9007199254740993, "m": -9007199254740993, "ok": 9007199254740991}"#.into(),
            Some(r#"{"id":12345678901234567000,"n":9007199254740992,"m":-9007199254740992,"ok":9007199254740991}"#),
        ),
        // Escapes JSON.stringify does not write, and ones it does.
        (
            r#"{"s": "a\/b \u0041 \t \u001F \u007f \"q\" \\ \u2028"}"#.into(),
            Some("{\"s\":\"a/b A \\t \\u001f \u{7f} \\\"q\\\" \\\\ \u{2028}\"}"),
        ),
        // Lone surrogates: kept, spelled as JSON.stringify spells them.
        (
            r#"{"s": "\uD800 x \uDFFF", "pair": "\uD83D\uDE80"}"#.into(),
            Some("{\"s\":\"\\ud800 x \\udfff\",\"pair\":\"🚀\"}"),
        ),
        // A JavaScript object lists array-index keys first; a repeated key keeps its first
        // place and its last value.
        (
            r#"{"b": 1, "2": "two", "10": "ten", "1": "one", "b": 3, "x": {"9": 9, "8": 8}}"#.into(),
            Some(r#"{"1":"one","2":"two","10":"ten","b":3,"x":{"8":8,"9":9}}"#),
        ),
        // Overflowing numbers are what JSON.stringify writes for Infinity.
        (r#"{"huge": 1e400, "small": 1e-400}"#.into(), Some(r#"{"huge":null,"small":0}"#)),
        // Deep nesting (62 levels), pretty-printed producer output, raw non-ASCII.
        (format!("{{\"deep\": {deep}}}"), None),
        (
            "{\n  \"visitor\": {\n    \"first_name\": \"Zoë\",\n    \"rtl\": \"\u{202e}abc\",\n    \"combining\": \"e\u{301}\"\n  },\n  \"tags\": [ ]\n}".into(),
            Some("{\"visitor\":{\"first_name\":\"Zoë\",\"rtl\":\"\u{202e}abc\",\"combining\":\"e\u{301}\"},\"tags\":[]}"),
        ),
    ]
}

#[tokio::test]
async fn the_guides_node_and_python_verifiers_accept_every_awkward_producer_body() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(&pki, "", "").await;
    let (acc, _) = e.account("acc_awkward", "enterprise").await;
    let hook = e.webhook(&acc, &rx.url, &["*"]).await;
    let secret = hook["secret"].as_str().unwrap().to_string();

    let corpus = awkward_corpus();
    let mut captured = Vec::new();
    for (data, expected) in &corpus {
        post_raw_event(&e, &acc, "user.login", data).await;
        let got = rx.next(WAIT).await;
        let body = String::from_utf8(got.body.to_vec()).unwrap();
        if let Some(expected) = expected {
            assert_eq!(data_of(&body), *expected, "producer data {data}");
        }
        captured.push(json!({
            "secret": secret,
            "timestamp": got.header("x-kyberaccess-timestamp"),
            "signature": got.header("x-kyberaccess-signature"),
            "body": body,
        }));
    }
    let items = Value::Array(captured);
    for (program, script) in [("node", "verify.js"), ("python3", "verify.py")] {
        let (ok, out) = run_script(program, script, &items);
        assert!(ok, "{script} rejected a delivery:\n{out}");
        assert_eq!(out.matches("OK").count(), corpus.len(), "{out}");
    }
    // And the property itself, in JavaScript: JSON.stringify(JSON.parse(body)) === body.
    let (ok, out) = run_script("node", "roundtrip.js", &items);
    assert!(ok, "{out}");
    e.stop().await;
}

/// Runs an official Standard Webhooks library (`verify_standard.py` / `.js` under
/// tests/verifiers/) over captured requests, with the pinned install `tools` makes under
/// target/test-tools/. Returns `None` only when KYBERHOOK_SKIP_STANDARD_WEBHOOKS=1 is set and
/// the library is not installed; otherwise a missing library fails the test.
fn run_official(program: &str, items: &Value) -> Option<(bool, String)> {
    let root = env!("CARGO_MANIFEST_DIR");
    let (script, command) = match program {
        "node" => ("verify_standard.js", tools::node_with("standardwebhooks")),
        _ => ("verify_standard.py", tools::python_with("standardwebhooks")),
    };
    let mut child = command?
        .arg(format!("{root}/tests/verifiers/{script}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} must be installed: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(items.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !stderr.contains("No module named") && !stderr.contains("Cannot find module"),
        "the official standardwebhooks library did not load for {program} (installed by \
         tests/it/tools.rs under target/test-tools/; KYBERHOOK_SKIP_STANDARD_WEBHOOKS=1 \
         skips):\n{stderr}"
    );
    Some((
        out.status.success(),
        format!("{}{stderr}", String::from_utf8_lossy(&out.stdout)),
    ))
}

/// A captured Standard Webhooks request as the official verifiers take it.
fn standard_item(secret: &str, got: &Received) -> Value {
    json!({
        "secret": secret,
        "headers": {
            "webhook-id": got.header("webhook-id"),
            "webhook-timestamp": got.header("webhook-timestamp"),
            "webhook-signature": got.header("webhook-signature"),
        },
        "body": String::from_utf8(got.body.to_vec()).unwrap(),
    })
}

/// Both official libraries accept every item; and each rejects a wrong secret (so they can
/// fail at all).
fn assert_official_libraries_accept(items: &[Value]) {
    let mut wrong = items[0].clone();
    wrong["secret"] = json!(format!("whsec_{}", "ab".repeat(32)));
    for program in ["python3", "node"] {
        let Some((ok, out)) = run_official(program, &Value::Array(items.to_vec())) else {
            return;
        };
        assert!(
            ok,
            "the {program} standardwebhooks library rejected a delivery:\n{out}"
        );
        assert_eq!(out.matches("OK").count(), items.len(), "{out}");
        let (ok, out) = run_official(program, &json!([wrong])).unwrap();
        assert!(!ok, "the {program} library accepted a wrong secret: {out}");
    }
}

async fn create_hook(e: &TestEngine, account: &str, body: Value) -> (StatusCode, Value) {
    e.api
        .admin(
            Method::POST,
            &format!("/v1/accounts/{account}/webhooks"),
            Some(body),
        )
        .await
}

#[tokio::test]
async fn standard_webhooks_deliveries_verify_with_the_official_libraries() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(&pki, "", "").await;
    let (acc, _) = e.account("acc_std", "enterprise").await;

    // Bad values are 400s naming the field.
    let (s, v) = create_hook(
        &e,
        &acc,
        json!({"name": "h", "url": rx.url, "events": ["*"], "signature_scheme": "svix"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "invalid_signature_scheme");

    // The default is the guide's scheme; PATCH switches it, keeping the secret.
    let (s, hook) = create_hook(
        &e,
        &acc,
        json!({"name": "h", "url": rx.url, "events": ["*"]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{hook}");
    assert_eq!(hook["signature_scheme"], "kyberaccess");
    assert_eq!(hook["secret_rotation_ends_at"], Value::Null);
    let id = hook["id"].as_str().unwrap();
    let secret = hook["secret"].as_str().unwrap().to_string();
    let path = format!("/v1/accounts/{acc}/webhooks/{id}");
    let (s, v) = e
        .api
        .admin(
            Method::PATCH,
            &path,
            Some(json!({"signature_scheme": "standard-webhooks"})),
        )
        .await;
    assert_eq!(
        (s, v["signature_scheme"].as_str()),
        (StatusCode::OK, Some("standard-webhooks")),
        "{v}"
    );
    let (s, v) = e
        .api
        .admin(Method::PATCH, &path, Some(json!({"signature_scheme": 7})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    let mut items = Vec::new();
    for data in [
        r#"{"visitor": {"first_name": "Zo\u00eb"}, "n": 1.0}"#,
        r#"{"big": 12345678901234567890}"#,
    ] {
        post_raw_event(&e, &acc, "visitor.checked_in", data).await;
        let got = rx.next(WAIT).await;
        let delivery = got.header("webhook-id");
        assert!(delivery.starts_with("dlv_"), "{delivery}");
        let ts: u64 = got.header("webhook-timestamp").parse().unwrap();
        assert!(got.header("webhook-signature").starts_with("v1,"));
        assert_eq!(
            got.header("x-kyberaccess-signature"),
            "",
            "one scheme per webhook"
        );
        assert_eq!(got.header("x-kyberaccess-event"), "visitor.checked_in");
        // Independent of the engine's code: HMAC under the base64-decoded secret.
        use base64::Engine as _;
        use hmac::{Hmac, KeyInit, Mac};
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret.strip_prefix("whsec_").unwrap())
            .unwrap();
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{delivery}.{ts}.").as_bytes());
        mac.update(&got.body);
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(got.header("webhook-signature"), expected);
        items.push(standard_item(&secret, &got));
    }

    // The test tool signs the same way.
    let (s, v) = e
        .api
        .admin(
            Method::POST,
            &format!("{path}/test"),
            Some(json!({"event": "emergency.lockdown_activated"})),
        )
        .await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("delivered")),
        "{v}"
    );
    let got = rx.next(WAIT).await;
    assert_eq!(got.header("webhook-id"), v["delivery_id"].as_str().unwrap());
    items.push(standard_item(&secret, &got));
    assert_official_libraries_accept(&items);

    // During a rotation grace both signatures are listed: receivers holding either secret pass.
    let (s, rotated) = e
        .api
        .admin(
            Method::POST,
            &format!("{path}/secret/rotate"),
            Some(json!({"grace_period": "1h"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, secret);
    e.event(&acc, "user.login", json!({"user": "x"})).await;
    let got = rx.next(WAIT).await;
    assert_eq!(
        got.header("webhook-signature").split(' ').count(),
        2,
        "{}",
        got.header("webhook-signature")
    );
    assert_official_libraries_accept(&[
        standard_item(&secret, &got),
        standard_item(&new_secret, &got),
    ]);

    // The delivery log shows the headers that were sent.
    // Asked by the id the receiver saw: the newest row in the list can still be the previous
    // delivery while this one's outcome is being recorded.
    let detail = e
        .wait_delivery(&acc, &got.header("webhook-id"), WAIT, |d| {
            d["status"] == "delivered"
        })
        .await;
    let shown = &detail["request"]["headers"];
    assert_eq!(
        shown["webhook-signature"],
        got.header("webhook-signature"),
        "{detail}"
    );
    assert_eq!(shown["webhook-id"], got.header("webhook-id"));
    e.stop().await;
}

/// A captured guide-scheme request as the guide's verifiers take it, checked against `secret`
/// with the signature in `header`.
fn guide_item(secret: &str, got: &Received, header: &str) -> Value {
    json!({
        "secret": secret,
        "timestamp": got.header("x-kyberaccess-timestamp"),
        "signature": got.header(header),
        "body": String::from_utf8(got.body.to_vec()).unwrap(),
    })
}

fn assert_guide_verifiers_accept(items: &[Value]) {
    for (program, script) in [("node", "verify.js"), ("python3", "verify.py")] {
        let (ok, out) = run_script(program, script, &Value::Array(items.to_vec()));
        assert!(ok, "{script} rejected a delivery:\n{out}");
    }
}

#[tokio::test]
async fn rotation_with_a_grace_signs_with_both_secrets_then_only_the_new_one() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let mut e = TestEngine::start(&pki, "", "").await;
    let (acc, _) = e.account("acc_rot", "enterprise").await;
    let hook = e.webhook(&acc, &rx.url, &["*"]).await;
    let id = hook["id"].as_str().unwrap().to_string();
    let old = hook["secret"].as_str().unwrap().to_string();
    let path = format!("/v1/accounts/{acc}/webhooks/{id}");
    let rotate = format!("{path}/secret/rotate");

    // Refusals: a clear 400 for a grace outside 0..7 days or a bad body.
    for (body, code) in [
        (json!({"grace_period": "8d"}), "invalid_grace_period"),
        (json!({"grace_period": "soon"}), "invalid_grace_period"),
        (json!({"grace_period": 5}), "invalid_request"),
        (json!({"grace": "1h"}), "invalid_request"),
    ] {
        let (s, v) = e.api.admin(Method::POST, &rotate, Some(body.clone())).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{body}: {v}"
        );
    }
    let (s, v) = e
        .api
        .admin(Method::GET, &format!("{path}/secret"), None)
        .await;
    assert_eq!(
        (s, v["secret"].as_str()),
        (StatusCode::OK, Some(old.as_str())),
        "refusals rotate nothing"
    );

    // A grace of 7 days is allowed; the answer has the new secret at once and the grace end.
    let before = std::time::SystemTime::now();
    let (s, v) = e
        .api
        .admin(Method::POST, &rotate, Some(json!({"grace_period": "7d"})))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ends = humantime::parse_rfc3339(v["secret_rotation_ends_at"].as_str().unwrap()).unwrap();
    let grace = ends.duration_since(before).unwrap();
    assert!(
        grace > Duration::from_secs(7 * 86400 - 60) && grace <= Duration::from_secs(7 * 86400 + 1),
        "{grace:?}"
    );
    let mid = v["secret"].as_str().unwrap().to_string();
    assert_ne!(mid, old);

    // No body: the default grace of 24 h. This rotation replaces `mid` (the secret the last
    // rotation returned), which now signs the primary header.
    let (s, v) = e.api.admin(Method::POST, &rotate, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let new = v["secret"].as_str().unwrap().to_string();
    let ends = humantime::parse_rfc3339(v["secret_rotation_ends_at"].as_str().unwrap()).unwrap();
    let grace = ends.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(
        grace > Duration::from_secs(86400 - 60) && grace <= Duration::from_secs(86400),
        "{grace:?}"
    );
    let (_, shown) = e.api.admin(Method::GET, &path, None).await;
    assert_eq!(
        shown["secret_rotation_ends_at"], v["secret_rotation_ends_at"],
        "{shown}"
    );
    let (_, v) = e
        .api
        .admin(Method::GET, &format!("{path}/secret"), None)
        .await;
    assert_eq!(
        v["secret"],
        new.as_str(),
        "the new secret is the webhook's secret at once"
    );

    // During the grace: the replaced secret signs X-KyberAccess-Signature, the new one -Next,
    // and the guide's verifiers pass with either secret (on its header).
    let event = e.event(&acc, "user.login", json!({"user": "a"})).await;
    let got = rx.next(WAIT).await;
    let ts = got.header("x-kyberaccess-timestamp");
    assert_eq!(
        got.header("x-kyberaccess-signature"),
        expected_signature(&mid, &ts, &got.body)
    );
    assert_eq!(
        got.header("x-kyberaccess-signature-next"),
        expected_signature(&new, &ts, &got.body)
    );
    assert_guide_verifiers_accept(&[
        guide_item(&mid, &got, "x-kyberaccess-signature"),
        guide_item(&new, &got, "x-kyberaccess-signature-next"),
    ]);
    let detail = e
        .newest_delivery(&acc, &id, WAIT, |d| {
            d["status"] == "delivered" && d["event_id"] == event.as_str()
        })
        .await;
    assert_eq!(
        detail["request"]["headers"]["x-kyberaccess-signature-next"],
        got.header("x-kyberaccess-signature-next"),
        "{detail}"
    );

    // The grace survives a restart (the replaced secret is stored with the webhook).
    e.restart().await;
    e.event(&acc, "user.login", json!({"user": "b"})).await;
    let got = rx.next(WAIT).await;
    let ts = got.header("x-kyberaccess-timestamp");
    assert_eq!(
        got.header("x-kyberaccess-signature"),
        expected_signature(&mid, &ts, &got.body)
    );
    assert_eq!(
        got.header("x-kyberaccess-signature-next"),
        expected_signature(&new, &ts, &got.body)
    );

    // A short grace, then its end: only the new secret signs, with no -Next header.
    let (s, v) = e
        .api
        .admin(Method::POST, &rotate, Some(json!({"grace_period": "1s"})))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let last = v["secret"].as_str().unwrap().to_string();
    let ends = humantime::parse_rfc3339(v["secret_rotation_ends_at"].as_str().unwrap()).unwrap();
    e.event(&acc, "user.login", json!({"user": "c"})).await;
    let got = rx.next(WAIT).await;
    if std::time::SystemTime::now() < ends {
        let ts = got.header("x-kyberaccess-timestamp");
        assert_eq!(
            got.header("x-kyberaccess-signature"),
            expected_signature(&new, &ts, &got.body)
        );
    }
    if let Ok(left) = ends.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left + Duration::from_millis(20)).await;
    }
    e.event(&acc, "user.login", json!({"user": "d"})).await;
    let got = rx.next(WAIT).await;
    let ts = got.header("x-kyberaccess-timestamp");
    assert_eq!(
        got.header("x-kyberaccess-signature"),
        expected_signature(&last, &ts, &got.body)
    );
    assert_eq!(got.header("x-kyberaccess-signature-next"), "");
    assert_guide_verifiers_accept(&[guide_item(&last, &got, "x-kyberaccess-signature")]);
    let (_, shown) = e.api.admin(Method::GET, &path, None).await;
    assert_eq!(shown["secret_rotation_ends_at"], Value::Null, "{shown}");

    // "0s": no grace at all; the new secret signs the very next request alone.
    let (s, v) = e
        .api
        .admin(Method::POST, &rotate, Some(json!({"grace_period": "0s"})))
        .await;
    assert_eq!(
        (s, &v["secret_rotation_ends_at"]),
        (StatusCode::OK, &Value::Null),
        "{v}"
    );
    let zero = v["secret"].as_str().unwrap().to_string();
    e.event(&acc, "user.login", json!({"user": "e"})).await;
    let got = rx.next(WAIT).await;
    let ts = got.header("x-kyberaccess-timestamp");
    assert_eq!(
        got.header("x-kyberaccess-signature"),
        expected_signature(&zero, &ts, &got.body)
    );
    assert_eq!(got.header("x-kyberaccess-signature-next"), "");
    e.stop().await;
}

#[tokio::test]
async fn the_event_catalog_describes_every_type_and_the_test_tool_sends_its_example() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    // The guide's catalog plus one configured type the built-in table does not know.
    let mut catalog: Vec<String> = kyberhook::config::DEFAULT_EVENT_CATALOG
        .iter()
        .map(|s| format!("{s:?}"))
        .collect();
    catalog.push("\"parking.space_reserved\"".into());
    let e = TestEngine::start(
        &pki,
        "",
        &format!("[events]\ncatalog = [{}]\n", catalog.join(", ")),
    )
    .await;
    let (acc, key) = e.account("acc_catalog", "enterprise").await;

    // Read with an account's own key, as a customer would.
    let (s, raw_headers, v) = e
        .api
        .raw(Method::GET, "/v1/event-types", Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(raw_headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let types = v["data"].as_array().unwrap();
    assert_eq!(types.len(), 22, "{v}");
    for t in types {
        let name = t["name"].as_str().unwrap();
        assert_eq!(t["family"], name.split('.').next().unwrap(), "{t}");
        assert!(!t["description"].as_str().unwrap().is_empty(), "{t}");
        assert!(
            t["example"].is_object() && !t["example"].as_object().unwrap().is_empty(),
            "{t}"
        );
    }
    let by_name = |n: &str| types.iter().find(|t| t["name"] == n).unwrap().clone();
    // The guide's description, and the guide's own body as the example.
    let checked_in = by_name("visitor.checked_in");
    assert_eq!(checked_in["description"], "A visitor has checked in");
    assert_eq!(
        checked_in["example"],
        json!({
            "visitor": {"id": "vis_abc123", "first_name": "Jane", "last_name": "Smith",
                        "email": "jane@example.com", "company": "Acme Corp", "purpose": "Meeting"},
            "host": {"id": "usr_xyz789", "name": "John Doe", "department": "Engineering"},
            "location": {"id": "loc_001", "name": "Main Office"},
            "check_in_time": "2025-01-15T09:30:00Z", "badge_number": "V-0042",
            "id_scanned": true, "nda_signed": true, "screening_status": "cleared"
        })
    );
    assert_eq!(
        by_name("screening.bolo_alert")["description"],
        "A BOLO alert was triggered"
    );
    assert_eq!(by_name("settings.updated")["family"], "settings");
    let parking = by_name("parking.space_reserved");
    assert_eq!(parking["family"], "parking");
    assert!(
        parking["description"].as_str().unwrap().contains("parking"),
        "{parking}"
    );

    // The admin token reads the same catalog.
    let (_, _, body) = e
        .api
        .raw(Method::GET, "/v1/event-types", Some(ADMIN), None)
        .await;
    assert_eq!(body, v);

    // The test tool sends the chosen type's example, exactly.
    let hook = e.webhook(&acc, &rx.url, &["*"]).await;
    let id = hook["id"].as_str().unwrap();
    for name in [
        "visitor.checked_in",
        "delivery.picked_up",
        "parking.space_reserved",
    ] {
        let (s, r) = e
            .api
            .call(
                Method::POST,
                &format!("/v1/accounts/{acc}/webhooks/{id}/test"),
                Some(&key),
                Some(json!({"event": name})),
            )
            .await;
        assert_eq!(
            (s, r["status"].as_str()),
            (StatusCode::OK, Some("delivered")),
            "{r}"
        );
        let got = rx.next(WAIT).await;
        let body = String::from_utf8(got.body.to_vec()).unwrap();
        assert_eq!(got.json()["event"], name);
        assert_eq!(got.json()["data"], by_name(name)["example"], "{body}");
        assert_eq!(data_of(&body), kyberhook::catalog::example_data(name));
    }
    e.stop().await;
}
