//! Bad input to the target: malformed PDUs, digest errors, unknown opcodes, LBAs out
//! of range, queue-depth overrun and bad transfer tags. Each case checks the exact
//! status or fatal error, and that another connection is served afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod target_support;

use bytes::Bytes;
use nvmeof::nvme::{AdminCommand, IoCommand, StatusCode, SubmissionEntry};
use nvmeof::tcp::{CapsuleCmd, ConnectionParams, FatalErrorStatus, H2CData, IcReq, Pdu, Role};
use target_support::*;
use tokio::io::AsyncWriteExt;

/// A fresh association still works: admin connect, I/O queue, write and read back.
async fn still_serving(addr: std::net::SocketAddr) {
    let (_a, mut q, _) = io_pair(addr).await;
    let data = vec![0x5a; 512];
    let sqe = IoCommand::Write {
        nsid: 1,
        slba: 9,
        nlb: 0,
        fua: false,
    }
    .to_sqe(0);
    assert!(q
        .exec(sqe, Some(Bytes::from(data.clone())), 0)
        .await
        .0
        .status
        .is_success());
    let sqe = IoCommand::Read {
        nsid: 1,
        slba: 9,
        nlb: 0,
        fua: false,
    }
    .to_sqe(0);
    let (c, r) = q.exec(sqe, None, 512).await;
    assert!(c.status.is_success());
    assert_eq!(r, data);
}

/// Raw bytes on a fresh TCP connection (after the ICReq exchange).
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Client {
    let mut c = Client::connect(addr).await;
    c.w.get_mut().write_all(bytes).await.unwrap();
    c
}

#[tokio::test]
async fn target_malformed_pdu_gets_termreq_and_others_carry_on() {
    let t = start_target().await;
    let addr = t.local_addr();
    // Keep one healthy association open throughout.
    let (_a0, mut q0, _) = io_pair(addr).await;

    // A CapsuleCmd header with the wrong HLEN.
    let mut bad = vec![0x04, 0x00, 0x10, 0x00];
    bad.extend_from_slice(&72u32.to_le_bytes());
    bad.resize(72, 0);
    let mut c = raw(addr, &bad).await;
    let term = c.expect_closed().await.expect("C2HTermReq");
    assert_eq!(term.fes, FatalErrorStatus::InvalidHeaderField);
    assert_eq!(term.fei, 2, "FEI points at HLEN");

    // An unknown PDU type.
    let mut c = raw(addr, &[0x7f, 0, 8, 0, 8, 0, 0, 0]).await;
    assert_eq!(
        c.expect_closed().await.unwrap().fes,
        FatalErrorStatus::InvalidHeaderField
    );

    // A controller-to-host PDU type sent by the host (CapsuleResp).
    let mut resp = vec![0x05, 0, 24, 0];
    resp.extend_from_slice(&24u32.to_le_bytes());
    resp.resize(24, 0);
    let mut c = raw(addr, &resp).await;
    assert_eq!(
        c.expect_closed().await.unwrap().fes,
        FatalErrorStatus::InvalidHeaderField
    );

    // A capsule whose PLEN claims more in-capsule data than any queue accepts.
    let mut huge = vec![0x04, 0, 72, 72];
    huge.extend_from_slice(&(72u32 + (4 << 20)).to_le_bytes());
    huge.resize(72, 0);
    let mut c = raw(addr, &huge).await;
    assert_eq!(
        c.expect_closed().await.unwrap().fes,
        FatalErrorStatus::DataLimitExceeded
    );

    // The first PDU is not an ICReq.
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = nvmeof::tcp::split(s).unwrap();
    let p = ConnectionParams::initial(Role::Host);
    let sqe = AdminCommand::KeepAlive.to_sqe(1);
    w.write_pdu(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe,
            data: Bytes::new(),
        }),
        &p,
    )
    .await
    .unwrap();
    let mut c = Client::from_parts(r, w, p);
    assert_eq!(
        c.expect_closed().await.unwrap().fes,
        FatalErrorStatus::SequenceError
    );

    // An ICReq with an unsupported PFV.
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = nvmeof::tcp::split(s).unwrap();
    let mut icreq = Pdu::IcReq(IcReq {
        pfv: 0,
        hpda: 0,
        hdgst: false,
        ddgst: false,
        maxr2t: 0,
    })
    .encode(&p)
    .unwrap()
    .to_vec();
    icreq[8] = 1;
    w.get_mut().write_all(&icreq).await.unwrap();
    let mut c = Client::from_parts(r, w, p);
    let term = c.expect_closed().await.unwrap();
    assert_eq!(term.fes, FatalErrorStatus::UnsupportedParameter);
    assert_eq!(term.fei, 8);

    // The healthy queue was never disturbed, and new associations work.
    let sqe = IoCommand::Flush { nsid: 1 }.to_sqe(0);
    assert!(q0.exec(sqe, None, 0).await.0.status.is_success());
    still_serving(addr).await;
    t.shutdown().await;
}

