//! Drafters for speculative decoding on the MLX engine: what proposes the tokens that
//! [`crate::generate::Generation::speculate`] verifies in one forward pass of the target. The acceptance
//! rule and the controller that picks how many to draft are engine-agnostic (`jemma_serve::speculative`).
//!
//! - [`ModelDrafter`]: a smaller model with the same tokenizer (E2B drafting for E4B), with a cache of its
//!   own per sequence ([`DraftState`]) that it brings in line with the target's tokens before each round.
//! - [`MtpDrafter`]: Gemma 4's multi-token-prediction assistant ([`Gemma4Assistant`]), which keeps no
//!   cache: each round it reads the target's K/V and last hidden state ([`TargetState`]).
//! - [`RecordedDrafter`]: proposes a continuation recorded from a plain run (the benchmark's oracle: every
//!   draft stands and drafting costs nothing, which bounds what any drafter can gain).
//! - [`RandomDrafter`]: uniform random tokens (almost none stand: the benchmark's worst case).
//!
//! The serving engine drafts for every speculating sequence of a step at once ([`BatchDrafter`]:
//! [`ModelBatchDrafter`], [`MtpBatchDrafter`]): one pass of the drafter per draft step over all of them,
//! as the target verifies them in one forward.

use mlx_rs::{Array, Dtype, ops, ops::indexing::TryIndexOp, transforms::eval};
use rand::Rng;

use crate::generate::{DEFAULT_ATTENTION_BUDGET, DEFAULT_PREFILL_STEP, prefill_chunk};
use crate::models::gemma4::{Cache, Checkpoint, DraftRow, Gemma4, Gemma4Assistant};
use crate::sample::{Sampler, SamplingParams, log_softmax};
use crate::{EngineError, Result};

/// Tokens a drafter proposes, each with the law it was drawn from when the request samples (probabilities
/// over the vocabulary; empty rows under greedy decoding, where none is needed).
#[derive(Debug, Clone, Default)]
pub struct Proposal {
    /// Proposed tokens, in order (at most the `k` asked for; fewer or none when the drafter has none).
    pub tokens: Vec<u32>,
    /// `laws[i]`: the distribution `tokens[i]` was drawn from (sampling only; same length as `tokens`).
    pub laws: Vec<Vec<f32>>,
    /// Time spent reading context the drafter had not seen (a sequence's prompt at its first round, the
    /// tokens decoded plainly since its last): a one-off, which the controller must not count as the cost
    /// of each draft.
    pub catch_up: std::time::Duration,
}

/// What a drafter may read of the target as a round starts: the MTP assistant drafter reads the target's
/// K/V and its last hidden state; a draft model reads only the tokens.
#[derive(Clone, Copy)]
pub struct TargetState<'a> {
    /// The target model.
    pub model: &'a Gemma4,
    /// Its cache, holding every committed token but the pending one.
    pub cache: &'a Cache,
    /// Its final hidden state (1, 1, H) at the last position the cache holds: where the pending token's
    /// logits came from. None unless the generation keeps it
    /// ([`crate::generate::Generation::keep_hidden`]).
    pub hidden: Option<&'a Array>,
}

impl Proposal {
    /// A proposal from evaluated draft tokens (each a one-element int32 array) and laws (each V
    /// probabilities).
    fn read(tokens: &[Array], laws: &[Array], catch_up: std::time::Duration) -> Result<Self> {
        Ok(Self {
            tokens: tokens
                .iter()
                .map(|t| t.item_exact::<i32>() as u32)
                .collect(),
            laws: laws
                .iter()
                .map(|l| l.reshape(&[-1]).map(|r| r.as_slice::<f32>().to_vec()))
                .collect::<std::result::Result<_, _>>()?,
            catch_up,
        })
    }
}

/// What proposes draft tokens.
pub trait Drafter {
    /// Proposes up to `k` tokens continuing `context`: every token the target has committed (the prompt
    /// and what was generated), the last of which the target has not read yet. `sampling`: the request's
    /// sampling, whose law the drafts are drawn from when its temperature is above 0 (with the laws
    /// returned); greedy drafting otherwise. `target`: the target's state, for a drafter that reads it.
    ///
    /// Errors: an MLX failure.
    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        sampling: &SamplingParams,
        target: &TargetState<'_>,
    ) -> Result<Proposal>;
}

