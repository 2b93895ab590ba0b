//! The procedural dataset: seeded scenes with captions, the held-out (colour, shape) combinations, export to a
//! folder and the reader that checks it.
//!
//! Sample `i` of a split depends only on `(seed, split, i)` (a ChaCha8 stream per sample), so any prefix or
//! subset of a dataset is reproducible without generating the rest. On disk a dataset is
//!
//! ```text
//! dir/manifest.json    {"format": "pixart-train-shapes", "version": 1, "image_size": 64, "seed": 7,
//!                       "split": "train", "count": 1000, "held_out": [["red", "triangle"], …]}
//! dir/samples.jsonl    one Record per line: file names, caption and the scene's attributes
//! dir/images/NNNNNN.png   the RGB picture
//! dir/edges/NNNNNN.png    its exact outline, white on black (grayscale)
//! ```
//!
//! [`Dataset::open`] validates all of it up front (every line parses, its caption reads back as its
//! attributes, the files it names exist, the split respects the held-out list) and reports the file and line
//! at fault; [`Dataset::load`] decodes one sample and checks its size.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::attributes::{Attributes, Colour, Position, Shape, Size};
use crate::caption::{self, TEMPLATES};
use crate::edges::EdgeMap;
use crate::scene::{Scene, max_jitter};
use crate::{Error, Result};

/// The combinations kept out of training (each colour and each shape still occurs in training with other
/// partners), to measure compositional generalisation.
pub const HELD_OUT: [(Colour, Shape); 4] = [
    (Colour::Red, Shape::Triangle),
    (Colour::Green, Shape::Circle),
    (Colour::Blue, Shape::Cross),
    (Colour::Yellow, Shape::Square),
];

/// Manifest `format` value.
pub const FORMAT: &str = "pixart-train-shapes";
/// Manifest `version` value.
pub const VERSION: u32 = 1;

/// Which part of the world a sample comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Split {
    /// Every (colour, shape) combination except the held-out ones.
    Train,
    /// Only the held-out combinations.
    HeldOut,
}

/// How a dataset is generated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetConfig {
    /// Side of the square images in pixels (at least 64, a multiple of 16).
    pub image_size: u32,
    pub seed: u64,
    pub held_out: Vec<(Colour, Shape)>,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            image_size: 64,
            seed: 0,
            held_out: HELD_OUT.to_vec(),
        }
    }
}

/// One generated sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub index: u64,
    pub scene: Scene,
    /// Which caption template ([`caption::caption`]) was used.
    pub template: usize,
    pub caption: String,
}

impl Sample {
    /// This scene's caption without size and position ([`caption::layout_free`], template `template`):
    /// what a prompt says when an edge map gives the layout.
    pub fn layout_free_caption(&self, template: usize) -> String {
        let a = &self.scene.attributes;
        caption::layout_free(a.colour, a.shape, self.scene.background, template)
    }
}

impl DatasetConfig {
    /// Checks the size and the held-out list (which must leave every colour and shape in training).
    pub fn validate(&self) -> Result<()> {
        if self.image_size < 64 || !self.image_size.is_multiple_of(16) {
            return Err(Error::InvalidInput {
                field: "image_size",
                message: format!(
                    "{} px: must be at least 64 and a multiple of 16 (the VAE's ×8 grid of 2×2 patches)",
                    self.image_size
                ),
            });
        }
        for c in Colour::ALL {
            if Shape::ALL.iter().all(|s| self.held_out.contains(&(c, *s))) {
                return Err(Error::InvalidInput {
                    field: "held_out",
                    message: format!("holds out every shape in {c}: {c} would never be trained"),
                });
            }
        }
        for s in Shape::ALL {
            if Colour::ALL.iter().all(|c| self.held_out.contains(&(*c, s))) {
                return Err(Error::InvalidInput {
                    field: "held_out",
                    message: format!("holds out every colour of {s}: {s} would never be trained"),
                });
            }
        }
        if self.held_out.is_empty() {
            return Err(Error::InvalidInput {
                field: "held_out",
                message: "is empty: the held-out split would have no samples".into(),
            });
        }
        Ok(())
    }

