//! Speculative decoding on the llama.cpp engine (issue 15): a draft GGUF with the same vocabulary, in a
//! context of its own with one sequence per slot, or the model's Gemma 4 assistant reading the target's
//! own cache ([`crate::mtp`]), proposes k tokens greedily, for every speculating sequence at once (one
//! drafter decode per draft step); the target reads the pending
//! token and the drafts in one `llama_decode` with logits at every position, and each position is sampled
//! with the request's own sampler chain, in order, while the sample equals the draft before it (llama.cpp's
//! `common_sampler_sample_and_accept_n`): every committed token is drawn once, with the sampler state plain
//! decoding would have, from logits of the same positions, so the answer follows plain decoding's law.
//! The tokens equal plain decoding's only up to rounding: llama.cpp's kernels round a batch of positions
//! otherwise than one (0.19 in a logprob on Q4_K, measured), which can tip a near-tie, or a seeded draw
//! (so seeded sampled requests decode plainly). The rejected tail is removed from the target's KV
//! (`llama_memory_seq_rm`).
//!
//! How many tokens to draft, and whether to draft at all, is the serving core's [`Controller`] (the same
//! adaptive rule as the MLX engine's); rounds run for single streams by default (`max_batch`), and the
//! sequences that speculate in one step are verified together, in as few decodes as `batch_size` allows.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use jemma_serve::host::SeqOutput;
use jemma_serve::speculative::SpeculativeConfig;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use crate::{Context, LlamaError, LlamaSequence, Loaded, Result, Summary, argmax, trim};

/// `[tiers.X.speculative]` for a GGUF tier.
#[derive(Debug, Clone)]
pub struct LlamaSpeculative {
    /// The draft GGUF: a smaller model with the same vocabulary (E2B for E4B), or the model's Gemma 4
    /// assistant (architecture `gemma4-assistant`: [`crate::mtp`]), recognised by its metadata.
    pub draft_model: PathBuf,
    /// Draft length, batch limit and adaptivity.
    pub config: SpeculativeConfig,
    /// Found rather than named: a draft that does not load (or does not fit the model) leaves the model
    /// decoding plainly, with a warning, instead of failing its load.
    pub optional: bool,
}

self_cell::self_cell!(
    /// The draft model with its context (which borrows it).
    pub(crate) struct DraftCell {
        owner: Loaded,
        #[covariant]
        dependent: Context,
    }
);

/// The draft model of a serving engine: its context, and per slot the tokens whose KV the slot's draft
/// sequence holds (reused across rounds and requests by their common prefix).
pub(crate) struct Drafts {
    pub(crate) cell: DraftCell,
    pub(crate) held: Vec<Vec<u32>>,
    pub(crate) config: SpeculativeConfig,
    pub(crate) batch_size: usize,
}

/// What drafts for a serving engine: a draft model, or a Gemma 4 assistant reading the target's cache.
pub(crate) enum Drafter {
    /// A smaller GGUF with the same vocabulary, in a context of its own.
    Model(Drafts),
    /// A Gemma 4 assistant (MTP) drafter ([`crate::mtp`]).
    Mtp(crate::mtp::Mtp),
}

impl Drafter {
    /// Draft length, batch limit and adaptivity.
    pub(crate) fn config(&self) -> &SpeculativeConfig {
        match self {
            Self::Model(d) => &d.config,
            Self::Mtp(m) => &m.config,
        }
    }

    /// Positions one verification may read (the target's batch).
    pub(crate) fn batch_size(&self) -> usize {
        match self {
            Self::Model(d) => d.batch_size,
            Self::Mtp(m) => m.batch_size,
        }
    }

    /// Floats per target hidden state a sequence keeps for the drafter (0: it keeps none).
    pub(crate) fn hidden_width(&self) -> usize {
        match self {
            Self::Model(_) => 0,
            Self::Mtp(m) => m.n_embd,
        }
    }

