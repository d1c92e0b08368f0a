//! Our NVMe/TCP traffic against Wireshark's dissector: our host talks to our target on
//! loopback with header and data digests on while dumpcap records it, and tshark must
//! decode every PDU without a malformed packet, an NVMe expert warning or error, an
//! unknown PDU type or a digest it computes differently (docs/testing.md). Ignored in a
//! plain `cargo test` (capturing needs root or CAP_NET_RAW); `scripts/test` runs it.

// The helpers below are test code too: a panic is a failed test with its message.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nvmeof::backend::MemoryBackend;
use nvmeof::host::{discover, Controller, HostConfig};
use nvmeof::target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use testbed::capture::{dissect, pdu_type_name, Capture, Dissection};

/// PDU types of NVMe/TCP (0 ICReq, 1 ICResp, 4 CapsuleCommand, 5 CapsuleResponse,
/// 6 H2CData, 7 C2HData, 9 R2T) that the exchange below must produce.
const EXPECTED_TYPES: [u8; 7] = [0, 1, 4, 5, 6, 7, 9];
/// Digest status values of Wireshark's dissector.
const DIGEST_GOOD: u8 = 1;

fn block(lba: u64, len: usize) -> Bytes {
    Bytes::from(testbed::testdata::xorshift_bytes(lba, len))
}

/// Drives discovery, connect, Identify, in-capsule writes (up to the target's 8 KiB
/// in-capsule size), R2T-solicited writes, reads and a flush, all with both digests.
async fn exchange(addr: std::net::SocketAddr, nqn: &str) -> Result<(), String> {
    let entries = discover(addr, None, Duration::from_secs(10))
        .await
        .map_err(|e| format!("discovery: {e}"))?;
    if !entries.iter().any(|e| e.subnqn == nqn) {
        return Err(format!("{nqn} not in the discovery log"));
    }
    let mut hc = HostConfig::new(addr, nqn);
    hc.header_digest = true;
    hc.data_digest = true;
    hc.io_queues = 2;
    let ctrl = Controller::connect(hc)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let ns = ctrl.namespace(1).await.map_err(|e| e.to_string())?;
    let bs = usize::try_from(ns.block_size).unwrap();
    // (lba, bytes): 1 block and 8 KiB go in-capsule; 64 KiB and 128 KiB need R2T.
    let writes = [(0u64, bs), (16, 8192), (64, 64 << 10), (512, 128 << 10)];
    for (i, &(lba, len)) in writes.iter().enumerate() {
        ctrl.write(i % 2, 1, lba, block(lba, len), false)
            .await
            .map_err(|e| format!("write {len} B at {lba}: {e}"))?;
    }
    ctrl.flush(0, 1).await.map_err(|e| format!("flush: {e}"))?;
    for &(lba, len) in &writes {
        let blocks = u32::try_from(len / bs).unwrap();
        let got = ctrl
            .read(1, 1, lba, blocks)
            .await
            .map_err(|e| format!("read {len} B at {lba}: {e}"))?;
        if got != block(lba, len) {
            return Err(format!("read-back of {len} B at {lba} differs"));
        }
    }
    ctrl.shutdown().await.map_err(|e| format!("shutdown: {e}"))
}

#[test]
#[ignore = "needs root (dumpcap on lo) and tshark; run by scripts/test"]
fn tshark_decodes_our_host_and_target_with_digests() {
    let nqn = "nqn.2026-11.io.testbed:tshark";
    let dir = std::env::temp_dir().join(format!("tshark-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let target = rt.block_on(async {
        let backend = MemoryBackend::new(16 << 20, 512).unwrap();
        let subsystem = SubsystemConfig::new(nqn)
            .namespace(NamespaceConfig::new(Arc::new(backend)))
            .allow_any_host();
        let config = TargetConfig::new("127.0.0.1:0".parse().unwrap()).subsystem(subsystem);
        Target::start(config).await.unwrap()
    });
    let addr = target.local_addr();
    let capture =
        Capture::start(&dir.join("nvme-tcp.pcapng"), addr.port()).unwrap_or_else(|e| panic!("{e}"));
    let result = rt.block_on(exchange(addr, nqn));
    rt.block_on(target.shutdown());
    let pcap = capture.stop().unwrap_or_else(|e| panic!("{e}"));
    if let Err(e) = result {
        panic!("the exchange itself failed: {e}");
    }

    let d: Dissection = dissect(&pcap, addr.port()).unwrap_or_else(|e| panic!("{e}"));
    let summary = format!("{}\ncapture: {}", d.summary(), pcap.display());
    eprintln!("{summary}");
    assert!(d.malformed.is_empty(), "malformed packets\n{summary}");
    assert!(d.nvme_expert.is_empty(), "NVMe expert infos\n{summary}");
    assert!(
        d.unknown_data.is_empty(),
        "undecoded NVMe/TCP bytes\n{summary}"
    );
    let counts = d.counts();
    for t in counts.keys() {
        assert!(
            EXPECTED_TYPES.contains(t),
            "unexpected PDU type {t} ({})\n{summary}",
            pdu_type_name(*t)
        );
    }
    for t in EXPECTED_TYPES {
        assert!(
            counts.contains_key(&t),
            "no {} PDU in the capture\n{summary}",
            pdu_type_name(t)
        );
    }
    // Digests: tshark checked every one it saw; all must be good, and the digest
    // connections must have produced them on commands, responses and data PDUs.
    for p in &d.pdus {
        for (what, status) in [("header", p.hdgst_status), ("data", p.ddgst_status)] {
            if let Some(s) = status {
                assert_eq!(
                    s,
                    DIGEST_GOOD,
                    "frame {}: {} {what} digest status {s}\n{summary}",
                    p.frame,
                    pdu_type_name(p.pdu_type)
                );
            }
        }
    }
    for t in [4u8, 5, 6, 7, 9] {
        assert!(
            d.pdus
                .iter()
                .any(|p| p.pdu_type == t && p.hdgst_status == Some(DIGEST_GOOD)),
            "no {} with a verified header digest\n{summary}",
            pdu_type_name(t)
        );
    }
    for t in [4u8, 6, 7] {
        assert!(
            d.pdus
                .iter()
                .any(|p| p.pdu_type == t && p.ddgst_status == Some(DIGEST_GOOD)),
            "no {} with a verified data digest\n{summary}",
            pdu_type_name(t)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
