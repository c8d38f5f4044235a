//! One image through Jemma's vision path, timed: decode + Gemma 4 preprocessing (`jemma-media`) and the
//! vision tower with its projection (mlx-rs), as scripts/bench-media measures it against mlx-vlm.
//!
//! Usage: bench_vision TOWER_DIR IMAGE REPEATS → one JSON line: median seconds of each stage and MLX's
//! peak memory in bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test tool: failing loudly is its job

use std::time::Instant;

use jemma_engine::models::gemma4::vision::load_tower;
use jemma_media::{EncodedImage, ImageParams, Limits};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (dir, image, repeats) = match &args[..] {
        [_, d, i, r] => (
            std::path::PathBuf::from(d),
            std::fs::read(i)?,
            r.parse::<usize>()?,
        ),
        _ => return Err("usage: bench_vision TOWER_DIR IMAGE REPEATS".into()),
    };
    let tower = load_tower(&dir, Some(mlx_rs::Dtype::Float32))?.ok_or("no vision tower")?;
    let c = tower.config();
    let params = ImageParams {
        patch_size: c.patch_size,
        max_soft_tokens: c.default_output_length,
        pooling_kernel_size: c.pooling_kernel_size,
    };
    let encoded = EncodedImage(image.into());
    let (mut pre, mut enc) = (vec![], vec![]);
    let mut tokens = 0;
    // One warm-up run, then the measured ones.
    let _ = mlx_rs::memory::reset_peak_memory();
    for i in 0..=repeats {
        let t = Instant::now();
        let img = encoded.decode(&Limits::default())?;
        let px = jemma_media::preprocess(&img.rgb, &params)?;
        let t_pre = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let feats = tower.encode_pixels(&px)?;
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
