//! The Gemma 4 MTP assistant drafter (issue 15) against mlx-vlm: one draft step's next hidden state and
//! logits, and its greedy token, on random-weight drafters (a centroid-routed sparse head and a tied one)
//! over the K/V layouts a target's cache takes: a sliding window not yet full, exactly full, past it, and
//! one short of it after a rejected round (scripts/fixtures/gen_mtp.py); the first round's drafts bound to
//! the tiny target against mlx-vlm's `draft_block`; and greedy speculation with it equal to plain decoding.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod common;

use std::ops::ControlFlow;

use jemma_engine::cache::Kv;
use jemma_engine::generate::{GenerateOptions, Generation, generate};
use jemma_engine::models::gemma4::Gemma4Assistant;
use jemma_engine::models::gemma4::assistant::SharedKv;
use jemma_engine::sample::SamplingParams;
use jemma_engine::speculative::{
    DraftState, Drafter, MtpDrafter, Proposal, RecordedDrafter, TargetState,
};
use mlx_rs::Array;
use rand::SeedableRng;
use rand::rngs::StdRng;

#[test]
fn a_draft_step_matches_mlx_vlm_on_every_kv_layout() {
    for name in ["mtp", "mtp-tied"] {
        let dir = common::fixture(name);
        let m = Gemma4Assistant::load(&dir, None).unwrap();
        let r = Array::load_safetensors(dir.join("reference.safetensors")).unwrap();
        for case in 0..4 {
            let get = |k: &str| r[&format!("case{case}.{k}")].clone();
            let valid = get("valid").as_slice::<i32>()[0];
            let position = get("position").as_slice::<i32>()[0];
            let ks = get("k_sliding");
            let kv = [
                Some(SharedKv {
                    first: valid - ks.shape()[2],
                    kv: Kv::Plain(ks, get("v_sliding")),
                }),
                Some(SharedKv {
                    first: 0,
                    kv: Kv::Plain(get("k_full"), get("v_full")),
                }),
            ];
            let (next, hn) = m
                .step(&get("embedding"), &get("hidden"), &kv, position)
                .unwrap();
            let logits = m.logits(&hn).unwrap();
            let what = format!("{name} case {case} (valid {valid})");
            let d = common::max_abs_diff(&next, &get("next_hidden"));
            assert!(d <= 1e-4, "{what}: next hidden off by {d}");
            let d = common::max_abs_diff(&logits, &get("logits"));
            assert!(d <= 1e-4, "{what}: logits off by {d}");
            assert_eq!(
                common::tokens(&m.argmax(&hn).unwrap().reshape(&[-1]).unwrap()),
                common::tokens(&get("argmax")),
                "{what}: greedy token"
            );
        }
    }
}

fn load_target() -> jemma_engine::models::gemma4::Gemma4 {
    jemma_engine::models::gemma4::load(&common::fixture("tiny"), None)
        .unwrap()
        .0
}

/// Plain greedy decoding's tokens for `prompt` under `o`.
fn plain(
    target: &jemma_engine::models::gemma4::Gemma4,
    prompt: &[u32],
    o: &GenerateOptions,
) -> Vec<u32> {
    let mut want = vec![];
    generate(target, prompt, o, |s| {
        want.push(s.token);
        ControlFlow::Continue(())
    })
    .unwrap();
    want
}

fn opts(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        stop_tokens: vec![],
        ..Default::default()
    }
}

/// Runs `prompt` on the tiny target, speculating with `drafter` at `k` every round; returns the tokens,
/// the proposals, and how many drafts stood.
fn speculate(
    target: &jemma_engine::models::gemma4::Gemma4,
    prompt: &[u32],
    o: &GenerateOptions,
    drafter: &mut dyn Drafter,
    k: usize,
) -> (Vec<u32>, Vec<Vec<u32>>, usize) {
    let (tokens, proposals, _, accepted) = speculate_recording(target, prompt, o, drafter, k);
    (tokens, proposals, accepted)
}

/// [`speculate`], with the pending token each proposal followed.
fn speculate_recording(
    target: &jemma_engine::models::gemma4::Gemma4,
    prompt: &[u32],
    o: &GenerateOptions,
    drafter: &mut dyn Drafter,
    k: usize,
) -> (Vec<u32>, Vec<Vec<u32>>, Vec<u32>, usize) {
    let mut rec = common::Recording::new(drafter);
    let mut g = Generation::new(target, prompt, o.clone()).unwrap();
    g.keep_hidden(true);
    while !g.prefill(target).unwrap() {}
    let mut rng = StdRng::seed_from_u64(5);
    let (mut tokens, mut accepted) = (vec![], 0);
    while !g.is_finished() {
        let r = g.speculate(target, &mut rec, k, &mut rng).unwrap();
        accepted += r.accepted;
        tokens.extend(r.steps.iter().map(|s| s.token));
    }
    let proposals = rec.proposals.iter().map(|p| p.tokens.clone()).collect();
    (tokens, proposals, rec.pending, accepted)
}

