//! `keel-bench broker`: producers and consumers over the Kafka protocol against `keel serve`
//! (started in-process on a scratch directory, or an external broker with `--bootstrap`).
//!
//! Its own load generator, so batching is exact: each producer is one connection with an
//! idempotent producer id, keeping `inflight` produce requests in flight (as librdkafka does with
//! `max.in.flight=5`), each of one batch or, with `partitions_per_request`, of one batch for each
//! of that many partitions (as a Kafka producer's sender drains every partition with a batch
//! ready into one request per broker). Like a pipelining client it reads every answer that
//! has arrived, then sends all the requests the window allows in one write (a producer whose
//! batches are ready does not send them one answer apart); a request's send time is when it was
//! built, just before that write. A batch is `messages_per_batch` records of `message_bytes`
//! each; the record bytes are opaque filler (the broker never parses records, so their encoding
//! does not change what is measured). Consumers fetch every partition from the start and match
//! each batch they see, by (producer id, partition, base sequence), to its send time: that is the
//! end-to-end latency, produce request sent → batch fetched by a consumer.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hdrhistogram::Histogram;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    CreateTopicsRequest, FetchRequest, InitProducerIdRequest, ProduceRequest, RequestHeader,
    ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use keel_engine::batch::{BatchBuilder, BatchHeader};

use crate::report::{histogram, mb_per_s, percentile_curve, Percentiles, Progress, Timeline};

/// Non-flexible, so a request ends with its partition entries (see `produce_template`).
const produce_version: i16 = 8;
const fetch_version: i16 = 11;

#[derive(Clone, Debug)]
pub struct BrokerLoadConfig {
    pub bootstrap: SocketAddr,
    pub topic: String,
    pub partitions: u32,
    pub producers: usize,
    pub consumers: usize,
    pub message_bytes: usize,
    pub messages_per_batch: usize,
    /// -1 (all), 0 or 1.
    pub acks: i16,
    /// Produce requests in flight per producer connection.
    pub inflight: usize,
    /// Batches per produce request, each for another partition (1: one batch per request).
    pub partitions_per_request: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Stop after this many messages in all (0: no limit).
    pub max_messages: u64,
    /// Open loop: offer this many messages per second in all, whatever the latency (0: closed
    /// loop, each producer sends as soon as it has fewer than `inflight` requests outstanding).
    /// Latency is then measured from each batch's scheduled send time, so a stall counts in full
    /// (no coordinated omission).
    pub rate_messages_per_s: f64,
    /// Topic settings for CreateTopics (e.g. flush.policy).
    pub topic_configs: Vec<(String, String)>,
}

#[derive(Clone, Debug, Default)]
pub struct BrokerLoadResult {
    pub bytes: u64,
    pub messages: u64,
    pub batches: u64,
    pub seconds: f64,
    pub throughput_mb_s: f64,
    pub messages_per_s: f64,
    pub produce_latency: Percentiles,
    pub e2e_latency: Percentiles,
    /// Per-second produce throughput and latency (JSON).
    pub timeline: serde_json::Value,
    /// Produce and end-to-end latency distributions as `[[percentile, µs], ...]`.
    pub produce_curve: serde_json::Value,
    pub e2e_curve: serde_json::Value,
    pub consumed_bytes: u64,
    pub errors: u64,
    /// CPU spent from the end of the warm-up to the end of the run (with `--bootstrap` the
    /// broker is another process: only the load generator's is here).
    pub cpu: crate::cpu::CpuUse,
}

/// Send times of batches not yet seen by a consumer, by (producer id, partition, base sequence).
type SendTimes = Arc<Mutex<HashMap<(i64, i32, i32), Instant>>>;

struct Conn {
    stream: TcpStream,
    correlation: i32,
    /// What has been read and not yet taken: a read takes whatever the socket holds, so the
    /// answers a broker writes together are read together.
    inbox: BytesMut,
    /// What one read of small frames lands in (zeroed once).
    scratch: Box<[u8]>,
}

