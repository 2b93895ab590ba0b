//! Captions from a small grammar with paraphrases, and the parser that reads the attributes back.
//!
//! Every template names the foreground size, colour, shape and position and the background colour; the
//! templates differ in word order, punctuation and synonyms ("top left corner" / "top-left" / "upper
//! left"; "small" / "little"; "background" / "backdrop"), so a model has to learn the words, not one
//! sentence. [`parse`] inverts every template (tested on all of them), which lets the metrics score free-form
//! prompts such as `examples/prompts.jsonl` as well as the dataset's own captions.

use crate::attributes::{Attributes, Colour, Position, Shape, Size};

/// Number of caption templates; [`caption`] takes the template index modulo this.
pub const TEMPLATES: usize = 6;

fn size_word(size: Size, variant: usize) -> &'static str {
    match (size, variant % 2) {
        (Size::Small, 0) => "small",
        (Size::Small, _) => "little",
        (Size::Large, 0) => "large",
        (Size::Large, _) => "big",
    }
}

/// "an" before a vowel ("an orange circle"), "a" otherwise: the article of every template that puts one
/// before a colour word. Captions are what users copy into prompts, so they should read as English.
fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// "top left corner", "centre", …
fn position_long(p: Position) -> &'static str {
    match p {
        Position::Centre => "centre",
        Position::TopLeft => "top left corner",
        Position::TopRight => "top right corner",
        Position::BottomLeft => "bottom left corner",
        Position::BottomRight => "bottom right corner",
    }
}

/// "upper left", "middle", …
fn position_plain(p: Position) -> &'static str {
    match p {
        Position::Centre => "middle",
        Position::TopLeft => "upper left",
        Position::TopRight => "upper right",
        Position::BottomLeft => "lower left",
        Position::BottomRight => "lower right",
    }
}

/// The caption of a scene with template `template` (any value; taken modulo [`TEMPLATES`]).
///
/// ```
/// use pixart_train::attributes::{Attributes, Colour, Position, Shape, Size};
/// let a = Attributes { colour: Colour::Red, shape: Shape::Circle, size: Size::Small, position: Position::TopLeft };
/// assert_eq!(
///     pixart_train::caption::caption(&a, Colour::Blue, 0),
///     "a small red circle in the top left corner on a blue background"
/// );
/// assert_eq!(pixart_train::caption::caption(&a, Colour::Blue, 1), "red circle, small, top-left, blue backdrop");
/// ```
pub fn caption(a: &Attributes, background: Colour, template: usize) -> String {
    let (c, s, bg) = (a.colour.name(), a.shape.name(), background.name());
    let t = template % TEMPLATES;
    // The size synonym alternates with the template so that both words occur with every word order.
    let size = size_word(a.size, t / 3);
    let (a_c, a_bg) = (article(c), article(bg));
    match t {
        0 => format!(
            "a {size} {c} {s} in the {} on {a_bg} {bg} background",
            position_long(a.position)
        ),
        1 => format!("{c} {s}, {size}, {}, {bg} backdrop", a.position.name()),
        2 => format!(
            "{a_bg} {bg} background with a {size} {c} {s} in the {}",
            position_plain(a.position)
        ),
        3 => format!(
            "{size} {c} {s} in the {}, {bg} background",
            position_plain(a.position)
        ),
        4 => format!(
            "{a_c} {c} {s}, {size}, in the {} of {a_bg} {bg} backdrop",
            position_long(a.position)
        ),
        _ => format!(
            "{bg} backdrop, {size} {c} {s}, {}",
            a.position.name().replace('-', " ")
        ),
    }
}

/// Number of [`layout_free`] templates.
pub const LAYOUT_FREE_TEMPLATES: usize = 3;