    /// Drafts for the sequences `wants` names (index in `batch`, drafts wanted), in order, drafted
    /// together: a draft model's ([`draft_many`]) or an assistant's ([`crate::mtp::draft_many`]). None
    /// for a sequence whose drafting failed (it decodes plainly from now on).
    pub(crate) fn draft(
        &mut self,
        batch: &mut [&mut LlamaSequence],
        wants: &[(usize, usize)],
    ) -> Vec<Option<(Vec<u32>, Duration)>> {
        match self {
            Self::Model(d) => draft_many(d, batch, wants),
            Self::Mtp(m) => crate::mtp::draft_many(m, batch, wants),
        }
    }
}

/// Checks that `draft` can draft for `target`: the same vocabulary, token for token.
///
/// Errors: [`LlamaError::InvalidModel`] naming the first difference.
pub(crate) fn check_vocabulary(target: &Loaded, draft: &Loaded) -> Result<()> {
    let (a, b) = (target.model.n_vocab(), draft.model.n_vocab());
    if a != b {
        return Err(LlamaError::InvalidModel(format!(
            "the draft model's vocabulary has {b} tokens, the target's {a}: choose a draft from the \
             target's model family (the same tokenizer: E2B for E4B)"
        )));
    }
    let (tv, dv) = (target.model.vocab(), draft.model.vocab());
    if let Some(id) = (0..a).find(|&i| {
        tv.token_to_piece(LlamaToken(i), true, None) != dv.token_to_piece(LlamaToken(i), true, None)
    }) {
        return Err(LlamaError::InvalidModel(format!(
            "the draft model's tokenizer differs from the target's at token {id}: choose a draft from \
             the target's model family (the same tokenizer: E2B for E4B)"
        )));
    }
    Ok(())
}

/// What one round did, for the controller.
pub(crate) struct Round {
    pub(crate) drafted: usize,
    pub(crate) accepted: usize,
    pub(crate) draft_time: Duration,
    pub(crate) verify_time: Duration,
}

