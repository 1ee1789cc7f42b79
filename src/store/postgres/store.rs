//! [`PgStore`]: the engine's [`Storage`] on PostgreSQL, one node's view of the shared database.
//!
//! In: the validated config (the database, the node's name, the secrets key). [`PgStore::open`]
//! migrates the schema ([`super::schema`]), makes sure of the day tables, settles the secrets
//! key against the database's check value (every node must seal with the same key), and opens
//! a small pool of connections. Out: the trait's typed records, read back from `bytea` columns
//! through [`crate::codec`], next to the few columns the queries filter and sort on.
//!
//! **Blocking over async.** The trait is blocking (the engine calls it from its committer and
//! writer threads and from `spawn_blocking`), tokio-postgres is async: the store owns a
//! two-thread runtime of its own, and each call spawns its work there and waits on a std
//! channel, which is safe from any thread, a tokio worker included (as a sled call blocks
//! one). Each call takes one connection of the pool ([`CONNECTIONS`]) for its statements and
//! runs them in one transaction when it writes more than one, so a batch of the ingest
//! committer or one drain of the delivery writer commits whole or not at all: the crash-order
//! rules of the trait hold trivially. A commit is durable when it returns (PostgreSQL's
//! `synchronous_commit`), so [`Storage::make_durable`] has nothing left to do.
//!
//! **Failures.** A write that fails makes the store unhealthy for good, like a sled store whose
//! disk refused a write: the engine then stops and its supervisor restarts it, and start-up
//! recovery (inbox, schedule) rebuilds everything from the database. A read that fails is a
//! 503 for its request and nothing more. A connection that dropped is reopened by the next
//! call that takes it.
//!
//! Keys: a webhook id is stored as `bigint` with its sign bit flipped ([`wh_key`]), so that
//! the database orders webhook ids as the engine does (unsigned); sequence numbers are below
//! 2^63 until the year 2248 and stored as they are.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use super::connect::{chain, Target};
use super::{lease, schema, PgError};
use crate::codec;
use crate::config::Config;
use crate::ids::{self, AccountId, DeliveryId, WebhookId};
use crate::model::{Account, AttemptRecord, DeliveryRecord, DeliveryStatus, EventRecord, Webhook};
use crate::partition::{Partition, Shares};
use crate::secrets::{self, KeySource, Sealer, SecretsKey};
use crate::stats::{self, AttemptStat, Counts};
use crate::store::embedded::backup::BackupError;
use crate::store::held::HeldDeliveries;
use crate::store::{
    BackupStream, ClusterView, DeliveryPage, DeliveryQuery, DeliveryWrites, NodeView,
    PurgeCandidate, PurgeCursor, PurgePlan, Purged, PurgedBatch, Result, Storage, StoreError,
    StoreErrorKind,
};

/// Connections each node keeps: the committer, the delivery writer, retention and request
/// handlers each take one per call, so a few cover them without waiting.
pub const CONNECTIONS: usize = 6;

/// Rows a start-up read of the schedule takes per query.
const DUE_PAGE: i64 = 10_000;

/// Deliveries a retention plan looks at per batch; events per event-purge batch.
const PURGE_BATCH: i64 = 1024;

/// The value sealed into `kh_meta` with the secrets key, to tell a node with another key.
const SECRETS_CHECK: &str = "kyberhook secrets check";
const SECRETS_CHECK_CONTEXT: &[u8] = b"kh_meta/secrets_check";
const SESSION_CONTEXT: &[u8] = b"kh_session/";

/// A webhook id as stored: the sign bit flipped, so that `bigint` order is unsigned order.
pub fn wh_key(id: WebhookId) -> i64 {
    (id.0 ^ (1 << 63)) as i64
}

fn wh_of(key: i64) -> WebhookId {
    WebhookId((key as u64) ^ (1 << 63))
}

/// A sequence number (or a bound on one) as stored.
fn seq_key(seq: u64) -> i64 {
    seq.min(i64::MAX as u64) as i64
}

/// The partition an account's rows belong to, as stored in `partition_id`.
pub fn partition_of(account: &AccountId) -> i16 {
    crate::partition::partition_of(account).get() as i16
}

fn status_code(s: DeliveryStatus) -> i16 {
    match s {
        DeliveryStatus::Pending => 0,
        DeliveryStatus::Delivered => 1,
        DeliveryStatus::Retrying => 2,
        DeliveryStatus::Failed => 3,
    }
}

/// A statement's parameters, owned, so that they can travel to the store's runtime.
type Params = Vec<Box<dyn ToSql + Send + Sync>>;

macro_rules! params {
    ($($p:expr),* $(,)?) => {
        vec![$(Box::new($p) as Box<dyn ToSql + Send + Sync>),*]
    };
}

/// A failure of the database as the engine sees it: a connection, the server's resources
/// (a full disk is `53100`) or the server going away are [`StoreErrorKind::Unavailable`];
/// anything else is [`StoreErrorKind::Internal`].
fn db(e: tokio_postgres::Error) -> StoreError {
    let text = chain(&e);
    let passing = match e.as_db_error() {
        Some(d) => {
            let c = d.code().code();
            c.starts_with("08") || c.starts_with("53") || c.starts_with("57P")
        }
        None => true,
    };
    let kind = if passing {
        StoreErrorKind::Unavailable
    } else {
        StoreErrorKind::Internal
    };
    StoreError::new(kind, format!("database: {text}"))
}

fn from_pg(e: PgError) -> StoreError {
    let kind = match e {
        PgError::Config(_) => StoreErrorKind::Operator,
        PgError::Unreachable(_) => StoreErrorKind::Unavailable,
        PgError::Failed(_) => StoreErrorKind::Internal,
    };
    StoreError::new(kind, e.to_string())
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    codec::decode(bytes)
        .map_err(|e| StoreError::new(StoreErrorKind::Internal, format!("a stored record: {e}")))
}

/// One pooled connection with the statements it has prepared.
struct Conn {
    client: Client,
    prepared: HashMap<&'static str, Statement>,
}

impl Conn {
    async fn prep(&mut self, sql: &'static str) -> Result<Statement> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await.map_err(db)?;
        self.prepared.insert(sql, s.clone());
        Ok(s)
    }
}

/// What the store's runtime tasks share: where the database is, the pool, the lease that
/// fences every write, and the first failure that made the store unhealthy.
struct Shared {
    target: Target,
    slots: Vec<tokio::sync::Mutex<Option<Conn>>>,
    next: AtomicUsize,
    fencing: Fencing,
    failed: Mutex<Option<StoreError>>,
}

/// How a node joins: waiting for the serve lease, or to divide the partitions.
enum Joining {
    Lease(Option<tokio::sync::oneshot::Sender<()>>),
    Divide(Arc<Shares>),
}

/// What fences this node's writes.
enum Fencing {
    /// One node serves: every write checks the serve lease ([`lease::FENCE`]).
    Lease(lease::Held),
    /// Nodes divide the partitions ([`super::ownership`]): a write of account data checks
    /// the partitions it touches ([`ownership::FENCE`](super::ownership::FENCE)) at the epochs this node holds them
    /// at ([`Shares`]); other writes (sessions, statistics, inbox marks) are not fenced.
    Partitions {
        node: i64,
        slot: u8,
        shares: Arc<Shares>,
    },
}

/// Every change of an account or a webhook bumps the registry's version in the same
/// transaction; nodes dividing the work read it a few times a second and take in the changes
/// ([`Storage::registry_version`]). Its row lock orders such changes between nodes.
/// `$1` is the account changed: the version goes into the registry's log of changes
/// (`kh_registry_change`, ten minutes of it, trimmed here) so that other nodes re-read only
/// that account. Returns the new version. Sent through [`registry_changed`].
const REGISTRY_CHANGED: &str = "WITH v AS (
       INSERT INTO kh_meta (name, value) VALUES ('registry_version', '1')
       ON CONFLICT (name) DO UPDATE SET value = (kh_meta.value::bigint + 1)::text, updated_at = now()
       RETURNING value::bigint AS version),
     trimmed AS (
       DELETE FROM kh_registry_change WHERE changed_at < now() - interval '10 minutes')
     INSERT INTO kh_registry_change (version, account_id) SELECT version, $1 FROM v
     RETURNING version::text";

/// The last statement of a write that changes `account` or one of its webhooks.
fn registry_changed(account: &AccountId) -> (&'static str, Params) {
    (REGISTRY_CHANGED, params![account.as_str().to_string()])
}

/// What a statement list is: a lone read, or a write touching these partitions (empty: none).
enum Mode {
    Read,
    Write(Vec<i16>),
}

/// A write refused before it reached the database: it touches a partition this node does not
/// hold (handed over, or never its own). Not a failure of the store: the caller's request is
/// another node's to serve.
pub fn not_held() -> StoreError {
    StoreError::new(
        StoreErrorKind::Moved,
        "this node does not hold the partition of that account (it is being handed over): try again",
    )
}

/// Whether this node holds `account`'s partition (serving or draining).
fn held(shares: &Shares, account: &AccountId) -> bool {
    shares
        .epoch(crate::partition::partition_of(account))
        .is_some()
}

impl Shared {
    /// A connection of the pool: a free one if any, else the next in turn; (re)connected if
    /// it has none or its connection ended.
    async fn conn(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Conn>>> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.slots.len();
        let mut guard = None;
        for i in 0..n {
            if let Ok(g) = self.slots[(start + i) % n].try_lock() {
                guard = Some(g);
                break;
            }
        }
        let mut guard = match guard {
            Some(g) => g,
            None => self.slots[start % n].lock().await,
        };
        if guard.as_ref().map_or(true, |c| c.client.is_closed()) {
            let client = self.target.connect().await.map_err(from_pg)?;
            *guard = Some(Conn {
                client,
                prepared: HashMap::new(),
            });
        }
        Ok(guard)
    }

