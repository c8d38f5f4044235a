//! Gemma 4's multi-token-prediction "assistant" drafter (`model_type: "gemma4_assistant"`), following
//! mlx-vlm's `speculative/drafters/gemma4_assistant` (itself transformers' `Gemma4AssistantForCausalLM`).
//!
//! A few Gemma 4 decoder layers with no K/V of their own: every layer attends over the K/V that the
//! target's last layer of its type wrote (the target's cache, read as it is). One draft step reads the
//! target's scaled embedding of a token beside a hidden state of the target's width (the target's final
//! hidden state at the first step, the drafter's own projection of its output after), and returns the
//! next such hidden state and its logits:
//!
//! ```text
//! x  = pre_projection([embed_target(t) · √H_target ; g])      (1, 1, 2B) → (1, 1, h)
//! hn = norm(layers(x, K/V of the target, query at the pending token's position P))
//! g' = post_projection(hn)                                     (1, 1, B)
//! logits = head(hn)                                            (1, 1, V), no soft cap
//! ```
//!
//! The head is the tied embedding, an untied `lm_head`, or (E2B/E4B drafters, `use_ordered_embeddings`) a
//! centroid-routed sparse head: the `top_k` best of `num_centroids` token clusters are scored exactly and
//! every other token gets the smallest selected logit minus one (mlx-vlm `MaskedEmbedder`).
//!
//! P is where transformers' candidate generator (the checkpoints' reference) and llama.cpp put the query;
//! mlx-vlm puts it one position earlier, and so drafts other tokens ([`Gemma4Assistant::step_at`]).

use mlx_rs::{
    Array, Dtype, fast,
    ops::{self, indexing::TryIndexOp},
};
use serde::Deserialize;
use serde_json::Value;

use super::Gemma4;
use super::config::{LayerSpec, LayerType, TextConfig};
use super::model::{Consts, DecoderLayer, Mask, Rows};
use crate::cache::Kv;
use crate::nn::{Embedding, Linear, WeightStore};
use crate::{EngineError, Result};

fn default_centroids() -> usize {
    2048
}
fn default_top_k() -> usize {
    32
}
fn yes() -> bool {
    true
}

/// An assistant drafter's `config.json` (transformers' `Gemma4AssistantConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct AssistantConfig {
    /// The target's hidden size: the width of the hidden state a draft step reads and returns.
    pub backbone_hidden_size: usize,
    /// The centroid-routed sparse LM head (E2B/E4B drafters).
    #[serde(default)]
    pub use_ordered_embeddings: bool,
    /// Token clusters of the sparse head.
    #[serde(default = "default_centroids")]
    pub num_centroids: usize,
    /// Clusters scored exactly per step.
    #[serde(default = "default_top_k")]
    pub centroid_intermediate_top_k: usize,
    /// The LM head is the drafter's embedding table.
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// The decoder layers' settings.
    #[serde(skip)]
    pub text: TextConfig,
}

impl AssistantConfig {
    /// Reads `config.json` of a drafter.
    ///
    /// Errors: not a `gemma4_assistant` config, or one whose layers need what a drafter has not
    /// (per-layer inputs, experts) ([`EngineError::InvalidModel`]).
    pub fn from_value(v: &Value) -> Result<Self> {
        if v.get("model_type").and_then(Value::as_str) != Some("gemma4_assistant") {
            return Err(EngineError::InvalidModel(
                "not a Gemma 4 assistant drafter (model_type gemma4_assistant)".into(),
            ));
        }
        let mut cfg: AssistantConfig = serde_json::from_value(v.clone())
            .map_err(|e| EngineError::InvalidModel(format!("config.json: {e}")))?;
        let mut text = v
            .get("text_config")
            .cloned()
            .ok_or_else(|| EngineError::InvalidModel("config.json has no text_config".into()))?;
        if let Value::Object(m) = &mut text {
            // transformers' defaults for a drafter's layers where mlx-lm's text defaults differ: no
            // per-layer inputs, and every layer reads the target's K/V.
            m.entry("hidden_size_per_layer_input")
                .or_insert(Value::from(0));
            let n = m
                .get("num_hidden_layers")
                .cloned()
                .unwrap_or(Value::from(0));
            m.insert("num_kv_shared_layers".into(), n);
            m.remove("quantization");
        }
        cfg.text = serde_json::from_value(text)
            .map_err(|e| EngineError::InvalidModel(format!("config.json text_config: {e}")))?;
        let t = &cfg.text;
        if t.ple_dim() > 0 || t.enable_moe_block || t.hidden_size == 0 || t.num_hidden_layers == 0 {
            return Err(EngineError::InvalidModel(
                "an assistant drafter's layers have no per-layer inputs nor experts".into(),
            ));
        }
        if cfg.use_ordered_embeddings
            && (cfg.num_centroids == 0
                || !t.vocab_size.is_multiple_of(cfg.num_centroids)
                || cfg.centroid_intermediate_top_k == 0
                || cfg.centroid_intermediate_top_k > cfg.num_centroids)
        {
            return Err(EngineError::InvalidModel(format!(
                "{} centroids with top_k {} do not divide a vocabulary of {}",
                cfg.num_centroids, cfg.centroid_intermediate_top_k, t.vocab_size
            )));
        }
        Ok(cfg)
    }

