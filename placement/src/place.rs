//! Choosing the nodes for the pieces of a segment, and planning moves when the map changes.
//!
//! The algorithm (why it is this one, and what it costs in balance, is argued in
//! `docs/placement.md`):
//!
//! 1. Every eligible node `j` (up, weight > 0) draws `U_j = unit(draw(volume, segment,
//!    key(j)))` and gets the exponential-race time `t_j = -ln(U_j) / w_j`. This is
//!    weighted rendezvous hashing: the node with the smallest time wins with probability
//!    exactly `w_j / W`, and adding or removing a node changes no other node's time.
//! 2. Walking the nodes in time order, each node whose failure domain does not yet hold a
//!    piece takes the next piece, until all `n` pieces are placed. Equivalently: every
//!    domain is ranked by its earliest node, and piece `i` goes to the earliest node of
//!    the domain ranked `i`.
//!
//! Because a node's time never depends on any other node, adding a node moves only
//! pieces onto that node, and removing one moves only the pieces it held: the minimum
//! movement. The price is balance when `n` is a large part of the domain count: a domain
//! can hold only one piece of a segment, so heavy domains get somewhat less than their
//! weight-proportional share and light ones somewhat more (the tolerance and its
//! conditions are in `docs/placement.md` and the property tests).
//!
//! Recorded placements are never recomputed behind the engine's back: recovery and
//! rebalancing take the recorded assignment and return explicit moves of single pieces,
//! keeping every other piece, and its index, where it is.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{DomainShortage, Error};
use crate::hash;
use crate::map::{ClusterMap, NodeId, NodeState};
use crate::profile::{Layout, Profile, Resolved};

/// A segment of a volume: the unit that is placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SegmentId {
    /// Volume id.
    pub volume: u64,
    /// Segment number within the volume.
    pub segment: u64,
}

impl SegmentId {
    /// Volume `volume`, segment `segment`.
    #[must_use]
    pub const fn new(volume: u64, segment: u64) -> Self {
        Self { volume, segment }
    }
}

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.volume, self.segment)
    }
}

/// Where the pieces of a segment are: `pieces[i]` holds piece `i` (data strips first,
/// then parity; for mirrors, copy `i`). This is what the engine records.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Assignment {
    /// The segment.
    pub segment: SegmentId,
    /// Node of each piece, by piece index.
    pub pieces: Vec<NodeId>,
}

/// Why a piece moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveReason {
    /// Its node is down: the piece is rebuilt from the others.
    NodeDown,
    /// Its node is out: the piece is rebuilt from the others.
    NodeOut,
    /// Its node is no longer in the map: the piece is rebuilt from the others.
    NodeRemoved,
    /// Its node is draining: the piece is copied, then dropped from the old node.
    Drain,
    /// Balance: the map changed (node added, weight changed) and this piece should now be
    /// elsewhere; it is copied.
    Rebalance,
}

impl MoveReason {
    /// Whether the old copy is unreadable, so the piece must be rebuilt from the others.
    #[must_use]
    pub fn needs_rebuild(self) -> bool {
        matches!(self, Self::NodeDown | Self::NodeOut | Self::NodeRemoved)
    }
}

/// One piece to move.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PieceMove {
    /// The segment.
    pub segment: SegmentId,
    /// Piece index (unchanged by the move).
    pub piece: usize,
    /// Where it is recorded now.
    pub from: NodeId,
    /// Where it goes.
    pub to: NodeId,
    /// Why.
    pub reason: MoveReason,
}

/// A plan over many segments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Epoch of the map the plan was computed from.
    pub epoch: u64,
    /// Moves, in the order the segments were given, by piece index within a segment.
    pub moves: Vec<PieceMove>,
    /// Segments the plan could not fix, and why.
    pub failed: Vec<(SegmentId, Error)>,
}

#[derive(Debug, Clone)]
struct Candidate {
    map_index: usize,
    key: u64,
    inv_weight: f64,
}

#[derive(Debug, Clone)]
struct Domain {
    name: String,
    /// Range of this domain's candidates in `Placer::candidates`.
    start: usize,
    end: usize,
}

/// Placement for one layout at one failure-domain level on one map, precomputed so that
/// placing a segment costs one hash per eligible node.
#[derive(Debug, Clone)]
pub struct Placer<'a> {
    map: &'a ClusterMap,
    layout: Layout,
    level: usize,
    /// Domain name of every map node at `level`, by map index.
    node_domain: Vec<usize>,
    candidates: Vec<Candidate>,
    domains: Vec<Domain>,
    /// How domains not holding any eligible node are named in errors.
    unusable: Vec<String>,
}

