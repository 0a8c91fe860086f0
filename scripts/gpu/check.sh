#!/usr/bin/env bash
# The GPU check, run ON THE GPU MACHINE (which has no Rust toolchain): the
# tacflowd binary built on the development machine by scripts/gpu/prepare.sh
# and carried in .device-carry/ runs `tacflowd selfcheck`, which prints a
# table last. The full log, headed by the commit, the date and the card's
# nvidia-smi lines, goes to $OUT/selfcheck.log (commit it under bench/logs/).
#
#   scripts/gpu/check.sh [selfcheck flags...]
#
# SmolLM2 (98 MB, more than one transfer carries) is checked when both
# halves of its GGUF file are there, with the token ids of the text:
#   scripts/gpu/prepare.sh SmolLM2-135M-Instruct.Q4_1.gguf gpl3.tokens   # here
#   call 1, carry .device-carry:    bash scripts/gpu/check.sh            # everything else
#   call 2 at once, carry .device-carry-a:  true                         # the first half
#   call 3 at once (machine still warm), carry .device-carry-b:
#                                   bash scripts/gpu/check.sh --groups smollm2
# (the tokens: the SmolLM2 tokenizer on /usr/share/common-licenses/GPL-3,
# e.g. transformers' AutoTokenizer with gguf_file=...).
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
a=.device-carry-a/smollm2.gguf.part-a
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