impl Conn {
    fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Conn {
            stream,
            correlation: 0,
            inbox: BytesMut::with_capacity(64 << 10),
            scratch: vec![0; 64 << 10].into_boxed_slice(),
        })
    }

    fn send<R: Request>(&mut self, version: i16, request: &R) -> std::io::Result<()> {
        self.correlation += 1;
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(StrBytes::from_static_str("keel-bench")));
        let mut frame = BytesMut::with_capacity(256);
        frame.extend_from_slice(&[0; 4]);
        header
            .encode(&mut frame, R::header_version(version))
            .map_err(std::io::Error::other)?;
        request
            .encode(&mut frame, version)
            .map_err(std::io::Error::other)?;
        let size = (frame.len() - 4) as i32;
        frame[0..4].copy_from_slice(&size.to_be_bytes());
        self.stream.write_all(&frame)
    }

    /// The length of the first frame in the inbox (size prefix included), once its prefix is
    /// there.
    fn announced(&self) -> Option<usize> {
        let size = self.inbox.get(..4)?;
        Some(4 + i32::from_be_bytes(size.try_into().expect("4 bytes")).max(0) as usize)
    }

    /// The length of the first whole frame in the inbox (size prefix included), if there is one.
    fn frame_ready(&self) -> Option<usize> {
        self.announced().filter(|&len| self.inbox.len() >= len)
    }

    fn receive<R: Request>(&mut self, version: i16) -> std::io::Result<R::Response> {
        let mut body = loop {
            if let Some(len) = self.frame_ready() {
                break self.inbox.split_to(len).freeze();
            }
            let filled = self.inbox.len();
            let announced = self.announced().unwrap_or(0);
            if announced > filled + self.scratch.len() {
                // A large frame (a fetch response): its rest straight into one buffer, unzeroed.
                let mut frame = Vec::with_capacity(announced);
                frame.extend_from_slice(&self.inbox);
                (&self.stream)
                    .take((announced - filled) as u64)
                    .read_to_end(&mut frame)?;
                if frame.len() < announced {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                self.inbox.clear();
                break Bytes::from(frame);
            }
            // Whatever the socket holds, up to 64 KiB: the answers written together.
            match self.stream.read(&mut self.scratch[..])? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => self.inbox.extend_from_slice(&self.scratch[..n]),
            }
        };
        body.advance(4);
        ResponseHeader::decode(
            &mut body,
            <R::Response as HeaderVersion>::header_version(version),
        )
        .map_err(std::io::Error::other)?;
        R::Response::decode(&mut body, version).map_err(std::io::Error::other)
    }

    fn call<R: Request>(&mut self, version: i16, request: &R) -> std::io::Result<R::Response> {
        self.send(version, request)?;
        self.receive::<R>(version)
    }
}

fn topic_name(name: &str) -> TopicName {
    TopicName(StrBytes::from_string(name.to_string()))
}

/// Create the benchmark topic (an existing one is an error: results must start from empty).
pub fn create_topic(config: &BrokerLoadConfig) -> Result<(), String> {
    let mut conn = Conn::connect(config.bootstrap).map_err(|e| e.to_string())?;
    let topic = CreatableTopic::default()
        .with_name(topic_name(&config.topic))
        .with_num_partitions(config.partitions as i32)
        .with_replication_factor(1)
        .with_configs(
            config
                .topic_configs
                .iter()
                .map(|(k, v)| {
                    CreatableTopicConfig::default()
                        .with_name(StrBytes::from_string(k.clone()))
                        .with_value(Some(StrBytes::from_string(v.clone())))
                })
                .collect(),
        );
    let r = conn
        .call(
            5,
            &CreateTopicsRequest::default()
                .with_timeout_ms(30_000)
                .with_topics(vec![topic]),
        )
        .map_err(|e| e.to_string())?;
    match r.topics.first() {
        Some(t) if t.error_code == 0 => Ok(()),
        Some(t) => Err(format!(
            "CreateTopics {}: error {} {:?}",
            config.topic,
            t.error_code,
            t.error_message.as_ref().map(|m| m.as_str().to_string())
        )),
        None => Err("CreateTopics: empty response".into()),
    }
}

