//! The network module's configuration as an operator states it and dpud stores it:
//! ports, firewall rules and VXLAN tunnels by name, checked here before anything is
//! applied, so every refusal names the field and what to do.
//!
//! The data plane identifies ports by number and rules by id; the stored document
//! identifies ports and tunnels by name (they share one namespace, because a rule may
//! be about either) and keeps rule ids, so that a rule keeps its id across restarts and
//! `dpuctl net fw rule delete 7` means the same rule tomorrow. The document is JSON in
//! dpud's store (one record, written in one transaction per change).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::packet::MacAddr;
use super::ratelimit::RateLimit;
use super::rules::{Action, Cidr, Direction, PortRange, RuleMatch, RuleSpec};
use super::switch::NetworkId;

/// Why a configuration request is refused or failed. The API maps each to a gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetConfigError {
    /// The request is wrong in itself (INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(String),
    /// A named port, tunnel or rule does not exist (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// The name or tunnel is taken (ALREADY_EXISTS).
    #[error("{0}")]
    Exists(String),
    /// Valid, but the current configuration refuses it (FAILED_PRECONDITION).
    #[error("{0}")]
    Precondition(String),
    /// The network module is not running (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a store failure (INTERNAL).
    #[error("{0}")]
    Internal(String),
}

type Res<T> = Result<T, NetConfigError>;

fn invalid<T>(msg: String) -> Res<T> {
    Err(NetConfigError::Invalid(msg))
}

/// `vlan:N` (1..=4094) or `vni:N` (0..=16777215).
pub fn parse_network(s: &str) -> Res<NetworkId> {
    let bad = || {
        NetConfigError::Invalid(format!(
            "network {s:?} is not valid: write vlan:N (N from 1 to 4094) or vni:N (N from 0 to 16777215)"
        ))
    };
    let (kind, n) = s.split_once(':').ok_or_else(bad)?;
    match kind {
        "vlan" => {
            let v: u16 = n.parse().map_err(|_| bad())?;
            if !(1..=4094).contains(&v) {
                return Err(bad());
            }
            Ok(NetworkId::Vlan(v))
        }
        "vni" => {
            let v: u32 = n.parse().map_err(|_| bad())?;
            if v > 0xff_ffff {
                return Err(bad());
            }
            Ok(NetworkId::Vni(v))
        }
        _ => Err(bad()),
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(what: &str, s: &str) -> Res<MacAddr> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut m = [0u8; 6];
    if parts.len() != 6 {
        return invalid(format!(
            "{what} {s:?} is not a MAC address: write six hex bytes such as 02:00:00:00:00:01"
        ));
    }
    for (i, p) in parts.iter().enumerate() {
        m[i] = u8::from_str_radix(p, 16).map_err(|_| {
            NetConfigError::Invalid(format!(
                "{what} {s:?} is not a MAC address: write six hex bytes such as 02:00:00:00:00:01"
            ))
        })?;
    }
    let mac = MacAddr(m);
    if mac.is_multicast() {
        return invalid(format!(
            "{what} {s:?} is a multicast or broadcast address; a station's MAC is unicast"
        ));
    }
    Ok(mac)
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: MacAddr) -> String {
    let b = m.0;
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5]
    )
}

fn parse_ipv4(what: &str, s: &str) -> Res<Ipv4Addr> {
    s.parse().map_err(|_| {
        NetConfigError::Invalid(format!(
            "{what} {s:?} is not an IPv4 address (the VXLAN underlay is IPv4)"
        ))
    })
}

/// How a port attaches to networks, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum PortMode {
    /// Untagged frames belong to `network` (`vlan:N` or `vni:N`).
    Access {
        /// The network.
        network: String,
    },
    /// 802.1Q-tagged frames of these VLANs.
    Trunk {
        /// VLAN ids.
        vlans: Vec<u16>,
    },
    /// The VXLAN underlay.
    Uplink {
        /// This VTEP's IPv4 address.
        local_ip: String,
        /// This VTEP's MAC (the device's).
        local_mac: String,
    },
}

/// A port: a kernel network device attached to the switch. (No `deny_unknown_fields`:
/// serde does not support it with a flattened field.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortDoc {
    /// The kernel device (also the port's name).
    pub name: String,
    /// Attachment.
    #[serde(flatten)]
    pub mode: PortMode,
    /// Ingress rate limit: sustained bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_bytes_per_sec: Option<u64>,
    /// Ingress rate limit: burst in bytes (default: 1/10 s of the rate, at least 64 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_bytes: Option<u64>,
}

