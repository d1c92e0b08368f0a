//! The fuzz harness of the NBD server (cargo-fuzz target `nbd_session`, replayed by
//! `engine/tests/nbd_fuzz_regressions.rs`).
//!
//! Arbitrary bytes are a client's side of a whole session, fed to the real session
//! code through an in-memory duplex stream. The first byte picks how far a
//! well-formed prologue takes the session first (nothing; into transmission with
//! structured replies; with simple replies; onto a read-only export through
//! NBD_OPT_EXPORT_NAME), so the fuzzer reaches the request paths and not only the
//! handshake. A panic, or a session that does not end after its input ends, is a
//! defect.

use super::proto::{
    Request, CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE,
    OPT_EXPORT_NAME, OPT_GO, OPT_STRUCTURED_REPLY,
};
use super::{NbdConfig, NbdServer};
use crate::frontend::MemoryDevice;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

struct Env {
    rt: tokio::runtime::Runtime,
    server: NbdServer,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        #[allow(clippy::expect_used)]
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let config = NbdConfig {
            max_payload: 64 * 1024,
            max_in_flight: 8,
            max_in_flight_bytes: 256 * 1024,
            handshake_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
        };
        #[allow(clippy::expect_used)]
        let server = NbdServer::with_config(config).expect("valid fuzz config");
        #[allow(clippy::expect_used)]
        {
            server
                .add_export("a", Arc::new(MemoryDevice::new(1 << 20, 4096)), None)
                .expect("export a");
            server
                .add_export(
                    "ro",
                    Arc::new(MemoryDevice::new(256 << 10, 512).into_read_only()),
                    Some("read-only".into()),
                )
                .expect("export ro");
        }
        Env { rt, server }
    })
}

fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(data);
}

fn go(out: &mut Vec<u8>, name: &str) {
    let mut d = u32::try_from(name.len())
        .unwrap_or(0)
        .to_be_bytes()
        .to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    option(out, OPT_GO, &d);
}

/// The bytes a well-behaved client sends to reach transmission in `mode`.
fn prologue(mode: u8) -> Vec<u8> {
    let mut p = Vec::new();
    if mode & 3 == 0 {
        return p;
    }
    let flags = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;
    p.extend_from_slice(&flags.to_be_bytes());
    match mode & 3 {
        1 => {
            option(&mut p, OPT_STRUCTURED_REPLY, &[]);
            go(&mut p, "a");
        }
        2 => go(&mut p, "a"),
        _ => option(&mut p, OPT_EXPORT_NAME, b"ro"),
    }
    if mode & 4 != 0 {
        // A valid write first, so that later reads find data.
        let w = Request {
            flags: 0,
            kind: super::proto::CMD_WRITE,
            handle: 1,
            offset: 4096,
            length: 4096,
        };
        p.extend_from_slice(&w.encode());
        p.extend(std::iter::repeat_n(0x5a, 4096));
    }
    p
}

/// Write `input`, read everything back until the server closes the stream.
async fn drive(mut client: DuplexStream, input: Vec<u8>) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(&mut client);
    let write = async {
        let _ = w.write_all(&input).await;
        let _ = w.shutdown().await;
    };
    let read = async {
        let mut out = Vec::new();
        let _ = r.read_to_end(&mut out).await;
        out
    };
    let ((), out) = tokio::join!(write, read);
    out
}

/// The harness (see the module docs). Panics only on a real defect.
pub fn nbd_session(data: &[u8]) {
    let _ = nbd_session_replies(data);
}

/// [`nbd_session`], returning the bytes the server sent.
pub fn nbd_session_replies(data: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    let env = env();
    let mut input = prologue(mode);
    input.extend_from_slice(rest);
    env.rt.block_on(async {
        let (client, server_side) = tokio::io::duplex(1 << 16);
        let serve = env.server.serve_stream(server_side);
        let run = async { tokio::join!(serve, drive(client, input)) };
        match tokio::time::timeout(Duration::from_secs(20), run).await {
            Ok((_, out)) => out,
            Err(_) => panic!("NBD session did not end after its input ended"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prologue_reaches_transmission_and_a_read_is_answered() {
        // Structured replies; then a read of the block the prologue wrote.
        let read = Request {
            flags: 0,
            kind: super::super::proto::CMD_READ,
            handle: 7,
            offset: 4096,
            length: 4096,
        };
        let mut input = vec![1 | 4];
        input.extend_from_slice(&read.encode());
        let out = nbd_session_replies(&input);
        // The tail must be one structured OFFSET_DATA chunk for handle 7 with the data.
        let tail = &out[out.len() - (20 + 8 + 4096)..];
        assert_eq!(&tail[..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(&tail[8..16], &7u64.to_be_bytes());
        assert_eq!(&tail[20..28], &4096u64.to_be_bytes());
        assert!(tail[28..].iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn garbage_ends_the_session() {
        let _ = nbd_session_replies(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let _ = nbd_session_replies(&[1, 0x25, 0x60, 0x95, 0x13, 0xff]);
        let _ = nbd_session_replies(&[3]);
    }
}
