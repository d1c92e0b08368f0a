//! A test double of [`VolumeService`]: volumes in memory, for the control API's,
//! the daemon's and `dpuctl`'s tests. The `dpud` binary never uses it.
//!
//! It is honest where the control plane's behaviour depends on it: profiles are
//! resolved with `placement` against the node list the daemon registered, so "the
//! cluster cannot satisfy this profile" comes with placement's real reason, and every
//! device counts its I/O, so the metrics endpoint shows what the test did. What it
//! does not model (nodes going away, rebuilds) the tests set by hand with
//! [`MemoryVolumeService::set_volume_state`] and [`MemoryVolumeService::set_node_status`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use futures::FutureExt as _;
use std::time::Instant;

use crate::frontend::{BlockDevice, DeviceFuture, MemoryDevice};

use super::service::{
    cluster_map, ClusterStatus, LatencyHistogram, NodeSpec, NodeStatus, RebuildProgress,
    ServiceError, ServiceFuture, VolumeInfo, VolumeMetrics, VolumeService, VolumeState,
    VolumeStatus,
};

/// The largest volume the double holds (its bytes live in memory).
pub const MAX_TEST_VOLUME_BYTES: u64 = 1 << 30;

const BLOCK: u32 = 4096;

#[derive(Debug, Default)]
struct Counters {
    reads: u64,
    writes: u64,
    read_bytes: u64,
    write_bytes: u64,
    flushes: u64,
    errors: u64,
    read_latency: Option<LatencyHistogram>,
    write_latency: Option<LatencyHistogram>,
}

/// A memory device that counts its I/O. Resizing swaps the memory behind it, so a
/// front-end holding the device sees the new size, as it would with the engine's.
#[derive(Debug)]
struct CountingDevice {
    inner: RwLock<Arc<MemoryDevice>>,
    counters: Arc<Mutex<Counters>>,
}

enum Op {
    Read(u64),
    Write(u64),
    Flush,
}

impl CountingDevice {
    fn mem(&self) -> Arc<MemoryDevice> {
        Arc::clone(&self.inner.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the memory with `size_bytes`, keeping the bytes both sizes hold.
    fn resize(&self, size_bytes: u64) -> Result<(), ServiceError> {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        let fresh = MemoryDevice::new(size_bytes, BLOCK);
        let keep = inner.size_bytes().min(size_bytes);
        if keep > 0 {
            // Memory devices complete at once; their futures are ready when made.
            let bytes = inner
                .read(0, keep)
                .now_or_never()
                .ok_or_else(|| ServiceError::Internal("memory read did not complete".into()))?
                .map_err(|e| ServiceError::Internal(e.to_string()))?;
            fresh
                .write(0, bytes, false)
                .now_or_never()
                .ok_or_else(|| ServiceError::Internal("memory write did not complete".into()))?
                .map_err(|e| ServiceError::Internal(e.to_string()))?;
        }
        *inner = Arc::new(fresh);
        Ok(())
    }

    fn account(&self, op: Op, start: Instant, ok: bool) {
        let secs = start.elapsed().as_secs_f64();
        let Ok(mut c) = self.counters.lock() else {
            return;
        };
        if !ok {
            c.errors += 1;
            return;
        }
        match op {
            Op::Read(n) => {
                c.reads += 1;
                c.read_bytes += n;
                c.read_latency
                    .get_or_insert_with(|| LatencyHistogram::new(&LatencyHistogram::DEFAULT_BOUNDS))
                    .record(secs);
            }
            Op::Write(n) => {
                c.writes += 1;
                c.write_bytes += n;
                c.write_latency
                    .get_or_insert_with(|| LatencyHistogram::new(&LatencyHistogram::DEFAULT_BOUNDS))
                    .record(secs);
            }
            Op::Flush => c.flushes += 1,
        }
    }
}

impl BlockDevice for CountingDevice {
    fn size_bytes(&self) -> u64 {
        self.mem().size_bytes()
    }
    fn block_size(&self) -> u32 {
        self.mem().block_size()
    }
    fn read_only(&self) -> bool {
        BlockDevice::read_only(&*self.mem())
    }
    fn volatile_write_cache(&self) -> bool {
        self.mem().volatile_write_cache()
    }
    fn read(&self, offset: u64, len: u64) -> DeviceFuture<'_, Vec<u8>> {
        Box::pin(async move {
            let start = Instant::now();
            let r = self.mem().read(offset, len).await;
            self.account(Op::Read(len), start, r.is_ok());
            r
        })
    }
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> DeviceFuture<'_, ()> {
        Box::pin(async move {
            let start = Instant::now();
            let len = data.len() as u64;
            let r = self.mem().write(offset, data, fua).await;
            self.account(Op::Write(len), start, r.is_ok());
            r
        })
    }
    fn flush(&self) -> DeviceFuture<'_, ()> {
        Box::pin(async move {
            let start = Instant::now();
            let r = self.mem().flush().await;
            self.account(Op::Flush, start, r.is_ok());
            r
        })
    }
    fn discard(&self, offset: u64, len: u64) -> DeviceFuture<'_, ()> {
        let mem = self.mem();
        Box::pin(async move { mem.discard(offset, len).await })
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> DeviceFuture<'_, ()> {
        Box::pin(async move {
            let start = Instant::now();
            let r = self.mem().write_zeroes(offset, len, fua).await;
            self.account(Op::Write(len), start, r.is_ok());
            r
        })
    }
}

