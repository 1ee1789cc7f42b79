//! Offline compaction: rewrites a stopped engine's store into a fresh sled directory and swaps
//! it in, so that the data dir holds the live data only (sled keeps 2–3× that on disk).
//!
//! [`compact`] takes the data dir's path. It refuses while an engine holds sled's lock on the
//! `db` file, opens the store (which refuses a newer format and migrates an older one), copies
//! every tracked tree into `PATH.compact-tmp`, copies the data dir's other files (the secrets
//! key file) beside it, syncs everything, and writes the marker `.compact-complete` into the
//! copy. Then the swap: `PATH` → `PATH.compact-old`, `PATH.compact-tmp` → `PATH`, remove the
//! old one and the marker, syncing the parent directory after each rename. [`recover`] (called
//! at engine start and before each compaction) finishes or undoes a swap a crash interrupted:
//!
//! | found                                          | meaning                  | recovery           |
//! |------------------------------------------------|--------------------------|--------------------|
//! | `tmp` without marker                           | copy unfinished          | remove `tmp`       |
//! | `tmp` with marker, `PATH` holds a store        | copy done, swap not begun| remove `tmp`       |
//! | `tmp` with marker, no store at `PATH`          | between the two renames  | rename `tmp`→`PATH`|
//! | `PATH` with marker                             | swapped, not cleaned up  | remove `old`, marker|
//!
//! So at every instant either the old store or the complete new one is (or becomes) `PATH`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::backup::sync_dir;
use super::{Store, StoreError, StoreOptions};

/// Written into the new store once it is complete and synced.
const MARKER: &str = ".compact-complete";
/// Records copied per sled batch.
const BATCH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error("storage.path {0:?} holds no store (no sled `db` file)")]
    NoStore(String),
    #[error(
        "storage.path {0:?} is in use by a running engine (sled's lock on its db file is held): \
         stop the engine first"
    )]
    InUse(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

impl From<sled::Error> for CompactError {
    fn from(e: sled::Error) -> Self {
        CompactError::Store(e.into())
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CompactError + '_ {
    move |source| CompactError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Sizes before and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub records: u64,
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Bytes of every file under `dir`.
pub fn dir_size(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// Gives everything under `dir` (and `dir`) the owner of `like`, so that a store an operator
/// rewrote as root stays the service user's. Only root may change owners: for anyone else the
/// files are theirs already, and this is a no-op.
pub fn own_like(dir: &Path, like: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let want = fs::metadata(like)?;
        let (uid, gid) = (want.uid(), want.gid());
        fn walk(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
            let meta = fs::symlink_metadata(p)?;
            if meta.uid() != uid || meta.gid() != gid {
                std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
            }
            if meta.is_dir() {
                for entry in fs::read_dir(p)? {
                    walk(&entry?.path(), uid, gid)?;
                }
            }
            Ok(())
        }
        walk(dir, uid, gid)
    }
    #[cfg(not(unix))]
    {
        let _ = (dir, like);
        Ok(())
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::File::open(parent)?.sync_all()
}

/// Finishes or undoes a compaction swap a crash interrupted (see the module's table). Cheap
/// when there is nothing to do.
pub fn recover(path: &Path) -> Result<(), CompactError> {
    recover_with(path, true)
}

/// [`recover`] for the engine's start: a leftover copy it may not remove (the service user
/// cannot write the data dir's parent) is reported and left, since the store itself is whole;
/// only a store that is not at `PATH` yet stops the start.
pub fn recover_at_start(path: &Path) -> Result<(), CompactError> {
    recover_with(path, false)
}

fn recover_with(path: &Path, leftovers_fatal: bool) -> Result<(), CompactError> {
    let tmp = sibling(path, ".compact-tmp");
    let old = sibling(path, ".compact-old");
    let leftover = |dir: &Path| -> Result<(), CompactError> {
        match fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if !leftovers_fatal => {
                tracing::warn!(path = %dir.display(), error = %e, "a compaction left this copy behind; remove it (or run `kyberhook compact` again)");
                Ok(())
            }
            Err(e) => Err(io_err(dir)(e)),
        }
    };
    if tmp.exists() {
        if tmp.join(MARKER).exists() && !path.join("db").exists() {
            if path.exists() {
                // An empty directory made where the store belongs (only an empty one goes).
                fs::remove_dir(path).map_err(io_err(path))?;
            }
            fs::rename(&tmp, path).map_err(io_err(path))?;
            sync_parent(path).map_err(io_err(path))?;
            tracing::warn!(path = %path.display(), "finished a compaction a crash interrupted");
        } else {
            leftover(&tmp)?;
        }
    }
    if path.join(MARKER).exists() {
        if old.exists() {
            leftover(&old)?;
        }
        fs::remove_file(path.join(MARKER)).map_err(io_err(path))?;
        fs::File::open(path)
            .and_then(|d| d.sync_all())
            .map_err(io_err(path))?;
    }
    Ok(())
}

/// Fails with [`CompactError::InUse`] while a process holds sled's lock on `PATH/db`.
fn check_not_in_use(path: &Path) -> Result<(), CompactError> {
    use fs2::FileExt;
    let db = path.join("db");
    let file = match fs::OpenOptions::new().read(true).write(true).open(&db) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CompactError::NoStore(path.display().to_string()))
        }
        Err(e) => return Err(io_err(&db)(e)),
    };
    if file.try_lock_exclusive().is_err() {
        return Err(CompactError::InUse(path.display().to_string()));
    }
    // Released when `file` closes; sled takes the same lock when the store opens below.
    Ok(())
}

