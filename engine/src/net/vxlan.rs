//! VXLAN (RFC 7348): carrying a network's frames between two DPUs over UDP.
//!
//! A tunnel joins one local network to a remote VTEP under a 24-bit VNI; in the switch
//! it is one more member port of that network, so learning and flooding work across
//! it unchanged. Outer headers are IPv4/UDP to port 4789 through the uplink port. The
//! UDP source port is a hash of the inner flow so that the underlay can spread flows
//! over paths (as the RFC recommends). The remote VTEP's MAC is configured, not
//! resolved: the underlay is a point-to-point link or a configured next hop.

use std::net::{IpAddr, Ipv4Addr};

use super::packet::{build, parse, MacAddr, Parsed, ETH_P_IPV4, IPPROTO_UDP, L3, L4};

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// Outer Ethernet + IPv4 + UDP + VXLAN header bytes.
pub const VXLAN_OVERHEAD: usize = 14 + 20 + 8 + 8;

/// The outer addresses of one tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelEnds {
    /// This DPU's VTEP MAC on the uplink.
    pub local_mac: MacAddr,
    /// This DPU's VTEP address.
    pub local_ip: Ipv4Addr,
    /// The next hop's MAC towards the remote VTEP.
    pub remote_mac: MacAddr,
    /// The remote VTEP's address.
    pub remote_ip: Ipv4Addr,
}

/// Wraps `inner` (an Ethernet frame) for `vni`.
pub fn encap(inner: &[u8], vni: u32, ends: &TunnelEnds) -> Vec<u8> {
    // FNV-1a over the inner addresses and ports area; folded into the dynamic range.
    let mut h: u32 = 0x811c_9dc5;
    for b in inner.iter().take(54) {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    let sport = 49152 | u16::try_from(h & 0x3fff).unwrap_or(0);
    let mut payload = Vec::with_capacity(8 + inner.len());
    payload.extend_from_slice(&[0x08, 0, 0, 0]);
    payload.extend_from_slice(&(vni << 8).to_be_bytes());
    payload.extend_from_slice(inner);
    let (s, d) = (IpAddr::V4(ends.local_ip), IpAddr::V4(ends.remote_ip));
    let udp = build::udp(s, d, sport, VXLAN_PORT, &payload);
    let ip = build::ipv4_full(
        ends.local_ip,
        ends.remote_ip,
        IPPROTO_UDP,
        64,
        0,
        0x4000,
        &[],
        &udp,
    );
    build::ethernet(ends.remote_mac, ends.local_mac, None, ETH_P_IPV4, &ip)
}

/// A decapsulated frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decap {
    /// The VNI.
    pub vni: u32,
    /// The sending VTEP.
    pub remote_ip: Ipv4Addr,
    /// Where the inner frame starts and ends in the outer frame.
    pub inner: std::ops::Range<usize>,
}

/// Why an uplink frame is not a VXLAN frame for us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecapError {
    /// Not IPv4/UDP to port 4789 at our address.
    #[error("not VXLAN to this VTEP")]
    NotVxlan,
    /// The VXLAN header is short or lacks the I flag.
    #[error("malformed VXLAN header")]
    BadHeader,
}

/// Unwraps an outer frame parsed as `outer` addressed to `local_ip`.
pub fn decap(frame: &[u8], outer: &Parsed, local_ip: Ipv4Addr) -> Result<Decap, DecapError> {
    let L3::Ip(ip) = &outer.l3 else {
        return Err(DecapError::NotVxlan);
    };
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (ip.src, ip.dst) else {
        return Err(DecapError::NotVxlan);
    };
    let L4::Udp { dport, .. } = ip.l4 else {
        return Err(DecapError::NotVxlan);
    };
    if dport != VXLAN_PORT || dst != local_ip {
        return Err(DecapError::NotVxlan);
    }
    let at = ip.l4_offset + 8;
    let h = frame.get(at..at + 8).ok_or(DecapError::BadHeader)?;
    if h[0] & 0x08 == 0 {
        return Err(DecapError::BadHeader);
    }
    let vni = u32::from_be_bytes([0, h[4], h[5], h[6]]);
    let inner = at + 8..ip.end;
    if inner.len() < 14 {
        return Err(DecapError::BadHeader);
    }
    Ok(Decap {
        vni,
        remote_ip: src,
        inner,
    })
}

/// Parses and unwraps in one go (used by tests and the fuzz harness).
pub fn decap_frame(frame: &[u8], local_ip: Ipv4Addr) -> Option<(u32, Vec<u8>)> {
    let p = parse(frame).ok()?;
    let d = decap(frame, &p, local_ip).ok()?;
    Some((d.vni, frame[d.inner].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encap_decap_round_trip() {
        let ends = TunnelEnds {
            local_mac: MacAddr([2, 0, 0, 0, 1, 1]),
            local_ip: Ipv4Addr::new(192, 168, 1, 1),
            remote_mac: MacAddr([2, 0, 0, 0, 1, 2]),
            remote_ip: Ipv4Addr::new(192, 168, 1, 2),
        };
        let inner = build::ethernet(
            MacAddr([2; 6]),
            MacAddr([4; 6]),
            None,
            0x88b5,
            b"hello overlay",
        );
        let outer = encap(&inner, 0x12_3456, &ends);
        assert_eq!(outer.len(), inner.len() + VXLAN_OVERHEAD);
        // At the other end.
        assert_eq!(
            decap_frame(&outer, ends.remote_ip),
            Some((0x12_3456, inner.clone()))
        );
        // Not for us.
        assert_eq!(decap_frame(&outer, ends.local_ip), None);
        let p = parse(&outer).unwrap();
        assert_eq!(decap(&outer, &p, ends.local_ip), Err(DecapError::NotVxlan));
        let d = decap(&outer, &p, ends.remote_ip).unwrap();
        assert_eq!(d.remote_ip, ends.local_ip);
        // The I flag is required.
        let mut bad = outer.clone();
        bad[42] = 0;
        let p = parse(&bad).unwrap();
        // (UDP checksum is not verified by decap; the switch relies on the header fields.)
        assert_eq!(decap(&bad, &p, ends.remote_ip), Err(DecapError::BadHeader));
    }
}
