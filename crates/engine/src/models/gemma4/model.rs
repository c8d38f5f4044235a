//! The Gemma 4 text decoder, following mlx-lm's `gemma4_text.py` operation for operation.
//!
//! Field names follow the checkpoint keys. Every float constant is created in the activation dtype (see
//! [`crate::nn::scalar`]) so bf16 runs round exactly as mlx-lm does.

use mlx_rs::{
    Array, Dtype,
    fast::{self, ScaledDotProductAttentionMask},
    ops::{
        self,
        indexing::{TryIndexOp, take_along_axis},
    },
};

use super::config::{LayerSpec, LayerType, ModelConfig, TextConfig};
use crate::cache::{Kv, KvCache, LayerCache, QTensor, RotatingKvCache};
use crate::nn::{Embedding, Linear, SwitchLinear, WeightStore, scalar};
use crate::{EngineError, Result};

/// Constants of one activation dtype, built once.
pub(crate) struct Consts {
    half: Array,
    one: Array,
    gelu_c: Array,
    gelu_k: Array,
    three: Array,
}

impl Consts {
    pub(crate) fn new(dt: Dtype) -> Result<Self> {
        Ok(Self {
            half: scalar(0.5, dt)?,
            one: scalar(1.0, dt)?,
            gelu_c: scalar((2.0f64 / std::f64::consts::PI).sqrt() as f32, dt)?,
            gelu_k: scalar(0.044715, dt)?,
            three: scalar(3.0, dt)?,
        })
    }

    /// `nn.gelu_approx`: `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`, in mlx's evaluation order, with `x³`
    /// as `power(x, 3)` (not `x·x·x`, which rounds differently in bf16).
    fn gelu_approx(&self, x: &Array) -> Result<Array> {
        let cube = ops::power(x, &self.three)?;
        let inner = ops::add(x, ops::multiply(&self.gelu_k, &cube)?)?;
        let t = ops::tanh(ops::multiply(&self.gelu_c, &inner)?)?;
        Ok(ops::multiply(
            ops::multiply(&self.half, x)?,
            ops::add(&self.one, &t)?,
        )?)
    }
}

struct Rope {
    dims: i32,
    base: Option<f32>,
    freqs: Option<Array>,
    traditional: bool,
}

impl Rope {
    fn new(spec: &LayerSpec, traditional: bool) -> Result<Self> {
        let dims = spec.head_dim as i32;
        if spec.rope.rope_type == "proportional" {
            // mlx-lm ProportionalRoPE: the first partial_rotary_factor share of frequency pairs rotates, with
            // exponents over the FULL head dim; the rest get infinite periods (identity).
            let rotated = (spec.head_dim as f32 * spec.rope.partial_rotary_factor) as i32;
            let exps = ops::divide(
                Array::arange::<_, f32>(0, rotated, 2)?,
                Array::from_f32(dims as f32),
            )?;
            let f = ops::multiply(
                Array::from_f32(spec.rope.factor),
                ops::power(Array::from_f32(spec.rope.rope_theta), &exps)?,
            )?;
            let inf = ops::full::<f32>(&[(dims - rotated) / 2], Array::from_f32(f32::INFINITY))?;
            Ok(Self {
                dims,
                base: None,
                freqs: Some(ops::concatenate(&[f, inf], 0)?),
                traditional,
            })
        } else {
            Ok(Self {
                dims,
                base: Some(spec.rope.rope_theta),
                freqs: None,
                traditional,
            })
        }
    }

    fn apply(&self, x: &Array, offset: i32) -> Result<Array> {
        Ok(fast::rope(
            x,
            self.dims,
            self.traditional,
            self.base,
            1.0,
            offset,
            self.freqs.as_ref(),
        )?)
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Option<Linear>,
    v_proj: Option<Linear>,
    o_proj: Linear,
    q_norm: Array,
    k_norm: Option<Array>,
    rope: Rope,
    n_heads: i32,
    n_kv_heads: i32,
    head_dim: i32,
    eps: f32,
}

/// Attention mask for one layer type.
#[derive(Clone)]
pub(crate) enum Mask {
    /// Every key.
    None,
    /// Causal over the chunk (mlx's "causal" SDPA mask).
    Causal,
    /// An explicit boolean mask, broadcast to (B, heads, L, S): true where a query sees a key.
    Array(Array),
}

/// A run of media soft tokens in a prompt chunk: `features` (1, N, hidden) replace the embeddings of the
/// N placeholder tokens from position `start` (relative to the chunk).
pub struct Placed<'a> {
    /// First placeholder position in the chunk.
    pub start: usize,
    /// The soft tokens, already projected to the text width (a tower's output).
    pub features: &'a Array,
    /// Whether the run's tokens see one another both ways (images, when the model attends
    /// bidirectionally within them); audio is read causally, as text.
    pub bidirectional: bool,
}

/// Row `i` of a batch-first array, keeping the batch axis (1, …).
fn row(a: &Array, i: i32) -> Result<Array> {
    Ok(a.try_index(i..i + 1)?)
}

/// How a forward's input (B, L, H) is cut into sequences, each with its own cache.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Rows<'a> {
    /// Each of the B rows is one sequence of L positions.
    Batch,
    /// B = 1, and the L positions are consecutive runs of these lengths, one sequence each: a packed
    /// prefill, as vLLM's and llama.cpp's ragged batches (no padding). Position-wise layers read the
    /// weights once for all of them; attention runs run by run.
    Packed(&'a [i32]),
}

impl Rows<'_> {
    /// Sequences in an input of `b` rows.
    fn count(self, b: i32) -> usize {
        match self {
            Rows::Batch => b as usize,
            Rows::Packed(lens) => lens.len(),
        }
    }

    /// Sequence `i`'s part of a (B, heads, L, D) array (all of it when there is one sequence).
    fn part(self, a: &Array, i: usize) -> Result<Array> {
        match self {
            _ if self.count(a.shape()[0]) == 1 => Ok(a.clone()),
            Rows::Batch => row(a, i as i32),
            Rows::Packed(lens) => {
                let start: i32 = lens[..i].iter().sum();
                Ok(a.try_index((.., .., start..start + lens[i], ..))?)
            }
        }
    }

    /// The sequences' parts put back together (the inverse of [`Rows::part`]).
    fn join(self, parts: &[Array]) -> Result<Array> {
        Ok(match (self, parts) {
            (_, [one]) => one.clone(),
            (Rows::Batch, parts) => ops::concatenate(parts, 0)?,
            (Rows::Packed(_), parts) => ops::concatenate(parts, 2)?,
        })
    }
}

