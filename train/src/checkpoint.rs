//! Resumable checkpoints: a directory with the parameters, the optimiser moments and a JSON state.
//!
//! ```text
//! <out>/checkpoint/state.json             {"format", "version", "stage", "step", "optimizer_steps", "config"}
//! <out>/checkpoint/params.safetensors     the VarMap, by variable name
//! <out>/checkpoint/optimizer.safetensors  AdamW moments (`m.<name>`, `v.<name>`)
//! ```
//!
//! A save writes a complete new directory next to the old one and then swaps them with renames, so a run
//! killed mid-save leaves either the previous checkpoint or the new one, never a mix; a killed run loses at
//! most the steps since its last save. Resuming checks that the checkpoint is of the same stage and that
//! the run config is the one it was saved with (field by field, so the error names what differs): a
//! resumed run with, say, another learning rate would silently be a different experiment.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::optim::AdamW;
use crate::{Error, Result};

/// `state.json`'s `format` value.
pub const FORMAT: &str = "pixart-train-checkpoint";
/// `state.json`'s `version` value.
pub const VERSION: u32 = 1;
pub const STATE_FILE: &str = "state.json";
pub const PARAMS_FILE: &str = "params.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// What `state.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format: String,
    pub version: u32,
    /// The stage that wrote it (`vae`, …).
    pub stage: String,
    /// Training steps completed.
    pub step: u64,
    /// Optimiser updates taken (AdamW's bias-correction count).
    pub optimizer_steps: u64,
    /// The run config: everything that determines the result except how many steps to run.
    pub config: Value,
}

/// A checkpoint read back: its state, parameter tensors and optimiser moments.
#[derive(Debug)]
pub struct Loaded {
    pub dir: PathBuf,
    pub state: State,
    pub params: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

/// The checkpoint directory of a run writing to `out`.
pub fn dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn safetensors_error(path: &Path, e: candle_core::Error) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        field: "tensors".into(),
        message: format!("cannot be read or written: {e}"),
    }
}

/// Saves `varmap` and `optimizer` at `step` of `stage` into `dir` (see the module doc for the layout).
pub fn save(
    dir: &Path,
    stage: &str,
    step: u64,
    config: &Value,
    varmap: &VarMap,
    optimizer: &AdamW,
) -> Result<()> {
    save_with(dir, stage, step, config, varmap, optimizer, &[])
}

