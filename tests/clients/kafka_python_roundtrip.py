"""A second, independent client: kafka-python produces and consumes through `keel serve`.

Usage: python3 kafka_python_roundtrip.py HOST:PORT
Exits non-zero (with the reason) if any message is lost, duplicated or out of order.
"""
import sys

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

bootstrap = sys.argv[1]
topic = "kafka-python"
partitions = 3
count = 300

admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
try:
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    sys.exit("creating an existing topic must fail")
except TopicAlreadyExistsError:
    pass

sent = {p: [] for p in range(partitions)}
for codec in [None, "gzip"]:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", compression_type=codec, linger_ms=2)
    futures = []
    for i in range(count):
        value = f"{codec}-{i}".encode()
        futures.append((i % partitions, value, producer.send(topic, value=value, partition=i % partitions)))
    producer.flush(timeout=30)
    for p, value, f in futures:
        meta = f.get(timeout=30)
        assert meta.partition == p
        sent[p].append((meta.offset, value))
    producer.close()

consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=5000)
tps = [TopicPartition(topic, p) for p in range(partitions)]
consumer.assign(tps)
consumer.seek_to_beginning(*tps)
got = {p: [] for p in range(partitions)}
for message in consumer:
    got[message.partition].append((message.offset, message.value))
    if sum(len(v) for v in got.values()) == 2 * count:
        break
end = consumer.end_offsets(tps)
consumer.close()

for p in range(partitions):
    want = sorted(sent[p])
    if got[p] != want:
        sys.exit(f"partition {p}: consumed {len(got[p])} messages, expected {len(want)} in order")
    if end[TopicPartition(topic, p)] != len(want):
        sys.exit(f"partition {p}: end offset {end[TopicPartition(topic, p)]}, expected {len(want)}")
print(f"kafka-python round trip ok: {2 * count} messages over {partitions} partitions, plain and gzip")
