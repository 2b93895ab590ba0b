#!/usr/bin/env python3
"""Reference timings for `cargo run --release -p pixart --example edges`: the same operations on
the same synthetic image in OpenCV (cvtColor + Canny), PIL (resize) + numpy (crop) and PyTorch
(controlnet_aux's ControlNetHED_Apache2 at the released widths, random weights, PixArt's
post-processing). CPU, `--threads` torch/OpenCV threads (default 2).

    pip install --no-deps controlnet_aux einops   # only its hed module is imported
    python3 pixart/examples/edges_reference.py --size 1024 --runs 5
"""

import argparse
import importlib
import importlib.util
import sys
import time
import types

import cv2
import numpy as np
import torch
from PIL import Image


def synthetic(w, h):
    # Same formula as examples/edges.rs.
    x = np.arange(w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.arange(h, dtype=np.float32)[:, None].repeat(w, 1)
    fx, fy = x / w, y / h
    d = np.sqrt((fx - 0.4) ** 2 + (fy - 0.5) ** 2)
    disc = np.where(d < 0.25, 120.0, 0.0).astype(np.float32)
    xi, yi = x.astype(np.int64), y.astype(np.int64)
    stripes = np.where((xi // 37 + yi // 53) % 2 == 0, 40.0, 0.0).astype(np.float32)
    img = np.stack([60 + 120 * fx + disc, 30 + 150 * fy + stripes, 200 - 100 * fx * fy + disc / 2], -1)
    return img.astype(np.uint8)


def timeit(label, runs, f):
    f()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    print(f"{label:<28} min {ts[0]:9.2f} ms  median {ts[len(ts) // 2]:9.2f} ms  ({runs} runs)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hed", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cv2.setNumThreads(a.threads)
    s = a.size
    src = Image.fromarray(synthetic(s * 3 // 2, s * 9 // 8))

    def fit():
        iw, ih = src.size
        scale = max(s / iw, s / ih)
        rw, rh = max(int(iw * scale), s), max(int(ih * scale), s)
        r = np.asarray(src.resize((rw, rh), Image.BILINEAR))
        top, left = int(round((rh - s) / 2)), int(round((rw - s) / 2))
        return np.ascontiguousarray(r[top : top + s, left : left + s])

    fitted = fit()
    print(f"reference, CPU, {s}x{s} output, {a.threads} threads, opencv {cv2.__version__}, torch {torch.__version__}")
    timeit(f"PIL resize+crop {s * 3 // 2}->{s}", a.runs, fit)
    timeit("cv2 cvtColor + Canny", a.runs, lambda: cv2.Canny(cv2.cvtColor(fitted, cv2.COLOR_RGB2GRAY), 100, 200))
    if a.no_hed:
        return
    spec = importlib.util.find_spec("controlnet_aux")
    pkg = types.ModuleType("controlnet_aux")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["controlnet_aux"] = pkg
    hed = importlib.import_module("controlnet_aux.hed")
    net = hed.ControlNetHED_Apache2().float().eval()
    x = torch.from_numpy(fitted).permute(2, 0, 1)[None].float()

    def run():
        with torch.inference_mode():
            sides = [torch.nn.functional.interpolate(e, size=(s, s), mode="bilinear", align_corners=False) for e in net(x)]
            return torch.sigmoid(torch.cat(sides, 1).mean(1, keepdim=True)).clip(0, 1)

    timeit("PyTorch HED", a.runs, run)


if __name__ == "__main__":
    main()
