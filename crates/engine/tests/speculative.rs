//! Speculative decoding on the MLX engine (issue 15): greedy output is exactly plain decoding's, token for
//! token, with a draft model (dense, MoE and 4-bit fixtures, drafting for one another), with a recorded
//! continuation (every draft stands) and with random drafts (almost none stand), at every draft length,
//! across the sliding window's edge, and when a stop token or `max_tokens` ends the answer inside a round;
//! sampled output follows the target's law (a chi-square test on the fixture's own distributions).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::ops::ControlFlow;

use jemma_engine::generate::{GenerateOptions, Generation, generate};
use jemma_engine::models::gemma4::{self, Gemma4};
use jemma_engine::sample::{Sampler, SamplingParams, log_softmax};
use jemma_engine::speculative::{
    DraftState, Drafter, ModelDrafter, RandomDrafter, RecordedDrafter,
};
use mlx_rs::{Array, Dtype};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn load(name: &str) -> Gemma4 {
    gemma4::load(&common::fixture(name), None).unwrap().0
}

fn prompts(name: &str) -> Vec<Vec<u32>> {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture(name).join("reference.json")).unwrap(),
    )
    .unwrap();
    let mut out: Vec<Vec<u32>> = meta["prompts"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| {
            p["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    out.sort_by_key(|p| p.len());
    out
}

fn opts(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        stop_tokens: vec![],
        ..Default::default()
    }
}

fn plain(model: &Gemma4, prompt: &[u32], o: &GenerateOptions) -> (Vec<u32>, String) {
    let mut out = vec![];
    let stats = generate(model, prompt, o, |s| {
        out.push(s.token);
        ControlFlow::Continue(())
    })
    .unwrap();
    (out, format!("{:?}", stats.finish_reason))
}

/// What a speculative run did.
struct Run {
    tokens: Vec<u32>,
    finish: String,
    drafted: usize,
    accepted: usize,
    cache_offset: usize,
    /// Where each quantized layer of the final cache was quantized (`kv_bits`).
    quantized_at: Vec<i32>,
}

fn speculative(
    model: &Gemma4,
    prompt: &[u32],
    o: &GenerateOptions,
    drafter: &mut dyn Drafter,
    k: usize,
) -> Run {
    let mut g = Generation::new(model, prompt, o.clone()).unwrap();
    while !g.prefill(model).unwrap() {}
    let mut rng = StdRng::seed_from_u64(7);
    let (mut tokens, mut drafted, mut accepted) = (vec![], 0, 0);
    while !g.is_finished() {
        assert!(g.can_speculate());
        let r = g.speculate(model, drafter, k, &mut rng).unwrap();
        drafted += r.drafted;
        accepted += r.accepted;
        tokens.extend(r.steps.iter().map(|s| s.token));
    }
    let finish = format!("{:?}", g.stats().finish_reason);
    assert_eq!(g.stats().completion_tokens, tokens.len());
    let (cache, fed) = g.into_cache().unwrap();
    assert_eq!(
        cache.offset() as usize,
        fed.len(),
        "the cache holds what it says"
    );
    let quantized_at = (cache.layers.iter())
        .filter_map(|l| match l {
            jemma_engine::cache::LayerCache::Quantized(q) => Some(q.quantized_at),
            _ => None,
        })
        .collect();
    Run {
        tokens,
        finish,
        drafted,
        accepted,
        cache_offset: fed.len(),
        quantized_at,
    }
}

/// Greedy speculation equals plain decoding for every pair of fixtures, draft source and draft length; 48
/// tokens run three times past the 16-token sliding window.
#[test]
fn greedy_speculation_is_plain_decoding_token_for_token() {
    for (target, draft) in [("tiny", "tiny-q4"), ("moe", "moe-q4"), ("tiny-q4", "moe")] {
        let t = load(target);
        let d = load(draft);
        for prompt in prompts(target) {
            let o = opts(48);
            let (want, finish) = plain(&t, &prompt, &o);
            assert_eq!(want.len(), 48);
            for k in [1, 3, 6] {
                let mut state = DraftState::default();
                let mut drafter = ModelDrafter {
                    model: &d,
                    state: &mut state,
                };
                let run = speculative(&t, &prompt, &o, &mut drafter, k);
                assert_eq!(
                    run.tokens,
                    want,
                    "{target} drafted by {draft}, k = {k}, prompt of {}",
                    prompt.len()
                );
                assert_eq!(run.finish, finish);
                // The last token's KV is kept when it was verified with the drafts before it.
                assert!((prompt.len() + 47..=prompt.len() + 48).contains(&run.cache_offset));
                eprintln!(
                    "{target} <- {draft}, k = {k}, prompt {}: {}/{} drafts stood",
                    prompt.len(),
                    run.accepted,
                    run.drafted
                );
                assert!(run.drafted > 0);
            }
            // The oracle: every draft stands, 5 tokens per verification.
            let mut recorded = RecordedDrafter {
                tokens: prompt.iter().chain(&want).copied().collect(),
                vocab: t.config().vocab_size,
            };
            let run = speculative(&t, &prompt, &o, &mut recorded, 4);
            assert_eq!(run.tokens, want);
            assert_eq!(run.accepted, run.drafted, "every recorded draft stands");
            // Random drafts: nearly all rejected, the output the same.
            let mut random = RandomDrafter {
                vocab: t.config().vocab_size,
                rng: StdRng::seed_from_u64(3),
            };
            let run = speculative(&t, &prompt, &o, &mut random, 3);
            assert_eq!(run.tokens, want);
            assert!(run.accepted * 4 < run.drafted, "random drafts stood");
        }
    }
}

/// Speculation over a quantized KV cache (`kv_bits`): rejected drafts are trimmed from the quantized
/// full-attention caches (each position is quantized on its own, so what is kept is what plain decoding
/// wrote). Quantized from the first position (`quantized_kv_start = 0`), greedy answers equal plain
/// decoding's on the same cache token for token, with a draft model and with random drafts (nearly all
/// trimmed), at 4 and 8 bits. Quantized from a position reached while decoding, rounds stop short of it
/// (plain decoding reads the positions before it in full precision and those after over the quantized
/// cache) and the answer is plain decoding's too.
#[test]
fn speculation_over_a_quantized_kv_cache_is_plain_decoding() {
    let t = load("tiny");
    let d = load("tiny-q4");
    for prompt in prompts("tiny") {
        for bits in [4, 8] {
            let mut o = opts(48);
            o.kv_quant = Some(gemma4::KvQuant {
                bits,
                group_size: 64,
                start: 0,
            });
            let (want, _) = plain(&t, &prompt, &o);
            let mut state = DraftState::default();
            let mut drafter = ModelDrafter {
                model: &d,
                state: &mut state,
            };
            let run = speculative(&t, &prompt, &o, &mut drafter, 4);
            let what = format!("{bits}-bit KV, prompt of {}", prompt.len());
            assert_eq!(run.tokens, want, "{what}, drafted by tiny-q4");
            assert!(run.accepted > 0 && run.accepted < run.drafted, "{what}");
            let mut random = RandomDrafter {
                vocab: t.config().vocab_size,
                rng: StdRng::seed_from_u64(3),
            };
            let run = speculative(&t, &prompt, &o, &mut random, 3);
            assert_eq!(run.tokens, want, "{what}, random drafts");
            // The quantized cache is read: at 4 bits the random fixture answers otherwise.
            let (full, _) = plain(&t, &prompt, &opts(48));
            eprintln!("{what}: same answer as full precision: {}", full == want);
            if bits == 4 {
                assert_ne!(full, want, "{what}: as in full precision");
            }
        }
        let mut o = opts(48);
        o.kv_quant = Some(gemma4::KvQuant {
            bits: 4,
            group_size: 64,
            start: prompt.len() + 10,
        });
        let mut state = DraftState::default();
        let mut drafter = ModelDrafter {
            model: &d,
            state: &mut state,
        };
        let run = speculative(&t, &prompt, &o, &mut drafter, 4);
        let (want, _) = plain(&t, &prompt, &o);
        assert_eq!(run.tokens, want, "quantized from {}", prompt.len() + 10);
        assert!(run.accepted > 0);
        // Quantized where plain decoding quantizes: no round read past the start in full precision.
        assert!(!run.quantized_at.is_empty());
        assert!(
            run.quantized_at
                .iter()
                .all(|&q| q as usize == prompt.len() + 10),
            "quantized at {:?}",
            run.quantized_at
        );
    }
}

/// The MTP assistant drafts over a target cache that `kv_bits` quantized, reading it quantized as the
/// target does: a draft step over the quantized K/V gives what one over the same K/V dequantized gives
/// (up to float rounding), and greedy speculation with it, quantized from the start and from a position
/// reached part-way, at 4 and 8 bits, drafts and answers exactly as plain decoding on the same cache.
#[test]
fn the_mtp_assistant_drafts_over_a_quantized_kv_cache() {
    use jemma_engine::cache::Kv;
    use jemma_engine::models::gemma4::assistant::{SharedKv, TargetKv};
    let t = load("tiny");
    let m = gemma4::Gemma4Assistant::load(&common::fixture("mtp"), None).unwrap();
    let prompt = prompts("tiny").pop().unwrap();
    let kv = |bits, start| GenerateOptions {
        kv_quant: Some(gemma4::KvQuant {
            bits,
            group_size: 64,
            start,
        }),
        ..opts(40)
    };

    // One step, quantized and dequantized.
    let mut g = Generation::new(&t, &prompt, kv(4, 0)).unwrap();
    while !g.prefill(&t).unwrap() {}
    let (cache, fed) = g.into_cache().unwrap();
    let quantized = gemma4::Gemma4Assistant::target_kv(&t, &cache)
        .unwrap()
        .unwrap();
    let dequantized: TargetKv = quantized.clone().map(|s| {
        s.map(|s| SharedKv {
            kv: match s.kv {
                Kv::Quantized(k, v, gs, bits) => {
                    let d = |q: &jemma_engine::cache::QTensor| {
                        mlx_rs::ops::dequantize(&q.w, &q.scales, &q.biases, gs, bits).unwrap()
                    };
                    Kv::Plain(d(&k), d(&v))
                }
                plain => plain,
            },
            first: s.first,
        })
    });
    assert!(
        quantized
            .iter()
            .flatten()
            .any(|s| matches!(s.kv, Kv::Quantized(..))),
        "the full-attention K/V is read quantized"
    );
    let e = t
        .embed(&Array::from_slice(&[*fed.last().unwrap()], &[1, 1]))
        .unwrap();
    let position = fed.len() as i32 - 1;
    let (a, an) = m.step(&e, &e, &quantized, position).unwrap();
    let (b, bn) = m.step(&e, &e, &dequantized, position).unwrap();
    for (x, y) in [(a, b), (an, bn)] {
        let gap = (x.as_dtype(Dtype::Float32).unwrap() - y.as_dtype(Dtype::Float32).unwrap())
            .abs()
            .unwrap()
            .max(None)
            .unwrap()
            .item_cast::<f32>();
        assert!(gap < 1e-3, "quantized vs dequantized draft step: {gap}");
    }

    // Greedy speculation over the quantized cache; random drafter and target weights share no preferences,
    // so a logit bias on two tokens (as in `sampled_mtp_speculation_follows_the_target_law`) makes some
    // drafts stand.
    for bits in [4, 8] {
        for (start, bias) in [(0, false), (prompt.len() + 7, false), (0, true)] {
            let mut o = kv(bits, start);
            if bias {
                o.sampling.logit_bias = [(300u32, 30.0f32)].into_iter().collect();
            }
            let (want, _) = plain(&t, &prompt, &o);
            let mut g = Generation::new(&t, &prompt, o).unwrap();
            g.keep_hidden(true);
            while !g.prefill(&t).unwrap() {}
            let mut state = DraftState::default();
            let mut drafter = jemma_engine::speculative::MtpDrafter {
                model: &m,
                state: &mut state,
            };
            let mut rng = StdRng::seed_from_u64(7);
            let (mut got, mut drafted, mut accepted) = (vec![], 0, 0);
            while !g.is_finished() {
                let r = g.speculate(&t, &mut drafter, 3, &mut rng).unwrap();
                drafted += r.drafted;
                accepted += r.accepted;
                got.extend(r.steps.iter().map(|s| s.token));
            }
            let what = format!("{bits}-bit KV from {start}, logit bias {bias}");
            assert_eq!(got, want, "{what}");
            eprintln!("{what}: {accepted}/{drafted} MTP drafts stood");
            // Quantized from the start, every draft read the quantized cache.
            assert!(drafted > 0, "{what}: no drafts");
            if bias {
                assert!(accepted > 0, "{what}: no draft stood");
            }
        }
    }
}

/// Batched verification: several generations, each with its own drafter and draft length (every draft
/// standing, random drafts, a draft model, and on the tiny target the MTP assistant), their rounds verified
/// together in one forward (rows of different lengths and cache offsets, past the sliding window), each
/// answer exactly its plain decoding, on dense, MoE and 4-bit targets. A stop token inside one row's
/// rounds ends that row alone. On the tiny target two rows quantize their KV cache (`kv_bits`), from the
/// start and from a position reached part-way, beside full-precision rows.
#[test]
fn rounds_verified_together_are_each_rows_plain_decoding() {
    for (target, draft) in [("tiny", "tiny-q4"), ("moe", "moe-q4"), ("moe-q4", "moe")] {
        let t = load(target);
        let d = load(draft);
        let mtp = (target == "tiny").then(|| {
            jemma_engine::models::gemma4::Gemma4Assistant::load(&common::fixture("mtp"), None)
                .unwrap()
        });
        let ps = prompts(target);
        let o = opts(40);
        let mut rows: Vec<(Vec<u32>, usize, GenerateOptions)> = vec![
            (ps[0].clone(), 4, o.clone()),
            (ps[ps.len() - 1].clone(), 2, o.clone()),
            (ps[0].clone(), 3, o.clone()),
        ];
        if mtp.is_some() {
            rows.push((ps[ps.len() - 1].clone(), 3, o.clone()));
        }
        // A row whose answer ends on a stop token part-way (its 10th plain token).
        let (ten, _) = plain(&t, &ps[0], &opts(10));
        let stop = GenerateOptions {
            stop_tokens: vec![ten[9]],
            ..o.clone()
        };
        let stop_at = rows.len();
        rows.push((ps[0].clone(), 4, stop));
        if mtp.is_some() {
            // `kv_bits` rows beside full-precision ones: quantized from the start, and from a position
            // reached part-way, where this row's rounds stop short while the others draft on.
            let kv = |start| GenerateOptions {
                kv_quant: Some(gemma4::KvQuant {
                    bits: 4,
                    group_size: 64,
                    start,
                }),
                ..o.clone()
            };
            rows.push((ps[0].clone(), 4, kv(0)));
            let last = ps[ps.len() - 1].clone();
            let start = last.len() + 7;
            rows.push((last, 4, kv(start)));
        }
        let want: Vec<(Vec<u32>, String)> = rows.iter().map(|(p, _, o)| plain(&t, p, o)).collect();
        let mut gens: Vec<Generation> = rows
            .iter()
            .map(|(p, _, o)| {
                let mut g = Generation::new(&t, p, o.clone()).unwrap();
                g.keep_hidden(true);
                while !g.prefill(&t).unwrap() {}
                g
            })
            .collect();
        let mut states: Vec<DraftState> = rows.iter().map(|_| DraftState::default()).collect();
        let mut random = RandomDrafter {
            vocab: t.config().vocab_size,
            rng: StdRng::seed_from_u64(3),
        };
        let mut rngs: Vec<StdRng> = (0..rows.len())
            .map(|i| StdRng::seed_from_u64(i as u64))
            .collect();
        let mut got: Vec<Vec<u32>> = vec![vec![]; rows.len()];
        let mut most = 0;
        while gens.iter().any(|g| !g.is_finished()) {
            let mut drafted = vec![];
            for (i, (g, state)) in gens.iter_mut().zip(states.iter_mut()).enumerate() {
                if g.is_finished() {
                    continue;
                }
                let mut recorded = RecordedDrafter {
                    tokens: rows[i].0.iter().chain(&want[i].0).copied().collect(),
                    vocab: t.config().vocab_size,
                };
                let mut model = ModelDrafter { model: &d, state };
                let drafter: &mut dyn Drafter = match (i, &mtp) {
                    (i, _) if i == 0 || i == stop_at => &mut recorded,
                    (1, _) => &mut random,
                    (3, Some(m)) => &mut jemma_engine::speculative::MtpDrafter {
                        model: m,
                        state: model.state,
                    },
                    _ => &mut model,
                };
                match g.draft_round(&t, drafter, rows[i].1).unwrap() {
                    jemma_engine::generate::RoundStart::Done(r) => {
                        got[i].extend(r.steps.iter().map(|s| s.token))
                    }
                    jemma_engine::generate::RoundStart::Drafted(dr) => drafted.push((i, dr)),
                }
            }
            most = most.max(drafted.len());
            common::verify_together(&t, &mut gens, &mut rngs, drafted, &mut got);
        }
        assert!(most >= 3, "{target}: at most {most} rows verified together");
        for (i, g) in gens.iter().enumerate() {
            assert_eq!(got[i], want[i].0, "{target}, row {i}");
            assert_eq!(format!("{:?}", g.stats().finish_reason), want[i].1);
        }
        let last = &want[stop_at].0;
        assert!(
            last.len() < 10,
            "the stop token ended the last row part-way"
        );
    }
}

/// A draft model drafting for several sequences at once (each catching its cache up alone, then one pass
/// of the draft model per draft step over every sequence still drafting, each over its own cache, rolled
/// back after rejected drafts) proposes for each what it proposes drafting alone
/// ([`common::drafting_together_is_drafting_alone`]), on the dense and MoE targets with 4-bit drafts.
#[test]
fn model_drafts_proposed_together_are_each_rows_alone() {
    for (target, draft) in [("tiny", "tiny-q4"), ("moe", "moe-q4")] {
        let (t, d) = (load(target), load(draft));
        common::drafting_together_is_drafting_alone(
            &t,
            common::DraftSource::Model(&d),
            &format!("{target} with {draft}"),
        );
    }
}

/// Penalties, a logit bias and logprobs: each verified position sees the history plain decoding would
/// (the drafts before it count for the penalties), and reports the same log-probabilities.
#[test]
fn penalties_bias_and_logprobs_are_plain_decodings() {
    let t = load("tiny");
    let d = load("tiny-q4");
    let prompt = &prompts("tiny")[1];
    let mut o = opts(40);
    o.sampling = SamplingParams {
        repetition_penalty: Some(1.3),
        presence_penalty: 0.4,
        frequency_penalty: 0.2,
        logit_bias: [(300u32, 2.0f32), (7, -5.0)].into_iter().collect(),
        ..Default::default()
    };
    o.logprobs = true;
    o.top_logprobs = 3;
    let mut want = vec![];
    generate(&t, prompt, &o, |s| {
        want.push(s.clone());
        ControlFlow::Continue(())
    })
    .unwrap();
    let (plain_tokens, _) = plain(&t, prompt, &opts(40));
    assert_ne!(
        want.iter().map(|s| s.token).collect::<Vec<_>>(),
        plain_tokens,
        "the penalties change the answer"
    );
    for k in [2, 5] {
        let mut state = DraftState::default();
        let mut drafter = ModelDrafter {
            model: &d,
            state: &mut state,
        };
        let mut g = Generation::new(&t, prompt, o.clone()).unwrap();
        while !g.prefill(&t).unwrap() {}
        let mut rng = StdRng::seed_from_u64(0);
        let mut got = vec![];
        while !g.is_finished() {
            got.extend(g.speculate(&t, &mut drafter, k, &mut rng).unwrap().steps);
        }
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(a.token, b.token, "k = {k}, token {i}");
            let (la, lb) = (a.logprobs.as_ref().unwrap(), b.logprobs.as_ref().unwrap());
            assert!((la.logprob - lb.logprob).abs() < 1e-4, "k = {k}, token {i}");
            assert_eq!(la.top.len(), 3);
            for (x, y) in la.top.iter().zip(&lb.top) {
                assert_eq!(x.0, y.0);
                assert!((x.1 - y.1).abs() < 1e-4);
            }
        }
    }
}

