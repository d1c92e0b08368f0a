//! Real peers: the Linux kernel's NVMe/TCP host and target, in a QEMU guest, against our
//! target and host (docs/testing.md). Ignored in a plain `cargo test`; `scripts/test`
//! runs them with `--ignored`. Our side runs in this process on a tokio runtime while
//! the guest runs on the test's thread.

// The helpers below are test code too: a panic is a failed test with its message.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use nvmeof::backend::{FileBackend, FileOptions};
use nvmeof::target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use serde_json::Value;
use testbed::guest::{self, GuestConfig, GuestEnv, GuestRun, HOST_ADDR_FROM_GUEST};

fn env() -> GuestEnv {
    GuestEnv::discover().unwrap_or_else(|e| panic!("{e}"))
}

/// Unwraps a guest result, printing the guest's diagnostics on failure.
fn ok<T>(r: Result<T, guest::GuestError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn timings(run: &GuestRun) {
    eprintln!(
        "guest {}: boot {:?}, total {:?}, console {}",
        run.name,
        run.boot_time,
        run.total_time,
        run.log_path.display()
    );
}

/// The guest image itself: the kernel's host connects to the kernel's target over the
/// guest's loopback and fio verifies data through it. When this fails, the image or the
/// guest kernel is broken, not our code.
#[test]
#[ignore = "needs QEMU and the guest kernel; run by scripts/test"]
fn guest_image_kernel_host_against_kernel_target() {
    let script = r#"
nqn=nqn.2026-11.io.testbed:selfcheck
must brd modprobe brd rd_nr=1 rd_size=32768
export_nvmet "$nqn" /dev/ram0 127.0.0.1 4420 || fail "nvmet configfs export"
must discover nvme discover -t tcp -a 127.0.0.1 -s 4420
must connect nvme connect -t tcp -a 127.0.0.1 -s 4420 -n "$nqn"
wait_for_path /dev/nvme0n1 100 || fail "no /dev/nvme0n1 10 s after connect"
must fio fio --name=selfcheck --filename=/dev/nvme0n1 --direct=1 --ioengine=libaio \
    --iodepth=16 --rw=randwrite --bssplit=4k/50:64k/50 --size=8M --verify=crc32c \
    --verify_fatal=1 --output-format=json
must disconnect nvme disconnect -n "$nqn"
"#;
    let _one = guest::exclusive();
    let run =
        ok(env().run(GuestConfig::new("selfcheck", script).timeout(Duration::from_secs(120))));
    timings(&run);
    ok(run.check());
    let discover = ok(run.output("discover"));
    assert!(
        discover.contains("subnqn:  nqn.2026-11.io.testbed:selfcheck"),
        "discovery log lacks the subsystem:\n{discover}"
    );
    let (written, verified) = fio_bytes(&run, "fio");
    assert!(
        written >= 4 << 20 && verified >= written,
        "fio wrote {written}, verified {verified}"
    );
}

fn json(run: &GuestRun, section: &str) -> Value {
    let text = ok(run.output(section));
    // nvme-cli may print warnings before the JSON document.
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("{section}: no JSON in output:\n{text}\n{}", run.report()));
    serde_json::from_str(&text[start..])
        .unwrap_or_else(|e| panic!("{section}: bad JSON ({e}):\n{text}\n{}", run.report()))
}

fn json_u64(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no numeric {key} in {v}"))
}

fn json_str<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string {key} in {v}"))
}

/// Bytes written and read by the single job of fio step `section` (JSON output), which
/// must have reported no error.
fn fio_bytes(run: &GuestRun, section: &str) -> (u64, u64) {
    let v = json(run, section);
    let job = v
        .get("jobs")
        .and_then(|j| j.get(0))
        .unwrap_or_else(|| panic!("{section}: no jobs in fio output: {v}"));
    assert_eq!(json_u64(job, "error"), 0, "{section}: fio job error: {job}");
    let bytes = |dir: &str| {
        job.get(dir)
            .map(|d| json_u64(d, "io_bytes"))
            .unwrap_or_else(|| panic!("{section}: no {dir} stats: {job}"))
    };
    (bytes("write"), bytes("read"))
}