/// Producer `i` sends to partitions `i`, `i + producers`, `i + 2 × producers`, … (mod
/// `partitions`), so it cycles through `partitions / gcd(partitions, producers)` of them; a
/// request's batches go to consecutive ones of that cycle, so there can be at most that many
/// per request, each for a partition of its own.
pub fn check_partitions_per_request(
    partitions: u32,
    producers: usize,
    per_request: usize,
) -> Result<(), String> {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let cycle = partitions as usize / gcd(partitions as usize, producers.max(1));
    if per_request == 0 || per_request > cycle {
        return Err(format!(
            "--partitions-per-request {per_request} must be between 1 and {cycle}: the partitions a producer cycles through ({partitions} partitions, {producers} producers)"
        ));
    }
    Ok(())
}

pub fn run(config: &BrokerLoadConfig) -> Result<BrokerLoadResult, String> {
    check_partitions_per_request(
        config.partitions,
        config.producers,
        config.partitions_per_request,
    )?;
    create_topic(config)?;
    let start = Instant::now();
    let measure_from = start + config.warmup;
    let end = measure_from + config.duration;
    let stop = Arc::new(AtomicBool::new(false));
    let sent_messages = Arc::new(AtomicU64::new(0));
    let send_times: SendTimes = Arc::default();
    let progress = Progress::start("broker", config.warmup + config.duration);
    let mut producer_threads = Vec::new();
    for i in 0..config.producers {
        let (config, stop, sent, times, done) = (
            config.clone(),
            stop.clone(),
            sent_messages.clone(),
            send_times.clone(),
            progress.counter(),
        );
        producer_threads.push(std::thread::spawn(move || {
            produce_loop(
                i,
                &config,
                measure_from,
                end,
                Shared {
                    stop: &stop,
                    sent_messages: &sent,
                    times: &times,
                    done_bytes: &done,
                },
            )
        }));
    }
    let mut consumer_threads = Vec::new();
    for i in 0..config.consumers {
        let (config, stop, times) = (config.clone(), stop.clone(), send_times.clone());
        consumer_threads.push(std::thread::spawn(move || {
            consume_loop(i, &config, measure_from, &stop, &times)
        }));
    }
    let mut result = BrokerLoadResult::default();
    // Producers and consumers run on threads of their own until `end` (or `max_messages`):
    // sample the CPU around the measured window meanwhile.
    let producing = || producer_threads.iter().any(|t| !t.is_finished());
    sleep_while(measure_from, producing);
    let cpu_from = crate::cpu::sample();
    sleep_while(end, producing);
    result.cpu = crate::cpu::CpuUse::between(&cpu_from, &crate::cpu::sample());
    let mut produce_h = histogram();
    let mut timeline = Timeline::new(measure_from, Duration::from_secs(1));
    let mut first: Option<Instant> = None;
    let mut last = start;
    for t in producer_threads {
        let p = t.join().map_err(|_| "a producer thread panicked")??;
        produce_h.add(&p.latency).ok();
        timeline.merge(&p.timeline);
        result.bytes += p.bytes;
        result.messages += p.messages;
        result.batches += p.batches;
        result.errors += p.errors;
        if let Some(f) = p.first {
            first = Some(first.map_or(f, |x: Instant| x.min(f)));
        }
        last = last.max(p.last);
    }
    progress.finish();
    // Let consumers catch up with what was produced, then stop them.
    let drain_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < drain_until && !send_times.lock().expect("times").is_empty() {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Release);
    let mut e2e_h = histogram();
    for t in consumer_threads {
        let c = t.join().map_err(|_| "a consumer thread panicked")??;
        e2e_h.add(&c.latency).ok();
        result.consumed_bytes += c.bytes;
    }
    result.seconds = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    result.throughput_mb_s = mb_per_s(result.bytes, result.seconds);
    result.messages_per_s = if result.seconds > 0.0 {
        result.messages as f64 / result.seconds
    } else {
        0.0
    };
    result.produce_latency = Percentiles::of(&produce_h);
    result.e2e_latency = Percentiles::of(&e2e_h);
    result.timeline = timeline.to_json();
    result.produce_curve = percentile_curve(&produce_h);
    result.e2e_curve = percentile_curve(&e2e_h);
    Ok(result)
}

