//! Kafka RecordBatch v2: the unit the engine stores, byte for byte.
//!
//! ```text
//! offset  size  field                 notes
//!      0     8  baseOffset            i64, rewritten by the engine on append (outside the CRC)
//!      8     4  batchLength           i32, bytes after this field: total size = 12 + batchLength
//!     12     4  partitionLeaderEpoch  i32, stamped by the engine on append (outside the CRC)
//!     16     1  magic                 must be 2
//!     17     4  crc                   u32, CRC-32C (Castagnoli) of bytes 21..end
//!     21     2  attributes            i16: bits 0-2 compression, 3 timestamp type,
//!                                     4 transactional, 5 control, 6 delete horizon
//!     23     4  lastOffsetDelta       i32, offset of the last record relative to baseOffset
//!     27     8  baseTimestamp         i64 ms
//!     35     8  maxTimestamp          i64 ms
//!     43     8  producerId            i64, -1 when not idempotent
//!     51     2  producerEpoch         i16
//!     53     4  baseSequence          i32
//!     57     4  recordsCount          i32
//!     61     …  records               varint-encoded records, possibly compressed; never decoded here
//! ```
//!
//! All integers are big-endian. The engine reads the header through [`RawHeader`], a plain byte
//! struct cast with `bytemuck`; it never decodes records. Because `baseOffset` and
//! `partitionLeaderEpoch` lie before the CRC'd range, assigning offsets never recomputes the CRC.

use bytemuck::{Pod, Zeroable};

use crate::constants::batch_header_bytes;

pub const MAGIC_V2: u8 = 2;
/// Bytes before `batchLength`'s counted range (baseOffset + batchLength).
pub const LOG_OVERHEAD: usize = 12;
const CRC_START: usize = 21;

const ATTR_COMPRESSION_MASK: i16 = 0x07;
const ATTR_TIMESTAMP_TYPE: i16 = 0x08;
const ATTR_TRANSACTIONAL: i16 = 0x10;
const ATTR_CONTROL: i16 = 0x20;

/// The 61 header bytes as they lie on disk and on the wire.
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
#[repr(C)]
pub struct RawHeader {
    base_offset: [u8; 8],
    batch_length: [u8; 4],
    partition_leader_epoch: [u8; 4],
    magic: u8,
    crc: [u8; 4],
    attributes: [u8; 2],
    last_offset_delta: [u8; 4],
    base_timestamp: [u8; 8],
    max_timestamp: [u8; 8],
    producer_id: [u8; 8],
    producer_epoch: [u8; 2],
    base_sequence: [u8; 4],
    records_count: [u8; 4],
}

const _: () = assert!(std::mem::size_of::<RawHeader>() == batch_header_bytes);

/// A decoded batch header: what replication, idempotence and indexing need, without the records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: u64,
    /// Total size on disk, header included.
    pub size_bytes: usize,
    pub partition_leader_epoch: i32,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records_count: i32,
}

impl BatchHeader {
    /// Decode the header at the start of `bytes` without checking anything but its length.
    pub fn parse(bytes: &[u8]) -> Result<BatchHeader, BatchError> {
        let raw: &RawHeader = bytemuck::from_bytes(bytes.get(..batch_header_bytes).ok_or(
            BatchError::Truncated {
                needed: batch_header_bytes,
                available: bytes.len(),
            },
        )?);
        let batch_length = i32::from_be_bytes(raw.batch_length);
        Ok(BatchHeader {
            base_offset: i64::from_be_bytes(raw.base_offset) as u64,
            size_bytes: (batch_length.max(0) as usize).saturating_add(LOG_OVERHEAD),
            partition_leader_epoch: i32::from_be_bytes(raw.partition_leader_epoch),
            crc: u32::from_be_bytes(raw.crc),
            attributes: i16::from_be_bytes(raw.attributes),
            last_offset_delta: i32::from_be_bytes(raw.last_offset_delta),
            base_timestamp: i64::from_be_bytes(raw.base_timestamp),
            max_timestamp: i64::from_be_bytes(raw.max_timestamp),
            producer_id: i64::from_be_bytes(raw.producer_id),
            producer_epoch: i16::from_be_bytes(raw.producer_epoch),
            base_sequence: i32::from_be_bytes(raw.base_sequence),
            records_count: i32::from_be_bytes(raw.records_count),
        })
        .and_then(|h| {
            if raw.magic != MAGIC_V2 {
                Err(BatchError::Magic(raw.magic))
            } else if batch_length < (batch_header_bytes - LOG_OVERHEAD) as i32 {
                Err(BatchError::Length(batch_length))
            } else {
                Ok(h)
            }
        })
    }

    /// Offset of the last record: base + lastOffsetDelta. Saturates on a header no one validated
    /// (a validated one fits Kafka's range, see [`validate`]), so damaged bytes cannot overflow it.
    pub fn last_offset(&self) -> u64 {
        self.base_offset
            .saturating_add(self.last_offset_delta.max(0) as u64)
    }

