//! Record encoding: the one place that turns stored records into bytes and back.
//!
//! Every value written to the store goes through [`encode`] and comes back through [`decode`]:
//! one format-version byte, then bincode 2 (serde, standard config). bincode is flagged
//! unmaintained upstream (RUSTSEC-2025-0141) and pinned at `=2.0.1`; keeping the codec here
//! means a move to another format (e.g. postcard) is a change to this file plus a new version
//! byte, and old records stay readable by dispatching on that byte.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The version byte of records written by this build.
pub const FORMAT_V1: u8 = 1;

/// Bounds what a corrupted length prefix can make the decoder allocate.
const MAX_RECORD_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty record")]
    Empty,
    #[error("unknown record format version {0}")]
    UnknownVersion(u8),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("record has {0} trailing bytes")]
    Trailing(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_RECORD_BYTES>()
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.push(FORMAT_V1);
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .expect("encoding into a Vec cannot fail for our record types");
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, payload) = bytes.split_first().ok_or(CodecError::Empty)?;
    match version {
        FORMAT_V1 => {
            let (value, used) = bincode::serde::decode_from_slice(payload, config())
                .map_err(|e| CodecError::Corrupt(e.to_string()))?;
            if used != payload.len() {
                return Err(CodecError::Trailing(payload.len() - used));
            }
            Ok(value)
        }
        other => Err(CodecError::UnknownVersion(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use proptest::prelude::*;

    fn arb_attempt() -> impl Strategy<Value = AttemptRecord> {
        (
            1u32..100,
            any::<u64>(),
            proptest::option::of(100u16..600),
            any::<u64>(),
            proptest::collection::vec((".{0,10}", ".{0,20}"), 0..4),
            ".{0,50}",
            proptest::option::of(".{0,30}"),
            any::<u64>(),
            "[0-9a-f]{0,64}",
        )
            .prop_map(|(number, at_ms, code, rt, headers, body, error, ts, sig)| {
                AttemptRecord {
                    number,
                    at_ms,
                    response_code: code,
                    response_time_ms: rt,
                    response_headers: headers,
                    response_body: body,
                    error,
                    timestamp: ts,
                    signature: sig,
                }
            })
    }

    proptest! {
        #[test]
        fn attempts_round_trip(a in arb_attempt()) {
            let bytes = encode(&a);
            prop_assert_eq!(bytes[0], FORMAT_V1);
            let back: AttemptRecord = decode(&bytes).unwrap();
            prop_assert_eq!(back, a);
        }

        #[test]
        fn events_round_trip(seq in any::<u64>(), body in proptest::collection::vec(any::<u8>(), 0..300), ev in "[a-z]{1,8}\\.[a-z_]{1,12}") {
            let e = EventRecord {
                seq,
                id: crate::ids::EventId::from_seq(seq),
                account_id: crate::ids::AccountId::parse("acc_x").unwrap(),
                event: ev,
                body,
            };
            let back: EventRecord = decode(&encode(&e)).unwrap();
            prop_assert_eq!(back, e);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode::<DeliveryRecord>(&bytes);
            let _ = decode::<Webhook>(&bytes);
            let _ = decode::<EventRecord>(&bytes);
        }
    }

    #[test]
    fn version_and_truncation_are_errors() {
        assert!(matches!(decode::<u32>(&[]), Err(CodecError::Empty)));
        assert!(matches!(
            decode::<u32>(&[9, 1]),
            Err(CodecError::UnknownVersion(9))
        ));
        let mut bytes = encode(&("hello".to_string(), 7u64));
        bytes.pop();
        assert!(decode::<(String, u64)>(&bytes).is_err());
        let mut bytes = encode(&5u32);
        bytes.push(0);
        assert!(matches!(
            decode::<u32>(&bytes),
            Err(CodecError::Trailing(1))
        ));
    }
}