struct ProducerResult {
    latency: Histogram<u64>,
    timeline: Timeline,
    bytes: u64,
    messages: u64,
    batches: u64,
    errors: u64,
    first: Option<Instant>,
    last: Instant,
}

/// A whole Produce frame (size prefix included) carrying `count` batches of `batch_len` bytes,
/// each for a partition of its own, and where in it each partition entry starts: its index
/// (`i32`), then its records (`i32` length, the batch). For the non-flexible version the
/// partition entries are the frame's last bytes, so the generator only patches each entry's
/// index, batch and the correlation id per request.
fn produce_template(
    topic: &str,
    count: usize,
    acks: i16,
    batch_len: usize,
) -> Result<(Vec<u8>, Vec<usize>), String> {
    let request = ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(topic_name(topic))
            .with_partition_data(
                (0..count as i32)
                    .map(|p| {
                        PartitionProduceData::default()
                            .with_index(p)
                            .with_records(Some(Bytes::from(vec![0u8; batch_len])))
                    })
                    .collect(),
            )]);
    let header = RequestHeader::default()
        .with_request_api_key(ProduceRequest::KEY)
        .with_request_api_version(produce_version)
        .with_client_id(Some(StrBytes::from_static_str("keel-bench")));
    let mut out = BytesMut::new();
    out.extend_from_slice(&[0; 4]);
    header
        .encode(&mut out, ProduceRequest::header_version(produce_version))
        .map_err(|e| e.to_string())?;
    request
        .encode(&mut out, produce_version)
        .map_err(|e| e.to_string())?;
    let size = (out.len() - 4) as i32;
    out[..4].copy_from_slice(&size.to_be_bytes());
    let entry = 8 + batch_len;
    let entries: Vec<usize> = (0..count)
        .map(|j| out.len() - (count - j) * entry)
        .collect();
    let laid_out = entries.iter().enumerate().all(|(j, &at)| {
        out[at..at + 4] == (j as i32).to_be_bytes()
            && out[at + 4..at + 8] == (batch_len as i32).to_be_bytes()
    });
    if !laid_out {
        return Err(
            "unexpected Produce encoding (partition entries are not the last field)".into(),
        );
    }
    Ok((out.to_vec(), entries))
}

/// Open loop: how often each producer sends a request, so that all of them together offer
/// `rate_messages_per_s` (each request holds `partitions_per_request` batches).
fn request_interval(config: &BrokerLoadConfig) -> Option<Duration> {
    (config.rate_messages_per_s > 0.0).then(|| {
        let per_producer = config.rate_messages_per_s / config.producers.max(1) as f64;
        let per_request = config.messages_per_batch * config.partitions_per_request;
        Duration::from_secs_f64(per_request as f64 / per_producer)
    })
}

/// What the producer threads share.
struct Shared<'a> {
    stop: &'a AtomicBool,
    sent_messages: &'a AtomicU64,
    times: &'a SendTimes,
    done_bytes: &'a AtomicU64,
}

