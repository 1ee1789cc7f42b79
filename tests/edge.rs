//! The HTTP edge seen from outside: the start-up guard on the admin token (real binary), what
//! the operator's log says about refused destinations, request bodies that stall, and refused
//! bodies that the client sends whole before it reads (raw TCP clients).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

/// The binary, killed when dropped, with its stderr lines arriving on a channel.
struct Binary {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Binary {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Binary {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kyberhook"));
        cmd.args(args)
            .env_remove("KYBERHOOK_ADMIN_TOKEN")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Binary {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for the log line that names the API address (JSON log format).
    fn api_addr(&mut self) -> std::net::SocketAddr {
        let line = self.wait_line(|v| v["fields"]["api"].is_string());
        line["fields"]["api"].as_str().unwrap().parse().unwrap()
    }

    /// The next JSON log line for which `pred` holds, within 20 s.
    fn wait_line(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no such log line within 20 s; seen: {:#?}", self.seen));
            self.seen.push(line.clone());
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if pred(&v) {
                    return v;
                }
            }
        }
    }

    /// The exit code and everything written to stderr, if the process ends within 20 s.
    fn exit(mut self) -> (i32, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The reader thread ends at EOF; collect what it still holds.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    self.seen.push(line);
                }
                return (status.code().unwrap_or(-1), self.seen.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("still running after 20 s; stderr so far: {:#?}", self.seen);
    }
}

fn write_config(dir: &Path, listen: &str, extra: &str) -> String {
    let path = dir.join("kh.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"{listen}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = \"{}\"\n[log]\nformat = \"json\"\n{extra}",
            dir.join("data").display()
        ),
    )
    .unwrap();
    path.display().to_string()
}

#[test]
fn the_default_admin_token_is_refused_when_the_api_is_not_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "0.0.0.0:0", "");
    for command in ["serve", "check-config"] {
        let (code, stderr) = Binary::start(&[command, "--config", &config], &[]).exit();
        assert_eq!(code, 2, "{command}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{command}: {stderr}");
        assert!(stderr.contains("auth.admin_token"), "{command}: {stderr}");
        assert!(stderr.contains("loopback"), "{command}: {stderr}");
    }
    // The environment's token replaces the default before the check.
    let mut engine = Binary::start(
        &["serve", "--config", &config],
        &[("KYBERHOOK_ADMIN_TOKEN", "a-secret-from-the-environment")],
    );
    assert!(engine.api_addr().ip().is_unspecified());
    // So does a token in the file.
    let config = write_config(
        dir.path(),
        "0.0.0.0:0",
        "[auth]\nadmin_token = \"a-secret-in-the-file\"\n",
    );
    let (code, out) = Binary::start(&["check-config", "--config", &config], &[]).exit();
    assert_eq!(code, 0, "{out}");
}

#[test]
fn the_default_admin_token_on_loopback_starts_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:0", "");
    let mut engine = Binary::start(&["serve", "--config", &config], &[]);
    let addr = engine.api_addr();
    let warning = engine.wait_line(|v| {
        v["level"] == "WARN"
            && v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("auth.admin_token"))
    });
    let message = warning["fields"]["message"].as_str().unwrap();
    assert!(message.contains("change-me"), "{message}");
    assert!(message.contains(&addr.to_string()), "{message}");
    drop(engine);
    // Not with a token of the operator's own.
    let config = write_config(
        dir.path(),
        "127.0.0.1:0",
        "[auth]\nadmin_token = \"a-secret-in-the-file\"\n",
    );
    let mut engine = Binary::start(&["serve", "--config", &config], &[]);
    let addr = engine.api_addr();
    // Whatever the engine logs until it answers a request came after the warning's place.
    let api = Api::new(addr);
    let (s, _) = tokio::runtime::Runtime::new().unwrap().block_on(api.call(
        Method::GET,
        "/healthz",
        None,
        None,
    ));
    assert_eq!(s, StatusCode::OK);
    while let Ok(line) = engine.lines.recv_timeout(Duration::from_millis(300)) {
        engine.seen.push(line);
    }
    assert!(
        !engine.seen.iter().any(|l| l.contains("auth.admin_token")),
        "{:#?}",
        engine.seen
    );
}

#[tokio::test]
async fn a_refused_destination_is_detailed_in_the_operators_log_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "127.0.0.1:0",
        &format!("[auth]\nadmin_token = \"{ADMIN}\"\n[delivery]\nretry_schedule = []\n"),
    );
    let mut engine = Binary::start(&["serve", "--config", &config], &[]);
    let api = Api::new(engine.api_addr());
    let (s, acc) = api
        .admin(
            Method::POST,
            "/v1/accounts",
            Some(json!({"name": "Probe", "plan": "enterprise", "id": "acc_probe"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{acc}");
    let acc = acc["id"].as_str().unwrap().to_string();
    let (s, hook) = api
        .admin(
            Method::POST,
            &format!("/v1/accounts/{acc}/webhooks"),
            Some(json!({"name": "inside", "url": "https://127.0.0.1:9/hook", "events": ["*"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{hook}");
    let (s, tested) = api
        .admin(
            Method::POST,
            &format!(
                "/v1/accounts/{acc}/webhooks/{}/test",
                hook["id"].as_str().unwrap()
            ),
            Some(json!({"event": "user.login"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{tested}");
    assert_eq!(tested["error"], "destination is not allowed", "{tested}");
    let delivery = tested["delivery_id"].as_str().unwrap().to_string();
    let logged = engine.wait_line(|v| v["fields"]["delivery"] == delivery.as_str());
    assert_eq!(logged["level"], "WARN", "{logged}");
    let detail = logged["fields"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("127.0.0.1") && detail.contains("loopback"),
        "{logged}"
    );
}