/// A domain's position in one segment's ranking.
#[derive(Debug, Clone, Copy)]
struct Ranked {
    /// The domain's earliest node time.
    score: f64,
    domain: usize,
    candidate: usize,
}

fn rank_cmp(a: &Ranked, b: &Ranked) -> Ordering {
    a.score.total_cmp(&b.score).then(a.domain.cmp(&b.domain))
}

impl<'a> Placer<'a> {
    /// Placement of `layout` with pieces in distinct domains at `level` (a level name of
    /// the map). Fails if the map has fewer usable domains than pieces.
    pub fn new(map: &'a ClusterMap, layout: Layout, level: &str) -> Result<Self, Error> {
        Self::build(map, layout, level, None)
    }

    /// Placement for a profile: resolves it on the map first (adaptive EC picks its
    /// layout here), and returns the resolution with the placer.
    pub fn for_profile(map: &'a ClusterMap, profile: &Profile) -> Result<(Self, Resolved), Error> {
        let resolved = profile.resolve(map)?;
        let placer = Self::build(map, resolved.layout, &profile.failure_domain, None)?;
        Ok((placer, resolved))
    }

    fn build(
        map: &'a ClusterMap,
        layout: Layout,
        level_name: &str,
        exclude: Option<&NodeId>,
    ) -> Result<Self, Error> {
        let level = map
            .level_index(level_name)
            .ok_or_else(|| Error::NoSuchLevel {
                level: level_name.to_owned(),
                levels: map.levels().join(", "),
            })?;
        // Domain names in sorted order; nodes are sorted by id, so gather then sort.
        let mut names: Vec<&str> = map
            .nodes()
            .iter()
            .map(|n| ClusterMap::domain_at(n, level))
            .collect();
        names.sort_unstable();
        names.dedup();
        let node_domain: Vec<usize> = map
            .nodes()
            .iter()
            .map(|n| {
                names
                    .binary_search(&ClusterMap::domain_at(n, level))
                    .unwrap_or(0)
            })
            .collect();
        let mut per_domain: Vec<Vec<usize>> = vec![Vec::new(); names.len()];
        for (i, n) in map.nodes().iter().enumerate() {
            if n.eligible() && exclude != Some(&n.id) {
                per_domain[node_domain[i]].push(i);
            }
        }
        let mut candidates = Vec::new();
        let mut domains = Vec::new();
        let mut unusable = Vec::new();
        for (d, members) in per_domain.iter().enumerate() {
            if members.is_empty() {
                unusable.push(names[d].to_owned());
                continue;
            }
            let start = candidates.len();
            for &i in members {
                let node = &map.nodes()[i];
                let w = f64::from(node.weight);
                candidates.push(Candidate {
                    map_index: i,
                    key: hash::name_key(node.id.as_str()),
                    inv_weight: 1.0 / w,
                });
            }
            domains.push(Domain {
                name: names[d].to_owned(),
                start,
                end: candidates.len(),
            });
        }
        let n = layout.pieces();
        if domains.len() < n {
            return Err(Error::NotEnoughDomains(Box::new(DomainShortage {
                protection: layout.to_string(),
                needed: n,
                level: level_name.to_owned(),
                usable: domains.iter().map(|d| d.name.clone()).collect(),
                unusable,
                hint: None,
            })));
        }
        // Node index -> domain index among usable domains, for occupancy checks.
        let mut usable_index = vec![usize::MAX; names.len()];
        for (u, d) in domains.iter().enumerate() {
            if let Ok(i) = names.binary_search(&d.name.as_str()) {
                usable_index[i] = u;
            }
        }
        let node_domain = node_domain.iter().map(|&d| usable_index[d]).collect();
        Ok(Self {
            map,
            layout,
            level,
            node_domain,
            candidates,
            domains,
            unusable,
        })
    }

