//! Frame parsing and building.
//!
//! Every frame the module sees comes from a host or the wire, so the parser takes
//! arbitrary bytes and answers either a [`Parsed`] view (offsets and header fields,
//! no copies, no lifetimes so it can be kept next to the buffer) or a [`ParseError`]
//! that names why the frame is dropped; the data plane counts each reason. It never
//! panics: every read goes through bounds-checked helpers.
//!
//! The builders are the parser's inverse. The firewall uses them to answer a reject
//! (TCP RST, ICMP unreachable), VXLAN uses them for the outer headers, and the tests
//! use them to produce frames whose fields are known.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// EtherTypes the parser knows.
pub const ETH_P_IPV4: u16 = 0x0800;
/// ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// 802.1ad service tag (QinQ); not carried, see [`ParseError::StackedVlan`].
pub const ETH_P_8021AD: u16 = 0x88a8;

/// IP protocol numbers.
pub const IPPROTO_ICMP: u8 = 1;
/// TCP.
pub const IPPROTO_TCP: u8 = 6;
/// UDP.
pub const IPPROTO_UDP: u8 = 17;
/// ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;

/// TCP flag bits (low byte of the flags field).
pub mod tcp_flags {
    /// No more data from sender.
    pub const FIN: u8 = 0x01;
    /// Synchronise sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push.
    pub const PSH: u8 = 0x08;
    /// Acknowledgement field significant.
    pub const ACK: u8 = 0x10;
}

/// How many IPv6 extension headers are walked before the frame is dropped: real
/// traffic carries one or two, and the bound keeps a crafted chain from costing more.
pub const MAX_IPV6_EXT_HEADERS: usize = 8;

const ETH_HDR: usize = 14;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Group bit set: broadcast or multicast.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// All ones.
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts
                .next()
                .ok_or_else(|| format!("MAC {s:?}: too short"))?;
            *b = u8::from_str_radix(p, 16).map_err(|e| format!("MAC {s:?}: {e}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("MAC {s:?}: too long"));
        }
        Ok(MacAddr(out))
    }
}

/// Why a frame could not be parsed. Each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ParseError {
    /// Shorter than an Ethernet header.
    #[error("frame shorter than an Ethernet header")]
    EthernetTruncated,
    /// A VLAN tag cut short.
    #[error("802.1Q tag truncated")]
    VlanTruncated,
    /// QinQ or a second 802.1Q tag: not carried by this switch.
    #[error("stacked VLAN tags are not supported")]
    StackedVlan,
    /// ARP shorter than its fixed Ethernet/IPv4 form, or another hardware/protocol type.
    #[error("malformed or non-Ethernet/IPv4 ARP")]
    ArpMalformed,
    /// IPv4 header cut short.
    #[error("IPv4 header truncated")]
    Ipv4Truncated,
    /// IPv4 version/IHL/total length inconsistent.
    #[error("IPv4 header fields inconsistent (version, IHL or total length)")]
    Ipv4BadHeader,
    /// IPv4 header checksum wrong.
    #[error("IPv4 header checksum mismatch")]
    Ipv4BadChecksum,
    /// IPv6 header cut short.
    #[error("IPv6 header truncated")]
    Ipv6Truncated,
    /// IPv6 version or payload length inconsistent.
    #[error("IPv6 header fields inconsistent (version or payload length)")]
    Ipv6BadHeader,
    /// An extension header runs past the packet.
    #[error("IPv6 extension header truncated")]
    Ipv6ExtTruncated,
    /// More than [`MAX_IPV6_EXT_HEADERS`] extension headers.
    #[error("too many IPv6 extension headers")]
    Ipv6ExtTooMany,
    /// TCP header cut short or data offset out of range.
    #[error("TCP header truncated or bad data offset")]
    TcpMalformed,
    /// UDP header cut short or length out of range.
    #[error("UDP header truncated or bad length")]
    UdpMalformed,
    /// ICMP/ICMPv6 header cut short.
    #[error("ICMP header truncated")]
    IcmpTruncated,
}

