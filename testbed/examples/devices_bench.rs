//! fio inside one QEMU guest (TCG) against the host-facing devices, for
//! docs/benchmarks.md ("Host-facing devices (issue 6)"): dpud's vhost-user-blk and
//! NVMe/TCP exports of the same `tb-none` and `tb-ec42-zstd-aes` volumes on a testbed
//! of 8 nodes, and as peers `qemu-storage-daemon`'s vhost-user-blk export of a plain
//! file (the reference the issue names) and `nvmeof-target` serving a plain file over
//! NVMe/TCP (the same transport path without the engine; qemu-storage-daemon cannot
//! export NVMe/TCP). Every device is attached to the same boot and prefilled; then
//! each workload runs on every device in turn, in two rounds, so the machine's load
//! drifting (2 shared cores) hits the devices of a workload alike. Only the ratios
//! between devices mean anything: TCG emulates the guest's CPU, its virtio devices
//! and its network in software.
//!
//! Not a test: build the release binaries, then run it (root is not needed):
//!
//! ```sh
//! cargo build --release -p engine --bin dpud -p cli --bin dpuctl -p nvmeof --bin nvmeof-target -p testbed --bin testbed --example devices_bench
//! cargo run --release -p testbed --example devices_bench
//! ```
//!
//! It prints a markdown table of the measurements and one of the ratios to the peer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use testbed::guest::{self, GuestConfig, GuestEnv, HOST_ADDR_FROM_GUEST};

const SIZE_MIB: u64 = 256;
const RUNTIME: u32 = 10;
/// Every workload runs this many times on every device, interleaved.
const ROUNDS: usize = 2;

/// (name, fio arguments after the device); every device is prefilled first.
const WORKLOADS: &[(&str, &str)] = &[
    (
        "4k randwrite QD32",
        "--rw=randwrite --bs=4k --iodepth=32 --time_based",
    ),
    (
        "4k randread QD32",
        "--rw=randread --bs=4k --iodepth=32 --time_based",
    ),
    (
        "128k seq write QD8",
        "--rw=write --bs=128k --iodepth=8 --time_based",
    ),
    (
        "128k seq read QD8",
        "--rw=read --bs=128k --iodepth=8 --time_based",
    ),
];

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let p = dir.join(name);
    assert!(p.exists(), "{} missing: build it first", p.display());
    p
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// utime + stime of a process in seconds (/proc/PID/stat fields 14 and 15, which
/// cover all its threads), assuming the usual 100 ticks per second.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // After "pid (comm)", field 3 (state) is index 0, so utime (14) is index 11.
    f64::from(u32::try_from(ticks(11) + ticks(12)).unwrap_or(u32::MAX)) / 100.0
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How the guest reaches a device.
enum Attach {
    /// `nvme connect` to this subsystem NQN on the host's port.
    Nvme { nqn: String, port: u16 },
    /// The virtio disk with this serial (`None`: the one without a `dpud-` serial,
    /// qemu-storage-daemon's).
    Virtio { serial: Option<String> },
}

struct Device {
    name: String,
    attach: Attach,
    /// The process that serves it, for its CPU time per I/O.
    pid: u32,
    /// A run of the peer, which the ratios divide by.
    peer: bool,
}

/// Guest shell lines that set `$dev` to the device's node, or fail.
fn find_device(i: usize, attach: &Attach) -> String {
    match attach {
        Attach::Nvme { nqn, port } => format!(
            "must c{i} nvme connect -t tcp -a $a -s {port} -n {nqn}\n\
             dev=\n\
             for t in 1 2 3 4 5 6 7 8 9 10; do for c in /sys/class/nvme/nvme*; do \
               grep -qx {nqn} $c/subsysnqn 2>/dev/null && dev=/dev/$(basename $c)n1; done; \
               [ -n \"$dev\" ] && [ -e \"$dev\" ] && break; sleep 0.5; done\n\
             [ -n \"$dev\" ] || fail \"no device for {nqn}\"\n"
        ),
        Attach::Virtio { serial } => {
            let test = match serial {
                Some(s) => format!("[ \"$s\" = {s} ]"),
                None => "case \"$s\" in dpud-*) false;; *) true;; esac".to_owned(),
            };
            format!(
                "dev=\n\
                 for b in /sys/block/vd*; do s=$(cat $b/serial 2>/dev/null); \
                   if {test}; then dev=/dev/$(basename $b); fi; done\n\
                 [ -n \"$dev\" ] || fail \"no virtio disk for device {i}\"\n\
                 must n{i} echo $dev\n"
            )
        }
    }
}

