//! Asynchronous events of the target, through this crate's host: a namespace whose
//! backend grows is announced with `Target::namespace_resized`, and every controller
//! of the subsystem that enabled Namespace Attribute Notices gets one Asynchronous
//! Event completion (Notice, Namespace Attribute Changed, log page 04h); the Changed
//! Namespace List names the namespace until it is read; further notices are masked
//! until then; Identify Namespace and the I/O range checks use the new size; and
//! Get Log Page 04h with odd offsets and lengths answers as the specification says.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nvmeof::backend::{check_range, Backend, BackendFuture, IoPath, MemoryBackend};
use nvmeof::host::{Controller, HostConfig, HostError, Response};
use nvmeof::nvme::{
    AdminCommand, Feature, FeatureId, IdentifyCns, IdentifyNamespace, IoCommand, LogPageId,
    StatusCode,
};
use nvmeof::target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use tokio::task::JoinHandle;

const SUBNQN: &str = "nqn.2026-11.io.dpu-offload:aen-test";
const BS: u64 = 4096;
const OLD_BYTES: u64 = 4 << 20;
const NEW_BYTES: u64 = 6 << 20;
const MAX_BYTES: u64 = 16 << 20;
/// Completion DW0 of a Namespace Attribute Changed notice.
const NS_ATTR_CHANGED: u32 = 0x0004_0002;
const AEC_NS_ATTR: u32 = 1 << 8;

/// A memory namespace whose size the test changes (up to `MAX_BYTES`).
#[derive(Debug)]
struct Growable {
    mem: MemoryBackend,
    size: AtomicU64,
}

impl Growable {
    fn check(&self, offset: u64, len: u64) -> Result<(), nvmeof::backend::BackendError> {
        check_range(offset, len, 4096, self.size.load(Ordering::Acquire))
    }
}

impl Backend for Growable {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn block_size(&self) -> u32 {
        4096
    }
    fn volatile_write_cache(&self) -> bool {
        false
    }
    fn deallocate_reads_zeroes(&self) -> bool {
        true
    }
    fn io_path(&self) -> IoPath {
        self.mem.io_path()
    }
    fn describe(&self) -> String {
        "growable memory".into()
    }
    fn read(&self, offset: u64, len: u64) -> BackendFuture<'_, Bytes> {
        let c = self.check(offset, len);
        Box::pin(async move {
            c?;
            self.mem.read(offset, len).await
        })
    }
    fn write(&self, offset: u64, data: Bytes) -> BackendFuture<'_, ()> {
        let c = self.check(offset, u64::try_from(data.len()).unwrap());
        Box::pin(async move {
            c?;
            self.mem.write(offset, data).await
        })
    }
    fn flush(&self) -> BackendFuture<'_, ()> {
        self.mem.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> BackendFuture<'_, ()> {
        let c = self.check(offset, len);
        Box::pin(async move {
            c?;
            self.mem.write_zeroes(offset, len).await
        })
    }
    fn deallocate(&self, offset: u64, len: u64) -> BackendFuture<'_, ()> {
        let c = self.check(offset, len);
        Box::pin(async move {
            c?;
            self.mem.deallocate(offset, len).await
        })
    }
}

async fn start() -> (Target, Arc<Growable>) {
    let be = Arc::new(Growable {
        mem: MemoryBackend::new(MAX_BYTES, 4096).unwrap(),
        size: AtomicU64::new(OLD_BYTES),
    });
    let sub = SubsystemConfig::new(SUBNQN)
        .namespace(NamespaceConfig::new(Arc::clone(&be) as Arc<dyn Backend>).id_seed("aen"))
        .allow_any_host();
    let cfg = TargetConfig::new("127.0.0.1:0".parse().unwrap()).subsystem(sub);
    (Target::start(cfg).await.unwrap(), be)
}

async fn connect(addr: SocketAddr) -> Controller {
    let mut c = HostConfig::new(addr, SUBNQN);
    c.command_timeout = Duration::from_secs(20);
    Controller::connect(c).await.unwrap()
}

async fn set_aec(c: &Controller, mask: u32) {
    c.admin(
        AdminCommand::SetFeatures {
            nsid: 0,
            save: false,
            feature: Feature::AsyncEventConfig { mask },
        },
        Bytes::new(),
        0,
    )
    .await
    .unwrap();
    let r = c
        .admin(
            AdminCommand::GetFeatures {
                nsid: 0,
                sel: 0,
                fid: FeatureId::ASYNC_EVENT_CONFIG,
                cdw11: 0,
            },
            Bytes::new(),
            0,
        )
        .await
        .unwrap();
    assert_eq!(
        r.cqe.dw0, mask,
        "Get Features returns the configuration set"
    );
}

