//! The `nvmeof-target` binary: flags, TOML configuration, ready file, stdout line,
//! and clean exit on SIGTERM/SIGINT.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod target_support;

use nvmeof::nvme::{IdentifyCns, IdentifyNamespace, StatusCode};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use target_support::*;

fn spawn(args: &[&str], ready: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_nvmeof-target"))
        .args(args)
        .arg("--ready-file")
        .arg(ready)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_ready(child: &mut Child, ready: &Path) -> std::net::SocketAddr {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(ready) {
            if s.ends_with('\n') {
                return s.trim().parse().unwrap();
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output_ref();
            panic!("target exited early with {st}: {out}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "target not ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

trait OutputRef {
    fn wait_with_output_ref(&mut self) -> String;
}

impl OutputRef for Child {
    fn wait_with_output_ref(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(e) = self.stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

fn finish(mut child: Child) -> (std::process::ExitStatus, String) {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (st, String::from_utf8_lossy(&out.stdout).into_owned());
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "target did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_binary_cli_serves_and_exits_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("addr");
    let img = dir.path().join("ns2.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let mut child = spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--subsystem",
            SUBNQN,
            "--memory",
            "8MiB",
            "--file",
            img.to_str().unwrap(),
            "--allow-host",
            HOSTNQN,
        ],
        &ready,
    );
    let addr = wait_ready(&mut child, &ready);
    let mut a = Client::connect(addr).await;
    a.admin_setup(SUBNQN, 0).await;
    let (c, d) = a.identify(IdentifyCns::NAMESPACE, 1).await;
    assert!(c.status.is_success());
    assert_eq!(IdentifyNamespace::decode(&d).unwrap().nsze, (8 << 20) / 512);
    let (c, d) = a.identify(IdentifyCns::NAMESPACE, 2).await;
    assert!(c.status.is_success());
    assert_eq!(
        IdentifyNamespace::decode(&d).unwrap().nsze,
        (4 << 20) / 4096
    );
    let mut b = Client::connect(addr).await;
    let c = b
        .fabrics_connect(SUBNQN, OTHER_HOST, 0, 31, 0xFFFF, 0)
        .await;
    assert_eq!(sc(&c), StatusCode::CONNECT_INVALID_HOST);
    signal(&child, libc::SIGTERM);
    a.expect_closed().await;
    let (st, out) = finish(child);
    assert!(st.success(), "{st}");
    assert!(out.contains(&format!("listening on {addr}")), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_binary_toml_config_and_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("addr");
    let cfg = dir.path().join("t.toml");
    let img = dir.path().join("created.img");
    std::fs::write(
        &cfg,
        format!(
            r#"
listen = "127.0.0.1:0"
[limits]
queue_depth = 64
[[subsystem]]
nqn = "{SUBNQN}"
allowed_hosts = ["{HOSTNQN}"]
[[subsystem.namespace]]
memory = "1MiB"
[[subsystem.namespace]]
nsid = 4
file = "{}"
create_size = "2MiB"
io = "blocking"
[[subsystem]]
nqn = "nqn.2026-11.io.test:other"
allow_any_host = true
"#,
            img.display()
        ),
    )
    .unwrap();
    let mut child = spawn(&["--config", cfg.to_str().unwrap()], &ready);
    let addr = wait_ready(&mut child, &ready);
    let mut a = Client::connect(addr).await;
    a.admin_setup(SUBNQN, 0).await;
    let cap = a
        .prop_get(
            nvmeof::nvme::property::CAP,
            nvmeof::nvme::PropertySize::Eight,
        )
        .await;
    assert_eq!(cap & 0xFFFF, 63, "queue_depth from the file");
    let (c, d) = a.identify(IdentifyCns::NAMESPACE, 4).await;
    assert!(c.status.is_success());
    assert_eq!(
        IdentifyNamespace::decode(&d).unwrap().nsze,
        (2 << 20) / 4096
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 2 << 20);
    let mut b = Client::connect(addr).await;
    let c = b
        .fabrics_connect("nqn.2026-11.io.test:other", OTHER_HOST, 0, 31, 0xFFFF, 0)
        .await;
    assert!(c.status.is_success());
    signal(&child, libc::SIGINT);
    let (st, _) = finish(child);
    assert!(st.success(), "{st}");
}

#[test]
fn target_binary_rejects_bad_arguments() {
    let bin = env!("CARGO_BIN_EXE_nvmeof-target");
    for args in [
        vec!["--memory", "1MiB"],
        vec!["--subsystem", SUBNQN, "--memory", "12XB"],
        vec!["--subsystem", SUBNQN, "--file", "/nonexistent/img"],
        vec![],
    ] {
        let out = Command::new(bin).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(!out.stderr.is_empty());
    }
}
