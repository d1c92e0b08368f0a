//! The cluster map: every validation error, the epoch, serialization, and the documented
//! example in docs/placement.md.
#![allow(clippy::unwrap_used)]

use placement::{ClusterMap, Error, Node, NodeId, NodeState};

fn node(id: &str, path: &str) -> Node {
    Node::new(
        id,
        "10.0.0.5:4420",
        format!("nqn.2024-01.io.test:{id}"),
        4 << 40,
        path,
    )
}

fn base() -> ClusterMap {
    let mut m = ClusterMap::new(["dc", "rack", "node"]).unwrap();
    m.add_node(node("n1", "dc1/rack1/n1")).unwrap();
    m.add_node(node("n2", "dc1/rack2/n2")).unwrap();
    m
}

fn invalid(e: Error, problem: &str, fix: &str) {
    match &e {
        Error::InvalidMap { problem: p, fix: f } => {
            assert!(p.contains(problem), "problem {p:?} lacks {problem:?}");
            assert!(f.contains(fix), "fix {f:?} lacks {fix:?}");
        }
        other => panic!("expected InvalidMap, got {other:?}"),
    }
    assert!(e.to_string().ends_with('.'), "{e}");
}

#[test]
fn levels_must_be_present_distinct_and_plain() {
    invalid(
        ClusterMap::new(Vec::<String>::new()).unwrap_err(),
        "no failure-domain levels",
        "[\"rack\", \"node\"]",
    );
    invalid(
        ClusterMap::new(["rack", "rack"]).unwrap_err(),
        "appears more than once",
        "distinct",
    );
    invalid(
        ClusterMap::new(["r/k", "node"]).unwrap_err(),
        "contains '/'",
        "plain words",
    );
    invalid(
        ClusterMap::new(["", "node"]).unwrap_err(),
        "is empty",
        "plain words",
    );
}

#[test]
fn node_errors() {
    let mut m = base();
    invalid(
        m.add_node(node("n1", "dc1/rack3/n1")).unwrap_err(),
        "already in the map",
        "another id",
    );
    invalid(
        m.add_node(node("n 3", "dc1/rack3/n3")).unwrap_err(),
        "whitespace",
        "node5",
    );
    invalid(
        m.add_node(node("n3", "dc1/n3")).unwrap_err(),
        "one non-empty component for each level (dc/rack/node)",
        "\"dc1/rack1/node1\"",
    );
    invalid(
        m.add_node(node("n3", "dc1//n3")).unwrap_err(),
        "does not have one",
        "3 components",
    );
    invalid(
        m.add_node(node("n3", "dc1/rack1/n1")).unwrap_err(),
        "same domain path",
        "unique",
    );
    let mut bad = node("n3", "dc1/rack3/n3");
    bad.address = "10.0.0.5".into();
    invalid(m.add_node(bad.clone()).unwrap_err(), "no port", "host:port");
    bad.address = "10.0.0.5:0".into();
    invalid(
        m.add_node(bad.clone()).unwrap_err(),
        "port is not a number from 1 to 65535",
        "host:port",
    );
    bad.address = ":4420".into();
    invalid(
        m.add_node(bad.clone()).unwrap_err(),
        "host is empty",
        "host:port",
    );
    bad.address = "[fd00::5]:4420".into();
    bad.nqn = "iqn.2024-01.x".into();
    invalid(
        m.add_node(bad.clone()).unwrap_err(),
        "does not start with \"nqn.\"",
        "NQN the node's target exports",
    );
    bad.nqn = format!("nqn.{}", "x".repeat(230));
    invalid(
        m.add_node(bad.clone()).unwrap_err(),
        "longer than 223 bytes",
        "nqn.",
    );
    bad.nqn = "nqn.2024-01.io.test:n3".into();
    bad.free_bytes = bad.capacity_bytes + 1;
    invalid(
        m.add_node(bad.clone()).unwrap_err(),
        "bytes free but a capacity",
        "no larger than the capacity",
    );
    bad.free_bytes = 0;
    m.add_node(bad).unwrap();
    invalid(
        m.set_free(&"n3".into(), u64::MAX).unwrap_err(),
        "capacity is",
        "no larger",
    );
}

