//! Online backup and restore, format versions, and compaction — black-box: the real server on
//! 127.0.0.1:0, the real `kyberhook` binary for the commands, real HTTPS receivers.

use crate::common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use kyberhook::config::Config;
use kyberhook::ids::{AccountId, EventId};
use kyberhook::model::EventRecord;
use serde_json::{json, Value};

/// When a producer's batch was acknowledged, its size, and its subscribed events' ids.
type Acked = (Instant, usize, Vec<String>);

/// Runs the binary; returns (exit code, stdout, stderr).
fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kyberhook"));
    cmd.args(args).env_remove("KYBERHOOK_ADMIN_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn cli_async(args: Vec<String>, env: Vec<(String, String)>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        cli(&args, &env)
    })
    .await
    .unwrap()
}

/// A config file for an engine on `data`, with `extra` tables appended.
fn write_config(dir: &Path, data: &Path, pki: &Pki, extra: &str) -> (PathBuf, Config) {
    let toml = config_toml(
        data,
        &pki.ca_file,
        "retry_schedule = [\"500ms\", \"1s\"]",
        extra,
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, &toml).unwrap();
    (path, Config::from_toml(&toml, "test").unwrap())
}

fn events(account: &str, event: &str, n: usize) -> Value {
    json!({"events": (0..n).map(|i| json!({
        "account_id": account, "event": event, "data": {"n": i}
    })).collect::<Vec<_>>()})
}

/// Posts a batch; returns the ids of the events of type `kept`, once acknowledged.
async fn post_batch(api: &Api, batch: &Value, kept: &str) -> Vec<String> {
    let (s, v) = api
        .admin(Method::POST, "/v1/events/batch", Some(batch.clone()))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .zip(batch["events"].as_array().unwrap())
        .filter(|(_, e)| e["event"] == kept)
        .map(|(r, _)| r["id"].as_str().expect("accepted").to_string())
        .collect()
}

/// Event ids of the deliveries a receiver got from index `from` on, after checking each
/// signature with `secret`.
fn delivered_events(rx: &Receiver, from: usize, secret: &str) -> HashSet<String> {
    rx.log.lock().unwrap()[from..]
        .iter()
        .map(|r| {
            let ts = r.header("x-kyberaccess-timestamp");
            assert_eq!(
                r.header("x-kyberaccess-signature"),
                expected_signature(secret, &ts, &r.body),
                "a delivery is not signed with the webhook's secret"
            );
            r.json()["id"].as_str().unwrap().to_string()
        })
        .collect()
}

async fn admin_get(api: &Api, path: &str) -> Value {
    let (s, mut v) = api.admin(Method::GET, path, None).await;
    assert_eq!(s, StatusCode::OK, "GET {path}: {v}");
    // A webhook's live delivery slots (its adaptive limit, what waits) are not stored state.
    let listed = v.get_mut("data").and_then(Value::as_array_mut);
    for hook in listed.into_iter().flatten() {
        if let Some(h) = hook.as_object_mut() {
            h.remove("concurrency_limit");
            h.remove("backlog");
        }
    }
    v
}

