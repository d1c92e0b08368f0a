//! Recovery, rebalance and drain plans against recorded assignments, and the volume report.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;

use common::racks;
use placement::{
    check_profiles, check_volumes, drain_plan, Assignment, ClusterMap, Error, Layout, MoveReason,
    NodeId, NodeState, Placer, Plan, Protection, SegmentId, VolumeSpec,
};

fn record(map: &ClusterMap, layout: Layout, level: &str, segments: u64) -> Vec<Assignment> {
    let p = Placer::new(map, layout, level).unwrap();
    (0..segments)
        .map(|s| {
            let segment = SegmentId::new(11, s);
            Assignment {
                segment,
                pieces: p.place(segment),
            }
        })
        .collect()
}

fn apply(assignments: &[Assignment], plan: &Plan) -> Vec<Assignment> {
    let mut out = assignments.to_vec();
    for m in &plan.moves {
        let a = out.iter_mut().find(|a| a.segment == m.segment).unwrap();
        assert_eq!(
            a.pieces[m.piece], m.from,
            "move does not start where the piece is"
        );
        a.pieces[m.piece] = m.to.clone();
    }
    out
}

fn assert_distinct_racks(map: &ClusterMap, assignments: &[Assignment]) {
    for a in assignments {
        let racks: HashSet<&str> = a
            .pieces
            .iter()
            .map(|p| ClusterMap::domain_at(map.node(p).unwrap(), 0))
            .collect();
        assert_eq!(racks.len(), a.pieces.len(), "{a:?}");
    }
}

fn eight_racks() -> ClusterMap {
    racks(&(0..8).map(|_| vec![4, 4, 2]).collect::<Vec<_>>())
}

#[test]
fn recovery_moves_only_lost_pieces_and_keeps_indices() {
    let mut map = eight_racks();
    let layout = Layout::ec(4, 2);
    let before = record(&map, layout, "rack", 2000);
    let victim = NodeId::from("r3n1");
    map.set_state(&victim, NodeState::Down).unwrap();
    let placer = Placer::new(&map, layout, "rack").unwrap();
    let plan = placer.recovery_plan(&before);
    assert!(plan.failed.is_empty());
    assert_eq!(plan.epoch, map.epoch());
    let held = before
        .iter()
        .flat_map(|a| &a.pieces)
        .filter(|p| **p == victim)
        .count();
    assert!(held > 100);
    assert_eq!(plan.moves.len(), held);
    for m in &plan.moves {
        assert_eq!(m.from, victim);
        assert_eq!(m.reason, MoveReason::NodeDown);
        assert!(m.reason.needs_rebuild());
        assert_ne!(m.to, victim);
    }
    let after = apply(&before, &plan);
    assert_distinct_racks(&map, &after);
    // Every piece not on the victim is where it was, at the same index.
    for (a, b) in before.iter().zip(&after) {
        for (x, y) in a.pieces.iter().zip(&b.pieces) {
            if *x != victim {
                assert_eq!(x, y);
            }
        }
    }
    // A second recovery on the repaired assignments has nothing to do.
    assert!(placer.recovery_plan(&after).moves.is_empty());
}

#[test]
fn recovery_reasons_for_out_and_removed_nodes() {
    let mut map = eight_racks();
    let layout = Layout::mirror(3);
    let before = record(&map, layout, "rack", 500);
    map.set_state(&"r0n0".into(), NodeState::Out).unwrap();
    map.remove_node(&"r1n0".into()).unwrap();
    let plan = Placer::new(&map, layout, "rack")
        .unwrap()
        .recovery_plan(&before);
    let reasons: HashSet<(String, MoveReason)> = plan
        .moves
        .iter()
        .map(|m| (m.from.to_string(), m.reason))
        .collect();
    assert_eq!(
        reasons,
        HashSet::from([
            ("r0n0".to_owned(), MoveReason::NodeOut),
            ("r1n0".to_owned(), MoveReason::NodeRemoved),
        ])
    );
    // Recorded placements on a node that is out are replaced; the map no longer knowing
    // a node is not an error.
    assert!(plan.failed.is_empty());
}