    /// The offset after this batch.
    pub fn next_offset(&self) -> u64 {
        self.last_offset().saturating_add(1)
    }

    pub fn compression(&self) -> u8 {
        (self.attributes & ATTR_COMPRESSION_MASK) as u8
    }

    pub fn is_log_append_time(&self) -> bool {
        self.attributes & ATTR_TIMESTAMP_TYPE != 0
    }

    pub fn is_transactional(&self) -> bool {
        self.attributes & ATTR_TRANSACTIONAL != 0
    }

    pub fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }

    pub fn has_producer_id(&self) -> bool {
        self.producer_id >= 0
    }
}

/// Why a batch was rejected. Kafka maps these to CORRUPT_MESSAGE (CRC) or INVALID_RECORD (the rest).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("truncated batch: needs {needed} bytes, {available} available")]
    Truncated { needed: usize, available: usize },
    #[error("unsupported magic {0} (only RecordBatch v2 is accepted)")]
    Magic(u8),
    #[error("invalid batchLength {0}")]
    Length(i32),
    #[error("CRC-32C mismatch: header says {stored:#010x}, bytes give {computed:#010x}")]
    Crc { stored: u32, computed: u32 },
    #[error("recordsCount {records_count} does not match lastOffsetDelta {last_offset_delta}")]
    RecordCount {
        records_count: i32,
        last_offset_delta: i32,
    },
    #[error("offsets {base_offset}..+{last_offset_delta} lie outside Kafka's offset range")]
    OffsetRange {
        base_offset: i64,
        last_offset_delta: i32,
    },
    #[error("empty input: no batch")]
    Empty,
}

impl BatchError {
    /// True when the bytes were damaged (Kafka's CORRUPT_MESSAGE) rather than malformed.
    pub fn is_crc(&self) -> bool {
        matches!(self, BatchError::Crc { .. })
    }
}

/// CRC-32C of the CRC'd range of a complete batch.
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c(&batch[CRC_START..])
}

/// How strictly `validate` checks the offset range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetCheck {
    /// Produced by a client: every offset in the range holds exactly one record.
    Dense,
    /// Copied from a leader or compacted: records may have been removed from the range.
    Sparse,
}

/// Check one complete batch at the start of `bytes`: magic, lengths, CRC, record count. Returns its
/// header; the batch occupies `bytes[..header.size_bytes]`.
pub fn validate(bytes: &[u8], check: OffsetCheck) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(bytes)?;
    if bytes.len() < header.size_bytes {
        return Err(BatchError::Truncated {
            needed: header.size_bytes,
            available: bytes.len(),
        });
    }
    let computed = compute_crc(&bytes[..header.size_bytes]);
    if computed != header.crc {
        return Err(BatchError::Crc {
            stored: header.crc,
            computed,
        });
    }
    let count_ok = header.last_offset_delta >= 0
        && header.records_count >= 0
        && match check {
            OffsetCheck::Dense => {
                header.records_count > 0
                    && header.records_count as i64 == header.last_offset_delta as i64 + 1
            }
            OffsetCheck::Sparse => {
                header.records_count as i64 <= header.last_offset_delta as i64 + 1
            }
        };
    if !count_ok {
        return Err(BatchError::RecordCount {
            records_count: header.records_count,
            last_offset_delta: header.last_offset_delta,
        });
    }
    // Offsets a caller keeps (a replica's, a stored batch's) must fit Kafka's signed range with
    // room for the next offset: the base offset is outside the CRC'd range, so damage there
    // passes the CRC. A producer's base offset is replaced on append and not checked.
    let base = header.base_offset as i64;
    let range_ok = base >= 0 && base < i64::MAX - header.last_offset_delta as i64;
    if check == OffsetCheck::Sparse && !range_ok {
        return Err(BatchError::OffsetRange {
            base_offset: base,
            last_offset_delta: header.last_offset_delta,
        });
    }
    Ok(header)
}

/// Validate every batch in `bytes`, which must hold one or more whole batches and nothing else.
/// Returns their headers in order.
pub fn validate_all(bytes: &[u8], check: OffsetCheck) -> Result<Vec<BatchHeader>, BatchError> {
    if bytes.is_empty() {
        return Err(BatchError::Empty);
    }
    let mut headers = Vec::with_capacity(1);
    let mut position = 0;
    while position < bytes.len() {
        let header = validate(&bytes[position..], check)?;
        position += header.size_bytes;
        headers.push(header);
    }
    Ok(headers)
}

/// Rewrite baseOffset (outside the CRC'd range).
pub fn set_base_offset(batch: &mut [u8], base_offset: u64) {
    batch[0..8].copy_from_slice(&(base_offset as i64).to_be_bytes());
}

/// Rewrite partitionLeaderEpoch (outside the CRC'd range).
pub fn set_partition_leader_epoch(batch: &mut [u8], epoch: i32) {
    batch[12..16].copy_from_slice(&epoch.to_be_bytes());
}