impl ParseError {
    /// Every reason, in counter order.
    pub const ALL: [ParseError; 14] = [
        ParseError::EthernetTruncated,
        ParseError::VlanTruncated,
        ParseError::StackedVlan,
        ParseError::ArpMalformed,
        ParseError::Ipv4Truncated,
        ParseError::Ipv4BadHeader,
        ParseError::Ipv4BadChecksum,
        ParseError::Ipv6Truncated,
        ParseError::Ipv6BadHeader,
        ParseError::Ipv6ExtTruncated,
        ParseError::Ipv6ExtTooMany,
        ParseError::TcpMalformed,
        ParseError::UdpMalformed,
        ParseError::IcmpTruncated,
    ];

    /// Position in [`ParseError::ALL`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }

    /// Short counter name.
    pub fn name(self) -> &'static str {
        match self {
            ParseError::EthernetTruncated => "eth_truncated",
            ParseError::VlanTruncated => "vlan_truncated",
            ParseError::StackedVlan => "vlan_stacked",
            ParseError::ArpMalformed => "arp_malformed",
            ParseError::Ipv4Truncated => "ipv4_truncated",
            ParseError::Ipv4BadHeader => "ipv4_bad_header",
            ParseError::Ipv4BadChecksum => "ipv4_bad_checksum",
            ParseError::Ipv6Truncated => "ipv6_truncated",
            ParseError::Ipv6BadHeader => "ipv6_bad_header",
            ParseError::Ipv6ExtTruncated => "ipv6_ext_truncated",
            ParseError::Ipv6ExtTooMany => "ipv6_ext_too_many",
            ParseError::TcpMalformed => "tcp_malformed",
            ParseError::UdpMalformed => "udp_malformed",
            ParseError::IcmpTruncated => "icmp_truncated",
        }
    }
}

/// A parsed frame: header fields plus the offsets needed to rewrite or answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Destination MAC.
    pub dst: MacAddr,
    /// Source MAC.
    pub src: MacAddr,
    /// The 802.1Q tag, if any.
    pub vlan: Option<VlanTag>,
    /// EtherType after any tag.
    pub ethertype: u16,
    /// Offset of the network header (after any tag).
    pub l3_offset: usize,
    /// The network layer.
    pub l3: L3,
}

/// An 802.1Q tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanTag {
    /// VLAN id (12 bits); 0 is a priority-only tag.
    pub vid: u16,
    /// Priority code point (3 bits).
    pub pcp: u8,
}

/// Network layer of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L3 {
    /// ARP for IPv4 over Ethernet.
    Arp(Arp),
    /// IPv4 or IPv6.
    Ip(IpPacket),
    /// Another EtherType: carried by the switch, not parsed.
    Other,
}

/// An ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    /// 1 request, 2 reply.
    pub op: u16,
    /// Sender hardware address.
    pub sha: MacAddr,
    /// Sender protocol address.
    pub spa: Ipv4Addr,
    /// Target hardware address.
    pub tha: MacAddr,
    /// Target protocol address.
    pub tpa: Ipv4Addr,
}

/// Fragment position of an IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    None,
    /// Offset 0 with more fragments: carries the transport header.
    First,
    /// Offset > 0: no transport header.
    Later,
}

/// An IPv4 or IPv6 packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpPacket {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// The upper-layer protocol (after IPv6 extension headers).
    pub proto: u8,
    /// TTL or hop limit.
    pub ttl: u8,
    /// Fragment position.
    pub fragment: Fragment,
    /// IPv4 options present, or IPv6 extension headers present.
    pub has_options: bool,
    /// Offset of the transport header.
    pub l4_offset: usize,
    /// End of the IP packet in the frame (Ethernet padding excluded).
    pub end: usize,
    /// The transport layer.
    pub l4: L4,
}

/// Transport layer of an IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// TCP.
    Tcp(TcpHeader),
    /// UDP.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
    /// ICMP or ICMPv6 (per [`IpPacket::proto`]).
    Icmp {
        /// Type.
        ty: u8,
        /// Code.
        code: u8,
        /// The four bytes after the checksum (echo: identifier, sequence).
        rest: [u8; 4],
    },
    /// A later fragment: no transport header.
    Fragment,
    /// Another protocol: not parsed.
    Other,
}

/// The TCP fields the firewall uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpHeader {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flags (see [`tcp_flags`]).
    pub flags: u8,
    /// Header length in bytes.
    pub header_len: usize,
}

