//! The diffusion stages (teacher, LCD, ControlNet) on tiny configs: real training steps on the bundled
//! random VAE and a freshly built text side, seconds each.
//!
//! * the teacher: every parameter moves (the zero-initialised output layers open the path to the rest),
//!   and a run interrupted after step 3 resumes from its step-2 checkpoint to exactly the weights of the
//!   uninterrupted run;
//! * LCD: trains the student only (the teacher's files are untouched), the EMA target moves between them;
//! * the adapter starts as exactly the base model (zero projections) and after training changes it;
//! * `pixart-train all --smoke` runs the whole chain and its packaged model renders in the farm's own
//!   pipeline, with and without an edge map;
//! * an exported dataset (`--dataset`) trains the teacher bit for bit as the procedural one does;
//! * bad inputs: a missing VAE directory, another stage's checkpoint, a missing, short or corrupt dataset
//!   directory, a gradient clip that is not positive — errors naming the path or field.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use pixart_train::adapter::{self, AdapterConfig};
use pixart_train::distill::{self, DistillConfig};
use pixart_train::teacher::{self, TeacherConfig};
use pixart_train::text::{self, TextConfig};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The bundled random model: its `vae/` stands in for the VAE stage.
fn vae_dir() -> PathBuf {
    root().join("models/tiny-pixart-lcm")
}

fn text_dir(tmp: &Path) -> PathBuf {
    let dir = tmp.join("text");
    text::build(
        &TextConfig {
            d_model: 16,
            ..Default::default()
        },
        &dir,
    )
    .unwrap();
    dir
}

fn tiny_teacher() -> TeacherConfig {
    let mut c = TeacherConfig {
        dataset_size: 16,
        batch_size: 4,
        num_layers: 2,
        num_attention_heads: 2,
        attention_head_dim: 8,
        ..Default::default()
    };
    c.optimizer.weight_decay = 0.0;
    c
}

fn teacher_opts(out: &Path, text: &Path, steps: u64) -> teacher::RunOptions {
    teacher::RunOptions {
        out: out.to_path_buf(),
        vae: vae_dir(),
        text: text.to_path_buf(),
        steps,
        save_every: 2,
        resume: false,
        progress: false,
        dataset: None,
    }
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    load(&dir.join("transformer/diffusion_pytorch_model.safetensors"))
}

