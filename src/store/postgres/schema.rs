//! The PostgreSQL backend's tables, and the migration that creates them: once, by whichever
//! node gets there first, however many start at the same moment.
//!
//! [`migrate`] runs in one transaction that first takes a transaction-scoped advisory lock
//! ([`LOCK_KEY`]): a second node starting at the same time waits on the lock, then finds the
//! schema at [`CURRENT`] and does nothing. `kh_schema` holds one row, the version and the
//! partition count; a version newer than [`CURRENT`] (a newer kyberhook migrated the database)
//! is refused before anything is touched, with one line ([`PgError::Config`], exit 2).
//! [`installed_version`] reads the version without the lock, for `check-config`.
//!
//! ## The design the tables serve (issue 22)
//!
//! One node serves at a time: the holder of `kh_lease` (see [`super::lease`]: owner, epoch,
//! expiry; every write transaction checks it first). It keeps the engine's state — wheel, plan
//! rates, FIFO queues — in memory as a single node does; the database is the durable log.
//! Accounts hash into [`PARTITIONS`] fixed partitions (`partition_id` on the rows of an
//! account): `kh_partition` records who holds each (today the lease holder holds all, stamped
//! with its epoch), ready for nodes dividing them.
//!
//! - `kh_node`: the nodes (one row per process start, its heartbeat in `last_seen`, its writer
//!   `slot` — the low byte of the sequence numbers it mints — since version 2);
//!   `kh_lease`, `kh_partition`: who serves. `kh_meta`: named values (the secrets key's check
//!   value, each node's start-up write probe, the registry's version); `kh_registry_change`:
//!   which account each registry version touched (since version 3).
//! - `kh_account`, `kh_webhook`: the management records (`record`: [`crate::codec`] bytes,
//!   webhook secrets sealed), keyed and indexed by id and account.
//! - `kh_event` (+ `kh_event_id` for producer-chosen ids, the idempotency key) and `kh_inbox`
//!   (fan-out owed): one group commit of the ingest committer is one transaction.
//! - `kh_delivery`: one row per (event, webhook), its record rewritten in place as attempts
//!   happen, with `status`, `event_type`, `updated_ms` and `due_ms` beside it for the log's
//!   filters and retention; `kh_attempt`: the kept attempts; `kh_due`: owed attempts by due
//!   time, which the wheel reloads at start-up (or takeover).
//! - `kh_stats`: hourly counts per webhook, one row per writer (process) so writers never
//!   contend, summed on read. `kh_session`: dashboard sessions, sealed.
//!
//! **History is partitioned by day** — `kh_event`, `kh_delivery` and `kh_attempt`, by `RANGE
//! (seq)`, where a day's sequence numbers are `[day_ms << 20, next_day_ms << 20)` (see
//! [`crate::ids::seq_floor`]). A delivery id carries its event's seq, so a lookup by id
//! touches one day table, and an attempt lands in the day of its delivery, not of its own
//! time: retention drops a whole day (events, deliveries, attempts together) with `DROP
//! TABLE`, exactly the cutoff the sled store applies (not done yet: retention deletes rows in
//! batches, like the sled store). Rows of a day with no table of its own (a clock far off, the
//! tests' made-up times) go to each table's `_other` default partition. Measured on this machine (PostgreSQL 15,
//! 2 shared cores, 500 000 attempt rows a day in 1 000-row statements): inserting 2 M rows took
//! 13.5–14.3 s partitioned and 14.9–18.4 s into one table (no penalty); removing one day took
//! 46 ms as `DROP TABLE` and 446 ms `DELETE` + 580 ms `VACUUM`, and the single table stayed at
//! 452 MB for three days of rows against 354 MB partitioned. [`ensure_day_tables`] creates
//! day tables ahead (the migration: yesterday to a week ahead).
//!
//! ## Portability (CockroachDB, YugabyteDB, Citus)
//!
//! Used: plain tables with primary keys, `bigint`/`smallint`/`int`/`text`/`bytea`/`boolean`/
//! `timestamptz`/`text[]`/`jsonb`, b-tree indexes, `generate_series`, `ON CONFLICT DO NOTHING`,
//! and one `pg_advisory_xact_lock` at migration (CockroachDB has transaction-scoped advisory
//! locks since 2026-04, YugabyteDB since 2.25). Every hot table leads with `partition_id` (a
//! Citus distribution column, a CockroachDB/YugabyteDB key prefix). Avoided, and why: sequences
//! and `SERIAL` (a contention point on CockroachDB, not monotonic across YugabyteDB nodes; ids
//! are minted by the engine), `LISTEN/NOTIFY` (absent from CockroachDB, early access on
//! YugabyteDB, a global lock at commit on PostgreSQL), `UNLOGGED` tables (epochs must survive a
//! crash and reach standbys), triggers, stored procedures and `DO` blocks, `SKIP LOCKED` and
//! foreign keys (deletes are explicit, in the engine). Two things do not carry over:
//! declarative day partitions (CockroachDB has no `PARTITION OF`; it would take plain tables
//! with row-level TTL) and storage parameters, which [`TUNING`] sets only on PostgreSQL itself
//! ([`Server::Postgres`]). DDL is transactional on PostgreSQL; on CockroachDB and YugabyteDB it
//! is only partly so, which is why every statement is `IF NOT EXISTS` and safe to re-run. None
//! of this was run against CockroachDB or YugabyteDB yet: only PostgreSQL 15 is tested.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::Client;

