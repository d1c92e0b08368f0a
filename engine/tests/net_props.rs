//! Property tests of the network module against small reference models:
//! - the connection tracker against an independent table of the TCP state machine
//!   documented in docs/network.md, with timeouts;
//! - the rule matcher (protocol index + decision cache, under rule churn) against a
//!   naive linear walk;
//! - the parser against the builders (round trips) and on arbitrary or damaged bytes.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use engine::net::conntrack::{ConnTrack, FlowKey, Side, TcpState, Timeouts, Track, TrackInfo};
use engine::net::packet::{build, parse, tcp_flags::*, Fragment, ETH_P_IPV4, ETH_P_IPV6, L3, L4};
use engine::net::rules::{
    naive_match, Action, Cidr, Direction, MatchKey, PortRange, RuleMatch, RuleSet, RuleSpec,
};
use engine::net::{MacAddr, NetworkId};
use proptest::prelude::*;

const SEC: u64 = 1_000_000_000;

// ---------------------------------------------------------------- TCP reference model

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum M {
    SynSent,
    SynRecv,
    Est,
    FinWait(Side),
    CloseWait(Side),
    TimeWait,
    Closed,
}

fn model_timeout(t: &Timeouts, m: M) -> u64 {
    match m {
        M::SynSent => t.tcp_syn_sent,
        M::SynRecv => t.tcp_syn_recv,
        M::Est => t.tcp_established,
        M::FinWait(_) | M::CloseWait(_) => t.tcp_closing,
        M::TimeWait => t.tcp_time_wait,
        M::Closed => t.tcp_closed,
    }
}

