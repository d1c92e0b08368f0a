//! Firewall rules and the matcher that picks the first rule for a packet.
//!
//! Rules are ordered by (priority, id): the lowest priority number wins, rules of
//! equal priority in the order they were added. The matcher is consulted only for
//! packets that do not belong to a tracked connection (see `conntrack`), so its cost
//! is per new flow, but a port scan or a flood of unsolicited packets is all new
//! flows, so it is still kept cheap:
//! - rules are bucketed by protocol at compile time, so a TCP packet never looks at a
//!   UDP-only rule;
//! - a bounded decision cache remembers the verdict for an exact match key. Any rule
//!   change bumps the rule generation and empties the cache, so a cached decision can
//!   never outlive the rules it came from.
//!
//! [`naive_match`] is the plain linear walk the property tests hold the matcher to.

use std::collections::HashMap;
use std::net::IpAddr;

use super::fasthash::ConfigMap;
use super::packet::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use super::switch::{NetworkId, PortId};

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Let the packet (and its connection) through.
    Allow,
    /// Drop silently.
    Drop,
    /// Drop and answer with a TCP RST or an ICMP unreachable.
    Reject,
}

/// Which way a packet crosses the rule's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Entering the switch from the port (sent by the host behind it).
    In,
    /// Leaving the switch through the port (towards the host behind it).
    Out,
}

/// An IPv4 or IPv6 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// Network address (host bits are ignored).
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Cidr {
    /// A prefix; fails when `len` exceeds the family's width.
    pub fn new(addr: IpAddr, len: u8) -> Result<Cidr, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("prefix length {len} > {max} for {addr}"));
        }
        Ok(Cidr { addr, len })
    }

    /// Whether `ip` is inside (addresses of the other family never are).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let len = match l {
            Some(l) => l.parse().map_err(|e| format!("{s:?}: {e}"))?,
            None => {
                if addr.is_ipv4() {
                    32
                } else {
                    128
                }
            }
        };
        Cidr::new(addr, len)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port.
    pub hi: u16,
}

impl PortRange {
    /// One port.
    pub fn one(p: u16) -> PortRange {
        PortRange { lo: p, hi: p }
    }

    fn contains(&self, p: u16) -> bool {
        self.lo <= p && p <= self.hi
    }
}

/// The match part of a rule; `None` fields match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RuleMatch {
    /// The switch port the rule is about.
    pub port: Option<PortId>,
    /// With `port`: only packets entering (In) or leaving (Out) through it. Without a
    /// port it has no effect. `None` with a port: either way.
    pub direction: Option<Direction>,
    /// The network (VLAN or VXLAN) the packet is on.
    pub network: Option<NetworkId>,
    /// Source prefix.
    pub src: Option<Cidr>,
    /// Destination prefix.
    pub dst: Option<Cidr>,
    /// IP protocol number.
    pub proto: Option<u8>,
    /// Source port range; a rule with a port range matches only TCP and UDP.
    pub sport: Option<PortRange>,
    /// Destination port range; likewise.
    pub dport: Option<PortRange>,
}

/// A rule as configured.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleSpec {
    /// Lower runs first.
    pub priority: i32,
    /// What to do on a match.
    pub action: Action,
    /// What it matches.
    pub matches: RuleMatch,
}

/// What the matcher looks at: the packet's fields and the ports it crosses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MatchKey {
    /// Ingress port.
    pub in_port: PortId,
    /// Egress port.
    pub out_port: PortId,
    /// Network.
    pub network: NetworkId,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol.
    pub proto: u8,
    /// Source port (TCP/UDP), else 0.
    pub sport: u16,
    /// Destination port (TCP/UDP), else 0.
    pub dport: u16,
}

/// Whether one rule matches a key.
pub fn rule_matches(m: &RuleMatch, k: &MatchKey) -> bool {
    if let Some(p) = m.port {
        let ok = match m.direction {
            Some(Direction::In) => k.in_port == p,
            Some(Direction::Out) => k.out_port == p,
            None => k.in_port == p || k.out_port == p,
        };
        if !ok {
            return false;
        }
    }
    if m.network.is_some_and(|n| n != k.network) {
        return false;
    }
    if m.src.is_some_and(|c| !c.contains(k.src)) || m.dst.is_some_and(|c| !c.contains(k.dst)) {
        return false;
    }
    if m.proto.is_some_and(|p| p != k.proto) {
        return false;
    }
    if m.sport.is_some() || m.dport.is_some() {
        if k.proto != IPPROTO_TCP && k.proto != IPPROTO_UDP {
            return false;
        }
        if m.sport.is_some_and(|r| !r.contains(k.sport))
            || m.dport.is_some_and(|r| !r.contains(k.dport))
        {
            return false;
        }
    }
    true
}

