//! The webhook receivers, each in its own process ([`child`]), seen from the bench: start them,
//! hand each phase its own receiver path ([`PathId`]), set how a path or one of its hooks
//! answers ([`mode::Mode`]), and read their counters and recorded arrivals back.
//!
//! Counters come in over each child's control listener: a background task polls `GET /stats`
//! every few milliseconds into local atomics, so the load generator's backlog gate can read
//! them on every request ([`Receivers::received`]); [`Receivers::refresh`] fetches them afresh
//! where a window starts or ends. Arrival times are wall-clock nanoseconds ([`wall_ns`]): the
//! one clock both processes read.

pub mod child;
pub mod mode;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, StatusCode};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use crate::client::{self, Sender};
use mode::Mode;

/// Receiver paths per process: more than the phases of one run use.
pub const MAX_PATHS: usize = 64;

/// Nanoseconds since the Unix epoch: comparable between the bench and its receivers.
pub fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A phase's receiver path: webhooks of the phase point at `/p{N}/h{hook}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathId(usize);

impl PathId {
    fn index(self) -> usize {
        self.0
    }
}

/// One delivery's first arrival, as the receiver recorded it.
pub struct Arrival {
    pub event: Box<str>,
    pub ns: u64,
}

/// A throw-away CA and a leaf for 127.0.0.1, for `--receiver-tls`.
pub struct Pki {
    _dir: tempfile::TempDir,
    pub ca_file: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

pub fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kyberhook bench CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf certificate");
    let ca_file = dir.path().join("ca.pem");
    let cert = dir.path().join("leaf.der");
    let key = dir.path().join("leaf-key.der");
    std::fs::write(&ca_file, ca.pem()).expect("write CA");
    std::fs::write(&cert, leaf.der()).expect("write leaf");
    std::fs::write(&key, leaf_key.serialize_der()).expect("write key");
    Pki {
        _dir: dir,
        ca_file,
        cert,
        key,
    }
}

struct Proc {
    child: std::sync::Mutex<Child>,
    /// Held so the child sees its stdin close when the bench ends.
    _stdin: ChildStdin,
    control: SocketAddr,
}

/// The counters of all receivers, summed, as last polled.
struct Counters {
    received: Vec<AtomicU64>,
    dups: Vec<AtomicU64>,
    in_flight: Vec<AtomicU64>,
    odd: AtomicU64,
    accepted: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        let zeros = || (0..MAX_PATHS).map(|_| AtomicU64::new(0)).collect();
        Counters {
            received: zeros(),
            dups: zeros(),
            in_flight: zeros(),
            odd: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        }
    }
}

#[derive(serde::Deserialize)]
struct Stats {
    received: Vec<u64>,
    dups: Vec<u64>,
    in_flight: Vec<u64>,
    odd: u64,
    accepted: u64,
}

pub struct Receivers {
    procs: Vec<Proc>,
    /// `http(s)://127.0.0.1:PORT` of each receiver.
    pub urls: Vec<String>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    next_path: AtomicUsize,
}

