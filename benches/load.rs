//! End-to-end load bench of kyberhook on this machine (harness = false: a plain `main`).
//!
//! ```text
//! cargo bench --bench load                    # full run (30 s delivery/latency windows)
//! cargo bench --bench load -- --quick         # short run (5 s windows)
//! cargo bench --bench load -- --json          # also print the figures as one JSON object
//! cargo bench --bench load -- --no-fsync      # storage.fsync = false: what durability costs
//! flags: --conns N (256)  --secs S (30; quick 5)  --rps-secs S (15; quick 3)
//!        --warmup S (3; quick 1)  --rate EV/S (1000)  --fanouts 1,10
//!        --receivers K (1: every webhook on one receiver URL)  --max-backlog N (50000)
//!        --drain-secs S (120; quick 60)  --fanout-ingest single|batch|both (both)
//!        --latency-webhooks N (1; 0 measures ingest latency alone)  --latency-conns N (32)
//!        --phases healthz,ingest,batch,fanout,latency,retention (all; e.g. to profile one phase)
//!        --retention S (10: storage.retention of the retention phase)  --retention-run S (90; quick 40)
//!        --lag WxC,... (lag phases: webhooks x connections)  --quota N (max_scheduled_per_account)
//!        --max-lag D (delivery.max_lag, default 50ms; 0s: no lag push-back)  --paced-rate N (250)
//! ```
//!
//! In one process: the engine (its own 2-worker tokio runtime, durable store with
//! `storage.fsync = true` in a fresh temp dir, plan `bench` with unlimited events/s), a fast
//! HTTPS receiver (hyper http1 + tokio-rustls, answers 200 at once, counts per phase, records
//! the first arrival of each event id for latency, counts duplicate delivery ids) and a load
//! generator (N keep-alive HTTP/1.1 connections, hyper `client::conn::http1`, each a task
//! sending back to back) share a second 2-worker runtime. Everything talks to 127.0.0.1 only.
//!
//! Phases, each with a warm-up that is not counted:
//! 1. `GET /healthz` closed loop → `healthz_rps`;
//! 2. `POST /v1/events` closed loop, no webhook subscribed → `ingest_rps` (durable ingest);
//! 3. `POST /v1/events/batch` with 100 events per request → `batch_events_per_s`;
//! 4. per fan-out F (1 and 10 webhooks on one account) and per ingest mode (single events, then
//!    batches of 100, which offer far more load): closed-loop ingest for the window,
//!    throttled only when the outstanding deliveries (acknowledged events × F − received)
//!    exceed `--max-backlog`, so the engine is kept saturated without an unbounded backlog;
//!    `deliveries_per_s` = requests the receiver got during the window / window length;
//!    then the backlog is drained (bounded) before the next phase;
//! 5. open loop at `--rate` events/s to one webhook: ingest latency (intended send → 202, so
//!    queueing for a connection counts) and ingest → first attempt at the receiver;
//! 6. retention: a second engine with its own data dir and `storage.retention = --retention`
//!    seconds, 10 webhooks, closed-loop batch ingest (capped like the fan-out phases) for
//!    `--retention-run` seconds; the data dir size is sampled every 2 s and must level off
//!    once the purge starts; prints the purge rate (deliveries purged per second of wall time,
//!    which equals the delivery rate once the data dir is level, and per second of purge work,
//!    its capacity) and the steady-state data dir size;
//! 7. paced: open loop at `--paced-rate` events/s to one webhook, engine CPU per event;
//! 8. lag (issue 12), per `--lag` WxC: closed-loop, uncapped single-event ingest on C
//!    connections to W webhooks (the engine's push-back, `delivery.max_lag`, is what holds it
//!    back): deliveries per second during the window, 202 → arrival lag of every delivery, the
//!    engine's own lag per stage, threads' CPU, VmRSS; then ingest stops and the backlog's
//!    drain gives "once ingest stops". With push-back nothing is left to drain, so with fan-out
//!    a *ceiling probe* measures it in the same run: batches of a priority event type (never
//!    held) build a backlog of ~8 s of deliveries, sending stops, and the drain is counted per
//!    second from when the engine has written every delivery of the burst (fan-out and
//!    creation are ingest's work); the ratio during / after is issue 12's item 1.
//!
//! Peak RSS is the process's VmHWM and includes the receiver and the load generator.
//! Every loop is bounded in time and count.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use kyberhook::config::Config;
use kyberhook::Engine;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// The same allocator as the `kyberhook` binary, so the bench measures what runs in production.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const ADMIN: &str = "bench-admin-token-0123456789abcdef";
/// Receiver counters are kept per phase, by the first path segment `/p{N}/…`.
const PHASES: usize = 16;
const LATENCY_PHASE: usize = 7;
const RETENTION_PHASE: usize = 8;
/// The lag phases (issue 12's table) use receiver paths `/p9/…` onwards.
const LAG_FIRST: usize = 9;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A closed-loop connection idle (throttled) for longer than this is replaced before use.
const IDLE_RECONNECT: Duration = Duration::from_secs(5);

/// A hard cap on the requests one connection sends in one phase.
const MAX_REQUESTS_PER_CONN: u64 = 50_000_000;
const BATCH_SIZE: usize = 100;

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    json: bool,
    /// `storage.fsync`: off only to see what durability costs (`--no-fsync`).
    fsync: bool,
    conns: usize,
    secs: u64,
    rps_secs: u64,
    warmup: u64,
    rate: u64,
    fanouts: Vec<usize>,
    receivers: usize,
    max_backlog: u64,
    drain_secs: u64,
    /// How the fan-out phases ingest: single events, batches of 100, or each in turn.
    fanout_ingest: Vec<IngestMode>,
    latency_webhooks: usize,
    /// Connections of the open-loop latency phase (a producer sending 1 000 events/s needs a
    /// few; each of 256 would sit idle for a quarter of a second between requests).
    latency_conns: usize,
    /// Which phases run: healthz, ingest, batch, fanout, latency, retention.
    phases: Vec<String>,
    /// `storage.retention` of the retention phase's engine, seconds.
    retention: u64,
    /// How long the retention phase ingests, seconds.
    retention_run: u64,
    /// Lag phases: (webhooks, connections) of each closed-loop, uncapped single-event run.
    lag: Vec<(usize, usize)>,
    /// `delivery.max_scheduled_per_account` of the engine (`--quota`): the push-back.
    quota: Option<u64>,
    /// `delivery.max_lag` of the engine (`--max-lag 0s` turns the lag push-back off).
    max_lag: Option<String>,
    /// Events/s of the paced phase (one webhook, open loop).
    paced_rate: u64,
}

impl Opts {
    fn runs(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }
}