/// A host NQN the target does not allow.
const STRANGER_HOSTNQN: &str =
    "nqn.2014-08.org.nvmexpress:uuid:5f1c0de2-7a0b-4c55-9d1e-0badbadbad01";

/// The tokio runtime our side of a test runs on; its workers keep serving while the
/// test's thread waits for the guest.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The Linux kernel's NVMe/TCP host (nvme-cli, nvme-tcp) against our target serving a
/// file: discovery, the allow-list, Identify, and fio with verification over in-capsule
/// and R2T writes, first without and then with header and data digests.
#[test]
#[ignore = "needs QEMU and the guest kernel; run by scripts/test"]
fn kernel_host_against_our_target() {
    const NS_BYTES: u64 = 64 << 20;
    let nqn = "nqn.2026-11.io.testbed:kernel-host";
    let dir = std::env::temp_dir().join(format!("kernel-host-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let image = dir.join("ns1.img");
    fs::File::create(&image).unwrap().set_len(NS_BYTES).unwrap();

    let _one = guest::exclusive();
    let rt = runtime();
    let target = rt.block_on(async {
        let backend = FileBackend::open(&image, &FileOptions::default()).unwrap();
        let ns = NamespaceConfig::new(Arc::new(backend)).id_seed(image.display().to_string());
        let subsystem = SubsystemConfig::new(nqn)
            .namespace(ns)
            .allow_host(guest::GUEST_HOSTNQN);
        let config = TargetConfig::new("127.0.0.1:0".parse().unwrap()).subsystem(subsystem);
        Target::start(config).await.unwrap()
    });
    let port = target.local_addr().port();

    let script = format!(
        r#"
a={host} s={port} nqn={nqn}
must discover nvme discover -t tcp -a $a -s $s
# The allow-list: a host NQN the target does not know must be refused.
section stranger nvme connect -t tcp -a $a -s $s -n $nqn --hostnqn={stranger}
must connect nvme connect -t tcp -a $a -s $s -n $nqn
wait_for_path /dev/nvme0n1 100 || fail "no /dev/nvme0n1 10 s after connect"
must list ls /dev/
must id_ctrl nvme id-ctrl /dev/nvme0 -o json
must id_ns nvme id-ns /dev/nvme0n1 -o json
must sectors cat /sys/block/nvme0n1/size
must queues cat /sys/block/nvme0n1/queue/max_hw_sectors_kb /sys/class/nvme/nvme0/queue_count
# 4-8 KiB writes go in-capsule (the target's I/O in-capsule size is 8 KiB); larger
# ones are solicited with R2T and sent as H2CData; verification reads come back as
# C2HData.
must fio fio --name=mixed --filename=/dev/nvme0n1 --direct=1 --ioengine=libaio \
    --iodepth=16 --rw=randwrite --bssplit=4k/25:8k/15:16k/20:64k/20:128k/20 \
    --size=24M --verify=crc32c --verify_fatal=1 --output-format=json
must fio_seq fio --name=seq --filename=/dev/nvme0n1 --direct=1 --ioengine=libaio \
    --iodepth=8 --rw=write --bs=256k --offset=32M --size=8M --verify=crc32c \
    --verify_fatal=1 --output-format=json
must disconnect nvme disconnect -n $nqn
# Again with header and data digests (nvme connect fails if they are not negotiated).
must connect_digest nvme connect -t tcp -a $a -s $s -n $nqn --hdr-digest --data-digest
wait_for_path /dev/nvme0n1 100 || fail "no /dev/nvme0n1 10 s after the digest connect"
must fio_digest fio --name=digest --filename=/dev/nvme0n1 --direct=1 --ioengine=libaio \
    --iodepth=8 --rw=randwrite --bssplit=4k/40:32k/30:128k/30 --offset=48M --size=8M \
    --verify=crc32c --verify_fatal=1 --output-format=json
must disconnect_digest nvme disconnect -n $nqn
"#,
        host = HOST_ADDR_FROM_GUEST,
        stranger = STRANGER_HOSTNQN,
    );
    let config = GuestConfig::new("kernel-host", script).timeout(Duration::from_secs(150));
    let run = ok(env().run(config));
    timings(&run);
    ok(run.check());
    assert_eq!(
        target.controller_count(nqn),
        0,
        "a controller outlived nvme disconnect"
    );
    rt.block_on(target.shutdown());

    let discover = ok(run.output("discover"));
    assert!(
        discover.contains(&format!("subnqn:  {nqn}")),
        "our subsystem is not in the discovery log:\n{discover}"
    );
    let stranger = ok(run.section("stranger"));
    assert_ne!(
        stranger.rc,
        Some(0),
        "a host outside the allow-list connected:\n{}",
        stranger.output
    );

    let ctrl = json(&run, "id_ctrl");
    assert_eq!(json_str(&ctrl, "subnqn"), nqn, "id-ctrl: {ctrl}");
    assert!(json_u64(&ctrl, "nn") >= 1, "id-ctrl nn: {ctrl}");
    let mdts = json_u64(&ctrl, "mdts");
    assert!(
        (1..=20).contains(&mdts),
        "id-ctrl mdts {mdts} (0 would be unlimited)"
    );
    assert!(
        !json_str(&ctrl, "sn").trim().is_empty(),
        "id-ctrl sn empty: {ctrl}"
    );
    assert!(
        !json_str(&ctrl, "mn").trim().is_empty(),
        "id-ctrl mn empty: {ctrl}"
    );

    let ns = json(&run, "id_ns");
    let flbas = json_u64(&ns, "flbas") & 0xf;
    let lbaf = ns
        .get("lbafs")
        .and_then(Value::as_array)
        .and_then(|l| l.get(usize::try_from(flbas).unwrap()))
        .unwrap_or_else(|| panic!("id-ns has no lbafs[{flbas}]: {ns}"));
    let lba_bytes = 1u64 << json_u64(lbaf, "ds");
    assert!(
        lba_bytes == 512 || lba_bytes == 4096,
        "LBA size {lba_bytes}: {ns}"
    );
    assert_eq!(
        json_u64(&ns, "nsze") * lba_bytes,
        NS_BYTES,
        "id-ns nsze: {ns}"
    );
    assert!(
        json_u64(&ns, "ncap") <= json_u64(&ns, "nsze"),
        "id-ns ncap: {ns}"
    );
    let sectors: u64 = ok(run.output("sectors")).trim().parse().unwrap();
    assert_eq!(
        sectors * 512,
        NS_BYTES,
        "the kernel sized the disk differently"
    );

    // fio exits 0 having done nothing when a job's region lies outside the device, so
    // check the bytes moved as well as the status.
    let mixed = fio_bytes(&run, "fio");
    assert!(
        mixed.0 >= 8 << 20 && mixed.1 >= mixed.0,
        "fio mixed wrote/verified {mixed:?}"
    );
    let seq = fio_bytes(&run, "fio_seq");
    assert!(
        seq.0 == 8 << 20 && seq.1 == seq.0,
        "fio seq wrote/verified {seq:?}"
    );
    let digest = fio_bytes(&run, "fio_digest");
    assert!(
        digest.0 >= 4 << 20 && digest.1 >= digest.0,
        "fio digest wrote/verified {digest:?}"
    );
    assert!(
        ok(run.output("disconnect")).contains("disconnected 1 controller"),
        "{}",
        run.report()
    );

    // What fio wrote went to the file: its verify headers start with magic 0xacca.
    let data = fs::read(&image).unwrap();
    let written = data
        .chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count();
    assert!(
        // fio's mixed-size random runs stop short of --size (their random map is in
        // units of the smallest block), so expect about 13 + 8 + 4 MiB, not 40.
        written >= 20 * 256,
        "only {written} non-zero 4 KiB blocks in the namespace file"
    );
    let _ = fs::remove_dir_all(&dir);
}