use super::PgError;

/// The schema version this build writes and understands.
pub const CURRENT: i32 = MIGRATIONS.len() as i32;

/// The number of partitions accounts are hashed into, fixed when the schema is created.
pub const PARTITIONS: i16 = crate::partition::PARTITIONS as i16;

/// The advisory lock the migration holds: "kyberhok" in ASCII.
pub const LOCK_KEY: i64 = 0x6b79_6265_7268_6f6b;

/// The history tables, partitioned by day of `seq`.
pub const DAY_PARTITIONED: [&str; 3] = ["kh_event", "kh_delivery", "kh_attempt"];

/// Day tables [`migrate`] makes sure of: from yesterday (clocks differ) this many days on.
pub const DAYS_AHEAD: u64 = 7;

/// `MIGRATIONS[n]` takes the schema from version `n` to `n + 1`.
const MIGRATIONS: [&str; 3] = [V1, V2, V3];

/// Version 3: the registry's log of changes — which account each version of
/// `kh_meta.registry_version` touched — so that other nodes re-read only those accounts
/// ([`crate::store::Storage::registry_changes`]). Kept ten minutes; a node further behind
/// re-reads everything.
const V3: &str = "CREATE TABLE IF NOT EXISTS kh_registry_change (
    version     bigint PRIMARY KEY,             -- kh_meta.registry_version it made
    account_id  text NOT NULL,                  -- the account (or its webhook) it changed
    changed_at  timestamptz NOT NULL DEFAULT now()
);";

/// Version 2: each node's writer slot (`kh_node.slot`), the low byte of every sequence number
/// it mints (`ids::Sequencer::for_writer`), so that nodes writing at once never mint the same
/// one. Claimed by [`super::ownership::claim_slot`].
const V2: &str = "ALTER TABLE kh_node ADD COLUMN IF NOT EXISTS slot smallint;";

/// Version 1: everything the design above needs.
const V1: &str = r#"
CREATE TABLE IF NOT EXISTS kh_node (
    node_id     bigint PRIMARY KEY,          -- random per process start (an incarnation)
    name        text NOT NULL,               -- cluster.node_name
    advertise   text,                        -- cluster.advertise
    version     text NOT NULL,               -- the kyberhook version running
    started_at  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()  -- its heartbeat; the database's clock
);

