#!/usr/bin/env bash
# kafka-python against `keel serve` (tests/clients/kafka_python_roundtrip.py), installing the
# client if needed. Usage: tests/clients/run-kafka-python.sh [path/to/keel]
set -euo pipefail
cd "$(dirname "$0")/../.."
keel="${1:-target/debug/keel}"
# A Debian-managed Python may refuse plain pip installs (PEP 668): fall back to the user site.
python3 -c 'import kafka' 2>/dev/null \
  || python3 -m pip install --quiet 'kafka-python>=2.0.2' \
  || python3 -m pip install --quiet --user --break-system-packages 'kafka-python>=2.0.2'
exec tests/clients/with-keel.sh "$keel" python3 tests/clients/kafka_python_roundtrip.py
