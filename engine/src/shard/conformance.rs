//! The conformance suite every [`ShardStore`] implementation runs.
//!
//! Written once, run against memory and NVMe/TCP stores (and any later kind), in the
//! manner of TiKV's `engine_traits` tests: the volume engine relies only on what is
//! checked here. Each check panics with a message naming the store and the broken
//! promise; call [`run_all`] from a test.

use futures::future::join_all;

use super::{ShardError, ShardStore};

/// A recognisable pattern of `len` bytes for write `tag`.
fn pattern(tag: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| i.to_le_bytes()[0].wrapping_mul(31).wrapping_add(tag))
        .collect()
}

fn block(store: &dyn ShardStore) -> u64 {
    u64::from(store.info().block_size)
}

/// Runs every check. The store must hold at least 64 blocks, and its contents are
/// overwritten.
pub async fn run_all(store: &dyn ShardStore) {
    geometry(store);
    round_trip(store).await;
    overwrite_and_fua(store).await;
    refuses_misaligned(store).await;
    refuses_out_of_range(store).await;
    concurrent_writes(store).await;
    large_transfer(store).await;
    deallocate(store).await;
}

/// The geometry is usable: power-of-two blocks of at least 512 bytes, capacity in
/// whole blocks, room for the suite.
pub fn geometry(store: &dyn ShardStore) {
    let info = store.info();
    assert!(
        info.block_size >= 512 && info.block_size.is_power_of_two(),
        "{}: block size {} is not a power of two >= 512",
        info.node,
        info.block_size
    );
    assert_eq!(
        info.capacity_bytes % block(store),
        0,
        "{}: capacity not whole blocks",
        info.node
    );
    assert!(
        info.capacity_bytes >= 64 * block(store),
        "{}: fewer than 64 blocks",
        info.node
    );
}

/// What is written (and flushed) reads back, at the first, a middle and the last block,
/// and across several blocks.
pub async fn round_trip(store: &dyn ShardStore) {
    let b = block(store);
    let cap = store.info().capacity_bytes;
    let node = &store.info().node;
    for (tag, offset, blocks) in [(1u8, 0, 1u64), (2, (cap / b / 2) * b, 3), (3, cap - b, 1)] {
        let len = usize::try_from(blocks * b).expect("small");
        let data = pattern(tag, len);
        store
            .write(offset, data.clone(), false)
            .await
            .expect("write");
        store.flush().await.expect("flush");
        let back = store.read(offset, blocks * b).await.expect("read");
        assert!(
            back == data,
            "{node}: {blocks} block(s) at {offset} did not read back"
        );
    }
    // A read inside what was written returns exactly that part.
    let mid = (cap / b / 2) * b;
    let back = store.read(mid + b, b).await.expect("read inside");
    let whole = pattern(2, usize::try_from(3 * b).expect("small"));
    let b_us = usize::try_from(b).expect("small");
    assert!(
        back == whole[b_us..2 * b_us],
        "{node}: partial read returned other bytes"
    );
}

/// The later of two writes wins, with and without FUA, before and after flush.
pub async fn overwrite_and_fua(store: &dyn ShardStore) {
    let b = block(store);
    let len = usize::try_from(b).expect("small");
    let node = &store.info().node;
    let offset = 4 * b;
    store
        .write(offset, pattern(10, len), false)
        .await
        .expect("write");
    store
        .write(offset, pattern(11, len), false)
        .await
        .expect("overwrite");
    assert!(
        store.read(offset, b).await.expect("read") == pattern(11, len),
        "{node}: overwrite lost"
    );
    store
        .write(offset, pattern(12, len), true)
        .await
        .expect("fua write");
    assert!(
        store.read(offset, b).await.expect("read") == pattern(12, len),
        "{node}: fua lost"
    );
    store.flush().await.expect("flush");
    assert!(
        store.read(offset, b).await.expect("read") == pattern(12, len),
        "{node}: flush resurfaced an older write over a newer FUA write"
    );
}

