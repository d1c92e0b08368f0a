//! The metadata layer over memory shards: format, the mirrored commit, recovery of the
//! newest commit through node failures, torn slots, corruption and power loss, and a
//! property test of "load returns the last successful commit" over random histories.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use engine::metadata::{
    format_node, generation_counter, generation_session, inspect_node, read_superblock, ClusterId,
    MetaNode, MetaStore, MetadataError, SlotState, Superblock, MIB, ROOT_OFFSET, ROOT_SLOT_LEN,
};
use engine::shard::{MemoryShard, ShardError, ShardFuture, ShardInfo, ShardStore};
use proptest::prelude::*;

const CAP: u64 = 16 * MIB;
const CHUNK: u64 = MIB;

fn cluster(tag: u8) -> ClusterId {
    ClusterId([tag; 16])
}

fn shards(n: usize) -> Vec<Arc<MemoryShard>> {
    (0..n)
        .map(|i| Arc::new(MemoryShard::new(format!("n{i}"), CAP, 4096)))
        .collect()
}

fn dyns(s: &[Arc<MemoryShard>]) -> Vec<Arc<dyn ShardStore>> {
    s.iter()
        .map(|s| Arc::clone(s) as Arc<dyn ShardStore>)
        .collect()
}

async fn format_all(s: &[Arc<MemoryShard>], c: ClusterId) -> Vec<MetaNode> {
    let mut nodes = Vec::new();
    for shard in s {
        let id = shard.info().node.clone();
        let superblock = format_node(&**shard, c, &id, CHUNK).await.unwrap();
        nodes.push(MetaNode {
            shard: Arc::clone(shard) as Arc<dyn ShardStore>,
            superblock,
        });
    }
    nodes
}

async fn setup(n: usize, min_acks: usize) -> (Vec<Arc<MemoryShard>>, MetaStore) {
    let s = shards(n);
    let nodes = format_all(&s, cluster(1)).await;
    (s, MetaStore::new(cluster(1), nodes, min_acks))
}

async fn load(s: &[Arc<MemoryShard>], min_acks: usize) -> (MetaStore, engine::metadata::Recovered) {
    let (store, rec) = MetaStore::load(dyns(s), Some(cluster(1)), min_acks)
        .await
        .unwrap();
    (store, rec.expect("something was committed"))
}

/// The (slot offset, generation) of every valid root on a node.
async fn roots(s: &MemoryShard) -> Vec<(u64, u64)> {
    inspect_node(s)
        .await
        .unwrap()
        .slots
        .into_iter()
        .filter_map(|(at, st)| match st {
            SlotState::Valid(r) => Some((at, r.header.generation)),
            _ => None,
        })
        .collect()
}

/// Garbles the root of `generation` on a node (a torn write of that slot).
async fn tear_root(s: &MemoryShard, generation: u64) -> bool {
    for (at, g) in roots(s).await {
        if g == generation {
            assert!(s.corrupt(at + 40, 0x5a));
            return true;
        }
    }
    false
}

