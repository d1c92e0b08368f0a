//! `testbed bench`: fio over NBD against our exports and a floor, in the same run.
//!
//! Absolute figures on these shared 2-core machines drift with whatever else runs, so
//! every row of ours is quoted as a ratio to a floor measured minutes apart at most:
//! the same fio job files through the same fio `nbd` engine against `nbdkit memory`,
//! which does nothing but copy bytes. The targets are interleaved job by job (floor,
//! then each of ours, then the next job), so a burst of load hits both sides alike.
//!
//! Around each fio run the bench reads /proc of the process under test: CPU seconds
//! (utime + stime) divided by the I/Os fio completed, and the resident set after the
//! job; and of the storage nodes: `write_bytes` of /proc/PID/io, the bytes each
//! `nvmeof-target` sent to its backing file. (The target's own counters are per NVMe
//! controller, in its SMART log, so a second connection cannot read dpud's totals.)

pub mod fio;
pub mod report;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::procs::ProcId;
use crate::Error;

/// The order jobs run and are reported in; other job files follow, sorted by name.
pub const JOB_ORDER: &[&str] = &[
    "randread-4k",
    "randwrite-4k",
    "randrw70-4k",
    "seqread-128k",
    "seqwrite-128k",
];

/// One fio job file and the queue depths it runs at (its `# testbed-qd:` line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFile {
    /// Name (file stem).
    pub name: String,
    /// Path.
    pub path: PathBuf,
    /// Queue depths.
    pub qds: Vec<u32>,
}

/// Reads the job files of `dir` (every `*.fio` except `prefill.fio`).
pub fn job_files(dir: &Path) -> Result<Vec<JobFile>, Error> {
    let rd = std::fs::read_dir(dir).map_err(Error::io(format!("reading {}", dir.display())))?;
    let mut out = Vec::new();
    for e in rd {
        let p = e
            .map_err(Error::io(format!("reading {}", dir.display())))?
            .path();
        let Some(name) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".fio"))
        else {
            continue;
        };
        if name == "prefill" {
            continue;
        }
        let text =
            std::fs::read_to_string(&p).map_err(Error::io(format!("reading {}", p.display())))?;
        let qds = parse_qds(&text).map_err(|e| Error::Bench(format!("{}: {e}", p.display())))?;
        out.push(JobFile {
            name: name.to_owned(),
            path: p,
            qds,
        });
    }
    out.sort_by_key(|j| {
        (
            JOB_ORDER
                .iter()
                .position(|n| *n == j.name)
                .unwrap_or(usize::MAX),
            j.name.clone(),
        )
    });
    if out.is_empty() {
        return Err(Error::Bench(format!(
            "no *.fio job files in {}",
            dir.display()
        )));
    }
    Ok(out)
}

/// The `# testbed-qd: 1 32` line of a job file.
pub fn parse_qds(text: &str) -> Result<Vec<u32>, String> {
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("# testbed-qd:"))
        .ok_or("no `# testbed-qd:` line")?;
    let qds: Vec<u32> = line
        .split_whitespace()
        .map(|w| {
            w.parse::<u32>()
                .map_err(|e| format!("bad queue depth {w:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if qds.is_empty() || qds.contains(&0) {
        return Err("queue depths must be at least 1".into());
    }
    Ok(qds)
}

/// Something fio drives.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// Row label (`floor`, a profile name, or `--label`).
    pub label: String,
    /// NBD URI.
    pub uri: String,
    /// Whether this is the floor.
    pub floor: bool,
    /// The process whose CPU and memory are charged to this target.
    pub process: Option<ProcId>,
    /// Storage node processes whose written bytes count for this target.
    pub nodes: Vec<ProcId>,
}

/// Options of `testbed bench`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Job files directory.
    pub jobs_dir: PathBuf,
    /// Only these jobs (empty: all).
    pub only: Vec<String>,
    /// Seconds per job.
    pub runtime_s: u32,
    /// Bytes of the region fio works on (also the floor's size).
    pub size: u64,
    /// Where fio's raw JSON goes.
    pub raw_dir: PathBuf,
    /// Skip the prefill.
    pub no_prefill: bool,
    /// Runs of each job and queue depth per target (the table shows medians).
    pub repeat: u32,
}

