//! Rebuild through the pool over memory nodes: the pieces of a failed node are
//! recreated on other nodes and their new place committed to the catalogue, so a
//! further m failures among the surviving pieces of a segment lose nothing, and a
//! recovered pool (the engine restarted from the nodes) sees the new places. Without
//! the rebuild the same failures make data unreadable (checked in each test, so the
//! test fails if the rebuild does nothing). A crash in the middle of a rebuild loses
//! nothing, and the rebuild then runs to completion. Through dpud's engine service
//! (its rebuild supervisor drains a node): a volume opened only to be rebuilt is
//! closed once its rebuild is over, while an exported one, and one exported while it
//! is being rebuilt, stay open and keep working.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::pool::{block, create_cluster_of, memory_nodes, spec, stores, Memory, CHUNK};
use engine::api::service::{NodeAdminState, NodeSpec as ApiNode, VolumeService, VolumeState};
use engine::frontend::BlockDevice;
use engine::pipeline::Kek;
use engine::pool::service::{PoolService, RebuildPolicy};
use engine::pool::{NodeConnector, Pool};
use engine::shard::{MemoryShard, ShardStore};
use engine::volume::Volume;

const NODE_BYTES: u64 = 48 << 20;
const BLOCKS: u64 = 1024;

fn profile(protection: &str) -> placement::Profile {
    placement::Profile::from_toml(&format!(
        "schema_version = 1\nname = \"p\"\nprotection = \"{protection}\"\nfailure_domain = \"node\"\ncompression = \"zstd:1\"\n"
    ))
    .expect("profile")
}

struct Setup {
    pool: Pool,
    shards: Vec<Arc<MemoryShard>>,
    kek: Kek,
    model: HashMap<u64, u64>,
}

async fn setup(protection: &str) -> (Setup, Volume) {
    let kek = Kek::generate().expect("kek");
    let (pool, shards) = create_cluster_of(8, NODE_BYTES, &kek).await;
    pool.create_volume("v", profile(protection), BLOCKS * 4096)
        .await
        .expect("create volume");
    let mut volume = pool.open_volume("v", false).await.expect("open");
    let mut model = HashMap::new();
    let mut tag = 0;
    // Enough for several segments (1 MiB chunks), with overwrites.
    for round in 0..480u64 {
        let lba = (round * 53) % (BLOCKS - 8);
        let n = 1 + round % 8;
        let mut data = Vec::new();
        for i in 0..n {
            tag += 1;
            data.extend_from_slice(&block(tag, lba + i));
            model.insert(lba + i, tag);
        }
        volume.write(lba, &data, false).await.expect("write");
    }
    (
        Setup {
            pool,
            shards,
            kek,
            model,
        },
        volume,
    )
}

impl Setup {
    fn shard(&self, id: &str) -> &Arc<MemoryShard> {
        self.shards
            .iter()
            .find(|s| s.info().node == id)
            .expect("node")
    }

    /// Reads every block; the first that does not hold what the model says, or fails.
    async fn first_loss(&self, v: &mut Volume) -> Option<String> {
        for lba in 0..BLOCKS {
            match v.read(lba, 1).await {
                Ok(got) => {
                    let want = self
                        .model
                        .get(&lba)
                        .map_or(vec![0u8; 4096], |t| block(*t, lba));
                    if got != want {
                        return Some(format!("LBA {lba}: wrong data"));
                    }
                }
                Err(e) => return Some(format!("LBA {lba}: {e}")),
            }
        }
        None
    }

    /// The engine crashes (volume and pool dropped, every node loses what it had not
    /// made durable) and comes back from the nodes that are up: the volume reopened
    /// from the recovered catalogue.
    async fn crash_and_reopen(self, volume: Volume) -> (Self, Result<Volume, String>) {
        drop(volume);
        let Self {
            pool,
            shards,
            kek,
            model,
        } = self;
        drop(pool);
        for s in &shards {
            s.power_loss();
        }
        let connector = Memory::of(&shards);
        let pool = Pool::recover(stores(&shards), kek.clone(), &connector)
            .await
            .expect("recover");
        let volume = pool
            .open_volume("v", false)
            .await
            .map_err(|e| format!("reopen: {e}"));
        (
            Self {
                pool,
                shards,
                kek,
                model,
            },
            volume,
        )
    }
}