fn ckpt(tag: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            u8::try_from(u32::try_from(i).unwrap().wrapping_mul(31).wrapping_add(tag) % 251)
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn format_and_load_round_trip() {
    let s = shards(3);
    let c = ClusterId::generate().unwrap();
    let nodes = format_all(&s, c).await;
    for (shard, node) in s.iter().zip(&nodes) {
        let read = read_superblock(&**shard).await.unwrap().unwrap();
        assert_eq!(read, node.superblock);
        assert_eq!(read.node_id, shard.info().node);
        assert_eq!(read.layout.capacity, CAP);
        assert_eq!(read.layout.chunk_base(0), Some(read.layout.chunk_offset));
    }
    let mut store = MetaStore::new(c, nodes, 2);
    assert_eq!(store.generation(), 0);
    let big = ckpt(7, 300_000);
    let rep = store.commit(b"root one", Some(&big)).await.unwrap();
    assert_eq!(rep.acked.len(), 3);
    assert!(rep.failed.is_empty());
    assert_eq!(store.generation(), rep.generation);

    let (loaded, rec) = MetaStore::load(dyns(&s), None, 2).await.unwrap();
    let rec = rec.unwrap();
    assert_eq!(loaded.cluster(), c);
    assert_eq!(rec.generation, rep.generation);
    assert_eq!(rec.root, b"root one");
    assert_eq!(rec.checkpoint.as_deref(), Some(&big[..]));
    assert!(rec.stale_nodes.is_empty());
    assert!(rec.unreachable.is_empty());
    let mut ids = loaded.nodes();
    ids.sort();
    assert_eq!(ids, ["n0", "n1", "n2"]);
}

#[tokio::test]
async fn blank_nodes_load_as_an_empty_store_and_mixed_ones_are_refused() {
    let s = shards(2);
    let (store, rec) = MetaStore::load(dyns(&s), Some(cluster(3)), 1)
        .await
        .unwrap();
    assert!(rec.is_none());
    assert!(store.nodes().is_empty());
    assert_eq!(store.cluster(), cluster(3));
    assert!(read_superblock(&*s[0]).await.unwrap().is_none());

    format_node(&*s[0], cluster(3), "n0", CHUNK).await.unwrap();
    let err = MetaStore::load(dyns(&s), None, 1).await.unwrap_err();
    assert!(matches!(err, MetadataError::NotFormatted { .. }), "{err}");
    assert!(err.to_string().contains("n1"), "{err}");

    // Formatted, nothing committed: a store with the node, nothing recovered.
    let (store, rec) = MetaStore::load(dyns(&s[..1]), None, 1).await.unwrap();
    assert!(rec.is_none());
    assert_eq!(store.nodes(), ["n0"]);

    // All unreachable: never mistaken for a fresh cluster.
    s[0].set_offline(true);
    let err = MetaStore::load(dyns(&s[..1]), None, 1).await.unwrap_err();
    assert!(matches!(err, MetadataError::NoneReachable { .. }), "{err}");
}

#[tokio::test]
async fn format_is_idempotent_and_refuses_a_foreign_node() {
    let s = shards(2);
    let a = format_node(&*s[0], cluster(1), "n0", CHUNK).await.unwrap();
    let again = format_node(&*s[0], cluster(1), "n0", 2 * CHUNK)
        .await
        .unwrap();
    assert_eq!(
        a, again,
        "an existing superblock is returned, not rewritten"
    );

    let err = format_node(&*s[0], cluster(2), "n0", CHUNK)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, MetadataError::AlreadyFormatted { .. }),
        "{msg}"
    );
    assert!(msg.contains(&cluster(1).to_string()) && msg.contains(&cluster(2).to_string()));
    let err = format_node(&*s[0], cluster(1), "other", CHUNK)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("other") && err.to_string().contains("n0"),
        "{err}"
    );

    // Loading nodes of two clusters is refused, naming them.
    format_node(&*s[1], cluster(2), "n1", CHUNK).await.unwrap();
    let err = MetaStore::load(dyns(&s), None, 1).await.unwrap_err();
    assert!(
        matches!(err, MetadataError::ClusterMismatch { .. }),
        "{err}"
    );
    let err = MetaStore::load(dyns(&s[..1]), Some(cluster(2)), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(err, MetadataError::ClusterMismatch { .. }),
        "{err}"
    );

    // Too small a namespace names the minimum.
    let tiny = MemoryShard::new("tiny", 8 * MIB, 4096);
    let err = format_node(&tiny, cluster(1), "tiny", CHUNK)
        .await
        .unwrap_err();
    assert!(
        matches!(err, MetadataError::CapacityTooSmall { minimum, .. } if minimum == 12 * MIB),
        "{err}"
    );
}

#[tokio::test]
async fn superblock_survives_one_bad_copy_but_not_two() {
    let s = MemoryShard::new("n0", CAP, 4096);
    let sb = format_node(&s, cluster(1), "n0", CHUNK).await.unwrap();
    assert!(s.corrupt(20, 1));
    assert_eq!(read_superblock(&s).await.unwrap(), Some(sb.clone()));
    s.add_bad_block(4096);
    assert!(matches!(
        read_superblock(&s).await,
        Err(MetadataError::Corrupt { .. })
    ));
    assert!(s.corrupt(20, 1));
    assert_eq!(read_superblock(&s).await.unwrap(), Some(sb));
    // A version from the future is an error, not "blank".
    s.corrupt(8, 0x02);
    assert!(matches!(
        read_superblock(&s).await,
        Err(MetadataError::UnsupportedVersion { found: 3, .. })
    ));
}

#[tokio::test]
async fn large_blocks_put_the_backup_superblock_in_the_second_block() {
    let s = MemoryShard::new("big-block", CAP, 8192);
    let err = format_node(&s, cluster(1), "n0", 4096).await.unwrap_err();
    assert!(matches!(err, MetadataError::InvalidLayout { .. }), "{err}");
    let sb = format_node(&s, cluster(1), "n0", CHUNK).await.unwrap();
    assert_eq!(sb.layout.block_size, 8192);
    // Primary gone: the copy in the second block (8192) still identifies the node.
    s.write(0, vec![0; 8192], true).await.unwrap();
    assert_eq!(read_superblock(&s).await.unwrap(), Some(sb.clone()));
    let shard: Arc<dyn ShardStore> = Arc::new(s);
    let mut store = MetaStore::new(
        cluster(1),
        vec![MetaNode {
            shard: Arc::clone(&shard),
            superblock: sb,
        }],
        1,
    );
    store.commit(b"r", Some(&ckpt(1, 10_000))).await.unwrap();
    let (_, rec) = MetaStore::load(vec![shard], None, 1).await.unwrap();
    assert_eq!(rec.unwrap().checkpoint, Some(ckpt(1, 10_000)));
}

#[tokio::test]
async fn removed_nodes_are_not_written_and_min_acks_is_capped_at_the_node_count() {
    let (s, mut store) = setup(3, 2).await;
    store.commit(b"all", None).await.unwrap();
    store.remove_node("n2");
    assert_eq!(store.nodes(), ["n0", "n1"]);
    store.set_min_acks(5);
    let rep = store.commit(b"two nodes", None).await.unwrap();
    assert_eq!(rep.acked, ["n0", "n1"]);
    s[1].set_offline(true);
    let err = store.commit(b"one node", None).await.unwrap_err();
    assert!(
        matches!(err, MetadataError::CommitFailed { needed: 2, .. }),
        "{err}"
    );
    let (_, rec) = load(&s[2..], 1).await;
    assert_eq!(rec.root, b"all", "the removed node was left alone");
}

