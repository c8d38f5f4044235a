//! `jemma generate`: one generation on the in-process MLX engine, for scripts, benchmarks and parity checks.
//! The JSON output (`--json`) is an interface other tools rely on:
//! `{"tokens":[…],"text":…,"prefill_tps":…,"decode_tps":…,"peak_memory_bytes":…}` (plus extra fields).

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context, bail};
use jemma_engine::device::{mlx_info, select_device};
use jemma_engine::generate::{GenerateOptions, generate};
use jemma_engine::runtime::{ModelBundle, Prompt, default_dtype};
use jemma_engine::sample::SamplingParams;
use mlx_rs::{Array, Dtype};

/// Arguments of `jemma generate`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory in Hugging Face layout (config.json, *.safetensors, tokenizer.json) for the MLX
    /// engine, or a `.gguf` file for the llama.cpp engine.
    #[arg(long)]
    model: PathBuf,
    /// llama.cpp: decode threads (default: all cores up to 4, else all but one).
    #[arg(long)]
    threads: Option<i32>,
    /// Prompt text.
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids (no template, no BOS added).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap --prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Maximum tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temp: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Top-k sampling (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: i32,
    /// Random seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Activation dtype: auto (per device: float32 on CPU, checkpoint dtype on GPU), checkpoint (as mlx-lm),
    /// float32, bfloat16, float16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Prefill chunk length (mlx-lm's prefill_step_size; for a GGUF, llama.cpp's batch size).
    #[arg(long)]
    prefill_step: Option<usize>,
    /// Write the prompt's last-position logits (float32, tensor `logits`) to this safetensors file.
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// Quantize the full-attention KV caches to this many bits (4 or 8) once they hold
    /// --quantized-kv-start positions.
    #[arg(long)]
    kv_bits: Option<i32>,
    /// Group size of KV quantization.
    #[arg(long, default_value_t = 64)]
    kv_group_size: i32,
    /// Context length from which the KV cache is quantized.
    #[arg(long, default_value_t = 5000)]
    quantized_kv_start: usize,
    /// llama.cpp (a .gguf model): the K cache's element type, as llama-server's --cache-type-k: f16 (the
    /// default), f32, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0 or q5_1.
    #[arg(long)]
    cache_type_k: Option<jemma_router::config::CacheType>,
    /// llama.cpp: the V cache's element type (--cache-type-v), as --cache-type-k.
    #[arg(long)]
    cache_type_v: Option<jemma_router::config::CacheType>,
    /// Keep going past end-of-sequence tokens (benchmarks want exactly --max-tokens).
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

impl Args {
    /// The sampling these flags ask for (the same type on both engines).
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temp,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            ..Default::default()
        }
    }
}

pub fn parse_dtype(s: &str) -> anyhow::Result<Option<Option<Dtype>>> {
    Ok(match s {
        "auto" => None,
        "checkpoint" => Some(None),
        "float32" | "f32" => Some(Some(Dtype::Float32)),
        "bfloat16" | "bf16" => Some(Some(Dtype::Bfloat16)),
        "float16" | "f16" => Some(Some(Dtype::Float16)),
        other => bail!("unknown dtype {other:?}"),
    })
}

