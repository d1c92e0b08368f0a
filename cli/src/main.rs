//! `dpuctl`: the operator's command line over dpud's control API (gRPC on a Unix
//! socket, package `dpu.control.v1`).
//!
//! It is a thin client on purpose: every check that matters is made by the daemon,
//! which answers with a status code and a message written for the operator, and dpuctl
//! shows that message as it is. What dpuctl adds is the shape of the output (tables for
//! people, `--output json` for scripts) and exit codes a script can branch on
//! ([`exit`]; documented in docs/operations.md).

mod net;
mod output;
mod size;

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]
mod proto {
    tonic::include_proto!("dpu.control.v1");
}

use output::Output;

/// Exit codes (docs/operations.md).
mod exit {
    /// The command succeeded.
    pub const OK: u8 = 0;
    /// The daemon refused or failed the request; its message is printed.
    pub const DAEMON_ERROR: u8 = 1;
    /// The command line is wrong (clap's own code for usage errors).
    pub const USAGE: u8 = 2;
    /// The daemon could not be reached.
    pub const UNREACHABLE: u8 = 3;
    /// A local file could not be read or an editor failed.
    pub const LOCAL: u8 = 4;
}

const DEFAULT_SOCKET: &str = "/run/dpud/api.sock";

const EXAMPLES: &str = "\
Examples:
  dpuctl node add node1 --address 10.0.0.11:4420 --nqn nqn.2026-11.io.example:node1 --domain rack1
  dpuctl profile create --file gold.toml
  dpuctl profile create --name fast2 --protection mirror:2 --failure-domain node
  dpuctl volume create db1 --profile default --size 100GiB
  dpuctl export add db1 --type nbd
  dpuctl status
  dpuctl net port add veth-a --access vlan:10    (more: dpuctl net --help)
  dpuctl --output json volume list | jq '.[].name'
  dpuctl completions bash > /etc/bash_completion.d/dpuctl

Exit codes: 0 ok, 1 the daemon refused or failed the request, 2 usage error,
3 dpud not reachable, 4 a local file could not be read.";

/// dpuctl: manage dpud's profiles, nodes, volumes and exports.
#[derive(Debug, Parser)]
#[command(name = "dpuctl", version, about, after_help = EXAMPLES)]
struct Cli {
    /// dpud's control socket.
    #[arg(long, global = true, env = "DPUD_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH")]
    socket: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Human-readable tables.
    Table,
    /// JSON for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Storage profiles: how volumes are protected, compressed and encrypted.
    #[command(subcommand)]
    Profile(ProfileCmd),
    /// Storage nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Exports: how hosts reach volumes.
    #[command(subcommand)]
    Export(ExportCmd),
    /// Cluster health, degraded volumes and rebuilds.
    Status,
    /// Network offload: switch ports, firewall rules and connections, VXLAN, stats.
    #[command(subcommand)]
    Net(net::NetCmd),
    /// Prints a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
struct ProfileFields {
    /// Profile name.
    #[arg(long)]
    name: Option<String>,
    /// none, mirror:N, ec:K+M or ec:auto:FTT.
    #[arg(long)]
    protection: Option<String>,
    /// Failure-domain level the pieces must differ at (node, rack, ...).
    #[arg(long)]
    failure_domain: Option<String>,
    /// off, lz4 or zstd:LEVEL.
    #[arg(long)]
    compression: Option<String>,
    /// 4KiB to 128KiB.
    #[arg(long)]
    compression_unit: Option<String>,
    /// off or aes-256-gcm.
    #[arg(long)]
    encryption: Option<String>,
    /// IOPS limit (32 KiB units).
    #[arg(long)]
    max_iops: Option<u64>,
    /// Bandwidth limit in MiB/s.
    #[arg(long)]
    max_bandwidth_mib_s: Option<u64>,
    /// thin or thick.
    #[arg(long)]
    space_reservation: Option<String>,
}

impl ProfileFields {
    fn any(&self) -> bool {
        self.name.is_some()
            || self.protection.is_some()
            || self.failure_domain.is_some()
            || self.compression.is_some()
            || self.compression_unit.is_some()
            || self.encryption.is_some()
            || self.max_iops.is_some()
            || self.max_bandwidth_mib_s.is_some()
            || self.space_reservation.is_some()
    }

