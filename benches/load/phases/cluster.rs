//! The `cluster` phase (`--backend postgres --phases cluster --nodes N`): N real `kyberhook
//! serve` processes on one fresh database, closed-loop producers spread over all of them (a
//! producer whose node stops answering moves on to the next, as a client with a list of
//! addresses does), the receivers in their own processes. The nodes divide the work (16
//! accounts), or with `--standby` one serves and the others forward to it. A third of the way
//! into the window one node (the serving one) is SIGKILLed; producers keep sending through the
//! survivors. Figures: events
//! created and delivered per second before and after the kill, 202 → arrival before it, how
//! long until another node serves and the longest pause in arrivals after the kill, then —
//! once every acknowledged event is delivered or `--drain-secs` passes — lost deliveries
//! (acknowledged events missing at a receiver: must be 0) and duplicates (same delivery id
//! twice: at-least-once allows the attempts in flight at the kill). The killed node is then
//! started again and must rejoin (and take its share, or wait as a standby) while deliveries
//! go on.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::Value;

use super::{body, create_account, create_webhooks, event_of_size, Ctx};
use crate::client::{connect, request, send};
use crate::engine::{config_text, Shape};
use crate::loadgen::Producer;
use crate::procstat::{stat_cpu_s, Cpu};
use crate::receiver::wall_ns;
use crate::report::{Cell, Pcts, Place, Report, Shown, Val};

/// The key every node seals webhook secrets with (they must share one).
const SECRETS_KEY: &str = "6b796265726b686f6f6b2d62656e63682d636c75737465722d6b65792d303031";

