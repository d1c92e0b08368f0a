//! `nvmeof-perf`: drives an NVMe/TCP subsystem with a fixed-depth workload, in
//! the manner of `spdk_nvme_perf`, and reports IOPS, bandwidth and latency
//! percentiles (exact, from every sample).
//!
//! Each I/O queue gets `--queue-depth` workers, each with one command in
//! flight at all times, so the queue stays exactly that deep.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use nvmeof::host::{Controller, HostConfig};
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    Randread,
    Randwrite,
    Read,
    Write,
    Randrw,
}

#[derive(Debug, Parser)]
#[command(about = "NVMe/TCP load generator (IOPS, bandwidth, latency percentiles)")]
struct Args {
    /// Controller address, ADDR:PORT.
    #[arg(long)]
    target: SocketAddr,
    /// Subsystem NQN.
    #[arg(long)]
    subsystem: String,
    /// Host NQN (default: a random uuid-based NQN).
    #[arg(long)]
    host_nqn: Option<String>,
    /// Namespace id.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    /// I/O pattern.
    #[arg(long, value_enum)]
    workload: Workload,
    /// Percentage of reads for randrw.
    #[arg(long, default_value_t = 70)]
    rwmix_read: u8,
    /// Bytes per I/O (a multiple of the namespace block size).
    #[arg(long, default_value_t = 4096)]
    block_size: u32,
    /// Commands in flight per queue.
    #[arg(long, default_value_t = 32)]
    queue_depth: u16,
    /// I/O queues (one TCP connection each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Run time, e.g. 10s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Enable the NVMe/TCP header digest.
    #[arg(long)]
    header_digest: bool,
    /// Enable the NVMe/TCP data digest.
    #[arg(long)]
    data_digest: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1u64)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        (s, 1000)
    };
    let v: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 10s, 500ms, 2m)"))?;
    let ms = v
        .checked_mul(mult_ms)
        .ok_or_else(|| format!("duration {s:?} too long"))?;
    if ms == 0 {
        return Err("duration must be positive".into());
    }
    Ok(Duration::from_millis(ms))
}

/// Counts and nanoseconds as floating point for reporting (exact below 2^53).
#[allow(clippy::cast_precision_loss)]
fn float(v: u64) -> f64 {
    v as f64
}

fn us(ns: u64) -> f64 {
    float(ns) / 1000.0
}

struct WorkerResult {
    reads: u64,
    writes: u64,
    errors: u64,
    first_error: Option<String>,
    lat_ns: Vec<u64>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.queue_depth == 0 || args.queues == 0 {
        bail!("--queue-depth and --queues must be at least 1");
    }
    if args.rwmix_read > 100 {
        bail!("--rwmix-read is a percentage (0..=100)");
    }
    let mut hc = HostConfig::new(args.target, args.subsystem.clone());
    if let Some(h) = &args.host_nqn {
        hc.hostnqn = h.clone();
    }
    hc.io_queues = args.queues;
    // NVMe needs at least two queue entries; a depth of 1 is one worker on a
    // two-entry queue.
    hc.queue_depth = args.queue_depth.max(2);
    hc.header_digest = args.header_digest;
    hc.data_digest = args.data_digest;
    hc.max_transfer = args.block_size.max(4096);
    let ctrl = Controller::connect(hc)
        .await
        .with_context(|| format!("connecting to {} ({})", args.target, args.subsystem))?;
    let ns = ctrl.namespace(args.nsid).await.context("namespace")?;
    if args.block_size == 0 || args.block_size % ns.block_size != 0 {
        bail!(
            "--block-size {} is not a multiple of the {}-byte LBA size",
            args.block_size,
            ns.block_size
        );
    }
    let max = ctrl.max_transfer().await?;
    if args.block_size > max {
        bail!(
            "--block-size {} exceeds the controller's transfer limit of {max} bytes",
            args.block_size
        );
    }
    let per_io = args.block_size / ns.block_size;
    let slots = ns.blocks / u64::from(per_io);
    if slots == 0 {
        bail!("namespace of {} blocks is smaller than one I/O", ns.blocks);
    }
    let queues = ctrl.io_queue_count().await?;
    let mut pattern = vec![0u8; usize::try_from(args.block_size)?];
    rand::thread_rng().fill(&mut pattern[..]);
    let pattern = Bytes::from(pattern);
    let seq = Arc::new(AtomicU64::new(0));

