//! Scores: prompt accuracy (per attribute and all-correct) and edge F1 with a pixel tolerance.

use std::fmt;

use crate::attributes::Attributes;
use crate::edges::EdgeMap;

/// Prompt accuracy over (asked-for attributes, analysed image) pairs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptAccuracy {
    pub total: usize,
    pub colour: usize,
    pub shape: usize,
    pub size: usize,
    pub position: usize,
    pub all: usize,
}

impl PromptAccuracy {
    /// Scores one image: `read` is the analyser's reading, `None` when it found no foreground (wrong on
    /// every attribute).
    pub fn add(&mut self, expected: &Attributes, read: Option<&Attributes>) {
        self.total += 1;
        let Some(r) = read else { return };
        let hits = [
            expected.colour == r.colour,
            expected.shape == r.shape,
            expected.size == r.size,
            expected.position == r.position,
        ];
        self.colour += hits[0] as usize;
        self.shape += hits[1] as usize;
        self.size += hits[2] as usize;
        self.position += hits[3] as usize;
        self.all += hits.iter().all(|h| *h) as usize;
    }

    fn frac(&self, n: usize) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            n as f64 / self.total as f64
        }
    }

    pub fn colour_rate(&self) -> f64 {
        self.frac(self.colour)
    }

    pub fn shape_rate(&self) -> f64 {
        self.frac(self.shape)
    }

    pub fn size_rate(&self) -> f64 {
        self.frac(self.size)
    }

    pub fn position_rate(&self) -> f64 {
        self.frac(self.position)
    }

    pub fn all_rate(&self) -> f64 {
        self.frac(self.all)
    }
}

impl fmt::Display for PromptAccuracy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |n: usize| 100.0 * self.frac(n);
        write!(
            f,
            "n={} colour {:.1}% shape {:.1}% size {:.1}% position {:.1}% all-correct {:.1}%",
            self.total,
            pct(self.colour),
            pct(self.shape),
            pct(self.size),
            pct(self.position),
            pct(self.all)
        )
    }
}

/// Precision, recall and F1 of a predicted edge map against a reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EdgeScore {
    /// Predicted edge pixels within the tolerance of a reference edge pixel / predicted edge pixels.
    pub precision: f64,
    /// Reference edge pixels within the tolerance of a predicted edge pixel / reference edge pixels.
    pub recall: f64,
    pub f1: f64,
}

/// Edge F1 with a tolerance of `tolerance` pixels (Euclidean): a predicted edge pixel counts as correct
/// when a reference edge pixel lies within that distance, and a reference pixel as found when a predicted
/// one does. Two empty maps score 1; exactly one empty map scores 0.
///
/// Panics if the maps differ in size.
pub fn edge_f1(predicted: &EdgeMap, reference: &EdgeMap, tolerance: u32) -> EdgeScore {
    assert_eq!(
        (predicted.width, predicted.height),
        (reference.width, reference.height),
        "edge maps of different sizes"
    );
    let (np, nr) = (predicted.count(), reference.count());
    if np == 0 && nr == 0 {
        return EdgeScore {
            precision: 1.0,
            recall: 1.0,
            f1: 1.0,
        };
    }
    let near_p = dilate(reference, tolerance);
    let near_r = dilate(predicted, tolerance);
    let hits = |a: &EdgeMap, near: &EdgeMap| {
        a.data
            .iter()
            .zip(&near.data)
            .filter(|(a, n)| **a && **n)
            .count()
    };
    let precision = if np == 0 {
        0.0
    } else {
        hits(predicted, &near_p) as f64 / np as f64
    };
    let recall = if nr == 0 {
        0.0
    } else {
        hits(reference, &near_r) as f64 / nr as f64
    };
    let f1 = if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    EdgeScore {
        precision,
        recall,
        f1,
    }
}