/// Peak resident set size of this process in bytes.
pub fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    // Linux reports kilobytes, macOS bytes.
    if cfg!(target_os = "macos") {
        ru.ru_maxrss as u64
    } else {
        ru.ru_maxrss as u64 * 1024
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.model.extension().is_some_and(|e| e == "gguf") {
        // The MLX engine's settings, which llama.cpp has no use for: refused rather than ignored.
        anyhow::ensure!(
            args.kv_bits.is_none(),
            "--kv-bits is the MLX engine's; a GGUF's KV cache is quantized with --cache-type-k and \
             --cache-type-v"
        );
        anyhow::ensure!(
            args.dtype == "auto",
            "--dtype is the MLX engine's; a GGUF computes in the types its file holds"
        );
        return run_llama(&args);
    }
    anyhow::ensure!(
        args.cache_type_k.is_none() && args.cache_type_v.is_none(),
        "--cache-type-k and --cache-type-v are llama.cpp's (a .gguf model); the MLX engine quantizes its \
         KV cache with --kv-bits"
    );
    let prefill_step = args
        .prefill_step
        .unwrap_or(jemma_engine::generate::DEFAULT_PREFILL_STEP);
    let device = select_device()?;
    mlx_rs::Device::set_default(&device.device());
    let dtype = match parse_dtype(&args.dtype)? {
        None => default_dtype(device),
        Some(d) => d,
    };
    let bundle = ModelBundle::load(&args.model, dtype)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let prompt = match (&args.prompt, &args.prompt_ids) {
        (Some(_), Some(_)) => bail!("give --prompt or --prompt-ids, not both"),
        (_, Some(ids)) => Prompt::Ids(ids.clone()),
        (Some(p), None) if args.chat => Prompt::Chat {
            messages: vec![serde_json::json!({"role": "user", "content": p})],
            tools: None,
            enable_thinking: None,
        },
        (Some(p), None) => Prompt::Text(p.clone()),
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let ids = bundle.prompt_ids(&prompt)?;
    if let Some(path) = &args.logits_out {
        let mut cache = bundle.model.new_cache();
        let x = Array::from_slice(
            &ids.iter().map(|&t| t as i32).collect::<Vec<_>>(),
            &[1, ids.len() as i32],
        );
        let logits = bundle
            .model
            .forward_last_logits(&x, &mut cache)?
            .reshape(&[-1])?
            .as_dtype(Dtype::Float32)?;
        Array::save_safetensors([("logits", &logits)], None, path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    mlx_rs::memory::reset_peak_memory()?;
    let opts = GenerateOptions {
        sampling: args.sampling(),
        max_tokens: args.max_tokens,
        stop_tokens: if args.ignore_eos {
            vec![]
        } else {
            bundle.tokenizer.eos_ids.clone()
        },
        prefill_step,
        kv_quant: args
            .kv_bits
            .map(|bits| jemma_engine::models::gemma4::KvQuant {
                bits,
                group_size: args.kv_group_size,
                start: args.quantized_kv_start,
            }),
        ..Default::default()
    };
    let mut tokens = vec![];
    let mut text = String::new();
    let mut decoder = bundle.tokenizer.stream();
    let stats = generate(&bundle.model, &ids, &opts, |s| {
        tokens.push(s.token);
        if let Ok(p) = decoder.push(s.token) {
            if !args.json {
                print!("{p}");
                use std::io::Write;
                let _ = std::io::stdout().flush();
            }
            text.push_str(&p);
        }
        ControlFlow::Continue(())
    })?;
    text.push_str(&decoder.finish()?);
    let peak = mlx_rs::memory::peak_memory()? as u64;
    if args.json {
        let info = mlx_info()?;
        let out = serde_json::json!({
            "tokens": tokens,
            "text": text,
            "prompt_tokens": stats.prompt_tokens,
            "prefill_tps": stats.prefill_tps(),
            "decode_tps": stats.decode_tps(),
            "prefill_s": stats.prefill_time.as_secs_f64(),
            "decode_s": stats.decode_time.as_secs_f64(),
            "finish_reason": stats.finish_reason,
            "peak_memory_bytes": peak,
            "peak_rss_bytes": peak_rss_bytes(),
            "dtype": bundle.report.dtype,
            "device": info.device,
            // What the engine host would have predicted for this request (compared in tests/e2e/cli.rs).
            "footprint_estimate": jemma_engine::footprint::estimate(
                &args.model,
                dtype.map(jemma_engine::footprint::dtype_bytes),
                Some(stats.prompt_tokens + stats.completion_tokens),
                prefill_step,
                Some(jemma_engine::generate::DEFAULT_ATTENTION_BUDGET),
            )?,
        });
        println!("{out}");
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, {:.1} tok/s prefill; {} tokens, {:.1} tok/s decode; peak MLX memory {:.1} MiB; {}]",
            stats.prompt_tokens,
            stats.prefill_tps(),
            stats.completion_tokens,
            stats.decode_tps(),
            peak as f64 / (1 << 20) as f64,
            bundle.report.dtype
        );
    }
    Ok(())
}

/// A llama.cpp engine that the CLI shuts down on every way out of the function holding it, errors
/// included: with CUDA, a model thread that frees its context while the process exits meets a torn-down
/// runtime and ggml aborts (see `LlamaEngine::shutdown`).
#[cfg(any(
    feature = "llama",
    not(all(target_os = "macos", target_arch = "aarch64"))
))]
pub(crate) struct StopOnExit(pub(crate) Option<jemma_node::llama::LlamaEngine>);

