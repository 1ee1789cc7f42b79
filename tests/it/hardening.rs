//! The third security pass, as an attacker tries it: DNS rebinding (`Host`), guessing bearer
//! tokens, a root `compact` raced by the data dir's owner, a backup client that stops
//! reading, a dashboard `back` with CR/LF, signing in again, HSTS, weak customer secrets,
//! NAT64 / IPv4-translated endpoint addresses and the backup file's mode. Real engine, real
//! sockets (raw TCP where a header must be chosen freely).

use crate::common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use kyberhook::config::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One answer read off a raw connection.
struct Raw {
    status: u16,
    /// The head's header lines, lowercased names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// Sends one HTTP/1.1 request with exactly these headers (plus `connection: close` and the
/// body's length) and reads the answer; `None` when the server closed without one.
async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Raw> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "connection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    ));
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .expect("the server answered within 10 s")
        .ok()?;
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    // A chunked body keeps its chunk sizes: good enough to search in and measure.
    let body = buf[split + 4..].to_vec();
    Some(Raw {
        status,
        headers,
        body,
    })
}

async fn engine_with(pki: &Pki, server_extra: &str, delivery_extra: &str) -> TestEngine {
    let data = tempfile::tempdir().unwrap();
    let toml = config_toml(
        data.path(),
        &pki.ca_file,
        &format!("retry_schedule = [\"1h\"]\n{delivery_extra}"),
        "",
    )
    .replace("[server]\n", &format!("[server]\n{server_extra}\n"));
    let config = Config::from_toml(&toml, "test").unwrap();
    TestEngine::start_with(config, data).await
}

fn api_addr(e: &TestEngine) -> SocketAddr {
    e.engine.as_ref().unwrap().api_addr()
}

