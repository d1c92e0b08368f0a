//! Entry points shared by the cargo-fuzz targets (`fuzz/fuzz_targets/`) and
//! the regression replay test (`tests/fuzz_regressions.rs`), so that a crash
//! input found by the fuzzer is replayed through exactly the code that found
//! it. Each function panics only when it finds a real defect (a panic in a
//! decoder, or a decoded PDU that does not survive re-encoding).

use bytes::Bytes;

use crate::nvme::{
    identify, AdminCommand, ConnectData, DiscoveryLogEntry, DsmRange, FabricsCommand,
    IdentifyController, IdentifyNamespace, IoCommand, NsIdDescriptor, SmartLog, SubmissionEntry,
    SQE_SIZE,
};
use crate::tcp::{decode_pdu, ConnectionParams, Pdu, PduError, Role};

/// The receiving end's parameters the `pdu_decode` harness derives from its
/// first two input bytes: bit 0 of `a` = host (else controller), bit 1 header
/// digest, bit 2 data digest, bit 3 CPDA from `b`, bit 4 HPDA from `b`, bit 5
/// a 1 MiB data limit (else 8 KiB).
pub fn pdu_params(a: u8, b: u8) -> ConnectionParams {
    ConnectionParams {
        role: if a & 1 == 0 {
            Role::Controller
        } else {
            Role::Host
        },
        hdgst: a & 2 != 0,
        ddgst: a & 4 != 0,
        cpda: if a & 8 != 0 { b & 31 } else { 0 },
        hpda: if a & 16 != 0 { (b >> 3) & 31 } else { 0 },
        maxh2cdata: 4096,
        max_rx_data: if a & 32 != 0 { 1 << 20 } else { 8192 },
    }
}

/// Decodes a stream of PDUs under parameters picked by the first two bytes,
/// checks that each decoded PDU re-encodes to bytes that decode to the same
/// PDU, and feeds every payload to the NVMe structure decoders.
pub fn pdu_decode(data: &[u8]) {
    let [a, b, rest @ ..] = data else { return };
    let p = pdu_params(*a, *b);
    let sender = ConnectionParams {
        role: match p.role {
            Role::Host => Role::Controller,
            Role::Controller => Role::Host,
        },
        ..p
    };
    let mut buf = Bytes::copy_from_slice(rest);
    while !buf.is_empty() {
        match decode_pdu(&buf, &p) {
            Ok((pdu, used)) => {
                assert!(used > 0 && used <= buf.len());
                let again = pdu.encode(&sender).expect("a decoded PDU re-encodes");
                let again = Bytes::from(again.to_vec());
                let (pdu2, used2) = decode_pdu(&again, &p).expect("re-encoded PDU decodes");
                assert_eq!(pdu, pdu2);
                assert_eq!(used2, again.len());
                payloads(&pdu);
                buf = buf.slice(used..);
            }
            Err(e) => {
                // Every fatal error must name a status; non-fatal ones are
                // incomplete input or a data digest mismatch only.
                match e.fatal() {
                    None => assert!(matches!(
                        e,
                        PduError::Incomplete { .. } | PduError::DataDigest { .. }
                    )),
                    Some(f) => assert!(f.fes.to_u16() != 0),
                }
                let _ = e.to_string();
                break;
            }
        }
    }
    // Whatever the stream was, the structure decoders must cope with it raw.
    nvme_structures(rest);
}

fn payloads(pdu: &Pdu) {
    match pdu {
        Pdu::CapsuleCmd(c) => {
            let _ = AdminCommand::parse(&c.sqe);
            let _ = FabricsCommand::parse(&c.sqe);
            let _ = IoCommand::parse(&c.sqe);
            nvme_structures(&c.data);
        }
        Pdu::C2HData(d) => nvme_structures(&d.data),
        Pdu::H2CData(d) => nvme_structures(&d.data),
        _ => {}
    }
}

fn nvme_structures(b: &[u8]) {
    if let Ok(d) = ConnectData::decode(b) {
        let again = ConnectData::decode(&d.encode()).expect("encoded connect data decodes");
        // Text fields are normalised on decode; a second pass is stable.
        assert_eq!(ConnectData::decode(&again.encode()).ok(), Some(again));
    }
    if b.len() >= SQE_SIZE {
        let e = SubmissionEntry::from_slice(&b[..SQE_SIZE]).expect("64 bytes");
        assert_eq!(SubmissionEntry::decode(&e.encode()), e);
        if let Ok(c) = AdminCommand::parse(&e) {
            assert_eq!(AdminCommand::parse(&c.to_sqe(e.cid)), Ok(c));
        }
        if let Ok(c) = FabricsCommand::parse(&e) {
            assert_eq!(FabricsCommand::parse(&c.to_sqe(e.cid)), Ok(c));
        }
        if let Ok(c) = IoCommand::parse(&e) {
            assert_eq!(IoCommand::parse(&c.to_sqe(e.cid)), Ok(c));
        }
    }
    let _ = IdentifyController::decode(b);
    let _ = IdentifyNamespace::decode(b);
    let _ = identify::decode_active_ns_list(b);
    let _ = NsIdDescriptor::decode_list(b);
    let _ = SmartLog::decode(b);
    let _ = DiscoveryLogEntry::decode_page(b);
    for n in [1usize, 2, 256] {
        let _ = DsmRange::decode_list(b, n);
    }
}

/// Feeds arbitrary bytes, as the controller's side of an I/O queue, to the
/// host's queue task after a valid ICResp and Connect response, while three
/// commands (a two-PDU read, an R2T write and a no-data command) are
/// outstanding. Every command must complete (with data or an error) within its
/// timeout; nothing may panic.
pub fn host_queue(data: &[u8]) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(crate::host::fuzz_support::run_queue_against(
        Bytes::copy_from_slice(data),
    ));
}
