//! The llama.cpp runner the serving core drives: admission into a slot (llama.cpp sequence), chunked
//! prefill, one batched decode step for every running sequence, and the sequences' decoding state.

use super::*;
use jemma_serve::budget::prompt_read;

/// Whether a prompt read that does not fit a step's budget is cut to what is left
/// ([`jemma_serve::budget::prompt_read`]): no. llama.cpp's CPU kernels switch by row count, so a prompt
/// read at other chunk boundaries than alone gives other numbers (a seeded Q8_0 answer in
/// `batched_answers_equal_lone_answers_on_every_fixture` left its lone twin when it was tried).
const CUT_READS: bool = false;

/// A loaded GGUF with its llama.cpp context (which borrows the model: one self-referential cell), and one
/// slot per llama.cpp sequence: the serving core's record of the tokens whose KV that sequence holds (its
/// prefix cache entry) and whether a request is using it.
pub(crate) struct Serving {
    /// The mmproj's towers; declared before `cell` so that it is dropped before the model it points to.
    pub(crate) mtmd: Option<media::Mtmd>,
    /// What drafts, when speculative decoding is configured; declared before `cell` too, as an assistant
    /// drafter's context views the target's.
    pub(crate) drafts: Option<speculative::Drafter>,
    pub(crate) cell: SessionCell,
    pub(crate) slots: Vec<Slot>,
    /// Advances at each admission; orders the slots by last use.
    pub(crate) clock: u64,
    /// Sequence caches saved in host memory when their slot was taken over (llama-server's `--cache-ram`).
    pub(crate) pool: PrefixPool<Saved>,
    /// Bytes the pool may hold ([`LlamaConfig::prefix_cache_bytes`]).
    pub(crate) pool_budget: u64,
    /// A KV stream copy was queued (llama.cpp applies it at the next decode) and nothing has decoded
    /// since: set by [`share_prefix`] and [`migrate`], cleared by the decode that applies it (a plain step,
    /// a speculative verification, the step's batched prompt read or a media read). While set, nothing
    /// reads or writes a stream's buffer outside a decode (saves to and restores from the pool), which the
    /// copy could land on afterwards. A failed decode leaves it set, as does a step that queued a copy and
    /// then decoded nothing.
    pub(crate) copy_pending: bool,
}

/// A sequence's cache saved in host memory (the pool's entry): llama.cpp's serialised state of that
/// sequence, which any slot can be restored from.
#[derive(Clone)]
pub(crate) struct Saved {
    pub(crate) state: Arc<SeqState>,
    /// The lowest position the restored sliding-window layers hold: llama.cpp serialises only the cells
    /// inside the window of the sequence's last position, so a restored cache can be cut back only as far
    /// as that window allows (see [`window_holds`]).
    pub(crate) window_start: i32,
}

/// Entries the host-memory pool holds at most (it is bounded in bytes first).
pub(crate) const POOL_ENTRIES: usize = 64;

/// A slot's conversation is saved to the pool when a request takes the slot over only if it holds at
/// least this many tokens that the request does not keep: a shorter one is cheaper to read again than to
/// save and restore.
pub(crate) const MIN_SAVED_TOKENS: usize = 64;

/// A prefill takes another sequence's or the pool's cache only for at least this many more prompt tokens
/// than its own slot keeps, and for at least 1/64 of the context: a copy moves a whole KV stream (every
/// cell of every layer, whatever the prefix's length), which for a few tokens costs more than reading
/// them. A heuristic: memory copies at ~10 GB/s against prefill at a few hundred to a few thousand tokens
/// per second.
pub(crate) const MIN_SHARED_GAIN: usize = 32;

/// A decoding sequence moves next to the others ([`compaction_move`]) only if it may still decode at least
/// this many tokens: the move copies its whole KV stream (about what one more pass over the weights costs
/// on a small model: tens of MB at ~10 GB/s), and gains one pass a step from then on, so a sequence about to
/// end would pay more than it saves.
pub(crate) const MIN_STEPS_TO_MOVE: usize = 4;

/// [`MIN_SHARED_GAIN`] for a context of `n_ctx` tokens.
pub(crate) fn min_shared_gain(n_ctx: u32) -> usize {
    MIN_SHARED_GAIN.max(n_ctx as usize / 64)
}

/// Whether a sequence whose sliding-window layers hold positions from `window_start` on can keep its
/// first `keep` positions and go on from there: the next position's window must still be there
/// (llama-server's check, `pos_min > max(0, n_past - n_swa)` refuses). Always for a model without
/// sliding-window layers.
pub(crate) fn window_holds(window_start: i32, keep: usize, n_swa: Option<u32>) -> bool {
    n_swa.is_none_or(|w| window_start <= (keep as i64 - w as i64).max(0) as i32)
}

/// One llama.cpp sequence (its own KV stream, `kv_unified = false`) is one of the core's cache slots.
pub(crate) type Slot = CacheSlot;

pub(crate) type Context<'a> = llama_cpp_2::context::LlamaContext<'a>;

self_cell::self_cell!(
    pub(crate) struct SessionCell {
        owner: Loaded,
        #[covariant]
        dependent: Context,
    }
);

/// The llama.cpp engine as the serving core drives it: up to `parallel` sequences in one context, decoded
/// together.
pub(crate) struct LlamaRunner {
    pub(crate) config: LlamaConfig,
    pub(crate) threads: i32,
    /// Sequences the next load serves: `config.parallel`, halved while the memory budget refuses that
    /// many ([`ModelRunner::shrink`]); set again from the configuration at each plan.
    pub(crate) planned: u32,
    /// What speculative decoding did since the model loaded.
    pub(crate) speculated: SpeculativeStats,
    /// The most sequences verified together since the model loaded.
    pub(crate) largest_verify: usize,
    /// Host memory for saved sequence caches at the current plan, bytes.
    pub(crate) pool_budget: u64,
    /// The pool's entries and bytes after the last admission or step, for [`ModelRunner::refresh`].
    pub(crate) pool_held: (usize, u64),
}

impl LlamaRunner {
    pub(crate) fn parallel(&self) -> u32 {
        self.planned.clamp(1, MAX_PARALLEL)
    }

    /// Tokens one `llama_decode` takes: the prefill chunk, and at least one decode row per sequence and,
    /// with an mmproj, one whole image and its two markers (an image is decoded in one batch: its soft
    /// tokens attend to each other on the larger Gemma 4 models).
    pub(crate) fn batch(&self) -> u32 {
        let image = if self.config.mmproj_path.is_some() {
            self.config.image_soft_tokens as u32 + 2
        } else {
            0
        };
        self.config.batch_size.max(self.parallel()).max(image)
    }

    pub(crate) fn footprint(&self) -> Result<u64, LoadError> {
        let target = gguf::footprint(
            &self.config.model_path,
            self.config.context_length,
            self.batch(),
            self.parallel(),
            self.config.cache,
            self.config.flash_attention,
        )
        .map_err(|e| LoadError::Failed(e.to_string()))?;
        // The draft's weights and a context of the target's shape (one sequence per slot).
        let draft = match &self.config.speculative {
            Some(sp) => {
                let bytes = if mtp::is_assistant(&sp.draft_model).unwrap_or(false) {
                    // An assistant holds no KV (it reads the target's): its weights, and its compute and
                    // output buffers as a model of its size would need them for one token per sequence.
                    gguf::footprint(
                        &sp.draft_model,
                        Some(1),
                        self.parallel(),
                        self.parallel(),
                        CacheTypes::default(),
                        self.config.flash_attention,
                    )
                } else {
                    gguf::served_context_of(&self.config.model_path, self.config.context_length)
                        .and_then(|n| {
                            // Its context takes the target's parameters, cache types included.
                            gguf::footprint(
                                &sp.draft_model,
                                Some(n),
                                self.config.batch_size,
                                self.parallel(),
                                self.config.cache,
                                self.config.flash_attention,
                            )
                        })
                };
                match bytes {
                    Ok(b) => b,
                    // A found draft that cannot be read is left out at load ([`LlamaRunner::drafter`]).
                    Err(_) if sp.optional => 0,
                    Err(e) => {
                        return Err(LoadError::Failed(format!(
                            "draft model {}: {e}",
                            sp.draft_model.display()
                        )));
                    }
                }
            }
            None => 0,
        };
        // The mmproj's towers: their weights and what encoding one image takes.
        let mmproj = match &self.config.mmproj_path {
            Some(mm) => match media::footprint(mm, self.config.image_soft_tokens) {
                Ok(b) => b,
                Err(_) if self.config.mmproj_optional => 0,
                Err(e) => return Err(LoadError::Failed(e.to_string())),
            },
            None => 0,
        };
        Ok(target + draft + mmproj + self.pool_budget()?)
    }

    /// Host memory for saved sequence caches at the current plan ([`LlamaConfig::prefix_cache_bytes`]).
    pub(crate) fn pool_budget(&self) -> Result<u64, LoadError> {
        match self.config.prefix_cache_bytes {
            Some(b) => Ok(b),
            None => {
                let path = &self.config.model_path;
                let kv = |context| {
                    gguf::kv_bytes_per_sequence(
                        path,
                        context,
                        self.config.batch_size,
                        self.config.cache,
                        self.config.flash_attention,
                    )
                };
                // The pool keeps only conversations within the sliding window (`save`).
                let window =
                    gguf::sliding_window(path).and_then(|w| w.map(|w| kv(Some(w))).transpose());
                kv(self.config.context_length)
                    .and_then(|all| Ok(default_prefix_cache_bytes(all, window?)))
                    .map_err(|e| LoadError::Failed(e.to_string()))
            }
        }
    }
}

