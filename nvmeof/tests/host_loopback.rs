//! Our host against our target over loopback TCP: bring-up, several queues at
//! depth 32 with every byte verified, R2T with small MAXH2CDATA, digests,
//! write zeroes / deallocate / flush, discovery, refusals, and recovery from
//! connections cut mid-I/O by a proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nvmeof::backend::MemoryBackend;
use nvmeof::host::{discover, Controller, ErrorKind, HostConfig, HostError, ReconnectPolicy};
use nvmeof::nvme::io::DsmRange;
use nvmeof::nvme::DISCOVERY_NQN;
use nvmeof::target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const SUBNQN: &str = "nqn.2026-11.io.dpu-offload:host-test";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:0f0e0d0c-0b0a-0908-0706-050403020100";
const BS: usize = 4096;
const NS_BYTES: u64 = 32 << 20;
const NS_BLOCKS: u64 = NS_BYTES / 4096;

async fn start_target(tweak: impl FnOnce(&mut TargetConfig)) -> Target {
    let mem = Arc::new(MemoryBackend::new(NS_BYTES, 4096).unwrap());
    let sub = SubsystemConfig::new(SUBNQN)
        .namespace(NamespaceConfig::new(mem).id_seed("host-test"))
        .allow_host(HOSTNQN);
    let mut cfg = TargetConfig::new("127.0.0.1:0".parse().unwrap()).subsystem(sub);
    tweak(&mut cfg);
    Target::start(cfg).await.unwrap()
}

fn host_config(addr: SocketAddr, queues: u16, depth: u16) -> HostConfig {
    let mut c = HostConfig::new(addr, SUBNQN);
    c.hostnqn = HOSTNQN.into();
    c.io_queues = queues;
    c.queue_depth = depth;
    c.command_timeout = Duration::from_secs(10);
    c
}

/// Block content for (block, version): every byte depends on both.
fn block(lba: u64, version: u32, blocks: usize) -> Bytes {
    let mut v = Vec::with_capacity(blocks * BS);
    for b in 0..blocks {
        let l = lba + u64::try_from(b).unwrap();
        for i in 0..BS {
            let x = l.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ u64::from(version) << 32
                ^ u64::try_from(i).unwrap();
            v.push(x.to_le_bytes()[i % 8] ^ u8::try_from(i % 251).unwrap());
        }
    }
    Bytes::from(v)
}

