//! Speculative decoding, timed against plain decoding in one run (scripts/bench-spec): greedy decode speed of
//! the target alone, then with an oracle drafter (the plain run's own tokens replayed: every draft stands at
//! no drafting cost, which bounds what any drafter can gain and isolates the batched verification), a random
//! drafter (almost no draft stands: the cost of speculating for nothing, with and without the adaptive
//! controller), and a draft model, when one is given. Every run must yield the plain run's tokens.
//!
//! With BATCH > 1, also B sequences at once, decoded plainly in batched steps and with B oracle drafters
//! whose drafts are verified together in one forward per round (the serving core's batched verification);
//! with an assistant, also B sequences drafted by it at fixed K, each alone and all together (one pass of
//! the assistant per draft step), verified together.
//!
//! Usage: bench_spec TARGET_DIR [DRAFT_DIR|-] PROMPT_IDS GEN K [ASSISTANT_DIR|-] [BATCH] → one JSON object:
//! per run, decode tokens/s (generated tokens, all sequences', over the time from the end of the prompts to
//! the last token), drafts proposed and accepted, verifications, and whether the tokens equal the plain
//! run's.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test tool: failing loudly is its job

use std::time::Instant;

use jemma_engine::generate::{GenerateOptions, Generation, RoundStart};
use jemma_engine::models::gemma4::{self, Gemma4};
use jemma_engine::speculative::{
    DraftState, Drafter, ModelDrafter, MtpBatchDrafter, MtpDrafter, RandomDrafter, RecordedDrafter,
};
use jemma_serve::speculative::{Controller, SpeculativeConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

type Error = Box<dyn std::error::Error>;

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

/// What drafts for the sequences of [`run_batch`].
#[derive(Clone, Copy)]
enum BatchDrafts<'a> {
    /// Nothing: plain batched decode steps.
    Plain,
    /// Rounds of `k` drafts replayed from the plain run's tokens.
    Oracle(&'a [u32], usize),
    /// Rounds of `k` drafts of the MTP assistant, proposed for every sequence in one batched pass per
    /// draft step (`together`) or for each sequence alone.
    Mtp(&'a gemma4::Gemma4Assistant, usize, bool),
}

/// `b` sequences of the same prompt at once, `n_gen` tokens each: plainly in batched decode steps, or in
/// speculative rounds verified together, drafted as `drafts` says. Returns each sequence's tokens and the
/// figures.
fn run_batch(
    model: &Gemma4,
    prompt: &[u32],
    n_gen: usize,
    b: usize,
    drafts: BatchDrafts<'_>,
) -> Result<(Vec<Vec<u32>>, Value), Error> {
    let opts = GenerateOptions {
        max_tokens: n_gen,
        stop_tokens: vec![],
        ..Default::default()
    };
    let mut gens = (0..b)
        .map(|_| Generation::new(model, prompt, opts.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    for g in &mut gens {
        g.keep_hidden(matches!(drafts, BatchDrafts::Mtp(..)));
        while !g.prefill(model)? {}
    }
    let mut tokens = vec![Vec::with_capacity(n_gen); b];
    // Greedy rounds draw nothing; each sequence still owns the RNG a sampled round would draw from.
    let mut rngs: Vec<StdRng> = (0..b).map(|i| StdRng::seed_from_u64(i as u64)).collect();
    let mut states: Vec<DraftState> = (0..b).map(|_| DraftState::default()).collect();
    let (mut rounds, mut drafted, mut accepted) = (0u64, 0u64, 0u64);
    let t0 = Instant::now();
    while gens.iter().any(|g| !g.is_finished()) {
        let starts: Vec<RoundStart> = match drafts {
            BatchDrafts::Plain => {
                let mut live: Vec<&mut Generation> = gens.iter_mut().collect();
                let (steps, _) = Generation::decode_batch(model, &mut live)?;
                for (t, s) in tokens.iter_mut().zip(steps) {
                    t.extend(s.map(|s| s.token));
                }
                continue;
            }
            BatchDrafts::Mtp(m, k, true) => {
                let (rows, states): (Vec<_>, Vec<_>) = gens
                    .iter_mut()
                    .zip(states.iter_mut())
                    .map(|(g, s)| {
                        let k = k.min(g.room());
                        ((g, k), s)
                    })
                    .unzip();
                let mut d = MtpBatchDrafter { model: m, states };
                Generation::draft_rounds(model, rows, &mut d)
                    .into_iter()
                    .collect::<Result<_, _>>()?
            }
            _ => gens
                .iter_mut()
                .zip(states.iter_mut())
                .map(|(g, state)| {
                    let mut oracle;
                    let mut mtp;
                    let (d, k): (&mut dyn Drafter, usize) = match drafts {
                        BatchDrafts::Oracle(replay, k) => {
                            oracle = RecordedDrafter {
                                tokens: replay.to_vec(),
                                vocab: model.config().vocab_size,
                            };
                            (&mut oracle, k)
                        }
                        BatchDrafts::Mtp(m, k, _) => {
                            mtp = MtpDrafter { model: m, state };
                            (&mut mtp, k)
                        }
                        BatchDrafts::Plain => unreachable!("plain steps draft nothing"),
                    };
                    let k = k.min(g.room());
                    g.draft_round(model, d, k)
                })
                .collect::<Result<_, _>>()?,
        };
        let mut rows = vec![];
        for (((g, t), r), start) in gens
            .iter_mut()
            .zip(tokens.iter_mut())
            .zip(rngs.iter_mut())
            .zip(starts)
        {
            match start {
                RoundStart::Done(round) => t.extend(round.steps.iter().map(|s| s.token)),
                RoundStart::Drafted(dr) => rows.push((g, dr, r, t)),
            }
        }
        let (rows, outs): (Vec<_>, Vec<_>) =
            rows.into_iter().map(|(g, d, r, t)| ((g, d, r), t)).unzip();
        for (round, t) in Generation::verify_rounds(model, rows)?
            .into_iter()
            .zip(outs)
        {
            let round = round?;
            rounds += 1;
            drafted += round.drafted as u64;
            accepted += round.accepted as u64;
            t.extend(round.steps.iter().map(|s| s.token));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let n: usize = tokens.iter().map(Vec::len).sum();
    let mut fig = json!({ "decode_tps": n as f64 / secs, "batch": b });
    if !matches!(drafts, BatchDrafts::Plain) {
        fig["verify_steps"] = json!(rounds);
        fig["acceptance_rate"] = json!(accepted as f64 / drafted.max(1) as f64);
        fig["tokens_per_step"] = json!((accepted + rounds) as f64 / rounds.max(1) as f64);
    }
    Ok((tokens, fig))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, target, draft, ids, n_gen, k, rest @ ..] = &args[..] else {
        return Err(
            "usage: bench_spec TARGET_DIR [DRAFT_DIR|-] PROMPT_IDS GEN K [ASSISTANT_DIR|-] [BATCH]"
                .into(),
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
    let assistant = match rest.first().filter(|d| *d != "-") {
        Some(dir) => {
            let m = gemma4::Gemma4Assistant::load(std::path::Path::new(dir), dtype)?;
            m.check_target(&model)?;
            Some(m)
        }
        None => None,
    };
    if let Some(m) = &assistant {
        for (name, config) in [("mtp_adaptive", &adaptive), ("mtp_fixed", &fixed)] {
            let mut state = DraftState::default();
            let mut drafter = MtpDrafter {
                model: m,
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
    let b: usize = rest.get(1).map(|b| b.parse()).transpose()?.unwrap_or(1);
    if b > 1 {
        let replay: Vec<u32> = prompt.iter().chain(&plain).copied().collect();
        let (lone, _) = run_batch(&model, &prompt, 8.min(n_gen), b, BatchDrafts::Plain)?;
        drop(lone);
        let mut runs = vec![
            ("plain_batch", BatchDrafts::Plain),
            ("oracle_batch", BatchDrafts::Oracle(&replay[..], k)),
        ];
        if let Some(m) = &assistant {
            runs.push(("mtp_alone_batch", BatchDrafts::Mtp(m, k, false)));
            runs.push(("mtp_batch", BatchDrafts::Mtp(m, k, true)));
        }
        for (name, drafts) in runs {
            let (tokens, mut fig) = run_batch(&model, &prompt, n_gen, b, drafts)?;
            fig["same_tokens"] = json!(tokens.iter().all(|t| *t == plain));
            out.insert(name.into(), fig);
        }
    }
    println!("{}", Value::Object(out));
    Ok(())
}
