//! Storage that stays bounded and honest, tested on the real binary: signing secrets sealed at
//! rest in a private data dir, retention that keeps up, and a full disk that loses nothing
//! acknowledged.

use crate::common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::json;

/// A running `kyberhook serve` and every line it wrote to stderr.
struct Proc {
    child: Child,
    api: Api,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proc {
    /// A failing test must not leave an engine running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command(config: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kyberhook"));
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .env_remove("KYBERHOOK_SECRETS_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Starts the binary and waits for the line naming its API address.
fn spawn(config: &Path, env: &[(&str, &str)]) -> Proc {
    let mut child = command(config, env).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(api) = v["fields"]["api"].as_str() {
                    let _ = tx.send(api.parse::<SocketAddr>().unwrap());
                }
            }
            lines.lock().unwrap().push(line);
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("the engine did not start: {:?}", log.lock().unwrap()));
    Proc {
        child,
        api: Api::new(addr),
        log,
    }
}

/// Runs the binary expecting it to refuse to start; returns its exit status and stderr lines.
fn refused(config: &Path, env: &[(&str, &str)]) -> (ExitStatus, Vec<String>) {
    let out = command(config, env).output().unwrap();
    let lines = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    (out.status, lines)
}

/// Runs the binary until it exits or `within` passes (then kills it): its exit status (`None`:
/// it was still running) and its stderr lines.
fn run_until_exit(config: &Path, within: Duration) -> (Option<ExitStatus>, Vec<String>) {
    let mut child = command(config, &[]).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<String>>()
    });
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap())
}

