//! Property tests: every PDU and every NVMe structure survives
//! encode -> decode unchanged, under every combination of digests and data
//! alignment.

// Helpers outside #[test] functions may unwrap too: a panic is a failed test.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use nvmeof::nvme::identify::{decode_active_ns_list, encode_active_ns_list};
use nvmeof::nvme::*;
use nvmeof::tcp::*;
use proptest::prelude::*;

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-zA-Z0-9.:_-]{{0,{max}}}")).unwrap()
}

fn sgl() -> impl Strategy<Value = Sgl> {
    let plain = (
        any::<u64>(),
        any::<u32>(),
        prop_oneof![Just(0u8), Just(1), Just(2), Just(3), Just(5), 6u8..16],
        0u8..16,
    )
        .prop_map(|(address, length, t, subtype)| {
            let sgl_type = match t {
                0 => SglType::DataBlock,
                1 => SglType::BitBucket,
                2 => SglType::Segment,
                3 => SglType::LastSegment,
                5 => SglType::TransportDataBlock,
                r => SglType::Reserved(r),
            };
            Sgl {
                address,
                length,
                key: 0,
                sgl_type,
                subtype,
            }
        });
    let keyed = (any::<u64>(), 0u32..(1 << 24), any::<u32>(), 0u8..16).prop_map(
        |(address, length, key, subtype)| Sgl {
            address,
            length,
            key,
            sgl_type: SglType::KeyedDataBlock,
            subtype,
        },
    );
    prop_oneof![plain, keyed]
}

fn sqe() -> impl Strategy<Value = SubmissionEntry> {
    (
        (
            any::<u8>(),
            0u8..4,
            0u8..4,
            any::<u16>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        ),
        (any::<u64>(), sgl()),
        proptest::array::uniform6(any::<u32>()),
    )
        .prop_map(
            |((opcode, fuse, psdt, cid, nsid, cdw2, cdw3), (mptr, dptr), d)| SubmissionEntry {
                opcode,
                fuse,
                psdt,
                cid,
                nsid,
                cdw2,
                cdw3,
                mptr,
                dptr,
                cdw10: d[0],
                cdw11: d[1],
                cdw12: d[2],
                cdw13: d[3],
                cdw14: d[4],
                cdw15: d[5],
            },
        )
}

fn status() -> impl Strategy<Value = Status> {
    (any::<u16>()).prop_map(Status::from_word)
}

fn cqe() -> impl Strategy<Value = Completion> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u16>(),
        any::<u16>(),
        any::<u16>(),
        any::<bool>(),
        status(),
    )
        .prop_map(|(dw0, dw1, sqhd, sqid, cid, phase, status)| Completion {
            dw0,
            dw1,
            sqhd,
            sqid,
            cid,
            phase,
            status,
        })
}

fn data(min: usize, max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), min..=max).prop_map(Bytes::from)
}

fn h2c_pdu() -> impl Strategy<Value = Pdu> {
    prop_oneof![
        (0u8..32, any::<bool>(), any::<bool>(), any::<u32>()).prop_map(
            |(hpda, hdgst, ddgst, maxr2t)| {
                Pdu::IcReq(IcReq {
                    pfv: 0,
                    hpda,
                    hdgst,
                    ddgst,
                    maxr2t,
                })
            }
        ),
        (any::<u16>(), any::<u32>(), data(0, 128)).prop_map(|(fes, fei, data)| Pdu::H2CTermReq(
            TermReq {
                fes: FatalErrorStatus::from_u16(fes),
                fei,
                data
            }
        )),
        (sqe(), data(0, 3000)).prop_map(|(sqe, data)| Pdu::CapsuleCmd(CapsuleCmd { sqe, data })),
        (
            any::<u16>(),
            any::<u16>(),
            0u32..(u32::MAX - 4096),
            any::<bool>(),
            data(1, 3000)
        )
            .prop_map(|(cccid, ttag, datao, last, data)| Pdu::H2CData(H2CData {
                cccid,
                ttag,
                datao,
                last,
                data
            })),
    ]
}