    /// The layout placed.
    #[must_use]
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The map placed on.
    #[must_use]
    pub fn map(&self) -> &'a ClusterMap {
        self.map
    }

    /// The names of the usable failure domains, sorted.
    pub fn domain_names(&self) -> impl Iterator<Item = &str> {
        self.domains.iter().map(|d| d.name.as_str())
    }

    /// The ranking of every usable domain for one segment, best first, each with the node
    /// that represents it.
    fn ranking(&self, seg: SegmentId, out: &mut Vec<Ranked>) {
        out.clear();
        let seed = hash::segment_seed(seg.volume, seg.segment);
        for (di, d) in self.domains.iter().enumerate() {
            let mut candidate = d.start;
            let mut score = f64::INFINITY;
            for (ci, c) in self.candidates[d.start..d.end].iter().enumerate() {
                let u = hash::unit(hash::node_draw(seed, c.key));
                let t = -hash::ln(u) * c.inv_weight;
                // Ties (probability ~2^-53) go to the node with the smaller id.
                if t < score {
                    score = t;
                    candidate = d.start + ci;
                }
            }
            out.push(Ranked {
                score,
                domain: di,
                candidate,
            });
        }
    }

    /// The `n` best domains of [`Placer::ranking`], best first, without taking a
    /// logarithm for most nodes.
    ///
    /// `-ln u` lies between `1 - u` and, for `u >= 1/2`, `2 (1 - u)`, so each node's time
    /// has cheap bounds (widened by 1e-9 so that rounding cannot cross them). The `n`-th
    /// smallest upper bound of a domain is at least the `n`-th smallest exact domain time,
    /// so a domain (or node) whose lower bound is above it cannot be among the `n` best and
    /// is never computed exactly. The result is the same as sorting the full ranking
    /// (`top_matches_the_full_ranking` checks it).
    fn top(&self, seg: SegmentId, buf: &mut Vec<Ranked>) {
        const LOW: f64 = 1.0 - 1e-9;
        const HIGH: f64 = 2.0 * (1.0 + 1e-9);
        let n = self.layout.pieces();
        let seed = hash::segment_seed(seg.volume, seg.segment);
        let mut lower = Vec::with_capacity(self.domains.len());
        let mut upper = Vec::with_capacity(self.domains.len());
        for d in &self.domains {
            let (mut lo, mut hi) = (f64::INFINITY, f64::INFINITY);
            for c in &self.candidates[d.start..d.end] {
                let u = hash::unit(hash::node_draw(seed, c.key));
                let gap = (1.0 - u) * c.inv_weight;
                lo = lo.min(gap * LOW);
                if u >= 0.5 {
                    hi = hi.min(gap * HIGH);
                }
            }
            lower.push(lo);
            upper.push(hi);
        }
        let theta = if upper.len() > n {
            *upper.select_nth_unstable_by(n - 1, f64::total_cmp).1
        } else {
            f64::INFINITY
        };
        buf.clear();
        for (di, d) in self.domains.iter().enumerate() {
            if lower[di] > theta {
                continue;
            }
            let mut candidate = d.start;
            let mut score = f64::INFINITY;
            for (ci, c) in self.candidates[d.start..d.end].iter().enumerate() {
                let u = hash::unit(hash::node_draw(seed, c.key));
                if (1.0 - u) * c.inv_weight * LOW > theta {
                    continue;
                }
                let t = -hash::ln(u) * c.inv_weight;
                if t < score {
                    score = t;
                    candidate = d.start + ci;
                }
            }
            if score <= theta {
                buf.push(Ranked {
                    score,
                    domain: di,
                    candidate,
                });
            }
        }
        if buf.len() > n {
            buf.select_nth_unstable_by(n - 1, rank_cmp);
            buf.truncate(n);
        }
        buf.sort_unstable_by(rank_cmp);
    }

    /// The desired nodes for a segment: `result[i]` gets piece `i`.
    #[must_use]
    pub fn place(&self, seg: SegmentId) -> Vec<NodeId> {
        let mut buf = Vec::with_capacity(self.domains.len());
        self.top(seg, &mut buf);
        buf.iter()
            .map(|r| {
                self.map.nodes()[self.candidates[r.candidate].map_index]
                    .id
                    .clone()
            })
            .collect()
    }

    /// Like [`Placer::place`] but returns indices into [`ClusterMap::nodes`] and reuses
    /// the caller's buffer (for benchmarks and bulk planning).
    pub fn place_indices(&self, seg: SegmentId, out: &mut Vec<usize>) {
        let mut buf = Vec::with_capacity(self.domains.len());
        self.top(seg, &mut buf);
        out.clear();
        out.extend(buf.iter().map(|r| self.candidates[r.candidate].map_index));
    }

    fn check_len(&self, a: &Assignment) -> Result<(), Error> {
        if a.pieces.len() == self.layout.pieces() {
            Ok(())
        } else {
            Err(Error::AssignmentMismatch {
                volume: a.segment.volume,
                segment: a.segment.segment,
                found: a.pieces.len(),
                expected: self.layout.pieces(),
                layout: self.layout.to_string(),
            })
        }
    }

    /// Why the piece on `node` must move, if it must move regardless of balance.
    fn lost_reason(&self, node: &NodeId) -> Option<MoveReason> {
        match self.map.node(node) {
            None => Some(MoveReason::NodeRemoved),
            Some(n) => match n.state {
                NodeState::Down => Some(MoveReason::NodeDown),
                NodeState::Out => Some(MoveReason::NodeOut),
                NodeState::Up | NodeState::Draining => None,
            },
        }
    }

    /// The usable-domain index of a recorded node, if it is in a usable domain.
    fn domain_of(&self, node: &NodeId) -> Option<usize> {
        let i = self.map.index_of(node)?;
        let d = self.node_domain[i];
        (d != usize::MAX).then_some(d)
    }

    /// Replaces the pieces chosen by `lost` (with their reasons), keeping every other
    /// piece; each replacement is the best-ranked domain not already holding a piece.
    fn replace(
        &self,
        a: &Assignment,
        lost: &[(usize, MoveReason)],
    ) -> Result<Vec<PieceMove>, Error> {
        if lost.is_empty() {
            return Ok(Vec::new());
        }
        let mut occupied = vec![false; self.domains.len()];
        for (i, node) in a.pieces.iter().enumerate() {
            if lost.iter().all(|&(l, _)| l != i) {
                if let Some(d) = self.domain_of(node) {
                    occupied[d] = true;
                }
            }
        }
        let mut ranking = Vec::with_capacity(self.domains.len());
        self.ranking(a.segment, &mut ranking);
        ranking.sort_unstable_by(rank_cmp);
        let mut next = ranking.iter();
        let mut moves = Vec::with_capacity(lost.len());
        for &(piece, reason) in lost {
            let Some(r) = next.by_ref().find(|r| !occupied[r.domain]) else {
                return Err(Error::NotEnoughDomains(Box::new(DomainShortage {
                    protection: self.layout.to_string(),
                    needed: self.layout.pieces(),
                    level: self.level_name().to_owned(),
                    usable: self.domains.iter().map(|d| d.name.clone()).collect(),
                    unusable: self.unusable.clone(),
                    hint: Some(format!(
                        "repair segment {} by hand: its other pieces already occupy every usable domain",
                        a.segment
                    )),
                })));
            };
            occupied[r.domain] = true;
            moves.push(PieceMove {
                segment: a.segment,
                piece,
                from: a.pieces[piece].clone(),
                to: self.map.nodes()[self.candidates[r.candidate].map_index]
                    .id
                    .clone(),
                reason,
            });
        }
        Ok(moves)
    }

    fn level_name(&self) -> &str {
        &self.map.levels()[self.level]
    }

    /// Recovery for one segment: a new node for each piece whose node is down, out or gone
    /// from the map, and nothing else.
    pub fn recover(&self, a: &Assignment) -> Result<Vec<PieceMove>, Error> {
        self.check_len(a)?;
        let lost: Vec<(usize, MoveReason)> = a
            .pieces
            .iter()
            .enumerate()
            .filter_map(|(i, n)| self.lost_reason(n).map(|r| (i, r)))
            .collect();
        self.replace(a, &lost)
    }

    /// Rebalancing for one segment: the moves from the recorded assignment to the desired
    /// one ([`Placer::place`]). Pieces already on a desired node stay (whatever their
    /// index); each other piece goes to a desired node not yet used, preferring one in
    /// the same failure domain. So the number of moves is the number of recorded nodes
    /// not in the desired set, the fewest that reach it.
    pub fn rebalance(&self, a: &Assignment) -> Result<Vec<PieceMove>, Error> {
        self.check_len(a)?;
        let desired = self.place(a.segment);
        let mut free: Vec<Option<&NodeId>> = desired
            .iter()
            .map(|d| (!a.pieces.contains(d)).then_some(d))
            .collect();
        let leaving: Vec<usize> = (0..a.pieces.len())
            .filter(|&i| !desired.contains(&a.pieces[i]))
            .collect();
        let mut moves = Vec::with_capacity(leaving.len());
        let mut unpaired = Vec::new();
        for &i in &leaving {
            let dom = self.domain_of(&a.pieces[i]);
            let same = free
                .iter_mut()
                .find(|f| f.is_some_and(|d| dom.is_some() && self.domain_of(d) == dom));
            match same.and_then(Option::take) {
                Some(to) => moves.push(self.move_for(a, i, to)),
                None => unpaired.push(i),
            }
        }
        let mut rest = free.into_iter().flatten();
        for i in unpaired {
            if let Some(to) = rest.next() {
                moves.push(self.move_for(a, i, to));
            }
        }
        moves.sort_by_key(|m| m.piece);
        Ok(moves)
    }

    fn move_for(&self, a: &Assignment, piece: usize, to: &NodeId) -> PieceMove {
        let from = &a.pieces[piece];
        let reason =
            self.lost_reason(from)
                .unwrap_or_else(|| match self.map.node(from).map(|n| n.state) {
                    Some(NodeState::Draining) => MoveReason::Drain,
                    _ => MoveReason::Rebalance,
                });
        PieceMove {
            segment: a.segment,
            piece,
            from: from.clone(),
            to: to.clone(),
            reason,
        }
    }

    /// Recovery over many segments ([`Placer::recover`] for each).
    pub fn recovery_plan<'b>(&self, segments: impl IntoIterator<Item = &'b Assignment>) -> Plan {
        self.plan(segments, Self::recover)
    }

    /// Rebalancing over many segments ([`Placer::rebalance`] for each).
    pub fn rebalance_plan<'b>(&self, segments: impl IntoIterator<Item = &'b Assignment>) -> Plan {
        self.plan(segments, Self::rebalance)
    }

    fn plan<'b>(
        &self,
        segments: impl IntoIterator<Item = &'b Assignment>,
        f: impl Fn(&Self, &Assignment) -> Result<Vec<PieceMove>, Error>,
    ) -> Plan {
        let mut plan = Plan {
            epoch: self.map.epoch(),
            ..Plan::default()
        };
        for a in segments {
            match f(self, a) {
                Ok(m) => plan.moves.extend(m),
                Err(e) => plan.failed.push((a.segment, e)),
            }
        }
        plan
    }
}

