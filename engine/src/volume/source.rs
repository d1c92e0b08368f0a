//! Where a volume gets its segments from, and where its checkpoints go.
//!
//! The volume decides *when* it needs a segment or a checkpoint; the source decides
//! *where* (placement over the cluster map, a free chunk on each chosen node) and makes
//! the decision durable before answering, so that a segment the volume writes to is
//! always known to recovery. The engine's source is the pool (`engine::pool`), which
//! records allocations and checkpoints in the mirrored metadata area on the nodes.
//! [`InMemorySource`] keeps the same records in memory: what it holds survives the drop
//! of a volume (an engine crash, in tests) exactly as the nodes' metadata would.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use super::image::VolumeImage;
use super::VolumeError;
use crate::pipeline::VolumeId;
use crate::shard::ShardStore;

/// The future every source operation returns.
pub type SourceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, VolumeError>> + Send + 'a>>;

/// One piece of a segment: a chunk on one node.
#[derive(Debug, Clone)]
pub struct SegmentPiece {
    /// The node's id.
    pub node: String,
    /// The node's namespace.
    pub shard: Arc<dyn ShardStore>,
    /// Byte offset of the chunk on the node.
    pub base: u64,
}

/// A segment handed to a volume: piece i of every row goes to `pieces[i]`.
#[derive(Debug, Clone)]
pub struct SegmentGrant {
    /// The segment's number within the volume (row numbers derive from it).
    pub index: u64,
    /// Allocation order across the volume's life: replay visits segments in this order.
    pub alloc_seq: u64,
    /// k + m pieces.
    pub pieces: Vec<SegmentPiece>,
}

/// Allocates segments and stores checkpoints for volumes. See the module documentation.
pub trait SegmentSource: Send + Sync + std::fmt::Debug {
    /// A new segment for `volume` with one piece on each of `pieces` nodes in distinct
    /// failure domains, none of them in `avoid`; durable before it returns.
    fn allocate(
        &self,
        volume: VolumeId,
        pieces: usize,
        avoid: Vec<String>,
    ) -> SourceFuture<'_, SegmentGrant>;

    /// Makes `image` the volume's checkpoint, then releases the segments in `free`
    /// (which the image no longer references) for reuse; durable before it returns.
    fn checkpoint(
        &self,
        volume: VolumeId,
        image: VolumeImage,
        free: Vec<u64>,
    ) -> SourceFuture<'_, ()>;

    /// Reserves a chunk for piece `piece` of segment `segment`, which is being rebuilt
    /// away from its node: on a node placement allows next to the segment's other
    /// pieces (another failure domain, none of them in `avoid`). The reservation keeps
    /// the chunk from being handed out until [`SegmentSource::replace_piece`] or
    /// [`SegmentSource::release_piece`]; it need not survive a crash (a chunk written
    /// by a rebuild that never committed holds only records older than the volume's
    /// checkpoint, which replay ignores).
    fn reserve_piece(
        &self,
        volume: VolumeId,
        segment: u64,
        piece: usize,
        avoid: Vec<String>,
    ) -> SourceFuture<'_, SegmentPiece> {
        let _ = (volume, segment, piece, avoid);
        Box::pin(async {
            Err(VolumeError::Metadata(
                "this source cannot move pieces".into(),
            ))
        })
    }

    /// Makes `to` (reserved by [`SegmentSource::reserve_piece`] and fully written)
    /// piece `piece` of segment `segment` in place of the piece on node `from_node` at
    /// `from_base`; durable before it returns. Only then is the old chunk forgotten.
    /// Refused if the segment no longer has that piece there (freed, or moved).
    fn replace_piece(
        &self,
        volume: VolumeId,
        segment: u64,
        piece: usize,
        from: (String, u64),
        to: SegmentPiece,
    ) -> SourceFuture<'_, ()> {
        let _ = (volume, segment, piece, from, to);
        Box::pin(async {
            Err(VolumeError::Metadata(
                "this source cannot move pieces".into(),
            ))
        })
    }

    /// Gives back a chunk reserved by [`SegmentSource::reserve_piece`] and not used.
    fn release_piece(&self, volume: VolumeId, piece: SegmentPiece) -> SourceFuture<'_, ()> {
        let _ = (volume, piece);
        Box::pin(async { Ok(()) })
    }
}

#[derive(Debug, Default)]
struct VolumeRecord {
    segments: BTreeMap<u64, SegmentGrant>,
    image: Option<VolumeImage>,
    next_seq: u64,
}

