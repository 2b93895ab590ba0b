//! The whole pipeline from token ids to latents (and to the image) vs diffusers'
//! `PixArtAlphaPipeline` + `LCMScheduler` on the bundled tiny checkpoint, guidance 0, latents
//! passed in and the LCM noise replaced by recorded tensors (fixtures: `fixtures/pipeline/gen.py`).
//! Plus the render API's promises: seeds, batch independence, cancellation, validation.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use pixart::pipeline::{
    Control, ModelSource, Pipeline, PipelineOptions, RenderItem, RenderRequest, conformance,
};
use pixart::scheduler::LcmSchedulerConfig;

mod common;
use common::{fixtures, model_dir, rel_err};

fn tiny() -> Result<Pipeline> {
    Ok(Pipeline::load(
        &ModelSource::Dir(model_dir()),
        PipelineOptions::default(),
    )?)
}

#[derive(serde::Deserialize)]
struct Meta {
    prompts: Vec<String>,
    height: u32,
    width: u32,
}

#[test]
fn prompts_to_latents_and_image_match_diffusers() -> Result<()> {
    let t = candle_core::safetensors::load(
        fixtures("pipeline").join("pipeline.safetensors"),
        &Device::Cpu,
    )?;
    let meta: Meta = serde_json::from_str(&std::fs::read_to_string(
        fixtures("pipeline").join("pipeline_prompts.json"),
    )?)?;
    let mut pipe = tiny()?;
    assert_eq!(
        pipe.generation_size(meta.width, meta.height),
        (meta.width, meta.height),
        "tiny model: no binning"
    );

    let prompts: Vec<&str> = meta.prompts.iter().map(String::as_str).collect();
    let ids = pipe.tokenize(&prompts)?;
    let (y, mask) = pipe.encode_ids(&ids)?;
    assert_eq!(
        mask.to_vec2::<f32>()?,
        t["prompt_attention_mask"].to_vec2::<f32>()?,
        "token masks"
    );
    let y_err = rel_err(
        &y.broadcast_mul(&mask.unsqueeze(2)?)?,
        &t["prompt_embeds"].broadcast_mul(&mask.unsqueeze(2)?)?,
    )?;
    println!("prompt embeddings (valid tokens): rel err {y_err:e}");
    assert!(y_err <= 1e-3);

    for n in [1usize, 2, 4, 8] {
        let noise = t[&format!("n{n}_noise")].clone();
        let mut next = |i: usize| -> pixart::Result<Tensor> { Ok(noise.get(i)?) };
        let latents = pipe.denoise(
            &t["latents_in"],
            &y,
            &mask,
            n,
            meta.width,
            meta.height,
            &mut next,
            &mut |_| Control::Continue,
        )?;
        let err = rel_err(&latents, &t[&format!("n{n}_latents")])?;
        println!("pipeline {n} steps: final latents rel err {err:e}");
        assert!(err <= 1e-3, "{n} steps: relative error {err}");
        if n == 4 {
            let img = pipe.vae().decode(&latents)?;
            let img = ((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
            let err = rel_err(&img, &t["n4_image"])?;
            println!("pipeline 4 steps: decoded image rel err {err:e}");
            assert!(err <= 1e-3, "image relative error {err}");
        }
    }
    Ok(())
}

#[test]
fn lcm_conformance_mode_matches_diffusers() -> Result<()> {
    let t = candle_core::safetensors::load(
        fixtures("pipeline").join("pipeline.safetensors"),
        &Device::Cpu,
    )?;
    let transformer = pixart::transformer::PixArtTransformer::load(
        model_dir().join("transformer"),
        DType::F32,
        &Device::Cpu,
    )?;
    let sched = LcmSchedulerConfig::from_path(&model_dir().join("scheduler"))?;
    for n in [1usize, 4] {
        let inputs = [
            ("latents".to_string(), t["latents_in"].clone()),
            (
                "encoder_hidden_states".to_string(),
                t["prompt_embeds"].clone(),
            ),
            (
                "encoder_attention_mask".to_string(),
                t["prompt_attention_mask"].to_dtype(DType::I64)?,
            ),
            (
                "num_inference_steps".to_string(),
                Tensor::new(&[n as f32], &Device::Cpu)?,
            ),
            (
                "noise".to_string(),
                t[&format!("n{n}_noise")].narrow(0, 0, n.max(2) - 1)?,
            ),
        ]
        .into();
        let out = conformance::lcm(&transformer, &sched, Default::default(), &inputs)?;
        let err = rel_err(&out["latents"], &t[&format!("n{n}_latents")])?;
        println!(
            "lcm mode {n} steps: timesteps {:?}, rel err {err:e}",
            out["timesteps"].to_vec1::<f32>()?
        );
        assert!(err <= 1e-3);
    }
    let mut bad = std::collections::HashMap::new();
    bad.insert("latents".to_string(), t["latents_in"].clone());
    let e = conformance::lcm(&transformer, &sched, Default::default(), &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("encoder_hidden_states"), "{e}");
    Ok(())
}

fn request(items: &[(&str, u64)], width: u32, height: u32, steps: usize) -> RenderRequest {
    RenderRequest {
        width,
        height,
        steps,
        items: items
            .iter()
            .map(|&(p, s)| RenderItem {
                prompt: p.into(),
                seed: s,
                control: None,
            })
            .collect(),
    }
}

fn same(a: &image::RgbImage, b: &image::RgbImage) -> bool {
    a.dimensions() == b.dimensions() && a.as_raw() == b.as_raw()
}

/// Largest per-channel difference between two images of the same size.
fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

#[test]
fn images_depend_only_on_prompt_seed_size_steps() -> Result<()> {
    let mut pipe = tiny()?;
    let mut seen = Vec::new();
    let batch = pipe.render(
        &request(
            &[("a red fox", 7), ("a blue owl", 8), ("a red fox", 9)],
            64,
            48,
            4,
        ),
        &mut |p| {
            seen.push((p.step, p.total));
            Control::Continue
        },
    )?;
    assert_eq!(seen, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
    assert_eq!(batch.len(), 3);
    assert_eq!(batch[0].image.dimensions(), (64, 48));
    let alone = pipe.render(&request(&[("a blue owl", 8)], 64, 48, 4), &mut |_| {
        Control::Continue
    })?;
    assert!(
        !same(&batch[0].image, &batch[2].image),
        "different seeds give different images"
    );
    let again = pipe.render(&request(&[("a red fox", 7)], 64, 48, 4), &mut |_| {
        Control::Continue
    })?;
    assert!(
        same(&alone[0].image, &batch[1].image),
        "an image must not depend on its batch neighbours"
    );
    println!(
        "batch vs alone: max pixel diff {} / {}",
        max_diff(&alone[0].image, &batch[1].image),
        max_diff(&again[0].image, &batch[0].image)
    );
    // Same prompt and seed, other batch: the noise is identical by construction; the transformer
    // trims text keys to the batch's longest prompt, which may move a float rounding, so allow
    // one 8-bit step (the owl above is the longest prompt and must match exactly).
    assert!(
        max_diff(&again[0].image, &batch[0].image) <= 1,
        "same seed, same image"
    );
    let repeat = pipe.render(&request(&[("a red fox", 7)], 64, 48, 4), &mut |_| {
        Control::Continue
    })?;
    assert!(
        same(&again[0].image, &repeat[0].image),
        "same request, bit-identical image"
    );
    let other_steps = pipe.render(&request(&[("a red fox", 7)], 64, 48, 2), &mut |_| {
        Control::Continue
    })?;
    assert!(!same(&other_steps[0].image, &batch[0].image));
    Ok(())
}

#[test]
fn offloading_the_text_encoder_changes_nothing() -> Result<()> {
    let mut a = tiny()?;
    let opts = PipelineOptions {
        offload_text_encoder: true,
        ..Default::default()
    };
    let mut b = Pipeline::load(&ModelSource::Dir(model_dir()), opts)?;
    let req = request(&[("a castle at night", 3)], 32, 32, 2);
    let x = a.render(&req, &mut |_| Control::Continue)?;
    let y = b.render(&req, &mut |_| Control::Continue)?;
    let z = b.render(&req, &mut |_| Control::Continue)?;
    assert!(same(&x[0].image, &y[0].image) && same(&y[0].image, &z[0].image));
    Ok(())
}

#[test]
fn cancel_stops_the_batch() -> Result<()> {
    let mut pipe = tiny()?;
    let err = pipe.render(&request(&[("a cat", 1)], 32, 32, 4), &mut |p| {
        if p.step == 2 {
            Control::Cancel
        } else {
            Control::Continue
        }
    });
    assert!(matches!(err, Err(pixart::Error::Cancelled)), "{err:?}");
    Ok(())
}

#[test]
fn validation_names_the_field() -> Result<()> {
    let pipe = tiny()?;
    let cases = [
        (request(&[("a cat", 1)], 40, 32, 4), "width"),
        (request(&[("a cat", 1)], 32, 8, 4), "height"),
        (request(&[("a cat", 1)], 8192, 32, 4), "width"),
        (request(&[("a cat", 1)], 32, 32, 0), "steps"),
        (request(&[("a cat", 1)], 32, 32, 9), "steps"),
        (request(&[("  ", 1)], 32, 32, 4), "prompt"),
        (request(&[], 32, 32, 4), "items"),
    ];
    for (req, field) in cases {
        let e = pipe.validate(&req).unwrap_err().to_string();
        assert!(e.contains(&format!("`{field}`")), "{field}: {e}");
    }
    pipe.validate(&request(&[("a cat", 1)], 48, 80, 8))?;
    let e = Pipeline::load(
        &ModelSource::Dir(fixtures("pipeline")),
        PipelineOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("model_index.json"), "{e}");
    let e = Pipeline::load(
        &ModelSource::Dir(model_dir()),
        PipelineOptions {
            dtype: DType::F16,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("dtype"), "{e}");
    Ok(())
}

#[test]
fn lcm_mode_with_micro_conditions_matches_diffusers() -> Result<()> {
    // The transformer fixtures' micro-condition model (sample_size 128): resolution and aspect
    // ratio must reach the transformer on every step.
    let micro = fixtures("transformer").join("micro");
    let transformer =
        pixart::transformer::PixArtTransformer::load(&micro, DType::F32, &Device::Cpu)?;
    assert!(transformer.config.use_additional_conditions);
    let sched = LcmSchedulerConfig::from_path(&model_dir().join("scheduler"))?;
    let inputs =
        conformance::load_tensors(&fixtures("pipeline").join("lcm_micro.inputs.safetensors"))?;
    let want =
        conformance::load_tensors(&fixtures("pipeline").join("lcm_micro.expected.safetensors"))?;
    let out = conformance::lcm(&transformer, &sched, Default::default(), &inputs)?;
    assert_eq!(
        out["timesteps"].to_vec1::<f32>()?,
        want["timesteps"].to_vec1::<f32>()?
    );
    let err = rel_err(&out["latents"], &want["latents"])?;
    println!("lcm mode with micro-conditions, padded mask, 4 steps: rel err {err:e}");
    assert!(err <= 1e-3, "relative error {err}");
    let mut missing = inputs.clone();
    missing.remove("aspect_ratio");
    let e = conformance::lcm(&transformer, &sched, Default::default(), &missing)
        .unwrap_err()
        .to_string();
    assert!(e.contains("aspect_ratio"), "{e}");
    Ok(())
}

#[test]
fn binned_models_render_at_the_bin_and_resize_back() -> Result<()> {
    // The tiny model with `sample_size` 32 uses diffusers' 256-px aspect-ratio table.
    let tmp = tempfile::tempdir()?;
    for part in [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "transformer",
        "vae",
    ] {
        let from = model_dir().join(part);
        if from.is_dir() {
            std::fs::create_dir_all(tmp.path().join(part))?;
            for f in std::fs::read_dir(&from)? {
                let f = f?;
                std::fs::copy(f.path(), tmp.path().join(part).join(f.file_name()))?;
            }
        } else {
            std::fs::copy(&from, tmp.path().join(part))?;
        }
    }
    let cfg_path = tmp.path().join("transformer/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
    cfg["sample_size"] = 32.into();
    std::fs::write(&cfg_path, cfg.to_string())?;
    let mut pipe = Pipeline::load(
        &ModelSource::Dir(tmp.path().to_path_buf()),
        PipelineOptions::default(),
    )?;
    assert_eq!(
        pipe.aspect_ratio_table().map(|t| t.name),
        Some("ASPECT_RATIO_256_BIN")
    );
    // diffusers: classify_height_width_bin(48, 64, ASPECT_RATIO_256_BIN) = (208, 288)
    assert_eq!(pipe.generation_size(64, 48), (288, 208));
    assert_eq!(pipe.generation_size(64, 64), (256, 256));
    let out = pipe.render(&request(&[("a fox", 1)], 64, 48, 1), &mut |_| {
        Control::Continue
    })?;
    assert_eq!(out[0].image.dimensions(), (64, 48));
    Ok(())
}
