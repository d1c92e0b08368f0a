//! The NBD server against real clients: libnbd's `nbdinfo`, QEMU's `qemu-img` and
//! `qemu-io`, and fio's `nbd` engine, each talking to an in-process server over a
//! `MemoryDevice`, on a Unix socket and on loopback TCP.
//!
//! These are the peers users will point at dpud, so they run in a plain `cargo test`.
//! The tools come from `scripts/install-deps.sh` (Debian packages libnbd-bin,
//! qemu-utils, fio); a missing tool fails the test with the package to install.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::random_bytes;
use engine::frontend::nbd::{NbdListener, NbdServer};
use engine::frontend::{BlockDevice, MemoryDevice};
use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;
use tokio::process::Command;

const MIB: u64 = 1 << 20;

/// The path of `tool`, or a failure naming the package that provides it.
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} is not installed: it comes from the Debian package {package} \
         (scripts/install-deps.sh installs it)"
    );
}

struct Fixture {
    server: NbdServer,
    device: Arc<MemoryDevice>,
    unix: NbdListener,
    tcp: NbdListener,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn new(size: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = NbdServer::new();
        let device = Arc::new(MemoryDevice::new(size, 4096));
        server
            .add_export("vol", device.clone(), Some("test volume".into()))
            .unwrap();
        server
            .add_export(
                "ro",
                Arc::new(MemoryDevice::new(4 * MIB, 4096).into_read_only()),
                None,
            )
            .unwrap();
        let unix = server
            .serve_unix(&dir.path().join("nbd.sock"))
            .await
            .unwrap();
        let tcp = server
            .serve_tcp("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        Self {
            server,
            device,
            unix,
            tcp,
            dir,
        }
    }

    fn unix_uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.unix.path().unwrap().display()
        )
    }

    fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp.local_addr().unwrap())
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn device_bytes(&self) -> Vec<u8> {
        self.device.read(0, self.device.size_bytes()).await.unwrap()
    }
}