    /// Sample `index` of `split`. Deterministic in `(seed, split, index)`.
    pub fn sample(&self, split: Split, index: u64) -> Sample {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index.wrapping_mul(2) + (split == Split::HeldOut) as u64);
        let (colour, shape) = match split {
            Split::HeldOut => self.held_out[rng.random_range(0..self.held_out.len())],
            Split::Train => loop {
                let c = Colour::ALL[rng.random_range(0..Colour::ALL.len())];
                let s = Shape::ALL[rng.random_range(0..Shape::ALL.len())];
                if !self.held_out.contains(&(c, s)) {
                    break (c, s);
                }
            },
        };
        let size = Size::ALL[rng.random_range(0..Size::ALL.len())];
        let position = Position::ALL[rng.random_range(0..Position::ALL.len())];
        let others: Vec<Colour> = Colour::ALL.into_iter().filter(|c| *c != colour).collect();
        let background = others[rng.random_range(0..others.len())];
        let j = max_jitter(self.image_size);
        let jitter = (rng.random_range(-j..=j), rng.random_range(-j..=j));
        let template = rng.random_range(0..TEMPLATES);
        let attributes = Attributes {
            colour,
            shape,
            size,
            position,
        };
        Sample {
            index,
            scene: Scene {
                attributes,
                background,
                jitter,
            },
            template,
            caption: caption::caption(&attributes, background, template),
        }
    }

    /// Samples `0..count` of `split`.
    pub fn samples(&self, split: Split, count: u64) -> Vec<Sample> {
        (0..count).map(|i| self.sample(split, i)).collect()
    }
}

/// The manifest of an exported dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub image_size: u32,
    pub seed: u64,
    pub split: Split,
    pub count: u64,
    pub held_out: Vec<(Colour, Shape)>,
}

/// One line of `samples.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub index: u64,
    /// Relative to the dataset directory.
    pub image: String,
    /// Relative to the dataset directory.
    pub edges: String,
    pub caption: String,
    pub template: usize,
    pub colour: Colour,
    pub shape: Shape,
    pub size: Size,
    pub position: Position,
    pub background: Colour,
    pub jitter: (i32, i32),
}

impl Record {
    pub fn attributes(&self) -> Attributes {
        Attributes {
            colour: self.colour,
            shape: self.shape,
            size: self.size,
            position: self.position,
        }
    }

    pub fn scene(&self) -> Scene {
        Scene {
            attributes: self.attributes(),
            background: self.background,
            jitter: self.jitter,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes samples `0..count` of `split` to `dir` (created if missing; existing files are overwritten).
pub fn export(dir: &Path, config: &DatasetConfig, split: Split, count: u64) -> Result<Manifest> {
    config.validate()?;
    for sub in ["images", "edges"] {
        let d = dir.join(sub);
        fs::create_dir_all(&d).map_err(io(&d))?;
    }
    let side = config.image_size;
    let jsonl_path = dir.join("samples.jsonl");
    let mut jsonl =
        std::io::BufWriter::new(fs::File::create(&jsonl_path).map_err(io(&jsonl_path))?);
    for sample in config.samples(split, count) {
        let image = format!("images/{:06}.png", sample.index);
        let edges = format!("edges/{:06}.png", sample.index);
        save_png(&dir.join(&image), |p| {
            sample
                .scene
                .render(side)
                .save_with_format(p, image::ImageFormat::Png)
        })?;
        save_png(&dir.join(&edges), |p| {
            sample
                .scene
                .edges(side)
                .to_gray()
                .save_with_format(p, image::ImageFormat::Png)
        })?;
        let a = sample.scene.attributes;
        let record = Record {
            index: sample.index,
            image,
            edges,
            caption: sample.caption.clone(),
            template: sample.template,
            colour: a.colour,
            shape: a.shape,
            size: a.size,
            position: a.position,
            background: sample.scene.background,
            jitter: sample.scene.jitter,
        };
        let line = serde_json::to_string(&record).expect("records serialise");
        writeln!(jsonl, "{line}").map_err(io(&jsonl_path))?;
    }
    jsonl.flush().map_err(io(&jsonl_path))?;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        image_size: side,
        seed: config.seed,
        split,
        count,
        held_out: config.held_out.clone(),
    };
    let manifest_path = dir.join("manifest.json");
    let text = serde_json::to_string_pretty(&manifest).expect("manifests serialise");
    fs::write(&manifest_path, text + "\n").map_err(io(&manifest_path))?;
    Ok(manifest)
}

fn save_png(path: &Path, save: impl FnOnce(&Path) -> image::ImageResult<()>) -> Result<()> {
    save(path).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: format!("cannot write PNG: {e}"),
    })
}

