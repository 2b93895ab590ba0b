//! The subcommands and their output.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use pixfarm_coordinator::CoordinatorConfig;
use pixfarm_proto::v1 as pb;
use pixfarm_worker::WorkerConfig;

use crate::client::{self, Client, state_name, status_error};
use crate::{dev, fetch, generate, input};

#[derive(Debug, Parser)]
#[command(
    name = "pixfarm",
    version,
    about = "Render farm for PixArt-LCM text-to-image: submit, watch and fetch jobs, run the farm"
)]
pub struct Cli {
    // Where the coordinator is and how to trust it. The token comes from
    // PIXFARM_TOKEN or the config file, never from a flag.
    #[command(flatten)]
    pub connect: crate::config::ConnectArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a job from a JSONL file (one item per line) or a text file (one prompt per line).
    Submit(SubmitArgs),
    /// Show a job: state, counts, errors.
    Status {
        job: String,
        /// Print the job as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stream a job's events until it finishes.
    Watch {
        job: String,
        /// Resume after this event id.
        #[arg(long, default_value = "")]
        after: String,
    },
    /// Cancel a job: queued images are dropped, running ones stop between steps.
    Cancel { job: String },
    /// List jobs, newest first.
    List {
        /// Only jobs in this state (queued, running, succeeded, partial, failed, canceled).
        #[arg(long)]
        state: Option<String>,
        /// Only jobs with this label (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// List a job's results (prompt, seed, key, sha256, URL, worker, timings).
    Results {
        job: String,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Download every image of a job, verifying sha256; re-running resumes.
    Fetch {
        job: String,
        #[arg(short, long)]
        output: PathBuf,
        /// Parallel downloads.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
    },
    /// List live workers.
    Workers,
    /// Run the coordinator.
    Coordinator(Box<CoordinatorArgs>),
    /// Run a render worker.
    Worker(Box<WorkerArgs>),
    /// Render one image locally, without a farm.
    Generate(Box<generate::GenerateArgs>),
    /// Run the whole farm on this machine and render a sample batch.
    Dev(Box<dev::DevArgs>),
    /// Convert the original PixArt-δ ControlNet `.pth` into an adapter directory for `--controlnet-dir`.
    ConvertControlnet(crate::convert::ConvertControlnetArgs),
}

#[derive(Debug, clap::Args)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub config: CoordinatorConfig,
}

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub config: WorkerConfig,
}

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// Input file (JSONL or plain text).
    pub file: PathBuf,
    /// Size of items that do not set one, as WxH.
    #[arg(long, value_parser = input::parse_size)]
    pub size: Option<(u32, u32)>,
    /// LCM steps of items that do not set them (1-8).
    #[arg(long)]
    pub steps: Option<u32>,
    /// Render each item without a seed once per seed: `7`, `1,2,5`, `0-9`.
    #[arg(long, value_parser = parse_seed_list)]
    pub seeds: Option<SeedList>,
    /// high, normal or low.
    #[arg(long, default_value = "normal")]
    pub priority: String,
    /// Resubmitting with the same key returns the first job instead of a new one.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Object-key prefix of the results.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// A label `key=value` (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Wait for the job to finish, with a progress bar.
    #[arg(long)]
    pub wait: bool,
    /// Folder that relative `control_image` / `control.path` entries resolve against (default: the
    /// input file's folder).
    #[arg(long)]
    pub control_dir: Option<PathBuf>,
    /// Control kind (`edge`, `canny`, `hed`) of lines whose control image names none.
    #[arg(long)]
    pub control_kind: Option<String>,
    /// ControlNet conditioning scale (0-2) of lines whose control image sets none.
    #[arg(long)]
    pub control_scale: Option<f32>,
}

/// A parsed `--seeds` value (a newtype, because clap reads `Option<Vec<_>>`
/// as "repeatable").
#[derive(Debug, Clone)]
pub struct SeedList(pub Vec<u64>);

fn parse_seed_list(s: &str) -> Result<SeedList, String> {
    input::parse_seeds(s).map(SeedList)
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label `{s}` is not key=value"))
}

