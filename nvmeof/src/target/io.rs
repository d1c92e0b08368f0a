//! NVM I/O commands on a namespace backend.
//!
//! Each command runs as its own task so a slow read never holds up the commands
//! behind it; every LBA range is checked here with overflow-safe arithmetic before it
//! reaches a backend, and backend errors become the NVMe status a host acts on.

use super::state::Controller;
use super::Reply;
use crate::backend::{lba_to_bytes, BackendError};
use crate::nvme::io::DsmRange;
use crate::nvme::{IoCommand, Status, StatusCode};
use bytes::Bytes;
use std::sync::atomic::Ordering;

fn st(code: StatusCode) -> Reply {
    Reply::status(Status::new(code).dnr())
}

fn backend_status(e: &BackendError, write: bool) -> Status {
    match e {
        BackendError::OutOfRange { .. } => Status::new(StatusCode::LBA_OUT_OF_RANGE).dnr(),
        BackendError::Unaligned { .. } | BackendError::TooLarge { .. } => {
            Status::new(StatusCode::INVALID_FIELD).dnr()
        }
        BackendError::Io { .. } | BackendError::Media(_) if write => {
            Status::new(StatusCode::WRITE_FAULT)
        }
        BackendError::Io { .. } | BackendError::Media(_) => {
            Status::new(StatusCode::UNRECOVERED_READ_ERROR)
        }
        BackendError::NoSpace(_) => Status::new(StatusCode::CAPACITY_EXCEEDED).dnr(),
        BackendError::ReadOnly => Status::new(StatusCode::NAMESPACE_WRITE_PROTECTED).dnr(),
        // Retryable: the host tries again (Linux up to nvme_core.max_retries times).
        BackendError::Unavailable(_) => Status::new(StatusCode::NAMESPACE_NOT_READY),
        BackendError::Config(_) | BackendError::WorkerGone => {
            Status::new(StatusCode::INTERNAL_ERROR)
        }
    }
}

/// Whether an error counts as a media error in the SMART log.
fn is_media(e: &BackendError) -> bool {
    matches!(e, BackendError::Io { .. } | BackendError::Media(_))
}

/// Check an LBA range against the namespace and turn it into bytes.
fn range(blocks_in_ns: u64, block_size: u32, slba: u64, nlb: u64) -> Result<(u64, u64), Reply> {
    match slba.checked_add(nlb) {
        Some(end) if end <= blocks_in_ns => {}
        _ => return Err(st(StatusCode::LBA_OUT_OF_RANGE)),
    }
    lba_to_bytes(slba, nlb, block_size).ok_or_else(|| st(StatusCode::LBA_OUT_OF_RANGE))
}

