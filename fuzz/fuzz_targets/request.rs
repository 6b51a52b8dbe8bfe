//! Arbitrary bytes as a request frame body: the decoder never panics or aborts; whatever it
//! accepts is dispatched to a real broker (on a scratch directory), and every response encodes at
//! the request's version.
#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use kafka_protocol::messages::RequestKind;
use keel_server::broker::Broker;
use keel_server::{protocol, BrokerConfig};
use libfuzzer_sys::fuzz_target;

fn broker() -> &'static Arc<Broker> {
    static BROKER: OnceLock<Arc<Broker>> = OnceLock::new();
    BROKER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("keel-fuzz-request-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = BrokerConfig::default();
        for (k, v) in [
            ("log.dirs", dir.to_str().unwrap()),
            ("num.shards", "1"),
            ("log.segment.bytes", "1048576"),
            ("group.initial.rebalance.delay.ms", "0"),
        ] {
            config.set(k, v).unwrap();
        }
        Broker::open(config).expect("a broker on a scratch directory")
    })
}

/// Keep each input cheap: no long polls, no thousands of partitions.
fn bound(request: &mut RequestKind) {
    match request {
        RequestKind::Fetch(r) => r.max_wait_ms = 0,
        RequestKind::Produce(r) => r.timeout_ms = r.timeout_ms.clamp(0, 1000),
        RequestKind::CreateTopics(r) => {
            r.topics.truncate(4);
            for t in &mut r.topics {
                t.num_partitions = t.num_partitions.min(4);
                t.assignments.truncate(4);
            }
        }
        RequestKind::Metadata(r) => {
            if let Some(topics) = &mut r.topics {
                topics.truncate(4);
            }
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut request) = protocol::decode_request(Bytes::copy_from_slice(data)) else {
        return;
    };
    bound(&mut request.body);
    let (key, version, correlation) = (
        request.key,
        request.header.request_api_version,
        request.header.correlation_id,
    );
    let broker = broker().clone();
    let runtime = compio::runtime::Runtime::new().expect("a compio runtime");
    // Some requests wait on others by design (a SyncGroup for the leader's assignment): give each
    // a short while, then move on.
    let response = runtime.block_on(async move {
        let pending = broker.submit(request, None).await;
        compio::time::timeout(std::time::Duration::from_millis(200), pending).await
    });
    if let Ok(Some(reply)) = response {
        reply
            .encode(key, version, correlation)
            .unwrap_or_else(|e| panic!("{key:?} v{version} response does not encode: {e:#}"));
    }
});