    /// Checks from the two `config.json` files alone that the assistant drafter in `draft` was made for
    /// the model in `target`: its backbone width, vocabulary and sliding window are the target's. A
    /// cheap test for drafters found next to a model; loading checks the rest
    /// ([`Gemma4Assistant::check_target`]).
    ///
    /// Errors: unreadable configs, not a drafter, or the first mismatch ([`EngineError::InvalidModel`]).
    pub fn check_target_dir(draft: &std::path::Path, target: &std::path::Path) -> Result<()> {
        let path = draft.join("config.json");
        let v: Value = std::fs::read_to_string(&path)
            .map_err(|source| EngineError::Io {
                path: path.clone(),
                source,
            })
            .and_then(|s| {
                serde_json::from_str(&s)
                    .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", path.display())))
            })?;
        let d = Self::from_value(&v)?;
        let t = super::ModelConfig::load(target)?.text;
        let mismatch = [
            ("width", d.backbone_hidden_size, t.hidden_size),
            ("vocabulary", d.text.vocab_size, t.vocab_size),
            ("sliding window", d.text.sliding_window, t.sliding_window),
        ]
        .into_iter()
        .find(|(_, a, b)| a != b);
        match mismatch {
            Some((what, a, b)) => Err(EngineError::InvalidModel(format!(
                "a drafter for another model: its {what} is {a}, the target's {b}"
            ))),
            None => Ok(()),
        }
    }

    /// Whether `config.json` in `dir` is an assistant drafter's (false when unreadable).
    pub fn is_assistant(dir: &std::path::Path) -> bool {
        std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .is_some_and(|v| {
                v.get("model_type").and_then(Value::as_str) == Some("gemma4_assistant")
            })
    }

    /// The layers' specs: the text model's, with no K/V of their own and a plain MLP.
    fn specs(&self) -> Result<Vec<LayerSpec>> {
        let t = &self.text;
        t.layer_types()?
            .into_iter()
            .map(|ty| {
                let rope = t.rope_for(ty);
                if !matches!(rope.rope_type.as_str(), "default" | "proportional") {
                    return Err(EngineError::Unsupported(format!(
                        "rope_type {:?} (Gemma 4 uses default and proportional)",
                        rope.rope_type
                    )));
                }
                Ok(LayerSpec {
                    layer_type: ty,
                    head_dim: match (ty, t.global_head_dim) {
                        (LayerType::Full, Some(g)) if g > 0 => g,
                        _ => t.head_dim,
                    },
                    n_kv_heads: t.num_key_value_heads,
                    k_eq_v: false,
                    has_kv: false,
                    kv_source: 0,
                    intermediate_size: t.intermediate_size,
                    rope,
                })
            })
            .collect()
    }
}

/// The centroid-routed sparse LM head (mlx-vlm `MaskedEmbedder`).
struct MaskedHead {
    centroids: Linear,
    /// (num_centroids, V / num_centroids) int32: the canonical token ids of each cluster.
    ordering: Array,
    top_k: i32,
    n_centroids: i32,
}

