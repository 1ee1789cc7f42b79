//! The partition leases nodes will divide the work by (`store::postgres::ownership`), on a real
//! PostgreSQL: several simulated nodes, each with its own session, share the 256 partitions;
//! one that crashes or hangs loses its share to the others, a newcomer takes its share while
//! the partitions that do not move keep their owner and epoch, and a write fenced on a
//! partition that was taken over cannot commit after the takeover.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kyberhook::config::Config;
use std::sync::{Arc, Mutex};

use kyberhook::store::postgres::ownership::{
    self, fence, rebalance, release, Owned, Partition, PartitionWork,
};
use kyberhook::store::postgres::{schema, Target};

use crate::pg::{pg_database, PgDb};

/// The lease the simulated nodes use: long, so that only the test ages a heartbeat.
const LEASE: Duration = Duration::from_secs(60);

struct SimNode {
    id: i64,
    client: tokio_postgres::Client,
    owned: Owned,
}

impl SimNode {
    /// Registers a node as `kyberhook serve` does: its `kh_node` row and its session's key.
    async fn join(db: &PgDb, id: i64) -> SimNode {
        SimNode::join_on(db.client().await, id).await
    }

    /// [`SimNode::join`] on a session of the caller's.
    async fn join_on(client: tokio_postgres::Client, id: i64) -> SimNode {
        client
            .execute(
                "INSERT INTO kh_node (node_id, name, version) VALUES ($1, $2, 'test')",
                &[&id, &format!("node-{id}")],
            )
            .await
            .unwrap();
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&id])
            .await
            .unwrap()
            .get(0);
        assert!(locked);
        SimNode {
            id,
            client,
            owned: Owned::default(),
        }
    }

    /// One round: acquire what it may, release (as drained) what moved away. What changed.
    async fn round(&mut self) -> (usize, usize) {
        let change = rebalance(&mut self.client, self.id, LEASE, &self.owned)
            .await
            .unwrap();
        assert!(change.lost.is_empty(), "{:?}", change.lost);
        self.owned.gain(&change.gained);
        release(&self.client, self.id, &self.owned, &change.to_release)
            .await
            .unwrap();
        self.owned.drop_partitions(&change.to_release);
        (change.gained.len(), change.to_release.len())
    }
}

/// Rounds over `nodes` until one changes nothing; how many it took.
async fn settle(nodes: &mut [&mut SimNode]) -> usize {
    for turn in 1..=10 {
        let mut changed = false;
        for n in nodes.iter_mut() {
            let (g, r) = n.round().await;
            changed |= g + r > 0;
        }
        if !changed {
            return turn;
        }
    }
    panic!("ownership did not settle in 10 rounds");
}

/// `kh_partition` as the database has it: partition → (owner, epoch).
async fn table(db: &PgDb) -> BTreeMap<Partition, (Option<i64>, i64)> {
    db.client()
        .await
        .query("SELECT partition_id, owner, epoch FROM kh_partition", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// Every partition has exactly the owner (and epoch) one of `nodes` believes it holds.
async fn agrees(db: &PgDb, nodes: &[&SimNode]) {
    let t = table(db).await;
    assert_eq!(t.len(), schema::PARTITIONS as usize);
    let cap = (schema::PARTITIONS as usize).div_ceil(nodes.len());
    let mut believed = BTreeMap::new();
    for n in nodes {
        assert!(
            n.owned.len() <= cap,
            "node {} holds {}",
            n.id,
            n.owned.len()
        );
        for (p, e) in n.owned.iter() {
            assert!(
                believed.insert(p, (Some(n.id), e)).is_none(),
                "{p} held twice"
            );
        }
    }
    assert_eq!(believed, t);
}

async fn migrated(db: &PgDb) {
    let mut c = db.client().await;
    schema::migrate(&mut c, "test", "test").await.unwrap();
}

/// How the engine reaches `db` (its `Target`, from a config with `cluster.lease = lease`):
/// its sessions carry the engine's settings.
fn engine_target(db: &PgDb, lease: &str) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        format!(
            "[storage]\npath = \"{}\"\nbackend = \"postgres\"\npostgres_url = \"{}\"\n\
             postgres_ca_file = \"{}\"\n[cluster]\nlease = \"{lease}\"\n",
            dir.path().join("data").display(),
            db.url,
            db.ca_file.display()
        ),
    )
    .unwrap();
    Target::from_config(&Config::load(&path).unwrap()).unwrap()
}

