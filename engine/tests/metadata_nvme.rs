//! The metadata layer over real NVMe/TCP: three `nvmeof` targets in this process with
//! file namespaces. Commits go through the wire (FUA writes, checkpoints larger than one
//! command), one node dies during a checkpoint commit and is resynced when it returns,
//! and after everything is dropped and the targets restart, fresh connections load the
//! last commit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::metadata::{format_node, read_superblock, ClusterId, MetaNode, MetaStore};
use engine::shard::{NvmeShard, NvmeShardConfig, ShardStore};
use nvmeof::backend::{Backend, FileBackend, FileOptions};
use nvmeof::host::{HostConfig, ReconnectPolicy};
use nvmeof::target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};

const SUBNQN: &str = "nqn.2026-11.io.dpu-offload:metadata-test";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5ba2d0c1-0000-4000-8000-000000000007";
const NS_BYTES: u64 = 32 << 20;

fn backend(path: &Path) -> Arc<dyn Backend> {
    let opts = FileOptions {
        block_size: Some(4096),
        create_size: Some(NS_BYTES),
        ..FileOptions::default()
    };
    Arc::new(FileBackend::open(path, &opts).unwrap())
}

async fn start(listen: SocketAddr, path: &Path) -> Target {
    let sub = SubsystemConfig::new(SUBNQN)
        .allow_host(HOSTNQN)
        .namespace(NamespaceConfig::new(backend(path)).id_seed(path.display().to_string()));
    Target::start(TargetConfig::new(listen).subsystem(sub))
        .await
        .unwrap()
}

async fn connect(node: &str, addr: SocketAddr) -> Arc<dyn ShardStore> {
    let mut host = HostConfig::new(addr, SUBNQN);
    host.hostnqn = HOSTNQN.into();
    host.command_timeout = Duration::from_secs(2);
    host.connect_timeout = Duration::from_secs(2);
    host.keep_alive = Duration::from_secs(1);
    host.reconnect = ReconnectPolicy {
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        give_up_after: None,
    };
    let cfg = NvmeShardConfig {
        node: node.into(),
        nsid: 1,
        host,
    };
    Arc::new(NvmeShard::connect(cfg).await.unwrap())
}

async fn until_ok<T, E: std::fmt::Debug, F: Future<Output = Result<T, E>>>(
    limit: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("never served: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn payload(tag: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 253).unwrap() ^ tag)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_over_nvme_tcp_then_load_from_fresh_connections() {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("n{i}.img")))
        .collect();
    let mut targets = Vec::new();
    for p in &paths {
        targets.push(start("127.0.0.1:0".parse().unwrap(), p).await);
    }
    let addrs: Vec<SocketAddr> = targets.iter().map(Target::local_addr).collect();
    let mut shards = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        shards.push(connect(&format!("n{i}"), *a).await);
    }

    let cluster = ClusterId::generate().unwrap();
    let mut nodes = Vec::new();
    for s in &shards {
        let id = s.info().node.clone();
        let superblock = format_node(&**s, cluster, &id, 1 << 20).await.unwrap();
        nodes.push(MetaNode {
            shard: Arc::clone(s),
            superblock,
        });
    }
    let mut store = MetaStore::new(cluster, nodes, 2);
    // 1.5 MiB: more than one command's worth at the target's MDTS.
    let first = payload(1, 1536 << 10);
    let rep = store.commit(b"root 1", Some(&first)).await.unwrap();
    assert_eq!(rep.acked.len(), 3);
    store.commit(b"root 2", None).await.unwrap();

    // n2 dies; a checkpoint commit still succeeds on two nodes, and n2's failure is
    // reported within the command timeout rather than hanging the commit.
    targets.pop().unwrap().shutdown().await;
    let second = payload(2, 700 << 10);
    let started = Instant::now();
    let rep = store.commit(b"root 3", Some(&second)).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(rep.acked, ["n0", "n1"]);
    assert_eq!(rep.failed.len(), 1);
    assert_eq!(rep.failed[0].0, "n2");

    // n2 returns on the same address with the same file; the host reconnects by
    // itself and the next commit resyncs the checkpoint it missed.
    targets.push(start(addrs[2], &paths[2]).await);
    until_ok(Duration::from_secs(20), || read_superblock(&*shards[2])).await;
    let rep = store.commit(b"root 4", None).await.unwrap();
    assert_eq!(rep.acked.len(), 3);
    assert_eq!(rep.resynced, ["n2"]);
    let last = rep.generation;

    // Drop everything, restart every target, and load from fresh connections.
    drop(store);
    drop(shards);
    for t in targets.drain(..) {
        t.shutdown().await;
    }
    for p in &paths {
        targets.push(start("127.0.0.1:0".parse().unwrap(), p).await);
    }
    let mut fresh = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        fresh.push(connect(&format!("n{i}"), t.local_addr()).await);
    }
    let (store, rec) = MetaStore::load(fresh.clone(), Some(cluster), 2)
        .await
        .unwrap();
    let rec = rec.unwrap();
    assert_eq!(rec.generation, last);
    assert_eq!(rec.root, b"root 4");
    assert_eq!(rec.checkpoint, Some(second.clone()));
    assert!(rec.stale_nodes.is_empty(), "{:?}", rec.stale_nodes);
    assert_eq!(store.cluster(), cluster);
    // n2 alone has everything too (it was resynced).
    let (_, rec) = MetaStore::load(fresh[2..].to_vec(), Some(cluster), 1)
        .await
        .unwrap();
    let rec = rec.unwrap();
    assert_eq!(
        (rec.generation, rec.root.as_slice()),
        (last, &b"root 4"[..])
    );
    assert_eq!(rec.checkpoint, Some(second));
    drop(store);
    drop(fresh);
    for t in targets {
        t.shutdown().await;
    }
}
