//! `pixfarm convert-controlnet` as a user runs it: the binary on the tiny original-layout `.pth` that
//! `pixart/tests/fixtures/controlnet/gen.py` writes with `torch.save`.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pixart/tests/fixtures/controlnet")
}

#[test]
fn converts_the_tiny_pth_and_reports_what_it_skipped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_dir = tmp.path().join("adapter");
    let out = Command::new(env!("CARGO_BIN_EXE_pixfarm"))
        .arg("convert-controlnet")
        .arg(fixtures().join("controlnet.pth"))
        .arg(&out_dir)
        .output()
        .expect("run pixfarm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("2-block"), "{stdout}");
    assert!(stdout.contains("base_model.*"), "{stdout}");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("config.json")).expect("config.json"),
    )
    .expect("json");
    assert_eq!(config["num_layers"], 2);
    // The converted adapter has exactly the directly generated adapter's tensors (values are compared
    // bit for bit in pixart's controlnet_golden test).
    let converted = candle_core::safetensors::load(
        out_dir.join("diffusion_pytorch_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("converted weights");
    let direct = candle_core::safetensors::load(
        fixtures().join("adapter/diffusion_pytorch_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("direct weights");
    let mut a: Vec<_> = converted.keys().collect();
    let mut b: Vec<_> = direct.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);

    // A file that is not a torch checkpoint: non-zero exit, one sentence naming the file.
    let bad = Command::new(env!("CARGO_BIN_EXE_pixfarm"))
        .arg("convert-controlnet")
        .arg(fixtures().join("adapter/config.json"))
        .arg(tmp.path().join("nope"))
        .output()
        .expect("run pixfarm");
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("config.json"), "{stderr}");
}