    /// Runs `stmts` in order and returns each one's rows: a write in one transaction behind
    /// the lease's fence ([`lease::FENCE`]), a lone read as it is. A write's `BEGIN`, fence and
    /// statements go out as one pipeline (one round trip), then `COMMIT` if the fence held and
    /// every statement succeeded, else `ROLLBACK`: a drain of the delivery writer costs two
    /// round trips whatever its statements.
    async fn exec(&self, mode: Mode, stmts: Vec<(&'static str, Params)>) -> Result<Vec<Vec<Row>>> {
        // What the fence checks, decided before a connection is taken.
        // Divided: the partitions and epochs the fence checks, to tell a benign refusal from a
        // lost lease when it fails.
        let mut checked: Vec<(i16, i64)> = Vec::new();
        let fence_params: Option<(&'static str, Params, usize)> = match (&mode, &self.fencing) {
            (Mode::Read, _) => None,
            (Mode::Write(_), Fencing::Lease(held)) => {
                Some((lease::FENCE, params![held.owner, held.epoch], 1))
            }
            (Mode::Write(parts), Fencing::Partitions { node, shares, .. }) => {
                let mut parts = parts.clone();
                parts.sort_unstable();
                parts.dedup();
                let mut epochs = Vec::with_capacity(parts.len());
                for p in &parts {
                    match shares.stored_epoch(*p) {
                        Some(e) => epochs.push(e),
                        None => return Err(not_held()),
                    }
                }
                checked = parts.iter().copied().zip(epochs.iter().copied()).collect();
                let n = parts.len();
                (n > 0).then(|| (super::ownership::FENCE, params![parts, epochs, *node], n))
            }
        };
        let write = !matches!(mode, Mode::Read);
        let mut guard = self.conn().await?;
        let conn = guard.as_mut().expect("connected above");
        let fence = match &fence_params {
            Some((sql, _, _)) => Some(conn.prep(sql).await?),
            None => None,
        };
        let mut prepared = Vec::with_capacity(stmts.len());
        for (sql, _) in &stmts {
            prepared.push(conn.prep(sql).await?);
        }
        let params: Vec<Vec<&(dyn ToSql + Sync)>> = stmts.iter().map(|(_, p)| refs(p)).collect();
        let client = &conn.client;
        if !write {
            let mut out = Vec::with_capacity(stmts.len());
            for (st, p) in prepared.iter().zip(&params) {
                // A read PostgreSQL ended to break a deadlock (with DDL on the day tables)
                // changed nothing: it is read again.
                let mut tries = 0;
                let rows = loop {
                    match client.query(st, p).await {
                        Err(e)
                            if tries < 3
                                && e.code()
                                    == Some(
                                        &tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED,
                                    ) =>
                        {
                            tries += 1
                        }
                        done => break done.map_err(db)?,
                    }
                };
                out.push(rows);
            }
            return Ok(out);
        }
        let (fence_sql, fence_values, fence_rows) = match (&fence, &fence_params) {
            (Some(st), Some((_, values, rows))) => (Some(st), refs(values), *rows),
            _ => (None, Vec::new(), 0),
        };
        let fenced_query = async {
            match fence_sql {
                Some(st) => client.query(st, &fence_values).await,
                None => Ok(Vec::new()),
            }
        };
        let (begun, fenced, done) = tokio::join!(
            client.batch_execute("BEGIN"),
            fenced_query,
            futures_util::future::join_all(
                prepared
                    .iter()
                    .zip(&params)
                    .map(|(st, p)| client.query(st, p))
            ),
        );
        let outcome = (|| {
            begun.map_err(db)?;
            if fenced.map_err(db)?.len() < fence_rows {
                // A partition this node let go meanwhile (its write was slow to reach the
                // database, and the partition was released): the request is another node's
                // now. Anything else means this node was counted out.
                if let Fencing::Partitions { shares, .. } = &self.fencing {
                    let moved = checked
                        .iter()
                        .any(|(p, e)| shares.stored_epoch(*p) != Some(*e));
                    if moved {
                        return Err(not_held());
                    }
                }
                return Err(lease::fenced());
            }
            done.into_iter()
                .map(|r| r.map_err(db))
                .collect::<Result<Vec<Vec<Row>>>>()
        })();
        match outcome {
            Ok(out) => {
                client.batch_execute("COMMIT").await.map_err(db)?;
                Ok(out)
            }
            Err(e) => {
                if client.batch_execute("ROLLBACK").await.is_err() {
                    // Its state is unknown: the next call opens a new connection.
                    *guard = None;
                }
                Err(e)
            }
        }
    }

    /// Drops the day tables of `day` in one fenced transaction if nothing in them is owed or
    /// changed since `cutoff_ms` (checked under an exclusive lock on them, so no write slips in
    /// between); what went, or `None` when the day had to stay.
    async fn drop_day(&self, day: u64, cutoff_ms: u64) -> Result<Option<Purged>> {
        let (lo, hi) = schema::day_bounds(day);
        let cutoff = cutoff_ms as i64;
        let names = schema::DAY_PARTITIONED.map(|t| schema::day_table(t, day));
        let mut guard = self.conn().await?;
        let conn = guard.as_mut().expect("connected above");
        // One node drops days: the lease's holder, or in divided mode the owner of partition
        // 0 (two at once in a hand-over would only wait on each other's table lock).
        let lease_fence = match &self.fencing {
            Fencing::Lease(held) => Some((conn.prep(lease::FENCE).await?, held.owner, held.epoch)),
            Fencing::Partitions { .. } => None,
        };
        let client = &conn.client;
        let outcome = async {
            client
                .batch_execute("BEGIN; SET LOCAL lock_timeout = '2s'")
                .await
                .map_err(db)?;
            if let Some((fence, owner, epoch)) = &lease_fence {
                if client
                    .query(fence, &[owner, epoch])
                    .await
                    .map_err(db)?
                    .is_empty()
                {
                    return Err(lease::fenced());
                }
            }
            // The parents first, all three, before anything else: `DROP TABLE` of a day table
            // takes its parent's exclusive lock, and every query and write locks a parent
            // before its day tables. Holding a day table while waiting for its parent (as
            // locking the day tables first did) made a reader that had its parent and wanted
            // the day table the deadlock's victim (40P01, a 500 on a delivery listing). Now
            // this transaction is the one that waits first in any cycle, so PostgreSQL's
            // deadlock check (run by the longest waiter) ends it, never a reader; a day in use
            // is dropped at a later pass. Waiting queues writers behind it for at most
            // `lock_timeout`, once a day.
            if let Err(e) = client
                .batch_execute(&format!(
                    "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
                    schema::DAY_PARTITIONED.join(", ")
                ))
                .await
            {
                use tokio_postgres::error::SqlState;
                let gave_way = e.code().is_some_and(|c| {
                    *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::T_R_DEADLOCK_DETECTED
                });
                return if gave_way { Ok(None) } else { Err(db(e)) };
            }
            let row = client
                .query_one(
                    "SELECT (SELECT count(*) FROM kh_due WHERE seq >= $1 AND seq < $2)
                          + (SELECT count(*) FROM kh_inbox WHERE seq >= $1 AND seq < $2)
                          + (SELECT count(*) FROM kh_delivery WHERE seq >= $1 AND seq < $2
                               AND (status IN (0, 2) OR updated_ms >= $3)),
                            (SELECT count(*) FROM kh_delivery WHERE seq >= $1 AND seq < $2),
                            (SELECT count(*) FROM kh_attempt WHERE seq >= $1 AND seq < $2),
                            (SELECT count(*) FROM kh_event WHERE seq >= $1 AND seq < $2)",
                    &[&lo, &hi, &cutoff],
                )
                .await
                .map_err(db)?;
            if row.get::<_, i64>(0) > 0 {
                return Ok(None);
            }
            let gone = Purged {
                deliveries: row.get::<_, i64>(1) as usize,
                attempts: row.get::<_, i64>(2) as usize,
                events: row.get::<_, i64>(3) as usize,
            };
            client
                .execute(
                    "DELETE FROM kh_event_id WHERE seq >= $1 AND seq < $2",
                    &[&lo, &hi],
                )
                .await
                .map_err(db)?;
            client
                .batch_execute(&format!("DROP TABLE {}", names.join(", ")))
                .await
                .map_err(db)?;
            Ok(Some(gone))
        }
        .await;
        let end = if matches!(outcome, Ok(Some(_))) {
            "COMMIT"
        } else {
            "ROLLBACK"
        };
        if let Err(e) = client.batch_execute(end).await {
            *guard = None;
            return Err(db(e));
        }
        outcome
    }

    /// Marks the store unhealthy for good (the first failure is kept).
    fn fail(&self, e: &StoreError) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed.is_none() {
            tracing::error!(error = %e, "this node stops writing to the database: it stops serving, and its restart recovers from the database");
            *failed = Some(StoreError::new(
                StoreErrorKind::Unavailable,
                format!("the database store failed earlier: {e}"),
            ));
        }
    }
}

fn refs(params: &Params) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect()
}

