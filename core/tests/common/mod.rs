//! Helpers shared by the queue and fair-share integration tests.

use pixfarm_core::{Lane, Task, TaskResult, Timings, Variant};

/// Every base lane, highest priority first.
pub fn base() -> Vec<Lane> {
    Lane::all_of(Variant::Base)
}

/// A success record for `task` with a recognisable fake digest (`sha-{index}`).
pub fn ok_result(task: &Task, worker: &str) -> TaskResult {
    TaskResult::succeeded(
        task,
        task.spec.output_key.clone(),
        format!("sha-{}", task.spec.index),
        worker,
        Timings::default(),
    )
}