/// Fails the node of LBA 0's data piece, optionally rebuilds, then fails the m nodes
/// of that segment's parity pieces (always full, where data strips a lone write left
/// empty are known zeroes and need no node). Returns the first loss, if any, seen
/// by the open volume and by the volume reopened after an engine crash.
async fn fail_rebuild_fail(protection: &str, m: usize, rebuild: bool) -> Option<String> {
    let (s, mut volume) = setup(protection).await;
    let placed = volume.nodes_of(0).expect("LBA 0 is mapped");
    let first = volume.record_position(0).expect("LBA 0 is stored").0;
    s.shard(&first).set_offline(true);
    if rebuild {
        let written = volume
            .rebuild_all(std::slice::from_ref(&first))
            .await
            .expect("rebuild");
        assert!(written > 0, "the rebuild wrote nothing");
        check_rebuilt(&s, &volume, &first, true).await;
    }
    for n in &placed[placed.len() - m..] {
        s.shard(n).set_offline(true);
    }
    if let Some(loss) = s.first_loss(&mut volume).await {
        return Some(format!("open volume: {loss}"));
    }
    // The new places are in the catalogue: a restarted engine finds them.
    let (s, volume) = s.crash_and_reopen(volume).await;
    let mut volume = match volume {
        Ok(v) => v,
        Err(e) => return Some(e),
    };
    s.first_loss(&mut volume)
        .await
        .map(|loss| format!("after a restart: {loss}"))
}

