//! Any bytes as a WAL segment: the decoder must never panic, never allocate by a length
//! field it has not checked, and report damage with an offset inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ratify_coordinator::log::frame;

fuzz_target!(|data: &[u8]| {
    // Half the inputs get a valid header so the frame decoder is reached.
    let mut bytes = Vec::with_capacity(data.len() + frame::HEADER_LEN);
    if data.first().is_some_and(|b| b & 1 == 0) {
        bytes.extend_from_slice(&frame::segment_header());
    }
    bytes.extend_from_slice(data);
    if let Ok(scan) = frame::scan_segment(&bytes) {
        assert!(scan.valid_len <= bytes.len());
        if let Some(damage) = scan.damage {
            assert!(damage.offset <= bytes.len());
            assert_eq!(damage.offset, scan.valid_len);
        }
    }
});
