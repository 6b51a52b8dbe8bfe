#!/usr/bin/env bash
# KafkaJS (Node) against `keel serve` (tests/clients/kafkajs_roundtrip.js), installing the client
# into target/clients-node if needed. Usage: tests/clients/run-kafkajs.sh [path/to/keel]
set -euo pipefail
cd "$(dirname "$0")/../.."
keel="${1:-target/debug/keel}"
modules="target/clients-node"
if [ ! -d "$modules/node_modules/kafkajs" ]; then
  mkdir -p "$modules"
  npm install --silent --no-audit --no-fund --prefix "$modules" 'kafkajs@2' >/dev/null
fi
export NODE_PATH="$PWD/$modules/node_modules" KAFKAJS_NO_PARTITIONER_WARNING=1
exec tests/clients/with-keel.sh "$keel" node tests/clients/kafkajs_roundtrip.js
