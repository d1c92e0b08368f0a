//! Admin and discovery commands: Identify, Get Log Page, Set/Get Features, and the
//! controller properties behind Property Get/Set.
//!
//! These run inline on the connection task: they touch only in-memory state and
//! finish in microseconds, and running them in order keeps controller-state changes
//! (enable, number of queues) sequenced exactly as the host sent them.

use super::state::{Controller, Namespace, SubsystemKind, AEC_NS_ATTR, ERROR_LOG_ENTRIES};
use super::{Reply, Shared};
use crate::nvme::identify::encode_active_ns_list;
use crate::nvme::log::ERROR_LOG_ENTRY_SIZE;
use crate::nvme::{
    property, AdminCommand, CapRegister, DiscoveryLogEntry, DiscoveryLogHeader, Feature, FeatureId,
    IdentifyCns, IdentifyController, IdentifyNamespace, LbaFormat, LogPageId, NsIdDescriptor,
    PropertySize, SmartLog, Status, StatusCode, VsRegister,
};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

const CAP_TIMEOUT_500MS: u8 = 30;
/// Bytes of the Changed Namespace List log page.
const CHANGED_NS_LOG_SIZE: usize = super::state::CHANGED_NS_MAX * 4;

pub(crate) fn cap(shared: &Shared) -> CapRegister {
    CapRegister {
        mqes: shared.limits.queue_depth - 1,
        cqr: true,
        ams: 0,
        to: CAP_TIMEOUT_500MS,
        dstrd: 0,
        nssrs: false,
        css: 1,
        bps: false,
        mpsmin: 0,
        mpsmax: 0,
    }
}

/// Property Get.
pub(crate) fn property_get(
    shared: &Shared,
    ctrl: &Controller,
    size: PropertySize,
    offset: u32,
) -> Reply {
    let (value, width) = match offset {
        property::CAP => (cap(shared).to_u64(), PropertySize::Eight),
        property::VS => (u64::from(VsRegister::V1_3.to_u32()), PropertySize::Four),
        property::CC => (u64::from(ctrl.cc().to_u32()), PropertySize::Four),
        property::CSTS => (u64::from(ctrl.csts().to_u32()), PropertySize::Four),
        _ => return Reply::status(Status::new(StatusCode::INVALID_FIELD).dnr()),
    };
    // An 8-byte read of a 4-byte property is refused; a 4-byte read of CAP returns
    // its low half, as hosts that read CAP in two halves expect.
    if size == PropertySize::Eight && width == PropertySize::Four {
        return Reply::status(Status::new(StatusCode::INVALID_FIELD).dnr());
    }
    let mut r = Reply::ok();
    r.dw0 = u32::try_from(value & 0xFFFF_FFFF).unwrap_or(0);
    if size == PropertySize::Eight {
        r.dw1 = u32::try_from(value >> 32).unwrap_or(0);
    }
    r
}

/// Property Set: only CC is writable.
pub(crate) fn property_set(
    ctrl: &Controller,
    size: PropertySize,
    offset: u32,
    value: u64,
) -> Reply {
    if offset != property::CC || size != PropertySize::Four {
        return Reply::status(Status::new(StatusCode::INVALID_FIELD).dnr());
    }
    ctrl.set_cc(u32::try_from(value & 0xFFFF_FFFF).unwrap_or(0));
    Reply::ok()
}

fn invalid_field() -> Reply {
    Reply::status(Status::new(StatusCode::INVALID_FIELD).dnr())
}

