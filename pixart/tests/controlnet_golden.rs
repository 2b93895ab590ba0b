//! Golden tests: the ControlNet-Transformer adapter against the diffusers research-project reference
//! (`PixArtControlNetTransformerModel`) on a tiny random base + adapter with non-zero `before_proj`/`after_proj`.
//! Fixtures and the script that made them: `tests/fixtures/controlnet/` (`gen.py`).
//! Tolerance (docs/conformance.md): max|ours − ref| / max(1, max|ref|) ≤ 1e-3.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use pixart::controlnet::{
    ControlNetAdapter, ControlNetConfig, conformance, convert_controlnet_pth,
};
use pixart::pipeline::{
    Control, ControlInput, ModelSource, Pipeline, PipelineOptions, RenderItem, RenderRequest,
    TimestepSpacing, conformance as pipeline_conformance,
};
use pixart::scheduler::LcmSchedulerConfig;
use pixart::transformer::PixArtTransformer;
use pixart::weights::Weights;

mod common;
use common::{fixtures, model_dir, rel_err};

const TOL: f32 = 1e-3;

fn dir() -> PathBuf {
    fixtures("controlnet")
}

fn load(path: PathBuf) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| path.display().to_string())
}

fn base() -> Result<PixArtTransformer> {
    Ok(PixArtTransformer::load(
        dir().join("base"),
        DType::F32,
        &Device::Cpu,
    )?)
}

fn adapter(base: &PixArtTransformer) -> Result<ControlNetAdapter> {
    Ok(ControlNetAdapter::load(
        dir().join("adapter"),
        &base.config,
        DType::F32,
        &Device::Cpu,
    )?)
}

fn inputs(case: &str) -> Result<HashMap<String, Tensor>> {
    load(dir().join(format!("{case}.inputs.safetensors")))
}

fn expected(case: &str) -> Result<HashMap<String, Tensor>> {
    load(dir().join(format!("{case}.expected.safetensors")))
}

fn check_case(case: &str) -> Result<f32> {
    let b = base()?;
    let a = adapter(&b)?;
    let ours = conformance::forward_named(&b, &a, &inputs(case)?)?;
    let err = rel_err(&ours, &expected(case)?["sample"])?;
    println!("{case}: relative max error {err:.3e}");
    assert!(err <= TOL, "{case}: relative error {err} > {TOL}");
    Ok(err)
}

/// Bit-for-bit equality (not a tolerance): the adapter must leave the base stream untouched.
fn assert_identical(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    let a = a.flatten_all()?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_vec1::<f32>()?;
    let differing = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(differing, 0, "{what}: {differing} values differ");
    Ok(())
}

fn base_forward(b: &PixArtTransformer, inp: &HashMap<String, Tensor>) -> Result<Tensor> {
    Ok(b.forward(
        &inp["hidden_states"],
        &inp["timestep"],
        &inp["encoder_hidden_states"],
        Some(&inp["encoder_attention_mask"]),
        Some((&inp["resolution"], &inp["aspect_ratio"])),
    )?)
}

#[test]
fn batch2_padded_masks_micro_conditions_scale_1() -> Result<()> {
    check_case("ctrl_b2_padded")?;
    Ok(())
}

#[test]
fn conditioning_scale_half() -> Result<()> {
    check_case("ctrl_b2_scale05")?;
    Ok(())
}

#[test]
fn per_row_conditioning_scale() -> Result<()> {
    check_case("ctrl_b2_rowscale")?;
    Ok(())
}

#[test]
fn non_square_i64_mask() -> Result<()> {
    check_case("ctrl_nonsquare")?;
    Ok(())
}

/// The adapter really changes the output (otherwise the golden cases could not tell a skipped adapter from a
/// working one), and the base alone matches diffusers' plain transformer on the same inputs.
#[test]
fn adapter_changes_the_output_and_base_matches_reference() -> Result<()> {
    let b = base()?;
    let ours = base_forward(&b, &inputs("ctrl_b2_padded")?)?;
    let err = rel_err(&ours, &expected("base_b2_padded")?["sample"])?;
    assert!(err <= TOL, "base: {err}");
    let controlled = &expected("ctrl_b2_padded")?["sample"];
    let diff = rel_err(&ours, controlled)?;
    println!("base vs controlled reference: {diff:.3e}");
    assert!(diff > 1e-2, "the adapter barely changes the output: {diff}");
    Ok(())
}

