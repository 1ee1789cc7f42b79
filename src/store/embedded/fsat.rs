//! File operations on a data dir that another user may be changing at the same moment.
//!
//! `kyberhook compact` and `restore` run as root on a data dir the service user owns (and
//! can write). Path-based calls — `fs::copy`, `set_permissions`, `read_dir` on a joined path,
//! `File::open` — resolve each name again when they run, so the owner can swap a checked file
//! for a symlink to `/etc/shadow` (read or chmodded as root) or a FIFO (an open that never
//! returns) in between. Everything here works relative to directory descriptors instead: a
//! name is looked at with `lstat` semantics (`statat(…, SYMLINK_NOFOLLOW)`), opened only if it
//! is a regular file or a directory, with `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY` (a swap after
//! the look is caught: a symlink fails to open, a FIFO opens without blocking), checked again
//! through the descriptor (`fstat`: the same inode, still a regular file) and only then read,
//! linked, synced, `fchmod`ed or `fchown`ed — through that descriptor. Symlinks, FIFOs,
//! sockets and devices are skipped, never followed or opened.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, Dir, FileType, Gid, Mode, OFlags, Stat, Uid, CWD};

/// Flags of every open here: never follow, never block on a FIFO, never take a terminal.
fn base_flags() -> OFlags {
    OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC
}

fn kind(stat: &Stat) -> FileType {
    FileType::from_raw_mode(stat.st_mode)
}

/// Opens the directory `path` itself (its last component is not followed).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let fd = rustix::fs::open(
        path,
        base_flags() | OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
    )?;
    Ok(fd)
}

