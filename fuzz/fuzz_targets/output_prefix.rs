//! The output-prefix check on arbitrary strings: an accepted prefix must never
//! let an object key leave the tenant's directory, under the S3 reading (keys
//! are strings split on `/`) and the file-store reading (a path joined to a
//! root and normalised).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pixfarm_core::validate::check_prefix;
use pixfarm_core::{JobId, image_key, object_prefix};

fuzz_target!(|prefix: &str| {
    if check_prefix(prefix, 512).is_err() {
        return;
    }
    let key = image_key(&object_prefix("tenant", prefix), &JobId::new(), 7);
    assert!(key.starts_with("tenant/"), "{key}");
    assert!(key.is_ascii() && !key.contains('\\'), "{key}");
    let mut depth = 0i32;
    for seg in key.split('/') {
        match seg {
            "" | "." => panic!("empty or `.` segment in {key}"),
            ".." => depth -= 1,
            _ => depth += 1,
        }
        assert!(depth > 0, "{key} climbs out of the tenant directory");
    }
});
