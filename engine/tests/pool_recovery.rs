//! The pool over memory nodes: volumes created, written, the engine dropped without a
//! flush (a crash) and the nodes power-cycled, then everything brought back from a few
//! node namespaces and the key-encryption key alone; node failures within the profile
//! on the way; the nodes never hold plaintext or the volume key.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::pool::{block, create_cluster_of, stores, Memory};
use engine::metadata::MetaStore;
use engine::pipeline::{unwrap_data_key, Kek, VolumeId, WrappedKey};
use engine::pool::catalog::Catalog;
use engine::pool::{Pool, PoolError};
use engine::shard::MemoryShard;
use engine::volume::Volume;

const NODE_BYTES: u64 = 64 << 20;

fn profile(text: &str) -> placement::Profile {
    placement::Profile::from_toml(&format!("schema_version = 1\n{text}")).expect("profile")
}

fn profiles() -> Vec<(&'static str, placement::Profile)> {
    vec![
        ("m2", profile("name = \"m2\"\nprotection = \"mirror:2\"\nfailure_domain = \"node\"\ncompression = \"lz4\"\n")),
        ("m3", profile("name = \"m3\"\nprotection = \"mirror:3\"\nfailure_domain = \"node\"\nencryption = \"off\"\n")),
        ("e21", profile("name = \"e21\"\nprotection = \"ec:2+1\"\nfailure_domain = \"node\"\ncompression = \"zstd:1\"\n")),
        ("e42", profile("name = \"e42\"\nprotection = \"ec:4+2\"\nfailure_domain = \"node\"\ncompression = \"zstd:3\"\n")),
    ]
}

async fn create_cluster(n: usize, kek: &Kek) -> (Pool, Vec<Arc<MemoryShard>>) {
    create_cluster_of(n, NODE_BYTES, kek).await
}

async fn write_tagged(
    v: &mut Volume,
    model: &mut HashMap<u64, u64>,
    tag: &mut u64,
    lba: u64,
    blocks: u64,
) {
    let mut data = Vec::new();
    let tags: Vec<u64> = (0..blocks)
        .map(|_| {
            *tag += 1;
            *tag
        })
        .collect();
    for (i, t) in tags.iter().enumerate() {
        data.extend_from_slice(&block(*t, lba + i as u64));
    }
    v.write(lba, &data, false).await.expect("write");
    for (i, t) in tags.iter().enumerate() {
        model.insert(lba + i as u64, *t);
    }
}