#[derive(Debug, Default)]
struct State {
    volumes: BTreeMap<[u8; 16], VolumeRecord>,
    /// Per node: chunks in use.
    used: Vec<Vec<bool>>,
    checkpoints: u64,
}

/// A segment source over a fixed set of shards, with its records in memory. Pieces go to
/// the least used nodes (distinct nodes per segment). For tests and tools.
#[derive(Debug)]
pub struct InMemorySource {
    shards: Vec<Arc<dyn ShardStore>>,
    chunk_size: u64,
    chunks_per_node: usize,
    state: Mutex<State>,
}

impl InMemorySource {
    /// A source cutting each shard into chunks of `chunk_size` bytes.
    pub fn new(shards: Vec<Arc<dyn ShardStore>>, chunk_size: u64) -> Self {
        let smallest = shards
            .iter()
            .map(|s| s.info().capacity_bytes)
            .min()
            .unwrap_or(0);
        let chunks_per_node = usize::try_from(smallest / chunk_size.max(1)).unwrap_or(0);
        let used = vec![vec![false; chunks_per_node]; shards.len()];
        Self {
            shards,
            chunk_size,
            chunks_per_node,
            state: Mutex::new(State {
                used,
                ..State::default()
            }),
        }
    }

    /// The segments and checkpoint recorded for `volume`, as recovery would find them.
    pub fn recorded(&self, volume: VolumeId) -> (Vec<SegmentGrant>, Option<VolumeImage>) {
        let Ok(state) = self.state.lock() else {
            return (Vec::new(), None);
        };
        match state.volumes.get(&volume.0) {
            Some(v) => (v.segments.values().cloned().collect(), v.image.clone()),
            None => (Vec::new(), None),
        }
    }

    /// Chunks not in use, over all nodes.
    pub fn free_chunks(&self) -> usize {
        self.state
            .lock()
            .map(|s| s.used.iter().flatten().filter(|u| !**u).count())
            .unwrap_or(0)
    }

    /// Checkpoints stored so far.
    pub fn checkpoints(&self) -> u64 {
        self.state.lock().map(|s| s.checkpoints).unwrap_or(0)
    }

    fn allocate_now(
        &self,
        volume: VolumeId,
        pieces: usize,
        avoid: &[String],
    ) -> Result<SegmentGrant, VolumeError> {
        let mut state = self.lock_state()?;
        let mut candidates: Vec<(usize, usize)> = (0..self.shards.len())
            .filter(|&n| !avoid.iter().any(|a| a == &self.shards[n].info().node))
            .map(|n| (state.used[n].iter().filter(|u| **u).count(), n))
            .filter(|&(used, _)| used < self.chunks_per_node)
            .collect();
        candidates.sort_unstable();
        if candidates.len() < pieces {
            return Err(VolumeError::NoSpace {
                reason: format!(
                    "{} nodes have a free chunk outside {:?}, {pieces} needed",
                    candidates.len(),
                    avoid
                ),
            });
        }
        let record = state.volumes.entry(volume.0).or_default();
        let index = (0..)
            .find(|i| !record.segments.contains_key(i))
            .unwrap_or(0);
        let alloc_seq = record.next_seq;
        record.next_seq += 1;
        let mut out = Vec::with_capacity(pieces);
        for &(_, n) in candidates.iter().take(pieces) {
            let chunk = state.used[n].iter().position(|u| !*u).unwrap_or(0);
            state.used[n][chunk] = true;
            out.push(SegmentPiece {
                node: self.shards[n].info().node.clone(),
                shard: Arc::clone(&self.shards[n]),
                base: chunk as u64 * self.chunk_size,
            });
        }
        let grant = SegmentGrant {
            index,
            alloc_seq,
            pieces: out,
        };
        state
            .volumes
            .entry(volume.0)
            .or_default()
            .segments
            .insert(index, grant.clone());
        Ok(grant)
    }

