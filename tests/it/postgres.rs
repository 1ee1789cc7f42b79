//! The PostgreSQL backend's foundation, against a real server (the process's shared throw-away
//! cluster, a fresh database per test): the first start creates the schema, concurrent starts
//! create one, a newer schema is refused in one line, `check-config` says whether the database
//! can be reached (TLS verified), and the new config keys are checked before anything connects.
//! The real binary is run for every exit code and line the operator sees.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::pg::*;
use common::*;
use kyberhook::config::Config;
use kyberhook::store::postgres::{self, schema, Migrated, PgError, Target};

/// What a run of the binary left: exit code, stdout, stderr.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// The stderr lines (there must be exactly one when `one` is asked for).
    fn lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    #[track_caller]
    fn one_line(&self) -> &str {
        let lines = self.lines();
        assert_eq!(lines.len(), 1, "one line on stderr, got: {:#?}", lines);
        lines[0]
    }

    /// The last stderr line: the `kyberhook: …` line `main` ends with.
    fn last_line(&self) -> &str {
        self.lines().last().copied().unwrap_or("")
    }
}

/// Runs `kyberhook ARGS` with `env` (and none of the variables that would change the
/// outcome), killed after 60 s.
fn kyberhook(args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kyberhook"));
    cmd.args(args)
        .env_remove("KYBERHOOK_ADMIN_TOKEN")
        .env_remove("KYBERHOOK_POSTGRES_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("kyberhook {args:?} still running after 60 s");
        }
    };
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `kyberhook serve` with `config` until a line of its log contains one of `needles` (or it
/// exits, or 60 s pass), then SIGKILL: what it logged by then, and its exit code (-1: killed).
fn serve_until(config: &str, needles: &[&str]) -> Ran {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kyberhook"))
        .args(["serve", "--config", config])
        .env_remove("KYBERHOOK_ADMIN_TOKEN")
        .env_remove("KYBERHOOK_POSTGRES_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(|l| l.ok())
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut text = String::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        text.push_str(&line);
        text.push('\n');
        if needles.iter().any(|n| line.contains(n)) {
            break;
        }
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        text.push_str(&line);
        text.push('\n');
    }
    Ran {
        code: status.code().unwrap_or(-1),
        stdout: String::new(),
        stderr: text,
    }
}

/// A config file in `dir` with a JSON log, listeners on port 0, a valid admin token and
/// `storage` lines of the test's choosing (after `path`).
fn write_config(dir: &Path, storage: &str, extra: &str) -> String {
    let path = dir.join("kh.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [auth]\nadmin_token = \"{ADMIN}\"\n[log]\nformat = \"json\"\n\
             [storage]\npath = \"{}\"\n{storage}\n{extra}",
            dir.join("data").display()
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// `storage` lines for `db` over verified TLS (the URL plus the CA), with `query` appended to
/// the URL (e.g. `?sslmode=require`).
fn pg_storage(db: &PgDb, query: &str) -> String {
    format!(
        "backend = \"postgres\"\npostgres_url = \"{}{query}\"\npostgres_ca_file = \"{}\"\n",
        db.url,
        db.ca_file.display()
    )
}

/// The config `write_config` wrote, as the engine reads it.
fn load(path: &str) -> Config {
    Config::load(Path::new(path)).unwrap()
}

async fn schema_rows(db: &PgDb) -> Vec<(i32, i16, String)> {
    db.client()
        .await
        .query(
            "SELECT version, partitions, updated_by FROM kh_schema ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The config's schema migrated in process, on a connection of its own.
async fn migrate(config: &Config, by: &str) -> Result<Migrated, PgError> {
    let target = Target::from_config(config)?;
    let mut client = target.connect().await?;
    schema::migrate(&mut client, by, &target.shown)
        .await
        .map(|(m, _)| m)
}

#[tokio::test]
async fn the_first_start_creates_the_schema_and_later_starts_leave_it_and_its_data_alone() {
    let db = pg_database().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &pg_storage(&db, ""),
        "[cluster]\ndivide_work = false\nnode_name = \"node-a\"\n",
    );

    let check = kyberhook(&["check-config", "--config", &config], &[]);
    assert_eq!(check.code, 0, "{}", check.stderr);
    assert!(check.stdout.contains("is reachable"), "{}", check.stdout);
    assert!(
        check.stdout.contains("no kyberhook schema yet"),
        "{}",
        check.stdout
    );
    assert_eq!(
        check.stdout.trim_end().lines().count(),
        1,
        "{}",
        check.stdout
    );
    // check-config changes nothing.
    let nothing: Option<String> = db
        .client()
        .await
        .query_one("SELECT to_regclass('kh_schema')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(nothing, None);

    let first = serve_until(&config, &["kyberhook is serving"]);
    assert!(
        first.stderr.contains("kyberhook is serving"),
        "{}",
        first.stderr
    );
    assert!(
        first.stderr.contains("kyberhook schema created"),
        "{}",
        first.stderr
    );
    assert_eq!(
        schema_rows(&db).await,
        [(schema::CURRENT, schema::PARTITIONS, "node-a".to_string())]
    );

    let client = db.client().await;
    let partitions = client
        .query(
            "SELECT partition_id, owner, epoch FROM kh_partition ORDER BY partition_id",
            &[],
        )
        .await
        .unwrap();
    // The node that served took the lease, and with it every partition.
    assert_eq!(partitions.len(), 256);
    let owner: Option<i64> = partitions[0].get(1);
    assert!(owner.is_some());
    for (i, row) in partitions.iter().enumerate() {
        assert_eq!(row.get::<_, i16>(0) as usize, i);
        assert_eq!(row.get::<_, Option<i64>>(1), owner);
        assert_eq!(row.get::<_, i64>(2), 1, "epoch");
    }
    for table in [
        "kh_node",
        "kh_lease",
        "kh_partition",
        "kh_meta",
        "kh_account",
        "kh_webhook",
        "kh_event",
        "kh_event_id",
        "kh_inbox",
        "kh_delivery",
        "kh_attempt",
        "kh_due",
        "kh_stats",
        "kh_session",
    ] {
        let found: Option<String> = client
            .query_one("SELECT to_regclass($1)::text", &[&table])
            .await
            .unwrap()
            .get(0);
        assert_eq!(found.as_deref(), Some(table));
    }
    // Today's day tables exist (and the next week's), and rows of today land in them.
    let today = schema::day_of(std::time::SystemTime::now());
    for day in [today, today + schema::DAYS_AHEAD] {
        for table in schema::DAY_PARTITIONED {
            let name = schema::day_table(table, day);
            let found: Option<String> = client
                .query_one("SELECT to_regclass($1)::text", &[&name])
                .await
                .unwrap()
                .get(0);
            assert_eq!(found, Some(name));
        }
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let seq = kyberhook::ids::seq_floor(now_ms) as i64;
    client
        .execute(
            "INSERT INTO kh_event (seq, partition_id, account_id, record)
             VALUES ($1, 7, 'acc_1', '\\x7b7d')",
            &[&seq],
        )
        .await
        .unwrap();
    let landed: String = client
        .query_one(
            "SELECT tableoid::regclass::text FROM kh_event WHERE seq = $1",
            &[&seq],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(landed, schema::day_table("kh_event", today));

    // A second start (another node name) finds it up to date and changes nothing.
    let config_b = write_config(
        dir.path(),
        &pg_storage(&db, ""),
        "[cluster]\ndivide_work = false\nnode_name = \"node-b\"\n",
    );
    let second = serve_until(&config_b, &["kyberhook is serving"]);
    assert!(
        second.stderr.contains("kyberhook schema up to date"),
        "{}",
        second.stderr
    );
    assert!(!second.stderr.contains("NOTICE"), "{}", second.stderr);
    assert_eq!(
        schema_rows(&db).await,
        [(schema::CURRENT, schema::PARTITIONS, "node-a".to_string())]
    );
    let events: i64 = client
        .query_one("SELECT count(*) FROM kh_event", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 1);

    let check = kyberhook(&["check-config", "--config", &config], &[]);
    assert_eq!(check.code, 0, "{}", check.stderr);
    assert!(
        check
            .stdout
            .contains(&format!("kyberhook schema version {}", schema::CURRENT)),
        "{}",
        check.stdout
    );
}

#[tokio::test]
async fn nodes_starting_at_the_same_time_create_one_schema_and_none_fails() {
    let db = pg_database().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &pg_storage(&db, ""),
        "[cluster]\nnode_name = \"node-a\"\n",
    );
    let parsed = load(&config);
    // A second node on the same data dir (one secrets key), under its own name.
    let config_b = dir.path().join("kh-b.toml").display().to_string();
    std::fs::write(
        &config_b,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("node-a", "node-b"),
    )
    .unwrap();
    // Two real processes and six in-process migrations, all let go at once.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let processes: Vec<_> = [config.clone(), config_b]
        .into_iter()
        .map(|config| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                // Both serve: they divide the partitions (the default).
                serve_until(&config, &["kyberhook is serving"])
            })
        })
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..6 {
        let config = parsed.clone();
        tasks.spawn(async move { migrate(&config, &format!("task-{i}")).await });
    }
    let mut created = 0;
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            Ok(Migrated::Created) => created += 1,
            Ok(Migrated::UpToDate) => {}
            other => panic!("a concurrent migration failed: {other:?}"),
        }
    }
    let mut serving = 0;
    for p in processes {
        let ran = p.join().unwrap();
        assert!(
            !ran.stderr.contains("\"level\":\"ERROR\""),
            "{}",
            ran.stderr
        );
        serving += usize::from(ran.stderr.contains("kyberhook is serving"));
    }
    assert_eq!(serving, 2, "both nodes serve their share");
    assert!(
        created <= 1,
        "{created} migrations say they created the schema"
    );
    let rows = schema_rows(&db).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, schema::CURRENT);
    let client = db.client().await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM kh_partition", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 256);
}

