//! The receiver process: the bench re-executes itself with `--receiver-child` to run one
//! webhook receiver in its own process on ONE tokio thread (a current_thread runtime), so
//! that, as with a real endpoint, its answer time is its own and rises when the machine is
//! busy, instead of hiding behind the bench's runtime. (In the bench's own process an instant
//! answer hid the engine's per-webhook slot bottleneck, issue 20.)
//!
//! Webhooks point at `/p{PATH}/h{HOOK}` on the data listener; PATH is a number the bench
//! gives each phase. Per request the receiver counts it for its path, detects repeated
//! delivery ids (`X-KyberAccess-Delivery`), optionally records the first arrival of each
//! delivery (event id and wall-clock ns: the bench joins them with its 202s), and answers
//! per its [`Mode`] (a path's or hook's own, else the process default). A second listener
//! takes control requests from the bench (plain HTTP/1.1, text):
//! `GET /stats` (JSON counters), `PUT /mode/{path}[/{hook}]` (body: a mode), `PUT
//! /record/{path}` (body `on`/`off`), `POST /take/{path}?limit=N` (recorded arrivals, removed:
//! lines `event_id ns`), `POST /forget/{path}` (drop its seen ids and arrivals).
//! On start it prints `ready DATA_PORT CONTROL_PORT` on stdout; it exits when its stdin
//! closes (the bench ended, however it ended).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::mode::{Answer, Mode, HANG_MAX};
use super::{wall_ns, MAX_PATHS};

/// One recorded first arrival of a delivery.
struct Arrival {
    event: Box<str>,
    ns: u64,
}

#[derive(Default)]
struct PathState {
    received: AtomicU64,
    dups: AtomicU64,
    in_flight: AtomicU64,
    inner: Mutex<PathInner>,
}

#[derive(Default)]
struct PathInner {
    seen: HashSet<u128>,
    record: bool,
    arrivals: Vec<Arrival>,
    /// The whole path's mode (`None` key) and hooks' own modes.
    modes: HashMap<Option<u16>, Mode>,
}

struct State {
    default_mode: Mode,
    paths: Vec<PathState>,
    /// Requests without a `/p{N}/` path or a delivery id.
    odd: AtomicU64,
    /// TCP connections accepted.
    accepted: AtomicU64,
    /// Requests in flight in this process: what `load` modes' answer time rises with.
    in_flight: AtomicU64,
}

/// Decrements in-flight counters however the request ends (answered, or dropped when the
/// client closes the connection of a delayed or hanging request).
struct InFlight<'a>(&'a AtomicU64, Option<&'a AtomicU64>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        if let Some(p) = self.1 {
            p.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Runs the receiver process; `args` are the arguments after `--receiver-child`.
pub fn main(args: &[String]) -> ! {
    let mut mode = Mode::default();
    let mut tls: Option<(String, String)> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--mode" => {
                let v = it.next().map(String::as_str).unwrap_or("");
                mode = v.parse().unwrap_or_else(|e| fail(&format!("{e}")));
            }
            "--tls" => match (it.next(), it.next()) {
                (Some(c), Some(k)) => tls = Some((c.clone(), k.clone())),
                _ => fail("--tls takes CERT KEY"),
            },
            other => fail(&format!("unknown argument {other:?}")),
        }
    }
    // The bench holds our stdin open; when it goes (ended or killed), so do we.
    std::thread::spawn(|| {
        let mut sink = String::new();
        let _ = std::io::stdin().lock().read_line(&mut sink);
        std::process::exit(0);
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("runtime: {e}")));
    rt.block_on(serve(mode, tls));
    std::process::exit(0)
}

fn fail(msg: &str) -> ! {
    eprintln!("load bench receiver: {msg}");
    std::process::exit(2)
}

