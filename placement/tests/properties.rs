//! Property tests on random cluster maps: distinct failure domains, balance against the
//! weight-proportional share, movement on node add/remove/weight change against the
//! theoretical minimum, and recovery. Seeded, so CI runs the same cases every time.
//!
//! The tolerances and their conditions are the ones documented in docs/placement.md:
//! with `f` the largest domain's share of the eligible weight and `n` pieces per segment,
//! `n f <= 0.5` keeps every node within 12% of its weight-proportional share, and
//! `n f <= 0.75` within 25% (plus 4 standard deviations of sampling noise,
//! `4 sqrt(share)`); adding or removing a node moves only pieces to or from that node, and
//! at most 1.25x the minimum.
#![allow(clippy::unwrap_used, clippy::cast_precision_loss)]

mod common;

use std::collections::{HashMap, HashSet};

use common::{loads, map_of, max_domain_fraction, moved, node, proportional_share, Spec};
use placement::{Assignment, ClusterMap, Layout, NodeState, Placer, SegmentId};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, RngSeed};

const LAYOUTS: [Layout; 7] = [
    Layout::single(),
    Layout::mirror(2),
    Layout::mirror(3),
    Layout::ec(2, 1),
    Layout::ec(4, 1),
    Layout::ec(4, 2),
    Layout::ec(8, 2),
];

/// Segments per statistical measurement.
const SEGMENTS: u64 = 10_000;

fn config(cases: u32, seed: u64) -> Config {
    Config {
        cases,
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_iters: 64,
        ..Config::default()
    }
}

fn state_of(code: u8) -> NodeState {
    match code {
        0..=6 => NodeState::Up,
        7 => NodeState::Down,
        8 => NodeState::Out,
        _ => NodeState::Draining,
    }
}

/// A dc/rack/node tree: per dc, per rack, per node (weight 0..=10, state code).
fn tree() -> impl Strategy<Value = Vec<Vec<Vec<(u32, u8)>>>> {
    let node = (0u32..=10, 0u8..=9);
    let rack = prop::collection::vec(node, 1..=4);
    let dc = prop::collection::vec(rack, 1..=4);
    prop::collection::vec(dc, 1..=3)
}

fn tree_map(t: &[Vec<Vec<(u32, u8)>>]) -> ClusterMap {
    let mut specs = Vec::new();
    for (d, dc) in t.iter().enumerate() {
        for (r, rack) in dc.iter().enumerate() {
            for (i, &(w, s)) in rack.iter().enumerate() {
                specs.push(Spec {
                    path: format!("dc{d}/rack{d}.{r}/n{d}.{r}.{i}"),
                    weight: w,
                    state: state_of(s),
                });
            }
        }
    }
    map_of(&["dc", "rack", "node"], &specs)
}

/// A rack/node map whose racks are at least `min_racks` (weights 1..=10).
fn rack_weights(min_racks: usize) -> impl Strategy<Value = Vec<Vec<u32>>> {
    prop::collection::vec(prop::collection::vec(1u32..=10, 1..=4), min_racks..=20)
}

fn domain_of(map: &ClusterMap, id: &placement::NodeId, level: usize) -> String {
    ClusterMap::domain_at(map.node(id).unwrap(), level).to_owned()
}

/// Checks the distinct-domain rule and eligibility for one placement.
fn check_distinct(map: &ClusterMap, level: usize, pieces: &[placement::NodeId], n: usize) {
    assert_eq!(pieces.len(), n);
    let domains: HashSet<String> = pieces.iter().map(|p| domain_of(map, p, level)).collect();
    assert_eq!(domains.len(), n, "pieces share a domain: {pieces:?}");
    for p in pieces {
        assert!(map.node(p).unwrap().eligible(), "{p} is not eligible");
    }
}

