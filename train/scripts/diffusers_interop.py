"""Does the trained checkpoint load and sample the same in diffusers as in the farm?

Loads MODEL (a `pixart-train all` model directory) in diffusers' PixArtAlphaPipeline with LCMScheduler, runs
4 LCM steps for a few prompts from fixed initial latents and fixed between-step noise (diffusers' LCM step
draws its noise from `randn_tensor`, which is replaced here by the stored noise, as the conformance
harness passes it in), decodes, and writes everything the Rust side needs. Then runs the farm's
conformance harness (`t5`, `lcm`, `vae-decode` modes) on the same token ids, initial latents and noise,
and prints the differences: T5 features, final latents, and the decoded 8-bit images.

    python3 -m venv venv && venv/bin/pip install torch diffusers transformers safetensors numpy sentencepiece protobuf
    venv/bin/python train/scripts/diffusers_interop.py runs/toy/model

Not part of CI (needs PyTorch and diffusers).
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MODEL = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "runs/toy/model")
PROMPTS = [
    "a small red circle in the top left corner on a blue background",
    "big green square, bottom-right, white backdrop",
    "a yellow background with a large blue triangle in the middle",
]
STEPS = 4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    import diffusers.schedulers.scheduling_lcm as lcm_module
    from diffusers import LCMScheduler, PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    pipe.scheduler = LCMScheduler.from_pretrained(MODEL, subfolder="scheduler")
    tok, t5 = pipe.tokenizer, pipe.text_encoder
    c = pipe.transformer.config.in_channels
    side = pipe.transformer.config.sample_size
    b = len(PROMPTS)

    # Prompt features exactly as the pipeline computes them (lower-cased like the farm does).
    enc = tok([p.lower() for p in PROMPTS], padding="max_length", max_length=120, truncation=True,
              add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        feats = t5(enc.input_ids, attention_mask=enc.attention_mask)[0]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((b, c, side, side), generator=g)
    noise = torch.randn((STEPS - 1, b, c, side, side), generator=g)

    calls = {"i": 0}

    def fixed_noise(shape, generator=None, device=None, dtype=None, layout=None):
        n = noise[calls["i"]]
        calls["i"] += 1
        assert tuple(n.shape) == tuple(shape), (n.shape, shape)
        return n.clone()

    lcm_module.randn_tensor = fixed_noise
    with torch.no_grad():
        out = pipe(prompt_embeds=feats, prompt_attention_mask=enc.attention_mask, negative_prompt=None,
                   num_inference_steps=STEPS, guidance_scale=0.0, latents=latents.clone(),
                   output_type="latent", height=side * 8, width=side * 8, use_resolution_binning=False).images
        image = pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample
    ref_latents = out

    tmp = tempfile.mkdtemp()
    save_file({"input_ids": enc.input_ids.to(torch.int64).contiguous(),
               "attention_mask": enc.attention_mask.to(torch.int64).contiguous()}, f"{tmp}/t5_in.safetensors")
    run = lambda *a: subprocess.run(["cargo", "run", "-q", "--release", "-p", "pixart", "--example", "conformance", "--", *a],
                                    cwd=ROOT, check=True)
    run("t5", "--text-encoder", f"{MODEL}/text_encoder", "--inputs", f"{tmp}/t5_in.safetensors", "--out", f"{tmp}/t5_out.safetensors")
    ours_t5 = load_file(f"{tmp}/t5_out.safetensors")["last_hidden_state"]
    m = enc.attention_mask.bool()
    t5_diff = (ours_t5[m] - feats[m]).abs().max().item()

    save_file({"latents": latents.contiguous(), "encoder_hidden_states": ours_t5.contiguous(),
               "encoder_attention_mask": enc.attention_mask.float().contiguous(),
               "num_inference_steps": torch.tensor([float(STEPS)]), "noise": noise.contiguous()},
              f"{tmp}/lcm_in.safetensors")
    run("lcm", "--model", f"{MODEL}/transformer", "--scheduler", f"{MODEL}/scheduler", "--inputs", f"{tmp}/lcm_in.safetensors",
        "--out", f"{tmp}/lcm_out.safetensors")
    ours = load_file(f"{tmp}/lcm_out.safetensors")["latents"]
    lat_diff = (ours - ref_latents).abs().max().item()
    save_file({"latents": ours.contiguous()}, f"{tmp}/dec_in.safetensors")
    run("vae-decode", "--vae", f"{MODEL}/vae", "--inputs", f"{tmp}/dec_in.safetensors", "--out", f"{tmp}/dec_out.safetensors")
    ours_img = load_file(f"{tmp}/dec_out.safetensors")["sample"]
    to8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round()
    img_diff = (to8(ours_img) - to8(image)).abs().max().item()
    report = {"prompts": PROMPTS, "steps": STEPS, "t5_max_abs_diff": t5_diff,
              "final_latents_max_abs_diff": lat_diff, "image_max_8bit_levels": img_diff,
              "latent_scale": ref_latents.abs().max().item()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
