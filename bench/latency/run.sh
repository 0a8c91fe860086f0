#!/usr/bin/env bash
# Empty-step latency: tacflowd on `tiny` (CPU) against a pyzmq
# echo and a Unix socket ping-pong, measured in one run; raw log under
# bench/logs/latency-<time>.log.
# Usage: bench/latency/run.sh [extra args for run.py]
exec "$(dirname "$0")/../lib/tiny-bench.sh" latency 1024 bench/latency/run.py "$@"
