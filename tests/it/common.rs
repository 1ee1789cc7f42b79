//! Test support: a throw-away PKI (rcgen), real HTTPS receivers, an engine on 127.0.0.1:0 with
//! its own data directory, and a small JSON client for the API.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kyberhook::config::Config;
use kyberhook::Engine;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::Value;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub const ADMIN: &str = "test-admin-token-0123456789abcdef";

/// A CA, a server certificate it signed for localhost/127.0.0.1, and the CA as a PEM file.
pub struct Pki {
    pub dir: TempDir,
    pub ca_file: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub server: Arc<rustls::ServerConfig>,
    /// A self-signed certificate nobody trusts, for the "refused" cases.
    pub untrusted: Arc<rustls::ServerConfig>,
}

fn server_config(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    Arc::new(cfg)
}

pub fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kyberhook test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let cert_file = dir.path().join("cert.pem");
    let key_file = dir.path().join("key.pem");
    std::fs::write(&cert_file, leaf.pem()).unwrap();
    std::fs::write(&key_file, leaf_key.serialize_pem()).unwrap();
    let server = server_config(
        leaf.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    );
    let self_key = KeyPair::generate().unwrap();
    let self_signed =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .self_signed(&self_key)
            .unwrap();
    let untrusted = server_config(
        self_signed.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self_key.serialize_der())),
    );
    Pki {
        cert_pem: leaf.pem(),
        key_pem: leaf_key.serialize_pem(),
        dir,
        ca_file,
        cert_file,
        key_file,
        server,
        untrusted,
    }
}

/// How a receiver answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    /// Wait, then answer with the status.
    Slow(Duration, u16),
    /// A 302 to elsewhere.
    Redirect,
    /// The status with this many response headers of 4 KiB each.
    BigHeaders(u16, usize),
    /// The status with this body as `text/html` (escaping tests).
    Html(u16, &'static str),
    /// The status with a `Retry-After` header of this value.
    RetryAfter(u16, String),
}

