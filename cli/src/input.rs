//! Reading job input files: JSONL (one item per line) or plain text (one prompt
//! per line).
//!
//! Why a module of its own: input files are written by hand or by scripts and
//! are often large, so every error must name the file and the line (and the
//! column for JSON), exactly like a compiler would, instead of failing
//! somewhere in the middle of a submit.

use std::path::{Path, PathBuf};

use pixfarm_proto::v1::{Control, Item, control};
use serde::Deserialize;

/// One JSONL line as users write it. Unknown fields are rejected so that a
/// typo (`"promt"`) is an error naming the line rather than a silently empty
/// prompt.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineItem {
    prompt: String,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    height: Option<u32>,
    /// `"512x768"`, an alternative to width and height.
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    steps: Option<u32>,
    #[serde(default, alias = "n")]
    images_per_prompt: Option<u32>,
    #[serde(default)]
    control: Option<LineControl>,
    /// Flat form of `control`: a local path (relative to `--control-dir`, else to the input file's
    /// folder) or an `s3://` / `file://` URI.
    #[serde(default)]
    control_image: Option<String>,
    #[serde(default)]
    control_kind: Option<String>,
    #[serde(default)]
    control_scale: Option<f32>,
    #[serde(default)]
    control_low_threshold: Option<f32>,
    #[serde(default)]
    control_high_threshold: Option<f32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineControl {
    /// `s3://bucket/key` or `file:///abs/path`, read by the worker.
    #[serde(default)]
    uri: Option<String>,
    /// A local file, read by the CLI and sent inline.
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    scale: Option<f32>,
    /// Canny thresholds (kind `canny` only).
    #[serde(default)]
    low_threshold: Option<f32>,
    #[serde(default)]
    high_threshold: Option<f32>,
}

/// An input error, already phrased as a sentence that names file and line.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file} line {line}: {message}")]
    Line {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{file} has no items (every line is blank or a comment)")]
    Empty { file: String },
}

impl InputError {
    /// The 1-based line the error is on, when it is about one line.
    pub fn line(&self) -> Option<usize> {
        match self {
            InputError::Line { line, .. } => Some(*line),
            _ => None,
        }
    }
}

/// Which syntax a file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Text,
}

/// Guess the format: `.jsonl`/`.json`/`.ndjson` are JSONL, `.txt` is text,
/// otherwise JSONL when the first meaningful line starts with `{`.
pub fn detect_format(path: &Path, contents: &str) -> Format {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl" | "json" | "ndjson") => Format::Jsonl,
        Some("txt") => Format::Text,
        _ => {
            let first = contents
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('#'));
            match first {
                Some(l) if l.starts_with('{') => Format::Jsonl,
                _ => Format::Text,
            }
        }
    }
}

/// Items read from a file, with the line each came from, so that errors the
/// coordinator reports for `items[i]` can be shown as "file line N".
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    /// The file name, as used in messages.
    pub file: String,
    pub items: Vec<Item>,
    /// `lines[i]` is the 1-based line of `items[i]`.
    pub lines: Vec<usize>,
}

impl Parsed {
    /// "prompts.jsonl line 37" for item `index`, when known.
    pub fn locate(&self, index: usize) -> Option<String> {
        self.lines
            .get(index)
            .map(|l| format!("{} line {l}", self.file))
    }
}

/// Read and parse a whole input file. Relative `control.path`s resolve
/// against the file's own directory, so files can be moved with their images.
pub fn read_items(path: &Path) -> Result<Parsed, InputError> {
    read_items_in(path, None)
}

/// [`read_items`], with relative control-image paths resolved against `control_dir` when given
/// (`pixfarm submit --control-dir`), so one folder of edge maps serves several prompt files.
pub fn read_items_in(path: &Path, control_dir: Option<&Path>) -> Result<Parsed, InputError> {
    let contents = std::fs::read_to_string(path).map_err(|source| InputError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let base_dir = control_dir.unwrap_or_else(|| path.parent().unwrap_or(Path::new(".")));
    parse_items(&file, &contents, detect_format(path, &contents), base_dir)
}

/// Parse input text. Blank lines are skipped in both formats; lines whose
/// first non-blank character is `#` are comments in text files (and in JSONL,
/// where they cannot be valid JSON anyway).
pub fn parse_items(
    file: &str,
    contents: &str,
    format: Format,
    base_dir: &Path,
) -> Result<Parsed, InputError> {
    let mut items = Vec::new();
    let mut lines = Vec::new();
    for (i, raw) in contents.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let err = |message: String| InputError::Line {
            file: file.to_string(),
            line,
            message,
        };
        lines.push(line);
        match format {
            Format::Text => items.push(Item {
                prompt: trimmed.to_string(),
                ..Default::default()
            }),
            Format::Jsonl => {
                let parsed: LineItem =
                    serde_json::from_str(raw).map_err(|e| err(json_message(&e)))?;
                items.push(to_item(parsed, base_dir).map_err(err)?);
            }
        }
    }
    if items.is_empty() {
        return Err(InputError::Empty {
            file: file.to_string(),
        });
    }
    Ok(Parsed {
        file: file.to_string(),
        items,
        lines,
    })
}