#[cfg(any(
    feature = "llama",
    not(all(target_os = "macos", target_arch = "aarch64"))
))]
impl std::ops::Deref for StopOnExit {
    type Target = jemma_node::llama::LlamaEngine;

    #[expect(
        clippy::expect_used,
        reason = "the engine is taken only in drop, after which nothing can deref"
    )]
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("held until dropped")
    }
}

#[cfg(any(
    feature = "llama",
    not(all(target_os = "macos", target_arch = "aarch64"))
))]
impl Drop for StopOnExit {
    fn drop(&mut self) {
        if let Some(engine) = self.0.take()
            && !engine.shutdown(std::time::Duration::from_secs(30))
        {
            eprintln!("warning: the llama.cpp engine did not stop within 30 s");
        }
    }
}

#[cfg(any(
    feature = "llama",
    not(all(target_os = "macos", target_arch = "aarch64"))
))]
fn run_llama(args: &Args) -> anyhow::Result<()> {
    use jemma_node::llama;
    let mut cfg = llama::LlamaConfig::new(&args.model);
    cfg.threads = args.threads;
    cfg.batch_threads = args.threads;
    cfg.cache = jemma_node::setup::llama_cache_types(args.cache_type_k, args.cache_type_v);
    if let Some(n) = args.prefill_step {
        cfg.batch_size = n.clamp(1, u32::MAX as usize) as u32;
    }
    if let Some(path) = &args.logits_out {
        // Last-position logits of the prompt (ids only), float32, like the MLX path.
        let ids = args
            .prompt_ids
            .clone()
            .context("--logits-out with a GGUF needs --prompt-ids")?;
        let session = llama::Session::load(&cfg)?;
        let (logits, _) = session.logits_and_greedy(
            &ids,
            0,
            args.threads.unwrap_or_else(llama::default_threads),
        )?;
        let n = logits.len() as i32;
        Array::save_safetensors([("logits", &Array::from_slice(&logits, &[n]))], None, path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let engine = StopOnExit(Some(llama::LlamaEngine::start(cfg)?));
    engine.wait_ready()?;
    let prompt = match (&args.prompt, &args.prompt_ids) {
        (_, Some(ids)) => llama::Prompt::Ids(ids.clone()),
        (Some(p), None) if args.chat => llama::Prompt::Chat {
            messages: vec![serde_json::json!({"role": "user", "content": p})],
            tools: None,
            enable_thinking: None,
        },
        (Some(p), None) => llama::Prompt::Text(p.clone()),
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let mut rx = engine
        .submit(llama::Request {
            sampling: args.sampling(),
            ignore_eos: args.ignore_eos,
            ..llama::Request::new(prompt, args.max_tokens)
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut text = String::new();
    let summary = loop {
        match rx.blocking_recv() {
            Some(llama::Event::Content(c)) => {
                if !args.json {
                    use std::io::Write;
                    print!("{c}");
                    let _ = std::io::stdout().flush();
                }
                text.push_str(&c);
            }
            Some(llama::Event::Done(s)) => break s,
            Some(llama::Event::Error(e)) => bail!("{e}"),
            Some(_) => {}
            None => bail!("the engine stopped"),
        }
    };
    let status = engine.status();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "tokens": summary.tokens,
                "text": text,
                "prompt_tokens": summary.prompt_tokens,
                "prefill_tps": summary.prefill_tps,
                "decode_tps": summary.decode_tps,
                "finish_reason": summary.finish,
                "peak_rss_bytes": peak_rss_bytes(),
                "engine": "llama.cpp",
                "cache_type_k": status.info.cache_type_k,
                "cache_type_v": status.info.cache_type_v,
                "threads": status.info.threads,
                "gpu_layers": status.info.gpu_layers,
            })
        );
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, {:.1} tok/s prefill; {} tokens, {:.1} tok/s decode; llama.cpp, {} threads]",
            summary.prompt_tokens,
            summary.prefill_tps,
            summary.completion_tokens,
            summary.decode_tps,
            status.info.threads
        );
    }
    Ok(())
}

#[cfg(not(any(
    feature = "llama",
    not(all(target_os = "macos", target_arch = "aarch64"))
)))]
fn run_llama(_: &Args) -> anyhow::Result<()> {
    bail!("this build has no llama.cpp engine for GGUF models: rebuild with --features llama")
}