/// Admin commands other than AER (which the connection holds) and Fabrics.
pub(crate) fn execute(
    shared: &Shared,
    ctrl: &Controller,
    cmd: AdminCommand,
    c2h_len: u32,
    local: SocketAddr,
) -> Reply {
    let discovery = ctrl.subsys.kind == SubsystemKind::Discovery;
    match cmd {
        AdminCommand::Identify { cns, nsid, .. } => identify(shared, ctrl, cns, nsid, c2h_len),
        AdminCommand::GetLogPage {
            nsid: _,
            lid,
            numd,
            offset,
            rae,
            ..
        } => {
            let len = (u64::from(numd) + 1) * 4;
            if len > u64::from(c2h_len) {
                return Reply::status(Status::new(StatusCode::DATA_SGL_LENGTH_INVALID).dnr());
            }
            if offset % 4 != 0 {
                return invalid_field();
            }
            let Ok(start) = usize::try_from(offset) else {
                return invalid_field();
            };
            let page = match lid {
                LogPageId::DISCOVERY if discovery => discovery_log(shared, ctrl, local),
                LogPageId::ERROR if !discovery => {
                    let mut v = Vec::with_capacity(ERROR_LOG_ENTRIES * ERROR_LOG_ENTRY_SIZE);
                    for e in ctrl.error_log() {
                        v.extend_from_slice(&e.encode());
                    }
                    v.resize(ERROR_LOG_ENTRIES * ERROR_LOG_ENTRY_SIZE, 0);
                    v
                }
                LogPageId::SMART if !discovery => smart_log(ctrl),
                // Checked before it is read: reading it (without RAE) clears it, which
                // a refused command must not do.
                LogPageId::CHANGED_NAMESPACES if !discovery && start <= CHANGED_NS_LOG_SIZE => {
                    ctrl.changed_ns_log(rae)
                }
                LogPageId::CHANGED_NAMESPACES if !discovery => return invalid_field(),
                _ => return Reply::status(Status::new(StatusCode::INVALID_LOG_PAGE).dnr()),
            };
            if start > page.len() {
                return invalid_field();
            }
            let Ok(len) = usize::try_from(len) else {
                return invalid_field();
            };
            let mut out = vec![0u8; len];
            let avail = (page.len() - start).min(len);
            out[..avail].copy_from_slice(&page[start..start + avail]);
            Reply::data(Bytes::from(out))
        }
        AdminCommand::SetFeatures { save, feature, .. } => {
            if save {
                return Reply::status(Status::new(StatusCode::FEATURE_NOT_SAVEABLE).dnr());
            }
            match feature {
                Feature::NumberOfQueues { nsqr, ncqr } if !discovery => {
                    if nsqr == 0xFFFF || ncqr == 0xFFFF {
                        return invalid_field();
                    }
                    if ctrl.has_io_queues() {
                        return Reply::status(
                            Status::new(StatusCode::COMMAND_SEQUENCE_ERROR).dnr(),
                        );
                    }
                    let want = u32::from(nsqr.min(ncqr)) + 1;
                    let n = ctrl.request_io_queues(want);
                    let mut r = Reply::ok();
                    r.dw0 = u32::from(n - 1) | (u32::from(n - 1) << 16);
                    r
                }
                Feature::KeepAliveTimer { kato_ms } => {
                    ctrl.set_kato_ms(kato_ms);
                    Reply::ok()
                }
                Feature::AsyncEventConfig { mask } => {
                    ctrl.aec.store(mask, Ordering::Release);
                    Reply::ok()
                }
                Feature::Other {
                    fid: FeatureId::VOLATILE_WRITE_CACHE,
                    cdw11,
                } if !discovery => {
                    if !has_vwc(ctrl) {
                        return invalid_field();
                    }
                    ctrl.set_write_cache(cdw11 & 1 != 0);
                    Reply::ok()
                }
                _ => invalid_field(),
            }
        }
        AdminCommand::GetFeatures { sel, fid, .. } => {
            // SEL 3 (supported capabilities): nothing is saveable or per-namespace,
            // and every feature we report is changeable except VWC without a cache.
            let value = match fid {
                FeatureId::NUMBER_OF_QUEUES if !discovery => {
                    let n = u32::from(ctrl.granted_io_queues().max(1) - 1);
                    n | (n << 16)
                }
                FeatureId::KEEP_ALIVE_TIMER => ctrl.kato_ms(),
                FeatureId::ASYNC_EVENT_CONFIG => ctrl.aec.load(Ordering::Acquire),
                FeatureId::VOLATILE_WRITE_CACHE if !discovery => {
                    u32::from(has_vwc(ctrl) && ctrl.write_cache_enabled())
                }
                _ => return invalid_field(),
            };
            let mut r = Reply::ok();
            r.dw0 = if sel == 3 { 0b100 } else { value };
            r
        }
        AdminCommand::KeepAlive => {
            ctrl.keep_alive();
            Reply::ok()
        }
        AdminCommand::Abort { .. } if !discovery => {
            // Commands are never held in a queue we could pull them from: report
            // "not aborted" (DW0 bit 0), which the specification allows.
            let mut r = Reply::ok();
            r.dw0 = 1;
            r
        }
        AdminCommand::Abort { .. } | AdminCommand::AsyncEventRequest => {
            Reply::status(Status::new(StatusCode::INVALID_OPCODE).dnr())
        }
    }
}

fn has_vwc(ctrl: &Controller) -> bool {
    ctrl.subsys
        .namespaces
        .iter()
        .any(|n| n.backend.volatile_write_cache())
}

