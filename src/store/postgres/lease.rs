//! The serve lease: which node of those sharing a database serves (ingests, delivers, answers
//! the API), and the fence that keeps a node that lost the lease from ever writing again.
//!
//! In: a node's identity (a random `node_id` per process start, its name and advertised URL)
//! and `cluster.lease`. Out: a [`Held`] lease (its `epoch`), a heartbeat that renews it, and the
//! fence statement ([`FENCE`]) every write transaction of the store runs first.
//!
//! `kh_lease` has one row: `owner`, `epoch` (+1 at every change of holder) and `expires_at`
//! (the database's clock, renewed by the holder's heartbeat every fifth of the lease). A node
//! takes the lease when nobody holds it, when it has expired (the holder hung or lost the
//! database), or when the holder's session is known to be gone: every node keeps a
//! session-level advisory lock keyed by its own `node_id` on its heartbeat connection, which
//! PostgreSQL releases the moment that connection ends (a crash, a SIGKILL), so a standby that
//! can take the holder's key (and lets it go at once) knows the holder is gone and takes over
//! instead of waiting out the lease. The key is the holder's own, not one lock for the whole
//! cluster: with a single shared lock, whichever node got it next — a restarted node, a second
//! standby — would take the lease from a healthy holder that had taken over by expiry, and two
//! nodes starting together could each hold half the claim (one the free lease, the other the
//! lock). A graceful stop releases the lease ([`release`]), for the same quick handover.
//!
//! **The fence.** Taking the lease reads its row `FOR UPDATE`; every write transaction of the
//! store first reads it `FOR KEY SHARE` and goes on only if it still names this node, this
//! epoch, unexpired. The two locks conflict, so a takeover waits for the old holder's write in
//! flight to commit, and every write the old holder begins afterwards finds the new owner and
//! fails: no write of a node that lost its lease commits after the new holder took it (what
//! Temporal's range ids and Kafka's epochs do). A node that finds itself fenced stops serving;
//! its supervisor restarts it, and it waits as a standby. The heartbeat's renewal is a plain
//! `UPDATE` of a non-key column, which does not conflict with the writers' `FOR KEY SHARE`.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use super::connect::{classify, Target};
use super::{schema, PgError};
use crate::store::{StoreError, StoreErrorKind};

/// Takes this node's own advisory lock (its `node_id`) if it can; whether it holds it.
async fn hold_own_key(client: &Client, node: &Node) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&node.id])
        .await?
        .get(0))
}

/// Writes (or refreshes) `node`'s `kh_node` row.
async fn register(client: &Client, node: &Node) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO kh_node (node_id, name, advertise, version) VALUES ($1, $2, $3, $4)
             ON CONFLICT (node_id) DO UPDATE SET last_seen = now()",
            &[
                &node.id,
                &node.name,
                &node.advertise,
                &env!("CARGO_PKG_VERSION"),
            ],
        )
        .await
        .map(drop)
}

/// Whether the session of node `owner` has ended: its key can be taken (and is let go at once).
async fn holder_gone(
    client: &impl tokio_postgres::GenericClient,
    owner: i64,
) -> Result<bool, tokio_postgres::Error> {
    let free: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&owner])
        .await?
        .get(0);
    if free {
        client
            .query_one("SELECT pg_advisory_unlock($1)", &[&owner])
            .await?;
    }
    Ok(free)
}

/// How often a standby asks for the lease.
const STANDBY_POLL: Duration = Duration::from_millis(250);

/// Node rows not seen for this long are dropped by the next node to take the lease.
const FORGET_NODES_AFTER: &str = "1 day";

/// The statement every write transaction runs first: one row while this node holds the lease.
pub const FENCE: &str = "SELECT 1 FROM kh_lease
     WHERE id = 1 AND owner = $1 AND epoch = $2 AND expires_at > now() FOR KEY SHARE";

/// This process as a member of the cluster.
#[derive(Debug, Clone)]
pub struct Node {
    pub id: i64,
    pub name: String,
    pub advertise: Option<String>,
    pub lease: Duration,
    /// The server's kind, for the day tables the heartbeat keeps ahead.
    pub server: schema::Server,
}

/// Heartbeats between two looks at the day tables (about an hour with the default lease).
const DAY_TABLES_EVERY: u32 = 1800;

/// The lease this node holds.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    pub owner: i64,
    pub epoch: i64,
    /// The node's writer slot ([`super::ownership::claim_slot`]).
    pub slot: u8,
}

/// What fencing refuses a write with.
pub fn fenced() -> StoreError {
    StoreError::new(
        StoreErrorKind::Unavailable,
        "this node's lease on the database was taken over by another node or expired: it no longer writes",
    )
}

