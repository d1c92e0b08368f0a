//! The network module inside a running `dpud`, configured only through `dpuctl`:
//! namespaced hosts joined by dpud's switch (ping, an HTTP download checked byte for
//! byte, iperf3 TCP and UDP where rules allow them; a port no rule allows times out;
//! replies to allowed connections pass, the same segment unsolicited is dropped;
//! deleting a rule keeps the established connection and refuses new ones; flushing
//! cuts it), and two dpud processes, each with its own data directory and socket,
//! joined by VXLAN over an underlay veth pair, carrying traffic between the hosts
//! behind each. Needs root (namespaces, veth, AF_PACKET/AF_XDP); everything created
//! here is removed even when a test fails.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use engine::net::packet::{build, tcp_flags, MacAddr, ETH_P_IPV4, IPPROTO_TCP};
use serde_json::Value;

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

fn no_offloads(ns: Option<&str>, dev: &str) {
    let mut args = vec![];
    if let Some(ns) = ns {
        args.extend(["ip", "netns", "exec", ns]);
    }
    args.extend([
        "ethtool", "-K", dev, "tx", "off", "tso", "off", "gso", "off", "gro", "off",
    ]);
    check(&args);
}

/// A dpud process with its own data directory, API socket and listeners.
struct Dpud {
    child: Child,
    dir: PathBuf,
}

