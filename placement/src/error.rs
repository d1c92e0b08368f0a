//! The one error type of the placement layer.
//!
//! The CLI shows these messages verbatim to an operator, so every message is a complete
//! sentence that says what is wrong and what would fix it, and carries the names
//! (profile, node, level, domains) needed to act on it without looking anything up.

use std::fmt;

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A profile or cluster-map document could not be parsed (bad syntax, a wrong type, a
    /// missing or unknown field).
    #[error("the {what} is not valid {format}: {detail}. {fix}")]
    Syntax {
        /// "profile" or "cluster map".
        what: &'static str,
        /// "TOML" or "JSON".
        format: &'static str,
        /// The parser's description, with the line and column where it has them.
        detail: String,
        /// How to fix it.
        fix: String,
    },
    /// A document has a `schema_version` this build does not read, or none.
    #[error("the {what} has {}; this version reads schema_version {supported}. {fix}", if found == "none" { "no schema_version".to_owned() } else { format!("schema_version {found}") })]
    SchemaVersion {
        /// "profile" or "cluster map".
        what: &'static str,
        /// What the document says ("none" if the field is missing).
        found: String,
        /// The version this build reads.
        supported: u32,
        /// How to fix it.
        fix: String,
    },
    /// A field of a profile has a value outside what the schema allows.
    #[error("{field} = {value:?} is not valid: {problem}. {fix}")]
    InvalidField {
        /// The field name as written in the document.
        field: &'static str,
        /// The value as written.
        value: String,
        /// What is wrong with it.
        problem: String,
        /// What would fix it.
        fix: String,
    },
    /// The profile names a failure-domain level the cluster map does not have.
    #[error("profile {profile:?} puts pieces in distinct {level:?} failure domains, but the cluster map has no level {level:?} (its levels are {levels}). Set failure_domain to one of those levels, or give the nodes' domain paths that level.")]
    UnknownLevel {
        /// The profile's name.
        profile: String,
        /// The level the profile asks for.
        level: String,
        /// The map's levels, comma-separated.
        levels: String,
    },
    /// A placement was asked for at a failure-domain level the cluster map does not have.
    #[error("there is no failure-domain level {level:?} in the cluster map (its levels are {levels}). Place at one of those levels, or give the nodes' domain paths that level.")]
    NoSuchLevel {
        /// The level asked for.
        level: String,
        /// The map's levels, comma-separated.
        levels: String,
    },
    /// The cluster map has fewer usable failure domains than the protection needs.
    #[error("{0}")]
    NotEnoughDomains(Box<DomainShortage>),
    /// A cluster-map document or change is inconsistent.
    #[error("the cluster map is not valid: {problem}. {fix}")]
    InvalidMap {
        /// What is wrong.
        problem: String,
        /// What would fix it.
        fix: String,
    },
    /// A node id that the map does not hold.
    #[error("node {node:?} is not in the cluster map (epoch {epoch}). Check the id with the node list, or add the node first.")]
    UnknownNode {
        /// The id asked for.
        node: String,
        /// The map's epoch.
        epoch: u64,
    },
    /// A recorded assignment does not fit the layout it is planned under.
    #[error("segment {volume}/{segment} has {found} recorded pieces but its layout {layout} has {expected}. Plan it with the layout the segment was written with.")]
    AssignmentMismatch {
        /// The volume id.
        volume: u64,
        /// The segment number.
        segment: u64,
        /// Pieces in the record.
        found: usize,
        /// Pieces in the layout.
        expected: usize,
        /// The layout as written.
        layout: String,
    },
}

/// The details of [`Error::NotEnoughDomains`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainShortage {
    /// The protection as written (`ec:4+2`, `mirror:3`, `ec:auto:1`).
    pub protection: String,
    /// How many distinct domains it needs.
    pub needed: usize,
    /// The failure-domain level.
    pub level: String,
    /// The domains that have at least one up node with a non-zero weight.
    pub usable: Vec<String>,
    /// Domains present in the map with no such node.
    pub unusable: Vec<String>,
    /// What else would fit, when there is something more specific to say than "fewer
    /// pieces or a finer level".
    pub hint: Option<String>,
}

impl fmt::Display for DomainShortage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let have = self.usable.len();
        write!(
            f,
            "{} needs {} failure domains at level {}; the cluster has {have}",
            self.protection, self.needed, self.level
        )?;
        if self.usable.is_empty() {
            f.write_str(".")?;
        } else {
            write!(f, " ({}).", self.usable.join(", "))?;
        }
        if !self.unusable.is_empty() {
            write!(
                f,
                " Not counted, because they have no up node with a non-zero weight: {}.",
                self.unusable.join(", ")
            )?;
        }
        let missing = self.needed.saturating_sub(have);
        write!(
            f,
            " Add {missing} more {} failure domain{} with up nodes",
            self.level,
            if missing == 1 { "" } else { "s" }
        )?;
        match &self.hint {
            Some(hint) => write!(f, ", or {hint}."),
            None => write!(
                f,
                ", or choose a protection with at most {have} pieces or a finer failure_domain level."
            ),
        }
    }
}
