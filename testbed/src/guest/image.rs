//! The base initramfs of the test guest: busybox, the kernel modules the tests need,
//! nvme-cli and fio with their shared libraries, and the init script.
//!
//! Building it takes a few seconds (about 90 MB, most of it fio's libraries), so it is
//! cached under `.work/guest/` with a key over every input (file lists, scripts, and the
//! size and mtime of every file copied in) and rebuilt only when one of them changes,
//! for example after a package upgrade.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use super::cpio::CpioWriter;
use super::GuestError;

/// Bumped when the layout of the image changes in a way the inputs do not show.
const BUILDER_VERSION: u32 = 1;

/// The init script (PID 1 of the guest).
pub const INIT_SCRIPT: &str = include_str!("../../guest/init");
/// Shell helpers sourced before every test script.
pub const TESTLIB_SCRIPT: &str = include_str!("../../guest/testlib.sh");
const MODULES_LIST: &str = include_str!("../../guest/modules.list");
const BINARIES_LIST: &str = include_str!("../../guest/binaries.list");

/// The host NQN nvme-cli uses inside the guest (written to `/etc/nvme/hostnqn`).
pub const GUEST_HOSTNQN: &str =
    "nqn.2014-08.org.nvmexpress:uuid:5f1c0de2-7a0b-4c55-9d1e-0b7e57ed0001";
/// The host ID nvme-cli uses inside the guest.
pub const GUEST_HOSTID: &str = "5f1c0de2-7a0b-4c55-9d1e-0b7e57ed0001";

/// The extracted Debian kernel package: `vmlinuz` and its module tree.
#[derive(Debug, Clone)]
pub struct KernelTree {
    /// The kernel release (`uname -r`).
    pub version: String,
    /// The bootable image.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>` inside the extracted package.
    pub modules_dir: PathBuf,
}

impl KernelTree {
    /// Finds the kernel that `scripts/install-deps.sh` extracted into `dir`.
    pub fn find(dir: &Path) -> Result<Self, GuestError> {
        let boot = dir.join("boot");
        let entries = fs::read_dir(&boot).map_err(|e| GuestError::io(&boot, e))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| GuestError::io(&boot, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(version) = name.strip_prefix("vmlinuz-") else {
                continue;
            };
            for lib in ["lib/modules", "usr/lib/modules"] {
                let modules_dir = dir.join(lib).join(version);
                if modules_dir.join("kernel").is_dir() {
                    found.push(KernelTree {
                        version: version.to_owned(),
                        vmlinuz: entry.path(),
                        modules_dir,
                    });
                    break;
                }
            }
        }
        found.sort_by(|a, b| a.version.cmp(&b.version));
        found.pop().ok_or_else(|| {
            GuestError::Setup(format!(
                "no boot/vmlinuz-* with a matching lib/modules/ tree under {}; \
                 run scripts/install-deps.sh",
                dir.display()
            ))
        })
    }
}

/// What goes into the base image.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Modules loaded at boot, in order (dependencies are added automatically).
    pub modules: Vec<String>,
    /// Modules shipped for test scripts to load with their own parameters.
    pub shipped_modules: Vec<String>,
    /// Host programs copied with their shared libraries.
    pub binaries: Vec<PathBuf>,
}

impl Default for ImageSpec {
    /// The lists in `testbed/guest/modules.list` and `testbed/guest/binaries.list`.
    fn default() -> Self {
        let modules_with = |verb: &str| {
            list_lines(MODULES_LIST)
                .filter_map(|l| l.strip_prefix(verb))
                .filter(|rest| rest.starts_with(char::is_whitespace))
                .map(|rest| rest.trim().to_owned())
                .collect()
        };
        Self {
            modules: modules_with("load"),
            shipped_modules: modules_with("ship"),
            binaries: list_lines(BINARIES_LIST).map(PathBuf::from).collect(),
        }
    }
}

