//! Proto ↔ core conversions, in one place, so the queue never sees protobuf
//! and the wire format never leaks domain details.

use std::collections::BTreeMap;

use pixfarm_core as core;
use pixfarm_core::{ControlKind, ValidationError};
use pixfarm_proto::v1 as pb;

/// Defaults the coordinator applies to fields a client left out.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub width: u32,
    pub height: u32,
}

/// Converts one proto item (global index `index`) to a core item; problems the
/// proto shape can have (no control source, unknown control kind) are pushed to
/// `errs` with the item's field path.
pub fn item_from_proto(
    index: usize,
    item: pb::Item,
    d: Defaults,
    errs: &mut Vec<ValidationError>,
) -> core::ItemSpec {
    let control = item.control.and_then(|c| {
        let kind = if c.kind.is_empty() {
            ControlKind::default()
        } else {
            match c.kind.parse::<ControlKind>() {
                Ok(k) => k,
                Err(m) => {
                    errs.push(ValidationError::item(index, "control.kind", m));
                    ControlKind::default()
                }
            }
        };
        let source = match c.source {
            Some(pb::control::Source::Inline(b)) => core::ControlSource::Inline(b),
            Some(pb::control::Source::Uri(u)) => core::ControlSource::Uri(u),
            None => {
                errs.push(ValidationError::item(
                    index,
                    "control",
                    "needs an image: inline bytes or a uri",
                ));
                return None;
            }
        };
        Some(core::ControlSpec {
            source,
            kind,
            scale: c.scale.unwrap_or(1.0),
            low_threshold: c.low_threshold,
            high_threshold: c.high_threshold,
        })
    });
    core::ItemSpec {
        prompt: item.prompt,
        seed: item.seed,
        width: item.width.unwrap_or(d.width),
        height: item.height.unwrap_or(d.height),
        steps: item.steps.unwrap_or(core::DEFAULT_STEPS),
        images_per_prompt: item.images_per_prompt.unwrap_or(1),
        control,
    }
}

/// Builds the core job spec from the job header and converted items.
pub fn job_from_proto(spec: Option<pb::JobSpec>, items: Vec<core::ItemSpec>) -> core::JobSpec {
    let spec = spec.unwrap_or_default();
    let mut job = core::JobSpec::new(items);
    job.priority = priority_from_proto(spec.priority());
    job.idempotency_key = (!spec.idempotency_key.is_empty()).then_some(spec.idempotency_key);
    job.output_prefix = spec.output_prefix;
    job.labels = spec.labels.into_iter().collect::<BTreeMap<_, _>>();
    job
}

pub fn priority_from_proto(p: pb::Priority) -> core::Priority {
    match p {
        pb::Priority::High => core::Priority::High,
        pb::Priority::Low => core::Priority::Low,
        pb::Priority::Normal | pb::Priority::Unspecified => core::Priority::Normal,
    }
}

pub fn priority_to_proto(p: core::Priority) -> pb::Priority {
    match p {
        core::Priority::High => pb::Priority::High,
        core::Priority::Normal => pb::Priority::Normal,
        core::Priority::Low => pb::Priority::Low,
    }
}

pub fn state_to_proto(s: core::JobState) -> pb::JobState {
    match s {
        core::JobState::Queued => pb::JobState::Queued,
        core::JobState::Running => pb::JobState::Running,
        core::JobState::Succeeded => pb::JobState::Succeeded,
        core::JobState::Partial => pb::JobState::Partial,
        core::JobState::Failed => pb::JobState::Failed,
        core::JobState::Canceled => pb::JobState::Canceled,
    }
}

