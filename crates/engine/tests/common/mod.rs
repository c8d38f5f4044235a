//! What the engine's tests share: the fixtures, comparing arrays, running greedy requests with media on an
//! engine, and running speculative rounds for several sequences with their drafts proposed together or
//! each alone.
#![allow(dead_code)]

use std::path::PathBuf;

use jemma_engine::generate::{Drafted, GenerateOptions, Generation, RoundStart};
use jemma_engine::models::gemma4::{Gemma4, Gemma4Assistant};
use jemma_engine::runtime::{Engine, Event, Prompt, Request};
use jemma_engine::sample::SamplingParams;
use jemma_engine::speculative::{
    BatchDrafter, DraftRequest, DraftState, Drafter, ModelBatchDrafter, ModelDrafter,
    MtpBatchDrafter, MtpDrafter, Proposal, TargetState,
};
use mlx_rs::Array;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// `fixtures/<name>` (or under `$JEMMA_FIXTURES`), which must hold `reference.safetensors`.
pub fn fixture(name: &str) -> PathBuf {
    jemma_fixtures::fixture(name, "reference.safetensors")
}

/// max |a − b| over two arrays of one shape.
pub fn max_abs_diff(a: &Array, b: &Array) -> f32 {
    assert_eq!(a.shape(), b.shape());
    mlx_rs::ops::abs(mlx_rs::ops::subtract(a, b).unwrap())
        .unwrap()
        .max(None)
        .unwrap()
        .item_cast::<f32>()
}

/// An int32 reference array as token ids.
pub fn tokens(a: &Array) -> Vec<u32> {
    a.as_slice::<i32>().iter().map(|&t| t as u32).collect()
}

/// The media a request carries.
#[derive(Default)]
pub struct Media {
    /// Images.
    pub images: Vec<jemma_media::DecodedImage>,
    /// Audio clips.
    pub audio: Vec<jemma_media::audio::DecodedAudio>,
    /// Videos.
    pub videos: Vec<jemma_media::video::DecodedVideo>,
}

/// A greedy request of `max_tokens` tokens (no stop token: the references ran that many steps whatever
/// came) with stop strings `stop` and `media`.
pub fn request(prompt: Prompt, max_tokens: usize, stop: Vec<String>, media: Media) -> Request {
    Request {
        prompt,
        options: GenerateOptions {
            max_tokens,
            stop_tokens: vec![1 << 20],
            ..Default::default()
        },
        stop,
        parse_output: false,
        constraint: None,
        thinking_token_budget: None,
        parallel_tool_calls: true,
        fit_context: false,
        images: media.images,
        audio: media.audio,
        videos: media.videos,
    }
}

/// 32 greedy steps of `prompt` with `media` on `engine` (no stop token: the references ran 32 steps
/// whatever came): (generated tokens, cached prompt tokens), or the engine's error.
pub fn greedy(engine: &Engine, prompt: Prompt, media: Media) -> Result<(Vec<u32>, usize), String> {
    let mut rx = engine
        .submit(request(prompt, 32, vec![], media))
        .map_err(|e| e.to_string())?;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Done(s) => return Ok((s.tokens, s.cached_tokens)),
            Event::Error(e) => return Err(e.to_string()),
            _ => {}
        }
    }
    Err("no answer".into())
}

