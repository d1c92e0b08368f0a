//! A shard store on one namespace of an NVMe/TCP subsystem.
//!
//! This is how the engine reaches a storage node: our own `nvmeof-target` or any
//! standard NVMe/TCP target (Linux nvmet, SPDK). It is a thin translation so that all
//! policy stays in the engine:
//! - Byte ranges become LBAs only after [`check_range`] accepted them against the
//!   geometry read from Identify, so a bad range never reaches the wire, and requests
//!   larger than the controller's transfer limit (MDTS, 65 536 blocks per command) are
//!   split into commands issued concurrently, each on the next I/O queue.
//! - Host errors are mapped to the shard error classes the engine acts on: a lost or
//!   reconnecting path, a timeout or a closed handle is `Unavailable` (the host already
//!   bounds each of these by its command timeout, so a dead node is an error, not a
//!   hang); a media or data-integrity status is `Media` with the byte range of the
//!   failed command; an LBA range the controller refuses is `OutOfRange`. Other
//!   controller refusals (namespace gone, internal error) are `Unavailable`: the node
//!   cannot serve the piece as configured, and the engine's answer is the same.
//! - A split write is not atomic: if one piece fails, the others may have landed. The
//!   engine only writes whole rows once and re-sends the same bytes on retry, so this is
//!   the same uncertainty as a single failed write. Every piece is awaited before the
//!   error is reported, so no piece of a failed request is still in flight afterwards.
//! - After the host rebuilt its association (the node restarted, say), the namespace
//!   could have been reformatted or shrunk behind our back; the next request re-reads
//!   its geometry and refuses to run on a namespace that no longer matches, since
//!   writing with a different block size would put data at the wrong bytes.
//!
//! No lock is held anywhere: the state shared by concurrent requests is atomics, and the
//! host's queues are tasks reached through channels.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use bytes::Bytes;
use futures::future::join_all;
use nvmeof::host::{Controller, ErrorKind, HostConfig, HostError};
use nvmeof::nvme::io::DSM_MAX_RANGES;
use nvmeof::nvme::{DsmRange, IdentifyController, StatusCode};

use super::{check_range, ShardError, ShardFuture, ShardInfo, ShardStore};

/// Most logical blocks one Read or Write carries (NLB is a 16-bit, 0's based count).
const MAX_BLOCKS_PER_COMMAND: u64 = 1 << 16;

/// Where a shard lives: a node name, the host settings of the association (address,
/// subsystem and host NQNs, queues, depth, digests, timeouts, reconnect policy) and the
/// namespace.
#[derive(Debug, Clone)]
pub struct NvmeShardConfig {
    /// The cluster map's node id, reported in [`ShardInfo::node`] and in errors.
    pub node: String,
    /// Namespace id within the subsystem.
    pub nsid: u32,
    /// The association's settings; `host.command_timeout` bounds how long a request
    /// waits for a node that is down before it fails as unavailable.
    pub host: HostConfig,
}

impl NvmeShardConfig {
    /// Namespace `nsid` of subsystem `subnqn` at `addr`, with the host library's
    /// defaults (a random host NQN, one I/O queue of depth 32, no digests); adjust
    /// `host` before connecting.
    pub fn new(node: impl Into<String>, addr: SocketAddr, subnqn: &str, nsid: u32) -> Self {
        NvmeShardConfig {
            node: node.into(),
            nsid,
            host: HostConfig::new(addr, subnqn),
        }
    }
}

/// One NVMe/TCP namespace as a [`ShardStore`].
#[derive(Debug)]
pub struct NvmeShard {
    info: ShardInfo,
    ctrl: Controller,
    nsid: u32,
    /// Namespace size in blocks as identified when the shard was opened.
    blocks: u64,
    /// Whether the controller supports Dataset Management (ONCS bit 2).
    dsm: bool,
    /// Bytes per command, from MDTS and the host's cap; refreshed after a reconnect.
    max_transfer: AtomicU32,
    /// The host's reconnect count at the last geometry check.
    checked_at: AtomicUsize,
    /// Round-robin over the I/O queues (the host takes it modulo the queue count).
    next_queue: AtomicUsize,
}

