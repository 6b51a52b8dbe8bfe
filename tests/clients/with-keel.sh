#!/usr/bin/env bash
# Run `keel serve` on a scratch directory and a free port, run a client command with the broker's
# address (HOST:PORT) appended, then stop keel with SIGTERM and check it exits cleanly. Bounded:
# the client is stopped after 90 s and the broker killed after 120 s, whatever happens.
# Usage: tests/clients/with-keel.sh path/to/keel command [args...]
set -euo pipefail
keel="$1"; shift
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
if ! timeout 90 "$@" "127.0.0.1:$port"; then
  echo "--- broker log" >&2; cat "$log" >&2; exit 1
fi
kill -TERM "$pid"
if ! wait "$pid"; then
  echo "keel did not exit cleanly on SIGTERM" >&2; cat "$log" >&2; exit 1
fi
grep -q "keel stopped cleanly" "$log" || { echo "no clean-shutdown line" >&2; cat "$log" >&2; exit 1; }
echo "keel stopped cleanly on SIGTERM"
