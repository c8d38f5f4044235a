//! What the engine's media tests share: the fixtures, comparing arrays, and running greedy requests with
//! media on an engine.
#![allow(dead_code)]

use std::path::PathBuf;

use jemma_engine::generate::GenerateOptions;
use jemma_engine::runtime::{Engine, Event, Prompt, Request};
use mlx_rs::Array;

/// `fixtures/<name>` (or under `$JEMMA_FIXTURES`), which must hold `reference.safetensors`.
pub fn fixture(name: &str) -> PathBuf {
    jemma_fixtures::fixture(name, "reference.safetensors")
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

/// Checks a prompt read with its media against mlx-vlm's reference `case` in `refs`: `h` (1, L, H) is
/// the model's hidden states over the whole prompt `ids` (1, L) and `cache` the cache that read it. The
/// logits match `{case}.logits` at every position to 1e-4; the placeholders read as plain text give
/// other logits (the media was seen or heard); and 32 greedy tokens decoded from `cache` are
/// `{case}.greedy`, token for token. `what` names the media in messages.
pub fn assert_media_prompt_matches(
    model: &jemma_engine::models::gemma4::Gemma4,
    ids: &Array,
    h: &Array,
    cache: &mut jemma_engine::models::gemma4::Cache,
    refs: &std::collections::HashMap<String, Array>,
    case: &str,
    what: &str,
) {
    use mlx_rs::Dtype;
    use mlx_rs::ops::indexing::IndexOp;
    let logits = model.logits(h).unwrap();
    let want = &refs[&format!("{case}.logits")];
    let d = max_abs_diff(&logits.as_dtype(Dtype::Float32).unwrap(), want);
    eprintln!(
        "{case}: {} positions with {what}, max |Δlogit| = {d:.3e}",
        ids.shape()[1]
    );
    assert!(d <= 1e-4, "{case}: max |Δlogit| = {d}");
    let mut plain_cache = model.new_cache();
    let plain = model
        .logits(&model.forward_hidden(ids, &mut plain_cache).unwrap())
        .unwrap();
    assert!(
        max_abs_diff(&plain.as_dtype(Dtype::Float32).unwrap(), want) > 1e-2,
        "{case}: the {what} changed nothing"
    );
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
            .unwrap()
            .as_slice::<i32>()[0];
        got.push(t);
        logits = model
            .forward_last_logits(&Array::from_slice(&[t], &[1, 1]), cache)
            .unwrap();
    }
    let greedy = refs[&format!("{case}.greedy")].as_slice::<i32>().to_vec();
    assert_eq!(got, greedy, "{case}: greedy continuation after the {what}");
}
