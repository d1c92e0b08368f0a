//! The NVMe/TCP target (controller side): what a storage node runs.
//!
//! A target listens on one TCP address and serves a discovery subsystem plus the NVM
//! subsystems of its [`TargetConfig`]. Each accepted connection becomes one queue of
//! one controller; the Linux kernel's nvme-tcp host and this crate's host both talk
//! to it. The design choices that matter to a host are written down in
//! `docs/nvmeof.md` ("Target").

mod admin;
mod config;
mod connection;
#[doc(hidden)]
pub mod fuzzing;
mod io;
mod state;

pub use config::{Limits, NamespaceConfig, SubsystemConfig, TargetConfig};

use crate::nvme::fabrics::NQN_MAX_LEN;
use crate::nvme::{Status, DISCOVERY_NQN};
use bytes::Bytes;
use state::{fnv128, Namespace, Subsystem, SubsystemKind};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Errors of the target layer.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The configuration cannot be served.
    #[error("invalid target configuration: {0}")]
    Config(String),
    /// No such subsystem or namespace is served.
    #[error("not served: {0}")]
    NotServed(String),
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A command's outcome: completion status, DW0/DW1 and any data for the host.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub status: Status,
    pub dw0: u32,
    pub dw1: u32,
    pub data: Option<Bytes>,
}

impl Reply {
    pub fn ok() -> Self {
        Self::status(Status::SUCCESS)
    }
    pub fn status(status: Status) -> Self {
        Self {
            status,
            dw0: 0,
            dw1: 0,
            data: None,
        }
    }
    pub fn data(data: Bytes) -> Self {
        Self {
            status: Status::SUCCESS,
            dw0: 0,
            dw1: 0,
            data: Some(data),
        }
    }
}

/// State every connection of a target shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub limits: Limits,
    /// Read on Connect and for the discovery log only (never on the I/O path);
    /// written by [`Target::add_subsystem`] and [`Target::remove_subsystem`].
    pub subsystems: RwLock<HashMap<String, Arc<Subsystem>>>,
    pub discovery: Arc<Subsystem>,
    /// Runtimes new connections are spread over (empty: the accepting runtime).
    pub runtimes: Vec<tokio::runtime::Handle>,
    pub next_runtime: AtomicUsize,
    /// Discovery log generation counter: changes whenever the subsystem set does.
    pub discovery_genctr: AtomicU64,
    pub local_addr: SocketAddr,
    pub shutdown: watch::Receiver<bool>,
}

/// What an NVM subsystem has served since it was added to the target, over every
/// controller it had: the commands of its I/O queues (admin and fabrics commands are
/// not counted). A subsystem removed and added again starts from zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubsystemStats {
    /// Live controllers (host associations).
    pub controllers: usize,
    /// I/O commands received, whatever their outcome (opcodes the target does not
    /// know included).
    pub commands: u64,
    /// Read commands completed successfully.
    pub reads: u64,
    /// Write commands completed successfully (not Write Zeroes).
    pub writes: u64,
    /// Bytes those reads returned.
    pub read_bytes: u64,
    /// Bytes those writes stored.
    pub written_bytes: u64,
    /// I/O commands completed with an error status.
    pub errors: u64,
}

/// A running target.
#[derive(Debug)]
pub struct Target {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    accept: Option<tokio::task::JoinHandle<()>>,
    streams: tokio::sync::Mutex<JoinSet<()>>,
}

fn valid_nqn(nqn: &str) -> bool {
    !nqn.is_empty() && nqn.len() <= NQN_MAX_LEN && nqn.is_ascii()
}

