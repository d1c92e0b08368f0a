//! dpuctl end to end: the real binary against a daemon running in this process around
//! the engine's test double (`engine::api::testing::MemoryVolumeService`), over the
//! daemon's real Unix socket. Every command, both output formats, and every error the
//! issue names (unknown profile, a profile the cluster cannot satisfy with placement's
//! reason, the daemon not running with the hint).

mod common;

use std::process::Command;
use std::sync::Arc;

use common::Env;
use engine::api::service::{VolumeService, VolumeState};
use engine::api::testing::{MemoryVolumeService, TestDaemon};
use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn profile_commands() -> TestResult {
    let env = Env::start()?;
    // The store starts with the built-in profiles.
    let list = env.ok(&["--output", "json", "profile", "list"]).json();
    let names: Vec<&str> = list
        .as_array()
        .ok_or("not an array")?
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(
        names.contains(&"default") && names.contains(&"durable"),
        "{names:?}"
    );
    let table = env.ok(&["profile", "list"]).stdout;
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("unsatisfiable"), "no nodes yet: {table}");

    // From a TOML file.
    let file = env.dir.path().join("gold.toml");
    std::fs::write(
        &file,
        "schema_version = 1\nname = \"gold\"\nprotection = \"mirror:2\"\nfailure_domain = \"node\"\ncompression = \"zstd:3\"\n",
    )?;
    let o = env.ok(&["profile", "create", "--file", file.to_str().ok_or("path")?]);
    assert!(o.stdout.contains("profile gold created"), "{}", o.stdout);
    // From a JSON file.
    let jfile = env.dir.path().join("silver.json");
    std::fs::write(
        &jfile,
        r#"{"schema_version": 1, "name": "silver", "protection": "ec:2+1", "failure_domain": "rack"}"#,
    )?;
    env.ok(&["profile", "create", "-f", jfile.to_str().ok_or("path")?]);
    // From flags.
    let p = env
        .ok(&[
            "-o",
            "json",
            "profile",
            "create",
            "--name",
            "bronze",
            "--protection",
            "none",
            "--failure-domain",
            "node",
            "--compression",
            "lz4",
            "--max-iops",
            "500",
        ])
        .json();
    assert_eq!(p["compression"], "lz4");
    assert_eq!(p["max_iops"], 500);
    assert_eq!(p["satisfiable"], false);

    // Show, in both formats.
    let show = env.ok(&["profile", "show", "gold"]).stdout;
    assert!(show.contains("protection = \"mirror:2\""), "{show}");
    let g = env.ok(&["-o", "json", "profile", "show", "gold"]).json();
    assert_eq!(g["protection"], "mirror:2");
    assert_eq!(g["compression"], "zstd:3");

    // Edit: flags, a file, and $EDITOR.
    let g = env
        .ok(&[
            "-o",
            "json",
            "profile",
            "edit",
            "gold",
            "--compression",
            "zstd:9",
        ])
        .json();
    assert_eq!(g["compression"], "zstd:9");
    assert_eq!(g["protection"], "mirror:2", "other fields kept");
    std::fs::write(
        &file,
        "schema_version = 1\nname = \"gold\"\nprotection = \"mirror:3\"\nfailure_domain = \"node\"\n",
    )?;
    let g = env
        .ok(&[
            "-o",
            "json",
            "profile",
            "edit",
            "gold",
            "--file",
            file.to_str().ok_or("path")?,
        ])
        .json();
    assert_eq!(g["protection"], "mirror:3");
    assert_eq!(g["compression"], "off", "a file replaces the whole profile");
    let o = env.run_with(
        &["profile", "edit", "gold"],
        &[("EDITOR", "sed -i s/mirror:3/mirror:4/")],
    );
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let g = env.ok(&["-o", "json", "profile", "show", "gold"]).json();
    assert_eq!(g["protection"], "mirror:4");
    env.fails(&["profile", "edit", "gold"], 2, "set EDITOR");
    // Renaming through edit is refused.
    env.fails(
        &["profile", "edit", "gold", "--name", "platinum"],
        1,
        "cannot be renamed",
    );

    // Errors from the daemon, verbatim.
    env.fails(
        &["profile", "create", "--file", file.to_str().ok_or("path")?],
        1,
        "a profile named \"gold\" already exists",
    );
    env.fails(
        &[
            "profile",
            "create",
            "--name",
            "x",
            "--protection",
            "ec:4+9",
            "--failure-domain",
            "node",
        ],
        1,
        "M = 9 parity strips is outside 1 to 4",
    );
    std::fs::write(&file, "schema_version = 1\nname = \"typo\"\nprotection = \"none\"\nfailure_domain = \"node\"\ncompresion = \"lz4\"\n")?;
    env.fails(
        &["profile", "create", "--file", file.to_str().ok_or("path")?],
        1,
        "compresion",
    );
    env.fails(&["profile", "show", "nope"], 1, "unknown profile \"nope\"");
    env.fails(
        &["profile", "create", "--file", "/nonexistent/p.toml"],
        4,
        "cannot read",
    );
    env.fails(&["profile", "create", "--name", "x"], 2, "--protection");

    // Delete, and a profile in use cannot be deleted.
    env.ok(&["profile", "delete", "bronze"]);
    env.fails(&["profile", "show", "bronze"], 1, "unknown profile");
    env.add_nodes(2);
    // gold is mirror:4 now: two nodes cannot hold it.
    env.fails(
        &[
            "volume",
            "create",
            "v1",
            "--profile",
            "gold",
            "--size",
            "1MiB",
        ],
        1,
        "cannot satisfy",
    );
    env.ok(&["profile", "edit", "gold", "--protection", "mirror:2"]);
    env.ok(&[
        "volume",
        "create",
        "v1",
        "--profile",
        "gold",
        "--size",
        "1MiB",
    ]);
    env.fails(
        &["profile", "delete", "gold"],
        1,
        "profile \"gold\" is used by volume v1",
    );
    let d = env
        .ok(&["-o", "json", "profile", "delete", "silver"])
        .json();
    assert_eq!(d["result"], "deleted");
    Ok(())
}

