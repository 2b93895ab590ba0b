//! End-to-end tests of edge-guided rendering (issue 4): real redis-server, real s3s-fs, the
//! coordinator in-process, a worker process with the bundled model's trained ControlNet adapter
//! (`models/pixart-lcm-shapes/controlnet`), 64×64 images.

use std::time::Duration;

use anyhow::{Context, Result};
use image::RgbImage;
use pixfarm_e2e::{Farm, FarmOptions, violations};
use pixfarm_proto::v1 as pb;
use tonic::Code;

const LONG: Duration = Duration::from_secs(300);

fn png(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("PNG encoding");
    out
}

/// An edge map: a white rectangle outline and a diagonal on black.
fn edge_map(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let on_rect = (x == 12 || x == w - 13) && (12..h - 12).contains(&y)
            || (y == 12 || y == h - 13) && (12..w - 12).contains(&x);
        if on_rect || x == y {
            image::Rgb([255, 255, 255])
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

/// A "photo" for Canny: a gradient background with a bright disc and a dark block.
fn photo(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let (cx, cy) = (x as f32 - w as f32 * 0.35, y as f32 - h as f32 * 0.4);
        if cx * cx + cy * cy < (h as f32 * 0.25).powi(2) {
            image::Rgb([240, 220, 60])
        } else if x > w * 6 / 10 && y > h / 2 {
            image::Rgb([30, 20, 90])
        } else {
            image::Rgb([(x * 2) as u8, (y * 2) as u8, 128])
        }
    })
}

fn item(prompt: &str, seed: u64, control: Option<pb::Control>) -> pb::Item {
    pb::Item {
        prompt: prompt.into(),
        seed: Some(seed),
        width: Some(64),
        height: Some(64),
        steps: Some(2),
        control,
        ..Default::default()
    }
}

fn inline(bytes: Vec<u8>, kind: &str, scale: f32) -> pb::Control {
    pb::Control {
        source: Some(pb::control::Source::Inline(bytes)),
        kind: kind.into(),
        scale: Some(scale),
        ..Default::default()
    }
}

async fn image_at(farm: &Farm, key: &str) -> Result<RgbImage> {
    let bytes = farm
        .storage
        .get(key)
        .await
        .with_context(|| key.to_string())?;
    Ok(image::load_from_memory(&bytes)?.to_rgb8())
}

