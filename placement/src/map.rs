//! The cluster map: the storage nodes, where they sit in the failure-domain tree, how much
//! data each should hold, and whether each can take new pieces.
//!
//! The engine persists the map and every placement is a function of it, so it is a plain
//! value with an epoch that goes up by one on every change: two engines that hold the same
//! epoch compute the same placements, and a recorded placement can say which map it came
//! from. Nodes are kept sorted by id so that the serialized form, and everything computed
//! from it, does not depend on the order in which nodes were added.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The cluster-map schema version this build reads and writes.
pub const MAP_SCHEMA_VERSION: u32 = 1;

/// Longest NQN the NVMe base specification allows, in bytes.
const MAX_NQN_BYTES: usize = 223;

/// A storage node's id, unique in the map (e.g. `node5`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(String);

impl NodeId {
    /// Wraps a node id.
    #[must_use]
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeId {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// Whether a node serves data and takes new pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Serving and taking new pieces.
    Up,
    /// Not reachable; its pieces are lost until it comes back, so they are rebuilt elsewhere.
    Down,
    /// Taken out of the cluster by the operator; its pieces are rebuilt elsewhere.
    Out,
    /// Still serving its pieces while they are copied away; takes no new pieces.
    Draining,
}

impl NodeState {
    /// Whether the node still holds readable pieces (up or draining).
    #[must_use]
    pub fn holds_data(self) -> bool {
        matches!(self, Self::Up | Self::Draining)
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Out => "out",
            Self::Draining => "draining",
        })
    }
}

/// One storage node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Unique id.
    pub id: NodeId,
    /// NVMe/TCP address of its target, `host:port`.
    pub address: String,
    /// NQN of the subsystem that exports its namespace.
    pub nqn: String,
    /// Usable capacity in bytes.
    pub capacity_bytes: u64,
    /// Free space in bytes (informational: placement uses the weight).
    pub free_bytes: u64,
    /// Relative share of pieces this node should hold; 0 takes no new pieces.
    pub weight: u32,
    /// Path in the failure-domain tree, one component per map level, the last one the
    /// node itself (e.g. `dc1/rack2/node5`).
    pub domain: String,
    /// Up, down, out or draining.
    pub state: NodeState,
}

impl Node {
    /// A node in state `up` with free space equal to capacity and the default weight: its
    /// capacity in whole GiB (at least 1), so that pieces follow capacity.
    #[must_use]
    pub fn new(
        id: impl Into<String>,
        address: impl Into<String>,
        nqn: impl Into<String>,
        capacity_bytes: u64,
        domain: impl Into<String>,
    ) -> Self {
        Self {
            id: NodeId::new(id),
            address: address.into(),
            nqn: nqn.into(),
            capacity_bytes,
            free_bytes: capacity_bytes,
            weight: default_weight(capacity_bytes),
            domain: domain.into(),
            state: NodeState::Up,
        }
    }

    /// The same node with another weight.
    #[must_use]
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The same node in another state.
    #[must_use]
    pub fn with_state(mut self, state: NodeState) -> Self {
        self.state = state;
        self
    }

    /// Whether new pieces may go to this node: up, with a non-zero weight.
    #[must_use]
    pub fn eligible(&self) -> bool {
        self.state == NodeState::Up && self.weight > 0
    }
}

/// The default weight for a capacity: whole GiB, at least 1, at most `u32::MAX`.
#[must_use]
pub fn default_weight(capacity_bytes: u64) -> u32 {
    u32::try_from(capacity_bytes >> 30)
        .unwrap_or(u32::MAX)
        .max(1)
}

/// The serialized form, checked by [`ClusterMap::from_doc`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapDoc {
    schema_version: Option<u32>,
    epoch: u64,
    levels: Vec<String>,
    #[serde(default)]
    nodes: Vec<Node>,
}

/// The cluster map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "MapDoc", into = "MapDoc")]
pub struct ClusterMap {
    epoch: u64,
    levels: Vec<String>,
    /// Sorted by id, ids unique.
    nodes: Vec<Node>,
}

