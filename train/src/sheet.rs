//! Contact sheets: rendered images in one PNG grid, with the prompts in a text legend beside it
//! (`sheet.png` → `sheet.txt`, row by row), so a person can judge a model at a glance.

use std::fmt::Write as _;
use std::path::Path;

use image::{Rgb, RgbImage};

use crate::{Error, Result};

/// Writes the first `max` images in a grid `cols` wide, 2-pixel white gutters, and the legend.
pub fn write(
    path: &Path,
    images: &[RgbImage],
    captions: &[&str],
    cols: usize,
    max: usize,
) -> Result<()> {
    let n = images.len().min(max);
    if n == 0 {
        return Err(Error::InvalidInput {
            field: "images",
            message: "no images for a contact sheet".into(),
        });
    }
    let (w, h) = images[0].dimensions();
    let cols = cols.clamp(1, n);
    let rows = n.div_ceil(cols);
    let gap = 2u32;
    let mut sheet = RgbImage::from_pixel(
        cols as u32 * (w + gap) + gap,
        rows as u32 * (h + gap) + gap,
        Rgb([255, 255, 255]),
    );
    let mut legend = String::new();
    for (i, img) in images.iter().take(n).enumerate() {
        let (r, c) = (i / cols, i % cols);
        image::imageops::replace(
            &mut sheet,
            img,
            (gap + c as u32 * (w + gap)) as i64,
            (gap + r as u32 * (h + gap)) as i64,
        );
        let _ = writeln!(
            legend,
            "row {} col {}: {}",
            r + 1,
            c + 1,
            captions.get(i).copied().unwrap_or("")
        );
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    sheet.save(path).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let txt = path.with_extension("txt");
    std::fs::write(&txt, legend).map_err(|source| Error::Io { path: txt, source })
}
