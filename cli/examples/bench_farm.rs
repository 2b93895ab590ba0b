//! Farm overhead benchmark (issue 3): N tasks (default 10,000) through one
//! coordinator and two workers with the tiny checkpoint, on this machine.
//!
//! Measures: submit throughput (tasks/s through `SubmitJobStream`), wall time
//! per task beyond model time, submit-to-pickup latency p50/p99 with idle
//! workers, Redis commands per task (`INFO commandstats` delta), and
//! `redis-benchmark` figures from the same Redis in the same run.
//!
//! ```text
//! cargo run --release -p pixfarm --example bench_farm -- --tasks 10000 --write BENCHMARKS.md
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use pixfarm::client;
use pixfarm_coordinator::CoordinatorConfig;
use pixfarm_proto::v1 as pb;
use pixfarm_worker::WorkerConfig;
use tokio::sync::watch;

#[derive(Parser)]
struct Args {
    /// Tasks in the throughput run.
    #[arg(long, default_value_t = 10_000)]
    tasks: usize,
    /// Single-task jobs submitted one by one to idle workers (pickup latency).
    #[arg(long, default_value_t = 200)]
    probes: usize,
    /// Image side in pixels (the tiny checkpoint's minimum keeps model time small).
    #[arg(long, default_value_t = 16)]
    size: u32,
    #[arg(long, default_value_t = 1)]
    steps: u32,
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    #[arg(long, default_value = "models/tiny-pixart-lcm")]
    model: PathBuf,
    /// Replace the farm section of this markdown file with the results.
    #[arg(long)]
    write: Option<PathBuf>,
}