#[tokio::test]
async fn a_request_for_a_foreign_host_gets_421_before_authentication() {
    let pki = pki();
    let e = engine_with(&pki, "public_hosts = [\"hooks.example.test\"]", "").await;
    let addr = api_addr(&e);
    let port = addr.port();
    let auth = format!("Bearer {ADMIN}");
    let body = json!({"name": "Rebound", "plan": "starter", "id": "acc_rebound"}).to_string();

    // The audit's probe: a page that re-resolved its own name to 127.0.0.1.
    let rebound = format!("rebind.attacker.example:{port}");
    for host in [
        rebound.as_str(),
        "attacker.example",
        "localhost.attacker.example",
        "hooks.example.test.attacker.example",
        "10.1.2.3",
    ] {
        let r = raw(
            addr,
            "POST",
            "/v1/accounts",
            &[("host", host), ("authorization", &auth)],
            body.as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 421, "{host}");
        assert_eq!(r.json()["error"]["code"], "misdirected_request", "{host}");
        // Before authentication: a wrong token gets the same answer, not a 401.
        let r = raw(
            addr,
            "GET",
            "/v1/event-types",
            &[("host", host), ("authorization", "Bearer wrong")],
            b"",
        )
        .await
        .unwrap();
        assert_eq!(r.status, 421, "{host}");
    }
    let (s, _) = e
        .api
        .admin(Method::GET, "/v1/accounts/acc_rebound", None)
        .await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "a rebound request created the account"
    );

    // The dashboard: no sign-in, no cookie, a page rather than JSON.
    let form = format!("key={ADMIN}");
    let r = raw(
        addr,
        "POST",
        "/ui/login",
        &[
            ("host", &rebound),
            ("content-type", "application/x-www-form-urlencoded"),
            ("sec-fetch-site", "same-origin"),
        ],
        form.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 421);
    assert!(r.header("set-cookie").is_none());
    assert!(r
        .header("content-type")
        .unwrap_or("")
        .starts_with("text/html"));
    // The backup route too.
    let r = raw(
        addr,
        "POST",
        "/v1/admin/backup",
        &[("host", &rebound), ("authorization", &auth)],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 421);

    // What the engine does answer to: its address, localhost, loopback literals, public_hosts.
    let own = addr.to_string();
    let localhost = format!("localhost:{port}");
    let v6 = format!("[::1]:{port}");
    for (host, id) in [
        (own.as_str(), "acc_by_addr"),
        (localhost.as_str(), "acc_by_localhost"),
        ("127.0.0.2", "acc_by_loopback"),
        (v6.as_str(), "acc_by_v6"),
        ("HOOKS.example.test:443", "acc_by_public_name"),
    ] {
        let body = json!({"name": id, "plan": "starter", "id": id}).to_string();
        let r = raw(
            addr,
            "POST",
            "/v1/accounts",
            &[("host", host), ("authorization", &auth)],
            body.as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(
            r.status,
            201,
            "{host}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    e.stop().await;
}

#[tokio::test]
async fn wrong_bearer_tokens_are_limited_per_address_and_tokens_in_use_keep_working() {
    let pki = pki();
    let e = engine_with(&pki, "", "").await;
    let addr = api_addr(&e);
    let (acc, key) = e.account("acc_guess", "starter").await;
    let (_, unused_key) = e.account("acc_unused", "starter").await;
    let (s, _) = e
        .api
        .call(
            Method::GET,
            &format!("/v1/accounts/{acc}/webhooks"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    // The audit's probe: 500 wrong tokens as fast as they go.
    let started = Instant::now();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut retry_after = None;
    for i in 0..500 {
        let (s, h, v) = e
            .api
            .raw(
                Method::GET,
                "/v1/event-types",
                Some(&format!("guess-{i:08}")),
                None,
            )
            .await;
        *statuses.entry(s.as_u16()).or_default() += 1;
        if s == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(v["error"]["code"], "too_many_failed_authentications");
            retry_after = h
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
        }
    }
    eprintln!("500 wrong tokens in {:?}: {statuses:?}", started.elapsed());
    let unauthorized = statuses.get(&401).copied().unwrap_or(0);
    assert!(
        (20..=22).contains(&unauthorized),
        "a burst of 20 (plus what refilled meanwhile) is told 401, the rest 429: {statuses:?}"
    );
    assert_eq!(unauthorized + statuses.get(&429).copied().unwrap_or(0), 500);
    assert!(matches!(retry_after, Some(1..=60)), "{retry_after:?}");

    // Tokens that already worked from this address keep working, unslowed.
    for _ in 0..50 {
        let (s, _) = e.api.admin(Method::GET, "/v1/event-types", None).await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = e
            .api
            .call(
                Method::GET,
                &format!("/v1/accounts/{acc}/webhooks"),
                Some(&key),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK);
    }
    // A token this address never used is refused like a wrong one while it is blocked: a
    // guesser ignoring the 429s learns nothing from them.
    let (s, _) = e
        .api
        .call(
            Method::GET,
            "/v1/accounts/acc_unused",
            Some(&unused_key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    // Another address is not affected.
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut stream = other.connect(addr).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /v1/event-types HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer wrong\r\nconnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    let page = e.api.text(&e.metrics_url()).await;
    let unauthorized_total = metric_sample(
        &page,
        "kyberhook_auth_failures_total{outcome=\"unauthorized\"}",
    )
    .unwrap_or(0.0);
    let limited_total =
        metric_sample(&page, "kyberhook_auth_failures_total{outcome=\"limited\"}").unwrap_or(0.0);
    assert!(unauthorized_total >= 21.0, "{unauthorized_total}");
    assert!(limited_total >= 479.0, "{limited_total}");
    e.stop().await;
}

#[tokio::test]
async fn a_backup_client_that_reads_nothing_is_cut_off_and_the_backup_released() {
    if crate::common::embedded_only(
        "a_backup_client_that_reads_nothing_is_cut_off_and_the_backup_released",
    ) {
        return;
    }
    let pki = pki();
    let e = engine_with(&pki, "send_timeout = \"2s\"", "").await;
    let addr = api_addr(&e);
    let (acc, _) = e.account("acc_bulk", "enterprise").await;
    // ~12 MiB of payloads: more than the socket buffers (tcp_wmem's 4 MiB at most) and the
    // stream's queue hold, so the backup really waits for the reader.
    let mut producers = Vec::new();
    for p in 0..4 {
        let api = e.api.clone();
        let acc = acc.clone();
        producers.push(tokio::spawn(async move {
            for i in 0..100 {
                let blob: String = (0..30_000)
                    .map(|j| {
                        let x = p as u64 * 1_000_003 + i as u64 * 7_919 + j as u64 * 104_729;
                        let x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59;
                        char::from(b"0123456789abcdefghijklmnopqrstuv"[x as usize])
                    })
                    .collect();
                let (s, v) = api
                    .admin(
                        Method::POST,
                        "/v1/events",
                        Some(json!({"account_id": acc, "event": "user.login", "data": {"blob": blob}})),
                    )
                    .await;
                assert_eq!(s, StatusCode::ACCEPTED, "{v}");
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }

    // A client with a tiny receive window that sends the request and never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(addr).await.unwrap();
    stalled
        .write_all(
            format!(
                "POST /v1/admin/backup HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {ADMIN}\r\ncontent-length: 0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // It is running once its first bytes arrive (peeked, not read): a second one is refused.
    let mut first = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(20), stalled.peek(&mut first))
        .await
        .expect("the stalled backup started")
        .unwrap();
    let (s, _) = backup_status(&e).await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "a second backup ran beside the stalled one"
    );
    // Within the send timeout (2 s) plus scheduling, the stalled client is cut off and a new
    // backup may run.
    let cut = Instant::now();
    let deadline = cut + Duration::from_secs(20);
    let bytes = loop {
        let (s, len) = backup_status(&e).await;
        if s == StatusCode::OK {
            break len;
        }
        assert_eq!(s, StatusCode::CONFLICT);
        assert!(
            Instant::now() < deadline,
            "the backup of a client that reads nothing was never released"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "released after {:?}; a whole backup is {bytes} bytes",
        cut.elapsed()
    );
    assert!(bytes > 10 << 20, "{bytes}");
    // The stalled connection was closed by the engine.
    let mut sink = vec![0u8; 1 << 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stalled.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the stalled connection is still open");
    e.stop().await;
}

/// Status and body length of one backup request, read in full.
async fn backup_status(e: &TestEngine) -> (StatusCode, usize) {
    let addr = api_addr(e);
    let auth = format!("Bearer {ADMIN}");
    let host = addr.to_string();
    let r = raw(
        addr,
        "POST",
        "/v1/admin/backup",
        &[("host", &host), ("authorization", &auth)],
        b"",
    )
    .await
    .expect("an answer");
    (StatusCode::from_u16(r.status).unwrap(), r.body.len())
}

/// Signs in on the dashboard with `key`; returns the session cookie's value.
async fn sign_in(addr: SocketAddr, key: &str, previous: Option<&str>) -> String {
    let host = addr.to_string();
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("key", key)
        .finish();
    let cookie = previous.map(|c| format!("kh_session={c}"));
    let mut headers = vec![
        ("host", host.as_str()),
        ("content-type", "application/x-www-form-urlencoded"),
        ("sec-fetch-site", "same-origin"),
    ];
    if let Some(c) = &cookie {
        headers.push(("cookie", c));
    }
    let r = raw(addr, "POST", "/ui/login", &headers, form.as_bytes())
        .await
        .unwrap();
    assert_eq!(r.status, 303, "{}", String::from_utf8_lossy(&r.body));
    let set = r.header("set-cookie").expect("a session cookie");
    set.split(';')
        .next()
        .and_then(|kv| kv.split_once('='))
        .map(|(_, v)| v.to_string())
        .unwrap()
}

async fn ui_get(addr: SocketAddr, path: &str, session: &str) -> Raw {
    let host = addr.to_string();
    let cookie = format!("kh_session={session}");
    raw(
        addr,
        "GET",
        path,
        &[("host", &host), ("cookie", &cookie)],
        b"",
    )
    .await
    .unwrap()
}

fn csrf_of(page: &Raw) -> String {
    let body = String::from_utf8_lossy(&page.body);
    let marker = "name=\"_csrf\" value=\"";
    let start = body.find(marker).expect("a form with a CSRF token") + marker.len();
    body[start..].split('"').next().unwrap().to_string()
}

#[tokio::test]
async fn a_back_that_is_not_a_local_page_is_refused_with_400_and_changes_nothing() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let e = engine_with(&pki, "", "").await;
    let addr = api_addr(&e);
    let (acc, key) = e.account("acc_back", "starter").await;
    let hook = e.webhook(&acc, &rx.url, &["*"]).await;
    let id = hook["id"].as_str().unwrap();
    let session = sign_in(addr, &key, None).await;
    let list = ui_get(addr, &format!("/ui/a/{acc}/webhooks"), &session).await;
    assert_eq!(list.status, 200);
    let csrf = csrf_of(&list);
    let host = addr.to_string();
    let cookie = format!("kh_session={session}");
    let base = format!("/ui/a/{acc}");
    for back in [
        format!("{base}/webhooks\r\nSet-Cookie: planted=1"),
        format!("{base}/webhooks\nx"),
        format!("{base}/webhooks\r"),
        "https://attacker.example/".to_string(),
        "//attacker.example/x".to_string(),
        format!("/\\attacker.example{base}/webhooks"),
        "/ui/a/acc_other/webhooks".to_string(),
        format!("{base}/webhooks é"),
    ] {
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("_csrf", &csrf)
            .append_pair("status", "paused")
            .append_pair("back", &back)
            .finish();
        let r = raw(
            addr,
            "POST",
            &format!("{base}/webhooks/{id}/status"),
            &[
                ("host", &host),
                ("cookie", &cookie),
                ("content-type", "application/x-www-form-urlencoded"),
                ("sec-fetch-site", "same-origin"),
            ],
            form.as_bytes(),
        )
        .await
        .unwrap_or_else(|| panic!("no answer (the handler died) for back = {back:?}"));
        assert_eq!(r.status, 400, "{back:?}");
        assert!(r.header("set-cookie").is_none(), "{back:?}");
        assert!(r.header("planted").is_none(), "{back:?}");
        let (_, now) = e
            .api
            .admin(
                Method::GET,
                &format!("/v1/accounts/{acc}/webhooks/{id}"),
                None,
            )
            .await;
        assert_eq!(
            now["status"], "active",
            "the action ran for back = {back:?}"
        );
    }
    // A page of this account is fine.
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("_csrf", &csrf)
        .append_pair("status", "paused")
        .append_pair("back", &format!("{base}/webhooks/{id}"))
        .finish();
    let r = raw(
        addr,
        "POST",
        &format!("{base}/webhooks/{id}/status"),
        &[
            ("host", &host),
            ("cookie", &cookie),
            ("content-type", "application/x-www-form-urlencoded"),
            ("sec-fetch-site", "same-origin"),
        ],
        form.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 303);
    assert_eq!(
        r.header("location"),
        Some(format!("{base}/webhooks/{id}").as_str())
    );
    e.stop().await;
}

#[tokio::test]
async fn signing_in_again_ends_the_same_browsers_previous_session() {
    let pki = pki();
    let e = engine_with(&pki, "", "").await;
    let addr = api_addr(&e);
    let (acc, key) = e.account("acc_twice", "starter").await;
    let first = sign_in(addr, &key, None).await;
    let page = format!("/ui/a/{acc}/webhooks");
    assert_eq!(ui_get(addr, &page, &first).await.status, 200);
    // Another browser's session is not touched by this one's sign-in.
    let elsewhere = sign_in(addr, &key, None).await;
    let second = sign_in(addr, &key, Some(&first)).await;
    assert_ne!(first, second);
    let old = ui_get(addr, &page, &first).await;
    assert_eq!(old.status, 303, "the previous session still works");
    assert_eq!(old.header("location"), Some("/ui/login"));
    assert_eq!(ui_get(addr, &page, &second).await.status, 200);
    assert_eq!(ui_get(addr, &page, &elsewhere).await.status, 200);
    e.stop().await;
}

#[tokio::test]
async fn hsts_is_sent_with_every_answer_over_tls() {
    let pki = pki();
    let server = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        pki.cert_file.display(),
        pki.key_file.display()
    );
    let e = engine_with(&pki, &server, "").await;
    let addr = api_addr(&e);
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
    for (path, auth) in [
        ("/healthz", None),
        ("/ui/login", None),
        ("/v1/event-types", Some("x")),
    ] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut stream = connector
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let auth = auth.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
        stream
            .write_all(
                format!(
                    "GET {path} HTTP/1.1\r\nhost: localhost\r\n{auth}connection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        assert!(
            answer.contains("\r\nstrict-transport-security: max-age=31536000"),
            "{path}: {answer}"
        );
    }
    e.stop().await;
    // Not over plain HTTP (a browser ignores it there, and it would be a lie).
    let e = engine_with(&pki, "", "").await;
    let (_, h, _) = e.api.raw(Method::GET, "/healthz", None, None).await;
    assert!(h.get("strict-transport-security").is_none());
    e.stop().await;
}

#[tokio::test]
async fn customer_supplied_secrets_must_come_from_a_random_source() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let e = engine_with(&pki, "", "").await;
    let addr = api_addr(&e);
    let (acc, key) = e.account("acc_secret", "enterprise").await;
    let session = sign_in(addr, &key, None).await;
    let csrf = csrf_of(&ui_get(addr, &format!("/ui/a/{acc}/webhooks"), &session).await);
    let host = addr.to_string();
    let cookie = format!("kh_session={session}");
    // Step 3 of Add Webhook posts the secret it showed back; a hand-made one is refused.
    let step3 = |secret: String| {
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("_csrf", &csrf)
            .append_pair("name", "CRM")
            .append_pair("url", &rx.url)
            .append_pair("events", "user.login")
            .append_pair("secret", &secret)
            .finish();
        let (host, cookie, path) = (
            host.clone(),
            cookie.clone(),
            format!("/ui/a/{acc}/webhooks/new/security"),
        );
        async move {
            raw(
                addr,
                "POST",
                &path,
                &[
                    ("host", &host),
                    ("cookie", &cookie),
                    ("content-type", "application/x-www-form-urlencoded"),
                    ("sec-fetch-site", "same-origin"),
                ],
                form.as_bytes(),
            )
            .await
            .unwrap()
        }
    };
    let counting: String = (0u8..32).map(|b| format!("{b:02x}")).collect();
    for hex in [
        "0".repeat(64),
        "0123456789abcdef".repeat(4),
        "deadbeef".repeat(8),
        counting,
    ] {
        let weak = format!("whsec_{hex}");
        let r = step3(weak.clone()).await;
        assert!((400..500).contains(&r.status), "{hex}: {}", r.status);
        let page = String::from_utf8_lossy(&r.body);
        assert!(page.contains("too regular"), "{page}");
        assert!(
            !page.contains(&weak),
            "the refused secret was offered again"
        );
        let (_, list) = e
            .api
            .admin(Method::GET, &format!("/v1/accounts/{acc}/webhooks"), None)
            .await;
        assert_eq!(count(&list), 0, "a webhook was created with {weak}");
    }
    // A secret from a random source (like the one the engine showed) is accepted.
    let random: String = (0..32).map(|_| format!("{:02x}", rand_byte())).collect();
    let secret = format!("whsec_{random}");
    let r = step3(secret.clone()).await;
    assert_eq!(r.status, 303, "{}", String::from_utf8_lossy(&r.body));
    let (_, list) = e
        .api
        .admin(Method::GET, &format!("/v1/accounts/{acc}/webhooks"), None)
        .await;
    let id = list["data"][0]["id"].as_str().unwrap();
    let (_, got) = e
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/{acc}/webhooks/{id}/secret"),
            None,
        )
        .await;
    assert_eq!(got["secret"], secret);
    e.stop().await;
}

fn rand_byte() -> u8 {
    let mut b = [0u8; 1];
    getrandom_byte(&mut b);
    b[0]
}

fn getrandom_byte(b: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(b)
        .unwrap();
}

#[tokio::test]
async fn nat64_and_translated_forms_of_private_addresses_are_refused() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    // Loopback is allowed for the test receiver, but not through a translation prefix: the
    // address a translator would reach is what is checked.
    let e = engine_with(&pki, "", "private_network_allowlist = []").await;
    let (acc, _) = e.account("acc_nat64", "enterprise").await;
    let port = rx.addr.port();
    let mut hooks = Vec::new();
    for host in [
        "[64:ff9b:1::7f00:1]",
        "[64:ff9b:1::a00:1]",
        "[::ffff:0:7f00:1]",
        "[::ffff:0:a9fe:a9fe]",
        "[64:ff9b:1:7f00:1::]",
    ] {
        let hook = e
            .webhook(&acc, &format!("https://{host}:{port}/hook"), &["*"])
            .await;
        hooks.push(hook["id"].as_str().unwrap().to_string());
    }
    e.event(&acc, "user.login", json!({})).await;
    for id in &hooks {
        let d = e
            .newest_delivery(&acc, id, Duration::from_secs(10), |d| {
                d["attempt_count"] == 1
            })
            .await;
        assert_eq!(
            d["attempts"][0]["error"], "destination is not allowed",
            "{id}: {d}"
        );
    }
    assert_eq!(rx.count(), 0);
    e.stop().await;
}

#[tokio::test]
async fn kyberhook_backup_writes_a_file_only_its_owner_can_read() {
    if crate::common::embedded_only("kyberhook_backup_writes_a_file_only_its_owner_can_read") {
        return;
    }
    let pki = pki();
    let e = engine_with(&pki, "", "").await;
    let (acc, _) = e.account("acc_file", "starter").await;
    e.event(&acc, "user.login", json!({"visitor": "Jane"}))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kh.backup");
    // A leftover partial file with a wide mode is narrowed, not reused as it is.
    std::fs::write(dir.path().join("kh.backup.partial"), b"old").unwrap();
    std::fs::set_permissions(
        dir.path().join("kh.backup.partial"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let url = format!("http://{}", api_addr(&e));
    let out_arg = out.display().to_string();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kyberhook"))
            .args(["backup", "--url", &url, "--out", &out_arg])
            .env("KYBERHOOK_ADMIN_TOKEN", ADMIN)
            .env("HOME", "/nonexistent")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "backup file mode {mode:o}");
    e.stop().await;
}

/// Root runs `compact` on a data dir owned by `nobody`, while the owner keeps swapping
/// entries between regular files, symlinks to a root-only file outside, and FIFOs. No
/// compaction may hang, read the outside file into the store, or change its mode.
#[test]
fn a_root_compaction_raced_by_the_data_dirs_owner_touches_nothing_outside() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("not root: this test needs root to run compact on another user's data dir");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let outside = root.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let secret_file = outside.join("shadow");
    let marker = "TOPSECRET-outside-the-data-dir";
    std::fs::write(&secret_file, marker).unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = Config::from_toml(
        &format!("[storage]\npath = {:?}\n", data.display().to_string()),
        "test",
    )
    .unwrap();
    // A store, handed to the service user.
    {
        let options = kyberhook::store::embedded::StoreOptions {
            fsync: false,
            cache_bytes: 1 << 20,
            secrets: kyberhook::secrets::KeySource::DataDir,
        };
        drop(kyberhook::store::embedded::SledStore::open_with(&data, &options).unwrap());
    }
    let chown_all = |p: &Path| {
        for entry in walk(p) {
            std::os::unix::fs::lchown(&entry, Some(65534), Some(65534)).unwrap();
        }
    };
    chown_all(&data);

    let stop = Arc::new(AtomicBool::new(false));
    // Set by the owner when a regular file it finds in the data dir holds the outside file's
    // content: only a compaction that followed a symlink could have put it there.
    let leaked = Arc::new(AtomicBool::new(false));
    let racer = {
        let (stop, leaked, data, secret_file, outside) = (
            stop.clone(),
            leaked.clone(),
            data.clone(),
            secret_file.clone(),
            outside.clone(),
        );
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (name, step) in [
                    ("extra", swaps % 3),
                    ("notes", (swaps + 1) % 3),
                    ("sub", swaps % 2),
                ] {
                    let path = data.join(name);
                    if read_regular(&path).is_some_and(|b| contains(&b, marker)) {
                        leaked.store(true, Ordering::Relaxed);
                    }
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_dir_all(&path);
                    let _ = match (name, step) {
                        ("sub", 0) => std::os::unix::fs::symlink(&outside, &path),
                        ("sub", _) => std::fs::create_dir(&path)
                            .and_then(|()| std::fs::write(path.join("f"), b"own")),
                        (_, 0) => std::os::unix::fs::symlink(&secret_file, &path),
                        (_, 1) => rustix::fs::mkfifoat(
                            rustix::fs::CWD,
                            &path,
                            rustix::fs::Mode::from_raw_mode(0o644),
                        )
                        .map_err(std::io::Error::from),
                        _ => std::fs::write(&path, b"the owner's own file"),
                    };
                }
                swaps += 1;
            }
            swaps
        })
    };

    let runs = 60;
    let mut ok = 0;
    for run in 0..runs {
        let (tx, rx) = std::sync::mpsc::channel();
        let config = config.clone();
        std::thread::spawn(move || {
            let _ = tx.send(kyberhook::maintenance::compact(&config));
        });
        let outcome = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("compaction {run} hung (a FIFO was opened?)"));
        if outcome.is_ok() {
            ok += 1;
        } else if let Err(f) = &outcome {
            eprintln!("run {run}: {}", f.message);
        }
        // Nothing outside was changed, linked or copied in.
        assert!(
            !leaked.load(Ordering::Relaxed),
            "run {run}: the outside file was copied in"
        );
        let meta = std::fs::metadata(&secret_file).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o644,
            "run {run}: chmod outside"
        );
        assert_eq!(
            std::os::unix::fs::MetadataExt::nlink(&meta),
            1,
            "run {run}: linked"
        );
        assert_eq!(std::fs::read_to_string(&secret_file).unwrap(), marker);
        for file in walk(root.path()) {
            if file.starts_with(&outside) {
                continue;
            }
            if let Some(bytes) = read_regular(&file) {
                assert!(
                    !contains(&bytes, marker),
                    "run {run}: the outside file was copied into {}",
                    file.display()
                );
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = racer.join().unwrap();
    eprintln!("{ok} of {runs} compactions finished while the owner made {swaps} swaps");
    assert!(
        ok >= runs / 2,
        "most compactions should finish despite the swaps: {ok}"
    );
    // The store is still the owner's and opens.
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&data).unwrap());
    assert_eq!(owner, 65534);
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(data.join("db")).unwrap()),
        65534
    );
}

/// Every path below `dir` (not following symlinks), `dir` included.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        i += 1;
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            if let Ok(rd) = std::fs::read_dir(&p) {
                out.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        }
    }
    out
}

/// The content of `path` if it is a regular file (never following a symlink or blocking on a
/// FIFO the racer swapped in).
fn read_regular(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}
