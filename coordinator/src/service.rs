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

use crate::auth::AuthContext;
use crate::convert::{self, Defaults};
use crate::error::ApiError;
use pixfarm_core::auth::Action;

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

    /// A controlled job on a farm whose live workers all lack a ControlNet adapter could only
    /// wait forever in a lane nobody serves: refuse it at submit, naming the first such item. With
    /// no live workers at all (scaled to zero) accept it: the autoscaler starts workers per lane.
    async fn check_control_workers(&self, spec: &pixfarm_core::JobSpec) -> Result<(), ApiError> {
        let Some(first) = spec.items.iter().position(|i| i.control.is_some()) else {
            return Ok(());
        };
        let workers = self.queue.list_workers().await?;
        let serves_control = |w: &pixfarm_core::WorkerInfo| {
            w.lanes
                .iter()
                .any(|l| l.variant == pixfarm_core::Variant::Control)
        };
        if workers.is_empty() || workers.iter().any(serves_control) {
            return Ok(());
        }
        Err(ApiError(pixfarm_core::CoreError::Conflict(format!(
            "items[{first}].control: none of the {} live workers has a ControlNet adapter \
             (start workers with --controlnet DIR, or submit without control images)",
            workers.len()
        ))))
    }

    /// The job `id` as `ctx` may see it: another tenant's job is NOT_FOUND with
    /// the same message as a job that does not exist, so ids cannot be probed.
    async fn visible_job(
        &self,
        ctx: &AuthContext,
        job_id: &str,
    ) -> Result<(JobId, pixfarm_core::JobRecord), ApiError> {
        let id = Self::parse_job_id(job_id)?;
        let rec = self.queue.get_job(&id).await?;
        if !ctx.sees(&rec.tenant) {
            tracing::warn!(token = %ctx.name, tenant = %ctx.tenant, job = %id, "job of another tenant requested");
            return Err(ApiError(pixfarm_core::CoreError::not_found("job", job_id)));
        }
        Ok((id, rec))
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
        // The Farm methods have already resolved the tenant against the caller's token.
        let tenant = header
            .as_ref()
            .map(|h| h.tenant.clone())
            .filter(|t| !t.is_empty());
        let mut spec = convert::job_from_proto(header, items);
        if let Some(t) = tenant {
            spec.tenant = t;
        }
        if !errs.is_empty() {
            // Report the shape problems together with every other problem of the job.
            if let Err(more) = pixfarm_core::validate_job(&spec, &self.queue.config().limits) {
                errs.extend(more);
            }
            errs.sort_by_key(|e| e.index.map_or(0, |i| i + 1));
            return Err(ApiError::invalid(errs));
        }
        pixfarm_core::control_access::check_job(
            &spec,
            self.storage.tenant_root(&spec.tenant).as_deref(),
            &self.queue.config().fair.quotas,
        )?;
        self.check_control_workers(&spec).await?;
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
        ctx: &AuthContext,
        mut stream: Streaming<pb::SubmitJobChunk>,
    ) -> Result<pb::SubmitJobResponse, Status> {
        use pb::submit_job_chunk::Chunk;
        let max_items = self.queue.config().limits.max_items;
        let header = match stream.message().await.map_err(stream_error)? {
            Some(pb::SubmitJobChunk {
                chunk: Some(Chunk::Header(mut h)),
            }) => {
                h.tenant = ctx.submit_tenant(&h.tenant)?;
                h
            }
            Some(_) => {
                return Err(ApiError::field(
                    "header",
                    "the first message of SubmitJobStream must be the job header",
                )
                .into());
            }
            None => {
                return Err(
                    ApiError::field("header", "the stream ended before the job header").into(),
                );
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
                        )
                        .into());
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
                    )
                    .into());
                }
                None => {}
            }
        }
        tracing::Span::current().record("items", items.len());
        Ok(self.submit(Some(header), items, errs).await?)
    }

    #[instrument(skip(self, ctx), fields(job = %job_id))]
    async fn get(&self, ctx: &AuthContext, job_id: &str) -> Result<pb::Job, ApiError> {
        let (id, rec) = self.visible_job(ctx, job_id).await?;
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
    async fn list(
        &self,
        ctx: &AuthContext,
        req: pb::ListJobsRequest,
    ) -> Result<pb::ListJobsResponse, ApiError> {
        let state = pb::JobState::try_from(req.state)
            .map_err(|_| ApiError::field("state", format!("{} is not a job state", req.state)))?;
        let filter = JobFilter {
            // Admins list every tenant's jobs; everyone else only their own.
            tenant: (ctx.role != pixfarm_core::auth::Role::Admin).then(|| ctx.tenant.clone()),
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

    #[instrument(skip(self, ctx), fields(job = %job_id))]
    async fn cancel(
        &self,
        ctx: &AuthContext,
        job_id: &str,
    ) -> Result<pb::CancelJobResponse, ApiError> {
        let (id, _) = self.visible_job(ctx, job_id).await?;
        let rec = self.queue.cancel_job(&id).await?;
        info!(job = %id, "job canceled");
        // The cancelled job's manifest (what it did render), written now; if this fails the
        // manifest stays due and the sweep writes it.
        {
            let (queue, storage, id) = (self.queue.clone(), self.storage.clone(), id.clone());
            tokio::spawn(async move {
                if let Err(e) = queue.write_manifest(&id, &storage).await {
                    tracing::warn!(job = %id, error = %e, "manifest of the cancelled job not written yet; the sweep retries");
                }
            });
        }
        Ok(pb::CancelJobResponse {
            job: Some(convert::job_to_proto(rec, Vec::new())),
        })
    }

    #[instrument(skip_all, fields(job = %req.job_id))]
    async fn results(
        &self,
        ctx: &AuthContext,
        req: pb::ListResultsRequest,
    ) -> Result<pb::ListResultsResponse, ApiError> {
        let (id, _) = self.visible_job(ctx, &req.job_id).await?;
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
        let ctx = AuthContext::of(&request)?.clone();
        ctx.require(Action::Submit)?;
        let mut req = request.into_inner();
        let header = req.job.get_or_insert_with(Default::default);
        header.tenant = ctx.submit_tenant(&header.tenant)?;
        Ok(Response::new(self.submit_unary(req).await?))
    }

    async fn submit_job_stream(
        &self,
        request: Request<Streaming<pb::SubmitJobChunk>>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let ctx = AuthContext::of(&request)?.clone();
        ctx.require(Action::Submit)?;
        Ok(Response::new(
            self.submit_stream(&ctx, request.into_inner()).await?,
        ))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let ctx = AuthContext::of(&request)?.clone();
        ctx.require(Action::Read)?;
        Ok(Response::new(
            self.get(&ctx, &request.into_inner().job_id).await?,
        ))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let ctx = AuthContext::of(&request)?.clone();
        ctx.require(Action::Read)?;
        Ok(Response::new(self.list(&ctx, request.into_inner()).await?))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let ctx = AuthContext::of(&request)?.clone();
        ctx.require(Action::Read)?;
        let req = request.into_inner();
        // Fail fast with NOT_FOUND instead of an empty stream (also for another tenant's job).
        let (id, _) = self.visible_job(&ctx, &req.job_id).await?;
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
        let ctx = AuthContext::of(&request)?.clone();
        ctx.require(Action::Cancel)?;
        Ok(Response::new(
            self.cancel(&ctx, &request.into_inner().job_id).await?,
        ))
    }

    async fn list_results(
        &self,
        request: Request<pb::ListResultsRequest>,
    ) -> Result<Response<pb::ListResultsResponse>, Status> {
        let ctx = AuthContext::of(&request)?.clone();
        ctx.require(Action::Read)?;
        Ok(Response::new(
            self.results(&ctx, request.into_inner()).await?,
        ))
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        AuthContext::of(&request)?.require(Action::ListWorkers)?;
        Ok(Response::new(self.workers().await?))
    }
}