/// Backs up a running engine while producers keep ingesting, restores the backup into an
/// empty data dir with the real binary, and starts a second engine on it: every delivery that
/// was pending when the backup began is delivered by the second engine, correctly signed, and
/// every account, webhook and secret is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_ingest_load_restores_every_pending_delivery_account_webhook_and_secret() {
    if crate::common::embedded_only(
        "a_backup_under_ingest_load_restores_every_pending_delivery_account_webhook_and_secret",
    ) {
        return;
    }
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let dir_a = tempfile::tempdir().unwrap();
    // One delivery a second: nearly every delivery is still pending when the backup runs.
    let (_, config_a) = write_config(
        dir_a.path(),
        &dir_a.path().join("data"),
        &pki,
        "[plans.trickle]\nevents_per_second = 1\n",
    );
    let a = TestEngine::start_with(config_a, dir_a).await;
    let (busy, _) = a.account("acc_busy", "trickle").await;
    let (quiet, quiet_key) = a.account("acc_quiet", "starter").await;
    let hook = a.webhook(&busy, &rx.url, &["visitor.checked_in"]).await;
    let hook_id = hook["id"].as_str().unwrap().to_string();
    let quiet_hook = a.webhook(&quiet, &rx.url, &["emergency.*"]).await;

    // Bulk nobody subscribes to (it makes the store worth streaming), and subscribed events.
    let mut pending: Vec<String> = Vec::new();
    for _ in 0..40 {
        post_batch(&a.api, &events(&busy, "visitor.checked_out", 250), "").await;
        pending.extend(
            post_batch(
                &a.api,
                &events(&busy, "visitor.checked_in", 5),
                "visitor.checked_in",
            )
            .await,
        );
    }

    // Producers keep ingesting through the backup.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let producers: Vec<_> = (0..2)
        .map(|_| {
            let (api, stop, acked, busy) =
                (a.api.clone(), stop.clone(), acked.clone(), busy.clone());
            tokio::spawn(async move {
                let mut batch = events(&busy, "visitor.checked_out", 49);
                batch["events"].as_array_mut().unwrap().push(json!({
                    "account_id": busy, "event": "visitor.checked_in", "data": {"during": true}
                }));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let ids = post_batch(&api, &batch, "visitor.checked_in").await;
                    acked.lock().unwrap().push((Instant::now(), 50, ids));
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;

    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("kyberhook.backup");
    let began = Instant::now();
    let (code, out, err) = cli_async(
        vec![
            "backup".into(),
            "--url".into(),
            a.api.base.clone(),
            "--out".into(),
            file.display().to_string(),
        ],
        vec![("KYBERHOOK_ADMIN_TOKEN".into(), ADMIN.into())],
    )
    .await;
    let ended = Instant::now();
    assert_eq!(code, 0, "backup failed: {out}{err}");
    assert!(out.contains("backup written"), "{out}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in producers {
        p.await.unwrap();
    }
    {
        // How much the backup slowed ingest (printed for the record: a loaded debug build).
        let acked = acked.lock().unwrap();
        let rate = |from: Instant, to: Instant| {
            let n: usize = acked
                .iter()
                .filter(|(t, _, _)| *t >= from && *t < to)
                .map(|(_, n, _)| n)
                .sum();
            n as f64 / (to - from).as_secs_f64()
        };
        let window = ended - began;
        eprintln!(
            "ingest: {:.0} events/s in the {:?} before the backup, {:.0} events/s during it ({:?})",
            rate(began - window.max(Duration::from_millis(500)), began),
            window.max(Duration::from_millis(500)),
            rate(began, ended),
            window
        );
        assert!(
            acked.iter().any(|(t, _, _)| *t > began && *t < ended)
                || window < Duration::from_millis(200),
            "ingest stalled for the whole {window:?} backup"
        );
        // Acknowledged before the backup began: certainly in the snapshot.
        for (t, _, ids) in acked.iter() {
            if *t < began {
                pending.extend(ids.iter().cloned());
            }
        }
    }
    let secret = admin_get(
        &a.api,
        &format!("/v1/accounts/{busy}/webhooks/{hook_id}/secret"),
    )
    .await;
    let quiet_secret = admin_get(
        &a.api,
        &format!(
            "/v1/accounts/{quiet}/webhooks/{}/secret",
            quiet_hook["id"].as_str().unwrap()
        ),
    )
    .await;
    let accounts_a = [
        admin_get(&a.api, &format!("/v1/accounts/{busy}")).await,
        admin_get(&a.api, &format!("/v1/accounts/{quiet}")).await,
    ];
    let hooks_a = [
        admin_get(&a.api, &format!("/v1/accounts/{busy}/webhooks")).await,
        admin_get(&a.api, &format!("/v1/accounts/{quiet}/webhooks")).await,
    ];
    // The key that seals the secrets: generated into the first engine's data dir, and kept
    // apart from the backup.
    let key_file = a.config.storage.path.join("secrets.key");
    let key_text = std::fs::read_to_string(&key_file).unwrap();
    a.stop().await;
    let backup_bytes = std::fs::read(&file).unwrap();
    let contains = |needle: &[u8]| backup_bytes.windows(needle.len()).any(|w| w == needle);
    assert!(
        !contains(key_text.trim().as_bytes()),
        "the secrets key is in the backup"
    );
    assert!(
        !contains(&hex::decode(key_text.trim()).unwrap()),
        "the secrets key is in the backup"
    );
    // What the first engine delivered before it stopped; the rest was pending in the backup.
    let from_a = rx.count();
    let secret = secret["secret"].as_str().unwrap().to_string();
    assert!(
        !contains(secret.as_bytes()),
        "a signing secret is in the backup in plaintext"
    );
    let delivered_by_a = delivered_events(&rx, 0, &secret);
    let owed: HashSet<String> = pending
        .into_iter()
        .filter(|id| !delivered_by_a.contains(id))
        .collect();
    assert!(owed.len() > 150, "only {} deliveries pending", owed.len());

    // Restore with the real binary into an empty data dir; a second restore is refused.
    let dir_b = tempfile::tempdir().unwrap();
    let data_b = dir_b.path().join("data");
    let (config_path, config_b) = write_config(
        dir_b.path(),
        &data_b,
        &pki,
        "[plans.trickle]\nevents_per_second = 100000\n",
    );
    let args = |f: &Path| {
        vec![
            "restore".to_string(),
            "--from".into(),
            f.display().to_string(),
            "--config".into(),
            config_path.display().to_string(),
        ]
    };
    let (code, out, err) = cli_async(args(&file), vec![]).await;
    assert_eq!(code, 0, "restore failed: {out}{err}");
    assert!(out.contains("secrets.key"), "{out}");
    let (code, _, err) = cli_async(args(&file), vec![]).await;
    assert_eq!(
        code, 2,
        "a restore into a non-empty data dir must be refused: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("not empty"), "{err}");
    // Without the key the restored engine refuses to start (exit 2, one line); with the key
    // copied beside the store, as the restore command says, it starts.
    let (code, _, err) = cli_async(
        vec![
            "serve".into(),
            "--config".into(),
            config_path.display().to_string(),
        ],
        vec![],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    std::fs::write(data_b.join("secrets.key"), &key_text).unwrap();

    let b = TestEngine::start_with(config_b, tempfile::tempdir().unwrap()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = delivered_events(&rx, from_a, &secret);
        let missing: Vec<&String> = owed.iter().filter(|id| !got.contains(*id)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} pending deliveries never came from the restored engine, e.g. {:?}",
            missing.len(),
            owed.len(),
            &missing[..missing.len().min(3)]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Accounts, webhooks and secrets as they were; the account's key still works.
    assert_eq!(
        admin_get(&b.api, &format!("/v1/accounts/{busy}")).await,
        accounts_a[0]
    );
    assert_eq!(
        admin_get(&b.api, &format!("/v1/accounts/{quiet}")).await,
        accounts_a[1]
    );
    assert_eq!(
        admin_get(&b.api, &format!("/v1/accounts/{busy}/webhooks")).await,
        hooks_a[0]
    );
    assert_eq!(
        admin_get(&b.api, &format!("/v1/accounts/{quiet}/webhooks")).await,
        hooks_a[1]
    );
    assert_eq!(
        admin_get(
            &b.api,
            &format!("/v1/accounts/{busy}/webhooks/{hook_id}/secret")
        )
        .await["secret"],
        secret.as_str()
    );
    let (s, v) = b
        .api
        .call(
            Method::GET,
            &format!(
                "/v1/accounts/{quiet}/webhooks/{}/secret",
                quiet_hook["id"].as_str().unwrap()
            ),
            Some(&quiet_key),
            None,
        )
        .await;
    assert_eq!((s, &v), (StatusCode::OK, &quiet_secret));
    b.stop().await;
}

/// The route is the admin's: no token 401, an account key 403, other methods 405; a damaged
/// or truncated file is refused by restore (exit 2, one line) and leaves no data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_route_is_admin_only_and_restore_refuses_a_damaged_file() {
    if crate::common::embedded_only(
        "the_backup_route_is_admin_only_and_restore_refuses_a_damaged_file",
    ) {
        return;
    }
    let pki = pki();
    let a = TestEngine::start(&pki, "", "").await;
    let (_, key) = a.account("acc_one", "starter").await;
    let path = "/v1/admin/backup";
    let (s, v) = a.api.call(Method::POST, path, None, None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    let (s, v) = a.api.call(Method::POST, path, Some(&key), None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    let (s, v) = a.api.admin(Method::GET, path, None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
    let (s, v) = a.api.admin(Method::POST, path, Some(json!({}))).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    // Without a token the command refuses before connecting.
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("b");
    let (code, _, err) = cli(
        &[
            "backup",
            "--url",
            &a.api.base,
            "--out",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("KYBERHOOK_ADMIN_TOKEN"), "{err}");
    let (code, out, err) = cli(
        &[
            "backup",
            "--url",
            &a.api.base,
            "--out",
            file.to_str().unwrap(),
            "--token",
            ADMIN,
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    a.stop().await;

    let bytes = std::fs::read(&file).unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let data_b = dir_b.path().join("data");
    let (config_path, _) = write_config(dir_b.path(), &data_b, &pki, "");
    for (name, damaged) in [
        ("truncated", bytes[..bytes.len() - 10].to_vec()),
        ("flipped", {
            let mut b = bytes.clone();
            let i = b.len() / 2;
            b[i] ^= 0x40;
            b
        }),
    ] {
        let f = work.path().join(name);
        std::fs::write(&f, damaged).unwrap();
        let (code, _, err) = cli(
            &[
                "restore",
                "--from",
                f.to_str().unwrap(),
                "--config",
                config_path.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(code, 2, "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            !data_b.exists(),
            "{name}: a half-restored data dir was left"
        );
    }
    // Restored by root into the empty data dir a package made for its service user, the
    // store belongs to that user (the engine runs as it).
    std::fs::create_dir(&data_b).unwrap();
    std::os::unix::fs::chown(&data_b, Some(65534), Some(65534)).unwrap_or_else(|e| {
        eprintln!("not root ({e}): the ownership part is skipped");
    });
    let owner = |p: &Path| std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(p).unwrap());
    let want = owner(&data_b);
    let (code, out, err) = cli(
        &[
            "restore",
            "--from",
            file.to_str().unwrap(),
            "--config",
            config_path.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(owner(&data_b), want);
    assert_eq!(owner(&data_b.join("db")), want);
}

/// A data dir as the first sessions wrote it (no format version, an `api_keys` tree, one
/// record per event-log value) is migrated when the engine starts, and its owed event is
/// delivered byte for byte; a data dir from a newer kyberhook makes `serve` exit 2 with one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_data_dir_is_migrated_at_start_and_a_newer_one_is_refused() {
    if crate::common::embedded_only(
        "an_old_data_dir_is_migrated_at_start_and_a_newer_one_is_refused",
    ) {
        return;
    }
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (config_path, config) = write_config(dir.path(), &data, &pki, "");
    let a = TestEngine::start_with(config.clone(), tempfile::tempdir().unwrap()).await;
    let (account, _) = a.account("acc_old", "starter").await;
    let hook = a.webhook(&account, &rx.url, &["visitor.checked_in"]).await;
    let secret = hook["secret"].as_str().unwrap().to_string();
    a.stop().await;

    // Rewrite it into version 1's layout, with one event whose fan-out is still owed.
    let seq = (kyberhook::model::now_ms() << 20) | 7;
    let id = EventId::from_seq(seq);
    let body = format!(
        r#"{{"id":"{}","event":"visitor.checked_in","timestamp":"2025-01-15T09:30:00Z","data":{{"old":true}},"account_id":"acc_old"}}"#,
        id.as_str()
    );
    let record = EventRecord {
        seq,
        id,
        account_id: AccountId::parse("acc_old").unwrap(),
        event: "visitor.checked_in".into(),
        body: body.clone().into_bytes(),
    };
    {
        let db = sled::open(&data).unwrap();
        db.open_tree("meta")
            .unwrap()
            .remove("format_version")
            .unwrap();
        db.open_tree("api_keys")
            .unwrap()
            .insert([9u8; 32], "acc_old")
            .unwrap();
        let key = kyberhook::store::embedded::keys::seq(seq);
        db.open_tree("events")
            .unwrap()
            .insert(key, kyberhook::codec::encode(&record))
            .unwrap();
        db.open_tree("inbox").unwrap().insert(key, &[]).unwrap();
        db.flush().unwrap();
    }

    let b = TestEngine::start_with(config, tempfile::tempdir().unwrap()).await;
    let got = rx.next(Duration::from_secs(10)).await;
    assert_eq!(got.body, body.as_bytes(), "the old event's body changed");
    let ts = got.header("x-kyberaccess-timestamp");
    assert_eq!(
        got.header("x-kyberaccess-signature"),
        expected_signature(&secret, &ts, &got.body)
    );
    b.stop().await;
    {
        let db = sled::open(&data).unwrap();
        let version = db.open_tree("meta").unwrap().get("format_version").unwrap();
        assert_eq!(
            version.as_deref(),
            Some(&kyberhook::store::embedded::format::CURRENT.to_be_bytes()[..])
        );
        assert!(!db.tree_names().iter().any(|n| n == b"api_keys"));
        let (_, value) = db.open_tree("events").unwrap().first().unwrap().unwrap();
        assert_eq!(
            value[0],
            kyberhook::codec::CHUNK_V1,
            "the log value was not rewritten"
        );
        // Now pretend a newer kyberhook wrote it.
        db.open_tree("meta")
            .unwrap()
            .insert("format_version", &99u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let (code, _, err) = cli(&["serve", "--config", config_path.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("format version 99"), "{err}");
}

/// `kyberhook compact` refuses while an engine holds the data dir, then rewrites it: the
/// space of deleted data is returned, and the engine restarts on the compacted store and
/// delivers every delivery that was pending, signed with the same secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_shrinks_a_stopped_store_that_then_delivers_everything_pending() {
    if crate::common::embedded_only(
        "compaction_shrinks_a_stopped_store_that_then_delivers_everything_pending",
    ) {
        return;
    }
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (config_path, config) = write_config(
        dir.path(),
        &data,
        &pki,
        "[plans.trickle]\nevents_per_second = 1\n",
    );
    let a = TestEngine::start_with(config, tempfile::tempdir().unwrap()).await;
    let (busy, _) = a.account("acc_busy", "trickle").await;
    let hook = a.webhook(&busy, &rx.url, &["visitor.checked_in"]).await;
    let secret = hook["secret"].as_str().unwrap().to_string();
    let mut pending = Vec::new();
    for _ in 0..20 {
        pending.extend(
            post_batch(
                &a.api,
                &events(&busy, "visitor.checked_in", 10),
                "visitor.checked_in",
            )
            .await,
        );
    }
    // An account whose data is deleted: its space is garbage until compaction.
    let (gone, _) = a.account("acc_gone", "starter").await;
    for _ in 0..60 {
        post_batch(&a.api, &events(&gone, "visitor.checked_out", 250), "").await;
    }
    let (s, _) = a
        .api
        .admin(Method::DELETE, &format!("/v1/accounts/{gone}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    let config_arg = config_path.to_str().unwrap().to_string();
    let (code, _, err) = cli_async(
        vec!["compact".into(), "--config".into(), config_arg.clone()],
        vec![],
    )
    .await;
    assert_eq!(
        code, 2,
        "compaction of a running engine's store must be refused: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("running engine"), "{err}");
    let before = admin_get(&a.api, &format!("/v1/accounts/{busy}/webhooks")).await;
    a.stop().await;
    let from_a = rx.count();
    let delivered_by_a = delivered_events(&rx, 0, &secret);
    // A service user's data dir, compacted by root, stays the service user's.
    let owned = std::os::unix::fs::chown(&data, Some(65534), Some(65534)).is_ok();
    if owned {
        kyberhook::store::embedded::compact::own_like(&data, &data).unwrap();
    } else {
        eprintln!("not root: the ownership part is skipped");
    }

    let (code, out, err) = cli_async(
        vec!["compact".into(), "--config".into(), config_arg],
        vec![],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let sizes: Vec<f64> = out
        .split_whitespace()
        .filter_map(|w| w.parse::<f64>().ok())
        .collect();
    assert!(
        sizes.len() >= 2 && sizes[1] < sizes[0],
        "no space came back: {out}"
    );
    eprintln!("{}", out.trim());
    assert!(!dir.path().join("data.compact-tmp").exists());
    assert!(!dir.path().join("data.compact-old").exists());
    if owned {
        let owner = |p: &Path| std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(p).unwrap());
        assert_eq!(owner(&data), 65534);
        assert_eq!(owner(&data.join("db")), 65534);
        assert_eq!(owner(&data.join("secrets.key")), 65534);
    }

    let toml = config_toml(
        &data,
        &pki.ca_file,
        "retry_schedule = [\"500ms\", \"1s\"]",
        "[plans.trickle]\nevents_per_second = 100000\n",
    );
    let b = TestEngine::start_with(
        Config::from_toml(&toml, "test").unwrap(),
        tempfile::tempdir().unwrap(),
    )
    .await;
    assert_eq!(
        admin_get(&b.api, &format!("/v1/accounts/{busy}/webhooks")).await,
        before
    );
    let (s, _) = b
        .api
        .admin(Method::GET, &format!("/v1/accounts/{gone}"), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let owed: Vec<String> = pending
        .into_iter()
        .filter(|id| !delivered_by_a.contains(id))
        .collect();
    assert!(owed.len() > 150, "only {} pending", owed.len());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = delivered_events(&rx, from_a, &secret);
        let missing = owed.iter().filter(|id| !got.contains(*id)).count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} pending deliveries lost by compaction"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.stop().await;
}

/// Not a check but the README's figures: fills a data dir as the load bench's ingest and
/// fan-out phases do (batches of 100 events, half of them delivered to a real receiver), then
/// measures ingest with and without a backup running, and the data dir's size before and after
/// compaction. `KH_FILL_EVENTS` (default 200 000) sets the size.
/// `cargo test --test it maintenance::figures -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn figures_backup_slowdown_and_compaction() {
    let total: usize = std::env::var("KH_FILL_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let pki = pki();
    let rx = Receiver::start(pki.server.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (config_path, config) = write_config(
        dir.path(),
        &data,
        &pki,
        "[plans.bulk]\nevents_per_second = 0\n",
    );
    let a = TestEngine::start_with(config.clone(), tempfile::tempdir().unwrap()).await;
    let (acc, _) = a.account("acc_fill", "bulk").await;
    a.webhook(&acc, &rx.url, &["visitor.checked_in"]).await;
    let mut batch = events(&acc, "visitor.checked_out", 50);
    for e in events(&acc, "visitor.checked_in", 50)["events"]
        .as_array()
        .unwrap()
    {
        batch["events"].as_array_mut().unwrap().push(e.clone());
    }
    let started = Instant::now();
    let producers: Vec<_> = (0..4)
        .map(|_| {
            let (api, batch) = (a.api.clone(), batch.clone());
            tokio::spawn(async move {
                for _ in 0..total / 400 {
                    post_batch(&api, &batch, "").await;
                }
            })
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    rx.wait_for(total / 2, Duration::from_secs(1800)).await;
    eprintln!(
        "filled: {total} events, {} deliveries in {:?}",
        total / 2,
        started.elapsed()
    );

    // Ingest for a while without, then with, a backup running.
    let work = tempfile::tempdir().unwrap();
    for with_backup in [false, true, false, true] {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let bulk = events(&acc, "visitor.checked_out", 100);
        let producers: Vec<_> = (0..4)
            .map(|_| {
                let (api, stop, count, bulk) =
                    (a.api.clone(), stop.clone(), count.clone(), bulk.clone());
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        post_batch(&api, &bulk, "").await;
                        count.fetch_add(100, std::sync::atomic::Ordering::Relaxed);
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let c0 = count.load(std::sync::atomic::Ordering::Relaxed);
        let t0 = Instant::now();
        let what = if with_backup {
            let file = work.path().join("b");
            let (code, out, err) = cli_async(
                vec![
                    "backup".into(),
                    "--url".into(),
                    a.api.base.clone(),
                    "--out".into(),
                    file.display().to_string(),
                    "--token".into(),
                    ADMIN.into(),
                ],
                vec![],
            )
            .await;
            assert_eq!(code, 0, "{err}");
            out.trim().to_string()
        } else {
            tokio::time::sleep(Duration::from_secs(3)).await;
            "no backup".to_string()
        };
        let elapsed = t0.elapsed();
        let n = count.load(std::sync::atomic::Ordering::Relaxed) - c0;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for p in producers {
            p.await.unwrap();
        }
        eprintln!(
            "ingest {:.0} events/s over {elapsed:?} ({what})",
            n as f64 / elapsed.as_secs_f64()
        );
    }
    a.stop().await;
    let (code, out, err) = cli(&["compact", "--config", config_path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    eprintln!("just filled: {}", out.trim());

    // As it looks once retention has purged the delivered history: restart with a short
    // retention, wait for the purge, stop, compact again.
    let mut short = config;
    short.storage.retention = Duration::from_secs(1);
    let b = TestEngine::start_with(short, tempfile::tempdir().unwrap()).await;
    b.poll(
        &format!("/v1/accounts/{acc}/deliveries"),
        Duration::from_secs(900),
        |v| count(v) == 0,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    b.stop().await;
    let (code, out, err) = cli(&["compact", "--config", config_path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    eprintln!("after retention purged it: {}", out.trim());
}
