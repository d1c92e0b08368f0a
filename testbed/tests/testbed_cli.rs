//! The `testbed` binary end to end: up, status, faults, down, with the nodes checked
//! over NVMe/TCP by our host library (connect, Identify, I/O) rather than by what the
//! testbed says about itself.
//!
//! No root needed: as root the nodes run in network namespaces, otherwise on
//! loopback; both paths take the same checks. The partition test needs namespaces and
//! is ignored in a plain `cargo test` (scripts/test runs it as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod workspace_bins;
use workspace_bins::build_bin;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use nvmeof::host::{Controller, HostConfig};
use serde_json::Value;
use testbed::procs::{Liveness, ProcId};

/// The nvmeof-target binary of this build, built on demand (a plain `cargo test -p
/// testbed` does not build other packages' binaries).
fn target_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| build_bin("nvmeof", "nvmeof-target"))
        .clone()
}

struct Testbed {
    dir: tempfile::TempDir,
}

impl Testbed {
    fn new() -> Testbed {
        Testbed {
            dir: tempfile::Builder::new()
                .prefix("testbed-cli")
                .tempdir()
                .unwrap(),
        }
    }

    fn workdir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `testbed --workdir W ARGS`, returning (success, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        self.run_env(args, &[])
    }

    fn run_env(&self, args: &[&str], env: &[(&str, &Path)]) -> (bool, String, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_testbed"));
        cmd.arg("--workdir").arg(self.workdir()).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "testbed {args:?} failed:\n{out}\n{err}");
        out
    }

    fn fails(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(!ok, "testbed {args:?} should fail:\n{out}");
        err
    }

    fn up(&self, extra: &[&str]) -> String {
        let bin = target_bin();
        // These tests are about the nodes: dpud has its own test below.
        let mut args = vec!["up", "--nodes-only", "--target-bin", bin.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.ok(&args)
    }

    fn state(&self) -> Value {
        let text = std::fs::read_to_string(self.workdir().join("testbed.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--output", "json"])).unwrap()
    }

    fn node_status(&self, name: &str) -> Value {
        self.status()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap()
            .clone()
    }

    /// Every process the state recorded.
    fn processes(&self) -> Vec<ProcId> {
        self.state()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| serde_json::from_value(n["process"].clone()).ok())
            .collect()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // A failed test must not leave nodes or namespaces behind.
        if self.workdir().join("testbed.json").exists() {
            let _ = self.run(&["down"]);
        }
    }
}

#[derive(Debug, Clone)]
struct NodeInfo {
    name: String,
    addr: SocketAddr,
    nqn: String,
    file: PathBuf,
    process: ProcId,
}

fn nodes(state: &Value) -> Vec<NodeInfo> {
    state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| NodeInfo {
            name: n["name"].as_str().unwrap().into(),
            addr: n["address"].as_str().unwrap().parse().unwrap(),
            nqn: n["nqn"].as_str().unwrap().into(),
            file: n["file"].as_str().unwrap().into(),
            process: serde_json::from_value(n["process"].clone()).unwrap(),
        })
        .collect()
}

fn host_config(n: &NodeInfo) -> HostConfig {
    let mut c = HostConfig::new(n.addr, &n.nqn);
    c.connect_timeout = Duration::from_secs(2);
    c.command_timeout = Duration::from_secs(5);
    c
}