#[test]
fn unknown_node_is_named_with_the_epoch() {
    let mut m = base();
    let e = m.set_state(&"ghost".into(), NodeState::Down).unwrap_err();
    assert_eq!(
        e.to_string(),
        "node \"ghost\" is not in the cluster map (epoch 2). Check the id with the node list, or add the node first."
    );
    assert!(m.set_weight(&"ghost".into(), 1).is_err());
    assert!(m.remove_node(&"ghost".into()).is_err());
    assert!(m.set_free(&"ghost".into(), 1).is_err());
}

#[test]
fn epoch_increases_on_every_change_and_only_then() {
    let mut m = ClusterMap::new(["rack", "node"]).unwrap();
    assert_eq!(m.epoch(), 0);
    m.add_node(node("a", "r1/a")).unwrap();
    assert_eq!(m.epoch(), 1);
    let id = NodeId::from("a");
    m.set_state(&id, NodeState::Draining).unwrap();
    m.set_weight(&id, 7).unwrap();
    m.set_free(&id, 5).unwrap();
    assert_eq!(m.epoch(), 4);
    // No-op changes do not bump it; failed changes neither.
    m.set_state(&id, NodeState::Draining).unwrap();
    m.set_weight(&id, 7).unwrap();
    assert!(m.add_node(node("a", "r2/a")).is_err());
    assert_eq!(m.epoch(), 4);
    m.remove_node(&id).unwrap();
    assert_eq!(m.epoch(), 5);
}

#[test]
fn default_weight_follows_capacity() {
    assert_eq!(node("x", "a/b/x").weight, 4096);
    assert_eq!(placement::default_weight(0), 1);
    assert_eq!(placement::default_weight(u64::MAX), u32::MAX);
}

#[test]
fn serialization_round_trips_and_checks() {
    let mut m = base();
    m.set_state(&"n2".into(), NodeState::Draining).unwrap();
    assert_eq!(ClusterMap::from_json(&m.to_json()).unwrap(), m);
    assert_eq!(ClusterMap::from_toml(&m.to_toml()).unwrap(), m);
    assert!(m.to_json().contains("\"schema_version\": 1"));
    assert!(m.to_json().contains("\"state\": \"draining\""));
    // Through serde directly (the engine embeds the map in its own records).
    let v: ClusterMap = serde_json::from_str(&m.to_json()).unwrap();
    assert_eq!(v, m);

    let wrong = m
        .to_json()
        .replace("\"schema_version\": 1", "\"schema_version\": 9");
    let e = ClusterMap::from_json(&wrong).unwrap_err();
    assert!(
        matches!(&e, Error::SchemaVersion { found, .. } if found == "9"),
        "{e:?}"
    );
    let dup = m.to_json().replace("\"n2\"", "\"n1\"");
    invalid(
        ClusterMap::from_json(&dup).unwrap_err(),
        "more than once",
        "unique id",
    );
    let unknown = m
        .to_json()
        .replacen("\"epoch\"", "\"colour\": 1, \"epoch\"", 1);
    let e = ClusterMap::from_json(&unknown).unwrap_err();
    assert!(
        matches!(e, Error::Syntax { .. }) && e.to_string().contains("colour"),
        "{e}"
    );
    let e = ClusterMap::from_toml("schema_version = 1\nepoch = \"x\"\n").unwrap_err();
    assert!(e.to_string().contains("line 2"), "{e}");
    let bad_state = m.to_json().replace("\"draining\"", "\"sleepy\"");
    assert!(ClusterMap::from_json(&bad_state)
        .unwrap_err()
        .to_string()
        .contains("sleepy"));
}

#[test]
fn documented_map_example_parses() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/placement.md"))
        .unwrap();
    let block = doc
        .split("```json\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let m = ClusterMap::from_json(block).unwrap();
    assert_eq!(m.levels(), ["dc", "rack", "node"]);
    assert!(m.nodes().len() >= 3);
}
