//! `compression.type` with Kafka's meaning: `producer` keeps every batch exactly as produced (the
//! default, and the only setting under which bytes reach the disk unchanged); any codec name makes
//! the broker rewrite batches that use another codec into that one. Batches already in the
//! topic's codec are kept as they are.
//!
//! Decompression is bounded: a batch that inflates beyond [`decompressed_bytes_max`] is refused
//! (a "zip bomb" costs the sender an error, not the broker its memory).

use std::io::Read;

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::records::{
    Compression as Codec, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
};
use kafka_protocol::ResponseError;
use keel_engine::batch::BatchHeader;

use crate::config::Compression;

/// The most a batch may decompress to.
pub const decompressed_bytes_max: usize = 64 * 1024 * 1024;

/// xerial snappy framing (what the Java client writes): magic, then version fields.
const xerial_magic: [u8; 8] = [0x82, b'S', b'N', b'A', b'P', b'P', b'Y', 0];
const xerial_header_bytes: usize = 16;

/// The batch to append: `None` to keep `batch` as it is, or its rewrite in the topic's codec.
pub fn recompress(
    batch: &Bytes,
    header: &BatchHeader,
    target: Compression,
) -> Result<Option<Bytes>, (ResponseError, String)> {
    let Some(codec) = target.codec() else {
        return Ok(None);
    };
    if header.compression() == codec {
        return Ok(None);
    }
    let invalid = |why: String| (ResponseError::InvalidRecord, why);
    let mut input = batch.clone();
    let set = RecordBatchDecoder::decode_with_custom_compression(
        &mut input,
        Some(|data: &mut Bytes, codec: Codec| decompress(data, codec)),
    )
    .map_err(|e| invalid(format!("cannot decode the batch to recompress it: {e:#}")))?;
    let options = RecordEncodeOptions {
        version: 2,
        compression: match target {
            Compression::Gzip => Codec::Gzip,
            Compression::Snappy => Codec::Snappy,
            Compression::Lz4 => Codec::Lz4,
            Compression::Zstd => Codec::Zstd,
            Compression::Uncompressed | Compression::Producer => Codec::None,
        },
    };
    let mut out = BytesMut::with_capacity(batch.len());
    RecordBatchEncoder::encode(&mut out, &set.records, &options)
        .map_err(|e| invalid(format!("cannot re-encode the batch: {e:#}")))?;
    Ok(Some(out.freeze()))
}

/// Decompress one batch's records section, refusing output beyond [`decompressed_bytes_max`].
fn decompress(data: &mut Bytes, codec: Codec) -> anyhow::Result<Bytes> {
    let input = data.split_to(data.remaining());
    let limit = decompressed_bytes_max as u64;
    let mut out = Vec::new();
    match codec {
        Codec::None => return Ok(input),
        Codec::Gzip => {
            flate2::read::GzDecoder::new(&input[..])
                .take(limit + 1)
                .read_to_end(&mut out)?;
        }
        Codec::Lz4 => {
            lz4::Decoder::new(&input[..])?
                .take(limit + 1)
                .read_to_end(&mut out)?;
        }
        Codec::Zstd => {
            zstd::stream::read::Decoder::new(&input[..])?
                .take(limit + 1)
                .read_to_end(&mut out)?;
        }
        Codec::Snappy => {
            let blocks: Vec<Bytes> = if input.starts_with(&xerial_magic) {
                let mut rest = input.slice(xerial_header_bytes.min(input.len())..);
                let mut blocks = Vec::new();
                while rest.has_remaining() {
                    anyhow::ensure!(rest.remaining() >= 4, "truncated snappy block length");
                    let n = rest.get_u32() as usize;
                    anyhow::ensure!(n <= rest.remaining(), "truncated snappy block");
                    blocks.push(rest.split_to(n));
                }
                blocks
            } else {
                vec![input]
            };
            for block in blocks {
                let n = snap::raw::decompress_len(&block)?;
                anyhow::ensure!(
                    out.len() + n <= decompressed_bytes_max,
                    "decompresses to more than {decompressed_bytes_max} bytes"
                );
                let start = out.len();
                out.resize(start + n, 0);
                snap::raw::Decoder::new().decompress(&block, &mut out[start..])?;
            }
        }
    }
    anyhow::ensure!(
        out.len() as u64 <= limit,
        "decompresses to more than {decompressed_bytes_max} bytes"
    );
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::records::{Record, TimestampType};

    fn batch(codec: Codec, values: &[&[u8]]) -> Bytes {
        let records: Vec<Record> = values
            .iter()
            .enumerate()
            .map(|(i, v)| Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: -1,
                producer_id: 7,
                producer_epoch: 1,
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                sequence: 40 + i as i32,
                timestamp: 1_700_000_000_000 + i as i64,
                key: Some(Bytes::from_static(b"k")),
                value: Some(Bytes::copy_from_slice(v)),
                headers: Default::default(),
            })
            .collect();
        let mut out = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut out,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression: codec,
            },
        )
        .unwrap();
        out.freeze()
    }

    fn values(batch: &Bytes) -> Vec<Vec<u8>> {
        let set = RecordBatchDecoder::decode(&mut batch.clone()).unwrap();
        set.records
            .into_iter()
            .map(|r| r.value.unwrap().to_vec())
            .collect()
    }

    #[test]
    fn rewrites_into_the_topic_codec_and_keeps_producer_fields() {
        let want: Vec<&[u8]> = vec![b"alpha", b"beta", &[9u8; 3000]];
        for (from, to) in [
            (Codec::None, Compression::Gzip),
            (Codec::Gzip, Compression::Zstd),
            (Codec::Zstd, Compression::Lz4),
            (Codec::Lz4, Compression::Snappy),
            (Codec::Snappy, Compression::Uncompressed),
        ] {
            let original = batch(from, &want);
            let h = BatchHeader::parse(&original).unwrap();
            let rewritten = recompress(&original, &h, to).unwrap().expect("rewritten");
            let h2 =
                keel_engine::batch::validate(&rewritten, keel_engine::batch::OffsetCheck::Dense)
                    .unwrap();
            assert_eq!(Some(h2.compression()), to.codec(), "{from:?} -> {to:?}");
            assert_eq!(
                (
                    h2.producer_id,
                    h2.producer_epoch,
                    h2.base_sequence,
                    h2.records_count
                ),
                (
                    h.producer_id,
                    h.producer_epoch,
                    h.base_sequence,
                    h.records_count
                )
            );
            assert_eq!(
                (h2.base_timestamp, h2.max_timestamp),
                (h.base_timestamp, h.max_timestamp)
            );
            let got = values(&rewritten);
            assert_eq!(got, want.iter().map(|v| v.to_vec()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn producer_and_matching_codecs_keep_the_bytes() {
        let original = batch(Codec::Gzip, &[b"x"]);
        let h = BatchHeader::parse(&original).unwrap();
        assert!(recompress(&original, &h, Compression::Producer)
            .unwrap()
            .is_none());
        assert!(recompress(&original, &h, Compression::Gzip)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_decompression_bomb_is_refused() {
        let big = vec![0u8; decompressed_bytes_max + 1];
        let bomb = batch(Codec::Gzip, &[&big]);
        assert!(bomb.len() < 1 << 20, "compresses well: {}", bomb.len());
        let h = BatchHeader::parse(&bomb).unwrap();
        let err = recompress(&bomb, &h, Compression::Zstd).unwrap_err();
        assert_eq!(err.0, ResponseError::InvalidRecord);
        assert!(err.1.contains("more than"), "{}", err.1);
    }
}
