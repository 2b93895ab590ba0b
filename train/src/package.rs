//! A trained model as one diffusers directory: `model_index.json`, the LCM `scheduler/`, and the stages'
//! `transformer/`, `vae/`, `tokenizer/`, `text_encoder/` (and `controlnet/`) copied in, so the farm
//! (`pixart::pipeline::Pipeline`) and diffusers' `PixArtAlphaPipeline` load it as they load PixArt-LCM.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::{Error, Result};

/// Where each part comes from.
#[derive(Debug, Clone)]
pub struct Parts {
    pub out: PathBuf,
    /// A `transformer/` directory.
    pub transformer: PathBuf,
    /// A `vae/` directory.
    pub vae: PathBuf,
    /// A directory holding `tokenizer/` and `text_encoder/`.
    pub text: PathBuf,
    /// A `controlnet/` directory.
    pub controlnet: Option<PathBuf>,
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        if entry.file_type().map_err(io(from))?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).map_err(io(&entry.path()))?;
        }
    }
    Ok(())
}

/// PixArt-LCM's scheduler config (diffusers `LCMScheduler`), with the schedule the stages trained on.
pub fn scheduler_config() -> serde_json::Value {
    json!({
        "_class_name": "LCMScheduler",
        "_diffusers_version": "0.30.0",
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "clip_sample": false,
        "clip_sample_range": 1.0,
        "dynamic_thresholding_ratio": 0.995,
        "num_train_timesteps": 1000,
        "original_inference_steps": 50,
        "prediction_type": "epsilon",
        "rescale_betas_zero_snr": false,
        "sample_max_value": 1.0,
        "set_alpha_to_one": true,
        "steps_offset": 0,
        "thresholding": false,
        "timestep_scaling": 10.0,
        "timestep_spacing": "leading",
        "trained_betas": null
    })
}

/// Writes the model directory.
pub fn write(parts: &Parts) -> Result<()> {
    let out = &parts.out;
    for (from, name) in [
        (parts.transformer.clone(), "transformer"),
        (parts.vae.clone(), "vae"),
        (parts.text.join("tokenizer"), "tokenizer"),
        (parts.text.join("text_encoder"), "text_encoder"),
    ] {
        if !from.join("config.json").exists() && name != "tokenizer" {
            return Err(Error::ModelDir {
                path: from.join("config.json"),
                message: format!("missing: not a {name} directory"),
            });
        }
        copy_dir(&from, &out.join(name))?;
    }
    if let Some(c) = &parts.controlnet {
        copy_dir(c, &out.join("controlnet"))?;
    }
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("JSON") + "\n";
    let write = |path: PathBuf, text: String| {
        std::fs::write(&path, text).map_err(|source| Error::Io { path, source })
    };
    std::fs::create_dir_all(out.join("scheduler")).map_err(|source| Error::Io {
        path: out.join("scheduler"),
        source,
    })?;
    write(
        out.join("scheduler/scheduler_config.json"),
        pretty(&scheduler_config()),
    )?;
    let index = json!({
        "_class_name": "PixArtAlphaPipeline",
        "_diffusers_version": "0.30.0",
        "scheduler": ["diffusers", "LCMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    });
    write(out.join("model_index.json"), pretty(&index))
}
