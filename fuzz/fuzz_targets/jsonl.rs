//! The CLI's input parser (JSONL and plain text) on arbitrary text: no panic,
//! and a successful parse maps every item to the input line it came from.
//! `cli/src/input.rs` is compiled in directly (it only needs the proto types),
//! so the fuzz build does not pull in the model, the worker and the CLI.
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../cli/src/input.rs"]
mod input;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    // A folder that does not exist: control image paths in the input resolve to nothing.
    let base = std::path::Path::new("/nonexistent/pixfarm-fuzz");
    for format in [input::Format::Jsonl, input::Format::Text] {
        if let Ok(p) = input::parse_items("fuzz.jsonl", text, format, base) {
            assert!(!p.items.is_empty());
            assert_eq!(p.items.len(), p.lines.len());
            let n_lines = text.lines().count();
            assert!(p.lines.iter().all(|&l| l >= 1 && l <= n_lines));
            assert!(p.lines.windows(2).all(|w| w[0] < w[1]));
        }
    }
});
