//! Speculative decoding, timed against plain decoding in one run (scripts/bench-spec): greedy decode speed of
//! the target alone, then with an oracle drafter (the plain run's own tokens replayed: every draft stands at
//! no drafting cost, which bounds what any drafter can gain and isolates the batched verification), a random
//! drafter (almost no draft stands: the cost of speculating for nothing, with and without the adaptive
//! controller), and a draft model, when one is given. Every run must yield the plain run's tokens.
//!
//! Usage: bench_spec TARGET_DIR [DRAFT_DIR|-] PROMPT_IDS GEN K → one JSON object: per run, decode tokens/s
//! (generated tokens over the time from the end of the prompt to the last token), drafts proposed and
//! accepted, verifications, and whether the tokens equal the plain run's.

use std::time::Instant;

use jemma_engine::generate::{GenerateOptions, Generation};
use jemma_engine::models::gemma4::{self, Gemma4};
use jemma_engine::speculative::{
    DraftState, Drafter, ModelDrafter, MtpDrafter, RandomDrafter, RecordedDrafter,
};
use jemma_serve::speculative::{Controller, SpeculativeConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

/// One timed greedy run of `n_gen` tokens; `drafter` None decodes plainly; `keep_hidden` for a drafter that
/// reads the target's hidden state (the MTP assistant).
fn run(
    model: &Gemma4,
    prompt: &[u32],
    n_gen: usize,
    drafter: Option<(&mut dyn Drafter, SpeculativeConfig)>,
    keep_hidden: bool,
) -> Result<(Vec<u32>, Value), Box<dyn std::error::Error>> {
    let opts = GenerateOptions {
        max_tokens: n_gen,
        stop_tokens: vec![],
        ..Default::default()
    };
    let mut g = Generation::new(model, prompt, opts)?;
    g.keep_hidden(keep_hidden);
    while !g.prefill(model)? {}
    let mut tokens = Vec::with_capacity(n_gen);
    let mut rng = StdRng::seed_from_u64(0);
    let t0 = Instant::now();
    match drafter {
        None => {
            while let Some(s) = g.next_token(model)? {
                tokens.push(s.token);
            }
        }
        Some((drafter, config)) => {
            let mut c = Controller::new(config);
            let mut after_round = false;
            while !g.is_finished() {
                let k = c.next_k(1, g.room());
                if k == 0 {
                    let t = Instant::now();
                    if let Some(s) = g.next_token(model)? {
                        tokens.push(s.token);
                    }
                    // As the runtime: the first plain step after a round starts on a token already read.
                    if !std::mem::take(&mut after_round) {
                        c.record_plain(t.elapsed());
                    }
                } else {
                    after_round = true;
                    let r = g.speculate(model, drafter, k, &mut rng)?;
                    c.record_round(r.drafted, r.accepted, r.draft_time, r.verify_time);
                    tokens.extend(r.steps.iter().map(|s| s.token));
                }
            }
            let s = c.stats();
            let secs = t0.elapsed().as_secs_f64();
            return Ok((
                tokens.clone(),
                json!({
                    "decode_tps": tokens.len() as f64 / secs,
                    "verify_steps": s.rounds,
                    "drafted": s.drafted,
                    "accepted": s.accepted,
                    "plain_steps": s.plain_steps,
                    "acceptance_rate": s.acceptance_rate(),
                    "tokens_per_step": s.tokens_per_step(),
                }),
            ));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok((
        tokens.clone(),
        json!({ "decode_tps": tokens.len() as f64 / secs }),
    ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, target, draft, ids, n_gen, k, rest @ ..] = &args[..] else {
        return Err(
            "usage: bench_spec TARGET_DIR [DRAFT_DIR|-] PROMPT_IDS GEN K [ASSISTANT_DIR]".into(),
        );
    };
    let (n_gen, k): (usize, usize) = (n_gen.parse()?, k.parse()?);
    let prompt: Vec<u32> = ids
        .split(',')
        .map(|t| t.trim().parse())
        .collect::<Result<_, _>>()?;
    // The engine's per-device default (float32 on a CPU, the checkpoint's dtype on a GPU).
    let dtype = jemma_engine::runtime::default_dtype(jemma_engine::device::select_device()?);
    let model = gemma4::load(std::path::Path::new(target), dtype)?.0;
    let fixed = SpeculativeConfig {
        max_draft_tokens: k,
        adaptive: false,
        ..Default::default()
    };
    let adaptive = SpeculativeConfig {
        max_draft_tokens: k,
        ..Default::default()
    };
    // A warm-up run (MLX compiles and allocates on first use), then the plain reference.
    run(&model, &prompt, n_gen.min(8), None, false)?;
    let (plain, plain_fig) = run(&model, &prompt, n_gen, None, false)?;
    let mut out = serde_json::Map::new();
    out.insert("plain".into(), plain_fig);
    let mut record = |name: &str, r: (Vec<u32>, Value)| {
        let (tokens, mut fig) = r;
        fig["same_tokens"] = json!(tokens == plain);
        out.insert(name.into(), fig);
    };
    let vocab = model.config().vocab_size;
    let mut oracle = RecordedDrafter {
        tokens: prompt.iter().chain(&plain).copied().collect(),
        vocab,
    };
    record(
        "oracle",
        run(
            &model,
            &prompt,
            n_gen,
            Some((&mut oracle, fixed.clone())),
            false,
        )?,
    );
    for (name, config) in [("random_adaptive", &adaptive), ("random_fixed", &fixed)] {
        let mut random = RandomDrafter {
            vocab,
            rng: StdRng::seed_from_u64(1),
        };
        record(
            name,
            run(
                &model,
                &prompt,
                n_gen,
                Some((&mut random, config.clone())),
                false,
            )?,
        );
    }
    if draft != "-" {
        let d = gemma4::load(std::path::Path::new(draft), dtype)?.0;
        for (name, config) in [("draft_adaptive", &adaptive), ("draft_fixed", &fixed)] {
            let mut state = DraftState::default();
            let mut drafter = ModelDrafter {
                model: &d,
                state: &mut state,
            };
            record(
                name,
                run(
                    &model,
                    &prompt,
                    n_gen,
                    Some((&mut drafter, config.clone())),
                    false,
                )?,
            );
        }
    }
    if let Some(dir) = rest.first() {
        let m = gemma4::Gemma4Assistant::load(std::path::Path::new(dir), dtype)?;
        m.check_target(&model)?;
        for (name, config) in [("mtp_adaptive", &adaptive), ("mtp_fixed", &fixed)] {
            let mut state = DraftState::default();
            let mut drafter = MtpDrafter {
                model: &m,
                state: &mut state,
            };
            record(
                name,
                run(
                    &model,
                    &prompt,
                    n_gen,
                    Some((&mut drafter, config.clone())),
                    true,
                )?,
            );
        }
    }
    println!("{}", Value::Object(out));
    Ok(())
}