/// serde_json says "... at line 1 column 5"; within a JSONL file the line is
/// ours to report, so keep only the column.
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let core = match text.rfind(" at line ") {
        Some(pos) => &text[..pos],
        None => text.as_str(),
    };
    if e.column() > 0 {
        format!("{core} at column {}", e.column())
    } else {
        core.to_string()
    }
}

fn to_item(l: LineItem, base_dir: &Path) -> Result<Item, String> {
    let (mut width, mut height) = (l.width, l.height);
    if let Some(size) = &l.size {
        if width.is_some() || height.is_some() {
            return Err("give either \"size\" or \"width\"/\"height\", not both".into());
        }
        let (w, h) = parse_size(size)?;
        width = Some(w);
        height = Some(h);
    }
    let flat = l.control_image.is_some()
        || l.control_kind.is_some()
        || l.control_scale.is_some()
        || l.control_low_threshold.is_some()
        || l.control_high_threshold.is_some();
    let line_control = match (l.control, flat) {
        (Some(_), true) => {
            return Err(
                "give either \"control\" or the flat \"control_image\"/\"control_*\" keys, not both"
                    .into(),
            );
        }
        (Some(c), false) => Some(c),
        (None, true) => {
            let image = l
                .control_image
                .ok_or("\"control_kind\"/\"control_scale\"/thresholds need a \"control_image\"")?;
            let (uri, path) = if image.starts_with("s3://") || image.starts_with("file://") {
                (Some(image), None)
            } else {
                (None, Some(PathBuf::from(image)))
            };
            Some(LineControl {
                uri,
                path,
                kind: l.control_kind,
                scale: l.control_scale,
                low_threshold: l.control_low_threshold,
                high_threshold: l.control_high_threshold,
            })
        }
        (None, false) => None,
    };
    let control = match line_control {
        None => None,
        Some(c) => {
            let source = match (c.uri, c.path) {
                (Some(_), Some(_)) => {
                    return Err("control has both \"uri\" and \"path\"; give one".into());
                }
                (None, None) => return Err("control needs a \"uri\" or a \"path\"".into()),
                (Some(uri), None) => control::Source::Uri(uri),
                (None, Some(p)) => {
                    let full = if p.is_absolute() { p } else { base_dir.join(p) };
                    let bytes = std::fs::read(&full).map_err(|e| {
                        format!("cannot read control image {}: {e}", full.display())
                    })?;
                    control::Source::Inline(bytes)
                }
            };
            Some(Control {
                source: Some(source),
                kind: c.kind.unwrap_or_default(),
                scale: c.scale,
                low_threshold: c.low_threshold,
                high_threshold: c.high_threshold,
            })
        }
    };
    Ok(Item {
        prompt: l.prompt,
        seed: l.seed,
        width,
        height,
        steps: l.steps,
        images_per_prompt: l.images_per_prompt,
        control,
    })
}

/// Parse `WxH` (also `W×H`), e.g. `512x768`.
pub fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let lower = s.trim().to_ascii_lowercase();
    let (w, h) = lower
        .split_once('x')
        .or_else(|| lower.split_once('×'))
        .ok_or_else(|| format!("size \"{s}\" is not WIDTHxHEIGHT, e.g. 512x512"))?;
    let w: u32 = w
        .trim()
        .parse()
        .map_err(|_| format!("size \"{s}\": width \"{w}\" is not a whole number"))?;
    let h: u32 = h
        .trim()
        .parse()
        .map_err(|_| format!("size \"{s}\": height \"{h}\" is not a whole number"))?;
    Ok((w, h))
}

/// Parse a seed list: `7`, `1,2,5`, `0-9` (inclusive), or a mix `1,4-6`.
pub fn parse_seeds(s: &str) -> Result<Vec<u64>, String> {
    let mut seeds = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: u64 = a
                .trim()
                .parse()
                .map_err(|_| format!("seed range \"{part}\" is not START-END"))?;
            let b: u64 = b
                .trim()
                .parse()
                .map_err(|_| format!("seed range \"{part}\" is not START-END"))?;
            if b < a {
                return Err(format!("seed range \"{part}\" ends before it starts"));
            }
            if b - a >= 1_000_000 {
                return Err(format!(
                    "seed range \"{part}\" has more than a million seeds"
                ));
            }
            seeds.extend(a..=b);
        } else {
            seeds.push(
                part.parse()
                    .map_err(|_| format!("seed \"{part}\" is not a whole number"))?,
            );
        }
    }
    if seeds.is_empty() {
        return Err("no seeds given".into());
    }
    Ok(seeds)
}