/// Checks a prompt read with its media against mlx-vlm's reference `case` in `refs`: `h` (1, L, H) is
/// the model's hidden states over the whole prompt `ids` (1, L) and `cache` the cache that read it. The
/// logits match `{case}.logits` at every position to 1e-4; the placeholders read as plain text give
/// other logits (the media was seen or heard); and 32 greedy tokens decoded from `cache` are
/// `{case}.greedy`, token for token. `what` names the media in messages.
pub fn assert_media_prompt_matches(
    model: &jemma_engine::models::gemma4::Gemma4,
    ids: &Array,
    h: &Array,
    cache: &mut jemma_engine::models::gemma4::Cache,
    refs: &std::collections::HashMap<String, Array>,
    case: &str,
    what: &str,
) {
    use mlx_rs::Dtype;
    use mlx_rs::ops::indexing::IndexOp;
    let logits = model.logits(h).unwrap();
    let want = &refs[&format!("{case}.logits")];
    let d = max_abs_diff(&logits.as_dtype(Dtype::Float32).unwrap(), want);
    eprintln!(
        "{case}: {} positions with {what}, max |Δlogit| = {d:.3e}",
        ids.shape()[1]
    );
    assert!(d <= 1e-4, "{case}: max |Δlogit| = {d}");
    let mut plain_cache = model.new_cache();
    let plain = model
        .logits(&model.forward_hidden(ids, &mut plain_cache).unwrap())
        .unwrap();
    assert!(
        max_abs_diff(&plain.as_dtype(Dtype::Float32).unwrap(), want) > 1e-2,
        "{case}: the {what} changed nothing"
    );
    let last = h.shape()[1] - 1;
    let mut logits = model
        .logits(&h.index((.., last..last + 1, ..)))
        .unwrap()
        .reshape(&[1, -1])
        .unwrap();
    let mut got = vec![];
    for _ in 0..32 {
        let t = mlx_rs::ops::indexing::argmax_axis(&logits, -1, None)
            .unwrap()
            .as_dtype(Dtype::Int32)
            .unwrap()
            .as_slice::<i32>()[0];
        got.push(t);
        logits = model
            .forward_last_logits(&Array::from_slice(&[t], &[1, 1]), cache)
            .unwrap();
    }
    let greedy = refs[&format!("{case}.greedy")].as_slice::<i32>().to_vec();
    assert_eq!(got, greedy, "{case}: greedy continuation after the {what}");
}

/// What drafts in [`run_rows`].
#[derive(Clone, Copy)]
pub enum DraftSource<'a> {
    /// The MTP assistant.
    Mtp(&'a Gemma4Assistant),
    /// A draft model.
    Model(&'a Gemma4),
}

/// Records what the drafter it wraps proposed, and after which pending token (the context's last).
pub struct Recording<'a> {
    /// The drafter.
    pub inner: &'a mut dyn Drafter,
    /// Its proposals, in order.
    pub proposals: Vec<Proposal>,
    /// The pending token each followed.
    pub pending: Vec<u32>,
}

impl<'a> Recording<'a> {
    /// Records `inner`.
    pub fn new(inner: &'a mut dyn Drafter) -> Self {
        Self {
            inner,
            proposals: vec![],
            pending: vec![],
        }
    }
}

impl Drafter for Recording<'_> {
    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        sampling: &SamplingParams,
        target: &TargetState<'_>,
    ) -> jemma_engine::Result<Proposal> {
        let p = self.inner.propose(context, k, sampling, target)?;
        self.proposals.push(p.clone());
        self.pending.extend(context.last());
        Ok(p)
    }
}

/// Records what the batched drafter it wraps proposed for each of its rows, and how many rows drafted
/// together.
struct RecordingMany<'a> {
    inner: Box<dyn BatchDrafter + 'a>,
    proposals: Vec<Vec<Proposal>>,
    widest: usize,
    /// Fail the next call for several rows, after the drafter ran (its states changed as by a pass that
    /// failed late).
    fail: bool,
}

impl BatchDrafter for RecordingMany<'_> {
    fn propose_many(
        &mut self,
        requests: &[DraftRequest<'_>],
    ) -> jemma_engine::Result<Vec<Proposal>> {
        let ps = self.inner.propose_many(requests)?;
        if self.fail && requests.len() > 1 {
            self.fail = false;
            return Err(jemma_engine::EngineError::Speculative(
                "a failure for the test".into(),
            ));
        }
        self.widest = self.widest.max(requests.len());
        for (r, p) in requests.iter().zip(&ps) {
            self.proposals[r.row].push(p.clone());
        }
        Ok(ps)
    }
}

