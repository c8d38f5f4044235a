//! Parity of the Rust Gemma 4 against mlx-lm on the project's fixture models (scripts/fixtures.sh makes
//! them, with mlx-lm's logits and greedy continuations as the reference).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::path::PathBuf;

use std::ops::ControlFlow;

use jemma_engine::generate::{DEFAULT_PREFILL_STEP, GenerateOptions, generate};
use jemma_engine::models::gemma4;
use mlx_rs::{Array, Dtype};

fn fixture(name: &str) -> PathBuf {
    jemma_fixtures::fixture(name, "reference.json")
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

/// The tiny fixture with its tokenizer and its vocabulary as llguidance reads it (constrained decoding).
fn tiny_constrained() -> (
    gemma4::Gemma4,
    gemma4::ModelConfig,
    jemma_engine::tokenizer::Tokenizer,
    std::sync::Arc<jemma_constrain::Vocabulary>,
) {
    let dir = fixture("tiny");
    let (model, cfg, _) = gemma4::load(&dir, None).unwrap();
    let tok = jemma_engine::tokenizer::Tokenizer::from_model_dir(&dir, &cfg.eos_token_ids).unwrap();
    let tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab =
        jemma_constrain::Vocabulary::from_tokenizer_json(&tj, cfg.text.vocab_size, &tok.eos_ids);
    (model, cfg, tok, std::sync::Arc::new(vocab.unwrap()))
}

/// The tokens `model` generates after a short chat prompt under `opts`, and whether a stop token (not
/// `max_tokens`) ended them.
fn answer(model: &gemma4::Gemma4, opts: &GenerateOptions) -> (Vec<u32>, bool) {
    let mut ids = vec![];
    let stats = generate(model, &[2, 105, 300, 301, 106, 105], opts, |s| {
        ids.push(s.token);
        ControlFlow::Continue(())
    })
    .unwrap();
    (ids, stats.stop_token.is_some())
}

/// Constrained decoding (llguidance) on random weights, where only the mask can make output valid: over 20
/// seeds at temperature 1, every answer that ends is what its constraint says — a JSON object; an object
/// with the schema's required keys and types (OpenAI's `json_schema` example); exactly one Gemma 4 tool call
/// to the offered function with a string `city` — and enough of them end for the check to mean something.
#[test]
fn constrained_answers_follow_their_grammar_on_random_weights() {
    use jemma_constrain::{Constraint, ToolSpec};
    use serde_json::json;
    let (model, _, tok, vocab) = tiny_constrained();
    // Bounded so that random weights reach the end: a random string only ends when `"` is drawn.
    let city = json!({"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
        "required": ["name", "population"], "additionalProperties": false});
    let weather = ToolSpec {
        name: "get_weather".into(),
        parameters: json!({"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 10},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer"}}, "required": ["city"]}),
    };
    let cases: Vec<(&str, Constraint)> = vec![
        ("json_object", Constraint::JsonObject),
        (
            "json_schema",
            Constraint::JsonSchema {
                schema: city.clone(),
                strict: true,
            },
        ),
        // Thinking on: the model may think first; the schema holds for what follows the thought.
        (
            "json_schema after thinking",
            Constraint::AfterThinking(Box::new(Constraint::JsonSchema {
                schema: city,
                strict: true,
            })),
        ),
        (
            "tool call",
            Constraint::ToolCalls {
                tools: vec![weather],
                parallel: false,
            },
        ),
    ];
    for (what, constraint) in cases {
        let mut finished = 0;
        for seed in 0..20u64 {
            let opts = GenerateOptions {
                max_tokens: 128,
                stop_tokens: tok.eos_ids.clone(),
                constraint: Some((vocab.clone(), constraint.clone())),
                sampling: jemma_engine::sample::SamplingParams {
                    temperature: 1.0,
                    seed: Some(seed),
                    ..Default::default()
                },
                ..Default::default()
            };
            let (ids, ended) = answer(&model, &opts);
            if !ended {
                continue;
            }
            finished += 1;
            let out: Vec<u8> = ids.iter().flat_map(|&t| tok.token_bytes(t)).collect();
            let text = String::from_utf8(out).unwrap();
            match what {
                "json_object" => match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(v) => assert!(v.is_object(), "{text}"),
                    // Valid JSON that serde_json cannot hold in an f64 (such as 1e999): still an object.
                    Err(e) if e.to_string().starts_with("number out of range") => {
                        assert!(text.starts_with('{') && text.ends_with('}'), "{text}")
                    }
                    Err(e) => panic!("{e}: {text}"),
                },
                "json_schema" | "json_schema after thinking" => {
                    let (content, _, _) = jemma_chat::tools::split_output(&text);
                    let json = if what == "json_schema" {
                        &text
                    } else {
                        &content
                    };
                    let v: serde_json::Value = serde_json::from_str(json.trim_start()).unwrap();
                    let o = v.as_object().unwrap();
                    let name = o["name"].as_str().unwrap();
                    let population = o["population"].as_i64().unwrap();
                    assert!(name.chars().count() <= 8, "{text}");
                    assert!((0..=99_999_999).contains(&population), "{text}");
                    assert_eq!(o.len(), 2, "{text}");
                }
                _ => {
                    let (content, _, calls) = jemma_chat::tools::split_output(&text);
                    assert_eq!(calls.len(), 1, "{text}");
                    assert_eq!(calls[0].name, "get_weather");
                    let args = calls[0].arguments.as_object().unwrap();
                    assert!(
                        args["city"].as_str().unwrap().chars().count() <= 10,
                        "{text}"
                    );
                    assert!(
                        args.keys()
                            .all(|k| ["city", "unit", "days"].contains(&k.as_str()))
                    );
                    if let Some(u) = args.get("unit") {
                        assert!(u == "celsius" || u == "fahrenheit", "{text}");
                    }
                    if let Some(d) = args.get("days") {
                        assert!(d.is_i64(), "{text}");
                    }
                    assert!(content.is_empty(), "{text}");
                }
            }
        }
        eprintln!("{what}: {finished}/20 answers ended within 128 tokens, all valid");
        assert!(finished >= 3, "{what}: only {finished}/20 answers ended");
    }
}

