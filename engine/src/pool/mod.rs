//! The pool: the cluster's catalogue of nodes, volumes and segments, kept on the nodes.
//!
//! Everything needed to serve the volumes lives on the nodes (DESIGN, "State"): the
//! catalogue (nodes, volumes with their wrapped keys and writer epochs, every segment's
//! pieces) is the root payload of the mirrored metadata store (`engine::metadata`), and
//! the volumes' latest images (maps and row tables) are its checkpoint payload. So
//! [`Pool::recover`], given any reachable node namespaces and the key-encryption key,
//! finds the newest catalogue, connects the other nodes it names, and can open every
//! volume (which then replays its log tail).
//!
//! Threading: one task owns the catalogue and the metadata store (an actor fed by a
//! channel), so commits are serialized without a lock; [`Pool`] is a cheap handle
//! that any reactor may clone. Volumes are owned elsewhere (one task each) and reach
//! the pool through [`SegmentSource`], which [`Pool`] implements: an allocation or a
//! checkpoint is acknowledged only after its commit is durable on `min_acks` nodes
//! (the largest failures-to-tolerate of any volume, plus one).
//!
//! Placement: a segment's pieces go where `placement` puts them for (volume, allocation
//! sequence), over the nodes that are up, have a free chunk and are not avoided by the
//! volume (nodes that just failed one of its writes); a chunk is the lowest free one on
//! the chosen node. Chunks in use are exactly those named by the catalogue's segments,
//! so freeing a segment is removing it from the catalogue in the same commit as the
//! checkpoint that stops referencing it.

pub mod catalog;
pub mod service;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::metadata::{
    format_node, read_superblock, ClusterId, MetaNode, MetaStore, MetadataError,
};
use crate::pipeline::{
    unwrap_data_key, wrap_data_key, Compression, DataKey, EpochStore, Kek, PipelineError, VolumeId,
    WrappedKey,
};
use crate::shard::{ShardError, ShardFuture, ShardInfo, ShardStore};
use crate::volume::{
    SegmentGrant, SegmentPiece, SegmentSource, Volume, VolumeConfig, VolumeError, VolumeImage,
};
use catalog::{
    Catalog, CatalogError, CatalogNode, CatalogSegment, CatalogVolume, CheckpointDoc,
    CATALOG_VERSION,
};

/// Default chunk (segment piece) size.
pub const DEFAULT_CHUNK_SIZE: u64 = 8 << 20;

/// Errors of the pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The metadata store failed.
    #[error("metadata: {0}")]
    Metadata(#[from] MetadataError),
    /// A stored document could not be decoded.
    #[error("catalogue: {0}")]
    Catalog(#[from] CatalogError),
    /// No volume or node of that name.
    #[error("no {what} named {name:?}")]
    NotFound {
        /// Volume or node.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// The name is taken.
    #[error("a {what} named {name:?} already exists")]
    AlreadyExists {
        /// Volume or node.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// The cluster cannot satisfy the profile.
    #[error("profile {profile:?} cannot be placed: {reason}")]
    Unsatisfiable {
        /// Profile name.
        profile: String,
        /// Why.
        reason: String,
    },
    /// A request that cannot be honoured as asked.
    #[error("{0}")]
    Invalid(String),
    /// Key wrapping or unwrapping failed (a wrong KEK, or damage).
    #[error("volume key: {0}")]
    Key(#[from] PipelineError),
    /// The volume engine failed.
    #[error("volume: {0}")]
    Volume(#[from] VolumeError),
    /// The pool task is gone.
    #[error("the pool has shut down")]
    Closed,
}

/// A node to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Unique id.
    pub id: String,
    /// NVMe/TCP address `host:port` (informational for memory nodes).
    pub address: String,
    /// Subsystem NQN.
    pub nqn: String,
    /// Failure-domain path, one component per level of the cluster, the last one the
    /// node itself (`rack1/node5`); nodes in one rack never share a segment when the
    /// profile's failure domain is `rack`.
    pub domain: String,
    /// Placement weight; `None` for the default (capacity in GiB).
    pub weight: Option<u32>,
}

/// A node as the pool reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// The spec it was added with.
    pub spec: NodeSpec,
    /// Up, draining or out.
    pub state: &'static str,
    /// Whether a connection to it exists.
    pub connected: bool,
    /// Chunks on the node, and how many are in use.
    pub chunks: u32,
    /// Chunks in use.
    pub chunks_used: u32,
}

/// A volume as the pool reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Name.
    pub name: String,
    /// Identity (hex).
    pub id: String,
    /// Profile name.
    pub profile: String,
    /// Layout (`ec:4+2`, `mirror:2`, ...).
    pub layout: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Whether records are encrypted.
    pub encrypted: bool,
    /// Compression setting.
    pub compression: String,
    /// Segments allocated.
    pub segments: usize,
    /// Failures the layout tolerates.
    pub failures_to_tolerate: usize,
}

/// What [`NodeConnector::connect`] returns: a shard store, or why the node is unreachable.
pub type ConnectFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Arc<dyn ShardStore>, String>> + Send + 'a>>;

/// Connects to a node named in the catalogue (NVMe/TCP in dpud, memory in tests).
pub trait NodeConnector: Send + Sync + std::fmt::Debug {
    /// A shard store for `node`.
    fn connect(&self, node: &NodeSpec) -> ConnectFuture<'_>;
}

/// Stands in for a node that could not be reached: every request fails as unavailable,
/// so volumes read around it exactly as around a node that dropped out.
#[derive(Debug)]
pub struct OfflineShard {
    info: ShardInfo,
    reason: String,
}

impl OfflineShard {
    /// A placeholder for node `node`.
    pub fn new(node: &str, reason: impl Into<String>) -> Self {
        Self {
            info: ShardInfo {
                node: node.to_owned(),
                capacity_bytes: u64::MAX - u64::MAX % 65536,
                block_size: 512,
                volatile_write_cache: false,
            },
            reason: reason.into(),
        }
    }

    fn err<T: Send + 'static>(&self) -> ShardFuture<'_, T> {
        let e = ShardError::Unavailable {
            node: self.info.node.clone(),
            reason: self.reason.clone(),
        };
        Box::pin(async move { Err(e) })
    }
}

impl ShardStore for OfflineShard {
    fn info(&self) -> &ShardInfo {
        &self.info
    }
    fn read(&self, _offset: u64, _len: u64) -> ShardFuture<'_, Vec<u8>> {
        self.err()
    }
    fn write(&self, _offset: u64, _data: Vec<u8>, _fua: bool) -> ShardFuture<'_, ()> {
        self.err()
    }
    fn flush(&self) -> ShardFuture<'_, ()> {
        self.err()
    }
    fn deallocate(&self, _offset: u64, _len: u64) -> ShardFuture<'_, ()> {
        self.err()
    }
}

