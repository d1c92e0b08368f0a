//! Starting QEMU, following its serial console, and turning what the guest printed into
//! results and diagnostics.
//!
//! The console is read by a thread into memory and a log file as it arrives, so that a
//! test can wait for a marker while the guest is still running (to talk to a target in
//! the guest, say) and so that nothing is lost when QEMU is killed at the time limit.

use std::fs;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cpio::CpioWriter;
use super::{GuestConfig, GuestEnv, GuestError, Network, GUEST_ADDR, HOST_ADDR_FROM_GUEST};

/// Printed by init when the machine is ready to run the test script.
const READY_MARKER: &str = "@@GUEST-READY@@";
/// Printed by init after the test script, with its exit status.
const EXIT_MARKER: &str = "@@GUEST-EXIT rc=";
/// Printed by init when a module or the network could not be set up.
const INIT_FAILED_MARKER: &str = "@@GUEST-INIT-FAILED@@";

static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, Default)]
struct ConsoleState {
    text: String,
    /// QEMU closed its stdout (it exited or was killed).
    eof: bool,
    /// When the ready marker was seen, counted from QEMU's start.
    ready_after: Option<Duration>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<ConsoleState>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ConsoleState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A guest that is running; dropping it kills QEMU.
#[derive(Debug)]
pub struct RunningGuest {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    passt: Option<Child>,
    passt_socket: Option<PathBuf>,
    shared: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    log_path: PathBuf,
    initrd: PathBuf,
    command: String,
}

/// Everything a finished guest printed.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// The run's name.
    pub name: String,
    /// The whole serial console, carriage returns removed.
    pub console: String,
    /// Where the console was saved.
    pub log_path: PathBuf,
    /// The QEMU command line.
    pub command: String,
    /// Exit status of the test script, if the guest got that far.
    pub test_rc: Option<i32>,
    /// From QEMU's start to the guest's ready marker (boot time seen by the host).
    pub boot_time: Option<Duration>,
    /// From QEMU's start to its exit.
    pub total_time: Duration,
}

/// One `section` of the test script: a command, its output and its status.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    /// The name the script gave it.
    pub name: String,
    /// The command as the script ran it.
    pub command: String,
    /// Its combined stdout and stderr.
    pub output: String,
    /// Its exit status (`None` if the guest stopped before it ended).
    pub rc: Option<i32>,
    /// How long it ran, by the guest's clock.
    pub secs: Option<f64>,
}

