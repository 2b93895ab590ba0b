#!/usr/bin/env python3
"""Generate `models/tiny-pixart-lcm/`: a tiny, randomly initialised PixArt-LCM checkpoint in the
full diffusers layout, for `pixfarm dev`, the farm tests and the pipeline golden tests.

It is *not* a useful image model (random weights draw noise-like pictures); it exercises every
code path of a real checkpoint at a size that renders 64x64 in milliseconds on a CPU:

* transformer: PixArtTransformer2DModel, 2 layers, 3 heads x 8 (inner 24), caption 32,
  sample_size 8 -> no micro-conditions, no aspect-ratio table (renders the requested size exactly);
  like the hub config, `interpolation_scale` / `use_additional_conditions` are left out.
* text encoder: T5EncoderModel (T5-v1.1 style: gated-gelu, no tied head), d_model 32, 2 layers,
  saved by transformers 5 (only `shared.weight`, no `encoder.embed_tokens.weight`).
* tokenizer: a 200-piece sentencepiece unigram model (`spiece.model`, T5 ids: pad 0, eos 1, unk 2,
  + 100 <extra_id_*>), converted to `tokenizer.json` with T5TokenizerFast - the same conversion a
  user runs on the real checkpoint.
* vae: AutoencoderKL with 4 levels (downscale 8) of 8/8/16/16 channels, scaling_factor 0.18215.
* scheduler: the PixArt-LCM scheduler_config.json (linear betas 1e-4..0.02, 50 original steps).
* controlnet: a ControlNet-Transformer adapter in the diffusers-community layout
  (`PixArtControlNetAdapterModel`: `config.json` with `num_layers` + safetensors with
  `controlnet_blocks.{k}.transformer_block.*`, `before_proj`, `after_proj`), 1 copy of a base block
  (the tiny transformer has 2), every weight random and non-zero so control visibly changes images.

Deterministic: seeded torch / sentencepiece. Run from the repository root:

    python3 models/make_tiny.py                   # writes models/tiny-pixart-lcm/
    python3 models/make_tiny.py --controlnet-only # (re)writes only models/tiny-pixart-lcm/controlnet/
"""
import json
import os
import random
import shutil
import sys
import tempfile

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny-pixart-lcm")

WORDS = (
    "a an the of in on with and at by from under over near red green blue yellow black white orange purple "
    "pink golden silver small large tiny huge old young happy quiet bright dark foggy sunny rainy snowy "
    "cat dog fox owl horse bird fish dragon robot castle city street forest river mountain lake ocean beach "
    "desert garden house tower bridge car boat train ship flower tree rose leaf cloud star moon sun sky "
    "portrait painting photo photograph drawing sketch render illustration watercolor oil digital art style "
    "highly detailed cinematic lighting sunset sunrise night morning evening winter summer autumn spring "
    "sitting standing running flying swimming sleeping reading playing wearing holding looking "
    "hat coat scarf glasses crown sword book cup table chair window door wall floor road path field "
    "astronaut knight wizard princess chef farmer pilot sailor child woman man girl boy people crowd "
    "futuristic ancient medieval modern vintage retro abstract realistic minimal colorful neon pastel"
).split()


