//! Broker counters (relaxed atomics) and their Prometheus text form, next to the engine's.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use kafka_protocol::messages::ApiKey;

/// Kafka API keys go up to ~90; error codes up to ~130. Anything beyond lands in the last slot.
const API_SLOTS: usize = 128;
const ERROR_SLOTS: usize = 160;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Everything the broker counts. Every rejected input bumps one of these.
        #[derive(Debug)]
        pub struct Metrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// Requests received, by API key.
            pub requests: [AtomicU64; API_SLOTS],
            /// Error codes returned, by code (per partition or per request).
            pub errors: [AtomicU64; ERROR_SLOTS],
        }

        impl Default for Metrics {
            fn default() -> Self {
                Metrics {
                    $($name: AtomicU64::new(0),)*
                    requests: std::array::from_fn(|_| AtomicU64::new(0)),
                    errors: std::array::from_fn(|_| AtomicU64::new(0)),
                }
            }
        }

        impl Metrics {
            fn simple(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters!(
    connections_accepted,
    /// Connections refused because `max.connections` were open.
    connections_rejected,
    connections_open,
    /// Frames that could not be decoded (bad header, bad body, short frame): connection closed.
    frames_malformed,
    /// Frames larger than `socket.request.max.bytes` (or negative sizes): connection closed.
    frames_oversized,
    /// Requests with an API key Kafka does not define: connection closed.
    unknown_api_keys,
    /// Requests with a version this broker does not serve.
    unsupported_versions,
    bytes_received,
    bytes_sent,
    produce_batches,
    produce_bytes,
    /// Retried idempotent batches answered with their original offsets, not appended again.
    produce_duplicates,
    /// Produce partitions answered REQUEST_TIMED_OUT (the append was slower than `timeout.ms`).
    produce_timeouts,
    fetch_bytes,
    /// Batches rewritten into their topic's `compression.type`.
    batches_recompressed,
    topics_created,
    topics_deleted,
    producer_ids_allocated,
    /// OffsetCommit requests made durable.
    offset_commits,
);

impl Metrics {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn request(&self, api_key: i16) {
        let slot = (api_key.max(0) as usize).min(API_SLOTS - 1);
        Metrics::bump(&self.requests[slot]);
    }

    /// Count an error code sent to a client (0 is not an error and is not counted).
    pub fn error(&self, code: i16) {
        if code != 0 {
            let slot = (code.unsigned_abs() as usize).min(ERROR_SLOTS - 1);
            Metrics::bump(&self.errors[slot]);
        }
    }

    pub fn error_count(&self, code: i16) -> u64 {
        let slot = (code.unsigned_abs() as usize).min(ERROR_SLOTS - 1);
        self.errors[slot].load(Ordering::Relaxed)
    }

    /// Prometheus text exposition of the broker's and the engine's counters.
    pub fn render(&self, engine: &keel_engine::metrics::MetricsSnapshot) -> String {
        let mut out = String::new();
        for (name, value) in self.simple() {
            let kind = if name == "connections_open" {
                "gauge"
            } else {
                "counter"
            };
            let _ = writeln!(out, "# TYPE keel_broker_{name} {kind}");
            let _ = writeln!(out, "keel_broker_{name} {value}");
        }
        let _ = writeln!(out, "# TYPE keel_broker_requests counter");
        for (key, count) in self.requests.iter().enumerate() {
            let count = count.load(Ordering::Relaxed);
            if count > 0 {
                let name = ApiKey::try_from(key as i16)
                    .map(|k| format!("{k:?}"))
                    .unwrap_or_else(|_| key.to_string());
                let _ = writeln!(out, "keel_broker_requests{{api=\"{name}\"}} {count}");
            }
        }
        let _ = writeln!(out, "# TYPE keel_broker_errors counter");
        for (code, count) in self.errors.iter().enumerate() {
            let count = count.load(Ordering::Relaxed);
            if count > 0 {
                let name = kafka_protocol::ResponseError::try_from_code(code as i16)
                    .map(|e| format!("{e:?}"))
                    .unwrap_or_else(|| code.to_string());
                let _ = writeln!(
                    out,
                    "keel_broker_errors{{code=\"{code}\",error=\"{name}\"}} {count}"
                );
            }
        }
        let engine_values = [
            ("appends", engine.appends),
            ("append_bytes", engine.append_bytes),
            ("appends_rejected", engine.appends_rejected),
            ("writes", engine.writes),
            ("write_bytes", engine.write_bytes),
            ("deferred_writes", engine.deferred_writes),
            ("fsyncs", engine.fsyncs),
            ("group_syncs", engine.group_syncs),
            ("segment_sync_calls", engine.segment_sync_calls),
            ("segment_durable_writes", engine.segment_durable_writes),
            ("crc_failures", engine.crc_failures),
            ("io_errors", engine.io_errors),
            ("flush_failures", engine.flush_failures),
            ("disk_full_errors", engine.disk_full_errors),
            ("reads", engine.reads),
            ("reads_from_memory", engine.reads_from_memory),
            ("segments_rolled", engine.segments_rolled),
            ("segments_deleted", engine.segments_deleted),
            ("allocations_short", engine.allocations_short),
            ("runway_writes", engine.runway_writes),
            ("runway_bytes", engine.runway_bytes),
            ("journal_writes", engine.journal_writes),
            ("journal_bytes", engine.journal_bytes),
            ("journal_syncs", engine.journal_syncs),
            ("journal_durable_writes", engine.journal_durable_writes),
            ("journal_checkpoints", engine.journal_checkpoints),
            ("journal_full", engine.journal_full),
            ("journal_restarts", engine.journal_restarts),
            ("journal_replayed", engine.journal_replayed),
            ("recovery_scanned_bytes", engine.recovery_scanned_bytes),
            (
                "recovery_points_mismatched",
                engine.recovery_points_mismatched,
            ),
        ];
        for (name, value) in engine_values {
            let _ = writeln!(out, "# TYPE keel_engine_{name} counter");
            let _ = writeln!(out, "keel_engine_{name} {value}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_apis_and_errors() {
        let m = Metrics::default();
        m.request(0);
        m.request(0);
        m.error(3);
        m.error(0);
        Metrics::bump(&m.frames_malformed);
        let text = m.render(&Default::default());
        assert!(
            text.contains("keel_broker_requests{api=\"Produce\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("error=\"UnknownTopicOrPartition\"} 1"),
            "{text}"
        );
        assert!(text.contains("keel_broker_frames_malformed 1"), "{text}");
        assert_eq!(m.error_count(0), 0);
    }
}