#[test]
fn scale_zero_is_exactly_the_base() -> Result<()> {
    let b = base()?;
    let a = adapter(&b)?;
    let mut inp = inputs("ctrl_b2_padded")?;
    let want = base_forward(&b, &inp)?;
    inp.insert(
        "conditioning_scale".into(),
        Tensor::new(&[0f32], &Device::Cpu)?,
    );
    let got = conformance::forward_named(&b, &a, &inp)?;
    assert_identical(&got, &want, "scale 0")?;
    // Per row: the row at scale 0 is the base row bit for bit even though its neighbour is controlled.
    let got = conformance::forward_named(&b, &a, &inputs("ctrl_b2_rowscale")?)?;
    assert_identical(&got.i(1..2)?, &want.i(1..2)?, "row at scale 0")?;
    Ok(())
}

/// A freshly initialised adapter (zero `before_proj` and `after_proj`, as both reference classes initialise
/// them) at scale 1 gives the base output exactly.
#[test]
fn zero_initialised_adapter_is_exactly_the_base() -> Result<()> {
    let b = base()?;
    let mut tensors = load(dir().join("adapter/diffusion_pytorch_model.safetensors"))?;
    for (name, t) in tensors.iter_mut() {
        if name.contains("before_proj") || name.contains("after_proj") {
            *t = t.zeros_like()?;
        }
    }
    let weights = Weights::from_tensors(tensors, DType::F32, &Device::Cpu);
    let zero = ControlNetAdapter::new(ControlNetConfig { num_layers: 2 }, &b.config, &weights)?;
    let inp = inputs("ctrl_b2_padded")?;
    let got = conformance::forward_named(&b, &zero, &inp)?;
    assert_identical(&got, &base_forward(&b, &inp)?, "zero-initialised adapter")?;
    Ok(())
}

#[test]
fn lcm_loop_with_control() -> Result<()> {
    let b = base()?;
    let a = adapter(&b)?;
    let sched = LcmSchedulerConfig::from_path(&model_dir().join("scheduler"))?;
    let inp = inputs("lcm_ctrl")?;
    let want = expected("lcm_ctrl")?;
    let out = pipeline_conformance::lcm_controlled(
        &b,
        Some(&a),
        &sched,
        TimestepSpacing::Diffusers,
        &inp,
    )?;
    assert_eq!(
        out["timesteps"].to_vec1::<f32>()?,
        want["timesteps"].to_vec1::<f32>()?
    );
    let err = rel_err(&out["latents"], &want["latents"])?;
    println!("lcm_ctrl: relative max error {err:.3e}");
    assert!(err <= TOL, "lcm: {err}");
    // Without an adapter, control inputs are an error rather than silently ignored.
    let e =
        pipeline_conformance::lcm_controlled(&b, None, &sched, TimestepSpacing::Diffusers, &inp)
            .unwrap_err()
            .to_string();
    assert!(e.contains("controlnet_cond"), "{e}");
    Ok(())
}

/// The harness path end to end: files in, `sample` out; a missing `controlnet_cond` is named.
#[test]
fn conformance_harness_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("out.safetensors");
    conformance::run_files(
        &dir().join("base"),
        &dir().join("adapter"),
        &dir().join("ctrl_b2_scale05.inputs.safetensors"),
        &out,
    )?;
    let err = rel_err(
        &load(out.clone())?["sample"],
        &expected("ctrl_b2_scale05")?["sample"],
    )?;
    assert!(err <= TOL, "{err}");
    let mut inp = inputs("ctrl_b2_padded")?;
    inp.remove("controlnet_cond");
    let bad = tmp.path().join("bad.safetensors");
    candle_core::safetensors::save(&inp, &bad)?;
    let e = conformance::run_files(&dir().join("base"), &dir().join("adapter"), &bad, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("controlnet_cond"), "{e}");
    // Control latents of the wrong size are named too.
    let mut inp = inputs("ctrl_b2_padded")?;
    let cz = inp["controlnet_cond"].narrow(3, 0, 6)?;
    inp.insert("controlnet_cond".into(), cz);
    let b = base()?;
    let a = adapter(&b)?;
    let e = conformance::forward_named(&b, &a, &inp)
        .unwrap_err()
        .to_string();
    assert!(e.contains("controlnet_cond"), "{e}");
    Ok(())
}

/// Writes a copy of the adapter directory with `edit` applied to its tensors.
fn edited_adapter(
    tmp: &Path,
    edit: impl FnOnce(&mut HashMap<String, Tensor>) -> Result<()>,
) -> Result<PathBuf> {
    let out = tmp.join("edited");
    std::fs::create_dir_all(&out)?;
    std::fs::copy(dir().join("adapter/config.json"), out.join("config.json"))?;
    let mut t = load(dir().join("adapter/diffusion_pytorch_model.safetensors"))?;
    edit(&mut t)?;
    candle_core::safetensors::save(&t, out.join("diffusion_pytorch_model.safetensors"))?;
    Ok(out)
}