/// Writes `count` extents of `blocks` blocks from `workers` concurrent tasks
/// spread over all queues, then reads each back and compares.
async fn write_read_verify(c: &Controller, workers: usize, count: u64, blocks: u32, version: u32) {
    let queues = c.io_queue_count().await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = u64::try_from(w).unwrap();
            while i < count {
                let lba = i * u64::from(blocks);
                let data = block(lba, version, usize::try_from(blocks).unwrap());
                c.write(w % queues, 1, lba, data, false).await.unwrap();
                i += u64::try_from(workers).unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..workers {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = u64::try_from(w).unwrap();
            while i < count {
                let lba = i * u64::from(blocks);
                let got = c.read(w % queues, 1, lba, blocks).await.unwrap();
                let want = block(lba, version, usize::try_from(blocks).unwrap());
                assert!(
                    got == want,
                    "data mismatch at lba {lba} (version {version})"
                );
                i += u64::try_from(workers).unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_queues_depth_32_verified() {
    let t = start_target(|_| {}).await;
    let c = Controller::connect(host_config(t.local_addr(), 4, 32))
        .await
        .unwrap();
    assert_eq!(c.io_queue_count().await.unwrap(), 4);
    let ns = c.namespace(1).await.unwrap();
    assert_eq!((ns.block_size, ns.blocks), (4096, NS_BLOCKS));
    let id = c.identify().await.unwrap();
    assert_eq!(id.subnqn, SUBNQN);
    assert_eq!(id.cntlid, c.cntlid().await.unwrap());
    // 4 queues x 32 workers; single blocks go in-capsule (IOCCSZ 8 KiB).
    write_read_verify(&c, 128, 2048, 1, 1).await;
    // 32 KiB extents exceed in-capsule data: R2T + H2CData.
    write_read_verify(&c, 128, 512, 8, 2).await;
    let other = c.clone();
    c.shutdown().await.unwrap();
    // Every clone sees the handle closed; nothing reconnects.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = other.read(0, 1, 0, 1).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    assert_eq!(other.reconnect_count(), 0);
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r2t_split_by_small_maxh2cdata_and_digests() {
    for (hd, dd) in [(true, true), (true, false), (false, true)] {
        let t = start_target(|cfg| {
            cfg.limits.maxh2cdata = 4096;
            cfg.limits.io_in_capsule = 0;
        })
        .await;
        let mut hc = host_config(t.local_addr(), 2, 32);
        hc.header_digest = hd;
        hc.data_digest = dd;
        let c = Controller::connect(hc).await.unwrap();
        // 128 KiB writes: one R2T answered with 32 H2CData PDUs of 4 KiB.
        write_read_verify(&c, 16, 64, 32, 3).await;
        write_read_verify(&c, 64, 1024, 1, 4).await;
        drop(c);
        t.shutdown().await;
    }
}

#[tokio::test]
async fn zeroes_deallocate_flush_and_bounds() {
    let t = start_target(|_| {}).await;
    let c = Controller::connect(host_config(t.local_addr(), 1, 8))
        .await
        .unwrap();
    c.write(0, 1, 100, block(100, 9, 4), false).await.unwrap();
    c.flush(0, 1).await.unwrap();
    c.write_zeroes(0, 1, 101, 2, false).await.unwrap();
    let got = c.read(0, 1, 100, 4).await.unwrap();
    assert_eq!(&got[..BS], &block(100, 9, 1)[..]);
    assert!(got[BS..3 * BS].iter().all(|&b| b == 0));
    assert_eq!(&got[3 * BS..], &block(103, 9, 1)[..]);
    let ns = c.namespace(1).await.unwrap();
    c.deallocate(
        0,
        1,
        &[DsmRange {
            cattr: 0,
            nlb: 1,
            slba: 103,
        }],
    )
    .await
    .unwrap();
    if ns.identify.dlfeat & 7 == 1 {
        assert!(c.read(0, 1, 103, 1).await.unwrap().iter().all(|&b| b == 0));
    }
    // Out of range: refused locally, nothing sent.
    let e = c.read(0, 1, NS_BLOCKS - 1, 2).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    let e = c
        .write(0, 1, 0, Bytes::from_static(b"short"), false)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidRequest);
    let e = c.read(0, 7, 0, 1).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidRequest);
    // Larger than MDTS (128 KiB at the target's default).
    assert_eq!(c.max_transfer().await.unwrap(), 128 * 1024);
    let e = c.read(0, 1, 0, 33).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidRequest);
    t.shutdown().await;
}

#[tokio::test]
async fn refusals_are_setup_errors() {
    let t = start_target(|_| {}).await;
    let mut hc = host_config(t.local_addr(), 1, 8);
    hc.subnqn = "nqn.2026-11.io.dpu-offload:nonexistent".into();
    let e = Controller::connect(hc).await.unwrap_err();
    assert!(matches!(e, HostError::Setup(_)), "{e}");
    let mut hc = host_config(t.local_addr(), 1, 8);
    hc.hostnqn = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000000".into();
    let e = Controller::connect(hc).await.unwrap_err();
    assert!(matches!(e, HostError::Setup(_)), "{e}");
    // Nothing listening.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = l.local_addr().unwrap();
    drop(l);
    let e = Controller::connect(host_config(dead, 1, 8))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Path, "{e}");
    t.shutdown().await;
}

#[tokio::test]
async fn discovery_lists_the_subsystem() {
    let t = start_target(|_| {}).await;
    let entries = discover(t.local_addr(), Some(HOSTNQN.into()), Duration::from_secs(5))
        .await
        .unwrap();
    let e = entries
        .iter()
        .find(|e| e.subnqn == SUBNQN)
        .expect("subsystem listed");
    assert_eq!(e.trtype, 3);
    assert_eq!(e.trsvcid, t.local_addr().port().to_string());
    assert_eq!(e.traddr, "127.0.0.1");
    assert!(entries
        .iter()
        .all(|e| e.subnqn != DISCOVERY_NQN || e.subtype == 3));
    t.shutdown().await;
}

#[tokio::test]
async fn keep_alive_keeps_an_idle_association() {
    let t = start_target(|_| {}).await;
    let mut hc = host_config(t.local_addr(), 1, 4);
    hc.keep_alive = Duration::from_secs(1);
    let c = Controller::connect(hc).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    c.write(0, 1, 0, block(0, 1, 1), false).await.unwrap();
    assert_eq!(c.reconnect_count(), 0, "no reconnect needed while idle");
    t.shutdown().await;
}

/// A TCP proxy whose live connections can be cut or frozen at will.
struct Proxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
    frozen: Arc<AtomicBool>,
}

