#!/usr/bin/env python3
"""Real-shape PixArt-LCM-XL-2-1024 checkpoints with seeded random weights, made on the GPU machine
(nothing of 2.4 GB travels): the model directory that both candle and diffusers load in
bench/gpu/run.py.

    python3 bench/gpu/make_models.py --out /tmp/xl [--t5 xxl] [--controlnet-layers 13] [--device cuda]

Writes OUT/{model_index.json, transformer/, vae/, scheduler/, tokenizer/, controlnet/, text_encoder/?}
and OUT/transformer/inputs_{32,128}.safetensors (the conformance input names, batch 1, 120 tokens).
The transformer is the hub's PixArt-LCM-XL-2-1024-MS config (611 M parameters, f32 on disk); the VAE is
the SD AutoencoderKL PixArt uses; `--t5 xxl` adds a T5 v1.1 XXL encoder (4.76 B parameters, bf16 on
disk, 9.5 GB) so the text encoder can be timed at its real size. The tokenizer is the bundled tiny
checkpoint's (its ids are valid rows of any T5 vocabulary). Random weights give noise images, which is
all a timing or a numerical comparison needs.
"""

import argparse
import json
import os
import shutil
import time

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "models", "tiny-pixart-lcm")


def transformer(out, device):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
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
            norm_type="ada_norm_single",
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            attention_bias=True,
        )
        with torch.no_grad():  # diffusers zero-inits the gates and tables; give them signal
            for name, p in model.named_parameters():
                if name.endswith("scale_shift_table"):
                    p.normal_(0.0, 0.1)
    model.save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
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
        save_file(inputs, os.path.join(out, "transformer", f"inputs_{latent}.safetensors"))
    return model


def controlnet(out, base, layers):
    """Adapter blocks with the base block's names and shapes, as in models/make_tiny.py."""
    inner = base.config.num_attention_heads * base.config.attention_head_dim
    block = base.transformer_blocks[0].state_dict()
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for k in range(layers):
        pre = f"controlnet_blocks.{k}."
        for name, t in block.items():
            tensors[pre + "transformer_block." + name] = torch.randn(t.shape, generator=g) * (0.02 if t.dim() > 1 else 0.01)
        for proj in (["before_proj", "after_proj"] if k == 0 else ["after_proj"]):
            tensors[pre + proj + ".weight"] = torch.randn((inner, inner), generator=g) * 0.02
            tensors[pre + proj + ".bias"] = torch.zeros((inner,))
    d = os.path.join(out, "controlnet")
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"_class_name": "PixArtControlNetAdapterModel", "num_layers": layers}, f)


def vae(out, device):
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    with torch.device(device):
        model = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512],
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        )
    model.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)


def t5(out, device, size):
    from transformers import T5Config, T5EncoderModel

    if size == "xxl":
        cfg = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
    else:  # the encoder's shape at d_model 4096 with one layer: loads fast, never timed as "T5"
        cfg = dict(d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=64)
    config = T5Config(
        vocab_size=32128,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new",
        is_gated_act=True,
        tie_word_embeddings=False,
        layer_norm_epsilon=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
        **cfg,
    )
    torch.manual_seed(3)
    with torch.device(device):
        model = T5EncoderModel(config).to(torch.bfloat16)
    model.save_pretrained(os.path.join(out, "text_encoder"), safe_serialization=True, max_shard_size="20GB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--t5", choices=["xxl", "small"], default="small")
    ap.add_argument("--controlnet-layers", type=int, default=13)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only-t5", action="store_true", help="(re)write text_encoder/ only")
    a = ap.parse_args()
    t0 = time.time()
    os.makedirs(a.out, exist_ok=True)
    if a.only_t5:
        shutil.rmtree(os.path.join(a.out, "text_encoder"), ignore_errors=True)
        t5(a.out, a.device, a.t5)
        print(json.dumps({"made": "text_encoder", "t5": a.t5, "s": round(time.time() - t0, 1)}))
        return
    base = transformer(a.out, a.device)
    if a.controlnet_layers > 0:
        controlnet(a.out, base, a.controlnet_layers)
    del base
    vae(a.out, a.device)
    t5(a.out, a.device, a.t5)
    shutil.copytree(os.path.join(TINY, "tokenizer"), os.path.join(a.out, "tokenizer"), dirs_exist_ok=True)
    shutil.copytree(os.path.join(TINY, "scheduler"), os.path.join(a.out, "scheduler"), dirs_exist_ok=True)
    with open(os.path.join(TINY, "model_index.json")) as f:
        index = json.load(f)
    with open(os.path.join(a.out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    print(json.dumps({"made": a.out, "t5": a.t5, "s": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
