//! Signing against an independent HMAC-SHA256, and the attempt's request headers: every value
//! is a valid HTTP header value for any event name the catalog may hold.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderName, HeaderValue};
use kyberhook::config::DEFAULT_EVENT_CATALOG;
use kyberhook::ids::{DeliveryId, WebhookId};
use kyberhook::model::is_valid_event_name;
use kyberhook::signing::{recorded_headers, signature_header, signature_hex};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

#[derive(Arbitrary, Debug)]
enum EventName {
    /// One of the default catalog's names.
    Default(u8),
    /// Any text; used when it passes the rule `events.catalog` entries must pass.
    Custom(String),
}

#[derive(Arbitrary, Debug)]
struct Input {
    secret: String,
    timestamp: u64,
    event: EventName,
    seq: u64,
    webhook: u64,
    body: Rest,
}

/// The rest of the input as it is (a derived `Vec<u8>` would spend a byte per byte).
#[derive(Debug)]
struct Rest(Vec<u8>);

impl<'a> Arbitrary<'a> for Rest {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Rest(<&[u8]>::arbitrary(u)?.to_vec()))
    }
    fn arbitrary_take_rest(u: Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Rest(u.take_rest().to_vec()))
    }
}

fn reference(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    let mut message = format!("{timestamp}.").into_bytes();
    message.extend_from_slice(body);
    mac.update(&message);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fuzz_target!(|input: Input| {
    let body = &input.body.0;
    let header = signature_header(&input.secret, input.timestamp, body);
    assert_eq!(header, reference(&input.secret, input.timestamp, body));
    let hex = signature_hex(&input.secret, input.timestamp, body);
    assert_eq!(header.strip_prefix("sha256="), Some(hex.as_str()));
    assert!(hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));

    let event = match &input.event {
        EventName::Default(i) => DEFAULT_EVENT_CATALOG[*i as usize % DEFAULT_EVENT_CATALOG.len()],
        EventName::Custom(name) if is_valid_event_name(name) => name.as_str(),
        EventName::Custom(_) => return,
    };
    let delivery = DeliveryId {
        seq: input.seq,
        webhook: WebhookId(input.webhook),
    };
    // The guide-scheme headers as an attempt sends them and the delivery log shows them.
    let headers = recorded_headers(event, delivery, Some((input.timestamp, &hex)));
    let mut seen = Vec::new();
    for (name, value) in &headers {
        // The dispatcher builds names with from_static, which panics on an invalid one.
        let name = HeaderName::from_bytes(name.as_bytes()).expect("a valid header name");
        assert!(!seen.contains(&name), "header {name} is sent twice");
        assert!(
            HeaderValue::from_str(value).is_ok(),
            "{name}: {value:?} is not a valid header value"
        );
        seen.push(name);
    }
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("x-kyberaccess-signature"), Some(header.as_str()));
    assert_eq!(get("x-kyberaccess-event"), Some(event));
    assert_eq!(
        get("x-kyberaccess-timestamp"),
        Some(input.timestamp.to_string().as_str())
    );
    assert_eq!(
        get("x-kyberaccess-delivery").and_then(DeliveryId::parse),
        Some(delivery)
    );
});