    let start = Instant::now();
    let deadline = start + args.duration;
    let mut tasks = Vec::new();
    for q in 0..queues {
        for d in 0..args.queue_depth {
            let ctrl = ctrl.clone();
            let pattern = pattern.clone();
            let seq = Arc::clone(&seq);
            let workload = args.workload;
            let mix = args.rwmix_read;
            let nsid = args.nsid;
            let seed = u64::try_from(q)? << 16 | u64::from(d);
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5EED_0F1E_5500);
                let mut r = WorkerResult {
                    reads: 0,
                    writes: 0,
                    errors: 0,
                    first_error: None,
                    lat_ns: Vec::new(),
                };
                while Instant::now() < deadline {
                    let slot = match workload {
                        Workload::Read | Workload::Write => {
                            seq.fetch_add(1, Ordering::Relaxed) % slots
                        }
                        _ => rng.gen_range(0..slots),
                    };
                    let lba = slot * u64::from(per_io);
                    let is_read = match workload {
                        Workload::Read | Workload::Randread => true,
                        Workload::Write | Workload::Randwrite => false,
                        Workload::Randrw => rng.gen_range(0..100u8) < mix,
                    };
                    let t = Instant::now();
                    let res = if is_read {
                        ctrl.read(q, nsid, lba, per_io).await.map(|_| ())
                    } else {
                        ctrl.write(q, nsid, lba, pattern.clone(), false).await
                    };
                    let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    match res {
                        Ok(()) => {
                            r.lat_ns.push(ns);
                            if is_read {
                                r.reads += 1;
                            } else {
                                r.writes += 1;
                            }
                        }
                        Err(e) => {
                            r.errors += 1;
                            if r.first_error.is_none() {
                                r.first_error = Some(e.to_string());
                            }
                        }
                    }
                }
                r
            }));
        }
    }
    let mut lat = Vec::new();
    let (mut reads, mut writes, mut errors, mut first_error) = (0u64, 0u64, 0u64, None);
    for t in tasks {
        let r = t.await?;
        reads += r.reads;
        writes += r.writes;
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
        lat.extend(r.lat_ns);
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let ios = reads + writes;
    // Nearest-rank percentiles over every sample, p in tenths of a percent.
    let pct = |p_permille: u64| -> f64 {
        let n = u64::try_from(lat.len()).unwrap_or(u64::MAX);
        if n == 0 {
            return 0.0;
        }
        let rank = (u128::from(n) * u128::from(p_permille))
            .div_ceil(1000)
            .max(1);
        let idx = usize::try_from(rank).unwrap_or(usize::MAX).min(lat.len()) - 1;
        us(lat[idx])
    };
    let count = u64::try_from(lat.len()).unwrap_or(u64::MAX);
    let mean_us = lat.iter().sum::<u64>().checked_div(count).map_or(0.0, us);
    let max_us = lat.last().map_or(0.0, |&x| us(x));
    let iops = float(ios) / elapsed;
    let mbps = iops * f64::from(args.block_size) / 1e6;
    let workload = format!("{:?}", args.workload).to_lowercase();
    if args.json {
        let v = serde_json::json!({
            "target": args.target.to_string(),
            "subsystem": args.subsystem,
            "nsid": args.nsid,
            "workload": workload,
            "rwmix_read": args.rwmix_read,
            "block_size": args.block_size,
            "queue_depth": args.queue_depth,
            "queues": queues,
            "header_digest": args.header_digest,
            "data_digest": args.data_digest,
            "duration_s": elapsed,
            "ios": ios,
            "reads": reads,
            "writes": writes,
            "errors": errors,
            "iops": iops,
            "mbps": mbps,
            "mib_per_s": iops * f64::from(args.block_size) / 1048576.0,
            "latency_us": {
                "mean": mean_us,
                "p50": pct(500),
                "p99": pct(990),
                "p99_9": pct(999),
                "max": max_us,
            },
            "p50_us": pct(500),
            "p99_us": pct(990),
            "p99_9_us": pct(999),
        });
        println!("{v}");
    } else {
        println!(
            "nvmeof-perf {} {} nsid {}: {workload} bs={} qd={} queues={} digests(h/d)={}/{} {:.1}s",
            args.target,
            args.subsystem,
            args.nsid,
            args.block_size,
            args.queue_depth,
            queues,
            args.header_digest,
            args.data_digest,
            elapsed
        );
        println!(
            "  IOPS {iops:.0}  MB/s {mbps:.1}  ({reads} reads, {writes} writes, {errors} errors)"
        );
        println!(
            "  latency us: mean {mean_us:.1}  p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {max_us:.1}",
            pct(500),
            pct(990),
            pct(999)
        );
    }
    if errors > 0 {
        bail!(
            "{errors} I/O errors, first: {}",
            first_error.unwrap_or_default()
        );
    }
    Ok(())
}
