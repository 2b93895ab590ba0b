#!/usr/bin/env bash
# The GPU check: one prepared script for a GPU machine that has PyTorch (CUDA 13) but no Rust and no
# network. It runs what bench/gpu/bundle.sh built elsewhere.
#
#   bash bench/gpu/bundle.sh                         # on the build machine: .gpu-bundle/ (< 64 MiB)
#   bash bench/gpu/run.sh [.gpu-bundle] [OUT_DIR]    # on the GPU machine, from the repo root
#
# Reports nvidia-smi and torch.version.cuda first, then bench/gpu/run.py's steps (golden cases on CUDA,
# real-size correctness, candle vs diffusers timings, peak memory, the 8 GB question); results land in
# OUT_DIR/results.jsonl and OUT_DIR/summary.md. PIXFARM_GPU_BUDGET (seconds, default 420) bounds the
# whole run: steps that no longer fit are recorded as skipped, never cut half-way. Exit status 1 when a
# check failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
BUNDLE=${1:-.gpu-bundle}
RESULTS=${2:-${OUT:-/tmp/pixfarm-gpu-out}}
mkdir -p "$RESULTS"
exec > >(tee -a "$RESULTS/run.log") 2>&1

echo "== $(date -u +%FT%TZ) $(uname -m)"
nvidia-smi || echo "nvidia-smi: not available"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))'

if [ -f "$BUNDLE/bin.tar.xz" ] && [ ! -x "$BUNDLE/bin/bench_gpu" ]; then
  tar -xJf "$BUNDLE/bin.tar.xz" -C "$BUNDLE"
fi
[ -x "$BUNDLE/bin/bench_gpu" ] || { echo "no $BUNDLE/bin/bench_gpu: run bench/gpu/bundle.sh first"; exit 2; }
cat "$BUNDLE/BUILD" 2>/dev/null

# diffusers (and what it needs beyond the machine's packages) travel as wheels.
if ls "$BUNDLE"/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pixfarm-site \
    "$BUNDLE"/whl/*.whl && export PYTHONPATH=/tmp/pixfarm-site${PYTHONPATH:+:$PYTHONPATH}
fi

# cuBLAS, cuBLASLt, cuRAND, NVRTC and the runtime (CUDA 13): PyTorch's NVIDIA wheels carry them; the
# driver's libcuda.so.1 comes from the system. The bundle's own lib/ (libcudart) goes last.
LIBDIRS=$(python3 - <<'PY'
import glob, os, site, sys
want = ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13", "libcudart.so.13"]
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
dirs = []
for w in want:
    for r in roots:
        hits = glob.glob(os.path.join(r, "nvidia", "**", w), recursive=True)
        if hits:
            d = os.path.dirname(hits[0])
            if d not in dirs:
                dirs.append(d)
            break
print(":".join(dirs))
PY
)
export LD_LIBRARY_PATH=${LIBDIRS}:/usr/local/nvidia/lib64:/usr/lib/x86_64-linux-gnu:$PWD/$BUNDLE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
if ldd "$BUNDLE/bin/bench_gpu" | grep "not found"; then echo "a library the CUDA build needs is missing (above)"; exit 2; fi

# Bad input, before the long steps: a clear error, not a panic, for a device that does not exist.
"$BUNDLE/bin/bench_gpu" transformer --device cuda:7 --dtype bf16 --dir x --inputs x 2>&1 | tail -n 2

python3 bench/gpu/run.py --bin "$BUNDLE/bin" --out "$RESULTS" --budget "${PIXFARM_GPU_BUDGET:-420}" "${@:3}"
