//! Stage 5: the ControlNet-Transformer adapter (PixArt-δ §4) trained on the scenes' edge maps.
//!
//! The adapter is the layout inference loads ([`pixart::controlnet::ControlNetAdapter`]): copies of the
//! first N base blocks, block 0 with a `before_proj`, every block with an `after_proj`, both projections
//! zero-initialised so that training starts from exactly the base model. The base — the LCD student the
//! farm samples — is frozen; gradients flow through its later blocks into the adapter (both run in
//! training mode, the base's variables just never reach the optimiser).
//!
//! Loss ([`Objective`]): PixArt's ε MSE at uniform timesteps by default, as PixArt-δ trains its ControlNet
//! (on a diffusion base there; here the base is the LCD student, whose output is still parametrised as ε
//! and read as such by the LCM sampler). [`Objective::Consistency`] instead regresses the controlled
//! student's consistency output (`c_skip·x_t + c_out·x̂0`, what the LCM sampler keeps at every step) on
//! the clean latent at the LCD solver's timesteps: at t = 999 (√ᾱ ≈ 0.0064) an ε error is a 157× larger
//! x0 error, which the ε loss does not see. On the bundled model (600 steps each) it restored background
//! colours the student had lost but drew blurrier shapes: edge F1 0.234 against 0.257, so it is not the
//! default (BENCHMARKS.md, the adapter objectives).
//!
//! Control images are half the scene's exact outline, half OpenCV-style Canny (100, 200) of the scene,
//! white on black, encoded by the VAE as the pipeline encodes a control image.
//!
//! Captions: by default half of them name only the colours and the shape
//! ([`AdapterConfig::layout_free`]). Trained on the full captions alone, the adapter learnt nothing the
//! caption did not already say; without the size and position words it has to take them from the edge map
//! (edge F1 with layout-free prompts 0.02 → 0.47, BENCHMARKS.md, seventh run).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use image::{Rgb, RgbImage};
use pixart::config::TransformerConfig;
use pixart::controlnet::{ControlCondition, ControlNetAdapter, ControlNetConfig};
use pixart::transformer::PixArtTransformer;
use pixart::weights::Weights;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::dataset::Sample;
use crate::lcd::{
    DDIM_TIMESTEPS, DdimSolver, NoiseSchedule, TRAIN_TIMESTEPS, add_noise, consistency_output,
    predict_x0,
};
use crate::optim::{AdamW, AdamWParams, clip_grad_norm};
use crate::prep::{LatentPool, Prepared, Text};
use crate::seed::{self, Stream};
use crate::shard::{self, ShardLoss};
use crate::stage;
use crate::teacher::{load_transformer_vars, stage_config};
use crate::varmap::sorted_vars;
use crate::{Error, Result};

/// The stage name in checkpoints and errors.
pub const STAGE: &str = "controlnet";
/// Canny thresholds of the control images (the farm's `canny` preprocessing takes the same).
pub const CANNY: (f32, f32) = (100.0, 200.0);

/// What the adapter's loss compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// PixArt's ε MSE at uniform timesteps: the paper's recipe.
    Epsilon,
    /// The consistency output `c_skip(t)·x_t + c_out(t)·x̂0` against the clean latent (MSE), `t` one of
    /// the LCD solver's timesteps: for an LCM base, as the farm samples it.
    Consistency,
}

impl std::str::FromStr for Objective {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "consistency" => Ok(Objective::Consistency),
            "epsilon" => Ok(Objective::Epsilon),
            other => Err(format!("`{other}` is not one of consistency, epsilon")),
        }
    }
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Objective::Consistency => "consistency",
            Objective::Epsilon => "epsilon",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    pub seed: u64,
    pub image_size: u32,
    pub dataset_size: u64,
    /// Copied base blocks (at most the base's layers − 1).
    pub num_layers: usize,
    pub batch_size: usize,
    pub objective: Objective,
    /// The share of training captions that name only the colours and the shape
    /// ([`crate::caption::layout_free`]), not the size and position. With full captions alone the base
    /// already draws the layout the caption names and the adapter learns to add nothing (edge F1 0.48 with
    /// against 0.49 without, sixth run); without those words the loss can only fall if the adapter reads
    /// size and position from the edge map. 0 trains on the dataset's captions alone, as before.
    pub layout_free: f64,
    pub grad_clip: f64,
    pub optimizer: AdamWParams,
}