/// The engine's storage on PostgreSQL (see the module doc).
pub struct PgStore {
    /// `Some` until drop, which shuts it down without waiting (drop may run on a tokio thread).
    rt: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
    sealer: Sealer,
    held: HeldDeliveries,
    live: crate::stats::live::Live,
    /// This process's id among the writers of `kh_stats` (a node incarnation).
    writer: i64,
    /// This process's statistics rows, as written (only it writes them).
    stats: Mutex<MyStats>,
    events: Mutex<Recent<u64, EventRecord>>,
    deliveries: Mutex<Recent<DeliveryId, DeliveryRecord>>,
    node: lease::Node,
    /// Registry versions this node's own writes made ([`Storage::registry_version`]).
    own_versions: Mutex<std::collections::BTreeSet<u64>>,
    /// Divided mode: the session that registered this node and holds its key, until the
    /// ownership loop takes it over ([`PgStore::divide`]).
    joined: Mutex<Option<Client>>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Bytes of event bodies the event cache keeps.
const EVENT_CACHE_BYTES: usize = 64 << 20;

/// Delivery records the delivery cache keeps.
const DELIVERY_CACHE_RECORDS: usize = 200_000;

/// Records this node wrote, by key, up to `cap` of `weigh`'s units (oldest out first). Only
/// this node writes while it holds the lease, and it puts a record here after its commit, so a
/// hit is what is stored; deletes empty the cache where records go (`forget`).
///
/// Two of them: events (every attempt of every delivery reads its event's body — ten round
/// trips for an event fanned out to ten webhooks) and delivery records (an attempt of a
/// written delivery — a retry, a backlog drained after the held window — reads its record,
/// and the writer reads it again to settle it).
struct Recent<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    weight: usize,
    cap: usize,
    weigh: fn(&V) -> usize,
}

impl<K: std::hash::Hash + Eq + Copy, V: Clone> Recent<K, V> {
    fn new(cap: usize, weigh: fn(&V) -> usize) -> Self {
        Recent {
            map: HashMap::new(),
            order: VecDeque::new(),
            weight: 0,
            cap,
            weigh,
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        self.map.get(key).cloned()
    }

    fn put(&mut self, key: K, value: &V) {
        let w = (self.weigh)(value);
        match self.map.insert(key, value.clone()) {
            Some(old) => self.weight = self.weight - (self.weigh)(&old) + w,
            None => {
                self.order.push_back(key);
                self.weight += w;
            }
        }
        while self.weight > self.cap {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.map.remove(&old) {
                self.weight -= (self.weigh)(&gone);
            }
        }
    }

    fn forget(&mut self, keep: impl Fn(&V) -> bool) {
        self.map.retain(|_, v| keep(v));
        let map = &self.map;
        self.order.retain(|k| map.contains_key(k));
        self.weight = self.map.values().map(self.weigh).sum();
    }
}

/// The statistics rows this process wrote, from hour `floor` on.
#[derive(Default)]
struct MyStats {
    rows: HashMap<(WebhookId, u64), Counts>,
    floor: u64,
}

/// Runs `fut` on `rt` and waits for it from any thread.
fn wait<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().ok()
}

