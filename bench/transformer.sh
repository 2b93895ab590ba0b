#!/usr/bin/env bash
# Transformer forward benchmark: candle vs diffusers/PyTorch, same weights, same inputs, same run.
# Usage: bench/transformer.sh [LATENT=32] [RUNS=5]      (writes target/bench/xl once; 2 threads each)
set -euo pipefail
cd "$(dirname "$0")/.."
LATENT=${1:-32}
RUNS=${2:-5}
DIR=target/bench/xl
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
[ -f "$DIR/diffusion_pytorch_model.safetensors" ] || python3 bench/transformer_torch.py make --dir "$DIR"
cargo build --release -p pixart --example bench_transformer
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cpus; $(date -u +%FT%TZ)"
echo "== diffusers/PyTorch"
/usr/bin/time -v python3 bench/transformer_torch.py run --dir "$DIR" --runs "$RUNS" --threads 2 --latent "$LATENT" \
  2> >(grep -E "Maximum resident|Elapsed" >&2)
echo "== candle"
RAYON_NUM_THREADS=2 /usr/bin/time -v "$CARGO_TARGET_DIR/release/examples/bench_transformer" --dir "$DIR" \
  --runs "$RUNS" --latent "$LATENT" 2> >(grep -E "Maximum resident|Elapsed" >&2)