impl NvmeShard {
    /// Connects to the subsystem and opens the namespace. A node that cannot be reached
    /// or refuses us (wrong NQN, host not allowed, no such namespace) is reported as
    /// [`ShardError::Unavailable`] with the reason.
    pub async fn connect(config: NvmeShardConfig) -> Result<NvmeShard, ShardError> {
        let NvmeShardConfig { node, nsid, host } = config;
        let what = format!("{} at {}", host.subnqn, host.addr);
        let ctrl = Controller::connect(host)
            .await
            .map_err(|e| ShardError::Unavailable {
                node: node.clone(),
                reason: format!("connect to {what}: {e}"),
            })?;
        NvmeShard::open(node, ctrl, nsid).await
    }

    /// Opens namespace `nsid` of an existing association (several shards may share one
    /// controller, one per namespace).
    pub async fn open(
        node: impl Into<String>,
        ctrl: Controller,
        nsid: u32,
    ) -> Result<NvmeShard, ShardError> {
        let node = node.into();
        let unavailable = |reason: String| ShardError::Unavailable {
            node: node.clone(),
            reason,
        };
        let ns = ctrl
            .namespace(nsid)
            .await
            .map_err(|e| unavailable(format!("namespace {nsid}: {e}")))?;
        let id: IdentifyController = ctrl
            .identify()
            .await
            .map_err(|e| unavailable(format!("identify controller: {e}")))?;
        let max_transfer = ctrl
            .max_transfer()
            .await
            .map_err(|e| unavailable(format!("transfer limit: {e}")))?;
        if !ns.block_size.is_power_of_two() || ns.block_size < 512 {
            return Err(unavailable(format!(
                "namespace {nsid} has an unusable block size of {} bytes",
                ns.block_size
            )));
        }
        if max_transfer < ns.block_size {
            return Err(unavailable(format!(
                "the controller's transfer limit of {max_transfer} bytes is below one \
                 {}-byte block",
                ns.block_size
            )));
        }
        let capacity_bytes = ns
            .blocks
            .checked_mul(u64::from(ns.block_size))
            .ok_or_else(|| {
                unavailable(format!(
                    "namespace {nsid} size {} x {} bytes overflows",
                    ns.blocks, ns.block_size
                ))
            })?;
        Ok(NvmeShard {
            info: ShardInfo {
                node: node.clone(),
                capacity_bytes,
                block_size: ns.block_size,
                volatile_write_cache: id.vwc & 1 == 1,
            },
            blocks: ns.blocks,
            dsm: id.oncs & IdentifyController::ONCS_DSM != 0,
            max_transfer: AtomicU32::new(max_transfer),
            checked_at: AtomicUsize::new(ctrl.reconnect_count()),
            next_queue: AtomicUsize::new(0),
            ctrl,
            nsid,
        })
    }

    /// The association (for its counters, admin commands, or other namespaces).
    pub fn controller(&self) -> &Controller {
        &self.ctrl
    }

    /// The namespace id.
    pub fn nsid(&self) -> u32 {
        self.nsid
    }

    /// Shuts the controller down cleanly (CC.SHN); other shards on the same
    /// association see it closed.
    pub async fn shutdown(self) -> Result<(), ShardError> {
        let node = self.info.node.clone();
        self.ctrl
            .shutdown()
            .await
            .map_err(|e| ShardError::Unavailable {
                node,
                reason: format!("shutdown: {e}"),
            })
    }

    fn unavailable(&self, reason: String) -> ShardError {
        ShardError::Unavailable {
            node: self.info.node.clone(),
            reason,
        }
    }

    fn classify(&self, e: &HostError, offset: u64, len: u64) -> ShardError {
        classify(&self.info, e, offset, len)
    }

