//! The bench report: a Markdown table spliced between marker comments of a document,
//! a JSON file with every figure, and PNG plots.
//!
//! Plots are drawn by gnuplot (`gnuplot-nox`, pngcairo terminal) rather than a Rust
//! plotting crate: it is one Debian package the install script already knows how to
//! get, it finds the system's DejaVu fonts by itself (plotters would need a font file
//! shipped in the repository to draw text without system fonts), and it adds nothing
//! to the workspace's compile time on these 2-core machines. Without gnuplot the
//! table and JSON are still written and the bench says why there are no plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::{aggregate, ratios, Ratios, Row};
use crate::Error;

/// Marker comments delimiting the bench section of `docs/benchmarks.md`.
pub const BEGIN: &str = "<!-- testbed-bench:begin -->";
/// End marker.
pub const END: &str = "<!-- testbed-bench:end -->";

/// Where and how a run happened.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// UTC start time (RFC 3339).
    pub started: String,
    /// The command line.
    pub command: String,
    /// `uname -r`.
    pub kernel: String,
    /// Online CPUs.
    pub cpus: usize,
    /// /proc/loadavg at the start.
    pub loadavg: String,
    /// fio --version.
    pub fio: String,
    /// Seconds per job.
    pub runtime_s: u32,
    /// Rounds per job, queue depth and target.
    pub repeat: u32,
    /// Region size in bytes.
    pub size: u64,
    /// What the node-bytes column counts.
    pub node_bytes_source: String,
}

/// The JSON result file.
#[derive(Debug, Clone, Serialize)]
pub struct Results<'a> {
    /// Run information.
    pub run: &'a RunInfo,
    /// Every row.
    pub rows: &'a [Row],
    /// Ratios to the floor, one per non-floor row.
    pub ratios: Vec<RatioRow>,
}

/// A ratio with its key, for JSON.
#[derive(Debug, Clone, Serialize)]
pub struct RatioRow {
    /// Target label.
    pub target: String,
    /// Job.
    pub job: String,
    /// Queue depth.
    pub qd: u32,
    /// Ratios.
    pub ratios: Ratios,
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn cmd_out(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

impl RunInfo {
    /// Collects the machine facts now.
    pub fn collect(
        command: String,
        runtime_s: u32,
        repeat: u32,
        size: u64,
        node_bytes_source: String,
    ) -> RunInfo {
        RunInfo {
            started: utc_now(),
            command,
            kernel: cmd_out("uname", &["-r"]),
            cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            loadavg: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
            fio: cmd_out("fio", &["--version"]),
            runtime_s,
            repeat,
            size,
            node_bytes_source,
        }
    }
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.prec$}"))
}

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.2}x"))
}

