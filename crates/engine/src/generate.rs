//! The token loop, shaped like mlx-lm's `generate_step`: the prompt (all but its last token) is prefilled in
//! chunks evaluating only the caches, then each step's graph is built and queued (`async_eval`) before the
//! previous token is read back, so the host never leaves the device idle.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlx_rs::{
    Array, Dtype,
    ops::{self, argpartition_axis, indexing::TryIndexOp},
    transforms::{async_eval, eval},
};
use serde::Serialize;

use jemma_constrain::{Constraint, TokenMatcher, Vocabulary};
use jemma_serve::thinking::ThinkingBudget;

use crate::models::gemma4::{Cache, Checkpoint, Gemma4, KvQuant, Placed};
use crate::sample::{Sampler, SamplingParams, log_softmax};
use crate::{EngineError, Result};

/// mlx-lm's default prefill chunk.
pub const DEFAULT_PREFILL_STEP: usize = 2048;

/// Most rollback points a generation keeps, the latest ([`Generation::rollback_points`]; llama-server
/// keeps 3 sliding-window checkpoints per slot by default). Each holds a window per sliding-window layer.
pub const ROLLBACK_POINTS: usize = 3;

/// Default cap on one prefill chunk's attention scores (see [`prefill_chunk`]).
pub const DEFAULT_ATTENTION_BUDGET: u64 = 512 << 20;

/// Length of the next prefill chunk: `step` tokens, fewer when the chunk's attention scores (`heads` ×
/// chunk × keys × `elem` bytes, keys = `done` + chunk) would exceed `budget`. Without this a 2048-token chunk
/// at the end of a 128k context materialises ~4 GB of scores on a 16 GB Mac; shorter chunks give the same
/// result (prefill is exact under any chunking) with bounded memory. Never below 16 tokens.
pub fn prefill_chunk(
    done: usize,
    remaining: usize,
    step: usize,
    heads: usize,
    elem: u64,
    budget: Option<u64>,
) -> usize {
    let mut n = step.max(1).min(remaining.max(1));
    if let Some(b) = budget {
        // Largest t with t * (done + t) <= x.
        let x = (b / (heads.max(1) as u64 * elem.max(1))) as f64;
        let d = done as f64;
        let t = ((-d + (d * d + 4.0 * x).sqrt()) / 2.0).floor() as usize;
        n = n.min(t.max(16));
    }
    n
}

/// Soft tokens of one image or audio clip in a prompt: `len` of them stand at positions
/// `start..start + len`, whose tokens are its placeholders; `digest` tells it from another in the prefix
/// cache. Their `features` may come later ([`Generation::media_to_encode`]): a run the reused prefix
/// holds is never read, so its tower need not run (vLLM skips the encoder of cached items the same way).
#[derive(Clone)]
pub struct MediaRun {
    /// First placeholder position in the prompt.
    pub start: usize,
    /// Soft tokens (placeholder positions).
    pub len: usize,
    /// A tower's soft tokens, (1, `len`, hidden); None until encoded.
    pub features: Option<Array>,
    /// A digest of the media's bytes.
    pub digest: u64,
    /// Whether its tokens attend to one another both ways (an image; see [`Placed::bidirectional`]).
    pub bidirectional: bool,
}

impl MediaRun {
    fn len(&self) -> usize {
        self.len
    }
}

/// The ids a prompt's KV is known by (prefix-cache keys): the prompt's own, except at media positions, where
/// placeholder tokens alike for every image become ids derived from the image's digest and the position in
/// it, above any vocabulary (bit 31 set), so that a cache built on one image is never resumed for another.
pub fn cache_keys(prompt: &[u32], media: &[MediaRun]) -> Vec<u32> {
    let mut keys = prompt.to_vec();
    for m in media {
        for j in 0..m.len() {
            let mut h = m.digest ^ (j as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            h = (h ^ (h >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            if let Some(k) = keys.get_mut(m.start + j) {
                *k = 0x8000_0000 | (h as u32 & 0x7fff_ffff);
            }
        }
    }
    keys
}

/// Options of one generation.
#[derive(Clone)]
pub struct GenerateOptions {
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// Tokens that end generation (not emitted).
    pub stop_tokens: Vec<u32>,
    /// Return this many top log-probabilities per token (0 = only the chosen token's when `logprobs`).
    pub top_logprobs: usize,
    /// Return each token's log-probability under the model (raw logits, before bias, penalties, mask and
    /// temperature: see `jemma_chat::logprobs`).
    pub logprobs: bool,
    /// Prefill chunk length.
    pub prefill_step: usize,
    /// Cap on one prefill chunk's attention scores in bytes (None = always `prefill_step`).
    pub attention_budget: Option<u64>,
    /// KV-cache quantization of the full-attention layers (None = full precision).
    pub kv_quant: Option<KvQuant>,
    /// Constrained decoding: what the answer must be (JSON, a schema, tool calls), with the model's
    /// vocabulary as llguidance reads it.
    pub constraint: Option<(Arc<Vocabulary>, Constraint)>,
    /// The most tokens the answer's thoughts may hold (`thinking_token_budget`), with the model's thought
    /// markers: past it the next token is the thought's end.
    pub thinking: Option<ThinkingBudget>,
}

impl std::fmt::Debug for GenerateOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerateOptions")
            .field("sampling", &self.sampling)
            .field("max_tokens", &self.max_tokens)
            .field("stop_tokens", &self.stop_tokens)
            .field("logprobs", &self.logprobs)
            .field("top_logprobs", &self.top_logprobs)
            .field("prefill_step", &self.prefill_step)
            .field("attention_budget", &self.attention_budget)
            .field("kv_quant", &self.kv_quant)
            .field("constraint", &self.constraint.as_ref().map(|c| &c.1))
            .field("thinking", &self.thinking)
            .finish()
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop_tokens: vec![],
            top_logprobs: 0,
            logprobs: false,
            prefill_step: DEFAULT_PREFILL_STEP,
            attention_budget: Some(DEFAULT_ATTENTION_BUDGET),
            kv_quant: None,
            constraint: None,
            thinking: None,
        }
    }
}

/// Log-probability information of one generated token.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenLogprobs {
    /// log p of the chosen token.
    pub logprob: f32,
    /// The most likely alternatives (id, log p), best first.
    pub top: Vec<(u32, f32)>,
}

/// One sampled token, with its log-probabilities when the request asked for them (not to be confused with
/// a runner's `step`, one batched decode of every running sequence).
#[derive(Debug, Clone)]
pub struct SampledToken {
    /// Token id.
    pub token: u32,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<TokenLogprobs>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The caller stopped it (client gone, cancel).
    Cancelled,
}

/// Counts and timings of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (stop token excluded).
    pub completion_tokens: usize,
    /// Time to process the prompt and produce the first token.
    pub prefill_time: Duration,
    /// Time for the remaining tokens.
    pub decode_time: Duration,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// The stop token that ended it, if any.
    pub stop_token: Option<u32>,
}

