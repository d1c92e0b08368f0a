//! The front-ends the daemon runs for the exports in the store: the NBD server
//! (`crate::frontend::nbd`) on the configured Unix socket and TCP address, and the
//! NVMe/TCP server (`crate::frontend::nvme_tcp`) on its listener, its connections
//! spread over the engine's reactors, and one vhost-user-blk socket per export
//! (`crate::frontend::vhost_user_blk`) under the configured directory, its queues
//! spread over the reactors.
//!
//! The store is the truth about exports; this only mirrors it into the running
//! servers (at start from the store, then on every API change). A volume that grew is
//! announced to the vhost-user-blk exports of it (a config-change notice to the VM).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::api::{Frontends, ServedState};
use crate::frontend::nbd::{NbdListener, NbdServer};
use crate::frontend::nvme_tcp::NvmeTcpServer;
use crate::frontend::{BlockDevice, DeviceError, DeviceFuture};
use crate::store::{ExportKind, ExportRecord};

use super::config::{NbdConfig, NvmeTcpConfig, VhostUserBlkConfig};
use super::metrics::{header, sample};
use super::DaemonError;
use crate::frontend::vhost_user_blk::{self as vub, VhostUserBlkExport};

/// A device that refuses writes, for read-only exports.
#[derive(Debug)]
struct ReadOnly(Arc<dyn BlockDevice>);

impl BlockDevice for ReadOnly {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn volatile_write_cache(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, len: u64) -> DeviceFuture<'_, Vec<u8>> {
        self.0.read(offset, len)
    }
    fn write(&self, _offset: u64, _data: Vec<u8>, _fua: bool) -> DeviceFuture<'_, ()> {
        Box::pin(async { Err(DeviceError::ReadOnly) })
    }
    fn flush(&self) -> DeviceFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn discard(&self, _offset: u64, _len: u64) -> DeviceFuture<'_, ()> {
        Box::pin(async { Err(DeviceError::ReadOnly) })
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool) -> DeviceFuture<'_, ()> {
        Box::pin(async { Err(DeviceError::ReadOnly) })
    }
    fn io_hints(&self) -> crate::frontend::IoHints {
        self.0.io_hints()
    }
}

/// The daemon's front-ends.
#[derive(Debug)]
pub struct DaemonFrontends {
    nbd: NbdServer,
    listeners: Mutex<Vec<NbdListener>>,
    nbd_socket: Option<PathBuf>,
    nbd_tcp: Option<SocketAddr>,
    nvme: Option<NvmeTcpServer>,
    vhost: Option<VhostSide>,
}

/// The vhost-user-blk exports: one socket (and serving thread) each.
#[derive(Debug)]
struct VhostSide {
    dir: PathBuf,
    config: vub::VhostUserBlkConfig,
    reactors: Vec<tokio::runtime::Handle>,
    exports: Mutex<std::collections::HashMap<String, VhostExport>>,
}

/// One vhost-user-blk export and the volume behind it.
#[derive(Debug)]
struct VhostExport {
    volume: String,
    /// Shared so a config-change notice is sent without the map's lock held.
    export: Arc<VhostUserBlkExport>,
}

impl DaemonFrontends {
    /// Starts the configured NBD listeners.
    pub(crate) async fn start(config: &NbdConfig) -> Result<Self, DaemonError> {
        let nbd = NbdServer::new();
        let mut listeners = Vec::new();
        let listen_err = |addr: String, e: crate::frontend::nbd::NbdError| DaemonError::Listen {
            what: "NBD",
            addr,
            source: std::io::Error::other(e.to_string()),
        };
        let mut nbd_socket = None;
        if let Some(path) = &config.socket {
            if let Some(parent) = path.parent() {
                super::ensure_dir("NBD socket directory", parent)?;
            }
            let l = nbd
                .serve_unix(path)
                .await
                .map_err(|e| listen_err(path.display().to_string(), e))?;
            tracing::info!(socket = %path.display(), "NBD listening");
            nbd_socket = Some(path.clone());
            listeners.push(l);
        }
        let mut nbd_tcp = None;
        if let Some(addr) = config.tcp {
            let l = nbd
                .serve_tcp(addr)
                .await
                .map_err(|e| listen_err(addr.to_string(), e))?;
            nbd_tcp = l.local_addr();
            tracing::info!(addr = ?nbd_tcp, "NBD listening on TCP");
            listeners.push(l);
        }
        Ok(Self {
            nbd,
            listeners: Mutex::new(listeners),
            nbd_socket,
            nbd_tcp,
            nvme: None,
            vhost: None,
        })
    }