#[derive(Debug)]
struct Volume {
    info: VolumeInfo,
    device: Arc<CountingDevice>,
    pending_repairs: u64,
}

#[derive(Debug, Default)]
struct State {
    nodes: Vec<NodeSpec>,
    node_status: BTreeMap<String, NodeStatus>,
    volumes: BTreeMap<String, Volume>,
    rebuilds: Vec<RebuildProgress>,
    shut_down: bool,
    set_nodes_calls: u64,
}

/// The test double. See the module documentation.
#[derive(Debug)]
pub struct MemoryVolumeService {
    levels: Vec<String>,
    state: Mutex<State>,
}

impl MemoryVolumeService {
    /// A service with no nodes and no volumes; profiles resolve against a cluster map
    /// with these failure-domain `levels` (outermost first, the last the node).
    #[must_use]
    pub fn new(levels: &[String]) -> Self {
        Self {
            levels: levels.to_vec(),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, ServiceError> {
        self.state
            .lock()
            .map_err(|_| ServiceError::Internal("test double state poisoned".into()))
    }

    /// Sets a volume's health and pending repairs (the double has no nodes to lose).
    pub fn set_volume_state(&self, name: &str, state: VolumeState, pending_repairs: u64) {
        if let Ok(mut s) = self.state.lock() {
            if let Some(v) = s.volumes.get_mut(name) {
                v.info.state = state;
                v.pending_repairs = pending_repairs;
            }
        }
    }

    /// Sets what the engine observes of a node.
    pub fn set_node_status(
        &self,
        name: &str,
        reachable: bool,
        errors: u64,
        last_error: Option<&str>,
    ) {
        if let Ok(mut s) = self.state.lock() {
            s.node_status.insert(
                name.to_owned(),
                NodeStatus {
                    name: name.to_owned(),
                    reachable,
                    errors,
                    last_error: last_error.map(str::to_owned),
                    pieces: 0,
                },
            );
        }
    }

    /// Records a rebuild in progress.
    pub fn set_rebuild(&self, volume: &str, done_bytes: u64, total_bytes: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.rebuilds.retain(|r| r.volume != volume);
            s.rebuilds.push(RebuildProgress {
                volume: volume.to_owned(),
                done_bytes,
                total_bytes,
            });
        }
    }

    /// The node list last registered with [`VolumeService::set_nodes`].
    #[must_use]
    pub fn nodes(&self) -> Vec<NodeSpec> {
        self.state
            .lock()
            .map(|s| s.nodes.clone())
            .unwrap_or_default()
    }

    /// How many times `set_nodes` was called.
    #[must_use]
    pub fn set_nodes_calls(&self) -> u64 {
        self.state.lock().map(|s| s.set_nodes_calls).unwrap_or(0)
    }

    /// Whether [`VolumeService::shutdown`] was called.
    #[must_use]
    pub fn was_shut_down(&self) -> bool {
        self.state.lock().map(|s| s.shut_down).unwrap_or(false)
    }

    fn check_size(size_bytes: u64) -> Result<(), ServiceError> {
        if size_bytes == 0 || size_bytes % u64::from(BLOCK) != 0 {
            return Err(ServiceError::InvalidArgument(format!(
                "size {size_bytes} is not a positive multiple of {BLOCK} bytes"
            )));
        }
        if size_bytes > MAX_TEST_VOLUME_BYTES {
            return Err(ServiceError::InvalidArgument(format!(
                "the in-memory test service holds volumes of at most {MAX_TEST_VOLUME_BYTES} bytes"
            )));
        }
        Ok(())
    }
}

fn new_device(size_bytes: u64, counters: Arc<Mutex<Counters>>) -> Arc<CountingDevice> {
    Arc::new(CountingDevice {
        inner: RwLock::new(Arc::new(MemoryDevice::new(size_bytes, BLOCK))),
        counters,
    })
}

impl VolumeService for MemoryVolumeService {
    fn create_volume(
        &self,
        name: &str,
        profile: placement::Profile,
        size_bytes: u64,
    ) -> ServiceFuture<'_, VolumeInfo> {
        let name = name.to_owned();
        Box::pin(async move {
            Self::check_size(size_bytes)?;
            let mut s = self.lock()?;
            if s.shut_down {
                return Err(ServiceError::Unavailable("the service is shut down".into()));
            }
            if s.volumes.contains_key(&name) {
                return Err(ServiceError::AlreadyExists(format!(
                    "a volume named {name:?} already exists"
                )));
            }
            let map = cluster_map(&self.levels, &s.nodes).map_err(|e| {
                ServiceError::Internal(format!("the node list is inconsistent: {e}"))
            })?;
            let resolved = profile
                .resolve(&map)
                .map_err(|e| ServiceError::Unsatisfiable {
                    profile: profile.name.clone(),
                    reason: e.to_string(),
                })?;
            let info = VolumeInfo {
                name: name.clone(),
                profile: profile.name.clone(),
                layout: resolved.layout.to_string(),
                size_bytes,
                block_size: BLOCK,
                state: VolumeState::Healthy,
            };
            let device = new_device(size_bytes, Arc::default());
            s.volumes.insert(
                name,
                Volume {
                    info: info.clone(),
                    device,
                    pending_repairs: 0,
                },
            );
            Ok(info)
        })
    }

