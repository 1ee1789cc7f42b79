//! Record encoding: the one place that turns stored records into bytes and back.
//!
//! Every value written to the store goes through [`encode`] and comes back through [`decode`]:
//! one format-version byte, then bincode 2 (serde, standard config). bincode is flagged
//! unmaintained upstream (RUSTSEC-2025-0141) and pinned at `=2.0.1`; keeping the codec here
//! means a move to another format (e.g. postcard) is a change to this file plus a new version
//! byte, and old records stay readable by dispatching on that byte.
//!
//! The event log stores records in **chunks** ([`encode_chunk`], [`Chunk`]): one stored value
//! per group of events, so a group commit costs one tree write per chunk rather than per event,
//! with a table that lets one record be found and decoded without touching the others.

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

/// The tag byte of a chunk (distinct from every single-record version byte).
pub const CHUNK_V1: u8 = 0x81;
/// Tag, then the record count (u32 LE).
const CHUNK_HEADER: usize = 5;
/// Per record: its sequence number (u64 LE) and the end of its bytes in the data (u32 LE).
const CHUNK_ENTRY: usize = 12;

/// Encodes records as one chunk: the header, a table of (sequence number, end offset) in
/// strictly increasing sequence order, then each record as [`encode`] makes it.
///
/// `items` must be sorted by strictly increasing sequence number; the event log's writer
/// assigns them that way.
pub fn encode_chunk<T: Serialize>(items: &[(u64, &T)]) -> Vec<u8> {
    debug_assert!(items.windows(2).all(|w| w[0].0 < w[1].0));
    let mut data = Vec::with_capacity(items.len() * 256);
    let mut table = Vec::with_capacity(items.len() * CHUNK_ENTRY);
    for (seq, item) in items {
        data.push(FORMAT_V1);
        bincode::serde::encode_into_std_write(item, &mut data, config())
            .expect("encoding into a Vec cannot fail for our record types");
        table.extend_from_slice(&seq.to_le_bytes());
        table.extend_from_slice(&(data.len() as u32).to_le_bytes());
    }
    let mut out = Vec::with_capacity(CHUNK_HEADER + table.len() + data.len());
    out.push(CHUNK_V1);
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    out.extend_from_slice(&table);
    out.extend_from_slice(&data);
    out
}

/// A parsed view of a chunk: its table is checked once, then records are read by index.
pub struct Chunk<'a> {
    table: &'a [u8],
    data: &'a [u8],
}

impl<'a> Chunk<'a> {
    /// Checks the header and the table (sequence numbers strictly increasing, offsets in
    /// bounds and in order); the records themselves are checked when decoded.
    pub fn parse(bytes: &'a [u8]) -> Result<Chunk<'a>, CodecError> {
        let (&tag, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
        if tag != CHUNK_V1 {
            return Err(CodecError::UnknownVersion(tag));
        }
        let corrupt = |what: &str| CodecError::Corrupt(format!("chunk: {what}"));
        let count = rest
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
            .ok_or_else(|| corrupt("truncated header"))?;
        let table_len = count
            .checked_mul(CHUNK_ENTRY)
            .filter(|&n| n <= rest.len() - 4)
            .ok_or_else(|| corrupt("table longer than the value"))?;
        let table = &rest[4..4 + table_len];
        let data = &rest[4 + table_len..];
        let chunk = Chunk { table, data };
        let mut prev: Option<(u64, usize)> = None;
        for i in 0..count {
            let (seq, end) = chunk.entry(i);
            if end > data.len() {
                return Err(corrupt("record past the end"));
            }
            if let Some((p_seq, p_end)) = prev {
                if seq <= p_seq || end < p_end {
                    return Err(corrupt("table out of order"));
                }
            }
            prev = Some((seq, end));
        }
        if prev.map_or(0, |(_, end)| end) != data.len() {
            return Err(CodecError::Trailing(
                data.len() - prev.map_or(0, |(_, end)| end),
            ));
        }
        Ok(chunk)
    }

    fn entry(&self, i: usize) -> (u64, usize) {
        let e = &self.table[i * CHUNK_ENTRY..(i + 1) * CHUNK_ENTRY];
        let seq = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
        let end = u32::from_le_bytes(e[8..].try_into().expect("4 bytes")) as usize;
        (seq, end)
    }

    pub fn len(&self) -> usize {
        self.table.len() / CHUNK_ENTRY
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The sequence number of record `i`.
    pub fn seq(&self, i: usize) -> u64 {
        self.entry(i).0
    }

    /// The index of the record with sequence number `seq`.
    pub fn find(&self, seq: u64) -> Option<usize> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.seq(mid).cmp(&seq) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    /// Decodes record `i` alone.
    pub fn decode<T: DeserializeOwned>(&self, i: usize) -> Result<T, CodecError> {
        let start = if i == 0 { 0 } else { self.entry(i - 1).1 };
        decode(&self.data[start..self.entry(i).1])
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
            if let Ok(chunk) = Chunk::parse(&bytes) {
                for i in 0..chunk.len() {
                    let _ = chunk.decode::<EventRecord>(i);
                }
            }
            let mut tagged = bytes.clone();
            tagged.insert(0, CHUNK_V1);
            if let Ok(chunk) = Chunk::parse(&tagged) {
                for i in 0..chunk.len() {
                    let _ = chunk.decode::<EventRecord>(i);
                }
            }
        }

        #[test]
        fn chunks_find_every_record_and_only_those(
            gaps in proptest::collection::vec(1u64..1000, 0..80),
            probe in any::<u64>(),
        ) {
            let mut seq = 0;
            let events: Vec<EventRecord> = gaps
                .iter()
                .map(|g| {
                    seq += g;
                    EventRecord {
                        seq,
                        id: crate::ids::EventId::from_seq(seq),
                        account_id: crate::ids::AccountId::parse("acc_x").unwrap(),
                        event: "a.b".into(),
                        body: seq.to_string().into_bytes(),
                    }
                })
                .collect();
            let items: Vec<(u64, &EventRecord)> = events.iter().map(|e| (e.seq, e)).collect();
            let bytes = encode_chunk(&items);
            let chunk = Chunk::parse(&bytes).unwrap();
            prop_assert_eq!(chunk.len(), events.len());
            for e in &events {
                let i = chunk.find(e.seq).unwrap();
                prop_assert_eq!(&chunk.decode::<EventRecord>(i).unwrap(), e);
            }
            let present = events.iter().any(|e| e.seq == probe);
            prop_assert_eq!(chunk.find(probe).is_some(), present);
            // Any truncation is refused, never misread.
            for cut in [1, bytes.len() / 2, bytes.len() - 1] {
                if cut < bytes.len() && !events.is_empty() {
                    prop_assert!(Chunk::parse(&bytes[..cut]).is_err());
                }
            }
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