struct Node {
    name: String,
    api: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("node log file");
        let child = Command::new(env!("CARGO_BIN_EXE_kyberhook"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("KYBERHOOK_SECRETS_KEY", SECRETS_KEY)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a kyberhook node");
        self.child = Some(child);
    }

    fn cpu_s(&self) -> f64 {
        self.child
            .as_ref()
            .and_then(|c| std::fs::read_to_string(format!("/proc/{}/stat", c.id())).ok())
            .and_then(|s| stat_cpu_s(&s))
            .map_or(0.0, |(_, s)| s)
    }

    fn signal(&mut self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One answer from `addr` on a fresh connection, `None` if it could not be had.
async fn try_get(addr: SocketAddr, path: &str) -> Option<(StatusCode, Value)> {
    let mut s = connect(addr).await.ok()?;
    let a = send(&mut s, request(addr, Method::GET, path, None))
        .await
        .ok()?;
    Some((
        a.status,
        serde_json::from_slice(&a.body).unwrap_or(Value::Null),
    ))
}

/// The partitions each node holds, by name, as `addr` sees them.
async fn held(addr: SocketAddr) -> Option<Vec<(String, u64)>> {
    let (status, v) = try_get(addr, "/v1/admin/cluster").await?;
    if status != StatusCode::OK {
        return None;
    }
    Some(
        v["nodes"]
            .as_array()?
            .iter()
            .filter_map(|n| Some((n["name"].as_str()?.to_string(), n["partitions"].as_u64()?)))
            .collect(),
    )
}

/// Whether `names` hold all 256 partitions between them, each some.
async fn divided_among(addr: SocketAddr, names: &[String]) -> bool {
    let Some(now) = held(addr).await else {
        return false;
    };
    let of = |name: &String| now.iter().find(|(n, _)| n == name).map_or(0, |(_, p)| *p);
    names.iter().map(of).sum::<u64>() == 256 && names.iter().all(|n| of(n) > 0)
}

/// The name of the node that serves, as `addr` sees it.
async fn serving(addr: SocketAddr) -> Option<String> {
    let (status, v) = try_get(addr, "/v1/admin/cluster").await?;
    if status != StatusCode::OK {
        return None;
    }
    v["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["serving"] == Value::Bool(true))
        .and_then(|n| n["name"].as_str().map(str::to_string))
}

#[derive(Debug, Clone, Default)]
pub struct ClusterResult {
    pub nodes: usize,
    pub webhooks: usize,
    pub conns: usize,
    pub before_s: f64,
    pub accepted_before: f64,
    pub delivered_before: f64,
    pub lag_before: Pcts,
    pub service_before: Pcts,
    pub takeover_s: Option<f64>,
    pub pause_s: Option<f64>,
    pub after_s: f64,
    pub accepted_after: f64,
    pub delivered_after: f64,
    pub refused: u64,
    pub refused_statuses: String,
    pub io_errors: u64,
    pub acked: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub drained: bool,
    pub drain_s: f64,
    pub rejoined: bool,
    pub divide: bool,
    pub node_ms_per_delivery: Option<f64>,
    pub postgres_ms_per_delivery: Option<f64>,
}

pub async fn run(ctx: &Ctx, nodes: usize, webhooks: usize, conns: usize) -> ClusterResult {
    let base = ctx
        .opts
        .postgres_url
        .clone()
        .expect("--backend postgres gives a cluster");
    let url = crate::postgres::fresh_database(&base).await;
    let dir = tempfile::tempdir().expect("cluster dir");
    let mut group: Vec<Node> = (0..nodes)
        .map(|i| {
            let port = free_port();
            let data = dir.path().join(format!("node-{i}"));
            std::fs::create_dir_all(&data).expect("node dir");
            let name = format!("node-{i}");
            let extra = [
                ("storage", "backend", "\"postgres\"".to_string()),
                ("storage", "postgres_url", format!("{url:?}")),
                ("server", "listen", format!("\"127.0.0.1:{port}\"")),
                ("cluster", "node_name", format!("{name:?}")),
                (
                    "cluster",
                    "advertise",
                    format!("\"http://127.0.0.1:{port}\""),
                ),
                ("log", "level", "\"warn\"".to_string()),
                ("cluster", "divide_work", ctx.opts.divide.to_string()),
            ]
            .map(|(s, k, v)| (s.to_string(), k.to_string(), v));
            let text = config_text(
                &ctx.opts,
                ctx.pki.as_deref(),
                &data,
                Shape::Defaults,
                &extra,
            );
            let config = data.join("kyberhook.toml");
            std::fs::write(&config, text).expect("node config");
            Node {
                name,
                api: SocketAddr::from(([127, 0, 0, 1], port)),
                log: data.join("node.log"),
                config,
                child: None,
            }
        })
        .collect();
    for n in &mut group {
        n.spawn();
    }
    let apis: Vec<SocketAddr> = group.iter().map(|n| n.api).collect();
    // Every node answers once one serves (the standbys forward to it).
    let ready_by = Instant::now() + Duration::from_secs(60);
    for n in &group {
        while try_get(n.api, "/readyz").await.map(|(s, _)| s) != Some(StatusCode::OK) {
            if Instant::now() > ready_by {
                let logs: Vec<String> = group
                    .iter()
                    .map(|n| format!("{}: {}", n.name, n.log_tail()))
                    .collect();
                panic!(
                    "cluster phase: {} not ready in 60 s\n{}",
                    n.name,
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let divide = ctx.opts.divide;
    let names: Vec<String> = group.iter().map(|n| n.name.clone()).collect();
    if divide {
        let by = Instant::now() + Duration::from_secs(60);
        while !divided_among(apis[0], &names).await {
            assert!(
                Instant::now() < by,
                "cluster phase: not divided among {names:?} in 60 s: {:?}",
                held(apis[0]).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let ctx = &Ctx {
        api: apis[0],
        ..ctx.clone()
    };
    let recv = ctx.recv.clone();
    // Dividing: several accounts, so that every node serves some.
    let accounts: Vec<String> = if divide {
        (0..crate::options::DIVIDED_ACCOUNTS)
            .map(|k| format!("acc_cluster{nodes}x{webhooks}_{k}"))
            .collect()
    } else {
        vec![format!("acc_cluster{nodes}x{webhooks}")]
    };
    let path = recv.path(true).await;
    for account in &accounts {
        create_account(ctx, account).await;
    }
    if divide {
        // Every node takes the new accounts in (the registry's version) before their
        // webhooks are created through the node serving each.
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    for (k, account) in accounts.iter().enumerate() {
        create_webhooks(ctx, account, path, k * webhooks, webhooks).await;
    }
    let events: Vec<bytes::Bytes> = accounts
        .iter()
        .map(|a| body(&event_of_size(a, ctx.opts.event_bytes)))
        .collect();

    let warmup = Duration::from_secs(ctx.opts.warmup);
    let window = Duration::from_secs(ctx.opts.secs.max(9));
    let hard = Instant::now() + warmup + window + Duration::from_secs(60);
    // Producers keep their own event ids, so an event whose answer was lost in the crash is
    // sent again exactly (a standby re-sends one it had in flight itself).
    let producer = Producer::start_with_ids(apis.clone(), conns, events, hard);
    tokio::time::sleep(warmup).await;
    let mut r = ClusterResult {
        nodes,
        webhooks,
        conns,
        divide,
        ..Default::default()
    };
    let node_cpu = |g: &[Node]| g.iter().map(Node::cpu_s).collect::<Vec<f64>>();
    recv.refresh().await;
    producer.window(true);
    let (t0, cpu0, ncpu0) = (Instant::now(), Cpu::now(&recv), node_cpu(&group));
    let (recv0, acked0, refused0) = (
        recv.received(path),
        producer.acked.load(Ordering::Relaxed),
        producer.refused.load(Ordering::Relaxed),
    );
    tokio::time::sleep(window / 3).await;

    // The kill: the serving node, or (dividing) the last node.
    let victim_name = if divide {
        names[nodes - 1].clone()
    } else {
        serving(apis[0]).await.expect("a node serves")
    };
    let victim = group
        .iter()
        .position(|n| n.name == victim_name)
        .expect("the serving node is one of ours");
    recv.refresh().await;
    let (t_kill, kill_ns) = (Instant::now(), wall_ns());
    let (recv_k, acked_k) = (recv.received(path), producer.acked.load(Ordering::Relaxed));
    let ncpu_k = node_cpu(&group);
    group[victim].signal("-KILL");
    if let Some(mut c) = group[victim].child.take() {
        let _ = c.wait();
    }
    r.before_s = (t_kill - t0).as_secs_f64();
    r.accepted_before = (acked_k - acked0) as f64 / r.before_s;
    r.delivered_before = (recv_k - recv0) as f64 / r.before_s;
    let survivor = apis[(victim + 1) % nodes];
    let survivors: Vec<String> = names
        .iter()
        .filter(|n| **n != victim_name)
        .cloned()
        .collect();
    while Instant::now() < t_kill + Duration::from_secs(60) {
        let taken = if divide {
            divided_among(survivor, &survivors).await
        } else {
            matches!(serving(survivor).await, Some(name) if name != victim_name)
        };
        if taken {
            r.takeover_s = Some(t_kill.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let end = t0 + window;
    tokio::time::sleep_until(end.into()).await;
    producer.window(false);
    recv.refresh().await;
    let t1 = Instant::now();
    let (recv1, acked1, refused1) = (
        recv.received(path),
        producer.acked.load(Ordering::Relaxed),
        producer.refused.load(Ordering::Relaxed),
    );
    producer.stop().await;
    r.after_s = (t1 - t_kill).as_secs_f64();
    r.accepted_after = (acked1 - acked_k) as f64 / r.after_s;
    r.delivered_after = (recv1 - recv_k) as f64 / r.after_s;
    r.refused = refused1 - refused0;
    r.refused_statuses = producer.statuses();
    r.io_errors = producer.io_errors.load(Ordering::Relaxed);

    // Drain: until every acknowledged event reached every webhook (bounded).
    let acks = producer.take_acks();
    let service = producer.take_service();
    let owed = producer.acked.load(Ordering::Relaxed) * webhooks as u64;
    let t2 = Instant::now();
    let deadline = t2 + Duration::from_secs(ctx.opts.drain_secs);
    loop {
        recv.refresh().await;
        let unique = recv.received(path).saturating_sub(recv.dups(path));
        if unique >= owed || Instant::now() > deadline {
            r.drained = unique >= owed;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r.drain_s = t2.elapsed().as_secs_f64();
    let cpu1 = Cpu::now(&recv);
    let ncpu1 = node_cpu(&group);
    let delivered = recv.received(path) - recv0;
    if delivered > 0 {
        // The killed node's CPU up to the kill, the survivors' throughout.
        let nodes_s: f64 = (0..nodes)
            .map(|i| {
                let until_kill = ncpu_k[i] - ncpu0[i];
                if i == victim {
                    until_kill
                } else {
                    until_kill + (ncpu1[i] - ncpu_k[i])
                }
            })
            .sum();
        r.node_ms_per_delivery = Some(nodes_s * 1000.0 / delivered as f64);
        let pg = cpu1.since(&cpu0).postgres_s();
        if pg > 0.0 {
            r.postgres_ms_per_delivery = Some(pg * 1000.0 / delivered as f64);
        }
    }
    r.duplicates = recv.dups(path);

    // Lost: acknowledged events of the window with fewer first arrivals than webhooks.
    let arrivals = recv.take_arrivals(path).await;
    let mut per_event: std::collections::HashMap<&str, (usize, u64)> =
        std::collections::HashMap::with_capacity(acks.len());
    for a in &arrivals {
        let e = per_event.entry(&a.event).or_insert((0, u64::MAX));
        e.0 += 1;
        e.1 = e.1.min(a.ns);
    }
    r.acked = acks.len() as u64;
    let mut lags = Vec::new();
    for (id, at) in &acks {
        match per_event.get(id.as_ref()) {
            Some(&(n, first)) => {
                r.lost += webhooks.saturating_sub(n) as u64;
                if *at < kill_ns {
                    lags.push(Duration::from_nanos(first.saturating_sub(*at)));
                }
            }
            None => r.lost += webhooks as u64,
        }
    }
    r.lag_before = Pcts::of(lags);
    r.service_before = Pcts::of(service);
    // The longest pause in arrivals from the kill on (over the ingest window).
    let end_ns = kill_ns + (t1 - t_kill).as_nanos() as u64;
    let mut times: Vec<u64> = arrivals
        .iter()
        .map(|a| a.ns)
        .filter(|&ns| ns >= kill_ns && ns <= end_ns)
        .collect();
    times.sort_unstable();
    if let Some(&first) = times.first() {
        let mut gap = first - kill_ns;
        for w in times.windows(2) {
            gap = gap.max(w[1] - w[0]);
        }
        r.pause_s = Some(gap as f64 / 1e9);
    }

    // The killed node comes back and waits as a standby; the cluster still answers.
    group[victim].spawn();
    let back_by = Instant::now() + Duration::from_secs(30);
    while Instant::now() < back_by {
        let listed = try_get(survivor, "/v1/admin/cluster")
            .await
            .and_then(|(_, v)| v["nodes"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter(|n| n["name"] == Value::String(victim_name.clone()))
            .count();
        let answers = try_get(apis[victim], "/readyz").await.map(|(s, _)| s);
        // Dividing: it takes its share again.
        let share = !divide || divided_among(survivor, &names).await;
        if listed > 0 && answers == Some(StatusCode::OK) && share {
            r.rejoined = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in &mut group {
        n.signal("-TERM");
    }
    for n in &mut group {
        if let Some(mut c) = n.child.take() {
            let _ = c.wait();
        }
    }
    r
}

impl ClusterResult {
    pub fn report(&self, rep: &mut Report) {
        let c = self;
        let s = rep.section(
            Cell::text("cluster (")
                .f("nodes", Val::Int(c.nodes as u64))
                .t(if c.divide {
                    " kyberhook processes on one PostgreSQL, dividing 16 accounts): "
                } else {
                    " kyberhook processes on one PostgreSQL): "
                })
                .f("webhooks", Val::Int(c.webhooks as u64))
                .t(" webhook(s) x ")
                .f("conns", Val::Int(c.conns as u64))
                .t(" connections spread over the nodes"),
            Place::Item("cluster".into()),
        );
        s.row(
            "before the kill: created / s",
            Cell::fig("accepted_per_s_before", Val::Num(c.accepted_before)),
            Cell::text("delivered/s ")
                .f("delivered_per_s_before", Val::Num(c.delivered_before))
                .t(" over ")
                .f("before_s", Val::Secs(c.before_s, 1))
                .t("; 202 -> arrival p50 / p99 ")
                .f("lag_before_ms", Val::Pcts(c.lag_before, 1, Shown::Two))
                .t("; send -> 202 ")
                .f("service_ms", Val::Pcts(c.service_before, 1, Shown::Two)),
        );
        s.row(
            if c.divide {
                "SIGKILL of a node: the others hold its partitions after"
            } else {
                "SIGKILL of the serving node: another serves after"
            },
            Cell::fig(
                "takeover_s",
                Val::opt(c.takeover_s.map(|v| Val::Secs(v, 2))),
            ),
            Cell::text("longest pause in arrivals from the kill on ")
                .f("pause_s", Val::opt(c.pause_s.map(|v| Val::Secs(v, 2)))),
        );
        s.row(
            "after the kill: created / s",
            Cell::fig("accepted_per_s_after", Val::Num(c.accepted_after)),
            Cell::text("delivered/s ")
                .f("delivered_per_s_after", Val::Num(c.delivered_after))
                .t(" over ")
                .f("after_s", Val::Secs(c.after_s, 1))
                .refusals(c.refused, &c.refused_statuses, c.io_errors),
        );
        s.row(
            "lost deliveries",
            Cell::fig("lost", Val::Int(c.lost)),
            Cell::text("of ")
                .f("acked", Val::Int(c.acked))
                .t(" events acknowledged in the window x webhooks; duplicates ")
                .f("duplicates", Val::Int(c.duplicates))
                .t("; drained ")
                .f("drained", Val::Flag(c.drained, "yes", "NO"))
                .t(" in ")
                .f("drain_s", Val::Secs(c.drain_s, 1))
                .t(if c.divide {
                    "; the killed node rejoined and took its share: "
                } else {
                    "; the killed node rejoined as a standby: "
                })
                .f("rejoined", Val::Flag(c.rejoined, "yes", "NO")),
        );
        s.row(
            "CPU per delivery",
            Cell::fig(
                "node_ms_per_delivery",
                Val::opt(c.node_ms_per_delivery.map(|v| Val::Ms(v, 3))),
            ),
            Cell::text("all kyberhook processes; PostgreSQL ").f(
                "postgres_ms_per_delivery",
                Val::opt(c.postgres_ms_per_delivery.map(|v| Val::Ms(v, 3))),
            ),
        );
    }
}
