//! The daemon shell of `dpud`: configuration, the key file, the local store, the
//! control API's listeners, the metrics endpoint, the front-ends, and an orderly stop.
//!
//! [`run`] starts everything around a [`VolumeService`] and returns a [`DaemonHandle`];
//! the `dpud` binary builds the engine with [`real_service`] and stops the handle on
//! SIGTERM or SIGINT, and tests run the same [`run`] in-process around the test double.
//! Shutdown order matters for durability: listeners stop first (no new requests), then
//! the front-ends finish their in-flight I/O, then the engine flushes
//! ([`VolumeService::shutdown`]), and only then is the store closed.

pub mod config;
mod frontends;
mod metrics;
mod net_metrics;

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

use crate::api::service::{ServiceError, VolumeService};
use crate::api::{ApiError, ControlApi, ControlPlane};
use crate::store::{Store, StoreError};

pub use config::{Config, LogFormat};
pub use frontends::DaemonFrontends;

/// Length of the key-encryption key in bytes (AES-256).
pub const KEK_BYTES: usize = 32;

/// Everything that stops the daemon from starting or stopping cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration file could not be read or parsed.
    #[error("configuration {path}: {detail}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A file or directory could not be set up.
    #[error("{what} {path}: {source}")]
    Io {
        /// What it is for.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The key file is unusable.
    #[error("key file {path}: {problem}")]
    Kek {
        /// The key file.
        path: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },
    /// A listener could not be opened.
    #[error("cannot listen for {what} on {addr}: {source}")]
    Listen {
        /// Which listener.
        what: &'static str,
        /// Where.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Restoring nodes and exports failed.
    #[error("restoring the stored configuration failed: {0}")]
    Restore(#[from] ApiError),
    /// The engine failed to start or stop.
    #[error("volume engine: {0}")]
    Service(#[from] ServiceError),
    /// The engine is not available in this build.
    #[error("{0}")]
    EngineNotWired(String),
    /// A task of the daemon failed.
    #[error("daemon task failed: {0}")]
    Task(String),
}

/// The engine behind the control API: the pool over NVMe/TCP nodes, with volumes on
/// `config.cores` reactor threads (default: every core the process may run on). Call
/// after [`prepare`] (it reads the key-encryption key file).
pub fn real_service(config: &Config) -> Result<Arc<dyn VolumeService>, DaemonError> {
    let path = config.kek_path();
    let bytes = std::fs::read(&path).map_err(io_err("reading the key file", &path))?;
    let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        DaemonError::InvalidConfig(format!(
            "key file {} holds {} bytes; a key-encryption key is exactly 32",
            path.display(),
            bytes.len()
        ))
    })?;
    let cores = config.cores.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let service = crate::pool::service::PoolService::new(
        crate::pipeline::Kek::from_bytes(key),
        config.cluster.levels.clone(),
        cores,
        Arc::new(crate::pool::service::NvmeConnector),
    )
    .map_err(|e| DaemonError::InvalidConfig(format!("starting the engine: {e}")))?
    .with_outage_wait(std::time::Duration::from_secs(
        config.cluster.outage_wait_seconds,
    ))
    .with_rebuild_policy(crate::pool::service::RebuildPolicy {
        grace: std::time::Duration::from_secs(config.cluster.rebuild_grace_seconds),
        bytes_per_second: config
            .cluster
            .rebuild_mib_per_second
            .saturating_mul(1 << 20),
        ..crate::pool::service::RebuildPolicy::default()
    });
    Ok(Arc::new(service))
}

/// Sets up tracing for `config`; `RUST_LOG` overrides the configured level. Call once.
pub fn init_logging(config: &Config) -> Result<(), DaemonError> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log_level))
        .map_err(|e| {
            DaemonError::InvalidConfig(format!("log_level {:?}: {e}", config.log_level))
        })?;
    // Colours only on a terminal: a journal or a log file gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match config.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| DaemonError::InvalidConfig(format!("logging: {e}")))
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError {
    let path = path.to_owned();
    move |source| DaemonError::Io { what, path, source }
}

fn ensure_dir(what: &'static str, dir: &Path) -> Result<(), DaemonError> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(what, dir))
}

