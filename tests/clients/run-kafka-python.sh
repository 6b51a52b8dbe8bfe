#!/usr/bin/env bash
# Run `keel serve` on a scratch directory and a free port, drive it with kafka-python, then stop
# it with SIGTERM and check it exits cleanly. Bounded: the broker is killed after 120 s whatever
# happens. Usage: tests/clients/run-kafka-python.sh [path/to/keel]
set -euo pipefail
cd "$(dirname "$0")/../.."
keel="${1:-target/debug/keel}"
# A Debian-managed Python may refuse plain pip installs (PEP 668): fall back to the user site.
python3 -c 'import kafka' 2>/dev/null \
  || python3 -m pip install --quiet 'kafka-python>=2.0.2' \
  || python3 -m pip install --quiet --user --break-system-packages 'kafka-python>=2.0.2'
dir="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
log="$dir/keel.log"
timeout 120 "$keel" serve --data-dir "$dir/data" --listen "127.0.0.1:$port" >"$log" 2>&1 &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
  (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
if ! timeout 90 python3 tests/clients/kafka_python_roundtrip.py "127.0.0.1:$port"; then
  echo "--- broker log" >&2; cat "$log" >&2; exit 1
fi
kill -TERM "$pid"
if ! wait "$pid"; then
  echo "keel did not exit cleanly on SIGTERM" >&2; cat "$log" >&2; exit 1
fi
grep -q "keel stopped cleanly" "$log" || { echo "no clean-shutdown line" >&2; cat "$log" >&2; exit 1; }
echo "keel stopped cleanly on SIGTERM"