impl LlamaRunner {
    /// Loads the draft of `sp` for the target in `cell` (whose context parameters are `ctx_params`,
    /// serving `parallel` sequences): a Gemma 4 assistant bound to the target's context, or a draft
    /// model in a context of its own.
    ///
    /// Errors: the draft does not load, has another vocabulary, or (an assistant) reads another width.
    fn drafter(
        &self,
        sp: &LlamaSpeculative,
        cell: &mut SessionCell,
        ctx_params: LlamaContextParams,
        parallel: u32,
    ) -> Result<speculative::Drafter, LoadError> {
        let why =
            |e: String| LoadError::Failed(format!("draft model {}: {e}", sp.draft_model.display()));
        let backend = backend().map_err(|e| why(e.to_string()))?;
        let draft_config = LlamaConfig {
            model_path: sp.draft_model.clone(),
            context_length: Some(cell.borrow_owner().n_ctx),
            speculative: None,
            ..self.config.clone()
        };
        let d = load(&draft_config, |_| true).map_err(|e| why(e.to_string()))?;
        speculative::check_vocabulary(cell.borrow_owner(), &d).map_err(|e| why(e.to_string()))?;
        if mtp::is_assistant(&sp.draft_model).map_err(|e| why(e.to_string()))? {
            let m = cell
                .with_dependent_mut(|_, ctx| {
                    mtp::Mtp::bind(
                        d,
                        ctx,
                        // A draft step reads one token per drafting sequence: a batch of `parallel`
                        // keeps its output buffer (a row of logits per token) small.
                        ctx_params.with_n_batch(parallel).with_n_ubatch(parallel),
                        sp.config.clone(),
                        self.config.batch_size as usize,
                    )
                })
                .map_err(|e| why(e.to_string()))?;
            tracing::info!(draft = %sp.draft_model.display(), "assistant (MTP) drafter loaded");
            Ok(speculative::Drafter::Mtp(m))
        } else {
            let cell =
                speculative::DraftCell::try_new(d, |l| l.model.new_context(backend, ctx_params))
                    .map_err(|e| why(format!("creating its context: {e}")))?;
            tracing::info!(draft = %sp.draft_model.display(), "draft GGUF loaded");
            Ok(speculative::Drafter::Model(speculative::Drafts {
                cell,
                held: vec![vec![]; parallel as usize],
                config: sp.config.clone(),
                batch_size: self.config.batch_size as usize,
            }))
        }
    }
}

/// A request in the running batch: its media still being prepared, or admitted to a slot.
pub(crate) enum Admission {
    /// Its images and clips are being prepared on a thread of their own ([`media::Preparation`]); it
    /// holds no slot yet (the host runs at most one request per slot, so one is free when they are ready).
    Preparing(Box<Pending>),
    /// Admitted: reading its prompt or decoding.
    Running(Box<LlamaSequence>),
    /// Refused once its media were prepared (its failure is in its step's output).
    Refused,
}

/// A request waiting for its media ([`Admission::Preparing`]).
pub(crate) struct Pending {
    pub(crate) request: Request,
    /// Its prompt's ids, one placeholder per image, frame and clip ([`plan`]).
    pub(crate) ids: Vec<LlamaToken>,
    /// Which placeholder tokens of `ids` stand for media ([`Plan::places`]).
    pub(crate) places: media::Places,
    pub(crate) preparation: media::Preparation,
}

/// How long a step with no admitted sequence waits for a request's media before handing back to the host
/// (which admits newcomers between steps): short enough not to delay them, long enough not to spin.
pub(crate) const PREPARING_WAIT: Duration = Duration::from_millis(5);

impl ModelRunner for LlamaRunner {
    type Model = Serving;
    type Request = Request;
    type Summary = Summary;
    type Info = LlamaInfo;
    type Sequence = Admission;

    fn plan(&mut self, info: &mut LlamaInfo) -> Result<Option<u64>, LoadError> {
        self.planned = self.config.parallel;
        let bytes = self.footprint()?;
        info.footprint_bytes = Some(bytes);
        // With layers on a discrete GPU (CUDA: the heavy tier) the weights and KV cache live in VRAM, which
        // the host's budget does not govern, while the saved caches stay in host memory; Metal shares the
        // host's memory, so there everything counts.
        if discrete_gpu() && self.config.gpu_layers != Some(0) {
            return Ok(Some(self.pool_budget()?));
        }
        Ok(Some(bytes))
    }

    fn shrink(&mut self, info: &mut LlamaInfo) -> Option<u64> {
        if self.parallel() <= 1 {
            return None;
        }
        self.planned = self.parallel() / 2;
        let bytes = self.footprint().ok()?;
        info.footprint_bytes = Some(bytes);
        Some(bytes)
    }

    fn load(
        &mut self,
        progress: &Progress,
        info: &mut LlamaInfo,
    ) -> Result<(Serving, usize), LoadError> {
        let progress = progress.clone();
        let loaded = load(&self.config, move |p| {
            progress(p);
            true
        })
        .map_err(|e| LoadError::Failed(e.to_string()))?;
        let threads = self.threads;
        let batch_threads = self
            .config
            .batch_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()) as i32);
        let parallel = self.parallel();
        // One KV stream per sequence (kv_unified = false), each holding the whole served context: a
        // sequence's cells sit where they would if it ran alone, so batched answers equal lone ones, and
        // attention reads only the sequence's own cells (llama.cpp's advice when sequences do not share a
        // long prefix). llama.cpp divides n_ctx among the streams.
        let ctx_params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(loaded.n_ctx * parallel))
            .with_n_seq_max(parallel)
            .with_kv_unified(false)
            // Sliding-window layers keep every cell (the C API's default, made explicit), not just their
            // window and a batch (llama-server's `swa_full = false`): then a slot cut back past the window
            // still holds the window it resumes with. (Host-memory saves are no help there: llama.cpp
            // restores a state past the window inexactly, so none is kept; see `save`.) The cost is KV
            // memory, which the footprint counts (`gguf::footprint`).
            .with_swa_full(true)
            // A decode step carries one token per sequence: the batch must hold them all.
            .with_n_batch(self.batch())
            .with_n_ubatch(self.batch())
            .with_n_threads(threads)
            .with_n_threads_batch(batch_threads)
            .with_flash_attention_policy(self.config.flash_attention.llama_type())
            .with_type_k(self.config.cache.k)
            .with_type_v(self.config.cache.v);
        let backend = backend().map_err(|e| LoadError::Failed(e.to_string()))?;
        let n_ctx = loaded.n_ctx;
        let gpu = self
            .config
            .gpu_layers
            .unwrap_or(if gpu_offload() {
                loaded.model.n_layer()
            } else {
                0
            })
            .min(loaded.model.n_layer());
        let bytes = loaded.model.size();
        let mut cell =
            SessionCell::try_new(loaded, |l| l.model.new_context(backend, ctx_params.clone()))
                .map_err(|e| {
                    LoadError::Failed(format!(
                        "creating the context ({n_ctx} tokens × {parallel} sequences): {e}"
                    ))
                })?;
        tracing::info!(model = %self.config.model_path.display(), n_ctx, parallel, threads, gpu_layers = gpu, "GGUF loaded");
        info.gpu_layers = gpu;
        info.threads = threads;
        info.model_bytes = bytes;
        let drafts = match &self.config.speculative {
            None => None,
            Some(sp) => match self.drafter(sp, &mut cell, ctx_params, parallel) {
                Ok(d) => {
                    // A load after one whose found drafter failed (a reload after keep-alive) reports it
                    // again.
                    let kind = match &d {
                        speculative::Drafter::Mtp(_) => "mtp_assistant",
                        speculative::Drafter::Model(_) => "draft_model",
                    };
                    info.speculative
                        .get_or_insert_with(|| SpeculativeInfo::new(sp.draft_model.clone(), kind));
                    Some(d)
                }
                Err(e) if sp.optional => {
                    tracing::warn!(draft = %sp.draft_model.display(), "the drafter found next to the model did not load, so it decodes plainly: {e}");
                    info.speculative = None;
                    None
                }
                Err(e) => return Err(e),
            },
        };
        let mtmd = match &self.config.mmproj_path {
            Some(mm) => match media::Mtmd::load(
                mm,
                &cell.borrow_owner().model,
                batch_threads,
                (self.config.image_soft_tokens, self.config.video_soft_tokens),
                self.batch(),
            ) {
                Ok(m) => Some(m),
                Err(e) if self.config.mmproj_optional => {
                    tracing::warn!(mmproj = %mm.display(), "the mmproj found for the model did not load, so it serves text: {e}");
                    None
                }
                Err(e) => return Err(LoadError::Failed(e.to_string())),
            },
            None => None,
        };
        // What the loaded towers take (the metadata read at start may promise more than loaded).
        info.input_modalities = std::iter::once(Modality::Text)
            .chain(mtmd.as_ref().map_or(vec![], |m| {
                let (sees, hears, sees_video) = m.modalities();
                [
                    sees.then_some(Modality::Image),
                    hears.then_some(Modality::Audio),
                    sees_video.then_some(Modality::Video),
                ]
                .into_iter()
                .flatten()
                .collect()
            }))
            .collect();
        let slots = (0..parallel).map(|_| Slot::default()).collect();
        self.pool_budget = self.pool_budget()?;
        Ok((
            Serving {
                mtmd,
                drafts,
                cell,
                slots,
                clock: 0,
                pool: PrefixPool::new(POOL_ENTRIES),
                pool_budget: self.pool_budget,
                copy_pending: false,
            },
            n_ctx as usize,
        ))
    }

    fn max_sequences(&self, model: &Serving) -> usize {
        model.slots.len()
    }

    fn admit(
        &mut self,
        model: &mut Serving,
        request: Request,
        _context_length: usize,
    ) -> Result<Admission, EngineFailure> {
        let loaded = model.cell.borrow_owner();
        let plan = plan(loaded, model.mtmd.as_ref(), &request)?;
        let Some(mtmd) = model.mtmd.as_ref().filter(|_| plan.has_media()) else {
            let placed = (plan.ids, vec![]);
            return self
                .admit_placed(model, request, placed)
                .map(Admission::Running);
        };
        // Refused now rather than after its media are prepared.
        request
            .sampling
            .validate(loaded.model.n_vocab() as usize)
            .map_err(LlamaError::InvalidRequest)?;
        match media::Preparation::start(mtmd.towers(), plan.images, plan.audio) {
            Ok(preparation) => Ok(Admission::Preparing(Box::new(Pending {
                request,
                ids: plan.ids,
                places: plan.places,
                preparation,
            }))),
            Err((images, audio)) => {
                let placed =
                    mtmd.towers()
                        .prepare_now((&images, &audio))
                        .and_then(|(images, audio)| {
                            mtmd.place(plan.ids, &plan.places, images, audio)
                        })?;
                self.admit_placed(model, request, placed)
                    .map(Admission::Running)
            }
        }
    }

    fn prompt_tokens(
        &mut self,
        model: &mut Serving,
        request: &Request,
    ) -> Result<usize, EngineFailure> {
        placed_ids(model.cell.borrow_owner(), model.mtmd.as_ref(), request)
            .map(|(ids, _)| ids.len())
            .map_err(Into::into)
    }

    /// Counts as [`ModelRunner::prompt_tokens`] does, but prepares a prompt's media (to learn how many
    /// positions each takes) on the towers' counting thread, not on the model thread.
    fn count(
        &mut self,
        model: &mut Serving,
        request: Request,
        reply: tokio::sync::oneshot::Sender<std::result::Result<usize, EngineFailure>>,
    ) {
        let mtmd = model.mtmd.as_ref();
        let plan = match plan(model.cell.borrow_owner(), mtmd, &request) {
            Ok(plan) => plan,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        match mtmd {
            Some(m) if plan.has_media() => {
                // `plan` checked that each item has its placeholder: each becomes its positions.
                let text = (plan.ids.len()).saturating_sub(plan.images.len() + plan.audio.len());
                m.towers().count_later(plan.images, plan.audio, text, reply);
            }
            _ => {
                let _ = reply.send(Ok(plan.ids.len()));
            }
        }
    }

    fn step(
        &mut self,
        model: &mut Serving,
        batch: &mut [&mut Admission],
        out: &mut [SeqOutput<Summary>],
    ) -> Result<(), EngineFailure> {
        self.admit_prepared(model, batch, out);
        // The admitted sequences step; those still preparing sit it out (their outputs stay empty).
        let at: Vec<usize> = (0..batch.len())
            .filter(|&i| matches!(*batch[i], Admission::Running(_)))
            .collect();
        if at.is_empty() {
            return Ok(());
        }
        let mut running: Vec<&mut LlamaSequence> = batch
            .iter_mut()
            .filter_map(|a| match &mut **a {
                Admission::Running(s) => Some(&mut **s),
                _ => None,
            })
            .collect();
        let mut outs: Vec<SeqOutput<Summary>> =
            at.iter().map(|&i| std::mem::take(&mut out[i])).collect();
        if let Err(e) = self.step_running(model, &mut running, &mut outs) {
            // The failure ends the sequences that took part in the step, not those still preparing.
            tracing::warn!(error = %e, sequences = at.len(), "step failed");
            for o in outs.iter_mut() {
                o.fail(e.clone());
            }
        }
        for (i, o) in at.into_iter().zip(outs) {
            out[i] = o;
        }
        Ok(())
    }

    fn release(&mut self, model: &mut Serving, seq: Admission) {
        // A request still preparing holds no slot: dropping it cancels what is left of its preparation.
        let Admission::Running(seq) = seq else {
            return;
        };
        let slot = &mut model.slots[seq.slot];
        slot.busy = false;
        if seq.poisoned {
            model.cell.with_dependent_mut(|_, ctx| {
                let _ = ctx.clear_kv_cache_seq(Some(seq.slot as u32), None, None);
            });
        } else {
            // Finished or cancelled cleanly: the record describes the sequence's KV again.
            slot.cached.commit(seq.kv);
        }
    }

    fn unload(&mut self, model: Serving) {
        // The pool goes with the model: `/health` says so at the next refresh.
        self.pool_held = (0, 0);
        drop(model);
    }

    fn refresh(&mut self, info: &mut LlamaInfo) {
        if let Some(sp) = &mut info.speculative {
            sp.update(self.speculated);
        }
        info.largest_verify_batch = self.largest_verify;
        (info.prefix_cache_entries, info.prefix_cache_bytes) = self.pool_held;
    }

    fn tally(s: &Summary) -> Tally {
        Tally {
            prompt_tokens: s.prompt_tokens,
            cached_tokens: s.cached_tokens,
            completion_tokens: s.completion_tokens,
            prefill_tps: s.prefill_tps,
            decode_tps: s.decode_tps,
        }
    }
}