/// One measured row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Target label.
    pub target: String,
    /// Whether the target is the floor.
    pub floor: bool,
    /// Job name.
    pub job: String,
    /// Queue depth.
    pub qd: u32,
    /// Which run of this job, target and queue depth (0-based).
    pub rep: u32,
    /// fio's figures.
    pub fio: fio::Summary,
    /// CPU seconds of the target's process during the job.
    pub cpu_s: Option<f64>,
    /// Those per I/O, in µs.
    pub cpu_us_per_io: Option<f64>,
    /// Resident set after the job, bytes.
    pub rss_bytes: Option<u64>,
    /// Bytes the nodes wrote to their backing files during the job.
    pub node_write_bytes: Option<u64>,
    /// Those per byte the host wrote.
    pub node_bytes_per_host_byte: Option<f64>,
    /// The raw fio output.
    pub raw: PathBuf,
}

fn node_bytes(nodes: &[ProcId]) -> Option<u64> {
    if nodes.is_empty() {
        return None;
    }
    nodes.iter().map(ProcId::io_write_bytes).sum()
}

/// Runs one job file at one queue depth against one target.
pub fn run_one(t: &Target, job: &JobFile, qd: u32, rep: u32, opts: &Options) -> Result<Row, Error> {
    let raw = opts.raw_dir.join(format!(
        "{}-{}-qd{qd}-{rep}.json",
        sanitize(&t.label),
        job.name
    ));
    let cpu0 = t.process.and_then(|p| p.cpu_seconds());
    let nb0 = node_bytes(&t.nodes);
    run_fio(&job.path, &t.uri, opts.size, qd, opts.runtime_s, &raw)?;
    let cpu1 = t.process.and_then(|p| p.cpu_seconds());
    let nb1 = node_bytes(&t.nodes);
    let text =
        std::fs::read_to_string(&raw).map_err(Error::io(format!("reading {}", raw.display())))?;
    let jobs = fio::parse(&text)?;
    let j = jobs
        .first()
        .ok_or_else(|| Error::Bench(format!("{}: fio reported no job", raw.display())))?;
    let s = j.summary()?;
    let cpu_s = cpu0.zip(cpu1).map(|(a, b)| b - a);
    #[allow(clippy::cast_precision_loss)]
    let per_io = |v: f64| v * 1e6 / s.ios as f64;
    let node_write_bytes = nb0.zip(nb1).map(|(a, b)| b.saturating_sub(a));
    #[allow(clippy::cast_precision_loss)]
    let node_bytes_per_host_byte = node_write_bytes
        .filter(|_| s.write_bytes > 0)
        .map(|b| b as f64 / s.write_bytes as f64);
    Ok(Row {
        target: t.label.clone(),
        floor: t.floor,
        job: job.name.clone(),
        qd,
        rep,
        fio: s,
        cpu_s,
        cpu_us_per_io: cpu_s.map(per_io),
        rss_bytes: t.process.and_then(|p| p.rss_bytes()),
        node_write_bytes,
        node_bytes_per_host_byte,
        raw,
    })
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Runs fio on a job file with the testbed's variables set; fio's JSON goes to `out`.
pub fn run_fio(
    job: &Path,
    uri: &str,
    size: u64,
    qd: u32,
    runtime_s: u32,
    out: &Path,
) -> Result<(), Error> {
    let o = Command::new("fio")
        .arg("--output-format=json")
        .arg(format!("--output={}", out.display()))
        .arg(job)
        .env("TESTBED_NBD_URI", uri)
        .env("TESTBED_SIZE", size.to_string())
        .env("TESTBED_QD", qd.to_string())
        .env("TESTBED_RUNTIME", runtime_s.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Bench(format!("running fio (apt install fio): {e}")))?;
    if !o.status.success() {
        return Err(Error::Bench(format!(
            "fio {} against {uri} failed ({}): {}{}",
            job.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim(),
            String::from_utf8_lossy(&o.stdout).trim()
        )));
    }
    Ok(())
}

/// The floor: `nbdkit memory` on loopback TCP or a Unix socket, stopped on drop.
#[derive(Debug)]
pub struct Floor {
    child: Child,
    /// Its NBD URI.
    pub uri: String,
    /// Its process.
    pub process: ProcId,
}

/// How the floor is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// 127.0.0.1, a free port.
    Tcp,
    /// A Unix socket in the work directory.
    Unix,
}

impl Transport {
    /// The transport of an NBD URI.
    pub fn of_uri(uri: &str) -> Transport {
        if uri.starts_with("nbd+unix:") || uri.starts_with("nbds+unix:") {
            Transport::Unix
        } else {
            Transport::Tcp
        }
    }
}

fn free_port() -> Result<u16, Error> {
    let l = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .map_err(Error::io("finding a free port"))?;
    Ok(l.local_addr()
        .map_err(Error::io("finding a free port"))?
        .port())
}

