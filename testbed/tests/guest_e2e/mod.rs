//! What the guest end-to-end tests share: building the workspace's binaries, a
//! testbed with dpud, and reading results back from the guest.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use testbed::guest::{self, GuestRun};

pub use crate::workspace_bins::build_bin;

/// A testbed in a temporary directory, torn down (with its files) on drop.
pub struct Bed {
    pub dir: tempfile::TempDir,
    pub dpud: PathBuf,
    pub dpuctl: PathBuf,
    pub target: PathBuf,
}

impl Bed {
    /// A new testbed directory named after `prefix`, with the workspace's binaries
    /// (built here when stale).
    pub fn new(prefix: &str) -> Self {
        Bed {
            dir: tempfile::Builder::new().prefix(prefix).tempdir().unwrap(),
            dpud: build_bin("engine", "dpud"),
            dpuctl: build_bin("cli", "dpuctl"),
            target: build_bin("nvmeof", "nvmeof-target"),
        }
    }

    pub fn workdir(&self) -> &Path {
        self.dir.path()
    }

    pub fn testbed(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_testbed"))
            .arg("--workdir")
            .arg(self.workdir())
            .args(args)
            .env("TESTBED_DPUD", &self.dpud)
            .env("TESTBED_DPUCTL", &self.dpuctl)
            .env("TESTBED_NVMEOF_TARGET", &self.target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "testbed {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn dpuctl(&self, args: &[&str]) -> String {
        let out = Command::new(&self.dpuctl)
            .arg("--socket")
            .arg(self.workdir().join("daemon/api.sock"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dpuctl {args:?} failed:\n{}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.dpud_log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn dpud_log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.workdir().join("daemon/dpud.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(25)..].join("\n");
        format!("--- dpud.log (tail) ---\n{tail}")
    }

    pub fn nbd_uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.workdir().join("daemon/nbd.sock").display()
        )
    }

    /// Runs a qemu-io or qemu-img command; its stdout.
    pub fn qemu(&self, tool: &str, args: &[&str]) -> String {
        let out = Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e} (scripts/install-deps.sh installs it)"));
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.dpud_log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_testbed"))
            .arg("--workdir")
            .arg(self.workdir())
            .args(["down", "--purge"])
            .output();
    }
}

pub fn ok<T>(r: Result<T, guest::GuestError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

pub fn json(run: &GuestRun, section: &str) -> Value {
    let text = ok(run.output(section));
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("{section}: no JSON in output:\n{text}\n{}", run.report()));
    serde_json::from_str(&text[start..])
        .unwrap_or_else(|e| panic!("{section}: bad JSON ({e}):\n{text}\n{}", run.report()))
}

pub fn num(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no numeric {key} in {v}"))
}

/// (bytes written, bytes read, runtime in ms) of the single job of a fio step.
pub fn fio_job(run: &GuestRun, section: &str) -> (u64, u64, u64) {
    let v = json(run, section);
    let job = v
        .get("jobs")
        .and_then(|j| j.get(0))
        .unwrap_or_else(|| panic!("{section}: no jobs in fio output: {v}"));
    assert_eq!(num(job, "error"), 0, "{section}: fio job error: {job}");
    let bytes = |dir: &str| num(job.get(dir).unwrap(), "io_bytes");
    (bytes("write"), bytes("read"), num(job, "job_runtime"))
}

pub fn sysfs(run: &GuestRun, name: &str) -> u64 {
    let text = ok(run.output(name));
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{name}: not a number: {text:?}"))
}

/// The sha256 a guest step printed (`dd ... | sha256sum`).
pub fn guest_sha(run: &GuestRun, name: &str) -> String {
    ok(run.output(name))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}
