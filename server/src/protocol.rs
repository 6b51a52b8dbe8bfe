//! Kafka framing: which APIs and versions Keel serves, decoding a request frame, encoding a
//! response frame. Pure functions, no I/O: the fuzz target drives them directly.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, RequestHeader, RequestKind, ResponseHeader, ResponseKind,
};
use kafka_protocol::protocol::Encodable;
use kafka_protocol::ResponseError;

/// The APIs and version ranges Keel advertises in ApiVersions. Chosen to cover what current
/// librdkafka, the Java client, kafka-python and kafkajs negotiate, within what is implemented
/// (Fetch stops at 12: v13+ names topics by id only; Produce at 11: v12+ is KIP-890).
pub const SUPPORTED_APIS: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 11),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 6),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ApiVersions, 0, 4),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 7),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 4),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::DeleteGroups, 0, 2),
];

pub fn supported_versions(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED_APIS
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|&(_, min, max)| (min, max))
}

/// A string for a response field.
pub fn str_bytes(s: impl Into<String>) -> kafka_protocol::protocol::StrBytes {
    kafka_protocol::protocol::StrBytes::from_string(s.into())
}

/// A frame body is at least api key, version and correlation id.
pub const frame_header_bytes_min: usize = 8;

/// Why a frame is not served. Every variant but `UnsupportedApiVersions` closes the connection
/// (Kafka does the same: an undecodable request leaves the stream in an unknown state).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is shorter than a request header")]
    TooShort(usize),
    #[error("unknown API key {0}")]
    UnknownApiKey(i16),
    #[error("{key:?} v{version} is not supported (Keel serves v{min}..=v{max})")]
    UnsupportedVersion {
        key: ApiKey,
        version: i16,
        min: i16,
        max: i16,
        correlation_id: i32,
    },
    #[error("malformed {key:?} v{version} request: {why}")]
    Malformed {
        key: ApiKey,
        version: i16,
        why: String,
    },
}

impl FrameError {
    /// The answer a client gets before the connection closes, if any: an ApiVersions request of
    /// a version Keel does not know is answered with v0 and UNSUPPORTED_VERSION, listing what is
    /// supported, so the client can retry with a version both sides speak (KIP-511).
    pub fn reply(&self) -> Option<BytesMut> {
        match *self {
            FrameError::UnsupportedVersion {
                key: ApiKey::ApiVersions,
                correlation_id,
                ..
            } => {
                let body = api_versions_response(ResponseError::UnsupportedVersion.code());
                encode_response(ApiKey::ApiVersions, 0, correlation_id, &body.into()).ok()
            }
            _ => None,
        }
    }
}

/// A decoded request.
#[derive(Debug)]
pub struct Request {
    pub key: ApiKey,
    pub header: RequestHeader,
    pub body: RequestKind,
}

/// Decode one frame body (the bytes after the 4-byte size). Record bytes in a Produce request
/// stay slices of `frame`: they are not copied.
pub fn decode_request(frame: Bytes) -> Result<Request, FrameError> {
    if frame.len() < frame_header_bytes_min {
        return Err(FrameError::TooShort(frame.len()));
    }
    let raw_key = (&frame[0..2]).get_i16();
    let version = (&frame[2..4]).get_i16();
    let correlation_id = (&frame[4..8]).get_i32();
    let key = ApiKey::try_from(raw_key).map_err(|_| FrameError::UnknownApiKey(raw_key))?;
    let (min, max) = supported_versions(key).ok_or(FrameError::UnsupportedVersion {
        key,
        version,
        min: 0,
        max: -1,
        correlation_id,
    })?;
    if !(min..=max).contains(&version) {
        return Err(FrameError::UnsupportedVersion {
            key,
            version,
            min,
            max,
            correlation_id,
        });
    }
    let malformed = |why: String| FrameError::Malformed { key, version, why };
    let mut buf = frame;
    // The decoder is bounds-checked and returns errors, but it is third-party code fed hostile
    // bytes: a panic in it must cost one connection, not a shard thread.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let header = kafka_protocol::protocol::decode_request_header_from_buffer(&mut buf)?;
        let body = RequestKind::decode(key, &mut buf, version)?;
        anyhow::Ok((header, body))
    }));
    match decoded {
        Ok(Ok((header, body))) => Ok(Request { key, header, body }),
        Ok(Err(e)) => Err(malformed(format!("{e:#}"))),
        Err(_) => Err(malformed("the decoder panicked".into())),
    }
}

/// A whole response frame: size, header, body.
pub fn encode_response(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &ResponseKind,
) -> anyhow::Result<BytesMut> {
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    let mut out = BytesMut::with_capacity(256);
    out.put_i32(0);
    header.encode(&mut out, key.response_header_version(version))?;
    body.encode(&mut out, version)?;
    let size = i32::try_from(out.len() - 4)?;
    out[0..4].copy_from_slice(&size.to_be_bytes());
    Ok(out)
}