/// The reference: walk rules in (priority, id) order, first match wins.
pub fn naive_match(rules: &[(u64, RuleSpec)], k: &MatchKey) -> Option<u64> {
    let mut sorted: Vec<&(u64, RuleSpec)> = rules.iter().collect();
    sorted.sort_by_key(|(id, r)| (r.priority, *id));
    sorted
        .into_iter()
        .find(|(_, r)| rule_matches(&r.matches, k))
        .map(|(id, _)| *id)
}

/// Counters of one rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleCounters {
    /// Packets the rule decided in a rule walk (new flows, stateless packets).
    pub hits: u64,
    /// Packets of connections the rule opened, counted as they pass (established
    /// traffic included).
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
}

/// A rule as stored: its id, spec and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Stable id, assigned on add.
    pub id: u64,
    /// The rule.
    pub spec: RuleSpec,
    /// Its counters.
    pub counters: RuleCounters,
}

/// Protocol buckets of the index.
const BUCKETS: usize = 5;

fn bucket(proto: u8) -> usize {
    match proto {
        IPPROTO_TCP => 0,
        IPPROTO_UDP => 1,
        IPPROTO_ICMP => 2,
        IPPROTO_ICMPV6 => 3,
        _ => 4,
    }
}

/// Errors of rule management.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// No rule with this id.
    #[error("no firewall rule with id {0}")]
    NoSuchRule(u64),
    /// The id is taken (or zero).
    #[error("firewall rule id {0} is taken or invalid")]
    IdTaken(u64),
}

/// The ordered rule list with its index and decision cache.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    next_id: u64,
    generation: u64,
    /// Per protocol bucket, indices into `rules` in evaluation order.
    index: [Vec<usize>; BUCKETS],
    by_id: ConfigMap<u64, usize>,
    cache: HashMap<MatchKey, Option<usize>>,
    cache_cap: usize,
    cache_hits: u64,
    walks: u64,
}

impl Default for RuleSet {
    fn default() -> Self {
        Self::new(65536)
    }
}

impl RuleSet {
    /// An empty rule set whose decision cache holds at most `cache_cap` keys.
    pub fn new(cache_cap: usize) -> Self {
        RuleSet {
            rules: Vec::new(),
            next_id: 1,
            generation: 0,
            index: Default::default(),
            by_id: ConfigMap::default(),
            cache: HashMap::new(),
            cache_cap,
            cache_hits: 0,
            walks: 0,
        }
    }

    /// Bumped on every change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// (decision cache hits, rule walks).
    pub fn cache_stats(&self) -> (u64, u64) {
        (self.cache_hits, self.walks)
    }

