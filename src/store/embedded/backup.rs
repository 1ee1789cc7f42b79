//! Online backup and restore: a consistent snapshot of every tracked tree as one checksummed
//! stream, taken while the engine keeps writing, and written back into an empty data dir.
//!
//! A snapshot enters through [`SledStore::begin_backup`] (closes the write gate for an instant and
//! starts change tracking, see `tracked`) and leaves through [`Snapshot::write_to`] as a byte
//! stream; [`restore`] reads such a stream into a fresh sled directory and [`verify`] only checks
//! one. The secrets key file is not a sled tree, so it is never in a backup.
//!
//! **Why the snapshot is consistent.** sled 0.34 has no snapshots, so the stream is a fuzzy
//! full scan made exact by re-reading what changed, with writers stopped only at the end:
//!
//! 1. With the gate closed (no mutation in progress), tracking starts: from then on every
//!    mutation lists the keys it wrote *after* writing them.
//! 2. Round 0 scans every tree and emits each (key, value). A key that nobody changes during
//!    the scan is emitted with its value (sled's iterator re-seeks by key, so a key present
//!    throughout is never skipped).
//! 3. Each later round takes the keys listed so far and emits their current value (or a
//!    deletion), until few keys are left (≤ 4 096) or after [`MAX_ROUNDS`] (8).
//! 4. The gate is closed again; the last listed keys are read, tracking stops, the gate opens,
//!    and those values are emitted.
//!
//! Restore applies records in stream order, so the last record of a key wins. Let T be the
//! instant of step 4. A key not changed after step 1 has its value at T from the scan (or is
//! absent and never emitted). A key whose last change before T was at t was listed after t, so
//! it is read again after t, in a later round or in step 4 — and since it does not change
//! between t and T, that read is its value at T. So the stream holds exactly the store as it
//! was at T, an instant between two sled operations. The engine's crash recovery already holds
//! for every such instant (sled recovers a prefix of its operations, and the write order in
//! `store` and `ingest` is chosen so that any prefix is recoverable): every delivery pending at
//! T is in the snapshot with its event and its `schedule` entry, or its event is, with the
//! `inbox` mark that makes start-up fan-out create it. Writers wait only during steps 1 and 4,
//! each as long as it takes to read the keys changed in the last round; the stream itself is
//! written with writers running. So a new writer must keep the crash-recovery write order:
//! the backup relies on it exactly as recovery does. Tested with writers changing a record and
//! its index entry in two steps while a snapshot is taken (this module's tests, which fail
//! when steps 3–4 are skipped), and end to end in `tests/it/maintenance.rs`.
//!
//! **Stream format** (integers big-endian): `KHBACKUP`, stream version u16, store format
//! version u32, creation unix ms u64, tree count u8 and each tree's name (u8 length + bytes);
//! then records — `P` tree u8, key (u32 length + bytes), value (u32 length + bytes); `D` tree
//! u8, key — and the trailer `E`, record count u64, and the SHA-256 of every byte before it.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use sled::IVec;

use super::format;
use super::tracked::{DirtyKey, Tracker};
use super::SledStore;

/// The first bytes of every backup.
pub const MAGIC: &[u8; 8] = b"KHBACKUP";
/// The stream layout this build writes and reads.
pub const STREAM_VERSION: u16 = 1;
/// Catch-up rounds before writers are held for the last one.
pub const MAX_ROUNDS: usize = 8;
/// Catch-up stops once at most this many keys changed during a round.
const FEW_KEYS: usize = 4096;
/// Largest key or value a stream may hold (a corrupt length must not allocate gigabytes).
const MAX_FIELD: usize = 256 << 20;

