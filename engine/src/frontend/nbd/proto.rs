//! Wire constants and fixed-size message layouts of the NBD protocol (newstyle fixed
//! handshake, simple and structured replies), kept apart from the I/O so that the
//! encoders can be unit-tested byte for byte and the session code reads as a protocol
//! flow rather than as offset arithmetic. Every field is big-endian on the wire.

/// "NBDMAGIC", the first eight bytes the server sends.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the newstyle magic, sent by the server and in front of every option.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic in front of every option reply.
pub(crate) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

// Options.
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;

// Option reply types.
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
pub(crate) const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub(crate) const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub(crate) const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;

// Information types of NBD_REP_INFO.
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_DESCRIPTION: u16 = 2;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub(crate) const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const TFLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const TFLAG_SEND_FUA: u16 = 1 << 3;
pub(crate) const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub(crate) const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub(crate) const TFLAG_SEND_DF: u16 = 1 << 7;
pub(crate) const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Command flags.
pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub(crate) const CMD_FLAG_DF: u16 = 1 << 2;

// Commands.
pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;

// Structured reply flags and chunk types.
pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// Error values (errno numbers fixed by the protocol, not the host's).
pub(crate) const EPERM: u32 = 1;
pub(crate) const EIO: u32 = 5;
pub(crate) const EINVAL: u32 = 22;
pub(crate) const ENOSPC: u32 = 28;
pub(crate) const ESHUTDOWN: u32 = 108;

/// Size of a transmission request header.
pub(crate) const REQUEST_LEN: usize = 28;
/// Size of a structured reply chunk header.
pub(crate) const STRUCTURED_HEADER_LEN: usize = 20;
/// Longest string (export name, description, message) the protocol allows.
pub(crate) const MAX_STRING: usize = 4096;

/// The first bytes the server sends: both magics and the handshake flags.
pub(crate) fn server_greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Header of an option reply; `data_len` bytes of data follow it.
pub(crate) fn option_reply_header(option: u32, reply: u32, data_len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&reply.to_be_bytes());
    b[16..].copy_from_slice(&data_len.to_be_bytes());
    b
}

/// A transmission request header as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Parses a request header; `None` when the magic is wrong (the stream is then
    /// out of step and the connection cannot continue).
    pub(crate) fn parse(b: &[u8; REQUEST_LEN]) -> Option<Self> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return None;
        }
        let mut handle = [0u8; 8];
        handle.copy_from_slice(&b[8..16]);
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&b[16..24]);
        Some(Self {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            handle: u64::from_be_bytes(handle),
            offset: u64::from_be_bytes(offset),
            length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    /// Encodes the header (used by tests and the fuzz harness's prologue).
    pub(crate) fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A simple reply header (the data of a successful read follows it).
pub(crate) fn simple_reply(handle: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header; `payload_len` bytes of payload follow it.
pub(crate) fn structured_header(
    flags: u16,
    kind: u16,
    handle: u64,
    payload_len: u32,
) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut b = [0u8; STRUCTURED_HEADER_LEN];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..].copy_from_slice(&payload_len.to_be_bytes());
    b
}

/// A complete, final NBD_REPLY_TYPE_ERROR chunk carrying `message` (cut to fit).
pub(crate) fn structured_error(handle: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = truncate_utf8(message, MAX_STRING);
    // The message is at most MAX_STRING bytes, so both lengths fit their fields.
    let msg_len = u16::try_from(msg.len()).unwrap_or(0);
    let msg = &msg[..usize::from(msg_len)];
    let mut b = Vec::with_capacity(STRUCTURED_HEADER_LEN + 6 + msg.len());
    b.extend_from_slice(&structured_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + u32::from(msg_len),
    ));
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&msg_len.to_be_bytes());
    b.extend_from_slice(msg.as_bytes());
    b
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_fixed_no_zeroes() {
        let g = server_greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn request_roundtrip_and_bad_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 8192,
        };
        let b = r.encode();
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::parse(&b), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(Request::parse(&bad), None);
    }

    #[test]
    fn reply_layouts() {
        let s = simple_reply(7, EINVAL);
        assert_eq!(&s[..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&s[4..8], &[0, 0, 0, 22]);
        assert_eq!(&s[8..], &7u64.to_be_bytes());
        let h = structured_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 9, 4104);
        assert_eq!(&h[..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(&h[4..8], &[0, 1, 0, 1]);
        assert_eq!(&h[16..], &4104u32.to_be_bytes());
        let e = structured_error(3, EIO, "bad");
        assert_eq!(e.len(), 20 + 6 + 3);
        assert_eq!(&e[6..8], &[0x80, 0x01]);
        assert_eq!(&e[16..20], &9u32.to_be_bytes());
        assert_eq!(&e[20..24], &5u32.to_be_bytes());
        assert_eq!(&e[24..26], &3u16.to_be_bytes());
        assert_eq!(&e[26..], b"bad");
        let o = option_reply_header(OPT_GO, REP_ERR_UNKNOWN, 0);
        assert_eq!(&o[..8], &[0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
        assert_eq!(&o[12..16], &[0x80, 0, 0, 6]);
    }

    #[test]
    fn long_messages_are_cut_on_char_boundaries() {
        let s = "é".repeat(3000); // 6000 bytes
        let t = truncate_utf8(&s, MAX_STRING);
        assert!(t.len() <= MAX_STRING && t.len() >= MAX_STRING - 1);
        let e = structured_error(1, EIO, &s);
        assert_eq!(e.len(), 20 + 6 + t.len());
    }
}
