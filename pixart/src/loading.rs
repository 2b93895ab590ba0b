//! Finding and opening checkpoints in the diffusers directory layout, locally or in the Hugging
//! Face hub cache.
//!
//! A model directory looks like the hub repo `PixArt-alpha/PixArt-LCM-XL-2-1024-MS`:
//!
//! ```text
//! model_index.json
//! transformer/{config.json, diffusion_pytorch_model.safetensors}
//! text_encoder/{config.json, model.safetensors | model.safetensors.index.json + shards}
//! tokenizer/tokenizer.json          (the hub ships only spiece.model: see `text_encoder`)
//! vae/{config.json, diffusion_pytorch_model.safetensors}
//! scheduler/scheduler_config.json
//! ```
//!
//! Every error names the missing file. [`resolve`] turns a [`ModelSource`] into such a directory:
//! a local path is used as is; a hub id is looked up in the hub cache (`HF_HOME`, default
//! `~/.cache/huggingface/hub`) first, so it works offline once downloaded, and fetched over the
//! network otherwise.
//!
//! ```no_run
//! use pixart::pipeline::ModelSource;
//! let paths = pixart::loading::resolve(&ModelSource::Dir("models/tiny-pixart-lcm".into())).unwrap();
//! println!("{}", paths.transformer.display());
//! ```

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde_json::{Map, Value};

use crate::pipeline::ModelSource;
use crate::{Error, Result};

/// The hub id of the checkpoint this crate targets.
pub const DEFAULT_MODEL_ID: &str = "PixArt-alpha/PixArt-LCM-XL-2-1024-MS";

/// The component folders of one diffusers-layout model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPaths {
    pub root: PathBuf,
    pub transformer: PathBuf,
    pub text_encoder: PathBuf,
    pub tokenizer: PathBuf,
    pub vae: PathBuf,
    pub scheduler: PathBuf,
}

impl ModelPaths {
    /// Checks that `root` holds a diffusers-layout pipeline and returns its component folders.
    pub fn from_dir(root: &Path) -> Result<Self> {
        let index = root.join("model_index.json");
        if !root.is_dir() {
            return Err(missing(root, "model directory not found"));
        }
        if !index.is_file() {
            return Err(missing(
                &index,
                "not found: a diffusers-layout model directory needs model_index.json",
            ));
        }
        read_json_object(&index)?;
        let sub = |name: &str, must: &[&str]| -> Result<PathBuf> {
            let dir = root.join(name);
            if !dir.is_dir() {
                return Err(missing(&dir, "component folder not found"));
            }
            for f in must {
                let p = dir.join(f);
                if !p.is_file() {
                    return Err(missing(&p, "not found"));
                }
            }
            Ok(dir)
        };
        Ok(Self {
            root: root.to_path_buf(),
            transformer: sub("transformer", &["config.json"])?,
            text_encoder: sub("text_encoder", &["config.json"])?,
            tokenizer: sub("tokenizer", &[])?,
            vae: sub("vae", &["config.json"])?,
            scheduler: sub("scheduler", &["scheduler_config.json"])?,
        })
    }
}

fn missing(path: &Path, what: &str) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, what.to_string()),
    }
}

/// Resolves a model source to a local diffusers-layout directory.
pub fn resolve(source: &ModelSource) -> Result<ModelPaths> {
    match source {
        ModelSource::Dir(dir) => ModelPaths::from_dir(dir),
        ModelSource::Hub { model_id, revision } => {
            resolve_hub(model_id, revision.as_deref(), hf_hub::Cache::from_env())
        }
    }
}

/// Files the pipeline reads (the text-encoder shards are added from its index).
const HUB_FILES: &[&str] = &[
    "model_index.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
];