/// Bound to the tiny target after it read a prompt, the drafter's first round proposes mlx-vlm's
/// `draft_block` tokens with the query at the pending token's position (`drafts_at_pending`: where
/// transformers' candidate generator and llama.cpp put it, one past mlx-vlm's own; transformers'
/// `Gemma4AssistantForCausalLM` drafts these very tokens on these drafters, checked by hand): it reads
/// the target's hidden state, K/V, embedding and position as they do.
#[test]
fn the_first_round_drafts_mlx_vlms_tokens() {
    let target = load_target();
    for name in ["mtp", "mtp-tied"] {
        let dir = common::fixture(name);
        let m = Gemma4Assistant::load(&dir, None).unwrap();
        m.check_target(&target).unwrap();
        let r = Array::load_safetensors(dir.join("reference.safetensors")).unwrap();
        for block in 0..2 {
            let get = |k: &str| common::tokens(&r[&format!("block{block}.{k}")]);
            let prompt = get("prompt");
            let mut state = DraftState::default();
            let mut d = MtpDrafter {
                model: &m,
                state: &mut state,
            };
            let (tokens, proposals, _) = speculate(&target, &prompt, &opts(4), &mut d, 3);
            assert_eq!(tokens[0], get("pending")[0], "{name} block {block}");
            assert_eq!(
                proposals[0],
                get("drafts_at_pending"),
                "{name} block {block}"
            );
        }
    }
}

/// Greedy speculation with the MTP drafter answers exactly as plain decoding, at every draft length and
/// three times across the 16-token sliding window (the drafter reading the window's K/V as it rotates and
/// as rejected drafts are trimmed from it), on every target fixture: dense (both drafters), 4-bit, MoE
/// (its own drafter: its full layers' K/V heads differ from its sliding ones') and 4-bit MoE; without a
/// kept hidden state it proposes nothing.
#[test]
fn greedy_mtp_speculation_is_plain_decoding() {
    let tiny = load_target();
    let prompts: [Vec<u32>; 2] = [vec![2, 10, 200, 33, 47], (2..40).collect()];
    for (target_name, name) in [
        ("tiny", "mtp"),
        ("tiny", "mtp-tied"),
        ("tiny-q4", "mtp"),
        ("moe", "mtp-moe"),
        ("moe-q4", "mtp-moe"),
    ] {
        let loaded;
        let target = if target_name == "tiny" {
            &tiny
        } else {
            loaded = jemma_engine::models::gemma4::load(&common::fixture(target_name), None)
                .unwrap()
                .0;
            &loaded
        };
        // The MoE fixture's drafter has no references (gen_mtp.py `drafter`).
        let dir = jemma_fixtures::fixture(name, "config.json");
        let m = Gemma4Assistant::load(&dir, None).unwrap();
        m.check_target(target).unwrap();
        for prompt in &prompts {
            let o = opts(48);
            let want = plain(target, prompt, &o);
            for k in [1, 3, 5] {
                let mut state = DraftState::default();
                let mut d = MtpDrafter {
                    model: &m,
                    state: &mut state,
                };
                let (tokens, proposals, accepted) = speculate(target, prompt, &o, &mut d, k);
                assert_eq!(
                    tokens,
                    want,
                    "{target_name} with {name}, k = {k}, prompt of {}",
                    prompt.len()
                );
                assert!(proposals.iter().all(|p| p.len() <= k));
                assert!(proposals.iter().any(|p| !p.is_empty()));
                eprintln!(
                    "{target_name} with {name}, k = {k}, prompt {}: {accepted} drafts stood in {} rounds",
                    prompt.len(),
                    proposals.len()
                );
            }
        }
        // A generation that keeps no hidden state gets no drafts, and decodes plainly.
        let mut state = DraftState::default();
        let mut d = MtpDrafter {
            model: &m,
            state: &mut state,
        };
        let mut g = Generation::new(target, &prompts[0], opts(3)).unwrap();
        while !g.prefill(target).unwrap() {}
        let r = g
            .speculate(target, &mut d, 3, &mut StdRng::seed_from_u64(0))
            .unwrap();
        assert_eq!((r.drafted, r.steps.len()), (0, 1));
    }
}

