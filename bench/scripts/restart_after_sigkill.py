#!/usr/bin/env python3
"""Restart time and disk use of `keel serve` after a SIGKILL with many partitions.

Creates a topic of N partitions on a fresh broker, produces `--per-partition` messages of 1000
bytes to each (kafka-python, acks=all), kills the broker with SIGKILL, restarts it on the same data
directory and times how long until a Metadata request lists the topic (bounded by --timeout).
Prints the data directory's disk use after producing and after the restart (`du`: allocated
space, so preallocation counts). Needs kafka-python (`pip install kafka-python`).

    python3 bench/scripts/restart_after_sigkill.py target/release/keel --partitions 1000 --dir /path/on/the/disk
"""
import argparse, os, shutil, signal, subprocess, sys, time

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument('keel')
ap.add_argument('--partitions', type=int, default=1000)
ap.add_argument('--per-partition', type=int, default=20)
ap.add_argument('--dir', default='keel-restart-check')
ap.add_argument('--listen', default='127.0.0.1:19093')
ap.add_argument('--timeout', type=float, default=120.0)
args = ap.parse_args()
shutil.rmtree(args.dir, ignore_errors=True)


def du():
    return subprocess.check_output(['du', '-sm', args.dir]).split()[0].decode() + ' MB'


def start():
    return subprocess.Popen([args.keel, 'serve', '--data-dir', args.dir, '--listen', args.listen],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def topic_listed(broker):
    end = time.time() + args.timeout
    while time.time() < end and broker.poll() is None:
        try:
            c = KafkaConsumer(bootstrap_servers=args.listen, request_timeout_ms=60000, api_version=(2, 8))
            listed = 'restart-check' in c.topics()
            c.close()
            if listed:
                return True
        except Exception:
            pass
        time.sleep(0.02)
    return False


broker = start()
try:
    admin = None
    end = time.time() + args.timeout
    while admin is None and time.time() < end:
        try:
            admin = KafkaAdminClient(bootstrap_servers=args.listen, request_timeout_ms=120000)
        except Exception:
            time.sleep(0.1)
    if admin is None:
        sys.exit('the broker did not come up')
    admin.create_topics([NewTopic('restart-check', args.partitions, 1)], timeout_ms=120000)
    admin.close()
    producer = KafkaProducer(bootstrap_servers=args.listen, acks='all', linger_ms=5)
    for i in range(args.partitions * args.per_partition):
        producer.send('restart-check', b'x' * 1000, partition=i % args.partitions)
    producer.flush()
    producer.close()
    print(f'after producing: {du()}')
finally:
    broker.send_signal(signal.SIGKILL)
    broker.wait()
started = time.perf_counter()
broker = start()
try:
    ok = topic_listed(broker)
    took = time.perf_counter() - started
    state = 'answered' if ok else f'NOT answered (exit status {broker.poll()})'
    print(f'restart after SIGKILL with {args.partitions} partitions: {state} in {took:.2f} s; disk {du()}')
finally:
    if broker.poll() is None:
        broker.terminate()
        broker.wait()
    shutil.rmtree(args.dir, ignore_errors=True)
sys.exit(0 if ok else 1)
