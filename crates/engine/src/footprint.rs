//! How much memory a model will take before it is loaded: weights (as the engine will hold them, after the
//! KV-shared projections are dropped, the vision and audio towers kept, and floats cast to the compute
//! dtype), the KV cache at the configured context, and the transient activations of the largest prefill
//! chunk.
//!
//! The engine host checks this against the memory it may use and refuses to load a model that does not fit,
//! because on a unified-memory Mac an oversized model does not fail: it swaps the whole machine to a crawl.
//! Only safetensors headers are read (a few KB per shard), so the estimate is instant even for 5 GB models.

use std::io::Read;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::models::gemma4::config::{LayerType, ModelConfig, canonical_key};
use crate::models::gemma4::weight_files;

/// mlx-lm's `KVCache.step`: full-attention caches grow in blocks of this many positions.
const KV_STEP: usize = 256;

/// Bytes the host process needs besides the model (runtime, tokenizer, HTTP, MLX's bookkeeping); measured as
/// the RSS of `jemma serve` with a tiny model loaded (~60-90 MiB) and rounded up.
pub const RUNTIME_OVERHEAD_BYTES: u64 = 128 << 20;

/// What a model will need, in bytes.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Footprint {
    /// Weights as held after loading.
    pub weights_bytes: u64,
    /// KV caches filled to `context_length`, for each of `sequences`.
    pub kv_cache_bytes: u64,
    /// Transient activations at the peak of prefill (attention scores of the last chunk dominate).
    pub activation_bytes: u64,
    /// The host process around the model (not MLX memory).
    pub runtime_overhead_bytes: u64,
    /// Context the estimate is for.
    pub context_length: usize,
    /// Prefill chunk the estimate assumes.
    pub prefill_chunk: usize,
    /// Sequences served at once, each with its own KV cache (continuous batching).
    pub sequences: usize,
    /// Speculative decoding's draft model: its weights and the KV caches of the sequences that speculate
    /// at once (0 without one).
    pub draft_bytes: u64,
}

impl Footprint {
    /// The same model serving `n` sequences at once (at least 1): one KV cache each. Activations stay
    /// those of one prefill chunk (prompts are read one at a time; a decode step's batch of one token per
    /// sequence is far smaller).
    pub fn for_sequences(self, n: usize) -> Self {
        let n = n.max(1);
        Self {
            kv_cache_bytes: self.kv_cache_bytes / self.sequences.max(1) as u64 * n as u64,
            sequences: n,
            ..self
        }
    }

    /// The same with a draft model of `bytes` (see [`Footprint::draft_bytes`]).
    pub fn with_draft(self, bytes: u64) -> Self {
        Self {
            draft_bytes: bytes,
            ..self
        }
    }

    /// MLX memory at peak: what `mlx.core.get_peak_memory` reports after a request that fills the context.
    pub fn device_bytes(&self) -> u64 {
        self.weights_bytes + self.kv_cache_bytes + self.activation_bytes + self.draft_bytes
    }

    /// Everything: device memory plus the host process.
    pub fn total_bytes(&self) -> u64 {
        self.device_bytes() + self.runtime_overhead_bytes
    }

    /// One line for logs and refusal messages.
    pub fn describe(&self) -> String {
        format!(
            "{} (weights {} + KV cache {} at {} tokens × {} sequences + activations {}{} + runtime {})",
            gib(self.total_bytes()),
            gib(self.weights_bytes),
            gib(self.kv_cache_bytes),
            self.context_length,
            self.sequences,
            gib(self.activation_bytes),
            if self.draft_bytes > 0 {
                format!(" + draft model {}", gib(self.draft_bytes))
            } else {
                String::new()
            },
            gib(self.runtime_overhead_bytes)
        )
    }
}

pub use jemma_serve::memory::gib;

pub use crate::nn::dtype_bytes;

