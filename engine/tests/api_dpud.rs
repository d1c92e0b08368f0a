//! The `dpud` binary: flags over the configuration file, `--print-config`, refusals of
//! a bad configuration, and how it ends: the clear stop while the engine pool is not
//! wired in, or, once it is, a clean exit 0 on SIGTERM.

use std::process::Command;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn dpud_reads_its_config_and_says_what_is_missing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("dpud.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\ncores = 2\n[api]\nsocket = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[nbd]\ntcp = \"127.0.0.1:0\"\n",
            dir.path().join("data").display(),
            dir.path().join("api.sock").display()
        ),
    )?;
    let bin = env!("CARGO_BIN_EXE_dpud");
    let o = Command::new(bin)
        .args([
            "--config",
            cfg.to_str().ok_or("path")?,
            "--cores",
            "3",
            "--log-json",
            "--print-config",
        ])
        .output()?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed = String::from_utf8(o.stdout)?;
    let back = engine::daemon::Config::from_toml(&printed, &cfg)?;
    assert_eq!(back.cores, Some(3), "the flag overrides the file");
    assert_eq!(back.log_format, engine::daemon::LogFormat::Json);
    assert_eq!(back.api.socket, dir.path().join("api.sock"));
    assert_eq!(
        back.nbd.socket,
        Some("/run/dpud/nbd.sock".into()),
        "defaults fill the rest"
    );

    // A typo in the file is an error naming the key.
    std::fs::write(&cfg, "[metric]\nlisten = \"127.0.0.1:0\"\n")?;
    let o = Command::new(bin)
        .args(["--config", cfg.to_str().ok_or("path")?])
        .output()?;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unknown field `metric`"), "{err}");
    // A remote bind without allow_remote is refused.
    let o = Command::new(bin)
        .args([
            "--data-dir",
            dir.path().join("d").to_str().ok_or("path")?,
            "--api-tcp",
            "0.0.0.0:7000",
        ])
        .output()?;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("allow_remote"));

    // With a fresh data directory dpud creates its key file, then either stops with
    // the reason while the engine's pool is not wired in, or runs until SIGTERM and
    // then exits 0 after a clean stop.
    let data = dir.path().join("d2");
    let sock = dir.path().join("a.sock");
    let log = std::fs::File::create(dir.path().join("dpud.log"))?;
    let mut child = Command::new(bin)
        .args([
            "--data-dir",
            data.to_str().ok_or("path")?,
            "--api-socket",
            sock.to_str().ok_or("path")?,
            "--nbd-socket",
            dir.path().join("n.sock").to_str().ok_or("path")?,
            "--nbd-tcp",
            "127.0.0.1:0",
            "--no-metrics",
        ])
        .stderr(log)
        .spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            let err = std::fs::read_to_string(dir.path().join("dpud.log"))?;
            assert!(
                err.contains("the volume engine pool is not wired yet"),
                "{err}"
            );
            break status;
        }
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            let kill = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
            assert!(kill.success());
            let status = child.wait()?;
            assert!(status.success(), "dpud exits 0 after SIGTERM: {status}");
            assert!(!sock.exists(), "socket removed at shutdown");
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return Err("dpud neither stopped nor opened its socket in 60 s".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = status;
    assert_eq!(std::fs::metadata(data.join("kek"))?.len(), 32);
    Ok(())
}
