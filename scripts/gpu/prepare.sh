#!/usr/bin/env bash
# Run on the DEVELOPMENT machine before a GPU run: builds tacflowd, and
# fills the git-ignored folders that the device tool carries to the GPU
# machine (no Rust there):
#   .device-carry/    tacflowd (stripped, xz), tacflowd-lab (the same with
#                     the `lab` feature: the bench-* subcommands and the
#                     lab's kernels), tacflowd-faults (the test daemon with
#                     fault injection, for scripts/gpu/failfast.sh), COMMIT,
#                     and optionally SmolLM2's GGUF's sha256 and the
#                     text's token ids
#   .device-carry-a/  the GGUF's first half, .device-carry-b/ its second:
#                     the whole file is larger than one call carries, so
#                     each half goes in a call of its own, back to back
#                     while the machine is still warm
#
#   scripts/gpu/prepare.sh [SMOLLM2.gguf TEXT.tokens]
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .device-carry .device-carry-a .device-carry-b
mkdir -p .device-carry .device-carry-a .device-carry-b
# The lab and fault-injection builds first, then the product, so that
# target/release/tacflowd is the product again afterwards.
cargo build --release -p tacflow-sidecar --features lab --bin tacflowd
strip -o .device-carry/tacflowd-lab target/release/tacflowd
cargo build --release -p tacflow-sidecar --features fault-injection --bin tacflowd-faults
strip -o .device-carry/tacflowd-faults target/release/tacflowd-faults
cargo build --release -p tacflow-sidecar --bin tacflowd
strip -o .device-carry/tacflowd target/release/tacflowd
xz -T0 -6 .device-carry/tacflowd .device-carry/tacflowd-lab .device-carry/tacflowd-faults
dirty=$(git diff --quiet HEAD -- kernels sidecar scripts/gpu && echo "" || echo " (+ uncommitted changes)")
echo "$(git rev-parse HEAD)$dirty" > .device-carry/COMMIT
if [ $# -ge 2 ]; then
    gguf=$1
    size=$(stat -c %s "$gguf")
    half=$(( (size / 2 + 4095) / 4096 * 4096 ))
    head -c "$half" "$gguf" > .device-carry-a/smollm2.gguf.part-a
    tail -c +"$((half + 1))" "$gguf" > .device-carry-b/smollm2.gguf.part-b
    (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") | awk '{print $1"  smollm2.gguf"}' > .device-carry/smollm2.gguf.sha256
    cp "$2" .device-carry/text.tokens
fi
du -sh .device-carry .device-carry-a .device-carry-b
