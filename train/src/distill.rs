//! Stage 4: Latent Consistency Distillation of the teacher into a 4-step student — PixArt-δ's Algorithm 1
//! as `train_scripts/train_pixart_lcm.py` runs it, with the numerics of [`crate::lcd`]:
//!
//! 1. a DDIM index `n` per sample; `t_start` = the n-th of the 50 solver timesteps (19 … 999), `t_end =
//!    max(t_start − 20, 0)`; `x_t = add_noise(x0, ε, t_start)`;
//! 2. the student's consistency output `c_skip(t_start)·x_t + c_out(t_start)·x̂0(student)`;
//! 3. without gradients: the teacher conditioned and unconditioned, combined in LCM form with w = 4.5
//!    (not embedded in the student), one DDIM solver step to `x_prev` at `t_end`; the EMA target's
//!    consistency output there;
//! 4. pseudo-Huber loss (c = 0.001) between the two; an AdamW step on the student only; the target
//!    follows by EMA (0.95).
//!
//! Student, target and teacher all start from the teacher's weights. The student is exported as a
//! diffusers `transformer/` (same config as the teacher), which the farm samples with its LCM scheduler.

use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use pixart::transformer::PixArtTransformer;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::lcd::{self, DDIM_TIMESTEPS, DdimSolver, NoiseSchedule};
use crate::optim::{AdamW, AdamWParams, clip_grad_norm};
use crate::prep::{LatentPool, Prepared, Text};
use crate::seed::{self, Stream};
use crate::shard::{self, ShardLoss};
use crate::stage;
use crate::teacher::load_transformer_vars;
use crate::varmap::{snapshot, sorted_vars};
use crate::{Error, Result};

/// The stage name in checkpoints and errors.
pub const STAGE: &str = "lcd";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    pub seed: u64,
    pub image_size: u32,
    pub dataset_size: u64,
    pub batch_size: usize,
    /// Guidance scale `w` of the LCM-form guided teacher.
    pub guidance: f64,
    pub ema_rate: f64,
    pub huber_c: f64,
    pub num_ddim_timesteps: usize,
    pub grad_clip: f64,
    pub optimizer: AdamWParams,
}