#[test]
fn the_teacher_trains_every_parameter_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let text = text_dir(tmp.path());
    let config = tiny_teacher();
    let full = tmp.path().join("full");
    let run = teacher::train(
        &config,
        &teacher_opts(&full, &text, 4),
        &Device::Cpu,
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert!(
        run.records
            .iter()
            .all(|r| r.loss.is_finite() && r.vb.is_finite())
    );
    let trained = weights(&full);

    // Every parameter moved away from its initialisation (weight decay is off, so only gradients move it).
    let tcfg =
        pixart::config::TransformerConfig::from_file(full.join("transformer/config.json")).unwrap();
    let init = pixart_train::dit::init_varmap(&tcfg, config.seed, &Device::Cpu).unwrap();
    for (name, var) in pixart_train::varmap::sorted_vars(&init) {
        let d = max_diff(var.as_tensor(), &trained[&name]);
        assert!(d > 0.0, "`{name}` never changed: no gradient reaches it");
    }

    // Interrupted after step 3 (checkpoint at step 2), then resumed to 4.
    let cut = tmp.path().join("cut");
    let stopped = teacher::train(&config, &teacher_opts(&cut, &text, 4), &Device::Cpu, |r| {
        if r.step == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(stopped.end_step, 3);
    assert!(stopped.transformer_dir.is_none());
    let again = teacher::train(&config, &teacher_opts(&cut, &text, 4), &Device::Cpu, |_| {
        ControlFlow::Continue(())
    });
    let err = again.unwrap_err().to_string();
    assert!(
        err.contains("--resume") && err.contains("state.json"),
        "{err}"
    );
    let mut opts = teacher_opts(&cut, &text, 4);
    opts.resume = true;
    let resumed =
        teacher::train(&config, &opts, &Device::Cpu, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(resumed.start_step, 2, "resumes from the last save");
    let b = weights(&cut);
    for (name, t) in &trained {
        assert_eq!(
            max_diff(t, &b[name]),
            0.0,
            "`{name}` differs after the resume"
        );
    }

    // A resume with another config names the field.
    let mut other = config.clone();
    other.optimizer.lr *= 2.0;
    let err = teacher::train(&other, &opts, &Device::Cpu, |_| ControlFlow::Continue(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("lr"), "{err}");

    // So does a resume on another text encoder (same shapes, other weights): the checkpoint records the
    // fingerprints of the directories it started from.
    let other_text = tmp.path().join("other-text");
    text::build(
        &TextConfig {
            d_model: 16,
            seed: 1,
            ..Default::default()
        },
        &other_text,
    )
    .unwrap();
    let mut opts = teacher_opts(&cut, &other_text, 4);
    opts.resume = true;
    let err = teacher::train(&config, &opts, &Device::Cpu, |_| ControlFlow::Continue(()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("inputs.text_encoder") && err.contains("state.json"),
        "{err}"
    );
}

#[test]
fn lcd_trains_the_student_and_the_ema_target_follows() {
    let tmp = tempfile::tempdir().unwrap();
    let text = text_dir(tmp.path());
    let teacher_out = tmp.path().join("teacher");
    teacher::train(
        &tiny_teacher(),
        &teacher_opts(&teacher_out, &text, 2),
        &Device::Cpu,
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    let teacher_before = weights(&teacher_out);

    let config = DistillConfig {
        dataset_size: 16,
        batch_size: 4,
        ..Default::default()
    };
    let out = tmp.path().join("lcd");
    let opts = distill::RunOptions {
        out: out.clone(),
        teacher: teacher_out.clone(),
        vae: vae_dir(),
        text: text.clone(),
        steps: 3,
        save_every: 10,
        resume: false,
        progress: false,
        dataset: None,
    };
    let run = distill::train(&config, &opts, &Device::Cpu, |_| ControlFlow::Continue(())).unwrap();
    assert!(
        run.records
            .iter()
            .all(|r| r.loss.is_finite() && r.loss >= 0.0)
    );
    let student = weights(&out);
    let target = load(&out.join("checkpoint/target.safetensors"));
    for (name, t) in weights(&teacher_out) {
        assert_eq!(
            max_diff(&t, &teacher_before[&name]),
            0.0,
            "the teacher changed: `{name}`"
        );
    }
    let moved = |a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>| {
        a.iter().any(|(n, t)| max_diff(t, &b[n]) > 0.0)
    };
    assert!(
        moved(&student, &teacher_before),
        "the student did not train"
    );
    assert!(moved(&target, &teacher_before), "the target did not follow");
    assert!(moved(&target, &student), "the target is not an average");

    // The LCD checkpoint is not a teacher checkpoint.
    let mut wrong = teacher_opts(&out, &text, 4);
    wrong.resume = true;
    let err = teacher::train(&tiny_teacher(), &wrong, &Device::Cpu, |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("stage"), "{err}");

    // A learning rate that is not positive is refused by name before anything is written.
    let mut bad = config.clone();
    bad.optimizer.lr = -1.0;
    let mut elsewhere = opts.clone();
    elsewhere.out = tmp.path().join("lcd-bad");
    let err = distill::train(
        &bad,
        &elsewhere,
        &Device::Cpu,
        |_| ControlFlow::Continue(()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("optimizer.lr"), "{err}");
    assert!(!elsewhere.out.exists());
}

#[test]
fn the_adapter_starts_as_the_base_and_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let text = text_dir(tmp.path());
    let base = tmp.path().join("base");
    let mut tc = tiny_teacher();
    tc.num_layers = 3;
    teacher::train(&tc, &teacher_opts(&base, &text, 2), &Device::Cpu, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    let dev = Device::Cpu;
    let (cfg, base_vars) = teacher::load_transformer_vars(&base.join("transformer"), &dev).unwrap();
    let adapter_vars = adapter::init_varmap(&base_vars, &cfg, 2, &dev).unwrap();
    let model =
        pixart::transformer::PixArtTransformer::load(base.join("transformer"), DType::F32, &dev)
            .unwrap();
    let fresh = pixart::controlnet::ControlNetAdapter::new(
        pixart::controlnet::ControlNetConfig { num_layers: 2 },
        &cfg,
        &pixart::weights::Weights::from_varmap(&adapter_vars).unwrap(),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
    let c = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
    let y = Tensor::randn(0f32, 1.0, (2, 3, cfg.caption_channels), &dev).unwrap();
    let t = Tensor::new(&[300f32, 700.0], &dev).unwrap();
    let cond = pixart::controlnet::ControlCondition {
        latents: &c,
        scale: &[1.0],
    };
    let plain = model.forward(&x, &t, &y, None, None).unwrap();
    let with = fresh
        .forward(&model, &x, &t, &y, None, None, &cond)
        .unwrap();
    assert!(
        max_diff(&plain, &with) < 1e-6,
        "a fresh adapter must not change the base"
    );
    assert!(
        pixart_train::adapter::init_varmap(&base_vars, &cfg, 3, &dev).is_err(),
        "3 of 3 blocks do not fit"
    );

    let out = tmp.path().join("cn");
    let config = AdapterConfig {
        dataset_size: 16,
        batch_size: 4,
        num_layers: 2,
        ..Default::default()
    };
    let opts = adapter::RunOptions {
        out: out.clone(),
        base: base.clone(),
        vae: vae_dir(),
        text,
        steps: 3,
        save_every: 10,
        resume: false,
        progress: false,
        dataset: None,
    };
    adapter::train(&config, &opts, &dev, |_| ControlFlow::Continue(())).unwrap();
    let trained =
        pixart::controlnet::ControlNetAdapter::load(out.join("controlnet"), &cfg, DType::F32, &dev)
            .unwrap();
    let after = trained
        .forward(&model, &x, &t, &y, None, None, &cond)
        .unwrap();
    assert!(
        max_diff(&plain, &after) > 0.0,
        "training did not change the adapter's effect"
    );

    // The consistency objective trains too, and its checkpoint does not resume under the ε objective.
    let consistency = AdapterConfig {
        objective: adapter::Objective::Consistency,
        ..config.clone()
    };
    let cn2 = adapter::RunOptions {
        out: tmp.path().join("cn2"),
        save_every: 3,
        ..opts.clone()
    };
    let mut losses = Vec::new();
    adapter::train(&consistency, &cn2, &dev, |r| {
        losses.push(r.loss);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert!(
        losses.len() == 3 && losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    // The error of training `config` with `opts`, which must fail.
    let refused = |config: &AdapterConfig, opts: adapter::RunOptions| {
        adapter::train(config, &opts, &dev, |_| ControlFlow::Continue(()))
            .unwrap_err()
            .to_string()
    };
    let resume = adapter::RunOptions {
        resume: true,
        steps: 4,
        ..cn2.clone()
    };
    let err = refused(&config, resume.clone());
    assert!(
        err.contains("state.json") && err.contains("objective"),
        "{err}"
    );
    // Nor under another share of layout-free captions; and a share outside 0..=1 is refused by name.
    let other_share = AdapterConfig {
        layout_free: 0.0,
        ..consistency.clone()
    };
    let err = refused(&other_share, resume);
    assert!(err.contains("layout_free"), "{err}");
    let bad_share = AdapterConfig {
        layout_free: 1.5,
        ..config.clone()
    };
    let err = refused(
        &bad_share,
        adapter::RunOptions {
            out: tmp.path().join("cn3"),
            ..cn2.clone()
        },
    );
    assert!(err.contains("layout_free") && err.contains("1.5"), "{err}");
    let mut bad_lr = config.clone();
    bad_lr.optimizer.lr = 0.0;
    let err = refused(
        &bad_lr,
        adapter::RunOptions {
            out: tmp.path().join("cn4"),
            ..cn2
        },
    );
    assert!(err.contains("optimizer.lr"), "{err}");
}

#[test]
fn the_teacher_trains_alike_from_an_exported_dataset_and_names_a_bad_one() {
    use pixart_train::dataset::{DatasetConfig, Split, export};
    let tmp = tempfile::tempdir().unwrap();
    let text = text_dir(tmp.path());
    let config = tiny_teacher();
    let data = tmp.path().join("data");
    let procedural = DatasetConfig {
        seed: config.seed,
        ..Default::default()
    };
    export(&data, &procedural, Split::Train, config.dataset_size).unwrap();

    // The exported PNGs are the rendered scenes, losslessly: two steps on the files are two steps on
    // the procedural dataset, bit for bit.
    let rendered = tmp.path().join("rendered");
    teacher::train(
        &config,
        &teacher_opts(&rendered, &text, 2),
        &Device::Cpu,
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    let from_files = tmp.path().join("files");
    let mut opts = teacher_opts(&from_files, &text, 2);
    opts.dataset = Some(data.clone());
    teacher::train(&config, &opts, &Device::Cpu, |_| ControlFlow::Continue(())).unwrap();
    let (a, b) = (weights(&rendered), weights(&from_files));
    for (name, t) in &a {
        assert_eq!(max_diff(t, &b[name]), 0.0, "`{name}` differs");
    }

    let err_with = |dataset: PathBuf, config: &TeacherConfig| {
        let mut opts = teacher_opts(&tmp.path().join("bad"), &text, 1);
        opts.dataset = Some(dataset);
        teacher::train(config, &opts, &Device::Cpu, |_| ControlFlow::Continue(()))
            .unwrap_err()
            .to_string()
    };
    let err = err_with(tmp.path().join("nowhere"), &config);
    assert!(
        err.contains("nowhere") && err.contains("not a directory"),
        "{err}"
    );
    let mut bigger = config.clone();
    bigger.dataset_size = config.dataset_size + 1;
    let err = err_with(data.clone(), &bigger);
    assert!(
        err.contains("samples.jsonl") && err.contains("dataset_size"),
        "{err}"
    );
    std::fs::write(data.join("images/000003.png"), b"not a png").unwrap();
    let err = err_with(data.clone(), &config);
    assert!(err.contains("000003.png") && err.contains("PNG"), "{err}");
}

#[test]
fn a_missing_vae_directory_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let text = text_dir(tmp.path());
    let mut opts = teacher_opts(&tmp.path().join("t"), &text, 1);
    opts.vae = tmp.path().join("nowhere");
    let err = teacher::train(&tiny_teacher(), &opts, &Device::Cpu, |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("nowhere"), "{err}");
}

/// `eval --round-trip` scores the bundled VAE's reconstructions of the prompts' true pictures, without a
/// transformer or text encoder, and its confusion table accounts for every image; a trained VAE reads back
/// most colours (86.5 % on 200 prompts), a failure to decode would read none.
#[test]
fn the_vae_round_trip_is_scored_with_a_confusion_table() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pixart-train"))
        .args([
            "eval",
            "--round-trip",
            "--count",
            "16",
            "--confusion",
            "--vae",
        ])
        .arg(root().join("models/pixart-lcm-shapes"))
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("VAE round trip · n=16 "), "{stdout}");
    // Rows: one per asked-for colour, eight read colours and "none".
    let rows: Vec<Vec<usize>> = stdout
        .lines()
        .filter(|l| l.contains(" | ") && !l.trim_start().starts_with("asked"))
        .map(|l| {
            let cells = l.split(" | ").nth(1).unwrap();
            cells
                .split_whitespace()
                .map(|n| n.parse().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), 8, "{stdout}");
    let total: usize = rows.iter().flatten().sum();
    let right: usize = (0..8).map(|i| rows[i][i]).sum();
    assert_eq!(total, 16, "{stdout}");
    assert!(right >= 12, "{right} of 16 colours read back: {stdout}");

    // Without --round-trip a transformer is required, and the two do not mix.
    let refused = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pixart-train"))
            .args(["eval", "--vae", "x"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    assert!(refused(&["--text", "x"]).contains("--transformer"));
    assert!(refused(&["--round-trip", "--transformer", "x"]).contains("--transformer"));
}

/// The one-command chain at smoke sizes, and its model in the farm's pipeline.
#[test]
fn the_whole_chain_runs_and_its_model_renders_in_the_farm_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("all");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_pixart-train"))
        .args(["all", "--smoke", "--eval-count", "4", "--out"])
        .arg(&out)
        .env("RAYON_NUM_THREADS", "1")
        .status()
        .unwrap();
    assert!(status.success());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    // Teacher DDIM 25 + CFG and teacher LCM 4, student LCM 1/2/4/8, student LCM 4 on held-out pairs.
    let rows = report["accuracy"].as_array().expect("accuracy");
    let models: Vec<&str> = rows.iter().map(|r| r["model"].as_str().unwrap()).collect();
    assert_eq!(
        models,
        [
            "teacher", "teacher", "student", "student", "student", "student", "student"
        ],
        "{report}"
    );
    // The VAE round trip, then scale 1 / scale 0 / no adapter with full and with layout-free prompts.
    let edges = report["edges"].as_array().expect("edges");
    assert_eq!(edges.len(), 7, "{report}");
    assert_eq!(
        edges
            .iter()
            .filter(|e| e["prompts"] == "layout-free")
            .count(),
        3,
        "{report}"
    );
    assert!(out.join("sheet.png").exists() && out.join("sheet.txt").exists());

    use pixart::pipeline::{
        ControlInput, ModelSource, Pipeline, PipelineOptions, RenderItem, RenderRequest,
    };
    let model = out.join("model");
    let mut pipe = Pipeline::load(
        &ModelSource::Dir(model.clone()),
        PipelineOptions {
            controlnet: Some(model.join("controlnet")),
            ..Default::default()
        },
    )
    .unwrap();
    let edge = pixart_train::dataset::DatasetConfig::default()
        .sample(pixart_train::dataset::Split::Train, 0);
    let edge_map = adapter::control_image(&edge, 64, false).unwrap();
    let req = RenderRequest {
        width: 64,
        height: 64,
        steps: 4,
        items: vec![
            RenderItem {
                prompt: edge.caption.clone(),
                seed: 1,
                control: None,
            },
            RenderItem {
                prompt: edge.caption,
                seed: 1,
                control: Some(ControlInput {
                    edge_map,
                    scale: 1.0,
                }),
            },
        ],
    };
    let images = pipe
        .render(&req, &mut |_| pixart::pipeline::Control::Continue)
        .unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0].image.dimensions(), (64, 64));
}

/// `all` checks its LCD options before the hour of VAE and teacher training that precedes that stage,
/// not when it reaches it.
#[test]
fn the_chain_refuses_bad_lcd_options_before_it_trains_anything() {
    for (flag, field) in [
        ("--lcd-ddim-timesteps=0", "num_ddim_timesteps"),
        ("--lcd-guidance=-1", "guidance"),
        ("--lcd-lr=0", "lr"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("all");
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_pixart-train"))
            .args(["all", flag, "--out"])
            .arg(&out)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let stderr = String::from_utf8(run.stderr).unwrap();
        assert!(!run.status.success(), "{flag} accepted: {stderr}");
        assert!(
            stderr.contains(field) && stderr.contains("--lcd-"),
            "{flag}: {stderr}"
        );
        let written: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
        assert!(
            written.is_empty(),
            "{flag}: {written:?} written before the check"
        );
    }
}

/// Every training stage refuses, by name and before touching a file, a gradient clip that would zero
/// every step (0), turn it uphill (< 0) or not clip at all (∞, NaN).
#[test]
fn every_stage_refuses_a_grad_clip_that_is_not_positive() {
    use pixart_train::vae::VaeTrainConfig;
    for grad_clip in [0.0, -1.0, f64::INFINITY, f64::NAN] {
        let results = [
            (
                "vae",
                VaeTrainConfig {
                    grad_clip,
                    ..Default::default()
                }
                .validate(),
            ),
            (
                "teacher",
                TeacherConfig {
                    grad_clip,
                    ..Default::default()
                }
                .validate(),
            ),
            (
                "lcd",
                DistillConfig {
                    grad_clip,
                    ..Default::default()
                }
                .validate(),
            ),
            (
                "controlnet",
                AdapterConfig {
                    grad_clip,
                    ..Default::default()
                }
                .validate(),
            ),
        ];
        for (stage, result) in results {
            let err = result.expect_err(stage).to_string();
            assert!(err.contains("grad_clip"), "{stage}, {grad_clip}: {err}");
        }
    }
    // The defaults pass, so the refusals above are the clip's.
    VaeTrainConfig::default().validate().unwrap();
    TeacherConfig::default().validate().unwrap();
    DistillConfig::default().validate().unwrap();
    AdapterConfig::default().validate().unwrap();
}
