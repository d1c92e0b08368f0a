//! Shared set-up for the dpuctl tests (dpuctl.rs, dpuctl_net.rs): a daemon running in
//! this process around the engine's test double, and the real dpuctl binary run
//! against its Unix socket. Each test file compiles its own copy (`mod common;`) and
//! uses a part of it, hence `dead_code` is allowed.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use engine::api::testing::{MemoryVolumeService, TestDaemon};
use serde_json::Value;

/// A daemon around the engine's test double, and a runtime for it.
pub struct Env {
    pub rt: tokio::runtime::Runtime,
    pub daemon: Option<TestDaemon>,
    pub dir: tempfile::TempDir,
}

/// What one dpuctl run did.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Stdout, which must be JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

impl Env {
    pub fn start() -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let daemon = rt.block_on(TestDaemon::start(dir.path()))?;
        Ok(Self {
            rt,
            daemon: Some(daemon),
            dir,
        })
    }

    pub fn service(&self) -> Arc<MemoryVolumeService> {
        Arc::clone(&self.daemon.as_ref().expect("daemon running").service)
    }

    pub fn socket(&self) -> &Path {
        self.daemon
            .as_ref()
            .expect("daemon running")
            .handle
            .api_socket()
    }

    /// Runs dpuctl against the daemon with `env` set (and none of the caller's
    /// DPUD_SOCKET, EDITOR, VISUAL).
    pub fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dpuctl"));
        cmd.arg("--socket").arg(self.socket()).args(args);
        cmd.env_remove("DPUD_SOCKET")
            .env_remove("EDITOR")
            .env_remove("VISUAL");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let o = cmd.output().expect("dpuctl runs");
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    pub fn run(&self, args: &[&str]) -> Out {
        self.run_with(args, &[])
    }

    /// Runs and expects success.
    pub fn ok(&self, args: &[&str]) -> Out {
        let o = self.run(args);
        assert_eq!(
            o.code, 0,
            "dpuctl {args:?} failed: {}{}",
            o.stdout, o.stderr
        );
        o
    }

    /// Runs and expects exit code `code` with `needle` in stderr.
    pub fn fails(&self, args: &[&str], code: i32, needle: &str) -> Out {
        let o = self.run(args);
        assert_eq!(
            o.code, code,
            "dpuctl {args:?}: stdout {} stderr {}",
            o.stdout, o.stderr
        );
        assert!(
            o.stderr.contains(needle),
            "dpuctl {args:?}: stderr lacks {needle:?}: {}",
            o.stderr
        );
        o
    }

    /// Adds nodes n1..=n{n}, each in its own rack.
    pub fn add_nodes(&self, n: usize) {
        for i in 1..=n {
            self.ok(&[
                "node",
                "add",
                &format!("n{i}"),
                "--address",
                &format!("127.0.0.1:{}", 4420 + i),
                "--nqn",
                &format!("nqn.2026-11.io.example:n{i}"),
                "--domain",
                &format!("rack{i}"),
            ]);
        }
    }

    /// Stops the daemon and starts a new one on the same configuration (so the same
    /// data directory), around a fresh test double, as a restart of dpud would.
    pub fn restart(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        let d = self.daemon.take().ok_or("daemon")?;
        let config = d.config.clone();
        self.rt.block_on(d.handle.shutdown())?;
        let fresh = Arc::new(MemoryVolumeService::new(&config.cluster.levels));
        self.daemon = Some(self.rt.block_on(TestDaemon::start_with(config, fresh))?);
        Ok(())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            let _ = self.rt.block_on(d.handle.shutdown());
        }
    }
}