impl DistillConfig {
    /// Checked before anything is read or written, like the teacher's and the VAE's configs.
    pub fn validate(&self) -> Result<()> {
        stage::check_batch(self.batch_size, self.dataset_size)?;
        // A negative w flips the guided direction; an EMA rate of 1 freezes the target (the loss
        // then measures the student against the teacher forever), above 1 it diverges; a Huber c of
        // 0 is the plain L1 distance, whose gradient is 0/0 where the two outputs agree, and a
        // negative one is a sign mistake (the loss of |c| shifted by a constant).
        if !self.guidance.is_finite() || self.guidance < 0.0 {
            return Error::invalid(
                "guidance",
                format!("{} must be finite and ≥ 0", self.guidance),
            );
        }
        if !(0.0..1.0).contains(&self.ema_rate) {
            return Error::invalid("ema_rate", format!("{} must be within 0..1", self.ema_rate));
        }
        if !self.huber_c.is_finite() || self.huber_c <= 0.0 {
            return Error::invalid("huber_c", format!("{} must be positive", self.huber_c));
        }
        stage::check_grad_clip(self.grad_clip)?;
        // The solver's own check (1..=1000), here so that a bad value stops before the minute of
        // preparation rather than after it.
        DdimSolver::new(&NoiseSchedule::pixart(), self.num_ddim_timesteps)?;
        self.optimizer.validate()
    }
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            image_size: 64,
            dataset_size: 4096,
            batch_size: 32,
            guidance: lcd::GUIDANCE,
            ema_rate: lcd::EMA_RATE,
            huber_c: lcd::HUBER_C,
            num_ddim_timesteps: DDIM_TIMESTEPS,
            grad_clip: 1.0,
            // 1e-5, not 1e-4: at 4 steps every LCD run moved the student away from the teacher it
            // starts from, the more so the faster it learnt (all correct 62.4 % at 1e-4, 70.7 % at
            // 1e-5, 76.5 % for the undistilled teacher; BENCHMARKS.md, "eighth run").
            optimizer: AdamWParams {
                lr: 1e-5,
                weight_decay: 0.0,
                ..Default::default()
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out: PathBuf,
    /// The teacher stage's output directory (holding transformer/).
    pub teacher: PathBuf,
    pub vae: PathBuf,
    pub text: PathBuf,
    pub steps: u64,
    pub save_every: u64,
    pub resume: bool,
    pub progress: bool,
    /// Train on this exported dataset (`pixart-train dataset`) instead of rendering the procedural one.
    pub dataset: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f32,
    pub grad_norm: f64,
}

#[derive(Debug, Clone)]
pub struct DistillRun {
    pub start_step: u64,
    pub records: Vec<StepRecord>,
    pub seconds_per_step: Vec<f64>,
    pub end_step: u64,
    pub prepare_seconds: f64,
    pub transformer_dir: Option<PathBuf>,
}

/// ε̂ at per-row integer timesteps.
fn eps(
    model: &PixArtTransformer,
    x: &Tensor,
    t: &[usize],
    y: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    let t: Vec<f32> = t.iter().map(|&v| v as f32).collect();
    crate::sample::epsilon_rows(model, x, &t, y, mask)
}

/// The inputs of one LCD step, drawn from (seed, step).
pub struct LcdBatch {
    pub indices: Vec<u32>,
    /// DDIM index per row.
    pub ddim: Vec<usize>,
    pub noise: Tensor,
}

pub fn draw_batch(
    config: &DistillConfig,
    step: u64,
    latent_shape: &[usize],
    device: &Device,
) -> Result<LcdBatch> {
    let mut rng = seed::rng(config.seed, step, Stream::Batch);
    let b = config.batch_size;
    let indices = (0..b)
        .map(|_| rng.random_range(0..config.dataset_size as u32))
        .collect();
    let ddim = (0..b)
        .map(|_| rng.random_range(0..config.num_ddim_timesteps))
        .collect();
    let mut shape = vec![b];
    shape.extend_from_slice(latent_shape);
    let noise = seed::randn(
        &mut seed::rng(config.seed, step, Stream::Noise),
        &shape,
        device,
    )?;
    Ok(LcdBatch {
        indices,
        ddim,
        noise,
    })
}

impl LcdBatch {
    /// Samples `r` of the batch (one shard's, [`crate::shard`]).
    pub fn rows(&self, r: std::ops::Range<usize>) -> Result<Self> {
        Ok(Self {
            indices: self.indices[r.clone()].to_vec(),
            ddim: self.ddim[r.clone()].to_vec(),
            noise: self.noise.narrow(0, r.start, r.len())?,
        })
    }
}

/// The three networks of one step.
pub struct Networks<'a> {
    pub student: &'a PixArtTransformer,
    pub target: &'a PixArtTransformer,
    pub teacher: &'a PixArtTransformer,
}

