//! Real peers: the Linux kernel's NVMe/TCP host and target, in a QEMU guest, against our
//! target and host (docs/testing.md). Ignored in a plain `cargo test`; `scripts/test`
//! runs them with `--ignored`. Our side runs in this process on a tokio runtime while
//! the guest runs on the test's thread.

// The helpers below are test code too: a panic is a failed test with its message.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nvmeof::backend::{FileBackend, FileOptions};
use nvmeof::host::{discover, Controller, HostConfig};
use nvmeof::target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use serde_json::Value;
use testbed::capture::{dissect, pdu_type_name, Capture, Dissection};
use testbed::guest::{self, GuestConfig, GuestEnv, GuestRun, HOST_ADDR_FROM_GUEST};

fn env() -> GuestEnv {
    GuestEnv::discover().unwrap_or_else(|e| panic!("{e}"))
}

/// Unwraps a guest result, printing the guest's diagnostics on failure.
fn ok<T>(r: Result<T, guest::GuestError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn timings(run: &GuestRun) {
    eprintln!("{} (console: {})", run.timings(), run.log_path.display());
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
        ok(env().run(GuestConfig::new("selfcheck", script).timeout(Duration::from_secs(180))));
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
/// and R2T writes, first without and then with header and data digests; Wireshark
/// verifies the digests of the captured digest phase (the kernel's and ours).
#[test]
#[ignore = "needs QEMU, the guest kernel, root (dumpcap) and tshark; run by scripts/test"]
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
# Again with header and data digests (nvme connect fails if they are not negotiated),
# while the host captures the traffic for Wireshark.
wait_host capture
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
    let config = GuestConfig::new("kernel-host", script).timeout(Duration::from_secs(240));
    let mut running = ok(env().start(config));
    ok(running.wait_for_prompt("capture", Duration::from_secs(200)));
    // Between QEMU's network back-end and our target the traffic is plain NVMe/TCP on lo.
    let capture = Capture::start(&dir.join("kernel-host.pcapng"), port)
        .unwrap_or_else(|e| panic!("{e}\n{}", running.report()));
    ok(running.send_line("go"));
    let run = ok(running.finish());
    let pcap = capture.stop().unwrap_or_else(|e| panic!("{e}"));
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
    // Wireshark verifies the digests of the kernel's host and of our target.
    let d = dissect(&pcap, port).unwrap_or_else(|e| panic!("{e}"));
    let summary = format!("{}\ncapture: {}", d.summary(), pcap.display());
    eprintln!("{summary}");
    assert_digests_good(&d, &summary);

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

/// Wireshark decoded the whole capture, verified every digest as good, and saw data
/// digests on both H2CData and C2HData (so digests were really negotiated).
fn assert_digests_good(d: &Dissection, summary: &str) {
    assert!(
        d.malformed.is_empty() && d.nvme_expert.is_empty() && d.unknown_data.is_empty(),
        "Wireshark disagrees with the exchange\n{summary}"
    );
    let bad: Vec<_> = d
        .pdus
        .iter()
        .filter(|p| {
            p.hdgst_status.is_some_and(|s| s != 1) || p.ddgst_status.is_some_and(|s| s != 1)
        })
        .collect();
    assert!(
        bad.is_empty(),
        "digests Wireshark rejects: {bad:?}\n{summary}"
    );
    for t in [6u8, 7] {
        assert!(
            d.pdus
                .iter()
                .any(|p| p.pdu_type == t && p.ddgst_status == Some(1)),
            "no {} with a verified data digest: were digests negotiated?\n{summary}",
            pdu_type_name(t)
        );
    }
}

/// Deterministic bytes for the block at `lba`, seeded by the LBA and a tag, so that a
/// block read from the wrong place or a stale one never matches.
fn pattern(tag: u64, lba: u64, len: usize) -> Vec<u8> {
    testbed::testdata::xorshift_bytes(lba ^ (tag << 40), len)
}

fn sha256_hex(data: &[u8]) -> String {
    testbed::testdata::sha256_hex(data).unwrap()
}

/// One write of the kernel-target test: where, how big, and on which I/O queue.
#[derive(Debug, Clone, Copy)]
struct Extent {
    slba: u64,
    bytes: usize,
    queue: usize,
}

/// The Linux kernel's nvmet-tcp target (a brd RAM disk exported through configfs in the
/// guest) driven by our host library with header and data digests: discovery, connect,
/// Identify, patterned writes from 512 B (in-capsule) to 1 MiB (R2T + H2CData) on two
/// queues at once, read-back (C2HData), flush, shutdown; Wireshark checks the captured
/// exchange (digests of both sides), and the guest checks that the bytes are on its RAM
/// disk at the right LBAs.
#[test]
#[ignore = "needs QEMU, the guest kernel, root (dumpcap) and tshark; run by scripts/test"]
fn our_host_against_kernel_target() {
    const NS_BYTES: u64 = 64 << 20;
    const TAG: u64 = 0x5eed;
    let nqn = "nqn.2026-11.io.testbed:kernel-target";
    // (slba in 512-byte blocks, bytes, queue): in-capsule sizes, R2T sizes, and writes
    // that end on the last block of the namespace.
    let extents = [
        Extent {
            slba: 0,
            bytes: 512,
            queue: 0,
        },
        Extent {
            slba: 8,
            bytes: 4096,
            queue: 1,
        },
        Extent {
            slba: 64,
            bytes: 16 << 10,
            queue: 0,
        },
        Extent {
            slba: 2048,
            bytes: 64 << 10,
            queue: 1,
        },
        Extent {
            slba: 4096,
            bytes: 128 << 10,
            queue: 0,
        },
        Extent {
            slba: 8192,
            bytes: 1 << 20,
            queue: 1,
        },
        Extent {
            slba: NS_BYTES / 512 - 256,
            bytes: 128 << 10,
            queue: 0,
        },
    ];
    let script = format!(
        r#"
must brd modprobe brd rd_nr=1 rd_size={kib} max_part=0
export_nvmet {nqn} /dev/ram0 0.0.0.0 4420 || fail "nvmet configfs export"
wait_host io-done
# The host sends "check SLBA:BLOCKS ..."; print the sha256 of each range of /dev/ram0.
case "$_reply" in check*) ;; *) fail "the host gave up: $_reply" ;; esac
i=0
for r in $_reply; do
    [ "$r" = check ] && continue
    section sum_$i sh -c "dd if=/dev/ram0 bs=512 skip=${{r%%:*}} count=${{r##*:}} 2>/dev/null | sha256sum"
    i=$((i + 1))
done
"#,
        kib = NS_BYTES >> 10,
    );
    let _one = guest::exclusive();
    let host_port = guest::free_local_port().unwrap();
    let config = GuestConfig::new("kernel-target", script)
        .forward(host_port, 4420)
        .timeout(Duration::from_secs(180));
    let mut running = ok(env().start(config));
    ok(running.wait_for_prompt("io-done", Duration::from_secs(150)));

    // Between our host and QEMU's port forward the traffic is plain NVMe/TCP on lo:
    // Wireshark checks the kernel's digests and ours.
    let capture_dir = std::env::temp_dir().join(format!("kernel-target-{}", std::process::id()));
    fs::create_dir_all(&capture_dir).unwrap();
    let capture = Capture::start(&capture_dir.join("kernel-target.pcapng"), host_port)
        .unwrap_or_else(|e| panic!("{e}"));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{host_port}").parse().unwrap();
    let rt = runtime();
    let outcome: Result<String, String> = rt.block_on(async {
        let entries = discover(addr, None, Duration::from_secs(30))
            .await
            .map_err(|e| format!("discovery: {e}"))?;
        if !entries.iter().any(|e| e.subnqn == nqn) {
            return Err(format!("{nqn} not in the discovery log: {entries:?}"));
        }
        let mut hc = HostConfig::new(addr, nqn);
        hc.header_digest = true;
        hc.data_digest = true;
        hc.io_queues = 2;
        // The target is an emulated CPU that shares 2 cores with everything else: give
        // the TCP connect and ICReq/ICResp more than the default 5 s.
        hc.connect_timeout = Duration::from_secs(30);
        let ctrl = Controller::connect(hc)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let id = ctrl
            .identify()
            .await
            .map_err(|e| format!("identify: {e}"))?;
        if id.subnqn != nqn || id.nn < 1 || id.mn.trim().is_empty() {
            return Err(format!("odd Identify Controller: {id:?}"));
        }
        let ns = ctrl
            .namespace(1)
            .await
            .map_err(|e| format!("namespace 1: {e}"))?;
        if u64::from(ns.block_size) * ns.blocks != NS_BYTES {
            return Err(format!(
                "namespace 1 is {} x {} bytes",
                ns.blocks, ns.block_size
            ));
        }
        let queues = ctrl.io_queue_count().await.map_err(|e| e.to_string())?;
        if queues != 2 {
            return Err(format!("asked for 2 I/O queues, got {queues}"));
        }
        let bs = u64::from(ns.block_size);
        let lba = |slba: u64| slba * 512 / bs;
        let blocks = |bytes: usize| u32::try_from(u64::try_from(bytes).unwrap() / bs).unwrap();

        // All writes in flight at once, spread over both queues.
        let writes = extents.iter().map(|&e| {
            let ctrl = ctrl.clone();
            let data = Bytes::from(pattern(TAG, e.slba, e.bytes));
            let slba = lba(e.slba);
            async move {
                ctrl.write(e.queue, 1, slba, data, false)
                    .await
                    .map_err(|err| format!("write {e:?}: {err}"))
            }
        });
        for r in futures_join_all(writes).await {
            r?;
        }
        ctrl.flush(0, 1).await.map_err(|e| format!("flush: {e}"))?;
        for e in &extents {
            let got = ctrl
                .read(1 - e.queue, 1, lba(e.slba), blocks(e.bytes))
                .await
                .map_err(|err| format!("read {e:?}: {err}"))?;
            if got.as_ref() != pattern(TAG, e.slba, e.bytes).as_slice() {
                return Err(format!("read-back of {e:?} differs from what was written"));
            }
        }
        // Never written: brd returns zeroes.
        let hole = ctrl
            .read(0, 1, lba(1 << 16), blocks(64 << 10))
            .await
            .map_err(|e| format!("read of an unwritten range: {e}"))?;
        if hole.iter().any(|&b| b != 0) {
            return Err("an unwritten range did not read as zeroes".into());
        }
        ctrl.shutdown()
            .await
            .map_err(|e| format!("shutdown: {e}"))?;
        let ranges: Vec<String> = extents
            .iter()
            .map(|e| format!("{}:{}", e.slba, e.bytes / 512))
            .collect();
        Ok(format!("check {}", ranges.join(" ")))
    });
    let check = match outcome {
        Ok(line) => line,
        Err(e) => {
            // Let the guest print its kernel log before reporting.
            let _ = running.send_line("abort");
            match running.finish() {
                Ok(run) => panic!("our host against the kernel target: {e}\n{}", run.report()),
                Err(guest) => panic!("our host against the kernel target: {e}\n{guest}"),
            }
        }
    };
    let pcap = capture.stop().unwrap_or_else(|e| panic!("{e}"));
    let d = dissect(&pcap, host_port).unwrap_or_else(|e| panic!("{e}"));
    let summary = format!("{}\ncapture: {}", d.summary(), pcap.display());
    eprintln!("{summary}");
    assert_digests_good(&d, &summary);
    let _ = fs::remove_dir_all(&capture_dir);
    ok(running.send_line(&check));
    let run = ok(running.finish());
    timings(&run);
    ok(run.check());
    for (i, e) in extents.iter().enumerate() {
        let out = ok(run.output(&format!("sum_{i}")));
        let guest_sum = out.split_whitespace().next().unwrap_or_default();
        assert_eq!(
            guest_sum,
            sha256_hex(&pattern(TAG, e.slba, e.bytes)),
            "the guest's RAM disk does not hold what we wrote at {e:?}"
        );
    }
    let dmesg = ok(run.output("dmesg"));
    for line in dmesg.lines().filter(|l| l.contains("nvmet")) {
        assert!(
            !line.contains("digest") && !line.contains("error") && !line.contains("failed"),
            "the kernel target complained: {line}\n{}",
            run.report()
        );
    }
}

/// Awaits all futures concurrently (tokio's `join!` needs a fixed count).
async fn futures_join_all<F, T>(futures: impl IntoIterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
