//! The learning L2 switch.
//!
//! One MAC table per network (an 802.1Q VLAN or a VXLAN network), so the same MAC may
//! live in two networks without the tables fighting. Source addresses are learned on
//! every frame (a station that moves is re-learned at once), entries age out when a
//! station has been silent for the ageing time, and frames to an unknown, broadcast or
//! multicast destination are flooded to every member port of the network except the
//! one the frame came in on. A frame is never sent back out of its ingress port.
//!
//! The table has a size bound; when it is full new stations are not learned (their
//! frames are flooded, which is correct if slow) rather than evicting live ones, so a
//! host spraying random source MACs cannot push real stations out.

use std::collections::HashMap;

use super::packet::MacAddr;

/// A port of the switch: a kernel device or a VXLAN tunnel.
pub type PortId = u32;

/// A broadcast domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NetworkId {
    /// An 802.1Q VLAN (1..=4094).
    Vlan(u16),
    /// A VXLAN network (24-bit VNI).
    Vni(u32),
}

impl std::fmt::Display for NetworkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetworkId::Vlan(v) => write!(f, "vlan:{v}"),
            NetworkId::Vni(v) => write!(f, "vni:{v}"),
        }
    }
}

/// Where a frame goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// To one known port.
    Unicast(PortId),
    /// To these ports (every member but the ingress port).
    Flood(Vec<PortId>),
    /// Nowhere: the destination lives on the ingress port.
    Hairpin,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    port: PortId,
    seen: u64,
}

/// Switch counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwitchStats {
    /// Addresses learned (new entries).
    pub learned: u64,
    /// Stations seen on a different port than their entry.
    pub moves: u64,
    /// Entries removed by ageing.
    pub aged: u64,
    /// New stations not learned because the table was full.
    pub table_full: u64,
    /// Frames flooded.
    pub flooded: u64,
    /// Frames to a known port.
    pub unicast: u64,
    /// Frames dropped because the destination is on the ingress port.
    pub hairpin: u64,
}

/// The MAC tables of every network.
#[derive(Debug)]
pub struct L2Switch {
    table: HashMap<(NetworkId, MacAddr), Entry>,
    ageing_ns: u64,
    max_entries: usize,
    stats: SwitchStats,
}

