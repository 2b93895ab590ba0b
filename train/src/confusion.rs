//! Where colour goes wrong: a confusion table of asked-for against read foreground colours.
//!
//! Colour is the attribute the trained models miss most, and the remedies differ by cause: a model that
//! paints the shape in the *background's* colour has not bound the colour words to their nouns (a text
//! problem), one that drifts to a neighbouring hue has a decoder or palette problem, and one that draws no
//! shape at all has a layout problem. `pixart-train eval --confusion` prints this table so the next change
//! is chosen from evidence.

use std::fmt;

use crate::analyse::Analysis;
use crate::attributes::Colour;

/// Counts of (asked-for foreground colour, read foreground colour), plus how often the read colour is the
/// prompt's background colour and how often the background itself comes back right.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColourConfusion {
    /// `counts[asked][read]`; the last column counts images with no foreground found.
    pub counts: [[usize; 9]; 8],
    /// Images whose foreground was read as the prompt's background colour.
    pub foreground_is_background: usize,
    /// Images whose background was read as the prompt's background colour.
    pub background_right: usize,
    pub total: usize,
}

fn index(c: Colour) -> usize {
    Colour::ALL
        .iter()
        .position(|&x| x == c)
        .expect("ALL lists every colour")
}

impl ColourConfusion {
    /// Adds one image: what the prompt asked for and what the analyser read (`None`: no foreground).
    pub fn add(&mut self, asked: Colour, background: Colour, read: Option<&Analysis>) {
        self.total += 1;
        let Some(a) = read else {
            self.counts[index(asked)][8] += 1;
            return;
        };
        self.counts[index(asked)][index(a.attributes.colour)] += 1;
        self.foreground_is_background += (a.attributes.colour == background) as usize;
        self.background_right += (a.background == background) as usize;
    }
}

impl fmt::Display for ColourConfusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>8} |", "asked")?;
        for c in Colour::ALL {
            write!(f, " {:>6}", c.name())?;
        }
        writeln!(f, " {:>6}", "none")?;
        for (i, row) in self.counts.iter().enumerate() {
            write!(f, "{:>8} |", Colour::ALL[i].name())?;
            for n in row {
                write!(f, " {n:>6}")?;
            }
            writeln!(f)?;
        }
        write!(
            f,
            "foreground read as the prompt's background colour: {} of {}; background right: {} of {}",
            self.foreground_is_background, self.total, self.background_right, self.total
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analyse::analyse;
    use crate::attributes::{Attributes, Position, Shape, Size};
    use crate::scene::Scene;

    #[test]
    fn a_shape_painted_in_the_background_colour_is_counted_as_such() {
        let attributes = Attributes {
            colour: Colour::Red,
            shape: Shape::Square,
            size: Size::Large,
            position: Position::Centre,
        };
        let scene = |colour, background| Scene {
            attributes: Attributes {
                colour,
                ..attributes
            },
            background,
            jitter: (0, 0),
        };
        let right = analyse(&scene(Colour::Red, Colour::Blue).render(64));
        let swapped = analyse(&scene(Colour::Blue, Colour::Red).render(64));
        let mut c = ColourConfusion::default();
        c.add(Colour::Red, Colour::Blue, right.as_ref());
        c.add(Colour::Red, Colour::Blue, swapped.as_ref());
        c.add(Colour::Red, Colour::Blue, None);
        assert_eq!(c.counts[0][0], 1);
        assert_eq!(c.counts[0][index(Colour::Blue)], 1);
        assert_eq!(c.counts[0][8], 1);
        assert_eq!(
            (c.foreground_is_background, c.background_right, c.total),
            (1, 1, 3)
        );
        assert!(c.to_string().contains("1 of 3"), "{c}");
    }
}
