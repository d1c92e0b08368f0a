//! `dpud`: the DPU engine daemon. Reads its configuration (a TOML file, then flags),
//! starts the engine and the daemon shell (`engine::daemon`), and stops cleanly on
//! SIGTERM or SIGINT: listeners first, then a flush of every volume, then exit 0.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use engine::daemon::{self, Config, LogFormat};

/// The DPU storage offload engine daemon.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Examples:\n  dpud --config /etc/dpud/dpud.toml\n  dpud --data-dir /var/lib/dpud --api-socket /run/dpud/api.sock --log-json\n\nThe configuration format and every key are in docs/operations.md. Flags override the file."
)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory of the local store (profiles, nodes, exports).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Key-encryption key file (created with mode 0600 if absent).
    #[arg(long, value_name = "FILE")]
    kek_file: Option<PathBuf>,
    /// Reactor cores.
    #[arg(long, value_name = "N")]
    cores: Option<usize>,
    /// Control API Unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Control API TCP address (loopback unless api.allow_remote is set in the file).
    #[arg(long, value_name = "HOST:PORT")]
    api_tcp: Option<SocketAddr>,
    /// Prometheus endpoint address.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<SocketAddr>,
    /// Turn the metrics endpoint off.
    #[arg(long, conflicts_with = "metrics_listen")]
    no_metrics: bool,
    /// NBD Unix socket.
    #[arg(long, value_name = "PATH")]
    nbd_socket: Option<PathBuf>,
    /// NBD TCP address.
    #[arg(long, value_name = "HOST:PORT")]
    nbd_tcp: Option<SocketAddr>,
    /// NVMe/TCP listen address (loopback unless nvme_tcp.allow_remote is set in the file).
    #[arg(long, value_name = "HOST:PORT")]
    nvme_tcp: Option<SocketAddr>,
    /// Directory of the vhost-user-blk export sockets.
    #[arg(long, value_name = "DIR")]
    vhost_dir: Option<PathBuf>,
    /// Log filter (info, debug, engine=debug,info, ...); RUST_LOG overrides it.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Log one JSON object per line.
    #[arg(long)]
    log_json: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn config(args: &Args) -> anyhow::Result<Config> {
    let mut c = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(v) = &args.data_dir {
        c.data_dir = v.clone();
    }
    if let Some(v) = &args.kek_file {
        c.kek_file = Some(v.clone());
    }
    if let Some(v) = args.cores {
        c.cores = Some(v);
    }
    if let Some(v) = &args.api_socket {
        c.api.socket = v.clone();
    }
    if let Some(v) = args.api_tcp {
        c.api.tcp = Some(v);
    }
    if let Some(v) = args.metrics_listen {
        c.metrics.listen = Some(v);
    }
    if args.no_metrics {
        c.metrics.listen = None;
    }
    if let Some(v) = &args.nbd_socket {
        c.nbd.socket = Some(v.clone());
    }
    if let Some(v) = args.nbd_tcp {
        c.nbd.tcp = Some(v);
    }
    if let Some(v) = args.nvme_tcp {
        c.nvme_tcp.listen = Some(v);
    }
    if let Some(v) = &args.vhost_dir {
        c.vhost_user_blk.socket_dir = Some(v.clone());
    }
    if let Some(v) = &args.log_level {
        c.log_level = v.clone();
    }
    if args.log_json {
        c.log_format = LogFormat::Json;
    }
    c.validate()?;
    Ok(c)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = config(&args)?;
    if args.print_config {
        print!(
            "{}",
            toml::to_string(&config).context("printing the configuration")?
        );
        return Ok(());
    }
    daemon::init_logging(&config)?;
    daemon::prepare(&config)?;
    let service = daemon::real_service(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dpud-control")
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    runtime.block_on(async move {
        let handle = daemon::run(config, service).await?;
        tracing::info!(version = env!("CARGO_PKG_VERSION"), "dpud running");
        daemon::run_until_signal(handle).await?;
        Ok::<(), anyhow::Error>(())
    })
}
