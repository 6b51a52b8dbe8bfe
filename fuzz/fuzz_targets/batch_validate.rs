//! Batch validation on arbitrary bytes: never panics; whatever it accepts is self-consistent.
#![no_main]

use keel_engine::batch::{self, OffsetCheck};
use keel_engine::segment::reader::{slot, Slot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for check in [OffsetCheck::Dense, OffsetCheck::Sparse] {
        if let Ok(headers) = batch::validate_all(data, check) {
            let total: usize = headers.iter().map(|h| h.size_bytes).sum();
            assert_eq!(total, data.len());
            let mut at = 0;
            for h in &headers {
                assert_eq!(batch::compute_crc(&data[at..at + h.size_bytes]), h.crc);
                at += h.size_bytes;
            }
        }
    }
    if let Slot::Batch(h) = slot(data, 1 << 20) {
        assert!(h.size_bytes <= data.len());
        assert!(batch::validate(&data[..h.size_bytes], OffsetCheck::Sparse).is_ok());
    }
});
