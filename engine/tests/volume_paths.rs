//! Deterministic checks of the volume's write and read paths: what a small read
//! touches, what a lone sync write costs, that acknowledged writes are on media (they
//! survive a power loss of every node), reconstruction around a corrupt or missing
//! piece, the repair queue, and media errors instead of unverified data.

mod common;

use std::sync::Arc;

use common::Cluster;
use engine::pipeline::{DataKey, VolumeId};
use engine::shard::MemoryShard;
use engine::volume::{Volume, VolumeConfig, VolumeError};
use futures::executor::block_on;

const BLOCK: usize = 4096;

fn pattern(seed: u8, blocks: usize) -> Vec<u8> {
    (0..blocks * BLOCK)
        .map(|i| {
            let b = i.to_le_bytes();
            b[0].wrapping_mul(7) ^ b[1].wrapping_mul(13) ^ b[2] ^ seed
        })
        .collect()
}

/// A volume on exactly k + m memory nodes (so every segment uses all of them).
fn setup_on(k: u8, m: u8, write_cache: bool, shard_block: u32, spare: usize) -> (Volume, Cluster) {
    let mut cluster = Cluster::new(usize::from(k + m) + spare, 16 << 20, shard_block, 1 << 20);
    let mut config = common::config(9, usize::from(k), usize::from(m), 1024, shard_block);
    config.compression_unit = 8192;
    config.strip_size = 64 * 1024;
    config.chunk_size = 1 << 20;
    config.write_cache = write_cache;
    let key = DataKey::from_bytes([5; 32]);
    let v = cluster.open(config, Some(&key));
    (v, cluster)
}

fn setup(k: u8, m: u8, write_cache: bool, shard_block: u32) -> (Volume, Vec<Arc<MemoryShard>>) {
    let (v, cluster) = setup_on(k, m, write_cache, shard_block, 0);
    (v, cluster.nodes)
}

fn node<'a>(nodes: &'a [Arc<MemoryShard>], id: &str) -> &'a Arc<MemoryShard> {
    nodes
        .iter()
        .find(|n| engine::shard::ShardStore::info(n.as_ref()).node == id)
        .expect("node")
}

#[test]
fn small_read_touches_one_node_and_only_its_record() {
    let (mut v, _nodes) = setup(4, 2, true, 512);
    let data = pattern(1, 16);
    block_on(v.write(0, &data, false)).expect("write");
    block_on(v.flush()).expect("flush");
    let before = v.stats();
    let got = block_on(v.read(5, 1)).expect("read");
    assert_eq!(got, data[5 * BLOCK..6 * BLOCK]);
    let after = v.stats();
    assert_eq!(after.direct_reads - before.direct_reads, 1);
    assert_eq!(after.reconstructions, 0);
    // One record of 2 blocks (8 KiB unit) + 48-byte header + 16-byte tag, rounded to
    // 512-byte shard blocks at both ends: at most 8192 + 64 + 2 * 511 bytes.
    let read = after.shard_bytes_read - before.shard_bytes_read;
    assert!(
        (8192 + 64..=8192 + 64 + 1022).contains(&read),
        "read {read} bytes"
    );
    let loc = v.locate(5).expect("mapped");
    assert_eq!(loc.index, 1);
    assert_eq!(v.locate(4).expect("mapped").offset, loc.offset);
}

#[test]
fn lone_sync_write_costs_one_strip_plus_parity_and_survives_power_loss() {
    let (mut v, nodes) = setup(4, 2, false, 512);
    let data = pattern(2, 1);
    block_on(v.write(7, &data, false)).expect("write");
    // 4096 + 64 bytes -> 4608 in 512-byte blocks, on one data strip and two parity.
    assert_eq!(v.stats().shard_bytes_written, 3 * 4608);
    // Acknowledged means durable: a power loss of every node keeps it.
    for n in &nodes {
        n.power_loss();
    }
    assert_eq!(block_on(v.read(7, 1)).expect("read"), data);
    assert_eq!(block_on(v.read(8, 1)).expect("read"), vec![0u8; BLOCK]);
}

#[test]
fn cached_writes_seal_full_rows_and_flush_makes_them_durable() {
    let (mut v, nodes) = setup(2, 1, true, 512);
    let data = pattern(3, 2);
    block_on(v.write(0, &data, false)).expect("write");
    assert_eq!(
        v.stats().rows_sealed,
        0,
        "a cached write does not seal a row"
    );
    assert_eq!(
        block_on(v.read(0, 2)).expect("read from the open row"),
        data
    );
    block_on(v.flush()).expect("flush");
    assert_eq!(v.stats().rows_sealed, 1);
    assert!(!v.has_unsealed_writes());
    for n in &nodes {
        n.power_loss();
    }
    assert_eq!(block_on(v.read(0, 2)).expect("read"), data);
    // A FUA write seals at once.
    block_on(v.write(10, &pattern(4, 1), true)).expect("fua write");
    assert_eq!(v.stats().rows_sealed, 2);
}

#[test]
fn corrupt_piece_is_rebuilt_repaired_and_then_read_directly() {
    for (k, m) in [(1u8, 1u8), (2, 1), (4, 2), (1, 2)] {
        let (mut v, nodes) = setup(k, m, false, 512);
        let data = pattern(5, 2);
        block_on(v.write(100, &data, false)).expect("write");
        let (id, at) = v.record_position(100).expect("on a node");
        assert!(node(&nodes, &id).corrupt(at + 100, 0x5a));

        assert_eq!(block_on(v.read(100, 2)).expect("rebuilt"), data, "{k}+{m}");
        assert_eq!(v.stats().reconstructions, 1);
        assert_eq!(v.pending_repairs(), 1);
        assert_eq!(block_on(v.run_repairs()), 1);
        assert_eq!(v.pending_repairs(), 0);

        let before = v.stats();
        assert_eq!(block_on(v.read(100, 2)).expect("direct"), data);
        let after = v.stats();
        assert_eq!(after.reconstructions, before.reconstructions, "{k}+{m}");
        assert_eq!(after.direct_reads, before.direct_reads + 1, "{k}+{m}");
    }
}

