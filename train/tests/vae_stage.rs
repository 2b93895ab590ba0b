//! The VAE stage (`pixart_train::vae`) and the training-loop foundation it runs on:
//!
//! * every variable of the SD-architecture VAE receives a finite, non-zero gradient (no cut graph; the
//!   attention key biases, exactly 0 by softmax shift invariance, only finite);
//! * a few steps keep the loss finite and lower it, and lower the deterministic reconstruction error;
//! * a run killed between saves resumes from its last checkpoint, losing at most one save interval, and
//!   ends bit-for-bit where the uninterrupted run ends (parameters and AdamW moments both restored);
//! * a checkpoint of another stage, or resuming with a different config, is an error naming `state.json`
//!   and the field; an existing checkpoint without `--resume` is refused; a diverging run stops with the
//!   stage and step;
//! * the exported `vae/` is a diffusers VAE that `pixart::vae::Vae` loads, computes what training computed,
//!   and round-trips images better than the same export at initialisation.

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use pixart_train::Error;
use pixart_train::checkpoint;
use pixart_train::dataset::Split;
use pixart_train::seed::{self, Stream};
use pixart_train::shard::ranges;
use pixart_train::vae::{self, RunOptions, TrainableVae, VaeTrainConfig};
use pixart_train::varmap::sorted_vars;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The SD layout (4 levels: ×8, mid-block attention) at the smallest widths GroupNorm allows.
fn tiny() -> VaeTrainConfig {
    let mut c = VaeTrainConfig {
        seed: 3,
        dataset_size: 64,
        block_out_channels: vec![8, 8, 8, 8],
        norm_num_groups: 4,
        batch_size: 2,
        ..Default::default()
    };
    c.optimizer.lr = 3e-3;
    c
}

fn opts(out: &Path, steps: u64, save_every: u64, resume: bool) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        steps,
        save_every,
        resume,
        progress: false,
        dataset: None,
    }
}