impl PgStore {
    /// Connects, migrates, settles the secrets key, waits for the lease and opens the pool.
    /// Blocking; `waiting` hears once if another node holds the lease (this one then waits as
    /// a standby, see [`crate::standby`]).
    pub fn open(
        config: &Config,
        waiting: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> std::result::Result<PgStore, PgError> {
        Self::open_as(config, Joining::Lease(waiting))
    }

    /// Connects, migrates, settles the secrets key, registers this node and claims its
    /// writer slot, without the serve lease: nodes divide the partitions, and `shares` (which
    /// the ownership loop fills) fences this node's writes. Blocking.
    pub fn open_dividing(
        config: &Config,
        shares: Arc<Shares>,
    ) -> std::result::Result<PgStore, PgError> {
        Self::open_as(config, Joining::Divide(shares))
    }

    /// Notes the registry version a write of this node made (its last statement's row).
    fn note_own_change(&self, rows: &[Vec<Row>]) {
        let made = rows
            .last()
            .and_then(|r| r.first())
            .and_then(|r| r.get::<_, String>(0).parse::<u64>().ok());
        if let Some(v) = made {
            self.own_versions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(v);
        }
    }

    /// This node's id in `kh_node` (what the ownership loop registers it under).
    pub fn node_id(&self) -> i64 {
        self.node.id
    }

    /// Divided mode: starts the ownership loop ([`super::ownership::run`]) on the store's
    /// runtime, on the session that registered this node. `work` hears what the node gains,
    /// hands over and loses; the loop runs until `stop` turns true, then hands everything
    /// over. `None` when the store serves alone (the serve lease).
    ///
    /// Also returns what the node holds after each round (the first change: the first round).
    #[allow(clippy::type_complexity)]
    pub fn divide(
        &self,
        work: Arc<dyn super::ownership::PartitionWork>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Option<(
        tokio::task::JoinHandle<()>,
        tokio::sync::watch::Receiver<super::ownership::Owned>,
    )> {
        if !matches!(self.shared.fencing, Fencing::Partitions { .. }) {
            return None;
        }
        let client = self.joined.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (held, rounds) = tokio::sync::watch::channel(super::ownership::Owned::default());
        let task = self.rt().spawn(super::ownership::run(
            self.shared.target.clone(),
            self.node.id,
            self.node.name.clone(),
            self.node.lease,
            work,
            held,
            stop,
            client,
        ));
        Some((task, rounds))
    }

    fn open_as(config: &Config, joining: Joining) -> std::result::Result<PgStore, PgError> {
        let target = Target::from_config(config)?;
        let source =
            secrets::KeySource::from_env_or_file(config.storage.secrets_key_file.as_deref())
                .map_err(|e| PgError::Config(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kh-postgres")
            .enable_all()
            .build()
            .map_err(|e| PgError::Failed(format!("cannot start the database runtime: {e}")))?;
        let node = config.cluster.node_name();
        let data_dir = config.storage.path.clone();
        let shown = target.shown.clone();
        let t = target.clone();
        let n = node.clone();
        let (client, check, server) = wait(&rt, async move {
            let mut client = t.connect().await?;
            let (migrated, server) = schema::migrate(&mut client, &n, &t.shown).await?;
            let done = match migrated {
                schema::Migrated::Created => "created".to_string(),
                schema::Migrated::Upgraded(from) => format!("upgraded from version {from}"),
                schema::Migrated::UpToDate => "up to date".to_string(),
            };
            tracing::info!(database = %t.shown, node = %n, server = ?server, version = schema::CURRENT, "kyberhook schema {done}");
            let check: Option<String> = client
                .query_opt(
                    "SELECT value FROM kh_meta WHERE name = 'secrets_check'",
                    &[],
                )
                .await
                .map_err(|e| super::connect::classify(&e, &t.shown))?
                .map(|r| r.get(0));
            Ok::<_, PgError>((client, check, server))
        })
        .ok_or_else(|| PgError::Failed("the database runtime stopped".into()))??;
        let key = settle_key(&data_dir, &source, check.as_deref(), &shown)?;
        let sealer = Sealer::new(&key);
        if check.is_none() {
            let sealed = sealer.seal(SECRETS_CHECK, SECRETS_CHECK_CONTEXT);
            let s = shown.clone();
            let (client, stored) = wait(&rt, async move {
                let row = client
                    .query_one(
                        "INSERT INTO kh_meta (name, value) VALUES ('secrets_check', $1)
                         ON CONFLICT (name) DO UPDATE SET name = kh_meta.name
                         RETURNING value",
                        &[&sealed],
                    )
                    .await
                    .map_err(|e| super::connect::classify(&e, &s))?;
                Ok::<_, PgError>((client, row.get::<_, String>(0)))
            })
            .ok_or_else(|| PgError::Failed("the database runtime stopped".into()))??;
            // Another node may have stored its check first: ours must open it too.
            verify_check(&sealer, &stored, &shown)?;
            drop(client);
        } else {
            drop(client);
        }
        let me = lease::Node {
            id: random_i64(),
            name: node.clone(),
            advertise: config.cluster.advertise.clone(),
            lease: config.cluster.lease,
            server,
        };
        let slots = (0..CONNECTIONS)
            .map(|_| tokio::sync::Mutex::new(None))
            .collect();
        let joined = Mutex::new(None);
        let shared = match joining {
            Joining::Lease(waiting) => {
                let (t, n) = (target.clone(), me.clone());
                let (held, heartbeat, locked) =
                    wait(&rt, async move { lease::acquire(&t, &n, waiting).await })
                        .ok_or_else(|| PgError::Failed("the database runtime stopped".into()))??;
                let shared = Arc::new(Shared {
                    target: target.clone(),
                    slots,
                    next: AtomicUsize::new(0),
                    fencing: Fencing::Lease(held),
                    failed: Mutex::new(None),
                });
                let on_lost = shared.clone();
                rt.spawn(lease::heartbeat(
                    target,
                    me.clone(),
                    held,
                    heartbeat,
                    locked,
                    Arc::new(move |e: StoreError| on_lost.fail(&e)),
                ));
                shared
            }
            Joining::Divide(shares) => {
                let (t, n) = (target.clone(), me.clone());
                let (slot, client) = wait(&rt, async move { lease::join(&t, &n).await })
                    .ok_or_else(|| PgError::Failed("the database runtime stopped".into()))??;
                *joined.lock().unwrap_or_else(|p| p.into_inner()) = Some(client);
                Arc::new(Shared {
                    target,
                    slots,
                    next: AtomicUsize::new(0),
                    fencing: Fencing::Partitions {
                        node: me.id,
                        slot,
                        shares,
                    },
                    failed: Mutex::new(None),
                })
            }
        };
        Ok(PgStore {
            rt: Some(rt),
            shared,
            sealer,
            held: HeldDeliveries::default(),
            live: crate::stats::live::Live::default(),
            writer: random_i64(),
            stats: Mutex::new(MyStats::default()),
            events: Mutex::new(Recent::new(EVENT_CACHE_BYTES, |e| e.body.len())),
            deliveries: Mutex::new(Recent::new(DELIVERY_CACHE_RECORDS, |_| 1)),
            node: me,
            own_versions: Mutex::default(),
            joined,
        })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("the runtime lives until drop")
    }

    /// Runs a future on the store's runtime and waits for its result.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        wait(self.rt(), fut).unwrap_or_else(|| {
            Err(StoreError::new(
                StoreErrorKind::Internal,
                "the database runtime stopped",
            ))
        })
    }

    /// Reads with one statement.
    fn read(&self, sql: &'static str, params: Params) -> Result<Vec<Row>> {
        let shared = self.shared.clone();
        let mut rows =
            self.run(async move { shared.exec(Mode::Read, vec![(sql, params)]).await })?;
        Ok(rows.pop().unwrap_or_default())
    }

    /// Writes with these statements, in one transaction, fenced by the lease (one node
    /// serving) or not at all (nodes dividing the work: the write is not of one account's
    /// data); a failure makes the store unhealthy.
    fn write(&self, stmts: Vec<(&'static str, Params)>) -> Result<Vec<Vec<Row>>> {
        self.write_in(Vec::new(), stmts)
    }

    /// [`PgStore::write`] of account data of these partitions: fenced by them when nodes
    /// divide the work. A partition this node does not hold refuses the write before it is
    /// sent, and that does not make the store unhealthy.
    fn write_in(
        &self,
        partitions: Vec<i16>,
        stmts: Vec<(&'static str, Params)>,
    ) -> Result<Vec<Vec<Row>>> {
        if stmts.is_empty() {
            return Ok(Vec::new());
        }
        self.health()?;
        let shared = self.shared.clone();
        let done = self.run(async move { shared.exec(Mode::Write(partitions), stmts).await });
        if let Err(e) = &done {
            if e.kind() != StoreErrorKind::Moved {
                self.shared.fail(e);
            }
        }
        done
    }

    fn open_webhook(&self, bytes: &[u8]) -> Result<Webhook> {
        let stored = Webhook::decode(bytes)
            .map_err(|e| StoreError::new(StoreErrorKind::Internal, e.to_string()))?;
        self.sealer
            .open_webhook(stored)
            .map_err(|e| StoreError::new(StoreErrorKind::Operator, e.to_string()))
    }

    /// The statement that adds `attempts` to this process's statistics rows (merged here:
    /// only this process writes rows under its `writer`). Hours it no longer keeps in memory
    /// (more than two before the newest it counted) get a row of their own under a fresh
    /// writer id instead of overwriting the row it forgot; rows are summed on read.
    fn stats_statements(&self, attempts: &[AttemptStat]) -> Option<(&'static str, Params)> {
        if attempts.is_empty() {
            return None;
        }
        let mut mine = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let (mut hooks, mut hours, mut writers, mut records) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let late_writer = random_i64();
        for ((webhook, hour), add) in stats::aggregate(attempts) {
            let (writer, counts) = if hour < mine.floor {
                (late_writer, add)
            } else {
                let counts = mine.rows.entry((webhook, hour)).or_default();
                counts.merge(&add);
                (self.writer, counts.clone())
            };
            hooks.push(wh_key(webhook));
            hours.push(hour as i64);
            writers.push(writer);
            records.push(codec::encode(&counts));
        }
        let newest = mine.rows.keys().map(|(_, h)| *h).max().unwrap_or(0);
        let floor = newest.saturating_sub(2);
        if floor > mine.floor {
            mine.floor = floor;
            mine.rows.retain(|(_, h), _| *h >= floor);
        }
        Some((
            "INSERT INTO kh_stats (webhook_id, hour, writer, record)
             SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bytea[])
             ON CONFLICT (webhook_id, hour, writer) DO UPDATE SET record = excluded.record",
            params![hooks, hours, writers, records],
        ))
    }

    /// The name this node goes by (`cluster.node_name`).
    pub fn node(&self) -> &str {
        &self.node.name
    }
}

fn random_i64() -> i64 {
    let mut b = [0u8; 8];
    // No entropy at all is not a state the engine can run in (its ids come from it too).
    getrandom::fill(&mut b).expect("the system's random source");
    i64::from_le_bytes(b)
}

/// Whether `stored` (the database's check value) opens with `sealer`'s key.
fn verify_check(sealer: &Sealer, stored: &str, shown: &str) -> std::result::Result<(), PgError> {
    match sealer.open(stored, SECRETS_CHECK_CONTEXT) {
        Ok(v) if v == SECRETS_CHECK => Ok(()),
        _ => Err(PgError::Config(format!(
            "the secrets key does not open the webhook secrets in the database at {shown}: every node must use the same key (storage.secrets_key_file or KYBERHOOK_SECRETS_KEY)"
        ))),
    }
}

/// The key that seals secrets: the one given, or the data dir's key file — generated only
/// when the database has no secrets sealed yet (no check value).
fn settle_key(
    data_dir: &Path,
    source: &KeySource,
    check: Option<&str>,
    shown: &str,
) -> std::result::Result<SecretsKey, PgError> {
    let key = match source {
        KeySource::Given { key, .. } => key.clone(),
        KeySource::DataDir => {
            let file = data_dir.join(secrets::DATA_DIR_KEY_FILE);
            let origin = format!("the key file {:?}", file.display());
            if file.exists() {
                SecretsKey::read(&file, &origin).map_err(|e| PgError::Config(e.to_string()))?
            } else if check.is_some() {
                return Err(PgError::Config(format!(
                    "the webhook secrets in the database at {shown} are sealed but this node has no key: set storage.secrets_key_file or KYBERHOOK_SECRETS_KEY to the key the other nodes use"
                )));
            } else {
                std::fs::create_dir_all(data_dir).map_err(|e| {
                    PgError::Config(format!("storage.path {:?}: {e}", data_dir.display()))
                })?;
                let (key, generated) = SecretsKey::generate_into(&file, &origin)
                    .map_err(|e| PgError::Config(e.to_string()))?;
                if generated {
                    tracing::info!(file = %file.display(), "generated the key that seals webhook secrets (give the same key to every node)");
                }
                key
            }
        }
    };
    if let Some(stored) = check {
        verify_check(&Sealer::new(&key), stored, shown)?;
    }
    Ok(key)
}

/// The schedule, read back page by page in due order.
struct DueIter<'a> {
    store: &'a PgStore,
    /// Only these partitions' entries; `None`: all.
    partitions: Option<Vec<i16>>,
    after: (i64, i64, i64),
    buf: VecDeque<(u64, DeliveryId)>,
    done: bool,
}

impl Iterator for DueIter<'_> {
    type Item = Result<(u64, DeliveryId)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() && !self.done {
            let (d, s, w) = self.after;
            let read = match &self.partitions {
                None => self.store.read(
                    "SELECT due_ms, seq, webhook_id FROM kh_due
                     WHERE (due_ms, seq, webhook_id) > ($1, $2, $3)
                     ORDER BY due_ms, seq, webhook_id LIMIT $4",
                    params![d, s, w, DUE_PAGE],
                ),
                Some(parts) => self.store.read(
                    "SELECT due_ms, seq, webhook_id FROM kh_due
                     WHERE (due_ms, seq, webhook_id) > ($1, $2, $3)
                       AND partition_id = ANY($5::smallint[])
                     ORDER BY due_ms, seq, webhook_id LIMIT $4",
                    params![d, s, w, DUE_PAGE, parts.clone()],
                ),
            };
            let rows = match read {
                Ok(rows) => rows,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            self.done = (rows.len() as i64) < DUE_PAGE;
            for r in rows {
                let (d, s, w): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
                self.after = (d, s, w);
                self.buf.push_back((
                    d.max(0) as u64,
                    DeliveryId {
                        seq: s as u64,
                        webhook: wh_of(w),
                    },
                ));
            }
        }
        self.buf.pop_front().map(Ok)
    }
}

impl Storage for PgStore {
    fn make_durable(&self) -> Result<()> {
        // Every write committed before it returned.
        self.health()
    }

