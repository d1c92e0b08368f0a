//! Connection tracking: what makes the firewall stateful.
//!
//! A connection is created when a rule walk allows the first packet of a flow; from
//! then on every packet of that flow, in either direction, is matched here first and
//! passes without a rule walk as long as it fits the connection's state. That is
//! both the flow cache (established traffic never walks the rules) and what lets
//! replies in: a reply is only ever accepted because its connection exists, so the
//! same packet arriving unsolicited finds none and is dropped.
//!
//! TCP follows a small state machine (no sequence-window checks; see
//! docs/network.md): a connection opens only on a SYN without ACK, the reply
//! direction must answer SYN+ACK, and FIN/RST walk it to its end. UDP, ICMP echo and
//! other protocols get pseudo-connections that live while traffic flows. Every state
//! has a timeout measured from the last packet; time is passed in (`now`, in
//! nanoseconds) so tests are exact.

use std::collections::HashMap;
use std::net::IpAddr;

use super::packet::{tcp_flags, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use super::switch::NetworkId;

const SEC: u64 = 1_000_000_000;

/// A flow as seen in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// The network it lives on (connections are per network).
    pub network: NetworkId,
    /// IP protocol.
    pub proto: u8,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port (TCP/UDP), echo identifier (ICMP echo), else 0.
    pub sport: u16,
    /// Destination port (TCP/UDP), echo identifier (ICMP echo), else 0.
    pub dport: u16,
}

impl FlowKey {
    /// The same flow seen from the other side.
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            ..*self
        }
    }
}

/// Which side sent a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The side that opened the connection.
    Orig,
    /// The other side.
    Reply,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Orig => Side::Reply,
            Side::Reply => Side::Orig,
        }
    }
}

/// TCP connection states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    /// SYN seen from the originator.
    SynSent,
    /// SYN+ACK seen from the other side.
    SynRecv,
    /// The originator acknowledged the SYN+ACK.
    Established,
    /// One side (the one recorded) sent FIN.
    FinWait,
    /// The first FIN was acknowledged by the other side, which may still send.
    CloseWait,
    /// Both sides sent FIN.
    TimeWait,
    /// Reset.
    Closed,
}

impl TcpState {
    /// Name as shown in listings.
    pub fn name(self) -> &'static str {
        match self {
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Closed => "CLOSED",
        }
    }
}

/// The TCP part of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpTrack {
    /// State.
    pub state: TcpState,
    /// Who sent the first FIN (FinWait, CloseWait).
    pub fin_side: Option<Side>,
}

/// What the TCP machine says about one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpVerdict {
    /// Part of the connection: pass.
    Pass,
    /// Does not fit the state: drop.
    Invalid,
    /// A fresh SYN on a finished connection: forget it and treat as new.
    Reopen,
}

/// One step of the TCP state machine: the segment with `flags` from `side`.
pub fn tcp_step(t: TcpTrack, side: Side, flags: u8) -> (TcpVerdict, TcpTrack) {
    use TcpState::*;
    use TcpVerdict::*;
    let syn = flags & tcp_flags::SYN != 0;
    let ack = flags & tcp_flags::ACK != 0;
    let fin = flags & tcp_flags::FIN != 0;
    let rst = flags & tcp_flags::RST != 0;
    let pure_syn = syn && !ack && !rst && !fin;
    let to = |state, fin_side| TcpTrack { state, fin_side };
    match t.state {
        TimeWait | Closed if side == Side::Orig && pure_syn => (Reopen, t),
        Closed => (Invalid, t),
        _ if rst => (Pass, to(Closed, None)),
        SynSent => match side {
            Side::Orig if pure_syn => (Pass, t),
            Side::Reply if syn && ack && !fin => (Pass, to(SynRecv, None)),
            _ => (Invalid, t),
        },
        SynRecv => match side {
            Side::Reply if syn && ack && !fin => (Pass, t),
            Side::Orig if pure_syn => (Pass, t),
            Side::Orig if ack && !syn && fin => (Pass, to(FinWait, Some(Side::Orig))),
            Side::Orig if ack && !syn => (Pass, to(Established, None)),
            _ => (Invalid, t),
        },
        _ if syn => (Invalid, t),
        Established if fin => (Pass, to(FinWait, Some(side))),
        Established => (Pass, t),
        FinWait | CloseWait => {
            let closer = t.fin_side.unwrap_or(Side::Orig);
            if side == closer.other() && fin {
                (Pass, to(TimeWait, None))
            } else if t.state == FinWait && side == closer.other() && ack {
                (Pass, to(CloseWait, Some(closer)))
            } else {
                (Pass, t)
            }
        }
        TimeWait => (Pass, t),
    }
}

