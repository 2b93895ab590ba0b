//! Export and read back a dataset; a missing or corrupt dataset fails with an error naming the file (and
//! the line) at fault.

use std::fs;
use std::path::Path;

use pixart_train::analyse::analyse;
use pixart_train::caption;
use pixart_train::dataset::{Dataset, DatasetConfig, HELD_OUT, Split, export};

fn exported(dir: &Path, split: Split, count: u64) -> DatasetConfig {
    let config = DatasetConfig {
        seed: 5,
        ..Default::default()
    };
    export(dir, &config, split, count).unwrap();
    config
}

fn open_err(dir: &Path) -> String {
    Dataset::open(dir)
        .expect_err("the dataset should be rejected")
        .to_string()
}

#[test]
fn export_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let config = exported(tmp.path(), Split::Train, 12);
    let ds = Dataset::open(tmp.path()).unwrap();
    assert_eq!(ds.len(), 12);
    assert_eq!(ds.manifest.held_out, HELD_OUT.to_vec());
    for (i, r) in ds.records.iter().enumerate() {
        let sample = config.sample(Split::Train, i as u64);
        assert_eq!(r.scene(), sample.scene);
        assert_eq!(r.caption, sample.caption);
        let (img, edges) = ds.load(i).unwrap();
        assert_eq!(img, sample.scene.render(64), "PNG round trip is lossless");
        assert_eq!(edges, sample.scene.edges(64));
        assert_eq!(analyse(&img).unwrap().attributes, r.attributes());
        assert_eq!(
            caption::parse(&r.caption),
            Some((r.attributes(), r.background))
        );
    }
    // Held-out split: only the held-out combinations.
    let held = tmp.path().join("held");
    exported(&held, Split::HeldOut, 6);
    let ds = Dataset::open(&held).unwrap();
    assert!(
        ds.records
            .iter()
            .all(|r| HELD_OUT.contains(&(r.colour, r.shape)))
    );
}

#[test]
fn missing_dataset_or_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let nowhere = tmp.path().join("nowhere");
    let e = open_err(&nowhere);
    assert!(
        e.contains("nowhere") && e.contains("not a directory"),
        "{e}"
    );
    let e = open_err(tmp.path());
    assert!(e.contains("manifest.json") && e.contains("missing"), "{e}");
}

#[test]
fn corrupt_manifest_and_jsonl_name_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    exported(tmp.path(), Split::Train, 5);
    let jsonl = tmp.path().join("samples.jsonl");
    let good = fs::read_to_string(&jsonl).unwrap();
    let lines: Vec<&str> = good.lines().collect();

    // Not JSON on line 3.
    let mut bad = lines.clone();
    bad[2] = "{\"index\": 2, ";
    fs::write(&jsonl, bad.join("\n")).unwrap();
    let e = open_err(tmp.path());
    assert!(e.contains("samples.jsonl:3"), "{e}");

    // A caption that does not describe its record, on line 2.
    let mut bad = lines.clone();
    let swapped = bad[1].replace(
        "\"caption\":\"",
        "\"caption\":\"a large white square in the centre on a black background; ",
    );
    bad[1] = &swapped;
    fs::write(&jsonl, bad.join("\n")).unwrap();
    let e = open_err(tmp.path());
    assert!(
        e.contains("samples.jsonl:2") && e.contains("caption"),
        "{e}"
    );

    // Fewer records than the manifest promises.
    fs::write(&jsonl, lines[..4].join("\n")).unwrap();
    let e = open_err(tmp.path());
    assert!(
        e.contains("samples.jsonl") && e.contains("count = 5"),
        "{e}"
    );
    fs::write(&jsonl, &good).unwrap();

    // A missing image, named with the line that references it.
    let first_image = tmp.path().join("images/000000.png");
    fs::remove_file(&first_image).unwrap();
    let e = open_err(tmp.path());
    assert!(
        e.contains("samples.jsonl:1") && e.contains("images/000000.png"),
        "{e}"
    );
    exported(tmp.path(), Split::Train, 5);

    // A corrupt PNG is reported by load, naming the file.
    fs::write(tmp.path().join("edges/000003.png"), b"not a png").unwrap();
    let ds = Dataset::open(tmp.path()).unwrap();
    let e = ds.load(3).unwrap_err().to_string();
    assert!(e.contains("edges/000003.png") && e.contains("PNG"), "{e}");
    // A PNG of the wrong size.
    image::RgbImage::new(32, 32)
        .save(tmp.path().join("images/000001.png"))
        .unwrap();
    let e = ds.load(1).unwrap_err().to_string();
    assert!(
        e.contains("images/000001.png") && e.contains("32×32"),
        "{e}"
    );

    // A manifest that does not parse, and one from another format.
    let manifest = tmp.path().join("manifest.json");
    let text = fs::read_to_string(&manifest).unwrap();
    fs::write(&manifest, text.replace("\"seed\"", "\"sed\"")).unwrap();
    let e = open_err(tmp.path());
    assert!(e.contains("manifest.json") && e.contains("sed"), "{e}");
    fs::write(
        &manifest,
        text.replace("pixart-train-shapes", "something-else"),
    )
    .unwrap();
    let e = open_err(tmp.path());
    assert!(
        e.contains("manifest.json") && e.contains("something-else"),
        "{e}"
    );
}

#[test]
fn a_held_out_combination_in_the_training_split_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    exported(tmp.path(), Split::HeldOut, 3);
    let manifest = tmp.path().join("manifest.json");
    let text = fs::read_to_string(&manifest).unwrap();
    fs::write(&manifest, text.replace("\"held-out\"", "\"train\"")).unwrap();
    let e = open_err(tmp.path());
    assert!(
        e.contains("samples.jsonl:1") && e.contains("held-out combination"),
        "{e}"
    );
}
