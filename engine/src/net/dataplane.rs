//! The pipeline every frame goes through, and the configuration API around it.
//!
//! `process` is pure: it takes a frame, the port it came in on and the time, and
//! says which ports get which bytes. It owns no sockets, so the same code runs under
//! the AF_PACKET poller, in unit and property tests, and in the fuzz harness. The
//! order of stages (see docs/network.md for the diagram) puts the cheapest refusals
//! first: the rate limit before parsing, parsing before the MAC table, the
//! connection table before the rule walk.
//!
//! Configuration changes (ports, rules, tunnels) are applied between frames by the
//! owner of the `Dataplane`; they never touch tracked connections, so a rule change
//! affects new connections only. `flush_conntrack` is the explicit way to cut
//! established ones.

use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;

use super::conntrack::{Conn, ConnTrack, ConnTrackStats, FlowKey, Timeouts, Track, TrackInfo};
use super::fasthash::ConfigMap;
use super::packet::{
    build, parse, quoted_tuple, tcp_flags, Fragment, IpPacket, MacAddr, ParseError, Parsed,
    ETH_P_8021Q, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, L3, L4,
};
use super::ratelimit::{RateLimit, TokenBucket};
use super::rules::{Action, MatchKey, Rule, RuleError, RuleSet, RuleSpec};
use super::switch::{Forward, L2Switch, NetworkId, PortId, SwitchStats};
use super::vxlan::{self, TunnelEnds};

/// Limits and defaults of a data plane.
#[derive(Debug, Clone, Copy)]
pub struct DataplaneConfig {
    /// MAC entries age out after this much silence.
    pub mac_ageing_ns: u64,
    /// MAC table bound (all networks).
    pub mac_table_max: usize,
    /// Connection table bound.
    pub conntrack_max: usize,
    /// Connection timeouts.
    pub timeouts: Timeouts,
    /// What happens to a new flow no rule matches.
    pub default_action: Action,
    /// Carry EtherTypes other than ARP, IPv4 and IPv6 (not firewalled).
    pub allow_non_ip: bool,
    /// Rule decision cache bound.
    pub rule_cache: usize,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            mac_ageing_ns: 300_000_000_000,
            mac_table_max: 16384,
            conntrack_max: 262_144,
            timeouts: Timeouts::default(),
            default_action: Action::Drop,
            allow_non_ip: false,
            rule_cache: 65536,
        }
    }
}

/// How a port attaches to networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortKind {
    /// Untagged frames belong to one network (a VLAN or a VXLAN network).
    Access(NetworkId),
    /// 802.1Q-tagged frames of these VLANs.
    Trunk(Vec<u16>),
    /// The underlay for VXLAN: only VXLAN to `local_ip` is accepted here.
    Uplink {
        /// This VTEP's address.
        local_ip: Ipv4Addr,
        /// This VTEP's MAC.
        local_mac: MacAddr,
    },
}

/// A device port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// Unique name (usually the kernel device).
    pub name: String,
    /// Attachment.
    pub kind: PortKind,
    /// Ingress rate limit.
    pub rate_limit: Option<RateLimit>,
}

/// A VXLAN tunnel: `network` is carried as `vni` to `remote_ip` through `uplink`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelConfig {
    /// The local network.
    pub network: NetworkId,
    /// VNI on the wire.
    pub vni: u32,
    /// The uplink port.
    pub uplink: PortId,
    /// Remote VTEP.
    pub remote_ip: Ipv4Addr,
    /// Next hop MAC towards it.
    pub remote_mac: MacAddr,
}

/// Configuration errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// Name taken.
    #[error("a port named {0:?} exists")]
    DuplicateName(String),
    /// No such port or tunnel.
    #[error("no port {0}")]
    NoSuchPort(PortId),
    /// The port is the uplink of a tunnel.
    #[error("port {0} is the uplink of tunnel {1}")]
    PortInUse(PortId, PortId),
    /// A tunnel's uplink is not an uplink port.
    #[error("port {0} is not an uplink")]
    NotUplink(PortId),
    /// VLAN id outside 1..=4094.
    #[error("VLAN id {0} outside 1..=4094")]
    BadVlan(u16),
    /// VNI wider than 24 bits.
    #[error("VNI {0} wider than 24 bits")]
    BadVni(u32),
    /// (uplink, remote, vni) already has a tunnel.
    #[error("a tunnel to {0} with VNI {1} exists")]
    DuplicateTunnel(Ipv4Addr, u32),
    /// A tunnel port where a device port is needed or the reverse.
    #[error("port {0} is a tunnel")]
    IsTunnel(PortId),
    /// Rule management.
    #[error(transparent)]
    Rule(#[from] RuleError),
}

