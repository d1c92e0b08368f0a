//! The NVMe/TCP front-end over loopback, driven by the `nvmeof` host library: I/O,
//! flush, write zeroes, deallocate and Identify against devices whose contents the
//! test can see; the host NQN allow-list; commands beyond the namespace; every device
//! error class as the NVMe status a host sees; export removal; and the queues spread
//! over two reactors. After each failure the same connection and the other exports
//! keep working. Each export's counters follow its commands, device errors included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use engine::frontend::nvme_tcp::{NvmeTcpConfig, NvmeTcpServer, NvmeTcpStats};
use engine::frontend::{BlockDevice, DeviceError, DeviceFuture, IoHints, MemoryDevice};
use engine::reactor::Reactors;
use nvmeof::host::{Controller, HostConfig, HostError, ReconnectPolicy};
use nvmeof::nvme::io::DsmRange;
use nvmeof::nvme::{AdminCommand, IoCommand, LogPageId, StatusCode};

const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-000000000001";
const HOST_B: &str = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-0000-0000-000000000002";
const MIB: u64 = 1 << 20;

/// What the test makes a device fail with, by first block.
#[derive(Debug, Clone)]
enum Fault {
    Media,
    Unavailable,
    NoSpace,
    ShortRead,
}

/// A memory device that records which thread called it, FUA writes and flushes,
/// advertises hints and optionally a volatile cache, and fails chosen blocks.
#[derive(Debug)]
struct TestDevice {
    mem: MemoryDevice,
    cache: bool,
    hints: IoHints,
    faults: Mutex<Vec<(u64, Fault)>>,
    threads: Mutex<HashSet<String>>,
    flushes: AtomicU64,
    fua_writes: AtomicU64,
}

impl TestDevice {
    fn new(size: u64, cache: bool) -> Arc<Self> {
        Arc::new(Self {
            mem: MemoryDevice::new(size, 4096),
            cache,
            hints: IoHints {
                write_granularity: 32 * 1024,
                io_boundary: 32 * 1024,
                optimal_write_size: 512 * 1024,
            },
            faults: Mutex::new(Vec::new()),
            threads: Mutex::new(HashSet::new()),
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
        })
    }

    fn fail(&self, block: u64, f: Fault) {
        self.faults.lock().unwrap().push((block * 4096, f));
    }

    fn fault(&self, offset: u64) -> Option<Fault> {
        let name = std::thread::current().name().unwrap_or("?").to_owned();
        self.threads.lock().unwrap().insert(name);
        self.faults
            .lock()
            .unwrap()
            .iter()
            .find(|(o, _)| *o == offset)
            .map(|(_, f)| f.clone())
    }

    fn err(f: &Fault) -> DeviceError {
        match f {
            Fault::Media => DeviceError::Media("crc and AEAD failed on 3 pieces".into()),
            Fault::Unavailable => DeviceError::Unavailable("3 nodes unreachable".into()),
            Fault::NoSpace => DeviceError::NoSpace("the pool is full".into()),
            Fault::ShortRead => DeviceError::Media("unused".into()),
        }
    }

    fn contents(&self, offset: u64, len: u64) -> Vec<u8> {
        futures::executor::block_on(self.mem.read(offset, len)).unwrap()
    }
}

impl BlockDevice for TestDevice {
    fn size_bytes(&self) -> u64 {
        self.mem.size_bytes()
    }
    fn block_size(&self) -> u32 {
        4096
    }
    fn read_only(&self) -> bool {
        false
    }
    fn volatile_write_cache(&self) -> bool {
        self.cache
    }
    fn io_hints(&self) -> IoHints {
        self.hints
    }
    fn read(&self, offset: u64, len: u64) -> DeviceFuture<'_, Vec<u8>> {
        match self.fault(offset) {
            Some(Fault::ShortRead) => Box::pin(async { Ok(vec![0; 512]) }),
            Some(f) => Box::pin(async move { Err(Self::err(&f)) }),
            None => self.mem.read(offset, len),
        }
    }
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> DeviceFuture<'_, ()> {
        if fua {
            self.fua_writes.fetch_add(1, Ordering::Relaxed);
        }
        match self.fault(offset) {
            Some(f) => Box::pin(async move { Err(Self::err(&f)) }),
            None => self.mem.write(offset, data, fua),
        }
    }
    fn flush(&self) -> DeviceFuture<'_, ()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.mem.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> DeviceFuture<'_, ()> {
        self.mem.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> DeviceFuture<'_, ()> {
        self.mem.write_zeroes(offset, len, fua)
    }
}