/// One sequence's part of a batched draft ([`BatchDrafter::propose_many`]): what [`Drafter::propose`]
/// takes, and the sequence's row in the batch the drafter was built for (which drafting state is its).
pub struct DraftRequest<'a> {
    /// The sequence's row.
    pub row: usize,
    /// Every token the target has committed, the last of which it has not read yet.
    pub context: &'a [u32],
    /// Most tokens to propose.
    pub k: usize,
    /// The request's sampling.
    pub sampling: &'a SamplingParams,
    /// The target's state.
    pub target: TargetState<'a>,
}

/// What proposes draft tokens for several sequences at once, reading its weights once per draft step for
/// all of them.
pub trait BatchDrafter {
    /// A proposal for each request, in order, each what [`Drafter::propose`] proposes for it alone up to
    /// the rounding of a pass over more rows.
    ///
    /// Errors: an MLX failure; a row outside the batch ([`EngineError::Speculative`]).
    fn propose_many(&mut self, requests: &[DraftRequest<'_>]) -> Result<Vec<Proposal>>;
}

/// A sequence's draft-model state: the drafter's own cache, the tokens it holds, and a rollback point
/// taken where the last round's drafts began (returned to when drafts are rejected and the cache cannot be
/// trimmed: a sliding window that has filled).
#[derive(Default)]
pub struct DraftState {
    cache: Option<Cache>,
    fed: Vec<u32>,
    snapshot: Option<(Checkpoint, usize)>,
    sampler: Option<Sampler>,
    seed: Option<u64>,
    /// Tokens of its first context the drafter found in its cache (a resumed cache's), once it drafted.
    reused: Option<usize>,
}

impl DraftState {
    /// A state that continues a draft cache holding `fed` (a prefix-cache entry's: the drafter's cache of
    /// an earlier request): the first round reads only what follows the part of `fed` its context shares
    /// (trimmed back to it, or read whole when the cache cannot be trimmed, as after rejected drafts).
    pub fn resume(cache: Cache, fed: Vec<u32>) -> Self {
        Self {
            cache: Some(cache),
            fed,
            ..Self::default()
        }
    }

    /// The drafter's cache holding a prefix of `committed` (what the target committed: drafts past it are
    /// taken back, to the last round's rollback point where the cache cannot be trimmed) and the tokens
    /// it holds, for the prefix cache; None before the first round, for a drafter without a cache of its
    /// own, and when nothing of `committed` is left.
    pub fn into_cache(mut self, committed: &[u32]) -> Option<(Cache, Vec<u32>)> {
        self.keep_common(committed, committed.len());
        match self.cache {
            Some(c) if !self.fed.is_empty() => Some((c, self.fed)),
            _ => None,
        }
    }

    /// Brings the cache to hold the longest prefix of `context` it holds, at most `limit` tokens (trimmed,
    /// or rolled back to the last round's start; emptied when neither can), and returns its length.
    fn keep_common(&mut self, context: &[u32], limit: usize) -> usize {
        if self.cache.is_none() {
            // Nothing is held without a cache (a failed round dropped it): its tokens must go too, or a
            // fresh cache would be taken for one holding them.
            self.fed.clear();
            self.snapshot = None;
            return 0;
        }
        let common = jemma_serve::prefix::common_prefix_len(&self.fed, context).min(limit);
        if common < self.fed.len() {
            let excess = self.fed.len() - common;
            let snapshot = self.snapshot.take().filter(|(_, n)| *n <= common);
            let back = self.cache.as_mut().and_then(|c| {
                if c.trim_end(excess) {
                    Some(common)
                } else {
                    snapshot.filter(|(cp, _)| c.rollback(cp)).map(|(_, n)| n)
                }
            });
            match back {
                Some(n) => self.fed.truncate(n),
                None => {
                    self.cache = None;
                    self.fed.clear();
                }
            }
        }
        self.fed.len()
    }

    /// Tokens of the first context the drafter took from a resumed cache instead of reading them (0
    /// before the first round, or when it read the context whole).
    pub fn reused(&self) -> usize {
        self.reused.unwrap_or(0)
    }

    /// Whether the drafter has drafted for this sequence (read its first context).
    pub fn started(&self) -> bool {
        self.reused.is_some()
    }

    /// A state whose draws under sampling repeat from `seed` (tests; a server drafts unseeded: the
    /// acceptance rule keeps the output the target's whatever the drafts).
    pub fn seeded(seed: u64) -> Self {
        Self {
            seed: Some(seed),
            ..Self::default()
        }
    }

    /// The drafter's own sampler for this sequence, made on first use: the request's filters and
    /// temperature, its own RNG (seeded when the state is).
    fn sampler(&mut self, sampling: &SamplingParams, vocab: usize) -> Result<&mut Sampler> {
        let sampler = match self.sampler.take() {
            Some(s) => s,
            None => {
                let params = SamplingParams {
                    seed: self.seed,
                    ..sampling.clone()
                };
                Sampler::new(params, vocab, Dtype::Float32)?
            }
        };
        Ok(self.sampler.insert(sampler))
    }

    /// Bytes the drafter's caches hold for this sequence.
    pub fn nbytes(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| c.nbytes() as u64)
            + self.snapshot.as_ref().map_or(0, |(c, _)| c.nbytes() as u64)
    }
}

/// A draft model with the same tokenizer as the target, for one sequence (its [`DraftState`]).
pub struct ModelDrafter<'a> {
    /// The draft model.
    pub model: &'a Gemma4,
    /// The sequence's drafting state.
    pub state: &'a mut DraftState,
}