impl Drafts {
    /// The first greedy draft after `context` (every committed token; the last not yet read by the
    /// target) from the draft's sequence `slot`, reading first what that sequence does not hold — or, when
    /// another slot's draft sequence holds more of `context` (the conversation was served from another
    /// slot, or requests open with one system prompt), copying that one's KV stream first, as the target's
    /// prefix is shared (`kv::share_prefix`, with its threshold `min_shared_gain`). The drafts after it
    /// are [`Drafts::step`]'s. Returns the draft, the time spent catching up on a long stretch (more than
    /// `k + 1` tokens: a prompt, a one-off the controller must not count as drafting cost), and how many
    /// tokens of `context` the draft already held or copied.
    fn catch_up(
        &mut self,
        slot: usize,
        context: &[u32],
        k: usize,
    ) -> Result<(u32, Duration, usize)> {
        let n_swa = self.cell.borrow_owner().n_swa;
        // A copy moves a whole stream (every cell: `swa_full`), so it must save more than reading a few
        // tokens costs: the target's threshold for sharing a prefix.
        let min_copy_gain = crate::min_shared_gain(self.cell.borrow_owner().n_ctx);
        let batch_size = self.batch_size.max(1);
        let all_held = &mut self.held;
        self.cell.with_dependent_mut(|_, ctx| {
            // How much of `context` draft sequence `j` holds that it can be cut back to: a sliding window
            // that no longer holds the prefix's window cannot be cut back exactly.
            let usable = |ctx: &llama_cpp_2::context::LlamaContext<'_>, j: usize| {
                let common = jemma_serve::prefix::common_prefix_len(&all_held[j], context)
                    // The last context token is read with its logits, never taken from the cache.
                    .min(context.len().saturating_sub(1));
                let pos_min = ctx.kv_cache_seq_pos_min(j as i32);
                if crate::window_holds(pos_min, common, n_swa) {
                    common
                } else {
                    0
                }
            };
            let own = usable(ctx, slot);
            let elsewhere = (0..all_held.len())
                .filter(|&j| j != slot)
                .map(|j| (usable(ctx, j), j))
                .max();
            if let Some((n, j)) = elsewhere
                && n >= own + min_copy_gain
                && ctx
                    .copy_kv_cache_seq(j as i32, slot as i32, None, None)
                    .is_ok()
            {
                // The copy is applied at the next decode, which the catch-up below makes (at least the
                // last context token is read).
                let kept = trim(ctx, slot as u32, n)?;
                all_held[slot] = all_held[j][..kept].to_vec();
            } else if own < all_held[slot].len() {
                let kept = trim(ctx, slot as u32, own)?;
                all_held[slot].truncate(kept);
            }
            let held = &mut all_held[slot];
            let reused = held.len();
            let started = Instant::now();
            let from = held.len();
            let mut batch = LlamaBatch::new(batch_size, 1);
            let mut last_row = 0;
            for (c, chunk) in context[from..].chunks(batch_size).enumerate() {
                batch.clear();
                for (i, &t) in chunk.iter().enumerate() {
                    let pos = from + c * batch_size + i;
                    batch
                        .add(
                            LlamaToken(t as i32),
                            pos as i32,
                            &[slot as i32],
                            pos == context.len() - 1,
                        )
                        .map_err(|e| LlamaError::Runtime(e.to_string()))?;
                    last_row = i as i32;
                }
                ctx.decode(&mut batch)
                    .map_err(|e| LlamaError::Runtime(format!("draft decode: {e}")))?;
            }
            held.extend_from_slice(&context[from..]);
            let catch_up = if context.len() - from > k + 1 {
                started.elapsed()
            } else {
                Duration::ZERO
            };
            Ok((argmax(ctx.get_logits_ith(last_row)), catch_up, reused))
        })
    }

    /// One draft step for several draft sequences at once (one decode: a token per sequence, each at the
    /// next position of its own sequence): `rows` holds each sequence's slot and the draft it reads, which
    /// the slot's held tokens gain. Returns each sequence's next greedy draft, in order.
    ///
    /// Errors: a failed decode (the sequences' draft KV must then be dropped).
    fn step(&mut self, rows: &[(usize, u32)]) -> Result<Vec<u32>> {
        let all_held = &mut self.held;
        self.cell.with_dependent_mut(|_, ctx| {
            let mut batch = LlamaBatch::new(rows.len().max(1), 1);
            for &(slot, d) in rows {
                batch
                    .add(
                        LlamaToken(d as i32),
                        all_held[slot].len() as i32,
                        &[slot as i32],
                        true,
                    )
                    .map_err(|e| LlamaError::Runtime(e.to_string()))?;
            }
            ctx.decode(&mut batch)
                .map_err(|e| LlamaError::Runtime(format!("draft decode: {e}")))?;
            Ok(rows
                .iter()
                .enumerate()
                .map(|(i, &(slot, d))| {
                    all_held[slot].push(d);
                    argmax(ctx.get_logits_ith(i as i32))
                })
                .collect())
        })
    }

    /// Drops what draft sequence `slot` holds, after a failure: it reads its context again next time.
    fn forget(&mut self, slot: usize) {
        self.held[slot].clear();
        let _ = self
            .cell
            .with_dependent_mut(|_, c| c.clear_kv_cache_seq(Some(slot as u32), None, None));
    }
}
/// A sequence's drafts, waiting for their verification ([`draft`], [`verify`]).
pub(crate) struct Drafted {
    /// The sequence's index in the step's batch.
    pub(crate) seq: usize,
    /// The drafts.
    pub(crate) tokens: Vec<u32>,
    /// Time spent drafting them (catching up on a prompt excluded).
    pub(crate) draft_time: Duration,
}

