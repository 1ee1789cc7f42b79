//! The bench's command line: flags in, one [`Opts`] out. Bad flags end the run with exit code
//! 2 and one line naming the flag (the bench is run by people comparing runs, and a typo
//! should not cost them a ten-minute run with the default).

use crate::receiver::mode::Mode;

/// Phases in the order they run; `--phases` picks a subset.
pub const ALL_PHASES: &[&str] = &[
    "healthz",
    "ingest",
    "batch",
    "fanout",
    "latency",
    "retention",
    "lag",
    "paced",
    "flow",
    "isolation",
    "cluster",
];

/// Phases that run unless `--phases` names others: all but `cluster` (it needs
/// `--backend postgres` and starts its own node processes).
fn default_phases() -> Vec<String> {
    ALL_PHASES
        .iter()
        .filter(|p| **p != "cluster")
        .map(|p| p.to_string())
        .collect()
}

/// The isolation cases (issue 20 item 3): `a` slow account beside a fast one, `b` slow webhook
/// beside fast ones, `c` an endpoint that starts failing and recovers.
pub const ALL_CASES: &[&str] = &["a", "b", "c"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IngestMode {
    #[default]
    Single,
    Batch,
}

impl IngestMode {
    pub fn name(self) -> &'static str {
        match self {
            IngestMode::Single => "single-event",
            IngestMode::Batch => "batch x100",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Opts {
    pub quick: bool,
    pub json: bool,
    /// `storage.fsync`: off only to see what durability costs (`--no-fsync`).
    pub fsync: bool,
    pub conns: usize,
    pub secs: u64,
    pub rps_secs: u64,
    pub warmup: u64,
    pub rate: u64,
    pub fanouts: Vec<usize>,
    /// Receiver processes; webhooks are spread over them.
    pub receivers: usize,
    /// How every receiver answers unless a phase says otherwise (`--receiver-latency`).
    pub receiver_mode: Mode,
    /// HTTPS receivers with a throw-away CA (`delivery.extra_ca_files`) instead of plain HTTP.
    pub receiver_tls: bool,
    pub max_backlog: u64,
    pub drain_secs: u64,
    /// Ceiling probes per flow/lag run with fan-out; their median is "once ingest stops".
    pub probes: usize,
    /// How the fan-out phases ingest: single events, batches of 100, or each in turn.
    pub fanout_ingest: Vec<IngestMode>,
    pub latency_webhooks: usize,
    /// Connections of the open-loop latency phase (a producer sending 1 000 events/s needs a
    /// few; each of 256 would sit idle for a quarter of a second between requests).
    pub latency_conns: usize,
    pub phases: Vec<String>,
    /// `storage.retention` of the retention phase's engine, seconds.
    pub retention: u64,
    /// How long the retention phase ingests, seconds.
    pub retention_run: u64,
    /// (webhooks, connections) of each lag phase run; `--lag` sets these and `flow`'s.
    pub lag: Vec<(usize, usize)>,
    /// (webhooks, connections) of each flow phase run (issue 20's table).
    pub flow: Vec<(usize, usize)>,
    /// `delivery.max_scheduled_per_account` of the engines (`--quota`).
    pub quota: Option<u64>,
    /// `delivery.max_lag` of the engines (`--max-lag 0s` turns the lag push-back off).
    pub max_lag: Option<String>,
    /// Events/s of the paced phase (one webhook, open loop).
    pub paced_rate: u64,
    /// Request body bytes of the flow and isolation phases' events.
    pub event_bytes: usize,
    /// `section.key=value` overrides of the flow and isolation engines' config (`--set`).
    pub engine_set: Vec<(String, String, String)>,
    pub cases: Vec<String>,
    /// Connections of each producer in the isolation cases.
    pub isolation_conns: usize,
    /// The slow endpoints' answer time in the isolation cases, ms.
    pub slow_ms: u64,
    /// How case c's endpoint fails (`--fail-mode`, default `status:503`).
    pub fail_mode: Mode,
    /// `--backend postgres`: every engine on a fresh database of the cluster at
    /// `postgres_url` (`--postgres-url`, else `KYBERHOOK_BENCH_POSTGRES_URL`, else a throw-away
    /// cluster the bench starts with `.ci/postgres`).
    pub postgres: bool,
    pub postgres_url: Option<String>,
    /// `--nodes N`: kyberhook processes of the cluster phase (2 to 8).
    pub nodes: usize,
    /// `--cluster WxC,...`: the cluster phase's runs (default 1x32,10x32).
    pub cluster: Vec<(usize, usize)>,
    /// The cluster's nodes divide the partitions (`cluster.divide_work`, the default), the
    /// producers post for [`DIVIDED_ACCOUNTS`] accounts, and the SIGKILL hits one of them;
    /// `--standby`: one serves, the others stand by, and the serving one is killed.
    pub divide: bool,
}

/// Accounts of the cluster phase with `--divide` (spread over the partitions).
pub const DIVIDED_ACCOUNTS: usize = 16;

impl Opts {
    pub fn runs(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }
    pub fn mode_name(&self) -> &'static str {
        if self.quick {
            "quick"
        } else {
            "full"
        }
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("load bench: {msg}");
    eprintln!(
        "usage: cargo bench --bench load -- [--quick] [--json] [--no-fsync] [--conns N] [--secs S] [--rps-secs S] \
         [--warmup S] [--rate EV/S] [--fanouts 1,10] [--fanout-ingest single|batch|both] [--receivers K] \
         [--receiver-latency MODE] [--receiver-tls] [--max-backlog N] [--drain-secs S] [--probes N] [--latency-webhooks N] \
         [--latency-conns N] [--phases {}] [--retention S] [--retention-run S] [--lag WxC,...] [--flow WxC,...] \
         [--quota N] [--max-lag D] [--paced-rate N] [--event-bytes N] [--set SECTION.KEY=VALUE] \
         [--isolation {}] [--isolation-conns N] [--slow-ms MS] [--fail-mode MODE] \
         [--backend sled|postgres] [--postgres-url URL] [--nodes N] [--cluster WxC,...] [--divide|--standby]",
        ALL_PHASES.join(","),
        ALL_CASES.join(",")
    );
    std::process::exit(2)
}

fn runs_of(flag: &str, v: &str) -> Vec<(usize, usize)> {
    let runs: Vec<(usize, usize)> =
        v.split(',')
            .map(|s| {
                let (f, c) = s.trim().split_once('x').unwrap_or_else(|| {
                    usage(&format!("{flag} takes WEBHOOKSxCONNS[,…], e.g. 10x64"))
                });
                (
                    num(flag, f).clamp(1, 100) as usize,
                    num(flag, c).clamp(1, 4096) as usize,
                )
            })
            .collect();
    if runs.is_empty() || runs.len() > 8 {
        usage(&format!("{flag} takes 1 to 8 runs"));
    }
    runs
}

fn num(name: &str, v: &str) -> u64 {
    v.trim()
        .parse()
        .unwrap_or_else(|_| usage(&format!("{name}: {v:?} is not a number")))
}

fn mode(name: &str, v: &str) -> Mode {
    v.parse().unwrap_or_else(|e| usage(&format!("{name}: {e}")))
}

fn list(name: &str, v: &str, allowed: &[&str]) -> Vec<String> {
    let items: Vec<String> = v.split(',').map(|p| p.trim().to_string()).collect();
    if let Some(bad) = items.iter().find(|p| !allowed.contains(&p.as_str())) {
        usage(&format!(
            "{name}: unknown {bad:?} (use {})",
            allowed.join(",")
        ));
    }
    items
}

pub fn parse(args: Vec<String>) -> Opts {
    let quick = args.iter().any(|a| a == "--quick");
    let mut lag_given = false;
    let mut flow_given = false;
    let (mut nodes_given, mut phases_given) = (false, false);
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
        receiver_mode: Mode::default(),
        receiver_tls: false,
        max_backlog: 50_000,
        drain_secs: if quick { 60 } else { 120 },
        probes: 3,
        fanout_ingest: vec![IngestMode::Single, IngestMode::Batch],
        latency_webhooks: 1,
        latency_conns: 32,
        phases: default_phases(),
        retention: 10,
        retention_run: if quick { 40 } else { 90 },
        lag: vec![(1, 32), (10, 32), (10, 64), (10, 256)],
        flow: vec![(1, 32), (1, 64), (1, 256), (10, 32), (10, 64), (10, 256)],
        quota: None,
        max_lag: None,
        paced_rate: 250,
        event_bytes: 600,
        engine_set: Vec::new(),
        cases: ALL_CASES.iter().map(|c| c.to_string()).collect(),
        isolation_conns: 32,
        slow_ms: 300,
        fail_mode: "status:503".parse().expect("a valid mode"),
        nodes: 2,
        divide: true,
        cluster: vec![(1, 32), (10, 32)],
        postgres: false,
        postgres_url: std::env::var("KYBERHOOK_BENCH_POSTGRES_URL").ok(),
    };
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> String {
            inline
                .clone()
                .or_else(|| it.next())
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--quick" => {}
            // cargo passes --bench to harness = false benches.
            "--bench" => {}
            "--json" => o.json = true,
            "--no-fsync" => o.fsync = false,
            "--receiver-tls" => o.receiver_tls = true,
            "--conns" => o.conns = num(&flag, &value()).max(1) as usize,
            "--secs" => o.secs = num(&flag, &value()).max(1),
            "--rps-secs" => o.rps_secs = num(&flag, &value()).max(1),
            "--warmup" => o.warmup = num(&flag, &value()),
            "--rate" => o.rate = num(&flag, &value()).max(1),
            "--receivers" => o.receivers = num(&flag, &value()).clamp(1, 16) as usize,
            "--receiver-latency" => o.receiver_mode = mode(&flag, &value()),
            "--max-backlog" => o.max_backlog = num(&flag, &value()).max(1),
            "--drain-secs" => o.drain_secs = num(&flag, &value()).min(3600),
            "--probes" => o.probes = num(&flag, &value()).clamp(1, 9) as usize,
            "--backend" => {
                o.postgres = match value().as_str() {
                    "sled" => false,
                    "postgres" => true,
                    other => usage(&format!("--backend: {other:?} is not sled or postgres")),
                }
            }
            "--postgres-url" => o.postgres_url = Some(value()),
            "--nodes" => {
                o.nodes = num(&flag, &value()).clamp(2, 8) as usize;
                nodes_given = true;
            }
            "--cluster" => {
                o.cluster = runs_of(&flag, &value());
                nodes_given = true;
            }
            "--divide" => {
                o.divide = true;
                nodes_given = true;
            }
            "--standby" => {
                o.divide = false;
                nodes_given = true;
            }
            "--latency-webhooks" => o.latency_webhooks = num(&flag, &value()).min(100) as usize,
            "--latency-conns" => o.latency_conns = num(&flag, &value()).max(1) as usize,
            "--retention" => o.retention = num(&flag, &value()).max(1),
            "--retention-run" => o.retention_run = num(&flag, &value()).max(10),
            "--quota" => o.quota = Some(num(&flag, &value()).max(1)),
            "--max-lag" => {
                let v = value();
                if kyberhook::config::parse_duration(&v).is_err() {
                    usage("--max-lag takes a duration, e.g. 500ms or 0s");
                }
                o.max_lag = Some(v)
            }
            "--paced-rate" => o.paced_rate = num(&flag, &value()).max(1),
            "--lag" => {
                o.lag = runs_of(&flag, &value());
                lag_given = true;
            }
            "--flow" => {
                o.flow = runs_of(&flag, &value());
                flow_given = true;
            }
            "--phases" => {
                o.phases = list(&flag, &value(), ALL_PHASES);
                phases_given = true;
            }
            "--isolation" => o.cases = list(&flag, &value(), ALL_CASES),
            "--fanout-ingest" => {
                o.fanout_ingest = match value().as_str() {
                    "single" => vec![IngestMode::Single],
                    "batch" => vec![IngestMode::Batch],
                    "both" => vec![IngestMode::Single, IngestMode::Batch],
                    v => usage(&format!(
                        "--fanout-ingest: {v:?} is not single, batch or both"
                    )),
                }
            }
            "--fanouts" => {
                let v = value();
                o.fanouts = v
                    .split(',')
                    .map(|s| num(&flag, s).clamp(1, 1000) as usize)
                    .collect();
                if o.fanouts.is_empty() || o.fanouts.len() > 3 {
                    usage("--fanouts takes 1 to 3 comma-separated counts");
                }
            }
            "--event-bytes" => o.event_bytes = num(&flag, &value()).clamp(200, 65536) as usize,
            "--set" => {
                let v = value();
                let parsed = v.split_once('=').and_then(|(path, val)| {
                    let (section, key) = path.trim().split_once('.')?;
                    Some((section.to_string(), key.to_string(), val.trim().to_string()))
                });
                match parsed {
                    Some(s) => o.engine_set.push(s),
                    None => usage("--set takes SECTION.KEY=VALUE, e.g. delivery.max_in_flight_per_webhook=1024"),
                }
            }
            "--isolation-conns" => o.isolation_conns = num(&flag, &value()).clamp(1, 4096) as usize,
            "--slow-ms" => o.slow_ms = num(&flag, &value()).clamp(1, 60_000),
            "--fail-mode" => o.fail_mode = mode(&flag, &value()),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    // `--nodes` or `--cluster` alone asks for the cluster phase.
    if nodes_given && !phases_given {
        o.phases = vec!["cluster".to_string()];
    }
    if o.runs("cluster") && !o.postgres {
        usage("the cluster phase needs --backend postgres");
    }
    // `--lag` alone names the runs of both phases that take them (`--phases flow --lag 10x64`).
    if lag_given && !flow_given {
        o.flow = o.lag.clone();
    }
    o
}