fn other(s: Side) -> Side {
    if s == Side::Orig {
        Side::Reply
    } else {
        Side::Orig
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Out {
    Pass(M),
    Invalid,
    Reopen,
}

/// The documented state machine, written as a table over (state, side, flags).
fn model_step(m: M, side: Side, f: u8) -> Out {
    let has = |b| f & b != 0;
    let pure_syn = has(SYN) && !has(ACK) && !has(RST) && !has(FIN);
    let synack = has(SYN) && has(ACK) && !has(FIN) && !has(RST);
    if matches!(m, M::Closed | M::TimeWait) && side == Side::Orig && pure_syn {
        return Out::Reopen;
    }
    if m == M::Closed {
        return Out::Invalid;
    }
    if has(RST) {
        return Out::Pass(M::Closed);
    }
    match (m, side) {
        (M::SynSent, Side::Orig) if pure_syn => Out::Pass(M::SynSent),
        (M::SynSent, Side::Reply) if synack => Out::Pass(M::SynRecv),
        (M::SynSent, _) => Out::Invalid,
        (M::SynRecv, Side::Reply) if synack => Out::Pass(M::SynRecv),
        (M::SynRecv, Side::Orig) if pure_syn => Out::Pass(M::SynRecv),
        (M::SynRecv, Side::Orig) if has(ACK) && !has(SYN) => {
            if has(FIN) {
                Out::Pass(M::FinWait(Side::Orig))
            } else {
                Out::Pass(M::Est)
            }
        }
        (M::SynRecv, _) => Out::Invalid,
        _ if has(SYN) => Out::Invalid,
        (M::Est, s) if has(FIN) => Out::Pass(M::FinWait(s)),
        (M::Est, _) => Out::Pass(M::Est),
        (M::FinWait(c), s) if s == other(c) && has(FIN) => Out::Pass(M::TimeWait),
        (M::FinWait(c), s) if s == other(c) && has(ACK) => Out::Pass(M::CloseWait(c)),
        (M::CloseWait(c), s) if s == other(c) && has(FIN) => Out::Pass(M::TimeWait),
        (m, _) => Out::Pass(m),
    }
}

fn to_model(t: engine::net::conntrack::TcpTrack) -> M {
    match t.state {
        TcpState::SynSent => M::SynSent,
        TcpState::SynRecv => M::SynRecv,
        TcpState::Established => M::Est,
        TcpState::FinWait => M::FinWait(t.fin_side.unwrap()),
        TcpState::CloseWait => M::CloseWait(t.fin_side.unwrap()),
        TcpState::TimeWait => M::TimeWait,
        TcpState::Closed => M::Closed,
    }
}

fn flags_strategy() -> impl Strategy<Value = u8> {
    prop_oneof![
        Just(SYN),
        Just(SYN | ACK),
        Just(ACK),
        Just(ACK | PSH),
        Just(FIN | ACK),
        Just(FIN),
        Just(RST),
        Just(RST | ACK),
        any::<u8>(),
    ]
}

fn step_strategy() -> impl Strategy<Value = (bool, u8, u64)> {
    (
        any::<bool>(),
        flags_strategy(),
        prop_oneof![Just(0u64), 1..5 * SEC, 50 * SEC..200 * SEC],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn conntrack_follows_the_tcp_model(steps in prop::collection::vec(step_strategy(), 1..40)) {
        let t = Timeouts::default();
        let key = FlowKey {
            network: NetworkId::Vlan(1),
            proto: 6,
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            sport: 1000,
            dport: 80,
        };
        let mut ct = ConnTrack::new(t, 16);
        let mut model: Option<(M, u64)> = None;
        let mut now = 0u64;
        for (from_orig, flags, dt) in steps {
            now += dt;
            let side = if from_orig { Side::Orig } else { Side::Reply };
            let p = TrackInfo {
                key: if from_orig { key } else { key.reversed() },
                tcp_flags: Some(flags),
                echo_request: None,
                len: 60,
            };
            // The model's answer.
            if let Some((m, last)) = model {
                if now - last >= model_timeout(&t, m) {
                    model = None;
                }
            }
            let expect = match model {
                None => Track::New,
                Some((m, _)) => match model_step(m, side, flags) {
                    Out::Pass(n) => {
                        model = Some((n, now));
                        Track::Known { side, rule: None }
                    }
                    Out::Invalid => Track::Invalid,
                    Out::Reopen => {
                        model = None;
                        Track::New
                    }
                },
            };
            let got = ct.track(&p, now);
            prop_assert_eq!(got, expect, "{:?} flags {:#x} at {}", side, flags, now);
            // A rule allows every SYN from the originator.
            if got == Track::New && from_orig && ConnTrack::may_open(&p) {
                prop_assert!(ct.open(&p, None, now));
                model = Some((M::SynSent, now));
            }
            prop_assert_eq!(
                ct.get(&key, now).and_then(|c| c.tcp).map(to_model),
                model.map(|(m, _)| m)
            );
        }
    }
}

// ---------------------------------------------------------------- rule matcher

fn cidr_strategy() -> impl Strategy<Value = Cidr> {
    prop_oneof![
        (0u8..4, prop_oneof![Just(8u8), Just(24), Just(32), Just(0)]).prop_map(|(h, l)| Cidr::new(
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, h)),
            l
        )
        .unwrap()),
        (0u16..3, prop_oneof![Just(64u8), Just(128)]).prop_map(|(h, l)| Cidr::new(
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, h)),
            l
        )
        .unwrap()),
    ]
}

fn range_strategy() -> impl Strategy<Value = PortRange> {
    (0u16..8, 0u16..4).prop_map(|(lo, w)| PortRange { lo, hi: lo + w })
}