/// A minimal batch builder for tests, benchmarks and fuzz seeds: `records_count` records whose
/// encoded bytes are `payload` (opaque to the engine), a valid header and CRC.
#[derive(Clone, Debug)]
pub struct BatchBuilder {
    pub base_offset: u64,
    pub records_count: i32,
    pub timestamp_ms: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub attributes: i16,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        BatchBuilder {
            base_offset: 0,
            records_count: 1,
            timestamp_ms: 0,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            attributes: 0,
        }
    }
}

impl BatchBuilder {
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let size = batch_header_bytes + payload.len();
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(&(self.base_offset as i64).to_be_bytes());
        out.extend_from_slice(&((size - LOG_OVERHEAD) as i32).to_be_bytes());
        out.extend_from_slice(&(-1i32).to_be_bytes());
        out.push(MAGIC_V2);
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&self.attributes.to_be_bytes());
        out.extend_from_slice(&(self.records_count - 1).to_be_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        out.extend_from_slice(&self.producer_id.to_be_bytes());
        out.extend_from_slice(&self.producer_epoch.to_be_bytes());
        out.extend_from_slice(&self.base_sequence.to_be_bytes());
        out.extend_from_slice(&self.records_count.to_be_bytes());
        out.extend_from_slice(payload);
        let crc = compute_crc(&out);
        out[17..21].copy_from_slice(&crc.to_be_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_batch_validates_and_offsets_rewrite_keeps_crc() {
        let mut b = BatchBuilder {
            records_count: 3,
            timestamp_ms: 42,
            ..Default::default()
        }
        .build(b"abc");
        let h = validate(&b, OffsetCheck::Dense).unwrap();
        assert_eq!(h.size_bytes, 64);
        assert_eq!(h.last_offset_delta, 2);
        assert_eq!(h.max_timestamp, 42);
        set_base_offset(&mut b, 1000);
        set_partition_leader_epoch(&mut b, 7);
        let h = validate(&b, OffsetCheck::Dense).unwrap();
        assert_eq!(
            (h.base_offset, h.last_offset(), h.partition_leader_epoch),
            (1000, 1002, 7)
        );
    }

    #[test]
    fn each_damage_is_its_own_error() {
        let good = BatchBuilder::default().build(b"payload");
        let mut crc = good.clone();
        crc[70 - 3] ^= 1;
        assert!(validate(&crc, OffsetCheck::Dense).unwrap_err().is_crc());
        let mut magic = good.clone();
        magic[16] = 1;
        assert_eq!(
            validate(&magic, OffsetCheck::Dense),
            Err(BatchError::Magic(1))
        );
        assert!(matches!(
            validate(&good[..good.len() - 1], OffsetCheck::Dense),
            Err(BatchError::Truncated { .. })
        ));
        let mut length = good.clone();
        length[8..12].copy_from_slice(&3i32.to_be_bytes());
        assert_eq!(
            validate(&length, OffsetCheck::Dense),
            Err(BatchError::Length(3))
        );
        let count = BatchBuilder {
            records_count: 2,
            ..Default::default()
        };
        let mut count = count.build(b"x");
        count[57..61].copy_from_slice(&5i32.to_be_bytes());
        let crc = compute_crc(&count);
        count[17..21].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            validate(&count, OffsetCheck::Dense),
            Err(BatchError::RecordCount { .. })
        ));
        assert_eq!(
            validate_all(&[], OffsetCheck::Dense),
            Err(BatchError::Empty)
        );
    }

    #[test]
    fn kept_offsets_must_fit_kafkas_range_and_a_producers_are_not_checked() {
        let three = BatchBuilder {
            records_count: 3,
            ..Default::default()
        }
        .build(b"abc");
        for (base, fits) in [
            (0i64, true),
            (i64::MAX - 3, true),
            (i64::MAX - 2, false),
            (i64::MAX, false),
            (-1, false),
            (i64::MIN, false),
        ] {
            let mut b = three.clone();
            set_base_offset(&mut b, base as u64);
            let sparse = validate(&b, OffsetCheck::Sparse);
            if fits {
                let h = sparse.unwrap();
                assert!(h.next_offset() <= i64::MAX as u64, "{base}");
            } else {
                assert_eq!(
                    sparse,
                    Err(BatchError::OffsetRange {
                        base_offset: base,
                        last_offset_delta: 2
                    })
                );
            }
            assert!(validate(&b, OffsetCheck::Dense).is_ok(), "{base}");
        }
    }

    #[test]
    fn validate_all_walks_concatenated_batches() {
        let mut two = BatchBuilder::default().build(b"one");
        two.extend(BatchBuilder::default().build(b"two!"));
        let headers = validate_all(&two, OffsetCheck::Dense).unwrap();
        assert_eq!(headers.len(), 2);
        assert_eq!(headers[0].size_bytes + headers[1].size_bytes, two.len());
    }
}
