//! dpud's NVMe/TCP front-end against the Linux kernel's nvme-tcp host in a QEMU guest
//! (TCG, the stock Debian cloud kernel): a testbed of 8 storage nodes and the real
//! dpud, an ec:4+2 volume with zstd and AES-256-GCM exported over NVMe/TCP to the
//! guest's host NQN and over NBD to this process. The guest connects, its Identify
//! data and the block queue limits the kernel derived from them are checked, fio
//! verifies crc32c on /dev/nvme0n1, again while a storage node is SIGKILLed mid-run,
//! and the bytes written through one front-end read back identically through the
//! other. A host NQN outside the export's allow-list is refused. Then `dpuctl volume
//! resize` grows the volume while the guest stays connected: the kernel gets the
//! Namespace Attribute Changed event, rescans, and /dev/nvme0n1 takes the new size
//! within seconds; fio verifies writes across the old end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::Value;
use testbed::guest::{self, GuestConfig, GuestEnv, HOST_ADDR_FROM_GUEST};

const MIB: u64 = 1 << 20;
/// Where this process writes through NBD before the guest boots (two patterns).
const NBD_REGION: u64 = 40 * MIB;
/// fio's regions: verify pass, then the pass with the node kill.
const FIO1: (u64, u64) = (0, 12 * MIB);
const FIO2: (u64, u64) = (16 * MIB, 8 * MIB);
/// The volume's size, then its size after `volume resize`.
const OLD_SIZE: u64 = 64 * MIB;
const NEW_SIZE: u64 = 80 * MIB;
/// fio's region across the old end once the volume has grown.
const FIO3: (u64, u64) = (OLD_SIZE - MIB, 5 * MIB);
const STRANGER: &str = "nqn.2014-08.org.nvmexpress:uuid:5f1c0de2-7a0b-4c55-9d1e-0badbadbad02";

/// One binary of a workspace package: the sibling of this test executable when it is
/// newer than the sources, else built here (as testbed/tests/e2e_dpud.rs does).
mod guest_e2e;
mod workspace_bins;
use guest_e2e::*;

