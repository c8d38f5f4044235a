//! Helpers for parity tests and tools (`jemma generate --logits-out`): a prompt's logits, and a bare
//! session that replays token operations against llama.cpp without the serving core.

use super::*;

/// Runs the prompt through `ctx` (cleared first) and returns the logits of its last position; used by
/// parity tests against mlx-lm.
pub fn prompt_logits(
    loaded: &Loaded,
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    ids: &[LlamaToken],
    batch_size: usize,
) -> Result<Vec<f32>> {
    prefill(ctx, ids, batch_size)?;
    let _ = loaded;
    Ok(ctx
        .get_logits_ith(ids.len() as i32 - 1 - last_chunk_start(ids.len(), batch_size) as i32)
        .to_vec())
}

/// A loaded model with a context, for one-shot use (`jemma generate --engine llama`, parity tests).
pub struct Session {
    pub(crate) loaded: Loaded,
    /// The KV cache types and attention policy its contexts take (the config's, as the engine's).
    cache: CacheTypes,
    flash_attention: FlashAttention,
}

impl Session {
    /// Loads the GGUF.
    ///
    /// Errors: the GGUF does not load, or its caches cannot take the config's types
    /// ([`gguf::check_cache_types`]).
    pub fn load(config: &LlamaConfig) -> Result<Self> {
        gguf::check_cache_types(&config.model_path, config.cache)?;
        Ok(Self {
            loaded: load(config, |_| true)?,
            cache: config.cache,
            flash_attention: config.flash_attention,
        })
    }

    /// The loaded model.
    pub fn loaded(&self) -> &Loaded {
        &self.loaded
    }

    fn params(&self, n_ctx: usize, n_batch: usize, threads: i32) -> LlamaContextParams {
        LlamaContextParams::default()
            .with_type_k(self.cache.k)
            .with_type_v(self.cache.v)
            .with_flash_attention_policy(self.flash_attention.llama_type())
            .with_n_ctx(NonZeroU32::new(n_ctx as u32))
            .with_n_batch(n_batch as u32)
            .with_n_ubatch(n_batch as u32)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
    }

    pub(crate) fn context(
        &self,
        n_ctx: usize,
        n_batch: usize,
        threads: i32,
    ) -> Result<llama_cpp_2::context::LlamaContext<'_>> {
        let params = self.params(n_ctx, n_batch, threads);
        self.loaded
            .model
            .new_context(backend()?, params)
            .map_err(|e| LlamaError::Runtime(e.to_string()))
    }

    /// Logits of the last prompt position, and greedy continuation tokens, in one fresh context.
    pub fn logits_and_greedy(
        &self,
        ids: &[u32],
        steps: usize,
        threads: i32,
    ) -> Result<(Vec<f32>, Vec<u32>)> {
        let mut ctx = self.context(ids.len() + steps + 8, 512, threads)?;
        let toks: Vec<LlamaToken> = ids.iter().map(|&i| LlamaToken(i as i32)).collect();
        let logits = prompt_logits(&self.loaded, &mut ctx, &toks, 512)?;
        let mut out = vec![];
        let mut last = argmax(&logits);
        let mut batch = LlamaBatch::new(1, 1);
        for pos in toks.len()..toks.len() + steps {
            out.push(last);
            batch.clear();
            batch
                .add(LlamaToken(last as i32), pos as i32, &[0], true)
                .map_err(|e| LlamaError::Runtime(e.to_string()))?;
            ctx.decode(&mut batch)
                .map_err(|e| LlamaError::Runtime(format!("decode: {e}")))?;
            last = argmax(ctx.get_logits_ith(0));
        }
        Ok((logits, out))
    }
}

