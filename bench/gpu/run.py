#!/usr/bin/env python3
"""The GPU check, one prepared run (called by bench/gpu/run.sh; see its header).

Order, so that what matters most is measured first if the time runs out:
  1. machine: nvidia-smi, torch.version.cuda;
  2. correctness of the CUDA build on the committed golden cases (transformer, ControlNet, LCM loops,
     VAE, T5) in f32 against the diffusers references, and bf16 against them with a looser bound;
  3. real-size transformer (PixArt-XL-2, random weights made here): candle CUDA f32 vs candle CPU f32,
     vs PyTorch CUDA f32, candle bf16 vs f32, at 256 px;
  4. speed, candle vs diffusers in the same run: one 1024x1024 transformer forward (bf16, batch 1 and 8),
     the whole 4-step 1024x1024 render (T5 excluded, VAE included; batch 1 and 8), ControlNet overhead;
     peak GPU memory of each from NVML (whole process, context included);
  5. the 8 GB question: peak memory of a T5-excluded 1024x1024 render;
  6. T5 included at its real size (T5 v1.1 XXL, 9.5 GB bf16), only if the budget still allows.
Each step prints a JSON line into OUT/results.jsonl; OUT/summary.md is the table for BENCHMARKS.md.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FIX = os.path.join(ROOT, "pixart", "tests", "fixtures")
TINY = os.path.join(ROOT, "models", "tiny-pixart-lcm")
START = time.time()


class Peak:
    """Samples the GPU's used memory every 20 ms while a command runs (NVML, else nvidia-smi)."""

    def __init__(self):
        self.peak = None
        self.base = None
        self._stop = threading.Event()
        self._read = None
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
        except Exception:
            if shutil.which("nvidia-smi"):
                def smi():
                    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                         capture_output=True, text=True).stdout
                    return float(out.split()[0])
                self._read = smi

    def __enter__(self):
        if self._read:
            self.base = self._read()
            self.peak = self.base
            threading.Thread(target=self._loop, daemon=True).start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._read())
            except Exception:
                return
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        time.sleep(0.05)

    def mib(self):
        return None if self.peak is None else round(self.peak - self.base)


class Run:
    def __init__(self, a):
        self.a = a
        self.out = a.out
        os.makedirs(self.out, exist_ok=True)
        self.work = a.work
        os.makedirs(self.work, exist_ok=True)
        self.results = open(os.path.join(self.out, "results.jsonl"), "a")
        self.rows = []
        self.failed = 0

    def left(self):
        return self.a.budget - (time.time() - START)

    def record(self, row):
        row["t"] = round(time.time() - START, 1)
        self.rows.append(row)
        self.results.write(json.dumps(row) + "\n")
        self.results.flush()
        print(json.dumps(row), flush=True)

    def cmd(self, step, argv, timeout=None, need=0):
        """Runs argv; returns its last JSON line (with peak_gpu_mib) or None, recording failures."""
        if self.left() < need:
            self.record({"step": step, "skipped": f"budget: {self.left():.0f} s left, needs ~{need} s"})
            return None
        timeout = min(timeout or self.left(), max(self.left(), 5))
        with Peak() as peak:
            try:
                p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                self.failed += 1
                self.record({"step": step, "error": f"timed out after {timeout:.0f} s", "argv": argv})
                return None
        if p.returncode != 0:
            self.failed += 1
            self.record({"step": step, "error": (p.stderr or p.stdout).strip()[-1500:], "rc": p.returncode})
            return None
        line = next((l for l in reversed(p.stdout.splitlines()) if l.startswith("{")), None)
        row = json.loads(line) if line else {}
        row.update({"step": step, "peak_gpu_mib": peak.mib()})
        self.record(row)
        return row

    def compare(self, step, ours, ref, name, tol, mask=None, ours_name=None):
        import numpy as np
        from safetensors.numpy import load_file

        try:
            o = load_file(ours)[ours_name or name].astype(np.float64)
            r = load_file(ref)[name].astype(np.float64)
            if mask is not None:
                o, r = o * mask, r * mask
            err = float(np.abs(o - r).max() / max(1.0, np.abs(r).max()))
        except Exception as e:  # a missing output file is a failed step, already recorded
            self.record({"step": step, "check": "error", "error": str(e)})
            self.failed += 1
            return None
        ok = err <= tol
        self.failed += 0 if ok else 1
        self.record({"step": step, "check": "rel_err", "rel_err": err, "tol": tol, "ok": ok})
        return err