/// The directory `name` inside `dir`, or `None` when it is not a directory (a symlink to one
/// included).
pub fn open_dir_at(dir: &impl AsFd, name: &CStr) -> io::Result<Option<OwnedFd>> {
    match rustix::fs::openat(
        dir,
        name,
        base_flags() | OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP | rustix::io::Errno::NOENT) => {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The regular file `name` inside `dir`, opened read-only (or read-write), or `None` when it is
/// anything else by the time it is opened: missing, a symlink, a FIFO, a device, a directory.
pub fn open_file_at(dir: &impl AsFd, name: &CStr, write: bool) -> io::Result<Option<OwnedFd>> {
    let seen = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(s) => s,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if kind(&seen) != FileType::RegularFile {
        return Ok(None);
    }
    let access = if write { OFlags::RDWR } else { OFlags::RDONLY };
    let fd = match rustix::fs::openat(dir, name, base_flags() | access, Mode::empty()) {
        Ok(fd) => fd,
        // Swapped for a symlink (ELOOP) or removed since the look.
        Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let opened = rustix::fs::fstat(&fd)?;
    if kind(&opened) != FileType::RegularFile
        || opened.st_ino != seen.st_ino
        || opened.st_dev != seen.st_dev
    {
        return Ok(None);
    }
    Ok(Some(fd))
}

/// A directory's entries (without `.` and `..`) with their type as `lstat` sees it now.
pub fn entries(dir: &impl AsFd) -> io::Result<Vec<(CString, FileType)>> {
    let mut out = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let t = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(s) => kind(&s),
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        out.push((name.to_owned(), t));
    }
    Ok(out)
}

/// `chmod 0700` on every directory and `0600` on every regular file with group or other bits,
/// below and including `dir`.
pub fn make_private(dir: &impl AsFd) -> io::Result<()> {
    rustix::fs::fchmod(dir, Mode::from_raw_mode(0o700))?;
    for (name, t) in entries(dir)? {
        match t {
            FileType::Directory => {
                if let Some(sub) = open_dir_at(dir, &name)? {
                    make_private(&sub)?;
                }
            }
            FileType::RegularFile => {
                if let Some(file) = open_file_at(dir, &name, false)? {
                    if rustix::fs::fstat(&file)?.st_mode & 0o077 != 0 {
                        rustix::fs::fchmod(&file, Mode::from_raw_mode(0o600))?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Bytes of the regular files below `dir` (symlinks and the like count nothing).
pub fn tree_size(dir: &impl AsFd) -> io::Result<u64> {
    let mut total = 0;
    for (name, t) in entries(dir)? {
        match t {
            FileType::Directory => {
                if let Some(sub) = open_dir_at(dir, &name)? {
                    total += tree_size(&sub)?;
                }
            }
            FileType::RegularFile => {
                if let Ok(s) = rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
                    total += s.st_size as u64;
                }
            }
            _ => {}
        }
    }
    Ok(total)
}

/// Copies the regular file `name` from `from` to a new file of the same name in `to` (mode
/// 0600; an existing file there is an error). `false` when `name` is not a regular file.
pub fn copy_file(from: &impl AsFd, to: &impl AsFd, name: &CStr) -> io::Result<bool> {
    let Some(src) = open_file_at(from, name, false)? else {
        return Ok(false);
    };
    let dst = rustix::fs::openat(
        to,
        name,
        base_flags() | OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
        Mode::from_raw_mode(0o600),
    )?;
    let mut src = std::fs::File::from(src);
    let mut dst = std::fs::File::from(dst);
    io::copy(&mut src, &mut dst)?;
    dst.sync_all()?;
    Ok(true)
}

/// Mirrors `from` into the empty directory `to` with hard links: every regular file linked
/// (the very inode that was checked, through `/proc/self/fd`, so a swap cannot redirect the
/// link), every directory made anew (mode 0700); anything else is left out.
pub fn link_tree(from: &impl AsFd, to: &impl AsFd) -> io::Result<()> {
    for (name, t) in entries(from)? {
        match t {
            FileType::Directory => {
                if let Some(sub) = open_dir_at(from, &name)? {
                    rustix::fs::mkdirat(to, &name, Mode::from_raw_mode(0o700))?;
                    let Some(target) = open_dir_at(to, &name)? else {
                        return Err(io::Error::other("a directory just made is gone"));
                    };
                    link_tree(&sub, &target)?;
                }
            }
            FileType::RegularFile => {
                if let Some(file) = open_file_at(from, &name, false)? {
                    let proc = format!("/proc/self/fd/{}", file.as_raw_fd());
                    rustix::fs::linkat(CWD, proc.as_str(), to, &name, AtFlags::SYMLINK_FOLLOW)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// `fsync` of every regular file and directory below and including `dir`.
pub fn sync_tree(dir: &impl AsFd) -> io::Result<()> {
    for (name, t) in entries(dir)? {
        match t {
            FileType::Directory => {
                if let Some(sub) = open_dir_at(dir, &name)? {
                    sync_tree(&sub)?;
                }
            }
            FileType::RegularFile => {
                if let Some(file) = open_file_at(dir, &name, false)? {
                    rustix::fs::fsync(&file)?;
                }
            }
            _ => {}
        }
    }
    rustix::fs::fsync(dir)?;
    Ok(())
}

/// The owner of the open file or directory `fd`.
pub fn owner(fd: &impl AsFd) -> io::Result<(u32, u32)> {
    let s = rustix::fs::fstat(fd)?;
    Ok((s.st_uid, s.st_gid))
}

/// Gives every regular file and directory below `dir`, then `dir` itself, to `uid:gid`. The
/// contents go first: while `dir` is still its old owner's (root's, for a fresh copy), nobody
/// else can change what is below it.
pub fn chown_tree(dir: &impl AsFd, uid: u32, gid: u32) -> io::Result<()> {
    for (name, t) in entries(dir)? {
        match t {
            FileType::Directory => {
                if let Some(sub) = open_dir_at(dir, &name)? {
                    chown_tree(&sub, uid, gid)?;
                }
            }
            FileType::RegularFile => {
                if let Some(file) = open_file_at(dir, &name, false)? {
                    chown(&file, uid, gid)?;
                }
            }
            _ => {}
        }
    }
    chown(dir, uid, gid)
}

fn chown(fd: &impl AsFd, uid: u32, gid: u32) -> io::Result<()> {
    if owner(fd)? != (uid, gid) {
        rustix::fs::fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
    }
    Ok(())
}

/// The name as a C string (a name with a NUL byte cannot exist in a directory).
pub fn c_name(name: &str) -> CString {
    CString::new(name).expect("static names have no NUL byte")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn symlinks_and_fifos_are_never_followed_or_opened() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let outside = root.path().join("outside");
        std::fs::write(&outside, b"secret").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&outside, data.join("link")).unwrap();
        std::os::unix::fs::symlink(root.path(), data.join("dirlink")).unwrap();
        rustix::fs::mkfifoat(CWD, data.join("fifo"), Mode::from_raw_mode(0o644)).unwrap();
        std::fs::write(data.join("file"), b"mine").unwrap();
        std::fs::set_permissions(data.join("file"), std::fs::Permissions::from_mode(0o644))
            .unwrap();

        let dir = open_dir(&data).unwrap();
        make_private(&dir).unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&outside), 0o644, "a symlink's target was chmodded");
        assert_eq!(mode(&data.join("file")), 0o600);
        assert_eq!(mode(&data.join("fifo")), 0o644, "the FIFO was opened");

        let copy = root.path().join("copy");
        std::fs::create_dir(&copy).unwrap();
        let to = open_dir(&copy).unwrap();
        for name in ["link", "fifo", "dirlink"] {
            assert!(!copy_file(&dir, &to, &c_name(name)).unwrap(), "{name}");
        }
        assert!(copy_file(&dir, &to, &c_name("file")).unwrap());
        assert_eq!(std::fs::read(copy.join("file")).unwrap(), b"mine");

        let linked = root.path().join("linked");
        std::fs::create_dir(&linked).unwrap();
        link_tree(&dir, &open_dir(&linked).unwrap()).unwrap();
        let names: Vec<_> = std::fs::read_dir(&linked)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["file".to_string()]);
        assert_eq!(tree_size(&dir).unwrap(), 4);
        sync_tree(&dir).unwrap();
        assert!(open_dir(&data.join("dirlink")).is_err());
    }
}