#[test]
fn node_commands() -> TestResult {
    let env = Env::start()?;
    let o = env.ok(&[
        "node",
        "add",
        "n1",
        "--address",
        "10.0.0.1:4420",
        "--nqn",
        "nqn.2026-11.io.example:n1",
        "--domain",
        "rack1",
        "--weight",
        "3",
    ]);
    assert!(o.stdout.contains("node n1 added"), "{}", o.stdout);
    env.ok(&[
        "node",
        "add",
        "n2",
        "--address",
        "10.0.0.2:4420",
        "--nqn",
        "nqn.2026-11.io.example:n2",
    ]);
    let list = env.ok(&["-o", "json", "node", "list"]).json();
    let arr = list.as_array().ok_or("array")?;
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["domain"], "rack1/n1");
    assert_eq!(arr[0]["weight"], 3);
    assert_eq!(arr[0]["state"], "up");
    assert_eq!(arr[0]["reachable"], true);
    assert_eq!(arr[1]["domain"], "n2/n2", "no --domain: its own domain");
    let table = env.ok(&["node", "list"]).stdout;
    assert!(table.contains("10.0.0.2:4420"), "{table}");

    let d = env.ok(&["-o", "json", "node", "drain", "n1"]).json();
    assert_eq!(d["state"], "draining");
    let r = env.ok(&["-o", "json", "node", "remove", "n2"]).json();
    assert_eq!(r["state"], "removed");
    // The engine got every change.
    let nodes = env.service().nodes();
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[0].state.to_string(), "draining");
    assert_eq!(nodes[1].state.to_string(), "removed");

    env.fails(
        &[
            "node",
            "add",
            "n1",
            "--address",
            "10.0.0.9:4420",
            "--nqn",
            "nqn.2026-11.io.example:n9",
        ],
        1,
        "already registered",
    );
    env.fails(
        &[
            "node",
            "add",
            "n3",
            "--address",
            "10.0.0.3",
            "--nqn",
            "nqn.2026-11.io.example:n3",
        ],
        1,
        "has no port",
    );
    env.fails(
        &[
            "node",
            "add",
            "n3",
            "--address",
            "10.0.0.3:4420",
            "--nqn",
            "bogus",
        ],
        1,
        "does not start with \"nqn.\"",
    );
    env.fails(
        &[
            "node",
            "add",
            "n3",
            "--address",
            "10.0.0.3:4420",
            "--nqn",
            "nqn.2026-11.io.example:n3",
            "--domain",
            "dc1/rack1",
        ],
        1,
        "levels are rack/node",
    );
    env.fails(
        &[
            "node",
            "add",
            "bad/name",
            "--address",
            "10.0.0.3:4420",
            "--nqn",
            "nqn.x:y",
        ],
        1,
        "not valid",
    );
    env.fails(
        &["node", "drain", "ghost"],
        1,
        "there is no node named \"ghost\"",
    );
    env.fails(&["node", "drain", "n2"], 1, "cannot be drained");
    env.fails(&["node", "add", "n3"], 2, "--address");
    // A removed node's name may be registered again.
    env.ok(&[
        "node",
        "add",
        "n2",
        "--address",
        "10.0.0.2:4420",
        "--nqn",
        "nqn.2026-11.io.example:n2",
    ]);
    Ok(())
}

