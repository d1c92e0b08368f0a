//! The boundary between the control plane and the volume engine.
//!
//! The control API owns names, validation and the local store (profiles, nodes,
//! exports); the engine owns volumes, whose truth lives on the storage nodes. This trait
//! is the whole contract between the two, so the API, the daemon shell and `dpuctl` can
//! be built and tested against a test double ([`super::testing::MemoryVolumeService`])
//! while the engine's pool implements it for real. Futures are boxed and `Send`, like
//! [`crate::frontend::BlockDevice`]'s, so an implementation may forward each call to the
//! reactor that owns the volume.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::frontend::BlockDevice;

/// The future every service call returns.
pub type ServiceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ServiceError>> + Send + 'a>>;

/// Why the engine refused or failed a request. The control API maps each variant to one
/// gRPC status code; the message is shown to the operator as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// The named volume does not exist (gRPC NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// The name is taken (gRPC ALREADY_EXISTS).
    #[error("{0}")]
    AlreadyExists(String),
    /// The registered nodes cannot hold the profile (gRPC FAILED_PRECONDITION); `reason`
    /// is placement's explanation.
    #[error("the cluster cannot satisfy profile {profile:?}: {reason}")]
    Unsatisfiable {
        /// The profile's name.
        profile: String,
        /// Why (placement's message).
        reason: String,
    },
    /// The request is wrong in itself (gRPC INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// The engine cannot serve it now (too many nodes unreachable, shutting down);
    /// retrying later may work (gRPC UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a local failure (gRPC INTERNAL).
    #[error("{0}")]
    Internal(String),
}

impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> Self {
        let msg = e.to_string();
        match e {
            ServiceError::NotFound(_) => Self::not_found(msg),
            ServiceError::AlreadyExists(_) => Self::already_exists(msg),
            ServiceError::Unsatisfiable { .. } => Self::failed_precondition(msg),
            ServiceError::InvalidArgument(_) => Self::invalid_argument(msg),
            ServiceError::Unavailable(_) => Self::unavailable(msg),
            ServiceError::Internal(_) => Self::internal(msg),
        }
    }
}

/// What the operator has decided about a node (the engine adds what it observes, see
/// [`NodeStatus`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeAdminState {
    /// Serving and taking new pieces.
    Up,
    /// Serving its pieces while they are copied away; takes no new pieces.
    Draining,
    /// Taken out of the cluster; its pieces are rebuilt elsewhere.
    Removed,
}

impl NodeAdminState {
    /// The state in `placement`'s cluster map.
    #[must_use]
    pub fn placement_state(self) -> placement::NodeState {
        match self {
            Self::Up => placement::NodeState::Up,
            Self::Draining => placement::NodeState::Draining,
            Self::Removed => placement::NodeState::Out,
        }
    }
}

impl fmt::Display for NodeAdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Up => "up",
            Self::Draining => "draining",
            Self::Removed => "removed",
        })
    }
}

/// A registered storage node, as the control plane stores it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Unique name (the placement node id).
    pub name: String,
    /// NVMe/TCP address of its target, `host:port`.
    pub address: String,
    /// NQN of the subsystem that exports its namespace.
    pub nqn: String,
    /// Full failure-domain path, one component per configured cluster level, the last
    /// one the node itself (`rack1/node5`).
    pub domain: String,
    /// Relative share of new pieces.
    pub weight: u32,
    /// Up, draining or removed.
    pub state: NodeAdminState,
}

impl NodeSpec {
    /// The node as `placement` sees it (capacity unknown to the control plane: 0).
    #[must_use]
    pub fn to_placement(&self) -> placement::Node {
        placement::Node::new(
            self.name.clone(),
            self.address.clone(),
            self.nqn.clone(),
            0,
            self.domain.clone(),
        )
        .with_weight(self.weight)
        .with_state(self.state.placement_state())
    }
}

/// The cluster map of `nodes` under the failure-domain `levels` (outermost first).
pub fn cluster_map(
    levels: &[String],
    nodes: &[NodeSpec],
) -> Result<placement::ClusterMap, placement::Error> {
    let mut map = placement::ClusterMap::new(levels.iter().cloned())?;
    for n in nodes {
        map.add_node(n.to_placement())?;
    }
    Ok(map)
}

/// A volume's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    /// Every piece is where it should be.
    Healthy,
    /// Some pieces are missing or unreadable; reads reconstruct.
    Degraded,
    /// Missing pieces are being rebuilt.
    Rebuilding,
}

impl fmt::Display for VolumeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Rebuilding => "rebuilding",
        })
    }
}

/// A volume as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Unique name.
    pub name: String,
    /// The profile it was created with.
    pub profile: String,
    /// The layout it was created with (`ec:2+1`, `mirror:2`, `none`).
    pub layout: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Health.
    pub state: VolumeState,
}

/// What the engine observes of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node's name.
    pub name: String,
    /// Whether its target answers now.
    pub reachable: bool,
    /// I/O errors counted since start.
    pub errors: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Segment pieces the node holds (what a drain or rebuild must move off it).
    pub pieces: u64,
}

