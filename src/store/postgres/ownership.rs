//! Partition leases: which live node owns which of the [`PARTITIONS`] partitions of accounts,
//! and the per-partition fence a write runs first — the protocol nodes divide the work by when
//! `cluster.divide_work` is set (the research's §3.2). The engine runs [`run`] through
//! `PgStore::divide`, with `crate::handover` as its [`PartitionWork`]; every write of account
//! data sends [`FENCE`] first (the check [`fence`] runs on its own). Without
//! `divide_work`, the serve lease ([`super::lease`]) stamps every partition with its holder.
//! Tested on its own against a real PostgreSQL (`tests/it/pg_ownership.rs`) and through real
//! nodes (`tests/it/pg_divide.rs`).
//!
//! In: the live nodes (`kh_node` rows whose heartbeat, `last_seen`, is younger than the lease)
//! and what this node holds (an [`Owned`]: partition → epoch). Out: a [`Change`] — partitions
//! just acquired, each with its new epoch, those now targeted at another node, which the
//! caller drains and then gives up with [`release`], and those another node took over — and
//! the [`fence`] verdict for a write. [`run`] is the loop a node runs over these, telling its
//! [`PartitionWork`] (the engine, once it divides work) what to load, drain and drop; it also
//! hands out writer slots ([`claim_slot`]) for the ids nodes mint.
//!
//! **Target set.** [`assign`] is rendezvous (highest random weight) hashing of each partition
//! over the live node ids with a bounded load of `ceil(partitions / live)` per node: every node
//! computes the same answer from the same `kh_node` rows, with no coordinator, and a join or a
//! leave moves about `partitions / live` partitions (those the newcomer wins, or the leaver
//! held), not a reshuffle — Kafka's sticky assignor (KIP-429), without the group leader.
//!
//! **Acquire** only what is free (never owned, or released) or whose owner is gone: its
//! heartbeat is older than the lease, or its session's advisory key (see [`super::lease`]) can
//! be taken, which PostgreSQL frees the moment a crashed node's connection ends. The row is
//! read `FOR UPDATE` and its epoch bumped; a live owner is never deposed — it sees the new
//! target itself and releases, so a rebalance is release-then-acquire with the database as
//! the happens-before barrier (Kafka Connect's), and partitions that do not move are never
//! touched: their owner keeps working without a pause.
//!
//! **The fence.** A write transaction on some partitions first reads their rows `FOR KEY SHARE`
//! and goes on only if each still names this node at the epoch it acquired (Temporal's
//! `range_id` check). An acquisition's `FOR UPDATE` conflicts with it, so a takeover waits for
//! the old owner's write in flight, and every write the old owner begins afterwards sees the
//! new epoch (READ COMMITTED re-reads the locked row) and fails.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio_postgres::{Client, GenericClient};

use super::lease::ms;
use super::schema::PARTITIONS;

/// A partition's number, `0 .. PARTITIONS`.
pub type Partition = i16;

/// What a node holds: each owned partition and the epoch it acquired it at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owned {
    epochs: BTreeMap<Partition, i64>,
}

impl Owned {
    pub fn len(&self) -> usize {
        self.epochs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.epochs.is_empty()
    }

    pub fn epoch(&self, p: Partition) -> Option<i64> {
        self.epochs.get(&p).copied()
    }

    /// The held partitions and their epochs, in partition order.
    pub fn iter(&self) -> impl Iterator<Item = (Partition, i64)> + '_ {
        self.epochs.iter().map(|(p, e)| (*p, *e))
    }

    /// Records what [`rebalance`] acquired.
    pub fn gain(&mut self, gained: &[(Partition, i64)]) {
        self.epochs.extend(gained.iter().copied());
    }

    /// Forgets partitions released or found lost by the fence.
    pub fn drop_partitions(&mut self, gone: &[Partition]) {
        for p in gone {
            self.epochs.remove(p);
        }
    }
}