async fn check(v: &mut Volume, model: &HashMap<u64, u64>, blocks: u64) {
    let all = v.read(0, blocks).await.expect("read");
    for lba in 0..blocks {
        let at = usize::try_from(lba).expect("small") * 4096;
        let got = &all[at..at + 4096];
        match model.get(&lba) {
            Some(t) => assert!(got == block(*t, lba).as_slice(), "LBA {lba} lost tag {t}"),
            None => assert!(got.iter().all(|b| *b == 0), "LBA {lba} should be zeroes"),
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn every_volume_comes_back_from_the_nodes_and_the_kek_alone() {
    let kek = Kek::generate().expect("kek");
    let (pool, shards) = create_cluster(8, &kek).await;
    let mut models = Vec::new();
    let mut tag = 0;
    for (name, p) in profiles() {
        pool.create_volume(name, p, 4 << 20)
            .await
            .expect("create volume");
        let mut v = pool.open_volume(name, false).await.expect("open");
        let mut model = HashMap::new();
        for round in 0..40u64 {
            let lba = (round * 37) % 1000;
            write_tagged(&mut v, &mut model, &mut tag, lba, 1 + round % 9).await;
            if round % 13 == 0 {
                v.write_zeroes(lba + 3, 2, false).await.expect("zeroes");
                model.remove(&(lba + 3));
                model.remove(&(lba + 4));
            }
        }
        if name == "e42" {
            // Enough writes to need several segments and a checkpoint in between.
            for i in 0..300u64 {
                write_tagged(&mut v, &mut model, &mut tag, (i * 7) % 1016, 8).await;
            }
        }
        // The engine dies here: no flush, no close, no checkpoint.
        drop(v);
        models.push((name, model));
    }
    drop(pool);
    for s in &shards {
        s.power_loss();
    }
    // Start again with three of the eight namespaces and the KEK; one node is down.
    shards[7].set_offline(true);
    let connector = Memory::of(&shards);
    let seeds = stores(&shards[..3]);
    let pool = Pool::recover(seeds, kek.clone(), &connector)
        .await
        .expect("recover");
    let listed = pool.volumes().await.expect("list");
    assert_eq!(listed.len(), 4, "{listed:?}");
    for (name, model) in &models {
        let mut v = pool.open_volume(name, false).await.expect("reopen");
        check(&mut v, model, 1024).await;
        // And it keeps working: more writes, another crash, another recovery below.
        let mut m = model.clone();
        write_tagged(&mut v, &mut m, &mut tag, 5, 3).await;
        check(&mut v, &m, 1024).await;
    }
    let info = listed.iter().find(|v| v.name == "e42").expect("e42");
    assert_eq!(info.layout, "ec:4+2");
    assert!(info.encrypted);
    let m3 = listed.iter().find(|v| v.name == "m3").expect("m3");
    assert!(!m3.encrypted);
}

#[tokio::test(flavor = "current_thread")]
async fn a_wrong_kek_opens_nothing_and_a_volume_is_single_writer() {
    let kek = Kek::generate().expect("kek");
    let (pool, shards) = create_cluster(4, &kek).await;
    let (_, p) = profiles().remove(0);
    pool.create_volume("a", p, 1 << 20).await.expect("create");
    let v = pool.open_volume("a", false).await.expect("open");
    assert!(matches!(
        pool.open_volume("a", false).await,
        Err(PoolError::Invalid(_))
    ));
    pool.close_volume(v.config().id).await;
    drop(v);
    drop(pool);
    let connector = Memory(HashMap::new());
    let seeds = stores(&shards);
    let other = Kek::generate().expect("kek");
    let pool = Pool::recover(seeds, other, &connector)
        .await
        .expect("the catalogue itself is not secret");
    let r = pool.open_volume("a", false).await;
    assert!(matches!(r, Err(PoolError::Key(_))), "{r:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn create_volume_errors_are_precise() {
    let kek = Kek::generate().expect("kek");
    let (pool, _shards) = create_cluster(4, &kek).await;
    let e42 = profiles().remove(3).1;
    let r = pool.create_volume("big", e42, 1 << 20).await;
    match r {
        Err(PoolError::Unsatisfiable { profile, reason }) => {
            assert_eq!(profile, "e42");
            assert!(reason.contains('4') || reason.contains('6'), "{reason}");
        }
        other => panic!("expected unsatisfiable, got {other:?}"),
    }
    let m2 = profiles().remove(0).1;
    pool.create_volume("v", m2.clone(), 1 << 20)
        .await
        .expect("create");
    assert!(matches!(
        pool.create_volume("v", m2.clone(), 1 << 20).await,
        Err(PoolError::AlreadyExists { .. })
    ));
    assert!(matches!(
        pool.create_volume("w", m2.clone(), 1000).await,
        Err(PoolError::Invalid(_))
    ));
    assert!(matches!(
        pool.create_volume("bad name!", m2.clone(), 4096).await,
        Err(PoolError::Invalid(_))
    ));
    assert!(matches!(
        pool.delete_volume("nope").await,
        Err(PoolError::NotFound { .. })
    ));
    let grown = pool.resize_volume("v", 2 << 20).await.expect("grow");
    assert_eq!(grown.size_bytes, 2 << 20);
    assert!(matches!(
        pool.resize_volume("v", 1 << 20).await,
        Err(PoolError::Invalid(_))
    ));
    pool.delete_volume("v").await.expect("delete");
    assert!(pool.volumes().await.expect("list").is_empty());
}

/// Whether any 32-byte window of `needle` taken every 512 bytes (any stored copy of
/// the needle would contain all of them) occurs in `haystack`.
fn contains_any_window(haystack: &[u8], needle: &[u8]) -> bool {
    needle.chunks(512).any(|w| {
        let w = &w[..32.min(w.len())];
        memchr::memmem::find(haystack, w).is_some()
    })
}

#[tokio::test(flavor = "current_thread")]
async fn nodes_hold_neither_plaintext_nor_the_volume_key() {
    let kek = Kek::generate().expect("kek");
    let (pool, shards) = create_cluster_of(4, 16 << 20, &kek).await;
    let secret =
        profile("name = \"secret\"\nprotection = \"mirror:2\"\nfailure_domain = \"node\"\n");
    let plain = profile("name = \"plain\"\nprotection = \"mirror:2\"\nfailure_domain = \"node\"\nencryption = \"off\"\n");
    pool.create_volume("secret", secret, 1 << 20)
        .await
        .expect("create");
    pool.create_volume("plain", plain, 1 << 20)
        .await
        .expect("create");
    let pattern: Vec<u8> = (0..8).flat_map(|i| block(1000 + i, i)).collect();
    let mut v = pool.open_volume("secret", false).await.expect("open");
    v.write(0, &pattern[..16384], false).await.expect("write");
    v.flush().await.expect("flush");
    let id = v.config().id;
    drop(v);
    pool.close_volume(id).await;
    let images: Vec<Vec<u8>> = shards.iter().map(|s| s.media_snapshot()).collect();
    assert!(
        !images
            .iter()
            .any(|img| contains_any_window(img, &pattern[..16384])),
        "plaintext of an encrypted volume found on a node"
    );
    // The data key, as the KEK holder can unwrap it from the catalogue.
    let seeds = stores(&shards);
    let (_store, recovered) = MetaStore::load(seeds, None, 1).await.expect("load");
    let catalog = Catalog::decode(&recovered.expect("committed").root).expect("catalogue");
    let entry = catalog
        .volumes
        .iter()
        .find(|v| v.name == "secret")
        .expect("volume");
    let wrapped =
        WrappedKey::from_bytes(entry.wrapped_key.as_ref().expect("encrypted")).expect("wrapped");
    let key = unwrap_data_key(&kek, &VolumeId(entry.id), &wrapped).expect("unwrap");
    for img in &images {
        assert!(
            !contains_any_window(img, key.expose()),
            "volume key found on a node"
        );
        assert!(
            !contains_any_window(img, kek.expose()),
            "KEK found on a node"
        );
    }
    // Control: the same data through an unencrypted volume is found by the same scan.
    let mut p = pool.open_volume("plain", false).await.expect("open");
    p.write(0, &pattern[..16384], false).await.expect("write");
    drop(p);
    assert!(
        shards
            .iter()
            .any(|s| contains_any_window(&s.media_snapshot(), &pattern[..16384])),
        "the scan cannot find plaintext even where it is"
    );
}
