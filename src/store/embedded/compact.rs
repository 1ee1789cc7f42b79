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
//! At engine start ([`recover_at_start`], before the data dir could be created) a leftover
//! copy the service user may not remove (it cannot write the data dir's parent, e.g.
//! `/var/lib`) is logged and left; only a store not yet back at `PATH` stops the start (exit
//! 2, naming the command that finishes it).
//! A leftover `PATH.compact-src` (see below) holds only hard links and is removed.
//!
//! Run as root on a data dir another user owns (the package's `/var/lib/kyberhook`), every
//! file operation goes through descriptors ([`super::fsat`]): nothing in the data dir is
//! followed if it is a symlink or opened if it is a FIFO or device, whatever its owner swaps in
//! meanwhile. sled itself opens its files by path, so it is not pointed at the owner's
//! directory: the data dir's regular files are first hard-linked (each the inode that was
//! checked) into `PATH.compact-src`, a directory only root can enter, and the store is opened
//! there. The new store is written into `PATH.compact-tmp`, also root's alone (mode 0700), and
//! synced; only then are its files, and last the directory itself, given to the data dir's
//! owner, and nothing in it is opened again before the swap.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use std::os::fd::OwnedFd;

use super::{fsat, SledError, SledStore, StoreOptions};

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
    Store(#[from] SledError),
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

/// Bytes of the regular files under `dir` (symlinks and the like are not followed).
pub fn dir_size(dir: &Path) -> io::Result<u64> {
    fsat::tree_size(&fsat::open_dir(dir)?)
}

/// Gives everything under `dir`, then `dir`, the owner of `like`, so that a store an operator
/// rewrote as root stays the service user's. Only root may change owners: for anyone else the
/// files are theirs already, and this is a no-op. `dir` must be a fresh copy only its current
/// owner can enter: the contents change hands before the directory does ([`fsat::chown_tree`]).
pub fn own_like(dir: &Path, like: &Path) -> io::Result<()> {
    let (uid, gid) = fsat::owner(&fsat::open_dir(like)?)?;
    fsat::chown_tree(&fsat::open_dir(dir)?, uid, gid)
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

/// Whether `path` names anything, a symlink included, without following it.
fn present(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn recover_with(path: &Path, leftovers_fatal: bool) -> Result<(), CompactError> {
    let tmp = sibling(path, ".compact-tmp");
    let old = sibling(path, ".compact-old");
    let staged = sibling(path, ".compact-src");
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
    if present(&staged) {
        // Hard links into the data dir only: removing them changes no data.
        leftover(&staged)?;
    }
    if present(&tmp) {
        if present(&tmp.join(MARKER)) && !present(&path.join("db")) {
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
    if present(&path.join(MARKER)) {
        if present(&old) {
            leftover(&old)?;
        }
        fs::remove_file(path.join(MARKER)).map_err(io_err(path))?;
        fs::File::open(path)
            .and_then(|d| d.sync_all())
            .map_err(io_err(path))?;
    }
    Ok(())
}

/// Fails with [`CompactError::InUse`] while a process holds sled's lock on `PATH/db`
/// (`source` is `PATH` opened). A `db` that is not a regular file is no store.
fn check_not_in_use(source: &OwnedFd, path: &Path) -> Result<(), CompactError> {
    use fs2::FileExt;
    let db = path.join("db");
    let file = fsat::open_file_at(source, &fsat::c_name("db"), true)
        .map_err(io_err(&db))?
        .ok_or_else(|| CompactError::NoStore(path.display().to_string()))?;
    let file = fs::File::from(file);
    if file.try_lock_exclusive().is_err() {
        return Err(CompactError::InUse(path.display().to_string()));
    }
    // Released when `file` closes; sled takes the same lock when the store opens below.
    Ok(())
}

/// A new directory `dir` only the current user (root, when it matters) may enter.
fn private_dir(dir: &Path) -> Result<OwnedFd, CompactError> {
    if present(dir) {
        fs::remove_dir_all(dir).map_err(io_err(dir))?;
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
    }
    let fd = fsat::open_dir(dir).map_err(io_err(dir))?;
    rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o700))
        .map_err(|e| io_err(dir)(e.into()))?;
    Ok(fd)
}

/// Rewrites the store at `path` into a fresh one and swaps it in. The engine must be stopped.
/// `options` name the secrets key as the engine's config does: the store is opened (and so
/// checked, and migrated if old) before it is copied.
pub fn compact(path: &Path, options: &StoreOptions) -> Result<Compacted, CompactError> {
    recover(path)?;
    let source = match fsat::open_dir(path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CompactError::NoStore(path.display().to_string()))
        }
        Err(e) => return Err(io_err(path)(e)),
    };
    check_not_in_use(&source, path)?;
    let tmp = sibling(path, ".compact-tmp");
    let old = sibling(path, ".compact-old");
    let staged = sibling(path, ".compact-src");
    let bytes_before = fsat::tree_size(&source).map_err(io_err(path))?;
    let (uid, gid) = fsat::owner(&source).map_err(io_err(path))?;
    // Someone else's data dir (we are root): sled opens hard links of its files in a directory
    // of ours, never the owner's directory itself (see the module docs).
    let foreign = uid != rustix::process::geteuid().as_raw();
    let copied = (|| {
        let opened_at = if foreign {
            let links = private_dir(&staged)?;
            fsat::link_tree(&source, &links).map_err(io_err(&staged))?;
            staged.as_path()
        } else {
            path
        };
        let store = SledStore::open_with(opened_at, options)?;
        let opened = fsat::open_dir(opened_at).map_err(io_err(opened_at))?;
        let out = private_dir(&tmp)?;
        let records = copy_into(&store, &opened, opened_at, &tmp, &out)?;
        drop(store);
        Ok::<_, CompactError>((records, out))
    })();
    if foreign {
        let _ = fs::remove_dir_all(&staged);
    }
    let (records, out) = match copied {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let marker = rustix::fs::openat(
        &out,
        MARKER,
        rustix::fs::OFlags::WRONLY
            | rustix::fs::OFlags::CREATE
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .map_err(|e| io_err(&tmp)(e.into()))?;
    drop(marker);
    // Synced while the copy is root's alone, then handed over, contents first: nothing in it
    // is opened again after its owner could reach it.
    fsat::sync_tree(&out).map_err(io_err(&tmp))?;
    fsat::chown_tree(&out, uid, gid).map_err(io_err(&tmp))?;
    // The swap; a crash anywhere in it is finished by `recover`.
    if present(&old) {
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    fs::rename(path, &old).map_err(io_err(path))?;
    sync_parent(path).map_err(io_err(path))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_parent(path).map_err(io_err(path))?;
    recover(path)?;
    let bytes_after = fsat::tree_size(&out).map_err(io_err(path))?;
    Ok(Compacted {
        bytes_before,
        bytes_after,
        records,
    })
}

/// Copies every tracked tree of `store` into a new sled directory `tmp` (`out` open), and the
/// regular files of the store's directory (`from`, open as `from_fd`) that are not sled's —
/// the secrets key and the generated admin token — beside them, through descriptors.
fn copy_into(
    store: &SledStore,
    from_fd: &OwnedFd,
    from: &Path,
    tmp: &Path,
    out: &OwnedFd,
) -> Result<u64, CompactError> {
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
    for (name, kind) in fsat::entries(from_fd).map_err(io_err(from))? {
        let text = name.to_string_lossy();
        let is_sleds =
            matches!(&*text, "db" | "conf" | "blobs" | MARKER) || text.starts_with("snap.");
        if !is_sleds && kind == rustix::fs::FileType::RegularFile {
            fsat::copy_file(from_fd, out, &name).map_err(io_err(&from.join(&*text)))?;
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
