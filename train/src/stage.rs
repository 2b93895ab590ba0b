//! The loop every diffusion stage shares: refuse to overwrite a checkpoint without `--resume`, run steps
//! to the target count with a progress bar, stop on a non-finite loss naming the stage and step, save
//! every `save_every` steps and at the end, and let a test interrupt it as a kill would.
//!
//! A stage supplies a [`Trainer`]: one step (its figures and loss) and one save.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use crate::checkpoint;
use crate::progress::Progress;
use crate::{Error, Result};

/// One stage's step and save.
pub trait Trainer {
    /// What a step reports (serialisable figures).
    type Record;
    /// Runs step `step + 1` (0-based `step` in, as the seeded draws use) and returns its figures and loss.
    fn step(&mut self, step: u64) -> Result<(Self::Record, f32)>;
    /// Saves the checkpoint at `step` (the number of steps done).
    fn save(&mut self, step: u64) -> Result<()>;
}

/// The checks before a run loads anything: `save_every` at least 1, and no checkpoint in `out` unless
/// resuming.
pub fn preflight(out: &Path, save_every: u64, resume: bool) -> Result<()> {
    if save_every == 0 {
        return Err(Error::InvalidInput {
            field: "save_every",
            message: "must be at least 1".into(),
        });
    }
    let ckpt = checkpoint::dir(out);
    if checkpoint::exists(&ckpt) && !resume {
        return Err(Error::Checkpoint {
            path: ckpt.join(checkpoint::STATE_FILE),
            field: "step".into(),
            message:
                "exists: pass --resume to continue this run, or choose another output directory"
                    .into(),
        });
    }
    Ok(())
}

/// What [`drive`] did.
#[derive(Debug, Clone)]
pub struct Driven<R> {
    pub records: Vec<R>,
    /// Wall seconds of each step (not saves).
    pub seconds_per_step: Vec<f64>,
    pub end_step: u64,
    /// `on_step` broke off (nothing saved after the last save, as after a kill).
    pub interrupted: bool,
}

/// Runs steps `start..steps` of `stage`.
pub fn drive<T: Trainer>(
    stage: &str,
    trainer: &mut T,
    start: u64,
    steps: u64,
    save_every: u64,
    progress: bool,
    mut on_step: impl FnMut(&T::Record) -> ControlFlow<()>,
) -> Result<Driven<T::Record>> {
    let bar = Progress::new(stage, start, steps.max(start), progress);
    let mut out = Driven {
        records: Vec::new(),
        seconds_per_step: Vec::new(),
        end_step: start,
        interrupted: false,
    };
    let mut saved = (start > 0).then_some(start);
    let mut step = start;
    while step < steps {
        let t0 = Instant::now();
        let (record, loss) = trainer.step(step)?;
        if !loss.is_finite() {
            return Err(Error::NonFiniteLoss {
                stage: stage.into(),
                step: step + 1,
                value: loss,
            });
        }
        step += 1;
        out.seconds_per_step.push(t0.elapsed().as_secs_f64());
        out.end_step = step;
        bar.update(step, loss);
        let stop = on_step(&record).is_break();
        out.records.push(record);
        if stop {
            out.interrupted = true;
            return Ok(out);
        }
        if step.is_multiple_of(save_every) || step == steps {
            trainer.save(step)?;
            saved = Some(step);
        }
    }
    bar.finish();
    if saved != Some(step) {
        trainer.save(step)?;
    }
    Ok(out)
}

/// `batch_size` must be positive and fit in the pool of `dataset_size` samples.
pub fn check_batch(batch_size: usize, dataset_size: u64) -> Result<()> {
    if batch_size == 0 || (dataset_size as usize) < batch_size {
        return Error::invalid(
            "batch_size",
            format!("{batch_size} must be positive and at most dataset_size {dataset_size}"),
        );
    }
    Ok(())
}

/// `grad_clip`, the largest global gradient norm a step may apply, must be positive and finite: 0
/// would scale every gradient to zero (a run that trains nothing while its loss is logged), a negative
/// one would turn the step uphill, and infinity is no clip at all — say so by a large number instead.
pub fn check_grad_clip(grad_clip: f64) -> Result<()> {
    if !grad_clip.is_finite() || grad_clip <= 0.0 {
        return Error::invalid(
            "grad_clip",
            format!("{grad_clip} must be positive and finite"),
        );
    }
    Ok(())
}

/// Restores `varmap` and `optimizer` from the checkpoint in `ckpt` when `resume` is set and there is one
/// (of `stage`, saved with `config`); returns the step to continue from (0 for a fresh run) and the
/// loaded checkpoint, for stages that keep more than the parameters.
pub fn restore(
    ckpt: &Path,
    resume: bool,
    stage: &str,
    config: &serde_json::Value,
    varmap: &candle_nn::VarMap,
    optimizer: &mut crate::optim::AdamW,
    device: &candle_core::Device,
) -> Result<(u64, Option<checkpoint::Loaded>)> {
    if !(resume && checkpoint::exists(ckpt)) {
        return Ok((0, None));
    }
    let loaded = checkpoint::load(ckpt, stage, config, device)?;
    checkpoint::restore_varmap(
        varmap,
        &loaded.params,
        &loaded.dir.join(checkpoint::PARAMS_FILE),
    )?;
    optimizer.load_state(
        &loaded.optimizer,
        loaded.state.optimizer_steps,
        &loaded.dir.join(checkpoint::OPTIMIZER_FILE),
    )?;
    Ok((loaded.state.step, Some(loaded)))
}