impl Attention {
    /// Attention for a batch of rows (B, L, H). Each row is its own sequence with its own cache
    /// (`caches`, one per row) or the KV a shared layer borrows (`shared`, one per row); rows may sit at
    /// different offsets, so RoPE, the cache update and the attention itself run row by row, while the
    /// projections (what reads the weights) run once for the whole batch. A batch of one builds exactly
    /// the graph mlx-lm builds.
    ///
    /// Errors: neither caches nor shared KV for every row ([`EngineError::InvalidModel`]); MLX failures.
    fn forward(
        &self,
        x: &Array,
        rows: Rows<'_>,
        masks: &[&Mask],
        caches: &mut [&mut LayerCache],
        shared: Option<&[(Kv, i32)]>,
    ) -> Result<(Array, Vec<(Kv, i32)>)> {
        let (b, l) = (x.shape()[0], x.shape()[1]);
        let n = rows.count(b);
        if masks.len() != 1 && masks.len() != n {
            return Err(EngineError::InvalidModel(format!(
                "{} masks for {n} sequences",
                masks.len()
            )));
        }
        let q = self
            .q_proj
            .forward(x)?
            .reshape(&[b, l, self.n_heads, self.head_dim])?;
        let q = fast::rms_norm(&q, Some(&self.q_norm), self.eps)?.transpose_axes(&[0, 2, 1, 3])?;
        let kvs: Vec<(Kv, i32)> = if let Some(s) = shared {
            s.to_vec()
        } else {
            let k_proj = self.k_proj.as_ref().ok_or_else(|| {
                EngineError::InvalidModel("a KV-sharing layer has no K/V source".into())
            })?;
            let shape = [b, l, self.n_kv_heads, self.head_dim];
            let k = k_proj.forward(x)?.reshape(&shape)?;
            // attention_k_eq_v: V starts from the raw K projection.
            let v = match &self.v_proj {
                Some(p) => p.forward(x)?.reshape(&shape)?,
                None => k.clone(),
            };
            let k = fast::rms_norm(&k, self.k_norm.as_ref(), self.eps)?
                .transpose_axes(&[0, 2, 1, 3])?;
            let v = fast::rms_norm(&v, None, self.eps)?.transpose_axes(&[0, 2, 1, 3])?;
            if caches.len() != n {
                return Err(EngineError::InvalidModel(format!(
                    "{} caches for {n} sequences",
                    caches.len()
                )));
            }
            let mut kvs = Vec::with_capacity(caches.len());
            for (i, c) in caches.iter_mut().enumerate() {
                let (ki, vi) = (rows.part(&k, i)?, rows.part(&v, i)?);
                let offset = c.offset();
                let ki = self.rope.apply(&ki, offset)?;
                kvs.push((c.update_and_fetch(&ki, &vi)?, offset));
            }
            kvs
        };
        if kvs.len() != n {
            return Err(EngineError::InvalidModel(format!(
                "{} shared caches for {n} sequences",
                kvs.len()
            )));
        }
        let mut outs = Vec::with_capacity(kvs.len());
        for (i, (kv, offset)) in kvs.iter().enumerate() {
            let qi = self.rope.apply(&rows.part(&q, i)?, *offset)?;
            outs.push(attend(&qi, kv, masks[i.min(masks.len() - 1)])?);
        }
        // One sequence: as it is (a clone shares the buffer).
        let out = rows.join(&outs)?;
        let out = out.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b, l, -1])?;
        Ok((self.o_proj.forward(&out)?, kvs))
    }
}

/// Scaled dot-product attention of one row's queries (1, heads, L, D) over its keys/values (scale 1.0:
/// Gemma 4 normalises queries and keys instead).
fn attend(q: &Array, kv: &Kv, mask: &Mask) -> Result<Array> {
    let (keys, values) = match kv {
        Kv::Plain(k, v) => (k, v),
        Kv::Quantized(k, v, gs, bits) => return quantized_sdpa(q, k, v, mask, *gs, *bits),
    };
    Ok(match mask {
        Mask::None => fast::scaled_dot_product_attention(q, keys, values, 1.0, None, None)?,
        Mask::Causal => fast::scaled_dot_product_attention(
            q,
            keys,
            values,
            1.0,
            ScaledDotProductAttentionMask::Causal,
            None,
        )?,
        Mask::Array(m) => fast::scaled_dot_product_attention(
            q,
            keys,
            values,
            1.0,
            ScaledDotProductAttentionMask::Array(m),
            None,
        )?,
    })
}

