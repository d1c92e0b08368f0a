//! dpud's vhost-user-blk front-end against QEMU's vhost-user-blk-pci and the Linux
//! kernel's virtio_blk in a QEMU guest (TCG, the stock Debian cloud kernel, guest RAM
//! on a shared memfd): a testbed of 8 storage nodes and the real dpud, an ec:4+2 volume
//! with zstd and AES-256-GCM exported as a vhost-user-blk socket and over NBD to this
//! process. The guest sees /dev/vda with the volume's size and two queues, fio verifies
//! crc32c with one job per queue, blkdiscard leaves zeroes, and a second boot of the
//! guest reconnects to the same socket and reads the same bytes. Bytes written through
//! one front-end read back identically through the other. Then `dpuctl volume resize`
//! grows the volume under the running guest: dpud's config-change notice reaches the
//! guest's virtio_blk through QEMU, /dev/vda grows, and fio writes and verifies past
//! the old end (read back through NBD too). The second boot's QEMU reads 96 MiB when
//! it creates the device; the volume then grows to 128 MiB before the guest loads
//! virtio_blk: QEMU drops the notice (its device is not started), and dpud sends it
//! again when QEMU starts the device, so the guest ends up with 128 MiB.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use testbed::guest::{self, GuestConfig, GuestEnv};

const MIB: u64 = 1 << 20;
/// Where this process writes through NBD before the guest boots.
const NBD_REGION: u64 = 40 * MIB;
/// What fio writes and verifies (two jobs, one per queue, 6 MiB each).
const FIO_MIB: u64 = 12;
/// The range the guest discards.
const DISCARD_MIB: u64 = 30;
/// The region both boots hash.
const REGION_MIB: u64 = 48;
/// The volume's size, its size after the resize under the running guest, and after the
/// one while the second guest's driver is not loaded yet.
const SIZE_MIB: u64 = 64;
const GROWN_MIB: u64 = 96;
const GROWN2_MIB: u64 = 128;
/// What the guest writes past the old end.
const GROWN_WRITE_MIB: u64 = 4;

/// One binary of a workspace package: the sibling of this test executable when it is
/// newer than the sources, else built here (as testbed/tests/e2e_dpud.rs does).
mod guest_e2e;
mod workspace_bins;
use guest_e2e::*;

fn guest_config(name: &str, script: String, socket: &Path) -> GuestConfig {
    let mut cfg = GuestConfig::new(name, script).timeout(Duration::from_secs(360));
    cfg.qemu_args = [
        "-object".to_string(),
        format!(
            "memory-backend-memfd,id=mem0,size={}M,share=on",
            cfg.memory_mib
        ),
        "-machine".to_string(),
        "memory-backend=mem0".to_string(),
        "-chardev".to_string(),
        format!("socket,id=vub,path={}", socket.display()),
        "-device".to_string(),
        "vhost-user-blk-pci,chardev=vub,num-queues=2".to_string(),
    ]
    .to_vec();
    cfg
}

