#!/usr/bin/env bash
# Load: N = 1 to 64 concurrent clients against tacflowd on `tiny`
# (CPU), a fixed time each; raw log under bench/logs/load-<time>.log.
# Usage: bench/load/run.sh [extra args for run.py, e.g. --seconds 5]
exec "$(dirname "$0")/../lib/tiny-bench.sh" load 8192 bench/load/run.py "$@"
