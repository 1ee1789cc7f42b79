//! Files the engine generates once into its data dir (the secrets key, the admin token), made
//! safe for nodes that start at the same moment on one data dir.
//!
//! [`publish`] writes the contents to a private temporary file, makes it durable, then links it
//! under its final name. The link either appears whole or fails because another process linked
//! first; it never overwrites and a reader never sees half a file. The loser is told so and
//! reads the winner's file, so both processes end up with the same key or token.

use std::io::Write;
use std::path::Path;

/// What [`publish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Our contents are now the file.
    Created,
    /// A file of that name was already there (perhaps linked a moment ago by another node);
    /// it was left alone.
    Exists,
}

/// Writes `contents` to a new file `path` (mode 0600), durable with its directory entry, unless
/// `path` exists already.
pub fn publish(path: &Path, contents: &[u8]) -> std::io::Result<Published> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = dir.join(format!(".{name}.{}.tmp", crate::ids::random_hex(8)));
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&staging)?;
        file.write_all(contents)?;
        file.sync_all()?;
        match std::fs::hard_link(&staging, path) {
            Ok(()) => Ok(Published::Created),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Published::Exists),
            Err(e) => Err(e),
        }
    })();
    let _ = std::fs::remove_file(&staging);
    let published = result?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(published)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_publisher_wins_and_no_staging_file_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        assert_eq!(publish(&path, b"one\n").unwrap(), Published::Created);
        assert_eq!(publish(&path, b"two\n").unwrap(), Published::Exists);
        assert_eq!(std::fs::read(&path).unwrap(), b"one\n");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("key")]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn racing_publishers_agree_on_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    (i, publish(&path, format!("{i}\n").as_bytes()).unwrap())
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let winners: Vec<_> = results
            .iter()
            .filter(|(_, p)| *p == Published::Created)
            .collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", winners[0].0)
        );
    }
}
