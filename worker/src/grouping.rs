//! Grouping a pulled batch into renderable groups.
//!
//! The pipeline renders one size and one step count per call (one batched forward per step), so a
//! pulled batch is split by [`GroupKey`] (width, height, steps, controlled or not). Groups keep
//! the order in which their first task arrived (the queue hands out higher priorities first) and
//! tasks keep their order inside a group.

use std::collections::HashMap;

use pixfarm_core::{GroupKey, Task};

/// Splits `tasks` into groups of compatible tasks of at most `max_group` each.
pub fn group_tasks(tasks: Vec<Task>, max_group: usize) -> Vec<Vec<Task>> {
    let max_group = max_group.max(1);
    let mut order: Vec<GroupKey> = Vec::new();
    let mut by_key: HashMap<GroupKey, Vec<Task>> = HashMap::new();
    for t in tasks {
        let k = t.spec.group_key();
        by_key
            .entry(k)
            .or_insert_with(|| {
                order.push(k);
                Vec::new()
            })
            .push(t);
    }
    let mut out = Vec::new();
    for k in order {
        let mut group = by_key.remove(&k).unwrap_or_default();
        while group.len() > max_group {
            let rest = group.split_off(max_group);
            out.push(std::mem::replace(&mut group, rest));
        }
        if !group.is_empty() {
            out.push(group);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pixfarm_core::{
        ControlKind, ControlRef, JobId, Lane, Priority, TaskControl, TaskSpec, Variant,
    };

    /// A task of its own job (shared with the worker's unit tests).
    pub(crate) fn task(
        index: u64,
        w: u32,
        h: u32,
        steps: u32,
        control: Option<(ControlKind, f32)>,
    ) -> Task {
        let job = JobId::new();
        Task {
            spec: TaskSpec {
                job: job.clone(),
                tenant: "default".into(),
                index,
                item: 0,
                prompt: format!("p{index}"),
                seed: index,
                width: w,
                height: h,
                steps,
                control: control.map(|(kind, scale)| TaskControl {
                    source: ControlRef::Inline { item: 0 },
                    kind,
                    scale,
                    low_threshold: None,
                    high_threshold: None,
                }),
                output_key: format!("{job}/{index:06}.png"),
                lease_ms: 1000,
                prior_attempts: 0,
                submitted_ms: 0,
            },
            lane: Lane::new(
                Priority::Normal,
                if control.is_some() {
                    Variant::Control
                } else {
                    Variant::Base
                },
            ),
            entry_id: format!("{index}-0"),
            attempt: 1,
        }
    }

    fn indices(groups: &[Vec<Task>]) -> Vec<Vec<u64>> {
        groups
            .iter()
            .map(|g| g.iter().map(|t| t.spec.index).collect())
            .collect()
    }

    #[test]
    fn groups_by_size_steps_and_control_in_arrival_order() {
        let tasks = vec![
            task(0, 64, 64, 4, None),
            task(1, 128, 64, 4, None),
            task(2, 64, 64, 4, None),
            task(3, 64, 64, 2, None),
            task(4, 64, 64, 4, Some((ControlKind::Canny, 1.0))),
            task(5, 64, 64, 4, Some((ControlKind::Hed, 0.5))),
            task(6, 64, 64, 4, Some((ControlKind::Canny, 1.0))),
            task(7, 128, 64, 4, None),
        ];
        let groups = group_tasks(tasks, 16);
        // Control kinds and scales share a batch; plain and controlled tasks do not.
        assert_eq!(
            indices(&groups),
            vec![vec![0, 2], vec![1, 7], vec![3], vec![4, 5, 6]]
        );
        for g in &groups {
            let k = g[0].spec.group_key();
            assert!(g.iter().all(|t| t.spec.group_key() == k));
        }
    }

    #[test]
    fn splits_groups_over_the_limit() {
        let tasks: Vec<Task> = (0..7).map(|i| task(i, 64, 64, 4, None)).collect();
        let groups = group_tasks(tasks, 3);
        assert_eq!(
            indices(&groups),
            vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]
        );
        assert!(group_tasks(Vec::new(), 3).is_empty());
        // A limit of 0 is treated as 1 rather than looping forever.
        assert_eq!(
            group_tasks(vec![task(0, 64, 64, 4, None), task(1, 64, 64, 4, None)], 0).len(),
            2
        );
    }
}