/// Thousands separators for IOPS.
fn thousands(v: f64) -> String {
    let s = format!("{v:.0}");
    let (neg, digits) = s
        .strip_prefix('-')
        .map_or((false, s.as_str()), |d| (true, d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if neg {
        format!("-{out}")
    } else {
        out
    }
}

/// The Markdown section (without markers).
pub fn markdown(
    run: &RunInfo,
    rows: &[Row],
    plots: &[(String, String)],
    plot_note: &str,
) -> String {
    let r = ratios(rows);
    let agg = aggregate(rows);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Measured {} on {} CPUs ({}), fio {} with its `nbd` engine, {} s per job, \
         {} round(s) per job and target, {} MiB region, produced by:\n\n```sh\n{}\n```\n",
        run.started,
        run.cpus,
        run.kernel,
        run.fio,
        run.runtime_s,
        run.repeat,
        run.size >> 20,
        run.command
    );
    let _ = writeln!(
        s,
        "Load average at the start: {}. `floor` is `nbdkit memory` driven by the same job \
         files in the same run, each round of ours next to a round of the floor; figures are \
         medians over the rounds, and `x floor` is the median of the per-round ratios \
         (for IOPS with the smallest and largest in brackets). CPU is utime+stime of the process serving the target during the \
         job, per I/O fio completed. Node bytes: {}. Method: [testbed.md](testbed.md#bench).\n",
        run.loadavg, run.node_bytes_source
    );
    s.push_str(
        "| target | job | QD | IOPS | x floor | MB/s | p50 µs | p99 µs | x floor | p99.9 µs | \
         CPU µs/IO | RSS MiB | node B / host B |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for row in &agg {
        let k = (row.target.clone(), row.job.clone(), row.qd);
        let rt = r.get(&k);
        #[allow(clippy::cast_precision_loss)]
        let rss = row.rss_bytes.map(|b| b as f64 / f64::from(1u32 << 20));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            row.target,
            row.job,
            row.qd,
            thousands(row.fio.iops),
            if row.floor {
                "1".into()
            } else {
                rt.map_or_else(
                    || "-".into(),
                    |x| format!("{:.2}x ({:.2}-{:.2})", x.iops, x.iops_min, x.iops_max),
                )
            },
            row.fio.mb_s,
            opt(row.fio.p50_us, 1),
            opt(row.fio.p99_us, 1),
            if row.floor {
                "1".into()
            } else {
                ratio(rt.and_then(|x| x.p99))
            },
            opt(row.fio.p999_us, 1),
            opt(row.cpu_us_per_io, 2),
            opt(rss, 1),
            opt(row.node_bytes_per_host_byte, 2),
        );
    }
    s.push('\n');
    if plots.is_empty() {
        let _ = writeln!(s, "No plots: {plot_note}");
    } else {
        for (title, path) in plots {
            let _ = writeln!(s, "![{title}]({path})");
        }
    }
    s
}

/// Replaces what lies between the markers in `doc` (appending a section with markers
/// if there are none). Nothing outside the markers changes.
pub fn splice(doc: &str, section: &str) -> Result<String, Error> {
    match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if b < e => {
            let head = &doc[..b + BEGIN.len()];
            let tail = &doc[e..];
            Ok(format!("{head}\n{}\n{tail}", section.trim_end()))
        }
        (None, None) => {
            let mut out = doc.trim_end().to_owned();
            let _ = write!(
                out,
                "\n\n## fio over NBD (testbed bench)\n\n{BEGIN}\n{}\n{END}\n",
                section.trim_end()
            );
            Ok(out)
        }
        _ => Err(Error::Bench(format!(
            "the document has a broken {BEGIN} ... {END} pair; fix it by hand"
        ))),
    }
}

/// Writes the section into `doc_path` between the markers.
pub fn write_doc(doc_path: &Path, section: &str) -> Result<(), Error> {
    let doc = match std::fs::read_to_string(doc_path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(format!("reading {}", doc_path.display()))(e)),
    };
    let new = splice(&doc, section)?;
    std::fs::write(doc_path, new).map_err(Error::io(format!("writing {}", doc_path.display())))
}

/// Writes the JSON results.
pub fn write_json(path: &Path, run: &RunInfo, rows: &[Row]) -> Result<(), Error> {
    let ratios = ratios(rows)
        .into_iter()
        .map(|((target, job, qd), ratios)| RatioRow {
            target,
            job,
            qd,
            ratios,
        })
        .collect();
    let text = serde_json::to_string_pretty(&Results { run, rows, ratios })
        .map_err(|e| Error::Bench(format!("encoding results: {e}")))?;
    std::fs::write(path, text + "\n").map_err(Error::io(format!("writing {}", path.display())))
}

/// A plotted metric: file stem, title, y label, value of a row.
type Metric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Row) -> Option<f64>,
);