/// Attention over quantized keys/values, as mlx-lm's `quantized_scaled_dot_product_attention` (scale 1.0).
fn quantized_sdpa(
    q: &Array,
    k: &QTensor,
    v: &QTensor,
    mask: &Mask,
    gs: i32,
    bits: i32,
) -> Result<Array> {
    let s = q.shape();
    let (b, n_q, l, d) = (s[0], s[1], s[2], s[3]);
    let n_kv = k.w.shape()[1];
    let rep = n_q / n_kv;
    let expand = |t: &QTensor| -> Result<QTensor> {
        if rep > 1 {
            Ok(QTensor {
                w: t.w.expand_dims(-3)?,
                scales: t.scales.expand_dims(-3)?,
                biases: t.biases.expand_dims(-3)?,
            })
        } else {
            Ok(t.clone())
        }
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let q = if rep > 1 {
        q.reshape(&[b, n_kv, rep, l, d])?
    } else {
        q.clone()
    };
    let mut scores = ops::quantized_matmul(&q, &k.w, &k.scales, &k.biases, true, gs, bits)?;
    let kl = *scores.shape().last().unwrap_or(&0);
    let bool_mask = match mask {
        Mask::None => None,
        Mask::Causal => {
            let qi = Array::arange::<_, i32>(kl - l, kl, 1)?.reshape(&[-1, 1])?;
            let ki = Array::arange::<_, i32>(0, kl, 1)?.reshape(&[1, -1])?;
            Some(qi.ge(&ki)?)
        }
        Mask::Array(m) => Some(m.clone()),
    };
    if let Some(m) = bool_mask {
        let min = scalar(
            scores.dtype().finfo_min().unwrap_or(f64::MIN) as f32,
            scores.dtype(),
        )?;
        scores = ops::select(&m, &scores, &min)?;
    }
    let scores = ops::softmax_axis(&scores, -1, true)?;
    let out = ops::quantized_matmul(&scores, &v.w, &v.scales, &v.biases, false, gs, bits)?;
    Ok(if rep > 1 {
        out.reshape(&[b, n_q, l, d])?
    } else {
        out
    })
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Array, c: &Consts) -> Result<Array> {
        let g = c.gelu_approx(&self.gate_proj.forward(x)?)?;
        let h = ops::multiply(&g, self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }
}

struct Router {
    proj: Linear,
    norm_weight: Array,
    per_expert_scale: Array,
    top_k: i32,
    n_experts: i32,
}

struct Experts {
    gate_proj: SwitchLinear,
    up_proj: SwitchLinear,
    down_proj: SwitchLinear,
}

struct MoeBlock {
    router: Router,
    experts: Experts,
    post_feedforward_layernorm_1: Array,
    post_feedforward_layernorm_2: Array,
    pre_feedforward_layernorm_2: Array,
}

impl MoeBlock {
    fn route(&self, x: &Array, eps: f32) -> Result<(Array, Array)> {
        let r = &self.router;
        let xn = fast::rms_norm(x, Some(&r.norm_weight), eps)?;
        let scores = r.proj.forward(&xn)?;
        let k = r.top_k;
        // Unsorted top-k in argpartition order, as mlx-lm (the order only changes the expert sum order).
        let idx = ops::argpartition_axis(&scores, r.n_experts - k, -1)?
            .try_index((mlx_rs::ops::indexing::Ellipsis, (r.n_experts - k)..))?;
        let w = take_along_axis(&scores, &idx, -1)?;
        let w = ops::softmax_axis(&w, -1, None)?;
        let w = ops::multiply(&w, r.per_expert_scale.take_axis(&idx, 0)?)?;
        Ok((idx, w))
    }

    fn experts(&self, x: &Array, idx: &Array, w: &Array, c: &Consts) -> Result<Array> {
        let xs = ops::expand_dims_axes(x, &[-2, -3])?; // (B, L, 1, 1, H)
        let e = &self.experts;
        let do_sort = idx.size() >= 64;
        let y = if do_sort {
            // mlx-lm _gather_sort/_scatter_unsort: group tokens by expert for better kernel locality.
            let shape = idx.shape().to_vec();
            let k = shape[shape.len() - 1];
            let flat = idx.flatten(None, None)?;
            let order = ops::argsort_axis(&flat, 0)?;
            let inv_order = ops::argsort_axis(&order, 0)?;
            let rows = ops::floor_divide(&order, Array::from_int(k).as_dtype(order.dtype())?)?;
            let xs = xs.flatten(0, -3)?.take_axis(&rows, 0)?;
            let sidx = flat.take_axis(&order, 0)?;
            let up = e.up_proj.forward(&xs, &sidx, true)?;
            let gate = e.gate_proj.forward(&xs, &sidx, true)?;
            let h = ops::multiply(c.gelu_approx(&gate)?, &up)?;
            let y = e.down_proj.forward(&h, &sidx, true)?;
            let y = y.take_axis(&inv_order, 0)?;
            ops::unflatten(&y, 0, &shape)?
        } else {
            let up = e.up_proj.forward(&xs, idx, false)?;
            let gate = e.gate_proj.forward(&xs, idx, false)?;
            let h = ops::multiply(c.gelu_approx(&gate)?, &up)?;
            e.down_proj.forward(&h, idx, false)?
        };
        let y = y.squeeze_axes(&[-2])?; // (B, L, k, H)
        let wy = ops::multiply(ops::expand_dims(w, -1)?, &y)?;
        Ok(wy.sum_axis(-2, None)?)
    }
}

struct PerLayerInput {
    gate: Linear,
    projection: Linear,
    post_norm: Array,
}

pub(crate) struct DecoderLayer {
    pub(crate) spec: LayerSpec,
    self_attn: Attention,
    mlp: Mlp,
    moe: Option<MoeBlock>,
    input_layernorm: Array,
    post_attention_layernorm: Array,
    pre_feedforward_layernorm: Array,
    post_feedforward_layernorm: Array,
    per_layer: Option<PerLayerInput>,
    layer_scalar: Array,
}

impl DecoderLayer {
    /// Loads layer `i` (`layers.{i}.*`) of a text model with configuration `c`, as `spec` describes it:
    /// K/V projections only when it owns a cache, the MoE block and per-layer input when `c` has them.
    ///
    /// Errors: a missing or misshapen tensor, an inconsistent MoE configuration ([`EngineError::InvalidModel`]).
    pub(crate) fn load(
        store: &mut WeightStore,
        c: &TextConfig,
        i: usize,
        spec: &LayerSpec,
    ) -> Result<Self> {
        let h = c.hidden_size;
        let hs = [h as i32];
        let ple_dim = c.ple_dim();
        let p = format!("layers.{i}");
        let hd = spec.head_dim;
        let nh = c.num_attention_heads;
        let nkv = spec.n_kv_heads;
        let (k_proj, v_proj, k_norm) = if spec.has_kv {
            (
                Some(store.linear(&format!("{p}.self_attn.k_proj"), nkv * hd, h)?),
                if spec.k_eq_v {
                    None
                } else {
                    Some(store.linear(&format!("{p}.self_attn.v_proj"), nkv * hd, h)?)
                },
                Some(store.take(&format!("{p}.self_attn.k_norm.weight"), &[hd as i32])?),
            )
        } else {
            (None, None, None)
        };
        let self_attn = Attention {
            q_proj: store.linear(&format!("{p}.self_attn.q_proj"), nh * hd, h)?,
            k_proj,
            v_proj,
            o_proj: store.linear(&format!("{p}.self_attn.o_proj"), h, nh * hd)?,
            q_norm: store.take(&format!("{p}.self_attn.q_norm.weight"), &[hd as i32])?,
            k_norm,
            rope: Rope::new(spec, c.rope_traditional)?,
            n_heads: nh as i32,
            n_kv_heads: nkv as i32,
            head_dim: hd as i32,
            eps: c.rms_norm_eps,
        };
        let im = spec.intermediate_size;
        let mlp = Mlp {
            gate_proj: store.linear(&format!("{p}.mlp.gate_proj"), im, h)?,
            up_proj: store.linear(&format!("{p}.mlp.up_proj"), im, h)?,
            down_proj: store.linear(&format!("{p}.mlp.down_proj"), h, im)?,
        };
        let moe = if c.enable_moe_block {
            let e = c.num_experts.unwrap_or(0);
            let mi = c.moe_intermediate_size.unwrap_or(0);
            let top_k = c.top_k_experts.unwrap_or(0);
            if top_k == 0 || top_k > e {
                return Err(EngineError::InvalidModel(format!(
                    "top_k_experts {top_k} must be in 1..={e}"
                )));
            }
            let scale = store.take(&format!("{p}.router.scale"), &hs)?;
            // mlx-lm: rms_norm weight = scale * H**-0.5 (a weak scalar, so in the weight's dtype).
            let root = scalar((h as f64).powf(-0.5) as f32, scale.dtype())?;
            Some(MoeBlock {
                router: Router {
                    proj: store.linear(&format!("{p}.router.proj"), e, h)?,
                    norm_weight: ops::multiply(&scale, &root)?,
                    per_expert_scale: store
                        .take(&format!("{p}.router.per_expert_scale"), &[e as i32])?,
                    top_k: top_k as i32,
                    n_experts: e as i32,
                },
                experts: Experts {
                    gate_proj: store.switch_linear(
                        &format!("{p}.experts.switch_glu.gate_proj"),
                        e,
                        mi,
                        h,
                    )?,
                    up_proj: store.switch_linear(
                        &format!("{p}.experts.switch_glu.up_proj"),
                        e,
                        mi,
                        h,
                    )?,
                    down_proj: store.switch_linear(
                        &format!("{p}.experts.switch_glu.down_proj"),
                        e,
                        h,
                        mi,
                    )?,
                },
                post_feedforward_layernorm_1: store
                    .take(&format!("{p}.post_feedforward_layernorm_1.weight"), &hs)?,
                post_feedforward_layernorm_2: store
                    .take(&format!("{p}.post_feedforward_layernorm_2.weight"), &hs)?,
                pre_feedforward_layernorm_2: store
                    .take(&format!("{p}.pre_feedforward_layernorm_2.weight"), &hs)?,
            })
        } else {
            None
        };
        let per_layer = if ple_dim > 0 {
            Some(PerLayerInput {
                gate: store.linear(&format!("{p}.per_layer_input_gate"), ple_dim, h)?,
                projection: store.linear(&format!("{p}.per_layer_projection"), h, ple_dim)?,
                post_norm: store.take(&format!("{p}.post_per_layer_input_norm.weight"), &hs)?,
            })
        } else {
            None
        };
        Ok(DecoderLayer {
            spec: spec.clone(),
            self_attn,
            mlp,
            moe,
            input_layernorm: store.take(&format!("{p}.input_layernorm.weight"), &hs)?,
            post_attention_layernorm: store
                .take(&format!("{p}.post_attention_layernorm.weight"), &hs)?,
            pre_feedforward_layernorm: store
                .take(&format!("{p}.pre_feedforward_layernorm.weight"), &hs)?,
            post_feedforward_layernorm: store
                .take(&format!("{p}.post_feedforward_layernorm.weight"), &hs)?,
            per_layer,
            layer_scalar: store.take(&format!("{p}.layer_scalar"), &[1])?,
        })
    }

    // Mirrors mlx-lm's DecoderLayer.__call__ argument list one to one, which keeps review against it easy.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        x: &Array,
        rows: Rows<'_>,
        masks: &[&Mask],
        caches: &mut [&mut LayerCache],
        shared: Option<&[(Kv, i32)]>,
        per_layer_input: Option<&Array>,
        eps: f32,
        c: &Consts,
    ) -> Result<(Array, Vec<(Kv, i32)>)> {
        let h = fast::rms_norm(x, Some(&self.input_layernorm), eps)?;
        let (h, kv) = self.self_attn.forward(&h, rows, masks, caches, shared)?;
        let h = fast::rms_norm(&h, Some(&self.post_attention_layernorm), eps)?;
        let h = ops::add(x, &h)?;
        let residual = h.clone();
        let ff = if let Some(moe) = &self.moe {
            let h1 = fast::rms_norm(&h, Some(&self.pre_feedforward_layernorm), eps)?;
            let h1 = self.mlp.forward(&h1, c)?;
            let h1 = fast::rms_norm(&h1, Some(&moe.post_feedforward_layernorm_1), eps)?;
            // The router sees the un-normalised residual stream.
            let (idx, w) = moe.route(&h, eps)?;
            let h2 = fast::rms_norm(&h, Some(&moe.pre_feedforward_layernorm_2), eps)?;
            let h2 = moe.experts(&h2, &idx, &w, c)?;
            let h2 = fast::rms_norm(&h2, Some(&moe.post_feedforward_layernorm_2), eps)?;
            ops::add(&h1, &h2)?
        } else {
            let h1 = fast::rms_norm(&h, Some(&self.pre_feedforward_layernorm), eps)?;
            self.mlp.forward(&h1, c)?
        };
        let ff = fast::rms_norm(&ff, Some(&self.post_feedforward_layernorm), eps)?;
        let mut h = ops::add(&residual, &ff)?;
        if let (Some(p), Some(pli)) = (&self.per_layer, per_layer_input) {
            let g = c.gelu_approx(&p.gate.forward(&h)?)?;
            let g = ops::multiply(&g, pli)?;
            let g = p.projection.forward(&g)?;
            let g = fast::rms_norm(&g, Some(&p.post_norm), eps)?;
            h = ops::add(&h, &g)?;
        }
        Ok((ops::multiply(&h, &self.layer_scalar)?, kv))
    }
}

