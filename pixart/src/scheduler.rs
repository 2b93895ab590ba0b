//! The latent-consistency (LCM) sampler with the PixArt-LCM settings.
//!
//! This is a port of diffusers' `LCMScheduler` restricted to what PixArt-LCM needs, but with the
//! numerics kept identical so golden tensors from Python match:
//!
//! * the noise schedule (`betas`, `alphas_cumprod`) is computed in **f32** the way torch does it
//!   (`torch.linspace` in f32, then a sequential f32 `cumprod`), because diffusers keeps it in f32
//!   and the last digits of ᾱ change the result at the 1e-6 level;
//! * timesteps come from the 50-step distillation grid, selected either like diffusers >= 0.24
//!   ([`TimestepSpacing::Diffusers`], the default) or like the original PixArt repository
//!   ([`TimestepSpacing::Original`]); the two differ for 3+ steps (spec §4.3);
//! * the boundary-condition scalings use `timestep_scaling` (10 when the config predates the key)
//!   and σ_data = 0.5;
//! * the noise injected between steps is *given* to [`LcmScheduler::step`] instead of drawn
//!   inside it, so the pipeline can draw it per batch item from that item's own seed
//!   ([`SeededNoise`]) and the conformance harness can feed reference noise.
//!
//! ```
//! use pixart::pipeline::TimestepSpacing;
//! use pixart::scheduler::{LcmScheduler, LcmSchedulerConfig};
//! let s = LcmScheduler::new(&LcmSchedulerConfig::pixart_lcm(), 4, TimestepSpacing::Diffusers).unwrap();
//! assert_eq!(s.timesteps(), &[999, 759, 499, 259]);
//! ```

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::Value;

use crate::pipeline::TimestepSpacing;
use crate::{Error, Result};

/// How the betas are laid out over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, T)` — what PixArt was trained with.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), T)²` — the SD family.
    ScaledLinear,
}

/// What the network predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    Sample,
    VPrediction,
}

