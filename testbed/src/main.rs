//! `testbed`: brings up a loopback cluster (storage nodes and dpud), injects faults and
//! runs the benchmark suite (docs/testbed.md).
//!
//! `testbed guest-run SCRIPT` boots the kernel-peer test guest by hand (docs/testing.md).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use testbed::bench::{self, report, Target, Transport};
use testbed::cluster::{self, NetChoice, State, UpOptions};
use testbed::daemon;
use testbed::fault::{self, Signal, Where};
use testbed::guest::{GuestConfig, GuestEnv, Network};
use testbed::procs::{Liveness, ProcId};

/// Loopback cluster, fault injection and fio benchmarks for the DPU storage engine.
#[derive(Debug, Parser)]
#[command(name = "testbed", version, after_help = "See docs/testbed.md.")]
struct Cli {
    /// Work directory holding the state file, node files, logs and bench output.
    #[arg(long, global = true, value_name = "DIR", default_value = cluster::DEFAULT_WORKDIR)]
    workdir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum NetArg {
    Auto,
    Loopback,
    Netns,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum OutputArg {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TransportArg {
    Tcp,
    Unix,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start N storage nodes (nvmeof-target, file-backed) and, when built, dpud.
    ///
    /// Example: testbed up --nodes 6 --domains 3 --node-size 2GiB
    Up {
        /// Number of storage nodes.
        #[arg(long, default_value_t = 6)]
        nodes: usize,
        /// Number of failure domains; nodes are assigned round-robin.
        #[arg(long, default_value_t = 6)]
        domains: usize,
        /// Size of each node's sparse backing file.
        #[arg(long, default_value = "1GiB")]
        node_size: String,
        /// The nvmeof-target binary [default: $TESTBED_NVMEOF_TARGET, next to testbed, PATH].
        #[arg(long, value_name = "PATH")]
        target_bin: Option<PathBuf>,
        /// Node networking: namespaces when root (needed for partitions), else loopback.
        #[arg(long, value_enum, default_value = "auto")]
        net: NetArg,
        /// Start the storage nodes only, even when dpud is available.
        #[arg(long)]
        nodes_only: bool,
    },
    /// Stop everything `up` started (SIGTERM, then SIGKILL); keep node files unless --purge.
    Down {
        /// Also remove node files, logs and bench output from the work directory.
        #[arg(long)]
        purge: bool,
    },
    /// Show each node's process, port and link state.
    Status {
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        output: OutputArg,
        /// Also connect to each node over NVMe/TCP and identify it (2 s timeout).
        #[arg(long)]
        nvme: bool,
    },
    /// Inject a fault into a node.
    #[command(subcommand)]
    Fault(FaultCmd),
    /// Run the fio job files of benches/fio over NBD against a target and the floor.
    ///
    /// Example: testbed bench --uri nbd://127.0.0.1:10809/vol0 --runtime 10
    Bench(BenchArgs),
    /// Boot the kernel-peer test guest with SCRIPT as /test.sh (docs/testing.md).
    #[command(disable_help_flag = true)]
    GuestRun {
        /// SCRIPT [--forward HOSTPORT:GUESTPORT]... [--passt] [--timeout SECS] [--kernel-arg WORD]...
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum FaultCmd {
    /// SIGKILL the node (a crash); NODE may be `dpud`.
    Kill { node: String },
    /// SIGSTOP the node (a hang: TCP handshakes still complete, nothing answers); NODE may be `dpud`.
    Stop { node: String },
    /// SIGCONT a stopped node; NODE may be `dpud`.
    Cont { node: String },
    /// Stop the node if it runs, then start it on the same address and file (`dpud`:
    /// from its config and store).
    Restart { node: String },
    /// Set the node's link down (needs the namespace network mode).
    Partition { node: String },
    /// Set the node's link up again.
    Heal { node: String },
    /// Flip bytes (XOR 0xFF) in the node's backing file and print what changed.
    Corrupt {
        node: String,
        /// How many bytes.
        #[arg(long, default_value_t = 1)]
        bytes: u64,
        /// Flip consecutive bytes from this offset [default: random bytes holding data
        /// past the first MiB, where node metadata lives].
        #[arg(long)]
        offset: Option<u64>,
        /// Seed for the random offsets [default: from the clock].
        #[arg(long)]
        seed: Option<u64>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        output: OutputArg,
    },
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// NBD URI of the target under test (nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH).
    #[arg(long)]
    uri: Option<String>,
    /// Row label of --uri.
    #[arg(long, default_value = "target")]
    label: String,
    /// Process serving --uri, for CPU per I/O and RSS [default: the testbed's dpud].
    #[arg(long)]
    pid: Option<u32>,
    /// Measure the floor (nbdkit memory) only.
    #[arg(long)]
    floor_only: bool,
    /// Seconds per job.
    #[arg(long, default_value_t = 5)]
    runtime: u32,
    /// Region fio works on (and the floor's size).
    #[arg(long, default_value = "256MiB")]
    size: String,
    /// Directory of fio job files [default: benches/fio of this repository].
    #[arg(long, value_name = "DIR")]
    jobs: Option<PathBuf>,
    /// Run only this job (repeatable), e.g. randread-4k.
    #[arg(long, value_name = "JOB")]
    only: Vec<String>,
    /// Directory for results.json and the plots [default: WORKDIR/bench].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Write the table into this Markdown file between its testbed-bench markers.
    #[arg(long, value_name = "FILE")]
    doc: Option<PathBuf>,
    /// Skip the plots.
    #[arg(long)]
    no_plots: bool,
    /// Floor transport [default: that of --uri, else tcp].
    #[arg(long, value_enum)]
    floor_transport: Option<TransportArg>,
    /// Skip writing the region once before the timed jobs.
    #[arg(long)]
    no_prefill: bool,
    /// Rounds of each job per target, alternating with the floor; the table shows medians.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
}

/// Exit codes: 0 success, 1 the command failed (the message says why), 2 bad usage.
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("testbed: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let workdir = cli.workdir;
    match cli.cmd {
        Cmd::Up {
            nodes,
            domains,
            node_size,
            target_bin,
            net,
            nodes_only,
        } => {
            let opts = UpOptions {
                workdir,
                nodes,
                domains,
                node_size: cluster::parse_size(&node_size)?,
                target_bin,
                network: match net {
                    NetArg::Auto => NetChoice::Auto,
                    NetArg::Loopback => NetChoice::Loopback,
                    NetArg::Netns => NetChoice::Netns,
                },
                nodes_only,
            };
            let state = cluster::up(&opts)?;
            for n in &state.nodes {
                println!(
                    "{}: {} {} domain {} pid {}",
                    n.name,
                    n.address,
                    n.nqn,
                    n.domain,
                    n.pid.unwrap_or(0)
                );
            }
            if let Some(note) = &state.network_note {
                println!("network: loopback ({note}); partition is unavailable");
            } else {
                println!("network: one namespace per node (10.77.N.0/30)");
            }
            match (&state.daemon, &state.daemon_note) {
                (Some(d), _) => {
                    println!(
                        "dpud: pid {}, control socket {}, nbd nbd+unix:///EXPORT?socket={} and nbd://{}/EXPORT, metrics http://{}/metrics",
                        d.process.pid,
                        d.socket.display(),
                        d.nbd_socket.display(),
                        d.nbd_tcp,
                        d.metrics
                    );
                    if let Some(a) = d.nvme_tcp {
                        println!("dpud NVMe/TCP: {a} (dpuctl export add VOLUME --type nvme-tcp --allow-host NQN)");
                    }
                    println!(
                        "registered {} nodes; benchmark profiles: {}",
                        state.nodes.len(),
                        d.profiles.join(", ")
                    );
                    println!(
                        "dpuctl: {} --socket {} status",
                        d.dpuctl.display(),
                        d.socket.display()
                    );
                }
                (None, note) => println!(
                    "started {} storage nodes only: {}",
                    state.nodes.len(),
                    note.as_deref().unwrap_or("dpud not started")
                ),
            }
            println!("state: {}", State::path(&state.workdir).display());
        }
        Cmd::Down { purge } => {
            for line in cluster::down(&workdir, purge)? {
                println!("{line}");
            }
        }
        Cmd::Status { output, nvme } => {
            let s = cluster::status(&workdir, nvme)?;
            if output == OutputArg::Json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", cluster::status_table(&s));
            }
        }
        Cmd::Fault(f) => fault_cmd(&workdir, f)?,
        Cmd::Bench(b) => bench_cmd(&workdir, b)?,
        Cmd::GuestRun { args } => guest_run(&args)?,
    }
    Ok(())
}

fn fault_cmd(workdir: &std::path::Path, f: FaultCmd) -> anyhow::Result<()> {
    let mut state = State::require(workdir)?;
    let msg = match f {
        FaultCmd::Kill { node } => fault::signal(&state, &node, Signal::Kill)?,
        FaultCmd::Stop { node } => fault::signal(&state, &node, Signal::Stop)?,
        FaultCmd::Cont { node } => fault::signal(&state, &node, Signal::Cont)?,
        FaultCmd::Restart { node } => fault::restart(&mut state, &node)?,
        FaultCmd::Partition { node } => fault::set_partition(&state, &node, true)?,
        FaultCmd::Heal { node } => fault::set_partition(&state, &node, false)?,
        FaultCmd::Corrupt {
            node,
            bytes,
            offset,
            seed,
            output,
        } => {
            let at = match offset {
                Some(o) => Where::At(o),
                None => Where::Random {
                    seed: seed.unwrap_or_else(|| {
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs() ^ u64::from(d.subsec_nanos()))
                    }),
                },
            };
            let flips = fault::corrupt(&state, &node, bytes, at)?;
            if output == OutputArg::Json {
                serde_json::to_string_pretty(&flips)?
            } else {
                let file = state.node(&node)?.file.display().to_string();
                let mut s = format!("{node}: flipped {} byte(s) in {file}", flips.len());
                for fl in &flips {
                    s.push_str(&format!(
                        "\noffset {} (0x{:x}): 0x{:02x} -> 0x{:02x}",
                        fl.offset, fl.offset, fl.before, fl.after
                    ));
                }
                s
            }
        }
    };
    println!("{msg}");
    Ok(())
}

fn default_jobs_dir() -> PathBuf {
    let here = PathBuf::from("benches/fio");
    if here.is_dir() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../benches/fio")
}

fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn bench_cmd(workdir: &std::path::Path, b: BenchArgs) -> anyhow::Result<()> {
    let size = cluster::parse_size(&b.size)?;
    if b.runtime == 0 || b.repeat == 0 {
        bail!("--runtime and --repeat must be at least 1");
    }
    let state = State::load(workdir)?;
    let out = b.out.clone().unwrap_or_else(|| workdir.join("bench"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let scratch = workdir.join("bench");
    let transport = match b.floor_transport {
        Some(TransportArg::Tcp) => Transport::Tcp,
        Some(TransportArg::Unix) => Transport::Unix,
        None => b.uri.as_deref().map_or(
            if b.uri.is_none()
                && !b.floor_only
                && state.as_ref().is_some_and(|s| s.daemon.is_some())
            {
                Transport::Unix
            } else {
                Transport::Tcp
            },
            Transport::of_uri,
        ),
    };
    let mut node_procs: Vec<ProcId> = Vec::new();
    if let Some(s) = &state {
        node_procs = s
            .nodes
            .iter()
            .filter_map(|n| n.process)
            .filter(|p| p.liveness() != Liveness::Dead)
            .collect();
    }
    let mut targets = Vec::new();
    let floor = bench::Floor::start(&scratch.join("floor"), size, transport)?;
    targets.push(Target {
        label: "floor".into(),
        uri: floor.uri.clone(),
        floor: true,
        process: Some(floor.process),
        nodes: Vec::new(),
    });
    let node_bytes_source = if node_procs.is_empty() {
        format!("not counted (no storage nodes up in {})", workdir.display())
    } else {
        format!(
            "sum of write_bytes in /proc/PID/io of the {} nvmeof-target processes \
             (the target counts written bytes only per NVMe controller, in its SMART log, \
             which another connection cannot read)",
            node_procs.len()
        )
    };
    let daemon = state
        .as_ref()
        .and_then(|s| s.daemon.clone())
        .filter(|d| d.process.liveness() == Liveness::Running);
    let mut volumes: Vec<String> = Vec::new();
    if let Some(uri) = &b.uri {
        let process = match b.pid {
            Some(p) => Some(ProcId::of(p)?),
            None => state
                .as_ref()
                .and_then(|s| s.daemon.as_ref())
                .map(|d| d.process),
        };
        targets.push(Target {
            label: b.label.clone(),
            uri: uri.clone(),
            floor: false,
            process,
            nodes: node_procs,
        });
    } else if b.floor_only {
    } else if let Some(d) = &daemon {
        // One volume and NBD export per benchmark profile, removed afterwards.
        let size_arg = size.to_string();
        for p in &d.profiles {
            let vol = format!("tb-bench-{p}");
            let sock = d.socket.as_path();
            let _ = daemon::dpuctl(&d.dpuctl, sock, &["export", "remove", &vol]);
            let _ = daemon::dpuctl(&d.dpuctl, sock, &["volume", "delete", &vol]);
            // A profile the cluster cannot hold (ec:4+2 on fewer than 6 nodes) is
            // skipped with dpud's reason; the others still run.
            let create = [
                "volume",
                "create",
                &vol,
                "--profile",
                p,
                "--size",
                &size_arg,
            ];
            if let Err(e) = daemon::dpuctl(&d.dpuctl, sock, &create) {
                eprintln!("bench: skipping profile {p}: {e}");
                continue;
            }
            volumes.push(vol.clone());
            daemon::dpuctl(&d.dpuctl, sock, &["export", "add", &vol, "--type", "nbd"])?;
            targets.push(Target {
                label: p.clone(),
                uri: format!("nbd+unix:///{vol}?socket={}", d.nbd_socket.display()),
                floor: false,
                process: Some(d.process),
                nodes: node_procs.clone(),
            });
        }
        if targets.len() == 1 {
            bail!("dpud could create a volume for none of the profiles (see above)");
        }
    } else {
        bail!(
            "nothing to measure: give --uri NBD-URI (any NBD server) or --floor-only; \
             the runs over dpud's profiles need a testbed whose dpud is running in {} \
             (testbed status says why it is not)",
            workdir.display()
        );
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let run = report::RunInfo::collect(
        format!("testbed {}", shell_words(&args)),
        b.runtime,
        b.repeat,
        size,
        node_bytes_source,
    );
    let opts = bench::Options {
        jobs_dir: b.jobs.clone().unwrap_or_else(default_jobs_dir),
        only: b.only.clone(),
        runtime_s: b.runtime,
        size,
        raw_dir: scratch.join("raw"),
        no_prefill: b.no_prefill,
        repeat: b.repeat,
    };
    eprintln!(
        "bench: {} target(s), jobs from {}, {} s per job",
        targets.len(),
        opts.jobs_dir.display(),
        b.runtime
    );
    let rows = bench::run(&targets, &opts, |r| {
        eprintln!(
            "  {:<8} {:<14} QD{:<3} #{} {:>10.0} IOPS {:>8.1} MB/s p99 {:>9} us cpu/io {} us",
            r.target,
            r.job,
            r.qd,
            r.rep,
            r.fio.iops,
            r.fio.mb_s,
            r.fio
                .p99_us
                .map_or_else(|| "-".into(), |v| format!("{v:.1}")),
            r.cpu_us_per_io
                .map_or_else(|| "-".into(), |v| format!("{v:.2}")),
        );
    });
    if let Some(d) = &daemon {
        for vol in &volumes {
            let sock = d.socket.as_path();
            let _ = daemon::dpuctl(&d.dpuctl, sock, &["export", "remove", vol]);
            let _ = daemon::dpuctl(&d.dpuctl, sock, &["volume", "delete", vol]);
        }
    }
    let rows = rows?;
    drop(floor);
    let json = out.join("testbed-bench.json");
    report::write_json(&json, &run, &rows)?;
    let (plots, note) = if b.no_plots {
        (Vec::new(), "--no-plots".to_string())
    } else {
        match report::plots(&out, &rows) {
            Ok(p) => (p, String::new()),
            Err(e) => (Vec::new(), e.to_string()),
        }
    };
    let doc_dir = b
        .doc
        .as_ref()
        .and_then(|d| d.parent().map(std::path::Path::to_path_buf));
    let plot_refs: Vec<(String, String)> = plots
        .iter()
        .map(|(t, p)| {
            let shown = doc_dir
                .as_ref()
                .and_then(|d| {
                    let d = std::fs::canonicalize(d).ok()?;
                    let p = std::fs::canonicalize(p).ok()?;
                    p.strip_prefix(&d).ok().map(|r| r.display().to_string())
                })
                .unwrap_or_else(|| p.display().to_string());
            (t.clone(), shown)
        })
        .collect();
    let section = report::markdown(&run, &rows, &plot_refs, &note);
    if let Some(doc) = &b.doc {
        report::write_doc(doc, &section)?;
        eprintln!("bench: wrote the table into {}", doc.display());
    }
    print!("{section}");
    eprintln!("bench: results in {}", json.display());
    for (_, p) in &plots {
        eprintln!("bench: plot {}", p.display());
    }
    if !note.is_empty() && !b.no_plots {
        eprintln!("bench: no plots: {note}");
    }
    Ok(())
}

/// Boots the test guest with SCRIPT as its `/test.sh`, streams nothing, and prints the
/// console when the guest has powered off.
fn guest_run(args: &[String]) -> anyhow::Result<()> {
    let mut script_path = None;
    let mut forwards = Vec::new();
    let mut network = Network::Slirp;
    let mut timeout = Duration::from_secs(300);
    let mut kernel_args = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--forward" => {
                let spec = it.next().context("--forward needs HOSTPORT:GUESTPORT")?;
                let (h, g) = spec
                    .split_once(':')
                    .context("--forward needs HOSTPORT:GUESTPORT")?;
                forwards.push((h.parse::<u16>()?, g.parse::<u16>()?));
            }
            "--passt" => network = Network::Passt,
            "--kernel-arg" => {
                kernel_args.push(it.next().context("--kernel-arg needs a word")?.clone());
            }
            "--timeout" => {
                let secs: u64 = it.next().context("--timeout needs seconds")?.parse()?;
                timeout = Duration::from_secs(secs);
            }
            other if script_path.is_none() => script_path = Some(other.to_owned()),
            other => bail!("unexpected argument {other:?}"),
        }
    }
    let script_path = script_path.context("guest-run needs a script")?;
    let script =
        std::fs::read_to_string(&script_path).with_context(|| format!("reading {script_path}"))?;
    let env = GuestEnv::discover()?;
    let mut config = GuestConfig::new("manual", script)
        .network(network)
        .timeout(timeout);
    config.kernel_args = kernel_args;
    for (h, g) in forwards {
        config = config.forward(h, g);
    }
    let run = env.run(config)?;
    print!("{}", run.console);
    eprintln!(
        "testbed: boot {:?}, total {:?}, script status {:?}, log {}",
        run.boot_time,
        run.total_time,
        run.test_rc,
        run.log_path.display()
    );
    run.check()?;
    Ok(())
}