/// A writer epoch already made durable by the pool, handed to the volume's nonce
/// allocator (which asks the store for "the last epoch" and persists the next one).
struct CommittedEpoch(u32);

impl EpochStore for CommittedEpoch {
    fn load(&mut self) -> Result<Option<u32>, PipelineError> {
        Ok(self.0.checked_sub(1))
    }
    fn persist(&mut self, epoch: u32) -> Result<(), PipelineError> {
        if epoch == self.0 {
            Ok(())
        } else {
            Err(PipelineError::EpochStore(format!(
                "epoch {epoch} asked, {} was committed",
                self.0
            )))
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, PoolError>>;

/// What a volume needs to open, prepared (and its new epoch committed) by the pool.
struct OpenTicket {
    config: VolumeConfig,
    key: Option<DataKey>,
    epoch: u32,
    segments: Vec<SegmentGrant>,
    image: Option<VolumeImage>,
}

enum Request {
    AddNode(NodeSpec, Arc<dyn ShardStore>, Reply<()>),
    SetNodeState(String, u8, Reply<()>),
    CreateVolume(String, placement::Profile, u64, Reply<VolumeInfo>),
    ResizeVolume(String, u64, bool, Reply<VolumeInfo>),
    DeleteVolume(String, Reply<()>),
    Volumes(Reply<Vec<VolumeInfo>>),
    Nodes(Reply<Vec<NodeStatus>>),
    Open(String, Reply<OpenTicket>),
    Close(VolumeId),
    Allocate(VolumeId, usize, Vec<String>, Reply<SegmentGrant>),
    Checkpoint(VolumeId, VolumeImage, Vec<u64>, Reply<()>),
    Reserve(VolumeId, u64, usize, Vec<String>, Reply<SegmentPiece>),
    Replace(VolumeId, u64, usize, (String, u64), SegmentPiece, Reply<()>),
    Release(SegmentPiece),
    Shards(Reply<Vec<(String, Arc<dyn ShardStore>)>>),
    PiecesOn(Vec<String>, Reply<Vec<(String, u64)>>),
    Stats(Reply<PoolStats>),
    OutageWait(std::time::Duration),
}

/// Counters of the metadata traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Commits made.
    pub commits: u64,
    /// Bytes of root payloads written, summed over the nodes that acknowledged them.
    pub root_bytes_written: u64,
    /// Bytes of checkpoint payloads written, summed over the nodes that acknowledged.
    pub checkpoint_bytes_written: u64,
    /// Commits tried again after reaching too few nodes (see [`Pool::set_outage_wait`]).
    pub commit_retries: u64,
    /// Chunks in use, over all nodes.
    pub chunks_used: u64,
    /// Chunks free on nodes that take new pieces.
    pub chunks_free: u64,
}

/// A handle to the pool task. See the module documentation.
#[derive(Debug, Clone)]
pub struct Pool {
    tx: mpsc::Sender<Request>,
    cluster: ClusterId,
}

struct State {
    meta: MetaStore,
    catalog: Catalog,
    images: HashMap<[u8; 16], VolumeImage>,
    shards: HashMap<String, Arc<dyn ShardStore>>,
    kek: Kek,
    open: Vec<[u8; 16]>,
    stats: PoolStats,
    /// Chunks reserved for pieces being rebuilt (node index, chunk): in use, but not
    /// in the catalogue until the rebuild commits (see `SegmentSource::reserve_piece`).
    reserved: Vec<(usize, u32)>,
    /// How long a commit that reaches too few nodes keeps trying (see
    /// [`Pool::set_outage_wait`]).
    outage_wait: std::time::Duration,
}

fn node_state_name(s: u8) -> &'static str {
    match s {
        0 => "up",
        1 => "draining",
        _ => "out",
    }
}

fn layout_name(v: &CatalogVolume) -> String {
    placement::Layout {
        data: v.k,
        parity: v.m,
        mirror: v.mirror,
    }
    .to_string()
}

fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl Pool {
    /// Creates a cluster on `nodes` (formatting each; a node formatted for another
    /// cluster is refused) and starts the pool task on the current tokio runtime.
    pub async fn create(
        nodes: Vec<(NodeSpec, Arc<dyn ShardStore>)>,
        kek: Kek,
        chunk_size: u64,
        levels: Vec<String>,
    ) -> Result<Self, PoolError> {
        placement::ClusterMap::new(levels.iter().cloned())
            .map_err(|e| PoolError::Invalid(e.to_string()))?;
        let cluster = ClusterId::generate()?;
        let mut catalog = Catalog {
            version: CATALOG_VERSION,
            chunk_size,
            levels,
            nodes: Vec::new(),
            volumes: Vec::new(),
        };
        let mut metas = Vec::new();
        let mut shards = HashMap::new();
        for (spec, shard) in nodes {
            let sb = format_node(&*shard, cluster, &spec.id, chunk_size).await?;
            catalog
                .nodes
                .push(catalog_node(&spec, &sb.layout, shard.info().capacity_bytes));
            shards.insert(spec.id.clone(), Arc::clone(&shard));
            metas.push(MetaNode {
                shard,
                superblock: sb,
            });
        }
        let meta = MetaStore::new(cluster, metas, 1);
        let mut state = State {
            meta,
            catalog,
            images: HashMap::new(),
            shards,
            kek,
            open: Vec::new(),
            stats: PoolStats::default(),
            reserved: Vec::new(),
            outage_wait: std::time::Duration::ZERO,
        };
        state.commit(true).await?;
        Ok(Self::spawn(state, cluster))
    }

    /// Brings a cluster back from its nodes: loads the newest catalogue from `shards`
    /// (any reachable subset missing at most the tolerated number of nodes), then
    /// connects the other nodes it names through `connector` (a node that cannot be
    /// reached is served as unavailable until it returns).
    pub async fn recover(
        shards: Vec<Arc<dyn ShardStore>>,
        kek: Kek,
        connector: &dyn NodeConnector,
    ) -> Result<Self, PoolError> {
        let (mut meta, recovered) = MetaStore::load(shards.clone(), None, 1).await?;
        let recovered = recovered.ok_or_else(|| {
            PoolError::Invalid("the nodes hold no cluster (they are blank)".into())
        })?;
        let catalog = Catalog::decode(&recovered.root)?;
        let images = match &recovered.checkpoint {
            Some(bytes) => CheckpointDoc::decode(bytes)?.images.into_iter().collect(),
            None => HashMap::new(),
        };
        let mut by_id: HashMap<String, Arc<dyn ShardStore>> = HashMap::new();
        for s in &shards {
            if let Ok(Some(sb)) = read_superblock(&**s).await {
                by_id.insert(sb.node_id.clone(), Arc::clone(s));
            }
        }
        let known = meta.nodes();
        for node in &catalog.nodes {
            if node.state == 2 || by_id.contains_key(&node.id) {
                continue;
            }
            let spec = spec_of(node);
            match connector.connect(&spec).await {
                Ok(shard) => {
                    if let Ok(Some(sb)) = read_superblock(&*shard).await {
                        if sb.cluster == meta.cluster()
                            && sb.node_id == node.id
                            && !known.contains(&node.id)
                        {
                            meta.add_node(MetaNode {
                                shard: Arc::clone(&shard),
                                superblock: sb,
                            });
                        }
                    }
                    by_id.insert(node.id.clone(), shard);
                }
                Err(reason) => {
                    by_id.insert(
                        node.id.clone(),
                        Arc::new(OfflineShard::new(&node.id, reason)),
                    );
                }
            }
        }
        let cluster = meta.cluster();
        let mut state = State {
            meta,
            catalog,
            images,
            shards: by_id,
            kek,
            open: Vec::new(),
            stats: PoolStats::default(),
            reserved: Vec::new(),
            outage_wait: std::time::Duration::ZERO,
        };
        state.update_min_acks();
        Ok(Self::spawn(state, cluster))
    }

    fn spawn(state: State, cluster: ClusterId) -> Self {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(run(state, rx));
        Self { tx, cluster }
    }

    /// The cluster's identity.
    pub fn cluster(&self) -> ClusterId {
        self.cluster
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, PoolError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| PoolError::Closed)?;
        rx.await.map_err(|_| PoolError::Closed)?
    }