/// The subset of diffusers' `scheduler_config.json` that changes the LCM math.
///
/// Keys that exist in diffusers but do not affect LCM sampling (`steps_offset`,
/// `timestep_spacing`, `dynamic_thresholding_ratio`, `sample_max_value`, the `_…` bookkeeping
/// keys) are accepted and ignored; any other key is an error, so typos do not pass silently.
#[derive(Debug, Clone, PartialEq)]
pub struct LcmSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Explicit betas; when present they replace `beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    pub original_inference_steps: usize,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub prediction_type: PredictionType,
    pub timestep_scaling: f64,
}

impl Default for LcmSchedulerConfig {
    fn default() -> Self {
        Self::pixart_lcm()
    }
}

/// σ_data of the consistency-model boundary condition (fixed in diffusers and in the PixArt code).
const SIGMA_DATA: f64 = 0.5;

/// Keys diffusers writes that are irrelevant to `LCMScheduler`'s LCM path.
const IGNORED_KEYS: &[&str] = &[
    "steps_offset",
    "timestep_spacing",
    "dynamic_thresholding_ratio",
    "sample_max_value",
];

impl LcmSchedulerConfig {
    /// The settings of `PixArt-alpha/PixArt-LCM-XL-2-1024-MS/scheduler` (spec §1.3).
    pub fn pixart_lcm() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            original_inference_steps: 50,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            prediction_type: PredictionType::Epsilon,
            timestep_scaling: 10.0,
        }
    }

    /// Reads `scheduler_config.json` (a file, or a directory holding it).
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("scheduler_config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|source| Error::Io {
            path: file.clone(),
            source,
        })?;
        Self::from_json_str(&text, &file)
    }

    /// Parses the JSON text of a scheduler config; `path` is only used in error messages.
    ///
    /// Missing keys take diffusers' `LCMScheduler` defaults, except that the beta schedule
    /// defaults are diffusers' (scaled-linear 0.00085→0.012) — PixArt's file states its own.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let err = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let value: Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(err("expected a JSON object".into()));
        };
        // diffusers' LCMScheduler defaults (not PixArt's), so a sparse file means what it means in Python.
        let mut cfg = Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            original_inference_steps: 50,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            prediction_type: PredictionType::Epsilon,
            timestep_scaling: 10.0,
        };
        let num = |k: &str, v: &Value| {
            v.as_f64()
                .ok_or_else(|| err(format!("key `{k}` must be a number, got {v}")))
        };
        let uint = |k: &str, v: &Value| {
            v.as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| err(format!("key `{k}` must be a positive integer, got {v}")))
        };
        let boolean = |k: &str, v: &Value| {
            v.as_bool()
                .ok_or_else(|| err(format!("key `{k}` must be true or false, got {v}")))
        };
        for (key, v) in &map {
            match key.as_str() {
                k if k.starts_with('_') => {}
                k if IGNORED_KEYS.contains(&k) => {}
                "num_train_timesteps" => cfg.num_train_timesteps = uint(key, v)?,
                "beta_start" => cfg.beta_start = num(key, v)?,
                "beta_end" => cfg.beta_end = num(key, v)?,
                "beta_schedule" => {
                    cfg.beta_schedule = match v.as_str() {
                        Some("linear") => BetaSchedule::Linear,
                        Some("scaled_linear") => BetaSchedule::ScaledLinear,
                        _ => {
                            return Err(err(format!(
                                "key `beta_schedule`: unsupported value {v} (expected \"linear\" or \"scaled_linear\")"
                            )));
                        }
                    }
                }
                "trained_betas" => {
                    cfg.trained_betas = match v {
                        Value::Null => None,
                        Value::Array(items) => Some(
                            items
                                .iter()
                                .map(|x| {
                                    x.as_f64().ok_or_else(|| {
                                        err(format!("key `trained_betas`: non-numeric entry {x}"))
                                    })
                                })
                                .collect::<Result<Vec<_>>>()?,
                        ),
                        _ => {
                            return Err(err(format!(
                                "key `trained_betas` must be null or a list of numbers, got {v}"
                            )));
                        }
                    }
                }
                "original_inference_steps" => cfg.original_inference_steps = uint(key, v)?,
                "clip_sample" => cfg.clip_sample = boolean(key, v)?,
                "clip_sample_range" => cfg.clip_sample_range = num(key, v)?,
                "set_alpha_to_one" => cfg.set_alpha_to_one = boolean(key, v)?,
                "prediction_type" => {
                    cfg.prediction_type = match v.as_str() {
                        Some("epsilon") => PredictionType::Epsilon,
                        Some("sample") => PredictionType::Sample,
                        Some("v_prediction") => PredictionType::VPrediction,
                        _ => {
                            return Err(err(format!(
                                "key `prediction_type`: unsupported value {v} (expected \"epsilon\", \"sample\" or \"v_prediction\")"
                            )));
                        }
                    }
                }
                "timestep_scaling" => cfg.timestep_scaling = num(key, v)?,
                "thresholding" => {
                    if boolean(key, v)? {
                        return Err(err("key `thresholding`: dynamic thresholding is not supported (PixArt-LCM does not use it); set it to false".into()));
                    }
                }
                "rescale_betas_zero_snr" => {
                    if boolean(key, v)? {
                        return Err(err("key `rescale_betas_zero_snr`: zero-terminal-SNR rescaling is not supported (PixArt-LCM does not use it); set it to false".into()));
                    }
                }
                other => return Err(err(format!("unknown key `{other}` for an LCM scheduler"))),
            }
        }
        if let Some(b) = &cfg.trained_betas
            && b.len() != cfg.num_train_timesteps
        {
            return Err(err(format!(
                "key `trained_betas` has {} entries but `num_train_timesteps` is {}",
                b.len(),
                cfg.num_train_timesteps
            )));
        }
        if cfg.original_inference_steps > cfg.num_train_timesteps {
            return Err(err(format!(
                "key `original_inference_steps` ({}) exceeds `num_train_timesteps` ({})",
                cfg.original_inference_steps, cfg.num_train_timesteps
            )));
        }
        if !(cfg.beta_start > 0.0
            && cfg.beta_end > 0.0
            && cfg.beta_start < 1.0
            && cfg.beta_end < 1.0)
        {
            return Err(err("keys `beta_start`/`beta_end` must lie in (0, 1)".into()));
        }
        Ok(cfg)
    }

    /// ᾱ_t for every training timestep, bit-identical to diffusers' f32 `alphas_cumprod`.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let betas: Vec<f32> = match (&self.trained_betas, self.beta_schedule) {
            (Some(b), _) => b.iter().map(|&x| x as f32).collect(),
            (None, BetaSchedule::Linear) => torch_linspace_f32(self.beta_start, self.beta_end, n),
            (None, BetaSchedule::ScaledLinear) => {
                torch_linspace_f32(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|x| x * x)
                    .collect()
            }
        };
        // `alphas = 1 - betas` in f32; torch's CPU `cumprod` accumulates f32 in f64 and rounds
        // each prefix product to f32.
        let mut acc = 1f64;
        betas
            .into_iter()
            .map(|b| {
                acc *= (1f32 - b) as f64;
                acc as f32
            })
            .collect()
    }
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU: the step is computed in
/// f32, the first half counts up from `start` and the second half down from `end` (ATen's
/// `LinspaceKernel`), each with a fused multiply-add — a naive `start + i*step` differs in the
/// last bit for ~20 % of the entries.
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start as f32];
    }
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((steps - i - 1) as f32, e)
            }
        })
        .collect()
}

/// The two results of one LCM step.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The sample to feed the next step (noise already injected); equals `denoised` on the last step.
    pub prev_sample: Tensor,
    /// The consistency function's output (the clean-latent estimate).
    pub denoised: Tensor,
}

/// An LCM schedule for a fixed number of steps.
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    config: LcmSchedulerConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<usize>,
}

impl LcmScheduler {
    /// Builds the schedule for `num_steps` steps (1..=`original_inference_steps`).
    pub fn new(
        config: &LcmSchedulerConfig,
        num_steps: usize,
        spacing: TimestepSpacing,
    ) -> Result<Self> {
        let origin = config.original_inference_steps;
        if num_steps == 0 || num_steps > origin {
            return Err(Error::InvalidInput {
                field: "steps",
                message: format!(
                    "must be between 1 and {origin} for an LCM schedule, got {num_steps}"
                ),
            });
        }
        let k = config.num_train_timesteps / origin;
        // Distillation grid [k-1, 2k-1, …, origin*k-1], reversed so index 0 is the noisiest.
        let grid: Vec<usize> = (1..=origin).rev().map(|i| i * k - 1).collect();
        let timesteps = match spacing {
            TimestepSpacing::Diffusers => (0..num_steps)
                // floor(linspace(0, origin, n, endpoint=False)) computed as numpy does (f64).
                .map(|i| grid[(i as f64 * (origin as f64 / num_steps as f64)).floor() as usize])
                .collect(),
            TimestepSpacing::Original => {
                let skip = origin / num_steps;
                grid.iter().step_by(skip).take(num_steps).copied().collect()
            }
        };
        let alphas_cumprod = config.alphas_cumprod();
        // Every LCM timestep is >= k-1 >= 0, so diffusers' `final_alpha_cumprod` (used for t' < 0)
        // is never reached and `set_alpha_to_one` has no effect here.
        Ok(Self {
            config: config.clone(),
            alphas_cumprod,
            timesteps,
        })
    }

    /// The timesteps in sampling order (noisiest first).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    pub fn config(&self) -> &LcmSchedulerConfig {
        &self.config
    }

    /// ᾱ for every training timestep (f32, as diffusers holds them).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// `(c_skip, c_out)` of the consistency boundary condition at timestep `t`, in f32 as torch
    /// computes them from an integer tensor times a Python float.
    pub fn boundary_scalings(&self, t: usize) -> (f32, f32) {
        let s = (t as f64 * self.config.timestep_scaling) as f32;
        let sd2 = (SIGMA_DATA * SIGMA_DATA) as f32;
        let c_skip = sd2 / (s * s + sd2);
        let c_out = s / (s * s + sd2).sqrt();
        (c_skip, c_out)
    }

    /// One LCM step at `step_index` (0-based).
    ///
    /// `model_output` is the network's prediction (ε for PixArt, already reduced to the latent
    /// channels), `sample` the current latents (f32). `noise` is the Gaussian noise injected into
    /// the next sample; it is required for every step except the last and ignored on the last.
    pub fn step(
        &self,
        step_index: usize,
        model_output: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        let n = self.timesteps.len();
        if step_index >= n {
            return Err(Error::InvalidInput {
                field: "step_index",
                message: format!("{step_index} is past the last of {n} steps"),
            });
        }
        let t = self.timesteps[step_index];
        let last = step_index + 1 == n;
        let alpha_t = self.alphas_cumprod[t];
        let alpha_prev = if last {
            alpha_t
        } else {
            self.alphas_cumprod[self.timesteps[step_index + 1]]
        };
        let beta_t = 1f32 - alpha_t;
        let (c_skip, c_out) = self.boundary_scalings(t);
        let eps = model_output.to_dtype(sample.dtype())?;
        let x0 = match self.config.prediction_type {
            PredictionType::Epsilon => {
                ((sample - (eps * beta_t.sqrt() as f64)?)? / alpha_t.sqrt() as f64)?
            }
            PredictionType::Sample => eps,
            PredictionType::VPrediction => {
                ((sample * alpha_t.sqrt() as f64)? - (eps * beta_t.sqrt() as f64)?)?
            }
        };
        let x0 = if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        let denoised = ((x0 * c_out as f64)? + (sample * c_skip as f64)?)?;
        let prev_sample = if last {
            denoised.clone()
        } else {
            let noise = noise.ok_or_else(|| Error::InvalidInput {
                field: "noise",
                message: format!("step {step_index} of {n} needs the noise to inject"),
            })?;
            let noise = noise.to_dtype(denoised.dtype())?;
            ((&denoised * alpha_prev.sqrt() as f64)?
                + (noise * (1f32 - alpha_prev).sqrt() as f64)?)?
        };
        Ok(StepOutput {
            prev_sample,
            denoised,
        })
    }
}

/// A per-image Gaussian noise stream: ChaCha20 seeded with the item's seed, standard normals drawn
/// on the CPU in f32.
///
/// Drawing on the CPU, from a portable generator, makes a seed mean the same image on every device
/// and in every batch: the initial latents are the first `4·h·w` values and the noise injected
/// after step *i* the next `4·h·w` values, and nothing else reads from the stream.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: ChaCha20Rng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }

    /// The next `shape.elem_count()` standard-normal values as an f32 tensor on `device`.
    pub fn next_tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let count: usize = shape.iter().product();
        let data: Vec<f32> = (0..count)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect();
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(n: usize, spacing: TimestepSpacing) -> Vec<usize> {
        LcmScheduler::new(&LcmSchedulerConfig::pixart_lcm(), n, spacing)
            .unwrap()
            .timesteps()
            .to_vec()
    }

    #[test]
    fn timesteps_match_spec_table() {
        use TimestepSpacing::*;
        assert_eq!(sched(1, Diffusers), [999]);
        assert_eq!(sched(2, Diffusers), [999, 499]);
        assert_eq!(sched(4, Diffusers), [999, 759, 499, 259]);
        assert_eq!(
            sched(8, Diffusers),
            [999, 879, 759, 639, 499, 379, 259, 139]
        );
        assert_eq!(sched(1, Original), [999]);
        assert_eq!(sched(2, Original), [999, 499]);
        assert_eq!(sched(4, Original), [999, 759, 519, 279]);
        assert_eq!(sched(8, Original), [999, 879, 759, 639, 519, 399, 279, 159]);
    }

    #[test]
    fn alphas_match_spec_values() {
        let a = LcmSchedulerConfig::pixart_lcm().alphas_cumprod();
        for (t, want) in [
            (999, 4.0358e-5),
            (759, 2.8768e-3),
            (499, 7.8587e-2),
            (259, 4.9761e-1),
            (519, 6.3954e-2),
            (279, 4.4593e-1),
        ] {
            let got = a[t] as f64;
            assert!(
                ((got - want) / want).abs() < 1e-3,
                "alpha[{t}] = {got}, spec {want}"
            );
        }
    }

    #[test]
    fn config_rejects_unknown_and_invalid_keys() {
        let p = Path::new("scheduler_config.json");
        let e = LcmSchedulerConfig::from_json_str(r#"{"beta_strat": 0.1}"#, p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta_strat"), "{e}");
        let e = LcmSchedulerConfig::from_json_str(r#"{"beta_schedule": "cosine"}"#, p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta_schedule"), "{e}");
        let e = LcmSchedulerConfig::from_json_str(r#"{"original_inference_steps": -3}"#, p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("original_inference_steps"), "{e}");
        let ok = LcmSchedulerConfig::from_json_str(
            r#"{"_class_name":"LCMScheduler","beta_schedule":"linear","beta_start":0.0001,"beta_end":0.02,"steps_offset":0,"timestep_spacing":"leading","thresholding":false,"trained_betas":null}"#,
            p,
        )
        .unwrap();
        assert_eq!(ok, LcmSchedulerConfig::pixart_lcm());
    }

    #[test]
    fn seeded_noise_is_reproducible_and_seed_dependent() {
        let draw = |seed| {
            SeededNoise::new(seed)
                .next_tensor(&[2, 3], &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b, c) = (draw(7), draw(7), draw(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
