//! The loopback cluster: storage nodes (and later dpud) started from one work directory.
//!
//! Every `testbed` command is a short-lived process, so everything a later command
//! needs is in the work directory: `testbed.json` (the state: nodes, addresses, NQNs,
//! domains, files, pids with their start times), a pid file, a log and a backing file
//! per node. The state is rewritten after every change, so a failure half-way through
//! `up` still leaves `down` enough to clean up. Backing files are sparse and survive
//! `down`; `up` reuses them, so data outlives a restart of the cluster unless `--purge`.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::daemon::{self, DaemonRecord};
use crate::netns::{self, Netns};
use crate::procs::{Liveness, ProcId};
use crate::Error;

/// Name of the state file in the work directory.
pub const STATE_FILE: &str = "testbed.json";
/// The default work directory (relative to the current directory).
pub const DEFAULT_WORKDIR: &str = ".work/testbed";
/// Port nodes listen on inside their own namespaces.
pub const NETNS_PORT: u16 = 4420;
/// Bytes at the start of each node's backing file that belong to metadata
/// (superblock and metadata area), left alone by `fault corrupt` by default.
pub const RESERVED_BYTES: u64 = 1 << 20;

/// How nodes are networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// All nodes on 127.0.0.1, each on its own port; no partitions.
    Loopback,
    /// Each node in its own network namespace behind a veth pair.
    Netns,
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetChoice {
    /// Namespaces when root and `ip netns` work, else loopback.
    Auto,
    /// Loopback only.
    Loopback,
    /// Namespaces or fail.
    Netns,
}

/// One storage node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// `node0`, `node1`, ...
    pub name: String,
    /// Where it listens (port 0 until the first start on loopback).
    pub address: SocketAddr,
    /// Subsystem NQN.
    pub nqn: String,
    /// Failure domain (`rack0`, ...).
    pub domain: String,
    /// Sparse backing file.
    pub file: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Process id while started (also in the pid file).
    pub pid: Option<u32>,
    /// Process identity (pid and start time) while started.
    pub process: Option<ProcId>,
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// Its namespace when the cluster runs in namespaces.
    pub netns: Option<Netns>,
}

/// The work directory's state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Format version.
    pub version: u32,
    /// Absolute work directory.
    pub workdir: PathBuf,
    /// The `nvmeof-target` binary the nodes run.
    pub target_bin: PathBuf,
    /// How nodes are networked.
    pub network: NetMode,
    /// Why namespaces were not used, when they were not.
    pub network_note: Option<String>,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// dpud, once the testbed starts it.
    pub daemon: Option<DaemonRecord>,
    /// What `up` said about the control plane (why dpud was not started).
    pub daemon_note: Option<String>,
}

/// Options of `testbed up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Work directory.
    pub workdir: PathBuf,
    /// Number of nodes.
    pub nodes: usize,
    /// Number of failure domains (nodes assigned round-robin).
    pub domains: usize,
    /// Backing file size per node in bytes.
    pub node_size: u64,
    /// `nvmeof-target` binary (else `TESTBED_NVMEOF_TARGET`, next to `testbed`, PATH).
    pub target_bin: Option<PathBuf>,
    /// Networking.
    pub network: NetChoice,
    /// Skip dpud even when it is available.
    pub nodes_only: bool,
}

/// Finds a binary: explicit path, then an environment variable, then next to the
/// running executable (cargo puts a workspace's binaries together), then PATH.
pub fn find_binary(name: &str, explicit: Option<&Path>, env: &str) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("{} does not exist", p.display()))
        };
    }
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{env}={} does not exist", p.display()))
        };
    }
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        // Test executables live in target/<profile>/deps.
        for _ in 0..2 {
            if let Some(d) = &dir {
                let c = d.join(name);
                if c.is_file() {
                    return Ok(c);
                }
                dir = d.parent().map(Path::to_path_buf);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let c = d.join(name);
            if c.is_file() {
                return Ok(c);
            }
        }
    }
    Err(format!(
        "cannot find {name}: not in {env}, next to this executable, or on PATH"
    ))
}

impl State {
    /// Path of the state file in `workdir`.
    pub fn path(workdir: &Path) -> PathBuf {
        workdir.join(STATE_FILE)
    }

    /// Loads the state of `workdir`; `Ok(None)` if there is none.
    pub fn load(workdir: &Path) -> Result<Option<State>, Error> {
        let p = State::path(workdir);
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", p.display()))(e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::State(format!("{} is not a testbed state file: {e}", p.display())))
    }