impl IpPacket {
    /// (source port, destination port) for TCP and UDP, else (0, 0).
    pub fn ports(&self) -> (u16, u16) {
        match self.l4 {
            L4::Tcp(t) => (t.sport, t.dport),
            L4::Udp { sport, dport } => (sport, dport),
            _ => (0, 0),
        }
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn mac_at(b: &[u8], at: usize) -> Option<MacAddr> {
    let s = b.get(at..at.checked_add(6)?)?;
    let mut m = [0u8; 6];
    m.copy_from_slice(s);
    Some(MacAddr(m))
}

fn v4_at(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    be32(b, at).map(Ipv4Addr::from)
}

fn v6_at(b: &[u8], at: usize) -> Option<Ipv6Addr> {
    let s = b.get(at..at.checked_add(16)?)?;
    let mut a = [0u8; 16];
    a.copy_from_slice(s);
    Some(Ipv6Addr::from(a))
}

/// Parses an Ethernet frame.
pub fn parse(frame: &[u8]) -> Result<Parsed, ParseError> {
    let dst = mac_at(frame, 0).ok_or(ParseError::EthernetTruncated)?;
    let src = mac_at(frame, 6).ok_or(ParseError::EthernetTruncated)?;
    let mut ethertype = be16(frame, 12).ok_or(ParseError::EthernetTruncated)?;
    let mut off = ETH_HDR;
    let mut vlan = None;
    if ethertype == ETH_P_8021AD {
        return Err(ParseError::StackedVlan);
    }
    if ethertype == ETH_P_8021Q {
        let tci = be16(frame, off).ok_or(ParseError::VlanTruncated)?;
        ethertype = be16(frame, off + 2).ok_or(ParseError::VlanTruncated)?;
        off += 4;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            return Err(ParseError::StackedVlan);
        }
        vlan = Some(VlanTag {
            vid: tci & 0x0fff,
            pcp: u8::try_from(tci >> 13).unwrap_or(0),
        });
    }
    let l3 = match ethertype {
        ETH_P_ARP => L3::Arp(parse_arp(frame, off)?),
        ETH_P_IPV4 => L3::Ip(parse_ipv4(frame, off)?),
        ETH_P_IPV6 => L3::Ip(parse_ipv6(frame, off)?),
        _ => L3::Other,
    };
    Ok(Parsed {
        dst,
        src,
        vlan,
        ethertype,
        l3_offset: off,
        l3,
    })
}

fn parse_arp(b: &[u8], off: usize) -> Result<Arp, ParseError> {
    let e = ParseError::ArpMalformed;
    let htype = be16(b, off).ok_or(e)?;
    let ptype = be16(b, off + 2).ok_or(e)?;
    let hlen = *b.get(off + 4).ok_or(e)?;
    let plen = *b.get(off + 5).ok_or(e)?;
    if htype != 1 || ptype != ETH_P_IPV4 || hlen != 6 || plen != 4 {
        return Err(e);
    }
    Ok(Arp {
        op: be16(b, off + 6).ok_or(e)?,
        sha: mac_at(b, off + 8).ok_or(e)?,
        spa: v4_at(b, off + 14).ok_or(e)?,
        tha: mac_at(b, off + 18).ok_or(e)?,
        tpa: v4_at(b, off + 24).ok_or(e)?,
    })
}

fn parse_ipv4(b: &[u8], off: usize) -> Result<IpPacket, ParseError> {
    let vihl = *b.get(off).ok_or(ParseError::Ipv4Truncated)?;
    if vihl >> 4 != 4 {
        return Err(ParseError::Ipv4BadHeader);
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(ParseError::Ipv4BadHeader);
    }
    let hdr = b.get(off..off + ihl).ok_or(ParseError::Ipv4Truncated)?;
    let total = usize::from(be16(hdr, 2).ok_or(ParseError::Ipv4Truncated)?);
    if total < ihl {
        return Err(ParseError::Ipv4BadHeader);
    }
    let end = off + total;
    if end > b.len() {
        return Err(ParseError::Ipv4Truncated);
    }
    if checksum(0, hdr) != 0 {
        return Err(ParseError::Ipv4BadChecksum);
    }
    let frag = be16(hdr, 6).ok_or(ParseError::Ipv4Truncated)?;
    let more = frag & 0x2000 != 0;
    let foff = frag & 0x1fff;
    let fragment = match (foff, more) {
        (0, false) => Fragment::None,
        (0, true) => Fragment::First,
        _ => Fragment::Later,
    };
    let proto = hdr[9];
    let src = IpAddr::V4(v4_at(hdr, 12).ok_or(ParseError::Ipv4Truncated)?);
    let dst = IpAddr::V4(v4_at(hdr, 16).ok_or(ParseError::Ipv4Truncated)?);
    let l4_offset = off + ihl;
    let l4 = if fragment == Fragment::Later {
        L4::Fragment
    } else {
        parse_l4(&b[..end], l4_offset, proto)?
    };
    Ok(IpPacket {
        src,
        dst,
        proto,
        ttl: hdr[8],
        fragment,
        has_options: ihl > 20,
        l4_offset,
        end,
        l4,
    })
}

fn is_ipv6_ext(next: u8) -> bool {
    // Hop-by-hop, routing, fragment, destination options, AH, mobility, HIP, shim6.
    matches!(next, 0 | 43 | 44 | 60 | 51 | 135 | 139 | 140)
}

fn parse_ipv6(b: &[u8], off: usize) -> Result<IpPacket, ParseError> {
    let hdr = b.get(off..off + 40).ok_or(ParseError::Ipv6Truncated)?;
    if hdr[0] >> 4 != 6 {
        return Err(ParseError::Ipv6BadHeader);
    }
    let payload = usize::from(be16(hdr, 4).ok_or(ParseError::Ipv6Truncated)?);
    let end = off + 40 + payload;
    if end > b.len() {
        return Err(ParseError::Ipv6Truncated);
    }
    let b = &b[..end];
    let src = IpAddr::V6(v6_at(hdr, 8).ok_or(ParseError::Ipv6Truncated)?);
    let dst = IpAddr::V6(v6_at(hdr, 24).ok_or(ParseError::Ipv6Truncated)?);
    let mut next = hdr[6];
    let mut at = off + 40;
    let mut fragment = Fragment::None;
    let mut walked = 0;
    while is_ipv6_ext(next) {
        walked += 1;
        if walked > MAX_IPV6_EXT_HEADERS {
            return Err(ParseError::Ipv6ExtTooMany);
        }
        let nh = *b.get(at).ok_or(ParseError::Ipv6ExtTruncated)?;
        let len = match next {
            44 => {
                let fo = be16(b, at + 2).ok_or(ParseError::Ipv6ExtTruncated)?;
                let offset = fo >> 3;
                let more = fo & 1 != 0;
                fragment = match (offset, more) {
                    (0, false) => fragment,
                    (0, true) => Fragment::First,
                    _ => Fragment::Later,
                };
                8
            }
            // AH counts its length in 4-byte units, minus 2.
            51 => (usize::from(*b.get(at + 1).ok_or(ParseError::Ipv6ExtTruncated)?) + 2) * 4,
            _ => (usize::from(*b.get(at + 1).ok_or(ParseError::Ipv6ExtTruncated)?) + 1) * 8,
        };
        if at + len > b.len() {
            return Err(ParseError::Ipv6ExtTruncated);
        }
        at += len;
        next = nh;
        if fragment == Fragment::Later {
            break;
        }
    }
    let l4 = if fragment == Fragment::Later {
        L4::Fragment
    } else {
        parse_l4(b, at, next)?
    };
    Ok(IpPacket {
        src,
        dst,
        proto: next,
        ttl: hdr[7],
        fragment,
        has_options: walked > 0,
        l4_offset: at,
        end,
        l4,
    })
}

fn parse_l4(b: &[u8], at: usize, proto: u8) -> Result<L4, ParseError> {
    match proto {
        IPPROTO_TCP => {
            let e = ParseError::TcpMalformed;
            let doff = usize::from(*b.get(at + 12).ok_or(e)? >> 4) * 4;
            if doff < 20 || at + doff > b.len() {
                return Err(e);
            }
            Ok(L4::Tcp(TcpHeader {
                sport: be16(b, at).ok_or(e)?,
                dport: be16(b, at + 2).ok_or(e)?,
                seq: be32(b, at + 4).ok_or(e)?,
                ack: be32(b, at + 8).ok_or(e)?,
                flags: *b.get(at + 13).ok_or(e)?,
                header_len: doff,
            }))
        }
        IPPROTO_UDP => {
            let e = ParseError::UdpMalformed;
            let len = usize::from(be16(b, at + 4).ok_or(e)?);
            if len < 8 || at + len > b.len() {
                return Err(e);
            }
            Ok(L4::Udp {
                sport: be16(b, at).ok_or(e)?,
                dport: be16(b, at + 2).ok_or(e)?,
            })
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let s = b.get(at..at + 8).ok_or(ParseError::IcmpTruncated)?;
            Ok(L4::Icmp {
                ty: s[0],
                code: s[1],
                rest: [s[4], s[5], s[6], s[7]],
            })
        }
        _ => Ok(L4::Other),
    }
}

/// The transport tuple of the packet an ICMP error quotes: (src, dst, proto, sport,
/// dport) as the quoted packet was sent. Only the first 8 transport bytes are
/// required, as RFC 792 promises.
pub fn quoted_tuple(frame: &[u8], ip: &IpPacket) -> Option<(IpAddr, IpAddr, u8, u16, u16)> {
    let inner = frame.get(ip.l4_offset.checked_add(8)?..ip.end)?;
    let (src, dst, proto, at) = match ip.src {
        IpAddr::V4(_) => {
            let vihl = *inner.first()?;
            if vihl >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(vihl & 0xf) * 4;
            (
                IpAddr::V4(v4_at(inner, 12)?),
                IpAddr::V4(v4_at(inner, 16)?),
                *inner.get(9)?,
                ihl,
            )
        }
        IpAddr::V6(_) => {
            if inner.first()? >> 4 != 6 {
                return None;
            }
            (
                IpAddr::V6(v6_at(inner, 8)?),
                IpAddr::V6(v6_at(inner, 24)?),
                *inner.get(6)?,
                40,
            )
        }
    };
    let (sport, dport) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => (be16(inner, at)?, be16(inner, at + 2)?),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let id = be16(inner, at + 4)?;
            (id, id)
        }
        _ => (0, 0),
    };
    Some((src, dst, proto, sport, dport))
}

