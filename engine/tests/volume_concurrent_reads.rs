//! Reads run outside the volume's owner (`engine::volume::ReadPlan`), many at once.
//! These tests check what that must not break:
//!
//! - A read planned before garbage collection frees its segment, and executed after
//!   the freed space could have been reused, still returns the data as of its
//!   planning, because the segment stays pinned (the mutation "no pinning" turns the
//!   read into a media error or wrong data).
//! - Through the device (owner task, reads spawned as tasks, nodes with random read
//!   latency, group commit, overwrites, garbage collection passes, one node dropping
//!   out and coming back): every read returns, for
//!   every block, the data of the last write to it acknowledged before the read was
//!   submitted, or of a write to it that was submitted before the read completed and
//!   not acknowledged before the read was submitted (a racing write). Nothing older,
//!   nothing never written.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Cluster;
use engine::frontend::BlockDevice;
use engine::pipeline::{DataKey, MemoryEpochStore};
use engine::shard::{MemoryShard, ShardFuture, ShardInfo, ShardStore};
use engine::volume::device::VolumeDevice;
use engine::volume::{InMemorySource, SegmentSource, Volume};
use futures::executor::block_on;

const BLOCK: usize = 4096;

/// A block tagged with `tag` (a unique write number) and its LBA; tag 0 is zeroes.
fn block(tag: u64, lba: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK];
    if tag == 0 {
        return out;
    }
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ lba | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    out[..8].copy_from_slice(&tag.to_le_bytes());
    out[8..16].copy_from_slice(&lba.to_le_bytes());
    out
}

/// The tag a block read back carries (checking the whole block is what `block` makes).
fn tag_of(bytes: &[u8], lba: u64) -> Option<u64> {
    if bytes.iter().all(|b| *b == 0) {
        return Some(0);
    }
    let tag = u64::from_le_bytes(bytes[..8].try_into().ok()?);
    (block(tag, lba) == bytes).then_some(tag)
}

fn blocks(tag: u64, lba: u64, n: u64) -> Vec<u8> {
    (lba..lba + n).flat_map(|l| block(tag, l)).collect()
}

#[test]
fn a_planned_read_survives_gc_freeing_and_reusing_its_segment() {
    // k=2, m=1 on exactly 3 nodes with few chunks, so freed chunks are reused at once.
    let mut cluster = Cluster::new(3, 2 << 20, 512, 256 << 10);
    let mut config = common::config(3, 2, 1, 256, 512);
    config.compression_unit = 4096;
    config.strip_size = 64 << 10;
    config.chunk_size = 256 << 10;
    let key = DataKey::from_bytes([7; 32]);
    let mut v = cluster.open(config, Some(&key));
    for lba in 0..64 {
        block_on(v.write(lba, &block(1, lba), false)).expect("write");
    }
    let first_segment_nodes = v.pieces_of(0).expect("mapped");
    let plan = v.plan_read(0, 16).expect("plan");
    // Overwrite everything, so the first segments are dead, and collect them.
    for lba in 0..64 {
        block_on(v.write(lba, &block(2, lba), false)).expect("overwrite");
    }
    let gc = block_on(v.collect_garbage(0.75, 16)).expect("gc");
    assert!(gc.segments_freed > 0, "the test needs GC to drop segments");
    let free_while_pinned = cluster.source.free_chunks();
    // Write a lot more: new segments take whatever chunks are free.
    for round in 3..8 {
        for lba in 0..64 {
            block_on(v.write(lba, &block(round, lba), false)).expect("churn");
        }
        block_on(v.collect_garbage(0.75, 16)).expect("gc");
    }
    let (got, done) = block_on(plan.execute());
    let got = got.expect("a pinned read succeeds");
    assert_eq!(
        got,
        blocks(1, 0, 16),
        "the read returns the data it was planned on"
    );
    // The pinned segment's chunks were held back while the read was in flight...
    let record_node = &first_segment_nodes[0];
    assert!(
        v.reads_in_flight() > 0,
        "the plan is still counted until finished ({record_node:?})"
    );
    v.finish_read(done);
    assert_eq!(v.reads_in_flight(), 0);
    // ...and are released by the next checkpoint once it is done.
    let before = cluster.source.free_chunks();
    block_on(v.checkpoint(Vec::new())).expect("checkpoint");
    let after = cluster.source.free_chunks();
    assert!(
        after > before,
        "the held segment is freed after the read ({free_while_pinned} -> {before} -> {after})"
    );
    for lba in 0..64 {
        assert_eq!(
            block_on(v.read(lba, 1)).expect("read"),
            block(7, lba),
            "lba {lba}"
        );
    }
}

