//! The analyser reads the dataset's own pictures right (≥ 99 % per attribute) — clean, and under the
//! imperfections a model's renders have (a 3×3 blur, Gaussian noise of σ = 10/255, both) — so that it
//! measures a model and not itself. Run with `--nocapture` for the figures.

use pixart_train::analyse::{analyse, perturb};
use pixart_train::dataset::{DatasetConfig, Split};
use pixart_train::metrics::PromptAccuracy;
use pixart_train::scene::Scene;

const N_TRAIN: u64 = 600;
const N_HELD_OUT: u64 = 200;

fn score(
    config: &DatasetConfig,
    n_train: u64,
    n_held: u64,
    f: impl Fn(&Scene, u64) -> image::RgbImage,
) -> PromptAccuracy {
    let mut acc = PromptAccuracy::default();
    let samples = config
        .samples(Split::Train, n_train)
        .into_iter()
        .chain(config.samples(Split::HeldOut, n_held));
    for (i, s) in samples.enumerate() {
        let img = f(&s.scene, i as u64);
        let read = analyse(&img);
        acc.add(&s.scene.attributes, read.as_ref().map(|a| &a.attributes));
    }
    acc
}

fn assert_at_least(name: &str, acc: &PromptAccuracy, bound: f64) {
    println!("{name}: {acc}");
    for (attr, rate) in [
        ("colour", acc.colour_rate()),
        ("shape", acc.shape_rate()),
        ("size", acc.size_rate()),
        ("position", acc.position_rate()),
    ] {
        assert!(
            rate >= bound,
            "{name}: {attr} {:.2}% < {:.0}%",
            100.0 * rate,
            100.0 * bound
        );
    }
}

#[test]
fn clean_dataset_images() {
    let config = DatasetConfig {
        seed: 11,
        ..Default::default()
    };
    let side = config.image_size;
    let acc = score(&config, N_TRAIN, N_HELD_OUT, |s, _| s.render(side));
    assert_at_least("clean 64 px", &acc, 0.99);
    assert_eq!(acc.total, 800);
}

#[test]
fn larger_images() {
    let config = DatasetConfig {
        seed: 12,
        image_size: 128,
        ..Default::default()
    };
    let side = config.image_size;
    let acc = score(&config, 150, 50, |s, _| s.render(side));
    assert_at_least("clean 128 px", &acc, 0.99);
}

#[test]
fn blurred_and_noisy_images() {
    let config = DatasetConfig {
        seed: 13,
        ..Default::default()
    };
    let side = config.image_size;
    let blur = score(&config, N_TRAIN, N_HELD_OUT, |s, _| {
        perturb::box_blur(&s.render(side))
    });
    assert_at_least("3x3 blur", &blur, 0.99);
    let noise = score(&config, N_TRAIN, N_HELD_OUT, |s, i| {
        perturb::gaussian_noise(&s.render(side), 10.0, i)
    });
    assert_at_least("noise sigma 10/255", &noise, 0.99);
    let both = score(&config, N_TRAIN, N_HELD_OUT, |s, i| {
        perturb::gaussian_noise(&perturb::box_blur(&s.render(side)), 10.0, i)
    });
    assert_at_least("blur + noise", &both, 0.99);
}

/// Twice the 3×3 blur (a 5×5 tent, about the softness of the trained VAE's reconstructions): the
/// edges of a small shape are a ring of mixed colours as wide as its inside.
#[test]
fn strongly_blurred_images() {
    let config = DatasetConfig {
        seed: 14,
        ..Default::default()
    };
    let side = config.image_size;
    let acc = score(&config, N_TRAIN, N_HELD_OUT, |s, i| {
        perturb::gaussian_noise(
            &perturb::box_blur(&perturb::box_blur(&s.render(side))),
            10.0,
            i,
        )
    });
    assert_at_least("5x5 tent blur + noise", &acc, 0.97);
}
