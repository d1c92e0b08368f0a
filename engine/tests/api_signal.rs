//! Graceful shutdown on a signal, as dpud's main runs it
//! (`engine::daemon::run_until_signal`): SIGTERM to this process stops the listeners,
//! flushes the engine and removes the sockets. Alone in its test binary because the
//! signal goes to the whole process.

use std::time::Duration;

use engine::api::testing::TestDaemon;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_daemon_and_flushes_the_engine() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = TestDaemon::start(dir.path()).await?;
    let service = d.service.clone();
    let api = d.handle.api_socket().to_owned();
    let nbd = d.handle.nbd_socket().ok_or("no nbd socket")?.to_owned();
    let waiter = tokio::spawn(engine::daemon::run_until_signal(d.handle));
    // Let the handlers be installed, then signal.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "it waits for a signal");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()?;
    assert!(status.success());
    tokio::time::timeout(Duration::from_secs(20), waiter).await???;
    assert!(service.was_shut_down(), "the engine was flushed");
    assert!(!api.exists() && !nbd.exists(), "sockets removed");
    Ok(())
}