pub fn api_versions_response(error_code: i16) -> ApiVersionsResponse {
    ApiVersionsResponse::default()
        .with_error_code(error_code)
        .with_api_keys(
            SUPPORTED_APIS
                .iter()
                .map(|&(key, min, max)| {
                    ApiVersion::default()
                        .with_api_key(key as i16)
                        .with_min_version(min)
                        .with_max_version(max)
                })
                .collect(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::{ApiVersionsRequest, MetadataRequest};
    use kafka_protocol::protocol::StrBytes;

    fn frame(key: ApiKey, version: i16, body: &RequestKind) -> Bytes {
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(7)
            .with_client_id(Some(StrBytes::from_static_str("t")));
        let mut out = BytesMut::new();
        header
            .encode(&mut out, key.request_header_version(version))
            .unwrap();
        body.encode(&mut out, version).unwrap();
        out.freeze()
    }

    #[test]
    fn decodes_supported_requests() {
        let f = frame(
            ApiKey::ApiVersions,
            3,
            &ApiVersionsRequest::default().into(),
        );
        let r = decode_request(f).unwrap();
        assert_eq!((r.key, r.header.correlation_id), (ApiKey::ApiVersions, 7));
        let f = frame(ApiKey::Metadata, 12, &MetadataRequest::default().into());
        assert!(matches!(
            decode_request(f).unwrap().body,
            RequestKind::Metadata(_)
        ));
    }

    #[test]
    fn rejects_each_kind_of_bad_frame() {
        assert!(matches!(
            decode_request(Bytes::from_static(&[0, 1])),
            Err(FrameError::TooShort(2))
        ));
        let unknown = Bytes::from_static(&[0x7f, 0x00, 0, 0, 0, 0, 0, 1]);
        assert!(matches!(
            decode_request(unknown),
            Err(FrameError::UnknownApiKey(0x7f00))
        ));
        let f = frame(
            ApiKey::ApiVersions,
            3,
            &ApiVersionsRequest::default().into(),
        );
        let mut newer = BytesMut::from(&f[..]);
        newer[2..4].copy_from_slice(&99i16.to_be_bytes());
        let e = decode_request(newer.freeze()).unwrap_err();
        let reply = e.reply().expect("ApiVersions gets an answer");
        // size, correlation id 7, error code 35 (UNSUPPORTED_VERSION)
        assert_eq!(&reply[4..8], &7i32.to_be_bytes());
        assert_eq!(&reply[8..10], &35i16.to_be_bytes());
        // A Metadata request cut short is malformed.
        let f = frame(
            ApiKey::Metadata,
            1,
            &MetadataRequest::default().with_topics(None).into(),
        );
        let cut = f.slice(..f.len() - 1);
        assert!(matches!(
            decode_request(cut),
            Err(FrameError::Malformed { .. })
        ));
    }

    #[test]
    fn a_huge_array_length_is_an_error_not_an_abort() {
        // Metadata v1: header (key, version, correlation, client id -1), then topics: i32 count.
        let mut f = BytesMut::new();
        f.put_i16(ApiKey::Metadata as i16);
        f.put_i16(1);
        f.put_i32(1);
        f.put_i16(-1);
        f.put_i32(i32::MAX);
        assert!(matches!(
            decode_request(f.freeze()),
            Err(FrameError::Malformed { .. })
        ));
    }
}

/// A Fetch response as a list of buffers to write with one vectored write: the encoded fields,
/// with each partition's record bytes spliced in as the engine returned them (no copy). Byte for
/// byte what `encode_response` would produce with the records joined (a test checks it).
///
/// `response` carries everything but the records (its partitions' `records` are ignored);
/// `records[t][p]` are the chunks of topic `t`, partition `p`, in order.
pub fn encode_fetch_response(
    version: i16,
    correlation_id: i32,
    response: &kafka_protocol::messages::FetchResponse,
    records: &[Vec<Vec<Bytes>>],
) -> anyhow::Result<Vec<Bytes>> {
    anyhow::ensure!(
        (4..=12).contains(&version),
        "vectored Fetch encoding covers v4..=v12, not v{version}"
    );
    let flexible = version >= 12;
    let mut out: Vec<Bytes> = Vec::new();
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0); // frame size, filled in at the end
    buf.put_i32(correlation_id);
    if flexible {
        buf.put_u8(0); // response header v1: no tagged fields
    }
    buf.put_i32(response.throttle_time_ms);
    if version >= 7 {
        buf.put_i16(response.error_code);
        buf.put_i32(response.session_id);
    }
    put_len(&mut buf, response.responses.len(), flexible);
    for (t, topic) in response.responses.iter().enumerate() {
        let name = topic.topic.as_bytes();
        if flexible {
            put_uvarint(&mut buf, name.len() as u32 + 1);
        } else {
            buf.put_i16(i16::try_from(name.len())?);
        }
        buf.put_slice(name);
        put_len(&mut buf, topic.partitions.len(), flexible);
        for (p, partition) in topic.partitions.iter().enumerate() {
            let chunks: &[Bytes] = records
                .get(t)
                .and_then(|ps| ps.get(p))
                .map_or(&[], Vec::as_slice);
            let mut fields = partition.clone();
            fields.records = None;
            let start = buf.len();
            fields.encode(&mut buf, version)?;
            // With `records` null the partition ends in a null marker (v4-11: i32 -1; v12: a
            // compact null, then the tagged-field count, 0 as nothing is tagged).
            let tail: &[u8] = if flexible { &[0, 0] } else { &[0xff; 4] };
            anyhow::ensure!(
                buf.len() - start >= tail.len() && buf.ends_with(tail),
                "unexpected PartitionData layout"
            );
            buf.truncate(buf.len() - tail.len());
            let total: usize = chunks.iter().map(Bytes::len).sum();
            if flexible {
                put_uvarint(&mut buf, u32::try_from(total + 1)?);
            } else {
                buf.put_i32(i32::try_from(total)?);
            }
            if total > 0 {
                out.push(buf.split().freeze());
                out.extend(chunks.iter().filter(|c| !c.is_empty()).cloned());
            }
            if flexible {
                buf.put_u8(0);
            }
        }
        if flexible {
            buf.put_u8(0); // topic tagged fields
        }
    }
    if flexible {
        buf.put_u8(0); // response tagged fields
    }
    out.push(buf.freeze());
    let size: usize = out.iter().map(Bytes::len).sum::<usize>() - 4;
    let mut first = BytesMut::from(&out[0][..]);
    first[0..4].copy_from_slice(&i32::try_from(size)?.to_be_bytes());
    out[0] = first.freeze();
    Ok(out)
}

fn put_len(buf: &mut BytesMut, n: usize, flexible: bool) {
    if flexible {
        put_uvarint(buf, n as u32 + 1);
    } else {
        buf.put_i32(n as i32);
    }
}

fn put_uvarint(buf: &mut BytesMut, mut v: u32) {
    while v >= 0x80 {
        buf.put_u8((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

#[cfg(test)]
mod fetch_encoding_tests {
    use super::*;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::messages::{FetchResponse, TopicName};
    use kafka_protocol::protocol::StrBytes;

    #[test]
    fn vectored_fetch_encoding_matches_the_crate_byte_for_byte() {
        let chunk = |n: usize, seed: u8| {
            Bytes::from(
                (0..n)
                    .map(|i| (i as u8).wrapping_mul(seed))
                    .collect::<Vec<u8>>(),
            )
        };
        // topic 0: two partitions (one with two chunks, one empty); topic 1: one partition of 200 bytes.
        let records = vec![
            vec![vec![chunk(70, 3), chunk(130, 7)], vec![]],
            vec![vec![chunk(200, 11)]],
        ];
        let mut response = FetchResponse::default().with_throttle_time_ms(0);
        for (t, parts) in records.iter().enumerate() {
            let partitions = parts
                .iter()
                .enumerate()
                .map(|(p, chunks)| {
                    PartitionData::default()
                        .with_partition_index(p as i32)
                        .with_high_watermark(1000 + p as i64)
                        .with_last_stable_offset(900)
                        .with_error_code(if chunks.is_empty() { 1 } else { 0 })
                })
                .collect();
            response.responses.push(
                FetchableTopicResponse::default()
                    .with_topic(TopicName(StrBytes::from_string(format!("topic-{t}"))))
                    .with_partitions(partitions),
            );
        }
        for version in 4..=12i16 {
            let mut joined = response.clone();
            for (t, topic) in joined.responses.iter_mut().enumerate() {
                if version < 5 {
                    for p in &mut topic.partitions {
                        p.log_start_offset = -1;
                    }
                } else {
                    for p in &mut topic.partitions {
                        p.log_start_offset = 5;
                    }
                }
                for (p, partition) in topic.partitions.iter_mut().enumerate() {
                    let bytes: Vec<u8> = records[t][p].iter().flat_map(|c| c.to_vec()).collect();
                    partition.records = Some(Bytes::from(bytes));
                }
            }
            let expected =
                encode_response(ApiKey::Fetch, version, 42, &joined.clone().into()).unwrap();
            let got: Vec<u8> = encode_fetch_response(version, 42, &joined, &records)
                .unwrap()
                .iter()
                .flat_map(|b| b.to_vec())
                .collect();
            assert_eq!(got, expected.to_vec(), "Fetch v{version}");
        }
    }
}
