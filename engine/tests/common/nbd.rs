//! A raw NBD client over dpud's Unix socket for the api_* tests: fixed newstyle,
//! NBD_OPT_GO, simple replies, one request in flight. The protocol's corner cases are
//! tested against the NBD server itself in nbd_bad_input.rs.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const HANDLE: u64 = 42;

/// Handshake and NBD_OPT_GO; Ok((size, transmission flags)) or Err(reply type).
pub async fn go(s: &mut UnixStream, name: &str) -> Res<Result<(u64, u16), u32>> {
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).await?;
    assert_eq!(&greet[..8], b"NBDMAGIC");
    s.write_u32(3).await?; // fixed newstyle, no zeroes
    s.write_u64(IHAVEOPT).await?;
    s.write_u32(OPT_GO).await?;
    s.write_u32(u32::try_from(4 + name.len() + 2)?).await?;
    s.write_u32(u32::try_from(name.len())?).await?;
    s.write_all(name.as_bytes()).await?;
    s.write_u16(0).await?;
    let mut export = None;
    loop {
        let _magic = s.read_u64().await?;
        let _opt = s.read_u32().await?;
        let kind = s.read_u32().await?;
        let len = s.read_u32().await?;
        let mut data = vec![0u8; usize::try_from(len)?];
        s.read_exact(&mut data).await?;
        if kind & (1 << 31) != 0 {
            return Ok(Err(kind));
        }
        if kind == REP_INFO && data.len() == 12 && data[..2] == [0, 0] {
            let size = u64::from_be_bytes(data[2..10].try_into()?);
            let flags = u16::from_be_bytes(data[10..12].try_into()?);
            export = Some((size, flags));
        }
        if kind == REP_ACK {
            return Ok(Ok(export.ok_or("no NBD_INFO_EXPORT before ACK")?));
        }
    }
}

/// [`go`] that must succeed: a refusal is an error.
pub async fn go_ok(s: &mut UnixStream, name: &str) -> Res<(u64, u16)> {
    Ok(go(s, name)
        .await?
        .map_err(|t| format!("GO refused: {t:#x}"))?)
}

/// One request (0 read, 1 write); returns (error, read data).
pub async fn request(
    s: &mut UnixStream,
    cmd: u16,
    offset: u64,
    len: u32,
    data: &[u8],
) -> Res<(u32, Vec<u8>)> {
    s.write_u32(REQUEST_MAGIC).await?;
    s.write_u16(0).await?;
    s.write_u16(cmd).await?;
    s.write_u64(HANDLE).await?;
    s.write_u64(offset).await?;
    s.write_u32(len).await?;
    s.write_all(data).await?;
    assert_eq!(s.read_u32().await?, SIMPLE_REPLY_MAGIC);
    let error = s.read_u32().await?;
    assert_eq!(s.read_u64().await?, HANDLE);
    let mut out = Vec::new();
    if cmd == 0 && error == 0 {
        out = vec![0u8; usize::try_from(len)?];
        s.read_exact(&mut out).await?;
    }
    Ok((error, out))
}

/// [`request`] that must succeed: an NBD error is an error; returns the read data.
pub async fn request_ok(
    s: &mut UnixStream,
    cmd: u16,
    offset: u64,
    len: u32,
    data: &[u8],
) -> Res<Vec<u8>> {
    match request(s, cmd, offset, len, data).await? {
        (0, out) => Ok(out),
        (error, _) => Err(format!("NBD error {error}").into()),
    }
}
