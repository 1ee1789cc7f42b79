//! Delivery semantics a receiver observes (issue 14): bodies every guide verifier accepts,
//! whatever the producer's JSON spelling; Standard Webhooks signatures checked by the official
//! libraries; secret rotation with a grace period; the readable event catalog.
//!
//! Every test delivers to real local HTTPS receivers; the verifiers are the guide's own code
//! (tests/verifiers/) and the Standard Webhooks reference libraries, run with node and python3.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

/// Runs a verifier script (under tests/verifiers/) with `program` over `items` on stdin; returns
/// (success, stdout + stderr).
fn run_script(program: &str, script: &str, items: &Value) -> (bool, String) {
    let path = format!("{}/tests/verifiers/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(program)
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
