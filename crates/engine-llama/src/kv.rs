//! The prefix cache inside llama.cpp's KV: what a slot can reuse, trimming a sequence, saving it to the
//! host-memory pool, and copying another sequence's or the pool's prefix into a slot.

use super::*;

/// How many leading tokens of `ids` sequence `seq` can keep: what its [`PrefixSlot`] says is reusable (the
/// longest prefix it holds, never the last prompt token, whose logits start the answer), or 0 when the
/// sliding-window layers no longer hold that prefix's window, so that it cannot be restored exactly and
/// the whole prompt is prefilled again — the check llama-server makes (`pos_min > max(0, n_past - n_swa)`).
/// The engine's contexts keep every sliding cell (`swa_full`), so a sequence the engine decoded always
/// passes, and so does one restored from the pool, which keeps only states its window holds whole
/// ([`save`]); the check stays for any state that lost cells (`llama_state_seq_get_data` drops sliding
/// cells outside the window).
pub(crate) fn reusable(
    ctx: &llama_cpp_2::context::LlamaContext<'_>,
    seq: u32,
    cached: &PrefixSlot,
    (ids, media): (&[u32], &[media::MediaSpan]),
    n_swa: Option<u32>,
) -> usize {
    // Never into an image or clip (read whole), and cut back before the window is checked.
    let keep = media::whole_spans(cached.reusable(ids), media);
    if keep == 0 {
        return 0;
    }
    let pos_min = ctx.kv_cache_seq_pos_min(seq as i32);
    let window_lost = n_swa.is_some_and(|w| pos_min > (keep as i64 - w as i64).max(0) as i32);
    if pos_min < 0 || window_lost { 0 } else { keep }
}

/// Keeps the first `keep` positions of sequence `seq`'s KV (`llama_memory_seq_rm` from there on; all of it
/// for 0) and returns how many were kept (0 when llama.cpp cannot trim a partial range).
pub(crate) fn trim(
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    seq: u32,
    keep: usize,
) -> Result<usize> {
    if keep > 0 {
        let kept = ctx
            .clear_kv_cache_seq(Some(seq), Some(keep as u32), None)
            .map_err(|e| LlamaError::Runtime(format!("trimming the KV cache: {e}")))?;
        if kept {
            return Ok(keep);
        }
    }
    ctx.clear_kv_cache_seq(Some(seq), None, None)
        .map_err(|e| LlamaError::Runtime(format!("clearing the KV cache: {e}")))?;
    Ok(0)
}

/// Saves sequence `seq`'s cache, which holds the KV of `tokens`, in the pool as an owned entry, evicting
/// the least recently used entries beyond `budget` bytes. Nothing is saved when the cache and `tokens`
/// disagree, when the state alone exceeds the budget, when llama.cpp cannot serialise it (logged), or when
/// `tokens` run past the model's sliding window (`n_swa`).
///
/// Why not past the window: llama.cpp then saves only the window's sliding cells and restores them at
/// other cells than a read leaves them in, and what the restored cache reads next is not what a cold read
/// gives (ggml-org/llama.cpp#25295, open upstream). Measured on the real Gemma 3 270M (window 512) with these
/// sources, a 777-token state restored and continued by 1, 64 or 100 tokens: logits up to 1.5 apart from a
/// cold replay's (2 to 41 tokens happened to match), on float16 and float32 caches, with flash attention
/// on or off; any state within the window, and a stream copied with `llama_memory_seq_cp`, matched bit for
/// bit. A restore must give a cold read's answer, so such a conversation is read again instead.
pub(crate) fn save(
    ctx: &llama_cpp_2::context::LlamaContext<'_>,
    seq: u32,
    tokens: &[u32],
    n_swa: Option<u32>,
    pool: &mut PrefixPool<Saved>,
    budget: u64,
) {
    if n_swa.is_some_and(|w| tokens.len() > w as usize) {
        return;
    }
    let (pos_min, pos_max) = (
        ctx.kv_cache_seq_pos_min(seq as i32),
        ctx.kv_cache_seq_pos_max(seq as i32),
    );
    if pos_min < 0 || pos_max + 1 != tokens.len() as i32 {
        tracing::warn!(
            seq,
            pos_min,
            pos_max,
            tokens = tokens.len(),
            "a slot's cache and its record disagree: not saved"
        );
        return;
    }
    let state = match ctx.state_seq_get(seq as i32, LlamaStateSeqFlags::empty()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(seq, "cannot save a sequence's cache: {e}");
            return;
        }
    };
    let bytes = state.byte_len() as u64;
    if bytes > budget {
        return;
    }
    // llama.cpp writes a sliding-window layer's cells only inside the window of the last position
    // (`is_masked_swa`: masked once `pos_max - pos >= n_swa`).
    let window_start = n_swa.map_or(0, |w| pos_min.max(pos_max + 1 - w as i32));
    pool.insert(
        tokens.to_vec(),
        Saved {
            state: Arc::new(state),
            window_start,
        },
        bytes,
        EntryKind::Owned,
    );
    pool.evict_to(budget);
}

