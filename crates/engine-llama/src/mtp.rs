//! Gemma 4's MTP assistant drafter on the llama.cpp engine (issue 15): llama.cpp's `gemma4-assistant`
//! architecture, a few layers with no K/V projections of their own whose attention reads the target's KV
//! cache (its context is created with `ctx_other` = the target's, and its cells are the target's).
//!
//! This follows llama.cpp's own driver, `common_speculative_impl_draft_mtp` (common/speculative.cpp, its
//! `is_mem_shared` mode for Gemma 4):
//! - the target outputs, beside each row of logits, its last hidden state after the final norm (the LM
//!   head's input; `llama_set_embeddings_nextn`), and the sequence keeps the row of the position whose
//!   logits gave its pending token;
//! - a draft step reads one token with a hidden state (`llama_batch_ext_set_embd_token`) at the pending
//!   token's position, and gives logits and the next hidden state; every step of a round stays at that
//!   position (the drafter attends to the target's cache only, which holds the positions before it);
//! - the drafts are greedy, and verified as a draft model's are ([`crate::speculative::verify`]).
//!
//! llama.cpp's converter leaves out the centroid-routed head of the E2B/E4B drafters (`masked_embedding`),
//! so their drafts come from the whole LM head here: the argmax the routed head approximates.
//!
//! The nextn getters and setters live in llama.cpp's staging header (`src/llama-ext.h`), declared without
//! C linkage; they are bound here by their Itanium-mangled names, which the vendored llama.cpp exports
//! (Linux and macOS; the engine is not built for Windows).

use std::time::{Duration, Instant};

use jemma_serve::speculative::SpeculativeConfig;
use llama_cpp_2::context::params::{LlamaContextParams, LlamaContextType};
use llama_cpp_sys_2 as sys;

use crate::{Context, LlamaError, LlamaSequence, Loaded, Result, argmax};

// SAFETY: the signatures are llama-ext.h's, `void llama_set_embeddings_nextn(llama_context *, bool,
// bool)` and `float * llama_get_embeddings_nextn_ith(llama_context *, int32_t)`.
unsafe extern "C" {
    #[link_name = "_Z26llama_set_embeddings_nextnP13llama_contextbb"]
    fn llama_set_embeddings_nextn(ctx: *mut sys::llama_context, value: bool, masked: bool);
    #[link_name = "_Z30llama_get_embeddings_nextn_ithP13llama_contexti"]
    fn llama_get_embeddings_nextn_ith(ctx: *mut sys::llama_context, i: i32) -> *mut f32;
}

/// Whether the GGUF at `path` is a Gemma 4 assistant (MTP) drafter: `general.architecture` is
/// `gemma4-assistant`.
///
/// Errors: the file cannot be read as a GGUF.
pub fn is_assistant(path: &std::path::Path) -> Result<bool> {
    let meta = crate::gguf::read_metadata(path)?;
    Ok(matches!(
        meta.get("general.architecture"),
        Some(crate::gguf::Value::Str(a)) if a == "gemma4-assistant"
    ))
}

/// Makes the target's context output its nextn hidden state beside each row of logits (masked: only
/// for the positions that output logits, indexed as the logits are).
pub(crate) fn enable_target(ctx: &mut Context<'_>) {
    // SAFETY: a live context.
    unsafe { llama_set_embeddings_nextn(ctx.as_mut_ptr(), true, true) }
}

/// The target's hidden state at batch index `idx` of its last decode (which output logits there): what
/// the drafter reads beside the token those logits gave. None if llama.cpp has none (it logs why; a
/// llama.cpp built without `NDEBUG` aborts instead, as for a bad logits index).
pub(crate) fn hidden(ctx: &mut Context<'_>, idx: i32, n_embd: usize) -> Option<Vec<f32>> {
    // SAFETY: a live context; the row holds `n_embd` floats (llama_model_n_embd_out of the target, which
    // the drafter's input width was checked against).
    unsafe {
        let p = llama_get_embeddings_nextn_ith(ctx.as_mut_ptr(), idx);
        (!p.is_null()).then(|| std::slice::from_raw_parts(p, n_embd).to_vec())
    }
}

/// Keeps in `s`, when it drafts with an assistant, the target's hidden state at batch index `idx` of the
/// decode just made, whose logits gave its pending token.
pub(crate) fn keep_hidden(ctx: &mut Context<'_>, s: &mut LlamaSequence, idx: i32) {
    if s.hidden_width > 0 && s.spec.is_some() {
        s.hidden = hidden(ctx, idx, s.hidden_width);
    }
}

self_cell::self_cell!(
    /// The assistant model with its MTP context (which borrows it).
    pub(crate) struct MtpCell {
        owner: Loaded,
        #[covariant]
        dependent: Context,
    }
);