    /// Loads the state or says that no testbed is up there.
    pub fn require(workdir: &Path) -> Result<State, Error> {
        State::load(workdir)?.ok_or_else(|| {
            Error::State(format!(
                "no testbed in {} (no {STATE_FILE}); start one with `testbed up`",
                workdir.display()
            ))
        })
    }

    /// Writes the state atomically (temporary file, then rename).
    pub fn save(&self) -> Result<(), Error> {
        let p = State::path(&self.workdir);
        let tmp = p.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::State(format!("encoding state: {e}")))?;
        std::fs::write(&tmp, text + "\n")
            .map_err(Error::io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &p).map_err(Error::io(format!("writing {}", p.display())))
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&Node, Error> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
            Error::Usage(format!(
                "no node {name:?} in this testbed (nodes: {})",
                self.node_names()
            ))
        })
    }

    fn node_index(&self, name: &str) -> Result<usize, Error> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "no node {name:?} in this testbed (nodes: {})",
                    self.node_names()
                ))
            })
    }

    fn node_names(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Node {
    fn pid_file(&self, workdir: &Path) -> PathBuf {
        workdir.join("nodes").join(format!("{}.pid", self.name))
    }

    fn ready_file(&self, workdir: &Path) -> PathBuf {
        workdir.join("nodes").join(format!("{}.ready", self.name))
    }

    /// Running, stopped or dead.
    pub fn liveness(&self) -> Liveness {
        self.process.map_or(Liveness::Dead, |p| p.liveness())
    }
}

/// Makes the work directory and returns its absolute path.
pub fn prepare_workdir(workdir: &Path) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(workdir.join("nodes"))
        .map_err(Error::io(format!("creating {}", workdir.display())))?;
    std::fs::canonicalize(workdir).map_err(Error::io(format!("resolving {}", workdir.display())))
}

fn choose_network(choice: NetChoice) -> Result<(NetMode, Option<String>), Error> {
    match (choice, netns::available()) {
        (NetChoice::Loopback, _) => Ok((NetMode::Loopback, Some("--net loopback".into()))),
        (NetChoice::Auto | NetChoice::Netns, Ok(())) => Ok((NetMode::Netns, None)),
        (NetChoice::Auto, Err(why)) => Ok((NetMode::Loopback, Some(why))),
        (NetChoice::Netns, Err(why)) => Err(Error::Network(why)),
    }
}

/// `testbed up`: starts the nodes (and dpud when it is available). Returns the state.
pub fn up(opts: &UpOptions) -> Result<State, Error> {
    if opts.nodes == 0 || opts.domains == 0 {
        return Err(Error::Usage(
            "--nodes and --domains must be at least 1".into(),
        ));
    }
    if opts.nodes > 200 {
        return Err(Error::Usage("at most 200 nodes".into()));
    }
    if opts.node_size < 2 * RESERVED_BYTES || opts.node_size % 4096 != 0 {
        return Err(Error::Usage(format!(
            "--node-size must be a multiple of 4096 and at least {} bytes",
            2 * RESERVED_BYTES
        )));
    }
    let workdir = prepare_workdir(&opts.workdir)?;
    if let Some(old) = State::load(&workdir)? {
        let live: Vec<&str> = old
            .nodes
            .iter()
            .filter(|n| n.liveness() != Liveness::Dead)
            .map(|n| n.name.as_str())
            .collect();
        let daemon_live = old
            .daemon
            .as_ref()
            .is_some_and(|d| d.process.liveness() != Liveness::Dead);
        if !live.is_empty() || daemon_live {
            return Err(Error::State(format!(
                "a testbed is already up in {} (live: {}{}); run `testbed down` first",
                workdir.display(),
                live.join(", "),
                if daemon_live { " dpud" } else { "" }
            )));
        }
        // Everything in it is dead: clear what is left (namespaces) and start afresh.
        teardown(&old, Duration::from_secs(1))?;
    }
    let target_bin = find_binary(
        "nvmeof-target",
        opts.target_bin.as_deref(),
        "TESTBED_NVMEOF_TARGET",
    )
    .map_err(|e| {
        Error::Node(format!(
            "{e}; build it with `cargo build --release -p nvmeof --bins` or pass --target-bin"
        ))
    })?;
    let (network, network_note) = choose_network(opts.network)?;
    let mut state = State {
        version: 1,
        workdir: workdir.clone(),
        target_bin,
        network,
        network_note,
        nodes: Vec::new(),
        daemon: None,
        daemon_note: None,
    };
    state.save()?;
    match start_all(&mut state, opts) {
        Ok(()) => Ok(state),
        Err(e) => {
            let _ = teardown(&state, Duration::from_secs(2));
            let _ = std::fs::remove_file(State::path(&workdir));
            Err(e)
        }
    }
}

