//! The shard conformance suite against the in-memory store, plus the memory store's
//! fault model (which the model-based tests rely on).

use engine::shard::{conformance, MemoryShard, ShardError, ShardStore};

fn store() -> MemoryShard {
    MemoryShard::new("mem0", 4 << 20, 4096)
}

#[tokio::test]
async fn memory_store_passes_conformance() {
    conformance::run_all(&store()).await;
}

#[tokio::test]
async fn memory_store_with_512_byte_blocks_passes_conformance() {
    conformance::run_all(&MemoryShard::new("mem512", 2 << 20, 512)).await;
}

#[tokio::test]
async fn power_loss_drops_only_unflushed_writes() {
    let s = store();
    s.write(0, vec![1; 4096], false).await.unwrap();
    s.flush().await.unwrap();
    s.write(0, vec![2; 4096], false).await.unwrap();
    s.write(4096, vec![3; 4096], true).await.unwrap();
    s.power_loss();
    assert_eq!(
        s.read(0, 4096).await.unwrap(),
        vec![1; 4096],
        "flushed data survives"
    );
    assert_eq!(
        s.read(4096, 4096).await.unwrap(),
        vec![3; 4096],
        "FUA data survives"
    );
}

#[tokio::test]
async fn offline_node_fails_as_unavailable_and_keeps_data() {
    let s = store();
    s.write(0, vec![7; 4096], true).await.unwrap();
    s.set_offline(true);
    let e = s.read(0, 4096).await.unwrap_err();
    assert!(
        matches!(e, ShardError::Unavailable { .. }) && e.is_transient(),
        "{e:?}"
    );
    assert!(s.flush().await.is_err());
    s.set_offline(false);
    assert_eq!(s.read(0, 4096).await.unwrap(), vec![7; 4096]);
}

#[tokio::test]
async fn corruption_and_bad_blocks_are_visible() {
    let s = store();
    s.write(0, vec![0; 8192], true).await.unwrap();
    assert!(s.corrupt(5, 0xff));
    assert_eq!(s.read(0, 4096).await.unwrap()[5], 0xff);
    assert!(!s.corrupt(4 << 20, 1), "out of range corruption is refused");
    s.add_bad_block(4096 + 10);
    let e = s.read(0, 8192).await.unwrap_err();
    assert!(matches!(e, ShardError::Media { offset: 4096, .. }), "{e:?}");
    assert!(!e.is_transient());
    assert!(s.read(0, 4096).await.is_ok(), "other blocks stay readable");
}
