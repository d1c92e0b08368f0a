//! vhost-user-blk: a volume as a virtio-blk disk of a QEMU (or cloud-hypervisor) VM.
//!
//! QEMU keeps the virtio device model and hands the virtqueues to this back-end over a
//! Unix socket (the vhost-user protocol): the guest's RAM is shared (a memfd mapped in
//! both processes), so requests and data move without a copy through QEMU and without
//! a kernel block layer on the DPU side. The protocol machinery is rust-vmm's
//! (`vhost`, `vhost-user-backend`, `virtio-queue`, `vm-memory`); this module is the
//! virtio-blk device: request parsing against untrusted guest memory (`request`), the
//! asynchronous data path over the reactors (`handler`), features and config space
//! (`backend`), and one listening socket per export that outlives its connections, so a
//! restarted QEMU reconnects to the same disk.
//!
//! A volume that grows under an export ([`VhostUserBlkExport::capacity_changed`]) is
//! announced to the connected front-end with a config-change notice on the vhost-user
//! backend request channel, so the guest sees the new capacity without a reconnect
//! (see `backend`).
//!
//! Why a thread per export for the socket: the vhost-user control protocol is
//! synchronous (blocking reads of small messages with file descriptors attached), and
//! rust-vmm runs it that way. Those threads carry only control messages and ring kicks;
//! no device I/O ever blocks them.

mod backend;
mod handler;
mod request;
#[cfg(test)]
mod tests;

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use self::backend::{BlkBackend, Notice};
use self::handler::{Counters, Handler};
use self::request::{Limits, SECTOR};
use super::BlockDevice;

/// How long a disconnect waits for the old connection's device calls before the socket
/// accepts the next connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why an export could not start.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserBlkError {
    /// The device cannot be presented as virtio-blk.
    #[error("device unsuitable for virtio-blk: {0}")]
    Device(String),
    /// The socket could not be set up.
    #[error("vhost-user socket {path}: {source}")]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// No reactor to run requests on.
    #[error("no reactor handle given")]
    NoReactor,
}

/// Tunables of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VhostUserBlkConfig {
    /// Virtqueues offered (QEMU's `num-queues` may use up to this many).
    pub num_queues: u16,
    /// Largest virtqueue size accepted (QEMU's `queue-size`, 128 by default).
    pub queue_size: u16,
    /// Largest read or write in bytes (`seg_max * size_max` stays within it).
    pub max_io_bytes: u32,
    /// Largest discard or write-zeroes range in bytes (per range).
    pub max_zero_bytes: u32,
    /// Most ranges in one discard or write-zeroes request.
    pub max_zero_ranges: u32,
}

impl Default for VhostUserBlkConfig {
    fn default() -> Self {
        Self {
            num_queues: 4,
            queue_size: 256,
            max_io_bytes: 4 << 20,
            max_zero_bytes: 1 << 30,
            max_zero_ranges: 16,
        }
    }
}

/// What an export did when told its device grew ([`VhostUserBlkExport::capacity_changed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapacityNotice {
    /// The connected front-end was sent a config-change notice.
    Sent,
    /// No front-end is connected: the next one reads the new capacity.
    NotConnected,
    /// The front-end gave no backend request channel (it did not negotiate
    /// `BACKEND_REQ`): the new capacity is what its next `GET_CONFIG` returns.
    NoChannel,
    /// The notice could not be sent (the front-end is going away); the export goes on.
    Failed(String),
}

/// Counters of one export (all connections it had).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VhostUserBlkStats {
    /// Whether a front-end is connected now.
    pub connected: bool,
    /// Connections accepted so far.
    pub connections: u64,
    /// Requests taken off the virtqueues.
    pub requests: u64,
    /// Bytes read by the guest.
    pub read_bytes: u64,
    /// Bytes written by the guest.
    pub written_bytes: u64,
    /// Requests answered with an error status.
    pub errors: u64,
    /// Requests refused before reaching the device (malformed chains, bad ranges, ...).
    pub malformed: u64,
}

struct Shared {
    name: String,
    device: Arc<dyn BlockDevice>,
    config: VhostUserBlkConfig,
    reactors: Vec<Handle>,
    counters: Arc<Counters>,
    stopping: AtomicBool,
    stop_event: EventFd,
    current: Mutex<Option<ShutdownHandle>>,
    /// The connected front-end's back-end (for config-change notices).
    backend: Mutex<Option<Arc<BlkBackend>>>,
    /// The capacity a front-end last read, across connections (see `backend`).
    announced: Arc<AtomicU64>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("stopping", &self.stopping)
            .finish_non_exhaustive()
    }
}

