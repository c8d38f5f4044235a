//! Parity of the Rust Gemma 4 against mlx-lm on the project's fixture models (scripts/fixtures.sh makes
//! them, with mlx-lm's logits and greedy continuations as the reference).

use std::path::PathBuf;

use std::ops::ControlFlow;

use jemma_engine::generate::{DEFAULT_PREFILL_STEP, GenerateOptions, generate};
use jemma_engine::models::gemma4;
use mlx_rs::{Array, Dtype};

fn fixture(name: &str) -> PathBuf {
    let root = std::env::var("JEMMA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"));
    let dir = root.join(name);
    assert!(
        dir.join("reference.json").exists(),
        "fixture {} missing: run scripts/fixtures.sh",
        dir.display()
    );
    dir
}

struct Reference {
    prompts: Vec<(String, Vec<i32>, Vec<i32>)>,
    logits: std::collections::HashMap<String, Array>,
}

fn reference(dir: &std::path::Path) -> Reference {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let mut prompts = vec![];
    for (name, p) in meta["prompts"].as_object().unwrap() {
        let ids = p["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap() as i32)
            .collect();
        let greedy = p["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap() as i32)
            .collect();
        prompts.push((name.clone(), ids, greedy));
    }
    let logits = Array::load_safetensors(dir.join("reference.safetensors")).unwrap();
    Reference { prompts, logits }
}

fn max_abs_diff(a: &Array, b: &Array) -> f32 {
    let d = mlx_rs::ops::abs(mlx_rs::ops::subtract(a, b).unwrap())
        .unwrap()
        .max(None)
        .unwrap();
    d.item_cast::<f32>()
}

fn check_logits(name: &str) {
    let dir = fixture(name);
    let (model, _, report) = gemma4::load(&dir, None).unwrap();
    assert_eq!(report.dtype, "float32");
    let r = reference(&dir);
    for (p, ids, _) in &r.prompts {
        let mut cache = model.new_cache();
        let x = Array::from_slice(ids, &[1, ids.len() as i32]);
        let logits = model
            .forward_last_logits(&x, &mut cache)
            .unwrap()
            .reshape(&[-1])
            .unwrap();
        let want = &r.logits[&format!("{p}.logits")];
        let d = max_abs_diff(&logits.as_dtype(Dtype::Float32).unwrap(), want);
        eprintln!("{name}/{p}: max |Δlogit| = {d:.3e}");
        assert!(d <= 1e-4, "{name}/{p}: max |Δlogit| = {d}");
        // The comparison itself must be able to fail: another prompt's logits are far off.
        let other = r
            .logits
            .iter()
            .find(|(k, _)| **k != format!("{p}.logits"))
            .unwrap()
            .1;
        assert!(
            max_abs_diff(&logits, other) > 1e-2,
            "reference logits do not depend on the prompt"
        );
    }
}

#[test]
fn tiny_dense_logits_match_mlx_lm() {
    check_logits("tiny");
}

#[test]
fn moe_logits_match_mlx_lm() {
    check_logits("moe");
}

#[test]
fn tiny_q4_logits_match_mlx_lm() {
    check_logits("tiny-q4");
}

#[test]
fn moe_q4_logits_match_mlx_lm() {
    check_logits("moe-q4");
}

fn check_greedy(name: &str, prefill_step: usize) {
    let dir = fixture(name);
    let (model, _, _) = gemma4::load(&dir, None).unwrap();
    let r = reference(&dir);
    for (p, ids, want) in &r.prompts {
        let prompt: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
        let opts = GenerateOptions {
            max_tokens: want.len(),
            prefill_step,
            ..Default::default()
        };
        let mut got = vec![];
        let stats = generate(&model, &prompt, &opts, |s| {
            got.push(s.token as i32);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(stats.completion_tokens, want.len());
        assert_eq!(&got, want, "{name}/{p} (prefill step {prefill_step})");
    }
}

#[test]
fn greedy_64_tokens_match_mlx_lm_for_every_variant() {
    // The long prompt (41 tokens) plus 64 decoded tokens runs far past the 16-token sliding window and
    // through the KV-shared layers.
    for name in ["tiny", "moe", "tiny-q4", "moe-q4"] {
        check_greedy(name, DEFAULT_PREFILL_STEP);
    }
}

#[test]
fn chunked_prefill_gives_the_same_tokens() {
    // 7-token chunks exercise the rotating cache's concat path across window boundaries.
    for name in ["tiny", "moe"] {
        check_greedy(name, 7);
    }
}

#[test]
fn quantized_kv_cache_matches_mlx_lm_greedy() {
    // kv_bits quantizes the full-attention caches from position 0 (the sliding windows stay in full
    // precision); the reference is mlx-lm with that rule (scripts/fixtures/gen_gemma4.py).
    use jemma_engine::models::gemma4::KvQuant;
    for name in ["tiny", "moe"] {
        let dir = fixture(name);
        let (model, _, _) = gemma4::load(&dir, None).unwrap();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        for bits in [8, 4] {
            for (p, v) in meta["prompts"].as_object().unwrap() {
                let key = format!("greedy_kv{bits}");
                let want: Vec<i32> = v[&key]
                    .as_array()
                    .unwrap_or_else(|| panic!("{name}: no {key}: run scripts/fixtures.sh"))
                    .iter()
                    .map(|x| x.as_i64().unwrap() as i32)
                    .collect();
                let prompt: Vec<u32> = v["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect();
                let opts = GenerateOptions {
                    max_tokens: want.len(),
                    kv_quant: Some(KvQuant {
                        bits,
                        group_size: 64,
                        start: 0,
                    }),
                    ..Default::default()
                };
                let mut got = vec![];
                generate(&model, &prompt, &opts, |s| {
                    got.push(s.token as i32);
                    ControlFlow::Continue(())
                })
                .unwrap();
                assert_eq!(got, want, "{name}/{p} kv_bits={bits}");
            }
        }
        // The quantized run really differs from the float one somewhere (the test can fail).
        let f: Vec<&serde_json::Value> = meta["prompts"].as_object().unwrap().values().collect();
        assert!(
            f.iter().any(|v| v["greedy"] != v["greedy_kv4"]),
            "{name}: 4-bit KV changed nothing"
        );
    }
}

#[test]
fn json_mode_output_is_always_a_json_object_prefix() {
    use jemma_engine::constrain::{JsonRecognizer, TokenBytes};
    use jemma_engine::tokenizer::Tokenizer;
    let dir = fixture("tiny");
    let (model, cfg, _) = gemma4::load(&dir, None).unwrap();
    let tok = Tokenizer::from_model_dir(&dir, &cfg.eos_token_ids).unwrap();
    let bytes = std::sync::Arc::new(TokenBytes::new(&tok, cfg.text.vocab_size));
    let mut finished = 0;
    for seed in 0..6u64 {
        let opts = GenerateOptions {
            max_tokens: 48,
            stop_tokens: tok.eos_ids.clone(),
            json: Some(bytes.clone()),
            sampling: jemma_engine::sample::SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut out = vec![];
        let stats = generate(&model, &[2, 105, 300, 301, 106, 105], &opts, |s| {
            out.extend_from_slice(
                bytes
                    .get(s.token)
                    .expect("JSON mode never emits special tokens"),
            );
            ControlFlow::Continue(())
        })
        .unwrap();
        let mut r = JsonRecognizer::new();
        assert!(
            r.feed_all(&out),
            "not a JSON prefix: {:?}",
            String::from_utf8_lossy(&out)
        );
        if stats.stop_token.is_some() {
            finished += 1;
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert!(v.is_object());
        }
    }
    eprintln!("{finished}/6 JSON objects completed within 48 tokens");
}
