//! `dpuctl net ...`: the network offload module (switch ports, firewall rules and
//! connections, VXLAN tunnels, stats) over dpud's `Network` service. As for storage,
//! dpud makes every check and dpuctl prints its message; this module only shapes
//! requests and output.

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::proto;
use crate::proto::network_client::NetworkClient;
use crate::Res;

const NET_EXAMPLES: &str = "\
Examples:
  dpuctl net port add veth-a --access vlan:10
  dpuctl net port add bond0 --trunk 10,20 --rate 125MB --burst 1MiB
  dpuctl net port add eth1 --uplink --local-ip 192.0.2.1 --local-mac 02:00:00:00:00:01
  dpuctl net fw rule add --action allow --port veth-a --direction in --protocol tcp --dport 80 --dst 10.0.0.2/32
  dpuctl net fw rule list
  dpuctl net fw rule move 3 --priority 5
  dpuctl net fw rule delete 3        # new connections are refused; established ones stay
  dpuctl net fw conntrack flush --rule 3
  dpuctl net vxlan add dc2 --network vlan:10 --vni 5000 --uplink eth1 --remote-ip 192.0.2.2 --remote-mac 02:00:00:00:00:02
  dpuctl net stats

Networks are vlan:N (1-4094) or vni:N (0-16777215). Rules run by priority (lower first),
then in the order added; a new flow no rule allows is dropped.";

