//! The mirrored commit and the recovery of the newest commit (module doc of
//! `metadata` says why it works this way).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use futures::future::join_all;

use super::slots::{
    checkpoint_ref, encode_checkpoint, encode_root, max_checkpoint_payload, max_root_payload,
    read_checkpoint, read_checkpoint_header, read_root_slot, CheckpointRef, RootRecord, SlotState,
};
use super::superblock::{read_superblock, Superblock};
use super::{ClusterId, MetadataError, MAX_BLOCK_PAD};
use crate::shard::ShardStore;

/// Bits of a generation below the session number.
pub const SESSION_SHIFT: u32 = 40;
/// Largest commit counter within one session.
pub const MAX_COUNTER: u64 = (1 << SESSION_SHIFT) - 1;
/// Largest session number.
pub const MAX_SESSION: u64 = (1 << (64 - SESSION_SHIFT)) - 1;
/// The largest piece of a checkpoint sent in one shard write (bounds the copy per node).
const CKPT_PIECE: usize = 8 << 20;

/// The generation of commit `counter` of session `session`.
pub fn make_generation(session: u64, counter: u64) -> u64 {
    (session.min(MAX_SESSION) << SESSION_SHIFT) | counter.min(MAX_COUNTER)
}

/// The session a generation belongs to.
pub fn generation_session(generation: u64) -> u64 {
    generation >> SESSION_SHIFT
}

/// The commit counter of a generation within its session (0 is a session's opening).
pub fn generation_counter(generation: u64) -> u64 {
    generation & MAX_COUNTER
}

/// A formatted node as the store uses it.
#[derive(Debug, Clone)]
pub struct MetaNode {
    /// The node's namespace.
    pub shard: Arc<dyn ShardStore>,
    /// Its superblock (read or written by `format_node`).
    pub superblock: Superblock,
}

impl MetaNode {
    fn id(&self) -> &str {
        &self.superblock.node_id
    }
}

/// What [`MetaStore::load`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The generation of the root that was recovered.
    pub generation: u64,
    /// Its payload.
    pub root: Vec<u8>,
    /// The checkpoint it references, if any.
    pub checkpoint: Option<Vec<u8>>,
    /// The node the checkpoint (or the root, without one) was read from.
    pub from_node: String,
    /// Reachable nodes whose newest root is not the recovered one (older, torn, or
    /// none); the next commit brings them up to date.
    pub stale_nodes: Vec<String>,
    /// Namespaces that could not be read, with the reason. Those whose superblock could
    /// not be read are not in the store (add them with [`MetaStore::add_node`] when they
    /// return); those that failed later are, and are read again at the next commit.
    pub unreachable: Vec<(String, String)>,
}

/// The outcome of a successful commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitReport {
    /// The generation committed.
    pub generation: u64,
    /// Nodes that hold the new root.
    pub acked: Vec<String>,
    /// Nodes that do not, and why.
    pub failed: Vec<(String, String)>,
    /// Nodes that first got the current checkpoint rewritten (they had missed it).
    pub resynced: Vec<String>,
}

/// What the store knows about the newest root on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct View {
    /// The slot holding the node's newest verified root.
    newest_slot: Option<u8>,
    /// The checkpoint that root references, and the half holding it: never overwritten.
    protected: Option<(u8, CheckpointRef)>,
}

#[derive(Debug)]
struct Member {
    node: MetaNode,
    /// `None`: unknown (new node, or a root write whose outcome is unknown); the next
    /// commit reads the node's slots first.
    view: Option<View>,
    /// A checkpoint known to be intact on the node, and its half.
    holds: Option<(u8, CheckpointRef)>,
}

/// The current checkpoint: its reference and its encoded half image (kept to resync
/// nodes that missed it).
#[derive(Clone)]
struct Current {
    r: CheckpointRef,
    image: Arc<Vec<u8>>,
}

/// The mirrored metadata store of one cluster. Driven by one task (`&mut self`).
pub struct MetaStore {
    cluster: ClusterId,
    members: Vec<Member>,
    min_acks: usize,
    session: u64,
    counter: u64,
    generation: u64,
    ckpt_seq: u64,
    current: Option<Current>,
    /// Until the session's opening is acknowledged: the root it restates (payload and
    /// whether it is the empty root).
    opening: Option<(Vec<u8>, bool)>,
}

