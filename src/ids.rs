//! Typed identifiers: every ID the API shows is an opaque string with a prefix (`acc_`, `wh_`,
//! `evt_`, `dlv_`), and each has its own type so that a webhook id can never be passed where a
//! delivery id is expected.
//!
//! IDs enter from URLs and JSON (parsed and validated here) or are minted here; they leave as
//! strings in JSON and as fixed-width big-endian bytes in store keys (see
//! `store::embedded::keys`). Event sequence numbers are time-ordered (`unix_ms << 20 |
//! counter`, never decreasing), so that delivery keys built from them sort by creation time
//! and range scans serve "newest first" and `since/until`. A delivery id is (event seq,
//! webhook): derived, not minted, so fan-out that runs twice makes the same deliveries.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Whether `text` is 1..=max characters of `[A-Za-z0-9_.-]`: the shape of every ID a client
/// may choose, so that IDs are safe in URLs, keys and logs.
pub fn is_safe_token(text: &str, max: usize) -> bool {
    !text.is_empty()
        && text.len() <= max
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// `len` random bytes from the OS RNG, as lowercase hex.
pub fn random_hex(len: usize) -> String {
    let mut buf = vec![0u8; len];
    getrandom::fill(&mut buf).expect("the OS random number generator is available");
    hex::encode(buf)
}

/// An account: chosen by the operator (`"id"` at creation) or minted as `acc_` + 16 hex.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct AccountId(String);

impl AccountId {
    pub const MAX_LEN: usize = 64;
    pub fn generate() -> Self {
        AccountId(format!("acc_{}", random_hex(8)))
    }
    pub fn parse(text: &str) -> Option<Self> {
        is_safe_token(text, Self::MAX_LEN).then(|| AccountId(text.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A webhook: `wh_` + 16 hex digits of a random `u64`, which is also its key in the store, so
/// index keys stay fixed-width.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct WebhookId(pub u64);

impl WebhookId {
    pub fn generate() -> Self {
        let mut buf = [0u8; 8];
        getrandom::fill(&mut buf).expect("the OS random number generator is available");
        WebhookId(u64::from_be_bytes(buf))
    }
    pub fn parse(text: &str) -> Option<Self> {
        let hex = text.strip_prefix("wh_")?;
        if hex.len() != 16 {
            return None;
        }
        u64::from_str_radix(hex, 16).ok().map(WebhookId)
    }
}

impl fmt::Display for WebhookId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "wh_{:016x}", self.0)
    }
}

/// An event as the producer names it: its own `id`, or `evt_` + the hex sequence number.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct EventId(String);

impl EventId {
    pub const MAX_LEN: usize = 128;
    pub fn from_seq(seq: u64) -> Self {
        Self::minted("evt_", seq)
    }
    /// `prefix` followed by `seq` in 16 hex digits (test sends use `evt_test_`).
    pub fn minted(prefix: &str, seq: u64) -> Self {
        EventId(format!("{prefix}{seq:016x}"))
    }
    pub fn parse(text: &str) -> Option<Self> {
        is_safe_token(text, Self::MAX_LEN).then(|| EventId(text.to_string()))
    }
    /// Whether this is the id [`EventId::from_seq`] mints for `seq`.
    pub fn is_minted_for(&self, seq: u64) -> bool {
        Self::minted_seq(&self.0) == Some(seq)
    }
    /// The sequence number `text` names if it has the shape [`EventId::from_seq`] mints
    /// (a producer may also have chosen such an id for an event of its own).
    pub fn minted_seq(text: &str) -> Option<u64> {
        let hex = text.strip_prefix("evt_").filter(|hex| hex.len() == 16)?;
        // from_str_radix also takes a leading '+', which from_seq never writes.
        hex.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            .then(|| u64::from_str_radix(hex, 16).ok())
            .flatten()
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One event (or test send) to one webhook: the event's sequence number and the webhook, so
/// fan-out is idempotent (re-running it after a crash finds the same keys) and the key sorts by
/// creation time. Shown as `dlv_` + 32 hex digits.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct DeliveryId {
    pub seq: u64,
    pub webhook: WebhookId,
}

impl DeliveryId {
    pub const ENCODED_LEN: usize = 16;

    pub fn to_bytes(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.seq.to_be_bytes());
        out[8..].copy_from_slice(&self.webhook.0.to_be_bytes());
        out
    }
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let seq = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let wh = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        Some(DeliveryId {
            seq,
            webhook: WebhookId(wh),
        })
    }
    pub fn parse(text: &str) -> Option<Self> {
        let hex = text.strip_prefix("dlv_")?;
        if hex.len() != 32 {
            return None;
        }
        let bytes = hex::decode(hex).ok()?;
        Self::from_bytes(&bytes)
    }
    /// Creation time in unix ms, read from the sequence number.
    pub fn created_ms(self) -> u64 {
        seq_time_ms(self.seq)
    }
}

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dlv_{:016x}{:016x}", self.seq, self.webhook.0)
    }
}

const SEQ_COUNTER_BITS: u32 = 20;

/// The unix ms encoded in a sequence number.
pub fn seq_time_ms(seq: u64) -> u64 {
    seq >> SEQ_COUNTER_BITS
}

/// The smallest sequence number of unix ms `ms` (for `since`/`until` range bounds).
pub fn seq_floor(ms: u64) -> u64 {
    ms.saturating_mul(1 << SEQ_COUNTER_BITS)
}

/// The bits of a sequence number that name the writer that minted it, when several nodes
/// write to one store ([`Sequencer::for_writer`]).
pub const SEQ_WRITER_BITS: u32 = 8;

