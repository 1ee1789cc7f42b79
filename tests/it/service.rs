//! The binary as a systemd service runs it: `READY=1` on `NOTIFY_SOCKET` once start-up recovery
//! is done, `STOPPING=1` when SIGTERM starts the graceful shutdown, exit 0; and the admin token
//! read from `auth.admin_token_file` (a missing file is exit 2 naming the key).

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn config(dir: &std::path::Path, token_file: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [storage]\npath = {:?}\n[auth]\nadmin_token_file = {:?}\n",
            dir.join("data").display().to_string(),
            token_file.display().to_string()
        ),
    )
    .unwrap();
    path
}

fn receive(socket: &UnixDatagram, wait: Duration) -> Vec<String> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => {
                got.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_string());
                return got;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
    got
}

#[test]
fn the_service_manager_hears_ready_after_recovery_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "a-token-from-a-file-0123456789\n").unwrap();
    let config = config(dir.path(), &token);
    let sock_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&sock_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    let child = Command::new(env!("CARGO_BIN_EXE_kyberhook"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env_remove("KYBERHOOK_ADMIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = receive(&socket, Duration::from_secs(60));
    assert_eq!(ready, vec!["READY=1".to_string()], "readiness notification");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let stopping = receive(&socket, Duration::from_secs(30));
    assert_eq!(stopping, vec!["STOPPING=1".to_string()]);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "graceful exit: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_missing_admin_token_file_is_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &dir.path().join("no-such-token"));
    let out = Command::new(env!("CARGO_BIN_EXE_kyberhook"))
        .args(["check-config", "--config"])
        .arg(&config)
        .env_remove("KYBERHOOK_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("auth.admin_token_file"), "{err}");
}
