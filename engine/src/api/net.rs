//! The `Network` service of `dpu.control.v1` (proto/dpu/control/v1/network.proto): the
//! translation between its messages and [`NetControl`], which validates, applies and
//! persists. Kept apart from the storage services in `server.rs` so the two halves of
//! the API change independently.

use std::net::IpAddr;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto;
use crate::net::config::{protocol_name, NetConfigError, PortDoc, PortMode, RuleDoc, TunnelDoc};
use crate::net::control::{NetControl, NetSnapshot};
use crate::net::dataplane::PortCounters;

impl From<NetConfigError> for Status {
    fn from(e: NetConfigError) -> Self {
        let m = e.to_string();
        match e {
            NetConfigError::Invalid(_) => Self::invalid_argument(m),
            NetConfigError::NotFound(_) => Self::not_found(m),
            NetConfigError::Exists(_) => Self::already_exists(m),
            NetConfigError::Precondition(_) => Self::failed_precondition(m),
            NetConfigError::Unavailable(_) => Self::unavailable(m),
            NetConfigError::Internal(_) => {
                tracing::error!(error = %m, "network control failed");
                Self::internal(m)
            }
        }
    }
}

/// The gRPC service over the network module.
#[derive(Debug, Clone)]
pub struct NetworkApi(pub Arc<NetControl>);

impl NetworkApi {
    /// The tonic service to add to a router.
    #[must_use]
    pub fn server(net: Arc<NetControl>) -> proto::network_server::NetworkServer<Self> {
        proto::network_server::NetworkServer::new(Self(net))
    }
}

fn missing(what: &str) -> Status {
    Status::invalid_argument(format!("the request has no {what}"))
}

fn counters(c: &PortCounters) -> proto::NetPortCounters {
    proto::NetPortCounters {
        rx_packets: c.rx_packets,
        rx_bytes: c.rx_bytes,
        tx_packets: c.tx_packets,
        tx_bytes: c.tx_bytes,
        drops: c
            .drops
            .nonzero()
            .into_iter()
            .map(|(reason, count)| proto::NetDropCount {
                reason: reason.into(),
                count,
            })
            .collect(),
    }
}

