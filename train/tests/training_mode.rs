//! The transformer's training mode (`pixart::weights::Mode::Train`) has a real gradient path:
//!
//! * every parameter of the tiny checkpoints receives a finite, non-zero gradient from a simple loss (the
//!   attention key biases, whose exact gradient is 0 by softmax shift invariance, only rounding noise), and a
//!   central finite difference (f64) agrees with the gradient for one entry of every layer kind;
//! * the training-mode forward agrees with the inference-mode forward on the same weights to 1e-5, and with
//!   diffusers' own output (the transformer golden fixture, made by PyTorch);
//! * after an AdamW step the training-mode model computes with the new values (no stale cached copies):
//!   it agrees with an inference model built afresh from the updated weights, and a few steps lower the loss.
//!
//! Inference mode, by contrast, loses gradients (the fused kernels have no backward pass): checked too, so
//! this test would notice if the two modes stopped differing where they must.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use pixart::config::TransformerConfig;
use pixart::transformer::{Mode, PixArtTransformer};
use pixart::weights::Weights;
use pixart_train::varmap::{load_varmap, snapshot, sorted_vars};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The bundled random checkpoint (no micro-conditions).
fn tiny_dir() -> PathBuf {
    root().join("models/tiny-pixart-lcm/transformer")
}

/// The transformer golden fixture with micro-conditions (`pixart/tests/fixtures/transformer/gen.py`).
fn micro_dir() -> PathBuf {
    root().join("pixart/tests/fixtures/transformer/micro")
}

fn load(dir: &Path, dtype: DType) -> Result<(TransformerConfig, VarMap)> {
    let config = TransformerConfig::from_file(dir.join("config.json"))?;
    let varmap = load_varmap(
        &dir.join("diffusion_pytorch_model.safetensors"),
        dtype,
        &Device::Cpu,
    )?;
    Ok((config, varmap))
}