#[tokio::test]
async fn twenty_commits_alternate_slots_and_load_returns_the_last() {
    let (s, mut store) = setup(3, 2).await;
    let mut last_slot = None;
    let mut last_ckpt = None;
    for i in 0..20u32 {
        let c = (i % 3 == 0).then(|| ckpt(i, 5000 + i as usize));
        let rep = store
            .commit(format!("root {i}").as_bytes(), c.as_deref())
            .await
            .unwrap();
        if c.is_some() {
            last_ckpt = c;
        }
        assert_eq!(generation_counter(rep.generation), u64::from(i) + 1);
        for shard in &s {
            let r = roots(shard).await;
            let newest = r.iter().max_by_key(|(_, g)| *g).unwrap();
            assert_eq!(newest.1, rep.generation);
            if i > 0 {
                assert_eq!(r.len(), 2, "both slots hold a root after two commits");
            }
        }
        let slot = roots(&s[0])
            .await
            .into_iter()
            .max_by_key(|(_, g)| *g)
            .unwrap()
            .0;
        assert_ne!(Some(slot), last_slot, "commit {i} reused the newest slot");
        last_slot = Some(slot);
    }
    let (_, rec) = load(&s, 2).await;
    assert_eq!(rec.generation, store.generation());
    assert_eq!(rec.root, b"root 19");
    assert_eq!(rec.checkpoint, last_ckpt);
}

#[tokio::test]
async fn a_torn_newest_root_on_one_node_still_loads_the_newest() {
    let (s, mut store) = setup(3, 2).await;
    store.commit(b"one", Some(&ckpt(1, 100))).await.unwrap();
    let g2 = store.commit(b"two", None).await.unwrap().generation;
    assert!(tear_root(&s[0], g2).await);
    let (_, rec) = load(&s, 2).await;
    assert_eq!((rec.generation, rec.root.as_slice()), (g2, &b"two"[..]));
    assert_eq!(rec.stale_nodes, ["n0"]);
    assert_ne!(rec.from_node, "n0");
}

#[tokio::test]
async fn a_root_torn_on_every_node_loads_the_previous_generation() {
    let (s, mut store) = setup(3, 2).await;
    let g1 = store
        .commit(b"one", Some(&ckpt(1, 100)))
        .await
        .unwrap()
        .generation;
    // The commit that tears carries a new checkpoint: the previous root's checkpoint
    // must still be intact in the other half.
    let g2 = store
        .commit(b"two", Some(&ckpt(2, 100)))
        .await
        .unwrap()
        .generation;
    for shard in &s {
        assert!(tear_root(shard, g2).await);
    }
    let (_, rec) = load(&s, 2).await;
    assert_eq!(rec.generation, g1);
    assert_eq!(rec.root, b"one");
    assert_eq!(rec.checkpoint, Some(ckpt(1, 100)));
}

