//! `jemma bench`: prefill and decode speed of the in-process engine on a model directory (random prompt ids,
//! fixed seed, exactly --gen tokens), median over --runs after one warm-up run. scripts/bench-engine compares
//! against mlx-lm. On a GGUF it times the llama.cpp engine as `jemma serve` runs it (scripts/bench-heavy
//! compares against llama.cpp's C API and llama-cpp-python).
//! With `--constraint`, decode runs under a grammar (constrained decoding), and `--mask-gguf` times
//! llguidance's per-token mask on a real Gemma vocabulary instead (scripts/bench-constrain).

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::Context;
use jemma_constrain::Constraint;
use jemma_engine::device::select_device;
use jemma_engine::generate::{GenerateOptions, generate};
use jemma_engine::runtime::{ModelBundle, default_dtype};

/// `n` token ids in `skip..vocab`, past the first `skip = min(200, vocab / 2)` (where control tokens
/// sit): a fixed linear-congruential sequence, the same prompt on every machine (no rand dependency).
fn random_ids(vocab: u64, n: usize) -> Vec<u32> {
    let skip = 200.min(vocab / 2);
    let mut x = 0x9E3779B97F4A7C15u64;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % (vocab - skip).max(1) + skip) as u32
        })
        .collect()
}

/// Arguments of `jemma bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (MLX engine), or a GGUF file (llama.cpp engine).
    #[arg(long, required_unless_present = "mask_gguf")]
    model: Option<PathBuf>,
    /// The prompt as comma-separated token ids (no BOS added) instead of --prompt-tokens random ones (a
    /// GGUF's: its BOS, then random ids).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// llama.cpp: threads (default: as `jemma serve`).
    #[arg(long)]
    threads: Option<i32>,
    /// Decode under a grammar: `json` (any JSON object) or `schema` (an object with one free-text field,
    /// so that random weights keep writing).
    #[arg(long)]
    constraint: Option<String>,
    /// Instead of decoding, time the grammar mask per token on this GGUF's vocabulary (the real Gemma
    /// tokenizer, 262,144 tokens), with Gemma 4's tool-call markers added, for JSON, a JSON Schema and a
    /// tool call; prints mean and p99 milliseconds.
    #[arg(long)]
    mask_gguf: Option<PathBuf>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// Tokens to generate per run.
    #[arg(long = "gen", default_value_t = 64)]
    gen_tokens: usize,
    /// Timed runs (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Activation dtype (as `jemma generate --dtype`; the MLX engine's).
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// llama.cpp (a GGUF): the K cache's element type, as `jemma generate --cache-type-k`.
    #[arg(long)]
    cache_type_k: Option<jemma_router::config::CacheType>,
    /// llama.cpp: the V cache's element type, as `jemma generate --cache-type-v`.
    #[arg(long)]
    cache_type_v: Option<jemma_router::config::CacheType>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        // The engines' own code is optimised either way (MLX and llama.cpp build as Release), the host's
        // Rust is not: rates read several times lower than a release build's.
        eprintln!(
            "note: a debug build of jemma: its rates are not representative (cargo build --release)"
        );
    }
    if let Some(gguf) = &args.mask_gguf {
        return mask_bench(gguf, args.runs.max(1));
    }
    let Some(model) = args.model.clone() else {
        anyhow::bail!("--model is required");
    };
    if model
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        anyhow::ensure!(
            args.dtype == "auto",
            "--dtype is the MLX engine's; a GGUF computes in the types its file holds"
        );
        return gguf_bench(&args, &model);
    }
    anyhow::ensure!(
        args.cache_type_k.is_none() && args.cache_type_v.is_none(),
        "--cache-type-k and --cache-type-v are llama.cpp's (a GGUF model)"
    );
    let device = select_device()?;
    mlx_rs::Device::set_default(&device.device());
    let dtype = match crate::generate_cmd::parse_dtype(&args.dtype)? {
        None => default_dtype(device),
        Some(d) => d,
    };
    let bundle =
        ModelBundle::load(&model, dtype).with_context(|| format!("loading {}", model.display()))?;
    let vocab = bundle.model.config().vocab_size as u64;
    let prompt: Vec<u32> = args
        .prompt_ids
        .clone()
        .unwrap_or_else(|| random_ids(vocab, args.prompt_tokens.max(1)));
    let mut opts = GenerateOptions {
        max_tokens: args.gen_tokens.max(1),
        ..Default::default()
    };
    if let Some(c) = &args.constraint {
        let c = match c.as_str() {
            "json" => Constraint::JsonObject,
            "schema" => Constraint::JsonSchema {
                schema: serde_json::json!({"type": "object", "properties": {"text": {"type": "string"}},
                    "required": ["text"], "additionalProperties": false}),
                strict: true,
            },
            other => anyhow::bail!("--constraint json|schema, not {other:?}"),
        };
        opts.constraint = Some((bundle.vocabulary()?, c));
        // A complete answer can only end: stop there rather than feed the grammar past its end.
        opts.stop_tokens = bundle.tokenizer.eos_ids.clone();
    }
    let (mut pre, mut dec) = (vec![], vec![]);
    for i in 0..=args.runs.max(1) {
        let s = generate(&bundle.model, &prompt, &opts, |_| ControlFlow::Continue(()))?;
        if i > 0 {
            pre.push(s.prefill_tps());
            dec.push(s.decode_tps());
        }
    }
    let out = serde_json::json!({
        "model": model, "dtype": bundle.report.dtype, "device": device, "constraint": args.constraint,
        "prompt_tokens": prompt.len(), "generated_tokens": opts.max_tokens, "runs": pre.len(),
        "prefill_tps": median(pre), "decode_tps": median(dec),
        "peak_memory_bytes": mlx_rs::memory::peak_memory()?, "peak_rss_bytes": crate::generate_cmd::peak_rss_bytes(),
    });
    if args.json {
        println!("{out}");
    } else {
        println!(
            "{}: prefill {:.1} tok/s, decode {:.1} tok/s ({} prompt tokens, {} generated, median of {}, {} on {:?})",
            model.display(),
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

/// The llama.cpp engine on a GGUF, started as `jemma serve` starts it (its context, slots and threads):
/// one warm-up request with the prompt as given, then `--runs` timed requests, each with the prompt's ids
/// after the first rotated by the run's number, so that no run finds its prompt in a slot or the prefix
/// cache and each reads it whole (but its first token). Prints the medians of the engine's own prefill and
/// decode rates (tokens/s; prefill over the time spent in `llama_decode`), the warm-up's tokens and the most
/// prompt tokens a timed run found cached.
///
/// Errors: too few prompt tokens to time `--runs` fresh prompts, a GGUF without a vocabulary, or the
/// engine fails to load or to answer.
#[cfg(any(
    feature = "llama",
    not(all(target_os = "macos", target_arch = "aarch64"))
))]
fn gguf_bench(args: &Args, model: &std::path::Path) -> anyhow::Result<()> {
    use jemma_node::llama;
    let ids = match args.prompt_ids.clone() {
        Some(ids) => ids,
        None => {
            // The GGUF's BOS, then random ids from its vocabulary.
            let meta = llama::gguf::read_metadata(model)?;
            let vocab = match meta.get("tokenizer.ggml.tokens") {
                Some(llama::gguf::Value::Array(t)) => t.len() as u64,
                _ => anyhow::bail!(
                    "{}: the GGUF lists no vocabulary; pass --prompt-ids",
                    model.display()
                ),
            };
            let bos = match meta.get("tokenizer.ggml.bos_token_id") {
                Some(llama::gguf::Value::Int(b)) => Some(*b as u32),
                _ => None,
            };
            let n = args.prompt_tokens.max(2);
            bos.into_iter()
                .chain(random_ids(vocab, n - usize::from(bos.is_some())))
                .collect()
        }
    };
    anyhow::ensure!(!ids.is_empty(), "--prompt-ids names no token");
    // Each timed run rotates the ids after the first by its number: past len - 1 runs a rotation would
    // repeat, and a run would time a prompt already in a slot.
    anyhow::ensure!(
        ids.len() == 1 || args.runs.max(1) < ids.len() - 1,
        "--runs {} needs at least {} prompt tokens (--prompt-ids or --prompt-tokens): each timed run \
         reads the tokens after the first rotated by its number, so that no run finds its prompt cached",
        args.runs,
        args.runs.max(1) + 2
    );
    anyhow::ensure!(
        args.constraint.is_none(),
        "--constraint times the MLX engine; a GGUF's bench decodes freely"
    );
    let mut cfg = llama::LlamaConfig::new(model);
    cfg.threads = args.threads;
    cfg.batch_threads = args.threads;
    cfg.cache = jemma_node::setup::llama_cache_types(args.cache_type_k, args.cache_type_v);
    let engine = crate::generate_cmd::StopOnExit(Some(llama::LlamaEngine::start(cfg)?));
    engine.wait_ready()?;
    let run = |prompt: Vec<u32>| -> anyhow::Result<llama::Summary> {
        let mut rx = engine
            .submit(llama::Request {
                ignore_eos: true,
                ..llama::Request::new(llama::Prompt::Ids(prompt), args.gen_tokens.max(1))
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        loop {
            match rx.blocking_recv() {
                Some(llama::Event::Done(s)) => return Ok(s),
                Some(llama::Event::Error(e)) => anyhow::bail!("{e}"),
                Some(_) => {}
                None => anyhow::bail!("the engine stopped"),
            }
        }
    };
    let warm_up = run(ids.clone())?;
    let (mut pre, mut dec, mut cached) = (vec![], vec![], 0);
    for r in 1..=args.runs.max(1) {
        let mut prompt = ids.clone();
        let n = prompt.len() - 1;
        if n > 0 {
            prompt[1..].rotate_left(r % n);
        }
        let s = run(prompt)?;
        pre.push(s.prefill_tps);
        dec.push(s.decode_tps);
        cached = cached.max(s.cached_tokens);
    }
    let status = engine.status();
    let out = serde_json::json!({
        "model": model, "engine": "llama.cpp", "threads": status.info.threads,
        "gpu_layers": status.info.gpu_layers, "prompt_tokens": ids.len(),
        "cache_type_k": status.info.cache_type_k, "cache_type_v": status.info.cache_type_v,
        "generated_tokens": args.gen_tokens.max(1), "runs": pre.len(),
        "prefill_tps": median(pre), "decode_tps": median(dec), "tokens": warm_up.tokens,
        "max_cached_tokens": cached,
        "peak_rss_bytes": crate::generate_cmd::peak_rss_bytes(),
    });
    if args.json {
        println!("{out}");
    } else {
        println!(
            "{}: prefill {:.1} tok/s, decode {:.1} tok/s ({} prompt tokens, {} generated, median of {}, llama.cpp, {} threads)",
            model.display(),
            out["prefill_tps"].as_f64().unwrap_or(0.0),
            out["decode_tps"].as_f64().unwrap_or(0.0),
            ids.len(),
            args.gen_tokens.max(1),
            args.runs.max(1),
            status.info.threads
        );
    }
    Ok(())
}

#[cfg(not(any(
    feature = "llama",
    not(all(target_os = "macos", target_arch = "aarch64"))
)))]
fn gguf_bench(_: &Args, model: &std::path::Path) -> anyhow::Result<()> {
    anyhow::bail!(
        "{}: this build has no llama.cpp engine (build with --features llama)",
        model.display()
    )
}