impl Receivers {
    /// Starts `count` receiver processes answering in `mode`, HTTPS with `tls`.
    pub fn start(count: usize, mode: Mode, tls: Option<&Pki>) -> Receivers {
        let exe = std::env::current_exe().expect("the bench's own executable");
        let mut procs = Vec::new();
        let mut urls = Vec::new();
        for _ in 0..count {
            let mut cmd = Command::new(&exe);
            cmd.arg("--receiver-child")
                .arg("--mode")
                .arg(mode.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            if let Some(p) = tls {
                cmd.arg("--tls").arg(&p.cert).arg(&p.key);
            }
            let mut child = cmd.spawn().expect("start a receiver process");
            let stdin = child.stdin.take().expect("piped stdin");
            let stdout = child.stdout.take().expect("piped stdout");
            let mut line = String::new();
            // The child prints its ports at once, or exits (EOF) with its reason on stderr.
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let ports: Vec<u16> = line
                .strip_prefix("ready ")
                .map(|r| {
                    r.split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            let [data, control] = ports[..] else {
                panic!("receiver process did not start: {line:?}");
            };
            let scheme = if tls.is_some() { "https" } else { "http" };
            urls.push(format!("{scheme}://127.0.0.1:{data}"));
            procs.push(Proc {
                child: std::sync::Mutex::new(child),
                _stdin: stdin,
                control: SocketAddr::from(([127, 0, 0, 1], control)),
            });
        }
        Receivers {
            procs,
            urls,
            counters: Arc::default(),
            stop: Arc::default(),
            next_path: AtomicUsize::new(0),
        }
    }

    /// Polls the counters every 5 ms until [`Receivers::stop`] (on the caller's runtime).
    pub fn spawn_poller(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut conns: Vec<Option<Sender>> = me.procs.iter().map(|_| None).collect();
            while !me.stop.load(Ordering::Relaxed) {
                me.poll(&mut conns).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    }

    async fn poll(&self, conns: &mut [Option<Sender>]) {
        let mut sum = Stats {
            received: vec![0; MAX_PATHS],
            dups: vec![0; MAX_PATHS],
            in_flight: vec![0; MAX_PATHS],
            odd: 0,
            accepted: 0,
        };
        for (p, conn) in self.procs.iter().zip(conns.iter_mut()) {
            if conn.is_none() {
                *conn = client::connect(p.control).await.ok();
            }
            let Some(s) = conn.as_mut() else {
                return;
            };
            let req = client::request(p.control, Method::GET, "/stats", None);
            let stats = client::send(s, req)
                .await
                .ok()
                .and_then(|a| serde_json::from_slice::<Stats>(&a.body).ok());
            let Some(stats) = stats else {
                *conn = None;
                return;
            };
            for i in 0..MAX_PATHS {
                sum.received[i] += stats.received.get(i).copied().unwrap_or(0);
                sum.dups[i] += stats.dups.get(i).copied().unwrap_or(0);
                sum.in_flight[i] += stats.in_flight.get(i).copied().unwrap_or(0);
            }
            sum.odd += stats.odd;
            sum.accepted += stats.accepted;
        }
        let c = &self.counters;
        for i in 0..MAX_PATHS {
            c.received[i].store(sum.received[i], Ordering::Relaxed);
            c.dups[i].store(sum.dups[i], Ordering::Relaxed);
            c.in_flight[i].store(sum.in_flight[i], Ordering::Relaxed);
        }
        c.odd.store(sum.odd, Ordering::Relaxed);
        c.accepted.store(sum.accepted, Ordering::Relaxed);
    }

    /// Fetches the counters now (where a window starts or ends).
    pub async fn refresh(&self) {
        let mut conns: Vec<Option<Sender>> = self.procs.iter().map(|_| None).collect();
        self.poll(&mut conns).await;
    }

    /// A fresh path for a phase, recording arrivals if `record`.
    pub async fn path(&self, record: bool) -> PathId {
        let n = self.next_path.fetch_add(1, Ordering::Relaxed);
        assert!(
            n < MAX_PATHS,
            "more than {MAX_PATHS} receiver paths in one run"
        );
        let p = PathId(n);
        if record {
            self.control(Method::PUT, &format!("/record/{n}"), "on")
                .await;
        }
        p
    }

    /// The URL of `hook` of path `p`, on receiver `hook % K`.
    pub fn url(&self, p: PathId, hook: usize) -> String {
        format!(
            "{}/p{}/h{hook}",
            self.urls[hook % self.urls.len()],
            p.index()
        )
    }

    /// How path `p` (or only its `hook`) answers from now on.
    pub async fn set_mode(&self, p: PathId, hook: Option<usize>, mode: &Mode) {
        let path = match hook {
            Some(h) => format!("/mode/{}/{h}", p.index()),
            None => format!("/mode/{}", p.index()),
        };
        self.control(Method::PUT, &path, &mode.to_string()).await;
    }

    /// Removes and returns the arrivals recorded for `p` so far.
    pub async fn take_arrivals(&self, p: PathId) -> Vec<Arrival> {
        let mut out = Vec::new();
        for proc in &self.procs {
            // Bounded: at most 200 pages of 100 000 (20 M deliveries).
            for _ in 0..200 {
                let (_, body) = client::once(
                    proc.control,
                    Method::POST,
                    &format!("/take/{}?limit=100000", p.index()),
                    None,
                )
                .await;
                let text = String::from_utf8_lossy(&body);
                let before = out.len();
                out.extend(text.lines().filter_map(|l| {
                    let mut it = l.split(' ');
                    Some(Arrival {
                        event: it.next()?.into(),
                        ns: it.next()?.parse().ok()?,
                    })
                }));
                if out.len() - before < 100_000 {
                    break;
                }
            }
        }
        out
    }

    /// Drops what the receivers remember of `p` (seen delivery ids, arrivals).
    pub async fn forget(&self, p: PathId) {
        self.control(Method::POST, &format!("/forget/{}", p.index()), "")
            .await;
    }

    async fn control(&self, method: Method, path: &str, body: &str) {
        for p in &self.procs {
            let (status, b) = client::once(
                p.control,
                method.clone(),
                path,
                Some(Bytes::from(body.to_string())),
            )
            .await;
            assert!(
                status.is_success(),
                "receiver control {path}: {status} {}",
                String::from_utf8_lossy(&b)
            );
            debug_assert!(status != StatusCode::NOT_FOUND);
        }
    }

    /// Requests received on `p` (as last polled).
    pub fn received(&self, p: PathId) -> u64 {
        self.counters.received[p.index()].load(Ordering::Relaxed)
    }
    /// Repeated delivery ids seen on `p`.
    pub fn dups(&self, p: PathId) -> u64 {
        self.counters.dups[p.index()].load(Ordering::Relaxed)
    }
    /// Requests to `p` the receivers have not answered yet.
    pub fn in_flight(&self, p: PathId) -> u64 {
        self.counters.in_flight[p.index()].load(Ordering::Relaxed)
    }
    /// Requests without a phase path or a delivery id.
    pub fn odd(&self) -> u64 {
        self.counters.odd.load(Ordering::Relaxed)
    }
    /// TCP connections the receivers accepted.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    /// CPU seconds the receiver processes have used (utime + stime).
    pub fn cpu_s(&self) -> f64 {
        self.procs
            .iter()
            .filter_map(|p| {
                let pid = p.child.lock().ok()?.id();
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                crate::procstat::stat_cpu_s(&stat).map(|(_, s)| s)
            })
            .sum()
    }

    /// Stops the poller and ends the receiver processes (each by its own handle).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for p in &self.procs {
            let mut child = p.child.lock().unwrap_or_else(|e| e.into_inner());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