/// Timeouts, measured from a connection's last packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// SYN_SENT.
    pub tcp_syn_sent: u64,
    /// SYN_RECV.
    pub tcp_syn_recv: u64,
    /// ESTABLISHED.
    pub tcp_established: u64,
    /// FIN_WAIT and CLOSE_WAIT.
    pub tcp_closing: u64,
    /// TIME_WAIT.
    pub tcp_time_wait: u64,
    /// CLOSED.
    pub tcp_closed: u64,
    /// UDP flow seen one way only.
    pub udp_unreplied: u64,
    /// UDP flow with replies.
    pub udp_replied: u64,
    /// ICMP echo.
    pub icmp: u64,
    /// Other protocols.
    pub other: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_syn_sent: 120 * SEC,
            tcp_syn_recv: 60 * SEC,
            tcp_established: 5 * 24 * 3600 * SEC,
            tcp_closing: 120 * SEC,
            tcp_time_wait: 120 * SEC,
            tcp_closed: 10 * SEC,
            udp_unreplied: 30 * SEC,
            udp_replied: 180 * SEC,
            icmp: 30 * SEC,
            other: 600 * SEC,
        }
    }
}

impl Timeouts {
    /// The timeout of a connection in its current state.
    pub fn of(&self, c: &Conn) -> u64 {
        match (c.tcp, c.key.proto) {
            (Some(t), _) => match t.state {
                TcpState::SynSent => self.tcp_syn_sent,
                TcpState::SynRecv => self.tcp_syn_recv,
                TcpState::Established => self.tcp_established,
                TcpState::FinWait | TcpState::CloseWait => self.tcp_closing,
                TcpState::TimeWait => self.tcp_time_wait,
                TcpState::Closed => self.tcp_closed,
            },
            (None, IPPROTO_UDP) if c.replied => self.udp_replied,
            (None, IPPROTO_UDP) => self.udp_unreplied,
            (None, IPPROTO_ICMP | IPPROTO_ICMPV6) => self.icmp,
            _ => self.other,
        }
    }
}

/// A tracked connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conn {
    /// The flow as the originator sent it.
    pub key: FlowKey,
    /// TCP state, for TCP.
    pub tcp: Option<TcpTrack>,
    /// Something came back.
    pub replied: bool,
    /// The rule that allowed it.
    pub rule: Option<u64>,
    /// Time of the last packet.
    pub last_seen: u64,
    /// Packets (both directions).
    pub packets: u64,
    /// Bytes (both directions).
    pub bytes: u64,
}

/// The packet facts the tracker needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackInfo {
    /// The flow as sent.
    pub key: FlowKey,
    /// TCP flags, for TCP.
    pub tcp_flags: Option<u8>,
    /// ICMP echo: `Some(true)` for a request, `Some(false)` for a reply.
    pub echo_request: Option<bool>,
    /// Frame length.
    pub len: usize,
}