/// The K/V of one layer type of the target, as a drafter layer of that type attends over it.
#[derive(Clone)]
pub struct SharedKv {
    /// Keys and values (1, kv_heads, S, D), in temporal order.
    pub kv: Kv,
    /// Absolute position of the first (0 unless a sliding window dropped older positions).
    pub first: i32,
}

/// The target's K/V for one draft step: per layer type, [sliding, full].
pub type TargetKv = [Option<SharedKv>; 2];

/// A loaded assistant drafter.
pub struct Gemma4Assistant {
    cfg: AssistantConfig,
    dtype: Dtype,
    embed_tokens: Embedding,
    pre_projection: Linear,
    post_projection: Linear,
    layers: Vec<DecoderLayer>,
    norm: Array,
    lm_head: Option<Linear>,
    masked: Option<MaskedHead>,
    consts: Consts,
}

impl Gemma4Assistant {
    /// Loads a drafter checkpoint directory in `dtype` (None: the checkpoint's).
    ///
    /// Errors: not an assistant drafter, a missing, misshapen or unused tensor
    /// ([`EngineError::InvalidModel`]); I/O.
    pub fn load(dir: &std::path::Path, dtype: Option<Dtype>) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
            path: path.clone(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", path.display())))?;
        let cfg = AssistantConfig::from_value(&v)?;
        let quantization = super::config::parse_quantization(v.get("quantization"))?;
        let mut raw = std::collections::HashMap::new();
        for f in super::weight_files(dir)? {
            let t = Array::load_safetensors(&f)
                .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", f.display())))?;
            for (k, a) in t {
                let k = k.strip_prefix("model.").unwrap_or(&k).to_string();
                raw.insert(k, a);
            }
        }
        let dtype = match dtype {
            Some(d) => d,
            None => raw
                .get("embed_tokens.scales")
                .or_else(|| raw.get("embed_tokens.weight"))
                .map(|a| a.dtype())
                .unwrap_or(Dtype::Float32),
        };
        let mut store = WeightStore::new(raw, quantization, Some(dtype));
        let m = Self::from_store(cfg, &mut store, dtype)?;
        store.finish()?;
        Ok(m)
    }