/// Why the data plane dropped a frame (parse errors are counted apart, by reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Unparseable.
    Parse(ParseError),
    /// Came in on a port that is not configured.
    UnknownPort,
    /// Over the port's rate limit.
    RateLimited,
    /// A tag the port does not carry (or a tag on an access port).
    VlanNotAllowed,
    /// Uplink traffic that is not VXLAN for a configured tunnel.
    NotForTunnel,
    /// Destination is on the ingress port.
    Hairpin,
    /// No other port in the network.
    NoDestination,
    /// Not ARP/IP and non-IP is not carried.
    NonIp,
    /// An IP fragment (not tracked, see docs/network.md).
    Fragment,
    /// Does not fit its connection's state.
    Invalid,
    /// A reply or continuation without a connection.
    Unsolicited,
    /// A drop rule.
    RuleDrop,
    /// A reject rule (an answer was sent when possible).
    RuleReject,
    /// No rule matched and the default is to drop.
    DefaultDrop,
}

impl DropReason {
    /// Counter names, in counter order (parse errors excluded).
    pub const NAMES: [&'static str; 13] = [
        "unknown_port",
        "rate_limited",
        "vlan_not_allowed",
        "not_for_tunnel",
        "hairpin",
        "no_destination",
        "non_ip",
        "fragment",
        "invalid",
        "unsolicited",
        "rule_drop",
        "rule_reject",
        "default_drop",
    ];

    fn index(self) -> Option<usize> {
        Some(match self {
            DropReason::Parse(_) => return None,
            DropReason::UnknownPort => 0,
            DropReason::RateLimited => 1,
            DropReason::VlanNotAllowed => 2,
            DropReason::NotForTunnel => 3,
            DropReason::Hairpin => 4,
            DropReason::NoDestination => 5,
            DropReason::NonIp => 6,
            DropReason::Fragment => 7,
            DropReason::Invalid => 8,
            DropReason::Unsolicited => 9,
            DropReason::RuleDrop => 10,
            DropReason::RuleReject => 11,
            DropReason::DefaultDrop => 12,
        })
    }
}

/// Drop counters by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounters {
    /// By [`DropReason::NAMES`].
    pub by_reason: [u64; 13],
    /// By [`ParseError::ALL`].
    pub parse: [u64; 14],
}

impl DropCounters {
    fn count(&mut self, r: DropReason) {
        match r {
            DropReason::Parse(e) => self.parse[e.index()] += 1,
            other => {
                if let Some(i) = other.index() {
                    self.by_reason[i] += 1;
                }
            }
        }
    }

    /// The count for one reason.
    pub fn get(&self, r: DropReason) -> u64 {
        match r {
            DropReason::Parse(e) => self.parse[e.index()],
            other => other.index().map_or(0, |i| self.by_reason[i]),
        }
    }

    /// All drops.
    pub fn total(&self) -> u64 {
        self.by_reason.iter().sum::<u64>() + self.parse.iter().sum::<u64>()
    }

    /// (name, count) of the non-zero counters.
    pub fn nonzero(&self) -> Vec<(&'static str, u64)> {
        let a = DropReason::NAMES
            .iter()
            .zip(self.by_reason)
            .map(|(n, c)| (*n, c));
        let b = ParseError::ALL.iter().map(|e| e.name()).zip(self.parse);
        a.chain(b).filter(|(_, c)| *c > 0).collect()
    }
}

/// Per-port counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Frames received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Frames received here and dropped, by reason.
    pub drops: DropCounters,
}

#[derive(Debug)]
enum PortEntry {
    Device {
        cfg: PortConfig,
        bucket: Option<TokenBucket>,
    },
    Tunnel(TunnelConfig),
}

#[derive(Debug)]
struct PortState {
    entry: PortEntry,
    counters: PortCounters,
}

/// The bytes to send on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxFrame {
    /// This part of the input frame, unchanged.
    Input(Range<usize>),
    /// A new frame (retagged, encapsulated or a reject answer).
    Owned(Vec<u8>),
}

/// One frame to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tx {
    /// A device port.
    pub port: PortId,
    /// What to send.
    pub frame: TxFrame,
}

impl Tx {
    /// The bytes, given the input frame.
    pub fn bytes<'a>(&'a self, input: &'a [u8]) -> &'a [u8] {
        match &self.frame {
            TxFrame::Input(r) => input.get(r.clone()).unwrap_or(&[]),
            TxFrame::Owned(v) => v,
        }
    }
}

