//! The engine: one OS thread owns the model and its device; everything else talks to it through a
//! channel. Queue, upload and network code never touch tensors, and the async runtime never blocks
//! on a forward pass.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use pixart::control::Hed;
use pixart::pipeline::{
    Control, ModelSource, Pipeline, PipelineOptions, RenderOutput, RenderRequest, StepProgress,
};
use pixfarm_core::ControlKind;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

/// Work for the engine thread: a batched render, or edge maps for a group's control images (HED
/// runs on the model's device, so it lives on this thread too).
enum EngineJob {
    Render(RenderJob),
    Edges {
        jobs: Vec<EdgeJob>,
        reply: oneshot::Sender<Vec<Result<image::RgbImage, ControlError>>>,
    },
}

/// Why a control image cannot guide a render. `retryable`: another attempt (perhaps on another
/// worker) may succeed, e.g. one with HED weights; a too-small image fails for good at once.
#[derive(Debug, Clone)]
pub struct ControlError {
    pub reason: String,
    pub retryable: bool,
    /// The failure was the infrastructure's (storage or Redis unreachable), not the image's: the
    /// task is given back without counting an attempt.
    pub infrastructure: bool,
}

impl ControlError {
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            retryable: false,
            infrastructure: false,
        }
    }
    pub fn retryable(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            retryable: true,
            infrastructure: false,
        }
    }
    pub fn infrastructure(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            retryable: true,
            infrastructure: true,
        }
    }
}

/// One control image to turn into the edge map that guides a render.
pub struct EdgeJob {
    pub image: image::DynamicImage,
    pub kind: ControlKind,
    pub low_threshold: Option<f32>,
    pub high_threshold: Option<f32>,
    /// Requested output size; the edge map is made at the pipeline's generation size for it.
    pub width: u32,
    pub height: u32,
}

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
    tx: mpsc::Sender<EngineJob>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Engine {
    /// Starts the thread and loads the model in it (the model never crosses threads). Resolves when
    /// loading has finished, with its error if it failed.
    pub async fn start(
        source: ModelSource,
        options: PipelineOptions,
        hed_weights: Option<PathBuf>,
    ) -> Result<Self, pixart::Error> {
        let (tx, mut rx) = mpsc::channel::<EngineJob>(1);
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), pixart::Error>>();
        let thread = std::thread::Builder::new()
            .name("pixfarm-engine".into())
            .spawn(move || {
                let t0 = Instant::now();
                let device = options.device.clone();
                let loaded = Pipeline::load(&source, options).and_then(|p| {
                    let hed = hed_weights
                        .as_deref()
                        .map(|path| Hed::load(path, &device))
                        .transpose()?;
                    Ok((p, hed))
                });
                let (mut pipeline, hed) = match loaded {
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
                    let job = match job {
                        EngineJob::Render(job) => job,
                        EngineJob::Edges { jobs, reply } => {
                            let out = jobs
                                .into_iter()
                                .map(|j| edge_map(&pipeline, hed.as_ref(), j))
                                .collect();
                            let _ = reply.send(out);
                            continue;
                        }
                    };
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
            .send(EngineJob::Render(RenderJob {
                request,
                cancel,
                progress,
                reply,
            }))
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Edge maps for control images, in order; each error says why that image cannot guide a render.
    pub async fn edge_maps(
        &self,
        jobs: Vec<EdgeJob>,
    ) -> Vec<Result<image::RgbImage, ControlError>> {
        let n = jobs.len();
        let (reply, rx) = oneshot::channel();
        let gone = || vec![Err(ControlError::retryable("the engine thread has stopped")); n];
        if self
            .tx
            .send(EngineJob::Edges { jobs, reply })
            .await
            .is_err()
        {
            return gone();
        }
        rx.await.unwrap_or_else(|_| gone())
    }
}

/// Resizes and centre-crops a control image to the generation size (the aspect-ratio bin the
/// pipeline renders at, like the reference demo), then runs the requested edge detector. A panic
/// in a detector fails this image only.
///
/// `pixfarm generate` calls it too, so a local render is guided exactly as a farm render.
pub fn edge_map(
    pipeline: &Pipeline,
    hed: Option<&Hed>,
    j: EdgeJob,
) -> Result<image::RgbImage, ControlError> {
    pixart::control::check_control_image_size(j.image.width(), j.image.height())
        .map_err(|e| ControlError::permanent(e.to_string()))?;
    let (gw, gh) = pipeline.generation_size(j.width, j.height);
    let run = || -> Result<image::RgbImage, ControlError> {
        let fitted = pixart::control::resize_center_crop(&j.image, gw, gh);
        match j.kind {
            ControlKind::Edge => Ok(fitted),
            ControlKind::Canny => pixart::control::canny(
                &fitted,
                j.low_threshold
                    .unwrap_or(pixart::control::DEFAULT_CANNY_LOW),
                j.high_threshold
                    .unwrap_or(pixart::control::DEFAULT_CANNY_HIGH),
            )
            .map_err(|e| ControlError::permanent(format!("canny failed: {e}"))),
            ControlKind::Hed => match hed {
                Some(h) => h
                    .detect(&fitted)
                    .map_err(|e| ControlError::permanent(format!("HED failed: {e}"))),
                None => Err(ControlError::retryable(
                    "this worker has no HED weights (start it with --hed-weights FILE) for a `hed` control image",
                )),
            },
        }
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .unwrap_or_else(|_| Err(ControlError::permanent("the edge detector panicked")))
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