#[test]
fn rebalance_after_adding_a_node_moves_only_to_it() {
    let mut map = eight_racks();
    let layout = Layout::ec(4, 2);
    let before = record(&map, layout, "rack", 3000);
    map.add_node(common::node("rack8/r8n0", 10, NodeState::Up))
        .unwrap();
    let placer = Placer::new(&map, layout, "rack").unwrap();
    let plan = placer.rebalance_plan(&before);
    assert!(plan.failed.is_empty());
    assert!(!plan.moves.is_empty());
    for m in &plan.moves {
        assert_eq!(m.to.as_str(), "r8n0");
        assert_eq!(m.reason, MoveReason::Rebalance);
        assert!(!m.reason.needs_rebuild());
    }
    let after = apply(&before, &plan);
    assert_distinct_racks(&map, &after);
    // After the plan every segment holds exactly its desired set, and a second plan is empty.
    for a in &after {
        let want: HashSet<_> = placer.place(a.segment).into_iter().collect();
        let have: HashSet<_> = a.pieces.iter().cloned().collect();
        assert_eq!(want, have);
    }
    assert!(placer.rebalance_plan(&after).moves.is_empty());
}

#[test]
fn rebalance_moves_draining_pieces_with_reason_drain() {
    let mut map = eight_racks();
    let layout = Layout::ec(2, 1);
    let before = record(&map, layout, "rack", 1000);
    map.set_state(&"r2n0".into(), NodeState::Draining).unwrap();
    let plan = Placer::new(&map, layout, "rack")
        .unwrap()
        .rebalance_plan(&before);
    let held = before
        .iter()
        .flat_map(|a| &a.pieces)
        .filter(|p| p.as_str() == "r2n0")
        .count();
    assert_eq!(plan.moves.len(), held);
    assert!(plan
        .moves
        .iter()
        .all(|m| m.reason == MoveReason::Drain && m.from.as_str() == "r2n0"));
    // When rack2 stays in a segment's desired set, the piece stays in rack2 (same-domain
    // pairing); when it does not, it goes wherever the desired set says.
    let placer = Placer::new(&map, layout, "rack").unwrap();
    let mut stayed = 0;
    for m in &plan.moves {
        let want = placer.place(m.segment);
        assert!(want.contains(&m.to));
        if want.iter().any(|n| n.as_str().starts_with("r2n")) {
            assert!(
                m.to.as_str().starts_with("r2n"),
                "{m:?} left rack2 although it is desired"
            );
            stayed += 1;
        }
    }
    assert!(stayed > 0);
}

#[test]
fn drain_plan_moves_only_that_node_and_leaves_it_serving() {
    let map = eight_racks();
    let layout = Layout::ec(4, 2);
    let before = record(&map, layout, "rack", 2000);
    let node = NodeId::from("r5n0");
    let plan = drain_plan(&map, &node, layout, "rack", &before).unwrap();
    let held = before
        .iter()
        .flat_map(|a| &a.pieces)
        .filter(|p| **p == node)
        .count();
    assert_eq!(plan.moves.len(), held);
    for m in &plan.moves {
        assert_eq!(m.from, node);
        assert_ne!(m.to, node);
        assert_eq!(m.reason, MoveReason::Drain);
    }
    let after = apply(&before, &plan);
    assert_distinct_racks(&map, &after);
    assert!(after.iter().all(|a| !a.pieces.contains(&node)));
    let e = drain_plan(&map, &"nope".into(), layout, "rack", &before).unwrap_err();
    assert!(matches!(e, Error::UnknownNode { .. }), "{e:?}");
}