impl TryFrom<MapDoc> for ClusterMap {
    type Error = Error;
    fn try_from(doc: MapDoc) -> Result<Self, Error> {
        Self::from_doc(doc)
    }
}

impl From<ClusterMap> for MapDoc {
    fn from(m: ClusterMap) -> Self {
        Self {
            schema_version: Some(MAP_SCHEMA_VERSION),
            epoch: m.epoch,
            levels: m.levels,
            nodes: m.nodes,
        }
    }
}

fn invalid(problem: String, fix: impl Into<String>) -> Error {
    Error::InvalidMap {
        problem,
        fix: fix.into(),
    }
}

impl ClusterMap {
    /// An empty map at epoch 0 with the given failure-domain levels, outermost first (e.g.
    /// `["dc", "rack", "node"]`). The last level is the node itself.
    pub fn new<S: Into<String>>(levels: impl IntoIterator<Item = S>) -> Result<Self, Error> {
        let levels: Vec<String> = levels.into_iter().map(Into::into).collect();
        check_levels(&levels)?;
        Ok(Self {
            epoch: 0,
            levels,
            nodes: Vec::new(),
        })
    }

    fn from_doc(doc: MapDoc) -> Result<Self, Error> {
        match doc.schema_version {
            Some(MAP_SCHEMA_VERSION) => {}
            other => {
                return Err(Error::SchemaVersion {
                    what: "cluster map",
                    found: other.map_or_else(|| "none".to_owned(), |v| v.to_string()),
                    supported: MAP_SCHEMA_VERSION,
                    fix: format!(
                        "Write \"schema_version\": {MAP_SCHEMA_VERSION} in the map, or read it with the version of dpud that wrote it."
                    ),
                })
            }
        }
        check_levels(&doc.levels)?;
        let mut map = Self {
            epoch: doc.epoch,
            levels: doc.levels,
            nodes: Vec::with_capacity(doc.nodes.len()),
        };
        for node in doc.nodes {
            map.check_node(&node)?;
            match map.nodes.binary_search_by(|n| n.id.cmp(&node.id)) {
                Ok(_) => {
                    return Err(invalid(
                        format!("node id {:?} appears more than once", node.id.as_str()),
                        "Give every node a unique id.",
                    ))
                }
                Err(at) => map.nodes.insert(at, node),
            }
        }
        Ok(map)
    }

    /// Parses a map from JSON and checks it.
    pub fn from_json(text: &str) -> Result<Self, Error> {
        let doc: MapDoc = serde_json::from_str(text).map_err(|e| Error::Syntax {
            what: "cluster map",
            format: "JSON",
            detail: e.to_string(),
            fix: "Correct the field named there; the schema is in docs/placement.md.".into(),
        })?;
        Self::from_doc(doc)
    }