/// One export: a socket QEMU connects to, served by its own thread. Stopping (or
/// dropping) it closes the connection, and its socket file is removed.
#[derive(Debug)]
pub struct VhostUserBlkExport {
    shared: Arc<Shared>,
    path: PathBuf,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The limits a device gets from `config`.
fn limits(device: &dyn BlockDevice, config: &VhostUserBlkConfig) -> Limits {
    let sectors = |bytes: u32| u32::try_from(u64::from(bytes) / SECTOR).unwrap_or(u32::MAX);
    Limits {
        size: device.size_bytes(),
        block_size: device.block_size(),
        read_only: device.read_only(),
        max_io_bytes: u64::from(config.max_io_bytes),
        max_discard_sectors: sectors(config.max_zero_bytes),
        max_discard_seg: config.max_zero_ranges.max(1),
        max_write_zeroes_sectors: sectors(config.max_zero_bytes),
        max_write_zeroes_seg: config.max_zero_ranges.max(1),
    }
}

/// Binds `path` with mode 0600: bound under a temporary name, restricted, then renamed
/// into place, so it is never reachable with wider permissions.
fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?
        .to_string_lossy()
        .into_owned();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    if let Err(e) = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path))
    {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

impl VhostUserBlkExport {
    /// Serves `device` as `name` on a new socket at `path` (an existing socket file is
    /// replaced). Requests of queue `i` complete on `reactors[i % reactors.len()]`.
    pub fn start(
        name: &str,
        path: &Path,
        device: Arc<dyn BlockDevice>,
        config: VhostUserBlkConfig,
        reactors: Vec<Handle>,
    ) -> Result<Self, VhostUserBlkError> {
        if reactors.is_empty() {
            return Err(VhostUserBlkError::NoReactor);
        }
        let bs = device.block_size();
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(VhostUserBlkError::Device(format!(
                "block size {bs} is not a power of two from 512 to 65536"
            )));
        }
        if device.size_bytes() % u64::from(bs) != 0 {
            return Err(VhostUserBlkError::Device(format!(
                "size {} is not whole {bs}-byte blocks",
                device.size_bytes()
            )));
        }
        if config.num_queues == 0 || config.num_queues > 64 || config.queue_size < 4 {
            return Err(VhostUserBlkError::Device(format!(
                "num_queues {} (1 to 64) or queue_size {} (at least 4) out of range",
                config.num_queues, config.queue_size
            )));
        }
        let socket_err = |source| VhostUserBlkError::Socket {
            path: path.to_owned(),
            source,
        };
        let listener = bind(path).map_err(socket_err)?;
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            device,
            config,
            reactors,
            counters: Arc::new(Counters::default()),
            stopping: AtomicBool::new(false),
            stop_event: EventFd::new(libc::EFD_NONBLOCK).map_err(socket_err)?,
            current: Mutex::new(None),
            backend: Mutex::new(None),
            announced: Arc::new(AtomicU64::new(backend::NOT_READ)),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("vhost-{name}"))
                .spawn(move || serve(&shared, listener))
                .map_err(socket_err)?
        };
        tracing::info!(export = name, socket = %path.display(), "vhost-user-blk listening");
        Ok(Self {
            shared,
            path: path.to_owned(),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The socket QEMU connects to.
    #[must_use]
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// The export's counters.
    #[must_use]
    pub fn stats(&self) -> VhostUserBlkStats {
        let c = &self.shared.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        VhostUserBlkStats {
            connected: get(&c.connected) > 0,
            connections: get(&c.connections),
            requests: get(&c.requests),
            read_bytes: get(&c.read_bytes),
            written_bytes: get(&c.written_bytes),
            errors: get(&c.errors),
            malformed: get(&c.malformed),
        }
    }

    /// Tells the connected front-end that the device's capacity changed (the volume
    /// grew): the config space already reports the device's current size, and with a
    /// backend request channel the front-end is sent
    /// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`, on which QEMU re-reads the config space
    /// and interrupts the guest. Never fails the export: without a channel, or when the
    /// send fails, the new size is still what the next `GET_CONFIG` returns. Blocking
    /// (one socket write); call off the reactors.
    pub fn capacity_changed(&self) -> CapacityNotice {
        let name = &self.shared.name;
        let sectors = self.shared.device.size_bytes() / SECTOR;
        let backend = self
            .shared
            .backend
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(backend) = backend else {
            tracing::info!(export = %name, sectors, "vhost-user-blk: capacity changed; no front-end connected, the next one reads the new size");
            return CapacityNotice::NotConnected;
        };
        match backend.notify_config_change() {
            Notice::Sent => {
                tracing::info!(export = %name, sectors, "vhost-user-blk: capacity changed; config-change notice sent to the front-end");
                CapacityNotice::Sent
            }
            Notice::NoChannel => {
                tracing::info!(export = %name, sectors, "vhost-user-blk: capacity changed; the front-end has no backend request channel (BACKEND_REQ not negotiated), it sees the new size on its next GET_CONFIG");
                CapacityNotice::NoChannel
            }
            Notice::Failed(e) => {
                tracing::warn!(export = %name, sectors, error = %e, "vhost-user-blk: capacity changed; the config-change notice could not be sent, the front-end sees the new size on its next GET_CONFIG");
                CapacityNotice::Failed(e.to_string())
            }
        }
    }

    /// Stops accepting, cuts the current connection and removes the socket file. Does
    /// not wait: the serving thread ends once requests in flight have completed.
    pub fn stop(&self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = std::fs::remove_file(&self.path);
        // The serving thread polls this eventfd with the listener.
        let _ = self.shared.stop_event.write(1);
        if let Some(h) = self
            .shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            h.shutdown();
        }
    }

    /// Stops and waits for the serving thread (blocking; call off the reactors).
    pub fn stop_and_wait(&self) {
        self.stop();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for VhostUserBlkExport {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until the listener has a connection (`true`) or the export stops (`false`).
fn wait_for_connection(listener: &Listener, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structs that outlives the call, and
        // its length is passed alongside; both descriptors are open (owned by the caller).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return true;
        }
        if fds[0].revents != 0 {
            return false;
        }
    }
}

/// The export's thread: one connection at a time, for as long as the export lives.
fn serve(shared: &Arc<Shared>, listener: UnixListener) {
    let stop_fd = &shared.stop_event;
    let mut listener = Listener::from(listener);
    loop {
        if shared.stopping.load(Ordering::SeqCst) || !wait_for_connection(&listener, stop_fd) {
            break;
        }
        let queues = usize::from(shared.config.num_queues);
        let limits = limits(&*shared.device, &shared.config);
        let handler = Arc::new(Handler::new(
            Arc::clone(&shared.device),
            limits,
            &format!("dpud-{}", shared.name),
            queues,
            Arc::clone(&shared.counters),
        ));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::new(
            Arc::clone(&handler),
            mem.clone(),
            queues,
            shared.config.queue_size,
            shared.reactors.clone(),
            shared.device.volatile_write_cache(),
            Arc::clone(&shared.announced),
        ));
        let mut daemon = match VhostUserDaemon::new(
            format!("vhost-{}", shared.name),
            Arc::clone(&backend),
            mem,
        ) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(export = %shared.name, error = %e, "vhost-user-blk: cannot set up a connection");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if let Err(e) = daemon.start(&mut listener) {
            tracing::warn!(export = %shared.name, error = %e, "vhost-user-blk: accept failed");
            continue;
        }
        *shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = daemon.shutdown_handle();
        *shared
            .backend
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&backend));
        if shared.stopping.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        }
        shared.counters.connected.fetch_add(1, Ordering::Relaxed);
        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
        tracing::info!(export = %shared.name, "vhost-user-blk: front-end connected");
        match daemon.wait() {
            Ok(()) => {}
            Err(e) => {
                tracing::info!(export = %shared.name, error = %e, "vhost-user-blk: connection ended")
            }
        }
        *shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        *shared
            .backend
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        // Joins the vring workers: no chain is popped after this.
        drop(daemon);
        if !handler.close(CLOSE_TIMEOUT) {
            tracing::error!(export = %shared.name, in_flight = handler.in_flight(None), "vhost-user-blk: device calls of a closed connection still running");
        }
        shared.counters.connected.fetch_sub(1, Ordering::Relaxed);
        tracing::info!(export = %shared.name, "vhost-user-blk: front-end disconnected; listening again");
    }
}
