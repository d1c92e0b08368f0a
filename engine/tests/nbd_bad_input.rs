//! The NBD server against a client that breaks the protocol, speaking raw bytes over
//! a socket: each mistake must cost only that request (an errno reply) or only that
//! connection (the server closes it), and afterwards new connections to the same and
//! to another export must work and find their data intact. `docs/nbd.md` lists which
//! mistakes end a connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::random_bytes;
use engine::frontend::nbd::{NbdConfig, NbdError, NbdListener, NbdServer};
use engine::frontend::{BlockDevice, MemoryDevice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const FLAG_FUA: u16 = 1;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const SIZE: u64 = 4 << 20;

/// Two writable exports and a read-only one, each holding a known pattern in its
/// first 64 KiB.
struct Fixture {
    server: NbdServer,
    tcp: NbdListener,
    devices: Vec<(&'static str, Arc<MemoryDevice>, Vec<u8>)>,
}

impl Fixture {
    async fn new() -> Self {
        Self::with_config(NbdConfig::default()).await
    }

    async fn with_config(config: NbdConfig) -> Self {
        let server = NbdServer::with_config(config).unwrap();
        let mut devices = Vec::new();
        for (i, name) in ["a", "b", "ro"].into_iter().enumerate() {
            let dev = MemoryDevice::new(SIZE, 4096);
            let data = random_bytes(65536, 7 + i as u64);
            dev.write(0, data.clone(), false).await.unwrap();
            let dev = Arc::new(if name == "ro" {
                dev.into_read_only()
            } else {
                dev
            });
            server.add_export(name, dev.clone(), None).unwrap();
            devices.push((name, dev, data));
        }
        let tcp = server
            .serve_tcp("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        Self {
            server,
            tcp,
            devices,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.tcp.local_addr().unwrap()
    }

    /// New connections to "a" and "b" work: the known pattern reads back through
    /// NBD, and a write to a scratch block reads back. The read-only export's
    /// pattern is checked too.
    async fn check_healthy(&self) {
        for (name, dev, data) in &self.devices {
            let mut c = Client::go(self.addr(), name, true).await;
            assert_eq!(c.read(0, 65536).await.unwrap(), *data, "export {name}");
            if *name != "ro" {
                let block = random_bytes(4096, 99);
                assert_eq!(c.write(1 << 20, &block, 0).await, 0);
                assert_eq!(c.read(1 << 20, 4096).await.unwrap(), block);
            }
            c.disconnect().await;
            assert_eq!(dev.read(0, 65536).await.unwrap(), *data, "export {name}");
        }
    }
}

struct Client {
    s: TcpStream,
    structured: bool,
    next_handle: u64,
}

impl Client {
    /// Connects and reads the server greeting.
    async fn connect(addr: SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await.unwrap();
        assert_eq!(&g[..8], NBDMAGIC);
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
        assert_eq!(&g[16..], &[0, 3], "FIXED_NEWSTYLE | NO_ZEROES");
        s
    }

    /// Connects, sends the client flags (fixed newstyle, no zeroes).
    async fn options(addr: SocketAddr) -> TcpStream {
        let mut s = Self::connect(addr).await;
        s.write_all(&3u32.to_be_bytes()).await.unwrap();
        s
    }

    /// A connection in transmission on `name` through NBD_OPT_GO.
    async fn go(addr: SocketAddr, name: &str, structured: bool) -> Self {
        let mut s = Self::options(addr).await;
        if structured {
            send_option(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(read_option_reply(&mut s).await.1, REP_ACK);
        }
        let (reply, _) = go_option(&mut s, OPT_GO, name).await;
        assert_eq!(reply, REP_ACK, "GO {name}");
        Self {
            s,
            structured,
            next_handle: 1,
        }
    }

    async fn send(&mut self, flags: u16, kind: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b).await.unwrap();
        handle
    }

    /// Reads one reply: (handle, errno, data of a successful read, error message).
    async fn reply(&mut self, read_len: usize) -> (u64, u32, Vec<u8>, String) {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).await.unwrap();
        match u32::from_be_bytes(magic) {
            0x6744_6698 => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).await.unwrap();
                let err = u32::from_be_bytes(h[..4].try_into().unwrap());
                let handle = u64::from_be_bytes(h[4..].try_into().unwrap());
                let mut data = vec![0u8; if err == 0 { read_len } else { 0 }];
                self.s.read_exact(&mut data).await.unwrap();
                (handle, err, data, String::new())
            }
            0x668e_33ef => {
                assert!(self.structured, "structured reply without negotiation");
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).await.unwrap();
                let flags = u16::from_be_bytes(h[..2].try_into().unwrap());
                let kind = u16::from_be_bytes(h[2..4].try_into().unwrap());
                let handle = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let len = u32::from_be_bytes(h[12..].try_into().unwrap()) as usize;
                assert_eq!(flags & 1, 1, "one chunk per reply, marked DONE");
                let mut p = vec![0u8; len];
                self.s.read_exact(&mut p).await.unwrap();
                match kind {
                    1 => (handle, 0, p[8..].to_vec(), String::new()),
                    0x8001 => {
                        let err = u32::from_be_bytes(p[..4].try_into().unwrap());
                        let mlen = u16::from_be_bytes(p[4..6].try_into().unwrap()) as usize;
                        assert_eq!(mlen + 6, len);
                        let msg = String::from_utf8(p[6..].to_vec()).unwrap();
                        (handle, err, Vec::new(), msg)
                    }
                    other => panic!("unexpected chunk type {other:#x}"),
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Sends a request and waits for its reply: (errno, data).
    async fn call(
        &mut self,
        flags: u16,
        kind: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> (u32, Vec<u8>) {
        let h = self.send(flags, kind, offset, len, payload).await;
        let read_len = if kind == CMD_READ { len as usize } else { 0 };
        let (handle, err, data, _) = self.reply(read_len).await;
        assert_eq!(handle, h);
        (err, data)
    }

    async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        match self.call(0, CMD_READ, offset, len, &[]).await {
            (0, d) => Ok(d),
            (e, _) => Err(e),
        }
    }

    async fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        let len = u32::try_from(data.len()).unwrap();
        self.call(flags, CMD_WRITE, offset, len, data).await.0
    }

    async fn disconnect(mut self) {
        self.send(0, CMD_DISC, 0, 0, &[]).await;
        expect_closed(&mut self.s).await;
    }
}

async fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
}

/// (option, reply type, data)
async fn read_option_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(&h[..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
    let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await.unwrap();
    (option, kind, data)
}

/// Sends NBD_OPT_GO or NBD_OPT_INFO for `name` asking for block sizes and the
/// name; returns the final reply type and the NBD_REP_INFO payloads.
async fn go_option(s: &mut TcpStream, option: u32, name: &str) -> (u32, Vec<Vec<u8>>) {
    let mut d = u32::try_from(name.len()).unwrap().to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&2u16.to_be_bytes());
    d.extend_from_slice(&3u16.to_be_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    send_option(s, option, &d).await;
    let mut infos = Vec::new();
    loop {
        let (opt, kind, data) = read_option_reply(s).await;
        assert_eq!(opt, option);
        if kind == REP_INFO {
            infos.push(data);
        } else {
            return (kind, infos);
        }
    }
}

/// The server closes the connection (EOF or reset) within a few seconds, sending
/// nothing more.
async fn expect_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 256];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the server did not close the connection");
    match r {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!(
            "expected the connection to close, got {n} bytes: {:?}",
            &buf[..n]
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_magic_or_flags_in_the_handshake_close_only_that_connection() {
    let f = Fixture::new().await;
    // Unknown client flag.
    let mut s = Client::connect(f.addr()).await;
    s.write_all(&0x8000_0001u32.to_be_bytes()).await.unwrap();
    expect_closed(&mut s).await;
    // An option without the IHAVEOPT magic.
    let mut s = Client::options(f.addr()).await;
    s.write_all(&[0x42; 16]).await.unwrap();
    expect_closed(&mut s).await;
    // Closing inside an option's data.
    let mut s = Client::options(f.addr()).await;
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&100u32.to_be_bytes());
    b.extend_from_slice(&[0; 10]);
    s.write_all(&b).await.unwrap();
    drop(s);
    // Gone before the client flags.
    drop(Client::connect(f.addr()).await);
    f.check_healthy().await;
    assert!(
        f.server.handshake_failures() >= 3,
        "{}",
        f.server.handshake_failures()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_malformed_options_fail_and_the_haggling_continues() {
    let f = Fixture::new().await;
    let mut s = Client::options(f.addr()).await;
    for option in [42, 5, 9, 10, 11] {
        // Unknown, STARTTLS, and the meta-context and extended-header options.
        send_option(&mut s, option, b"xyz").await;
        let (o, kind, msg) = read_option_reply(&mut s).await;
        assert_eq!((o, kind), (option, REP_ERR_UNSUP));
        assert!(!msg.is_empty(), "error replies carry a message");
    }
    send_option(&mut s, OPT_LIST, b"junk").await;
    assert_eq!(read_option_reply(&mut s).await.1, REP_ERR_INVALID);
    send_option(&mut s, OPT_STRUCTURED_REPLY, b"x").await;
    assert_eq!(read_option_reply(&mut s).await.1, REP_ERR_INVALID);
    // GO with a name length beyond the data, and with a wrong info count.
    send_option(&mut s, OPT_GO, &[0, 0, 0, 200, b'a', 0, 0]).await;
    assert_eq!(read_option_reply(&mut s).await.1, REP_ERR_INVALID);
    send_option(&mut s, OPT_INFO, &[0, 0, 0, 1, b'a', 0, 5, 0, 3]).await;
    assert_eq!(read_option_reply(&mut s).await.1, REP_ERR_INVALID);
    // Option data too long to be read is skipped and refused.
    let mut big = IHAVEOPT.to_be_bytes().to_vec();
    big.extend_from_slice(&OPT_INFO.to_be_bytes());
    big.extend_from_slice(&(200_000u32).to_be_bytes());
    big.extend(std::iter::repeat_n(0u8, 200_000));
    s.write_all(&big).await.unwrap();
    assert_eq!(read_option_reply(&mut s).await.1, REP_ERR_INVALID);
    // NBD_OPT_LIST names every export.
    send_option(&mut s, OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let (_, kind, data) = read_option_reply(&mut s).await;
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_SERVER);
        let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(data[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["a", "b", "ro"]);
    // INFO on a good export: size, flags and block sizes; the haggling goes on.
    let (kind, infos) = go_option(&mut s, OPT_INFO, "b").await;
    assert_eq!(kind, REP_ACK);
    let export = infos
        .iter()
        .find(|i| i[..2] == [0, 0])
        .expect("NBD_INFO_EXPORT");
    assert_eq!(u64::from_be_bytes(export[2..10].try_into().unwrap()), SIZE);
    let flags = u16::from_be_bytes(export[10..12].try_into().unwrap());
    assert_eq!(flags & 1, 1, "HAS_FLAGS");
    assert_eq!(flags & 2, 0, "not read-only");
    assert_ne!(flags & (1 << 8), 0, "CAN_MULTI_CONN");
    let sizes = infos
        .iter()
        .find(|i| i[..2] == [0, 3])
        .expect("NBD_INFO_BLOCK_SIZE");
    assert_eq!(sizes.len(), 14);
    assert_eq!(&sizes[2..6], &4096u32.to_be_bytes());
    assert_eq!(&sizes[6..10], &4096u32.to_be_bytes());
    assert_eq!(&sizes[10..14], &(32u32 << 20).to_be_bytes());
    let name = infos
        .iter()
        .find(|i| i[..2] == [0, 1])
        .expect("NBD_INFO_NAME");
    assert_eq!(&name[2..], b"b");
    // Then GO on the same connection works.
    let (kind, _) = go_option(&mut s, OPT_GO, "a").await;
    assert_eq!(kind, REP_ACK);
    let mut c = Client {
        s,
        structured: false,
        next_handle: 1,
    };
    assert_eq!(c.read(0, 65536).await.unwrap(), f.devices[0].2);
    c.disconnect().await;
    f.check_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_export_names() {
    let f = Fixture::new().await;
    // Through GO/INFO: an error reply, and the connection goes on.
    let mut s = Client::options(f.addr()).await;
    for option in [OPT_INFO, OPT_GO] {
        let (kind, infos) = go_option(&mut s, option, "nope").await;
        assert_eq!(kind, REP_ERR_UNKNOWN);
        assert!(infos.is_empty());
    }
    // The empty name is the default export only when there is exactly one.
    let (kind, _) = go_option(&mut s, OPT_GO, "").await;
    assert_eq!(kind, REP_ERR_UNKNOWN);
    send_option(&mut s, OPT_ABORT, &[]).await;
    assert_eq!(read_option_reply(&mut s).await.1, REP_ACK);
    expect_closed(&mut s).await;
    // Through EXPORT_NAME the protocol has no error reply: the server closes.
    let mut s = Client::options(f.addr()).await;
    send_option(&mut s, OPT_EXPORT_NAME, b"nope").await;
    expect_closed(&mut s).await;
    // A known name through EXPORT_NAME works (size, flags, no zero padding).
    let mut s = Client::options(f.addr()).await;
    send_option(&mut s, OPT_EXPORT_NAME, b"b").await;
    let mut h = [0u8; 10];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), SIZE);
    let mut c = Client {
        s,
        structured: false,
        next_handle: 1,
    };
    assert_eq!(c.read(0, 65536).await.unwrap(), f.devices[1].2);
    c.disconnect().await;
    f.check_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_fail_with_errno_and_the_connection_goes_on() {
    let f = Fixture::new().await;
    for structured in [false, true] {
        let mut c = Client::go(f.addr(), "a", structured).await;
        let block = random_bytes(4096, 5);
        // Misaligned read and write (the write's payload is consumed).
        assert_eq!(c.read(512, 4096).await, Err(EINVAL));
        assert_eq!(c.read(0, 1000).await, Err(EINVAL));
        assert_eq!(c.write(100, &block, 0).await, EINVAL);
        assert_eq!(c.write(0, &block[..1000], 0).await, EINVAL);
        // Zero-length requests.
        assert_eq!(c.read(0, 0).await, Err(EINVAL));
        assert_eq!(c.write(0, &[], 0).await, EINVAL);
        // Out of range: reads and trims EINVAL, writes ENOSPC, also near 2^64.
        assert_eq!(c.read(SIZE, 4096).await, Err(EINVAL));
        assert_eq!(c.read(u64::MAX - 4095, 4096).await, Err(EINVAL));
        assert_eq!(c.write(SIZE - 4096, &[0; 8192], 0).await, ENOSPC);
        assert_eq!(c.write(u64::MAX - 4095, &block, 0).await, ENOSPC);
        assert_eq!(c.call(0, CMD_TRIM, SIZE, 4096, &[]).await.0, EINVAL);
        assert_eq!(c.call(0, CMD_WRITE_ZEROES, SIZE, 4096, &[]).await.0, ENOSPC);
        // A read beyond the maximum block size fails; the connection goes on.
        assert_eq!(c.read(0, (32 << 20) + 4096).await, Err(EINVAL));
        // Unknown commands (CACHE, BLOCK_STATUS, RESIZE, made up) and flags.
        for kind in [5, 7, 8, 99, 0xffff] {
            assert_eq!(
                c.call(0, kind, 0, 4096, &[]).await.0,
                EINVAL,
                "command {kind}"
            );
        }
        assert_eq!(c.call(1 << 7, CMD_READ, 0, 4096, &[]).await.0, EINVAL);
        assert_eq!(c.call(2, CMD_WRITE, 0, 4096, &block).await.0, EINVAL);
        // DF on a read is valid only with structured replies.
        let df = c.call(4, CMD_READ, 0, 4096, &[]).await.0;
        assert_eq!(df, if structured { 0 } else { EINVAL });
        assert_eq!(c.call(0, CMD_FLUSH, 4096, 0, &[]).await.0, EINVAL);
        // Nothing above changed the data; good requests still work.
        assert_eq!(c.read(0, 65536).await.unwrap(), f.devices[0].2);
        assert_eq!(c.write(2 << 20, &block, FLAG_FUA).await, 0);
        assert_eq!(c.call(0, CMD_FLUSH, 0, 0, &[]).await.0, 0);
        assert_eq!(c.read(2 << 20, 4096).await.unwrap(), block);
        assert_eq!(c.call(3, CMD_WRITE_ZEROES, 2 << 20, 4096, &[]).await.0, 0);
        assert_eq!(c.read(2 << 20, 4096).await.unwrap(), vec![0; 4096]);
        assert_eq!(c.write(2 << 20, &block, 0).await, 0);
        assert_eq!(c.call(1, CMD_TRIM, 2 << 20, 4096, &[]).await.0, 0);
        assert_eq!(c.read(2 << 20, 4096).await.unwrap(), vec![0; 4096]);
        c.disconnect().await;
    }
    // Structured error chunks carry a message for a human.
    let mut c = Client::go(f.addr(), "a", true).await;
    let h = c.send(0, CMD_READ, SIZE, 4096, &[]).await;
    let (handle, err, _, msg) = c.reply(0).await;
    assert_eq!((handle, err), (h, EINVAL));
    assert!(msg.contains("beyond"), "{msg}");
    c.disconnect().await;
    let stats = f.server.stats("a").unwrap();
    assert!(stats.errors >= 40, "{stats:?}");
    assert_eq!(stats.dropped_connections, 0, "{stats:?}");
    f.check_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_a_read_only_export_fail_with_eperm() {
    let f = Fixture::new().await;
    let mut c = Client::go(f.addr(), "ro", true).await;
    assert_eq!(c.write(0, &[1; 4096], 0).await, EPERM);
    assert_eq!(c.call(0, CMD_TRIM, 0, 4096, &[]).await.0, EPERM);
    assert_eq!(c.call(0, CMD_WRITE_ZEROES, 0, 4096, &[]).await.0, EPERM);
    assert_eq!(c.call(0, CMD_FLUSH, 0, 0, &[]).await.0, 0);
    assert_eq!(c.read(0, 65536).await.unwrap(), f.devices[2].2);
    c.disconnect().await;
    // The read-only flag is advertised.
    let mut s = Client::options(f.addr()).await;
    let (_, infos) = go_option(&mut s, OPT_INFO, "ro").await;
    let export = infos.iter().find(|i| i[..2] == [0, 0]).unwrap();
    assert_ne!(
        u16::from_be_bytes(export[10..12].try_into().unwrap()) & 2,
        0
    );
    f.check_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_in_transmission_close_only_that_connection() {
    let f = Fixture::new().await;
    // A request with a bad magic.
    let mut c = Client::go(f.addr(), "a", true).await;
    c.s.write_all(&[0xde; 28]).await.unwrap();
    expect_closed(&mut c.s).await;
    // A write announcing more than the maximum block size.
    let mut c = Client::go(f.addr(), "a", false).await;
    c.send(0, CMD_WRITE, 0, (32 << 20) + 4096, &[1; 4096]).await;
    expect_closed(&mut c.s).await;
    // Closing in the middle of a write payload: nothing of it is written.
    let mut c = Client::go(f.addr(), "a", false).await;
    c.send(0, CMD_WRITE, 0, 65536, &[0xee; 30000]).await;
    drop(c);
    // Closing in the middle of a request header.
    let mut c = Client::go(f.addr(), "b", false).await;
    c.s.write_all(&0x2560_9513u32.to_be_bytes()).await.unwrap();
    c.s.write_all(&[0, 0, 0, 1, 0, 0]).await.unwrap();
    drop(c);
    // Closing with requests in flight and their replies unread.
    let mut c = Client::go(f.addr(), "b", true).await;
    for i in 0..32 {
        c.send(0, CMD_READ, i * 4096, 4096, &[]).await;
    }
    drop(c);
    // Give the server a moment to notice, then check everything still works.
    tokio::time::sleep(Duration::from_millis(200)).await;
    f.check_healthy().await;
    let a = f.server.stats("a").unwrap();
    assert_eq!(a.dropped_connections, 3, "{a:?}");
    assert_eq!(a.connections, 0, "{a:?}");
    assert_eq!(f.server.stats("b").unwrap().connections, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_all_answered_and_disc_waits_for_them() {
    // A small in-flight cap, so that the server has to stop reading and resume.
    let config = NbdConfig {
        max_in_flight: 4,
        max_in_flight_bytes: 32 << 20,
        ..NbdConfig::default()
    };
    let f = Fixture::with_config(config).await;
    let mut c = Client::go(f.addr(), "a", true).await;
    let data = random_bytes(64 * 4096, 3);
    let mut handles = std::collections::HashSet::new();
    for i in 0..64u64 {
        let off = (1 << 20) + i * 4096;
        let chunk = &data[usize::try_from(i * 4096).unwrap()..][..4096];
        handles.insert(c.send(0, CMD_WRITE, off, 4096, chunk).await);
    }
    for _ in 0..64 {
        let (h, err, _, _) = c.reply(0).await;
        assert_eq!(err, 0);
        assert!(handles.remove(&h), "unknown or repeated handle {h}");
    }
    // Writes followed at once by DISC: the server finishes them before closing.
    for i in 0..16u64 {
        c.send(
            FLAG_FUA,
            CMD_WRITE,
            (2 << 20) + i * 4096,
            4096,
            &[u8::try_from(i + 1).unwrap(); 4096],
        )
        .await;
    }
    c.send(0, CMD_DISC, 0, 0, &[]).await;
    let mut replies = 0;
    let mut buf = vec![0u8; 16];
    while c.s.read_exact(&mut buf).await.is_ok() {
        assert_eq!(&buf[4..8], &[0; 4]);
        replies += 1;
    }
    assert_eq!(replies, 16);
    let dev = &f.devices[0].1;
    assert_eq!(dev.read(1 << 20, 64 * 4096).await.unwrap(), data);
    for i in 0..16u64 {
        let b = dev.read((2 << 20) + i * 4096, 4096).await.unwrap();
        assert!(b.iter().all(|&x| x == u8::try_from(i + 1).unwrap()));
    }
    f.check_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let config = NbdConfig {
        handshake_timeout: Duration::from_millis(500),
        ..NbdConfig::default()
    };
    let f = Fixture::with_config(config).await;
    let mut s = Client::options(f.addr()).await;
    expect_closed(&mut s).await;
    assert_eq!(f.server.handshake_failures(), 1);
    f.check_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_export_closes_its_connections_only() {
    let f = Fixture::new().await;
    let mut a = Client::go(f.addr(), "a", true).await;
    let mut b = Client::go(f.addr(), "b", true).await;
    assert!(a.read(0, 4096).await.is_ok());
    assert_eq!(f.server.stats("a").unwrap().connections, 1);
    f.server.remove_export("a").unwrap();
    expect_closed(&mut a.s).await;
    assert_eq!(b.read(0, 65536).await.unwrap(), f.devices[1].2);
    b.disconnect().await;
    assert_eq!(f.server.exports(), ["b", "ro"]);
    assert!(f.server.stats("a").is_none());
    // It can no longer be reached, and it can be added again.
    let mut s = Client::options(f.addr()).await;
    assert_eq!(go_option(&mut s, OPT_GO, "a").await.0, REP_ERR_UNKNOWN);
    f.server
        .add_export("a", f.devices[0].1.clone(), None)
        .unwrap();
    let mut a = Client::go(f.addr(), "a", false).await;
    assert_eq!(a.read(0, 65536).await.unwrap(), f.devices[0].2);
    a.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_management_errors() {
    let server = NbdServer::new();
    let dev = Arc::new(MemoryDevice::new(1 << 20, 4096));
    server.add_export("x", dev.clone(), None).unwrap();
    assert!(matches!(
        server.add_export("x", dev.clone(), None),
        Err(NbdError::DuplicateExport(n)) if n == "x"
    ));
    assert!(matches!(
        server.remove_export("y"),
        Err(NbdError::UnknownExport(n)) if n == "y"
    ));
    for bad in ["", "a\0b", &"n".repeat(4097)] {
        assert!(matches!(
            server.add_export(bad, dev.clone(), None),
            Err(NbdError::InvalidExport { .. })
        ));
    }
    assert!(matches!(
        server.add_export("odd", Arc::new(MemoryDevice::new(1 << 20, 3000)), None),
        Err(NbdError::InvalidExport { .. })
    ));
    assert!(matches!(
        NbdServer::with_config(NbdConfig {
            max_in_flight: 0,
            ..NbdConfig::default()
        }),
        Err(NbdError::Config(_))
    ));
    assert_eq!(server.exports(), ["x"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_is_private_and_shutdown_waits_for_clients() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    // A stale socket file is replaced; a regular file is not.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let server = NbdServer::new();
    let dev = Arc::new(MemoryDevice::new(1 << 20, 4096));
    server.add_export("x", dev.clone(), None).unwrap();
    let l = server.serve_unix(&path).await.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // A second server on the same live socket is refused.
    assert!(matches!(
        server.serve_unix(&path).await,
        Err(NbdError::Listen { .. })
    ));
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep").unwrap();
    assert!(server.serve_unix(&file).await.is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    // A session in transmission through the socket.
    let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    let mut b = 3u32.to_be_bytes().to_vec();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    b.extend_from_slice(&1u32.to_be_bytes());
    b.push(b'x');
    s.write_all(&b).await.unwrap();
    let mut h = [0u8; 10];
    s.read_exact(&mut h).await.unwrap();
    // Shutdown ends the session (the client sees EOF) and removes the socket file.
    tokio::time::timeout(Duration::from_secs(10), l.shutdown())
        .await
        .expect("shutdown finishes");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert!(!path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_a_client_that_stops_reading_after_the_grace_period() {
    let config = NbdConfig {
        shutdown_grace: Duration::from_millis(500),
        ..NbdConfig::default()
    };
    let f = Fixture::with_config(config).await;
    let mut c = Client::go(f.addr(), "a", false).await;
    // 32 MiB of reads whose replies are never read: the server's writer blocks on
    // a full socket.
    for i in 0..32u64 {
        c.send(0, CMD_READ, (i % 4) << 20, 1 << 20, &[]).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let Fixture { tcp, server, .. } = f;
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), tcp.shutdown())
        .await
        .expect("shutdown returns after the grace period");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    // The connection is gone: reading drains what was sent, then ends.
    let mut sink = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), c.s.read_to_end(&mut sink)).await;
    assert!(r.is_ok(), "the connection was not closed");
    assert_eq!(server.stats("a").unwrap().connections, 0);
}