fn diff(a: &RgbImage, b: &RgbImage) -> (u8, f64) {
    let mut max = 0u8;
    let mut sum = 0u64;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += u64::from(d);
    }
    (max, sum as f64 / a.as_raw().len() as f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controlled_job_renders_and_stores_its_edge_maps() -> Result<()> {
    let mut farm = Farm::start(FarmOptions {
        model_dir: pixfarm_e2e::model_dir(),
        max_attempts: 2,
        ..Default::default()
    })
    .await?;
    farm.spawn_worker("w1")?;

    // A control image in the bucket, referenced by URI (any size: the worker fits it). It lies
    // under the tenant's own prefix: a tenant may only name objects it may read.
    farm.storage
        .put(
            "default/inputs/photo.png",
            png(&photo(96, 80)).into(),
            "image/png",
        )
        .await?;
    let prompt = "a house on a hill";
    let edges = png(&edge_map(64, 64));
    let items = vec![
        item(prompt, 5, None),
        item(prompt, 5, Some(inline(edges.clone(), "edge", 1.0))),
        item(prompt, 5, Some(inline(edges.clone(), "edge", 0.0))),
        item(
            prompt,
            5,
            Some(pb::Control {
                source: Some(pb::control::Source::Uri(format!(
                    "s3://{}/default/inputs/photo.png",
                    farm.bucket
                ))),
                kind: "canny".into(),
                scale: Some(0.5),
                low_threshold: Some(50.0),
                high_threshold: Some(150.0),
            }),
        ),
        // This worker has no HED weights: the item fails with that reason, the rest render.
        item(prompt, 5, Some(inline(edges.clone(), "hed", 1.0))),
    ];
    let job = farm
        .submit(
            items,
            pb::JobSpec {
                output_prefix: "ctl".into(),
                ..Default::default()
            },
        )
        .await?;
    let j = farm.wait(&job, LONG).await?;
    assert_eq!(
        j.state(),
        pb::JobState::Partial,
        "{j:?}\n{}",
        farm.worker_logs()
    );
    assert_eq!((j.done, j.failed), (4, 1));
    assert_eq!(j.failures[0].index, 4);
    assert!(
        j.failures[0].error.contains("HED weights"),
        "{}",
        j.failures[0].error
    );

    let results = farm.results(&job).await?;
    let by = |i: u64| results.iter().find(|r| r.index == i).expect("result");
    assert!(by(0).control_key.is_empty() && by(0).control_kind.is_empty());
    for i in 1..=3u64 {
        let r = by(i);
        assert!(r.succeeded, "{r:?}");
        let stem = r.key.strip_suffix(".png").expect("png key");
        assert_eq!(r.control_key, format!("{stem}.control.png"));
    }
    assert_eq!(
        (by(1).control_kind.as_str(), by(1).control_scale),
        ("edge", 1.0)
    );
    assert_eq!(
        (by(3).control_kind.as_str(), by(3).control_scale),
        ("canny", 0.5)
    );

    // The stored edge maps: an `edge` image is used as given (already 64×64); the Canny map of
    // the 96×80 photo is made at 64×64 and is binary.
    let e1 = image_at(&farm, &by(1).control_key).await?;
    assert_eq!(e1, edge_map(64, 64));
    let e3 = image_at(&farm, &by(3).control_key).await?;
    assert_eq!(e3.dimensions(), (64, 64));
    let white = e3.pixels().filter(|p| p.0 == [255, 255, 255]).count();
    assert!(
        e3.pixels()
            .all(|p| p.0 == [0, 0, 0] || p.0 == [255, 255, 255])
    );
    assert!(
        white > 20,
        "the photo's shapes give edges ({white} edge pixels)"
    );

    // Control changes the image; scale 0 gives the base model's image (same prompt and seed),
    // up to the ±1-level batch-rounding noted in ARCHITECTURE.md.
    let base = image_at(&farm, &by(0).key).await?;
    let guided = image_at(&farm, &by(1).key).await?;
    let zero = image_at(&farm, &by(2).key).await?;
    let (zmax, _) = diff(&base, &zero);
    assert!(
        zmax <= 2,
        "scale 0 differs from the base image by {zmax} levels"
    );
    let (_, gmean) = diff(&base, &guided);
    assert!(
        gmean > 2.0,
        "control barely changed the image (mean {gmean:.2} levels)"
    );

    // The manifest names each edge map and its parameters.
    let manifest = farm.storage.get(&j.manifest_key).await?;
    let lines: Vec<serde_json::Value> = String::from_utf8(manifest.to_vec())?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let line = |i: u64| {
        lines
            .iter()
            .find(|l| l["index"] == i)
            .expect("manifest line")
    };
    assert_eq!(line(3)["parameters"]["control_key"], by(3).control_key);
    assert_eq!(line(3)["parameters"]["control"]["kind"], "canny");
    assert_eq!(line(3)["parameters"]["control"]["low_threshold"], 50.0);
    assert!(line(0)["parameters"].get("control_key").is_none());

    let once = farm.check_exactly_once(&j).await?;
    assert_eq!((once.objects, once.manifest_lines), (4, Some(5)));
    farm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_control_input_is_refused_at_submit() -> Result<()> {
    let farm = Farm::start(FarmOptions::default()).await?;
    let mut c = farm.client().await?;
    let edges = png(&edge_map(64, 64));
    let mut truncated = edges.clone();
    truncated.truncate(40);
    let cases: Vec<(&str, pb::Control, &str)> = vec![
        (
            "scale",
            inline(edges.clone(), "edge", 2.5),
            "items[0].control.scale",
        ),
        (
            "kind",
            inline(edges.clone(), "sobel", 1.0),
            "items[0].control.kind",
        ),
        (
            "garbage",
            inline(b"not an image".to_vec(), "edge", 1.0),
            "items[0].control.image",
        ),
        (
            "truncated header",
            inline(truncated, "edge", 1.0),
            "items[0].control.image",
        ),
        (
            "tiny",
            inline(png(&RgbImage::new(8, 8)), "edge", 1.0),
            "items[0].control.image",
        ),
        (
            "oversized",
            inline(vec![0u8; 9 << 20], "edge", 1.0),
            "items[0].control.image",
        ),
        (
            "thresholds",
            pb::Control {
                low_threshold: Some(200.0),
                high_threshold: Some(100.0),
                ..inline(edges.clone(), "canny", 1.0)
            },
            "items[0].control.low_threshold",
        ),
        (
            "uri",
            pb::Control {
                source: Some(pb::control::Source::Uri("http://example.com/e.png".into())),
                ..Default::default()
            },
            "items[0].control.uri",
        ),
    ];
    for (name, control, field) in cases {
        let e = c
            .submit_job(pb::SubmitJobRequest {
                job: Some(pb::JobSpec::default()),
                items: vec![item("x", 1, Some(control))],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
        assert_eq!(violations(&e), [field], "{name}");
    }

    // Live workers, none with an adapter: a controlled job is refused, a plain one accepted.
    farm.queue
        .register_worker(&pixfarm_core::WorkerInfo {
            id: "base-only".into(),
            lanes: pixfarm_core::Lane::all_of(pixfarm_core::Variant::Base),
            last_heartbeat_ms: pixfarm_core::now_ms(),
            ..Default::default()
        })
        .await?;
    let e = c
        .submit_job(pb::SubmitJobRequest {
            job: Some(pb::JobSpec::default()),
            items: vec![
                item("plain", 1, None),
                item("guided", 1, Some(inline(edges, "edge", 1.0))),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("items[1].control") && e.message().contains("ControlNet adapter"),
        "{}",
        e.message()
    );
    let jobs = c
        .list_jobs(pb::ListJobsRequest::default())
        .await?
        .into_inner()
        .jobs;
    assert!(jobs.is_empty(), "nothing was created: {jobs:?}");
    farm.submit(vec![item("plain", 1, None)], pb::JobSpec::default())
        .await?;
    farm.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hed_edge_maps_are_computed_by_a_worker_with_hed_weights() -> Result<()> {
    // The narrow random-weight HED network of the pixart golden tests (real key layout).
    let hed = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../pixart/tests/fixtures/control/hed_narrow.safetensors"
    ));
    let mut farm = Farm::start(FarmOptions {
        model_dir: pixfarm_e2e::model_dir(),
        worker_env: vec![("PIXFARM_HED_WEIGHTS".into(), hed.display().to_string())],
        ..Default::default()
    })
    .await?;
    farm.spawn_worker("w-hed")?;
    let job = farm
        .submit(
            vec![
                item("a bird", 1, Some(inline(png(&photo(80, 96)), "hed", 1.0))),
                item("a boat", 2, Some(inline(png(&photo(64, 64)), "hed", 0.7))),
            ],
            pb::JobSpec::default(),
        )
        .await?;
    let j = farm.wait(&job, LONG).await?;
    assert_eq!(
        j.state(),
        pb::JobState::Succeeded,
        "{j:?}\n{}",
        farm.worker_logs()
    );
    for r in farm.results(&job).await? {
        assert_eq!(r.control_kind, "hed");
        let e = image_at(&farm, &r.control_key).await?;
        assert_eq!(e.dimensions(), (64, 64));
        // One edge channel repeated three times, and not flat.
        assert!(e.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
        let (lo, hi) = e
            .pixels()
            .fold((255u8, 0u8), |(lo, hi), p| (lo.min(p.0[0]), hi.max(p.0[0])));
        assert!(hi > lo, "a flat HED map");
    }
    let once = farm.check_exactly_once(&j).await?;
    assert_eq!(once.objects, 2);
    farm.shutdown().await
}

/// Hole 9, the worker's own check: a task naming another tenant's render reaches Redis without
/// the coordinator (written straight into the queue here), and the worker still refuses to read
/// it: the task fails for good with the reason, and no copy of the other tenant's image appears
/// under this tenant's results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_control_images_of_another_tenant() -> Result<()> {
    use pixfarm_core::{ControlKind, ControlSource, ControlSpec, ItemSpec, JobSpec};
    let mut farm = Farm::start(FarmOptions {
        model_dir: pixfarm_e2e::model_dir(),
        max_attempts: 3,
        ..Default::default()
    })
    .await?;
    farm.spawn_worker("w1")?;
    // Tenant B's render, which tenant A must not be able to copy.
    let secret = png(&photo(64, 64));
    farm.storage
        .put("team-b/job/000000.png", secret.into(), "image/png")
        .await?;
    let mut spec = JobSpec::new(vec![ItemSpec::new("a house", 64, 64).with_control(
        ControlSpec {
            source: ControlSource::Uri(format!("s3://{}/team-b/job/000000.png", farm.bucket)),
            kind: ControlKind::Edge,
            scale: 1.0,
            low_threshold: None,
            high_threshold: None,
        },
    )]);
    spec.tenant = "team-a".into();
    let job = farm.queue.submit(spec).await?.job;
    let j = farm.wait(job.as_str(), LONG).await?;
    assert_eq!(j.state(), pb::JobState::Failed, "{j:?}");
    assert_eq!(j.failures.len(), 1);
    assert_eq!(j.failures[0].attempts, 1, "refused for good, not retried");
    assert!(
        j.failures[0]
            .error
            .contains("outside what this tenant may read"),
        "{}",
        j.failures[0].error
    );
    let copied = farm.s3_keys("team-a/").await?;
    assert!(
        copied.iter().all(|k| !k.ends_with(".png")),
        "nothing of team-b's was stored as team-a's: {copied:?}"
    );
    farm.shutdown().await
}