/// A draft model that is the target itself: every draft stands (the drafter's own cache, rolled back and
/// resynced each round, stays in step with the target's).
#[test]
fn a_target_drafting_for_itself_is_always_right() {
    let t = load("tiny");
    let prompt = &prompts("tiny")[1];
    let o = opts(40);
    let (want, _) = plain(&t, prompt, &o);
    let mut state = DraftState::default();
    let mut drafter = ModelDrafter {
        model: &t,
        state: &mut state,
    };
    let run = speculative(&t, prompt, &o, &mut drafter, 5);
    assert_eq!(run.tokens, want);
    assert_eq!(run.accepted, run.drafted);
    assert!(state.nbytes() > 0);
}

/// A stop token or `max_tokens` inside a round ends the answer where plain decoding ends it, with the
/// cache holding exactly the tokens kept.
#[test]
fn the_answer_ends_inside_a_round_where_plain_decoding_ends_it() {
    let t = load("tiny");
    let d = load("tiny-q4");
    let prompt = &prompts("tiny")[1];
    let (full, _) = plain(&t, prompt, &opts(40));
    // Stop at the token plain decoding produces 11th.
    let mut o = opts(40);
    o.stop_tokens = vec![full[10]];
    let (want, finish) = plain(&t, prompt, &o);
    assert!(want.len() <= 10 && finish == "Stop");
    for max_tokens in [1, 2, 7, 13] {
        for (o, want, finish) in [
            (o.clone(), want.clone(), finish.clone()),
            (
                opts(max_tokens),
                full[..max_tokens].to_vec(),
                "Length".into(),
            ),
        ] {
            let mut state = DraftState::default();
            let mut drafter = ModelDrafter {
                model: &d,
                state: &mut state,
            };
            let run = speculative(&t, prompt, &o, &mut drafter, 4);
            assert_eq!(run.tokens, want, "max_tokens {max_tokens}");
            assert_eq!(run.finish, finish);
        }
    }
}

