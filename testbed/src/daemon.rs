//! The control plane's place in the testbed: dpud and its registration through dpuctl.
//!
//! `up` starts the nodes first and then asks this module to bring up the control
//! plane: a generated config in `WORKDIR/daemon/` (every socket and the store inside
//! the work directory, TCP listeners on loopback ports picked free), dpud started
//! from it, each node registered with `dpuctl node add` with its failure domain, and
//! the benchmark profiles created next to the built-in ones dpud's store seeds. `down`
//! stops dpud before the nodes, with SIGTERM, so it can flush to nodes that are
//! still there.
//!
//! dpud may refuse to run (today it stops at start until the volume engine's pool is
//! wired into it). That is not a failure of `up`: the cluster is then storage nodes
//! only, and the reason, taken from dpud's own log, is recorded and printed. A dpud
//! that runs but rejects a registration is a failure: `up` tears everything down.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster::{find_binary, State};
use crate::procs::{log_tail, Ended, Liveness, ProcId};
use crate::Error;

/// The profiles `bench` runs over: (profile name, dpuctl flags). `tb-none` is the
/// no-protection row (`Protection::None`, like the built-in `scratch`, but with
/// encryption off too, so it measures only the data path).
pub const BENCH_PROFILES: &[(&str, &[&str])] = &[
    (
        "tb-none",
        &[
            "--protection",
            "none",
            "--compression",
            "off",
            "--encryption",
            "off",
        ],
    ),
    (
        "tb-mirror2",
        &[
            "--protection",
            "mirror:2",
            "--compression",
            "off",
            "--encryption",
            "off",
        ],
    ),
    (
        "tb-ec42",
        &[
            "--protection",
            "ec:4+2",
            "--compression",
            "off",
            "--encryption",
            "off",
        ],
    ),
    (
        "tb-ec42-zstd-aes",
        &[
            "--protection",
            "ec:4+2",
            "--compression",
            "zstd:3",
            "--encryption",
            "aes-256-gcm",
        ],
    ),
];

/// A dpud the testbed started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonRecord {
    /// Its process.
    pub process: ProcId,
    /// The dpud binary.
    pub dpud: PathBuf,
    /// The generated config file.
    pub config: PathBuf,
    /// Control API socket.
    pub socket: PathBuf,
    /// NBD Unix socket.
    pub nbd_socket: PathBuf,
    /// NBD TCP listener.
    pub nbd_tcp: SocketAddr,
    /// Prometheus endpoint.
    pub metrics: SocketAddr,
    /// NVMe/TCP listener (exports of type nvme-tcp).
    #[serde(default)]
    pub nvme_tcp: Option<SocketAddr>,
    /// Its log.
    pub log: PathBuf,
    /// The dpuctl binary used for it.
    pub dpuctl: PathBuf,
    /// Profiles the testbed created (the benchmark set).
    pub profiles: Vec<String>,
}

/// Where the daemon's files go.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `WORKDIR/daemon`.
    pub dir: PathBuf,
    /// dpud.toml.
    pub config: PathBuf,
    /// api.sock.
    pub socket: PathBuf,
    /// nbd.sock.
    pub nbd_socket: PathBuf,
    /// dpud.log.
    pub log: PathBuf,
}

