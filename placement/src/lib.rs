//! Storage profiles, the cluster map and placement of pieces across failure domains.
//!
//! Pure logic: no I/O, no async, no clocks, no randomized hashing. Everything here is a
//! deterministic function of its inputs so that every engine computes the same
//! placement from the same map, and so that it can be property-tested exhaustively.

mod error;
pub mod hash;
mod map;
mod place;
mod profile;
mod report;

pub use error::{DomainShortage, Error};
pub use map::{default_weight, ClusterMap, Node, NodeId, NodeState, MAP_SCHEMA_VERSION};
pub use place::{drain_plan, Assignment, MoveReason, PieceMove, Placer, Plan, SegmentId};
pub use profile::{
    adaptive, builtin_profiles, iops_cost, Compression, Encryption, Layout, Profile, Protection,
    Resolved, SpaceReservation, IOPS_UNIT_BYTES, MAX_COMPRESSION_UNIT, MIN_COMPRESSION_UNIT,
    PROFILE_SCHEMA_VERSION,
};
pub use report::{check_profiles, check_volumes, VolumeCheck, VolumeSpec};
