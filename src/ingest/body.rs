//! Body building: the compact JSON every attempt of an event sends and every signature covers.
//!
//! Data enters as the producer's already-validated JSON text (from [`super::Ingest::prepare`]
//! and test sends) and leaves as the body bytes stored with the event; nothing here touches
//! storage or the network. `data` is written in the form JavaScript's `JSON.stringify` gives it
//! (see [`crate::canonical`]), so receivers that re-serialise the parsed body get the signed
//! bytes back. The body is built on the async workers, before the commit; an id the engine
//! mints is a fixed-width placeholder here, which the group committer overwrites in place
//! once the event has its sequence number (`evt_` + 16 hex digits of it).

use super::{Rejection, MAX_DATA_DEPTH};
use crate::canonical::{write_canonical, CanonicalError};

/// Where a minted id starts in a body: `{"id":"` comes first (see [`build_body`]).
pub(super) const BODY_ID_AT: usize = 7;

/// `{"id":…,"event":…,"timestamp":…,"data":…,"account_id":…}` with no insignificant
/// whitespace: the bytes every attempt sends and every signature covers.
///
/// Fails when `data` nests deeper than [`MAX_DATA_DEPTH`].
pub fn build_body(
    id: &str,
    event: &str,
    timestamp: &str,
    data: &str,
    account: &str,
) -> Result<Vec<u8>, Rejection> {
    let mut out = Vec::with_capacity(data.len() + 128);
    out.extend_from_slice(b"{\"id\":");
    push_json_string(&mut out, id);
    out.extend_from_slice(b",\"event\":");
    push_json_string(&mut out, event);
    out.extend_from_slice(b",\"timestamp\":");
    push_json_string(&mut out, timestamp);
    out.extend_from_slice(b",\"data\":");
    write_canonical(&mut out, data, MAX_DATA_DEPTH).map_err(|e| match e {
        CanonicalError::TooDeep(max) => Rejection::Invalid(format!(
            "data nests objects and arrays deeper than {max} levels"
        )),
        CanonicalError::Syntax(at) => {
            Rejection::Invalid(format!("data is not valid JSON (at byte {at})"))
        }
    })?;
    out.extend_from_slice(b",\"account_id\":");
    push_json_string(&mut out, account);
    out.push(b'}');
    Ok(out)
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing a string into a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_contract_shape() {
        let body = build_body(
            "evt_1",
            "visitor.checked_in",
            "2025-01-15T09:30:00Z",
            "{ \"k\": 1.0, \"n\": \"Zo\\u00eb\" }",
            "acc_1",
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            r#"{"id":"evt_1","event":"visitor.checked_in","timestamp":"2025-01-15T09:30:00Z","data":{"k":1,"n":"Zoë"},"account_id":"acc_1"}"#
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["data"]["k"], 1);
    }
}
