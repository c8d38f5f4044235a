//! Parity of the Rust Gemma 4 vision tower (and its projection into the text model) with mlx-vlm on a
//! random-weight tower: scripts/fixtures/gen_vision.py builds it with mlx-vlm's own classes and records the
//! soft tokens mlx-vlm computes for fixed images.

use std::path::PathBuf;

use jemma_engine::EngineError;
use jemma_engine::models::gemma4::vision::{VisionTower, load_tower};
use jemma_engine::models::gemma4::{self, Placed};
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{Array, Dtype};

fn fixture() -> PathBuf {
    fixture_named("vision")
}

fn fixture_named(name: &str) -> PathBuf {
    let root = std::env::var("JEMMA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"));
    let dir = root.join(name);
    assert!(
        dir.join("reference.safetensors").exists(),
        "fixture {} missing: run scripts/fixtures.sh",
        dir.display()
    );
    dir
}

fn max_abs_diff(a: &Array, b: &Array) -> f32 {
    assert_eq!(a.shape(), b.shape());
    mlx_rs::ops::abs(mlx_rs::ops::subtract(a, b).unwrap())
        .unwrap()
        .max(None)
        .unwrap()
        .item_cast::<f32>()
}

fn tower() -> (VisionTower, std::collections::HashMap<String, Array>) {
    let dir = fixture();
    let tower = load_tower(&dir, None)
        .unwrap()
        .expect("the fixture has a vision tower");
    let refs = Array::load_safetensors(dir.join("reference.safetensors")).unwrap();
    (tower, refs)
}

#[test]
fn soft_tokens_match_mlx_vlm() {
    let (tower, refs) = tower();
    // A full grid of patches (no padding) and a wider-than-high one (padding, fewer soft tokens).
    for (case, tokens) in [("full", 16), ("wide", 12)] {
        let got = tower
            .encode(&refs[&format!("{case}.pixel_values")])
            .unwrap();
        let want = &refs[&format!("{case}.features")];
        assert_eq!(got.shape(), &[1, tokens, 48], "{case}");
        let d = max_abs_diff(&got.as_dtype(Dtype::Float32).unwrap(), want);
        eprintln!("{case}: max |Δ| = {d:.3e}");
        assert!(d <= 1e-4, "{case}: max |Δ| = {d}");
    }
    // The comparison can fail: another image's soft tokens are far off.
    let other = tower.encode(&refs["full.pixel_values"]).unwrap();
    let flipped = mlx_rs::ops::subtract(Array::from_f32(1.0), &refs["full.pixel_values"]).unwrap();
    let d = max_abs_diff(&tower.encode(&flipped).unwrap(), &other);
    assert!(
        d > 1e-2,
        "a different image gave the same soft tokens ({d})"
    );
}

#[test]
fn images_the_tower_cannot_take_are_refused() {
    let (tower, _) = tower();
    for (shape, why) in [
        (vec![1, 3, 30, 32], "whole number"),
        (vec![1, 3, 36, 32], "exceeds"),
        (vec![1, 1, 32, 32], "expected (1, 3, H, W)"),
    ] {
        let n: i32 = shape.iter().product();
        let px = Array::from_slice(&vec![0.5f32; n as usize], &shape);
        match tower.encode(&px) {
            Err(EngineError::InvalidRequest(m)) => assert!(m.contains(why), "{m}"),
            Err(e) => panic!("{shape:?}: {e}"),
            Ok(_) => panic!("{shape:?} was accepted"),
        }
    }
}

#[test]
fn a_text_only_checkpoint_has_no_tower() {
    let root = fixture().parent().unwrap().join("tiny");
    assert!(load_tower(&root, None).unwrap().is_none());
}

