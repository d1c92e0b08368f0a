//! The engine behind dpud's control API: [`VolumeService`] over the pool, with volumes
//! served from the reactors.
//!
//! The control plane registers nodes; the first time it hands over a node list the
//! service connects to them (NVMe/TCP) and either recovers the cluster they hold (any
//! formatted node is enough: the catalogue names the others) or, when they are all
//! blank, creates a new cluster on them. Later node lists add nodes, mark them draining
//! or remove them. A volume is opened on first use (an export asks for its device) on
//! the next reactor, and stays open until it is deleted or the daemon stops.
//!
//! The rebuild supervisor opens the volumes that have pieces to move as well. A volume
//! it opened that nobody else asked for (no export) is closed again (flushed,
//! checkpointed and released) once its rebuild has nothing left to move, or when its
//! rebuild could not start; the next round opens it again while pieces remain. The
//! moment someone asks for its device (an export added while it rebuilds), the volume
//! is theirs and stays open. Opening and closing a volume are serialised per name (a
//! `pending` entry others wait on), so a device asked for while the supervisor closes
//! the volume is the volume opened again after the close, never a second writer or a
//! closed handle.
//!
//! Nothing here holds a lock across an `.await`: the maps behind the mutex are cloned
//! out (pool handles and devices are cheap `Arc`s) before any call into the engine.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::{NodeConnector, NodeSpec as PoolNode, Pool, PoolError, DEFAULT_CHUNK_SIZE};
use crate::api::service::{
    ClusterStatus, NodeAdminState, NodeSpec, NodeStatus, RebuildProgress, ServiceError,
    ServiceFuture, VolumeInfo, VolumeMetrics, VolumeService, VolumeState, VolumeStatus,
};
use crate::frontend::BlockDevice;
use crate::pipeline::Kek;
use crate::reactor::Reactors;
use crate::shard::{NvmeShard, NvmeShardConfig, ShardStore};
use crate::volume::device::VolumeDevice;

/// Connects to nodes over NVMe/TCP (namespace 1 of the node's subsystem).
#[derive(Debug, Default)]
pub struct NvmeConnector;

impl NvmeConnector {
    async fn connect_spec(node: &PoolNode) -> Result<Arc<dyn ShardStore>, String> {
        let addr: SocketAddr = match node.address.parse() {
            Ok(a) => a,
            Err(_) => tokio::net::lookup_host(&node.address)
                .await
                .map_err(|e| format!("resolving {}: {e}", node.address))?
                .next()
                .ok_or_else(|| format!("{} resolves to no address", node.address))?,
        };
        let mut config = NvmeShardConfig::new(node.id.clone(), addr, &node.nqn, 1);
        // A node that dropped out must not stall I/O: requests fail over to the other
        // pieces at once while the host library reconnects in the background.
        config.host.reconnect_wait = Some(std::time::Duration::ZERO);
        config.host.command_timeout = std::time::Duration::from_secs(10);
        NvmeShard::connect(config)
            .await
            .map(|s| Arc::new(s) as Arc<dyn ShardStore>)
            .map_err(|e| e.to_string())
    }
}

impl NodeConnector for NvmeConnector {
    fn connect(&self, node: &PoolNode) -> super::ConnectFuture<'_> {
        let node = node.clone();
        Box::pin(async move { Self::connect_spec(&node).await })
    }
}

#[derive(Debug, Default)]
struct State {
    pool: Option<Pool>,
    /// Nodes whose probe failed, since when (the supervisor's view).
    down_since: HashMap<String, std::time::Instant>,
    supervising: bool,
    /// Node states as last applied to the pool.
    applied: HashMap<String, NodeAdminState>,
    devices: HashMap<String, Arc<VolumeDevice>>,
    /// Open volumes the supervisor opened to rebuild them and nobody else asked for:
    /// closed when their rebuild is over (see the module documentation).
    rebuild_only: HashSet<String>,
    /// Volumes being opened or closed; the sender side is dropped when that is done.
    pending: HashMap<String, watch::Receiver<()>>,
    /// Volumes the supervisor closed after a complete rebuild, with the nodes it moved
    /// their pieces off: not opened again for those nodes (a volume whose pieces a
    /// complete rebuild did not move would otherwise be opened and closed every round).
    rebuilt: HashMap<String, Vec<String>>,
    unreachable: HashMap<String, String>,
    shut_down: bool,
}

