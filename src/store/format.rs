//! The store's format version, and the migrations from older formats.
//!
//! The `meta` tree holds `format_version` (u32, big-endian). [`Store::open`](super::Store::open)
//! calls [`prepare`] before anything reads the store: a version newer than [`CURRENT`] is
//! refused (the engine exits 2 with one line: a newer binary wrote it, and this one could
//! misread it); an older one is migrated step by step, each step idempotent and each followed
//! by a flush and the new version, so a crash mid-migration re-runs at most that step. Data dirs
//! written before the version existed have no key and are version 1.
//!
//! | version | what changed                                                              |
//! |---------|---------------------------------------------------------------------------|
//! | 1       | no `format_version`; may hold an `api_keys` tree and one-record log values |
//! | 2       | `format_version` recorded; every `events` value is a chunk; no `api_keys`  |

use sled::IVec;

use super::tracked::{Batch, Tree};
use crate::codec;
use crate::model::EventRecord;

/// The format this build writes.
pub const CURRENT: u32 = 2;
/// The key of the version in the `meta` tree.
pub const VERSION_KEY: &[u8] = b"format_version";
/// The tree version 1 kept API key hashes in (they live in the account record since).
const OBSOLETE_API_KEYS: &[u8] = b"api_keys";

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(
        "the store in {path:?} has format version {found}, newer than this kyberhook knows \
         ({CURRENT}): run the kyberhook that wrote it, or restore a backup into an empty data dir"
    )]
    TooNew { path: String, found: u32 },
    #[error("the store's format_version record is corrupt ({0} bytes)")]
    Corrupt(usize),
}

/// The version a `meta` tree records (1 when it records none).
pub fn read_version(meta: &Tree) -> Result<u32, super::StoreError> {
    match meta.get(VERSION_KEY)? {
        None => Ok(1),
        Some(v) => parse_version(&v),
    }
}

fn parse_version(v: &IVec) -> Result<u32, super::StoreError> {
    let bytes: [u8; 4] = v
        .as_ref()
        .try_into()
        .map_err(|_| FormatError::Corrupt(v.len()))?;
    Ok(u32::from_be_bytes(bytes))
}

impl super::Store {
    /// The format version the store records (after [`prepare`], always [`CURRENT`]).
    pub fn format_version(&self) -> Result<u32, super::StoreError> {
        read_version(&self.meta)
    }
}

/// Refuses a newer format and migrates an older one to [`CURRENT`].
pub(super) fn prepare(
    db: &sled::Db,
    meta: &Tree,
    events: &Tree,
    path: &std::path::Path,
) -> Result<(), super::StoreError> {
    let mut version = read_version(meta)?;
    if version > CURRENT {
        return Err(FormatError::TooNew {
            path: path.display().to_string(),
            found: version,
        }
        .into());
    }
    while version < CURRENT {
        if version == 1 {
            migrate_1_to_2(db, events)?;
        }
        version += 1;
        meta.insert(VERSION_KEY, &version.to_be_bytes())?;
        db.flush()?;
        tracing::info!(version, "store migrated");
    }
    Ok(())
}

/// Drops the obsolete `api_keys` tree and rewrites one-record log values (written before the
/// log was chunked) as chunks of one, under the same key, so chunks still never overlap.
fn migrate_1_to_2(db: &sled::Db, events: &Tree) -> Result<(), super::StoreError> {
    if db.tree_names().iter().any(|n| n == OBSOLETE_API_KEYS) {
        db.drop_tree(OBSOLETE_API_KEYS)?;
    }
    let mut batch = Batch::default();
    let mut pending = 0;
    for kv in events.iter() {
        let (key, value) = kv?;
        if value.first() != Some(&codec::FORMAT_V1) {
            continue;
        }
        let event: EventRecord = codec::decode(&value)?;
        batch.insert(key, codec::encode_chunk(&[(event.seq, &event)]));
        pending += 1;
        if pending == 1024 {
            events.write_in_order(std::mem::take(&mut batch))?;
            pending = 0;
        }
    }
    events.write_in_order(batch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{AccountId, EventId};
    use crate::store::{Store, StoreError};

    fn old_event(seq: u64) -> EventRecord {
        EventRecord {
            seq,
            id: EventId::from_seq(seq),
            account_id: AccountId::parse("acc_old").unwrap(),
            event: "visitor.checked_in".into(),
            body: format!("{{\"n\":{seq}}}").into_bytes(),
        }
    }

    #[test]
    fn a_version_1_store_is_migrated_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Version 1 as the first sessions wrote it: no version, an api_keys tree, and
            // one record per log value.
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("api_keys")
                .unwrap()
                .insert([1u8; 32], "acc_old")
                .unwrap();
            let events = db.open_tree("events").unwrap();
            for seq in [5, 9] {
                events
                    .insert(crate::store::keys::seq(seq), codec::encode(&old_event(seq)))
                    .unwrap();
            }
            db.flush().unwrap();
        }
        {
            let store = Store::open(dir.path(), false).unwrap();
            assert_eq!(read_version(&store.meta).unwrap(), CURRENT);
            assert!(!store.db.tree_names().iter().any(|n| n == b"api_keys"));
            for kv in store.events.iter() {
                assert_eq!(kv.unwrap().1.first(), Some(&codec::CHUNK_V1));
            }
            assert_eq!(store.get_event(5).unwrap(), Some(old_event(5)));
            assert_eq!(store.get_event(9).unwrap(), Some(old_event(9)));
            assert_eq!(store.get_event(7).unwrap(), None);
            store
                .meta
                .insert(VERSION_KEY, &(CURRENT + 1).to_be_bytes())
                .unwrap();
            store.make_durable().unwrap();
        }
        match Store::open(dir.path(), false) {
            Err(StoreError::Format(FormatError::TooNew { found, .. })) => {
                assert_eq!(found, CURRENT + 1)
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a newer format was opened"),
        }
    }
}