#[test]
fn volume_commands_and_errors() -> TestResult {
    let env = Env::start()?;
    env.add_nodes(3);
    // default is ec:auto:1: three racks give 2+1.
    let v = env
        .ok(&[
            "-o",
            "json",
            "volume",
            "create",
            "db1",
            "--profile",
            "default",
            "--size",
            "64MiB",
        ])
        .json();
    assert_eq!(v["layout"], "ec:2+1");
    assert_eq!(v["size_bytes"], 64u64 << 20);
    assert_eq!(v["state"], "healthy");
    let o = env.ok(&[
        "volume",
        "create",
        "db2",
        "--profile",
        "fast",
        "--size",
        "1GiB",
    ]);
    assert!(
        o.stdout.contains("volume db2 created") && o.stdout.contains("1GiB"),
        "{}",
        o.stdout
    );
    let list = env.ok(&["-o", "json", "volume", "list"]).json();
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    let show = env.ok(&["volume", "show", "db1"]).stdout;
    assert!(show.contains("64MiB") && show.contains("ec:2+1"), "{show}");
    let r = env
        .ok(&["-o", "json", "volume", "resize", "db1", "--size", "128M"])
        .json();
    assert_eq!(r["size_bytes"], 128u64 << 20);

    // The errors an operator must be able to act on.
    env.fails(
        &[
            "volume",
            "create",
            "x",
            "--profile",
            "gold",
            "--size",
            "1GiB",
        ],
        1,
        "unknown profile \"gold\"; the profiles are: default, durable, fast, rack-mirror, scratch",
    );
    let o = env.fails(
        &[
            "volume",
            "create",
            "x",
            "--profile",
            "durable",
            "--size",
            "1GiB",
        ],
        1,
        "the cluster cannot satisfy profile \"durable\"",
    );
    assert!(
        o.stderr
            .contains("ec:auto:2 needs 6 failure domains at level node; the cluster has 3"),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains("use mirror:3"),
        "placement's hint: {}",
        o.stderr
    );
    env.fails(
        &[
            "volume",
            "create",
            "db1",
            "--profile",
            "fast",
            "--size",
            "1GiB",
        ],
        1,
        "already exists",
    );
    env.fails(
        &[
            "volume",
            "create",
            "x",
            "--profile",
            "fast",
            "--size",
            "1000",
        ],
        1,
        "multiple of 4096",
    );
    env.fails(
        &["volume", "create", "x", "--profile", "fast", "--size", "0"],
        1,
        "positive multiple",
    );
    env.fails(
        &[
            "volume",
            "create",
            "x",
            "--profile",
            "fast",
            "--size",
            "10XB",
        ],
        2,
        "unknown size unit",
    );
    env.fails(
        &[
            "volume",
            "create",
            "-bad",
            "--profile",
            "fast",
            "--size",
            "1M",
        ],
        2,
        "",
    );
    env.fails(
        &[
            "volume",
            "create",
            "bad!",
            "--profile",
            "fast",
            "--size",
            "1M",
        ],
        1,
        "volume name \"bad!\" is not valid",
    );
    env.fails(
        &["volume", "resize", "db1", "--size", "4MiB"],
        1,
        "do not shrink",
    );
    env.fails(
        &["volume", "show", "nope"],
        1,
        "there is no volume named \"nope\"",
    );
    env.fails(
        &["volume", "delete", "nope"],
        1,
        "there is no volume named \"nope\"",
    );
    // With --output json the error is JSON too, on standard error.
    let o = env.fails(&["-o", "json", "volume", "show", "nope"], 1, "");
    let e: Value = serde_json::from_str(o.stderr.trim())?;
    assert_eq!(e["error"]["kind"], "NotFound");
    assert_eq!(e["error"]["exit_code"], 1);
    assert!(e["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("no volume named"));

    // A volume in use by an export cannot be deleted.
    env.ok(&["export", "add", "db1", "--type", "nbd"]);
    env.fails(
        &["volume", "delete", "db1"],
        1,
        "volume \"db1\" is in use by export db1",
    );
    env.ok(&["export", "remove", "db1"]);
    let d = env.ok(&["volume", "delete", "db1"]);
    assert!(d.stdout.contains("volume db1 deleted"), "{}", d.stdout);
    let list = env.ok(&["-o", "json", "volume", "list"]).json();
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    Ok(())
}

#[test]
fn export_commands() -> TestResult {
    let env = Env::start()?;
    env.add_nodes(2);
    env.ok(&[
        "volume",
        "create",
        "v",
        "--profile",
        "fast",
        "--size",
        "4MiB",
    ]);
    let e = env
        .ok(&["-o", "json", "export", "add", "v", "--type", "nbd"])
        .json();
    assert_eq!(e["name"], "v");
    assert_eq!(e["type"], "nbd");
    assert_eq!(e["read_only"], false);
    assert_eq!(e["served"], true, "{e}");
    assert!(
        e["detail"]
            .as_str()
            .unwrap_or("")
            .starts_with("nbd+unix:///v?socket="),
        "{e}"
    );
    let e = env
        .ok(&[
            "-o",
            "json",
            "export",
            "add",
            "v",
            "--type",
            "nbd",
            "--name",
            "v-ro",
            "--read-only",
        ])
        .json();
    assert_eq!(e["read_only"], true);
    let list = env.ok(&["-o", "json", "export", "list"]).json();
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    let table = env.ok(&["export", "list"]).stdout;
    assert!(table.contains("v-ro") && table.contains("ro"), "{table}");
    let v = env.ok(&["-o", "json", "volume", "show", "v"]).json();
    assert_eq!(v["exports"], serde_json::json!(["v", "v-ro"]));

    let e = env
        .ok(&[
            "-o",
            "json",
            "export",
            "add",
            "v",
            "--type",
            "vhost-user-blk",
            "--name",
            "v-vhost",
        ])
        .json();
    assert_eq!(e["type"], "vhost-user-blk");
    let table = env.ok(&["export", "list"]).stdout;
    assert!(table.contains("v-vhost.sock"), "{table}");
    env.ok(&["export", "remove", "v-vhost"]);
    env.fails(
        &[
            "export", "add", "v", "--type", "nvme-tcp", "--name", "v-nvme",
        ],
        1,
        "needs at least one allowed host NQN",
    );
    env.fails(
        &[
            "export",
            "add",
            "v",
            "--type",
            "nvme-tcp",
            "--name",
            "v-nvme",
            "--allow-host",
            "host one",
        ],
        1,
        "is not valid",
    );
    let host = "nqn.2014-08.org.nvmexpress:uuid:0f0e0d0c-0000-0000-0000-000000000001";
    let e = env
        .ok(&[
            "-o",
            "json",
            "export",
            "add",
            "v",
            "--type",
            "nvme-tcp",
            "--name",
            "v-nvme",
            "--allow-host",
            host,
        ])
        .json();
    assert_eq!(e["type"], "nvme-tcp");
    assert_eq!(e["served"], true);
    assert_eq!(e["allowed_hosts"], serde_json::json!([host]));
    assert_eq!(e["nvme_subnqn"], "nqn.2026-11.io.dpu-offload:export:v-nvme");
    let addr = e["nvme_address"].as_str().unwrap_or_default().to_owned();
    assert!(addr.starts_with("127.0.0.1:"), "{e}");
    let table = env.ok(&["export", "list"]).stdout;
    let port = addr.trim_start_matches("127.0.0.1:");
    assert!(
        table.contains(&format!(
            "nvme connect -t tcp -a 127.0.0.1 -s {port} -n nqn.2026-11.io.dpu-offload:export:v-nvme"
        )),
        "{table}"
    );
    env.ok(&["export", "remove", "v-nvme"]);
    env.fails(
        &["export", "add", "v", "--type", "nbd"],
        1,
        "an export named \"v\" already exists",
    );
    env.fails(
        &["export", "add", "ghost", "--type", "nbd"],
        1,
        "there is no volume named \"ghost\"",
    );
    env.fails(
        &["export", "add", "v", "--type", "iscsi"],
        2,
        "invalid value",
    );
    env.fails(
        &["export", "remove", "ghost"],
        1,
        "there is no export named \"ghost\"",
    );
    env.ok(&["export", "remove", "v-ro"]);
    let list = env.ok(&["-o", "json", "export", "list"]).json();
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    Ok(())
}

#[test]
fn status_reports_health_degraded_volumes_and_rebuilds() -> TestResult {
    let env = Env::start()?;
    env.add_nodes(3);
    env.ok(&[
        "volume",
        "create",
        "a",
        "--profile",
        "default",
        "--size",
        "1MiB",
    ]);
    env.ok(&[
        "volume",
        "create",
        "b",
        "--profile",
        "default",
        "--size",
        "1MiB",
    ]);
    let s = env.ok(&["-o", "json", "status"]).json();
    assert_eq!(s["health"], "healthy");
    assert_eq!(s["nodes_total"], 3);
    assert_eq!(s["volumes_total"], 2);
    assert_eq!(s["problems"], serde_json::json!([]));

    let svc = env.service();
    svc.set_node_status("n2", false, 7, Some("connection refused"));
    svc.set_volume_state("b", VolumeState::Rebuilding, 12);
    svc.set_rebuild("b", 1 << 19, 1 << 20);
    let s = env.ok(&["-o", "json", "status"]).json();
    assert_eq!(s["health"], "degraded");
    assert_eq!(s["nodes_unreachable"], 1);
    assert_eq!(s["degraded_volumes"][0]["name"], "b");
    assert_eq!(s["degraded_volumes"][0]["state"], "rebuilding");
    assert_eq!(s["degraded_volumes"][0]["pending_repairs"], 12);
    assert_eq!(s["rebuilds"][0]["done_bytes"], 1 << 19);
    let problems = s["problems"].to_string();
    assert!(
        problems.contains("node n2 (127.0.0.1:4422) is not reachable: connection refused"),
        "{problems}"
    );
    let table = env.ok(&["status"]).stdout;
    assert!(
        table.contains("health:  degraded") && table.contains("50%"),
        "{table}"
    );
    let nodes = env.ok(&["-o", "json", "node", "list"]).json();
    assert_eq!(nodes[1]["reachable"], false);
    assert_eq!(nodes[1]["errors"], 7);
    Ok(())
}

#[test]
fn daemon_not_running_gives_the_hint_and_exit_3() -> TestResult {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("api.sock");
    let o = Command::new(env!("CARGO_BIN_EXE_dpuctl"))
        .args(["--socket", sock.to_str().ok_or("path")?, "volume", "list"])
        .output()?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("is dpud running? start it with `dpud --config"),
        "{stderr}"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_dpuctl"))
        .args([
            "--socket",
            sock.to_str().ok_or("path")?,
            "-o",
            "json",
            "status",
        ])
        .output()?;
    assert_eq!(o.status.code(), Some(3));
    let e: Value = serde_json::from_slice(&o.stderr)?;
    assert_eq!(e["error"]["kind"], "Unreachable");
    assert!(e["error"]["hint"]
        .as_str()
        .unwrap_or("")
        .contains("is dpud running?"));
    // DPUD_SOCKET is the default socket.
    let o = Command::new(env!("CARGO_BIN_EXE_dpuctl"))
        .args(["status"])
        .env("DPUD_SOCKET", &sock)
        .output()?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains(sock.to_str().ok_or("path")?), "{stderr}");
    Ok(())
}

#[test]
fn usage_help_and_completions() -> TestResult {
    let bin = env!("CARGO_BIN_EXE_dpuctl");
    let o = Command::new(bin).output()?;
    assert_eq!(o.status.code(), Some(2));
    let o = Command::new(bin).arg("--help").output()?;
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains("Examples:") && help.contains("Exit codes:"),
        "{help}"
    );
    let o = Command::new(bin)
        .args(["volume", "create", "--help"])
        .output()?;
    assert!(String::from_utf8_lossy(&o.stdout).contains("--size"));
    for shell in ["bash", "zsh", "fish"] {
        let o = Command::new(bin).args(["completions", shell]).output()?;
        assert_eq!(o.status.code(), Some(0));
        let script = String::from_utf8_lossy(&o.stdout);
        assert!(
            script.contains("dpuctl") && script.contains("profile"),
            "{shell}"
        );
    }
    let o = Command::new(bin).args(["completions", "tcsh"]).output()?;
    assert_eq!(o.status.code(), Some(2));
    Ok(())
}