/// Connects, checks Identify and the namespace, and disconnects.
async fn identify(n: &NodeInfo, size: u64) {
    let c = Controller::connect(host_config(n))
        .await
        .unwrap_or_else(|e| panic!("{}: connect: {e}", n.name));
    let id = c.identify().await.unwrap();
    assert_eq!(id.subnqn, n.nqn, "{}", n.name);
    let ns = c.namespaces().await.unwrap();
    assert_eq!(ns.len(), 1, "{}", n.name);
    assert_eq!(
        ns[0].blocks * u64::from(ns[0].block_size),
        size,
        "{}: namespace size",
        n.name
    );
    c.shutdown().await.unwrap();
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

const SIZE: u64 = 64 << 20;

#[test]
fn up_status_faults_restart_corrupt_down() {
    let tb = Testbed::new();
    let out = tb.up(&["--nodes", "3", "--domains", "2", "--node-size", "64MiB"]);
    assert!(out.contains("node2"), "{out}");
    let state = tb.state();
    let ns = nodes(&state);
    assert_eq!(ns.len(), 3);
    let domains: Vec<&str> = state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["domain"].as_str().unwrap())
        .collect();
    assert_eq!(domains, ["rack0", "rack1", "rack0"]);
    for n in &ns {
        let pidfile = tb.workdir().join("nodes").join(format!("{}.pid", n.name));
        assert_eq!(
            std::fs::read_to_string(pidfile).unwrap().trim(),
            n.process.pid.to_string()
        );
        assert_eq!(std::fs::metadata(&n.file).unwrap().len(), SIZE);
    }

    // Status: all alive and accepting; and they really speak NVMe/TCP.
    for n in tb.status()["nodes"].as_array().unwrap() {
        assert_eq!(n["process"], "running", "{n}");
        assert_eq!(n["accepting"], true, "{n}");
    }
    let rt = rt();
    for n in &ns {
        rt.block_on(identify(n, SIZE));
    }

    // A second `up` on the same directory is refused.
    let err = tb.fails(&["up", "--nodes", "1"]);
    assert!(err.contains("already up"), "{err}");

    // Write 1 MiB at 8 MiB through NVMe/TCP: the node's /proc write_bytes counter
    // (what `bench` sums as bytes written to nodes) sees it, and the file holds it.
    let n0 = &ns[0];
    let before = n0.process.io_write_bytes().expect("/proc/PID/io");
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| u8::try_from(i % 251).unwrap() | 1)
        .collect();
    let at: u64 = 8 << 20;
    rt.block_on(async {
        let c = Controller::connect(host_config(n0)).await.unwrap();
        let bs = u64::from(c.namespace(1).await.unwrap().block_size);
        // 128 KiB per command: the target's MDTS.
        for (i, chunk) in data.chunks(128 << 10).enumerate() {
            let off = at + u64::try_from(i * (128 << 10)).unwrap();
            c.write(0, 1, off / bs, Bytes::copy_from_slice(chunk), true)
                .await
                .unwrap();
        }
        c.flush(0, 1).await.unwrap();
        c.shutdown().await.unwrap();
    });
    let after = n0.process.io_write_bytes().unwrap();
    assert!(
        after - before >= 1 << 20,
        "write_bytes rose by {} for a 1 MiB write",
        after - before
    );
    let file_before = std::fs::read(&n0.file).unwrap();
    assert_eq!(&file_before[8 << 20..9 << 20], &data[..]);

    // Corrupt: exactly the printed bytes change, and (SEEK_DATA) inside the data.
    let flips: Value = serde_json::from_str(&tb.ok(&[
        "fault", "corrupt", "node0", "--bytes", "5", "--output", "json",
    ]))
    .unwrap();
    let flips = flips.as_array().unwrap();
    assert_eq!(flips.len(), 5);
    let file_after = std::fs::read(&n0.file).unwrap();
    let mut changed: Vec<u64> = Vec::new();
    for (i, (a, b)) in file_before.iter().zip(&file_after).enumerate() {
        if a != b {
            changed.push(u64::try_from(i).unwrap());
        }
    }
    let printed: Vec<u64> = flips
        .iter()
        .map(|f| f["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(changed, printed, "changed bytes vs printed flips");
    for f in flips {
        let o = usize::try_from(f["offset"].as_u64().unwrap()).unwrap();
        assert_eq!(f["before"].as_u64().unwrap(), u64::from(file_before[o]));
        assert_eq!(f["after"].as_u64().unwrap(), u64::from(file_after[o]));
        assert!(
            (8 << 20..9 << 20).contains(&o),
            "flip at {o} outside the written data"
        );
    }
    // The node serves the corrupted bytes (nothing cached them away).
    let first = usize::try_from(printed[0]).unwrap();
    let read = rt.block_on(async {
        let c = Controller::connect(host_config(n0)).await.unwrap();
        let bs = usize::try_from(c.namespace(1).await.unwrap().block_size).unwrap();
        let lba = u64::try_from(first / bs).unwrap();
        let b = c.read(0, 1, lba, 1).await.unwrap();
        c.shutdown().await.unwrap();
        (b[first % bs], file_after[first])
    });
    assert_eq!(read.0, read.1);
    // The text form prints the same kind of lines.
    let text = tb.ok(&[
        "fault", "corrupt", "node0", "--offset", "4096", "--bytes", "2",
    ]);
    assert!(text.contains("offset 4096 (0x1000)"), "{text}");
    assert!(text.contains("offset 4097 (0x1001)"), "{text}");

    // Kill: dead, port refuses; restart: alive on the same address and NVMe works.
    tb.ok(&["fault", "kill", "node1"]);
    let s = tb.node_status("node1");
    assert_eq!(s["process"], "dead", "{s}");
    assert_eq!(s["accepting"], false, "{s}");
    assert_eq!(ns[1].process.liveness(), Liveness::Dead);
    let err = tb.fails(&["fault", "kill", "node1"]);
    assert!(err.contains("not running"), "{err}");
    tb.ok(&["fault", "restart", "node1"]);
    let s = tb.node_status("node1");
    assert_eq!(s["process"], "running", "{s}");
    assert_eq!(s["accepting"], true, "{s}");
    let n1 = nodes(&tb.state())[1].clone();
    assert_eq!(n1.addr, ns[1].addr);
    assert_ne!(n1.process, ns[1].process);
    rt.block_on(identify(&n1, SIZE));

    // Stop / cont.
    tb.ok(&["fault", "stop", "node2"]);
    assert_eq!(tb.node_status("node2")["process"], "stopped");
    // A stopped node still completes TCP handshakes, but NVMe gets no answer.
    let s: Value = serde_json::from_str(&tb.ok(&["status", "--nvme", "--output", "json"])).unwrap();
    for n in s["nodes"].as_array().unwrap() {
        let nvme = n["nvme"].as_str().unwrap();
        if n["name"] == "node2" {
            assert_eq!(n["accepting"], true, "{n}");
            assert!(!nvme.starts_with("ok"), "a stopped node answered NVMe: {n}");
        } else {
            assert!(nvme.starts_with("ok: 1 namespace(s), 64 MiB"), "{n}");
        }
    }
    tb.ok(&["fault", "cont", "node2"]);
    assert_eq!(tb.node_status("node2")["process"], "running");
    rt.block_on(identify(&ns[2], SIZE));

    let err = tb.fails(&["fault", "kill", "node9"]);
    assert!(err.contains("no node \"node9\""), "{err}");

    // Down: no process left, node files kept, state gone.
    let procs = tb.processes();
    assert_eq!(procs.len(), 3);
    tb.ok(&["down"]);
    for p in procs {
        assert_eq!(p.liveness(), Liveness::Dead, "pid {} survived down", p.pid);
    }
    assert!(!tb.workdir().join("testbed.json").exists());
    assert!(n0.file.exists(), "down keeps the backing files");
    let err = tb.fails(&["status"]);
    assert!(err.contains("no testbed"), "{err}");
    if state["network"] == "netns" {
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        for n in state["nodes"].as_array().unwrap() {
            let name = n["netns"]["name"].as_str().unwrap();
            assert!(
                !list.split_whitespace().any(|w| w == name),
                "namespace {name} left behind"
            );
        }
    }

    // Up again reuses the files: the data written before is still there.
    tb.up(&["--nodes", "1", "--node-size", "64MiB"]);
    let n0 = nodes(&tb.state())[0].clone();
    let back = rt.block_on(async {
        let c = Controller::connect(host_config(&n0)).await.unwrap();
        let bs = u64::from(c.namespace(1).await.unwrap().block_size);
        let b = c.read(0, 1, (9 << 20) / bs - 1, 1).await.unwrap();
        c.shutdown().await.unwrap();
        b
    });
    let bs = back.len();
    assert_eq!(&back[..], &file_after[(9 << 20) - bs..9 << 20]);
    tb.ok(&["down", "--purge"]);
    assert!(!n0.file.exists(), "--purge removes the node files");
}

#[test]
fn loopback_mode_has_no_partition_and_size_mismatch_is_refused() {
    let tb = Testbed::new();
    tb.up(&["--nodes", "1", "--net", "loopback", "--node-size", "4MiB"]);
    let state = tb.state();
    assert_eq!(state["network"], "loopback");
    let n = nodes(&state)[0].clone();
    assert!(n.addr.ip().is_loopback());
    rt().block_on(identify(&n, 4 << 20));
    let err = tb.fails(&["fault", "partition", "node0"]);
    assert!(err.contains("partition is unavailable"), "{err}");
    for f in ["kill", "restart"] {
        let err = tb.fails(&["fault", f, "dpud"]);
        assert!(
            err.contains("this testbed has no dpud (--nodes-only)"),
            "{err}"
        );
    }
    tb.ok(&["down"]);
    let err = tb.fails(&[
        "up",
        "--nodes",
        "1",
        "--net",
        "loopback",
        "--node-size",
        "8MiB",
    ]);
    assert!(err.contains("use the same --node-size"), "{err}");
    let err = tb.fails(&["up", "--nodes", "0"]);
    assert!(err.contains("at least 1"), "{err}");
    let err = tb.fails(&["up", "--nodes", "1", "--node-size", "12QB"]);
    assert!(err.contains("unknown size unit"), "{err}");
}

#[test]
#[ignore = "needs root and network namespaces"]
fn partition_makes_a_node_unreachable_until_heal() {
    let tb = Testbed::new();
    tb.up(&["--nodes", "2", "--net", "netns", "--node-size", "4MiB"]);
    let ns = nodes(&tb.state());
    let rt = rt();
    for n in &ns {
        rt.block_on(identify(n, 4 << 20));
    }
    // An association made before the partition, to see it stall.
    let before = rt
        .block_on(Controller::connect(host_config(&ns[0])))
        .unwrap();

    tb.ok(&["fault", "partition", "node0"]);
    let s = tb.node_status("node0");
    assert_eq!(s["link"], "down (partitioned)", "{s}");
    assert_eq!(s["accepting"], false, "{s}");
    assert_eq!(s["process"], "running", "a partition is not a crash: {s}");
    let fresh = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            Controller::connect(host_config(&ns[0])),
        )
        .await
    });
    assert!(
        !matches!(fresh, Ok(Ok(_))),
        "a partitioned node accepted an NVMe connection"
    );
    let stalled = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(3), before.read(0, 1, 0, 1)).await
    });
    assert!(
        !matches!(stalled, Ok(Ok(_))),
        "a read crossed the partition"
    );
    // The other node is unaffected.
    rt.block_on(identify(&ns[1], 4 << 20));

    tb.ok(&["fault", "heal", "node0"]);
    assert_eq!(tb.node_status("node0")["link"], "up");
    rt.block_on(identify(&ns[0], 4 << 20));
    drop(before);
    tb.ok(&["down"]);
}