struct Ple {
    embed_tokens_per_layer: Embedding,
    per_layer_model_projection: Linear,
    per_layer_projection_norm: Array,
    embed_scale: Array,
    projection_scale: Array,
    input_scale: Array,
}

/// A loaded Gemma 4 text model.
pub struct Gemma4 {
    cfg: TextConfig,
    dtype: Dtype,
    embed_tokens: Embedding,
    embed_scale: Array,
    ple: Option<Ple>,
    layers: Vec<DecoderLayer>,
    norm: Array,
    lm_head: Option<Linear>,
    softcap: Option<Array>,
    consts: Consts,
    first_of_type: [Option<usize>; 2],
    /// [`ModelConfig::media_token_ids`]: ids whose per-layer embeddings are the padding token's.
    media_ids: Vec<i32>,
}

/// KV-cache quantization settings (mlx-lm's `kv_bits`, `kv_group_size`, `quantized_kv_start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvQuant {
    /// Bits per element: 2, 3, 4, 5, 6 or 8 (MLX's quantized widths; checked when a generation starts).
    pub bits: i32,
    /// Elements per scale/bias group (must divide the head dimension).
    pub group_size: i32,
    /// Quantize once a cache holds this many positions.
    pub start: usize,
}

/// One decoding session's caches (one per non-shared layer). A clone is a checkpoint: it shares the arrays
/// and keeps their contents while the original goes on (MLX copies a buffer on write while it is shared).
#[derive(Clone)]
pub struct Cache {
    /// Per non-shared layer.
    pub layers: Vec<LayerCache>,
}