#[test]
fn unrecoverable_segments_are_reported_not_panicked() {
    // ec:2+1 on exactly three racks: losing a whole rack leaves nowhere to rebuild.
    let mut map = racks(&[vec![1], vec![1], vec![1]]);
    let layout = Layout::ec(2, 1);
    let before = record(&map, layout, "rack", 50);
    map.set_state(&"r0n0".into(), NodeState::Down).unwrap();
    let placer = Placer::new(&map, layout, "rack");
    let e = placer.unwrap_err();
    assert!(
        e.to_string().starts_with(
            "ec:2+1 needs 3 failure domains at level rack; the cluster has 2 (rack1, rack2)."
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("no up node with a non-zero weight: rack0"),
        "{e}"
    );
    // With a fourth rack that has room, the same segments recover.
    map.add_node(common::node("rack3/r3n0", 1, NodeState::Up))
        .unwrap();
    let plan = Placer::new(&map, layout, "rack")
        .unwrap()
        .recovery_plan(&before);
    assert!(plan.failed.is_empty());
    assert!(plan.moves.iter().all(|m| m.to.as_str() == "r3n0"));
}

#[test]
fn assignment_with_wrong_piece_count_is_an_error() {
    let map = eight_racks();
    let placer = Placer::new(&map, Layout::ec(4, 2), "rack").unwrap();
    let a = Assignment {
        segment: SegmentId::new(1, 2),
        pieces: vec!["r0n0".into(); 3],
    };
    let e = placer.recover(&a).unwrap_err();
    assert_eq!(
        e.to_string(),
        "segment 1/2 has 3 recorded pieces but its layout ec:4+2 has 6. Plan it with the layout the segment was written with."
    );
    assert!(placer.rebalance(&a).is_err());
    let e = Placer::new(&map, Layout::ec(4, 2), "row").unwrap_err();
    assert_eq!(
        e.to_string(),
        "there is no failure-domain level \"row\" in the cluster map (its levels are rack, node). Place at one of those levels, or give the nodes' domain paths that level."
    );
}

#[test]
fn volume_report_names_the_volumes_the_map_fails() {
    let mut map = eight_racks();
    let mut profiles = placement::builtin_profiles();
    for p in &mut profiles {
        p.failure_domain = "rack".into();
    }
    let wide = {
        let mut p = profiles[0].clone();
        p.name = "wide".into();
        p.protection = Protection::Ec { data: 4, parity: 2 };
        p
    };
    let vols = [
        VolumeSpec {
            volume: 1,
            profile: &profiles[0],
            layout: Some(Layout::ec(4, 1)),
        },
        VolumeSpec {
            volume: 2,
            profile: &wide,
            layout: None,
        },
        VolumeSpec {
            volume: 3,
            profile: &profiles[1],
            layout: None,
        },
    ];
    assert!(check_volumes(&map, &vols).iter().all(|c| c.result.is_ok()));
    // Three racks go down: 5 left. ec:4+2 fails, the recorded 4+1 still fits, mirror fits.
    for r in 0..3 {
        for i in 0..3 {
            map.set_state(&format!("r{r}n{i}").as_str().into(), NodeState::Down)
                .unwrap();
        }
    }
    let report = check_volumes(&map, &vols);
    assert_eq!(report[0].result, Ok(Layout::ec(4, 1)));
    let e = report[1].result.clone().unwrap_err();
    assert_eq!(report[1].profile, "wide");
    assert!(e.to_string().starts_with("ec:4+2 needs 6 failure domains at level rack; the cluster has 5 (rack3, rack4, rack5, rack6, rack7)."), "{e}");
    assert!(report[2].result.is_ok());
    // A new volume with `default` now gets 2+1, and `durable` (ec:auto:2) is refused.
    let by_name: Vec<_> = check_profiles(&map, &profiles);
    let get = |n: &str| by_name.iter().find(|(m, _)| m == n).unwrap().1.clone();
    assert_eq!(get("default").unwrap().layout, Layout::ec(2, 1));
    assert!(get("durable")
        .unwrap_err()
        .to_string()
        .contains("ec:auto:2 needs 6"));
}

#[test]
fn placer_for_profile_resolves_adaptive_ec_and_place_indices_agree() {
    let map = eight_racks();
    let mut profile = placement::builtin_profiles().remove(0);
    profile.failure_domain = "rack".into();
    let (placer, resolved) = Placer::for_profile(&map, &profile).unwrap();
    assert_eq!(resolved.layout, Layout::ec(4, 1));
    assert_eq!(placer.layout(), Layout::ec(4, 1));
    assert_eq!(placer.domain_names().count(), 8);
    let mut idx = Vec::new();
    for s in 0..200 {
        let seg = SegmentId::new(4, s);
        placer.place_indices(seg, &mut idx);
        let by_index: Vec<NodeId> = idx.iter().map(|&i| map.nodes()[i].id.clone()).collect();
        assert_eq!(by_index, placer.place(seg));
    }
    profile.failure_domain = "row".into();
    let e = Placer::for_profile(&map, &profile).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("profile \"default\" puts pieces in distinct \"row\""),
        "{e}"
    );
    let vols = [VolumeSpec {
        volume: 9,
        profile: &profile,
        layout: Some(Layout::ec(4, 1)),
    }];
    let r = check_volumes(&map, &vols);
    assert_eq!(r[0].result, Err(e));
}
