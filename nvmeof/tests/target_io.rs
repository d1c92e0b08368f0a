//! The target against a hand-driven host: controller bring-up, Identify, discovery,
//! I/O (in-capsule, R2T, reads, write zeroes, deallocate), many commands in flight,
//! keep-alive, allow-lists and shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod target_support;

use bytes::Bytes;
use nvmeof::nvme::identify::decode_active_ns_list;
use nvmeof::nvme::io::DsmRange;
use nvmeof::nvme::{
    property, AdminCommand, CapRegister, DiscoveryLogEntry, Feature, FeatureId, IdentifyCns,
    IdentifyController, IdentifyNamespace, IoCommand, LogPageId, NsIdDescriptor, PropertySize,
    SmartLog, StatusCode, DISCOVERY_NQN,
};
use nvmeof::tcp::Pdu;
use std::time::{Duration, Instant};
use target_support::*;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).unwrap() ^ seed)
        .collect()
}

fn read(slba: u64, blocks: u16) -> nvmeof::nvme::SubmissionEntry {
    IoCommand::Read {
        nsid: 1,
        slba,
        nlb: blocks - 1,
        fua: false,
    }
    .to_sqe(0)
}

fn write(slba: u64, blocks: u16) -> nvmeof::nvme::SubmissionEntry {
    IoCommand::Write {
        nsid: 1,
        slba,
        nlb: blocks - 1,
        fua: false,
    }
    .to_sqe(0)
}

#[tokio::test]
async fn target_bring_up_identify_and_properties() {
    let t = start_target().await;
    let mut a = Client::connect(t.local_addr()).await;
    assert!(a.maxh2cdata >= 4096);
    let c = a.fabrics_connect(SUBNQN, HOSTNQN, 0, 31, 0xFFFF, 0).await;
    assert!(c.status.is_success());
    let cntlid = u16::try_from(c.dw0).unwrap();
    assert_ne!(cntlid, 0);
    let cap = CapRegister::from_u64(a.prop_get(property::CAP, PropertySize::Eight).await);
    assert_eq!(cap.mqes, 127);
    assert_eq!(cap.css & 1, 1);
    assert_eq!(
        a.prop_get(property::VS, PropertySize::Four).await,
        0x0001_0300
    );
    assert_eq!(
        a.prop_get(property::CSTS, PropertySize::Four).await & 1,
        0,
        "not ready before enable"
    );
    // Identify before enable is a sequence error.
    let (c, _) = a.identify(IdentifyCns::CONTROLLER, 0).await;
    assert_eq!(sc(&c), StatusCode::COMMAND_SEQUENCE_ERROR);
    assert!(a
        .prop_set(property::CC, 1 | (6 << 16) | (4 << 20))
        .await
        .status
        .is_success());
    assert_eq!(a.prop_get(property::CSTS, PropertySize::Four).await & 1, 1);

    let (c, data) = a.identify(IdentifyCns::CONTROLLER, 0).await;
    assert!(c.status.is_success());
    let id = IdentifyController::decode(&data).unwrap();
    assert_eq!(
        id.cntlid, cntlid,
        "Identify CNTLID matches the Connect result"
    );
    assert_eq!(id.subnqn, SUBNQN);
    assert_eq!(id.icdoff, 0);
    assert_eq!(id.in_capsule_data_size(), 8192);
    assert_eq!(id.max_transfer_bytes(4096), Some(128 * 1024));
    assert_ne!(id.sgls & IdentifyController::SGLS_SUPPORTED, 0);
    assert_ne!(id.oncs & IdentifyController::ONCS_WRITE_ZEROES, 0);
    assert_ne!(id.ctratt & IdentifyController::CTRATT_TBKAS, 0);
    assert_ne!(id.oncs & IdentifyController::ONCS_DSM, 0);
    assert_eq!(id.vwc & 1, 0, "memory backend has no volatile cache");
    assert_eq!(id.cntrltype, IdentifyController::CNTRLTYPE_IO);
    assert_eq!(id.maxcmd, 128);
    assert_eq!(id.nn, 1);
    assert!(id.kas > 0);

    let (c, data) = a.identify(IdentifyCns::NAMESPACE, 1).await;
    assert!(c.status.is_success());
    let ns = IdentifyNamespace::decode(&data).unwrap();
    assert_eq!(ns.nsze, NS_BYTES / 512);
    assert_eq!(ns.block_size(), Some(512));
    assert_ne!(ns.nguid, [0; 16]);

    let (_, data) = a.identify(IdentifyCns::ACTIVE_NAMESPACES, 0).await;
    assert_eq!(decode_active_ns_list(&data).unwrap(), vec![1]);
    let (_, data) = a.identify(IdentifyCns::ACTIVE_NAMESPACES, 1).await;
    assert!(decode_active_ns_list(&data).unwrap().is_empty());
    let (c, data) = a.identify(IdentifyCns::NS_ID_DESCRIPTORS, 1).await;
    assert!(c.status.is_success());
    let d = NsIdDescriptor::decode_list(&data).unwrap();
    assert!(d.contains(&NsIdDescriptor::Nguid(ns.nguid)));
    assert!(d.iter().any(|x| matches!(x, NsIdDescriptor::Uuid(_))));
    let (c, _) = a.identify(IdentifyCns::NAMESPACE, 7).await;
    assert_eq!(sc(&c), StatusCode::INVALID_NAMESPACE);

    // Number of queues.
    let sqe = AdminCommand::SetFeatures {
        nsid: 0,
        save: false,
        feature: Feature::NumberOfQueues { nsqr: 63, ncqr: 63 },
    }
    .to_sqe(0);
    let (c, _) = a.exec(sqe, None, 0).await;
    assert!(c.status.is_success());
    assert_eq!(c.dw0, 7 | (7 << 16), "granted 8 queues");

    // The NGUID/UUID are stable across restarts of the same configuration.
    t.shutdown().await;
    let t2 = start_target().await;
    let mut b = Client::connect(t2.local_addr()).await;
    b.admin_setup(SUBNQN, 0).await;
    let (_, data2) = b.identify(IdentifyCns::NS_ID_DESCRIPTORS, 1).await;
    assert_eq!(NsIdDescriptor::decode_list(&data2).unwrap(), d);
    t2.shutdown().await;
}