/// Counts a request in flight at a receiver until dropped (also when the client goes away
/// mid-reply).
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn enter(n: &Arc<std::sync::atomic::AtomicUsize>) -> InFlight {
        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight(n.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    pub path: String,
}

impl Received {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A real HTTPS endpoint on 127.0.0.1 that records every request and answers from a script
/// (then with the default reply).
pub struct Receiver {
    pub addr: SocketAddr,
    pub url: String,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Received>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
    default: Arc<Mutex<Reply>>,
    pub log: Arc<Mutex<Vec<Received>>>,
    /// Requests being answered right now (a slow reply counts until it is sent).
    pub in_flight: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    pub async fn start(tls: Arc<rustls::ServerConfig>) -> Receiver {
        Self::start_at("127.0.0.1:0".parse().unwrap(), tls).await
    }

    pub async fn start_at(addr: SocketAddr, tls: Arc<rustls::ServerConfig>) -> Receiver {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let script: Arc<Mutex<VecDeque<Reply>>> = Arc::default();
        let default = Arc::new(Mutex::new(Reply::Status(200)));
        let log: Arc<Mutex<Vec<Received>>> = Arc::default();
        let in_flight: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let (s, d, l, f) = (
            script.clone(),
            default.clone(),
            log.clone(),
            in_flight.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let (tx, s, d, l, f) = (tx.clone(), s.clone(), d.clone(), l.clone(), f.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (tx, s, d, l, f) =
                            (tx.clone(), s.clone(), d.clone(), l.clone(), f.clone());
                        async move {
                            let _counted = InFlight::enter(&f);
                            let path = req.uri().path().to_string();
                            let headers = req.headers().clone();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let got = Received {
                                headers,
                                body,
                                at: Instant::now(),
                                path,
                            };
                            l.lock().unwrap().push(got.clone());
                            let _ = tx.send(got);
                            let reply = s
                                .lock()
                                .unwrap()
                                .pop_front()
                                .unwrap_or_else(|| d.lock().unwrap().clone());
                            let resp = match reply {
                                Reply::Status(code) => Response::builder()
                                    .status(code)
                                    .header("x-receiver", "test")
                                    .body(Full::new(Bytes::from(format!("answer {code}"))))
                                    .unwrap(),
                                Reply::Slow(wait, code) => {
                                    tokio::time::sleep(wait).await;
                                    Response::builder()
                                        .status(code)
                                        .body(Full::new(Bytes::from("slow")))
                                        .unwrap()
                                }
                                Reply::BigHeaders(code, n) => {
                                    let mut b = Response::builder().status(code);
                                    for i in 0..n {
                                        b = b.header(format!("x-big-{i:03}"), "h".repeat(4096));
                                    }
                                    b.body(Full::new(Bytes::from("big"))).unwrap()
                                }
                                Reply::Html(code, body) => Response::builder()
                                    .status(code)
                                    .header("content-type", "text/html")
                                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                                    .unwrap(),
                                Reply::RetryAfter(code, value) => Response::builder()
                                    .status(code)
                                    .header("retry-after", value)
                                    .body(Full::new(Bytes::from("later")))
                                    .unwrap(),
                                Reply::Redirect => Response::builder()
                                    .status(302)
                                    .header("location", "https://example.com/")
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            };
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            url: format!("https://127.0.0.1:{}/hook", addr.port()),
            rx: tokio::sync::Mutex::new(rx),
            script,
            default,
            log,
            in_flight,
            task,
        }
    }

    /// Answers the next requests in this order, then with the default.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.script.lock().unwrap().extend(replies);
    }

    pub fn set_default(&self, reply: Reply) {
        *self.default.lock().unwrap() = reply;
    }

    /// The next request, or a panic after `wait`.
    pub async fn next(&self, wait: Duration) -> Received {
        match tokio::time::timeout(wait, self.rx.lock().await.recv()).await {
            Ok(Some(r)) => r,
            _ => panic!("no request reached the receiver within {wait:?}"),
        }
    }

    /// Waits until `n` requests have arrived in total; returns them all.
    pub async fn wait_for(&self, n: usize, wait: Duration) -> Vec<Received> {
        let deadline = Instant::now() + wait;
        loop {
            let got = self.log.lock().unwrap().clone();
            if got.len() >= n {
                return got;
            }
            if Instant::now() > deadline {
                panic!("receiver got {} of {n} requests within {wait:?}", got.len());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Asserts that nothing more arrives for `quiet`.
    pub async fn assert_quiet(&self, quiet: Duration) {
        let before = self.count();
        tokio::time::sleep(quiet).await;
        assert_eq!(self.count(), before, "unexpected requests arrived");
    }
}

/// The TOML of a test engine: loopback listeners on port 0, its own data dir, the test CA,
/// 127.0.0.0/8 allowed, short retries. `extra` is appended (later keys of a table win only if
/// they are new; pass whole tables).
pub fn config_toml(data: &Path, ca_file: &Path, delivery_extra: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
max_body_bytes = 65536
[metrics]
listen = "127.0.0.1:0"
[storage]
path = "{data}"
{backend}
[auth]
admin_token = "{ADMIN}"
[delivery]
{timeout}
extra_ca_files = ["{ca}"]
{allow}
{delivery_extra}
{extra}
{cluster}
"#,
        cluster = if on_postgres() && !dividing() && !extra.contains("[cluster]") {
            "[cluster]\ndivide_work = false\n"
        } else {
            ""
        },
        data = data.display(),
        backend = backend_lines(),
        ca = ca_file.display(),
        allow = if delivery_extra.contains("private_network_allowlist") {
            ""
        } else {
            "private_network_allowlist = [\"127.0.0.0/8\"]"
        },
        timeout = if delivery_extra.contains("timeout") {
            ""
        } else {
            "timeout = \"2s\""
        },
    )
}

/// Whether this run tests the PostgreSQL backend: `KYBERHOOK_TEST_BACKEND=postgres`, with
/// `KYBERHOOK_TEST_POSTGRES_URL` naming a cluster (`postgres://USER@HOST:PORT`, no database;
/// `.ci/run` starts a throw-away one). Every test engine then gets a fresh database of it.
pub fn on_postgres() -> bool {
    std::env::var("KYBERHOOK_TEST_BACKEND").as_deref() == Ok("postgres")
}

/// For a test of something only the embedded store has (its files, a full disk, compaction,
/// the engine's own backup): true, with a line saying it is skipped, on a PostgreSQL run.
pub fn embedded_only(test: &str) -> bool {
    if on_postgres() {
        eprintln!("{test}: embedded store only, skipped on the PostgreSQL run");
        return true;
    }
    false
}

/// The `[storage]` keys of the backend under test (none for the embedded default).
fn backend_lines() -> String {
    if !on_postgres() {
        return String::new();
    }
    let base = std::env::var("KYBERHOOK_TEST_POSTGRES_URL")
        .expect("KYBERHOOK_TEST_BACKEND=postgres needs KYBERHOOK_TEST_POSTGRES_URL=postgres://USER@HOST:PORT");
    let base = base.trim_end_matches('/').to_string();
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!(
        "kh_it_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let admin = format!("{base}/postgres?sslmode=disable");
    let create = format!("CREATE DATABASE {name}");
    // A thread of its own: callers may be on a runtime, where blocking on another is refused.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connect {admin}: {e}"));
            tokio::spawn(conn);
            client
                .batch_execute(&create)
                .await
                .unwrap_or_else(|e| panic!("{create}: {e}"));
        })
    })
    .join()
    .unwrap();
    format!("backend = \"postgres\"\npostgres_url = \"{base}/{name}?sslmode=disable\"")
}

/// Whether this PostgreSQL run has each engine divide the work as a cluster of one (the
/// default, `cluster.divide_work = true`) rather than serve alone on the serve lease
/// (`KYBERHOOK_TEST_DIVIDE=0`).
fn dividing() -> bool {
    on_postgres() && std::env::var("KYBERHOOK_TEST_DIVIDE").as_deref() != Ok("0")
}

/// In-process engines log their warnings and errors into the output of the test that runs them
/// (shown when it fails): a 500 in a failing test then says what the engine met.
fn engine_log_to_the_test() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_test_writer()
            .try_init();
    });
}