CREATE TABLE IF NOT EXISTS kh_lease (        -- the right to serve: one holder at a time
    id          smallint PRIMARY KEY CHECK (id = 1),
    owner       bigint,                      -- kh_node.node_id; NULL: nobody yet
    epoch       bigint NOT NULL DEFAULT 0,   -- fencing token: +1 per change of holder
    expires_at  timestamptz NOT NULL DEFAULT now(),
    acquired_at timestamptz
);
INSERT INTO kh_lease (id) VALUES (1) ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS kh_partition (
    partition_id smallint PRIMARY KEY,       -- 0 .. partitions - 1
    owner        bigint,                     -- kh_node.node_id; NULL: free
    epoch        bigint NOT NULL DEFAULT 0,  -- fencing token, +1 per change of owner
    acquired_at  timestamptz
);
INSERT INTO kh_partition (partition_id)
    SELECT g FROM generate_series(0, 255) AS g
    ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS kh_meta (
    name       text PRIMARY KEY,
    value      text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS kh_account (
    account_id   text PRIMARY KEY,
    partition_id smallint NOT NULL,
    record       bytea NOT NULL              -- crate::codec (Account: name, plan, key hash)
);

CREATE TABLE IF NOT EXISTS kh_webhook (
    webhook_id   bigint PRIMARY KEY,         -- the u64 of wh_<16 hex>, sign bit flipped
    account_id   text NOT NULL,
    partition_id smallint NOT NULL,
    record       bytea NOT NULL              -- crate::codec, its secrets sealed
);
CREATE INDEX IF NOT EXISTS kh_webhook_account ON kh_webhook (account_id);

CREATE TABLE IF NOT EXISTS kh_event (
    seq          bigint NOT NULL,            -- unix_ms << 20 | counter
    partition_id smallint NOT NULL,
    account_id   text NOT NULL,
    record       bytea NOT NULL,             -- crate::codec (EventRecord: the exact body)
    PRIMARY KEY (seq)
) PARTITION BY RANGE (seq);
CREATE INDEX IF NOT EXISTS kh_event_account ON kh_event (account_id, seq);
CREATE TABLE IF NOT EXISTS kh_event_other PARTITION OF kh_event DEFAULT;

CREATE TABLE IF NOT EXISTS kh_event_id (     -- producer-chosen ids only: the idempotency key
    account_id   text NOT NULL,
    event_id     text NOT NULL,
    seq          bigint NOT NULL,
    PRIMARY KEY (account_id, event_id)
);
CREATE INDEX IF NOT EXISTS kh_event_id_seq ON kh_event_id (seq);

CREATE TABLE IF NOT EXISTS kh_inbox (        -- events not yet fanned out
    seq          bigint PRIMARY KEY,
    partition_id smallint NOT NULL
);

CREATE TABLE IF NOT EXISTS kh_delivery (
    seq          bigint NOT NULL,            -- the event's: dlv_<seq><webhook>
    webhook_id   bigint NOT NULL,
    account_id   text NOT NULL,
    partition_id smallint NOT NULL,
    status       smallint NOT NULL,          -- 0 pending, 1 delivered, 2 retrying, 3 failed
    event_type   text NOT NULL,
    updated_ms   bigint NOT NULL,
    due_ms       bigint,                     -- next_attempt_ms: its kh_due row
    record       bytea NOT NULL,             -- crate::codec (DeliveryRecord)
    PRIMARY KEY (seq, webhook_id)
) PARTITION BY RANGE (seq);
CREATE INDEX IF NOT EXISTS kh_delivery_account ON kh_delivery (account_id, seq, webhook_id);
CREATE INDEX IF NOT EXISTS kh_delivery_webhook ON kh_delivery (webhook_id, seq);
CREATE TABLE IF NOT EXISTS kh_delivery_other PARTITION OF kh_delivery DEFAULT;

CREATE TABLE IF NOT EXISTS kh_attempt (
    seq          bigint NOT NULL,
    webhook_id   bigint NOT NULL,
    attempt_no   int NOT NULL,
    record       bytea NOT NULL,             -- crate::codec (AttemptRecord)
    PRIMARY KEY (seq, webhook_id, attempt_no)
) PARTITION BY RANGE (seq);
CREATE TABLE IF NOT EXISTS kh_attempt_other PARTITION OF kh_attempt DEFAULT;

CREATE TABLE IF NOT EXISTS kh_due (          -- owed attempts: what the timing wheel reloads
    due_ms       bigint NOT NULL,
    seq          bigint NOT NULL,
    webhook_id   bigint NOT NULL,
    partition_id smallint NOT NULL,
    PRIMARY KEY (due_ms, seq, webhook_id)
);
CREATE INDEX IF NOT EXISTS kh_due_delivery ON kh_due (webhook_id, seq);

CREATE TABLE IF NOT EXISTS kh_stats (
    webhook_id   bigint NOT NULL,
    hour         bigint NOT NULL,            -- unix hours
    writer       bigint NOT NULL,            -- the process (node incarnation) that counted
    record       bytea NOT NULL,             -- crate::codec (stats::Counts)
    PRIMARY KEY (webhook_id, hour, writer)
);

CREATE TABLE IF NOT EXISTS kh_session (
    token_hash bytea PRIMARY KEY,            -- SHA-256 of the session cookie
    sealed     text NOT NULL
);
"#;

/// Storage parameters, PostgreSQL only (others reject or ignore them): room for in-page (HOT)
/// updates in the tables rewritten in place, and eager autovacuum on the two churning ones.
pub const TUNING: &str = r#"
ALTER TABLE kh_node SET (fillfactor = 50);
ALTER TABLE kh_lease SET (fillfactor = 50);
ALTER TABLE kh_partition SET (fillfactor = 50);
ALTER TABLE kh_inbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000);
ALTER TABLE kh_due SET (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01);
"#;