    /// Formats `shard` for this cluster and adds it as node `spec`.
    pub async fn add_node(
        &self,
        spec: NodeSpec,
        shard: Arc<dyn ShardStore>,
    ) -> Result<(), PoolError> {
        self.ask(|r| Request::AddNode(spec, shard, r)).await
    }

    /// Marks a node draining (no new pieces) or out (removed; only when it holds none).
    pub async fn set_node_state(&self, id: &str, state: &str) -> Result<(), PoolError> {
        let s = match state {
            "up" => 0,
            "draining" => 1,
            "out" => 2,
            other => {
                return Err(PoolError::Invalid(format!(
                    "unknown node state {other:?} (up, draining, out)"
                )))
            }
        };
        self.ask(|r| Request::SetNodeState(id.to_owned(), s, r))
            .await
    }

    /// Creates a volume of `size_bytes` (whole 4 KiB blocks) with `profile`, resolved
    /// against the nodes now in the cluster.
    pub async fn create_volume(
        &self,
        name: &str,
        profile: placement::Profile,
        size_bytes: u64,
    ) -> Result<VolumeInfo, PoolError> {
        self.ask(|r| Request::CreateVolume(name.to_owned(), profile, size_bytes, r))
            .await
    }

    /// Grows a volume (shrinking is refused: it would cut off written data).
    pub async fn resize_volume(
        &self,
        name: &str,
        size_bytes: u64,
    ) -> Result<VolumeInfo, PoolError> {
        self.ask(|r| Request::ResizeVolume(name.to_owned(), size_bytes, false, r))
            .await
    }

    /// Grows a volume that is open: records the new size, after which the caller
    /// grows the open [`Volume`] ([`Volume::grow`]). Until then the open volume refuses
    /// the new blocks, which is safe; if the process stops in between, the volume opens
    /// with the new size.
    pub async fn grow_open_volume(
        &self,
        name: &str,
        size_bytes: u64,
    ) -> Result<VolumeInfo, PoolError> {
        self.ask(|r| Request::ResizeVolume(name.to_owned(), size_bytes, true, r))
            .await
    }

    /// Deletes a volume that is not open; its segments are freed.
    pub async fn delete_volume(&self, name: &str) -> Result<(), PoolError> {
        self.ask(|r| Request::DeleteVolume(name.to_owned(), r))
            .await
    }

    /// Every volume.
    pub async fn volumes(&self) -> Result<Vec<VolumeInfo>, PoolError> {
        self.ask(Request::Volumes).await
    }

    /// Every node.
    pub async fn nodes(&self) -> Result<Vec<NodeStatus>, PoolError> {
        self.ask(Request::Nodes).await
    }

    /// Every node's id and connection (for probing reachability).
    pub async fn shards(&self) -> Result<Vec<(String, Arc<dyn ShardStore>)>, PoolError> {
        self.ask(Request::Shards).await
    }

    /// The volumes with pieces on any of `nodes`: (name, pieces there).
    pub async fn pieces_on(&self, nodes: Vec<String>) -> Result<Vec<(String, u64)>, PoolError> {
        self.ask(|r| Request::PiecesOn(nodes, r)).await
    }

    /// Metadata counters.
    pub async fn stats(&self) -> Result<PoolStats, PoolError> {
        self.ask(Request::Stats).await
    }

    /// Sets how long a metadata commit that reaches too few nodes keeps trying before
    /// it fails (zero, the default, fails at once). When every association drops at
    /// once (this process stalled past the nodes' keep-alive timeout, a network blip)
    /// the host library has them back within a second or two; without the wait, every
    /// segment allocation and checkpoint in that window fails, and with it the writes
    /// that needed one. Commits are serialised in the pool task, so the others wait too,
    /// which is what they would have to do anyway.
    pub async fn set_outage_wait(&self, wait: std::time::Duration) {
        // A closed pool has nothing to set.
        let _sent = self.tx.send(Request::OutageWait(wait)).await;
    }