    /// Parses a map from TOML and checks it.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let doc: MapDoc = toml::from_str(text).map_err(|e| Error::Syntax {
            what: "cluster map",
            format: "TOML",
            detail: e.message().to_owned() + &span_note(text, e.span()),
            fix: "Correct the field named there; the schema is in docs/placement.md.".into(),
        })?;
        Self::from_doc(doc)
    }

    /// The map as pretty JSON.
    #[must_use]
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&MapDoc::from(self.clone())).unwrap_or_default()
    }

    /// The map as TOML.
    #[must_use]
    pub fn to_toml(&self) -> String {
        toml::to_string(&MapDoc::from(self.clone())).unwrap_or_default()
    }

    /// The epoch: it goes up by one on every change.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The failure-domain levels, outermost first.
    #[must_use]
    pub fn levels(&self) -> &[String] {
        &self.levels
    }

    /// The position of a level, if the map has it.
    #[must_use]
    pub fn level_index(&self, level: &str) -> Option<usize> {
        self.levels.iter().position(|l| l == level)
    }

    /// The nodes, sorted by id.
    #[must_use]
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// A node by id.
    #[must_use]
    pub fn node(&self, id: &NodeId) -> Option<&Node> {
        self.index_of(id).map(|i| &self.nodes[i])
    }

    pub(crate) fn index_of(&self, id: &NodeId) -> Option<usize> {
        self.nodes.binary_search_by(|n| n.id.cmp(id)).ok()
    }

    /// The failure domain of `node` at level index `level`: its domain path up to and
    /// including that level (`dc1/rack2` for level `rack` of `dc1/rack2/node5`).
    #[must_use]
    pub fn domain_at(node: &Node, level: usize) -> &str {
        let mut end = 0;
        for (i, part) in node.domain.split('/').enumerate() {
            end += part.len();
            if i == level {
                return &node.domain[..end];
            }
            end += 1;
        }
        &node.domain
    }

    /// The domains at a level: those with at least one eligible node, and the others.
    #[must_use]
    pub fn domains(&self, level: usize) -> (Vec<String>, Vec<String>) {
        let mut usable = BTreeSet::new();
        let mut all = BTreeSet::new();
        for n in &self.nodes {
            let d = Self::domain_at(n, level);
            all.insert(d);
            if n.eligible() {
                usable.insert(d);
            }
        }
        let unusable = all.difference(&usable).map(|s| (*s).to_owned()).collect();
        (usable.into_iter().map(str::to_owned).collect(), unusable)
    }

    /// Adds a node.
    pub fn add_node(&mut self, node: Node) -> Result<(), Error> {
        self.check_node(&node)?;
        match self.nodes.binary_search_by(|n| n.id.cmp(&node.id)) {
            Ok(_) => Err(invalid(
                format!("node id {:?} is already in the map", node.id.as_str()),
                "Use another id, or change the existing node instead of adding it again.",
            )),
            Err(at) => {
                self.nodes.insert(at, node);
                self.epoch += 1;
                Ok(())
            }
        }
    }

    /// Removes a node and returns it. Plan its pieces away first (mark it `out` and run a
    /// recovery plan, or drain it): a removed node's pieces count as lost.
    pub fn remove_node(&mut self, id: &NodeId) -> Result<Node, Error> {
        let i = self.index_or_err(id)?;
        self.epoch += 1;
        Ok(self.nodes.remove(i))
    }

    /// Sets a node's state.
    pub fn set_state(&mut self, id: &NodeId, state: NodeState) -> Result<(), Error> {
        let i = self.index_or_err(id)?;
        if self.nodes[i].state != state {
            self.nodes[i].state = state;
            self.epoch += 1;
        }
        Ok(())
    }

    /// Sets a node's weight.
    pub fn set_weight(&mut self, id: &NodeId, weight: u32) -> Result<(), Error> {
        let i = self.index_or_err(id)?;
        if self.nodes[i].weight != weight {
            self.nodes[i].weight = weight;
            self.epoch += 1;
        }
        Ok(())
    }

    /// Records a node's free space.
    pub fn set_free(&mut self, id: &NodeId, free_bytes: u64) -> Result<(), Error> {
        let i = self.index_or_err(id)?;
        let node = &self.nodes[i];
        if free_bytes > node.capacity_bytes {
            return Err(invalid(
                format!(
                    "node {:?} would have {free_bytes} bytes free but its capacity is {} bytes",
                    node.id.as_str(),
                    node.capacity_bytes
                ),
                "Report free space no larger than the capacity, or raise the capacity first.",
            ));
        }
        if node.free_bytes != free_bytes {
            self.nodes[i].free_bytes = free_bytes;
            self.epoch += 1;
        }
        Ok(())
    }

    fn index_or_err(&self, id: &NodeId) -> Result<usize, Error> {
        self.index_of(id).ok_or_else(|| Error::UnknownNode {
            node: id.as_str().to_owned(),
            epoch: self.epoch,
        })
    }

    fn check_node(&self, node: &Node) -> Result<(), Error> {
        let id = node.id.as_str();
        if id.is_empty() || id.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(invalid(
                format!("node id {id:?} is empty or contains whitespace or '/'"),
                "Use a short id of letters, digits, '-', '_' or '.', such as \"node5\".",
            ));
        }
        let parts: Vec<&str> = node.domain.split('/').collect();
        if parts.len() != self.levels.len()
            || parts
                .iter()
                .any(|p| p.is_empty() || p.chars().any(char::is_whitespace))
        {
            return Err(invalid(
                format!(
                    "node {id:?} has domain path {:?}, which does not have one non-empty component for each level ({})",
                    node.domain,
                    self.levels.join("/")
                ),
                format!(
                    "Write the path as {} components separated by '/', such as {:?}.",
                    self.levels.len(),
                    example_path(&self.levels)
                ),
            ));
        }
        if let Some(other) = self
            .nodes
            .iter()
            .find(|n| n.domain == node.domain && n.id != node.id)
        {
            return Err(invalid(
                format!(
                    "nodes {:?} and {id:?} have the same domain path {:?}",
                    other.id.as_str(),
                    node.domain
                ),
                "The last component of the path is the node itself; make it unique (usually the node id).",
            ));
        }
        check_address(id, &node.address)?;
        if !node.nqn.starts_with("nqn.") || node.nqn.len() > MAX_NQN_BYTES {
            return Err(invalid(
                format!(
                    "node {id:?} has subsystem NQN {:?}, which does not start with \"nqn.\" or is longer than {MAX_NQN_BYTES} bytes",
                    node.nqn
                ),
                "Use the NQN the node's target exports, such as \"nqn.2014-08.org.nvmexpress:uuid:…\" or \"nqn.2024-01.io.example:node5\".",
            ));
        }
        if node.free_bytes > node.capacity_bytes {
            return Err(invalid(
                format!(
                    "node {id:?} has {} bytes free but a capacity of {} bytes",
                    node.free_bytes, node.capacity_bytes
                ),
                "Report free space no larger than the capacity.",
            ));
        }
        Ok(())
    }
}