#[test]
fn a_prompt_with_an_image_matches_mlx_vlm_at_every_position() {
    // The tiny text model with a vision tower: the text engine reads its text half, the tower its own.
    let dir = fixture_named("tiny-vision");
    let (model, _, report) = gemma4::load(&dir, None).unwrap();
    assert!(
        report.skipped.keys().any(|k| k.contains("vision")),
        "{:?}",
        report.skipped
    );
    let tower = load_tower(&dir, None).unwrap().unwrap();
    let refs = Array::load_safetensors(dir.join("reference.safetensors")).unwrap();
    for case in ["image", "padded"] {
        let ids = &refs[&format!("{case}.ids")];
        let features = tower
            .encode(&refs[&format!("{case}.pixel_values")])
            .unwrap();
        let host: Vec<i32> = ids.as_slice::<i32>().to_vec();
        let start = host.iter().position(|&t| t == 1000).unwrap();
        let n = host.iter().filter(|&&t| t == 1000).count();
        assert_eq!(
            n as i32,
            features.shape()[1],
            "{case}: one placeholder per soft token"
        );
        let mut cache = model.new_cache();
        let h = model
            .forward_hidden_with_media(
                ids,
                &[Placed {
                    start,
                    features: &features,
                }],
                &mut cache,
            )
            .unwrap();
        let logits = model.logits(&h).unwrap();
        let want = &refs[&format!("{case}.logits")];
        let d = max_abs_diff(&logits.as_dtype(Dtype::Float32).unwrap(), want);
        eprintln!(
            "{case}: {} positions, {n} soft tokens, max |Δlogit| = {d:.3e}",
            host.len()
        );
        assert!(d <= 1e-4, "{case}: max |Δlogit| = {d}");
        // Without the image the same prompt reads differently: the soft tokens are what the model saw.
        let mut cache = model.new_cache();
        let plain = model
            .logits(&model.forward_hidden(ids, &mut cache).unwrap())
            .unwrap();
        assert!(max_abs_diff(&plain.as_dtype(Dtype::Float32).unwrap(), want) > 1e-2);

        // 32 greedy tokens decoded from the cache the image prompt filled: mlx-vlm's, token for token.
        let mut cache = model.new_cache();
        let h = model
            .forward_hidden_with_media(
                ids,
                &[Placed {
                    start,
                    features: &features,
                }],
                &mut cache,
            )
            .unwrap();
        let last = h.shape()[1] - 1;
        let mut logits = model
            .logits(&h.index((.., last..last + 1, ..)))
            .unwrap()
            .reshape(&[1, -1])
            .unwrap();
        let mut got = vec![];
        for _ in 0..32 {
            let t = mlx_rs::ops::indexing::argmax_axis(&logits, -1, None)
                .unwrap()
                .as_dtype(Dtype::Int32)
                .unwrap();
            let t = t.as_slice::<i32>()[0];
            got.push(t);
            let next = Array::from_slice(&[t], &[1, 1]);
            logits = model.forward_last_logits(&next, &mut cache).unwrap();
        }
        let greedy = refs[&format!("{case}.greedy")].as_slice::<i32>().to_vec();
        assert_eq!(got, greedy, "{case}: greedy continuation after the image");
    }
}

#[test]
fn an_image_after_a_cached_prefix_reads_as_it_does_from_the_start() {
    // The same image prompt read in two chunks (the text before the image, then the rest) gives the logits
    // of reading it at once: the bidirectional block does not depend on where a chunk starts.
    let dir = fixture_named("tiny-vision");
    let (model, _, _) = gemma4::load(&dir, None).unwrap();
    let tower = load_tower(&dir, None).unwrap().unwrap();
    let refs = Array::load_safetensors(dir.join("reference.safetensors")).unwrap();
    let ids = &refs["image.ids"];
    let features = tower.encode(&refs["image.pixel_values"]).unwrap();
    let host: Vec<i32> = ids.as_slice::<i32>().to_vec();
    let start = host.iter().position(|&t| t == 1000).unwrap();
    let mut cache = model.new_cache();
    model
        .forward_hidden(&ids.index((.., ..start as i32)), &mut cache)
        .unwrap();
    let rest = ids.index((.., start as i32..));
    let h = model
        .forward_hidden_with_media(
            &rest,
            &[Placed {
                start: 0,
                features: &features,
            }],
            &mut cache,
        )
        .unwrap();
    let want = refs["image.logits"].index((.., start as i32.., ..));
    let d = max_abs_diff(&model.logits(&h).unwrap(), &want);
    eprintln!("two chunks: max |Δlogit| = {d:.3e}");
    assert!(d <= 1e-4, "two chunks: max |Δlogit| = {d}");
}
