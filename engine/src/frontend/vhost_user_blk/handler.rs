//! The data path of one connection: pops chains off a vring on the vring's worker
//! thread, hands each valid request to a reactor, and completes it from there.
//!
//! The worker thread never waits for the device: it parses (and copies write payloads
//! out of guest memory), spawns the request on the queue's reactor and goes back to the
//! ring, so a slow volume never stalls the vring or the other queues. The reactor task
//! writes read data and the status byte into guest memory, puts the head on the used
//! ring and signals the guest when EVENT_IDX (or the no-interrupt flag) says so.
//!
//! Completions touch guest memory only while the connection is open (`open` read lock);
//! the disconnect path takes the write lock, so once it returns no completion of the old
//! connection writes into memory the next connection may share. `GET_VRING_BASE` and
//! device reset wait for the queue's requests in flight (`wait_idle`), because the ring
//! state QEMU reads back must account for every request the back-end took.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use vhost_user_backend::{VringMutex, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::request::{self, Limits, Op, Segment, S_IOERR};
use crate::frontend::{BlockDevice, DeviceError};

/// Guest memory as the vrings see it.
pub(crate) type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
/// One virtqueue with its kick and call eventfds.
pub(crate) type Vring = VringMutex<Mem>;

/// Counters of one export, across connections.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub connected: AtomicU64,
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub errors: AtomicU64,
    pub malformed: AtomicU64,
}

/// The state of one connection's data path, shared by its queues.
#[derive(Debug)]
pub(crate) struct Handler {
    device: Arc<dyn BlockDevice>,
    limits: Limits,
    id: Vec<u8>,
    counters: Arc<Counters>,
    open: RwLock<bool>,
    inflight: Mutex<Vec<u64>>,
    idle: Condvar,
}

/// What a finished request leaves to write back.
struct Done {
    code: u8,
    data: Option<(Vec<Segment>, Vec<u8>)>,
}

impl Done {
    fn status(code: u8) -> Self {
        Self { code, data: None }
    }
}

impl Handler {
    /// A handler for `queues` queues over `device`; `id` is what GET_ID returns (at most
    /// 20 bytes are used).
    pub(crate) fn new(
        device: Arc<dyn BlockDevice>,
        limits: Limits,
        id: &str,
        queues: usize,
        counters: Arc<Counters>,
    ) -> Self {
        let mut id = id.as_bytes().to_vec();
        id.truncate(20);
        Self {
            device,
            limits,
            id,
            counters,
            open: RwLock::new(true),
            inflight: Mutex::new(vec![0; queues]),
            idle: Condvar::new(),
        }
    }

    /// The limits the config space advertises and requests are checked against. The
    /// size is the device's now, in whole blocks: a volume grown while the connection
    /// is open accepts requests past its old end at once, and the config space reports
    /// the new capacity to the next `GET_CONFIG` (see `BlkBackend::notify_config_change`).
    pub(crate) fn limits(&self) -> Limits {
        let size = self.device.size_bytes();
        Limits {
            size: size - size % u64::from(self.limits.block_size.max(1)),
            ..self.limits
        }
    }

    /// Takes every available chain off queue `q` and starts it on `reactor`.
    pub(crate) fn process_queue(
        self: &Arc<Self>,
        q: usize,
        vring: &Vring,
        mem: &Mem,
        event_idx: bool,
        reactor: &Handle,
    ) {
        let limits = self.limits();
        loop {
            if event_idx {
                // Errors here mean a broken ring; the pops below then find nothing.
                let _ = vring.disable_notification();
            }
            let mut refused = false;
            loop {
                let guard = mem.memory();
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(guard.clone());
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let parsed = request::parse(
                    head,
                    chain.map(|d| (d.addr(), d.len(), d.is_write_only())),
                    &guard,
                    &limits,
                );
                self.counters.requests.fetch_add(1, Ordering::Relaxed);
                match parsed.op {
                    Err(code) => {
                        self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(
                            queue = q,
                            head,
                            reason = parsed.reason.unwrap_or(""),
                            "virtio-blk request refused"
                        );
                        self.write_back(
                            vring,
                            &guard,
                            head,
                            parsed.status,
                            Done::status(code),
                            false,
                        );
                        refused = true;
                    }
                    Ok(op) => {
                        self.begin(q);
                        let me = Arc::clone(self);
                        let vring = vring.clone();
                        let status = parsed.status;
                        reactor.spawn(async move {
                            let done = me.execute(op).await;
                            me.write_back(&vring, &guard, head, status, done, true);
                            me.end(q);
                        });
                    }
                }
            }
            if refused {
                signal(vring);
            }
            if !event_idx {
                break;
            }
            // Re-enabling reports whether the driver added chains meanwhile.
            match vring.enable_notification() {
                Ok(true) => continue,
                _ => break,
            }
        }
    }