/// A node whose reads take a random 0-3 ms (so reads overlap writes, GC and each
/// other); writes and everything else go straight to the memory shard.
#[derive(Debug)]
struct SlowReads {
    inner: Arc<MemoryShard>,
    seed: AtomicU64,
}

impl ShardStore for SlowReads {
    fn info(&self) -> &ShardInfo {
        self.inner.info()
    }
    fn read(&self, offset: u64, len: u64) -> ShardFuture<'_, Vec<u8>> {
        let mut x = self.seed.fetch_add(0x9E37_79B9, Ordering::Relaxed) | 1;
        x ^= x << 13;
        x ^= x >> 7;
        let micros = x % 3000;
        Box::pin(async move {
            tokio::time::sleep(Duration::from_micros(micros)).await;
            self.inner.read(offset, len).await
        })
    }
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> ShardFuture<'_, ()> {
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> ShardFuture<'_, ()> {
        self.inner.flush()
    }
    fn deallocate(&self, offset: u64, len: u64) -> ShardFuture<'_, ()> {
        self.inner.deallocate(offset, len)
    }
}

/// One write as the test saw it: logical clock at submission and at acknowledgement.
#[derive(Debug, Clone, Copy)]
struct WriteEvent {
    tag: u64,
    submitted: u64,
    acked: Option<u64>,
}