fn identify(
    shared: &Shared,
    ctrl: &Controller,
    cns: IdentifyCns,
    nsid: u32,
    c2h_len: u32,
) -> Reply {
    if c2h_len < 4096 {
        return Reply::status(Status::new(StatusCode::DATA_SGL_LENGTH_INVALID).dnr());
    }
    let discovery = ctrl.subsys.kind == SubsystemKind::Discovery;
    let invalid_ns = || Reply::status(Status::new(StatusCode::INVALID_NAMESPACE).dnr());
    let page = match cns {
        IdentifyCns::CONTROLLER => identify_controller(shared, ctrl).encode(),
        _ if discovery => return invalid_field(),
        IdentifyCns::NAMESPACE => {
            if nsid == 0 || nsid == 0xFFFF_FFFF {
                return invalid_ns();
            }
            match ctrl.subsys.namespace(nsid) {
                Some(ns) => identify_namespace(ns).encode(),
                None if nsid <= ctrl.subsys.max_nsid() => vec![0u8; 4096],
                None => return invalid_ns(),
            }
        }
        IdentifyCns::ACTIVE_NAMESPACES => {
            if nsid >= 0xFFFF_FFFE {
                return invalid_ns();
            }
            let ids: Vec<u32> = ctrl
                .subsys
                .namespaces
                .iter()
                .map(|n| n.nsid)
                .filter(|&n| n > nsid)
                .collect();
            encode_active_ns_list(&ids)
        }
        IdentifyCns::NS_ID_DESCRIPTORS => match ctrl.subsys.namespace(nsid) {
            Some(ns) => NsIdDescriptor::encode_list(&[
                NsIdDescriptor::Nguid(ns.nguid),
                NsIdDescriptor::Uuid(ns.uuid),
                NsIdDescriptor::Csi(0),
            ]),
            None => return invalid_ns(),
        },
        _ => return invalid_field(),
    };
    Reply::data(Bytes::from(page))
}

pub(crate) fn identify_controller(shared: &Shared, ctrl: &Controller) -> IdentifyController {
    let l = &shared.limits;
    let discovery = ctrl.subsys.kind == SubsystemKind::Discovery;
    let vwc = has_vwc(ctrl);
    IdentifyController {
        sn: ctrl.subsys.serial.clone(),
        mn: ctrl.subsys.model.clone(),
        fr: env!("CARGO_PKG_VERSION").chars().take(8).collect(),
        rab: 6,
        // Several hosts (controllers) may share the subsystem's namespaces.
        cmic: if discovery { 0 } else { 1 << 1 },
        mdts: l.mdts(),
        cntlid: ctrl.cntlid,
        ver: VsRegister::V1_3.to_u32(),
        cntrltype: if discovery {
            IdentifyController::CNTRLTYPE_DISCOVERY
        } else {
            IdentifyController::CNTRLTYPE_IO
        },
        acl: 3,
        aerl: 3,
        frmw: 0b11,
        // Namespace Attribute Notices (a namespace's size changed; see
        // `Subsystem::namespace_resized`).
        oaes: if discovery { 0 } else { AEC_NS_ATTR },
        // Extended data for Get Log Page (offsets, NUMDU).
        lpa: 1 << 2,
        elpe: u8::try_from(ERROR_LOG_ENTRIES - 1).unwrap_or(0),
        // Keep-alive granularity 100 ms.
        kas: 1,
        // 128-bit host identifiers (the only kind fabrics carry) and traffic-based
        // keep alive (any command restarts the timer; see `Controller::note_traffic`).
        ctratt: IdentifyController::CTRATT_HID_128_BIT | IdentifyController::CTRATT_TBKAS,
        sqes: 0x66,
        cqes: 0x44,
        maxcmd: l.queue_depth,
        nn: ctrl.subsys.max_nsid(),
        oncs: if discovery {
            0
        } else {
            IdentifyController::ONCS_DSM | IdentifyController::ONCS_WRITE_ZEROES
        },
        // VWC present, and Flush with NSID FFFFFFFFh supported (bits 2:1 = 11b).
        vwc: if vwc { 0b111 } else { 0 },
        sgls: IdentifyController::SGLS_SUPPORTED
            | IdentifyController::SGLS_OFFSET
            | IdentifyController::SGLS_TRANSPORT,
        subnqn: ctrl.subsys.nqn.clone(),
        ioccsz: if discovery { 4 } else { l.ioccsz() },
        iorcsz: 1,
        icdoff: 0,
        fcatt: 0,
        msdbd: 1,
        ..IdentifyController::default()
    }
}