pub fn state_from_proto(s: pb::JobState) -> Option<core::JobState> {
    Some(match s {
        pb::JobState::Unspecified => return None,
        pb::JobState::Queued => core::JobState::Queued,
        pb::JobState::Running => core::JobState::Running,
        pb::JobState::Succeeded => core::JobState::Succeeded,
        pb::JobState::Partial => core::JobState::Partial,
        pb::JobState::Failed => core::JobState::Failed,
        pb::JobState::Canceled => core::JobState::Canceled,
    })
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub fn job_to_proto(r: core::JobRecord, failures: Vec<pb::TaskFailure>) -> pb::Job {
    pb::Job {
        id: r.id.to_string(),
        state: state_to_proto(r.state) as i32,
        spec: Some(pb::JobSpec {
            priority: priority_to_proto(r.priority) as i32,
            idempotency_key: r.idempotency_key.unwrap_or_default(),
            output_prefix: r.output_prefix,
            labels: r.labels.into_iter().collect(),
            tenant: r.tenant,
        }),
        task_count: r.counts.total,
        done: r.counts.succeeded,
        failed: r.counts.failed,
        canceled: r.counts.canceled,
        pending: r.counts.pending(),
        created_unix_ms: ms(r.created_ms),
        started_unix_ms: r.started_ms.map(ms).unwrap_or(0),
        finished_unix_ms: r.finished_ms.map(ms).unwrap_or(0),
        manifest_key: r.manifest_key.unwrap_or_default(),
        manifest_pending: r.manifest_pending,
        failures,
        last_error: r.last_error.unwrap_or_default(),
        item_count: r.items,
    }
}

pub fn failure_to_proto(r: &core::TaskResult) -> pb::TaskFailure {
    pb::TaskFailure {
        index: r.index,
        error: r.error.clone().unwrap_or_default(),
        attempts: r.attempts,
    }
}

pub fn event_to_proto(job: &core::JobId, e: core::Event) -> pb::JobEvent {
    use pb::job_event::Kind;
    let kind = match e.kind {
        core::EventKind::Queued { total } => Kind::Queued(pb::JobQueued { task_count: total }),
        core::EventKind::Started { worker } => Kind::Started(pb::JobStarted { worker }),
        core::EventKind::Step {
            indices,
            step,
            total,
            worker,
        } => Kind::Progress(pb::StepProgress {
            indices,
            step,
            total,
            worker,
        }),
        core::EventKind::ItemDone { index, key, worker } => {
            Kind::ItemDone(pb::ItemDone { index, key, worker })
        }
        core::EventKind::ItemFailed {
            index,
            error,
            attempt,
            will_retry,
            worker,
        } => Kind::ItemFailed(pb::ItemFailed {
            index,
            error,
            attempt,
            will_retry,
            worker,
        }),
        core::EventKind::JobFinished { state, counts } => Kind::Finished(pb::JobFinished {
            state: state_to_proto(state) as i32,
            done: counts.succeeded,
            failed: counts.failed,
            canceled: counts.canceled,
            task_count: counts.total,
        }),
    };
    pb::JobEvent {
        id: e.id,
        job_id: job.to_string(),
        unix_ms: ms(e.at_ms),
        kind: Some(kind),
    }
}

/// A result row; `url` is presigned by the caller (it needs the store).
pub fn result_to_proto(r: core::TaskResult, url: String) -> pb::Result {
    let (control_kind, control_scale) = r
        .parameters
        .control
        .as_ref()
        .map(|c| (c.kind.as_str().to_string(), c.scale))
        .unwrap_or_default();
    pb::Result {
        index: r.index,
        prompt: r.prompt,
        seed: r.seed,
        width: r.parameters.width,
        height: r.parameters.height,
        steps: r.parameters.steps,
        control_kind,
        control_scale,
        key: r.key.unwrap_or_default(),
        sha256: r.sha256.unwrap_or_default(),
        url,
        worker: r.worker,
        timings: Some(pb::Timings {
            queue_ms: r.timings.queue_ms,
            render_ms: r.timings.render_ms,
            encode_ms: r.timings.encode_ms,
            upload_ms: r.timings.upload_ms,
            batch_size: r.timings.batch_size,
        }),
        succeeded: r.status == core::ResultStatus::Succeeded,
        error: r.error.unwrap_or_default(),
        attempts: r.attempts,
        finished_unix_ms: ms(r.finished_ms),
        control_key: r.parameters.control_key.unwrap_or_default(),
    }
}

pub fn worker_to_proto(w: core::WorkerInfo) -> pb::Worker {
    let state = match w.state {
        core::WorkerState::Starting => "starting",
        core::WorkerState::Idle => "idle",
        core::WorkerState::Busy => "busy",
        core::WorkerState::Draining => "draining",
    };
    pb::Worker {
        id: w.id,
        host: w.host,
        device: w.device,
        model: w.model,
        state: state.to_string(),
        current_batch: w.current_batch,
        last_heartbeat_unix_ms: ms(w.last_heartbeat_ms),
        images_per_sec: w.images_per_sec,
        images_done: w.images_done,
        lanes: w.lanes.iter().map(|l| l.to_string()).collect(),
        started_unix_ms: ms(w.started_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_defaults_and_explicit_zero_steps_survive() {
        let d = Defaults {
            width: 64,
            height: 32,
        };
        let mut errs = Vec::new();
        let it = item_from_proto(
            3,
            pb::Item {
                prompt: "a".into(),
                ..Default::default()
            },
            d,
            &mut errs,
        );
        assert_eq!(
            (it.width, it.height, it.steps, it.images_per_prompt),
            (64, 32, 4, 1)
        );
        let it = item_from_proto(
            3,
            pb::Item {
                prompt: "a".into(),
                steps: Some(0),
                ..Default::default()
            },
            d,
            &mut errs,
        );
        // Zero is passed on for core validation to reject, never replaced by the default.
        assert_eq!(it.steps, 0);
        assert!(errs.is_empty());
    }

    #[test]
    fn control_problems_name_the_item() {
        let d = Defaults {
            width: 64,
            height: 64,
        };
        let mut errs = Vec::new();
        let item = pb::Item {
            prompt: "a".into(),
            control: Some(pb::Control {
                source: None,
                kind: "sketchy".into(),
                scale: None,
                ..Default::default()
            }),
            ..Default::default()
        };
        let it = item_from_proto(5, item, d, &mut errs);
        assert!(it.control.is_none());
        let paths: Vec<_> = errs.iter().map(|e| e.path()).collect();
        assert_eq!(paths, ["items[5].control.kind", "items[5].control"]);
    }
}
