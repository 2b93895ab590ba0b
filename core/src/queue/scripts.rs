//! Loads the Lua script of every multi-key (or read-check-write) transition. Each script lives in
//! its own `.lua` file beside the module that calls it, so a transition and its script read
//! together; `fair.lua` holds the shared fair-share functions and is prepended to the scripts that
//! move tasks between backlogs, counters and lane streams.
//!
//! Cluster note: most scripts touch either the keys of ONE job (`pf:job:{id}…`, which share the
//! hash tag `{id}`) or ONE lane stream. Where a transition spans a job and a lane (record a result,
//! then acknowledge the entry), the job script runs first and is idempotent, so a crash between the
//! two only causes a redelivery that records nothing. The fair-share scripts (submit, refill, ack,
//! cancel; see `crate::fair`), the record script (which also marks the manifest due and appends the
//! dead letter) and cancel move state between a job and global keys in one step, which is what
//! keeps counters and markers exact, so the queue needs one Redis primary (or Sentinel), not a
//! Redis Cluster.

use redis::Script;

const FAIR_LIB: &str = include_str!("fair.lua");

fn with_lib(body: &str) -> Script {
    Script::new(&format!("{FAIR_LIB}\n{body}"))
}

pub(crate) struct Scripts {
    pub record: Script,
    pub mark_started: Script,
    pub note_error: Script,
    pub cancel: Script,
    pub reclaim: Script,
    pub extend: Script,
    pub ack: Script,
    pub requeue: Script,
    pub submit: Script,
    pub refill: Script,
    pub manifest_done: Script,
    pub stage: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            record: Script::new(include_str!("record.lua")),
            mark_started: Script::new(include_str!("mark_started.lua")),
            note_error: Script::new(include_str!("note_error.lua")),
            cancel: with_lib(include_str!("cancel.lua")),
            reclaim: Script::new(include_str!("reclaim.lua")),
            extend: Script::new(include_str!("extend.lua")),
            ack: with_lib(include_str!("ack.lua")),
            requeue: Script::new(include_str!("requeue.lua")),
            submit: with_lib(include_str!("submit.lua")),
            refill: with_lib(include_str!("refill.lua")),
            manifest_done: Script::new(include_str!("manifest_done.lua")),
            stage: Script::new(include_str!("stage.lua")),
        }
    }
}
