//! Processes the testbed started and later has to find again from another invocation.
//!
//! A pid alone is not an identity: the testbed exits between `up`, `fault` and `down`,
//! and by the time it comes back the kernel may have given the pid to something else.
//! Every process is therefore recorded as (pid, start time in clock ticks since boot),
//! and a signal is only sent when both still match. Started processes are not our
//! children once `up` has exited, and this machine's init may not reap orphans, so a
//! zombie counts as dead.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::Error;

/// One process as the testbed recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    /// Process id.
    pub pid: u32,
    /// Field 22 of /proc/PID/stat: start time in clock ticks after boot.
    pub start_ticks: u64,
}

/// What /proc says about a recorded process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Running or sleeping.
    Running,
    /// Stopped by a signal (SIGSTOP) or traced.
    Stopped,
    /// Gone, a zombie, or the pid now belongs to another process.
    Dead,
}

impl std::fmt::Display for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Liveness::Running => "running",
            Liveness::Stopped => "stopped",
            Liveness::Dead => "dead",
        })
    }
}

/// The fields of /proc/PID/stat the testbed uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// State letter (R, S, D, T, t, Z, X, ...).
    pub state: char,
    /// User CPU time in clock ticks.
    pub utime: u64,
    /// System CPU time in clock ticks.
    pub stime: u64,
    /// Start time in clock ticks after boot.
    pub start_ticks: u64,
}

/// Parses the text of /proc/PID/stat. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); field N is f[N - 3].
    Some(Stat {
        state: f.first()?.chars().next()?,
        utime: f.get(11)?.parse().ok()?,
        stime: f.get(12)?.parse().ok()?,
        start_ticks: f.get(19)?.parse().ok()?,
    })
}

/// Reads /proc/PID/stat; `None` when the process does not exist.
pub fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

impl ProcId {
    /// Identifies a live process by pid (reads its start time now).
    pub fn of(pid: u32) -> Result<ProcId, Error> {
        let s = stat(pid).ok_or_else(|| Error::Process(format!("no process {pid}")))?;
        Ok(ProcId {
            pid,
            start_ticks: s.start_ticks,
        })
    }

    /// The process's stat if it is still the one recorded.
    pub fn stat(&self) -> Option<Stat> {
        stat(self.pid).filter(|s| s.start_ticks == self.start_ticks)
    }

    /// Running, stopped or dead.
    pub fn liveness(&self) -> Liveness {
        match self.stat().map(|s| s.state) {
            None | Some('Z' | 'X' | 'x') => Liveness::Dead,
            Some('T' | 't') => Liveness::Stopped,
            Some(_) => Liveness::Running,
        }
    }

    /// Sends `sig` if the process is still the one recorded and not dead.
    pub fn signal(&self, sig: libc::c_int) -> Result<(), Error> {
        if self.liveness() == Liveness::Dead {
            return Err(Error::Process(format!(
                "process {} is not running",
                self.pid
            )));
        }
        let pid = libc::pid_t::try_from(self.pid)
            .map_err(|_| Error::Process(format!("pid {} out of range", self.pid)))?;
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        let rc = unsafe { libc::kill(pid, sig) };
        if rc != 0 {
            return Err(Error::Process(format!(
                "kill({}, {sig}): {}",
                self.pid,
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Waits until the process is dead or `timeout` passes; true if it died.
    pub fn wait_dead(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.liveness() == Liveness::Dead {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (with SIGCONT, so a stopped process can act on it), wait up to
    /// `grace`, then SIGKILL. Returns how it ended.
    pub fn terminate(&self, grace: Duration) -> Result<Ended, Error> {
        if self.liveness() == Liveness::Dead {
            return Ok(Ended::AlreadyDead);
        }
        self.signal(libc::SIGTERM)?;
        // A stopped process only sees SIGTERM once it runs again.
        let _ = self.signal(libc::SIGCONT);
        if self.wait_dead(grace) {
            return Ok(Ended::Terminated);
        }
        let _ = self.signal(libc::SIGKILL);
        if self.wait_dead(Duration::from_secs(5)) {
            Ok(Ended::Killed)
        } else {
            Err(Error::Process(format!(
                "process {} survived SIGKILL",
                self.pid
            )))
        }
    }

    /// CPU seconds (user + system) used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let s = self.stat()?;
        Some(ticks_to_seconds(s.utime.checked_add(s.stime)?))
    }

    /// Resident set size in bytes (VmRSS).
    pub fn rss_bytes(&self) -> Option<u64> {
        self.stat()?;
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status_kib(&text, "VmRSS:").and_then(|k| k.checked_mul(1024))
    }

    /// Bytes this process caused to be written to storage (`write_bytes` of
    /// /proc/PID/io, summed over its threads including exited ones).
    pub fn io_write_bytes(&self) -> Option<u64> {
        self.stat()?;
        let text = std::fs::read_to_string(format!("/proc/{}/io", self.pid)).ok()?;
        io_field(&text, "write_bytes:")
    }
}

/// How [`ProcId::terminate`] ended a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It was not running.
    AlreadyDead,
    /// It exited after SIGTERM.
    Terminated,
    /// It needed SIGKILL.
    Killed,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ended::AlreadyDead => "was not running",
            Ended::Terminated => "stopped (SIGTERM)",
            Ended::Killed => "killed (SIGKILL after the grace period)",
        })
    }
}

/// A `Key:   123 kB` line of /proc/PID/status, in KiB.
pub fn status_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A `key: 123` line of /proc/PID/io.
pub fn io_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

/// Clock ticks per second (sysconf(_SC_CLK_TCK), 100 on Linux).
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf takes an integer name and reads no memory of ours.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// Converts clock ticks to seconds.
#[allow(clippy::cast_precision_loss)] // tick counts stay far below 2^52
pub fn ticks_to_seconds(ticks: u64) -> f64 {
    ticks as f64 / clock_ticks() as f64
}

/// The last `max` bytes of a log file, for error messages.
pub fn log_tail(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let start = b.len().saturating_sub(max);
            String::from_utf8_lossy(&b[start..]).into_owned()
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_awkward_command_name() {
        let text = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    17 5 0 0 20 0 3 0 98765 1000000 200 18446744073709551615";
        let s = parse_stat(text).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.utime, 17);
        assert_eq!(s.stime, 5);
        assert_eq!(s.start_ticks, 98765);
        assert!(parse_stat("garbage").is_none());
        assert!(parse_stat("1 (x) S 1").is_none());
    }

    #[test]
    fn own_process() {
        let me = ProcId::of(std::process::id()).unwrap();
        assert_eq!(me.liveness(), Liveness::Running);
        assert!(me.cpu_seconds().unwrap() >= 0.0);
        assert!(me.rss_bytes().unwrap() > 0);
        let other = ProcId {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        assert_eq!(other.liveness(), Liveness::Dead, "a reused pid is not ours");
    }

    #[test]
    fn proc_fields() {
        assert_eq!(
            status_kib("Name:\tx\nVmRSS:\t  2048 kB\n", "VmRSS:"),
            Some(2048)
        );
        assert_eq!(
            io_field("rchar: 5\nwrite_bytes: 4096\n", "write_bytes:"),
            Some(4096)
        );
        assert_eq!(io_field("rchar: 5\n", "write_bytes:"), None);
    }
}