impl L2Switch {
    /// A switch whose entries age out after `ageing_ns` of silence, holding at most
    /// `max_entries` stations over all networks.
    pub fn new(ageing_ns: u64, max_entries: usize) -> Self {
        L2Switch {
            table: HashMap::new(),
            ageing_ns,
            max_entries,
            stats: SwitchStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> SwitchStats {
        self.stats
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    fn live(&self, e: &Entry, now: u64) -> bool {
        now.saturating_sub(e.seen) < self.ageing_ns
    }

    /// Records that `mac` was seen on `port`. Group addresses are never learned.
    pub fn learn(&mut self, net: NetworkId, mac: MacAddr, port: PortId, now: u64) {
        if mac.is_multicast() {
            return;
        }
        let ageing = self.ageing_ns;
        match self.table.get_mut(&(net, mac)) {
            Some(e) => {
                if e.port != port && now.saturating_sub(e.seen) < ageing {
                    self.stats.moves += 1;
                }
                e.port = port;
                e.seen = now;
            }
            None => {
                if self.table.len() >= self.max_entries {
                    self.age(now);
                }
                if self.table.len() >= self.max_entries {
                    self.stats.table_full += 1;
                    return;
                }
                self.table.insert((net, mac), Entry { port, seen: now });
                self.stats.learned += 1;
            }
        }
    }

    /// The port `mac` was last seen on, if that was within the ageing time.
    pub fn lookup(&self, net: NetworkId, mac: MacAddr, now: u64) -> Option<PortId> {
        self.table
            .get(&(net, mac))
            .filter(|e| self.live(e, now))
            .map(|e| e.port)
    }

    /// Learns the source and decides where a frame from `in_port` goes; `members` are
    /// the ports of `net`.
    pub fn forward(
        &mut self,
        net: NetworkId,
        in_port: PortId,
        src: MacAddr,
        dst: MacAddr,
        members: &[PortId],
        now: u64,
    ) -> Forward {
        self.learn(net, src, in_port, now);
        if !dst.is_multicast() {
            if let Some(p) = self.lookup(net, dst, now) {
                if p == in_port {
                    self.stats.hairpin += 1;
                    return Forward::Hairpin;
                }
                if members.contains(&p) {
                    self.stats.unicast += 1;
                    return Forward::Unicast(p);
                }
            }
        }
        self.stats.flooded += 1;
        Forward::Flood(members.iter().copied().filter(|p| *p != in_port).collect())
    }

    /// Removes entries silent for the ageing time; returns how many.
    pub fn age(&mut self, now: u64) -> usize {
        let ageing = self.ageing_ns;
        let before = self.table.len();
        self.table
            .retain(|_, e| now.saturating_sub(e.seen) < ageing);
        let n = before - self.table.len();
        self.stats.aged += u64::try_from(n).unwrap_or(u64::MAX);
        n
    }

    /// Forgets every station learned on `port` (the port was removed).
    pub fn forget_port(&mut self, port: PortId) {
        self.table.retain(|_, e| e.port != port);
    }

    /// (network, MAC, port, age in ns) of every live entry.
    pub fn entries(&self, now: u64) -> Vec<(NetworkId, MacAddr, PortId, u64)> {
        let mut v: Vec<_> = self
            .table
            .iter()
            .filter(|(_, e)| self.live(e, now))
            .map(|((n, m), e)| (*n, *m, e.port, now.saturating_sub(e.seen)))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const N: NetworkId = NetworkId::Vlan(10);

    fn mac(i: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, i])
    }

    #[test]
    fn learns_floods_and_never_reflects() {
        let mut sw = L2Switch::new(300 * S, 100);
        let members = [1, 2, 3];
        // Unknown destination: flooded to all but the ingress port.
        assert_eq!(
            sw.forward(N, 1, mac(1), mac(2), &members, 0),
            Forward::Flood(vec![2, 3])
        );
        // The reply is unicast back to where mac(1) was learned.
        assert_eq!(
            sw.forward(N, 2, mac(2), mac(1), &members, S),
            Forward::Unicast(1)
        );
        assert_eq!(
            sw.forward(N, 1, mac(1), mac(2), &members, S),
            Forward::Unicast(2)
        );
        // Broadcast and multicast always flood, without reflection.
        assert_eq!(
            sw.forward(N, 3, mac(3), MacAddr::BROADCAST, &members, S),
            Forward::Flood(vec![1, 2])
        );
        let mcast = MacAddr([0x01, 0, 0x5e, 0, 0, 1]);
        assert_eq!(
            sw.forward(N, 2, mac(2), mcast, &members, S),
            Forward::Flood(vec![1, 3])
        );
        // Destination on the ingress port: not sent back.
        assert_eq!(
            sw.forward(N, 1, mac(9), mac(1), &members, S),
            Forward::Hairpin
        );
        // Multicast sources are never learned.
        sw.learn(N, mcast, 3, S);
        assert_eq!(sw.lookup(N, mcast, S), None);
    }

    #[test]
    fn networks_are_separate_and_entries_age() {
        let mut sw = L2Switch::new(10 * S, 100);
        sw.learn(N, mac(1), 1, 0);
        sw.learn(NetworkId::Vni(5000), mac(1), 7, 0);
        assert_eq!(sw.lookup(N, mac(1), S), Some(1));
        assert_eq!(sw.lookup(NetworkId::Vni(5000), mac(1), S), Some(7));
        assert_eq!(sw.lookup(NetworkId::Vlan(11), mac(1), S), None);
        // Refreshed entries live on; silent ones expire at the ageing time.
        sw.learn(N, mac(1), 1, 5 * S);
        assert_eq!(sw.lookup(N, mac(1), 14 * S), Some(1));
        assert_eq!(sw.lookup(NetworkId::Vni(5000), mac(1), 10 * S), None);
        assert_eq!(sw.age(14 * S), 1);
        assert_eq!(sw.len(), 1);
        // An expired destination floods again.
        assert_eq!(
            sw.forward(N, 2, mac(2), mac(1), &[1, 2], 16 * S),
            Forward::Flood(vec![1])
        );
    }

    #[test]
    fn station_moves_and_full_table() {
        let mut sw = L2Switch::new(10 * S, 2);
        sw.learn(N, mac(1), 1, 0);
        sw.learn(N, mac(1), 2, S);
        assert_eq!(sw.lookup(N, mac(1), S), Some(2));
        assert_eq!(sw.stats().moves, 1);
        sw.learn(N, mac(2), 1, S);
        sw.learn(N, mac(3), 1, S);
        assert_eq!(sw.lookup(N, mac(3), S), None);
        assert_eq!(sw.stats().table_full, 1);
        // Once the old entries age, there is room again.
        sw.learn(N, mac(3), 1, 12 * S);
        assert_eq!(sw.lookup(N, mac(3), 12 * S), Some(1));
        sw.forget_port(1);
        assert!(sw.is_empty());
    }
}
