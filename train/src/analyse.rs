//! The image analyser: reads foreground colour, shape, size and position from an RGB picture, with fixed
//! rules and no learned weights, so that it measures a model and not itself.
//!
//! 1. **Background**: the palette colour most of the border pixels are nearest to; its observed colour is
//!    the mean of those border pixels.
//! 2. **Foreground colour**: the most common nearest palette colour (other than the background's) among the
//!    shape's *core*: the pixels at least ¾ as far from the background's colour as the 99th percentile
//!    pixel. Blurred edges blend into third colours on a ring around the shape, and on a small shape the
//!    ring can outnumber the inside; the core leaves it out.
//! 3. **Coverage**: each pixel's position between the observed background and foreground means, projected
//!    on the line through them and clamped to [0, 1] (a soft mask: blur keeps its total, noise averages
//!    out); the binary mask is coverage ≥ ½, reduced to its largest 4-connected component.
//! 4. **Size** and **position** from that component's bounding box: its larger side against the midpoint
//!    between the small and large extents, and the anchor ([`Position::anchor`]) nearest to its centre.
//! 5. **Shape** by template matching on the coverage: each shape's exact rasterisation
//!    ([`crate::scene::contains`]) at the box's half-extent (−1 … +½ px) and centre (±½ px), scored by the
//!    squared difference over the box plus a 3-px margin per template pixel; the best score wins. Matching
//!    the whole soft mask, rather than thresholding a fill ratio, keeps small shapes right when blur and
//!    noise fray their edges by a pixel.

use image::RgbImage;

use crate::attributes::{Attributes, Colour, Position, Shape, Size, dist2};
use crate::scene::{contains, half_extent};

/// What the analyser read, with the measurements behind it (for debugging and thresholds).
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    pub attributes: Attributes,
    pub background: Colour,
    /// Foreground pixels (the mask's largest component).
    pub area: usize,
    /// Bounding box `(x0, y0, x1, y1)`, inclusive.
    pub bbox: (u32, u32, u32, u32),
    /// `area / box area`.
    pub fill: f32,
    /// `(centroid y − box centre y) / box height`.
    pub centroid_offset: f32,
}

/// Analyses `image` (square or not). `None` when no foreground can be found (a blank picture).
pub fn analyse(image: &RgbImage) -> Option<Analysis> {
    let (w, h) = image.dimensions();
    if w < 4 || h < 4 {
        return None;
    }
    let px = |x: u32, y: u32| image.get_pixel(x, y).0.map(f32::from);

    // 1. Background from the border.
    let mut border = Vec::with_capacity(2 * (w + h) as usize);
    for x in 0..w {
        border.push(px(x, 0));
        border.push(px(x, h - 1));
    }
    for y in 1..h - 1 {
        border.push(px(0, y));
        border.push(px(w - 1, y));
    }
    let background = mode(border.iter().map(|p| Colour::nearest(*p)))?;
    let bg_mean = mean(
        border
            .iter()
            .filter(|p| Colour::nearest(**p) == background)
            .copied(),
    )?;

    // 2. Foreground colour: the commonest non-background label among the pixels that differ most from
    //    the background (the shape's core).
    let labels: Vec<Colour> = image
        .pixels()
        .map(|p| Colour::nearest(p.0.map(f32::from)))
        .collect();
    let contrast: Vec<f32> = image
        .pixels()
        .map(|p| dist2(p.0.map(f32::from), bg_mean).sqrt())
        .collect();
    let far = percentile(&contrast, CORE_PERCENTILE);
    let core = |i: usize| contrast[i] >= CORE_FRACTION * far && labels[i] != background;
    let colour = mode((0..labels.len()).filter(|&i| core(i)).map(|i| labels[i]))?;
    let fg_mean = mean(
        image
            .pixels()
            .enumerate()
            .filter(|&(i, _)| core(i) && labels[i] == colour)
            .map(|(_, p)| p.0.map(f32::from)),
    )?;

    // 3. Coverage and the mask's largest component.
    let dir = [0, 1, 2].map(|i| fg_mean[i] - bg_mean[i]);
    let norm2: f32 = dir.iter().map(|v| v * v).sum();
    if norm2 == 0.0 {
        return None;
    }
    let coverage: Vec<f32> = image
        .pixels()
        .map(|p| {
            let p = p.0.map(f32::from);
            let t: f32 = (0..3).map(|i| (p[i] - bg_mean[i]) * dir[i]).sum::<f32>() / norm2;
            t.clamp(0.0, 1.0)
        })
        .collect();
    let raw: Vec<bool> = coverage.iter().map(|c| *c >= 0.5).collect();
    let mask = largest_component(&raw, w as usize, h as usize)?;

    // 4. Box, size and position.
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    let (mut sy, mut area) = (0f64, 0usize);
    for (i, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
        let (x, y) = ((i % w as usize) as u32, (i / w as usize) as u32);
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x);
        y1 = y1.max(y);
        sy += y as f64 + 0.5;
        area += 1;
    }
    let (bw, bh) = ((x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32);
    let side = w.min(h);
    let threshold = (half_extent(Size::Small, side) + half_extent(Size::Large, side)) as f32;
    let size = if bw.max(bh) > threshold {
        Size::Large
    } else {
        Size::Small
    };
    let (cx, cy) = (
        (x0 as f32 + x1 as f32 + 1.0) / 2.0,
        (y0 as f32 + y1 as f32 + 1.0) / 2.0,
    );
    let (fx, fy) = (cx / w as f32, cy / h as f32);
    let position = Position::ALL
        .into_iter()
        .min_by(|a, b| {
            let d = |p: Position| {
                let (ax, ay) = p.anchor();
                (ax - fx).powi(2) + (ay - fy).powi(2)
            };
            d(*a).total_cmp(&d(*b))
        })
        .expect("five positions");

    // 5. Shape.
    let fill = area as f32 / (bw * bh);
    let centroid_offset = ((sy / area as f64) as f32 - cy) / bh;
    let window = (
        x0.saturating_sub(3),
        y0.saturating_sub(3),
        (x1 + 3).min(w - 1),
        (y1 + 3).min(h - 1),
    );
    let r = bw.max(bh) / 2.0;
    let shape = Shape::ALL
        .into_iter()
        .map(|s| (s, template_score(&coverage, w, window, s, r, (cx, cy))))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("four shapes")
        .0;
    Some(Analysis {
        attributes: Attributes {
            colour,
            shape,
            size,
            position,
        },
        background,
        area,
        bbox: (x0, y0, x1, y1),
        fill,
        centroid_offset,
    })
}

