//! NVMe/TCP PDU decoding, re-encoding and the NVMe structure decoders on
//! arbitrary bytes (see `nvmeof::fuzzing::pdu_decode`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nvmeof::fuzzing::pdu_decode(data);
});
