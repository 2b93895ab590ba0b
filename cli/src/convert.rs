//! `pixfarm convert-controlnet`: the released PixArt-δ ControlNet checkpoint (`PixArt-XL-2-1024-ControlNet.pth`,
//! original layout, base model included) to the diffusers-community adapter directory that workers load with
//! `--controlnet-dir`. Only the adapter is written; the base comes from the diffusers base checkpoint.

use std::path::PathBuf;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct ConvertControlnetArgs {
    /// The original checkpoint (a torch `.pth` holding `{"state_dict": {...}}`).
    pub input: PathBuf,
    /// Output directory: `config.json` (`num_layers`) + `diffusion_pytorch_model.safetensors`.
    pub out_dir: PathBuf,
}

pub fn run(args: ConvertControlnetArgs) -> anyhow::Result<()> {
    let report = pixart::controlnet::convert_controlnet_pth(&args.input, &args.out_dir)
        .with_context(|| format!("cannot convert {}", args.input.display()))?;
    println!(
        "wrote a {}-block ControlNet adapter ({} tensors, {} parameters) to {}",
        report.num_layers,
        report.tensors_written,
        report.parameters,
        args.out_dir.display()
    );
    if report.base_model_tensors_ignored > 0 {
        println!(
            "skipped {} base_model.* tensors (the frozen base: use the diffusers base checkpoint)",
            report.base_model_tensors_ignored
        );
    }
    if !report.other_ignored.is_empty() {
        println!(
            "skipped {} other tensors: {}",
            report.other_ignored.len(),
            report.other_ignored.join(", ")
        );
    }
    Ok(())
}