struct Setup {
    server: NvmeTcpServer,
    vol0: Arc<TestDevice>,
    cached: Arc<TestDevice>,
    other: Arc<TestDevice>,
    _reactors: Reactors,
}

async fn setup() -> Setup {
    let reactors = Reactors::start(2).unwrap();
    let mut cfg = NvmeTcpConfig::new("127.0.0.1:0".parse().unwrap());
    cfg.runtimes = reactors.handles();
    let server = NvmeTcpServer::start(cfg).await.unwrap();
    let vol0 = TestDevice::new(16 * MIB, false);
    let cached = TestDevice::new(4 * MIB, true);
    let other = TestDevice::new(8 * MIB, false);
    let a = vec![HOST_A.to_owned()];
    server.add_export("vol0", vol0.clone(), &a, "v0").unwrap();
    server
        .add_export("cached", cached.clone(), &a, "v1")
        .unwrap();
    server
        .add_export(
            "other",
            other.clone(),
            &[HOST_B.into(), HOST_A.into()],
            "v2",
        )
        .unwrap();
    Setup {
        server,
        vol0,
        cached,
        other,
        _reactors: reactors,
    }
}

fn host(s: &Setup, export: &str, hostnqn: &str) -> HostConfig {
    let mut c = HostConfig::new(s.server.local_addr(), s.server.subsystem_nqn(export));
    c.hostnqn = hostnqn.into();
    c.io_queues = 2;
    c.command_timeout = Duration::from_secs(10);
    c.reconnect = ReconnectPolicy {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
        give_up_after: Some(Duration::from_secs(1)),
    };
    c.reconnect_wait = Some(Duration::from_secs(2));
    c
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

fn status_of(e: &HostError) -> Option<StatusCode> {
    e.status().map(|s| s.code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_flush_zeroes_deallocate_and_identify() {
    let s = setup().await;
    let c = Controller::connect(host(&s, "vol0", HOST_A)).await.unwrap();
    assert_eq!(c.io_queue_count().await.unwrap(), 2);

    let id = c.identify().await.unwrap();
    assert_eq!(id.subnqn, "nqn.2026-11.io.dpu-offload:export:vol0");
    assert_eq!(id.nn, 1);
    assert_eq!(id.vwc & 1, 0, "no volatile cache on a device without one");
    assert_eq!(id.mn, "dpu-offload dpud volume");
    assert_ne!(id.oncs & (1 << 2), 0, "DSM");
    assert_ne!(id.oncs & (1 << 3), 0, "Write Zeroes");
    let ns = c.namespace(1).await.unwrap();
    assert_eq!(ns.block_size, 4096);
    assert_eq!(ns.blocks, 16 * MIB / 4096);
    let idns = &ns.identify;
    assert_eq!(idns.nsze, 4096);
    assert_eq!(idns.lbaf[0].lbads, 12);
    assert_eq!(idns.nsfeat & (1 << 4), 1 << 4, "OPTPERF");
    assert_eq!(idns.npwg, 7, "32 KiB granularity, 0's based");
    assert_eq!(idns.npwa, 7);
    assert_eq!(idns.nows, 127, "512 KiB optimal write, 0's based");
    assert_eq!(idns.noiob, 8, "32 KiB boundary, not 0's based");
    assert_eq!(idns.dlfeat & 0b111, 0b001, "deallocated blocks read zeroes");
    assert_eq!(idns.nsattr & 1, 0, "not write protected");

    // Writes on both queues (4 KiB in-capsule, 64 KiB and 128 KiB through R2T), read
    // back through the other queue and checked in the device itself.
    let sizes = [4096usize, 8192, 65536, 131072, 4096];
    let mut lba = 0u64;
    let mut written = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let d = pattern(i as u64 + 1, n);
        c.write(i, 1, lba, Bytes::from(d.clone()), i == 4)
            .await
            .unwrap();
        written.push((lba, d));
        lba += (n / 4096) as u64 + 3;
    }
    for (i, (lba, d)) in written.iter().enumerate() {
        let blocks = u32::try_from(d.len() / 4096).unwrap();
        let r = c.read(i + 1, 1, *lba, blocks).await.unwrap();
        assert_eq!(&r[..], &d[..], "read back at lba {lba}");
        assert_eq!(s.vol0.contents(lba * 4096, d.len() as u64), *d);
    }
    // The last LBA of the namespace is reachable.
    c.write(0, 1, 4095, Bytes::from(pattern(99, 4096)), false)
        .await
        .unwrap();
    assert_eq!(s.vol0.contents(4095 * 4096, 4096), pattern(99, 4096));

    // Queues on both reactors: the device was called from both reactor threads.
    let threads: BTreeSet<String> = s.vol0.threads.lock().unwrap().iter().cloned().collect();
    assert!(
        threads.contains("dpud-reactor-0") && threads.contains("dpud-reactor-1"),
        "device calls came from {threads:?}"
    );

    // Flush: a device without a volatile cache has nothing to flush.
    let before = s.vol0.flushes.load(Ordering::Relaxed);
    c.flush(0, 1).await.unwrap();
    assert_eq!(s.vol0.flushes.load(Ordering::Relaxed), before);

    // Write Zeroes over part of the 64 KiB write.
    let (wl, wd) = &written[2];
    c.write_zeroes(0, 1, wl + 2, 4, false).await.unwrap();
    let mut expect = wd.clone();
    expect[2 * 4096..6 * 4096].fill(0);
    assert_eq!(&c.read(1, 1, *wl, 16).await.unwrap()[..], &expect[..]);
    assert_eq!(s.vol0.contents(wl * 4096, 65536), expect);
    // With the deallocate bit too.
    c.write_zeroes(1, 1, wl + 10, 2, true).await.unwrap();
    expect[10 * 4096..12 * 4096].fill(0);
    assert_eq!(s.vol0.contents(wl * 4096, 65536), expect);

    // Deallocate (DSM) two ranges: the 128 KiB write and the first 4 KiB one.
    let (bl, _) = &written[3];
    c.deallocate(
        0,
        1,
        &[
            DsmRange {
                cattr: 0,
                nlb: 32,
                slba: *bl,
            },
            DsmRange {
                cattr: 0,
                nlb: 1,
                slba: 0,
            },
        ],
    )
    .await
    .unwrap();
    assert!(s.vol0.contents(bl * 4096, 131072).iter().all(|&b| b == 0));
    assert!(c.read(0, 1, 0, 1).await.unwrap().iter().all(|&b| b == 0));
    // Untouched data around it is intact.
    assert_eq!(
        &c.read(0, 1, written[1].0, 2).await.unwrap()[..],
        &written[1].1[..]
    );

    // A device with a volatile cache: VWC set, FUA and Flush reach the device.
    let cc = Controller::connect(host(&s, "cached", HOST_A))
        .await
        .unwrap();
    assert_eq!(cc.identify().await.unwrap().vwc & 1, 1);
    let fua0 = s.cached.fua_writes.load(Ordering::Relaxed);
    cc.write(0, 1, 3, Bytes::from(pattern(5, 8192)), true)
        .await
        .unwrap();
    assert_eq!(s.cached.fua_writes.load(Ordering::Relaxed), fua0 + 1);
    cc.write(0, 1, 5, Bytes::from(pattern(6, 4096)), false)
        .await
        .unwrap();
    assert_eq!(s.cached.fua_writes.load(Ordering::Relaxed), fua0 + 1);
    let f0 = s.cached.flushes.load(Ordering::Relaxed);
    cc.flush(1, 1).await.unwrap();
    assert_eq!(s.cached.flushes.load(Ordering::Relaxed), f0 + 1);
    assert_eq!(s.cached.contents(3 * 4096, 8192), pattern(5, 8192));

    cc.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_outside_the_allow_list_is_refused_others_carry_on() {
    let s = setup().await;
    let ok = Controller::connect(host(&s, "vol0", HOST_A)).await.unwrap();
    ok.write(0, 1, 7, Bytes::from(pattern(7, 4096)), false)
        .await
        .unwrap();
    let e = Controller::connect(host(&s, "vol0", HOST_B))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("connect invalid host"),
        "expected Connect Invalid Host, got: {e}"
    );
    assert_eq!(s.server.controllers("vol0"), 1);
    // HOST_B is allowed on "other" only.
    let b = Controller::connect(host(&s, "other", HOST_B))
        .await
        .unwrap();
    b.write(0, 1, 1, Bytes::from(pattern(8, 4096)), false)
        .await
        .unwrap();
    assert_eq!(s.other.contents(4096, 4096), pattern(8, 4096));
    // An unknown subsystem is refused too.
    let e = Controller::connect(host(&s, "nope", HOST_A))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("connect invalid parameters"), "{e}");
    assert_eq!(
        &ok.read(1, 1, 7, 1).await.unwrap()[..],
        &pattern(7, 4096)[..]
    );
    b.shutdown().await.unwrap();
    ok.shutdown().await.unwrap();
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_beyond_the_namespace_get_lba_out_of_range() {
    let s = setup().await;
    let c = Controller::connect(host(&s, "vol0", HOST_A)).await.unwrap();
    let last = 4095u64;
    let oor = |r: Result<nvmeof::host::Response, HostError>| {
        let e = r.expect_err("beyond the namespace must fail");
        assert_eq!(status_of(&e), Some(StatusCode::LBA_OUT_OF_RANGE), "{e}");
        assert!(e.status().unwrap().dnr, "{e}");
    };
    // Read of 2 blocks starting at the last one.
    oor(c
        .io_raw(
            0,
            IoCommand::Read {
                nsid: 1,
                slba: last,
                nlb: 1,
                fua: false,
            },
            Bytes::new(),
            8192,
        )
        .await);
    // Read whose slba + nlb overflows 64 bits.
    oor(c
        .io_raw(
            1,
            IoCommand::Read {
                nsid: 1,
                slba: u64::MAX,
                nlb: 1,
                fua: false,
            },
            Bytes::new(),
            8192,
        )
        .await);
    // Write of 2 blocks over the end (in-capsule).
    oor(c
        .io_raw(
            0,
            IoCommand::Write {
                nsid: 1,
                slba: last,
                nlb: 1,
                fua: false,
            },
            Bytes::from(pattern(1, 8192)),
            0,
        )
        .await);
    // Write Zeroes just past the end.
    oor(c
        .io_raw(
            0,
            IoCommand::WriteZeroes {
                nsid: 1,
                slba: last + 1,
                nlb: 0,
                deallocate: false,
                fua: false,
            },
            Bytes::new(),
            0,
        )
        .await);
    // Deallocate with one good and one bad range: nothing is deallocated.
    c.write(0, 1, 10, Bytes::from(pattern(2, 4096)), false)
        .await
        .unwrap();
    let ranges = DsmRange::encode_list(&[
        DsmRange {
            cattr: 0,
            nlb: 1,
            slba: 10,
        },
        DsmRange {
            cattr: 0,
            nlb: 2,
            slba: last,
        },
    ]);
    oor(c
        .io_raw(
            1,
            IoCommand::DatasetManagement {
                nsid: 1,
                nr: 1,
                idr: false,
                idw: false,
                deallocate: true,
            },
            Bytes::from(ranges),
            0,
        )
        .await);
    assert_eq!(s.vol0.contents(10 * 4096, 4096), pattern(2, 4096));
    // A namespace that does not exist.
    let e = c
        .io_raw(
            0,
            IoCommand::Read {
                nsid: 2,
                slba: 0,
                nlb: 0,
                fua: false,
            },
            Bytes::new(),
            4096,
        )
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), Some(StatusCode::INVALID_NAMESPACE), "{e}");
    // The device never saw any of it, and the same connection still works.
    assert_eq!(
        &c.read(0, 1, 10, 1).await.unwrap()[..],
        &pattern(2, 4096)[..]
    );
    assert_eq!(s.vol0.contents(last * 4096, 4096), vec![0; 4096]);
    // Other exports too.
    let o = Controller::connect(host(&s, "other", HOST_A))
        .await
        .unwrap();
    o.write(0, 1, 0, Bytes::from(pattern(3, 4096)), false)
        .await
        .unwrap();
    o.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_errors_become_nvme_statuses() {
    let s = setup().await;
    let c = Controller::connect(host(&s, "vol0", HOST_A)).await.unwrap();
    s.vol0.fail(100, Fault::Media);
    s.vol0.fail(101, Fault::Unavailable);
    s.vol0.fail(102, Fault::NoSpace);
    s.vol0.fail(103, Fault::ShortRead);

    // Unverifiable data: Unrecovered Read Error, no data.
    let e = c.read(0, 1, 100, 1).await.unwrap_err();
    assert_eq!(
        status_of(&e),
        Some(StatusCode::UNRECOVERED_READ_ERROR),
        "{e}"
    );
    assert_eq!(e.kind(), nvmeof::host::ErrorKind::Media);
    // A write the device could not store: Write Fault.
    let e = c
        .write(1, 1, 100, Bytes::from(pattern(1, 4096)), false)
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), Some(StatusCode::WRITE_FAULT), "{e}");
    // Unavailable: Namespace Not Ready, retryable (no DNR).
    let e = c.read(0, 1, 101, 1).await.unwrap_err();
    assert_eq!(status_of(&e), Some(StatusCode::NAMESPACE_NOT_READY), "{e}");
    assert!(!e.status().unwrap().dnr, "{e}");
    // No space: Capacity Exceeded, not retryable.
    let e = c
        .write(0, 1, 102, Bytes::from(pattern(2, 4096)), false)
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), Some(StatusCode::CAPACITY_EXCEEDED), "{e}");
    assert!(e.status().unwrap().dnr);
    // A device answering with the wrong length: an error, never shifted data.
    let e = c.read(1, 1, 103, 1).await.unwrap_err();
    assert_eq!(
        status_of(&e),
        Some(StatusCode::UNRECOVERED_READ_ERROR),
        "{e}"
    );

    // The error log page records them (newest first), and SMART counts the media
    // errors only.
    let log = c
        .admin(
            AdminCommand::GetLogPage {
                nsid: 0xFFFF_FFFF,
                lid: LogPageId::ERROR,
                lsp: 0,
                rae: false,
                numd: 64 / 4 - 1,
                offset: 0,
            },
            Bytes::new(),
            64,
        )
        .await
        .unwrap();
    let status_word = u16::from_le_bytes([log.data[12], log.data[13]]);
    assert_ne!(status_word, 0, "error log entry recorded");

    // The connection and the other blocks still work.
    c.write(0, 1, 104, Bytes::from(pattern(4, 4096)), false)
        .await
        .unwrap();
    assert_eq!(
        &c.read(1, 1, 104, 1).await.unwrap()[..],
        &pattern(4, 4096)[..]
    );

    // A read-only export: write protected in Identify, writes refused with Namespace
    // Is Write Protected, reads served.
    let ro: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4 * MIB, 4096).into_read_only());
    s.server
        .add_export("ro", ro, &[HOST_A.to_owned()], "v0")
        .unwrap();
    let r = Controller::connect(host(&s, "ro", HOST_A)).await.unwrap();
    assert_eq!(r.namespace(1).await.unwrap().identify.nsattr & 1, 1);
    let e = r
        .write(0, 1, 0, Bytes::from(pattern(5, 4096)), false)
        .await
        .unwrap_err();
    assert_eq!(
        status_of(&e),
        Some(StatusCode::NAMESPACE_WRITE_PROTECTED),
        "{e}"
    );
    let e = r.write_zeroes(0, 1, 0, 1, false).await.unwrap_err();
    assert_eq!(
        status_of(&e),
        Some(StatusCode::NAMESPACE_WRITE_PROTECTED),
        "{e}"
    );
    assert!(r.read(0, 1, 0, 1).await.unwrap().iter().all(|&b| b == 0));
    r.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_export_closes_its_connections_only() {
    let s = setup().await;
    let gone = Controller::connect(host(&s, "vol0", HOST_A)).await.unwrap();
    let stays = Controller::connect(host(&s, "other", HOST_A))
        .await
        .unwrap();
    gone.write(0, 1, 0, Bytes::from(pattern(1, 4096)), false)
        .await
        .unwrap();
    assert!(s.server.remove_export("vol0"));
    assert!(!s.server.remove_export("vol0"));
    assert_eq!(s.server.controllers("vol0"), 0);
    // The removed export's host loses its association and cannot get it back.
    let mut failed = false;
    for _ in 0..50 {
        if gone.read(0, 1, 0, 1).await.is_err() {
            failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failed, "I/O to a removed export kept working");
    let e = Controller::connect(host(&s, "vol0", HOST_A))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("connect invalid parameters"), "{e}");
    // The other export's association is untouched.
    stays
        .write(1, 1, 2, Bytes::from(pattern(2, 8192)), false)
        .await
        .unwrap();
    assert_eq!(stays.reconnect_count(), 0);
    assert_eq!(s.other.contents(2 * 4096, 8192), pattern(2, 8192));
    // Serving it again works (the same NQN).
    s.server
        .add_export("vol0", s.vol0.clone(), &[HOST_A.to_owned()], "v0")
        .unwrap();
    let again = Controller::connect(host(&s, "vol0", HOST_A)).await.unwrap();
    assert_eq!(
        &again.read(0, 1, 0, 1).await.unwrap()[..],
        &pattern(1, 4096)[..]
    );
    assert!(s
        .server
        .add_export("vol0", s.vol0.clone(), &[HOST_A.to_owned()], "v0")
        .is_err());
    assert!(s
        .server
        .add_export("empty", s.vol0.clone(), &[], "v0")
        .is_err());
    again.shutdown().await.unwrap();
    stays.shutdown().await.unwrap();
    s.server.shutdown().await;
    let _ = s.cached;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_counters_follow_the_commands_device_errors_included() {
    let s = setup().await;
    assert_eq!(s.server.exports(), ["cached", "other", "vol0"]);
    assert_eq!(s.server.stats("vol0"), Some(NvmeTcpStats::default()));
    assert_eq!(s.server.stats("nope"), None);
    let c = Controller::connect(host(&s, "vol0", HOST_A)).await.unwrap();
    s.vol0.fail(7, Fault::Media);
    c.write(0, 1, 0, Bytes::from(pattern(1, 8192)), false)
        .await
        .unwrap();
    c.read(1, 1, 0, 2).await.unwrap();
    c.write_zeroes(0, 1, 2, 2, false).await.unwrap();
    // The device fails these: a read and a write of block 7.
    c.read(1, 1, 7, 1).await.unwrap_err();
    c.write(0, 1, 7, Bytes::from(pattern(2, 4096)), false)
        .await
        .unwrap_err();
    assert_eq!(
        s.server.stats("vol0"),
        Some(NvmeTcpStats {
            controllers: 1,
            requests: 5,
            reads: 1,
            writes: 1,
            read_bytes: 8192,
            written_bytes: 8192,
            errors: 2,
        })
    );
    assert_eq!(s.server.stats("other"), Some(NvmeTcpStats::default()));
    // Gone with the export; a new export under the name starts over.
    assert!(s.server.remove_export("vol0"));
    assert_eq!(s.server.stats("vol0"), None);
    s.server
        .add_export("vol0", s.vol0.clone(), &[HOST_A.to_owned()], "v0")
        .unwrap();
    assert_eq!(s.server.stats("vol0"), Some(NvmeTcpStats::default()));
    drop(c);
    s.server.shutdown().await;
}