fn list_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// A file to copy from the host into the image.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct HostFile {
    /// Path inside the image.
    dest: String,
    /// Where its bytes come from (symlinks resolved).
    source: PathBuf,
    perm: u32,
}

/// Serializes image builds within this process; across processes the atomic rename
/// makes concurrent builders harmless.
static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// Returns the cached base image for `spec`, building it first if any input changed.
pub fn base_image(
    kernel: &KernelTree,
    work_dir: &Path,
    spec: &ImageSpec,
) -> Result<PathBuf, GuestError> {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    fs::create_dir_all(work_dir).map_err(|e| GuestError::io(work_dir, e))?;

    let modules = module_closure(kernel, &spec.modules, &spec.shipped_modules)?;
    let mut files = Vec::new();
    for (rel, source) in &modules.files {
        files.push(HostFile {
            dest: format!("lib/modules/{}/{rel}", kernel.version),
            source: source.clone(),
            perm: 0o644,
        });
    }
    for binary in &spec.binaries {
        files.extend(binary_closure(binary)?);
    }
    files.sort();
    files.dedup_by(|a, b| a.dest == b.dest);

    let mut key = Fnv::new();
    key.write(&BUILDER_VERSION.to_le_bytes());
    key.write(kernel.version.as_bytes());
    for text in [INIT_SCRIPT, TESTLIB_SCRIPT, GUEST_HOSTNQN] {
        key.write(text.as_bytes());
    }
    for m in &modules.load_order {
        key.write(m.as_bytes());
    }
    for f in &files {
        key.write(f.dest.as_bytes());
        let meta = fs::metadata(&f.source).map_err(|e| GuestError::io(&f.source, e))?;
        key.write(&meta.len().to_le_bytes());
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        key.write(&mtime.to_le_bytes());
        key.write(&f.perm.to_le_bytes());
    }
    let image = work_dir.join(format!("initramfs-{:016x}.cpio", key.finish()));
    if image.is_file() {
        return Ok(image);
    }

    // depmod over a tree holding only the modules we ship writes the modules.dep that
    // busybox modprobe reads in the guest.
    let modroot = work_dir.join(format!("build-{}", std::process::id()));
    let _ = fs::remove_dir_all(&modroot);
    let moddir = modroot.join("lib/modules").join(&kernel.version);
    for (rel, source) in &modules.files {
        let dest = moddir.join(rel);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|e| GuestError::io(parent, e))?;
        }
        fs::copy(source, &dest).map_err(|e| GuestError::io(source, e))?;
    }
    for meta in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        let src = kernel.modules_dir.join(meta);
        if src.is_file() {
            fs::copy(&src, moddir.join(meta)).map_err(|e| GuestError::io(&src, e))?;
        }
    }
    run_tool(
        Command::new("depmod")
            .arg("-b")
            .arg(&modroot)
            .arg(&kernel.version),
    )?;

    let tmp = work_dir.join(format!(".initramfs-{}.tmp", std::process::id()));
    let out = fs::File::create(&tmp).map_err(|e| GuestError::io(&tmp, e))?;
    let mut cpio = CpioWriter::new(BufWriter::with_capacity(1 << 20, out));
    let write_err = |e| GuestError::io(&tmp, e);
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "root",
        "etc/nvme",
    ] {
        cpio.dir(dir).map_err(write_err)?;
    }
    cpio.char_device("dev/console", 5, 1).map_err(write_err)?;
    cpio.char_device("dev/null", 1, 3).map_err(write_err)?;
    cpio.file("init", 0o755, INIT_SCRIPT.as_bytes())
        .map_err(write_err)?;
    cpio.file("etc/guest/testlib.sh", 0o644, TESTLIB_SCRIPT.as_bytes())
        .map_err(write_err)?;
    let load = modules.load_order.join("\n") + "\n";
    cpio.file("etc/guest/modules", 0o644, load.as_bytes())
        .map_err(write_err)?;
    cpio.file(
        "etc/guest/hostnqn",
        0o644,
        format!("{GUEST_HOSTNQN}\n").as_bytes(),
    )
    .map_err(write_err)?;
    cpio.file(
        "etc/guest/hostid",
        0o644,
        format!("{GUEST_HOSTID}\n").as_bytes(),
    )
    .map_err(write_err)?;
    cpio.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .map_err(write_err)?;
    cpio.file("etc/group", 0o644, b"root:x:0:\n")
        .map_err(write_err)?;
    for f in &files {
        if f.dest.starts_with("lib/modules/") {
            continue;
        }
        let data = fs::read(&f.source).map_err(|e| GuestError::io(&f.source, e))?;
        cpio.file(&f.dest, f.perm, &data).map_err(write_err)?;
    }
    add_tree(&mut cpio, &modroot, &modroot)?;
    cpio.finish().map_err(write_err)?;
    let _ = fs::remove_dir_all(&modroot);

    // Drop older images before publishing the new one; each is about 90 MB.
    if let Ok(entries) = fs::read_dir(work_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("initramfs-") && name.ends_with(".cpio") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    fs::rename(&tmp, &image).map_err(|e| GuestError::io(&image, e))?;
    Ok(image)
}