fn parse_priority(s: &str) -> anyhow::Result<pb::Priority> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "high" => pb::Priority::High,
        "normal" => pb::Priority::Normal,
        "low" => pb::Priority::Low,
        other => bail!("unknown priority `{other}` (expected high, normal or low)"),
    })
}

fn parse_state(s: &str) -> anyhow::Result<pb::JobState> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "queued" => pb::JobState::Queued,
        "running" => pb::JobState::Running,
        "succeeded" => pb::JobState::Succeeded,
        "partial" => pb::JobState::Partial,
        "failed" => pb::JobState::Failed,
        "canceled" | "cancelled" => pb::JobState::Canceled,
        other => bail!("unknown job state `{other}`"),
    })
}

fn init_tracing(default: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs one command. Errors are meant to be printed with `{:#}`.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Coordinator(a) => {
            init_tracing("info");
            let listener = tokio::net::TcpListener::bind(a.config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", a.config.listen))?;
            pixfarm_coordinator::serve(a.config, listener, pixfarm_coordinator::shutdown_signal())
                .await
                .context("the coordinator stopped with an error")
        }
        Command::Worker(a) => {
            init_tracing("info");
            pixfarm_worker::run(a.config, pixfarm_coordinator::shutdown_signal())
                .await
                .context("the worker stopped with an error")
        }
        Command::Generate(a) => {
            init_tracing("warn");
            tokio::task::spawn_blocking(move || generate::run(*a)).await?
        }
        Command::Dev(a) => {
            init_tracing("warn");
            dev::run(*a).await
        }
        Command::ConvertControlnet(a) => {
            init_tracing("warn");
            tokio::task::spawn_blocking(move || crate::convert::run(a)).await?
        }
        other => {
            init_tracing("warn");
            let cfg = crate::config::resolve(&cli.connect, std::env::var("PIXFARM_TOKEN").ok())?;
            let mut c = client::connect_with(&cfg).await?;
            run_client(&mut c, other).await
        }
    }
}

async fn run_client(c: &mut Client, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Submit(a) => submit(c, a).await,
        Command::Status { job, json } => {
            let j = client::get_job(c, &job).await?;
            if json {
                println!("{}", job_json(&j));
            } else {
                print_job(&j);
            }
            Ok(())
        }
        Command::Watch { job, after } => watch(c, &job, after).await,
        Command::Cancel { job } => {
            let r = c
                .cancel_job(pb::CancelJobRequest {
                    job_id: job.clone(),
                })
                .await
                .map_err(|s| status_error(s, &format!("cannot cancel job {job}"), None))?
                .into_inner();
            let j = r.job.unwrap_or_default();
            println!(
                "job {} {}: {} done, {} failed, {} canceled of {}",
                j.id,
                state_name(j.state),
                j.done,
                j.failed,
                j.canceled,
                j.task_count
            );
            Ok(())
        }
        Command::List {
            state,
            labels,
            limit,
        } => {
            let state = state
                .as_deref()
                .map(parse_state)
                .transpose()?
                .unwrap_or(pb::JobState::Unspecified);
            let resp = c
                .list_jobs(pb::ListJobsRequest {
                    page_size: limit,
                    page_token: String::new(),
                    state: state as i32,
                    labels: labels.into_iter().collect(),
                })
                .await
                .map_err(|s| status_error(s, "cannot list jobs", None))?
                .into_inner();
            println!(
                "{:<36}  {:<9}  {:>8}  {:>8}  {:>6}  labels",
                "job", "state", "done", "images", "failed"
            );
            for j in resp.jobs {
                let labels: Vec<String> = j
                    .spec
                    .as_ref()
                    .map(|s| s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect())
                    .unwrap_or_default();
                println!(
                    "{:<36}  {:<9}  {:>8}  {:>8}  {:>6}  {}",
                    j.id,
                    state_name(j.state),
                    j.done,
                    j.task_count,
                    j.failed,
                    labels.join(",")
                );
            }
            Ok(())
        }
        Command::Results { job, json } => {
            let results = client::all_results(c, &job).await?;
            for r in results {
                if json {
                    println!("{}", result_json(&r));
                } else if r.succeeded {
                    println!(
                        "{:>6}  seed {:<20}  {}  {}  {}",
                        r.index, r.seed, r.sha256, r.key, r.prompt
                    );
                } else {
                    println!(
                        "{:>6}  FAILED after {} attempts: {}  ({})",
                        r.index, r.attempts, r.error, r.prompt
                    );
                }
            }
            Ok(())
        }
        Command::Fetch {
            job,
            output,
            parallel,
        } => {
            let results = client::all_results(c, &job).await?;
            let s = fetch::fetch_all(results, &output, parallel, true).await?;
            println!(
                "{}: {} downloaded, {} already present and verified, {} failed to render",
                output.display(),
                s.downloaded,
                s.skipped,
                s.not_rendered
            );
            Ok(())
        }
        Command::Workers => {
            let resp = c
                .list_workers(pb::ListWorkersRequest {})
                .await
                .map_err(|s| status_error(s, "cannot list workers", None))?
                .into_inner();
            if resp.workers.is_empty() {
                println!("no live workers");
            }
            let now = pixfarm_core::now_ms() as i64;
            for w in resp.workers {
                println!(
                    "{}  {}  {}  {}  batch {}  {:.2} img/s  {} done  heartbeat {:.1}s ago  lanes {}",
                    w.id,
                    w.host,
                    w.device,
                    w.state,
                    w.current_batch,
                    w.images_per_sec,
                    w.images_done,
                    (now - w.last_heartbeat_unix_ms) as f64 / 1000.0,
                    w.lanes.join(",")
                );
            }
            Ok(())
        }
        Command::Coordinator(_)
        | Command::Worker(_)
        | Command::Generate(_)
        | Command::Dev(_)
        | Command::ConvertControlnet(_) => {
            unreachable!("handled in run")
        }
    }
}

