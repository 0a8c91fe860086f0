#!/usr/bin/env bash
# GPU fail-fast, run ON THE GPU MACHINE: installs the carried pyzmq wheel
# (.whl; the machine has msgpack), unpacks tacflowd-faults from
# .device-carry/ (scripts/gpu/prepare.sh builds it), and runs
# scripts/gpu/failfast.py: a genuine illegal memory access must end the
# daemon non-zero within its bound, every waiting client answered
# `internal`. Writes $OUT/failfast.json, $OUT/failfast-tacflowd.log, and
# appends its output to $OUT/failfast.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/tacflow-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TACFLOW_KERNEL_CACHE=/tmp/tacflow-kernels
bin=/tmp/tacflowd-faults
[ -x "$bin" ] || { xz -dc .device-carry/tacflowd-faults.xz > "$bin" && chmod +x "$bin"; } || exit 1
echo "## failfast ($(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(cat .device-carry/COMMIT))" | tee -a "$out/failfast.log"
python3 scripts/gpu/failfast.py --bin "$bin" --out "$out" "$@" 2>&1 | tee -a "$out/failfast.log"
exit "${PIPESTATUS[0]}"