fn start_all(state: &mut State, opts: &UpOptions) -> Result<(), Error> {
    for i in 0..opts.nodes {
        let name = format!("node{i}");
        let file = state.workdir.join("nodes").join(format!("{name}.img"));
        ensure_backing_file(&file, opts.node_size)?;
        let ns = match state.network {
            NetMode::Netns => Some(Netns::create()?),
            NetMode::Loopback => None,
        };
        let address = match &ns {
            Some(n) => SocketAddr::new(IpAddr::V4(n.ns_ip), NETNS_PORT),
            None => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        };
        state.nodes.push(Node {
            nqn: format!("nqn.2026-11.io.example:testbed-{name}"),
            domain: format!("rack{}", i % opts.domains),
            log: state.workdir.join("nodes").join(format!("{name}.log")),
            name,
            address,
            file,
            size: opts.node_size,
            pid: None,
            process: None,
            netns: ns,
        });
        // Saved before the start, so a failure still leaves the namespace on record.
        state.save()?;
        start_node(state, i)?;
        state.save()?;
    }
    if opts.nodes_only {
        state.daemon_note = Some("--nodes-only".into());
    } else {
        match daemon::start(state)? {
            Ok(rec) => state.daemon = Some(rec),
            Err(why) => state.daemon_note = Some(why),
        }
    }
    state.save()
}

