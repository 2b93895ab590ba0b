#!/usr/bin/env bash
# Draws the control images of examples/prompts.jsonl with the training crate's scene renderer, so they
# are what the bundled adapter learned from: the exact outline of a dataset scene (kind `edge`) and the
# scene's picture (kind `canny`: the worker computes its edge map). Deterministic; run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
scene() { cargo run -q --release -p pixart-train -- scene "$@"; }
scene --prompt "a large yellow circle in the centre on a blue background" --edges examples/controls/circle_edges.png
scene --prompt "a big white triangle in the lower right on a red background" --image examples/controls/triangle_scene.png