/// Creates the data directory (mode 0700) and the key file if they are absent, and
/// checks the key file. Idempotent; [`run`] calls it too.
pub fn prepare(config: &Config) -> Result<(), DaemonError> {
    ensure_dir("data directory", &config.data_dir)?;
    let kek = config.kek_path();
    if let Some(parent) = kek.parent() {
        ensure_dir("key file directory", parent)?;
    }
    match std::fs::metadata(&kek) {
        Ok(m) => {
            let mode = m.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(DaemonError::Kek {
                    path: kek.clone(),
                    problem: format!(
                        "mode {:o} lets group or others read the key; run chmod 600 {}",
                        mode & 0o777,
                        kek.display()
                    ),
                });
            }
            if m.len() != KEK_BYTES as u64 {
                return Err(DaemonError::Kek {
                    path: kek.clone(),
                    problem: format!(
                        "it holds {} bytes, not {KEK_BYTES}; restore the right key file (without it the volumes cannot be opened)",
                        m.len()
                    ),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; KEK_BYTES];
            aws_lc_rs::rand::fill(&mut key).map_err(|_| DaemonError::Kek {
                path: kek.clone(),
                problem: "the system random generator failed".into(),
            })?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&kek)
                .map_err(io_err("creating key file", &kek))?;
            f.write_all(&key)
                .and_then(|()| f.sync_all())
                .map_err(io_err("writing key file", &kek))?;
            tracing::info!(path = %kek.display(), "created a new key-encryption key");
            Ok(())
        }
        Err(e) => Err(DaemonError::Io {
            what: "key file",
            path: kek,
            source: e,
        }),
    }
}

/// Binds the API's Unix socket with mode 0600 (see [`crate::unix_socket`]); a live
/// socket at `path` means another dpud runs.
async fn bind_api_socket(path: &Path) -> Result<tokio::net::UnixListener, DaemonError> {
    let listen_err = |source| DaemonError::Listen {
        what: "the control API",
        addr: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        ensure_dir("API socket directory", parent)?;
    }
    crate::unix_socket::bind_private(path, "another process (another dpud?) listens there")
        .await
        .map_err(listen_err)
}