async fn commandstats(c: &mut redis::aio::MultiplexedConnection) -> Result<BTreeMap<String, u64>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await?;
    let mut out = BTreeMap::new();
    for line in info.lines() {
        // cmdstat_xadd:calls=10,usec=...
        if let Some(rest) = line.strip_prefix("cmdstat_")
            && let Some((name, stats)) = rest.split_once(':')
            && let Some(calls) = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))
        {
            out.insert(name.to_string(), calls.parse()?);
        }
    }
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut redis_child = tokio::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start redis-server")?;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let redis_url = format!("redis://127.0.0.1:{port}/");
    let storage_url = format!("file://{}", tmp.path().display());
    let mut rc = redis::Client::open(redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut cconf = CoordinatorConfig::new(&redis_url, &storage_url);
    cconf.default_size = (args.size, args.size);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let coord = tokio::spawn(pixfarm_coordinator::serve(
        cconf,
        listener,
        stopped(stop_rx.clone()),
    ));
    let mut workers = Vec::new();
    for i in 0..2 {
        let wc = WorkerConfig {
            redis_url: redis_url.clone(),
            storage_url: storage_url.clone(),
            model_dir: args.model.clone(),
            max_batch: args.max_batch,
            worker_id: Some(format!("bench-{i}")),
            poll_ms: 1000,
            ..WorkerConfig::default()
        };
        workers.push(tokio::spawn(pixfarm_worker::run(
            wc,
            stopped(stop_rx.clone()),
        )));
    }
    let mut c = client::connect(&addr).await?;
    // Wait for both workers to load the model and register.
    let t0 = Instant::now();
    loop {
        let w = c
            .list_workers(pb::ListWorkersRequest {})
            .await?
            .into_inner()
            .workers;
        if w.len() == 2 && w.iter().all(|w| w.state == "idle") {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("workers did not become idle: {w:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let item = |i: usize| pb::Item {
        prompt: format!("benchmark image {i}"),
        seed: Some(i as u64),
        width: Some(args.size),
        height: Some(args.size),
        steps: Some(args.steps),
        ..Default::default()
    };

    // 1. Pickup latency with idle workers: one single-image job at a time.
    let mut pickup = Vec::new();
    for i in 0..args.probes {
        let r = c
            .submit_job(pb::SubmitJobRequest {
                job: Some(pb::JobSpec::default()),
                items: vec![item(i)],
            })
            .await?
            .into_inner();
        loop {
            let j = client::get_job(&mut c, &r.job_id).await?;
            if client::is_terminal(j.state) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let res = client::all_results(&mut c, &r.job_id).await?;
        pickup.extend(
            res.iter()
                .filter_map(|r| r.timings.as_ref().map(|t| t.queue_ms)),
        );
        // Let both workers return to their blocking read.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pickup.sort_by(|a, b| a.total_cmp(b));

    // 2. Throughput: N tasks in one streamed job.
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut rc)
        .await?;
    let before = commandstats(&mut rc).await?;
    let items: Vec<pb::Item> = (0..args.tasks).map(item).collect();
    let parsed = pixfarm::input::Parsed {
        file: "bench".into(),
        lines: (1..=items.len()).collect(),
        items,
    };
    let t_submit = Instant::now();
    let r = client::submit(&mut c, pb::JobSpec::default(), &parsed).await?;
    let submit_s = t_submit.elapsed().as_secs_f64();
    let job = loop {
        let j = client::get_job(&mut c, &r.job_id).await?;
        if client::is_terminal(j.state) {
            break j;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let total_s = t_submit.elapsed().as_secs_f64();
    let after = commandstats(&mut rc).await?;
    let results = client::all_results(&mut c, &r.job_id).await?;
    if job.done as usize != args.tasks {
        bail!(
            "job finished {} with {} of {} done",
            client::state_name(job.state),
            job.done,
            args.tasks
        );
    }
    let render_ms: f64 = results
        .iter()
        .filter_map(|r| r.timings.as_ref())
        .map(|t| t.render_ms)
        .sum();
    let encode_ms: f64 = results
        .iter()
        .filter_map(|r| r.timings.as_ref())
        .map(|t| t.encode_ms)
        .sum();
    let upload_ms: f64 = results
        .iter()
        .filter_map(|r| r.timings.as_ref())
        .map(|t| t.upload_ms)
        .sum();
    let n = args.tasks as f64;
    // Two workers run in parallel: worker-time per task minus model time.
    let worker_ms_per_task = total_s * 1000.0 * 2.0 / n;
    let model_ms_per_task = render_ms / n;
    let overhead = worker_ms_per_task - model_ms_per_task;
    let mut calls: BTreeMap<String, u64> = BTreeMap::new();
    for (k, v) in &after {
        let d = v - before.get(k).copied().unwrap_or(0);
        if d > 0 {
            calls.insert(k.clone(), d);
        }
    }
    // The two INFO calls of the measurement itself are not the farm's.
    if let Some(i) = calls.get_mut("info") {
        *i = i.saturating_sub(1);
    }
    let total_calls: u64 = calls.values().sum();

    let _ = stop_tx.send(true);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(30), w).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), coord).await;

    let rb = tokio::process::Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "-n",
            "100000",
            "-t",
            "ping,set,get,xadd",
        ])
        .output()
        .await
        .context("cannot run redis-benchmark")?;
    let rb_text = String::from_utf8_lossy(&rb.stdout)
        .split('\r')
        .filter_map(|s| {
            s.lines()
                .find(|l| l.contains("requests per second"))
                .map(str::to_string)
        })
        .collect::<Vec<_>>()
        .join("\n");
    let _ = redis_child.kill().await;

    let top: Vec<String> = {
        let mut v: Vec<_> = calls.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        v.iter()
            .take(8)
            .map(|(k, c)| format!("{k} {:.2}", **c as f64 / n))
            .collect()
    };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    // Dev builds optimise dependencies (opt-level 3) but not the workspace crates.
    let (profile, flag) = if cfg!(debug_assertions) {
        (
            "dev profile (dependencies at opt-level 3, pixfarm crates unoptimised)",
            "",
        )
    } else {
        ("release profile", "--release ")
    };
    let method = if args.tasks > client::STREAM_THRESHOLD {
        "SubmitJobStream"
    } else {
        "SubmitJob"
    };
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let md = format!(
        "## Farm overhead (`cli/examples/bench_farm.rs`)\n\n\
         Measured {date} on this build machine. \
         {tasks} tasks of {size}×{size}, {steps} step(s), tiny checkpoint, one coordinator + two in-process workers \
         (max batch {mb}), Redis on localhost, `file://` store, {cpus} CPU cores shared by everything, {profile}. \
         Command: `cargo run {flag}-p pixfarm --example bench_farm -- --tasks {tasks}`.\n\n\
         | measure | value | goal |\n|---|---|---|\n\
         | submit throughput ({method}, {tasks} tasks) | {sub:.0} tasks/s ({submit_s:.2} s) | ≥ 1,000 tasks/s |\n\
         | submit → all done | {total_s:.1} s ({tput:.0} images/s) | |\n\
         | worker time per task (2 workers × wall / tasks) | {wpt:.2} ms | |\n\
         | model time per task (render, batched) | {mpt:.2} ms | |\n\
         | overhead per task beyond model time | {overhead:.2} ms | < 2 ms |\n\
         | PNG encode / store write per task (overlap the next batch's render) | {enc:.2} ms / {upl:.2} ms | |\n\
         | submit → pickup, idle workers ({probes} probes) | p50 {p50:.1} ms, p99 {p99:.1} ms | p99 < 50 ms |\n\
         | Redis commands per task | {cpt:.2} | |\n\n\
         Overhead per task = 2 workers × wall time / tasks − mean model (render) time per task; PNG encoding and \
         uploads run beside the next batch's render on the same cores, so they show up only through contention. \
         Pickup latency is the worker-recorded `queue_ms` (submit to XREADGROUP delivery).\n\n\
         Top commands per task: {top}.\n\n\
         `redis-benchmark -q -n 100000 -t ping,set,get` (50 clients, no pipelining) on the same server, same run:\n\n```text\n{rb}\n```\n",
        tasks = args.tasks,
        size = args.size,
        steps = args.steps,
        mb = args.max_batch,
        sub = n / submit_s,
        tput = n / total_s,
        wpt = worker_ms_per_task,
        mpt = model_ms_per_task,
        enc = encode_ms / n,
        upl = upload_ms / n,
        probes = pickup.len(),
        p50 = percentile(&pickup, 0.5),
        p99 = percentile(&pickup, 0.99),
        cpt = total_calls as f64 / n,
        top = top.join(", "),
        rb = rb_text.trim(),
    );
    println!("{md}");
    if let Some(path) = args.write {
        const START: &str = "<!-- farm-bench:start -->";
        const END: &str = "<!-- farm-bench:end -->";
        let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
        let section = format!("{START}\n{md}{END}");
        let new = match (old.find(START), old.find(END)) {
            (Some(a), Some(b)) if b > a => {
                format!("{}{section}{}", &old[..a], &old[b + END.len()..])
            }
            _ => format!("{}\n\n{section}\n", old.trim_end()),
        };
        std::fs::write(&path, new)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
