//! Arbitrary bytes as every stored record type: `codec::decode` answers an error, never
//! panics (nor allocates without bound), and whatever decodes survives encode -> decode.
#![no_main]

use std::fmt::Debug;

use kyberhook::codec::{decode, encode};
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

fuzz_target!(|bytes: &[u8]| {
    round_trip::<Account>(bytes);
    round_trip::<Webhook>(bytes);
    round_trip::<EventRecord>(bytes);
    round_trip::<DeliveryRecord>(bytes);
    round_trip::<AttemptRecord>(bytes);
});