/// Who asks for a volume's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opener {
    /// An export (or anything else that reads or writes it): it stays open.
    User,
    /// The rebuild supervisor: closed once the rebuild is over, unless a user asked too.
    Rebuild,
}

/// Marks a volume as being opened or closed; dropping it lets the waiters go on.
struct Pending<'a> {
    inner: &'a Inner,
    name: String,
    _done: watch::Sender<()>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.inner.lock() {
            s.pending.remove(&self.name);
        }
        // `_done` is dropped after this: the waiters wake to the updated maps.
    }
}

/// The engine as the control plane sees it. See the module documentation.
#[derive(Debug)]
pub struct PoolService {
    inner: Arc<Inner>,
}

impl std::ops::Deref for PoolService {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

/// When pieces are rebuilt away from a node, and how fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildPolicy {
    /// A node unreachable for this long is failed: its pieces are rebuilt elsewhere.
    pub grace: std::time::Duration,
    /// Most bytes of rebuilt pieces written per second, per volume.
    pub bytes_per_second: u64,
    /// How often nodes are probed and rebuilds started.
    pub interval: std::time::Duration,
}

impl Default for RebuildPolicy {
    fn default() -> Self {
        Self {
            grace: std::time::Duration::from_secs(600),
            bytes_per_second: 64 << 20,
            interval: std::time::Duration::from_secs(1),
        }
    }
}

/// The service's state, shared with its rebuild supervisor task.
#[derive(Debug)]
pub struct Inner {
    kek: Kek,
    levels: Vec<String>,
    chunk_size: u64,
    rebuild: RebuildPolicy,
    outage_wait: std::time::Duration,
    reactors: Reactors,
    connector: Arc<dyn NodeConnector>,
    state: Mutex<State>,
}

fn pool_error(e: PoolError) -> ServiceError {
    match e {
        PoolError::NotFound { .. } => ServiceError::NotFound(e.to_string()),
        PoolError::AlreadyExists { .. } => ServiceError::AlreadyExists(e.to_string()),
        PoolError::Unsatisfiable { profile, reason } => {
            ServiceError::Unsatisfiable { profile, reason }
        }
        PoolError::Invalid(m) => ServiceError::InvalidArgument(m),
        PoolError::Closed => ServiceError::Unavailable(e.to_string()),
        PoolError::Metadata(_) | PoolError::Volume(_) => ServiceError::Unavailable(e.to_string()),
        other => ServiceError::Internal(other.to_string()),
    }
}

impl PoolService {
    /// A service with `cores` reactors, failure-domain `levels`, the key-encryption key
    /// and a connector for the nodes (NVMe/TCP in dpud).
    pub fn new(
        kek: Kek,
        levels: Vec<String>,
        cores: usize,
        connector: Arc<dyn NodeConnector>,
    ) -> Result<Self, ServiceError> {
        let reactors = Reactors::start(cores).map_err(|e| ServiceError::Internal(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                kek,
                levels,
                chunk_size: DEFAULT_CHUNK_SIZE,
                rebuild: RebuildPolicy::default(),
                outage_wait: std::time::Duration::ZERO,
                reactors,
                connector,
                state: Mutex::new(State::default()),
            }),
        })
    }

    /// Uses chunks (segment pieces) of `bytes` for a cluster this service creates.
    /// Call before the service is used.
    pub fn with_chunk_size(mut self, bytes: u64) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.chunk_size = bytes;
        }
        self
    }

    /// Lets writes and metadata commits wait up to `wait` for nodes that are all
    /// unreachable at once before they fail (see `Volume::set_outage_wait` and
    /// `Pool::set_outage_wait`); zero, the default, fails them at once. Call before the
    /// service is used.
    pub fn with_outage_wait(mut self, wait: std::time::Duration) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.outage_wait = wait;
        }
        self
    }

    /// Rebuilds pieces per `policy`. Call before the service is used.
    pub fn with_rebuild_policy(mut self, policy: RebuildPolicy) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.rebuild = policy;
        }
        self
    }

    /// Starts the supervisor (once, when the pool exists): every `interval` it probes
    /// the nodes, and hands every volume with pieces on a failed (unreachable longer
    /// than the grace), draining or removed node to its rebuild. Stops with the
    /// service.
    fn supervise(&self) {
        let Ok(mut s) = self.lock() else {
            return;
        };
        if s.supervising {
            return;
        }
        s.supervising = true;
        drop(s);
        let weak = Arc::downgrade(&self.inner);
        let interval = self.rebuild.interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                if inner.lock().map_or(true, |s| s.shut_down) {
                    return;
                }
                inner.supervise_once().await;
                inner.close_rebuilt().await;
            }
        });
    }
}

