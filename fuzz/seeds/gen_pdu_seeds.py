#!/usr/bin/env python3
"""Writes the pdu_decode seed corpus (fuzz/seeds/pdu_decode/) with an encoder that
shares no code with the Rust crate, so `nvmeof/tests/fuzz_regressions.rs`
(independent_seed_pdus_decode) cross-checks the crate's layouts and digests.

Each file: two parameter bytes for nvmeof::fuzzing::pdu_params (bit 0 host, bit 1
header digest, bit 2 data digest, bit 5 1 MiB limit), then one PDU."""
import os
import struct
import sys

T = []
for i in range(256):
    c = i
    for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    T.append(c)


def crc32c(b):
    c = 0xFFFFFFFF
    for x in b:
        c = T[(c ^ x) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283


def pdu(t, hlen, body, data=b"", hd=False, dd=False, flags=0):
    f = flags | (1 if hd else 0) | (2 if (dd and data) else 0)
    hdr_len = hlen + (4 if hd else 0)
    pdo = hdr_len if data else 0
    plen = hdr_len + len(data) + (4 if (dd and data) else 0)
    h = (bytes([t, f, hlen, pdo]) + struct.pack("<I", plen) + body).ljust(hlen, b"\0")
    out = h + (struct.pack("<I", crc32c(h)) if hd else b"") + data
    if dd and data:
        out += struct.pack("<I", crc32c(data))
    return out


def main(outdir):
    # Write, NSID 1, in-capsule SGL (data block, offset subtype) of 16 bytes.
    sqe = (bytes([0x01, 0x40]) + struct.pack("<HI", 5, 1) + b"\0" * 24
           + struct.pack("<I", 16) + b"\0" * 3 + bytes([0x01]) + b"\0" * 24)
    cqe = struct.pack("<IIHHHH", 1, 0, 0, 0, 5, 0)
    seeds = {}
    for hd in (False, True):
        for dd in (False, True):
            a_ctl = (2 if hd else 0) | (4 if dd else 0) | 32
            a_host = a_ctl | 1
            tag = f"h{int(hd)}d{int(dd)}"
            seeds[f"cmd_{tag}"] = bytes([a_ctl, 0]) + pdu(4, 72, sqe, b"\xAB" * 16, hd, dd)
            seeds[f"h2c_{tag}"] = bytes([a_ctl, 0]) + pdu(
                6, 24, struct.pack("<HHII", 5, 9, 0, 16), b"\xCD" * 16, hd, dd, flags=4)
            seeds[f"resp_{tag}"] = bytes([a_host, 0]) + pdu(5, 24, cqe, b"", hd, dd)
            seeds[f"c2h_{tag}"] = bytes([a_host, 0]) + pdu(
                7, 24, struct.pack("<HHII", 5, 0, 0, 16), b"\xEF" * 16, hd, dd, flags=12)
            seeds[f"r2t_{tag}"] = bytes([a_host, 0]) + pdu(
                9, 24, struct.pack("<HHII", 5, 9, 0, 4096), b"", hd, dd)
    seeds["icreq"] = bytes([32, 0]) + pdu(0, 128, struct.pack("<HBBI", 0, 0, 3, 0))
    seeds["icresp"] = bytes([33, 0]) + pdu(1, 128, struct.pack("<HBBI", 0, 0, 3, 131072))
    seeds["h2cterm"] = bytes([32, 0]) + pdu(2, 24, struct.pack("<HI", 1, 3), b"\x04" * 24)
    seeds["c2hterm"] = bytes([33, 0]) + pdu(3, 24, struct.pack("<HI", 2, 0), b"\x04" * 8)
    connect = bytearray(1024)
    connect[16:18] = b"\xff\xff"
    connect[256:260] = b"nqn."
    connect[512:516] = b"nqn."
    csqe = (bytes([0x7F, 0x40]) + struct.pack("<H", 1) + bytes([1, 0, 0, 0]) + b"\0" * 24
            + struct.pack("<I", 1024) + b"\0" * 3 + bytes([0x01])
            + struct.pack("<HHHBBI", 0, 0, 31, 0, 0, 5000) + b"\0" * 12)
    seeds["connect"] = bytes([32, 0]) + pdu(4, 72, csqe, bytes(connect))
    os.makedirs(outdir, exist_ok=True)
    for name, v in seeds.items():
        with open(os.path.join(outdir, name), "wb") as f:
            f.write(v)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "pdu_decode"))