fn dtype_size(name: &str) -> Option<u64> {
    Some(match name {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

/// Tensor name, dtype and element count from a safetensors header (without reading the data).
pub(crate) fn read_header(path: &Path) -> Result<Vec<(String, String, u64)>> {
    let io = |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(EngineError::InvalidModel(format!(
            "{}: safetensors header of {n} bytes",
            path.display()
        )));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).map_err(io)?;
    let v: Value = serde_json::from_slice(&buf)
        .map_err(|e| EngineError::InvalidModel(format!("{}: header: {e}", path.display())))?;
    let mut out = vec![];
    for (name, t) in v.as_object().into_iter().flatten() {
        if name == "__metadata__" {
            continue;
        }
        let dtype = t.get("dtype").and_then(Value::as_str).unwrap_or_default();
        let numel = t
            .get("shape")
            .and_then(Value::as_array)
            .map(|s| s.iter().map(|d| d.as_u64().unwrap_or(0)).product())
            .unwrap_or(0);
        out.push((name.clone(), dtype.to_string(), numel));
    }
    Ok(out)
}

/// Bytes a Gemma 4 assistant (MTP) drafter's weights hold once loaded (floats at `compute_dtype_bytes`
/// when given): all it holds, as it keeps no cache of its own.
///
/// Errors: unreadable weight files or an unknown safetensors dtype.
pub fn assistant_bytes(dir: &Path, compute_dtype_bytes: Option<u64>) -> Result<u64> {
    let mut weights = 0u64;
    for f in weight_files(dir)? {
        for (name, dtype, numel) in read_header(&f)? {
            let size = dtype_size(&dtype).ok_or_else(|| {
                EngineError::Unsupported(format!("{name}: safetensors dtype {dtype}"))
            })?;
            let is_float = matches!(dtype.as_str(), "F32" | "F16" | "BF16" | "F64");
            let scales = name.ends_with(".scales") || name.ends_with(".biases");
            weights += numel
                * match compute_dtype_bytes {
                    Some(c) if is_float && !scales => c,
                    _ => size,
                };
        }
    }
    Ok(weights)
}

/// Estimates the footprint of the model in `dir` served with activations in `compute_dtype_bytes` (4 for
/// float32, 2 for bf16/f16; None = the checkpoint's float dtype), a context of `context` tokens (None = the
/// model's maximum) and prefill chunks of `prefill_step` tokens.
/// `attention_budget` is the generation's cap on a chunk's attention scores
/// ([`crate::generate::prefill_chunk`]).
pub fn estimate(
    dir: &Path,
    compute_dtype_bytes: Option<u64>,
    context: Option<usize>,
    prefill_step: usize,
    attention_budget: Option<u64>,
) -> Result<Footprint> {
    let cfg = ModelConfig::load(dir)?;
    let t = &cfg.text;
    let specs = t.layer_specs()?;
    let first_shared = t.num_hidden_layers - t.num_kv_shared_layers;
    let mut weights = 0u64;
    let mut float_bytes = None;
    for f in weight_files(dir)? {
        for (name, dtype, numel) in read_header(&f)? {
            // The vision and audio towers are loaded whole (their clip bounds included).
            let vision = crate::models::gemma4::vision::tower_key(&name).is_some()
                || crate::models::gemma4::audio::tower_key(&name).is_some();
            let k = match canonical_key(&name) {
                Some(k) => k,
                None if vision => name.clone(),
                None => continue,
            };
            if !vision && crate::models::gemma4::dropped_at_load(&k, first_shared).is_some() {
                continue;
            }
            let size = dtype_size(&dtype).ok_or_else(|| {
                EngineError::Unsupported(format!("{name}: safetensors dtype {dtype}"))
            })?;
            let is_float = matches!(dtype.as_str(), "F32" | "F16" | "BF16" | "F64");
            if is_float && !k.ends_with(".scales") && !k.ends_with(".biases") {
                float_bytes.get_or_insert(size);
            }
            let held = match compute_dtype_bytes {
                Some(c) if is_float => c,
                _ => size,
            };
            weights += numel * held;
        }
    }
    let elem = compute_dtype_bytes.or(float_bytes).unwrap_or(2);
    let ctx = context
        .unwrap_or(t.max_position_embeddings)
        .clamp(1, t.max_position_embeddings.max(1));
    let chunk = prefill_step.clamp(1, ctx);
    let full_len = ctx.div_ceil(KV_STEP) * KV_STEP;
    // Prefill runs over all but the last prompt token in chunks; a chunk of T tokens starting at `done`
    // attends over done+T keys in full layers and over the window plus itself in sliding ones.
    let has_full = specs.iter().any(|s| s.layer_type == LayerType::Full);
    let (mut max_ts, mut done) = (0usize, 0usize);
    while ctx > 1 && done < ctx - 1 {
        let t_len = crate::generate::prefill_chunk(
            done,
            ctx - 1 - done,
            prefill_step,
            t.num_attention_heads,
            elem,
            attention_budget,
        );
        let keys = if has_full {
            done + t_len
        } else {
            done.min(t_len.max(t.sliding_window)) + t_len
        };
        max_ts = max_ts.max(t_len * keys);
        done += t_len;
    }
    let mut kv = 0u64;
    for s in specs.iter().filter(|s| s.has_kv) {
        let positions = match s.layer_type {
            LayerType::Full => full_len,
            // A rotating cache keeps the window, plus one chunk while that chunk is being attended, and
            // once the window has filled, a window per rollback point the prefill keeps.
            LayerType::Sliding => {
                (t.sliding_window + chunk).min(full_len)
                    + if full_len > t.sliding_window {
                        crate::generate::ROLLBACK_POINTS * t.sliding_window
                    } else {
                        0
                    }
            }
        };
        kv += (positions * s.n_kv_heads * s.head_dim * 2) as u64 * elem;
    }
    // Calibrated against MLX's peak memory on the fixture models (tests/e2e/cli.rs): the attention scores of
    // the largest chunk (MLX's attention materialises them on the CPU, and on Metal for Gemma's 256/512-wide
    // heads) with ~1/8 of a second copy live while the softmax runs, plus per token of the chunk the hidden
    // states, the MLP (dense and routed experts) intermediates, every layer's per-layer input and the
    // projected queries/keys.
    let scores = (t.num_attention_heads * max_ts) as u64 * elem * 9 / 8;
    let mlp = specs.iter().map(|s| s.intermediate_size).max().unwrap_or(0)
        + t.moe_intermediate_size.unwrap_or(0) * t.top_k_experts.unwrap_or(0);
    let heads_width = t.num_attention_heads * t.head_dim.max(t.global_head_dim.unwrap_or(0));
    let per_token =
        (3 * t.hidden_size + 3 * mlp + 2 * t.num_hidden_layers * t.ple_dim() + heads_width) as u64
            * elem;
    // Decode: the last position's logits, their log-softmax and the sampler's copy, in float32.
    let logits = t.vocab_size as u64 * 4 * 3;
    Ok(Footprint {
        weights_bytes: weights,
        kv_cache_bytes: kv,
        activation_bytes: scores
            + per_token * chunk.min(ctx.saturating_sub(1)).max(1) as u64
            + logits,
        runtime_overhead_bytes: RUNTIME_OVERHEAD_BYTES,
        context_length: ctx,
        prefill_chunk: chunk,
        sequences: 1,
        draft_bytes: 0,
    })
}