fn port_doc(p: proto::NetPort) -> Result<PortDoc, Status> {
    let mode = match p.mode.as_str() {
        "access" => PortMode::Access { network: p.network },
        "trunk" => PortMode::Trunk {
            vlans: p
                .vlans
                .iter()
                .map(|v| {
                    u16::try_from(*v).map_err(|_| {
                        Status::invalid_argument(format!(
                            "VLAN {v} is not valid: VLAN ids run from 1 to 4094"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        },
        "uplink" => PortMode::Uplink {
            local_ip: p.local_ip,
            local_mac: p.local_mac,
        },
        m => {
            return Err(Status::invalid_argument(format!(
                "port mode {m:?} is not valid: access (one untagged network), trunk (tagged VLANs) or uplink (the VXLAN underlay)"
            )))
        }
    };
    Ok(PortDoc {
        name: p.name,
        mode,
        rate_bytes_per_sec: p.rate_bytes_per_sec,
        burst_bytes: p.burst_bytes,
    })
}

fn port_message(d: &PortDoc, io: String, c: Option<&PortCounters>) -> proto::NetPort {
    let mut m = proto::NetPort {
        name: d.name.clone(),
        rate_bytes_per_sec: d.rate_bytes_per_sec,
        burst_bytes: d.burst_bytes,
        io,
        counters: c.map(counters),
        ..Default::default()
    };
    match &d.mode {
        PortMode::Access { network } => {
            m.mode = "access".into();
            m.network = network.clone();
        }
        PortMode::Trunk { vlans } => {
            m.mode = "trunk".into();
            m.vlans = vlans.iter().map(|v| u32::from(*v)).collect();
        }
        PortMode::Uplink {
            local_ip,
            local_mac,
        } => {
            m.mode = "uplink".into();
            m.local_ip = local_ip.clone();
            m.local_mac = local_mac.clone();
        }
    }
    m
}

fn rule_message(r: &RuleDoc, snap: Option<&NetSnapshot>) -> proto::FirewallRule {
    let c = snap
        .and_then(|s| s.stats.rules.iter().find(|x| x.id == r.id))
        .map(|x| x.counters)
        .unwrap_or_default();
    proto::FirewallRule {
        id: r.id,
        priority: r.priority,
        action: r.action.clone(),
        port: r.port.clone(),
        direction: r.direction.clone(),
        network: r.network.clone(),
        src: r.src.clone(),
        dst: r.dst.clone(),
        protocol: r.protocol.clone(),
        sport: r.sport.clone(),
        dport: r.dport.clone(),
        hits: c.hits,
        packets: c.packets,
        bytes: c.bytes,
    }
}

fn tunnel_message(t: &TunnelDoc, snap: Option<&NetSnapshot>) -> proto::VxlanTunnel {
    let c = snap.and_then(|s| {
        let id = s
            .names
            .iter()
            .find(|(_, n)| **n == t.name)
            .map(|(id, _)| *id)?;
        s.stats
            .ports
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.counters)
    });
    proto::VxlanTunnel {
        name: t.name.clone(),
        network: t.network.clone(),
        vni: t.vni,
        uplink: t.uplink.clone(),
        remote_ip: t.remote_ip.clone(),
        remote_mac: t.remote_mac.clone(),
        counters: c.as_ref().map(counters),
    }
}

/// Normalizes an address field: IPv4-mapped stays as written.
fn ip(a: IpAddr) -> String {
    a.to_string()
}

impl NetworkApi {
    async fn port_messages(&self) -> Result<Vec<proto::NetPort>, Status> {
        let ports = self.0.ports().await?;
        let snap = self.0.snapshot().await?;
        Ok(ports
            .into_iter()
            .map(|p| {
                let c =
                    p.id.and_then(|id| snap.stats.ports.iter().find(|s| s.id == id))
                        .map(|s| s.counters);
                port_message(&p.doc, p.io, c.as_ref())
            })
            .collect())
    }
}

type Rpc<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl proto::network_server::Network for NetworkApi {
    async fn add_port(&self, r: Request<proto::AddNetPortRequest>) -> Rpc<proto::NetPort> {
        let p = r.into_inner().port.ok_or_else(|| missing("port"))?;
        let doc = port_doc(p)?;
        let v = self.0.add_port(doc).await?;
        Ok(Response::new(port_message(&v.doc, v.io, None)))
    }

    async fn list_ports(
        &self,
        _r: Request<proto::ListNetPortsRequest>,
    ) -> Rpc<proto::ListNetPortsResponse> {
        Ok(Response::new(proto::ListNetPortsResponse {
            ports: self.port_messages().await?,
        }))
    }

    async fn remove_port(
        &self,
        r: Request<proto::RemoveNetPortRequest>,
    ) -> Rpc<proto::RemoveNetPortResponse> {
        self.0.remove_port(&r.into_inner().name).await?;
        Ok(Response::new(proto::RemoveNetPortResponse {}))
    }

    async fn add_rule(
        &self,
        r: Request<proto::AddFirewallRuleRequest>,
    ) -> Rpc<proto::FirewallRule> {
        let m = r.into_inner().rule.ok_or_else(|| missing("rule"))?;
        let doc = RuleDoc {
            id: 0,
            priority: m.priority,
            action: m.action,
            port: m.port,
            direction: m.direction,
            network: m.network,
            src: m.src,
            dst: m.dst,
            protocol: m.protocol,
            sport: m.sport,
            dport: m.dport,
        };
        let added = self.0.add_rule(doc).await?;
        Ok(Response::new(rule_message(&added, None)))
    }

    async fn list_rules(
        &self,
        _r: Request<proto::ListFirewallRulesRequest>,
    ) -> Rpc<proto::ListFirewallRulesResponse> {
        let rules = self.0.rules().await;
        let snap = self.0.snapshot().await?;
        Ok(Response::new(proto::ListFirewallRulesResponse {
            rules: rules.iter().map(|r| rule_message(r, Some(&snap))).collect(),
        }))
    }

    async fn delete_rule(
        &self,
        r: Request<proto::DeleteFirewallRuleRequest>,
    ) -> Rpc<proto::DeleteFirewallRuleResponse> {
        let id = r.into_inner().id;
        self.0.delete_rule(id).await?;
        let (conns, _) = self.0.connections().await?;
        let kept = conns.iter().filter(|c| c.rule == Some(id)).count();
        Ok(Response::new(proto::DeleteFirewallRuleResponse {
            connections_kept: u64::try_from(kept).unwrap_or(u64::MAX),
        }))
    }

    async fn move_rule(
        &self,
        r: Request<proto::MoveFirewallRuleRequest>,
    ) -> Rpc<proto::FirewallRule> {
        let m = r.into_inner();
        let moved = self.0.move_rule(m.id, m.priority).await?;
        Ok(Response::new(rule_message(&moved, None)))
    }

    async fn list_connections(
        &self,
        _r: Request<proto::ListConnectionsRequest>,
    ) -> Rpc<proto::ListConnectionsResponse> {
        let (conns, now) = self.0.connections().await?;
        let connections = conns
            .into_iter()
            .map(|c| {
                let state = match c.tcp {
                    Some(t) => t.state.name().to_owned(),
                    None if c.replied => "replied".into(),
                    None => "unreplied".into(),
                };
                let idle = now.saturating_sub(c.last_seen);
                proto::TrackedConnection {
                    network: c.key.network.to_string(),
                    protocol: protocol_name(c.key.proto),
                    src: ip(c.key.src),
                    dst: ip(c.key.dst),
                    sport: u32::from(c.key.sport),
                    dport: u32::from(c.key.dport),
                    state,
                    rule: c.rule,
                    packets: c.packets,
                    bytes: c.bytes,
                    idle_seconds: std::time::Duration::from_nanos(idle).as_secs_f64(),
                }
            })
            .collect();
        Ok(Response::new(proto::ListConnectionsResponse {
            connections,
        }))
    }

    async fn flush_connections(
        &self,
        r: Request<proto::FlushConnectionsRequest>,
    ) -> Rpc<proto::FlushConnectionsResponse> {
        // A rule id that is gone is fine: its connections may outlive it.
        let rule = r.into_inner().rule;
        let n = self.0.flush(rule).await?;
        Ok(Response::new(proto::FlushConnectionsResponse {
            flushed: u64::try_from(n).unwrap_or(u64::MAX),
        }))
    }

    async fn add_vxlan(&self, r: Request<proto::AddVxlanTunnelRequest>) -> Rpc<proto::VxlanTunnel> {
        let t = r.into_inner().tunnel.ok_or_else(|| missing("tunnel"))?;
        let doc = TunnelDoc {
            name: t.name,
            network: t.network,
            vni: t.vni,
            uplink: t.uplink,
            remote_ip: t.remote_ip,
            remote_mac: t.remote_mac,
        };
        let added = self.0.add_tunnel(doc).await?;
        Ok(Response::new(tunnel_message(&added, None)))
    }

    async fn list_vxlan(
        &self,
        _r: Request<proto::ListVxlanTunnelsRequest>,
    ) -> Rpc<proto::ListVxlanTunnelsResponse> {
        let tunnels = self.0.tunnels().await;
        let snap = self.0.snapshot().await?;
        Ok(Response::new(proto::ListVxlanTunnelsResponse {
            tunnels: tunnels
                .iter()
                .map(|t| tunnel_message(t, Some(&snap)))
                .collect(),
        }))
    }

    async fn remove_vxlan(
        &self,
        r: Request<proto::RemoveVxlanTunnelRequest>,
    ) -> Rpc<proto::RemoveVxlanTunnelResponse> {
        self.0.remove_tunnel(&r.into_inner().name).await?;
        Ok(Response::new(proto::RemoveVxlanTunnelResponse {}))
    }

    async fn stats(&self, _r: Request<proto::NetStatsRequest>) -> Rpc<proto::NetStatsResponse> {
        let snap = self.0.snapshot().await?;
        let ports = self.port_messages().await?;
        let tunnels = self.0.tunnels().await;
        let (net, storage) = self.0.cpu_seconds();
        let s = &snap.stats;
        let settings = self.0.settings();
        Ok(Response::new(proto::NetStatsResponse {
            cpu_share: f64::from(settings.cpu_share),
            reactor: u32::try_from(settings.reactor).unwrap_or(u32::MAX),
            net_cpu_seconds: net,
            storage_cpu_seconds: storage,
            turns: self.0.turns(),
            throttled_periods: self.0.throttled_periods(),
            rx_frames: snap.poller.rx_frames,
            tx_frames: snap.poller.tx_frames,
            tx_dropped: snap.poller.tx_dropped,
            io_errors: snap.poller.io_errors,
            connections: u64::try_from(s.connections).unwrap_or(u64::MAX),
            connections_opened: s.conntrack.opened,
            connections_expired: s.conntrack.expired,
            invalid: s.conntrack.invalid,
            table_full: s.conntrack.table_full,
            rule_cache_hits: s.rule_cache.0,
            rule_walks: s.rule_cache.1,
            rejects_sent: s.rejects_sent,
            mac_learned: s.switch.learned,
            drops: s
                .drops
                .nonzero()
                .into_iter()
                .map(|(reason, count)| proto::NetDropCount {
                    reason: reason.into(),
                    count,
                })
                .collect(),
            ports,
            tunnels: tunnels
                .iter()
                .map(|t| tunnel_message(t, Some(&snap)))
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::net::config::format_mac;

    #[test]
    fn macs_format_as_written() {
        assert_eq!(
            format_mac(crate::net::MacAddr([2, 0, 0, 0, 0, 0xab])),
            "02:00:00:00:00:ab"
        );
    }
}