#[tokio::test]
async fn target_discovery_lists_only_allowed_subsystems() {
    let t = start_target_with(|c| {
        let mem = std::sync::Arc::new(nvmeof::backend::MemoryBackend::new(1 << 20, 512).unwrap());
        c.subsystem(
            nvmeof::target::SubsystemConfig::new("nqn.2026-11.io.test:hidden")
                .namespace(nvmeof::target::NamespaceConfig::new(mem))
                .allow_host(OTHER_HOST),
        )
    })
    .await;
    let mut d = Client::connect(t.local_addr()).await;
    d.admin_setup(DISCOVERY_NQN, 0).await;
    let (c, data) = d.identify(IdentifyCns::CONTROLLER, 0).await;
    assert!(c.status.is_success());
    assert_eq!(
        IdentifyController::decode(&data).unwrap().cntrltype,
        IdentifyController::CNTRLTYPE_DISCOVERY
    );
    let sqe = AdminCommand::GetLogPage {
        nsid: 0,
        lid: LogPageId::DISCOVERY,
        lsp: 0,
        rae: false,
        numd: 4096 / 4 - 1,
        offset: 0,
    }
    .to_sqe(0);
    let (c, page) = d.exec(sqe, None, 4096).await;
    assert!(c.status.is_success(), "{}", c.status);
    let (h, entries) = DiscoveryLogEntry::decode_page(&page).unwrap();
    assert_eq!(h.numrec, 1, "only the subsystem this host may see");
    assert_eq!(entries[0].subnqn, SUBNQN);
    assert_eq!(entries[0].trtype, DiscoveryLogEntry::TRTYPE_TCP);
    assert_eq!(entries[0].traddr, "127.0.0.1");
    assert_eq!(entries[0].trsvcid, t.local_addr().port().to_string());
    // A read at an offset returns the second record's start.
    let sqe = AdminCommand::GetLogPage {
        nsid: 0,
        lid: LogPageId::DISCOVERY,
        lsp: 0,
        rae: false,
        numd: 255,
        offset: 1024,
    }
    .to_sqe(0);
    let (c, part) = d.exec(sqe, None, 1024).await;
    assert!(c.status.is_success());
    assert_eq!(part, page[1024..2048]);
    // Discovery controllers have no I/O queues or namespaces.
    let (c, _) = d.identify(IdentifyCns::NAMESPACE, 1).await;
    assert!(!c.status.is_success());
    t.shutdown().await;
}