#[test]
fn concurrent_reads_return_the_last_acknowledged_or_a_racing_write() {
    const VOLUME_BLOCKS: u64 = 192;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let memory: Vec<Arc<MemoryShard>> = (0..4)
        .map(|i| Arc::new(MemoryShard::new(format!("n{i}"), 4 << 20, 512)))
        .collect();
    let shards: Vec<Arc<dyn ShardStore>> = memory
        .iter()
        .enumerate()
        .map(|(i, m)| {
            Arc::new(SlowReads {
                inner: Arc::clone(m),
                seed: AtomicU64::new(i as u64 + 1),
            }) as Arc<dyn ShardStore>
        })
        .collect();
    let source = Arc::new(InMemorySource::new(shards, 256 << 10));
    let mut config = common::config(4, 2, 1, VOLUME_BLOCKS, 512);
    config.compression_unit = 8192;
    config.strip_size = 64 << 10;
    config.chunk_size = 256 << 10;
    let key = DataKey::from_bytes([9; 32]);
    let mut epochs = MemoryEpochStore::new();
    let clock = Arc::new(AtomicU64::new(1));
    let log: Arc<Mutex<BTreeMap<u64, Vec<WriteEvent>>>> = Arc::default();
    let reads_checked = Arc::new(AtomicU64::new(0));
    runtime.block_on(async {
        let volume = Volume::open(
            config,
            Arc::clone(&source) as Arc<dyn SegmentSource>,
            Some(&key),
            &mut epochs,
            Vec::new(),
            None,
        )
        .await
        .expect("open");
        let dev = VolumeDevice::spawn("v".into(), volume, async {});
        let next_tag = Arc::new(AtomicU64::new(1));
        let mut tasks = Vec::new();
        // Writers: 2-block writes at random places, so reads see overwrites and the
        // volume runs out of space and collects garbage.
        for w in 0..6u64 {
            let (dev, clock, log, next_tag) = (
                Arc::clone(&dev),
                Arc::clone(&clock),
                Arc::clone(&log),
                Arc::clone(&next_tag),
            );
            tasks.push(tokio::spawn(async move {
                let mut x = w.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
                for _ in 0..120 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let lba = x % (VOLUME_BLOCKS - 1);
                    let tag = next_tag.fetch_add(1, Ordering::SeqCst);
                    let submitted = clock.fetch_add(1, Ordering::SeqCst);
                    {
                        let mut l = log.lock().expect("log");
                        for b in lba..lba + 2 {
                            l.entry(b).or_default().push(WriteEvent {
                                tag,
                                submitted,
                                acked: None,
                            });
                        }
                    }
                    dev.write(lba * 4096, blocks(tag, lba, 2), false)
                        .await
                        .expect("write");
                    let acked = clock.fetch_add(1, Ordering::SeqCst);
                    let mut l = log.lock().expect("log");
                    for b in lba..lba + 2 {
                        if let Some(e) = l
                            .get_mut(&b)
                            .and_then(|v| v.iter_mut().find(|e| e.tag == tag))
                        {
                            e.acked = Some(acked);
                        }
                    }
                }
            }));
        }
        // Garbage collection while reads are in flight.
        let gc = {
            let dev = Arc::clone(&dev);
            let checked = Arc::clone(&reads_checked);
            tokio::spawn(async move {
                let mut freed = 0;
                while checked.load(Ordering::Relaxed) < 32 * 40 {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    freed += dev.collect_garbage(0.75, 2).await.expect("gc");
                }
                freed
            })
        };
        // Readers: up to 32 reads in flight, 1 to 8 blocks each.
        for r in 0..32u64 {
            let (dev, clock, log, checked) = (
                Arc::clone(&dev),
                Arc::clone(&clock),
                Arc::clone(&log),
                Arc::clone(&reads_checked),
            );
            tasks.push(tokio::spawn(async move {
                let mut x = (r + 101).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for _ in 0..40 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let n = 1 + x % 8;
                    let lba = (x >> 8) % (VOLUME_BLOCKS - n);
                    let submitted = clock.fetch_add(1, Ordering::SeqCst);
                    let data = dev.read(lba * 4096, n * 4096).await.expect("read");
                    let completed = clock.fetch_add(1, Ordering::SeqCst);
                    let l = log.lock().expect("log");
                    for i in 0..n {
                        let b = lba + i;
                        let bytes = &data[usize::try_from(i).expect("small") * BLOCK..][..BLOCK];
                        let got = tag_of(bytes, b)
                            .unwrap_or_else(|| panic!("block {b}: bytes of no write"));
                        let events = l.get(&b).map(Vec::as_slice).unwrap_or(&[]);
                        // The last write acknowledged before the read was submitted.
                        let floor = events
                            .iter()
                            .filter(|e| e.acked.is_some_and(|a| a < submitted))
                            .max_by_key(|e| e.acked)
                            .map_or(0, |e| e.tag);
                        let racing = |e: &&WriteEvent| {
                            e.submitted < completed && e.acked.is_none_or(|a| a > submitted)
                        };
                        assert!(
                            got == floor || events.iter().filter(racing).any(|e| e.tag == got),
                            "block {b}: read (clock {submitted}..{completed}) returned tag \
                             {got}, last acknowledged before it {floor}, writes {events:?}"
                        );
                    }
                    checked.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        // A node drops out for a while (reads reconstruct, writes move away) and returns.
        // Counted in reads, not time, so the window always falls inside the run.
        let fault = {
            let node = Arc::clone(&memory[1]);
            let checked = Arc::clone(&reads_checked);
            tokio::spawn(async move {
                while checked.load(Ordering::Relaxed) < 300 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                node.set_offline(true);
                while checked.load(Ordering::Relaxed) < 700 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                node.set_offline(false);
            })
        };
        for t in tasks {
            t.await.expect("task");
        }
        fault.await.expect("fault task");
        let freed = gc.await.expect("gc task");
        assert!(freed > 0, "the run must include garbage collection");
        let c = dev.counters();
        assert!(c.volume.reconstructions > 0, "{:?}", c.volume);
        dev.close().await.expect("close");
    });
    assert_eq!(reads_checked.load(Ordering::Relaxed), 32 * 40);
}
