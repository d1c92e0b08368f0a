//! The shard conformance suite against a target we did not write: `NvmeShard` (our
//! host library underneath) on a namespace that the Linux kernel's nvmet-tcp exports
//! from a RAM disk in a QEMU guest. If our LBA arithmetic, splitting or error mapping
//! only worked against our own target, this is where it shows. Ignored in a plain
//! `cargo test`; `scripts/test` runs it with `--ignored` (see docs/testing.md).

// Test code: a panic is a failed test with its message.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use engine::shard::{conformance, NvmeShard, NvmeShardConfig, ShardStore};
use testbed::guest::{self, GuestConfig, GuestEnv};

const NS_BYTES: u64 = 16 << 20;
/// Where the final check writes, in bytes, and how much.
const CHECK_AT: u64 = 3 << 20;
const CHECK_LEN: usize = 256 << 10;

/// Bytes that differ at every position and between tags.
fn pattern(tag: u64, len: usize) -> Vec<u8> {
    testbed::testdata::xorshift_bytes(tag, len)
}

fn sha256_hex(data: &[u8]) -> String {
    testbed::testdata::sha256_hex(data).unwrap()
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panic".into()),
        Err(e) => e.to_string(),
    }
}

#[test]
#[ignore = "needs QEMU and the guest kernel; run by scripts/test"]
fn shard_conformance_against_kernel_nvmet() {
    let nqn = "nqn.2026-11.io.testbed:shard-conformance";
    let script = format!(
        r#"
must brd modprobe brd rd_nr=1 rd_size={kib} max_part=0
export_nvmet {nqn} /dev/ram0 0.0.0.0 4420 || fail "nvmet configfs export"
wait_host shard-done
case "$_reply" in check*) ;; *) fail "the host gave up: $_reply" ;; esac
section sum sh -c "dd if=/dev/ram0 bs=4096 skip={skip} count={count} 2>/dev/null | sha256sum"
"#,
        kib = NS_BYTES >> 10,
        skip = CHECK_AT / 4096,
        count = CHECK_LEN / 4096,
    );
    let _one = guest::exclusive();
    let host_port = guest::free_local_port().unwrap();
    let config = GuestConfig::new("shard-conformance", script)
        .forward(host_port, 4420)
        .timeout(Duration::from_secs(300));
    let env = GuestEnv::discover().unwrap_or_else(|e| panic!("{e}"));
    let mut running = env.start(config).unwrap_or_else(|e| panic!("{e}"));
    running
        .wait_for_prompt("shard-done", Duration::from_secs(150))
        .unwrap_or_else(|e| panic!("{e}"));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{host_port}").parse().unwrap();
    // The suite panics on a broken promise; run it in a task so that a failure still
    // lets the guest print its kernel log.
    let outcome = rt.block_on(async move {
        tokio::spawn(async move {
            let mut cfg = NvmeShardConfig::new("guest-nvmet", addr, nqn, 1);
            cfg.host.io_queues = 2;
            cfg.host.header_digest = true;
            cfg.host.data_digest = true;
            // An emulated CPU on a shared 2-core machine: generous limits.
            cfg.host.connect_timeout = Duration::from_secs(30);
            cfg.host.command_timeout = Duration::from_secs(60);
            let shard = NvmeShard::connect(cfg)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let info = shard.info().clone();
            assert_eq!(info.capacity_bytes, NS_BYTES, "{info:?}");
            assert!(
                info.block_size == 512 || info.block_size == 4096,
                "{info:?}"
            );
            eprintln!(
                "kernel nvmet namespace: {info:?}, transfer limit {:?}",
                shard.controller().max_transfer().await
            );
            conformance::run_all(&shard).await;
            // Bytes at a known place, for the guest to read back off its RAM disk.
            let data = pattern(0x5eed, CHECK_LEN);
            shard.write(CHECK_AT, data.clone(), true).await.unwrap();
            shard.flush().await.unwrap();
            assert!(shard.read(CHECK_AT, 256 << 10).await.unwrap() == data);
            shard.shutdown().await.unwrap();
        })
        .await
        .map_err(panic_text)
    });
    if let Err(e) = outcome {
        let _ = running.send_line("abort");
        match running.finish() {
            Ok(run) => panic!(
                "shard conformance against kernel nvmet: {e}\n{}",
                run.report()
            ),
            Err(g) => panic!("shard conformance against kernel nvmet: {e}\n{g}"),
        }
    }
    running.send_line("check").unwrap_or_else(|e| panic!("{e}"));
    let run = running.finish().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{} (console: {})", run.timings(), run.log_path.display());
    run.check().unwrap_or_else(|e| panic!("{e}"));
    let sum = run.output("sum").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        sum.split_whitespace().next().unwrap_or_default(),
        sha256_hex(&pattern(0x5eed, CHECK_LEN)),
        "the guest's RAM disk does not hold what the shard wrote at byte {CHECK_AT}"
    );
    let dmesg = run.output("dmesg").unwrap_or_else(|e| panic!("{e}"));
    for line in dmesg.lines().filter(|l| l.contains("nvmet")) {
        assert!(
            !line.contains("digest") && !line.contains("error") && !line.contains("failed"),
            "the kernel target complained: {line}\n{}",
            run.report()
        );
    }
}
