#!/usr/bin/env bash
# The GPU check's plumbing, on the machine that built the bundle (no GPU): run it before spending
# device time, since a GPU lease is short and a script error found there costs a machine start.
#
#   bash bench/gpu/bundle.sh                       # .gpu-bundle/
#   bash bench/gpu/smoke.sh [.gpu-bundle] [PYTHON] # PYTHON: one with torch + diffusers (default python3)
#
# Runs bench/gpu/run.py --smoke with the bundle's own binaries on the CPU: every committed golden case
# through those binaries, the real-size PixArt-XL-2 made by make_models.py and one forward of it, and
# tiny renders with and without ControlNet and T5. The binaries link the CUDA libraries; here they load
# deploy/cuda/toolkit.sh's link-only stubs (which abort if called, so a CPU run proves no CUDA call is
# made on the CPU path). The stubs are put on the binaries' path only: PyTorch's CUDA wheels would load
# them too and abort.
# results.jsonl and summary.md go to $PIXFARM_GPU_SMOKE_OUT when set; otherwise only the printed summary
# stays (the work folder, with the 2.4 GB real-size model, is removed on exit).
set -euo pipefail
cd "$(dirname "$0")/../.."
BUNDLE=$(realpath "${1:-.gpu-bundle}")
PY=${2:-python3}
eval "$(deploy/cuda/toolkit.sh)"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ -f "$BUNDLE/bin.tar.xz" ]; then
  tar -xJf "$BUNDLE/bin.tar.xz" -C "$WORK"
else
  cp -r "$BUNDLE/bin" "$WORK/"
fi
mkdir -p "$WORK/wrap"
for b in bench_gpu conformance; do
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s:%s exec %s "$@"\n' \
    "$CUDA_HOME/lib/stubs" "$BUNDLE/lib" "$WORK/bin/$b" >"$WORK/wrap/$b"
  chmod +x "$WORK/wrap/$b"
done
OUT=${PIXFARM_GPU_SMOKE_OUT:-$WORK/out}
"$PY" bench/gpu/run.py --bin "$WORK/wrap" --out "$OUT" --work "$WORK/work" --device cpu --smoke --budget 1500