#[test]
fn up_starts_dpud_and_registers_the_nodes_or_says_why_not() {
    let dpud = build_bin("engine", "dpud");
    let dpuctl = build_bin("cli", "dpuctl");
    let tb = Testbed::new();
    let bin = target_bin();
    let (ok, out, err) = tb.run_env(
        &[
            "up",
            "--nodes",
            "3",
            "--domains",
            "3",
            "--node-size",
            "64MiB",
            "--target-bin",
            bin.to_str().unwrap(),
        ],
        &[("TESTBED_DPUD", &dpud), ("TESTBED_DPUCTL", &dpuctl)],
    );
    assert!(ok, "up failed:\n{out}\n{err}");
    let state = tb.state();
    let socket = tb.workdir().join("daemon/api.sock");
    let config = std::fs::read_to_string(tb.workdir().join("daemon/dpud.toml")).unwrap();
    assert!(config.contains("[nbd]"), "{config}");
    if state["daemon"].is_null() {
        // dpud refused to run: `up` must say so with dpud's own reason, and leave no
        // dpud answering.
        let note = state["daemon_note"].as_str().unwrap();
        assert!(note.starts_with("dpud stopped at start"), "{note}");
        assert!(note.contains("Error: "), "dpud's reason is missing: {note}");
        assert!(out.contains("storage nodes only"), "{out}");
        assert!(
            std::os::unix::net::UnixStream::connect(&socket).is_err(),
            "something answers on dpud's socket"
        );
        let status = tb.ok(&["status"]);
        assert!(
            status.contains("not started: dpud stopped at start"),
            "{status}"
        );
        eprintln!("dpud did not run: {note}");
    } else {
        let d: ProcId = serde_json::from_value(state["daemon"]["process"].clone()).unwrap();
        assert_eq!(d.liveness(), Liveness::Running);
        let run = |args: &[&str]| {
            let o = Command::new(&dpuctl)
                .arg("--socket")
                .arg(&socket)
                .args(args)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "dpuctl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let nodes = run(&["node", "list", "--output", "json"]);
        for n in tb.state()["nodes"].as_array().unwrap() {
            assert!(nodes.contains(n["name"].as_str().unwrap()), "{nodes}");
            assert!(nodes.contains(n["domain"].as_str().unwrap()), "{nodes}");
        }
        let profiles = run(&["profile", "list", "--output", "json"]);
        for p in [
            "default",
            "tb-none",
            "tb-mirror2",
            "tb-ec42",
            "tb-ec42-zstd-aes",
        ] {
            assert!(
                profiles.contains(&format!("\"{p}\"")),
                "{p} missing: {profiles}"
            );
        }
        tb.ok(&["down"]);
        assert_eq!(d.liveness(), Liveness::Dead, "dpud survived down");
    }
    tb.ok(&["down", "--purge"]);
}