/// The target's law for the next token after `context` under `params` (probabilities over the vocabulary).
fn law(model: &Gemma4, context: &[u32], params: &SamplingParams) -> Vec<f32> {
    let ids: Vec<i32> = context.iter().map(|&t| t as i32).collect();
    let mut cache = model.new_cache();
    let logits = model
        .forward_last_logits(&Array::from_slice(&ids, &[1, ids.len() as i32]), &mut cache)
        .unwrap();
    let s = Sampler::new(params.clone(), model.config().vocab_size, model.dtype()).unwrap();
    let lp = log_softmax(&s.process(&logits, None).unwrap()).unwrap();
    let l = mlx_rs::ops::exp(s.law(&lp).unwrap().as_dtype(Dtype::Float32).unwrap()).unwrap();
    l.reshape(&[-1]).unwrap().as_slice::<f32>().to_vec()
}

/// Sampled speculation follows the target's law: the first two tokens (the second decided by the
/// acceptance rule against a 4-bit drafter whose law differs) over many seeded runs, against the exact
/// probabilities of every pair, by a chi-square test at p > 0.01 (statrs); the same counts against a law
/// with the second token's odds swapped fail it whenever the two laws are far enough apart to tell.
#[test]
fn sampled_speculation_follows_the_target_law() {
    let t = load("tiny");
    let d = load("tiny-q4");
    follows_the_target_law(&t, false, Default::default(), &mut |g, trial, rng| {
        let mut state = DraftState::seeded(trial + 1_000_000);
        let mut drafter = ModelDrafter {
            model: &d,
            state: &mut state,
        };
        g.speculate(&t, &mut drafter, 1, rng).unwrap()
    });
}

