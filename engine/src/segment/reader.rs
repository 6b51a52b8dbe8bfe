//! Walking batches in bytes read from a segment, checking each one's CRC before it is trusted.

use crate::batch::{self, BatchError, BatchHeader, OffsetCheck};
use crate::constants::batch_header_bytes;

/// What lies at a position of a buffer read from a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Slot {
    /// A whole batch that passed its checks.
    Batch(BatchHeader),
    /// The buffer ends before the batch does: read `needed` bytes from this position to see it.
    Incomplete { needed: usize },
    /// Zeros where a header should be: the logical end of a preallocated segment.
    End,
    /// Bytes that are not a valid batch.
    Damaged(BatchError),
}

/// Classify the bytes at the start of `bytes`, which lie at a batch boundary of a segment.
pub fn slot(bytes: &[u8], max_batch_bytes: usize) -> Slot {
    if bytes.len() < batch_header_bytes {
        // Too few bytes to tell: a header starts with the base offset, whose high bytes are zeros
        // for any offset below 2^56, so a few zeros at the end of a read are not the log's end.
        return Slot::Incomplete {
            needed: batch_header_bytes,
        };
    }
    if bytes[..batch_header_bytes].iter().all(|&b| b == 0) {
        return Slot::End;
    }
    let header = match BatchHeader::parse(bytes) {
        Ok(h) => h,
        Err(e) => return Slot::Damaged(e),
    };
    if header.size_bytes > max_batch_bytes {
        return Slot::Damaged(BatchError::Length(header.size_bytes as i32));
    }
    if bytes.len() < header.size_bytes {
        return Slot::Incomplete {
            needed: header.size_bytes,
        };
    }
    match batch::validate(&bytes[..header.size_bytes], OffsetCheck::Sparse) {
        Ok(h) => Slot::Batch(h),
        Err(e) => Slot::Damaged(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::BatchBuilder;

    #[test]
    fn slots() {
        let b = BatchBuilder::default().build(&[1; 100]);
        assert!(matches!(slot(&b, 1 << 20), Slot::Batch(_)));
        assert_eq!(slot(&b[..50], 1 << 20), Slot::Incomplete { needed: 61 });
        assert_eq!(
            slot(&b[..70], 1 << 20),
            Slot::Incomplete { needed: b.len() }
        );
        assert_eq!(slot(&[0; 100], 1 << 20), Slot::End);
        // A read that ends a few bytes into a header shows only the base offset's zero high
        // bytes: that is a batch to read further, not the end of the log.
        let at_1325 = BatchBuilder {
            base_offset: 1325,
            ..Default::default()
        }
        .build(&[1; 100]);
        assert_eq!(&at_1325[..6], &[0; 6]);
        assert_eq!(
            slot(&at_1325[..6], 1 << 20),
            Slot::Incomplete { needed: 61 }
        );
        assert!(matches!(slot(&b, 100), Slot::Damaged(_)));
        let mut bad = b.clone();
        bad[100] ^= 0xff;
        assert!(matches!(
            slot(&bad, 1 << 20),
            Slot::Damaged(BatchError::Crc { .. })
        ));
    }
}
