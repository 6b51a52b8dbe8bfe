#!/usr/bin/env bash
# Soak (not part of CI): run one engine test binary whole, over and over, in two loops beside a
# busy loop on the machine's cores, with the simulator's and the durability trace on. Rare
# interleavings of the shard threads and the test thread show up this way (ARCHITECTURE.md
# decisions 36 and 41 were found so): a run that fails keeps its output, with the trace of the
# failing test, in the output directory; passing runs leave one line in its `summary`.
#
# Bounded: stops starting runs after SECONDS (default 600); a run takes ~10–20 s.
# usage: tests/soak/stress-tests.sh [TEST-BINARY-NAME] [SECONDS] [FILTER...]
#   e.g. tests/soak/stress-tests.sh faults 900
#        tests/soak/stress-tests.sh journal 300 a_stale_journal
set -euo pipefail
cd "$(dirname "$0")/../.."
NAME=${1:-faults}
DURATION=${2:-600}
shift $(( $# > 2 ? 2 : $# ))

bin=$(cargo test -p keel-engine --test "$NAME" --no-run 2>&1 | grep -o "[^ (]*deps/$NAME-[0-9a-f]*" | tail -1)
[ -x "$bin" ] || { echo "could not build the $NAME tests" >&2; exit 1; }
out=$(mktemp -d "/tmp/keel-stress-$NAME.XXXXXX")
echo "output: $out"

end=$((SECONDS + DURATION))
( while [ $SECONDS -lt $end ]; do :; done ) &
busy=$!
trap 'kill $busy 2>/dev/null || true' EXIT

loop() {
  local id=$1 n=0
  while [ $SECONDS -lt $end ]; do
    n=$((n + 1))
    if KEEL_TRACE='keel::sim=trace,keel::durability=trace,keel_engine=info' \
      "$bin" --test-threads 2 "$@" > "$out/run-$id-$n.log" 2>&1; then
      rm -f "$out/run-$id-$n.log"
      echo "ok $id $n" >> "$out/summary"
    else
      echo "FAIL $id $n" >> "$out/summary"
    fi
  done
}
loop a "$@" &
a=$!
loop b "$@" &
b=$!
wait $a $b
ok=$(grep -c '^ok' "$out/summary" || true)
failed=$(grep -c '^FAIL' "$out/summary" || true)
echo "$ok passed, $failed failed (outputs of the failures in $out)"
[ "$failed" -eq 0 ]
