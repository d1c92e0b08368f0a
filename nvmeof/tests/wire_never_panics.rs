//! Property tests: decoding arbitrary or corrupted bytes returns an error or a
//! PDU, never panics, and the stream reader never hangs or over-allocates.

// Helpers outside #[test] functions may unwrap too: a panic is a failed test.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use nvmeof::nvme::{Sgl, SubmissionEntry};
use nvmeof::tcp::*;
use proptest::prelude::*;

fn params(role: Role, b: u8) -> ConnectionParams {
    ConnectionParams {
        role,
        hdgst: b & 1 != 0,
        ddgst: b & 2 != 0,
        cpda: (b >> 2) & 3,
        hpda: (b >> 4) & 3,
        maxh2cdata: 4096,
        max_rx_data: 8192,
    }
}

fn valid_h2c(cid: u16, n: usize) -> Pdu {
    let mut sqe = SubmissionEntry::new(0x01, cid);
    sqe.dptr = Sgl::in_capsule(u32::try_from(n).unwrap());
    Pdu::CapsuleCmd(CapsuleCmd {
        sqe,
        data: Bytes::from(vec![0x5A; n]),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), pb in any::<u8>(), host in any::<bool>()) {
        let role = if host { Role::Host } else { Role::Controller };
        let _ = decode_pdu_slice(&bytes, &params(role, pb));
    }

    #[test]
    fn random_headers_with_plausible_type_never_panic(
        t in prop_oneof![0u8..8, Just(9u8)], fl in any::<u8>(), hlen in any::<u8>(), pdo in any::<u8>(),
        plen in 0u32..600, rest in proptest::collection::vec(any::<u8>(), 0..600), pb in any::<u8>(), host in any::<bool>(),
    ) {
        let mut b = vec![t, fl, hlen, pdo];
        b.extend_from_slice(&plen.to_le_bytes());
        b.extend_from_slice(&rest);
        let role = if host { Role::Host } else { Role::Controller };
        if let Ok((_, used)) = decode_pdu_slice(&b, &params(role, pb)) {
            prop_assert!(used <= b.len());
        }
    }

    #[test]
    fn corrupted_valid_pdus_never_panic(
        n in 0usize..200, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6), pb in any::<u8>(),
    ) {
        let tx = ConnectionParams { role: Role::Host, ..params(Role::Controller, pb) };
        let rx = params(Role::Controller, pb);
        let mut b = valid_h2c(7, n).encode(&tx).unwrap().to_vec();
        prop_assert_eq!(decode_pdu_slice(&b, &rx).unwrap().0, valid_h2c(7, n));
        for (i, x) in flips {
            let len = b.len();
            b[i % len] ^= x | 1;
        }
        match decode_pdu_slice(&b, &rx) {
            Ok((_, used)) => prop_assert!(used <= b.len()),
            Err(e) => { let _ = (e.to_string(), e.fatal()); }
        }
    }

    #[test]
    fn fuzz_harness_on_random_input(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        nvmeof::fuzzing::pdu_decode(&bytes);
    }

    #[test]
    fn stream_reader_terminates_on_random_input(bytes in proptest::collection::vec(any::<u8>(), 0..2000), pb in any::<u8>()) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let p = params(Role::Controller, pb);
            let mut r = PduReader::new(&bytes[..]);
            let mut count = 0;
            loop {
                match r.read_pdu(&p).await {
                    Ok(_) => count += 1,
                    Err(_) => break,
                }
                assert!(count <= bytes.len(), "each PDU consumes at least one byte");
            }
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, ..ProptestConfig::default() })]

    #[test]
    fn host_queue_harness_on_random_input(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        nvmeof::fuzzing::host_queue(&bytes);
    }
}