impl Dpud {
    fn binary() -> PathBuf {
        let path = Path::new(env!("CARGO_BIN_EXE_dpuctl")).with_file_name("dpud");
        if !path.exists() {
            // `cargo test --workspace` builds it; a lone `cargo test -p cli` does not.
            let o = Command::new(env!("CARGO"))
                .args(["build", "-p", "engine", "--bin", "dpud"])
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "building dpud: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        path
    }

    fn start(dir: &Path, cpu_share: f64) -> Dpud {
        std::fs::create_dir_all(dir).unwrap();
        let config = format!(
            "data_dir = \"{d}/data\"\ncores = 1\nlog_level = \"info\"\n\n[api]\nsocket = \"{d}/api.sock\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[nbd]\nsocket = \"{d}/nbd.sock\"\ntcp = \"127.0.0.1:0\"\n\n[net]\ncpu_share = {cpu_share}\n",
            d = dir.display()
        );
        std::fs::write(dir.join("dpud.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("dpud.log")).unwrap();
        let child = Command::new(Self::binary())
            .arg("--config")
            .arg(dir.join("dpud.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Dpud {
            child,
            dir: dir.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while d.ctl(&["net", "stats"]).status.code() == Some(3) {
            assert!(Instant::now() < deadline, "dpud did not start: {}", d.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dpud.log")).unwrap_or_default()
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_dpuctl"))
            .arg("--socket")
            .arg(self.dir.join("api.sock"))
            .args(args)
            .env_remove("DPUD_SOCKET")
            .output()
            .unwrap()
    }

    /// Runs dpuctl and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(
            o.status.success(),
            "dpuctl {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    fn drops(&self, reason: &str) -> u64 {
        self.json(&["net", "stats"])["drops"][reason]
            .as_u64()
            .unwrap_or(0)
    }
}

impl Drop for Dpud {
    fn drop(&mut self) {
        // SIGTERM for an orderly stop (the XDP links and sockets close with it).
        let _ = run(&["kill", "-TERM", &self.child.id().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Namespaced hosts, links and child processes, removed on drop.
struct Lab {
    tag: String,
    ns: Vec<String>,
    links: Vec<String>,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new(p: &str) -> Lab {
        Lab {
            tag: format!("{p}{}", std::process::id() % 100_000),
            ns: Vec::new(),
            links: Vec::new(),
            children: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A host namespace with `ip` on eth0, whose peer (returned) stays in this
    /// namespace for dpud to attach.
    fn host(&mut self, name: &str, ip: &str) -> String {
        let ns = format!("dpud-{name}-{}", self.tag);
        let dev = format!("{name}{}", self.tag);
        check(&["ip", "netns", "add", &ns]);
        self.ns.push(ns.clone());
        check(&[
            "ip", "link", "add", &dev, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        self.links.push(dev.clone());
        let _ = run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{dev}.disable_ipv6=1"),
        ]);
        check(&["ip", "link", "set", &dev, "up"]);
        check(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        check(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
        check(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        no_offloads(Some(&ns), "eth0");
        no_offloads(None, &dev);
        dev
    }

    fn ns_cmd(&self, host: usize, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[host]]).args(args);
        c
    }

    fn ns_run(&self, host: usize, args: &[&str]) -> Output {
        self.ns_cmd(host, args).output().unwrap()
    }

    fn spawn(&mut self, host: usize, args: &[&str]) {
        let c = self
            .ns_cmd(host, args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(c);
    }

    fn mac_of(&self, host: Option<usize>, dev: &str) -> String {
        let path = format!("/sys/class/net/{dev}/address");
        let out = match host {
            Some(h) => self.ns_run(h, &["cat", &path]).stdout,
            None => std::fs::read(&path).unwrap(),
        };
        String::from_utf8_lossy(&out).trim().to_owned()
    }

    /// Serves `blob` over HTTP on `port` from `host` and waits until it answers
    /// locally.
    fn http_server(&mut self, host: usize, ip: &str, port: u16) {
        let dir = self.dir.path().to_str().unwrap().to_owned();
        self.spawn(
            host,
            &[
                "python3",
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                ip,
                "--directory",
                &dir,
            ],
        );
        let url = format!("http://{ip}:{port}/");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .ns_run(
                host,
                &["curl", "-s", "-o", "/dev/null", "--max-time", "1", &url],
            )
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "HTTP server on {port} did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn blob(&self, mib: u32) -> Vec<u8> {
        let blob: Vec<u8> = (0..mib << 20)
            .map(|i| i.wrapping_mul(2_654_435_761).to_be_bytes()[0])
            .collect();
        std::fs::write(self.dir.path().join("blob"), &blob).unwrap();
        blob
    }

    /// Downloads the blob from `ip:port` into host `host` and compares it.
    fn download(&self, host: usize, ip: &str, port: u16, blob: &[u8]) {
        let got = self.dir.path().join(format!("got-{host}"));
        let o = self.ns_run(
            host,
            &[
                "curl",
                "-s",
                "--max-time",
                "60",
                "-o",
                got.to_str().unwrap(),
                &format!("http://{ip}:{port}/blob"),
            ],
        );
        assert!(
            o.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            std::fs::read(&got).unwrap() == blob,
            "downloaded file differs"
        );
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
        for l in &self.links {
            let _ = run(&["ip", "link", "del", l]);
        }
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

const ECHO_CLIENT: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], 7000), timeout=3); c.settimeout(3)
print("connected", flush=True)
for line in sys.stdin:
    try:
        c.sendall(line.encode()); print(c.recv(4096).decode().strip() or "EOF", flush=True)
    except Exception as e:
        print("ERR", type(e).__name__, flush=True)
"#;

/// Prints "ready", then counts for 3 s the TCP segments from port 8000 to port 41234
/// on eth0 (either direction), and prints "seen N".
const SNIFF: &str = r#"
import socket, struct, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind(('eth0', 0)); s.settimeout(0.2)
print('ready', flush=True)
seen = 0; end = time.time() + 3.0
while time.time() < end:
    try:
        f = s.recv(2048)
    except socket.timeout:
        continue
    if len(f) < 34 or f[12:14] != b'\x08\x00' or f[23] != 6:
        continue
    t = 14 + (f[14] & 0x0f) * 4
    if len(f) >= t + 4 and struct.unpack('!HH', f[t:t+4]) == (8000, 41234):
        seen += 1
print('seen %d' % seen, flush=True)
"#;

/// Sniffs in `sniff_host` while `inject_host` sends `frame`; returns what the sniffer
/// counted of the segment B:8000 -> A:41234.
fn inject_and_sniff(lab: &Lab, inject_host: usize, sniff_host: usize, frame: &[u8]) -> String {
    let f = lab.dir.path().join("frame");
    std::fs::write(&f, frame).unwrap();
    let mut sniffer = lab
        .ns_cmd(sniff_host, &["python3", "-c", SNIFF])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(sniffer.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "sniffer did not start");
    let inject = format!(
        "import socket; s=socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('eth0',0)); s.send(open('{}','rb').read())",
        f.display()
    );
    let o = lab.ns_run(inject_host, &["python3", "-c", &inject]);
    assert!(
        o.status.success(),
        "inject: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    line.clear();
    out.read_line(&mut line).unwrap();
    sniffer.wait().unwrap();
    line.trim().to_owned()
}

fn iperf_ok(lab: &Lab, host: usize, args: &[&str]) -> f64 {
    let mut cmd = vec!["iperf3", "-J"];
    cmd.extend_from_slice(args);
    let o = lab.ns_run(host, &cmd);
    let json: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert!(o.status.success(), "iperf3 {args:?}: {json}");
    let udp = args.contains(&"-u");
    let bps = if udp {
        json["end"]["sum"]["bits_per_second"].as_f64()
    } else {
        json["end"]["sum_received"]["bits_per_second"].as_f64()
    };
    bps.unwrap_or(0.0)
}

const A_IP: &str = "10.78.0.1";
const B_IP: &str = "10.78.0.2";

#[test]
#[ignore = "needs root: network namespaces, veth, AF_PACKET/AF_XDP; runs the dpud binary"]
fn dpud_switches_and_firewalls_namespaced_hosts() {
    let mut lab = Lab::new("f");
    let pa = lab.host("a", A_IP);
    let pb = lab.host("b", B_IP);
    let d = Dpud::start(&lab.dir.path().join("dpud"), 0.5);
    d.ok(&["net", "port", "add", &pa, "--access", "vlan:1"]);
    d.ok(&["net", "port", "add", &pb, "--access", "vlan:1"]);
    let ports = d.json(&["net", "port", "list"]);
    for p in ports.as_array().unwrap() {
        let io = p["io"].as_str().unwrap();
        eprintln!("port {}: {io}", p["name"]);
        assert!(io == "af_xdp" || io.starts_with("af_packet_v3"), "{io}");
    }

    // Servers in B.
    let blob = lab.blob(4);
    lab.http_server(1, B_IP, 8000);
    lab.http_server(1, B_IP, 9999);
    lab.spawn(1, &["python3", "-c", ECHO_SERVER]);
    lab.spawn(1, &["iperf3", "-s", "-p", "5201"]);

    // No rule: nothing passes.
    assert!(!lab
        .ns_run(0, &["ping", "-c", "1", "-W", "1", B_IP])
        .status
        .success());

    // A may ping B and open TCP 8000, 7000, 5201 and UDP 5201 to B; nothing else.
    let allow = |proto: &str, dport: Option<&str>| -> u64 {
        let mut args = vec![
            "net",
            "fw",
            "rule",
            "add",
            "--action",
            "allow",
            "--port",
            &pa,
            "--direction",
            "in",
            "--dst",
            "10.78.0.2/32",
            "--protocol",
            proto,
        ];
        if let Some(p) = dport {
            args.extend(["--dport", p]);
        }
        d.json(&args)["id"].as_u64().unwrap()
    };
    allow("icmp", None);
    allow("tcp", Some("8000"));
    let echo_rule = allow("tcp", Some("7000"));
    allow("tcp", Some("5201"));
    allow("udp", Some("5201"));

    let o = lab.ns_run(0, &["ping", "-c", "3", "-i", "0.2", "-W", "2", B_IP]);
    assert!(
        o.status.success(),
        "ping A->B: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        !lab.ns_run(1, &["ping", "-c", "1", "-W", "1", A_IP])
            .status
            .success(),
        "B may not ping A"
    );

    lab.download(0, B_IP, 8000, &blob);

    // A port no rule allows: dropped, so the connect times out (28), not refused (7).
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
        "a connection to an unallowed port times out"
    );

    // An unsolicited SYN+ACK from B:8000 to A:41234 never reaches A. (The sniffer
    // works: in B, where the segment is sent, it sees it.)
    let mac = |h: usize| lab.mac_of(Some(h), "eth0").parse::<MacAddr>().unwrap();
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
    let frame = build::ethernet(mac(0), mac(1), None, ETH_P_IPV4, &ip);
    let before = d.drops("unsolicited");
    assert_eq!(
        inject_and_sniff(&lab, 1, 0, &frame),
        "seen 0",
        "the unsolicited SYN+ACK reached A"
    );
    assert!(
        d.drops("unsolicited") > before,
        "dpud counts it as unsolicited"
    );
    assert_eq!(
        inject_and_sniff(&lab, 1, 1, &frame),
        "seen 1",
        "the sniffer sees the segment where it is sent"
    );

    // Deleting the rule keeps the established connection and refuses new ones.
    let mut client = lab
        .ns_cmd(0, &["python3", "-c", ECHO_CLIENT, B_IP])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut cin = client.stdin.take().unwrap();
    let mut cout = BufReader::new(client.stdout.take().unwrap());
    let mut first = String::new();
    cout.read_line(&mut first).unwrap();
    assert_eq!(first.trim(), "connected", "the echo connection opened");
    let mut say = |word: &str| {
        writeln!(cin, "{word}").unwrap();
        let mut line = String::new();
        cout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    };
    assert_eq!(say("one"), "one", "echo before the deletion");
    let conns = d.json(&["net", "fw", "conntrack", "list"]);
    let echo = conns
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["dport"] == 7000)
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(echo["state"], "ESTABLISHED", "{conns}");
    assert_eq!(echo["rule"], echo_rule);
    let out = d.ok(&["net", "fw", "rule", "delete", &echo_rule.to_string()]);
    assert!(
        out.contains("1 established connection it opened stay"),
        "{out}"
    );
    assert_eq!(
        say("two"),
        "two",
        "the established connection survives the deletion"
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
        "a new connection after the deletion must fail"
    );
    // Flushing cuts it.
    let out = d.ok(&[
        "net",
        "fw",
        "conntrack",
        "flush",
        "--rule",
        &echo_rule.to_string(),
    ]);
    assert!(out.starts_with("1 connection flushed"), "{out}");
    let cut = say("three");
    assert!(
        cut.starts_with("ERR") && cut.to_lowercase().contains("timeout"),
        "a flushed connection is cut: {cut}"
    );
    drop(cin);
    let _ = client.kill();
    let _ = client.wait();

    // iperf3 TCP and UDP.
    let tcp = iperf_ok(&lab, 0, &["-c", B_IP, "-t", "2"]);
    let mut udp = 0.0;
    for _ in 0..2 {
        udp = iperf_ok(&lab, 0, &["-c", B_IP, "-u", "-b", "20M", "-t", "2"]);
        if udp > 0.0 {
            break;
        }
    }
    eprintln!(
        "iperf3 through dpud: TCP {:.1} Mbit/s, UDP {:.1} Mbit/s",
        tcp / 1e6,
        udp / 1e6
    );
    assert!(tcp > 1e6 && udp > 1e6, "TCP {tcp} UDP {udp} bit/s");

    // Both sides report their CPU; the poller did work.
    let s = d.json(&["net", "stats"]);
    assert!(s["net_cpu_seconds"].as_f64().unwrap() > 0.0, "{s}");
    assert!(s["rx_frames"].as_u64().unwrap() > 1000, "{s}");
    let rules = d.json(&["net", "fw", "rule", "list"]);
    assert!(
        rules[1]["packets"].as_u64().unwrap() > 100,
        "the HTTP rule counted its connection: {rules}"
    );
}

#[test]
#[ignore = "needs root: network namespaces, veth, AF_PACKET/AF_XDP; runs two dpud binaries"]
fn two_dpuds_joined_by_vxlan() {
    let mut lab = Lab::new("v");
    let h1 = lab.host("p", "10.79.0.1");
    let h2 = lab.host("q", "10.79.0.2");
    // The underlay: a veth pair, one end per dpud, MTU room for the 50-byte header.
    let (u1, u2) = (format!("u1{}", lab.tag), format!("u2{}", lab.tag));
    check(&[
        "ip", "link", "add", &u1, "mtu", "1600", "type", "veth", "peer", "name", &u2, "mtu", "1600",
    ]);
    lab.links.push(u1.clone());
    for u in [&u1, &u2] {
        let _ = run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{u}.disable_ipv6=1"),
        ]);
        check(&["ip", "link", "set", u, "up"]);
        no_offloads(None, u);
    }
    let (m1, m2) = (lab.mac_of(None, &u1), lab.mac_of(None, &u2));
    let d1 = Dpud::start(&lab.dir.path().join("d1"), 0.5);
    let d2 = Dpud::start(&lab.dir.path().join("d2"), 0.5);
    for (d, host, up, ip, mac, rip, rmac) in [
        (&d1, &h1, &u1, "192.0.2.1", &m1, "192.0.2.2", &m2),
        (&d2, &h2, &u2, "192.0.2.2", &m2, "192.0.2.1", &m1),
    ] {
        d.ok(&["net", "port", "add", host, "--access", "vni:5000"]);
        d.ok(&[
            "net",
            "port",
            "add",
            up,
            "--uplink",
            "--local-ip",
            ip,
            "--local-mac",
            mac,
        ]);
        d.ok(&[
            "net",
            "vxlan",
            "add",
            "peer",
            "--network",
            "vni:5000",
            "--vni",
            "5000",
            "--uplink",
            up,
            "--remote-ip",
            rip,
            "--remote-mac",
            rmac,
        ]);
        d.ok(&[
            "net",
            "fw",
            "rule",
            "add",
            "--action",
            "allow",
            "--protocol",
            "icmp",
        ]);
        d.ok(&[
            "net",
            "fw",
            "rule",
            "add",
            "--action",
            "allow",
            "--protocol",
            "tcp",
            "--dport",
            "8000",
            "--dst",
            "10.79.0.2/32",
        ]);
    }
    let blob = lab.blob(2);
    lab.http_server(1, "10.79.0.2", 8000);
    let o = lab.ns_run(0, &["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.79.0.2"]);
    assert!(
        o.status.success(),
        "ping across VXLAN: {}\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        d1.ok(&["net", "stats"]),
        d2.ok(&["net", "stats"])
    );
    lab.download(0, "10.79.0.2", 8000, &blob);
    for d in [&d1, &d2] {
        let t = d.json(&["net", "vxlan", "list"]);
        let c = &t[0]["counters"];
        assert!(
            c["rx_packets"].as_u64().unwrap() > 100 && c["tx_packets"].as_u64().unwrap() > 100,
            "the tunnel carried the traffic both ways: {t}"
        );
    }
}