#[test]
fn bad_adapter_files_name_the_tensor() -> Result<()> {
    let b = base()?;
    let tmp = tempfile::tempdir()?;
    let load_err = |d: &Path| {
        ControlNetAdapter::load(d, &b.config, DType::F32, &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };

    let missing = "controlnet_blocks.1.transformer_block.attn2.to_k.weight";
    let d = edited_adapter(tmp.path(), |t| {
        t.remove(missing);
        Ok(())
    })?;
    let e = load_err(&d);
    assert!(e.contains(missing) && e.contains("missing"), "{e}");
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");

    let misshaped = "controlnet_blocks.0.after_proj.weight";
    let d = edited_adapter(tmp.path(), |t| {
        let w = t[misshaped].narrow(0, 0, 6)?;
        t.insert(misshaped.into(), w);
        Ok(())
    })?;
    let e = load_err(&d);
    assert!(e.contains(misshaped) && e.contains("[6, 12]"), "{e}");

    let extra = "controlnet_blocks.2.after_proj.weight";
    let d = edited_adapter(tmp.path(), |t| {
        let w = t["controlnet_blocks.1.after_proj.weight"].clone();
        t.insert(extra.into(), w);
        Ok(())
    })?;
    let e = load_err(&d);
    assert!(e.contains(extra) && e.contains("num_layers"), "{e}");

    // An adapter deeper than the base allows (block k feeds base block k + 1).
    let weights = Weights::from_tensors(HashMap::new(), DType::F32, &Device::Cpu);
    let e = ControlNetAdapter::new(ControlNetConfig { num_layers: 4 }, &b.config, &weights)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("num_layers"), "{e}");

    // Pointing at the base transformer instead of the adapter.
    let e = load_err(&dir().join("base"));
    assert!(e.contains("unknown key"), "{e}");
    Ok(())
}

/// The original-layout `.pth` (fused qkv/kv, `copied_block`, `base_model.*`) converts to exactly the
/// diffusers-community adapter the reference used.
#[test]
fn converts_the_original_pth() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("converted");
    let report = convert_controlnet_pth(&dir().join("controlnet.pth"), &out)?;
    println!("{report:?}");
    assert_eq!(report.num_layers, 2);
    assert!(report.base_model_tensors_ignored > 0);
    assert!(
        report.other_ignored.is_empty(),
        "{:?}",
        report.other_ignored
    );
    let direct = load(dir().join("adapter/diffusion_pytorch_model.safetensors"))?;
    let converted = load(out.join("diffusion_pytorch_model.safetensors"))?;
    let mut a: Vec<&String> = direct.keys().collect();
    let mut c: Vec<&String> = converted.keys().collect();
    a.sort();
    c.sort();
    assert_eq!(a, c, "tensor names");
    assert_eq!(report.tensors_written, direct.len());
    for (name, t) in &direct {
        assert_identical(&converted[name], t, name)?;
    }
    // And it runs: the same transformer output as the reference.
    let b = base()?;
    let conv = ControlNetAdapter::load(&out, &b.config, DType::F32, &Device::Cpu)?;
    assert_eq!(conv.num_layers(), 2);
    let ours = conformance::forward_named(&b, &conv, &inputs("ctrl_b2_padded")?)?;
    let err = rel_err(&ours, &expected("ctrl_b2_padded")?["sample"])?;
    assert!(err <= TOL, "converted adapter: {err}");
    // Not a ControlNet checkpoint: a clear error, nothing written.
    let e = convert_controlnet_pth(
        &dir().join("adapter/diffusion_pytorch_model.safetensors"),
        &tmp.path().join("nope"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("torch checkpoint"), "{e}");
    assert!(!tmp.path().join("nope").exists());
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Pipeline: control images through `Pipeline::render` on the bundled tiny checkpoint
// ---------------------------------------------------------------------------------------------------------------

/// A 1-block adapter for `models/tiny-pixart-lcm`, initialised as ControlNet training starts (the copy is base
/// block 0) but with non-zero `before_proj`/`after_proj` so the control image matters.
fn tiny_adapter(dir: &Path) -> Result<()> {
    let base = load(model_dir().join("transformer/diffusion_pytorch_model.safetensors"))?;
    let mut out: HashMap<String, Tensor> = base
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("transformer_blocks.0.").map(|rest| {
                (
                    format!("controlnet_blocks.0.transformer_block.{rest}"),
                    v.clone(),
                )
            })
        })
        .collect();
    let d = base["transformer_blocks.0.scale_shift_table"].dim(1)?;
    // Deterministic, non-zero, ~unit-gain projections.
    let proj = |phase: f32| -> Result<(Tensor, Tensor)> {
        let w: Vec<f32> = (0..d * d)
            .map(|i| (i as f32 * 0.37 + phase).sin() / (d as f32).sqrt())
            .collect();
        let b: Vec<f32> = (0..d).map(|i| 0.1 * (i as f32 + phase).cos()).collect();
        Ok((
            Tensor::from_vec(w, (d, d), &Device::Cpu)?,
            Tensor::from_vec(b, d, &Device::Cpu)?,
        ))
    };
    for (name, phase) in [("before_proj", 0.5f32), ("after_proj", 1.5)] {
        let (w, b) = proj(phase)?;
        out.insert(format!("controlnet_blocks.0.{name}.weight"), w);
        out.insert(format!("controlnet_blocks.0.{name}.bias"), b);
    }
    std::fs::create_dir_all(dir)?;
    candle_core::safetensors::save(&out, dir.join("diffusion_pytorch_model.safetensors"))?;
    std::fs::write(dir.join("config.json"), r#"{"num_layers": 1}"#)?;
    Ok(())
}

