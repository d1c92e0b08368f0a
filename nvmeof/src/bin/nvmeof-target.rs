//! `nvmeof-target`: the storage-node NVMe/TCP target.
//!
//! Simple cases fit on the command line (one subsystem with memory or file
//! namespaces); several subsystems with their own allow-lists come from a TOML file
//! (format in docs/nvmeof.md, "Target"). Both can be combined. The bound address is
//! printed ("listening on ADDR") and optionally written to a ready file, so scripts
//! can use port 0 and still find the target.

use anyhow::{bail, Context, Result};
use clap::Parser;
use nvmeof::backend::{Backend, FileBackend, FileOptions, IoMode, MemoryBackend};
use nvmeof::target::{Limits, NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// NVMe/TCP target serving memory, files and block devices as namespaces.
#[derive(Debug, Parser)]
#[command(name = "nvmeof-target", version)]
struct Args {
    /// Listen address (port 0 picks a free port) [default: 127.0.0.1:4420].
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// NQN of the subsystem the --memory/--file namespaces belong to.
    #[arg(long, value_name = "NQN")]
    subsystem: Option<String>,
    /// A memory namespace of this size (e.g. 1GiB); repeatable.
    #[arg(long, value_name = "SIZE")]
    memory: Vec<String>,
    /// A file or block device namespace; repeatable.
    #[arg(long, value_name = "PATH")]
    file: Vec<PathBuf>,
    /// Logical block size of --memory namespaces (--file: the device's, or 4096).
    #[arg(long, value_name = "BYTES")]
    block_size: Option<u32>,
    /// File I/O engine: auto, io-uring or blocking.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    io: String,
    /// Allow this host NQN to connect to --subsystem; repeatable.
    #[arg(long, value_name = "NQN")]
    allow_host: Vec<String>,
    /// Allow any host to connect to --subsystem (deny by default).
    #[arg(long)]
    allow_any_host: bool,
    /// TOML file with subsystems, namespaces, allow-lists and limits.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Write the bound address to this file once listening.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Submission queue depth advertised (CAP.MQES + 1).
    #[arg(long, value_name = "N")]
    queue_depth: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    #[serde(default)]
    limits: Option<LimitsToml>,
    #[serde(default)]
    subsystem: Vec<SubsystemToml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsToml {
    queue_depth: Option<u16>,
    max_io_queues: Option<u16>,
    io_in_capsule: Option<u32>,
    max_transfer: Option<u32>,
    maxh2cdata: Option<u32>,
    header_digest: Option<bool>,
    data_digest: Option<bool>,
    c2h_success: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubsystemToml {
    nqn: String,
    serial: Option<String>,
    model: Option<String>,
    #[serde(default)]
    allow_any_host: bool,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    #[serde(default)]
    namespace: Vec<NamespaceToml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceToml {
    nsid: Option<u32>,
    memory: Option<String>,
    file: Option<PathBuf>,
    block_size: Option<u32>,
    io: Option<String>,
    create_size: Option<String>,
}

/// Parse "1GiB", "512M", "4096", "10GB" into bytes.
fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().with_context(|| format!("bad size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        u => bail!("unknown size unit {u:?} in {s:?}"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} overflows"))
}

fn parse_io(s: &str) -> Result<IoMode> {
    Ok(match s {
        "auto" => IoMode::Auto,
        "io-uring" | "io_uring" | "uring" => IoMode::IoUring,
        "blocking" => IoMode::Blocking,
        o => bail!("unknown I/O mode {o:?} (auto, io-uring, blocking)"),
    })
}

fn memory_ns(size: &str, block_size: Option<u32>) -> Result<NamespaceConfig> {
    let bytes = parse_size(size)?;
    let be = MemoryBackend::new(bytes, block_size.unwrap_or(512))
        .with_context(|| format!("memory namespace of {size}"))?;
    Ok(NamespaceConfig::new(Arc::new(be)).id_seed(format!("memory:{bytes}")))
}

fn file_ns(path: &Path, opts: &FileOptions) -> Result<NamespaceConfig> {
    let be =
        FileBackend::open(path, opts).with_context(|| format!("namespace {}", path.display()))?;
    let seed = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(NamespaceConfig::new(Arc::new(be)).id_seed(format!("file:{}", seed.display())))
}

fn build_config(args: &Args) -> Result<TargetConfig> {
    let file: FileConfig = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], nvmeof::tcp::NVME_TCP_PORT)));
    let mut cfg = TargetConfig::new(listen);
    let mut limits = Limits::default();
    if let Some(l) = &file.limits {
        let d = Limits::default();
        limits = Limits {
            queue_depth: l.queue_depth.unwrap_or(d.queue_depth),
            max_io_queues: l.max_io_queues.unwrap_or(d.max_io_queues),
            io_in_capsule: l.io_in_capsule.unwrap_or(d.io_in_capsule),
            admin_in_capsule: d.admin_in_capsule,
            max_transfer: l.max_transfer.unwrap_or(d.max_transfer),
            maxh2cdata: l.maxh2cdata.unwrap_or(d.maxh2cdata),
            allow_header_digest: l.header_digest.unwrap_or(d.allow_header_digest),
            allow_data_digest: l.data_digest.unwrap_or(d.allow_data_digest),
            c2h_success: l.c2h_success.unwrap_or(d.c2h_success),
        };
    }
    if let Some(q) = args.queue_depth {
        limits.queue_depth = q;
    }
    cfg.limits = limits;
    for s in &file.subsystem {
        let mut sub = SubsystemConfig::new(&s.nqn);
        sub.serial.clone_from(&s.serial);
        if let Some(m) = &s.model {
            sub.model.clone_from(m);
        }
        sub.allow_any_host = s.allow_any_host;
        sub.allowed_hosts.clone_from(&s.allowed_hosts);
        for n in &s.namespace {
            let mut ns = match (&n.memory, &n.file) {
                (Some(size), None) => memory_ns(size, n.block_size)?,
                (None, Some(path)) => {
                    let opts = FileOptions {
                        block_size: n.block_size,
                        io: parse_io(n.io.as_deref().unwrap_or("auto"))?,
                        direct: true,
                        create_size: n.create_size.as_deref().map(parse_size).transpose()?,
                    };
                    file_ns(path, &opts)?
                }
                _ => bail!(
                    "{}: each namespace needs exactly one of memory or file",
                    s.nqn
                ),
            };
            ns.nsid = n.nsid;
            sub.namespaces.push(ns);
        }
        cfg.subsystems.push(sub);
    }
    let has_ns = !args.memory.is_empty() || !args.file.is_empty();
    match &args.subsystem {
        Some(nqn) => {
            let mut sub = SubsystemConfig::new(nqn);
            for m in &args.memory {
                sub.namespaces.push(memory_ns(m, args.block_size)?);
            }
            let opts = FileOptions {
                block_size: args.block_size,
                io: parse_io(&args.io)?,
                ..FileOptions::default()
            };
            for f in &args.file {
                sub.namespaces.push(file_ns(f, &opts)?);
            }
            sub.allowed_hosts.clone_from(&args.allow_host);
            sub.allow_any_host = args.allow_any_host;
            if sub.allowed_hosts.is_empty() && !sub.allow_any_host {
                eprintln!("warning: {nqn} allows no host (use --allow-host or --allow-any-host)");
            }
            cfg.subsystems.push(sub);
        }
        None if has_ns || !args.allow_host.is_empty() || args.allow_any_host => {
            bail!("--memory, --file, --allow-host and --allow-any-host need --subsystem")
        }
        None => {}
    }
    if cfg.subsystems.is_empty() {
        bail!("nothing to serve: give --subsystem with namespaces, or --config");
    }
    Ok(cfg)
}