pub struct TestEngine {
    pub engine: Option<Engine>,
    pub api: Api,
    pub data: TempDir,
    pub config: Config,
}

impl TestEngine {
    /// An engine with retries `["500ms", "1s"]` unless `delivery_extra` sets them.
    pub async fn start(pki: &Pki, delivery_extra: &str, extra: &str) -> TestEngine {
        let data = tempfile::tempdir().unwrap();
        let delivery = if delivery_extra.contains("retry_schedule") {
            delivery_extra.to_string()
        } else {
            format!("retry_schedule = [\"500ms\", \"1s\"]\n{delivery_extra}")
        };
        let toml = config_toml(data.path(), &pki.ca_file, &delivery, extra);
        let config = Config::from_toml(&toml, "test").unwrap();
        Self::start_with(config, data).await
    }

    pub async fn start_with(config: Config, data: TempDir) -> TestEngine {
        engine_log_to_the_test();
        let engine = Engine::start(config.clone()).await.unwrap();
        let api = Api::new(engine.api_addr());
        TestEngine {
            engine: Some(engine),
            api,
            data,
            config,
        }
    }

    /// Stops gracefully and starts again on the same data dir (and a new port).
    pub async fn restart(&mut self) {
        self.engine.take().unwrap().shutdown().await;
        let engine = Engine::start(self.config.clone()).await.unwrap();
        self.api = Api::new(engine.api_addr());
        self.engine = Some(engine);
    }

    pub fn metrics_url(&self) -> String {
        format!(
            "http://{}/metrics",
            self.engine.as_ref().unwrap().metrics_addr()
        )
    }

    pub async fn stop(mut self) {
        if let Some(e) = self.engine.take() {
            e.shutdown().await;
        }
    }

