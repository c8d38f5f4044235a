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

use mlx_rs::{Array, Dtype, ops, transforms::eval};
use rand::Rng;

use crate::generate::{DEFAULT_ATTENTION_BUDGET, DEFAULT_PREFILL_STEP, prefill_chunk};
use crate::models::gemma4::{Cache, Checkpoint, Gemma4, Gemma4Assistant};
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
        let common = self
            .fed
            .iter()
            .zip(context)
            .take_while(|(a, b)| a == b)
            .count()
            .min(limit);
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

impl ModelDrafter<'_> {
    /// Brings the draft cache to hold a prefix of `context` and returns how many tokens it holds.
    fn sync(&mut self, context: &[u32]) -> usize {
        // The last context token is read with its logits, never taken from the cache.
        self.state
            .keep_common(context, context.len().saturating_sub(1))
    }
}

impl Drafter for ModelDrafter<'_> {
    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        sampling: &SamplingParams,
        _: &TargetState<'_>,
    ) -> Result<Proposal> {
        if k == 0 || context.is_empty() {
            return Ok(Proposal::default());
        }
        let vocab = self.model.config().vocab_size;
        if context.iter().any(|&t| t as usize >= vocab) {
            return Ok(Proposal::default());
        }
        let held = self.sync(context);
        let model = self.model;
        let st = &mut *self.state;
        st.reused.get_or_insert(held);
        let mut cache = st.cache.take().unwrap_or_else(|| model.new_cache());
        // Read what the draft has not (the whole prompt at a sequence's first round) in prefill chunks
        // under the same attention budget as the target's prompt, evaluating only the cache.
        let ids: Vec<i32> = context.iter().map(|&t| t as i32).collect();
        let mut at = held;
        let started = std::time::Instant::now();
        let heads = model.config().num_attention_heads;
        let elem = crate::footprint::dtype_bytes(model.dtype());
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
        let catch_up = if at - held > k + 1 {
            started.elapsed()
        } else {
            std::time::Duration::ZERO
        };
        st.fed.truncate(held);
        st.fed.extend_from_slice(&context[held..at]);
        // Where rejected drafts roll back to when the cache cannot be trimmed.
        st.snapshot = Some((cache.checkpoint(), at));
        let greedy = sampling.temperature == 0.0;
        let sampler = st.sampler(sampling, vocab)?;
        // All k steps are queued lazily, each on the previous one's still-lazy token, and read back once.
        let mut input = Array::from_slice(&ids[at..], &[1, 1]);
        let (mut tokens, mut laws) = (Vec::with_capacity(k), Vec::with_capacity(k));
        for i in 0..k {
            let logits = model.forward_last_logits(&input, &mut cache)?;
            // In float32: the law reported must be the one drawn from, to the rounding of a bf16 model.
            let logits = logits.as_dtype(Dtype::Float32)?;
            let lp = log_softmax(&sampler.process(&logits, None)?)?;
            let token = if greedy {
                ops::indexing::argmax_axis(&lp, -1, None)?
            } else {
                let law = sampler.law(&lp)?;
                let t = sampler.draw(&law)?;
                laws.push(ops::exp(&law)?);
                t
            };
            let token = token.as_dtype(Dtype::Int32)?.reshape(&[1, 1])?;
            tokens.push(token.clone());
            if i + 1 < k {
                input = token;
            }
        }
        eval(tokens.iter().chain(&laws))?;
        let proposal = Proposal::read(&tokens, &laws, catch_up)?;
        // The cache holds the last context token and every draft but the last.
        st.fed.push(context[at]);
        st.fed
            .extend_from_slice(&proposal.tokens[..proposal.tokens.len() - 1]);
        st.cache = Some(cache);
        Ok(proposal)
    }
}

/// Gemma 4's MTP assistant drafter for one sequence (mlx-vlm's `draft_block`): from the pending token and
/// the target's final hidden state at the last position it read, k steps of the assistant, each reading
/// the previous step's token and hidden state and the target's K/V as they stand (the same K/V and query
/// position for every step). The query sits at the pending token's position, as in transformers'
/// `SinglePositionMultiTokenCandidateGenerator` (the checkpoints' reference; one past mlx-vlm's, which
/// drafts other tokens: checked on the fixtures' drafters) and llama.cpp. Greedy requests draft the head's argmax (the sparse head's without the full
/// logits); sampled ones draw from the request's law over the head's logits. Proposes nothing when the
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
        let vocab = self.model.config().text.vocab_size;
        let (Some(hidden), Some(&last)) = (target.hidden, context.last()) else {
            return Ok(Proposal::default());
        };
        // The last position the target read; the query is at the next, the pending token's.
        let position = target.cache.offset() - 1;
        if k == 0 || last as usize >= vocab || position < 0 {
            return Ok(Proposal::default());
        }
        let Some(kv) = Gemma4Assistant::target_kv(target.model, target.cache)? else {
            return Ok(Proposal::default());
        };
        let greedy = sampling.temperature == 0.0;
        let sampler = self.state.sampler(sampling, vocab)?;
        // All k steps are queued lazily, each on the previous one's still-lazy token, and read back once.
        let mut token = Array::from_slice(&[last as i32], &[1, 1]);
        let mut g = hidden.clone();
        let (mut tokens, mut laws) = (Vec::with_capacity(k), Vec::with_capacity(k));
        for _ in 0..k {
            let (next, hn) = self.model.step_at(
                &target.model.embed(&token)?,
                &g,
                &kv,
                position,
                position + 1,
            )?;
            g = next;
            token = if greedy {
                self.model.argmax(&hn)?
            } else {
                let logits = self.model.logits(&hn)?.reshape(&[1, -1])?;
                let lp = log_softmax(&sampler.process(&logits.as_dtype(Dtype::Float32)?, None)?)?;
                let law = sampler.law(&lp)?;
                let t = sampler.draw(&law)?;
                laws.push(ops::exp(&law)?);
                t.as_dtype(Dtype::Int32)?.reshape(&[1, 1])?
            };
            tokens.push(token.clone());
        }
        eval(tokens.iter().chain(&laws))?;
        Proposal::read(&tokens, &laws, std::time::Duration::ZERO)
    }
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