#[tokio::test]
async fn a_schema_newer_than_this_build_is_refused_in_one_line_and_left_untouched() {
    let db = pg_database().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &pg_storage(&db, ""), "");
    assert_eq!(
        migrate(&load(&config), "setup").await.unwrap(),
        Migrated::Created
    );
    let newer = schema::CURRENT + 1;
    let client = db.client().await;
    client
        .execute(
            "UPDATE kh_schema SET version = $1, updated_by = 'kyberhook-from-the-future'",
            &[&newer],
        )
        .await
        .unwrap();
    let before = schema_rows(&db).await;

    for command in ["serve", "check-config"] {
        let ran = kyberhook(&[command, "--config", &config], &[]);
        assert_eq!(ran.code, 2, "{command}: {}", ran.stderr);
        let line = ran.one_line();
        assert!(line.starts_with("kyberhook: "), "{command}: {line}");
        assert!(
            line.contains(&format!(
                "version {newer}, newer than this kyberhook knows ({})",
                schema::CURRENT
            )),
            "{command}: {line}"
        );
    }
    let refused = migrate(&load(&config), "in-process").await.unwrap_err();
    assert_eq!(refused.exit_code(), 2, "{refused}");
    assert_eq!(schema_rows(&db).await, before, "nothing was touched");
}