/// `tool_choice: "auto"` with a strict function (a lazy grammar): before the model opens a call, an answer
/// is token for token what it is with no constraint (same seed, same draws); once it opens one, the call is
/// valid against the function's schema and the answer ends after it. A bias on `<|tool_call>` makes the
/// random model open calls at varied points: at the first token with a large bias (the step sampled ahead
/// of it, unmasked, must be drawn again under the mask), mid-answer with a small one.
#[test]
fn a_lazy_tool_grammar_is_free_until_the_call_opens_then_holds() {
    use jemma_constrain::{Constraint, ToolSpec};
    use serde_json::json;
    let (model, cfg, tok, vocab) = tiny_constrained();
    let trigger = vocab.special_token("<|tool_call>").unwrap();
    let constraint = Constraint::LazyToolCalls {
        tools: vec![ToolSpec {
            name: "get_weather".into(),
            parameters: json!({"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
                "additionalProperties": false}),
        }],
        parallel: false,
    };
    // About one chance in nine per token to open a call, on a random model's near-uniform logits.
    let mid = (cfg.text.vocab_size as f32 / 8.0).ln();
    let (mut opened_first, mut opened_later, mut valid) = (0, 0, 0);
    for (bias, seeds) in [(100.0, 0..4u64), (mid, 0..16u64)] {
        for seed in seeds {
            let run = |c: Option<Constraint>| {
                let opts = GenerateOptions {
                    max_tokens: 96,
                    stop_tokens: tok.eos_ids.clone(),
                    constraint: c.map(|c| (vocab.clone(), c)),
                    sampling: jemma_engine::sample::SamplingParams {
                        temperature: 1.0,
                        seed: Some(seed),
                        logit_bias: vec![(trigger, bias)],
                        ..Default::default()
                    },
                    ..Default::default()
                };
                answer(&model, &opts)
            };
            let text = |ids: &[u32]| {
                let bytes: Vec<u8> = ids.iter().flat_map(|&t| tok.token_bytes(t)).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            };
            let (free, _) = run(None);
            let (lazy, ended) = run(Some(constraint.clone()));
            let what = format!("seed {seed}, bias {bias}");
            match jemma_fixtures::checks::lazy_call_answer(&text(&free), &text(&lazy), ended, &what)
            {
                None => continue,
                Some(0) => opened_first += 1,
                Some(_) => opened_later += 1,
            }
            valid += usize::from(ended);
        }
    }
    eprintln!("calls opened first {opened_first}, later {opened_later}; {valid} ended, all valid");
    assert!(opened_first >= 2 && opened_later >= 2 && valid >= 3);
}

