//! Subsystems, namespaces and controllers: the state that outlives one TCP
//! connection.
//!
//! A controller is created by an admin-queue Connect and joined by I/O-queue Connects
//! that name its controller id, so it is the one object every connection of a host
//! association shares. Everything here is touched on the control path (connect,
//! property access, keep-alive) or through atomics; the I/O path reads only
//! namespace data that is immutable or atomic (the size, which a resize changes) and
//! bumps counters, so no lock is ever held across an await. Asynchronous events are
//! queued here, per controller, because the resize that causes them happens outside
//! any connection; the admin queue's connection is woken to report them.

use crate::backend::Backend;
use crate::nvme::{CcRegister, CstsRegister, ErrorLogEntry, Status};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// Lock a mutex, recovering from poisoning (a panicked holder cannot leave these
/// simple maps in a state worse than stale).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// 128-bit FNV-1a: a stable (across builds and Rust versions) hash for identifiers
/// derived from configuration.
pub(crate) fn fnv128(parts: &[&[u8]]) -> [u8; 16] {
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    let prime: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    for p in parts {
        for &b in p.iter().chain(std::iter::once(&0xffu8)) {
            h ^= u128::from(b);
            h = h.wrapping_mul(prime);
        }
    }
    h.to_be_bytes()
}

/// One namespace of a subsystem.
#[derive(Debug)]
pub(crate) struct Namespace {
    pub nsid: u32,
    pub backend: Arc<dyn Backend>,
    pub nguid: [u8; 16],
    pub uuid: [u8; 16],
    /// Size in logical blocks: read by every I/O command's range check and by
    /// Identify Namespace, changed only by [`Subsystem::namespace_resized`].
    pub blocks: AtomicU64,
    pub block_size: u32,
}

impl Namespace {
    /// Size in logical blocks now.
    pub fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Acquire)
    }
}

/// What kind of subsystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubsystemKind {
    Discovery,
    Nvm,
}

/// An NVM or discovery subsystem.
#[derive(Debug)]
pub(crate) struct Subsystem {
    pub kind: SubsystemKind,
    pub nqn: String,
    pub serial: String,
    pub model: String,
    /// Sorted by NSID.
    pub namespaces: Vec<Namespace>,
    pub allowed_hosts: HashSet<String>,
    pub allow_any_host: bool,
    pub controllers: Mutex<HashMap<u16, Arc<Controller>>>,
    next_cntlid: AtomicU16,
    /// I/O counters over every controller the subsystem had (they outlive each one).
    pub io: IoCounters,
}

/// I/O-queue counters of a subsystem (see `super::SubsystemStats`).
#[derive(Debug, Default)]
pub(crate) struct IoCounters {
    pub commands: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
}