/// A port in a stats snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSnapshot {
    /// Id.
    pub id: PortId,
    /// Name (tunnels: `vxlan:<vni>@<remote>`).
    pub name: String,
    /// Device attachment, or None for a tunnel.
    pub kind: Option<PortKind>,
    /// Tunnel configuration, for a tunnel.
    pub tunnel: Option<TunnelConfig>,
    /// Counters.
    pub counters: PortCounters,
}

/// Everything countable, at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Ports and tunnels.
    pub ports: Vec<PortSnapshot>,
    /// Rules in evaluation order with counters.
    pub rules: Vec<Rule>,
    /// Switch counters.
    pub switch: SwitchStats,
    /// Connection tracker counters.
    pub conntrack: ConnTrackStats,
    /// Live connections.
    pub connections: usize,
    /// Rule decision cache (hits, walks).
    pub rule_cache: (u64, u64),
    /// Drops over all ports.
    pub drops: DropCounters,
    /// Reject answers sent.
    pub rejects_sent: u64,
}

/// The switch, firewall and tunnels of one DPU.
#[derive(Debug)]
pub struct Dataplane {
    cfg: DataplaneConfig,
    ports: ConfigMap<PortId, PortState>,
    next_port: PortId,
    members: ConfigMap<NetworkId, Vec<PortId>>,
    /// (remote VTEP, VNI) to tunnel port.
    tunnels: ConfigMap<(Ipv4Addr, u32), PortId>,
    switch: L2Switch,
    rules: RuleSet,
    conntrack: ConnTrack,
    drops: DropCounters,
    rejects_sent: u64,
}

#[derive(Clone, Copy)]
enum Ingress {
    Uplink(Ipv4Addr),
    Access(NetworkId),
    Trunk,
}

enum Verdict {
    Pass(Vec<PortId>),
    Drop(DropReason, Option<Vec<u8>>),
}

impl Dataplane {
    /// An empty data plane: no ports, no rules (so, by default, nothing passes but ARP).
    pub fn new(cfg: DataplaneConfig) -> Self {
        Dataplane {
            cfg,
            ports: ConfigMap::default(),
            next_port: 1,
            members: ConfigMap::default(),
            tunnels: ConfigMap::default(),
            switch: L2Switch::new(cfg.mac_ageing_ns, cfg.mac_table_max),
            rules: RuleSet::new(cfg.rule_cache),
            conntrack: ConnTrack::new(cfg.timeouts, cfg.conntrack_max),
            drops: DropCounters::default(),
            rejects_sent: 0,
        }
    }

    fn check_network(n: NetworkId) -> Result<(), NetError> {
        match n {
            NetworkId::Vlan(v) if !(1..=4094).contains(&v) => Err(NetError::BadVlan(v)),
            NetworkId::Vni(v) if v > 0xff_ffff => Err(NetError::BadVni(v)),
            _ => Ok(()),
        }
    }

    fn rebuild_members(&mut self) {
        let mut m: ConfigMap<NetworkId, Vec<PortId>> = ConfigMap::default();
        for (id, p) in &self.ports {
            match &p.entry {
                PortEntry::Device { cfg, .. } => match &cfg.kind {
                    PortKind::Access(n) => m.entry(*n).or_default().push(*id),
                    PortKind::Trunk(vids) => {
                        for v in vids {
                            m.entry(NetworkId::Vlan(*v)).or_default().push(*id);
                        }
                    }
                    PortKind::Uplink { .. } => {}
                },
                PortEntry::Tunnel(t) => m.entry(t.network).or_default().push(*id),
            }
        }
        for v in m.values_mut() {
            v.sort_unstable();
        }
        self.members = m;
    }

    /// Adds a device port.
    pub fn add_port(&mut self, cfg: PortConfig, now: u64) -> Result<PortId, NetError> {
        if self
            .ports
            .values()
            .any(|p| matches!(&p.entry, PortEntry::Device { cfg: c, .. } if c.name == cfg.name))
        {
            return Err(NetError::DuplicateName(cfg.name));
        }
        match &cfg.kind {
            PortKind::Access(n) => Self::check_network(*n)?,
            PortKind::Trunk(v) => {
                for vid in v {
                    Self::check_network(NetworkId::Vlan(*vid))?;
                }
            }
            PortKind::Uplink { .. } => {}
        }
        let id = self.next_port;
        self.next_port += 1;
        let bucket = cfg.rate_limit.map(|l| TokenBucket::new(l, now));
        self.ports.insert(
            id,
            PortState {
                entry: PortEntry::Device { cfg, bucket },
                counters: PortCounters::default(),
            },
        );
        self.rebuild_members();
        Ok(id)
    }

