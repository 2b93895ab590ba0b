#!/usr/bin/env python3
"""PyTorch/diffusers side of the transformer benchmark (see bench/transformer.sh and BENCHMARKS.md).

    python3 bench/transformer_torch.py make --dir target/bench/xl          # random weights + inputs, once
    python3 bench/transformer_torch.py run  --dir target/bench/xl --runs 5 --threads 2 [--latent 32]

`make` writes a diffusers `transformer/` directory (config.json + diffusion_pytorch_model.safetensors) at the
real PixArt-XL-2-1024-MS config with seeded random weights, and `inputs_<latent>.safetensors` with the
conformance input names (1x4xLxL latents, 120 valid text tokens, t = 999, micro-conditions for L*8 px).
`run` times one forward per run (after one warm-up) in f32 on the CPU and writes the output sample to
`torch_out_<latent>.safetensors` so the candle run can check it computed the same thing.
"""

import argparse
import json
import os
import statistics
import time

import torch
from safetensors.torch import load_file, save_file


def make(args):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
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
    # diffusers' default init leaves nothing at zero that matters for speed; re-draw the tables anyway.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("scale_shift_table"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(args.dir, safe_serialization=True)
    for latent in (32, 128):
        g = torch.Generator().manual_seed(latent)
        inputs = {
            "hidden_states": torch.randn((1, 4, latent, latent), generator=g),
            "timestep": torch.tensor([999.0]),
            "encoder_hidden_states": torch.randn((1, 120, 4096), generator=g),
            "encoder_attention_mask": torch.ones((1, 120)),
            "resolution": torch.tensor([[latent * 8.0, latent * 8.0]]),
            "aspect_ratio": torch.tensor([[1.0]]),
        }
        save_file(inputs, os.path.join(args.dir, f"inputs_{latent}.safetensors"))
    print(f"wrote {args.dir}")


def run(args):
    from diffusers import PixArtTransformer2DModel

    torch.set_num_threads(args.threads)
    model = PixArtTransformer2DModel.from_pretrained(args.dir, torch_dtype=torch.float32).eval()
    inp = load_file(os.path.join(args.dir, f"inputs_{args.latent}.safetensors"))
    kwargs = dict(
        encoder_hidden_states=inp["encoder_hidden_states"],
        timestep=inp["timestep"],
        added_cond_kwargs={"resolution": inp["resolution"], "aspect_ratio": inp["aspect_ratio"]},
        encoder_attention_mask=inp["encoder_attention_mask"],
    )
    times = []
    with torch.inference_mode():
        out = model(inp["hidden_states"], **kwargs).sample  # warm-up
        for _ in range(args.runs):
            t0 = time.perf_counter()
            out = model(inp["hidden_states"], **kwargs).sample
            times.append(time.perf_counter() - t0)
    save_file({"sample": out.contiguous()}, os.path.join(args.dir, f"torch_out_{args.latent}.safetensors"))
    print(
        json.dumps(
            {
                "impl": "diffusers",
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "latent": args.latent,
                "runs": len(times),
                "min_s": min(times),
                "median_s": statistics.median(times),
                "times_s": times,
            }
        )
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["make", "run"])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latent", type=int, default=32)
    args = ap.parse_args()
    make(args) if args.cmd == "make" else run(args)


if __name__ == "__main__":
    main()