impl LlamaRunner {
    /// Admits a request whose prompt has its media placed ([`placed_ids`]) into a slot.
    fn admit_placed(
        &mut self,
        model: &mut Serving,
        request: Request,
        placed: (Vec<LlamaToken>, Vec<media::MediaSpan>),
    ) -> Result<Box<LlamaSequence>, EngineFailure> {
        let Serving {
            cell,
            slots,
            clock,
            drafts,
            pool,
            pool_budget,
            copy_pending,
            ..
        } = model;
        *clock += 1;
        let now = *clock;
        // No saves while a stream copy may still land on a slot (see `Serving::copy_pending`).
        let budget = if *copy_pending { 0 } else { *pool_budget };
        let admitted = cell.with_dependent_mut(|loaded, ctx| {
            LlamaSequence::admit(loaded, ctx, slots, (pool, budget), now, request, placed)
        });
        self.pool_held = (pool.len(), pool.bytes());
        let mut seq = admitted.map_err(EngineFailure::from)?;
        // A seeded sampled request decodes plainly: a verification's batch rounds the logits otherwise than
        // a one-token step, which can move a seeded draw, and a seed promises the same tokens every time.
        // A grammar-constrained request decodes plainly too, as on the MLX engine (its mask is built per
        // position on the host).
        // A prompt with media too: a draft model cannot see or hear it, and an assistant drafts from the
        // hidden state of a token, which a media decode does not give (llama.cpp's driver skips them too).
        // A thinking budget too: a round could run past it.
        if !(seq.sampled && seq.seeded)
            && seq.grammar.is_none()
            && seq.thinking.is_none()
            && seq.media.is_empty()
        {
            seq.spec = drafts.as_ref().map(|d| Controller::new(d.config().clone()));
            seq.hidden_width = drafts.as_ref().map_or(0, |d| d.hidden_width());
        }
        Ok(Box::new(seq))
    }

    /// Admits the requests of `batch` whose media are now prepared; a refusal ends its request in its
    /// `out` entry. When no request of the batch runs, waits a little ([`PREPARING_WAIT`]) for the first
    /// one preparing rather than have the host spin.
    fn admit_prepared(
        &mut self,
        model: &mut Serving,
        batch: &mut [&mut Admission],
        out: &mut [SeqOutput<Summary>],
    ) {
        let mut wait = if batch.iter().any(|a| matches!(**a, Admission::Running(_))) {
            Duration::ZERO
        } else {
            PREPARING_WAIT
        };
        for (a, o) in batch.iter_mut().zip(out.iter_mut()) {
            let Admission::Preparing(p) = &mut **a else {
                continue;
            };
            let Some(prepared) = p.preparation.take(std::mem::take(&mut wait)) else {
                continue;
            };
            let Admission::Preparing(p) = std::mem::replace(&mut **a, Admission::Refused) else {
                continue;
            };
            let Pending {
                request,
                ids,
                places,
                ..
            } = *p;
            let placed = prepared.and_then(|(images, audio)| match model.mtmd.as_ref() {
                Some(m) => m.place(ids, &places, images, audio),
                None => Err(LlamaError::Runtime("the mmproj is gone".into())),
            });
            match placed
                .map_err(EngineFailure::from)
                .and_then(|placed| self.admit_placed(model, request, placed))
            {
                Ok(seq) => **a = Admission::Running(seq),
                Err(e) => {
                    tracing::warn!(error = %e, "request refused");
                    o.fail(e);
                }
            }
        }
    }

    /// One step of the admitted sequences (see [`step`]).
    fn step_running(
        &mut self,
        model: &mut Serving,
        batch: &mut [&mut LlamaSequence],
        out: &mut [SeqOutput<Summary>],
    ) -> Result<(), EngineFailure> {
        let chunk = self.config.batch_size as usize;
        let Serving {
            mtmd,
            cell,
            drafts,
            slots,
            pool,
            pool_budget,
            copy_pending,
            ..
        } = model;
        let (speculated, largest_verify) = (&mut self.speculated, &mut self.largest_verify);
        let result = cell.with_dependent_mut(|loaded, ctx| {
            step(
                loaded,
                (ctx, mtmd.as_ref()),
                (drafts.as_mut(), speculated, largest_verify),
                Shared {
                    slots,
                    pool,
                    pool_budget: *pool_budget,
                    copy_pending: &mut *copy_pending,
                },
                batch,
                out,
                chunk,
            )
        });
        self.pool_held = (pool.len(), pool.bytes());
        if result.is_err() {
            // What the failed decode left in these sequences' KV is unknown: their slots start clean.
            for seq in batch.iter_mut() {
                seq.poisoned = true;
            }
        }
        result.map_err(Into::into)
    }
}

/// A request's prompt before its media are placed: its token ids (videos expanded, each image, frame and
/// clip still one placeholder) and its images (and video frames) and clips, in prompt order.
pub(crate) struct Plan {
    pub(crate) ids: Vec<LlamaToken>,
    pub(crate) images: Vec<media::Item>,
    pub(crate) audio: Vec<media::Item>,
    /// Which placeholder tokens of `ids` stand for the items (the others are text).
    pub(crate) places: media::Places,
}

impl Plan {
    pub(crate) fn has_media(&self) -> bool {
        !self.images.is_empty() || !self.audio.is_empty()
    }
}

/// The prompt of `request` as the sequence holds it: its token ids with each image, clip and video frame
/// in the place of its placeholder ([`plan`], then [`media::Mtmd::place`]), and where they are. Prepares
/// the media on the calling thread: admission prepares them on a thread of their own
/// ([`media::Preparation`]).
///
/// Errors: those of [`plan`]; an image or clip libmtmd refuses.
pub(crate) fn placed_ids(
    loaded: &Loaded,
    mtmd: Option<&media::Mtmd>,
    request: &Request,
) -> Result<(Vec<LlamaToken>, Vec<media::MediaSpan>)> {
    let plan = plan(loaded, mtmd, request)?;
    match mtmd {
        Some(m) if plan.has_media() => {
            let prepared = m.towers().prepare_now((&plan.images, &plan.audio))?;
            m.place(plan.ids, &plan.places, prepared.0, prepared.1)
        }
        _ => Ok((plan.ids, vec![])),
    }
}