impl GenerationStats {
    /// Prompt tokens per second.
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second after the first.
    pub fn decode_tps(&self) -> f64 {
        let n = self.completion_tokens.saturating_sub(1);
        if n == 0 {
            return 0.0;
        }
        n as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

struct Pending {
    token: Array,
    logprobs: Array,
    /// The target's final hidden state (1, 1, H) at the position whose logits gave `token`, kept only for
    /// a drafter that reads it ([`Generation::keep_hidden`]: the MTP assistant).
    hidden: Option<Array>,
    /// For a step sampled ahead while a lazy grammar is free or a thinking budget unspent: what drawing it
    /// again under a mask needs.
    redo: Option<Redo>,
}

/// A step sampled ahead of the token before it while a lazy grammar ([`Constraint::LazyToolCalls`]) was
/// free or a thinking budget unspent. Should that token be the grammar's trigger, or spend the budget, the
/// step was drawn without the mask it now needs: it is drawn again from the same logits and history with
/// the same random key, so the answer is what a step sampled after that token would give (alone, batched,
/// or pipelined alike).
struct Redo {
    logits: Array,
    history: Array,
    rng: mlx_rs::random::RandomState,
}

/// What [`Generation::prefill_batch`] did.
#[derive(Debug, Default)]
pub struct PrefillBatch {
    /// Text chunks read in its packed forward (0: none).
    pub packed: usize,
    /// Generations, by index, that failed on their own, with why.
    pub failed: Vec<(usize, EngineError)>,
}

/// A generation's first step, once its prompt is read but for the last token.
struct FirstStep {
    /// The prompt's last token, (1,).
    input: Array,
    /// The grammar's mask before anything is generated.
    mask: Option<Array>,
}

/// What is already queued past the pending token when it is read back.
enum Ahead {
    /// Nothing: generation ends with this token (its last allowed one).
    None,
    /// The next step, sampled on the still-lazy token.
    Sampled(Pending),
    /// Under a grammar: the next step's forward pass, queued on the still-lazy token; its mask needs the
    /// token on the host, so its sampling is queued once the token is read and the mask computed, while
    /// the forward pass runs.
    Logits {
        /// The next step's (1, V) logits.
        logits: Array,
        /// The history its penalties see.
        history: Array,
    },
}

/// A sampled token (any shape holding one id) read back to the host.
fn read_token(t: &Array) -> Result<u32> {
    Ok(t.reshape(&[-1])?
        .as_dtype(Dtype::Uint32)?
        .item_exact::<u32>())
}

/// What one round of [`Generation::speculate`] did.
#[derive(Debug, Default)]
pub struct Round {
    /// The tokens it produced, in order.
    pub steps: Vec<SampledToken>,
    /// Tokens drafted (0: none were verified — the drafter proposed none and a plain step was queued, or
    /// the pending token ended generation).
    pub drafted: usize,
    /// Drafts that stood.
    pub accepted: usize,
    /// Time the drafter took to draft (reading context it had not seen excluded: see
    /// [`crate::speculative::Proposal::catch_up`]).
    pub draft_time: Duration,
    /// Time the verification took.
    pub verify_time: Duration,
}

/// A speculative round drafted and waiting for its verification ([`Generation::draft_round`],
/// [`Generation::verify_rounds`]).
#[derive(Debug)]
pub struct Drafted {
    /// What the round did so far: the pending token's step, the draft time.
    round: Round,
    /// The pending token, then the drafts: the positions the verification feeds.
    fed: Vec<i32>,
    /// The drafts.
    drafts: Vec<u32>,
    /// The drafter's law of each draft (sampling only).
    laws: Vec<Vec<f32>>,
    /// Greedy decoding (the acceptance rule compares argmaxes).
    greedy: bool,
    /// Tokens generated before the round.
    done_before: usize,
}

impl Drafted {
    /// Positions the verification feeds: the pending token and the drafts.
    pub fn len(&self) -> usize {
        self.fed.len()
    }

    /// Always false: a drafted round feeds at least the pending token and one draft.
    pub fn is_empty(&self) -> bool {
        self.fed.is_empty()
    }
}

/// How a speculative round started ([`Generation::draft_round`]).
#[derive(Debug)]
pub enum RoundStart {
    /// Over already: nothing to verify.
    Done(Round),
    /// Drafts to verify with [`Generation::verify_rounds`].
    Drafted(Drafted),
}

/// How a round's first half began ([`Generation::begin_round`]).
enum Begin {
    /// Over already: nothing to draft.
    Done(Round),
    /// Drafts to ask for.
    Draft(Begun),
}

/// A round whose pending token is read, waiting for its drafts.
struct Begun {
    /// The pending token's step.
    round: Round,
    /// The pending token.
    t0: u32,
    /// Drafts to ask for (at most what `max_tokens` leaves).
    k: usize,
    /// The target's final hidden state where the pending token's logits came from (see [`Pending`]).
    hidden: Option<Array>,
    /// Tokens generated before the round.
    done_before: usize,
}

fn read_logprobs(lp: &Array, token: u32, top: usize) -> Result<TokenLogprobs> {
    let flat = lp.reshape(&[-1])?.as_dtype(Dtype::Float32)?;
    let chosen = flat.try_index(token as i32)?.item_cast::<f32>();
    let mut out = vec![];
    if top > 0 {
        let v = flat.shape()[0];
        let k = (top as i32).min(v);
        let idx = argpartition_axis(ops::negative(&flat)?, k - 1, 0)?.try_index(..k)?;
        let vals = flat.take_axis(&idx, 0)?;
        let idx: Vec<u32> = idx.as_dtype(Dtype::Uint32)?.as_slice::<u32>().to_vec();
        let vals: Vec<f32> = vals.as_slice::<f32>().to_vec();
        out = idx.into_iter().zip(vals).collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    }
    Ok(TokenLogprobs {
        logprob: chosen,
        top: out,
    })
}

/// Generates from `prompt` with `model`, calling `on_step` for each token; `on_step` returning
/// `ControlFlow::Break(reason)` stops (a stop string, a cancel) with that reason.
///
/// Errors: an empty prompt, a token outside the vocabulary, a KV quantization that does not fit the model
/// (all [`EngineError::InvalidRequest`]), or an MLX failure.
pub fn generate(
    model: &Gemma4,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_step: impl FnMut(&SampledToken) -> ControlFlow<FinishReason>,
) -> Result<GenerationStats> {
    let mut g = Generation::new(model, prompt, opts.clone())?;
    while !g.prefill(model)? {}
    while let Some(step) = g.next_token(model)? {
        if let ControlFlow::Break(reason) = on_step(&step) {
            g.stop(reason);
        }
    }
    Ok(g.stats().clone())
}

/// One generation as a resumable state machine, so that a scheduler can interleave it with others: the
/// prompt is read in chunks ([`Generation::prefill`], one chunk per call), then each
/// [`Generation::next_token`] returns one token. The pipelining of mlx-lm's `generate_step` is kept: the
/// step after the returned token is already queued on the device (`async_eval`) when it returns.
pub struct Generation {
    opts: GenerateOptions,
    cache: Cache,
    sampler: Sampler,
    ids: Vec<i32>,
    /// Prompt tokens whose KV is in the cache.
    prefilled: usize,
    /// Prompt tokens whose KV came with the cache (`Generation::resume`).
    reused: usize,
    /// The tokens whose KV the cache holds (or will once the queued step runs), in order, as
    /// [`cache_keys`] names them.
    fed: Vec<u32>,
    /// The prompt's ids as the prefix cache knows them ([`cache_keys`]).
    keys: Vec<u32>,
    /// The prompt and every token generated so far (what a drafter continues).
    context: Vec<u32>,
    /// The prompt's images, by position.
    media: Vec<MediaRun>,
    history: Array,
    /// The step whose token the next call reads (None before the prompt is read and after the end).
    cur: Option<Pending>,
    /// The grammar the answer follows (constrained decoding): each step's logits are masked to what it
    /// allows, and each token read back advances it.
    grammar: Option<TokenMatcher>,
    /// The answer's thinking budget, fed every token read back: when spent inside a thought, the next
    /// step's mask allows only the thought's end.
    thinking: Option<ThinkingBudget>,
    /// Where to copy the cache while reading the prompt, ascending ([`Generation::checkpoint_at`]).
    checkpoint_at: Vec<usize>,
    /// The copies taken and not yet handed out, each with the tokens it holds.
    checkpoints: Vec<(Cache, Vec<u32>)>,
    /// Rollback points of the sliding-window layers taken at prefill chunk ends once their windows have
    /// filled (at most [`ROLLBACK_POINTS`], the latest), ascending ([`Generation::rollback_points`]).
    rollback_points: Vec<Checkpoint>,
    /// Whether to take rollback points (off when nothing would keep them).
    keep_rollback_points: bool,
    stats: GenerationStats,
    t0: Instant,
    t_first: Option<Instant>,
    finished: bool,
    /// The grammar failed part-way (llguidance refused a token or found nothing allowed): this generation
    /// ended, and its caller must fail it, without touching the others decoded with it.
    failure: Option<String>,
    /// Whether each step keeps the final hidden state its token came from ([`Generation::keep_hidden`]).
    keep_hidden: bool,
    /// Most prompt tokens the next chunk may hold, set by a scheduler fitting it into a step's budget
    /// ([`Generation::cap_next_chunk`]); cleared once a chunk is read.
    chunk_cap: Option<usize>,
}

impl Generation {
    /// Checks the request and allocates the cache; nothing runs on the device yet.
    ///
    /// Errors: an empty prompt, a token outside the vocabulary, or a KV quantization that does not fit the
    /// model ([`EngineError::InvalidRequest`]); an MLX failure.
    pub fn new(model: &Gemma4, prompt: &[u32], opts: GenerateOptions) -> Result<Self> {
        Self::resume(model, prompt, opts, None)
    }

    /// Like [`Generation::new`], continuing `cached`: a cache that holds the KV of the prompt's first
    /// `tokens` (at most all but the last prompt token; the caller checks they are the prompt's), so that
    /// only the rest is prefilled. A cache that does not fit is dropped and the prompt read in full.
    ///
    /// Errors: as [`Generation::new`].
    pub fn resume(
        model: &Gemma4,
        prompt: &[u32],
        opts: GenerateOptions,
        cached: Option<(Cache, usize)>,
    ) -> Result<Self> {
        Self::resume_with(model, prompt, opts, move || cached)
    }

    /// [`Generation::resume`] with the cache fetched by `take_cached` only once the request has been
    /// checked, so that a request refused here takes nothing from a prefix cache.
    ///
    /// Errors: as [`Generation::new`].
    pub fn resume_with(
        model: &Gemma4,
        prompt: &[u32],
        opts: GenerateOptions,
        take_cached: impl FnOnce() -> Option<(Cache, usize)>,
    ) -> Result<Self> {
        Self::resume_with_media(model, prompt, vec![], opts, take_cached)
    }

    /// [`Generation::resume_with`] for a prompt holding images: each [`MediaRun`]'s soft tokens replace its
    /// placeholders while the prompt is read (a prefill chunk never cuts an image), and the cache is known
    /// by [`cache_keys`]. `take_cached` must look the prompt up by those keys; a cache that ends inside an
    /// image is not resumed.
    ///
    /// Errors: as [`Generation::new`]; runs that overlap, leave the prompt or cover its last token
    /// ([`EngineError::InvalidRequest`]).
    pub fn resume_with_media(
        model: &Gemma4,
        prompt: &[u32],
        mut media: Vec<MediaRun>,
        opts: GenerateOptions,
        take_cached: impl FnOnce() -> Option<(Cache, usize)>,
    ) -> Result<Self> {
        media.sort_by_key(|m| m.start);
        let mut end = 0;
        for m in &media {
            if m.start < end || m.start + m.len() >= prompt.len() || m.len() == 0 {
                return Err(EngineError::InvalidRequest(
                    "image soft tokens overlap, are none, or run to the end of the prompt".into(),
                ));
            }
            if let Some(f) = &m.features
                && f.shape().get(1).is_none_or(|&n| n as usize != m.len())
            {
                return Err(EngineError::Internal(format!(
                    "media features of shape {:?} for a run of {} soft tokens",
                    f.shape(),
                    m.len()
                )));
            }
            end = m.start + m.len();
        }
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        let vocab = model.config().vocab_size;
        if let Some(bad) = prompt.iter().find(|t| **t as usize >= vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        let sampler = Sampler::new(opts.sampling.clone(), vocab, model.dtype())?;
        if let Some(q) = opts.kv_quant {
            let dims: Vec<usize> = model.full_attention_head_dims();
            if !matches!(q.bits, 2 | 3 | 4 | 5 | 6 | 8)
                || q.group_size <= 0
                || dims.iter().any(|d| d % q.group_size as usize != 0)
            {
                return Err(EngineError::InvalidRequest(format!(
                    "kv_bits {} with group size {} does not fit head dims {dims:?}",
                    q.bits, q.group_size
                )));
            }
        }
        let ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
        let grammar = opts
            .constraint
            .as_ref()
            .map(|(v, c)| v.matcher(c))
            .transpose()
            .map_err(|e| match e {
                jemma_constrain::ConstrainError::Invalid(m) => EngineError::InvalidRequest(m),
                e => EngineError::Constraint(e.to_string()),
            })?;
        let inside_image = |n: usize| media.iter().any(|m| m.start < n && n < m.start + m.len());
        let (cache, reused) = match take_cached() {
            Some((c, n)) if n > 0 && n < ids.len() && !inside_image(n) => (c, n),
            _ => (model.new_cache(), 0),
        };
        let keys = cache_keys(prompt, &media);
        Ok(Self {
            cache,
            sampler,
            history: Array::from_slice(&ids, &[ids.len() as i32]),
            fed: keys[..reused].to_vec(),
            keys,
            context: prompt.to_vec(),
            media,
            ids,
            prefilled: reused,
            reused,
            cur: None,
            grammar,
            thinking: opts.thinking.clone().map(|mut t| {
                t.read_prompt(prompt);
                t
            }),
            checkpoint_at: vec![],
            checkpoints: vec![],
            rollback_points: vec![],
            keep_rollback_points: true,
            stats: GenerationStats {
                prompt_tokens: prompt.len(),
                completion_tokens: 0,
                prefill_time: Duration::ZERO,
                decode_time: Duration::ZERO,
                finish_reason: FinishReason::Length,
                stop_token: None,
            },
            opts,
            t0: Instant::now(),
            t_first: None,
            finished: false,
            failure: None,
            keep_hidden: false,
            chunk_cap: None,
        })
    }

    /// The prompt's cache keys (token ids, with each image's or clip's soft tokens keyed by its digest):
    /// what a prefix cache entry must match.
    pub fn cache_keys(&self) -> &[u32] {
        &self.keys
    }

    /// The media runs (indices in start order) the next [`Generation::prefill`] reads whose features are
    /// not yet set: those inside the next chunk ([`Generation::next_chunk`], which never cuts one). A
    /// tower runs in the step that reads its run and no earlier, so its time falls in the step whose
    /// budget counts it ([`Generation::media_tokens_to_encode`]; vLLM schedules an item's encoder with
    /// the chunk that reads it). Runs the reused prefix holds are never listed.
    pub fn media_to_encode(&self, model: &Gemma4) -> Vec<usize> {
        let (at, end) = (self.prefilled, self.prefilled + self.next_chunk(model));
        (0..self.media.len())
            .filter(|&i| {
                let m = &self.media[i];
                m.features.is_none() && m.start < end && m.start + m.len() > at
            })
            .collect()
    }

    /// Soft tokens of the runs [`Generation::media_to_encode`] lists: the towers' share of the next
    /// chunk's work, in the chunk's own unit (vLLM's encoder budget counts an item by its placeholder
    /// tokens the same way).
    pub fn media_tokens_to_encode(&self, model: &Gemma4) -> usize {
        (self.media_to_encode(model).iter())
            .map(|&i| self.media[i].len())
            .sum()
    }

    /// Prompt positions read so far (a reused cache's included).
    pub fn prefilled(&self) -> usize {
        self.prefilled
    }

    /// How many media runs end at or before position `n`.
    pub fn media_within(&self, n: usize) -> usize {
        self.media.iter().filter(|m| m.start + m.len() <= n).count()
    }

    /// Sets the features of media run `index` ([`Generation::media_to_encode`]).
    ///
    /// Errors ([`EngineError::InvalidModel`]): features of another length than the run's placeholders
    /// (the processor's arithmetic and the tower disagree); an index out of range is
    /// [`EngineError::Internal`].
    pub fn set_media_features(&mut self, index: usize, features: Array) -> Result<()> {
        let m = self
            .media
            .get_mut(index)
            .ok_or_else(|| EngineError::Internal(format!("no media run {index}")))?;
        let got = features.shape().get(1).copied().unwrap_or(0) as usize;
        if got != m.len {
            return Err(EngineError::InvalidModel(format!(
                "a tower made {got} soft tokens of media the processor sized for {} \
                 (processor_config.json and the tower's config disagree)",
                m.len
            )));
        }
        m.features = Some(features);
        Ok(())
    }

    /// Whether none of the prompt has been read since the generation started (from its reused cache).
    pub fn unread(&self) -> bool {
        self.prefilled == self.reused && self.cur.is_none() && !self.finished
    }

    /// Before any of the prompt is read ([`Generation::unread`]): starts instead from `cache`, which holds
    /// the KV of the prompt's first `reused` keys, when that is more than the generation started from: a
    /// prefix cached after the request was admitted, such as the system-prompt checkpoint a request
    /// admitted with it has just taken.
    ///
    /// Errors: the cache, handed back with nothing changed, once reading has begun, for no gain, for the
    /// whole prompt (its last token is read for its logits) or for a cut inside an image or clip.
    pub fn adopt_cached(&mut self, cache: Cache, reused: usize) -> std::result::Result<(), Cache> {
        let inside_media = self
            .media
            .iter()
            .any(|m| m.start < reused && reused < m.start + m.len());
        if !self.unread() || reused <= self.reused || reused >= self.ids.len() || inside_media {
            return Err(cache);
        }
        self.cache = cache;
        self.checkpoint_at.retain(|&c| c > reused);
        self.fed = self.keys[..reused].to_vec();
        self.prefilled = reused;
        self.reused = reused;
        Ok(())
    }

    /// Length of the next prompt chunk [`Generation::prefill`] reads: up to the prefill step, fewer under
    /// the attention budget, none past the next checkpoint, and never cutting an image or clip (one that
    /// starts the chunk is read whole). 0 when all but the prompt's last token is read (what is left is
    /// the first step) or the prompt is read.
    pub fn next_chunk(&self, model: &Gemma4) -> usize {
        let n_ids = self.ids.len();
        if self.cur.is_some() || self.finished || n_ids - self.prefilled <= 1 {
            return 0;
        }
        let heads = model.config().num_attention_heads;
        let elem = crate::nn::dtype_bytes(model.dtype());
        let mut n = prefill_chunk(
            self.prefilled,
            n_ids - self.prefilled - 1,
            self.opts.prefill_step,
            heads,
            elem,
            self.opts.attention_budget,
        );
        if let Some(&c) = self.checkpoint_at.iter().find(|&&c| c > self.prefilled) {
            n = n.min(c - self.prefilled);
        }
        if let Some(cap) = self.chunk_cap {
            n = n.min(cap.max(1));
        }
        // An image or clip is read whole in one chunk (an image's tokens attend to one another; a clip's
        // soft tokens are placed as one run): a chunk that would cut one stops before it, or, starting at
        // it, takes all of it.
        let at = self.prefilled;
        for m in &self.media {
            let (s, e) = (m.start, m.start + m.len());
            if s < at + n && at + n < e {
                n = if s > at { s - at } else { e - at };
            }
        }
        n
    }

    /// Caps the next chunk at `cap` prompt tokens (None: no cap), as a scheduler does to fit the last
    /// of a step's chunks into what its budget has left (vLLM's chunked prefill cuts the last request
    /// scheduled the same way). The cap holds until a chunk is read. A chunk still never cuts an image or
    /// clip: one capped inside a run stops before it, and one starting at a run takes all of it, over
    /// the cap ([`Generation::next_chunk`] tells what the chunk is now).
    pub fn cap_next_chunk(&mut self, cap: Option<usize>) {
        self.chunk_cap = cap;
    }

    /// Whether the next chunk ([`Generation::next_chunk`]) holds an image or clip.
    pub fn next_chunk_has_media(&self, model: &Gemma4) -> bool {
        let (at, n) = (self.prefilled, self.next_chunk(model));
        n > 0
            && self
                .media
                .iter()
                .any(|m| m.start >= at && m.start + m.len() <= at + n)
    }

    /// Positions where the prompt's cache will be copied for the prefix cache and are not read yet,
    /// ascending ([`Generation::checkpoint_at`]).
    pub fn pending_checkpoints(&self) -> &[usize] {
        &self.checkpoint_at
    }

    /// Reads the next chunk of the prompt (all but its last token, evaluating only the caches: the LM head
    /// never runs for them); once the prompt is read, queues the first token's step. True when the prompt
    /// is read (calling again is a no-op).
    pub fn prefill(&mut self, model: &Gemma4) -> Result<bool> {
        if self.cur.is_some() || self.finished {
            return Ok(true);
        }
        let n = self.next_chunk(model);
        if n > 0 {
            let at = self.prefilled;
            let chunk = Array::from_slice(&self.ids[at..at + n], &[1, n as i32]);
            let placed: Vec<Placed<'_>> = self
                .media
                .iter()
                .filter(|m| m.start >= at && m.start + m.len() <= at + n)
                .map(|m| {
                    Ok(Placed {
                        start: m.start - at,
                        features: m.features.as_ref().ok_or_else(|| {
                            EngineError::Internal(format!(
                                "the media at {} was read before it was encoded",
                                m.start
                            ))
                        })?,
                        bidirectional: m.bidirectional,
                    })
                })
                .collect::<Result<_>>()?;
            if placed.is_empty() {
                model.forward_hidden(&chunk, &mut self.cache)?;
            } else {
                model.forward_hidden_with_media(&chunk, &placed, &mut self.cache)?;
            }
            self.cache.maybe_quantize(self.opts.kv_quant)?;
            eval(self.cache.state())?;
            self.chunk_read(n)?;
            mlx_rs::memory::clear_cache()?;
            if self.ids.len() - self.prefilled > 1 {
                return Ok(false);
            }
        }
        let (last, history) = self.first_step_input(model)?;
        let p = self.queue(model, &last.input, &history, last.mask)?;
        self.cur = Some(p);
        Ok(true)
    }

    /// Reads the next prompt chunk of every generation in `gens` (see [`Generation::prefill`]) with as
    /// few passes over the weights as it can: their text chunks packed into one forward
    /// ([`Gemma4::forward_hidden_packed`]), then the first steps of those whose prompt is then read in
    /// one batched forward, as [`Generation::decode_batch`] decodes them. A chunk holding an image or clip
    /// is read alone ([`Generation::prefill`]), and that generation reads nothing more in this call. One
    /// generation alone reads exactly as [`Generation::prefill`]; several read what they would alone, up
    /// to the rounding of the larger matrix products.
    ///
    /// Returns how many text chunks the packed forward read, and the generations (by index in `gens`)
    /// that failed on their own (a media chunk's read, a grammar refusing to start): each must be failed
    /// and dropped, the others go on. Errors: an MLX failure of a forward that read several of them,
    /// after which every generation in `gens` is in an unknown state and must be dropped.
    pub fn prefill_batch(model: &Gemma4, gens: &mut [&mut Generation]) -> Result<PrefillBatch> {
        let mut report = PrefillBatch::default();
        let mut alone = vec![false; gens.len()];
        for (i, g) in gens.iter_mut().enumerate() {
            if g.next_chunk_has_media(model) {
                alone[i] = true;
                if let Err(e) = g.prefill(model) {
                    report.failed.push((i, e));
                }
            }
        }
        let lens: Vec<usize> = (0..gens.len())
            .map(|i| {
                if alone[i] {
                    0
                } else {
                    gens[i].next_chunk(model)
                }
            })
            .collect();
        let reading: Vec<usize> = (0..gens.len()).filter(|&i| lens[i] > 0).collect();
        if !reading.is_empty() {
            let ids: Vec<i32> = reading
                .iter()
                .flat_map(|&i| {
                    let at = gens[i].prefilled;
                    gens[i].ids[at..at + lens[i]].iter().copied()
                })
                .collect();
            let runs: Vec<usize> = reading.iter().map(|&i| lens[i]).collect();
            let ids = Array::from_slice(&ids, &[1, ids.len() as i32]);
            {
                let mut caches: Vec<&mut Cache> = gens
                    .iter_mut()
                    .zip(&lens)
                    .filter(|(_, n)| **n > 0)
                    .map(|(g, _)| &mut g.cache)
                    .collect();
                model.forward_hidden_packed(&ids, &runs, &mut caches)?;
            }
            for &i in &reading {
                gens[i].cache.maybe_quantize(gens[i].opts.kv_quant)?;
            }
            eval(reading.iter().flat_map(|&i| gens[i].cache.state()))?;
            for &i in &reading {
                gens[i].chunk_read(lens[i])?;
            }
            mlx_rs::memory::clear_cache()?;
            report.packed = reading.len();
        }
        // Those whose prompt is now read (all but its last token) start their first step together.
        let mut starting = Vec::with_capacity(gens.len());
        let mut firsts = Vec::with_capacity(gens.len());
        for (i, g) in gens.iter_mut().enumerate() {
            if alone[i] || g.cur.is_some() || g.finished || g.ids.len() - g.prefilled != 1 {
                continue;
            }
            match g.first_step_input(model) {
                Ok(first) => {
                    starting.push(&mut **g);
                    firsts.push(first);
                }
                Err(e) => report.failed.push((i, e)),
            }
        }
        Generation::start_batch(model, &mut starting, firsts)?;
        Ok(report)
    }

    /// Queues the first step of each generation in `gens`, whose prompts are read but for their last
    /// tokens (each with its [`Generation::first_step_input`]), in one batched forward; one alone runs
    /// exactly [`Generation::prefill`]'s own step.
    fn start_batch(
        model: &Gemma4,
        gens: &mut [&mut Generation],
        firsts: Vec<(FirstStep, Array)>,
    ) -> Result<()> {
        if let ([g], [(first, history)]) = (&mut *gens, firsts.as_slice()) {
            let p = g.queue(model, &first.input, history, first.mask.clone())?;
            g.cur = Some(p);
            return Ok(());
        }
        if gens.is_empty() {
            return Ok(());
        }
        let ids: Vec<Array> = firsts.iter().map(|(f, _)| f.input.clone()).collect();
        let ids = ops::concatenate(&ids, 0)?.reshape(&[gens.len() as i32, 1])?;
        let (hidden, logits) = {
            let mut caches: Vec<&mut Cache> = gens.iter_mut().map(|g| &mut g.cache).collect();
            model.forward_last_batch(&ids, &mut caches)?
        };
        let mut pending = Vec::with_capacity(gens.len());
        for (j, (g, (first, history))) in gens.iter_mut().zip(firsts).enumerate() {
            let j = j as i32;
            let mut p = g.sample_from(model, &logits.try_index(j..j + 1)?, &history, first.mask)?;
            p.hidden = g.kept(&hidden.try_index(j..j + 1)?)?;
            pending.push(p);
        }
        async_eval(pending.iter().flat_map(|p| [&p.token, &p.logprobs]))?;
        for (g, p) in gens.iter_mut().zip(pending) {
            g.cur = Some(p);
        }
        Ok(())
    }

    /// What the first step reads once the prompt is read but for its last token: that token (now fed), the
    /// grammar's mask before anything is generated, and the sampling history.
    fn first_step_input(&mut self, model: &Gemma4) -> Result<(FirstStep, Array)> {
        let n_ids = self.ids.len();
        let input = Array::from_slice(&self.ids[n_ids - 1..], &[1]);
        self.fed.push(self.ids[n_ids - 1] as u32);
        let mask = self.next_mask(model)?;
        Ok((FirstStep { input, mask }, self.history.clone()))
    }

    /// Records a chunk of `n` prompt positions just read into the cache (and evaluated): the checkpoint
    /// due there, and a rollback point once a sliding window has filled.
    fn chunk_read(&mut self, n: usize) -> Result<()> {
        let at = self.prefilled;
        self.fed.extend_from_slice(&self.keys[at..at + n]);
        self.prefilled += n;
        self.chunk_cap = None;
        if self.checkpoint_at.contains(&self.prefilled) {
            self.checkpoint_at.retain(|&c| c > self.prefilled);
            self.checkpoints
                .push((self.cache.clone(), self.fed.clone()));
        }
        // Once a sliding window has filled, its cache cannot be cut back: a copy of the windows here
        // lets a later prompt that parts from this one past this point resume from it.
        if self.keep_rollback_points && !self.cache.is_trimmable() && self.opts.kv_quant.is_none() {
            if self.rollback_points.len() == ROLLBACK_POINTS {
                self.rollback_points.remove(0);
            }
            self.rollback_points.push(self.cache.rollback_point()?);
        }
        Ok(())
    }

    /// Builds and queues one decode step on `input`.
    fn queue(
        &mut self,
        model: &Gemma4,
        input: &Array,
        history: &Array,
        mask: Option<Array>,
    ) -> Result<Pending> {
        let (hidden, logits) =
            model.forward_last_batch(&input.reshape(&[1, -1])?, &mut [&mut self.cache])?;
        let mut p = self.sample_from(model, &logits, history, mask)?;
        p.hidden = self.kept(&hidden)?;
        async_eval([&p.token, &p.logprobs])?;
        Ok(p)
    }

    /// The sampling half of a step: this generation's logits processors, JSON mask and sampler on its
    /// (1, V) logits, left lazy for the caller to queue.
    fn sample_from(
        &mut self,
        model: &Gemma4,
        logits: &Array,
        history: &Array,
        mask: Option<Array>,
    ) -> Result<Pending> {
        let raw = logits;
        let mut logits = self.sampler.process(raw, Some(history))?;
        if let Some(m) = mask {
            logits = ops::add(&logits, m.as_dtype(model.dtype())?)?;
        }
        self.cache.maybe_quantize(self.opts.kv_quant)?;
        let processed = log_softmax(&logits)?;
        let token = self.sampler.sample(&processed)?;
        let logprobs = self.reported(raw, processed)?;
        Ok(Pending {
            token,
            logprobs,
            hidden: None,
            redo: None,
        })
    }

    /// The distribution a step's `logprobs` report: the model's own (log-softmax of its raw logits,
    /// before `logit_bias`, penalties, the grammar mask and temperature, as vLLM's default
    /// `raw_logprobs` and llama.cpp's engine report it), so one request reads the same numbers on either
    /// engine. `processed` is what the sampler drew from; it is returned as is when logprobs are off,
    /// which costs nothing as the caller evaluates it anyway.
    fn reported(&self, raw: &Array, processed: Array) -> Result<Array> {
        if self.opts.logprobs {
            log_softmax(raw)
        } else {
            Ok(processed)
        }
    }

    /// The additive mask for the next token, (1, V): 0 where allowed, -inf elsewhere; None when nothing
    /// constrains it. A spent thinking budget allows only the thought's end, unless the grammar forbids
    /// it there (a call opened inside the thought: the thought ends once the grammar allows); otherwise
    /// the grammar says.
    fn next_mask(&mut self, model: &Gemma4) -> Result<Option<Array>> {
        let v = model.config().vocab_size;
        if let Some(close) = self.thinking.as_ref().and_then(ThinkingBudget::forced) {
            let allowed = match self.grammar.as_mut().filter(|g| !g.is_free()) {
                Some(g) => g
                    .allowed()
                    .map_err(|e| EngineError::Constraint(e.to_string()))?
                    .contains(close),
                None => true,
            };
            if allowed {
                let mut mask = vec![f32::NEG_INFINITY; v];
                if let Some(m) = mask.get_mut(close as usize) {
                    *m = 0.0;
                }
                return Ok(Some(Array::from_slice(&mask, &[1, v as i32])));
            }
        }
        let Some(g) = self.grammar.as_mut().filter(|g| !g.is_free()) else {
            return Ok(None);
        };
        let allowed = g
            .allowed()
            .map_err(|e| EngineError::Constraint(e.to_string()))?;
        Ok(Some(Array::from_slice(
            &allowed.additive(v),
            &[1, v as i32],
        )))
    }

    fn end(&mut self, reason: FinishReason) {
        if !self.finished {
            self.finished = true;
            self.stats.finish_reason = reason;
            self.cur = None;
            if let Some(t) = self.t_first {
                self.stats.decode_time = t.elapsed();
            }
        }
    }

    /// The next token, or None once generation has ended (a stop token, `max_tokens`, or
    /// [`Generation::stop`]; the reason is in [`Generation::stats`]). Reads the whole prompt first if
    /// [`Generation::prefill`] has not.
    pub fn next_token(&mut self, model: &Gemma4) -> Result<Option<SampledToken>> {
        while !self.prefill(model)? {}
        let Some(cur) = self.take_current() else {
            return Ok(None);
        };
        let ahead = if self.pipelined() {
            // Queue step n+1 on the still-lazy token n: the host reads token n while the device runs.
            let (tok, history) = self.feed_lazy(&cur)?;
            let (hidden, logits) =
                model.forward_last_batch(&tok.reshape(&[1, -1])?, &mut [&mut self.cache])?;
            let mut ahead = self.ahead(model, logits, history)?;
            if let Ahead::Sampled(p) = &mut ahead {
                p.hidden = self.kept(&hidden)?;
            }
            ahead
        } else {
            Ahead::None
        };
        self.complete(model, cur, ahead)
    }

    /// Queues what can be queued of the step whose forward pass gave `logits`: all of it, or under a
    /// grammar the forward pass alone (see [`Ahead::Logits`]).
    fn ahead(&mut self, model: &Gemma4, logits: Array, history: Array) -> Result<Ahead> {
        if self.masked() {
            async_eval([&logits])?;
            return Ok(Ahead::Logits { logits, history });
        }
        let p = self.sample_ahead(model, &logits, &history)?;
        async_eval([&p.token, &p.logprobs])?;
        Ok(Ahead::Sampled(p))
    }

    /// Whether the next token is drawn under a mask: a grammar's (a lazy grammar once triggered), or a
    /// spent thinking budget's.
    fn masked(&self) -> bool {
        self.grammar.as_ref().is_some_and(|g| !g.is_free())
            || self.thinking.as_ref().is_some_and(|t| t.forced().is_some())
    }

    /// [`Generation::sample_from`] without a mask, for a step queued ahead of the token before it; while a
    /// lazy grammar is free or a thinking budget may yet be spent, with what drawing it again under the
    /// mask needs ([`Redo`]).
    fn sample_ahead(&mut self, model: &Gemma4, logits: &Array, history: &Array) -> Result<Pending> {
        let redo = (self.grammar.is_some() || self.thinking.is_some()).then(|| Redo {
            logits: logits.clone(),
            history: history.clone(),
            rng: self.sampler.rng_state(),
        });
        let mut p = self.sample_from(model, logits, history, None)?;
        p.redo = redo;
        Ok(p)
    }

    /// Advances every generation in `gens` by one token, as [`Generation::next_token`] does for each, but
    /// with one forward pass for all those whose next step can be queued ahead (prompt read, not at their
    /// last token; a constrained one's sampling waits for its mask): continuous batching's decode step,
    /// where the weights are read once for the
    /// whole batch. Rows attend over their own caches, so each generation's tokens are those it would get
    /// alone up to the rounding of a batched matrix product. Fewer than two such generations run exactly
    /// as `next_token`.
    ///
    /// Returns one entry per generation, in order, and how many rows the batched forward had (0 when
    /// there was none). Errors: an MLX failure, after which the generations in the batch are in an
    /// unknown state and must be dropped.
    pub fn decode_batch(
        model: &Gemma4,
        gens: &mut [&mut Generation],
    ) -> Result<(Vec<Option<SampledToken>>, usize)> {
        let batched: Vec<bool> = gens
            .iter()
            .map(|g| g.prefilled_all() && g.cur.is_some() && !g.finished && g.pipelined())
            .collect();
        let n = batched.iter().filter(|b| **b).count();
        if n < 2 {
            let steps = gens
                .iter_mut()
                .map(|g| g.next_token(model))
                .collect::<Result<_>>()?;
            return Ok((steps, 0));
        }
        let mut curs: Vec<Option<Pending>> = Vec::with_capacity(gens.len());
        let (mut inputs, mut histories) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for (g, &b) in gens.iter_mut().zip(&batched) {
            let cur = if b { g.take_current() } else { None };
            if let Some(c) = &cur {
                let (tok, history) = g.feed_lazy(c)?;
                inputs.push(tok);
                histories.push(history);
            }
            curs.push(cur);
        }
        let ids = ops::concatenate(&inputs, 0)?.reshape(&[n as i32, 1])?;
        let (hidden, logits) = {
            let mut caches: Vec<&mut Cache> = gens
                .iter_mut()
                .zip(&batched)
                .filter(|(_, b)| **b)
                .map(|(g, _)| &mut g.cache)
                .collect();
            model.forward_last_batch(&ids, &mut caches)?
        };
        // Each row's sampling (with its own processors and, under a grammar, after its mask), queued
        // together where no mask is needed.
        let mut nexts = Vec::with_capacity(n);
        for (j, (g, _)) in gens
            .iter_mut()
            .zip(&batched)
            .filter(|(_, b)| **b)
            .enumerate()
        {
            let row = logits.try_index(j as i32..j as i32 + 1)?;
            nexts.push(if g.masked() {
                Ahead::Logits {
                    logits: row,
                    history: histories[j].clone(),
                }
            } else {
                let mut p = g.sample_ahead(model, &row, &histories[j])?;
                p.hidden = g.kept(&hidden.try_index(j as i32..j as i32 + 1)?)?;
                Ahead::Sampled(p)
            });
        }
        async_eval(nexts.iter().flat_map(|a| match a {
            Ahead::Sampled(p) => vec![&p.token, &p.logprobs],
            Ahead::Logits { logits, .. } => vec![logits],
            Ahead::None => vec![],
        }))?;
        let mut nexts = nexts.into_iter();
        let steps = gens
            .iter_mut()
            .zip(curs)
            .map(|(g, cur)| match cur {
                Some(cur) => g.complete(model, cur, nexts.next().unwrap_or(Ahead::None)),
                None => g.next_token(model),
            })
            .collect::<Result<_>>()?;
        Ok((steps, n))
    }

    /// Whether the whole prompt is read and the first token's step queued.
    pub fn prefilled_all(&self) -> bool {
        self.cur.is_some() || self.finished
    }

    /// Whether the step after the pending token can be queued before that token is read (not at the last
    /// allowed token; under a grammar, its forward pass: see [`Ahead::Logits`]).
    fn pipelined(&self) -> bool {
        self.stats.completion_tokens + 1 < self.opts.max_tokens
    }

    /// Takes the pending step, or None once generation has ended (`max_tokens` 0 ends it here).
    fn take_current(&mut self) -> Option<Pending> {
        if self.finished {
            return None;
        }
        let cur = self.cur.take()?;
        if self.opts.max_tokens == 0 {
            self.end(FinishReason::Length);
            return None;
        }
        Some(cur)
    }

    /// Appends the pending (still lazy) token to the history; returns it as the next step's input (1,) and
    /// the history the step's penalties see. `fed` gets the token once it is read back.
    fn feed_lazy(&mut self, cur: &Pending) -> Result<(Array, Array)> {
        let tok = cur.token.as_dtype(Dtype::Int32)?.reshape(&[1])?;
        self.history = ops::concatenate(&[&self.history, &tok], 0)?;
        Ok((tok, self.history.clone()))
    }

    /// Reads the pending token `cur` back and accounts for it (stop tokens, logprobs, counts); `ahead` is
    /// what is already queued on it (nothing: generation ends here; under a grammar, the next forward
    /// pass, whose sampling is queued once the token is committed and the mask computed).
    fn complete(
        &mut self,
        model: &Gemma4,
        cur: Pending,
        ahead: Ahead,
    ) -> Result<Option<SampledToken>> {
        let token = read_token(&cur.token)?;
        if !matches!(ahead, Ahead::None) {
            self.fed.push(token);
        }
        let Some(SampledToken { token, logprobs }) = self.account(token, &cur.logprobs)? else {
            return Ok(None);
        };
        let n = self.stats.completion_tokens;
        // A constrained answer's next mask needs this token on the host: it is computed here, while the
        // next forward pass (queued on the lazy token) runs.
        if let Some(g) = self.grammar.as_mut()
            && let Err(e) = g.commit(token)
        {
            return Ok(self.fail(e.to_string()));
        }
        if let Some(t) = self.thinking.as_mut() {
            t.push(token);
        }
        let next = match ahead {
            Ahead::None => None,
            Ahead::Sampled(mut p) => match p.redo.take() {
                // This token opened the lazy grammar or spent the thinking budget: the step sampled
                // ahead of it is drawn again under the mask (see [`Redo`]).
                Some(r) if self.masked() => {
                    let mask = match self.next_mask(model) {
                        Ok(m) => m,
                        Err(e) => {
                            self.fail(e.to_string());
                            return Ok(Some(SampledToken { token, logprobs }));
                        }
                    };
                    self.sampler.set_rng_state(r.rng);
                    let mut q = self.sample_from(model, &r.logits, &r.history, mask)?;
                    q.hidden = p.hidden;
                    async_eval([&q.token, &q.logprobs])?;
                    Some(q)
                }
                _ => Some(p),
            },
            Ahead::Logits { logits, history } => {
                let mask = match self.next_mask(model) {
                    Ok(m) => m,
                    // The token itself was allowed: it goes out, then the generation fails.
                    Err(e) => {
                        self.fail(e.to_string());
                        return Ok(Some(SampledToken { token, logprobs }));
                    }
                };
                let p = self.sample_from(model, &logits, &history, mask)?;
                async_eval([&p.token, &p.logprobs])?;
                Some(p)
            }
        };
        if n.is_multiple_of(256) {
            mlx_rs::memory::clear_cache()?;
        }
        match next {
            Some(p) => self.cur = Some(p),
            None => self.end(FinishReason::Length),
        }
        Ok(Some(SampledToken { token, logprobs }))
    }

    /// Accounts for a token read back, whose log-probabilities are `lp` (1, V): a stop token ends the
    /// generation (None); any other counts as generated, with its log-probabilities when asked for.
    fn account(&mut self, token: u32, lp: &Array) -> Result<Option<SampledToken>> {
        if self.t_first.is_none() {
            self.t_first = Some(Instant::now());
            self.stats.prefill_time = self.t0.elapsed();
        }
        if self.opts.stop_tokens.contains(&token) {
            self.stats.stop_token = Some(token);
            self.end(FinishReason::Stop);
            return Ok(None);
        }
        let logprobs = if self.opts.logprobs {
            Some(read_logprobs(lp, token, self.opts.top_logprobs)?)
        } else {
            None
        };
        self.stats.completion_tokens += 1;
        self.context.push(token);
        Ok(Some(SampledToken { token, logprobs }))
    }

    /// Whether [`Generation::speculate`] may run now: the prompt is read, generation goes on, and nothing
    /// in the request ties it to one token per step: a grammar (its mask needs each token on the host
    /// before the next). A quantized KV cache speculates: a round trims what it wrote, and quantizes
    /// after (the assistant drafter reads the quantized cache as the target does). A thinking budget keeps decoding plain too (a round could run past it). A server
    /// also keeps seeded sampling plain (speculation draws other random numbers, so the same seed would
    /// give other tokens alone and batched): that choice is the caller's.
    pub fn can_speculate(&self) -> bool {
        self.cur.is_some() && !self.finished && self.grammar.is_none() && self.thinking.is_none()
    }

    /// Makes each step keep the target's final hidden state at the position its token came from, which
    /// the MTP assistant drafter reads ([`crate::speculative::TargetState::hidden`]); off by default, as
    /// holding it keeps an array alive per step. Call before the prompt is read.
    pub fn keep_hidden(&mut self, keep: bool) {
        self.keep_hidden = keep;
    }

    /// `hidden` (B=1, …, H) as one position (1, 1, H), when this generation keeps it.
    fn kept(&self, hidden: &Array) -> Result<Option<Array>> {
        if !self.keep_hidden {
            return Ok(None);
        }
        let h = *hidden.shape().last().unwrap_or(&0);
        Ok(Some(hidden.reshape(&[1, 1, h])?))
    }

    /// The options it runs with.
    pub fn options(&self) -> &GenerateOptions {
        &self.opts
    }

    /// Tokens the generation may still produce (`max_tokens` less those generated).
    pub fn room(&self) -> usize {
        self.opts
            .max_tokens
            .saturating_sub(self.stats.completion_tokens)
    }

    /// One round of speculative decoding: reads the pending token, asks `drafter` for up to `k` tokens
    /// after it, verifies them in one forward pass of the target over the pending token and the drafts,
    /// keeps the drafts the acceptance rule (`jemma_serve::speculative`) lets stand, trims the rest from
    /// the cache, and leaves the token after them pending, as [`Generation::next_token`] leaves the next
    /// one. Greedy: the tokens are those plain decoding yields, up to the rounding of a forward pass over
    /// several positions (a near-tie could flip, as in a batched decode step). Sampling: distributed as
    /// plain sampling's, with `rng` drawing the acceptance decisions. Falls back to a plain step when the
    /// drafter proposes nothing. Call only when [`Generation::can_speculate`]. It is
    /// [`Generation::draft_round`] then [`Generation::verify_rounds`] for this generation alone.
    ///
    /// Returns the tokens, in order (the pending one first; fewer when a stop token or `max_tokens` ends
    /// generation part-way), and what the round did. Errors: an MLX failure, after which the generation
    /// must be dropped.
    pub fn speculate<R: rand::Rng>(
        &mut self,
        model: &Gemma4,
        drafter: &mut dyn crate::speculative::Drafter,
        k: usize,
        rng: &mut R,
    ) -> Result<Round> {
        match self.draft_round(model, drafter, k)? {
            RoundStart::Done(round) => Ok(round),
            RoundStart::Drafted(d) => Self::verify_rounds(model, vec![(self, d, rng)])?
                .pop()
                .unwrap_or_else(|| {
                    Err(EngineError::Speculative(
                        "a verification returned no round".into(),
                    ))
                }),
        }
    }

    /// The first half of a speculative round (see [`Generation::speculate`]): reads the pending token and
    /// asks `drafter` for up to `k` tokens after it. Returns the drafts to verify, or a round already over:
    /// the pending token ended generation, or the drafter proposed nothing (a plain step is then queued).
    ///
    /// Errors: an MLX failure, after which the generation must be dropped.
    pub fn draft_round(
        &mut self,
        model: &Gemma4,
        drafter: &mut dyn crate::speculative::Drafter,
        k: usize,
    ) -> Result<RoundStart> {
        let begun = match self.begin_round(k)? {
            Begin::Done(round) => return Ok(RoundStart::Done(round)),
            Begin::Draft(b) => b,
        };
        let started = Instant::now();
        let proposal = drafter.propose(
            &self.context,
            begun.k,
            &self.opts.sampling,
            &self.target(model, &begun),
        )?;
        let draft_time = started.elapsed().saturating_sub(proposal.catch_up);
        self.end_round(model, begun, proposal, draft_time)
    }

    /// [`Generation::draft_round`] for several generations at once, their drafts proposed together by
    /// `drafter` (one batched pass of the drafter per draft step); `rows` pairs each generation with its
    /// `k`. The drafting's wall-clock time is shared among the rows in proportion to the drafts each
    /// asked for, so that the rounds' times add up to what the batch spent (as
    /// [`Generation::verify_rounds`] shares its pass).
    ///
    /// Returns each row's start, in the order given: an error alone is that row's (its generation must be
    /// dropped). When the shared drafting fails, each row that asked for drafts is drafted again alone, so
    /// that only a row that fails on its own fails.
    pub fn draft_rounds(
        model: &Gemma4,
        mut rows: Vec<(&mut Generation, usize)>,
        drafter: &mut dyn crate::speculative::BatchDrafter,
    ) -> Vec<Result<RoundStart>> {
        let mut out: Vec<Option<Result<RoundStart>>> = Vec::with_capacity(rows.len());
        let mut begun: Vec<Option<Begun>> = Vec::with_capacity(rows.len());
        for (g, k) in &mut rows {
            match g.begin_round(*k) {
                Ok(Begin::Draft(b)) => {
                    out.push(None);
                    begun.push(Some(b));
                }
                Ok(Begin::Done(round)) => {
                    out.push(Some(Ok(RoundStart::Done(round))));
                    begun.push(None);
                }
                Err(e) => {
                    out.push(Some(Err(e)));
                    begun.push(None);
                }
            }
        }
        let live: Vec<usize> = (0..rows.len()).filter(|&i| begun[i].is_some()).collect();
        let started = Instant::now();
        let proposals = {
            let requests = |which: &[usize]| -> Vec<crate::speculative::DraftRequest<'_>> {
                which
                    .iter()
                    .filter_map(|&i| {
                        let (g, b) = (&*rows[i].0, begun[i].as_ref()?);
                        Some(crate::speculative::DraftRequest {
                            row: i,
                            context: &g.context,
                            k: b.k,
                            sampling: &g.opts.sampling,
                            target: g.target(model, b),
                        })
                    })
                    .collect()
            };
            match drafter.propose_many(&requests(&live)) {
                Ok(p) if p.len() == live.len() => p.into_iter().map(Ok).collect(),
                _ => live
                    .iter()
                    .map(|&i| {
                        let mut p = drafter.propose_many(&requests(&[i]))?;
                        p.pop().ok_or_else(|| {
                            EngineError::Speculative("a drafter proposed for no row".into())
                        })
                    })
                    .collect::<Vec<_>>(),
            }
        };
        // The draft steps' time, less the one-off reads of context (each row's own, not a cost per draft).
        let catch_up: Duration = (proposals.iter().flatten()).map(|p| p.catch_up).sum();
        let spent = started.elapsed().saturating_sub(catch_up);
        let asked: usize = live
            .iter()
            .filter_map(|&i| begun[i].as_ref())
            .map(|b| b.k)
            .sum();
        for (&i, proposal) in live.iter().zip(proposals) {
            let Some(b) = begun[i].take() else { continue };
            out[i] = Some(proposal.and_then(|p| {
                let share = spent.mul_f64(b.k as f64 / asked.max(1) as f64);
                rows[i].0.end_round(model, b, p, share)
            }));
        }
        out.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(EngineError::Speculative("a round never started".into())))
            })
            .collect()
    }

    /// Drafts a round may verify while `kv_bits`' quantization is still to come: plain decoding reads
    /// the positions before `quantized_kv_start` over a full-precision cache and those from it on over a
    /// quantized one, so a round that crossed it would read some over the wrong one. The round writes the
    /// pending token at the cache's offset and its drafts after: all of them stay before the start, and
    /// the plain step that reaches it quantizes as plain decoding does. Unbounded once it has passed.
    fn drafts_before_quantizing(&self) -> usize {
        let offset = self.cache.offset().max(0) as usize;
        match self.opts.kv_quant {
            Some(q) if offset < q.start => q.start - offset - 1,
            _ => usize::MAX,
        }
    }

    /// Reads the pending token of a round asking for `k` drafts: the round is over when it ends generation
    /// (or none is pending), otherwise drafting begins.
    fn begin_round(&mut self, k: usize) -> Result<Begin> {
        let mut round = Round::default();
        let Some(cur) = self.take_current() else {
            return Ok(Begin::Done(round));
        };
        let done_before = self.stats.completion_tokens;
        let t0 = read_token(&cur.token)?;
        let Some(first) = self.account(t0, &cur.logprobs)? else {
            return Ok(Begin::Done(round));
        };
        round.steps.push(first);
        let room = self.room();
        if room == 0 {
            self.end(FinishReason::Length);
            return Ok(Begin::Done(round));
        }
        Ok(Begin::Draft(Begun {
            round,
            t0,
            k: k.min(room).min(self.drafts_before_quantizing()),
            hidden: cur.hidden,
            done_before,
        }))
    }

    /// What a drafter may read of this generation's target during the round `begun`.
    fn target<'a>(
        &'a self,
        model: &'a Gemma4,
        begun: &'a Begun,
    ) -> crate::speculative::TargetState<'a> {
        crate::speculative::TargetState {
            model,
            cache: &self.cache,
            hidden: begun.hidden.as_ref(),
        }
    }

    /// Ends the drafting of the round `begun` with `proposal`, drafted in `draft_time`: the drafts to
    /// verify, or, when there are none, the pending token's plain step queued.
    fn end_round(
        &mut self,
        model: &Gemma4,
        begun: Begun,
        proposal: crate::speculative::Proposal,
        draft_time: Duration,
    ) -> Result<RoundStart> {
        let Begun {
            mut round,
            t0,
            done_before,
            ..
        } = begun;
        round.draft_time = draft_time;
        let greedy = self.opts.sampling.temperature == 0.0;
        if proposal.tokens.is_empty() || (!greedy && proposal.laws.len() != proposal.tokens.len()) {
            // Nothing to verify: the pending token's step, queued as next_token would have.
            let tok = Array::from_slice(&[t0 as i32], &[1]);
            self.history = ops::concatenate(&[&self.history, &tok], 0)?;
            self.fed.push(t0);
            let history = self.history.clone();
            self.cur = Some(self.queue(model, &tok, &history, None)?);
            return Ok(RoundStart::Done(round));
        }
        let mut fed: Vec<i32> = vec![t0 as i32];
        fed.extend(proposal.tokens.iter().map(|&d| d as i32));
        Ok(RoundStart::Drafted(Drafted {
            round,
            fed,
            drafts: proposal.tokens,
            laws: proposal.laws,
            greedy,
            done_before,
        }))
    }

    /// The second half of speculative rounds (see [`Generation::speculate`]): verifies the drafts of
    /// several generations in one forward pass of the target (rows of B sequences × L positions, L the
    /// longest round's pending token and drafts; a shorter round is padded with its last token, whose
    /// positions are trimmed from its cache with its rejected drafts, and which the causal mask keeps
    /// from every position that counts), then accepts and commits each round's drafts as
    /// [`Generation::speculate`] does. Each row's result is its lone verification's up to the rounding of
    /// a pass over more rows. Every generation must come from its own [`Generation::draft_round`].
    ///
    /// Returns the rounds in the order given, each its row's result: a row whose acceptance or trim failed
    /// is an error alone, and its generation must be dropped. The rounds' times add up to what the batch's
    /// wall clock spent on each row's round: the draft time is the row's own drafting (a cost per draft it
    /// chose), the verify time the shared pass and every row's commit plus the other rows' drafting (which
    /// it waited on, whatever its own `k`). Errors: the shared forward failed, after which every generation must be dropped.
    pub fn verify_rounds<R: rand::Rng>(
        model: &Gemma4,
        mut rows: Vec<(&mut Generation, Drafted, &mut R)>,
    ) -> Result<Vec<Result<Round>>> {
        let Some(s_max) = rows.iter().map(|(_, d, _)| d.fed.len()).max() else {
            return Ok(vec![]);
        };
        let started = Instant::now();
        let b = rows.len();
        let draft_time: Duration = rows.iter().map(|(_, d, _)| d.round.draft_time).sum();
        let mut ids = Vec::with_capacity(b * s_max);
        for (_, d, _) in &rows {
            let pad = *d.fed.last().ok_or_else(|| {
                EngineError::Speculative("a drafted round fed no pending token".into())
            })?;
            ids.extend(
                d.fed
                    .iter()
                    .copied()
                    .chain(std::iter::repeat(pad))
                    .take(s_max),
            );
        }
        let input = Array::from_slice(&ids, &[b as i32, s_max as i32]);
        let h = {
            let mut caches: Vec<&mut Cache> =
                rows.iter_mut().map(|(g, _, _)| &mut g.cache).collect();
            model.forward_hidden_batch(&input, &mut caches)?
        };
        let logits = model.logits(&h)?;
        // Each position's logits through its request's processors, with the history it would have seen
        // decoding plainly (penalties count the drafts before it).
        let mut per_row = Vec::with_capacity(b);
        for (r, (g, d, _)) in rows.iter().enumerate() {
            let s = d.fed.len();
            let fed_arr = Array::from_slice(&d.fed, &[s as i32]);
            let (mut lps, mut laws) = (Vec::with_capacity(s), Vec::with_capacity(s));
            for i in 0..s {
                let history =
                    ops::concatenate(&[&g.history, &fed_arr.try_index(..i as i32 + 1)?], 0)?;
                let row = logits.try_index((r as i32..r as i32 + 1, i as i32, ..))?;
                let lp = log_softmax(&g.sampler.process(&row, Some(&history))?)?;
                let reported = g.reported(&row, lp.clone())?;
                if d.greedy {
                    laws.push(ops::indexing::argmax_axis(&lp, -1, None)?);
                } else {
                    // In float32, as the drafter's law is: the acceptance rule compares them.
                    laws.push(ops::exp(g.sampler.law(&lp.as_dtype(Dtype::Float32)?)?)?);
                }
                lps.push(reported);
            }
            per_row.push((fed_arr, lps, laws));
        }
        eval(
            per_row
                .iter()
                .flat_map(|(_, _, laws)| laws.iter())
                .chain(rows.iter().flat_map(|(g, _, _)| g.cache.state())),
        )?;
        let verify_time = started.elapsed();
        let committing = Instant::now();
        let mut out = Vec::with_capacity(b);
        for (r, ((g, d, rng), (fed_arr, lps, laws))) in rows.into_iter().zip(per_row).enumerate() {
            // A row's own failure (its acceptance, its trim) fails that row alone: the others' rounds stand.
            let commit = || -> Result<Round> {
                let Drafted {
                    mut round,
                    fed,
                    drafts,
                    laws: q_laws,
                    greedy,
                    done_before,
                } = d;
                let verdict = if greedy {
                    let target: Vec<u32> = laws.iter().map(read_token).collect::<Result<_>>()?;
                    jemma_serve::speculative::accept_greedy(&drafts, &target)
                } else {
                    let p: Vec<&[f32]> = laws.iter().map(|l| l.as_slice::<f32>()).collect();
                    let q: Vec<&[f32]> = q_laws.iter().map(|l| l.as_slice()).collect();
                    jemma_serve::speculative::accept_sampled(&drafts, &q, &p, rng)
                }
                .map_err(|e| EngineError::Speculative(e.to_string()))?;
                round.verify_time = verify_time + draft_time.saturating_sub(round.draft_time);
                round.drafted = drafts.len();
                round.accepted = verdict.accepted;
                // Commit the drafts that stand, as plain decoding would have, one at a time (a stop token or
                // max_tokens may end generation part-way).
                let mut kept = 1;
                for (i, &dt) in drafts[..verdict.accepted].iter().enumerate() {
                    if g.finished {
                        break;
                    }
                    kept += 1;
                    match g.account(dt, &lps[i])? {
                        Some(step) => round.steps.push(step),
                        None => break,
                    }
                    if g.room() == 0 {
                        g.end(FinishReason::Length);
                    }
                }
                if !g.cache.trim_end(s_max - kept) {
                    return Err(EngineError::Speculative(
                        "the cache could not drop the rejected drafts".into(),
                    ));
                }
                // `kv_bits`: quantized once the kept tokens reach the start, as plain decoding's step
                // does after its forward; after the trim, so that the round's rejected drafts are never
                // written quantized (a quantized cache keeps what it was quantized at).
                g.cache.maybe_quantize(g.opts.kv_quant)?;
                if (done_before / 256) != (g.stats.completion_tokens / 256) {
                    // As plain decoding does every 256 tokens: hand MLX's freed buffers back.
                    mlx_rs::memory::clear_cache()?;
                }
                let kept_arr = fed_arr.try_index(..kept as i32)?;
                g.history = ops::concatenate(&[&g.history, &kept_arr], 0)?;
                g.fed.extend(fed[..kept].iter().map(|&t| t as u32));
                if !g.finished {
                    let at = verdict.accepted as i32;
                    g.cur = Some(Pending {
                        token: Array::from_slice(&[verdict.next], &[1]),
                        logprobs: lps[verdict.accepted].clone(),
                        hidden: g.kept(&h.try_index((
                            r as i32..r as i32 + 1,
                            at..at + 1,
                            ..,
                        ))?)?,
                        // Speculation runs without a grammar.
                        redo: None,
                    });
                }
                Ok(round)
            };
            out.push(commit());
        }
        // The commits (acceptance, the answer's bookkeeping, the trim) are the round's too, as a plain
        // step's timing includes its own: a round timed without them looked cheaper than it was, and the
        // controller kept drafting where plain decoding was faster.
        let committed = committing.elapsed();
        for round in out.iter_mut().flatten() {
            round.verify_time += committed;
        }
        Ok(out)
    }

    /// Gives back the last `n` tokens of a speculative round that its caller did not pass on (a stop
    /// string ended the answer inside the round): forgets their KV, so that the cache kept for the prefix
    /// cache holds exactly the tokens the answer has. False when the cache cannot be trimmed (a sliding
    /// window past its edge, or a `kv_bits` cache quantized by that very round, which holds its last
    /// positions only quantized); it must then not be kept.
    pub fn unsend(&mut self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let held = self.fed.len().saturating_sub(n);
        self.fed.truncate(held);
        self.context.truncate(self.context.len().saturating_sub(n));
        self.stats.completion_tokens = self.stats.completion_tokens.saturating_sub(n);
        self.cache.trim_end(n)
    }

    /// Ends this generation on a grammar failure (see [`Generation::take_failure`]).
    fn fail(&mut self, why: String) -> Option<SampledToken> {
        self.failure = Some(why);
        self.end(FinishReason::Stop);
        None
    }

    /// A grammar failure that ended this generation (constrained decoding only), once: the caller fails
    /// the request; the cache is in order up to what was fed.
    pub fn take_failure(&mut self) -> Option<EngineError> {
        self.failure.take().map(EngineError::Constraint)
    }

    /// Ends generation early (a stop string, a cancel) with `reason`; the queued step is dropped. Called
    /// right after the token that caused it: when that token was also the last `max_tokens` allowed (so
    /// generation had just ended for length), the caller's reason replaces `Length`.
    pub fn stop(&mut self, reason: FinishReason) {
        if self.finished && self.stats.finish_reason == FinishReason::Length {
            self.stats.finish_reason = reason;
        }
        // The caller's stop (a stop string) came first: a stop token that a speculative round read after
        // it is not what ended the answer.
        if reason == FinishReason::Stop {
            self.stats.stop_token = None;
        }
        self.end(reason);
    }

    /// Whether generation has ended.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Asks for a copy of the cache once it holds the prompt's first `tokens` tokens (a prefill chunk ends
    /// there), such as the end of a chat's system prompt, which later conversations share, or the end of
    /// its last user turn, which the next turn and a regenerated answer share; taken with
    /// [`Generation::take_checkpoints`]. Ignored unless it falls inside the part of the prompt still to read
    /// (after what a resumed cache holds, before the last prompt token). Call before reading the prompt;
    /// several may be asked for.
    pub fn checkpoint_at(&mut self, tokens: usize) {
        let in_image = self
            .media
            .iter()
            .any(|m| m.start < tokens && tokens < m.start + m.len());
        if tokens > self.prefilled
            && tokens < self.ids.len()
            && !in_image
            && !self.checkpoint_at.contains(&tokens)
        {
            self.checkpoint_at.push(tokens);
            self.checkpoint_at.sort_unstable();
        }
    }

    /// The checkpoints asked for with [`Generation::checkpoint_at`] taken since the last call: each copied
    /// cache with the tokens whose KV it holds.
    pub fn take_checkpoints(&mut self) -> Vec<(Cache, Vec<u32>)> {
        std::mem::take(&mut self.checkpoints)
    }

    /// Rollback points of the prompt's sliding-window layers ([`Cache::checkpoint`]: copies of the windows,
    /// not of the full-attention layers), taken at prefill chunk ends once a window has filled: a cache
    /// that holds this prompt can be returned to one ([`Cache::rollback`]) to serve a later prompt that
    /// parts from it after that point, which trimming cannot do once a window has filled (llama-server's
    /// sliding-window checkpoints). The latest [`ROLLBACK_POINTS`], ascending, each holding
    /// [`Checkpoint::offset`] positions.
    pub fn rollback_points(&self) -> &[Checkpoint] {
        &self.rollback_points
    }

    /// Takes no rollback points from here on (an engine without a prefix cache keeps none).
    pub fn without_rollback_points(&mut self) {
        self.keep_rollback_points = false;
        self.rollback_points.clear();
    }

    /// Bytes the generation's cache holds.
    pub fn cache_bytes(&self) -> u64 {
        self.cache.nbytes() as u64
    }

    /// Prompt tokens whose KV came with a resumed cache.
    pub fn reused(&self) -> usize {
        self.reused
    }

    /// The prompt's ids and every token generated so far, as the model reads them (media placeholders as
    /// their token ids, not [`cache_keys`]): what a drafter continues.
    pub fn context(&self) -> &[u32] {
        &self.context
    }

    /// Ends the generation, handing back its cache and the tokens whose KV it holds (the prompt read so far
    /// and every generated token fed back), for a later request that continues them.
    ///
    /// Errors: evaluating the cache failed (an MLX error).
    pub fn into_cache(self) -> Result<(Cache, Vec<u32>)> {
        // A queued step may still be lazy: settle the cache now, so what is kept holds data rather than a
        // graph (and nothing runs on it after this request has ended).
        eval(self.cache.state())?;
        Ok((self.cache, self.fed))
    }

    /// Counts and timings so far (final once [`Generation::is_finished`]).
    pub fn stats(&self) -> &GenerationStats {
        &self.stats
    }
}
