//! The data-plane pipeline end to end on frames in memory: switching, the stateful
//! firewall's promises (replies pass, the same packets unsolicited do not, deleting a
//! rule keeps established connections), reject answers, VLAN trunks, rate limits and
//! VXLAN between two data planes.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};

use engine::net::dataplane::reject_answer;
use engine::net::packet::{
    build, parse, tcp_flags::*, ParseError, ETH_P_ARP, ETH_P_IPV4, IPPROTO_ICMP, IPPROTO_TCP,
    IPPROTO_UDP, L3, L4,
};
use engine::net::ratelimit::RateLimit;
use engine::net::{
    Action, Cidr, Dataplane, DataplaneConfig, Direction, DropReason, MacAddr, NetworkId,
    PortConfig, PortKind, PortRange, RuleMatch, RuleSpec, TunnelConfig, Tx,
};

const SEC: u64 = 1_000_000_000;
const MA: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xa]);
const MB: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xb]);
const NET: NetworkId = NetworkId::Vlan(100);

fn a() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 9, 0, 1))
}
fn b() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 9, 0, 2))
}

fn tcp(from_a: bool, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let (sm, dm, s, d) = if from_a {
        (MA, MB, a(), b())
    } else {
        (MB, MA, b(), a())
    };
    let seg = build::tcp(s, d, sport, dport, 1000, 2000, flags, payload);
    build::ethernet(
        dm,
        sm,
        None,
        ETH_P_IPV4,
        &build::ip(s, d, IPPROTO_TCP, &seg),
    )
}

fn udp(from_a: bool, sport: u16, dport: u16) -> Vec<u8> {
    let (sm, dm, s, d) = if from_a {
        (MA, MB, a(), b())
    } else {
        (MB, MA, b(), a())
    };
    let dg = build::udp(s, d, sport, dport, b"payload");
    build::ethernet(dm, sm, None, ETH_P_IPV4, &build::ip(s, d, IPPROTO_UDP, &dg))
}

fn ping(from_a: bool, ty: u8, id: u16) -> Vec<u8> {
    let (sm, dm, s, d) = if from_a {
        (MA, MB, a(), b())
    } else {
        (MB, MA, b(), a())
    };
    let id = id.to_be_bytes();
    let m = build::icmp(s, d, ty, 0, [id[0], id[1], 0, 1], b"abcdefgh");
    build::ethernet(dm, sm, None, ETH_P_IPV4, &build::ip(s, d, IPPROTO_ICMP, &m))
}

struct Rig {
    dp: Dataplane,
    pa: u32,
    pb: u32,
    out: Vec<Tx>,
}

impl Rig {
    fn new() -> Rig {
        let mut dp = Dataplane::new(DataplaneConfig::default());
        let port = |name: &str| PortConfig {
            name: name.into(),
            kind: PortKind::Access(NET),
            rate_limit: None,
        };
        let pa = dp.add_port(port("host-a"), 0).unwrap();
        let pb = dp.add_port(port("host-b"), 0).unwrap();
        Rig {
            dp,
            pa,
            pb,
            out: Vec::new(),
        }
    }

    /// Sends a frame from A's or B's port; returns the ports it went out of.
    fn send(&mut self, from_a: bool, f: &[u8], now: u64) -> Result<Vec<u32>, DropReason> {
        self.out.clear();
        let port = if from_a { self.pa } else { self.pb };
        self.dp.process(port, f, now, &mut self.out)?;
        Ok(self.out.iter().map(|t| t.port).collect())
    }

    /// A allowed to open TCP to B:80 only.
    fn allow_a_to_b_http(&mut self) -> u64 {
        self.dp.add_rule(RuleSpec {
            priority: 10,
            action: Action::Allow,
            matches: RuleMatch {
                port: Some(self.pa),
                direction: Some(Direction::In),
                proto: Some(IPPROTO_TCP),
                dport: Some(PortRange::one(80)),
                dst: Some(Cidr::new(b(), 32).unwrap()),
                ..Default::default()
            },
        })
    }
}

