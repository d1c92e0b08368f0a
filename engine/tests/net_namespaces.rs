//! Two network namespaces stand for two hosts; each is joined by a veth pair whose
//! root-namespace end is a port of the switch, running in this test process over
//! AF_PACKET. Real tools then check the firewall's promises: ping, an HTTP download
//! and iperf3 TCP/UDP pass where rules allow them, a port no rule allows times out,
//! an unsolicited reply is dropped, and deleting a rule stops new connections but not
//! an established one. Only traffic inside the namespaces created here is sent; they
//! are removed even when the test fails.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::net::afpacket::RingConfig;
use engine::net::afxdp::XdpConfig;
use engine::net::dataplane::DropReason;
use engine::net::packet::{build, tcp_flags, ETH_P_IPV4, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use engine::net::poller::Poller;
use engine::net::{
    Action, Cidr, Dataplane, DataplaneConfig, Direction, MacAddr, NetworkId, PortConfig, PortKind,
    PortRange, RuleMatch, RuleSpec, Stats,
};

const A_IP: &str = "10.77.0.1";
const B_IP: &str = "10.77.0.2";

fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn check(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Namespaces, links and child processes to clean up, whatever happens.
struct Lab {
    ns: [String; 2],
    host_ends: [String; 2],
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Lab {
    /// `p` tells apart the labs of tests running at the same time in this process.
    fn new(p: char) -> Lab {
        let tag = std::process::id() % 100_000;
        let lab = Lab {
            ns: [
                format!("dpu-host-a{p}-{tag}"),
                format!("dpu-host-b{p}-{tag}"),
            ],
            host_ends: [format!("d{p}a{tag}"), format!("d{p}b{tag}")],
            children: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        for (i, ip) in [A_IP, B_IP].iter().enumerate() {
            let (ns, h) = (&lab.ns[i], &lab.host_ends[i]);
            check(&["ip", "netns", "add", ns]);
            check(&[
                "ip", "link", "add", h, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ]);
            check(&["ip", "link", "set", h, "up"]);
            check(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            check(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ]);
            check(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
            // The switch sees frames as the wire would carry them: no partial
            // checksums, no TSO/GSO super-frames (see docs/network.md, limits).
            lab.ns_run(
                i,
                &[
                    "ethtool", "-K", "eth0", "tx", "off", "tso", "off", "gso", "off", "gro", "off",
                ],
            );
            check(&[
                "ethtool", "-K", h, "tx", "off", "tso", "off", "gso", "off", "gro", "off",
            ]);
            let _ = run(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{h}.disable_ipv6=1"),
            ]);
        }
        lab
    }

    fn ns_cmd(&self, i: usize, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[i]]).args(args);
        c
    }

    fn ns_run(&self, i: usize, args: &[&str]) -> Output {
        self.ns_cmd(i, args).output().unwrap()
    }

    /// Three pings from host `i` to `ip`, which must all be answered; returns ping's
    /// output. `what` names the path in the failure message.
    fn ping_ok(&self, i: usize, ip: &str, what: &str) -> String {
        let o = self.ns_run(i, &["ping", "-c", "3", "-i", "0.2", "-W", "2", ip]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "{what}: {out}");
        out
    }

    /// Host `i` downloads `http://<ip>:8000/blob` with curl, which must succeed and
    /// give exactly `blob`.
    fn download_ok(&self, i: usize, ip: &str, blob: &[u8], what: &str) {
        let got = self.dir.path().join("got");
        let o = self.ns_run(
            i,
            &[
                "curl",
                "-s",
                "--max-time",
                "60",
                "-o",
                got.to_str().unwrap(),
                &format!("http://{ip}:8000/blob"),
            ],
        );
        assert!(
            o.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            std::fs::read(&got).unwrap() == blob,
            "downloaded file differs"
        );
    }

    fn spawn(&mut self, i: usize, args: &[&str]) {
        let c = self
            .ns_cmd(i, args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(c);
    }

    fn mac(&self, i: usize) -> MacAddr {
        let out = self.ns_run(i, &["cat", "/sys/class/net/eth0/address"]);
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.ns {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        for h in &self.host_ends {
            let _ = run(&["ip", "link", "del", h]);
        }
    }
}

type Cmd = Box<dyn FnOnce(&mut Dataplane) + Send>;

/// The switch on its own thread, configured through closures.
struct Switch {
    tx: mpsc::Sender<Cmd>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, u64, u64)>>,
}

impl Switch {
    fn start(a: &str, b: &str) -> (Switch, u32, u32) {
        let mut p = Poller::new(Dataplane::new(DataplaneConfig::default()));
        let port = |name: &str| PortConfig {
            name: name.into(),
            kind: PortKind::Access(NetworkId::Vlan(1)),
            rate_limit: None,
        };
        let pa = p.attach_device(port(a), RingConfig::default()).unwrap();
        let pb = p.attach_device(port(b), RingConfig::default()).unwrap();
        (Switch::run(p), pa, pb)
    }

    /// As [`Switch::start`], with each port on AF_XDP where the device allows it;
    /// returns why a port fell back to AF_PACKET, if one did.
    fn start_auto(a: &str, b: &str) -> (Switch, u32, u32, Vec<String>, Vec<&'static str>) {
        let mut p = Poller::new(Dataplane::new(DataplaneConfig::default()));
        let port = |name: &str| PortConfig {
            name: name.into(),
            kind: PortKind::Access(NetworkId::Vlan(1)),
            rate_limit: None,
        };
        let mut fallbacks = Vec::new();
        let mut attach = |name: &str| {
            let (id, why) = p
                .attach_device_auto(port(name), XdpConfig::default(), RingConfig::default())
                .unwrap();
            fallbacks.extend(why);
            id
        };
        let pa = attach(a);
        let pb = attach(b);
        let kinds = p.port_kinds().into_iter().map(|(_, k)| k).collect();
        (Switch::run(p), pa, pb, fallbacks, kinds)
    }

    /// Runs a poller on its own thread.
    fn run(mut p: Poller) -> Switch {
        for (id, kind) in p.port_kinds() {
            eprintln!("port {id}: {kind}");
        }
        let (tx, rx) = mpsc::channel::<Cmd>();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut busy_turns = 0u64;
            while !s2.load(Ordering::Relaxed) {
                while let Ok(cmd) = rx.try_recv() {
                    cmd(p.dataplane());
                }
                let r = p.turn(256);
                if r.frames == 0 {
                    let _ = p.wait(5);
                } else {
                    busy_turns += 1;
                }
            }
            let s = p.stats();
            (s.rx_frames, s.cpu_ns, busy_turns)
        });
        Switch {
            tx,
            stop,
            thread: Some(thread),
        }
    }

    fn with<T: Send + 'static>(&self, f: impl FnOnce(&mut Dataplane) -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Box::new(move |dp| {
                let _ = tx.send(f(dp));
            }))
            .unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    fn stats(&self) -> Stats {
        self.with(|dp| dp.stats())
    }

    fn finish(mut self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn allow_from(port: u32, proto: u8, dport: Option<u16>) -> RuleSpec {
    RuleSpec {
        priority: 10,
        action: Action::Allow,
        matches: RuleMatch {
            port: Some(port),
            direction: Some(Direction::In),
            dst: Some(Cidr::new(B_IP.parse().unwrap(), 32).unwrap()),
            proto: Some(proto),
            dport: dport.map(PortRange::one),
            ..Default::default()
        },
    }
}

fn wait_for_port(lab: &Lab, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let url = format!("http://{B_IP}:{port}/");
    while Instant::now() < deadline {
        let o = lab.ns_run(
            1,
            &["curl", "-s", "-o", "/dev/null", "--max-time", "1", &url],
        );
        if o.status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("server on {port} did not come up");
}

/// The number after `"key":` at or after `from` in iperf3's JSON.
fn json_num(json: &str, from: usize, key: &str) -> f64 {
    let pat = format!("\"{key}\":");
    let at = json[from..]
        .find(&pat)
        .map(|i| from + i + pat.len())
        .unwrap_or(json.len());
    let num: String = json[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
        .collect();
    num.parse().unwrap_or(0.0)
}

/// (bits per second received, loss percent) from `iperf3 -J`.
fn iperf_bps(out: &[u8], udp: bool) -> (f64, f64) {
    let json = String::from_utf8_lossy(out);
    if udp {
        let at = json.rfind("\"sum\":").unwrap_or(0);
        (
            json_num(&json, at, "bits_per_second"),
            json_num(&json, at, "lost_percent"),
        )
    } else {
        let at = json.rfind("\"sum_received\":").unwrap_or(0);
        (json_num(&json, at, "bits_per_second"), 0.0)
    }
}

const ECHO_SERVER: &str = r#"
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000)); s.listen(16)
def serve(c):
    while True:
        d = c.recv(4096)
        if not d: break
        c.sendall(d)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Runs in host A: prints "ready", then counts for 3 s the TCP segments
/// from port 8000 to port 41234 that arrive on eth0, and prints "seen N".
const SNIFF_SYNACK: &str = r#"
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind(('eth0', 0))
s.settimeout(0.2)
print('ready', flush=True)
seen = 0
end = time.time() + 3.0
while time.time() < end:
    try:
        f = s.recv(2048)
    except socket.timeout:
        continue
    if len(f) < 34 or f[12:14] != b'\x08\x00' or f[23] != 6:
        continue
    ihl = (f[14] & 0x0f) * 4
    t = 14 + ihl
    if len(f) >= t + 4 and struct.unpack('!HH', f[t:t+4]) == (8000, 41234):
        seen += 1
print('seen %d' % seen, flush=True)
"#;

const ECHO_CLIENT: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], 7000), timeout=3); c.settimeout(3)
for line in sys.stdin:
    try:
        c.sendall(line.encode()); print(c.recv(4096).decode().strip(), flush=True)
    except Exception as e:
        print("ERR", type(e).__name__, flush=True)