/// An assistant drafter bound to a target context: declared in `Serving` before the target, so that it is
/// freed first.
pub(crate) struct Mtp {
    pub(crate) cell: MtpCell,
    /// llama.cpp's extended batch for the draft context (owned; freed on drop).
    batch: *mut sys::llama_batch_ext,
    /// The target's hidden size (the assistant's `embedding_length_out`), floats per hidden state.
    pub(crate) n_embd: usize,
    pub(crate) config: SpeculativeConfig,
    /// Positions one verification may read (the target's batch).
    pub(crate) batch_size: usize,
}

// SAFETY: the batch pointer is owned by this value and used only through `&mut self`, on the model thread
// that owns the contexts, as `LlamaContext` itself is `Send`.
unsafe impl Send for Mtp {}

impl Drop for Mtp {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_batch_ext_init, freed once.
        unsafe { sys::llama_batch_ext_free(self.batch) }
    }
}

impl Mtp {
    /// Binds the assistant `drafter` to the target's context `target` (`params`: the target's context
    /// parameters, whose sequences and KV layout the shared cells follow) and makes the target output its
    /// hidden states. Bind before the target reads anything: making the drafter's context empties the
    /// cache it shares with the target (measured: the drafts after a prompt read before binding were
    /// those of an empty cache).
    pub(crate) fn bind(
        drafter: Loaded,
        target: &mut Context<'_>,
        params: LlamaContextParams,
        config: SpeculativeConfig,
        batch_size: usize,
    ) -> Result<Self> {
        let backend = crate::backend()?;
        // SAFETY: a live context and its model.
        let want =
            unsafe { sys::llama_model_n_embd_out(sys::llama_get_model(target.as_mut_ptr())) };
        let reads = drafter.model.n_embd_out();
        if reads != want {
            return Err(LlamaError::InvalidModel(format!(
                "the assistant drafter reads hidden states of {reads} values, the target's are {want}: \
                 choose the assistant made for this model"
            )));
        }
        let params = params.with_context_type(LlamaContextType::Mtp);
        let cell = MtpCell::try_new(drafter, |l| {
            l.model
                .new_context_with_ctx_other(backend, params, target)
                .map_err(|e| LlamaError::Runtime(format!("the drafter's context: {e}")))
        })?;
        let mut mtp = Self {
            cell,
            batch: std::ptr::null_mut(),
            n_embd: want as usize,
            config,
            batch_size,
        };
        mtp.cell.with_dependent_mut(|_, d| {
            // SAFETY: a live context; the batch is sized by it.
            unsafe {
                llama_set_embeddings_nextn(d.as_mut_ptr(), true, true);
                mtp.batch = sys::llama_batch_ext_init(d.as_mut_ptr());
            }
        });
        if mtp.batch.is_null() {
            return Err(LlamaError::Runtime(
                "llama.cpp made no batch for the drafter".into(),
            ));
        }
        enable_target(target);
        Ok(mtp)
    }

    /// Greedy drafts for several sequences at once, each draft step of all of them in one
    /// `llama_process` (llama.cpp's driver batches them so): for each row, up to `k` drafts after
    /// `pending` (the sequence's last sampled token, at position `pos0`, not yet read by the target), from
    /// the target's hidden state `h` at the position before it, for the target's sequence `seq`, whose KV
    /// must hold exactly the positions before `pos0`. Returns each row's drafts, in order.
    ///
    /// Errors: a hidden state of another width than the target's; a failed draft decode (no row's drafts
    /// are then returned; the target's cache is not touched either way).
    pub(crate) fn propose_many(&mut self, rows: &[DraftRow<'_>]) -> Result<Vec<Vec<u32>>> {
        let (batch, n_embd) = (self.batch, self.n_embd);
        if let Some(r) = rows.iter().find(|r| r.h.len() != n_embd) {
            return Err(LlamaError::Runtime(format!(
                "a hidden state of {} values for a drafter that reads {n_embd}",
                r.h.len()
            )));
        }
        self.cell.with_dependent_mut(|_, d| {
            let ctx = d.as_mut_ptr();
            // SAFETY: a live context and batch; llama_batch_ext_set_embd_token copies the state it is
            // given, and the logits and nextn rows read are those of the decode just made.
            unsafe {
                let n_vocab = sys::llama_vocab_n_tokens(sys::llama_model_get_vocab(
                    sys::llama_get_model(ctx),
                )) as usize;
                let mut drafts: Vec<Vec<u32>> =
                    rows.iter().map(|r| Vec::with_capacity(r.k)).collect();
                let mut tok: Vec<u32> = rows.iter().map(|r| r.pending).collect();
                let mut state: Vec<Vec<f32>> = rows.iter().map(|r| r.h.to_vec()).collect();
                let steps = rows.iter().map(|r| r.k).max().unwrap_or(0);
                for step in 0..steps {
                    sys::llama_batch_ext_clear(batch);
                    let mut at = Vec::with_capacity(rows.len());
                    for (j, r) in rows.iter().enumerate().filter(|(_, r)| r.k > step) {
                        let idx = sys::llama_batch_ext_add_token(batch, r.seq, tok[j] as i32);
                        if idx < 0 {
                            return Err(LlamaError::Runtime(format!(
                                "the drafter's batch refused a token ({idx})"
                            )));
                        }
                        let embd = sys::llama_embd {
                            data: state[j].as_ptr(),
                            n_rows: 1,
                            n_embd,
                        };
                        // Every step of a round stays at the pending token's position (the drafter
                        // attends to the target's cache only).
                        if !sys::llama_batch_ext_set_pos(batch, idx, &r.pos0)
                            || !sys::llama_batch_ext_set_embd_token(batch, idx, embd)
                            || !sys::llama_batch_ext_set_output_logits(batch, idx, true)
                        {
                            return Err(LlamaError::Runtime(
                                "the drafter's batch refused the hidden state".into(),
                            ));
                        }
                        at.push((j, idx));
                    }
                    let rc = sys::llama_process(ctx, sys::LLAMA_PROCESS_TYPE_DECODE, batch);
                    if rc != 0 {
                        return Err(LlamaError::Runtime(format!("draft decode: {rc}")));
                    }
                    for (j, idx) in at {
                        let logits = sys::llama_get_logits_ith(ctx, idx);
                        let next = llama_get_embeddings_nextn_ith(ctx, idx);
                        if logits.is_null() || next.is_null() {
                            return Err(LlamaError::Runtime(
                                "the drafter gave no logits or hidden state".into(),
                            ));
                        }
                        tok[j] = argmax(std::slice::from_raw_parts(logits, n_vocab));
                        drafts[j].push(tok[j]);
                        state[j].copy_from_slice(std::slice::from_raw_parts(next, n_embd));
                    }
                }
                Ok(drafts)
            }
        })
    }
}

/// One sequence's part of a batched MTP round ([`Mtp::propose_many`]).
pub(crate) struct DraftRow<'a> {
    /// The target's sequence id (the slot).
    pub(crate) seq: i32,
    /// The last sampled token, not yet read by the target.
    pub(crate) pending: u32,
    /// Its position.
    pub(crate) pos0: i32,
    /// The target's hidden state at the position before it.
    pub(crate) h: &'a [f32],
    /// Drafts wanted.
    pub(crate) k: usize,
}