fn produce_loop(
    index: usize,
    config: &BrokerLoadConfig,
    measure_from: Instant,
    end: Instant,
    shared: Shared<'_>,
) -> Result<ProducerResult, String> {
    let mut conn = Conn::connect(config.bootstrap).map_err(|e| format!("producer {index}: {e}"))?;
    let init = conn
        .call(
            4,
            &InitProducerIdRequest::default()
                .with_transaction_timeout_ms(60_000)
                .with_producer_id((-1).into())
                .with_producer_epoch(-1),
        )
        .map_err(|e| format!("producer {index}: InitProducerId: {e}"))?;
    let pid = init.producer_id.0;
    let payload: Vec<u8> = (0..config.message_bytes * config.messages_per_batch)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let records = config.messages_per_batch as i32;
    let mut batch = BatchBuilder {
        records_count: records,
        timestamp_ms: 1,
        producer_id: pid,
        producer_epoch: init.producer_epoch,
        base_sequence: 0,
        ..Default::default()
    }
    .build(&payload);
    let per_request = config.partitions_per_request;
    let (template, entries) =
        produce_template(&config.topic, per_request, config.acks, batch.len())?;
    let mut seqs = vec![0i32; config.partitions as usize];
    let mut next_partition = index;
    let mut out = ProducerResult {
        latency: histogram(),
        timeline: Timeline::new(measure_from, Duration::from_secs(1)),
        bytes: 0,
        messages: 0,
        batches: 0,
        errors: 0,
        first: None,
        last: Instant::now(),
    };
    // Per request in flight: its send time, its bytes of batches, its batches.
    let mut pending: std::collections::VecDeque<(Instant, usize, usize)> = Default::default();
    let interval = request_interval(config);
    let mut next_scheduled = Instant::now();
    // Every request the window allows goes out in one write, as a pipelining client sends
    // what its queue holds: the broker then reads them together and its engine takes them in one
    // write, as the engine-only run does with its appends.
    let mut outbox: Vec<u8> = Vec::with_capacity(config.inflight * template.len());
    // The (partition, sequence) of each batch of the request being built.
    let mut sequences: Vec<(i32, i32)> = Vec::with_capacity(per_request);
    loop {
        let mut built = 0;
        loop {
            let limit_hit = config.max_messages > 0
                && shared.sent_messages.load(Ordering::Relaxed) >= config.max_messages;
            let now = Instant::now();
            let sending = now < end && !limit_hit && !shared.stop.load(Ordering::Relaxed);
            if !sending || pending.len() >= config.inflight || built >= config.inflight {
                break;
            }
            // Open loop: not yet time for the next batch? Send what is built and collect a
            // response meanwhile, or wait.
            let scheduled = match interval {
                Some(every) => {
                    if now < next_scheduled {
                        if built > 0 || !pending.is_empty() {
                            break;
                        }
                        std::thread::sleep(next_scheduled - now);
                    }
                    let at = next_scheduled;
                    next_scheduled += every;
                    Some(at)
                }
                None => None,
            };
            // Patch the batch template (sequence, then CRC) into each partition entry of the
            // frame, then the correlation id: one CRC and one copy per batch, so the generator
            // measures the broker, not itself.
            let at = outbox.len();
            outbox.extend_from_slice(&template);
            sequences.clear();
            for &entry in &entries {
                let partition = next_partition % config.partitions as usize;
                next_partition += config.producers.max(1);
                let seq = seqs[partition];
                seqs[partition] = seq.wrapping_add(records);
                batch[53..57].copy_from_slice(&seq.to_be_bytes());
                let crc = keel_engine::batch::compute_crc(&batch);
                batch[17..21].copy_from_slice(&crc.to_be_bytes());
                let entry = at + entry;
                outbox[entry..entry + 4].copy_from_slice(&(partition as i32).to_be_bytes());
                outbox[entry + 8..entry + 8 + batch.len()].copy_from_slice(&batch);
                sequences.push((partition as i32, seq));
            }
            conn.correlation += 1;
            outbox[at + 8..at + 12].copy_from_slice(&conn.correlation.to_be_bytes());
            built += 1;
            let size = batch.len() * per_request;
            let sent_at = scheduled.unwrap_or_else(Instant::now);
            if config.consumers > 0 {
                let mut times = shared.times.lock().expect("times");
                for &(partition, seq) in &sequences {
                    times.insert((pid, partition, seq), sent_at);
                }
            }
            shared
                .sent_messages
                .fetch_add(records as u64 * per_request as u64, Ordering::Relaxed);
            shared.done_bytes.fetch_add(size as u64, Ordering::Relaxed);
            if config.acks == 0 {
                if sent_at >= measure_from {
                    out.first.get_or_insert(sent_at);
                    out.last = sent_at;
                    out.bytes += size as u64;
                    out.messages += records as u64 * per_request as u64;
                    out.batches += per_request as u64;
                }
            } else {
                pending.push_back((sent_at, size, per_request));
            }
        }
        if !outbox.is_empty() {
            conn.stream
                .write_all(&outbox)
                .map_err(|e| format!("producer {index}: {e}"))?;
            outbox.clear();
        }
        if pending.is_empty() {
            if built > 0 {
                continue; // acks=0: nothing comes back
            }
            break;
        }
        // One answer, waiting for it if need be, then every other one already read.
        loop {
            let (sent_at, size, batches) = pending.pop_front().expect("an answer is due");
            let response = conn
                .receive::<ProduceRequest>(produce_version)
                .map_err(|e| format!("producer {index}: {e}"))?;
            let now = Instant::now();
            // Each batch counts on its own: a partition that answers with an error (or does
            // not answer) is an error, the others are appended.
            let ok = response
                .responses
                .iter()
                .flat_map(|t| &t.partition_responses)
                .filter(|p| p.error_code == 0)
                .count()
                .min(batches);
            out.errors += (batches - ok) as u64;
            if ok > 0 && sent_at >= measure_from {
                let bytes = (size / batches * ok) as u64;
                out.first.get_or_insert(sent_at);
                out.last = now;
                let us = now.duration_since(sent_at).as_micros().max(1) as u64;
                out.latency.record_n(us, ok as u64).ok();
                out.timeline.record(now, bytes, us);
                out.bytes += bytes;
                out.messages += records as u64 * ok as u64;
                out.batches += ok as u64;
            }
            if pending.is_empty() || conn.frame_ready().is_none() {
                break;
            }
        }
    }
    Ok(out)
}