const PUT: u8 = b'P';
const DELETE: u8 = b'D';
const END: u8 = b'E';

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("a backup is already running")]
    InProgress,
    /// The backend keeps its data elsewhere, backed up by that system's own tools.
    #[error("{0}")]
    NotThisBackend(&'static str),
    #[error("{0}")]
    Store(#[from] super::SledError),
    #[error("writing the backup: {0}")]
    Write(io::Error),
}

impl From<sled::Error> for BackupError {
    fn from(e: sled::Error) -> Self {
        BackupError::Store(e.into())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("reading the backup: {0}")]
    Read(#[from] io::Error),
    #[error("not a kyberhook backup (or a corrupt one): {0}")]
    Corrupt(String),
    #[error(
        "the backup has store format {found}, newer than this kyberhook knows ({}); restore it \
         with the kyberhook that made it",
        format::CURRENT
    )]
    TooNew { found: u32 },
    #[error("writing the restored store: {0}")]
    Store(#[from] sled::Error),
}

/// What a backup or restore moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Records in the stream (puts and deletions, catch-up rounds included).
    pub records: u64,
    /// Catch-up rounds after the full scan (the held final round not counted).
    pub rounds: usize,
    /// Keys read while writers were held.
    pub held_keys: usize,
}

/// A backup that has started tracking; [`Snapshot::write_to`] emits it. Dropping it stops the
/// tracking, so an abandoned backup (client gone) costs the writers nothing afterwards.
pub struct Snapshot {
    store: Arc<SledStore>,
    trees: Vec<(String, sled::Tree)>,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.store.tracker.stop_tracking();
    }
}

impl SledStore {
    /// Starts a backup: holds writers for an instant and starts tracking changes. Fails when
    /// another backup is running.
    pub fn begin_backup(self: &Arc<Self>) -> Result<Snapshot, BackupError> {
        let trees = self.tracker.trees();
        let gate = self.tracker.close_gate();
        if !self.tracker.start_tracking(&gate) {
            return Err(BackupError::InProgress);
        }
        drop(gate);
        Ok(Snapshot {
            store: self.clone(),
            trees,
        })
    }
}

impl crate::store::BackupStream for Snapshot {
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> Result<Summary, BackupError> {
        Snapshot::write_to(*self, out)
    }
}

impl Snapshot {
    /// Writes the snapshot to `out` (blocking: run it on a blocking thread).
    pub fn write_to(self, out: impl Write) -> Result<Summary, BackupError> {
        let mut w = StreamWriter::new(out);
        let mut summary = Summary::default();
        let version = self.store.format_version()?;
        let header = header(version, crate::model::now_ms(), &self.trees);
        w.raw(&header).map_err(BackupError::Write)?;
        for (number, (_, tree)) in self.trees.iter().enumerate() {
            for kv in tree.iter() {
                let (k, v) = kv?;
                w.put(number as u8, &k, Some(&v))
                    .map_err(BackupError::Write)?;
            }
        }
        let tracker: &Tracker = &self.store.tracker;
        while summary.rounds < MAX_ROUNDS && tracker.dirty_len() > FEW_KEYS {
            summary.rounds += 1;
            let keys = tracker.take_dirty();
            for (number, key) in keys {
                let value = self.value(number, &key)?;
                w.put(number, &key, value.as_deref())
                    .map_err(BackupError::Write)?;
            }
        }
        // The last round, with writers held: read only, and write after they may go on.
        let held: Vec<(DirtyKey, Option<IVec>)> = {
            let _gate = tracker.close_gate();
            let keys = tracker.take_dirty();
            let mut values = Vec::with_capacity(keys.len());
            for (number, key) in keys {
                let value = self.value(number, &key)?;
                values.push(((number, key), value));
            }
            tracker.stop_tracking();
            values
        };
        summary.held_keys = held.len();
        for ((number, key), value) in held {
            w.put(number, &key, value.as_deref())
                .map_err(BackupError::Write)?;
        }
        summary.records = w.finish().map_err(BackupError::Write)?;
        Ok(summary)
    }

    fn value(&self, number: u8, key: &[u8]) -> Result<Option<IVec>, BackupError> {
        let (_, tree) = &self.trees[number as usize];
        Ok(tree.get(key)?)
    }
}

fn header(format_version: u32, created_ms: u64, trees: &[(String, sled::Tree)]) -> Vec<u8> {
    let mut h = Vec::with_capacity(64 + trees.len() * 16);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&STREAM_VERSION.to_be_bytes());
    h.extend_from_slice(&format_version.to_be_bytes());
    h.extend_from_slice(&created_ms.to_be_bytes());
    h.push(u8::try_from(trees.len()).expect("fewer than 256 trees"));
    for (name, _) in trees {
        h.push(u8::try_from(name.len()).expect("tree names are short"));
        h.extend_from_slice(name.as_bytes());
    }
    h
}