#[tokio::test]
async fn min_acks_is_enforced_and_the_generation_still_advances() {
    let (s, mut store) = setup(3, 2).await;
    let g1 = store
        .commit(b"one", Some(&ckpt(1, 64)))
        .await
        .unwrap()
        .generation;
    s[1].set_offline(true);
    s[2].set_offline(true);
    let err = store.commit(b"two", Some(&ckpt(2, 64))).await.unwrap_err();
    let MetadataError::CommitFailed {
        generation,
        needed,
        acked,
        failed,
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!((*needed, acked.as_slice()), (2, &["n0".to_string()][..]));
    assert_eq!(failed.len(), 2);
    assert!(
        failed.iter().all(|(_, why)| why.contains("offline")),
        "{err}"
    );
    assert!(*generation > g1);
    assert_eq!(store.generation(), *generation);
    let failed_gen = *generation;

    s[1].set_offline(false);
    let rep = store.commit(b"three", None).await.unwrap();
    assert!(
        rep.generation > failed_gen,
        "a failed generation is never reused"
    );
    assert_eq!(rep.resynced, ["n1"], "n1 missed checkpoint 2");
    s[2].set_offline(false);
    let (_, rec) = load(&s, 2).await;
    assert_eq!(rec.generation, rep.generation);
    assert_eq!(rec.root, b"three");
    assert_eq!(rec.checkpoint, Some(ckpt(2, 64)));
    assert_eq!(rec.stale_nodes, ["n2"]);
}

#[tokio::test]
async fn a_node_down_during_a_checkpoint_commit_is_resynced_by_the_next_commit() {
    let (s, mut store) = setup(3, 2).await;
    store.commit(b"one", Some(&ckpt(1, 10_000))).await.unwrap();
    s[2].set_offline(true);
    let rep = store.commit(b"two", Some(&ckpt(2, 20_000))).await.unwrap();
    assert_eq!(rep.failed.len(), 1);
    s[2].set_offline(false);
    // n2 alone still has generation one.
    let (_, rec) = load(&s[2..], 1).await;
    assert_eq!(rec.root, b"one");
    let rep = store.commit(b"three", None).await.unwrap();
    assert_eq!(rep.resynced, ["n2"]);
    assert_eq!(rep.acked.len(), 3);
    // n2 alone now serves the newest root and the checkpoint it missed.
    let (_, rec) = load(&s[2..], 1).await;
    assert_eq!(rec.generation, rep.generation);
    assert_eq!(rec.root, b"three");
    assert_eq!(rec.checkpoint, Some(ckpt(2, 20_000)));
    // A later commit does not rewrite the checkpoint again.
    let rep = store.commit(b"four", None).await.unwrap();
    assert!(rep.resynced.is_empty());
}

fn subsets(n: usize, min_size: usize) -> Vec<Vec<usize>> {
    (0u32..(1 << n))
        .filter(|m| m.count_ones() as usize >= min_size)
        .map(|m| (0..n).filter(|i| m & (1 << i) != 0).collect())
        .collect()
}

fn pick(s: &[Arc<MemoryShard>], idx: &[usize]) -> Vec<Arc<MemoryShard>> {
    idx.iter().map(|&i| Arc::clone(&s[i])).collect()
}

#[tokio::test]
async fn load_from_any_subset_missing_at_most_min_acks_minus_one_finds_the_newest() {
    let (s, mut store) = setup(5, 3).await;
    let mut newest = None;
    // Each commit runs with a different pair of nodes down (at most n - min_acks).
    for i in 0..10usize {
        let down = [i % 5, (i + 2) % 5];
        for &d in &down {
            s[d].set_offline(true);
        }
        let c = (i % 2 == 0).then(|| ckpt(u32::try_from(i).unwrap(), 1000 + i));
        let rep = store
            .commit(format!("r{i}").as_bytes(), c.as_deref())
            .await
            .unwrap();
        assert_eq!(rep.acked.len(), 3);
        newest = Some((rep.generation, format!("r{i}")));
        for &d in &down {
            s[d].set_offline(false);
        }
    }
    let (g, root) = newest.unwrap();
    for sub in subsets(5, 3) {
        let (_, rec) = load(&pick(&s, &sub), 3).await;
        assert_eq!(
            (rec.generation, rec.root.as_slice()),
            (g, root.as_bytes()),
            "{sub:?}"
        );
        assert_eq!(rec.checkpoint, Some(ckpt(8, 1008)), "{sub:?}");
    }
}

/// Offset of the (only) checkpoint half holding a checkpoint on a node.
async fn half_at(shard: &MemoryShard) -> u64 {
    inspect_node(shard)
        .await
        .unwrap()
        .halves
        .into_iter()
        .find(|(_, h)| h.is_ok())
        .unwrap()
        .0
}

#[tokio::test]
async fn a_corrupt_checkpoint_falls_back_to_another_node_with_the_same_root() {
    let (s, mut store) = setup(3, 2).await;
    let c = ckpt(9, 50_000);
    let g = store.commit(b"root", Some(&c)).await.unwrap().generation;
    let (_, rec) = load(&s, 2).await;
    let first = rec.from_node.clone();
    let idx: usize = first[1..].parse().unwrap();
    let at = half_at(&s[idx]).await;
    assert!(s[idx].corrupt(at + 128 + 40_000, 0x10));
    let (_, rec) = load(&s, 2).await;
    assert_eq!(
        (rec.generation, rec.checkpoint.as_deref()),
        (g, Some(&c[..]))
    );
    assert_ne!(rec.from_node, first);

    // Corrupt it everywhere: the newest root's checkpoint verifies nowhere, and load
    // says so instead of going back to an older generation.
    for shard in &s {
        let at = half_at(shard).await;
        if shard.info().node != first {
            assert!(shard.corrupt(at + 128 + 7, 0x01));
        }
    }
    let err = MetaStore::load(dyns(&s), Some(cluster(1)), 2)
        .await
        .unwrap_err();
    let MetadataError::MetadataLost { generation, tried } = &err else {
        panic!("{err}");
    };
    assert_eq!(*generation, g);
    assert_eq!(tried.len(), 3, "{err}");
}

#[tokio::test]
async fn metadata_lost_rather_than_an_older_generation() {
    let (s, mut store) = setup(2, 2).await;
    store.commit(b"old", Some(&ckpt(1, 4000))).await.unwrap();
    let g = store
        .commit(b"new", Some(&ckpt(2, 4000)))
        .await
        .unwrap()
        .generation;
    // A media error under the newest checkpoint on both nodes.
    for shard in &s {
        let ins = inspect_node(&**shard).await.unwrap();
        let (at, _) = ins
            .halves
            .iter()
            .find(|(_, h)| h.as_ref().is_ok_and(|r| r.sequence == 2))
            .unwrap();
        shard.add_bad_block(at + 4096);
    }
    let err = MetaStore::load(dyns(&s), Some(cluster(1)), 2)
        .await
        .unwrap_err();
    assert!(
        matches!(err, MetadataError::MetadataLost { generation, .. } if generation == g),
        "{err}"
    );
}

#[tokio::test]
async fn power_loss_after_a_commit_keeps_everything() {
    let (s, mut store) = setup(3, 2).await;
    let c = ckpt(4, 123_456);
    let g = store.commit(b"durable", Some(&c)).await.unwrap().generation;
    for shard in &s {
        shard.power_loss();
    }
    let (_, rec) = load(&s, 2).await;
    assert_eq!((rec.generation, rec.root.as_slice()), (g, &b"durable"[..]));
    assert_eq!(rec.checkpoint, Some(c));
    for shard in &s {
        assert_eq!(
            read_superblock(&**shard).await.unwrap().unwrap().node_id,
            shard.info().node
        );
    }
}

#[tokio::test]
async fn too_large_payloads_are_refused_before_any_write() {
    let (s, mut store) = setup(2, 1).await;
    assert_eq!(store.max_root_len(), MIB - 128);
    assert_eq!(store.max_checkpoint_len(), 4 * MIB - 128);
    let g = store.commit(b"small", None).await.unwrap().generation;
    let err = store
        .commit(&vec![0; usize::try_from(2 * MIB).unwrap()], None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, MetadataError::TooLarge { what: "root", .. }),
        "{err}"
    );
    let err = store
        .commit(b"x", Some(&vec![0; usize::try_from(5 * MIB).unwrap()]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, MetadataError::TooLarge { what: "checkpoint", len, max } if len == 5 * MIB && max < 4 * MIB),
        "{err}"
    );
    assert_eq!(store.generation(), g, "nothing was attempted");
    let (_, rec) = load(&s, 1).await;
    assert_eq!(rec.root, b"small");
}

