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
        "host_queue" => Some(nvmeof::fuzzing::host_queue),
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

#[test]
fn host_queue_harness_accepts_a_well_behaved_controller() {
    use bytes::Bytes;
    use nvmeof::nvme::{Completion, Status};
    use nvmeof::tcp::{C2HData, CapsuleResp, ConnectionParams, Pdu, Role, R2T};
    // Command ids: the read gets 0, the write 1, the keep-alive 2.
    let p = ConnectionParams::initial(Role::Controller);
    let resp = |cid| {
        Pdu::CapsuleResp(CapsuleResp {
            cqe: Completion::new(cid, Status::SUCCESS),
        })
    };
    let pdus = [
        Pdu::C2HData(C2HData {
            cccid: 0,
            datao: 0,
            last: false,
            success: false,
            data: Bytes::from(vec![1u8; 4096]),
        }),
        Pdu::C2HData(C2HData {
            cccid: 0,
            datao: 4096,
            last: true,
            success: true,
            data: Bytes::from(vec![2u8; 4096]),
        }),
        Pdu::R2T(R2T {
            cccid: 1,
            ttag: 5,
            r2to: 0,
            r2tl: 10_000,
        }),
        resp(1),
        resp(2),
    ];
    let mut script = Vec::new();
    for pdu in &pdus {
        script.extend(pdu.encode(&p).unwrap().to_vec());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let run = |s: &[u8]| {
        rt.block_on(nvmeof::host::fuzz_support::run_queue_against(
            Bytes::copy_from_slice(s),
        ))
    };
    let out = run(&script).expect("queue started");
    let read = out[0].as_ref().unwrap();
    assert!(read.cqe.status.is_success());
    assert_eq!(&read.data[..4096], &[1u8; 4096][..]);
    assert_eq!(&read.data[4096..], &[2u8; 4096][..]);
    assert!(out[1].as_ref().unwrap().cqe.status.is_success());
    assert!(out[2].as_ref().unwrap().cqe.status.is_success());
    // Half the script: the read's data is cut short, everything ends in a
    // timeout or path error instead of hanging.
    let out = run(&script[..script.len() / 2]).expect("queue started");
    assert!(out.iter().all(Result::is_err));
    // And the same through the fuzz entry point.
    nvmeof::fuzzing::host_queue(&script);
}

/// The seed corpus (`fuzz/seeds/pdu_decode/`) was written by an independent
/// encoder (a few lines of Python with its own CRC32C); every seed must decode
/// completely, which cross-checks this crate's layouts and digests against it.
#[test]
fn independent_seed_pdus_decode() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/pdu_decode");
    let mut n = 0;
    for f in std::fs::read_dir(dir).unwrap() {
        let f = f.unwrap().path();
        let data = std::fs::read(&f).unwrap();
        let p = nvmeof::fuzzing::pdu_params(data[0], data[1]);
        let (pdu, used) = nvmeof::tcp::decode_pdu_slice(&data[2..], &p)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert_eq!(used, data.len() - 2, "{}", f.display());
        // Our encoder produces the same bytes.
        let sender = nvmeof::tcp::ConnectionParams {
            role: match p.role {
                nvmeof::tcp::Role::Host => nvmeof::tcp::Role::Controller,
                nvmeof::tcp::Role::Controller => nvmeof::tcp::Role::Host,
            },
            ..p
        };
        assert_eq!(
            pdu.encode(&sender).unwrap().to_vec(),
            &data[2..],
            "{}",
            f.display()
        );
        n += 1;
    }
    assert!(n >= 20, "seed corpus present ({n} files)");
}
