//! Network offload: a virtual switch with a stateful firewall, on the DPU's cores.
//!
//! On a DPU the host's traffic crosses the same cores that run storage, so this module
//! is built to be cheap per frame and to share: the data plane ([`Dataplane`]) is
//! pure logic over byte slices with time passed in, and the I/O around it
//! ([`afpacket`], [`afxdp`], [`poller`]) works in bounded turns that report the CPU they used,
//! so a reactor can interleave it with storage under a CPU share.
//!
//! Pieces, in the order a frame meets them: [`ratelimit`] (per-port token buckets),
//! [`packet`] (parsing that never panics and classifies every drop), [`vxlan`]
//! (overlay decapsulation on the uplink), [`switch`] (learning L2 switch per VLAN or
//! VXLAN network), [`conntrack`] and [`rules`] (the stateful firewall), then the
//! egress encoding (tags, VXLAN encapsulation). docs/network.md has the diagram, the
//! rule language and the limits.

pub mod afpacket;
pub mod afxdp;
pub mod config;
pub mod conntrack;
pub mod control;
pub mod dataplane;
pub mod fasthash;
pub mod fuzzing;
pub mod packet;
pub mod poller;
pub mod ratelimit;
pub mod rules;
pub mod share;
pub mod switch;
pub mod vxlan;

pub use dataplane::{
    Dataplane, DataplaneConfig, DropReason, NetError, PortConfig, PortKind, Stats, TunnelConfig,
    Tx, TxFrame,
};
pub use packet::MacAddr;
pub use rules::{Action, Cidr, Direction, PortRange, RuleMatch, RuleSpec};
pub use switch::{NetworkId, PortId};