#[tokio::test]
async fn mixed_block_sizes_and_a_node_too_small_for_the_checkpoint() {
    // Two 256 MiB nodes (8 MiB checkpoint halves), one with 512-byte blocks.
    let s = vec![
        Arc::new(MemoryShard::new("big0", 256 * MIB, 512)),
        Arc::new(MemoryShard::new("big1", 256 * MIB, 4096)),
    ];
    let nodes = format_all(&s, cluster(1)).await;
    assert_eq!(nodes[0].superblock.layout.ckpt_half_len, 8 * MIB);
    let mut store = MetaStore::new(cluster(1), nodes, 2);
    let c = ckpt(5, usize::try_from(6 * MIB).unwrap());
    store.commit(b"r1", Some(&c)).await.unwrap();
    // A small node (4 MiB halves) joins: the current checkpoint cannot be resynced to
    // it, which is reported for that node instead of overrunning its chunks.
    let small = Arc::new(MemoryShard::new("small", CAP, 4096));
    let mut more = format_all(std::slice::from_ref(&small), cluster(1)).await;
    store.add_node(more.remove(0));
    let rep = store.commit(b"r2", None).await.unwrap();
    assert_eq!(rep.acked, ["big0", "big1"]);
    assert_eq!(rep.failed.len(), 1);
    assert!(rep.failed[0].1.contains("exceeds"), "{:?}", rep.failed);
    assert_eq!(
        inspect_node(&*small)
            .await
            .unwrap()
            .halves
            .iter()
            .filter(|(_, h)| h.is_ok())
            .count(),
        0
    );
    // New checkpoints must now fit the smallest node.
    let err = store.commit(b"r3", Some(&c)).await.unwrap_err();
    assert!(matches!(err, MetadataError::TooLarge { .. }), "{err}");
    let (_, rec) = load(&s, 2).await;
    assert_eq!(
        (rec.root.as_slice(), rec.checkpoint.as_deref()),
        (&b"r2"[..], Some(&c[..]))
    );
}

#[tokio::test]
async fn a_root_write_whose_completion_was_lost_keeps_its_checkpoint() {
    // n0's writes land but report failure (a timeout after the media took them): the
    // store must assume the root may be there and keep the checkpoint it references.
    let s = shards(3);
    let flaky: Vec<Arc<Flaky>> = s.iter().map(Flaky::new).collect();
    let nodes = format_all(&s, cluster(1))
        .await
        .into_iter()
        .zip(&flaky)
        .map(|(n, f)| MetaNode {
            shard: Arc::clone(f) as Arc<dyn ShardStore>,
            superblock: n.superblock,
        })
        .collect();
    let mut store = MetaStore::new(cluster(1), nodes, 2);
    store.commit(b"one", Some(&ckpt(1, 500))).await.unwrap();
    flaky[0].lose_acks(Some(ROOT_WRITES));
    s[1].set_offline(true);
    s[2].set_offline(true);
    let g2 = match store.commit(b"two", Some(&ckpt(2, 500))).await {
        Err(MetadataError::CommitFailed { generation, .. }) => generation,
        other => panic!("{other:?}"),
    };
    let g3 = match store.commit(b"three", Some(&ckpt(3, 500))).await {
        Err(MetadataError::CommitFailed { generation, .. }) => generation,
        other => panic!("{other:?}"),
    };
    // Both attempts are on n0; loading n0 and n1 (missing one node, min_acks - 1)
    // returns the later one.
    s[1].set_offline(false);
    let (_, rec) = load(&s[..2], 2).await;
    assert_eq!((rec.generation, rec.root.as_slice()), (g3, &b"three"[..]));
    assert_eq!(rec.checkpoint, Some(ckpt(3, 500)));
    // "three" was written beside "two", not over it, and checkpoint 3 beside
    // checkpoint 2: with "three" torn, n0 still has "two" whole.
    assert!(tear_root(&s[0], g3).await);
    let (_, rec) = load(&s[..2], 2).await;
    assert_eq!((rec.generation, rec.root.as_slice()), (g2, &b"two"[..]));
    assert_eq!(rec.checkpoint, Some(ckpt(2, 500)));
}