impl Drafter for ModelDrafter<'_> {
    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        sampling: &SamplingParams,
        target: &TargetState<'_>,
    ) -> Result<Proposal> {
        let request = DraftRequest {
            row: 0,
            context,
            k,
            sampling,
            target: *target,
        };
        let mut proposals = model_propose(self.model, &mut [&mut *self.state], &[request])?;
        Ok(proposals.pop().unwrap_or_default())
    }
}

/// [`ModelDrafter`] for a batch of sequences: each reads what its draft cache lacks alone, then each draft
/// step runs the draft model once over every sequence still drafting, each row over its own draft cache
/// ([`Gemma4::forward_last_logits_batch`]).
pub struct ModelBatchDrafter<'a> {
    /// The draft model.
    pub model: &'a Gemma4,
    /// Each row's drafting state.
    pub states: Vec<&'a mut DraftState>,
}

impl BatchDrafter for ModelBatchDrafter<'_> {
    fn propose_many(&mut self, requests: &[DraftRequest<'_>]) -> Result<Vec<Proposal>> {
        model_propose(self.model, &mut self.states, requests)
    }
}

/// The draft model's proposals for `requests`, their draft steps batched; `states[r.row]` is request
/// `r`'s state.
fn model_propose(
    model: &Gemma4,
    states: &mut [&mut DraftState],
    requests: &[DraftRequest<'_>],
) -> Result<Vec<Proposal>> {
    check_rows(states.len(), requests)?;
    let mut taken = vec![];
    let proposed = model_propose_rows(model, states, requests, &mut taken);
    if proposed.is_err() {
        // The caches the failed pass took are gone (their last arrays may not evaluate): what their states
        // say they hold goes with them, so that the next round reads its context afresh.
        for i in taken {
            let st = &mut *states[i];
            st.cache = None;
            st.fed.clear();
            st.snapshot = None;
        }
    }
    proposed
}

/// Fails unless every request's row is one of `rows` states'.
fn check_rows(rows: usize, requests: &[DraftRequest<'_>]) -> Result<()> {
    match requests.iter().find(|r| r.row >= rows) {
        Some(r) => Err(EngineError::Speculative(format!(
            "a draft request for row {} of a batch of {rows}",
            r.row
        ))),
        None => Ok(()),
    }
}

/// [`model_propose`]'s work; `taken` gains the row of each state whose cache it takes.
fn model_propose_rows(
    model: &Gemma4,
    states: &mut [&mut DraftState],
    requests: &[DraftRequest<'_>],
    taken: &mut Vec<usize>,
) -> Result<Vec<Proposal>> {
    /// A request that drafts, its cache caught up.
    struct Live<'a> {
        at: usize,
        state: usize,
        k: usize,
        cache: Cache,
        /// The token the next step reads (1, 1).
        token: Array,
        sampling: &'a SamplingParams,
        catch_up: std::time::Duration,
        tokens: Vec<Array>,
        laws: Vec<Array>,
    }
    let vocab = model.config().vocab_size;
    let heads = model.config().num_attention_heads;
    let elem = crate::footprint::dtype_bytes(model.dtype());
    let mut proposals = vec![Proposal::default(); requests.len()];
    let mut live = Vec::with_capacity(requests.len());
    for (at_row, r) in requests.iter().enumerate() {
        let context = r.context;
        if r.k == 0 || context.is_empty() || context.iter().any(|&t| t as usize >= vocab) {
            continue;
        }
        let st = &mut *states[r.row];
        // The last context token is read with its logits, never taken from the cache.
        let held = st.keep_common(context, context.len() - 1);
        st.reused.get_or_insert(held);
        taken.push(r.row);
        let mut cache = st.cache.take().unwrap_or_else(|| model.new_cache());
        // Read what the draft has not (the whole prompt at a sequence's first round) in prefill chunks
        // under the same attention budget as the target's prompt, evaluating only the cache.
        let ids: Vec<i32> = context.iter().map(|&t| t as i32).collect();
        let mut at = held;
        let started = std::time::Instant::now();
        while ids.len() - at > 1 {
            let n = prefill_chunk(
                at,
                ids.len() - 1 - at,
                DEFAULT_PREFILL_STEP,
                heads,
                elem,
                Some(DEFAULT_ATTENTION_BUDGET),
            );
            let chunk = Array::from_slice(&ids[at..at + n], &[1, n as i32]);
            model.forward_hidden(&chunk, &mut cache)?;
            eval(cache.state())?;
            at += n;
        }
        // Only a long read is a one-off (the prompt, or a stretch decoded plainly); re-reading the last
        // round's drafts is part of what each round costs.
        let catch_up = if at - held > r.k + 1 {
            started.elapsed()
        } else {
            std::time::Duration::ZERO
        };
        st.fed.truncate(held);
        st.fed.extend_from_slice(&context[held..at]);
        // Where rejected drafts roll back to when the cache cannot be trimmed.
        st.snapshot = Some((cache.checkpoint(), at));
        live.push(Live {
            at: at_row,
            state: r.row,
            k: r.k,
            cache,
            token: Array::from_slice(&ids[at..], &[1, 1]),
            sampling: r.sampling,
            catch_up,
            tokens: Vec::with_capacity(r.k),
            laws: vec![],
        });
    }
    let steps = live.iter().map(|l| l.k).max().unwrap_or(0);
    // All steps are queued lazily, each on the previous one's still-lazy tokens, and read back once.
    for step in 0..steps {
        let mut active: Vec<&mut Live<'_>> = live.iter_mut().filter(|l| l.k > step).collect();
        let input = match active.as_slice() {
            [one] => one.token.clone(),
            many => ops::concatenate(&many.iter().map(|l| &l.token).collect::<Vec<_>>(), 0)?,
        };
        let logits = {
            let mut caches: Vec<&mut Cache> = active.iter_mut().map(|l| &mut l.cache).collect();
            model.forward_last_logits_batch(&input, &mut caches)?
        };
        // In float32: the law reported must be the one drawn from, to the rounding of a bf16 model.
        let logits = logits.as_dtype(Dtype::Float32)?;
        let b = active.len() as i32;
        for (r, l) in active.into_iter().enumerate() {
            let row = if b == 1 {
                logits.clone()
            } else {
                logits.try_index(r as i32..r as i32 + 1)?
            };
            let sampler = states[l.state].sampler(l.sampling, vocab)?;
            let lp = log_softmax(&sampler.process(&row, None)?)?;
            let token = if l.sampling.temperature == 0.0 {
                ops::indexing::argmax_axis(&lp, -1, None)?
            } else {
                let law = sampler.law(&lp)?;
                let t = sampler.draw(&law)?;
                l.laws.push(ops::exp(&law)?);
                t
            };
            l.token = token.as_dtype(Dtype::Int32)?.reshape(&[1, 1])?;
            l.tokens.push(l.token.clone());
        }
    }
    eval(live.iter().flat_map(|l| l.tokens.iter().chain(&l.laws)))?;
    for l in live {
        let proposal = Proposal::read(&l.tokens, &l.laws, l.catch_up)?;
        let st = &mut states[l.state];
        // The cache holds the last context token and every draft but the last.
        let context = requests[l.at].context;
        st.fed.push(context[context.len() - 1]);
        st.fed
            .extend_from_slice(&proposal.tokens[..proposal.tokens.len() - 1]);
        st.cache = Some(l.cache);
        proposals[l.at] = proposal;
    }
    Ok(proposals)
}

/// Gemma 4's MTP assistant drafter for one sequence (mlx-vlm's `draft_block`): from the pending token and
/// the target's final hidden state at the last position it read, k steps of the assistant, each reading
/// the previous step's token and hidden state and the target's K/V as they stand (the same K/V and query
/// position for every step). The query sits at the pending token's position, as in transformers'
/// `SinglePositionMultiTokenCandidateGenerator` (the checkpoints' reference; one past mlx-vlm's, which
/// drafts other tokens: checked on the fixtures' drafters) and llama.cpp. Greedy requests draft the head's argmax (the sparse head's without the full
/// logits; after the request's `logit_bias`, as the draft model's drafts, when it has one); sampled ones
/// draw from the request's law over the head's logits. Proposes nothing when the
/// generation keeps no hidden state ([`crate::generate::Generation::keep_hidden`]).
pub struct MtpDrafter<'a> {
    /// The drafter.
    pub model: &'a Gemma4Assistant,
    /// The sequence's drafting state (its sampler only: the drafter has no cache).
    pub state: &'a mut DraftState,
}

impl Drafter for MtpDrafter<'_> {
    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        sampling: &SamplingParams,
        target: &TargetState<'_>,
    ) -> Result<Proposal> {
        let request = DraftRequest {
            row: 0,
            context,
            k,
            sampling,
            target: *target,
        };
        let mut proposals = mtp_propose(self.model, &mut [&mut *self.state], &[request])?;
        Ok(proposals.pop().unwrap_or_default())
    }
}