/// Runs a command with a time limit and returns its output; fails on a non-zero exit.
async fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{shown} did not finish in 300 s"))
        .unwrap_or_else(|e| panic!("{shown} could not start: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The integer after `"key": ` in nbdinfo's JSON for the first export.
fn json_u64(json: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\": ");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("{key} missing in:\n{json}"));
    json[at + pat.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_shows_size_block_sizes_and_flags() {
    let nbdinfo = tool("nbdinfo", "libnbd-bin");
    let f = Fixture::new(64 * MIB).await;
    for uri in [f.unix_uri("vol"), f.tcp_uri("vol")] {
        let out = run(Command::new(&nbdinfo).arg("--json").arg(&uri)).await;
        let json = String::from_utf8(out.stdout).unwrap();
        assert_eq!(json_u64(&json, "export-size"), 64 * MIB, "{json}");
        assert_eq!(json_u64(&json, "block_size_minimum"), 4096, "{json}");
        assert_eq!(json_u64(&json, "block_size_preferred"), 4096, "{json}");
        assert_eq!(json_u64(&json, "block_size_maximum"), 32 * MIB, "{json}");
        for flag in [
            "\"structured\": true",
            "\"is_read_only\": false",
            "\"can_flush\": true",
            "\"can_fua\": true",
            "\"can_trim\": true",
            "\"can_zero\": true",
            "\"can_multi_conn\": true",
            "\"can_df\": true",
            "\"export-name\": \"vol\"",
        ] {
            assert!(json.contains(flag), "{flag} missing in:\n{json}");
        }
    }
    let out = run(Command::new(&nbdinfo).arg("--json").arg(f.unix_uri("ro"))).await;
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(json.contains("\"is_read_only\": true"), "{json}");
    assert_eq!(json_u64(&json, "export-size"), 4 * MIB, "{json}");
    // NBD_OPT_LIST, then NBD_OPT_INFO for each export.
    let out = run(Command::new(&nbdinfo)
        .arg("--list")
        .arg("--json")
        .arg(f.unix_uri("")))
    .await;
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(json.contains("\"export-name\": \"vol\""), "{json}");
    assert!(json.contains("\"export-name\": \"ro\""), "{json}");
    assert!(json.contains("test volume"), "description missing:\n{json}");
}

async fn qemu_img_roundtrip(f: &Fixture, uri: &str, seed: u64) {
    let qemu_img = tool("qemu-img", "qemu-utils");
    let size = usize::try_from(f.device.size_bytes()).unwrap();
    // Fill the device with a pattern first, so that a zero range the client skips
    // or zeroes wrongly shows up as a difference.
    f.device.write(0, vec![0xff; size], false).await.unwrap();
    let mut data = random_bytes(size, seed);
    // A zero range in the middle (qemu-img sends it as write-zeroes or trim).
    data[size / 4..size / 4 + 3 * 65536].fill(0);
    let input = f.file("in.raw");
    let output = f.file("out.raw");
    std::fs::write(&input, &data).unwrap();
    run(Command::new(&qemu_img)
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&input)
        .arg(uri))
    .await;
    assert!(
        f.device_bytes().await == data,
        "device differs from the file after convert in"
    );
    let _ = std::fs::remove_file(&output);
    run(Command::new(&qemu_img)
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(uri)
        .arg(&output))
    .await;
    let back = std::fs::read(&output).unwrap();
    assert_eq!(back.len(), data.len());
    assert!(
        back == data,
        "bytes read back through {uri} differ from the file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_in_and_out_gives_identical_bytes_unix() {
    let f = Fixture::new(16 * MIB).await;
    qemu_img_roundtrip(&f, &f.unix_uri("vol"), 0x1234_5678).await;
    let stats = f.server.stats("vol").unwrap();
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert!(stats.written_bytes >= 15 * MIB, "{stats:?}");
    assert!(stats.read_bytes >= 16 * MIB, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_in_and_out_gives_identical_bytes_tcp() {
    let f = Fixture::new(16 * MIB).await;
    qemu_img_roundtrip(&f, &f.tcp_uri("vol"), 0x9876_5432).await;
    assert_eq!(f.server.stats("vol").unwrap().errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_reads_a_pattern() {
    let qemu_io = tool("qemu-io", "qemu-utils");
    let f = Fixture::new(16 * MIB).await;
    for uri in [f.unix_uri("vol"), f.tcp_uri("vol")] {
        f.device.write(0, vec![0; 2 << 20], false).await.unwrap();
        let out = run(Command::new(&qemu_io)
            .args(["-f", "raw"])
            .args(["-c", "write -P 0xab 0 1M"])
            .args(["-c", "read -P 0xab 0 1M"])
            .args(["-c", "write -z 1M 64k"])
            .args(["-c", "read -P 0 1M 64k"])
            .args(["-c", "flush"])
            .arg(&uri))
        .await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!text.contains("failed"), "{uri}:\n{text}");
        assert!(
            text.contains("wrote 1048576/1048576 bytes"),
            "{uri}:\n{text}"
        );
        assert!(
            text.contains("read 1048576/1048576 bytes"),
            "{uri}:\n{text}"
        );
        let bytes = f.device.read(0, 2 << 20).await.unwrap();
        assert!(bytes[..1 << 20].iter().all(|&b| b == 0xab), "{uri}");
        assert!(bytes[1 << 20..].iter().all(|&b| b == 0), "{uri}");
    }
    // The read-only export opens read-only (QEMU honours NBD_FLAG_READ_ONLY).
    let out = run(Command::new(&qemu_io)
        .args(["-r", "-f", "raw", "-c", "read -P 0 0 4k"])
        .arg(f.unix_uri("ro")))
    .await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("read 4096/4096 bytes"), "{text}");
}

/// fio's `nbd` engine with crc32c verification: two jobs, each over its own half of
/// the export (each job opens its own connection), queue depth 16. Returns the
/// issued (reads, writes, trims). With trims in the mix fio must not keep a trim and
/// the write of the same block in flight together (`--serialize_overlap=1`): NBD
/// lets a server complete concurrent requests in any order, and `nbdkit memory`
/// fails the same verification without it.
async fn fio_verify(f: &Fixture, uri: &str, rw: &str) -> (u64, u64, u64) {
    let fio = tool("fio", "fio");
    let half = f.device.size_bytes() / 2;
    let out = run(Command::new(&fio)
        .arg("--name=nbd-fio")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg(format!("--rw={rw}"))
        .arg("--serialize_overlap=1")
        .arg("--bs=4k")
        .arg("--iodepth=16")
        .arg("--numjobs=2")
        .arg(format!("--size={half}"))
        .arg(format!("--offset_increment={half}"))
        .arg("--verify=crc32c")
        .arg("--verify_fatal=1")
        .arg("--do_verify=1")
        // No verify state file in the working directory.
        .arg("--verify_state_save=0")
        .arg("--group_reporting"))
    .await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("err= 0"), "{text}");
    let at = text.find("issued rwts: total=").expect("fio summary") + 19;
    let n: Vec<u64> = text[at..]
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(|v| v.parse().unwrap())
        .collect();
    // Every block written was read back and verified.
    assert!(n[1] > 0 && n[0] == n[1], "{text}");
    (n[0], n[1], n[2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_randwrite_verify_two_jobs_qd16() {
    let f = Fixture::new(32 * MIB).await;
    let blocks = f.device.size_bytes() / 4096;
    for uri in [f.unix_uri("vol"), f.tcp_uri("vol")] {
        let (_, writes, _) = fio_verify(&f, &uri, "randwrite").await;
        assert_eq!(writes, blocks, "every block is written once");
    }
    let stats = f.server.stats("vol").unwrap();
    assert_eq!(stats.errors, 0, "{stats:?}");
    // Each run writes and then reads back the whole export.
    assert!(stats.written_bytes >= 64 * MIB, "{stats:?}");
    assert!(stats.read_bytes >= 64 * MIB, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_randtrimwrite_verify_two_jobs_qd16() {
    let f = Fixture::new(32 * MIB).await;
    for (uri, rw) in [
        (f.unix_uri("vol"), "randtrimwrite"),
        (f.tcp_uri("vol"), "trimwrite"),
    ] {
        let (_, _, trims) = fio_verify(&f, &uri, rw).await;
        assert!(trims > 0, "{rw} issued no trims");
    }
    let stats = f.server.stats("vol").unwrap();
    assert_eq!(stats.errors, 0, "{stats:?}");
}
