# Sourced by scripts/test (or run directly): makes sure vLLM's own virtual
# environment exists, with the release tacflow's vLLM integration supports
# and this checkout's client installed in editable mode (its platform plugin
# and executor). Separate from ./.venv: vLLM pins its own torch, about
# 8.5 GB with its CUDA libraries. Re-installs only when what it installs
# changes. Sets VLLM_VENV; the location is $TACFLOW_VLLM_VENV, else
# ./.vllm-venv (where tests/test_vllm.py looks).

tacflow_vllm_venv() {
    local root stamp want python
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    VLLM_VENV=${TACFLOW_VLLM_VENV:-$root/.vllm-venv}
    stamp="$VLLM_VENV/.tacflow-vllm"
    want=$(cat "$root/client-py/pyproject.toml" "$root/scripts/lib/vllm-venv.sh" | sha256sum | cut -d' ' -f1)
    if [ -x "$VLLM_VENV/bin/vllm" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    python=${TACFLOW_PYTHON:-python3}
    echo "==> setting up $VLLM_VENV (vLLM and its torch: about 8.5 GB on the first run)" >&2
    [ -x "$VLLM_VENV/bin/python" ] || "$python" -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    # The [vllm] extra pins the supported release (tacflow.vllm.SUPPORTED_VLLM).
    "$VLLM_VENV/bin/python" -m pip install --quiet -e "$root/client-py[vllm]" >&2
    echo "$want" > "$stamp"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    tacflow_vllm_venv
    echo "$VLLM_VENV"
fi
