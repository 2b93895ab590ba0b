//! Request validation on arbitrary job specs (JSON, the shape `JobSpec` has on
//! the wire to the queue): validation must never panic, and a job it accepts
//! must expand into exactly `total_images` tasks whose object keys stay under
//! the job's tenant (`{tenant}/…`, no `.`/`..`/empty segments).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pixfarm_core::validate::{LeasePolicy, Limits, assign_seeds, expand, validate_job};
use pixfarm_core::{JobId, JobSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(mut spec) = serde_json::from_slice::<JobSpec>(data) else {
        return;
    };
    // Small limits so big expansions are refused instead of exhausting memory.
    let limits = Limits {
        max_items: 64,
        max_images: 256,
        ..Limits::default()
    };
    if validate_job(&spec, &limits).is_err() {
        return;
    }
    assign_seeds(&mut spec);
    let job = JobId::new();
    let tasks = expand(&job, &spec, &LeasePolicy::default());
    assert_eq!(tasks.len() as u64, spec.total_images());
    let tenant_dir = format!("{}/", spec.tenant);
    for t in &tasks {
        assert!(t.output_key.starts_with(&tenant_dir), "{}", t.output_key);
        assert!(t.output_key.is_ascii(), "{}", t.output_key);
        for seg in t.output_key.split('/') {
            assert!(
                !seg.is_empty() && seg != "." && seg != "..",
                "{}",
                t.output_key
            );
        }
    }
});