    fn delete_volume(&self, name: &str) -> ServiceFuture<'_, ()> {
        let name = name.to_owned();
        Box::pin(async move {
            let mut s = self.lock()?;
            s.volumes
                .remove(&name)
                .map(|_| ())
                .ok_or_else(|| ServiceError::NotFound(format!("there is no volume named {name:?}")))
        })
    }

    fn resize_volume(&self, name: &str, size_bytes: u64) -> ServiceFuture<'_, VolumeInfo> {
        let name = name.to_owned();
        Box::pin(async move {
            Self::check_size(size_bytes)?;
            let mut s = self.lock()?;
            let v = s.volumes.get_mut(&name).ok_or_else(|| {
                ServiceError::NotFound(format!("there is no volume named {name:?}"))
            })?;
            v.device.resize(size_bytes)?;
            v.info.size_bytes = size_bytes;
            Ok(v.info.clone())
        })
    }

    fn list_volumes(&self) -> ServiceFuture<'_, Vec<VolumeInfo>> {
        Box::pin(async move {
            Ok(self
                .lock()?
                .volumes
                .values()
                .map(|v| v.info.clone())
                .collect())
        })
    }

    fn device(&self, name: &str) -> ServiceFuture<'_, Option<Arc<dyn BlockDevice>>> {
        let name = name.to_owned();
        Box::pin(async move {
            Ok(self
                .lock()?
                .volumes
                .get(&name)
                .map(|v| Arc::clone(&v.device) as Arc<dyn BlockDevice>))
        })
    }

    fn set_nodes(&self, nodes: Vec<NodeSpec>) -> ServiceFuture<'_, ()> {
        Box::pin(async move {
            cluster_map(&self.levels, &nodes)
                .map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
            let mut s = self.lock()?;
            s.nodes = nodes;
            s.set_nodes_calls += 1;
            Ok(())
        })
    }

    fn status(&self) -> ServiceFuture<'_, ClusterStatus> {
        Box::pin(async move {
            let s = self.lock()?;
            let nodes = s
                .nodes
                .iter()
                .map(|n| {
                    s.node_status.get(&n.name).cloned().unwrap_or(NodeStatus {
                        name: n.name.clone(),
                        reachable: true,
                        errors: 0,
                        last_error: None,
                        pieces: 0,
                    })
                })
                .collect();
            let volumes = s
                .volumes
                .values()
                .map(|v| VolumeStatus {
                    name: v.info.name.clone(),
                    state: v.info.state,
                    pending_repairs: v.pending_repairs,
                })
                .collect();
            Ok(ClusterStatus {
                nodes,
                volumes,
                rebuilds: s.rebuilds.clone(),
            })
        })
    }

    fn metrics(&self) -> ServiceFuture<'_, Vec<VolumeMetrics>> {
        Box::pin(async move {
            let s = self.lock()?;
            let mut out = Vec::with_capacity(s.volumes.len());
            for v in s.volumes.values() {
                let c = v
                    .device
                    .counters
                    .lock()
                    .map_err(|_| ServiceError::Internal("counters poisoned".into()))?;
                let empty = LatencyHistogram::new(&LatencyHistogram::DEFAULT_BOUNDS);
                out.push(VolumeMetrics {
                    name: v.info.name.clone(),
                    reads: c.reads,
                    writes: c.writes,
                    read_bytes: c.read_bytes,
                    write_bytes: c.write_bytes,
                    flushes: c.flushes,
                    errors: c.errors,
                    read_latency: c.read_latency.clone().unwrap_or_else(|| empty.clone()),
                    write_latency: c.write_latency.clone().unwrap_or(empty),
                    degraded: v.info.state != VolumeState::Healthy,
                });
            }
            Ok(out)
        })
    }

    fn shutdown(&self) -> ServiceFuture<'_, ()> {
        Box::pin(async move {
            let devices: Vec<_> = {
                let mut s = self.lock()?;
                s.shut_down = true;
                s.volumes.values().map(|v| Arc::clone(&v.device)).collect()
            };
            for d in devices {
                d.flush()
                    .await
                    .map_err(|e| ServiceError::Internal(e.to_string()))?;
            }
            Ok(())
        })
    }
}

