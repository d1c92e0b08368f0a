//! The NBD front-end: serves [`BlockDevice`]s to NBD clients (fio's `nbd` engine,
//! `qemu-img`/`qemu-io`/QEMU's block layer, `nbdinfo`, the Linux `nbd-client`) over a
//! Unix socket or TCP.
//!
//! NBD is the cheapest way to put a volume in front of standard tools on the host
//! side: no kernel module, no guest, and fio drives it directly. The server speaks
//! only the fixed-newstyle handshake with `NBD_OPT_GO`/`INFO` (so block-size
//! constraints reach the client), structured replies for reads, and the data
//! commands a volume implements; `docs/nbd.md` lists exactly what is implemented,
//! the error mapping, and which client mistakes end a connection.
//!
//! Exports can be added and removed while clients are connected; removing one ends
//! its sessions after their in-flight requests are answered. Several connections to
//! one export are allowed and advertised (`NBD_FLAG_CAN_MULTI_CONN`): they all reach
//! the same [`BlockDevice`], which has no per-connection cache, and whose flush
//! covers every completed write whichever connection carried it.
//!
//! The session logic runs on any `AsyncRead + AsyncWrite` ([`NbdServer::serve_stream`]),
//! which is what the fuzz target and the tests use.

mod proto;
mod session;

pub mod fuzzing;

use crate::frontend::BlockDevice;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Errors of the NBD front-end.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// An export of that name exists already.
    #[error("an NBD export named {0:?} exists already")]
    DuplicateExport(String),
    /// No export of that name exists (or a client asked for one that does not).
    #[error("no NBD export named {0:?}")]
    UnknownExport(String),
    /// The export cannot be served as asked.
    #[error("NBD export {name:?} refused: {reason}")]
    InvalidExport {
        /// The export's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server configuration is inconsistent.
    #[error("invalid NBD server configuration: {0}")]
    Config(String),
    /// A listening socket could not be set up.
    #[error("cannot listen for NBD clients on {addr}: {source}")]
    Listen {
        /// The address or socket path.
        addr: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed underneath the protocol.
    #[error("NBD connection i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol in a way that ends its connection.
    #[error("NBD protocol violation by the client: {0}")]
    Protocol(String),
    /// The client did not finish the handshake in time.
    #[error("NBD handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
}

/// Limits of the server; the defaults suit fio, QEMU and the engine's volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdConfig {
    /// Largest read or write one request may carry (the advertised maximum block
    /// size, rounded down to whole device blocks). A write announcing more ends its
    /// connection; a larger read fails with EINVAL.
    pub max_payload: u32,
    /// Requests one connection may have in flight; the server stops reading the
    /// connection while that many are outstanding.
    pub max_in_flight: usize,
    /// Payload bytes one connection may have in flight (write data received, read
    /// data not yet sent); at least `max_payload`.
    pub max_in_flight_bytes: u32,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// How long [`NbdListener::shutdown`] lets its connections answer what they have
    /// in flight before it cuts them (a client that stopped reading its replies would
    /// otherwise hold the shutdown forever).
    pub shutdown_grace: Duration,
}

