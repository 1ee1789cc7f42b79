//! Outbound address guard, TLS serving, config errors at the binary's edge, and hostile input.

use crate::common;

use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

async fn first_attempt_error(e: &TestEngine, acc: &str, wh: &str) -> String {
    let d = e
        .newest_delivery(acc, wh, WAIT, |d| d["attempt_count"] == 1)
        .await;
    d["attempts"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn private_addresses_are_never_called_without_the_allowlist() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(
        &pki,
        "private_network_allowlist = []\nretry_schedule = [\"1h\"]",
        "",
    )
    .await;
    let (acc, _) = e.account("acc_ssrf", "enterprise").await;
    let by_ip = e.webhook(&acc, &rx.url, &["*"]).await;
    let by_name = e
        .webhook(
            &acc,
            &format!("https://localhost:{}/hook", rx.addr.port()),
            &["*"],
        )
        .await;
    let v6 = e
        .webhook(
            &acc,
            &format!("https://[::ffff:127.0.0.1]:{}/hook", rx.addr.port()),
            &["*"],
        )
        .await;
    e.event(&acc, "user.login", json!({})).await;
    for hook in [&by_ip, &by_name, &v6] {
        let id = hook["id"].as_str().unwrap();
        // The delivery log and the test tool say only that the destination is not allowed:
        // naming what the host resolved to (or why it is refused) would let a tenant map the
        // internal network with webhook URLs.
        let err = first_attempt_error(&e, &acc, id).await;
        assert_eq!(err, "destination is not allowed");
        let (s, tested) = e
            .api
            .admin(
                Method::POST,
                &format!("/v1/accounts/{acc}/webhooks/{id}/test"),
                Some(json!({"event": "user.login"})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{tested}");
        assert_eq!(tested["error"], "destination is not allowed", "{tested}");
    }
    rx.assert_quiet(Duration::from_millis(200)).await;
    assert_eq!(rx.count(), 0, "a private address was called");
    e.stop().await;
}

#[tokio::test]
async fn an_unresolvable_host_is_reported_without_the_resolvers_words() {
    let pki = pki();
    let e = TestEngine::start(&pki, "retry_schedule = [\"1h\"]", "").await;
    let (acc, _) = e.account("acc_nxdomain", "enterprise").await;
    // `.invalid` never resolves (RFC 2606).
    let hook = e
        .webhook(&acc, "https://no-such-host.invalid/hook", &["*"])
        .await;
    let id = hook["id"].as_str().unwrap();
    e.event(&acc, "user.login", json!({})).await;
    assert_eq!(
        first_attempt_error(&e, &acc, id).await,
        "host cannot be resolved"
    );
    let (s, tested) = e
        .api
        .admin(
            Method::POST,
            &format!("/v1/accounts/{acc}/webhooks/{id}/test"),
            Some(json!({"event": "user.login"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{tested}");
    assert_eq!(tested["error"], "host cannot be resolved", "{tested}");
    e.stop().await;
}

#[tokio::test]
async fn an_ip_allowlist_pins_where_a_webhook_may_be_called() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(&pki, "retry_schedule = [\"1h\"]", "").await;
    let (acc, _) = e.account("acc_pin", "enterprise").await;
    let (s, pinned) = e
        .api
        .admin(
            Method::POST,
            &format!("/v1/accounts/{acc}/webhooks"),
            Some(json!({"name": "pinned", "url": format!("https://localhost:{}/hook", rx.addr.port()), "events": ["*"], "ip_allowlist": ["192.0.2.0/24"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{pinned}");
    let (s, open) = e
        .api
        .admin(
            Method::POST,
            &format!("/v1/accounts/{acc}/webhooks"),
            Some(json!({"name": "open", "url": rx.url, "events": ["*"], "ip_allowlist": ["127.0.0.1/32"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{open}");
    e.event(&acc, "user.login", json!({})).await;
    // Refused by the pin: the same words as any refusal, so that a tenant cannot tell with a
    // pin of its choosing which range a host resolves to.
    let err = first_attempt_error(&e, &acc, pinned["id"].as_str().unwrap()).await;
    assert_eq!(err, "destination is not allowed");
    // The webhook allowed on 127.0.0.1 is called, once.
    rx.wait_for(1, WAIT).await;
    rx.assert_quiet(Duration::from_millis(200)).await;
    assert_eq!(rx.count(), 1);
    e.stop().await;
}

#[tokio::test]
async fn the_api_serves_https_with_the_configured_certificate() {
    let pki = pki();
    let extra = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        pki.cert_file.display(),
        pki.key_file.display()
    );
    // The harness writes its own [server]; build this config by hand instead.
    let data = tempfile::tempdir().unwrap();
    let toml = config_toml(data.path(), &pki.ca_file, "", "")
        .replace("[server]\nlisten = \"127.0.0.1:0\"\n", &extra);
    let config = kyberhook::config::Config::from_toml(&toml, "test").unwrap();
    let e = TestEngine::start_with(config, data).await;
    let addr = e.engine.as_ref().unwrap().api_addr();

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
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .expect("TLS handshake with the test CA");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/v1/accounts")
        .header("host", "localhost")
        .header("authorization", format!("Bearer {ADMIN}"))
        .body(Full::new(Bytes::from(
            json!({"name": "tls", "plan": "starter"}).to_string(),
        )))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert!(body["api_key"].as_str().unwrap().starts_with("khk_"));
    // Plain HTTP to the TLS port gets no API answer.
    let mut plain = std::net::TcpStream::connect(addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("\"ok\""));
    e.stop().await;
}

fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kyberhook"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn bad_config_exits_2_with_one_line_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let data = dir.path().join("data").display().to_string();
    let cases = [
        (write("unknown.toml", "[server]\nlisten = \"127.0.0.1:0\"\nlistn = 1\n"), "listn"),
        (write("type.toml", "[delivery]\nmax_in_flight = \"many\"\n"), "unknown.toml"),
        (dir.path().join("missing.toml").display().to_string(), "missing.toml"),
        (
            write(
                "port.toml",
                &format!("[server]\nlisten = \"127.0.0.1:{busy_port}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = \"{data}\"\n"),
            ),
            "server.listen",
        ),
        (write("dur.toml", "[storage]\nretention = \"30 days\"\n"), "retention"),
        (write("ca.toml", &format!("[server]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = \"{data}\"\n[delivery]\nextra_ca_files = [\"/nonexistent/ca.pem\"]\n")), "/nonexistent/ca.pem"),
    ];
    for (i, (path, needle)) in cases.iter().enumerate() {
        let (code, stderr) = run_binary(&["serve", "--config", path], &[]);
        assert_eq!(code, 2, "case {i}: {stderr}");
        let needle = if i == 1 { "type.toml" } else { needle };
        assert!(
            stderr.contains(needle),
            "case {i}: {stderr:?} should name {needle}"
        );
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "case {i}: one line, got {stderr:?}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    drop(busy);
    let (code, out) = run_binary(&["--help"], &[]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test]
async fn the_admin_token_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = \"{}\"\n[auth]\nadmin_token = \"from-the-file-0123456789abcdefghijk\"\n[log]\nformat = \"json\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kyberhook"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env(
            "KYBERHOOK_ADMIN_TOKEN",
            "from-the-environment-0123456789abcdef",
        )
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if let Some(a) = v["fields"]["api"].as_str() {
                    let _ = tx.send(a.parse::<std::net::SocketAddr>().unwrap());
                }
            }
            assert!(
                !line.contains("from-the-environment-0123456789abcdef"),
                "the admin token was logged"
            );
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    let api = Api::new(addr);
    let (s, _) = api
        .call(
            Method::GET,
            "/v1/event-types",
            Some("from-the-environment-0123456789abcdef"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = api
        .call(
            Method::GET,
            "/v1/event-types",
            Some("from-the-file-0123456789abcdefghijk"),
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A small deterministic generator, so a failure can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    let tokens: [&[u8]; 12] = [
        b"{",
        b"}",
        b"[",
        b"]",
        b"\"",
        b",",
        b":",
        b"null",
        b"1e999",
        b"\\u0000",
        b"\xff\xfe",
        b"-0",
    ];
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !b.is_empty() => {
                let at = rng.below(b.len());
                b.truncate(at);
            }
            1 if !b.is_empty() => {
                let at = rng.below(b.len());
                b[at] = rng.next() as u8;
            }
            2 => {
                let at = rng.below(b.len() + 1);
                let t = tokens[rng.below(tokens.len())];
                b.splice(at..at, t.iter().copied());
            }
            3 if b.len() > 2 => {
                let a = rng.below(b.len());
                let c = rng.below(b.len());
                let (lo, hi) = (a.min(c), a.max(c));
                b.drain(lo..hi);
            }
            _ => b.extend_from_slice(&seed[..seed.len().min(rng.below(seed.len() + 1))]),
        }
    }
    b
}

#[tokio::test]
async fn hostile_input_gets_4xx_never_5xx_and_the_engine_stays_healthy() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(&pki, "", "").await;
    let (acc, _) = e.account("acc_hostile", "enterprise").await;
    let hook = e.webhook(&acc, &rx.url, &["*"]).await;
    let wh = hook["id"].as_str().unwrap().to_string();
    e.event(&acc, "user.login", json!({})).await;
    let first = rx.next(WAIT).await;
    let dlv = first.header("x-kyberaccess-delivery");
    let routes: Vec<(Method, String, Value)> = vec![
        (
            Method::POST,
            "/v1/accounts".into(),
            json!({"name": "n", "plan": "starter", "id": "acc_fuzz"}),
        ),
        (
            Method::PATCH,
            format!("/v1/accounts/{acc}"),
            json!({"name": "n", "plan": "enterprise"}),
        ),
        (
            Method::POST,
            "/v1/events".into(),
            json!({"account_id": acc, "event": "user.login", "data": {"a": [1, {"b": "c"}]}, "id": "e1", "timestamp": "2025-01-15T09:30:00Z"}),
        ),
        (
            Method::POST,
            "/v1/events/batch".into(),
            json!({"events": [{"account_id": acc, "event": "user.login", "data": {}}]}),
        ),
        (
            Method::POST,
            format!("/v1/accounts/{acc}/webhooks"),
            json!({"name": "n", "url": "https://example.com/x", "events": ["user.*"], "ip_allowlist": ["10.0.0.0/8"], "description": "d"}),
        ),
        (
            Method::PATCH,
            format!("/v1/accounts/{acc}/webhooks/{wh}"),
            json!({"name": "n", "url": rx.url, "events": ["*"], "status": "active"}),
        ),
        (
            Method::POST,
            format!("/v1/accounts/{acc}/webhooks/{wh}/test"),
            json!({"event": "user.login"}),
        ),
        (
            Method::POST,
            format!("/v1/accounts/{acc}/webhooks/{wh}/secret/rotate"),
            json!({}),
        ),
        (
            Method::POST,
            format!("/v1/accounts/{acc}/deliveries/{dlv}/retry"),
            json!({}),
        ),
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut sent = 0;
    for round in 0..40 {
        for (method, path, seed) in &routes {
            let body = mutate(&mut rng, &serde_json::to_vec(seed).unwrap());
            let (s, _, v) = e
                .api
                .raw(method.clone(), path, Some(ADMIN), Some(body.clone()))
                .await;
            assert!(
                !s.is_server_error(),
                "round {round}: {method} {path} with {:?} -> {s} {v}",
                String::from_utf8_lossy(&body)
            );
            if s.is_client_error() {
                assert!(v["error"]["code"].is_string(), "{v}");
            }
            sent += 1;
        }
    }
    assert!(sent >= 360);
    let odd_queries = [
        "limit=-1",
        "limit=abc",
        "limit=99999999999999999999",
        "cursor=%00%ff",
        "cursor=dlv_zzzz",
        "status=DELIVERED",
        "since=2025-13-45T99:99:99Z",
        "until=%E2%80%AE",
        "event=%00",
        "webhook_id=wh_%2F%2E%2E",
        "limit=1&limit=2",
        "%ff%fe=1",
        "since=",
        "&&&",
        "cursor=",
    ];
    for q in odd_queries {
        for path in [
            format!("/v1/accounts/{acc}/deliveries"),
            format!("/v1/accounts/{acc}/webhooks/{wh}/deliveries"),
            format!("/v1/accounts/{acc}/webhooks"),
        ] {
            let (s, _, v) = e
                .api
                .raw(Method::GET, &format!("{path}?{q}"), Some(ADMIN), None)
                .await;
            assert!(!s.is_server_error(), "{path}?{q} -> {s} {v}");
        }
    }
    // Oversized headers are refused, not crashed on.
    let huge = "x".repeat(100 * 1024);
    let mut sock = std::net::TcpStream::connect(e.engine.as_ref().unwrap().api_addr()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = sock
        .write_all(format!("GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {huge}\r\n\r\n").as_bytes());
    let mut buf = Vec::new();
    let _ = sock.read_to_end(&mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));

    let (s, v) = e.api.admin(Method::GET, "/healthz", None).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    e.event(&acc, "user.login", json!({"still": "alive"})).await;
    e.stop().await;
}

#[tokio::test]
async fn odd_payloads_are_delivered_byte_exact_or_refused() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let e = TestEngine::start(&pki, "", "").await;
    let (acc, _) = e.account("acc_odd", "enterprise").await;
    e.webhook(&acc, &rx.url, &["*"]).await;
    let cases: Vec<&str> = vec![
        r#"{"emoji":"🛂🚨","rtl":"RTLabc","nul":"\u0000","esc":"\"\\\/\b\f\n\r\t","u":"\u00e9\ud83d\ude00"}"#,
        r#"{"big":1e308,"neg":-0.0,"int":12345678901234567890123,"arr":[[],{}],"t":true}"#,
        r#"{ "spaced" :  [ 1 , 2 ] ,
            "nested" : { "k" : "v w" } }"#,
    ];
    let huge = format!(r#"{{"s":"{}"}}"#, "a".repeat(50_000));
    let mut all: Vec<String> = cases.iter().map(|s| s.replace("RTL", "\u{202e}")).collect();
    all.push(huge);
    for data in &all {
        let body = format!(r#"{{"account_id":"{acc}","event":"user.login","data":{data}}}"#);
        let (s, _, v) = e
            .api
            .raw(
                Method::POST,
                "/v1/events",
                Some(ADMIN),
                Some(body.into_bytes()),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let got = rx.next(WAIT).await;
        let text = String::from_utf8(got.body.to_vec()).unwrap();
        let start = text.find(",\"data\":").unwrap() + 8;
        let end = text.rfind(",\"account_id\":").unwrap();
        // The producer's data in JSON.stringify's spelling (tests/semantics.rs checks that
        // spelling against node), and nothing else changed.
        assert_eq!(
            &text[start..end],
            kyberhook::canonical::canonical(data, 64).unwrap(),
            "data changed in transit"
        );
        assert!(!text[start..end].contains('\n'));
        let received: Value = serde_json::from_str(&text[start..end]).unwrap();
        assert!(received.is_object());
    }
    // Nesting beyond the parser's depth limit is a 400, not a stack overflow.
    let deep = format!(
        r#"{{"account_id":"{acc}","event":"user.login","data":{}{}}}"#,
        "{\"a\":".repeat(200) + "1",
        "}".repeat(200)
    );
    let (s, _, v) = e
        .api
        .raw(
            Method::POST,
            "/v1/events",
            Some(ADMIN),
            Some(deep.into_bytes()),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // Too large for server.max_body_bytes (64 KiB in the tests): 413.
    let too_big = format!(
        r#"{{"account_id":"{acc}","event":"user.login","data":{{"s":"{}"}}}}"#,
        "a".repeat(70_000)
    );
    let (s, _, v) = e
        .api
        .raw(
            Method::POST,
            "/v1/events",
            Some(ADMIN),
            Some(too_big.into_bytes()),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
    e.stop().await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let pki = pki();
    let data = tempfile::tempdir().unwrap();
    let toml = config_toml(data.path(), &pki.ca_file, "", "").replace(
        "[server]\nlisten = \"127.0.0.1:0\"\n",
        "[server]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout = \"300ms\"\n",
    );
    let e = TestEngine::start_with(
        kyberhook::config::Config::from_toml(&toml, "t").unwrap(),
        data,
    )
    .await;
    let mut sock = tokio::net::TcpStream::connect(e.engine.as_ref().unwrap().api_addr())
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    sock.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was still open after 5 s");
    assert!(started.elapsed() < Duration::from_secs(3));
    e.stop().await;
}