/// Connects a gRPC channel to a control API Unix socket (for tests and tools).
pub async fn connect_unix(
    path: &std::path::Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_owned();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(&path).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    tonic::transport::Endpoint::from_static("http://dpud.local")
        .connect_with_connector(connector)
        .await
}

/// A daemon running in-process around [`MemoryVolumeService`], for tests.
#[derive(Debug)]
pub struct TestDaemon {
    /// The running daemon.
    pub handle: crate::daemon::DaemonHandle,
    /// The test double behind it.
    pub service: Arc<MemoryVolumeService>,
    /// The configuration it runs with.
    pub config: crate::daemon::Config,
}

impl TestDaemon {
    /// Starts a daemon with [`crate::daemon::Config::for_tests`] under `dir` and a new
    /// test double.
    pub async fn start(dir: &std::path::Path) -> Result<Self, crate::daemon::DaemonError> {
        let config = crate::daemon::Config::for_tests(dir);
        let service = Arc::new(MemoryVolumeService::new(&config.cluster.levels));
        Self::start_with(config, service).await
    }

    /// Starts a daemon with `config` around `service` (to restart over the same
    /// engine state).
    pub async fn start_with(
        config: crate::daemon::Config,
        service: Arc<MemoryVolumeService>,
    ) -> Result<Self, crate::daemon::DaemonError> {
        let handle = crate::daemon::run(
            config.clone(),
            Arc::clone(&service) as Arc<dyn VolumeService>,
        )
        .await?;
        Ok(Self {
            handle,
            service,
            config,
        })
    }
}
