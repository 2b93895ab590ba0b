#!/usr/bin/env bash
# Builds what CI compiles and links with `--features cuda` and what bench/gpu/bundle.sh ships: the
# `pixfarm` binary and pixart's `bench_gpu` and `conformance` programs, dev profile, in ONE cargo
# invocation. Run it after `eval "$(deploy/cuda/toolkit.sh)"`.
#
# Why one invocation over the whole workspace: cargo resolves features per invocation, for the
# packages it is asked for. `cargo build -p pixfarm` and then `-p pixart --example ...` resolved two
# different feature sets, and both differed from `cargo test --workspace`'s, so the AWS SDK, tonic,
# tokio and friends were compiled twice more and candle's CUDA crates twice (~23 min each on a
# 2-core machine, cold). With `--workspace` and an example among the targets (which activates the
# dev-dependencies, as tests do), every crate that does not depend on candle gets exactly the
# features of the test build and is reused from it; only candle, cudarc, candle-kernels (nvcc) and
# the crates above them are built for CUDA, once.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${CUDA_HOME:?run eval \"\$(deploy/cuda/toolkit.sh)\" first}"
cargo build --locked --workspace --features pixfarm/cuda,pixart/cuda \
  --bin pixfarm --example bench_gpu --example conformance