/// Day tables of `kh_delivery` leave room for its summary's in-place updates.
const DELIVERY_DAY_FILLFACTOR: u32 = 85;

/// Which PostgreSQL-compatible server answers, from `version()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Postgres,
    Cockroach,
    Yugabyte,
}

impl Server {
    pub fn from_version(version: &str) -> Server {
        if version.contains("CockroachDB") {
            Server::Cockroach
        } else if version.contains("-YB-") {
            Server::Yugabyte
        } else {
            Server::Postgres
        }
    }
}

/// What [`migrate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrated {
    /// The database had no kyberhook schema: created at [`CURRENT`].
    Created,
    /// Upgraded from this version to [`CURRENT`].
    Upgraded(i32),
    /// Already at [`CURRENT`] (perhaps made so by a node starting at the same time).
    UpToDate,
}

fn sql(e: tokio_postgres::Error, target: &str) -> PgError {
    super::connect::classify(&e, target)
}

/// The line refusing a schema newer than this build.
fn newer(version: i32, target: &str) -> PgError {
    PgError::Config(format!(
        "the kyberhook schema in the database at {target} is version {version}, newer than this kyberhook knows ({CURRENT}): a newer kyberhook migrated it; run that version (or restore the database from before the upgrade)"
    ))
}

/// The schema version the database holds (`None`: no kyberhook schema yet), refusing one newer
/// than [`CURRENT`]. Takes no lock and writes nothing.
pub async fn installed_version(client: &Client, target: &str) -> Result<Option<i32>, PgError> {
    let exists: Option<String> = client
        .query_one("SELECT to_regclass('kh_schema')::text", &[])
        .await
        .map_err(|e| sql(e, target))?
        .get(0);
    if exists.is_none() {
        return Ok(None);
    }
    let row = client
        .query_opt("SELECT version FROM kh_schema WHERE id = 1", &[])
        .await
        .map_err(|e| sql(e, target))?;
    let version: Option<i32> = row.map(|r| r.get(0));
    match version {
        Some(v) if v > CURRENT => Err(newer(v, target)),
        other => Ok(other),
    }
}