/// What one [`rebalance`] round changed or asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// Partitions this node now owns, each with its new epoch: load their work.
    pub gained: Vec<(Partition, i64)>,
    /// Partitions this node owns that now belong to another live node: stop taking work for
    /// them, finish what is in flight, then [`release`] them.
    pub to_release: Vec<Partition>,
    /// Partitions this node believed it held that another node took over (this node was
    /// counted out: its heartbeat aged, or its session ended): their work must be dropped.
    pub lost: Vec<Partition>,
}

/// A 64-bit mix (splitmix64's finaliser): the rendezvous weight of `(partition, node)`. Fixed
/// here, not a std hasher, so that every node of every version computes the same target set.
fn weight(partition: Partition, node: i64) -> u64 {
    let mut z = (node as u64) ^ (partition as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The target owner of each partition (index = partition) among `nodes`: each partition goes
/// to the node of highest weight that is not yet at `ceil(partitions / nodes)`. Partitions
/// claim in the order of their best weight's strength, so that a partition's first choice is
/// honoured wherever the cap allows, which keeps the answer sticky. Empty `nodes`: empty.
pub fn assign(nodes: &[i64], partitions: Partition) -> Vec<i64> {
    let mut nodes: Vec<i64> = nodes.to_vec();
    nodes.sort_unstable();
    nodes.dedup();
    if nodes.is_empty() || partitions <= 0 {
        return Vec::new();
    }
    let cap = (partitions as usize).div_ceil(nodes.len());
    // Each partition's nodes, best first.
    let ranked: Vec<Vec<(u64, i64)>> = (0..partitions)
        .map(|p| {
            let mut r: Vec<(u64, i64)> = nodes.iter().map(|&n| (weight(p, n), n)).collect();
            r.sort_unstable_by(|a, b| b.cmp(a));
            r
        })
        .collect();
    let mut order: Vec<Partition> = (0..partitions).collect();
    order.sort_unstable_by_key(|&p| std::cmp::Reverse((ranked[p as usize][0].0, p)));
    let mut load: BTreeMap<i64, usize> = BTreeMap::new();
    let mut owner = vec![0i64; partitions as usize];
    for p in order {
        let (_, n) = *ranked[p as usize]
            .iter()
            .find(|(_, n)| load.get(n).copied().unwrap_or(0) < cap)
            .expect("cap * nodes >= partitions leaves room");
        *load.entry(n).or_default() += 1;
        owner[p as usize] = n;
    }
    owner
}

/// The nodes alive as `me` sees them: a heartbeat younger than `lease` (the database's clock)
/// and a session still open — a crashed node's heartbeat is fresh for up to a lease, but its
/// advisory key is free the moment its connection ended, and it is counted out at once.
pub async fn live_nodes(
    client: &impl GenericClient,
    me: i64,
    lease: Duration,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT node_id,
                    CASE WHEN node_id = $2 THEN false ELSE pg_try_advisory_lock(node_id) END
             FROM kh_node
             WHERE last_seen > now() - $1::bigint * interval '1 millisecond'
             ORDER BY node_id",
            &[&ms(lease), &me],
        )
        .await?;
    let (gone, live): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r.get::<_, bool>(1));
    let gone: Vec<i64> = gone.iter().map(|r| r.get(0)).collect();
    if !gone.is_empty() {
        client
            .execute(
                "SELECT pg_advisory_unlock(k) FROM UNNEST($1::bigint[]) AS k",
                &[&gone],
            )
            .await?;
    }
    Ok(live.iter().map(|r| r.get(0)).collect())
}

/// The transaction-level advisory lock slot claims take: "khslot" in ASCII.
const SLOT_KEY: i64 = 0x6b68_736c_6f74;

