//! dpud's configuration: a TOML file, then command-line flags on top.
//!
//! Unknown keys are errors (a misspelt `metric.listen` must not silently leave the
//! default in place). Every listener is deny-by-default: the API's Unix socket is mode
//! 0600, and a TCP listener (API, metrics, NBD) on an address other than loopback is
//! refused unless `allow_remote = true` is set next to it, because none of them
//! authenticates its clients yet.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::DaemonError;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The control API's listeners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Unix socket (created mode 0600; its directory is created mode 0700 if absent).
    pub socket: PathBuf,
    /// Optional TCP listener.
    pub tcp: Option<SocketAddr>,
    /// Allow `tcp` on a non-loopback address.
    pub allow_remote: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/dpud/api.sock"),
            tcp: None,
            allow_remote: false,
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `/metrics` is served; none turns it off.
    pub listen: Option<SocketAddr>,
    /// Allow `listen` on a non-loopback address.
    pub allow_remote: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            allow_remote: false,
        }
    }
}

/// The NBD front-end's listeners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    /// Unix socket; none turns it off.
    pub socket: Option<PathBuf>,
    /// TCP listener; none turns it off.
    pub tcp: Option<SocketAddr>,
    /// Allow `tcp` on a non-loopback address.
    pub allow_remote: bool,
}

impl Default for NbdConfig {
    fn default() -> Self {
        Self {
            socket: Some(PathBuf::from("/run/dpud/nbd.sock")),
            tcp: Some(SocketAddr::from(([127, 0, 0, 1], 10809))),
            allow_remote: false,
        }
    }
}

/// The NVMe/TCP front-end's listener (`docs/devices.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NvmeTcpConfig {
    /// Listen address; none (the default) turns NVMe/TCP exports off. 4420 is the
    /// IANA port for NVMe/TCP, but a storage node on the same machine may hold it.
    pub listen: Option<SocketAddr>,
    /// Allow `listen` on a non-loopback address (each export still admits only the
    /// host NQNs it lists).
    pub allow_remote: bool,
    /// Subsystem NQN prefix: export `NAME` is subsystem `<prefix>:NAME`.
    pub nqn_prefix: String,
}

impl Default for NvmeTcpConfig {
    fn default() -> Self {
        Self {
            listen: None,
            allow_remote: false,
            nqn_prefix: crate::frontend::nvme_tcp::DEFAULT_NQN_PREFIX.into(),
        }
    }
}

/// The vhost-user-blk front-end (`docs/devices.md`): one socket per export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VhostUserBlkConfig {
    /// Directory of the export sockets (`<dir>/<export>.sock`, mode 0600, the
    /// directory created mode 0700); none turns vhost-user-blk exports off.
    pub socket_dir: Option<PathBuf>,
    /// Virtqueues offered per export (QEMU's `num-queues` may use up to this many).
    pub num_queues: u16,
    /// Largest virtqueue size accepted (QEMU's `queue-size`).
    pub queue_size: u16,
}

impl Default for VhostUserBlkConfig {
    fn default() -> Self {
        let d = crate::frontend::vhost_user_blk::VhostUserBlkConfig::default();
        Self {
            socket_dir: Some(PathBuf::from("/run/dpud/vhost")),
            num_queues: d.num_queues,
            queue_size: d.queue_size,
        }
    }
}

/// The storage cluster's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Failure-domain levels, outermost first; the last is the node itself.
    pub levels: Vec<String>,
    /// A node unreachable for this many seconds is failed: its pieces are rebuilt on
    /// other nodes (draining and removed nodes are rebuilt at once).
    pub rebuild_grace_seconds: u64,
    /// Most MiB of rebuilt pieces written per second, per volume.
    pub rebuild_mib_per_second: u64,
    /// When no node a write or a metadata commit needs is reachable (every
    /// association dropped at once: a stall of dpud, a network blip), how many seconds
    /// it keeps trying before the host sees an error. Zero fails at once.
    pub outage_wait_seconds: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            levels: vec!["rack".into(), "node".into()],
            rebuild_grace_seconds: 600,
            rebuild_mib_per_second: 64,
            outage_wait_seconds: 10,
        }
    }
}

/// The whole configuration. See `docs/operations.md` for a commented example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the local store lives (created mode 0700 if absent).
    pub data_dir: PathBuf,
    /// The key-encryption key; default `<data_dir>/kek`. Created with 32 random bytes
    /// and mode 0600 if absent; refused if group or others may read it.
    pub kek_file: Option<PathBuf>,
    /// Reactor threads (one per core); default: every core the process may run on.
    pub cores: Option<usize>,
    /// Log filter (`info`, `debug`, `engine=debug,info`, ...). `RUST_LOG` overrides it.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Control API.
    pub api: ApiConfig,
    /// Metrics endpoint.
    pub metrics: MetricsConfig,
    /// NBD front-end.
    pub nbd: NbdConfig,
    /// NVMe/TCP front-end.
    pub nvme_tcp: NvmeTcpConfig,
    /// vhost-user-blk front-end.
    pub vhost_user_blk: VhostUserBlkConfig,
    /// Cluster shape.
    pub cluster: ClusterConfig,
    /// Network offload module (docs/network.md).
    pub net: crate::net::control::NetSettings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/dpud"),
            kek_file: None,
            cores: None,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            api: ApiConfig::default(),
            metrics: MetricsConfig::default(),
            nbd: NbdConfig::default(),
            nvme_tcp: NvmeTcpConfig::default(),
            vhost_user_blk: VhostUserBlkConfig::default(),
            cluster: ClusterConfig::default(),
            net: crate::net::control::NetSettings::default(),
        }
    }
}