    /// Opens a volume for reading and writing: commits a new writer epoch, then loads
    /// its checkpoint and replays its log (see [`Volume::open`]). One writer at a time:
    /// a volume already open is refused until [`Pool::close_volume`].
    pub async fn open_volume(&self, name: &str, write_cache: bool) -> Result<Volume, PoolError> {
        let ticket = self.ask(|r| Request::Open(name.to_owned(), r)).await?;
        let id = ticket.config.id;
        let mut config = ticket.config;
        config.write_cache = write_cache;
        let source = Arc::new(self.clone()) as Arc<dyn SegmentSource>;
        let mut epochs = CommittedEpoch(ticket.epoch);
        let opened = Volume::open(
            config,
            source,
            ticket.key.as_ref(),
            &mut epochs,
            ticket.segments,
            ticket.image,
        )
        .await;
        match opened {
            Ok(v) => Ok(v),
            Err(e) => {
                self.close_volume(id).await;
                Err(e.into())
            }
        }
    }

    /// Lets the volume be opened again (after its owner dropped it).
    pub async fn close_volume(&self, id: VolumeId) {
        // A closed pool has nothing to release.
        let _sent = self.tx.send(Request::Close(id)).await;
    }
}

impl SegmentSource for Pool {
    fn allocate(
        &self,
        volume: VolumeId,
        pieces: usize,
        avoid: Vec<String>,
    ) -> crate::volume::source::SourceFuture<'_, SegmentGrant> {
        Box::pin(async move {
            self.ask(|r| Request::Allocate(volume, pieces, avoid, r))
                .await
                .map_err(into_volume_error)
        })
    }

    fn checkpoint(
        &self,
        volume: VolumeId,
        image: VolumeImage,
        free: Vec<u64>,
    ) -> crate::volume::source::SourceFuture<'_, ()> {
        Box::pin(async move {
            self.ask(|r| Request::Checkpoint(volume, image, free, r))
                .await
                .map_err(into_volume_error)
        })
    }

    fn reserve_piece(
        &self,
        volume: VolumeId,
        segment: u64,
        piece: usize,
        avoid: Vec<String>,
    ) -> crate::volume::source::SourceFuture<'_, SegmentPiece> {
        Box::pin(async move {
            self.ask(|r| Request::Reserve(volume, segment, piece, avoid, r))
                .await
                .map_err(into_volume_error)
        })
    }

    fn replace_piece(
        &self,
        volume: VolumeId,
        segment: u64,
        piece: usize,
        from: (String, u64),
        to: SegmentPiece,
    ) -> crate::volume::source::SourceFuture<'_, ()> {
        Box::pin(async move {
            self.ask(|r| Request::Replace(volume, segment, piece, from, to, r))
                .await
                .map_err(into_volume_error)
        })
    }

    fn release_piece(
        &self,
        _volume: VolumeId,
        piece: SegmentPiece,
    ) -> crate::volume::source::SourceFuture<'_, ()> {
        Box::pin(async move {
            let _sent = self.tx.send(Request::Release(piece)).await;
            Ok(())
        })
    }
}

fn into_volume_error(e: PoolError) -> VolumeError {
    match e {
        PoolError::Volume(v) => v,
        PoolError::Unsatisfiable { reason, .. } => VolumeError::NoSpace { reason },
        other => VolumeError::Metadata(other.to_string()),
    }
}

fn catalog_node(
    spec: &NodeSpec,
    layout: &crate::metadata::NodeLayout,
    capacity: u64,
) -> CatalogNode {
    CatalogNode {
        id: spec.id.clone(),
        address: spec.address.clone(),
        nqn: spec.nqn.clone(),
        domain: spec.domain.clone(),
        weight: spec
            .weight
            .unwrap_or_else(|| placement::default_weight(capacity)),
        state: 0,
        chunk_count: layout.chunk_count,
        chunk_offset: layout.chunk_offset,
    }
}

fn spec_of(node: &CatalogNode) -> NodeSpec {
    NodeSpec {
        id: node.id.clone(),
        address: node.address.clone(),
        nqn: node.nqn.clone(),
        domain: node.domain.clone(),
        weight: Some(node.weight),
    }
}

async fn run(mut state: State, mut rx: mpsc::Receiver<Request>) {
    while let Some(req) = rx.recv().await {
        match req {
            Request::AddNode(spec, shard, r) => {
                let _gone = r.send(state.add_node(spec, shard).await);
            }
            Request::SetNodeState(id, s, r) => {
                let _gone = r.send(state.set_node_state(&id, s).await);
            }
            Request::CreateVolume(name, profile, size, r) => {
                let _gone = r.send(state.create_volume(name, profile, size).await);
            }
            Request::ResizeVolume(name, size, while_open, r) => {
                let _gone = r.send(state.resize_volume(&name, size, while_open).await);
            }
            Request::DeleteVolume(name, r) => {
                let _gone = r.send(state.delete_volume(&name).await);
            }
            Request::Volumes(r) => {
                let _gone = r.send(Ok(state
                    .catalog
                    .volumes
                    .iter()
                    .map(|v| state.info(v))
                    .collect()));
            }
            Request::Nodes(r) => {
                let _gone = r.send(Ok(state.node_status()));
            }
            Request::Open(name, r) => {
                let _gone = r.send(state.open(&name).await);
            }
            Request::Close(id) => state.open.retain(|o| o != &id.0),
            Request::Allocate(v, pieces, avoid, r) => {
                let _gone = r.send(state.allocate(v, pieces, &avoid).await);
            }
            Request::Checkpoint(v, image, free, r) => {
                let _gone = r.send(state.checkpoint(v, image, &free).await);
            }
            Request::Reserve(v, segment, piece, avoid, r) => {
                let _gone = r.send(state.reserve(v, segment, piece, &avoid));
            }
            Request::Replace(v, segment, piece, from, to, r) => {
                let _gone = r.send(state.replace(v, segment, piece, &from, &to).await);
            }
            Request::Release(piece) => state.release(&piece),
            Request::Shards(r) => {
                let _gone = r.send(Ok(state
                    .shards
                    .iter()
                    .map(|(id, s)| (id.clone(), Arc::clone(s)))
                    .collect()));
            }
            Request::PiecesOn(nodes, r) => {
                let _gone = r.send(Ok(state.pieces_on(&nodes)));
            }
            Request::OutageWait(wait) => state.outage_wait = wait,
            Request::Stats(r) => {
                let mut s = state.stats;
                let (used, free) = state.chunk_counts();
                s.chunks_used = used;
                s.chunks_free = free;
                let _gone = r.send(Ok(s));
            }
        }
    }
}

impl State {
    fn update_min_acks(&mut self) {
        let ftt = self
            .catalog
            .volumes
            .iter()
            .map(|v| usize::from(v.m))
            .max()
            .unwrap_or(0);
        let nodes = self.meta.nodes().len().max(1);
        self.meta.set_min_acks((ftt + 1).min(nodes));
    }

