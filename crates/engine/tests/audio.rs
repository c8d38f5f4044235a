//! Parity of the Rust Gemma 4 audio tower (and its projection into the text model) with mlx-vlm on a
//! random-weight tower: scripts/fixtures/gen_audio.py builds it with mlx-vlm's own classes and records what
//! mlx-vlm computes for transformers' features of two generated clips. The features themselves are checked
//! against transformers in crates/media/tests/audio.rs; here they also go through the tower end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::path::PathBuf;

use common::{Media, max_abs_diff, tokens};

use jemma_engine::models::gemma4::audio::{AudioTower, hears_audio, load_tower};
use jemma_media::audio::{AudioLimits, FeatureExtractor, FeatureParams, decode_audio};
use mlx_rs::{Array, Dtype};

fn fixture() -> PathBuf {
    common::fixture("audio")
}

fn tower() -> (AudioTower, std::collections::HashMap<String, Array>) {
    let dir = fixture();
    let tower = load_tower(&dir, None)
        .unwrap()
        .expect("the fixture has an audio tower");
    let refs = Array::load_safetensors(dir.join("reference.safetensors")).unwrap();
    (tower, refs)
}

#[test]
fn soft_tokens_match_mlx_vlm() {
    let (tower, refs) = tower();
    assert!(hears_audio(&fixture()));
    // 1.3 s (padding at the end, several attention chunks) and 0.37 s (one chunk).
    for (case, rows) in [("speech", 33), ("short", 10)] {
        let feats = refs[&format!("{case}.features")].expand_dims(0).unwrap();
        let invalid = refs[&format!("{case}.mask")]
            .eq(Array::from_int(0))
            .unwrap()
            .expand_dims(0)
            .unwrap();
        let got = tower.encode(&feats, &invalid).unwrap();
        let want = &refs[&format!("{case}.encoded")];
        assert_eq!(got.shape(), &[1, rows, 48], "{case}");
        let d = max_abs_diff(&got.as_dtype(Dtype::Float32).unwrap(), want);
        eprintln!("{case}: max |Δ| = {d:.3e}");
        assert!(d <= 1e-4, "{case}: max |Δ| = {d}");
    }
}

#[test]
fn a_wav_file_goes_through_the_extractor_and_the_tower_as_in_mlx_vlm() {
    let (tower, refs) = tower();
    let dir = fixture();
    let fx = FeatureExtractor::new(FeatureParams::default()).unwrap();
    // transformers' counts: the rows that cover audio (the short clip's 10th row is padding).
    for (case, n) in [("speech", 33), ("short", 9)] {
        let wav = std::fs::read(dir.join(format!("{case}.wav"))).unwrap();
        let clip = decode_audio(&wav, Some("wav"), &AudioLimits::default()).unwrap();
        assert_eq!(fx.soft_tokens(clip.samples.len(), 750), n);
        let feats = fx.extract(&clip.samples);
        let got = tower.encode_features(&feats, n).unwrap();
        let want = mlx_rs::ops::indexing::IndexOp::index(
            &refs[&format!("{case}.encoded")],
            (.., ..n as i32, ..),
        );
        let d = max_abs_diff(&got, &want);
        eprintln!("{case} from the WAV: max |Δ| = {d:.3e}");
        assert!(d <= 1e-4, "{case}: max |Δ| = {d}");
    }
    // The comparison can fail: the other clip's soft tokens are far off where both have some.
    let wav = std::fs::read(dir.join("short.wav")).unwrap();
    let clip = decode_audio(&wav, Some("wav"), &AudioLimits::default()).unwrap();
    let got = tower
        .encode_features(&fx.extract(&clip.samples), 9)
        .unwrap();
    let other = mlx_rs::ops::indexing::IndexOp::index(&refs["speech.encoded"], (.., ..9, ..));
    assert!(max_abs_diff(&got, &other) > 1e-2);
}

#[test]
fn features_the_tower_cannot_take_are_refused() {
    let (tower, _) = tower();
    let err = tower
        .encode(
            &Array::zeros::<f32>(&[1, 20, 64]).unwrap(),
            &Array::from_slice(&[false; 20], &[1, 20]),
        )
        .expect_err("64 mel bins are refused");
    assert!(err.to_string().contains("(1, T, 128)"), "{err}");
}

/// The tiny-mm fixture's placeholder ids (its config.json `audio_token_id`, `image_token_id`).
const AUDIO: i32 = 23;
const IMAGE: i32 = 20;

