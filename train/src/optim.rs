//! AdamW whose moments can be saved and restored, and global-norm gradient clipping.
//!
//! `candle_nn::AdamW` keeps its first and second moments private, so a resumed run would restart them at
//! zero: the first steps after a resume would then be bias-corrected from an empty history and differ from
//! the uninterrupted run. This AdamW is the same update (PyTorch's `AdamW`, decoupled weight decay) with
//! its state exposed as named tensors for the checkpoint. candle-nn has no gradient clipping either.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// AdamW hyperparameters (PyTorch's defaults except the learning rate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    /// The peak learning rate ([`LrSchedule`] scales it per step).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Left out of a saved config while constant, so configs written before schedules existed still
    /// match on resume.
    #[serde(default, skip_serializing_if = "LrSchedule::is_constant")]
    pub schedule: LrSchedule,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            schedule: LrSchedule::Constant,
        }
    }
}

impl AdamWParams {
    /// Names what is wrong: a rate that is not positive, or a schedule's numbers.
    pub fn validate(&self) -> Result<()> {
        if !self.lr.is_finite() || self.lr <= 0.0 {
            return Err(Error::InvalidInput {
                field: "optimizer.lr",
                message: format!("{} must be positive", self.lr),
            });
        }
        self.schedule.validate()
    }
}

/// How the learning rate moves over a run. Part of the run's config: a resumed run continues the same
/// curve, and one with another schedule is refused like any other config change.
///
/// Why a decay at all: at a constant rate the VAE's reconstruction stopped improving and then got
/// worse (held-out MSE 0.0228 at 2,000 steps, 0.0328 at 3,000); the optimiser's noise floor is set by
/// the rate, and annealing it is the usual way under it.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum LrSchedule {
    #[default]
    Constant,
    /// A linear warm-up from 0 over `warmup` steps, then a half cosine from the peak down to
    /// `floor` × peak at step `steps`, and `floor` × peak after that.
    Cosine { warmup: u64, steps: u64, floor: f64 },
}

/// Where [`LrSchedule::cosine`] ends: a tenth of the peak rate.
pub const COSINE_FLOOR: f64 = 0.1;

impl LrSchedule {
    /// Warm-up over `warmup` steps, then a half cosine to [`COSINE_FLOOR`] × peak at step `steps`.
    pub fn cosine(warmup: u64, steps: u64) -> Self {
        LrSchedule::Cosine {
            warmup,
            steps,
            floor: COSINE_FLOOR,
        }
    }

    pub fn is_constant(&self) -> bool {
        *self == LrSchedule::Constant
    }

