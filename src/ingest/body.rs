//! Body building: the compact JSON every attempt of an event sends and every signature covers.
//!
//! Data enters as the producer's already-validated JSON text (from [`super::Ingest::prepare`]
//! and test sends) and leaves as the body bytes stored with the event; nothing here touches
//! storage or the network.

use super::{Rejection, MAX_DATA_DEPTH};

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
    if minify_into(&mut out, data) > MAX_DATA_DEPTH {
        return Err(Rejection::Invalid(format!(
            "data nests objects and arrays deeper than {MAX_DATA_DEPTH} levels"
        )));
    }
    out.extend_from_slice(b",\"account_id\":");
    push_json_string(&mut out, account);
    out.push(b'}');
    Ok(out)
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing a string into a Vec cannot fail");
}

/// Copies already-validated JSON, dropping whitespace outside strings. Everything else —
/// key order, number spelling, escapes — stays byte for byte as the producer sent it.
/// Returns the deepest nesting of objects and arrays it saw.
pub fn minify_into(out: &mut Vec<u8>, json: &str) -> usize {
    let mut in_string = false;
    let mut escaped = false;
    let mut depth = 0usize;
    let mut deepest = 0usize;
    for &b in json.as_bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else {
            match b {
                b' ' | b'\n' | b'\r' | b'\t' => {}
                b'"' => {
                    in_string = true;
                    out.push(b);
                }
                b'{' | b'[' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                    out.push(b);
                }
                b'}' | b']' => {
                    depth = depth.saturating_sub(1);
                    out.push(b);
                }
                _ => out.push(b),
            }
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minify_keeps_strings_and_drops_whitespace() {
        let mut out = Vec::new();
        let depth = minify_into(
            &mut out,
            "{ \"a b\" : [1, 2,\n\t3], \"s\": \"x \\\" y\\\\\", \"u\": \"\\u00e9 é\", \"d\": \"[{\" }",
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a b":[1,2,3],"s":"x \" y\\","u":"\u00e9 é","d":"[{"}"#
        );
        assert_eq!(depth, 2, "brackets inside strings do not count");
    }

    #[test]
    fn body_has_the_contract_shape() {
        let body = build_body(
            "evt_1",
            "visitor.checked_in",
            "2025-01-15T09:30:00Z",
            "{ \"k\": 1 }",
            "acc_1",
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            r#"{"id":"evt_1","event":"visitor.checked_in","timestamp":"2025-01-15T09:30:00Z","data":{"k":1},"account_id":"acc_1"}"#
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["data"]["k"], 1);
    }
}
