//! The NVMe/TCP front-end: volumes as namespaces of NVMe subsystems, for bare-metal
//! hosts (the Linux kernel's nvme-tcp, SPDK, ...).
//!
//! It reuses the storage node's target (`nvmeof::target`) rather than a second
//! implementation of the protocol: the same PDU codec, queue handling and admin
//! commands that the kernel peers are tested against. What is specific to dpud is
//! only here:
//!
//! - [`DeviceBackend`] adapts a [`BlockDevice`] to the target's `Backend`: byte
//!   ranges pass through unchanged, FUA reaches the device, and device errors become
//!   the NVMe status a host acts on (a volume that cannot verify or reconstruct data
//!   answers Unrecovered Read Error, never unverified bytes; an unavailable volume
//!   answers Namespace Not Ready, which a host retries).
//! - [`NvmeTcpServer`] serves one subsystem per export, named by
//!   [`subsystem_nqn`], with the export's host NQN allow-list (a host outside it
//!   gets Connect Invalid Host). Exports come and go while the listener runs.
//! - Each accepted connection (one NVMe queue) is moved to the next reactor
//!   round-robin, so a host's I/O queues are spread over dpud's cores; the volume's
//!   work stays on the volume's own reactor behind its channel.
//! - A volume grows in place; [`NvmeTcpServer::namespace_resized`] makes the
//!   export's namespace take the device's new size and sends the connected hosts a
//!   Namespace Attribute Changed asynchronous event, so they rescan without
//!   reconnecting (the control plane calls it after `volume resize`).
//! - [`NvmeTcpServer::stats`] gives an export's counters, as the NBD and
//!   vhost-user-blk front-ends do for theirs. They are the target's per-subsystem
//!   counters (`nvmeof::target::SubsystemStats`): the target is the one place that
//!   sees every I/O command, including those refused before they reach the device
//!   (a range beyond the namespace, an unknown opcode), and one subsystem is one
//!   export.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use nvmeof::backend::{Backend, BackendError, BackendFuture, IoHints as NsHints, IoPath};
use nvmeof::target::{Limits, NamespaceConfig, SubsystemConfig, Target, TargetConfig};

use super::{BlockDevice, DeviceError, DeviceFuture};

/// The subsystem NQN prefix dpud uses unless configured otherwise.
pub const DEFAULT_NQN_PREFIX: &str = "nqn.2026-11.io.dpu-offload:export";

/// The subsystem NQN of export `name`: `<prefix>:<name>`. Export names are 1 to 64
/// letters, digits, `-`, `_` or `.`, so the NQN is ASCII and far below the 223-byte
/// limit for any sensible prefix (checked again when the subsystem is created).
#[must_use]
pub fn subsystem_nqn(prefix: &str, name: &str) -> String {
    format!("{prefix}:{name}")
}

/// Errors of the NVMe/TCP front-end.
#[derive(Debug, thiserror::Error)]
pub enum NvmeTcpError {
    /// The listener could not start.
    #[error("NVMe/TCP target: {0}")]
    Target(#[from] nvmeof::target::TargetError),
    /// The export is already served.
    #[error("NVMe/TCP export {0:?} is already served")]
    Exists(String),
    /// The export cannot be served as asked.
    #[error("NVMe/TCP export {name:?}: {reason}")]
    Invalid {
        /// The export.
        name: String,
        /// Why.
        reason: String,
    },
}

fn backend_error(e: DeviceError) -> BackendError {
    match e {
        DeviceError::OutOfRange { offset, len, size } => {
            BackendError::OutOfRange { offset, len, size }
        }
        DeviceError::Misaligned {
            offset,
            len,
            block_size,
        } => BackendError::Unaligned {
            offset,
            len,
            block_size,
        },
        DeviceError::ReadOnly => BackendError::ReadOnly,
        DeviceError::NoSpace(s) => BackendError::NoSpace(s),
        DeviceError::Media(s) => BackendError::Media(s),
        DeviceError::Unavailable(s) => BackendError::Unavailable(s),
    }
}

/// A [`BlockDevice`] as a namespace backend. See the module documentation.
#[derive(Debug)]
pub struct DeviceBackend {
    device: Arc<dyn BlockDevice>,
    what: String,
}

impl DeviceBackend {
    /// Wraps `device`; `what` names it in logs (the volume).
    pub fn new(device: Arc<dyn BlockDevice>, what: impl Into<String>) -> Self {
        Self {
            device,
            what: what.into(),
        }
    }