    /// The transfer limit to split by, after making sure the namespace still has the
    /// geometry this shard was opened with if the association was rebuilt since.
    async fn current_limit(&self) -> Result<u32, ShardError> {
        let now = self.ctrl.reconnect_count();
        if now == self.checked_at.load(Ordering::Acquire) {
            return Ok(self.max_transfer.load(Ordering::Acquire));
        }
        let ns = self
            .ctrl
            .namespace(self.nsid)
            .await
            .map_err(|e| self.classify(&e, 0, self.info.capacity_bytes))?;
        if ns.block_size != self.info.block_size || ns.blocks < self.blocks {
            return Err(self.unavailable(format!(
                "after reconnecting, namespace {} is {} blocks of {} bytes, not {} of {}",
                self.nsid, ns.blocks, ns.block_size, self.blocks, self.info.block_size
            )));
        }
        let limit = self
            .ctrl
            .max_transfer()
            .await
            .map_err(|e| self.classify(&e, 0, self.info.capacity_bytes))?;
        if limit < self.info.block_size {
            return Err(self.unavailable(format!(
                "after reconnecting, the transfer limit of {limit} bytes is below one block"
            )));
        }
        self.max_transfer.store(limit, Ordering::Release);
        self.checked_at.store(now, Ordering::Release);
        Ok(limit)
    }

    fn queue(&self) -> usize {
        self.next_queue.fetch_add(1, Ordering::Relaxed)
    }

    async fn do_read(&self, offset: u64, len: u64) -> Result<Vec<u8>, ShardError> {
        check_range(&self.info, offset, len)?;
        let size = usize::try_from(len).map_err(|_| ShardError::OutOfRange {
            node: self.info.node.clone(),
            offset,
            len,
            capacity: self.info.capacity_bytes,
        })?;
        let limit = self.current_limit().await?;
        let plan = pieces(self.info.block_size, offset, len, limit);
        let reads = plan.iter().map(|p| async move {
            self.ctrl
                .read(self.queue(), self.nsid, p.lba, p.blocks)
                .await
                .map_err(|e| self.classify(&e, p.offset, p.len))
        });
        let mut parts = join_all(reads).await;
        if parts.len() == 1 {
            // One command: hand its buffer over (no copy when the host holds the only
            // reference to it).
            let data = parts.swap_remove(0)?;
            return self.exact(Vec::from(data), offset, size);
        }
        let mut out = Vec::with_capacity(size);
        for part in parts {
            out.extend_from_slice(&part?);
        }
        self.exact(out, offset, size)
    }

    /// A controller that returned fewer or more bytes than asked broke the protocol;
    /// the host checks this, but the engine must never see a short read.
    fn exact(&self, data: Vec<u8>, offset: u64, size: usize) -> Result<Vec<u8>, ShardError> {
        if data.len() == size {
            Ok(data)
        } else {
            Err(self.unavailable(format!(
                "read at byte {offset} returned {} bytes, not {size}",
                data.len()
            )))
        }
    }