    /// Removes a port or tunnel (and the MAC entries pointing at it).
    pub fn remove_port(&mut self, id: PortId) -> Result<(), NetError> {
        let p = self.ports.get(&id).ok_or(NetError::NoSuchPort(id))?;
        if let PortEntry::Tunnel(t) = &p.entry {
            self.tunnels.remove(&(t.remote_ip, t.vni));
        } else if let Some(t) = self.tunnels.values().find(|t| {
            matches!(self.ports.get(t).map(|p| &p.entry), Some(PortEntry::Tunnel(c)) if c.uplink == id)
        }) {
            return Err(NetError::PortInUse(id, *t));
        }
        self.ports.remove(&id);
        self.switch.forget_port(id);
        self.rebuild_members();
        Ok(())
    }

    /// Changes a device port's rate limit.
    pub fn set_rate_limit(
        &mut self,
        id: PortId,
        limit: Option<RateLimit>,
        now: u64,
    ) -> Result<(), NetError> {
        match self.ports.get_mut(&id).map(|p| &mut p.entry) {
            Some(PortEntry::Device { cfg, bucket }) => {
                cfg.rate_limit = limit;
                *bucket = limit.map(|l| TokenBucket::new(l, now));
                Ok(())
            }
            Some(PortEntry::Tunnel(_)) => Err(NetError::IsTunnel(id)),
            None => Err(NetError::NoSuchPort(id)),
        }
    }

    /// Adds a VXLAN tunnel; it becomes a member port of its network.
    pub fn add_tunnel(&mut self, t: TunnelConfig) -> Result<PortId, NetError> {
        Self::check_network(t.network)?;
        Self::check_network(NetworkId::Vni(t.vni))?;
        match self.ports.get(&t.uplink).map(|p| &p.entry) {
            Some(PortEntry::Device {
                cfg:
                    PortConfig {
                        kind: PortKind::Uplink { .. },
                        ..
                    },
                ..
            }) => {}
            Some(_) => return Err(NetError::NotUplink(t.uplink)),
            None => return Err(NetError::NoSuchPort(t.uplink)),
        }
        if self.tunnels.contains_key(&(t.remote_ip, t.vni)) {
            return Err(NetError::DuplicateTunnel(t.remote_ip, t.vni));
        }
        let id = self.next_port;
        self.next_port += 1;
        self.ports.insert(
            id,
            PortState {
                entry: PortEntry::Tunnel(t),
                counters: PortCounters::default(),
            },
        );
        self.tunnels.insert((t.remote_ip, t.vni), id);
        self.rebuild_members();
        Ok(id)
    }

    /// Adds a firewall rule; applies to connections opened from now on.
    pub fn add_rule(&mut self, spec: RuleSpec) -> u64 {
        self.rules.add(spec)
    }

    /// Adds a firewall rule under a given id (restoring a stored configuration, so that
    /// ids stay stable across restarts).
    pub fn add_rule_with_id(&mut self, id: u64, spec: RuleSpec) -> Result<(), NetError> {
        Ok(self.rules.add_with_id(id, spec)?)
    }

    /// Deletes a rule. Connections it opened stay until they end or are flushed.
    pub fn remove_rule(&mut self, id: u64) -> Result<RuleSpec, NetError> {
        Ok(self.rules.remove(id)?)
    }

    /// Moves a rule to another priority.
    pub fn move_rule(&mut self, id: u64, priority: i32) -> Result<(), NetError> {
        Ok(self.rules.set_priority(id, priority)?)
    }

    /// Rules in evaluation order.
    pub fn rules(&self) -> &[Rule] {
        self.rules.rules()
    }

    /// Tracked connections.
    pub fn connections(&self) -> Vec<Conn> {
        self.conntrack.list()
    }

    /// Cuts tracked connections matching `f`; returns how many.
    pub fn flush_conntrack(&mut self, f: impl FnMut(&Conn) -> bool) -> usize {
        self.conntrack.flush(f)
    }

    /// The MAC table: (network, MAC, port, age).
    pub fn mac_table(&self, now: u64) -> Vec<(NetworkId, MacAddr, PortId, u64)> {
        self.switch.entries(now)
    }

    /// Housekeeping: ages MAC entries and expires connections. Call about once a second.
    pub fn expire(&mut self, now: u64) {
        self.switch.age(now);
        self.conntrack.expire(now);
    }