    /// Creates an account (admin) and returns (id, api_key).
    pub async fn account(&self, id: &str, plan: &str) -> (String, String) {
        let (s, v) = self
            .api
            .admin(
                Method::POST,
                "/v1/accounts",
                Some(serde_json::json!({"name": id, "plan": plan, "id": id})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        (
            v["id"].as_str().unwrap().to_string(),
            v["api_key"].as_str().unwrap().to_string(),
        )
    }

    /// Creates a webhook; returns its JSON (with `secret`).
    pub async fn webhook(&self, account: &str, url: &str, events: &[&str]) -> Value {
        let (s, v) = self
            .api
            .admin(
                Method::POST,
                &format!("/v1/accounts/{account}/webhooks"),
                Some(serde_json::json!({"name": "hook", "url": url, "events": events})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v
    }

    /// Posts one event; returns its id.
    pub async fn event(&self, account: &str, event: &str, data: Value) -> String {
        let (s, v) = self
            .api
            .admin(
                Method::POST,
                "/v1/events",
                Some(serde_json::json!({"account_id": account, "event": event, "data": data})),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    /// GETs `path` (admin) until `pred` holds for the JSON answer; panics after `wait`.
    pub async fn poll(&self, path: &str, wait: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + wait;
        loop {
            let (s, v) = self.api.admin(Method::GET, path, None).await;
            assert!(s.is_success(), "GET {path}: {s} {v}");
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "GET {path} never matched: {v}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The full detail of a webhook's newest delivery, once `pred` holds for its summary.
    pub async fn newest_delivery(
        &self,
        account: &str,
        webhook: &str,
        wait: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let list = self
            .poll(
                &format!("/v1/accounts/{account}/webhooks/{webhook}/deliveries"),
                wait,
                |v| {
                    v["data"]
                        .as_array()
                        .and_then(|a| a.first())
                        .is_some_and(&pred)
                },
            )
            .await;
        let id = list["data"][0]["id"].as_str().unwrap().to_string();
        self.wait_delivery(account, &id, wait, |_| true).await
    }

    /// Polls one delivery until `pred` holds (or panics after `wait`).
    pub async fn wait_delivery(
        &self,
        account: &str,
        id: &str,
        wait: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.poll(
            &format!("/v1/accounts/{account}/deliveries/{id}"),
            wait,
            pred,
        )
        .await
    }
}

/// The number of items in a list answer.
pub fn count(v: &Value) -> usize {
    v["data"].as_array().map_or(0, Vec::len)
}

/// A JSON client for the API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Api {
    pub fn new(addr: SocketAddr) -> Api {
        Api {
            base: format!("http://{addr}"),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// A client whose connections come from `source` (another loopback address, say
    /// 127.0.0.2: a second client machine as far as per-address limits can tell).
    pub fn from_source(addr: SocketAddr, source: std::net::IpAddr) -> Api {
        let mut connector = HttpConnector::new();
        connector.set_local_address(Some(source));
        Api {
            base: format!("http://{addr}"),
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// Sends raw bytes; returns status, headers and the body as JSON (Null when empty).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, HeaderMap, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .unwrap();
        let resp = self.client.request(req).await.expect("the API answered");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!(
                    "non-JSON answer {status}: {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        (status, headers, value)
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (s, _, v) = self
            .raw(
                method,
                path,
                token,
                body.map(|b| serde_json::to_vec(&b).unwrap()),
            )
            .await;
        (s, v)
    }

    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call(method, path, Some(ADMIN), body).await
    }

    /// GET a plain-text page (metrics).
    pub async fn text(&self, url: &str) -> String {
        let resp = self
            .client
            .request(Request::get(url).body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap()
    }
}

/// The guide's signature: lowercase hex HMAC-SHA256 of "timestamp.body" under the secret,
/// computed independently of the engine's own signing module.
pub fn expected_signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The value of one series (`name{labels}` exactly as written) on a Prometheus text page.
pub fn metric_sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The real `kyberhook` binary, serving; killed (SIGKILL) when dropped, so that a failing test
/// never leaves an engine running.
pub struct Proc {
    pub child: std::process::Child,
    pub api: Api,
    /// Where it serves `/metrics`.
    pub metrics: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `kyberhook serve --config CONFIG` (its log must be JSON, `[log] format = "json"`)
/// and waits for the line that names its API address.
pub fn spawn(config: &Path) -> Proc {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_kyberhook"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if let (Some(api), Some(metrics)) =
                    (v["fields"]["api"].as_str(), v["fields"]["metrics"].as_str())
                {
                    let _ = tx.send((
                        api.parse::<SocketAddr>().unwrap(),
                        metrics.parse::<SocketAddr>().unwrap(),
                    ));
                }
            }
        }
    });
    let (addr, metrics) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the engine reported its address");
    Proc {
        child,
        api: Api::new(addr),
        metrics,
    }
}

/// Runs the calling test again in a process of its own and returns `false` (the caller then
/// returns); in that process it returns `true` and the test body runs. For tests that read
/// exact counts off the metrics page: the recorder is global to a process, and the other
/// tests of this binary count into it at the same time.
pub fn own_process(test: &str) -> bool {
    const CHILD: &str = "KYBERHOOK_TEST_OWN_PROCESS";
    if std::env::var(CHILD).as_deref() == Ok(test) {
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD, test)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{test} failed in its own process:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    false
}
