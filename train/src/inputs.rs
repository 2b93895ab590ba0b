//! Fingerprints of the directories a stage reads its starting weights from (SHA-256 of every file, in
//! path order), recorded in the stage's checkpoint config. Resuming a run on other inputs — a retrained
//! VAE, another teacher — would otherwise continue silently on latents or weights the checkpoint was
//! never trained against; with the fingerprints in the config it is an error naming the input.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// `{role: {relative path: sha256 hex}}` for each `(role, directory)`; subdirectories are walked.
pub fn fingerprints(inputs: &[(&str, PathBuf)]) -> Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    for (role, dir) in inputs {
        // Checked here, not left to `read_dir`, so that the error says which input is missing rather
        // than the OS's bare "No such file or directory".
        if !dir.is_dir() {
            return Err(Error::ModelDir {
                path: dir.clone(),
                message: format!("the {role} input is not a directory (missing or mistyped path?)"),
            });
        }
        let mut files = Vec::new();
        walk(dir, &mut files)?;
        files.sort();
        let mut entry = serde_json::Map::new();
        for file in files {
            let bytes = std::fs::read(&file).map_err(|e| io_error(&file, e))?;
            let rel = file.strip_prefix(dir).unwrap_or(&file).to_string_lossy();
            let hash = Sha256::digest(&bytes);
            let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
            entry.insert(rel.into_owned(), serde_json::Value::String(hex));
        }
        out.insert((*role).to_string(), serde_json::Value::Object(entry));
    }
    Ok(serde_json::Value::Object(out))
}

/// The `(role, directory)` pairs of the frozen text side and VAE every diffusion stage reads (and the
/// exported dataset, when it trains on one), for [`fingerprints`].
pub fn frozen_inputs(
    vae: &Path,
    text: &Path,
    dataset: Option<&Path>,
) -> Vec<(&'static str, PathBuf)> {
    let mut inputs = vec![
        ("vae", vae.join("vae")),
        ("text_encoder", text.join("text_encoder")),
        ("tokenizer", text.join("tokenizer")),
    ];
    inputs.extend(dataset.map(|d| ("dataset", d.to_path_buf())));
    inputs
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_error(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| io_error(dir, e))?.path();
        if path.is_dir() {
            walk(&path, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::ModelDir {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_file_changes_its_fingerprint_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("vae")).unwrap();
        std::fs::write(dir.path().join("vae/weights.bin"), b"one").unwrap();
        let inputs = [("vae", dir.path().to_path_buf())];
        let before = fingerprints(&inputs).unwrap();
        assert_eq!(fingerprints(&inputs).unwrap(), before, "deterministic");
        std::fs::write(dir.path().join("vae/weights.bin"), b"two").unwrap();
        let after = fingerprints(&inputs).unwrap();
        assert_ne!(
            after["vae"]["vae/weights.bin"],
            before["vae"]["vae/weights.bin"]
        );
        let missing = fingerprints(&[("dataset", dir.path().join("missing"))])
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("missing") && missing.contains("the dataset input"),
            "{missing}"
        );
    }
}