/// Rewrites the store at `path` into a fresh one and swaps it in. The engine must be stopped.
/// `options` name the secrets key as the engine's config does: the store is opened (and so
/// checked, and migrated if old) before it is copied.
pub fn compact(path: &Path, options: &StoreOptions) -> Result<Compacted, CompactError> {
    recover(path)?;
    check_not_in_use(path)?;
    let tmp = sibling(path, ".compact-tmp");
    let old = sibling(path, ".compact-old");
    let bytes_before = dir_size(path).map_err(io_err(path))?;
    let records = {
        let store = Store::open_with(path, options)?;
        let result = copy_into(&store, path, &tmp);
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result?
    };
    fs::write(tmp.join(MARKER), b"").map_err(io_err(&tmp))?;
    // Run as root on a service user's data dir, the copy stays the service user's.
    own_like(&tmp, path).map_err(io_err(&tmp))?;
    sync_dir(&tmp).map_err(io_err(&tmp))?;
    // The swap; a crash anywhere in it is finished by `recover`.
    if old.exists() {
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    fs::rename(path, &old).map_err(io_err(path))?;
    sync_parent(path).map_err(io_err(path))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_parent(path).map_err(io_err(path))?;
    recover(path)?;
    let bytes_after = dir_size(path).map_err(io_err(path))?;
    Ok(Compacted {
        bytes_before,
        bytes_after,
        records,
    })
}

/// Copies every tracked tree of `store` into a new sled directory `tmp`, and the data dir's
/// files that are not sled's (the secrets key file) beside them.
fn copy_into(store: &Store, path: &Path, tmp: &Path) -> Result<u64, CompactError> {
    if tmp.exists() {
        fs::remove_dir_all(tmp).map_err(io_err(tmp))?;
    }
    fs::create_dir_all(tmp).map_err(io_err(tmp))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path)
            .map_err(io_err(path))?
            .permissions()
            .mode();
        fs::set_permissions(tmp, fs::Permissions::from_mode(mode)).map_err(io_err(tmp))?;
    }
    let fresh = sled::Config::new().path(tmp).open()?;
    let mut records = 0u64;
    for (name, tree) in store.tracker.trees() {
        let target = fresh.open_tree(&name)?;
        let mut batch = sled::Batch::default();
        let mut pending = 0;
        for kv in tree.iter() {
            let (k, v) = kv?;
            batch.insert(k, v);
            pending += 1;
            records += 1;
            if pending == BATCH {
                target.apply_batch(std::mem::take(&mut batch))?;
                pending = 0;
            }
        }
        target.apply_batch(batch)?;
    }
    fresh.flush()?;
    drop(fresh);
    for entry in fs::read_dir(path).map_err(io_err(path))? {
        let entry = entry.map_err(io_err(path))?;
        let name = entry.file_name();
        let is_sleds = matches!(name.to_str(), Some("db" | "conf" | "blobs" | MARKER))
            || name.to_string_lossy().starts_with("snap.");
        if !is_sleds && entry.file_type().map_err(io_err(path))?.is_file() {
            fs::copy(entry.path(), tmp.join(&name)).map_err(io_err(&entry.path()))?;
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_swap_is_finished_or_undone() {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("data");
        let tmp = sibling(&path, ".compact-tmp");
        let old = sibling(&path, ".compact-old");
        // Crashed between the renames: the complete copy becomes the store.
        fs::create_dir_all(&tmp).unwrap();
        fs::write(tmp.join("db"), b"new").unwrap();
        fs::write(tmp.join(MARKER), b"").unwrap();
        fs::create_dir_all(&old).unwrap();
        recover(&path).unwrap();
        assert_eq!(fs::read(path.join("db")).unwrap(), b"new");
        assert!(!old.exists() && !tmp.exists() && !path.join(MARKER).exists());
        // Crashed while copying: the copy goes, the store stays.
        fs::create_dir_all(&tmp).unwrap();
        fs::write(tmp.join("db"), b"half").unwrap();
        recover(&path).unwrap();
        assert!(!tmp.exists());
        assert_eq!(fs::read(path.join("db")).unwrap(), b"new");
        // Nothing to do.
        recover(&path).unwrap();
        assert_eq!(fs::read(path.join("db")).unwrap(), b"new");
    }
}