/// The same with each round verified together with another sequence's (a greedy request of another
/// length with random drafts, its row before or after this one's): sharing the forward leaves each row's
/// law its own.
#[test]
fn sampled_speculation_verified_together_follows_the_target_law() {
    use jemma_engine::generate::RoundStart;
    let t = load("tiny");
    let d = load("tiny-q4");
    let other = prompts("tiny")[1].clone();
    let mut other_cache = t.new_cache();
    let ids: Vec<i32> = other[..other.len() - 1].iter().map(|&x| x as i32).collect();
    t.forward_hidden(
        &Array::from_slice(&ids, &[1, ids.len() as i32]),
        &mut other_cache,
    )
    .unwrap();
    mlx_rs::transforms::eval(other_cache.state()).unwrap();
    follows_the_target_law(&t, false, Default::default(), &mut |g, trial, rng| {
        let mut companion = Generation::resume(
            &t,
            &other,
            opts(8),
            Some((other_cache.clone(), other.len() - 1)),
        )
        .unwrap();
        while !companion.prefill(&t).unwrap() {}
        let mut state = DraftState::seeded(trial + 1_000_000);
        let mut drafter = ModelDrafter {
            model: &d,
            state: &mut state,
        };
        let RoundStart::Drafted(mine) = g.draft_round(&t, &mut drafter, 1).unwrap() else {
            panic!("a draft model always drafts")
        };
        let mut random = RandomDrafter {
            vocab: t.config().vocab_size,
            rng: StdRng::seed_from_u64(trial),
        };
        let RoundStart::Drafted(theirs) = companion.draft_round(&t, &mut random, 3).unwrap() else {
            panic!("a random drafter always drafts")
        };
        let mut their_rng = StdRng::seed_from_u64(0);
        let rows = if trial % 2 == 0 {
            vec![(g, mine, rng), (&mut companion, theirs, &mut their_rng)]
        } else {
            vec![(&mut companion, theirs, &mut their_rng), (g, mine, rng)]
        };
        let mut rounds = Generation::verify_rounds(&t, rows).unwrap();
        rounds.remove((trial % 2) as usize).unwrap()
    });
}