    /// Commits the catalogue, and with `checkpoint` the volumes' images too.
    async fn commit(&mut self, checkpoint: bool) -> Result<(), PoolError> {
        let root = self.catalog.encode()?;
        let ckpt = if checkpoint {
            let mut images: Vec<([u8; 16], VolumeImage)> = self
                .images
                .iter()
                .filter(|(id, _)| self.catalog.volumes.iter().any(|v| &v.id == *id))
                .map(|(id, img)| (*id, img.clone()))
                .collect();
            images.sort_by_key(|(id, _)| *id);
            Some(
                CheckpointDoc {
                    version: CATALOG_VERSION,
                    images,
                }
                .encode()?,
            )
        } else {
            None
        };
        let started = tokio::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(100);
        let report = loop {
            match self.meta.commit(&root, ckpt.as_deref()).await {
                Ok(report) => break report,
                Err(e @ MetadataError::CommitFailed { .. })
                    if started.elapsed() + pause <= self.outage_wait =>
                {
                    tracing::warn!(error = %e, retry_in_ms = pause.as_millis(), "metadata commit reached too few nodes; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(1));
                    self.stats.commit_retries += 1;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let acked = report.acked.len() as u64;
        self.stats.commits += 1;
        self.stats.root_bytes_written += root.len() as u64 * acked;
        if let Some(c) = &ckpt {
            self.stats.checkpoint_bytes_written += c.len() as u64 * acked;
        }
        Ok(())
    }

    fn chunk_usage(&self) -> Vec<Vec<bool>> {
        let mut used: Vec<Vec<bool>> = self
            .catalog
            .nodes
            .iter()
            .map(|n| vec![false; usize::try_from(n.chunk_count).unwrap_or(0)])
            .collect();
        for v in &self.catalog.volumes {
            for s in &v.segments {
                for &(node, chunk) in &s.pieces {
                    if let Some(slot) = used
                        .get_mut(usize::from(node))
                        .and_then(|u| u.get_mut(usize::try_from(chunk).unwrap_or(usize::MAX)))
                    {
                        *slot = true;
                    }
                }
            }
        }
        for &(node, chunk) in &self.reserved {
            if let Some(slot) = used
                .get_mut(node)
                .and_then(|u| u.get_mut(usize::try_from(chunk).unwrap_or(usize::MAX)))
            {
                *slot = true;
            }
        }
        used
    }

    fn chunk_counts(&self) -> (u64, u64) {
        let usage = self.chunk_usage();
        let mut used = 0;
        let mut free = 0;
        for (n, u) in self.catalog.nodes.iter().zip(&usage) {
            let in_use = u.iter().filter(|x| **x).count() as u64;
            used += in_use;
            if n.state == 0 {
                free += u.len() as u64 - in_use;
            }
        }
        (used, free)
    }

    fn node_status(&self) -> Vec<NodeStatus> {
        let usage = self.chunk_usage();
        self.catalog
            .nodes
            .iter()
            .zip(&usage)
            .map(|(n, u)| NodeStatus {
                spec: spec_of(n),
                state: node_state_name(n.state),
                connected: self.meta.nodes().contains(&n.id),
                chunks: n.chunk_count,
                chunks_used: u32::try_from(u.iter().filter(|x| **x).count()).unwrap_or(u32::MAX),
            })
            .collect()
    }

    fn info(&self, v: &CatalogVolume) -> VolumeInfo {
        let profile = placement::Profile::from_toml(&v.profile)
            .map(|p| p.name)
            .unwrap_or_default();
        VolumeInfo {
            name: v.name.clone(),
            id: hex(&v.id),
            profile,
            layout: layout_name(v),
            size_bytes: v.blocks * 4096,
            encrypted: v.wrapped_key.is_some(),
            compression: v.compression.clone(),
            segments: v.segments.len(),
            failures_to_tolerate: usize::from(v.m),
        }
    }

    fn cluster_map(
        &self,
        avoid: &[String],
        usage: &[Vec<bool>],
    ) -> Result<placement::ClusterMap, PoolError> {
        let mut map = placement::ClusterMap::new(["domain", "node"])
            .map_err(|e| PoolError::Invalid(e.to_string()))?;
        for (n, u) in self.catalog.nodes.iter().zip(usage) {
            if n.state == 2 {
                continue;
            }
            let free = u.iter().filter(|x| !**x).count();
            let mut node = placement::Node::new(
                n.id.clone(),
                n.address.clone(),
                n.nqn.clone(),
                u64::from(n.chunk_count) * self.catalog.chunk_size,
                n.domain.clone(),
            )
            .with_weight(n.weight);
            let reachable = self.meta.nodes().contains(&n.id);
            let state = if avoid.contains(&n.id) || !reachable {
                placement::NodeState::Down
            } else if n.state == 1 {
                placement::NodeState::Draining
            } else {
                placement::NodeState::Up
            };
            node = node.with_state(state);
            if free == 0 {
                node = node.with_weight(0);
            }
            map.add_node(node)
                .map_err(|e| PoolError::Invalid(e.to_string()))?;
        }
        Ok(map)
    }

    async fn add_node(
        &mut self,
        spec: NodeSpec,
        shard: Arc<dyn ShardStore>,
    ) -> Result<(), PoolError> {
        if self.catalog.nodes.iter().any(|n| n.id == spec.id) {
            return Err(PoolError::AlreadyExists {
                what: "node",
                name: spec.id,
            });
        }
        if self.catalog.nodes.len() >= usize::from(u16::MAX) {
            return Err(PoolError::Invalid("too many nodes".into()));
        }
        let sb = format_node(
            &*shard,
            self.meta.cluster(),
            &spec.id,
            self.catalog.chunk_size,
        )
        .await?;
        self.catalog
            .nodes
            .push(catalog_node(&spec, &sb.layout, shard.info().capacity_bytes));
        self.shards.insert(spec.id.clone(), Arc::clone(&shard));
        self.meta.add_node(MetaNode {
            shard,
            superblock: sb,
        });
        self.update_min_acks();
        if let Err(e) = self.commit(false).await {
            self.catalog.nodes.pop();
            self.meta.remove_node(&spec.id);
            self.shards.remove(&spec.id);
            return Err(e);
        }
        Ok(())
    }

    async fn set_node_state(&mut self, id: &str, s: u8) -> Result<(), PoolError> {
        let usage = self.chunk_usage();
        let at = self
            .catalog
            .nodes
            .iter()
            .position(|n| n.id == id)
            .ok_or_else(|| PoolError::NotFound {
                what: "node",
                name: id.to_owned(),
            })?;
        if s == 2 && usage[at].iter().any(|u| *u) {
            return Err(PoolError::Invalid(format!(
                "node {id} still holds {} segment pieces, so removing it now would lose redundancy: \
                 run `dpuctl node drain {id}` (this works for a dead node too: its pieces are \
                 rebuilt from the others), wait until `dpuctl status` shows no rebuild for it, \
                 then remove it",
                usage[at].iter().filter(|u| **u).count()
            )));
        }
        let old = self.catalog.nodes[at].state;
        self.catalog.nodes[at].state = s;
        if s == 2 {
            self.meta.remove_node(id);
        }
        if let Err(e) = self.commit(false).await {
            self.catalog.nodes[at].state = old;
            return Err(e);
        }
        Ok(())
    }

    async fn create_volume(
        &mut self,
        name: String,
        profile: placement::Profile,
        size: u64,
    ) -> Result<VolumeInfo, PoolError> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(PoolError::Invalid(format!(
                "volume name {name:?}: use 1 to 64 of a-z A-Z 0-9 - _ ."
            )));
        }
        if self.catalog.volumes.iter().any(|v| v.name == name) {
            return Err(PoolError::AlreadyExists {
                what: "volume",
                name,
            });
        }
        if size == 0 || size % 4096 != 0 {
            return Err(PoolError::Invalid(format!(
                "size {size} is not a positive multiple of 4096 bytes"
            )));
        }
        profile
            .validate()
            .map_err(|e| PoolError::Invalid(e.to_string()))?;
        let usage = self.chunk_usage();
        let map = self.cluster_map(&[], &usage)?;
        let resolved = profile
            .resolve(&map)
            .map_err(|e| PoolError::Unsatisfiable {
                profile: profile.name.clone(),
                reason: e.to_string(),
            })?;
        let layout = resolved.layout;
        let mut raw = [0u8; 16];
        aws_lc_rs::rand::fill(&mut raw)
            .map_err(|_| PoolError::Invalid("no randomness for a volume id".into()))?;
        let id = VolumeId(raw);
        let wrapped_key = match profile.encryption {
            placement::Encryption::Off => None,
            placement::Encryption::Aes256Gcm => {
                let key = DataKey::generate()?;
                Some(wrap_data_key(&self.kek, &id, &key)?.as_bytes().to_vec())
            }
        };
        let config = VolumeConfig::new(id, layout, size / 4096).with_profile(&profile);
        let shard_block = self
            .shards
            .values()
            .map(|s| u64::from(s.info().block_size))
            .max()
            .unwrap_or(512)
            .max(512);
        let volume = CatalogVolume {
            id: raw,
            name,
            profile: profile.to_toml(),
            k: layout.data,
            m: layout.parity,
            mirror: layout.mirror,
            compression: config.compression.to_string(),
            compression_unit: config.compression_unit,
            blocks: size / 4096,
            strip_size: config.strip_size,
            shard_block,
            wrapped_key,
            writer_epoch: None,
            next_alloc_seq: 0,
            segments: Vec::new(),
        };
        let info = self.info(&volume);
        self.catalog.volumes.push(volume);
        self.update_min_acks();
        if let Err(e) = self.commit(false).await {
            self.catalog.volumes.pop();
            self.update_min_acks();
            return Err(e);
        }
        Ok(info)
    }

    async fn resize_volume(
        &mut self,
        name: &str,
        size: u64,
        while_open: bool,
    ) -> Result<VolumeInfo, PoolError> {
        let at = self.volume_index(name)?;
        if !while_open && self.open.contains(&self.catalog.volumes[at].id) {
            return Err(PoolError::Invalid(format!(
                "volume {name} is open; close its exports first"
            )));
        }
        let blocks = size / 4096;
        if size % 4096 != 0 || blocks < self.catalog.volumes[at].blocks {
            return Err(PoolError::Invalid(format!(
                "new size {size} must be a multiple of 4096 and at least the current {} bytes",
                self.catalog.volumes[at].blocks * 4096
            )));
        }
        let old = self.catalog.volumes[at].blocks;
        self.catalog.volumes[at].blocks = blocks;
        if let Err(e) = self.commit(false).await {
            self.catalog.volumes[at].blocks = old;
            return Err(e);
        }
        Ok(self.info(&self.catalog.volumes[at]))
    }

    fn volume_index(&self, name: &str) -> Result<usize, PoolError> {
        self.catalog
            .volumes
            .iter()
            .position(|v| v.name == name)
            .ok_or_else(|| PoolError::NotFound {
                what: "volume",
                name: name.to_owned(),
            })
    }

    async fn delete_volume(&mut self, name: &str) -> Result<(), PoolError> {
        let at = self.volume_index(name)?;
        if self.open.contains(&self.catalog.volumes[at].id) {
            return Err(PoolError::Invalid(format!(
                "volume {name} is open; close its exports first"
            )));
        }
        let removed = self.catalog.volumes.remove(at);
        let image = self.images.remove(&removed.id);
        self.update_min_acks();
        if let Err(e) = self.commit(true).await {
            self.catalog.volumes.insert(at, removed.clone());
            if let Some(i) = image {
                self.images.insert(removed.id, i);
            }
            return Err(e);
        }
        Ok(())
    }

    fn grant(&self, v: &CatalogVolume, s: &CatalogSegment) -> Result<SegmentGrant, PoolError> {
        let mut pieces = Vec::with_capacity(s.pieces.len());
        for &(node, chunk) in &s.pieces {
            let n = self.catalog.nodes.get(usize::from(node)).ok_or_else(|| {
                PoolError::Invalid(format!("volume {} names node #{node}", v.name))
            })?;
            let shard = self.shards.get(&n.id).cloned().unwrap_or_else(|| {
                Arc::new(OfflineShard::new(&n.id, "not connected")) as Arc<dyn ShardStore>
            });
            let base = self.chunk_base(&n.id, chunk)?;
            pieces.push(SegmentPiece {
                node: n.id.clone(),
                shard,
                base,
            });
        }
        Ok(SegmentGrant {
            index: s.index,
            alloc_seq: s.alloc_seq,
            pieces,
        })
    }

    fn chunk_base(&self, node: &str, chunk: u32) -> Result<u64, PoolError> {
        let n = self
            .catalog
            .nodes
            .iter()
            .find(|n| n.id == node)
            .ok_or_else(|| PoolError::NotFound {
                what: "node",
                name: node.to_owned(),
            })?;
        if chunk >= n.chunk_count {
            return Err(PoolError::Invalid(format!(
                "chunk {chunk} is beyond node {node}"
            )));
        }
        u64::from(chunk)
            .checked_mul(self.catalog.chunk_size)
            .and_then(|o| o.checked_add(n.chunk_offset))
            .ok_or_else(|| PoolError::Invalid(format!("chunk {chunk} of node {node} overflows")))
    }

    async fn open(&mut self, name: &str) -> Result<OpenTicket, PoolError> {
        let at = self.volume_index(name)?;
        let id = self.catalog.volumes[at].id;
        if self.open.contains(&id) {
            return Err(PoolError::Invalid(format!("volume {name} is already open")));
        }
        let old = self.catalog.volumes[at].writer_epoch;
        let epoch = match old {
            None => 0,
            Some(e) => e.checked_add(1).ok_or_else(|| {
                PoolError::Invalid(format!("volume {name} has used every writer epoch"))
            })?,
        };
        self.catalog.volumes[at].writer_epoch = Some(epoch);
        if let Err(e) = self.commit(false).await {
            self.catalog.volumes[at].writer_epoch = old;
            return Err(e);
        }
        let v = &self.catalog.volumes[at];
        let key = match &v.wrapped_key {
            Some(w) => Some(unwrap_data_key(
                &self.kek,
                &VolumeId(v.id),
                &WrappedKey::from_bytes(w)?,
            )?),
            None => None,
        };
        let layout = placement::Layout {
            data: v.k,
            parity: v.m,
            mirror: v.mirror,
        };
        let mut config = VolumeConfig::new(VolumeId(v.id), layout, v.blocks);
        config.compression = v
            .compression
            .parse::<Compression>()
            .map_err(|e| PoolError::Invalid(format!("volume {name}: {e}")))?;
        config.compression_unit = v.compression_unit;
        config.strip_size = v.strip_size;
        config.shard_block = v.shard_block;
        config.chunk_size = self.catalog.chunk_size;
        let segments = v
            .segments
            .iter()
            .map(|s| self.grant(v, s))
            .collect::<Result<Vec<_>, _>>()?;
        let image = self.images.get(&id).cloned();
        self.open.push(id);
        Ok(OpenTicket {
            config,
            key,
            epoch,
            segments,
            image,
        })
    }

    async fn allocate(
        &mut self,
        volume: VolumeId,
        pieces: usize,
        avoid: &[String],
    ) -> Result<SegmentGrant, PoolError> {
        let at = self
            .catalog
            .volumes
            .iter()
            .position(|v| v.id == volume.0)
            .ok_or_else(|| PoolError::NotFound {
                what: "volume",
                name: hex(&volume.0),
            })?;
        let usage = self.chunk_usage();
        let map = self.cluster_map(avoid, &usage)?;
        let v = &self.catalog.volumes[at];
        let layout = placement::Layout {
            data: v.k,
            parity: v.m,
            mirror: v.mirror,
        };
        if layout.pieces() != pieces {
            return Err(PoolError::Invalid(format!(
                "volume {} has {} pieces, {pieces} asked",
                v.name,
                layout.pieces()
            )));
        }
        let profile = placement::Profile::from_toml(&v.profile)
            .map_err(|e| PoolError::Invalid(e.to_string()))?;
        let placer =
            placement::Placer::new(&map, layout, &profile.failure_domain).map_err(|e| {
                PoolError::Unsatisfiable {
                    profile: profile.name.clone(),
                    reason: e.to_string(),
                }
            })?;
        let seq = v.next_alloc_seq;
        let vol_key = u64::from_le_bytes([
            v.id[0], v.id[1], v.id[2], v.id[3], v.id[4], v.id[5], v.id[6], v.id[7],
        ]);
        let chosen = placer.place(placement::SegmentId::new(vol_key, seq));
        if chosen.len() != pieces {
            return Err(PoolError::Unsatisfiable {
                profile: profile.name.clone(),
                reason: format!(
                    "{} eligible failure domains with a free chunk, {pieces} needed (avoiding {avoid:?})",
                    chosen.len()
                ),
            });
        }
        let mut placed = Vec::with_capacity(pieces);
        for node in &chosen {
            let n = self
                .catalog
                .nodes
                .iter()
                .position(|c| c.id == node.as_str())
                .ok_or_else(|| {
                    PoolError::Invalid(format!("placement chose unknown node {node}"))
                })?;
            let chunk = usage[n]
                .iter()
                .position(|u| !*u)
                .ok_or_else(|| PoolError::Invalid(format!("node {node} has no free chunk")))?;
            placed.push((
                u16::try_from(n).unwrap_or(u16::MAX),
                u32::try_from(chunk).unwrap_or(u32::MAX),
            ));
        }
        let index = (0..)
            .find(|i| {
                !self.catalog.volumes[at]
                    .segments
                    .iter()
                    .any(|s| s.index == *i)
            })
            .unwrap_or(0);
        let segment = CatalogSegment {
            index,
            alloc_seq: seq,
            pieces: placed,
        };
        self.catalog.volumes[at].segments.push(segment.clone());
        self.catalog.volumes[at].next_alloc_seq += 1;
        if let Err(e) = self.commit(false).await {
            self.catalog.volumes[at].segments.pop();
            // The sequence number stays consumed: the failed root may be on some nodes.
            return Err(e);
        }
        let v = &self.catalog.volumes[at];
        self.grant(v, &segment)
    }

    fn volume_at(&self, volume: VolumeId) -> Result<usize, PoolError> {
        self.catalog
            .volumes
            .iter()
            .position(|v| v.id == volume.0)
            .ok_or_else(|| PoolError::NotFound {
                what: "volume",
                name: hex(&volume.0),
            })
    }

    fn pieces_on(&self, nodes: &[String]) -> Vec<(String, u64)> {
        let idx: Vec<usize> = self
            .catalog
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| nodes.contains(&n.id))
            .map(|(i, _)| i)
            .collect();
        self.catalog
            .volumes
            .iter()
            .filter_map(|v| {
                let n = v
                    .segments
                    .iter()
                    .flat_map(|s| &s.pieces)
                    .filter(|(node, _)| idx.contains(&usize::from(*node)))
                    .count() as u64;
                (n > 0).then(|| (v.name.clone(), n))
            })
            .collect()
    }

    /// A chunk for piece `piece` of a segment, on the node placement's recovery picks
    /// with the nodes in `avoid` (those being left) counted as down.
    fn reserve(
        &mut self,
        volume: VolumeId,
        segment: u64,
        piece: usize,
        avoid: &[String],
    ) -> Result<SegmentPiece, PoolError> {
        let at = self.volume_at(volume)?;
        let usage = self.chunk_usage();
        let map = self.cluster_map(avoid, &usage)?;
        let v = &self.catalog.volumes[at];
        let seg = v
            .segments
            .iter()
            .find(|s| s.index == segment)
            .ok_or_else(|| PoolError::NotFound {
                what: "segment",
                name: format!("{}/{segment}", v.name),
            })?;
        let layout = placement::Layout {
            data: v.k,
            parity: v.m,
            mirror: v.mirror,
        };
        let profile = placement::Profile::from_toml(&v.profile)
            .map_err(|e| PoolError::Invalid(e.to_string()))?;
        let placer =
            placement::Placer::new(&map, layout, &profile.failure_domain).map_err(|e| {
                PoolError::Unsatisfiable {
                    profile: profile.name.clone(),
                    reason: e.to_string(),
                }
            })?;
        let vol_key = u64::from_le_bytes([
            v.id[0], v.id[1], v.id[2], v.id[3], v.id[4], v.id[5], v.id[6], v.id[7],
        ]);
        let holding: Vec<String> = seg
            .pieces
            .iter()
            .map(|&(n, _)| {
                self.catalog
                    .nodes
                    .get(usize::from(n))
                    .map(|c| c.id.clone())
                    .unwrap_or_default()
            })
            .collect();
        let assignment = placement::Assignment {
            segment: placement::SegmentId::new(vol_key, seg.alloc_seq),
            pieces: holding.iter().map(placement::NodeId::new).collect(),
        };
        let moves = placer
            .recover(&assignment)
            .map_err(|e| PoolError::Unsatisfiable {
                profile: profile.name.clone(),
                reason: e.to_string(),
            })?;
        let to = moves
            .iter()
            .find(|m| m.piece == piece)
            .map(|m| m.to.as_str().to_owned())
            .filter(|to| !holding.contains(to))
            .ok_or_else(|| PoolError::Unsatisfiable {
                profile: profile.name.clone(),
                reason: format!(
                    "no eligible node for piece {piece} of segment {segment} of volume {} \
                     (the segment is on {holding:?}; avoiding {avoid:?})",
                    v.name
                ),
            })?;
        let n = self
            .catalog
            .nodes
            .iter()
            .position(|c| c.id == to)
            .ok_or_else(|| PoolError::Invalid(format!("placement chose unknown node {to}")))?;
        let chunk = usage[n]
            .iter()
            .position(|u| !*u)
            .ok_or_else(|| PoolError::Invalid(format!("node {to} has no free chunk")))?;
        let chunk = u32::try_from(chunk).map_err(|_| PoolError::Invalid("chunk index".into()))?;
        let base = self.chunk_base(&to, chunk)?;
        let shard = self
            .shards
            .get(&to)
            .cloned()
            .ok_or_else(|| PoolError::Invalid(format!("node {to} is not connected")))?;
        self.reserved.push((n, chunk));
        Ok(SegmentPiece {
            node: to,
            shard,
            base,
        })
    }

    fn chunk_at(&self, node: &str, base: u64) -> Option<(usize, u32)> {
        let n = self.catalog.nodes.iter().position(|c| c.id == node)?;
        let c = &self.catalog.nodes[n];
        let rel = base.checked_sub(c.chunk_offset)?;
        if rel % self.catalog.chunk_size != 0 {
            return None;
        }
        Some((n, u32::try_from(rel / self.catalog.chunk_size).ok()?))
    }

    fn release(&mut self, piece: &SegmentPiece) {
        if let Some(at) = self.chunk_at(&piece.node, piece.base) {
            self.reserved.retain(|r| *r != at);
        }
    }

    /// Commits piece `piece` of a segment at its new (reserved, written) place.
    async fn replace(
        &mut self,
        volume: VolumeId,
        segment: u64,
        piece: usize,
        from: &(String, u64),
        to: &SegmentPiece,
    ) -> Result<(), PoolError> {
        let at = self.volume_at(volume)?;
        let old = self.chunk_at(&from.0, from.1);
        let new = self
            .chunk_at(&to.node, to.base)
            .filter(|n| self.reserved.contains(n))
            .ok_or_else(|| {
                PoolError::Invalid(format!(
                    "chunk at {} on node {} was not reserved for a rebuild",
                    to.base, to.node
                ))
            })?;
        let v = &mut self.catalog.volumes[at];
        let name = v.name.clone();
        let slot = v
            .segments
            .iter_mut()
            .find(|s| s.index == segment)
            .and_then(|s| s.pieces.get_mut(piece))
            .filter(|p| old == Some((usize::from(p.0), p.1)))
            .ok_or_else(|| {
                PoolError::Invalid(format!(
                    "segment {segment} of volume {name} no longer has piece {piece} on {} \
                     (freed or moved)",
                    from.0
                ))
            })?;
        let before = *slot;
        *slot = (u16::try_from(new.0).unwrap_or(u16::MAX), new.1);
        if let Err(e) = self.commit(false).await {
            if let Some(p) = self.catalog.volumes[at]
                .segments
                .iter_mut()
                .find(|s| s.index == segment)
                .and_then(|s| s.pieces.get_mut(piece))
            {
                *p = before;
            }
            return Err(e);
        }
        self.reserved.retain(|r| *r != new);
        Ok(())
    }

    async fn checkpoint(
        &mut self,
        volume: VolumeId,
        image: VolumeImage,
        free: &[u64],
    ) -> Result<(), PoolError> {
        let at = self
            .catalog
            .volumes
            .iter()
            .position(|v| v.id == volume.0)
            .ok_or_else(|| PoolError::NotFound {
                what: "volume",
                name: hex(&volume.0),
            })?;
        let old_image = self.images.insert(volume.0, image);
        let old_segments = self.catalog.volumes[at].segments.clone();
        self.catalog.volumes[at]
            .segments
            .retain(|s| !free.contains(&s.index));
        if let Err(e) = self.commit(true).await {
            self.catalog.volumes[at].segments = old_segments;
            match old_image {
                Some(i) => self.images.insert(volume.0, i),
                None => self.images.remove(&volume.0),
            };
            return Err(e);
        }
        Ok(())
    }
}
