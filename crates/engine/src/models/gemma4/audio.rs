//! Gemma 4's audio tower (a Universal Speech Model conformer) and its projection into the text model's
//! embedding space, following mlx-vlm's `gemma4/audio.py` (`AudioEncoder`) and `gemma4.py`
//! (`MultimodalEmbedder`, `embed_audio`) operation for operation, which follow transformers'
//! `Gemma4AudioModel`:
//!
//! 1. log-mel features (1, T, 128) (jemma-media's extractor) go through two 3×3 convolutions of stride 2
//!    (each: padding masked to zero, symmetric padding of 1, LayerNorm over channels, ReLU), flattened and
//!    projected to the tower's width: T/4 frames of 40 ms;
//! 2. conformer blocks, each: a half-step feed-forward, chunked local self-attention (chunks of
//!    `attention_chunk_size` frames seeing `attention_context_left - 1` frames back and
//!    `attention_context_right` ahead, relative sinusoidal positions, a learned per-dimension query scale,
//!    logits soft-capped), a light convolution (GLU, causal depthwise conv, RMS norm, SiLU), another
//!    half-step feed-forward; activations clipped to ±`gradient_clipping` around each part;
//! 3. `output_proj` (with bias), padding frames zeroed, then `embed_audio`: a scale-free RMS norm and a
//!    projection to the text hidden size.
//!
//! The clip's soft tokens are the output rows that cover audio (padding rows come last), as transformers
//! scatters `audio_features[audio_mask]`; jemma-media's `FeatureExtractor::soft_tokens` counts them.
//!
//! Activations stay float32 whatever the weights' dtype, as in mlx-vlm, whose float32 features promote
//! every product with bfloat16 weights to float32.

use mlx_rs::{
    Array, Dtype, fast,
    ops::{self, indexing::TryIndexOp},
};
use serde::Deserialize;

use super::vision::ClippedLinear;
use crate::nn::{Linear, WeightStore, scalar};
use crate::{EngineError, Result};

/// `audio_config` of a Gemma 4 checkpoint (defaults: mlx-vlm's `AudioConfig`, E2B's and E4B's tower).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct AudioConfig {
    /// Width of the conformer.
    pub hidden_size: usize,
    /// Conformer blocks.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Output channels of the two subsampling convolutions.
    pub subsampling_conv_channels: Vec<usize>,
    /// Width of the light convolution's depthwise kernel, frames.
    pub conv_kernel_size: usize,
    /// Weight of each feed-forward's output in its residual.
    pub residual_weight: f32,
    /// Query frames per attention chunk.
    pub attention_chunk_size: usize,
    /// Frames seen back, plus one (the frame itself).
    pub attention_context_left: usize,
    /// Frames seen ahead.
    pub attention_context_right: usize,
    /// Attention logit soft cap.
    pub attention_logit_cap: f32,
    /// The logit of a masked key.
    pub attention_invalid_logits_value: f32,
    /// RMS/Layer norm epsilon.
    pub rms_norm_eps: f32,
    /// Activations are clipped to ± this around each part of a block.
    pub gradient_clipping: f32,
    /// Width of `output_proj` (None: no output projection).
    pub output_proj_dims: Option<usize>,
}

impl Default for AudioConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1024,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            subsampling_conv_channels: vec![128, 32],
            conv_kernel_size: 5,
            residual_weight: 0.5,
            attention_chunk_size: 12,
            attention_context_left: 13,
            attention_context_right: 0,
            attention_logit_cap: 50.0,
            attention_invalid_logits_value: -1e9,
            rms_norm_eps: 1e-6,
            gradient_clipping: 1e10,
            output_proj_dims: Some(1536),
        }
    }
}

/// Mel bins the subsampling expects (mlx-vlm's `INPUT_FEAT_SIZE`).
pub const MEL_BINS: usize = 128;

/// The default epsilon of mlx-vlm's `AudioRMSNorm` (the blocks' norms that are not given the config's).
const NORM_EPS: f32 = 1e-6;