fn edge_map(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let v = if (x / 4 + y / 4) % 2 == 0 { 255 } else { 0 };
        image::Rgb([v, v, v])
    })
}

fn item(prompt: &str, seed: u64, control: Option<(u32, f32)>) -> RenderItem {
    RenderItem {
        prompt: prompt.into(),
        seed,
        control: control.map(|(side, scale)| ControlInput {
            edge_map: edge_map(side, side),
            scale,
        }),
    }
}

fn max_pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

#[test]
fn pipeline_renders_with_control_images() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let adapter_dir = tmp.path().join("adapter");
    tiny_adapter(&adapter_dir)?;
    let mut pipe = Pipeline::load(
        &ModelSource::Dir(model_dir()),
        PipelineOptions {
            controlnet: Some(adapter_dir.clone()),
            ..Default::default()
        },
    )?;
    assert!(pipe.has_controlnet());
    let req = |items: Vec<RenderItem>| RenderRequest {
        width: 32,
        height: 32,
        steps: 2,
        items,
    };
    let render = |pipe: &mut Pipeline, items: Vec<RenderItem>| -> Result<Vec<image::RgbImage>> {
        Ok(pipe
            .render(&req(items), &mut |_| Control::Continue)?
            .into_iter()
            .map(|o| o.image)
            .collect())
    };
    let plain = render(&mut pipe, vec![item("a fox", 3, None)])?;
    let zero = render(&mut pipe, vec![item("a fox", 3, Some((32, 0.0)))])?;
    assert_eq!(
        plain[0], zero[0],
        "scale 0 must render the uncontrolled image"
    );
    let guided = render(&mut pipe, vec![item("a fox", 3, Some((32, 1.0)))])?;
    let changed = max_pixel_diff(&plain[0], &guided[0]);
    assert!(changed > 8, "the control image barely matters: {changed}");
    // One batch mixing a controlled and an uncontrolled item: each row as if rendered alone.
    let mixed = render(
        &mut pipe,
        vec![item("a fox", 3, None), item("a fox", 3, Some((32, 1.0)))],
    )?;
    assert!(max_pixel_diff(&mixed[0], &plain[0]) <= 1);
    assert!(max_pixel_diff(&mixed[1], &guided[0]) <= 1);

    // Bad control input: each error names the field and the item.
    let e = pipe
        .render(
            &req(vec![
                item("a fox", 3, None),
                item("a fox", 3, Some((48, 1.0))),
            ]),
            &mut |_| Control::Continue,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("control.edge_map") && e.contains("item 1"),
        "{e}"
    );
    let e = pipe
        .validate(&req(vec![item("a fox", 3, Some((32, 2.5)))]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("control.scale") && e.contains("item 0"), "{e}");
    let e = pipe
        .validate(&req(vec![item("a fox", 3, Some((32, f32::NAN)))]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("control.scale"), "{e}");

    // A pipeline without an adapter refuses control items instead of ignoring them.
    let plain_pipe = Pipeline::load(&ModelSource::Dir(model_dir()), PipelineOptions::default())?;
    assert!(!plain_pipe.has_controlnet());
    let e = plain_pipe
        .validate(&req(vec![item("a fox", 3, Some((32, 1.0)))]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("control") && e.contains("adapter"), "{e}");
    Ok(())
}