#[tokio::test]
async fn target_header_digest_error_terminates_data_digest_error_fails_command() {
    let t = start_target().await;
    let addr = t.local_addr();
    let mut a = Client::connect_digests(addr, true, true).await;
    let cntlid = a.admin_setup(SUBNQN, 0).await;
    let mut q = Client::connect_digests(addr, true, true).await;
    assert!(q
        .fabrics_connect(SUBNQN, HOSTNQN, 1, 31, cntlid, 0)
        .await
        .status
        .is_success());

    // Data digest error on an in-capsule write: the command fails with a transient
    // transport error and the connection stays up.
    let mut sqe = IoCommand::Write {
        nsid: 1,
        slba: 0,
        nlb: 0,
        fua: false,
    }
    .to_sqe(0);
    sqe.cid = 77;
    sqe.dptr = nvmeof::nvme::Sgl::in_capsule(512);
    let mut bytes = Pdu::CapsuleCmd(CapsuleCmd {
        sqe,
        data: Bytes::from(vec![1u8; 512]),
    })
    .encode(&q.p)
    .unwrap()
    .to_vec();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    q.w.get_mut().write_all(&bytes).await.unwrap();
    let (c, _) = q.wait(77).await;
    assert_eq!(sc(&c), StatusCode::TRANSIENT_TRANSPORT_ERROR);
    let sqe = IoCommand::Read {
        nsid: 1,
        slba: 0,
        nlb: 0,
        fua: false,
    }
    .to_sqe(0);
    let (c, r) = q.exec(sqe, None, 512).await;
    assert!(c.status.is_success());
    assert!(
        r.iter().all(|&b| b == 0),
        "the corrupted write was not applied"
    );

    // Data digest error in an H2CData PDU: same.
    let mut sqe = IoCommand::Write {
        nsid: 1,
        slba: 0,
        nlb: 7,
        fua: false,
    }
    .to_sqe(0);
    sqe.cid = 78;
    sqe.dptr = nvmeof::nvme::Sgl::transport(4096);
    q.send(Pdu::CapsuleCmd(CapsuleCmd {
        sqe,
        data: Bytes::new(),
    }))
    .await;
    let Pdu::R2T(r2t) = q.recv().await else {
        panic!("expected R2T")
    };
    let d = H2CData {
        cccid: 78,
        ttag: r2t.ttag,
        datao: 0,
        last: true,
        data: Bytes::from(vec![2u8; 4096]),
    };
    let mut bytes = Pdu::H2CData(d).encode(&q.p).unwrap().to_vec();
    let n = bytes.len();
    bytes[n - 2] ^= 0x01;
    q.w.get_mut().write_all(&bytes).await.unwrap();
    let (c, _) = q.wait(78).await;
    assert_eq!(sc(&c), StatusCode::TRANSIENT_TRANSPORT_ERROR);

    // Header digest error: fatal.
    let sqe = AdminCommand::KeepAlive.to_sqe(5);
    let mut bytes = Pdu::CapsuleCmd(CapsuleCmd {
        sqe,
        data: Bytes::new(),
    })
    .encode(&a.p)
    .unwrap()
    .to_vec();
    bytes[72] ^= 0x10; // inside the header digest (after the 72-byte header)
    a.w.get_mut().write_all(&bytes).await.unwrap();
    let term = a.expect_closed().await.expect("C2HTermReq");
    assert_eq!(term.fes, FatalErrorStatus::HeaderDigest);
    // The admin queue took the controller down, and with it the I/O queue.
    q.expect_closed().await;
    still_serving(addr).await;
    t.shutdown().await;
}