    async fn execute(&self, op: Op) -> Done {
        let d = &*self.device;
        let result: Result<Done, DeviceError> = match op {
            Op::Nothing => Ok(Done::status(0)),
            Op::Read { offset, len, dest } => d.read(offset, len).await.map(|data| {
                self.counters.read_bytes.fetch_add(len, Ordering::Relaxed);
                Done {
                    code: 0,
                    data: Some((dest, data)),
                }
            }),
            Op::Write { offset, data } => {
                let n = data.len() as u64;
                d.write(offset, data, false).await.map(|()| {
                    self.counters.written_bytes.fetch_add(n, Ordering::Relaxed);
                    Done::status(0)
                })
            }
            Op::Flush => d.flush().await.map(|()| Done::status(0)),
            Op::GetId { dest } => {
                let mut id = vec![0u8; 20];
                id[..self.id.len()].copy_from_slice(&self.id);
                let n: u64 = dest.iter().map(|s| u64::from(s.len)).sum();
                id.truncate(usize::try_from(n).unwrap_or(20).min(20));
                Ok(Done {
                    code: 0,
                    data: Some((dest, id)),
                })
            }
            Op::Discard { ranges } => {
                let mut r = Ok(());
                for (offset, len) in ranges {
                    r = d.discard(offset, len).await;
                    if r.is_err() {
                        break;
                    }
                }
                r.map(|()| Done::status(0))
            }
            Op::WriteZeroes { ranges, .. } => {
                let mut r = Ok(());
                for (offset, len) in ranges {
                    r = d.write_zeroes(offset, len, false).await;
                    if r.is_err() {
                        break;
                    }
                }
                r.map(|()| Done::status(0))
            }
        };
        result.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "virtio-blk request failed on the device");
            Done::status(S_IOERR)
        })
    }

    /// Writes the data and status of a finished request, returns its head to the guest
    /// and, with `notify`, signals it; nothing once the connection is closed.
    fn write_back(
        &self,
        vring: &Vring,
        mem: &GuestMemoryMmap,
        head: u16,
        status: Option<GuestAddress>,
        done: Done,
        notify: bool,
    ) {
        let open = self.open.read().unwrap_or_else(PoisonError::into_inner);
        if !*open {
            return;
        }
        let mut code = done.code;
        let mut written: u64 = 0;
        if let Some((dest, data)) = &done.data {
            match request::scatter(mem, dest, data) {
                Some(n) => written = n,
                None => code = S_IOERR,
            }
        }
        if code != 0 {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(addr) = status {
            if mem.write_obj(code, addr).is_ok() {
                written += 1;
            }
        }
        let len = u32::try_from(written).unwrap_or(u32::MAX);
        if let Err(e) = vring.add_used(head, len) {
            tracing::warn!(head, error = %e, "virtio-blk: cannot return a chain to the used ring");
        }
        if notify {
            signal(vring);
        }
    }

    fn begin(&self, q: usize) {
        let mut n = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = n.get_mut(q) {
            *c += 1;
        }
    }

    fn end(&self, q: usize) {
        let mut n = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = n.get_mut(q) {
            *c = c.saturating_sub(1);
        }
        self.idle.notify_all();
    }

    /// Requests in flight on queue `q` (all queues with `None`).
    pub(crate) fn in_flight(&self, q: Option<usize>) -> u64 {
        let n = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        match q {
            Some(q) => n.get(q).copied().unwrap_or(0),
            None => n.iter().sum(),
        }
    }

    /// Waits until queue `q` (all queues with `None`) has nothing in flight, at most
    /// `timeout`; returns whether it is idle.
    pub(crate) fn wait_idle(&self, q: Option<usize>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut n = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let busy = match q {
                Some(q) => n.get(q).copied().unwrap_or(0),
                None => n.iter().sum(),
            };
            if busy == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            n = self
                .idle
                .wait_timeout(n, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Ends the connection's data path: no completion writes guest memory after this
    /// returns. Then waits (at most `timeout`) for the device calls still running, so
    /// the next connection starts with none of the old one's I/O in flight.
    pub(crate) fn close(&self, timeout: Duration) -> bool {
        *self.open.write().unwrap_or_else(PoisonError::into_inner) = false;
        self.wait_idle(None, timeout)
    }
}

/// Tells the driver about used chains if it wants to hear (EVENT_IDX or flags).
fn signal(vring: &Vring) {
    let mut state = vring.get_mut();
    if state.needs_notification().unwrap_or(true) {
        // A failed eventfd write means the front-end is going away.
        let _ = state.signal_used_queue();
    }
}