"#;

#[test]
#[ignore = "needs root and network namespaces"]
fn namespaced_hosts_through_the_switch_and_firewall() {
    let mut lab = Lab::new('f');
    let (sw, pa, pb) = Switch::start(&lab.host_ends[0].clone(), &lab.host_ends[1].clone());
    let (mac_a, mac_b) = (lab.mac(0), lab.mac(1));

    // Servers in B: HTTP on 8000 and 9999, an echo server on 7000, iperf3 on 5201.
    let blob: Vec<u8> = (0..8u32 << 20)
        .map(|i| i.wrapping_mul(2_654_435_761).to_be_bytes()[0])
        .collect();
    let dir = lab.dir.path().to_str().unwrap().to_owned();
    std::fs::write(lab.dir.path().join("blob"), &blob).unwrap();
    lab.spawn(
        1,
        &[
            "python3",
            "-m",
            "http.server",
            "8000",
            "--bind",
            B_IP,
            "--directory",
            &dir,
        ],
    );
    lab.spawn(
        1,
        &[
            "python3",
            "-m",
            "http.server",
            "9999",
            "--bind",
            B_IP,
            "--directory",
            &dir,
        ],
    );
    lab.spawn(1, &["python3", "-c", ECHO_SERVER]);
    lab.spawn(1, &["iperf3", "-s", "-p", "5201"]);
    wait_for_port(&lab, 8000);
    wait_for_port(&lab, 9999);

    // Nothing allowed yet: ping fails.
    let o = lab.ns_run(0, &["ping", "-c", "1", "-W", "1", B_IP]);
    assert!(!o.status.success(), "ping passed with no rule");

    // A may ping B and reach B's 8000, 7000 and 5201 (TCP and UDP); nothing else.
    let ids: Vec<u64> = sw.with(move |dp| {
        vec![
            dp.add_rule(allow_from(pa, IPPROTO_ICMP, None)),
            dp.add_rule(allow_from(pa, IPPROTO_TCP, Some(8000))),
            dp.add_rule(allow_from(pa, IPPROTO_TCP, Some(7000))),
            dp.add_rule(allow_from(pa, IPPROTO_TCP, Some(5201))),
            dp.add_rule(allow_from(pa, IPPROTO_UDP, Some(5201))),
        ]
    });
    let echo_rule = ids[2];

    let out = lab.ping_ok(0, B_IP, "ping A->B");
    eprintln!("{}", out.lines().last().unwrap_or(""));
    let o = lab.ns_run(1, &["ping", "-c", "1", "-W", "1", A_IP]);
    assert!(!o.status.success(), "B may not ping A");

    // HTTP download, checked byte for byte.
    let t = Instant::now();
    lab.download_ok(0, B_IP, &blob, "curl");
    eprintln!(
        "HTTP download of {} MiB: {:?}",
        blob.len() >> 20,
        t.elapsed()
    );

    // A port no rule allows: the SYN is dropped, so the connection times out
    // (curl exit 28), not refused (exit 7).
    let o = lab.ns_run(
        0,
        &[
            "curl",
            "-s",
            "--connect-timeout",
            "2",
            &format!("http://{B_IP}:9999/"),
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(28),
        "connection to an unallowed port must time out"
    );

    // An unsolicited reply: a SYN+ACK from B's HTTP port to A, injected in B.
    let before = sw.stats();
    let seg = build::tcp(
        B_IP.parse().unwrap(),
        A_IP.parse().unwrap(),
        8000,
        41234,
        1,
        1,
        tcp_flags::SYN | tcp_flags::ACK,
        b"",
    );
    let ip = build::ipv4(
        B_IP.parse::<Ipv4Addr>().unwrap(),
        A_IP.parse().unwrap(),
        IPPROTO_TCP,
        &seg,
    );
    let frame = build::ethernet(mac_a, mac_b, None, ETH_P_IPV4, &ip);
    let f = lab.dir.path().join("synack");
    std::fs::write(&f, &frame).unwrap();
    let inject = format!(
        "import socket; s=socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('eth0',0)); s.send(open('{}','rb').read())",
        f.display()
    );
    // A sniffer in host A watches for that exact segment (B:8000 -> A:41234),
    // so unrelated frames (a late FIN of the download, an ARP refresh) that
    // the switch rightly forwards meanwhile do not blur the check.
    let mut sniffer = lab
        .ns_cmd(0, &["python3", "-c", SNIFF_SYNACK])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sniff_out = BufReader::new(sniffer.stdout.take().unwrap());
    let mut line = String::new();
    sniff_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "sniffer in host A did not start");
    let o = lab.ns_run(1, &["python3", "-c", &inject]);
    assert!(
        o.status.success(),
        "inject: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let unsolicited = |s: &Stats| s.drops.get(DropReason::Unsolicited);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = sw.stats();
    while unsolicited(&after) == unsolicited(&before) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = sw.stats();
    }
    line.clear();
    sniff_out.read_line(&mut line).unwrap();
    sniffer.wait().unwrap();
    assert_eq!(
        line.trim(),
        "seen 0",
        "the unsolicited SYN+ACK must not reach host A"
    );
    assert_eq!(
        unsolicited(&after),
        unsolicited(&before) + 1,
        "the injected SYN+ACK is dropped as unsolicited"
    );

    // Established connections survive deleting their rule; new ones do not.
    let mut client = lab
        .ns_cmd(0, &["python3", "-c", ECHO_CLIENT, B_IP])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut cin = client.stdin.take().unwrap();
    let mut cout = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    writeln!(cin, "one").unwrap();
    cout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "one");
    sw.with(move |dp| dp.remove_rule(echo_rule).unwrap());
    line.clear();
    writeln!(cin, "two").unwrap();
    cout.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "two",
        "established connection survives the rule deletion"
    );
    let o = lab.ns_run(
        0,
        &[
            "python3",
            "-c",
            &format!("import socket; socket.create_connection(('{B_IP}', 7000), timeout=2)"),
        ],
    );
    assert!(
        !o.status.success(),
        "a new connection after the rule deletion must fail"
    );
    drop(cin);
    let _ = client.wait();

    // iperf3 TCP and UDP where allowed.
    let o = lab.ns_run(0, &["iperf3", "-c", B_IP, "-t", "3", "-J"]);
    assert!(
        o.status.success(),
        "iperf3 TCP: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let (tcp_bps, _) = iperf_bps(&o.stdout, false);
    // UDP at a rate a debug build keeps up with; one retry, because iperf3 now and
    // then reports an empty UDP run on a loaded machine.
    let mut udp = (0.0, 0.0);
    let mut udp_json = String::new();
    for _ in 0..2 {
        let o = lab.ns_run(
            0,
            &["iperf3", "-c", B_IP, "-u", "-b", "50M", "-t", "3", "-J"],
        );
        udp_json = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "iperf3 UDP: {udp_json}");
        udp = iperf_bps(&o.stdout, true);
        if udp.0 > 0.0 {
            break;
        }
    }
    let (udp_bps, udp_loss) = udp;
    eprintln!(
        "iperf3 through the switch: TCP {:.1} Mbit/s, UDP {:.1} Mbit/s at 50 Mbit/s offered, loss {udp_loss:.2}%",
        tcp_bps / 1e6,
        udp_bps / 1e6
    );
    assert!(tcp_bps > 1e6, "TCP carried traffic");
    assert!(
        udp_bps > 1e6,
        "UDP carried traffic: {}",
        &udp_json[udp_json.len().saturating_sub(3000)..]
    );

    // Longer runs for docs/network.md's comparison with the kernel bridge
    // (NET_BENCH=1; the same commands the kernel script runs).
    if std::env::var_os("NET_BENCH").is_some() {
        for args in [
            &["-t", "5"][..],
            &["-t", "5", "-P", "4"][..],
            &["-u", "-b", "0", "-l", "18", "-t", "5"][..],
        ] {
            let mut cmd = vec!["iperf3", "-c", B_IP, "-J"];
            cmd.extend_from_slice(args);
            let cpu0 = sw.with(|_| engine::net::afpacket::thread_cpu_ns());
            let o = lab.ns_run(0, &cmd);
            let cpu = sw.with(|_| engine::net::afpacket::thread_cpu_ns()) - cpu0;
            let json = String::from_utf8_lossy(&o.stdout);
            let udp = args.contains(&"-u");
            let (bps, loss) = iperf_bps(&o.stdout, udp);
            let at = json.rfind("\"sum\":").unwrap_or(0);
            let pkts = json_num(&json, at, "packets") - json_num(&json, at, "lost_packets");
            eprintln!(
                "NET_BENCH switch iperf3 {args:?}: {:.1} Mbit/s received, loss {loss:.2}%, {:.0} packets/s delivered (UDP), switch thread CPU {:?}",
                bps / 1e6,
                pkts / 5.0,
                Duration::from_nanos(cpu)
            );
        }
    }

    let s = sw.stats();
    let pbs = s.ports.iter().find(|p| p.id == pb).unwrap();
    eprintln!(
        "drops: {:?}; port B {:?}; connections {}",
        s.drops.nonzero(),
        pbs.counters,
        s.connections
    );
    let (frames, cpu_ns, busy) = sw.finish();
    eprintln!(
        "poller: {frames} frames, {:?} CPU, {} ns CPU per frame, {busy} busy turns",
        Duration::from_nanos(cpu_ns),
        cpu_ns / frames.max(1)
    );
}