    /// These fields over `base` (for edit) or alone (for create).
    fn apply(&self, base: proto::ProfileSpec) -> proto::ProfileSpec {
        proto::ProfileSpec {
            name: self.name.clone().unwrap_or(base.name),
            protection: self.protection.clone().unwrap_or(base.protection),
            failure_domain: self.failure_domain.clone().unwrap_or(base.failure_domain),
            compression: self.compression.clone().or(base.compression),
            compression_unit: self.compression_unit.clone().or(base.compression_unit),
            encryption: self.encryption.clone().or(base.encryption),
            max_iops: self.max_iops.or(base.max_iops),
            max_bandwidth_mib_s: self.max_bandwidth_mib_s.or(base.max_bandwidth_mib_s),
            space_reservation: self.space_reservation.clone().or(base.space_reservation),
        }
    }
}

#[derive(Debug, Subcommand)]
enum ProfileCmd {
    /// Creates a profile from a TOML or JSON file (docs/profiles.md) or from flags.
    #[command(
        after_help = "Examples:\n  dpuctl profile create --file gold.toml\n  dpuctl profile create --name db --protection mirror:2 --failure-domain node --compression lz4"
    )]
    Create {
        /// TOML or JSON profile document ('-' reads standard input).
        #[arg(long, short = 'f', conflicts_with_all = ["name", "protection", "failure_domain"])]
        file: Option<PathBuf>,
        #[command(flatten)]
        fields: ProfileFields,
    },
    /// Lists profiles and whether the cluster can satisfy each.
    List,
    /// Shows one profile, its TOML document and what it resolves to.
    Show {
        /// Profile name.
        name: String,
    },
    /// Changes a profile: from a file, from flags, or in $EDITOR.
    #[command(
        after_help = "Examples:\n  dpuctl profile edit gold --file gold.toml\n  dpuctl profile edit gold --compression zstd:9\n  EDITOR=vi dpuctl profile edit gold"
    )]
    Edit {
        /// Profile name.
        #[arg(value_name = "NAME")]
        profile: String,
        /// TOML or JSON profile document with the same name.
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
        #[command(flatten)]
        fields: ProfileFields,
    },
    /// Deletes a profile no volume uses.
    Delete {
        /// Profile name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// Registers a storage node (an NVMe/TCP target).
    #[command(
        after_help = "Example:\n  dpuctl node add node1 --address 10.0.0.11:4420 --nqn nqn.2026-11.io.example:node1 --domain rack1"
    )]
    Add {
        /// Node name.
        name: String,
        /// NVMe/TCP address of its target.
        #[arg(long, value_name = "HOST:PORT")]
        address: String,
        /// Subsystem NQN of its namespace.
        #[arg(long)]
        nqn: String,
        /// Failure domains above the node, outermost first (e.g. rack1 or dc1/rack1).
        #[arg(long)]
        domain: Option<String>,
        /// Relative share of new pieces (default 1; 0 takes none).
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Lists nodes with their state and reachability.
    List,
    /// Takes a node out of the cluster; its pieces are rebuilt elsewhere.
    Remove {
        /// Node name.
        name: String,
    },
    /// Stops placing new pieces on a node and moves its pieces away.
    Drain {
        /// Node name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum VolumeCmd {
    /// Creates a volume.
    #[command(
        after_help = "Example:\n  dpuctl volume create db1 --profile default --size 100GiB\n\nSizes: a number of bytes, or with KiB, MiB, GiB, TiB (also K, M, G, T), or KB, MB, GB, TB (powers of 1000)."
    )]
    Create {
        /// Volume name.
        name: String,
        /// Storage profile.
        #[arg(long)]
        profile: String,
        /// Size (e.g. 10GiB), a multiple of 4 KiB.
        #[arg(long, value_parser = size::parse)]
        size: u64,
    },
    /// Lists volumes.
    List,
    /// Shows one volume.
    Show {
        /// Volume name.
        name: String,
    },
    /// Grows a volume.
    Resize {
        /// Volume name.
        name: String,
        /// New size (e.g. 20GiB).
        #[arg(long, value_parser = size::parse)]
        size: u64,
    },
    /// Deletes a volume no export serves.
    Delete {
        /// Volume name.
        name: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExportTypeArg {
    /// NBD (fio's nbd engine, qemu-img, nbd-client).
    Nbd,
    /// vhost-user-blk (a socket for QEMU's vhost-user-blk-pci; see docs/devices.md).
    VhostUserBlk,
    /// NVMe/TCP (one subsystem per export; needs --allow-host).
    NvmeTcp,
}

#[derive(Debug, Subcommand)]
enum ExportCmd {
    /// Exports a volume.
    #[command(
        after_help = "Examples:\n  dpuctl export add db1 --type nbd --name db1-ro --read-only\n  dpuctl export add db1 --type nvme-tcp --allow-host \"$(cat /etc/nvme/hostnqn)\""
    )]
    Add {
        /// Volume name.
        volume: String,
        /// Front-end.
        #[arg(long = "type", value_enum)]
        kind: ExportTypeArg,
        /// Export name (default: the volume's name).
        #[arg(long)]
        name: Option<String>,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// NVMe/TCP: a host NQN allowed to connect (repeat for more; at least one).
        #[arg(long = "allow-host", value_name = "NQN", num_args = 1..)]
        allow_hosts: Vec<String>,
    },
    /// Lists exports.
    List,
    /// Stops an export.
    Remove {
        /// Export name.
        name: String,
    },
}

