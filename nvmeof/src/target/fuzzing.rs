//! The fuzz harness for a target connection (cargo-fuzz target `target_connection`
//! and its regression replay in `tests/target_fuzz_regressions.rs`).
//!
//! Arbitrary bytes go into the real connection handler through an in-memory duplex
//! stream. The first byte picks how far a well-formed prologue gets the connection
//! first (nothing; ICReq; ICReq + admin Connect + enable; or an I/O queue of a live
//! controller), so the fuzzer reaches the command paths and not only the ICReq check.
//! A panic, or a connection that does not close after its input ends, is a defect.

use super::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use crate::backend::MemoryBackend;
use crate::nvme::{property, ConnectData, FabricsCommand, PropertySize, Sgl, SubmissionEntry};
use crate::tcp::{CapsuleCmd, ConnectionParams, IcReq, Pdu, Role};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const SUBNQN: &str = "nqn.2026-11.io.fuzz:sub";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000f022";

struct Env {
    rt: tokio::runtime::Runtime,
    target: Target,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        #[allow(clippy::expect_used)]
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        #[allow(clippy::expect_used)]
        let target = rt.block_on(async {
            let mem = MemoryBackend::new(1 << 20, 512).expect("memory backend");
            let sub = SubsystemConfig::new(SUBNQN)
                .namespace(NamespaceConfig::new(Arc::new(mem)))
                .allow_any_host();
            let mut cfg = TargetConfig::new(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
            cfg.subsystems.push(sub);
            Target::start(cfg).await.expect("fuzz target starts")
        });
        Env { rt, target }
    })
}

fn pdu_bytes(pdu: &Pdu, p: &ConnectionParams) -> Vec<u8> {
    pdu.encode(p).map(|e| e.to_vec()).unwrap_or_default()
}

fn capsule(sqe: SubmissionEntry, data: &[u8], p: &ConnectionParams) -> Vec<u8> {
    let mut sqe = sqe;
    if !data.is_empty() {
        sqe.dptr = Sgl::in_capsule(u32::try_from(data.len()).unwrap_or(0));
    }
    pdu_bytes(
        &Pdu::CapsuleCmd(CapsuleCmd {
            sqe,
            data: Bytes::copy_from_slice(data),
        }),
        p,
    )
}

fn connect(qid: u16, cntlid: u16, p: &ConnectionParams) -> Vec<u8> {
    let sqe = FabricsCommand::Connect {
        recfmt: 0,
        qid,
        sqsize: 31,
        cattr: 0,
        kato_ms: 0,
    }
    .to_sqe(0xFFF0);
    let cd = ConnectData {
        hostid: [1; 16],
        cntlid,
        subnqn: SUBNQN.into(),
        hostnqn: HOSTNQN.into(),
    };
    capsule(sqe, &cd.encode(), p)
}

/// ICReq for the chosen digests, and the parameters the target will then use.
fn icreq(hdgst: bool, ddgst: bool) -> (Vec<u8>, ConnectionParams) {
    let init = ConnectionParams::initial(Role::Host);
    let req = IcReq {
        pfv: 0,
        hpda: 0,
        hdgst,
        ddgst,
        maxr2t: 0,
    };
    let bytes = pdu_bytes(&Pdu::IcReq(req), &init);
    let p = ConnectionParams {
        hdgst,
        ddgst,
        maxh2cdata: 128 * 1024,
        max_rx_data: 1 << 20,
        ..init
    };
    (bytes, p)
}

/// Write `input`, read everything back until the target closes the stream.
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

/// Find the CNTLID in the admin Connect response among the target's replies.
fn connect_cntlid(replies: &[u8]) -> Option<u16> {
    // ICResp is 128 bytes; the CapsuleResp follows (8-byte header, CQE DW0 first).
    let r = replies.get(128..)?;
    if r.first() != Some(&0x05) {
        return None;
    }
    Some(u16::from_le_bytes([*r.get(8)?, *r.get(9)?]))
}

/// The harness (see the module docs). Panics only on a real defect.
pub fn target_connection(data: &[u8]) {
    let _ = target_connection_replies(data);
}

/// [`target_connection`], returning the bytes the target sent on the fuzzed stream.
pub fn target_connection_replies(data: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    install_panic_flag();
    let env = env();
    let out = env.rt.block_on(async {
        let (hdgst, ddgst) = (mode & 4 != 0, mode & 8 != 0);
        let mut input = Vec::new();
        let mut admin: Option<(DuplexStream, tokio::task::JoinHandle<()>)> = None;
        let target: &'static Target = &env.target;
        match mode & 3 {
            0 => {}
            1 => input.extend(icreq(hdgst, ddgst).0),
            2 => {
                let (b, p) = icreq(hdgst, ddgst);
                input.extend(b);
                input.extend(connect(0, 0xFFFF, &p));
                let cc = FabricsCommand::PropertySet {
                    size: PropertySize::Four,
                    offset: property::CC,
                    value: 1 | (6 << 16) | (4 << 20),
                };
                input.extend(capsule(cc.to_sqe(0xFFF1), &[], &p));
            }
            _ => {
                // A live controller on a second stream; this one becomes its I/O queue.
                let (mut c, s) = tokio::io::duplex(1 << 16);
                let served = tokio::spawn(target.serve_stream(s));
                let (b, p) = icreq(false, false);
                let mut pro = b;
                pro.extend(connect(0, 0xFFFF, &p));
                let cc = FabricsCommand::PropertySet {
                    size: PropertySize::Four,
                    offset: property::CC,
                    value: 1 | (6 << 16) | (4 << 20),
                };
                pro.extend(capsule(cc.to_sqe(0xFFF1), &[], &p));
                let _ = c.write_all(&pro).await;
                let mut buf = vec![0u8; 128 + 24 + 24];
                let got =
                    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf)).await;
                let cntlid = match got {
                    Ok(Ok(_)) => connect_cntlid(&buf),
                    _ => None,
                };
                let (b, p) = icreq(hdgst, ddgst);
                input.extend(b);
                input.extend(connect(1, cntlid.unwrap_or(0xFFFF), &p));
                admin = Some((c, served));
            }
        }
        input.extend_from_slice(rest);
        let (client, server) = tokio::io::duplex(1 << 16);
        let serve = target.serve_stream(server);
        let run = async { tokio::join!(serve, drive(client, input)) };
        let Ok(((), out)) = tokio::time::timeout(Duration::from_secs(20), run).await else {
            panic!("target connection did not close after its input ended");
        };
        if let Some((c, h)) = admin {
            drop(c);
            let _ = h.await;
        }
        out
    });
    // Panics inside spawned command tasks do not unwind into this function: the
    // hook below notices them.
    assert!(
        !PANICKED.swap(false, Ordering::SeqCst),
        "a target task panicked"
    );
    out
}

static PANICKED: AtomicBool = AtomicBool::new(false);

fn install_panic_flag() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            prev(info);
        }));
    });
}