    /// Enables vhost-user-blk exports when a socket directory is configured; queue `i`
    /// of every export completes on `reactors[i % n]` (the control runtime when empty).
    pub(crate) fn start_vhost_user_blk(
        &mut self,
        config: &VhostUserBlkConfig,
        reactors: Vec<tokio::runtime::Handle>,
    ) -> Result<(), DaemonError> {
        let Some(dir) = &config.socket_dir else {
            return Ok(());
        };
        super::ensure_dir("vhost-user-blk socket directory", dir)?;
        let reactors = if reactors.is_empty() {
            vec![tokio::runtime::Handle::current()]
        } else {
            reactors
        };
        self.vhost = Some(VhostSide {
            dir: dir.clone(),
            config: vub::VhostUserBlkConfig {
                num_queues: config.num_queues,
                queue_size: config.queue_size,
                ..vub::VhostUserBlkConfig::default()
            },
            reactors,
            exports: Mutex::new(std::collections::HashMap::new()),
        });
        tracing::info!(dir = %dir.display(), "vhost-user-blk sockets enabled");
        Ok(())
    }

    fn serve_vhost(
        &self,
        export: &ExportRecord,
        device: Arc<dyn BlockDevice>,
    ) -> Result<(), String> {
        let Some(v) = &self.vhost else {
            return Err("dpud has no vhost-user-blk socket directory: set socket_dir under [vhost_user_blk] in its configuration (or --vhost-dir)".into());
        };
        let path = v.dir.join(format!("{}.sock", export.name));
        let e =
            VhostUserBlkExport::start(&export.name, &path, device, v.config, v.reactors.clone())
                .map_err(|e| e.to_string())?;
        let old = v
            .exports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                export.name.clone(),
                VhostExport {
                    volume: export.volume.clone(),
                    export: Arc::new(e),
                },
            );
        if let Some(old) = old {
            old.export.stop();
        }
        Ok(())
    }

    fn vhost_state(&self, export: &ExportRecord) -> ServedState {
        let Some(v) = &self.vhost else {
            return ServedState {
                served: false,
                detail:
                    "no vhost-user-blk socket directory is configured ([vhost_user_blk] socket_dir)"
                        .into(),
            };
        };
        let exports = v.exports.lock().unwrap_or_else(PoisonError::into_inner);
        match exports.get(&export.name).map(|e| &e.export) {
            Some(e) => ServedState {
                served: true,
                detail: format!(
                    "{}{}",
                    e.socket_path().display(),
                    if e.stats().connected {
                        " (connected)"
                    } else {
                        ""
                    }
                ),
            },
            None => ServedState {
                served: false,
                detail: "not served: its volume was not available when dpud started (see the log)"
                    .into(),
            },
        }
    }

    /// Starts the NVMe/TCP listener when one is configured; its connections are
    /// spread over `reactors` (the control runtime when empty).
    pub(crate) async fn start_nvme_tcp(
        &mut self,
        config: &NvmeTcpConfig,
        reactors: Vec<tokio::runtime::Handle>,
    ) -> Result<(), DaemonError> {
        let Some(addr) = config.listen else {
            return Ok(());
        };
        let mut c = crate::frontend::nvme_tcp::NvmeTcpConfig::new(addr);
        c.nqn_prefix = config.nqn_prefix.clone();
        c.runtimes = reactors;
        let server = NvmeTcpServer::start(c)
            .await
            .map_err(|e| DaemonError::Listen {
                what: "NVMe/TCP",
                addr: addr.to_string(),
                source: std::io::Error::other(e.to_string()),
            })?;
        tracing::info!(addr = %server.local_addr(), prefix = %config.nqn_prefix, "NVMe/TCP listening");
        self.nvme = Some(server);
        Ok(())
    }

    /// The NVMe/TCP address, when it listens.
    #[must_use]
    pub fn nvme_tcp(&self) -> Option<SocketAddr> {
        self.nvme.as_ref().map(NvmeTcpServer::local_addr)
    }

    fn serve_nvme(
        &self,
        export: &ExportRecord,
        device: Arc<dyn BlockDevice>,
    ) -> Result<(), String> {
        let Some(server) = &self.nvme else {
            return Err(
                "dpud has no NVMe/TCP listener: set listen = \"HOST:PORT\" under [nvme_tcp] in its configuration (or --nvme-tcp)".into(),
            );
        };
        server
            .add_export(&export.name, device, &export.allowed_hosts, &export.volume)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The namespaces of the NVMe/TCP exports of `volume` take its new size, and the
    /// hosts connected to them get a Namespace Attribute Changed event (no socket
    /// write here: the admin queues' connections send the completions).
    fn nvme_volume_grown(&self, volume: &str) {
        let Some(n) = &self.nvme else { return };
        for name in n.exports() {
            if n.export(&name).is_none_or(|e| e.volume != volume) {
                continue;
            }
            match n.namespace_resized(&name) {
                Ok(true) => {
                    tracing::info!(export = %name, "NVMe/TCP namespace resized; hosts notified")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(export = %name, "cannot resize the NVMe/TCP namespace: {e}")
                }
            }
        }
    }

    fn nvme_state(&self, export: &ExportRecord) -> ServedState {
        match (&self.nvme, self.nvme_target(export)) {
            (None, _) => ServedState {
                served: false,
                detail: "no NVMe/TCP listener is configured ([nvme_tcp] listen)".into(),
            },
            (Some(_), None) => ServedState {
                served: false,
                detail: "not served: its volume was not available when dpud started (see the log)"
                    .into(),
            },
            (Some(s), Some((_, nqn))) => {
                let a = s.local_addr();
                ServedState {
                    served: true,
                    detail: format!("nvme connect -t tcp -a {} -s {} -n {nqn}", a.ip(), a.port()),
                }
            }
        }
    }

    /// The NBD Unix socket, when it listens.
    #[must_use]
    pub fn nbd_socket(&self) -> Option<&Path> {
        self.nbd_socket.as_deref()
    }

    /// The NBD TCP address, when it listens.
    #[must_use]
    pub fn nbd_tcp(&self) -> Option<SocketAddr> {
        self.nbd_tcp
    }

    /// Front-end counters in Prometheus text form.
    pub(crate) fn write_metrics(&self, out: &mut String) {
        let exports = self.nbd.exports();
        let stats: Vec<_> = exports
            .iter()
            .filter_map(|e| self.nbd.stats(e).map(|s| (e, s)))
            .collect();
        type Get = fn(&crate::frontend::nbd::NbdStats) -> u64;
        let series: [(&str, &str, &str, Get); 6] = [
            (
                "dpud_nbd_connections",
                "gauge",
                "NBD connections in transmission.",
                |s| s.connections,
            ),
            (
                "dpud_nbd_requests_total",
                "counter",
                "NBD requests received.",
                |s| s.requests,
            ),
            (
                "dpud_nbd_read_bytes_total",
                "counter",
                "Bytes read by NBD clients.",
                |s| s.read_bytes,
            ),
            (
                "dpud_nbd_written_bytes_total",
                "counter",
                "Bytes written by NBD clients.",
                |s| s.written_bytes,
            ),
            (
                "dpud_nbd_errors_total",
                "counter",
                "NBD requests answered with an error.",
                |s| s.errors,
            ),
            (
                "dpud_nbd_dropped_connections_total",
                "counter",
                "NBD connections ended by a protocol violation or an I/O error.",
                |s| s.dropped_connections,
            ),
        ];
        for (name, kind, help, get) in series {
            header(out, name, kind, help);
            for (e, s) in &stats {
                sample(out, name, "export", e, get(s));
            }
        }
        header(
            out,
            "dpud_nbd_handshake_failures_total",
            "counter",
            "NBD connections that never reached transmission.",
        );
        let _ = writeln!(
            out,
            "dpud_nbd_handshake_failures_total {}",
            self.nbd.handshake_failures()
        );
        self.write_vhost_metrics(out);
        self.write_nvme_metrics(out);
    }

    fn write_nvme_metrics(&self, out: &mut String) {
        let Some(server) = &self.nvme else { return };
        let stats: Vec<(String, crate::frontend::nvme_tcp::NvmeTcpStats)> = server
            .exports()
            .into_iter()
            .filter_map(|e| server.stats(&e).map(|s| (e, s)))
            .collect();
        type Get = fn(&crate::frontend::nvme_tcp::NvmeTcpStats) -> u64;
        let series: [(&str, &str, &str, Get); 7] = [
            (
                "dpud_nvme_tcp_controllers",
                "gauge",
                "NVMe/TCP controllers (host associations) connected.",
                |s| s.controllers,
            ),
            (
                "dpud_nvme_tcp_requests_total",
                "counter",
                "NVMe I/O commands received.",
                |s| s.requests,
            ),
            (
                "dpud_nvme_tcp_reads_total",
                "counter",
                "NVMe Read commands completed.",
                |s| s.reads,
            ),
            (
                "dpud_nvme_tcp_writes_total",
                "counter",
                "NVMe Write commands completed.",
                |s| s.writes,
            ),
            (
                "dpud_nvme_tcp_read_bytes_total",
                "counter",
                "Bytes read by NVMe/TCP hosts.",
                |s| s.read_bytes,
            ),
            (
                "dpud_nvme_tcp_written_bytes_total",
                "counter",
                "Bytes written by NVMe/TCP hosts.",
                |s| s.written_bytes,
            ),
            (
                "dpud_nvme_tcp_errors_total",
                "counter",
                "NVMe I/O commands answered with an error status.",
                |s| s.errors,
            ),
        ];
        for (name, kind, help, get) in series {
            header(out, name, kind, help);
            for (e, s) in &stats {
                sample(out, name, "export", e, get(s));
            }
        }
    }

    fn write_vhost_metrics(&self, out: &mut String) {
        let Some(v) = &self.vhost else { return };
        let mut stats: Vec<(String, vub::VhostUserBlkStats)> = v
            .exports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(n, e)| (n.clone(), e.export.stats()))
            .collect();
        stats.sort_by(|a, b| a.0.cmp(&b.0));
        type Get = fn(&vub::VhostUserBlkStats) -> u64;
        let series: [(&str, &str, &str, Get); 6] = [
            (
                "dpud_vhost_connected",
                "gauge",
                "Whether a vhost-user front-end (QEMU) is connected.",
                |s| u64::from(s.connected),
            ),
            (
                "dpud_vhost_requests_total",
                "counter",
                "virtio-blk requests taken off the virtqueues.",
                |s| s.requests,
            ),
            (
                "dpud_vhost_read_bytes_total",
                "counter",
                "Bytes read by vhost-user-blk guests.",
                |s| s.read_bytes,
            ),
            (
                "dpud_vhost_written_bytes_total",
                "counter",
                "Bytes written by vhost-user-blk guests.",
                |s| s.written_bytes,
            ),
            (
                "dpud_vhost_errors_total",
                "counter",
                "virtio-blk requests answered with an error status.",
                |s| s.errors,
            ),
            (
                "dpud_vhost_malformed_total",
                "counter",
                "virtio-blk requests refused before the device (malformed chains, bad ranges).",
                |s| s.malformed,
            ),
        ];
        for (name, kind, help, get) in series {
            header(out, name, kind, help);
            for (e, s) in &stats {
                sample(out, name, "export", e, get(s));
            }
        }
    }

    /// Stops the listeners; each connection answers what it has in flight and closes.
    pub(crate) async fn shutdown(&self) {
        let listeners: Vec<NbdListener> = std::mem::take(
            &mut *self
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for l in listeners {
            l.shutdown().await;
        }
        if let Some(n) = &self.nvme {
            n.shutdown().await;
        }
        if let Some(v) = &self.vhost {
            let exports: Vec<Arc<VhostUserBlkExport>> = v
                .exports
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .drain()
                .map(|(_, e)| e.export)
                .collect();
            // Joining waits for requests in flight: off the async threads.
            let _ = tokio::task::spawn_blocking(move || {
                for e in &exports {
                    e.stop_and_wait();
                }
            })
            .await;
        }
    }
}