/// A seeded standard-normal tensor.
fn randn(shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let normal = Normal::new(0f64, 1.0)?;
    let v: Vec<f64> = (0..n).map(|_| normal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

struct Inputs {
    x: Tensor,
    t: Tensor,
    y: Tensor,
    mask: Tensor,
    res_ar: Option<(Tensor, Tensor)>,
    target: Tensor,
}

/// Batch 2, a non-square latent, different timesteps, one padded caption (the diffusers bias path).
fn inputs(config: &TransformerConfig, dtype: DType) -> Result<Inputs> {
    let dev = Device::Cpu;
    let (b, l) = (2, 6);
    let x = randn(&[b, config.in_channels, 8, 12], 1, dtype)?;
    let t = Tensor::new(&[999f32, 261.0], &dev)?;
    let y = randn(&[b, l, config.caption_channels], 2, dtype)?;
    let mask = Tensor::new(
        &[[1f32, 1., 1., 1., 0., 0.], [1., 1., 1., 1., 1., 1.]],
        &dev,
    )?;
    let res_ar = if config.use_additional_conditions {
        Some((
            Tensor::new(&[[64f32, 96.], [64., 96.]], &dev)?,
            Tensor::new(&[[0.6667f32], [0.6667]], &dev)?,
        ))
    } else {
        None
    };
    let target = randn(&[b, config.out_channels, 8, 12], 3, dtype)?;
    Ok(Inputs {
        x,
        t,
        y,
        mask,
        res_ar,
        target,
    })
}

fn forward(m: &PixArtTransformer, i: &Inputs) -> Result<Tensor> {
    let res_ar = i.res_ar.as_ref().map(|(r, a)| (r, a));
    Ok(m.forward(&i.x, &i.t, &i.y, Some(&i.mask), res_ar)?)
}

/// Mean squared error against the fixed target: every output channel (ε and the learned range) counts.
fn loss(m: &PixArtTransformer, i: &Inputs) -> Result<Tensor> {
    Ok((forward(m, i)? - &i.target)?.sqr()?.mean_all()?)
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    max_abs(&(a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?)
}

/// An inference-mode model over deep copies of the variables' current values.
fn inference_model(config: &TransformerConfig, varmap: &VarMap) -> Result<PixArtTransformer> {
    let w = Weights::from_tensors(snapshot(varmap)?, DType::F32, &Device::Cpu);
    Ok(PixArtTransformer::new(config.clone(), &w)?)
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() -> Result<()> {
    for dir in [tiny_dir(), micro_dir()] {
        let (config, varmap) = load(&dir, DType::F32)?;
        let model = PixArtTransformer::trainable(config.clone(), &varmap)?;
        assert_eq!(model.mode(), Mode::Train);
        let inputs = inputs(&config, DType::F32)?;
        let grads = loss(&model, &inputs)?.backward()?;
        let vars = sorted_vars(&varmap);
        let mut weakest = (f64::INFINITY, String::new());
        let mut key_bias = 0f64;
        for (name, var) in &vars {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{}: `{name}` got no gradient", dir.display()));
            let m = max_abs(g)?;
            assert!(m.is_finite() && m > 0.0, "`{name}`: max |grad| = {m}");
            // The key bias adds q·b_k to every score of a query alike, which the softmax ignores: its
            // true gradient is exactly 0 (in PyTorch too). It is reached (the graph is intact) and its
            // gradient is rounding noise; every other parameter must get a substantial gradient.
            if name.ends_with("to_k.bias") {
                key_bias = key_bias.max(m);
                continue;
            }
            if m < weakest.0 {
                weakest = (m, name.clone());
            }
        }
        assert!(
            weakest.0 > 1e-5,
            "`{}`: max |grad| = {}",
            weakest.1,
            weakest.0
        );
        assert!(
            key_bias < 1e-6,
            "to_k.bias gradient {key_bias} should be rounding noise"
        );
        println!(
            "{}: {} variables, {} parameters, all with a gradient; smallest max|grad| {:.3e} ({}); \
             to_k.bias (gradient 0 in exact arithmetic) at most {key_bias:.1e}",
            dir.file_name().unwrap().to_string_lossy(),
            vars.len(),
            model.num_parameters(),
            weakest.0,
            weakest.1
        );

        // The same variables through the inference path: the fused kernels cut the graph, so some
        // parameters get nothing (what training mode exists to fix).
        let inference = PixArtTransformer::new(
            config.clone(),
            &Weights::from_varmap(&varmap)?.with_mode(Mode::Inference),
        )?;
        let grads = loss(&inference, &inputs)?.backward()?;
        let reached = vars.iter().filter(|(_, v)| grads.get(v).is_some()).count();
        println!(
            "  inference mode over the same variables: {reached}/{} get a gradient",
            vars.len()
        );
        assert!(reached < vars.len());
    }
    Ok(())
}

/// One entry per layer kind (the entry with the largest gradient, so the relative check is meaningful):
/// central differences in f64 against autograd.
#[test]
fn gradients_match_finite_differences_in_f64() -> Result<()> {
    let (config, varmap) = load(&micro_dir(), DType::F64)?;
    let model = PixArtTransformer::trainable(config.clone(), &varmap)?;
    let inputs = inputs(&config, DType::F64)?;
    let grads = loss(&model, &inputs)?.backward()?;
    let vars: HashMap<String, Var> = sorted_vars(&varmap).into_iter().collect();
    let kinds = [
        "pos_embed.proj.weight",
        "adaln_single.emb.timestep_embedder.linear_1.weight",
        "adaln_single.emb.resolution_embedder.linear_2.bias",
        "adaln_single.linear.weight",
        "caption_projection.linear_1.weight",
        "transformer_blocks.0.scale_shift_table",
        "transformer_blocks.0.attn1.to_q.weight",
        "transformer_blocks.0.attn1.to_v.bias",
        "transformer_blocks.0.attn2.to_k.weight",
        "transformer_blocks.1.attn2.to_out.0.weight",
        "transformer_blocks.1.ff.net.0.proj.weight",
        "transformer_blocks.1.ff.net.2.bias",
        "scale_shift_table",
        "proj_out.weight",
    ];
    let h = 1e-5;
    let mut worst = 0f64;
    for name in kinds {
        let var = &vars[name];
        let g = grads
            .get(var)
            .expect("gradient")
            .flatten_all()?
            .to_vec1::<f64>()?;
        let (idx, &gi) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .expect("non-empty");
        let orig = var.as_tensor().detach().copy()?;
        let at = |delta: f64| -> Result<f64> {
            let mut v = orig.flatten_all()?.to_vec1::<f64>()?;
            v[idx] += delta;
            var.set(&Tensor::from_vec(v, orig.dims(), &Device::Cpu)?)?;
            // The same model object: it reads the live variable.
            Ok(loss(&model, &inputs)?.to_scalar::<f64>()?)
        };
        let fd = (at(h)? - at(-h)?) / (2.0 * h);
        var.set(&orig)?;
        let rel = (fd - gi).abs() / gi.abs().max(1e-8);
        println!(
            "{name}[{idx}]: autograd {gi:+.6e}, finite difference {fd:+.6e}, relative {rel:.1e}"
        );
        worst = worst.max(rel);
        assert!(
            rel < 1e-4,
            "{name}: autograd {gi} vs finite difference {fd}"
        );
    }
    println!(
        "worst relative gradient error over {} layer kinds: {worst:.2e}",
        kinds.len()
    );
    Ok(())
}

#[test]
fn training_and_inference_forwards_agree() -> Result<()> {
    for dir in [tiny_dir(), micro_dir()] {
        let (config, varmap) = load(&dir, DType::F32)?;
        let train = PixArtTransformer::trainable(config.clone(), &varmap)?;
        let infer = inference_model(&config, &varmap)?;
        assert_eq!(infer.mode(), Mode::Inference);
        let inputs = inputs(&config, DType::F32)?;
        let (a, b) = (forward(&train, &inputs)?, forward(&infer, &inputs)?);
        let diff = max_diff(&a, &b)?;
        println!(
            "{}: max |train − inference| = {diff:.2e} (max |out| {:.2})",
            dir.file_name().unwrap().to_string_lossy(),
            max_abs(&b)?
        );
        assert!(diff <= 1e-5, "{diff}");
    }
    Ok(())
}

/// The PyTorch reference: diffusers' output on the golden fixture's inputs, from the training path.
#[test]
fn training_forward_matches_diffusers_golden() -> Result<()> {
    let fixtures = root().join("pixart/tests/fixtures/transformer");
    let (config, varmap) = load(&micro_dir(), DType::F32)?;
    let train = PixArtTransformer::trainable(config, &varmap)?;
    let inputs = candle_core::safetensors::load(
        fixtures.join("micro_b2_padded.inputs.safetensors"),
        &Device::Cpu,
    )?;
    let expected = candle_core::safetensors::load(
        fixtures.join("micro_b2_padded.expected.safetensors"),
        &Device::Cpu,
    )?;
    let ours = pixart::transformer::conformance::forward_named(&train, &inputs)?;
    let reference = &expected["sample"];
    let diff = max_diff(&ours, reference)?;
    let rel = diff / max_abs(reference)?.max(1.0);
    println!(
        "training mode vs diffusers (micro_b2_padded): max abs {diff:.2e}, relative {rel:.2e}"
    );
    assert!(rel <= 1e-5, "{rel}");
    Ok(())
}

#[test]
fn an_optimiser_step_is_seen_by_the_training_forward() -> Result<()> {
    let (config, varmap) = load(&tiny_dir(), DType::F32)?;
    let train = PixArtTransformer::trainable(config.clone(), &varmap)?;
    let inputs = inputs(&config, DType::F32)?;
    let before = forward(&train, &inputs)?;
    let params = ParamsAdamW {
        lr: 1e-2,
        ..Default::default()
    };
    let mut opt = AdamW::new(varmap.all_vars(), params)?;
    let first_loss = loss(&train, &inputs)?;
    opt.backward_step(&first_loss)?;

    // The model built before the step, against one built afresh from the updated values.
    let after = forward(&train, &inputs)?;
    let fresh = forward(&inference_model(&config, &varmap)?, &inputs)?;
    let moved = max_diff(&after, &before)?;
    let diff = max_diff(&after, &fresh)?;
    println!(
        "after one AdamW step (lr 1e-2): output moved by {moved:.3e}; max |train − fresh inference| = {diff:.2e}"
    );
    assert!(
        moved > 1e-2,
        "the step did not change the forward ({moved})"
    );
    assert!(
        diff <= 1e-5,
        "stale weights in the training forward: {diff}"
    );

    // And training works: a few more steps on the same batch lower the loss.
    let mut last = first_loss.to_scalar::<f32>()?;
    let start = last;
    for _ in 0..5 {
        let l = loss(&train, &inputs)?;
        last = l.to_scalar::<f32>()?;
        opt.backward_step(&l)?;
    }
    println!("loss {start:.4} -> {last:.4} over 6 steps");
    assert!(last < start, "loss did not fall: {start} -> {last}");
    Ok(())
}

#[test]
fn trainable_rejects_wrong_variables() -> Result<()> {
    let (config, varmap) = load(&tiny_dir(), DType::F32)?;
    varmap.data().lock().unwrap().insert(
        "caption_projection.y_embedding".into(),
        Var::zeros((120, 32), DType::F32, &Device::Cpu)?,
    );
    let err = PixArtTransformer::trainable(config.clone(), &varmap)
        .err()
        .expect("error");
    assert!(
        err.to_string().contains("caption_projection.y_embedding"),
        "{err}"
    );
    let (_, varmap) = load(&tiny_dir(), DType::F32)?;
    varmap.data().lock().unwrap().remove("proj_out.bias");
    let err = PixArtTransformer::trainable(config, &varmap)
        .err()
        .expect("error");
    assert!(err.to_string().contains("proj_out.bias"), "{err}");
    Ok(())
}