    fn map<T: Send + 'static>(f: DeviceFuture<'_, T>) -> BackendFuture<'_, T> {
        Box::pin(async move { f.await.map_err(backend_error) })
    }
}

/// Bytes to whole blocks of `block` bytes for a hint (0 stays "no hint").
fn blocks(bytes: u64, block: u32) -> u32 {
    let block = u64::from(block.max(1));
    if bytes == 0 || bytes % block != 0 {
        return 0;
    }
    u32::try_from(bytes / block).unwrap_or(0)
}

impl Backend for DeviceBackend {
    fn size(&self) -> u64 {
        self.device.size_bytes()
    }
    fn block_size(&self) -> u32 {
        self.device.block_size()
    }
    fn volatile_write_cache(&self) -> bool {
        self.device.volatile_write_cache()
    }
    fn deallocate_reads_zeroes(&self) -> bool {
        // BlockDevice::discard: "it reads as zeroes afterwards".
        true
    }
    fn io_path(&self) -> IoPath {
        IoPath::Other(format!("dpud volume engine ({})", self.what))
    }
    fn describe(&self) -> String {
        self.what.clone()
    }
    fn read(&self, offset: u64, len: u64) -> BackendFuture<'_, Bytes> {
        let f = self.device.read(offset, len);
        Box::pin(async move {
            let data = f.await.map_err(backend_error)?;
            // A device that answers with another length would shift the host's data.
            if u64::try_from(data.len()).ok() != Some(len) {
                return Err(BackendError::Media(format!(
                    "the device returned {} bytes for a {len}-byte read",
                    data.len()
                )));
            }
            Ok(Bytes::from(data))
        })
    }
    fn write(&self, offset: u64, data: Bytes) -> BackendFuture<'_, ()> {
        Self::map(self.device.write(offset, Vec::from(data), false))
    }
    fn write_fua(&self, offset: u64, data: Bytes) -> BackendFuture<'_, ()> {
        Self::map(self.device.write(offset, Vec::from(data), true))
    }
    fn flush(&self) -> BackendFuture<'_, ()> {
        Self::map(self.device.flush())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> BackendFuture<'_, ()> {
        Self::map(self.device.write_zeroes(offset, len, false))
    }
    fn deallocate(&self, offset: u64, len: u64) -> BackendFuture<'_, ()> {
        Self::map(self.device.discard(offset, len))
    }
    fn read_only(&self) -> bool {
        self.device.read_only()
    }
    fn io_hints(&self) -> NsHints {
        let h = self.device.io_hints();
        let bs = self.device.block_size();
        NsHints {
            optimal_io_boundary: blocks(h.io_boundary, bs),
            preferred_write_granularity: blocks(h.write_granularity, bs),
            preferred_write_alignment: blocks(h.write_granularity, bs),
            // Deallocation is as cheap at any block (it records a zero range).
            preferred_deallocate_granularity: 0,
            preferred_deallocate_alignment: 0,
            optimal_write_size: blocks(h.optimal_write_size, bs),
        }
    }
}