impl Frontends for DaemonFrontends {
    fn serve(&self, export: &ExportRecord, device: Arc<dyn BlockDevice>) -> Result<(), String> {
        if export.kind == ExportKind::NvmeTcp {
            let device: Arc<dyn BlockDevice> = if export.read_only {
                Arc::new(ReadOnly(device))
            } else {
                device
            };
            return self.serve_nvme(export, device);
        }
        if export.kind == ExportKind::VhostUserBlk {
            let device: Arc<dyn BlockDevice> = if export.read_only {
                Arc::new(ReadOnly(device))
            } else {
                device
            };
            return self.serve_vhost(export, device);
        }
        if export.kind != ExportKind::Nbd {
            return Err(format!(
                "{} exports are not served by this build",
                export.kind
            ));
        }
        let device: Arc<dyn BlockDevice> = if export.read_only {
            Arc::new(ReadOnly(device))
        } else {
            device
        };
        self.nbd
            .add_export(
                &export.name,
                device,
                Some(format!("dpud volume {}", export.volume)),
            )
            .map_err(|e| e.to_string())
    }

    fn unserve(&self, name: &str) {
        // Nothing to do when it was not served (its volume was missing at start).
        let _ = self.nbd.remove_export(name);
        if let Some(n) = &self.nvme {
            n.remove_export(name);
        }
        if let Some(v) = &self.vhost {
            let e = v
                .exports
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(name);
            // Cuts the connection and removes the socket; the thread ends on its own.
            if let Some(e) = e {
                e.export.stop();
            }
        }
    }

