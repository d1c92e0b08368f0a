//! Byte-level checks of every PDU layout and every rejection path.

use bytes::Bytes;

use super::*;
use crate::nvme::{Completion, Sgl, Status, StatusCode, SubmissionEntry};

fn host() -> ConnectionParams {
    ConnectionParams {
        max_rx_data: 1 << 20,
        ..ConnectionParams::initial(Role::Host)
    }
}
fn ctrl() -> ConnectionParams {
    ConnectionParams {
        max_rx_data: 1 << 20,
        ..ConnectionParams::initial(Role::Controller)
    }
}
fn digests(mut p: ConnectionParams) -> ConnectionParams {
    p.hdgst = true;
    p.ddgst = true;
    p
}

fn enc(pdu: &Pdu, p: &ConnectionParams) -> Vec<u8> {
    pdu.encode(p).unwrap().to_vec()
}

fn cmd_with_data(n: usize) -> Pdu {
    let mut sqe = SubmissionEntry::new(0x01, 0x1234);
    sqe.nsid = 1;
    sqe.dptr = Sgl::in_capsule(u32::try_from(n).unwrap());
    Pdu::CapsuleCmd(CapsuleCmd {
        sqe,
        data: Bytes::from(vec![0xA5; n]),
    })
}

#[test]
fn crc32c_check_value() {
    assert_eq!(digest(b"123456789"), 0xE306_9283);
}

#[test]
fn icreq_icresp_layout() {
    let r = Pdu::IcReq(IcReq {
        pfv: 0,
        hpda: 3,
        hdgst: true,
        ddgst: false,
        maxr2t: 0,
    });
    let b = enc(&r, &host());
    assert_eq!(b.len(), 128);
    assert_eq!(&b[..8], &[0x00, 0x00, 128, 0, 128, 0, 0, 0]);
    assert_eq!(&b[8..16], &[0, 0, 3, 1, 0, 0, 0, 0]);
    assert!(b[16..].iter().all(|&x| x == 0));
    assert_eq!(decode_pdu_slice(&b, &ctrl()).unwrap(), (r, 128));
    let r = Pdu::IcResp(IcResp {
        pfv: 0,
        cpda: 0,
        hdgst: false,
        ddgst: true,
        maxh2cdata: 131_072,
    });
    let b = enc(&r, &ctrl());
    assert_eq!(&b[..12], &[0x01, 0, 128, 0, 128, 0, 0, 0, 0, 0, 0, 2]);
    assert_eq!(&b[12..16], &131_072u32.to_le_bytes());
    assert_eq!(decode_pdu_slice(&b, &host()).unwrap().0, r);
    // Digests never apply to ICReq/ICResp, even with digest params.
    assert_eq!(enc(&r, &digests(ctrl())), b);
}

#[test]
fn capsule_cmd_layout_without_and_with_digests() {
    let pdu = cmd_with_data(8);
    let b = enc(&pdu, &host());
    assert_eq!(&b[..8], &[0x04, 0x00, 72, 72, 80, 0, 0, 0]);
    assert_eq!(b[8], 0x01);
    assert_eq!(&b[72..], &[0xA5; 8]);
    assert_eq!(decode_pdu_slice(&b, &ctrl()).unwrap().0, pdu);

    let p = digests(host());
    let b = enc(&pdu, &p);
    // HLEN 72 + HDGST 4 = PDO 76, + 8 data + 4 DDGST = 88.
    assert_eq!(&b[..8], &[0x04, 0x03, 72, 76, 88, 0, 0, 0]);
    assert_eq!(&b[72..76], &digest(&b[..72]).to_le_bytes());
    assert_eq!(&b[84..88], &digest(&[0xA5; 8]).to_le_bytes());
    assert_eq!(decode_pdu_slice(&b, &digests(ctrl())).unwrap().0, pdu);

    // No data: PDO 0, no DDGSTF.
    let pdu = Pdu::CapsuleCmd(CapsuleCmd {
        sqe: SubmissionEntry::new(0x18, 1),
        data: Bytes::new(),
    });
    let b = enc(&pdu, &p);
    assert_eq!(&b[..8], &[0x04, 0x01, 72, 0, 76, 0, 0, 0]);
    assert_eq!(decode_pdu_slice(&b, &digests(ctrl())).unwrap().0, pdu);
}