fn example_path(levels: &[String]) -> String {
    levels
        .iter()
        .map(|l| format!("{l}1"))
        .collect::<Vec<_>>()
        .join("/")
}

fn check_levels(levels: &[String]) -> Result<(), Error> {
    if levels.is_empty() {
        return Err(invalid(
            "it has no failure-domain levels".into(),
            "List the levels outermost first, ending with the node, such as [\"rack\", \"node\"].",
        ));
    }
    let mut seen = BTreeSet::new();
    for l in levels {
        if l.is_empty() || l.contains('/') || l.chars().any(char::is_whitespace) {
            return Err(invalid(
                format!("level name {l:?} is empty or contains '/' or whitespace"),
                "Name levels with plain words such as \"dc\", \"rack\" or \"node\".",
            ));
        }
        if !seen.insert(l.as_str()) {
            return Err(invalid(
                format!("level {l:?} appears more than once"),
                "Give every level a distinct name.",
            ));
        }
    }
    Ok(())
}

fn check_address(id: &str, address: &str) -> Result<(), Error> {
    let bad = |why: &str| {
        invalid(
            format!("node {id:?} has NVMe/TCP address {address:?}, {why}"),
            "Write it as host:port, such as \"10.0.0.5:4420\" or \"[fd00::5]:4420\" or \"node5.example:4420\".",
        )
    };
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(bad("which has no port"));
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad("whose port is not a number from 1 to 65535")),
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.chars().any(char::is_whitespace) {
        return Err(bad("whose host is empty or contains whitespace"));
    }
    Ok(())
}

/// " (line L, column C)" for a TOML error span, or nothing.
pub(crate) fn span_note(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let upto = text.get(..span.start).unwrap_or(text);
    let line = upto.matches('\n').count() + 1;
    let col = upto.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!(" (line {line}, column {col})")
}
