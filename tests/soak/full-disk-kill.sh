#!/usr/bin/env bash
# Soak (not part of CI): the many-partitions SIGKILL test of engine/tests/kill.rs on a 256 MiB
# ext4, loop-mounted, that another process fills to the last block over and over (and sometimes
# frees). Each run is 30 kill-and-reopen rounds on one data directory; a run passes if every
# reopening finds every acknowledged append, intact and in order. Prints one line per run and a
# summary: passed / reopening refused for space (the error names the file; nothing acknowledged
# is lost, see docs/ARCHITECTURE.md decision 22) / anything else (a bug: its output is kept).
#
# Needs root (mount). Bounded: RUNS runs of at most 10 minutes each.
# usage: tests/soak/full-disk-kill.sh [RUNS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-10}
ROUNDS=${2:-30}
TEST=sigkill_with_many_partitions_loses_nothing_the_journal_acknowledged

bin=$(cargo test -p keel-engine --test kill --no-run 2>&1 | grep -o '[^ (]*deps/kill-[0-9a-f]*' | tail -1)
[ -x "$bin" ] || { echo "could not build the kill test" >&2; exit 1; }

work=$(mktemp -d /tmp/keel-full-disk.XXXXXX)
mnt=$work/mnt
mkdir "$mnt"
truncate -s 256M "$work/disk.img"
mkfs.ext4 -q -F "$work/disk.img"
mount -o loop "$work/disk.img" "$mnt"
filler=
cleanup() {
  touch "$work/stop"
  [ -n "$filler" ] && kill "$filler" 2>/dev/null && wait "$filler" 2>/dev/null
  umount "$mnt" 2>/dev/null && rm -f "$work/disk.img" "$work/stop" && rmdir "$mnt"
  rmdir "$work" 2>/dev/null || echo "logs of failed runs are in $work"
}
trap cleanup EXIT
trap "exit 1" INT TERM

# Fill the disk to the last block, hold it full a moment, sometimes free the big file; again.
# Writes only while the loop device is mounted, so it can never fill the disk under it.
fill() {
  local i=0
  while [ ! -e "$work/stop" ] && mountpoint -q "$mnt"; do
    dd if=/dev/zero of="$mnt/fill$i" bs=1M count=400 2>/dev/null || true
    mountpoint -q "$mnt" || break
    dd if=/dev/zero of="$mnt/fillb$i" bs=4k count=100000 2>/dev/null || true
    sync
    sleep $((RANDOM % 3 + 1))
    [ $((RANDOM % 2)) = 0 ] && rm -f "$mnt/fill$i"
    i=$((i + 1))
  done
}

passed=0 refused=0 other=0
for run in $(seq "$RUNS"); do
  rm -rf "${mnt:?}"/*
  mkdir "$mnt/data"
  rm -f "$work/stop"
  (sleep $((RANDOM % 8 + 2)); fill) &
  filler=$!
  log=$work/run-$run.log
  set +e
  KEEL_KILL_DATA_DIR=$mnt/data KEEL_KILL_FULL_DISK=1 KEEL_KILL_ROUNDS=$ROUNDS \
    timeout 600 "$bin" --exact "$TEST" --test-threads=1 --nocapture >"$log" 2>&1
  rc=$?
  set -e
  touch "$work/stop"
  kill "$filler" 2>/dev/null; wait "$filler" 2>/dev/null || true
  filler=
  if [ $rc = 0 ]; then
    passed=$((passed + 1)); echo "run $run: passed"; rm -f "$log"
  elif grep -q "panicked at engine/tests/kill.rs" "$log" && grep -q 'Err` value: Full {' "$log"; then
    refused=$((refused + 1))
    echo "run $run: a reopening was refused for space: $(grep -m1 -o 'Full {[^}]*}' "$log")"
  else
    other=$((other + 1)); echo "run $run: FAILED (rc $rc), log kept: $log"; tail -5 "$log"
  fi
done
echo "$RUNS runs: $passed passed, $refused reopenings refused for space, $other other failures"
[ "$other" = 0 ]