/// The same with Gemma 4's MTP assistant drafter (scripts/fixtures/gen_mtp.py, its sparse head). Random
/// drafter and target weights share no preferences, so a logit bias makes both favour the same two tokens
/// (in other proportions): drafts stand often enough to test the rule on the drafter's reported law.
#[test]
fn sampled_mtp_speculation_follows_the_target_law() {
    let t = load("tiny");
    let m = gemma4::Gemma4Assistant::load(&common::fixture("mtp"), None).unwrap();
    let bias = [(300u32, 30.0f32), (7, 30.0)].into_iter().collect();
    follows_the_target_law(&t, true, bias, &mut |g, trial, rng| {
        let mut state = DraftState::seeded(trial + 1_000_000);
        let mut drafter = jemma_engine::speculative::MtpDrafter {
            model: &m,
            state: &mut state,
        };
        g.speculate(&t, &mut drafter, 1, rng).unwrap()
    });
}

/// The chi-square test of the two tests above: `round` runs one speculative round of one draft on a
/// generation (`keep_hidden` set as the drafter needs) for a trial; the request samples the top 2 tokens
/// at temperature 1 after `logit_bias`.
fn follows_the_target_law(
    t: &Gemma4,
    keep_hidden: bool,
    logit_bias: Vec<(u32, f32)>,
    round: &mut dyn FnMut(&mut Generation, u64, &mut StdRng) -> jemma_engine::generate::Round,
) {
    use statrs::distribution::{ChiSquared, ContinuousCDF};
    use std::collections::HashMap;
    let prompt = &prompts("tiny")[0];
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 2,
        seed: Some(0),
        logit_bias,
        ..Default::default()
    };
    let first = law(t, prompt, &params);
    let mut want: HashMap<(u32, u32), f64> = HashMap::new();
    let mut swapped: HashMap<(u32, u32), f64> = HashMap::new();
    for (a, &pa) in first.iter().enumerate().filter(|(_, p)| **p > 0.0) {
        let ctx: Vec<u32> = prompt.iter().copied().chain([a as u32]).collect();
        let second: Vec<(usize, f32)> = law(t, &ctx, &params)
            .into_iter()
            .enumerate()
            .filter(|(_, p)| *p > 0.0)
            .collect();
        for (j, &(b, pb)) in second.iter().enumerate() {
            want.insert((a as u32, b as u32), pa as f64 * pb as f64);
            let other = second[second.len() - 1 - j].1;
            swapped.insert((a as u32, b as u32), pa as f64 * other as f64);
        }
    }
    // The prompt's cache (all but its last token), which every trial continues.
    let n = prompt.len();
    let mut cache = t.new_cache();
    let ids: Vec<i32> = prompt[..n - 1].iter().map(|&x| x as i32).collect();
    t.forward_hidden(&Array::from_slice(&ids, &[1, n as i32 - 1]), &mut cache)
        .unwrap();
    mlx_rs::transforms::eval(cache.state()).unwrap();
    let trials = 400u64;
    let mut counts: HashMap<(u32, u32), u64> = HashMap::new();
    let (mut drafted, mut accepted) = (0, 0);
    let mut rng = StdRng::seed_from_u64(11);
    for trial in 0..trials {
        let o = GenerateOptions {
            max_tokens: 2,
            stop_tokens: vec![],
            sampling: SamplingParams {
                seed: Some(trial),
                ..params.clone()
            },
            ..Default::default()
        };
        let mut g = Generation::resume(t, prompt, o, Some((cache.clone(), n - 1))).unwrap();
        g.keep_hidden(keep_hidden);
        while !g.prefill(t).unwrap() {}
        let r = round(&mut g, trial, &mut rng);
        drafted += r.drafted;
        accepted += r.accepted;
        // The first token, and the draft if it stood; else the correction is the next token.
        let mut toks: Vec<u32> = r.steps.iter().map(|s| s.token).collect();
        if toks.len() < 2 {
            toks.push(g.next_token(t).unwrap().unwrap().token);
        }
        assert!(g.next_token(t).unwrap().is_none());
        *counts.entry((toks[0], toks[1])).or_default() += 1;
    }
    assert!(drafted == trials as usize && accepted < drafted && accepted > 0);
    let chi = |e: &HashMap<(u32, u32), f64>| {
        let mut stat = 0.0;
        for (cell, &p) in e {
            let exp = p * trials as f64;
            let seen = *counts.get(cell).unwrap_or(&0) as f64;
            stat += (seen - exp).powi(2) / exp;
        }
        for cell in counts.keys() {
            assert!(e.contains_key(cell), "{cell:?} cannot be drawn");
        }
        1.0 - ChiSquared::new(e.len() as f64 - 1.0).unwrap().cdf(stat)
    };
    let p = chi(&want);
    eprintln!(
        "{} cells, p = {p:.3}, {accepted}/{drafted} drafts stood",
        want.len()
    );
    assert!(p > 0.01, "p = {p}");
    // Power: a law this far from the target's (noncentrality > 30) must be rejected.
    let lambda: f64 = want
        .iter()
        .map(|(c, &p)| trials as f64 * (p - swapped[c]).powi(2) / swapped[c].max(1e-12))
        .sum();
    eprintln!("noncentrality of the swapped law: {lambda:.1}");
    if lambda > 30.0 {
        assert!(chi(&swapped) < 0.01, "the test cannot tell the laws apart");
    }
}

