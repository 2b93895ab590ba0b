//! What the farm's images show. The bundled trained model renders prompts it never saw through the
//! coordinator, Redis, a worker process and S3; the training crate's analyser (deterministic, ≥ 99 %
//! right on the dataset's own pictures) reads each stored PNG and the test asserts on prompt accuracy,
//! so a farm that stores the wrong image, mixes up seeds or prompts within a batch, or loads the model
//! wrongly fails here even though every PNG exists.

use std::time::Duration;

use anyhow::{Context, Result};
use pixart_train::dataset::Split;
use pixart_train::metrics::PromptAccuracy;
use pixfarm_e2e::{Farm, FarmOptions};
use pixfarm_proto::v1 as pb;

const PROMPTS: usize = 48;

/// Unseen prompts of the training world: the evaluation world of a run trained at seed 0 (the
/// bundled model's), minus every training caption, as `pixart-train eval` draws them.
fn unseen_prompts() -> Vec<pixart_train::dataset::Sample> {
    pixart_train::eval::unseen_prompts(
        0,
        pixart_train::teacher::TeacherConfig::default().dataset_size,
        Split::Train,
        PROMPTS,
    )
}

/// Renders `items` as one job on a fresh farm with the bundled model (one worker process, batches of 8)
/// and returns each result with the stored image, in index order.
async fn render(items: Vec<pb::Item>, prefix: &str) -> Result<Vec<(pb::Result, image::RgbImage)>> {
    let n = items.len() as u64;
    let mut farm = Farm::start(FarmOptions {
        max_batch: 8,
        model_dir: pixfarm_e2e::model_dir(),
        ..Default::default()
    })
    .await?;
    farm.spawn_worker("w1")?;
    let job = farm
        .submit(
            items,
            pb::JobSpec {
                output_prefix: prefix.into(),
                ..Default::default()
            },
        )
        .await?;
    let j = farm.wait(&job, Duration::from_secs(600)).await?;
    assert_eq!(
        (j.state(), j.done),
        (pb::JobState::Succeeded, n),
        "{j:?}\n{}",
        farm.worker_logs()
    );
    let mut out = Vec::new();
    for r in farm.results(&job).await? {
        let bytes = farm.storage.get(&r.key).await.context(r.key.clone())?;
        out.push((r, image::load_from_memory(&bytes)?.to_rgb8()));
    }
    out.sort_by_key(|(r, _)| r.index);
    farm.shutdown().await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trained_model_draws_what_unseen_prompts_ask() -> Result<()> {
    let samples = unseen_prompts();
    let items = samples
        .iter()
        .enumerate()
        .map(|(i, s)| pb::Item {
            prompt: s.caption.clone(),
            seed: Some(i as u64),
            width: Some(64),
            height: Some(64),
            steps: Some(4),
            ..Default::default()
        })
        .collect();
    let mut accuracy = PromptAccuracy::default();
    let mut lines = Vec::new();
    for (r, img) in render(items, "quality").await? {
        let s = &samples[r.index as usize];
        assert_eq!(r.prompt, s.caption, "result {} names its prompt", r.index);
        let read = pixart_train::analyse::analyse(&img).map(|a| a.attributes);
        accuracy.add(&s.scene.attributes, read.as_ref());
        lines.push(format!(
            "{:>2} {:?} → {}",
            r.index,
            s.caption,
            read.map_or_else(|| "nothing".to_string(), |a| a.to_string())
        ));
    }
    let report = format!("{accuracy}\n{}", lines.join("\n"));
    // What `pixart-train eval` measures for this model at 4 LCM steps on 200 prompts (BENCHMARKS.md,
    // "the bundled model") is position 98.0 %, size 93.5 %, shape 85.0 %, colour 76.5 %; through the
    // farm these 48 gave 97.9 / 91.7 / 89.6 / 83.3 % (all four 72.9 %). Position, colour and shape carry
    // the bounds (chance 20 %, 12.5 % and 25 %), with room for another CPU's rounding; size is printed
    // for whoever trains a better model.
    assert!(accuracy.position_rate() >= 0.80, "position\n{report}");
    assert!(accuracy.colour_rate() >= 0.65, "colour\n{report}");
    assert!(accuracy.shape_rate() >= 0.70, "shape\n{report}");
    println!("{report}");
    Ok(())
}

const GUIDED: usize = 24;

/// The adapter through the farm: prompts that name only the colours and the shape ("a red circle on a
/// blue background"), each rendered twice with the same seed, once with its scene's exact outline as an
/// inline `edge` control image and once without. Only the edge map says where the shape goes and how big
/// it is, so the guided images must follow it (edge F1, position) and the unguided ones cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trained_adapter_puts_shapes_where_the_edge_map_says() -> Result<()> {
    let samples: Vec<_> = unseen_prompts().into_iter().take(GUIDED).collect();
    let mut items = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let edges = pixart_train::adapter::control_image(s, 64, false)?;
        let mut png = Vec::new();
        edges.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
        for control in [
            Some(pb::Control {
                source: Some(pb::control::Source::Inline(png)),
                kind: "edge".into(),
                scale: Some(1.0),
                ..Default::default()
            }),
            None,
        ] {
            items.push(pb::Item {
                prompt: s.layout_free_caption(i),
                seed: Some(i as u64),
                width: Some(64),
                height: Some(64),
                steps: Some(4),
                control,
                ..Default::default()
            });
        }
    }
    // [guided, unguided]
    let mut accuracy = [PromptAccuracy::default(), PromptAccuracy::default()];
    let mut f1 = [0.0f64; 2];
    let mut lines = Vec::new();
    for (r, img) in render(items, "guided").await? {
        let (i, which) = (r.index as usize / 2, r.index as usize % 2);
        let s = &samples[i];
        assert_eq!(
            r.prompt,
            s.layout_free_caption(i),
            "result {} names its prompt",
            r.index
        );
        let read = pixart_train::analyse::analyse(&img).map(|a| a.attributes);
        accuracy[which].add(&s.scene.attributes, read.as_ref());
        let score = pixart_train::eval::edge_alignment(&img, s)?.f1;
        f1[which] += score;
        lines.push(format!(
            "{:>2} {} {:?} (scene: {}) → {}, F1 {score:.2}",
            r.index,
            ["guided  ", "unguided"][which],
            r.prompt,
            s.scene.attributes,
            read.map_or_else(|| "nothing".to_string(), |a| a.to_string())
        ));
    }
    let f1 = f1.map(|v| v / GUIDED as f64);
    let report = format!(
        "guided: {} · F1 {:.3}\nunguided: {} · F1 {:.3}\n{}",
        accuracy[0],
        f1[0],
        accuracy[1],
        f1[1],
        lines.join("\n")
    );
    // `pixart-train edges` on 50 such prompts measured F1 0.47 and position 98 % guided against F1 0.02
    // and position 12 % unguided (BENCHMARKS.md, "seventh run"); these 24 through the farm gave F1 0.430
    // and position 100 % guided, F1 0.038 and 20.8 % unguided. The bounds leave room for another CPU's
    // rounding.
    assert!(f1[0] >= 0.25, "guided edge F1\n{report}");
    assert!(f1[0] >= 3.0 * f1[1], "guided against unguided F1\n{report}");
    assert!(
        accuracy[0].position_rate() >= 0.75,
        "guided position\n{report}"
    );
    assert!(
        accuracy[0].position_rate() >= accuracy[1].position_rate() + 0.3,
        "the edge map, not chance, places the shape\n{report}"
    );
    println!("{report}");
    Ok(())
}