    fn health(&self) -> Result<()> {
        match &*self.shared.failed.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn release(&self) {
        let shared = self.shared.clone();
        let released = self.run(async move {
            let guard = shared.conn().await?;
            let conn = guard.as_ref().expect("connected");
            match &shared.fencing {
                Fencing::Lease(held) => lease::release(&conn.client, *held).await.map_err(db),
                // The ownership loop released the partitions.
                Fencing::Partitions { .. } => Ok(()),
            }
        });
        match released {
            Ok(()) => {
                tracing::info!(node = %self.node.name, "released the lease: a standby takes over at once")
            }
            Err(e) => {
                tracing::warn!(error = %e, "releasing the lease failed: a standby takes over when it expires")
            }
        }
    }

    fn cluster(&self) -> Result<Option<ClusterView>> {
        let rows = self.read(
            "SELECT n.name, n.advertise,
                    (SELECT count(*) FROM kh_partition p WHERE p.owner = n.node_id),
                    (extract(epoch FROM n.last_seen) * 1000)::bigint,
                    (l.owner IS NOT DISTINCT FROM n.node_id AND l.expires_at > now())
                      OR EXISTS (SELECT 1 FROM kh_partition p WHERE p.owner = n.node_id),
                    (SELECT partitions FROM kh_schema WHERE id = 1)
             FROM kh_node n CROSS JOIN kh_lease l
             WHERE n.last_seen > now() - $1::bigint * interval '3 millisecond'
             ORDER BY n.name, n.started_at",
            params![self.node.lease.as_millis().min(i64::MAX as u128) as i64],
        )?;
        let partitions = rows
            .first()
            .map_or(schema::PARTITIONS as u32, |r| r.get::<_, i16>(5) as u32);
        let nodes = rows
            .iter()
            .map(|r| NodeView {
                name: r.get(0),
                advertise: r.get(1),
                partitions: r.get::<_, i64>(2) as u32,
                last_seen_ms: r.get::<_, i64>(3).max(0) as u64,
                serving: r.get(4),
            })
            .collect();
        Ok(Some(ClusterView {
            backend: "postgres",
            partitions,
            nodes,
        }))
    }

    fn probe_write(&self) -> Result<()> {
        self.write(vec![(
            "INSERT INTO kh_meta (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = now()",
            params![
                format!("probe:{}", self.node.name),
                crate::clock::now_ms().to_string()
            ],
        )])
        .map(drop)
    }

    fn size_on_disk(&self) -> u64 {
        self.read("SELECT pg_database_size(current_database())", params![])
            .ok()
            .and_then(|rows| rows.first().map(|r| r.get::<_, i64>(0).max(0) as u64))
            .unwrap_or(0)
    }

    fn live(&self) -> &crate::stats::live::Live {
        &self.live
    }

    // ---- accounts and webhooks ----

    fn put_account(&self, account: &Account) -> Result<()> {
        // Not fenced: an account is created on any node (its partition's owner takes it in
        // through the registry's version); every later change is made by that owner.
        self.write(vec![
            (
                "INSERT INTO kh_account (account_id, partition_id, record) VALUES ($1, $2, $3)
                 ON CONFLICT (account_id) DO UPDATE SET record = excluded.record",
                params![
                    account.id.as_str().to_string(),
                    partition_of(&account.id),
                    codec::encode(account)
                ],
            ),
            registry_changed(&account.id),
        ])
        .map(|rows| self.note_own_change(&rows))
    }

    fn get_account(&self, id: &AccountId) -> Result<Option<Account>> {
        self.read(
            "SELECT record FROM kh_account WHERE account_id = $1",
            params![id.as_str().to_string()],
        )?
        .first()
        .map(|r| decode(r.get(0)))
        .transpose()
    }

    fn all_accounts(&self) -> Result<Vec<Account>> {
        self.read(
            "SELECT record FROM kh_account ORDER BY account_id",
            params![],
        )?
        .iter()
        .map(|r| decode(r.get(0)))
        .collect()
    }

    fn delete_account(&self, account: &Account) -> Result<()> {
        let id = || -> Params { params![account.id.as_str().to_string()] };
        self.write_in(
            vec![partition_of(&account.id)],
            vec![
            (
                "DELETE FROM kh_attempt a USING kh_delivery d
                 WHERE d.account_id = $1 AND a.seq = d.seq AND a.webhook_id = d.webhook_id",
                id(),
            ),
            (
                "DELETE FROM kh_due s USING kh_delivery d
                 WHERE d.account_id = $1 AND s.seq = d.seq AND s.webhook_id = d.webhook_id",
                id(),
            ),
            ("DELETE FROM kh_delivery WHERE account_id = $1", id()),
            (
                "DELETE FROM kh_stats WHERE webhook_id IN
                 (SELECT webhook_id FROM kh_webhook WHERE account_id = $1)",
                id(),
            ),
            ("DELETE FROM kh_webhook WHERE account_id = $1", id()),
            (
                "DELETE FROM kh_inbox i USING kh_event e WHERE e.account_id = $1 AND i.seq = e.seq",
                id(),
            ),
            ("DELETE FROM kh_event WHERE account_id = $1", id()),
            ("DELETE FROM kh_event_id WHERE account_id = $1", id()),
            ("DELETE FROM kh_account WHERE account_id = $1", id()),
            registry_changed(&account.id),
        ],
        )
        .map(|rows| self.note_own_change(&rows))?;
        let gone = &account.id;
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(|e| &e.account_id != gone);
        self.deliveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(|r| &r.account_id != gone);
        Ok(())
    }

    fn put_webhook(&self, hook: &Webhook) -> Result<()> {
        self.write_in(
            vec![partition_of(&hook.account_id)],
            vec![
                (
                    "INSERT INTO kh_webhook (webhook_id, account_id, partition_id, record)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (webhook_id) DO UPDATE SET record = excluded.record",
                    params![
                        wh_key(hook.id),
                        hook.account_id.as_str().to_string(),
                        partition_of(&hook.account_id),
                        codec::encode(&self.sealer.seal_webhook(hook))
                    ],
                ),
                registry_changed(&hook.account_id),
            ],
        )
        .map(|rows| self.note_own_change(&rows))
    }

    fn get_webhook(&self, account: &AccountId, id: WebhookId) -> Result<Option<Webhook>> {
        self.read(
            "SELECT record FROM kh_webhook WHERE webhook_id = $1 AND account_id = $2",
            params![wh_key(id), account.as_str().to_string()],
        )?
        .first()
        .map(|r| self.open_webhook(r.get(0)))
        .transpose()
    }

    fn webhooks_of(&self, account: &AccountId) -> Result<Vec<Webhook>> {
        self.read(
            "SELECT record FROM kh_webhook WHERE account_id = $1 ORDER BY webhook_id",
            params![account.as_str().to_string()],
        )?
        .iter()
        .map(|r| self.open_webhook(r.get(0)))
        .collect()
    }

    fn all_webhooks(&self) -> Result<Vec<Webhook>> {
        self.read(
            "SELECT record FROM kh_webhook ORDER BY account_id, webhook_id",
            params![],
        )?
        .iter()
        .map(|r| self.open_webhook(r.get(0)))
        .collect()
    }

    fn delete_webhook(&self, hook: &Webhook) -> Result<u64> {
        let id = || -> Params { params![wh_key(hook.id)] };
        let rows = self.write_in(
            vec![partition_of(&hook.account_id)],
            vec![
                (
                    "SELECT count(*) FROM kh_delivery WHERE webhook_id = $1 AND due_ms IS NOT NULL",
                    id(),
                ),
                (
                    "DELETE FROM kh_attempt a USING kh_delivery d
                 WHERE d.webhook_id = $1 AND a.seq = d.seq AND a.webhook_id = d.webhook_id",
                    id(),
                ),
                ("DELETE FROM kh_due WHERE webhook_id = $1", id()),
                ("DELETE FROM kh_delivery WHERE webhook_id = $1", id()),
                ("DELETE FROM kh_stats WHERE webhook_id = $1", id()),
                ("DELETE FROM kh_webhook WHERE webhook_id = $1", id()),
                registry_changed(&hook.account_id),
            ],
        )?;
        self.note_own_change(&rows);
        self.deliveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(|r| r.id.webhook != hook.id);
        Ok(rows
            .first()
            .and_then(|r| r.first())
            .map_or(0, |r| r.get::<_, i64>(0).max(0) as u64))
    }

    // ---- events ----

    fn registry_version(&self, seen: Option<u64>) -> Result<Option<(u64, bool)>> {
        let now: u64 = self
            .read(
                "SELECT value FROM kh_meta WHERE name = 'registry_version'",
                params![],
            )?
            .first()
            .and_then(|r| r.get::<_, String>(0).parse().ok())
            .unwrap_or(0);
        let mut own = self.own_versions.lock().unwrap_or_else(|p| p.into_inner());
        // Another node's change: a version since `seen` that none of this node's writes made.
        let elsewhere = match seen {
            None => true,
            Some(seen) => (seen.saturating_add(1)..=now).any(|v| !own.contains(&v)),
        };
        own.retain(|v| *v > now);
        Ok(Some((now, elsewhere)))
    }

    fn registry_changes(&self, since: u64, now: u64) -> Result<Option<Vec<AccountId>>> {
        if now <= since {
            return Ok(Some(Vec::new()));
        }
        let rows = self.read(
            "SELECT version, account_id FROM kh_registry_change
             WHERE version > $1 AND version <= $2 ORDER BY version",
            params![since as i64, now as i64],
        )?;
        // Every version of the range, or the log does not reach back (trimmed, or written
        // before this schema): the caller re-reads everything then.
        if rows.len() as u64 != now - since {
            return Ok(None);
        }
        // Ten minutes of changes can be many rows: each account once, in the order of its
        // first change, without a quadratic search.
        let mut seen = std::collections::HashSet::new();
        let mut accounts: Vec<AccountId> = Vec::new();
        for r in &rows {
            let text: String = r.get(1);
            let id = AccountId::parse(&text).ok_or_else(|| {
                StoreError::new(
                    StoreErrorKind::Internal,
                    format!("the registry's log names an invalid account id {text:?}"),
                )
            })?;
            if seen.insert(id.clone()) {
                accounts.push(id);
            }
        }
        Ok(Some(accounts))
    }

    fn partitions_moved(&self) {
        self.deliveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(|_| false);
    }

    fn writer_slot(&self) -> Option<u8> {
        Some(match &self.shared.fencing {
            Fencing::Lease(held) => held.slot,
            Fencing::Partitions { slot, .. } => *slot,
        })
    }

    fn last_seq(&self) -> Result<u64> {
        let rows = self.read(
            "SELECT GREATEST((SELECT max(seq) FROM kh_event), (SELECT max(seq) FROM kh_delivery))",
            params![],
        )?;
        Ok(rows
            .first()
            .and_then(|r| r.get::<_, Option<i64>>(0))
            .map_or(0, |s| s.max(0) as u64))
    }

    fn event_seq(&self, account: &AccountId, event_id: &str) -> Result<Option<u64>> {
        if let Some(seq) = ids::EventId::minted_seq(event_id) {
            if let Some(event) = self.get_event(seq)? {
                if &event.account_id == account && event.id.as_str() == event_id {
                    return Ok(Some(seq));
                }
            }
        }
        Ok(self
            .read(
                "SELECT seq FROM kh_event_id WHERE account_id = $1 AND event_id = $2",
                params![account.as_str().to_string(), event_id.to_string()],
            )?
            .first()
            .map(|r| r.get::<_, i64>(0) as u64))
    }

    fn events_known(&self, ids: &[(&AccountId, &str)]) -> Result<Vec<bool>> {
        let mut known = vec![false; ids.len()];
        let (mut accounts, mut events, mut at) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (account, id)) in ids.iter().enumerate() {
            // An id shaped like a minted one is found through its sequence number; the rest
            // in `kh_event_id`, all in one query below.
            if ids::EventId::minted_seq(id).is_some() {
                known[i] = self.event_seq(account, id)?.is_some();
            } else {
                accounts.push(account.as_str().to_string());
                events.push(id.to_string());
                at.push(i as i64);
            }
        }
        if at.is_empty() {
            return Ok(known);
        }
        let rows = self.read(
            "SELECT k.i FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS k(a, e, i)
             JOIN kh_event_id x ON x.account_id = k.a AND x.event_id = k.e",
            params![accounts, events, at],
        )?;
        for r in rows {
            if let Some(k) = known.get_mut(r.get::<_, i64>(0) as usize) {
                *k = true;
            }
        }
        Ok(known)
    }