#[tokio::test]
async fn target_unknown_opcodes_and_bad_fields_get_statuses() {
    let t = start_target().await;
    let (mut a, mut q, _) = io_pair(t.local_addr()).await;
    let (c, _) = a.exec(SubmissionEntry::new(0x55, 0), None, 0).await;
    assert_eq!(sc(&c), StatusCode::INVALID_OPCODE);
    assert!(c.status.dnr);
    let (c, _) = q.exec(SubmissionEntry::new(0x7e, 0), None, 0).await;
    assert_eq!(sc(&c), StatusCode::INVALID_OPCODE);
    // Admin opcodes are not I/O opcodes.
    let (c, _) = q.exec(AdminCommand::KeepAlive.to_sqe(0), None, 0).await;
    assert_eq!(sc(&c), StatusCode::INVALID_OPCODE);
    // An unknown Fabrics command type.
    let mut sqe = SubmissionEntry::new(0x7f, 0);
    sqe.nsid = 0x33;
    let (c, _) = a.exec(sqe, None, 0).await;
    assert_eq!(sc(&c), StatusCode::INVALID_OPCODE);
    // Namespace 9 does not exist.
    let sqe = IoCommand::Read {
        nsid: 9,
        slba: 0,
        nlb: 0,
        fua: false,
    }
    .to_sqe(0);
    let (c, _) = q.exec(sqe, None, 512).await;
    assert_eq!(sc(&c), StatusCode::INVALID_NAMESPACE);
    // A keyed (RDMA) SGL is not a transport SGL.
    let mut sqe = IoCommand::Read {
        nsid: 1,
        slba: 0,
        nlb: 0,
        fua: false,
    }
    .to_sqe(0);
    sqe.cid = 200;
    sqe.dptr = nvmeof::nvme::Sgl {
        address: 0,
        length: 512,
        key: 1,
        sgl_type: nvmeof::nvme::SglType::KeyedDataBlock,
        subtype: 0,
    };
    q.send(Pdu::CapsuleCmd(CapsuleCmd {
        sqe,
        data: Bytes::new(),
    }))
    .await;
    let (c, _) = q.wait(200).await;
    assert_eq!(sc(&c), StatusCode::SGL_TYPE_INVALID);
    // More than MDTS in one command.
    let sqe = IoCommand::Read {
        nsid: 1,
        slba: 0,
        nlb: 511,
        fua: false,
    }
    .to_sqe(0);
    let (c, _) = q.exec(sqe, None, 256 * 1024).await;
    assert_eq!(sc(&c), StatusCode::DATA_SGL_LENGTH_INVALID);
    // The error log recorded failures, newest first.
    let sqe = AdminCommand::GetLogPage {
        nsid: 0xFFFF_FFFF,
        lid: nvmeof::nvme::LogPageId::ERROR,
        lsp: 0,
        rae: false,
        numd: 15,
        offset: 0,
    }
    .to_sqe(0);
    let (c, page) = a.exec(sqe, None, 64).await;
    assert!(c.status.is_success());
    let e = nvmeof::nvme::ErrorLogEntry::decode(&page).unwrap();
    assert!(e.error_count >= 3);
    still_serving(t.local_addr()).await;
    t.shutdown().await;
}

