//! What a target serves and the transport limits it advertises.
//!
//! The limits are the numbers a host sizes itself by (IOCCSZ, MDTS, MAXH2CDATA, queue
//! depth), so they live in one validated place: every value the target advertises in
//! ICResp, CAP or Identify is derived from here and enforced by the same code.

use super::TargetError;
use crate::backend::Backend;
use std::net::SocketAddr;
use std::sync::Arc;

/// The whole target: where it listens and what it serves.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// Listen address (port 0 picks a free port; see [`super::Target::local_addr`]).
    pub listen: SocketAddr,
    /// NVM subsystems.
    pub subsystems: Vec<SubsystemConfig>,
    /// Transport and queue limits.
    pub limits: Limits,
    /// Runtimes to spread connections (queues) over, round-robin; each connection
    /// and its command tasks stay on one. Empty (the default): the runtime that
    /// called [`super::Target::start`].
    pub runtimes: Vec<tokio::runtime::Handle>,
}

impl TargetConfig {
    /// A configuration listening on `listen` with default limits and no subsystems.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            subsystems: Vec::new(),
            limits: Limits::default(),
            runtimes: Vec::new(),
        }
    }

    /// Add a subsystem (builder style).
    pub fn subsystem(mut self, s: SubsystemConfig) -> Self {
        self.subsystems.push(s);
        self
    }
}

/// One NVM subsystem.
#[derive(Debug, Clone)]
pub struct SubsystemConfig {
    /// Subsystem NQN.
    pub nqn: String,
    /// Serial number reported in Identify Controller (default: derived from the NQN).
    pub serial: Option<String>,
    /// Model number reported in Identify Controller.
    pub model: String,
    /// Namespaces, in NSID order unless they carry explicit ids.
    pub namespaces: Vec<NamespaceConfig>,
    /// Host NQNs allowed to connect.
    pub allowed_hosts: Vec<String>,
    /// Let any host connect (the allow-list is ignored). Off by default.
    pub allow_any_host: bool,
}

impl SubsystemConfig {
    /// A subsystem with no namespaces and no allowed hosts (nobody may connect).
    pub fn new(nqn: impl Into<String>) -> Self {
        Self {
            nqn: nqn.into(),
            serial: None,
            model: "dpu-offload nvmeof-target".into(),
            namespaces: Vec::new(),
            allowed_hosts: Vec::new(),
            allow_any_host: false,
        }
    }

    /// Add a namespace (builder style).
    pub fn namespace(mut self, ns: NamespaceConfig) -> Self {
        self.namespaces.push(ns);
        self
    }

    /// Allow a host NQN (builder style).
    pub fn allow_host(mut self, hostnqn: impl Into<String>) -> Self {
        self.allowed_hosts.push(hostnqn.into());
        self
    }

    /// Allow every host (builder style).
    pub fn allow_any_host(mut self) -> Self {
        self.allow_any_host = true;
        self
    }
}

/// One namespace.
#[derive(Clone)]
pub struct NamespaceConfig {
    /// NSID (1-based); `None` = next free id.
    pub nsid: Option<u32>,
    /// Storage.
    pub backend: Arc<dyn Backend>,
    /// A stable string naming the storage (a file path), mixed into the default NGUID
    /// and UUID so they survive restarts and differ between namespaces.
    pub id_seed: String,
    /// Explicit NGUID.
    pub nguid: Option<[u8; 16]>,
    /// Explicit UUID.
    pub uuid: Option<[u8; 16]>,
}

impl std::fmt::Debug for NamespaceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceConfig")
            .field("nsid", &self.nsid)
            .field("backend", &self.backend.describe())
            .field("id_seed", &self.id_seed)
            .finish_non_exhaustive()
    }
}

impl NamespaceConfig {
    /// A namespace on `backend` with the next free NSID.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self {
            nsid: None,
            backend,
            id_seed: String::new(),
            nguid: None,
            uuid: None,
        }
    }

    /// Set the identity seed (builder style).
    pub fn id_seed(mut self, seed: impl Into<String>) -> Self {
        self.id_seed = seed.into();
        self
    }
}

/// Queue and transport limits the target advertises and enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Entries per submission queue (CAP.MQES + 1, and MAXCMD).
    pub queue_depth: u16,
    /// I/O queues per controller.
    pub max_io_queues: u16,
    /// In-capsule data accepted on I/O queues (IOCCSZ = 4 + this / 16).
    pub io_in_capsule: u32,
    /// In-capsule data accepted on admin queues (NVMe/TCP requires 8 KiB).
    pub admin_in_capsule: u32,
    /// Largest data transfer of one command (MDTS), a power of two >= 4096.
    pub max_transfer: u32,
    /// Largest H2CData PDU payload (MAXH2CDATA), at least 4096.
    pub maxh2cdata: u32,
    /// Accept a host's request for header digests.
    pub allow_header_digest: bool,
    /// Accept a host's request for data digests.
    pub allow_data_digest: bool,
    /// Use the C2HData SUCCESS flag (skip the response capsule) when the queue has
    /// SQ flow control disabled, as the specification requires.
    pub c2h_success: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queue_depth: 128,
            max_io_queues: 8,
            io_in_capsule: 8192,
            admin_in_capsule: 8192,
            max_transfer: 128 * 1024,
            maxh2cdata: 128 * 1024,
            allow_header_digest: true,
            allow_data_digest: true,
            c2h_success: true,
        }
    }
}

impl Limits {
    /// Check the values are ones a host can use.
    pub fn validate(&self) -> Result<(), TargetError> {
        let bad = |m: String| Err(TargetError::Config(m));
        if !(2..=4096).contains(&self.queue_depth) {
            return bad(format!("queue_depth {} not in 2..=4096", self.queue_depth));
        }
        if self.max_io_queues == 0 || self.max_io_queues > 1024 {
            return bad(format!(
                "max_io_queues {} not in 1..=1024",
                self.max_io_queues
            ));
        }
        if self.io_in_capsule % 16 != 0 || self.io_in_capsule > 1 << 20 {
            return bad(format!(
                "io_in_capsule {} must be a multiple of 16 and at most 1 MiB",
                self.io_in_capsule
            ));
        }
        if self.admin_in_capsule < 8192 || self.admin_in_capsule > 1 << 20 {
            return bad(format!(
                "admin_in_capsule {} must be 8 KiB..1 MiB",
                self.admin_in_capsule
            ));
        }
        if !self.max_transfer.is_power_of_two()
            || self.max_transfer < 4096
            || self.max_transfer > 32 << 20
        {
            return bad(format!(
                "max_transfer {} must be a power of two between 4 KiB and 32 MiB",
                self.max_transfer
            ));
        }
        if self.maxh2cdata < 4096 || self.maxh2cdata % 4 != 0 {
            return bad(format!(
                "maxh2cdata {} must be >= 4096 and dword aligned",
                self.maxh2cdata
            ));
        }
        Ok(())
    }

    /// MDTS field: max transfer as a power of two in units of the 4 KiB minimum page.
    pub fn mdts(&self) -> u8 {
        let pages = (self.max_transfer / 4096).max(1);
        u8::try_from(pages.trailing_zeros()).unwrap_or(0)
    }

    /// IOCCSZ field: I/O command capsule size in 16-byte units (64-byte SQE included).
    pub fn ioccsz(&self) -> u32 {
        (64 + self.io_in_capsule) / 16
    }
}
