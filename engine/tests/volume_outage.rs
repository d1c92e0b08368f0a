//! Every node unreachable at once for a moment (the engine's process stalled past the
//! nodes' keep-alive timeout, a network blip): with an outage wait, writes and reads
//! wait for the nodes and succeed; without one, or past it, they fail as before, and
//! nothing unverified or unacknowledged is ever returned.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Cluster;
use engine::pipeline::DataKey;
use engine::shard::MemoryShard;
use engine::volume::{Volume, VolumeError};

const BLOCK: usize = 4096;

fn pattern(seed: u8, blocks: usize) -> Vec<u8> {
    (0..blocks * BLOCK)
        .map(|i| i.to_le_bytes()[0] ^ seed.wrapping_mul(31))
        .collect()
}

/// A mirror:2 volume on exactly two memory nodes (every segment uses both).
fn setup() -> (Volume, Vec<Arc<MemoryShard>>) {
    let mut cluster = Cluster::new(2, 16 << 20, 512, 1 << 20);
    let mut config = common::config(3, 1, 1, 1024, 512);
    config.chunk_size = 1 << 20;
    let key = DataKey::from_bytes([9; 32]);
    let v = cluster.open(config, Some(&key));
    (v, cluster.nodes)
}

fn set_all_offline(nodes: &[Arc<MemoryShard>], offline: bool) {
    for n in nodes {
        n.set_offline(offline);
    }
}

/// Brings every node back after `after`, from another thread.
fn heal_after(nodes: &[Arc<MemoryShard>], after: Duration) -> std::thread::JoinHandle<()> {
    let nodes = nodes.to_vec();
    std::thread::spawn(move || {
        std::thread::sleep(after);
        set_all_offline(&nodes, false);
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

#[test]
fn a_write_waits_out_a_short_outage_of_every_node() {
    let (mut v, nodes) = setup();
    v.set_outage_wait(Duration::from_secs(20));
    let rt = runtime();
    let data = pattern(1, 4);
    set_all_offline(&nodes, true);
    let healer = heal_after(&nodes, Duration::from_millis(700));
    let started = Instant::now();
    rt.block_on(v.write(8, &data, true))
        .expect("write across the outage");
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "the write returned before the nodes were back: {:?}",
        started.elapsed()
    );
    healer.join().expect("healer");
    assert!(v.stats().outage_retries > 0);
    assert_eq!(rt.block_on(v.read(8, 4)).expect("read"), data);
    // Both copies are on media: each node alone serves the data.
    for n in &nodes {
        n.set_offline(true);
        n.power_loss();
    }
    for n in &nodes {
        n.set_offline(false);
        let other = nodes
            .iter()
            .find(|o| !Arc::ptr_eq(o, n))
            .expect("two nodes");
        other.set_offline(true);
        assert_eq!(rt.block_on(v.read(8, 4)).expect("read from one copy"), data);
        other.set_offline(false);
    }
}

#[test]
fn without_an_outage_wait_the_write_fails_at_once() {
    let (mut v, nodes) = setup();
    let rt = runtime();
    set_all_offline(&nodes, true);
    let started = Instant::now();
    let r = rt.block_on(v.write(0, &pattern(2, 1), true));
    assert!(matches!(r, Err(VolumeError::NotDurable { .. })), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(v.stats().outage_retries, 0);
}

#[test]
fn an_outage_longer_than_the_wait_fails_the_write_and_loses_nothing_acknowledged() {
    let (mut v, nodes) = setup();
    v.set_outage_wait(Duration::from_millis(500));
    let rt = runtime();
    let kept = pattern(3, 2);
    rt.block_on(v.write(0, &kept, true))
        .expect("write before the outage");
    set_all_offline(&nodes, true);
    let started = Instant::now();
    let r = rt.block_on(v.write(2, &pattern(4, 1), true));
    let took = started.elapsed();
    assert!(matches!(r, Err(VolumeError::NotDurable { .. })), "{r:?}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    set_all_offline(&nodes, false);
    assert_eq!(rt.block_on(v.read(0, 2)).expect("read"), kept);
    // The failed write was never acknowledged; the block reads as never written.
    assert_eq!(rt.block_on(v.read(2, 1)).expect("read"), vec![0u8; BLOCK]);
}

#[test]
fn a_read_waits_out_a_short_outage_of_every_node() {
    let (mut v, nodes) = setup();
    let rt = runtime();
    let data = pattern(5, 3);
    rt.block_on(v.write(40, &data, true)).expect("write");
    // Without a wait, a read with no reachable piece fails.
    set_all_offline(&nodes, true);
    assert!(matches!(
        rt.block_on(v.read(40, 3)),
        Err(VolumeError::Unavailable { .. })
    ));
    v.set_outage_wait(Duration::from_secs(20));
    let healer = heal_after(&nodes, Duration::from_millis(700));
    let started = Instant::now();
    assert_eq!(
        rt.block_on(v.read(40, 3)).expect("read across the outage"),
        data
    );
    assert!(started.elapsed() >= Duration::from_millis(600));
    healer.join().expect("healer");
}

/// Three nodes, mirror:2: node `x` fails a write and new segments avoid it; once back,
/// it is used again after the retry delay (and not before it).
fn node_comes_back(retry_after: Duration, wait: Duration) -> (Result<(), VolumeError>, Volume) {
    let mut cluster = Cluster::new(3, 16 << 20, 512, 1 << 20);
    let mut config = common::config(4, 1, 1, 1024, 512);
    config.chunk_size = 1 << 20;
    let mut v = cluster.open(config, None);
    v.set_retry_node_after(retry_after);
    let rt = runtime();
    rt.block_on(v.write(0, &pattern(6, 1), true))
        .expect("write");
    let first: Vec<String> = v
        .pieces_of(0)
        .expect("mapped")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let x = first[0].clone();
    cluster.node(&x).set_offline(true);
    rt.block_on(v.write(1, &pattern(7, 1), true))
        .expect("write moved away from the failed node");
    assert_eq!(v.avoided_nodes(), vec![x.clone()]);
    let second: Vec<String> = v
        .pieces_of(1)
        .expect("mapped")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(!second.contains(&x), "{second:?}");
    cluster.node(&x).set_offline(false);
    std::thread::sleep(wait);
    // Another node of the current segment fails: the row can only go to x and the
    // third node.
    let y = second[0].clone();
    cluster.node(&y).set_offline(true);
    let r = rt.block_on(v.write(2, &pattern(8, 1), true));
    if r.is_ok() {
        let third: Vec<String> = v
            .pieces_of(2)
            .expect("mapped")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(third.contains(&x) && !third.contains(&y), "{third:?}");
    }
    (r, v)
}

#[test]
fn a_node_that_failed_a_write_takes_new_segments_again_after_the_retry_delay() {
    let (r, v) = node_comes_back(Duration::from_millis(200), Duration::from_millis(400));
    r.expect("the write goes to the node that came back");
    assert_eq!(
        v.avoided_nodes().len(),
        1,
        "only the second failure is avoided now"
    );
    // Within the delay the node is still avoided: nowhere to put the row.
    let (r, _) = node_comes_back(Duration::from_secs(3600), Duration::from_millis(400));
    assert!(matches!(r, Err(VolumeError::NotDurable { .. })), "{r:?}");
}