/// Host A behind one switch, host B behind another, the two switches joined only by
/// VXLAN over an underlay veth pair (what two dpud instances on two DPUs do).
#[test]
#[ignore = "needs root and network namespaces"]
fn vxlan_joins_hosts_behind_two_switches() {
    let mut lab = Lab::new('v');
    let tag = std::process::id() % 100_000;
    let under = [format!("dvu1{tag}"), format!("dvu2{tag}")];
    let _underlay = Underlay(under.clone());
    check(&[
        "ip", "link", "add", &under[0], "mtu", "1600", "type", "veth", "peer", "name", &under[1],
        "mtu", "1600",
    ]);
    for u in &under {
        let _ = run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{u}.disable_ipv6=1"),
        ]);
        check(&[
            "ethtool", "-K", u, "tx", "off", "tso", "off", "gso", "off", "gro", "off",
        ]);
        check(&["ip", "link", "set", u, "up"]);
    }
    let mac_of = |dev: &str| -> MacAddr {
        std::fs::read_to_string(format!("/sys/class/net/{dev}/address"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let vtep = [
        Ipv4Addr::new(192, 168, 77, 1),
        Ipv4Addr::new(192, 168, 77, 2),
    ];
    let net = NetworkId::Vni(5000);
    let mut switches = Vec::new();
    let mut tunnels = Vec::new();
    for i in 0..2 {
        let mut p = Poller::new(Dataplane::new(DataplaneConfig::default()));
        let host = p
            .attach_device(
                PortConfig {
                    name: lab.host_ends[i].clone(),
                    kind: PortKind::Access(net),
                    rate_limit: None,
                },
                RingConfig::default(),
            )
            .unwrap();
        let uplink = p
            .attach_device(
                PortConfig {
                    name: under[i].clone(),
                    kind: PortKind::Uplink {
                        local_ip: vtep[i],
                        local_mac: mac_of(&under[i]),
                    },
                    rate_limit: None,
                },
                RingConfig::default(),
            )
            .unwrap();
        let dp = p.dataplane();
        let t = dp
            .add_tunnel(engine::net::TunnelConfig {
                network: net,
                vni: 5000,
                uplink,
                remote_ip: vtep[1 - i],
                remote_mac: mac_of(&under[1 - i]),
            })
            .unwrap();
        // Everything to and from the host is allowed; the point here is the overlay.
        dp.add_rule(RuleSpec {
            priority: 0,
            action: Action::Allow,
            matches: RuleMatch {
                port: Some(host),
                ..Default::default()
            },
        });
        tunnels.push(t);
        switches.push(Switch::run(p));
    }
    let dir = lab.dir.path().to_str().unwrap().to_owned();
    let blob: Vec<u8> = (0..4u32 << 20)
        .map(|i| i.wrapping_mul(2_246_822_519).to_be_bytes()[1])
        .collect();
    std::fs::write(lab.dir.path().join("blob"), &blob).unwrap();
    lab.spawn(
        1,
        &[
            "python3",
            "-m",
            "http.server",
            "8000",
            "--bind",
            B_IP,
            "--directory",
            &dir,
        ],
    );
    wait_for_port(&lab, 8000);

    lab.ping_ok(0, B_IP, "ping over VXLAN");
    lab.download_ok(0, B_IP, &blob, "curl over VXLAN");
    for (sw, t) in switches.iter().zip(&tunnels) {
        let t = *t;
        let c = sw.with(move |dp| {
            dp.stats()
                .ports
                .into_iter()
                .find(|p| p.id == t)
                .unwrap()
                .counters
        });
        eprintln!("tunnel port: {c:?}");
        assert!(
            c.rx_packets > 100 && c.tx_packets > 100,
            "traffic crossed the tunnel both ways"
        );
    }
}

/// Removes the underlay veth pair.
struct Underlay([String; 2]);

impl Drop for Underlay {
    fn drop(&mut self) {
        let _ = run(&["ip", "link", "del", &self.0[0]]);
    }
}

#[test]
#[ignore = "needs root, network namespaces and AF_XDP"]
fn af_xdp_ports_carry_ping_and_tcp_through_the_firewall() {
    let mut lab = Lab::new('x');
    let (sw, pa, _pb, fallbacks, kinds) =
        Switch::start_auto(&lab.host_ends[0].clone(), &lab.host_ends[1].clone());
    // veth has native XDP and one RX queue, and this kernel has AF_XDP: both ports
    // must use it (a fallback here would hide a broken AF_XDP path).
    assert!(fallbacks.is_empty(), "AF_XDP refused: {fallbacks:?}");
    assert_eq!(kinds, ["af_xdp", "af_xdp"]);

    let blob: Vec<u8> = (0..4u32 << 20)
        .map(|i| i.wrapping_mul(2_246_822_519).to_be_bytes()[1])
        .collect();
    let dir = lab.dir.path().to_str().unwrap().to_owned();
    std::fs::write(lab.dir.path().join("blob"), &blob).unwrap();
    lab.spawn(
        1,
        &[
            "python3",
            "-m",
            "http.server",
            "8000",
            "--bind",
            B_IP,
            "--directory",
            &dir,
        ],
    );
    wait_for_port(&lab, 8000);

    // The firewall still decides: nothing passes before a rule allows it.
    let o = lab.ns_run(0, &["ping", "-c", "1", "-W", "1", B_IP]);
    assert!(!o.status.success(), "ping passed with no rule");
    sw.with(move |dp| {
        dp.add_rule(allow_from(pa, IPPROTO_ICMP, None));
        dp.add_rule(allow_from(pa, IPPROTO_TCP, Some(8000)));
    });
    lab.ping_ok(0, B_IP, "ping A->B over AF_XDP");
    lab.download_ok(0, B_IP, &blob, "curl");
    let (rx_frames, _, _) = sw.finish();
    assert!(rx_frames > 1000, "the switch saw only {rx_frames} frames");
}