/// `request`'s prompt tokenized, checked and ready for its media to be prepared and placed: the token ids
/// with one placeholder per image, clip and video frame (videos expanded first,
/// [`media::expand_videos`]), and the items in their order. Cheap: tokenizing only.
///
/// Errors: a prompt that does not tokenize; media without an mmproj that takes it, or not matching the
/// placeholders; a prompt that ends with media; videos in a prompt of token ids (their frames are stamped
/// with their times in text).
pub(crate) fn plan(loaded: &Loaded, mtmd: Option<&media::Mtmd>, request: &Request) -> Result<Plan> {
    let no_media =
        request.images.is_empty() && request.audio.is_empty() && request.videos.is_empty();
    let ids = if request.videos.is_empty() {
        loaded.prompt_ids(&request.prompt)?
    } else {
        // Expanded below, from the text.
        vec![]
    };
    let n_vocab = loaded.model.n_vocab();
    if let Some(bad) = ids.iter().find(|t| t.0 < 0 || t.0 >= n_vocab) {
        return Err(LlamaError::InvalidRequest(format!(
            "token id {} is outside the vocabulary ({n_vocab})",
            bad.0
        )));
    }
    if no_media {
        return Ok(Plan {
            ids,
            images: vec![],
            audio: vec![],
            places: media::Places::default(),
        });
    }
    let what = if !request.images.is_empty() {
        "images"
    } else if !request.videos.is_empty() {
        "video"
    } else {
        "audio"
    };
    let Some(mtmd) = mtmd else {
        return Err(LlamaError::InvalidRequest(format!(
            "this model cannot take {what}: it is served without an mmproj GGUF (its vision and audio \
             towers; set the tier's `mmproj`)"
        )));
    };
    let (sees, hears, sees_video) = mtmd.modalities();
    if (!request.images.is_empty() && !sees) || (!request.audio.is_empty() && !hears) {
        return Err(LlamaError::InvalidRequest(format!(
            "this model cannot take {}: its mmproj has no {} tower",
            if sees { "audio" } else { "images" },
            if sees { "audio" } else { "vision" }
        )));
    }
    if !request.videos.is_empty() && !sees_video {
        return Err(LlamaError::InvalidRequest(
            "this model cannot see video: it needs a vision tower and Gemma 4's <|video|> token"
                .into(),
        ));
    }
    let (ids, images, audio, places) = if request.videos.is_empty() {
        let images = request.images.iter().cloned().map(media::Item::Image);
        let audio = request.audio.iter().cloned().map(media::Item::Audio);
        let places = mtmd.places(&ids, !request.images.is_empty(), !request.audio.is_empty());
        (ids, images.collect(), audio.collect(), places)
    } else {
        let text = loaded.prompt_text(&request.prompt)?.ok_or_else(|| {
            LlamaError::InvalidRequest(
                "videos need a chat or text prompt (their frames are stamped with their times in text)"
                    .into(),
            )
        })?;
        let (text, images, audio, places) = media::expand_videos(
            &text,
            &request.images,
            &request.audio,
            &request.videos,
            hears,
        )?;
        (
            loaded.tokenize_prompt(&request.prompt, &text),
            images,
            audio,
            places,
        )
    };
    mtmd.check_places(&ids, &places, images.len(), audio.len())?;
    if mtmd.ends_with_media(&ids, &places)? {
        return Err(LlamaError::InvalidRequest(
            "the prompt ends with media: the model reads the next token from the text after it"
                .into(),
        ));
    }
    Ok(Plan {
        ids,
        images,
        audio,
        places,
    })
}

pub(crate) fn last_chunk_start(n: usize, batch: usize) -> usize {
    (n.saturating_sub(1) / batch.max(1)) * batch.max(1)
}

pub(crate) fn prefill(
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    ids: &[LlamaToken],
    batch_size: usize,
) -> Result<LlamaBatch<'static>> {
    ctx.clear_kv_cache();
    decode_from(ctx, ids, 0, batch_size)
}

/// Decodes `ids[from..]` into sequence 0 at their positions, in batches of `batch_size`, with logits for
/// the last prompt token only (at the returned batch's last index).
pub(crate) fn decode_from(
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    ids: &[LlamaToken],
    from: usize,
    batch_size: usize,
) -> Result<LlamaBatch<'static>> {
    let mut batch = LlamaBatch::new(batch_size.max(1), 1);
    for (c, chunk) in ids[from..].chunks(batch_size.max(1)).enumerate() {
        batch.clear();
        let base = from + c * batch_size;
        for (i, &t) in chunk.iter().enumerate() {
            let pos = base + i;
            batch
                .add(t, pos as i32, &[0], pos == ids.len() - 1)
                .map_err(|e| LlamaError::Runtime(e.to_string()))?;
        }
        ctx.decode(&mut batch)
            .map_err(|e| LlamaError::Runtime(format!("decode: {e}")))?;
    }
    Ok(batch)
}

/// One request in the running batch: its llama.cpp sequence (slot), prompt, sampler chain and decoding
/// state.
pub(crate) struct LlamaSequence {
    /// The llama.cpp sequence id (and index of its slot).
    pub(crate) slot: usize,
    pub(crate) ids: Vec<LlamaToken>,
    /// Of `ids`, the soft tokens of its clips and videos' sound (`usage.prompt_tokens_details.audio_tokens`).
    pub(crate) audio_tokens: usize,
    /// Prompt tokens whose KV is in the sequence (reused or prefilled).
    pub(crate) prefilled: usize,
    /// Prompt tokens reused from the slot's previous request.
    pub(crate) reused: usize,
    /// The tokens whose KV the sequence holds (committed to the slot at release).
    pub(crate) kv: PrefixSlot,
    pub(crate) sampler: LlamaSampler,
    /// The grammar the answer follows (constrained decoding): each step's logits are masked to what it
    /// allows before the sampler runs, and each sampled token advances it.
    pub(crate) grammar: Option<jemma_constrain::TokenMatcher>,
    /// The answer's thinking budget, fed every token: when spent inside a thought, the next token is the
    /// thought's end.
    pub(crate) thinking: Option<jemma_serve::thinking::ThinkingBudget>,
    /// Greedy with nothing that changes the logits (no bias or penalty): the argmax is read off the
    /// logits directly while no grammar masks them.
    pub(crate) plain_greedy: bool,
    pub(crate) text: Utf8Stream,
    pub(crate) answer: OutputProcessor,
    /// Generated tokens; the last one is decoded at the next step.
    pub(crate) tokens: Vec<u32>,
    pub(crate) max_tokens: usize,
    pub(crate) ignore_eos: bool,
    pub(crate) logprobs: bool,
    pub(crate) top_logprobs: usize,
    pub(crate) prefill_time: Duration,
    pub(crate) first_token_at: Option<Instant>,
    /// A failed decode left its KV unknown: the slot is cleared at release.
    pub(crate) poisoned: bool,
    /// Whether the sequence has looked for a longer cached prefix than its slot's, in the other
    /// sequences and the pool (once, just before its prompt is first read: see [`share_prefix`]).
    pub(crate) looked_up: bool,
    /// Speculative decoding's controller, when the engine has a draft model.
    pub(crate) spec: Option<Controller>,
    /// Of its context at its first speculative round, the tokens the draft model already held or copied
    /// from another slot's draft sequence (None before that round).
    pub(crate) draft_reused: Option<usize>,
    /// The request samples (temperature above 0).
    pub(crate) sampled: bool,
    /// The request names a seed.
    pub(crate) seeded: bool,
    /// The prompt's images and clips, in order: each is evaluated whole ([`media::MediaSpan::eval`]).
    pub(crate) media: Vec<media::MediaSpan>,
    /// Floats per hidden state an assistant drafter reads (0: the engine has none, or this sequence does
    /// not speculate).
    pub(crate) hidden_width: usize,
    /// The target's hidden state at the position whose logits gave the pending token (an assistant
    /// drafter's input; [`mtp::keep_hidden`]).
    pub(crate) hidden: Option<Vec<f32>>,
}

impl LlamaSequence {
    /// Checks and tokenizes a request and gives it a free slot ([`choose_slot`]: the one whose cache keeps the
    /// most of its prompt, wherever it is; without a hit, the one that splits the running sequences' ids
    /// least, then the least recently used), trimming that slot's KV to the reusable prefix. A longer
    /// prefix held elsewhere is copied in at the first prefill step ([`find_prefix`]); a sequence left apart
    /// from the others is gathered to them later ([`compaction_move`]).
    /// `placed`: the request's prompt with its media placed ([`placed_ids`]).
    pub(crate) fn admit(
        loaded: &Loaded,
        ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
        slots: &mut [Slot],
        (pool, budget): (&mut PrefixPool<Saved>, u64),
        now: u64,
        mut req: Request,
        (ids, media): (Vec<LlamaToken>, Vec<media::MediaSpan>),
    ) -> Result<Self> {
        if ids.is_empty() {
            return Err(LlamaError::InvalidRequest("the prompt is empty".into()));
        }
        let n_vocab = loaded.model.n_vocab();
        req.sampling
            .validate(n_vocab as usize)
            .map_err(LlamaError::InvalidRequest)?;
        let n_ctx = loaded.n_ctx as usize;
        if req.fit_context && ids.len() < n_ctx {
            req.max_tokens = req.max_tokens.min(n_ctx - ids.len());
        }
        if ids.len() + req.max_tokens > n_ctx {
            return Err(LlamaError::InvalidRequest(format!(
                "prompt ({} tokens) + max_tokens ({}) exceeds the context of {n_ctx} tokens",
                ids.len(),
                req.max_tokens
            )));
        }
        let mut sampler = sampler(loaded, &req.sampling)?;
        // The penalties' window reaches back into the prompt, as on the MLX engine (mlx-lm's processors
        // see prompt and answer) and in llama-server (which feeds the prompt to its sampler): the first
        // tokens of an answer are penalised for what the prompt just said.
        if req.sampling.has_penalties() {
            let window = req.sampling.penalty_context.min(ids.len());
            for &t in &ids[ids.len() - window..] {
                sampler.accept(t);
            }
        }
        let grammar = match &req.constraint {
            None => None,
            Some(c) => Some(loaded.vocabulary()?.matcher(c).map_err(|e| match e {
                jemma_constrain::ConstrainError::Invalid(m) => LlamaError::InvalidRequest(m),
                e => LlamaError::Runtime(e.to_string()),
            })?),
        };
        let (open, close) = jemma_serve::thinking::GEMMA4_THOUGHT_MARKERS;
        let thinking = match (
            req.thinking_token_budget,
            loaded.special_id(open),
            loaded.special_id(close),
        ) {
            (Some(budget), Some(open), Some(close)) => {
                let mut b = jemma_serve::thinking::ThinkingBudget::new(
                    budget,
                    jemma_serve::thinking::ThoughtMarkers { open, close },
                );
                b.read_prompt(&ids.iter().map(|t| t.0 as u32).collect::<Vec<_>>());
                Some(b)
            }
            _ => None,
        };
        let audio_tokens = (media.iter())
            .filter(|m| m.audio)
            .map(|m| m.soft_tokens)
            .sum();
        let as_u32: Vec<u32> = ids.iter().map(|t| t.0 as u32).collect();
        let (slot, keep) = choose_slot(slots, ids.len(), |i, s| {
            reusable(ctx, i as u32, &s.cached, (&as_u32, &media), loaded.n_swa)
        })
        .ok_or_else(|| LlamaError::Runtime("no free sequence slot".into()))?;
        // What the slot holds beyond what this request keeps is another conversation: kept in host memory,
        // it can come back to any slot when that conversation does.
        let held = &slots[slot].cached;
        if held.len() >= keep + MIN_SAVED_TOKENS && budget > 0 {
            save(ctx, slot as u32, held.tokens(), loaded.n_swa, pool, budget);
        }
        // The KV is touched from here on: until this request ends cleanly the slot's record is empty, so a
        // failure leaves the next request a cleared sequence rather than a stale record.
        let keep = trim(ctx, slot as u32, keep)?;
        let mut kv = slots[slot].cached.begin();
        kv.truncate(keep);
        slots[slot].busy = true;
        slots[slot].last_used = now;
        Ok(Self {
            audio_tokens,
            slot,
            ids,
            prefilled: keep,
            reused: keep,
            kv,
            sampler,
            plain_greedy: req.sampling.temperature <= 0.0
                && req.sampling.logit_bias.is_empty()
                && !req.sampling.has_penalties(),
            grammar,
            thinking,
            text: Utf8Stream { pending: vec![] },
            answer: OutputProcessor::new(&req.stop, req.parse_output)
                .with_tools(req.prompt.declares_tools())
                .with_max_tool_calls((!req.parallel_tool_calls).then_some(1))
                .with_constrained_calls(req.constraint.is_some()),
            tokens: vec![],
            max_tokens: req.max_tokens,
            ignore_eos: req.ignore_eos,
            logprobs: req.logprobs,
            top_logprobs: req.top_logprobs,
            prefill_time: Duration::ZERO,
            first_token_at: None,
            poisoned: false,
            looked_up: false,
            draft_reused: None,
            spec: None,
            sampled: req.sampling.temperature > 0.0,
            seeded: req.sampling.seed.is_some(),
            media,
            hidden_width: 0,
            hidden: None,
        })
    }