fn run(config: &VaeTrainConfig, o: &RunOptions) -> pixart_train::Result<vae::VaeRun> {
    vae::train(config, o, &Device::Cpu, |_| ControlFlow::Continue(()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// A fresh model of `config`, its first two training images and posterior noise for them.
fn two_images(config: &VaeTrainConfig) -> Result<(TrainableVae, Tensor, Tensor)> {
    let model = TrainableVae::new(config, &Device::Cpu)?;
    let x = vae::training_images(config, 2, &Device::Cpu)?;
    let noise = seed::randn(
        &mut seed::rng(1, 0, Stream::Noise),
        &[2, 4, 8, 8],
        &Device::Cpu,
    )?;
    Ok((model, x, noise))
}

#[test]
fn every_variable_gets_a_gradient() -> Result<()> {
    let config = tiny();
    let (model, x, noise) = two_images(&config)?;
    let loss = model.loss(&x, &noise)?;
    let grads = loss.total.backward()?;
    let vars = sorted_vars(model.varmap());
    assert!(vars.len() > 100, "{} variables", vars.len());
    let mut missing = Vec::new();
    for (name, var) in &vars {
        match grads.get(var.as_tensor()) {
            None => missing.push(format!("{name}: none")),
            Some(g) => {
                let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
                // The attention key bias adds the same amount to every score of a query row, which
                // softmax cancels: its exact gradient is 0 and only rounding noise may show.
                let zero_ok = name.ends_with("to_k.bias");
                if !norm.is_finite() || (norm == 0.0 && !zero_ok) {
                    missing.push(format!("{name}: |g|² = {norm}"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "variables without a usable gradient: {missing:#?}"
    );
    Ok(())
}

#[test]
fn a_few_steps_lower_the_loss_and_the_reconstruction_error() -> Result<()> {
    let config = tiny();
    let dir = tempfile::tempdir()?;
    // Per-step losses swing with the batch (batch 2 of very different images), so the loss is compared on
    // one fixed batch with fixed posterior noise, before and after training.
    let probe = vae::training_images(&config, 8, &Device::Cpu)?;
    let noise = seed::randn(
        &mut seed::rng(9, 0, Stream::Noise),
        &[8, 4, 8, 8],
        &Device::Cpu,
    )?;
    let init = TrainableVae::new(&config, &Device::Cpu)?;
    let loss_before = init.loss(&probe, &noise)?.total.to_scalar::<f32>()?;
    let recon_before = init.reconstruction_mse(&probe)?;
    let r = run(&config, &opts(dir.path(), 30, 100, false))?;
    assert_eq!(r.records.len(), 30);
    assert!(
        r.records
            .iter()
            .all(|s| s.loss.is_finite() && s.grad_norm.is_finite()),
        "{:?}",
        r.records
    );
    // The trained weights, read back from the checkpoint the run saved.
    let model = TrainableVae::new(&config, &Device::Cpu)?;
    let loaded = checkpoint::load(
        &checkpoint::dir(dir.path()),
        vae::STAGE,
        &serde_json::to_value(&config)?,
        &Device::Cpu,
    )?;
    checkpoint::restore_varmap(model.varmap(), &loaded.params, Path::new("params"))?;
    let loss_after = model.loss(&probe, &noise)?.total.to_scalar::<f32>()?;
    let recon_after = model.reconstruction_mse(&probe)?;
    eprintln!(
        "fixed-batch loss {loss_before} → {loss_after}, reconstruction mse {recon_before} → {recon_after}"
    );
    assert!(
        loss_after.is_finite() && loss_after < 0.8 * loss_before,
        "loss {loss_before} → {loss_after}"
    );
    assert!(
        recon_after < 0.8 * recon_before,
        "reconstruction mse {recon_before} → {recon_after}"
    );
    Ok(())
}

#[test]
fn the_same_seed_gives_the_same_run() -> Result<()> {
    let config = tiny();
    let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let ra = run(&config, &opts(a.path(), 3, 10, false))?;
    let rb = run(&config, &opts(b.path(), 3, 10, false))?;
    let losses = |r: &vae::VaeRun| r.records.iter().map(|s| s.loss).collect::<Vec<_>>();
    assert_eq!(losses(&ra), losses(&rb));
    let other = VaeTrainConfig { seed: 4, ..config };
    let c = tempfile::tempdir()?;
    let rc = run(&other, &opts(c.path(), 3, 10, false))?;
    assert_ne!(losses(&ra), losses(&rc));
    Ok(())
}

#[test]
fn an_interrupted_run_resumes_from_its_last_checkpoint_to_the_same_state() -> Result<()> {
    let config = tiny();
    let (whole, cut) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let full = run(&config, &opts(whole.path(), 6, 2, false))?;
    // Killed after step 5: the checkpoint of step 4 is the last one, one step is lost.
    let killed = vae::train(&config, &opts(cut.path(), 6, 2, false), &Device::Cpu, |r| {
        if r.step == 5 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    assert_eq!((killed.end_step, killed.vae_dir.as_deref()), (5, None));
    let state: checkpoint::State = serde_json::from_str(&std::fs::read_to_string(
        checkpoint::dir(cut.path()).join(checkpoint::STATE_FILE),
    )?)?;
    assert_eq!(
        (state.stage.as_str(), state.step, state.optimizer_steps),
        ("vae", 4, 4)
    );
    let resumed = run(&config, &opts(cut.path(), 6, 2, true))?;
    assert_eq!((resumed.start_step, resumed.end_step), (4, 6));
    // Steps 5 and 6 again, exactly as the uninterrupted run computed them.
    assert_eq!(resumed.records, full.records[4..].to_vec());
    let cfg = serde_json::to_value(&config)?;
    let a = checkpoint::load(&checkpoint::dir(whole.path()), "vae", &cfg, &Device::Cpu)?;
    let b = checkpoint::load(&checkpoint::dir(cut.path()), "vae", &cfg, &Device::Cpu)?;
    assert_eq!(a.state, b.state);
    for (maps, what) in [
        ((&a.params, &b.params), "params"),
        ((&a.optimizer, &b.optimizer), "moments"),
    ] {
        assert_eq!(maps.0.len(), maps.1.len());
        for (name, t) in maps.0 {
            let d = max_abs_diff(t, &maps.1[name])?;
            assert_eq!(d, 0.0, "{what} `{name}` differ by {d}");
        }
    }
    // Resuming a finished run runs nothing and keeps the state.
    let again = run(&config, &opts(cut.path(), 6, 2, true))?;
    assert_eq!((again.start_step, again.records.len()), (6, 0));
    Ok(())
}

#[test]
fn a_checkpoint_that_does_not_fit_the_run_is_a_named_error() -> Result<()> {
    let config = tiny();
    let dir = tempfile::tempdir()?;
    run(&config, &opts(dir.path(), 1, 1, false))?;
    let state_file = checkpoint::dir(dir.path()).join(checkpoint::STATE_FILE);

    // Without --resume an existing checkpoint is not overwritten.
    let e = run(&config, &opts(dir.path(), 2, 1, false)).unwrap_err();
    assert!(matches!(e, Error::Checkpoint { .. }), "{e}");
    assert!(e.to_string().contains("--resume"), "{e}");

    // Another learning rate.
    let mut other = config.clone();
    other.optimizer.lr *= 2.0;
    let e = run(&other, &opts(dir.path(), 2, 1, true)).unwrap_err();
    match &e {
        Error::Checkpoint { path, field, .. } => {
            assert_eq!(path, &state_file);
            assert_eq!(field, "config.optimizer.lr");
        }
        _ => panic!("{e}"),
    }
    assert!(e.to_string().contains("state.json") && e.to_string().contains("config.optimizer.lr"));

    // Another architecture.
    let other = VaeTrainConfig {
        block_out_channels: vec![8, 8, 8, 16],
        ..config.clone()
    };
    let e = run(&other, &opts(dir.path(), 2, 1, true)).unwrap_err();
    assert!(e.to_string().contains("config.block_out_channels"), "{e}");

    // A checkpoint another stage wrote.
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file)?)?;
    state["stage"] = "teacher".into();
    std::fs::write(&state_file, serde_json::to_string(&state)?)?;
    let e = run(&config, &opts(dir.path(), 2, 1, true)).unwrap_err();
    match &e {
        Error::Checkpoint {
            path,
            field,
            message,
        } => {
            assert_eq!(path, &state_file);
            assert_eq!(field, "stage");
            assert!(message.contains("teacher"), "{message}");
        }
        _ => panic!("{e}"),
    }
    Ok(())
}

#[test]
fn a_diverging_run_stops_naming_the_stage_and_step() -> Result<()> {
    let mut config = tiny();
    // AdamW moves every weight by ≈lr per step: 1e30 overflows the next forward pass.
    config.optimizer.lr = 1e30;
    let dir = tempfile::tempdir()?;
    let e = run(&config, &opts(dir.path(), 5, 1, false)).unwrap_err();
    match &e {
        Error::NonFiniteLoss { stage, step, value } => {
            assert_eq!((stage.as_str(), *step), ("vae", 2), "{e}");
            assert!(!value.is_finite());
        }
        _ => panic!("{e}"),
    }
    assert!(e.to_string().contains("stage `vae`, step 2"), "{e}");
    // The good checkpoint of step 1 is kept.
    let cfg = serde_json::to_value(&config)?;
    let state = checkpoint::load(&checkpoint::dir(dir.path()), "vae", &cfg, &Device::Cpu)?.state;
    assert_eq!(state.step, 1);
    Ok(())
}

#[test]
fn the_exported_vae_loads_in_inference_and_round_trips_better_than_at_init() -> Result<()> {
    let config = tiny();
    let (init_dir, trained_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    run(&config, &opts(init_dir.path(), 0, 10, false))?;
    let trained = run(&config, &opts(trained_dir.path(), 30, 100, false))?;
    let vae_dir = trained.vae_dir.clone().expect("exported");
    // A diffusers VAE directory with the current attention key names.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vae_dir.join("config.json"))?)?;
    assert_eq!(cfg["_class_name"], "AutoencoderKL");
    let keys = candle_core::safetensors::load(
        vae_dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )?;
    assert!(keys.contains_key("decoder.mid_block.attentions.0.to_q.weight"));
    assert!(keys.contains_key("encoder.mid_block.attentions.0.to_out.0.bias"));
    assert!(
        !keys
            .keys()
            .any(|k| k.contains(".query.") || k.contains(".proj_attn."))
    );

    // Images the VAE never saw (the held-out combinations).
    let x = vae::images(&config, Split::HeldOut, 4, &Device::Cpu)?;
    let round_trip = |dir: &Path| -> Result<(f32, Tensor)> {
        let v = pixart::vae::Vae::load(dir, &Device::Cpu)?;
        assert_eq!(v.config().scale_factor(), 8);
        let latents = v.encode_mean(&x)?;
        assert_eq!(latents.dims(), &[4, 4, 8, 8]);
        let y = v.decode(&latents)?;
        Ok(((y - &x)?.sqr()?.mean_all()?.to_scalar::<f32>()?, latents))
    };
    let (init_err, _) = round_trip(&init_dir.path().join("vae"))?;
    let (trained_err, latents) = round_trip(&vae_dir)?;
    eprintln!(
        "held-out round-trip mse through pixart::vae::Vae: init {init_err}, trained {trained_err}"
    );
    assert!(
        trained_err < 0.7 * init_err,
        "round-trip mse: init {init_err}, trained {trained_err}"
    );

    // Inference computes what training computed: the same posterior mean (× scaling factor).
    let model = TrainableVae::new(&config, &Device::Cpu)?;
    let loaded = checkpoint::load(
        &checkpoint::dir(trained_dir.path()),
        vae::STAGE,
        &serde_json::to_value(&config)?,
        &Device::Cpu,
    )?;
    checkpoint::restore_varmap(model.varmap(), &loaded.params, Path::new("params"))?;
    let (mean, _) = model.moments(&x)?;
    let scaled = (mean * trained.scaling_factor.expect("exported"))?;
    let d = max_abs_diff(&scaled, &latents)?;
    assert!(d < 1e-4, "inference latents differ from training's by {d}");
    let recon_train = model.reconstruction_mse(&x)?;
    assert!(
        (recon_train - trained_err).abs() < 1e-4,
        "{recon_train} vs {trained_err}"
    );
    assert_eq!(latents.dtype(), DType::F32);
    Ok(())
}

/// A constant pixel weight is the plain loss (the weight is normalised by its mean); a weight on some
/// pixels changes it.
#[test]
fn a_constant_weight_is_the_plain_loss() -> Result<()> {
    let config = tiny();
    let (model, x, noise) = two_images(&config)?;
    let plain = model.loss(&x, &noise)?.recon.to_scalar::<f32>()?;
    let recon = |w: &Tensor| -> Result<f32> {
        Ok(model
            .batch_backward(&x, &noise, Some(w), &ranges(2, 1))?
            .1
            .recon)
    };
    let three = Tensor::full(3f32, (2, 1, 64, 64), &Device::Cpu)?;
    let same = recon(&three)?;
    assert!(
        (plain - same).abs() <= 1e-6 * plain.abs(),
        "{plain} vs {same}"
    );
    let mask = vae::training_pool(&config, 2, None, &Device::Cpu)?.foreground;
    let w = (mask * 10.0)?.affine(1.0, 1.0)?;
    let weighted = recon(&w)?;
    assert!(
        (weighted - plain).abs() > 1e-4 * plain.abs(),
        "{plain} vs {weighted}"
    );
    Ok(())
}

/// A step split into shards (one per core in training) computes the whole batch's loss and gradients,
/// foreground weight included: every shard normalises by the batch's mean weight, not its own.
#[test]
fn sharded_steps_match_the_whole_batch() -> Result<()> {
    let config = tiny();
    let model = TrainableVae::new(&config, &Device::Cpu)?;
    let x = vae::training_images(&config, 4, &Device::Cpu)?;
    let noise = seed::randn(
        &mut seed::rng(2, 0, Stream::Noise),
        &[4, 4, 8, 8],
        &Device::Cpu,
    )?;
    // Samples with shapes of different areas, so the shards' own mean weights differ from the batch's.
    let mask = vae::training_pool(&config, 4, None, &Device::Cpu)?.foreground;
    let w = (mask * 10.0)?.affine(1.0, 1.0)?;
    let (whole_grads, whole) = model.batch_backward(&x, &noise, Some(&w), &ranges(4, 1))?;
    let whole_grads = whole_grads.expect("a finite loss gives gradients");
    for shards in [ranges(4, 2), ranges(4, 3)] {
        let (grads, values) = model.batch_backward(&x, &noise, Some(&w), &shards)?;
        let grads = grads.expect("a finite loss gives gradients");
        for (name, a, b) in [
            ("total", values.total, whole.total),
            ("recon", values.recon, whole.recon),
            ("kl", values.kl, whole.kl),
        ] {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{name} {shards:?}: {a} vs {b}"
            );
        }
        for (name, var) in sorted_vars(model.varmap()) {
            let (Some(g), Some(reference)) =
                (grads.get(var.as_tensor()), whole_grads.get(var.as_tensor()))
            else {
                panic!("{name}: no gradient");
            };
            let scale = reference.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let d = max_abs_diff(g, reference)?;
            assert!(
                d <= 1e-4 * scale.max(1e-3),
                "{name} {shards:?}: {d} (max |g| {scale})"
            );
        }
    }
    Ok(())
}