/// Claims node `me`'s writer slot (`kh_node.slot`, the low byte of the sequence numbers it
/// mints): the smallest one no other live node (heartbeat younger than `lease`) holds.
/// Claims run one at a time under [`SLOT_KEY`], so two nodes starting together never pick the
/// same slot. `None`: every slot is in use by a live node (256 of them).
pub async fn claim_slot(
    client: &mut Client,
    me: i64,
    lease: Duration,
) -> Result<Option<u8>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SLOT_KEY])
        .await?;
    let taken: Vec<i16> = tx
        .query(
            "SELECT slot FROM kh_node WHERE slot IS NOT NULL AND node_id <> $1
               AND last_seen > now() - $2::bigint * interval '1 millisecond'",
            &[&me, &ms(lease)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let Some(slot) = (0..=u8::MAX).find(|s| !taken.contains(&i16::from(*s))) else {
        return Ok(None);
    };
    tx.execute(
        "UPDATE kh_node SET slot = $2 WHERE node_id = $1",
        &[&me, &i16::from(slot)],
    )
    .await?;
    tx.commit().await?;
    Ok(Some(slot))
}

/// One round for node `me` holding `owned`: renews its heartbeat, computes the target set over
/// the live nodes, acquires every target partition that is free or whose owner is gone (one
/// transaction), and lists the owned partitions now targeted elsewhere. Partitions whose
/// owner is alive stay where they are until that owner releases them.
pub async fn rebalance(
    client: &mut Client,
    me: i64,
    lease: Duration,
    owned: &Owned,
) -> Result<Change, tokio_postgres::Error> {
    client
        .execute(
            "UPDATE kh_node SET last_seen = now() WHERE node_id = $1",
            &[&me],
        )
        .await?;
    let mut change = Change::default();
    if !owned.is_empty() {
        let (ps, epochs): (Vec<Partition>, Vec<i64>) = owned.iter().unzip();
        change.lost = client
            .query(
                "SELECT p.partition_id FROM kh_partition p
                 JOIN UNNEST($1::smallint[], $2::bigint[]) AS h(partition_id, epoch)
                   ON p.partition_id = h.partition_id
                 WHERE p.owner IS DISTINCT FROM $3 OR p.epoch <> h.epoch
                 ORDER BY p.partition_id",
                &[&ps, &epochs, &me],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
    }
    let live = live_nodes(&*client, me, lease).await?;
    let target = assign(&live, PARTITIONS);
    if target.is_empty() {
        return Ok(change);
    }
    let still = |p: Partition| owned.epoch(p).is_some() && !change.lost.contains(&p);
    let mine: Vec<Partition> = (0..PARTITIONS)
        .filter(|&p| target[p as usize] == me && !still(p))
        .collect();
    change.to_release = owned
        .iter()
        .map(|(p, _)| p)
        .filter(|&p| target[p as usize] != me && still(p))
        .collect();
    if mine.is_empty() {
        return Ok(change);
    }
    let tx = client.transaction().await?;
    tx.batch_execute(&super::lease::short_idle(lease)).await?;
    // Free (never owned, released) or its owner is not among the live: taken. A live owner
    // keeps it until it releases it.
    let take: Vec<Partition> = tx
        .query(
            "SELECT partition_id FROM kh_partition
             WHERE partition_id = ANY($1) AND (owner IS NULL OR owner = $2 OR owner <> ALL($3))
             ORDER BY partition_id FOR UPDATE",
            &[&mine, &me, &live],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !take.is_empty() {
        let acquired = tx
            .query(
                "UPDATE kh_partition SET owner = $2, epoch = epoch + 1, acquired_at = now()
                 WHERE partition_id = ANY($1) RETURNING partition_id, epoch",
                &[&take, &me],
            )
            .await?;
        change.gained = acquired.iter().map(|r| (r.get(0), r.get(1))).collect();
        change.gained.sort_unstable();
    }
    tx.commit().await?;
    Ok(change)
}

/// Gives up `partitions` held at their epochs in `owned` (a graceful hand-over: the caller
/// has stopped and drained their work). A partition taken over meanwhile is left alone. The
/// epoch stays; the next owner bumps it. Returns how many were released.
pub async fn release(
    client: &impl GenericClient,
    me: i64,
    owned: &Owned,
    partitions: &[Partition],
) -> Result<u64, tokio_postgres::Error> {
    let (ps, epochs): (Vec<Partition>, Vec<i64>) = partitions
        .iter()
        .filter_map(|&p| owned.epoch(p).map(|e| (p, e)))
        .unzip();
    client
        .execute(
            "UPDATE kh_partition p SET owner = NULL
             FROM UNNEST($1::smallint[], $2::bigint[]) AS h(partition_id, epoch)
             WHERE p.partition_id = h.partition_id AND p.epoch = h.epoch AND p.owner = $3",
            &[&ps, &epochs, &me],
        )
        .await
}

/// The first statement of a write of account data: one row per partition of `$1` that still
/// names this node (`$3`) at the epoch in `$2`. A takeover's `FOR UPDATE` waits for the write;
/// a write begun after it sees the new owner (READ COMMITTED re-reads the locked row). The
/// store sends it in the write's pipeline; [`fence`] is the same check on its own.
pub const FENCE: &str = "SELECT p.partition_id FROM kh_partition p
     JOIN UNNEST($1::smallint[], $2::bigint[]) AS f(id, epoch)
       ON p.partition_id = f.id AND p.epoch = f.epoch
     WHERE p.owner = $3 FOR KEY SHARE OF p";

/// The fence a write transaction on `partitions` runs first (inside it): `Ok(())` when this
/// node still owns each at the epoch in `owned`; otherwise the partitions it lost (or never
/// held), and the transaction must not write. Their rows stay share-locked until it ends, so
/// no takeover of them commits in between.
pub async fn fence(
    tx: &impl GenericClient,
    me: i64,
    owned: &Owned,
    partitions: &[Partition],
) -> Result<Result<(), Vec<Partition>>, tokio_postgres::Error> {
    let mut ps: Vec<Partition> = partitions.to_vec();
    ps.sort_unstable();
    ps.dedup();
    let (held, epochs): (Vec<Partition>, Vec<i64>) = ps
        .iter()
        .filter_map(|&p| owned.epoch(p).map(|e| (p, e)))
        .unzip();
    let still: BTreeSet<Partition> = tx
        .query(FENCE, &[&held, &epochs, &me])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<Partition> = ps.into_iter().filter(|p| !still.contains(p)).collect();
    Ok(if lost.is_empty() { Ok(()) } else { Err(lost) })
}

/// What a node does with partitions as they come and go: the engine's side of [`run`].
pub trait PartitionWork: Send + Sync + 'static {
    /// Partitions just acquired, each at its new epoch: load their owed work and take theirs.
    fn gained(&self, partitions: &[(Partition, i64)]);
    /// Partitions that now belong to another node: stop taking their work and finish (or give
    /// up) what is in flight. Resolves when nothing of theirs is left running; [`run`] releases
    /// them then.
    fn drain(
        &self,
        partitions: &[Partition],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
    /// Partitions taken away without a hand-over (this node could not renew in time, or
    /// another node fenced it): drop their work at once; writes for them fail the fence anyway.
    fn lost(&self, partitions: &[Partition]);
}

/// How often [`run`] takes a round: a fifth of the lease, as the serve lease's heartbeat.
fn round_every(lease: Duration) -> Duration {
    (lease / 5).max(Duration::from_millis(10))
}

/// The ownership loop of node `me`: registers it (its `kh_node` row and its session's
/// advisory key; `registered`, if given, is a session that did so already), then every fifth of `lease` takes a [`rebalance`] round — gained partitions
/// go to [`PartitionWork::gained`]; those that moved away are drained, then [`release`]d —
/// until `stop` turns true, when it drains and releases everything it holds. Drains run beside
/// the rounds, so a node finishing long attempts for partitions it hands over keeps its
/// heartbeat (and the partitions it keeps) alive meanwhile. If no round succeeds for a whole
/// lease (the database is unreachable), every held partition counts as lost: its work is
/// dropped, since another node may own it by now. Publishes what it holds on `held`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    target: super::Target,
    me: i64,
    name: String,
    lease: Duration,
    work: std::sync::Arc<dyn PartitionWork>,
    held: tokio::sync::watch::Sender<Owned>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    registered: Option<Client>,
) {
    let mut node = Looping {
        me,
        name,
        lease,
        client: registered,
        owned: Owned::default(),
        draining: std::collections::BTreeSet::new(),
        drained: Vec::new(),
    };
    let mut drains: tokio::task::JoinSet<Vec<Partition>> = tokio::task::JoinSet::new();
    let mut last_round = tokio::time::Instant::now();
    while !*stop.borrow() {
        match node.round(&target, &*work).await {
            Ok(to_drain) => {
                last_round = tokio::time::Instant::now();
                if !to_drain.is_empty() {
                    node.draining.extend(to_drain.iter().copied());
                    let drained = work.drain(&to_drain);
                    drains.spawn(async move {
                        drained.await;
                        to_drain
                    });
                }
            }
            Err(e) => {
                tracing::warn!(error = %super::connect::chain(&*e), node = %node.name, "a partition ownership round failed");
                // The session is kept while it lasts (a failed statement was rolled back): it
                // holds the node's key, and others count a node out the moment that is free.
                // A session that ended is replaced at the next round.
                if last_round.elapsed() >= lease && !node.owned.is_empty() {
                    let all: Vec<Partition> = node.owned.iter().map(|(p, _)| p).collect();
                    work.lost(&all);
                    node.owned = Owned::default();
                    node.draining.clear();
                }
            }
        }
        held.send_replace(node.owned.clone());
        tokio::select! {
            _ = tokio::time::sleep(round_every(lease)) => {}
            _ = stop.changed() => {}
            Some(Ok(done)) = drains.join_next() => node.drained.extend(done),
        }
    }
    // A graceful stop hands everything over at once.
    while let Some(done) = drains.join_next().await {
        node.drained.extend(done.unwrap_or_default());
    }
    let rest: Vec<Partition> = node
        .owned
        .iter()
        .map(|(p, _)| p)
        .filter(|p| !node.drained.contains(p))
        .collect();
    if !rest.is_empty() {
        work.drain(&rest).await;
    }
    let all: Vec<Partition> = node.owned.iter().map(|(p, _)| p).collect();
    if let (false, Some(c)) = (all.is_empty(), node.client.as_ref()) {
        if let Err(e) = release(c, me, &node.owned, &all).await {
            tracing::warn!(error = %super::connect::chain(&e), node = %node.name, "releasing partitions at stop failed; they are taken over when this node's session ends");
        }
    }
    held.send_replace(Owned::default());
}

/// [`run`]'s state between rounds.
struct Looping {
    me: i64,
    name: String,
    lease: Duration,
    client: Option<Client>,
    owned: Owned,
    /// Handed to [`PartitionWork::drain`], not yet finished.
    draining: std::collections::BTreeSet<Partition>,
    /// Drained, to release at the next round.
    drained: Vec<Partition>,
}

impl Looping {
    /// One round (connected, registered and holding the node's key first if it is not):
    /// releases what finished draining, takes what it may, reports what it lost; returns
    /// the partitions to drain now.
    async fn round(
        &mut self,
        target: &super::Target,
        work: &dyn PartitionWork,
    ) -> Result<Vec<Partition>, Box<dyn std::error::Error + Send + Sync>> {
        if self.client.as_ref().map_or(true, Client::is_closed) {
            let c = target.connect().await.map_err(|e| e.to_string())?;
            c.execute(
                "INSERT INTO kh_node (node_id, name, version) VALUES ($1, $2, $3)
                 ON CONFLICT (node_id) DO UPDATE SET last_seen = now()",
                &[&self.me, &self.name, &env!("CARGO_PKG_VERSION")],
            )
            .await?;
            // Others count this node out while its key is free: hold it before anything else.
            let locked: bool = c
                .query_one("SELECT pg_try_advisory_lock($1)", &[&self.me])
                .await?
                .get(0);
            if !locked {
                return Err("another session holds this node's key (a probe in progress)".into());
            }
            self.client = Some(c);
        }
        let c = self.client.as_mut().expect("connected above");
        // A partition lost while it drained is not this node's to release any more.
        let draining = &self.draining;
        self.drained.retain(|p| draining.contains(p));
        if !self.drained.is_empty() {
            release(&*c, self.me, &self.owned, &self.drained).await?;
            self.owned.drop_partitions(&self.drained);
            for p in self.drained.drain(..) {
                self.draining.remove(&p);
            }
        }
        let change = rebalance(c, self.me, self.lease, &self.owned).await?;
        if !change.lost.is_empty() {
            tracing::warn!(node = %self.name, partitions = change.lost.len(), "partitions were taken over by another node: their work is dropped");
            work.lost(&change.lost);
            self.owned.drop_partitions(&change.lost);
            for p in &change.lost {
                self.draining.remove(p);
            }
        }
        if !change.gained.is_empty() {
            self.owned.gain(&change.gained);
            work.gained(&change.gained);
        }
        Ok(change
            .to_release
            .into_iter()
            .filter(|p| !self.draining.contains(p))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(owner: &[i64]) -> BTreeMap<i64, usize> {
        let mut c = BTreeMap::new();
        for n in owner {
            *c.entry(*n).or_default() += 1;
        }
        c
    }

    #[test]
    fn every_partition_gets_one_live_node_and_no_node_more_than_its_share() {
        for live in 1..=9usize {
            let nodes: Vec<i64> = (0..live as i64).map(|i| i * 7_919 + 13).collect();
            let owner = assign(&nodes, PARTITIONS);
            assert_eq!(owner.len(), PARTITIONS as usize);
            assert!(owner.iter().all(|n| nodes.contains(n)));
            let cap = (PARTITIONS as usize).div_ceil(live);
            let c = counts(&owner);
            assert_eq!(c.len(), live, "every node gets some");
            assert!(c.values().all(|&k| k <= cap), "{live} nodes: {c:?}");
        }
    }

    #[test]
    fn the_answer_does_not_depend_on_the_order_nodes_are_listed_in() {
        let a = assign(&[5, -3, 99, 1 << 40], PARTITIONS);
        let b = assign(&[1 << 40, 99, 5, -3, 5], PARTITIONS);
        assert_eq!(a, b);
    }

    #[test]
    fn a_join_or_a_leave_moves_about_one_share_not_a_reshuffle() {
        let three = [101_i64, 202, 303];
        let four = [101_i64, 202, 303, 404];
        let before = assign(&three, PARTITIONS);
        let after = assign(&four, PARTITIONS);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let share = PARTITIONS as usize / 4;
        // The newcomer's share moves to it, plus a little to even out the cap.
        assert!(
            moved >= share && moved <= share + share / 2,
            "moved {moved}"
        );
        assert_eq!(
            after
                .iter()
                .zip(&before)
                .filter(|(a, _)| **a == 404)
                .count(),
            counts(&after)[&404]
        );
        // And back: 404 leaves; what the others kept did not move.
        let again = assign(&three, PARTITIONS);
        assert_eq!(again, before);
        let kept_by_others = after
            .iter()
            .zip(&again)
            .filter(|(a, _)| **a != 404)
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            kept_by_others <= share / 2,
            "{kept_by_others} moved between stayers"
        );
    }
}