/// The first half of speculative rounds for the sequences `wants` names (index in `batch`, drafts wanted),
/// which are decoding: up to `k` greedy drafts each after its tokens, from its slot's draft sequence. Each
/// catches its draft sequence up alone ([`Drafts::catch_up`]: its first draft), then the drafts after it
/// are drafted together, one decode of the draft model per step for every sequence still drafting
/// (`s.draft_reused` is set at a sequence's first round). Per sequence, in order: its drafts and its
/// share of the drafting time (the time less the long catch-ups, shared in proportion to the drafts each
/// asked for, as on the MLX engine, so that a round's draft and verification times add up to the batch's
/// wall clock), or None when its catching up failed (logged; its draft sequence starts over, the target
/// was not touched): it decodes plainly. A failed shared step ends the drafting of the sequences in it with
/// the drafts they have (their draft sequences start over next round).
pub(crate) fn draft_many(
    drafts: &mut Drafts,
    batch: &mut [&mut LlamaSequence],
    wants: &[(usize, usize)],
) -> Vec<Option<(Vec<u32>, Duration)>> {
    let started = Instant::now();
    let mut out: Vec<Option<Vec<u32>>> = vec![None; wants.len()];
    // Sequences whose drafting a failed step ended.
    let mut stopped = vec![false; wants.len()];
    let mut caught_up = Duration::ZERO;
    for (w, &(i, k)) in wants.iter().enumerate() {
        let s = &mut *batch[i];
        let context: Vec<u32> = s
            .ids
            .iter()
            .map(|t| t.0 as u32)
            .chain(s.tokens.iter().copied())
            .collect();
        if k == 0 {
            out[w] = Some(vec![]);
            continue;
        }
        match drafts.catch_up(s.slot, &context, k) {
            Ok((first, catch_up, reused)) => {
                s.draft_reused.get_or_insert(reused);
                caught_up += catch_up;
                out[w] = Some(vec![first]);
            }
            Err(e) => {
                tracing::warn!(error = %e, "the draft model failed; decoding this request plainly");
                drafts.forget(s.slot);
            }
        }
    }
    loop {
        // The sequences that want another draft: each reads its last one.
        let rows: Vec<(usize, usize, u32)> = (out.iter().enumerate())
            .filter_map(|(w, d)| {
                let d = d.as_ref()?;
                (d.len() < wants[w].1 && !stopped[w])
                    .then(|| (w, batch[wants[w].0].slot, d[d.len() - 1]))
            })
            .collect();
        if rows.is_empty() {
            break;
        }
        let step: Vec<(usize, u32)> = rows.iter().map(|&(_, slot, d)| (slot, d)).collect();
        match drafts.step(&step) {
            Ok(next) => {
                for (&(w, _, _), d) in rows.iter().zip(next) {
                    if let Some(ds) = out[w].as_mut() {
                        ds.push(d);
                    }
                }
            }
            Err(e) => {
                // The drafts so far stand as drafted; what the failed decode left in the draft KV is
                // dropped, and the next round reads the context again.
                tracing::warn!(error = %e, "a draft model step failed; verifying the drafts so far");
                for &(w, slot, _) in &rows {
                    drafts.forget(slot);
                    stopped[w] = true;
                }
            }
        }
    }
    let drafting = started.elapsed().saturating_sub(caught_up);
    let asked: usize = (wants.iter().zip(&out))
        .filter(|(_, d)| d.is_some())
        .map(|((_, k), _)| k)
        .sum();
    (wants.iter().zip(out))
        .map(|((_, k), d)| d.map(|d| (d, drafting.mul_f64(*k as f64 / asked.max(1) as f64))))
        .collect()
}