fn write_config(dir: &Path, data: &Path, pki: &Pki, storage: &str) -> PathBuf {
    let toml = config_toml(
        data,
        &pki.ca_file,
        "retry_schedule = [\"200ms\", \"500ms\", \"1s\"]",
        "[log]\nformat = \"json\"\nlevel = \"warn,kyberhook=info\"",
    )
    .replace("[storage]\n", &format!("[storage]\n{storage}\n"));
    let path = dir.join("config.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// Creates an enterprise account and a webhook for every event; returns the secret.
async fn setup(api: &Api, account: &str, url: &str) -> String {
    let (s, v) = api
        .admin(
            Method::POST,
            "/v1/accounts",
            Some(json!({"name": account, "plan": "enterprise", "id": account})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = api
        .admin(
            Method::POST,
            &format!("/v1/accounts/{account}/webhooks"),
            Some(json!({"name": "h", "url": url, "events": ["*"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v["secret"].as_str().unwrap().to_string()
}

async fn post_event(api: &Api, account: &str, data: serde_json::Value) -> (StatusCode, String) {
    let (s, v) = api
        .admin(
            Method::POST,
            "/v1/events",
            Some(json!({"account_id": account, "event": "visitor.checked_in", "data": data})),
        )
        .await;
    (s, v["id"].as_str().unwrap_or_default().to_string())
}

/// Waits until a request for event `id` arrived and checks its signature under `secret`.
async fn arrives_signed(rx: &Receiver, id: &str, secret: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = rx
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.json()["id"] == id)
            .cloned();
        if let Some(r) = got {
            let ts = r.header("x-kyberaccess-timestamp");
            assert_eq!(
                r.header("x-kyberaccess-signature"),
                expected_signature(secret, &ts, &r.body),
                "the delivery of {id} does not verify with the webhook's secret"
            );
            return;
        }
        assert!(Instant::now() < deadline, "{id} never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every file under `dir` with its bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path, bytes));
            }
        }
    }
    out
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn signing_secrets_are_sealed_at_rest_and_need_their_key() {
    if crate::common::embedded_only("signing_secrets_are_sealed_at_rest_and_need_their_key") {
        return;
    }
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = write_config(dir.path(), &data, &pki, "");

    let p = spawn(&config, &[]);
    let secret = setup(&p.api, "acc_sealed", &rx.url).await;
    let (s, first) = post_event(&p.api, "acc_sealed", json!({"n": 1})).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    arrives_signed(&rx, &first, &secret).await;
    assert!(
        !p.log.lock().unwrap().iter().any(|l| l.contains(&secret)),
        "the engine logged a signing secret"
    );
    drop(p); // SIGKILL: what is on disk is what was made durable.

    // No file of the data dir holds the secret (nor its random part); all are private.
    let needle = secret.trim_start_matches("whsec_");
    assert!(needle.len() >= 32);
    let files = files_under(&data);
    assert!(files.len() >= 3, "{files:?}");
    for (path, bytes) in &files {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{} holds the signing secret in plaintext",
            path.display()
        );
        assert_eq!(mode(path), 0o600, "{}", path.display());
    }
    assert_eq!(mode(&data), 0o700);
    assert!(data.join("secrets.key").exists());

    // Same data dir, same (generated) key: deliveries still verify.
    let p = spawn(&config, &[]);
    let (s, second) = post_event(&p.api, "acc_sealed", json!({"n": 2})).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    arrives_signed(&rx, &second, &secret).await;
    drop(p);

    // Another key: refused with exit code 2 and one line naming where the key came from.
    let other = "ab".repeat(32);
    let (status, lines) = refused(&config, &[("KYBERHOOK_SECRETS_KEY", &other)]);
    assert_eq!(status.code(), Some(2), "{lines:?}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("KYBERHOOK_SECRETS_KEY"), "{lines:?}");
    // A malformed key: the same.
    let (status, lines) = refused(&config, &[("KYBERHOOK_SECRETS_KEY", "not-a-key")]);
    assert_eq!(status.code(), Some(2), "{lines:?}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("KYBERHOOK_SECRETS_KEY"), "{lines:?}");

    // The data dir's key, given through storage.secrets_key_file instead: accepted.
    let key_file = dir.path().join("moved.key");
    std::fs::rename(data.join("secrets.key"), &key_file).unwrap();
    let (status, lines) = refused(&config, &[]);
    assert_eq!(status.code(), Some(2), "started without its key: {lines:?}");
    assert!(lines[0].contains("secrets_key_file"), "{lines:?}");
    let config = write_config(
        dir.path(),
        &data,
        &pki,
        &format!("secrets_key_file = \"{}\"", key_file.display()),
    );
    let p = spawn(&config, &[]);
    let (s, third) = post_event(&p.api, "acc_sealed", json!({"n": 3})).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    arrives_signed(&rx, &third, &secret).await;
    assert!(
        !data.join("secrets.key").exists(),
        "a key was generated anyway"
    );
    drop(p);
}

#[tokio::test]
async fn history_past_a_short_retention_is_purged_by_the_engine() {
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let data = tempfile::tempdir().unwrap();
    let toml = config_toml(data.path(), &pki.ca_file, "", "")
        .replace("[storage]\n", "[storage]\nretention = \"3s\"\n");
    let config = kyberhook::config::Config::from_toml(&toml, "test").unwrap();
    let te = TestEngine::start_with(config, data).await;
    te.account("acc_ret", "enterprise").await;
    let hook = te.webhook("acc_ret", &rx.url, &["*"]).await;
    // One batch, so that all 20 are created (and delivered) together: posted one by one on a
    // loaded machine, the first were past the retention before the last arrived.
    let events: Vec<serde_json::Value> = (0..20)
        .map(|i| json!({"account_id": "acc_ret", "event": "visitor.checked_in", "data": {"i": i}}))
        .collect();
    let (s, v) = te
        .api
        .admin(
            Method::POST,
            "/v1/events/batch",
            Some(json!({ "events": events })),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    rx.wait_for(20, Duration::from_secs(10)).await;
    let path = format!(
        "/v1/accounts/acc_ret/webhooks/{}/deliveries?limit=100",
        hook["id"].as_str().unwrap()
    );
    te.poll(&path, Duration::from_secs(10), |v| count(v) == 20)
        .await;
    // Retention 3 s: a pass every second purges them about 3 s after they were delivered.
    te.poll(&path, Duration::from_secs(15), |v| count(v) == 0)
        .await;
    te.stop().await;
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The race retention had with a manual retry: a pass plans to purge a finished delivery past
/// retention, a retry of it is answered 202 before the purge is applied. The pass is run by the
/// test (the engine's own, at the default 30 days, purges nothing here) and held between its
/// plan and the writer's application while the retry is made, so the interleaving is certain.
/// The writer re-checks each planned record and keeps the reopened one: it is attempted and
/// delivered, and stays in the log.
#[tokio::test]
async fn a_retry_answered_while_retention_plans_its_purge_is_attempted_and_kept() {
    const WAIT: Duration = Duration::from_secs(10);
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    rx.script([Reply::Status(500)]);
    // No retries: the first failure ends the delivery.
    let te = TestEngine::start(&pki, "retry_schedule = []", "").await;
    let (acc, _) = te.account("acc_race", "enterprise").await;
    te.webhook(&acc, &rx.url, &["*"]).await;
    te.event(&acc, "visitor.checked_in", json!({"n": 1})).await;
    let dlv = rx.next(WAIT).await.header("x-kyberaccess-delivery");
    te.wait_delivery(&acc, &dlv, WAIT, |d| d["status"] == "failed")
        .await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    // Everything so far is past the retention this pass applies.
    let cutoff = unix_ms();
    let purger = te.engine.as_ref().unwrap().purger().unwrap();

    let (planned, was_planned) = tokio::sync::oneshot::channel::<()>();
    let (resume, resumed) = std::sync::mpsc::channel::<()>();
    let pass = {
        let purger = purger.clone();
        tokio::task::spawn_blocking(move || {
            let mut planned = Some(planned);
            purger.pass_with(cutoff, &|| true, &mut || {
                if let Some(planned) = planned.take() {
                    planned.send(()).unwrap();
                    resumed.recv().unwrap();
                }
            })
        })
    };
    was_planned.await.unwrap();
    let (s, v) = te
        .api
        .admin(
            Method::POST,
            &format!("/v1/accounts/{acc}/deliveries/{dlv}/retry"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    resume.send(()).unwrap();
    let purged = pass.await.unwrap().unwrap();
    assert_eq!(
        purged.deliveries, 0,
        "the pass deleted a delivery whose retry was acknowledged"
    );
    assert_eq!(purged.events, 0, "its event went");

    // The acknowledged retry is attempted and delivered, and the delivery stays.
    let again = rx.next(WAIT).await;
    assert_eq!(again.header("x-kyberaccess-delivery"), dlv);
    let d = te
        .wait_delivery(&acc, &dlv, WAIT, |d| d["status"] == "delivered")
        .await;
    assert_eq!(d["attempt_count"], 2, "{d}");
    assert_eq!(d["attempts"].as_array().map(Vec::len), Some(2), "{d}");
    // Changed since the cutoff: a later pass at the same cutoff keeps its fresh history; one
    // past its retry purges it like any other.
    let later = purger.clone();
    let purged = tokio::task::spawn_blocking(move || later.pass(cutoff, &|| true))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(purged.deliveries, 0);
    te.wait_delivery(&acc, &dlv, WAIT, |d| d["status"] == "delivered")
        .await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let now = unix_ms();
    let purged = tokio::task::spawn_blocking(move || purger.pass(now, &|| true))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (purged.deliveries, purged.attempts, purged.events),
        (1, 2, 1)
    );
    let (s, _) = te
        .api
        .admin(
            Method::GET,
            &format!("/v1/accounts/{acc}/deliveries/{dlv}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    te.stop().await;
}

/// A tmpfs mounted for one test, unmounted (lazily) when dropped.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (with the reason) where mounting is impossible, e.g. without root.
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs { path, _dir: dir })
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// One HTTP/1.1 request on its own connection: the status and body, or `None` when the
/// engine is not there (connection refused or closed: it exited).
async fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {ADMIN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(40), stream.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}

#[tokio::test]
async fn a_full_disk_acknowledges_nothing_it_did_not_store_and_loses_nothing_acknowledged() {
    if crate::common::embedded_only(
        "a_full_disk_acknowledges_nothing_it_did_not_store_and_loses_nothing_acknowledged",
    ) {
        return;
    }
    let fs = match Tmpfs::mount("6m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED a_full_disk_…: cannot mount a tmpfs here: {why}");
            return;
        }
    };
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &fs.path.join("data"), &pki, "");
    let mut p = spawn(&config, &[]);
    setup(&p.api, "acc_full", &rx.url).await;
    let addr: SocketAddr = p.api.base.trim_start_matches("http://").parse().unwrap();

    // Fill the disk while ingesting 16 KiB events from 8 clients, until ingest is refused.
    let pad = "x".repeat(16 * 1024);
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let refusals: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut tasks = Vec::new();
    for c in 0..8 {
        let (acked, refusals, stop, pad) =
            (acked.clone(), refusals.clone(), stop.clone(), pad.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..2_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() > deadline {
                    return;
                }
                let body = json!({"account_id": "acc_full", "event": "visitor.checked_in",
                    "data": {"c": c, "i": i, "pad": pad}})
                .to_string();
                match try_request(addr, "POST", "/v1/events", &body).await {
                    Some((202, b)) => {
                        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
                        acked
                            .lock()
                            .unwrap()
                            .push(v["id"].as_str().unwrap().to_string());
                    }
                    other => {
                        refusals.lock().unwrap().push(format!("{other:?}"));
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let refusals = refusals.lock().unwrap().clone();
    assert!(
        !refusals.is_empty(),
        "the disk never filled ({} acknowledged)",
        acked.len()
    );
    assert!(
        acked.len() >= 10,
        "too few events fitted to prove anything: {refusals:?}"
    );
    // A refusal is a retryable 503 or the engine already gone — never a 202, never a 500.
    for r in &refusals {
        assert!(r == "None" || r.starts_with("Some((503, "), "refusal {r}");
        assert!(!r.contains("internal_error"), "{r}");
    }
    // Not ready while the store cannot write; then it exits, with one line saying why.
    if let Some((status, body)) = try_request(addr, "GET", "/readyz", "").await {
        assert_eq!(
            status,
            503,
            "readyz answered {status} {body} with a failed store; refusals {refusals:?}; log {:#?}",
            p.log.lock().unwrap()
        );
    }
    // (At once; a flush that hangs instead of failing is caught after FLUSH_STUCK_MS.)
    let exit_by = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < exit_by,
            "the engine kept running with a failed store"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(75), "{:?}", p.log.lock().unwrap());
    let lines = p.log.lock().unwrap().clone();
    let why: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("exiting so that a supervisor"))
        .collect();
    assert_eq!(why.len(), 1, "{lines:#?}");
    drop(p);

    // Space is back: restarted, it delivers every event it acknowledged.
    fs.resize("256m");
    let p = spawn(&config, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: HashSet<String> = rx
            .log
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.json()["id"].as_str().unwrap().to_string())
            .collect();
        let missing: Vec<&String> = acked.iter().filter(|id| !got.contains(*id)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} acknowledged events never arrived, e.g. {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(3)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, _) = post_event(&p.api, "acc_full", json!({"after": true})).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    eprintln!(
        "full disk: {} acknowledged before the disk filled, all delivered after the restart; {} refusals, first {}",
        acked.len(),
        refusals.len(),
        refusals[0]
    );

    // A restart while the disk is full. Stopped cleanly first, so that the restart itself frees
    // nothing (a crash leaves blobs past the stable log, which sled's open removes); then
    // every byte left is taken.
    stop_gracefully(p);
    let filler = fill(&fs);
    let started = Instant::now();
    let (status, lines) = run_until_exit(&config, Duration::from_secs(30));
    let took = started.elapsed();
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(75)),
        "restarted on a full disk, it did not exit 75 (None: still running after 30 s): {lines:#?}"
    );
    assert!(
        took < Duration::from_secs(10),
        "it took {took:?} to give up"
    );
    let errors: Vec<&String> = lines.iter().filter(|l| l.contains("\"ERROR\"")).collect();
    assert_eq!(errors.len(), 1, "{lines:#?}");
    assert!(
        errors[0].contains("exiting so that a supervisor"),
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("kyberhook is serving")),
        "it served on a disk it cannot write to: {lines:#?}"
    );
    eprintln!(
        "restarted on the full disk: exit 75 after {took:?}: {}",
        errors[0]
    );

    // Space is back again: the failed start damaged nothing (sled leaves an unfinished
    // snapshot behind, which it would take for a corrupt store), and it serves and delivers.
    std::fs::remove_file(filler).unwrap();
    fs.resize("256m");
    let p = spawn(&config, &[]);
    let (s, id) = post_event(&p.api, "acc_full", json!({"after_full_restart": true})).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rx
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.json()["id"] == id.as_str())
    {
        assert!(Instant::now() < deadline, "{id} never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(p);
}

/// SIGTERM, then waits for the graceful shutdown to end (exit 0).
fn stop_gracefully(mut p: Proc) {
    let out = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0), "{:#?}", p.log.lock().unwrap());
            return;
        }
        assert!(Instant::now() < deadline, "no graceful shutdown in 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Takes every byte left on the tmpfs: shrinks it to what is used plus 1 MiB, then fills
/// that with one file, page by page until the file system refuses. Returns the file's path.
fn fill(fs: &Tmpfs) -> PathBuf {
    use std::io::Write;
    let st = rustix::fs::statvfs(&fs.path).unwrap();
    let used_kib = (st.f_blocks - st.f_bfree) * st.f_frsize / 1024;
    fs.resize(&format!("{}k", used_kib + 1024));
    let path = fs.path.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let page = [0u8; 4096];
    loop {
        match file.write(&page) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    path
}
