//! Finding the workspace's binaries from an integration test: the sibling of the test
//! executable when it is newer than every source it is built from, else built here
//! (a plain `cargo test -p testbed` does not build other packages' binaries). Shared by
//! the testbed's end-to-end tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// One binary of a workspace package. `cargo test --workspace` has just built every
/// package's binaries next to the test executables (each of those packages has
/// integration tests), so one is taken from there when no source of the workspace's
/// library crates is newer than it; otherwise (e.g. `cargo test -p testbed` after an
/// edit) it is built here.
pub fn build_bin(package: &str, bin: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent().map(|d| d.join(bin)));
    if let Some(s) = sibling.filter(|s| fresh(s, &root)) {
        return s;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "-p",
            package,
            "--bin",
            bin,
            "--message-format=json",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo build");
    assert!(
        out.status.success(),
        "building {bin}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["executable"].as_str().map(PathBuf::from))
        .find(|p| p.file_name().is_some_and(|n| n == bin))
        .unwrap_or_else(|| panic!("cargo reported no {bin} executable"))
}

/// Whether `bin` exists and is newer than every source file of nvmeof, placement,
/// engine and cli, and than Cargo.lock.
pub fn fresh(bin: &Path, root: &Path) -> bool {
    fn newest(p: &Path) -> Option<std::time::SystemTime> {
        let m = std::fs::metadata(p).ok()?;
        if !m.is_dir() {
            return m.modified().ok();
        }
        std::fs::read_dir(p)
            .ok()?
            .filter_map(|e| newest(&e.ok()?.path()))
            .max()
    }
    let Some(built) = std::fs::metadata(bin).ok().and_then(|m| m.modified().ok()) else {
        return false;
    };
    let mut inputs = vec![root.join("Cargo.lock")];
    for c in ["nvmeof", "placement", "engine", "cli"] {
        inputs.push(root.join(c).join("src"));
        inputs.push(root.join(c).join("Cargo.toml"));
        inputs.push(root.join(c).join("proto"));
        inputs.push(root.join(c).join("build.rs"));
    }
    inputs.iter().filter_map(|p| newest(p)).all(|t| t <= built)
}
