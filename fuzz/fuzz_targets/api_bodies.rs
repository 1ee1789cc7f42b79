//! Every request body the API parses, fed arbitrary bytes: parsing may refuse, never panic.
//! When an event parses, the body built from it (`ingest::build_body`, which writes the
//! producer's `data` in the form JavaScript's `JSON.stringify` gives it) must be JSON whose
//! fields mean what was sent, as JavaScript reads it.
#![no_main]

use kyberhook::api::bodies::{
    Batch, CreateAccount, CreateWebhook, TestRequest, UpdateAccount, UpdateWebhook,
};
use kyberhook::canonical::canonical;
use kyberhook::ingest::{build_body, EventInput, Rejection, MAX_DATA_DEPTH};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// The shape `build_body` promises, read back strictly.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Built<'a> {
    id: String,
    event: String,
    timestamp: String,
    #[serde(borrow)]
    data: &'a RawValue,
    account_id: String,
}

fuzz_target!(|bytes: &[u8]| {
    let _ = serde_json::from_slice::<CreateAccount>(bytes);
    let _ = serde_json::from_slice::<UpdateAccount>(bytes);
    let _ = serde_json::from_slice::<CreateWebhook>(bytes);
    let _ = serde_json::from_slice::<UpdateWebhook>(bytes);
    let _ = serde_json::from_slice::<TestRequest>(bytes);
    // The API's own strict parse, including its error classification and message.
    if let Err(e) = kyberhook::api::parse_json::<EventInput>(bytes) {
        let _ = kyberhook::api::error_response(&e);
    }
    if let Ok(event) = serde_json::from_slice::<EventInput>(bytes) {
        check_event(&event);
    }
    if let Ok(batch) = serde_json::from_slice::<Batch>(bytes) {
        for raw in &batch.events {
            if let Ok(event) = serde_json::from_str::<EventInput>(raw.get()) {
                check_event(&event);
            }
        }
    }
});

fn check_event(input: &EventInput<'_>) {
    let id = input.id.as_deref().unwrap_or("evt_0000000000000001");
    let timestamp = input.timestamp.as_deref().unwrap_or("2025-01-15T09:30:00Z");
    let data = input.data.get();
    let expected = serde_json::from_str::<Value>(data).ok();
    let body = match build_body(id, &input.event, timestamp, data, &input.account_id) {
        Ok(body) => body,
        Err(rejection) => {
            // Refused only for nesting past the limit (serde_json's own limit of 128 levels
            // may have kept `expected` from parsing at all).
            assert!(matches!(rejection, Rejection::Invalid(_)), "{rejection:?}");
            if let Some(value) = &expected {
                assert!(
                    depth(value) > MAX_DATA_DEPTH,
                    "data nesting {} levels was refused: {rejection}",
                    depth(value)
                );
            }
            return;
        }
    };
    if let Some(value) = &expected {
        assert!(
            depth(value) <= MAX_DATA_DEPTH,
            "data nesting {} levels was accepted",
            depth(value)
        );
    }

    // Compact: no insignificant whitespace survives (raw control characters cannot appear
    // inside JSON strings, and spaces outside strings are dropped).
    assert!(
        !body.iter().any(|b| matches!(b, b'\n' | b'\r' | b'\t')),
        "build_body left whitespace: {:?}",
        String::from_utf8_lossy(&body)
    );
    std::str::from_utf8(&body).expect("build_body output is UTF-8");

    let built: Built = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "build_body output is not the promised JSON ({e}): {:?}",
            String::from_utf8_lossy(&body)
        )
    });
    assert_eq!(built.id, id);
    assert_eq!(built.event, input.event);
    assert_eq!(built.timestamp, timestamp);
    assert_eq!(built.account_id, input.account_id);
    // The canonical form is a fixed point: `JSON.stringify(JSON.parse(data)) === data`.
    let data = built.data.get();
    assert_eq!(
        canonical(data, MAX_DATA_DEPTH).expect("canonical data is JSON"),
        data,
        "the canonical form of data is not canonical"
    );
    // `data` means what was sent, as JavaScript reads it: numbers as the f64 nearest to what
    // the producer wrote. (A number beyond f64 range passes RawValue's syntax check but not
    // Value's; then there is no Value to compare.)
    if let Some(expected) = expected {
        let got: Value =
            serde_json::from_str(data).expect("canonical data parses when the original does");
        assert!(
            same(&got, &expected),
            "the canonical form changed the meaning of data: {data} for {expected}"
        );
    }
}

/// Equal as JavaScript sees them: numbers compared as f64 (`1.0`, `1E0` and `1` are one
/// number), everything else exactly, object members by name.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        // Read with `float_roundtrip` (fuzz/Cargo.toml): correctly rounded, as JavaScript does.
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// Levels of objects and arrays: 0 for a scalar.
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}