async fn submit(c: &mut Client, a: SubmitArgs) -> anyhow::Result<()> {
    let parsed = input::read_items_in(&a.file, a.control_dir.as_deref())?;
    let parsed = input::apply_overrides(
        parsed,
        &input::Overrides {
            size: a.size,
            steps: a.steps,
            seeds: a.seeds.map(|s| s.0),
            control_kind: a.control_kind,
            control_scale: a.control_scale,
        },
    );
    let spec = pb::JobSpec {
        priority: parse_priority(&a.priority)? as i32,
        idempotency_key: a.idempotency_key.unwrap_or_default(),
        output_prefix: a.prefix,
        labels: a.labels.into_iter().collect(),
        // The coordinator takes the tenant from the token.
        ..Default::default()
    };
    let resp = client::submit(c, spec, &parsed).await?;
    if resp.created {
        println!("job {} submitted: {} images", resp.job_id, resp.task_count);
    } else {
        println!(
            "job {} already submitted with this idempotency key: {} images",
            resp.job_id, resp.task_count
        );
    }
    if a.wait {
        let j = client::wait(c, &resp.job_id, false).await?;
        print_job(&j);
        if j.state != pb::JobState::Succeeded as i32 {
            bail!("job {} finished {}", j.id, state_name(j.state));
        }
    }
    Ok(())
}