/// [`MtpDrafter`] for a batch of sequences: each draft step runs the assistant once over every sequence
/// still drafting ([`Gemma4Assistant::step_rows`]).
pub struct MtpBatchDrafter<'a> {
    /// The drafter.
    pub model: &'a Gemma4Assistant,
    /// Each row's drafting state (its sampler).
    pub states: Vec<&'a mut DraftState>,
}

impl BatchDrafter for MtpBatchDrafter<'_> {
    fn propose_many(&mut self, requests: &[DraftRequest<'_>]) -> Result<Vec<Proposal>> {
        mtp_propose(self.model, &mut self.states, requests)
    }
}

/// The MTP drafter's proposals for `requests`, drafted together; `states[r.row]` is request `r`'s state.
fn mtp_propose(
    model: &Gemma4Assistant,
    states: &mut [&mut DraftState],
    requests: &[DraftRequest<'_>],
) -> Result<Vec<Proposal>> {
    /// A request that drafts.
    struct Live<'a> {
        at: usize,
        k: usize,
        kv: crate::models::gemma4::assistant::TargetKv,
        position: i32,
        /// The token the next step reads (1, 1) and the hidden state it reads (1, 1, H).
        token: Array,
        hidden: Array,
        sampling: &'a SamplingParams,
        tokens: Vec<Array>,
        laws: Vec<Array>,
    }
    let vocab = model.config().text.vocab_size;
    let mut proposals = vec![Proposal::default(); requests.len()];
    let mut live = Vec::with_capacity(requests.len());
    check_rows(states.len(), requests)?;
    for (at, r) in requests.iter().enumerate() {
        let (Some(hidden), Some(&last)) = (r.target.hidden, r.context.last()) else {
            continue;
        };
        // The last position the target read; the query is at the next, the pending token's.
        let position = r.target.cache.offset() - 1;
        if r.k == 0 || last as usize >= vocab || position < 0 {
            continue;
        }
        let Some(kv) = Gemma4Assistant::target_kv(r.target.model, r.target.cache)? else {
            continue;
        };
        live.push(Live {
            at,
            k: r.k,
            kv,
            position,
            token: Array::from_slice(&[last as i32], &[1, 1]),
            hidden: hidden.clone(),
            sampling: r.sampling,
            tokens: Vec::with_capacity(r.k),
            laws: vec![],
        });
    }
    let Some(first) = live.first() else {
        return Ok(proposals);
    };
    let target = requests[first.at].target.model;
    let steps = live.iter().map(|l| l.k).max().unwrap_or(0);
    // All steps are queued lazily, each on the previous one's still-lazy tokens, and read back once.
    for step in 0..steps {
        let active: Vec<usize> = (0..live.len()).filter(|&j| live[j].k > step).collect();
        let stack = |parts: Vec<&Array>| -> Result<Array> {
            Ok(match parts.as_slice() {
                [one] => (*one).clone(),
                many => ops::concatenate(many, 0)?,
            })
        };
        let tokens = stack(active.iter().map(|&j| &live[j].token).collect())?;
        let hidden = stack(active.iter().map(|&j| &live[j].hidden).collect())?;
        let rows: Vec<DraftRow<'_>> = active
            .iter()
            .map(|&j| DraftRow {
                kv: &live[j].kv,
                position: live[j].position,
                query: live[j].position + 1,
            })
            .collect();
        let (next, hn) = model.step_rows(&target.embed(&tokens)?, &hidden, &rows)?;
        drop(rows);
        let b = active.len() as i32;
        let row = |a: &Array, r: i32| -> Result<Array> {
            Ok(if b == 1 {
                a.clone()
            } else {
                a.try_index(r..r + 1)?
            })
        };
        // Each head runs once per step: the greedy rows' argmax over them alone, the logits of the others
        // (sampled, or greedy after a `logit_bias`, which moves the argmax the target takes) over them
        // alone (the dense head reads the whole embedding once, whatever the number of rows).
        let (greedy_rows, sampled_rows): (Vec<usize>, Vec<usize>) =
            (0..active.len()).partition(|&r| {
                let s = live[active[r]].sampling;
                s.temperature == 0.0 && s.logit_bias.is_empty()
            });
        let over = |rows: &[usize]| -> Result<Option<Array>> {
            Ok(match rows {
                [] => None,
                all if all.len() == active.len() => Some(hn.clone()),
                some => {
                    let idx: Vec<i32> = some.iter().map(|&r| r as i32).collect();
                    let idx = Array::from_slice(&idx, &[idx.len() as i32]);
                    Some(hn.take_axis(&idx, 0)?)
                }
            })
        };
        let greedy = over(&greedy_rows)?.map(|h| model.argmax(&h)).transpose()?;
        let sampled = over(&sampled_rows)?.map(|h| model.logits(&h)).transpose()?;
        let nth = |a: &Array, n: usize, of: usize| -> Result<Array> {
            Ok(if of == 1 {
                a.clone()
            } else {
                a.try_index(n as i32..n as i32 + 1)?
            })
        };
        for (r, &j) in active.iter().enumerate() {
            let l = &mut live[j];
            l.hidden = row(&next, r as i32)?;
            l.token = match (greedy_rows.binary_search(&r), &greedy, &sampled) {
                (Ok(n), Some(g), _) => nth(g, n, greedy_rows.len())?,
                (Err(_), _, Some(all)) => {
                    let n = sampled_rows.binary_search(&r).map_err(|_| {
                        EngineError::Speculative("a draft row neither greedy nor sampled".into())
                    })?;
                    let sampler = states[requests[l.at].row].sampler(l.sampling, vocab)?;
                    let logits = nth(all, n, sampled_rows.len())?.reshape(&[1, -1])?;
                    let lp =
                        log_softmax(&sampler.process(&logits.as_dtype(Dtype::Float32)?, None)?)?;
                    let t = if l.sampling.temperature == 0.0 {
                        ops::indexing::argmax_axis(&lp, -1, None)?
                    } else {
                        let law = sampler.law(&lp)?;
                        l.laws.push(ops::exp(&law)?);
                        sampler.draw(&law)?
                    };
                    t.as_dtype(Dtype::Int32)?.reshape(&[1, 1])?
                }
                _ => {
                    return Err(EngineError::Speculative(
                        "a draft row without its head's output".into(),
                    ));
                }
            };
            l.tokens.push(l.token.clone());
        }
    }
    eval(live.iter().flat_map(|l| l.tokens.iter().chain(&l.laws)))?;
    for l in &live {
        proposals[l.at] = Proposal::read(&l.tokens, &l.laws, std::time::Duration::ZERO)?;
    }
    Ok(proposals)
}