/// Partial blocks and empty requests are refused before any I/O.
pub async fn refuses_misaligned(store: &dyn ShardStore) {
    let b = block(store);
    let node = &store.info().node;
    let cases = [(1, b), (0, b - 1), (0, 0), (b / 2, b / 2)];
    for (offset, len) in cases {
        let r = store.read(offset, len).await;
        assert!(
            matches!(r, Err(ShardError::Misaligned { .. })),
            "{node}: read {offset}+{len} gave {r:?}"
        );
        let data = vec![0u8; usize::try_from(len).expect("small")];
        let w = store.write(offset, data, false).await;
        assert!(
            matches!(w, Err(ShardError::Misaligned { .. })),
            "{node}: write {offset}+{len} gave {w:?}"
        );
    }
}

/// Ranges past the end, including ones whose end overflows u64, are refused.
pub async fn refuses_out_of_range(store: &dyn ShardStore) {
    let b = block(store);
    let cap = store.info().capacity_bytes;
    let node = &store.info().node;
    let huge = u64::MAX - u64::MAX % b;
    for (offset, len) in [(cap, b), (cap - b, 2 * b), (huge, b)] {
        let r = store.read(offset, len).await;
        assert!(
            matches!(r, Err(ShardError::OutOfRange { .. })),
            "{node}: read {offset}+{len} gave {r:?}"
        );
        let data = vec![0u8; usize::try_from(len).expect("small")];
        let w = store.write(offset, data, false).await;
        assert!(
            matches!(w, Err(ShardError::OutOfRange { .. })),
            "{node}: write {offset}+{len} gave {w:?}"
        );
    }
}

/// Many writes in flight at once to distinct blocks all land intact.
pub async fn concurrent_writes(store: &dyn ShardStore) {
    let b = block(store);
    let len = usize::try_from(b).expect("small");
    let node = &store.info().node;
    let base = 16 * b;
    let writes =
        (0..32u8).map(|i| store.write(base + u64::from(i) * b, pattern(100 + i, len), false));
    for r in join_all(writes).await {
        r.expect("concurrent write");
    }
    store.flush().await.expect("flush");
    let reads = (0..32u8).map(|i| store.read(base + u64::from(i) * b, b));
    for (i, r) in join_all(reads).await.into_iter().enumerate() {
        let i = u8::try_from(i).expect("32 reads");
        assert!(
            r.expect("read") == pattern(100 + i, len),
            "{node}: concurrent write {i} lost"
        );
    }
}

/// A transfer far larger than one block (and than typical in-capsule data) works.
pub async fn large_transfer(store: &dyn ShardStore) {
    let b = block(store);
    let cap = store.info().capacity_bytes;
    let node = &store.info().node;
    let len = (1 << 20u64).min(cap / 2) / b * b;
    let data = pattern(200, usize::try_from(len).expect("small"));
    store
        .write(0, data.clone(), true)
        .await
        .expect("large write");
    assert!(
        store.read(0, len).await.expect("large read") == data,
        "{node}: 1 MiB transfer"
    );
}

/// Deallocation of whole blocks is accepted and leaves other blocks alone.
pub async fn deallocate(store: &dyn ShardStore) {
    let b = block(store);
    let len = usize::try_from(b).expect("small");
    let node = &store.info().node;
    store
        .write(8 * b, pattern(50, len), true)
        .await
        .expect("write");
    store
        .write(9 * b, pattern(51, len), true)
        .await
        .expect("write");
    store.deallocate(8 * b, b).await.expect("deallocate");
    assert!(
        store.read(9 * b, b).await.expect("read") == pattern(51, len),
        "{node}: deallocating a block changed its neighbour"
    );
    let r = store.deallocate(8 * b + 1, b).await;
    assert!(
        matches!(r, Err(ShardError::Misaligned { .. })),
        "{node}: misaligned trim gave {r:?}"
    );
}
