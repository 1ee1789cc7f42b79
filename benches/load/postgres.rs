//! `--backend postgres`: the PostgreSQL the engines under test share — the cluster given, or a
//! throw-away one this bench starts with `.ci/postgres` (Debian's packages, trust auth on
//! 127.0.0.1, `fsync` on: the same durability as the sled engines) and stops when it ends —
//! a fresh database per engine, and the server's CPU (its processes, read from `/proc`).

use std::path::PathBuf;
use std::process::Command;

/// A cluster this bench started: stopped (immediate shutdown) and removed when dropped.
pub struct OwnCluster {
    data: PathBuf,
    bin: PathBuf,
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let ctl = self.bin.join("pg_ctl");
        let data = self.data.display().to_string();
        let args = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let as_postgres = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&ctl)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success());
        if !as_postgres {
            let _ = Command::new(&ctl).args(args).output();
        }
        // ~2 GB after a full run: repeated runs would fill the disk.
        if let Some(dir) = self.data.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Starts a throw-away cluster; its server URL (no database) and its guard.
pub fn start_cluster() -> (String, OwnCluster) {
    let dir = tempfile::Builder::new()
        .prefix("kh-bench-pg.")
        .tempdir()
        .expect("a temp dir")
        .keep();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/postgres");
    let out = Command::new("bash")
        .arg(script)
        .arg(&dir)
        .output()
        .expect("run .ci/postgres");
    if !out.status.success() {
        eprintln!(
            "load bench: .ci/postgres failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::process::exit(2);
    }
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|rd| {
            let mut v: Vec<PathBuf> = rd.flatten().map(|e| e.path().join("bin")).collect();
            v.sort();
            v.pop()
        })
        .unwrap_or_default();
    eprintln!("load bench: PostgreSQL at {url} ({})", dir.display());
    (
        url,
        OwnCluster {
            data: dir.join("data"),
            bin,
        },
    )
}

/// A fresh database on the cluster at `base` (`postgres://USER@HOST:PORT`): its URL.
pub async fn fresh_database(base: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let base = base.trim_end_matches('/');
    let name = format!(
        "kh_bench_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let admin = format!("{base}/postgres?sslmode=disable");
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {admin}: {e}"));
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    format!("{base}/{name}?sslmode=disable")
}

/// CPU seconds of every `postgres` process on the machine (the server and its backends).
pub fn server_cpu_s() -> f64 {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    rd.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| crate::procstat::stat_cpu_s(&stat))
        .filter(|(name, _)| name == "postgres")
        .map(|(_, s)| s)
        .sum()
}