def corpus(n=3000, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.randint(3, 14)
        line = " ".join(rng.choice(WORDS) for _ in range(k))
        if rng.random() < 0.3:
            line += rng.choice([",", ".", "!", "?", " 4k", " 8k", " 1024px", " (masterpiece)"])
        lines.append(line)
    return lines


def make_tokenizer(out_dir):
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "corpus.txt")
        with open(text, "w") as f:
            f.write("\n".join(corpus()))
        spm.SentencePieceTrainer.train(
            input=text,
            model_prefix=os.path.join(tmp, "spiece"),
            vocab_size=200,
            model_type="unigram",
            character_coverage=1.0,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            pad_piece="<pad>",
            eos_piece="</s>",
            unk_piece="<unk>",
            num_threads=1,
            seed_sentencepiece_size=5000,
            minloglevel=2,
            normalization_rule_name="identity",  # keeps the files tiny (no NFKC charsmap)
        )
        shutil.copy(os.path.join(tmp, "spiece.model"), os.path.join(out_dir, "spiece.model"))
    # The conversion the crate docs tell users to run on the real checkpoint.
    tok = T5TokenizerFast.from_pretrained(out_dir, model_max_length=120)
    tok.save_pretrained(out_dir)
    import sentencepiece as spm2

    sp = spm2.SentencePieceProcessor(model_file=os.path.join(out_dir, "spiece.model"))
    probe = "a red fox in the snow, highly detailed"
    assert tok(probe).input_ids == sp.encode(probe) + [1], "tokenizer.json disagrees with spiece.model"
    return tok


def main():
    from diffusers import AutoencoderKL, LCMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    tok = make_tokenizer(os.path.join(OUT, "tokenizer"))

    torch.manual_seed(0)
    t5_cfg = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
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
    )
    text_encoder = T5EncoderModel(t5_cfg).eval()
    with torch.no_grad():  # random init of T5 is tiny-valued; widen it so tests see real signal
        for p in text_encoder.parameters():
            p.normal_(0.0, 0.3)
        for name, p in text_encoder.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)

    transformer = PixArtTransformer2DModel(
        num_attention_heads=3,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=24,
        caption_channels=32,
        sample_size=8,
        patch_size=2,
        norm_type="ada_norm_single",
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        attention_bias=True,
    ).eval()
    with torch.no_grad():  # diffusers zero-inits some layers; give every weight a value
        for name, p in transformer.named_parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 0.05)

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    ).eval()

    scheduler = LCMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        original_inference_steps=50,
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_scaling=10.0,
    )

    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(OUT, safe_serialization=True)

    # Like the hub's PixArt-LCM transformer config: no interpolation_scale / use_additional_conditions
    # keys (the loader derives them from sample_size).
    cfg_path = os.path.join(OUT, "transformer", "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for k in ("interpolation_scale", "use_additional_conditions"):
        if cfg.get(k) is None:
            cfg.pop(k, None)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")

    make_controlnet()

    total = 0
    for root, _, files in os.walk(OUT):
        for name in files:
            total += os.path.getsize(os.path.join(root, name))
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)", file=sys.stderr)


def make_controlnet(num_layers=1, seed=1):
    """The adapter's block copies have exactly the base block's parameter names and shapes
    (diffusers' research-project `PixArtControlNetAdapterBlock` wraps a `BasicTransformerBlock`
    built from the base config); `before_proj` exists on block 0 only."""
    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import save_file

    base = PixArtTransformer2DModel.from_pretrained(os.path.join(OUT, "transformer"))
    inner = base.config.num_attention_heads * base.config.attention_head_dim
    assert num_layers < base.config.num_layers, "adapter block k feeds base block k+1"
    block = base.transformer_blocks[0].state_dict()
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for k in range(num_layers):
        pre = f"controlnet_blocks.{k}."
        for name, t in block.items():
            std = 0.2 if t.dim() > 1 else 0.05
            tensors[pre + "transformer_block." + name] = torch.randn(t.shape, generator=g) * std
        projs = ["before_proj", "after_proj"] if k == 0 else ["after_proj"]
        for proj in projs:
            tensors[pre + proj + ".weight"] = torch.randn((inner, inner), generator=g) * 0.2
            tensors[pre + proj + ".bias"] = torch.randn((inner,), generator=g) * 0.05
    out = os.path.join(OUT, "controlnet")
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"_class_name": "PixArtControlNetAdapterModel", "num_layers": num_layers}, f, indent=2)
        f.write("\n")
    print(f"wrote {out} ({len(tensors)} tensors)", file=sys.stderr)


if __name__ == "__main__":
    if "--controlnet-only" in sys.argv[1:]:
        make_controlnet()
    else:
        main()