/// A JSON response format with tools under auto: every answer that ends is the JSON (valid against its
/// schema) or one valid call, never text (the grammar leaves the random model `{` or `<|tool_call>` to
/// start with, and it takes either).
#[test]
fn an_answer_is_the_json_or_a_call() {
    use jemma_constrain::{Constraint, ToolSpec};
    use serde_json::json;
    let (model, _, tok, vocab) = tiny_constrained();
    let trigger = vocab.special_token("<|tool_call>").unwrap();
    let constraint = Constraint::JsonOrToolCalls {
        json: Box::new(Constraint::JsonSchema {
            schema: json!({"type": "object", "properties": {"n": {"type": "integer"}},
                "required": ["n"], "additionalProperties": false}),
            strict: true,
        }),
        tools: vec![ToolSpec {
            name: "get_weather".into(),
            parameters: json!({"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
                "additionalProperties": false}),
        }],
        parallel: false,
    };
    let (mut answers, mut calls) = (0, 0);
    for seed in 0..12u64 {
        let opts = GenerateOptions {
            max_tokens: 64,
            stop_tokens: tok.eos_ids.clone(),
            constraint: Some((vocab.clone(), constraint.clone())),
            sampling: jemma_engine::sample::SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..Default::default()
            },
            ..Default::default()
        };
        let (ids, ended) = answer(&model, &opts);
        if !ended {
            continue;
        }
        let bytes: Vec<u8> = ids.iter().flat_map(|&t| tok.token_bytes(t)).collect();
        let text = String::from_utf8(bytes).unwrap();
        if ids[0] == trigger {
            jemma_fixtures::checks::lazy_call_answer(&text, &text, true, &format!("seed {seed}"));
            calls += 1;
        } else {
            // `{"n": <an integer of any size>}` (serde_json holds a huge one as a float, so read the text).
            let n = text
                .strip_prefix("{\"n\": ")
                .and_then(|t| t.strip_suffix('}'));
            let n = n.unwrap_or_else(|| panic!("{text}"));
            let digits = n.strip_prefix('-').unwrap_or(n);
            assert!(
                !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
                "{text}"
            );
            answers += 1;
        }
    }
    eprintln!("{answers} JSON answers, {calls} calls");
    assert!(answers >= 1 && calls >= 1);
}

/// A thinking budget (`thinking_token_budget`): an answer is the unbudgeted one (same seed, same draws) up
/// to the token where its thought has spent the budget; that token is the thought's end (`<channel|>`), and
/// the answer's thoughts never hold more than the budget. A bias on `<|channel>` makes the random model
/// open thoughts, at once (a large bias: it reopens them at once too, each closed at once) or mid-answer.
#[test]
fn a_thinking_budget_ends_the_thought_where_it_is_spent() {
    use jemma_engine::tokenizer::Tokenizer;
    use jemma_serve::thinking::{ThinkingBudget, ThoughtMarkers};
    let dir = fixture("tiny");
    let (model, cfg, _) = gemma4::load(&dir, None).unwrap();
    let tok = Tokenizer::from_model_dir(&dir, &cfg.eos_token_ids).unwrap();
    let markers = ThoughtMarkers {
        open: tok.token_id("<|channel>").unwrap(),
        close: tok.token_id("<channel|>").unwrap(),
    };
    let budget = 3;
    let mid = (cfg.text.vocab_size as f32 / 8.0).ln();
    let mut forced = 0;
    for (bias, seeds) in [(100.0, 0..2u64), (mid, 0..12u64)] {
        for seed in seeds {
            let run = |thinking: Option<ThinkingBudget>| {
                let opts = GenerateOptions {
                    max_tokens: 48,
                    stop_tokens: tok.eos_ids.clone(),
                    thinking,
                    sampling: jemma_engine::sample::SamplingParams {
                        temperature: 1.0,
                        seed: Some(seed),
                        logit_bias: vec![(markers.open, bias)],
                        ..Default::default()
                    },
                    ..Default::default()
                };
                answer(&model, &opts).0
            };
            let texts = |ids: Vec<u32>| -> Vec<String> {
                (ids.iter())
                    .map(|&t| String::from_utf8_lossy(&tok.token_bytes(t)).into_owned())
                    .collect()
            };
            let free = texts(run(None));
            let capped = texts(run(Some(ThinkingBudget::new(budget, markers))));
            let what = format!("seed {seed}, bias {bias}");
            if jemma_fixtures::checks::budgeted_answer(&free, &capped, budget, &what) {
                forced += 1;
            }
        }
    }
    eprintln!("{forced} of 14 answers had a thought ended by the budget");
    assert!(forced >= 4, "{forced}");
}