#[tokio::test]
async fn a_new_session_outranks_failed_attempts_the_loader_did_not_see() {
    // n0 alone receives two failed commits; the engine "crashes"; a new engine loads
    // from n1 and n2 only (n0 unreachable) and commits. Loading n0 with n1 must return
    // the new engine's commit, although n0's leftovers have higher counters.
    let (s, mut store) = setup(3, 2).await;
    store.commit(b"base", Some(&ckpt(1, 100))).await.unwrap();
    s[1].set_offline(true);
    s[2].set_offline(true);
    for i in 0..3 {
        let r = store
            .commit(format!("lost {i}").as_bytes(), Some(&ckpt(10 + i, 100)))
            .await;
        assert!(r.is_err());
    }
    drop(store);
    s[0].set_offline(true);
    s[1].set_offline(false);
    s[2].set_offline(false);
    let (mut store2, rec) = MetaStore::load(dyns(&s), Some(cluster(1)), 2)
        .await
        .unwrap();
    let rec = rec.unwrap();
    assert_eq!(rec.root, b"base");
    assert_eq!(rec.unreachable.len(), 1);
    let rep = store2.commit(b"after restart", None).await.unwrap();
    assert!(generation_session(rep.generation) > generation_session(rec.generation));
    s[0].set_offline(false);
    for sub in [vec![0, 1], vec![0, 2], vec![0, 1, 2]] {
        let (_, rec) = load(&pick(&s, &sub), 2).await;
        assert_eq!(rec.root, b"after restart", "{sub:?}");
        assert_eq!(rec.generation, rep.generation);
        assert_eq!(rec.checkpoint, Some(ckpt(1, 100)));
    }
    // The node that was away joins the store and is brought up to date.
    let sb: Superblock = read_superblock(&*s[0]).await.unwrap().unwrap();
    store2.add_node(MetaNode {
        shard: Arc::clone(&s[0]) as Arc<dyn ShardStore>,
        superblock: sb,
    });
    let rep = store2.commit(b"with n0", None).await.unwrap();
    assert_eq!(rep.acked.len(), 3);
    assert_eq!(rep.resynced, ["n0"]);
    let (_, rec) = load(&s[..1], 1).await;
    assert_eq!(rec.root, b"with n0");
    assert_eq!(rec.checkpoint, Some(ckpt(1, 100)));
}

#[tokio::test]
async fn random_bytes_in_the_metadata_areas_never_panic() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..40 {
        let (s, mut store) = setup(1, 1).await;
        store.commit(b"r", Some(&ckpt(1, 9000))).await.unwrap();
        let layout = read_superblock(&*s[0]).await.unwrap().unwrap().layout;
        let areas = [
            (0, 8192),
            (layout.root_offset, 2 * layout.root_slot_len),
            (layout.ckpt_offset, 2 * layout.ckpt_half_len),
        ];
        let (base, len) = areas[round % 3];
        // Overwrite whole headers with noise half the time, else flip scattered bytes.
        if round % 2 == 0 {
            for area in 0..2u64 {
                // Superblock copies are 4 KiB apart, slots and halves `len / 2`.
                let at = if base == 0 {
                    area * 4096
                } else {
                    base + area * (len / 2)
                };
                let noise: Vec<u8> = (0..4096).map(|_| next().to_le_bytes()[0]).collect();
                s[0].write(at, noise, true).await.unwrap();
            }
        } else {
            for _ in 0..64 {
                let at = base + next() % len;
                s[0].corrupt(at, u8::try_from(next() % 255 + 1).unwrap());
            }
        }
        // Errors are fine; panics are not. Whatever loads must be what was written.
        if let Ok((_, Some(rec))) = MetaStore::load(dyns(&s), None, 1).await {
            assert_eq!(rec.root, b"r");
            assert_eq!(rec.checkpoint, Some(ckpt(1, 9000)));
        }
        let _ = inspect_node(&*s[0]).await;
    }
}

// ---- property test -------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    /// Commit (the payload is unique per op), with or without a checkpoint.
    Commit { with_ckpt: bool },
    /// Take a node offline or bring it back.
    Toggle(usize),
    /// The engine crashes right after its last commit attempt, whose root writes were
    /// torn on the nodes in the mask; a new engine loads from the nodes that are up
    /// (bringing nodes back until at most min_acks - 1 are missing) and continues.
    CrashTear(u8),
    /// A read-only load from a random subset missing at most min_acks - 1 nodes.
    Check(u8),
    /// On a node, writes land but their completion is lost (a timeout after the media
    /// took them): 0 = none, 1 = root writes only, 2 = every write.
    LoseAcks(usize, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<bool>().prop_map(|with_ckpt| Op::Commit { with_ckpt }),
        3 => (0usize..4).prop_map(Op::Toggle),
        1 => any::<u8>().prop_map(Op::CrashTear),
        1 => any::<u8>().prop_map(Op::Check),
        1 => ((0usize..4), (0u8..3)).prop_map(|(i, k)| Op::LoseAcks(i, k)),
    ]
}