/// Brings the database's schema to [`CURRENT`], or refuses a newer one; `by` names the node
/// in `kh_schema.updated_by`. One transaction under [`LOCK_KEY`]: concurrent callers run one
/// after the other, and a failure leaves the database as it was (on PostgreSQL).
pub async fn migrate(
    client: &mut Client,
    by: &str,
    target: &str,
) -> Result<(Migrated, Server), PgError> {
    let version: String = client
        .query_one("SELECT version()", &[])
        .await
        .map_err(|e| sql(e, target))?
        .get(0);
    let server = Server::from_version(&version);
    let tx = client.transaction().await.map_err(|e| sql(e, target))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(|e| sql(e, target))?;
    // `IF NOT EXISTS` on what is there already is a NOTICE each, which the log need not show.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await
        .map_err(|e| sql(e, target))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS kh_schema (
            id         smallint PRIMARY KEY CHECK (id = 1),
            version    int NOT NULL,
            partitions smallint NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            updated_by text NOT NULL
        )",
    )
    .await
    .map_err(|e| sql(e, target))?;
    let from: i32 = tx
        .query_opt("SELECT version FROM kh_schema WHERE id = 1", &[])
        .await
        .map_err(|e| sql(e, target))?
        .map_or(0, |r| r.get(0));
    if from > CURRENT {
        // Dropping the transaction rolls it back: nothing of a newer schema is touched.
        return Err(newer(from, target));
    }
    let migrated = match from {
        0 => Migrated::Created,
        v if v == CURRENT => Migrated::UpToDate,
        v => Migrated::Upgraded(v),
    };
    for step in &MIGRATIONS[from as usize..] {
        tx.batch_execute(step).await.map_err(|e| sql(e, target))?;
    }
    if server == Server::Postgres && from < CURRENT {
        tx.batch_execute(TUNING).await.map_err(|e| sql(e, target))?;
    }
    if from < CURRENT {
        tx.execute(
            "INSERT INTO kh_schema (id, version, partitions, updated_by) VALUES (1, $1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET version = $1, updated_at = now(), updated_by = $3",
            &[&CURRENT, &PARTITIONS, &by],
        )
        .await
        .map_err(|e| sql(e, target))?;
    }
    tx.commit().await.map_err(|e| sql(e, target))?;
    let today = day_of(SystemTime::now());
    ensure_day_tables(client, server, today.saturating_sub(1), DAYS_AHEAD + 2)
        .await
        .map_err(|e| sql(e, target))?;
    Ok((migrated, server))
}

/// Days since the Unix epoch (UTC) of `t`.
pub fn day_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 86_400
}

/// The `seq` range of a day's table: `[day_ms << 20, next_day_ms << 20)`.
pub fn day_bounds(day: u64) -> (i64, i64) {
    let lo = crate::ids::seq_floor(day * 86_400_000);
    let hi = crate::ids::seq_floor((day + 1) * 86_400_000);
    (lo as i64, hi as i64)
}

/// `kh_delivery_d20260115`: the day table of `table` for `day`.
pub fn day_table(table: &str, day: u64) -> String {
    let date = humantime::format_rfc3339(UNIX_EPOCH + Duration::from_secs(day * 86_400));
    let ymd: String = date.to_string()[..10].replace('-', "");
    format!("{table}_d{ymd}")
}

/// The day of a day table of `table` (`kh_event_d20260115` → its day), `None` for any other
/// name.
pub fn day_of_table(table: &str, name: &str) -> Option<u64> {
    let ymd = name.strip_prefix(table)?.strip_prefix("_d")?;
    if ymd.len() != 8 || !ymd.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let at = humantime::parse_rfc3339(&format!(
        "{}-{}-{}T00:00:00Z",
        &ymd[..4],
        &ymd[4..6],
        &ymd[6..]
    ))
    .ok()?;
    Some(day_of(at))
}