#[test]
fn a_prompt_with_audio_matches_mlx_vlm_at_every_position() {
    use jemma_engine::models::gemma4::{self, Placed};
    use mlx_rs::ops::indexing::IndexOp;
    // The tiny text model with both towers: a clip alone, then an image and a clip in one prompt.
    let dir = common::fixture("tiny-mm");
    let (model, _, _) = gemma4::load(&dir, None).unwrap();
    let audio = load_tower(&dir, None).unwrap().unwrap();
    let vision = jemma_engine::models::gemma4::vision::load_tower(&dir, None)
        .unwrap()
        .unwrap();
    let refs = Array::load_safetensors(dir.join("reference.safetensors")).unwrap();
    for case in ["audio", "both"] {
        let ids = &refs[&format!("{case}.ids")];
        let host: Vec<i32> = ids.as_slice::<i32>().to_vec();
        let at = |tok: i32| {
            (
                host.iter().position(|&t| t == tok),
                host.iter().filter(|&&t| t == tok).count(),
            )
        };
        let (a_start, a_n) = at(AUDIO);
        let invalid = refs[&format!("{case}.input_features_mask")]
            .eq(Array::from_int(0))
            .unwrap();
        let enc = audio
            .encode(&refs[&format!("{case}.input_features")], &invalid)
            .unwrap();
        let a_feats = enc.index((.., ..a_n as i32, ..));
        let mut placed = vec![Placed {
            start: a_start.unwrap(),
            features: &a_feats,
            bidirectional: false,
        }];
        let i_feats;
        let (i_start, _) = at(IMAGE);
        if let Some(s) = i_start {
            i_feats = vision
                .encode(&refs[&format!("{case}.pixel_values")])
                .unwrap();
            placed.push(Placed {
                start: s,
                features: &i_feats,
                bidirectional: true,
            });
        }
        let mut cache = model.new_cache();
        let h = model
            .forward_hidden_with_media(ids, &placed, &mut cache)
            .unwrap();
        let what = format!("{a_n} audio tokens");
        common::assert_media_prompt_matches(&model, ids, &h, &mut cache, &refs, case, &what);
    }
}

/// 32 greedy steps of `ids` with `audio` on `engine`: (tokens, cached prompt tokens), or the error.
fn greedy(
    engine: &jemma_engine::runtime::Engine,
    ids: &[u32],
    audio: Vec<jemma_media::audio::DecodedAudio>,
) -> Result<(Vec<u32>, usize), String> {
    let prompt = jemma_engine::runtime::Prompt::Ids(ids.to_vec());
    common::greedy(
        engine,
        prompt,
        Media {
            audio,
            ..Media::default()
        },
    )
}

#[test]
fn the_engine_hears_a_wav_as_mlx_vlm_does_and_caches_by_clip() {
    let dir = common::fixture("tiny-mm");
    let refs = Array::load_safetensors(dir.join("reference.safetensors")).unwrap();
    let ids = tokens(&refs["speech.ids"]);
    let wav = std::fs::read(dir.join("speech.wav")).unwrap();
    let clip = decode_audio(&wav, Some("wav"), &AudioLimits::default()).unwrap();
    let engine =
        jemma_engine::runtime::Engine::start(jemma_engine::runtime::EngineConfig::new(&dir))
            .unwrap();
    engine.wait_ready().unwrap();
    // Decoded, featurised, encoded and placed by the engine: mlx-vlm's 32 tokens.
    let (got, cached) = greedy(&engine, &ids, vec![clip.clone()]).unwrap();
    assert_eq!(
        got,
        tokens(&refs["speech.greedy"]),
        "greedy continuation of the WAV prompt"
    );
    assert_eq!(cached, 0);
    // The next turn reuses the cache through the clip; another clip with the same text does not.
    let mut next = ids.clone();
    next.extend_from_slice(&got);
    next.extend_from_slice(&[106, 105, 300, 301]);
    let (_, cached) = greedy(&engine, &next, vec![clip.clone()]).unwrap();
    assert!(
        cached > ids.len(),
        "the clip's soft tokens were not reused ({cached})"
    );
    let start = ids.iter().position(|&t| t == AUDIO as u32).unwrap();
    let mut samples: Vec<f32> = clip.samples.to_vec();
    samples.reverse();
    let other = jemma_media::audio::DecodedAudio {
        samples: samples.into(),
        digest: clip.digest ^ 1,
    };
    let (answer, cached) = greedy(&engine, &next, vec![other]).unwrap();
    assert!(
        cached <= start,
        "a cache built on another clip was reused ({cached} > {start})"
    );
    let (first, _) = greedy(&engine, &next, vec![clip.clone()]).unwrap();
    assert_ne!(answer, first, "a different clip gave the same answer");
    // Placeholders and clips must pair up; a model without an audio tower refuses audio.
    let refused = greedy(&engine, &ids, vec![clip.clone(), clip.clone()]).unwrap_err();
    assert!(refused.contains("audio placeholder"), "{refused}");
    let text_only = jemma_engine::runtime::Engine::start(jemma_engine::runtime::EngineConfig::new(
        dir.parent().unwrap().join("tiny"),
    ))
    .unwrap();
    text_only.wait_ready().unwrap();
    let refused = greedy(&text_only, &[2, 105, 300], vec![clip]).unwrap_err();
    assert!(refused.contains("no audio tower"), "{refused}");
    // The model threads end before the process does (MLX buffers freed during exit corrupt its heap).
    let limit = std::time::Duration::from_secs(20);
    assert!(engine.shutdown(limit) && text_only.shutdown(limit));
}