/// An exported dataset, validated.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub records: Vec<Record>,
}

impl Dataset {
    /// Reads and checks `dir/manifest.json` and `dir/samples.jsonl` and that every file they name exists.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::Dataset {
                path: dir,
                message: "is not a directory (export a dataset there first)".into(),
            });
        }
        let manifest_path = dir.join("manifest.json");
        if !manifest_path.is_file() {
            return Err(Error::Dataset {
                path: manifest_path,
                message: "missing: not a dataset directory".into(),
            });
        }
        let text = fs::read_to_string(&manifest_path).map_err(io(&manifest_path))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: manifest_path.clone(),
            line: Some(e.line()),
            message: e.to_string(),
        })?;
        let bad_manifest = |message: String| Error::Json {
            path: manifest_path.clone(),
            line: None,
            message,
        };
        if manifest.format != FORMAT || manifest.version != VERSION {
            return Err(bad_manifest(format!(
                "format `{}` version {}, expected `{FORMAT}` version {VERSION}",
                manifest.format, manifest.version
            )));
        }
        DatasetConfig {
            image_size: manifest.image_size,
            seed: manifest.seed,
            held_out: manifest.held_out.clone(),
        }
        .validate()
        .map_err(|e| bad_manifest(e.to_string()))?;

        let jsonl_path = dir.join("samples.jsonl");
        let file = fs::File::open(&jsonl_path).map_err(io(&jsonl_path))?;
        let mut records = Vec::new();
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(io(&jsonl_path))?;
            let bad = |message: String| Error::Json {
                path: jsonl_path.clone(),
                line: Some(i + 1),
                message,
            };
            if line.trim().is_empty() {
                continue;
            }
            let r: Record = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
            if r.colour == r.background {
                return Err(bad(format!(
                    "background `{}` equals the foreground colour",
                    r.background
                )));
            }
            let held = manifest.held_out.contains(&(r.colour, r.shape));
            if held != (manifest.split == Split::HeldOut) {
                return Err(bad(format!(
                    "({}, {}) is {} held-out combination but the split is {:?}",
                    r.colour,
                    r.shape,
                    if held { "a" } else { "not a" },
                    manifest.split
                )));
            }
            match caption::parse(&r.caption) {
                Some((a, bg)) if a == r.attributes() && bg == r.background => {}
                _ => {
                    return Err(bad(format!(
                        "caption `{}` does not describe the record's scene ({}, on {})",
                        r.caption,
                        r.attributes(),
                        r.background
                    )));
                }
            }
            for name in [&r.image, &r.edges] {
                let p = dir.join(name);
                if name.contains("..") || !p.is_file() {
                    return Err(bad(format!("names `{name}`, which is missing")));
                }
            }
            records.push(r);
        }
        if records.len() as u64 != manifest.count {
            return Err(Error::Dataset {
                path: jsonl_path,
                message: format!(
                    "has {} records but manifest.json says count = {}",
                    records.len(),
                    manifest.count
                ),
            });
        }
        Ok(Self {
            dir,
            manifest,
            records,
        })
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Decodes record `i`: its picture and its edge map, each checked to be `image_size` square.
    pub fn load(&self, i: usize) -> Result<(RgbImage, EdgeMap)> {
        let r = &self.records[i];
        let side = self.manifest.image_size;
        let image_path = self.dir.join(&r.image);
        let image = decode(&image_path, side)?.to_rgb8();
        let edges_path = self.dir.join(&r.edges);
        let edges = EdgeMap::from_gray(&decode(&edges_path, side)?.to_luma8(), 128);
        Ok((image, edges))
    }
}

