// KafkaJS, a client with its own protocol implementation (no librdkafka): create a topic, produce
// with an idempotent producer (batches of 100 over two partitions, then 200 one-message batches),
// and consume everything back through a consumer group. Usage: node kafkajs_roundtrip.js HOST:PORT
const { Kafka, logLevel } = require('kafkajs');

const broker = process.argv[2];
const kafka = new Kafka({ clientId: 'keel-ci', brokers: [broker], logLevel: logLevel.WARN });

async function main() {
  const admin = kafka.admin();
  await admin.connect();
  await admin.createTopics({ topics: [{ topic: 'js', numPartitions: 2 }] });
  await admin.disconnect();

  const producer = kafka.producer({ idempotent: true, maxInFlightRequests: 1 });
  await producer.connect();
  const expected = new Map(); // value -> partition
  for (let i = 0; i < 3000; i += 100) {
    const messages = [];
    for (let j = i; j < i + 100; j++) {
      messages.push({ key: 'k' + (j % 7), value: 'v' + j, partition: j % 2 });
      expected.set('v' + j, j % 2);
    }
    await producer.send({ topic: 'js', messages, acks: -1 });
  }
  for (let i = 0; i < 200; i++) {
    await producer.send({ topic: 'js', messages: [{ value: 's' + i, partition: 0 }], acks: -1 });
    expected.set('s' + i, 0);
  }
  await producer.disconnect();

  const consumer = kafka.consumer({ groupId: 'keel-ci-js' });
  await consumer.connect();
  await consumer.subscribe({ topic: 'js', fromBeginning: true });
  const last = [-1, -1];
  let got = 0;
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out with ${got} of ${expected.size}`)), 60000);
    consumer.run({
      eachMessage: async ({ partition, message }) => {
        const value = message.value.toString();
        const offset = Number(message.offset);
        if (expected.get(value) !== partition) reject(new Error(`${value} on partition ${partition}`));
        if (offset !== last[partition] + 1) reject(new Error(`offset ${offset} after ${last[partition]}`));
        last[partition] = offset;
        expected.delete(value);
        got++;
        if (expected.size === 0) { clearTimeout(timer); resolve(); }
      },
    });
  });
  await consumer.disconnect();
  console.log(`kafkajs round trip ok: ${got} messages over 2 partitions, in order, each once`);
}

main().catch((e) => { console.error('kafkajs round trip FAILED:', e); process.exit(1); });
