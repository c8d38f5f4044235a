//! Video on the MLX engine against mlx-vlm (scripts/fixtures/gen_vision.py's "video" case): three frames
//! expanded in the prompt's text as Gemma 4's processor does (`mm:ss <|image>` + video tokens + `<image|>`),
//! each frame through the vision tower with the video budget, bidirectional within a frame; the prompt's
//! ids, logits at every position and 32 greedy tokens.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::path::PathBuf;

use common::{Media, max_abs_diff, tokens};

use jemma_engine::models::gemma4::Placed;
use jemma_engine::runtime::{ModelBundle, Prompt};
use jemma_media::video::{DecodedVideo, VideoFrame};
use jemma_media::{DecodedImage, Rgb};
use mlx_rs::{Array, Dtype};

fn fixture() -> PathBuf {
    common::fixture("tiny-mm")
}

const PROMPT: &str = "Watch: <|video|> What happens?";

/// The reference's frames (T, 3, H, W) uint8 as a sampled video at 0, 1, 2 … s, with `audio`.
fn video(frames: &Array, audio: Option<jemma_media::audio::DecodedAudio>) -> DecodedVideo {
    let s = frames.shape();
    let (t, h, w) = (s[0] as usize, s[2] as usize, s[3] as usize);
    let data: Vec<u8> = frames.as_slice::<u8>().to_vec();
    let frames = (0..t)
        .map(|f| {
            let mut rgb = vec![0u8; h * w * 3];
            for c in 0..3 {
                for i in 0..h * w {
                    rgb[i * 3 + c] = data[((f * 3 + c) * h * w) + i];
                }
            }
            VideoFrame {
                seconds: f as f64,
                image: DecodedImage {
                    rgb: Rgb {
                        width: w,
                        height: h,
                        data: rgb,
                    }
                    .into(),
                    digest: 1000 + f as u64,
                    low_detail: false,
                },
            }
        })
        .collect();
    DecodedVideo {
        frames,
        has_audio_track: audio.is_some(),
        audio,
        duration: t as f64,
        span: t as f64,
    }
}

#[test]
fn a_video_prompt_matches_mlx_vlm_ids_logits_and_greedy_tokens() {
    let dir = fixture();
    let refs = Array::load_safetensors(dir.join("reference.safetensors")).unwrap();
    let bundle = ModelBundle::load(&dir, None).unwrap();
    let v = video(&refs["video.frames"], None);
    let (ids, frames, audio) = bundle
        .prompt_with_media(
            &Prompt::Text(PROMPT.into()),
            &[],
            &[],
            std::slice::from_ref(&v),
        )
        .unwrap();
    let want = tokens(&refs["video.ids"]);
    assert_eq!(ids, want, "the processor's expansion, tokenized whole");
    assert!(audio.is_empty());
    assert_eq!(frames.len(), 3);
    let n = bundle
        .count_with_media(
            &Prompt::Text(PROMPT.into()),
            &[],
            &[],
            std::slice::from_ref(&v),
        )
        .unwrap();
    assert_eq!(n, ids.len(), "counting gives the same length");

    // The frames through the tower, in place: mlx-vlm's logits at every position.
    let tower = bundle.vision.as_ref().unwrap();
    let features: Vec<Array> = frames
        .iter()
        .map(|f| tower.encode_pixels(&f.pixels).unwrap())
        .collect();
    let placed: Vec<Placed<'_>> = frames
        .iter()
        .zip(&features)
        .map(|(f, x)| Placed {
            start: f.start,
            features: x,
            bidirectional: true,
        })
        .collect();
    let ids_a = Array::from_slice(
        &ids.iter().map(|&t| t as i32).collect::<Vec<_>>(),
        &[1, ids.len() as i32],
    );
    let mut cache = bundle.model.new_cache();
    let h = bundle
        .model
        .forward_hidden_with_media(&ids_a, &placed, &mut cache)
        .unwrap();
    let logits = bundle.model.logits(&h).unwrap();
    let d = max_abs_diff(
        &logits.as_dtype(Dtype::Float32).unwrap(),
        &refs["video.logits"],
    );
    eprintln!("video: {} positions, max |Δlogit| = {d:.3e}", ids.len());
    assert!(d <= 1e-4, "max |Δlogit| = {d}");
    drop(bundle);

    // The engine end to end: 32 greedy tokens, mlx-vlm's.
    use jemma_engine::runtime::{Engine, EngineConfig};
    let engine = Engine::start(EngineConfig::new(&dir)).unwrap();
    engine.wait_ready().unwrap();
    let media = Media {
        videos: vec![v],
        ..Media::default()
    };
    let (got, _) = common::greedy(&engine, Prompt::Text(PROMPT.into()), media).unwrap();
    assert_eq!(
        got,
        tokens(&refs["video.greedy"]),
        "greedy continuation after the video"
    );
    assert!(engine.shutdown(std::time::Duration::from_secs(20)));
}

#[test]
fn a_videos_audio_track_follows_its_frames_and_pairs_are_checked() {
    let dir = fixture();
    let refs = Array::load_safetensors(dir.join("reference.safetensors")).unwrap();
    let bundle = ModelBundle::load(&dir, None).unwrap();
    let wav = std::fs::read(dir.join("speech.wav")).unwrap();
    let clip = jemma_media::audio::decode_audio(&wav, Some("wav"), &Default::default()).unwrap();
    let v = video(&refs["video.frames"], Some(clip));
    let prompt = Prompt::Text(PROMPT.into());
    let (ids, frames, audio) = bundle
        .prompt_with_media(&prompt, &[], &[], std::slice::from_ref(&v))
        .unwrap();
    let plain = tokens(&refs["video.ids"]);
    // <|audio> (24), 23 soft tokens (23), <audio|> (25) right after the last frame's <image|> (22).
    let last_eoi = plain.iter().rposition(|&t| t == 22).unwrap();
    assert_eq!(ids[..=last_eoi], plain[..=last_eoi]);
    assert_eq!(ids[last_eoi + 1], 24);
    assert_eq!(audio.len(), 1);
    assert_eq!(audio[0].start, last_eoi + 2);
    assert!(
        ids[audio[0].start..audio[0].start + 23]
            .iter()
            .all(|&t| t == 23)
    );
    assert_eq!(ids[last_eoi + 25], 25);
    assert_eq!(ids[last_eoi + 26..], plain[last_eoi + 1..]);
    assert_eq!(frames.len(), 3);
    assert_eq!(
        bundle
            .count_with_media(&prompt, &[], &[], std::slice::from_ref(&v))
            .unwrap(),
        ids.len()
    );
    // Placeholders and videos pair up; a prompt of ids cannot take one.
    let two = [v.clone(), v.clone()];
    let err = bundle
        .prompt_with_media(&prompt, &[], &[], &two)
        .unwrap_err();
    assert!(err.to_string().contains("video placeholder"), "{err}");
    let err = bundle
        .prompt_with_media(
            &Prompt::Ids(vec![2, 26]),
            &[],
            &[],
            std::slice::from_ref(&v),
        )
        .unwrap_err();
    assert!(err.to_string().contains("chat or text prompt"), "{err}");
    // A model without the vision tower refuses video.
    let text = ModelBundle::load(&dir.parent().unwrap().join("tiny"), None).unwrap();
    let err = text
        .prompt_with_media(&prompt, &[], &[], std::slice::from_ref(&v))
        .unwrap_err();
    assert!(err.to_string().contains("cannot see video"), "{err}");
}