impl Subsystem {
    pub fn new(
        kind: SubsystemKind,
        nqn: String,
        serial: Option<String>,
        model: String,
        namespaces: Vec<Namespace>,
        allowed_hosts: HashSet<String>,
        allow_any_host: bool,
    ) -> Self {
        let serial = serial.unwrap_or_else(|| {
            let h = fnv128(&[b"serial", nqn.as_bytes()]);
            h[..10].iter().map(|b| format!("{b:02x}")).collect()
        });
        Self {
            kind,
            nqn,
            serial,
            model,
            namespaces,
            allowed_hosts,
            allow_any_host,
            controllers: Mutex::new(HashMap::new()),
            next_cntlid: AtomicU16::new(1),
            io: IoCounters::default(),
        }
    }

    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.kind == SubsystemKind::Discovery
            || self.allow_any_host
            || self.allowed_hosts.contains(hostnqn)
    }

    pub fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        self.namespaces
            .binary_search_by_key(&nsid, |n| n.nsid)
            .ok()
            .map(|i| &self.namespaces[i])
    }

    /// Highest NSID (Identify Controller NN).
    pub fn max_nsid(&self) -> u32 {
        self.namespaces.last().map_or(0, |n| n.nsid)
    }

    /// A free controller id in 1..=0xFFEF (0xFFF0.. are reserved).
    fn alloc_cntlid(&self, taken: &HashMap<u16, Arc<Controller>>) -> Option<u16> {
        for _ in 0..0xFFEF {
            let id = self.next_cntlid.fetch_add(1, Ordering::Relaxed);
            let id = if (1..=0xFFEF).contains(&id) {
                id
            } else {
                self.next_cntlid.store(2, Ordering::Relaxed);
                1
            };
            if !taken.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    /// Create and register a controller; `None` if every id is in use.
    pub fn create_controller(
        self: &Arc<Self>,
        hostnqn: String,
        hostid: [u8; 16],
        kato_ms: u32,
        max_io_queues: u16,
    ) -> Option<Arc<Controller>> {
        let mut map = lock(&self.controllers);
        let cntlid = self.alloc_cntlid(&map)?;
        let (teardown, _) = watch::channel(None);
        let (io_reset, _) = watch::channel(0u64);
        let c = Arc::new(Controller {
            cntlid,
            subsys: Arc::clone(self),
            hostnqn,
            hostid,
            cc: AtomicU32::new(0),
            csts: AtomicU32::new(0),
            kato_ms: AtomicU32::new(kato_ms),
            kato_changed: Notify::new(),
            last_keep_alive: Mutex::new(Instant::now()),
            traffic_seen: AtomicBool::new(false),
            max_io_queues,
            granted_io_queues: AtomicU16::new(max_io_queues),
            io_qids: Mutex::new(HashSet::new()),
            aec: AtomicU32::new(0),
            events: Mutex::new(AsyncEvents::default()),
            event_queued: Notify::new(),
            write_cache: AtomicBool::new(true),
            errors: Mutex::new(VecDeque::new()),
            error_count: AtomicU64::new(0),
            stats: Stats::default(),
            created: Instant::now(),
            teardown,
            io_reset,
        });
        map.insert(cntlid, Arc::clone(&c));
        Some(c)
    }

    pub fn controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        lock(&self.controllers).get(&cntlid).cloned()
    }

    /// Re-read namespace `nsid`'s size from its backend. When it changed, every
    /// controller of the subsystem records the NSID in its Changed Namespace List and
    /// is sent a Namespace Attribute Changed notice (if it enabled them and the notice
    /// is not masked). `None` if there is no such namespace; else whether the size
    /// changed.
    pub fn namespace_resized(&self, nsid: u32) -> Option<bool> {
        let ns = self.namespace(nsid)?;
        let blocks = ns.backend.size() / u64::from(ns.block_size);
        if ns.blocks.swap(blocks, Ordering::AcqRel) == blocks {
            return Some(false);
        }
        let ctrls: Vec<Arc<Controller>> = lock(&self.controllers).values().cloned().collect();
        for c in ctrls {
            c.namespace_changed(nsid);
        }
        Some(true)
    }
}

/// Why a controller went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TeardownReason {
    /// The admin queue disconnected or its connection closed.
    AdminGone,
    /// No Keep Alive within KATO.
    KeepAliveExpired,
    /// The subsystem stopped being served.
    SubsystemRemoved,
}

/// I/O counters for the SMART log.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub read_cmds: AtomicU64,
    pub write_cmds: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub media_errors: AtomicU64,
}

/// Error log depth (ELPE + 1).
pub(crate) const ERROR_LOG_ENTRIES: usize = 64;

/// Asynchronous Event Configuration (Set Features 0Bh) bit 8: Namespace Attribute
/// Notices. Identify Controller OAES reports the same bit.
pub(crate) const AEC_NS_ATTR: u32 = 1 << 8;

/// Completion DW0 of a Namespace Attribute Changed notice: event type 2h (Notice),
/// information 00h (Namespace Attribute Changed), log page 04h (Changed Namespace
/// List).
pub(crate) const AEN_NS_ATTR_CHANGED: u32 = 0x0004_0002;

/// Entries in the Changed Namespace List log page (4 KiB of NSIDs).
pub(crate) const CHANGED_NS_MAX: usize = 1024;

