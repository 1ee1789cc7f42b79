//! The store's format version, and the migrations from older formats.
//!
//! The `meta` tree holds `format_version` (u32, big-endian). [`SledStore::open`](super::SledStore::open)
//! calls [`prepare`] before anything reads the store: a version newer than [`CURRENT`] is
//! refused (the engine exits 2 with one line: a newer binary wrote it, and this one could
//! misread it); an older one is migrated step by step, each step idempotent and each followed
//! by a flush and the new version, so a crash mid-migration re-runs at most that step. Data dirs
//! written before the version existed have no key and are version 1. Step 2 → 3 rewrites the
//! account index in batches of 1 024: one pass over it at the first start of the new binary.
//! A format change is: bump [`CURRENT`], add a step, add a row to this table.
//!
//! | version | what changed                                                              |
//! |---------|---------------------------------------------------------------------------|
//! | 1       | no `format_version`; may hold an `api_keys` tree and one-record log values |
//! | 2       | `format_version` recorded; every `events` value is a chunk; no `api_keys`  |
//! | 3       | `by_account` names events (acc · seq), not deliveries (acc · delivery id)  |

use sled::IVec;

use super::tracked::{Batch, Tree};
use crate::codec;
use crate::model::EventRecord;

/// The format this build writes.
pub const CURRENT: u32 = 3;
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
pub fn read_version(meta: &Tree) -> Result<u32, super::SledError> {
    match meta.get(VERSION_KEY)? {
        None => Ok(1),
        Some(v) => parse_version(&v),
    }
}

fn parse_version(v: &IVec) -> Result<u32, super::SledError> {
    let bytes: [u8; 4] = v
        .as_ref()
        .try_into()
        .map_err(|_| FormatError::Corrupt(v.len()))?;
    Ok(u32::from_be_bytes(bytes))
}

impl super::SledStore {
    /// The format version the store records (after [`prepare`], always [`CURRENT`]).
    pub fn format_version(&self) -> Result<u32, super::SledError> {
        read_version(&self.meta)
    }
}

/// Refuses a newer format and migrates an older one to [`CURRENT`].
pub(super) fn prepare(
    db: &sled::Db,
    meta: &Tree,
    events: &Tree,
    by_account: &Tree,
    path: &std::path::Path,
) -> Result<(), super::SledError> {
    let mut version = read_version(meta)?;
    if version > CURRENT {
        return Err(FormatError::TooNew {
            path: path.display().to_string(),
            found: version,
        }
        .into());
    }
    while version < CURRENT {
        match version {
            1 => migrate_1_to_2(db, events)?,
            2 => migrate_2_to_3(by_account)?,
            _ => {}
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
fn migrate_1_to_2(db: &sled::Db, events: &Tree) -> Result<(), super::SledError> {
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

/// Rewrites `by_account`'s per-delivery entries (acc · delivery id) as one per event (acc ·
/// seq): a delivery id starts with its event's seq. New entries go in before the old ones
/// go; entries already per event are left, so a re-run after a crash finishes the job.
fn migrate_2_to_3(by_account: &Tree) -> Result<(), super::SledError> {
    let mut batch = Batch::default();
    let mut pending = 0;
    let mut last_event: Option<Vec<u8>> = None;
    for kv in by_account.iter() {
        let (key, _) = kv?;
        let Some(&len) = key.first() else { continue };
        let account_end = 1 + len as usize;
        if key.len() != account_end + 16 {
            continue;
        }
        let event = key[..account_end + 8].to_vec();
        if last_event.as_ref() != Some(&event) {
            batch.insert(event.clone(), &[]);
            last_event = Some(event);
        }
        batch.remove(key);
        pending += 1;
        if pending >= 1024 {
            by_account.write_in_order(std::mem::take(&mut batch))?;
            pending = 0;
        }
    }
    by_account.write_in_order(batch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{AccountId, EventId};
    use crate::store::embedded::{SledError, SledStore};

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
                    .insert(
                        crate::store::embedded::keys::seq(seq),
                        codec::encode(&old_event(seq)),
                    )
                    .unwrap();
            }
            db.flush().unwrap();
        }
        {
            let store = SledStore::open(dir.path(), false).unwrap();
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
        match SledStore::open(dir.path(), false) {
            Err(SledError::Format(FormatError::TooNew { found, .. })) => {
                assert_eq!(found, CURRENT + 1)
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a newer format was opened"),
        }
    }

    #[test]
    fn a_version_2_account_index_is_rewritten_per_event_and_lists_every_delivery() {
        use crate::ids::{DeliveryId, WebhookId};
        use crate::model::DeliveryRecord;
        use crate::store::embedded::keys;
        use crate::store::{DeliveryQuery, DeliveryWrites};
        let dir = tempfile::tempdir().unwrap();
        let account = AccountId::parse("acc_old").unwrap();
        let mut ids = Vec::new();
        {
            let store = SledStore::open(dir.path(), false).unwrap();
            let mut records = Vec::new();
            for seq in [5, 9, 12] {
                for wh in [1, 2] {
                    let id = DeliveryId {
                        seq,
                        webhook: WebhookId(wh),
                    };
                    records.push(DeliveryRecord::new(id, &old_event(seq), 0, false));
                    ids.push(id);
                }
            }
            store
                .apply_delivery_writes(&DeliveryWrites::created(records))
                .unwrap();
            // The account index as format 2 wrote it: one entry per delivery.
            for kv in store.by_account.iter() {
                store.by_account.remove(kv.unwrap().0).unwrap();
            }
            for id in &ids {
                let mut key = keys::account_prefix(&account);
                key.extend_from_slice(&id.to_bytes());
                store.by_account.insert(key, &[]).unwrap();
            }
            store.meta.insert(VERSION_KEY, &2u32.to_be_bytes()).unwrap();
            store.make_durable().unwrap();
        }
        let store = SledStore::open(dir.path(), false).unwrap();
        assert_eq!(read_version(&store.meta).unwrap(), CURRENT);
        let entries: Vec<Vec<u8>> = store
            .by_account
            .iter()
            .map(|kv| kv.unwrap().0.to_vec())
            .collect();
        let per_event: Vec<Vec<u8>> = [5, 9, 12]
            .iter()
            .map(|seq| keys::by_account(&account, *seq))
            .collect();
        assert_eq!(entries, per_event);
        // Listed newest first across pages, each delivery once.
        let mut q = DeliveryQuery {
            webhook: None,
            status: None,
            event: None,
            since_ms: None,
            until_ms: None,
            event_seq: None,
            cursor: None,
            limit: 4,
        };
        let first = store.list_deliveries(&account, &q).unwrap();
        q.cursor = first.next_cursor;
        let second = store.list_deliveries(&account, &q).unwrap();
        assert_eq!(second.next_cursor, None);
        let listed: Vec<DeliveryId> = first
            .items
            .iter()
            .chain(&second.items)
            .map(|r| r.id)
            .collect();
        ids.reverse();
        assert_eq!(listed, ids);
    }
}