    fn append_events(&self, events: &[EventRecord]) -> Result<()> {
        self.append_events_owing(events, &vec![true; events.len()])
    }

    fn append_events_owing(&self, events: &[EventRecord], owes_fanout: &[bool]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let (mut seqs, mut parts, mut accounts, mut records) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut id_accounts, mut id_events, mut id_seqs) = (Vec::new(), Vec::new(), Vec::new());
        let (mut inbox, mut inbox_parts) = (Vec::new(), Vec::new());
        for (i, e) in events.iter().enumerate() {
            let part = partition_of(&e.account_id);
            seqs.push(seq_key(e.seq));
            parts.push(part);
            accounts.push(e.account_id.as_str().to_string());
            records.push(codec::encode(e));
            if !e.id.is_minted_for(e.seq) {
                id_accounts.push(e.account_id.as_str().to_string());
                id_events.push(e.id.as_str().to_string());
                id_seqs.push(seq_key(e.seq));
            }
            if owes_fanout.get(i).copied().unwrap_or(true) {
                inbox.push(seq_key(e.seq));
                inbox_parts.push(part);
            }
        }
        let mut stmts: Vec<(&'static str, Params)> = vec![(
            "INSERT INTO kh_event (seq, partition_id, account_id, record)
             SELECT * FROM UNNEST($1::bigint[], $2::smallint[], $3::text[], $4::bytea[])
             ON CONFLICT DO NOTHING",
            params![seqs, parts, accounts, records],
        )];
        if !id_seqs.is_empty() {
            stmts.push((
                "INSERT INTO kh_event_id (account_id, event_id, seq)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[])
                 ON CONFLICT DO NOTHING",
                params![id_accounts, id_events, id_seqs],
            ));
        }
        if !inbox.is_empty() {
            stmts.push((
                "INSERT INTO kh_inbox (seq, partition_id)
                 SELECT * FROM UNNEST($1::bigint[], $2::smallint[]) ON CONFLICT DO NOTHING",
                params![inbox, inbox_parts],
            ));
        }
        let touched: Vec<i16> = events.iter().map(|e| partition_of(&e.account_id)).collect();
        self.write_in(touched, stmts)?;
        let mut cache = self.events.lock().unwrap_or_else(|p| p.into_inner());
        for e in events {
            cache.put(e.seq, e);
        }
        drop(cache);
        self.live
            .add_events(crate::clock::now_ms(), events.len() as u64);
        Ok(())
    }

    fn get_event(&self, seq: u64) -> Result<Option<EventRecord>> {
        if let Some(e) = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&seq)
        {
            return Ok(Some(e));
        }
        let event: Option<EventRecord> = self
            .read(
                "SELECT record FROM kh_event WHERE seq = $1",
                params![seq_key(seq)],
            )?
            .first()
            .map(|r| decode(r.get(0)))
            .transpose()?;
        if let Some(e) = &event {
            self.events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .put(seq, e);
        }
        Ok(event)
    }

    fn inbox(&self) -> Result<Vec<u64>> {
        Ok(self
            .read("SELECT seq FROM kh_inbox ORDER BY seq", params![])?
            .iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect())
    }

    fn inbox_in(&self, partitions: &[Partition]) -> Result<Vec<u64>> {
        let parts: Vec<i16> = partitions.iter().map(|p| p.get() as i16).collect();
        Ok(self
            .read(
                "SELECT seq FROM kh_inbox WHERE partition_id = ANY($1::smallint[]) ORDER BY seq",
                params![parts],
            )?
            .iter()
            .map(|r| r.get::<_, i64>(0) as u64)
            .collect())
    }

    fn clear_inbox(&self, seqs: &[u64]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let seqs: Vec<i64> = seqs.iter().map(|s| seq_key(*s)).collect();
        self.write(vec![(
            "DELETE FROM kh_inbox WHERE seq = ANY($1::bigint[])",
            params![seqs],
        )])
        .map(drop)
    }

    // ---- deliveries ----

    fn get_delivery(&self, id: DeliveryId) -> Result<Option<DeliveryRecord>> {
        if let Some(held) = self.held.get(id) {
            return Ok(Some(held));
        }
        if let Some(r) = self
            .deliveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(Some(r));
        }
        let record: Option<DeliveryRecord> = self
            .read(
                "SELECT record FROM kh_delivery WHERE seq = $1 AND webhook_id = $2",
                params![seq_key(id.seq), wh_key(id.webhook)],
            )?
            .first()
            .map(|r| decode(r.get(0)))
            .transpose()?;
        Ok(record)
    }

    fn attempts(&self, id: DeliveryId) -> Result<Vec<AttemptRecord>> {
        self.read(
            "SELECT record FROM kh_attempt WHERE seq = $1 AND webhook_id = $2 ORDER BY attempt_no",
            params![seq_key(id.seq), wh_key(id.webhook)],
        )?
        .iter()
        .map(|r| decode(r.get(0)))
        .collect()
    }

    fn scheduled(&self) -> Box<dyn Iterator<Item = Result<(u64, DeliveryId)>> + '_> {
        Box::new(DueIter {
            store: self,
            partitions: None,
            after: (i64::MIN, i64::MIN, i64::MIN),
            buf: VecDeque::new(),
            done: false,
        })
    }

    fn scheduled_in(
        &self,
        partitions: &[Partition],
    ) -> Box<dyn Iterator<Item = Result<(u64, DeliveryId)>> + '_> {
        Box::new(DueIter {
            store: self,
            partitions: Some(partitions.iter().map(|p| p.get() as i16).collect()),
            after: (i64::MIN, i64::MIN, i64::MIN),
            buf: VecDeque::new(),
            done: false,
        })
    }

    fn earliest_due_ms(&self) -> Result<Option<u64>> {
        Ok(self
            .read("SELECT min(due_ms) FROM kh_due", params![])?
            .first()
            .and_then(|r| r.get::<_, Option<i64>>(0))
            .map(|d| d.max(0) as u64))
    }

    fn list_deliveries(&self, account: &AccountId, q: &DeliveryQuery) -> Result<DeliveryPage> {
        let mut lo = q.since_ms.map_or(0, ids::seq_floor);
        let mut hi = q
            .until_ms
            .map_or(u64::MAX, |u| ids::seq_floor(u.saturating_add(1)));
        if let Some(seq) = q.event_seq {
            lo = lo.max(seq);
            hi = hi.min(seq.saturating_add(1));
        }
        let mut items = Vec::new();
        if lo >= hi || q.limit == 0 {
            return Ok(DeliveryPage {
                items,
                next_cursor: None,
            });
        }
        let (c_seq, c_wh) = q.cursor.map_or((i64::MAX, i64::MAX), |c| {
            (seq_key(c.seq), wh_key(c.webhook))
        });
        let status = q.status.map(status_code);
        let event = q.event.clone();
        let limit = q.limit as i64 + 1;
        let base = params![
            account.as_str().to_string(),
            seq_key(lo),
            seq_key(hi),
            c_seq,
            c_wh,
            status,
            event,
            limit
        ];
        let rows = match q.webhook {
            Some(wh) => {
                let mut p = base;
                p.push(Box::new(wh_key(wh)));
                self.read(
                    "SELECT record FROM kh_delivery
                     WHERE webhook_id = $9 AND account_id = $1 AND seq >= $2 AND seq < $3
                       AND (seq, webhook_id) < ($4, $5)
                       AND ($6::smallint IS NULL OR status = $6)
                       AND ($7::text IS NULL OR event_type = $7)
                     ORDER BY seq DESC, webhook_id DESC LIMIT $8",
                    p,
                )?
            }
            None => self.read(
                "SELECT record FROM kh_delivery
                 WHERE account_id = $1 AND seq >= $2 AND seq < $3
                   AND (seq, webhook_id) < ($4, $5)
                   AND ($6::smallint IS NULL OR status = $6)
                   AND ($7::text IS NULL OR event_type = $7)
                 ORDER BY seq DESC, webhook_id DESC LIMIT $8",
                base,
            )?,
        };
        // Held deliveries (not written yet) are merged in, each id once, the held copy first.
        let in_page = |r: &DeliveryRecord| {
            r.account_id == *account
                && q.webhook.map_or(true, |wh| r.id.webhook == wh)
                && r.id.seq >= lo
                && r.id.seq < hi
                && q.cursor.map_or(true, |c| r.id.to_bytes() < c.to_bytes())
                && q.status.map_or(true, |s| s == r.status)
                && q.event.as_ref().map_or(true, |e| *e == r.event)
        };
        let mut merged: std::collections::BTreeMap<[u8; 16], DeliveryRecord> = self
            .held
            .matching(in_page)
            .into_iter()
            .map(|r| (r.id.to_bytes(), r))
            .collect();
        for row in rows {
            let record: DeliveryRecord = decode(row.get(0))?;
            merged.entry(record.id.to_bytes()).or_insert(record);
        }
        let mut next_cursor = None;
        for (_, record) in merged.into_iter().rev() {
            if items.len() == q.limit {
                next_cursor = items.last().map(|r: &DeliveryRecord| r.id);
                break;
            }
            items.push(record);
        }
        Ok(DeliveryPage { items, next_cursor })
    }

    fn webhook_deliveries(
        &self,
        webhook: WebhookId,
        keep: &dyn Fn(&DeliveryRecord) -> bool,
    ) -> Result<Vec<DeliveryRecord>> {
        let mut out: std::collections::BTreeMap<[u8; 16], DeliveryRecord> = self
            .held
            .matching(|r| r.id.webhook == webhook && keep(r))
            .into_iter()
            .map(|r| (r.id.to_bytes(), r))
            .collect();
        for row in self.read(
            "SELECT record FROM kh_delivery WHERE webhook_id = $1 ORDER BY seq",
            params![wh_key(webhook)],
        )? {
            let record: DeliveryRecord = decode(row.get(0))?;
            let id = record.id;
            if self.held.contains(id) || !keep(&record) {
                continue;
            }
            out.entry(id.to_bytes()).or_insert(record);
        }
        Ok(out.into_values().collect())
    }

    fn apply_delivery_writes(&self, w: &DeliveryWrites) -> Result<()> {
        // Divided: what concerns partitions this node let go is not its to write (the next
        // owner works from what is stored), and must not fail the rest of the drain.
        let filtered;
        let w = match &self.shared.fencing {
            Fencing::Partitions { shares, .. }
                if w.deliveries.iter().any(|r| !held(shares, &r.account_id))
                    || w.indexed.iter().any(|(a, _)| !held(shares, a)) =>
            {
                filtered = w.retain_accounts(|a| held(shares, a));
                &filtered
            }
            _ => w,
        };
        let mut touched: Vec<i16> = w
            .deliveries
            .iter()
            .map(|r| partition_of(&r.account_id))
            .chain(w.indexed.iter().map(|(a, _)| partition_of(a)))
            .collect();
        touched.sort_unstable();
        touched.dedup();
        let mut stmts: Vec<(&'static str, Params)> = Vec::new();
        if !w.schedule_insert.is_empty() {
            let (mut due, mut seq, mut wh, mut part) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let accounts: HashMap<DeliveryId, &AccountId> =
                w.deliveries.iter().map(|r| (r.id, &r.account_id)).collect();
            for (d, id) in &w.schedule_insert {
                due.push(seq_key(*d));
                seq.push(seq_key(id.seq));
                wh.push(wh_key(id.webhook));
                part.push(accounts.get(id).map_or(0, |a| partition_of(a)));
            }
            stmts.push((
                "INSERT INTO kh_due (due_ms, seq, webhook_id, partition_id)
                 SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::smallint[])
                 ON CONFLICT DO NOTHING",
                params![due, seq, wh, part],
            ));
        }
        if !w.attempts.is_empty() {
            // One row per key: a later attempt record of the same number replaces an earlier.
            let mut last: HashMap<(DeliveryId, u32), &AttemptRecord> = HashMap::new();
            for (id, a) in &w.attempts {
                last.insert((*id, a.number), a);
            }
            let (mut seq, mut wh, mut no, mut rec) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut d_seq, mut d_wh, mut d_lo, mut d_hi) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((id, number), a) in last {
                seq.push(seq_key(id.seq));
                wh.push(wh_key(id.webhook));
                no.push(number as i32);
                rec.push(codec::encode(a));
                // Only the first and the latest attempts are kept (`crate::history`).
                if let Some(dropped) = crate::history::dropped_by(number) {
                    d_seq.push(seq_key(id.seq));
                    d_wh.push(wh_key(id.webhook));
                    d_lo.push(dropped.start as i32);
                    d_hi.push(dropped.end as i32);
                }
            }
            stmts.push((
                "INSERT INTO kh_attempt (seq, webhook_id, attempt_no, record)
                 SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::int[], $4::bytea[])
                 ON CONFLICT (seq, webhook_id, attempt_no) DO UPDATE SET record = excluded.record",
                params![seq, wh, no, rec],
            ));
            if !d_seq.is_empty() {
                stmts.push((
                    "DELETE FROM kh_attempt a
                     USING UNNEST($1::bigint[], $2::bigint[], $3::int[], $4::int[]) AS d(seq, wh, lo, hi)
                     WHERE a.seq = d.seq AND a.webhook_id = d.wh
                       AND a.attempt_no >= d.lo AND a.attempt_no < d.hi",
                    params![d_seq, d_wh, d_lo, d_hi],
                ));
            }
        }
        if !w.deliveries.is_empty() {
            let mut last: HashMap<DeliveryId, &DeliveryRecord> = HashMap::new();
            for r in &w.deliveries {
                last.insert(r.id, r);
            }
            let mut cols = (
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
            );
            for r in last.into_values() {
                cols.0.push(seq_key(r.id.seq));
                cols.1.push(wh_key(r.id.webhook));
                cols.2.push(r.account_id.as_str().to_string());
                cols.3.push(partition_of(&r.account_id));
                cols.4.push(status_code(r.status));
                cols.5.push(r.event.clone());
                cols.6.push(seq_key(r.updated_ms));
                cols.7.push(r.next_attempt_ms.map(seq_key));
                cols.8.push(codec::encode(r));
            }
            stmts.push((
                "INSERT INTO kh_delivery
                   (seq, webhook_id, account_id, partition_id, status, event_type, updated_ms, due_ms, record)
                 SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::smallint[],
                   $5::smallint[], $6::text[], $7::bigint[], $8::bigint[], $9::bytea[])
                 ON CONFLICT (seq, webhook_id) DO UPDATE SET status = excluded.status,
                   updated_ms = excluded.updated_ms, due_ms = excluded.due_ms,
                   record = excluded.record",
                params![cols.0, cols.1, cols.2, cols.3, cols.4, cols.5, cols.6, cols.7, cols.8],
            ));
        }
        if !w.schedule_remove.is_empty() {
            let (mut due, mut seq, mut wh) = (Vec::new(), Vec::new(), Vec::new());
            for (d, id) in &w.schedule_remove {
                due.push(seq_key(*d));
                seq.push(seq_key(id.seq));
                wh.push(wh_key(id.webhook));
            }
            stmts.push((
                "DELETE FROM kh_due s
                 USING UNNEST($1::bigint[], $2::bigint[], $3::bigint[]) AS r(due, seq, wh)
                 WHERE s.due_ms = r.due AND s.seq = r.seq AND s.webhook_id = r.wh",
                params![due, seq, wh],
            ));
        }
        stmts.extend(self.stats_statements(&w.stats));
        self.write_in(touched, stmts)?;
        let mut cache = self.deliveries.lock().unwrap_or_else(|p| p.into_inner());
        for r in &w.deliveries {
            cache.put(r.id, r);
        }
        drop(cache);
        self.live.count(&w.stats);
        Ok(())
    }

    // ---- held deliveries ----

    fn is_held(&self, id: DeliveryId) -> bool {
        self.held.contains(id)
    }
    fn held_delivery(&self, id: DeliveryId) -> Option<DeliveryRecord> {
        self.held.get(id)
    }
    fn hold_delivery(&self, record: DeliveryRecord) {
        self.held.put(record)
    }
    fn release_held(&self, id: DeliveryId) -> Option<DeliveryRecord> {
        self.held.take(id)
    }

    // ---- statistics and sessions ----

    fn add_stats(&self, attempts: &[AttemptStat]) -> Result<()> {
        self.write(self.stats_statements(attempts).into_iter().collect())?;
        self.live.count(attempts);
        Ok(())
    }

    fn webhook_stats(&self, webhook: WebhookId, first_hour: u64) -> Result<Vec<(u64, Counts)>> {
        let mut by_hour: std::collections::BTreeMap<u64, Counts> = Default::default();
        for row in self.read(
            "SELECT hour, record FROM kh_stats WHERE webhook_id = $1 AND hour >= $2",
            params![wh_key(webhook), seq_key(first_hour)],
        )? {
            let counts: Counts = decode(row.get(1))?;
            by_hour
                .entry(row.get::<_, i64>(0).max(0) as u64)
                .or_default()
                .merge(&counts);
        }
        Ok(by_hour.into_iter().collect())
    }

    fn put_session(&self, key: &[u8; 32], session: &str) -> Result<()> {
        let mut context = SESSION_CONTEXT.to_vec();
        context.extend_from_slice(key);
        let sealed = self.sealer.seal(session, &context);
        self.write(vec![(
            "INSERT INTO kh_session (token_hash, sealed) VALUES ($1, $2)
             ON CONFLICT (token_hash) DO UPDATE SET sealed = excluded.sealed",
            params![key.to_vec(), sealed],
        )])
        .map(drop)
    }

    fn remove_session(&self, key: &[u8; 32]) -> Result<()> {
        self.write(vec![(
            "DELETE FROM kh_session WHERE token_hash = $1",
            params![key.to_vec()],
        )])
        .map(drop)
    }

    fn sessions(&self) -> Result<Vec<([u8; 32], String)>> {
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        for row in self.read("SELECT token_hash, sealed FROM kh_session", params![])? {
            let raw: Vec<u8> = row.get(0);
            let sealed: String = row.get(1);
            let opened = <[u8; 32]>::try_from(raw.as_slice()).ok().and_then(|key| {
                let mut context = SESSION_CONTEXT.to_vec();
                context.extend_from_slice(&key);
                Some((key, self.sealer.open(&sealed, &context).ok()?))
            });
            match opened {
                Some(s) => out.push(s),
                None => damaged.push(raw),
            }
        }
        if !damaged.is_empty() {
            self.write(vec![(
                "DELETE FROM kh_session WHERE token_hash = ANY($1::bytea[])",
                params![damaged],
            )])?;
        }
        Ok(out)
    }

    fn session(&self, key: &[u8; 32]) -> Result<Option<String>> {
        let rows = self.read(
            "SELECT sealed FROM kh_session WHERE token_hash = $1",
            params![key.to_vec()],
        )?;
        let mut context = SESSION_CONTEXT.to_vec();
        context.extend_from_slice(key);
        Ok(rows
            .first()
            .and_then(|r| self.sealer.open(&r.get::<_, String>(0), &context).ok()))
    }

    fn shares_sessions(&self) -> bool {
        matches!(self.shared.fencing, Fencing::Partitions { .. })
    }

    // ---- retention ----

    fn drop_ended_days(&self, cutoff_ms: u64) -> Result<Purged> {
        self.health()?;
        let floor = ids::seq_floor(cutoff_ms) as i64;
        let tables = self.read(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'kh_event'::regclass",
            params![],
        )?;
        let mut days: Vec<u64> = tables
            .iter()
            .filter_map(|r| schema::day_of_table("kh_event", &r.get::<_, String>(0)))
            .filter(|&day| schema::day_bounds(day).1 <= floor)
            .collect();
        days.sort_unstable();
        let mut purged = Purged::default();
        for day in days {
            let shared = self.shared.clone();
            match self.run(async move { shared.drop_day(day, cutoff_ms).await }) {
                Ok(Some(gone)) => {
                    tracing::info!(
                        day = %schema::day_table("", day).trim_start_matches("_d"),
                        deliveries = gone.deliveries,
                        events = gone.events,
                        "retention dropped a day of history"
                    );
                    purged.deliveries += gone.deliveries;
                    purged.attempts += gone.attempts;
                    purged.events += gone.events;
                    let (lo, hi) = schema::day_bounds(day);
                    let outside = |seq: u64| (seq as i64) < lo || (seq as i64) >= hi;
                    self.events
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .forget(|e| outside(e.seq));
                    self.deliveries
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .forget(|r| outside(r.id.seq));
                }
                // Something in it is still owed: its rows go one by one as they end.
                Ok(None) => {}
                Err(e) if e.kind() == StoreErrorKind::Operator => return Err(e),
                Err(e) => {
                    // A lock not had in time, a fence lost (the next write fails on it too):
                    // the row-by-row pass does the work instead.
                    tracing::warn!(error = %e, "a day of history could not be dropped; its rows are purged one by one");
                    break;
                }
            }
        }
        Ok(purged)
    }

    fn plan_purge(&self, cutoff_ms: u64, after: Option<&PurgeCursor>) -> Result<PurgePlan> {
        let (a_seq, a_wh) = after
            .and_then(|c| DeliveryId::from_bytes(&c.0))
            .map_or((i64::MIN, i64::MIN), |id| {
                (seq_key(id.seq), wh_key(id.webhook))
            });
        let rows = self.read(
            "SELECT seq, webhook_id, record FROM kh_delivery
             WHERE (seq, webhook_id) > ($1, $2) AND seq < $3
             ORDER BY seq, webhook_id LIMIT $4",
            params![a_seq, a_wh, seq_key(ids::seq_floor(cutoff_ms)), PURGE_BATCH],
        )?;
        let mut plan = PurgePlan::default();
        for row in rows {
            let id = DeliveryId {
                seq: row.get::<_, i64>(0) as u64,
                webhook: wh_of(row.get(1)),
            };
            plan.next = Some(PurgeCursor(id.to_bytes().to_vec()));
            let value: Vec<u8> = row.get(2);
            let record: DeliveryRecord = decode(&value)?;
            if record.status.is_open() || record.updated_ms >= cutoff_ms {
                continue;
            }
            plan.candidates.push(PurgeCandidate {
                id,
                due: record.next_attempt_ms,
                value,
                attempts: Vec::new(),
            });
        }
        Ok(plan)
    }

    fn apply_purge(&self, plan: &PurgePlan) -> Result<PurgedBatch> {
        if plan.candidates.is_empty() {
            return Ok(PurgedBatch::default());
        }
        let (mut seq, mut wh, mut rec) = (Vec::new(), Vec::new(), Vec::new());
        for c in &plan.candidates {
            seq.push(seq_key(c.id.seq));
            wh.push(wh_key(c.id.webhook));
            rec.push(c.value.clone());
        }
        // One statement: only rows still stored exactly as planned go, with their attempts
        // and any schedule entry.
        let rows = self.write(vec![(
            "WITH c AS (SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bytea[]) AS c(seq, wh, rec)),
             d AS (DELETE FROM kh_delivery d USING c
                   WHERE d.seq = c.seq AND d.webhook_id = c.wh AND d.record = c.rec
                   RETURNING d.seq, d.webhook_id, d.due_ms),
             a AS (DELETE FROM kh_attempt a USING d
                   WHERE a.seq = d.seq AND a.webhook_id = d.webhook_id RETURNING 1),
             s AS (DELETE FROM kh_due s USING d
                   WHERE s.due_ms = d.due_ms AND s.seq = d.seq AND s.webhook_id = d.webhook_id
                   RETURNING 1)
             SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM a), (SELECT count(*) FROM s)",
            params![seq, wh, rec],
        )])?;
        let row = rows
            .first()
            .and_then(|r| r.first())
            .ok_or_else(|| StoreError::new(StoreErrorKind::Internal, "no purge counts"))?;
        let deliveries = row.get::<_, i64>(0) as usize;
        // Kept ones are read back on their next use.
        let planned: HashSet<DeliveryId> = plan.candidates.iter().map(|c| c.id).collect();
        self.deliveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(|r| !planned.contains(&r.id));
        Ok(PurgedBatch {
            deliveries,
            attempts: row.get::<_, i64>(1) as usize,
            kept: plan.candidates.len().saturating_sub(deliveries),
        })
    }

    fn purge_events(
        &self,
        cutoff_ms: u64,
        after: Option<&PurgeCursor>,
    ) -> Result<(usize, Option<PurgeCursor>)> {
        let after = after
            .and_then(|c| c.0.get(..8))
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(i64::MIN, i64::from_be_bytes);
        let rows = self.write(vec![(
            "WITH batch AS (SELECT seq FROM kh_event WHERE seq > $1 AND seq < $2
                            ORDER BY seq LIMIT $3),
             gone AS (DELETE FROM kh_event e USING batch b
                      WHERE e.seq = b.seq
                        AND NOT EXISTS (SELECT 1 FROM kh_inbox i WHERE i.seq = e.seq)
                        AND NOT EXISTS (SELECT 1 FROM kh_delivery d WHERE d.seq = e.seq)
                      RETURNING e.seq),
             ids AS (DELETE FROM kh_event_id x USING gone g WHERE x.seq = g.seq RETURNING 1)
             SELECT (SELECT count(*) FROM gone), (SELECT max(seq) FROM batch)",
            params![after, seq_key(ids::seq_floor(cutoff_ms)), PURGE_BATCH],
        )])?;
        let row = rows
            .first()
            .and_then(|r| r.first())
            .ok_or_else(|| StoreError::new(StoreErrorKind::Internal, "no purge counts"))?;
        let gone = row.get::<_, i64>(0) as usize;
        if gone > 0 {
            let floor = ids::seq_floor(cutoff_ms);
            self.events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .forget(|e| e.seq >= floor);
        }
        let next = row
            .get::<_, Option<i64>>(1)
            .map(|s| PurgeCursor(s.to_be_bytes().to_vec()));
        Ok((gone, next))
    }

    fn purge_stats_before(&self, cutoff_ms: u64) -> Result<usize> {
        let rows = self.write(vec![(
            "WITH gone AS (DELETE FROM kh_stats WHERE hour < $1 RETURNING 1)
             SELECT count(*) FROM gone",
            params![seq_key(cutoff_ms / stats::HOUR_MS)],
        )])?;
        Ok(rows
            .first()
            .and_then(|r| r.first())
            .map_or(0, |r| r.get::<_, i64>(0) as usize))
    }

    // ---- backup ----

    fn begin_backup(self: Arc<Self>) -> std::result::Result<Box<dyn BackupStream>, BackupError> {
        Err(BackupError::NotThisBackend(
            "this engine keeps its data in PostgreSQL: back it up with pg_dump (see the README's PostgreSQL section)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_webhook_ids_sort_as_the_engine_sorts_them() {
        let ids = [
            0u64,
            1,
            1 << 62,
            (1 << 63) - 1,
            1 << 63,
            u64::MAX - 1,
            u64::MAX,
        ];
        for w in ids.windows(2) {
            assert!(wh_key(WebhookId(w[0])) < wh_key(WebhookId(w[1])), "{w:?}");
        }
        for id in ids {
            assert_eq!(wh_of(wh_key(WebhookId(id))), WebhookId(id));
        }
    }

    #[test]
    fn accounts_spread_over_every_partition_and_stay_in_theirs() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..20_000 {
            let a = AccountId::parse(&format!("acc_{i}")).unwrap();
            let p = partition_of(&a);
            assert!((0..schema::PARTITIONS).contains(&p));
            assert_eq!(partition_of(&a), p);
            seen.insert(p);
        }
        assert_eq!(seen.len(), schema::PARTITIONS as usize);
    }
}
