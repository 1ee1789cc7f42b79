//! Arbitrary bytes as every stored record type and as an event-log chunk: `codec::decode` and
//! `codec::Chunk` answer an error, never panic (nor allocate without bound), and whatever
//! decodes survives encode -> decode.
#![no_main]

use std::fmt::Debug;

use kyberhook::codec::{decode, encode, encode_chunk, Chunk, CHUNK_V1};
use kyberhook::model::{Account, AttemptRecord, DeliveryRecord, EventRecord, Webhook};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(bytes: &[u8]) {
    if let Ok(value) = decode::<T>(bytes) {
        let encoded = encode(&value);
        let back: T = decode(&encoded)
            .unwrap_or_else(|e| panic!("a decoded {value:?} does not decode after encoding: {e}"));
        assert_eq!(back, value, "encode -> decode changed the record");
    }
}

/// A chunk that parses finds each of its records by sequence number, and its decodable
/// records re-encode to a chunk that reads back the same.
fn chunk(bytes: &[u8]) {
    let Ok(chunk) = Chunk::parse(bytes) else {
        return;
    };
    let mut records = Vec::new();
    for i in 0..chunk.len() {
        assert_eq!(chunk.find(chunk.seq(i)), Some(i), "a record is not found by its seq");
        if let Ok(e) = chunk.decode::<EventRecord>(i) {
            records.push((chunk.seq(i), e));
        }
    }
    let items: Vec<(u64, &EventRecord)> = records.iter().map(|(s, e)| (*s, e)).collect();
    let encoded = encode_chunk(&items);
    let back = Chunk::parse(&encoded).expect("a re-encoded chunk parses");
    for (i, (seq, e)) in records.iter().enumerate() {
        assert_eq!(back.seq(i), *seq);
        assert_eq!(&back.decode::<EventRecord>(i).expect("decodes"), e);
    }
}

fuzz_target!(|bytes: &[u8]| {
    chunk(bytes);
    // Most inputs would miss the tag byte: also read each one as a chunk body.
    let mut tagged = Vec::with_capacity(bytes.len() + 1);
    tagged.push(CHUNK_V1);
    tagged.extend_from_slice(bytes);
    chunk(&tagged);
    round_trip::<Account>(bytes);
    round_trip::<Webhook>(bytes);
    round_trip::<EventRecord>(bytes);
    round_trip::<DeliveryRecord>(bytes);
    round_trip::<AttemptRecord>(bytes);
});