#[tokio::test]
async fn target_io_round_trips_in_capsule_and_r2t() {
    let t = start_target().await;
    let (_a, mut q, _) = io_pair(t.local_addr()).await;
    // In-capsule write of 8 blocks (4 KiB).
    let d1 = pattern(1, 4096);
    let (c, _) = q.exec(write(0, 8), Some(Bytes::from(d1.clone())), 0).await;
    assert!(c.status.is_success(), "{}", c.status);
    // 64 KiB write through R2T, sent in 4 KiB H2CData PDUs (several PDUs per R2T).
    let d2 = pattern(2, 65536);
    let c = q.write_r2t(write(100, 128), &d2, 4096).await;
    assert!(c.status.is_success(), "{}", c.status);
    // 128 KiB (MDTS) write through R2T in MAXH2CDATA chunks.
    let d3 = pattern(3, 131072);
    let chunk = usize::try_from(q.maxh2cdata).unwrap();
    let c = q.write_r2t(write(1000, 256), &d3, chunk).await;
    assert!(c.status.is_success());
    let (c, r) = q.exec(read(0, 8), None, 4096).await;
    assert!(c.status.is_success());
    assert_eq!(r, d1);
    let (_, r) = q.exec(read(100, 128), None, 65536).await;
    assert_eq!(r, d2);
    let (_, r) = q.exec(read(1000, 256), None, 131072).await;
    assert_eq!(r, d3);
    // Write Zeroes and deallocate.
    let (c, _) = q
        .exec(
            IoCommand::WriteZeroes {
                nsid: 1,
                slba: 2,
                nlb: 1,
                deallocate: false,
                fua: false,
            }
            .to_sqe(0),
            None,
            0,
        )
        .await;
    assert!(c.status.is_success());
    let (_, r) = q.exec(read(0, 8), None, 4096).await;
    assert_eq!(&r[..1024], &d1[..1024]);
    assert!(r[1024..2048].iter().all(|&b| b == 0));
    assert_eq!(&r[2048..], &d1[2048..]);
    let ranges = DsmRange::encode_list(&[DsmRange {
        cattr: 0,
        nlb: 128,
        slba: 100,
    }]);
    let sqe = IoCommand::DatasetManagement {
        nsid: 1,
        nr: 0,
        idr: false,
        idw: false,
        deallocate: true,
    }
    .to_sqe(0);
    let (c, _) = q.exec(sqe, Some(Bytes::from(ranges)), 0).await;
    assert!(c.status.is_success());
    let (_, r) = q.exec(read(100, 128), None, 65536).await;
    assert!(
        r.iter().all(|&b| b == 0),
        "deallocated blocks read as zeroes"
    );
    let (c, _) = q
        .exec(IoCommand::Flush { nsid: 1 }.to_sqe(0), None, 0)
        .await;
    assert!(c.status.is_success());
    let (c, _) = q
        .exec(IoCommand::Flush { nsid: 0xFFFF_FFFF }.to_sqe(0), None, 0)
        .await;
    assert!(c.status.is_success());
    // A no-data command described by an empty in-capsule SGL is fine too.
    let (c, _) = q
        .exec(
            IoCommand::Flush { nsid: 1 }.to_sqe(0),
            Some(Bytes::new()),
            0,
        )
        .await;
    assert!(c.status.is_success());
    // A read larger than the host's buffer is refused.
    let (c, _) = q.exec(read(0, 8), None, 512).await;
    assert_eq!(sc(&c), StatusCode::DATA_SGL_LENGTH_INVALID);
    t.shutdown().await;
}