/// How [`run_rows`] drafts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Drafting {
    /// Each row alone.
    Alone,
    /// Every row together (one batched drafter pass per draft step).
    Together,
    /// Together, but the first pass for several rows fails once the drafter has run, so that
    /// `Generation::draft_rounds` drafts that round's rows again, each alone.
    FailingOnce,
}

/// Runs `rows` (prompt, k, options) on `target` together to the end, rounds verified together, drafts
/// proposed by `source` as `drafting` says; returns each row's tokens, each row's proposals round by round
/// (those of a failed pass left out), and the most rows drafted together.
pub fn run_rows(
    target: &Gemma4,
    source: DraftSource<'_>,
    rows: &[(Vec<u32>, usize, GenerateOptions)],
    drafting: Drafting,
) -> (Vec<Vec<u32>>, Vec<Vec<Proposal>>, usize) {
    let together = drafting != Drafting::Alone;
    let mut fail = drafting == Drafting::FailingOnce;
    let mut gens: Vec<Generation> = rows
        .iter()
        .map(|(p, _, o)| {
            let mut g = Generation::new(target, p, o.clone()).unwrap();
            g.keep_hidden(true);
            while !g.prefill(target).unwrap() {}
            g
        })
        .collect();
    let mut states: Vec<DraftState> = (0..rows.len() as u64).map(DraftState::seeded).collect();
    let mut rngs: Vec<StdRng> = (0..rows.len() as u64).map(StdRng::seed_from_u64).collect();
    let mut got = vec![vec![]; rows.len()];
    let mut proposals = vec![vec![]; rows.len()];
    let mut widest = 0;
    while gens.iter().any(|g| !g.is_finished()) {
        let live: Vec<usize> = (0..rows.len())
            .filter(|&i| !gens[i].is_finished())
            .collect();
        let starts: Vec<RoundStart> = if together {
            let states: Vec<&mut DraftState> = (states.iter_mut().enumerate())
                .filter(|(i, _)| live.contains(i))
                .map(|(_, s)| s)
                .collect();
            let mut rec = RecordingMany {
                inner: match source {
                    DraftSource::Mtp(model) => Box::new(MtpBatchDrafter { model, states }),
                    DraftSource::Model(model) => Box::new(ModelBatchDrafter { model, states }),
                },
                proposals: vec![vec![]; live.len()],
                widest: 0,
                fail,
            };
            let batch: Vec<(&mut Generation, usize)> = gens
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| live.contains(i))
                .map(|(i, g)| (g, rows[i].1))
                .collect();
            let starts = Generation::draft_rounds(target, batch, &mut rec);
            fail = rec.fail;
            widest = widest.max(rec.widest);
            for (j, ps) in rec.proposals.into_iter().enumerate() {
                proposals[live[j]].extend(ps);
            }
            starts.into_iter().map(Result::unwrap).collect()
        } else {
            live.iter()
                .map(|&i| {
                    let state = &mut states[i];
                    let (mut mtp, mut model);
                    let inner: &mut dyn Drafter = match source {
                        DraftSource::Mtp(m) => {
                            mtp = MtpDrafter { model: m, state };
                            &mut mtp
                        }
                        DraftSource::Model(m) => {
                            model = ModelDrafter { model: m, state };
                            &mut model
                        }
                    };
                    let mut rec = Recording::new(inner);
                    let start = gens[i].draft_round(target, &mut rec, rows[i].1).unwrap();
                    proposals[i].extend(rec.proposals);
                    start
                })
                .collect()
        };
        let mut drafted = vec![];
        for (&i, start) in live.iter().zip(starts) {
            match start {
                RoundStart::Done(r) => got[i].extend(r.steps.iter().map(|s| s.token)),
                RoundStart::Drafted(d) => drafted.push((i, d)),
            }
        }
        verify_together(target, &mut gens, &mut rngs, drafted, &mut got);
    }
    (got, proposals, widest)
}

