//! A throw-away PostgreSQL cluster for tests and benches: `initdb` into a fresh directory under
//! the temp dir, `pg_ctl start` on a free port of 127.0.0.1 (its Unix socket in the same
//! directory), optionally with TLS, and gone again when dropped — or, for a cluster kept for
//! the whole process in a `static` (never dropped), when the process exits
//! ([`PgCluster::stop_when_process_exits`]).
//!
//! PostgreSQL refuses to run as root, so as root every server program runs as the `postgres`
//! user (`runuser -u postgres --`, the user Debian's package creates) and the directory is
//! handed to it; as anyone else they run as that user. The server runs with `fsync=off` and
//! friends: nothing in it has to survive the test. Self-contained (std and tempfile only), so
//! that `benches/` can include it with `#[path]`.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

pub struct PgCluster {
    pub port: u16,
    /// The cluster's directory: `data/`, `server.log`, the socket, the TLS files.
    pub dir: PathBuf,
    bin: PathBuf,
    /// Dropping the cluster stops it (false once a watchdog does that instead).
    stop_on_drop: bool,
}

/// A PEM certificate chain and its PKCS#8 key, for a cluster that speaks TLS.
pub struct ServerTls<'a> {
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
}

fn as_root() -> bool {
    // `id -u` rather than a syscall crate: this file is shared with the benches.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `program` from `bin`, as the `postgres` user when we are root.
fn server_command(bin: &Path, program: &str) -> Command {
    if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(program));
        c
    } else {
        Command::new(bin.join(program))
    }
}

/// Runs a server program to its end with its output in `log`; the error is one line.
fn run_logged(mut command: Command, log: &Path, what: &str) -> Result<(), String> {
    let out = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let status = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(|e| format!("{what}: {e}"))?;
    if status.success() {
        return Ok(());
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    Err(format!(
        "{what} failed ({status}): {last} (see {})",
        log.display()
    ))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

impl PgCluster {
    /// Creates and starts a cluster with the server programs in `bin`, speaking TLS with
    /// `tls` if given (plaintext is still accepted: clients choose with `sslmode`).
    pub fn start(bin: &Path, tls: Option<ServerTls<'_>>) -> Result<PgCluster, String> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("kyberhook-pg-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?
            .keep();
        let cluster = PgCluster {
            port: 0,
            dir: dir.clone(),
            bin: bin.to_path_buf(),
            stop_on_drop: false,
        };
        let mut settings = vec![
            "-c listen_addresses=127.0.0.1".to_string(),
            format!("-k {}", dir.display()),
            "-c fsync=off".into(),
            "-c synchronous_commit=off".into(),
            "-c full_page_writes=off".into(),
            "-c max_connections=300".into(),
            "-c shared_buffers=64MB".into(),
        ];
        if let Some(tls) = tls {
            std::fs::write(dir.join("server.crt"), tls.cert_pem).map_err(|e| e.to_string())?;
            std::fs::write(dir.join("server.key"), tls.key_pem).map_err(|e| e.to_string())?;
            settings.push("-c ssl=on".into());
            settings.push(format!(
                "-c ssl_cert_file={}",
                dir.join("server.crt").display()
            ));
            settings.push(format!(
                "-c ssl_key_file={}",
                dir.join("server.key").display()
            ));
        }
        {
            use std::os::unix::fs::PermissionsExt;
            let key = dir.join("server.key");
            if key.exists() {
                std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| e.to_string())?;
            }
        }
        if as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&dir)
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !status.success() {
                return Err(format!(
                    "chown -R postgres: {} failed (is there a postgres user?)",
                    dir.display()
                ));
            }
        }
        let mut initdb = server_command(bin, "initdb");
        initdb
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"]);
        if let Err(e) = run_logged(initdb, &dir.join("initdb.log"), "initdb") {
            let log = std::fs::read_to_string(dir.join("initdb.log")).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("{e}: {}", log.lines().last().unwrap_or("")));
        }
        // A port taken between the probe and the start: try another.
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut pg_ctl = server_command(bin, "pg_ctl");
            pg_ctl
                .arg("-D")
                .arg(dir.join("data"))
                .arg("-l")
                .arg(dir.join("server.log"))
                .args(["-w", "-t", "60", "-o"])
                .arg(format!("-p {port} {}", settings.join(" ")))
                .arg("start");
            match run_logged(pg_ctl, &dir.join("pg_ctl.log"), "pg_ctl start") {
                Ok(()) => {
                    eprintln!(
                        "pg_cluster: PostgreSQL on 127.0.0.1:{port} in {} ({:.1} s)",
                        dir.display(),
                        started.elapsed().as_secs_f64()
                    );
                    let mut cluster = cluster;
                    cluster.port = port;
                    cluster.stop_on_drop = true;
                    return Ok(cluster);
                }
                Err(e) => last = e,
            }
        }
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        Err(format!(
            "{last}; server log: {}",
            log.lines().last().unwrap_or("")
        ))
    }

    /// A URL of database `db` as the superuser `postgres` (no password: trust).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The shell command that stops the server at once and removes its directory.
    fn stop_script(&self) -> String {
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.dir.join("data");
        let run = if as_root() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        format!(
            "{run}'{}' -D '{}' -m immediate -w stop >/dev/null 2>&1; rm -rf '{}'",
            pg_ctl.display(),
            data.display(),
            self.dir.display()
        )
    }

    /// Stops the server now and removes its directory.
    pub fn stop(&mut self) {
        if self.stop_on_drop {
            self.stop_on_drop = false;
            let _ = Command::new("sh")
                .args(["-c", &self.stop_script()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Leaves the server running until this process ends, however it ends: a small watchdog
    /// process (`sh`) waits for it, then stops the server and removes its directory. For a
    /// cluster kept in a `static`, whose `Drop` never runs.
    pub fn stop_when_process_exits(mut self) -> PgCluster {
        let script = format!(
            "while kill -0 {} 2>/dev/null; do sleep 0.5; done; {}",
            std::process::id(),
            self.stop_script()
        );
        let spawned = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if spawned.is_ok() {
            self.stop_on_drop = false;
        }
        self
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
