//! The vhost-user side of one connection: features, config space and the mapping of
//! virtqueues to vring worker threads and reactors.
//!
//! One worker thread per queue (so a busy queue never delays another's kicks), and queue
//! `i` completes on reactor `i mod n`: a multiqueue guest spreads its I/O over the
//! DPU's cores the way the NVMe driver spreads queues over CPUs.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::handler::{Handler, Mem, Vring};
use super::request::SECTOR;

/// Offset of `writeback` in `struct virtio_blk_config`.
const WRITEBACK_OFFSET: usize = 32;
/// Bytes of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding.
pub(crate) const CONFIG_BYTES: usize = 60;
/// How long `GET_VRING_BASE` or a reset waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// One connection's back-end.
#[derive(Debug)]
pub(crate) struct BlkBackend {
    handler: Arc<Handler>,
    mem: Mem,
    queues: usize,
    queue_size: u16,
    seg_max: u32,
    size_max: u32,
    reactors: Vec<Handle>,
    event_idx: AtomicBool,
    writeback: AtomicBool,
    volatile_cache: bool,
}

impl BlkBackend {
    pub(crate) fn new(
        handler: Arc<Handler>,
        mem: Mem,
        queues: usize,
        queue_size: u16,
        reactors: Vec<Handle>,
        volatile_cache: bool,
    ) -> Self {
        // Two descriptors of every chain are the header and the status.
        let seg_max = u32::from(queue_size.saturating_sub(2).max(1));
        let limits = *handler.limits();
        // size_max * seg_max stays within the largest request the handler accepts.
        let size_max = u32::try_from(limits.max_io_bytes / u64::from(seg_max))
            .unwrap_or(u32::MAX)
            .max(limits.block_size);
        Self {
            handler,
            mem,
            queues: queues.max(1),
            queue_size,
            seg_max,
            size_max,
            reactors,
            event_idx: AtomicBool::new(false),
            writeback: AtomicBool::new(volatile_cache),
            volatile_cache,
        }
    }

    /// `struct virtio_blk_config` as this device fills it.
    pub(crate) fn config_space(&self) -> [u8; CONFIG_BYTES] {
        let l = self.handler.limits();
        let mut c = [0u8; CONFIG_BYTES];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &(l.size / SECTOR).to_le_bytes());
        put(8, &self.size_max.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        put(20, &l.block_size.to_le_bytes());
        put(
            WRITEBACK_OFFSET,
            &[u8::from(self.writeback.load(Ordering::Relaxed))],
        );
        put(
            34,
            &u16::try_from(self.queues).unwrap_or(u16::MAX).to_le_bytes(),
        );
        if !l.read_only {
            put(36, &l.max_discard_sectors.to_le_bytes());
            put(40, &l.max_discard_seg.to_le_bytes());
            put(44, &(l.block_size / 512).to_le_bytes());
            put(48, &l.max_write_zeroes_sectors.to_le_bytes());
            put(52, &l.max_write_zeroes_seg.to_le_bytes());
            // Zeroes written may be deallocated: they read back as zeroes either way.
            put(56, &[1]);
        }
        c
    }

    fn reactor(&self, q: usize) -> Option<&Handle> {
        self.reactors.get(q % self.reactors.len().max(1))
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        let bit = |b: u32| 1u64 << b;
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_CONFIG_WCE)
            | bit(VIRTIO_BLK_F_MQ);
        if self.handler.limits().read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config_space();
        let (Ok(offset), Ok(size)) = (usize::try_from(offset), usize::try_from(size)) else {
            return Vec::new();
        };
        // Fields past the ones this device fills (secure erase, zoned) read as zero.
        (offset..offset.saturating_add(size))
            .map(|i| c.get(i).copied().unwrap_or(0))
            .collect()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback byte is writable (VIRTIO_BLK_F_CONFIG_WCE).
        if usize::try_from(offset).ok() == Some(WRITEBACK_OFFSET) && buf.len() == 1 {
            // Write-through only changes what the driver does; a device without a
            // volatile cache is write-through whatever the byte says.
            self.writeback
                .store(buf[0] != 0 && self.volatile_cache, Ordering::Relaxed);
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "only the writeback byte of the virtio-blk config space is writable",
        ))
    }

    fn update_memory(&self, _mem: Mem) -> io::Result<()> {
        // The vrings and this back-end share one GuestMemoryAtomic; nothing to swap.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues.min(64)).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .map_err(|e| tracing::error!(error = %e, "vhost-user-blk: no exit eventfd"))
            .ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let q = usize::try_from(queue_index).unwrap_or(usize::MAX);
        if !self.handler.wait_idle(Some(q), DRAIN_TIMEOUT) {
            tracing::error!(
                queue = q,
                "vhost-user-blk: requests still in flight when the ring was stopped"
            );
        }
        Ok(())
    }

    fn reset_device(&self) {
        if !self.handler.wait_idle(None, DRAIN_TIMEOUT) {
            tracing::error!("vhost-user-blk: requests still in flight at device reset");
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unexpected epoll event set {evset:?}"),
            ));
        }
        // One queue per worker thread: thread i serves queue i.
        let q = thread_id;
        let vring = vrings.get(usize::from(device_event)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no vring for event {device_event}"),
            )
        })?;
        let reactor = self
            .reactor(q)
            .ok_or_else(|| io::Error::other("no reactor to run requests on"))?;
        self.handler.process_queue(
            q,
            vring,
            &self.mem,
            self.event_idx.load(Ordering::Relaxed),
            reactor,
        );
        Ok(())
    }
}