    /// The device ports: (id, name).
    pub fn device_ports(&self) -> Vec<(PortId, String)> {
        let mut v: Vec<_> = self
            .ports
            .iter()
            .filter_map(|(id, p)| match &p.entry {
                PortEntry::Device { cfg, .. } => Some((*id, cfg.name.clone())),
                PortEntry::Tunnel(_) => None,
            })
            .collect();
        v.sort();
        v
    }

    /// A snapshot of every counter.
    pub fn stats(&self) -> Stats {
        let mut ports: Vec<PortSnapshot> = self
            .ports
            .iter()
            .map(|(id, p)| match &p.entry {
                PortEntry::Device { cfg, .. } => PortSnapshot {
                    id: *id,
                    name: cfg.name.clone(),
                    kind: Some(cfg.kind.clone()),
                    tunnel: None,
                    counters: p.counters,
                },
                PortEntry::Tunnel(t) => PortSnapshot {
                    id: *id,
                    name: format!("vxlan:{}@{}", t.vni, t.remote_ip),
                    kind: None,
                    tunnel: Some(*t),
                    counters: p.counters,
                },
            })
            .collect();
        ports.sort_by_key(|p| p.id);
        Stats {
            ports,
            rules: self.rules.rules().to_vec(),
            switch: self.switch.stats(),
            conntrack: self.conntrack.stats(),
            connections: self.conntrack.len(),
            rule_cache: self.rules.cache_stats(),
            drops: self.drops,
            rejects_sent: self.rejects_sent,
        }
    }

    fn is_tunnel(&self, p: PortId) -> bool {
        matches!(
            self.ports.get(&p).map(|s| &s.entry),
            Some(PortEntry::Tunnel(_))
        )
    }

    fn drop(&mut self, port: PortId, r: DropReason) -> DropReason {
        self.drops.count(r);
        if let Some(p) = self.ports.get_mut(&port) {
            p.counters.drops.count(r);
        }
        r
    }

    /// Runs one frame that arrived on `in_port` at `now`; appends what to send to
    /// `out` and returns how many frames that was, or why the frame was dropped.
    pub fn process(
        &mut self,
        in_port: PortId,
        frame: &[u8],
        now: u64,
        out: &mut Vec<Tx>,
    ) -> Result<usize, DropReason> {
        let before = out.len();
        let Some(p) = self.ports.get_mut(&in_port) else {
            self.drops.count(DropReason::UnknownPort);
            return Err(DropReason::UnknownPort);
        };
        p.counters.rx_packets += 1;
        p.counters.rx_bytes += len64(frame.len());
        let PortEntry::Device { cfg, bucket } = &mut p.entry else {
            return Err(self.drop(in_port, DropReason::UnknownPort));
        };
        if let Some(b) = bucket {
            if !b.admit(frame.len(), now) {
                return Err(self.drop(in_port, DropReason::RateLimited));
            }
        }
        // A copy of what the port is, without cloning a trunk's VLAN list per frame.
        let kind = match &cfg.kind {
            PortKind::Uplink { local_ip, .. } => Ingress::Uplink(*local_ip),
            PortKind::Access(n) => Ingress::Access(*n),
            PortKind::Trunk(_) => Ingress::Trunk,
        };
        let parsed = match parse(frame) {
            Ok(p) => p,
            Err(e) => return Err(self.drop(in_port, DropReason::Parse(e))),
        };
        let res = match kind {
            Ingress::Uplink(local_ip) => {
                let d = match vxlan::decap(frame, &parsed, local_ip) {
                    Ok(d) => d,
                    Err(_) => return Err(self.drop(in_port, DropReason::NotForTunnel)),
                };
                let Some(tid) = self.tunnels.get(&(d.remote_ip, d.vni)).copied() else {
                    return Err(self.drop(in_port, DropReason::NotForTunnel));
                };
                let Some(PortState {
                    entry: PortEntry::Tunnel(t),
                    counters,
                }) = self.ports.get_mut(&tid)
                else {
                    return Err(self.drop(in_port, DropReason::NotForTunnel));
                };
                let net = t.network;
                counters.rx_packets += 1;
                counters.rx_bytes += len64(d.inner.len());
                let inner = &frame[d.inner.clone()];
                let ip = match parse(inner) {
                    Ok(p) => p,
                    Err(e) => return Err(self.drop(tid, DropReason::Parse(e))),
                };
                if ip.vlan.is_some_and(|v| v.vid != 0) {
                    return Err(self.drop(tid, DropReason::VlanNotAllowed));
                }
                self.switch_frame(tid, net, frame, d.inner, &ip, now, out)
            }
            Ingress::Access(net) => {
                if parsed.vlan.is_some_and(|v| v.vid != 0) {
                    return Err(self.drop(in_port, DropReason::VlanNotAllowed));
                }
                self.switch_frame(in_port, net, frame, 0..frame.len(), &parsed, now, out)
            }
            // The trunk carries a VLAN exactly when it is a member of it.
            Ingress::Trunk => match parsed.vlan {
                Some(v)
                    if self
                        .members
                        .get(&NetworkId::Vlan(v.vid))
                        .is_some_and(|m| m.contains(&in_port)) =>
                {
                    self.switch_frame(
                        in_port,
                        NetworkId::Vlan(v.vid),
                        frame,
                        0..frame.len(),
                        &parsed,
                        now,
                        out,
                    )
                }
                _ => return Err(self.drop(in_port, DropReason::VlanNotAllowed)),
            },
        };
        res.map(|()| out.len() - before)
    }