/// Why a command failed, and so which exit code it gets.
#[derive(Debug)]
enum Failure {
    Daemon(tonic::Status),
    Unreachable(PathBuf, String),
    Local(String),
    Usage(String),
}

type Res<T> = Result<T, Failure>;

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Self::Daemon(s)
    }
}

async fn connect(socket: &Path) -> Res<Channel> {
    let path = socket.to_owned();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(&path).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    // The URI is not used for a Unix socket; it only has to parse.
    Endpoint::from_static("http://dpud.local")
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .map_err(|e| {
            let mut detail = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                detail = s.to_string();
                source = s.source();
            }
            Failure::Unreachable(socket.to_owned(), detail)
        })
}

fn read_file(path: &Path) -> Res<String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| Failure::Local(format!("cannot read standard input: {e}")))?;
        return Ok(s);
    }
    std::fs::read_to_string(path)
        .map_err(|e| Failure::Local(format!("cannot read {}: {e}", path.display())))
}

/// A profile document from a file: JSON if it says `.json` or starts with `{`.
fn document(path: &Path, text: String) -> proto::ProfileSource {
    let json = path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    proto::ProfileSource {
        source: Some(if json {
            proto::profile_source::Source::Json(text)
        } else {
            proto::profile_source::Source::Toml(text)
        }),
    }
}

fn spec_source(spec: proto::ProfileSpec) -> proto::ProfileSource {
    proto::ProfileSource {
        source: Some(proto::profile_source::Source::Spec(spec)),
    }
}

/// Lets the operator edit `toml` in $VISUAL or $EDITOR and returns the result.
fn edit_in_editor(name: &str, toml: &str) -> Res<String> {
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .map_err(|_| {
            Failure::Usage(format!(
                "nothing to change: give --file, field flags (such as --compression zstd:9), or set EDITOR to edit profile {name} interactively"
            ))
        })?;
    let mut file = tempfile::Builder::new()
        .prefix(&format!("dpuctl-profile-{name}-"))
        .suffix(".toml")
        .tempfile()
        .map_err(|e| Failure::Local(format!("cannot create a temporary file: {e}")))?;
    std::io::Write::write_all(&mut file, toml.as_bytes())
        .map_err(|e| Failure::Local(format!("cannot write a temporary file: {e}")))?;
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("dpuctl-editor")
        .arg(file.path())
        .status()
        .map_err(|e| Failure::Local(format!("cannot run the editor {editor:?}: {e}")))?;
    if !status.success() {
        return Err(Failure::Local(format!(
            "the editor {editor:?} failed ({status}); nothing changed"
        )));
    }
    read_file(file.path())
}