/// Through the engine host: a tier with a draft model answers greedy requests with exactly the tokens of
/// one without, alone (speculating: the summary and the status count its rounds) and four at once (a
/// batch past `max_batch` decodes plainly; with `max_batch` 4 the four verify together), including a stop
/// string that ends the answer inside a round; a draft model with another vocabulary is refused at load.
#[test]
fn the_engine_speculates_for_single_streams_and_answers_the_same() {
    engine_answers_the_same_speculating_with("tiny", common::fixture("tiny-q4"), "draft_model");
    // Another vocabulary: refused at load, naming the draft.
    refused_at_load(
        "tiny",
        &common::fixture("tiny").join("../small"),
        "vocabulary",
    );
}

/// The same with the MTP assistant drafter (found by its config), on the dense target and on the MoE one
/// with its own drafter; an assistant made for another target is refused at load.
#[test]
fn the_engine_speculates_with_the_mtp_assistant_and_answers_the_same() {
    engine_answers_the_same_speculating_with("tiny", common::fixture("mtp"), "mtp_assistant");
    // The MoE target with its own drafter (its full layers' K/V heads differ from its sliding ones').
    engine_answers_the_same_speculating_with(
        "moe",
        jemma_fixtures::fixture("mtp-moe", "config.json"),
        "mtp_assistant",
    );
    refused_at_load("small", &common::fixture("mtp"), "does not fit the target");
    // The same drafter found next to the model rather than configured: the model serves without it.
    use jemma_engine::runtime::{Engine, EngineConfig, EngineState, SpeculativeSettings};
    let mut cfg = EngineConfig::new(common::fixture("tiny").with_file_name("small"));
    cfg.speculative = Some(SpeculativeSettings {
        optional: true,
        draft_model: common::fixture("mtp"),
        config: Default::default(),
    });
    let e = Engine::start(cfg).unwrap();
    e.wait_ready().unwrap();
    assert_eq!(e.status().state, EngineState::Ready);
    assert!(e.status().info.speculative.is_none());
    assert!(e.shutdown(std::time::Duration::from_secs(30)));
}