fn main() {
    let dir = tempfile::Builder::new()
        .prefix("devices-bench")
        .tempdir()
        .unwrap();
    let work = dir.path();
    let dpuctl = bin("dpuctl");
    let testbed = |args: &[&str]| {
        run(Command::new(bin("testbed"))
            .arg("--workdir")
            .arg(work)
            .args(args)
            .env("TESTBED_DPUD", bin("dpud"))
            .env("TESTBED_DPUCTL", &dpuctl)
            .env("TESTBED_NVMEOF_TARGET", bin("nvmeof-target")))
    };
    let ctl = |args: &[&str]| {
        run(Command::new(&dpuctl)
            .arg("--socket")
            .arg(work.join("daemon/api.sock"))
            .args(args))
    };
    testbed(&[
        "up",
        "--nodes",
        "8",
        "--domains",
        "4",
        "--node-size",
        "1GiB",
    ]);
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("testbed.json")).unwrap()).unwrap();
    let dpud_pid = u32::try_from(state["daemon"]["process"]["pid"].as_u64().unwrap()).unwrap();

    // Peer: qemu-storage-daemon's vhost-user-blk export of a plain file.
    let qfile = work.join("qsd.img");
    std::fs::File::create(&qfile)
        .unwrap()
        .set_len(SIZE_MIB << 20)
        .unwrap();
    let qsd_sock = work.join("qsd.sock");
    let qsd = Killed(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={},cache.direct=off",
                qfile.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues=2",
                qsd_sock.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let qsd_device = || Device {
        name: "qemu-storage-daemon vhost-user-blk, plain file".into(),
        attach: Attach::Virtio { serial: None },
        pid: qsd.0.id(),
        peer: true,
    };
    let mut devices = vec![qsd_device()];
    let mut sockets = vec![qsd_sock.clone()];

    // dpud: each volume exported through both front-ends.
    let size = format!("{SIZE_MIB}MiB");
    let mut nvme = Vec::new();
    for (profile, short) in [("tb-none", "none"), ("tb-ec42-zstd-aes", "ec42")] {
        let vol = format!("b-{short}");
        ctl(&[
            "volume",
            "create",
            &vol,
            "--profile",
            profile,
            "--size",
            &size,
        ]);
        let vname = format!("vh-{short}");
        ctl(&[
            "export",
            "add",
            &vol,
            "--type",
            "vhost-user-blk",
            "--name",
            &vname,
        ]);
        sockets.push(work.join(format!("daemon/vhost/{vname}.sock")));
        devices.push(Device {
            name: format!("dpud vhost-user-blk, {profile}"),
            attach: Attach::Virtio {
                serial: Some(format!("dpud-{vname}")),
            },
            pid: dpud_pid,
            peer: false,
        });
        let e: Value = serde_json::from_str(&ctl(&[
            "-o",
            "json",
            "export",
            "add",
            &vol,
            "--type",
            "nvme-tcp",
            "--name",
            &format!("nv-{short}"),
            "--allow-host",
            guest::GUEST_HOSTNQN,
        ]))
        .unwrap();
        let addr: std::net::SocketAddr = e["nvme_address"].as_str().unwrap().parse().unwrap();
        nvme.push(Device {
            name: format!("dpud NVMe/TCP, {profile}"),
            attach: Attach::Nvme {
                nqn: e["nvme_subnqn"].as_str().unwrap().to_owned(),
                port: addr.port(),
            },
            pid: dpud_pid,
            peer: false,
        });
    }
    devices.append(&mut nvme);

    // Our node target on a plain file (NVMe/TCP without the engine).
    let plain = work.join("plain.img");
    std::fs::File::create(&plain)
        .unwrap()
        .set_len(SIZE_MIB << 20)
        .unwrap();
    let tport = free_port();
    let tnqn = "nqn.2026-11.io.testbed:bench-plain";
    let target = Killed(
        Command::new(bin("nvmeof-target"))
            .args(["--listen", &format!("127.0.0.1:{tport}")])
            .args(["--subsystem", tnqn, "--file"])
            .arg(&plain)
            .arg("--allow-any-host")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    devices.push(Device {
        name: "nvmeof-target NVMe/TCP, plain file".into(),
        attach: Attach::Nvme {
            nqn: tnqn.into(),
            port: tport,
        },
        pid: target.0.id(),
        peer: false,
    });
    for s in &sockets {
        for _ in 0..100 {
            if s.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(s.exists(), "{} never appeared", s.display());
    }
    std::thread::sleep(Duration::from_millis(300));

    // All devices attached and prefilled first; then each round runs each workload on
    // every device in turn, so a change in the machine's load hits every device of a
    // workload alike rather than whichever device was being measured.
    let mut script = String::from("a=") + HOST_ADDR_FROM_GUEST + "\n";
    script += &format!(
        "modprobe virtio_blk\nwait_for_path /dev/vd{} 100 || fail \"too few virtio disks\"\n",
        char::from(b'a' + u8::try_from(sockets.len() - 1).unwrap())
    );
    for (i, d) in devices.iter().enumerate() {
        script += &find_device(i, &d.attach);
        script += &format!(
            "d{i}=$dev\n\
             must p{i} fio --name=p --filename=$d{i} --direct=1 --ioengine=libaio --rw=write \
             --bs=1m --iodepth=4 --size={SIZE_MIB}M --output-format=json\n"
        );
    }
    for r in 0..ROUNDS {
        for (w, (_, job)) in WORKLOADS.iter().enumerate() {
            for i in 0..devices.len() {
                let tag = format!("r{r}d{i}w{w}");
                script += &format!(
                    "wait_host a{tag}\n\
                     must {tag} fio --name=b --filename=$d{i} --direct=1 --ioengine=libaio \
                     --numjobs=1 --size={SIZE_MIB}M --runtime={RUNTIME} {job} \
                     --output-format=json\n\
                     wait_host b{tag}\n"
                );
            }
        }
    }
    for d in &devices {
        if let Attach::Nvme { nqn, .. } = &d.attach {
            script += &format!("nvme disconnect -n {nqn}\n");
        }
    }

    let mut cfg = GuestConfig::new("devices-bench", script).timeout(Duration::from_secs(2400));
    cfg.qemu_args = vec![
        "-object".into(),
        "memory-backend-memfd,id=mem0,size=1024M,share=on".into(),
        "-machine".into(),
        "memory-backend=mem0".into(),
    ];
    for (n, s) in sockets.iter().enumerate() {
        cfg.qemu_args.extend([
            "-chardev".into(),
            format!("socket,id=vub{n},path={}", s.display()),
            "-device".into(),
            format!("vhost-user-blk-pci,chardev=vub{n},num-queues=2"),
        ]);
    }
    let _one = guest::exclusive();
    let env = GuestEnv::discover().unwrap_or_else(|e| panic!("{e}"));
    let started = std::time::SystemTime::now();
    let mut running = env.start(cfg).unwrap_or_else(|e| panic!("{e}"));
    // Server CPU seconds per (round, device, workload).
    let mut cpu = vec![vec![vec![0.0f64; WORKLOADS.len()]; devices.len()]; ROUNDS];
    for (r, per_round) in cpu.iter_mut().enumerate() {
        // Workloads outside, devices inside: the order the guest runs them in.
        #[allow(clippy::needless_range_loop)]
        for w in 0..WORKLOADS.len() {
            for (i, d) in devices.iter().enumerate() {
                let wait = |tag: String, g: &mut guest::RunningGuest| {
                    g.wait_for_prompt(&tag, Duration::from_secs(900))
                        .unwrap_or_else(|e| panic!("{e}"));
                    let c = cpu_seconds(d.pid);
                    g.send_line("go").unwrap_or_else(|e| panic!("{e}"));
                    c
                };
                let before = wait(format!("ar{r}d{i}w{w}"), &mut running);
                let after = wait(format!("br{r}d{i}w{w}"), &mut running);
                per_round[i][w] = after - before;
            }
        }
    }
    let r = running.finish().unwrap_or_else(|e| panic!("{e}"));
    r.check().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}", r.timings());
    eprintln!(
        "guest ran {:.0} s; load average now: {}",
        started.elapsed().unwrap_or_default().as_secs_f64(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    // IOPS per (round, device, workload).
    let mut iops = vec![vec![vec![0.0f64; WORKLOADS.len()]; devices.len()]; ROUNDS];
    println!(
        "| round | device | workload | IOPS | MB/s | p50 ms | p99 ms | p99.9 ms | server CPU µs/IO |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (round, per_round) in iops.iter_mut().enumerate() {
        for (i, d) in devices.iter().enumerate() {
            for (w, (wname, _)) in WORKLOADS.iter().enumerate() {
                let text = r.output(&format!("r{round}d{i}w{w}")).unwrap();
                let j: Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
                let job = &j["jobs"][0];
                let dir = if wname.contains("write") {
                    &job["write"]
                } else {
                    &job["read"]
                };
                let pct = |p: &str| dir["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1e6;
                // I/Os of the whole run (no ramp time), as the CPU time covers.
                let ios = dir["total_ios"].as_f64().unwrap_or(0.0).max(1.0);
                let rate = dir["iops"].as_f64().unwrap_or(0.0);
                per_round[i][w] = rate;
                println!(
                    "| {} | {} | {wname} | {rate:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.0} |",
                    round + 1,
                    d.name,
                    dir["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
                    pct("50.000000"),
                    pct("99.000000"),
                    pct("99.900000"),
                    cpu[round][i][w] * 1e6 / ios,
                );
            }
        }
    }

    // Each device against the peer of the same round and workload (IOPS; for the
    // 128 KiB workloads the MB/s ratio is the same), then the mean over the rounds.
    let peer = devices.iter().position(|d| d.peer).unwrap();
    let rounds = f64::from(u32::try_from(ROUNDS).unwrap());
    println!();
    print!("| device |");
    for (wname, _) in WORKLOADS {
        print!(" {wname}: IOPS, ratio to peer (per round) |");
    }
    println!();
    println!("|---|{}", "---|".repeat(WORKLOADS.len()));
    for (i, d) in devices.iter().enumerate() {
        print!("| {} |", d.name);
        for w in 0..WORKLOADS.len() {
            let ratios: Vec<f64> = iops
                .iter()
                .map(|per| per[i][w] / per[peer][w].max(f64::MIN_POSITIVE))
                .collect();
            let mean_iops = iops.iter().map(|per| per[i][w]).sum::<f64>() / rounds;
            let mean_ratio = ratios.iter().sum::<f64>() / rounds;
            let each: Vec<String> = ratios.iter().map(|x| format!("{x:.2}")).collect();
            print!(
                " {mean_iops:.0}, **{mean_ratio:.2}x** ({}) |",
                each.join(" / ")
            );
        }
        println!();
    }
    drop((target, qsd));
    testbed(&["down", "--purge"]);
}
