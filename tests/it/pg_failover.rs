//! Two real `kyberhook` processes on one PostgreSQL database: one serves, the other waits as a
//! standby. A serving node killed with SIGKILL is taken over at once and every event it
//! acknowledged is delivered; one paused (SIGSTOP) past its lease is taken over when the lease
//! expires, and once resumed it commits nothing and stops. A FIFO webhook keeps its order
//! across a takeover; a plan's rate holds for an account posting through both nodes, and a
//! plan change made through the standby governs the next deliveries at once. A request the
//! dying holder may have seen goes to the next holder only when sending it again changes
//! nothing (an event with the producer's own id).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{pki, Api, Pki, Receiver, Reply, ADMIN};
use crate::crash::{burst, setup, wait_all_delivered};
use crate::limits::max_in_window;
use crate::ordering::{create_hook, event, OrderReceiver};
use crate::pg::{pg_database, PgDb};

/// A free port on 127.0.0.1 (for a node that advertises its address).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A node's config: its own data dir, the shared database and secrets key, `lease`; with a
/// `port`, it listens there and advertises it.
pub(crate) fn node_config(
    dir: &Path,
    name: &str,
    db: &PgDb,
    pki: &Pki,
    lease: &str,
    port: Option<u16>,
) -> PathBuf {
    let key = dir.join("shared-secrets.key");
    if !key.exists() {
        std::fs::write(&key, format!("{}\n", "5a".repeat(32))).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
[metrics]
listen = "127.0.0.1:0"
[storage]
path = "{data}"
backend = "postgres"
postgres_url = "{url}"
postgres_ca_file = "{pg_ca}"
secrets_key_file = "{key}"
[cluster]
divide_work = false
node_name = "{name}"
lease = "{lease}"
{advertise}
[auth]
admin_token = "{ADMIN}"
[delivery]
timeout = "2s"
retry_schedule = ["1s", "1s", "1s"]
max_in_flight_per_webhook = 2
max_lag = "0s"
extra_ca_files = ["{ca}"]
private_network_allowlist = ["127.0.0.0/8"]
[log]
format = "json"
level = "info"
"#,
        data = dir.join(name).display(),
        url = db.url,
        pg_ca = db.ca_file.display(),
        key = key.display(),
        ca = pki.ca_file.display(),
        port = port.unwrap_or(0),
        advertise = port.map_or(String::new(), |p| format!(
            "advertise = \"http://127.0.0.1:{p}\""
        )),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

/// A `kyberhook serve` process that may be waiting as a standby; killed when dropped.
pub(crate) struct Node {
    pub(crate) child: Child,
    addr: mpsc::Receiver<SocketAddr>,
    log: Arc<Mutex<String>>,
}

impl Node {
    pub(crate) fn start(config: &Path) -> Node {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(env!("CARGO_BIN_EXE_kyberhook"))
            .args(["serve", "--config"])
            .arg(config)
            .env_remove("KYBERHOOK_POSTGRES_URL")
            .env_remove("KYBERHOOK_SECRETS_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, addr) = mpsc::channel();
        let log = Arc::new(Mutex::new(String::new()));
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if let Some(api) = v["fields"]["api"].as_str() {
                        let _ = tx.send(api.parse().unwrap());
                    }
                }
                let mut log = keep.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Node { child, addr, log }
    }

    /// Its API once it serves.
    pub(crate) fn serving(&self, wait: Duration) -> Api {
        match self.addr.recv_timeout(wait) {
            Ok(addr) => Api::new(addr),
            Err(_) => panic!("the node did not serve within {wait:?}:\n{}", self.log()),
        }
    }

    /// An address it logged as `field` (`standby_api`, `standby_metrics`) while it waits as a
    /// standby.
    pub(crate) fn standby_addr(&self, field: &str) -> SocketAddr {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find_map(|v| v["fields"][field].as_str().and_then(|a| a.parse().ok()))
            .unwrap_or_else(|| panic!("no {field} logged:\n{}", self.log()))
    }

    /// The address it forwards on while it waits as a standby.
    fn standby_api(&self) -> Api {
        Api::new(self.standby_addr("standby_api"))
    }

    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until its log has `text`.
    pub(crate) fn wait_logged(&self, text: &str, wait: Duration) {
        let deadline = Instant::now() + wait;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} logged within {wait:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Its exit code once it ends by itself within `wait`.
    pub(crate) fn exits_within(&mut self, wait: Duration) -> i32 {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "still running after {wait:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Node A serving and node B standing by on `db`, both advertising their addresses (so B
/// forwards to A); A's API.
fn serving_and_standby(dir: &Path, db: &PgDb, pki: &Pki) -> (Node, Api, Node) {
    let a = Node::start(&node_config(
        dir,
        "node-a",
        db,
        pki,
        "10s",
        Some(free_port()),
    ));
    let api_a = a.serving(Duration::from_secs(30));
    let b = Node::start(&node_config(
        dir,
        "node-b",
        db,
        pki,
        "10s",
        Some(free_port()),
    ));
    b.wait_logged("listening as a standby", Duration::from_secs(30));
    (a, api_a, b)
}

/// Per event id, the delivery ids it arrived under (a redelivery keeps its delivery id).
pub(crate) fn arrivals(rx: &Receiver) -> HashMap<String, Vec<String>> {
    let mut by: HashMap<String, Vec<String>> = HashMap::new();
    for r in rx.log.lock().unwrap().iter() {
        let event = r.json()["id"].as_str().unwrap().to_string();
        by.entry(event)
            .or_default()
            .push(r.header("x-kyberaccess-delivery"));
    }
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_a_sigkilled_node_and_every_acknowledged_event_arrives() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    // Slow and narrow, so that most deliveries are still owed when the node dies.
    rx.set_default(Reply::Slow(Duration::from_millis(250), 200));
    let db = pg_database().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut a, api_a, b) = serving_and_standby(dir.path(), &db, &pki);
    b.wait_logged("another kyberhook node is serving", Duration::from_secs(1));

    // A scrape of the standby succeeds and says it does not serve.
    let metrics_b = b.standby_addr("standby_metrics");
    let scrape = api_a.text(&format!("http://{metrics_b}/metrics")).await;
    assert!(scrape.contains("kyberhook_serving 0"), "{scrape}");

    // The standby answers too, by forwarding to the serving node's advertised address.
    let via_b = b.standby_api();
    let (s, headers, v) = via_b
        .raw(
            Method::POST,
            "/v1/accounts",
            Some(ADMIN),
            Some(
                serde_json::to_vec(
                    &json!({"name": "failover", "plan": "enterprise", "id": "acc_failover"}),
                )
                .unwrap(),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(headers["x-kyberhook-forwarded-by"], "node-b");
    let scrape = api_a.text(&format!("http://{metrics_b}/metrics")).await;
    assert!(
        scrape.contains("kyberhook_standby_requests_total{outcome=\"forwarded\"} 1"),
        "{scrape}"
    );
    let (s, v) = api_a
        .admin(Method::GET, "/v1/accounts/acc_failover", None)
        .await;
    assert_eq!((s, v["name"].clone()), (StatusCode::OK, json!("failover")));

    let (s, v) = api_a.admin(Method::GET, "/v1/admin/cluster", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["backend"], "postgres");
    assert_eq!(v["partitions"], 256);
    let nodes: HashMap<&str, &Value> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap(), n))
        .collect();
    assert_eq!(nodes.len(), 2, "{v}");
    assert_eq!(
        (
            nodes["node-a"]["serving"].clone(),
            nodes["node-a"]["partitions"].clone()
        ),
        (json!(true), json!(256))
    );
    assert_eq!(
        (
            nodes["node-b"]["serving"].clone(),
            nodes["node-b"]["partitions"].clone()
        ),
        (json!(false), json!(0))
    );

    create_hook(&api_a, "acc_failover", &rx.url, "none").await;
    let acked = burst(&api_a, "acc_failover", 300, 16).await;
    assert_eq!(acked.len(), 300);
    let before = rx.count();
    assert!(before < 300, "all delivered before the kill ({before})");
    a.child.kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    a.child.wait().unwrap();
    // Sent to the standby before it has taken over: held until it has, then served by it
    // (the dead holder never saw it), not refused.
    let (s, v) = via_b
        .admin(
            Method::POST,
            "/v1/events",
            Some(json!({"account_id": "acc_failover", "event": "visitor.checked_in", "data": {}, "id": "evt_in_the_gap"})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");

    let api_b = b.serving(Duration::from_secs(20));
    let takeover = killed.elapsed();
    let served_before = rx.count();
    rx.set_default(Reply::Status(200));
    wait_all_delivered(&rx, &acked, Duration::from_secs(30)).await;
    wait_all_delivered(
        &rx,
        &["evt_in_the_gap".to_string()],
        Duration::from_secs(30),
    )
    .await;
    let resumed = rx.log.lock().unwrap()[served_before..]
        .first()
        .map(|r| r.at.duration_since(killed));
    assert!(takeover < Duration::from_secs(20), "{takeover:?}");

    // At least once, each event under one delivery id however often it arrived.
    let by_event = arrivals(&rx);
    let mut duplicates = 0;
    for id in &acked {
        let ids: HashSet<&String> = by_event[id].iter().collect();
        assert_eq!(ids.len(), 1, "{id} arrived as {ids:?}");
        duplicates += by_event[id].len() - 1;
    }
    let (s, v) = api_b.admin(Method::GET, "/v1/admin/cluster", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let b_view = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node-b")
        .cloned()
        .unwrap();
    assert_eq!(
        (b_view["serving"].clone(), b_view["partitions"].clone()),
        (json!(true), json!(256))
    );
    // Its ingest works (the ids node-a acknowledged answer as accepted already).
    let again = burst(&api_b, "acc_failover", 3, 1).await;
    assert_eq!(again.len(), 3);
    // Each node mints sequence numbers (the front of a delivery id) in its own writer slot,
    // the low byte: node-a's 0; node-b took 1, since node-a's heartbeat was still fresh.
    let (s, v) = api_b
        .admin(
            Method::POST,
            "/v1/events",
            Some(
                json!({"account_id": "acc_failover", "event": "visitor.checked_in",
                "data": {}, "id": "evt_after_takeover"}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let fresh = ["evt_after_takeover".to_string()];
    wait_all_delivered(&rx, &fresh, Duration::from_secs(20)).await;
    let slot_of = |id: &String| {
        let dlv = &arrivals(&rx)[id][0];
        u8::from_str_radix(&dlv[18..20], 16).unwrap()
    };
    assert!(acked.iter().all(|id| slot_of(id) == 0));
    assert_eq!(slot_of(&fresh[0]), 1);
    eprintln!(
        "failover after SIGKILL: takeover {takeover:?}, first delivery by the new node {resumed:?} after the kill, {} of {} delivered before it, lost 0, duplicates {duplicates}",
        before,
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_past_its_lease_is_fenced_and_commits_nothing_after_the_takeover() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let db = pg_database().await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = Node::start(&node_config(dir.path(), "node-a", &db, &pki, "2s", None));
    let api_a = a.serving(Duration::from_secs(30));
    let b = Node::start(&node_config(dir.path(), "node-b", &db, &pki, "2s", None));
    b.wait_logged("another kyberhook node is serving", Duration::from_secs(30));
    b.wait_logged("listening as a standby", Duration::from_secs(10));
    // A standby with nowhere to forward to (node-a advertises no address) says so.
    let (s, headers, v) = b
        .standby_api()
        .raw(Method::GET, "/v1/admin/cluster", Some(ADMIN), None)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("standby")),
        "{v}"
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("node-a"),
        "{v}"
    );
    assert_eq!(headers["retry-after"], "1");
    setup(&api_a, "acc_paused", &rx.url).await;
    let first = burst(&api_a, "acc_paused", 20, 4).await;
    assert_eq!(first.len(), 20);
    wait_all_delivered(&rx, &first, Duration::from_secs(20)).await;

    a.signal("-STOP");
    let paused = Instant::now();
    let api_b = b.serving(Duration::from_secs(20));
    let takeover = paused.elapsed();
    // The lease was renewed at most a fifth of it (0.4 s) before the pause.
    assert!(
        takeover >= Duration::from_millis(1600),
        "taken over before the lease ran out: {takeover:?}"
    );
    b.wait_logged("took over an expired lease", Duration::from_secs(1));
    let (s, v) = api_b
        .admin(
            Method::POST,
            "/v1/events",
            Some(json!({"account_id": "acc_paused", "event": "visitor.checked_in", "data": {}, "id": "evt_on_b"})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");

    a.signal("-CONT");
    // Whatever the resumed node still tries to write is refused by the fence: the answer is
    // a 503, or none if its heartbeat found the lease gone first and it is exiting.
    let answer = tokio::spawn(async move {
        api_a
            .admin(
                Method::POST,
                "/v1/events",
                Some(json!({"account_id": "acc_paused", "event": "visitor.checked_in", "data": {}, "id": "evt_after_resume"})),
            )
            .await
    })
    .await;
    let s = match answer {
        Ok((s, v)) => {
            assert_ne!(
                s,
                StatusCode::ACCEPTED,
                "the fenced node acknowledged an event: {v}"
            );
            s.to_string()
        }
        Err(_) => "nothing (it was exiting)".to_string(),
    };
    let code = a.exits_within(Duration::from_secs(15));
    assert_ne!(code, 0, "{}", a.log());
    assert!(a.log().contains("lease"), "{}", a.log());

    // Its supervisor starts it again: it waits as a standby, and the node that took over by
    // expiry keeps the lease (a node's liveness is its own advisory key, so the newcomer cannot
    // mistake the fenced node's ended session for the holder's).
    let epoch = || async {
        db.client()
            .await
            .query_one("SELECT epoch FROM kh_lease WHERE id = 1", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let held = epoch().await;
    let again = Node::start(&node_config(dir.path(), "node-a", &db, &pki, "2s", None));
    again.wait_logged("another kyberhook node is serving", Duration::from_secs(30));
    // Several looks of the standby (every 250 ms) and renewals of the holder (every 400 ms).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        epoch().await,
        held,
        "the restarted node took the lease: {}",
        again.log()
    );
    assert!(!again.log().contains("this node serves"), "{}", again.log());

    wait_all_delivered(&rx, &["evt_on_b".to_string()], Duration::from_secs(20)).await;
    let stored: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM kh_event_id WHERE event_id = 'evt_after_resume'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "the fenced node's event was committed");
    assert!(!arrivals(&rx).contains_key("evt_after_resume"));
    eprintln!(
        "failover after SIGSTOP with a 2 s lease: takeover {takeover:?}; the resumed node answered {s} and exited with {code}"
    );
}

/// Creates account `id` on `plan` through `api`.
pub(crate) async fn create_account(api: &Api, id: &str, plan: &str) {
    let (s, v) = api
        .admin(
            Method::POST,
            "/v1/accounts",
            Some(json!({"name": id, "plan": plan, "id": id})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

#[tokio::test]
async fn a_fifo_webhook_keeps_its_order_across_a_takeover() {
    let pki = pki();
    // Event 3's first attempt fails: 4 and later wait behind it (retried after 1 s).
    let rx = OrderReceiver::start(
        &pki,
        Duration::from_millis(5),
        Box::new(|n, attempt| if n == 3 && attempt <= 1 { 500 } else { 200 }),
    )
    .await;
    let db = pg_database().await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = Node::start(&node_config(dir.path(), "node-a", &db, &pki, "10s", None));
    let api_a = a.serving(Duration::from_secs(30));
    let b = Node::start(&node_config(dir.path(), "node-b", &db, &pki, "10s", None));
    b.wait_logged("another kyberhook node is serving", Duration::from_secs(30));
    let account = "acc_fifo_takeover";
    create_account(&api_a, account, "enterprise").await;
    create_hook(&api_a, account, &rx.url, "fifo").await;
    for n in 1..=12 {
        let (s, v) = api_a
            .admin(Method::POST, "/v1/events", Some(event(account, n)))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    }
    // Killed while event 3 waits for its retry and the rest wait behind it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rx.hits().iter().any(|h| h.n == 3 && h.status == 500) {
        assert!(
            Instant::now() < deadline,
            "event 3 never failed: {:?}",
            rx.hits()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.signal("-KILL");
    let _ = a.exits_within(Duration::from_secs(10));
    let api_b = b.serving(Duration::from_secs(20));
    for n in 13..=16 {
        let (s, v) = api_b
            .admin(Method::POST, "/v1/events", Some(event(account, n)))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    }
    // Each event's first delivery came after every earlier event's, across the takeover
    // (an attempt in flight at the kill may come again, under the same delivery id).
    rx.wait_first_arrivals_in_order(16, Duration::from_secs(30))
        .await;
}

#[tokio::test]
async fn a_plan_s_rate_holds_for_an_account_posting_through_both_nodes() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let db = pg_database().await;
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&node_config(
        dir.path(),
        "node-a",
        &db,
        &pki,
        "10s",
        Some(free_port()),
    ));
    let api_a = a.serving(Duration::from_secs(30));
    let b = Node::start(&node_config(dir.path(), "node-b", &db, &pki, "10s", None));
    b.wait_logged("listening as a standby", Duration::from_secs(30));
    let via_b = b.standby_api();
    let account = "acc_paced_two_nodes";
    create_account(&via_b, account, "starter").await;
    create_hook(&api_a, account, &rx.url, "none").await;

    // 40 events at once, half through each node, on the 10 events/s plan.
    let post_all = |tag: &'static str| {
        let (a, b) = (api_a.clone(), via_b.clone());
        async move {
            let mut tasks = Vec::new();
            for i in 0..40 {
                let api = if i % 2 == 0 { a.clone() } else { b.clone() };
                tasks.push(tokio::spawn(async move {
                    api.admin(
                        Method::POST,
                        "/v1/events",
                        Some(json!({"account_id": account, "event": "visitor.checked_in", "data": {tag: i}})),
                    )
                    .await
                    .0
                }));
            }
            for t in tasks {
                assert_eq!(t.await.unwrap(), StatusCode::ACCEPTED);
            }
        }
    };
    post_all("i").await;
    let got = rx.wait_for(40, Duration::from_secs(20)).await;
    let times: Vec<Instant> = got.iter().map(|g| g.at).collect();
    let span = *times.last().unwrap() - times[0];
    assert!(
        span >= Duration::from_millis(2500),
        "40 deliveries at 10/s took only {span:?}"
    );
    let peak = max_in_window(&times, Duration::from_secs(1));
    assert!(peak <= 20, "{peak} deliveries in one second at 10/s");

    // An upgrade made through the standby applies to the very next deliveries (200/s).
    let (s, v) = via_b
        .admin(
            Method::PATCH,
            &format!("/v1/accounts/{account}"),
            Some(json!({"plan": "enterprise"})),
        )
        .await;
    assert_eq!(
        (s, v["plan"].as_str()),
        (StatusCode::OK, Some("enterprise"))
    );
    let t = Instant::now();
    post_all("j").await;
    let got = rx.wait_for(80, Duration::from_secs(10)).await;
    let burst = got.last().unwrap().at - t;
    assert!(
        burst < Duration::from_secs(1),
        "40 deliveries after the upgrade took {burst:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_dead_holder_may_have_seen_goes_to_the_next_one_only_if_that_changes_nothing()
{
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let db = pg_database().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, api_a, b) = serving_and_standby(dir.path(), &db, &pki);
    create_account(&api_a, "acc_seen", "enterprise").await;
    create_hook(&api_a, "acc_seen", &rx.url, "none").await;

    // The holder hangs: both requests reach it through the standby and get no answer; then it
    // dies, so the standby's connection to it is cut after the request went out.
    a.signal("-STOP");
    let post = |body: Value| {
        let via_b = b.standby_api();
        tokio::spawn(async move { via_b.admin(Method::POST, "/v1/events", Some(body)).await })
    };
    let with_id = post(
        json!({"account_id": "acc_seen", "event": "visitor.checked_in",
        "data": {}, "id": "ka-seen-1"}),
    );
    let minted = post(
        json!({"account_id": "acc_seen", "event": "visitor.checked_in",
        "data": {}}),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.signal("-KILL");

    // The producer's own id makes a second send exact: held for the next holder and accepted.
    let (s, v) = with_id.await.unwrap();
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["id"], "ka-seen-1");
    // A minted id would make a second event: the client is told and decides.
    let (s, v) = minted.await.unwrap();
    assert_eq!(
        (s, v["error"]["code"].clone()),
        (StatusCode::SERVICE_UNAVAILABLE, json!("standby")),
        "{v}"
    );
    b.serving(Duration::from_secs(20));
    wait_all_delivered(&rx, &["ka-seen-1".to_string()], Duration::from_secs(30)).await;
    assert_eq!(arrivals(&rx)["ka-seen-1"].len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guesser_behind_a_standby_is_limited_by_its_own_address_not_the_standby_s() {
    let pki = pki();
    let db = pg_database().await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, api_a, b) = serving_and_standby(dir.path(), &db, &pki);
    let (s, v) = api_a
        .admin(
            Method::POST,
            "/v1/accounts",
            Some(json!({"name": "g", "plan": "starter", "id": "acc_guarded"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let key = v["api_key"].as_str().unwrap().to_string();
    let standby = b.standby_api();
    let addr = b.standby_addr("standby_api");

    // A guesser on another machine (127.0.0.2) exhausts its allowance through the standby.
    let guesser = Api::from_source(addr, "127.0.0.2".parse().unwrap());
    let mut limited = false;
    for i in 0..30 {
        let (s, _, _) = guesser
            .raw(
                Method::GET,
                "/v1/accounts/acc_guarded",
                Some(&format!("khk_wrong{i}")),
                None,
            )
            .await;
        assert!(
            s == StatusCode::UNAUTHORIZED || s == StatusCode::TOO_MANY_REQUESTS,
            "{s}"
        );
        limited |= s == StatusCode::TOO_MANY_REQUESTS;
    }
    assert!(limited, "the guesser was never limited");
    // Another client of the same standby, with a key never used from anywhere, is served: the
    // serving node counted the guesses for 127.0.0.2, not for the standby's address.
    let (s, _, v) = standby
        .raw(Method::GET, "/v1/accounts/acc_guarded", Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // And the guesser stays limited, right key or not: it is its own address that is.
    let (s, _, v) = guesser
        .raw(Method::GET, "/v1/accounts/acc_guarded", Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_cannot_bind_its_metrics_address_exits_2_with_one_line() {
    let pki = pki();
    let db = pg_database().await;
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&node_config(dir.path(), "node-a", &db, &pki, "10s", None));
    let _api_a = a.serving(Duration::from_secs(30));
    // Two nodes on one host with the same metrics.listen: the second one finds it taken only
    // once it stands by, from a blocking wait for the lease that must not keep it alive.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = node_config(dir.path(), "node-b", &db, &pki, "10s", None);
    let toml = std::fs::read_to_string(&config).unwrap().replace(
        "[metrics]\nlisten = \"127.0.0.1:0\"",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\""),
    );
    assert!(toml.contains(&format!("127.0.0.1:{port}")));
    std::fs::write(&config, toml).unwrap();
    let mut b = Node::start(&config);
    assert_eq!(b.exits_within(Duration::from_secs(15)), 2, "{}", b.log());
    let log = b.log();
    let line = log.lines().last().unwrap_or_default();
    assert!(
        line.starts_with("kyberhook: ") && line.contains("metrics.listen"),
        "{log}"
    );
}