/// The first half of MTP rounds for the sequences `wants` names (index in `batch`, drafts wanted), which
/// are decoding: their drafts after their pending tokens, from the hidden states their last target
/// decodes kept, drafted together ([`Mtp::propose_many`]). Per sequence, in order: no drafts when it has
/// no hidden state yet (it decodes plainly this step and keeps one), or None when its drafting failed
/// (logged; the target was not touched; a failed batch is drafted again one sequence at a time, so that
/// one sequence's failure does not stop the others' speculation). The drafting time is shared among
/// the rows in proportion to the drafts each asked for, so that a round's draft and verification times add
/// up to the batch's wall clock ([`crate::speculative::verify`]).
pub(crate) fn draft_many(
    mtp: &mut Mtp,
    batch: &mut [&mut LlamaSequence],
    wants: &[(usize, usize)],
) -> Vec<Option<(Vec<u32>, Duration)>> {
    let started = Instant::now();
    let mut out: Vec<Option<(Vec<u32>, Duration)>> =
        vec![Some((vec![], Duration::ZERO)); wants.len()];
    let mut rows = Vec::with_capacity(wants.len());
    let mut which = Vec::with_capacity(wants.len());
    for (w, &(i, k)) in wants.iter().enumerate() {
        let s = &*batch[i];
        if let (Some(h), Some(&pending)) = (s.hidden.as_deref(), s.tokens.last()) {
            rows.push(DraftRow {
                seq: s.slot as i32,
                pending,
                pos0: (s.ids.len() + s.tokens.len() - 1) as i32,
                h,
                k,
            });
            which.push(w);
        }
    }
    if rows.is_empty() {
        return out;
    }
    // Together; when that fails and there were several, one by one, so that only a sequence whose own
    // drafting fails stops speculating.
    let results: Vec<Result<Vec<u32>>> = match mtp.propose_many(&rows) {
        Ok(drafts) => drafts.into_iter().map(Ok).collect(),
        Err(e) if rows.len() == 1 => vec![Err(e)],
        Err(_) => rows
            .iter()
            .map(|r| {
                mtp.propose_many(std::slice::from_ref(r))
                    .map(|mut d| d.remove(0))
            })
            .collect(),
    };
    drop(rows);
    // Shared in proportion to the drafts each asked for, as the draft model's and the MLX engine's.
    let asked: usize = which.iter().map(|&w| wants[w].1).sum();
    let spent = started.elapsed();
    for (w, r) in which.into_iter().zip(results) {
        match r {
            Ok(d) => {
                // The assistant holds no cache of its own: nothing of the context is read again.
                batch[wants[w].0].draft_reused.get_or_insert(0);
                out[w] = Some((d, spent.mul_f64(wants[w].1 as f64 / asked.max(1) as f64)));
            }
            Err(e) => {
                tracing::warn!(error = %e, "the assistant drafter failed; decoding this request plainly");
                out[w] = None;
            }
        }
    }
    out
}