/// A controller's asynchronous event state.
#[derive(Debug, Default)]
struct AsyncEvents {
    /// Completion DW0s of events waiting for an Asynchronous Event Request.
    pending: VecDeque<u32>,
    /// AEC bits whose events are masked: one was reported (or queued) and the host
    /// has not read its log page yet.
    masked: u32,
    /// Changed Namespace List: NSIDs changed since the host last read it.
    changed_ns: Vec<u32>,
    /// More than [`CHANGED_NS_MAX`] namespaces changed: the log reads FFFFFFFFh.
    changed_overflow: bool,
}

/// A controller: one host association with a subsystem.
#[derive(Debug)]
pub(crate) struct Controller {
    pub cntlid: u16,
    pub subsys: Arc<Subsystem>,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    cc: AtomicU32,
    csts: AtomicU32,
    kato_ms: AtomicU32,
    kato_changed: Notify,
    last_keep_alive: Mutex<Instant>,
    /// A command arrived since the keep-alive watchdog last looked (traffic-based keep
    /// alive: any command proves the host is alive, as a Keep Alive does).
    traffic_seen: AtomicBool,
    pub max_io_queues: u16,
    granted_io_queues: AtomicU16,
    io_qids: Mutex<HashSet<u16>>,
    pub aec: AtomicU32,
    /// Asynchronous events not yet reported and the logs they point at.
    events: Mutex<AsyncEvents>,
    /// Wakes the admin queue's connection when an event is queued.
    event_queued: Notify,
    write_cache: AtomicBool,
    errors: Mutex<VecDeque<ErrorLogEntry>>,
    error_count: AtomicU64,
    pub stats: Stats,
    pub created: Instant,
    teardown: watch::Sender<Option<TeardownReason>>,
    /// Bumped when the controller is disabled (CC.EN 1 -> 0): I/O queues close.
    io_reset: watch::Sender<u64>,
}

impl Controller {
    pub fn cc(&self) -> CcRegister {
        CcRegister::from_u32(self.cc.load(Ordering::Acquire))
    }

    pub fn csts(&self) -> CstsRegister {
        CstsRegister::from_u32(self.csts.load(Ordering::Acquire))
    }

    pub fn is_ready(&self) -> bool {
        self.csts().rdy
    }

    /// Write CC, acting on enable, disable and shutdown transitions.
    pub fn set_cc(&self, value: u32) {
        let new = CcRegister::from_u32(value);
        let old = CcRegister::from_u32(self.cc.swap(value, Ordering::AcqRel));
        let mut csts = self.csts();
        if new.shn != 0 {
            // Normal or abrupt shutdown: nothing is cached outside the backends, so
            // shutdown processing is complete at once.
            csts.shst = 0b10;
        } else if old.shn != 0 {
            csts.shst = 0;
        }
        if new.en && !old.en {
            // 64-byte SQEs and 16-byte CQEs are the only sizes NVMe over Fabrics has.
            if !matches!(new.iosqes, 0 | 6) || !matches!(new.iocqes, 0 | 4) {
                csts.cfs = true;
            } else {
                csts.rdy = true;
            }
        } else if !new.en && old.en {
            csts.rdy = false;
            csts.cfs = false;
            csts.shst = if new.shn != 0 { 0b10 } else { 0 };
            // A reset deletes the I/O queues: their connections close.
            self.io_reset.send_modify(|g| *g = g.wrapping_add(1));
        }
        self.csts.store(csts.to_u32(), Ordering::Release);
    }

    /// Volatile write cache enabled (Set Features 06h); when off, writes are flushed
    /// before they complete.
    pub fn write_cache_enabled(&self) -> bool {
        self.write_cache.load(Ordering::Acquire)
    }

    pub fn set_write_cache(&self, on: bool) {
        self.write_cache.store(on, Ordering::Release);
    }

    pub fn kato_ms(&self) -> u32 {
        self.kato_ms.load(Ordering::Acquire)
    }

    pub fn set_kato_ms(&self, ms: u32) {
        self.kato_ms.store(ms, Ordering::Release);
        self.keep_alive();
        self.kato_changed.notify_waiters();
    }

    pub fn keep_alive(&self) {
        *lock(&self.last_keep_alive) = Instant::now();
    }

