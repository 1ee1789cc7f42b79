//! The load generator: closed-loop connections to the engine's API, each a task sending back
//! to back on one keep-alive HTTP/1.1 connection. Two shapes:
//!
//! - [`spawn_closed_loop`]: any request ([`Workload`]), optionally held back by a gate (the
//!   fan-out phases' backlog cap); counts answers and items (events);
//! - [`Producer`]: single events, uncapped, as a well-behaved client would send them
//!   (honours `Retry-After`); records every 202 of the measuring window (event id and when)
//!   so 202 → arrival can be joined with the receiver's arrivals, its send → 202 time, and the
//!   refusals by status (429 / 503: push-back or quota).
//!
//! Every loop is bounded by a stop flag, a hard deadline and a request cap.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;

use crate::client::{self, connect, request, send, REQUEST_TIMEOUT};
use crate::receiver::wall_ns;

/// A hard cap on the requests one connection sends in one phase.
const MAX_REQUESTS_PER_CONN: u64 = 50_000_000;
/// A closed-loop connection idle (throttled) for longer than this is replaced before use.
const IDLE_RECONNECT: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Counters {
    pub ok: AtomicU64,
    pub items: AtomicU64,
    /// Events in requests sent but not yet answered: the gate counts them as already
    /// offered, so 256 connections x 100-event batches cannot overshoot the backlog cap.
    pub items_in_flight: AtomicU64,
    pub item_errors: AtomicU64,
    pub io_errors: AtomicU64,
    pub throttled_ns: AtomicU64,
    pub stop: AtomicBool,
    statuses: Mutex<HashMap<u16, u64>>,
}