impl Session {
    /// The first round of the Gemma 4 assistant drafter at `assistant` (a `gemma4-assistant` GGUF) after
    /// this model read `ids` in a fresh context: the pending token (the prompt's greedy next token) and
    /// `k` greedy drafts after it, as the engine's MTP rounds make them ([`crate::mtp`]). Parity tests
    /// compare them with mlx-vlm's `draft_block`.
    ///
    /// Errors: the assistant does not load or does not fit this model; a decode fails.
    pub fn mtp_first_round(
        &self,
        assistant: &std::path::Path,
        ids: &[u32],
        k: usize,
        threads: i32,
    ) -> Result<(u32, Vec<u32>)> {
        let n_ctx = ids.len() + k + 8;
        let mut ctx = self.context(n_ctx, ids.len().max(1), threads)?;
        // Bound before the prompt is read, as the engine binds it at load: making the drafter's context
        // clears the cache it shares with the target.
        let drafter = load(&LlamaConfig::new(assistant.to_path_buf()), |_| true)?;
        let mut m = mtp::Mtp::bind(
            drafter,
            &mut ctx,
            self.params(n_ctx, 1, threads),
            jemma_serve::speculative::SpeculativeConfig::default(),
            1,
        )?;
        let toks: Vec<LlamaToken> = ids.iter().map(|&i| LlamaToken(i as i32)).collect();
        let logits = prompt_logits(&self.loaded, &mut ctx, &toks, ids.len().max(1))?;
        let pending = argmax(&logits);
        let h = mtp::hidden(&mut ctx, ids.len() as i32 - 1, m.n_embd)
            .ok_or_else(|| LlamaError::Runtime("the target gave no hidden state".into()))?;
        let drafts = m
            .propose_many(&[mtp::DraftRow {
                seq: 0,
                pending,
                pos0: ids.len() as i32,
                h: &h,
                k,
            }])?
            .remove(0);
        Ok((pending, drafts))
    }
}

/// One step of [`Session::replay`].
#[derive(Debug, Clone)]
pub enum ReplayOp {
    /// Decode these tokens as one batch, at the positions following the sequence's current end.
    Decode(Vec<u32>),
    /// Remove the positions from this one on (`llama_memory_seq_rm`).
    Trim(usize),
}

impl Session {
    /// The logits of the last decoded token after running `ops` in a fresh context of `n_ctx` tokens: a
    /// cold reference with chosen batch boundaries. llama.cpp's CPU kernels depend on a batch's size (a
    /// different split changes the low bits), so comparing the prefix cache with a cold run is exact only
    /// when both split the prompt the same way.
    ///
    /// Errors: a decode or trim fails, or no token was decoded.
    pub fn replay(&self, ops: &[ReplayOp], n_ctx: usize, threads: i32) -> Result<Vec<f32>> {
        let widest = ops
            .iter()
            .map(|o| match o {
                ReplayOp::Decode(t) => t.len(),
                ReplayOp::Trim(_) => 0,
            })
            .max()
            .unwrap_or(1)
            .max(1);
        let mut ctx = self.context(n_ctx, widest, threads)?;
        let mut pos = 0usize;
        let mut last = None;
        for op in ops {
            match op {
                ReplayOp::Decode(toks) => {
                    let mut batch = LlamaBatch::new(toks.len().max(1), 1);
                    for (i, &t) in toks.iter().enumerate() {
                        batch
                            .add(
                                LlamaToken(t as i32),
                                (pos + i) as i32,
                                &[0],
                                i + 1 == toks.len(),
                            )
                            .map_err(|e| LlamaError::Runtime(e.to_string()))?;
                    }
                    ctx.decode(&mut batch)
                        .map_err(|e| LlamaError::Runtime(format!("decode: {e}")))?;
                    pos += toks.len();
                    last = Some(ctx.get_logits_ith(batch.n_tokens() - 1).to_vec());
                }
                ReplayOp::Trim(at) => {
                    ctx.clear_kv_cache_seq(Some(0), Some(*at as u32), None)
                        .map_err(|e| LlamaError::Runtime(e.to_string()))?;
                    pos = *at;
                }
            }
        }
        last.ok_or_else(|| LlamaError::InvalidRequest("nothing was decoded".into()))
    }
}

impl Session {
    /// For each position of `ids`, the argmax of the next-token logits and its margin over the runner-up
    /// (one forward pass over the whole sequence, teacher-forced). Parity tests use the margin to tell a
    /// real mismatch from a near-tie that float rounding may flip.
    pub fn teacher_forced(&self, ids: &[u32], threads: i32) -> Result<Vec<(u32, f32)>> {
        let n = ids.len();
        let mut ctx = self.context(n + 8, n.max(1), threads)?;
        let mut batch = LlamaBatch::new(n.max(1), 1);
        for (i, &t) in ids.iter().enumerate() {
            batch
                .add(LlamaToken(t as i32), i as i32, &[0], true)
                .map_err(|e| LlamaError::Runtime(e.to_string()))?;
        }
        ctx.decode(&mut batch)
            .map_err(|e| LlamaError::Runtime(format!("decode: {e}")))?;
        Ok((0..n)
            .map(|i| {
                let l = ctx.get_logits_ith(i as i32);
                let best = argmax(l);
                let second = l
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j as u32 != best)
                    .map(|(_, v)| *v)
                    .fold(f32::NEG_INFINITY, f32::max);
                (best, l[best as usize] - second)
            })
            .collect())
    }
}