    /// Notes that a command arrived on one of the controller's queues. One relaxed
    /// store per command: the watchdog turns it into a keep-alive when it next wakes,
    /// so a host busy with I/O whose Keep Alive command is late (a loaded host, a long
    /// queue ahead of it) is not torn down. Identify Controller says so (CTRATT.TBKAS).
    pub fn note_traffic(&self) {
        self.traffic_seen.store(true, Ordering::Relaxed);
    }

    pub fn granted_io_queues(&self) -> u16 {
        self.granted_io_queues.load(Ordering::Acquire)
    }

    /// Set Features (Number of Queues): grant up to our maximum.
    pub fn request_io_queues(&self, requested: u32) -> u16 {
        let n = u16::try_from(requested.min(u32::from(self.max_io_queues)))
            .unwrap_or(1)
            .max(1);
        self.granted_io_queues.store(n, Ordering::Release);
        n
    }

    pub fn has_io_queues(&self) -> bool {
        !lock(&self.io_qids).is_empty()
    }

    /// Register an I/O queue id; false if it is already connected.
    pub fn add_io_queue(&self, qid: u16) -> bool {
        lock(&self.io_qids).insert(qid)
    }

    pub fn remove_io_queue(&self, qid: u16) {
        lock(&self.io_qids).remove(&qid);
    }

    pub fn subscribe_teardown(&self) -> watch::Receiver<Option<TeardownReason>> {
        self.teardown.subscribe()
    }

    pub fn subscribe_io_reset(&self) -> watch::Receiver<u64> {
        self.io_reset.subscribe()
    }