    fn from_store(cfg: AssistantConfig, store: &mut WeightStore, dtype: Dtype) -> Result<Self> {
        let t = &cfg.text;
        let (h, b, v) = (t.hidden_size, cfg.backbone_hidden_size, t.vocab_size);
        let specs = cfg.specs()?;
        let layers = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| DecoderLayer::load(store, t, i, spec))
            .collect::<Result<Vec<_>>>()?;
        let masked = if cfg.use_ordered_embeddings {
            let c = cfg.num_centroids;
            let ordering = store
                .remove("masked_embedding.token_ordering")
                .ok_or_else(|| {
                    EngineError::InvalidModel(
                        "missing tensor masked_embedding.token_ordering".into(),
                    )
                })?;
            if ordering.shape() != [v as i32] {
                return Err(EngineError::InvalidModel(format!(
                    "masked_embedding.token_ordering has shape {:?}, expected [{v}]",
                    ordering.shape()
                )));
            }
            Some(MaskedHead {
                centroids: store.linear("masked_embedding.centroids", c, h)?,
                ordering: ordering
                    .as_dtype(Dtype::Int32)?
                    .reshape(&[c as i32, (v / c) as i32])?,
                top_k: cfg.centroid_intermediate_top_k as i32,
                n_centroids: c as i32,
            })
        } else {
            None
        };
        Ok(Self {
            embed_tokens: store.embedding("embed_tokens", v, h)?,
            pre_projection: store.linear("pre_projection", h, 2 * b)?,
            post_projection: store.linear("post_projection", b, h)?,
            norm: store.take("norm.weight", &[h as i32])?,
            lm_head: if cfg.tie_word_embeddings {
                None
            } else {
                Some(store.linear("lm_head", v, h)?)
            },
            layers,
            masked,
            consts: Consts::new(dtype)?,
            dtype,
            cfg,
        })
    }

    /// The drafter's configuration.
    pub fn config(&self) -> &AssistantConfig {
        &self.cfg
    }

    /// Checks that this drafter can draft for `target`: its width, vocabulary, and for each layer type
    /// it has, the target's K/V of that type (head dimension, a head count its query heads group over,
    /// the same window).
    ///
    /// Errors: [`EngineError::InvalidModel`] naming the mismatch.
    pub fn check_target(&self, target: &Gemma4) -> Result<()> {
        let (t, c) = (target.config(), &self.cfg.text);
        let mismatch = |what: String| {
            Err(EngineError::InvalidModel(format!(
                "the assistant drafter does not fit the target: {what} (an assistant (MTP) drafter \
                 drafts only for the model it was made for)"
            )))
        };
        if self.cfg.backbone_hidden_size != t.hidden_size {
            return mismatch(format!(
                "backbone_hidden_size {} but the target's hidden_size is {}",
                self.cfg.backbone_hidden_size, t.hidden_size
            ));
        }
        if c.vocab_size != t.vocab_size {
            return mismatch(format!(
                "a vocabulary of {} tokens, the target's {}",
                c.vocab_size, t.vocab_size
            ));
        }
        let producers = target.kv_producers();
        for l in &self.layers {
            let ty = l.spec.layer_type;
            let Some((p, _)) = producers[ty as usize] else {
                return mismatch(format!("the target has no {ty:?} layer with K/V"));
            };
            if p.head_dim != l.spec.head_dim || !c.num_attention_heads.is_multiple_of(p.n_kv_heads)
            {
                return mismatch(format!(
                    "{ty:?} heads of {} dimensions over {} K/V heads of {}",
                    l.spec.head_dim, p.n_kv_heads, p.head_dim
                ));
            }
            if l.spec.rope != p.rope {
                return mismatch(format!(
                    "{ty:?} RoPE {:?}, the target's {:?}",
                    l.spec.rope, p.rope
                ));
            }
            if ty == LayerType::Sliding && c.sliding_window != t.sliding_window {
                return mismatch(format!(
                    "a sliding window of {}, the target's {}",
                    c.sliding_window, t.sliding_window
                ));
            }
        }
        Ok(())
    }

    /// The target's K/V that a draft step reads, from the target's `cache` (see
    /// [`Gemma4::kv_producers`]), in the form the target holds it: a full-attention cache that `kv_bits`
    /// quantized is read quantized, as the target's own attention reads it (mlx-lm's
    /// `quantized_scaled_dot_product_attention`). None when the cache is empty.
    ///
    /// Errors: MLX failures.
    pub fn target_kv(target: &Gemma4, cache: &super::Cache) -> Result<Option<TargetKv>> {
        let mut out: TargetKv = [None, None];
        for (slot, p) in target.kv_producers().iter().enumerate() {
            let Some((_, i)) = p else { continue };
            let Some(layer) = cache.layers.get(*i) else {
                return Ok(None);
            };
            match layer.kv()? {
                Some((kv, first)) => out[slot] = Some(SharedKv { kv, first }),
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    /// One draft step with the query at `position`, mlx-vlm's (`draft_block`); see [`Self::step_at`].
    ///
    /// Errors: as [`Self::step_at`].
    pub fn step(
        &self,
        embedding: &Array,
        hidden: &Array,
        kv: &TargetKv,
        position: i32,
    ) -> Result<(Array, Array)> {
        self.step_at(embedding, hidden, kv, position, position)
    }

    /// One draft step: `embedding` (1, 1, B) is the target's scaled embedding of the token drafted from
    /// ([`Gemma4::embed`]), `hidden` (1, 1, B) the target's final hidden state at position `position`
    /// (the last the target read) or the previous step's output; every step of a round reads the same
    /// `kv`, `position` and `query` (mlx-vlm `draft_block`). The query is rotated as at `query`:
    /// transformers' `SinglePositionMultiTokenCandidateGenerator` (`position_ids = input_ids.shape[1] - 1`,
    /// the pending token's) and llama.cpp's driver put it at `position + 1`, mlx-vlm at `position`. Returns
    /// the next hidden state (1, 1, B) and the normed output (1, 1, h) that [`Gemma4Assistant::logits`]
    /// and [`Gemma4Assistant::argmax`] read.
    ///
    /// Sliding layers see the last `window - 1` positions up to `position` (see `sliding_mask`).
    ///
    /// Errors: inputs that are not one row each ([`EngineError::InvalidRequest`]); a layer type whose K/V
    /// is missing ([`EngineError::InvalidModel`]); MLX failures.
    pub fn step_at(
        &self,
        embedding: &Array,
        hidden: &Array,
        kv: &TargetKv,
        position: i32,
        query: i32,
    ) -> Result<(Array, Array)> {
        self.step_rows(
            embedding,
            hidden,
            &[DraftRow {
                kv,
                position,
                query,
            }],
        )
    }

    /// [`Self::step_at`] for B sequences at once: `embedding` (B, 1, H_e) and `hidden` (B, 1, H_t) hold
    /// row `i`'s inputs (H_e the target's embedding width, H_t its hidden width), `rows[i]` its target's
    /// K/V and positions. The projections and MLPs read the
    /// weights once for the whole batch; attention runs row by row over each row's own target K/V (as the
    /// target's batched forward does), so a row's result is its lone step's up to the rounding of a
    /// matrix product over more rows. Returns the next hidden states (B, 1, H_t) and the normed outputs
    /// (B, 1, h).
    ///
    /// Errors: `rows` not one per batch row ([`EngineError::InvalidRequest`]); a layer type whose K/V is
    /// missing for a row ([`EngineError::InvalidModel`]); MLX failures.
    pub fn step_rows(
        &self,
        embedding: &Array,
        hidden: &Array,
        rows: &[DraftRow<'_>],
    ) -> Result<(Array, Array)> {
        let b = batch_of(embedding)?;
        if rows.is_empty() || b as usize != rows.len() || batch_of(hidden)? != b {
            return Err(EngineError::InvalidRequest(format!(
                "a batched draft step takes one row per sequence: embedding {:?}, hidden {:?} for {} rows",
                embedding.shape(),
                hidden.shape(),
                rows.len()
            )));
        }
        let x = ops::concatenate(
            &[
                embedding.as_dtype(self.dtype)?,
                hidden.as_dtype(self.dtype)?,
            ],
            -1,
        )?;
        let mut h = self.pre_projection.forward(&x)?;
        let window = self.cfg.text.sliding_window as i32;
        // Per layer type, each row's mask and the K/V it attends over with its query position.
        let mut masks: [Vec<Mask>; 2] = [vec![], vec![]];
        let mut shared: [Vec<(Kv, i32)>; 2] = [vec![], vec![]];
        for r in rows {
            for ty in 0..2 {
                let Some(s) = &r.kv[ty] else { continue };
                masks[ty].push(if ty == LayerType::Sliding as usize {
                    sliding_mask(s, r.position, window)?
                } else {
                    Mask::None
                });
                shared[ty].push((s.kv.clone(), r.query));
            }
        }
        let eps = self.cfg.text.rms_norm_eps;
        for l in &self.layers {
            let ty = l.spec.layer_type as usize;
            if shared[ty].len() != rows.len() {
                return Err(EngineError::InvalidModel(format!(
                    "no target K/V for the drafter's {:?} layers",
                    l.spec.layer_type
                )));
            }
            let mask: Vec<&Mask> = masks[ty].iter().collect();
            h = l
                .forward(
                    &h,
                    Rows::Batch,
                    &mask,
                    &mut [],
                    Some(&shared[ty]),
                    None,
                    eps,
                    &self.consts,
                )?
                .0;
        }
        let hn = fast::rms_norm(&h, Some(&self.norm), eps)?;
        Ok((self.post_projection.forward(&hn)?, hn))
    }

    /// Logits (B, 1, V) of a step's normed outputs `hn` (B, 1, h): the dense head, or the sparse head
    /// with every token outside a row's selected clusters at that row's smallest selected logit minus one.
    ///
    /// Errors: MLX failures.
    pub fn logits(&self, hn: &Array) -> Result<Array> {
        let Some(m) = &self.masked else {
            return match &self.lm_head {
                Some(head) => head.forward(hn),
                None => self.embed_tokens.as_linear(hn),
            };
        };
        let b = batch_of(hn)?;
        let (ids, scores) = self.selected(m, hn)?;
        let floor = ops::subtract(
            scores.min_axis(-1, true)?,
            Array::from_f32(1.0).as_dtype(scores.dtype())?,
        )?;
        let v = self.cfg.text.vocab_size as i32;
        let full = ops::broadcast_to(&floor, &[b, 1, v])?;
        Ok(full.put_along_axis(ids.reshape(&[b, 1, -1])?, &scores, -1)?)
    }

    /// The greedy tokens (B, 1) int32 of a step's normed outputs `hn` (B, 1, h), without the full logits
    /// under the sparse head (mlx-vlm `MaskedEmbedder.argmax`).
    ///
    /// Errors: MLX failures.
    pub fn argmax(&self, hn: &Array) -> Result<Array> {
        let b = batch_of(hn)?;
        let Some(m) = &self.masked else {
            return Ok(ops::indexing::argmax_axis(&self.logits(hn)?, -1, None)?
                .as_dtype(Dtype::Int32)?
                .reshape(&[b, 1])?);
        };
        let (ids, scores) = self.selected(m, hn)?;
        let best = ops::indexing::argmax_axis(&scores, -1, true)?.reshape(&[b, 1])?;
        Ok(ids
            .take_along_axis(&best, -1)?
            .as_dtype(Dtype::Int32)?
            .reshape(&[b, 1])?)
    }

    /// The sparse head's candidate ids (B, top_k · V/C) int32 of each row of `hn` (B, 1, h) and their
    /// exact logits (B, 1, top_k · V/C).
    fn selected(&self, m: &MaskedHead, hn: &Array) -> Result<(Array, Array)> {
        let b = batch_of(hn)?;
        let c = m.centroids.forward(hn)?.reshape(&[b, -1])?;
        let k = m.top_k;
        let top = ops::argpartition_axis(&c, m.n_centroids - k, -1)?
            .try_index((.., (m.n_centroids - k)..))?;
        let ids = m.ordering.take_axis(&top, 0)?.reshape(&[b, -1])?;
        let rows = self.embed_tokens.forward(&ids)?.as_dtype(self.dtype)?;
        let scores = ops::matmul(hn, rows.transpose_axes(&[0, 2, 1])?)?;
        Ok((ids, scores))
    }
}

/// The batch size of a batch-first array (its first axis).
///
/// Errors: a 0-d array ([`EngineError::InvalidRequest`]).
fn batch_of(a: &Array) -> Result<i32> {
    a.shape()
        .first()
        .copied()
        .ok_or_else(|| EngineError::InvalidRequest("a drafter input without a batch axis".into()))
}

/// One sequence of a batched draft step ([`Gemma4Assistant::step_rows`]).
pub struct DraftRow<'a> {
    /// Its target's K/V ([`Gemma4Assistant::target_kv`]).
    pub kv: &'a TargetKv,
    /// The last position its target read.
    pub position: i32,
    /// The position its query is rotated as at (see [`Gemma4Assistant::step_at`]).
    pub query: i32,
}

/// The sliding layers' mask for a query at `position` over `s`'s keys: the `window - 1` positions up to
/// `position` (keys from `position - window + 2`), what mlx-vlm's drafter masks allow once its buffer has
/// rotated (its steady state). mlx-vlm allows one more while its buffer still holds every position since
/// the first, which would make a draft depend on how the target's cache was filled (a prompt read whole or
/// step by step), so Jemma keeps one rule on every layout. [`Mask::None`] when every key is seen.
fn sliding_mask(s: &SharedKv, position: i32, window: i32) -> Result<Mask> {
    let Kv::Plain(k, _) = &s.kv else {
        return Err(EngineError::InvalidModel(
            "the assistant drafter reads full-precision K/V".into(),
        ));
    };
    let n = k.shape()[2];
    let lo = position - window + 2;
    if s.first >= lo {
        return Ok(Mask::None);
    }
    let seen: Vec<bool> = (0..n).map(|j| s.first + j >= lo).collect();
    Ok(Mask::Array(Array::from_slice(&seen, &[1, n])))
}
