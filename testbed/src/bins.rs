//! Finding the workspace's own binaries (`nvmeof-target`, `nvmeof-perf`, ...) from a
//! test: cargo only exposes a package's own binaries to its integration tests, so the
//! tests of this crate look for them next to the test executable, where
//! `cargo build --workspace --bins` (run by `scripts/test`) puts them.

use std::path::PathBuf;

/// Where a workspace binary was expected and why it is not usable.
#[derive(Debug, thiserror::Error)]
#[error("binary {name} not found (looked in {searched}); run `cargo build --workspace --bins` with the same profile and CARGO_TARGET_DIR first, or set TESTBED_BIN_DIR")]
pub struct BinaryNotFound {
    /// The binary's name.
    pub name: String,
    /// The directories searched.
    pub searched: String,
}

/// The path of workspace binary `name`: `$TESTBED_BIN_DIR/name`, else the profile
/// directory of the running test (`target/debug/deps/x` -> `target/debug/name`).
pub fn workspace_binary(name: &str) -> Result<PathBuf, BinaryNotFound> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("TESTBED_BIN_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(deps) = exe.parent() {
            if deps.file_name().is_some_and(|n| n == "deps") {
                if let Some(profile) = deps.parent() {
                    dirs.push(profile.to_owned());
                }
            } else {
                dirs.push(deps.to_owned());
            }
        }
    }
    for dir in &dirs {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    Err(BinaryNotFound {
        name: name.to_owned(),
        searched: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}