const NODES: usize = 4;
const MIN_ACKS: usize = 2;

/// A memory node whose writes can land and still report failure: those starting in
/// the byte range `lose` (all writes, or only root-slot writes).
#[derive(Debug)]
struct Flaky {
    inner: Arc<MemoryShard>,
    lose: std::sync::Mutex<Option<std::ops::Range<u64>>>,
}

impl Flaky {
    fn new(inner: &Arc<MemoryShard>) -> Arc<Flaky> {
        Arc::new(Flaky {
            inner: Arc::clone(inner),
            lose: std::sync::Mutex::new(None),
        })
    }

    fn lose_acks(&self, range: Option<std::ops::Range<u64>>) {
        *self.lose.lock().unwrap() = range;
    }

    fn loses(&self, offset: u64) -> bool {
        self.lose
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|r| r.contains(&offset))
    }
}

/// Every root-slot write.
const ROOT_WRITES: std::ops::Range<u64> = ROOT_OFFSET..ROOT_OFFSET + 2 * ROOT_SLOT_LEN;

impl ShardStore for Flaky {
    fn info(&self) -> &ShardInfo {
        self.inner.info()
    }
    fn read(&self, offset: u64, len: u64) -> ShardFuture<'_, Vec<u8>> {
        self.inner.read(offset, len)
    }
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> ShardFuture<'_, ()> {
        Box::pin(async move {
            self.inner.write(offset, data, fua).await?;
            if self.loses(offset) {
                return Err(ShardError::Unavailable {
                    node: self.inner.info().node.clone(),
                    reason: "completion lost".into(),
                });
            }
            Ok(())
        })
    }
    fn flush(&self) -> ShardFuture<'_, ()> {
        self.inner.flush()
    }
    fn deallocate(&self, offset: u64, len: u64) -> ShardFuture<'_, ()> {
        self.inner.deallocate(offset, len)
    }
}

/// The nodes that hold an intact root of `generation` (read with every node up).
async fn holders(s: &[Arc<MemoryShard>], up: &[bool], generation: u64) -> Vec<String> {
    let mut out = Vec::new();
    for (i, shard) in s.iter().enumerate() {
        shard.set_offline(false);
        if roots(shard).await.iter().any(|(_, g)| *g == generation) {
            out.push(shard.info().node.clone());
        }
        shard.set_offline(!up[i]);
    }
    out
}

/// Which loaded results are acceptable (`None` = nothing committed): the newest
/// successful commit, and every later attempt whose root reached at least one node
/// intact. A successful commit, or an acknowledged session opening (which restates what
/// the new engine loaded), resets the set to itself.
#[derive(Debug)]
struct Model {
    acceptable: Vec<Option<Vec<u8>>>,
    /// Root payload -> checkpoint payload it was committed with.
    ckpt_of: std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// The checkpoint a root-only commit refers to (the last one attempted).
    current_ckpt: Option<Vec<u8>>,
    /// The last attempt: its generation, payload, the nodes it reached, and the
    /// acceptable set just before it.
    last: Option<Attempt>,
}

/// A commit attempt: generation, root payload, nodes it reached, acceptable set before.
type Attempt = (u64, Vec<u8>, Vec<String>, Vec<Option<Vec<u8>>>);

fn subset_from(mask: u8, up: &[bool]) -> Vec<usize> {
    // The nodes that are up and selected by the mask, plus nodes until at most
    // MIN_ACKS - 1 are missing.
    let mut set: Vec<usize> = (0..NODES)
        .filter(|&i| up[i] && mask & (1 << i) != 0)
        .collect();
    let mut i = 0;
    while set.len() < NODES - (MIN_ACKS - 1) {
        if !set.contains(&i) {
            set.push(i);
        }
        i += 1;
    }
    set.sort_unstable();
    set
}

fn show(v: &[Option<Vec<u8>>]) -> Vec<String> {
    v.iter()
        .map(|a| {
            a.as_ref().map_or("<nothing>".into(), |a| {
                String::from_utf8_lossy(a).into_owned()
            })
        })
        .collect()
}

async fn check_load(
    s: &[Arc<MemoryShard>],
    flaky: &[Arc<Flaky>],
    sub: &[usize],
    model: &Model,
) -> (MetaStore, Option<Vec<u8>>) {
    for &i in sub {
        s[i].set_offline(false);
    }
    let shards = sub
        .iter()
        .map(|&i| Arc::clone(&flaky[i]) as Arc<dyn ShardStore>)
        .collect();
    let (store, rec) = MetaStore::load(shards, Some(cluster(1)), MIN_ACKS)
        .await
        .unwrap_or_else(|e| panic!("load from {sub:?}: {e}"));
    let got = rec.as_ref().map(|r| r.root.clone());
    assert!(
        model.acceptable.contains(&got),
        "load from {sub:?} returned {:?}, acceptable {:?}",
        show(std::slice::from_ref(&got)),
        show(&model.acceptable)
    );
    if let Some(rec) = rec {
        assert_eq!(
            rec.checkpoint, model.ckpt_of[&rec.root],
            "checkpoint via {sub:?}"
        );
    }
    (store, got)
}