/// What the engine observes of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStatus {
    /// The volume's name.
    pub name: String,
    /// Health.
    pub state: VolumeState,
    /// Repairs queued and not yet done.
    pub pending_repairs: u64,
}

/// Progress of one rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildProgress {
    /// The volume being rebuilt.
    pub volume: String,
    /// Bytes rebuilt so far.
    pub done_bytes: u64,
    /// Bytes to rebuild in all.
    pub total_bytes: u64,
}

/// The engine's view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterStatus {
    /// One entry per registered node.
    pub nodes: Vec<NodeStatus>,
    /// One entry per volume.
    pub volumes: Vec<VolumeStatus>,
    /// Rebuilds under way.
    pub rebuilds: Vec<RebuildProgress>,
}

/// A latency histogram: `counts[i]` I/Os took at most `bounds_seconds[i]` and more than
/// the bound before; `counts` has one more entry than `bounds_seconds`, for the I/Os
/// slower than the last bound.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LatencyHistogram {
    /// Upper bounds of the buckets, increasing, in seconds.
    pub bounds_seconds: Vec<f64>,
    /// I/Os per bucket (not cumulative), `bounds_seconds.len() + 1` entries.
    pub counts: Vec<u64>,
    /// Sum of all latencies, in seconds.
    pub sum_seconds: f64,
}

impl LatencyHistogram {
    /// The buckets the test double and the metrics endpoint use by default: 25 us to
    /// 1 s, roughly doubling.
    pub const DEFAULT_BOUNDS: [f64; 16] = [
        0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
        0.1, 0.25, 0.5, 1.0, 2.5,
    ];

    /// An empty histogram over `bounds_seconds`.
    #[must_use]
    pub fn new(bounds_seconds: &[f64]) -> Self {
        Self {
            bounds_seconds: bounds_seconds.to_vec(),
            counts: vec![0; bounds_seconds.len() + 1],
            sum_seconds: 0.0,
        }
    }

    /// Records one I/O of `seconds`.
    pub fn record(&mut self, seconds: f64) {
        let i = self
            .bounds_seconds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(self.bounds_seconds.len());
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum_seconds += seconds;
    }

    /// Number of I/Os recorded.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Per-volume I/O counters since the volume was opened.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VolumeMetrics {
    /// The volume's name.
    pub name: String,
    /// Read requests completed.
    pub reads: u64,
    /// Write requests completed (writes, write-zeroes).
    pub writes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Read latency.
    pub read_latency: LatencyHistogram,
    /// Write latency.
    pub write_latency: LatencyHistogram,
    /// Whether the volume is degraded or rebuilding.
    pub degraded: bool,
}

/// The volume engine as the control plane sees it. See the module documentation.
///
/// Every call may be made concurrently with any other; the control API serializes its
/// own changes (create, delete, resize, set_nodes), so an implementation only has to be
/// safe against reads racing a change.
pub trait VolumeService: Send + Sync + fmt::Debug {
    /// Creates a volume of `size_bytes` with `profile`, resolving the profile against the
    /// registered nodes; [`ServiceError::Unsatisfiable`] carries placement's reason when
    /// they cannot hold it.
    fn create_volume(
        &self,
        name: &str,
        profile: placement::Profile,
        size_bytes: u64,
    ) -> ServiceFuture<'_, VolumeInfo>;
    /// Deletes a volume and frees its space on the nodes.
    fn delete_volume(&self, name: &str) -> ServiceFuture<'_, ()>;
    /// Changes a volume's size (the control API only asks to grow).
    fn resize_volume(&self, name: &str, size_bytes: u64) -> ServiceFuture<'_, VolumeInfo>;
    /// Every volume, sorted by name.
    fn list_volumes(&self) -> ServiceFuture<'_, Vec<VolumeInfo>>;
    /// The device a front-end serves for a volume, or `None` if there is no such volume.
    fn device(&self, name: &str) -> ServiceFuture<'_, Option<Arc<dyn BlockDevice>>>;
    /// Replaces the registered node list (all nodes, including draining and removed
    /// ones). Called at start with the stored list and after every node change.
    fn set_nodes(&self, nodes: Vec<NodeSpec>) -> ServiceFuture<'_, ()>;
    /// Nodes, volumes and rebuilds as the engine sees them now.
    fn status(&self) -> ServiceFuture<'_, ClusterStatus>;
    /// Per-volume I/O counters.
    fn metrics(&self) -> ServiceFuture<'_, Vec<VolumeMetrics>>;
    /// Makes every acknowledged write durable and stops; called once at shutdown after
    /// the front-ends have stopped.
    fn shutdown(&self) -> ServiceFuture<'_, ()>;
    /// The engine's reactor runtimes, which front-ends spread their connections over
    /// (none: the front-ends run on the control runtime).
    fn reactors(&self) -> Vec<tokio::runtime::Handle> {
        Vec::new()
    }
    /// The reactors volumes run on, so the network module can share them (and account
    /// their CPU); `None` for an engine without reactors (the test double).
    fn reactor_set(&self) -> Option<crate::reactor::ReactorHandles> {
        None
    }
}