/// A firewall rule, as stored (ports and tunnels by name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RuleDoc {
    /// Stable id (assigned on add).
    pub id: u64,
    /// Lower runs first.
    pub priority: i32,
    /// allow, drop or reject.
    pub action: String,
    /// A port or tunnel name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// in or out (with `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// vlan:N or vni:N.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Source CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    /// Destination CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    /// tcp, udp, icmp, icmpv6 or a protocol number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Source port or range (`80`, `1024-65535`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sport: Option<String>,
    /// Destination port or range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dport: Option<String>,
}

/// A VXLAN tunnel to a remote VTEP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelDoc {
    /// Name (shares the namespace of ports).
    pub name: String,
    /// The local network carried (`vlan:N` or `vni:N`).
    pub network: String,
    /// VNI on the wire.
    pub vni: u32,
    /// The uplink port.
    pub uplink: String,
    /// The remote VTEP's IPv4 address.
    pub remote_ip: String,
    /// The next hop's MAC towards it.
    pub remote_mac: String,
}

/// The whole stored configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NetDoc {
    /// Document schema (1).
    #[serde(default = "one")]
    pub schema_version: u32,
    /// Ports in the order added.
    #[serde(default)]
    pub ports: Vec<PortDoc>,
    /// Rules in the order added.
    #[serde(default)]
    pub rules: Vec<RuleDoc>,
    /// Tunnels in the order added.
    #[serde(default)]
    pub tunnels: Vec<TunnelDoc>,
    /// The id the next rule gets.
    #[serde(default = "one64")]
    pub next_rule_id: u64,
}

fn one() -> u32 {
    1
}

fn one64() -> u64 {
    1
}

/// The schema this build reads and writes.
pub const NET_DOC_SCHEMA: u32 = 1;

impl NetDoc {
    /// An empty configuration.
    #[must_use]
    pub fn new() -> Self {
        Self {
            schema_version: NET_DOC_SCHEMA,
            ports: Vec::new(),
            rules: Vec::new(),
            tunnels: Vec::new(),
            next_rule_id: 1,
        }
    }

    /// Whether a port or tunnel has this name.
    #[must_use]
    pub fn has_name(&self, name: &str) -> bool {
        self.ports.iter().any(|p| p.name == name) || self.tunnels.iter().any(|t| t.name == name)
    }

    /// Rule ids that name `port`.
    #[must_use]
    pub fn rules_on(&self, port: &str) -> Vec<u64> {
        self.rules
            .iter()
            .filter(|r| r.port.as_deref() == Some(port))
            .map(|r| r.id)
            .collect()
    }

    /// Checks a new port against itself and this configuration.
    pub fn check_port(&self, p: &PortDoc) -> Res<()> {
        check_device_name(&p.name)?;
        if self.has_name(&p.name) {
            return Err(NetConfigError::Exists(format!(
                "a port or tunnel named {:?} exists (dpuctl net port list)",
                p.name
            )));
        }
        port_kind(&p.mode)?;
        rate_limit(p)?;
        Ok(())
    }