proptest! {
    #![proptest_config(config(64, 0x5eed_0001))]

    /// On any map, at any level: pieces always land in distinct failure domains on
    /// eligible nodes, and the placer refuses exactly when there are too few domains.
    /// Recovery after a node failure keeps that true and moves only the lost pieces.
    #[test]
    fn pieces_in_distinct_domains(t in tree(), li in 0usize..3, lay in 0usize..7, victim in any::<prop::sample::Index>()) {
        let map = tree_map(&t);
        let layout = LAYOUTS[lay];
        let level = ["dc", "rack", "node"][li];
        let usable = map.domains(li).0.len();
        let placer = match Placer::new(&map, layout, level) {
            Ok(p) => p,
            Err(e) => {
                prop_assert!(usable < layout.pieces(), "refused with {usable} domains: {e}");
                prop_assert!(matches!(e, placement::Error::NotEnoughDomains(_)));
                return Ok(());
            }
        };
        prop_assert!(usable >= layout.pieces());
        let assignments: Vec<Assignment> = (0..200)
            .map(|s| {
                let seg = SegmentId::new(3, s);
                let pieces = placer.place(seg);
                check_distinct(&map, li, &pieces, layout.pieces());
                Assignment { segment: seg, pieces }
            })
            .collect();
        // Fail one eligible node and recover.
        let eligible: Vec<_> = map.nodes().iter().filter(|n| n.eligible()).collect();
        let v = eligible[victim.index(eligible.len())].id.clone();
        let mut after = map.clone();
        after.set_state(&v, NodeState::Down).unwrap();
        let Ok(p2) = Placer::new(&after, layout, level) else { return Ok(()) };
        for a in &assignments {
            let moves = p2.recover(a);
            let held = a.pieces.iter().filter(|p| **p == v).count();
            match moves {
                Ok(moves) => {
                    prop_assert_eq!(moves.len(), held);
                    let mut pieces = a.pieces.clone();
                    for m in &moves {
                        prop_assert_eq!(&pieces[m.piece], &v);
                        pieces[m.piece] = m.to.clone();
                    }
                    check_distinct(&after, li, &pieces, layout.pieces());
                }
                Err(e) => prop_assert!(matches!(e, placement::Error::NotEnoughDomains(_))),
            }
        }
    }
}

/// Per-node load within `tol * share + 4 sqrt(share)` of the weight-proportional share.
fn check_balance(map: &ClusterMap, layout: Layout, tol: f64) -> Result<(), TestCaseError> {
    let placer = Placer::new(map, layout, "rack").unwrap();
    let got = loads(&placer, SEGMENTS);
    for (id, share) in proportional_share(map, layout, SEGMENTS) {
        let load = *got.get(&id).unwrap_or(&0) as f64;
        let allowed = tol * share + 4.0 * share.sqrt();
        prop_assert!(
            (load - share).abs() <= allowed,
            "{id}: load {load} vs share {share:.1} (allowed ±{allowed:.1}) for {layout}"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(12, 0x5eed_0002))]

    /// Balance: every node within the documented tolerance of its weight-proportional
    /// share when no rack is too large a part of the weight (10,000 segments).
    #[test]
    fn load_follows_weight(lay in 1usize..7, w in rack_weights(2)) {
        let layout = LAYOUTS[lay];
        prop_assume!(w.len() >= layout.pieces());
        let map = common::racks(&w);
        let nf = layout.pieces() as f64 * max_domain_fraction(&map, "rack");
        prop_assume!(nf <= 0.75);
        check_balance(&map, layout, if nf <= 0.5 { 0.12 } else { 0.25 })?;
    }

    /// Adding a node moves pieces only onto it, and no more than 1.25x its
    /// weight-proportional share (the minimum any balanced placement must move).
    #[test]
    fn adding_a_node_moves_near_the_minimum(lay in 1usize..7, w in rack_weights(2), rack in any::<prop::sample::Index>(), weight in 1u32..=10) {
        let layout = LAYOUTS[lay];
        prop_assume!(w.len() >= layout.pieces());
        let before = common::racks(&w);
        let mut after = before.clone();
        let r = rack.index(w.len() + 1); // == w.len(): a new rack
        after.add_node(node(&format!("rack{r}/added"), weight, NodeState::Up)).unwrap();
        let nf = layout.pieces() as f64 * max_domain_fraction(&after, "rack");
        prop_assume!(nf <= 0.75);
        let (a, b) = (Placer::new(&before, layout, "rack").unwrap(), Placer::new(&after, layout, "rack").unwrap());
        let mut received = 0u64;
        for s in 0..SEGMENTS {
            let seg = SegmentId::new(7, s);
            let (x, y) = (a.place(seg), b.place(seg));
            let gone: Vec<_> = x.iter().filter(|id| !y.contains(id)).collect();
            let new: Vec<_> = y.iter().filter(|id| !x.contains(id)).collect();
            prop_assert!(gone.len() <= 1 && new.len() == gone.len());
            if let Some(n) = new.first() {
                prop_assert_eq!(n.as_str(), "added");
            }
            received += u64::try_from(gone.len()).unwrap();
        }
        let minimum = proportional_share(&after, layout, SEGMENTS)[&"added".into()];
        prop_assert!(received as f64 <= 1.25 * minimum + 4.0 * minimum.sqrt(),
            "moved {received}, minimum {minimum:.1} ({:.3}x) for {layout}", received as f64 / minimum);
    }

    /// Removing (or failing) a node moves exactly the pieces it held, each to one new node.
    #[test]
    fn removing_a_node_moves_exactly_its_pieces(lay in 1usize..7, w in rack_weights(3), victim in any::<prop::sample::Index>(), how in 0u8..3) {
        let layout = LAYOUTS[lay];
        let before = common::racks(&w);
        let id = before.nodes()[victim.index(before.nodes().len())].id.clone();
        let mut after = before.clone();
        match how {
            0 => { after.remove_node(&id).unwrap(); }
            1 => after.set_state(&id, NodeState::Out).unwrap(),
            _ => after.set_weight(&id, 0).unwrap(),
        }
        let a = Placer::new(&before, layout, "rack");
        let b = Placer::new(&after, layout, "rack");
        let (Ok(a), Ok(b)) = (a, b) else { return Ok(()) };
        let held = loads(&a, SEGMENTS).get(&id).copied().unwrap_or(0);
        prop_assert_eq!(moved(&a, &b, SEGMENTS), held);
    }

    /// A weight change moves pieces only to (increase) or from (decrease) that node.
    #[test]
    fn weight_change_moves_only_that_nodes_pieces(lay in 1usize..7, w in rack_weights(3), who in any::<prop::sample::Index>(), new_weight in 1u32..=20) {
        let layout = LAYOUTS[lay];
        let before = common::racks(&w);
        prop_assume!(w.len() >= layout.pieces());
        let id = before.nodes()[who.index(before.nodes().len())].id.clone();
        let old_weight = before.node(&id).unwrap().weight;
        let mut after = before.clone();
        after.set_weight(&id, new_weight).unwrap();
        let (a, b) = (Placer::new(&before, layout, "rack").unwrap(), Placer::new(&after, layout, "rack").unwrap());
        for s in 0..2_000 {
            let seg = SegmentId::new(9, s);
            let (x, y) = (a.place(seg), b.place(seg));
            for gone in x.iter().filter(|n| !y.contains(n)) {
                if new_weight > old_weight {
                    prop_assert!(y.contains(&id), "{gone} left but {id} did not arrive");
                } else {
                    prop_assert_eq!(gone, &id);
                }
            }
        }
    }
}