#[tokio::test]
async fn target_out_of_range_lba() {
    let t = start_target().await;
    let (_a, mut q, _) = io_pair(t.local_addr()).await;
    let blocks = NS_BYTES / 512;
    for sqe in [
        IoCommand::Read {
            nsid: 1,
            slba: blocks,
            nlb: 0,
            fua: false,
        }
        .to_sqe(0),
        IoCommand::Read {
            nsid: 1,
            slba: blocks - 1,
            nlb: 1,
            fua: false,
        }
        .to_sqe(0),
        IoCommand::Read {
            nsid: 1,
            slba: u64::MAX,
            nlb: 1,
            fua: false,
        }
        .to_sqe(0),
        IoCommand::WriteZeroes {
            nsid: 1,
            slba: blocks - 2,
            nlb: 5,
            deallocate: false,
            fua: false,
        }
        .to_sqe(0),
    ] {
        let (c, _) = q.exec(sqe, None, 1024).await;
        assert_eq!(sc(&c), StatusCode::LBA_OUT_OF_RANGE, "{sqe:?}");
        assert!(c.status.dnr);
    }
    let sqe = IoCommand::Write {
        nsid: 1,
        slba: blocks,
        nlb: 0,
        fua: false,
    }
    .to_sqe(0);
    let (c, _) = q.exec(sqe, Some(Bytes::from(vec![0u8; 512])), 0).await;
    assert_eq!(sc(&c), StatusCode::LBA_OUT_OF_RANGE);
    let ranges = nvmeof::nvme::io::DsmRange::encode_list(&[
        nvmeof::nvme::io::DsmRange {
            cattr: 0,
            nlb: 8,
            slba: 0,
        },
        nvmeof::nvme::io::DsmRange {
            cattr: 0,
            nlb: 8,
            slba: blocks - 4,
        },
    ]);
    let sqe = IoCommand::DatasetManagement {
        nsid: 1,
        nr: 1,
        idr: false,
        idw: false,
        deallocate: true,
    }
    .to_sqe(0);
    let (c, _) = q.exec(sqe, Some(Bytes::from(ranges)), 0).await;
    assert_eq!(sc(&c), StatusCode::LBA_OUT_OF_RANGE);
    // The last block itself is fine.
    let sqe = IoCommand::Read {
        nsid: 1,
        slba: blocks - 1,
        nlb: 0,
        fua: false,
    }
    .to_sqe(0);
    assert!(q.exec(sqe, None, 512).await.0.status.is_success());
    still_serving(t.local_addr()).await;
    t.shutdown().await;
}

#[tokio::test]
async fn target_queue_depth_overrun_terminates_connection() {
    let t = start_target().await;
    let addr = t.local_addr();
    let mut a = Client::connect(addr).await;
    let cntlid = a.admin_setup(SUBNQN, 0).await;
    let mut q = Client::connect(addr).await;
    // SQSIZE 3 (0's based): four commands may be outstanding.
    assert!(q
        .fabrics_connect(SUBNQN, HOSTNQN, 1, 3, cntlid, 0)
        .await
        .status
        .is_success());
    // Fill the queue with writes that wait for R2T data, then submit one more.
    for cid in 10..14u16 {
        let mut sqe = IoCommand::Write {
            nsid: 1,
            slba: 0,
            nlb: 7,
            fua: false,
        }
        .to_sqe(cid);
        sqe.dptr = nvmeof::nvme::Sgl::transport(4096);
        q.send(Pdu::CapsuleCmd(CapsuleCmd {
            sqe,
            data: Bytes::new(),
        }))
        .await;
    }
    for _ in 0..4 {
        assert!(matches!(q.recv().await, Pdu::R2T(_)));
    }
    let sqe = IoCommand::Flush { nsid: 1 }.to_sqe(14);
    q.send(Pdu::CapsuleCmd(CapsuleCmd {
        sqe,
        data: Bytes::new(),
    }))
    .await;
    let term = q.expect_closed().await.expect("C2HTermReq");
    assert_eq!(term.fes, FatalErrorStatus::SequenceError);
    // The admin queue of the same controller is fine, and so are new associations.
    assert!(a
        .exec(AdminCommand::KeepAlive.to_sqe(0), None, 0)
        .await
        .0
        .status
        .is_success());
    still_serving(addr).await;
    t.shutdown().await;
}