/// Pixels within Euclidean distance `r` of a set pixel.
fn dilate(m: &EdgeMap, r: u32) -> EdgeMap {
    let (w, h) = (m.width as i64, m.height as i64);
    let r = r as i64;
    let mut out = EdgeMap::new(m.width, m.height);
    for y in 0..h {
        for x in 0..w {
            if !m.data[(y * w + x) as usize] {
                continue;
            }
            for dy in -r..=r {
                for dx in -r..=r {
                    let (nx, ny) = (x + dx, y + dy);
                    if dx * dx + dy * dy <= r * r && nx >= 0 && ny >= 0 && nx < w && ny < h {
                        out.data[(ny * w + nx) as usize] = true;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attributes::{Colour, Position, Shape, Size};

    fn map(w: u32, h: u32, pixels: &[(u32, u32)]) -> EdgeMap {
        let mut m = EdgeMap::new(w, h);
        for &(x, y) in pixels {
            m.set(x, y, true);
        }
        m
    }

    fn vline(x: u32, y0: u32, y1: u32) -> Vec<(u32, u32)> {
        (y0..y1).map(|y| (x, y)).collect()
    }

    #[test]
    fn identical_maps_score_one() {
        let a = map(20, 20, &vline(5, 2, 18));
        assert_eq!(edge_f1(&a, &a, 2).f1, 1.0);
        assert_eq!(edge_f1(&a, &a, 0).f1, 1.0);
    }

    #[test]
    fn shifts_within_the_tolerance_count_and_beyond_do_not() {
        let r = map(20, 20, &vline(5, 2, 18));
        assert_eq!(
            edge_f1(&map(20, 20, &vline(7, 2, 18)), &r, 2).f1,
            1.0,
            "2 px"
        );
        assert_eq!(
            edge_f1(&map(20, 20, &vline(8, 2, 18)), &r, 2).f1,
            0.0,
            "3 px"
        );
        // A diagonal offset of (2, 1) is √5 ≈ 2.24 px: outside a 2-px tolerance.
        let diag = map(20, 20, &[(7, 3)]);
        assert_eq!(edge_f1(&diag, &map(20, 20, &[(5, 2)]), 2).f1, 0.0);
        assert_eq!(edge_f1(&diag, &map(20, 20, &[(5, 2)]), 3).f1, 1.0);
    }

    #[test]
    fn partial_matches() {
        let r = map(20, 20, &vline(5, 0, 20)); // 20 px
        // Half the line drawn, nothing spurious: P = 1, R = 12/20 (10 px found, 2 more within reach of its end).
        let half = map(20, 20, &vline(5, 0, 10));
        let s = edge_f1(&half, &r, 2);
        assert_eq!(s.precision, 1.0);
        assert!((s.recall - 12.0 / 20.0).abs() < 1e-12, "{s:?}");
        // The whole line plus an equally long spurious one far away: P = 0.5, R = 1, F1 = 2/3.
        let mut both = vline(5, 0, 20);
        both.extend(vline(15, 0, 20));
        let s = edge_f1(&map(20, 20, &both), &r, 2);
        assert_eq!((s.precision, s.recall), (0.5, 1.0));
        assert!((s.f1 - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn empty_maps() {
        let e = EdgeMap::new(8, 8);
        let a = map(8, 8, &[(1, 1)]);
        assert_eq!(edge_f1(&e, &e, 2).f1, 1.0);
        assert_eq!(edge_f1(&e, &a, 2).f1, 0.0);
        assert_eq!(edge_f1(&a, &e, 2).f1, 0.0);
    }

    #[test]
    fn prompt_accuracy_counts_each_attribute() {
        let want = Attributes {
            colour: Colour::Red,
            shape: Shape::Circle,
            size: Size::Small,
            position: Position::Centre,
        };
        let mut acc = PromptAccuracy::default();
        acc.add(&want, Some(&want));
        acc.add(
            &want,
            Some(&Attributes {
                shape: Shape::Square,
                ..want
            }),
        );
        acc.add(&want, None);
        acc.add(
            &want,
            Some(&Attributes {
                colour: Colour::Blue,
                position: Position::TopLeft,
                ..want
            }),
        );
        assert_eq!(
            acc,
            PromptAccuracy {
                total: 4,
                colour: 2,
                shape: 2,
                size: 3,
                position: 2,
                all: 1
            }
        );
        assert_eq!(acc.all_rate(), 0.25);
        assert!(acc.to_string().contains("all-correct 25.0%"));
    }
}