/// Mints strictly increasing, time-ordered sequence numbers: `unix_ms << 20 | counter`. Never
/// goes backwards, even if the wall clock does (it then counts on from the last value).
/// Several writers on one store each mint only numbers whose low [`SEQ_WRITER_BITS`] are their
/// own slot, so two nodes never mint the same number (still a million a second each).
#[derive(Debug)]
pub struct Sequencer {
    last: AtomicU64,
    /// The writer's slot; `None`: the only writer (every number is used).
    slot: Option<u8>,
}

impl Sequencer {
    /// Continues after `last_used` (the largest sequence number found in the store).
    pub fn new(last_used: u64) -> Self {
        Sequencer {
            last: AtomicU64::new(last_used),
            slot: None,
        }
    }

    /// One of several writers on a store: continues after `last_used` (the largest number any
    /// writer stored — so also after one that held `slot` before, whatever its clock said) and
    /// mints only numbers whose low byte is `slot`.
    pub fn for_writer(last_used: u64, slot: u8) -> Self {
        Sequencer {
            last: AtomicU64::new(last_used),
            slot: Some(slot),
        }
    }

    pub fn next(&self, now_ms: u64) -> u64 {
        let floor = seq_floor(now_ms);
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let mut next = floor.max(prev + 1);
            if let Some(slot) = self.slot {
                // The first number at or above `next` in this writer's residue class.
                let stride = 1u64 << SEQ_WRITER_BITS;
                next = (next - u64::from(slot)).div_ceil(stride) * stride + u64::from(slot);
            }
            match self
                .last
                .compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(actual) => prev = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_round_trip_and_sort_by_time() {
        let a = DeliveryId {
            seq: seq_floor(1_700_000_000_000) + 5,
            webhook: WebhookId(u64::MAX),
        };
        let text = a.to_string();
        assert!(text.starts_with("dlv_") && text.len() == 36, "{text}");
        assert_eq!(DeliveryId::parse(&text), Some(a));
        assert_eq!(DeliveryId::from_bytes(&a.to_bytes()), Some(a));
        let b = DeliveryId {
            seq: a.seq + 1,
            webhook: WebhookId(0),
        };
        assert!(a.to_bytes() < b.to_bytes());
        assert_eq!(a.created_ms(), 1_700_000_000_000);
        for bad in ["", "dlv_", "dlv_zz", "wh_0000000000000000", &text[..35]] {
            assert_eq!(DeliveryId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn minted_event_ids_are_recognised() {
        let id = EventId::from_seq(0x1a2b);
        assert!(id.is_minted_for(0x1a2b));
        assert!(!id.is_minted_for(0x1a2c));
        assert!(!EventId::parse("evt_guide_1").unwrap().is_minted_for(0));
    }

    #[test]
    fn webhook_ids_round_trip() {
        let id = WebhookId(0xdead_beef);
        assert_eq!(id.to_string(), "wh_00000000deadbeef");
        assert_eq!(WebhookId::parse(&id.to_string()), Some(id));
        assert_eq!(WebhookId::parse("wh_xyz"), None);
        assert_eq!(WebhookId::parse("wh_00000000deadbeef0"), None);
    }

    #[test]
    fn sequencer_is_monotonic_even_when_the_clock_goes_back() {
        let s = Sequencer::new(0);
        let a = s.next(1000);
        let b = s.next(1000);
        let c = s.next(999);
        let d = s.next(2000);
        assert!(a < b && b < c && c < d);
        assert_eq!(seq_time_ms(a), 1000);
        assert_eq!(seq_time_ms(d), 2000);
        let resumed = Sequencer::new(d);
        assert!(resumed.next(1500) > d);
    }

    #[test]
    fn writers_mint_only_their_own_numbers_and_still_in_time_order() {
        let a = Sequencer::for_writer(0, 0);
        let b = Sequencer::for_writer(0, 7);
        let mut seen = std::collections::HashSet::new();
        let mut last = (0, 0);
        for ms in [1000, 1000, 1000, 1001, 999, 5000] {
            let (x, y) = (a.next(ms), b.next(ms));
            assert_eq!((x & 0xff, y & 0xff), (0, 7));
            assert!(x > last.0 && y > last.1);
            assert!(seen.insert(x) && seen.insert(y));
            last = (x, y);
        }
        assert_eq!(seq_time_ms(last.0), 5000);
        assert_eq!(seq_time_ms(last.1), 5000);
        // A writer taking over a slot continues after everything stored, even numbers another
        // node minted with a clock ahead of its own.
        let ahead = Sequencer::for_writer(0, 3).next(9000);
        let next = Sequencer::for_writer(ahead, 3).next(8000);
        assert!(next > ahead && next & 0xff == 3);
        // 4096 a millisecond per writer before the counter spills into the next one.
        let c = Sequencer::for_writer(0, 255);
        let n: Vec<u64> = (0..4096).map(|_| c.next(1)).collect();
        assert!(n.iter().all(|s| seq_time_ms(*s) == 1));
        assert_eq!(seq_time_ms(c.next(1)), 2);
    }

    #[test]
    fn client_chosen_ids_are_restricted_to_safe_characters() {
        assert!(AccountId::parse("acc_001").is_some());
        assert!(AccountId::parse("customer-42.eu").is_some());
        for bad in ["", "a b", "a/b", "ä", &"x".repeat(65)] {
            assert!(AccountId::parse(bad).is_none(), "{bad}");
        }
        assert!(EventId::parse(&"e".repeat(128)).is_some());
        assert!(EventId::parse(&"e".repeat(129)).is_none());
    }
}
