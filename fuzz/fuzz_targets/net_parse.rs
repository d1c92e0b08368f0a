//! Ethernet/VLAN/ARP/IPv4/IPv6/ICMP/TCP/UDP parsing and the whole data-plane pipeline
//! (switch, firewall, reject answers, VXLAN) on arbitrary frames (see
//! `engine::net::fuzzing::net_parse`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = engine::net::fuzzing::net_parse(data);
});