impl fmt::Debug for MetaStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetaStore")
            .field("cluster", &self.cluster)
            .field("nodes", &self.nodes())
            .field("min_acks", &self.min_acks)
            .field("generation", &self.generation)
            .field("session", &self.session)
            .field("checkpoint", &self.current.as_ref().map(|c| c.r))
            .field("opened", &self.opening.is_none())
            .finish()
    }
}

/// The outcome of one node's part of a step.
#[derive(Debug)]
struct Outcome {
    view: Option<View>,
    holds: Option<(u8, CheckpointRef)>,
    resynced: bool,
    result: Result<(), String>,
}

/// What one node holds, as read by a scan.
#[derive(Debug, Default)]
struct Scan {
    roots: Vec<(u8, RootRecord)>,
    halves: [Option<CheckpointRef>; 2],
}

impl Scan {
    fn newest(&self) -> Option<&(u8, RootRecord)> {
        self.roots.iter().max_by_key(|(_, r)| r.header.generation)
    }

    fn half_of(&self, r: CheckpointRef) -> Option<u8> {
        (0u8..2).find(|&h| self.halves[usize::from(h)] == Some(r))
    }

    /// The view this scan gives: newest root, and the half its checkpoint is in.
    fn view(&self) -> View {
        let Some((slot, root)) = self.newest() else {
            return View::default();
        };
        View {
            newest_slot: Some(*slot),
            protected: root
                .header
                .checkpoint
                .and_then(|r| self.half_of(r).map(|h| (h, r))),
        }
    }
}

fn describe(e: &MetadataError) -> String {
    e.to_string()
}

