//! The HTTP edge seen from outside: the start-up rules of the admin token (real binary), what
//! the operator's log says about refused destinations, request bodies that stall, and refused
//! bodies that the client sends whole before it reads (raw TCP clients).

use crate::common;

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
fn change_me_and_short_admin_tokens_are_refused_at_start_on_any_address() {
    let dir = tempfile::tempdir().unwrap();
    let short = "s".repeat(31);
    for listen in ["0.0.0.0:0", "127.0.0.1:0"] {
        for token in ["change-me", short.as_str()] {
            let config = write_config(
                dir.path(),
                listen,
                &format!("[auth]\nadmin_token = \"{token}\"\n"),
            );
            for command in ["serve", "check-config"] {
                let (code, stderr) = Binary::start(&[command, "--config", &config], &[]).exit();
                assert_eq!(code, 2, "{listen} {token} {command}: {stderr}");
                assert_eq!(stderr.trim_end().lines().count(), 1, "{command}: {stderr}");
                assert!(stderr.contains("auth.admin_token"), "{command}: {stderr}");
                assert!(stderr.contains("32"), "{command}: {stderr}");
            }
        }
    }
    // The environment's token replaces the file's before the check: a short one there is
    // refused too, a long one makes a short one in the file irrelevant.
    let config = write_config(
        dir.path(),
        "0.0.0.0:0",
        "[auth]\nadmin_token = \"change-me\"\n",
    );
    let (code, stderr) = Binary::start(
        &["check-config", "--config", &config],
        &[("KYBERHOOK_ADMIN_TOKEN", "change-me")],
    )
    .exit();
    assert_eq!(code, 2, "{stderr}");
    let mut engine = Binary::start(
        &["serve", "--config", &config],
        &[(
            "KYBERHOOK_ADMIN_TOKEN",
            "a-secret-from-the-environment-0123456789",
        )],
    );
    assert!(engine.api_addr().ip().is_unspecified());
}

#[tokio::test]
async fn without_a_token_one_is_generated_into_the_data_dir_once_and_its_place_logged() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:0", "");
    let (code, out) = Binary::start(&["check-config", "--config", &config], &[]).exit();
    assert_eq!(code, 0, "{out}");
    let file = dir.path().join("data").join("admin-token");
    let mut engine = Binary::start(&["serve", "--config", &config], &[]);
    let warning = engine.wait_line(|v| {
        v["level"] == "WARN"
            && v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("generated"))
    });
    let message = warning["fields"]["message"].as_str().unwrap();
    assert!(message.contains(&file.display().to_string()), "{message}");
    let addr = engine.api_addr();
    let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert!(token.len() >= 32, "{token}");
    assert!(!message.contains(&token), "the token itself was logged");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let api = Api::new(addr);
    let body = json!({"name": "Acme", "plan": "starter", "id": "acc_gen"});
    let (s, v) = api
        .call(
            Method::POST,
            "/v1/accounts",
            Some(&token),
            Some(body.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, _) = api
        .call(Method::POST, "/v1/accounts", Some("change-me"), Some(body))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    drop(engine);
    // The next start reads the same token and generates nothing.
    let mut engine = Binary::start(&["serve", "--config", &config], &[]);
    let api = Api::new(engine.api_addr());
    let (s, _) = api
        .call(Method::GET, "/v1/accounts/acc_gen", Some(&token), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), token);
    assert!(
        !engine.seen.iter().any(|l| l.contains("generated")),
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

/// A test engine whose `[server]` section also holds `server_extra`.
async fn engine_with_server(server_extra: &str) -> TestEngine {
    let pki = pki();
    let data = tempfile::tempdir().unwrap();
    let toml = config_toml(data.path(), &pki.ca_file, "", "").replace(
        "[server]\nlisten = \"127.0.0.1:0\"\n",
        &format!("[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n"),
    );
    let config = kyberhook::config::Config::from_toml(&toml, "t").unwrap();
    TestEngine::start_with(config, data).await
}

fn api_addr(e: &TestEngine) -> std::net::SocketAddr {
    e.engine.as_ref().unwrap().api_addr()
}

fn ingest_head(content_length: Option<usize>, token: &str) -> String {
    let framing = match content_length {
        Some(n) => format!("content-length: {n}"),
        None => "transfer-encoding: chunked".to_string(),
    };
    format!(
        "POST /v1/events HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\n{framing}\r\n\r\n"
    )
}

/// The status line and the JSON error code of a whole response read up to EOF.
fn status_and_code(response: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(response);
    let status = text.lines().next().unwrap_or_default().to_string();
    let code = text
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str::<Value>(body).ok())
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_default();
    (status, code)
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_answered_408_and_the_connection_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = engine_with_server("body_read_timeout = \"300ms\"").await;
    // One client stops after part of its body; another trickles it a byte every 50 ms, which
    // an idle timeout would never end: the deadline is for the whole body.
    let stalled = async {
        let mut sock = tokio::net::TcpStream::connect(api_addr(&e)).await.unwrap();
        sock.write_all(format!("{}{{\"account_id\":", ingest_head(Some(1000), ADMIN)).as_bytes())
            .await
            .unwrap();
        let started = Instant::now();
        let mut response = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut response)).await;
        assert!(read.is_ok(), "the connection was still open after 5 s");
        (started.elapsed(), response)
    };
    let trickled = async {
        let mut sock = tokio::net::TcpStream::connect(api_addr(&e)).await.unwrap();
        sock.write_all(ingest_head(Some(1000), ADMIN).as_bytes())
            .await
            .unwrap();
        let started = Instant::now();
        let mut response = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if sock.write_all(b" ").await.is_err() {
                        break;
                    }
                }
                n = sock.read(&mut byte) => match n {
                    Ok(1) => response.push(byte[0]),
                    _ => break,
                },
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "still open after 5 s"
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut response)).await;
        (started.elapsed(), response)
    };
    let ((stalled_after, stalled), (trickled_after, trickled)) = tokio::join!(stalled, trickled);
    for (after, response) in [(stalled_after, stalled), (trickled_after, trickled)] {
        let (status, code) = status_and_code(&response);
        assert!(status.starts_with("HTTP/1.1 408"), "{status}");
        assert_eq!(code, "request_timeout");
        assert!(after < Duration::from_secs(3), "closed after {after:?}");
    }
    // Nothing of either body was taken as an event, and the engine serves on.
    let (s, _) = e.api.admin(Method::GET, "/healthz", None).await;
    assert_eq!(s, StatusCode::OK);
    e.stop().await;
}

