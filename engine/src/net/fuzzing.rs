//! Entry points shared by the cargo-fuzz targets and the regression replay test, so
//! a crash found by fuzzing is replayed by `cargo test` through the same code.

use std::net::Ipv4Addr;

use super::dataplane::{Dataplane, DataplaneConfig, PortConfig, PortKind, TunnelConfig};
use super::packet::{parse, MacAddr};
use super::rules::{Action, RuleMatch, RuleSpec};
use super::switch::NetworkId;

/// Parses `data` as a frame, then runs it through a small data plane from each kind
/// of port (access, trunk, uplink with a tunnel) with allow, reject and default-drop
/// outcomes, so the firewall, reject builder and VXLAN paths see hostile bytes too.
/// The first byte picks the ingress port; the rest is the frame. Returns how many
/// frames the pipeline sent (for tests of the harness itself).
pub fn net_parse(data: &[u8]) -> usize {
    let _ = parse(data);
    let Some((&sel, frame)) = data.split_first() else {
        return 0;
    };
    let mut dp = Dataplane::new(DataplaneConfig::default());
    let mut ports = Vec::new();
    let net = NetworkId::Vlan(7);
    for (name, kind) in [
        ("a", PortKind::Access(net)),
        ("b", PortKind::Access(net)),
        ("t", PortKind::Trunk(vec![7, 8])),
        (
            "u",
            PortKind::Uplink {
                local_ip: Ipv4Addr::new(192, 0, 2, 1),
                local_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            },
        ),
    ] {
        let cfg = PortConfig {
            name: name.into(),
            kind,
            rate_limit: None,
        };
        if let Ok(id) = dp.add_port(cfg, 0) {
            ports.push(id);
        }
    }
    let Some(&uplink) = ports.get(3) else {
        return 0;
    };
    let _ = dp.add_tunnel(TunnelConfig {
        network: net,
        vni: u32::from(sel),
        uplink,
        remote_ip: Ipv4Addr::new(192, 0, 2, 2),
        remote_mac: MacAddr([2, 0, 0, 0, 0, 2]),
    });
    let action = match sel >> 6 {
        0 => Action::Allow,
        1 => Action::Reject,
        _ => Action::Drop,
    };
    dp.add_rule(RuleSpec {
        priority: 1,
        action,
        matches: RuleMatch::default(),
    });
    let port = ports[usize::from(sel) % ports.len()];
    let mut out = Vec::new();
    let mut sent = 0;
    // Twice: the second time the MAC table and connection table are warm.
    for now in [0, 1] {
        out.clear();
        let _ = dp.process(port, frame, now, &mut out);
        sent += out.len();
        for tx in &out {
            let _ = parse(tx.bytes(frame));
        }
    }
    let _ = dp.stats();
    sent
}