/// An engine serving `target` (a fixture directory's name) with `draft` fails to load, naming the draft
/// and `why`.
fn refused_at_load(target: &str, draft: &std::path::Path, why: &str) {
    use jemma_engine::runtime::{Engine, EngineConfig, SpeculativeSettings};
    let mut cfg = EngineConfig::new(common::fixture("tiny").join("..").join(target));
    cfg.speculative = Some(SpeculativeSettings {
        optional: false,
        draft_model: draft.to_path_buf(),
        config: Default::default(),
    });
    let bad = Engine::start(cfg).unwrap();
    let error = bad.wait_ready().unwrap_err().to_string();
    assert!(error.contains("draft") && error.contains(why), "{error}");
    assert!(bad.shutdown(std::time::Duration::from_secs(30)));
}

/// Greedy answers of an engine on `target` (a fixture's name) speculating with `draft` (of the `drafter`
/// kind its status reports) equal a plain engine's: alone, four at once, cut
/// by a stop string inside a round, and continuing from the prefix cache that cut answer left.
fn engine_answers_the_same_speculating_with(
    target: &str,
    draft: std::path::PathBuf,
    drafter: &str,
) {
    use jemma_engine::runtime::{
        Engine, EngineConfig, Event, Prompt, SpeculativeSettings, Summary,
    };
    use jemma_serve::speculative::SpeculativeConfig;
    let request = |text: &str, max_tokens: usize, stop: Vec<String>| {
        common::request(
            Prompt::Text(text.into()),
            max_tokens,
            stop,
            Default::default(),
        )
    };
    let answer = |rx: &mut tokio::sync::mpsc::Receiver<Event>| -> (Summary, String) {
        let mut text = String::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Done(s) => return (s, text),
                Event::Error(e) => panic!("{e}"),
                Event::Content(c) => text.push_str(&c),
                _ => {}
            }
        }
        panic!("no answer")
    };
    let plain = Engine::start(EngineConfig::new(common::fixture(target))).unwrap();
    let draft_dir = draft.clone();
    let mut cfg = EngineConfig::new(common::fixture(target));
    cfg.speculative = Some(SpeculativeSettings {
        optional: false,
        draft_model: draft,
        config: SpeculativeConfig {
            adaptive: false,
            ..Default::default()
        },
    });
    let spec = Engine::start(cfg).unwrap();
    for e in [&plain, &spec] {
        e.wait_ready().unwrap();
    }
    let texts = [
        "The capital of France is",
        "Once upon a time, in a land far away, there lived",
        "1, 2, 3,",
        "Hello",
    ];
    let mut want = vec![];
    for t in texts {
        let (s, text) = answer(&mut plain.submit(request(t, 40, vec![])).unwrap());
        let (got, got_text) = answer(&mut spec.submit(request(t, 40, vec![])).unwrap());
        assert_eq!(got.tokens, s.tokens, "{t}");
        assert_eq!(got_text, text);
        let sp = got.speculative.expect("it speculated");
        assert!(sp.rounds > 0 && sp.drafted >= sp.rounds);
        want.push((s.tokens, text));
    }
    let status = spec.status();
    let info = status.info.speculative.clone().unwrap();
    assert_eq!(info.drafter, drafter);
    assert!(info.stats.rounds > 0 && info.tokens_per_step >= 1.0);
    // Four at once: past max_batch (1) they decode plainly, and answer the same.
    let mut rxs: Vec<_> = texts
        .iter()
        .map(|t| spec.submit(request(t, 40, vec![])).unwrap())
        .collect();
    for (rx, (tokens, _)) in rxs.iter_mut().zip(&want) {
        assert_eq!(&answer(rx).0.tokens, tokens);
    }
    assert_eq!(spec.status().info.largest_verify_batch, 1);
    // With max_batch 4 they speculate together, their drafts verified in one forward (rows of different
    // lengths and cache offsets, both sides of the sliding window), and still answer the same.
    let mut cfg = EngineConfig::new(common::fixture(target));
    cfg.max_sequences = 4;
    cfg.speculative = Some(SpeculativeSettings {
        optional: false,
        draft_model: draft_dir.clone(),
        config: SpeculativeConfig {
            adaptive: false,
            max_batch: 4,
            ..Default::default()
        },
    });
    let together = Engine::start(cfg).unwrap();
    together.wait_ready().unwrap();
    let mut rxs: Vec<_> = texts
        .iter()
        .map(|t| together.submit(request(t, 40, vec![])).unwrap())
        .collect();
    for (rx, (tokens, text)) in rxs.iter_mut().zip(&want) {
        let (got, got_text) = answer(rx);
        assert_eq!((&got.tokens, &got_text), (tokens, text));
        assert!(got.speculative.expect("it speculated").rounds > 0);
    }
    let batched = together.status().info.largest_verify_batch;
    assert!(batched > 1, "verified {batched} at most at once");
    assert!(together.shutdown(std::time::Duration::from_secs(30)));
    // A stop string inside a round: the answer ends where plain decoding ends it.
    let (full_tokens, full_text) = &want[1];
    let cut: String = full_text.chars().skip(12).take(6).collect();
    assert!(!cut.is_empty() && full_tokens.len() == 40);
    let (s, text) = answer(
        &mut plain
            .submit(request(texts[1], 40, vec![cut.clone()]))
            .unwrap(),
    );
    let (got, got_text) = answer(&mut spec.submit(request(texts[1], 40, vec![cut])).unwrap());
    assert_eq!((got.tokens, got_text), (s.tokens, text));
    // The prefix cache kept after a cut answer continues exactly: the next turn answers as plain.
    let (s, _) = answer(&mut plain.submit(request(texts[1], 40, vec![])).unwrap());
    let (got, _) = answer(&mut spec.submit(request(texts[1], 40, vec![])).unwrap());
    assert_eq!(got.tokens, s.tokens);
    // A conversation continued (the last answer's prompt, that answer, and more): a draft model resumes
    // from its cache, kept with the prefix cache's entry, instead of reading the conversation again (past
    // the sliding window of 16: its cache is settled to what the target committed when the answer ends,
    // not trimmed later). The answers are plain decoding's, with either drafter.
    let ids =
        |ids: &[u32]| common::request(Prompt::Ids(ids.to_vec()), 24, vec![], Default::default());
    let first = prompts(target).pop().unwrap();
    let (s1, _) = answer(&mut spec.submit(ids(&first)).unwrap());
    let mut next = first.clone();
    next.extend(&s1.tokens);
    next.extend(&first[1..4]);
    let (s2, _) = answer(&mut spec.submit(ids(&next)).unwrap());
    let (want2, _) = answer(&mut plain.submit(ids(&next)).unwrap());
    assert_eq!(s2.tokens, want2.tokens, "the continued conversation");
    assert!(
        s2.cached_tokens >= first.len() + s1.tokens.len() - 1,
        "{}",
        s2.cached_tokens
    );
    if drafter == "draft_model" {
        assert!(
            s2.draft_cached_tokens >= first.len(),
            "the draft resumed {} of {} tokens",
            s2.draft_cached_tokens,
            next.len()
        );
    }
    assert!(spec.shutdown(std::time::Duration::from_secs(30)));
    assert!(plain.shutdown(std::time::Duration::from_secs(30)));
}
