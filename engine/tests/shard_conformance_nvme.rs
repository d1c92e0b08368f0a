//! `NvmeShard` against our NVMe/TCP target in this process: the shard conformance suite
//! over memory and file namespaces (with digests, with a tiny MDTS that forces
//! splitting), what reaches the node for FUA, flush and deallocate, how media errors
//! and a dead node surface, and service after the node restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use engine::shard::{conformance, NvmeShard, NvmeShardConfig, ShardError, ShardStore};
use nvmeof::backend::{
    Backend, BackendError, BackendFuture, FileBackend, FileOptions, IoPath, MemoryBackend,
};
use nvmeof::host::{Controller, HostConfig, ReconnectPolicy};
use nvmeof::target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};

const SUBNQN: &str = "nqn.2026-11.io.dpu-offload:shard-test";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5ba2d0c1-0000-4000-8000-000000000001";
const NS_BYTES: u64 = 8 << 20;

/// A namespace backend that records what the target asked of it and can fail chosen
/// blocks, so the tests see exactly which commands the shard sent.
#[derive(Debug)]
struct Probe {
    inner: MemoryBackend,
    volatile: bool,
    writes: Mutex<Vec<(u64, u64)>>,
    reads: Mutex<Vec<(u64, u64)>>,
    deallocations: Mutex<Vec<(u64, u64)>>,
    flushes: AtomicUsize,
    bad_read: Mutex<Option<u64>>,
    bad_write: Mutex<Option<u64>>,
}

impl Probe {
    fn new(size: u64, block_size: u32, volatile: bool) -> Arc<Probe> {
        Arc::new(Probe {
            inner: MemoryBackend::new(size, block_size).unwrap(),
            volatile,
            writes: Mutex::default(),
            reads: Mutex::default(),
            deallocations: Mutex::default(),
            flushes: AtomicUsize::new(0),
            bad_read: Mutex::default(),
            bad_write: Mutex::default(),
        })
    }

    fn take(list: &Mutex<Vec<(u64, u64)>>) -> Vec<(u64, u64)> {
        let mut v = std::mem::take(&mut *list.lock().unwrap());
        v.sort_unstable();
        v
    }

    fn hits(bad: &Mutex<Option<u64>>, offset: u64, len: u64) -> bool {
        bad.lock()
            .unwrap()
            .is_some_and(|b| b >= offset && b < offset + len)
    }

    fn eio(op: &'static str) -> BackendError {
        BackendError::Io {
            op,
            what: "probe".into(),
            source: std::io::Error::from_raw_os_error(5),
        }
    }
}

impl Backend for Probe {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn volatile_write_cache(&self) -> bool {
        self.volatile
    }
    fn deallocate_reads_zeroes(&self) -> bool {
        true
    }
    fn io_path(&self) -> IoPath {
        IoPath::Memory
    }
    fn describe(&self) -> String {
        "probe".into()
    }
    fn read(&self, offset: u64, len: u64) -> BackendFuture<'_, Bytes> {
        self.reads.lock().unwrap().push((offset, len));
        if Probe::hits(&self.bad_read, offset, len) {
            return Box::pin(std::future::ready(Err(Probe::eio("read"))));
        }
        self.inner.read(offset, len)
    }
    fn write(&self, offset: u64, data: Bytes) -> BackendFuture<'_, ()> {
        let len = u64::try_from(data.len()).unwrap();
        self.writes.lock().unwrap().push((offset, len));
        if Probe::hits(&self.bad_write, offset, len) {
            return Box::pin(std::future::ready(Err(Probe::eio("write"))));
        }
        self.inner.write(offset, data)
    }
    fn flush(&self) -> BackendFuture<'_, ()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> BackendFuture<'_, ()> {
        self.inner.write_zeroes(offset, len)
    }
    fn deallocate(&self, offset: u64, len: u64) -> BackendFuture<'_, ()> {
        self.deallocations.lock().unwrap().push((offset, len));
        self.inner.deallocate(offset, len)
    }
}

fn subsystem(backends: Vec<Arc<dyn Backend>>) -> SubsystemConfig {
    let mut sub = SubsystemConfig::new(SUBNQN).allow_host(HOSTNQN);
    for (i, b) in backends.into_iter().enumerate() {
        sub = sub.namespace(NamespaceConfig::new(b).id_seed(format!("shard-test-{i}")));
    }
    sub
}