/// Writes `head` and then `body` in full before reading anything, as Python's `requests` and
/// Java's `HttpURLConnection` do; returns the response, or the write or read error.
fn send_whole_then_read(
    addr: std::net::SocketAddr,
    head: String,
    body: Vec<u8>,
) -> Result<Vec<u8>, String> {
    use std::io::{Read, Write};
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.write_all(head.as_bytes())
        .and_then(|()| sock.write_all(&body))
        .map_err(|e| format!("writing the body failed: {e}"))?;
    let mut response = Vec::new();
    sock.read_to_end(&mut response)
        .map_err(|e| format!("reading the response failed: {e}"))?;
    Ok(response)
}

#[tokio::test]
async fn a_client_that_sends_a_refused_body_whole_before_reading_gets_the_answer() {
    let e = engine_with_server("").await;
    let addr = api_addr(&e);
    // 8 MiB against server.max_body_bytes = 64 KiB: more than the socket buffers hold, so a
    // server that stops reading makes the client's write fail.
    const SIZE: usize = 8 << 20;
    let declared = tokio::task::spawn_blocking(move || {
        send_whole_then_read(addr, ingest_head(Some(SIZE), ADMIN), vec![b' '; SIZE])
    });
    let chunked = tokio::task::spawn_blocking(move || {
        let mut body = Vec::with_capacity(SIZE + 4096);
        for _ in 0..SIZE / 65_536 {
            body.extend_from_slice(b"10000\r\n");
            body.extend_from_slice(&[b' '; 65_536]);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
        send_whole_then_read(addr, ingest_head(None, ADMIN), body)
    });
    // Refused before the body is looked at (no such token): the same holds.
    let unauthorized = tokio::task::spawn_blocking(move || {
        send_whole_then_read(
            addr,
            ingest_head(Some(SIZE), "wrong-token"),
            vec![b' '; SIZE],
        )
    });
    for (name, task, want_status, want_code) in [
        (
            "content-length",
            declared,
            "HTTP/1.1 413",
            "payload_too_large",
        ),
        ("chunked", chunked, "HTTP/1.1 413", "payload_too_large"),
        ("unauthorized", unauthorized, "HTTP/1.1 401", "unauthorized"),
    ] {
        let response = task
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (status, code) = status_and_code(&response);
        assert!(status.starts_with(want_status), "{name}: {status}");
        assert_eq!(code, want_code, "{name}");
    }
    e.stop().await;
}

#[tokio::test]
async fn over_tls_too_the_refused_body_is_drained_and_the_answer_arrives() {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = pki();
    let e = engine_with_server(&format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        pki.cert_file.display(),
        pki.key_file.display()
    ))
    .await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_file_iter(&pki.ca_file).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(api_addr(&e)).await.unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    const SIZE: usize = 8 << 20;
    let exchange = async {
        stream
            .write_all(ingest_head(Some(SIZE), ADMIN).as_bytes())
            .await
            .map_err(|e| format!("writing the head failed: {e}"))?;
        stream
            .write_all(&vec![b' '; SIZE])
            .await
            .map_err(|e| format!("writing the body failed: {e}"))?;
        stream.flush().await.map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("reading the response failed: {e}"))?;
        Ok::<_, String>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .expect("answered within 20 s")
        .unwrap();
    let (status, code) = status_and_code(&response);
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
    assert_eq!(code, "payload_too_large");
    e.stop().await;
}