/// Posts an Asynchronous Event Request; the task ends when the target completes it.
fn post_aer(c: &Controller) -> JoinHandle<Result<Response, HostError>> {
    let c = c.clone();
    tokio::spawn(async move {
        c.admin(AdminCommand::AsyncEventRequest, Bytes::new(), 0)
            .await
    })
}

async fn event(aer: JoinHandle<Result<Response, HostError>>) -> u32 {
    tokio::time::timeout(Duration::from_secs(5), aer)
        .await
        .expect("the AER completes")
        .unwrap()
        .unwrap()
        .cqe
        .dw0
}

/// The AER is still held after a while (no event was reported).
async fn still_held(aer: &JoinHandle<Result<Response, HostError>>) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!aer.is_finished(), "no event is reported: {aer:?}");
}

async fn log_page(c: &Controller, offset: u64, len: u32, rae: bool) -> Result<Vec<u8>, HostError> {
    let r = c
        .admin(
            AdminCommand::GetLogPage {
                nsid: 0xFFFF_FFFF,
                lid: LogPageId::CHANGED_NAMESPACES,
                lsp: 0,
                rae,
                numd: len / 4 - 1,
                offset,
            },
            Bytes::new(),
            len,
        )
        .await?;
    Ok(r.data.to_vec())
}

/// The Changed Namespace List read in full (and so cleared unless `rae`).
async fn changed_list(c: &Controller, rae: bool) -> Vec<u32> {
    let page = log_page(c, 0, 4096, rae).await.unwrap();
    assert_eq!(page.len(), 4096);
    let ids: Vec<u32> = page
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let n = ids.iter().position(|&x| x == 0).unwrap_or(ids.len());
    assert!(ids[n..].iter().all(|&x| x == 0), "zero after the list");
    ids[..n].to_vec()
}

async fn identify_blocks(c: &Controller) -> u64 {
    let r = c
        .admin(
            AdminCommand::Identify {
                cns: IdentifyCns::NAMESPACE,
                nsid: 1,
                cntid: 0,
            },
            Bytes::new(),
            4096,
        )
        .await
        .unwrap();
    let id = IdentifyNamespace::decode(&r.data).unwrap();
    assert_eq!(id.nsze, id.ncap);
    assert_eq!(id.nsze, id.nuse);
    id.nsze
}

fn status_code(e: &HostError) -> StatusCode {
    match e {
        HostError::Status { status, .. } => status.code,
        other => panic!("expected an error status, got {other}"),
    }
}