async fn start(
    listen: SocketAddr,
    backends: Vec<Arc<dyn Backend>>,
    tweak: impl FnOnce(&mut TargetConfig),
) -> Target {
    let mut cfg = TargetConfig::new(listen).subsystem(subsystem(backends));
    tweak(&mut cfg);
    Target::start(cfg).await.unwrap()
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Host settings for a node that may die: short timeouts so a dead node is reported
/// within seconds, and reconnection that keeps trying.
fn host(addr: SocketAddr, queues: u16, digests: bool) -> HostConfig {
    let mut h = HostConfig::new(addr, SUBNQN);
    h.hostnqn = HOSTNQN.into();
    h.io_queues = queues;
    h.queue_depth = 32;
    h.header_digest = digests;
    h.data_digest = digests;
    h.command_timeout = Duration::from_secs(2);
    h.connect_timeout = Duration::from_secs(2);
    h.keep_alive = Duration::from_secs(1);
    h.reconnect = ReconnectPolicy {
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        give_up_after: None,
    };
    h
}

async fn shard(addr: SocketAddr, queues: u16, digests: bool) -> NvmeShard {
    NvmeShard::connect(NvmeShardConfig {
        node: "node-a".into(),
        nsid: 1,
        host: host(addr, queues, digests),
    })
    .await
    .unwrap()
}

fn file_backend(path: &Path, block_size: u32) -> Arc<dyn Backend> {
    let opts = FileOptions {
        block_size: Some(block_size),
        create_size: Some(NS_BYTES),
        ..FileOptions::default()
    };
    Arc::new(FileBackend::open(path, &opts).unwrap())
}

fn pattern(tag: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).unwrap() ^ tag)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_memory_namespaces_4k_and_512() {
    let big = Arc::new(MemoryBackend::new(NS_BYTES, 4096).unwrap());
    let small = Arc::new(MemoryBackend::new(1 << 20, 512).unwrap());
    let t = start(any_port(), vec![big, small], |_| {}).await;
    let ctrl = Controller::connect(host(t.local_addr(), 2, false))
        .await
        .unwrap();
    let a = NvmeShard::open("node-a", ctrl.clone(), 1).await.unwrap();
    let b = NvmeShard::open("node-a", ctrl, 2).await.unwrap();
    // Geometry comes from Identify: NSZE x LBA size, and VWC (a memory namespace has
    // no volatile cache).
    assert_eq!(a.info().capacity_bytes, NS_BYTES);
    assert_eq!(a.info().block_size, 4096);
    assert!(!a.info().volatile_write_cache);
    assert_eq!(
        (b.info().capacity_bytes, b.info().block_size),
        (1 << 20, 512)
    );
    assert_eq!((a.nsid(), b.nsid()), (1, 2));
    conformance::run_all(&a).await;
    conformance::run_all(&b).await;
    // The two namespaces are independent byte spaces on one association.
    a.write(0, pattern(1, 4096), true).await.unwrap();
    b.write(0, pattern(2, 4096), true).await.unwrap();
    assert_eq!(a.read(0, 4096).await.unwrap(), pattern(1, 4096));
    assert_eq!(b.read(0, 4096).await.unwrap(), pattern(2, 4096));
    a.shutdown().await.unwrap();
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_file_namespace_with_digests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ns1.img");
    let t = start(any_port(), vec![file_backend(&path, 4096)], |_| {}).await;
    let s = shard(t.local_addr(), 2, true).await;
    assert_eq!(s.info().capacity_bytes, NS_BYTES);
    assert_eq!(s.info().block_size, 4096);
    conformance::run_all(&s).await;
    // What the suite flushed is in the file itself, at the same byte offsets.
    s.write(4096 * 3, pattern(7, 8192), false).await.unwrap();
    s.flush().await.unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[4096 * 3..4096 * 5], &pattern(7, 8192)[..]);
    drop(s);
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_split_at_mdts_with_digests_and_r2t() {
    let probe = Probe::new(NS_BYTES, 4096, false);
    let t = start(any_port(), vec![probe.clone()], |c| {
        c.limits.max_transfer = 8192;
        c.limits.maxh2cdata = 4096;
        c.limits.io_in_capsule = 0;
    })
    .await;
    let s = shard(t.local_addr(), 3, true).await;
    assert_eq!(s.controller().max_transfer().await.unwrap(), 8192);
    conformance::run_all(&s).await;
    Probe::take(&probe.writes);
    Probe::take(&probe.reads);
    // 40 KiB at byte 64 KiB: five commands of 8 KiB each way, covering it exactly.
    let data = pattern(9, 40 << 10);
    s.write(64 << 10, data.clone(), false).await.unwrap();
    assert_eq!(s.read(64 << 10, 40 << 10).await.unwrap(), data);
    let expect: Vec<(u64, u64)> = (0..5).map(|i| ((64 << 10) + i * 8192, 8192)).collect();
    assert_eq!(Probe::take(&probe.writes), expect);
    assert_eq!(Probe::take(&probe.reads), expect);
    drop(s);
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fua_flush_and_deallocate_reach_the_node() {
    let probe = Probe::new(NS_BYTES, 4096, true);
    let t = start(any_port(), vec![probe.clone()], |_| {}).await;
    let s = shard(t.local_addr(), 1, false).await;
    assert!(s.info().volatile_write_cache, "VWC comes from Identify");
    let flushes = || probe.flushes.load(Ordering::SeqCst);
    let before = flushes();
    s.write(0, pattern(1, 4096), false).await.unwrap();
    assert_eq!(flushes(), before, "a plain write is not flushed");
    s.write(4096, pattern(2, 4096), true).await.unwrap();
    assert_eq!(flushes(), before + 1, "a FUA write reaches stable media");
    s.flush().await.unwrap();
    assert_eq!(flushes(), before + 2, "flush is an NVMe Flush");
    // Deallocate is one Dataset Management command for the blocks asked.
    s.deallocate(8 * 4096, 3 * 4096).await.unwrap();
    assert_eq!(Probe::take(&probe.deallocations), [(8 * 4096, 3 * 4096)]);
    // Refused before any I/O.
    let e = s.deallocate(NS_BYTES, 4096).await.unwrap_err();
    assert!(matches!(e, ShardError::OutOfRange { .. }), "{e:?}");
    assert!(Probe::take(&probe.deallocations).is_empty());
    drop(s);
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_errors_name_the_failed_command_range() {
    let probe = Probe::new(NS_BYTES, 4096, false);
    let t = start(any_port(), vec![probe.clone()], |c| {
        c.limits.max_transfer = 16384;
    })
    .await;
    let s = shard(t.local_addr(), 2, false).await;
    s.write(0, pattern(3, 64 << 10), false).await.unwrap();
    // A bad block at byte 40 KiB: the read of 64 KiB is four 16 KiB commands, and the
    // third (32..48 KiB) fails with an unrecovered read error.
    *probe.bad_read.lock().unwrap() = Some(40 << 10);
    let e = s.read(0, 64 << 10).await.unwrap_err();
    match &e {
        ShardError::Media {
            node,
            offset,
            len,
            reason,
        } => {
            assert_eq!(
                (node.as_str(), *offset, *len),
                ("node-a", 32 << 10, 16 << 10)
            );
            assert!(reason.contains("unrecovered read error"), "{reason}");
        }
        other => panic!("expected a media error, got {other:?}"),
    }
    assert!(!e.is_transient());
    // Blocks away from it still read.
    assert_eq!(
        s.read(0, 16 << 10).await.unwrap(),
        pattern(3, 64 << 10)[..16 << 10]
    );
    // A write fault is a media error too.
    *probe.bad_write.lock().unwrap() = Some(4096);
    let e = s.write(4096, pattern(4, 4096), false).await.unwrap_err();
    assert!(
        matches!(&e, ShardError::Media { offset: 4096, len: 4096, reason, .. } if reason.contains("write fault")),
        "{e:?}"
    );
    drop(s);
    t.shutdown().await;
}

#[tokio::test]
async fn refused_connections_are_unavailable() {
    let mem = Arc::new(MemoryBackend::new(NS_BYTES, 4096).unwrap());
    let t = start(any_port(), vec![mem], |_| {}).await;
    // No such namespace.
    let mut cfg = NvmeShardConfig::new("node-b", t.local_addr(), SUBNQN, 9);
    cfg.host.hostnqn = HOSTNQN.into();
    let e = NvmeShard::connect(cfg).await.unwrap_err();
    assert!(
        matches!(&e, ShardError::Unavailable { node, reason } if node == "node-b" && reason.contains("namespace 9")),
        "{e:?}"
    );
    // A host the subsystem does not allow.
    let cfg = NvmeShardConfig::new("node-b", t.local_addr(), SUBNQN, 1);
    let e = NvmeShard::connect(cfg).await.unwrap_err();
    assert!(matches!(e, ShardError::Unavailable { .. }), "{e:?}");
    t.shutdown().await;
    // Nothing listening.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap();
    drop(l);
    let e = NvmeShard::connect(NvmeShardConfig {
        node: "node-c".into(),
        nsid: 1,
        host: host(dead, 1, false),
    })
    .await
    .unwrap_err();
    assert!(matches!(e, ShardError::Unavailable { .. }), "{e:?}");
}

/// Retries `op` until it succeeds or `within` passes; every failure on the way must be
/// `Unavailable` (the node coming back), never anything else.
async fn until_served<T, F, Fut>(within: Duration, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ShardError>>,
{
    let deadline = Instant::now() + within;
    loop {
        match op().await {
            Ok(v) => return v,
            Err(ShardError::Unavailable { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("not served within {within:?}: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_down_mid_use_is_unavailable_then_service_resumes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ns1.img");
    let t = start(any_port(), vec![file_backend(&path, 4096)], |_| {}).await;
    let addr = t.local_addr();
    let s = Arc::new(shard(addr, 2, true).await);
    s.write(0, pattern(1, 64 << 10), false).await.unwrap();
    s.flush().await.unwrap();

    // Writers keep going while the node goes away: each write either completes or
    // fails as Unavailable, within the command timeout, never hangs; each writer stops
    // at its first failure.
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let s = Arc::clone(&s);
        writers.push(tokio::spawn(async move {
            let mut outcomes = (0usize, 0usize);
            for i in 0..40u64 {
                let offset = (1 << 20) + (w * 40 + i) * 4096;
                let started = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    s.write(offset, pattern(2, 4096), false),
                )
                .await
                .expect("a write to a dead node hung");
                // The command timeout is 2 s; the rest is room for a loaded machine.
                let took = started.elapsed();
                assert!(took < Duration::from_secs(8), "{took:?}");
                match r {
                    Ok(()) => outcomes.0 += 1,
                    Err(ShardError::Unavailable { .. }) => {
                        // Each later write would wait one command timeout too.
                        outcomes.1 += 1;
                        break;
                    }
                    Err(e) => panic!("write while the node went down: {e:?}"),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    t.shutdown().await;
    let mut unavailable = 0;
    for w in writers {
        unavailable += w.await.unwrap().1;
    }
    assert!(unavailable > 0, "no write saw the node go down");
    // With the node down, every kind of request fails as Unavailable within the
    // command timeout (2 s each) plus room for a loaded machine.
    let started = Instant::now();
    let e = s.read(0, 4096).await.unwrap_err();
    assert!(matches!(e, ShardError::Unavailable { .. }), "{e:?}");
    let e = s.flush().await.unwrap_err();
    assert!(matches!(e, ShardError::Unavailable { .. }), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // The node comes back on the same address with the same file: the host reconnects
    // by itself and what was flushed before is there.
    let t = start(addr, vec![file_backend(&path, 4096)], |_| {}).await;
    let back = until_served(Duration::from_secs(20), || s.read(0, 64 << 10)).await;
    assert_eq!(back, pattern(1, 64 << 10));
    assert!(s.controller().reconnect_count() >= 1);
    s.write(8192, pattern(3, 4096), true).await.unwrap();
    assert_eq!(s.read(8192, 4096).await.unwrap(), pattern(3, 4096));
    conformance::run_all(s.as_ref()).await;
    drop(s);
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_reformatted_while_down_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ns1.img");
    let t = start(any_port(), vec![file_backend(&path, 4096)], |_| {}).await;
    let addr = t.local_addr();
    let s = shard(addr, 1, false).await;
    s.write(0, pattern(1, 4096), true).await.unwrap();
    t.shutdown().await;
    // Back with 512-byte blocks: our LBAs would now address other bytes.
    let t = start(addr, vec![file_backend(&path, 512)], |_| {}).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let reason = loop {
        match s.read(0, 4096).await {
            Err(ShardError::Unavailable { reason, .. })
                if reason.contains("after reconnecting") =>
            {
                break reason
            }
            Err(ShardError::Unavailable { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("a reformatted namespace was served: {other:?}"),
        }
    };
    assert!(reason.contains("512"), "{reason}");
    // And it stays refused: no write lands with the wrong geometry.
    let e = s.write(0, pattern(2, 4096), true).await.unwrap_err();
    assert!(matches!(e, ShardError::Unavailable { .. }), "{e:?}");
    assert_eq!(
        &std::fs::read(&path).unwrap()[..4096],
        &pattern(1, 4096)[..]
    );
    drop(s);
    t.shutdown().await;
}