fn spec_strategy() -> impl Strategy<Value = RuleSpec> {
    (
        -3i32..3,
        prop_oneof![
            Just(Action::Allow),
            Just(Action::Drop),
            Just(Action::Reject)
        ],
        prop::option::of(1u32..4),
        prop::option::of(prop_oneof![Just(Direction::In), Just(Direction::Out)]),
        prop::option::of(prop_oneof![
            Just(NetworkId::Vlan(1)),
            Just(NetworkId::Vni(9))
        ]),
        prop::option::of(cidr_strategy()),
        prop::option::of(cidr_strategy()),
        prop::option::of(prop_oneof![
            Just(6u8),
            Just(17),
            Just(1),
            Just(58),
            Just(47)
        ]),
        prop::option::of(range_strategy()),
        prop::option::of(range_strategy()),
    )
        .prop_map(
            |(priority, action, port, direction, network, src, dst, proto, sport, dport)| {
                RuleSpec {
                    priority,
                    action,
                    matches: RuleMatch {
                        port,
                        direction,
                        network,
                        src,
                        dst,
                        proto,
                        sport,
                        dport,
                    },
                }
            },
        )
}

fn addr_strategy() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u8..5).prop_map(|h| IpAddr::V4(Ipv4Addr::new(10, 0, 0, h))),
        Just(IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1))),
        (0u16..3).prop_map(|h| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, h))),
    ]
}

fn key_strategy() -> impl Strategy<Value = MatchKey> {
    (
        1u32..4,
        1u32..4,
        prop_oneof![Just(NetworkId::Vlan(1)), Just(NetworkId::Vni(9))],
        addr_strategy(),
        addr_strategy(),
        prop_oneof![Just(6u8), Just(17), Just(1), Just(58), Just(47)],
        0u16..12,
        0u16..12,
    )
        .prop_map(
            |(in_port, out_port, network, src, dst, proto, sport, dport)| MatchKey {
                in_port,
                out_port,
                network,
                src,
                dst,
                proto,
                sport,
                dport,
            },
        )
}