/// Proposes the continuation of a recorded token sequence: the oracle of `scripts/bench-spec`, which
/// records a plain greedy run and replays it, so that every draft stands at no drafting cost.
#[derive(Debug, Clone)]
pub struct RecordedDrafter {
    /// Prompt and continuation, as recorded.
    pub tokens: Vec<u32>,
    /// Vocabulary size (a sampled request's drafts carry a law: all mass on the recorded token).
    pub vocab: usize,
}

impl Drafter for RecordedDrafter {
    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        sampling: &SamplingParams,
        _: &TargetState<'_>,
    ) -> Result<Proposal> {
        if !self.tokens.starts_with(context) {
            return Ok(Proposal::default());
        }
        let tokens: Vec<u32> = self.tokens[context.len()..]
            .iter()
            .take(k)
            .copied()
            .take_while(|&t| (t as usize) < self.vocab)
            .collect();
        let laws = if sampling.temperature == 0.0 {
            vec![]
        } else {
            tokens
                .iter()
                .map(|&t| {
                    let mut row = vec![0.0; self.vocab];
                    row[t as usize] = 1.0;
                    row
                })
                .collect()
        };
        Ok(Proposal {
            tokens,
            laws,
            ..Default::default()
        })
    }
}

/// Proposes uniformly random tokens (the benchmark's worst case: almost no draft stands).
pub struct RandomDrafter<R: Rng> {
    /// Vocabulary size.
    pub vocab: usize,
    /// Where the tokens come from.
    pub rng: R,
}