/// `d` in whole milliseconds, for SQL intervals.
pub(super) fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// `SET LOCAL` of a fifth of `lease` as the idle-in-transaction limit: for the short
/// transactions that lock rows others' writes wait on (a lease or partition claim).
pub(super) fn short_idle(lease: Duration) -> String {
    format!(
        "SET LOCAL idle_in_transaction_session_timeout = {}",
        ms(lease / 5).max(1)
    )
}

/// Registers `node` and waits until it holds the lease: returns the lease, the connection that
/// holds (or will try for) the node's own key (the heartbeat's, see [`heartbeat`]) and whether
/// it holds it.
/// `waiting` hears once that another node holds the lease and this one waits.
pub async fn acquire(
    target: &Target,
    node: &Node,
    mut waiting: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(Held, Client, bool), PgError> {
    let sql = |e: tokio_postgres::Error| classify(&e, &target.shown);
    let mut client = target.connect().await?;
    register(&client, node).await.map_err(sql)?;
    let mut told = false;
    let mut locked = false;
    loop {
        if !locked {
            // Free unless a standby is probing it this instant: then at the next turn.
            locked = hold_own_key(&client, node).await.map_err(sql)?;
        }
        client
            .execute(
                "UPDATE kh_node SET last_seen = now() WHERE node_id = $1",
                &[&node.id],
            )
            .await
            .map_err(sql)?;
        let tx = client.transaction().await.map_err(sql)?;
        // Its `FOR UPDATE` blocks the holder's renewal and writes: were this node stopped
        // inside it, PostgreSQL ends the session well within the holder's lease.
        tx.batch_execute(&short_idle(node.lease))
            .await
            .map_err(sql)?;
        let row = tx
            .query_one(
                "SELECT owner, expires_at <= now() FROM kh_lease WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(sql)?;
        let (owner, expired): (Option<i64>, bool) = (row.get(0), row.get(1));
        let gone = match owner {
            Some(o) if o != node.id && !expired => holder_gone(&tx, o).await.map_err(sql)?,
            _ => false,
        };
        if owner.is_none() || expired || gone || owner == Some(node.id) {
            let epoch: i64 = tx
                .query_one(
                    "UPDATE kh_lease SET owner = $1, epoch = epoch + 1, acquired_at = now(),
                            expires_at = now() + $2::bigint * interval '1 millisecond'
                     WHERE id = 1 RETURNING epoch",
                    &[&node.id, &ms(node.lease)],
                )
                .await
                .map_err(sql)?
                .get(0);
            // Every partition follows the lease while nodes do not divide them.
            tx.execute(
                "UPDATE kh_partition SET owner = $1, epoch = $2, acquired_at = now()",
                &[&node.id, &epoch],
            )
            .await
            .map_err(sql)?;
            tx.execute(
                &format!(
                    "DELETE FROM kh_node WHERE last_seen < now() - interval '{FORGET_NODES_AFTER}'"
                ),
                &[],
            )
            .await
            .map_err(sql)?;
            tx.commit().await.map_err(sql)?;
            let slot = super::ownership::claim_slot(&mut client, node.id, node.lease)
                .await
                .map_err(sql)?
                .ok_or_else(|| {
                    PgError::Failed(
                        "all 256 writer slots are held by live kyberhook nodes".to_string(),
                    )
                })?;
            let how = match owner {
                None => "took the free lease",
                Some(o) if o == node.id => "took its lease back",
                Some(_) if expired => "took over an expired lease",
                Some(_) => "took over the lease of a node whose session ended",
            };
            tracing::info!(database = %target.shown, node = %node.name, epoch, slot, "{how}: this node serves");
            return Ok((
                Held {
                    owner: node.id,
                    epoch,
                    slot,
                },
                client,
                locked,
            ));
        }
        drop(tx);
        if !told {
            tracing::warn!(database = %target.shown, node = %node.name, "another kyberhook node is serving from this database: this one waits, and takes over when that one stops");
            // Waiting is this node's steady state, not a start that hangs: a service manager
            // must not time it out (systemd's unit is Type=notify).
            crate::notify_service(sd_notify::NotifyState::Ready);
            if let Some(tx) = waiting.take() {
                let _ = tx.send(());
            }
            told = true;
        }
        tokio::time::sleep(STANDBY_POLL).await;
    }
}

/// Registers `node` to divide the partitions with the others (no serve lease): its `kh_node`
/// row, its session's key (held on the returned session, which the ownership loop goes on
/// with: others count the node out the moment that session ends) and its writer slot. Refused
/// while a node serving alone (`cluster.divide_work = false`) holds the lease: the two modes
/// do not share a database.
pub async fn join(target: &Target, node: &Node) -> Result<(u8, Client), PgError> {
    let sql = |e: tokio_postgres::Error| classify(&e, &target.shown);
    let mut client = target.connect().await?;
    register(&client, node).await.map_err(sql)?;
    // Free unless another node probes it this instant.
    let mut tries = 0;
    while !hold_own_key(&client, node).await.map_err(sql)? {
        tries += 1;
        if tries > 50 {
            return Err(PgError::Failed(format!(
                "a kyberhook node named {:?} is already running on this database (each node needs its own cluster.node_name)",
                node.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let row = client
        .query_one(
            "SELECT owner, expires_at > now() FROM kh_lease WHERE id = 1",
            &[],
        )
        .await
        .map_err(sql)?;
    let (owner, live): (Option<i64>, bool) = (row.get(0), row.get(1));
    if let (Some(o), true) = (owner, live) {
        if !holder_gone(&client, o).await.map_err(sql)? {
            return Err(PgError::Config(
                "cluster.divide_work: a node with cluster.divide_work = false serves this database; every node of a cluster must set the same".to_string(),
            ));
        }
    }
    let slot = super::ownership::claim_slot(&mut client, node.id, node.lease)
        .await
        .map_err(sql)?
        .ok_or_else(|| {
            PgError::Failed("all 256 writer slots are held by live kyberhook nodes".to_string())
        })?;
    tracing::info!(database = %target.shown, node = %node.name, slot, "joined the nodes dividing the partitions");
    Ok((slot, client))
}

/// Renews `held` every fifth of the lease on `client` (which holds, or keeps trying for, the
/// node's own key) until the lease is lost, then calls `lost` once and ends. A renewal that
/// cannot reach the database is retried on a new connection; if none succeeds before the
/// lease would have expired, the lease counts as lost here too (the fence refuses this node's
/// writes by then anyway).
pub async fn heartbeat(
    target: Target,
    node: Node,
    held: Held,
    mut client: Client,
    mut locked: bool,
    lost: Arc<dyn Fn(StoreError) + Send + Sync>,
) {
    let every = node.lease / 5;
    let mut last_renewed = tokio::time::Instant::now();
    let mut beats: u32 = 0;
    loop {
        tokio::time::sleep(every).await;
        beats = beats.wrapping_add(1);
        if beats % DAY_TABLES_EVERY == 0 {
            // A node serving for weeks keeps a week of day tables ahead of the clock.
            let today = schema::day_of(std::time::SystemTime::now());
            if let Err(e) =
                schema::ensure_day_tables(&mut client, node.server, today, schema::DAYS_AHEAD).await
            {
                tracing::warn!(error = %super::connect::chain(&e), "making the coming days' tables failed");
            }
        }
        if client.is_closed() {
            // The node's key went with the old session.
            locked = false;
            match target.connect().await {
                Ok(c) => client = c,
                Err(e) => {
                    tracing::warn!(error = %e, "the lease heartbeat cannot reach the database")
                }
            }
        }
        match renew(&client, &node, held, &mut locked).await {
            Ok(true) => last_renewed = tokio::time::Instant::now(),
            Ok(false) => {
                lost(fenced());
                return;
            }
            Err(e) => {
                tracing::warn!(error = %super::connect::chain(&e), "renewing the lease failed")
            }
        }
        if last_renewed.elapsed() >= node.lease {
            lost(StoreError::new(
                StoreErrorKind::Unavailable,
                "this node could not renew its lease on the database in time: it no longer writes",
            ));
            return;
        }
    }
}

/// One renewal: whether the lease is still this node's.
async fn renew(
    client: &Client,
    node: &Node,
    held: Held,
    locked: &mut bool,
) -> Result<bool, tokio_postgres::Error> {
    client
        .execute(
            "UPDATE kh_node SET last_seen = now() WHERE node_id = $1",
            &[&node.id],
        )
        .await?;
    let renewed = client
        .execute(
            "UPDATE kh_lease SET expires_at = now() + $3::bigint * interval '1 millisecond'
             WHERE id = 1 AND owner = $1 AND epoch = $2 AND expires_at > now()",
            &[&held.owner, &held.epoch, &ms(node.lease)],
        )
        .await?;
    if renewed == 1 && !*locked {
        // A new connection (or a standby's probe at the first try): hold the key again, so that
        // a standby can tell when this node is gone.
        *locked = hold_own_key(client, node).await?;
    }
    Ok(renewed == 1)
}

/// Gives the lease up (a graceful stop): a standby takes it at its next look.
pub async fn release(client: &Client, held: Held) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE kh_lease SET expires_at = now() WHERE id = 1 AND owner = $1 AND epoch = $2",
            &[&held.owner, &held.epoch],
        )
        .await
        .map(drop)
}
