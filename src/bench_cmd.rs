//! `jemma bench`: prefill and decode speed of the in-process engine on a model directory (random prompt ids,
//! fixed seed, exactly --gen tokens), median over --runs. scripts/bench-engine compares against mlx-lm.

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::Context;
use jemma_engine::device::select_device;
use jemma_engine::generate::{GenerateOptions, generate};
use jemma_engine::runtime::{ModelBundle, default_dtype};

/// Arguments of `jemma bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// Tokens to generate per run.
    #[arg(long = "gen", default_value_t = 64)]
    gen_tokens: usize,
    /// Timed runs (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Activation dtype (as `jemma generate --dtype`).
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = select_device()?;
    mlx_rs::Device::set_default(&device.device());
    let dtype = match crate::generate_cmd::parse_dtype(&args.dtype)? {
        None => default_dtype(device),
        Some(d) => d,
    };
    let bundle = ModelBundle::load(&args.model, dtype)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let vocab = bundle.model.config().vocab_size as u64;
    // A fixed linear-congruential sequence: the same prompt on every machine, no rand dependency.
    let mut x = 0x9E3779B97F4A7C15u64;
    let prompt: Vec<u32> = (0..args.prompt_tokens.max(1))
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % (vocab - 200) + 200) as u32
        })
        .collect();
    let opts = GenerateOptions {
        max_tokens: args.gen_tokens.max(1),
        ..Default::default()
    };
    let (mut pre, mut dec) = (vec![], vec![]);
    for i in 0..=args.runs.max(1) {
        let s = generate(&bundle.model, &prompt, &opts, |_| ControlFlow::Continue(()))?;
        if i > 0 {
            pre.push(s.prefill_tps());
            dec.push(s.decode_tps());
        }
    }
    let out = serde_json::json!({
        "model": args.model, "dtype": bundle.report.dtype, "device": device,
        "prompt_tokens": prompt.len(), "generated_tokens": opts.max_tokens, "runs": pre.len(),
        "prefill_tps": median(pre), "decode_tps": median(dec),
        "peak_memory_bytes": mlx_rs::memory::peak_memory()?, "peak_rss_bytes": crate::generate_cmd::peak_rss_bytes(),
    });
    if args.json {
        println!("{out}");
    } else {
        println!(
            "{}: prefill {:.1} tok/s, decode {:.1} tok/s ({} prompt tokens, {} generated, median of {}, {} on {:?})",
            args.model.display(),
            out["prefill_tps"].as_f64().unwrap_or(0.0),
            out["decode_tps"].as_f64().unwrap_or(0.0),
            prompt.len(),
            opts.max_tokens,
            args.runs,
            bundle.report.dtype,
            device
        );
    }
    Ok(())
}
