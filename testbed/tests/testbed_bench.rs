//! `testbed bench` end to end against a second `nbdkit memory` (fio and nbdkit come
//! from scripts/install-deps.sh; the engine's NBD peer tests need them too): every
//! job, queue depth and round produces a row with real I/O and CPU figures, the JSON
//! and the Markdown agree, and the document changes only between its markers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Nbdkit(std::process::Child);

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn bench_against_nbdkit_writes_json_table_doc_and_plots() {
    let dir = tempfile::Builder::new()
        .prefix("testbed-bench")
        .tempdir()
        .unwrap();
    let sock = dir.path().join("other.sock");
    let pidfile = dir.path().join("other.pid");
    let other = Nbdkit(
        Command::new("nbdkit")
            .args(["--foreground", "--exit-with-parent", "--unix"])
            .arg(&sock)
            .arg("--pidfile")
            .arg(&pidfile)
            .args(["memory", "32M"])
            .stdout(Stdio::null())
            .spawn()
            .expect("nbdkit (scripts/install-deps.sh installs it)"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pidfile.exists() {
        assert!(Instant::now() < deadline, "nbdkit did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = other.0.id().to_string();
    let doc = dir.path().join("bench.md");
    std::fs::write(&doc, "# Benchmarks\n\nkept before\n").unwrap();
    let out_dir = dir.path().join("out");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = Command::new(env!("CARGO_BIN_EXE_testbed"))
        .arg("--workdir")
        .arg(dir.path().join("work"))
        .args(["bench", "--uri", &uri, "--label", "other", "--pid", &pid])
        .args(["--runtime", "1", "--repeat", "2", "--size", "32MiB"])
        .args(["--only", "randread-4k", "--only", "randrw70-4k"])
        .arg("--jobs")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/fio"))
        .arg("--doc")
        .arg(&doc)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{stderr}");

    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("testbed-bench.json")).unwrap())
            .unwrap();
    let rows = json["rows"].as_array().unwrap();
    // 2 jobs x 2 queue depths x 2 rounds x 2 targets.
    assert_eq!(rows.len(), 16, "{json}");
    for r in rows {
        assert!(r["fio"]["ios"].as_u64().unwrap() > 100, "{r}");
        assert!(r["fio"]["iops"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["fio"]["p99_us"].as_f64().unwrap() > 0.0, "{r}");
        // Both sides have a process: nbdkit's CPU per I/O and RSS are measured.
        assert!(r["cpu_us_per_io"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["rss_bytes"].as_u64().unwrap() > 1 << 20, "{r}");
        assert!(r["node_write_bytes"].is_null(), "no nodes here: {r}");
        let mixed = r["job"] == "randrw70-4k";
        assert_eq!(r["fio"]["write_bytes"].as_u64().unwrap() > 0, mixed, "{r}");
        assert!(std::path::Path::new(r["raw"].as_str().unwrap()).exists());
    }
    let ratios = json["ratios"].as_array().unwrap();
    assert_eq!(ratios.len(), 4, "one per job and queue depth of `other`");
    for r in ratios {
        assert_eq!(r["target"], "other");
        let x = &r["ratios"];
        let (lo, mid, hi) = (
            x["iops_min"].as_f64().unwrap(),
            x["iops"].as_f64().unwrap(),
            x["iops_max"].as_f64().unwrap(),
        );
        assert!(lo > 0.0 && lo <= mid && mid <= hi, "{r}");
    }

    let text = std::fs::read_to_string(&doc).unwrap();
    assert!(text.starts_with("# Benchmarks\n\nkept before\n"), "{text}");
    let begin = text.find("<!-- testbed-bench:begin -->").unwrap();
    let end = text.find("<!-- testbed-bench:end -->").unwrap();
    let section = &text[begin..end];
    assert!(
        section.contains("| other | randrw70-4k | 32 |"),
        "{section}"
    );
    assert!(section.contains("| floor | randread-4k | 1 |"), "{section}");
    assert!(section.contains("2 round(s)"), "{section}");
    assert_eq!(section.matches("\n| other |").count(), 4, "{section}");
    // A second run replaces the section instead of adding one.
    std::fs::write(&doc, format!("{text}\nkept after\n")).unwrap();
    let again = Command::new(env!("CARGO_BIN_EXE_testbed"))
        .arg("--workdir")
        .arg(dir.path().join("work"))
        .args(["bench", "--floor-only", "--runtime", "1", "--repeat", "1"])
        .args(["--size", "32MiB", "--only", "randread-4k", "--no-plots"])
        .arg("--jobs")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/fio"))
        .arg("--doc")
        .arg(&doc)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let text2 = std::fs::read_to_string(&doc).unwrap();
    assert_eq!(text2.matches("<!-- testbed-bench:begin -->").count(), 1);
    assert!(!text2.contains("| other |"), "{text2}");
    assert!(text2.contains("| floor | randread-4k | 32 |"), "{text2}");
    assert!(text2.ends_with("\nkept after\n"), "{text2}");

    // Plots, when gnuplot is there (install-deps.sh installs it).
    let has_gnuplot = Command::new("gnuplot").arg("--version").output().is_ok();
    if has_gnuplot {
        for f in ["testbed-iops.png", "testbed-p99.png"] {
            let png = std::fs::read(out_dir.join(f)).unwrap();
            assert!(png.starts_with(b"\x89PNG"), "{f} is not a PNG");
        }
        assert!(section.contains("![IOPS]("), "{section}");
    } else {
        assert!(section.contains("No plots:"), "{section}");
    }
}
