//! Replays every input kept under `fuzz/regressions/<target>/` through the same
//! function the cargo-fuzz target calls, so a fixed crash stays fixed.

// Helpers outside #[test] functions may unwrap too: a panic is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

fn regressions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions")
}

/// The fuzz targets whose inputs this crate can replay.
fn harness(target: &str) -> Option<fn(&[u8])> {
    match target {
        "pdu_decode" => Some(nvmeof::fuzzing::pdu_decode),
        _ => None,
    }
}

#[test]
fn replay_all_regressions() {
    let dir = regressions_dir();
    let mut replayed = 0;
    let mut unknown = Vec::new();
    for target in std::fs::read_dir(&dir).expect("fuzz/regressions exists") {
        let target = target.unwrap();
        if !target.file_type().unwrap().is_dir() {
            continue;
        }
        let name = target.file_name().to_string_lossy().into_owned();
        let Some(run) = harness(&name) else {
            unknown.push(name);
            continue;
        };
        let mut files: Vec<_> = std::fs::read_dir(target.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let r = std::panic::catch_unwind(|| run(&data));
            assert!(r.is_ok(), "regression input {} panics", f.display());
            replayed += 1;
        }
    }
    // Folders of targets replayed elsewhere (e.g. the target helper's harness
    // in its own test) are listed so that none goes unnoticed.
    eprintln!("replayed {replayed} inputs; folders without a harness here: {unknown:?}");
}

#[test]
fn pdu_decode_harness_accepts_valid_streams() {
    use bytes::Bytes;
    use nvmeof::nvme::{Sgl, SubmissionEntry};
    use nvmeof::tcp::{CapsuleCmd, ConnectionParams, H2CData, IcReq, Pdu, Role};
    // First byte: role = controller (bit 0 clear), digests on (bits 1, 2), big limit (bit 5).
    let sender = ConnectionParams {
        hdgst: true,
        ddgst: true,
        ..ConnectionParams::initial(Role::Host)
    };
    let mut sqe = SubmissionEntry::new(0x01, 9);
    sqe.dptr = Sgl::in_capsule(1024);
    let pdus = [
        Pdu::CapsuleCmd(CapsuleCmd {
            sqe,
            data: Bytes::from(vec![3u8; 1024]),
        }),
        Pdu::H2CData(H2CData {
            cccid: 9,
            ttag: 1,
            datao: 0,
            last: true,
            data: Bytes::from_static(b"x"),
        }),
    ];
    let mut input = vec![0b10_0110u8, 0];
    for p in &pdus {
        input.extend(p.encode(&sender).unwrap().to_vec());
    }
    nvmeof::fuzzing::pdu_decode(&input);
    // ICReq never carries digests.
    let mut input = vec![0u8, 0];
    let icreq = Pdu::IcReq(IcReq {
        pfv: 0,
        hpda: 0,
        hdgst: true,
        ddgst: true,
        maxr2t: 0,
    });
    input.extend(
        icreq
            .encode(&ConnectionParams::initial(Role::Host))
            .unwrap()
            .to_vec(),
    );
    nvmeof::fuzzing::pdu_decode(&input);
}