/// A thinking budget under a grammar that lets the model think first (JSON after thinking): the budget may
/// end a thought at any token, even before its name (`thought`), and the JSON follows. Budgets 0 and 1 with
/// thoughts opened at once (a bias on `<|channel>`): every answer's thought ends at the budget (or once the
/// character it is in is whole), then a JSON object.
#[test]
fn a_thinking_budget_ends_a_thought_before_a_json_answer() {
    use jemma_constrain::Constraint;
    use jemma_serve::thinking::{ThinkingBudget, ThoughtMarkers};
    let (model, _, tok, vocab) = tiny_constrained();
    let markers = ThoughtMarkers {
        open: tok.token_id("<|channel>").unwrap(),
        close: tok.token_id("<channel|>").unwrap(),
    };
    for budget in [0, 1] {
        let mut finished = 0;
        for seed in 0..6u64 {
            let opts = GenerateOptions {
                max_tokens: 64,
                stop_tokens: tok.eos_ids.clone(),
                constraint: Some((
                    vocab.clone(),
                    Constraint::AfterThinking(Box::new(Constraint::JsonObject)),
                )),
                thinking: Some(ThinkingBudget::new(budget, markers)),
                sampling: jemma_engine::sample::SamplingParams {
                    temperature: 1.0,
                    seed: Some(seed),
                    logit_bias: vec![(markers.open, 100.0)],
                    ..Default::default()
                },
                ..Default::default()
            };
            let (ids, ended) = answer(&model, &opts);
            assert_eq!(ids[0], markers.open, "seed {seed}: {ids:?}");
            // The thought ends at the budget, or as soon as the grammar allows after it: a byte-level
            // token that starts a character leaves the thought's text mid-character until the character
            // is whole (at most 3 more bytes).
            let close = ids.iter().position(|&t| t == markers.close).unwrap();
            assert!(
                (1 + budget..=4 + budget).contains(&close),
                "budget {budget}, seed {seed}: {ids:?}"
            );
            if ended {
                let json: Vec<u8> = ids[close + 1..]
                    .iter()
                    .flat_map(|&t| tok.token_bytes(t))
                    .collect();
                let json = String::from_utf8(json).unwrap();
                let v: serde_json::Value = serde_json::from_str(json.trim_start())
                    .or_else(|e| {
                        // Valid JSON that serde_json cannot hold in an f64 (such as 1e999).
                        if e.to_string().starts_with("number out of range") {
                            Ok(serde_json::json!({}))
                        } else {
                            Err(e)
                        }
                    })
                    .unwrap();
                assert!(v.is_object(), "{json}");
                finished += 1;
            }
        }
        assert!(finished >= 2, "budget {budget}: {finished} of 6 ended");
    }
}

