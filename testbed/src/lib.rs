//! The testbed: everything that runs our components against real peers on one machine.
//!
//! Today it holds the QEMU guest machinery ([`guest`]) that the kernel-peer tests use
//! (the Linux kernel's NVMe/TCP host and target against our target and host) and the
//! packet-capture checks ([`capture`]) that hold our NVMe/TCP traffic against
//! Wireshark's dissector; the loopback cluster, fault injection and benchmark reports
//! build on them later.

pub mod capture;
pub mod guest;
pub mod testdata;