/// The capped case: a rack holding more than 1/n of the weight cannot get its
/// proportional share (it may hold one piece per segment). It gets nearly one piece per
/// segment, never two, and the other racks share the rest in proportion to their weights.
#[test]
fn capped_domain_gets_one_piece_per_segment_and_the_rest_is_shared() {
    let map = common::racks(&[vec![10, 10, 10], vec![2], vec![4], vec![6], vec![8]]);
    let layout = Layout::mirror(3);
    assert!(
        3.0 * max_domain_fraction(&map, "rack") > 1.0,
        "the heavy rack is over 1/n"
    );
    let placer = Placer::new(&map, layout, "rack").unwrap();
    let mut per_rack: HashMap<String, u64> = HashMap::new();
    for s in 0..SEGMENTS {
        let pieces = placer.place(SegmentId::new(7, s));
        check_distinct(&map, 0, &pieces, 3);
        for p in &pieces {
            *per_rack.entry(domain_of(&map, p, 0)).or_default() += 1;
        }
    }
    let heavy = per_rack["rack0"];
    assert!(heavy <= SEGMENTS, "at most one piece per segment");
    assert!(
        heavy >= SEGMENTS * 95 / 100,
        "heavy rack in {heavy} of {SEGMENTS} segments"
    );
    let rest = (3 * SEGMENTS - heavy) as f64;
    for (rack, w) in [
        ("rack1", 2.0),
        ("rack2", 4.0),
        ("rack3", 6.0),
        ("rack4", 8.0),
    ] {
        let share = rest * w / 20.0;
        let got = per_rack[rack] as f64;
        assert!(
            (got - share).abs() <= 0.30 * share,
            "{rack}: {got} vs {share:.0} of the remainder"
        );
    }
    // Within the heavy rack, its three equal nodes split its pieces evenly.
    let got = loads(&placer, SEGMENTS);
    for n in ["r0n0", "r0n1", "r0n2"] {
        let l = got[&n.into()] as f64;
        let share = heavy as f64 / 3.0;
        assert!((l - share).abs() <= 0.06 * share, "{n}: {l} vs {share:.0}");
    }
}