/// Resolves a hub model id through the given cache (`hf_hub::Cache::from_env()` honours
/// `HF_HOME`), downloading what is missing when the network allows.
pub fn resolve_hub(
    model_id: &str,
    revision: Option<&str>,
    cache: hf_hub::Cache,
) -> Result<ModelPaths> {
    use hf_hub::{Repo, RepoType};
    let hub_err = |message: String| Error::Hub {
        model_id: model_id.to_string(),
        message,
    };
    let repo = match revision {
        Some(r) => Repo::with_revision(model_id.to_string(), RepoType::Model, r.to_string()),
        None => Repo::new(model_id.to_string(), RepoType::Model),
    };
    let cache_dir = cache.path().clone();
    let cache = cache.repo(repo.clone());
    let mut api: Option<hf_hub::api::sync::ApiRepo> = None;
    let mut get = |file: &str| -> Result<PathBuf> {
        if let Some(p) = cache.get(file) {
            return Ok(p);
        }
        if api.is_none() {
            let built = hf_hub::api::sync::ApiBuilder::from_env()
                .with_cache_dir(cache_dir.clone())
                .with_progress(false)
                .build()
                .map_err(|e| {
                    hub_err(format!(
                        "`{file}` is not in the hub cache and the hub client failed: {e}"
                    ))
                })?;
            api = Some(built.repo(repo.clone()));
        }
        tracing::info!(model_id, file, "downloading from the hub");
        api.as_ref().expect("set above").get(file).map_err(|e| {
            hub_err(format!(
                "`{file}` is not in the hub cache and could not be downloaded: {e}"
            ))
        })
    };
    let index = get("model_index.json")?;
    for f in HUB_FILES {
        get(f)?;
    }
    // Text encoder: sharded (the real checkpoint) or a single file.
    match get("text_encoder/model.safetensors.index.json") {
        Ok(idx) => {
            for shard in shard_names(&idx)? {
                get(&format!("text_encoder/{shard}"))?;
            }
        }
        Err(_) => {
            get("text_encoder/model.safetensors")?;
        }
    }
    // The hub repo has no tokenizer.json; fetch the sentencepiece files so the conversion
    // command printed by the tokenizer loader has what it needs.
    if get("tokenizer/tokenizer.json").is_err() {
        for f in [
            "tokenizer/spiece.model",
            "tokenizer/tokenizer_config.json",
            "tokenizer/special_tokens_map.json",
        ] {
            let _ = get(f);
        }
    }
    let root = index
        .parent()
        .expect("a file in the snapshot folder")
        .to_path_buf();
    ModelPaths::from_dir(&root)
}

/// Reads a JSON file that must hold an object.
pub fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Error::Config {
            path: path.to_path_buf(),
            message: "expected a JSON object".into(),
        }),
        Err(e) => Err(Error::Config {
            path: path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        }),
    }
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let map = read_json_object(index)?;
    let wm = map
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::Config {
            path: index.to_path_buf(),
            message: "missing key `weight_map`".into(),
        })?;
    let mut files: Vec<String> = wm
        .values()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(Error::Config {
            path: index.to_path_buf(),
            message: "`weight_map` lists no files".into(),
        });
    }
    Ok(files)
}

/// The safetensors file(s) of a component: `{stem}.safetensors.index.json` and its shards when the
/// index exists, else `{stem}.safetensors`.
pub fn find_weights(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.is_file() {
        let files = shard_names(&index)?
            .into_iter()
            .map(|f| dir.join(f))
            .collect::<Vec<_>>();
        for f in &files {
            if !f.is_file() {
                return Err(missing(
                    f,
                    &format!("shard listed in {} not found", index.display()),
                ));
            }
        }
        return Ok(files);
    }
    let single = dir.join(format!("{stem}.safetensors"));
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(missing(
        &single,
        &format!("weights not found (nor {})", index.display()),
    ))
}

/// Opens safetensors files as a `VarBuilder` converting to `dtype` on `device`.
///
/// Memory-mapped rather than read: the real T5 encoder is 19 GB of f32 shards, and reading them
/// into buffers before the dtype conversion would double the peak memory.
pub fn mmap_var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    for f in files {
        if !f.is_file() {
            return Err(missing(f, "weights file not found"));
        }
    }
    // SAFETY: the files are opened read-only and must not be modified while the model is loaded —
    // the same contract as every other safetensors consumer (candle, diffusers via mmap).
    #[allow(unsafe_code)]
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) };
    vb.map_err(|e| weights_error(files, e))
}

/// Wraps a candle error raised while reading weights so it names the file(s) (candle's own message
/// names the tensor and the expected/actual shape).
pub fn weights_error(files: &[PathBuf], e: candle_core::Error) -> Error {
    let path = match files {
        [one] => one.clone(),
        _ => files
            .first()
            .and_then(|f| f.parent())
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    Error::Weights {
        path,
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_parts_are_named() {
        let tmp = std::env::temp_dir().join(format!("pixart-loading-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let e = ModelPaths::from_dir(&tmp).unwrap_err().to_string();
        assert!(e.contains("model_index.json"), "{e}");
        std::fs::write(tmp.join("model_index.json"), "{}").unwrap();
        let e = ModelPaths::from_dir(&tmp).unwrap_err().to_string();
        assert!(e.contains("transformer"), "{e}");
        let e = find_weights(&tmp, "model").unwrap_err().to_string();
        assert!(e.contains("model.safetensors"), "{e}");
        std::fs::write(
            tmp.join("model.safetensors.index.json"),
            r#"{"weight_map":{"a":"model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let e = find_weights(&tmp, "model").unwrap_err().to_string();
        assert!(e.contains("model-00001-of-00002.safetensors"), "{e}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