#[test]
fn arp_floods_and_the_default_drops_ip() {
    let mut r = Rig::new();
    let arp = build::arp(
        1,
        MA,
        Ipv4Addr::new(10, 9, 0, 1),
        MacAddr::default(),
        Ipv4Addr::new(10, 9, 0, 2),
    );
    let f = build::ethernet(MacAddr::BROADCAST, MA, None, ETH_P_ARP, &arp);
    assert_eq!(r.send(true, &f, 0), Ok(vec![r.pb]));
    // Output is the input frame untouched.
    assert_eq!(r.out[0].bytes(&f), &f[..]);
    // No rule: IP is dropped by default, and counted.
    assert_eq!(
        r.send(true, &udp(true, 1, 2), 0),
        Err(DropReason::DefaultDrop)
    );
    assert_eq!(r.dp.stats().drops.get(DropReason::DefaultDrop), 1);
    // Garbage is dropped with its reason.
    assert_eq!(
        r.send(true, &[0u8; 7], 0),
        Err(DropReason::Parse(ParseError::EthernetTruncated))
    );
    let s = r.dp.stats();
    assert_eq!(
        s.drops
            .get(DropReason::Parse(ParseError::EthernetTruncated)),
        1
    );
    assert_eq!(s.ports[0].counters.rx_packets, 3);
}

#[test]
fn replies_pass_only_for_allowed_connections() {
    let mut r = Rig::new();
    let rule = r.allow_a_to_b_http();
    // Unsolicited SYN+ACK from B before anything: dropped.
    assert_eq!(
        r.send(false, &tcp(false, 80, 5555, SYN | ACK, b""), 0),
        Err(DropReason::Unsolicited)
    );
    // B may not open a connection to A.
    assert_eq!(
        r.send(false, &tcp(false, 5555, 80, SYN, b""), 0),
        Err(DropReason::DefaultDrop)
    );
    // A opens to B:80; the handshake and data flow both ways.
    assert_eq!(
        r.send(true, &tcp(true, 5555, 80, SYN, b""), 0),
        Ok(vec![r.pb])
    );
    assert_eq!(
        r.send(false, &tcp(false, 80, 5555, SYN | ACK, b""), 0),
        Ok(vec![r.pa])
    );
    assert_eq!(
        r.send(true, &tcp(true, 5555, 80, ACK, b""), 0),
        Ok(vec![r.pb])
    );
    assert_eq!(
        r.send(false, &tcp(false, 80, 5555, ACK | PSH, b"hello"), SEC),
        Ok(vec![r.pa])
    );
    // A to B:81 is not allowed.
    assert_eq!(
        r.send(true, &tcp(true, 5556, 81, SYN, b""), SEC),
        Err(DropReason::DefaultDrop)
    );
    let c = r.dp.connections();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].tcp.unwrap().state.name(), "ESTABLISHED");
    assert_eq!(c[0].rule, Some(rule));
    // Deleting the rule: the established connection carries on, new ones are refused.
    r.dp.remove_rule(rule).unwrap();
    assert_eq!(
        r.send(false, &tcp(false, 80, 5555, ACK, b"more"), 2 * SEC),
        Ok(vec![r.pa])
    );
    assert_eq!(
        r.send(true, &tcp(true, 5555, 80, ACK, b""), 2 * SEC),
        Ok(vec![r.pb])
    );
    assert_eq!(
        r.send(true, &tcp(true, 5557, 80, SYN, b""), 2 * SEC),
        Err(DropReason::DefaultDrop)
    );
    // Flushing cuts it.
    assert_eq!(r.dp.flush_conntrack(|_| true), 1);
    assert_eq!(
        r.send(false, &tcp(false, 80, 5555, ACK, b"more"), 3 * SEC),
        Err(DropReason::Unsolicited)
    );
}

#[test]
fn rule_counters_count_hits_and_connection_traffic() {
    let mut r = Rig::new();
    let rule = r.allow_a_to_b_http();
    r.send(true, &tcp(true, 5555, 80, SYN, b""), 0).unwrap();
    r.send(false, &tcp(false, 80, 5555, SYN | ACK, b""), 0)
        .unwrap();
    r.send(true, &tcp(true, 5555, 80, ACK, b""), 0).unwrap();
    let s = r.dp.stats();
    let c = s.rules.iter().find(|x| x.id == rule).unwrap().counters;
    assert_eq!((c.hits, c.packets), (1, 3));
    assert_eq!(s.connections, 1);
    let pb = s.ports.iter().find(|p| p.id == r.pb).unwrap();
    assert_eq!((pb.counters.rx_packets, pb.counters.tx_packets), (1, 2));
}