/// Reads both root slots and both checkpoint headers of a node.
async fn scan(node: &MetaNode, cluster: ClusterId) -> Result<Scan, MetadataError> {
    let shard = &*node.shard;
    let layout = &node.superblock.layout;
    let id = node.id();
    let (s0, s1, h0, h1) = futures::join!(
        read_root_slot(shard, id, layout, cluster, 0),
        read_root_slot(shard, id, layout, cluster, 1),
        read_checkpoint_header(shard, layout, cluster, 0),
        read_checkpoint_header(shard, layout, cluster, 1),
    );
    let mut out = Scan::default();
    for (slot, s) in [(0u8, s0), (1, s1)] {
        match s {
            Ok(SlotState::Valid(r)) => out.roots.push((slot, r)),
            Ok(_) => {}
            // A bad sector makes the slot invalid; an unreachable node fails the scan.
            Err(MetadataError::Shard { source, .. }) if !source.is_transient() => {}
            Err(e) => return Err(e),
        }
    }
    for (half, h) in [(0usize, h0), (1, h1)] {
        match h {
            Ok(Ok(r)) => out.halves[half] = Some(r),
            Ok(Err(_)) => {}
            Err(MetadataError::Shard { source, .. }) if !source.is_transient() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Writes a checkpoint image to half `half` of a node in pieces of at most
/// [`CKPT_PIECE`], each with FUA.
async fn write_checkpoint(node: &MetaNode, half: u8, image: &[u8]) -> Result<(), String> {
    let layout = &node.superblock.layout;
    if image.len() as u64 > layout.ckpt_half_len {
        return Err(format!(
            "checkpoint image of {} bytes exceeds this node's {}-byte half",
            image.len(),
            layout.ckpt_half_len
        ));
    }
    let shard = &*node.shard;
    let mut offset = layout.ckpt_half_offset(half);
    for piece in image.chunks(CKPT_PIECE) {
        shard
            .write(offset, piece.to_vec(), true)
            .await
            .map_err(|e| format!("write at byte {offset}: {e}"))?;
        offset += piece.len() as u64;
    }
    Ok(())
}

/// The half a new checkpoint goes to on a node: never the one its newest root needs.
fn target_half(view: &View) -> u8 {
    match view.protected {
        Some((h, _)) => 1 - h,
        None => 0,
    }
}

/// Makes sure the store knows the node's newest root, scanning it if not.
async fn ensure_view(
    node: &MetaNode,
    cluster: ClusterId,
    view: Option<View>,
    holds: &mut Option<(u8, CheckpointRef)>,
) -> Result<View, String> {
    if let Some(v) = view {
        return Ok(v);
    }
    if node.superblock.cluster != cluster {
        return Err(format!(
            "node belongs to cluster {}, not {cluster}",
            node.superblock.cluster
        ));
    }
    let s = scan(node, cluster)
        .await
        .map_err(|e| format!("reading its slots: {}", describe(&e)))?;
    let v = s.view();
    // A half this store wrote stays known unless the scan found the node's newest root
    // needs that half for something else.
    let keep = holds.is_some_and(|(h, r)| v.protected.is_none_or(|(ph, pr)| ph != h || pr == r));
    if !keep {
        *holds = v.protected;
    }
    Ok(v)
}

/// Step one of a commit with a checkpoint, on one node.
async fn checkpoint_step(
    node: &MetaNode,
    cluster: ClusterId,
    view: Option<View>,
    mut holds: Option<(u8, CheckpointRef)>,
    current: &Current,
) -> Outcome {
    let view = match ensure_view(node, cluster, view, &mut holds).await {
        Ok(v) => v,
        Err(reason) => {
            return Outcome {
                view: None,
                holds,
                resynced: false,
                result: Err(reason),
            }
        }
    };
    let half = target_half(&view);
    let result = write_checkpoint(node, half, &current.image)
        .await
        .map_err(|e| format!("checkpoint {}: {e}", current.r.sequence));
    Outcome {
        view: Some(view),
        holds: result.is_ok().then_some((half, current.r)),
        resynced: false,
        result,
    }
}

/// The root step on one node: resync the current checkpoint if the node lacks it
/// (only when `resync`), then write the root to the slot not holding its newest root.
#[allow(clippy::too_many_arguments)]
async fn root_step(
    node: &MetaNode,
    cluster: ClusterId,
    view: Option<View>,
    mut holds: Option<(u8, CheckpointRef)>,
    current: Option<&Current>,
    resync: bool,
    root_image: &[u8],
    fallback_slot: u8,
) -> Outcome {
    let fail = |view, holds, resynced, reason| Outcome {
        view,
        holds,
        resynced,
        result: Err(reason),
    };
    let view = match ensure_view(node, cluster, view, &mut holds).await {
        Ok(v) => v,
        Err(reason) => return fail(None, holds, false, reason),
    };
    let mut resynced = false;
    let mut protected = None;
    if let Some(cur) = current {
        match holds {
            Some((h, r)) if r == cur.r => protected = Some((h, r)),
            _ if !resync => {
                return fail(
                    Some(view),
                    holds,
                    false,
                    "does not hold the checkpoint".into(),
                )
            }
            _ => {
                let half = target_half(&view);
                if let Err(e) = write_checkpoint(node, half, &cur.image).await {
                    let reason = format!("resync of checkpoint {}: {e}", cur.r.sequence);
                    return fail(Some(view), None, false, reason);
                }
                holds = Some((half, cur.r));
                protected = holds;
                resynced = true;
            }
        }
    }
    let slot = view.newest_slot.map_or(fallback_slot, |s| 1 - s);
    let layout = &node.superblock.layout;
    if root_image.len() as u64 > layout.root_slot_len {
        let reason = format!(
            "root image of {} bytes exceeds this node's {}-byte slot",
            root_image.len(),
            layout.root_slot_len
        );
        return fail(Some(view), holds, resynced, reason);
    }
    let at = layout.root_slot_offset(slot);
    match node.shard.write(at, root_image.to_vec(), true).await {
        Ok(()) => Outcome {
            view: Some(View {
                newest_slot: Some(slot),
                protected,
            }),
            holds,
            resynced,
            result: Ok(()),
        },
        // The write may or may not have landed: the node's newest root is unknown now.
        Err(e) => fail(None, holds, resynced, format!("root at byte {at}: {e}")),
    }
}

impl MetaStore {
    /// A store for a fresh cluster: generation 0, nothing committed. `nodes` must be
    /// formatted for `cluster` (others fail every commit with that reason).
    pub fn new(cluster: ClusterId, nodes: Vec<MetaNode>, min_acks: usize) -> Self {
        let mut store = MetaStore {
            cluster,
            members: Vec::new(),
            min_acks,
            session: 1,
            counter: 0,
            generation: 0,
            ckpt_seq: 0,
            current: None,
            opening: None,
        };
        for n in nodes {
            store.add_node(n);
        }
        store
    }

    /// Loads the newest commit from the nodes behind `shards` (see the module doc).
    ///
    /// Unreachable namespaces are skipped and reported. If every reachable namespace is
    /// blank the result is an empty store (no nodes; `expect` or a fresh cluster id) and
    /// `None`; a mix of blank and formatted ones, formatted ones of different clusters
    /// (or not `expect`), or no namespace reachable at all are errors. The newest
    /// generation whose root verifies wins; if its checkpoint verifies on no node
    /// holding that root, the result is [`MetadataError::MetadataLost`].
    pub async fn load(
        shards: Vec<Arc<dyn ShardStore>>,
        expect: Option<ClusterId>,
        min_acks: usize,
    ) -> Result<(Self, Option<Recovered>), MetadataError> {
        let read = join_all(shards.iter().map(|s| read_superblock(&**s))).await;
        let mut unreachable = Vec::new();
        let mut blank = Vec::new();
        let mut nodes = Vec::new();
        for (shard, r) in shards.iter().zip(read) {
            let name = shard.info().node.clone();
            match r {
                Ok(Some(superblock)) => nodes.push(MetaNode {
                    shard: Arc::clone(shard),
                    superblock,
                }),
                Ok(None) => blank.push(name),
                Err(e @ MetadataError::Shard { .. }) => unreachable.push((name, describe(&e))),
                Err(e) => return Err(e),
            }
        }
        if nodes.is_empty() {
            if !unreachable.is_empty() {
                return Err(MetadataError::NoneReachable { unreachable });
            }
            let cluster = match expect {
                Some(c) => c,
                None => ClusterId::generate()?,
            };
            return Ok((MetaStore::new(cluster, Vec::new(), min_acks), None));
        }
        let cluster = expect.unwrap_or(nodes[0].superblock.cluster);
        if nodes.iter().any(|n| n.superblock.cluster != cluster) {
            return Err(MetadataError::ClusterMismatch {
                expected: expect,
                nodes: nodes
                    .iter()
                    .map(|n| (n.id().to_owned(), n.superblock.cluster))
                    .collect(),
            });
        }
        let mut seen = BTreeMap::new();
        for n in &nodes {
            if seen.insert(n.id().to_owned(), ()).is_some() {
                return Err(MetadataError::DuplicateNode {
                    node: n.id().to_owned(),
                });
            }
        }
        if !blank.is_empty() {
            return Err(MetadataError::NotFormatted {
                blank,
                formatted: seen.into_keys().collect(),
            });
        }

        let scans = join_all(nodes.iter().map(|n| scan(n, cluster))).await;
        let mut members = Vec::new();
        let mut scanned = Vec::new();
        for (node, s) in nodes.into_iter().zip(scans) {
            match s {
                Ok(s) => {
                    let view = s.view();
                    members.push(Member {
                        node,
                        view: Some(view),
                        holds: view.protected,
                    });
                    scanned.push(Some(s));
                }
                Err(e @ MetadataError::UnsupportedVersion { .. }) => return Err(e),
                Err(e) => {
                    unreachable.push((node.id().to_owned(), describe(&e)));
                    members.push(Member {
                        node,
                        view: None,
                        holds: None,
                    });
                    scanned.push(None);
                }
            }
        }
        if scanned.iter().all(Option::is_none) {
            return Err(MetadataError::NoneReachable { unreachable });
        }

        // The highest session and checkpoint sequence anywhere: the new session goes
        // above the first, new checkpoints above the second.
        let mut max_session = 0;
        let mut max_seq = 0;
        let mut top: Option<u64> = None;
        for s in scanned.iter().flatten() {
            for (_, r) in &s.roots {
                max_session = max_session.max(generation_session(r.header.generation));
                max_seq = max_seq.max(r.header.checkpoint.map_or(0, |c| c.sequence));
                top = top.max(Some(r.header.generation));
            }
            for h in s.halves.iter().flatten() {
                max_seq = max_seq.max(h.sequence);
            }
        }
        let session = max_session.max(1) + 1;
        if session > MAX_SESSION {
            return Err(MetadataError::Exhausted {
                what: "session numbers",
            });
        }
        let mut store = MetaStore {
            cluster,
            members,
            min_acks,
            session,
            counter: 0,
            generation: 0,
            ckpt_seq: max_seq,
            current: None,
            opening: Some((Vec::new(), true)),
        };
        let Some(top) = top else {
            // Formatted, nothing committed yet.
            return Ok((store, None));
        };

        // Roots of the top generation, grouped by content (crc); normally one group.
        let mut variants: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, s) in scanned.iter().enumerate() {
            let Some(s) = s else { continue };
            if let Some((_, r)) = s.newest().filter(|(_, r)| r.header.generation == top) {
                variants.entry(r.header.crc).or_default().push(i);
            }
        }
        let mut order: Vec<(u32, Vec<usize>)> = variants.into_iter().collect();
        order.sort_by_key(|(crc, holders)| (std::cmp::Reverse(holders.len()), *crc));
        let mut tried = Vec::new();
        let mut chosen = None;
        'variants: for (crc, holders) in &order {
            for &i in holders {
                let (Some(s), Some(m)) = (&scanned[i], store.members.get(i)) else {
                    continue;
                };
                let Some((_, root)) = s.newest() else {
                    continue;
                };
                let Some(want) = root.header.checkpoint else {
                    chosen = Some((*crc, i, root.clone(), None));
                    break 'variants;
                };
                let Some(half) = s.half_of(want) else {
                    tried.push((
                        m.node.id().to_owned(),
                        format!("no half holds checkpoint {}", want.sequence),
                    ));
                    continue;
                };
                let layout = &m.node.superblock.layout;
                match read_checkpoint(&*m.node.shard, layout, cluster, half, want).await {
                    Ok(Ok(payload)) => {
                        chosen = Some((*crc, i, root.clone(), Some((want, half, payload))));
                        break 'variants;
                    }
                    Ok(Err(reason)) => tried.push((m.node.id().to_owned(), reason)),
                    Err(e) => tried.push((m.node.id().to_owned(), describe(&e))),
                }
            }
        }
        let Some((crc, from, root, ckpt)) = chosen else {
            return Err(MetadataError::MetadataLost {
                generation: top,
                tried,
            });
        };
        store.generation = top;
        let mut stale = Vec::new();
        for (m, s) in store.members.iter_mut().zip(&scanned) {
            let Some(s) = s else { continue };
            let same = s
                .newest()
                .is_some_and(|(_, r)| r.header.generation == top && r.header.crc == crc);
            if !same {
                stale.push(m.node.id().to_owned());
            }
        }
        let from_node = store.members[from].node.id().to_owned();
        let checkpoint = match ckpt {
            Some((want, _half, payload)) => {
                store.current = Some(Current {
                    r: want,
                    image: Arc::new(encode_checkpoint(
                        cluster,
                        want.sequence,
                        &payload,
                        MAX_BLOCK_PAD,
                    )),
                });
                Some(payload)
            }
            None => None,
        };
        store.opening = Some((root.payload.clone(), root.header.empty));
        if root.header.empty {
            return Ok((store, None));
        }
        Ok((
            store,
            Some(Recovered {
                generation: top,
                root: root.payload,
                checkpoint,
                from_node,
                stale_nodes: stale,
                unreachable,
            }),
        ))
    }

    /// The cluster this store commits for.
    pub fn cluster(&self) -> ClusterId {
        self.cluster
    }

    /// The generation of the last commit attempted (or recovered); 0 if none.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The ids of the store's nodes.
    pub fn nodes(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| m.node.id().to_owned())
            .collect()
    }

    /// The number of acknowledgements a commit needs.
    pub fn min_acks(&self) -> usize {
        self.min_acks
    }

    /// Adds a node (replacing one with the same id). Its slots are read at the next
    /// commit, and it gets the current checkpoint before its first root.
    pub fn add_node(&mut self, node: MetaNode) {
        self.remove_node(&node.superblock.node_id.clone());
        self.members.push(Member {
            node,
            view: None,
            holds: None,
        });
    }

    /// Removes a node; later commits neither write to it nor count it.
    pub fn remove_node(&mut self, node_id: &str) {
        self.members.retain(|m| m.node.id() != node_id);
    }

    /// Sets how many nodes must acknowledge a commit (capped at the node count).
    pub fn set_min_acks(&mut self, n: usize) {
        self.min_acks = n;
    }

    /// The largest root payload every node of the store holds (0 without nodes).
    pub fn max_root_len(&self) -> u64 {
        self.members
            .iter()
            .map(|m| max_root_payload(&m.node.superblock.layout))
            .min()
            .unwrap_or(0)
    }

    /// The largest checkpoint payload every node of the store holds (0 without nodes).
    pub fn max_checkpoint_len(&self) -> u64 {
        self.members
            .iter()
            .map(|m| max_checkpoint_payload(&m.node.superblock.layout))
            .min()
            .unwrap_or(0)
    }

    fn needed(&self) -> usize {
        self.min_acks.clamp(1, self.members.len().max(1))
    }

    fn pad_block(&self) -> u32 {
        self.members
            .iter()
            .map(|m| m.node.superblock.layout.block_size)
            .max()
            .unwrap_or(4096)
    }

    /// Commits a root (and, if given, a new checkpoint) to the nodes: see the module
    /// doc for the protocol. The generation advances even when the commit fails.
    ///
    /// The first commit of a loaded store first writes the session's opening; if that
    /// cannot reach `min_acks` nodes the error is `CommitFailed` with a generation whose
    /// counter is 0, nothing of this commit was written, and the next call retries.
    pub async fn commit(
        &mut self,
        root: &[u8],
        checkpoint: Option<&[u8]>,
    ) -> Result<CommitReport, MetadataError> {
        if self.members.is_empty() {
            return Err(MetadataError::NoNodes);
        }
        let root_max = self.max_root_len();
        if root.len() as u64 > root_max {
            return Err(MetadataError::TooLarge {
                what: "root",
                len: root.len() as u64,
                max: root_max,
            });
        }
        if let Some(c) = checkpoint {
            let max = self.max_checkpoint_len();
            if c.len() as u64 > max {
                return Err(MetadataError::TooLarge {
                    what: "checkpoint",
                    len: c.len() as u64,
                    max,
                });
            }
        }
        if self.opening.is_some() {
            self.open().await?;
        }
        let counter = self
            .counter
            .checked_add(1)
            .filter(|c| *c <= MAX_COUNTER)
            .ok_or(MetadataError::Exhausted {
                what: "commit counter of this session (load again to start a new one)",
            })?;
        self.counter = counter;
        let generation = make_generation(self.session, counter);
        self.generation = generation;

        let mut failed = Vec::new();
        let resync = checkpoint.is_none();
        if let Some(payload) = checkpoint {
            let seq = self
                .ckpt_seq
                .checked_add(1)
                .ok_or(MetadataError::Exhausted {
                    what: "checkpoint sequence",
                })?;
            self.ckpt_seq = seq;
            let current = Current {
                r: checkpoint_ref(seq, payload),
                image: Arc::new(encode_checkpoint(self.cluster, seq, payload, MAX_BLOCK_PAD)),
            };
            self.current = Some(current.clone());
            let cluster = self.cluster;
            let outcomes = join_all(
                self.members
                    .iter()
                    .map(|m| checkpoint_step(&m.node, cluster, m.view, m.holds, &current)),
            )
            .await;
            for (m, o) in self.members.iter_mut().zip(outcomes) {
                m.view = o.view;
                m.holds = o.holds;
                if let Err(reason) = o.result {
                    failed.push((m.node.id().to_owned(), reason));
                }
            }
        }
        let image = encode_root(
            self.cluster,
            generation,
            false,
            self.current.as_ref().map(|c| c.r),
            root,
            self.pad_block(),
        );
        let (acked, root_failed, resynced) = self.root_round(&image, resync, &failed).await;
        failed.extend(root_failed);
        let needed = self.needed();
        if acked.len() < needed {
            return Err(MetadataError::CommitFailed {
                generation,
                needed,
                acked,
                failed,
            });
        }
        Ok(CommitReport {
            generation,
            acked,
            failed,
            resynced,
        })
    }

    /// Restates the recovered root as counter 0 of this session on `min_acks` nodes.
    async fn open(&mut self) -> Result<(), MetadataError> {
        let Some((payload, empty)) = self.opening.clone() else {
            return Ok(());
        };
        let generation = make_generation(self.session, 0);
        let image = encode_root(
            self.cluster,
            generation,
            empty,
            self.current.as_ref().map(|c| c.r),
            &payload,
            self.pad_block(),
        );
        let (acked, failed, _) = self.root_round(&image, true, &[]).await;
        let needed = self.needed();
        if acked.len() < needed {
            return Err(MetadataError::CommitFailed {
                generation,
                needed,
                acked,
                failed,
            });
        }
        self.opening = None;
        self.generation = generation;
        Ok(())
    }

    /// Writes a root image to every node not in `skip`, resyncing the current
    /// checkpoint first where allowed. Returns (acked, failed, resynced).
    async fn root_round(
        &mut self,
        image: &[u8],
        resync: bool,
        skip: &[(String, String)],
    ) -> (Vec<String>, Vec<(String, String)>, Vec<String>) {
        let cluster = self.cluster;
        let current = self.current.clone();
        let fallback = u8::from(self.counter % 2 == 1);
        let outcomes = join_all(self.members.iter().map(|m| {
            let skipped = skip.iter().any(|(n, _)| n == m.node.id());
            let current = current.as_ref();
            async move {
                if skipped {
                    return None;
                }
                Some(
                    root_step(
                        &m.node, cluster, m.view, m.holds, current, resync, image, fallback,
                    )
                    .await,
                )
            }
        }))
        .await;
        let (mut acked, mut failed, mut resynced) = (Vec::new(), Vec::new(), Vec::new());
        for (m, o) in self.members.iter_mut().zip(outcomes) {
            let Some(o) = o else { continue };
            m.view = o.view;
            m.holds = o.holds;
            let id = m.node.id().to_owned();
            if o.resynced {
                resynced.push(id.clone());
            }
            match o.result {
                Ok(()) => acked.push(id),
                Err(reason) => failed.push((id, reason)),
            }
        }
        (acked, failed, resynced)
    }
}