struct FeedForward {
    pre_layer_norm: Array,
    ffw_layer_1: ClippedLinear,
    ffw_layer_2: ClippedLinear,
    post_layer_norm: Array,
}

struct Attention {
    q_proj: ClippedLinear,
    k_proj: ClippedLinear,
    v_proj: ClippedLinear,
    post: ClippedLinear,
    relative_k_proj: Linear,
    per_dim_scale: Array,
}

struct LightConv {
    pre_layer_norm: Array,
    linear_start: ClippedLinear,
    /// (hidden, kernel, 1): MLX's channel-last layout.
    depthwise: Array,
    conv_norm: Array,
    linear_end: ClippedLinear,
}

struct Block {
    feed_forward1: FeedForward,
    self_attn: Attention,
    lconv1d: LightConv,
    feed_forward2: FeedForward,
    norm_pre_attn: Array,
    norm_post_attn: Array,
    norm_out: Array,
}

/// Gemma 4's audio tower with its `embed_audio` projection (see the module docs).
pub struct AudioTower {
    cfg: AudioConfig,
    /// (out, 3, 3, in) per subsampling convolution, with its LayerNorm weight.
    convs: Vec<(Array, Array)>,
    input_proj: Linear,
    blocks: Vec<Block>,
    /// `output_proj`: weight and bias.
    output_proj: Option<(Linear, Array)>,
    projection: Linear,
    dtype: Dtype,
}

/// A Hugging Face Conv2d weight (out, in, kH, kW) in MLX's layout (out, kH, kW, in); one already in MLX's
/// layout (mlx-vlm's converted checkpoints) is kept, as mlx-vlm's `sanitize` decides by its last axis.
fn conv2d_weight(w: Array, expected_in: i32) -> Result<Array> {
    let s = w.shape();
    if s.len() == 4 && s[3] == expected_in && s[1] != expected_in {
        return Ok(w);
    }
    Ok(w.transpose_axes(&[0, 2, 3, 1])?)
}