#[test]
fn udp_and_ping_pseudo_connections() {
    let mut r = Rig::new();
    r.dp.add_rule(RuleSpec {
        priority: 1,
        action: Action::Allow,
        matches: RuleMatch {
            src: Some(Cidr::new(a(), 32).unwrap()),
            proto: Some(IPPROTO_UDP),
            ..Default::default()
        },
    });
    r.dp.add_rule(RuleSpec {
        priority: 2,
        action: Action::Allow,
        matches: RuleMatch {
            port: Some(r.pa),
            direction: Some(Direction::In),
            proto: Some(IPPROTO_ICMP),
            ..Default::default()
        },
    });
    // UDP reply before the request: dropped; after it: passes; after the timeout: dropped.
    assert_eq!(
        r.send(false, &udp(false, 53, 4000), 0),
        Err(DropReason::DefaultDrop)
    );
    r.send(true, &udp(true, 4000, 53), 0).unwrap();
    assert_eq!(r.send(false, &udp(false, 53, 4000), SEC), Ok(vec![r.pa]));
    assert_eq!(
        r.send(false, &udp(false, 53, 4000), 200 * SEC),
        Err(DropReason::DefaultDrop)
    );
    // Ping: the reply with the same id passes, another id does not, an unsolicited reply does not.
    assert_eq!(
        r.send(false, &ping(false, 0, 7), 0),
        Err(DropReason::Unsolicited)
    );
    r.send(true, &ping(true, 8, 7), 0).unwrap();
    assert_eq!(r.send(false, &ping(false, 0, 7), 0), Ok(vec![r.pa]));
    assert_eq!(
        r.send(false, &ping(false, 0, 8), 0),
        Err(DropReason::Unsolicited)
    );
    // B may not ping A.
    assert_eq!(
        r.send(false, &ping(false, 8, 9), 0),
        Err(DropReason::DefaultDrop)
    );
}

#[test]
fn reject_answers_with_rst_and_icmp() {
    let mut r = Rig::new();
    r.dp.add_rule(RuleSpec {
        priority: 1,
        action: Action::Reject,
        matches: RuleMatch::default(),
    });
    let syn = tcp(true, 5555, 22, SYN, b"");
    assert_eq!(r.send(true, &syn, 0), Err(DropReason::RuleReject));
    // The RST goes back out of A's port, from B to A, acknowledging the SYN.
    assert_eq!(r.out.len(), 1);
    assert_eq!(r.out[0].port, r.pa);
    let p = parse(r.out[0].bytes(&syn)).unwrap();
    assert_eq!((p.src, p.dst), (MB, MA));
    let L3::Ip(ip) = p.l3 else { panic!() };
    let L4::Tcp(t) = ip.l4 else { panic!() };
    assert_eq!((ip.src, ip.dst, t.sport, t.dport), (b(), a(), 22, 5555));
    assert_eq!((t.flags, t.ack), (RST | ACK, 1001));
    // UDP gets ICMP administratively prohibited quoting the datagram.
    let u = udp(true, 4000, 53);
    r.send(true, &u, 0).unwrap_err();
    let p = parse(r.out[0].bytes(&u)).unwrap();
    let L3::Ip(ip) = p.l3 else { panic!() };
    assert_eq!(
        ip.l4,
        L4::Icmp {
            ty: 3,
            code: 13,
            rest: [0; 4]
        }
    );
    // Never answer a RST.
    let rst = tcp(true, 5555, 22, RST, b"");
    let pr = parse(&rst).unwrap();
    let L3::Ip(ip) = &pr.l3 else { panic!() };
    assert_eq!(reject_answer(&rst, &pr, ip), None);
    assert_eq!(r.dp.stats().rejects_sent, 2);
}