#[derive(Debug, Clone)]
enum Op {
    Add(RuleSpec),
    Remove(usize),
    Move(usize, i32),
    Lookup(MatchKey),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => spec_strategy().prop_map(Op::Add),
        1 => any::<usize>().prop_map(Op::Remove),
        1 => (any::<usize>(), -3i32..3).prop_map(|(i, p)| Op::Move(i, p)),
        8 => key_strategy().prop_map(Op::Lookup),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn matcher_agrees_with_a_linear_walk(ops in prop::collection::vec(op_strategy(), 1..150), cache in 1usize..64) {
        let mut rs = RuleSet::new(cache);
        let mut reference: Vec<(u64, RuleSpec)> = Vec::new();
        let mut seen = Vec::new();
        for op in ops {
            match op {
                Op::Add(s) => {
                    let id = rs.add(s.clone());
                    reference.push((id, s));
                }
                Op::Remove(i) if !reference.is_empty() => {
                    let (id, _) = reference.remove(i % reference.len());
                    rs.remove(id).unwrap();
                }
                Op::Move(i, p) if !reference.is_empty() => {
                    let n = reference.len();
                    let r = &mut reference[i % n];
                    r.1.priority = p;
                    rs.set_priority(r.0, p).unwrap();
                }
                Op::Lookup(k) => {
                    seen.push(k);
                    // Replay an earlier key too, so cached decisions are checked after churn.
                    let again = seen[seen.len() / 2];
                    for k in [k, again] {
                        prop_assert_eq!(rs.lookup(&k), naive_match(&reference, &k), "{:?}", k);
                    }
                }
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------- parser

#[derive(Debug, Clone)]
struct Spec {
    vlan: Option<u16>,
    v6: bool,
    l4: u8,
    sport: u16,
    dport: u16,
    flags: u8,
    seq: u32,
    v4_opts: usize,
    v6_ext: Vec<u8>,
    payload: Vec<u8>,
}

fn parser_spec() -> impl Strategy<Value = Spec> {
    (
        prop::option::of(1u16..4095),
        any::<bool>(),
        prop_oneof![Just(6u8), Just(17), Just(1), Just(99)],
        any::<u16>(),
        any::<u16>(),
        any::<u8>(),
        any::<u32>(),
        0usize..11,
        prop::collection::vec(prop_oneof![Just(0u8), Just(60), Just(43)], 0..4),
        prop::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(
            |(vlan, v6, l4, sport, dport, flags, seq, v4_opts, v6_ext, payload)| Spec {
                vlan,
                v6,
                l4,
                sport,
                dport,
                flags,
                seq,
                v4_opts: v4_opts * 4,
                v6_ext,
                payload,
            },
        )
}

fn build_spec(s: &Spec) -> Vec<u8> {
    let (src, dst) = if s.v6 {
        (
            IpAddr::V6("fd00::1".parse().unwrap()),
            IpAddr::V6("fd00::2".parse().unwrap()),
        )
    } else {
        (
            IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            IpAddr::V4(Ipv4Addr::new(10, 3, 2, 1)),
        )
    };
    let proto = match (s.l4, s.v6) {
        (1, true) => 58,
        (p, _) => p,
    };
    let l4 = match proto {
        6 => build::tcp(src, dst, s.sport, s.dport, s.seq, 0, s.flags, &s.payload),
        17 => build::udp(src, dst, s.sport, s.dport, &s.payload),
        1 | 58 => build::icmp(src, dst, 8, 0, [1, 2, 3, 4], &s.payload),
        _ => s.payload.clone(),
    };
    let (ip, et) = match (src, dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (
            build::ipv4_full(a, b, proto, 64, 1, 0, &vec![1u8; s.v4_opts], &l4),
            ETH_P_IPV4,
        ),
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let ext: Vec<(u8, Vec<u8>)> = s.v6_ext.iter().map(|t| (*t, vec![0u8; 6])).collect();
            (build::ipv6_full(a, b, proto, 64, &ext, &l4), ETH_P_IPV6)
        }
        _ => unreachable!(),
    };
    build::ethernet(
        MacAddr([2, 0, 0, 0, 0, 2]),
        MacAddr([2, 0, 0, 0, 0, 1]),
        s.vlan,
        et,
        &ip,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn parser_round_trips_the_builders(s in parser_spec()) {
        let f = build_spec(&s);
        let p = parse(&f).unwrap();
        prop_assert_eq!(p.vlan.map(|v| v.vid), s.vlan);
        prop_assert_eq!(p.src, MacAddr([2, 0, 0, 0, 0, 1]));
        let L3::Ip(ip) = p.l3 else { panic!("not IP") };
        prop_assert_eq!(ip.fragment, Fragment::None);
        prop_assert_eq!(ip.end, f.len());
        prop_assert_eq!(ip.has_options, if s.v6 { !s.v6_ext.is_empty() } else { s.v4_opts > 0 });
        match ip.l4 {
            L4::Tcp(t) => {
                prop_assert_eq!((t.sport, t.dport, t.flags, t.seq), (s.sport, s.dport, s.flags, s.seq));
                prop_assert_eq!(ip.end - ip.l4_offset - t.header_len, s.payload.len());
            }
            L4::Udp { sport, dport } => prop_assert_eq!((sport, dport), (s.sport, s.dport)),
            L4::Icmp { ty, rest, .. } => prop_assert_eq!((ty, rest), (8, [1, 2, 3, 4])),
            L4::Other => prop_assert_eq!(ip.proto, 99),
            L4::Fragment => prop_assert!(false, "fragment"),
        }
        // Every truncation is refused or parsed, never a panic; damage likewise.
        for cut in 0..f.len() {
            let _ = parse(&f[..cut]);
        }
    }

    #[test]
    fn damaged_frames_never_panic(s in parser_spec(), hits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut f = build_spec(&s);
        for (at, v) in hits {
            let n = f.len();
            f[at % n] = v;
        }
        let _ = parse(&f);
        let mut with_port = vec![0u8];
        with_port.extend_from_slice(&f);
        for sel in [0u8, 1, 2, 3, 0x41, 0x82] {
            with_port[0] = sel;
            let _ = engine::net::fuzzing::net_parse(&with_port);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse(&data);
        let _ = engine::net::fuzzing::net_parse(&data);
    }
}