/// Buffers, hashes and counts what it writes.
struct StreamWriter<W: Write> {
    out: io::BufWriter<W>,
    hash: Sha256,
    records: u64,
}

impl<W: Write> StreamWriter<W> {
    fn new(out: W) -> Self {
        StreamWriter {
            out: io::BufWriter::with_capacity(64 << 10, out),
            hash: Sha256::new(),
            records: 0,
        }
    }

    fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hash.update(bytes);
        self.out.write_all(bytes)
    }

    fn put(&mut self, tree: u8, key: &[u8], value: Option<&[u8]>) -> io::Result<()> {
        self.records += 1;
        self.raw(&[if value.is_some() { PUT } else { DELETE }, tree])?;
        self.raw(&(key.len() as u32).to_be_bytes())?;
        self.raw(key)?;
        if let Some(value) = value {
            self.raw(&(value.len() as u32).to_be_bytes())?;
            self.raw(value)?;
        }
        Ok(())
    }

    fn finish(mut self) -> io::Result<u64> {
        self.raw(&[END])?;
        self.raw(&self.records.to_be_bytes())?;
        let digest: [u8; 32] = self.hash.finalize().into();
        self.out.write_all(&digest)?;
        self.out.flush()?;
        Ok(self.records)
    }
}

/// What a stream's header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub format_version: u32,
    pub created_ms: u64,
    pub trees: Vec<String>,
}

/// One record of a stream.
enum Record {
    Put(u8, Vec<u8>, Vec<u8>),
    Delete(u8, Vec<u8>),
}

/// Reads a stream, hashing what it reads; the trailer is checked at the end.
struct StreamReader<R: Read> {
    input: R,
    hash: Sha256,
    records: u64,
    header: Header,
}

fn corrupt(what: impl Into<String>) -> RestoreError {
    RestoreError::Corrupt(what.into())
}

impl<R: Read> StreamReader<R> {
    fn open(input: R) -> Result<Self, RestoreError> {
        let mut r = StreamReader {
            input,
            hash: Sha256::new(),
            records: 0,
            header: Header {
                format_version: 0,
                created_ms: 0,
                trees: Vec::new(),
            },
        };
        let magic: [u8; 8] = r.array()?;
        if &magic != MAGIC {
            return Err(corrupt("it does not start with KHBACKUP"));
        }
        let version = u16::from_be_bytes(r.array()?);
        if version != STREAM_VERSION {
            return Err(corrupt(format!("unknown stream version {version}")));
        }
        r.header.format_version = u32::from_be_bytes(r.array()?);
        if r.header.format_version > format::CURRENT {
            return Err(RestoreError::TooNew {
                found: r.header.format_version,
            });
        }
        r.header.created_ms = u64::from_be_bytes(r.array()?);
        let [count] = r.array()?;
        for _ in 0..count {
            let [len] = r.array()?;
            let name = r.bytes(len as usize)?;
            let name = String::from_utf8(name).map_err(|_| corrupt("a tree name is not UTF-8"))?;
            r.header.trees.push(name);
        }
        Ok(r)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RestoreError> {
        let mut buf = [0u8; N];
        self.input.read_exact(&mut buf).map_err(truncated)?;
        self.hash.update(buf);
        Ok(buf)
    }

    fn bytes(&mut self, len: usize) -> Result<Vec<u8>, RestoreError> {
        if len > MAX_FIELD {
            return Err(corrupt(format!("a field of {len} bytes")));
        }
        let mut buf = vec![0u8; len];
        self.input.read_exact(&mut buf).map_err(truncated)?;
        self.hash.update(&buf);
        Ok(buf)
    }

    fn field(&mut self) -> Result<Vec<u8>, RestoreError> {
        let len = u32::from_be_bytes(self.array()?) as usize;
        self.bytes(len)
    }

    /// The next record, or `None` after a trailer that checks out.
    fn next(&mut self) -> Result<Option<Record>, RestoreError> {
        let [tag] = self.array()?;
        match tag {
            PUT | DELETE => {
                let [tree] = self.array()?;
                if tree as usize >= self.header.trees.len() {
                    return Err(corrupt(format!("record for tree {tree}")));
                }
                let key = self.field()?;
                self.records += 1;
                if tag == PUT {
                    let value = self.field()?;
                    Ok(Some(Record::Put(tree, key, value)))
                } else {
                    Ok(Some(Record::Delete(tree, key)))
                }
            }
            END => {
                let count = u64::from_be_bytes(self.array()?);
                let expected: [u8; 32] = std::mem::take(&mut self.hash).finalize().into();
                let mut digest = [0u8; 32];
                self.input.read_exact(&mut digest).map_err(truncated)?;
                if count != self.records || digest != expected {
                    return Err(corrupt("the checksum does not match"));
                }
                let mut rest = [0u8; 1];
                if self.input.read(&mut rest)? != 0 {
                    return Err(corrupt("data after the trailer"));
                }
                Ok(None)
            }
            other => Err(corrupt(format!("unknown record tag {other:#04x}"))),
        }
    }
}

fn truncated(e: io::Error) -> RestoreError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        corrupt("it ends early (an interrupted backup?)")
    } else {
        RestoreError::Read(e)
    }
}