#[test]
fn trunk_tags_and_rate_limits() {
    let mut dp = Dataplane::new(DataplaneConfig {
        allow_non_ip: true,
        ..Default::default()
    });
    let acc = dp
        .add_port(
            PortConfig {
                name: "acc".into(),
                kind: PortKind::Access(NetworkId::Vlan(20)),
                rate_limit: Some(RateLimit {
                    bytes_per_sec: 1000,
                    burst_bytes: 200,
                }),
            },
            0,
        )
        .unwrap();
    let trunk = dp
        .add_port(
            PortConfig {
                name: "trunk".into(),
                kind: PortKind::Trunk(vec![20, 30]),
                rate_limit: None,
            },
            0,
        )
        .unwrap();
    assert!(dp
        .add_port(
            PortConfig {
                name: "trunk".into(),
                kind: PortKind::Trunk(vec![]),
                rate_limit: None
            },
            0
        )
        .is_err());
    let mut out = Vec::new();
    // Untagged from the access port leaves the trunk tagged 20.
    let f = build::ethernet(MB, MA, None, 0x88b5, &[1u8; 50]);
    dp.process(acc, &f, 0, &mut out).unwrap();
    let p = parse(out[0].bytes(&f)).unwrap();
    assert_eq!((out[0].port, p.vlan.map(|v| v.vid)), (trunk, Some(20)));
    // Tagged 20 from the trunk leaves the access port untagged; tag 30 has no other member; 40 is refused.
    out.clear();
    let t = build::ethernet(MA, MB, Some(20), 0x88b5, &[2u8; 50]);
    dp.process(trunk, &t, 0, &mut out).unwrap();
    assert_eq!(
        out[0].bytes(&t),
        &build::ethernet(MA, MB, None, 0x88b5, &[2u8; 50])[..]
    );
    let t30 = build::ethernet(MA, MB, Some(30), 0x88b5, &[2u8; 50]);
    assert_eq!(
        dp.process(trunk, &t30, 0, &mut out),
        Err(DropReason::NoDestination)
    );
    let t40 = build::ethernet(MA, MB, Some(40), 0x88b5, &[2u8; 50]);
    assert_eq!(
        dp.process(trunk, &t40, 0, &mut out),
        Err(DropReason::VlanNotAllowed)
    );
    // The access port's bucket (200 bytes) holds three 64-byte frames, and refills at 1000 B/s.
    assert_eq!(dp.process(acc, &f, 0, &mut out).unwrap(), 1);
    assert_eq!(dp.process(acc, &f, 0, &mut out).unwrap(), 1);
    assert_eq!(
        dp.process(acc, &f, 0, &mut out),
        Err(DropReason::RateLimited)
    );
    assert!(dp.process(acc, &f, SEC / 10, &mut out).is_ok());
}

#[test]
fn vxlan_joins_two_dataplanes() {
    let vtep = |n: u8| (Ipv4Addr::new(192, 168, 50, n), MacAddr([2, 0, 0, 0, 9, n]));
    let make = |me: u8, peer: u8| {
        let mut dp = Dataplane::new(DataplaneConfig::default());
        let host = dp
            .add_port(
                PortConfig {
                    name: "host".into(),
                    kind: PortKind::Access(NetworkId::Vni(5000)),
                    rate_limit: None,
                },
                0,
            )
            .unwrap();
        let (ip, mac) = vtep(me);
        let up = dp
            .add_port(
                PortConfig {
                    name: "uplink".into(),
                    kind: PortKind::Uplink {
                        local_ip: ip,
                        local_mac: mac,
                    },
                    rate_limit: None,
                },
                0,
            )
            .unwrap();
        let (pip, pmac) = vtep(peer);
        dp.add_tunnel(TunnelConfig {
            network: NetworkId::Vni(5000),
            vni: 5000,
            uplink: up,
            remote_ip: pip,
            remote_mac: pmac,
        })
        .unwrap();
        dp.add_rule(RuleSpec {
            priority: 1,
            action: Action::Allow,
            matches: RuleMatch {
                port: Some(host),
                direction: None,
                ..Default::default()
            },
        });
        (dp, host, up)
    };
    let (mut d1, h1, u1) = make(1, 2);
    let (mut d2, h2, u2) = make(2, 1);
    assert!(d1.remove_port(u1).is_err(), "uplink in use by a tunnel");
    let mut out = Vec::new();
    // A (behind d1) opens TCP to B (behind d2).
    let syn = tcp(true, 5555, 80, SYN, b"");
    d1.process(h1, &syn, 0, &mut out).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].port, u1);
    let wire = out[0].bytes(&syn).to_vec();
    out.clear();
    d2.process(u2, &wire, 0, &mut out).unwrap();
    assert_eq!(out[0].port, h2);
    assert_eq!(out[0].bytes(&wire), &syn[..]);
    // B's answer crosses back: both sides track the connection.
    let synack = tcp(false, 80, 5555, SYN | ACK, b"");
    out.clear();
    d2.process(h2, &synack, 0, &mut out).unwrap();
    let wire = out[0].bytes(&synack).to_vec();
    out.clear();
    d1.process(u1, &wire, 0, &mut out).unwrap();
    assert_eq!((out[0].port, out[0].bytes(&wire)), (h1, &synack[..]));
    // Uplink traffic that is not for a tunnel is refused.
    assert_eq!(
        d1.process(u1, &syn, 0, &mut out),
        Err(DropReason::NotForTunnel)
    );
    // d1 learned B's MAC behind the tunnel.
    assert!(d1
        .mac_table(0)
        .iter()
        .any(|(n, m, _, _)| *n == NetworkId::Vni(5000) && *m == MB));
}