pub(super) fn start(env: &GuestEnv, config: GuestConfig) -> Result<RunningGuest, GuestError> {
    let base = env.base_image()?;
    let seq = RUN_COUNTER.fetch_add(1, Ordering::Relaxed);
    let safe_name: String = config
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let runs = env.work_dir.join("runs");
    prune_runs(&runs, 100);
    let run_dir = runs.join(format!("{safe_name}-{}-{seq}", std::process::id()));
    let _ = fs::remove_dir_all(&run_dir);
    fs::create_dir_all(&run_dir).map_err(|e| GuestError::io(&run_dir, e))?;

    // The per-run archive goes after the base one; the kernel unpacks both.
    let initrd = run_dir.join("initrd.cpio");
    fs::copy(&base, &initrd).map_err(|e| GuestError::io(&base, e))?;
    {
        let file = fs::OpenOptions::new()
            .append(true)
            .open(&initrd)
            .map_err(|e| GuestError::io(&initrd, e))?;
        let mut cpio = CpioWriter::new(BufWriter::new(file));
        let err = |e| GuestError::io(&initrd, e);
        cpio.file("test.sh", 0o755, config.script.as_bytes())
            .map_err(err)?;
        for f in &config.files {
            cpio.file(&f.path, f.perm, &f.data).map_err(err)?;
        }
        cpio.finish().map_err(err)?;
    }

    let mut kernel_args = vec![
        "console=ttyS0".to_owned(),
        "quiet".to_owned(),
        "panic=-1".to_owned(),
        "mitigations=off".to_owned(),
        "8250.nr_uarts=1".to_owned(),
        // Under TCG the crypto self-tests and the LSMs cost 1.5-3 s of every boot.
        "cryptomgr.notests".to_owned(),
        "audit=0".to_owned(),
        "lsm=capability".to_owned(),
    ];
    let mut passt = None;
    let mut passt_socket = None;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg,thread=multi", "-cpu", "max"])
        .args(["-smp", &config.cpus.to_string()])
        .args(["-m", &format!("{}M", config.memory_mib)])
        .args(["-nodefaults", "-no-user-config", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"]);
    if config.qboot && Path::new("/usr/share/qemu/qboot.rom").is_file() {
        qemu.args(["-bios", "qboot.rom"]);
    }
    qemu.arg("-kernel")
        .arg(&env.kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initrd);
    match config.network {
        Network::Slirp => {
            let mut netdev =
                format!("user,id=n0,net=10.0.2.0/24,host={HOST_ADDR_FROM_GUEST},ipv6=off");
            for f in &config.forwards {
                netdev.push_str(&format!(
                    ",hostfwd=tcp:127.0.0.1:{}-{GUEST_ADDR}:{}",
                    f.host_port, f.guest_port
                ));
            }
            qemu.args(["-netdev", &netdev]);
        }
        Network::Passt => {
            // passt drops root for "nobody" before it binds, so the socket goes to the
            // world-writable temporary directory (also short enough for sun_path).
            let socket = std::env::temp_dir()
                .join(format!("testbed-passt-{}-{seq}.sock", std::process::id()));
            let _ = fs::remove_file(&socket);
            let mut cmd = Command::new("passt");
            cmd.args(["-f", "-q", "-4"])
                .arg("--socket")
                .arg(&socket)
                .args(["-a", GUEST_ADDR, "-n", "24", "-g", HOST_ADDR_FROM_GUEST])
                .args(["--mtu", "65520"]);
            if config.forwards.is_empty() {
                cmd.args(["-t", "none"]);
            }
            for f in &config.forwards {
                cmd.args(["-t", &format!("127.0.0.1/{}:{}", f.host_port, f.guest_port)]);
            }
            cmd.args(["-u", "none"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(
                    fs::File::create(run_dir.join("passt.log"))
                        .map_err(|e| GuestError::io(&run_dir, e))?,
                );
            let child = cmd
                .spawn()
                .map_err(|e| GuestError::Setup(format!("starting passt: {e}")))?;
            passt = Some(child);
            passt_socket = Some(socket.clone());
            let waited = Instant::now();
            while !socket.exists() {
                if waited.elapsed() > Duration::from_secs(10) {
                    if let Some(mut p) = passt.take() {
                        let _ = p.kill();
                        let _ = p.wait();
                    }
                    let log = fs::read_to_string(run_dir.join("passt.log")).unwrap_or_default();
                    return Err(GuestError::Setup(format!(
                        "passt did not create {} within 10 s: {log}",
                        socket.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            qemu.arg("-netdev").arg(format!(
                "stream,id=n0,server=off,addr.type=unix,addr.path={}",
                socket.display()
            ));
            kernel_args.push("guest.mtu=65520".to_owned());
        }
    }
    qemu.args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
    qemu.args(&config.qemu_args);
    kernel_args.extend(config.kernel_args.iter().cloned());
    qemu.arg("-append").arg(kernel_args.join(" "));
    qemu.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let command = format!("{qemu:?}");

    let log_path = run_dir.join("console.log");
    let log = fs::File::create(&log_path).map_err(|e| GuestError::io(&log_path, e))?;
    let mut child = match qemu.spawn() {
        Ok(child) => child,
        Err(e) => {
            if let Some(mut p) = passt {
                let _ = p.kill();
                let _ = p.wait();
            }
            return Err(GuestError::Setup(format!("starting {command}: {e}")));
        }
    };
    let started = Instant::now();
    let shared = Arc::new(Shared {
        state: Mutex::new(ConsoleState::default()),
        changed: Condvar::new(),
    });
    let log = Arc::new(Mutex::new(log));
    let mut readers = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        readers.push(spawn_reader(
            stdout,
            "",
            Arc::clone(&shared),
            Arc::clone(&log),
            started,
        ));
    }
    if let Some(stderr) = child.stderr.take() {
        readers.push(spawn_reader(
            stderr,
            "qemu stderr: ",
            Arc::clone(&shared),
            log,
            started,
        ));
    }
    let stdin = child.stdin.take();
    Ok(RunningGuest {
        name: config.name,
        child,
        stdin,
        passt,
        passt_socket,
        shared,
        readers,
        started,
        deadline: started + config.timeout,
        timeout: config.timeout,
        log_path,
        initrd,
        command,
    })
}

/// Keeps the `keep` newest run directories (console logs) and deletes the rest.
fn prune_runs(runs: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(runs) else {
        return;
    };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if dirs.len() <= keep {
        return;
    }
    dirs.sort();
    let excess = dirs.len() - keep;
    for (_, dir) in dirs.into_iter().take(excess) {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Copies one of QEMU's output streams into the shared console and the log file.
fn spawn_reader<R: Read + Send + 'static>(
    mut stream: R,
    prefix: &'static str,
    shared: Arc<Shared>,
    log: Arc<Mutex<fs::File>>,
    started: Instant,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let mut at_line_start = true;
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut chunk = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
            if !prefix.is_empty() {
                let mut prefixed = String::new();
                for c in chunk.chars() {
                    if at_line_start {
                        prefixed.push_str(prefix);
                    }
                    prefixed.push(c);
                    at_line_start = c == '\n';
                }
                chunk = prefixed;
            }
            if let Ok(mut f) = log.lock() {
                let _ = f.write_all(chunk.as_bytes());
            }
            let mut state = shared.lock();
            state.text.push_str(&chunk);
            if state.ready_after.is_none() && state.text.contains(READY_MARKER) {
                state.ready_after = Some(started.elapsed());
            }
            drop(state);
            shared.changed.notify_all();
        }
        if prefix.is_empty() {
            shared.lock().eof = true;
            shared.changed.notify_all();
        }
    })
}

impl RunningGuest {
    /// Waits until the console shows `needle` and returns the line that holds it. Fails
    /// if the guest stops, the run's hard limit passes or `timeout` passes first.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String, GuestError> {
        let until = (Instant::now() + timeout).min(self.deadline);
        let mut state = self.shared.lock();
        loop {
            if let Some(pos) = state.text.find(needle) {
                let start = state.text[..pos].rfind('\n').map_or(0, |i| i + 1);
                let end = state.text[pos..]
                    .find('\n')
                    .map_or(state.text.len(), |i| pos + i);
                return Ok(state.text[start..end].to_owned());
            }
            let now = Instant::now();
            let why = if state.eof {
                Some("the guest stopped")
            } else if state.text.contains(EXIT_MARKER) {
                Some("the test script ended")
            } else if state.text.contains(INIT_FAILED_MARKER) {
                Some("the guest's init failed")
            } else if now >= until {
                Some("timed out")
            } else {
                None
            };
            if let Some(why) = why {
                let text = state.text.clone();
                drop(state);
                return Err(self.failed(format!("waiting for {needle:?}: {why}"), &text));
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits for the script's `wait_host TAG` and returns once the guest is blocked
    /// reading the host's answer.
    pub fn wait_for_prompt(&self, tag: &str, timeout: Duration) -> Result<(), GuestError> {
        self.wait_for(&format!("@@WAIT {tag}@@"), timeout).map(drop)
    }

    /// Writes one line to the guest's console (read by `wait_host`).
    pub fn send_line(&mut self, line: &str) -> Result<(), GuestError> {
        let name = self.name.clone();
        let stdin = self.stdin.as_mut().ok_or_else(|| GuestError::Failed {
            name,
            what: "console input already closed".to_owned(),
            report: String::new(),
        })?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| GuestError::io(Path::new("qemu stdin"), e))
    }

    /// The console so far.
    pub fn console(&self) -> String {
        self.shared.lock().text.clone()
    }

    /// Diagnostics for a failure on the host side while the guest runs: the commands,
    /// the log file and the console tail.
    pub fn report(&self) -> String {
        let text = self.console();
        report(&self.command, &self.log_path, &text)
    }

    /// Waits for QEMU to exit (the script ended and init powered off), killing it at
    /// the hard limit. The returned run may still hold a failed script: see
    /// [`GuestRun::check`].
    pub fn finish(mut self) -> Result<GuestRun, GuestError> {
        self.stdin = None;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) => {}
                Err(e) => return Err(GuestError::io(Path::new("qemu"), e)),
            }
            if Instant::now() >= self.deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.join_readers();
                let text = self.console();
                return Err(self.failed(
                    format!("killed after the hard limit of {:?}", self.timeout),
                    &text,
                ));
            }
            let state = self.shared.lock();
            if !state.eof {
                let _ = self
                    .shared
                    .changed
                    .wait_timeout(state, Duration::from_millis(100));
            } else {
                drop(state);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let total_time = self.started.elapsed();
        self.join_readers();
        let state = self.shared.lock();
        let console = state.text.clone();
        let boot_time = state.ready_after;
        drop(state);
        let test_rc = console.lines().rev().find_map(|l| {
            let rest = l.strip_prefix(EXIT_MARKER)?;
            rest.split(|c: char| !c.is_ascii_digit() && c != '-')
                .next()?
                .parse()
                .ok()
        });
        Ok(GuestRun {
            name: self.name.clone(),
            console,
            log_path: self.log_path.clone(),
            command: self.command.clone(),
            test_rc,
            boot_time,
            total_time,
        })
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    fn failed(&self, what: String, text: &str) -> GuestError {
        GuestError::Failed {
            name: self.name.clone(),
            what,
            report: report(&self.command, &self.log_path, text),
        }
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(mut p) = self.passt.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        self.join_readers();
        // The log stays for inspection; the 90 MB initrd copy does not.
        let _ = fs::remove_file(&self.initrd);
        if let Some(socket) = &self.passt_socket {
            let _ = fs::remove_file(socket);
        }
    }
}

impl GuestRun {
    /// Succeeds if init ran the script and the script exited with status 0.
    pub fn check(&self) -> Result<(), GuestError> {
        match self.test_rc {
            Some(0) => Ok(()),
            Some(rc) => Err(self.failed(format!("test script exited with status {rc}"))),
            None if self.console.contains(INIT_FAILED_MARKER) => {
                Err(self.failed("the guest's init failed".to_owned()))
            }
            None => Err(self.failed("the guest stopped before the test script ended".to_owned())),
        }
    }

    /// All sections the script printed, in order.
    pub fn sections(&self) -> Vec<Section> {
        parse_sections(&self.console)
    }

    /// The last section called `name`, or an error with the diagnostics.
    pub fn section(&self, name: &str) -> Result<Section, GuestError> {
        self.sections()
            .into_iter()
            .rev()
            .find(|s| s.name == name)
            .ok_or_else(|| self.failed(format!("no section {name:?} in the console")))
    }

    /// The output of section `name`, which must have exited with status 0.
    pub fn output(&self, name: &str) -> Result<String, GuestError> {
        let s = self.section(name)?;
        if s.rc == Some(0) {
            Ok(s.output)
        } else {
            Err(self.failed(format!(
                "step {name} ({}) exited with {:?}",
                s.command, s.rc
            )))
        }
    }

    /// One line of timings: host-side boot and total, and each step by the guest's clock.
    pub fn timings(&self) -> String {
        let steps: Vec<String> = self
            .sections()
            .iter()
            .filter(|s| s.name != "dmesg")
            .map(|s| match s.secs {
                Some(t) => format!("{} {t:.1}s", s.name),
                None => s.name.clone(),
            })
            .collect();
        format!(
            "guest {}: boot {:.1}s, total {:.1}s; {}",
            self.name,
            self.boot_time.map_or(f64::NAN, |d| d.as_secs_f64()),
            self.total_time.as_secs_f64(),
            steps.join(", ")
        )
    }

    /// Diagnostics: failed steps, `fail` messages, the console and dmesg tails.
    pub fn report(&self) -> String {
        report(&self.command, &self.log_path, &self.console)
    }

    /// An error about this run carrying its diagnostics.
    pub fn failed(&self, what: String) -> GuestError {
        GuestError::Failed {
            name: self.name.clone(),
            what,
            report: self.report(),
        }
    }
}

/// Splits the console into `@@BEGIN name@@ cmd` ... `@@END name rc=N@@` sections.
pub fn parse_sections(console: &str) -> Vec<Section> {
    let mut out = Vec::new();
    let mut open: Option<Section> = None;
    for line in console.lines() {
        if let Some(rest) = line.strip_prefix("@@BEGIN ") {
            if let Some(s) = open.take() {
                out.push(s);
            }
            let (name, command) = rest.split_once("@@").unwrap_or((rest, ""));
            open = Some(Section {
                name: name.to_owned(),
                command: command.trim().to_owned(),
                output: String::new(),
                rc: None,
                secs: None,
            });
        } else if let Some(rest) = line.strip_prefix("@@END ") {
            let Some(mut s) = open.take() else { continue };
            let rest = rest.trim_end_matches("@@");
            if let Some((name, fields)) = rest.split_once(" rc=") {
                if name == s.name {
                    let mut words = fields.split_whitespace();
                    s.rc = words.next().and_then(|rc| rc.parse().ok());
                    s.secs = words
                        .find_map(|w| w.strip_prefix("secs="))
                        .and_then(|t| t.parse().ok());
                }
            }
            out.push(s);
        } else if let Some(s) = open.as_mut() {
            s.output.push_str(line);
            s.output.push('\n');
        }
    }
    if let Some(s) = open {
        out.push(s);
    }
    out
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn report(command: &str, log_path: &Path, console: &str) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "qemu: {command}\nconsole log: {}\n",
        log_path.display()
    ));
    let sections = parse_sections(console);
    let steps: Vec<String> = sections
        .iter()
        .filter(|s| s.name != "dmesg")
        .map(|s| match (s.rc, s.secs) {
            (Some(rc), Some(t)) => format!("{} rc={rc} {t:.2}s", s.name),
            (Some(rc), None) => format!("{} rc={rc}", s.name),
            (None, _) => format!("{} unfinished", s.name),
        })
        .collect();
    out.push_str(&format!("steps: {}\n", steps.join(", ")));
    for s in sections
        .iter()
        .filter(|s| s.rc != Some(0) && s.name != "dmesg")
    {
        out.push_str(&format!(
            "--- failed step {} (rc {:?}): {}\n{}\n",
            s.name,
            s.rc,
            s.command,
            tail(&s.output, 40)
        ));
    }
    for line in console
        .lines()
        .filter(|l| l.starts_with("@@FAIL@@") || l.starts_with(INIT_FAILED_MARKER))
    {
        out.push_str(line);
        out.push('\n');
    }
    let (before, dmesg) = match console.find("@@BEGIN dmesg@@") {
        Some(i) => (&console[..i], Some(&console[i..])),
        None => (console, None),
    };
    out.push_str(&format!("--- console tail ---\n{}\n", tail(before, 60)));
    if let Some(d) = dmesg {
        out.push_str(&format!("--- dmesg tail ---\n{}\n", tail(d, 30)));
    }
    // The log file may not outlive a CI machine: the whole console goes last.
    out.push_str(&format!(
        "--- whole console ({}) ---\n{console}\n--- end of console ---\n",
        log_path.display()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_parsed_with_commands_and_status() {
        let console = "boot noise\n@@BEGIN id@@ nvme id-ctrl /dev/nvme0\n{\"sn\":\"x\"}\n\
                       @@END id rc=0 secs=0.25@@\n@@BEGIN io@@ fio a\nerr\n@@END io rc=1@@\n\
                       @@BEGIN cut@@ x\npartial\n";
        let s = parse_sections(console);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "id");
        assert_eq!(s[0].command, "nvme id-ctrl /dev/nvme0");
        assert_eq!(s[0].output, "{\"sn\":\"x\"}\n");
        assert_eq!(s[0].rc, Some(0));
        assert_eq!(s[0].secs, Some(0.25));
        assert_eq!(s[1].secs, None);
        assert_eq!(s[1].rc, Some(1));
        assert_eq!(s[2].rc, None);
        assert_eq!(s[2].output, "partial\n");
    }

    #[test]
    fn report_shows_failed_steps_and_tails() {
        let console = "@@BEGIN a@@ true\n@@END a rc=0@@\n@@BEGIN b@@ false\nboom\n\
                       @@END b rc=1@@\n@@FAIL@@ step b failed\n@@BEGIN dmesg@@ dmesg\nk\n";
        let r = report("qemu-system-x86_64", Path::new("/x/console.log"), console);
        assert!(r.contains("failed step b (rc Some(1)): false\nboom"), "{r}");
        assert!(!r.contains("failed step a"), "{r}");
        assert!(r.contains("@@FAIL@@ step b failed"), "{r}");
        assert!(
            r.contains("--- dmesg tail ---\n@@BEGIN dmesg@@ dmesg\nk"),
            "{r}"
        );
    }
}