/// Draws `testbed-iops.png` and `testbed-p99.png` into `dir`: one cluster of bars per
/// job and queue depth, one bar per target. Returns (title, file) pairs.
pub fn plots(dir: &Path, rows: &[Row]) -> Result<Vec<(String, PathBuf)>, Error> {
    let mut targets: Vec<&str> = Vec::new();
    let mut keys: Vec<(String, u32)> = Vec::new();
    let agg = aggregate(rows);
    let mut by: BTreeMap<(&str, &str, u32), &Row> = BTreeMap::new();
    for r in &agg {
        if !targets.contains(&r.target.as_str()) {
            targets.push(&r.target);
        }
        if !keys.contains(&(r.job.clone(), r.qd)) {
            keys.push((r.job.clone(), r.qd));
        }
        by.insert((&r.target, &r.job, r.qd), r);
    }
    let mut out = Vec::new();
    let metrics: [Metric; 2] = [
        ("iops", "IOPS", "IOPS (higher is better)", |r| {
            Some(r.fio.iops)
        }),
        (
            "p99",
            "p99 completion latency",
            "p99 latency, µs (lower is better)",
            |r| r.fio.p99_us,
        ),
    ];
    for (file, title, ylabel, get) in metrics {
        let dat = dir.join(format!("testbed-{file}.dat"));
        let mut text = String::from("job");
        for t in &targets {
            let _ = write!(text, "\t\"{t}\"");
        }
        text.push('\n');
        for (job, qd) in &keys {
            let _ = write!(text, "\"{job} QD{qd}\"");
            for t in &targets {
                let v = by.get(&(*t, job.as_str(), *qd)).and_then(|r| get(r));
                let _ = write!(
                    text,
                    "\t{}",
                    v.map_or_else(|| "NaN".into(), |v| format!("{v:.3}"))
                );
            }
            text.push('\n');
        }
        std::fs::write(&dat, text).map_err(Error::io(format!("writing {}", dat.display())))?;
        let png = dir.join(format!("testbed-{file}.png"));
        let script = format!(
            "set terminal pngcairo size 1100,480 font 'DejaVu Sans,10'\n\
             set output '{png}'\n\
             set title '{title} per target and job (fio nbd engine)'\n\
             set ylabel '{ylabel}'\n\
             set style data histograms\n\
             set style histogram clustered gap 1\n\
             set style fill solid 0.85 border -1\n\
             set boxwidth 0.9\n\
             set xtics rotate by -25 scale 0\n\
             set grid ytics\n\
             set yrange [0:*]\n\
             set key top right\n\
             plot for [i=2:{n}] '{dat}' using i:xtic(1) title columnheader(i)\n",
            png = png.display(),
            dat = dat.display(),
            n = targets.len() + 1,
        );
        let gp = dir.join(format!("testbed-{file}.gp"));
        std::fs::write(&gp, &script).map_err(Error::io(format!("writing {}", gp.display())))?;
        let o = Command::new("gnuplot")
            .arg(&gp)
            .output()
            .map_err(|e| Error::Bench(format!("running gnuplot (apt install gnuplot-nox): {e}")))?;
        if !o.status.success() {
            return Err(Error::Bench(format!(
                "gnuplot failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
        let _ = std::fs::remove_file(&dat);
        let _ = std::fs::remove_file(&gp);
        out.push((title.to_owned(), png));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_between_markers() {
        let doc = format!("# B\n\nbefore\n{BEGIN}\nold\nrows\n{END}\nafter\n");
        let new = splice(&doc, "new table\n").unwrap();
        assert_eq!(
            new,
            format!("# B\n\nbefore\n{BEGIN}\nnew table\n{END}\nafter\n")
        );
        let appended = splice("# B\n\ntext\n", "t").unwrap();
        assert!(appended.starts_with("# B\n\ntext\n\n## fio over NBD"));
        assert!(appended.contains(&format!("{BEGIN}\nt\n{END}\n")));
        assert!(splice(&format!("{END}\n{BEGIN}\n"), "t").is_err());
        assert!(splice(&format!("{BEGIN}\n"), "t").is_err());
    }

    #[test]
    fn numbers() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        let t = utc_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20"), "{t}");
    }
}