#[test]
#[ignore = "needs QEMU, the guest kernel and fio; a few minutes; run by scripts/test"]
fn qemu_guest_over_dpud_vhost_user_blk_export() {
    let t0 = Instant::now();
    let bed = Bed::new("e2e-vub");
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
        "vv",
        "--profile",
        "tb-ec42-zstd-aes",
        "--size",
        &format!("{SIZE_MIB}MiB"),
    ]);
    let e: Value = serde_json::from_str(&bed.dpuctl(&[
        "-o",
        "json",
        "export",
        "add",
        "vv",
        "--type",
        "vhost-user-blk",
    ]))
    .unwrap();
    assert_eq!(e["served"], true, "{e}");
    let socket = bed.workdir().join("daemon/vhost/vv.sock");
    assert_eq!(e["detail"].as_str(), Some(socket.to_str().unwrap()), "{e}");
    bed.dpuctl(&["export", "add", "vv", "--type", "nbd", "--name", "vv-nbd"]);

    // NBD -> vhost-user-blk: a pattern written here, hashed by the guest.
    let uri = bed.nbd_uri("vv-nbd");
    bed.qemu(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -P 0xa5 {NBD_REGION} 1M"),
            "-c",
            "flush",
            &uri,
        ],
    );
    let expect = vec![0xa5u8; 1 << 20];
    eprintln!("[{:?}] testbed up, volume exported", t0.elapsed());

    let script = format!(
        r#"
modprobe virtio_blk 2>/dev/null
wait_for_path /dev/vda 100 || fail "no /dev/vda"
must sectors cat /sys/block/vda/size
must lbs cat /sys/block/vda/queue/logical_block_size
must queues sh -c "ls /sys/block/vda/mq | wc -l"
must wcache cat /sys/block/vda/queue/write_cache
must discard cat /sys/block/vda/queue/discard_max_bytes
must serial cat /sys/block/vda/serial
must nbd_region sh -c "dd if=/dev/vda bs=1M skip={nbd_mib} count=1 2>/dev/null | sha256sum"
must fio fio --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio \
    --iodepth=16 --rw=randwrite --bssplit=4k/30:8k/20:32k/20:64k/15:128k/15 \
    --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \
    --size={job_mib}M --offset_increment={job_mib}M --verify=crc32c --verify_fatal=1 \
    --group_reporting --output-format=json
must discard_range blkdiscard -o {discard_off} -l 1048576 /dev/vda
must discarded sh -c "dd if=/dev/vda bs=1M skip={discard_mib} count=1 2>/dev/null | sha256sum"
must region sh -c "dd if=/dev/vda bs=1M count={region_mib} 2>/dev/null | sha256sum"
wait_host resize
must resized sh -c 'i=0; while [ "$(cat /sys/block/vda/size)" -lt {grown_sectors} ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done; echo "$(cat /sys/block/vda/size) $i"'
must grown_fio fio --name=grown --filename=/dev/vda --direct=1 --ioengine=libaio \
    --iodepth=8 --rw=write --bs=64k --offset={size_mib}M --size={grown_write_mib}M \
    --verify=crc32c --verify_fatal=1 --output-format=json
must grown sh -c "dd if=/dev/vda bs=1M skip={size_mib} count={grown_write_mib} 2>/dev/null | sha256sum"
"#,
        grown_sectors = GROWN_MIB * MIB / 512,
        size_mib = SIZE_MIB,
        grown_write_mib = GROWN_WRITE_MIB,
        nbd_mib = NBD_REGION / MIB,
        job_mib = FIO_MIB / 2,
        discard_off = DISCARD_MIB * MIB,
        discard_mib = DISCARD_MIB,
        region_mib = REGION_MIB,
    );
    let _one = guest::exclusive();
    let env = GuestEnv::discover().unwrap_or_else(|e| panic!("{e}"));
    let mut running = env
        .start(guest_config("dpud-vhost-1", script, &socket))
        .unwrap_or_else(|e| panic!("{e}\n{}", bed.dpud_log_tail()));
    if let Err(e) = running.wait_for_prompt("resize", Duration::from_secs(300)) {
        panic!("{e}\n{}", bed.dpud_log_tail());
    }
    // Grown under the running guest, its disk in use until a moment ago.
    let t_resize = Instant::now();
    bed.dpuctl(&[
        "volume",
        "resize",
        "vv",
        "--size",
        &format!("{GROWN_MIB}MiB"),
    ]);
    eprintln!(
        "[{:?}] volume resized to {GROWN_MIB} MiB in {:?}",
        t0.elapsed(),
        t_resize.elapsed()
    );
    ok(running.send_line("go"));
    let run = running
        .finish()
        .unwrap_or_else(|e| panic!("{e}\n{}", bed.dpud_log_tail()));
    eprintln!(
        "[{:?}] first boot done ({:?} after the resize); {}",
        t0.elapsed(),
        t_resize.elapsed(),
        run.timings()
    );
    if let Err(e) = run.check() {
        panic!("{e}\n{}", bed.dpud_log_tail());
    }
    assert_eq!(sysfs(&run, "sectors") * 512, SIZE_MIB * MIB);
    assert_eq!(sysfs(&run, "lbs"), 4096);
    assert_eq!(
        sysfs(&run, "queues"),
        2,
        "two virtqueues, two blk-mq queues"
    );
    assert_eq!(ok(run.output("wcache")).trim(), "write through");
    assert!(sysfs(&run, "discard") > 0, "discard not enabled");
    assert_eq!(ok(run.output("serial")).trim(), "dpud-vv");
    assert_eq!(
        guest_sha(&run, "nbd_region"),
        testbed::testdata::sha256_hex(&expect).unwrap(),
        "NBD-written bytes through vhost-user-blk"
    );
    let (w, r, _) = fio_job(&run, "fio");
    assert!(w >= FIO_MIB * MIB && r >= w, "fio wrote {w}, verified {r}");
    let zeroes = testbed::testdata::sha256_hex(&vec![0u8; 1 << 20]).unwrap();
    assert_eq!(guest_sha(&run, "discarded"), zeroes, "discarded range");
    let region = guest_sha(&run, "region");
    // The resize as the guest saw it: /dev/vda's size, and the tenths of a second it
    // waited for it after the host said the volume had grown.
    let resized = ok(run.output("resized"));
    let (sectors, tenths) = resized
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("resized: {resized:?}"));
    assert_eq!(
        sectors.parse::<u64>().unwrap() * 512,
        GROWN_MIB * MIB,
        "the guest's disk did not grow (waited {tenths} tenths of a second)\n{}",
        bed.dpud_log_tail()
    );
    eprintln!("guest saw the new size after polling {tenths} x 0.1 s");
    let (w, r, _) = fio_job(&run, "grown_fio");
    assert!(
        w >= GROWN_WRITE_MIB * MIB && r >= w,
        "fio past the old end wrote {w}, verified {r}"
    );
    let grown = guest_sha(&run, "grown");

    // vhost-user-blk -> NBD: the same bytes.
    let img = bed.workdir().join("vv.raw");
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
    let end = usize::try_from(REGION_MIB * MIB).unwrap();
    assert_eq!(
        testbed::testdata::sha256_hex(&data[..end]).unwrap(),
        region,
        "the bytes the guest wrote over vhost-user-blk differ through NBD"
    );
    assert_eq!(data.len() as u64, GROWN_MIB * MIB, "NBD sees the new size");
    let (from, to) = (
        usize::try_from(SIZE_MIB * MIB).unwrap(),
        usize::try_from((SIZE_MIB + GROWN_WRITE_MIB) * MIB).unwrap(),
    );
    assert_eq!(
        testbed::testdata::sha256_hex(&data[from..to]).unwrap(),
        grown,
        "the bytes the guest wrote past the old end differ through NBD"
    );

    // A second QEMU on the same socket (dpud kept listening) reads the same data, and
    // sees the volume grown while its guest had not started the device.
    let script2 = format!(
        r#"
wait_host resize2
modprobe virtio_blk 2>/dev/null
wait_for_path /dev/vda 100 || fail "no /dev/vda"
must sectors sh -c 'i=0; while [ "$(cat /sys/block/vda/size)" -lt {grown2_sectors} ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done; echo "$(cat /sys/block/vda/size) $i"'
must region sh -c "dd if=/dev/vda bs=1M count={REGION_MIB} 2>/dev/null | sha256sum"
"#,
        grown2_sectors = GROWN2_MIB * MIB / 512,
    );
    let mut running = env
        .start(guest_config("dpud-vhost-2", script2, &socket))
        .unwrap_or_else(|e| panic!("{e}\n{}", bed.dpud_log_tail()));
    if let Err(e) = running.wait_for_prompt("resize2", Duration::from_secs(300)) {
        panic!("{e}\n{}", bed.dpud_log_tail());
    }
    // QEMU has read the config space (96 MiB); the guest has no virtio_blk yet.
    bed.dpuctl(&[
        "volume",
        "resize",
        "vv",
        "--size",
        &format!("{GROWN2_MIB}MiB"),
    ]);
    ok(running.send_line("go"));
    let run2 = running
        .finish()
        .unwrap_or_else(|e| panic!("{e}\n{}", bed.dpud_log_tail()));
    if let Err(e) = run2.check() {
        panic!("{e}\n{}", bed.dpud_log_tail());
    }
    assert_eq!(guest_sha(&run2, "region"), region, "second boot");
    let sectors = ok(run2.output("sectors"));
    let (sectors, tenths) = sectors
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("sectors: {sectors:?}"));
    assert_eq!(
        sectors.parse::<u64>().unwrap() * 512,
        GROWN2_MIB * MIB,
        "second boot: grown before the driver started the device (waited {tenths} tenths of a second)\n{}",
        bed.dpud_log_tail()
    );
    eprintln!(
        "[{:?}] second boot done; grown to {GROWN2_MIB} MiB after polling {tenths} x 0.1 s; {}",
        t0.elapsed(),
        run2.timings()
    );
    let list = bed.dpuctl(&["export", "list"]);
    assert!(list.contains("vv.sock"), "{list}");
    eprintln!("[{:?}] done", t0.elapsed());
}