impl<R: Rng> Drafter for RandomDrafter<R> {
    fn propose(
        &mut self,
        _: &[u32],
        k: usize,
        sampling: &SamplingParams,
        _: &TargetState<'_>,
    ) -> Result<Proposal> {
        let tokens: Vec<u32> = (0..k)
            .map(|_| self.rng.random_range(0..self.vocab as u32))
            .collect();
        let laws = if sampling.temperature == 0.0 {
            vec![]
        } else {
            vec![vec![1.0 / self.vocab as f32; self.vocab]; k]
        };
        Ok(Proposal {
            tokens,
            laws,
            ..Default::default()
        })
    }
}

/// Checks that a draft model can draft for a target: the same vocabulary, token for token (the
/// tokenizers' files may differ in layout, e.g. after a conversion).
///
/// Errors: [`EngineError::InvalidModel`] naming the difference.
pub fn check_draft_vocabulary(
    target: &crate::tokenizer::Tokenizer,
    draft: &crate::tokenizer::Tokenizer,
) -> Result<()> {
    let (a, b) = (target.vocab_size(), draft.vocab_size());
    if a != b {
        return Err(EngineError::InvalidModel(format!(
            "the draft model's vocabulary has {b} tokens, the target's {a}"
        )));
    }
    if let Some(id) = (0..a as u32).find(|&id| target.token_bytes(id) != draft.token_bytes(id)) {
        return Err(EngineError::InvalidModel(format!(
            "the draft model's tokenizer differs from the target's at token {id}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state whose cache a failed pass dropped holds nothing: the next round reads its whole context
    /// into a fresh cache rather than taking that cache for one holding the tokens the state lists.
    #[test]
    fn a_state_without_its_cache_holds_nothing() {
        let mut st = DraftState {
            fed: vec![2, 7, 9],
            ..DraftState::default()
        };
        assert_eq!(st.keep_common(&[2, 7, 9, 4], 3), 0);
        assert!(st.fed.is_empty() && st.snapshot.is_none());
        assert!(st.into_cache(&[2, 7, 9]).is_none());
    }
}
