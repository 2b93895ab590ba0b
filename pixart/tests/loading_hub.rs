//! The hub-cache path of model loading, offline: a cache laid out as `hf-hub` / `huggingface_hub`
//! write it (`models--{org}--{name}/refs/main` → `snapshots/{commit}/…`) resolves without network
//! and the pipeline loads from the snapshot.

use std::path::{Path, PathBuf};

use anyhow::Result;
use pixart::loading::{ModelPaths, resolve_hub};
use pixart::pipeline::{
    Control, ModelSource, Pipeline, PipelineOptions, RenderItem, RenderRequest,
};

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-pixart-lcm")
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), dest)?;
        }
    }
    Ok(())
}

#[test]
fn hub_cache_snapshot_resolves_offline() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = tmp.path().join("models--acme--tiny-pixart-lcm");
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs/main"), "0123456789abcdef")?;
    let snapshot = repo.join("snapshots/0123456789abcdef");
    copy_tree(&model_dir(), &snapshot)?;

    let paths = resolve_hub(
        "acme/tiny-pixart-lcm",
        None,
        hf_hub::Cache::new(tmp.path().to_path_buf()),
    )?;
    assert_eq!(paths, ModelPaths::from_dir(&snapshot)?);

    let mut pipe = Pipeline::load(
        &ModelSource::Dir(paths.root.clone()),
        PipelineOptions::default(),
    )?;
    let req = RenderRequest {
        width: 32,
        height: 32,
        steps: 1,
        items: vec![RenderItem {
            prompt: "a cat".into(),
            seed: 1,
            control: None,
        }],
    };
    assert_eq!(
        pipe.render(&req, &mut |_| Control::Continue)?[0]
            .image
            .dimensions(),
        (32, 32)
    );
    Ok(())
}
