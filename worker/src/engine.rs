//! The engine: one OS thread owns the model and its device; everything else talks to it through a
//! channel. Queue, upload and network code never touch tensors, and the async runtime never blocks
//! on a forward pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use pixart::pipeline::{
    Control, ModelSource, Pipeline, PipelineOptions, RenderOutput, RenderRequest, StepProgress,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

/// A render for the engine thread.
struct RenderJob {
    request: RenderRequest,
    /// Set by the caller to stop the batch between denoising steps.
    cancel: Arc<AtomicBool>,
    /// Receives every step's progress.
    progress: mpsc::UnboundedSender<StepProgress>,
    reply: oneshot::Sender<Result<Rendered, pixart::Error>>,
}

/// A finished render.
pub struct Rendered {
    pub outputs: Vec<RenderOutput>,
    /// Wall time of the batched call, in milliseconds.
    pub render_ms: f64,
}

/// Handle on the engine thread. Dropping it closes the channel; the thread then exits.
pub struct Engine {
    tx: mpsc::Sender<RenderJob>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Engine {
    /// Starts the thread and loads the model in it (the model never crosses threads). Resolves when
    /// loading has finished, with its error if it failed.
    pub async fn start(
        source: ModelSource,
        options: PipelineOptions,
    ) -> Result<Self, pixart::Error> {
        let (tx, mut rx) = mpsc::channel::<RenderJob>(1);
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), pixart::Error>>();
        let thread = std::thread::Builder::new()
            .name("pixfarm-engine".into())
            .spawn(move || {
                let t0 = Instant::now();
                let mut pipeline = match Pipeline::load(&source, options) {
                    Ok(p) => {
                        info!(load_ms = t0.elapsed().as_millis() as u64, "model loaded");
                        let _ = ready_tx.send(Ok(()));
                        p
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Some(job) = rx.blocking_recv() {
                    let RenderJob {
                        request,
                        cancel,
                        progress,
                        reply,
                    } = job;
                    // A panic inside the model fails this batch with its message instead of taking
                    // the worker down; the weights are read-only, so the pipeline stays usable.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        pipeline.validate(&request).and_then(|()| {
                            let t = Instant::now();
                            let mut on_step = |p: StepProgress| {
                                let _ = progress.send(p);
                                if cancel.load(Ordering::Relaxed) {
                                    Control::Cancel
                                } else {
                                    Control::Continue
                                }
                            };
                            let outputs = pipeline.render(&request, &mut on_step)?;
                            Ok(Rendered {
                                outputs,
                                render_ms: t.elapsed().as_secs_f64() * 1e3,
                            })
                        })
                    }))
                    .unwrap_or_else(|panic| {
                        let msg = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "unknown panic".into());
                        Err(pixart::Error::InvalidInput {
                            field: "render",
                            message: format!("the model panicked: {msg}"),
                        })
                    });
                    if let Err(e) = &result
                        && !matches!(e, pixart::Error::Cancelled)
                    {
                        error!(error = %e, "render failed");
                    }
                    let _ = reply.send(result);
                }
            })
            .map_err(|e| pixart::Error::Io {
                path: "pixfarm-engine thread".into(),
                source: e,
            })?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(Self {
                tx,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(pixart::Error::InvalidInput {
                field: "model",
                message: "the engine thread stopped while loading the model".into(),
            }),
        }
    }

    /// Whether the engine thread is gone (it only stops when the handle is dropped, or on a fault
    /// outside a render); the worker then exits so its supervisor restarts it.
    pub fn is_stopped(&self) -> bool {
        self.tx.is_closed()
    }

    /// Renders one batch. `cancel` stops it between steps (`Err(Cancelled)`); `progress` receives
    /// each step.
    pub async fn render(
        &self,
        request: RenderRequest,
        cancel: Arc<AtomicBool>,
        progress: mpsc::UnboundedSender<StepProgress>,
    ) -> Result<Rendered, pixart::Error> {
        let (reply, rx) = oneshot::channel();
        let gone = || pixart::Error::InvalidInput {
            field: "engine",
            message: "the engine thread has stopped".into(),
        };
        self.tx
            .send(RenderJob {
                request,
                cancel,
                progress,
                reply,
            })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop after its current render.
        let (dead, _) = mpsc::channel(1);
        self.tx = dead;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