/// The first `count` training samples with their pictures: rendered from `data` when `dir` is `None`,
/// read from the exported dataset at `dir` otherwise (its manifest must be a training split of
/// `data.image_size` px with at least `count` records). Every stage trains on this, so a stage run with
/// `--dataset DIR` trains on the files and a missing or corrupt directory is an error naming the file.
pub fn training_set(
    dir: Option<&Path>,
    data: &DatasetConfig,
    count: u64,
) -> Result<Vec<(Sample, RgbImage)>> {
    let Some(dir) = dir else {
        data.validate()?;
        return Ok(data
            .samples(Split::Train, count)
            .into_iter()
            .map(|s| {
                let image = s.scene.render(data.image_size);
                (s, image)
            })
            .collect());
    };
    let ds = Dataset::open(dir)?;
    let manifest_path = ds.dir.join("manifest.json");
    let mismatch = |message: String| Error::Dataset {
        path: manifest_path.clone(),
        message,
    };
    if ds.manifest.split != Split::Train {
        return Err(mismatch(format!(
            "split is {:?}: training reads a training split",
            ds.manifest.split
        )));
    }
    if ds.manifest.image_size != data.image_size {
        return Err(mismatch(format!(
            "image_size is {} px, this stage trains at {} px",
            ds.manifest.image_size, data.image_size
        )));
    }
    if (ds.len() as u64) < count {
        return Err(Error::Dataset {
            path: ds.dir.join("samples.jsonl"),
            message: format!(
                "has {} records, this stage's dataset_size is {count}: export more or lower it",
                ds.len()
            ),
        });
    }
    (0..count as usize)
        .map(|i| {
            let r = &ds.records[i];
            let (image, _) = ds.load(i)?;
            let sample = Sample {
                index: r.index,
                scene: r.scene(),
                template: r.template,
                caption: r.caption.clone(),
            };
            Ok((sample, image))
        })
        .collect()
}

fn decode(path: &Path, side: u32) -> Result<image::DynamicImage> {
    let bytes = fs::read(path).map_err(io(path))?;
    let img =
        image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).map_err(|e| {
            Error::Image {
                path: path.to_path_buf(),
                message: format!("not a valid PNG: {e}"),
            }
        })?;
    if img.width() != side || img.height() != side {
        return Err(Error::Image {
            path: path.to_path_buf(),
            message: format!(
                "is {}×{}, the manifest says {side}×{side}",
                img.width(),
                img.height()
            ),
        });
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_deterministic_and_respect_the_split() {
        let cfg = DatasetConfig {
            seed: 42,
            ..Default::default()
        };
        let a = cfg.samples(Split::Train, 300);
        assert_eq!(a, cfg.samples(Split::Train, 300));
        assert_eq!(
            a[123],
            cfg.sample(Split::Train, 123),
            "sample i is independent of the rest"
        );
        let other = DatasetConfig {
            seed: 43,
            ..cfg.clone()
        };
        assert_ne!(a, other.samples(Split::Train, 300));
        for s in &a {
            let at = s.scene.attributes;
            assert!(!HELD_OUT.contains(&(at.colour, at.shape)));
            assert_ne!(at.colour, s.scene.background);
        }
        for s in cfg.samples(Split::HeldOut, 100) {
            let at = s.scene.attributes;
            assert!(HELD_OUT.contains(&(at.colour, at.shape)));
        }
        // Every attribute value occurs in 300 training samples.
        let has = |f: &dyn Fn(&Sample) -> bool| a.iter().any(f);
        for c in Colour::ALL {
            assert!(has(&|s| s.scene.attributes.colour == c));
        }
        for p in Position::ALL {
            assert!(has(&|s| s.scene.attributes.position == p));
        }
        for t in 0..TEMPLATES {
            assert!(has(&|s| s.template == t));
        }
    }

    #[test]
    fn config_validation() {
        let ok = DatasetConfig::default();
        ok.validate().unwrap();
        let small = DatasetConfig {
            image_size: 48,
            ..ok.clone()
        };
        assert!(
            small
                .validate()
                .unwrap_err()
                .to_string()
                .contains("image_size")
        );
        let all_red = DatasetConfig {
            held_out: Shape::ALL.iter().map(|s| (Colour::Red, *s)).collect(),
            ..ok
        };
        assert!(all_red.validate().unwrap_err().to_string().contains("red"));
    }
}