impl Floor {
    /// Starts `nbdkit memory SIZE` and waits until it accepts.
    pub fn start(dir: &Path, size: u64, transport: Transport) -> Result<Floor, Error> {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let pidfile = dir.join("nbdkit.pid");
        let _ = std::fs::remove_file(&pidfile);
        let log = std::fs::File::create(dir.join("nbdkit.log"))
            .map_err(Error::io("creating nbdkit.log"))?;
        let mut cmd = Command::new("nbdkit");
        cmd.arg("--foreground")
            .arg("--exit-with-parent")
            .arg("--pidfile")
            .arg(&pidfile);
        let uri = match transport {
            Transport::Tcp => {
                let port = free_port()?;
                cmd.args(["--ipaddr", "127.0.0.1", "--port", &port.to_string()]);
                format!("nbd://127.0.0.1:{port}/")
            }
            Transport::Unix => {
                let sock = dir.join("nbdkit.sock");
                let _ = std::fs::remove_file(&sock);
                cmd.arg("--unix").arg(&sock);
                format!("nbd+unix:///?socket={}", sock.display())
            }
        };
        cmd.arg("memory")
            .arg(size.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::Bench(format!("starting nbdkit (apt install nbdkit): {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pidfile.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(Error::Bench(format!(
                    "nbdkit exited at start ({st}): {}",
                    crate::procs::log_tail(&dir.join("nbdkit.log"), 1000)
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Bench("nbdkit did not start within 10 s".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let process = ProcId::of(child.id())?;
        Ok(Floor {
            child,
            uri,
            process,
        })
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the whole matrix: prefill every target, then for each job and queue depth
/// `repeat` rounds of every target in turn, the order reversed every other round so
/// that neither side always runs first. `progress` is told each row as it completes.
pub fn run(
    targets: &[Target],
    opts: &Options,
    mut progress: impl FnMut(&Row),
) -> Result<Vec<Row>, Error> {
    std::fs::create_dir_all(&opts.raw_dir)
        .map_err(Error::io(format!("creating {}", opts.raw_dir.display())))?;
    let mut jobs = job_files(&opts.jobs_dir)?;
    if !opts.only.is_empty() {
        for o in &opts.only {
            if !jobs.iter().any(|j| &j.name == o) {
                return Err(Error::Usage(format!(
                    "no job {o:?} in {} (jobs: {})",
                    opts.jobs_dir.display(),
                    jobs.iter()
                        .map(|j| j.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        jobs.retain(|j| opts.only.contains(&j.name));
    }
    if !opts.no_prefill {
        let prefill = opts.jobs_dir.join("prefill.fio");
        for t in targets {
            let raw = opts
                .raw_dir
                .join(format!("{}-prefill.json", sanitize(&t.label)));
            run_fio(&prefill, &t.uri, opts.size, 8, opts.runtime_s, &raw)?;
        }
    }
    let mut rows = Vec::new();
    for j in &jobs {
        for &qd in &j.qds {
            for rep in 0..opts.repeat.max(1) {
                let order: Vec<&Target> = if rep % 2 == 0 {
                    targets.iter().collect()
                } else {
                    targets.iter().rev().collect()
                };
                for t in order {
                    let r = run_one(t, j, qd, rep, opts)?;
                    progress(&r);
                    rows.push(r);
                }
            }
        }
    }
    Ok(rows)
}

/// Each row's ratios to the floor row of the same job, queue depth and round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ratios {
    /// IOPS / floor IOPS (median over rounds).
    pub iops: f64,
    /// Smallest IOPS ratio of a round.
    pub iops_min: f64,
    /// Largest IOPS ratio of a round.
    pub iops_max: f64,
    /// MB/s / floor MB/s (median).
    pub mb_s: f64,
    /// p50 / floor p50 (median).
    pub p50: Option<f64>,
    /// p99 / floor p99 (median).
    pub p99: Option<f64>,
    /// p99.9 / floor p99.9 (median).
    pub p999: Option<f64>,
}

/// The median of some values (mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Ratios of every non-floor (target, job, qd): each round is divided by the floor's
/// run of the same round (run next to it in time), then the median is taken.
pub fn ratios(rows: &[Row]) -> BTreeMap<(String, String, u32), Ratios> {
    let floor: BTreeMap<(&str, u32, u32), &Row> = rows
        .iter()
        .filter(|r| r.floor)
        .map(|r| ((r.job.as_str(), r.qd, r.rep), r))
        .collect();
    let div = |a: Option<f64>, b: Option<f64>| {
        a.zip(b)
            .filter(|(_, b)| *b > 0.0)
            .map(|(a, b)| a / b)
            .unwrap_or(f64::NAN)
    };
    let mut per: BTreeMap<(String, String, u32), Vec<[f64; 5]>> = BTreeMap::new();
    for r in rows.iter().filter(|r| !r.floor) {
        let Some(f) = floor.get(&(r.job.as_str(), r.qd, r.rep)) else {
            continue;
        };
        per.entry((r.target.clone(), r.job.clone(), r.qd))
            .or_default()
            .push([
                r.fio.iops / f.fio.iops,
                r.fio.mb_s / f.fio.mb_s,
                div(r.fio.p50_us, f.fio.p50_us),
                div(r.fio.p99_us, f.fio.p99_us),
                div(r.fio.p999_us, f.fio.p999_us),
            ]);
    }
    per.into_iter()
        .filter_map(|(k, v)| {
            let col = |i: usize| median(v.iter().map(|x| x[i]).collect());
            let iops: Vec<f64> = v.iter().map(|x| x[0]).collect();
            Some((
                k,
                Ratios {
                    iops: col(0)?,
                    iops_min: iops.iter().copied().fold(f64::INFINITY, f64::min),
                    iops_max: iops.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    mb_s: col(1)?,
                    p50: col(2),
                    p99: col(3),
                    p999: col(4),
                },
            ))
        })
        .collect()
}

/// One row per (target, job, qd): the median of each figure over the rounds (the
/// largest RSS), in the order the rows first appear.
pub fn aggregate(rows: &[Row]) -> Vec<Row> {
    let mut keys: Vec<(String, String, u32)> = Vec::new();
    for r in rows {
        let k = (r.target.clone(), r.job.clone(), r.qd);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .filter_map(|(t, j, qd)| {
            let rs: Vec<&Row> = rows
                .iter()
                .filter(|r| r.target == t && r.job == j && r.qd == qd)
                .collect();
            let first = *rs.first()?;
            let m =
                |f: &dyn Fn(&Row) -> Option<f64>| median(rs.iter().filter_map(|r| f(r)).collect());
            let mut out = first.clone();
            out.fio.iops = m(&|r| Some(r.fio.iops))?;
            out.fio.mb_s = m(&|r| Some(r.fio.mb_s))?;
            out.fio.p50_us = m(&|r| r.fio.p50_us);
            out.fio.p99_us = m(&|r| r.fio.p99_us);
            out.fio.p999_us = m(&|r| r.fio.p999_us);
            out.cpu_s = m(&|r| r.cpu_s);
            out.cpu_us_per_io = m(&|r| r.cpu_us_per_io);
            out.node_bytes_per_host_byte = m(&|r| r.node_bytes_per_host_byte);
            out.rss_bytes = rs.iter().filter_map(|r| r.rss_bytes).max();
            out.rep = u32::try_from(rs.len()).unwrap_or(u32::MAX);
            Some(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(target: &str, floor: bool, rep: u32, iops: f64, p99: f64) -> Row {
        Row {
            target: target.into(),
            floor,
            job: "j".into(),
            qd: 1,
            rep,
            fio: fio::Summary {
                iops,
                mb_s: iops / 100.0,
                p50_us: Some(1.0),
                p99_us: Some(p99),
                p999_us: None,
                ios: 10,
                read_bytes: 0,
                write_bytes: 0,
            },
            cpu_s: None,
            cpu_us_per_io: None,
            rss_bytes: Some(u64::from(rep)),
            node_write_bytes: None,
            node_bytes_per_host_byte: None,
            raw: PathBuf::new(),
        }
    }

    #[test]
    fn ratios_pair_rounds_and_take_the_median() {
        // Round 1 is slow for both sides: paired ratios stay 0.5 every round.
        let rows = vec![
            row("floor", true, 0, 100.0, 10.0),
            row("ours", false, 0, 50.0, 20.0),
            row("ours", false, 1, 10.0, 200.0),
            row("floor", true, 1, 20.0, 100.0),
            row("floor", true, 2, 100.0, 10.0),
            row("ours", false, 2, 60.0, 30.0),
        ];
        let r = ratios(&rows);
        let x = r[&("ours".to_string(), "j".to_string(), 1)];
        assert_eq!(x.iops, 0.5);
        assert_eq!((x.iops_min, x.iops_max), (0.5, 0.6));
        assert_eq!(x.p99, Some(2.0));
        assert_eq!(x.p999, None);
        let agg = aggregate(&rows);
        assert_eq!(agg.len(), 2);
        assert_eq!(agg[0].target, "floor");
        assert_eq!(agg[0].fio.iops, 100.0);
        assert_eq!(agg[1].fio.iops, 50.0);
        assert_eq!(agg[1].fio.p99_us, Some(30.0));
        assert_eq!(agg[1].rss_bytes, Some(2));
        assert_eq!(agg[1].rep, 3);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN]), None);
        assert_eq!(median(vec![]), None);
    }
}
