//! Speculative decoding on the llama.cpp engine, measured (scripts/bench-spec-llama): greedy decode speed of a
//! GGUF alone and speculating with a draft GGUF (adaptive and fixed k), in one run on the same prompt, as
//! JSON: decode tokens/s, rounds, drafts and acceptance, whether each run's tokens equal the plain run's, and
//! how many leading tokens do.
//!
//! Usage: bench_spec_llama TARGET.gguf DRAFT.gguf PROMPT_TEXT GEN K
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test tool: failing loudly is its job

use jemma_engine_llama::{Event, LlamaConfig, LlamaEngine, LlamaSpeculative, Prompt, Request};
use jemma_serve::speculative::SpeculativeConfig;
use serde_json::{Value, json};

fn run(
    target: &str,
    draft: Option<(&str, SpeculativeConfig)>,
    prompt: &str,
    n_gen: usize,
) -> Result<(Vec<u32>, Value), Box<dyn std::error::Error>> {
    let mut c = LlamaConfig::new(target);
    c.context_length = Some(2048);
    c.parallel = 1;
    c.speculative = draft.map(|(d, config)| LlamaSpeculative {
        draft_model: d.into(),
        config,
        optional: false,
    });
    let e = LlamaEngine::start(c)?;
    e.wait_ready()?;
    let request = |n: usize| Request {
        ignore_eos: true,
        ..Request::new(Prompt::Text(prompt.into()), n)
    };
    let answer = |n: usize| -> Result<jemma_engine_llama::Summary, Box<dyn std::error::Error>> {
        let mut rx = e.submit(request(n))?;
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Done(s) => return Ok(s),
                Event::Error(err) => return Err(err.to_string().into()),
                _ => {}
            }
        }
        Err("no answer".into())
    };
    // A warm-up (first-use allocations), then the measured run (its prompt reused from the warm-up's slot).
    answer(8)?;
    let s = answer(n_gen)?;
    let mut fig = json!({ "decode_tps": s.decode_tps });
    if let Some(sp) = s.speculative {
        fig["verify_steps"] = json!(sp.rounds);
        fig["drafted"] = json!(sp.drafted);
        fig["accepted"] = json!(sp.accepted);
        fig["acceptance_rate"] = json!(sp.acceptance_rate());
        fig["tokens_per_step"] = json!(sp.tokens_per_step());
    }
    Ok((s.tokens, fig))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, target, draft, prompt, n_gen, k] = &args[..] else {
        return Err("usage: bench_spec_llama TARGET.gguf DRAFT.gguf PROMPT_TEXT GEN K".into());
    };
    let (n_gen, k): (usize, usize) = (n_gen.parse()?, k.parse()?);
    let (plain, fig) = run(target, None, prompt, n_gen)?;
    let mut out = serde_json::Map::new();
    out.insert("plain".into(), fig);
    for (name, adaptive) in [("draft_adaptive", true), ("draft_fixed", false)] {
        let config = SpeculativeConfig {
            max_draft_tokens: k,
            adaptive,
            ..Default::default()
        };
        let (tokens, mut fig) = run(target, Some((draft, config)), prompt, n_gen)?;
        fig["same_tokens"] = json!(tokens == plain);
        // llama.cpp's quantized CPU kernels round a verification's batch otherwise than a one-token step:
        // a greedy answer may part from plain decoding's at a near-tie, from which on they differ.
        fig["same_prefix"] = json!(
            tokens
                .iter()
                .zip(&plain)
                .take_while(|(a, b)| a == b)
                .count()
        );
        out.insert(name.into(), fig);
    }
    println!("{}", Value::Object(out));
    Ok(())
}