/// A drain plan for `node`: for every segment with a piece on it, where that piece goes
/// (the best-ranked domain not holding another piece of the segment, on the map without
/// `node`), changing nothing else. The node keeps serving reads until the copies are done.
pub fn drain_plan<'b>(
    map: &ClusterMap,
    node: &NodeId,
    layout: Layout,
    level: &str,
    segments: impl IntoIterator<Item = &'b Assignment>,
) -> Result<Plan, Error> {
    if map.node(node).is_none() {
        return Err(Error::UnknownNode {
            node: node.as_str().to_owned(),
            epoch: map.epoch(),
        });
    }
    let placer = Placer::build(map, layout, level, Some(node))?;
    Ok(placer.plan(segments, |p, a| {
        p.check_len(a)?;
        let lost: Vec<(usize, MoveReason)> = a
            .pieces
            .iter()
            .enumerate()
            .filter(|(_, n)| *n == node)
            .map(|(i, _)| (i, MoveReason::Drain))
            .collect();
        p.replace(a, &lost)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::Node;

    /// The pruned selection gives exactly the first `n` of the full ranking, on maps with
    /// one-node and many-node domains and very uneven weights.
    #[test]
    fn top_matches_the_full_ranking() {
        let mut map = ClusterMap::new(["rack", "node"]).unwrap();
        let mut x = 7u64;
        for r in 0..40u32 {
            for i in 0..(1 + r % 5) {
                x = hash::mix64(x.wrapping_add(1));
                let w = [1, 2, 3, 10, 100, 1000][usize::try_from(x % 6).unwrap()];
                let id = format!("r{r}n{i}");
                map.add_node(
                    Node::new(&*id, "h:1", "nqn.x", 1, format!("rack{r}/{id}")).with_weight(w),
                )
                .unwrap();
            }
        }
        for (layout, level) in [
            (Layout::ec(4, 2), "rack"),
            (Layout::ec(8, 2), "node"),
            (Layout::single(), "rack"),
            (Layout::mirror(3), "node"),
            (Layout::ec(16, 4), "rack"),
        ] {
            let p = Placer::new(&map, layout, level).unwrap();
            let (mut fast, mut full) = (Vec::new(), Vec::new());
            for s in 0..1500 {
                let seg = SegmentId::new(s % 3, s);
                p.top(seg, &mut fast);
                p.ranking(seg, &mut full);
                full.sort_unstable_by(rank_cmp);
                full.truncate(layout.pieces());
                let a: Vec<(usize, usize)> = fast.iter().map(|r| (r.domain, r.candidate)).collect();
                let b: Vec<(usize, usize)> = full.iter().map(|r| (r.domain, r.candidate)).collect();
                assert_eq!(a, b, "{layout} at {level}, segment {s}");
                for (f, g) in fast.iter().zip(&full) {
                    assert_eq!(f.score.to_bits(), g.score.to_bits());
                }
            }
        }
    }
}
