//! One audio clip through Jemma's audio path, timed: decode + resampling + Gemma 4's audio features
//! (`jemma-media`) and the audio tower with its projection (mlx-rs), as scripts/bench-media measures it
//! against mlx-vlm.
//!
//! Usage: bench_audio TOWER_DIR CLIP REPEATS → one JSON line: median seconds of each stage, the soft tokens
//! and MLX's peak memory in bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test tool: failing loudly is its job

use std::time::Instant;

use jemma_engine::models::gemma4::audio::load_tower;
use jemma_media::audio::{AudioLimits, FeatureExtractor, FeatureParams, decode_audio};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (dir, clip, repeats) = match &args[..] {
        [_, d, c, r] => (
            std::path::PathBuf::from(d),
            std::fs::read(c)?,
            r.parse::<usize>()?,
        ),
        _ => return Err("usage: bench_audio TOWER_DIR CLIP REPEATS".into()),
    };
    let tower = load_tower(&dir, Some(mlx_rs::Dtype::Float32))?.ok_or("no audio tower")?;
    let fx = FeatureExtractor::new(FeatureParams::default())?;
    let (mut pre, mut enc) = (vec![], vec![]);
    let mut tokens = 0;
    // One warm-up run, then the measured ones.
    let _ = mlx_rs::memory::reset_peak_memory();
    for i in 0..=repeats {
        let t = Instant::now();
        let audio = decode_audio(&clip, None, &AudioLimits::default())?;
        let features = fx.extract(&audio.samples);
        let n = fx.soft_tokens(audio.samples.len(), 750);
        let t_pre = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let feats = tower.encode_features(&features, n)?;
        feats.eval()?;
        let t_enc = t.elapsed().as_secs_f64();
        tokens = feats.shape()[1];
        if i > 0 {
            pre.push(t_pre);
            enc.push(t_enc);
        }
    }
    println!(
        "{{\"preprocess_s\": {:.4}, \"encode_s\": {:.4}, \"soft_tokens\": {tokens}, \"peak_bytes\": {}}}",
        median(pre),
        median(enc),
        mlx_rs::memory::peak_memory()?
    );
    Ok(())
}
