//! The `pixfarm.v1.Farm` service: thin handlers over [`pixfarm_core::Queue`]
//! and [`pixfarm_core::Storage`].
//!
//! The coordinator holds no state of its own (everything lives in Redis), so
//! any number of replicas can run behind a load balancer.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use pixfarm_core::{JobFilter, JobId, PageRequest, Queue, ResultStatus, Storage, ValidationError};
use pixfarm_proto::v1 as pb;
use pixfarm_proto::v1::farm_server::Farm;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument};

use crate::convert::{self, Defaults};
use crate::error::ApiError;

/// How many failures `GetJob` lists (the rest are in `ListResults`).
const MAX_FAILURES_SHOWN: usize = 100;

/// The gRPC service. Cheap to clone (handles only).
#[derive(Clone)]
pub struct FarmService {
    queue: Queue,
    storage: Storage,
    defaults: Defaults,
    /// Flips to `true` at shutdown so long-lived `WatchJob` streams end and the
    /// server's graceful shutdown does not wait for them forever.
    shutdown: watch::Receiver<bool>,
    shutdown_tx: watch::Sender<bool>,
}

impl FarmService {
    /// A service over an open queue and store; items without a size get
    /// `default_size`.
    pub fn new(queue: Queue, storage: Storage, default_size: (u32, u32)) -> Self {
        let (shutdown_tx, shutdown) = watch::channel(false);
        Self {
            queue,
            storage,
            defaults: Defaults {
                width: default_size.0,
                height: default_size.1,
            },
            shutdown,
            shutdown_tx,
        }
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Ends every open `WatchJob` stream (called at shutdown).
    pub fn close_streams(&self) {
        let _ = self.shutdown_tx.send(true);
    }

    fn parse_job_id(id: &str) -> Result<JobId, ApiError> {
        if id.is_empty() {
            return Err(ApiError::field("job_id", "must not be empty"));
        }
        // A string that is not a UUID cannot name any job.
        JobId::parse(id).ok_or_else(|| ApiError(pixfarm_core::CoreError::not_found("job", id)))
    }

    async fn submit(
        &self,
        header: Option<pb::JobSpec>,
        items: Vec<pixfarm_core::ItemSpec>,
        mut errs: Vec<ValidationError>,
    ) -> Result<pb::SubmitJobResponse, ApiError> {
        let spec = convert::job_from_proto(header, items);
        if !errs.is_empty() {
            // Report the shape problems together with every other problem of the job.
            if let Err(more) = pixfarm_core::validate_job(&spec, &self.queue.config().limits) {
                errs.extend(more);
            }
            errs.sort_by_key(|e| e.index.map_or(0, |i| i + 1));
            return Err(ApiError::invalid(errs));
        }
        let s = self.queue.submit(spec).await?;
        info!(job = %s.job, created = s.created, tasks = s.total, "job submitted");
        Ok(pb::SubmitJobResponse {
            job_id: s.job.to_string(),
            created: s.created,
            task_count: s.total,
        })
    }

    #[instrument(skip_all, fields(items = req.items.len()))]
    async fn submit_unary(
        &self,
        req: pb::SubmitJobRequest,
    ) -> Result<pb::SubmitJobResponse, ApiError> {
        let mut errs = Vec::new();
        let items = req
            .items
            .into_iter()
            .enumerate()
            .map(|(i, it)| convert::item_from_proto(i, it, self.defaults, &mut errs))
            .collect();
        self.submit(req.job, items, errs).await
    }

    #[instrument(skip_all)]
    async fn submit_stream(
        &self,
        mut stream: Streaming<pb::SubmitJobChunk>,
    ) -> Result<pb::SubmitJobResponse, ApiError> {
        use pb::submit_job_chunk::Chunk;
        let max_items = self.queue.config().limits.max_items;
        let header = match stream.message().await.map_err(stream_error)? {
            Some(pb::SubmitJobChunk {
                chunk: Some(Chunk::Header(h)),
            }) => h,
            Some(_) => {
                return Err(ApiError::field(
                    "header",
                    "the first message of SubmitJobStream must be the job header",
                ));
            }
            None => {
                return Err(ApiError::field(
                    "header",
                    "the stream ended before the job header",
                ));
            }
        };
        let mut items = Vec::new();
        let mut errs = Vec::new();
        while let Some(msg) = stream.message().await.map_err(stream_error)? {
            match msg.chunk {
                Some(Chunk::Items(chunk)) => {
                    if items.len() + chunk.items.len() > max_items {
                        // Stop reading early: a runaway stream must not fill the coordinator's memory.
                        return Err(ApiError::field(
                            "items",
                            format!("more than {max_items} items is over the limit per job"),
                        ));
                    }
                    for it in chunk.items {
                        let i = items.len();
                        items.push(convert::item_from_proto(i, it, self.defaults, &mut errs));
                    }
                }
                Some(Chunk::Header(_)) => {
                    return Err(ApiError::field(
                        "header",
                        "the job header may only be sent once, first",
                    ));
                }
                None => {}
            }
        }
        tracing::Span::current().record("items", items.len());
        self.submit(Some(header), items, errs).await
    }

    #[instrument(skip(self), fields(job = %job_id))]
    async fn get(&self, job_id: &str) -> Result<pb::Job, ApiError> {
        let id = Self::parse_job_id(job_id)?;
        let rec = self.queue.get_job(&id).await?;
        let failures = if rec.counts.failed > 0 {
            self.queue
                .all_results(&id)
                .await?
                .iter()
                .filter(|r| r.status == ResultStatus::Failed)
                .take(MAX_FAILURES_SHOWN)
                .map(convert::failure_to_proto)
                .collect()
        } else {
            Vec::new()
        };
        Ok(convert::job_to_proto(rec, failures))
    }

    #[instrument(skip_all)]
    async fn list(&self, req: pb::ListJobsRequest) -> Result<pb::ListJobsResponse, ApiError> {
        let state = pb::JobState::try_from(req.state)
            .map_err(|_| ApiError::field("state", format!("{} is not a job state", req.state)))?;
        let filter = JobFilter {
            tenant: None,
            states: convert::state_from_proto(state).into_iter().collect(),
            labels: req.labels.into_iter().collect(),
        };
        let page = PageRequest {
            size: page_size(req.page_size, 50, 1000),
            token: (!req.page_token.is_empty()).then_some(req.page_token),
        };
        let page = self.queue.list_jobs(&filter, &page).await?;
        Ok(pb::ListJobsResponse {
            jobs: page
                .items
                .into_iter()
                .map(|r| convert::job_to_proto(r, Vec::new()))
                .collect(),
            next_page_token: page.next_token.unwrap_or_default(),
        })
    }

    #[instrument(skip(self), fields(job = %job_id))]
    async fn cancel(&self, job_id: &str) -> Result<pb::CancelJobResponse, ApiError> {
        let id = Self::parse_job_id(job_id)?;
        let rec = self.queue.cancel_job(&id).await?;
        info!(job = %id, "job canceled");
        Ok(pb::CancelJobResponse {
            job: Some(convert::job_to_proto(rec, Vec::new())),
        })
    }

    #[instrument(skip_all, fields(job = %req.job_id))]
    async fn results(
        &self,
        req: pb::ListResultsRequest,
    ) -> Result<pb::ListResultsResponse, ApiError> {
        let id = Self::parse_job_id(&req.job_id)?;
        let page = PageRequest {
            size: page_size(req.page_size, 100, 10_000),
            token: (!req.page_token.is_empty()).then_some(req.page_token),
        };
        let page = self.queue.list_results(&id, &page).await?;
        let mut results = Vec::with_capacity(page.items.len());
        for r in page.items {
            let url = match &r.key {
                Some(k) if r.status == ResultStatus::Succeeded => {
                    self.storage.presign_get(k).await?
                }
                _ => String::new(),
            };
            results.push(convert::result_to_proto(r, url));
        }
        Ok(pb::ListResultsResponse {
            results,
            next_page_token: page.next_token.unwrap_or_default(),
        })
    }

    #[instrument(skip_all)]
    async fn workers(&self) -> Result<pb::ListWorkersResponse, ApiError> {
        let workers = self.queue.list_workers().await?;
        Ok(pb::ListWorkersResponse {
            workers: workers.into_iter().map(convert::worker_to_proto).collect(),
        })
    }
}

fn page_size(requested: u32, default: usize, max: usize) -> usize {
    match requested {
        0 => default,
        n => (n as usize).min(max),
    }
}

/// A broken client stream is the client's problem; pass its status through.
fn stream_error(s: Status) -> ApiError {
    ApiError::field(
        "stream",
        format!("the request stream failed: {}", s.message()),
    )
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Farm for FarmService {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        Ok(Response::new(
            self.submit_unary(request.into_inner()).await?,
        ))
    }

    async fn submit_job_stream(
        &self,
        request: Request<Streaming<pb::SubmitJobChunk>>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        Ok(Response::new(
            self.submit_stream(request.into_inner()).await?,
        ))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Ok(Response::new(self.get(&request.into_inner().job_id).await?))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let req = request.into_inner();
        let id = Self::parse_job_id(&req.job_id)?;
        // Fail fast with NOT_FOUND instead of an empty stream.
        self.queue.get_job(&id).await.map_err(ApiError::from)?;
        let after = (!req.after_event_id.is_empty()).then_some(req.after_event_id);
        info!(job = %id, after = ?after, "watch started");
        let mut shutdown = self.shutdown.clone();
        let job = id.clone();
        let events = self
            .queue
            .watch(id, after)
            .map(move |r| match r {
                Ok(e) => Ok(convert::event_to_proto(&job, e)),
                Err(e) => Err(Status::from(ApiError(e))),
            })
            .take_until(async move {
                let _ = shutdown.wait_for(|down| *down).await;
            });
        Ok(Response::new(Box::pin(events)))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        Ok(Response::new(
            self.cancel(&request.into_inner().job_id).await?,
        ))
    }

    async fn list_results(
        &self,
        request: Request<pb::ListResultsRequest>,
    ) -> Result<Response<pb::ListResultsResponse>, Status> {
        Ok(Response::new(self.results(request.into_inner()).await?))
    }

    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        Ok(Response::new(self.workers().await?))
    }
}