impl AudioTower {
    /// Takes the tower's tensors (`audio_tower.*`, `embed_audio.*`, canonical names without `model.`) out
    /// of `store`; `text_hidden` is the text model's width.
    ///
    /// Errors: a missing or misshapen tensor; a configuration the tower cannot run (two subsampling
    /// convolutions, heads dividing the width).
    pub fn load(
        cfg: &AudioConfig,
        text_hidden: usize,
        store: &mut WeightStore,
        dtype: Dtype,
    ) -> Result<Self> {
        let bad = |m: String| Err(EngineError::InvalidModel(format!("audio_config: {m}")));
        if cfg.subsampling_conv_channels.len() != 2 {
            return bad("two subsampling convolutions expected".into());
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return bad("the heads do not divide the width".into());
        }
        if cfg.attention_chunk_size == 0 || cfg.conv_kernel_size == 0 {
            return bad("an empty attention chunk or convolution".into());
        }
        let h = cfg.hidden_size;
        let mut convs = vec![];
        let mut inp = 1;
        for (i, &out) in cfg.subsampling_conv_channels.iter().enumerate() {
            let at = format!("audio_tower.subsample_conv_projection.layer{i}");
            let name = format!("{at}.conv.weight");
            let w = store
                .remove(&name)
                .ok_or_else(|| EngineError::InvalidModel(format!("missing tensor {name}")))?;
            let w = conv2d_weight(w, inp as i32)?;
            if w.shape() != [out as i32, 3, 3, inp as i32] {
                return Err(EngineError::InvalidModel(format!(
                    "{name}: shape {:?}, expected ({out}, {inp}, 3, 3)",
                    w.shape()
                )));
            }
            let norm = store.take(&format!("{at}.norm.weight"), &[out as i32])?;
            convs.push((w.as_dtype(dtype)?, norm));
            inp = out;
        }
        let mut freq = MEL_BINS;
        for _ in 0..2 {
            freq = (freq + 2 - 3) / 2 + 1;
        }
        let input_proj = store.linear(
            "audio_tower.subsample_conv_projection.input_proj_linear",
            h,
            freq * inp,
        )?;
        let clipped = |store: &mut WeightStore, path: String, out: usize, inp: usize| {
            ClippedLinear::load(store, &path, out, inp, true)
        };
        let mut blocks = vec![];
        for i in 0..cfg.num_hidden_layers {
            let at = |s: &str| format!("audio_tower.layers.{i}.{s}");
            let norm = |store: &mut WeightStore, s: &str| {
                store.take(&format!("{}.weight", at(s)), &[h as i32])
            };
            let ff = |store: &mut WeightStore, s: &str| -> Result<FeedForward> {
                Ok(FeedForward {
                    pre_layer_norm: norm(store, &format!("{s}.pre_layer_norm"))?,
                    ffw_layer_1: clipped(store, at(&format!("{s}.ffw_layer_1")), 4 * h, h)?,
                    ffw_layer_2: clipped(store, at(&format!("{s}.ffw_layer_2")), h, 4 * h)?,
                    post_layer_norm: norm(store, &format!("{s}.post_layer_norm"))?,
                })
            };
            let feed_forward1 = ff(store, "feed_forward1")?;
            let self_attn = Attention {
                q_proj: clipped(store, at("self_attn.q_proj"), h, h)?,
                k_proj: clipped(store, at("self_attn.k_proj"), h, h)?,
                v_proj: clipped(store, at("self_attn.v_proj"), h, h)?,
                post: clipped(store, at("self_attn.post"), h, h)?,
                relative_k_proj: store.linear(&at("self_attn.relative_k_proj"), h, h)?,
                per_dim_scale: store.take(
                    &at("self_attn.per_dim_scale"),
                    &[(h / cfg.num_attention_heads) as i32],
                )?,
            };
            let name = at("lconv1d.depthwise_conv1d.weight");
            let dw = store
                .remove(&name)
                .ok_or_else(|| EngineError::InvalidModel(format!("missing tensor {name}")))?;
            // Hugging Face (hidden, 1, kernel) → MLX (hidden, kernel, 1), unless already so.
            let dw = if dw.shape().last() == Some(&1) && dw.shape().len() == 3 {
                dw
            } else {
                dw.transpose_axes(&[0, 2, 1])?
            };
            if dw.shape() != [h as i32, cfg.conv_kernel_size as i32, 1] {
                return Err(EngineError::InvalidModel(format!(
                    "{name}: shape {:?}, expected ({h}, 1, {})",
                    dw.shape(),
                    cfg.conv_kernel_size
                )));
            }
            let lconv1d = LightConv {
                pre_layer_norm: norm(store, "lconv1d.pre_layer_norm")?,
                linear_start: clipped(store, at("lconv1d.linear_start"), 2 * h, h)?,
                depthwise: dw.as_dtype(dtype)?,
                conv_norm: norm(store, "lconv1d.conv_norm")?,
                linear_end: clipped(store, at("lconv1d.linear_end"), h, h)?,
            };
            let feed_forward2 = ff(store, "feed_forward2")?;
            blocks.push(Block {
                feed_forward1,
                self_attn,
                lconv1d,
                feed_forward2,
                norm_pre_attn: norm(store, "norm_pre_attn")?,
                norm_post_attn: norm(store, "norm_post_attn")?,
                norm_out: norm(store, "norm_out")?,
            });
        }
        let (output_proj, out_dim) = match cfg.output_proj_dims {
            Some(d) => (
                Some((
                    store.linear("audio_tower.output_proj", d, h)?,
                    store.take("audio_tower.output_proj.bias", &[d as i32])?,
                )),
                d,
            ),
            None => (None, h),
        };
        let projection = store.linear("embed_audio.embedding_projection", text_hidden, out_dim)?;
        Ok(Self {
            cfg: cfg.clone(),
            convs,
            input_proj,
            blocks,
            output_proj,
            projection,
            dtype,
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &AudioConfig {
        &self.cfg
    }

    /// The soft tokens of one clip's features (jemma-media's [`jemma_media::audio::AudioFeatures`]):
    /// the first `soft_tokens` rows of [`AudioTower::encode`] (those that cover audio), (1, soft_tokens,
    /// text hidden).
    ///
    /// Errors: as [`AudioTower::encode`]; `soft_tokens` of 0 or more than the rows the tower makes.
    pub fn encode_features(
        &self,
        features: &jemma_media::audio::AudioFeatures,
        soft_tokens: usize,
    ) -> Result<Array> {
        if soft_tokens == 0 {
            return Err(EngineError::InvalidRequest(
                "an audio clip too short to hear".into(),
            ));
        }
        let t = features.frames as i32;
        let x = Array::from_slice(&features.data, &[1, t, features.bins as i32]);
        let invalid: Vec<bool> = features.valid.iter().map(|v| !v).collect();
        let mask = Array::from_slice(&invalid, &[1, t]);
        let enc = self.encode(&x, &mask)?;
        let rows = enc.shape()[1] as usize;
        if soft_tokens > rows {
            return Err(EngineError::InvalidRequest(format!(
                "{soft_tokens} audio soft tokens asked of a clip the tower makes {rows} of"
            )));
        }
        Ok(enc.try_index((.., ..soft_tokens as i32, ..))?)
    }

    /// The tower and its projection over `features` (1, T, 128) with `mask` (1, T) true at padding frames
    /// → (1, T', text hidden), T' ≈ T / 4, padding frames zero before the projection.
    ///
    /// Errors: another shape; MLX failures.
    pub fn encode(&self, features: &Array, mask: &Array) -> Result<Array> {
        let shape = features.shape();
        if shape.len() != 3 || shape[0] != 1 || shape[2] != MEL_BINS as i32 || shape[1] < 1 {
            return Err(EngineError::InvalidRequest(format!(
                "audio features of shape {shape:?}, expected (1, T, {MEL_BINS})"
            )));
        }
        let cfg = &self.cfg;
        let eps = cfg.rms_norm_eps;
        // Subsampling: [B, T, F, C], mask [B, T] true where padding.
        // float32 activations, as mlx-vlm's float32 features make them (see the module docs).
        let mut x = features.as_dtype(Dtype::Float32)?.expand_dims(-1)?;
        let mut mask = mask.clone();
        let zero = scalar(0.0, Dtype::Float32)?;
        for (w, norm) in &self.convs {
            x = ops::select(&mask.expand_dims(-1)?.expand_dims(-1)?, &zero, &x)?;
            x = ops::pad(&x, &[(0, 0), (1, 1), (1, 1), (0, 0)], None, None)?;
            x = ops::conv2d(&x, w.as_dtype(x.dtype())?, (2, 2), (0, 0), None, None)?;
            let t_out = x.shape()[1];
            // mask[:, ::2][:, :t_out]
            let t_in = mask.shape()[1];
            let keep: Vec<i32> = (0..t_in).step_by(2).take(t_out as usize).collect();
            mask = mask.take_axis(Array::from_slice(&keep, &[keep.len() as i32]), 1)?;
            x = fast::layer_norm(&x, Some(norm), None, eps)?;
            x = ops::maximum(&x, &zero)?;
        }
        let (b, t, f, c) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
        let mut x = self.input_proj.forward(&x.reshape(&[b, t, f * c])?)?;

        let causal_valid = self.causal_valid_mask();
        let valid = mask.logical_not()?;
        for blk in &self.blocks {
            x = self.block(blk, &x, &valid, &causal_valid)?;
        }
        if let Some((p, bias)) = &self.output_proj {
            x = ops::add(p.forward(&x)?, bias)?;
        }
        let x = ops::select(&mask.expand_dims(-1)?, &zero, &x)?;
        let normed = fast::rms_norm(&x, None, eps)?;
        self.projection.forward(&normed)
    }

    fn horizons(&self) -> (usize, usize, usize, usize) {
        let c = &self.cfg;
        let past = c.attention_context_left.saturating_sub(1);
        let future = c.attention_context_right;
        let chunk = c.attention_chunk_size;
        (chunk, past, future, chunk + past + future)
    }

    /// (chunk, context): which context frames a query frame of a chunk may see (mlx-vlm's
    /// `_build_causal_valid_mask`).
    fn causal_valid_mask(&self) -> Array {
        let (chunk, past, future, context) = self.horizons();
        let mut m = vec![false; chunk * context];
        for q in 0..chunk {
            for k in 0..context {
                let dist = q as i64 + past as i64 - k as i64;
                let past_ok = dist >= 0 && dist < past as i64;
                let future_ok = dist < 0 && -dist < future as i64;
                m[q * context + k] = past_ok || future_ok;
            }
        }
        Array::from_slice(&m, &[chunk as i32, context as i32])
    }

    fn clip(&self, x: &Array) -> Result<Array> {
        let g = self.cfg.gradient_clipping;
        let dt = x.dtype();
        Ok(ops::minimum(
            ops::maximum(x, scalar(-g, dt)?)?,
            scalar(g, dt)?,
        )?)
    }

    fn feed_forward(&self, ff: &FeedForward, x: &Array) -> Result<Array> {
        let h = self.clip(x)?;
        let h = fast::rms_norm(&h, Some(&ff.pre_layer_norm), NORM_EPS)?;
        let h = ff.ffw_layer_1.forward(&h)?;
        let h = mlx_rs::nn::silu(&h)?;
        let h = ff.ffw_layer_2.forward(&h)?;
        let h = self.clip(&h)?;
        let h = fast::rms_norm(&h, Some(&ff.post_layer_norm), NORM_EPS)?;
        Ok(ops::add(
            x,
            ops::multiply(&h, scalar(self.cfg.residual_weight, h.dtype())?)?,
        )?)
    }

    fn block(&self, blk: &Block, x: &Array, valid: &Array, causal_valid: &Array) -> Result<Array> {
        let x = self.feed_forward(&blk.feed_forward1, x)?;
        let h = self.clip(&x)?;
        let h = fast::rms_norm(&h, Some(&blk.norm_pre_attn), NORM_EPS)?;
        let h = self.attention(&blk.self_attn, &h, valid, causal_valid)?;
        let h = self.clip(&h)?;
        let x = ops::add(&x, fast::rms_norm(&h, Some(&blk.norm_post_attn), NORM_EPS)?)?;
        let x = ops::multiply(&x, valid.expand_dims(-1)?.as_dtype(x.dtype())?)?;
        let x = self.light_conv(&blk.lconv1d, &x)?;
        let x = self.feed_forward(&blk.feed_forward2, &x)?;
        let x = self.clip(&x)?;
        Ok(fast::rms_norm(&x, Some(&blk.norm_out), NORM_EPS)?)
    }

    fn light_conv(&self, lc: &LightConv, x: &Array) -> Result<Array> {
        let h = fast::rms_norm(x, Some(&lc.pre_layer_norm), self.cfg.rms_norm_eps)?;
        let h = lc.linear_start.forward(&h)?;
        let halves = ops::split_equal(&h, 2, -1)?;
        let h = ops::multiply(&halves[0], ops::sigmoid(&halves[1])?)?;
        let k = self.cfg.conv_kernel_size as i32;
        let h = ops::pad(&h, &[(0, 0), (k - 1, 0), (0, 0)], None, None)?;
        let channels = h.shape()[2];
        let h = ops::conv1d(&h, lc.depthwise.as_dtype(h.dtype())?, 1, 0, 1, channels)?;
        let h = self.clip(&h)?;
        let h = fast::rms_norm(&h, Some(&lc.conv_norm), self.cfg.rms_norm_eps)?;
        let h = mlx_rs::nn::silu(&h)?;
        let h = lc.linear_end.forward(&h)?;
        Ok(ops::add(&h, x)?)
    }

    /// `x` [B, T, …] padded on the time axis and cut into `[B, blocks, context, …]` windows starting every
    /// `chunk` frames (mlx-vlm's `_extract_block_context`).
    fn block_context(&self, x: &Array) -> Result<Array> {
        let (chunk, past, future, context) = self.horizons();
        let nd = x.ndim();
        let mut widths = vec![(0, 0); nd];
        widths[1] = (past as i32, (future + chunk - 1) as i32);
        let x = ops::pad(x, &widths[..], None, None)?;
        let tp = x.shape()[1] as usize;
        let blocks = (tp - context) / chunk + 1;
        let mut idx = Vec::with_capacity(blocks * context);
        for u in 0..blocks {
            for o in 0..context {
                idx.push((u * chunk + o) as i32);
            }
        }
        let idx = Array::from_slice(&idx, &[blocks as i32, context as i32]);
        Ok(x.take_axis(&idx, 1)?)
    }

    fn attention(
        &self,
        a: &Attention,
        x: &Array,
        valid: &Array,
        causal_valid: &Array,
    ) -> Result<Array> {
        let cfg = &self.cfg;
        let (chunk, past, future, context) = self.horizons();
        let (b, t) = (x.shape()[0], x.shape()[1]);
        let n = cfg.num_attention_heads as i32;
        let hd = (cfg.hidden_size / cfg.num_attention_heads) as i32;
        let f32_ = Dtype::Float32;
        let heads = |y: Array| -> Result<Array> { Ok(y.as_dtype(f32_)?.reshape(&[b, t, n, hd])?) };
        let q = heads(a.q_proj.forward(x)?)?;
        let k = heads(a.k_proj.forward(x)?)?;
        let v = heads(a.v_proj.forward(x)?)?;
        let ln2 = std::f32::consts::LN_2;
        let q_scale = (hd as f32).powf(-0.5) / ln2;
        let k_scale = (1.0 + std::f32::consts::E).ln() / ln2;
        let per_dim = mlx_rs::nn::softplus(a.per_dim_scale.as_dtype(f32_)?)?;
        let q = ops::multiply(&q, ops::multiply(Array::from_f32(q_scale), &per_dim)?)?;
        let k = ops::multiply(&k, Array::from_f32(k_scale))?;

        // Queries in chunks [B, U, W, N, H]; keys and values in context windows [B, U, C, N, H].
        let u = (t as usize).div_ceil(chunk) as i32;
        let pad = u * chunk as i32 - t;
        let qb = if pad > 0 {
            ops::pad(&q, &[(0, 0), (0, pad), (0, 0), (0, 0)], None, None)?
        } else {
            q
        };
        let qb = qb.reshape(&[b, u, chunk as i32, n, hd])?;
        let kb = self.block_context(&k)?;
        let vb = self.block_context(&v)?;
        let valid_ctx = self.block_context(valid)?; // [B, U, C]
        let condition = ops::logical_and(
            &valid_ctx.reshape(&[b, 1, u, 1, context as i32])?,
            &causal_valid.reshape(&[1, 1, 1, chunk as i32, context as i32])?,
        )?;

        // Relative position logits (mlx-vlm's AudioRelativePositionEmbedding).
        let span: Vec<f32> = (-(future as i64)..=past as i64)
            .rev()
            .map(|p| p as f32)
            .collect();
        let s = span.len() as i32;
        let timescales = (cfg.hidden_size / 2) as i32;
        let inc = (10000f32).ln() / ((timescales - 1).max(1) as f32);
        let inv = ops::exp(ops::multiply(
            ops::arange::<_, f32>(0, timescales, None)?,
            Array::from_f32(-inc),
        )?)?;
        let scaled = ops::multiply(
            Array::from_slice(&span, &[1, s, 1]),
            inv.reshape(&[1, 1, timescales])?,
        )?;
        let signal = ops::concatenate(&[ops::sin(&scaled)?, ops::cos(&scaled)?], -1)?;
        let sin_emb = a
            .relative_k_proj
            .forward(&signal.as_dtype(self.dtype)?)?
            .as_dtype(f32_)?
            .reshape(&[s, n, hd])?;
        let qp = qb.transpose_axes(&[0, 3, 1, 2, 4])?; // [B, N, U, W, H]
        let kp = kb.transpose_axes(&[0, 3, 1, 4, 2])?; // [B, N, U, H, C]
        let term_ac = ops::matmul(&qp, &kp)?;
        let sin_t = sin_emb.transpose_axes(&[1, 2, 0])?; // [N, H, S]
        let w = chunk as i32;
        let term_bd =
            ops::matmul(&qp.reshape(&[b, n, u * w, hd])?, &sin_t)?.reshape(&[b, n, u, w, s])?;
        // Relative shift: pad to C + 1, fold, drop the tail, unfold.
        let c = context as i32;
        let term_bd = ops::pad(
            &term_bd,
            &[(0, 0), (0, 0), (0, 0), (0, 0), (0, c + 1 - s)],
            None,
            None,
        )?
        .reshape(&[b, n, u, w * (c + 1)])?
        .try_index((.., .., .., ..w * c))?
        .reshape(&[b, n, u, w, c])?;
        let logits = ops::add(&term_ac, &term_bd)?;
        let cap = Array::from_f32(cfg.attention_logit_cap);
        let logits = ops::multiply(ops::tanh(ops::divide(&logits, &cap)?)?, &cap)?;
        let logits = ops::select(
            &condition,
            &logits,
            Array::from_f32(cfg.attention_invalid_logits_value),
        )?;
        let probs = ops::softmax_axis(&logits, -1, None)?;
        // einsum("bnuwc,bucnh->buwnh")
        let vp = vb.transpose_axes(&[0, 3, 1, 2, 4])?; // [B, N, U, C, H]
        let ctx = ops::matmul(&probs, &vp)?; // [B, N, U, W, H]
        let ctx = ctx
            .transpose_axes(&[0, 2, 3, 1, 4])?
            .reshape(&[b, u * w, n, hd])?
            .try_index((.., ..t, .., ..))?
            .reshape(&[b, t, n * hd])?;
        a.post.forward(&ctx)
    }
}

/// Whether a checkpoint key (HF `model.audio_tower.…`, MLX `audio_tower.…`) belongs to the audio tower or
/// its projection; its canonical name (without `model.`) when it does.
pub fn tower_key(key: &str) -> Option<&str> {
    let k = key.strip_prefix("model.").unwrap_or(key);
    (k.starts_with("audio_tower.") || k.starts_with("embed_audio.")).then_some(k)
}

/// Whether the checkpoint in `dir` has an audio tower (an `audio_config` and tower tensors), read from its
/// config and safetensors headers without loading anything. False when unreadable.
pub fn hears_audio(dir: &std::path::Path) -> bool {
    super::has_tower(dir, "audio_config", tower_key)
}

/// Loads the audio tower of the Gemma 4 checkpoint in `dir` (its `config.json` `audio_config` and the
/// `audio_tower.*` / `embed_audio.*` tensors; every one of them used). `dtype`: None keeps the checkpoint's.
/// None when the checkpoint has no audio tower.
///
/// Errors: an unreadable checkpoint, a misshapen or unused tower tensor, a bad `audio_config`.
pub fn load_tower(dir: &std::path::Path, dtype: Option<Dtype>) -> Result<Option<AudioTower>> {
    let Some(t) = super::read_tower::<AudioConfig>(dir, "audio_config", tower_key)? else {
        return Ok(None);
    };
    let dtype = match dtype {
        Some(d) => d,
        None => t
            .tensors
            .get("audio_tower.subsample_conv_projection.input_proj_linear.weight")
            .map(|a| a.dtype())
            .unwrap_or(Dtype::Float32),
    };
    let mut store = WeightStore::new(
        t.tensors,
        super::config::Quantization::default(),
        Some(dtype),
    );
    let tower = AudioTower::load(&t.cfg, t.text_hidden, &mut store, dtype)?;
    store.finish()?;
    Ok(Some(tower))
}