/// A caption that names what to draw (foreground colour and shape, background colour) but not where or how
/// big: the prompt a ControlNet user writes when the edge map gives the layout. The adapter trains on some
/// of these (so that it, not the caption, carries size and position) and the edge evaluation scores them
/// (with the layout left open, the F1 without control measures chance, not the prompt). Only words of
/// [`caption`]'s vocabulary occur, so the word-level tokenizer knows them all; [`parse`] reads none of
/// them (no size, no position).
///
/// ```
/// use pixart_train::attributes::{Colour, Shape};
/// assert_eq!(
///     pixart_train::caption::layout_free(Colour::Red, Shape::Circle, Colour::Blue, 0),
///     "a red circle on a blue background"
/// );
/// ```
pub fn layout_free(colour: Colour, shape: Shape, background: Colour, template: usize) -> String {
    let (c, s, bg) = (colour.name(), shape.name(), background.name());
    let (a_c, a_bg) = (article(c), article(bg));
    match template % LAYOUT_FREE_TEMPLATES {
        0 => format!("{a_c} {c} {s} on {a_bg} {bg} background"),
        1 => format!("{c} {s}, {bg} backdrop"),
        _ => format!("{a_bg} {bg} background with {a_c} {c} {s}"),
    }
}

/// Reads the foreground attributes and the background colour back from a caption, or `None` when the
/// caption does not name exactly one foreground colour, one background colour, one shape, one size and one
/// position. Case-insensitive; accepts every template of [`caption`].
pub fn parse(text: &str) -> Option<(Attributes, Colour)> {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let is_backdrop = |w: &str| w == "background" || w == "backdrop";
    let mut colours = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if let Ok(c) = w.parse::<Colour>() {
            let bg = words.get(i + 1).is_some_and(|n| is_backdrop(n));
            colours.push((c, bg));
        }
    }
    let background = single(colours.iter().filter(|(_, bg)| *bg).map(|(c, _)| *c))?;
    let colour = single(colours.iter().filter(|(_, bg)| !*bg).map(|(c, _)| *c))?;
    let shape = single(words.iter().filter_map(|w| w.parse::<Shape>().ok()))?;
    let size = single(words.iter().filter_map(|w| match *w {
        "small" | "little" => Some(Size::Small),
        "large" | "big" => Some(Size::Large),
        _ => None,
    }))?;
    let vertical = single(words.iter().filter_map(|w| match *w {
        "top" | "upper" => Some(0),
        "bottom" | "lower" => Some(1),
        _ => None,
    }));
    let horizontal = single(words.iter().filter_map(|w| match *w {
        "left" => Some(0),
        "right" => Some(1),
        _ => None,
    }));
    let centre = words
        .iter()
        .any(|w| matches!(*w, "centre" | "center" | "middle"));
    let position = match (vertical, horizontal, centre) {
        (None, None, true) => Position::Centre,
        (Some(0), Some(0), false) => Position::TopLeft,
        (Some(0), Some(1), false) => Position::TopRight,
        (Some(1), Some(0), false) => Position::BottomLeft,
        (Some(1), Some(1), false) => Position::BottomRight,
        _ => return None,
    };
    Some((
        Attributes {
            colour,
            shape,
            size,
            position,
        },
        background,
    ))
}