#[tokio::test]
async fn check_config_says_in_one_line_whether_the_database_can_be_reached() {
    let db = pg_database().await;
    let dir = tempfile::tempdir().unwrap();
    let check = |storage: String| {
        let config = write_config(dir.path(), &storage, "");
        kyberhook(&["check-config", "--config", &config], &[])
    };

    // Verified TLS, required: reachable (and the connection really is TLS, see below).
    let ran = check(pg_storage(&db, "?sslmode=require"));
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert_eq!(ran.stdout.trim_end().lines().count(), 1, "{}", ran.stdout);
    assert!(
        ran.stdout
            .starts_with("config ok; the database at 127.0.0.1:"),
        "{}",
        ran.stdout
    );
    let target = Target::from_config(&load(&write_config(
        dir.path(),
        &pg_storage(&db, "?sslmode=verify-full"),
        "",
    )))
    .unwrap();
    let client = target.connect().await.unwrap();
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "sslmode=verify-full connected without TLS");

    // The server's certificate without its CA: refused whether TLS is required or only
    // preferred (never downgraded to plaintext), naming the key that fixes it.
    for query in ["?sslmode=require", ""] {
        let storage = format!(
            "backend = \"postgres\"\npostgres_url = \"{}{query}\"\n",
            db.url
        );
        let ran = check(storage);
        assert_eq!(ran.code, 2, "{query}: {}", ran.stderr);
        let line = ran.one_line();
        assert!(line.contains("TLS"), "{line}");
        assert!(line.contains("storage.postgres_ca_file"), "{line}");
    }
    // ...while sslmode=disable needs no CA.
    let ran = check(format!(
        "backend = \"postgres\"\npostgres_url = \"{}?sslmode=disable\"\n",
        db.url
    ));
    assert_eq!(ran.code, 0, "{}", ran.stderr);

    // Nothing listens: 75 (EX_TEMPFAIL), the address named.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let ran = check(format!(
        "backend = \"postgres\"\npostgres_url = \"postgres://kh:s3cret@127.0.0.1:{port}/kh\"\n"
    ));
    assert_eq!(ran.code, 75, "{}", ran.stderr);
    let line = ran.one_line();
    assert!(
        line.starts_with(&format!(
            "kyberhook: cannot reach the database at 127.0.0.1:{port}/kh as kh"
        )),
        "{line}"
    );
    assert!(!line.contains("s3cret"), "{line}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // Something accepts and never answers: bounded by connect_timeout + 5 s, then 75.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let started = Instant::now();
    let ran = check(format!(
        "backend = \"postgres\"\npostgres_url = \"postgres://kh@127.0.0.1:{port}/kh?connect_timeout=1\"\n"
    ));
    assert_eq!(ran.code, 75, "{}", ran.stderr);
    assert!(
        ran.one_line().contains("no answer within 6 s"),
        "{}",
        ran.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    drop(silent);

    // A database that does not exist: the operator's to fix, 2.
    let ran = check(format!(
        "backend = \"postgres\"\npostgres_url = \"postgres://postgres@127.0.0.1:{}/no_such_db?sslmode=disable\"\n",
        db.port
    ));
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    let line = ran.one_line();
    assert!(
        line.contains("no_such_db") && line.contains("3D000"),
        "{line}"
    );

    // The sled backend's check-config does not connect anywhere.
    let ran = check(String::new());
    assert_eq!(
        (ran.code, ran.stdout.trim()),
        (0, "config ok"),
        "{}",
        ran.stderr
    );
}

#[tokio::test]
async fn postgres_settings_are_checked_before_anything_connects() {
    let db = pg_database().await;
    let dir = tempfile::tempdir().unwrap();
    let good_url = format!("{}?sslmode=disable", db.url);
    let refused = |storage: &str, extra: &str, env: &[(&str, &str)], needles: &[&str]| {
        let config = write_config(dir.path(), storage, extra);
        for command in ["check-config", "serve"] {
            let ran = kyberhook(&[command, "--config", &config], env);
            assert_eq!(ran.code, 2, "{command} {storage:?}: {}", ran.stderr);
            let line = ran.one_line();
            for needle in needles {
                assert!(line.contains(needle), "{command} {storage:?}: {line}");
            }
            assert!(!line.contains("s3cret"), "{line} quotes the password");
        }
    };
    refused(
        "backend = \"postgres\"",
        "",
        &[],
        &["storage.postgres_url", "must be set"],
    );
    refused(
        "backend = \"postgres\"\npostgres_url = \"postgres://kh:s3cret@db:port/kh\"",
        "",
        &[],
        &["storage.postgres_url", "not a usable PostgreSQL URL"],
    );
    refused(
        "backend = \"postgres\"\npostgres_url = \"https://kh:s3cret@db/kh\"",
        "",
        &[],
        &["storage.postgres_url"],
    );
    refused(
        "backend = \"mysql\"",
        "",
        &[],
        &["kh.toml:", "backend", "postgres"],
    );
    refused(
        &format!("backend = \"postgres\"\npostgres_url = \"{good_url}\"\npostgres_ca_file = \"/nonexistent/ca.pem\""),
        "",
        &[],
        &["storage.postgres_ca_file", "/nonexistent/ca.pem"],
    );
    refused(
        &format!("backend = \"postgres\"\npostgres_url = \"{good_url}\""),
        "[cluster]\nnode_name = \"not a name\"\n",
        &[],
        &["cluster.node_name"],
    );
    refused(
        &format!("backend = \"postgres\"\npostgres_url = \"{good_url}\""),
        "[cluster]\nadvertise = \"10.0.0.5:8080\"\n",
        &[],
        &["cluster.advertise"],
    );
    // KYBERHOOK_POSTGRES_URL wins over the file: a bad one is refused naming it...
    refused(
        &format!("backend = \"postgres\"\npostgres_url = \"{good_url}\""),
        "",
        &[(
            "KYBERHOOK_POSTGRES_URL",
            "postgres://kh:s3cret@db/kh?sslmode=sometimes",
        )],
        &["KYBERHOOK_POSTGRES_URL"],
    );
    // ...a good one makes the file's unreachable one irrelevant, and an empty one is unset.
    let config = write_config(
        dir.path(),
        "backend = \"postgres\"\npostgres_url = \"postgres://kh@127.0.0.1:1/kh\"",
        "",
    );
    let ran = kyberhook(
        &["check-config", "--config", &config],
        &[("KYBERHOOK_POSTGRES_URL", &good_url)],
    );
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(ran.stdout.contains(&db.name), "{}", ran.stdout);
    let ran = kyberhook(
        &["check-config", "--config", &config],
        &[("KYBERHOOK_POSTGRES_URL", "")],
    );
    assert_eq!(ran.code, 75, "{}", ran.stderr);
    // The env URL alone is enough for backend = "postgres".
    let config = write_config(dir.path(), "backend = \"postgres\"", "");
    let ran = kyberhook(
        &["check-config", "--config", &config],
        &[("KYBERHOOK_POSTGRES_URL", &good_url)],
    );
    assert_eq!(ran.code, 0, "{}", ran.stderr);

    // An engine started in process on this backend keeps nothing in an embedded store.
    let config = write_config(
        dir.path(),
        &format!("backend = \"postgres\"\npostgres_url = \"{good_url}\""),
        "",
    );
    assert!(postgres::is_selected(&load(&config)));
    let engine = kyberhook::Engine::start(load(&config)).await.unwrap();
    engine.shutdown().await;
    assert!(
        !dir.path().join("data").join("conf").exists(),
        "no sled store was made"
    );
}