fn build_subsystem(s: &SubsystemConfig) -> Result<Subsystem, TargetError> {
    if !valid_nqn(&s.nqn) || s.nqn == DISCOVERY_NQN {
        return Err(TargetError::Config(format!(
            "invalid subsystem NQN {:?}",
            s.nqn
        )));
    }
    for h in &s.allowed_hosts {
        if !valid_nqn(h) {
            return Err(TargetError::Config(format!("invalid host NQN {h:?}")));
        }
    }
    let mut namespaces: Vec<Namespace> = Vec::new();
    let mut next = 1u32;
    for n in &s.namespaces {
        let nsid = n.nsid.unwrap_or(next);
        if nsid == 0 || nsid >= 0xFFFF_FFF0 || namespaces.iter().any(|x| x.nsid == nsid) {
            return Err(TargetError::Config(format!(
                "{}: bad or duplicate NSID {nsid}",
                s.nqn
            )));
        }
        next = nsid.saturating_add(1);
        let bs = n.backend.block_size();
        if !bs.is_power_of_two() || bs < 512 {
            return Err(TargetError::Config(format!(
                "{}: nsid {nsid}: block size {bs}",
                s.nqn
            )));
        }
        let nsid_b = nsid.to_le_bytes();
        let seed = n.id_seed.as_bytes();
        let nguid = n
            .nguid
            .unwrap_or_else(|| fnv128(&[b"nguid", s.nqn.as_bytes(), &nsid_b, seed]));
        let uuid = n.uuid.unwrap_or_else(|| {
            let mut u = fnv128(&[b"uuid", s.nqn.as_bytes(), &nsid_b, seed]);
            // RFC 9562 version 8 (custom), variant 10b.
            u[6] = (u[6] & 0x0F) | 0x80;
            u[8] = (u[8] & 0x3F) | 0x80;
            u
        });
        namespaces.push(Namespace {
            nsid,
            blocks: AtomicU64::new(n.backend.size() / u64::from(bs)),
            block_size: bs,
            backend: Arc::clone(&n.backend),
            nguid,
            uuid,
        });
    }
    namespaces.sort_by_key(|n| n.nsid);
    Ok(Subsystem::new(
        SubsystemKind::Nvm,
        s.nqn.clone(),
        s.serial.clone(),
        s.model.clone(),
        namespaces,
        s.allowed_hosts.iter().cloned().collect::<HashSet<_>>(),
        s.allow_any_host,
    ))
}

fn build_subsystems(cfg: &TargetConfig) -> Result<HashMap<String, Arc<Subsystem>>, TargetError> {
    let mut out = HashMap::new();
    for s in &cfg.subsystems {
        if out.contains_key(&s.nqn) {
            return Err(TargetError::Config(format!(
                "subsystem {} configured twice",
                s.nqn
            )));
        }
        out.insert(s.nqn.clone(), Arc::new(build_subsystem(s)?));
    }
    Ok(out)
}