fn describe(cfg: &TargetConfig) {
    for s in &cfg.subsystems {
        let hosts = if s.allow_any_host {
            "any host".to_string()
        } else {
            s.allowed_hosts.join(", ")
        };
        eprintln!("subsystem {} (hosts: {hosts})", s.nqn);
        for (i, n) in s.namespaces.iter().enumerate() {
            let be: &dyn Backend = n.backend.as_ref();
            eprintln!(
                "  namespace {}: {}, {}-byte blocks, I/O path: {}",
                n.nsid.unwrap_or(u32::try_from(i + 1).unwrap_or(0)),
                be.describe(),
                be.block_size(),
                be.io_path()
            );
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = build_config(&args)?;
    describe(&cfg);
    let target = Target::start(cfg).await.context("starting the target")?;
    let addr = target.local_addr();
    println!("listening on {addr}");
    if let Some(p) = &args.ready_file {
        // Write then rename, so a watcher never reads a half-written address.
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{addr}\n"))
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, p).with_context(|| format!("writing {}", p.display()))?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    eprintln!("shutting down");
    target.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("10GB").unwrap(), 10_000_000_000);
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999999TiB").is_err());
    }

    #[test]
    fn toml_config() {
        let f: FileConfig = toml::from_str(
            r#"
            listen = "0.0.0.0:4420"
            [limits]
            queue_depth = 64
            [[subsystem]]
            nqn = "nqn.2026-11.io.test:a"
            allowed_hosts = ["nqn.2014-08.org.nvmexpress:uuid:1"]
            [[subsystem.namespace]]
            memory = "1MiB"
            block_size = 4096
            [[subsystem]]
            nqn = "nqn.2026-11.io.test:b"
            allow_any_host = true
            [[subsystem.namespace]]
            nsid = 5
            memory = "2MiB"
            "#,
        )
        .unwrap();
        assert_eq!(f.subsystem.len(), 2);
        assert_eq!(f.subsystem[1].namespace[0].nsid, Some(5));
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
    }
}