    /// The factor on the peak rate for the update after `done` updates (0 for the first).
    pub fn factor(&self, done: u64) -> f64 {
        match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Cosine {
                warmup,
                steps,
                floor,
            } => {
                if done < warmup {
                    return (done + 1) as f64 / warmup as f64;
                }
                let span = steps.saturating_sub(warmup).max(1) as f64;
                let progress = ((done - warmup) as f64 / span).min(1.0);
                floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }

    /// Names what is wrong with the schedule's numbers.
    pub fn validate(&self) -> Result<()> {
        if let LrSchedule::Cosine {
            warmup,
            steps,
            floor,
        } = *self
        {
            if !(0.0..=1.0).contains(&floor) {
                return Error::invalid(
                    "optimizer.schedule",
                    format!("floor {floor} must be within 0..=1"),
                );
            }
            if warmup > steps {
                return Error::invalid(
                    "optimizer.schedule",
                    format!("warmup {warmup} is longer than the {steps} steps"),
                );
            }
        }
        Ok(())
    }
}

/// AdamW over named variables.
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates taken so far (the bias correction's `t`).
    t: u64,
    pub params: AdamWParams,
}

impl AdamW {
    /// Fresh moments (zero) for `vars`.
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            vars,
            m,
            v,
            t: 0,
            params,
        })
    }

    /// Updates taken so far.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// One update. Every variable must have a gradient in `grads`: one without is a cut graph, reported as
    /// [`Error::NoGradient`] rather than skipped.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let p = &self.params;
        let lr = p.lr * p.schedule.factor(self.t);
        self.t += 1;
        let t = self.t as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2 = 1.0 - p.beta2.powi(t);
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let g = grads
                .get(var.as_tensor())
                .ok_or_else(|| Error::NoGradient { name: name.clone() })?;
            let m = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + p.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            // Detached: the gradient carries the backward graph (and through it the step's forward
            // activations); kept as is, each moment would hold every earlier step's graph alive
            // (≈300 MB more per step for the default VAE).
            self.m[i] = m.detach();
            self.v[i] = v.detach();
        }
        Ok(())
    }

    /// The moments as `m.<name>` / `v.<name>` tensors, for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::with_capacity(2 * self.vars.len());
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`] after `t` updates. `path` is the file they came from, for
    /// errors: every variable's two moments must be there with its shape, and nothing else.
    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
        t: u64,
        path: &Path,
    ) -> Result<()> {
        let err = |field: String, message: String| Error::Checkpoint {
            path: path.to_path_buf(),
            field,
            message,
        };
        if state.len() != 2 * self.vars.len() {
            return Err(err(
                "tensors".into(),
                format!(
                    "holds {} tensors, expected 2 moments for each of the {} variables",
                    state.len(),
                    self.vars.len()
                ),
            ));
        }
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (key, slot) in [
                (format!("m.{name}"), &mut self.m[i]),
                (format!("v.{name}"), &mut self.v[i]),
            ] {
                let t = state
                    .get(&key)
                    .ok_or_else(|| err(key.clone(), "is missing".into()))?;
                if t.dims() != var.dims() {
                    return Err(err(
                        key,
                        format!("has shape {:?}, the variable {:?}", t.dims(), var.dims()),
                    ));
                }
                *slot = t.to_dtype(var.dtype())?.to_device(var.device())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Scales the gradients of `vars` so that their global L2 norm is at most `max_norm` (as PyTorch's
/// `clip_grad_norm_`), and returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let mut sum = 0f64;
    for (_, var) in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            sum += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sum.sqrt();
    if norm > max_norm && norm.is_finite() {
        let scale = max_norm / (norm + 1e-6);
        for (_, var) in vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let scaled = (g * scale)?;
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Runs `steps` updates of `params` on a 2×2 variable beside candle-nn's AdamW, whose rate is set
    /// before every step to peak × the schedule's factor (the weight decay scaled with it, as in
    /// PyTorch's schedulers); returns ours and the largest difference between the two variables.
    fn beside_candle_adamw(params: AdamWParams, steps: u64) -> (AdamW, f32) {
        use candle_nn::Optimizer;
        let d = Device::Cpu;
        let init = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.1]], &d).unwrap();
        let a = Var::from_tensor(&init).unwrap();
        let b = Var::from_tensor(&init).unwrap();
        let mut ours = AdamW::new(vec![("w".into(), a.clone())], params.clone()).unwrap();
        let mut theirs = candle_nn::AdamW::new(
            vec![b.clone()],
            candle_nn::ParamsAdamW {
                lr: params.lr,
                beta1: params.beta1,
                beta2: params.beta2,
                eps: params.eps,
                weight_decay: params.weight_decay,
            },
        )
        .unwrap();
        for step in 0..steps {
            let la = a.as_tensor().sqr().unwrap().sum_all().unwrap();
            ours.step(&la.backward().unwrap()).unwrap();
            theirs.set_learning_rate(params.lr * params.schedule.factor(step));
            let lb = b.as_tensor().sqr().unwrap().sum_all().unwrap();
            theirs.step(&lb.backward().unwrap()).unwrap();
        }
        let diff = (a.as_tensor() - b.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        (ours, diff)
    }

    /// Matches candle-nn's AdamW (the same update written independently) over a few steps.
    #[test]
    fn same_updates_as_candle_adamw() {
        let params = AdamWParams {
            lr: 0.05,
            ..Default::default()
        };
        let (ours, diff) = beside_candle_adamw(params, 5);
        assert!(diff < 1e-6, "{diff}");
        assert_eq!(ours.steps(), 5);
        // The moments hold values, not the graph of the steps that made them (a leak of every step's
        // activations otherwise).
        for (name, t) in ours.state() {
            assert!(!t.track_op(), "moment `{name}` keeps its autograd graph");
        }
    }

    /// A scheduled run is candle-nn's AdamW with its rate set before every step to peak × factor.
    #[test]
    fn a_cosine_schedule_steps_as_candle_adamw_at_the_scheduled_rate() {
        let params = AdamWParams {
            lr: 0.05,
            schedule: LrSchedule::Cosine {
                warmup: 2,
                steps: 6,
                floor: 0.1,
            },
            ..Default::default()
        };
        let (_, diff) = beside_candle_adamw(params, 8);
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn cosine_warms_up_peaks_and_ends_at_its_floor() {
        let s = LrSchedule::Cosine {
            warmup: 4,
            steps: 104,
            floor: 0.1,
        };
        assert_eq!(s.factor(0), 0.25);
        assert_eq!(s.factor(3), 1.0);
        assert_eq!(s.factor(4), 1.0);
        assert!((s.factor(54) - 0.55).abs() < 1e-12, "{}", s.factor(54));
        assert!((s.factor(104) - 0.1).abs() < 1e-12);
        assert!((s.factor(500) - 0.1).abs() < 1e-12);
        let mut last = 1.0;
        for done in 4..=104 {
            assert!(s.factor(done) <= last);
            last = s.factor(done);
        }
        assert_eq!(LrSchedule::Constant.factor(7), 1.0);
        let long_warmup = LrSchedule::Cosine {
            warmup: 10,
            steps: 5,
            floor: 0.0,
        };
        let e = long_warmup.validate().unwrap_err().to_string();
        assert!(
            e.contains("optimizer.schedule") && e.contains("warmup"),
            "{e}"
        );
        // A constant schedule is left out of a saved config (older checkpoints' configs still match).
        let json = serde_json::to_value(AdamWParams::default()).unwrap();
        assert!(json.get("schedule").is_none(), "{json}");
    }

    #[test]
    fn a_variable_without_gradient_is_an_error_naming_it() {
        let d = Device::Cpu;
        let a = Var::zeros(2, DType::F32, &d).unwrap();
        let cut = Var::zeros(2, DType::F32, &d).unwrap();
        let mut opt = AdamW::new(
            vec![("a".into(), a.clone()), ("cut".into(), cut)],
            AdamWParams::default(),
        )
        .unwrap();
        let grads = a.as_tensor().sum_all().unwrap().backward().unwrap();
        let e = opt.step(&grads).unwrap_err().to_string();
        assert!(e.contains("`cut`"), "{e}");
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let d = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[3f32, 4.0], &d).unwrap()).unwrap();
        let vars = vec![("a".to_string(), a.clone())];
        // d/da of sum(a²)/2 = a: norm 5.
        let mut grads = (a.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5)
            .unwrap()
            .backward()
            .unwrap();
        let norm = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let g = grads.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            (g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5,
            "{g:?}"
        );
    }
}