/// Drafting for several sequences at once (one pass of the assistant per draft step over every sequence
/// still drafting) proposes for each what it proposes drafting alone
/// ([`common::drafting_together_is_drafting_alone`]), on both heads (sparse and tied) and on the MoE
/// target with its own assistant.
#[test]
fn drafts_proposed_together_are_each_rows_alone() {
    for (target, name) in [("tiny", "mtp"), ("tiny", "mtp-tied"), ("moe", "mtp-moe")] {
        let t = jemma_engine::models::gemma4::load(&common::fixture(target), None)
            .unwrap()
            .0;
        let m = Gemma4Assistant::load(&jemma_fixtures::fixture(name, "config.json"), None).unwrap();
        common::drafting_together_is_drafting_alone(
            &t,
            common::DraftSource::Mtp(&m),
            &format!("{target} with {name}"),
        );
    }
}

/// The echo drafter (gen_mtp.py: each draft is the token its hidden state predicts through the target's
/// head, so the pending token again when that state is the target's at the position before it) proposes
/// the pending token at every round: the drafter read the right hidden state each time, whatever the
/// round before it left (these prompts repeat tokens, so some drafts stand). The answer is plain
/// decoding's.
#[test]
fn the_echo_drafter_proposes_the_pending_token_every_round() {
    let target = load_target();
    let m =
        Gemma4Assistant::load(&jemma_fixtures::fixture("mtp-echo", "config.json"), None).unwrap();
    let prompts: [Vec<u32>; 2] = [vec![2, 10, 200, 33, 47], (2..40).collect()];
    let mut stood = 0;
    for prompt in &prompts {
        let o = opts(48);
        let want = plain(&target, prompt, &o);
        for k in [1, 3] {
            let mut state = DraftState::default();
            let mut d = MtpDrafter {
                model: &m,
                state: &mut state,
            };
            let (tokens, proposals, pending, accepted) =
                speculate_recording(&target, prompt, &o, &mut d, k);
            assert_eq!(tokens, want, "k = {k}, prompt of {}", prompt.len());
            for (p, t) in proposals.iter().zip(&pending) {
                assert!(p.iter().all(|x| x == t), "k = {k}: {p:?} after {t}");
            }
            assert!(proposals.iter().any(|p| !p.is_empty()));
            stood += accepted;
        }
    }
    assert!(stood > 0, "plain decoding repeats tokens on these prompts");
}

/// A drafter whose width, vocabulary or head dimensions differ from the target's is refused, naming why.
#[test]
fn a_drafter_for_another_target_is_refused() {
    let m = Gemma4Assistant::load(&common::fixture("mtp"), None).unwrap();
    let other =
        jemma_engine::models::gemma4::load(&common::fixture("tiny").with_file_name("small"), None)
            .unwrap()
            .0;
    let e = m.check_target(&other).unwrap_err().to_string();
    assert!(e.contains("backbone_hidden_size 128"), "{e}");
    // The same verdict from the configs alone (how drafters found next to a model are vetted).
    use jemma_engine::models::gemma4::assistant::AssistantConfig;
    AssistantConfig::check_target_dir(&common::fixture("mtp"), &common::fixture("tiny")).unwrap();
    let small = common::fixture("tiny").with_file_name("small");
    let e = AssistantConfig::check_target_dir(&common::fixture("mtp"), &small)
        .unwrap_err()
        .to_string();
    assert!(e.contains("width is 128, the target's 512"), "{e}");
    let e = AssistantConfig::check_target_dir(&common::fixture("tiny"), &common::fixture("tiny"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a Gemma 4 assistant"), "{e}");
}

/// Alternates rounds: `plain` rounds of another drafter (or, with `other` None, of no drafts: a plain step),
/// then one of the MTP drafter, whose proposals it records.
struct Alternating<'a, 'b> {
    other: Option<&'a mut dyn Drafter>,
    mtp: &'b mut dyn Drafter,
    every: usize,
    round: usize,
    proposals: Vec<Vec<u32>>,
    /// The context of each recorded proposal.
    contexts: Vec<Vec<u32>>,
}

impl Drafter for Alternating<'_, '_> {
    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        sampling: &SamplingParams,
        target: &TargetState<'_>,
    ) -> jemma_engine::Result<Proposal> {
        self.round += 1;
        if self.round.is_multiple_of(self.every) {
            let p = self.mtp.propose(context, k, sampling, target)?;
            self.proposals.push(p.tokens.clone());
            self.contexts.push(context.to_vec());
            return Ok(p);
        }
        match &mut self.other {
            Some(d) => d.propose(context, k, sampling, target),
            None => Ok(Proposal::default()),
        }
    }
}

/// After a round whose drafts all stood, the drafter reads the hidden state of the last one and the K/V
/// the verification wrote: it proposes what it proposes after plain steps to the same point (a recorded
/// drafter's rounds of 4 tokens against 4 plain steps, across the sliding window).
#[test]
fn after_accepted_drafts_the_drafter_reads_the_verified_state() {
    let target = load_target();
    let m = Gemma4Assistant::load(&common::fixture("mtp"), None).unwrap();
    let prompt: Vec<u32> = vec![2, 10, 200, 33, 47];
    let o = opts(40);
    let want = plain(&target, &prompt, &o);
    let run = |other: Option<&mut dyn Drafter>, every: usize| -> Vec<Vec<u32>> {
        let mut state = DraftState::default();
        let mut mtp = MtpDrafter {
            model: &m,
            state: &mut state,
        };
        let mut d = Alternating {
            other,
            mtp: &mut mtp,
            every,
            round: 0,
            proposals: vec![],
            contexts: vec![],
        };
        let (tokens, _, _) = speculate(&target, &prompt, &o, &mut d, 3);
        assert_eq!(tokens, want);
        d.proposals
    };
    let mut recorded = RecordedDrafter {
        tokens: prompt.iter().chain(&want).copied().collect(),
        vocab: 1024,
    };
    let after_verify = run(Some(&mut recorded), 2);
    let after_plain = run(None, 5);
    assert!(after_verify.len() >= 6);
    let n = after_verify.len().min(after_plain.len());
    assert_eq!(after_verify[..n], after_plain[..n]);
}

/// Proposes the true continuation with every token at a position divisible by 3 wrong (greedy only).
struct Corrupted {
    truth: Vec<u32>,
}

impl Drafter for Corrupted {
    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        _: &SamplingParams,
        _: &TargetState<'_>,
    ) -> jemma_engine::Result<Proposal> {
        if !self.truth.starts_with(context) {
            return Ok(Proposal::default());
        }
        let n = context.len();
        let tokens = self.truth[n..]
            .iter()
            .take(k)
            .enumerate()
            .map(|(i, &t)| {
                if (n + i).is_multiple_of(3) {
                    (t + 1) % 1024
                } else {
                    t
                }
            })
            .collect();
        Ok(Proposal {
            tokens,
            ..Default::default()
        })
    }
}