async fn grow(target: &Target, be: &Growable, bytes: u64) {
    be.size.store(bytes, Ordering::Release);
    assert!(target.namespace_resized(SUBNQN, 1).unwrap(), "size changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_a_namespace_notifies_every_controller() {
    let (target, be) = start().await;
    let addr = target.local_addr();
    let a = connect(addr).await;
    let b = connect(addr).await;
    let oaes = a.identify().await.unwrap().oaes;
    assert_eq!(
        oaes & AEC_NS_ATTR,
        AEC_NS_ATTR,
        "OAES: namespace attribute notices"
    );
    assert_eq!(identify_blocks(&a).await, OLD_BYTES / BS);
    set_aec(&a, AEC_NS_ATTR).await;
    set_aec(&b, AEC_NS_ATTR).await;
    let aer_a = post_aer(&a);
    let aer_b = post_aer(&b);
    still_held(&aer_a).await;

    // Same size: nothing to announce. Unknown namespace or subsystem: an error.
    assert!(!target.namespace_resized(SUBNQN, 1).unwrap());
    assert!(target.namespace_resized(SUBNQN, 2).is_err());
    assert!(target
        .namespace_resized("nqn.2026-11.io.dpu-offload:none", 1)
        .is_err());
    still_held(&aer_a).await;

    grow(&target, &be, NEW_BYTES).await;
    assert_eq!(event(aer_a).await, NS_ATTR_CHANGED);
    assert_eq!(event(aer_b).await, NS_ATTR_CHANGED);

    // The log names the namespace once, then reads empty.
    assert_eq!(changed_list(&a, false).await, vec![1]);
    assert_eq!(changed_list(&a, false).await, Vec::<u32>::new());
    // Each controller has its own list.
    assert_eq!(changed_list(&b, false).await, vec![1]);

    assert_eq!(identify_blocks(&a).await, NEW_BYTES / BS);
    assert_eq!(identify_blocks(&b).await, NEW_BYTES / BS);

    // I/O beyond the old end works; beyond the new end it is refused.
    let lba = OLD_BYTES / BS + 3;
    let data = Bytes::from(vec![0xA5u8; 8192]);
    a.io_raw(
        0,
        IoCommand::Write {
            nsid: 1,
            slba: lba,
            nlb: 1,
            fua: false,
        },
        data.clone(),
        0,
    )
    .await
    .unwrap();
    let r = b
        .io_raw(
            0,
            IoCommand::Read {
                nsid: 1,
                slba: lba,
                nlb: 1,
                fua: false,
            },
            Bytes::new(),
            8192,
        )
        .await
        .unwrap();
    assert_eq!(r.data, data);
    let e = a
        .io_raw(
            0,
            IoCommand::Read {
                nsid: 1,
                slba: NEW_BYTES / BS - 1,
                nlb: 1,
                fua: false,
            },
            Bytes::new(),
            8192,
        )
        .await
        .unwrap_err();
    assert_eq!(status_code(&e), StatusCode::LBA_OUT_OF_RANGE);

    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_are_masked_until_the_log_is_read() {
    let (target, be) = start().await;
    let c = connect(target.local_addr()).await;
    set_aec(&c, AEC_NS_ATTR).await;

    // An event with no AER outstanding waits for the next one.
    grow(&target, &be, OLD_BYTES + BS).await;
    assert_eq!(event(post_aer(&c)).await, NS_ATTR_CHANGED);

    // Reported and its log not read: further changes are masked...
    let aer = post_aer(&c);
    grow(&target, &be, OLD_BYTES + 2 * BS).await;
    still_held(&aer).await;
    // ...reading the log with Retain Asynchronous Event keeps them masked...
    assert_eq!(changed_list(&c, true).await, vec![1]);
    grow(&target, &be, OLD_BYTES + 3 * BS).await;
    still_held(&aer).await;
    // ...and reading it without clears the list and unmasks.
    assert_eq!(changed_list(&c, false).await, vec![1]);
    still_held(&aer).await;
    grow(&target, &be, OLD_BYTES + 4 * BS).await;
    assert_eq!(event(aer).await, NS_ATTR_CHANGED);
    assert_eq!(changed_list(&c, false).await, vec![1]);
    assert_eq!(identify_blocks(&c).await, OLD_BYTES / BS + 4);

    c.shutdown().await.unwrap();
    target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_notices_send_no_event() {
    let (target, be) = start().await;
    let c = connect(target.local_addr()).await;
    // Enabled, then disabled again by Set Features.
    set_aec(&c, AEC_NS_ATTR).await;
    set_aec(&c, 0).await;
    let aer = post_aer(&c);
    grow(&target, &be, NEW_BYTES).await;
    still_held(&aer).await;
    // The list records the change all the same, and Identify shows the new size.
    assert_eq!(changed_list(&c, false).await, vec![1]);
    assert_eq!(identify_blocks(&c).await, NEW_BYTES / BS);
    // Enabled again: the next change is reported on the AER still held.
    set_aec(&c, AEC_NS_ATTR).await;
    grow(&target, &be, NEW_BYTES + BS).await;
    assert_eq!(event(aer).await, NS_ATTR_CHANGED);

    c.shutdown().await.unwrap();
    target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_namespace_log_odd_requests() {
    let (target, be) = start().await;
    let c = connect(target.local_addr()).await;
    grow(&target, &be, NEW_BYTES).await;

    // Offsets not a multiple of 4 and offsets past the page are Invalid Field, and
    // such a refused read does not clear the list.
    let e = log_page(&c, 2, 4, false).await.unwrap_err();
    assert_eq!(status_code(&e), StatusCode::INVALID_FIELD);
    let e = log_page(&c, 4100, 4, false).await.unwrap_err();
    assert_eq!(status_code(&e), StatusCode::INVALID_FIELD);
    let e = log_page(&c, u64::MAX - 3, 4, false).await.unwrap_err();
    assert_eq!(status_code(&e), StatusCode::INVALID_FIELD);

    // Part of the page (with RAE, so the list stays): the first NSID and zeroes.
    let part = log_page(&c, 0, 8, true).await.unwrap();
    assert_eq!(part, [1, 0, 0, 0, 0, 0, 0, 0]);
    // The tail: zeroes, and past the 4 KiB page zero-filled.
    let tail = log_page(&c, 4092, 12, true).await.unwrap();
    assert_eq!(tail, vec![0u8; 12]);
    // More than the page from offset 0: the list, then zeroes.
    let big = log_page(&c, 0, 8192, true).await.unwrap();
    assert_eq!(big.len(), 8192);
    assert_eq!(big[..4], [1, 0, 0, 0]);
    assert!(big[4..].iter().all(|&b| b == 0));
    // Reading at the very end (no bytes of the page) is valid and clears the list.
    assert_eq!(log_page(&c, 4096, 4, false).await.unwrap(), vec![0u8; 4]);
    assert_eq!(changed_list(&c, false).await, Vec::<u32>::new());

    c.shutdown().await.unwrap();
    target.shutdown().await;
}
