//! A contact sheet of a finished job: every image beside its prompt, seed and steps (and the edge
//! map that guided it), in one PNG, so the result of `pixfarm dev` can be judged at a glance
//! without opening a dozen files.

use std::path::Path;

use anyhow::Context;
use image::{Rgb, RgbImage, imageops::FilterType};
use pixfarm_core::model::{ManifestLine, ResultStatus};

use crate::font;

/// Side of an image in the sheet (small renders are scaled up, pixel-exact).
const CELL: u32 = 128;
const GAP: u32 = 8;
const TEXT_SCALE: u32 = 2;
/// Characters per caption line.
const TEXT_COLS: usize = 34;
const COLUMNS: usize = 2;
const BACKGROUND: Rgb<u8> = Rgb([24, 24, 28]);
const INK: Rgb<u8> = Rgb([235, 235, 235]);
const DIM: Rgb<u8> = Rgb([150, 150, 160]);

/// Reads `manifest.jsonl` (one [`ManifestLine`] per line); errors name the file and line.
pub fn read_manifest(path: &Path) -> anyhow::Result<Vec<ManifestLine>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not a manifest line", path.display(), i + 1))
        })
        .collect()
}

fn load(store: &Path, key: &str) -> anyhow::Result<RgbImage> {
    let path = store.join(key);
    Ok(image::open(&path)
        .with_context(|| format!("reading image {}", path.display()))?
        .to_rgb8())
}

/// Fits `img` into a `side`² box: nearest-neighbour, so a 64-px render shows its real pixels.
fn fit(img: &RgbImage, side: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let k = (side as f64 / w.max(h) as f64).max(f64::MIN_POSITIVE);
    let (nw, nh) = (
        ((w as f64 * k).round() as u32).max(1),
        ((h as f64 * k).round() as u32).max(1),
    );
    image::imageops::resize(img, nw, nh, FilterType::Nearest)
}

/// Draws the succeeded images of `lines` (objects under `store`, the `file://` store's root), in index
/// order, and writes the sheet to `out`. Returns how many images it holds.
pub fn write(out: &Path, store: &Path, lines: &[ManifestLine]) -> anyhow::Result<usize> {
    let mut done: Vec<&ManifestLine> = lines
        .iter()
        .filter(|l| l.status == ResultStatus::Succeeded && l.key.is_some())
        .collect();
    done.sort_by_key(|l| l.index);
    anyhow::ensure!(!done.is_empty(), "no rendered images for a contact sheet");
    let text_w = TEXT_COLS as u32 * font::advance(TEXT_SCALE);
    let cell_w = CELL + GAP + text_w + GAP;
    let cell_h = CELL + GAP;
    let cols = COLUMNS.min(done.len());
    let rows = done.len().div_ceil(cols);
    let mut sheet = RgbImage::from_pixel(
        cols as u32 * cell_w + GAP,
        rows as u32 * cell_h + GAP,
        BACKGROUND,
    );
    for (i, line) in done.iter().enumerate() {
        let x = GAP + (i % cols) as u32 * cell_w;
        let y = GAP + (i / cols) as u32 * cell_h;
        let img = fit(&load(store, line.key.as_deref().unwrap_or_default())?, CELL);
        image::imageops::replace(&mut sheet, &img, x as i64, y as i64);
        let tx = x + CELL + GAP;
        let mut ty = y;
        let lh = font::line_height(TEXT_SCALE);
        for l in font::wrap(&line.prompt, TEXT_COLS).iter().take(5) {
            font::draw(&mut sheet, tx, ty, l, TEXT_SCALE, INK);
            ty += lh;
        }
        let p = &line.parameters;
        let facts = format!(
            "seed {}, {} steps, {}x{}",
            line.seed, p.steps, p.width, p.height
        );
        font::draw(&mut sheet, tx, ty, &facts, TEXT_SCALE, DIM);
        ty += lh;
        if let Some(key) = &line.parameters.control_key {
            let room = (y + CELL).saturating_sub(ty + lh);
            if room >= 16 {
                font::draw(&mut sheet, tx, ty, "edge map:", TEXT_SCALE, DIM);
                let edges = fit(&load(store, key)?, room.min(CELL / 2));
                let ex = tx + 10 * font::advance(TEXT_SCALE);
                image::imageops::replace(&mut sheet, &edges, ex as i64, ty as i64);
            }
        }
    }
    sheet
        .save(out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(done.len())
}
