//! Real peers: the Linux kernel's NVMe/TCP host and target, in a QEMU guest, against our
//! target and host (docs/testing.md). Ignored in a plain `cargo test`; `scripts/test`
//! runs them with `--ignored` after `cargo build --workspace --bins`.

use std::time::Duration;

use testbed::guest::{self, GuestConfig, GuestEnv, GuestRun};

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
    --verify_fatal=1
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
    let fio = ok(run.output("fio"));
    assert!(fio.contains("err= 0"), "fio:\n{fio}");
}