/// A rollback point of a [`Cache`] ([`Cache::checkpoint`]).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    offset: i32,
    rotating: Vec<(usize, LayerCache)>,
}

impl Checkpoint {
    /// Positions the cache held when it was taken.
    pub fn offset(&self) -> usize {
        self.offset.max(0) as usize
    }

    /// Bytes its copies hold (shared with the cache until the cache's next write).
    pub fn nbytes(&self) -> usize {
        self.rotating.iter().map(|(_, c)| c.nbytes()).sum()
    }
}

impl Cache {
    /// Positions processed so far.
    pub fn offset(&self) -> i32 {
        self.layers.first().map(|c| c.offset()).unwrap_or(0)
    }

    /// Arrays to evaluate after a prefill chunk.
    pub fn state(&self) -> Vec<&Array> {
        self.layers.iter().flat_map(|c| c.state()).collect()
    }

    /// Bytes held by all layers.
    pub fn nbytes(&self) -> usize {
        self.layers.iter().map(|c| c.nbytes()).sum()
    }

    /// Whether every layer can drop positions from its end ([`LayerCache::is_trimmable`]; mlx-lm
    /// `can_trim_prompt_cache`).
    pub fn is_trimmable(&self) -> bool {
        self.layers.iter().all(|c| c.is_trimmable())
    }

    /// Keeps the first `keep` positions and forgets the rest, so that the cache holds what reading only
    /// those tokens would have left (mlx-lm `trim_prompt_cache`). Returns false, changing nothing, when
    /// the cache is not [`Cache::is_trimmable`] or holds fewer than `keep` positions.
    pub fn trim_to(&mut self, keep: usize) -> bool {
        let held = self.offset();
        if !self.is_trimmable() || (keep as i64) > held as i64 {
            return false;
        }
        let n = held - keep as i32;
        for c in &mut self.layers {
            c.trim(n);
        }
        true
    }

    /// Forgets the last `n` positions of every layer — speculative decoding's rollback of rejected
    /// drafts, right after their verification — so that the cache holds what reading only the kept tokens
    /// would have left. Returns false, changing nothing, when a layer cannot
    /// ([`crate::cache::LayerCache::can_trim`]: a quantized cache past the positions written quantized, or
    /// a full sliding window after a single-position step).
    pub fn trim_end(&mut self, n: usize) -> bool {
        let n = n.min(self.offset().max(0) as usize) as i32;
        if !self.layers.iter().all(|c| c.can_trim(n)) {
            return false;
        }
        for c in &mut self.layers {
            c.trim(n);
        }
        true
    }

    /// A rollback point: copies of the sliding-window layers only (a window's worth each) and the offset, to
    /// which [`Cache::rollback`] returns. Full-attention layers are not copied: they roll back by trimming,
    /// and a copy would make MLX duplicate their whole buffer at the next write (the copy shares it).
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            offset: self.offset(),
            rotating: self
                .layers
                .iter()
                .enumerate()
                .filter(|(_, c)| matches!(c, LayerCache::Rotating(_)))
                .map(|(i, c)| (i, c.clone()))
                .collect(),
        }
    }

    /// A rollback point kept for later requests ([`crate::generate::Generation::rollback_points`]): as
    /// [`Cache::checkpoint`], with each window copied down to the window alone
    /// ([`RotatingKvCache::compacted`]), so that it holds a window's worth per sliding-window layer and
    /// not the buffer of the prefill chunk it was taken after.
    ///
    /// Errors: an MLX failure.
    pub fn rollback_point(&self) -> Result<Checkpoint> {
        let mut cp = self.checkpoint();
        for (_, c) in &mut cp.rotating {
            if let LayerCache::Rotating(r) = c {
                *r = r.compacted()?;
            }
        }
        Ok(cp)
    }

    /// Returns to `cp`, taken from this cache when it held no more than it does now: full-attention layers
    /// trimmed back, sliding-window layers restored from their copies. False, changing nothing, when a layer
    /// cannot (a quantized cache, or a checkpoint from another cache).
    pub fn rollback(&mut self, cp: &Checkpoint) -> bool {
        let n = self.offset() - cp.offset;
        let ok = n >= 0
            && self.layers.iter().enumerate().all(|(i, c)| match c {
                LayerCache::Full(_) => true,
                LayerCache::Quantized(_) => n == 0,
                LayerCache::Rotating(_) => cp.rotating.iter().any(|(j, _)| *j == i),
            });
        if !ok {
            return false;
        }
        for c in &mut self.layers {
            if let LayerCache::Full(f) = c {
                f.trim(n);
            }
        }
        for (i, c) in &cp.rotating {
            self.layers[*i] = c.clone();
        }
        true
    }

    /// Quantizes the full-attention caches that hold at least `start` positions (`kv_bits`).
    pub fn maybe_quantize(&mut self, kv: Option<KvQuant>) -> Result<()> {
        if let Some(q) = kv {
            for c in &mut self.layers {
                c.maybe_quantize(q.group_size, q.bits, q.start as i32)?;
            }
        }
        Ok(())
    }
}