    pub(crate) fn decoding(&self) -> bool {
        self.prefilled == self.ids.len()
    }

    /// Samples the next token from the logits at batch index `idx` and streams what it completes; ends the
    /// sequence in `out` at an end-of-generation token, a stop string or `max_tokens`.
    pub(crate) fn accept(
        &mut self,
        loaded: &Loaded,
        ctx: &llama_cpp_2::context::LlamaContext<'_>,
        idx: i32,
        out: &mut SeqOutput<Summary>,
    ) {
        self.accept_picked(loaded, ctx, idx, None, out)
    }

    /// Whether [`LlamaSequence::accept`] reads the argmax of the logits and nothing else: what a step may
    /// compute for several sequences at once ([`argmax_rows`]).
    pub(crate) fn takes_argmax(&self) -> bool {
        self.plain_greedy && !self.masked()
    }

    /// Whether the next token may be drawn under a mask: a grammar's (a lazy grammar once its trigger
    /// came), or a spent thinking budget's (the token is then the thought's end).
    fn masked(&self) -> bool {
        self.grammar.as_ref().is_some_and(|g| !g.is_free())
            || self.thinking.as_ref().is_some_and(|t| t.forced().is_some())
    }

    /// The token a spent thinking budget makes the next one (the thought's end), unless the grammar
    /// forbids it there (a call opened inside the thought: the thought ends once the grammar allows).
    ///
    /// Errors: the grammar's, when its mask cannot be computed.
    fn forced(
        &mut self,
    ) -> std::result::Result<Option<LlamaToken>, jemma_constrain::ConstrainError> {
        let Some(close) = self
            .thinking
            .as_ref()
            .and_then(jemma_serve::thinking::ThinkingBudget::forced)
        else {
            return Ok(None);
        };
        if let Some(g) = self.grammar.as_mut().filter(|g| !g.is_free())
            && !g.allowed()?.contains(close)
        {
            return Ok(None);
        }
        Ok(Some(LlamaToken(close as i32)))
    }

    /// [`LlamaSequence::accept`], with the argmax of the logits at `idx` already read (`picked`) for a
    /// sequence that [`LlamaSequence::takes_argmax`].
    pub(crate) fn accept_picked(
        &mut self,
        loaded: &Loaded,
        ctx: &llama_cpp_2::context::LlamaContext<'_>,
        idx: i32,
        picked: Option<u32>,
        out: &mut SeqOutput<Summary>,
    ) {
        let vocab = loaded.model.vocab();
        let forced = match self.forced() {
            Ok(f) => f,
            Err(e) => {
                self.poisoned = true;
                return out.fail(LlamaError::Runtime(e.to_string()));
            }
        };
        let tok = if let Some(close) = forced {
            // The thinking budget is spent: the thought ends here, whatever the logits say (as vLLM's
            // thinking-budget processor forces its end token). The sampler chain sees it as the token.
            self.sampler.accept(close);
            close
        } else if let Some(g) = self.grammar.as_mut().filter(|g| !g.is_free()) {
            // The grammar's mask on a copy of the logits, then the request's sampler chain on what is left.
            let allowed = match g.allowed() {
                Ok(a) => a,
                Err(e) => {
                    self.poisoned = true;
                    return out.fail(LlamaError::Runtime(e.to_string()));
                }
            };
            let mut logits = ctx.get_logits_ith(idx).to_vec();
            allowed.apply(&mut logits);
            let mut cands = LlamaTokenDataArray::from_iter(
                logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)),
                false,
            );
            cands.apply_sampler(&mut self.sampler);
            let Some(tok) = cands.selected_token() else {
                self.poisoned = true;
                return out.fail(LlamaError::Runtime(
                    "the sampler selected no token under the grammar".into(),
                ));
            };
            self.sampler.accept(tok);
            tok
        } else if self.plain_greedy {
            // What llama.cpp's greedy sampler picks (the first largest logit), without its copy of the
            // whole vocabulary into a candidate array: 262,144 entries per sequence per step on Gemma.
            LlamaToken(picked.unwrap_or_else(|| argmax(ctx.get_logits_ith(idx))) as i32)
        } else {
            self.sampler.sample(ctx, idx)
        };
        if let Some(g) = self.grammar.as_mut()
            && !vocab.is_eog(tok)
            && let Err(e) = g.commit(tok.0 as u32)
        {
            self.poisoned = true;
            return out.fail(LlamaError::Runtime(e.to_string()));
        }
        if let Some(t) = self.thinking.as_mut() {
            t.push(tok.0 as u32);
        }
        if self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
        }
        if !self.ignore_eos && vocab.is_eog(tok) {
            return self.finish(Finish::Stop, false, out);
        }
        self.tokens.push(tok.0 as u32);
        let bytes = vocab.token_to_piece(tok, true, None);
        if self.logprobs {
            // The logits the sampler read: llama.cpp's samplers work on a copy, so these are the model's.
            let (lp, top) = log_softmax_top(
                ctx.get_logits_ith(idx),
                tok.0 as usize,
                self.top_logprobs.min(MAX_TOP_LOGPROBS),
            );
            let top = top
                .into_iter()
                .map(|(id, p)| (vocab.token_to_piece(LlamaToken(id as i32), true, None), p))
                .collect();
            out.send(Event::Logprobs(TokenLogprob::new(bytes.clone(), lp, top)));
        }
        let piece = self.text.push(&bytes);
        let (evs, hit) = self.answer.push(&piece);
        out.events.extend(evs.into_iter().map(Event::from));
        if hit {
            self.finish(Finish::Stop, true, out);
        } else if self.tokens.len() >= self.max_tokens {
            self.finish(Finish::Length, false, out);
        }
    }

    pub(crate) fn finish(&mut self, finish: Finish, by_string: bool, out: &mut SeqOutput<Summary>) {
        let evs = self.answer.finish(&self.text.finish(), by_string);
        out.events.extend(evs.into_iter().map(Event::from));
        let decode_time = self.first_token_at.map_or(Duration::ZERO, |t| t.elapsed());
        let n = self.tokens.len();
        let prefilled = self.ids.len() - self.reused;
        out.finish(Summary {
            prompt_tokens: self.ids.len(),
            cached_tokens: self.reused,
            completion_tokens: n,
            finish,
            tool_calls: self.answer.tool_calls(),
            stop_sequence: self.answer.stop_sequence().map(String::from),
            reasoning_tokens: self.answer.reasoning_tokens(),
            audio_tokens: self.audio_tokens,
            prefill_tps: prefilled as f64 / self.prefill_time.as_secs_f64().max(1e-9),
            decode_tps: if n > 1 {
                (n - 1) as f64 / decode_time.as_secs_f64().max(1e-9)
            } else {
                0.0
            },
            tokens: std::mem::take(&mut self.tokens),
            speculative: self.spec.as_ref().map(Controller::stats),
            draft_cached_tokens: self.draft_reused.unwrap_or(0),
        });
    }
}