    fn rebuild(&mut self) {
        self.rules.sort_by_key(|r| (r.spec.priority, r.id));
        self.by_id = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.id, i))
            .collect();
        for (b, list) in self.index.iter_mut().enumerate() {
            list.clear();
            for (i, r) in self.rules.iter().enumerate() {
                if r.spec.matches.proto.is_none_or(|p| bucket(p) == b) {
                    list.push(i);
                }
            }
        }
        self.cache.clear();
        self.generation += 1;
    }

    /// Adds a rule; returns its id.
    pub fn add(&mut self, spec: RuleSpec) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.rules.push(Rule {
            id,
            spec,
            counters: RuleCounters::default(),
        });
        self.rebuild();
        id
    }

    /// Adds a rule under a given id (a rule restored from a stored configuration);
    /// later [`RuleSet::add`] calls get higher ids.
    pub fn add_with_id(&mut self, id: u64, spec: RuleSpec) -> Result<(), RuleError> {
        if id == 0 || self.by_id.contains_key(&id) {
            return Err(RuleError::IdTaken(id));
        }
        self.next_id = self.next_id.max(id.saturating_add(1));
        self.rules.push(Rule {
            id,
            spec,
            counters: RuleCounters::default(),
        });
        self.rebuild();
        Ok(())
    }

    /// Removes a rule.
    pub fn remove(&mut self, id: u64) -> Result<RuleSpec, RuleError> {
        let i = *self.by_id.get(&id).ok_or(RuleError::NoSuchRule(id))?;
        let r = self.rules.remove(i);
        self.rebuild();
        Ok(r.spec)
    }

    /// Changes a rule's priority (moves it in the order).
    pub fn set_priority(&mut self, id: u64, priority: i32) -> Result<(), RuleError> {
        let i = *self.by_id.get(&id).ok_or(RuleError::NoSuchRule(id))?;
        self.rules[i].spec.priority = priority;
        self.rebuild();
        Ok(())
    }

    /// Rules in evaluation order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The action of rule `id`, if it exists.
    pub fn action(&self, id: u64) -> Option<Action> {
        self.by_id.get(&id).map(|i| self.rules[*i].spec.action)
    }

    /// The first matching rule's id, through the cache and the protocol index.
    /// Counts a hit on the rule.
    pub fn lookup(&mut self, k: &MatchKey) -> Option<u64> {
        let found = match self.cache.get(k) {
            Some(hit) => {
                self.cache_hits += 1;
                *hit
            }
            None => {
                self.walks += 1;
                let found = self.index[bucket(k.proto)]
                    .iter()
                    .copied()
                    .find(|i| rule_matches(&self.rules[*i].spec.matches, k));
                if self.cache.len() >= self.cache_cap {
                    self.cache.clear();
                }
                self.cache.insert(*k, found);
                found
            }
        };
        found.map(|i| {
            self.rules[i].counters.hits += 1;
            self.rules[i].id
        })
    }

    /// Counts a packet of a connection opened by rule `id` (ignored if it is gone).
    pub fn count_packet(&mut self, id: u64, bytes: usize) {
        if let Some(i) = self.by_id.get(&id) {
            let c = &mut self.rules[*i].counters;
            c.packets += 1;
            c.bytes += u64::try_from(bytes).unwrap_or(u64::MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn key(proto: u8, dport: u16) -> MatchKey {
        MatchKey {
            in_port: 1,
            out_port: 2,
            network: NetworkId::Vlan(1),
            src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            dst: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            proto,
            sport: 40000,
            dport,
        }
    }

    fn rule(priority: i32, action: Action, m: RuleMatch) -> RuleSpec {
        RuleSpec {
            priority,
            action,
            matches: m,
        }
    }

    #[test]
    fn cidr_contains() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert_eq!("10.0.0.1".parse::<Cidr>().unwrap().len, 32);
    }

    #[test]
    fn priority_order_ports_and_directions() {
        let mut rs = RuleSet::new(16);
        let allow_http = rs.add(rule(
            10,
            Action::Allow,
            RuleMatch {
                proto: Some(IPPROTO_TCP),
                dport: Some(PortRange { lo: 80, hi: 81 }),
                ..Default::default()
            },
        ));
        let drop_all = rs.add(rule(100, Action::Drop, RuleMatch::default()));
        let reject_in = rs.add(rule(
            5,
            Action::Reject,
            RuleMatch {
                port: Some(1),
                direction: Some(Direction::Out),
                ..Default::default()
            },
        ));
        assert_eq!(rs.lookup(&key(IPPROTO_TCP, 80)), Some(allow_http));
        assert_eq!(rs.lookup(&key(IPPROTO_TCP, 82)), Some(drop_all));
        // A port range never matches ICMP.
        assert_eq!(rs.lookup(&key(IPPROTO_ICMP, 80)), Some(drop_all));
        // The reject rule is about packets leaving through port 1.
        let mut k = key(IPPROTO_TCP, 80);
        std::mem::swap(&mut k.in_port, &mut k.out_port);
        assert_eq!(rs.lookup(&k), Some(reject_in));
        // Moving a rule changes the order; the cache does not hide it.
        rs.set_priority(drop_all, 1).unwrap();
        assert_eq!(rs.lookup(&key(IPPROTO_TCP, 80)), Some(drop_all));
        rs.remove(drop_all).unwrap();
        assert_eq!(rs.lookup(&key(IPPROTO_TCP, 82)), None);
        assert_eq!(rs.remove(drop_all), Err(RuleError::NoSuchRule(drop_all)));
        let hits = rs
            .rules()
            .iter()
            .find(|r| r.id == allow_http)
            .unwrap()
            .counters
            .hits;
        assert_eq!(hits, 1);
    }

    #[test]
    fn equal_priorities_keep_insertion_order() {
        let mut rs = RuleSet::new(16);
        let a = rs.add(rule(1, Action::Drop, RuleMatch::default()));
        let _b = rs.add(rule(1, Action::Allow, RuleMatch::default()));
        assert_eq!(rs.lookup(&key(IPPROTO_UDP, 1)), Some(a));
        let (hits, walks) = rs.cache_stats();
        assert_eq!((hits, walks), (0, 1));
        assert_eq!(rs.lookup(&key(IPPROTO_UDP, 1)), Some(a));
        assert_eq!(rs.cache_stats(), (1, 1));
    }
}