fn c2h_pdu() -> impl Strategy<Value = Pdu> {
    prop_oneof![
        (
            0u8..32,
            any::<bool>(),
            any::<bool>(),
            1024u32..(u32::MAX / 4)
        )
            .prop_map(|(cpda, hdgst, ddgst, q)| Pdu::IcResp(IcResp {
                pfv: 0,
                cpda,
                hdgst,
                ddgst,
                maxh2cdata: q * 4
            })),
        (any::<u16>(), any::<u32>(), data(0, 128)).prop_map(|(fes, fei, data)| Pdu::C2HTermReq(
            TermReq {
                fes: FatalErrorStatus::from_u16(fes),
                fei,
                data
            }
        )),
        cqe().prop_map(|cqe| Pdu::CapsuleResp(CapsuleResp { cqe })),
        (
            any::<u16>(),
            0u32..(u32::MAX - 4096),
            any::<bool>(),
            any::<bool>(),
            data(1, 3000)
        )
            .prop_map(|(cccid, datao, last, success, data)| Pdu::C2HData(C2HData {
                cccid,
                datao,
                last: last || success,
                success,
                data
            })),
        (
            any::<u16>(),
            any::<u16>(),
            0u32..(u32::MAX / 2),
            1u32..(u32::MAX / 2)
        )
            .prop_map(|(cccid, ttag, r2to, r2tl)| Pdu::R2T(R2T {
                cccid,
                ttag,
                r2to,
                r2tl
            })),
    ]
}

fn negotiated() -> impl Strategy<Value = (bool, bool, u8, u8)> {
    (any::<bool>(), any::<bool>(), 0u8..32, 0u8..32)
}

fn params(role: Role, (hdgst, ddgst, cpda, hpda): (bool, bool, u8, u8)) -> ConnectionParams {
    ConnectionParams {
        role,
        hdgst,
        ddgst,
        cpda,
        hpda,
        maxh2cdata: 4096,
        max_rx_data: 1 << 16,
    }
}