impl Default for NbdConfig {
    fn default() -> Self {
        Self {
            max_payload: 32 << 20,
            max_in_flight: 128,
            max_in_flight_bytes: 128 << 20,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl NbdConfig {
    fn validate(&self) -> Result<(), NbdError> {
        let bad = |m: &str| Err(NbdError::Config(m.into()));
        if self.max_payload < 64 * 1024 || self.max_payload > 1 << 30 {
            return bad("max_payload must be between 64 KiB and 1 GiB");
        }
        if self.max_in_flight == 0 || self.max_in_flight > 1 << 16 {
            return bad("max_in_flight must be between 1 and 65536");
        }
        if self.max_in_flight_bytes < self.max_payload {
            return bad("max_in_flight_bytes must be at least max_payload");
        }
        if self.handshake_timeout.is_zero() {
            return bad("handshake_timeout must be positive");
        }
        Ok(())
    }
}

/// Counters of one export since it was added (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NbdStats {
    /// Connections in transmission on this export now.
    pub connections: u64,
    /// Requests received (every command, including ones that failed).
    pub requests: u64,
    /// Bytes read by clients.
    pub read_bytes: u64,
    /// Bytes written by clients (write payloads that completed).
    pub written_bytes: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Connections that ended on a protocol violation or an i/o error.
    pub dropped_connections: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    errors: AtomicU64,
    dropped_connections: AtomicU64,
}

/// One export as the sessions see it.
#[derive(Debug)]
struct Export {
    name: String,
    description: Option<String>,
    device: Arc<dyn BlockDevice>,
    min_block: u32,
    preferred_block: u32,
    max_block: u32,
    stats: Counters,
    /// Turns true when the export is removed; its sessions then wind down.
    closed: watch::Sender<bool>,
}

#[derive(Debug)]
struct Shared {
    config: NbdConfig,
    exports: Mutex<BTreeMap<String, Arc<Export>>>,
    handshake_failures: AtomicU64,
}

impl Shared {
    fn exports(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Export>>> {
        // The map is only ever inserted into or removed from under the lock, so a
        // panic elsewhere cannot leave it half-updated.
        self.exports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The export a client named; the empty name means the only export, if there
    /// is exactly one.
    fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        let map = self.exports();
        if name.is_empty() && map.len() == 1 {
            return map.values().next().cloned();
        }
        map.get(name).cloned()
    }

    fn export_list(&self) -> Vec<Arc<Export>> {
        self.exports().values().cloned().collect()
    }
}

/// An NBD server: a set of named exports and the listeners that serve them. Cheap
/// to clone; all clones share the exports.
#[derive(Debug, Clone)]
pub struct NbdServer {
    shared: Arc<Shared>,
}

impl Default for NbdServer {
    fn default() -> Self {
        Self::new()
    }
}

fn check_string(what: &str, s: &str) -> Result<(), String> {
    if s.len() > proto::MAX_STRING {
        return Err(format!("{what} is longer than 4096 bytes"));
    }
    if s.contains('\0') {
        return Err(format!("{what} contains a NUL character"));
    }
    Ok(())
}

impl NbdServer {
    /// A server with the default limits and no exports.
    pub fn new() -> Self {
        Self::build(NbdConfig::default())
    }

    /// A server with the given limits.
    pub fn with_config(config: NbdConfig) -> Result<Self, NbdError> {
        config.validate()?;
        Ok(Self::build(config))
    }

    fn build(config: NbdConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                exports: Mutex::new(BTreeMap::new()),
                handshake_failures: AtomicU64::new(0),
            }),
        }
    }

    /// The server's limits.
    pub fn config(&self) -> &NbdConfig {
        &self.shared.config
    }

    /// Serves `device` under `name`. The name must be new, non-empty, at most 4096
    /// bytes and free of NUL; the device's block size must be a power of two up to
    /// 64 KiB (the protocol's bound on a minimum block size) and its size a whole
    /// number of blocks.
    pub fn add_export(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        description: Option<String>,
    ) -> Result<(), NbdError> {
        let invalid = |reason: String| NbdError::InvalidExport {
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("the name is empty".into()));
        }
        check_string("the name", name).map_err(invalid)?;
        if let Some(d) = &description {
            check_string("the description", d).map_err(invalid)?;
        }
        let block = device.block_size();
        if !block.is_power_of_two() || block > 65536 {
            return Err(invalid(format!(
                "block size {block} is not a power of two up to 65536"
            )));
        }
        if device.size_bytes() % u64::from(block) != 0 {
            return Err(invalid(format!(
                "size {} is not a multiple of the block size {block}",
                device.size_bytes()
            )));
        }
        let max_block = self.shared.config.max_payload / block * block;
        let export = Arc::new(Export {
            name: name.to_owned(),
            description,
            device,
            min_block: block,
            preferred_block: block.max(4096),
            max_block,
            stats: Counters::default(),
            closed: watch::Sender::new(false),
        });
        let mut map = self.shared.exports();
        if map.contains_key(name) {
            return Err(NbdError::DuplicateExport(name.to_owned()));
        }
        map.insert(name.to_owned(), export);
        Ok(())
    }

    /// Stops serving `name`: new clients no longer find it and its open connections
    /// close once their in-flight requests are answered.
    pub fn remove_export(&self, name: &str) -> Result<(), NbdError> {
        let export = self
            .shared
            .exports()
            .remove(name)
            .ok_or_else(|| NbdError::UnknownExport(name.to_owned()))?;
        export.closed.send_replace(true);
        Ok(())
    }

    /// The names of the exports, sorted.
    pub fn exports(&self) -> Vec<String> {
        self.shared.exports().keys().cloned().collect()
    }

    /// The counters of an export, `None` if there is no export of that name.
    pub fn stats(&self, name: &str) -> Option<NbdStats> {
        let map = self.shared.exports();
        let c = &map.get(name)?.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Some(NbdStats {
            connections: get(&c.connections),
            requests: get(&c.requests),
            read_bytes: get(&c.read_bytes),
            written_bytes: get(&c.written_bytes),
            errors: get(&c.errors),
            dropped_connections: get(&c.dropped_connections),
        })
    }

    /// Connections that ended before transmission (bad handshake, unknown export
    /// via NBD_OPT_EXPORT_NAME, timeout), over all listeners.
    pub fn handshake_failures(&self) -> u64 {
        self.shared.handshake_failures.load(Ordering::Relaxed)
    }

    /// Runs one client session on `stream` (any byte stream: a socket, or an
    /// in-memory pipe in tests and fuzzing) until the client disconnects. Returns
    /// the error that ended the session, if one did.
    pub async fn serve_stream<S>(&self, stream: S) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (_never, stop) = watch::channel(false);
        session::run(self.shared.clone(), stream, stop).await
    }

    /// Listens on a Unix socket at `path`, created with mode 0600 (only this user
    /// may connect). An existing socket nobody listens on is replaced; any other
    /// existing file is an error.
    pub async fn serve_unix(&self, path: &Path) -> Result<NbdListener, NbdError> {
        let listen_err = |source| NbdError::Listen {
            addr: path.display().to_string(),
            source,
        };
        let listener = crate::unix_socket::bind_private(path, "another server listens there")
            .await
            .map_err(listen_err)?;
        Ok(self.start(UnixAcceptor(listener), Bound::Unix(path.to_owned())))
    }

    /// Listens on TCP at `addr` (port 0 picks a free port; see
    /// [`NbdListener::local_addr`]).
    pub async fn serve_tcp(&self, addr: SocketAddr) -> Result<NbdListener, NbdError> {
        let listen_err = |source| NbdError::Listen {
            addr: addr.to_string(),
            source,
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(listen_err)?;
        let local = listener.local_addr().map_err(listen_err)?;
        Ok(self.start(TcpAcceptor(listener), Bound::Tcp(local)))
    }

    fn start<A: Acceptor>(&self, acceptor: A, bound: Bound) -> NbdListener {
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(self.shared.clone(), acceptor, stop_rx));
        NbdListener {
            bound,
            stop: stop_tx,
            task: Some(task),
        }
    }
}