/// The best (lowest) normalised squared difference between `coverage` over `window` (inclusive) and
/// `shape`'s rasterisation near half-extent `r` and centre `c`.
fn template_score(
    coverage: &[f32],
    width: u32,
    window: (u32, u32, u32, u32),
    shape: Shape,
    r: f32,
    c: (f32, f32),
) -> f32 {
    let (x0, y0, x1, y1) = window;
    let mut best = f32::INFINITY;
    for dr in [-1.0, -0.5, 0.0, 0.5] {
        let rr = r + dr;
        if rr <= 0.0 {
            continue;
        }
        for dx in [-0.5, 0.0, 0.5] {
            for dy in [-0.5, 0.0, 0.5] {
                let (tx, ty) = (c.0 + dx, c.1 + dy);
                let (mut sse, mut inside) = (0f32, 0usize);
                for y in y0..=y1 {
                    for x in x0..=x1 {
                        let t = contains(shape, rr, x as f32 + 0.5 - tx, y as f32 + 0.5 - ty);
                        inside += t as usize;
                        let d = coverage[(y * width + x) as usize] - t as u8 as f32;
                        sse += d * d;
                    }
                }
                if inside > 0 {
                    best = best.min(sse / inside as f32);
                }
            }
        }
    }
    best
}

/// The contrast (distance from the background's mean colour) that stands for "the foreground" is this
/// percentile of all pixels' contrasts: high enough to be inside the shape (the smallest shape covers
/// ≈2.4 % of the picture), low enough to ignore a few stray pixels.
const CORE_PERCENTILE: f32 = 0.99;
/// Pixels at least this fraction of that contrast away from the background are the shape's core. Blur
/// mixes the foreground into the background on a ring around the shape, and a mix is often nearest to a
/// third palette colour (red over blue reads purple until it is ≈ 70 % red); a small blurred shape
/// can have more such ring pixels than core pixels, so the colour is read from the core only.
const CORE_FRACTION: f32 = 0.75;

/// The `q` quantile of `values` (nearest rank).
fn percentile(values: &[f32], q: f32) -> f32 {
    let mut v = values.to_vec();
    v.sort_by(f32::total_cmp);
    let i = ((q * v.len() as f32).ceil() as usize).clamp(1, v.len().max(1)) - 1;
    v.get(i).copied().unwrap_or(0.0)
}