/// One scheduler step over the running batch: every decoding sequence's last token in one `llama_decode`
/// (one ubatch per run of consecutive sequence ids, a row per sequence), each sampled from its own row;
/// then prompt chunks of the sequences still reading their prompts, oldest first, up to one chunk's worth
/// of tokens in all, so a newcomer's long prompt delays running streams by one chunk per token rather than
/// by the whole prompt. The text chunks are read in one `llama_decode` ([`prefill_chunks`]), then any image
/// or clip, each on its own.
///
/// How exactly a batched answer matches a lone one depends on the weights and the device, as for the
/// decode rows: on a CPU with Q8_0 weights llama.cpp takes the same per-row dot products for the fixtures'
/// batches, so tokens and logprobs are the same to the bit (not so on CUDA, nor on every shape: see
/// docs/BENCHMARKS.md, "The heavy tier on CUDA"); on F32 and Q4_K a row's rounding depends on the ubatch
/// it is in (which chunks share it, and where `split_equal` cuts them), so answers agree until a
/// near-tie, as in llama-server and vLLM without a batch-invariant mode.
pub(crate) fn step(
    loaded: &Loaded,
    // The context, and the mmproj's towers for the prompts' images and clips.
    (ctx, mtmd): (
        &mut llama_cpp_2::context::LlamaContext<'_>,
        Option<&media::Mtmd>,
    ),
    (drafts, speculated, largest_verify): (
        Option<&mut speculative::Drafter>,
        &mut SpeculativeStats,
        &mut usize,
    ),
    mut shared: Shared<'_>,
    batch: &mut [&mut LlamaSequence],
    out: &mut [SeqOutput<Summary>],
    chunk: usize,
) -> Result<()> {
    let mut decoding: Vec<usize> = (0..batch.len())
        .filter(|&i| batch[i].decoding() && !batch[i].tokens.is_empty())
        .collect();
    // Speculative rounds for the sequences whose controller asks for drafts now (single streams by default:
    // a batch already reads the weights once for several tokens); the others decode plainly below. They
    // draft together (one drafter decode per draft step), and their drafts are verified together.
    let n = decoding.len();
    if let Some(drafts) = drafts {
        let mut plain = Vec::with_capacity(n);
        let mut drafted = vec![];
        // By increasing slot, as the plain batch below (llama.cpp's per-stream split).
        decoding.sort_by_key(|&i| batch[i].slot);
        let mut wants = Vec::with_capacity(n);
        for i in decoding {
            let s = &mut *batch[i];
            // Tokens still allowed after the pending one: a round yields its drafts that stand and one more.
            let room = s.max_tokens.saturating_sub(s.tokens.len() + 1);
            // A verification reads k + 1 positions in one batch, which must fit llama.cpp's.
            let room = room.min(drafts.batch_size().saturating_sub(1));
            let k = s.spec.as_mut().map_or(0, |c| c.next_k(n, room));
            if k == 0 {
                plain.push(i);
            } else {
                wants.push((i, k));
            }
        }
        for (&(i, _), d) in wants.iter().zip(drafts.draft(batch, &wants)) {
            match d {
                Some((tokens, draft_time)) if !tokens.is_empty() => {
                    drafted.push(speculative::Drafted {
                        seq: i,
                        tokens,
                        draft_time,
                    });
                }
                Some(_) => plain.push(i),
                None => {
                    // The draft failed (logged): this sequence decodes plainly from now on.
                    batch[i].spec = None;
                    plain.push(i);
                }
            }
        }
        *largest_verify = (*largest_verify).max(drafted.len());
        let rounds = speculative::verify(loaded, ctx, batch, out, &drafted, drafts.batch_size())?;
        if !drafted.is_empty() {
            // Its decode applied any queued copy.
            *shared.copy_pending = false;
        }
        for (d, r) in drafted.iter().zip(rounds) {
            let i = d.seq;
            if let Some(c) = batch[i].spec.as_mut() {
                c.record_round(r.drafted, r.accepted, r.draft_time, r.verify_time);
                speculated.add(&SpeculativeStats::round(r.drafted, r.accepted));
                // A round that ended the answer: its summary counts the round too.
                if let Some(Ok(summary)) = &mut out[i].end {
                    summary.speculative = Some(c.stats());
                }
            }
        }
        decoding = plain;
    }
    // A decoding sequence apart from the others moves next to them, one a step: every step over ids that
    // are not consecutive is one pass over the weights per run of them. Runs count every running sequence
    // (one reading its prompt or speculating joins the plain batch later), so even a lone plain decoder
    // moves next to them; one with few tokens left is not worth its copy. The plain decode just below
    // applies the copy.
    if !decoding.is_empty() && !*shared.copy_pending {
        // Not the sequences this step's verification ended: their slots are freed at once.
        let running: Vec<usize> = (0..batch.len())
            .filter(|&i| !batch[i].poisoned && out[i].end.is_none())
            .map(|i| batch[i].slot)
            .collect();
        let movable: Vec<usize> = (decoding.iter())
            .map(|&i| &*batch[i])
            .filter(|s| s.max_tokens.saturating_sub(s.tokens.len()) >= MIN_STEPS_TO_MOVE)
            .map(|s| s.slot)
            .collect();
        if let Some((from, to)) = compaction_move(shared.slots, &running, &movable)
            && let Some(&i) = decoding.iter().find(|&&i| batch[i].slot == from)
        {
            // A move that cannot be queued changes nothing: the batch decodes where it is.
            if let Err(e) = migrate(ctx, loaded.n_swa, &mut shared, batch[i], to) {
                tracing::warn!(from, to, "cannot move a sequence: {e}");
            }
        }
    }
    let started = Instant::now();
    // Increasing sequence ids: llama.cpp's per-stream split takes runs of consecutive ids into one ubatch.
    decoding.sort_by_key(|&i| batch[i].slot);
    if !decoding.is_empty() {
        let mut b = LlamaBatch::new(decoding.len(), 1);
        for &i in &decoding {
            let s = &batch[i];
            let pos = s.ids.len() + s.tokens.len() - 1;
            let tok = LlamaToken(*s.tokens.last().unwrap_or(&0) as i32);
            b.add(tok, pos as i32, &[s.slot as i32], true)
                .map_err(|e| LlamaError::Runtime(e.to_string()))?;
        }
        // A step that applies a stream copy (a move's or a prefix's) is not a plain step's cost.
        let copied = *shared.copy_pending;
        ctx.decode(&mut b)
            .map_err(|e| LlamaError::Runtime(format!("decode: {e}")))?;
        // Any queued stream copy landed in that decode.
        *shared.copy_pending = false;
        // The greedy rows' argmax, read on several cores when the layers run on a GPU: there the host's
        // read of every row's logits is the step's serial tail (on a CPU the cores are the model's, and
        // the read is ~0.5 % of a step).
        let greedy: Vec<(usize, &[f32])> = (decoding.iter().enumerate())
            .filter(|&(_, &i)| batch[i].takes_argmax())
            .map(|(row, _)| (row, ctx.get_logits_ith(row as i32)))
            .collect();
        let threads = if loaded.offloaded { cores() } else { 1 };
        let rows: Vec<&[f32]> = greedy.iter().map(|&(_, l)| l).collect();
        let mut picked = vec![None; decoding.len()];
        for (&(row, _), t) in greedy.iter().zip(argmax_rows(&rows, threads)) {
            picked[row] = Some(t);
        }
        for (row, &i) in decoding.iter().enumerate() {
            let s = &mut batch[i];
            let last = *s.tokens.last().unwrap_or(&0);
            s.kv.extend([last]);
            s.accept_picked(loaded, ctx, row as i32, picked[row], &mut out[i]);
            mtp::keep_hidden(ctx, s, row as i32);
        }
        // A plain step's cost at this batch size, which each speculating sequence's controller weighs a
        // round (whose times are the batch's too) against; not past `max_batch`, where speculation is off.
        let elapsed = started.elapsed();
        if !copied {
            for &i in &decoding {
                if let Some(c) = batch[i].spec.as_mut()
                    && n <= c.config().max_batch
                {
                    c.record_plain(elapsed);
                    speculated.plain_steps += 1;
                }
            }
        }
    }
    // Prompt chunks, oldest sequence first, up to `chunk` tokens in all (the first always runs, so a long
    // prompt progresses; one that does not fit waits, whole: `jemma_serve::budget`, [`CUT_READS`]):
    // several short prompts start in one step, a long one takes a chunk per step. The
    // text chunks are read together in one decode (llama-server's and vLLM's batched prefill: a burst of
    // newcomers costs one pass over the weights, not one each); an image or clip is read on its own.
    let mut budget = chunk.max(1);
    let mut reads = Reads::default();
    for i in 0..batch.len() {
        if batch[i].decoding() {
            continue;
        }
        if !batch[i].looked_up {
            // A copy queued this step shuts the pool until a decode applies it: what is planned so far is
            // read first, so this lookup sees the pool (a burst of returning conversations).
            if *shared.copy_pending && !(reads.text.is_empty() && reads.media.is_empty()) {
                read_planned(
                    loaded,
                    (ctx, mtmd),
                    batch,
                    out,
                    &mut reads,
                    shared.copy_pending,
                )?;
            }
            let found = find_prefix(ctx, loaded, &shared, batch, i);
            // A prompt that shares more with a chunk planned this step than it can take now waits for
            // that chunk to be read and copies it then (the core's `waits_for_shared_read`).
            let s = &*batch[i];
            let have = found.as_ref().map_or(s.prefilled, |f| f.0);
            let ahead = (reads.text.iter())
                .map(|&(p, n)| common_prefix_len(&batch[p].ids[..batch[p].prefilled + n], &s.ids))
                .max()
                .unwrap_or(0);
            let ahead = media::whole_spans(ahead.min(s.ids.len() - 1), &s.media);
            if waits_for_shared_read(have, ahead, min_shared_gain(loaded.n_ctx)) {
                continue;
            }
            if let Some(found) = found {
                // A stream copy's cells are recorded at once and its data lands at the start of the next
                // decode (whichever: the flush above, the step's batched read, a media read), before that
                // decode writes anything. A read the budget would put off waits, with its copy, for the
                // next step: a copy with no read behind it would keep the pool shut until some decode.
                let n = next_read(batch[i], found.0, chunk);
                let whole = batch[i].media.iter().any(|m| m.start == found.0);
                let take = prompt_read(n, budget, budget >= chunk.max(1), CUT_READS);
                if take == 0 || (whole && take < n) {
                    break;
                }
                share_prefix(ctx, loaded.n_swa, &mut shared, batch[i], found)?;
            }
            batch[i].looked_up = true;
        }
        let s = &mut *batch[i];
        // An image or clip is read whole, and counts against the budget as its length; text is read up to
        // the next one. Media are read after the text chunks, whose first tokens need not wait for a tower.
        if let Some(k) = s.media.iter().position(|m| m.start == s.prefilled) {
            let len = s.media[k].len;
            if len > budget && budget < chunk.max(1) {
                break;
            }
            budget = budget.saturating_sub(len);
            reads.media.push((i, k));
            if budget == 0 {
                break;
            }
            continue;
        }
        // Text that does not fit what is left waits, whole (the core's `prompt_read`, [`CUT_READS`]).
        let n = prompt_read(
            next_read(s, s.prefilled, chunk),
            budget,
            budget >= chunk.max(1),
            CUT_READS,
        );
        if n == 0 {
            break;
        }
        budget = budget.saturating_sub(n);
        reads.text.push((i, n));
        if budget == 0 {
            break;
        }
    }
    read_planned(
        loaded,
        (ctx, mtmd),
        batch,
        out,
        &mut reads,
        shared.copy_pending,
    )
}

/// What a step reads of the prompts ([`step`]).
#[derive(Default)]
struct Reads {
    /// Text chunks: (index in batch, tokens), read together in one decode.
    text: Vec<(usize, usize)>,
    /// Images and clips: (index in batch, which of its media), each read whole after the text.
    media: Vec<(usize, usize)>,
}

/// Reads what a step planned ([`step`]): the text chunks in one decode ([`prefill_chunks`]), then the
/// images and clips, each whole; `reads` is emptied. Any decode here applies a queued stream copy, which clears `copy_pending`. A tower that
/// fails on one request's media ends that request alone (its slot is cleared at release).
///
/// Errors: a failed text decode (the caller poisons the batch).
fn read_planned(
    loaded: &Loaded,
    (ctx, mtmd): (
        &mut llama_cpp_2::context::LlamaContext<'_>,
        Option<&media::Mtmd>,
    ),
    batch: &mut [&mut LlamaSequence],
    out: &mut [SeqOutput<Summary>],
    reads: &mut Reads,
    copy_pending: &mut bool,
) -> Result<()> {
    if !reads.text.is_empty() {
        prefill_chunks(loaded, ctx, batch, out, &std::mem::take(&mut reads.text))?;
        *copy_pending = false;
    }
    for (i, k) in std::mem::take(&mut reads.media) {
        let s = &mut *batch[i];
        let mtmd =
            mtmd.ok_or_else(|| LlamaError::Runtime("media in a prompt without an mmproj".into()))?;
        let t0 = Instant::now();
        if let Err(e) = s.media[k].eval(mtmd, ctx, s.slot as i32) {
            s.poisoned = true;
            out[i].fail(e);
            continue;
        }
        *copy_pending = false;
        let end = s.media[k].end();
        s.kv.extend(s.ids[s.prefilled..end].iter().map(|t| t.0 as u32));
        s.prefilled = end;
        s.prefill_time += t0.elapsed();
    }
    Ok(())
}

