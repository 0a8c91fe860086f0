#!/usr/bin/env bash
# Decode-attention GPU run, ON THE GPU MACHINE, in one device call: the self-check
# (every kernel against the CPU reference, the benchmarked attention
# variants included), then the decode-attention benchmark against torch SDPA
# and the copy bandwidth (bench/attention/run.py), then the decode step
# against its floor, in-process and end to end through the Python client
# (bench/decode/run.py). Tables last. Everything goes to $OUT/bench.log,
# headed by the commit, the date and the card's nvidia-smi line (commit it
# under bench/logs/), the numbers to $OUT/*.json and $OUT/*.md.
#
#   here:   scripts/gpu/prepare.sh
#   device: bash scripts/gpu/bench.sh [selfcheck] [failfast] [attention] [decode]
#           [integrations] [selfcheck-tactic] [selfcheck-graphs] [decode-quick]
#           [prefill]   (the tensor-core prefill kernel: its self-check
#           cases, the model groups with it on, bench-prefill)
#           [tactic] [tactic-128k] [tactic-real]   (bench-tactic on the GPU:
#           run selfcheck-tactic first; tactic-128k alone in its call, and
#           per fraction if it outruns it: TACTIC_F=0.02 ... tactic-128k)
#           [overlap]   (tune + bench-serve --overlap off/on per SM-share
#           mechanism: scripts/gpu/overlap.sh, alone in its call)
#           [smollm2] [bf16-logits]   (the last two need the GGUF's two
#           halves: carry .device-carry-a and .device-carry-b in calls
#           right after one that carried .device-carry, while the machine
#           is warm: no call carries more than 64 MiB)
#           (carry .device-carry and .whl: pyzmq for the client, FlashInfer
#           and apache-tvm-ffi for the attention anchor)
set -uo pipefail
cd "$(dirname "$0")/../.."
carry=.device-carry
out=${OUT:-/tmp/tacflow-out}
mkdir -p "$out"
log="$out/bench.log"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(selfcheck attention decode)
{
    echo "# decode-attention benchmarks: ${stages[*]}"
    echo "commit: $(cat "$carry/COMMIT" 2>/dev/null || echo unknown)"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm), $(nproc) cores"
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu --format=csv
} 2>&1 | tee "$log"

# The lab's build: the bench-* subcommands and the lab's kernels.
bin=/tmp/tacflowd-lab
xz -dc "$carry/tacflowd-lab.xz" > "$bin" && chmod +x "$bin" || { echo "no tacflowd-lab in $carry" | tee -a "$log"; exit 1; }
export TACFLOW_KERNEL_CACHE=/tmp/tacflow-kernels NO_COLOR=1 PYTHONUNBUFFERED=1
# Carried Python packages (README of the device tool): wheels in .whl/, and
# FlashInfer 0.7.2 as a trimmed tree (its wheel, 65 MB, is over what one
# call carries: scripts/gpu/flashinfer-trim.sh makes the tarball).
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
    export PYTHONPATH=/tmp/site
fi
if [ -f .whl/flashinfer-0.7.2-trim.tar.xz ] && [ ! -d /tmp/site/flashinfer ]; then
    mkdir -p /tmp/site && tar xJf .whl/flashinfer-0.7.2-trim.tar.xz -C /tmp/site
fi

# SmolLM2's GGUF, carried in two halves (scripts/gpu/prepare.sh), joined
# once and checked; false when the halves are not here.
gguf_ready() {
    if [ ! -f /tmp/smollm2.gguf ] && [ -f .device-carry-a/smollm2.gguf.part-a ] && [ -f .device-carry-b/smollm2.gguf.part-b ]; then
        cat .device-carry-a/smollm2.gguf.part-a .device-carry-b/smollm2.gguf.part-b > /tmp/smollm2.gguf
        (cd /tmp && sha256sum -c --quiet "$OLDPWD/$carry/smollm2.gguf.sha256") || { echo "smollm2: GGUF does not match its sha256" | tee -a "$log"; rm -f /tmp/smollm2.gguf; }
    fi
    [ -f /tmp/smollm2.gguf ]
}