impl AdapterConfig {
    /// Checked before anything is read or written, like the teacher's and the VAE's configs.
    pub fn validate(&self) -> Result<()> {
        stage::check_batch(self.batch_size, self.dataset_size)?;
        stage::check_grad_clip(self.grad_clip)?;
        if !(0.0..=1.0).contains(&self.layout_free) {
            return Error::invalid(
                "layout_free",
                format!("{}: must be a share in 0..=1", self.layout_free),
            );
        }
        self.optimizer.validate()
    }
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            image_size: 64,
            dataset_size: 2048,
            num_layers: 3,
            batch_size: 32,
            objective: Objective::Epsilon,
            layout_free: 0.5,
            grad_clip: 1.0,
            optimizer: AdamWParams {
                lr: 2e-4,
                weight_decay: 0.0,
                ..Default::default()
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out: PathBuf,
    /// A directory holding transformer/ (the base: the LCD stage's output).
    pub base: PathBuf,
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
pub struct AdapterRun {
    pub start_step: u64,
    pub records: Vec<StepRecord>,
    pub seconds_per_step: Vec<f64>,
    pub end_step: u64,
    pub prepare_seconds: f64,
    pub controlnet_dir: Option<PathBuf>,
}

/// The control image of a sample: its exact outline (`canny == false`) or Canny of its picture.
pub fn control_image(sample: &Sample, side: u32, canny: bool) -> Result<RgbImage> {
    if canny {
        return Ok(pixart::control::canny(
            &sample.scene.render(side),
            CANNY.0,
            CANNY.1,
        )?);
    }
    let edges = sample.scene.edges(side);
    Ok(RgbImage::from_fn(side, side, |x, y| {
        if edges.get(x, y) {
            Rgb([255, 255, 255])
        } else {
            Rgb([0, 0, 0])
        }
    }))
}

/// A fresh adapter as variables: block k copies base block k, the projections are zero.
pub fn init_varmap(
    base: &VarMap,
    base_config: &TransformerConfig,
    num_layers: usize,
    device: &Device,
) -> Result<VarMap> {
    if num_layers == 0 || num_layers >= base_config.num_layers {
        return Err(Error::InvalidInput {
            field: "num_layers",
            message: format!(
                "{num_layers}: must be in 1..{} (the base has {} blocks)",
                base_config.num_layers, base_config.num_layers
            ),
        });
    }
    let d = base_config.inner_dim();
    let varmap = VarMap::new();
    let base_vars = sorted_vars(base);
    let mut data = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
    for k in 0..num_layers {
        let prefix = format!("transformer_blocks.{k}.");
        for (name, var) in &base_vars {
            if let Some(rest) = name.strip_prefix(&prefix) {
                data.insert(
                    format!("controlnet_blocks.{k}.transformer_block.{rest}"),
                    Var::from_tensor(&var.as_tensor().detach().copy()?)?,
                );
            }
        }
        let mut zero = |name: String, dims: &[usize]| -> Result<()> {
            data.insert(
                name,
                Var::from_tensor(&Tensor::zeros(dims, DType::F32, device)?)?,
            );
            Ok(())
        };
        if k == 0 {
            zero(format!("controlnet_blocks.{k}.before_proj.weight"), &[d, d])?;
            zero(format!("controlnet_blocks.{k}.before_proj.bias"), &[d])?;
        }
        zero(format!("controlnet_blocks.{k}.after_proj.weight"), &[d, d])?;
        zero(format!("controlnet_blocks.{k}.after_proj.bias"), &[d])?;
    }
    drop(data);
    Ok(varmap)
}

/// Encodes the control images of `samples` (alternating outline / Canny by index) with the VAE.
pub fn control_latents(prep: &Prepared, side: u32) -> Result<Tensor> {
    let mut chunks = Vec::new();
    for (c, chunk) in prep.pool.samples.chunks(64).enumerate() {
        let images = chunk
            .iter()
            .enumerate()
            .map(|(j, s)| {
                crate::vae::image_to_tensor(
                    &control_image(s, side, (c * 64 + j) % 2 == 1)?,
                    &Device::Cpu,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        chunks.push(prep.vae.encode_mean(&Tensor::stack(&images, 0)?)?);
    }
    Ok(Tensor::cat(&chunks, 0)?)
}

/// Trains the adapter into `opts.out/checkpoint`, exporting `opts.out/controlnet`.
pub fn train(
    config: &AdapterConfig,
    opts: &RunOptions,
    device: &Device,
    mut on_step: impl FnMut(&StepRecord) -> ControlFlow<()>,
) -> Result<AdapterRun> {
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
    let controls = control_latents(&prep, config.image_size)?;
    let latent_shape = prep.latent_shape();
    let prepare_seconds = prep.seconds;
    let (pool, mut text) = (&prep.pool, prep.text);
    let (base_config, base_vars) = load_transformer_vars(&opts.base.join("transformer"), device)?;
    let base = PixArtTransformer::trainable(base_config.clone(), &base_vars)?;
    let varmap = init_varmap(&base_vars, &base_config, config.num_layers, device)?;
    let adapter_config = ControlNetConfig {
        num_layers: config.num_layers,
    };
    let adapter = ControlNetAdapter::new(
        adapter_config,
        &base_config,
        &Weights::from_varmap(&varmap)?,
    )?;
    let mut inputs = crate::inputs::frozen_inputs(&opts.vae, &opts.text, opts.dataset.as_deref());
    inputs.push(("base", opts.base.join("transformer")));
    let config_json = stage_config(config, &base_config, crate::inputs::fingerprints(&inputs)?);
    let vars = sorted_vars(&varmap);
    let mut optimizer = AdamW::new(vars.clone(), config.optimizer.clone())?;
    let (start, _) = stage::restore(
        &ckpt,
        opts.resume,
        STAGE,
        &config_json,
        &varmap,
        &mut optimizer,
        device,
    )?;
    let schedule = NoiseSchedule::pixart();
    let solver = DdimSolver::new(&schedule, DDIM_TIMESTEPS)?;
    let ac = schedule.alphas_cumprod;

    struct Steps<'a> {
        config: &'a AdapterConfig,
        base: &'a PixArtTransformer,
        adapter: &'a ControlNetAdapter,
        pool: &'a LatentPool,
        controls: &'a Tensor,
        text: &'a mut Text,
        ac: &'a [f64],
        solver: &'a DdimSolver,
        vars: &'a [(String, Var)],
        varmap: &'a VarMap,
        optimizer: &'a mut AdamW,
        latent_shape: &'a [usize],
        ckpt: &'a Path,
        config_json: &'a serde_json::Value,
    }
    impl stage::Trainer for Steps<'_> {
        type Record = StepRecord;
        fn step(&mut self, step: u64) -> Result<(StepRecord, f32)> {
            let device = self.base.device().clone();
            let mut rng = seed::rng(self.config.seed, step, Stream::Batch);
            let b = self.config.batch_size;
            let idx: Vec<u32> = (0..b)
                .map(|_| rng.random_range(0..self.config.dataset_size as u32))
                .collect();
            let t: Vec<usize> = (0..b)
                .map(|_| match self.config.objective {
                    Objective::Epsilon => rng.random_range(0..TRAIN_TIMESTEPS),
                    Objective::Consistency => {
                        self.solver.timesteps[rng.random_range(0..self.solver.timesteps.len())]
                    }
                })
                .collect();
            let mut shape = vec![b];
            shape.extend_from_slice(self.latent_shape);
            let noise = seed::randn(
                &mut seed::rng(self.config.seed, step, Stream::Noise),
                &shape,
                &device,
            )?;
            let index = Tensor::new(idx.as_slice(), &device)?;
            let x0 = self.pool.latents.index_select(&index, 0)?;
            let control = self.controls.index_select(&index, 0)?;
            let ac_t: Vec<f64> = t.iter().map(|&i| self.ac[i]).collect();
            let x_t = add_noise(&x0, &noise, &ac_t)?;
            // Drawn after the indices and timesteps, and only when asked for, so that a share of 0
            // reproduces the adapters trained before the option existed bit for bit.
            let captions: Vec<String> = idx
                .iter()
                .map(|&i| {
                    let sample = &self.pool.samples[i as usize];
                    if self.config.layout_free > 0.0 && rng.random_bool(self.config.layout_free) {
                        let template = rng.random_range(0..crate::caption::LAYOUT_FREE_TEMPLATES);
                        sample.layout_free_caption(template)
                    } else {
                        sample.caption.clone()
                    }
                })
                .collect();
            let prompts: Vec<Option<&str>> = captions.iter().map(|c| Some(c.as_str())).collect();
            let (y, mask) = self.text.batch(&prompts)?;
            let ts = Tensor::from_vec(t.iter().map(|&v| v as f32).collect::<Vec<_>>(), b, &device)?;
            let shards = shard::default_shards(b);
            let (adapter, base, objective) = (self.adapter, self.base, self.config.objective);
            let (grads, outs) = shard::backward(b, &shards, self.vars, |r| {
                let rows = |t: &Tensor| t.narrow(0, r.start, r.len());
                let (x0, x_t, noise) = (rows(&x0)?, rows(&x_t)?, rows(&noise)?);
                let control = rows(&control)?;
                let cond = ControlCondition {
                    latents: &control,
                    scale: &[1.0],
                };
                let out = adapter.forward(
                    base,
                    &x_t,
                    &rows(&ts)?,
                    &rows(&y)?,
                    Some(&rows(&mask)?),
                    None,
                    &cond,
                )?;
                let c = x0.dim(1)?;
                let eps = out.narrow(1, 0, c)?;
                let loss = match objective {
                    Objective::Epsilon => (eps - &noise)?.sqr()?.mean_all()?,
                    Objective::Consistency => {
                        let x0_hat = predict_x0(&x_t, &eps, &ac_t[r.clone()])?;
                        (consistency_output(&x_t, &x0_hat, &t[r.clone()])? - &x0)?
                            .sqr()?
                            .mean_all()?
                    }
                };
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
            checkpoint::save(
                self.ckpt,
                STAGE,
                step,
                self.config_json,
                self.varmap,
                self.optimizer,
            )
        }
    }
    let mut steps = Steps {
        config,
        base: &base,
        adapter: &adapter,
        pool,
        controls: &controls,
        text: &mut text,
        ac: &ac,
        solver: &solver,
        vars: &vars,
        varmap: &varmap,
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
    let mut run = AdapterRun {
        start_step: start,
        end_step: driven.end_step,
        records: driven.records,
        seconds_per_step: driven.seconds_per_step,
        prepare_seconds,
        controlnet_dir: None,
    };
    if !driven.interrupted {
        let dir = opts.out.join("controlnet");
        crate::dit::save_tensors(&varmap, &dir, pixart::controlnet::WEIGHTS_FILE)?;
        let path = dir.join(pixart::controlnet::CONFIG_FILE);
        std::fs::write(&path, adapter_config.to_json_string())
            .map_err(|source| Error::Io { path, source })?;
        run.controlnet_dir = Some(dir);
    }
    Ok(run)
}
