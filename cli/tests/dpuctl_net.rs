//! `dpuctl net ...` end to end: the real binary against a daemon running in this process
//! (the engine's test double for storage; the network module with in-memory port I/O,
//! so no device or root is needed), over the daemon's real Unix socket. Every command,
//! tables and `--output json`, the refusals an operator must act on with their exit
//! codes, and the configuration surviving a restart with the same rule ids. Frames
//! through real devices are `engine/tests/net_dpud.rs` (root).

mod common;

use common::Env;
use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn ids(rules: &Value) -> Vec<u64> {
    rules
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["id"].as_u64()).collect())
        .unwrap_or_default()
}

#[test]
fn ports_rules_tunnels_and_stats() -> TestResult {
    let mut env = Env::start()?;
    // Ports of each mode.
    let p = env
        .ok(&[
            "-o", "json", "net", "port", "add", "veth-a", "--access", "vlan:10",
        ])
        .json();
    assert_eq!(p["mode"], "access");
    assert_eq!(p["network"], "vlan:10");
    assert_eq!(p["io"], "memory");
    let o = env.ok(&[
        "net", "port", "add", "trunk0", "--trunk", "10,20", "--rate", "125MB",
    ]);
    assert!(
        o.stdout.contains("port trunk0 added (trunk, vlans 10,20"),
        "{}",
        o.stdout
    );
    env.ok(&[
        "net",
        "port",
        "add",
        "up0",
        "--uplink",
        "--local-ip",
        "192.0.2.1",
        "--local-mac",
        "02:00:00:00:00:01",
    ]);
    let list = env.ok(&["-o", "json", "net", "port", "list"]).json();
    let names: Vec<&str> = list
        .as_array()
        .ok_or("array")?
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["veth-a", "trunk0", "up0"]);
    assert_eq!(list[1]["rate_bytes_per_sec"], 125_000_000);
    assert_eq!(
        list[1]["burst_bytes"],
        Value::Null,
        "burst defaults inside dpud"
    );
    let table = env.ok(&["net", "port", "list"]).stdout;
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("192.0.2.1 02:00:00:00:00:01"), "{table}");

    // Refusals: usage errors (2) from dpuctl, the daemon's precise ones (1).
    env.fails(&["net", "port", "add", "x"], 2, "--access");
    env.fails(
        &[
            "net", "port", "add", "x", "--access", "vlan:1", "--trunk", "2",
        ],
        2,
        "cannot be used with",
    );
    env.fails(
        &["net", "port", "add", "veth-a", "--access", "vlan:10"],
        1,
        "a port or tunnel named \"veth-a\" exists",
    );
    env.fails(
        &["net", "port", "add", "x", "--access", "vlan:5000"],
        1,
        "vlan:N (N from 1 to 4094)",
    );
    env.fails(
        &["net", "port", "add", "x", "--trunk", "7,7"],
        1,
        "VLAN 7 is listed twice",
    );
    env.fails(
        &[
            "net",
            "port",
            "add",
            "x",
            "--uplink",
            "--local-ip",
            "fd00::1",
            "--local-mac",
            "02:00:00:00:00:09",
        ],
        1,
        "is not an IPv4 address",
    );
    env.fails(
        &[
            "net", "port", "add", "x", "--access", "vlan:1", "--rate", "0",
        ],
        1,
        "would drop everything",
    );
    let o = env.fails(
        &[
            "-o", "json", "net", "port", "add", "bad/name", "--access", "vlan:1",
        ],
        1,
        "\"kind\":\"InvalidArgument\"",
    );
    assert!(o.stderr.contains("network device name"), "{}", o.stderr);

    // Rules: ids, order, counters, move, delete.
    let r1 = env
        .ok(&[
            "-o",
            "json",
            "net",
            "fw",
            "rule",
            "add",
            "--action",
            "allow",
            "--port",
            "veth-a",
            "--direction",
            "in",
            "--protocol",
            "tcp",
            "--dport",
            "8000",
            "--dst",
            "10.77.0.2/32",
        ])
        .json();
    assert_eq!(r1["id"], 1);
    assert_eq!(r1["priority"], 100);
    assert_eq!(r1["dport"], "8000");
    let o = env.ok(&[
        "net",
        "fw",
        "rule",
        "add",
        "--action",
        "allow",
        "--protocol",
        "icmp",
        "--priority",
        "10",
    ]);
    assert!(
        o.stdout
            .contains("rule 2 added: priority 10, allow proto icmp"),
        "{}",
        o.stdout
    );
    env.ok(&[
        "net",
        "fw",
        "rule",
        "add",
        "--action",
        "reject",
        "--priority",
        "-5",
        "--src",
        "10.0.0.66",
    ]);
    let rules = env.ok(&["-o", "json", "net", "fw", "rule", "list"]).json();
    assert_eq!(
        ids(&rules),
        [3, 2, 1],
        "evaluation order: priority, then id"
    );
    assert_eq!(rules[0]["src"], "10.0.0.66");
    env.ok(&["net", "fw", "rule", "move", "1", "--priority", "0"]);
    let rules = env.ok(&["-o", "json", "net", "fw", "rule", "list"]).json();
    assert_eq!(ids(&rules), [3, 1, 2]);
    let table = env.ok(&["net", "fw", "rule", "list"]).stdout;
    assert!(
        table.contains("port veth-a in, dst 10.77.0.2/32, proto tcp, dport 8000"),
        "{table}"
    );
    env.fails(
        &[
            "net",
            "fw",
            "rule",
            "add",
            "--action",
            "allow",
            "--protocol",
            "icmp",
            "--dport",
            "80",
        ],
        1,
        "port ranges apply to tcp and udp only",
    );
    env.fails(
        &[
            "net", "fw", "rule", "add", "--action", "allow", "--port", "nope",
        ],
        1,
        "no port or tunnel named \"nope\"",
    );
    env.fails(
        &[
            "net",
            "fw",
            "rule",
            "add",
            "--action",
            "allow",
            "--direction",
            "in",
        ],
        2,
        "--port",
    );
    env.fails(
        &[
            "net",
            "fw",
            "rule",
            "add",
            "--action",
            "allow",
            "--src",
            "10.0.0.0/33",
        ],
        1,
        "is not an IPv4 or IPv6 prefix",
    );
    env.fails(
        &[
            "net",
            "fw",
            "rule",
            "add",
            "--action",
            "allow",
            "--protocol",
            "tcp",
            "--sport",
            "90-80",
        ],
        1,
        "above its last",
    );
    env.fails(
        &["net", "fw", "rule", "add", "--action", "permit"],
        2,
        "invalid value",
    );
    env.fails(
        &["net", "fw", "rule", "delete", "99"],
        1,
        "no firewall rule with id 99",
    );
    env.fails(
        &["net", "fw", "rule", "move", "99", "--priority", "1"],
        1,
        "no firewall rule with id 99",
    );
    env.fails(
        &["net", "port", "remove", "veth-a"],
        1,
        "port \"veth-a\" is named by firewall rule 1; delete it first",
    );

    // Tunnels.
    env.fails(
        &[
            "net",
            "vxlan",
            "add",
            "t1",
            "--network",
            "vlan:10",
            "--vni",
            "5000",
            "--uplink",
            "veth-a",
            "--remote-ip",
            "192.0.2.2",
            "--remote-mac",
            "02:00:00:00:00:02",
        ],
        1,
        "is not an uplink port",
    );
    env.fails(
        &[
            "net",
            "vxlan",
            "add",
            "t1",
            "--network",
            "vlan:10",
            "--vni",
            "16777216",
            "--uplink",
            "up0",
            "--remote-ip",
            "192.0.2.2",
            "--remote-mac",
            "02:00:00:00:00:02",
        ],
        1,
        "a VNI has 24 bits",
    );
    let t = env
        .ok(&[
            "-o",
            "json",
            "net",
            "vxlan",
            "add",
            "t1",
            "--network",
            "vlan:10",
            "--vni",
            "5000",
            "--uplink",
            "up0",
            "--remote-ip",
            "192.0.2.2",
            "--remote-mac",
            "02:00:00:00:00:02",
        ])
        .json();
    assert_eq!(t["vni"], 5000);
    env.fails(
        &[
            "net",
            "vxlan",
            "add",
            "t2",
            "--network",
            "vlan:10",
            "--vni",
            "5000",
            "--uplink",
            "up0",
            "--remote-ip",
            "192.0.2.2",
            "--remote-mac",
            "02:00:00:00:00:02",
        ],
        1,
        "already carries VNI 5000",
    );
    env.fails(
        &["net", "port", "remove", "up0"],
        1,
        "uplink of VXLAN tunnel t1",
    );
    env.ok(&[
        "net", "fw", "rule", "add", "--action", "allow", "--port", "t1",
    ]);
    env.fails(
        &["net", "vxlan", "remove", "t1"],
        1,
        "named by firewall rule 4",
    );
    let table = env.ok(&["net", "vxlan", "list"]).stdout;
    assert!(table.contains("192.0.2.2 (02:00:00:00:00:02)"), "{table}");

    // Connections and stats.
    let conns = env
        .ok(&["-o", "json", "net", "fw", "conntrack", "list"])
        .json();
    assert_eq!(conns, Value::Array(vec![]));
    let o = env.ok(&["net", "fw", "conntrack", "flush"]);
    assert!(o.stdout.contains("0 connections flushed"), "{}", o.stdout);
    let s = env.ok(&["-o", "json", "net", "stats"]).json();
    assert_eq!(s["cpu_share"], 0.5);
    assert!(
        s["net_cpu_seconds"].as_f64().is_some_and(|c| c >= 0.0),
        "{s}"
    );
    assert!(
        s["turns"].as_u64().is_some_and(|t| t > 0),
        "the poller runs: {s}"
    );
    assert_eq!(s["ports"].as_array().map(Vec::len), Some(3));
    let o = env.ok(&["net", "stats"]);
    assert!(o.stdout.starts_with("CPU: network "), "{}", o.stdout);

    // Everything comes back after a restart, with the same ids; the next rule gets 5.
    env.restart()?;
    let rules = env.ok(&["-o", "json", "net", "fw", "rule", "list"]).json();
    assert_eq!(ids(&rules), [3, 1, 2, 4]);
    assert_eq!(rules[1]["priority"], 0, "the move was stored");
    let ports = env.ok(&["-o", "json", "net", "port", "list"]).json();
    assert_eq!(ports.as_array().map(Vec::len), Some(3));
    let tunnels = env.ok(&["-o", "json", "net", "vxlan", "list"]).json();
    assert_eq!(tunnels[0]["name"], "t1");
    let r5 = env
        .ok(&["-o", "json", "net", "fw", "rule", "add", "--action", "drop"])
        .json();
    assert_eq!(r5["id"], 5);

    // Removing in dependency order works.
    let o = env.ok(&["net", "fw", "rule", "delete", "4"]);
    assert!(
        o.stdout
            .contains("rule 4 deleted; new connections are refused"),
        "{}",
        o.stdout
    );
    env.ok(&["net", "vxlan", "remove", "t1"]);
    env.ok(&["net", "port", "remove", "up0"]);
    env.fails(
        &["net", "port", "remove", "up0"],
        1,
        "no port named \"up0\"",
    );
    env.fails(
        &["net", "vxlan", "remove", "t1"],
        1,
        "no VXLAN tunnel named \"t1\"",
    );
    let help = env.ok(&["net", "--help"]).stdout;
    assert!(
        help.contains("dpuctl net fw rule add --action allow"),
        "{help}"
    );
    Ok(())
}
