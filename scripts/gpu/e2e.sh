#!/usr/bin/env bash
# GPU end to end, run ON THE GPU MACHINE after scripts/gpu/check.sh has
# unpacked the binary: installs the carried wheels (.whl: pyzmq, gguf; the
# machine has torch, transformers, msgpack, numpy), then runs
# scripts/gpu/e2e.py on `tiny`, and on SmolLM2 when its GGUF is at
# /tmp/smollm2.gguf. Appends to $OUT/e2e.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/tacflow-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TACFLOW_KERNEL_CACHE=/tmp/tacflow-kernels
bin=/tmp/tacflowd
[ -x "$bin" ] || { xz -dc .device-carry/tacflowd.xz > "$bin" && chmod +x "$bin"; }
rc=0
for model in "$@"; do
    args=(--bin "$bin" --model "$model")
    [ "$model" = /tmp/smollm2.gguf ] && args+=(--tokens .device-carry/text.tokens)
    echo "## e2e $model ($(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(cat .device-carry/COMMIT))" | tee -a "$out/e2e.log"
    python3 scripts/gpu/e2e.py "${args[@]}" 2>&1 | tee -a "$out/e2e.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
done
exit "$rc"