fn ensure_backing_file(file: &Path, size: u64) -> Result<(), Error> {
    match std::fs::metadata(file) {
        Ok(m) if m.len() == size => Ok(()),
        Ok(m) => Err(Error::State(format!(
            "{} exists with {} bytes, not the {size} asked for: use the same --node-size, \
             or `testbed down --purge` to remove the old node files",
            file.display(),
            m.len()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let f = std::fs::File::create(file)
                .map_err(Error::io(format!("creating {}", file.display())))?;
            f.set_len(size)
                .map_err(Error::io(format!("sizing {}", file.display())))
        }
        Err(e) => Err(Error::io(format!("checking {}", file.display()))(e)),
    }
}

/// Starts node `i` of `state` (first start or restart) and waits until it listens.
/// Updates the node's address (port 0 becomes the bound port), pid and pid file.
pub fn start_node(state: &mut State, i: usize) -> Result<(), Error> {
    let workdir = state.workdir.clone();
    let bin = state.target_bin.clone();
    let node = &mut state.nodes[i];
    if node.liveness() != Liveness::Dead {
        return Err(Error::Node(format!(
            "{} is already running (pid {})",
            node.name,
            node.pid.unwrap_or(0)
        )));
    }
    let ready = node.ready_file(&workdir);
    let _ = std::fs::remove_file(&ready);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&node.log)
        .map_err(Error::io(format!("opening {}", node.log.display())))?;
    let _ = writeln!(
        log,
        "--- testbed: starting {} on {}",
        node.name, node.address
    );
    let log2 = log
        .try_clone()
        .map_err(Error::io(format!("opening {}", node.log.display())))?;
    let mut cmd = match &node.netns {
        Some(ns) => {
            let pre = ns.exec_prefix();
            let mut c = Command::new(&pre[0]);
            c.args(&pre[1..]).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    cmd.arg("--listen")
        .arg(node.address.to_string())
        .arg("--subsystem")
        .arg(&node.nqn)
        .arg("--file")
        .arg(&node.file)
        .arg("--ready-file")
        .arg(&ready)
        .arg("--allow-any-host")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: a Ctrl-C meant for testbed does not reach it.
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Node(format!("starting {} ({}): {e}", node.name, bin.display())))?;
    let pid = child.id();
    let proc_id = ProcId::of(pid)?;
    node.pid = Some(pid);
    node.process = Some(proc_id);
    std::fs::write(node.pid_file(&workdir), format!("{pid}\n"))
        .map_err(Error::io("writing the pid file"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            let addr: SocketAddr = text
                .trim()
                .parse()
                .map_err(|e| Error::Node(format!("{}: bad ready file {text:?}: {e}", node.name)))?;
            node.address = addr;
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            node.pid = None;
            node.process = None;
            return Err(Error::Node(format!(
                "{} exited at start ({status}); its log {} ends:\n{}",
                node.name,
                node.log.display(),
                crate::procs::log_tail(&node.log, 2000)
            )));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Err(Error::Node(format!(
                "{} did not listen within 30 s; its log {} ends:\n{}",
                node.name,
                node.log.display(),
                crate::procs::log_tail(&node.log, 2000)
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Restarts a node: kills it if it still runs (SIGTERM, then SIGKILL), then starts it
/// again on the same address and file.
pub fn restart_node(state: &mut State, name: &str) -> Result<(), Error> {
    let i = state.node_index(name)?;
    if let Some(p) = state.nodes[i].process {
        p.terminate(Duration::from_secs(5))?;
    }
    state.nodes[i].pid = None;
    state.nodes[i].process = None;
    start_node(state, i)?;
    state.save()
}

/// Stops dpud (gracefully) and every node, removes pid files and namespaces.
/// Keeps backing files, logs and the state.
pub fn teardown(state: &State, grace: Duration) -> Result<Vec<String>, Error> {
    let mut report = Vec::new();
    let mut errors = Vec::new();
    if let Some(d) = &state.daemon {
        match daemon::stop(d) {
            Ok(how) => report.push(format!("dpud: {how}")),
            Err(e) => errors.push(format!("dpud: {e}")),
        }
    }
    for n in &state.nodes {
        if let Some(p) = n.process {
            match p.terminate(grace) {
                Ok(how) => report.push(format!("{}: {how}", n.name)),
                Err(e) => errors.push(format!("{}: {e}", n.name)),
            }
        }
        let _ = std::fs::remove_file(n.pid_file(&state.workdir));
        let _ = std::fs::remove_file(n.ready_file(&state.workdir));
        if let Some(ns) = &n.netns {
            ns.destroy();
        }
    }
    if errors.is_empty() {
        Ok(report)
    } else {
        Err(Error::Process(errors.join("; ")))
    }
}

/// `testbed down`: stops everything `up` started. With `purge`, also removes the node
/// files, logs and the state; without it only the state file goes (the backing files
/// stay for the next `up`).
pub fn down(workdir: &Path, purge: bool) -> Result<Vec<String>, Error> {
    let Some(state) = State::load(workdir)? else {
        if purge {
            remove_owned(workdir)?;
            return Ok(vec![format!("purged {}", workdir.display())]);
        }
        return Ok(vec![format!("no testbed in {}", workdir.display())]);
    };
    let mut report = teardown(&state, Duration::from_secs(5))?;
    std::fs::remove_file(State::path(&state.workdir))
        .map_err(Error::io("removing the state file"))?;
    if purge {
        remove_owned(&state.workdir)?;
        report.push(format!("purged {}", state.workdir.display()));
    }
    Ok(report)
}

/// Removes what the testbed creates in a work directory (never anything else in it).
fn remove_owned(workdir: &Path) -> Result<(), Error> {
    for sub in ["nodes", "daemon", "bench"] {
        let p = workdir.join(sub);
        if p.exists() {
            std::fs::remove_dir_all(&p).map_err(Error::io(format!("removing {}", p.display())))?;
        }
    }
    let _ = std::fs::remove_file(State::path(workdir));
    let _ = std::fs::remove_dir(workdir); // only if now empty
    Ok(())
}

/// One node's health as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Node name.
    pub name: String,
    /// Failure domain.
    pub domain: String,
    /// Address.
    pub address: SocketAddr,
    /// Subsystem NQN.
    pub nqn: String,
    /// Recorded pid.
    pub pid: Option<u32>,
    /// Running, stopped or dead.
    pub process: Liveness,
    /// "accepting" or why a TCP connect failed.
    pub port: String,
    /// Whether a TCP connect succeeded.
    pub accepting: bool,
    /// Host end of the veth link (namespaces only): up or down (partitioned).
    pub link: Option<String>,
    /// With `--nvme`: "ok: ..." after Connect and Identify, or why not.
    pub nvme: Option<String>,
    /// Backing file.
    pub file: PathBuf,
}

/// The whole cluster's health.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Work directory.
    pub workdir: PathBuf,
    /// Networking.
    pub network: NetMode,
    /// Why not namespaces.
    pub network_note: Option<String>,
    /// Nodes.
    pub nodes: Vec<NodeStatus>,
    /// dpud's state, or why it is not part of this testbed.
    pub daemon: String,
}

/// Tries a TCP connection.
pub fn probe_port(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    TcpStream::connect_timeout(&addr, timeout)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Connects to a node over NVMe/TCP, identifies it and its namespace, and
/// disconnects; a one-line result. Bounded by `timeout` (a stopped node hangs).
pub fn probe_nvme(node: &Node, timeout: Duration) -> String {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return format!("no runtime: {e}"),
    };
    let mut cfg = nvmeof::host::HostConfig::new(node.address, &node.nqn);
    cfg.connect_timeout = timeout;
    cfg.command_timeout = timeout;
    let r = rt.block_on(async {
        tokio::time::timeout(timeout * 2, async {
            let c = nvmeof::host::Controller::connect(cfg).await?;
            let id = c.identify().await?;
            let ns = c.namespaces().await?;
            let _ = c.shutdown().await;
            Ok::<_, nvmeof::host::HostError>((id, ns))
        })
        .await
    });
    match r {
        Ok(Ok((id, ns))) => {
            let bytes: u64 = ns
                .iter()
                .map(|n| n.blocks.saturating_mul(u64::from(n.block_size)))
                .sum();
            format!(
                "ok: {} namespace(s), {} MiB, model {:?}",
                ns.len(),
                bytes >> 20,
                id.mn.trim()
            )
        }
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => format!("no answer within {} s", (timeout * 2).as_secs()),
    }
}

/// `testbed status`; with `nvme`, each node is also connected to and identified.
pub fn status(workdir: &Path, nvme: bool) -> Result<Status, Error> {
    let state = State::require(workdir)?;
    let nodes = state
        .nodes
        .iter()
        .map(|n| {
            let probe = probe_port(n.address, Duration::from_millis(500));
            NodeStatus {
                name: n.name.clone(),
                domain: n.domain.clone(),
                address: n.address,
                nqn: n.nqn.clone(),
                pid: n.pid,
                process: n.liveness(),
                accepting: probe.is_ok(),
                port: probe.map_or_else(|e| e, |()| "accepting".into()),
                link: n.netns.as_ref().map(|ns| match ns.link_up() {
                    Some(true) => "up".into(),
                    Some(false) => "down (partitioned)".into(),
                    None => "missing".into(),
                }),
                nvme: nvme.then(|| probe_nvme(n, Duration::from_secs(2))),
                file: n.file.clone(),
            }
        })
        .collect();
    let daemon = match (&state.daemon, &state.daemon_note) {
        (Some(d), _) => format!("dpud pid {}: {}", d.process.pid, d.process.liveness()),
        (None, Some(note)) => format!("not started: {note}"),
        (None, None) => "not started".into(),
    };
    Ok(Status {
        workdir: state.workdir,
        network: state.network,
        network_note: state.network_note,
        nodes,
        daemon,
    })
}

/// Renders a status as a table.
pub fn status_table(s: &Status) -> String {
    let mut rows = vec![[
        "NODE".to_string(),
        "DOMAIN".into(),
        "ADDRESS".into(),
        "PID".into(),
        "PROCESS".into(),
        "PORT".into(),
        "LINK".into(),
        "NQN".into(),
        "NVME".into(),
    ]];
    for n in &s.nodes {
        rows.push([
            n.name.clone(),
            n.domain.clone(),
            n.address.to_string(),
            n.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            n.process.to_string(),
            n.port.clone(),
            n.link.clone().unwrap_or_else(|| "-".into()),
            n.nqn.clone(),
            n.nvme.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut out = format!("workdir {}\nnetwork {:?}", s.workdir.display(), s.network);
    if let Some(note) = &s.network_note {
        out.push_str(&format!(" ({note})"));
    }
    out.push('\n');
    out.push_str(&table(&rows));
    out.push_str(&format!("dpud: {}\n", s.daemon));
    out
}

/// Left-aligned columns separated by two spaces.
pub fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Parses "1GiB", "512M", "4096", "10GB" into bytes.
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| Error::Usage(format!("bad size {s:?} (examples: 1GiB, 512M, 4096)")))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        u => return Err(Error::Usage(format!("unknown size unit {u:?} in {s:?}"))),
    };
    n.checked_mul(mult)
        .ok_or_else(|| Error::Usage(format!("size {s:?} overflows")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999TiB").is_err());
    }

    #[test]
    fn table_aligns() {
        let t = table(&[
            ["A".to_string(), "BB".into()],
            ["ccc".to_string(), "d".into()],
        ]);
        assert_eq!(t, "A    BB\nccc  d\n");
    }
}