/// Verifies the `drafted` rounds (generation index, drafts; by increasing index) of `gens` together in one
/// forward of `target`, each accepting with its own RNG of `rngs`, and hands each round's tokens to its
/// generation's entry of `got`.
pub fn verify_together(
    target: &Gemma4,
    gens: &mut [Generation],
    rngs: &mut [StdRng],
    drafted: Vec<(usize, Drafted)>,
    got: &mut [Vec<u32>],
) {
    let order: Vec<usize> = drafted.iter().map(|(i, _)| *i).collect();
    let mut drafted = drafted.into_iter().peekable();
    let batch: Vec<_> = gens
        .iter_mut()
        .zip(rngs.iter_mut())
        .enumerate()
        .filter_map(|(i, (g, r))| {
            let (_, d) = drafted.next_if(|(j, _)| *j == i)?;
            Some((g, d, r))
        })
        .collect();
    for (i, r) in order
        .into_iter()
        .zip(Generation::verify_rounds(target, batch).unwrap())
    {
        got[i].extend(r.unwrap().steps.iter().map(|s| s.token));
    }
}

/// Drafting for several sequences at once proposes for each what it proposes drafting alone, on `target`
/// with `source`: four rows of different prompt lengths (both sides of the fixtures' 16-token sliding
/// window), different `k` (rows leave the batch part-way through a round) and a sampled row (seeded: its
/// draws, and its laws within 1e-5, are its lone ones) beside greedy ones, run to the end with rounds
/// verified together. A batched pass that fails after drafting has its rows drafted again alone, from the
/// states the failed pass left, and the greedy ones propose what they propose alone (the sampled row's
/// drafter drew in the failed pass). Greedy rows answer as plain decoding. `what` names the case.
pub fn drafting_together_is_drafting_alone(target: &Gemma4, source: DraftSource<'_>, what: &str) {
    let opts = |max_tokens| GenerateOptions {
        max_tokens,
        stop_tokens: vec![],
        ..Default::default()
    };
    let sampled = GenerateOptions {
        sampling: SamplingParams {
            temperature: 0.8,
            seed: Some(9),
            ..Default::default()
        },
        ..opts(24)
    };
    let rows = vec![
        (vec![2, 10, 200, 33, 47], 4, opts(24)),
        ((2..40).collect::<Vec<u32>>(), 2, opts(20)),
        ((5..17).collect(), 3, sampled),
        ((3..60).rev().collect(), 4, opts(28)),
    ];
    let (got, together, widest) = run_rows(target, source, &rows, Drafting::Together);
    let (alone_got, alone, _) = run_rows(target, source, &rows, Drafting::Alone);
    let (_, retried, _) = run_rows(target, source, &rows, Drafting::FailingOnce);
    assert!(
        widest >= 3,
        "{what}: at most {widest} rows drafted together"
    );
    let tokens = |ps: &[Proposal]| ps.iter().map(|p| p.tokens.clone()).collect::<Vec<_>>();
    for (i, (p, _, o)) in rows.iter().enumerate() {
        let what = format!("{what}, row {i}");
        assert_eq!(got[i], alone_got[i], "{what}");
        let want = tokens(&alone[i]);
        assert_eq!(tokens(&together[i]), want, "{what}: drafts");
        assert!(
            want.iter().any(|d| !d.is_empty()),
            "{what}: drafted nothing"
        );
        if o.sampling.temperature == 0.0 {
            assert_eq!(
                tokens(&retried[i]),
                want,
                "{what}: drafts after a failed batch"
            );
            let mut plain = vec![];
            jemma_engine::generate::generate(target, p, o, |s| {
                plain.push(s.token);
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
            assert_eq!(got[i], plain, "{what}");
        } else {
            for (a, b) in together[i].iter().zip(&alone[i]) {
                assert_eq!(a.laws.len(), a.tokens.len());
                for (x, y) in a.laws.iter().zip(&b.laws) {
                    let diff = (x.iter().zip(y))
                        .map(|(x, y)| (x - y).abs())
                        .fold(0.0, f32::max);
                    assert!(diff <= 1e-5, "{what}: laws differ by {diff}");
                }
            }
        }
    }
}