    #[allow(clippy::too_many_arguments)]
    fn switch_frame(
        &mut self,
        in_port: PortId,
        net: NetworkId,
        outer: &[u8],
        range: Range<usize>,
        parsed: &Parsed,
        now: u64,
        out: &mut Vec<Tx>,
    ) -> Result<(), DropReason> {
        let frame = &outer[range.clone()];
        let empty = Vec::new();
        let members = self.members.get(&net).unwrap_or(&empty);
        let outs = match self
            .switch
            .forward(net, in_port, parsed.src, parsed.dst, members, now)
        {
            Forward::Unicast(p) => vec![p],
            Forward::Flood(v) => v,
            Forward::Hairpin => return Err(self.drop(in_port, DropReason::Hairpin)),
        };
        let outs = if self.is_tunnel(in_port) {
            // Split horizon: the tunnel mesh is full, so a frame from one tunnel
            // never goes out of another.
            outs.into_iter().filter(|p| !self.is_tunnel(*p)).collect()
        } else {
            outs
        };
        if outs.is_empty() {
            return Err(self.drop(in_port, DropReason::NoDestination));
        }
        let verdict = match &parsed.l3 {
            L3::Arp(_) => Verdict::Pass(outs),
            L3::Other if self.cfg.allow_non_ip => Verdict::Pass(outs),
            L3::Other => Verdict::Drop(DropReason::NonIp, None),
            L3::Ip(ip) => self.firewall(in_port, net, outs, frame, parsed, ip, now),
        };
        match verdict {
            Verdict::Pass(ports) => {
                for p in ports {
                    self.emit(p, net, outer, range.clone(), parsed, true, out);
                }
                Ok(())
            }
            Verdict::Drop(r, answer) => {
                if let Some(a) = answer {
                    if let Ok(ap) = parse(&a) {
                        self.rejects_sent += 1;
                        self.emit(in_port, net, &a, 0..a.len(), &ap, false, out);
                    }
                }
                Err(self.drop(in_port, r))
            }
        }
    }

