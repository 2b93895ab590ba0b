//! `pixart::control` against its references (fixtures and generator in `tests/fixtures/control/`):
//! OpenCV's `cvtColor` + `Canny`, PIL's bilinear resize with torchvision's centre crop, and the
//! `controlnet_aux` HED network (narrow random-weight variant, same key layout) run by PyTorch.

mod common;

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use image::{DynamicImage, GrayImage, RgbImage};
use pixart::control::{self, Hed};
use serde_json::Value;

fn dir() -> std::path::PathBuf {
    common::fixtures("control")
}

fn manifest() -> Result<Value> {
    let text = std::fs::read_to_string(dir().join("manifest.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn rgb(name: &str) -> Result<RgbImage> {
    Ok(image::open(dir().join(name))
        .with_context(|| name.to_string())?
        .to_rgb8())
}

fn gray(name: &str) -> Result<GrayImage> {
    Ok(image::open(dir().join(name))
        .with_context(|| name.to_string())?
        .to_luma8())
}

/// Agreement the Canny port must reach on every case. The port is integer arithmetic mirroring
/// OpenCV, so anything short of an exact match is a bug.
const CANNY_MIN_AGREEMENT: f64 = 1.0;

#[test]
fn canny_matches_opencv() -> Result<()> {
    let m = manifest()?;
    let cases = m["canny"].as_array().context("canny cases")?;
    assert!(cases.len() >= 8, "fixture has {} cases", cases.len());
    let (mut equal, mut total, mut edge_pixels) = (0usize, 0usize, 0usize);
    let mut worst = 1.0f64;
    for case in cases {
        let image = rgb(case["image"].as_str().unwrap())?;
        // The gray conversion on its own, exactly.
        let want_gray = gray(case["gray"].as_str().unwrap())?;
        assert_eq!(
            control::to_gray_opencv(&image).as_raw(),
            want_gray.as_raw(),
            "gray of {}",
            case["image"]
        );
        let (low, high) = (
            case["low"].as_f64().unwrap(),
            case["high"].as_f64().unwrap(),
        );
        let want = gray(case["edges"].as_str().unwrap())?;
        let want_edges = want.as_raw().iter().filter(|&&v| v > 0).count();
        assert_eq!(want_edges as u64, case["edge_pixels"].as_u64().unwrap());
        let ours = control::canny(&image, low as f32, high as f32)?;
        assert_eq!(ours.dimensions(), want.dimensions());
        let same = ours
            .pixels()
            .zip(want.pixels())
            .filter(|(a, b)| a.0 == [b.0[0]; 3])
            .count();
        let n = want.as_raw().len();
        let agreement = same as f64 / n as f64;
        println!(
            "canny {} low {low} high {high}: {same}/{n} pixels equal ({:.4}%), {want_edges} reference edge pixels",
            case["image"],
            100.0 * agreement
        );
        worst = worst.min(agreement);
        equal += same;
        total += n;
        edge_pixels += want_edges;
    }
    println!(
        "canny overall: {equal}/{total} pixels equal ({:.4}%), worst case {:.4}%",
        100.0 * equal as f64 / total as f64,
        100.0 * worst
    );
    // The fixture must exercise edges, or agreement would be trivial.
    assert!(
        edge_pixels > 3000,
        "{edge_pixels} edge pixels in the fixture"
    );
    assert!(
        worst >= CANNY_MIN_AGREEMENT,
        "worst-case agreement {worst} < {CANNY_MIN_AGREEMENT}"
    );
    Ok(())
}

#[test]
fn resize_center_crop_matches_pil_and_torchvision() -> Result<()> {
    let m = manifest()?;
    for case in m["resize"].as_array().context("resize cases")? {
        let src = DynamicImage::ImageRgb8(rgb(case["image"].as_str().unwrap())?);
        let (w, h) = (
            case["width"].as_u64().unwrap() as u32,
            case["height"].as_u64().unwrap() as u32,
        );
        let want = rgb(case["expected"].as_str().unwrap())?;
        let ours = control::resize_center_crop(&src, w, h);
        assert_eq!(ours.dimensions(), (w, h));
        let diffs: Vec<i32> = ours
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .collect();
        let max = *diffs.iter().max().unwrap();
        let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
        println!("resize {w}x{h}: max |ours − PIL| {max} levels, mean {mean:.3}");
        // Different resampling arithmetic (PIL: fixed point; image: f32) rounds differently,
        // but a misplaced crop or a different filter is off by tens of levels.
        assert!(max <= 2 && mean < 0.25, "{w}x{h}: max {max}, mean {mean}");
    }
    Ok(())
}

fn hed_expected() -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        dir().join("hed_expected.safetensors"),
        &Device::Cpu,
    )?)
}