#[derive(Debug)]
enum Bound {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A listening socket serving the server's exports. Dropping it stops accepting
/// and ends its connections without waiting; [`NbdListener::shutdown`] waits.
#[derive(Debug)]
pub struct NbdListener {
    bound: Bound,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl NbdListener {
    /// The TCP address, for a TCP listener.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.bound {
            Bound::Tcp(a) => Some(*a),
            Bound::Unix(_) => None,
        }
    }

    /// The socket path, for a Unix listener.
    pub fn path(&self) -> Option<&Path> {
        match &self.bound {
            Bound::Unix(p) => Some(p),
            Bound::Tcp(_) => None,
        }
    }

    /// Stops accepting, asks every connection of this listener to stop reading new
    /// requests, and returns once they have answered what they had in flight and
    /// closed, or once [`NbdConfig::shutdown_grace`] has passed (the connections
    /// left are then cut). A Unix socket file is removed.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.remove_socket_file();
    }

    fn remove_socket_file(&self) {
        if let Bound::Unix(p) = &self.bound {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for NbdListener {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            self.stop.send_replace(true);
            task.abort();
            self.remove_socket_file();
        }
    }
}

/// A listening socket of either kind.
trait Acceptor: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

struct TcpAcceptor(tokio::net::TcpListener);

impl Acceptor for TcpAcceptor {
    type Stream = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Stream> {
        let (s, _) = self.0.accept().await?;
        // Replies are small and latency-bound; do not let Nagle hold them back.
        s.set_nodelay(true)?;
        Ok(s)
    }
}

struct UnixAcceptor(tokio::net::UnixListener);

impl Acceptor for UnixAcceptor {
    type Stream = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Stream> {
        Ok(self.0.accept().await?.0)
    }
}

async fn accept_loop<A: Acceptor>(shared: Arc<Shared>, acceptor: A, stop: watch::Receiver<bool>) {
    let mut sessions = JoinSet::new();
    let mut stop_wait = stop.clone();
    loop {
        tokio::select! {
            () = session::stopped(&mut stop_wait) => break,
            r = acceptor.accept() => match r {
                Ok(stream) => {
                    sessions.spawn(session::run(shared.clone(), stream, stop.clone()));
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    drop(acceptor);
    let grace = shared.config.shutdown_grace;
    let drained = tokio::time::timeout(grace, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        sessions.shutdown().await;
    }
}