fn mlx_causal_mask(n: i32, offset: i32, window: Option<i32>) -> Result<Array> {
    // mlx-lm create_causal_mask: query i (absolute offset+i) sees key j if j <= offset+i and, with a window,
    // offset+i < j + window.
    let rinds = Array::arange::<_, i32>(0, offset + n, 1)?.reshape(&[1, -1])?;
    let linds = Array::arange::<_, i32>(offset, offset + n, 1)?.reshape(&[-1, 1])?;
    let mut mask = linds.ge(&rinds)?;
    if let Some(w) = window {
        mask = mask.logical_and(&linds.lt(ops::add(&rinds, Array::from_int(w))?)?)?;
    }
    Ok(mask)
}

impl Gemma4 {
    /// Builds the model from a checkpoint's tensors, consuming every one of them.
    pub fn load(config: &ModelConfig, store: &mut WeightStore, dtype: Dtype) -> Result<Self> {
        let c = &config.text;
        let specs = c.layer_specs()?;
        let h = c.hidden_size;
        let n = c.num_hidden_layers;
        let eps_dt = dtype;
        let ple_dim = c.ple_dim();
        let embed_tokens = store.embedding("embed_tokens", c.vocab_size, h)?;
        let ple = if ple_dim > 0 {
            Some(Ple {
                embed_tokens_per_layer: store.embedding(
                    "embed_tokens_per_layer",
                    c.vocab_size_per_layer_input,
                    n * ple_dim,
                )?,
                per_layer_model_projection: store.linear(
                    "per_layer_model_projection",
                    n * ple_dim,
                    h,
                )?,
                per_layer_projection_norm: store
                    .take("per_layer_projection_norm.weight", &[ple_dim as i32])?,
                embed_scale: scalar((ple_dim as f64).sqrt() as f32, eps_dt)?,
                projection_scale: scalar((h as f64).powf(-0.5) as f32, eps_dt)?,
                input_scale: scalar(2f64.powf(-0.5) as f32, eps_dt)?,
            })
        } else {
            None
        };
        let hs = [h as i32];
        let mut layers = Vec::with_capacity(n);
        for (i, spec) in specs.iter().enumerate() {
            layers.push(DecoderLayer::load(store, c, i, spec)?);
        }
        let norm = store.take("norm.weight", &hs)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(store.linear("lm_head", c.vocab_size, h)?)
        };
        let mut first_of_type = [None, None];
        for (i, s) in specs.iter().enumerate() {
            let t = s.layer_type as usize;
            if first_of_type[t].is_none() {
                first_of_type[t] = Some(i);
            }
        }
        Ok(Self {
            cfg: c.clone(),
            dtype,
            embed_tokens,
            embed_scale: scalar((h as f64).sqrt() as f32, eps_dt)?,
            ple,
            layers,
            norm,
            lm_head,
            softcap: match c.final_logit_softcapping {
                Some(s) => Some(scalar(s, eps_dt)?),
                None => None,
            },
            consts: Consts::new(dtype)?,
            first_of_type,
            media_ids: config.media_token_ids.iter().map(|&i| i as i32).collect(),
        })
    }

    /// Head dimensions of the full-attention layers that own a cache (what `kv_bits` quantizes).
    pub fn full_attention_head_dims(&self) -> Vec<usize> {
        self.layers
            .iter()
            .filter(|l| l.spec.has_kv && l.spec.layer_type == LayerType::Full)
            .map(|l| l.spec.head_dim)
            .collect()
    }

    /// The text configuration.
    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Activation dtype.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Fresh caches: a growing cache per full layer, a rotating one per sliding layer, none for shared
    /// layers (mlx-lm `make_cache`).
    pub fn new_cache(&self) -> Cache {
        Cache {
            layers: self
                .layers
                .iter()
                .filter(|l| l.spec.has_kv)
                .map(|l| match l.spec.layer_type {
                    LayerType::Full => LayerCache::Full(KvCache::default()),
                    LayerType::Sliding => {
                        LayerCache::Rotating(RotatingKvCache::new(self.cfg.sliding_window as i32))
                    }
                })
                .collect(),
        }
    }

    fn mask_for(&self, t: LayerType, n: i32, cache: &Cache) -> Result<Mask> {
        let Some(first) = self.first_of_type[t as usize] else {
            return Ok(Mask::None);
        };
        let c = cache.layers.get(first).ok_or_else(|| {
            EngineError::InvalidModel("the first layer of a type has no cache".into())
        })?;
        if n == 1 {
            return Ok(Mask::None);
        }
        Ok(match c {
            LayerCache::Full(_) | LayerCache::Quantized(_) => Mask::Causal,
            LayerCache::Rotating(r) => {
                let w = self.cfg.sliding_window as i32;
                let offset = (r.max_size - 1).min(r.offset);
                if offset + n > w {
                    Mask::Array(mlx_causal_mask(n, offset, Some(w))?)
                } else {
                    Mask::Causal
                }
            }
        })
    }

    /// Runs the decoder over `ids` (shape (1, L), int32) and returns the final hidden states (1, L, H),
    /// advancing `cache`.
    ///
    /// Errors: MLX failures; a cache that does not belong to this model ([`EngineError::InvalidModel`]).
    pub fn forward_hidden(&self, ids: &Array, cache: &mut Cache) -> Result<Array> {
        self.forward_hidden_batch(ids, &mut [cache])
    }

    /// Runs the decoder over a batch of sequences at once: `ids` is (B, L) int32, row `i` continuing
    /// `caches[i]` by L positions; returns the final hidden states (B, L, H). The caches may hold different
    /// numbers of positions (no padding: each row attends over its own cache, under the causal and
    /// sliding-window masks of its own offset), which is what continuous batching needs; the weights are
    /// read once for the whole batch. L = 1 is a decode step; L > 1 verifies several sequences' drafts at
    /// once in speculative decoding.
    ///
    /// Errors: B ≠ the number of caches ([`EngineError::InvalidRequest`]); a cache that does not belong
    /// to this model ([`EngineError::InvalidModel`]); MLX failures.
    pub fn forward_hidden_batch(&self, ids: &Array, caches: &mut [&mut Cache]) -> Result<Array> {
        self.forward_inner(ids, Rows::Batch, &[], caches)
    }

    /// Runs the decoder over several sequences' chunks of different lengths at once, packed end to end
    /// with no padding: `ids` is (1, T) int32 with T = Σ `lens`, its first `lens[0]` positions continuing
    /// `caches[0]`, the next `lens[1]` continuing `caches[1]`, and so on; returns the final hidden states
    /// (1, T, H). Everything but attention reads the weights once for all of them (a batched prefill, as
    /// vLLM's and llama-server's: a burst of new prompts costs one pass over the weights, not one each);
    /// each sequence attends over its own cache under its own masks, so it reads what it would alone, up
    /// to the rounding of the larger matrix products.
    ///
    /// Errors: `lens` that do not add up to T, a zero length, or not one length per cache
    /// ([`EngineError::InvalidRequest`]); as [`Gemma4::forward_hidden_batch`].
    pub fn forward_hidden_packed(
        &self,
        ids: &Array,
        lens: &[usize],
        caches: &mut [&mut Cache],
    ) -> Result<Array> {
        let lens: Vec<i32> = lens.iter().map(|&n| n as i32).collect();
        let total: i64 = lens.iter().map(|&n| n as i64).sum();
        let shape = ids.shape();
        if shape.len() != 2
            || shape[0] != 1
            || total != shape[1] as i64
            || lens.contains(&0)
            || lens.len() != caches.len()
        {
            return Err(EngineError::InvalidRequest(format!(
                "a packed forward takes (1, T) ids cut into one run per cache: ids {shape:?}, runs \
                 {lens:?}, {} caches",
                caches.len()
            )));
        }
        self.forward_inner(ids, Rows::Packed(&lens), &[], caches)
    }

    /// [`Gemma4::forward_hidden`] over a prompt chunk that holds media: each [`Placed`] soft-token run
    /// replaces the embeddings of its placeholder tokens (as mlx-vlm's `masked_scatter`), its positions
    /// read the padding token's per-layer embedding, and, when the model attends bidirectionally within
    /// images (`use_bidirectional_attention = "vision"`), each run's tokens see one another (mlx-vlm's
    /// blockwise overlay on the causal masks). A run must lie whole in one chunk. `ids` is (1, L).
    ///
    /// Errors: a run outside the chunk or of the wrong width ([`EngineError::InvalidRequest`]); as
    /// [`Gemma4::forward_hidden`].
    pub fn forward_hidden_with_media(
        &self,
        ids: &Array,
        media: &[Placed<'_>],
        cache: &mut Cache,
    ) -> Result<Array> {
        self.forward_inner(ids, Rows::Batch, media, &mut [cache])
    }

    fn forward_inner(
        &self,
        ids: &Array,
        rows: Rows<'_>,
        media: &[Placed<'_>],
        caches: &mut [&mut Cache],
    ) -> Result<Array> {
        let (b, l) = (ids.shape()[0], ids.shape()[1]);
        let n = rows.count(b);
        if b < 1 || n != caches.len() || (n > 1 && !media.is_empty()) {
            return Err(EngineError::InvalidRequest(format!(
                "a batched forward takes one row per cache and no media: ids {:?} for {} caches",
                ids.shape(),
                caches.len()
            )));
        }
        let mut h = self.embed(ids)?;
        // Per-layer embeddings of media positions are the padding token's (id 0), as in mlx-vlm.
        let mut ple_ids = None;
        if !media.is_empty() {
            let (merged, text_ids) = self.place_media(&h, ids, media)?;
            h = merged;
            ple_ids = Some(text_ids);
        }
        // A media placeholder token read anywhere else (generated, or spelled in text) also reads the padding
        // token's per-layer embedding, as mlx-vlm masks every one of them.
        if self.ple.is_some() && !self.media_ids.is_empty() {
            let base = ple_ids.take().unwrap_or_else(|| ids.clone());
            let mut is_media = base.eq(Array::from_int(self.media_ids[0]))?;
            for &m in &self.media_ids[1..] {
                is_media = is_media.logical_or(&base.eq(Array::from_int(m))?)?;
            }
            ple_ids = Some(ops::select(&is_media, Array::from_int(0), &base)?);
        }
        let n_layers = self.layers.len() as i32;
        let per_layer_inputs = match &self.ple {
            Some(p) => {
                let pd = self.cfg.ple_dim() as i32;
                let t = p
                    .embed_tokens_per_layer
                    .forward(ple_ids.as_ref().unwrap_or(ids))?;
                let t = ops::multiply(&t, &p.embed_scale)?.reshape(&[b, l, n_layers, pd])?;
                // The projection reads the *scaled* token embedding.
                let proj = p.per_layer_model_projection.forward(&h)?;
                let proj =
                    ops::multiply(&proj, &p.projection_scale)?.reshape(&[b, l, n_layers, pd])?;
                let proj = fast::rms_norm(
                    &proj,
                    Some(&p.per_layer_projection_norm),
                    self.cfg.rms_norm_eps,
                )?;
                Some(ops::multiply(ops::add(&proj, &t)?, &p.input_scale)?)
            }
            None => None,
        };
        // One token per row needs no mask; a chunk gets the causal or windowed one of its row's cache
        // (rows of a batch sit at different offsets, so their sliding windows cut at different keys).
        let mut row_masks = caches
            .iter()
            .enumerate()
            .take(match rows {
                Rows::Batch if l == 1 => 1,
                _ => caches.len(),
            })
            .map(|(i, c)| {
                let len = match rows {
                    Rows::Batch => l,
                    Rows::Packed(lens) => lens[i],
                };
                Ok([
                    self.mask_for(LayerType::Sliding, len, c)?,
                    self.mask_for(LayerType::Full, len, c)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        let masks = &mut row_masks[0];
        if media.iter().any(|m| m.bidirectional)
            && l > 1
            && self.cfg.use_bidirectional_attention.as_deref() == Some("vision")
        {
            // Each layer type's mask as an explicit (L, keys) array: the chunk's queries over what the cache
            // holds before it plus the chunk (full layers keep every earlier key; sliding ones keep the last
            // `window - 1`, as mlx-lm's rotating cache returns them), with each image's block opened both
            // ways. At offset 0 this is mlx-vlm's overlay; later (a cached prefix before the image) it keeps
            // the same meaning, as transformers computes it over the whole sequence.
            let offset = caches[0].offset();
            let w = self.cfg.sliding_window as i32;
            for (t, key_offset, window) in [
                (LayerType::Sliding, offset.min(w - 1), Some(w)),
                (LayerType::Full, offset, None),
            ] {
                let keys = key_offset + l;
                let mut block = vec![false; (l * keys) as usize];
                for m in media.iter().filter(|m| m.bidirectional) {
                    let (s, n) = (m.start, m.features.shape()[1] as usize);
                    for q in s..s + n {
                        for k in s..s + n {
                            block[q * keys as usize + key_offset as usize + k] = true;
                        }
                    }
                }
                let block = Array::from_slice(&block, &[l, keys]);
                let causal = mlx_causal_mask(l, key_offset, window)?;
                masks[t as usize] = Mask::Array(causal.logical_or(&block)?);
            }
        }
        let mut kvs: Vec<Option<Vec<(Kv, i32)>>> = vec![None; self.layers.len()];
        let mut layer_caches: Vec<_> = caches.iter_mut().map(|c| c.layers.iter_mut()).collect();
        for (i, layer) in self.layers.iter().enumerate() {
            let pli = match &per_layer_inputs {
                Some(p) => Some(p.try_index((.., .., i as i32, ..))?),
                None => None,
            };
            let mask: Vec<&Mask> = row_masks
                .iter()
                .map(|m| &m[layer.spec.layer_type as usize])
                .collect();
            let (mut own, shared) = if layer.spec.has_kv {
                let own = layer_caches
                    .iter_mut()
                    .map(|r| r.next())
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        EngineError::InvalidModel("a cache has fewer layers than the model".into())
                    })?;
                (own, None)
            } else {
                (vec![], kvs[layer.spec.kv_source].as_deref())
            };
            let (out, kv) = layer.forward(
                &h,
                rows,
                &mask,
                &mut own,
                shared,
                pli.as_ref(),
                self.cfg.rms_norm_eps,
                &self.consts,
            )?;
            h = out;
            kvs[i] = Some(kv);
        }
        Ok(fast::rms_norm(&h, Some(&self.norm), self.cfg.rms_norm_eps)?)
    }

    /// `h` with each media run's soft tokens in place of its placeholders' embeddings, and the ids the
    /// per-layer embeddings read (0 at media positions).
    fn place_media(&self, h: &Array, ids: &Array, media: &[Placed<'_>]) -> Result<(Array, Array)> {
        let l = ids.shape()[1] as usize;
        let hidden = self.cfg.hidden_size as i32;
        let mut spans: Vec<&Placed<'_>> = media.iter().collect();
        spans.sort_by_key(|m| m.start);
        let mut parts = vec![];
        let mut text_ids: Vec<i32> = ids.as_dtype(Dtype::Int32)?.as_slice::<i32>().to_vec();
        let mut at = 0usize;
        for m in spans {
            let shape = m.features.shape();
            let n = shape.get(1).copied().unwrap_or(0) as usize;
            if shape.len() != 3
                || shape[0] != 1
                || shape[2] != hidden
                || m.start < at
                || m.start + n > l
            {
                return Err(EngineError::InvalidRequest(format!(
                    "media soft tokens {shape:?} at {} do not fit a chunk of {l} positions and width {hidden}",
                    m.start
                )));
            }
            if m.start > at {
                parts.push(h.try_index((.., at as i32..m.start as i32, ..))?);
            }
            parts.push(m.features.as_dtype(self.dtype)?);
            text_ids[m.start..m.start + n].fill(0);
            at = m.start + n;
        }
        if at < l {
            parts.push(h.try_index((.., at as i32..l as i32, ..))?);
        }
        Ok((
            ops::concatenate(&parts, 1)?,
            Array::from_slice(&text_ids, &[1, l as i32]),
        ))
    }

    /// Logits (…, V) for final hidden states: tied or untied head, then the soft cap.
    pub fn logits(&self, h: &Array) -> Result<Array> {
        let out = match &self.lm_head {
            Some(head) => head.forward(h)?,
            None => self.embed_tokens.as_linear(h)?,
        };
        match &self.softcap {
            Some(cap) => Ok(ops::multiply(ops::tanh(ops::divide(&out, cap)?)?, cap)?),
            None => Ok(out),
        }
    }

    /// The scaled input embedding of `ids` (…, H) in the activation dtype: what the first layer reads for
    /// a text token (`embed_tokens(ids) * sqrt(hidden_size)`), and what the MTP assistant drafter reads of a
    /// token ([`super::assistant`]).
    ///
    /// Errors: MLX failures.
    pub fn embed(&self, ids: &Array) -> Result<Array> {
        let emb = self.embed_tokens.forward(ids)?;
        let emb = if emb.dtype() != self.dtype {
            emb.as_dtype(self.dtype)?
        } else {
            emb
        };
        Ok(ops::multiply(&emb, &self.embed_scale)?)
    }

    /// For each layer type ([sliding, full]), the layer whose K/V the last layers of that type attend over
    /// (the last layer of the type that owns a cache: what a KV-shared layer reads, and what the MTP
    /// assistant drafter reads), as its spec and its index in [`Cache::layers`]. None for a type the model
    /// does not have.
    pub fn kv_producers(&self) -> [Option<(&LayerSpec, usize)>; 2] {
        let mut out = [None, None];
        let owners = self.layers.iter().filter(|l| l.spec.has_kv);
        for (slot, l) in owners.enumerate() {
            out[l.spec.layer_type as usize] = Some((&l.spec, slot));
        }
        out
    }

    /// Logits of the last position only (1, V): the decoding step's output.
    pub fn forward_last_logits(&self, ids: &Array, cache: &mut Cache) -> Result<Array> {
        self.forward_last_logits_batch(ids, &mut [cache])
    }

    /// Logits of each row's last position (B, V) for a batch (see [`Gemma4::forward_hidden_batch`]).
    ///
    /// Errors: as [`Gemma4::forward_hidden_batch`].
    pub fn forward_last_logits_batch(
        &self,
        ids: &Array,
        caches: &mut [&mut Cache],
    ) -> Result<Array> {
        Ok(self.forward_last_batch(ids, caches)?.1)
    }

    /// Each row's last final hidden state (B, H, after the final norm) and its logits (B, V), for a batch
    /// (see [`Gemma4::forward_hidden_batch`]): a decode step that also keeps what the MTP assistant drafter
    /// reads.
    ///
    /// Errors: as [`Gemma4::forward_hidden_batch`].
    pub fn forward_last_batch(
        &self,
        ids: &Array,
        caches: &mut [&mut Cache],
    ) -> Result<(Array, Array)> {
        let h = self.forward_hidden_batch(ids, caches)?;
        let l = h.shape()[1];
        let last = h.try_index((.., l - 1, ..))?;
        let logits = self.logits(&last)?;
        Ok((last, logits))
    }
}
