//! One picture of the toy world and its exact rasterisation.
//!
//! Geometry, for an image of side `S` (default 64): the shape's anchor is the image centre or a quadrant's
//! centre ([`Position::anchor`]), moved by an integer jitter of at most `S/32` px per axis; its half-extent
//! is `r = round(7·S/64)` (small) or `round(13·S/64)` (large), so at 64 px a small shape spans 14 px and a
//! large one 26 px and even a jittered large shape stays inside its quadrant. Centres and half-extents are
//! whole pixels and a pixel is painted when its centre `(x + ½, y + ½)` lies inside the shape (closed
//! boundary): no antialiasing, so every pixel is exactly the foreground or the background colour and the
//! outline is exact.

use image::{Rgb, RgbImage};

use crate::attributes::{Attributes, Colour, Position, Shape, Size};
use crate::edges::EdgeMap;

/// A scene: the foreground's attributes, the background colour and the jitter of the anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scene {
    pub attributes: Attributes,
    pub background: Colour,
    /// Offset of the shape's centre from its anchor, in pixels.
    pub jitter: (i32, i32),
}

/// Half-extent in pixels of a shape of `size` in an image of side `side`.
pub fn half_extent(size: Size, side: u32) -> i32 {
    let k = match size {
        Size::Small => 7.0,
        Size::Large => 13.0,
    };
    (k * side as f64 / 64.0).round() as i32
}

/// Largest jitter per axis (pixels) for an image of side `side`.
pub fn max_jitter(side: u32) -> i32 {
    (side / 32) as i32
}

/// The shape's centre (whole pixels) for an anchor in an image of side `side`.
pub fn centre(position: Position, side: u32, jitter: (i32, i32)) -> (i32, i32) {
    let (fx, fy) = position.anchor();
    let s = side as f32;
    (
        (fx * s).round() as i32 + jitter.0,
        (fy * s).round() as i32 + jitter.1,
    )
}

/// Whether the point `(px, py)` (pixel units, relative to the shape's centre) lies in `shape` of
/// half-extent `r`.
pub fn contains(shape: Shape, r: f32, px: f32, py: f32) -> bool {
    match shape {
        Shape::Circle => px * px + py * py <= r * r,
        Shape::Square => px.abs() <= r && py.abs() <= r,
        // Apex (0, −r), base from (−r, r) to (r, r): the half-width grows from 0 to r over the height 2r.
        Shape::Triangle => py <= r && py >= -r && px.abs() <= (py + r) / 2.0,
        Shape::Cross => {
            let arm = r / 3.0;
            (px.abs() <= r && py.abs() <= arm) || (px.abs() <= arm && py.abs() <= r)
        }
    }
}

impl Scene {
    /// The foreground mask of a `side × side` rendering.
    pub fn mask(&self, side: u32) -> EdgeMap {
        let a = &self.attributes;
        let r = half_extent(a.size, side) as f32;
        let (cx, cy) = centre(a.position, side, self.jitter);
        let mut m = EdgeMap::new(side, side);
        for y in 0..side {
            for x in 0..side {
                let px = x as f32 + 0.5 - cx as f32;
                let py = y as f32 + 0.5 - cy as f32;
                if contains(a.shape, r, px, py) {
                    m.set(x, y, true);
                }
            }
        }
        m
    }

    /// The picture: foreground colour on the mask, background colour elsewhere.
    pub fn render(&self, side: u32) -> RgbImage {
        let mask = self.mask(side);
        let fg = Rgb(self.attributes.colour.rgb());
        let bg = Rgb(self.background.rgb());
        RgbImage::from_fn(side, side, |x, y| if mask.get(x, y) { fg } else { bg })
    }

    /// The exact outline of the shape (inner boundary of the mask).
    pub fn edges(&self, side: u32) -> EdgeMap {
        EdgeMap::outline(&self.mask(side))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scene(shape: Shape, size: Size, position: Position, jitter: (i32, i32)) -> Scene {
        Scene {
            attributes: Attributes {
                colour: Colour::Red,
                shape,
                size,
                position,
            },
            background: Colour::Blue,
            jitter,
        }
    }

    #[test]
    fn exact_pixel_counts_at_64() {
        let side = 64;
        let count = |s: Shape, z: Size| scene(s, z, Position::Centre, (0, 0)).mask(side).count();
        // Squares cover (2r)² pixels exactly; the others are checked against their closed-form areas.
        assert_eq!(count(Shape::Square, Size::Small), 14 * 14);
        assert_eq!(count(Shape::Square, Size::Large), 26 * 26);
        let circle = count(Shape::Circle, Size::Large) as f32;
        assert!(
            (circle / (std::f32::consts::PI * 169.0) - 1.0).abs() < 0.03,
            "{circle}"
        );
        let tri = count(Shape::Triangle, Size::Large) as f32;
        assert!((tri / (26.0 * 26.0 / 2.0) - 1.0).abs() < 0.06, "{tri}");
        let cross = count(Shape::Cross, Size::Large) as f32;
        assert!(
            (cross / (26.0 * 26.0 * 5.0 / 9.0) - 1.0).abs() < 0.08,
            "{cross}"
        );
    }

    #[test]
    fn render_is_two_colours_and_shapes_stay_in_their_quadrant() {
        let side = 64;
        let j = max_jitter(side);
        for shape in Shape::ALL {
            for position in Position::ALL {
                for jitter in [(-j, -j), (j, j), (-j, j)] {
                    let s = scene(shape, Size::Large, position, jitter);
                    let img = s.render(side);
                    assert!(
                        img.pixels()
                            .all(|p| p.0 == Colour::Red.rgb() || p.0 == Colour::Blue.rgb())
                    );
                    let m = s.mask(side);
                    if position == Position::Centre {
                        continue;
                    }
                    let (fx, fy) = position.anchor();
                    for y in 0..side {
                        for x in 0..side {
                            if m.get(x, y) {
                                assert_eq!((x >= side / 2) as u8, (fx > 0.5) as u8, "{s:?}");
                                assert_eq!((y >= side / 2) as u8, (fy > 0.5) as u8, "{s:?}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn edges_are_the_mask_boundary() {
        let s = scene(Shape::Circle, Size::Small, Position::TopRight, (1, -2));
        let (m, e) = (s.mask(64), s.edges(64));
        assert!(e.count() > 20 && e.count() < m.count());
        assert!(e.data.iter().zip(&m.data).all(|(e, m)| !e || *m));
    }
}