/// The only distinct value of `it`, or `None` for none or several different values.
fn single<T: PartialEq>(mut it: impl Iterator<Item = T>) -> Option<T> {
    let first = it.next()?;
    for v in it {
        if v != first {
            return None;
        }
    }
    Some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_parses_back_for_every_scene() {
        let mut seen = std::collections::HashSet::new();
        for colour in Colour::ALL {
            for background in Colour::ALL.into_iter().filter(|b| *b != colour) {
                for shape in Shape::ALL {
                    for size in Size::ALL {
                        for position in Position::ALL {
                            let a = Attributes {
                                colour,
                                shape,
                                size,
                                position,
                            };
                            for t in 0..TEMPLATES {
                                let text = caption(&a, background, t);
                                assert_eq!(parse(&text), Some((a, background)), "{text}");
                                seen.insert(text);
                            }
                        }
                    }
                }
            }
        }
        // All captions are distinct: no two scenes or templates collide.
        assert_eq!(seen.len(), 8 * 7 * 4 * 2 * 5 * TEMPLATES);
    }

    #[test]
    fn paraphrases_read_as_documented() {
        let a = Attributes {
            colour: Colour::Green,
            shape: Shape::Cross,
            size: Size::Large,
            position: Position::BottomRight,
        };
        let all: Vec<String> = (0..TEMPLATES)
            .map(|t| caption(&a, Colour::White, t))
            .collect();
        assert_eq!(
            all,
            [
                "a large green cross in the bottom right corner on a white background",
                "green cross, large, bottom-right, white backdrop",
                "a white background with a large green cross in the lower right",
                "big green cross in the lower right, white background",
                "a green cross, big, in the bottom right corner of a white backdrop",
                "white backdrop, big green cross, bottom right",
            ]
        );
    }

    #[test]
    fn layout_free_captions_name_colours_and_shape_only() {
        let a = Attributes {
            colour: Colour::Green,
            shape: Shape::Cross,
            size: Size::Large,
            position: Position::Centre,
        };
        let words = |text: &str| -> Vec<String> {
            text.split(|ch: char| !ch.is_ascii_alphanumeric())
                .filter(|w| !w.is_empty())
                .map(str::to_string)
                .collect()
        };
        let vocabulary: std::collections::HashSet<String> = (0..TEMPLATES)
            .flat_map(|t| words(&caption(&a, Colour::White, t)))
            .collect();
        for t in 0..LAYOUT_FREE_TEMPLATES {
            let text = layout_free(a.colour, a.shape, Colour::White, t);
            assert_eq!(parse(&text), None, "{text}: no size, no position");
            let w = words(&text);
            for needed in ["green", "cross", "white"] {
                assert!(w.iter().any(|x| x == needed), "{text}: no `{needed}`");
            }
            for word in &w {
                assert!(
                    vocabulary.contains(word),
                    "{text}: `{word}` is not in the grammar"
                );
            }
        }
    }

    #[test]
    fn an_precedes_a_vowel_colour_and_a_otherwise() {
        let a = Attributes {
            colour: Colour::Orange,
            shape: Shape::Circle,
            size: Size::Small,
            position: Position::Centre,
        };
        assert_eq!(
            caption(&a, Colour::Orange, 2),
            "an orange background with a small orange circle in the middle"
        );
        assert_eq!(
            caption(&a, Colour::Red, 4),
            "an orange circle, little, in the centre of a red backdrop"
        );
        assert_eq!(
            layout_free(Colour::Orange, Shape::Circle, Colour::Red, 0),
            "an orange circle on a red background"
        );
        assert_eq!(
            layout_free(Colour::Red, Shape::Circle, Colour::Orange, 2),
            "an orange background with a red circle"
        );
        // No caption of any colour, background, shape or template says "a" before a vowel (no size word
        // starts with one).
        for colour in Colour::ALL {
            for background in Colour::ALL {
                for shape in Shape::ALL {
                    let full = (0..TEMPLATES).map(|t| {
                        let a = Attributes {
                            colour,
                            shape,
                            size: Size::Large,
                            position: Position::TopLeft,
                        };
                        caption(&a, background, t)
                    });
                    let free = (0..LAYOUT_FREE_TEMPLATES)
                        .map(|t| layout_free(colour, shape, background, t));
                    for text in full.chain(free) {
                        let words: Vec<&str> = text.split_whitespace().collect();
                        for pair in words.windows(2) {
                            let vowel = pair[1].starts_with(['a', 'e', 'i', 'o', 'u']);
                            match pair[0] {
                                "a" => assert!(!vowel, "{text}"),
                                "an" => assert!(vowel, "{text}"),
                                _ => {}
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn free_form_prompts() {
        let (a, bg) = parse("A Big YELLOW square in the center, on a black background.").unwrap();
        assert_eq!(
            (a.colour, a.shape, a.size, a.position, bg),
            (
                Colour::Yellow,
                Shape::Square,
                Size::Large,
                Position::Centre,
                Colour::Black
            )
        );
        assert_eq!(parse("a red circle on a blue background"), None, "no size");
        assert_eq!(
            parse("a small red blue circle, top left, white background"),
            None
        );
        assert_eq!(parse("a small red circle, top, white background"), None);
        assert_eq!(
            parse("a small red circle or square, top left, white background"),
            None
        );
    }
}