struct ConsumerResult {
    latency: Histogram<u64>,
    bytes: u64,
}

fn consume_loop(
    index: usize,
    config: &BrokerLoadConfig,
    measure_from: Instant,
    stop: &AtomicBool,
    times: &SendTimes,
) -> Result<ConsumerResult, String> {
    let mut conn = Conn::connect(config.bootstrap).map_err(|e| format!("consumer {index}: {e}"))?;
    let mine: Vec<i32> = (0..config.partitions as i32)
        .filter(|p| *p as usize % config.consumers == index)
        .collect();
    let mut offsets: Vec<i64> = vec![0; mine.len()];
    let mut out = ConsumerResult {
        latency: histogram(),
        bytes: 0,
    };
    while !stop.load(Ordering::Acquire) {
        let request = FetchRequest::default()
            .with_replica_id((-1).into())
            .with_max_wait_ms(100)
            .with_min_bytes(1)
            .with_max_bytes(16 << 20)
            .with_session_epoch(-1)
            .with_topics(vec![FetchTopic::default()
                .with_topic(topic_name(&config.topic))
                .with_partitions(
                    mine.iter()
                        .zip(&offsets)
                        .map(|(&p, &o)| {
                            FetchPartition::default()
                                .with_partition(p)
                                .with_fetch_offset(o)
                                .with_partition_max_bytes(4 << 20)
                        })
                        .collect(),
                )]);
        let response = conn
            .call(fetch_version, &request)
            .map_err(|e| format!("consumer {index}: {e}"))?;
        let now = Instant::now();
        for topic in &response.responses {
            for p in &topic.partitions {
                let Some(slot) = mine.iter().position(|&m| m == p.partition_index) else {
                    continue;
                };
                let Some(records) = &p.records else { continue };
                let mut rest = &records[..];
                while let Ok(h) = BatchHeader::parse(rest) {
                    if h.size_bytes > rest.len() {
                        break;
                    }
                    out.bytes += h.size_bytes as u64;
                    offsets[slot] = h.next_offset() as i64;
                    let sent = times.lock().expect("times").remove(&(
                        h.producer_id,
                        p.partition_index,
                        h.base_sequence,
                    ));
                    if let Some(sent) = sent.filter(|s| *s >= measure_from) {
                        out.latency
                            .record(now.duration_since(sent).as_micros().max(1) as u64)
                            .ok();
                    }
                    rest = &rest[h.size_bytes..];
                }
            }
        }
    }
    Ok(out)
}

