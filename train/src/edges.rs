//! Binary edge maps: a scene's exact outline (the ControlNet training signal) and the maps the edge metrics
//! compare.

use image::GrayImage;

/// A `width × height` binary map, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeMap {
    pub width: u32,
    pub height: u32,
    pub data: Vec<bool>,
}

impl EdgeMap {
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            data: vec![false; (width * height) as usize],
        }
    }

    pub fn get(&self, x: u32, y: u32) -> bool {
        self.data[(y * self.width + x) as usize]
    }

    pub fn set(&mut self, x: u32, y: u32, v: bool) {
        self.data[(y * self.width + x) as usize] = v;
    }

    /// Number of edge pixels.
    pub fn count(&self) -> usize {
        self.data.iter().filter(|v| **v).count()
    }

    /// The inner boundary of a region: pixels inside `mask` with a 4-neighbour outside it (pixels beyond
    /// the image count as outside, so a region touching the border is closed there too).
    pub fn outline(mask: &EdgeMap) -> EdgeMap {
        let (w, h) = (mask.width, mask.height);
        let mut out = EdgeMap::new(w, h);
        for y in 0..h {
            for x in 0..w {
                if !mask.get(x, y) {
                    continue;
                }
                let outside = |dx: i64, dy: i64| {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    nx < 0
                        || ny < 0
                        || nx >= w as i64
                        || ny >= h as i64
                        || !mask.get(nx as u32, ny as u32)
                };
                if outside(-1, 0) || outside(1, 0) || outside(0, -1) || outside(0, 1) {
                    out.set(x, y, true);
                }
            }
        }
        out
    }

    /// Edge pixels white (255) on black.
    pub fn to_gray(&self) -> GrayImage {
        let data = self.data.iter().map(|v| if *v { 255 } else { 0 }).collect();
        GrayImage::from_raw(self.width, self.height, data).expect("buffer size matches")
    }

    /// Pixels of `gray` at or above `threshold` are edges (use 128 for the 0/255 maps [`Self::to_gray`]
    /// writes and Canny returns).
    pub fn from_gray(gray: &GrayImage, threshold: u8) -> EdgeMap {
        EdgeMap {
            width: gray.width(),
            height: gray.height(),
            data: gray.as_raw().iter().map(|v| *v >= threshold).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outline_of_a_square_is_its_ring() {
        let mut m = EdgeMap::new(6, 6);
        for y in 1..5 {
            for x in 1..5 {
                m.set(x, y, true);
            }
        }
        let o = EdgeMap::outline(&m);
        assert_eq!(o.count(), 12);
        assert!(o.get(1, 1) && o.get(4, 2) && !o.get(2, 2) && !o.get(0, 0));
        let back = EdgeMap::from_gray(&o.to_gray(), 128);
        assert_eq!(back, o);
    }
}