impl Target {
    /// Bind the listen address and start serving.
    pub async fn start(config: TargetConfig) -> Result<Target, TargetError> {
        config.limits.validate()?;
        let subsystems = build_subsystems(&config)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| TargetError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| TargetError::Bind {
            addr: config.listen,
            source,
        })?;
        let (tx, rx) = watch::channel(false);
        let discovery = Arc::new(Subsystem::new(
            SubsystemKind::Discovery,
            DISCOVERY_NQN.to_string(),
            None,
            "dpu-offload discovery".into(),
            Vec::new(),
            HashSet::new(),
            true,
        ));
        let shared = Arc::new(Shared {
            limits: config.limits.clone(),
            subsystems: RwLock::new(subsystems),
            discovery,
            runtimes: config.runtimes.clone(),
            next_runtime: AtomicUsize::new(0),
            discovery_genctr: AtomicU64::new(1),
            local_addr,
            shutdown: rx,
        });
        let accept = tokio::spawn(accept_loop(Arc::clone(&shared), listener));
        Ok(Target {
            shared,
            shutdown: tx,
            accept: Some(accept),
            streams: Default::default(),
        })
    }

    /// The address the target listens on (with the real port if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Serve one already-connected byte stream as an NVMe/TCP connection (tests and
    /// fuzzing feed in-memory streams through this). Returns when it closes.
    pub async fn serve_stream<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        connection::serve(
            Arc::clone(&self.shared),
            crate::tcp::PduReader::new(r),
            crate::tcp::PduWriter::new(w),
            self.shared.local_addr,
        )
        .await;
    }

    /// Like [`Target::serve_stream`] but in the background; the stream is closed on
    /// [`Target::shutdown`].
    pub async fn spawn_stream<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + Sync + 'static,
    {
        let shared = Arc::clone(&self.shared);
        let (r, w) = tokio::io::split(stream);
        let local = shared.local_addr;
        self.streams.lock().await.spawn(connection::serve(
            shared,
            crate::tcp::PduReader::new(r),
            crate::tcp::PduWriter::new(w),
            local,
        ));
    }

    /// Number of live controllers in a subsystem (for tests and status).
    pub fn controller_count(&self, subnqn: &str) -> usize {
        let s = if subnqn == DISCOVERY_NQN {
            Some(Arc::clone(&self.shared.discovery))
        } else {
            self.shared.subsystem(subnqn)
        };
        s.map_or(0, |s| state::lock(&s.controllers).len())
    }

    /// The I/O counters of a subsystem, `None` if it is not served (see
    /// [`SubsystemStats`]).
    pub fn subsystem_stats(&self, subnqn: &str) -> Option<SubsystemStats> {
        let s = self.shared.subsystem(subnqn)?;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let controllers = state::lock(&s.controllers).len();
        Some(SubsystemStats {
            controllers,
            commands: get(&s.io.commands),
            reads: get(&s.io.reads),
            writes: get(&s.io.writes),
            read_bytes: get(&s.io.bytes_read),
            written_bytes: get(&s.io.bytes_written),
            errors: get(&s.io.errors),
        })
    }

    /// Announce that namespace `nsid` of subsystem `subnqn` has a new size: the
    /// target reads it again from the namespace's backend ([`Backend::size`], whole
    /// blocks), I/O and Identify Namespace use it from then on, and every controller
    /// of the subsystem gets a Namespace Attribute Changed asynchronous event (see
    /// `docs/nvmeof.md`, "Asynchronous events"). Returns whether the size changed;
    /// an error if the subsystem or namespace is not served.
    ///
    /// [`Backend::size`]: crate::backend::Backend::size
    pub fn namespace_resized(&self, subnqn: &str, nsid: u32) -> Result<bool, TargetError> {
        let sub = self
            .shared
            .subsystem(subnqn)
            .ok_or_else(|| TargetError::NotServed(format!("subsystem {subnqn}")))?;
        sub.namespace_resized(nsid)
            .ok_or_else(|| TargetError::NotServed(format!("{subnqn}: namespace {nsid}")))
    }

    /// Start serving another subsystem while the target runs. Refused if its NQN is
    /// already served or the configuration is invalid.
    pub fn add_subsystem(&self, config: &SubsystemConfig) -> Result<(), TargetError> {
        let sub = Arc::new(build_subsystem(config)?);
        let mut map = self
            .shared
            .subsystems
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.contains_key(&config.nqn) {
            return Err(TargetError::Config(format!(
                "subsystem {} is already served",
                config.nqn
            )));
        }
        map.insert(config.nqn.clone(), sub);
        self.shared.discovery_genctr.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Stop serving a subsystem: new Connects to it fail as for an unknown NQN, and
    /// every controller of it is torn down (its connections close after answering
    /// what they have in flight). Returns false if it was not served.
    pub fn remove_subsystem(&self, nqn: &str) -> bool {
        let removed = self
            .shared
            .subsystems
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(nqn);
        let Some(sub) = removed else { return false };
        self.shared.discovery_genctr.fetch_add(1, Ordering::AcqRel);
        let ctrls: Vec<_> = state::lock(&sub.controllers).values().cloned().collect();
        for c in ctrls {
            c.teardown(state::TeardownReason::SubsystemRemoved);
        }
        true
    }

    /// The NQNs of the NVM subsystems served now, sorted.
    pub fn subsystem_nqns(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .shared
            .subsystems
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Stop accepting, close every connection (held AERs complete as aborted) and
    /// wait until they are gone.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(a) = self.accept.take() {
            let _ = a.await;
        }
        let mut streams = self.streams.lock().await;
        while streams.join_next().await.is_some() {}
    }
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub(crate) async fn shutdown_signalled(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

impl Shared {
    /// The NVM subsystem named `nqn`, if served.
    pub(crate) fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        self.subsystems
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(nqn)
            .cloned()
    }
}

/// Serve an accepted connection on the next configured runtime (round-robin): the
/// socket is moved there and registered with that runtime's I/O driver, so the
/// connection's reads, writes and command tasks all stay on one thread.
fn spawn_on_runtime(
    shared: &Arc<Shared>,
    conns: &mut JoinSet<()>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) {
    let i = shared.next_runtime.fetch_add(1, Ordering::Relaxed) % shared.runtimes.len();
    let std_stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, "cannot set up connection: {e}");
            return;
        }
    };
    let shared2 = Arc::clone(shared);
    conns.spawn_on(
        async move {
            let split = tokio::net::TcpStream::from_std(std_stream).and_then(crate::tcp::split);
            match split {
                Ok((r, w)) => {
                    tracing::debug!(%peer, runtime = i, "connection accepted");
                    connection::serve(shared2, r, w, local).await;
                }
                Err(e) => tracing::warn!(%peer, "cannot set up connection: {e}"),
            }
        },
        &shared.runtimes[i],
    );
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut conns = JoinSet::new();
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let local = stream.local_addr().unwrap_or(shared.local_addr);
                    if !shared.runtimes.is_empty() {
                        spawn_on_runtime(&shared, &mut conns, stream, peer, local);
                        continue;
                    }
                    match crate::tcp::split(stream) {
                        Ok((r, w)) => {
                            tracing::debug!(%peer, "connection accepted");
                            conns.spawn(connection::serve(Arc::clone(&shared), r, w, local));
                        }
                        Err(e) => tracing::warn!(%peer, "cannot set up connection: {e}"),
                    }
                }
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = shutdown_signalled(&mut shutdown) => break,
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}
