//! Load test at the real PixArt-LCM-XL-2-1024-MS size without its 2.4 GB of weights: every tensor name and
//! shape of the Hub checkpoint (spec §2.8, written out here independently of the loader) is served as a
//! broadcast zero, so nothing is allocated.

use std::collections::HashMap;

use candle_core::{DType, Device};
use pixart::config::TransformerConfig;
use pixart::transformer::PixArtTransformer;
use pixart::weights::Weights;

const REAL_PARAMS: usize = 611_349_152;

/// The diffusers key list of PixArt-(LCM-)XL-2-1024-MS, from spec §2.8.
fn real_checkpoint_shapes() -> HashMap<String, Vec<usize>> {
    let d = 1152;
    let mut m: HashMap<String, Vec<usize>> = HashMap::new();
    let mut lin = |name: &str, out: usize, inp: usize| {
        m.insert(format!("{name}.weight"), vec![out, inp]);
        m.insert(format!("{name}.bias"), vec![out]);
    };
    lin("adaln_single.emb.timestep_embedder.linear_1", d, 256);
    lin("adaln_single.emb.timestep_embedder.linear_2", d, d);
    for e in ["resolution_embedder", "aspect_ratio_embedder"] {
        lin(&format!("adaln_single.emb.{e}.linear_1"), 384, 256);
        lin(&format!("adaln_single.emb.{e}.linear_2"), 384, 384);
    }
    lin("adaln_single.linear", 6 * d, d);
    lin("caption_projection.linear_1", d, 4096);
    lin("caption_projection.linear_2", d, d);
    for i in 0..28 {
        let b = format!("transformer_blocks.{i}");
        for a in ["attn1", "attn2"] {
            for p in ["to_q", "to_k", "to_v", "to_out.0"] {
                lin(&format!("{b}.{a}.{p}"), d, d);
            }
        }
        lin(&format!("{b}.ff.net.0.proj"), 4 * d, d);
        lin(&format!("{b}.ff.net.2"), d, 4 * d);
    }
    lin("proj_out", 32, d);
    m.insert("pos_embed.proj.weight".into(), vec![d, 4, 2, 2]);
    m.insert("pos_embed.proj.bias".into(), vec![d]);
    m.insert("scale_shift_table".into(), vec![2, d]);
    for i in 0..28 {
        m.insert(
            format!("transformer_blocks.{i}.scale_shift_table"),
            vec![6, d],
        );
    }
    m
}

fn build(
    shapes: HashMap<String, Vec<usize>>,
    cfg: TransformerConfig,
) -> pixart::Result<PixArtTransformer> {
    PixArtTransformer::new(cfg, &Weights::from_shapes(shapes, DType::F32, &Device::Cpu))
}

#[test]
fn real_checkpoint_loads_and_counts_611m_parameters() {
    let shapes = real_checkpoint_shapes();
    let total: usize = shapes.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(total, REAL_PARAMS, "the spec's key list itself");
    let m =
        build(shapes, TransformerConfig::xl_2_1024_ms()).expect("loader accepts the real key list");
    assert_eq!(m.num_parameters(), REAL_PARAMS);
    assert_eq!(m.transformer_blocks.len(), 28);
}

#[test]
fn extra_null_caption_is_tolerated() {
    let mut shapes = real_checkpoint_shapes();
    shapes.insert("caption_projection.y_embedding".into(), vec![120, 4096]);
    let m = build(shapes, TransformerConfig::xl_2_1024_ms()).unwrap();
    assert_eq!(
        m.num_parameters(),
        REAL_PARAMS,
        "y_embedding is not a model parameter"
    );
}

#[test]
fn missing_tensor_is_named() {
    let mut shapes = real_checkpoint_shapes();
    shapes.remove("transformer_blocks.13.attn2.to_k.weight");
    let e = build(shapes, TransformerConfig::xl_2_1024_ms())
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        e.contains("transformer_blocks.13.attn2.to_k.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn misshaped_tensor_is_named() {
    let mut shapes = real_checkpoint_shapes();
    shapes.insert(
        "transformer_blocks.27.ff.net.2.weight".into(),
        vec![1152, 4607],
    );
    let e = build(shapes, TransformerConfig::xl_2_1024_ms())
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        e.contains("transformer_blocks.27.ff.net.2.weight") && e.contains("4607"),
        "{e}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let mut shapes = real_checkpoint_shapes();
    shapes.insert(
        "transformer_blocks.28.attn1.to_q.weight".into(),
        vec![1152, 1152],
    );
    let e = build(shapes, TransformerConfig::xl_2_1024_ms())
        .err()
        .expect("must fail")
        .to_string();
    assert!(e.contains("transformer_blocks.28.attn1.to_q.weight"), "{e}");
    // The 1024 checkpoint with a 512-class config: the size embedders are left over.
    let e = build(real_checkpoint_shapes(), TransformerConfig::xl_2_512())
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        e.contains("resolution_embedder") || e.contains("aspect_ratio_embedder"),
        "{e}"
    );
}