#[test]
fn cpda_padding() {
    // CPDA 7: data aligned to 32 bytes -> PDO 96 after a 72-byte header.
    let mut p = host();
    p.cpda = 7;
    let b = enc(&cmd_with_data(4), &p);
    assert_eq!(b[3], 96);
    assert_eq!(b.len(), 100);
    assert!(b[72..96].iter().all(|&x| x == 0));
    let mut c = ctrl();
    c.cpda = 7;
    assert_eq!(decode_pdu_slice(&b, &c).unwrap().0, cmd_with_data(4));
    // The controller insists on its alignment.
    let unpadded = enc(&cmd_with_data(4), &host());
    let err = decode_pdu_slice(&unpadded, &c).unwrap_err();
    assert_eq!(
        err.fatal(),
        Some(FatalError {
            fes: FatalErrorStatus::InvalidHeaderField,
            fei: 3
        })
    );
}

#[test]
fn capsule_resp_r2t_data_layouts() {
    let cqe = Completion::new(7, Status::new(StatusCode::LBA_OUT_OF_RANGE).dnr());
    let pdu = Pdu::CapsuleResp(CapsuleResp { cqe });
    let b = enc(&pdu, &ctrl());
    assert_eq!(&b[..8], &[0x05, 0, 24, 0, 24, 0, 0, 0]);
    assert_eq!(&b[8..24], &cqe.encode());
    assert_eq!(decode_pdu_slice(&b, &host()).unwrap().0, pdu);

    let pdu = Pdu::R2T(R2T {
        cccid: 5,
        ttag: 9,
        r2to: 4096,
        r2tl: 8192,
    });
    let b = enc(&pdu, &digests(ctrl()));
    assert_eq!(&b[..8], &[0x09, 0x01, 24, 0, 28, 0, 0, 0]);
    assert_eq!(
        &b[8..24],
        &[5, 0, 9, 0, 0, 0x10, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(decode_pdu_slice(&b, &digests(host())).unwrap().0, pdu);

    let pdu = Pdu::H2CData(H2CData {
        cccid: 5,
        ttag: 9,
        datao: 4096,
        last: true,
        data: Bytes::from_static(&[1, 2, 3, 4]),
    });
    let b = enc(&pdu, &host());
    assert_eq!(&b[..8], &[0x06, 0x04, 24, 24, 28, 0, 0, 0]);
    assert_eq!(
        &b[8..24],
        &[5, 0, 9, 0, 0, 0x10, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(decode_pdu_slice(&b, &ctrl()).unwrap().0, pdu);

    let pdu = Pdu::C2HData(C2HData {
        cccid: 3,
        datao: 0,
        last: true,
        success: true,
        data: Bytes::from_static(&[9; 16]),
    });
    let b = enc(&pdu, &digests(ctrl()));
    assert_eq!(&b[..8], &[0x07, 0x0F, 24, 28, 48, 0, 0, 0]);
    assert_eq!(decode_pdu_slice(&b, &digests(host())).unwrap().0, pdu);
}

#[test]
fn term_req_layout_and_truncation() {
    let pdu = Pdu::C2HTermReq(TermReq {
        fes: FatalErrorStatus::InvalidHeaderField,
        fei: 3,
        data: Bytes::from(vec![0x77; 200]),
    });
    let b = enc(&pdu, &digests(ctrl()));
    assert_eq!(b.len(), 152, "header of the bad PDU cut to 128 bytes");
    assert_eq!(&b[..12], &[0x03, 0, 24, 24, 152, 0, 0, 0, 1, 0, 3, 0]);
    let Pdu::C2HTermReq(t) = decode_pdu_slice(&b, &digests(host())).unwrap().0 else {
        panic!()
    };
    assert_eq!(
        (t.fes, t.fei, t.data.len()),
        (FatalErrorStatus::InvalidHeaderField, 3, 128)
    );
    let h2c = Pdu::H2CTermReq(TermReq {
        fes: FatalErrorStatus::Other(0x55),
        fei: 0,
        data: Bytes::new(),
    });
    let b = enc(&h2c, &host());
    assert_eq!(b.len(), 24);
    assert_eq!(decode_pdu_slice(&b, &ctrl()).unwrap().0, h2c);
}

fn fatal(b: &[u8], p: &ConnectionParams) -> (FatalErrorStatus, u32) {
    let e = decode_pdu_slice(b, p).unwrap_err();
    let f = e.fatal().unwrap_or_else(|| panic!("{e} should be fatal"));
    (f.fes, f.fei)
}

#[test]
fn rejections_carry_fes_and_offset() {
    use FatalErrorStatus::*;
    let c = ctrl();
    let good = enc(&cmd_with_data(8), &host());

    let mut b = good.clone();
    b[0] = 0x08;
    assert_eq!(
        decode_pdu_slice(&b, &c).unwrap_err(),
        PduError::UnknownType(8)
    );
    assert_eq!(fatal(&b, &c), (InvalidHeaderField, 0));

    // A C2H type arriving at the controller.
    let resp = enc(
        &Pdu::CapsuleResp(CapsuleResp {
            cqe: Completion::new(1, Status::SUCCESS),
        }),
        &c,
    );
    assert_eq!(
        decode_pdu_slice(&resp, &c).unwrap_err(),
        PduError::WrongDirection(PduType::CapsuleResp)
    );

    let mut b = good.clone();
    b[2] = 71;
    assert_eq!(fatal(&b, &c), (InvalidHeaderField, 2));

    // HDGSTF without negotiated header digest.
    let mut b = good.clone();
    b[1] |= flags::HDGSTF;
    assert_eq!(fatal(&b, &c), (InvalidHeaderField, 1));
    // Missing HDGSTF with it negotiated.
    assert_eq!(fatal(&good, &digests(c)), (InvalidHeaderField, 1));

    // PDO inside the header.
    let mut b = good.clone();
    b[3] = 68;
    assert_eq!(fatal(&b, &c), (InvalidHeaderField, 3));
    // PDO past the end.
    let mut b = good.clone();
    b[3] = 80;
    assert_eq!(fatal(&b, &c), (InvalidHeaderField, 4));

    // PLEN shorter than the header.
    let mut b = good.clone();
    b[4] = 60;
    assert_eq!(fatal(&b, &c), (InvalidHeaderField, 4));

    // Data beyond this end's limit: checked before anything is read.
    let small = ConnectionParams {
        max_rx_data: 4,
        ..c
    };
    assert_eq!(fatal(&good, &small), (DataLimitExceeded, 0));

    // Header digest mismatch.
    let p = digests(host());
    let mut b = enc(&cmd_with_data(8), &p);
    b[72] ^= 1;
    assert_eq!(fatal(&b, &digests(c)), (HeaderDigest, 0));

    // Data digest mismatch is not fatal and names the command.
    let mut b = enc(&cmd_with_data(8), &p);
    let n = b.len();
    b[n - 1] ^= 1;
    let e = decode_pdu_slice(&b, &digests(c)).unwrap_err();
    assert!(
        matches!(e, PduError::DataDigest { cccid: 0x1234, .. }),
        "{e}"
    );
    assert_eq!(e.fatal(), None);
}

#[test]
fn rejections_of_specific_fields() {
    use FatalErrorStatus::*;
    let (h, c) = (host(), ctrl());
    let icreq = enc(
        &Pdu::IcReq(IcReq {
            pfv: 0,
            hpda: 0,
            hdgst: false,
            ddgst: false,
            maxr2t: 0,
        }),
        &h,
    );
    let mut b = icreq.clone();
    b[8] = 1;
    assert_eq!(fatal(&b, &c), (UnsupportedParameter, 8));
    let mut b = icreq.clone();
    b[10] = 32;
    assert_eq!(fatal(&b, &c), (InvalidHeaderField, 10));
    let mut b = icreq.clone();
    b[11] = 4;
    assert_eq!(fatal(&b, &c), (InvalidHeaderField, 11));
    let mut b = icreq.clone();
    b[4] = 129;
    assert_eq!(fatal(&b, &c), (InvalidHeaderField, 4));

    let icresp = enc(
        &Pdu::IcResp(IcResp {
            pfv: 0,
            cpda: 0,
            hdgst: false,
            ddgst: false,
            maxh2cdata: 4096,
        }),
        &c,
    );
    let mut b = icresp.clone();
    b[12..16].copy_from_slice(&4092u32.to_le_bytes());
    assert_eq!(fatal(&b, &h), (InvalidHeaderField, 12));
    let mut b = icresp;
    b[12..16].copy_from_slice(&4098u32.to_le_bytes());
    assert_eq!(fatal(&b, &h), (InvalidHeaderField, 12));

    let data = enc(
        &Pdu::H2CData(H2CData {
            cccid: 1,
            ttag: 1,
            datao: 0,
            last: false,
            data: Bytes::from_static(&[0; 8]),
        }),
        &h,
    );
    let mut b = data.clone();
    b[16] = 9;
    assert_eq!(fatal(&b, &c), (InvalidHeaderField, 16));
    let mut b = data.clone();
    b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(fatal(&b, &c), (InvalidHeaderField, 12));
    // A data PDU without data.
    let mut b = data[..24].to_vec();
    b[3] = 0;
    b[4] = 24;
    b[16] = 0;
    assert_eq!(fatal(&b, &c), (InvalidHeaderField, 4));

    let c2h = enc(
        &Pdu::C2HData(C2HData {
            cccid: 1,
            datao: 0,
            last: true,
            success: false,
            data: Bytes::from_static(&[0; 4]),
        }),
        &c,
    );
    let mut b = c2h;
    b[1] = flags::SUCCESS;
    assert_eq!(fatal(&b, &h), (InvalidHeaderField, 1));

    let r2t = enc(
        &Pdu::R2T(R2T {
            cccid: 1,
            ttag: 2,
            r2to: 0,
            r2tl: 1,
        }),
        &c,
    );
    let mut b = r2t.clone();
    b[16] = 0;
    assert_eq!(fatal(&b, &h), (InvalidHeaderField, 16));
    let mut b = r2t;
    b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(fatal(&b, &h), (InvalidHeaderField, 12));

    let mut term = enc(
        &Pdu::H2CTermReq(TermReq {
            fes: FatalErrorStatus::SequenceError,
            fei: 0,
            data: Bytes::new(),
        }),
        &h,
    );
    term[4] = 153;
    assert_eq!(fatal(&term, &c), (InvalidHeaderField, 4));
}

#[test]
fn incomplete_input() {
    let b = enc(&cmd_with_data(8), &host());
    for n in 0..b.len() {
        match decode_pdu_slice(&b[..n], &ctrl()) {
            Err(PduError::Incomplete { needed, have }) => {
                assert_eq!(have, n);
                assert_eq!(needed, if n < 8 { 8 } else { b.len() });
            }
            other => panic!("prefix {n}: {other:?}"),
        }
    }
    assert_eq!(PduError::Incomplete { needed: 1, have: 0 }.fatal(), None);
}

mod framing_tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn batched_writes_and_byte_at_a_time_reads() {
        let (a, mut b) = tokio::io::duplex(64);
        let p = digests(host());
        let mut w = PduWriter::new(a);
        let pdus = vec![
            cmd_with_data(3000),
            Pdu::H2CData(H2CData {
                cccid: 2,
                ttag: 7,
                datao: 0,
                last: true,
                data: Bytes::from(vec![1; 5000]),
            }),
            Pdu::CapsuleCmd(CapsuleCmd {
                sqe: SubmissionEntry::new(0x18, 3),
                data: Bytes::new(),
            }),
        ];
        for pdu in &pdus {
            w.queue(pdu, &p).unwrap();
        }
        assert!(w.pending() > 8000);
        let writer = tokio::spawn(async move {
            w.flush().await.unwrap();
            w
        });
        // Re-chunk the stream into 1-byte writes to exercise partial reads.
        let (c, d) = tokio::io::duplex(1);
        let pump = tokio::spawn(async move {
            let mut c = c;
            let mut buf = [0u8; 1];
            loop {
                use tokio::io::AsyncReadExt;
                match b.read(&mut buf).await.unwrap() {
                    0 => break,
                    _ => c.write_all(&buf).await.unwrap(),
                }
            }
        });
        let mut r = PduReader::new(d);
        let rp = digests(ctrl());
        for pdu in &pdus {
            assert_eq!(&r.read_pdu(&rp).await.unwrap(), pdu);
        }
        drop(writer.await.unwrap());
        pump.await.unwrap();
        assert!(matches!(r.read_pdu(&rp).await, Err(FrameError::Closed)));
    }

    #[tokio::test]
    async fn truncated_and_oversized() {
        let b = enc(&cmd_with_data(100), &host());
        let (mut a, d) = tokio::io::duplex(4096);
        a.write_all(&b[..50]).await.unwrap();
        drop(a);
        let mut r = PduReader::new(d);
        match r.read_pdu(&ctrl()).await {
            Err(FrameError::Truncated {
                have: 50,
                needed: 172,
            }) => {}
            other => panic!("{other:?}"),
        }

        // PLEN of 4 GiB is refused from the common header alone.
        let (mut a, d) = tokio::io::duplex(4096);
        let mut hdr = b[..72].to_vec();
        hdr[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        a.write_all(&hdr).await.unwrap();
        let mut r = PduReader::new(d);
        let e = r.read_pdu(&ctrl()).await.unwrap_err();
        assert!(
            matches!(e, FrameError::Pdu(PduError::DataTooLong { .. })),
            "{e}"
        );
        assert_eq!(r.last_header().len(), 72);
        assert_eq!(&r.last_header()[..4], &hdr[..4]);
    }

    #[tokio::test]
    async fn read_is_cancel_safe() {
        let b = enc(&cmd_with_data(64), &host());
        let (mut a, d) = tokio::io::duplex(4096);
        let mut r = PduReader::new(d);
        a.write_all(&b[..40]).await.unwrap();
        // Time out mid-PDU, then finish it: nothing may be lost.
        let t =
            tokio::time::timeout(std::time::Duration::from_millis(20), r.read_pdu(&ctrl())).await;
        assert!(t.is_err());
        a.write_all(&b[40..]).await.unwrap();
        assert_eq!(r.read_pdu(&ctrl()).await.unwrap(), cmd_with_data(64));
    }
}