/// Creates the day tables of every history table for `days` days from `first_day`, where
/// missing: each in its own transaction holding [`LOCK_KEY`] (two nodes creating the same
/// table at once would otherwise collide on the catalog). A day whose rows already went to
/// the `_other` (default) table — a clock more than [`DAYS_AHEAD`] days off — cannot get its
/// own table; that is logged and its rows stay where they are, still found and purged.
pub async fn ensure_day_tables(
    client: &mut Client,
    server: Server,
    first_day: u64,
    days: u64,
) -> Result<(), tokio_postgres::Error> {
    for day in first_day..first_day + days {
        let (lo, hi) = day_bounds(day);
        for table in DAY_PARTITIONED {
            let name = day_table(table, day);
            let exists: Option<String> = client
                .query_one("SELECT to_regclass($1)::text", &[&name])
                .await?
                .get(0);
            if exists.is_some() {
                continue;
            }
            let with = if server == Server::Postgres && table == "kh_delivery" {
                format!(" WITH (fillfactor = {DELIVERY_DAY_FILLFACTOR})")
            } else {
                String::new()
            };
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
                .await?;
            let made = tx
                .batch_execute(&format!(
                    "SET LOCAL client_min_messages = warning;
                     CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES FROM ({lo}) TO ({hi}){with}"
                ))
                .await;
            match made {
                Ok(()) => tx.commit().await?,
                Err(e) if e.as_db_error().is_some() => {
                    tracing::warn!(table = %name, error = %super::connect::chain(&e), "a day table could not be created; its rows stay in the default table");
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_tables_cover_the_seqs_of_their_utc_day_exactly() {
        // 2026-01-15T00:00:00Z
        let day = 1_768_435_200 / 86_400;
        assert_eq!(day_table("kh_delivery", day), "kh_delivery_d20260115");
        assert_eq!(
            day_of_table("kh_delivery", "kh_delivery_d20260115"),
            Some(day)
        );
        assert_eq!(day_of_table("kh_event", "kh_event_other"), None);
        assert_eq!(day_of_table("kh_event", "kh_delivery_d20260115"), None);
        let (lo, hi) = day_bounds(day);
        let first = crate::ids::seq_floor(1_768_435_200_000);
        assert_eq!(lo as u64, first);
        // The last seq of the day (its last ms, the largest counter) is below hi.
        let last = crate::ids::seq_floor(1_768_435_200_000 + 86_399_999) + (1 << 20) - 1;
        assert_eq!(last + 1, hi as u64);
        assert_eq!(day_bounds(day + 1).0, hi);
        assert!(crate::ids::seq_time_ms(hi as u64) / 86_400_000 == day + 1);
    }

    #[test]
    fn the_schema_avoids_what_other_postgres_compatible_servers_lack() {
        let upper = MIGRATIONS.concat().to_uppercase();
        for avoided in [
            "SERIAL",
            "SEQUENCE",
            "UNLOGGED",
            "TRIGGER",
            "NOTIFY",
            "SKIP LOCKED",
            "REFERENCES",
            "DO $$",
            "WITH (",
        ] {
            assert!(!upper.contains(avoided), "a migration uses {avoided}");
        }
        assert_eq!(CURRENT, 3);
        assert_eq!(PARTITIONS, 256);
        assert!(
            V1.contains("generate_series(0, 255)"),
            "one kh_partition row each"
        );
        assert_eq!(
            Server::from_version("CockroachDB CCL v24.1.0 (x86_64-pc-linux-gnu)"),
            Server::Cockroach
        );
        assert_eq!(
            Server::from_version("PostgreSQL 11.2-YB-2.25.0.0-b0 on x86_64"),
            Server::Yugabyte
        );
        assert_eq!(
            Server::from_version("PostgreSQL 15.18 (Debian 15.18-0+deb12u1)"),
            Server::Postgres
        );
    }
}