/// One's-complement sum folded into a checksum, starting from `initial` (a partial
/// sum, e.g. of a pseudo-header). Returns the value to store (0 over a correct
/// header that includes its checksum).
pub fn checksum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = u64::from(initial);
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0xffff)
}

/// The partial sum of the TCP/UDP/ICMPv6 pseudo-header.
pub fn pseudo_header_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks_exact(2) {
            sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        }
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            add(&s.octets());
            add(&d.octets());
        }
        (s, d) => {
            add(&to_v6(s).octets());
            add(&to_v6(d).octets());
        }
    }
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    sum.wrapping_add(u32::from(proto))
        .wrapping_add(len >> 16)
        .wrapping_add(len & 0xffff)
}

fn to_v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v) => v.to_ipv6_mapped(),
        IpAddr::V6(v) => v,
    }
}

/// Builders for the headers the module emits and the tests need.
pub mod build {
    use super::*;

    fn put16(v: &mut Vec<u8>, x: u16) {
        v.extend_from_slice(&x.to_be_bytes());
    }

    /// Ethernet header (with an optional 802.1Q tag) followed by `payload`.
    pub fn ethernet(
        dst: MacAddr,
        src: MacAddr,
        vlan: Option<u16>,
        ethertype: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut v = Vec::with_capacity(18 + payload.len());
        v.extend_from_slice(&dst.0);
        v.extend_from_slice(&src.0);
        if let Some(vid) = vlan {
            put16(&mut v, ETH_P_8021Q);
            put16(&mut v, vid & 0x0fff);
        }
        put16(&mut v, ethertype);
        v.extend_from_slice(payload);
        v
    }

