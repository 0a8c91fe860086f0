#!/usr/bin/env bash
# Run on the DEVELOPMENT machine: FlashInfer 0.7.2 (the decode-attention
# anchor) for the GPU machine, which cannot download it. Its wheel (65 MB)
# is over what one device call carries, so this unpacks it, drops the large
# sources that decode attention never compiles (MoE, sampling and
# Blackwell kernels, kernel-selection tables), and packs the rest as
# .whl/flashinfer-0.7.2-trim.tar.xz (about 14 MB); scripts/gpu/bench.sh
# unpacks it into /tmp/site. apache-tvm-ffi, its one dependency that the
# machine lacks, is downloaded beside it as a wheel.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
plat="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q $plat "$tmp" flashinfer-python==0.7.2
python3 -m pip download -q $plat .whl "apache-tvm-ffi>=0.1.11,<0.2"
(cd "$tmp" && unzip -q flashinfer_python-0.7.2-*.whl)
find "$tmp/flashinfer" -type f -size +400k \( -path "*/data/csrc/*" -o -name "*.json" -o -path "*/experimental/*" \) -delete
rm -rf "$tmp"/flashinfer/data/csrc/cake_*
tar cf - -C "$tmp" flashinfer flashinfer_python-0.7.2.dist-info | xz -T0 -9 > .whl/flashinfer-0.7.2-trim.tar.xz
ls -la .whl
