//! The `Network` service's refusals, straight over gRPC: each gets the status code
//! docs/api.md promises and a message naming the field and what to do; a request
//! without its message body is refused, not defaulted; and the CPU split between
//! network and storage reaches `/metrics`. (dpuctl's side is cli/tests/dpuctl_net.rs;
//! frames through real devices are cli/tests/net_dpud.rs.)

mod common;

use common::api::expect_code;
use engine::api::proto;
use engine::api::proto::network_client::NetworkClient;
use engine::api::testing::{connect_unix, TestDaemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn access(name: &str, network: &str) -> proto::AddNetPortRequest {
    proto::AddNetPortRequest {
        port: Some(proto::NetPort {
            name: name.into(),
            mode: "access".into(),
            network: network.into(),
            ..Default::default()
        }),
    }
}

fn rule(r: proto::FirewallRule) -> proto::AddFirewallRuleRequest {
    proto::AddFirewallRuleRequest { rule: Some(r) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_have_codes_and_reasons() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = TestDaemon::start(dir.path()).await?;
    let mut c = NetworkClient::new(connect_unix(d.handle.api_socket()).await?);
    c.add_port(access("pa", "vlan:10")).await?;
    expect_code(
        c.add_port(access("pa", "vlan:10")).await,
        Code::AlreadyExists,
        "exists",
    );
    expect_code(
        c.add_port(access("pb", "vlan:0")).await,
        Code::InvalidArgument,
        "1 to 4094",
    );
    expect_code(
        c.add_port(access("pb", "vni:16777216")).await,
        Code::InvalidArgument,
        "vni:N",
    );
    expect_code(
        c.add_port(access("", "vlan:1")).await,
        Code::InvalidArgument,
        "device name",
    );
    expect_code(
        c.add_port(access("sixteen-chars-xx", "vlan:1")).await,
        Code::InvalidArgument,
        "1 to 15",
    );
    expect_code(
        c.add_port(proto::AddNetPortRequest {
            port: Some(proto::NetPort {
                name: "pb".into(),
                mode: "bridge".into(),
                ..Default::default()
            }),
        })
        .await,
        Code::InvalidArgument,
        "access (one untagged network), trunk",
    );
    expect_code(
        c.add_port(proto::AddNetPortRequest {
            port: Some(proto::NetPort {
                name: "pb".into(),
                mode: "trunk".into(),
                vlans: vec![70_000],
                ..Default::default()
            }),
        })
        .await,
        Code::InvalidArgument,
        "VLAN 70000",
    );
    expect_code(
        c.add_port(proto::AddNetPortRequest {
            port: Some(proto::NetPort {
                name: "up".into(),
                mode: "uplink".into(),
                local_ip: "192.0.2.1".into(),
                local_mac: "01:00:5e:00:00:01".into(),
                ..Default::default()
            }),
        })
        .await,
        Code::InvalidArgument,
        "multicast",
    );
    expect_code(
        c.add_port(proto::AddNetPortRequest { port: None }).await,
        Code::InvalidArgument,
        "no port",
    );
    expect_code(
        c.add_rule(proto::AddFirewallRuleRequest { rule: None })
            .await,
        Code::InvalidArgument,
        "no rule",
    );

    let base = proto::FirewallRule {
        action: "allow".into(),
        ..Default::default()
    };
    expect_code(
        c.add_rule(rule(proto::FirewallRule {
            action: "accept".into(),
            ..base.clone()
        }))
        .await,
        Code::InvalidArgument,
        "allow, drop or reject",
    );
    expect_code(
        c.add_rule(rule(proto::FirewallRule {
            protocol: Some("sctp".into()),
            ..base.clone()
        }))
        .await,
        Code::InvalidArgument,
        "protocol \"sctp\"",
    );
    expect_code(
        c.add_rule(rule(proto::FirewallRule {
            direction: Some("in".into()),
            ..base.clone()
        }))
        .await,
        Code::InvalidArgument,
        "--direction needs --port",
    );
    expect_code(
        c.add_rule(rule(proto::FirewallRule {
            src: Some("10.0.0.0/8".into()),
            dst: Some("fd00::/8".into()),
            ..base.clone()
        }))
        .await,
        Code::InvalidArgument,
        "different IP families",
    );
    expect_code(
        c.add_rule(rule(proto::FirewallRule {
            port: Some("ghost".into()),
            ..base.clone()
        }))
        .await,
        Code::NotFound,
        "ghost",
    );
    let r = c
        .add_rule(rule(proto::FirewallRule {
            port: Some("pa".into()),
            protocol: Some("udp".into()),
            dport: Some("53".into()),
            ..base.clone()
        }))
        .await?
        .into_inner();
    assert_eq!((r.id, r.priority), (1, 0));
    expect_code(
        c.remove_port(proto::RemoveNetPortRequest { name: "pa".into() })
            .await,
        Code::FailedPrecondition,
        "firewall rule 1",
    );
    expect_code(
        c.remove_port(proto::RemoveNetPortRequest { name: "pz".into() })
            .await,
        Code::NotFound,
        "no port named",
    );
    expect_code(
        c.delete_rule(proto::DeleteFirewallRuleRequest { id: 9 })
            .await,
        Code::NotFound,
        "no firewall rule with id 9",
    );
    let tunnel = |uplink: &str| proto::AddVxlanTunnelRequest {
        tunnel: Some(proto::VxlanTunnel {
            name: "t".into(),
            network: "vlan:10".into(),
            vni: 10,
            uplink: uplink.into(),
            remote_ip: "192.0.2.9".into(),
            remote_mac: "02:00:00:00:00:09".into(),
            counters: None,
        }),
    };
    expect_code(
        c.add_vxlan(tunnel("none")).await,
        Code::NotFound,
        "add it first",
    );
    expect_code(
        c.add_vxlan(tunnel("pa")).await,
        Code::FailedPrecondition,
        "not an uplink port",
    );
    let deleted = c
        .delete_rule(proto::DeleteFirewallRuleRequest { id: 1 })
        .await?
        .into_inner();
    assert_eq!(deleted.connections_kept, 0);
    c.remove_port(proto::RemoveNetPortRequest { name: "pa".into() })
        .await?;

    // The CPU split reaches /metrics.
    let addr = d.handle.metrics_addr().ok_or("no metrics listener")?;
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    for name in [
        "dpud_net_cpu_seconds_total ",
        "dpud_storage_cpu_seconds_total ",
        "dpud_net_cpu_share 0.5",
        "dpud_net_throttled_periods_total ",
    ] {
        assert!(
            body.contains(&format!("\n{name}")),
            "/metrics lacks {name:?}:\n{body}"
        );
    }
    d.handle.shutdown().await?;
    Ok(())
}