async fn watch(c: &mut Client, job: &str, after: String) -> anyhow::Result<()> {
    let mut stream = c
        .watch_job(pb::WatchJobRequest {
            job_id: job.to_string(),
            after_event_id: after,
        })
        .await
        .map_err(|s| status_error(s, &format!("cannot watch job {job}"), None))?
        .into_inner();
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(|s| status_error(s, &format!("the watch of job {job} broke"), None))?;
        use pb::job_event::Kind;
        let text = match ev.kind {
            Some(Kind::Queued(q)) => format!("queued: {} images", q.task_count),
            Some(Kind::Started(s)) => format!("started on {}", s.worker),
            Some(Kind::Progress(p)) => {
                format!(
                    "step {}/{} of {} images on {}",
                    p.step,
                    p.total,
                    p.indices.len(),
                    p.worker
                )
            }
            Some(Kind::ItemDone(d)) => format!("image {} done: {} ({})", d.index, d.key, d.worker),
            Some(Kind::ItemFailed(f)) => format!(
                "image {} failed (attempt {}{}): {}",
                f.index,
                f.attempt,
                if f.will_retry {
                    ", will retry"
                } else {
                    ", final"
                },
                f.error
            ),
            Some(Kind::Finished(f)) => format!(
                "finished {}: {} done, {} failed, {} canceled of {}",
                state_name(f.state),
                f.done,
                f.failed,
                f.canceled,
                f.task_count
            ),
            None => "unknown event".into(),
        };
        println!("{}  {text}", ev.id);
    }
    Ok(())
}

fn print_job(j: &pb::Job) {
    println!("job       {}", j.id);
    println!("state     {}", state_name(j.state));
    println!(
        "images    {} total: {} done, {} failed, {} canceled, {} pending",
        j.task_count, j.done, j.failed, j.canceled, j.pending
    );
    if let Some(s) = &j.spec {
        if !s.output_prefix.is_empty() {
            println!("prefix    {}", s.output_prefix);
        }
        if !s.labels.is_empty() {
            let l: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("labels    {}", l.join(", "));
        }
    }
    if j.manifest_pending {
        println!("manifest  being written");
    } else if !j.manifest_key.is_empty() {
        println!("manifest  {}", j.manifest_key);
    }
    if !j.last_error.is_empty() {
        println!("last error {}", j.last_error);
    }
    for f in &j.failures {
        println!(
            "failed    image {} after {} attempts: {}",
            f.index, f.attempts, f.error
        );
    }
}

fn job_json(j: &pb::Job) -> serde_json::Value {
    serde_json::json!({
        "id": j.id, "state": state_name(j.state), "task_count": j.task_count, "done": j.done,
        "failed": j.failed, "canceled": j.canceled, "pending": j.pending,
        "created_unix_ms": j.created_unix_ms, "started_unix_ms": j.started_unix_ms,
        "finished_unix_ms": j.finished_unix_ms, "manifest_key": j.manifest_key, "manifest_pending": j.manifest_pending, "last_error": j.last_error,
        "failures": j.failures.iter().map(|f| serde_json::json!({"index": f.index, "error": f.error, "attempts": f.attempts})).collect::<Vec<_>>(),
        "labels": j.spec.as_ref().map(|s| s.labels.clone()).unwrap_or_default(),
    })
}

fn result_json(r: &pb::Result) -> serde_json::Value {
    let t = r.timings.unwrap_or_default();
    serde_json::json!({
        "index": r.index, "prompt": r.prompt, "seed": r.seed, "width": r.width, "height": r.height,
        "steps": r.steps, "key": r.key, "sha256": r.sha256, "url": r.url, "worker": r.worker,
        "succeeded": r.succeeded, "error": r.error, "attempts": r.attempts,
        "timings": {"queue_ms": t.queue_ms, "render_ms": t.render_ms, "encode_ms": t.encode_ms, "upload_ms": t.upload_ms},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_flags_parse() {
        let cli = Cli::try_parse_from([
            "pixfarm",
            "submit",
            "p.jsonl",
            "--size",
            "64x32",
            "--steps",
            "2",
            "--seeds",
            "1-3,9",
            "--priority",
            "high",
            "--label",
            "a=b",
            "--label",
            "c=d",
            "--wait",
        ])
        .unwrap();
        let Command::Submit(a) = cli.command else {
            panic!("not submit")
        };
        assert_eq!(a.size, Some((64, 32)));
        assert_eq!(a.seeds.unwrap().0, [1, 2, 3, 9]);
        assert_eq!(a.labels.len(), 2);
        assert!(a.wait);
        let e = Cli::try_parse_from(["pixfarm", "submit", "p", "--size", "big"]).unwrap_err();
        assert!(e.to_string().contains("not WIDTHxHEIGHT"), "{e}");
    }
}