/// Execute one I/O command. `data` is the host's data for writes and DSM; `c2h_len`
/// the length of the host's buffer for reads.
pub(crate) async fn execute(
    ctrl: &Controller,
    cmd: IoCommand,
    data: Bytes,
    c2h_len: u32,
    max_transfer: u32,
) -> Reply {
    let subsys = &ctrl.subsys;
    if let IoCommand::Flush { nsid: 0xFFFF_FFFF } = cmd {
        for ns in &subsys.namespaces {
            if ns.backend.volatile_write_cache() {
                if let Err(e) = ns.backend.flush().await {
                    tracing::warn!("flush of nsid {} failed: {e}", ns.nsid);
                    return Reply::status(backend_status(&e, true));
                }
            }
        }
        return Reply::ok();
    }
    let Some(ns) = subsys.namespace(cmd.nsid()) else {
        return st(StatusCode::INVALID_NAMESPACE);
    };
    let be = &ns.backend;
    match cmd {
        IoCommand::Read { slba, nlb, .. } => {
            let nlb = u64::from(nlb) + 1;
            let (off, len) = match range(ns.blocks(), ns.block_size, slba, nlb) {
                Ok(v) => v,
                Err(r) => return r,
            };
            if len > u64::from(max_transfer) {
                return st(StatusCode::INVALID_FIELD);
            }
            if u64::from(c2h_len) < len {
                return st(StatusCode::DATA_SGL_LENGTH_INVALID);
            }
            match be.read(off, len).await {
                Ok(d) => {
                    ctrl.stats.read_cmds.fetch_add(1, Ordering::Relaxed);
                    ctrl.stats.bytes_read.fetch_add(len, Ordering::Relaxed);
                    subsys.io.reads.fetch_add(1, Ordering::Relaxed);
                    subsys.io.bytes_read.fetch_add(len, Ordering::Relaxed);
                    Reply::data(d)
                }
                Err(e) => {
                    tracing::warn!("read nsid {} lba {slba}: {e}", ns.nsid);
                    if is_media(&e) {
                        ctrl.stats.media_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Reply::status(backend_status(&e, false))
                }
            }
        }
        IoCommand::Write { slba, nlb, fua, .. } => {
            let nlb = u64::from(nlb) + 1;
            let (off, len) = match range(ns.blocks(), ns.block_size, slba, nlb) {
                Ok(v) => v,
                Err(r) => return r,
            };
            if len > u64::from(max_transfer) {
                return st(StatusCode::INVALID_FIELD);
            }
            let Ok(ulen) = usize::try_from(len) else {
                return st(StatusCode::INVALID_FIELD);
            };
            if data.len() < ulen {
                return st(StatusCode::DATA_SGL_LENGTH_INVALID);
            }
            let payload = data.slice(..ulen);
            let res = if be.volatile_write_cache() && (fua || !ctrl.write_cache_enabled()) {
                be.write_fua(off, payload).await
            } else {
                be.write(off, payload).await
            };
            if let Err(e) = res {
                tracing::warn!("write nsid {} lba {slba}: {e}", ns.nsid);
                if is_media(&e) {
                    ctrl.stats.media_errors.fetch_add(1, Ordering::Relaxed);
                }
                return Reply::status(backend_status(&e, true));
            }
            ctrl.stats.write_cmds.fetch_add(1, Ordering::Relaxed);
            ctrl.stats.bytes_written.fetch_add(len, Ordering::Relaxed);
            subsys.io.writes.fetch_add(1, Ordering::Relaxed);
            subsys.io.bytes_written.fetch_add(len, Ordering::Relaxed);
            Reply::ok()
        }
        IoCommand::Flush { .. } => {
            if be.volatile_write_cache() {
                if let Err(e) = be.flush().await {
                    return Reply::status(backend_status(&e, true));
                }
            }
            Reply::ok()
        }
        IoCommand::WriteZeroes {
            slba,
            nlb,
            deallocate,
            fua,
            ..
        } => {
            let nlb = u64::from(nlb) + 1;
            let (off, len) = match range(ns.blocks(), ns.block_size, slba, nlb) {
                Ok(v) => v,
                Err(r) => return r,
            };
            // With DEAC the blocks may be deallocated, but only if they then read
            // as zeroes (DLFEAT says so only in that case).
            let res = if deallocate && be.deallocate_reads_zeroes() {
                be.deallocate(off, len).await
            } else {
                be.write_zeroes(off, len).await
            };
            if let Err(e) = res {
                return Reply::status(backend_status(&e, true));
            }
            if be.volatile_write_cache() && (fua || !ctrl.write_cache_enabled()) {
                if let Err(e) = be.flush().await {
                    return Reply::status(backend_status(&e, true));
                }
            }
            Reply::ok()
        }
        IoCommand::DatasetManagement { nr, deallocate, .. } => {
            let count = usize::from(nr) + 1;
            let ranges = match DsmRange::decode_list(&data, count) {
                Ok(r) => r,
                Err(_) => return st(StatusCode::DATA_SGL_LENGTH_INVALID),
            };
            if !deallocate {
                // Integral-dataset hints only: nothing to do.
                return Reply::ok();
            }
            let mut byte_ranges = Vec::with_capacity(ranges.len());
            for r in &ranges {
                if r.nlb == 0 {
                    continue;
                }
                match range(ns.blocks(), ns.block_size, r.slba, u64::from(r.nlb)) {
                    Ok(v) => byte_ranges.push(v),
                    Err(reply) => return reply,
                }
            }
            for (off, len) in byte_ranges {
                if let Err(e) = be.deallocate(off, len).await {
                    return Reply::status(backend_status(&e, true));
                }
            }
            Reply::ok()
        }
    }
}
