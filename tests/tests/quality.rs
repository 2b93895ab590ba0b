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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trained_model_draws_what_unseen_prompts_ask() -> Result<()> {
    let samples = unseen_prompts();
    let mut farm = Farm::start(FarmOptions {
        max_batch: 8,
        model_dir: pixfarm_e2e::model_dir(),
        ..Default::default()
    })
    .await?;
    farm.spawn_worker("w1")?;
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
    let job = farm
        .submit(
            items,
            pb::JobSpec {
                output_prefix: "quality".into(),
                ..Default::default()
            },
        )
        .await?;
    let j = farm.wait(&job, Duration::from_secs(600)).await?;
    assert_eq!(
        (j.state(), j.done),
        (pb::JobState::Succeeded, PROMPTS as u64),
        "{j:?}\n{}",
        farm.worker_logs()
    );
    let mut accuracy = PromptAccuracy::default();
    let mut lines = Vec::new();
    for r in farm.results(&job).await? {
        let s = &samples[r.index as usize];
        assert_eq!(r.prompt, s.caption, "result {} names its prompt", r.index);
        let bytes = farm.storage.get(&r.key).await.context(r.key.clone())?;
        let img = image::load_from_memory(&bytes)?.to_rgb8();
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
    farm.shutdown().await
}