#[test]
fn missing_node_is_read_around_and_not_queued_for_repair() {
    let (mut v, nodes) = setup(4, 2, false, 4096);
    let data = pattern(6, 2);
    block_on(v.write(3, &data, false)).expect("write");
    let pieces = v.pieces_of(3).expect("mapped");
    let (id, _) = v.record_position(3).expect("on a node");
    node(&nodes, &id).set_offline(true);
    // A second piece gone too: still within m = 2.
    node(&nodes, &pieces[4].0).set_offline(true);
    assert_eq!(block_on(v.read(3, 2)).expect("rebuilt"), data);
    assert_eq!(v.pending_repairs(), 0, "an offline node is not damaged");
    // With only k + m nodes, no segment can avoid the failed ones: a write is not
    // acknowledged while a piece cannot be made durable.
    let r = block_on(v.write(20, &pattern(7, 1), false));
    assert!(matches!(r, Err(VolumeError::NotDurable { .. })), "{r:?}");
    assert_eq!(block_on(v.read(20, 1)).expect("read"), vec![0u8; BLOCK]);
    // A third failure is beyond what ec:4+2 tolerates: an error, not data.
    node(&nodes, &pieces[5].0).set_offline(true);
    let r = block_on(v.read(3, 2));
    assert!(matches!(r, Err(VolumeError::Unavailable { .. })), "{r:?}");
}

#[test]
fn writes_move_to_nodes_that_are_up_when_a_node_fails() {
    for write_cache in [false, true] {
        let (mut v, cluster) = setup_on(4, 2, write_cache, 512, 2);
        block_on(v.write(0, &pattern(1, 4), false)).expect("write");
        block_on(v.flush()).expect("flush");
        let pieces = v.pieces_of(0).expect("mapped");
        cluster.node(&pieces[0].0).set_offline(true);
        cluster.node(&pieces[5].0).set_offline(true);
        // Every write is acknowledged: rows go to a segment on the six nodes left.
        for i in 0..8u64 {
            block_on(v.write(100 + i, &pattern(2, 1), i % 3 == 0)).expect("degraded write");
        }
        block_on(v.flush()).expect("flush");
        assert!(v.stats().rows_relocated >= 1, "{:?}", v.stats());
        let now = v.pieces_of(100).expect("mapped");
        assert!(
            now.iter()
                .all(|(n, _)| n != &pieces[0].0 && n != &pieces[5].0),
            "{now:?}"
        );
        assert_eq!(v.avoided_nodes().len(), 1, "{:?}", v.avoided_nodes());
        for i in 0..8u64 {
            assert_eq!(block_on(v.read(100 + i, 1)).expect("read"), pattern(2, 1));
        }
        assert_eq!(block_on(v.read(0, 4)).expect("read around"), pattern(1, 4));
    }
}

#[test]
fn unverifiable_data_is_a_media_error() {
    let (mut v, nodes) = setup(2, 1, false, 512);
    let data = pattern(8, 1);
    block_on(v.write(0, &data, false)).expect("write");
    let pieces = v.pieces_of(0).expect("mapped");
    let loc = v.locate(0).expect("mapped");
    let (id, base) = v.record_position(0).expect("on a node");
    // Damage the data strip and the parity strip over the record: two faults, m = 1.
    assert!(node(&nodes, &id).corrupt(base + 60, 1));
    let parity = &pieces[2];
    assert_ne!(usize::from(loc.strip), 2);
    assert!(node(&nodes, &parity.0).corrupt(parity.1 + 61, 1));
    let r = block_on(v.read(0, 1));
    assert!(matches!(r, Err(VolumeError::Media { .. })), "{r:?}");
}

#[test]
fn deallocate_and_write_zeroes_read_as_zeroes_and_bad_requests_fail() {
    let (mut v, _nodes) = setup(1, 1, false, 512);
    block_on(v.write(0, &pattern(9, 8), false)).expect("write");
    block_on(v.deallocate(1, 2)).expect("deallocate");
    block_on(v.write_zeroes(5, 1, false)).expect("write zeroes");
    let got = block_on(v.read(0, 8)).expect("read");
    let want = pattern(9, 8);
    for b in 0..8 {
        let chunk = &got[b * BLOCK..(b + 1) * BLOCK];
        if [1, 2, 5].contains(&b) {
            assert!(chunk.iter().all(|x| *x == 0), "block {b}");
        } else {
            assert_eq!(chunk, &want[b * BLOCK..(b + 1) * BLOCK], "block {b}");
        }
    }
    assert_eq!(v.mapped_blocks(), 5);
    assert!(matches!(
        block_on(v.write(1023, &pattern(1, 2), false)),
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(matches!(
        block_on(v.write(0, &[0u8; 100], false)),
        Err(VolumeError::BadLength { .. })
    ));
    assert!(matches!(
        block_on(v.read(u64::MAX, 2)),
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(block_on(v.deallocate(1000, 100)).is_err());
}

#[test]
fn config_follows_profile_compression_and_unit() {
    for profile in placement::builtin_profiles() {
        let config = VolumeConfig::new(VolumeId([1; 16]), placement::Layout::ec(4, 2), 64)
            .with_profile(&profile);
        assert_eq!(config.compression_unit, profile.compression_unit);
        assert_eq!(
            config.compression.to_string(),
            profile.compression.to_string(),
            "{}",
            profile.name
        );
    }
}