    fn volume_grown(&self, volume: &str) {
        self.nvme_volume_grown(volume);
        let Some(v) = &self.vhost else { return };
        let exports: Vec<Arc<VhostUserBlkExport>> = v
            .exports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|e| e.volume == volume)
            .map(|e| Arc::clone(&e.export))
            .collect();
        // Each logs what it did; none of the outcomes is an error of the resize.
        for e in exports {
            let _ = e.capacity_changed();
        }
    }

    fn nvme_target(&self, export: &ExportRecord) -> Option<(String, String)> {
        let server = self.nvme.as_ref()?;
        let e = server.export(&export.name)?;
        Some((server.local_addr().to_string(), e.subnqn))
    }

    fn state(&self, export: &ExportRecord) -> ServedState {
        if export.kind == ExportKind::NvmeTcp {
            return self.nvme_state(export);
        }
        if export.kind == ExportKind::VhostUserBlk {
            return self.vhost_state(export);
        }
        if !self.nbd.exports().iter().any(|e| e == &export.name) {
            return ServedState {
                served: false,
                detail: "not served: its volume was not available when dpud started (see the log)"
                    .into(),
            };
        }
        let mut at = Vec::new();
        if let Some(p) = &self.nbd_socket {
            at.push(format!(
                "nbd+unix:///{}?socket={}",
                export.name,
                p.display()
            ));
        }
        if let Some(a) = self.nbd_tcp {
            at.push(format!("nbd://{a}/{}", export.name));
        }
        ServedState {
            served: !at.is_empty(),
            detail: if at.is_empty() {
                "no NBD listener is configured ([nbd] socket or tcp)".into()
            } else {
                at.join(" ")
            },
        }
    }
}
