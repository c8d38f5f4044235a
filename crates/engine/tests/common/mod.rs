//! What the engine's media tests share: the fixtures, comparing arrays, and running greedy requests with
//! media on an engine.
#![allow(dead_code)]

use std::path::PathBuf;

use jemma_engine::generate::GenerateOptions;
use jemma_engine::runtime::{Engine, Event, Prompt, Request};
use mlx_rs::Array;

/// `fixtures/<name>` (or under `$JEMMA_FIXTURES`), which must hold `reference.safetensors`.
pub fn fixture(name: &str) -> PathBuf {
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

/// max |a − b| over two arrays of one shape.
pub fn max_abs_diff(a: &Array, b: &Array) -> f32 {
    assert_eq!(a.shape(), b.shape());
    mlx_rs::ops::abs(mlx_rs::ops::subtract(a, b).unwrap())
        .unwrap()
        .max(None)
        .unwrap()
        .item_cast::<f32>()
}

/// An int32 reference array as token ids.
pub fn tokens(a: &Array) -> Vec<u32> {
    a.as_slice::<i32>().iter().map(|&t| t as u32).collect()
}

/// The media a request carries.
#[derive(Default)]
pub struct Media {
    /// Images.
    pub images: Vec<jemma_media::DecodedImage>,
    /// Audio clips.
    pub audio: Vec<jemma_media::audio::DecodedAudio>,
    /// Videos.
    pub videos: Vec<jemma_media::video::DecodedVideo>,
}

/// A greedy request of `max_tokens` tokens (no stop token: the references ran that many steps whatever
/// came) with stop strings `stop` and `media`.
pub fn request(prompt: Prompt, max_tokens: usize, stop: Vec<String>, media: Media) -> Request {
    Request {
        prompt,
        options: GenerateOptions {
            max_tokens,
            stop_tokens: vec![1 << 20],
            ..Default::default()
        },
        stop,
        parse_output: false,
        constraint: None,
        parallel_tool_calls: true,
        fit_context: false,
        images: media.images,
        audio: media.audio,
        videos: media.videos,
    }
}

/// 32 greedy steps of `prompt` with `media` on `engine` (no stop token: the references ran 32 steps
/// whatever came): (generated tokens, cached prompt tokens), or the engine's error.
pub fn greedy(engine: &Engine, prompt: Prompt, media: Media) -> Result<(Vec<u32>, usize), String> {
    let mut rx = engine
        .submit(request(prompt, 32, vec![], media))
        .map_err(|e| e.to_string())?;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Done(s) => return Ok((s.tokens, s.cached_tokens)),
            Event::Error(e) => return Err(e.to_string()),
            _ => {}
        }
    }
    Err("no answer".into())
}