/// Where [`share_prefix`] looks besides the running sequences: the idle slots' caches and the
/// host-memory pool.
pub(crate) struct Shared<'a> {
    pub(crate) slots: &'a mut [Slot],
    pub(crate) pool: &'a mut PrefixPool<Saved>,
    /// Bytes the pool may hold ([`Serving::pool_budget`]).
    pub(crate) pool_budget: u64,
    /// [`Serving::copy_pending`].
    pub(crate) copy_pending: &'a mut bool,
}

/// Moves decoding sequence `s` to the free slot `to` ([`compaction_move`]), so that a decode step's rows
/// are consecutive sequence ids (one ubatch). Its KV stream is copied whole (`llama_memory_seq_cp` between
/// streams, applied at the next decode, which the caller must make before anything else writes to either
/// stream); the slot it leaves keeps its copy as an idle slot's cache of the conversation. What `to` held is
/// saved to the pool first when it is worth it, as an admission that takes a slot over saves it.
///
/// Errors: the copy could not be queued (nothing has changed then).
pub(crate) fn migrate(
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    n_swa: Option<u32>,
    shared: &mut Shared<'_>,
    s: &mut LlamaSequence,
    to: usize,
) -> Result<()> {
    let from = s.slot;
    let held = &shared.slots[to].cached;
    // No saves while an earlier copy may still land (see `Serving::copy_pending`).
    if held.len() >= MIN_SAVED_TOKENS && shared.pool_budget > 0 && !*shared.copy_pending {
        save(
            ctx,
            to as u32,
            held.tokens(),
            n_swa,
            shared.pool,
            shared.pool_budget,
        );
    }
    ctx.copy_kv_cache_seq(from as i32, to as i32, None, None)
        .map_err(|e| LlamaError::Runtime(format!("moving a sequence's cache: {e}")))?;
    *shared.copy_pending = true;
    // A busy slot's record is held by its sequence (`PrefixSlot::begin`) until the sequence ends.
    let last_used = shared.slots[from].last_used;
    let dst = &mut shared.slots[to];
    dst.cached = PrefixSlot::new();
    dst.busy = true;
    dst.last_used = last_used;
    let src = &mut shared.slots[from];
    src.busy = false;
    src.cached = s.kv.clone();
    s.slot = to;
    Ok(())
}

/// Where a longer prefix was found.
pub(crate) enum Source {
    /// In this llama.cpp sequence's KV (a running sequence or an idle slot).
    Sequence(usize),
    /// In the host-memory pool.
    Pool,
}

