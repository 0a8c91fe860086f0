#!/usr/bin/env bash
# NanoFlow overlap on the GPU, ON THE GPU MACHINE (bench.sh's `overlap`
# stage; docs/SCHEDULES.md): for each SM-share mechanism, `tacflowd tune`
# profiles the ops at row counts x SM shares and caches a schedule, then
# `bench-serve` runs the same workload with `--overlap off` (the
# sequential baselines, once: on the same lanes, and on one lane) and
# `--overlap on` under that mechanism; a
# table of tokens/s, the fraction of the compute-bound optimum and the
# largest step's measured and predicted time closes the log, and each
# run's timeline is drawn as a PNG (matplotlib, when present).
#
#   bash scripts/gpu/overlap.sh TACFLOWD OUT_DIR
#
# Environment (defaults in brackets):
#   OVERLAP_MECHS  [grid,cublas grid cublas green]  --sm-share values, space-separated
#   OVERLAP_MODEL  [random:llama-3-8b]
#   OVERLAP_LANES  [3]                 --gpu-lanes of tune and bench-serve
#   OVERLAP_ROWS   [1,16,64,256,1024]  tune --rows
#   OVERLAP_SHAPES [32,128,128+896]    tune --shapes
#   OVERLAP_WORK   [--requests 128 --input-len 512 --output-len 128 --step-tokens 1024]
#   OVERLAP_BASELINE [1]               0 skips the --overlap off run
# A device call runs 10 minutes at most: if the stage outruns one, split
# it, e.g. OVERLAP_MECHS="grid,cublas grid" in one call and
# OVERLAP_BASELINE=0 OVERLAP_MECHS="cublas green" in the next (the table
# reads every serve-*.json in OUT_DIR).
set -uo pipefail
bin=$1
out=$2
mechs=${OVERLAP_MECHS:-grid,cublas grid cublas green}
model=${OVERLAP_MODEL:-random:llama-3-8b}
lanes=${OVERLAP_LANES:-3}
work=${OVERLAP_WORK:---requests 128 --input-len 512 --output-len 128 --step-tokens 1024}
context=$(echo "$work" | sed -n 's/.*--input-len \([0-9]*\).*/\1/p')
common=(--backend cuda --model "$model")
mkdir -p "$out"
rc=0

serve() {  # NAME ARGS...: one bench-serve run, its JSON and PNG
    local name=$1
    shift
    # shellcheck disable=SC2086
    timeout 180 "$bin" bench-serve "${common[@]}" $work "$@" --json "$out/serve-$name.json" || rc=$?
    python3 bench/serve/timeline.py "$out/serve-$name.json" "$out/timeline-$name.png" 2>&1 | tail -1
}

# The sequential baselines: on the lanes of the overlapped runs (f32 GEMM
# inputs, as several lanes run them), and on one lane (bf16, the default).
if [ "${OVERLAP_BASELINE:-1}" = 1 ]; then
    serve off --overlap off --gpu-lanes "$lanes"
    serve off-1lane --overlap off --gpu-lanes 1
fi
for m in $mechs; do
    dir="$out/schedules-${m/,/+}"
    echo "-- tune --sm-share $m"
    timeout 180 "$bin" tune "${common[@]}" --gpu-lanes "$lanes" --sm-share "$m" --schedule-dir "$dir" \
        --rows "${OVERLAP_ROWS:-1,16,64,256,1024}" --shapes "${OVERLAP_SHAPES:-32,128,128+896}" \
        --context "${context:-512}" || { rc=$?; echo "tune --sm-share $m failed ($rc)"; continue; }
    echo "-- bench-serve --overlap on --sm-share $m"
    serve "on-${m/,/+}" --overlap on --gpu-lanes "$lanes" --sm-share "$m" --schedule-dir "$dir"
done

python3 - "$out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = ["| run | tokens/s | fraction of optimum | GEMM TFLOP/s | largest step measured (us) | predicted (us) | lanes |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
def num(v, f="{:.1f}"):
    return f.format(v) if isinstance(v, (int, float)) else "-"
for p in sorted(out.glob("serve-*.json")):
    r = json.loads(p.read_text())
    o, t = r.get("optimum", {}), r.get("timeline", {})
    rows.append(f"| {p.stem[6:]} | {num(r.get('tokens_per_s'))} | {num(o.get('fraction'), '{:.3f}')} | "
                f"{num(o.get('gemm_tflops'))} | {num(t.get('measured_us'))} | {num(t.get('predicted_us'))} | {t.get('lanes', '-')} |")
table = "\n".join(rows)
(out / "overlap.md").write_text(table + "\n")
print(table)
EOF
exit "$rc"