/// How the front-end listens.
#[derive(Debug, Clone)]
pub struct NvmeTcpConfig {
    /// Listen address (port 0: the kernel picks; see [`NvmeTcpServer::local_addr`]).
    pub listen: SocketAddr,
    /// Subsystem NQN prefix ([`subsystem_nqn`]).
    pub nqn_prefix: String,
    /// Queue and transport limits (the target's defaults: 8 I/O queues of depth 128,
    /// 128 KiB MDTS, 8 KiB in-capsule data).
    pub limits: Limits,
    /// Runtimes (dpud's reactors) the connections are spread over; empty: the
    /// runtime that starts the server.
    pub runtimes: Vec<tokio::runtime::Handle>,
}

impl NvmeTcpConfig {
    /// Defaults around `listen`.
    #[must_use]
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            nqn_prefix: DEFAULT_NQN_PREFIX.into(),
            limits: Limits::default(),
            runtimes: Vec::new(),
        }
    }
}

/// The counters of one export since it was added (see [`NvmeTcpServer::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NvmeTcpStats {
    /// Live controllers (host associations; each has an admin and I/O queues).
    pub controllers: u64,
    /// NVMe I/O commands received, whatever their outcome.
    pub requests: u64,
    /// Read commands completed.
    pub reads: u64,
    /// Write commands completed (not Write Zeroes or deallocation).
    pub writes: u64,
    /// Bytes read by hosts.
    pub read_bytes: u64,
    /// Bytes written by hosts.
    pub written_bytes: u64,
    /// I/O commands answered with an error status.
    pub errors: u64,
}

/// One served export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeExport {
    /// Export name.
    pub name: String,
    /// Its subsystem NQN.
    pub subnqn: String,
    /// Host NQNs allowed to connect.
    pub allowed_hosts: Vec<String>,
    /// The volume it serves.
    pub volume: String,
}

/// The NVMe/TCP server. See the module documentation.
#[derive(Debug)]
pub struct NvmeTcpServer {
    /// Taken out by [`NvmeTcpServer::shutdown`]; locked only to add or remove a
    /// subsystem (never across an await).
    target: Mutex<Option<Target>>,
    local_addr: SocketAddr,
    prefix: String,
    exports: Mutex<HashMap<String, NvmeExport>>,
}

impl NvmeTcpServer {
    /// Binds the listener and starts serving (no exports yet).
    pub async fn start(config: NvmeTcpConfig) -> Result<Self, NvmeTcpError> {
        let mut tc = TargetConfig::new(config.listen);
        tc.limits = config.limits;
        tc.runtimes = config.runtimes;
        let target = Target::start(tc).await?;
        Ok(Self {
            local_addr: target.local_addr(),
            target: Mutex::new(Some(target)),
            prefix: config.nqn_prefix,
            exports: Mutex::new(HashMap::new()),
        })
    }

    /// The address it listens on.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The subsystem NQN export `name` has (or would have).
    #[must_use]
    pub fn subsystem_nqn(&self, name: &str) -> String {
        subsystem_nqn(&self.prefix, name)
    }

