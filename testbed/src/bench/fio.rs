//! Reading fio's `--output-format=json`.
//!
//! fio exits 0 after doing no I/O at all in some misconfigurations (a region outside
//! the device, a connection that failed after setup), so a result without I/O is an
//! error here rather than a row of zeroes. Mixed workloads are read from the
//! `mixed` section that `unified_rw_reporting=both` adds, because percentiles of the
//! reads and of the writes cannot be combined after the fact.

use serde::Serialize;
use serde_json::Value;

use crate::Error;

/// Completion-latency percentiles in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_ns: Option<u64>,
    /// 99th percentile.
    pub p99_ns: Option<u64>,
    /// 99.9th percentile.
    pub p999_ns: Option<u64>,
}

/// One direction (read, write or mixed) of one job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Direction {
    /// Bytes transferred.
    pub io_bytes: u64,
    /// Bandwidth in bytes per second.
    pub bw_bytes: u64,
    /// I/Os per second.
    pub iops: f64,
    /// I/Os completed.
    pub total_ios: u64,
    /// Mean completion latency in ns.
    pub clat_mean_ns: f64,
    /// Completion latency percentiles.
    pub clat: Percentiles,
}

/// One job of a fio run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    /// Job name.
    pub name: String,
    /// fio's error code for the job (0 = none).
    pub error: i64,
    /// Job runtime in ms.
    pub runtime_ms: u64,
    /// Reads.
    pub read: Direction,
    /// Writes.
    pub write: Direction,
    /// Reads and writes together (`unified_rw_reporting=both` or `mixed`).
    pub mixed: Option<Direction>,
}

/// What a benchmark row reports from one job.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// I/Os per second (reads + writes).
    pub iops: f64,
    /// MB/s (10^6 bytes), reads + writes.
    pub mb_s: f64,
    /// Median completion latency, µs.
    pub p50_us: Option<f64>,
    /// 99th percentile completion latency, µs.
    pub p99_us: Option<f64>,
    /// 99.9th percentile completion latency, µs.
    pub p999_us: Option<f64>,
    /// I/Os completed.
    pub ios: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
}

fn u64_of(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(f64_to_u64))
        .unwrap_or(0)
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // checked non-negative; saturates
fn f64_to_u64(f: f64) -> u64 {
    f as u64
}

fn direction(v: &Value) -> Direction {
    let pct = &v["clat_ns"]["percentile"];
    let p = |k: &str| pct.get(k).map(u64_of).filter(|x| *x > 0);
    Direction {
        io_bytes: u64_of(&v["io_bytes"]),
        bw_bytes: u64_of(&v["bw_bytes"]),
        iops: v["iops"].as_f64().unwrap_or(0.0),
        total_ios: u64_of(&v["total_ios"]),
        clat_mean_ns: v["clat_ns"]["mean"].as_f64().unwrap_or(0.0),
        clat: Percentiles {
            p50_ns: p("50.000000"),
            p99_ns: p("99.000000"),
            p999_ns: p("99.900000"),
        },
    }
}

/// Parses fio's JSON output. Text before the first `{` (fio prints notes there) is
/// skipped.
pub fn parse(text: &str) -> Result<Vec<Job>, Error> {
    let start = text
        .find('{')
        .ok_or_else(|| Error::Bench("fio output holds no JSON".into()))?;
    let v: Value = serde_json::from_str(&text[start..])
        .map_err(|e| Error::Bench(format!("fio JSON does not parse: {e}")))?;
    let jobs = v["jobs"]
        .as_array()
        .ok_or_else(|| Error::Bench("fio JSON has no jobs array".into()))?;
    Ok(jobs
        .iter()
        .map(|j| Job {
            name: j["jobname"].as_str().unwrap_or("").to_owned(),
            error: j["error"].as_i64().unwrap_or(0),
            runtime_ms: u64_of(&j["job_runtime"]),
            read: direction(&j["read"]),
            write: direction(&j["write"]),
            mixed: j.get("mixed").map(direction),
        })
        .collect())
}

#[allow(clippy::cast_precision_loss)] // latencies in ns fit f64 exactly enough
fn us(ns: Option<u64>) -> Option<f64> {
    ns.map(|n| n as f64 / 1000.0)
}

impl Job {
    /// The row figures; an error if the job failed or moved no data.
    pub fn summary(&self) -> Result<Summary, Error> {
        if self.error != 0 {
            return Err(Error::Bench(format!(
                "fio job {} failed with error {}",
                self.name, self.error
            )));
        }
        let ios = self.read.total_ios + self.write.total_ios;
        if ios == 0 {
            return Err(Error::Bench(format!(
                "fio job {} completed no I/O (check the URI and the size)",
                self.name
            )));
        }
        // Latency: the mixed section when there is one, else the only direction used.
        let lat = match self.mixed {
            Some(m) if m.total_ios > 0 => m.clat,
            _ if self.write.total_ios == 0 => self.read.clat,
            _ if self.read.total_ios == 0 => self.write.clat,
            // Both directions and no mixed section: the slower side, stated as such in
            // docs/testbed.md.
            _ => Percentiles {
                p50_ns: self.read.clat.p50_ns.max(self.write.clat.p50_ns),
                p99_ns: self.read.clat.p99_ns.max(self.write.clat.p99_ns),
                p999_ns: self.read.clat.p999_ns.max(self.write.clat.p999_ns),
            },
        };
        #[allow(clippy::cast_precision_loss)]
        let mb_s = (self.read.bw_bytes + self.write.bw_bytes) as f64 / 1e6;
        Ok(Summary {
            iops: self.read.iops + self.write.iops,
            mb_s,
            p50_us: us(lat.p50_ns),
            p99_us: us(lat.p99_ns),
            p999_us: us(lat.p999_ns),
            ios,
            read_bytes: self.read.io_bytes,
            write_bytes: self.write.io_bytes,
        })
    }
}
