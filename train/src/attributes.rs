//! The vocabulary of the toy world: colours, shapes, sizes and positions, with their canonical names.
//!
//! Everything else (captions, scenes, the analyser, the metrics) speaks in these types, so a caption, the
//! image drawn for it and the analyser's reading of that image can be compared attribute by attribute.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A palette colour. The RGB values are far apart (every pair differs by more than 95 in Euclidean RGB
/// distance) so that nearest-palette classification survives noise, blur and an imperfect model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Red,
    Orange,
    Yellow,
    Green,
    Blue,
    Purple,
    White,
    Black,
}

impl Colour {
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Orange,
        Colour::Yellow,
        Colour::Green,
        Colour::Blue,
        Colour::Purple,
        Colour::White,
        Colour::Black,
    ];

    /// The exact 8-bit RGB value the renderer paints.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Orange => [250, 140, 0],
            Colour::Yellow => [240, 230, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 70, 220],
            Colour::Purple => [150, 50, 200],
            Colour::White => [240, 240, 240],
            Colour::Black => [25, 25, 25],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Orange => "orange",
            Colour::Yellow => "yellow",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Purple => "purple",
            Colour::White => "white",
            Colour::Black => "black",
        }
    }

    /// The palette colour nearest to `rgb` (squared Euclidean distance; ties go to the earlier colour).
    pub fn nearest(rgb: [f32; 3]) -> Colour {
        let mut best = (f32::INFINITY, Colour::Red);
        for c in Colour::ALL {
            let d = dist2(rgb, c.rgb().map(f32::from));
            if d < best.0 {
                best = (d, c);
            }
        }
        best.1
    }
}

/// Squared Euclidean distance between two float RGBs.
pub(crate) fn dist2(a: [f32; 3], b: [f32; 3]) -> f32 {
    (0..3).map(|i| (a[i] - b[i]).powi(2)).sum()
}

/// A foreground shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    /// Upright isosceles triangle, apex at the top, as wide as it is tall.
    Triangle,
    /// A plus sign whose arms are a third of its width.
    Cross,
}

impl Shape {
    pub const ALL: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Cross];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Cross => "cross",
        }
    }
}

/// A foreground size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
}

/// Where the shape sits: the centre or the middle of one quadrant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Position {
    Centre,
    TopLeft,
    TopRight,
    BottomLeft,
    BottomRight,
}

impl Position {
    pub const ALL: [Position; 5] = [
        Position::Centre,
        Position::TopLeft,
        Position::TopRight,
        Position::BottomLeft,
        Position::BottomRight,
    ];

    /// Canonical short name, also used in the dataset's JSONL.
    pub fn name(self) -> &'static str {
        match self {
            Position::Centre => "centre",
            Position::TopLeft => "top-left",
            Position::TopRight => "top-right",
            Position::BottomLeft => "bottom-left",
            Position::BottomRight => "bottom-right",
        }
    }

    /// The anchor point as a fraction of the image (x, y): 1/2 for the centre, 1/4 or 3/4 per axis for a
    /// quadrant.
    pub fn anchor(self) -> (f32, f32) {
        match self {
            Position::Centre => (0.5, 0.5),
            Position::TopLeft => (0.25, 0.25),
            Position::TopRight => (0.75, 0.25),
            Position::BottomLeft => (0.25, 0.75),
            Position::BottomRight => (0.75, 0.75),
        }
    }
}

macro_rules! named {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $t {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                <$t>::ALL
                    .into_iter()
                    .find(|v| v.name() == s)
                    .ok_or_else(|| {
                        let names: Vec<&str> = <$t>::ALL.iter().map(|v| v.name()).collect();
                        format!("unknown value `{s}` (expected one of {})", names.join(", "))
                    })
            }
        }
    )*};
}

named!(Colour, Shape, Size, Position);

/// What a caption asks for and what the analyser reads from an image: the foreground's colour, shape, size
/// and position. (The background colour is part of a [`crate::scene::Scene`], not scored.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Attributes {
    pub colour: Colour,
    pub shape: Shape,
    pub size: Size,
    pub position: Position,
}

impl fmt::Display for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.size, self.colour, self.shape, self.position
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_is_well_separated() {
        let mut min = f32::INFINITY;
        for (i, a) in Colour::ALL.iter().enumerate() {
            for b in &Colour::ALL[i + 1..] {
                let ra = a.rgb().map(f32::from);
                min = min.min(dist2(ra, b.rgb().map(f32::from)).sqrt());
            }
            assert_eq!(Colour::nearest(a.rgb().map(f32::from)), *a);
        }
        assert!(min > 95.0, "closest palette pair is {min} apart");
    }

    #[test]
    fn names_round_trip() {
        for c in Colour::ALL {
            assert_eq!(c.name().parse::<Colour>(), Ok(c));
        }
        for p in Position::ALL {
            assert_eq!(p.to_string().parse::<Position>(), Ok(p));
        }
        assert!("mauve".parse::<Colour>().unwrap_err().contains("mauve"));
    }
}