/// After a round where only some drafts stood (the true continuation with every third token wrong), the
/// drafter reads the hidden state of the last draft that stood and the K/V left after the trim: each of its
/// proposals equals the one it makes, at the same context, on a generation that read that context as a
/// prompt.
#[test]
fn after_partly_accepted_drafts_the_drafter_reads_the_kept_state() {
    let target = load_target();
    let m = Gemma4Assistant::load(&common::fixture("mtp"), None).unwrap();
    let prompt: Vec<u32> = vec![2, 10, 200, 33, 47];
    let o = opts(40);
    let want = plain(&target, &prompt, &o);
    let mut recorded = Corrupted {
        truth: prompt.iter().chain(&want).copied().collect(),
    };
    let mut state = DraftState::default();
    let mut mtp = MtpDrafter {
        model: &m,
        state: &mut state,
    };
    let mut d = Alternating {
        other: Some(&mut recorded),
        mtp: &mut mtp,
        every: 2,
        round: 0,
        proposals: vec![],
        contexts: vec![],
    };
    let mut g = Generation::new(&target, &prompt, o.clone()).unwrap();
    g.keep_hidden(true);
    while !g.prefill(&target).unwrap() {}
    let mut rng = StdRng::seed_from_u64(5);
    let (mut tokens, mut partial) = (vec![], 0);
    while !g.is_finished() {
        let r = g.speculate(&target, &mut d, 3, &mut rng).unwrap();
        if d.round % 2 == 1 && r.drafted == 3 && (1..3).contains(&r.accepted) {
            partial += 1;
        }
        tokens.extend(r.steps.iter().map(|s| s.token));
    }
    assert_eq!(tokens, want);
    assert!(partial >= 2, "{partial} recorded rounds stood only in part");
    let (proposals, contexts) = (d.proposals, d.contexts);
    assert!(proposals.len() >= 6);
    for (p, ctx) in proposals.iter().zip(&contexts) {
        // A fresh generation whose prompt is the context without its pending token: it reads the
        // prompt, and its pending token is the same greedy one.
        let (head, pending) = ctx.split_at(ctx.len() - 1);
        let mut state = DraftState::default();
        let mut fresh = MtpDrafter {
            model: &m,
            state: &mut state,
        };
        let (t, got, _) = speculate(&target, head, &opts(4), &mut fresh, p.len());
        assert_eq!(t[0], pending[0]);
        assert_eq!(&got[0], p, "at context {}", ctx.len());
    }
}