/// Sleep until `at`, or until `going` says the work stopped (checked every 10 ms).
fn sleep_while(at: Instant, going: impl Fn() -> bool) {
    while going() {
        let Some(left) = at.checked_duration_since(Instant::now()) else {
            return;
        };
        std::thread::sleep(left.min(Duration::from_millis(10)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_loop_offers_the_rate_whatever_the_batches_per_request() {
        let mut config = tiny_config("127.0.0.1:9".parse().unwrap(), 1);
        config.producers = 4;
        config.messages_per_batch = 10;
        config.rate_messages_per_s = 8_000.0;
        // 2,000 messages a second per producer, 10 per batch: a batch every 5 ms.
        assert_eq!(request_interval(&config), Some(Duration::from_millis(5)));
        config.partitions_per_request = 3;
        assert_eq!(request_interval(&config), Some(Duration::from_millis(15)));
        config.rate_messages_per_s = 0.0;
        assert_eq!(request_interval(&config), None, "closed loop");
    }

    #[test]
    fn a_tiny_run_consumes_everything_it_produced() {
        tiny_run(1);
    }

    #[test]
    fn a_tiny_run_with_two_partitions_in_each_request_consumes_everything_it_produced() {
        // Two of three: the partitions of a request change from one request to the next, and so
        // do their sequences, so a batch sent to the wrong partition is refused.
        tiny_run(2);
    }

    fn tiny_run(partitions_per_request: usize) {
        let dir = std::env::temp_dir().join(format!(
            "keel-bench-broker-test-{}-{partitions_per_request}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut c = keel_server::BrokerConfig::default();
        for (k, v) in [
            ("log.dirs", dir.to_str().unwrap()),
            ("listeners", "127.0.0.1:0"),
            ("num.shards", "1"),
        ] {
            c.set(k, v).unwrap();
        }
        let server = keel_server::Server::start(c).unwrap();
        let config = tiny_config(server.local_addr(), partitions_per_request);
        let r = run(&config).unwrap();
        server.shutdown().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(r.errors, 0);
        assert!(r.messages >= 2_000, "{r:?}");
        assert_eq!(
            r.consumed_bytes, r.bytes,
            "consumers saw every produced batch"
        );
        assert_eq!(
            r.e2e_latency.count, r.batches,
            "every batch was matched to its send time"
        );
        assert_eq!(r.produce_latency.count, r.batches);
    }

    fn tiny_config(bootstrap: SocketAddr, partitions_per_request: usize) -> BrokerLoadConfig {
        BrokerLoadConfig {
            bootstrap,
            topic: "tiny".into(),
            partitions: 3,
            producers: 2,
            consumers: 2,
            message_bytes: 100,
            messages_per_batch: 4,
            acks: -1,
            inflight: 3,
            partitions_per_request,
            duration: Duration::from_secs(30),
            warmup: Duration::ZERO,
            max_messages: 2_000,
            rate_messages_per_s: 0.0,
            topic_configs: vec![("flush.policy".into(), "every-batch".into())],
        }
    }
}