pub(crate) fn identify_namespace(ns: &Namespace) -> IdentifyNamespace {
    let mut lbaf = [LbaFormat::default(); 16];
    lbaf[0] = LbaFormat {
        ms: 0,
        lbads: u8::try_from(ns.block_size.trailing_zeros()).unwrap_or(9),
        rp: 0,
    };
    let zeroes = ns.backend.deallocate_reads_zeroes();
    let blocks = ns.blocks();
    let h = ns.backend.io_hints();
    // NPWG, NPWA, NPDG, NPDA and NOWS are 0's based and valid only with NSFEAT bit 4
    // (OPTPERF); NOIOB is a plain count where 0 means "not reported".
    let zb = |blocks: u32| u16::try_from(blocks.saturating_sub(1)).unwrap_or(u16::MAX);
    let optperf = h.preferred_write_granularity != 0
        || h.preferred_write_alignment != 0
        || h.preferred_deallocate_granularity != 0
        || h.preferred_deallocate_alignment != 0
        || h.optimal_write_size != 0;
    IdentifyNamespace {
        nsfeat: if optperf { 1 << 4 } else { 0 },
        noiob: u16::try_from(h.optimal_io_boundary).unwrap_or(0),
        npwg: zb(h.preferred_write_granularity),
        npwa: zb(h.preferred_write_alignment),
        npdg: zb(h.preferred_deallocate_granularity),
        npda: zb(h.preferred_deallocate_alignment),
        nows: zb(h.optimal_write_size),
        // Bit 0: the namespace is write protected.
        nsattr: u8::from(ns.backend.read_only()),
        nsze: blocks,
        ncap: blocks,
        nuse: blocks,
        nlbaf: 0,
        flbas: 0,
        // Bits 2:0 = 001b: deallocated blocks read as zeroes; bit 3: Write Zeroes
        // with the deallocate bit is supported.
        dlfeat: if zeroes { 0b1001 } else { 0 },
        // May be shared by several controllers.
        nmic: 1,
        nvmcap: u128::from(blocks) * u128::from(ns.block_size),
        nguid: ns.nguid,
        lbaf,
        ..IdentifyNamespace::default()
    }
}

fn smart_log(ctrl: &Controller) -> Vec<u8> {
    let s = &ctrl.stats;
    // Data units are thousands of 512-byte units, rounded up.
    let units = |bytes: u64| u128::from(bytes.div_ceil(512)).div_ceil(1000);
    SmartLog {
        available_spare: 100,
        available_spare_threshold: 10,
        data_units_read: units(s.bytes_read.load(Ordering::Relaxed)),
        data_units_written: units(s.bytes_written.load(Ordering::Relaxed)),
        host_read_commands: u128::from(s.read_cmds.load(Ordering::Relaxed)),
        host_write_commands: u128::from(s.write_cmds.load(Ordering::Relaxed)),
        power_cycles: 1,
        power_on_hours: u128::from(ctrl.created.elapsed().as_secs() / 3600),
        media_errors: u128::from(s.media_errors.load(Ordering::Relaxed)),
        num_error_log_entries: u128::from(ctrl.error_count()),
        ..SmartLog::default()
    }
    .encode()
}

fn discovery_log(shared: &Shared, ctrl: &Controller, local: SocketAddr) -> Vec<u8> {
    let addr = if local.ip().is_unspecified() {
        shared.local_addr
    } else {
        local
    };
    let mut subs: Vec<_> = shared
        .subsystems
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .values()
        .filter(|s| s.host_allowed(&ctrl.hostnqn))
        .cloned()
        .collect();
    subs.sort_by(|a, b| a.nqn.cmp(&b.nqn));
    let entries: Vec<DiscoveryLogEntry> = subs
        .iter()
        .map(|s| DiscoveryLogEntry {
            trtype: DiscoveryLogEntry::TRTYPE_TCP,
            adrfam: if addr.is_ipv4() {
                DiscoveryLogEntry::ADRFAM_IPV4
            } else {
                DiscoveryLogEntry::ADRFAM_IPV6
            },
            subtype: DiscoveryLogEntry::SUBTYPE_NVM,
            // Secure channel not required (bits 1:0 = 10b); SQ flow control may be
            // disabled (bit 2).
            treq: 0b110,
            portid: 1,
            cntlid: 0xFFFF,
            asqsz: 32,
            eflags: 0,
            trsvcid: addr.port().to_string(),
            subnqn: s.nqn.clone(),
            traddr: addr.ip().to_string(),
            tsas: [0; 256],
        })
        .collect();
    let header = DiscoveryLogHeader {
        genctr: shared.discovery_genctr.load(Ordering::Acquire),
        numrec: u64::try_from(entries.len()).unwrap_or(0),
        recfmt: 0,
    };
    let mut page = header.encode();
    for e in &entries {
        page.extend_from_slice(&e.encode());
    }
    page
}
