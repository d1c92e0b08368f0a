//! The vhost-user side of one connection: features, config space and the mapping of
//! virtqueues to vring worker threads and reactors.
//!
//! One worker thread per queue (so a busy queue never delays another's kicks), and queue
//! `i` completes on reactor `i mod n`: a multiqueue guest spreads its I/O over the
//! DPU's cores the way the NVMe driver spreads queues over CPUs.
//!
//! A volume can grow under an open connection. The config space always reports the
//! device's current capacity, and when the front-end negotiated `BACKEND_REQ` (QEMU
//! does) the back-end tells it with `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the
//! backend request channel: QEMU then reads the config space again and, when the
//! capacity changed (the only field it takes from such a notice), raises the guest's
//! config interrupt, on which virtio_blk resizes the disk. Without that channel the
//! new size is what the next `GET_CONFIG` returns (a front-end that connects again).
//!
//! QEMU drops a notice that arrives while the device is not started (the guest driver
//! not loaded yet), and a QEMU that reconnects does not read the config space again.
//! So the export remembers the capacity a front-end last read, and when a front-end
//! starts the device (`SET_MEM_TABLE`) while that differs from the device's size, the
//! notice is sent then.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::runtime::Handle;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
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
    backend_req: Channel,
    /// The capacity (sectors) a front-end of this export last read from the config
    /// space, across connections; [`NOT_READ`] before any did.
    announced: Arc<AtomicU64>,
}

/// `announced` before any front-end read the capacity.
pub(crate) const NOT_READ: u64 = u64::MAX;

/// What became of a config-change notice (sent means written to the socket: no
/// reply is asked for).
#[derive(Debug)]
pub(crate) enum Notice {
    /// Sent on the backend request channel.
    Sent,
    /// The front-end set up no backend request channel (it did not negotiate
    /// `BACKEND_REQ`, or has not sent the channel yet).
    NoChannel,
    /// Sending failed (the front-end went away); the channel is dropped.
    Failed(io::Error),
}

/// The backend request channel, once the front-end has sent it
/// (`vhost::vhost_user::Backend` is not `Debug`).
#[derive(Default)]
struct Channel(Mutex<Option<Backend>>);

impl Channel {
    fn get(&self) -> Option<Backend> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, backend: Option<Backend>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = backend;
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.get().is_some() {
            "Channel(open)"
        } else {
            "Channel(none)"
        })
    }
}

impl BlkBackend {
    pub(crate) fn new(
        handler: Arc<Handler>,
        mem: Mem,
        queues: usize,
        queue_size: u16,
        reactors: Vec<Handle>,
        volatile_cache: bool,
        announced: Arc<AtomicU64>,
    ) -> Self {
        // Two descriptors of every chain are the header and the status.
        let seg_max = u32::from(queue_size.saturating_sub(2).max(1));
        let limits = handler.limits();
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
            backend_req: Channel::default(),
            announced,
        }
    }

    /// Sends a config-change notice when the capacity a front-end last read differs
    /// from the device's: one dropped (the device was not started) or never sent (the
    /// front-end was disconnected at the resize). QEMU ignores a notice whose capacity
    /// it already has, so a spare one costs a `GET_CONFIG`.
    fn announce_if_stale(&self) {
        let seen = self.announced.load(Ordering::SeqCst);
        let now = self.handler.limits().size / SECTOR;
        if seen == NOT_READ || seen == now {
            return;
        }
        match self.notify_config_change() {
            Notice::Sent => tracing::info!(
                read = seen,
                sectors = now,
                "vhost-user-blk: the front-end has an old capacity; config-change notice sent as the device starts"
            ),
            Notice::NoChannel => {}
            Notice::Failed(e) => tracing::warn!(
                error = %e,
                "vhost-user-blk: config-change notice at device start not sent"
            ),
        }
    }

    /// Tells the front-end that the config space changed (the capacity, when the
    /// volume grew), if it gave a backend request channel. Blocks only on the socket
    /// write of one message header: no reply is asked for (see `set_backend_req_fd`).
    pub(crate) fn notify_config_change(&self) -> Notice {
        // Cloned out: the send does not hold the slot's lock.
        let Some(channel) = self.backend_req.get() else {
            return Notice::NoChannel;
        };
        match channel.handle_config_change() {
            Ok(_) => Notice::Sent,
            Err(e) => {
                // A broken channel stays broken; later notices report NoChannel.
                self.backend_req.set(None);
                Notice::Failed(e)
            }
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
        // BACKEND_REQ: the channel config-change notices go over (a grown volume).
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        tracing::debug!("vhost-user-blk: backend request channel set up");
        // With REPLY_ACK negotiated (QEMU does; the library always offers it) the
        // library would ask for a reply to every notice and wait for it. QEMU answers
        // from its main loop, which may itself be waiting for this back-end (a notice
        // sent while it handles SET_MEM_TABLE would deadlock both), so notices go
        // without asking for a reply (`need_reply` is the sender's choice).
        backend.set_reply_ack_flag(false);
        self.backend_req.set(Some(backend));
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config_space();
        let (Ok(offset), Ok(size)) = (usize::try_from(offset), usize::try_from(size)) else {
            return Vec::new();
        };
        if offset == 0 && size >= 8 {
            // What the front-end now holds as the capacity.
            let mut capacity = [0u8; 8];
            capacity.copy_from_slice(&c[..8]);
            self.announced
                .store(u64::from_le_bytes(capacity), Ordering::SeqCst);
        }
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
        // QEMU sends the memory table as it starts the device: a notice it dropped
        // before, or one a reconnecting QEMU never got, is sent now.
        self.announce_if_stale();
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