fn check_hed(weights: &str) -> Result<()> {
    let hed = Hed::load(&dir().join(weights), &Device::Cpu)?;
    assert_eq!(hed.stages(), 5);
    let input = rgb("hed_input.png")?;
    let want = &hed_expected()?["edge"];
    let ours = hed.detect_f32(&input)?;
    let err = common::rel_err(&ours, want)?;
    println!("hed ({weights}): max|ours − PyTorch| / max(1, max|ref|) = {err:.2e}");
    assert!(err <= 1e-3, "{weights}: error {err}");

    // The 8-bit map is the reference's truncation of the same values (±1 where a value sits
    // on a level boundary within float noise).
    let img = hed.detect(&input)?;
    let want8: Vec<u8> = want
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|&v| (v * 255.0).clamp(0.0, 255.0) as u8)
        .collect();
    let mut off = 0;
    for (p, &w8) in img.pixels().zip(&want8) {
        assert_eq!(p.0[0], p.0[1]);
        assert_eq!(p.0[1], p.0[2]);
        let d = (p.0[0] as i32 - w8 as i32).abs();
        assert!(d <= 1, "8-bit edge off by {d}");
        off += (d > 0) as usize;
    }
    println!(
        "hed ({weights}) 8-bit: {off}/{} pixels differ by 1",
        want8.len()
    );
    Ok(())
}

#[test]
fn hed_matches_pytorch_from_safetensors() -> Result<()> {
    check_hed("hed_narrow.safetensors")
}

#[test]
fn hed_matches_pytorch_from_pth() -> Result<()> {
    check_hed("hed_narrow.pth")
}

#[test]
fn hed_rejects_wrong_weight_files() -> Result<()> {
    let path = dir().join("hed_narrow.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;

    let mut missing = tensors.clone();
    missing.remove("block3.projection.bias");
    let e = Hed::from_tensors(missing, &path).unwrap_err().to_string();
    assert!(e.contains("block3.projection.bias"), "{e}");

    let mut extra = tensors.clone();
    extra.insert(
        "head.weight".into(),
        Tensor::zeros((1, 1), candle_core::DType::F32, &Device::Cpu)?,
    );
    let e = Hed::from_tensors(extra, &path).unwrap_err().to_string();
    assert!(e.contains("head.weight"), "{e}");

    let mut wrong = tensors;
    wrong.insert(
        "block2.convs.0.weight".into(),
        Tensor::zeros((8, 5, 3, 3), candle_core::DType::F32, &Device::Cpu)?,
    );
    let e = Hed::from_tensors(wrong, &path).unwrap_err().to_string();
    assert!(
        e.contains("block2.convs.0.weight") && e.contains("[8, 5, 3, 3]"),
        "{e}"
    );

    let e = Hed::load(Path::new("/nonexistent/ControlNetHED.pth"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/ControlNetHED.pth"), "{e}");

    let hed = Hed::load(&path, &Device::Cpu)?;
    let e = hed.detect(&RgbImage::new(8, 64)).unwrap_err().to_string();
    assert!(e.contains("at least 16 px"), "{e}");
    Ok(())
}