/// Per-token cost of constrained decoding on a real vocabulary: for a JSON object, a JSON Schema and a
/// Gemma 4 tool call, a fixed valid answer is fed token by token; each step times the mask (llguidance's
/// `compute_mask`), the additive logit mask the MLX engine builds from it, and the commit. `runs` passes
/// over each answer; prints JSON with mean and p99 milliseconds.
#[cfg(any(
    feature = "llama",
    not(all(target_os = "macos", target_arch = "aarch64"))
))]
fn mask_bench(gguf: &std::path::Path, runs: usize) -> anyhow::Result<()> {
    use jemma_constrain::{ToolSpec, Vocabulary};
    use jemma_node::llama;
    use std::time::Instant;
    let loaded = llama::load(&llama::LlamaConfig::new(gguf), |_| true)?;
    let (mut tokens, eos) = loaded.token_table();
    let n_real = tokens.len();
    // The recogniser llguidance replaced sees each token's output bytes; special tokens never match.
    let scan_tokens: Vec<Vec<u8>> = tokens
        .iter()
        .map(|(b, special)| if *special { vec![] } else { b.clone() })
        .collect();
    // Gemma 4's tool-call markers, appended (the GGUF is Gemma 3's, with the same 262,144-token text
    // vocabulary): 0 `<|tool_call>`, 1 `<tool_call|>`, 2 `<|"|>`.
    for m in ["<|tool_call>", "<tool_call|>", "<|\"|>"] {
        tokens.push((m.as_bytes().to_vec(), true));
    }
    let marker = |k: usize| (n_real + k) as u32;
    let t_vocab = Instant::now();
    let vocab = Vocabulary::from_tokens(tokens, &eos)?;
    let vocab_ms = t_vocab.elapsed().as_secs_f64() * 1e3;
    let v = n_real + 3;
    let text = |s: &str| -> Vec<u32> {
        loaded
            .model
            .vocab()
            .tokenize(s.as_bytes(), false, false)
            .into_iter()
            .map(|t| t.0 as u32)
            .collect()
    };
    let schema = serde_json::json!({"type": "object", "properties": {"name": {"type": "string"},
        "population": {"type": "integer"}}, "required": ["name", "population"],
        "additionalProperties": false});
    let tool = ToolSpec {
        name: "get_weather".into(),
        parameters: serde_json::json!({"type": "object", "properties": {"city": {"type": "string"},
            "days": {"type": "integer"}}, "required": ["city"]}),
    };
    let json_answer = text(r#"{"name": "Paris", "population": 2148000}"#);
    let scan_answer = json_answer.clone();
    let mut call = vec![marker(0)];
    call.extend(text("call:get_weather{city:"));
    call.push(marker(2));
    call.extend(text("Paris"));
    call.push(marker(2));
    call.extend(text(",days:3}"));
    call.push(marker(1));
    let cases: Vec<(&str, Constraint, Vec<u32>)> = vec![
        ("json_object", Constraint::JsonObject, json_answer.clone()),
        (
            "json_schema",
            Constraint::JsonSchema {
                schema,
                strict: true,
            },
            json_answer,
        ),
        (
            "tool_call",
            Constraint::ToolCalls {
                tools: vec![tool],
                parallel: false,
            },
            call,
        ),
    ];
    let mut out = serde_json::Map::new();
    out.insert("vocab_tokens".into(), v.into());
    out.insert("vocab_build_ms".into(), vocab_ms.into());
    // The hand-written JSON-mode recogniser this replaced, on the same answer: its mask scans the vocabulary.
    let mut scan = vec![];
    for _ in 0..runs {
        let mut r = crate::bench_recogniser::JsonRecognizer::new();
        for &t in &scan_answer {
            let t0 = Instant::now();
            let m = crate::bench_recogniser::scan_mask(&scan_tokens, &r, &eos);
            scan.push(t0.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(
                m.get(t as usize) == Some(&0.0),
                "recogniser: token {t} of the answer is not allowed"
            );
            r.feed_all(&scan_tokens[t as usize]);
        }
    }
    let scan_mean = scan.iter().sum::<f64>() / scan.len().max(1) as f64;
    out.insert(
        "recogniser_json_object".into(),
        serde_json::json!({"mask": {"mean_ms": scan_mean}, "tokens": scan_answer.len()}),
    );
    for (name, c, answer) in cases {
        let (mut mask, mut additive, mut commit) = (vec![], vec![], vec![]);
        for _ in 0..runs {
            let mut m = vocab.matcher(&c)?;
            for &t in &answer {
                let t0 = Instant::now();
                let allowed = m.allowed()?;
                let t1 = Instant::now();
                std::hint::black_box(allowed.additive(v));
                let t2 = Instant::now();
                anyhow::ensure!(
                    allowed.contains(t),
                    "{name}: token {t} of the answer is not allowed"
                );
                m.commit(t)?;
                let t3 = Instant::now();
                mask.push((t1 - t0).as_secs_f64() * 1e3);
                additive.push((t2 - t1).as_secs_f64() * 1e3);
                commit.push((t3 - t2).as_secs_f64() * 1e3);
            }
            anyhow::ensure!(m.is_complete(), "{name}: the answer is not complete");
        }
        let stats = |mut v: Vec<f64>| {
            let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
            v.sort_by(f64::total_cmp);
            let p99 = v[((v.len() as f64 * 0.99) as usize).min(v.len() - 1)];
            serde_json::json!({"mean_ms": mean, "p99_ms": p99})
        };
        out.insert(
            name.into(),
            serde_json::json!({"tokens": answer.len(), "mask": stats(mask),
                "additive_mask": stats(additive), "commit": stats(commit)}),
        );
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}

#[cfg(not(any(
    feature = "llama",
    not(all(target_os = "macos", target_arch = "aarch64"))
)))]
fn mask_bench(_: &std::path::Path, _: usize) -> anyhow::Result<()> {
    anyhow::bail!("--mask-gguf needs the llama.cpp engine: build with --features llama")
}