    async fn do_write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), ShardError> {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        check_range(&self.info, offset, len)?;
        let limit = self.current_limit().await?;
        let data = Bytes::from(data);
        let total = data.len();
        let plan = pieces(self.info.block_size, offset, len, limit);
        let writes = plan.iter().map(|p| {
            // Byte positions within `data`, which check_range bounded by its length.
            let start = usize::try_from(p.offset - offset).unwrap_or(usize::MAX);
            let end = usize::try_from(p.len)
                .ok()
                .and_then(|n| start.checked_add(n))
                .unwrap_or(usize::MAX);
            let bytes = (end <= data.len()).then(|| data.slice(start..end));
            async move {
                let Some(bytes) = bytes else {
                    return Err(self.unavailable(format!(
                        "write piece {start}..{end} outside the {total}-byte buffer"
                    )));
                };
                self.ctrl
                    .write(self.queue(), self.nsid, p.lba, bytes, fua)
                    .await
                    .map_err(|e| self.classify(&e, p.offset, p.len))
            }
        });
        join_all(writes).await.into_iter().collect()
    }

    async fn do_flush(&self) -> Result<(), ShardError> {
        self.current_limit().await?;
        self.ctrl
            .flush(self.queue(), self.nsid)
            .await
            .map_err(|e| self.classify(&e, 0, self.info.capacity_bytes))
    }

    async fn do_deallocate(&self, offset: u64, len: u64) -> Result<(), ShardError> {
        check_range(&self.info, offset, len)?;
        if !self.dsm {
            // Deallocation is advisory and the contents of a freed range unspecified:
            // without Dataset Management there is nothing to tell the node.
            return Ok(());
        }
        self.current_limit().await?;
        let block = u64::from(self.info.block_size);
        let mut ranges = Vec::new();
        let (mut lba, end) = (offset / block, offset / block + len / block);
        while lba < end {
            let n = (end - lba).min(u64::from(u32::MAX));
            ranges.push(DsmRange {
                cattr: 0,
                nlb: u32::try_from(n).unwrap_or(u32::MAX),
                slba: lba,
            });
            lba += n;
        }
        let commands = ranges.chunks(DSM_MAX_RANGES).map(|list| async move {
            let first = list.first().map_or(offset, |r| r.slba * block);
            let bytes = list.iter().map(|r| u64::from(r.nlb) * block).sum::<u64>();
            self.ctrl
                .deallocate(self.queue(), self.nsid, list)
                .await
                .map_err(|e| self.classify(&e, first, bytes))
        });
        join_all(commands).await.into_iter().collect()
    }
}

/// Maps a host error for the command covering `offset..offset+len` to the class the
/// engine acts on (see the module documentation).
fn classify(info: &ShardInfo, e: &HostError, offset: u64, len: u64) -> ShardError {
    let node = info.node.clone();
    match e.kind() {
        ErrorKind::Media => ShardError::Media {
            node,
            offset,
            len,
            reason: e.to_string(),
        },
        ErrorKind::InvalidRequest
            if e.status().is_some_and(|s| {
                s.code == StatusCode::LBA_OUT_OF_RANGE || s.code == StatusCode::CAPACITY_EXCEEDED
            }) =>
        {
            ShardError::OutOfRange {
                node,
                offset,
                len,
                capacity: info.capacity_bytes,
            }
        }
        ErrorKind::Path | ErrorKind::Timeout | ErrorKind::Closed => ShardError::Unavailable {
            node,
            reason: e.to_string(),
        },
        ErrorKind::InvalidRequest | ErrorKind::Controller => ShardError::Unavailable {
            node,
            reason: format!("the node refused the request: {e}"),
        },
    }
}

/// Cuts a byte range that [`check_range`] accepted into commands: each at most
/// `limit` bytes and 65 536 blocks, in order, covering the range exactly.
fn pieces(block_size: u32, offset: u64, len: u64, limit: u32) -> Vec<Piece> {
    let block = u64::from(block_size.max(1));
    let per = (u64::from(limit) / block).clamp(1, MAX_BLOCKS_PER_COMMAND);
    // The range is whole blocks ending within the namespace (whose byte size fits a
    // u64), so none of this arithmetic can overflow.
    let mut lba = offset / block;
    let end = lba + len / block;
    let mut out = Vec::new();
    while lba < end {
        let n = per.min(end - lba);
        out.push(Piece {
            lba,
            blocks: u32::try_from(n).unwrap_or(u32::MAX),
            offset: lba * block,
            len: n * block,
        });
        lba += n;
    }
    out
}

/// One command's share of a request.
#[derive(Debug, Clone, Copy)]
struct Piece {
    lba: u64,
    blocks: u32,
    offset: u64,
    len: u64,
}

impl ShardStore for NvmeShard {
    fn info(&self) -> &ShardInfo {
        &self.info
    }