/// Ages a node's heartbeat past the lease, as a hung node's would be.
async fn hang(db: &PgDb, id: i64) {
    db.client()
        .await
        .execute(
            "UPDATE kh_node SET last_seen = now() - interval '1 hour' WHERE node_id = $1",
            &[&id],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_divide_the_partitions_and_a_crashed_node_s_share_goes_to_the_others_only() {
    let db = pg_database().await;
    migrated(&db).await;
    let (mut a, mut b, mut c) = (
        SimNode::join(&db, 11).await,
        SimNode::join(&db, 22).await,
        SimNode::join(&db, 33).await,
    );
    settle(&mut [&mut a, &mut b, &mut c]).await;
    agrees(&db, &[&a, &b, &c]).await;
    assert!([&a, &b, &c].iter().all(|n| n.owned.len() >= 80));
    let before = table(&db).await;

    // C crashes: its session ends, so its key is free at once though its heartbeat is fresh.
    let SimNode { client, .. } = c;
    drop(client);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rounds = settle(&mut [&mut a, &mut b]).await;
    assert!(rounds <= 3, "{rounds} rounds");
    agrees(&db, &[&a, &b]).await;
    let after = table(&db).await;
    for (p, (owner, epoch)) in &before {
        let (now_owner, now_epoch) = after[p];
        if *owner == Some(33) {
            assert!(now_epoch > *epoch, "{p}: taken over without a new epoch");
        } else if now_owner == *owner {
            // Not moved: never touched, so its owner never paused.
            assert_eq!(now_epoch, *epoch, "{p} was re-acquired by its own owner");
        }
    }

    // A newcomer takes a share: only what it wins moves, the rest keeps owner and epoch.
    let mut d = SimNode::join(&db, 44).await;
    settle(&mut [&mut a, &mut b, &mut d]).await;
    agrees(&db, &[&a, &b, &d]).await;
    assert!(d.owned.len() >= 80, "the newcomer holds {}", d.owned.len());
    let joined = table(&db).await;
    let moved_between_stayers = after
        .iter()
        .filter(|(p, (o, e))| {
            joined[*p].0 != Some(44) && (joined[*p].0 != *o || joined[*p].1 != *e)
        })
        .count();
    assert!(
        moved_between_stayers <= 40,
        "{moved_between_stayers} partitions moved between nodes that stayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_fenced_by_a_hung_owner_commits_before_the_takeover_or_not_at_all() {
    let db = pg_database().await;
    migrated(&db).await;
    let mut old = SimNode::join(&db, 1).await;
    settle(&mut [&mut old]).await;
    assert_eq!(old.owned.len(), schema::PARTITIONS as usize);
    let mut new = SimNode::join(&db, 2).await;
    let theirs: Vec<Partition> = (0..schema::PARTITIONS)
        .filter(|&p| ownership::assign(&[1, 2], schema::PARTITIONS)[p as usize] == 2)
        .collect();
    let p = theirs[0];

    // The old owner hangs in the middle of a write on p: fenced, not yet committed.
    let tx = old.client.transaction().await.unwrap();
    assert_eq!(fence(&tx, 1, &old.owned, &[p]).await.unwrap(), Ok(()));
    tx.execute(
        "INSERT INTO kh_meta (name, value) VALUES ('fenced-write', 'old owner')",
        &[],
    )
    .await
    .unwrap();
    hang(&db, 1).await;
    // The takeover waits for that write.
    let mut takeover = tokio::spawn(async move {
        let change = rebalance(&mut new.client, 2, LEASE, &new.owned)
            .await
            .unwrap();
        new.owned.gain(&change.gained);
        new
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut takeover)
            .await
            .is_err(),
        "the takeover did not wait for the old owner's write in flight"
    );
    tx.commit().await.unwrap();
    let new = takeover.await.unwrap();
    // A hung owner's heartbeat is stale: the newcomer took everything, each at a new epoch.
    assert_eq!(new.owned.len(), schema::PARTITIONS as usize);
    assert!(new
        .owned
        .iter()
        .all(|(q, e)| e > old.owned.epoch(q).unwrap()));

    // The old owner wakes up: every write it begins now is refused by the fence.
    let tx = old.client.transaction().await.unwrap();
    let lost = fence(&tx, 1, &old.owned, &[p, theirs[1]]).await.unwrap();
    assert_eq!(lost, Err(vec![p, theirs[1]]));
    drop(tx);
    // Its release of what it no longer holds changes nothing.
    let all: Vec<Partition> = old.owned.iter().map(|(q, _)| q).collect();
    assert_eq!(release(&old.client, 1, &old.owned, &all).await.unwrap(), 0);
    let t = table(&db).await;
    assert!(t.values().all(|(o, _)| *o == Some(2)));
    // What it committed before the takeover stays.
    let kept: String = db
        .client()
        .await
        .query_one("SELECT value FROM kh_meta WHERE name = 'fenced-write'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, "old owner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_inside_its_fenced_write_holds_up_a_takeover_for_a_lease_at_most() {
    let db = pg_database().await;
    migrated(&db).await;
    // The old owner's sessions are the engine's own (`Target`), as `kyberhook serve` opens them.
    let target = engine_target(&db, "1s");
    let mut old = SimNode::join_on(target.connect().await.unwrap(), 1).await;
    settle(&mut [&mut old]).await;
    let tx = old.client.transaction().await.unwrap();
    assert_eq!(fence(&tx, 1, &old.owned, &[0, 1]).await.unwrap(), Ok(()));
    tx.execute(
        "INSERT INTO kh_meta (name, value) VALUES ('stopped-write', 'old owner')",
        &[],
    )
    .await
    .unwrap();
    // ... and it stops right there (SIGSTOP): no commit, no rollback, its locks held.
    hang(&db, 1).await;
    let mut new = SimNode::join(&db, 2).await;
    let asked = Instant::now();
    let change = tokio::time::timeout(
        Duration::from_secs(15),
        rebalance(&mut new.client, 2, LEASE, &new.owned),
    )
    .await
    .expect("the takeover still waits for a stopped node's transaction")
    .unwrap();
    assert_eq!(change.gained.len(), schema::PARTITIONS as usize);
    assert!(
        asked.elapsed() >= Duration::from_millis(500),
        "taken over without waiting for the write in flight: {:?}",
        asked.elapsed()
    );
    // The stopped node's write never commits.
    assert!(tx.commit().await.is_err());
    let left = db
        .client()
        .await
        .query_opt("SELECT 1 FROM kh_meta WHERE name = 'stopped-write'", &[])
        .await
        .unwrap();
    assert!(left.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_writing_at_once_hold_different_writer_slots() {
    let db = pg_database().await;
    migrated(&db).await;
    let mut nodes = Vec::new();
    for id in 1..=6 {
        nodes.push(SimNode::join(&db, id).await);
    }
    // All claim at once: the claims queue on one lock, so no two pick the same slot.
    let claims = futures_util::future::join_all(
        nodes
            .iter_mut()
            .map(|n| ownership::claim_slot(&mut n.client, n.id, LEASE)),
    )
    .await;
    let mut slots: Vec<u8> = claims.into_iter().map(|c| c.unwrap().unwrap()).collect();
    slots.sort_unstable();
    assert_eq!(slots, [0, 1, 2, 3, 4, 5]);
    // A node that stopped heartbeating frees its slot for the next one to start.
    let stored = |id: i64| {
        let db = &db;
        async move {
            db.client()
                .await
                .query_one("SELECT slot FROM kh_node WHERE node_id = $1", &[&id])
                .await
                .unwrap()
                .get::<_, Option<i16>>(0)
                .unwrap()
        }
    };
    let freed = stored(3).await;
    hang(&db, 3).await;
    let mut late = SimNode::join(&db, 7).await;
    let got = ownership::claim_slot(&mut late.client, 7, LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(i16::from(got), freed);
    assert_eq!(stored(7).await, freed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_schema_is_upgraded_in_place_with_its_rows() {
    let db = pg_database().await;
    migrated(&db).await;
    let c = db.client().await;
    // Back to what version 1 had, with a node row in it.
    c.batch_execute(
        "ALTER TABLE kh_node DROP COLUMN slot;
         UPDATE kh_schema SET version = 1;
         INSERT INTO kh_node (node_id, name, version) VALUES (9, 'old', '0.1.0');",
    )
    .await
    .unwrap();
    let mut m = db.client().await;
    let (migrated, _) = schema::migrate(&mut m, "test", "test").await.unwrap();
    assert_eq!(migrated, schema::Migrated::Upgraded(1));
    let row = c
        .query_one("SELECT name, slot FROM kh_node WHERE node_id = 9", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, Option<i16>>(1)),
        ("old".to_string(), None)
    );
    let version: i32 = c
        .query_one("SELECT version FROM kh_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, schema::CURRENT);
}

/// What a node's work saw: (node, what, partition), in the order it happened.
type Seen = Arc<Mutex<Vec<(i64, &'static str, Partition)>>>;

/// A [`PartitionWork`] that records what it is told; its drains take longer than a round,
/// like attempts in flight finishing, and are recorded when they end: a partition gained by
/// another node before its drain ended would show.
struct Recorder {
    node: i64,
    seen: Seen,
}

impl PartitionWork for Recorder {
    fn gained(&self, partitions: &[(Partition, i64)]) {
        let mut seen = self.seen.lock().unwrap();
        seen.extend(partitions.iter().map(|(p, _)| (self.node, "gained", *p)));
    }

    fn drain(
        &self,
        partitions: &[Partition],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let (node, seen, partitions) = (self.node, self.seen.clone(), partitions.to_vec());
        Box::pin(async move {
            tokio::time::sleep(DRAIN).await;
            let mut seen = seen.lock().unwrap();
            seen.extend(partitions.iter().map(|p| (node, "drained", *p)));
        })
    }

    fn lost(&self, partitions: &[Partition]) {
        let mut seen = self.seen.lock().unwrap();
        seen.extend(partitions.iter().map(|p| (self.node, "lost", *p)));
    }
}

/// How long a drain takes: longer than a round (a fifth of the 2 s lease below).
const DRAIN: Duration = Duration::from_millis(600);

struct Driver {
    held: tokio::sync::watch::Receiver<Owned>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn drive(target: &Target, id: i64, lease: Duration, seen: &Seen) -> Driver {
    let (held_tx, held) = tokio::sync::watch::channel(Owned::default());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(ownership::run(
        target.clone(),
        id,
        format!("node-{id}"),
        lease,
        Arc::new(Recorder {
            node: id,
            seen: seen.clone(),
        }),
        held_tx,
        stop_rx,
        None,
    ));
    Driver { held, stop, task }
}

/// Waits until `drivers` together hold every partition, each at least `min`.
async fn until_divided(drivers: &[&Driver], min: usize, wait: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let counts: Vec<usize> = drivers.iter().map(|d| d.held.borrow().len()).collect();
        if counts.iter().sum::<usize>() == schema::PARTITIONS as usize
            && counts.iter().all(|&c| c >= min)
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < wait,
            "not divided within {wait:?}: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Replays `seen`: a partition is gained only while nobody holds it — released (drained) by
/// its last owner first — or from `dead`, which never hands over.
fn one_owner_at_a_time(seen: &Seen, dead: i64) {
    let mut holder: BTreeMap<Partition, i64> = BTreeMap::new();
    for (node, what, p) in seen.lock().unwrap().iter() {
        match *what {
            "gained" => {
                if let Some(old) = holder.insert(*p, *node) {
                    assert_eq!(old, dead, "{node} gained {p} while {old} held it");
                }
            }
            _ => assert_eq!(
                holder.remove(p),
                Some(*node),
                "{node} {what} {p} it did not hold"
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_nodes_hand_partitions_over_on_a_crash_a_join_and_a_stop() {
    let db = pg_database().await;
    migrated(&db).await;
    // Long enough that a CI machine's stall of a node's task is not a lapse of its heartbeat
    // (a node counted out that way loses its partitions, rightly, but not one at a time).
    let lease = Duration::from_secs(5);
    let target = engine_target(&db, "5s");
    let seen: Seen = Arc::default();
    let (one, two, three) = (
        drive(&target, 1, lease, &seen),
        drive(&target, 2, lease, &seen),
        drive(&target, 3, lease, &seen),
    );
    until_divided(&[&one, &two, &three], 80, Duration::from_secs(20)).await;

    // Node 3 crashes: its task and session end at once; its share goes to 1 and 2 without
    // waiting out its heartbeat.
    three.task.abort();
    let _ = three.task.await;
    let took = until_divided(&[&one, &two], 120, Duration::from_secs(20)).await;
    assert!(
        took < lease,
        "took over a crashed node's partitions in {took:?}"
    );

    // Node 4 joins and gets its share, handed over by 1 and 2 after draining it.
    let four = drive(&target, 4, lease, &seen);
    until_divided(&[&one, &two, &four], 80, Duration::from_secs(20)).await;

    // Node 1 stops: it drains and releases everything, and 2 and 4 take it.
    one.stop.send_replace(true);
    one.task.await.unwrap();
    until_divided(&[&two, &four], 120, Duration::from_secs(20)).await;
    one_owner_at_a_time(&seen, 3);
    let t = table(&db).await;
    assert!(t.values().all(|(o, _)| *o == Some(2) || *o == Some(4)));
    for d in [two, four] {
        d.stop.send_replace(true);
        d.task.await.unwrap();
    }
    // Both stopped gracefully: nothing is held.
    assert!(table(&db).await.values().all(|(o, _)| o.is_none()));
}
