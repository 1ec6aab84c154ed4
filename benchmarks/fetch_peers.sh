#!/usr/bin/env bash
# Unpack the peers the GPU benchmark compares against (cut-cross-entropy, liger-kernel;
# pure-Python wheels, no dependencies pulled) into benchmarks/peers/, for a machine that
# cannot reach a package index: run this where pip can download, carry benchmarks/peers
# with the device call, and gpu_check.py puts it on sys.path (nothing is installed).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
python3 -m pip download --quiet --no-deps -d "$wheels" cut-cross-entropy liger-kernel
rm -rf "$here/peers"
for wheel in "$wheels"/*.whl; do
    python3 -m zipfile -e "$wheel" "$here/peers"
done
ls "$here/peers"
