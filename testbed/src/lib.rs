//! The testbed: everything that runs our components against real peers on one machine.
//!
//! Two halves share the crate. The loopback cluster ([`cluster`], [`fault`],
//! [`bench`]) is what `testbed up|down|status|fault|bench` drive: storage nodes
//! (`nvmeof-target` processes) and later dpud, started from one work directory whose
//! state file lets each short-lived command find them again. The QEMU guest machinery
//! ([`guest`]), the packet-capture checks ([`capture`]) and the test patterns
//! ([`testdata`]) serve the kernel-peer tests.

pub mod bench;
pub mod capture;
pub mod cluster;
pub mod daemon;
mod error;
pub mod fault;
pub mod guest;
pub mod netns;
pub mod procs;
pub mod testdata;

pub use error::Error;