async fn run(cli: Cli) -> Res<()> {
    let out = Output::new(cli.output == Format::Json);
    if let Command::Completions { shell } = cli.command {
        let mut cmd = Cli::command();
        clap_complete::generate(shell, &mut cmd, "dpuctl", &mut std::io::stdout());
        return Ok(());
    }
    let channel = connect(&cli.socket).await?;
    match cli.command {
        Command::Completions { .. } => Ok(()),
        Command::Profile(cmd) => profile(channel, &out, cmd).await,
        Command::Node(cmd) => node(channel, &out, cmd).await,
        Command::Volume(cmd) => volume(channel, &out, cmd).await,
        Command::Export(cmd) => export(channel, &out, cmd).await,
        Command::Net(cmd) => net::run(channel, cli.output == Format::Json, cmd).await,
        Command::Status => {
            let mut c = proto::cluster_client::ClusterClient::new(channel);
            let s = c.status(proto::StatusRequest {}).await?.into_inner();
            out.status(&s);
            Ok(())
        }
    }
}

async fn profile(channel: Channel, out: &Output, cmd: ProfileCmd) -> Res<()> {
    let mut c = proto::profiles_client::ProfilesClient::new(channel);
    match cmd {
        ProfileCmd::Create { file, fields } => {
            let source = match file {
                Some(f) => document(&f, read_file(&f)?),
                None => {
                    if fields.name.is_none()
                        || fields.protection.is_none()
                        || fields.failure_domain.is_none()
                    {
                        return Err(Failure::Usage(
                            "give --file FILE, or at least --name, --protection and --failure-domain".into(),
                        ));
                    }
                    spec_source(fields.apply(proto::ProfileSpec::default()))
                }
            };
            let p = c
                .create(proto::CreateProfileRequest {
                    source: Some(source),
                })
                .await?
                .into_inner();
            out.profile(&p, "created");
        }
        ProfileCmd::List => {
            let list = c.list(proto::ListProfilesRequest {}).await?.into_inner();
            out.profiles(&list.profiles);
        }
        ProfileCmd::Show { name } => {
            let p = c.get(proto::GetProfileRequest { name }).await?.into_inner();
            out.profile(&p, "");
        }
        ProfileCmd::Edit {
            profile: name,
            file,
            fields,
        } => {
            let source = if let Some(f) = file {
                document(&f, read_file(&f)?)
            } else if fields.any() {
                let current = c
                    .get(proto::GetProfileRequest { name: name.clone() })
                    .await?
                    .into_inner();
                spec_source(fields.apply(current.spec.unwrap_or_default()))
            } else {
                let current = c
                    .get(proto::GetProfileRequest { name: name.clone() })
                    .await?
                    .into_inner();
                let edited = edit_in_editor(&name, &current.toml)?;
                if edited == current.toml {
                    eprintln!("profile {name} unchanged");
                    return Ok(());
                }
                document(Path::new("edited.toml"), edited)
            };
            let p = c
                .update(proto::UpdateProfileRequest {
                    name,
                    source: Some(source),
                })
                .await?
                .into_inner();
            out.profile(&p, "updated");
        }
        ProfileCmd::Delete { name } => {
            c.delete(proto::DeleteProfileRequest { name: name.clone() })
                .await?;
            out.done("profile", &name, "deleted");
        }
    }
    Ok(())
}

async fn node(channel: Channel, out: &Output, cmd: NodeCmd) -> Res<()> {
    let mut c = proto::nodes_client::NodesClient::new(channel);
    match cmd {
        NodeCmd::Add {
            name,
            address,
            nqn,
            domain,
            weight,
        } => {
            let n = c
                .add(proto::AddNodeRequest {
                    name,
                    address,
                    nqn,
                    domain,
                    weight,
                })
                .await?
                .into_inner();
            out.node(&n, "added");
        }
        NodeCmd::List => {
            let list = c.list(proto::ListNodesRequest {}).await?.into_inner();
            out.nodes(&list.nodes);
        }
        NodeCmd::Remove { name } => {
            let n = c
                .remove(proto::RemoveNodeRequest { name })
                .await?
                .into_inner();
            out.node(&n, "removed; its pieces are rebuilt on the other nodes");
        }
        NodeCmd::Drain { name } => {
            let n = c
                .drain(proto::DrainNodeRequest { name })
                .await?
                .into_inner();
            out.node(&n, "draining; it takes no new pieces");
        }
    }
    Ok(())
}