/// Adds every file under `dir` to the archive, at its path relative to `root`.
fn add_tree<W: Write>(cpio: &mut CpioWriter<W>, root: &Path, dir: &Path) -> Result<(), GuestError> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| GuestError::io(dir, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| GuestError::io(dir, e))?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .map_err(|_| {
                GuestError::Setup(format!("{} outside {}", path.display(), root.display()))
            })?
            .to_string_lossy()
            .into_owned();
        if path.is_dir() {
            cpio.dir(&rel).map_err(|e| GuestError::io(&path, e))?;
            add_tree(cpio, root, &path)?;
        } else {
            let data = fs::read(&path).map_err(|e| GuestError::io(&path, e))?;
            cpio.file(&rel, 0o644, &data)
                .map_err(|e| GuestError::io(&path, e))?;
        }
    }
    Ok(())
}

/// The modules to ship: the requested ones and everything they depend on.
#[derive(Debug)]
struct ModuleSet {
    /// Path relative to `lib/modules/<version>` -> file on the host.
    files: BTreeMap<String, PathBuf>,
    /// The requested modules that are not built in, in the requested order.
    load_order: Vec<String>,
}

fn module_closure(
    kernel: &KernelTree,
    load: &[String],
    ship: &[String],
) -> Result<ModuleSet, GuestError> {
    let mut by_name = BTreeMap::new();
    index_modules(&kernel.modules_dir, &kernel.modules_dir, &mut by_name)?;
    let builtin_path = kernel.modules_dir.join("modules.builtin");
    let builtin: BTreeSet<String> = fs::read_to_string(&builtin_path)
        .map_err(|e| GuestError::io(&builtin_path, e))?
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .map(|f| module_name(f.trim_end_matches(".ko")))
        .collect();

    let mut files = BTreeMap::new();
    let mut load_order = Vec::new();
    let mut seen = BTreeSet::new();
    let mut queue: Vec<String> = Vec::new();
    for (m, at_boot) in load
        .iter()
        .map(|m| (m, true))
        .chain(ship.iter().map(|m| (m, false)))
    {
        let name = module_name(m);
        if by_name.contains_key(&name) {
            if at_boot {
                load_order.push(m.clone());
            }
            queue.push(name);
        } else if !builtin.contains(&name) {
            return Err(GuestError::Setup(format!(
                "kernel {} has no module {m} (neither a .ko under {} nor built in)",
                kernel.version,
                kernel.modules_dir.display()
            )));
        }
    }
    while let Some(name) = queue.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let Some((rel, path)) = by_name.get(&name) else {
            continue; // a soft dependency that is built in or absent
        };
        files.insert(rel.clone(), path.clone());
        let depends = run_tool(Command::new("modinfo").args(["-F", "depends"]).arg(path))?;
        let softdep = run_tool(Command::new("modinfo").args(["-F", "softdep"]).arg(path))?;
        for dep in depends.split([',', '\n']).map(str::trim) {
            if !dep.is_empty() {
                queue.push(module_name(dep));
            }
        }
        for dep in softdep.split_whitespace() {
            if !dep.ends_with(':') {
                queue.push(module_name(dep));
            }
        }
    }
    Ok(ModuleSet { files, load_order })
}

