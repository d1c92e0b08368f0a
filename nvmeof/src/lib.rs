//! NVMe over Fabrics on TCP: the command set, the NVMe/TCP transport, a host
//! (initiator) and a controller (target).
//!
//! The engine reaches every storage node through this crate, and the storage node
//! itself is this crate's target binary. Keeping the protocol here, with no engine
//! logic, lets any standard NVMe/TCP target (Linux nvmet, SPDK) stand in for ours and
//! lets the Linux kernel host test our target.
pub mod backend;
pub mod target;

pub mod host;
pub mod nvme;
pub mod tcp;

#[doc(hidden)]
pub mod fuzzing;
