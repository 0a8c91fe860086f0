#!/usr/bin/env bash
# The GPU check, run ON THE GPU MACHINE (which has no Rust toolchain): the
# tacflowd binary built on the development machine by scripts/gpu/prepare.sh
# and carried in .device-carry/ runs `tacflowd selfcheck`, which prints a
# table last. The full log, headed by the commit, the date and the card's
# nvidia-smi lines, goes to $OUT/selfcheck.log (commit it under bench/logs/).
#
#   scripts/gpu/check.sh [selfcheck flags...]
#
# SmolLM2 is checked when its GGUF file is present as parts
# (.device-carry/smollm2.gguf.part-* and .device-carry-b/smollm2.gguf.part-*:
# the file is larger than one transfer carries) with the token ids of the
# text in .device-carry/text.tokens.
set -uo pipefail
cd "$(dirname "$0")/../.."
carry=.device-carry
out=${OUT:-/tmp/tacflow-out}
mkdir -p "$out"
log="$out/selfcheck.log"
{
    echo "# tacflowd selfcheck"
    echo "commit: $(cat "$carry/COMMIT" 2>/dev/null || echo unknown)"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm)"
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
} 2>&1 | tee "$log"

bin=/tmp/tacflowd
if [ -f "$carry/tacflowd.xz" ]; then
    xz -dc "$carry/tacflowd.xz" > "$bin" && chmod +x "$bin"
else
    bin="$carry/tacflowd"
fi

args=("$@")
a="$carry/smollm2.gguf.part-a"
b=.device-carry-b/smollm2.gguf.part-b
if [ -f "$a" ] && [ -f "$b" ] && [ -f "$carry/text.tokens" ]; then
    cat "$a" "$b" > /tmp/smollm2.gguf
    if (cd /tmp && sha256sum -c --quiet "$OLDPWD/$carry/smollm2.gguf.sha256"); then
        echo "smollm2: GGUF reassembled, sha256 matches" | tee -a "$log"
        args+=(--smollm2 /tmp/smollm2.gguf --tokens "$carry/text.tokens")
    else
        echo "smollm2: reassembled GGUF does not match its sha256" | tee -a "$log"
    fi
fi

export TACFLOW_KERNEL_CACHE=/tmp/tacflow-kernels NO_COLOR=1
"$bin" selfcheck "${args[@]}" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
echo "selfcheck exit status: $rc" | tee -a "$log"
exit "$rc"