/// How many prompt tokens of `s` the next read from position `at` takes: an image or clip starting there
/// whole, else text up to `chunk` tokens (at least 1) and never into the next image or clip.
fn next_read(s: &LlamaSequence, at: usize, chunk: usize) -> usize {
    if let Some(m) = s.media.iter().find(|m| m.start == at) {
        return m.len;
    }
    let next_media = (s.media.iter())
        .map(|m| m.start)
        .filter(|&start| start > at)
        .min()
        .unwrap_or(s.ids.len());
    chunk.max(1).min(next_media - at)
}

/// Decodes the prompt chunks `planned` (`(index in batch, tokens)`: the next that many prompt tokens of
/// each, at most llama.cpp's batch size in all) in one batch, and samples the first token of each sequence
/// whose prompt that completes. The rows go by increasing sequence id, so that llama.cpp's per-stream
/// split reads chunks of consecutive ids together (as many tokens of each as the shortest has, then the
/// rest); each sequence samples from its own last row (see [`step`] for how exactly that matches a lone
/// read). Each sequence's prefill time counts the whole decode, the wall time it spent being read.
///
/// Errors: a failed decode (what it left in these sequences' KV is unknown; the caller poisons them).
pub(crate) fn prefill_chunks(
    loaded: &Loaded,
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    batch: &mut [&mut LlamaSequence],
    out: &mut [SeqOutput<Summary>],
    planned: &[(usize, usize)],
) -> Result<()> {
    let t0 = Instant::now();
    let mut order = planned.to_vec();
    order.sort_by_key(|&(i, _)| batch[i].slot);
    let total = order.iter().map(|&(_, n)| n).sum();
    let mut b = LlamaBatch::new(total, 1);
    // The batch row of each sequence's last token in this read.
    let mut last_row = Vec::with_capacity(order.len());
    for &(i, n) in &order {
        let s = &batch[i];
        for k in 0..n {
            let pos = s.prefilled + k;
            b.add(
                s.ids[pos],
                pos as i32,
                &[s.slot as i32],
                pos == s.ids.len() - 1,
            )
            .map_err(|e| LlamaError::Runtime(e.to_string()))?;
        }
        last_row.push(b.n_tokens() - 1);
    }
    ctx.decode(&mut b)
        .map_err(|e| LlamaError::Runtime(format!("decode: {e}")))?;
    let elapsed = t0.elapsed();
    for (&(i, n), row) in order.iter().zip(last_row) {
        let s = &mut *batch[i];
        let read = &s.ids[s.prefilled..s.prefilled + n];
        s.kv.extend(read.iter().map(|t| t.0 as u32));
        s.prefilled += n;
        s.prefill_time += elapsed;
        let out = &mut out[i];
        if s.decoding() {
            out.send(Event::Started {
                prompt_tokens: s.ids.len(),
                cached_tokens: s.reused,
            });
            if s.max_tokens == 0 {
                s.finish(Finish::Length, false, out);
            } else {
                s.accept(loaded, ctx, row, out);
                mtp::keep_hidden(ctx, s, row);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gguf(name: &str) -> std::path::PathBuf {
        let p = jemma_fixtures::root()
            .join("gguf")
            .join(format!("{name}.gguf"));
        assert!(
            p.exists(),
            "{} missing: run scripts/fixtures.sh",
            p.display()
        );
        p
    }

    /// Steps `batch` once; the outputs, in its order.
    fn step(
        runner: &mut LlamaRunner,
        model: &mut Serving,
        batch: &mut [Admission],
    ) -> Vec<SeqOutput<Summary>> {
        let mut out: Vec<_> = batch.iter().map(|_| SeqOutput::default()).collect();
        let mut refs: Vec<&mut Admission> = batch.iter_mut().collect();
        runner.step(model, &mut refs, &mut out).unwrap();
        out
    }

    /// Steps `seq` alone to its end; its generated tokens.
    fn finish(runner: &mut LlamaRunner, model: &mut Serving, seq: Admission) -> Vec<u32> {
        let mut batch = [seq];
        for _ in 0..1000 {
            let out = step(runner, model, &mut batch).pop().unwrap();
            if let Some(end) = out.end {
                let [seq] = batch;
                runner.release(model, seq);
                return end.unwrap().tokens;
            }
        }
        panic!("no end in 1000 steps");
    }

    /// A runner on the `tiny-q8_0` fixture with `parallel` slots and nothing saved in host memory.
    fn text_runner(parallel: u32) -> (LlamaRunner, Serving) {
        let mut c = LlamaConfig::new(gguf("tiny-q8_0"));
        c.context_length = Some(512);
        c.parallel = parallel;
        c.prefix_cache_bytes = Some(0);
        runner_for(c)
    }

    /// A runner planned and loaded for `c`, on 2 threads.
    fn runner_for(c: LlamaConfig) -> (LlamaRunner, Serving) {
        let mut runner = LlamaRunner {
            planned: c.parallel,
            threads: 2,
            speculated: SpeculativeStats::default(),
            largest_verify: 0,
            pool_budget: 0,
            pool_held: (0, 0),
            config: c,
        };
        let mut info = LlamaInfo {
            input_modalities: vec![],
            model_path: runner.config.model_path.clone(),
            gpu_layers: 0,
            threads: 2,
            model_bytes: 0,
            footprint_bytes: None,
            speculative: None,
            largest_verify_batch: 0,
            prefix_cache_entries: 0,
            prefix_cache_bytes: 0,
            cache_type_k: "f16".into(),
            cache_type_v: "f16".into(),
            chat_template: Some(true),
        };
        runner.plan(&mut info).unwrap();
        let progress: Progress = Arc::new(|_| {});
        let (model, _) = runner.load(&progress, &mut info).unwrap();
        (runner, model)
    }

    fn slot_of(seq: &Admission) -> usize {
        match seq {
            Admission::Running(s) => s.slot,
            _ => panic!("not running"),
        }
    }

    /// Steps `batch` until every sequence ended; each one's summary, in its order.
    fn finish_all(
        runner: &mut LlamaRunner,
        model: &mut Serving,
        mut batch: Vec<Admission>,
    ) -> Vec<Summary> {
        let mut ends: Vec<Option<Summary>> = batch.iter().map(|_| None).collect();
        for _ in 0..1000 {
            let out = step(runner, model, &mut batch);
            for (end, o) in ends.iter_mut().zip(out) {
                if let Some(e) = o.end {
                    *end = Some(e.unwrap());
                }
            }
            if ends.iter().all(Option::is_some) {
                for seq in batch {
                    runner.release(model, seq);
                }
                return ends.into_iter().map(Option::unwrap).collect();
            }
        }
        panic!("no end in 1000 steps");
    }

    /// A request whose prefix is cached in a slot beside none of the running ones takes that slot (its
    /// cache is used at once), and the decoding sequences are then gathered into consecutive ids (one
    /// ubatch per decode step in llama.cpp) by moving one to a free slot next to the other; each answers
    /// as it does alone, read in the same chunks by a runner of its own.
    #[test]
    fn a_sequence_apart_from_the_batch_is_moved_next_to_it() {
        let conv = |seed: u32| -> Vec<u32> { (0..48).map(|i| 300 + seed * 50 + i).collect() };
        let next = |seed: u32| -> Vec<u32> { conv(seed).into_iter().chain([7, 8, 9]).collect() };
        let req = |ids: Vec<u32>, n: usize| Request {
            ignore_eos: true,
            ..Request::new(Prompt::Ids(ids), n)
        };
        // Each conversation alone: its first turn, then its next one from the same slot.
        let alone = |seed: u32, n: usize| {
            let (mut runner, mut model) = text_runner(1);
            let seq = runner.admit(&mut model, req(conv(seed), 2), 512).unwrap();
            finish_all(&mut runner, &mut model, vec![seq]);
            let seq = runner.admit(&mut model, req(next(seed), n), 512).unwrap();
            finish_all(&mut runner, &mut model, vec![seq]).remove(0)
        };
        let (mut runner, mut model) = text_runner(4);
        // Four conversations, one after another: each takes the least recently used slot, 0 to 3.
        for seed in 0..4 {
            let seq = runner.admit(&mut model, req(conv(seed), 2), 512).unwrap();
            assert_eq!(slot_of(&seq), seed as usize);
            finish_all(&mut runner, &mut model, vec![seq]);
        }
        // Conversation 0 continues in its slot; conversation 2 continues in its own slot while 0 runs.
        let first = runner.admit(&mut model, req(next(0), 30), 512).unwrap();
        assert_eq!(slot_of(&first), 0);
        let mut batch = vec![first];
        step(&mut runner, &mut model, &mut batch);
        batch.push(runner.admit(&mut model, req(next(2), 8), 512).unwrap());
        assert_eq!(slot_of(&batch[1]), 2, "its cache is used at once");
        // In the step that reads its prompt's rest, the one decoding moves next to it (runs count the
        // whole batch).
        let before: Vec<usize> = batch.iter().map(slot_of).collect();
        step(&mut runner, &mut model, &mut batch);
        assert!(
            !model.copy_pending,
            "the step's decode applied the move's copy"
        );
        let mut slots: Vec<usize> = batch.iter().map(slot_of).collect();
        assert_eq!(
            slots[1], 2,
            "the newcomer stays in the slot that held its cache"
        );
        let moved = (0..2).find(|&k| slots[k] != before[k]).expect("one moved");
        // The slot it left keeps its cache as it was at the move (the step then decoded one more token).
        let Admission::Running(seq) = &batch[moved] else {
            unreachable!()
        };
        let kv = seq.kv.tokens();
        assert_eq!(
            model.slots[before[moved]].cached.tokens(),
            &kv[..kv.len() - 1]
        );
        assert!(!model.slots[before[moved]].busy);
        slots.sort_unstable();
        assert_eq!(slots[1], slots[0] + 1, "consecutive ids: {slots:?}");
        let ends = finish_all(&mut runner, &mut model, batch);
        let (a, b) = (alone(0, 30), alone(2, 8));
        assert_eq!(ends[1].cached_tokens, conv(2).len());
        assert_eq!(ends[1].cached_tokens, b.cached_tokens);
        assert_eq!(ends[0].tokens, a.tokens, "the conversation that ran first");
        assert_eq!(ends[1].tokens, b.tokens, "the conversation that joined");
    }

    /// Prompts admitted together are read in one step (one decode for all their chunks, two of them in
    /// consecutive slots, so in one ubatch), except one that shares a preamble with a prompt being read: it
    /// waits that step and then copies the preamble, so the preamble is read once. Each answers exactly as
    /// it does alone (Q8_0: a row's numbers do not depend on its batch).
    #[test]
    fn prompts_sent_together_are_read_at_once_and_a_shared_preamble_once() {
        let preamble: Vec<u32> = (300..348).collect();
        let with = |q: &[u32]| -> Vec<u32> { preamble.iter().chain(q).copied().collect() };
        // Slots 0 to 3 in this order: the preamble twice, in slots 0 and 2.
        let prompts = [
            with(&[7, 8, 9]),
            (500..520).collect(),
            with(&[11, 12]),
            (600..625).collect(),
        ];
        let req = |ids: &Vec<u32>| Request {
            ignore_eos: true,
            ..Request::new(Prompt::Ids(ids.clone()), 6)
        };
        let alone: Vec<Summary> = (prompts.iter())
            .map(|p| {
                let (mut runner, mut model) = text_runner(1);
                let seq = runner.admit(&mut model, req(p), 512).unwrap();
                finish_all(&mut runner, &mut model, vec![seq]).remove(0)
            })
            .collect();
        let (mut runner, mut model) = text_runner(4);
        let mut batch: Vec<Admission> = (prompts.iter())
            .map(|p| runner.admit(&mut model, req(p), 512).unwrap())
            .collect();
        assert_eq!(batch.iter().map(slot_of).collect::<Vec<_>>(), [0, 1, 2, 3]);
        step(&mut runner, &mut model, &mut batch);
        let read: Vec<usize> = (batch.iter())
            .map(|a| match a {
                Admission::Running(s) => s.prefilled,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(read, [51, 20, 0, 25], "all read but the third, which waits");
        let ends = finish_all(&mut runner, &mut model, batch);
        let cached: Vec<usize> = ends.iter().map(|e| e.cached_tokens).collect();
        assert_eq!(cached, [0, 0, preamble.len(), 0], "the preamble copied");
        for (k, (got, want)) in ends.iter().zip(&alone).enumerate() {
            assert_eq!(got.tokens, want.tokens, "prompt {k}");
        }
    }

    /// A runner on the Q8_0 fixture with 2 slots, a context of `context` tokens and this flash attention
    /// policy.
    fn runner_with(context: u32, fa: FlashAttention) -> (LlamaRunner, Serving) {
        let mut c = LlamaConfig::new(gguf("tiny-q8_0"));
        c.context_length = Some(context);
        c.parallel = 2;
        c.prefix_cache_bytes = Some(0);
        c.flash_attention = fa;
        runner_for(c)
    }

    /// Each request's tokens and logprobs, its sequences stepped together to their ends.
    fn run_logprobs(
        runner: &mut LlamaRunner,
        model: &mut Serving,
        mut batch: Vec<Admission>,
    ) -> Vec<(Vec<u32>, Vec<jemma_chat::logprobs::TokenLogprob>)> {
        let mut got: Vec<Vec<_>> = batch.iter().map(|_| vec![]).collect();
        let mut ends: Vec<Option<Vec<u32>>> = batch.iter().map(|_| None).collect();
        for _ in 0..1000 {
            if ends.iter().all(Option::is_some) {
                break;
            }
            let out = step(runner, model, &mut batch);
            for ((g, end), o) in got.iter_mut().zip(ends.iter_mut()).zip(out) {
                g.extend(o.events.into_iter().filter_map(|e| match e {
                    Event::Logprobs(t) => Some(t),
                    _ => None,
                }));
                if let Some(e) = o.end {
                    *end = Some(e.unwrap().tokens);
                }
            }
        }
        for seq in batch {
            runner.release(model, seq);
        }
        ends.into_iter()
            .map(|e| e.expect("an end"))
            .zip(got)
            .collect()
    }

    fn logprob_request(ids: Vec<u32>, max_tokens: usize) -> Request {
        Request {
            ignore_eos: true,
            logprobs: true,
            top_logprobs: 3,
            ..Request::new(Prompt::Ids(ids), max_tokens)
        }
    }

    /// Without flash attention a sequence decoded beside another gives every token and logprob of its lone
    /// decode, to the bit: each row's attention is a dot product over the KV view, the masked cells adding
    /// exactly 0, whatever the view's length (768 cells here, beside a 600-token sequence, against 512
    /// alone) and whatever else the ubatch holds. (With flash attention a lone decode over 512 cells or
    /// more is split across the threads, a ubatch of several sequences is not: this fails under `Auto`.)
    #[test]
    fn without_flash_attention_a_short_sequence_decodes_beside_a_long_one_as_alone() {
        let fa = FlashAttention::Off;
        let short: Vec<u32> = (0..300).map(|k| 40 + (k * 37) % 900).collect();
        let long: Vec<u32> = (0..600).map(|k| 60 + (k * 53) % 900).collect();
        let req = |ids: &Vec<u32>| logprob_request(ids.clone(), 12);
        let alone = {
            let (mut runner, mut model) = runner_with(1024, fa);
            let s = runner.admit(&mut model, req(&short), 1024).unwrap();
            run_logprobs(&mut runner, &mut model, vec![s]).remove(0)
        };
        let (mut runner, mut model) = runner_with(1024, fa);
        let batch = vec![
            runner.admit(&mut model, req(&short), 1024).unwrap(),
            runner.admit(&mut model, req(&long), 1024).unwrap(),
        ];
        let got = run_logprobs(&mut runner, &mut model, batch);
        assert_eq!(got[0].1.len(), 12);
        assert_eq!(got[0], alone, "the short sequence, batched vs alone");
    }

    /// A request's images are prepared off the model thread, and the batch does not wait for them. While
    /// its preparation cannot finish (libmtmd's context held here, as a large image or a video's frames
    /// hold a preparation thread for tens of ms each), a running request decodes at every step and the
    /// image request sits outside the batch, holding no slot; once its image is ready it joins and answers
    /// as it does alone. A request refused once prepared (an image libmtmd cannot take) ends alone, and
    /// one dropped while preparing frees nothing it did not hold.
    #[test]
    fn media_are_prepared_while_the_batch_decodes() {
        let dir = jemma_fixtures::root().join("tiny-mm");
        let mut c = LlamaConfig::new(gguf("tiny-mm-f32"));
        c.mmproj_path = Some(gguf("mmproj-tiny-mm-f32"));
        c.image_soft_tokens = 16;
        c.context_length = Some(512);
        c.parallel = 2;
        let (mut runner, mut model) = runner_for(c);
        let square =
            jemma_media::EncodedImage(std::fs::read(dir.join("square.png")).unwrap().into())
                .decode(&Default::default())
                .unwrap();
        // The fixture's placeholder is token 20 (`<|image|>`).
        let ids: Vec<u32> = [2, 105]
            .into_iter()
            .chain((0..20).map(|k| 107 + 13 * k))
            .chain([20, 106, 105])
            .collect();
        let image_request = |image: &jemma_media::DecodedImage| Request {
            images: vec![image.clone()],
            ignore_eos: true,
            ..Request::new(Prompt::Ids(ids.clone()), 6)
        };
        let text = Request {
            ignore_eos: true,
            ..Request::new(Prompt::Ids(vec![2, 105, 300, 301, 302]), 40)
        };

        let alone = runner
            .admit(&mut model, image_request(&square), 512)
            .unwrap();
        assert!(matches!(alone, Admission::Preparing(_)));
        let want = finish(&mut runner, &mut model, alone);
        assert_eq!(want.len(), 6);
        // The same pixels under another digest: the cache keeps the text before the image, not the
        // image, so the image below is prepared and read afresh.
        let mut again = square.clone();
        again.digest ^= 1;

        let towers = model.mtmd.as_ref().unwrap().towers();
        let held = towers.hold();
        let running = runner.admit(&mut model, text, 512).unwrap();
        let waiting = runner
            .admit(&mut model, image_request(&again), 512)
            .unwrap();
        let mut batch = [running, waiting];
        for _ in 0..5 {
            let out = step(&mut runner, &mut model, &mut batch);
            assert!(
                !out[0].events.is_empty() || out[0].end.is_some(),
                "the running request steps"
            );
            assert!(out[1].events.is_empty() && out[1].end.is_none());
            assert!(matches!(batch[1], Admission::Preparing(_)));
            assert_eq!(
                model.slots.iter().filter(|s| s.busy).count(),
                1,
                "a request preparing holds no slot"
            );
        }
        drop(held);
        let [running, waiting] = batch;
        runner.release(&mut model, running);
        assert_eq!(finish(&mut runner, &mut model, waiting), want);

        // Refused once prepared: an image with no pixels.
        let mut empty = square.clone();
        empty.rgb = Arc::new(jemma_media::Rgb {
            width: 0,
            height: 0,
            data: vec![],
        });
        empty.digest ^= 7;
        let refused = runner
            .admit(&mut model, image_request(&empty), 512)
            .unwrap();
        let mut batch = [refused];
        let mut failure = None;
        for _ in 0..1000 {
            if let Some(end) = step(&mut runner, &mut model, &mut batch).pop().unwrap().end {
                failure = Some(end.map(|_| ()).unwrap_err());
                break;
            }
        }
        assert!(
            matches!(failure, Some(EngineFailure::InvalidRequest(_))),
            "{failure:?}"
        );
        let [refused] = batch;
        runner.release(&mut model, refused);
        // Dropped while preparing: nothing held, nothing left busy.
        let dropped = runner
            .admit(&mut model, image_request(&square), 512)
            .unwrap();
        runner.release(&mut model, dropped);
        assert!(model.slots.iter().all(|s| !s.busy));

        // A count with an image (Anthropic's count_tokens) is answered off the model thread: while
        // preparation is held the call returns and the reply waits, then it says what the model thread
        // would have counted. A refused image is refused there too.
        let held = towers.hold();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        runner.count(&mut model, image_request(&square), tx);
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            matches!(
                rx.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty)
            ),
            "the count waits for its image, not the model thread for the count"
        );
        drop(held);
        let counted = rx.blocking_recv().unwrap().unwrap();
        let on_thread = runner
            .prompt_tokens(&mut model, &image_request(&square))
            .unwrap();
        assert_eq!(counted, on_thread);
        assert!(counted > ids.len(), "the image's positions are counted");
        let (tx, rx) = tokio::sync::oneshot::channel();
        runner.count(&mut model, image_request(&empty), tx);
        assert!(matches!(
            rx.blocking_recv().unwrap(),
            Err(EngineFailure::InvalidRequest(_))
        ));
        // Text alone is counted at once.
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        runner.count(&mut model, Request::new(Prompt::Ids(ids.clone()), 1), tx);
        assert_eq!(rx.try_recv().unwrap().unwrap(), ids.len());
        // The towers go with the model: the counting thread ends and is joined (this returns).
        drop(model);
    }
}