async fn volume(channel: Channel, out: &Output, cmd: VolumeCmd) -> Res<()> {
    let mut c = proto::volumes_client::VolumesClient::new(channel);
    match cmd {
        VolumeCmd::Create {
            name,
            profile,
            size,
        } => {
            let v = c
                .create(proto::CreateVolumeRequest {
                    name,
                    profile,
                    size_bytes: size,
                })
                .await?
                .into_inner();
            out.volume(&v, "created");
        }
        VolumeCmd::List => {
            let list = c.list(proto::ListVolumesRequest {}).await?.into_inner();
            out.volumes(&list.volumes);
        }
        VolumeCmd::Show { name } => {
            let v = c.get(proto::GetVolumeRequest { name }).await?.into_inner();
            out.volume(&v, "");
        }
        VolumeCmd::Resize { name, size } => {
            let v = c
                .resize(proto::ResizeVolumeRequest {
                    name,
                    size_bytes: size,
                })
                .await?
                .into_inner();
            out.volume(&v, "resized");
        }
        VolumeCmd::Delete { name } => {
            c.delete(proto::DeleteVolumeRequest { name: name.clone() })
                .await?;
            out.done("volume", &name, "deleted");
        }
    }
    Ok(())
}

async fn export(channel: Channel, out: &Output, cmd: ExportCmd) -> Res<()> {
    let mut c = proto::exports_client::ExportsClient::new(channel);
    match cmd {
        ExportCmd::Add {
            volume,
            kind,
            name,
            read_only,
            allow_hosts,
        } => {
            let kind = match kind {
                ExportTypeArg::Nbd => proto::ExportType::Nbd,
                ExportTypeArg::VhostUserBlk => proto::ExportType::VhostUserBlk,
                ExportTypeArg::NvmeTcp => proto::ExportType::NvmeTcp,
            };
            let e = c
                .add(proto::AddExportRequest {
                    volume,
                    r#type: kind.into(),
                    name,
                    read_only,
                    allowed_hosts: allow_hosts,
                })
                .await?
                .into_inner();
            out.export(&e, "added");
        }
        ExportCmd::List => {
            let list = c.list(proto::ListExportsRequest {}).await?.into_inner();
            out.exports(&list.exports);
        }
        ExportCmd::Remove { name } => {
            c.remove(proto::RemoveExportRequest { name: name.clone() })
                .await?;
            out.done("export", &name, "removed");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::from(exit::LOCAL);
        }
    };
    let json = cli.output == Format::Json;
    let color = !json && std::io::stderr().is_terminal();
    let (code, kind, message, hint) = match runtime.block_on(run(cli)) {
        Ok(()) => return ExitCode::from(exit::OK),
        Err(Failure::Daemon(s)) => (
            exit::DAEMON_ERROR,
            format!("{:?}", s.code()),
            s.message().to_owned(),
            None,
        ),
        Err(Failure::Unreachable(path, detail)) => (
            exit::UNREACHABLE,
            "Unreachable".to_owned(),
            format!("cannot reach dpud at {}: {detail}", path.display()),
            Some("is dpud running? start it with `dpud --config /etc/dpud/dpud.toml`, or point dpuctl at its socket with --socket or DPUD_SOCKET"),
        ),
        Err(Failure::Local(m)) => (exit::LOCAL, "Local".to_owned(), m, None),
        Err(Failure::Usage(m)) => (
            exit::USAGE,
            "Usage".to_owned(),
            m,
            Some("for more information, try '--help'"),
        ),
    };
    if json {
        // Scripts get the same facts as JSON on standard error.
        eprintln!(
            "{}",
            serde_json::json!({ "error": { "kind": kind, "message": message, "hint": hint, "exit_code": code } })
        );
    } else {
        let prefix = if color {
            "\x1b[31merror\x1b[0m"
        } else {
            "error"
        };
        eprintln!("{prefix}: {message}");
        if let Some(h) = hint {
            eprintln!("hint: {h}");
        }
    }
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