def golden(r, bin_dir, dtype):
    """The committed golden cases through the CUDA build (conformance harness, --device cuda)."""
    conf = os.path.join(bin_dir, "conformance")
    tol = 1e-3 if dtype == "f32" else 5e-2
    dev = ["--device", r.a.device, "--dtype", dtype]
    cases = [
        ("transformer/micro_b2_padded", ["transformer", "--model", f"{FIX}/transformer/micro"]),
        ("transformer/micro_nonsquare", ["transformer", "--model", f"{FIX}/transformer/micro"]),
        ("transformer/plain_b2_nonsquare", ["transformer", "--model", f"{FIX}/transformer/plain"]),
        ("controlnet/base_b2_padded", ["transformer", "--model", f"{FIX}/controlnet/base"]),
        ("controlnet/ctrl_b2_padded", ["transformer", "--model", f"{FIX}/controlnet/base", "--controlnet", f"{FIX}/controlnet/adapter"]),
        ("controlnet/ctrl_b2_rowscale", ["transformer", "--model", f"{FIX}/controlnet/base", "--controlnet", f"{FIX}/controlnet/adapter"]),
        ("controlnet/ctrl_nonsquare", ["transformer", "--model", f"{FIX}/controlnet/base", "--controlnet", f"{FIX}/controlnet/adapter"]),
        ("pipeline/lcm_micro", ["lcm", "--model", f"{FIX}/transformer/micro", "--scheduler", f"{TINY}/scheduler"]),
        ("controlnet/lcm_ctrl", ["lcm", "--model", f"{FIX}/controlnet/base", "--scheduler", f"{TINY}/scheduler", "--controlnet", f"{FIX}/controlnet/adapter"]),
    ]
    for case, args in cases:
        out = os.path.join(r.work, f"{case.replace('/', '_')}.{dtype}.safetensors")
        step = f"golden {case} {dtype}"
        if r.cmd(step, [conf, *dev, *args, "--inputs", f"{FIX}/{case}.inputs.safetensors", "--out", out], timeout=120):
            name = "latents" if args[0] == "lcm" else "sample"
            r.compare(step, out, f"{FIX}/{case}.expected.safetensors", name, tol)
    # VAE decode and T5 read their cases from combined fixture files: rename the inputs.
    import numpy as np
    from safetensors.numpy import load_file, save_file

    vae = load_file(f"{FIX}/pipeline/vae.safetensors")
    vin, vref = os.path.join(r.work, "vae_in.safetensors"), os.path.join(r.work, "vae_ref.safetensors")
    save_file({"latents": vae["decode_latents"]}, vin)
    save_file({"sample": vae["decode_sample"]}, vref)
    out = os.path.join(r.work, f"vae.{dtype}.safetensors")
    # The VAE runs in f32 whatever --dtype says, so it is checked once.
    if dtype == "f32" and r.cmd("golden vae-decode", [conf, *dev, "vae-decode", "--vae", f"{TINY}/vae", "--inputs", vin, "--out", out], timeout=120):
        r.compare("golden vae-decode", out, vref, "sample", 1e-3)
    t5 = load_file(f"{FIX}/pipeline/t5.safetensors")
    out = os.path.join(r.work, f"t5.{dtype}.safetensors")
    if r.cmd(f"golden t5 {dtype}", [conf, *dev, "t5", "--text-encoder", f"{TINY}/text_encoder", "--inputs", f"{FIX}/pipeline/t5.safetensors", "--out", out], timeout=120):
        mask = t5["attention_mask"].astype(np.float64)[..., None]
        r.compare(f"golden t5 {dtype}", out, f"{FIX}/pipeline/t5.safetensors", "last_hidden_state", tol, mask=mask)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="folder with the CUDA build's bench_gpu and conformance")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/pixfarm-gpu-work")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for everything after the start")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny sizes, no diffusers timing")
    a = ap.parse_args()
    r = Run(a)
    py = sys.executable
    bench = os.path.join(a.bin, "bench_gpu")
    gpu = a.device.startswith("cuda")

    # 1. machine
    info = {"step": "machine", "python": sys.version.split()[0]}
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except Exception as e:
        info["torch"] = f"unavailable: {e}"
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                             "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    r.record(info)

    # 2. golden cases
    golden(r, a.bin, "f32")
    if gpu:
        golden(r, a.bin, "bf16")

    # 3. real-size model (random weights), made here
    xl = os.path.join(a.work, "xl")
    if not os.path.exists(os.path.join(xl, "model_index.json")):
        r.cmd("make real-size model", [py, os.path.join(HERE, "make_models.py"), "--out", xl, "--device", a.device,
                                       "--controlnet-layers", "13"], timeout=300)
    tdir, inp = os.path.join(xl, "transformer"), lambda l: os.path.join(xl, "transformer", f"inputs_{l}.safetensors")
    outs = {}
    for impl, dev, dt in [("candle", a.device, "f32"), ("candle", "cpu", "f32"), ("diffusers", a.device, "f32"), ("candle", a.device, "bf16")]:
        if not gpu and (impl, dev, dt) != ("candle", "cpu", "f32"):
            continue
        o = os.path.join(a.work, f"xl32_{impl}_{dev}_{dt}.safetensors")
        common = ["--device", dev, "--dtype", dt, "--batch", "1", "--runs", "1"]
        argv = ([bench, "transformer", "--dir", tdir, "--inputs", inp(32), "--out", o, *common] if impl == "candle"
                else [py, os.path.join(HERE, "torch_bench.py"), "transformer", "--dir", tdir, "--inputs", inp(32), "--out", o, *common])
        if r.cmd(f"xl 256px {impl} {dev} {dt}", argv, timeout=300):
            outs[(impl, dev, dt)] = o
    ref = outs.get(("candle", "cpu", "f32"))
    for key, tol in [(("candle", a.device, "f32"), 1e-3), (("diffusers", a.device, "f32"), 1e-3)]:
        if ref and key in outs and gpu:
            r.compare(f"xl 256px {key[0]} {key[1]} f32 vs candle cpu f32", outs[key], ref, "sample", tol)
    if ("candle", a.device, "bf16") in outs and ("candle", a.device, "f32") in outs:
        r.compare("xl 256px candle bf16 vs f32", outs[("candle", a.device, "bf16")], outs[("candle", a.device, "f32")], "sample", 5e-2)

    if not gpu:  # the smoke run stops at the real-size forward on the CPU: plumbing only
        r.cmd("render smoke cpu", [bench, "render", "--model", TINY, "--device", "cpu", "--dtype", "f32", "--size", "64", "--batch", "2", "--runs", "1"])
        r.cmd("render smoke cpu controlnet", [bench, "render", "--model", TINY, "--device", "cpu", "--dtype", "f32", "--size", "64", "--batch", "1", "--runs", "1", "--controlnet", f"{TINY}/controlnet"])
        r.cmd("render smoke cpu t5", [bench, "render", "--model", TINY, "--device", "cpu", "--dtype", "f32", "--size", "64", "--batch", "1", "--runs", "1", "--text-encoder"])
        return finish(r)

    # 4. speed, side by side
    latent = a.size // 8
    if not os.path.exists(inp(latent)):
        latent = 128
    for b in [int(x) for x in a.batches.split(",")]:
        common = ["--device", a.device, "--dtype", "bf16", "--batch", str(b), "--runs", str(max(a.runs, 5))]
        r.cmd(f"transformer {a.size}px bf16 b{b} candle", [bench, "transformer", "--dir", tdir, "--inputs", inp(latent), *common], need=20)
        r.cmd(f"transformer {a.size}px bf16 b{b} diffusers", [py, os.path.join(HERE, "torch_bench.py"), "transformer", "--dir", tdir, "--inputs", inp(latent), *common], need=20)
    for b in [int(x) for x in a.batches.split(",")]:
        common = ["--device", a.device, "--dtype", "bf16", "--batch", str(b), "--runs", str(a.runs), "--size", str(a.size), "--steps", "4"]
        r.cmd(f"render {a.size}px 4 steps bf16 b{b} T5 excluded candle", [bench, "render", "--model", xl, *common], need=30)
        r.cmd(f"render {a.size}px 4 steps bf16 b{b} T5 excluded diffusers", [py, os.path.join(HERE, "torch_bench.py"), "render", "--model", xl, *common], need=30)
    common = ["--device", a.device, "--dtype", "bf16", "--batch", "1", "--runs", str(max(a.runs, 5))]
    r.cmd(f"transformer {a.size}px bf16 b1 candle + ControlNet 13", [bench, "transformer", "--dir", tdir, "--inputs", inp(latent), "--controlnet", os.path.join(xl, "controlnet"), *common], need=20)
    r.cmd(f"render {a.size}px 4 steps bf16 b1 T5 excluded candle + ControlNet 13",
          [bench, "render", "--model", xl, "--controlnet", os.path.join(xl, "controlnet"), "--size", str(a.size), *common[:-2], "--runs", str(a.runs)], need=30)

    # 6. T5 at its real size, if there is time (making it writes 9.5 GB)
    if r.left() > 150:
        r.cmd("make T5 v1.1 XXL", [py, os.path.join(HERE, "make_models.py"), "--out", xl, "--device", a.device, "--t5", "xxl", "--only-t5"], need=60)
        common = ["--device", a.device, "--dtype", "bf16", "--batch", "1", "--runs", str(a.runs), "--size", str(a.size), "--steps", "4", "--text-encoder"]
        r.cmd(f"render {a.size}px 4 steps bf16 b1 T5-XXL included candle", [bench, "render", "--model", xl, *common], need=40)
        r.cmd(f"render {a.size}px 4 steps bf16 b1 T5-XXL included diffusers", [py, os.path.join(HERE, "torch_bench.py"), "render", "--model", xl, *common], need=40)
    else:
        r.record({"step": "T5 XXL", "skipped": f"budget: {r.left():.0f} s left"})
    return finish(r)


def finish(r):
    """OUT/summary.md: one line a measurement, candle beside diffusers."""
    lines = ["| step | median s | min s | images/s | peak GPU MiB | rel err / note |", "|---|---|---|---|---|---|"]
    for row in r.rows:
        if row.get("step") == "machine":
            lines.insert(0, f"machine: {json.dumps({k: v for k, v in row.items() if k != 't'})}\n")
            continue
        note = row.get("error") or row.get("skipped") or ""
        if "rel_err" in row:
            note = f"{row['rel_err']:.2e} (tol {row['tol']:.0e}) {'ok' if row['ok'] else 'FAIL'}"
        fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
        lines.append(f"| {row['step']} | {fmt(row.get('median_s'))} | {fmt(row.get('min_s'))} | "
                     f"{fmt(row.get('images_per_s'))} | {fmt(row.get('peak_gpu_mib'))} | {note[:200]} |")
    lines.append(f"\n{r.failed} failed checks or steps; {time.time() - START:.0f} s in all.")
    with open(os.path.join(r.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