    /// Serves `device` as namespace 1 of the export's subsystem, to the hosts in
    /// `allowed_hosts` only (at least one). Returns the subsystem NQN.
    pub fn add_export(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        allowed_hosts: &[String],
        volume: &str,
    ) -> Result<String, NvmeTcpError> {
        let invalid = |reason: String| NvmeTcpError::Invalid {
            name: name.to_owned(),
            reason,
        };
        if allowed_hosts.is_empty() {
            return Err(invalid(
                "no host NQN is allowed to connect: give at least one".into(),
            ));
        }
        let bs = device.block_size();
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(invalid(format!("block size {bs} cannot be an LBA format")));
        }
        if device.size_bytes() % u64::from(bs) != 0 {
            return Err(invalid(format!(
                "size {} is not whole {bs}-byte blocks",
                device.size_bytes()
            )));
        }
        let subnqn = self.subsystem_nqn(name);
        let mut exports = self.exports.lock().unwrap_or_else(PoisonError::into_inner);
        if exports.contains_key(name) {
            return Err(NvmeTcpError::Exists(name.to_owned()));
        }
        let backend = Arc::new(DeviceBackend::new(device, format!("volume {volume}")));
        let mut sub = SubsystemConfig::new(subnqn.clone()).namespace(
            // The volume's name seeds the namespace's NGUID and UUID, so they stay the
            // same across restarts of dpud and differ between volumes.
            NamespaceConfig::new(backend).id_seed(format!("dpud volume {volume}")),
        );
        sub.model = "dpu-offload dpud volume".into();
        for h in allowed_hosts {
            sub = sub.allow_host(h.clone());
        }
        match &*self.target.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(t) => t.add_subsystem(&sub)?,
            None => {
                return Err(invalid("the NVMe/TCP listener has been shut down".into()));
            }
        }
        exports.insert(
            name.to_owned(),
            NvmeExport {
                name: name.to_owned(),
                subnqn: subnqn.clone(),
                allowed_hosts: allowed_hosts.to_vec(),
                volume: volume.to_owned(),
            },
        );
        Ok(subnqn)
    }

    /// Stops serving an export: its controllers are torn down (their connections
    /// close) and Connects to its NQN fail. False if it was not served.
    pub fn remove_export(&self, name: &str) -> bool {
        let removed = self
            .exports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        match removed {
            Some(e) => self
                .target
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .is_some_and(|t| t.remove_subsystem(&e.subnqn)),
            None => false,
        }
    }

    /// The export, if served.
    #[must_use]
    pub fn export(&self, name: &str) -> Option<NvmeExport> {
        self.exports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// The names of the exports served, sorted.
    #[must_use]
    pub fn exports(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .exports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// The counters of an export, `None` if it is not served. They count from the
    /// moment the export was added (an export removed and added again starts over).
    #[must_use]
    pub fn stats(&self, name: &str) -> Option<NvmeTcpStats> {
        let e = self.export(name)?;
        let s = self
            .target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()?
            .subsystem_stats(&e.subnqn)?;
        Some(NvmeTcpStats {
            controllers: u64::try_from(s.controllers).unwrap_or(u64::MAX),
            requests: s.commands,
            reads: s.reads,
            writes: s.writes,
            read_bytes: s.read_bytes,
            written_bytes: s.written_bytes,
            errors: s.errors,
        })
    }

    /// The export's device has a new size (its volume grew): namespace 1 takes it
    /// from the device, and every connected host that enabled Namespace Attribute
    /// Notices gets an asynchronous event (the Linux host then rescans and resizes
    /// its block device). Returns whether the size changed.
    pub fn namespace_resized(&self, name: &str) -> Result<bool, NvmeTcpError> {
        let e = self.export(name).ok_or_else(|| NvmeTcpError::Invalid {
            name: name.to_owned(),
            reason: "not served".into(),
        })?;
        match &*self.target.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(t) => Ok(t.namespace_resized(&e.subnqn, 1)?),
            None => Err(NvmeTcpError::Invalid {
                name: name.to_owned(),
                reason: "the NVMe/TCP listener has been shut down".into(),
            }),
        }
    }

    /// Live controllers (host associations) of an export.
    #[must_use]
    pub fn controllers(&self, name: &str) -> usize {
        let Some(e) = self.export(name) else { return 0 };
        self.target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(0, |t| t.controller_count(&e.subnqn))
    }

    /// Stops accepting and closes every connection; later calls do nothing.
    pub async fn shutdown(&self) {
        let target = self
            .target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = target {
            t.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_become_whole_blocks() {
        assert_eq!(blocks(32 * 1024, 4096), 8);
        assert_eq!(blocks(0, 4096), 0);
        assert_eq!(blocks(6000, 4096), 0);
        assert_eq!(
            subsystem_nqn(DEFAULT_NQN_PREFIX, "vol0"),
            "nqn.2026-11.io.dpu-offload:export:vol0"
        );
    }
}
