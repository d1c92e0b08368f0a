//! The Prometheus endpoint, scraped over HTTP and parsed: per-volume counters and
//! latency histograms follow the I/O a test does, node states and process figures are
//! there, and anything but `GET /metrics` is refused.

mod common;

use std::collections::BTreeMap;

use common::api::{export, node_and_volume};
use engine::api::proto;
use engine::api::proto::{nodes_client::NodesClient, volumes_client::VolumesClient};
use engine::api::service::{VolumeService, VolumeState};
use engine::api::testing::{connect_unix, TestDaemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn http(
    addr: std::net::SocketAddr,
    request: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request.as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// Parses the exposition format into `series -> value`, checking every line's shape.
fn parse(body: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in body.lines() {
        if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(
            series[..name_end]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name in {line:?}"
        );
        assert!(
            out.insert(series.to_owned(), v).is_none(),
            "duplicate series {series}"
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_io_and_state() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = TestDaemon::start(dir.path()).await?;
    let addr = d.handle.metrics_addr().ok_or("no metrics listener")?;
    assert!(addr.ip().is_loopback());
    let ch = connect_unix(d.handle.api_socket()).await?;
    let mut nodes = NodesClient::new(ch.clone());
    for i in 0..2 {
        nodes
            .add(proto::AddNodeRequest {
                name: format!("n{i}"),
                address: format!("127.0.0.1:{}", 4420 + i),
                nqn: format!("nqn.2026-11.io.example:n{i}"),
                domain: None,
                weight: None,
            })
            .await?;
    }
    nodes
        .drain(proto::DrainNodeRequest { name: "n1".into() })
        .await?;
    VolumesClient::new(ch)
        .create(proto::CreateVolumeRequest {
            name: "vol1".into(),
            profile: "scratch".into(),
            size_bytes: 1 << 20,
        })
        .await?;

    // I/O through the device the front-ends would serve.
    let dev = d.service.device("vol1").await?.ok_or("no device")?;
    for i in 0..5u64 {
        dev.write(i * 4096, vec![0xab; 8192], false).await?;
    }
    for _ in 0..3 {
        dev.read(0, 4096).await?;
    }
    dev.flush().await?;
    d.service.set_node_status("n0", false, 4, Some("timed out"));
    d.service.set_volume_state("vol1", VolumeState::Degraded, 2);

    let resp = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await?;
    let (head, body) = resp.split_once("\r\n\r\n").ok_or("no header end")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let m = parse(body);
    let get = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("missing {k}\n{body}"))
    };
    assert_eq!(get("dpud_volume_writes_total{volume=\"vol1\"}"), 5.0);
    assert_eq!(
        get("dpud_volume_written_bytes_total{volume=\"vol1\"}"),
        5.0 * 8192.0
    );
    assert_eq!(get("dpud_volume_reads_total{volume=\"vol1\"}"), 3.0);
    assert_eq!(
        get("dpud_volume_read_bytes_total{volume=\"vol1\"}"),
        3.0 * 4096.0
    );
    assert_eq!(get("dpud_volume_flushes_total{volume=\"vol1\"}"), 1.0);
    assert_eq!(get("dpud_volume_degraded{volume=\"vol1\"}"), 1.0);
    assert_eq!(get("dpud_volume_pending_repairs{volume=\"vol1\"}"), 2.0);
    // The histogram is cumulative, ends in +Inf and agrees with its count.
    let buckets: Vec<f64> = m
        .iter()
        .filter(|(k, _)| k.starts_with("dpud_volume_write_latency_seconds_bucket{volume=\"vol1\""))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(buckets.len(), 17);
    let inf = get("dpud_volume_write_latency_seconds_bucket{volume=\"vol1\",le=\"+Inf\"}");
    assert_eq!(inf, 5.0);
    assert_eq!(
        get("dpud_volume_write_latency_seconds_count{volume=\"vol1\"}"),
        5.0
    );
    assert!(buckets.iter().all(|b| *b <= inf));
    assert!(get("dpud_volume_read_latency_seconds_sum{volume=\"vol1\"}") >= 0.0);
    // Nodes.
    assert_eq!(get("dpud_node_state{node=\"n0\",state=\"up\"}"), 1.0);
    assert_eq!(get("dpud_node_state{node=\"n1\",state=\"draining\"}"), 1.0);
    assert_eq!(get("dpud_node_state{node=\"n1\",state=\"up\"}"), 0.0);
    assert_eq!(get("dpud_node_reachable{node=\"n0\"}"), 0.0);
    assert_eq!(get("dpud_node_reachable{node=\"n1\"}"), 1.0);
    assert_eq!(get("dpud_node_errors_total{node=\"n0\"}"), 4.0);
    // The process.
    assert!(get("process_cpu_seconds_total") > 0.0);
    assert!(get("process_resident_memory_bytes") > 1_000_000.0);

    // Anything else is refused.
    let r = http(
        addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let r = http(
        addr,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    let r = http(addr, "garbage\r\n\r\n").await?;
    assert!(r.starts_with("HTTP/1.1 400") || r.is_empty(), "{r}");
    let again = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(
        again.starts_with("HTTP/1.1 200"),
        "still serving after bad requests"
    );

    d.handle.shutdown().await?;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed at shutdown"
    );
    Ok(())
}

/// Scrapes `/metrics` and parses it.
async fn scrape(
    addr: std::net::SocketAddr,
) -> Result<BTreeMap<String, f64>, Box<dyn std::error::Error>> {
    let resp = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await?;
    let (head, body) = resp.split_once("\r\n\r\n").ok_or("no header end")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(parse(body))
}

/// The `dpud_nvme_tcp_*` series of `export`, in the order
/// controllers, requests, reads, writes, read bytes, written bytes, errors.
fn nvme_series(m: &BTreeMap<String, f64>, export: &str) -> [f64; 7] {
    [
        "controllers",
        "requests_total",
        "reads_total",
        "writes_total",
        "read_bytes_total",
        "written_bytes_total",
        "errors_total",
    ]
    .map(|s| {
        let k = format!("dpud_nvme_tcp_{s}{{export=\"{export}\"}}");
        *m.get(&k).unwrap_or_else(|| panic!("missing {k}: {m:?}"))
    })
}

/// NVMe/TCP exports have per-export counters on `/metrics`, named and labelled as the
/// NBD and vhost-user-blk ones: every I/O command a host sends moves them by exactly
/// what it did (reads, writes, their bytes; a range beyond the namespace and a write
/// to a read-only export are errors), admin commands do not, and each export counts
/// its own commands only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvme_tcp_export_counters_follow_the_commands() -> TestResult {
    use bytes::Bytes;
    use engine::api::proto::exports_client::ExportsClient;
    use nvmeof::host::{Controller, HostConfig};
    use nvmeof::nvme::{IoCommand, StatusCode};
    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:12345678-0000-0000-0000-0000000000cc";

    let dir = tempfile::tempdir()?;
    let d = TestDaemon::start(dir.path()).await?;
    let addr = d.handle.metrics_addr().ok_or("no metrics listener")?;
    let ch = connect_unix(d.handle.api_socket()).await?;
    node_and_volume(&ch, "n0", 4 << 20).await?;
    let exports = ExportsClient::new(ch);
    let add = |name: &str, kind: proto::ExportType, read_only: bool| {
        let hosts = if kind == proto::ExportType::NvmeTcp {
            vec![HOST.into()]
        } else {
            Vec::new()
        };
        let req = export(kind, name, read_only, hosts);
        let mut exports = exports.clone();
        async move { exports.add(req).await.map(tonic::Response::into_inner) }
    };
    let rw = add("v-nvme", proto::ExportType::NvmeTcp, false).await?;
    let ro = add("v-ro", proto::ExportType::NvmeTcp, true).await?;
    add("v-nbd", proto::ExportType::Nbd, false).await?;

    let m = scrape(addr).await?;
    assert_eq!(nvme_series(&m, "v-nvme"), [0.0; 7]);
    assert_eq!(nvme_series(&m, "v-ro"), [0.0; 7]);
    // The same scheme as the NBD export's series.
    assert_eq!(
        m.get("dpud_nbd_requests_total{export=\"v-nbd\"}"),
        Some(&0.0)
    );

    let host = |e: &proto::Export| -> Result<HostConfig, Box<dyn std::error::Error>> {
        let mut hc = HostConfig::new(e.nvme_address.parse()?, e.nvme_subnqn.clone());
        hc.hostnqn = HOST.into();
        hc.io_queues = 2;
        Ok(hc)
    };
    let c = Controller::connect(host(&rw)?).await?;
    // Connecting and Identify are admin commands: not counted.
    assert_eq!(c.namespace(1).await?.blocks, 1024);
    let m = scrape(addr).await?;
    assert_eq!(
        nvme_series(&m, "v-nvme"),
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    );

    // Three writes (16, 2 and 1 blocks), two reads (16 and 2 blocks), a flush.
    c.write(0, 1, 0, Bytes::from(vec![0x11; 65536]), false)
        .await?;
    c.write(1, 1, 100, Bytes::from(vec![0x22; 8192]), true)
        .await?;
    c.write(0, 1, 1023, Bytes::from(vec![0x33; 4096]), false)
        .await?;
    assert_eq!(&c.read(1, 1, 0, 16).await?[..], &[0x11; 65536][..]);
    assert_eq!(&c.read(0, 1, 100, 2).await?[..], &[0x22; 8192][..]);
    c.flush(1, 1).await?;
    // Two bad requests: a read and a write of two blocks from the last one.
    for (cmd, data, read_len) in [
        (
            IoCommand::Read {
                nsid: 1,
                slba: 1023,
                nlb: 1,
                fua: false,
            },
            Bytes::new(),
            8192,
        ),
        (
            IoCommand::Write {
                nsid: 1,
                slba: 1023,
                nlb: 1,
                fua: false,
            },
            Bytes::from(vec![0x44; 8192]),
            0,
        ),
    ] {
        let e = c
            .io_raw(0, cmd, data, read_len)
            .await
            .err()
            .ok_or("a range beyond the namespace was accepted")?;
        assert_eq!(
            e.status().map(|s| s.code),
            Some(StatusCode::LBA_OUT_OF_RANGE),
            "{e}"
        );
    }
    let m = scrape(addr).await?;
    assert_eq!(
        nvme_series(&m, "v-nvme"),
        [
            1.0,
            8.0,
            2.0,
            3.0,
            f64::from(65536 + 8192),
            f64::from(65536 + 8192 + 4096),
            2.0
        ]
    );
    assert_eq!(nvme_series(&m, "v-ro"), [0.0; 7]);

    // The read-only export: a read, and a write it refuses.
    let r = Controller::connect(host(&ro)?).await?;
    assert_eq!(&r.read(0, 1, 100, 1).await?[..], &[0x22; 4096][..]);
    let e = r
        .write(0, 1, 5, Bytes::from(vec![0x55; 4096]), false)
        .await
        .err()
        .ok_or("a read-only export took a write")?;
    assert_eq!(
        e.status().map(|s| s.code),
        Some(StatusCode::NAMESPACE_WRITE_PROTECTED),
        "{e}"
    );
    let m = scrape(addr).await?;
    assert_eq!(
        nvme_series(&m, "v-ro"),
        [1.0, 2.0, 1.0, 0.0, 4096.0, 0.0, 1.0]
    );
    assert_eq!(nvme_series(&m, "v-nvme")[1], 8.0);

    // The counters outlive the host's association.
    c.shutdown().await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let s = nvme_series(&scrape(addr).await?, "v-nvme");
        if s[0] == 0.0 {
            assert_eq!(s[1..], [8.0, 2.0, 3.0, 73728.0, 77824.0, 2.0]);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "controller still counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(r);
    d.handle.shutdown().await?;
    Ok(())
}