#[test]
fn exports_and_nodes_survive_a_daemon_restart() -> TestResult {
    let mut env = Env::start()?;
    env.add_nodes(2);
    env.ok(&[
        "volume",
        "create",
        "v",
        "--profile",
        "fast",
        "--size",
        "1MiB",
    ]);
    env.ok(&["export", "add", "v", "--type", "nbd"]);
    env.ok(&[
        "profile",
        "create",
        "--name",
        "p2",
        "--protection",
        "mirror:2",
        "--failure-domain",
        "rack",
    ]);
    let service = env.service();
    let d = env.daemon.take().ok_or("daemon")?;
    let config = d.config.clone();
    env.rt.block_on(d.handle.shutdown())?;
    assert!(service.was_shut_down(), "shutdown flushed the engine");
    // The engine keeps its volumes (they live on the nodes); the daemon restores the
    // rest from its store.
    let fresh = Arc::new(MemoryVolumeService::new(&config.cluster.levels));
    env.rt.block_on(fresh.set_nodes(service.nodes()))?;
    let created = env.rt.block_on(
        fresh.create_volume(
            "v",
            placement::builtin_profiles()
                .into_iter()
                .find(|p| p.name == "scratch")
                .ok_or("scratch")?,
            1 << 20,
        ),
    );
    assert!(created.is_ok());
    env.daemon = Some(
        env.rt
            .block_on(TestDaemon::start_with(config, Arc::clone(&fresh)))?,
    );
    assert_eq!(
        fresh.nodes().len(),
        2,
        "nodes handed to the engine at start"
    );
    let nodes = env.ok(&["-o", "json", "node", "list"]).json();
    assert_eq!(nodes.as_array().map(Vec::len), Some(2));
    let exports = env.ok(&["-o", "json", "export", "list"]).json();
    assert_eq!(exports[0]["name"], "v");
    let p = env.ok(&["-o", "json", "profile", "show", "p2"]).json();
    assert_eq!(p["failure_domain"], "rack");
    Ok(())
}