fn roundtrip(pdu: &Pdu, tx: &ConnectionParams, rx: &ConnectionParams) -> Result<(), TestCaseError> {
    let enc = pdu.encode(tx).unwrap();
    let bytes = enc.to_vec();
    prop_assert_eq!(bytes.len(), enc.len());
    let plen = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    prop_assert_eq!(usize::try_from(plen).unwrap(), bytes.len());
    let (back, used) =
        decode_pdu_slice(&bytes, rx).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(used, bytes.len());
    prop_assert_eq!(&back, pdu);
    // Two PDUs back to back decode one at a time.
    let mut two = bytes.clone();
    two.extend_from_slice(&bytes);
    let (first, used) = decode_pdu_slice(&two, rx).unwrap();
    prop_assert_eq!(&first, pdu);
    prop_assert_eq!(used, bytes.len());
    Ok(())
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn h2c_pdus_roundtrip(pdu in h2c_pdu(), n in negotiated()) {
        roundtrip(&pdu, &params(Role::Host, n), &params(Role::Controller, n))?;
    }

    #[test]
    fn c2h_pdus_roundtrip(pdu in c2h_pdu(), n in negotiated()) {
        roundtrip(&pdu, &params(Role::Controller, n), &params(Role::Host, n))?;
    }

    #[test]
    fn pdo_respects_receiver_alignment(pdu in h2c_pdu(), n in negotiated()) {
        let b = pdu.encode(&params(Role::Host, n)).unwrap().to_vec();
        if b[3] != 0 && matches!(pdu, Pdu::CapsuleCmd(_) | Pdu::H2CData(_)) {
            prop_assert_eq!(usize::from(b[3]) % ((usize::from(n.2) + 1) * 4), 0);
        }
    }

    #[test]
    fn sqe_roundtrip(e in sqe()) {
        prop_assert_eq!(SubmissionEntry::decode(&e.encode()), e);
    }

    #[test]
    fn cqe_roundtrip(c in cqe()) {
        prop_assert_eq!(Completion::decode(&c.encode()), c);
    }

    #[test]
    fn sgl_roundtrip(s in sgl()) {
        prop_assert_eq!(Sgl::decode(&s.encode()), s);
    }

    #[test]
    fn admin_commands_roundtrip(
        which in 0u8..7,
        nsid in any::<u32>(), cns in any::<u8>(), cntid in any::<u16>(),
        lid in any::<u8>(), lsp in 0u8..0x80, rae in any::<bool>(), numd in any::<u32>(), offset in any::<u64>(),
        save in any::<bool>(), fid in any::<u8>(), cdw11 in any::<u32>(), sel in 0u8..8, cid in any::<u16>(),
    ) {
        let c = match which {
            0 => AdminCommand::Identify { cns: IdentifyCns(cns), nsid, cntid },
            1 => AdminCommand::GetLogPage { nsid, lid: LogPageId(lid), lsp, rae, numd, offset },
            2 => AdminCommand::SetFeatures { nsid, save, feature: Feature::from_parts(FeatureId(fid), cdw11) },
            3 => AdminCommand::GetFeatures { nsid, sel, fid: FeatureId(fid), cdw11 },
            4 => AdminCommand::KeepAlive,
            5 => AdminCommand::AsyncEventRequest,
            _ => AdminCommand::Abort { sqid: cntid, cid: numd.to_le_bytes()[0].into() },
        };
        let e = c.to_sqe(cid);
        prop_assert_eq!(e.cid, cid);
        prop_assert_eq!(AdminCommand::parse(&SubmissionEntry::decode(&e.encode())), Ok(c));
    }

    #[test]
    fn fabrics_commands_roundtrip(
        which in 0u8..4, recfmt in any::<u16>(), qid in any::<u16>(), sqsize in any::<u16>(),
        cattr in any::<u8>(), kato_ms in any::<u32>(), eight in any::<bool>(), offset in any::<u32>(),
        value in any::<u64>(), cid in any::<u16>(),
    ) {
        let size = if eight { PropertySize::Eight } else { PropertySize::Four };
        let c = match which {
            0 => FabricsCommand::Connect { recfmt, qid, sqsize, cattr, kato_ms },
            1 => FabricsCommand::PropertyGet { size, offset },
            2 => FabricsCommand::PropertySet { size, offset, value },
            _ => FabricsCommand::Disconnect { recfmt },
        };
        prop_assert_eq!(FabricsCommand::parse(&SubmissionEntry::decode(&c.to_sqe(cid).encode())), Ok(c));
    }

    #[test]
    fn io_commands_roundtrip(
        which in 0u8..5, nsid in any::<u32>(), slba in any::<u64>(), nlb in any::<u16>(),
        fua in any::<bool>(), dealloc in any::<bool>(), nr in any::<u8>(), idr in any::<bool>(),
        idw in any::<bool>(), cid in any::<u16>(),
    ) {
        let c = match which {
            0 => IoCommand::Read { nsid, slba, nlb, fua },
            1 => IoCommand::Write { nsid, slba, nlb, fua },
            2 => IoCommand::Flush { nsid },
            3 => IoCommand::WriteZeroes { nsid, slba, nlb, deallocate: dealloc, fua },
            _ => IoCommand::DatasetManagement { nsid, nr, idr, idw, deallocate: dealloc },
        };
        prop_assert_eq!(IoCommand::parse(&SubmissionEntry::decode(&c.to_sqe(cid).encode())), Ok(c));
    }

    #[test]
    fn dsm_ranges_roundtrip(rs in proptest::collection::vec((any::<u32>(), any::<u32>(), any::<u64>()), 1..=256)) {
        let rs: Vec<DsmRange> = rs.into_iter().map(|(cattr, nlb, slba)| DsmRange { cattr, nlb, slba }).collect();
        prop_assert_eq!(DsmRange::decode_list(&DsmRange::encode_list(&rs), rs.len()).unwrap(), rs);
    }

    #[test]
    fn connect_data_roundtrip(hostid in any::<[u8; 16]>(), cntlid in any::<u16>(), sub in text(223), host in text(223)) {
        let d = ConnectData { hostid, cntlid, subnqn: sub, hostnqn: host };
        prop_assert_eq!(ConnectData::decode(&d.encode()).unwrap(), d);
    }

    #[test]
    fn registers_roundtrip(cap in any::<u64>(), cc in any::<u32>(), csts in any::<u32>(), vs in any::<u32>()) {
        // Decoding then encoding keeps every defined bit; a second round is exact.
        let c = CapRegister::from_u64(cap);
        prop_assert_eq!(CapRegister::from_u64(c.to_u64()), c);
        let c = CcRegister::from_u32(cc);
        prop_assert_eq!(CcRegister::from_u32(c.to_u32()), c);
        prop_assert_eq!(c.to_u32(), cc & 0x00FF_FFF1);
        let s = CstsRegister::from_u32(csts);
        prop_assert_eq!(s.to_u32(), csts & 0x3F);
        prop_assert_eq!(VsRegister::from_u32(vs).to_u32(), vs);
    }

    #[test]
    fn identify_controller_roundtrip(
        ids in proptest::array::uniform8(any::<u16>()),
        bytes in proptest::array::uniform32(any::<u8>()),
        words in proptest::array::uniform12(any::<u32>()),
        sn in text(20), mn in text(40), fr in text(8), subnqn in text(255),
        caps in (any::<u128>(), any::<u128>(), any::<[u8; 16]>(), any::<[u8; 3]>()),
    ) {
        let c = IdentifyController {
            vid: ids[0], ssvid: ids[1], sn, mn, fr, rab: bytes[0], ieee: caps.3, cmic: bytes[1],
            mdts: bytes[2], cntlid: ids[2], ver: words[0], rtd3r: words[1], rtd3e: words[2],
            oaes: words[3], ctratt: words[4], cntrltype: bytes[3], fguid: caps.2,
            crdt: [ids[3], ids[4], ids[5]], oacs: ids[6], acl: bytes[4], aerl: bytes[5],
            frmw: bytes[6], lpa: bytes[7], elpe: bytes[8], npss: bytes[9], avscc: bytes[10],
            apsta: bytes[11], wctemp: ids[7], cctemp: ids[0] ^ 1, tnvmcap: caps.0, unvmcap: caps.1,
            kas: ids[1] ^ 2, sqes: bytes[12], cqes: bytes[13], maxcmd: ids[2] ^ 3, nn: words[5],
            oncs: ids[3] ^ 4, fuses: ids[4] ^ 5, fna: bytes[14], vwc: bytes[15], awun: ids[5] ^ 6,
            awupf: ids[6] ^ 7, nvscc: bytes[16], acwu: ids[7] ^ 8, sgls: words[6], mnan: words[7],
            subnqn, ioccsz: words[8], iorcsz: words[9], icdoff: ids[0] ^ 9, fcatt: bytes[17],
            msdbd: bytes[18], ofcs: ids[1] ^ 10, ps0_mp: ids[2] ^ 11,
        };
        prop_assert_eq!(IdentifyController::decode(&c.encode()).unwrap(), c);
    }

    #[test]
    fn identify_namespace_roundtrip(
        sizes in proptest::array::uniform3(any::<u64>()),
        bytes in proptest::array::uniform16(any::<u8>()),
        ids in proptest::array::uniform16(any::<u16>()),
        nvmcap in any::<u128>(), anagrpid in any::<u32>(),
        nguid in any::<[u8; 16]>(), eui64 in any::<[u8; 8]>(),
        lbaf in proptest::array::uniform16((any::<u16>(), any::<u8>(), 0u8..4)),
    ) {
        let n = IdentifyNamespace {
            nsze: sizes[0], ncap: sizes[1], nuse: sizes[2], nsfeat: bytes[0], nlbaf: bytes[1],
            flbas: bytes[2], mc: bytes[3], dpc: bytes[4], dps: bytes[5], nmic: bytes[6],
            rescap: bytes[7], fpi: bytes[8], dlfeat: bytes[9], nawun: ids[0], nawupf: ids[1],
            nacwu: ids[2], nabsn: ids[3], nabo: ids[4], nabspf: ids[5], noiob: ids[6], nvmcap,
            npwg: ids[7], npwa: ids[8], npdg: ids[9], npda: ids[10], nows: ids[11], anagrpid,
            nsattr: bytes[10], nvmsetid: ids[12], endgid: ids[13], nguid, eui64,
            lbaf: lbaf.map(|(ms, lbads, rp)| LbaFormat { ms, lbads, rp }),
        };
        prop_assert_eq!(IdentifyNamespace::decode(&n.encode()).unwrap(), n);
    }

    #[test]
    fn ns_lists_roundtrip(
        mut ids in proptest::collection::btree_set(1u32.., 0..1024),
        descs in proptest::collection::vec((1u8..5, any::<[u8; 16]>()), 0..50),
    ) {
        let ids: Vec<u32> = std::mem::take(&mut ids).into_iter().collect();
        prop_assert_eq!(decode_active_ns_list(&encode_active_ns_list(&ids)).unwrap(), ids);
        let descs: Vec<NsIdDescriptor> = descs.into_iter().map(|(t, v)| match t {
            1 => NsIdDescriptor::Eui64(v[..8].try_into().unwrap()),
            2 => NsIdDescriptor::Nguid(v),
            3 => NsIdDescriptor::Uuid(v),
            _ => NsIdDescriptor::Csi(v[0]),
        }).collect();
        prop_assert_eq!(NsIdDescriptor::decode_list(&NsIdDescriptor::encode_list(&descs)).unwrap(), descs);
    }

    #[test]
    fn log_pages_roundtrip(
        words in proptest::array::uniform8(any::<u64>()),
        counters in proptest::array::uniform10(any::<u128>()),
        small in proptest::array::uniform16(any::<u8>()),
        entries in proptest::collection::vec((any::<[u8; 4]>(), any::<[u16; 4]>(), text(32), text(223), text(255)), 0..4),
    ) {
        let e = ErrorLogEntry {
            error_count: words[0], sqid: small[0].into(), cid: small[1].into(), status: small[2].into(),
            param_error_location: small[3].into(), lba: words[1], nsid: small[4].into(),
            vs: small[5], trtype: small[6], csi: words[2], ttsi: small[7].into(),
        };
        prop_assert_eq!(ErrorLogEntry::decode(&e.encode()).unwrap(), e);
        let s = SmartLog {
            critical_warning: small[8], temperature: small[9].into(), available_spare: small[10],
            available_spare_threshold: small[11], percentage_used: small[12],
            endurance_group_warning: small[13], data_units_read: counters[0],
            data_units_written: counters[1], host_read_commands: counters[2],
            host_write_commands: counters[3], controller_busy_time: counters[4],
            power_cycles: counters[5], power_on_hours: counters[6], unsafe_shutdowns: counters[7],
            media_errors: counters[8], num_error_log_entries: counters[9],
            warning_temp_time: small[14].into(), critical_temp_time: small[15].into(),
        };
        prop_assert_eq!(SmartLog::decode(&s.encode()).unwrap(), s);
        let h = DiscoveryLogHeader { genctr: words[3], numrec: u64::try_from(entries.len()).unwrap(), recfmt: 0 };
        let es: Vec<DiscoveryLogEntry> = entries.into_iter().map(|(b, w, trsvcid, subnqn, traddr)| DiscoveryLogEntry {
            trtype: b[0], adrfam: b[1], subtype: b[2], treq: b[3], portid: w[0], cntlid: w[1],
            asqsz: w[2], eflags: w[3], trsvcid, subnqn, traddr, tsas: [b[0]; 256],
        }).collect();
        let mut page = h.encode();
        for e in &es {
            page.extend(e.encode());
        }
        prop_assert_eq!(DiscoveryLogEntry::decode_page(&page).unwrap(), (h, es));
    }
}
