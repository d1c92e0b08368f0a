//! Small QEMU guests that run real peers (the Linux kernel's NVMe/TCP host and target
//! today; vhost-user-blk and NVMe/TCP front-end tests later) against our code.
//!
//! KVM is not usable on the machines this project runs on, so the guest is a stock
//! Debian cloud kernel under TCG with a busybox initramfs: it boots in a few seconds and
//! needs no disk image. A test hands over a shell script; the guest runs it once and
//! powers off, and the test reads the results from the serial console, where the
//! script's steps are framed by `@@` markers (see `testbed/guest/testlib.sh`). The whole
//! console is kept in a log file, and every error carries its tail, so that a failure
//! in CI can be diagnosed from the test output alone. See docs/testing.md.

pub mod cpio;
pub mod image;
mod run;

use std::fmt;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

pub use image::{ImageSpec, KernelTree, GUEST_HOSTID, GUEST_HOSTNQN};
pub use run::{GuestRun, RunningGuest, Section};

/// The guest's address on the user-mode network.
pub const GUEST_ADDR: &str = "10.0.2.15";
/// The address under which the guest reaches the host's loopback interface.
pub const HOST_ADDR_FROM_GUEST: &str = "10.0.2.2";

/// Errors of the guest machinery.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Something the guest needs is missing or a host tool failed.
    #[error("guest setup: {0}")]
    Setup(String),
    /// The guest ran but did not do what was asked; `report` holds the commands, their
    /// output and the tail of the console.
    #[error("guest {name}: {what}\n{report}")]
    Failed {
        /// The run's name.
        name: String,
        /// What went wrong.
        what: String,
        /// Diagnostics for the reader of the test log.
        report: String,
    },
}

impl GuestError {
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// How the guest's network reaches the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// QEMU's built-in slirp (`-netdev user`): no extra process, 4-9 MB/s under TCG.
    Slirp,
    /// The `passt` daemon (`-netdev stream`, MTU 65520): 2-4 times faster than slirp.
    Passt,
}

/// A TCP port forwarded from the host's loopback into the guest.
#[derive(Debug, Clone, Copy)]
pub struct PortForward {
    /// Port on 127.0.0.1 of the host.
    pub host_port: u16,
    /// Port on the guest.
    pub guest_port: u16,
}

/// A file added to the per-run archive.
#[derive(Debug, Clone)]
pub struct GuestFile {
    /// Path inside the guest.
    pub path: String,
    /// Permission bits.
    pub perm: u32,
    /// Contents.
    pub data: Vec<u8>,
}

/// One guest run: the script and the machine it runs on.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Names the log directory and appears in every error.
    pub name: String,
    /// The shell script run as `/test.sh` after the functions of `testlib.sh`.
    pub script: String,
    /// Extra files for the per-run archive.
    pub files: Vec<GuestFile>,
    /// Host-to-guest TCP forwards.
    pub forwards: Vec<PortForward>,
    /// Hard limit for the whole run, boot included; QEMU is killed after it.
    pub timeout: Duration,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// The network back-end.
    pub network: Network,
    /// Boot with qboot instead of SeaBIOS (1-2 s faster; leaves BARs of class-0 PCI
    /// devices unassigned, so turn it off for such devices).
    pub qboot: bool,
    /// Extra QEMU arguments (devices, memory backends).
    pub qemu_args: Vec<String>,
    /// Extra kernel command-line words.
    pub kernel_args: Vec<String>,
}

impl GuestConfig {
    /// A 2-vCPU, 1 GiB guest with a 120 s limit on the network [`Network::from_env`]
    /// picks.
    pub fn new(name: impl Into<String>, script: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            script: script.into(),
            files: Vec::new(),
            forwards: Vec::new(),
            timeout: Duration::from_secs(120),
            memory_mib: 1024,
            cpus: 2,
            network: Network::from_env(),
            qboot: true,
            qemu_args: Vec::new(),
            kernel_args: Vec::new(),
        }
    }

    /// Forwards 127.0.0.1:`host_port` on the host to `guest_port` in the guest.
    #[must_use]
    pub fn forward(mut self, host_port: u16, guest_port: u16) -> Self {
        self.forwards.push(PortForward {
            host_port,
            guest_port,
        });
        self
    }

    /// Sets the hard time limit.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Chooses the network back-end.
    #[must_use]
    pub fn network(mut self, network: Network) -> Self {
        self.network = network;
        self
    }

    /// Adds a file to the guest.
    #[must_use]
    pub fn file(mut self, path: impl Into<String>, perm: u32, data: impl Into<Vec<u8>>) -> Self {
        self.files.push(GuestFile {
            path: path.into(),
            perm,
            data: data.into(),
        });
        self
    }
}

/// Where the guest kernel and the cached images live.
#[derive(Debug, Clone)]
pub struct GuestEnv {
    /// `.work/guest` of the checkout (or `$TESTBED_GUEST_DIR`).
    pub work_dir: PathBuf,
    /// The extracted kernel.
    pub kernel: KernelTree,
    /// What goes into the base image.
    pub spec: ImageSpec,
}

impl GuestEnv {
    /// Finds the guest kernel that `scripts/install-deps.sh` extracted.
    pub fn discover() -> Result<Self, GuestError> {
        let work_dir = match std::env::var_os("TESTBED_GUEST_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
                root.canonicalize().unwrap_or(root).join(".work/guest")
            }
        };
        let kernel = KernelTree::find(&work_dir.join("kernel"))?;
        Ok(Self {
            work_dir,
            kernel,
            spec: ImageSpec::default(),
        })
    }

    /// The base initramfs, built on first use and cached.
    pub fn base_image(&self) -> Result<PathBuf, GuestError> {
        image::base_image(&self.kernel, &self.work_dir, &self.spec)
    }

    /// Boots a guest that runs `config.script`; returns once QEMU is started.
    pub fn start(&self, config: GuestConfig) -> Result<RunningGuest, GuestError> {
        run::start(self, config)
    }

    /// Boots a guest, runs its script to the end and returns what it printed. The run
    /// succeeded if [`GuestRun::check`] says so.
    pub fn run(&self, config: GuestConfig) -> Result<GuestRun, GuestError> {
        self.start(config)?.finish()
    }
}

/// Held by a test while its guest runs: TCG guests on a 2-core machine slow each other
/// down enough to hit timeouts, so tests in one process boot them one at a time.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static ONE_GUEST: Mutex<()> = Mutex::new(());
    ONE_GUEST.lock().unwrap_or_else(|p| p.into_inner())
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for forwards and listeners).
pub fn free_local_port() -> io::Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

impl Network {
    /// `$TESTBED_GUEST_NET` (`slirp` or `passt`), else the default: passt when it is
    /// installed (it is 2-4 times faster), slirp otherwise.
    pub fn from_env() -> Self {
        match std::env::var("TESTBED_GUEST_NET").as_deref() {
            Ok("slirp") => Network::Slirp,
            Ok("passt") => Network::Passt,
            _ if passt_installed() => Network::Passt,
            _ => Network::Slirp,
        }
    }
}

fn passt_installed() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join("passt").is_file()))
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Network::Slirp => f.write_str("slirp"),
            Network::Passt => f.write_str("passt"),
        }
    }
}
