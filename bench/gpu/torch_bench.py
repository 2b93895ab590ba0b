#!/usr/bin/env python3
"""The diffusers/PyTorch half of the GPU benchmark: the same measurements as
`pixart/examples/bench_gpu.rs`, same model directory, same inputs, printed as one JSON line.

    python3 bench/gpu/torch_bench.py transformer --dir XL/transformer --inputs XL/transformer/inputs_128.safetensors \
        --dtype bf16 --batch 8 --runs 5 [--out sample.safetensors]
    python3 bench/gpu/torch_bench.py render --model XL --dtype bf16 --size 1024 --batch 1 --steps 4 --runs 3 [--text-encoder]

`render` runs diffusers' PixArtAlphaPipeline with LCMScheduler, guidance 0 (PixArt-LCM), output_type="pil",
VAE decode included. Without --text-encoder it is given random prompt embeddings (T5 excluded), as the
candle side is. Note: diffusers runs the VAE in the pipeline dtype (bf16), candle in f32.
"""

import argparse
import json
import statistics
import time

import torch
from safetensors.torch import load_file, save_file

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stats(times):
    return (min(times), statistics.median(times)) if times else (float("nan"), float("nan"))


def peak_mib(device):
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def transformer(a):
    from diffusers import PixArtTransformer2DModel

    dt = DTYPES[a.dtype]
    t0 = time.time()
    model = PixArtTransformer2DModel.from_pretrained(a.dir, torch_dtype=dt).to(a.device).eval()
    load_s = time.time() - t0
    raw = load_file(a.inputs)
    b = a.batch
    rep = lambda t: t.repeat(b, *([1] * (t.dim() - 1))).to(a.device)  # noqa: E731
    x = rep(raw["hidden_states"]).to(dt)
    kw = dict(
        encoder_hidden_states=rep(raw["encoder_hidden_states"]).to(dt),
        encoder_attention_mask=rep(raw["encoder_attention_mask"]),
        timestep=raw["timestep"].to(a.device).expand(b),
        added_cond_kwargs={"resolution": rep(raw["resolution"]).to(dt), "aspect_ratio": rep(raw["aspect_ratio"]).to(dt)},
        return_dict=False,
    )
    with torch.inference_mode():
        first = model(x, **kw)[0]
        sync(a.device)
        times = []
        for _ in range(a.runs):
            t = time.time()
            model(x, **kw)
            sync(a.device)
            times.append(time.time() - t)
    if a.out:
        save_file({"sample": first.float().cpu().contiguous()}, a.out)
    mn, med = stats(times)
    print(json.dumps({
        "impl": "diffusers", "what": "transformer", "device": a.device, "dtype": a.dtype, "batch": b,
        "latent": x.shape[-1], "load_s": load_s, "runs": len(times), "min_s": mn, "median_s": med,
        "times_s": times, "torch_peak_alloc_mib": peak_mib(a.device),
        "attn_processor": type(model.transformer_blocks[0].attn1.processor).__name__,
    }))


def render(a):
    from diffusers import AutoencoderKL, LCMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5EncoderModel, T5Tokenizer

    dt = DTYPES[a.dtype]
    t0 = time.time()
    tr = PixArtTransformer2DModel.from_pretrained(f"{a.model}/transformer", torch_dtype=dt)
    vae = AutoencoderKL.from_pretrained(f"{a.model}/vae", torch_dtype=dt)
    sched = LCMScheduler.from_pretrained(f"{a.model}/scheduler")
    tok = T5Tokenizer.from_pretrained(f"{a.model}/tokenizer")
    te = T5EncoderModel.from_pretrained(f"{a.model}/text_encoder", torch_dtype=dt) if a.text_encoder else None
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr, scheduler=sched).to(a.device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.time() - t0
    b = a.batch
    prompts = [f"a small red circle in the top left corner on a blue background {i}" for i in range(b)]

    def once():
        g = torch.Generator(a.device).manual_seed(0)
        kw = dict(num_inference_steps=a.steps, guidance_scale=0.0, height=a.size, width=a.size,
                  generator=g, output_type="pil", use_resolution_binning=False)
        if a.text_encoder:
            out = pipe(prompt=prompts, **kw)
        else:
            emb = torch.randn((b, 120, tr.config.caption_channels), device=a.device, dtype=dt)
            mask = torch.ones((b, 120), device=a.device, dtype=torch.long)
            out = pipe(prompt=None, prompt_embeds=emb, prompt_attention_mask=mask, **kw)
        assert len(out.images) == b
        sync(a.device)

    with torch.inference_mode():
        once()
        times = []
        for _ in range(a.runs):
            t = time.time()
            once()
            times.append(time.time() - t)
    mn, med = stats(times)
    print(json.dumps({
        "impl": "diffusers", "what": "render", "device": a.device, "dtype": a.dtype, "batch": b, "size": a.size,
        "steps": a.steps, "text_encoder": a.text_encoder, "load_s": load_s, "runs": len(times), "min_s": mn,
        "median_s": med, "images_per_s": b / med, "times_s": times, "torch_peak_alloc_mib": peak_mib(a.device),
    }))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    for name in ("transformer", "render"):
        p = sub.add_parser(name)
        p.add_argument("--device", default="cuda")
        p.add_argument("--dtype", default="bf16", choices=DTYPES)
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--runs", type=int, default=5)
        if name == "transformer":
            p.add_argument("--dir", required=True)
            p.add_argument("--inputs", required=True)
            p.add_argument("--out")
        else:
            p.add_argument("--model", required=True)
            p.add_argument("--size", type=int, default=1024)
            p.add_argument("--steps", type=int, default=4)
            p.add_argument("--text-encoder", action="store_true")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # f32 means f32 on both sides
    {"transformer": transformer, "render": render}[a.mode](a)


if __name__ == "__main__":
    main()