    /// An ARP packet (Ethernet/IPv4).
    pub fn arp(op: u16, sha: MacAddr, spa: Ipv4Addr, tha: MacAddr, tpa: Ipv4Addr) -> Vec<u8> {
        let mut v = Vec::with_capacity(28);
        put16(&mut v, 1);
        put16(&mut v, ETH_P_IPV4);
        v.push(6);
        v.push(4);
        put16(&mut v, op);
        v.extend_from_slice(&sha.0);
        v.extend_from_slice(&spa.octets());
        v.extend_from_slice(&tha.0);
        v.extend_from_slice(&tpa.octets());
        v
    }

    /// IPv4 header options are padded to 4 bytes; `options` longer than 40 bytes is cut.
    #[allow(clippy::too_many_arguments)]
    pub fn ipv4_full(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
        ttl: u8,
        id: u16,
        frag_field: u16,
        options: &[u8],
        payload: &[u8],
    ) -> Vec<u8> {
        let opt_len = options.len().min(40).div_ceil(4) * 4;
        let ihl = 20 + opt_len;
        let total = u16::try_from(ihl + payload.len()).unwrap_or(u16::MAX);
        let mut v = Vec::with_capacity(ihl + payload.len());
        v.push(0x40 | u8::try_from(ihl / 4).unwrap_or(15));
        v.push(0);
        put16(&mut v, total);
        put16(&mut v, id);
        put16(&mut v, frag_field);
        v.push(ttl);
        v.push(proto);
        put16(&mut v, 0);
        v.extend_from_slice(&src.octets());
        v.extend_from_slice(&dst.octets());
        v.extend_from_slice(&options[..options.len().min(40)]);
        v.resize(ihl, 0);
        let c = checksum(0, &v);
        v[10..12].copy_from_slice(&c.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// A plain IPv4 packet (DF set, no options).
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
        ipv4_full(src, dst, proto, 64, 0, 0x4000, &[], payload)
    }

    /// An IPv6 packet with `ext` extension headers (each (type, body); bodies are
    /// padded to 8-byte units with the next-header and length bytes prepended).
    pub fn ipv6_full(
        src: Ipv6Addr,
        dst: Ipv6Addr,
        proto: u8,
        hop: u8,
        ext: &[(u8, Vec<u8>)],
        payload: &[u8],
    ) -> Vec<u8> {
        let mut exts = Vec::new();
        for (i, (_, body)) in ext.iter().enumerate() {
            let next = ext.get(i + 1).map_or(proto, |e| e.0);
            let len8 = (body.len() + 2).div_ceil(8).max(1);
            let start = exts.len();
            exts.push(next);
            exts.push(u8::try_from(len8 - 1).unwrap_or(0));
            exts.extend_from_slice(body);
            exts.resize(start + len8 * 8, 0);
        }
        let first = ext.first().map_or(proto, |e| e.0);
        let mut v = Vec::with_capacity(40 + exts.len() + payload.len());
        v.extend_from_slice(&[0x60, 0, 0, 0]);
        put16(
            &mut v,
            u16::try_from(exts.len() + payload.len()).unwrap_or(u16::MAX),
        );
        v.push(first);
        v.push(hop);
        v.extend_from_slice(&src.octets());
        v.extend_from_slice(&dst.octets());
        v.extend_from_slice(&exts);
        v.extend_from_slice(payload);
        v
    }

    /// A plain IPv6 packet.
    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
        ipv6_full(src, dst, proto, 64, &[], payload)
    }