/// What a node's metadata area holds, for diagnostics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInspection {
    /// The superblock (`None`: blank).
    pub superblock: Option<Superblock>,
    /// Both root slots: offset and contents.
    pub slots: Vec<(u64, SlotState)>,
    /// Both checkpoint halves: offset and what the header claims (or why it is unusable).
    pub halves: Vec<(u64, Result<CheckpointRef, String>)>,
}

/// Reads a node's superblock, root slots and checkpoint headers (nothing is written).
pub async fn inspect_node(shard: &dyn ShardStore) -> Result<NodeInspection, MetadataError> {
    let Some(sb) = read_superblock(shard).await? else {
        return Ok(NodeInspection {
            superblock: None,
            slots: Vec::new(),
            halves: Vec::new(),
        });
    };
    let layout = sb.layout;
    let mut slots = Vec::new();
    let mut halves = Vec::new();
    for i in 0u8..2 {
        let at = layout.root_slot_offset(i);
        let s = match read_root_slot(shard, &sb.node_id, &layout, sb.cluster, i).await {
            Ok(s) => s,
            Err(e @ MetadataError::UnsupportedVersion { .. }) => return Err(e),
            Err(e) => SlotState::Invalid(describe(&e)),
        };
        slots.push((at, s));
        let at = layout.ckpt_half_offset(i);
        let h = match read_checkpoint_header(shard, &layout, sb.cluster, i).await {
            Ok(h) => h,
            Err(e) => Err(describe(&e)),
        };
        halves.push((at, h));
    }
    Ok(NodeInspection {
        superblock: Some(sb),
        slots,
        halves,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn commit_and_load_futures_can_be_spawned() {
        let mut store = MetaStore::new(ClusterId([0; 16]), Vec::new(), 1);
        let commit = store.commit(b"", None);
        assert_send(&commit);
        drop(commit);
        let load = MetaStore::load(Vec::new(), None, 1);
        assert_send(&load);
    }

    #[test]
    fn generations_order_by_session_then_counter() {
        let g = make_generation(3, 7);
        assert_eq!((generation_session(g), generation_counter(g)), (3, 7));
        assert!(make_generation(2, MAX_COUNTER) < make_generation(3, 0));
        assert_eq!(
            generation_session(make_generation(MAX_SESSION, 0)),
            MAX_SESSION
        );
    }
}