#[test]
fn icmp_errors_pass_only_for_tracked_flows() {
    let mut r = Rig::new();
    r.dp.add_rule(RuleSpec {
        priority: 1,
        action: Action::Allow,
        matches: RuleMatch {
            port: Some(r.pa),
            direction: Some(Direction::In),
            proto: Some(IPPROTO_UDP),
            ..Default::default()
        },
    });
    let unreachable = |quoted: &[u8]| {
        // B answers A's datagram with ICMP port unreachable quoting it.
        let ip_part = &quoted[14..14 + 28];
        let m = build::icmp(b(), a(), 3, 3, [0; 4], ip_part);
        build::ethernet(
            MA,
            MB,
            None,
            ETH_P_IPV4,
            &build::ip(b(), a(), IPPROTO_ICMP, &m),
        )
    };
    let d = udp(true, 4000, 53);
    // Not tracked yet: the error is unsolicited.
    assert_eq!(
        r.send(false, &unreachable(&d), 0),
        Err(DropReason::Unsolicited)
    );
    r.send(true, &d, 0).unwrap();
    assert_eq!(r.send(false, &unreachable(&d), 0), Ok(vec![r.pa]));
    // An error quoting another flow is still refused.
    assert_eq!(
        r.send(false, &unreachable(&udp(true, 4001, 53)), 0),
        Err(DropReason::Unsolicited)
    );
}

#[test]
fn ipv6_neighbour_discovery_and_tracked_tcp() {
    use std::net::Ipv6Addr;
    let mut r = Rig::new();
    let (sa, sb): (Ipv6Addr, Ipv6Addr) = ("fd00::a".parse().unwrap(), "fd00::b".parse().unwrap());
    let (ia, ib) = (IpAddr::V6(sa), IpAddr::V6(sb));
    r.dp.add_rule(RuleSpec {
        priority: 1,
        action: Action::Allow,
        matches: RuleMatch {
            src: Some("fd00::/64".parse().unwrap()),
            dst: Some(Cidr::new(ib, 128).unwrap()),
            proto: Some(IPPROTO_TCP),
            dport: Some(PortRange { lo: 22, hi: 22 }),
            ..Default::default()
        },
    });
    let v6 = |from_a: bool, proto: u8, l4: Vec<u8>| {
        let (sm, dm, s, d) = if from_a {
            (MA, MB, sa, sb)
        } else {
            (MB, MA, sb, sa)
        };
        build::ethernet(
            dm,
            sm,
            None,
            engine::net::packet::ETH_P_IPV6,
            &build::ipv6(s, d, proto, &l4),
        )
    };
    // Neighbour solicitation (135) passes without a rule, to the multicast group.
    let ns = build::icmp(ia, ib, 135, 0, [0; 4], &sb.octets());
    let f = v6(true, 58, ns);
    let mut f2 = f.clone();
    f2[..6].copy_from_slice(&[0x33, 0x33, 0xff, 0, 0, 0x0b]);
    assert_eq!(r.send(true, &f2, 0), Ok(vec![r.pb]));
    // TCP over IPv6: A opens to B:22, the reply passes; B's SYN to A does not.
    let syn = v6(true, 6, build::tcp(ia, ib, 3333, 22, 1, 0, SYN, b""));
    assert_eq!(r.send(true, &syn, 0), Ok(vec![r.pb]));
    let synack = v6(false, 6, build::tcp(ib, ia, 22, 3333, 1, 2, SYN | ACK, b""));
    assert_eq!(r.send(false, &synack, 0), Ok(vec![r.pa]));
    let rev = v6(false, 6, build::tcp(ib, ia, 3333, 22, 1, 0, SYN, b""));
    assert_eq!(r.send(false, &rev, 0), Err(DropReason::DefaultDrop));
    // Echo over ICMPv6 is not allowed by any rule.
    let echo = v6(true, 58, build::icmp(ia, ib, 128, 0, [0, 1, 0, 1], b"x"));
    assert_eq!(r.send(true, &echo, 0), Err(DropReason::DefaultDrop));
}