/// `logprobs` report the model's own distribution (log-softmax of its raw logits, before `logit_bias`,
/// penalties and temperature), as llama.cpp's engine and vLLM's default do: a bias that forces the
/// runner-up leaves every reported number as mlx-lm's logits give it.
#[test]
fn logprobs_are_the_models_own_before_logit_bias() {
    use jemma_engine::generate::TokenLogprobs;
    use jemma_engine::sample::SamplingParams;
    let dir = fixture("tiny");
    let (model, _, _) = gemma4::load(&dir, None).unwrap();
    let r = reference(&dir);
    let (p, ids, _) = &r.prompts[0];
    let prompt: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
    let first = |sampling: SamplingParams| -> (u32, TokenLogprobs) {
        let opts = GenerateOptions {
            max_tokens: 1,
            logprobs: true,
            top_logprobs: 5,
            sampling,
            ..Default::default()
        };
        let mut got = None;
        generate(&model, &prompt, &opts, |s| {
            got = Some((s.token, s.logprobs.clone().unwrap()));
            ControlFlow::Continue(())
        })
        .unwrap();
        got.unwrap()
    };
    // mlx-lm's last-position logits of the prompt, log-softmaxed: the numbers to report.
    let want_logits = r.logits[&format!("{p}.logits")].as_slice::<f32>().to_vec();
    let best = (0..want_logits.len())
        .max_by(|&a, &b| want_logits[a].total_cmp(&want_logits[b]))
        .unwrap();
    let (want_lp, want_top) = jemma_chat::logprobs::log_softmax_top(&want_logits, best, 5);
    let (plain, plain_lp) = first(SamplingParams::default());
    assert_eq!(plain as usize, best);
    assert!((plain_lp.logprob - want_lp).abs() < 1e-4);
    let runner_up = want_top[1].0;
    let (biased, biased_lp) = first(SamplingParams {
        logit_bias: vec![(runner_up, 50.0)],
        repetition_penalty: Some(1.5),
        ..Default::default()
    });
    assert_eq!(biased, runner_up, "the bias chose the runner-up");
    // Under the bias the runner-up's own probability would read ~0 (log p ≈ 0): it reads the model's.
    assert!(
        (biased_lp.logprob - want_top[1].1).abs() < 1e-4,
        "{} vs mlx-lm's {}",
        biased_lp.logprob,
        want_top[1].1
    );
    assert!(
        biased_lp.logprob < -1e-3,
        "the reported log p is the biased one"
    );
    assert_eq!(biased_lp.top.len(), 5);
    for ((id, lp), (wid, wlp)) in biased_lp.top.iter().zip(&want_top) {
        assert_eq!(id, wid);
        assert!((lp - wlp).abs() < 1e-4, "token {id}: {lp} vs {wlp}");
    }
}