/// The LCD loss of one batch (a scalar with gradients into the student only).
#[allow(clippy::too_many_arguments)]
pub fn lcd_loss(
    nets: &Networks<'_>,
    config: &DistillConfig,
    solver: &DdimSolver,
    ac: &[f64],
    x0: &Tensor,
    cond: (&Tensor, &Tensor),
    uncond: (&Tensor, &Tensor),
    batch: &LcdBatch,
) -> Result<Tensor> {
    let (start, end): (Vec<usize>, Vec<usize>) =
        batch.ddim.iter().map(|&i| solver.start_end(i)).unzip();
    let ac_start: Vec<f64> = start.iter().map(|&t| ac[t]).collect();
    let ac_end: Vec<f64> = end.iter().map(|&t| ac[t]).collect();
    let x_t = lcd::add_noise(x0, &batch.noise, &ac_start)?;

    let student_eps = eps(nets.student, &x_t, &start, cond.0, cond.1)?;
    let student_x0 = lcd::predict_x0(&x_t, &student_eps, &ac_start)?;
    let model_pred = lcd::consistency_output(&x_t, &student_x0, &start)?;

    // Guided teacher and one DDIM solver step (no gradients: everything is detached).
    let x_t_d = x_t.detach();
    // At w = 0 the guided teacher is the conditional one (x0_c + 0·(x0_c − x0_u)): its unconditional
    // half would be computed only to be multiplied by zero (skipping it took the chain's LCD stage
    // from 345 to 317 s, BENCHMARKS.md "tenth run").
    let (ec, eu) = if config.guidance == 0.0 {
        let ec = eps(nets.teacher, &x_t_d, &start, cond.0, cond.1)?.detach();
        (ec.clone(), ec)
    } else {
        let b = x0.dim(0)?;
        let l = cond.0.dim(1)?.max(uncond.0.dim(1)?);
        let pad = |y: &Tensor, m: &Tensor| -> Result<(Tensor, Tensor)> {
            let n = y.dim(1)?;
            Ok((
                y.pad_with_zeros(1, 0, l - n)?,
                m.pad_with_zeros(1, 0, l - n)?,
            ))
        };
        let (yc, mc) = pad(cond.0, cond.1)?;
        let (yu, mu) = pad(uncond.0, uncond.1)?;
        let both_t: Vec<usize> = start.iter().chain(&start).copied().collect();
        let e2 = eps(
            nets.teacher,
            &Tensor::cat(&[&x_t_d, &x_t_d], 0)?,
            &both_t,
            &Tensor::cat(&[&yc, &yu], 0)?,
            &Tensor::cat(&[&mc, &mu], 0)?,
        )?
        .detach();
        (e2.narrow(0, 0, b)?, e2.narrow(0, b, b)?)
    };
    let x0c = lcd::predict_x0(&x_t_d, &ec, &ac_start)?;
    let x0u = lcd::predict_x0(&x_t_d, &eu, &ac_start)?;
    let pred_x0 = lcd::lcm_guidance(&x0c, &x0u, config.guidance)?;
    let pred_eps = lcd::lcm_guidance(&ec, &eu, config.guidance)?;
    let x_prev = solver.step(&pred_x0, &pred_eps, &batch.ddim)?.detach();

    let target_eps = eps(nets.target, &x_prev, &end, cond.0, cond.1)?.detach();
    let target_x0 = lcd::predict_x0(&x_prev, &target_eps, &ac_end)?;
    let target = lcd::consistency_output(&x_prev, &target_x0, &end)?.detach();
    lcd::huber_loss(&model_pred, &target, config.huber_c)
}