    /// Tear the controller down: every connection of it closes, and it leaves the
    /// subsystem so its id can be reused.
    pub fn teardown(&self, why: TeardownReason) {
        let first = self.teardown.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(why);
                true
            } else {
                false
            }
        });
        if first {
            tracing::info!(
                cntlid = self.cntlid,
                subnqn = %self.subsys.nqn,
                hostnqn = %self.hostnqn,
                reason = ?why,
                "controller torn down"
            );
            let mut map = lock(&self.subsys.controllers);
            if map
                .get(&self.cntlid)
                .is_some_and(|c| std::ptr::eq(Arc::as_ptr(c), self))
            {
                map.remove(&self.cntlid);
            }
        }
    }

    /// Namespace `nsid` changed (its size): add it to the Changed Namespace List and
    /// queue a Namespace Attribute Changed notice unless the host disabled those
    /// (Set Features AEC bit 8) or one is already reported and its log not yet read.
    pub fn namespace_changed(&self, nsid: u32) {
        let queued = {
            let mut ev = lock(&self.events);
            if !ev.changed_overflow && !ev.changed_ns.contains(&nsid) {
                if ev.changed_ns.len() == CHANGED_NS_MAX {
                    ev.changed_ns.clear();
                    ev.changed_overflow = true;
                } else {
                    ev.changed_ns.push(nsid);
                }
            }
            let enabled = self.aec.load(Ordering::Acquire) & AEC_NS_ATTR != 0;
            if enabled && ev.masked & AEC_NS_ATTR == 0 {
                ev.masked |= AEC_NS_ATTR;
                ev.pending.push_back(AEN_NS_ATTR_CHANGED);
                true
            } else {
                false
            }
        };
        if queued {
            self.event_queued.notify_one();
        }
    }

    /// The oldest event not yet reported, for an Asynchronous Event Request.
    pub fn take_event(&self) -> Option<u32> {
        lock(&self.events).pending.pop_front()
    }

    /// Resolves when an event has been queued since the last call returned (a queued
    /// event stores a wakeup even when nobody waits).
    pub async fn event_queued(&self) {
        self.event_queued.notified().await;
    }

    /// The Changed Namespace List log page (4 KiB). Reading it clears the list and
    /// unmasks Namespace Attribute Changed notices, unless `retain` (Get Log Page
    /// RAE) is set.
    pub fn changed_ns_log(&self, retain: bool) -> Vec<u8> {
        let mut page = vec![0u8; CHANGED_NS_MAX * 4];
        let mut ev = lock(&self.events);
        if ev.changed_overflow {
            page[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        } else {
            for (slot, nsid) in page.chunks_exact_mut(4).zip(&ev.changed_ns) {
                slot.copy_from_slice(&nsid.to_le_bytes());
            }
        }
        if !retain {
            ev.changed_ns.clear();
            ev.changed_overflow = false;
            ev.masked &= !AEC_NS_ATTR;
        }
        page
    }

    /// Record a failed command in the error log.
    pub fn log_error(&self, sqid: u16, cid: u16, status: Status, nsid: u32, lba: u64) {
        let n = self
            .error_count
            .fetch_add(1, Ordering::AcqRel)
            .wrapping_add(1);
        let e = ErrorLogEntry {
            error_count: n,
            sqid,
            cid,
            status: status.to_word(),
            param_error_location: 0xFFFF,
            lba,
            nsid,
            vs: 0,
            trtype: 3,
            csi: 0,
            ttsi: 0,
        };
        let mut log = lock(&self.errors);
        if log.len() == ERROR_LOG_ENTRIES {
            log.pop_back();
        }
        log.push_front(e);
    }

    /// Error log entries, newest first.
    pub fn error_log(&self) -> Vec<ErrorLogEntry> {
        lock(&self.errors).iter().copied().collect()
    }

    pub fn error_count(&self) -> u64 {
        self.error_count.load(Ordering::Acquire)
    }

    /// Run the keep-alive timer until the controller goes away; tear it down if KATO
    /// passes without a Keep Alive or any other command (traffic-based keep alive: a
    /// command seen in the last period restarts the timer when the period ends, so
    /// the host is given between one and two KATO periods, as the kernel target does).
    pub async fn keep_alive_watchdog(self: Arc<Self>) {
        let mut gone = self.subscribe_teardown();
        loop {
            if gone.borrow().is_some() {
                return;
            }
            let kato = self.kato_ms();
            let changed = self.kato_changed.notified();
            if kato == 0 {
                tokio::select! {
                    _ = changed => continue,
                    _ = gone.changed() => return,
                }
            }
            let deadline = *lock(&self.last_keep_alive) + Duration::from_millis(u64::from(kato));
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if self.traffic_seen.swap(false, Ordering::Relaxed) {
                        self.keep_alive();
                        continue;
                    }
                    let last = *lock(&self.last_keep_alive);
                    let kato = Duration::from_millis(u64::from(self.kato_ms()));
                    if !kato.is_zero() && last.elapsed() >= kato {
                        tracing::warn!(cntlid = self.cntlid, "keep-alive timeout ({} ms)", kato.as_millis());
                        self.teardown(TeardownReason::KeepAliveExpired);
                        return;
                    }
                }
                _ = changed => {}
                _ = gone.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> Arc<Controller> {
        let sub = Arc::new(Subsystem::new(
            SubsystemKind::Nvm,
            "nqn.2026-11.io.dpu-offload:state-test".into(),
            None,
            "test".into(),
            Vec::new(),
            HashSet::new(),
            true,
        ));
        sub.create_controller("nqn.host".into(), [0; 16], 0, 1)
            .expect("a controller id")
    }

    fn nsids(page: &[u8]) -> Vec<u32> {
        page.chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .take_while(|&n| n != 0)
            .collect()
    }

    #[test]
    fn changed_namespace_list_overflows_to_all_ones() {
        let c = controller();
        for nsid in 1..=1024 {
            c.namespace_changed(nsid);
            c.namespace_changed(nsid);
        }
        let page = c.changed_ns_log(true);
        assert_eq!(page.len(), 4096);
        assert_eq!(nsids(&page), (1..=1024).collect::<Vec<u32>>(), "each once");
        // The 1025th changed namespace: the list is FFFFFFFFh alone, and stays so.
        c.namespace_changed(5000);
        c.namespace_changed(5001);
        let page = c.changed_ns_log(false);
        assert_eq!(nsids(&page), vec![u32::MAX]);
        assert!(page[4..].iter().all(|&b| b == 0));
        // Read without RAE: empty, then it records again.
        assert!(nsids(&c.changed_ns_log(false)).is_empty());
        c.namespace_changed(7);
        assert_eq!(nsids(&c.changed_ns_log(false)), vec![7]);
        // Notices were off (AEC 0): nothing was queued.
        assert_eq!(c.take_event(), None);
    }
}
