//! Shared helpers for the placement tests: building maps and measuring placements.
#![allow(dead_code, clippy::unwrap_used, clippy::cast_precision_loss)]

use std::collections::HashMap;

use placement::{ClusterMap, Layout, Node, NodeId, NodeState, Placer, SegmentId};

/// A small deterministic generator (SplitMix64) for test inputs that are not proptest's.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        placement::hash::mix64(self.0)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn range(&mut self, lo: u64, hi_inclusive: u64) -> u64 {
        lo + self.below(hi_inclusive - lo + 1)
    }
}

/// One node of a test map: its domain path (the last component is its id) and weight.
#[derive(Debug, Clone)]
pub struct Spec {
    pub path: String,
    pub weight: u32,
    pub state: NodeState,
}

pub fn node(path: &str, weight: u32, state: NodeState) -> Node {
    let id = path.rsplit('/').next().unwrap_or(path);
    Node::new(
        id,
        format!("10.0.0.1:{}", 4420),
        format!("nqn.2024-01.io.test:{id}"),
        1 << 40,
        path,
    )
    .with_weight(weight)
    .with_state(state)
}

pub fn map_of(levels: &[&str], specs: &[Spec]) -> ClusterMap {
    let mut map = ClusterMap::new(levels.iter().copied()).unwrap();
    for s in specs {
        map.add_node(node(&s.path, s.weight, s.state)).unwrap();
    }
    map
}

/// A rack/node map with `weights[r]` the node weights of rack `r`.
pub fn racks(weights: &[Vec<u32>]) -> ClusterMap {
    let mut specs = Vec::new();
    for (r, rack) in weights.iter().enumerate() {
        for (i, &w) in rack.iter().enumerate() {
            specs.push(Spec {
                path: format!("rack{r}/r{r}n{i}"),
                weight: w,
                state: NodeState::Up,
            });
        }
    }
    map_of(&["rack", "node"], &specs)
}

/// Pieces per node id over `segments` segments of volume 7.
pub fn loads(placer: &Placer<'_>, segments: u64) -> HashMap<NodeId, u64> {
    let mut out: HashMap<NodeId, u64> = HashMap::new();
    for s in 0..segments {
        for n in placer.place(SegmentId::new(7, s)) {
            *out.entry(n).or_default() += 1;
        }
    }
    out
}

/// The weight-proportional share of each eligible node: `segments * n * w / W`.
pub fn proportional_share(map: &ClusterMap, layout: Layout, segments: u64) -> HashMap<NodeId, f64> {
    let total: f64 = map
        .nodes()
        .iter()
        .filter(|n| n.eligible())
        .map(|n| f64::from(n.weight))
        .sum();
    let pieces = f64::from(u32::try_from(layout.pieces()).unwrap());
    let segs = f64::from(u32::try_from(segments).unwrap());
    map.nodes()
        .iter()
        .filter(|n| n.eligible())
        .map(|n| (n.id.clone(), segs * pieces * f64::from(n.weight) / total))
        .collect()
}

/// Largest total weight of a domain at `level` over the total eligible weight.
pub fn max_domain_fraction(map: &ClusterMap, level: &str) -> f64 {
    let li = map.level_index(level).unwrap();
    let mut per: HashMap<&str, f64> = HashMap::new();
    let mut total = 0.0;
    for n in map.nodes().iter().filter(|n| n.eligible()) {
        *per.entry(ClusterMap::domain_at(n, li)).or_default() += f64::from(n.weight);
        total += f64::from(n.weight);
    }
    per.values().fold(0.0, |a: f64, &b| a.max(b)) / total
}

/// Pieces whose node differs between the desired placements on two maps (as sets per
/// segment, which is what a rebalance plan moves).
pub fn moved(a: &Placer<'_>, b: &Placer<'_>, segments: u64) -> u64 {
    let mut n = 0;
    for s in 0..segments {
        let seg = SegmentId::new(7, s);
        let x = a.place(seg);
        let y = b.place(seg);
        n += x.iter().filter(|id| !y.contains(id)).count() as u64;
    }
    n
}