/// Where `batch[i]` can find a longer prefix of its prompt than its own slot kept (by at least
/// [`MIN_SHARED_GAIN`] tokens): another running sequence, an idle slot or the pool, with how many prompt
/// tokens it holds; the longest wins. A cache whose sliding window has moved past the prefix cannot be
/// cut back exactly and does not count. None: nowhere.
pub(crate) fn find_prefix(
    ctx: &llama_cpp_2::context::LlamaContext<'_>,
    loaded: &Loaded,
    shared: &Shared<'_>,
    batch: &[&mut LlamaSequence],
    i: usize,
) -> Option<(usize, Source)> {
    let (n_swa, n_ctx) = (loaded.n_swa, loaded.n_ctx);
    let s = &*batch[i];
    let ids: Vec<u32> = s.ids.iter().map(|t| t.0 as u32).collect();
    // The last prompt token is read for its logits, never taken from a cache.
    let limit = ids.len().saturating_sub(1);
    // Never into an image or clip (read whole): cut back before any window is checked.
    let common = |t: &[u32]| {
        let n = common_prefix_len(t, &ids).min(limit);
        media::whole_spans(n, &s.media)
    };
    let holds = |seq: usize, keep: usize| {
        keep > 0 && window_holds(ctx.kv_cache_seq_pos_min(seq as i32), keep, n_swa)
    };
    let running = batch
        .iter()
        .enumerate()
        .filter(|(j, o)| *j != i && !o.poisoned)
        .map(|(_, o)| (common(o.kv.tokens()), o.slot));
    let idle = shared
        .slots
        .iter()
        .enumerate()
        .filter(|(_, slot)| !slot.busy)
        .map(|(k, slot)| (common(slot.cached.tokens()), k));
    let in_streams = running
        .chain(idle)
        .filter(|&(keep, seq)| holds(seq, keep))
        .max_by_key(|&(keep, _)| keep)
        .map(|(keep, seq)| (keep, Source::Sequence(seq)));
    // Not while a stream copy may still be queued (see `Serving::copy_pending`): it would land on the
    // restore.
    let cut = |e: &Saved, keep: usize| {
        window_holds(e.window_start, media::whole_spans(keep, &s.media), n_swa).then_some(keep)
    };
    let in_pool = (!*shared.copy_pending)
        .then(|| shared.pool.peek_nearest(&ids, |_| true, cut))
        .flatten()
        .map(|keep| (media::whole_spans(keep, &s.media), Source::Pool));
    [in_streams, in_pool]
        .into_iter()
        .flatten()
        .filter(|(keep, _)| *keep >= s.prefilled + min_shared_gain(n_ctx))
        .max_by_key(|(keep, _)| *keep)
}

/// Copies what [`find_prefix`] found into `batch[i]`'s slot, cut back to the `keep` tokens it shares with
/// the prompt, so the sequence reads only the rest. A sequence's KV moves as its whole stream
/// (`llama_memory_seq_cp` between the per-sequence streams), which llama.cpp applies at the next decode:
/// the caller must decode before anything else writes to the streams involved. A pool entry is llama.cpp's
/// saved state of a sequence, restored at once (`llama_state_seq_set_data`). So concurrent requests that
/// open with one system prompt read it once, and a conversation whose slot was taken over comes back
/// without being read again (vLLM's and llama-server's prefix sharing). The copied KV is bit for bit the
/// source's, so an answer from it is the one the source's batches would give. A failed restore leaves the
/// sequence to read its whole prompt.
pub(crate) fn share_prefix(
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    n_swa: Option<u32>,
    shared: &mut Shared<'_>,
    s: &mut LlamaSequence,
    (keep, source): (usize, Source),
) -> Result<()> {
    let ids: Vec<u32> = s.ids.iter().map(|t| t.0 as u32).collect();
    let dst = s.slot as u32;
    let copied = match source {
        Source::Sequence(from) => {
            *shared.copy_pending = true;
            ctx.copy_kv_cache_seq(from as i32, dst as i32, None, None)
                .is_ok()
        }
        Source::Pool => {
            let cut = |e: &Saved, keep: usize| {
                window_holds(e.window_start, media::whole_spans(keep, &s.media), n_swa)
                    .then_some(keep)
            };
            match shared.pool.take_nearest(&ids, |_| true, cut) {
                Some(hit) => match ctx.state_seq_set(&hit.cache.state, dst as i32) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(seq = dst, "cannot restore a saved cache: {e}");
                        false
                    }
                },
                None => false,
            }
        }
    };
    let kept = trim(ctx, dst, if copied { keep } else { 0 })?;
    s.kv = PrefixSlot::new();
    s.kv.extend(ids[..kept].iter().copied());
    s.prefilled = kept;
    s.reused = kept;
    Ok(())
}