/// Reads a whole stream and checks its trailer, writing nothing.
pub fn verify(input: impl Read) -> Result<(Header, u64), RestoreError> {
    let mut r = StreamReader::open(input)?;
    while r.next()?.is_some() {}
    Ok((r.header.clone(), r.records))
}

/// Records applied to the store per sled batch.
const RESTORE_BATCH: usize = 4096;

/// Writes a stream into a new sled store at `dir` (which must not hold one), then flushes it
/// and syncs every file. On any error the caller removes `dir`: a half-restored store is never
/// left to be opened.
pub fn restore(input: impl Read, dir: &Path) -> Result<(Header, u64), RestoreError> {
    let mut r = StreamReader::open(input)?;
    let db = sled::Config::new().path(dir).create_new(true).open()?;
    let trees = r
        .header
        .trees
        .iter()
        .map(|name| db.open_tree(name))
        .collect::<Result<Vec<_>, _>>()?;
    let mut batches: Vec<sled::Batch> = trees.iter().map(|_| sled::Batch::default()).collect();
    let mut pending = 0;
    // One batch per tree: within a batch the last write of a key wins, as in the stream.
    while let Some(record) = r.next()? {
        match record {
            Record::Put(t, k, v) => batches[t as usize].insert(k, v),
            Record::Delete(t, k) => batches[t as usize].remove(k),
        }
        pending += 1;
        if pending == RESTORE_BATCH {
            for (tree, batch) in trees.iter().zip(batches.iter_mut()) {
                tree.apply_batch(std::mem::take(batch))?;
            }
            pending = 0;
        }
    }
    for (tree, batch) in trees.iter().zip(batches) {
        tree.apply_batch(batch)?;
    }
    db.flush()?;
    drop(trees);
    drop(db);
    sync_dir(dir)?;
    Ok((r.header.clone(), r.records))
}