/// Defaults from the command line, applied to items that do not set them.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub size: Option<(u32, u32)>,
    pub steps: Option<u32>,
    /// Each item without a seed is rendered once per seed in this list.
    pub seeds: Option<Vec<u64>>,
    /// Control kind of items whose control image names none.
    pub control_kind: Option<String>,
    /// Conditioning scale of items whose control image sets none.
    pub control_scale: Option<f32>,
}

/// Fill in command-line defaults; items keep the values they set themselves.
pub fn apply_overrides(parsed: Parsed, o: &Overrides) -> Parsed {
    let mut out = Vec::with_capacity(parsed.items.len());
    let mut lines = Vec::with_capacity(parsed.items.len());
    for (mut item, line) in parsed.items.into_iter().zip(parsed.lines) {
        if let Some((w, h)) = o.size {
            item.width.get_or_insert(w);
            item.height.get_or_insert(h);
        }
        if let Some(steps) = o.steps {
            item.steps.get_or_insert(steps);
        }
        if let Some(c) = item.control.as_mut() {
            if let Some(kind) = &o.control_kind
                && c.kind.is_empty()
            {
                c.kind = kind.clone();
            }
            if let Some(scale) = o.control_scale {
                c.scale.get_or_insert(scale);
            }
        }
        match (&o.seeds, item.seed) {
            (Some(seeds), None) => {
                for &seed in seeds {
                    out.push(Item {
                        seed: Some(seed),
                        ..item.clone()
                    });
                    lines.push(line);
                }
            }
            _ => {
                out.push(item);
                lines.push(line);
            }
        }
    }
    Parsed {
        file: parsed.file,
        items: out,
        lines,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jsonl(s: &str) -> Result<Vec<Item>, InputError> {
        parse_items("prompts.jsonl", s, Format::Jsonl, Path::new(".")).map(|p| p.items)
    }

    #[test]
    fn parses_jsonl_fields() {
        let items = jsonl(
            "{\"prompt\":\"a cat\",\"seed\":7,\"size\":\"512x256\",\"steps\":2,\"n\":3}\n\n\
             {\"prompt\":\"a dog\",\"control\":{\"uri\":\"s3://b/k.png\",\"kind\":\"canny\",\"scale\":0.5}}\n",
        )
        .unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].prompt, "a cat");
        assert_eq!(items[0].seed, Some(7));
        assert_eq!((items[0].width, items[0].height), (Some(512), Some(256)));
        assert_eq!(items[0].steps, Some(2));
        assert_eq!(items[0].images_per_prompt, Some(3));
        let c = items[1].control.as_ref().unwrap();
        assert_eq!(c.source, Some(control::Source::Uri("s3://b/k.png".into())));
        assert_eq!(c.kind, "canny");
        assert_eq!(c.scale, Some(0.5));
    }

    #[test]
    fn flat_control_keys_and_control_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("e.png"), b"png bytes").unwrap();
        let text = "{\"prompt\":\"a\",\"control_image\":\"e.png\",\"control_kind\":\"canny\",\
                    \"control_scale\":0.5,\"control_low_threshold\":50,\"control_high_threshold\":150}\n\
                    {\"prompt\":\"b\",\"control_image\":\"s3://b/k.png\"}\n";
        let parsed = parse_items("p.jsonl", text, Format::Jsonl, dir.path()).unwrap();
        let c0 = parsed.items[0].control.as_ref().unwrap();
        assert_eq!(
            c0.source,
            Some(control::Source::Inline(b"png bytes".to_vec()))
        );
        assert_eq!(
            (
                c0.kind.as_str(),
                c0.scale,
                c0.low_threshold,
                c0.high_threshold
            ),
            ("canny", Some(0.5), Some(50.0), Some(150.0))
        );
        let c1 = parsed.items[1].control.as_ref().unwrap();
        assert_eq!(c1.source, Some(control::Source::Uri("s3://b/k.png".into())));

        let o = Overrides {
            control_kind: Some("hed".into()),
            control_scale: Some(0.8),
            ..Overrides::default()
        };
        let out = apply_overrides(parsed, &o);
        let c0 = out.items[0].control.as_ref().unwrap();
        assert_eq!(
            (c0.kind.as_str(), c0.scale),
            ("canny", Some(0.5)),
            "line values win"
        );
        let c1 = out.items[1].control.as_ref().unwrap();
        assert_eq!((c1.kind.as_str(), c1.scale), ("hed", Some(0.8)));

        let both =
            "{\"prompt\":\"a\",\"control_image\":\"e.png\",\"control\":{\"path\":\"e.png\"}}";
        let e = parse_items("p.jsonl", both, Format::Jsonl, dir.path()).unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
        let missing = "{\"prompt\":\"a\",\"control_image\":\"nope.png\"}";
        let e = parse_items("p.jsonl", missing, Format::Jsonl, dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("line 1") && e.to_string().contains("nope.png"),
            "{e}"
        );
    }

    #[test]
    fn malformed_line_37_is_named_with_column() {
        let mut s = String::new();
        for i in 1..=36 {
            s.push_str(&format!("{{\"prompt\":\"p{i}\"}}\n"));
        }
        s.push_str("{\"prompt\": }\n");
        let e = jsonl(&s).unwrap_err();
        assert_eq!(e.line(), Some(37));
        assert_eq!(
            e.to_string(),
            "prompts.jsonl line 37: expected value at column 12"
        );
    }

    #[test]
    fn unknown_field_and_wrong_type_are_named() {
        let e = jsonl("{\"promt\":\"x\"}").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("prompts.jsonl line 1: unknown field `promt`"),
            "{e}"
        );
        let e = jsonl("{\"prompt\":\"x\"}\n{\"prompt\":\"y\",\"width\":\"big\"}").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("prompts.jsonl line 2: invalid type"),
            "{e}"
        );
        let e = jsonl("{\"prompt\":\"x\",\"size\":\"12by3\"}").unwrap_err();
        assert!(e.to_string().contains("line 1: size \"12by3\""), "{e}");
    }

    #[test]
    fn text_format_and_empty_file() {
        let parsed = parse_items(
            "p.txt",
            "# header\na red fox\n\n  a blue bird  \n",
            Format::Text,
            Path::new("."),
        )
        .unwrap();
        let prompts: Vec<_> = parsed.items.iter().map(|i| i.prompt.as_str()).collect();
        assert_eq!(prompts, ["a red fox", "a blue bird"]);
        assert_eq!(parsed.lines, [2, 4]);
        assert_eq!(parsed.locate(1).as_deref(), Some("p.txt line 4"));
        let e = parse_items("p.txt", "\n# only\n", Format::Text, Path::new(".")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "p.txt has no items (every line is blank or a comment)"
        );
    }

    #[test]
    fn detects_format() {
        assert_eq!(detect_format(Path::new("a.jsonl"), "hello"), Format::Jsonl);
        assert_eq!(detect_format(Path::new("a.txt"), "{"), Format::Text);
        assert_eq!(
            detect_format(Path::new("a"), "\n# c\n{\"prompt\":\"x\"}"),
            Format::Jsonl
        );
        assert_eq!(detect_format(Path::new("a"), "a cat"), Format::Text);
    }

    #[test]
    fn sizes_and_seeds() {
        assert_eq!(parse_size("512x768"), Ok((512, 768)));
        assert_eq!(parse_size("64X64"), Ok((64, 64)));
        assert!(parse_size("512").is_err());
        assert_eq!(parse_seeds("1,4-6, 9"), Ok(vec![1, 4, 5, 6, 9]));
        assert!(parse_seeds("5-1").is_err());
        assert!(parse_seeds("x").is_err());
    }

    #[test]
    fn overrides_fill_only_missing_fields() {
        let items = vec![
            Item {
                prompt: "a".into(),
                width: Some(128),
                seed: Some(3),
                ..Default::default()
            },
            Item {
                prompt: "b".into(),
                ..Default::default()
            },
        ];
        let o = Overrides {
            size: Some((64, 64)),
            steps: Some(2),
            seeds: Some(vec![10, 11]),
            ..Default::default()
        };
        let parsed = Parsed {
            file: "f".into(),
            items,
            lines: vec![1, 2],
        };
        let parsed = apply_overrides(parsed, &o);
        assert_eq!(parsed.lines, [1, 2, 2]);
        let out = parsed.items;
        assert_eq!(out.len(), 3);
        assert_eq!(
            (out[0].width, out[0].height, out[0].seed),
            (Some(128), Some(64), Some(3))
        );
        assert_eq!((out[1].seed, out[2].seed), (Some(10), Some(11)));
        assert!(out.iter().all(|i| i.steps == Some(2)));
    }
}