impl Config {
    /// Parses a configuration file's text.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, DaemonError> {
        toml::from_str(text).map_err(|e| DaemonError::Config {
            path: path.to_owned(),
            detail: e.to_string(),
        })
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, DaemonError> {
        let text = std::fs::read_to_string(path).map_err(|e| DaemonError::Config {
            path: path.to_owned(),
            detail: format!("cannot read it: {e}"),
        })?;
        Self::from_toml(&text, path)
    }

    /// A configuration for tests: everything under `dir`, TCP listeners on loopback
    /// port 0 (the kernel picks), NBD TCP off.
    #[must_use]
    pub fn for_tests(dir: &Path) -> Self {
        Self {
            data_dir: dir.join("data"),
            kek_file: None,
            cores: Some(1),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            api: ApiConfig {
                socket: dir.join("api.sock"),
                tcp: None,
                allow_remote: false,
            },
            metrics: MetricsConfig {
                listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                allow_remote: false,
            },
            nbd: NbdConfig {
                socket: Some(dir.join("nbd.sock")),
                tcp: None,
                allow_remote: false,
            },
            nvme_tcp: NvmeTcpConfig {
                listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                ..NvmeTcpConfig::default()
            },
            vhost_user_blk: VhostUserBlkConfig {
                socket_dir: Some(dir.join("vhost")),
                ..VhostUserBlkConfig::default()
            },
            cluster: ClusterConfig::default(),
            net: crate::net::control::NetSettings {
                memory_ports: true,
                ..Default::default()
            },
        }
    }

    /// The key-encryption key's path.
    #[must_use]
    pub fn kek_path(&self) -> PathBuf {
        self.kek_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("kek"))
    }

    /// The local store's path.
    #[must_use]
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("store.redb")
    }

    /// Checks what can be checked before anything is opened.
    pub fn validate(&self) -> Result<(), DaemonError> {
        let bad = |detail: String| DaemonError::InvalidConfig(detail);
        if self.cores == Some(0) {
            return Err(bad("cores = 0: at least one reactor core is needed".into()));
        }
        if self.cluster.levels.is_empty() {
            return Err(bad(
                "cluster.levels is empty: list the failure-domain levels outermost first, ending with the node, such as [\"rack\", \"node\"]".into(),
            ));
        }
        placement::ClusterMap::new(self.cluster.levels.iter().cloned())
            .map_err(|e| bad(format!("cluster.levels: {e}")))?;
        if self.cluster.rebuild_mib_per_second == 0 {
            return Err(bad(
                "cluster.rebuild_mib_per_second is 0: a rebuild would never finish".into(),
            ));
        }
        let check = |what: &str, addr: Option<SocketAddr>, allow: bool| {
            match addr {
            Some(a) if !a.ip().is_loopback() && !allow => Err(bad(format!(
                "{what} = \"{a}\" is not a loopback address; it has no authentication, so set allow_remote = true in the same section if it really must be reachable from the network"
            ))),
            _ => Ok(()),
        }
        };
        check("api.tcp", self.api.tcp, self.api.allow_remote)?;
        check(
            "metrics.listen",
            self.metrics.listen,
            self.metrics.allow_remote,
        )?;
        check("nbd.tcp", self.nbd.tcp, self.nbd.allow_remote)?;
        check(
            "nvme_tcp.listen",
            self.nvme_tcp.listen,
            self.nvme_tcp.allow_remote,
        )?;
        let v = &self.vhost_user_blk;
        if v.num_queues == 0
            || v.num_queues > 64
            || !v.queue_size.is_power_of_two()
            || v.queue_size < 4
        {
            return Err(bad(format!(
                "vhost_user_blk: num_queues = {} (1 to 64) or queue_size = {} (a power of two from 4 to 32768) is out of range",
                v.num_queues, v.queue_size
            )));
        }
        let prefix = &self.nvme_tcp.nqn_prefix;
        if !prefix.starts_with("nqn.")
            || prefix.len() > 150
            || !prefix.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(bad(format!(
                "nvme_tcp.nqn_prefix = {prefix:?}: an NQN prefix starts with \"nqn.\", is printable ASCII and at most 150 bytes (the export name follows it)"
            )));
        }
        if self.api.socket.as_os_str().is_empty() {
            return Err(bad("api.socket is empty".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_remote_binds_are_refused() {
        let p = Path::new("x.toml");
        let e = Config::from_toml("[metric]\nlisten = \"127.0.0.1:1\"\n", p);
        assert!(matches!(e, Err(DaemonError::Config { .. })), "{e:?}");
        let c = Config::from_toml("[api]\ntcp = \"0.0.0.0:7000\"\n", p).unwrap_or_default();
        assert_eq!(c.api.tcp, Some(SocketAddr::from(([0, 0, 0, 0], 7000))));
        let e = c
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("allow_remote"), "{e}");
        let c = Config::from_toml("[api]\ntcp = \"0.0.0.0:7000\"\nallow_remote = true\n", p)
            .unwrap_or_default();
        assert!(c.validate().is_ok());
        assert!(Config::default().validate().is_ok());
        let c = Config::from_toml("[nvme_tcp]\nlisten = \"0.0.0.0:4420\"\n", p).unwrap_or_default();
        let e = c
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("nvme_tcp.listen") && e.contains("allow_remote"),
            "{e}"
        );
        let c = Config::from_toml("[nvme_tcp]\nnqn_prefix = \"iqn.x\"\n", p).unwrap_or_default();
        let e = c
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("nqn_prefix"), "{e}");
    }
}
