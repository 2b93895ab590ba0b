//! The progress bar of a training stage: steps, loss and steps per second.
//!
//! Steps/s counts only the steps of this process (a resumed run starts its clock at the resume step), so
//! the figure is the machine's speed, not diluted by the interruption.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar over the steps `start..total` of one stage.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    start_step: u64,
    started: Instant,
}

impl Progress {
    /// `visible = false` draws nothing (tests, logs); indicatif also hides the bar when stderr is not a
    /// terminal.
    pub fn new(stage: &str, start_step: u64, total: u64, visible: bool) -> Self {
        let bar = ProgressBar::with_draw_target(
            Some(total),
            if visible {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(stage.to_string());
        bar.set_position(start_step);
        Self {
            bar,
            start_step,
            started: Instant::now(),
        }
    }

    /// Steps per second since this process started the stage.
    pub fn steps_per_second(&self, step: u64) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        if secs > 0.0 {
            step.saturating_sub(self.start_step) as f64 / secs
        } else {
            0.0
        }
    }

    /// Records that `step` steps are done, the last with `loss`.
    pub fn update(&self, step: u64, loss: f32) {
        self.bar.set_position(step);
        self.bar.set_message(format!(
            "loss {loss:.5} · {:.2} steps/s",
            self.steps_per_second(step)
        ));
    }

    pub fn finish(&self) {
        self.bar.finish();
    }
}
