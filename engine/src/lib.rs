//! The DPU engine (`dpud`): reactors, front-ends, the volume engine, shard backends to
//! the storage nodes, network offload and the control API.
//!
//! See `docs/architecture.md` for how the pieces fit; each submodule's doc explains its
//! own threading and durability rules.

pub mod layout;
pub mod map;
pub mod pipeline;
pub mod shard;
pub mod volume;