#[tokio::test]
async fn target_many_commands_in_flight_on_several_queues() {
    let t = start_target().await;
    let addr = t.local_addr();
    let mut a = Client::connect(addr).await;
    let cntlid = a.admin_setup(SUBNQN, 0).await;
    let mut queues = Vec::new();
    for qid in 1..=4u16 {
        let mut q = Client::connect(addr).await;
        let c = q
            .fabrics_connect(SUBNQN, HOSTNQN, qid, 127, cntlid, 0)
            .await;
        assert!(c.status.is_success());
        queues.push(q);
    }
    // The same queue id twice is refused.
    let mut dup = Client::connect(addr).await;
    let c = dup
        .fabrics_connect(SUBNQN, HOSTNQN, 1, 127, cntlid, 0)
        .await;
    assert_eq!(sc(&c), StatusCode::CONNECT_INVALID_PARAMETERS);
    let mut tasks = Vec::new();
    for (i, mut q) in queues.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let base = u64::try_from(i).unwrap() * 8192;
            // 64 writes in flight, then 64 reads in flight.
            let mut cids = Vec::new();
            for k in 0..64u64 {
                let d = pattern(u8::try_from(k).unwrap(), 4096);
                cids.push(
                    q.submit(write(base + k * 8, 8), Some(Bytes::from(d)), 0)
                        .await,
                );
            }
            let mut done = std::collections::HashSet::new();
            while done.len() < cids.len() {
                match q.recv().await {
                    Pdu::CapsuleResp(r) => {
                        assert!(r.cqe.status.is_success());
                        assert!(done.insert(r.cqe.cid));
                    }
                    other => panic!("{other:?}"),
                }
            }
            let mut by_cid = std::collections::HashMap::new();
            for k in 0..64u64 {
                by_cid.insert(q.submit(read(base + k * 8, 8), None, 4096).await, k);
            }
            let mut data: std::collections::HashMap<u16, Vec<u8>> = Default::default();
            let mut completed = 0;
            while completed < 64 {
                match q.recv().await {
                    Pdu::C2HData(d) => data.entry(d.cccid).or_default().extend_from_slice(&d.data),
                    Pdu::CapsuleResp(r) => {
                        assert!(r.cqe.status.is_success());
                        let k = by_cid[&r.cqe.cid];
                        assert_eq!(data[&r.cqe.cid], pattern(u8::try_from(k).unwrap(), 4096));
                        completed += 1;
                    }
                    other => panic!("{other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // SMART counts what was done.
    let sqe = AdminCommand::GetLogPage {
        nsid: 0xFFFF_FFFF,
        lid: LogPageId::SMART,
        lsp: 0,
        rae: false,
        numd: 127,
        offset: 0,
    }
    .to_sqe(0);
    let (c, page) = a.exec(sqe, None, 512).await;
    assert!(c.status.is_success());
    let smart = SmartLog::decode(&page).unwrap();
    assert_eq!(smart.host_write_commands, 256);
    assert_eq!(smart.host_read_commands, 256);
    t.shutdown().await;
}

#[tokio::test]
async fn target_keep_alive_timeout_tears_down_controller() {
    let t = start_target().await;
    let addr = t.local_addr();
    // With keep-alives (every 100 ms) a controller survives well past its 400 ms KATO.
    let mut live = Client::connect(addr).await;
    live.admin_setup(SUBNQN, 400).await;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let pinger = tokio::spawn(async move {
        loop {
            let (c, _) = live.exec(AdminCommand::KeepAlive.to_sqe(0), None, 0).await;
            assert!(c.status.is_success());
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = &mut stop_rx => return live,
            }
        }
    });

    // Without them a controller is torn down: the held AER completes as aborted and
    // every queue's connection closes.
    let mut a = Client::connect(addr).await;
    let cntlid = a.admin_setup(SUBNQN, 300).await;
    let mut q = Client::connect(addr).await;
    assert!(q
        .fabrics_connect(SUBNQN, HOSTNQN, 1, 31, cntlid, 0)
        .await
        .status
        .is_success());
    assert_eq!(t.controller_count(SUBNQN), 2);
    let aer = a
        .submit(AdminCommand::AsyncEventRequest.to_sqe(0), None, 0)
        .await;
    let start = Instant::now();
    let (c, _) = a.wait(aer).await;
    assert_eq!(sc(&c), StatusCode::ABORTED_SQ_DELETION);
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    assert!(a.expect_closed().await.is_none());
    assert!(q.expect_closed().await.is_none());
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The pinged controller is still there.
    assert_eq!(t.controller_count(SUBNQN), 1);
    stop_tx.send(()).unwrap();
    let mut live = pinger.await.unwrap();
    let (c, _) = live.exec(AdminCommand::KeepAlive.to_sqe(0), None, 0).await;
    assert!(c.status.is_success());
    t.shutdown().await;
}

/// Traffic-based keep alive: I/O alone keeps a controller whose host sends no Keep
/// Alive; once the I/O stops, it is torn down within two KATO periods.
#[tokio::test]
async fn io_traffic_alone_keeps_a_controller_alive() {
    let t = start_target().await;
    let addr = t.local_addr();
    let mut a = Client::connect(addr).await;
    let cntlid = a.admin_setup(SUBNQN, 400).await;
    let mut q = Client::connect(addr).await;
    assert!(q
        .fabrics_connect(SUBNQN, HOSTNQN, 1, 31, cntlid, 0)
        .await
        .status
        .is_success());
    // Flushes every 100 ms for 1.2 s: three KATO periods without a Keep Alive.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1200) {
        let (c, _) = q
            .exec(IoCommand::Flush { nsid: 1 }.to_sqe(0), None, 0)
            .await;
        assert!(
            c.status.is_success(),
            "flush failed after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(t.controller_count(SUBNQN), 1);
    // Silence: gone after at most two periods (plus scheduling slack).
    let quiet = Instant::now();
    assert!(q.expect_closed().await.is_none());
    assert!(
        quiet.elapsed() >= Duration::from_millis(300) && quiet.elapsed() < Duration::from_secs(3),
        "{:?}",
        quiet.elapsed()
    );
    assert_eq!(t.controller_count(SUBNQN), 0);
    drop(a);
    t.shutdown().await;
}

#[tokio::test]
async fn target_allow_list_denies_unknown_hosts() {
    let t = start_target().await;
    let addr = t.local_addr();
    let mut bad = Client::connect(addr).await;
    let c = bad
        .fabrics_connect(SUBNQN, OTHER_HOST, 0, 31, 0xFFFF, 0)
        .await;
    assert_eq!(sc(&c), StatusCode::CONNECT_INVALID_HOST);
    // Unknown subsystem: invalid parameters pointing at SUBNQN in the data.
    let c = bad
        .fabrics_connect("nqn.2026-11.io.test:nope", HOSTNQN, 0, 31, 0xFFFF, 0)
        .await;
    assert_eq!(sc(&c), StatusCode::CONNECT_INVALID_PARAMETERS);
    assert_eq!(c.dw0, (1 << 16) | 256);
    // The allowed host still gets in, on a fresh connection and on this one.
    let mut good = Client::connect(addr).await;
    good.admin_setup(SUBNQN, 0).await;
    // Deny by default: a subsystem with an empty allow-list admits nobody;
    // allow_any_host admits everybody.
    t.shutdown().await;
    let t = start_target_with(|mut c| {
        c.subsystems[0].allowed_hosts.clear();
        c
    })
    .await;
    let mut x = Client::connect(t.local_addr()).await;
    let c = x.fabrics_connect(SUBNQN, HOSTNQN, 0, 31, 0xFFFF, 0).await;
    assert_eq!(sc(&c), StatusCode::CONNECT_INVALID_HOST);
    t.shutdown().await;
    let t = start_target_with(|mut c| {
        c.subsystems[0].allowed_hosts.clear();
        c.subsystems[0].allow_any_host = true;
        c
    })
    .await;
    let mut x = Client::connect(t.local_addr()).await;
    let c = x
        .fabrics_connect(SUBNQN, OTHER_HOST, 0, 31, 0xFFFF, 0)
        .await;
    assert!(c.status.is_success());
    t.shutdown().await;
}

#[tokio::test]
async fn target_shutdown_closes_every_connection() {
    let t = start_target().await;
    let (mut a, mut q, _) = io_pair(t.local_addr()).await;
    let aer = a
        .submit(AdminCommand::AsyncEventRequest.to_sqe(0), None, 0)
        .await;
    // Make sure the AER reached the target before shutting down.
    let (c, _) = a.exec(AdminCommand::KeepAlive.to_sqe(0), None, 0).await;
    assert!(c.status.is_success());
    tokio::time::timeout(Duration::from_secs(5), t.shutdown())
        .await
        .expect("shutdown finishes");
    let (c, _) = a.wait(aer).await;
    assert_eq!(sc(&c), StatusCode::ABORTED_SQ_DELETION);
    a.expect_closed().await;
    q.expect_closed().await;
}

#[tokio::test]
async fn target_disable_closes_io_queues_and_disconnect_works() {
    let t = start_target().await;
    let (mut a, mut q, _) = io_pair(t.local_addr()).await;
    // CC.EN = 0: controller reset deletes the I/O queues.
    assert!(a.prop_set(property::CC, 0).await.status.is_success());
    assert_eq!(a.prop_get(property::CSTS, PropertySize::Four).await & 1, 0);
    q.expect_closed().await;
    // Shutdown notification completes at once.
    assert!(a.prop_set(property::CC, 1 << 14).await.status.is_success());
    assert_eq!(
        (a.prop_get(property::CSTS, PropertySize::Four).await >> 2) & 3,
        0b10
    );
    // Disconnect on the admin queue ends the association.
    let sqe = nvmeof::nvme::FabricsCommand::Disconnect { recfmt: 0 }.to_sqe(0);
    let (c, _) = a.exec(sqe, None, 0).await;
    assert!(c.status.is_success());
    a.expect_closed().await;
    for _ in 0..50 {
        if t.controller_count(SUBNQN) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(t.controller_count(SUBNQN), 0);
    // Get Features reflects Set Features.
    let mut b = Client::connect(t.local_addr()).await;
    b.admin_setup(SUBNQN, 0).await;
    let sqe = AdminCommand::SetFeatures {
        nsid: 0,
        save: false,
        feature: Feature::KeepAliveTimer { kato_ms: 12000 },
    }
    .to_sqe(0);
    assert!(b.exec(sqe, None, 0).await.0.status.is_success());
    let sqe = AdminCommand::GetFeatures {
        nsid: 0,
        sel: 0,
        fid: FeatureId::KEEP_ALIVE_TIMER,
        cdw11: 0,
    }
    .to_sqe(0);
    let (c, _) = b.exec(sqe, None, 0).await;
    assert_eq!(c.dw0, 12000);
    t.shutdown().await;
}

#[tokio::test]
async fn target_digests_when_negotiated() {
    let t = start_target().await;
    let addr = t.local_addr();
    let mut a = Client::connect_digests(addr, true, true).await;
    let cntlid = a.admin_setup(SUBNQN, 0).await;
    let mut q = Client::connect_digests(addr, true, true).await;
    assert!(q
        .fabrics_connect(SUBNQN, HOSTNQN, 1, 63, cntlid, 0)
        .await
        .status
        .is_success());
    let d = pattern(9, 32768);
    let c = q.write_r2t(write(8, 64), &d, 8192).await;
    assert!(c.status.is_success());
    let (c, r) = q.exec(read(8, 64), None, 32768).await;
    assert!(c.status.is_success());
    assert_eq!(r, d);
    t.shutdown().await;
}

#[tokio::test]
async fn target_c2h_success_flag_only_without_sq_flow_control() {
    let t = start_target().await;
    let addr = t.local_addr();
    let mut a = Client::connect(addr).await;
    let cntlid = a.admin_setup(SUBNQN, 0).await;
    // CATTR bit 2: SQ flow control disabled (what Linux sends after a discovery
    // entry with TREQ bit 2).
    let mut q = Client::connect(addr).await;
    let sqe = nvmeof::nvme::FabricsCommand::Connect {
        recfmt: 0,
        qid: 1,
        sqsize: 31,
        cattr: 4,
        kato_ms: 0,
    }
    .to_sqe(0);
    let cd = nvmeof::nvme::ConnectData {
        hostid: HOSTID,
        cntlid,
        subnqn: SUBNQN.into(),
        hostnqn: HOSTNQN.into(),
    };
    let (c, _) = q
        .exec(sqe, Some(Bytes::copy_from_slice(&cd.encode())), 0)
        .await;
    assert!(c.status.is_success());
    let d = pattern(4, 4096);
    assert!(q
        .exec(write(40, 8), Some(Bytes::from(d.clone())), 0)
        .await
        .0
        .status
        .is_success());
    let cid = q.submit(read(40, 8), None, 4096).await;
    match q.recv().await {
        Pdu::C2HData(x) => {
            assert!(x.success && x.last, "SUCCESS flag set");
            assert_eq!(x.cccid, cid);
            assert_eq!(&x.data[..], &d[..]);
        }
        other => panic!("{other:?}"),
    }
    // No response capsule follows: the next PDU answers the next command.
    let (c, _) = q
        .exec(IoCommand::Flush { nsid: 1 }.to_sqe(0), None, 0)
        .await;
    assert!(c.status.is_success());
    // With flow control on (the default queue of io_pair) reads get a response capsule.
    let (_a2, mut q2, _) = io_pair(addr).await;
    let cid = q2.submit(read(40, 8), None, 4096).await;
    let Pdu::C2HData(x) = q2.recv().await else {
        panic!("expected C2HData")
    };
    assert!(!x.success);
    let Pdu::CapsuleResp(r) = q2.recv().await else {
        panic!("expected CapsuleResp")
    };
    assert_eq!(r.cqe.cid, cid);
    assert!(r.cqe.status.is_success());
    t.shutdown().await;
}
