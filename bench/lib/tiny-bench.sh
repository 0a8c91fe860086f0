#!/usr/bin/env bash
# Shared by the CPU benchmarks: starts tacflowd on `tiny` (CPU backend),
# runs one benchmark script against it, and keeps the raw output under
# bench/logs/NAME-<time>.log headed by the commit, machine and date.
#
#   bench/lib/tiny-bench.sh NAME KV_BLOCKS SCRIPT.py [args for the script...]
set -euo pipefail
name=$1 kv_blocks=$2 script=$3
shift 3
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
bin=${TACFLOWD:-$root/target/release/tacflowd}
[ -x "$bin" ] || { echo "error: $bin missing: cargo build --release" >&2; exit 1; }
source scripts/lib/venv.sh
tacflow_venv
work=$(mktemp -d)
pid=""
trap '[ -n "$pid" ] && kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
TACFLOW_LOG=warn "$bin" serve --backend cpu --socket "$work/d.sock" --model tiny --kv-blocks "$kv_blocks" &
pid=$!
for _ in $(seq 1 100); do [ -S "$work/d.sock" ] && break; sleep 0.1; done
[ -S "$work/d.sock" ] || { echo "error: tacflowd did not start" >&2; exit 1; }
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
mkdir -p bench/logs
log="bench/logs/$name-$stamp.log"
{
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet || echo ' (dirty)')"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
    "$PY" "$script" --address "ipc://$work/d.sock" --json "$work/out.json" "$@"
    echo "--- json"
    cat "$work/out.json"
} 2>&1 | tee "$log"
echo "raw log: $log"
