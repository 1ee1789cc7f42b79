//! The PostgreSQL store keeps the storage contract: the same checks the embedded store passes
//! (`kyberhook::store::conformance`), each on a fresh database of the shared test cluster.

use std::sync::Arc;

use kyberhook::config::Config;
use kyberhook::store::postgres::PgStore;
use kyberhook::store::Storage;

use crate::pg::{pg_database, PgDb};

/// What must outlive one check's store: its database's runtime and the data dir (which holds
/// the node's generated secrets key).
pub struct Open {
    _dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
    pub db: PgDb,
}

/// A config for `db` with its data dir in `dir`.
pub fn pg_config(db: &PgDb, dir: &std::path::Path) -> Config {
    Config::from_toml(
        &format!(
            "[storage]\npath = \"{}\"\nbackend = \"postgres\"\npostgres_url = \"{}\"\npostgres_ca_file = \"{}\"\n",
            dir.join("data").display(),
            db.url,
            db.ca_file.display()
        ),
        "test",
    )
    .unwrap()
}

fn open() -> (Open, Arc<dyn Storage>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(pg_database());
    let dir = tempfile::tempdir().unwrap();
    let store = PgStore::open(&pg_config(&db, dir.path()), None).unwrap();
    (
        Open {
            _dir: dir,
            _rt: rt,
            db,
        },
        Arc::new(store),
    )
}

kyberhook::backend_conformance!(open);

/// A runtime for the checks' own queries, and `days` day tables made from twenty days ago
/// (`conformance::old_day`), whose first day is returned.
fn with_day_tables(open: &Open, days: u64) -> (tokio::runtime::Runtime, u64) {
    use kyberhook::store::postgres::schema::{self, Server};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let day = kyberhook::store::conformance::old_day();
    rt.block_on(async {
        let mut client = open.db.client().await;
        schema::ensure_day_tables(&mut client, Server::Postgres, day, days)
            .await
            .unwrap();
    });
    (rt, day)
}

/// Whether each day-partitioned table has its table for `day`.
fn day_tables_present(rt: &tokio::runtime::Runtime, open: &Open, day: u64) -> Vec<bool> {
    use kyberhook::store::postgres::schema;
    rt.block_on(async {
        let client = open.db.client().await;
        let mut out = Vec::new();
        for table in schema::DAY_PARTITIONED {
            let name: Option<String> = client
                .query_one(
                    "SELECT to_regclass($1)::text",
                    &[&schema::day_table(table, day)],
                )
                .await
                .unwrap()
                .get(0);
            out.push(name.is_some());
        }
        out
    })
}

/// The whole-day check above, with day tables for its two days (a store makes them only from
/// yesterday on): the first day's tables are dropped, the second's (one delivery still owed)
/// stay.
#[test]
fn a_day_of_ended_history_is_dropped_as_tables_and_a_day_still_owed_stays() {
    let (open, store) = open();
    let (rt, day) = with_day_tables(&open, 2);
    let present = |day: u64| day_tables_present(&rt, &open, day);
    assert_eq!(present(day), [true; 3]);
    assert_eq!(present(day + 1), [true; 3]);
    kyberhook::store::conformance::whole_days_of_history_go_but_not_one_with_owed_work(&*store);
    assert_eq!(
        present(day),
        [false; 3],
        "the ended day's tables are dropped"
    );
    assert_eq!(present(day + 1), [true; 3], "the owed day's tables stay");
}

/// Retention's drop of a day waits for the day-partitioned tables in the order every query
/// locks them (parents first), so a reader it meets is never the deadlock's victim: a reader
/// that holds `kh_attempt` and then wants `kh_delivery` while the drop waits for `kh_attempt`
/// gets its answer; the drop gives way, and the day goes at the next pass.
#[test]
fn a_reader_caught_in_a_lock_cycle_with_retention_gets_its_answer() {
    let (open, store) = open();
    let (rt, day) = with_day_tables(&open, 1);
    let exists = |day: u64| day_tables_present(&rt, &open, day) == [true; 3];
    assert!(exists(day));
    let cutoff = (day + 2) * 86_400_000;
    rt.block_on(async {
        let reader = open.db.client().await;
        reader
            .batch_execute("BEGIN; SELECT count(*) FROM kh_attempt")
            .await
            .unwrap();
        let drop = {
            let store = store.clone();
            std::thread::spawn(move || store.drop_ended_days(cutoff))
        };
        // Until the drop waits for the table the reader holds.
        let watcher = open.db.client().await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'kh_attempt'::regclass",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if waiting > 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "retention never waited for kh_attempt"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // The cycle: the reader now wants a table the drop holds.
        let n: i64 = reader
            .query_one("SELECT count(*) FROM kh_delivery", &[])
            .await
            .expect("the reader is not the deadlock's victim")
            .get(0);
        assert_eq!(n, 0);
        reader.batch_execute("COMMIT").await.unwrap();
        let purged = tokio::task::spawn_blocking(move || drop.join().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(purged.events, 0);
    });
    assert!(exists(day), "the drop gave way this pass");
    store.drop_ended_days(cutoff).unwrap();
    assert_eq!(
        day_tables_present(&rt, &open, day),
        [false; 3],
        "and dropped the day at the next"
    );
}

/// The registry's log of changes names the accounts each version since a given one touched,
/// each once, in the order first changed; a range the log does not wholly hold (trimmed, or
/// written before the log) is `None`, for the caller to re-read everything.
#[test]
fn the_registry_s_log_names_the_accounts_changed_since_a_version() {
    use kyberhook::ids::AccountId;
    use kyberhook::model::Account;
    let (open, store) = open();
    let account = |id: &str, plan: &str| Account {
        id: AccountId::parse(id).unwrap(),
        name: id.into(),
        plan: plan.into(),
        created_ms: 1,
        api_key_hash: [7; 32],
    };
    let (a, b) = (
        AccountId::parse("acc_a").unwrap(),
        AccountId::parse("acc_b").unwrap(),
    );
    store.put_account(&account("acc_a", "starter")).unwrap();
    let (first, _) = store.registry_version(None).unwrap().unwrap();
    store.put_account(&account("acc_b", "starter")).unwrap();
    store
        .put_account(&account("acc_a", "professional"))
        .unwrap();
    let (now, _) = store.registry_version(None).unwrap().unwrap();
    assert_eq!(now, first + 2);
    assert_eq!(
        store.registry_changes(first - 1, now).unwrap(),
        Some(vec![a.clone(), b.clone()])
    );
    assert_eq!(
        store.registry_changes(first, now).unwrap(),
        Some(vec![b, a])
    );
    assert_eq!(store.registry_changes(now, now).unwrap(), Some(vec![]));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = open.db.client().await;
        client
            .execute(
                "DELETE FROM kh_registry_change WHERE version = $1",
                &[&(first as i64)],
            )
            .await
            .unwrap();
    });
    assert_eq!(store.registry_changes(first - 1, now).unwrap(), None);
    assert!(store.registry_changes(first, now).unwrap().is_some());
}