async fn check_rebuilt(s: &Setup, volume: &Volume, first: &str, rebuild_did_work: bool) {
    let left = s
        .pool
        .pieces_on(vec![first.to_owned()])
        .await
        .expect("pieces");
    assert!(left.is_empty(), "pieces left on {first}: {left:?}");
    let p = volume.rebuild_progress().expect("progress");
    assert_eq!(p.pieces_left, 0, "{p:?}");
    assert_eq!(p.done_bytes, p.total_bytes, "{p:?}");
    // After a crash mid-rebuild, reopening the volume may already have moved the
    // last pieces (the open segment is sealed away from the unreachable node), so
    // the rebuild that follows can find nothing left to do; what counts is that no
    // piece is left on the node and the data survives m more failures.
    if rebuild_did_work {
        assert!(p.total_bytes > 0, "{p:?}");
    }
    assert!(
        !volume
            .nodes_of(0)
            .expect("mapped")
            .iter()
            .any(|n| n == first),
        "LBA 0's segment still names {first}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn mirror2_rebuild_survives_a_second_failure() {
    assert_eq!(fail_rebuild_fail("mirror:2", 1, true).await, None);
    assert!(
        fail_rebuild_fail("mirror:2", 1, false).await.is_some(),
        "without the rebuild the second failure must lose data (the test would prove nothing)"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn ec42_rebuild_survives_two_more_failures() {
    assert_eq!(fail_rebuild_fail("ec:4+2", 2, true).await, None);
    let without = fail_rebuild_fail("ec:4+2", 2, false).await;
    eprintln!("without the rebuild: {without:?}");
    assert!(
        without.is_some(),
        "without the rebuild two more failures must lose data (the test would prove nothing)"
    );
}

/// A crash after some pieces are committed at their new place and while another is
/// half written: nothing is lost, the volume reopens (degraded), and the rebuild then
/// completes and protects the data against m more failures.
#[tokio::test(flavor = "current_thread")]
async fn a_crash_in_the_middle_of_a_rebuild_loses_nothing() {
    for (protection, m) in [("mirror:2", 1), ("ec:4+2", 2)] {
        let (mut s, mut volume) = setup(protection).await;
        let placed = volume.nodes_of(0).expect("mapped");
        // The node to fail must hold at least two pieces (one moved before the crash,
        // one after). Placement spreads pieces evenly, so with few segments every node
        // may hold one: write more until some node holds two.
        let mut extra = 0u64;
        let first = loop {
            let mut most = (String::new(), 0u64);
            for i in 0..8 {
                let id = format!("node{i}");
                let n: u64 = s
                    .pool
                    .pieces_on(vec![id.clone()])
                    .await
                    .expect("pieces")
                    .iter()
                    .map(|(_, n)| n)
                    .sum();
                if n > most.1 {
                    most = (id, n);
                }
            }
            if most.1 >= 2 {
                break most.0;
            }
            extra += 1;
            assert!(extra < 20, "{protection}: no node holds two pieces");
            for round in 0..120u64 {
                let lba = (round * 37 + extra) % (BLOCKS - 8);
                let tag = 1_000_000 * extra + round;
                volume
                    .write(lba, &block(tag, lba), false)
                    .await
                    .expect("write");
                s.model.insert(lba, tag);
            }
        };
        s.shard(&first).set_offline(true);
        volume
            .start_rebuild(std::slice::from_ref(&first))
            .await
            .expect("start");
        let total = volume.rebuild_progress().expect("progress").pieces_left;
        assert!(
            total >= 2,
            "{protection}: need at least two pieces to move, {total}"
        );
        // One whole piece, then part of the next.
        let mut steps = 0;
        while volume.rebuild_progress().expect("progress").pieces_left == total {
            volume.rebuild_step(1 << 20).await.expect("step");
            steps += 1;
            assert!(steps < 1000, "no piece completes");
        }
        // One row of the next piece.
        volume.rebuild_step(1).await.expect("partial step");
        let moved_before_crash = total - volume.rebuild_progress().expect("progress").pieces_left;
        assert!(moved_before_crash >= 1);
        let (s, volume) = s.crash_and_reopen(volume).await;
        let mut volume = volume.expect("reopen after a crash mid-rebuild");
        let still = s.pool.pieces_on(vec![first.clone()]).await.expect("pieces");
        let still_n: u64 = still.iter().map(|(_, n)| n).sum();
        assert!(
            still_n > 0 && still_n < total,
            "{protection}: committed moves survive the crash, the rest do not: {still_n} of {total} left"
        );
        assert_eq!(
            s.first_loss(&mut volume).await,
            None,
            "{protection} after the crash"
        );
        volume
            .rebuild_all(std::slice::from_ref(&first))
            .await
            .expect("rebuild again");
        check_rebuilt(&s, &volume, &first, false).await;
        for n in &placed[placed.len() - m..] {
            s.shard(n).set_offline(true);
        }
        assert_eq!(
            s.first_loss(&mut volume).await,
            None,
            "{protection} after more failures"
        );
    }
}

fn api_node(i: usize, state: NodeAdminState) -> ApiNode {
    let s = spec(i);
    ApiNode {
        name: s.id,
        address: s.address,
        nqn: s.nqn,
        domain: s.domain,
        weight: 1,
        state,
    }
}

/// The volumes the service has open (its per-volume metrics cover exactly those).
async fn open_volumes(svc: &PoolService) -> Vec<String> {
    let mut names: Vec<String> = svc
        .metrics()
        .await
        .expect("metrics")
        .into_iter()
        .map(|m| m.name)
        .collect();
    names.sort();
    names
}

/// 64 KiB of volume `tag` at `offset` (16 blocks).
fn chunk64k(tag: u64, offset: u64) -> Vec<u8> {
    (0..16u64)
        .flat_map(|i| block(tag, offset / 4096 + i))
        .collect()
}

/// Writes `mib` MiB of volume `tag` from offset 0, flushed.
async fn fill(dev: &dyn BlockDevice, tag: u64, mib: u64) {
    for i in 0..mib * 16 {
        let at = i * 65536;
        dev.write(at, chunk64k(tag, at), false)
            .await
            .expect("write");
    }
    dev.flush().await.expect("flush");
}

/// The first 64 KiB piece of the `mib` MiB `fill` wrote that does not read back.
async fn first_difference(dev: &dyn BlockDevice, tag: u64, mib: u64) -> Option<u64> {
    for i in 0..mib * 16 {
        let at = i * 65536;
        match dev.read(at, 65536).await {
            Ok(d) if d == chunk64k(tag, at) => {}
            _ => return Some(at),
        }
    }
    None
}

/// dpud's engine restarted over three nodes holding three mirrored volumes; a fourth
/// node joins and the first is drained. Volume "held" is exported before the drain,
/// "late" only once the supervisor has opened it for its rebuild and is still moving
/// its pieces, "idle" never: after the rebuild "idle" is closed (and stays closed),
/// the other two stay open and their handles keep working, no rebuild is reported and
/// every volume holds its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_opened_only_for_its_rebuild_is_closed_when_it_is_over() {
    const MIB: u64 = 3;
    let shards = memory_nodes(4, NODE_BYTES);
    let connector: Arc<dyn NodeConnector> = Arc::new(Memory::of(&shards));
    let kek = Kek::generate().expect("kek");
    let levels = vec!["rack".to_owned(), "node".to_owned()];
    let up = |n: usize| (0..n).map(|i| api_node(i, NodeAdminState::Up)).collect();
    let volumes = [("held", 1), ("idle", 2), ("late", 3)];

    // The volumes are written, then the engine stops (every volume closed).
    let first = PoolService::new(kek.clone(), levels.clone(), 1, Arc::clone(&connector))
        .expect("service")
        .with_chunk_size(CHUNK);
    first.set_nodes(up(3)).await.expect("nodes");
    let p = placement::Profile::from_toml(
        "schema_version = 1\nname = \"m3\"\nprotection = \"mirror:3\"\nfailure_domain = \"node\"\ncompression = \"off\"\n",
    )
    .expect("profile");
    for (name, tag) in volumes {
        first
            .create_volume(name, p.clone(), 16 << 20)
            .await
            .expect("create");
        let dev = first.device(name).await.expect("device").expect("exists");
        fill(&*dev, tag, MIB).await;
    }
    first.shutdown().await.expect("shutdown");
    drop(first);

    // Restarted: pieces move at 1 MiB/s per volume, so each volume's rebuild (three
    // pieces or more on node0) takes two seconds or more.
    let svc = PoolService::new(kek, levels, 1, connector)
        .expect("service")
        .with_chunk_size(CHUNK)
        .with_rebuild_policy(RebuildPolicy {
            grace: std::time::Duration::from_secs(3600),
            bytes_per_second: 1 << 20,
            interval: std::time::Duration::from_millis(50),
        });
    svc.set_nodes(up(3)).await.expect("recover");
    svc.set_nodes(up(4)).await.expect("add node3");
    let held = svc.device("held").await.expect("device").expect("exists");
    assert_eq!(open_volumes(&svc).await, ["held"]);
    let mut drain: Vec<ApiNode> = up(4);
    drain[0].state = NodeAdminState::Draining;
    svc.set_nodes(drain).await.expect("drain");

    // "late" is exported while the supervisor rebuilds it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !open_volumes(&svc).await.iter().any(|v| v == "late") {
        assert!(std::time::Instant::now() < deadline, "late never opened");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let status = svc.status().await.expect("status");
    assert!(
        status.rebuilds.iter().any(|r| r.volume == "late"),
        "late is not being rebuilt: {status:?}"
    );
    let late = svc.device("late").await.expect("device").expect("exists");

    // The rebuild ends: node0 holds nothing, "idle" is closed.
    loop {
        let status = svc.status().await.expect("status");
        let node0 = status
            .nodes
            .iter()
            .find(|n| n.name == "node0")
            .expect("node0");
        let open = open_volumes(&svc).await;
        if node0.pieces == 0 && status.rebuilds.is_empty() && open == ["held", "late"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rebuild not over, or the wrong volumes open: {open:?} {status:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Closed for good: later rounds do not open it again.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(open_volumes(&svc).await, ["held", "late"]);
    let status = svc.status().await.expect("status");
    assert!(status.rebuilds.is_empty(), "{status:?}");
    for v in &status.volumes {
        assert_eq!(v.state, VolumeState::Healthy, "{status:?}");
    }

    // The exported handles keep working, and every volume holds its data.
    for (dev, tag) in [(&held, 1), (&late, 3)] {
        assert_eq!(first_difference(&**dev, tag, MIB).await, None);
        let at = MIB << 20;
        dev.write(at, chunk64k(tag + 10, at), true)
            .await
            .expect("write after the rebuild");
        assert_eq!(
            dev.read(at, 65536).await.expect("read"),
            chunk64k(tag + 10, at)
        );
    }
    let idle = svc.device("idle").await.expect("device").expect("exists");
    assert_eq!(first_difference(&*idle, 2, MIB).await, None);
    assert_eq!(open_volumes(&svc).await, ["held", "idle", "late"]);
    drop((held, late, idle));
    svc.shutdown().await.expect("shutdown");
}