const ALL_PHASES: &[&str] = &[
    "healthz",
    "ingest",
    "batch",
    "fanout",
    "latency",
    "retention",
    "lag",
    "paced",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum IngestMode {
    #[default]
    Single,
    Batch,
}

impl IngestMode {
    fn name(self) -> &'static str {
        match self {
            IngestMode::Single => "single-event",
            IngestMode::Batch => "batch x100",
        }
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("load bench: {msg}");
    eprintln!(
        "usage: cargo bench --bench load -- [--quick] [--json] [--no-fsync] [--conns N] [--secs S] [--rps-secs S] \
         [--warmup S] [--rate EV/S] [--fanouts 1,10] [--fanout-ingest single|batch|both] [--receivers K] \
         [--max-backlog N] [--drain-secs S] [--latency-webhooks N] [--latency-conns N] \
         [--phases healthz,ingest,batch,fanout,latency,retention,lag,paced] [--retention S] [--retention-run S] \
         [--lag WxC,...] [--quota N] [--max-lag D] [--paced-rate N]"
    );
    std::process::exit(2)
}

fn parse_opts() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = Opts {
        quick,
        json: false,
        fsync: true,
        conns: 256,
        secs: if quick { 5 } else { 30 },
        rps_secs: if quick { 3 } else { 15 },
        warmup: if quick { 1 } else { 3 },
        rate: 1000,
        fanouts: vec![1, 10],
        receivers: 1,
        max_backlog: 50_000,
        drain_secs: if quick { 60 } else { 120 },
        fanout_ingest: vec![IngestMode::Single, IngestMode::Batch],
        latency_webhooks: 1,
        latency_conns: 32,
        phases: ALL_PHASES.iter().map(|p| p.to_string()).collect(),
        retention: 10,
        retention_run: if quick { 40 } else { 90 },
        lag: vec![(1, 32), (10, 32), (10, 64), (10, 256)],
        quota: None,
        max_lag: None,
        paced_rate: 250,
    };
    let mut it = args.into_iter().peekable();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = |name: &str| -> String {
            inline
                .clone()
                .or_else(|| it.next())
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        let num = |name: &str, v: String| -> u64 {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{name}: {v:?} is not a number")))
        };
        match flag.as_str() {
            "--quick" => {}
            // cargo passes --bench to harness = false benches.
            "--bench" => {}
            "--json" => o.json = true,
            "--no-fsync" => o.fsync = false,
            "--conns" => o.conns = num("--conns", value("--conns")).max(1) as usize,
            "--secs" => o.secs = num("--secs", value("--secs")).max(1),
            "--rps-secs" => o.rps_secs = num("--rps-secs", value("--rps-secs")).max(1),
            "--warmup" => o.warmup = num("--warmup", value("--warmup")),
            "--rate" => o.rate = num("--rate", value("--rate")).max(1),
            "--receivers" => {
                o.receivers = num("--receivers", value("--receivers")).clamp(1, 64) as usize
            }
            "--max-backlog" => o.max_backlog = num("--max-backlog", value("--max-backlog")).max(1),
            "--drain-secs" => o.drain_secs = num("--drain-secs", value("--drain-secs")),
            "--latency-webhooks" => {
                o.latency_webhooks =
                    num("--latency-webhooks", value("--latency-webhooks")).min(100) as usize
            }
            "--latency-conns" => {
                o.latency_conns = num("--latency-conns", value("--latency-conns")).max(1) as usize
            }
            "--retention" => o.retention = num("--retention", value("--retention")).max(1),
            "--retention-run" => {
                o.retention_run = num("--retention-run", value("--retention-run")).max(10)
            }
            "--quota" => o.quota = Some(num("--quota", value("--quota")).max(1)),
            "--max-lag" => {
                let v = value("--max-lag");
                if kyberhook::config::parse_duration(&v).is_err() {
                    usage("--max-lag takes a duration, e.g. 500ms or 0s");
                }
                o.max_lag = Some(v)
            }
            "--paced-rate" => o.paced_rate = num("--paced-rate", value("--paced-rate")).max(1),
            "--lag" => {
                let v = value("--lag");
                o.lag =
                    v.split(',')
                        .map(|s| {
                            let (f, c) = s.trim().split_once('x').unwrap_or_else(|| {
                                usage("--lag takes WEBHOOKSxCONNS[,…], e.g. 10x64")
                            });
                            (
                                num("--lag", f.to_string()).clamp(1, 100) as usize,
                                num("--lag", c.to_string()).clamp(1, 4096) as usize,
                            )
                        })
                        .collect();
                if o.lag.is_empty() || o.lag.len() > PHASES - LAG_FIRST {
                    usage("--lag takes 1 to 7 runs");
                }
            }
            "--phases" => {
                let v = value("--phases");
                o.phases = v.split(',').map(|p| p.trim().to_string()).collect();
                if let Some(bad) = o.phases.iter().find(|p| !ALL_PHASES.contains(&p.as_str())) {
                    usage(&format!(
                        "--phases: unknown phase {bad:?} (use {})",
                        ALL_PHASES.join(",")
                    ));
                }
            }
            "--fanout-ingest" => {
                o.fanout_ingest = match value("--fanout-ingest").as_str() {
                    "single" => vec![IngestMode::Single],
                    "batch" => vec![IngestMode::Batch],
                    "both" => vec![IngestMode::Single, IngestMode::Batch],
                    v => usage(&format!(
                        "--fanout-ingest: {v:?} is not single, batch or both"
                    )),
                }
            }
            "--fanouts" => {
                let v = value("--fanouts");
                o.fanouts = v
                    .split(',')
                    .map(|s| num("--fanouts", s.trim().to_string()).clamp(1, 1000) as usize)
                    .collect();
                if o.fanouts.is_empty() || o.fanouts.len() > 3 {
                    usage("--fanouts takes 1 to 3 comma-separated counts");
                }
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    o
}

// ---------------------------------------------------------------------------------------------
// PKI and the HTTPS receiver

struct Pki {
    _dir: tempfile::TempDir,
    ca_file: PathBuf,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kyberhook bench CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Pki {
        _dir: dir,
        ca_file,
        server: Arc::new(server),
    }
}

#[derive(Default)]
struct RecvStats {
    per_phase: [AtomicU64; PHASES],
    dups: [AtomicU64; PHASES],
    /// Requests whose path named no phase, or without a delivery id.
    odd: AtomicU64,
    /// TCP connections accepted (each one a TLS handshake).
    accepted: AtomicU64,
    seen: Mutex<HashSet<u128>>,
    /// Latency phase: event id → first arrival.
    first_seen: Mutex<HashMap<String, Instant>>,
    /// Lag phases: (event id, arrival) of every delivery.
    arrivals: Mutex<Vec<Arrival>>,
}

/// An event id and when it was acknowledged or arrived.
type Arrival = (Box<str>, Instant);

struct Receivers {
    urls: Vec<String>,
    stats: Arc<RecvStats>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn start_receivers(count: usize, tls: Arc<rustls::ServerConfig>) -> Receivers {
    let stats = Arc::new(RecvStats::default());
    let (stop, stop_rx) = watch::channel(false);
    let mut urls = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..count {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().unwrap();
        urls.push(format!("https://127.0.0.1:{}", addr.port()));
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
        let stats = stats.clone();
        let mut stop_rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop_rx.changed() => break,
                    a = listener.accept() => a,
                };
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                let stats = stats.clone();
                tokio::spawn(async move {
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                            .await
                    else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let stats = stats.clone();
                        async move { Ok::<_, std::convert::Infallible>(receive(&stats, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        }));
    }
    Receivers {
        urls,
        stats,
        stop,
        tasks,
    }
}

async fn receive(stats: &RecvStats, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let at = Instant::now();
    let phase = req
        .uri()
        .path()
        .strip_prefix("/p")
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse::<usize>().ok())
        .filter(|p| *p < PHASES);
    let delivery = req
        .headers()
        .get("x-kyberaccess-delivery")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("dlv_"))
        .and_then(|h| u128::from_str_radix(h, 16).ok());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    match (phase, delivery) {
        (Some(p), Some(d)) => {
            stats.per_phase[p].fetch_add(1, Ordering::Relaxed);
            if !stats.seen.lock().unwrap().insert(d) {
                stats.dups[p].fetch_add(1, Ordering::Relaxed);
            }
            if p >= LAG_FIRST {
                // The engine writes `{"id":"evt_…",` first (src/ingest/body.rs).
                if let Some(id) = body
                    .strip_prefix(b"{\"id\":\"")
                    .and_then(|r| r.iter().position(|&c| c == b'"').map(|n| &r[..n]))
                {
                    let id: Box<str> = String::from_utf8_lossy(id).into();
                    stats.arrivals.lock().unwrap().push((id, at));
                }
            }
            if p == LATENCY_PHASE {
                #[derive(serde::Deserialize)]
                struct Id {
                    id: String,
                }
                if let Ok(Id { id }) = serde_json::from_slice::<Id>(&body) {
                    stats.first_seen.lock().unwrap().entry(id).or_insert(at);
                }
            }
        }
        _ => {
            stats.odd.fetch_add(1, Ordering::Relaxed);
        }
    }
    Response::new(Full::new(Bytes::new()))
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client

type Sender = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn send(
    sender: &mut Sender,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), String> {
    let fut = async {
        sender.ready().await.map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .map_err(|_| "request timed out".to_string())?
}

fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Bytes>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {ADMIN}"));
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    b.body(Full::new(body.unwrap_or_default())).unwrap()
}

/// One request on a fresh connection (set-up calls and metric scrapes).
async fn once(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Bytes) {
    let mut s = connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let body = body.map(|v| Bytes::from(v.to_string()));
    send(&mut s, request(addr, method, path, body))
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

async fn api_json(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Value>,
    want: StatusCode,
) -> Value {
    let (status, bytes) = once(addr, method, path, body).await;
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    assert_eq!(status, want, "{path}: {v}");
    v
}

// ---------------------------------------------------------------------------------------------
// Metrics page

#[derive(Debug, Clone, Default)]
struct Scrape(String);

impl Scrape {
    async fn get(addr: SocketAddr) -> Scrape {
        let (_, body) = once(addr, Method::GET, "/metrics", None).await;
        Scrape(String::from_utf8_lossy(&body).into_owned())
    }

    /// Sum over the series of `name` whose labels contain `filter` (if given).
    fn sum(&self, name: &str, filter: Option<&str>) -> f64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(series, _)| {
                let (n, labels) = match series.find('{') {
                    Some(i) => (&series[..i], &series[i..]),
                    None => (*series, ""),
                };
                n == name && filter.map_or(true, |f| labels.contains(f))
            })
            .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
            .sum()
    }
}

// ---------------------------------------------------------------------------------------------
// Closed-loop generator

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    items: AtomicU64,
    /// Events in requests sent but not yet answered: the gate counts them as already
    /// offered, so 256 connections x 100-event batches cannot overshoot the backlog cap.
    items_in_flight: AtomicU64,
    item_errors: AtomicU64,
    io_errors: AtomicU64,
    throttled_ns: AtomicU64,
    stop: AtomicBool,
    statuses: Mutex<HashMap<u16, u64>>,
}

impl Counters {
    fn other_statuses(&self) -> String {
        let s = self.statuses.lock().unwrap();
        let mut v: Vec<_> = s.iter().collect();
        v.sort();
        v.iter()
            .map(|(k, n)| format!("{k}x{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

type MakeReq = Arc<dyn Fn() -> Request<Full<Bytes>> + Send + Sync>;
type Gate = Arc<dyn Fn() -> bool + Send + Sync>;

struct Workload {
    make: MakeReq,
    expect: StatusCode,
    items_per_ok: u64,
    gate: Option<Gate>,
}

fn spawn_closed_loop(
    addr: SocketAddr,
    conns: usize,
    work: Arc<Workload>,
    counters: Arc<Counters>,
    hard_deadline: Instant,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..conns)
        .map(|_| {
            let work = work.clone();
            let c = counters.clone();
            tokio::spawn(async move {
                let mut sender = match connect(addr).await {
                    Ok(s) => s,
                    Err(_) => {
                        c.io_errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                let mut sent = 0u64;
                let mut reconnects = 0u32;
                let mut last_used = Instant::now();
                while !c.stop.load(Ordering::Relaxed)
                    && Instant::now() < hard_deadline
                    && sent < MAX_REQUESTS_PER_CONN
                {
                    if let Some(gate) = &work.gate {
                        if !gate() {
                            let t = Instant::now();
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            c.throttled_ns
                                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                            continue;
                        }
                    }
                    // Like any client pool, drop a connection idle for longer than the server
                    // keeps one (`server.header_read_timeout`, 10 s) instead of failing on it.
                    if last_used.elapsed() > IDLE_RECONNECT {
                        match connect(addr).await {
                            Ok(s) => sender = s,
                            Err(_) => {
                                c.io_errors.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                        }
                    }
                    last_used = Instant::now();
                    sent += 1;
                    c.items_in_flight
                        .fetch_add(work.items_per_ok, Ordering::Relaxed);
                    let answer = send(&mut sender, (work.make)()).await;
                    c.items_in_flight
                        .fetch_sub(work.items_per_ok, Ordering::Relaxed);
                    match answer {
                        Ok((status, body)) if status == work.expect => {
                            c.ok.fetch_add(1, Ordering::Relaxed);
                            c.items.fetch_add(work.items_per_ok, Ordering::Relaxed);
                            if work.items_per_ok > 1 {
                                let errs = body.windows(8).filter(|w| w == b"\"error\":").count();
                                if errs > 0 {
                                    c.item_errors.fetch_add(errs as u64, Ordering::Relaxed);
                                    c.items.fetch_sub(errs as u64, Ordering::Relaxed);
                                }
                            }
                        }
                        Ok((status, _)) => {
                            *c.statuses
                                .lock()
                                .unwrap()
                                .entry(status.as_u16())
                                .or_default() += 1;
                            if status == StatusCode::SERVICE_UNAVAILABLE {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                        Err(_) => {
                            c.io_errors.fetch_add(1, Ordering::Relaxed);
                            reconnects += 1;
                            if reconnects > 5 {
                                return;
                            }
                            match connect(addr).await {
                                Ok(s) => sender = s,
                                Err(_) => return,
                            }
                        }
                    }
                }
            })
        })
        .collect()
}

async fn join_all(handles: Vec<tokio::task::JoinHandle<()>>, limit: Duration) {
    let _ = tokio::time::timeout(limit, async {
        for h in handles {
            let _ = h.await;
        }
    })
    .await;
}

#[derive(Debug, Clone, Default)]
struct RpsResult {
    skipped: bool,
    ok_per_s: f64,
    items_per_s: f64,
    window_s: f64,
    ok_total: u64,
    items_total: u64,
    io_errors: u64,
    item_errors: u64,
    other_statuses: String,
    commits_per_s: f64,
    events_per_commit: f64,
    flush_ms_mean: f64,
}

/// Runs a closed-loop workload: warm-up, then a measured window.
async fn closed_loop(ctx: &Ctx, work: Workload) -> RpsResult {
    let counters = Arc::new(Counters::default());
    let warmup = Duration::from_secs(ctx.opts.warmup);
    let window = Duration::from_secs(ctx.opts.rps_secs);
    let hard = Instant::now() + warmup + window + Duration::from_secs(30);
    let handles = spawn_closed_loop(
        ctx.api,
        ctx.opts.conns,
        Arc::new(work),
        counters.clone(),
        hard,
    );
    tokio::time::sleep(warmup).await;
    let m0 = Scrape::get(ctx.metrics).await;
    let (t0, ok0, it0) = (
        Instant::now(),
        counters.ok.load(Ordering::Relaxed),
        counters.items.load(Ordering::Relaxed),
    );
    tokio::time::sleep(window).await;
    let (t1, ok1, it1) = (
        Instant::now(),
        counters.ok.load(Ordering::Relaxed),
        counters.items.load(Ordering::Relaxed),
    );
    counters.stop.store(true, Ordering::Relaxed);
    let m1 = Scrape::get(ctx.metrics).await;
    join_all(handles, Duration::from_secs(35)).await;
    let secs = (t1 - t0).as_secs_f64();
    let commits = m1.sum("kyberhook_wal_batch_events_count", None)
        - m0.sum("kyberhook_wal_batch_events_count", None);
    let events = m1.sum("kyberhook_wal_batch_events_sum", None)
        - m0.sum("kyberhook_wal_batch_events_sum", None);
    let flush_s = m1.sum("kyberhook_wal_flush_seconds_sum", None)
        - m0.sum("kyberhook_wal_flush_seconds_sum", None);
    RpsResult {
        skipped: false,
        ok_per_s: (ok1 - ok0) as f64 / secs,
        items_per_s: (it1 - it0) as f64 / secs,
        window_s: secs,
        ok_total: counters.ok.load(Ordering::Relaxed),
        items_total: counters.items.load(Ordering::Relaxed),
        io_errors: counters.io_errors.load(Ordering::Relaxed),
        item_errors: counters.item_errors.load(Ordering::Relaxed),
        other_statuses: counters.other_statuses(),
        commits_per_s: commits / secs,
        events_per_commit: if commits > 0.0 { events / commits } else { 0.0 },
        flush_ms_mean: if commits > 0.0 {
            flush_s / commits * 1e3
        } else {
            0.0
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Phases

struct Ctx {
    opts: Opts,
    api: SocketAddr,
    metrics: SocketAddr,
    recv: Receivers,
}

/// About 200 bytes of `data`, the same for every event.
const DATA: &str = r#"{"visitor":{"id":"vis_01HQ3K8Z2M","name":"Ada Lovelace","email":"ada@example.com","company":"Analytical Engines Ltd"},"location":{"id":"loc_42","name":"HQ Lobby"},"host":{"id":"usr_7","name":"Charles Babbage"},"badge":"B-1042"}"#;

fn event_json(account: &str) -> Value {
    json!({
        "account_id": account,
        "event": "visitor.checked_in",
        "data": serde_json::from_str::<Value>(DATA).unwrap(),
    })
}

fn ingest_workload(addr: SocketAddr, account: &str, gate: Option<Gate>) -> Workload {
    let body = Bytes::from(event_json(account).to_string());
    Workload {
        make: Arc::new(move || request(addr, Method::POST, "/v1/events", Some(body.clone()))),
        expect: StatusCode::ACCEPTED,
        items_per_ok: 1,
        gate,
    }
}

fn batch_workload(addr: SocketAddr, account: &str, gate: Option<Gate>) -> Workload {
    let one = event_json(account);
    let body = Bytes::from(json!({"events": vec![one; BATCH_SIZE]}).to_string());
    Workload {
        make: Arc::new(move || request(addr, Method::POST, "/v1/events/batch", Some(body.clone()))),
        expect: StatusCode::ACCEPTED,
        items_per_ok: BATCH_SIZE as u64,
        gate,
    }
}

async fn create_account(ctx: &Ctx, id: &str) {
    api_json(
        ctx.api,
        Method::POST,
        "/v1/accounts",
        Some(json!({"name": id, "plan": "bench", "id": id})),
        StatusCode::CREATED,
    )
    .await;
}

async fn create_webhooks(ctx: &Ctx, account: &str, phase: usize, count: usize) {
    for i in 0..count {
        let base = &ctx.recv.urls[i % ctx.recv.urls.len()];
        api_json(
            ctx.api,
            Method::POST,
            &format!("/v1/accounts/{account}/webhooks"),
            Some(json!({
                "name": format!("bench {phase}/{i}"),
                "url": format!("{base}/p{phase}/h{i}"),
                // The priority type is for the lag phases' ceiling probe (`ceiling_probe`).
                "events": ["visitor.checked_in", PROBE_EVENT],
            })),
            StatusCode::CREATED,
        )
        .await;
    }
}

#[derive(Debug, Clone, Default)]
struct FanoutResult {
    webhooks: usize,
    mode: IngestMode,
    deliveries_per_s: f64,
    ingest_events_per_s: f64,
    window_s: f64,
    backlog_start: u64,
    backlog_end: u64,
    backlog_max: u64,
    scheduled_gauge_end: f64,
    scheduled_gauge_max: f64,
    throttled_fraction: f64,
    kept_up: bool,
    drained: bool,
    drain_s: f64,
    left_after_drain: u64,
    duplicates: u64,
    attempt_failures: f64,
    receiver_connections: u64,
    ingest_other_statuses: String,
    ingest_io_errors: u64,
    attempt_ms_mean: f64,
    rss_after_mib: f64,
}

async fn fanout_phase(ctx: &Ctx, phase: usize, fanout: usize, mode: IngestMode) -> FanoutResult {
    let account = format!("acc_fanout{fanout}_{phase}");
    create_account(ctx, &account).await;
    create_webhooks(ctx, &account, phase, fanout).await;
    let stats = ctx.recv.stats.clone();
    let counters = Arc::new(Counters::default());
    let outstanding = {
        let (c, s) = (counters.clone(), stats.clone());
        move || {
            ((c.items.load(Ordering::Relaxed) + c.items_in_flight.load(Ordering::Relaxed))
                * fanout as u64)
                .saturating_sub(s.per_phase[phase].load(Ordering::Relaxed))
        }
    };
    let max_backlog = ctx.opts.max_backlog;
    let gate: Gate = {
        let o = outstanding.clone();
        Arc::new(move || o() < max_backlog)
    };
    let work = Arc::new(match mode {
        IngestMode::Single => ingest_workload(ctx.api, &account, Some(gate)),
        IngestMode::Batch => batch_workload(ctx.api, &account, Some(gate)),
    });
    let warmup = Duration::from_secs(ctx.opts.warmup);
    let window = Duration::from_secs(ctx.opts.secs);
    let conns0 = stats.accepted.load(Ordering::Relaxed);
    let m0 = Scrape::get(ctx.metrics).await;
    let hard = Instant::now() + warmup + window + Duration::from_secs(30);
    let handles = spawn_closed_loop(ctx.api, ctx.opts.conns, work, counters.clone(), hard);
    tokio::time::sleep(warmup).await;

    let mut r = FanoutResult {
        webhooks: fanout,
        mode,
        ..Default::default()
    };
    let t0 = Instant::now();
    let (recv0, ok0, thr0) = (
        stats.per_phase[phase].load(Ordering::Relaxed),
        counters.items.load(Ordering::Relaxed),
        counters.throttled_ns.load(Ordering::Relaxed),
    );
    r.backlog_start = outstanding();
    // Sample once a second (bounded by the window).
    let end = t0 + window;
    while Instant::now() < end {
        let next = (Instant::now() + Duration::from_secs(1)).min(end);
        tokio::time::sleep_until(next.into()).await;
        let m = Scrape::get(ctx.metrics).await;
        let g = m.sum("kyberhook_deliveries_scheduled", None);
        r.scheduled_gauge_max = r.scheduled_gauge_max.max(g);
        r.scheduled_gauge_end = g;
        r.backlog_max = r.backlog_max.max(outstanding());
    }
    let t1 = Instant::now();
    let (recv1, ok1, thr1) = (
        stats.per_phase[phase].load(Ordering::Relaxed),
        counters.items.load(Ordering::Relaxed),
        counters.throttled_ns.load(Ordering::Relaxed),
    );
    r.backlog_end = outstanding();
    counters.stop.store(true, Ordering::Relaxed);
    join_all(handles, Duration::from_secs(35)).await;
    let secs = (t1 - t0).as_secs_f64();
    r.window_s = secs;
    r.deliveries_per_s = (recv1 - recv0) as f64 / secs;
    r.ingest_events_per_s = (ok1 - ok0) as f64 / secs;
    r.throttled_fraction = (thr1 - thr0) as f64 / 1e9 / (secs * ctx.opts.conns as f64);
    let delivered = recv1 - recv0;
    r.kept_up = r.throttled_fraction < 0.01
        && r.backlog_end <= r.backlog_start + (delivered / 20).max(2_000);
    r.ingest_other_statuses = counters.other_statuses();
    r.ingest_io_errors = counters.io_errors.load(Ordering::Relaxed);

    // Drain (bounded) so the next phase starts clean.
    let t = Instant::now();
    let deadline = t + Duration::from_secs(ctx.opts.drain_secs);
    while outstanding() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r.drain_s = t.elapsed().as_secs_f64();
    r.left_after_drain = outstanding();
    r.drained = r.left_after_drain == 0;
    r.duplicates = stats.dups[phase].load(Ordering::Relaxed);
    r.receiver_connections = stats.accepted.load(Ordering::Relaxed) - conns0;
    let m1 = Scrape::get(ctx.metrics).await;
    r.attempt_failures = m1.sum("kyberhook_delivery_attempts_total", Some("failure"))
        - m0.sum("kyberhook_delivery_attempts_total", Some("failure"));
    let n = m1.sum("kyberhook_delivery_attempt_duration_seconds_count", None)
        - m0.sum("kyberhook_delivery_attempt_duration_seconds_count", None);
    let s = m1.sum("kyberhook_delivery_attempt_duration_seconds_sum", None)
        - m0.sum("kyberhook_delivery_attempt_duration_seconds_sum", None);
    r.attempt_ms_mean = if n > 0.0 { s / n * 1e3 } else { 0.0 };
    stats.seen.lock().unwrap().clear();
    r.rss_after_mib = proc_status_kb("VmRSS:") as f64 / 1024.0;
    r
}

#[derive(Debug, Clone, Copy, Default)]
struct Pcts {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

fn pcts(mut v: Vec<Duration>) -> Pcts {
    if v.is_empty() {
        return Pcts::default();
    }
    v.sort_unstable();
    let at = |q: f64| {
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i].as_secs_f64() * 1e3
    };
    Pcts {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: v[v.len() - 1].as_secs_f64() * 1e3,
    }
}

#[derive(Debug, Clone, Default)]
struct LatencyResult {
    skipped: bool,
    rate: u64,
    measured: usize,
    achieved_rate: f64,
    ingest: Pcts,
    ingest_service: Pcts,
    e2e: Pcts,
    failed: u64,
    fail_reasons: String,
    missing: usize,
    duplicates: u64,
    /// CPU of the whole process / of the engine's threads per measured event, from the first
    /// measured send until every measured event arrived (or the wait ran out).
    cpu_ms_per_event_process: f64,
    cpu_ms_per_event_engine: f64,
    cpu_threads: String,
    rss_mib: f64,
}

/// (intended send, actual send, acknowledged, event id) of one measured event.
type Sample = (Instant, Instant, Instant, String);

async fn latency_phase(ctx: &Ctx, rate: u64, account: &str, webhooks: usize) -> LatencyResult {
    create_account(ctx, account).await;
    create_webhooks(ctx, account, LATENCY_PHASE, webhooks).await;
    let warm_n = rate * ctx.opts.warmup;
    let total = warm_n + rate * ctx.opts.secs;
    let conns = ctx.opts.latency_conns;
    // FIFO, so every connection is used every `conns` requests: the engine closes a keep-alive
    // connection that stays idle for `server.header_read_timeout` (hyper starts that timer
    // while waiting for the next request head), and a LIFO pool would leave some idle that long.
    let mut pool = std::collections::VecDeque::with_capacity(conns);
    for _ in 0..conns {
        pool.push_back(connect(ctx.api).await.expect("connect"));
    }
    let pool = Arc::new(Mutex::new(pool));
    let sem = Arc::new(Semaphore::new(conns));
    let body = Bytes::from(event_json(account).to_string());
    let failed = Arc::new(AtomicU64::new(0));
    let reasons: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    // (intended send, actual send, acknowledged, event id) of measured events.
    let samples: Arc<Mutex<Vec<Sample>>> =
        Arc::new(Mutex::new(Vec::with_capacity((total - warm_n) as usize)));
    let api = ctx.api;
    let start = Instant::now() + Duration::from_millis(20);
    let step_ns = 1_000_000_000f64 / rate as f64;
    let mut handles = Vec::with_capacity(total as usize);
    let mut cpu0 = None;
    for i in 0..total {
        let intended = start + Duration::from_nanos((i as f64 * step_ns) as u64);
        tokio::time::sleep_until(intended.into()).await;
        if i == warm_n {
            cpu0 = Some((Instant::now(), Cpu::now()));
        }
        let (pool, sem, body, failed, samples, reasons) = (
            pool.clone(),
            sem.clone(),
            body.clone(),
            failed.clone(),
            samples.clone(),
            reasons.clone(),
        );
        let fail = move |why: String| {
            failed.fetch_add(1, Ordering::Relaxed);
            *reasons.lock().unwrap().entry(why).or_default() += 1;
        };
        let measured = i >= warm_n;
        handles.push(tokio::spawn(async move {
            let Ok(_permit) = sem.acquire().await else {
                return;
            };
            let Some(mut sender) = pool.lock().unwrap().pop_front() else {
                fail("no connection left".into());
                return;
            };
            let sent = Instant::now();
            let res = send(
                &mut sender,
                request(api, Method::POST, "/v1/events", Some(body)),
            )
            .await;
            let done = Instant::now();
            match res {
                Ok((StatusCode::ACCEPTED, bytes)) => {
                    pool.lock().unwrap().push_back(sender);
                    let id = serde_json::from_slice::<Value>(&bytes)
                        .ok()
                        .and_then(|v| v["id"].as_str().map(str::to_string));
                    match (measured, id) {
                        (true, Some(id)) => {
                            samples.lock().unwrap().push((intended, sent, done, id))
                        }
                        (true, None) => fail("202 without an id".into()),
                        _ => {}
                    }
                }
                Ok((status, bytes)) => {
                    pool.lock().unwrap().push_back(sender);
                    fail(format!(
                        "{} {}",
                        status.as_u16(),
                        String::from_utf8_lossy(&bytes[..bytes.len().min(160)])
                    ));
                }
                Err(e) => {
                    fail(format!("io: {e}"));
                    match connect(api).await {
                        Ok(s) => pool.lock().unwrap().push_back(s),
                        Err(e) => fail(format!("reconnect: {e}")),
                    }
                }
            }
        }));
    }
    let sent_all = Instant::now();
    join_all(handles, REQUEST_TIMEOUT + Duration::from_secs(5)).await;
    let achieved_rate = total as f64 / (sent_all - start).as_secs_f64().max(1e-9);
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    // Wait (bounded) for every measured event's first attempt.
    let wait = if webhooks == 0 {
        0
    } else {
        ctx.opts.drain_secs
    };
    let deadline = Instant::now() + Duration::from_secs(wait);
    loop {
        let have = {
            let seen = ctx.recv.stats.first_seen.lock().unwrap();
            samples.iter().filter(|s| seen.contains_key(&s.3)).count()
        };
        if have == samples.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (t0, c0) = cpu0.unwrap_or_else(|| (Instant::now(), Cpu::now()));
    let cpu = Cpu::now().since(&c0);
    let cpu_secs = t0.elapsed().as_secs_f64();
    let seen = std::mem::take(&mut *ctx.recv.stats.first_seen.lock().unwrap());
    let mut e2e = Vec::with_capacity(samples.len());
    let mut missing = 0;
    for (intended, _, _, id) in &samples {
        match seen.get(id) {
            Some(at) => e2e.push(at.saturating_duration_since(*intended)),
            None => missing += 1,
        }
    }
    LatencyResult {
        skipped: false,
        rate,
        measured: samples.len(),
        achieved_rate,
        ingest: pcts(samples.iter().map(|s| s.2 - s.0).collect()),
        ingest_service: pcts(samples.iter().map(|s| s.2 - s.1).collect()),
        e2e: pcts(e2e),
        failed: failed.load(Ordering::Relaxed),
        fail_reasons: {
            let r = reasons.lock().unwrap();
            let mut v: Vec<String> = r.iter().map(|(k, n)| format!("{n}x {k}")).collect();
            v.sort();
            v.join("; ")
        },
        missing,
        duplicates: ctx.recv.stats.dups[LATENCY_PHASE].load(Ordering::Relaxed),
        cpu_ms_per_event_process: cpu.process_s * 1e3 / samples.len().max(1) as f64,
        cpu_ms_per_event_engine: cpu.engine_s() * 1e3 / samples.len().max(1) as f64,
        cpu_threads: cpu.top(cpu_secs, 8),
        rss_mib: proc_status_kb("VmRSS:") as f64 / 1024.0,
    }
}

// ---------------------------------------------------------------------------------------------
// Process figures

/// The first three fields of /proc/loadavg (other work on this machine skews every figure).
#[derive(Debug, Clone, Default)]
struct RetentionResult {
    skipped: bool,
    retention_s: u64,
    run_s: f64,
    deliveries_per_s: f64,
    purged_deliveries: f64,
    /// Purged deliveries per second of wall time, from the first purge to the end.
    purge_per_s: f64,
    /// Purged deliveries per second spent in purge passes (what the purge could do).
    purge_capacity_per_s: f64,
    passes: f64,
    /// (seconds since start, data dir bytes) every 2 s.
    sizes: Vec<(f64, u64)>,
    steady_bytes: u64,
    levelled_off: bool,
    errors: String,
}

/// Phase 6: a second engine with a short retention under sustained fan-out; does the data dir
/// level off, and how fast does the purge remove deliveries?
async fn retention_phase(
    opts: &Opts,
    pki: &Pki,
    recv: &Receivers,
    engine_rt: &tokio::runtime::Handle,
) -> RetentionResult {
    let data = tempfile::tempdir().expect("retention data dir");
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[storage]
path = "{data}"
retention = "{retention}s"
fsync = {fsync}
[auth]
admin_token = "{ADMIN}"
[delivery]
extra_ca_files = ["{ca}"]
private_network_allowlist = ["127.0.0.0/8"]
max_in_flight = 1024
max_in_flight_per_webhook = 256
[plans.bench]
events_per_second = 0
[log]
level = "{log}"
"#,
        data = data.path().display(),
        ca = pki.ca_file.display(),
        retention = opts.retention,
        fsync = opts.fsync,
        log = std::env::var("BENCH_LOG").unwrap_or_else(|_| "off".into()),
    );
    let config = Config::from_toml(&toml, "load bench (retention)").expect("bench config");
    let engine = engine_rt
        .spawn(Engine::start(config))
        .await
        .expect("engine task")
        .unwrap_or_else(|e| panic!("retention engine start: {e}"));
    let (api, metrics) = (engine.api_addr(), engine.metrics_addr());
    let account = "acc_retention";
    let fanout = 10;
    api_json(
        api,
        Method::POST,
        "/v1/accounts",
        Some(json!({"name": account, "plan": "bench", "id": account})),
        StatusCode::CREATED,
    )
    .await;
    for i in 0..fanout {
        let base = &recv.urls[i % recv.urls.len()];
        api_json(
            api,
            Method::POST,
            &format!("/v1/accounts/{account}/webhooks"),
            Some(json!({
                "name": format!("retention {i}"),
                "url": format!("{base}/p{RETENTION_PHASE}/h{i}"),
                "events": ["visitor.checked_in"],
            })),
            StatusCode::CREATED,
        )
        .await;
    }
    let stats = recv.stats.clone();
    let counters = Arc::new(Counters::default());
    let outstanding = {
        let (c, s) = (counters.clone(), stats.clone());
        move || {
            ((c.items.load(Ordering::Relaxed) + c.items_in_flight.load(Ordering::Relaxed))
                * fanout as u64)
                .saturating_sub(s.per_phase[RETENTION_PHASE].load(Ordering::Relaxed))
        }
    };
    let max_backlog = opts.max_backlog;
    let gate: Gate = {
        let o = outstanding.clone();
        Arc::new(move || o() < max_backlog)
    };
    let work = Arc::new(batch_workload(api, account, Some(gate)));
    let run = Duration::from_secs(opts.retention_run);
    let t0 = Instant::now();
    let recv0 = stats.per_phase[RETENTION_PHASE].load(Ordering::Relaxed);
    let handles = spawn_closed_loop(
        api,
        opts.conns,
        work,
        counters.clone(),
        t0 + run + Duration::from_secs(30),
    );
    let mut r = RetentionResult {
        retention_s: opts.retention,
        ..Default::default()
    };
    let purged = |m: &Scrape| m.sum("kyberhook_retention_deliveries_purged_total", None);
    let m0 = Scrape::get(metrics).await;
    let (purged0, pass_s0, passes0) = (
        purged(&m0),
        m0.sum("kyberhook_retention_pass_seconds_sum", None),
        m0.sum("kyberhook_retention_pass_seconds_count", None),
    );
    let mut first_purge: Option<(Instant, f64)> = None;
    let end = t0 + run;
    while Instant::now() < end {
        let next = (Instant::now() + Duration::from_secs(2)).min(end);
        tokio::time::sleep_until(next.into()).await;
        r.sizes.push((t0.elapsed().as_secs_f64(), du(data.path())));
        let p = purged(&Scrape::get(metrics).await);
        if first_purge.is_none() && p > purged0 {
            first_purge = Some((Instant::now(), p));
        }
    }
    let t1 = Instant::now();
    let recv1 = stats.per_phase[RETENTION_PHASE].load(Ordering::Relaxed);
    let m1 = Scrape::get(metrics).await;
    counters.stop.store(true, Ordering::Relaxed);
    join_all(handles, Duration::from_secs(35)).await;
    r.run_s = (t1 - t0).as_secs_f64();
    r.deliveries_per_s = (recv1 - recv0) as f64 / r.run_s;
    r.purged_deliveries = purged(&m1) - purged0;
    if let Some((at, p)) = first_purge {
        let secs = (t1 - at).as_secs_f64();
        if secs > 0.0 {
            r.purge_per_s = (purged(&m1) - p) / secs;
        }
    }
    let pass_s = m1.sum("kyberhook_retention_pass_seconds_sum", None) - pass_s0;
    r.passes = m1.sum("kyberhook_retention_pass_seconds_count", None) - passes0;
    if pass_s > 0.0 {
        r.purge_capacity_per_s = r.purged_deliveries / pass_s;
    }
    // Level: the last third of the samples grows by under 10 % of the middle third's peak.
    let n = r.sizes.len();
    if n >= 6 {
        let mid_peak = r.sizes[n / 3..2 * n / 3]
            .iter()
            .map(|s| s.1)
            .max()
            .unwrap_or(0);
        let last = &r.sizes[2 * n / 3..];
        let last_peak = last.iter().map(|s| s.1).max().unwrap_or(0);
        r.steady_bytes = last.iter().map(|s| s.1).sum::<u64>() / last.len() as u64;
        r.levelled_off = (last_peak as f64) <= mid_peak as f64 * 1.10;
    }
    if counters.io_errors.load(Ordering::Relaxed) > 0 || !counters.other_statuses().is_empty() {
        r.errors = format!(
            "ingest io {} status [{}]",
            counters.io_errors.load(Ordering::Relaxed),
            counters.other_statuses()
        );
    }
    let _ = engine_rt
        .spawn(
            async move { tokio::time::timeout(Duration::from_secs(60), engine.shutdown()).await },
        )
        .await;
    r
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn proc_status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// `du`-style: allocated bytes of every file under `path`.
fn du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    let mut budget = 1_000_000;
    while let Some(p) = stack.pop() {
        budget -= 1;
        if budget == 0 {
            break;
        }
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        total += md.blocks() * 512;
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

// ---------------------------------------------------------------------------------------------
// Threads' CPU (/proc/self/task/*/stat)

/// CPU seconds per thread group (thread name with trailing digits dropped) and the process's.
#[derive(Debug, Clone, Default)]
struct Cpu {
    by_thread: HashMap<String, f64>,
    process_s: f64,
}

/// utime + stime (fields 14 and 15) of a `stat` line, in seconds (USER_HZ is 100 on Linux).
fn stat_cpu_s(stat: &str) -> Option<(String, f64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let name = stat[open + 1..close].trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
    let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14 → rest[11], stime rest[12].
    let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    Some((name.to_string(), ticks as f64 / 100.0))
}

impl Cpu {
    fn now() -> Cpu {
        let mut by_thread: HashMap<String, f64> = HashMap::new();
        let me = std::process::id().to_string();
        if let Ok(rd) = std::fs::read_dir("/proc/self/task") {
            for e in rd.flatten() {
                let tid = e.file_name().to_string_lossy().to_string();
                let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                    continue;
                };
                if let Some((name, s)) = stat_cpu_s(&stat) {
                    // The main thread only waits; name it so it is not mistaken for the engine.
                    let name = if tid == me { "main".to_string() } else { name };
                    *by_thread.entry(name).or_default() += s;
                }
            }
        }
        let process_s = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| stat_cpu_s(&s))
            .map_or(0.0, |(_, s)| s);
        Cpu {
            by_thread,
            process_s,
        }
    }

    fn since(&self, before: &Cpu) -> Cpu {
        let by_thread = self
            .by_thread
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v - before.by_thread.get(k).copied().unwrap_or(0.0),
                )
            })
            .collect();
        Cpu {
            by_thread,
            process_s: self.process_s - before.process_s,
        }
    }

    /// Everything but the load generator's and receiver's runtime ("loadgen") and main.
    fn engine_s(&self) -> f64 {
        self.by_thread
            .iter()
            .filter(|(k, _)| k.as_str() != "loadgen" && k.as_str() != "main")
            .map(|(_, v)| v.max(0.0))
            .sum()
    }

    /// The busiest thread groups in cores (CPU seconds per wall second).
    fn top(&self, wall_s: f64, n: usize) -> String {
        let mut v: Vec<_> = self.by_thread.iter().filter(|(_, s)| **s > 0.0).collect();
        v.sort_by(|a, b| b.1.total_cmp(a.1));
        let mut out: Vec<String> = v
            .iter()
            .take(n)
            .map(|(k, s)| format!("{k} {:.2}", *s / wall_s.max(1e-9)))
            .collect();
        out.push(format!(
            "(process {:.2})",
            self.process_s / wall_s.max(1e-9)
        ));
        out.join(", ")
    }
}

// ---------------------------------------------------------------------------------------------
// Lag phases: issue 12's table

#[derive(Debug, Clone, Default)]
struct LagResult {
    webhooks: usize,
    conns: usize,
    window_s: f64,
    accepted_per_s: f64,
    refused: u64,
    refused_statuses: String,
    io_errors: u64,
    delivered_per_s: f64,
    /// Mean over the drain's full seconds that ended with deliveries still outstanding.
    after_per_s: Option<f64>,
    /// Deliveries received per second: the window, then the drain.
    series_during: Vec<u64>,
    /// The engine's own delivery lag (`kyberhook_delivery_lag_seconds`), the largest of ten
    /// samples per second of the window.
    engine_lag_max: Vec<f64>,
    /// The same per stage (fanout, scheduler, dispatcher): which one lagged.
    engine_lag_stages: Vec<[f64; 3]>,
    series_after: Vec<u64>,
    backlog_end: u64,
    drain_s: f64,
    drained: bool,
    /// Lag of every delivery of the events acknowledged in the window: 202 → arrival.
    lag: Pcts,
    lag_samples: usize,
    lag_missing: u64,
    duplicates: u64,
    cpu_during: String,
    cpu_after: String,
    rss_end_mib: f64,
    rss_drained_mib: f64,
    /// How `after_per_s` was measured when the push-back left no backlog at the stop.
    probe: Option<Probe>,
}

/// The ceiling probe of a lag phase (see [`ceiling_probe`]).
#[derive(Debug, Clone, Default)]
struct Probe {
    events: u64,
    backlog: u64,
    drain_s: f64,
    drained: bool,
    series: Vec<u64>,
    /// Leading seconds of `series` that ended with deliveries still owed.
    full: usize,
    /// Leading seconds of `series` before the engine had written every delivery of the
    /// burst (fan-out and creation, not yet a drain).
    creating: usize,
    /// Deliveries per second from the stop over the full seconds, creation included.
    from_stop_per_s: Option<f64>,
    cpu: String,
}

impl LagResult {
    fn ratio(&self) -> Option<f64> {
        self.after_per_s
            .filter(|a| *a > 0.0)
            .map(|a| self.delivered_per_s / a)
    }
}

/// Closed-loop single-event ingest on `conns` connections to an account with `fanout`
/// webhooks, uncapped (only the engine's own push-back, `--quota`, holds it back; a 429/503
/// is honoured for its `Retry-After`), then ingest stops and the backlog drains.
async fn lag_phase(ctx: &Ctx, phase: usize, fanout: usize, conns: usize) -> LagResult {
    let account = format!("acc_lag{fanout}x{conns}_{phase}");
    create_account(ctx, &account).await;
    create_webhooks(ctx, &account, phase, fanout).await;
    let stats = ctx.recv.stats.clone();
    stats.arrivals.lock().unwrap().clear();
    let acked = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let io_errors = Arc::new(AtomicU64::new(0));
    let statuses: Arc<Mutex<HashMap<u16, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    // Events acknowledged in the window: id → the 202's arrival.
    let acks: Arc<Mutex<Vec<Arrival>>> = Arc::default();
    let window_open = Arc::new(AtomicBool::new(false));
    let body = Bytes::from(event_json(&account).to_string());
    let api = ctx.api;
    let warmup = Duration::from_secs(ctx.opts.warmup);
    let window = Duration::from_secs(ctx.opts.secs);
    let hard = Instant::now() + warmup + window + Duration::from_secs(30);
    let mut handles = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (acked, refused, io_errors, statuses, stop, acks, window_open, body) = (
            acked.clone(),
            refused.clone(),
            io_errors.clone(),
            statuses.clone(),
            stop.clone(),
            acks.clone(),
            window_open.clone(),
            body.clone(),
        );
        handles.push(tokio::spawn(async move {
            let Ok(mut sender) = connect(api).await else {
                io_errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed)
                && Instant::now() < hard
                && sent < MAX_REQUESTS_PER_CONN
            {
                sent += 1;
                let req = request(api, Method::POST, "/v1/events", Some(body.clone()));
                let fut = async {
                    sender.ready().await.map_err(|e| e.to_string())?;
                    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                    let status = resp.status();
                    let retry_after = resp
                        .headers()
                        .get(http::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    let b = resp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((status, retry_after, b.to_bytes()))
                };
                match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
                    Ok(Ok((StatusCode::ACCEPTED, _, b))) => {
                        let at = Instant::now();
                        acked.fetch_add(1, Ordering::Relaxed);
                        if window_open.load(Ordering::Relaxed) {
                            if let Some(id) = b
                                .strip_prefix(b"{\"id\":\"")
                                .and_then(|r| r.iter().position(|&c| c == b'"').map(|n| &r[..n]))
                            {
                                let id: Box<str> = String::from_utf8_lossy(id).into();
                                acks.lock().unwrap().push((id, at));
                            }
                        }
                    }
                    Ok(Ok((status, retry_after, _))) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        *statuses.lock().unwrap().entry(status.as_u16()).or_default() += 1;
                        // A well-behaved producer waits as long as it is asked to.
                        let wait = retry_after.unwrap_or(1).clamp(1, 5);
                        tokio::time::sleep(Duration::from_secs(wait)).await;
                    }
                    _ => {
                        io_errors.fetch_add(1, Ordering::Relaxed);
                        match connect(api).await {
                            Ok(s) => sender = s,
                            Err(_) => return,
                        }
                    }
                }
            }
        }));
    }
    let outstanding = {
        let (a, s) = (acked.clone(), stats.clone());
        move || {
            (a.load(Ordering::Relaxed) * fanout as u64)
                .saturating_sub(s.per_phase[phase].load(Ordering::Relaxed))
        }
    };
    tokio::time::sleep(warmup).await;
    let mut r = LagResult {
        webhooks: fanout,
        conns,
        ..Default::default()
    };
    window_open.store(true, Ordering::Relaxed);
    let (t0, cpu0) = (Instant::now(), Cpu::now());
    let (recv0, acked0, refused0) = (
        stats.per_phase[phase].load(Ordering::Relaxed),
        acked.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    let mut last = recv0;
    let end = t0 + window;
    let mut tick = t0;
    while tick < end {
        tick += Duration::from_secs(1);
        let mut lag_max: f64 = 0.0;
        let mut stages = [0.0f64; 3];
        let mut sample = Instant::now();
        while sample < tick.min(end) {
            sample = (sample + Duration::from_millis(100)).min(tick.min(end));
            tokio::time::sleep_until(sample.into()).await;
            let m = Scrape::get(ctx.metrics).await;
            let mut largest: f64 = 0.0;
            for (i, stage) in ["\"fanout\"", "\"scheduler\"", "\"dispatcher\""]
                .iter()
                .enumerate()
            {
                let v = m.sum("kyberhook_delivery_lag_seconds", Some(stage));
                stages[i] = stages[i].max(v);
                largest = largest.max(v);
            }
            lag_max = lag_max.max(largest);
        }
        r.engine_lag_max.push(lag_max);
        r.engine_lag_stages.push(stages);
        let now = stats.per_phase[phase].load(Ordering::Relaxed);
        r.series_during.push(now - last);
        last = now;
    }
    window_open.store(false, Ordering::Relaxed);
    let t1 = Instant::now();
    let (recv1, acked1, refused1) = (
        stats.per_phase[phase].load(Ordering::Relaxed),
        acked.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    let cpu1 = Cpu::now();
    r.rss_end_mib = proc_status_kb("VmRSS:") as f64 / 1024.0;
    stop.store(true, Ordering::Relaxed);
    join_all(handles, Duration::from_secs(35)).await;
    let secs = (t1 - t0).as_secs_f64();
    r.window_s = secs;
    r.delivered_per_s = (recv1 - recv0) as f64 / secs;
    r.accepted_per_s = (acked1 - acked0) as f64 / secs;
    r.refused = refused1 - refused0;
    r.io_errors = io_errors.load(Ordering::Relaxed);
    r.refused_statuses = {
        let s = statuses.lock().unwrap();
        let mut v: Vec<_> = s.iter().map(|(k, n)| format!("{k}x{n}")).collect();
        v.sort();
        v.join(" ")
    };
    r.cpu_during = cpu1.since(&cpu0).top(secs, 7);
    r.backlog_end = outstanding();

    // Drain: per-second deliveries until nothing is outstanding (bounded).
    let t2 = Instant::now();
    let deadline = t2 + Duration::from_secs(ctx.opts.drain_secs);
    let mut last = stats.per_phase[phase].load(Ordering::Relaxed);
    let mut full_secs = Vec::new();
    let mut tick = t2;
    let mut cpu_drain = None;
    while outstanding() > 0 && Instant::now() < deadline {
        tick += Duration::from_secs(1);
        while Instant::now() < tick && outstanding() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let now = stats.per_phase[phase].load(Ordering::Relaxed);
        r.series_after.push(now - last);
        if outstanding() > 0 {
            full_secs.push(now - last);
            cpu_drain = Some((Instant::now(), Cpu::now()));
        }
        last = now;
    }
    r.drain_s = t2.elapsed().as_secs_f64();
    r.drained = outstanding() == 0;
    if !full_secs.is_empty() {
        r.after_per_s = Some(full_secs.iter().sum::<u64>() as f64 / full_secs.len() as f64);
    }
    if let Some((at, c)) = cpu_drain {
        let wall = (at - t2).as_secs_f64();
        if wall > 0.5 {
            r.cpu_after = c.since(&cpu1).top(wall, 7);
        }
    }
    r.rss_drained_mib = proc_status_kb("VmRSS:") as f64 / 1024.0;

    let acks = std::mem::take(&mut *acks.lock().unwrap());
    let arrivals = std::mem::take(&mut *stats.arrivals.lock().unwrap());
    // With the push-back on, ingest stops with (almost) nothing owed, so the rate the engine
    // reaches once ingest stops is not seen above: it is measured in the same run by a probe
    // (with fan-out only: one webhook's deliveries keep up with ingest, item 1 is about
    // fan-out).
    if r.after_per_s.is_none() && r.drained && fanout > 1 {
        let want = ((r.delivered_per_s * 8.0) as u64).max(100_000);
        let probe = ceiling_probe(ctx, phase, &account, fanout, want).await;
        if let Some(full) = probe.full_secs() {
            r.after_per_s = Some(full);
        }
        r.probe = Some(probe);
    }
    let acked_at: HashMap<&str, Instant> = acks.iter().map(|(id, at)| (&**id, *at)).collect();
    let mut lags = Vec::with_capacity(acks.len() * fanout);
    for (id, at) in &arrivals {
        if let Some(ack) = acked_at.get(&**id) {
            lags.push(at.saturating_duration_since(*ack));
        }
    }
    r.lag_samples = lags.len();
    r.lag_missing = (acks.len() * fanout).saturating_sub(lags.len()) as u64;
    r.lag = pcts(lags);
    r.duplicates = stats.dups[phase].load(Ordering::Relaxed);
    stats.seen.lock().unwrap().clear();
    r
}

/// The event type of the ceiling probe: a priority type (`delivery.priority_events` defaults
/// to `emergency.*`), which the push-back never holds.
const PROBE_EVENT: &str = "emergency.lockdown_activated";

impl Probe {
    /// Mean deliveries per second over the drain's full seconds that ended with deliveries
    /// still owed (as `after_per_s` of a drain), from the second after the engine had
    /// written every delivery of the burst: the rate of a backlog's drain, as when ingest
    /// stops after a phase without push-back (whose deliveries were created during it).
    fn full_secs(&self) -> Option<f64> {
        let full: Vec<u64> = self
            .series
            .iter()
            .copied()
            .take(self.full)
            .skip(self.creating)
            .collect();
        (!full.is_empty()).then(|| full.iter().sum::<u64>() as f64 / full.len() as f64)
    }
}

/// Measures what the engine delivers once ingest stops, in the same run as a lag phase whose
/// push-back left nothing to drain: batches of priority events (never held) for the phase's
/// webhooks are sent as fast as they are accepted until `want` deliveries are owed, then
/// sending stops and the backlog's drain is counted per second, as after a phase without
/// push-back.
async fn ceiling_probe(ctx: &Ctx, phase: usize, account: &str, fanout: usize, want: u64) -> Probe {
    let stats = ctx.recv.stats.clone();
    let base = stats.per_phase[phase].load(Ordering::Relaxed);
    // Every delivery fan-out creates is first written once (`kyberhook_held_deliveries_
    // written_total`, settled or pending): the burst is all created once it has grown by
    // the number owed.
    let written = |m: &Scrape| m.sum("kyberhook_held_deliveries_written_total", None) as u64;
    let written0 = written(&Scrape::get(ctx.metrics).await);
    let acked = Arc::new(AtomicU64::new(0));
    let per_batch = BATCH_SIZE as u64;
    let events_wanted = want.div_ceil(fanout as u64);
    let body = {
        let mut one = event_json(account);
        one["event"] = json!(PROBE_EVENT);
        Bytes::from(json!({"events": vec![one; BATCH_SIZE]}).to_string())
    };
    let api = ctx.api;
    let mut senders = Vec::new();
    for _ in 0..8 {
        let (acked, body) = (acked.clone(), body.clone());
        senders.push(tokio::spawn(async move {
            let Ok(mut sender) = connect(api).await else {
                return;
            };
            let hard = Instant::now() + Duration::from_secs(60);
            while acked.load(Ordering::Relaxed) < events_wanted && Instant::now() < hard {
                let req = request(api, Method::POST, "/v1/events/batch", Some(body.clone()));
                let fut = async {
                    sender.ready().await.map_err(|e| e.to_string())?;
                    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                    let status = resp.status();
                    resp.into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(status)
                };
                match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
                    Ok(Ok(StatusCode::ACCEPTED)) => {
                        acked.fetch_add(per_batch, Ordering::Relaxed);
                    }
                    Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
                    _ => return,
                }
            }
        }));
    }
    join_all(senders, Duration::from_secs(65)).await;
    let events = acked.load(Ordering::Relaxed);
    let owed = events * fanout as u64;
    let outstanding = || owed.saturating_sub(stats.per_phase[phase].load(Ordering::Relaxed) - base);
    let mut p = Probe {
        events,
        backlog: outstanding(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(ctx.opts.drain_secs);
    let mut last = stats.per_phase[phase].load(Ordering::Relaxed);
    let mut tick = t0;
    let mut cpu_created = None;
    let mut cpu_full = None;
    let mut created = false;
    while outstanding() > 0 && Instant::now() < deadline {
        tick += Duration::from_secs(1);
        while Instant::now() < tick && outstanding() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let now = stats.per_phase[phase].load(Ordering::Relaxed);
        p.series.push(now - last);
        if !created {
            created = written(&Scrape::get(ctx.metrics).await).saturating_sub(written0) >= owed;
            if created {
                cpu_created = Some((Instant::now(), Cpu::now()));
            }
            p.creating += 1;
        }
        if outstanding() > 0 {
            p.full += 1;
            cpu_full = Some((Instant::now(), Cpu::now()));
        }
        last = now;
    }
    p.drain_s = t0.elapsed().as_secs_f64();
    p.drained = outstanding() == 0;
    let full: Vec<u64> = p.series.iter().copied().take(p.full).collect();
    if !full.is_empty() {
        p.from_stop_per_s = Some(full.iter().sum::<u64>() as f64 / full.len() as f64);
    }
    if let (Some((from, c0)), Some((at, c))) = (cpu_created, cpu_full) {
        let wall = at.saturating_duration_since(from).as_secs_f64();
        if wall > 0.5 {
            p.cpu = c.since(&c0).top(wall, 7);
        }
    }

    stats.seen.lock().unwrap().clear();
    p
}

fn series(v: &[u64]) -> String {
    v.iter()
        .map(|n| format!("{:.1}", *n as f64 / 1000.0))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Output

struct Table {
    rows: Vec<[String; 3]>,
}

impl Table {
    fn row(&mut self, a: impl Into<String>, b: impl Into<String>, c: impl Into<String>) {
        self.rows.push([a.into(), b.into(), c.into()]);
    }
    fn section(&mut self, title: &str) {
        self.rows
            .push([format!("[{title}]"), String::new(), String::new()]);
    }
    fn render(&self) -> String {
        let body = || {
            self.rows
                .iter()
                .filter(|r| !(r[1].is_empty() && r[2].is_empty()))
        };
        let w0 = body().map(|r| r[0].chars().count()).max().unwrap_or(0);
        let w1 = body().map(|r| r[1].chars().count()).max().unwrap_or(0);
        let mut out = String::new();
        for r in &self.rows {
            if r[1].is_empty() && r[2].is_empty() {
                let _ = writeln!(out, "{}", r[0]);
            } else {
                let _ = writeln!(out, "  {:<w0$}  {:>w1$}  {}", r[0], r[1], r[2]);
            }
        }
        out
    }
}

fn n0(x: f64) -> String {
    let s = format!("{:.0}", x);
    let (neg, digits) = s
        .strip_prefix('-')
        .map_or((false, s.as_str()), |d| (true, d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if neg {
        format!("-{out}")
    } else {
        out
    }
}

fn pcts_json(p: &Pcts) -> Value {
    json!({"p50": p.p50, "p99": p.p99, "p999": p.p999, "max": p.max})
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let opts = parse_opts();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let engine_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus)
        .thread_name("engine")
        .enable_all()
        .build()
        .expect("engine runtime");
    let bench_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus)
        .thread_name("loadgen")
        .enable_all()
        .build()
        .expect("bench runtime");

    let pki = pki();
    let data = tempfile::tempdir().expect("data dir");
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[storage]
path = "{data}"
fsync = {fsync}
[auth]
admin_token = "{ADMIN}"
[delivery]
extra_ca_files = ["{ca}"]
private_network_allowlist = ["127.0.0.0/8"]
max_in_flight = 1024
max_in_flight_per_webhook = 256
{quota}
{max_lag}
[plans.bench]
events_per_second = 0
[log]
level = "{log}"
"#,
        quota = opts
            .quota
            .map(|q| format!("max_scheduled_per_account = {q}"))
            .unwrap_or_default(),
        max_lag = opts
            .max_lag
            .as_ref()
            .map(|l| format!("max_lag = \"{l}\""))
            .unwrap_or_default(),
        data = data.path().display(),
        ca = pki.ca_file.display(),
        fsync = opts.fsync,
        // The engine's own log (stderr), e.g. BENCH_LOG=warn to see why requests failed.
        log = std::env::var("BENCH_LOG").unwrap_or_else(|_| "off".into()),
    );
    let config = Config::from_toml(&toml, "load bench").expect("bench config");
    let engine = engine_rt
        .block_on(Engine::start(config))
        .unwrap_or_else(|e| panic!("engine start: {e}"));
    let (api, metrics) = (engine.api_addr(), engine.metrics_addr());
    let recv = bench_rt.block_on(start_receivers(opts.receivers, pki.server.clone()));
    let ctx = Ctx {
        opts: opts.clone(),
        api,
        metrics,
        recv,
    };
    let mode = if opts.quick { "quick" } else { "full" };
    let load_start = loadavg();
    eprintln!(
        "load bench ({mode}): {cpus} CPUs, {} connections, windows: rps {} s, fan-out/latency {} s, warm-up {} s",
        opts.conns, opts.rps_secs, opts.secs, opts.warmup
    );

    let (healthz, ingest, batch, events_only, fanouts, latency, paced, lags) =
        bench_rt.block_on(async {
            let skipped = RpsResult {
                skipped: true,
                ..Default::default()
            };
            let api = ctx.api;
            let healthz = if !ctx.opts.runs("healthz") {
                skipped.clone()
            } else {
                eprintln!("phase: GET /healthz");
                closed_loop(
                    &ctx,
                    Workload {
                        make: Arc::new(move || request(api, Method::GET, "/healthz", None)),
                        expect: StatusCode::OK,
                        items_per_ok: 1,
                        gate: None,
                    },
                )
                .await
            };

            create_account(&ctx, "acc_ingest").await;
            let ingest = if !ctx.opts.runs("ingest") {
                skipped.clone()
            } else {
                eprintln!("phase: POST /v1/events (no webhook)");
                closed_loop(&ctx, ingest_workload(api, "acc_ingest", None)).await
            };
            let batch = if !ctx.opts.runs("batch") {
                skipped.clone()
            } else {
                eprintln!("phase: POST /v1/events/batch x{BATCH_SIZE} (no webhook)");
                closed_loop(&ctx, batch_workload(api, "acc_ingest", None)).await
            };
            tokio::time::sleep(Duration::from_millis(500)).await;
            let m = Scrape::get(ctx.metrics).await;
            let events_only = (
                m.sum("kyberhook_events_ingested_total", None),
                du(data.path()),
                ingest.ok_total + batch.items_total,
                proc_status_kb("VmRSS:"),
            );

            let mut fanouts = Vec::new();
            let mut phase = 0;
            let fanout_list = if ctx.opts.runs("fanout") {
                ctx.opts.fanouts.clone()
            } else {
                Vec::new()
            };
            for &f in &fanout_list {
                for &mode in &ctx.opts.fanout_ingest {
                    phase += 1;
                    eprintln!(
                        "phase: deliveries with {f} webhook(s), {} ingest",
                        mode.name()
                    );
                    fanouts.push(fanout_phase(&ctx, phase, f, mode).await);
                }
            }
            let latency = if ctx.opts.runs("latency") {
                eprintln!("phase: latency at {} events/s (open loop)", ctx.opts.rate);
                latency_phase(
                    &ctx,
                    ctx.opts.rate,
                    "acc_latency",
                    ctx.opts.latency_webhooks,
                )
                .await
            } else {
                LatencyResult {
                    skipped: true,
                    ..Default::default()
                }
            };
            let paced = if ctx.opts.runs("paced") {
                eprintln!(
                    "phase: paced at {} events/s to 1 webhook (open loop)",
                    ctx.opts.paced_rate
                );
                latency_phase(&ctx, ctx.opts.paced_rate, "acc_paced", 1).await
            } else {
                LatencyResult {
                    skipped: true,
                    ..Default::default()
                }
            };
            let mut lags = Vec::new();
            if ctx.opts.runs("lag") {
                for (i, &(f, c)) in ctx.opts.lag.iter().enumerate() {
                    eprintln!(
                        "phase: lag, {f} webhook(s), {c} connections, uncapped single-event ingest"
                    );
                    lags.push(lag_phase(&ctx, LAG_FIRST + i, f, c).await);
                }
            }
            (
                healthz,
                ingest,
                batch,
                events_only,
                fanouts,
                latency,
                paced,
                lags,
            )
        });
    let retention = if ctx.opts.runs("retention") {
        eprintln!(
            "phase: retention {} s under fan-out to 10 webhooks ({} s)",
            ctx.opts.retention, ctx.opts.retention_run
        );
        bench_rt.block_on(retention_phase(
            &ctx.opts,
            &pki,
            &ctx.recv,
            engine_rt.handle(),
        ))
    } else {
        RetentionResult {
            skipped: true,
            ..Default::default()
        }
    };

    let peak_rss_kb = proc_status_kb("VmHWM:");
    let rss_kb = proc_status_kb("VmRSS:");
    let final_metrics = bench_rt.block_on(Scrape::get(ctx.metrics));
    let ingested_total = final_metrics.sum("kyberhook_events_ingested_total", None);
    let attempts_total = final_metrics.sum("kyberhook_delivery_attempts_total", None);
    let odd = ctx.recv.stats.odd.load(Ordering::Relaxed);

    let stopped = engine_rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), engine.shutdown())
            .await
            .is_ok()
    });
    let _ = ctx.recv.stop.send(true);
    for t in &ctx.recv.tasks {
        t.abort();
    }
    let data_bytes = du(data.path());
    let load_end = loadavg();

    // ---- report
    let mut t = Table { rows: Vec::new() };
    let skip = |r: &RpsResult, v: String| if r.skipped { "skipped".to_string() } else { v };
    t.row("figure", "value", "notes");
    t.section("closed loop, no webhook subscribed");
    t.row(
        "healthz_rps",
        skip(&healthz, n0(healthz.ok_per_s)),
        format!(
            "GET /healthz, {} conns, {:.1} s",
            opts.conns, healthz.window_s
        ),
    );
    t.row(
        "ingest_rps",
        skip(&ingest, n0(ingest.ok_per_s)),
        format!(
            "POST /v1/events -> 202 (durable, fsync); {:.0} commits/s, {:.1} events/commit, flush {:.2} ms",
            ingest.commits_per_s, ingest.events_per_commit, ingest.flush_ms_mean
        ),
    );
    let ratio = if healthz.ok_per_s > 0.0 {
        ingest.ok_per_s / healthz.ok_per_s
    } else {
        0.0
    };
    t.row("ingest_rps / healthz_rps", format!("{ratio:.3}"), "");
    t.row(
        "batch_events_per_s",
        skip(&batch, n0(batch.items_per_s)),
        format!(
            "POST /v1/events/batch x{BATCH_SIZE}: {:.0} req/s; {:.0} commits/s, {:.0} events/commit, flush {:.2} ms",
            batch.ok_per_s, batch.commits_per_s, batch.events_per_commit, batch.flush_ms_mean
        ),
    );
    let mut errs = Vec::new();
    for (name, r) in [
        ("healthz", &healthz),
        ("ingest", &ingest),
        ("batch", &batch),
    ] {
        if r.io_errors > 0 || r.item_errors > 0 || !r.other_statuses.is_empty() {
            errs.push(format!(
                "{name}: io {} item {} status [{}]",
                r.io_errors, r.item_errors, r.other_statuses
            ));
        }
    }
    t.row(
        "errors",
        if errs.is_empty() {
            "0".into()
        } else {
            errs.len().to_string()
        },
        errs.join("; "),
    );
    for f in &fanouts {
        t.section(&format!(
            "deliveries, {} webhook(s), {} receiver(s), closed-loop {} ingest capped at {} outstanding",
            f.webhooks,
            ctx.recv.urls.len(),
            f.mode.name(),
            n0(opts.max_backlog as f64)
        ));
        t.row(
            "deliveries_per_s",
            n0(f.deliveries_per_s),
            format!("received by the endpoint, {:.1} s window", f.window_s),
        );
        t.row(
            "ingest events/s during window",
            n0(f.ingest_events_per_s),
            format!(
                "x{} = {} deliveries/s offered",
                f.webhooks,
                n0(f.ingest_events_per_s * f.webhooks as f64)
            ),
        );
        t.row(
            "kept up",
            if f.kept_up { "yes" } else { "no" },
            format!(
                "backlog start {} -> end {} (max {}); ingest throttled {:.0}% of the time",
                n0(f.backlog_start as f64),
                n0(f.backlog_end as f64),
                n0(f.backlog_max as f64),
                f.throttled_fraction * 100.0
            ),
        );
        t.row(
            "kyberhook_deliveries_scheduled",
            n0(f.scheduled_gauge_end),
            format!("at window end (max sampled {})", n0(f.scheduled_gauge_max)),
        );
        t.row(
            "drain after window",
            format!("{:.1} s", f.drain_s),
            format!(
                "{}; process VmRSS after drain {:.0} MiB",
                if f.drained {
                    "all delivered".to_string()
                } else {
                    format!("NOT drained: {} outstanding", n0(f.left_after_drain as f64))
                },
                f.rss_after_mib
            ),
        );
        t.row(
            "attempt duration (mean)",
            format!("{:.2} ms", f.attempt_ms_mean),
            "kyberhook_delivery_attempt_duration_seconds",
        );
        t.row(
            "failures / duplicates",
            format!("{} / {}", f.attempt_failures, f.duplicates),
            format!(
                "failed attempts (metrics) / repeated delivery ids at the receiver; {} TLS connections accepted{}",
                f.receiver_connections,
                if f.ingest_other_statuses.is_empty() && f.ingest_io_errors == 0 {
                    String::new()
                } else {
                    format!("; ingest errors io {} status [{}]", f.ingest_io_errors, f.ingest_other_statuses)
                }
            ),
        );
    }
    t.section(&format!(
        "latency, open loop at {} events/s, {} webhook(s), {} connections{}",
        opts.rate,
        opts.latency_webhooks,
        opts.latency_conns,
        if latency.skipped { ": skipped" } else { "" }
    ));
    t.row(
        "events measured",
        n0(latency.measured as f64),
        format!(
            "sent at {:.0}/s; failed {}{}, no delivery seen {}, duplicates {}",
            latency.achieved_rate,
            latency.failed,
            if latency.fail_reasons.is_empty() {
                String::new()
            } else {
                format!(" ({})", latency.fail_reasons)
            },
            latency.missing,
            latency.duplicates
        ),
    );
    let p = &latency.ingest;
    t.row(
        "ingest p50 / p99 / p99.9",
        format!("{:.2} / {:.2} / {:.2} ms", p.p50, p.p99, p.p999),
        format!("intended send -> 202; max {:.1} ms", p.max),
    );
    let p = &latency.ingest_service;
    t.row(
        "  (service time only)",
        format!("{:.2} / {:.2} / {:.2} ms", p.p50, p.p99, p.p999),
        "actual send -> 202",
    );
    let p = &latency.e2e;
    t.row(
        "ingest -> first attempt p50 / p99 / p99.9",
        format!("{:.2} / {:.2} / {:.2} ms", p.p50, p.p99, p.p999),
        format!("intended send -> request at receiver; max {:.1} ms", p.max),
    );
    if !paced.skipped {
        t.section(&format!(
            "paced: open loop at {} events/s, 1 webhook, {} connections",
            paced.rate, opts.latency_conns
        ));
        t.row(
            "CPU per event (engine threads)",
            format!("{:.3} ms", paced.cpu_ms_per_event_engine),
            format!(
                "whole process {:.3} ms (with receiver and load generator); {} events measured; cores: {}",
                paced.cpu_ms_per_event_process,
                n0(paced.measured as f64),
                paced.cpu_threads
            ),
        );
        let p = &paced.ingest;
        t.row(
            "ingest p50 / p99 / p99.9",
            format!("{:.2} / {:.2} / {:.2} ms", p.p50, p.p99, p.p999),
            format!(
                "intended send -> 202; failed {}; VmRSS {:.0} MiB",
                paced.failed, paced.rss_mib
            ),
        );
        let p = &paced.e2e;
        t.row(
            "ingest -> first attempt p50 / p99 / p99.9",
            format!("{:.2} / {:.2} / {:.2} ms", p.p50, p.p99, p.p999),
            format!("missing {}", paced.missing),
        );
    }
    for l in &lags {
        t.section(&format!(
            "lag: {} webhook(s), {} connections, closed-loop single-event ingest, uncapped{}",
            l.webhooks,
            l.conns,
            opts.quota
                .map(|q| format!(
                    " (engine push-back: max_scheduled_per_account = {})",
                    n0(q as f64)
                ))
                .unwrap_or_default()
        ));
        t.row(
            "created (accepted) / s",
            n0(l.accepted_per_s),
            format!(
                "202s per second over {:.1} s; refused {}{}{}",
                l.window_s,
                l.refused,
                if l.refused_statuses.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", l.refused_statuses)
                },
                if l.io_errors > 0 {
                    format!("; io errors {}", l.io_errors)
                } else {
                    String::new()
                }
            ),
        );
        t.row(
            "delivered/s during load",
            n0(l.delivered_per_s),
            format!(
                "offered {} /s; per second (k): {}",
                n0(l.accepted_per_s * l.webhooks as f64),
                series(&l.series_during)
            ),
        );
        t.row(
            "engine's delivery lag (push-back)",
            format!(
                "{:.2} s",
                l.engine_lag_max.iter().cloned().fold(0.0, f64::max)
            ),
            format!(
                "largest of 10 samples a second of kyberhook_delivery_lag_seconds (delivery.max_lag = {}); per second, fanout/scheduler/dispatcher: {}",
                ctx.opts.max_lag.as_deref().unwrap_or("50ms"),
                l.engine_lag_stages
                    .iter()
                    .map(|s| format!("{:.1}/{:.1}/{:.1}", s[0], s[1], s[2]))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
        t.row(
            "delivered/s once ingest stops",
            l.after_per_s.map_or("—".to_string(), n0),
            match &l.probe {
                None => format!(
                    "backlog at stop {}, drained {} in {:.1} s; per second (k): {}",
                    n0(l.backlog_end as f64),
                    if l.drained { "all" } else { "NOT all" },
                    l.drain_s,
                    series(&l.series_after)
                ),
                Some(p) => format!(
                    "ceiling probe (backlog at stop was {}): a burst of {} priority events left {} deliveries owed, all written by second {}, drained {} in {:.1} s; mean over the full seconds after that (from the stop: {}); per second (k): {}",
                    n0(l.backlog_end as f64),
                    n0(p.events as f64),
                    n0(p.backlog as f64),
                    p.creating,
                    if p.drained { "all" } else { "NOT all" },
                    p.drain_s,
                    p.from_stop_per_s.map_or("—".to_string(), n0),
                    series(&p.series)
                ),
            },
        );
        t.row(
            "during / after",
            l.ratio().map_or("—".to_string(), |r| format!("{r:.2}")),
            "issue 12 item 1: >= 0.8 with 10 webhooks and 64 connections",
        );
        t.row(
            "lag 202 -> arrival p50 / p99 / max",
            format!("{:.0} / {:.0} / {:.0} ms", l.lag.p50, l.lag.p99, l.lag.max),
            format!(
                "every delivery of the window's events ({}; missing {}, duplicates {})",
                n0(l.lag_samples as f64),
                l.lag_missing,
                l.duplicates
            ),
        );
        t.row("threads' CPU during load (cores)", "", l.cpu_during.clone());
        if !l.cpu_after.is_empty() {
            t.row("threads' CPU once ingest stops", "", l.cpu_after.clone());
        }
        if let Some(p) = l.probe.as_ref().filter(|p| !p.cpu.is_empty()) {
            t.row("threads' CPU draining the probe", "", p.cpu.clone());
        }
        t.row(
            "VmRSS",
            format!("{:.0} MiB", l.rss_end_mib),
            format!(
                "at the window's end; {:.0} MiB after the drain",
                l.rss_drained_mib
            ),
        );
    }
    t.section(&format!(
        "retention {} s, 10 webhooks, closed-loop batch ingest{}",
        retention.retention_s,
        if retention.skipped { ": skipped" } else { "" }
    ));
    if !retention.skipped {
        t.row(
            "deliveries_per_s",
            n0(retention.deliveries_per_s),
            format!("received by the endpoint over {:.0} s", retention.run_s),
        );
        t.row(
            "purge deliveries/s",
            n0(retention.purge_per_s),
            format!(
                "wall time, first purge to end; capacity {} /s of purge work ({} purged in {} passes){}",
                n0(retention.purge_capacity_per_s),
                n0(retention.purged_deliveries),
                retention.passes,
                if retention.errors.is_empty() {
                    String::new()
                } else {
                    format!("; {}", retention.errors)
                }
            ),
        );
        t.row(
            "steady-state data dir",
            format!("{:.0} MiB", retention.steady_bytes as f64 / 1048576.0),
            format!(
                "mean of the last third; levelled off: {}; samples (s: MiB) {}",
                if retention.levelled_off { "yes" } else { "NO" },
                retention
                    .sizes
                    .iter()
                    .map(|(t, b)| format!("{t:.0}:{:.0}", *b as f64 / 1048576.0))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
    }
    t.section("process and disk");
    let (ev_only_metric, ev_only_bytes, ev_only_acked, rss_ingest_kb) = events_only;
    t.row(
        "peak RSS (VmHWM)",
        format!("{:.0} MiB", peak_rss_kb as f64 / 1024.0),
        format!(
            "whole process: engine + receiver + load generator (VmRSS after the no-webhook phases {:.0} MiB, at end {:.0} MiB)",
            rss_ingest_kb as f64 / 1024.0,
            rss_kb as f64 / 1024.0
        ),
    );
    let per_m = |bytes: u64, events: f64| {
        if events > 0.0 {
            bytes as f64 / events * 1e6
        } else {
            0.0
        }
    };
    t.row(
        "data dir per 1M events (ingest only)",
        format!(
            "{:.0} MiB",
            per_m(ev_only_bytes, ev_only_metric) / 1048576.0
        ),
        format!(
            "{:.1} MiB for {} events after the no-webhook phases",
            ev_only_bytes as f64 / 1048576.0,
            n0(ev_only_metric)
        ),
    );
    t.row(
        "data dir per 1M events (everything)",
        format!("{:.0} MiB", per_m(data_bytes, ingested_total) / 1048576.0),
        format!(
            "{:.1} MiB after shutdown for {} events, {} attempts",
            data_bytes as f64 / 1048576.0,
            n0(ingested_total),
            n0(attempts_total)
        ),
    );
    let mut checks = Vec::new();
    if (ev_only_metric - ev_only_acked as f64).abs() > 0.5 {
        checks.push(format!(
            "kyberhook_events_ingested_total {} != 202s counted {}",
            ev_only_metric, ev_only_acked
        ));
    }
    if odd > 0 {
        checks.push(format!(
            "{odd} receiver requests without phase path or delivery id"
        ));
    }
    if !stopped {
        checks.push("engine shutdown took over 60 s".into());
    }
    t.row(
        "machine load average (1/5/15 min)",
        format!("{load_start} -> {load_end}"),
        "at start -> at end; the whole process itself keeps ~2 busy",
    );
    t.row(
        "consistency checks",
        if checks.is_empty() { "ok" } else { "FAIL" },
        checks.join("; "),
    );

    println!(
        "kyberhook load bench ({mode}) — {cpus} CPUs, {} connections, fsync {}; engine, receiver and load generator share this process",
        opts.conns,
        if opts.fsync { "on" } else { "off" }
    );
    print!("{}", t.render());

    if opts.json {
        let fan: Vec<Value> = fanouts
            .iter()
            .map(|f| {
                json!({
                    "webhooks": f.webhooks,
                    "ingest": f.mode.name(),
                    "deliveries_per_s": f.deliveries_per_s,
                    "ingest_events_per_s": f.ingest_events_per_s,
                    "window_s": f.window_s,
                    "kept_up": f.kept_up,
                    "backlog_start": f.backlog_start,
                    "backlog_end": f.backlog_end,
                    "backlog_max": f.backlog_max,
                    "ingest_throttled_fraction": f.throttled_fraction,
                    "deliveries_scheduled_end": f.scheduled_gauge_end,
                    "deliveries_scheduled_max": f.scheduled_gauge_max,
                    "drain_s": f.drain_s,
                    "drained": f.drained,
                    "left_after_drain": f.left_after_drain,
                    "attempt_ms_mean": f.attempt_ms_mean,
                    "attempt_failures": f.attempt_failures,
                    "duplicates": f.duplicates,
                    "receiver_connections": f.receiver_connections,
                    "rss_after_drain_bytes": (f.rss_after_mib * 1048576.0) as u64,
                })
            })
            .collect();
        let out = json!({
            "mode": mode,
            "cpus": cpus,
            "conns": opts.conns,
            "receivers": ctx.recv.urls.len(),
            "healthz_rps": healthz.ok_per_s,
            "ingest_rps": ingest.ok_per_s,
            "ingest_to_healthz_ratio": ratio,
            "ingest_commits_per_s": ingest.commits_per_s,
            "ingest_events_per_commit": ingest.events_per_commit,
            "ingest_flush_ms_mean": ingest.flush_ms_mean,
            "batch_events_per_s": batch.items_per_s,
            "batch_requests_per_s": batch.ok_per_s,
            "fanout": fan,
            "latency": {
                "rate": latency.rate,
                "webhooks": opts.latency_webhooks,
                "connections": opts.latency_conns,
                "achieved_rate": latency.achieved_rate,
                "measured": latency.measured,
                "failed": latency.failed,
                "fail_reasons": latency.fail_reasons,
                "missing": latency.missing,
                "ingest_ms": pcts_json(&latency.ingest),
                "ingest_service_ms": pcts_json(&latency.ingest_service),
                "ingest_to_first_attempt_ms": pcts_json(&latency.e2e),
            },
            "paced": {
                "rate": paced.rate,
                "measured": paced.measured,
                "cpu_ms_per_event_engine": paced.cpu_ms_per_event_engine,
                "cpu_ms_per_event_process": paced.cpu_ms_per_event_process,
                "ingest_ms": pcts_json(&paced.ingest),
                "ingest_to_first_attempt_ms": pcts_json(&paced.e2e),
                "rss_bytes": (paced.rss_mib * 1048576.0) as u64,
            },
            "lag": lags.iter().map(|l| json!({
                "webhooks": l.webhooks,
                "conns": l.conns,
                "quota": opts.quota,
                "accepted_per_s": l.accepted_per_s,
                "refused": l.refused,
                "delivered_per_s_during": l.delivered_per_s,
                "delivered_per_s_after": l.after_per_s,
                "during_to_after": l.ratio(),
                "series_during": l.series_during,
                "engine_lag_max_s": l.engine_lag_max,
                "series_after": l.series_after,
                "ceiling_probe": l.probe.as_ref().map(|p| json!({
                    "events": p.events,
                    "backlog": p.backlog,
                    "drain_s": p.drain_s,
                    "drained": p.drained,
                    "series": p.series,
                    "creating_s": p.creating,
                    "from_stop_per_s": p.from_stop_per_s,
                    "cpu": p.cpu,
                })),
                "lag_ms": pcts_json(&l.lag),
                "lag_missing": l.lag_missing,
                "duplicates": l.duplicates,
                "cpu_during": l.cpu_during,
                "cpu_after": l.cpu_after,
                "rss_end_bytes": (l.rss_end_mib * 1048576.0) as u64,
                "rss_drained_bytes": (l.rss_drained_mib * 1048576.0) as u64,
            })).collect::<Vec<_>>(),
            "peak_rss_bytes": peak_rss_kb * 1024,
            "peak_rss_note": "VmHWM of the whole process: engine + receiver + load generator",
            "data_dir_bytes_ingest_only": ev_only_bytes,
            "events_ingest_only": ev_only_metric,
            "data_dir_bytes_per_million_events_ingest_only": per_m(ev_only_bytes, ev_only_metric),
            "data_dir_bytes_final": data_bytes,
            "events_ingested_total": ingested_total,
            "delivery_attempts_total": attempts_total,
            "data_dir_bytes_per_million_events_final": per_m(data_bytes, ingested_total),
            "checks": checks,
            "loadavg_start": load_start,
            "loadavg_end": load_end,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap());
    }
    drop(ctx);
    engine_rt.shutdown_timeout(Duration::from_secs(5));
    bench_rt.shutdown_timeout(Duration::from_secs(5));
}