impl Inner {
    /// One round of the supervisor (see [`PoolService::supervise`]).
    async fn supervise_once(&self) {
        let Ok(pool) = self.pool() else {
            return;
        };
        let (Ok(nodes), Ok(shards)) = (pool.nodes().await, pool.shards().await) else {
            return;
        };
        let probes = shards.into_iter().map(|(id, shard)| async move {
            let ok = tokio::time::timeout(std::time::Duration::from_secs(2), shard.read(0, 4096))
                .await
                .is_ok_and(|r| r.is_ok());
            (id, ok)
        });
        let results = futures::future::join_all(probes).await;
        let now = std::time::Instant::now();
        let mut leaving: Vec<String> = nodes
            .iter()
            .filter(|n| n.state != "up")
            .map(|n| n.spec.id.clone())
            .collect();
        if let Ok(mut s) = self.lock() {
            for (id, ok) in results {
                if ok {
                    s.down_since.remove(&id);
                } else {
                    let since = *s.down_since.entry(id.clone()).or_insert(now);
                    if now.duration_since(since) >= self.rebuild.grace && !leaving.contains(&id) {
                        leaving.push(id);
                    }
                }
            }
        }
        if leaving.is_empty() {
            return;
        }
        let Ok(volumes) = pool.pieces_on(leaving.clone()).await else {
            return;
        };
        for (name, pieces) in volumes {
            let done_before = self.lock().is_ok_and(|s| {
                !s.devices.contains_key(&name)
                    && s.rebuilt
                        .get(&name)
                        .is_some_and(|nodes| leaving.iter().all(|n| nodes.contains(n)))
            });
            if done_before {
                tracing::debug!(volume = %name, pieces, nodes = ?leaving, "pieces remain on nodes a complete rebuild left; not opened again");
                continue;
            }
            let dev = match self.open_device(&name, Opener::Rebuild).await {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(volume = %name, error = %e, "cannot open the volume to rebuild it");
                    continue;
                }
            };
            let before = dev.counters().rebuild;
            match dev
                .rebuild(leaving.clone(), self.rebuild.bytes_per_second)
                .await
            {
                Ok(()) => {
                    if before.is_none() {
                        tracing::info!(volume = %name, pieces, nodes = ?leaving, "rebuild started");
                    }
                }
                Err(e) => {
                    tracing::warn!(volume = %name, error = %e, "rebuild could not start");
                }
            }
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, ServiceError> {
        self.state
            .lock()
            .map_err(|_| ServiceError::Internal("engine state poisoned".into()))
    }

    fn pool(&self) -> Result<Pool, ServiceError> {
        let s = self.lock()?;
        if s.shut_down {
            return Err(ServiceError::Unavailable(
                "the engine is shutting down".into(),
            ));
        }
        s.pool.clone().ok_or_else(|| {
            ServiceError::Unavailable(
                "no storage node registered yet: add nodes with `dpuctl node add`".into(),
            )
        })
    }

    fn pool_spec(n: &NodeSpec) -> PoolNode {
        PoolNode {
            id: n.name.clone(),
            address: n.address.clone(),
            nqn: n.nqn.clone(),
            domain: n.domain.clone(),
            weight: Some(n.weight),
        }
    }

    /// Closes the rebuild-only volumes whose rebuild is over: nothing left to move, or
    /// it never started (it is tried again next round while pieces remain). A volume
    /// someone asked for meanwhile is not rebuild-only any more and is left open.
    async fn close_rebuilt(&self) {
        let closing: Vec<(Arc<VolumeDevice>, Pending<'_>, Option<Vec<String>>)> = {
            let Ok(mut s) = self.lock() else {
                return;
            };
            let names: Vec<String> = s.rebuild_only.iter().cloned().collect();
            let mut closing = Vec::new();
            for name in names {
                if s.pending.contains_key(&name) {
                    continue;
                }
                let Some(dev) = s.devices.get(&name) else {
                    s.rebuild_only.remove(&name);
                    continue;
                };
                let rebuild = dev.counters().rebuild;
                if rebuild.is_some_and(|r| r.pieces_left > 0) {
                    continue;
                }
                let Some(dev) = s.devices.remove(&name) else {
                    continue;
                };
                s.rebuild_only.remove(&name);
                // Complete: started (and so set up) on these nodes, nothing left.
                let nodes =
                    Some(dev.rebuild_nodes()).filter(|n| rebuild.is_some() && !n.is_empty());
                let (done, rx) = watch::channel(());
                s.pending.insert(name.clone(), rx);
                closing.push((
                    dev,
                    Pending {
                        inner: self,
                        name,
                        _done: done,
                    },
                    nodes,
                ));
            }
            closing
        };
        for (dev, pending, nodes) in closing {
            let name = pending.name.clone();
            match dev.close().await {
                Ok(()) => {
                    tracing::info!(volume = %name, rebuilt = nodes.is_some(), "volume opened for its rebuild closed");
                    if let (Some(nodes), Ok(mut s)) = (nodes, self.lock()) {
                        s.rebuilt.insert(name, nodes);
                    }
                }
                Err(e) => {
                    tracing::warn!(volume = %name, error = %e, "closing the volume opened for its rebuild failed");
                }
            }
            drop(pending);
        }
    }

    /// Waits until nobody is opening or closing `name`, then runs `f` on the state
    /// (under the lock).
    async fn settled<T>(
        &self,
        name: &str,
        mut f: impl FnMut(&mut State) -> T,
    ) -> Result<T, ServiceError> {
        loop {
            let wait = {
                let mut s = self.lock()?;
                match s.pending.get(name) {
                    Some(rx) => rx.clone(),
                    None => return Ok(f(&mut s)),
                }
            };
            let mut wait = wait;
            // Err: the sender is gone, which is what is waited for.
            let _done = wait.changed().await;
        }
    }

    fn pending<'a>(&'a self, s: &mut State, name: &str) -> Pending<'a> {
        let (done, rx) = watch::channel(());
        s.pending.insert(name.to_owned(), rx);
        Pending {
            inner: self,
            name: name.to_owned(),
            _done: done,
        }
    }

    async fn close_device(&self, name: &str) -> Result<(), ServiceError> {
        let closing = self
            .settled(name, |s| {
                s.rebuild_only.remove(name);
                s.rebuilt.remove(name);
                let dev = s.devices.remove(name)?;
                Some((dev, self.pending(s, name)))
            })
            .await?;
        if let Some((dev, pending)) = closing {
            let r = dev.close().await;
            drop(pending);
            r.map_err(|e| ServiceError::Unavailable(format!("closing volume {name}: {e}")))?;
        }
        Ok(())
    }

    async fn open_device(
        &self,
        name: &str,
        by: Opener,
    ) -> Result<Option<Arc<VolumeDevice>>, ServiceError> {
        let found = self
            .settled(name, |s| match s.devices.get(name) {
                Some(d) => {
                    if by == Opener::User {
                        s.rebuild_only.remove(name);
                    }
                    Ok(Arc::clone(d))
                }
                None => Err(self.pending(s, name)),
            })
            .await?;
        let pending = match found {
            Ok(d) => return Ok(Some(d)),
            Err(p) => p,
        };
        let pool = self.pool()?;
        let volumes = pool.volumes().await.map_err(pool_error)?;
        if !volumes.iter().any(|v| v.name == name) {
            return Ok(None);
        }
        let owner = name.to_owned();
        let outage_wait = self.outage_wait;
        let opened = self
            .reactors
            .run(async move {
                let mut volume = pool.open_volume(&owner, false).await?;
                volume.set_outage_wait(outage_wait);
                let id = volume.config().id;
                let release = pool.clone();
                Ok::<_, PoolError>(VolumeDevice::spawn(owner, volume, async move {
                    release.close_volume(id).await;
                }))
            })
            .await
            .ok_or_else(|| ServiceError::Internal("the reactor dropped the open".into()))?
            .map_err(pool_error)?;
        let mut s = self.lock()?;
        s.devices.insert(name.to_owned(), Arc::clone(&opened));
        match by {
            Opener::Rebuild => {
                s.rebuild_only.insert(name.to_owned());
            }
            Opener::User => {
                // Written to from now on: a later rebuild may find pieces to move again.
                s.rebuilt.remove(name);
            }
        }
        drop(s);
        drop(pending);
        Ok(Some(opened))
    }

    async fn apply_nodes(&self, nodes: Vec<NodeSpec>) -> Result<(), ServiceError> {
        let existing = self.lock()?.pool.clone();
        let Some(pool) = existing else {
            return self.first_nodes(nodes).await;
        };
        let known: Vec<String> = pool
            .nodes()
            .await
            .map_err(pool_error)?
            .into_iter()
            .map(|n| n.spec.id)
            .collect();
        for n in &nodes {
            if n.state != NodeAdminState::Removed && !known.contains(&n.name) {
                let spec = Self::pool_spec(n);
                match self.connector.connect(&spec).await {
                    Ok(shard) => pool.add_node(spec, shard).await.map_err(pool_error)?,
                    Err(reason) => {
                        self.lock()?
                            .unreachable
                            .insert(n.name.clone(), reason.clone());
                        return Err(ServiceError::Unavailable(format!(
                            "node {} at {} cannot be reached: {reason}",
                            n.name, n.address
                        )));
                    }
                }
            }
            let before = self.lock()?.applied.get(&n.name).copied();
            if known.contains(&n.name) && before != Some(n.state) {
                let state = match n.state {
                    NodeAdminState::Up => "up",
                    NodeAdminState::Draining => "draining",
                    NodeAdminState::Removed => "out",
                };
                pool.set_node_state(&n.name, state)
                    .await
                    .map_err(pool_error)?;
            }
            self.lock()?.applied.insert(n.name.clone(), n.state);
        }
        Ok(())
    }

    /// The first node list: recover the cluster the nodes hold, or create one.
    async fn first_nodes(&self, nodes: Vec<NodeSpec>) -> Result<(), ServiceError> {
        let live: Vec<&NodeSpec> = nodes
            .iter()
            .filter(|n| n.state != NodeAdminState::Removed)
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        let mut shards = Vec::new();
        let mut failed = Vec::new();
        for n in &live {
            match self.connector.connect(&Self::pool_spec(n)).await {
                Ok(s) => shards.push(((*n).clone(), s)),
                Err(reason) => failed.push((n.name.clone(), reason)),
            }
        }
        let mut formatted = false;
        for (_, s) in &shards {
            if let Ok(Some(_)) = crate::metadata::read_superblock(&**s).await {
                formatted = true;
            }
        }
        let pool = if formatted {
            let seeds = shards.iter().map(|(_, s)| Arc::clone(s)).collect();
            let pool = Pool::recover(seeds, self.kek.clone(), &*self.connector)
                .await
                .map_err(pool_error)?;
            // Nodes registered here that the cluster does not know yet join it.
            let known: Vec<String> = pool
                .nodes()
                .await
                .map_err(pool_error)?
                .into_iter()
                .map(|n| n.spec.id)
                .collect();
            for (n, s) in shards {
                if !known.contains(&n.name) {
                    pool.add_node(Self::pool_spec(&n), s)
                        .await
                        .map_err(pool_error)?;
                }
            }
            pool
        } else {
            if !failed.is_empty() {
                return Err(ServiceError::Unavailable(format!(
                    "cannot create the cluster while nodes are unreachable: {}",
                    failed
                        .iter()
                        .map(|(n, r)| format!("{n}: {r}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                )));
            }
            let list = shards
                .into_iter()
                .map(|(n, s)| (Self::pool_spec(&n), s))
                .collect();
            Pool::create(list, self.kek.clone(), self.chunk_size, self.levels.clone())
                .await
                .map_err(pool_error)?
        };
        pool.set_outage_wait(self.outage_wait).await;
        let mut s = self.lock()?;
        for (name, reason) in failed {
            s.unreachable.insert(name, reason);
        }
        for n in &nodes {
            s.applied.insert(n.name.clone(), n.state);
        }
        s.pool = Some(pool);
        Ok(())
    }

    fn info(v: &super::VolumeInfo, degraded: bool) -> VolumeInfo {
        VolumeInfo {
            name: v.name.clone(),
            profile: v.profile.clone(),
            layout: v.layout.clone(),
            size_bytes: v.size_bytes,
            block_size: 4096,
            state: if degraded {
                VolumeState::Degraded
            } else {
                VolumeState::Healthy
            },
        }
    }

    fn degraded(&self, name: &str) -> bool {
        self.lock()
            .ok()
            .and_then(|s| s.devices.get(name).map(|d| d.counters().degraded))
            .unwrap_or(false)
    }
}

impl VolumeService for PoolService {
    fn create_volume(
        &self,
        name: &str,
        profile: placement::Profile,
        size_bytes: u64,
    ) -> ServiceFuture<'_, VolumeInfo> {
        let name = name.to_owned();
        Box::pin(async move {
            let pool = self.pool()?;
            let v = pool
                .create_volume(&name, profile, size_bytes)
                .await
                .map_err(pool_error)?;
            Ok(Inner::info(&v, false))
        })
    }

    fn delete_volume(&self, name: &str) -> ServiceFuture<'_, ()> {
        let name = name.to_owned();
        Box::pin(async move {
            let pool = self.pool()?;
            self.close_device(&name).await?;
            pool.delete_volume(&name).await.map_err(pool_error)
        })
    }

    fn resize_volume(&self, name: &str, size_bytes: u64) -> ServiceFuture<'_, VolumeInfo> {
        let name = name.to_owned();
        Box::pin(async move {
            let pool = self.pool()?;
            // An open volume (exported, or being rebuilt) grows in place: its exports
            // keep their connections, and new ones see the new size.
            let open = self
                .settled(&name, |s| s.devices.get(&name).cloned())
                .await?;
            let Some(dev) = open else {
                let v = pool
                    .resize_volume(&name, size_bytes)
                    .await
                    .map_err(pool_error)?;
                return Ok(Inner::info(&v, false));
            };
            let v = pool
                .grow_open_volume(&name, size_bytes)
                .await
                .map_err(pool_error)?;
            dev.grow(v.size_bytes).await.map_err(|e| {
                ServiceError::Unavailable(format!(
                    "volume {name} is recorded with its new size but the open volume did not grow \
                     (it will when opened again): {e}"
                ))
            })?;
            Ok(Inner::info(&v, false))
        })
    }

    fn list_volumes(&self) -> ServiceFuture<'_, Vec<VolumeInfo>> {
        Box::pin(async move {
            let pool = match self.pool() {
                Ok(p) => p,
                Err(ServiceError::Unavailable(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let mut list: Vec<VolumeInfo> = pool
                .volumes()
                .await
                .map_err(pool_error)?
                .iter()
                .map(|v| Inner::info(v, self.degraded(&v.name)))
                .collect();
            list.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(list)
        })
    }

    fn device(&self, name: &str) -> ServiceFuture<'_, Option<Arc<dyn BlockDevice>>> {
        let name = name.to_owned();
        Box::pin(async move {
            Ok(self
                .open_device(&name, Opener::User)
                .await?
                .map(|d| d as Arc<dyn BlockDevice>))
        })
    }

    fn set_nodes(&self, nodes: Vec<NodeSpec>) -> ServiceFuture<'_, ()> {
        Box::pin(async move {
            let r = self.apply_nodes(nodes).await;
            if self.pool().is_ok() {
                self.supervise();
            }
            r
        })
    }

    fn status(&self) -> ServiceFuture<'_, ClusterStatus> {
        Box::pin(async move {
            let Ok(pool) = self.pool() else {
                return Ok(ClusterStatus::default());
            };
            let (unreachable, down) = {
                let s = self.lock()?;
                (s.unreachable.clone(), s.down_since.clone())
            };
            let nodes = pool
                .nodes()
                .await
                .map_err(pool_error)?
                .into_iter()
                .map(|n| NodeStatus {
                    reachable: n.connected && !down.contains_key(&n.spec.id),
                    errors: 0,
                    last_error: unreachable.get(&n.spec.id).cloned(),
                    pieces: u64::from(n.chunks_used),
                    name: n.spec.id,
                })
                .collect();
            let devices: Vec<Arc<VolumeDevice>> = self.lock()?.devices.values().cloned().collect();
            let volumes = pool
                .volumes()
                .await
                .map_err(pool_error)?
                .into_iter()
                .map(|v| {
                    let c = devices
                        .iter()
                        .find(|d| d.name() == v.name)
                        .map(|d| d.counters());
                    let rebuilding = c
                        .as_ref()
                        .and_then(|c| c.rebuild)
                        .is_some_and(|r| r.pieces_left > 0);
                    VolumeStatus {
                        state: if rebuilding {
                            VolumeState::Rebuilding
                        } else if c.as_ref().is_some_and(|c| c.degraded) {
                            VolumeState::Degraded
                        } else {
                            VolumeState::Healthy
                        },
                        pending_repairs: c.map_or(0, |c| c.pending_repairs),
                        name: v.name,
                    }
                })
                .collect();
            let mut rebuilds: Vec<RebuildProgress> = devices
                .iter()
                .filter_map(|d| {
                    let r = d.counters().rebuild?;
                    (r.pieces_left > 0).then(|| RebuildProgress {
                        volume: d.name().to_owned(),
                        done_bytes: r.done_bytes,
                        total_bytes: r.total_bytes,
                    })
                })
                .collect();
            rebuilds.sort_by(|a, b| a.volume.cmp(&b.volume));
            Ok(ClusterStatus {
                nodes,
                volumes,
                rebuilds,
            })
        })
    }

    fn metrics(&self) -> ServiceFuture<'_, Vec<VolumeMetrics>> {
        Box::pin(async move {
            let devices: Vec<Arc<VolumeDevice>> = self.lock()?.devices.values().cloned().collect();
            Ok(devices
                .iter()
                .map(|d| {
                    let c = d.counters();
                    VolumeMetrics {
                        name: d.name().to_owned(),
                        reads: c.reads,
                        writes: c.writes,
                        read_bytes: c.read_bytes,
                        write_bytes: c.write_bytes,
                        flushes: c.flushes,
                        errors: c.errors,
                        read_latency: c.read_latency,
                        write_latency: c.write_latency,
                        degraded: c.degraded,
                    }
                })
                .collect())
        })
    }

    fn reactors(&self) -> Vec<tokio::runtime::Handle> {
        self.reactors.handles()
    }

    fn shutdown(&self) -> ServiceFuture<'_, ()> {
        Box::pin(async move {
            let devices: Vec<(String, Arc<VolumeDevice>)> = {
                let mut s = self.lock()?;
                s.shut_down = true;
                s.rebuild_only.clear();
                s.devices.drain().collect()
            };
            let mut errors = Vec::new();
            for (name, d) in devices {
                if let Err(e) = d.close().await {
                    errors.push(format!("{name}: {e}"));
                }
            }
            if errors.is_empty() {
                Ok(())
            } else {
                Err(ServiceError::Unavailable(format!(
                    "flushing at shutdown: {}",
                    errors.join("; ")
                )))
            }
        })
    }

    fn reactor_set(&self) -> Option<crate::reactor::ReactorHandles> {
        Some(self.reactors.shared())
    }
}