/// Distils `opts.teacher/transformer` into `opts.out/transformer`; checkpoints hold the student, its
/// moments and the EMA target (`target.safetensors` beside the params).
pub fn train(
    config: &DistillConfig,
    opts: &RunOptions,
    device: &Device,
    mut on_step: impl FnMut(&StepRecord) -> ControlFlow<()>,
) -> Result<DistillRun> {
    config.validate()?;
    stage::preflight(&opts.out, opts.save_every, opts.resume)?;
    let ckpt = checkpoint::dir(&opts.out);
    let prep = Prepared::load(
        &opts.vae,
        &opts.text,
        config.image_size,
        config.seed,
        config.dataset_size,
        opts.dataset.as_deref(),
    )?;
    let (latent_shape, prepare_seconds) = (prep.latent_shape(), prep.seconds);
    let (pool, mut text) = (&prep.pool, prep.text);
    let teacher_dir = opts.teacher.join("transformer");
    let (tcfg, student_vars) = load_transformer_vars(&teacher_dir, device)?;
    let (_, target_vars) = load_transformer_vars(&teacher_dir, device)?;
    let teacher = PixArtTransformer::load(&teacher_dir, DType::F32, device)?;
    let mut inputs = crate::inputs::frozen_inputs(&opts.vae, &opts.text, opts.dataset.as_deref());
    inputs.push(("teacher", teacher_dir.clone()));
    let config_json =
        crate::teacher::stage_config(config, &tcfg, crate::inputs::fingerprints(&inputs)?);
    let student = PixArtTransformer::trainable(tcfg.clone(), &student_vars)?;
    let target = PixArtTransformer::trainable(tcfg.clone(), &target_vars)?;
    let vars = sorted_vars(&student_vars);
    let target_list: Vec<_> = sorted_vars(&target_vars)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let source_list: Vec<_> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut optimizer = AdamW::new(vars.clone(), config.optimizer.clone())?;
    const TARGET_FILE: &str = "target.safetensors";
    let (start, loaded) = stage::restore(
        &ckpt,
        opts.resume,
        STAGE,
        &config_json,
        &student_vars,
        &mut optimizer,
        device,
    )?;
    if let Some(loaded) = loaded {
        let path = loaded.dir.join(TARGET_FILE);
        let saved =
            candle_core::safetensors::load(&path, device).map_err(|e| Error::Checkpoint {
                path: path.clone(),
                field: "target".into(),
                message: e.to_string(),
            })?;
        checkpoint::restore_varmap(&target_vars, &saved, &path)?;
    }
    let solver = DdimSolver::new(&NoiseSchedule::pixart(), config.num_ddim_timesteps)?;
    let ac = NoiseSchedule::pixart().alphas_cumprod;
    let nets = Networks {
        student: &student,
        target: &target,
        teacher: &teacher,
    };

    struct Steps<'a> {
        config: &'a DistillConfig,
        nets: Networks<'a>,
        solver: &'a DdimSolver,
        ac: &'a [f64],
        pool: &'a LatentPool,
        text: &'a mut Text,
        vars: &'a [(String, candle_core::Var)],
        source: &'a [candle_core::Var],
        target: &'a [candle_core::Var],
        student_vars: &'a candle_nn::VarMap,
        target_vars: &'a candle_nn::VarMap,
        optimizer: &'a mut AdamW,
        latent_shape: &'a [usize],
        ckpt: &'a std::path::Path,
        config_json: &'a serde_json::Value,
    }
    impl stage::Trainer for Steps<'_> {
        type Record = StepRecord;
        fn step(&mut self, step: u64) -> Result<(StepRecord, f32)> {
            let device = self.nets.student.device().clone();
            let batch = draw_batch(self.config, step, self.latent_shape, &device)?;
            let x0 = self
                .pool
                .latents
                .index_select(&Tensor::new(batch.indices.as_slice(), &device)?, 0)?;
            let prompts: Vec<Option<&str>> = batch
                .indices
                .iter()
                .map(|&i| Some(self.pool.samples[i as usize].caption.as_str()))
                .collect();
            let (y, mask) = self.text.batch(&prompts)?;
            let (yu, mu) = self.text.batch(&vec![None; prompts.len()])?;
            let b = batch.indices.len();
            let shards = shard::default_shards(b);
            let (nets, config, solver, ac) = (&self.nets, self.config, self.solver, self.ac);
            let (grads, outs) = shard::backward(b, &shards, self.vars, |r| {
                let rows = |t: &Tensor| t.narrow(0, r.start, r.len());
                let loss = lcd_loss(
                    nets,
                    config,
                    solver,
                    ac,
                    &rows(&x0)?,
                    (&rows(&y)?, &rows(&mask)?),
                    (&rows(&yu)?, &rows(&mu)?),
                    &batch.rows(r.clone())?,
                )?;
                Ok(ShardLoss { loss, extra: () })
            })?;
            let value = shard::batch_loss(b, &shards, &outs)?;
            let (Some(mut grads), true) = (grads, value.is_finite()) else {
                return Ok((
                    StepRecord {
                        step: step + 1,
                        loss: value,
                        grad_norm: f64::NAN,
                    },
                    value,
                ));
            };
            let grad_norm = clip_grad_norm(&mut grads, self.vars, self.config.grad_clip)?;
            self.optimizer.step(&grads)?;
            lcd::ema_update(self.target, self.source, self.config.ema_rate)?;
            Ok((
                StepRecord {
                    step: step + 1,
                    loss: value,
                    grad_norm,
                },
                value,
            ))
        }
        fn save(&mut self, step: u64) -> Result<()> {
            let target = snapshot(self.target_vars)?;
            checkpoint::save_with(
                self.ckpt,
                STAGE,
                step,
                self.config_json,
                self.student_vars,
                self.optimizer,
                &[(TARGET_FILE, target)],
            )
        }
    }
    let mut steps = Steps {
        config,
        nets,
        solver: &solver,
        ac: &ac,
        pool,
        text: &mut text,
        vars: &vars,
        source: &source_list,
        target: &target_list,
        student_vars: &student_vars,
        target_vars: &target_vars,
        optimizer: &mut optimizer,
        latent_shape: &latent_shape,
        ckpt: &ckpt,
        config_json: &config_json,
    };
    let driven = stage::drive(
        STAGE,
        &mut steps,
        start,
        opts.steps,
        opts.save_every,
        opts.progress,
        &mut on_step,
    )?;
    let mut run = DistillRun {
        start_step: start,
        end_step: driven.end_step,
        records: driven.records,
        seconds_per_step: driven.seconds_per_step,
        prepare_seconds,
        transformer_dir: None,
    };
    if driven.interrupted {
        return Ok(run);
    }
    let dir = opts.out.join("transformer");
    crate::dit::export(&student_vars, &tcfg, &dir)?;
    run.transformer_dir = Some(dir);
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spoils one setting of a valid config.
    type Spoil = fn(&mut DistillConfig);

    /// Each setting out of range is refused by its own name; the defaults pass.
    #[test]
    fn settings_out_of_range_are_refused_by_name() {
        DistillConfig::default().validate().unwrap();
        let cases: [(&str, Spoil); 9] = [
            ("num_ddim_timesteps", |c| c.num_ddim_timesteps = 0),
            ("num_ddim_timesteps", |c| c.num_ddim_timesteps = 1001),
            ("guidance", |c| c.guidance = -1.0),
            ("guidance", |c| c.guidance = f64::NAN),
            ("ema_rate", |c| c.ema_rate = 1.0),
            ("ema_rate", |c| c.ema_rate = -0.1),
            ("huber_c", |c| c.huber_c = 0.0),
            ("grad_clip", |c| c.grad_clip = f64::INFINITY),
            ("batch_size", |c| c.batch_size = 0),
        ];
        for (field, spoil) in cases {
            let mut config = DistillConfig::default();
            spoil(&mut config);
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    /// At w = 0 the loss is taken from the conditional teacher alone; it must equal the guided
    /// path's loss as w → 0 (which runs the unconditional half and weights it by w).
    #[test]
    fn unguided_targets_agree_with_a_vanishing_guidance() {
        let dev = Device::Cpu;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/tiny-pixart-lcm/transformer");
        let model = PixArtTransformer::load(&dir, DType::F32, &dev).unwrap();
        let nets = Networks {
            student: &model,
            target: &model,
            teacher: &model,
        };
        let config = DistillConfig {
            batch_size: 3,
            dataset_size: 4,
            ..Default::default()
        };
        let batch = draw_batch(&config, 7, &[4, 8, 8], &dev).unwrap();
        let x0 = Tensor::randn(0f32, 1.0, (3, 4, 8, 8), &dev).unwrap();
        let y = Tensor::randn(0f32, 1.0, (3, 5, 32), &dev).unwrap();
        let m = Tensor::ones((3, 5), DType::F32, &dev).unwrap();
        let yu = Tensor::randn(0f32, 1.0, (3, 1, 32), &dev).unwrap();
        let mu = Tensor::ones((3, 1), DType::F32, &dev).unwrap();
        let solver = DdimSolver::new(&NoiseSchedule::pixart(), config.num_ddim_timesteps).unwrap();
        let ac = NoiseSchedule::pixart().alphas_cumprod;
        let loss = |guidance: f64| {
            let config = DistillConfig {
                guidance,
                ..config.clone()
            };
            lcd_loss(
                &nets,
                &config,
                &solver,
                &ac,
                &x0,
                (&y, &m),
                (&yu, &mu),
                &batch,
            )
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
        };
        let (unguided, vanishing, guided) = (loss(0.0), loss(1e-9), loss(1.0));
        assert!(
            (unguided - vanishing).abs() <= 1e-6 * unguided.abs().max(1e-12),
            "w = 0: {unguided}, w = 1e-9: {vanishing}"
        );
        // The unconditional features differ, so guidance must change the loss (the test can fail).
        assert!(
            (guided - unguided).abs() > 1e-6 * unguided.abs(),
            "{guided} vs {unguided}"
        );
    }
}
