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
];

pub fn supported_versions(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED_APIS
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|&(_, min, max)| (min, max))
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
