#!/usr/bin/env bash
# Starts tacflowd on `tiny` (CPU), runs bench/load/run.py against it (N = 1
# to 64 concurrent clients, a fixed time each), and keeps the raw output
# under bench/logs/ with the commit, machine and date.
# Usage: bench/load/run.sh [extra args for run.py, e.g. --seconds 5]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
bin=${TACFLOWD:-$root/target/release/tacflowd}
[ -x "$bin" ] || { echo "error: $bin missing: cargo build --release" >&2; exit 1; }
source scripts/lib/venv.sh
tacflow_venv
work=$(mktemp -d)
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
TACFLOW_LOG=warn "$bin" serve --backend cpu --socket "$work/d.sock" --model tiny --kv-blocks 8192 &
pid=$!
for _ in $(seq 1 100); do [ -S "$work/d.sock" ] && break; sleep 0.1; done
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
mkdir -p bench/logs
log="bench/logs/load-$stamp.log"
{
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet || echo ' (dirty)')"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)"
    "$PY" bench/load/run.py --address "ipc://$work/d.sock" --json "$work/load.json" "$@"
    echo "--- json"
    cat "$work/load.json"
} 2>&1 | tee "$log"
echo "raw log: $log"
