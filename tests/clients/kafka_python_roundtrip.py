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

# Consumer group: one member reads everything and commits; a second member of the same group,
# started after more messages arrive, reads only those (it resumes at the committed offsets).
from kafka import KafkaConsumer as GroupConsumer

group_topic = "kafka-python-group"
admin.create_topics([NewTopic(group_topic, num_partitions=2, replication_factor=1)])
producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
for i in range(100):
    producer.send(group_topic, value=f"first-{i}".encode(), partition=i % 2)
producer.flush(timeout=30)


def consume_group(expected):
    c = GroupConsumer(
        group_topic,
        bootstrap_servers=bootstrap,
        group_id="kafka-python-group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=8000,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
    )
    seen = []
    for message in c:
        seen.append(message.value.decode())
        c.commit()
        if len(seen) == expected:
            break
    c.close()
    return seen


first = consume_group(100)
if sorted(first) != sorted(f"first-{i}" for i in range(100)):
    sys.exit(f"group member 1 consumed {len(first)} messages, expected the 100 first ones")
for i in range(50):
    producer.send(group_topic, value=f"second-{i}".encode(), partition=i % 2)
producer.flush(timeout=30)
producer.close()
second = consume_group(50)
if sorted(second) != sorted(f"second-{i}" for i in range(50)):
    sys.exit(f"group member 2 consumed {second[:5]}... ({len(second)}), expected only the 50 new ones")
# kafka-python 2.x calls it list_consumer_groups, 3.x list_groups.
list_groups = getattr(admin, "list_consumer_groups", None) or admin.list_groups
groups = str(list_groups())
if "kafka-python-group" not in groups:
    sys.exit(f"ListGroups does not show the group: {groups}")
offsets = admin.list_consumer_group_offsets("kafka-python-group") if hasattr(admin, "list_consumer_group_offsets") else admin.list_group_offsets("kafka-python-group")
# 2.x: {TopicPartition: OffsetAndMetadata}; 3.x: {group: {TopicPartition: OffsetAndMetadata}}.
if offsets and all(isinstance(v, dict) for v in offsets.values()):
    offsets = offsets["kafka-python-group"]
committed = sum(v.offset for v in offsets.values())
if committed != 150:
    sys.exit(f"OffsetFetch: committed offsets sum to {committed}, expected 150: {offsets}")
print("kafka-python consumer group ok: resumed at the committed offsets")
