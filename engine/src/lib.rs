//! The DPU engine (`dpud`): reactors, front-ends, the volume engine, shard backends to
//! the storage nodes, network offload and the control API.
//!
//! See `docs/architecture.md` for how the pieces fit; each submodule's doc explains its
//! own threading and durability rules.

pub mod api;
pub mod daemon;
pub mod frontend;
pub mod layout;
pub mod map;
pub mod metadata;
pub mod net;
pub mod pipeline;
pub mod pool;
pub mod reactor;
pub mod shard;
pub mod store;
mod unix_socket;
pub mod volume;