impl Counters {
    /// Answers other than the expected one: `503x12 429x3`.
    pub fn other_statuses(&self) -> String {
        statuses_text(&self.statuses.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn statuses_text(s: &HashMap<u16, u64>) -> String {
    let mut v: Vec<_> = s.iter().collect();
    v.sort();
    v.iter()
        .map(|(k, n)| format!("{k}x{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub type MakeReq = Arc<dyn Fn() -> Request<Full<Bytes>> + Send + Sync>;
pub type Gate = Arc<dyn Fn() -> bool + Send + Sync>;

pub struct Workload {
    pub make: MakeReq,
    pub expect: StatusCode,
    pub items_per_ok: u64,
    pub gate: Option<Gate>,
}

pub fn spawn_closed_loop(
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
                        Ok(a) if a.status == work.expect => {
                            c.ok.fetch_add(1, Ordering::Relaxed);
                            c.items.fetch_add(work.items_per_ok, Ordering::Relaxed);
                            if work.items_per_ok > 1 {
                                let errs = a.body.windows(8).filter(|w| w == b"\"error\":").count();
                                if errs > 0 {
                                    c.item_errors.fetch_add(errs as u64, Ordering::Relaxed);
                                    c.items.fetch_sub(errs as u64, Ordering::Relaxed);
                                }
                            }
                        }
                        Ok(a) => {
                            *c.statuses
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .entry(a.status.as_u16())
                                .or_default() += 1;
                            if a.status == StatusCode::SERVICE_UNAVAILABLE {
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

/// Waits for `handles`, at most `limit`.
pub async fn join_all(handles: Vec<tokio::task::JoinHandle<()>>, limit: Duration) {
    let _ = tokio::time::timeout(limit, async {
        for h in handles {
            let _ = h.await;
        }
    })
    .await;
}

/// An event id and the wall-clock ns of its 202.
pub type Ack = (Box<str>, u64);

/// Closed-loop, uncapped single-event producers (see the module doc).
#[derive(Default)]
pub struct Producer {
    pub acked: AtomicU64,
    pub refused: AtomicU64,
    pub io_errors: AtomicU64,
    stop: AtomicBool,
    /// While set, 202s are recorded (`acks`, `service`).
    window: AtomicBool,
    statuses: Mutex<HashMap<u16, u64>>,
    acks: Mutex<Vec<Ack>>,
    /// Send → 202 of the window's events.
    service: Mutex<Vec<Duration>>,
    handles: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Events carry the producer's own ids ([`Producer::start_with_ids`]).
    own_ids: bool,
}

/// `body` (a JSON object) with `"id":"c{conn}-{n}"` first.
fn with_id(body: &[u8], conn: usize, n: u64) -> Bytes {
    let mut v = Vec::with_capacity(body.len() + 32);
    v.extend_from_slice(format!("{{\"id\":\"c{conn}-{n}\",").as_bytes());
    v.extend_from_slice(&body[1..]);
    Bytes::from(v)
}

impl Producer {
    /// Starts `conns` connections sending `body` to `POST /v1/events` until [`Producer::stop`]
    /// or `hard` (on the caller's runtime).
    pub fn start(api: SocketAddr, conns: usize, body: Bytes, hard: Instant) -> Arc<Producer> {
        Producer::start_with(vec![api], conns, vec![body], hard, false)
    }

    /// The same, connection `i` sending `bodies[i % b]` to `apis[i % n]` (the nodes of a
    /// cluster; one whose node stops answering moves on to the next, as a client with a list
    /// of addresses does), each event carrying the producer's own `id` (`c{conn}-{n}`); an
    /// event that was refused or got no answer is sent again under the same id until it gets
    /// its 202, as a producer that keeps its own event ids does.
    pub fn start_with_ids(
        apis: Vec<SocketAddr>,
        conns: usize,
        bodies: Vec<Bytes>,
        hard: Instant,
    ) -> Arc<Producer> {
        Producer::start_with(apis, conns, bodies, hard, true)
    }

    fn start_with(
        apis: Vec<SocketAddr>,
        conns: usize,
        bodies: Vec<Bytes>,
        hard: Instant,
        own_ids: bool,
    ) -> Arc<Producer> {
        let p = Arc::new(Producer {
            own_ids,
            ..Producer::default()
        });
        let apis: Arc<[SocketAddr]> = apis.into();
        let handles = (0..conns)
            .map(|i| {
                let (p, body, apis) = (p.clone(), bodies[i % bodies.len()].clone(), apis.clone());
                tokio::spawn(async move { p.run(&apis, i, body, hard).await })
            })
            .collect();
        *p.handles.lock().unwrap_or_else(|e| e.into_inner()) = handles;
        p
    }

    async fn run(&self, apis: &[SocketAddr], first: usize, body: Bytes, hard: Instant) {
        let mut at = first;
        let mut api = apis[at % apis.len()];
        let Ok(mut sender) = connect(api).await else {
            self.io_errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut sent = 0u64;
        // With own ids: this connection's next event number, and the event owed a 202.
        let (mut n, mut owed) = (0u64, None::<Bytes>);
        while !self.stop.load(Ordering::Relaxed)
            && Instant::now() < hard
            && sent < MAX_REQUESTS_PER_CONN
        {
            sent += 1;
            let event = if self.own_ids {
                owed.get_or_insert_with(|| with_id(&body, first, n)).clone()
            } else {
                body.clone()
            };
            let req = request(api, Method::POST, "/v1/events", Some(event));
            let t = Instant::now();
            match client::send(&mut sender, req).await {
                Ok(a) if a.status == StatusCode::ACCEPTED => {
                    if owed.take().is_some() {
                        n += 1;
                    }
                    let (at, took) = (wall_ns(), t.elapsed());
                    self.acked.fetch_add(1, Ordering::Relaxed);
                    if self.window.load(Ordering::Relaxed) {
                        if let Some(id) = a
                            .body
                            .strip_prefix(b"{\"id\":\"")
                            .and_then(|r| r.iter().position(|&c| c == b'"').map(|n| &r[..n]))
                        {
                            let id: Box<str> = String::from_utf8_lossy(id).into();
                            self.acks
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((id, at));
                            self.service
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(took);
                        }
                    }
                }
                Ok(a) => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    *self
                        .statuses
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(a.status.as_u16())
                        .or_default() += 1;
                    // A well-behaved producer waits as long as it is asked to.
                    let wait = a.retry_after.unwrap_or(1).clamp(1, 5);
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                }
                Err(_) => {
                    self.io_errors.fetch_add(1, Ordering::Relaxed);
                    // Bounded by `hard` and the request cap like every turn of the loop.
                    if apis.len() == 1 {
                        match tokio::time::timeout(REQUEST_TIMEOUT, connect(api)).await {
                            Ok(Ok(s)) => sender = s,
                            _ => return,
                        }
                        continue;
                    }
                    // Next node; a node that refuses connections is skipped after a pause.
                    loop {
                        at += 1;
                        api = apis[at % apis.len()];
                        if let Ok(Ok(s)) = tokio::time::timeout(REQUEST_TIMEOUT, connect(api)).await
                        {
                            sender = s;
                            break;
                        }
                        if self.stop.load(Ordering::Relaxed) || Instant::now() >= hard {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    /// Starts or ends the measuring window.
    pub fn window(&self, open: bool) {
        self.window.store(open, Ordering::Relaxed);
    }

    /// Stops every connection and waits for them (at most 35 s).
    pub async fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|e| e.into_inner()));
        join_all(handles, Duration::from_secs(35)).await;
    }

    /// The window's 202s (taken).
    pub fn take_acks(&self) -> Vec<Ack> {
        std::mem::take(&mut *self.acks.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The window's send → 202 times (taken).
    pub fn take_service(&self) -> Vec<Duration> {
        std::mem::take(&mut *self.service.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Refusals by status: `429x3 503x12`.
    pub fn statuses(&self) -> String {
        statuses_text(&self.statuses.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Refusals with `status` so far.
    pub fn refused_with(&self, status: u16) -> u64 {
        self.statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&status)
            .copied()
            .unwrap_or(0)
    }
}