    fn read(&self, offset: u64, len: u64) -> ShardFuture<'_, Vec<u8>> {
        Box::pin(self.do_read(offset, len))
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> ShardFuture<'_, ()> {
        Box::pin(self.do_write(offset, data, fua))
    }

    fn flush(&self) -> ShardFuture<'_, ()> {
        Box::pin(self.do_flush())
    }

    fn deallocate(&self, offset: u64, len: u64) -> ShardFuture<'_, ()> {
        Box::pin(self.do_deallocate(offset, len))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nvmeof::nvme::Status;

    use super::*;

    fn info() -> ShardInfo {
        ShardInfo {
            node: "n1".into(),
            capacity_bytes: 1 << 20,
            block_size: 4096,
            volatile_write_cache: true,
        }
    }

    fn status(code: StatusCode) -> HostError {
        HostError::Status {
            command: "read",
            status: Status::new(code),
        }
    }

    #[test]
    fn pieces_cover_the_range_within_the_limits() {
        // 1 MiB at 128 KiB MDTS: 8 commands of 32 blocks.
        let p = pieces(4096, 8192, 1 << 20, 128 << 10);
        assert_eq!(p.len(), 8);
        for (i, piece) in p.iter().enumerate() {
            let i = u64::try_from(i).unwrap_or(u64::MAX);
            assert_eq!(piece.lba, 2 + i * 32);
            assert_eq!(piece.blocks, 32);
            assert_eq!(piece.offset, 8192 + i * (128 << 10));
            assert_eq!(piece.len, 128 << 10);
        }
        // A short tail.
        let p = pieces(512, 0, 5 * 512, 2048);
        let shape: Vec<_> = p
            .iter()
            .map(|x| (x.lba, x.blocks, x.offset, x.len))
            .collect();
        assert_eq!(shape, [(0, 4, 0, 2048), (4, 1, 2048, 512)]);
        // No transfer limit to speak of: still at most 65 536 blocks per command.
        let p = pieces(512, 0, 3 * 65536 * 512, u32::MAX);
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|x| x.blocks == 65536 && x.len == 65536 * 512));
        assert_eq!(p[2].lba, 2 * 65536);
        // A single block.
        let p = pieces(4096, 4096, 4096, 4096);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].lba, p[0].blocks), (1, 1));
    }

    #[test]
    fn media_and_integrity_statuses_are_media_errors_with_the_command_range() {
        for code in [
            StatusCode::UNRECOVERED_READ_ERROR,
            StatusCode::WRITE_FAULT,
            StatusCode::GUARD_CHECK_ERROR,
            StatusCode::DATA_TRANSFER_ERROR,
        ] {
            let e = classify(&info(), &status(code), 8192, 4096);
            assert!(
                matches!(e, ShardError::Media { offset: 8192, len: 4096, ref node, .. } if node == "n1"),
                "{code:?} gave {e:?}"
            );
        }
    }

    #[test]
    fn refused_ranges_are_out_of_range() {
        for code in [StatusCode::LBA_OUT_OF_RANGE, StatusCode::CAPACITY_EXCEEDED] {
            let e = classify(&info(), &status(code), 4096, 8192);
            assert!(
                matches!(
                    e,
                    ShardError::OutOfRange {
                        offset: 4096,
                        len: 8192,
                        capacity: 1_048_576,
                        ..
                    }
                ),
                "{code:?} gave {e:?}"
            );
        }
    }

    #[test]
    fn path_failures_timeouts_and_refusals_are_unavailable() {
        let cases = [
            HostError::Path("connection reset".into()),
            HostError::Path("still reconnecting".into()),
            HostError::Protocol("bad PDU".into()),
            HostError::Timeout {
                command: "write",
                after: Duration::from_secs(1),
            },
            HostError::Closed("gave up reconnecting".into()),
            HostError::Setup("host not allowed".into()),
            HostError::InvalidRequest("namespace 1 is not active".into()),
            status(StatusCode::HOST_PATH_ERROR),
            status(StatusCode::TRANSIENT_TRANSPORT_ERROR),
            status(StatusCode::NAMESPACE_NOT_READY),
            status(StatusCode::INTERNAL_ERROR),
            status(StatusCode::INVALID_NAMESPACE),
        ];
        for e in cases {
            let got = classify(&info(), &e, 0, 4096);
            assert!(
                matches!(got, ShardError::Unavailable { ref reason, .. } if reason.contains(&e.to_string())),
                "{e} gave {got:?}"
            );
            assert!(got.is_transient());
        }
    }
}