    /// Checks that `name` may be removed; returns whether it is a port (else a tunnel).
    pub fn check_remove(&self, name: &str, want_tunnel: bool) -> Res<()> {
        let (exists, what) = if want_tunnel {
            (self.tunnels.iter().any(|t| t.name == name), "VXLAN tunnel")
        } else {
            (self.ports.iter().any(|p| p.name == name), "port")
        };
        if !exists {
            return Err(NetConfigError::NotFound(format!(
                "no {what} named {name:?} ({})",
                if want_tunnel {
                    "dpuctl net vxlan list"
                } else {
                    "dpuctl net port list"
                }
            )));
        }
        let rules = self.rules_on(name);
        if !rules.is_empty() {
            let ids: Vec<String> = rules.iter().map(u64::to_string).collect();
            return Err(NetConfigError::Precondition(format!(
                "{what} {name:?} is named by firewall rule{} {}; delete {} first (dpuctl net fw rule delete ID)",
                if ids.len() > 1 { "s" } else { "" },
                ids.join(", "),
                if ids.len() > 1 { "them" } else { "it" }
            )));
        }
        if !want_tunnel {
            let tunnels: Vec<&str> = self
                .tunnels
                .iter()
                .filter(|t| t.uplink == name)
                .map(|t| t.name.as_str())
                .collect();
            if !tunnels.is_empty() {
                return Err(NetConfigError::Precondition(format!(
                    "port {name:?} is the uplink of VXLAN tunnel {}; remove the tunnel first (dpuctl net vxlan remove NAME)",
                    tunnels.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Checks a new rule (its id is assigned by the caller) and returns its spec with
    /// port names still unresolved.
    pub fn check_rule(&self, r: &RuleDoc) -> Res<()> {
        if let Some(p) = &r.port {
            if !self.has_name(p) {
                return Err(NetConfigError::NotFound(format!(
                    "no port or tunnel named {p:?} for the rule's --port (dpuctl net port list, dpuctl net vxlan list)"
                )));
            }
        }
        rule_spec(r, |_| Some(0))?;
        Ok(())
    }

    /// Checks a new tunnel.
    pub fn check_tunnel(&self, t: &TunnelDoc) -> Res<()> {
        check_device_name(&t.name).map_err(|_| {
            NetConfigError::Invalid(format!(
                "tunnel name {:?} is not valid: 1 to 15 letters, digits, '-', '_' or '.'",
                t.name
            ))
        })?;
        if self.has_name(&t.name) {
            return Err(NetConfigError::Exists(format!(
                "a port or tunnel named {:?} exists",
                t.name
            )));
        }
        parse_network(&t.network)?;
        if t.vni > 0xff_ffff {
            return invalid(format!(
                "VNI {} is not valid: a VNI has 24 bits (0 to 16777215)",
                t.vni
            ));
        }
        let remote = parse_ipv4("remote IP", &t.remote_ip)?;
        parse_mac("remote MAC", &t.remote_mac)?;
        match self.ports.iter().find(|p| p.name == t.uplink) {
            None => {
                return Err(NetConfigError::NotFound(format!(
                    "no port named {:?} for the tunnel's uplink; add it first with dpuctl net port add {} --uplink --local-ip IP --local-mac MAC",
                    t.uplink, t.uplink
                )))
            }
            Some(PortDoc {
                mode: PortMode::Uplink { .. },
                ..
            }) => {}
            Some(_) => {
                return Err(NetConfigError::Precondition(format!(
                    "port {:?} is not an uplink port; a tunnel's uplink is a port added with --uplink",
                    t.uplink
                )))
            }
        }
        if let Some(o) = self
            .tunnels
            .iter()
            .find(|o| o.vni == t.vni && o.remote_ip.parse::<Ipv4Addr>().ok() == Some(remote))
        {
            return Err(NetConfigError::Exists(format!(
                "tunnel {:?} already carries VNI {} to {}",
                o.name, t.vni, t.remote_ip
            )));
        }
        Ok(())
    }
}

/// Linux device names: 1 to 15 bytes, no '/', whitespace or ':'.
fn check_device_name(name: &str) -> Res<()> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        invalid(format!(
            "port name {name:?} is not a network device name: 1 to 15 letters, digits, '-', '_' or '.' (as `ip link` shows it)"
        ))
    }
}

/// The data plane's attachment for a stored mode.
pub fn port_kind(m: &PortMode) -> Res<super::dataplane::PortKind> {
    use super::dataplane::PortKind;
    Ok(match m {
        PortMode::Access { network } => PortKind::Access(parse_network(network)?),
        PortMode::Trunk { vlans } => {
            if vlans.is_empty() {
                return invalid("a trunk port needs at least one VLAN (--vlans 10,20)".into());
            }
            let mut seen = std::collections::HashSet::new();
            for v in vlans {
                if !(1..=4094).contains(v) {
                    return invalid(format!(
                        "VLAN {v} is not valid: VLAN ids run from 1 to 4094"
                    ));
                }
                if !seen.insert(*v) {
                    return invalid(format!("VLAN {v} is listed twice"));
                }
            }
            PortKind::Trunk(vlans.clone())
        }
        PortMode::Uplink {
            local_ip,
            local_mac,
        } => PortKind::Uplink {
            local_ip: parse_ipv4("local IP", local_ip)?,
            local_mac: parse_mac("local MAC", local_mac)?,
        },
    })
}

/// The port's rate limit, if any.
pub fn rate_limit(p: &PortDoc) -> Res<Option<RateLimit>> {
    match (p.rate_bytes_per_sec, p.burst_bytes) {
        (None, None) => Ok(None),
        (None, Some(_)) => invalid("--burst needs --rate".into()),
        (Some(0), _) => invalid(
            "a rate limit of 0 bytes per second would drop everything; leave --rate out for no limit"
                .into(),
        ),
        (Some(rate), burst) => {
            let burst = burst.unwrap_or_else(|| (rate / 10).max(65536));
            if burst < 1518 {
                return invalid(format!(
                    "burst {burst} bytes is smaller than one Ethernet frame (1518 bytes); nothing could pass"
                ));
            }
            Ok(Some(RateLimit {
                bytes_per_sec: rate,
                burst_bytes: burst,
            }))
        }
    }
}

fn parse_action(s: &str) -> Res<Action> {
    match s {
        "allow" => Ok(Action::Allow),
        "drop" => Ok(Action::Drop),
        "reject" => Ok(Action::Reject),
        _ => invalid(format!("action {s:?} is not valid: allow, drop or reject")),
    }
}

/// `tcp`, `udp`, `icmp`, `icmpv6` or a number 0..=255.
pub fn parse_protocol(s: &str) -> Res<u8> {
    match s {
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        "icmpv6" => Ok(58),
        n => n.parse::<u8>().map_err(|_| {
            NetConfigError::Invalid(format!(
                "protocol {s:?} is not valid: tcp, udp, icmp, icmpv6 or an IP protocol number from 0 to 255"
            ))
        }),
    }
}

/// The name of an IP protocol number.
#[must_use]
pub fn protocol_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}

fn parse_range(what: &str, s: &str) -> Res<PortRange> {
    let bad = || {
        NetConfigError::Invalid(format!(
            "{what} {s:?} is not valid: a port (80) or an inclusive range (1024-65535) of ports 0 to 65535"
        ))
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (
            a.trim().parse::<u16>().map_err(|_| bad())?,
            b.trim().parse::<u16>().map_err(|_| bad())?,
        ),
        None => {
            let p = s.trim().parse::<u16>().map_err(|_| bad())?;
            (p, p)
        }
    };
    if lo > hi {
        return invalid(format!(
            "{what} {s:?} is not valid: the range's first port is above its last"
        ));
    }
    Ok(PortRange { lo, hi })
}

fn parse_cidr(what: &str, s: &str) -> Res<Cidr> {
    s.parse::<Cidr>().map_err(|e| {
        NetConfigError::Invalid(format!(
            "{what} {s:?} is not an IPv4 or IPv6 prefix such as 10.0.0.0/24 or fd00::/64 ({e})"
        ))
    })
}

/// The data plane's rule for a stored one; `port_id` resolves port and tunnel names.
pub fn rule_spec(r: &RuleDoc, port_id: impl Fn(&str) -> Option<u32>) -> Res<RuleSpec> {
    let action = parse_action(&r.action)?;
    let port = match &r.port {
        Some(name) => Some(port_id(name).ok_or_else(|| {
            NetConfigError::NotFound(format!("no port or tunnel named {name:?}"))
        })?),
        None => None,
    };
    let direction = match r.direction.as_deref() {
        None => None,
        Some("in") => Some(Direction::In),
        Some("out") => Some(Direction::Out),
        Some(d) => {
            return invalid(format!(
                "direction {d:?} is not valid: in (entering the switch from the port) or out (leaving through it)"
            ))
        }
    };
    if direction.is_some() && port.is_none() {
        return invalid("--direction needs --port: a direction is about one port".into());
    }
    let proto = r.protocol.as_deref().map(parse_protocol).transpose()?;
    let sport = r
        .sport
        .as_deref()
        .map(|s| parse_range("source port", s))
        .transpose()?;
    let dport = r
        .dport
        .as_deref()
        .map(|s| parse_range("destination port", s))
        .transpose()?;
    if (sport.is_some() || dport.is_some()) && proto.is_some_and(|p| p != 6 && p != 17) {
        return invalid(format!(
            "port ranges apply to tcp and udp only; protocol {} has no ports",
            r.protocol.as_deref().unwrap_or_default()
        ));
    }
    let src = r
        .src
        .as_deref()
        .map(|s| parse_cidr("source", s))
        .transpose()?;
    let dst = r
        .dst
        .as_deref()
        .map(|s| parse_cidr("destination", s))
        .transpose()?;
    if let (Some(a), Some(b)) = (src, dst) {
        if a.addr.is_ipv4() != b.addr.is_ipv4() {
            return invalid(
                "source and destination are of different IP families; no packet could match".into(),
            );
        }
    }
    let network = r.network.as_deref().map(parse_network).transpose()?;
    Ok(RuleSpec {
        priority: r.priority,
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
    })
}

/// A stored tunnel's data-plane configuration (the uplink's id resolved by the caller).
pub fn tunnel_config(t: &TunnelDoc, uplink: u32) -> Res<super::dataplane::TunnelConfig> {
    Ok(super::dataplane::TunnelConfig {
        network: parse_network(&t.network)?,
        vni: t.vni,
        uplink,
        remote_ip: parse_ipv4("remote IP", &t.remote_ip)?,
        remote_mac: parse_mac("remote MAC", &t.remote_mac)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(name: &str, net: &str) -> PortDoc {
        PortDoc {
            name: name.into(),
            mode: PortMode::Access {
                network: net.into(),
            },
            rate_bytes_per_sec: None,
            burst_bytes: None,
        }
    }

    #[test]
    fn documents_round_trip_and_refusals_are_precise() {
        let mut d = NetDoc::new();
        assert!(d.check_port(&access("veth-a", "vlan:10")).is_ok());
        d.ports.push(access("veth-a", "vlan:10"));
        let e = d.check_port(&access("veth-a", "vlan:10")).unwrap_err();
        assert!(matches!(e, NetConfigError::Exists(_)), "{e}");
        let e = d.check_port(&access("x", "vlan:4095")).unwrap_err();
        assert!(e.to_string().contains("1 to 4094"), "{e}");
        let e = d.check_port(&access("a/b", "vlan:1")).unwrap_err();
        assert!(e.to_string().contains("network device name"), "{e}");
        let rule = RuleDoc {
            id: 1,
            action: "allow".into(),
            port: Some("veth-a".into()),
            direction: Some("in".into()),
            protocol: Some("icmp".into()),
            dport: Some("80".into()),
            ..Default::default()
        };
        let e = d.check_rule(&rule).unwrap_err();
        assert!(e.to_string().contains("tcp and udp only"), "{e}");
        let rule = RuleDoc {
            protocol: Some("tcp".into()),
            dport: Some("8000-8080".into()),
            ..rule
        };
        d.check_rule(&rule).unwrap();
        d.rules.push(rule.clone());
        let e = d.check_remove("veth-a", false).unwrap_err();
        assert!(
            matches!(e, NetConfigError::Precondition(_)) && e.to_string().contains("rule 1"),
            "{e}"
        );
        let e = d
            .check_rule(&RuleDoc {
                port: Some("nope".into()),
                ..rule.clone()
            })
            .unwrap_err();
        assert!(matches!(e, NetConfigError::NotFound(_)), "{e}");
        let e = d
            .check_rule(&RuleDoc {
                dport: Some("90-80".into()),
                ..rule
            })
            .unwrap_err();
        assert!(e.to_string().contains("above its last"), "{e}");
        let json = serde_json::to_string(&d).unwrap();
        let back: NetDoc = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
        assert!(json.contains("\"mode\":\"access\""), "{json}");
    }

    #[test]
    fn tunnels_need_an_uplink() {
        let mut d = NetDoc::new();
        d.ports.push(access("a", "vni:5000"));
        let t = TunnelDoc {
            name: "t1".into(),
            network: "vni:5000".into(),
            vni: 5000,
            uplink: "a".into(),
            remote_ip: "192.0.2.2".into(),
            remote_mac: "02:00:00:00:00:02".into(),
        };
        let e = d.check_tunnel(&t).unwrap_err();
        assert!(e.to_string().contains("not an uplink"), "{e}");
        d.ports.push(PortDoc {
            name: "up".into(),
            mode: PortMode::Uplink {
                local_ip: "192.0.2.1".into(),
                local_mac: "02:00:00:00:00:01".into(),
            },
            rate_bytes_per_sec: None,
            burst_bytes: None,
        });
        let t = TunnelDoc {
            uplink: "up".into(),
            ..t
        };
        d.check_tunnel(&t).unwrap();
        d.tunnels.push(t.clone());
        let e = d
            .check_tunnel(&TunnelDoc {
                name: "t2".into(),
                ..t
            })
            .unwrap_err();
        assert!(e.to_string().contains("already carries VNI 5000"), "{e}");
        let e = d.check_remove("up", false).unwrap_err();
        assert!(e.to_string().contains("uplink of VXLAN tunnel t1"), "{e}");
        let e = parse_mac("m", "ff:ff:ff:ff:ff:ff").unwrap_err();
        assert!(e.to_string().contains("multicast"), "{e}");
    }
}