#[tokio::test]
async fn target_bad_h2c_data_terminates() {
    let t = start_target().await;
    let addr = t.local_addr();
    let (_a, mut q, _) = io_pair(addr).await;
    let mut sqe = IoCommand::Write {
        nsid: 1,
        slba: 0,
        nlb: 7,
        fua: false,
    }
    .to_sqe(0);
    sqe.cid = 5;
    sqe.dptr = nvmeof::nvme::Sgl::transport(4096);
    q.send(Pdu::CapsuleCmd(CapsuleCmd {
        sqe,
        data: Bytes::new(),
    }))
    .await;
    let Pdu::R2T(r2t) = q.recv().await else {
        panic!("expected R2T")
    };
    // H2CData must carry the transfer tag we chose, not just the command id.
    let d = H2CData {
        cccid: 5,
        ttag: r2t.ttag.wrapping_add(1),
        datao: 0,
        last: true,
        data: Bytes::from(vec![0u8; 4096]),
    };
    q.send(Pdu::H2CData(d)).await;
    let term = q.expect_closed().await.unwrap();
    assert_eq!(
        (term.fes, term.fei),
        (FatalErrorStatus::InvalidHeaderField, 10)
    );

    // Data beyond the R2T range.
    let (_a, mut q, _) = io_pair(addr).await;
    let mut sqe = IoCommand::Write {
        nsid: 1,
        slba: 0,
        nlb: 7,
        fua: false,
    }
    .to_sqe(0);
    sqe.cid = 6;
    sqe.dptr = nvmeof::nvme::Sgl::transport(4096);
    q.send(Pdu::CapsuleCmd(CapsuleCmd {
        sqe,
        data: Bytes::new(),
    }))
    .await;
    let Pdu::R2T(r2t) = q.recv().await else {
        panic!("expected R2T")
    };
    let d = H2CData {
        cccid: 6,
        ttag: r2t.ttag,
        datao: 2048,
        last: true,
        data: Bytes::from(vec![0u8; 4096]),
    };
    q.send(Pdu::H2CData(d)).await;
    assert_eq!(
        q.expect_closed().await.unwrap().fes,
        FatalErrorStatus::DataOutOfRange
    );
    still_serving(addr).await;
    t.shutdown().await;
}

#[tokio::test]
async fn target_connect_errors() {
    let t = start_target().await;
    let addr = t.local_addr();
    let mut a = Client::connect(addr).await;
    // Anything before Connect is a sequence error.
    let (c, _) = a.exec(AdminCommand::KeepAlive.to_sqe(0), None, 0).await;
    assert_eq!(sc(&c), StatusCode::COMMAND_SEQUENCE_ERROR);
    // SQSIZE beyond CAP.MQES.
    let c = a.fabrics_connect(SUBNQN, HOSTNQN, 0, 500, 0xFFFF, 0).await;
    assert_eq!(sc(&c), StatusCode::CONNECT_INVALID_PARAMETERS);
    assert_eq!(c.dw0, 44);
    // An I/O queue for a controller that does not exist.
    let c = a.fabrics_connect(SUBNQN, HOSTNQN, 1, 31, 0x1234, 0).await;
    assert_eq!(sc(&c), StatusCode::CONNECT_INVALID_PARAMETERS);
    // An I/O queue on the discovery subsystem.
    let c = a
        .fabrics_connect(nvmeof::nvme::DISCOVERY_NQN, HOSTNQN, 1, 31, 1, 0)
        .await;
    assert!(!c.status.is_success());
    // The connection is still usable for a proper Connect.
    let cntlid = a.admin_setup(SUBNQN, 0).await;
    // Connect twice on one queue.
    let c = a.fabrics_connect(SUBNQN, HOSTNQN, 0, 31, 0xFFFF, 0).await;
    assert_eq!(sc(&c), StatusCode::COMMAND_SEQUENCE_ERROR);
    // An I/O queue id above the granted count.
    let mut q = Client::connect(addr).await;
    let c = q.fabrics_connect(SUBNQN, HOSTNQN, 100, 31, cntlid, 0).await;
    assert_eq!(sc(&c), StatusCode::CONNECT_INVALID_PARAMETERS);
    // Another host cannot join this host's controller.
    let c = q
        .fabrics_connect(SUBNQN, OTHER_HOST, 1, 31, cntlid, 0)
        .await;
    assert_eq!(sc(&c), StatusCode::CONNECT_INVALID_HOST);
    still_serving(addr).await;
    t.shutdown().await;
}
