#!/usr/bin/env python3
"""PyTorch side of the ControlNet adapter cost benchmark (see pixart/examples/bench_controlnet.rs, BENCHMARKS.md).

    python3 bench/controlnet_torch.py make --dir target/bench/cn      # random weights + inputs, once (3.6 GB)
    python3 bench/controlnet_torch.py run  --dir target/bench/cn --runs 3 --threads 2 [--latent 32]

`make` writes `DIR/base` (a diffusers transformer at the real PixArt-XL-2-1024-MS config, seeded random
weights), `DIR/adapter` (a 13-block diffusers-community ControlNet adapter in the same key layout, random
weights, before_proj/after_proj non-zero) and `DIR/inputs_<latent>.safetensors` (the conformance input names,
120 valid text tokens, t = 999, micro-conditions, `controlnet_cond`).

`run` times, in the same process, one base forward (diffusers `PixArtTransformer2DModel`) and one controlled
forward per run after a warm-up each, f32 on the CPU. The controlled forward is the research-project
`PixArtControlNetTransformerModel` loop (diffusers `examples/research_projects/pixart`), written out here with
the same diffusers modules so the script does not depend on that unpackaged file. It writes the outputs to
`torch_out_<latent>.safetensors` (`base`, `controlled`) so the candle run can check it computed the same thing.
"""

import argparse
import json
import os
import statistics
import time

import torch
from safetensors.torch import load_file, save_file

XL = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    cross_attention_dim=1152,
    sample_size=128,
    patch_size=2,
    caption_channels=4096,
)
ADAPTER_LAYERS = 13


class Adapter(torch.nn.Module):
    """Same parameter names as `PixArtControlNetAdapterModel` (controlnet_blocks.{k}.{before_proj,
    transformer_block,after_proj})."""

    def __init__(self, layers):
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        d = XL["num_attention_heads"] * XL["attention_head_dim"]
        blocks = []
        for k in range(layers):
            m = torch.nn.Module()
            if k == 0:
                m.before_proj = torch.nn.Linear(d, d)
            m.transformer_block = BasicTransformerBlock(
                d,
                XL["num_attention_heads"],
                XL["attention_head_dim"],
                cross_attention_dim=XL["cross_attention_dim"],
                activation_fn="gelu-approximate",
                num_embeds_ada_norm=1000,
                attention_bias=True,
                norm_type="ada_norm_single",
                norm_elementwise_affine=False,
                norm_eps=1e-6,
            )
            m.after_proj = torch.nn.Linear(d, d)
            blocks.append(m)
        self.controlnet_blocks = torch.nn.ModuleList(blocks)


def make(args):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    base = PixArtTransformer2DModel(**XL)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if n.endswith("scale_shift_table"):
                p.normal_(0.0, 0.1)
    base.save_pretrained(os.path.join(args.dir, "base"), safe_serialization=True)
    adapter = Adapter(ADAPTER_LAYERS)
    with torch.no_grad():
        for n, p in adapter.named_parameters():
            if n.endswith("scale_shift_table"):
                p.normal_(0.0, 0.1)
            elif "_proj" in n:
                p.normal_(0.0, 0.01)
    os.makedirs(os.path.join(args.dir, "adapter"), exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in adapter.state_dict().items()},
        os.path.join(args.dir, "adapter", "diffusion_pytorch_model.safetensors"),
    )
    with open(os.path.join(args.dir, "adapter", "config.json"), "w") as f:
        json.dump({"_class_name": "PixArtControlNetAdapterModel", "num_layers": ADAPTER_LAYERS}, f)
    for latent in (32,):
        g = torch.Generator().manual_seed(latent)
        inputs = {
            "hidden_states": torch.randn((1, 4, latent, latent), generator=g),
            "controlnet_cond": torch.randn((1, 4, latent, latent), generator=g),
            "timestep": torch.tensor([999.0]),
            "encoder_hidden_states": torch.randn((1, 120, 4096), generator=g),
            "encoder_attention_mask": torch.ones((1, 120)),
            "resolution": torch.tensor([[latent * 8.0, latent * 8.0]]),
            "aspect_ratio": torch.tensor([[1.0]]),
        }
        save_file(inputs, os.path.join(args.dir, f"inputs_{latent}.safetensors"))
    print(f"wrote {args.dir}")


def controlled(base, adapter, x, cond, t, y, mask, added):
    """`PixArtControlNetTransformerModel.forward` (research project), scale 1."""
    bias = ((1 - mask.to(x.dtype)) * -10000.0).unsqueeze(1)
    b = x.shape[0]
    p = base.config.patch_size
    h, w = x.shape[-2] // p, x.shape[-1] // p
    hs = base.pos_embed(x)
    t0, emb = base.adaln_single(t, added, batch_size=b, hidden_dtype=hs.dtype)
    y = base.caption_projection(y).view(b, -1, hs.shape[-1])
    c = base.pos_embed(cond)
    n = len(adapter.controlnet_blocks)
    kw = dict(encoder_hidden_states=y, encoder_attention_mask=bias, timestep=t0)
    for i, block in enumerate(base.transformer_blocks):
        if 0 < i <= n:
            a = adapter.controlnet_blocks[i - 1]
            if i == 1:
                c = hs + a.before_proj(c)
            c = a.transformer_block(c, **kw)
            hs = hs + a.after_proj(c)
        hs = block(hs, **kw)
    shift, scale = (base.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)
    hs = base.norm_out(hs) * (1 + scale) + shift
    hs = base.proj_out(hs).reshape(-1, h, w, p, p, base.out_channels)
    hs = torch.einsum("nhwpqc->nchpwq", hs)
    return hs.reshape(-1, base.out_channels, h * p, w * p)


def timed(fn, runs):
    out = fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def run(args):
    from diffusers import PixArtTransformer2DModel

    torch.set_num_threads(args.threads)
    base = PixArtTransformer2DModel.from_pretrained(os.path.join(args.dir, "base"), torch_dtype=torch.float32).eval()
    adapter = Adapter(ADAPTER_LAYERS)
    adapter.load_state_dict(load_file(os.path.join(args.dir, "adapter", "diffusion_pytorch_model.safetensors")))
    adapter.eval()
    inp = load_file(os.path.join(args.dir, f"inputs_{args.latent}.safetensors"))
    added = {"resolution": inp["resolution"], "aspect_ratio": inp["aspect_ratio"]}
    x, t, y, mask = inp["hidden_states"], inp["timestep"], inp["encoder_hidden_states"], inp["encoder_attention_mask"]
    with torch.inference_mode():
        out_b, tb = timed(
            lambda: base(x, encoder_hidden_states=y, timestep=t, added_cond_kwargs=added, encoder_attention_mask=mask).sample,
            args.runs,
        )
        out_c, tc = timed(lambda: controlled(base, adapter, x, inp["controlnet_cond"], t, y, mask, added), args.runs)
    save_file(
        {"base": out_b.contiguous(), "controlled": out_c.contiguous()},
        os.path.join(args.dir, f"torch_out_{args.latent}.safetensors"),
    )
    res = {
        "impl": "pytorch",
        "torch": torch.__version__,
        "threads": args.threads,
        "latent": args.latent,
        "base_s": {"min": min(tb), "median": statistics.median(tb), "all": tb},
        "controlled_s": {"min": min(tc), "median": statistics.median(tc), "all": tc},
        "ratio_median": statistics.median(tc) / statistics.median(tb),
    }
    print(json.dumps(res))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["make", "run"])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latent", type=int, default=32)
    args = ap.parse_args()
    make(args) if args.mode == "make" else run(args)


if __name__ == "__main__":
    main()