rc=0
for s in "${stages[@]}"; do
    echo -e "\n== $s ($(date -u +%H:%M:%S))" | tee -a "$log"
    case $s in
        selfcheck) timeout 270 "$bin" selfcheck 2>&1 | tee -a "$log" ;;
        selfcheck-graphs) timeout 120 "$bin" selfcheck --groups graphs 2>&1 | tee -a "$log" ;;
        prefill)
            # The prefill kernel against the CPU (the attention group has its
            # cases), the models of head size 128 and 64 with it on, then its
            # time against the decode kernel's on prefill steps.
            timeout 200 "$bin" selfcheck --groups attention,model-8b --experimental-prefill-attention 2>&1 | tee -a "$log"
            timeout 120 "$bin" bench-prefill --json "$out/prefill-llama.json" 2>&1 | tee -a "$log"
            timeout 60 "$bin" bench-prefill --shape 9/3/64 --cases 1:512:512,1:2048:2048,1:512:8192,2:512:4096:64 \
                --json "$out/prefill-smollm2.json" 2>&1 | tee -a "$log" ;;
        integrations)
            # The daemon-side tests that hold on both backends, against the
            # CUDA backend (issue: sampling options and client-named blocks
            # on the GPU): pytest and its needs travel in .whl/.
            xz -dc "$carry/tacflowd.xz" > /tmp/tacflowd && chmod +x /tmp/tacflowd
            TACFLOW_TEST_BACKEND=cuda TACFLOWD=/tmp/tacflowd PYTHONPATH="/tmp/site:$PWD/client-py" \
                timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_named_blocks.py \
                tests/test_vllm_sampling.py 2>&1 | tee -a "$log" ;;
        selfcheck-tactic) timeout "${TACTIC_TIMEOUT:-300}" "$bin" selfcheck --groups tactic 2>&1 | tee -a "$log" ;;
        tactic|tactic-128k)
            # Tactic's device path against full attention (kernels/TACTIC.md,
            # "Synthetic keys"): Llama-3-8B's attention shape, batches 1/16/64,
            # keys calibrated so the oracle reads 2/5/10% at P = 0.9; quality
            # from the CPU reference on each batch's first sequence.
            ctx=32768; [ "$s" = tactic-128k ] && ctx=131072
            timeout "${TACTIC_BENCH_TIMEOUT:-570}" "$bin" bench-tactic --backend cuda --shape 32/8/128 \
                --contexts "$ctx" --batches 1,16,64 --oracle-fraction "${TACTIC_F:-0.02,0.05,0.1}" --p 0.9 \
                --steps 16 --quality-seqs 1 --json "$out/$s.json" 2>&1 | tee -a "$log" ;;
        tactic-real)
            # SmolLM2's post-RoPE keys and queries: the daemon's own, captured
            # here from the carried GGUF and text (capture-qk, the CPU backend
            # on this machine's cores), else a capture carried in $carry/qk/;
            # P 0.8/0.9/0.95.
            qk="$carry/qk"
            if [ ! -f "$qk/k_post.npy" ] && gguf_ready; then
                qk=/tmp/qk
                [ -f "$qk/k_post.npy" ] || timeout 300 "$bin" capture-qk --model /tmp/smollm2.gguf \
                    --tokens "$carry/text.tokens" --limit 8192 --steps 16 --out "$qk" 2>&1 | tail -3 | tee -a "$log"
            fi
            if [ -f "$qk/k_post.npy" ]; then
                timeout 570 "$bin" bench-tactic --backend cuda --keys "$qk" --batches 1,16,64 \
                    --p 0.8,0.9,0.95 --steps 16 --quality-seqs 1 --json "$out/tactic-real.json" 2>&1 | tee -a "$log"
            else
                echo "tactic-real: NOT RUN (no capture in $carry/qk, no GGUF halves to capture from)" | tee -a "$log"
            fi ;;
        selfcheck-attention) timeout 120 "$bin" selfcheck --groups attention 2>&1 | tee -a "$log" ;;
        attention-tune)
            # Every variant and forced split counts on the cases where the
            # daemon's kernel trails SDPA most.
            timeout 200 "$bin" bench-attention --variants --splits 2,4,8,16,32 \
                --cases 8:32768,32:32768,4:131072,256:2048 --json "$out/attention-tune.json" 2>&1 | tee -a "$log" ;;
        variants) timeout 150 "$bin" bench-attention --variants --json "$out/attention-ours.json" 2>&1 | tee -a "$log" ;;
        profile)
            # ncu on 256 x 2k, one launch of each of three kernels: DRAM
            # bytes and throughput, where the warps stall ($out/ncu.txt).
            for k in daemon:prefetch2x1_nc mma3:mma3; do
                timeout 60 ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
                    --section WarpStateStats -k regex:"${k#*:}\$" --launch-skip 4 --launch-count 1 \
                    "$bin" bench-attention --variants --only "${k%%:*}" --iters 1 --cases 256:2048 \
                    >> "$out/ncu.txt" 2>&1
            done
            grep -E "^  attention|Duration|DRAM Throughput|Memory Throughput|Mem Busy|Max Bandwidth|Stall|Warp Cycles Per Issued|Issued Warp|L2 Hit|Registers|Achieved Occupancy" "$out/ncu.txt" | head -80 | tee -a "$log"
            ;;
        failfast)
            # A real illegal memory access (tacflowd-faults, TACFLOW_INJECT_FAULT=illegal_address).
            xz -dc "$carry/tacflowd-faults.xz" > /tmp/tacflowd-faults && chmod +x /tmp/tacflowd-faults
            timeout 120 python3 scripts/gpu/failfast.py --bin /tmp/tacflowd-faults --out "$out" 2>&1 | tee -a "$log"
            ;;
        smollm2|bf16-logits)
            gguf_ready || { echo "$s: NOT RUN (no GGUF halves)" | tee -a "$log"; rc=1; continue; }
            if [ "$s" = smollm2 ]; then
                timeout 420 "$bin" selfcheck --groups smollm2 --smollm2 /tmp/smollm2.gguf --tokens "$carry/text.tokens" 2>&1 | tee -a "$log"
            else
                timeout 420 python3 scripts/gpu/bf16_logits.py --bin "$bin" --gguf /tmp/smollm2.gguf --tokens "$carry/text.tokens" \
                    --out "$out" --device cuda --backend cuda --daemon-arg=--cuda-graphs \
                    --daemon-arg=--fuse=add-rmsnorm,rope-kv-append,silu-gemm-input 2>&1 | tee -a "$log"
            fi
            ;;
        attention) timeout 300 python3 bench/attention/run.py --no-variants --tacflowd "$bin" --out "$out" 2>&1 | tee -a "$log" ;;
        decode) timeout 400 python3 bench/decode/run.py --tacflowd "$bin" --out "$out" 2>&1 | tee -a "$log" ;;
        decode-quick) timeout 300 python3 bench/decode/run.py --configs 3 --tacflowd "$bin" --out "$out" 2>&1 | tee -a "$log" ;;
        overlap)
            # NanoFlow overlap (docs/SCHEDULES.md): tune per SM-share
            # mechanism, bench-serve --overlap off vs on, a table; the
            # product binary (tune and bench-serve are product subcommands).
            # First the self-check of held lanes (group shares).
            xz -dc "$carry/tacflowd.xz" > /tmp/tacflowd && chmod +x /tmp/tacflowd
            timeout 120 /tmp/tacflowd selfcheck --groups shares 2>&1 | tee -a "$log"
            timeout 470 bash scripts/gpu/overlap.sh /tmp/tacflowd "$out" 2>&1 | tee -a "$log" ;;
        *) echo "unknown stage $s" | tee -a "$log" ;;
    esac
    r=${PIPESTATUS[0]}
    echo "== $s: exit $r" | tee -a "$log"
    [ "$r" -ne 0 ] && rc=$r
done

{
    echo -e "\n== summary"
    grep -E "^selfcheck: [0-9]+ passed" "$log" | tail -1
    grep -E "^FAIL " "$log" | head -20
    for f in attention.md decode.md bf16_logits.md overlap.md; do [ -f "$out/$f" ] && { echo; cat "$out/$f"; }; done
    grep -E "^batch 64 in-daemon" "$log" | tail -1
} 2>&1 | tee -a "$log"
exit "$rc"