async fn serve(default_mode: Mode, tls: Option<(String, String)>) {
    let data = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| fail(&format!("bind: {e}")));
    let control = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| fail(&format!("bind: {e}")));
    let acceptor = tls.map(|(cert, key)| tls_acceptor(&cert, &key));
    let state = Arc::new(State {
        default_mode,
        paths: (0..MAX_PATHS).map(|_| PathState::default()).collect(),
        odd: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
    });
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "ready {} {}",
            data.local_addr().map(|a| a.port()).unwrap_or(0),
            control.local_addr().map(|a| a.port()).unwrap_or(0)
        );
        let _ = out.flush();
    }
    let control_state = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = control.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let state = control_state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(control_request(&state, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    loop {
        let Ok((stream, _)) = data.accept().await else {
            // Out of file descriptors or similar: give the others a moment to close.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        state.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(receive(&state, req).await) }
            });
            let http = hyper::server::conn::http1::Builder::new();
            match acceptor {
                None => {
                    let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                }
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(stream),
                    );
                    if let Ok(Ok(tls)) = handshake.await {
                        let _ = http.serve_connection(TokioIo::new(tls), svc).await;
                    }
                }
            }
        });
    }
}

/// A TLS acceptor for the leaf certificate and PKCS#8 key in `cert` and `key` (DER files the
/// bench writes next to its throw-away CA).
fn tls_acceptor(cert: &str, key: &str) -> tokio_rustls::TlsAcceptor {
    let read = |p: &str| std::fs::read(p).unwrap_or_else(|e| fail(&format!("{p}: {e}")));
    let certs = vec![rustls::pki_types::CertificateDer::from(read(cert))];
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        read(key),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .unwrap_or_else(|e| fail(&format!("tls: {e}")));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// `/p{path}/h{hook}` → (path, hook).
fn path_of(path: &str) -> Option<(usize, u16)> {
    let rest = path.strip_prefix("/p")?;
    let (p, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let p = p.parse::<usize>().ok().filter(|p| *p < MAX_PATHS)?;
    let hook = rest
        .strip_prefix('h')
        .and_then(|h| h.split('/').next())
        .and_then(|h| h.parse().ok())
        .unwrap_or(0);
    Some((p, hook))
}

async fn receive(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let at = wall_ns();
    let target = path_of(req.uri().path());
    let delivery = req
        .headers()
        .get("x-kyberaccess-delivery")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("dlv_"))
        .and_then(|h| u128::from_str_radix(h, 16).ok());
    let load = state.in_flight.fetch_add(1, Ordering::Relaxed);
    let path_state = target.map(|(p, _)| &state.paths[p]);
    if let Some(p) = path_state {
        p.in_flight.fetch_add(1, Ordering::Relaxed);
    }
    let _guard = InFlight(&state.in_flight, path_state.map(|p| &p.in_flight));
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mode = match (target, delivery) {
        (Some((p, hook)), Some(d)) => {
            let ps = &state.paths[p];
            ps.received.fetch_add(1, Ordering::Relaxed);
            let mut inner = ps.inner.lock().unwrap_or_else(|e| e.into_inner());
            if !inner.seen.insert(d) {
                ps.dups.fetch_add(1, Ordering::Relaxed);
            } else if inner.record {
                if let Some(event) = event_id(&body) {
                    inner.arrivals.push(Arrival {
                        event: event.into(),
                        ns: at,
                    });
                }
            }
            inner
                .modes
                .get(&Some(hook))
                .or_else(|| inner.modes.get(&None))
                .copied()
                .unwrap_or(state.default_mode)
        }
        _ => {
            state.odd.fetch_add(1, Ordering::Relaxed);
            state.default_mode
        }
    };
    let delay = mode.delay(load);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let status = match mode.answer {
        Answer::Status(c) => StatusCode::from_u16(c).unwrap_or(StatusCode::OK),
        Answer::Hang => {
            tokio::time::sleep(HANG_MAX).await;
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

/// The event id of a delivery body: the engine writes `{"id":"evt_…",` first
/// (src/ingest/body.rs); anything else is parsed.
fn event_id(body: &[u8]) -> Option<String> {
    if let Some(id) = body
        .strip_prefix(b"{\"id\":\"")
        .and_then(|r| r.iter().position(|&c| c == b'"').map(|n| &r[..n]))
    {
        return Some(String::from_utf8_lossy(id).into_owned());
    }
    #[derive(serde::Deserialize)]
    struct Id {
        id: String,
    }
    serde_json::from_slice::<Id>(body).ok().map(|i| i.id)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn control_request(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body = match http_body_util::Limited::new(req.into_body(), 4096)
        .collect()
        .await
    {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_string(),
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body over 4 KiB"),
    };
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let path_no = |s: &str| s.parse::<usize>().ok().filter(|p| *p < MAX_PATHS);
    match (&method, segs.as_slice()) {
        (&Method::GET, ["stats"]) => {
            let col = |f: fn(&PathState) -> &AtomicU64| {
                state
                    .paths
                    .iter()
                    .map(|p| f(p).load(Ordering::Relaxed))
                    .collect::<Vec<_>>()
            };
            let v = serde_json::json!({
                "received": col(|p| &p.received),
                "dups": col(|p| &p.dups),
                "in_flight": col(|p| &p.in_flight),
                "odd": state.odd.load(Ordering::Relaxed),
                "accepted": state.accepted.load(Ordering::Relaxed),
            });
            text(StatusCode::OK, v.to_string())
        }
        (&Method::PUT, ["mode", p, rest @ ..]) if rest.len() <= 1 => {
            let Some(p) = path_no(p) else {
                return text(StatusCode::BAD_REQUEST, "no such path");
            };
            let hook = match rest.first().map(|h| h.parse::<u16>()) {
                None => None,
                Some(Ok(h)) => Some(h),
                Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "hook is a number"),
            };
            let mode: Mode = match body.parse() {
                Ok(m) => m,
                Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
            };
            let mut inner = state.paths[p]
                .inner
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if hook.is_none() {
                inner.modes.clear();
            }
            inner.modes.insert(hook, mode);
            text(StatusCode::NO_CONTENT, "")
        }
        (&Method::PUT, ["record", p]) => {
            let (Some(p), Some(on)) = (
                path_no(p),
                match body.as_str() {
                    "on" => Some(true),
                    "off" => Some(false),
                    _ => None,
                },
            ) else {
                return text(StatusCode::BAD_REQUEST, "PUT /record/{path} with on or off");
            };
            state.paths[p]
                .inner
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record = on;
            text(StatusCode::NO_CONTENT, "")
        }
        (&Method::POST, ["take", p]) => {
            let Some(p) = path_no(p) else {
                return text(StatusCode::BAD_REQUEST, "no such path");
            };
            let limit = query
                .strip_prefix("limit=")
                .and_then(|l| l.parse::<usize>().ok())
                .unwrap_or(100_000)
                .clamp(1, 1_000_000);
            let taken: Vec<Arrival> = {
                let mut inner = state.paths[p]
                    .inner
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let n = inner.arrivals.len().min(limit);
                inner.arrivals.drain(..n).collect()
            };
            let mut out = String::with_capacity(taken.len() * 48);
            for a in &taken {
                use std::fmt::Write as _;
                let _ = writeln!(out, "{} {}", a.event, a.ns);
            }
            text(StatusCode::OK, out)
        }
        (&Method::POST, ["forget", p]) => {
            let Some(p) = path_no(p) else {
                return text(StatusCode::BAD_REQUEST, "no such path");
            };
            let mut inner = state.paths[p]
                .inner
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            inner.seen = HashSet::new();
            inner.arrivals = Vec::new();
            text(StatusCode::NO_CONTENT, "")
        }
        _ => text(StatusCode::NOT_FOUND, "no such control request"),
    }
}