/// Binds a TCP listener for `what` at `addr`; returns it with the address it got
/// (`addr` may ask for any port).
async fn bind_tcp(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(tokio::net::TcpListener, SocketAddr), DaemonError> {
    let listen_err = |source| DaemonError::Listen {
        what,
        addr: addr.to_string(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(listen_err)?;
    let local = listener.local_addr().map_err(listen_err)?;
    Ok((listener, local))
}

/// A running daemon. Stop it with [`DaemonHandle::shutdown`]; dropping it without
/// doing so leaves the tasks running until the runtime ends.
#[derive(Debug)]
pub struct DaemonHandle {
    api_socket: PathBuf,
    api_tcp: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<Result<(), String>>)>,
    plane: Arc<ControlPlane>,
    frontends: Arc<DaemonFrontends>,
    net: Arc<crate::net::control::NetControl>,
}

impl DaemonHandle {
    /// The control API's Unix socket.
    #[must_use]
    pub fn api_socket(&self) -> &Path {
        &self.api_socket
    }

    /// The control API's TCP address, when configured.
    #[must_use]
    pub fn api_tcp(&self) -> Option<SocketAddr> {
        self.api_tcp
    }

    /// The metrics endpoint's address, when configured.
    #[must_use]
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// The NBD Unix socket, when it listens.
    #[must_use]
    pub fn nbd_socket(&self) -> Option<&Path> {
        self.frontends.nbd_socket()
    }

    /// The NBD TCP address, when it listens.
    #[must_use]
    pub fn nbd_tcp(&self) -> Option<SocketAddr> {
        self.frontends.nbd_tcp()
    }

    /// The NVMe/TCP address, when it listens.
    #[must_use]
    pub fn nvme_tcp(&self) -> Option<SocketAddr> {
        self.frontends.nvme_tcp()
    }

    /// Stops the listeners (in-flight API calls finish), lets the front-ends finish
    /// their in-flight I/O, flushes the engine and closes the store.
    pub async fn shutdown(self) -> Result<(), DaemonError> {
        tracing::info!("shutting down: stopping listeners");
        self.stop.send_replace(true);
        let mut failed = None;
        for (what, task) in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(listener = what, error = %e, "listener ended with an error");
                    failed.get_or_insert(DaemonError::Task(format!("{what}: {e}")));
                }
                Err(e) => {
                    failed.get_or_insert(DaemonError::Task(format!("{what}: {e}")));
                }
            }
        }
        let _ = std::fs::remove_file(&self.api_socket);
        self.net.shutdown().await;
        self.frontends.shutdown().await;
        tracing::info!("flushing the volume engine");
        let service = Arc::clone(self.plane.service());
        drop(self.plane);
        service.shutdown().await?;
        tracing::info!("stopped");
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Waits for SIGTERM or SIGINT, then stops `handle` ([`DaemonHandle::shutdown`]).
/// The signal handlers are installed before this waits, so a signal that arrives
/// while the daemon runs is never the default "terminate now".
pub async fn run_until_signal(handle: DaemonHandle) -> Result<(), DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    let handler = |kind, name: &str| {
        signal(kind).map_err(|e| DaemonError::Task(format!("installing the {name} handler: {e}")))
    };
    let mut term = handler(SignalKind::terminate(), "SIGTERM")?;
    let mut int = handler(SignalKind::interrupt(), "SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    handle.shutdown().await
}

/// Starts the daemon around `service`: prepares the data directory and key file, opens
/// the store, starts the front-ends, hands the stored nodes to the engine and serves
/// the stored exports, then opens the API and metrics listeners.
pub async fn run(
    config: Config,
    service: Arc<dyn VolumeService>,
) -> Result<DaemonHandle, DaemonError> {
    config.validate()?;
    prepare(&config)?;
    let store_path = config.store_path();
    let store = tokio::task::spawn_blocking(move || Store::open(&store_path))
        .await
        .map_err(|e| DaemonError::Task(e.to_string()))??;
    tracing::info!(path = %store.path().display(), "store open");
    let mut frontends = DaemonFrontends::start(&config.nbd).await?;
    frontends
        .start_nvme_tcp(&config.nvme_tcp, service.reactors())
        .await?;
    frontends.start_vhost_user_blk(&config.vhost_user_blk, service.reactors())?;
    let frontends = Arc::new(frontends);
    let store = Arc::new(store);
    let net = crate::net::control::NetControl::start(
        config.net.clone(),
        service.reactor_set(),
        Arc::clone(&store),
    )
    .await
    .map_err(|e| DaemonError::InvalidConfig(format!("network module: {e}")))?;
    let plane = Arc::new(ControlPlane::new(
        store,
        Arc::clone(&service),
        Arc::clone(&frontends) as Arc<dyn crate::api::Frontends>,
        config.cluster.levels.clone(),
    ));
    plane.restore().await?;

    let (stop, stop_rx) = watch::channel(false);
    let mut tasks: Vec<(&'static str, JoinHandle<Result<(), String>>)> = Vec::new();
    let api = ControlApi(Arc::clone(&plane));
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let unix = bind_api_socket(&config.api.socket).await?;
    let router = api
        .router(&mut tonic::transport::Server::builder())
        .add_service(crate::api::net::NetworkApi::server(Arc::clone(&net)));
    tasks.push((
        "control API (unix)",
        tokio::spawn({
            let rx = stop_rx.clone();
            async move {
                router
                    .serve_with_incoming_shutdown(UnixListenerStream::new(unix), stopped(rx))
                    .await
                    .map_err(|e| e.to_string())
            }
        }),
    ));
    tracing::info!(socket = %config.api.socket.display(), "control API listening");

    let mut api_tcp = None;
    if let Some(addr) = config.api.tcp {
        let (listener, local) = bind_tcp("the control API", addr).await?;
        api_tcp = Some(local);
        let router = api
            .router(&mut tonic::transport::Server::builder())
            .add_service(crate::api::net::NetworkApi::server(Arc::clone(&net)));
        let rx = stop_rx.clone();
        tasks.push((
            "control API (tcp)",
            tokio::spawn(async move {
                router
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped(rx))
                    .await
                    .map_err(|e| e.to_string())
            }),
        ));
        tracing::info!(%local, "control API listening on TCP");
    }

    let mut metrics_addr = None;
    if let Some(addr) = config.metrics.listen {
        let (listener, local) = bind_tcp("metrics", addr).await?;
        metrics_addr = Some(local);
        let src = metrics::MetricsSource {
            plane: Arc::clone(&plane),
            frontends: Arc::clone(&frontends),
            net: Arc::clone(&net),
        };
        let rx = stop_rx.clone();
        tasks.push((
            "metrics",
            tokio::spawn(async move {
                metrics::serve(listener, src, rx).await;
                Ok(())
            }),
        ));
        tracing::info!(%local, "metrics at http://{local}/metrics");
    }

    Ok(DaemonHandle {
        api_socket: config.api.socket.clone(),
        api_tcp,
        metrics: metrics_addr,
        stop,
        tasks,
        plane,
        frontends,
        net,
    })
}