/// The same rule over a whole biased, penalised answer on the pipelined decode path: every entry is the
/// log-softmax of the logits a fresh forward of its context gives, while the bias changes which tokens
/// are chosen. (Speculative decoding reports what plain decoding does: `speculative.rs`.)
#[test]
fn logprobs_stay_the_models_own_over_a_biased_answer() {
    use jemma_engine::sample::SamplingParams;
    let dir = fixture("tiny");
    let (model, _, _) = gemma4::load(&dir, None).unwrap();
    let r = reference(&dir);
    let (_, ids, _) = &r.prompts[0];
    let prompt: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
    let opts = GenerateOptions {
        max_tokens: 8,
        stop_tokens: vec![],
        logprobs: true,
        top_logprobs: 5,
        sampling: SamplingParams {
            logit_bias: vec![(300, 6.0), (301, 6.0)],
            repetition_penalty: Some(1.3),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut steps = vec![];
    generate(&model, &prompt, &opts, |s| {
        steps.push((s.token, s.logprobs.clone().unwrap()));
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(steps.len(), 8);
    let mut off_argmax = 0;
    for (i, (token, lp)) in steps.iter().enumerate() {
        let context: Vec<i32> = prompt
            .iter()
            .chain(steps[..i].iter().map(|(t, _)| t))
            .map(|&t| t as i32)
            .collect();
        let logits = model
            .forward_last_logits(
                &Array::from_slice(&context, &[1, context.len() as i32]),
                &mut model.new_cache(),
            )
            .unwrap()
            .reshape(&[-1])
            .unwrap()
            .as_dtype(Dtype::Float32)
            .unwrap();
        let raw = logits.as_slice::<f32>();
        let (want, want_top) = jemma_chat::logprobs::log_softmax_top(raw, *token as usize, 5);
        assert!(
            (lp.logprob - want).abs() < 1e-4,
            "token {i}: {} vs {want}",
            lp.logprob
        );
        for ((id, got), (wid, w)) in lp.top.iter().zip(&want_top) {
            assert_eq!(id, wid, "token {i}");
            assert!((got - w).abs() < 1e-4, "token {i}");
        }
        off_argmax += usize::from(want_top[0].0 != *token);
    }
    assert!(
        off_argmax > 0,
        "the bias never changed a choice: the test proves nothing"
    );
}

/// A packed prefill (`forward_hidden_packed`: several sequences' chunks end to end in one forward) reads
/// what each sequence reads alone. Three caches at offsets 0, 9 and 20 read chunks of 7, 13 and 30 tokens
/// (the tiny models' sliding window is 16: the chunks cross it at different offsets, so each needs its own
/// masks); on each fixture the hidden states agree with the lone reads to 1e-4 (to the rounding of the
/// larger matrix products), and so do the next step's logits, which read what the packed forward left in
/// each cache. A chunk read at another offset is off by far more.
#[test]
fn a_packed_prefill_reads_what_each_sequence_reads_alone() {
    use mlx_rs::ops::indexing::TryIndexOp;
    let tok = |seed: i32, n: i32| -> Vec<i32> {
        (0..n).map(|k| 300 + (k * 37 + seed * 11) % 700).collect()
    };
    for name in ["tiny", "tiny-q4", "moe", "moe-q4"] {
        let (model, _, _) = gemma4::load(&fixture(name), None).unwrap();
        let (offsets, lens) = ([0, 9, 20], [7usize, 13, 30]);
        let mut caches: Vec<gemma4::Cache> = (0..3).map(|_| model.new_cache()).collect();
        for (i, (&off, c)) in offsets.iter().zip(&mut caches).enumerate() {
            if off > 0 {
                let ids = Array::from_slice(&tok(i as i32, off), &[1, off]);
                model.forward_hidden(&ids, c).unwrap();
                mlx_rs::transforms::eval(c.state()).unwrap();
            }
        }
        let chunks: Vec<Vec<i32>> = (0..3).map(|i| tok(10 + i as i32, lens[i] as i32)).collect();
        // Alone: each on a copy of its cache.
        let mut alone_caches: Vec<gemma4::Cache> = caches.clone();
        let alone: Vec<Array> = chunks
            .iter()
            .zip(&mut alone_caches)
            .map(|(c, cache)| {
                let ids = Array::from_slice(c, &[1, c.len() as i32]);
                model.forward_hidden(&ids, cache).unwrap()
            })
            .collect();
        let all: Vec<i32> = chunks.concat();
        let ids = Array::from_slice(&all, &[1, all.len() as i32]);
        let packed = {
            let mut refs: Vec<&mut gemma4::Cache> = caches.iter_mut().collect();
            model.forward_hidden_packed(&ids, &lens, &mut refs).unwrap()
        };
        assert_eq!(packed.shape()[1] as usize, lens.iter().sum::<usize>());
        let mut at = 0i32;
        for (i, a) in alone.iter().enumerate() {
            let n = lens[i] as i32;
            let p = packed.try_index((.., at..at + n, ..)).unwrap();
            at += n;
            let d = max_abs_diff(&p, a);
            eprintln!("{name}: sequence {i}: max |Δhidden| {d:e}");
            assert!(
                d <= 1e-4,
                "{name}: sequence {i}: hidden states differ by {d}"
            );
            // The next step reads each cache: what the packed forward left there is what a lone read
            // leaves.
            let next = Array::from_slice(&[500 + i as i32], &[1, 1]);
            let want = model
                .forward_last_logits(&next, &mut alone_caches[i])
                .unwrap();
            let got = model.forward_last_logits(&next, &mut caches[i]).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d <= 1e-4, "{name}: sequence {i}: next logits differ by {d}");
            if offsets[i] > 0 {
                // The comparison can fail: the same chunk read from the start of a sequence (another
                // offset, another cache) is far off.
                let ids = Array::from_slice(&chunks[i], &[1, lens[i] as i32]);
                let fresh = model.forward_hidden(&ids, &mut model.new_cache()).unwrap();
                assert!(
                    max_abs_diff(&p, &fresh) > 1e-2,
                    "{name}: offsets make no difference"
                );
            }
        }
        // A packing that does not add up is refused, not read.
        let mut refs: Vec<&mut gemma4::Cache> = caches.iter_mut().collect();
        assert!(
            model
                .forward_hidden_packed(&ids, &[7, 13, 29], &mut refs)
                .is_err()
        );
    }
}