/// The tracker's answer for a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Track {
    /// Belongs to connection `rule` (the rule that opened it) from `side`: pass.
    Known {
        /// Which side sent it.
        side: Side,
        /// Rule that opened the connection.
        rule: Option<u64>,
    },
    /// Matches a connection but not its state: drop.
    Invalid,
    /// No connection: the rules decide, and may open one with [`ConnTrack::open`]
    /// if the packet is allowed to open one ([`ConnTrack::may_open`]).
    New,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Advance {
    Known(Option<u64>),
    Invalid,
    Expired,
    Reopen,
}

/// Tracker counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnTrackStats {
    /// Connections opened.
    pub opened: u64,
    /// Connections expired.
    pub expired: u64,
    /// Packets found invalid for their connection.
    pub invalid: u64,
    /// Openings refused because the table was full.
    pub table_full: u64,
}

/// The connection table.
#[derive(Debug)]
pub struct ConnTrack {
    conns: HashMap<FlowKey, Conn>,
    timeouts: Timeouts,
    max: usize,
    stats: ConnTrackStats,
}

impl ConnTrack {
    /// A table holding at most `max` connections.
    pub fn new(timeouts: Timeouts, max: usize) -> Self {
        ConnTrack {
            conns: HashMap::new(),
            timeouts,
            max,
            stats: ConnTrackStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> ConnTrackStats {
        self.stats
    }

    /// Live connections (including not yet collected expired ones).
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// None tracked.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The connection of a flow (either direction), if live at `now`.
    pub fn get(&self, key: &FlowKey, now: u64) -> Option<&Conn> {
        let c = self
            .conns
            .get(key)
            .or_else(|| self.conns.get(&key.reversed()))?;
        (now.saturating_sub(c.last_seen) < self.timeouts.of(c)).then_some(c)
    }

    /// Looks a packet up and advances its connection.
    pub fn track(&mut self, p: &TrackInfo, now: u64) -> Track {
        let timeouts = self.timeouts;
        let rev = p.key.reversed();
        let (side, c) = match self.conns.get_mut(&p.key) {
            Some(c) => (Side::Orig, c),
            None => match self.conns.get_mut(&rev) {
                Some(c) => (Side::Reply, c),
                None => return Track::New,
            },
        };
        let outcome = Self::advance(c, side, p, now, &timeouts);
        match outcome {
            Advance::Known(rule) => Track::Known { side, rule },
            Advance::Invalid => {
                self.stats.invalid += 1;
                Track::Invalid
            }
            Advance::Expired | Advance::Reopen => {
                let k = if side == Side::Orig { p.key } else { rev };
                self.conns.remove(&k);
                if outcome == Advance::Expired {
                    self.stats.expired += 1;
                }
                Track::New
            }
        }
    }

    fn advance(c: &mut Conn, side: Side, p: &TrackInfo, now: u64, timeouts: &Timeouts) -> Advance {
        if now.saturating_sub(c.last_seen) >= timeouts.of(c) {
            return Advance::Expired;
        }
        if let Some(t) = c.tcp {
            let (v, next) = tcp_step(t, side, p.tcp_flags.unwrap_or(0));
            match v {
                TcpVerdict::Invalid => return Advance::Invalid,
                TcpVerdict::Reopen => return Advance::Reopen,
                TcpVerdict::Pass => c.tcp = Some(next),
            }
        }
        if let Some(req) = p.echo_request {
            // Requests come from the originator, replies from the other side.
            if req != (side == Side::Orig) {
                return Advance::Invalid;
            }
        }
        if side == Side::Reply {
            c.replied = true;
        }
        c.last_seen = now;
        c.packets += 1;
        c.bytes += u64::try_from(p.len).unwrap_or(u64::MAX);
        Advance::Known(c.rule)
    }

    /// Whether a packet without a connection may open one: a TCP SYN without ACK,
    /// an ICMP echo request, any UDP or other-protocol packet. (ICMP other than echo
    /// is never tracked; errors are handled as related traffic by the caller.)
    pub fn may_open(p: &TrackInfo) -> bool {
        match p.key.proto {
            IPPROTO_TCP => p.tcp_flags.is_some_and(|f| {
                f & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST | tcp_flags::FIN)
                    == tcp_flags::SYN
            }),
            IPPROTO_ICMP | IPPROTO_ICMPV6 => p.echo_request == Some(true),
            _ => true,
        }
    }

    /// Opens a connection for a packet the rules allowed. Returns false when the
    /// table is full (the packet still passes; its replies will not).
    pub fn open(&mut self, p: &TrackInfo, rule: Option<u64>, now: u64) -> bool {
        if self.conns.len() >= self.max {
            self.expire(now);
        }
        if self.conns.len() >= self.max {
            self.stats.table_full += 1;
            return false;
        }
        let tcp = (p.key.proto == IPPROTO_TCP).then_some(TcpTrack {
            state: TcpState::SynSent,
            fin_side: None,
        });
        self.conns.insert(
            p.key,
            Conn {
                key: p.key,
                tcp,
                replied: false,
                rule,
                last_seen: now,
                packets: 1,
                bytes: u64::try_from(p.len).unwrap_or(u64::MAX),
            },
        );
        self.stats.opened += 1;
        true
    }

    /// Drops expired connections; returns how many.
    pub fn expire(&mut self, now: u64) -> usize {
        let t = self.timeouts;
        let before = self.conns.len();
        self.conns
            .retain(|_, c| now.saturating_sub(c.last_seen) < t.of(c));
        let n = before - self.conns.len();
        self.stats.expired += u64::try_from(n).unwrap_or(u64::MAX);
        n
    }

    /// Removes connections for which `f` is true; returns how many.
    pub fn flush(&mut self, mut f: impl FnMut(&Conn) -> bool) -> usize {
        let before = self.conns.len();
        self.conns.retain(|_, c| !f(c));
        before - self.conns.len()
    }

    /// Every connection, sorted by key.
    pub fn list(&self) -> Vec<Conn> {
        let mut v: Vec<Conn> = self.conns.values().cloned().collect();
        v.sort_by_key(|c| c.key);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcp_flags::*;

    fn key() -> FlowKey {
        FlowKey {
            network: NetworkId::Vlan(1),
            proto: IPPROTO_TCP,
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            sport: 40000,
            dport: 80,
        }
    }

    fn pkt(side: Side, flags: u8) -> TrackInfo {
        let k = key();
        TrackInfo {
            key: if side == Side::Orig { k } else { k.reversed() },
            tcp_flags: Some(flags),
            echo_request: None,
            len: 60,
        }
    }

    fn state(ct: &ConnTrack) -> TcpState {
        ct.get(&key(), 0).unwrap().tcp.unwrap().state
    }

    #[test]
    fn tcp_handshake_data_and_close() {
        let mut ct = ConnTrack::new(Timeouts::default(), 10);
        let syn = pkt(Side::Orig, SYN);
        assert_eq!(ct.track(&syn, 0), Track::New);
        assert!(ConnTrack::may_open(&syn));
        assert!(!ConnTrack::may_open(&pkt(Side::Orig, ACK)));
        assert!(ct.open(&syn, Some(7), 0));
        // Data from the server before SYN+ACK does not fit.
        assert_eq!(ct.track(&pkt(Side::Reply, ACK), 0), Track::Invalid);
        let known = |side| Track::Known {
            side,
            rule: Some(7),
        };
        assert_eq!(
            ct.track(&pkt(Side::Reply, SYN | ACK), 0),
            known(Side::Reply)
        );
        assert_eq!(state(&ct), TcpState::SynRecv);
        assert_eq!(ct.track(&pkt(Side::Orig, ACK), 0), known(Side::Orig));
        assert_eq!(state(&ct), TcpState::Established);
        assert_eq!(
            ct.track(&pkt(Side::Reply, ACK | PSH), 0),
            known(Side::Reply)
        );
        // A SYN inside an established connection is invalid.
        assert_eq!(ct.track(&pkt(Side::Orig, SYN), 0), Track::Invalid);
        assert_eq!(
            ct.track(&pkt(Side::Reply, FIN | ACK), 0),
            known(Side::Reply)
        );
        assert_eq!(state(&ct), TcpState::FinWait);
        assert_eq!(ct.track(&pkt(Side::Orig, ACK), 0), known(Side::Orig));
        assert_eq!(state(&ct), TcpState::CloseWait);
        assert_eq!(ct.track(&pkt(Side::Orig, FIN | ACK), 0), known(Side::Orig));
        assert_eq!(state(&ct), TcpState::TimeWait);
        assert_eq!(ct.track(&pkt(Side::Reply, ACK), 0), known(Side::Reply));
        // A new SYN reopens: the rules decide again.
        assert_eq!(ct.track(&syn, 0), Track::New);
        assert!(ct.is_empty());
    }

    #[test]
    fn rst_closes_and_timeouts_expire() {
        let t = Timeouts::default();
        let mut ct = ConnTrack::new(t, 10);
        ct.open(&pkt(Side::Orig, SYN), None, 0);
        assert!(matches!(
            ct.track(&pkt(Side::Reply, RST | ACK), SEC),
            Track::Known { .. }
        ));
        assert_eq!(state(&ct), TcpState::Closed);
        assert_eq!(ct.track(&pkt(Side::Reply, ACK), SEC), Track::Invalid);
        // CLOSED lives tcp_closed after its last packet.
        assert!(ct.get(&key(), SEC + t.tcp_closed - 1).is_some());
        assert_eq!(
            ct.track(&pkt(Side::Reply, ACK), SEC + t.tcp_closed),
            Track::New
        );
        // UDP: unreplied flows live 30 s, replied ones 180 s.
        let mut u = pkt(Side::Orig, 0);
        u.key.proto = IPPROTO_UDP;
        u.tcp_flags = None;
        ct.open(&u, None, 0);
        let mut r = u;
        r.key = u.key.reversed();
        assert_eq!(ct.track(&r, t.udp_unreplied), Track::New);
        ct.open(&u, None, 0);
        assert!(matches!(
            ct.track(&r, SEC),
            Track::Known {
                side: Side::Reply,
                ..
            }
        ));
        assert!(matches!(
            ct.track(&r, SEC + t.udp_replied - 1),
            Track::Known { .. }
        ));
        assert_eq!(ct.expire(2 * SEC + 2 * t.udp_replied), 1);
    }

    #[test]
    fn echo_replies_match_requests_only() {
        let mut ct = ConnTrack::new(Timeouts::default(), 1);
        let req = TrackInfo {
            key: FlowKey {
                proto: IPPROTO_ICMP,
                sport: 99,
                dport: 99,
                ..key()
            },
            tcp_flags: None,
            echo_request: Some(true),
            len: 98,
        };
        let reply = TrackInfo {
            key: req.key.reversed(),
            echo_request: Some(false),
            ..req
        };
        assert!(!ConnTrack::may_open(&reply));
        assert_eq!(ct.track(&reply, 0), Track::New);
        ct.open(&req, None, 0);
        assert!(matches!(
            ct.track(&reply, 0),
            Track::Known {
                side: Side::Reply,
                ..
            }
        ));
        // A reply in the request direction is not part of it.
        let bogus = TrackInfo {
            echo_request: Some(false),
            ..req
        };
        assert_eq!(ct.track(&bogus, 0), Track::Invalid);
        // Table full: refused.
        let other = TrackInfo {
            key: FlowKey {
                sport: 5,
                dport: 5,
                ..req.key
            },
            ..req
        };
        assert!(!ct.open(&other, None, 0));
        assert_eq!(ct.stats().table_full, 1);
    }
}