/// The second half of speculative rounds: verifies the drafts of several sequences (`rows`, by increasing
/// slot) in as few target decodes as `batch_size` positions allow, each sequence's pending token and drafts
/// at its own positions in its own KV stream with logits at every position. Then, per sequence, commits the
/// tokens plain decoding would sample (streaming them through [`LlamaSequence::accept`], which ends the
/// sequence where plain decoding would: llama.cpp's `common_sampler_sample_and_accept_n`), and removes the
/// rejected drafts' KV. Each round's times add up to what the batch's wall clock spent on it: the draft
/// time is the row's own drafting, the verify time the shared decode plus the other rows' drafting.
///
/// Returns the rounds in the order of `rows`; a sequence whose rejected drafts cannot be trimmed from its
/// KV fails alone (poisoned, its request ended with the error). Errors: a failed target decode.
pub(crate) fn verify(
    loaded: &Loaded,
    ctx: &mut Context<'_>,
    batch: &mut [&mut LlamaSequence],
    out: &mut [SeqOutput<Summary>],
    rows: &[Drafted],
    batch_size: usize,
) -> Result<Vec<Round>> {
    let mut rounds = Vec::with_capacity(rows.len());
    let mut rest = rows;
    let capacity = loaded.n_ctx as usize;
    while !rest.is_empty() {
        // As many rows as fit one decode, each padded to the longest (each fits alone: k < batch_size).
        let (mut n, mut longest) = (0, 0);
        while n < rest.len() {
            let l = longest.max(rest[n].tokens.len() + 1);
            if n > 0 && (n + 1) * l > batch_size {
                break;
            }
            longest = l;
            n += 1;
        }
        let (group, tail) = rest.split_at(n);
        rest = tail;
        let started = Instant::now();
        let draft_time: Duration = group.iter().map(|r| r.draft_time).sum();
        let mut b = LlamaBatch::new(n * longest, 1);
        let mut first_row = Vec::with_capacity(group.len());
        for r in group {
            let s = &batch[r.seq];
            let last = *s.tokens.last().unwrap_or(&0);
            let pos0 = s.ids.len() + s.tokens.len() - 1;
            first_row.push(b.n_tokens());
            // With one KV stream per sequence, llama.cpp splits a batch into micro-batches of equal token
            // counts per sequence: rows of one length run as one forward. The padding (the last draft
            // again, at the positions after it, without logits) is trimmed with the rejected drafts; a row
            // near the end of its context is not padded (it then runs in a micro-batch of its own).
            let fed = r.tokens.len() + 1;
            let pad = if pos0 + longest <= capacity {
                longest - fed
            } else {
                0
            };
            let tail = *r.tokens.last().unwrap_or(&last);
            let tokens = std::iter::once(&last)
                .chain(&r.tokens)
                .chain(std::iter::repeat_n(&tail, pad));
            for (i, &t) in tokens.enumerate() {
                b.add(
                    LlamaToken(t as i32),
                    (pos0 + i) as i32,
                    &[s.slot as i32],
                    i < fed,
                )
                .map_err(|e| LlamaError::Runtime(e.to_string()))?;
            }
        }
        ctx.decode(&mut b)
            .map_err(|e| LlamaError::Runtime(format!("decode: {e}")))?;
        let mut accepted_all = Vec::with_capacity(group.len());
        for (r, &row0) in group.iter().zip(&first_row) {
            let (s, o) = (&mut *batch[r.seq], &mut out[r.seq]);
            let last = *s.tokens.last().unwrap_or(&0);
            let pos0 = s.ids.len() + s.tokens.len() - 1;
            s.kv.extend([last]);
            // `accepted`: drafts whose sample matched (the figure); `fed`: those whose KV stays (a token
            // that ended the answer is never read, as in plain decoding).
            let (mut accepted, mut fed) = (0, 0);
            // The row whose logits gave the last token sampled: the MTP drafter's next hidden state.
            let mut last_row = row0;
            for (i, &d) in r.tokens.iter().enumerate() {
                let before = s.tokens.len();
                last_row = row0 + i as i32;
                s.accept(loaded, ctx, last_row, o);
                if s.tokens.len() == before || s.tokens.last() != Some(&d) {
                    // An end-of-generation token or a failure, or the sample is not the draft.
                    break;
                }
                accepted += 1;
                if o.end.is_some() {
                    // A stop string or max_tokens ended the answer on it.
                    break;
                }
                fed += 1;
                s.kv.extend([d]);
            }
            if fed == r.tokens.len() && o.end.is_none() {
                // Every draft stood: the last row's sample is the token after them.
                last_row = row0 + r.tokens.len() as i32;
                s.accept(loaded, ctx, last_row, o);
            }
            crate::mtp::keep_hidden(ctx, s, last_row);
            let kept = pos0 + 1 + fed;
            if !matches!(trim(ctx, s.slot as u32, kept), Ok(k) if k == kept) {
                // This sequence's KV holds what its answer does not: it alone fails (its slot is
                // cleared when released); the others' rounds stand.
                s.poisoned = true;
                o.fail(LlamaError::Runtime(
                    "the KV cache could not drop the rejected drafts".into(),
                ));
            }
            accepted_all.push(accepted);
        }
        let verify_time = started.elapsed();
        rounds.extend(group.iter().zip(accepted_all).map(|(r, accepted)| Round {
            drafted: r.tokens.len(),
            accepted,
            draft_time: r.draft_time,
            verify_time: verify_time + draft_time.saturating_sub(r.draft_time),
        }));
    }
    Ok(rounds)
}