async fn run(ops: Vec<Op>) {
    let s = shards(NODES);
    let nodes = format_all(&s, cluster(1)).await;
    let flaky: Vec<Arc<Flaky>> = s.iter().map(Flaky::new).collect();
    let nodes = nodes
        .into_iter()
        .zip(&flaky)
        .map(|(n, f)| MetaNode {
            shard: Arc::clone(f) as Arc<dyn ShardStore>,
            superblock: n.superblock,
        })
        .collect();
    let mut store = MetaStore::new(cluster(1), nodes, MIN_ACKS);
    let mut model = Model {
        acceptable: vec![None],
        ckpt_of: std::collections::HashMap::new(),
        current_ckpt: None,
        last: None,
    };
    let mut up = [true; NODES];
    // After a restart the store's first commit first restates what it loaded.
    let mut pending_open: Option<Option<Vec<u8>>> = None;
    for (n, op) in ops.into_iter().enumerate() {
        match op {
            Op::Commit { with_ckpt } => {
                let root = format!("root {n}").into_bytes();
                let c = with_ckpt.then(|| ckpt(u32::try_from(n).unwrap(), 3000 + n));
                let result = store.commit(&root, c.as_deref()).await;
                if let Err(MetadataError::CommitFailed { generation, .. }) = &result {
                    if generation_counter(*generation) == 0 {
                        // The opening failed and the commit was not attempted; what the
                        // opening restated was acceptable already.
                        continue;
                    }
                }
                if let Some(restated) = pending_open.take() {
                    model.acceptable = vec![restated];
                }
                let before = model.acceptable.clone();
                if c.is_some() {
                    model.current_ckpt = c.clone();
                }
                model
                    .ckpt_of
                    .insert(root.clone(), model.current_ckpt.clone());
                // Where the root really is (a lost completion still wrote it).
                let generation = match &result {
                    Ok(rep) => rep.generation,
                    Err(MetadataError::CommitFailed { generation, .. }) => *generation,
                    Err(e) => panic!("{e}"),
                };
                let reached = holders(&s, &up, generation).await;
                if let Ok(rep) = &result {
                    assert!(rep.acked.iter().all(|n| reached.contains(n)));
                    model.acceptable = vec![Some(root.clone())];
                } else if !reached.is_empty() {
                    model.acceptable.push(Some(root.clone()));
                }
                model.last = Some((generation, root, reached, before));
            }
            Op::Toggle(i) => {
                up[i] = !up[i];
                s[i].set_offline(!up[i]);
            }
            Op::LoseAcks(i, kind) => flaky[i].lose_acks(match kind {
                0 => None,
                1 => Some(ROOT_WRITES),
                _ => Some(0..u64::MAX),
            }),
            Op::Check(mask) => {
                let sub = subset_from(mask, &up);
                check_load(&s, &flaky, &sub, &model).await;
                for (i, shard) in s.iter().enumerate() {
                    shard.set_offline(!up[i]);
                }
            }
            Op::CrashTear(mask) => {
                if let Some((generation, root, reached, before)) = model.last.take() {
                    let mut intact = 0;
                    for (i, shard) in s.iter().enumerate() {
                        if !reached.contains(&shard.info().node) {
                            continue;
                        }
                        if mask & (1 << i) != 0 {
                            // (Reading the slots needs the node up; the restore below
                            // puts it back as it was.)
                            shard.set_offline(false);
                            assert!(tear_root(shard, generation).await);
                        } else {
                            intact += 1;
                        }
                    }
                    // Judge the torn attempt as if the engine died while writing it.
                    model.acceptable = before;
                    if intact >= MIN_ACKS {
                        model.acceptable = vec![Some(root)];
                    } else if intact > 0 {
                        model.acceptable.push(Some(root));
                    }
                }
                let sub = subset_from(mask.rotate_left(4), &up);
                let (new_store, loaded) = check_load(&s, &flaky, &sub, &model).await;
                store = new_store;
                for &i in &sub {
                    up[i] = true;
                }
                for (i, shard) in s.iter().enumerate() {
                    shard.set_offline(!up[i]);
                }
                model.current_ckpt = loaded.as_ref().and_then(|r| model.ckpt_of[r].clone());
                pending_open = Some(loaded);
            }
        }
    }
    for shard in &s {
        shard.set_offline(false);
    }
    for sub in subsets(NODES, NODES - (MIN_ACKS - 1)) {
        check_load(&s, &flaky, &sub, &model).await;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn load_returns_the_last_successful_commit_or_a_later_attempt(
        ops in proptest::collection::vec(op(), 1..40)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(run(ops));
    }
}