    /// An IP packet of the family of `src`/`dst` (which must match).
    pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, proto, payload),
            (s, d) => ipv6(to_v6(s), to_v6(d), proto, payload),
        }
    }

    /// A TCP segment with its checksum over the pseudo-header of `src`/`dst`.
    #[allow(clippy::too_many_arguments)]
    pub fn tcp(
        src: IpAddr,
        dst: IpAddr,
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut v = Vec::with_capacity(20 + payload.len());
        put16(&mut v, sport);
        put16(&mut v, dport);
        v.extend_from_slice(&seq.to_be_bytes());
        v.extend_from_slice(&ack.to_be_bytes());
        v.push(5 << 4);
        v.push(flags);
        put16(&mut v, 65535);
        put16(&mut v, 0);
        put16(&mut v, 0);
        v.extend_from_slice(payload);
        let c = checksum(pseudo_header_sum(src, dst, IPPROTO_TCP, v.len()), &v);
        v[16..18].copy_from_slice(&c.to_be_bytes());
        v
    }

    /// A UDP datagram with its checksum.
    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let len = 8 + payload.len();
        let mut v = Vec::with_capacity(len);
        put16(&mut v, sport);
        put16(&mut v, dport);
        put16(&mut v, u16::try_from(len).unwrap_or(u16::MAX));
        put16(&mut v, 0);
        v.extend_from_slice(payload);
        let mut c = checksum(pseudo_header_sum(src, dst, IPPROTO_UDP, v.len()), &v);
        if c == 0 {
            c = 0xffff;
        }
        v[6..8].copy_from_slice(&c.to_be_bytes());
        v
    }

    /// An ICMP (IPv4) or ICMPv6 (IPv6, checksum over the pseudo-header) message.
    pub fn icmp(
        src: IpAddr,
        dst: IpAddr,
        ty: u8,
        code: u8,
        rest: [u8; 4],
        payload: &[u8],
    ) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + payload.len());
        v.push(ty);
        v.push(code);
        put16(&mut v, 0);
        v.extend_from_slice(&rest);
        v.extend_from_slice(payload);
        let initial = match src {
            IpAddr::V4(_) => 0,
            IpAddr::V6(_) => pseudo_header_sum(src, dst, IPPROTO_ICMPV6, v.len()),
        };
        let c = checksum(initial, &v);
        v[2..4].copy_from_slice(&c.to_be_bytes());
        v
    }

    /// The ICMP protocol number for the family of `a`.
    pub fn icmp_proto(a: IpAddr) -> u8 {
        match a {
            IpAddr::V4(_) => IPPROTO_ICMP,
            IpAddr::V6(_) => IPPROTO_ICMPV6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    const A: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const B: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);

    fn ip4(a: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, a))
    }

    #[test]
    fn tcp_over_vlan_ipv4() {
        let seg = tcp(ip4(1), ip4(2), 1234, 80, 7, 0, tcp_flags::SYN, b"");
        let pkt = ipv4(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            IPPROTO_TCP,
            &seg,
        );
        let f = ethernet(B, A, Some(42), ETH_P_IPV4, &pkt);
        let p = parse(&f).unwrap();
        assert_eq!(p.vlan.map(|v| v.vid), Some(42));
        let L3::Ip(ip) = p.l3 else { panic!() };
        assert_eq!(ip.src, ip4(1));
        assert_eq!(ip.l4_offset, 18 + 20);
        let L4::Tcp(t) = ip.l4 else { panic!() };
        assert_eq!(
            (t.sport, t.dport, t.seq, t.flags),
            (1234, 80, 7, tcp_flags::SYN)
        );
        // The builder's checksum verifies.
        let l4 = &f[ip.l4_offset..ip.end];
        assert_eq!(
            checksum(pseudo_header_sum(ip.src, ip.dst, 6, l4.len()), l4),
            0
        );
    }

    #[test]
    fn ipv4_checksum_and_truncation_are_classified() {
        let pkt = ipv4(
            Ipv4Addr::new(1, 2, 3, 4),
            Ipv4Addr::new(5, 6, 7, 8),
            99,
            b"abc",
        );
        let mut f = ethernet(B, A, None, ETH_P_IPV4, &pkt);
        assert!(matches!(
            parse(&f).unwrap().l3,
            L3::Ip(IpPacket { l4: L4::Other, .. })
        ));
        f[14 + 8] ^= 1;
        assert_eq!(parse(&f), Err(ParseError::Ipv4BadChecksum));
        f[14 + 8] ^= 1;
        assert_eq!(parse(&f[..f.len() - 1]), Err(ParseError::Ipv4Truncated));
        assert_eq!(parse(&f[..10]), Err(ParseError::EthernetTruncated));
        // Padding after the IP packet is ignored.
        f.extend_from_slice(&[0; 20]);
        let L3::Ip(ip) = parse(&f).unwrap().l3 else {
            panic!()
        };
        assert_eq!(ip.end, 14 + 23);
    }

    #[test]
    fn ipv4_options_and_fragments() {
        let s = Ipv4Addr::new(1, 1, 1, 1);
        let d = Ipv4Addr::new(2, 2, 2, 2);
        let udp_ = udp(IpAddr::V4(s), IpAddr::V4(d), 5, 6, b"x");
        let pkt = ipv4_full(s, d, IPPROTO_UDP, 9, 1, 0x2000, &[1, 1, 1, 0], &udp_);
        let L3::Ip(ip) = parse(&ethernet(B, A, None, ETH_P_IPV4, &pkt)).unwrap().l3 else {
            panic!()
        };
        assert!(ip.has_options);
        assert_eq!(ip.fragment, Fragment::First);
        assert_eq!(ip.ports(), (5, 6));
        let pkt = ipv4_full(s, d, IPPROTO_UDP, 9, 1, 3, &[], b"zz");
        let L3::Ip(ip) = parse(&ethernet(B, A, None, ETH_P_IPV4, &pkt)).unwrap().l3 else {
            panic!()
        };
        assert_eq!((ip.fragment, ip.l4), (Fragment::Later, L4::Fragment));
    }

    #[test]
    fn ipv6_extension_chain_is_bounded() {
        let s: Ipv6Addr = "fd00::1".parse().unwrap();
        let d: Ipv6Addr = "fd00::2".parse().unwrap();
        let u = udp(IpAddr::V6(s), IpAddr::V6(d), 53, 53, b"q");
        let ext = vec![(0u8, vec![0u8; 6]), (60u8, vec![0u8; 14])];
        let pkt = ipv6_full(s, d, IPPROTO_UDP, 64, &ext, &u);
        let L3::Ip(ip) = parse(&ethernet(B, A, None, ETH_P_IPV6, &pkt)).unwrap().l3 else {
            panic!()
        };
        assert_eq!(
            (ip.proto, ip.ports(), ip.has_options),
            (IPPROTO_UDP, (53, 53), true)
        );
        let many: Vec<_> = (0..9).map(|_| (60u8, vec![0u8; 6])).collect();
        let pkt = ipv6_full(s, d, IPPROTO_UDP, 64, &many, &u);
        assert_eq!(
            parse(&ethernet(B, A, None, ETH_P_IPV6, &pkt)),
            Err(ParseError::Ipv6ExtTooMany)
        );
        // A fragment header with a non-zero offset.
        let frag = vec![(44u8, vec![0, 8, 0, 0, 0, 1])];
        let pkt = ipv6_full(s, d, IPPROTO_UDP, 64, &frag, b"rest");
        let L3::Ip(ip) = parse(&ethernet(B, A, None, ETH_P_IPV6, &pkt)).unwrap().l3 else {
            panic!()
        };
        assert_eq!(ip.fragment, Fragment::Later);
    }

    #[test]
    fn arp_and_stacked_vlans() {
        let a = arp(
            1,
            A,
            Ipv4Addr::new(10, 0, 0, 1),
            MacAddr::default(),
            Ipv4Addr::new(10, 0, 0, 2),
        );
        let f = ethernet(MacAddr::BROADCAST, A, None, ETH_P_ARP, &a);
        let L3::Arp(p) = parse(&f).unwrap().l3 else {
            panic!()
        };
        assert_eq!((p.op, p.sha, p.tpa), (1, A, Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(parse(&f[..30]), Err(ParseError::ArpMalformed));
        let inner = ethernet(B, A, Some(5), ETH_P_IPV4, &[]);
        let outer = ethernet(B, A, Some(6), ETH_P_8021Q, &inner[16..]);
        assert_eq!(parse(&outer), Err(ParseError::StackedVlan));
    }

    #[test]
    fn icmp_error_quotes_the_original_tuple() {
        let s = ip4(1);
        let d = ip4(2);
        let seg = tcp(s, d, 4000, 22, 1, 0, tcp_flags::SYN, b"");
        let orig = ip(s, d, IPPROTO_TCP, &seg);
        let err = icmp(d, s, 3, 3, [0; 4], &orig[..28]);
        let f = ethernet(A, B, None, ETH_P_IPV4, &ip(d, s, IPPROTO_ICMP, &err));
        let L3::Ip(p) = parse(&f).unwrap().l3 else {
            panic!()
        };
        assert_eq!(quoted_tuple(&f, &p), Some((s, d, IPPROTO_TCP, 4000, 22)));
    }

    #[test]
    fn mac_text_round_trip() {
        let m: MacAddr = "02:aB:00:00:10:ff".parse().unwrap();
        assert_eq!(m.to_string(), "02:ab:00:00:10:ff");
        assert!("02:00".parse::<MacAddr>().is_err());
        assert!(MacAddr([1, 0, 0, 0, 0, 0]).is_multicast());
    }
}