impl Layout {
    /// The layout under `workdir`.
    pub fn new(workdir: &Path) -> Layout {
        let dir = workdir.join("daemon");
        Layout {
            config: dir.join("dpud.toml"),
            socket: dir.join("api.sock"),
            nbd_socket: dir.join("nbd.sock"),
            log: dir.join("dpud.log"),
            dir,
        }
    }
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The dpud configuration the testbed runs with (format: docs/operations.md).
pub fn config_text(l: &Layout, nbd_tcp: SocketAddr, metrics: SocketAddr) -> String {
    format!(
        "# Written by `testbed up`; see docs/testbed.md.\n\
         data_dir = {data}\n\
         cores = 1\n\
         log_level = \"info\"\n\
         \n[api]\nsocket = {api}\n\
         \n[metrics]\nlisten = \"{metrics}\"\n\
         \n[nbd]\nsocket = {nbd}\ntcp = \"{nbd_tcp}\"\n\
         \n[vhost_user_blk]\nsocket_dir = {vhost}\n\
         \n[cluster]\nlevels = [\"rack\", \"node\"]\n",
        data = toml_str(&l.dir.join("data").display().to_string()),
        api = toml_str(&l.socket.display().to_string()),
        nbd = toml_str(&l.nbd_socket.display().to_string()),
        vhost = toml_str(&l.dir.join("vhost").display().to_string()),
    )
}

/// The `[nvme_tcp]` section: dpud's NVMe/TCP listener on loopback (a QEMU guest
/// reaches it as 10.0.2.2).
pub fn nvme_tcp_section(listen: SocketAddr) -> String {
    format!("\n[nvme_tcp]\nlisten = \"{listen}\"\n")
}

fn free_port() -> Result<SocketAddr, Error> {
    let l = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .map_err(Error::io("finding a free port"))?;
    l.local_addr().map_err(Error::io("finding a free port"))
}

/// A one-line reason from a log: the last `Error: ...` line (how an anyhow error
/// from main starts, before any backtrace), else the last non-empty line.
fn reason(path: &Path) -> String {
    let tail = log_tail(path, 16000);
    tail.lines()
        .rev()
        .find(|l| l.starts_with("Error: "))
        .or_else(|| tail.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("(empty log)")
        .trim()
        .to_owned()
}

/// Runs dpuctl against the daemon's socket; its stdout, or an error with its stderr.
pub fn dpuctl(bin: &Path, socket: &Path, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(bin)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Process(format!("running {}: {e}", bin.display())))?;
    if !out.status.success() {
        return Err(Error::Process(format!(
            "dpuctl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts dpud for `state`'s nodes, registers them and creates the benchmark
/// profiles. `Ok(Err(why))` when there is no dpud to run (not built, or it stopped at
/// start): the cluster is then nodes only.
pub fn start(state: &State) -> Result<Result<DaemonRecord, String>, Error> {
    let Ok(dpud) = find_binary("dpud", None, "TESTBED_DPUD") else {
        return Ok(Err(
            "no dpud binary (build it with `cargo build -p engine --bin dpud`, or set TESTBED_DPUD)"
                .into(),
        ));
    };
    let Ok(dpuctl_bin) = find_binary("dpuctl", None, "TESTBED_DPUCTL") else {
        return Ok(Err(
            "no dpuctl binary (build it with `cargo build -p cli --bin dpuctl`, or set TESTBED_DPUCTL)"
                .into(),
        ));
    };
    let l = Layout::new(&state.workdir);
    std::fs::create_dir_all(&l.dir).map_err(Error::io(format!("creating {}", l.dir.display())))?;
    let nbd_tcp = free_port()?;
    let metrics = free_port()?;
    let nvme_tcp = free_port()?;
    let text = config_text(&l, nbd_tcp, metrics) + &nvme_tcp_section(nvme_tcp);
    std::fs::write(&l.config, text)
        .map_err(Error::io(format!("writing {}", l.config.display())))?;
    // dpud checks the file before anything else; a rejected config is our bug.
    let check = Command::new(&dpud)
        .arg("--config")
        .arg(&l.config)
        .arg("--print-config")
        .output()
        .map_err(|e| Error::Process(format!("running {}: {e}", dpud.display())))?;
    if !check.status.success() {
        return Err(Error::Process(format!(
            "dpud rejects the generated {}: {}",
            l.config.display(),
            String::from_utf8_lossy(&check.stderr).trim()
        )));
    }
    let process = match spawn(&dpud, &l.config, &l.socket, &l.log)? {
        Ok(p) => p,
        Err(why) => return Ok(Err(why)),
    };
    let mut rec = DaemonRecord {
        process,
        dpud,
        config: l.config.clone(),
        socket: l.socket.clone(),
        nbd_socket: l.nbd_socket.clone(),
        nbd_tcp,
        metrics,
        nvme_tcp: Some(nvme_tcp),
        log: l.log.clone(),
        dpuctl: dpuctl_bin,
        profiles: Vec::new(),
    };
    if let Err(e) = register(state, &mut rec) {
        let _ = stop(&rec);
        return Err(e);
    }
    Ok(Ok(rec))
}

/// Starts dpud with `config` and waits until its control socket accepts.
/// `Ok(Err(why))` if it stops at start.
fn spawn(
    dpud: &Path,
    config: &Path,
    socket: &Path,
    log_path: &Path,
) -> Result<Result<ProcId, String>, Error> {
    let _ = std::fs::remove_file(socket);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(Error::io(format!("opening {}", log_path.display())))?;
    let log2 = log.try_clone().map_err(Error::io("opening the dpud log"))?;
    let mut child = Command::new(dpud)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(|e| Error::Process(format!("starting {}: {e}", dpud.display())))?;
    let process = ProcId::of(child.id())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(Err(format!(
                "dpud stopped at start ({status}): {} (log {})",
                reason(log_path),
                log_path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(Ok(process));
        }
        if Instant::now() >= deadline {
            let _ = process.terminate(Duration::from_secs(5));
            return Err(Error::Process(format!(
                "dpud did not open {} within 30 s; its log ends:\n{}",
                socket.display(),
                log_tail(log_path, 2000)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `fault restart dpud`: stops dpud if it runs (SIGTERM, SIGKILL after 30 s) and
/// starts it again from the same config; it finds its nodes, profiles and exports in
/// its store. Returns the new record.
pub fn restart(rec: &DaemonRecord) -> Result<DaemonRecord, Error> {
    stop(rec)?;
    match spawn(&rec.dpud, &rec.config, &rec.socket, &rec.log)? {
        Ok(process) => Ok(DaemonRecord {
            process,
            ..rec.clone()
        }),
        Err(why) => Err(Error::Process(why)),
    }
}

/// Registers every node and creates the benchmark profiles.
fn register(state: &State, rec: &mut DaemonRecord) -> Result<(), Error> {
    for n in &state.nodes {
        let addr = n.address.to_string();
        dpuctl(
            &rec.dpuctl,
            &rec.socket,
            &[
                "node",
                "add",
                &n.name,
                "--address",
                &addr,
                "--nqn",
                &n.nqn,
                "--domain",
                &n.domain,
            ],
        )?;
    }
    let existing = dpuctl(
        &rec.dpuctl,
        &rec.socket,
        &["profile", "list", "--output", "json"],
    )?;
    for (name, flags) in BENCH_PROFILES {
        if existing.contains(&format!("\"{name}\"")) {
            rec.profiles.push((*name).to_owned());
            continue;
        }
        let mut args = vec![
            "profile",
            "create",
            "--name",
            name,
            "--failure-domain",
            "node",
        ];
        args.extend_from_slice(flags);
        dpuctl(&rec.dpuctl, &rec.socket, &args)?;
        rec.profiles.push((*name).to_owned());
    }
    Ok(())
}

/// Stops dpud gracefully (SIGTERM lets it flush), SIGKILL after 30 s.
pub fn stop(rec: &DaemonRecord) -> Result<Ended, Error> {
    if rec.process.liveness() == Liveness::Dead {
        return Ok(Ended::AlreadyDead);
    }
    rec.process.terminate(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_quotes_paths() {
        let l = Layout::new(Path::new("/tmp/a \"b\\c"));
        let t = config_text(
            &l,
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        assert!(
            t.contains(r#"socket = "/tmp/a \"b\\c/daemon/api.sock""#),
            "{t}"
        );
        assert!(t.contains("tcp = \"127.0.0.1:1\""), "{t}");
        assert!(t.contains("listen = \"127.0.0.1:2\""), "{t}");
    }
}
