//! Replays `fuzz/regressions/target_connection/*` through the fuzz harness, plus
//! structured and pseudo-random inputs in every prologue mode, so the harness itself
//! is exercised by a plain `cargo test`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use nvmeof::nvme::{AdminCommand, IdentifyCns, IoCommand, Sgl};
use nvmeof::target::fuzzing::{target_connection, target_connection_replies};
use nvmeof::tcp::{CapsuleCmd, ConnectionParams, H2CData, Pdu, Role};
use std::path::Path;

fn params() -> ConnectionParams {
    ConnectionParams {
        maxh2cdata: 128 * 1024,
        max_rx_data: 1 << 20,
        ..ConnectionParams::initial(Role::Host)
    }
}

fn pdu(p: &Pdu) -> Vec<u8> {
    p.encode(&params()).unwrap().to_vec()
}

#[test]
fn target_fuzz_regressions_replay() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/target_connection");
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut files: Vec<_> = rd.map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            if f.file_name().unwrap().to_string_lossy().starts_with('.') {
                continue;
            }
            target_connection(&std::fs::read(&f).unwrap());
            n += 1;
        }
    }
    eprintln!("replayed {n} target_connection regression inputs");
}

#[test]
fn target_fuzz_harness_structured_and_random_inputs() {
    // Mode 3 (I/O queue of a live controller): a write through R2T with its data, a
    // read, then garbage.
    let mut w = IoCommand::Write {
        nsid: 1,
        slba: 0,
        nlb: 7,
        fua: false,
    }
    .to_sqe(1);
    w.dptr = Sgl::transport(4096);
    let mut input = vec![3u8];
    input.extend(pdu(&Pdu::CapsuleCmd(CapsuleCmd {
        sqe: w,
        data: Bytes::new(),
    })));
    input.extend(pdu(&Pdu::H2CData(H2CData {
        cccid: 1,
        ttag: 0,
        datao: 0,
        last: true,
        data: Bytes::from(vec![7u8; 4096]),
    })));
    let mut r = IoCommand::Read {
        nsid: 1,
        slba: 0,
        nlb: 7,
        fua: false,
    }
    .to_sqe(2);
    r.dptr = Sgl::transport(4096);
    input.extend(pdu(&Pdu::CapsuleCmd(CapsuleCmd {
        sqe: r,
        data: Bytes::new(),
    })));
    input.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    let out = target_connection_replies(&input);
    // The prologue worked: the read returned the written data (ICResp, R2T,
    // write completion, C2HData header, then the data).
    assert!(
        out.windows(4096).any(|w| w.iter().all(|&b| b == 7)),
        "read data not found"
    );

    // Mode 2 (admin queue, enabled): identify and an AER left outstanding.
    let mut input = vec![2u8];
    let mut id = AdminCommand::Identify {
        cns: IdentifyCns::CONTROLLER,
        nsid: 0,
        cntid: 0,
    }
    .to_sqe(3);
    id.dptr = Sgl::transport(4096);
    input.extend(pdu(&Pdu::CapsuleCmd(CapsuleCmd {
        sqe: id,
        data: Bytes::new(),
    })));
    input.extend(pdu(&Pdu::CapsuleCmd(CapsuleCmd {
        sqe: AdminCommand::AsyncEventRequest.to_sqe(4),
        data: Bytes::new(),
    })));
    target_connection(&input);

    // Pseudo-random bytes in every mode (xorshift, fixed seed).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..64u32 {
        let len = 1 + usize::try_from(i * 37 % 700).unwrap();
        let mut v = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(x.to_le_bytes()[0]);
        }
        v[0] = u8::try_from(i % 16).unwrap();
        // Half of them start with a plausible PDU type so headers get parsed.
        if i % 2 == 0 && v.len() > 8 {
            v[1] = 4;
            v[3] = 0;
            v[2] = 72;
        }
        target_connection(&v);
    }
}
