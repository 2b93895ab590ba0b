#!/usr/bin/env bash
# Builds what the GPU check (bench/gpu/run.sh) runs, on a machine with Rust but no GPU, into one folder
# that travels to a GPU machine with PyTorch but no Rust and no network: .gpu-bundle/ (git-ignored),
# at most 64 MiB.
#
#   bash bench/gpu/bundle.sh          # CUDA_COMPUTE_CAP=90 by default (H100/H200)
#
# bin/       bench_gpu, conformance (pixart examples) and pixfarm, `--features cuda`, stripped; the dev
#            profile, which builds every dependency and the model crate at opt-level 3 (the GPU's time
#            is in candle's kernels and cuBLAS) and is the build CI already keeps warm
#            (packed into bin.tar.xz when the folder would pass 60 MiB);
# lib/       libcudart.so.13 from the toolkit (PyTorch's wheels usually carry it too);
# whl/       diffusers and importlib_metadata, which that machine's Python lacks;
# BUILD      commit, nvcc, compute capability, date.
# The toolkit comes from deploy/cuda/toolkit.sh (pinned CUDA 13.0 wheels, cached).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${PIXFARM_GPU_BUNDLE:-$ROOT/.gpu-bundle}
cargo fetch --locked >/dev/null
eval "$(deploy/cuda/toolkit.sh)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
echo "== cargo build --features cuda (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target $CARGO_TARGET_DIR)"
# The same build as .ci/run's CUDA step.
bash deploy/cuda/build.sh

rm -rf "$OUT"
mkdir -p "$OUT/bin" "$OUT/lib" "$OUT/whl"
R=$CARGO_TARGET_DIR/debug
install -m 0755 "$R/examples/bench_gpu" "$R/examples/conformance" "$R/pixfarm" "$OUT/bin/"
strip "$OUT"/bin/*
cp -L "$CUDA_HOME/lib/libcudart.so.13" "$OUT/lib/"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d "$OUT/whl" diffusers==0.42.1 importlib_metadata==10.2.0
{
  echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
  echo "built $(date -u +%FT%TZ) on $(uname -m)"
  echo "nvcc $(nvcc --version | tail -n 1)"
  echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
  ldd "$OUT/bin/pixfarm" | grep -E 'cuda|cublas|curand|nvrtc' | sed 's/ (0x.*//'
} >"$OUT/BUILD"
size() { du -sm "$OUT" | cut -f1; }
if [ "$(size)" -gt 60 ]; then
  tar -cJf "$OUT/bin.tar.xz" -C "$OUT" bin && rm -rf "$OUT/bin"
fi
cat "$OUT/BUILD"
du -sh "$OUT"/* "$OUT"
[ "$(size)" -le 64 ] || { echo "bundle is $(size) MiB, over the 64 MiB the GPU machine accepts"; exit 1; }