#[test]
#[ignore = "needs QEMU, the guest kernel and fio; a few minutes; run by scripts/test"]
fn kernel_host_over_dpud_nvme_tcp_export() {
    let t0 = Instant::now();
    let bed = Bed::new("e2e-nvme");
    bed.testbed(&[
        "up",
        "--nodes",
        "8",
        "--domains",
        "4",
        "--node-size",
        "256MiB",
    ]);
    bed.dpuctl(&[
        "volume",
        "create",
        "nv",
        "--profile",
        "tb-ec42-zstd-aes",
        "--size",
        "64MiB",
    ]);
    assert_eq!(OLD_SIZE, 64 * MIB);
    let e: Value = serde_json::from_str(&bed.dpuctl(&[
        "-o",
        "json",
        "export",
        "add",
        "nv",
        "--type",
        "nvme-tcp",
        "--allow-host",
        guest::GUEST_HOSTNQN,
    ]))
    .unwrap();
    assert_eq!(e["served"], true, "{e}");
    let subnqn = e["nvme_subnqn"].as_str().unwrap().to_owned();
    assert_eq!(subnqn, "nqn.2026-11.io.dpu-offload:export:nv");
    let addr: std::net::SocketAddr = e["nvme_address"].as_str().unwrap().parse().unwrap();
    bed.dpuctl(&["export", "add", "nv", "--type", "nbd", "--name", "nv-nbd"]);
    let list = bed.dpuctl(&["export", "list"]);
    assert!(
        list.contains(&format!("-s {} -n {subnqn}", addr.port())),
        "{list}"
    );

    // NBD -> NVMe/TCP: two patterns written here, hashed by the guest.
    let uri = bed.nbd_uri("nv-nbd");
    let half = NBD_REGION + MIB / 2;
    bed.qemu(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -P 0xa5 {NBD_REGION} 512k"),
            "-c",
            &format!("write -P 0x3c {half} 512k"),
            "-c",
            "flush",
            &uri,
        ],
    );
    let mut expect = vec![0xa5u8; 512 * 1024];
    expect.extend(vec![0x3cu8; 512 * 1024]);
    let expect_sha = testbed::testdata::sha256_hex(&expect).unwrap();
    eprintln!("[{:?}] testbed up, volume exported", t0.elapsed());

    let script = format!(
        r#"
a={host} s={port} nqn={subnqn}
section stranger nvme connect -t tcp -a $a -s $s -n $nqn --hostnqn={stranger}
must connect nvme connect -t tcp -a $a -s $s -n $nqn
wait_for_path /dev/nvme0n1 100 || fail "no /dev/nvme0n1 10 s after connect"
must id_ctrl nvme id-ctrl /dev/nvme0 -o json
must id_ns nvme id-ns /dev/nvme0n1 -o json
must sectors cat /sys/block/nvme0n1/size
must lbs cat /sys/block/nvme0n1/queue/logical_block_size
must io_min cat /sys/block/nvme0n1/queue/minimum_io_size
must io_opt cat /sys/block/nvme0n1/queue/optimal_io_size
must chunk cat /sys/block/nvme0n1/queue/chunk_sectors
must discard cat /sys/block/nvme0n1/queue/discard_max_bytes
must wcache cat /sys/block/nvme0n1/queue/write_cache
must ro cat /sys/block/nvme0n1/ro
must queues cat /sys/class/nvme/nvme0/queue_count
must nbd_region sh -c "dd if=/dev/nvme0n1 bs=1M skip={nbd_mib} count=1 2>/dev/null | sha256sum"
must fio fio --name=verify --filename=/dev/nvme0n1 --direct=1 --ioengine=libaio \
    --iodepth=16 --rw=randwrite --bssplit=4k/30:8k/20:32k/20:64k/15:128k/15 \
    --offset={fio1_off} --size={fio1_len} --verify=crc32c --verify_fatal=1 --output-format=json
wait_host kill
must fio_kill fio --name=nodekill --filename=/dev/nvme0n1 --direct=1 --ioengine=libaio \
    --iodepth=16 --rw=randwrite --bs=4k --rate=1m --offset={fio2_off} --size={fio2_len} \
    --verify=crc32c --verify_fatal=1 --output-format=json
must discard_range blkdiscard -o {discard_off} -l 1048576 /dev/nvme0n1
must discarded sh -c "dd if=/dev/nvme0n1 bs=1M skip={discard_mib} count=1 2>/dev/null | sha256sum"
must fio_region sh -c "dd if=/dev/nvme0n1 bs=1M count={fio_mib} 2>/dev/null | sha256sum"
wait_host resize
must grown sh -c 'i=0; while [ "$(cat /sys/block/nvme0n1/size)" != {new_sectors} ]; do i=$((i + 1)); [ $i -gt 100 ] && exit 1; sleep 0.1; done; echo "$i tenths"'
must id_ns_grown nvme id-ns /dev/nvme0n1 -o json
must fio_grown fio --name=grown --filename=/dev/nvme0n1 --direct=1 --ioengine=libaio \
    --iodepth=8 --rw=write --bs=64k --offset={fio3_off} --size={fio3_len} \
    --verify=crc32c --verify_fatal=1 --output-format=json
must disconnect nvme disconnect -n $nqn
"#,
        host = HOST_ADDR_FROM_GUEST,
        port = addr.port(),
        stranger = STRANGER,
        nbd_mib = NBD_REGION / MIB,
        fio1_off = FIO1.0,
        fio1_len = FIO1.1,
        fio2_off = FIO2.0,
        fio2_len = FIO2.1,
        discard_off = 30 * MIB,
        discard_mib = 30,
        fio_mib = (FIO2.0 + FIO2.1) / MIB,
        new_sectors = NEW_SIZE / 512,
        fio3_off = FIO3.0,
        fio3_len = FIO3.1,
    );
    let _one = guest::exclusive();
    let env = GuestEnv::discover().unwrap_or_else(|e| panic!("{e}"));
    let config = GuestConfig::new("dpud-nvme-tcp", script).timeout(Duration::from_secs(420));
    let mut running = ok(env.start(config));
    ok(running.wait_for_prompt("kill", Duration::from_secs(300)));
    eprintln!(
        "[{:?}] first fio passed; killing node2 under the second",
        t0.elapsed()
    );
    ok(running.send_line("go"));
    std::thread::sleep(Duration::from_secs(3));
    bed.testbed(&["fault", "kill", "node2"]);
    let t_kill = Instant::now();
    ok(running.wait_for_prompt("resize", Duration::from_secs(300)));
    eprintln!(
        "[{:?}] second fio passed ({:?} after the kill); growing the volume",
        t0.elapsed(),
        t_kill.elapsed()
    );
    bed.dpuctl(&["volume", "resize", "nv", "--size", "80MiB"]);
    let t_resize = Instant::now();
    ok(running.send_line("go"));
    let run = running
        .finish()
        .unwrap_or_else(|e| panic!("{e}\n{}", bed.dpud_log_tail()));
    eprintln!(
        "[{:?}] guest done ({:?} after the resize); {}",
        t0.elapsed(),
        t_resize.elapsed(),
        run.timings()
    );
    if let Err(e) = run.check() {
        panic!("{e}\n{}", bed.dpud_log_tail());
    }

    // The allow-list.
    let stranger = ok(run.section("stranger"));
    assert_ne!(
        stranger.rc,
        Some(0),
        "a host outside the allow-list connected:\n{}",
        stranger.output
    );
    // The kernel prints this for Connect Invalid Host (SCT 1h, SC 84h) only.
    let console = std::fs::read_to_string(&run.log_path).unwrap();
    assert!(
        console.contains(&format!("is not allowed, hostnqn: {STRANGER}")),
        "the kernel did not see Connect Invalid Host for the stranger"
    );

    // Identify, as nvme-cli decodes it.
    let ctrl = json(&run, "id_ctrl");
    assert_eq!(ctrl["subnqn"].as_str(), Some(subnqn.as_str()), "{ctrl}");
    assert_eq!(num(&ctrl, "nn"), 1, "{ctrl}");
    assert_eq!(num(&ctrl, "vwc") & 1, 0, "no volatile write cache: {ctrl}");
    assert_eq!(
        num(&ctrl, "oncs") & 0b1100,
        0b1100,
        "DSM and Write Zeroes: {ctrl}"
    );
    assert_eq!(num(&ctrl, "mdts"), 5, "128 KiB MDTS in 4 KiB pages: {ctrl}");
    assert_eq!(
        ctrl["mn"].as_str().map(str::trim),
        Some("dpu-offload dpud volume")
    );
    let ns = json(&run, "id_ns");
    let flbas = usize::try_from(num(&ns, "flbas") & 0xf).unwrap();
    let lbaf = &ns["lbafs"][flbas];
    assert_eq!(num(lbaf, "ds"), 12, "4 KiB LBAs: {ns}");
    assert_eq!(num(&ns, "nsze"), OLD_SIZE / 4096, "{ns}");
    assert_eq!(num(&ns, "nsattr") & 1, 0, "{ns}");
    assert_eq!(num(&ns, "nsfeat") & (1 << 4), 1 << 4, "OPTPERF: {ns}");
    // The profile's 32 KiB compression unit and its 4-strip rows.
    assert_eq!(num(&ns, "npwg"), 7, "{ns}");
    assert_eq!(num(&ns, "npwa"), 7, "{ns}");
    assert_eq!(num(&ns, "noiob"), 8, "{ns}");
    let nows = num(&ns, "nows") + 1;
    assert!(nows % 4 == 0 && nows > 8, "NOWS {nows} blocks: {ns}");
    // What the kernel made of it.
    assert_eq!(sysfs(&run, "sectors") * 512, 64 * MIB);
    assert_eq!(sysfs(&run, "lbs"), 4096);
    assert_eq!(sysfs(&run, "io_min"), 32 * 1024);
    assert_eq!(sysfs(&run, "io_opt"), nows * 4096);
    assert_eq!(sysfs(&run, "chunk"), 32 * 1024 / 512);
    assert!(sysfs(&run, "discard") > 0, "discard not enabled");
    assert_eq!(ok(run.output("wcache")).trim(), "write through");
    assert_eq!(sysfs(&run, "ro"), 0);
    assert!(
        sysfs(&run, "queues") >= 2,
        "no I/O queue besides the admin queue"
    );

    // fio: bytes moved and verified (fio exits 0 having done nothing when the region
    // lies outside the device).
    let (w1, r1, _) = fio_job(&run, "fio");
    assert!(w1 >= FIO1.1 && r1 >= w1, "fio wrote {w1}, verified {r1}");
    let (w2, r2, ms) = fio_job(&run, "fio_kill");
    assert!(
        w2 == FIO2.1 && r2 == w2,
        "fio across the kill wrote {w2}, verified {r2}"
    );
    // At 1 MiB/s the write phase alone lasts about 8 s: node2 died inside it.
    assert!(ms > 6000, "fio across the kill ran only {ms} ms");

    // The resize: the kernel took the new size on the Namespace Attribute Changed
    // event (it logs the rescan and the capacity change), without reconnecting.
    let grown = ok(run.output("grown"));
    eprintln!("the guest saw the new size after {}", grown.trim());
    assert!(
        console.contains("rescanning namespaces"),
        "the kernel did not rescan on the event"
    );
    assert!(
        console.contains(&format!(
            "detected capacity change from {} to {}",
            OLD_SIZE / 512,
            NEW_SIZE / 512
        )),
        "the kernel did not report the capacity change"
    );
    let ns_grown = json(&run, "id_ns_grown");
    assert_eq!(num(&ns_grown, "nsze"), NEW_SIZE / 4096, "{ns_grown}");
    assert_eq!(num(&ns_grown, "ncap"), NEW_SIZE / 4096, "{ns_grown}");
    let (w3, r3, _) = fio_job(&run, "fio_grown");
    assert!(
        w3 == FIO3.1 && r3 == w3,
        "fio across the old end wrote {w3}, verified {r3}"
    );

    // NBD -> NVMe/TCP.
    assert_eq!(
        guest_sha(&run, "nbd_region"),
        expect_sha,
        "NBD-written bytes"
    );
    // Discard: the range reads as zeroes.
    assert_eq!(
        guest_sha(&run, "discarded"),
        testbed::testdata::sha256_hex(&vec![0u8; 1 << 20]).unwrap()
    );
    // NVMe/TCP -> NBD: everything fio wrote, read through the NBD export.
    let img = bed.workdir().join("nv.raw");
    bed.qemu(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            img.to_str().unwrap(),
        ],
    );
    let data = std::fs::read(&img).unwrap();
    let fio_end = usize::try_from(FIO2.0 + FIO2.1).unwrap();
    assert_eq!(
        testbed::testdata::sha256_hex(&data[..fio_end]).unwrap(),
        guest_sha(&run, "fio_region"),
        "the bytes the guest wrote over NVMe/TCP differ through NBD"
    );
    let nbd = usize::try_from(NBD_REGION).unwrap();
    assert_eq!(&data[nbd..nbd + (1 << 20)], &expect[..]);
    eprintln!("[{:?}] done", t0.elapsed());
}