fn module_name(name: &str) -> String {
    name.replace('-', "_")
}

fn index_modules(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<String, (String, PathBuf)>,
) -> Result<(), GuestError> {
    for entry in fs::read_dir(dir).map_err(|e| GuestError::io(dir, e))? {
        let entry = entry.map_err(|e| GuestError::io(dir, e))?;
        let path = entry.path();
        let ft = entry.file_type().map_err(|e| GuestError::io(&path, e))?;
        if ft.is_dir() {
            index_modules(root, &path, out)?;
            continue;
        }
        let fname = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = fname.strip_suffix(".ko") {
            let rel = path
                .strip_prefix(root)
                .map_err(|_| {
                    GuestError::Setup(format!("{} outside {}", path.display(), root.display()))
                })?
                .to_string_lossy()
                .into_owned();
            out.insert(module_name(stem), (rel, path));
        }
    }
    Ok(())
}

/// A program and the shared libraries `ldd` lists for it, at the paths the dynamic
/// loader will look for them in the guest.
fn binary_closure(binary: &Path) -> Result<Vec<HostFile>, GuestError> {
    if !binary.is_file() {
        return Err(GuestError::Setup(format!(
            "{} is missing; run scripts/install-deps.sh",
            binary.display()
        )));
    }
    let mut out = vec![HostFile {
        dest: binary.to_string_lossy().into_owned(),
        source: fs::canonicalize(binary).map_err(|e| GuestError::io(binary, e))?,
        perm: 0o755,
    }];
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| GuestError::io(Path::new("ldd"), e))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // Static programs: ldd says "not a dynamic executable" and fails.
        return Ok(out);
    }
    for line in text.lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso lines have no path.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            if line.contains("not found") {
                return Err(GuestError::Setup(format!(
                    "{}: library {} not found",
                    binary.display(),
                    line.trim()
                )));
            }
            continue;
        };
        let path = Path::new(path);
        out.push(HostFile {
            dest: path.to_string_lossy().into_owned(),
            source: fs::canonicalize(path).map_err(|e| GuestError::io(path, e))?,
            perm: 0o755,
        });
    }
    Ok(out)
}

/// Runs a host tool and returns its stdout, or an error with its stderr.
fn run_tool(cmd: &mut Command) -> Result<String, GuestError> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| GuestError::Setup(format!("{shown}: {e}")))?;
    if !out.status.success() {
        return Err(GuestError::Setup(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// FNV-1a, 64 bit: a stable cache key (std's hasher may change between releases).
#[derive(Debug)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Separate fields so that ("ab","c") and ("a","bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_spec_lists_the_nvme_modules_and_tools() {
        let spec = ImageSpec::default();
        for m in ["nvme-tcp", "nvmet-tcp", "virtio_net"] {
            assert!(spec.modules.iter().any(|x| x == m), "{m} missing");
        }
        // brd and null_blk take their sizes as module parameters: loaded by the tests.
        for m in ["brd", "null_blk"] {
            assert!(spec.shipped_modules.iter().any(|x| x == m), "{m} missing");
            assert!(!spec.modules.iter().any(|x| x == m), "{m} loaded at boot");
        }
        assert!(spec.binaries.contains(&PathBuf::from("/bin/busybox")));
        assert!(spec.binaries.contains(&PathBuf::from("/usr/bin/fio")));
    }

    #[test]
    fn fnv_separates_fields() {
        let mut a = Fnv::new();
        a.write(b"ab");
        a.write(b"c");
        let mut b = Fnv::new();
        b.write(b"a");
        b.write(b"bc");
        assert_ne!(a.finish(), b.finish());
    }
}