/// The network offload module: ports, firewall, VXLAN, stats.
#[derive(Debug, Subcommand)]
#[command(after_help = NET_EXAMPLES)]
pub(crate) enum NetCmd {
    /// Switch ports (kernel network devices attached to the switch).
    #[command(subcommand, after_help = NET_EXAMPLES)]
    Port(PortCmd),
    /// The stateful firewall: rules and tracked connections.
    #[command(subcommand)]
    Fw(FwCmd),
    /// VXLAN tunnels to other DPUs.
    #[command(subcommand)]
    Vxlan(VxlanCmd),
    /// Counters: CPU used by network and storage, frames, drops by reason, per port.
    Stats,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub(crate) struct PortMode {
    /// An access port: untagged frames belong to this network (vlan:N or vni:N).
    #[arg(long, value_name = "NETWORK")]
    access: Option<String>,
    /// A trunk port carrying these 802.1Q VLANs, tagged.
    #[arg(long, value_name = "VLANS", value_delimiter = ',')]
    trunk: Option<Vec<u32>>,
    /// The VXLAN underlay port (needs --local-ip and --local-mac).
    #[arg(long, requires_all = ["local_ip", "local_mac"])]
    uplink: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PortCmd {
    /// Attaches a kernel network device to the switch.
    #[command(
        after_help = "Examples:\n  dpuctl net port add veth-a --access vlan:10\n  dpuctl net port add bond0 --trunk 10,20 --rate 125MB\n  dpuctl net port add eth1 --uplink --local-ip 192.0.2.1 --local-mac 02:00:00:00:00:01\n\nRates and bursts are bytes (per second), with units such as MB or MiB."
    )]
    Add {
        /// The kernel device (as `ip link` shows it).
        name: String,
        #[command(flatten)]
        mode: PortMode,
        /// Uplink: this VTEP's IPv4 address.
        #[arg(long, value_name = "IP", requires = "uplink")]
        local_ip: Option<String>,
        /// Uplink: this VTEP's MAC address.
        #[arg(long, value_name = "MAC", requires = "uplink")]
        local_mac: Option<String>,
        /// Ingress rate limit in bytes per second (e.g. 125MB for 1 Gbit/s).
        #[arg(long, value_parser = crate::size::parse, value_name = "BYTES")]
        rate: Option<u64>,
        /// Largest ingress burst in bytes (default: a tenth of a second at --rate).
        #[arg(long, value_parser = crate::size::parse, value_name = "BYTES", requires = "rate")]
        burst: Option<u64>,
    },
    /// Lists ports, their I/O (af_packet_v3) and counters.
    List,
    /// Detaches a port no rule or tunnel names.
    Remove {
        /// Port name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum FwCmd {
    /// Firewall rules.
    #[command(subcommand)]
    Rule(RuleCmd),
    /// Tracked connections.
    #[command(subcommand)]
    Conntrack(ConntrackCmd),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ActionArg {
    /// Let the flow through (its replies pass by connection tracking).
    Allow,
    /// Drop silently.
    Drop,
    /// Drop and answer with a TCP RST or ICMP "administratively prohibited".
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DirectionArg {
    /// Entering the switch from the port (sent by the host behind it).
    In,
    /// Leaving the switch through the port (towards the host behind it).
    Out,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RuleCmd {
    /// Adds a rule; it applies to connections opened from now on.
    #[command(
        after_help = "Examples:\n  dpuctl net fw rule add --action allow --port veth-a --direction in --protocol tcp --dport 8000 --dst 10.77.0.2/32\n  dpuctl net fw rule add --action allow --protocol icmp --src 10.77.0.0/24\n  dpuctl net fw rule add --action reject --priority 1000 --protocol tcp\n\nEvery match is optional; a rule without matches applies to every new flow."
    )]
    Add {
        /// What the rule does.
        #[arg(long, value_enum)]
        action: ActionArg,
        /// Lower runs first (default 100); equal priorities run in the order added.
        #[arg(long, default_value_t = 100, allow_negative_numbers = true)]
        priority: i32,
        /// A port or tunnel the packet crosses.
        #[arg(long)]
        port: Option<String>,
        /// With --port: entering (in) or leaving (out) through it.
        #[arg(long, value_enum, requires = "port")]
        direction: Option<DirectionArg>,
        /// vlan:N or vni:N.
        #[arg(long)]
        network: Option<String>,
        /// Source prefix (10.0.0.0/8, fd00::/8, or one address).
        #[arg(long, value_name = "CIDR")]
        src: Option<String>,
        /// Destination prefix.
        #[arg(long, value_name = "CIDR")]
        dst: Option<String>,
        /// tcp, udp, icmp, icmpv6 or a protocol number.
        #[arg(long)]
        protocol: Option<String>,
        /// Source port or range (1024-65535); tcp and udp only.
        #[arg(long, value_name = "PORTS")]
        sport: Option<String>,
        /// Destination port or range; tcp and udp only.
        #[arg(long, value_name = "PORTS")]
        dport: Option<String>,
    },
    /// Lists rules in evaluation order with their counters.
    List,
    /// Deletes a rule: new connections are refused, established ones stay (flush them
    /// with `dpuctl net fw conntrack flush --rule ID`).
    Delete {
        /// Rule id.
        id: u64,
    },
    /// Gives a rule another priority.
    Move {
        /// Rule id.
        id: u64,
        /// The new priority (lower runs first).
        #[arg(long, allow_negative_numbers = true)]
        priority: i32,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConntrackCmd {
    /// Lists tracked connections.
    List,
    /// Cuts tracked connections: all, or those one rule opened.
    Flush {
        /// Only connections this rule opened.
        #[arg(long, value_name = "ID")]
        rule: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum VxlanCmd {
    /// Adds a VXLAN tunnel carrying a local network to a remote VTEP through an uplink.
    #[command(
        after_help = "Example:\n  dpuctl net vxlan add dc2 --network vlan:10 --vni 5000 --uplink eth1 --remote-ip 192.0.2.2 --remote-mac 02:00:00:00:00:02"
    )]
    Add {
        /// Tunnel name (a rule's --port may name it).
        name: String,
        /// The local network carried (vlan:N or vni:N).
        #[arg(long)]
        network: String,
        /// The VNI on the wire.
        #[arg(long)]
        vni: u32,
        /// The uplink port.
        #[arg(long)]
        uplink: String,
        /// The remote VTEP's IPv4 address.
        #[arg(long, value_name = "IP")]
        remote_ip: String,
        /// The next hop's MAC towards it.
        #[arg(long, value_name = "MAC")]
        remote_mac: String,
    },
    /// Lists tunnels with their counters.
    List,
    /// Removes a tunnel no rule names.
    Remove {
        /// Tunnel name.
        name: String,
    },
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn counters_json(c: Option<&proto::NetPortCounters>) -> Value {
    let c = c.cloned().unwrap_or_default();
    let drops: serde_json::Map<String, Value> = c
        .drops
        .iter()
        .map(|d| (d.reason.clone(), json!(d.count)))
        .collect();
    json!({
        "rx_packets": c.rx_packets, "rx_bytes": c.rx_bytes,
        "tx_packets": c.tx_packets, "tx_bytes": c.tx_bytes, "drops": drops,
    })
}

fn port_attach(p: &proto::NetPort) -> String {
    match p.mode.as_str() {
        "access" => p.network.clone(),
        "trunk" => format!(
            "vlans {}",
            p.vlans
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
        "uplink" => format!("{} {}", p.local_ip, p.local_mac),
        _ => String::new(),
    }
}

fn port_json(p: &proto::NetPort) -> Value {
    json!({
        "name": p.name, "mode": p.mode,
        "network": (p.mode == "access").then(|| p.network.clone()),
        "vlans": (p.mode == "trunk").then(|| p.vlans.clone()),
        "local_ip": (p.mode == "uplink").then(|| p.local_ip.clone()),
        "local_mac": (p.mode == "uplink").then(|| p.local_mac.clone()),
        "rate_bytes_per_sec": p.rate_bytes_per_sec, "burst_bytes": p.burst_bytes,
        "io": p.io, "counters": counters_json(p.counters.as_ref()),
    })
}

fn rule_json(r: &proto::FirewallRule) -> Value {
    json!({
        "id": r.id, "priority": r.priority, "action": r.action, "port": r.port,
        "direction": r.direction, "network": r.network, "src": r.src, "dst": r.dst,
        "protocol": r.protocol, "sport": r.sport, "dport": r.dport,
        "hits": r.hits, "packets": r.packets, "bytes": r.bytes,
    })
}

fn rule_match(r: &proto::FirewallRule) -> String {
    let mut parts = Vec::new();
    if let Some(p) = &r.port {
        match &r.direction {
            Some(d) => parts.push(format!("port {p} {d}")),
            None => parts.push(format!("port {p}")),
        }
    }
    for (k, v) in [
        ("network", &r.network),
        ("src", &r.src),
        ("dst", &r.dst),
        ("proto", &r.protocol),
        ("sport", &r.sport),
        ("dport", &r.dport),
    ] {
        if let Some(v) = v {
            parts.push(format!("{k} {v}"));
        }
    }
    if parts.is_empty() {
        "any".into()
    } else {
        parts.join(", ")
    }
}

fn tunnel_json(t: &proto::VxlanTunnel) -> Value {
    json!({
        "name": t.name, "network": t.network, "vni": t.vni, "uplink": t.uplink,
        "remote_ip": t.remote_ip, "remote_mac": t.remote_mac,
        "counters": counters_json(t.counters.as_ref()),
    })
}

fn conn_json(c: &proto::TrackedConnection) -> Value {
    json!({
        "network": c.network, "protocol": c.protocol, "src": c.src, "sport": c.sport,
        "dst": c.dst, "dport": c.dport, "state": c.state, "rule": c.rule,
        "packets": c.packets, "bytes": c.bytes, "idle_seconds": c.idle_seconds,
    })
}

fn rx_tx(c: Option<&proto::NetPortCounters>) -> [String; 3] {
    let c = c.cloned().unwrap_or_default();
    [
        format!("{}/{}", c.rx_packets, c.tx_packets),
        format!("{}/{}", c.rx_bytes, c.tx_bytes),
        c.drops.iter().map(|d| d.count).sum::<u64>().to_string(),
    ]
}

fn ports_table(ports: &[proto::NetPort]) {
    let rows: Vec<Vec<String>> = ports
        .iter()
        .map(|p| {
            let [pk, by, dr] = rx_tx(p.counters.as_ref());
            vec![
                p.name.clone(),
                p.mode.clone(),
                port_attach(p),
                p.rate_bytes_per_sec
                    .map_or_else(|| "-".into(), |r| format!("{r} B/s")),
                p.io.clone(),
                pk,
                by,
                dr,
            ]
        })
        .collect();
    crate::output::table(
        &[
            "NAME",
            "MODE",
            "ATTACHMENT",
            "RATE",
            "IO",
            "RX/TX PKTS",
            "RX/TX BYTES",
            "DROPS",
        ],
        &rows,
    );
}

fn tunnels_table(tunnels: &[proto::VxlanTunnel]) {
    let rows: Vec<Vec<String>> = tunnels
        .iter()
        .map(|t| {
            let [pk, by, dr] = rx_tx(t.counters.as_ref());
            vec![
                t.name.clone(),
                t.network.clone(),
                t.vni.to_string(),
                t.uplink.clone(),
                format!("{} ({})", t.remote_ip, t.remote_mac),
                pk,
                by,
                dr,
            ]
        })
        .collect();
    crate::output::table(
        &[
            "NAME",
            "NETWORK",
            "VNI",
            "UPLINK",
            "REMOTE",
            "RX/TX PKTS",
            "RX/TX BYTES",
            "DROPS",
        ],
        &rows,
    );
}

/// Runs a `dpuctl net` command.
pub(crate) async fn run(channel: Channel, json_out: bool, cmd: NetCmd) -> Res<()> {
    let mut c = NetworkClient::new(channel);
    match cmd {
        NetCmd::Port(PortCmd::Add {
            name,
            mode,
            local_ip,
            local_mac,
            rate,
            burst,
        }) => {
            let mut port = proto::NetPort {
                name,
                rate_bytes_per_sec: rate,
                burst_bytes: burst,
                ..Default::default()
            };
            if let Some(n) = mode.access {
                port.mode = "access".into();
                port.network = n;
            } else if let Some(v) = mode.trunk {
                port.mode = "trunk".into();
                port.vlans = v;
            } else if mode.uplink {
                port.mode = "uplink".into();
                port.local_ip = local_ip.unwrap_or_default();
                port.local_mac = local_mac.unwrap_or_default();
            }
            let p = c
                .add_port(proto::AddNetPortRequest { port: Some(port) })
                .await?
                .into_inner();
            if json_out {
                print_json(&port_json(&p));
            } else {
                println!(
                    "port {} added ({}, {}, io {})",
                    p.name,
                    p.mode,
                    port_attach(&p),
                    p.io
                );
            }
        }
        NetCmd::Port(PortCmd::List) => {
            let l = c
                .list_ports(proto::ListNetPortsRequest {})
                .await?
                .into_inner();
            if json_out {
                print_json(&Value::Array(l.ports.iter().map(port_json).collect()));
            } else {
                ports_table(&l.ports);
            }
        }
        NetCmd::Port(PortCmd::Remove { name }) => {
            c.remove_port(proto::RemoveNetPortRequest { name: name.clone() })
                .await?;
            done(json_out, "port", &name, "removed");
        }
        NetCmd::Fw(FwCmd::Rule(RuleCmd::Add {
            action,
            priority,
            port,
            direction,
            network,
            src,
            dst,
            protocol,
            sport,
            dport,
        })) => {
            let rule = proto::FirewallRule {
                priority,
                action: match action {
                    ActionArg::Allow => "allow",
                    ActionArg::Drop => "drop",
                    ActionArg::Reject => "reject",
                }
                .into(),
                port,
                direction: direction.map(|d| {
                    match d {
                        DirectionArg::In => "in",
                        DirectionArg::Out => "out",
                    }
                    .into()
                }),
                network,
                src,
                dst,
                protocol,
                sport,
                dport,
                ..Default::default()
            };
            let r = c
                .add_rule(proto::AddFirewallRuleRequest { rule: Some(rule) })
                .await?
                .into_inner();
            if json_out {
                print_json(&rule_json(&r));
            } else {
                println!(
                    "rule {} added: priority {}, {} {}",
                    r.id,
                    r.priority,
                    r.action,
                    rule_match(&r)
                );
            }
        }
        NetCmd::Fw(FwCmd::Rule(RuleCmd::List)) => {
            let l = c
                .list_rules(proto::ListFirewallRulesRequest {})
                .await?
                .into_inner();
            if json_out {
                print_json(&Value::Array(l.rules.iter().map(rule_json).collect()));
            } else {
                let rows: Vec<Vec<String>> = l
                    .rules
                    .iter()
                    .map(|r| {
                        vec![
                            r.id.to_string(),
                            r.priority.to_string(),
                            r.action.clone(),
                            rule_match(r),
                            r.hits.to_string(),
                            r.packets.to_string(),
                            r.bytes.to_string(),
                        ]
                    })
                    .collect();
                crate::output::table(
                    &[
                        "ID", "PRIORITY", "ACTION", "MATCH", "HITS", "PACKETS", "BYTES",
                    ],
                    &rows,
                );
            }
        }
        NetCmd::Fw(FwCmd::Rule(RuleCmd::Delete { id })) => {
            let r = c
                .delete_rule(proto::DeleteFirewallRuleRequest { id })
                .await?
                .into_inner();
            if json_out {
                print_json(&json!({
                    "kind": "rule", "id": id, "result": "deleted",
                    "connections_kept": r.connections_kept,
                }));
            } else {
                println!(
                    "rule {id} deleted; new connections are refused, {} established connection{} it opened stay (dpuctl net fw conntrack flush --rule {id} cuts them)",
                    r.connections_kept,
                    if r.connections_kept == 1 { "" } else { "s" }
                );
            }
        }
        NetCmd::Fw(FwCmd::Rule(RuleCmd::Move { id, priority })) => {
            let r = c
                .move_rule(proto::MoveFirewallRuleRequest { id, priority })
                .await?
                .into_inner();
            if json_out {
                print_json(&rule_json(&r));
            } else {
                println!("rule {} moved to priority {}", r.id, r.priority);
            }
        }
        NetCmd::Fw(FwCmd::Conntrack(ConntrackCmd::List)) => {
            let l = c
                .list_connections(proto::ListConnectionsRequest {})
                .await?
                .into_inner();
            if json_out {
                print_json(&Value::Array(l.connections.iter().map(conn_json).collect()));
            } else {
                let rows: Vec<Vec<String>> = l
                    .connections
                    .iter()
                    .map(|k| {
                        vec![
                            k.network.clone(),
                            k.protocol.clone(),
                            format!("{}:{}", k.src, k.sport),
                            format!("{}:{}", k.dst, k.dport),
                            k.state.clone(),
                            k.rule.map_or_else(|| "-".into(), |r| r.to_string()),
                            k.packets.to_string(),
                            k.bytes.to_string(),
                            format!("{:.1}s", k.idle_seconds),
                        ]
                    })
                    .collect();
                crate::output::table(
                    &[
                        "NETWORK",
                        "PROTO",
                        "SOURCE",
                        "DESTINATION",
                        "STATE",
                        "RULE",
                        "PACKETS",
                        "BYTES",
                        "IDLE",
                    ],
                    &rows,
                );
            }
        }
        NetCmd::Fw(FwCmd::Conntrack(ConntrackCmd::Flush { rule })) => {
            let r = c
                .flush_connections(proto::FlushConnectionsRequest { rule })
                .await?
                .into_inner();
            if json_out {
                print_json(&json!({ "flushed": r.flushed, "rule": rule }));
            } else {
                println!(
                    "{} connection{} flushed",
                    r.flushed,
                    if r.flushed == 1 { "" } else { "s" }
                );
            }
        }
        NetCmd::Vxlan(VxlanCmd::Add {
            name,
            network,
            vni,
            uplink,
            remote_ip,
            remote_mac,
        }) => {
            let t = c
                .add_vxlan(proto::AddVxlanTunnelRequest {
                    tunnel: Some(proto::VxlanTunnel {
                        name,
                        network,
                        vni,
                        uplink,
                        remote_ip,
                        remote_mac,
                        counters: None,
                    }),
                })
                .await?
                .into_inner();
            if json_out {
                print_json(&tunnel_json(&t));
            } else {
                println!(
                    "tunnel {} added: {} as VNI {} to {} via {}",
                    t.name, t.network, t.vni, t.remote_ip, t.uplink
                );
            }
        }
        NetCmd::Vxlan(VxlanCmd::List) => {
            let l = c
                .list_vxlan(proto::ListVxlanTunnelsRequest {})
                .await?
                .into_inner();
            if json_out {
                print_json(&Value::Array(l.tunnels.iter().map(tunnel_json).collect()));
            } else {
                tunnels_table(&l.tunnels);
            }
        }
        NetCmd::Vxlan(VxlanCmd::Remove { name }) => {
            c.remove_vxlan(proto::RemoveVxlanTunnelRequest { name: name.clone() })
                .await?;
            done(json_out, "tunnel", &name, "removed");
        }
        NetCmd::Stats => {
            let s = c.stats(proto::NetStatsRequest {}).await?.into_inner();
            stats(json_out, &s);
        }
    }
    Ok(())
}

fn done(json_out: bool, kind: &str, name: &str, what: &str) {
    if json_out {
        print_json(&json!({ "kind": kind, "name": name, "result": what }));
    } else {
        println!("{kind} {name} {what}");
    }
}

fn stats(json_out: bool, s: &proto::NetStatsResponse) {
    let drops: serde_json::Map<String, Value> = s
        .drops
        .iter()
        .map(|d| (d.reason.clone(), json!(d.count)))
        .collect();
    if json_out {
        print_json(&json!({
            "cpu_share": s.cpu_share, "reactor": s.reactor,
            "net_cpu_seconds": s.net_cpu_seconds, "storage_cpu_seconds": s.storage_cpu_seconds,
            "turns": s.turns, "throttled_periods": s.throttled_periods,
            "rx_frames": s.rx_frames, "tx_frames": s.tx_frames, "tx_dropped": s.tx_dropped,
            "io_errors": s.io_errors, "connections": s.connections,
            "connections_opened": s.connections_opened, "connections_expired": s.connections_expired,
            "invalid": s.invalid, "table_full": s.table_full,
            "rule_cache_hits": s.rule_cache_hits, "rule_walks": s.rule_walks,
            "rejects_sent": s.rejects_sent, "mac_learned": s.mac_learned, "drops": drops,
            "ports": s.ports.iter().map(port_json).collect::<Vec<_>>(),
            "tunnels": s.tunnels.iter().map(tunnel_json).collect::<Vec<_>>(),
        }));
        return;
    }
    println!(
        "CPU: network {:.3} s, storage {:.3} s (network share {:.0}% of reactor {}; throttled in {} periods)",
        s.net_cpu_seconds,
        s.storage_cpu_seconds,
        s.cpu_share * 100.0,
        s.reactor,
        s.throttled_periods
    );
    println!(
        "frames: {} received, {} sent, {} not sent (TX ring full), {} I/O errors, {} turns",
        s.rx_frames, s.tx_frames, s.tx_dropped, s.io_errors, s.turns
    );
    println!(
        "connections: {} tracked, {} opened, {} expired, {} invalid packets, {} not tracked (table full)",
        s.connections, s.connections_opened, s.connections_expired, s.invalid, s.table_full
    );
    println!(
        "rules: {} decision-cache hits, {} rule walks, {} rejects sent; {} MAC addresses learned",
        s.rule_cache_hits, s.rule_walks, s.rejects_sent, s.mac_learned
    );
    if s.drops.is_empty() {
        println!("drops: none");
    } else {
        let d: Vec<String> = s
            .drops
            .iter()
            .map(|d| format!("{} {}", d.reason, d.count))
            .collect();
        println!("drops: {}", d.join(", "));
    }
    if !s.ports.is_empty() {
        println!();
        ports_table(&s.ports);
    }
    if !s.tunnels.is_empty() {
        println!();
        tunnels_table(&s.tunnels);
    }
}