/// `fsync`s every file under `dir`, then the directories themselves (sled's flush is only
/// `sync_file_range`). Through descriptors ([`super::fsat`]): a symlink or FIFO someone put in
/// `dir` is neither followed nor opened.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    super::fsat::sync_tree(&super::fsat::open_dir(dir)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> Arc<SledStore> {
        Arc::new(SledStore::open(dir, false).unwrap())
    }

    fn dump(store: &SledStore) -> Vec<(String, Vec<(IVec, IVec)>)> {
        store
            .tracker
            .trees()
            .into_iter()
            .map(|(name, t)| (name, t.iter().map(|kv| kv.unwrap()).collect()))
            .collect()
    }

    #[test]
    fn a_snapshot_restores_to_the_same_trees_and_refuses_damage() {
        let src = tempfile::tempdir().unwrap();
        let s = store(src.path());
        for i in 0u32..500 {
            s.schedule.insert(i.to_be_bytes(), &[]).unwrap();
            s.accounts
                .insert(format!("acc_{i}"), vec![7u8; i as usize])
                .unwrap();
        }
        let mut bytes = Vec::new();
        let summary = s.begin_backup().unwrap().write_to(&mut bytes).unwrap();
        assert_eq!(
            summary.records as usize,
            1000 + 1,
            "500 + 500 + format_version"
        );
        let (header, records) = verify(bytes.as_slice()).unwrap();
        assert_eq!(header.format_version, format::CURRENT);
        assert_eq!(records, summary.records);

        let dst = tempfile::tempdir().unwrap();
        let target = dst.path().join("restored");
        restore(bytes.as_slice(), &target).unwrap();
        assert_eq!(dump(&store(&target)), dump(&s));

        // Truncated, flipped, or followed by junk: refused.
        for damaged in [
            bytes[..bytes.len() - 1].to_vec(),
            {
                let mut b = bytes.clone();
                let mid = b.len() / 2;
                b[mid] ^= 1;
                b
            },
            [bytes.as_slice(), b"x"].concat(),
        ] {
            assert!(
                matches!(verify(damaged.as_slice()), Err(RestoreError::Corrupt(_))),
                "damage not detected"
            );
        }
        // A newer store format is refused before anything is written.
        let mut newer = bytes.clone();
        newer[10..14].copy_from_slice(&(format::CURRENT + 1).to_be_bytes());
        assert!(matches!(
            restore(newer.as_slice(), &dst.path().join("newer")),
            Err(RestoreError::TooNew { .. })
        ));
        assert!(!dst.path().join("newer").exists());
    }

    /// Writers run flat out during the backup: the restored store equals the source as it was
    /// at some instant. Each writer keeps an invariant across two trees (a record and its
    /// index entry, changed in two separate steps, the index first), which only an exact
    /// instant shows; a fuzzy copy shows index entries without records and the reverse.
    #[test]
    fn a_snapshot_under_concurrent_writes_is_one_instant() {
        let src = tempfile::tempdir().unwrap();
        let s = store(src.path());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0u8..3)
            .map(|w| {
                let s = s.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut n = 0u32;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        // Each of the 3000 ids once per generation (so a record moves one
                        // generation at a time: an id taken as `n % 256` was hit twice in
                        // some generations and skipped others, and a snapshot between the two
                        // steps showed an entry two generations ahead of its record).
                        let k = n % 3000;
                        let id = [w, (k / 256) as u8, (k % 256) as u8];
                        let gen = (n / 3000).to_be_bytes();
                        // Move the record to a new generation: the index entry first, then the
                        // record, then drop the old entry. At any instant, `schedule` holds
                        // [id · gen] for the record's generation, and maybe its neighbours.
                        let old = s.deliveries.get(id).unwrap();
                        s.schedule
                            .insert([&id[..], &gen[..]].concat(), &[])
                            .unwrap();
                        s.deliveries.insert(id, &gen).unwrap();
                        if let Some(old) = old {
                            if old.as_ref() != gen {
                                s.schedule.remove([&id[..], &old[..]].concat()).unwrap();
                            }
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut bytes = Vec::new();
        let summary = s.begin_backup().unwrap().write_to(&mut bytes).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        assert!(summary.records > 0);
        let dst = tempfile::tempdir().unwrap();
        let target = dst.path().join("r");
        restore(bytes.as_slice(), &target).unwrap();
        let r = store(&target);
        let records: Vec<(IVec, IVec)> = r.deliveries.iter().map(|kv| kv.unwrap()).collect();
        assert!(records.len() > 100, "{} records", records.len());
        for (id, gen) in &records {
            let entry = [id.as_ref(), gen.as_ref()].concat();
            assert!(
                r.schedule.contains_key(&entry).unwrap(),
                "record {id:?} has no index entry"
            );
        }
        for kv in r.schedule.iter() {
            let (k, _) = kv.unwrap();
            let (id, gen) = k.split_at(3);
            let g = u32::from_be_bytes(gen.try_into().unwrap());
            let Some(rec) = r.deliveries.get(id).unwrap() else {
                // Only a record's very first entry goes before the record exists.
                assert_eq!(g, 0, "index entry {g} without its record");
                continue;
            };
            let r = u32::from_be_bytes(rec.as_ref().try_into().unwrap());
            assert!(
                (r.saturating_sub(1)..=r + 1).contains(&g),
                "stale index entry {g} for record {r}"
            );
        }
        // Tracking stopped with the backup.
        assert_eq!(s.tracker.dirty_len(), 0);
        s.accounts.insert("later", &[]).unwrap();
        assert_eq!(s.tracker.dirty_len(), 0);
    }
}