/// The most frequent value (ties go to the palette's earlier colour, so the result is deterministic).
fn mode(it: impl Iterator<Item = Colour>) -> Option<Colour> {
    let mut counts = [0usize; Colour::ALL.len()];
    for c in it {
        counts[c as usize] += 1;
    }
    let (best, n) = counts
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))?;
    (*n > 0).then_some(Colour::ALL[best])
}

fn mean(it: impl Iterator<Item = [f32; 3]>) -> Option<[f32; 3]> {
    let (mut s, mut n) = ([0f64; 3], 0usize);
    for p in it {
        for (acc, v) in s.iter_mut().zip(p) {
            *acc += v as f64;
        }
        n += 1;
    }
    (n > 0).then(|| s.map(|v| (v / n as f64) as f32))
}

/// The largest 4-connected component of `mask` (`None` if the mask is empty).
fn largest_component(mask: &[bool], w: usize, h: usize) -> Option<Vec<bool>> {
    let mut label = vec![0u32; mask.len()];
    let mut best = (0usize, 0u32);
    let mut next = 0u32;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || label[start] != 0 {
            continue;
        }
        next += 1;
        label[start] = next;
        stack.push(start);
        let mut size = 0;
        while let Some(i) = stack.pop() {
            size += 1;
            let (x, y) = (i % w, i / w);
            let mut visit = |j: usize| {
                if mask[j] && label[j] == 0 {
                    label[j] = next;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        if size > best.0 {
            best = (size, next);
        }
    }
    (best.0 > 0).then(|| label.iter().map(|l| *l == best.1).collect())
}

/// Test and benchmark helpers: the perturbations a model's imperfect renders resemble.
pub mod perturb {
    use image::RgbImage;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    /// 3×3 box blur (edge pixels average their in-image neighbours), rounded to 8 bits.
    pub fn box_blur(img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        RgbImage::from_fn(w, h, |x, y| {
            let (mut s, mut n) = ([0u32; 3], 0u32);
            for yy in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                for xx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                    let p = img.get_pixel(xx, yy).0;
                    for (acc, v) in s.iter_mut().zip(p) {
                        *acc += v as u32;
                    }
                    n += 1;
                }
            }
            image::Rgb(s.map(|v| ((v as f32 / n as f32).round()) as u8))
        })
    }

    /// Adds seeded Gaussian noise of standard deviation `sigma` (in 8-bit levels) to every channel.
    pub fn gaussian_noise(img: &RgbImage, sigma: f32, seed: u64) -> RgbImage {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0f32, sigma).expect("finite sigma");
        let mut out = img.clone();
        for p in out.pixels_mut() {
            for c in p.0.iter_mut() {
                *c = (*c as f32 + normal.sample(&mut rng))
                    .round()
                    .clamp(0.0, 255.0) as u8;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scene::Scene;

    #[test]
    fn reads_a_plain_scene_and_reports_measurements() {
        let scene = Scene {
            attributes: Attributes {
                colour: Colour::Purple,
                shape: Shape::Square,
                size: Size::Large,
                position: Position::BottomLeft,
            },
            background: Colour::Yellow,
            jitter: (0, 0),
        };
        let a = analyse(&scene.render(64)).unwrap();
        assert_eq!(a.attributes, scene.attributes);
        assert_eq!(a.background, Colour::Yellow);
        assert_eq!(a.area, 26 * 26);
        assert_eq!(a.bbox, (3, 35, 28, 60));
        assert_eq!(a.fill, 1.0);
        assert_eq!(a.centroid_offset, 0.0);
    }

    #[test]
    fn blank_image_has_no_foreground() {
        let img = RgbImage::from_pixel(64, 64, image::Rgb(Colour::Blue.rgb()));
        assert_eq!(analyse(&img), None);
    }

    #[test]
    fn a_speck_of_noise_does_not_move_the_shape() {
        let scene = Scene {
            attributes: Attributes {
                colour: Colour::Red,
                shape: Shape::Circle,
                size: Size::Small,
                position: Position::TopRight,
            },
            background: Colour::Black,
            jitter: (1, 1),
        };
        let mut img = scene.render(64);
        img.put_pixel(5, 60, image::Rgb(Colour::Red.rgb()));
        img.put_pixel(6, 60, image::Rgb(Colour::Red.rgb()));
        assert_eq!(analyse(&img).unwrap().attributes, scene.attributes);
    }
}