/// Forwards one direction, holding bytes back while `frozen` is set.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    async fn start(to: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let frozen = Arc::new(AtomicBool::new(false));
        let (c2, f2) = (Arc::clone(&conns), Arc::clone(&frozen));
        let accept = tokio::spawn(async move {
            while let Ok((a, _)) = l.accept().await {
                let Ok(b) = TcpStream::connect(to).await else {
                    continue;
                };
                // Without this, Nagle and delayed ACKs add ~40 ms per exchange.
                a.set_nodelay(true).unwrap();
                b.set_nodelay(true).unwrap();
                let ((ar, aw), (br, bw)) = (a.into_split(), b.into_split());
                let f = Arc::clone(&f2);
                let h = tokio::spawn(async move {
                    tokio::select! {
                        _ = forward(ar, bw, Arc::clone(&f)) => {}
                        _ = forward(br, aw, f) => {}
                    }
                });
                c2.lock().unwrap().push(h);
            }
        });
        Proxy {
            addr,
            conns,
            accept,
            frozen,
        }
    }

    fn cut_all(&self) -> usize {
        let v: Vec<_> = self.conns.lock().unwrap().drain(..).collect();
        for h in &v {
            h.abort();
        }
        v.len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_mid_io_recovers_without_corruption() {
    cut_mid_io(1024).await;
}

/// The same on a single-threaded runtime (as the engine's per-core reactors
/// run), with workers that retry failed writes at once.
#[tokio::test(flavor = "current_thread")]
async fn connection_cut_with_tight_retry_loops_on_one_thread() {
    cut_mid_io(256).await;
}

async fn cut_mid_io(extents: u64) {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    let t = start_target(|_| {}).await;
    let proxy = Proxy::start(t.local_addr()).await;
    let mut hc = host_config(proxy.addr, 2, 32);
    hc.reconnect = ReconnectPolicy {
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        give_up_after: Some(Duration::from_secs(20)),
    };
    let c = Controller::connect(hc).await.unwrap();
    const BLOCKS: u32 = 2;
    const WRITERS: u64 = 64;
    let path_errors = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    // The writers keep rewriting their extents, a new version each round, until the
    // cuts are over: the cuts are placed by progress, not by time, so they land on
    // I/O in flight however fast or slow the machine is. Each writer returns the last
    // version it wrote.
    for w in 0..WRITERS {
        let c = c.clone();
        let errs = Arc::clone(&path_errors);
        let done = Arc::clone(&completed);
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut round = 0u32;
            while round < 3 || !stop.load(Ordering::Relaxed) {
                round += 1;
                let mut i = w;
                while i < extents {
                    let lba = i * u64::from(BLOCKS);
                    let data = block(lba, round, 2);
                    // The engine's policy for idempotent whole-block writes:
                    // retry on path failures until it sticks.
                    loop {
                        match c
                            .write(usize::try_from(w).unwrap(), 1, lba, data.clone(), false)
                            .await
                        {
                            Ok(()) => break,
                            Err(e) if e.is_retryable() => {
                                errs.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => panic!("write {lba}: {e}"),
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    i += WRITERS;
                }
            }
            round
        }));
    }
    // Cut every connection three times, each after another `extents` writes have
    // completed (one round's worth), while the writers run.
    let t0 = std::time::Instant::now();
    for k in 1..=3u64 {
        while completed.load(Ordering::Relaxed) < k * extents {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let n = proxy.cut_all();
        eprintln!(
            "{:?} cut {n} after {} writes",
            t0.elapsed(),
            completed.load(Ordering::Relaxed)
        );
    }
    stop.store(true, Ordering::Relaxed);
    let mut last = Vec::new();
    for t in tasks {
        last.push(t.await.unwrap());
    }
    eprintln!(
        "{:?} writes done ({} completed), {} reconnects, {} path errors",
        t0.elapsed(),
        completed.load(Ordering::Relaxed),
        c.reconnect_count(),
        path_errors.load(Ordering::Relaxed)
    );
    assert!(
        c.reconnect_count() >= 1,
        "the cuts forced at least one reconnect"
    );
    assert!(
        path_errors.load(Ordering::Relaxed) > 0,
        "some I/O saw the path failure"
    );
    // Every extent holds its writer's last version, byte for byte.
    for i in 0..extents {
        let lba = i * u64::from(BLOCKS);
        let got = loop {
            match c.read(0, 1, lba, BLOCKS).await {
                Ok(d) => break d,
                Err(e) if e.is_retryable() => continue,
                Err(e) => panic!("{e}"),
            }
        };
        let version = last[usize::try_from(i % WRITERS).unwrap()];
        assert!(
            got == block(lba, version, 2),
            "extent at {lba} does not hold version {version}"
        );
    }
    drop(c);
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_path_times_out_then_recovers() {
    let t = start_target(|_| {}).await;
    let proxy = Proxy::start(t.local_addr()).await;
    let mut hc = host_config(proxy.addr, 1, 8);
    hc.command_timeout = Duration::from_millis(800);
    hc.connect_timeout = Duration::from_millis(500);
    hc.keep_alive = Duration::ZERO;
    hc.reconnect = ReconnectPolicy {
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
        give_up_after: None,
    };
    let c = Controller::connect(hc).await.unwrap();
    c.write(0, 1, 5, block(5, 1, 1), false).await.unwrap();
    proxy.frozen.store(true, Ordering::Relaxed);
    let started = std::time::Instant::now();
    let e = c.write(0, 1, 5, block(5, 2, 1), false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "timed out promptly"
    );
    // While the path is stalled, new commands fail as path errors (after
    // waiting one command timeout for the reconnect), not hang.
    let e = c.read(0, 1, 5, 1).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    proxy.cut_all();
    proxy.frozen.store(false, Ordering::Relaxed);
    // The association comes back by itself; the timed-out write may or may not
    // have landed, so the block holds version 1 or 2 and nothing else.
    let got = loop {
        match c.read(0, 1, 5, 1).await {
            Ok(d) => break d,
            Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("{e}"),
        }
    };
    assert!(got == block(5, 1, 1) || got == block(5, 2, 1));
    assert!(c.reconnect_count() >= 1);
    t.shutdown().await;
}

#[tokio::test]
async fn admin_passthrough_smart_log_and_limits() {
    use nvmeof::nvme::{AdminCommand, LogPageId, SmartLog};
    let t = start_target(|_| {}).await;
    let c = Controller::connect(host_config(t.local_addr(), 1, 4))
        .await
        .unwrap();
    c.write(0, 1, 0, block(0, 1, 1), false).await.unwrap();
    let smart = AdminCommand::GetLogPage {
        nsid: 0xFFFF_FFFF,
        lid: LogPageId::SMART,
        lsp: 0,
        rae: false,
        numd: 512 / 4 - 1,
        offset: 0,
    };
    let r = c.admin(smart, Bytes::new(), 512).await.unwrap();
    let log = SmartLog::decode(&r.data).unwrap();
    assert!(log.host_write_commands >= 1, "{log:?}");
    let e = c.admin(smart, Bytes::new(), 1 << 20).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidRequest);
    // A log page the controller does not have comes back as a status error.
    let bogus = AdminCommand::GetLogPage {
        nsid: 0xFFFF_FFFF,
        lid: LogPageId(0xEE),
        lsp: 0,
        rae: false,
        numd: 512 / 4 - 1,
        offset: 0,
    };
    let e = c.admin(bogus, Bytes::new(), 512).await.unwrap_err();
    assert!(e.status().is_some_and(|s| !s.is_success()), "{e}");
    // The association is still usable.
    c.read(0, 1, 0, 1).await.unwrap();
    t.shutdown().await;
}