/// [`save`] with further tensor files (`(file name, tensors)`, e.g. an EMA network) written into the
/// same directory before the swap, so that they are in place whenever the checkpoint is.
pub fn save_with(
    dir: &Path,
    stage: &str,
    step: u64,
    config: &Value,
    varmap: &VarMap,
    optimizer: &AdamW,
    extra: &[(&str, HashMap<String, Tensor>)],
) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    let old = dir.with_extension("old");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let params: HashMap<String, Tensor> = {
        let data = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    };
    let p = tmp.join(PARAMS_FILE);
    candle_core::safetensors::save(&params, &p).map_err(|e| safetensors_error(&p, e))?;
    let p = tmp.join(OPTIMIZER_FILE);
    candle_core::safetensors::save(&optimizer.state(), &p).map_err(|e| safetensors_error(&p, e))?;
    let state = State {
        format: FORMAT.into(),
        version: VERSION,
        stage: stage.into(),
        step,
        optimizer_steps: optimizer.steps(),
        config: config.clone(),
    };
    for (file, tensors) in extra {
        let p = tmp.join(file);
        candle_core::safetensors::save(tensors, &p).map_err(|e| safetensors_error(&p, e))?;
    }
    let p = tmp.join(STATE_FILE);
    let json = serde_json::to_string_pretty(&state).expect("a State always serialises");
    std::fs::write(&p, json + "\n").map_err(io(&p))?;
    // Swap: the previous checkpoint stays readable (as `.old`) until the new one is in place.
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        std::fs::rename(dir, &old).map_err(io(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(io(dir))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(())
}

/// Whether a checkpoint exists at `dir` (or the previous one of an interrupted swap).
pub fn exists(dir: &Path) -> bool {
    dir.join(STATE_FILE).exists() || dir.with_extension("old").join(STATE_FILE).exists()
}

/// Reads the checkpoint at `dir` for resuming `stage` with `config`: a checkpoint of another stage, or one
/// saved with another config, is an [`Error::Checkpoint`] naming `state.json` and the field. Falls back to
/// `<dir>.old` when a save was interrupted between its two renames.
pub fn load(dir: &Path, stage: &str, config: &Value, device: &Device) -> Result<Loaded> {
    let dir =
        if !dir.join(STATE_FILE).exists() && dir.with_extension("old").join(STATE_FILE).exists() {
            dir.with_extension("old")
        } else {
            dir.to_path_buf()
        };
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let err = |field: &str, message: String| Error::Checkpoint {
        path: path.clone(),
        field: field.into(),
        message,
    };
    let state: State = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.clone(),
        line: Some(e.line()),
        message: e.to_string(),
    })?;
    if state.format != FORMAT {
        return Err(err(
            "format",
            format!("is {:?}, expected {FORMAT:?}", state.format),
        ));
    }
    if state.version != VERSION {
        return Err(err(
            "version",
            format!("is {}, this build reads {VERSION}", state.version),
        ));
    }
    if state.stage != stage {
        return Err(err(
            "stage",
            format!(
                "is `{}`: this is a checkpoint of another stage, not of `{stage}`",
                state.stage
            ),
        ));
    }
    if let Some((field, saved, now)) = first_difference("config", &state.config, config) {
        return Err(err(
            &field,
            format!(
                "was {saved} when the checkpoint was saved, this run has {now}: resume with the same settings or start a new run"
            ),
        ));
    }
    let p = dir.join(PARAMS_FILE);
    let params =
        candle_core::safetensors::load(&p, device).map_err(|e| safetensors_error(&p, e))?;
    let p = dir.join(OPTIMIZER_FILE);
    let optimizer =
        candle_core::safetensors::load(&p, device).map_err(|e| safetensors_error(&p, e))?;
    Ok(Loaded {
        dir,
        state,
        params,
        optimizer,
    })
}

/// Copies checkpoint tensors into the variables of `varmap`: every variable must be there with its shape,
/// and the checkpoint must hold nothing else (a different architecture).
pub fn restore_varmap(
    varmap: &VarMap,
    params: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    let err = |field: String, message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        field,
        message,
    };
    let data = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
    for name in params.keys() {
        if !data.contains_key(name) {
            return Err(err(name.clone(), "is not a variable of this model".into()));
        }
    }
    for (name, var) in data.iter() {
        let t = params
            .get(name)
            .ok_or_else(|| err(name.clone(), "is missing".into()))?;
        if t.dims() != var.dims() {
            return Err(err(
                name.clone(),
                format!("has shape {:?}, the model {:?}", t.dims(), var.dims()),
            ));
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// The first entry (dotted path) where `saved` and `now` differ, with both values.
fn first_difference(path: &str, saved: &Value, now: &Value) -> Option<(String, String, String)> {
    match (saved, now) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let sub = format!("{path}.{k}");
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => first_difference(&sub, x, y),
                    (x, y) => Some((
                        sub,
                        x.map_or("absent".into(), Value::to_string),
                        y.map_or("absent".into(), Value::to_string),
                    )),
                }
            })
        }
        (a, b) if a == b => None,
        (a, b) => Some((path.to_string(), a.to_string(), b.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_first_difference_is_named_by_its_dotted_path() {
        let a = json!({"lr": 0.001, "model": {"channels": [8, 16], "groups": 4}});
        assert_eq!(first_difference("config", &a, &a), None);
        let b = json!({"lr": 0.001, "model": {"channels": [8, 32], "groups": 4}});
        let (field, saved, now) = first_difference("config", &a, &b).unwrap();
        assert_eq!(field, "config.model.channels");
        assert_eq!((saved.as_str(), now.as_str()), ("[8,16]", "[8,32]"));
        let c = json!({"lr": 0.001, "model": {"channels": [8, 16], "groups": 4}, "extra": 1});
        assert_eq!(
            first_difference("config", &a, &c).unwrap().0,
            "config.extra"
        );
    }
}
