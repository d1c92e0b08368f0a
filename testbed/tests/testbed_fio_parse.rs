//! fio JSON parsing against real fio 3.33 output kept in benches/fio/samples/ (fio's
//! nbd engine against `nbdkit memory`, produced by `testbed bench`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use testbed::bench::{self, fio};

fn sample(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../benches/fio/samples")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn mixed_job_uses_the_mixed_section() {
    let jobs = fio::parse(&sample("randrw70-4k-qd32-nbdkit.json")).unwrap();
    assert_eq!(jobs.len(), 1);
    let j = &jobs[0];
    assert_eq!(j.name, "randrw70-4k");
    assert_eq!(j.read.total_ios, 60388);
    assert_eq!(j.write.total_ios, 25646);
    assert_eq!(j.read.io_bytes, 247_349_248);
    assert_eq!(j.write.io_bytes, 105_046_016);
    let s = j.summary().unwrap();
    assert_eq!(s.ios, 60388 + 25646);
    assert!((s.iops - (30178.910545 + 12816.591704)).abs() < 1e-6);
    assert!((s.mb_s - (123_612_817.0 + 52_496_759.0) / 1e6).abs() < 1e-9);
    // The mixed section's percentiles, not either direction's.
    assert_eq!(s.p50_us, Some(333.824));
    assert_eq!(s.p99_us, Some(8028.160));
    assert_eq!(s.p999_us, Some(12648.448));
    assert_eq!(s.read_bytes, 247_349_248);
    assert_eq!(s.write_bytes, 105_046_016);
}

#[test]
fn read_job() {
    let jobs = fio::parse(&sample("randread-4k-qd1-nbdkit.json")).unwrap();
    let s = jobs[0].summary().unwrap();
    assert_eq!(jobs[0].name, "randread-4k");
    assert_eq!(s.ios, 31083);
    assert_eq!(s.write_bytes, 0);
    assert!((s.iops - 31051.948052).abs() < 1e-6);
    assert_eq!(s.p50_us, Some(13.632));
    assert_eq!(s.p99_us, Some(41.728));
    assert_eq!(s.p999_us, Some(3293.184));
}

#[test]
fn notes_before_the_json_are_skipped() {
    let text = format!(
        "note: both iodepth >= 1 and synchronous I/O engine are selected\n{}",
        sample("randread-4k-qd1-nbdkit.json")
    );
    assert_eq!(fio::parse(&text).unwrap()[0].read.total_ios, 31083);
}

#[test]
fn no_io_and_failed_jobs_are_errors() {
    let idle = r#"{"jobs":[{"jobname":"x","error":0,"job_runtime":1000,
        "read":{"io_bytes":0,"bw_bytes":0,"iops":0.0,"total_ios":0,"clat_ns":{}},
        "write":{"io_bytes":0,"bw_bytes":0,"iops":0.0,"total_ios":0,"clat_ns":{}}}]}"#;
    let e = fio::parse(idle).unwrap()[0].summary().unwrap_err();
    assert!(e.to_string().contains("no I/O"), "{e}");
    let failed = idle.replace("\"error\":0", "\"error\":5");
    let e = fio::parse(&failed).unwrap()[0].summary().unwrap_err();
    assert!(e.to_string().contains("error 5"), "{e}");
    assert!(fio::parse("fio: no such engine").is_err());
    assert!(fio::parse("{\"jobs\": 3}").is_err());
    assert!(fio::parse("{ truncated").is_err());
}

#[test]
fn both_directions_without_mixed_take_the_slower_percentiles() {
    let text = r#"{"jobs":[{"jobname":"x","error":0,
        "read":{"io_bytes":4096,"bw_bytes":4096,"iops":1.0,"total_ios":1,
                "clat_ns":{"percentile":{"50.000000":1000,"99.000000":5000,"99.900000":9000}}},
        "write":{"io_bytes":8192,"bw_bytes":8192,"iops":2.0,"total_ios":2,
                 "clat_ns":{"percentile":{"50.000000":2000,"99.000000":3000,"99.900000":9500}}}}]}"#;
    let s = fio::parse(text).unwrap()[0].summary().unwrap();
    assert_eq!(
        (s.p50_us, s.p99_us, s.p999_us),
        (Some(2.0), Some(5.0), Some(9.5))
    );
    assert_eq!(s.iops, 3.0);
}

#[test]
fn job_files_declare_their_queue_depths() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/fio");
    let jobs = bench::job_files(&dir).unwrap();
    let names: Vec<(&str, &[u32])> = jobs
        .iter()
        .map(|j| (j.name.as_str(), j.qds.as_slice()))
        .collect();
    assert_eq!(
        names,
        [
            ("randread-4k", &[1, 32][..]),
            ("randwrite-4k", &[1, 32][..]),
            ("randrw70-4k", &[1, 32][..]),
            ("seqread-128k", &[16][..]),
            ("seqwrite-128k", &[16][..]),
        ]
    );
    assert!(bench::parse_qds("# testbed-qd: 1 x").is_err());
    assert!(bench::parse_qds("# testbed-qd: 0").is_err());
    assert!(bench::parse_qds("rw=read").is_err());
}