    /// The state, or an error once a panic has poisoned its lock.
    fn lock_state(&self) -> Result<MutexGuard<'_, State>, VolumeError> {
        self.state
            .lock()
            .map_err(|_| VolumeError::Config("segment source poisoned".into()))
    }

    fn node_index(&self, node: &str) -> Option<usize> {
        self.shards.iter().position(|s| s.info().node == node)
    }

    fn chunk_of(&self, base: u64) -> usize {
        usize::try_from(base / self.chunk_size.max(1)).unwrap_or(usize::MAX)
    }

    fn reserve_now(
        &self,
        volume: VolumeId,
        segment: u64,
        avoid: &[String],
    ) -> Result<SegmentPiece, VolumeError> {
        let mut state = self.lock_state()?;
        let state = &mut *state;
        let holding: Vec<String> = state
            .volumes
            .get(&volume.0)
            .and_then(|v| v.segments.get(&segment))
            .map(|g| g.pieces.iter().map(|p| p.node.clone()).collect())
            .ok_or_else(|| VolumeError::Metadata(format!("segment {segment} is not recorded")))?;
        let mut candidates: Vec<(usize, usize)> = (0..self.shards.len())
            .filter(|&n| {
                let id = &self.shards[n].info().node;
                !avoid.contains(id) && !holding.contains(id)
            })
            .map(|n| (state.used[n].iter().filter(|u| **u).count(), n))
            .filter(|&(used, _)| used < self.chunks_per_node)
            .collect();
        candidates.sort_unstable();
        let &(_, n) = candidates.first().ok_or_else(|| VolumeError::NoSpace {
            reason: format!("no node outside {holding:?} and {avoid:?} has a free chunk"),
        })?;
        let chunk = state.used[n].iter().position(|u| !*u).unwrap_or(0);
        state.used[n][chunk] = true;
        Ok(SegmentPiece {
            node: self.shards[n].info().node.clone(),
            shard: Arc::clone(&self.shards[n]),
            base: chunk as u64 * self.chunk_size,
        })
    }

    fn replace_now(
        &self,
        volume: VolumeId,
        segment: u64,
        piece: usize,
        from: &(String, u64),
        to: SegmentPiece,
    ) -> Result<(), VolumeError> {
        let mut state = self.lock_state()?;
        let state = &mut *state;
        let slot = state
            .volumes
            .get_mut(&volume.0)
            .and_then(|v| v.segments.get_mut(&segment))
            .and_then(|g| g.pieces.get_mut(piece))
            .filter(|p| p.node == from.0 && p.base == from.1)
            .ok_or_else(|| {
                VolumeError::Metadata(format!(
                    "segment {segment} piece {piece} is no longer on {} at {}",
                    from.0, from.1
                ))
            })?;
        *slot = to;
        if let Some(n) = self.node_index(&from.0) {
            let chunk = self.chunk_of(from.1);
            if let Some(u) = state.used[n].get_mut(chunk) {
                *u = false;
            }
        }
        Ok(())
    }

    fn release_now(&self, piece: &SegmentPiece) {
        if let (Ok(mut state), Some(n)) = (self.state.lock(), self.node_index(&piece.node)) {
            let chunk = self.chunk_of(piece.base);
            if let Some(u) = state.used[n].get_mut(chunk) {
                *u = false;
            }
        }
    }

    fn checkpoint_now(
        &self,
        volume: VolumeId,
        image: VolumeImage,
        free: Vec<u64>,
    ) -> Result<(), VolumeError> {
        let mut state = self.lock_state()?;
        let state = &mut *state;
        state.checkpoints += 1;
        let record = state.volumes.entry(volume.0).or_default();
        record.image = Some(image);
        for index in free {
            if let Some(grant) = record.segments.remove(&index) {
                for piece in grant.pieces {
                    if let Some(n) = self.node_index(&piece.node) {
                        if let Some(slot) = state.used[n].get_mut(self.chunk_of(piece.base)) {
                            *slot = false;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl SegmentSource for InMemorySource {
    fn allocate(
        &self,
        volume: VolumeId,
        pieces: usize,
        avoid: Vec<String>,
    ) -> SourceFuture<'_, SegmentGrant> {
        let result = self.allocate_now(volume, pieces, &avoid);
        Box::pin(async move { result })
    }

    fn checkpoint(
        &self,
        volume: VolumeId,
        image: VolumeImage,
        free: Vec<u64>,
    ) -> SourceFuture<'_, ()> {
        let result = self.checkpoint_now(volume, image, free);
        Box::pin(async move { result })
    }

    fn reserve_piece(
        &self,
        volume: VolumeId,
        segment: u64,
        _piece: usize,
        avoid: Vec<String>,
    ) -> SourceFuture<'_, SegmentPiece> {
        let result = self.reserve_now(volume, segment, &avoid);
        Box::pin(async move { result })
    }

    fn replace_piece(
        &self,
        volume: VolumeId,
        segment: u64,
        piece: usize,
        from: (String, u64),
        to: SegmentPiece,
    ) -> SourceFuture<'_, ()> {
        let result = self.replace_now(volume, segment, piece, &from, to);
        Box::pin(async move { result })
    }

    fn release_piece(&self, _volume: VolumeId, piece: SegmentPiece) -> SourceFuture<'_, ()> {
        self.release_now(&piece);
        Box::pin(async { Ok(()) })
    }
}