    /// Sends `outer[range]` (an Ethernet frame of `net`, parsed as `parsed`) out of
    /// port `p` in that port's encoding. `is_input`: `outer` is the frame given to
    /// `process`, so unchanged bytes can be sent from it.
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        p: PortId,
        net: NetworkId,
        outer: &[u8],
        range: Range<usize>,
        parsed: &Parsed,
        is_input: bool,
        out: &mut Vec<Tx>,
    ) {
        let frame = &outer[range.clone()];
        let Some(port) = self.ports.get(&p) else {
            return;
        };
        let tx = match &port.entry {
            PortEntry::Device { cfg, .. } => match &cfg.kind {
                PortKind::Access(_) => match parsed.vlan {
                    None => Tx {
                        port: p,
                        frame: TxFrame::Input(range),
                    },
                    Some(_) => Tx {
                        port: p,
                        frame: TxFrame::Owned(untag(frame)),
                    },
                },
                PortKind::Trunk(_) => {
                    let NetworkId::Vlan(vid) = net else { return };
                    match parsed.vlan {
                        Some(v) if v.vid == vid => Tx {
                            port: p,
                            frame: TxFrame::Input(range),
                        },
                        _ => Tx {
                            port: p,
                            frame: TxFrame::Owned(tag(&untag_ref(frame, parsed), vid)),
                        },
                    }
                }
                PortKind::Uplink { .. } => return,
            },
            PortEntry::Tunnel(t) => {
                let Some(PortEntry::Device {
                    cfg:
                        PortConfig {
                            kind:
                                PortKind::Uplink {
                                    local_ip,
                                    local_mac,
                                },
                            ..
                        },
                    ..
                }) = self.ports.get(&t.uplink).map(|u| &u.entry)
                else {
                    return;
                };
                let ends = TunnelEnds {
                    local_mac: *local_mac,
                    local_ip: *local_ip,
                    remote_mac: t.remote_mac,
                    remote_ip: t.remote_ip,
                };
                let enc = vxlan::encap(&untag_ref(frame, parsed), t.vni, &ends);
                let uplink = t.uplink;
                if let Some(tp) = self.ports.get_mut(&p) {
                    tp.counters.tx_packets += 1;
                    tp.counters.tx_bytes += len64(frame.len());
                }
                Tx {
                    port: uplink,
                    frame: TxFrame::Owned(enc),
                }
            }
        };
        let mut tx = tx;
        if let (TxFrame::Input(r), false) = (&tx.frame, is_input) {
            tx.frame = TxFrame::Owned(outer.get(r.clone()).unwrap_or(&[]).to_vec());
        }
        let n = len64(tx.bytes(outer).len());
        if let Some(dp) = self.ports.get_mut(&tx.port) {
            dp.counters.tx_packets += 1;
            dp.counters.tx_bytes += n;
        }
        out.push(tx);
    }

    #[allow(clippy::too_many_arguments)]
    fn firewall(
        &mut self,
        in_port: PortId,
        net: NetworkId,
        outs: Vec<PortId>,
        frame: &[u8],
        parsed: &Parsed,
        ip: &IpPacket,
        now: u64,
    ) -> Verdict {
        if ip.fragment != Fragment::None {
            return Verdict::Drop(DropReason::Fragment, None);
        }
        let (sport, dport) = ip.ports();
        let mut info = TrackInfo {
            key: FlowKey {
                network: net,
                proto: ip.proto,
                src: ip.src,
                dst: ip.dst,
                sport,
                dport,
            },
            tcp_flags: None,
            echo_request: None,
            len: frame.len(),
        };
        let mut tracked = true;
        match ip.l4 {
            L4::Tcp(t) => info.tcp_flags = Some(t.flags),
            L4::Icmp { ty, rest, .. } => {
                let v6 = ip.proto == IPPROTO_ICMPV6;
                match (v6, ty) {
                    (false, 8) | (true, 128) | (false, 0) | (true, 129) => {
                        let id = u16::from_be_bytes([rest[0], rest[1]]);
                        info.key.sport = id;
                        info.key.dport = id;
                        info.echo_request = Some(matches!(ty, 8 | 128));
                    }
                    // Neighbour discovery and MLD: IPv6 does not work without them.
                    (true, 130..=137 | 143) => return Verdict::Pass(outs),
                    // Errors: pass only when they quote a tracked connection.
                    (false, 3 | 4 | 5 | 11 | 12) | (true, 1..=4) => {
                        let related =
                            quoted_tuple(frame, ip).is_some_and(|(s, d, proto, sp, dp)| {
                                let k = FlowKey {
                                    network: net,
                                    proto,
                                    src: s,
                                    dst: d,
                                    sport: sp,
                                    dport: dp,
                                };
                                self.conntrack.get(&k, now).is_some()
                            });
                        return if related {
                            Verdict::Pass(outs)
                        } else {
                            Verdict::Drop(DropReason::Unsolicited, None)
                        };
                    }
                    _ => tracked = false,
                }
            }
            _ => {}
        }
        if tracked {
            match self.conntrack.track(&info, now) {
                Track::Known { rule, .. } => {
                    if let Some(r) = rule {
                        self.rules.count_packet(r, frame.len());
                    }
                    return Verdict::Pass(outs);
                }
                Track::Invalid => return Verdict::Drop(DropReason::Invalid, None),
                Track::New => {
                    if !ConnTrack::may_open(&info) {
                        return Verdict::Drop(DropReason::Unsolicited, None);
                    }
                }
            }
        }
        // A new flow: walk the rules once per egress port.
        let mut allowed = Vec::with_capacity(outs.len());
        let mut opener = None;
        let mut last = DropReason::DefaultDrop;
        for &o in &outs {
            let k = MatchKey {
                in_port,
                out_port: o,
                network: net,
                src: ip.src,
                dst: ip.dst,
                proto: ip.proto,
                sport,
                dport,
            };
            let rule = self.rules.lookup(&k);
            let action = rule
                .and_then(|r| self.rules.action(r))
                .unwrap_or(self.cfg.default_action);
            match action {
                Action::Allow => {
                    allowed.push(o);
                    if opener.is_none() {
                        opener = Some(rule);
                    }
                }
                Action::Drop => {
                    if last != DropReason::RuleReject {
                        last = if rule.is_some() {
                            DropReason::RuleDrop
                        } else {
                            DropReason::DefaultDrop
                        };
                    }
                }
                Action::Reject => last = DropReason::RuleReject,
            }
        }
        if let Some(rule) = opener {
            if let Some(r) = rule {
                self.rules.count_packet(r, frame.len());
            }
            if tracked {
                self.conntrack.open(&info, rule, now);
            }
            return Verdict::Pass(allowed);
        }
        let answer = (last == DropReason::RuleReject)
            .then(|| reject_answer(frame, parsed, ip))
            .flatten();
        Verdict::Drop(last, answer)
    }
}

fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The frame without its 802.1Q tag.
fn untag(frame: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(frame.len().saturating_sub(4));
    v.extend_from_slice(&frame[..12.min(frame.len())]);
    v.extend_from_slice(frame.get(16..).unwrap_or(&[]));
    v
}

fn untag_ref<'a>(frame: &'a [u8], parsed: &Parsed) -> std::borrow::Cow<'a, [u8]> {
    if parsed.vlan.is_some() {
        std::borrow::Cow::Owned(untag(frame))
    } else {
        std::borrow::Cow::Borrowed(frame)
    }
}

/// An untagged frame with a tag for `vid` inserted.
fn tag(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(frame.len() + 4);
    v.extend_from_slice(&frame[..12.min(frame.len())]);
    v.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
    v.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    v.extend_from_slice(frame.get(12..).unwrap_or(&[]));
    v
}

fn is_unicast_ip(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => !(v.is_multicast() || v.is_broadcast() || v.is_unspecified()),
        IpAddr::V6(v) => !(v.is_multicast() || v.is_unspecified()),
    }
}

/// The answer to a rejected packet, as an untagged Ethernet frame back to its
/// sender: a TCP RST for TCP, an ICMP "administratively prohibited" otherwise.
/// None for packets that must never be answered (RSTs, ICMP errors, group
/// addresses).
pub fn reject_answer(frame: &[u8], parsed: &Parsed, ip: &IpPacket) -> Option<Vec<u8>> {
    if parsed.dst.is_multicast() || !is_unicast_ip(ip.src) || !is_unicast_ip(ip.dst) {
        return None;
    }
    let payload = match ip.l4 {
        L4::Tcp(t) => {
            if t.flags & tcp_flags::RST != 0 {
                return None;
            }
            let data = ip.end.saturating_sub(ip.l4_offset + t.header_len);
            let seg = if t.flags & tcp_flags::ACK != 0 {
                build::tcp(
                    ip.dst,
                    ip.src,
                    t.dport,
                    t.sport,
                    t.ack,
                    0,
                    tcp_flags::RST,
                    &[],
                )
            } else {
                let mut consumed = u32::try_from(data).unwrap_or(0);
                if t.flags & tcp_flags::SYN != 0 {
                    consumed = consumed.wrapping_add(1);
                }
                if t.flags & tcp_flags::FIN != 0 {
                    consumed = consumed.wrapping_add(1);
                }
                build::tcp(
                    ip.dst,
                    ip.src,
                    t.dport,
                    t.sport,
                    0,
                    t.seq.wrapping_add(consumed),
                    tcp_flags::RST | tcp_flags::ACK,
                    &[],
                )
            };
            build::ip(ip.dst, ip.src, IPPROTO_TCP, &seg)
        }
        L4::Icmp { ty, .. }
            if !matches!(
                (ip.proto, ty),
                (IPPROTO_ICMP, 0 | 8 | 13..=18) | (IPPROTO_ICMPV6, 128..=255)
            ) =>
        {
            return None;
        }
        _ => {
            let quoted = frame.get(parsed.l3_offset..ip.end)?;
            let (ty, code, max) = match ip.src {
                IpAddr::V4(_) => (3, 13, 548),
                IpAddr::V6(_) => (1, 1, 1232),
            };
            let msg = build::icmp(
                ip.dst,
                ip.src,
                ty,
                code,
                [0; 4],
                &quoted[..quoted.len().min(max)],
            );
            build::ip(ip.dst, ip.src, build::icmp_proto(ip.src), &msg)
        }
    };
    let ethertype = if ip.src.is_ipv4() {
        super::packet::ETH_P_IPV4
    } else {
        super::packet::ETH_P_IPV6
    };
    Some(build::ethernet(
        parsed.src, parsed.dst, None, ethertype, &payload,
    ))
}
