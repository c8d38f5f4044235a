//! Gemma 4's vision tower and its projection into the text model's embedding space, following mlx-vlm's
//! `gemma4/vision.py` (`VisionModel`) and `gemma4.py` (`MultimodalEmbedder`) operation for operation, which
//! follow transformers' `Gemma4VisionEncoder`:
//!
//! 1. the image (1, 3, H, W) in [0, 1] is cut into `patch_size`² patches, each flattened row by row with its
//!    channels last, mapped to [-1, 1] and projected (`patch_embedder.input_proj`), plus a learned position
//!    embedding per column and per row (`position_embedding_table`, 2 × positions × hidden);
//! 2. the image's patches (at most `max_patches` = `default_output_length` × `pooling_kernel_size`²; no
//!    padding, as mlx-vlm runs an image) go through bidirectional transformer blocks (RMS-normed Q/K/V, 2-D
//!    rotary embedding: half of each head turns with the column, half with the row);
//! 3. a pooler averages `k` × `k` neighbourhoods of patches (k = `pooling_kernel_size`) into
//!    `patches / k²` soft tokens (at most `default_output_length`), scaled by √hidden;
//! 4. optional standardisation (`std_bias`, `std_scale`), then `embed_vision`: a scale-free RMS norm and a
//!    projection to the text hidden size.
//!
//! The soft tokens replace the image's placeholder tokens in the prompt (one per soft token).

use mlx_rs::{
    Array, Dtype,
    fast::{self, ScaledDotProductAttentionMask},
    ops,
};
use serde::Deserialize;

use crate::nn::{Linear, WeightStore, scalar};
use crate::{EngineError, Result};

/// `vision_config` of a Gemma 4 checkpoint (defaults: mlx-vlm's `VisionConfig`, those of E2B/E4B).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct VisionConfig {
    /// Width of the tower.
    pub hidden_size: usize,
    /// Width of each block's gated MLP.
    pub intermediate_size: usize,
    /// Transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Width of one head (a multiple of 4: two rotary halves per spatial axis).
    pub head_dim: usize,
    /// RMS norm epsilon.
    pub rms_norm_eps: f32,
    /// Soft tokens per image at most.
    pub default_output_length: usize,
    /// Side of a square patch, pixels.
    pub patch_size: usize,
    /// Rows of each position embedding table (the largest column or row index + 1).
    pub position_embedding_size: usize,
    /// Side of the neighbourhood of patches pooled into one soft token (what the processor sizes images
    /// for; the pooler derives its kernel from the patch count).
    pub pooling_kernel_size: usize,
    /// Whether each linear layer clamps its input and output to stored bounds.
    pub use_clipped_linears: bool,
    /// Whether the pooled features are standardised (`std_bias`, `std_scale`).
    pub standardize: bool,
    /// Rotary embedding parameters (`rope_theta`: the base, default 100).
    pub rope_parameters: Option<serde_json::Value>,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 16,
            num_attention_heads: 12,
            num_key_value_heads: 12,
            head_dim: 64,
            rms_norm_eps: 1e-6,
            default_output_length: 280,
            patch_size: 16,
            position_embedding_size: 10240,
            pooling_kernel_size: 3,
            use_clipped_linears: false,
            standardize: false,
            rope_parameters: None,
        }
    }
}

impl VisionConfig {
    /// The most patches the tower takes: `default_output_length` × `pooling_kernel_size`².
    pub fn max_patches(&self) -> usize {
        self.default_output_length * self.pooling_kernel_size * self.pooling_kernel_size
    }

    fn rope_theta(&self) -> f32 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.get("rope_theta"))
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(100.0) as f32
    }
}

/// A linear layer that clamps its input and output to stored bounds (`Gemma4ClippableLinear`); a bound
/// the checkpoint lacks does not clamp.
pub(super) struct ClippedLinear {
    linear: Linear,
    /// input min, input max, output min, output max.
    bounds: [Option<Array>; 4],
}

impl ClippedLinear {
    pub(super) fn load(
        store: &mut WeightStore,
        path: &str,
        out: usize,
        inp: usize,
        clipped: bool,
    ) -> Result<Self> {
        let linear = store.linear(&format!("{path}.linear"), out, inp)?;
        let mut bounds = [None, None, None, None];
        for (i, b) in ["input_min", "input_max", "output_min", "output_max"]
            .iter()
            .enumerate()
        {
            let name = format!("{path}.{b}");
            if !store.has(&name) {
                continue;
            }
            if clipped {
                bounds[i] = Some(store.take(&name, &[])?);
            } else {
                // As mlx-vlm's sanitize: stored bounds of a tower that does not clip are not used.
                store.remove(&name);
                store.skip("clip bounds of a vision tower without use_clipped_linears");
            }
        }
        Ok(Self { linear, bounds })
    }

    pub(super) fn forward(&self, x: &Array) -> Result<Array> {
        let clamp = |x: Array, lo: &Option<Array>, hi: &Option<Array>| -> Result<Array> {
            let x = match lo {
                Some(l) => ops::maximum(&x, l)?,
                None => x,
            };
            Ok(match hi {
                Some(h) => ops::minimum(&x, h)?,
                None => x,
            })
        };
        let x = clamp(x.clone(), &self.bounds[0], &self.bounds[1])?;
        let y = self.linear.forward(&x)?;
        clamp(y, &self.bounds[2], &self.bounds[3])
    }
}

struct Block {
    q_proj: ClippedLinear,
    k_proj: ClippedLinear,
    v_proj: ClippedLinear,
    o_proj: ClippedLinear,
    q_norm: Array,
    k_norm: Array,
    gate_proj: ClippedLinear,
    up_proj: ClippedLinear,
    down_proj: ClippedLinear,
    input_layernorm: Array,
    post_attention_layernorm: Array,
    pre_feedforward_layernorm: Array,
    post_feedforward_layernorm: Array,
}

/// The rotary angles of one image, shared by every block: cos and sin (1, L, 1, head_dim), laid out as the
/// head is (column half, then row half, each duplicated as `rotate_half` wants).
struct Rotary {
    cos: Array,
    sin: Array,
}

/// Gemma 4's vision tower with its `embed_vision` projection (see the module docs).
pub struct VisionTower {
    cfg: VisionConfig,
    input_proj: Linear,
    /// (2, positions, hidden): column embeddings, then row embeddings.
    position_table: Array,
    blocks: Vec<Block>,
    /// `std_bias`, `std_scale` when the tower standardises.
    standardize: Option<(Array, Array)>,
    projection: Linear,
    dtype: Dtype,
}

/// Where an image's patches sit: (column, row) of each real patch, row by row.
fn patch_grid(rows: usize, cols: usize) -> Vec<(usize, usize)> {
    (0..rows)
        .flat_map(|r| (0..cols).map(move |c| (c, r)))
        .collect()
}

impl VisionTower {
    /// Takes the tower's tensors (`vision_tower.*`, `embed_vision.*`, canonical names without `model.`) out
    /// of `store`; `text_hidden` is the text model's width.
    ///
    /// Errors: a missing or misshapen tensor; a `head_dim` that is not a multiple of 4.
    pub fn load(
        cfg: &VisionConfig,
        text_hidden: usize,
        store: &mut WeightStore,
        dtype: Dtype,
    ) -> Result<Self> {
        if !cfg.head_dim.is_multiple_of(4) || cfg.head_dim == 0 {
            return Err(EngineError::InvalidModel(format!(
                "vision head_dim {} is not a multiple of 4 (two rotary halves per spatial axis)",
                cfg.head_dim
            )));
        }
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let clip = cfg.use_clipped_linears;
        let p = cfg.patch_size;
        let input_proj = store.linear("vision_tower.patch_embedder.input_proj", h, 3 * p * p)?;
        let position_table = store.take(
            "vision_tower.patch_embedder.position_embedding_table",
            &[2, cfg.position_embedding_size as i32, h as i32],
        )?;
        let mut blocks = vec![];
        for i in 0..cfg.num_hidden_layers {
            let at = |s: &str| format!("vision_tower.encoder.layers.{i}.{s}");
            let lin = |store: &mut WeightStore, s: &str, out: usize, inp: usize| {
                ClippedLinear::load(store, &at(s), out, inp, clip)
            };
            let norm = |store: &mut WeightStore, s: &str, n: usize| {
                store.take(&format!("{}.weight", at(s)), &[n as i32])
            };
            blocks.push(Block {
                q_proj: lin(store, "self_attn.q_proj", cfg.num_attention_heads * hd, h)?,
                k_proj: lin(store, "self_attn.k_proj", cfg.num_key_value_heads * hd, h)?,
                v_proj: lin(store, "self_attn.v_proj", cfg.num_key_value_heads * hd, h)?,
                o_proj: lin(store, "self_attn.o_proj", h, cfg.num_attention_heads * hd)?,
                q_norm: norm(store, "self_attn.q_norm", hd)?,
                k_norm: norm(store, "self_attn.k_norm", hd)?,
                gate_proj: lin(store, "mlp.gate_proj", cfg.intermediate_size, h)?,
                up_proj: lin(store, "mlp.up_proj", cfg.intermediate_size, h)?,
                down_proj: lin(store, "mlp.down_proj", h, cfg.intermediate_size)?,
                input_layernorm: norm(store, "input_layernorm", h)?,
                post_attention_layernorm: norm(store, "post_attention_layernorm", h)?,
                pre_feedforward_layernorm: norm(store, "pre_feedforward_layernorm", h)?,
                post_feedforward_layernorm: norm(store, "post_feedforward_layernorm", h)?,
            });
        }
        let standardize = if cfg.standardize {
            Some((
                store.take("vision_tower.std_bias", &[h as i32])?,
                store.take("vision_tower.std_scale", &[h as i32])?,
            ))
        } else {
            None
        };
        let projection = store.linear("embed_vision.embedding_projection", text_hidden, h)?;
        Ok(Self {
            cfg: cfg.clone(),
            input_proj,
            position_table,
            blocks,
            standardize,
            projection,
            dtype,
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// The soft tokens of preprocessed `pixels` (see [`VisionTower::encode`]).
    ///
    /// Errors: as [`VisionTower::encode`].
    pub fn encode_pixels(&self, pixels: &jemma_media::Pixels) -> Result<Array> {
        let px = Array::from_slice(
            &pixels.data,
            &[1, 3, pixels.height as i32, pixels.width as i32],
        );
        self.encode(&px)
    }

    /// The soft tokens of one image: `pixel_values` (1, 3, H, W) in [0, 1], H and W multiples of
    /// `patch_size` with at most `max_patches` patches (the processor sizes images so, in whole
    /// `pooling_kernel_size` neighbourhoods) → (1, N, text hidden), N = patches / `pooling_kernel_size`²
    /// ≤ `default_output_length`.
    ///
    /// Errors: another shape, or more patches than the tower takes.
    pub fn encode(&self, pixel_values: &Array) -> Result<Array> {
        let cfg = &self.cfg;
        let shape = pixel_values.shape();
        let p = cfg.patch_size as i32;
        let bad = |why: String| Err(EngineError::InvalidRequest(why));
        if shape.len() != 4 || shape[0] != 1 || shape[1] != 3 {
            return bad(format!(
                "pixel values of shape {shape:?}, expected (1, 3, H, W)"
            ));
        }
        let (hgt, wid) = (shape[2], shape[3]);
        if hgt % p != 0 || wid % p != 0 || hgt == 0 || wid == 0 {
            return bad(format!(
                "an image of {wid}x{hgt} pixels is not a whole number of {p}-pixel patches"
            ));
        }
        let (rows, cols) = ((hgt / p) as usize, (wid / p) as usize);
        let max = cfg.max_patches();
        let real = rows * cols;
        if real > max {
            return bad(format!(
                "an image of {real} patches exceeds the vision tower's {max}"
            ));
        }
        let k = cfg.pooling_kernel_size.max(1);
        if rows % k != 0 || cols % k != 0 {
            return bad(format!(
                "an image of {cols}x{rows} patches is not a whole number of {k}x{k} neighbourhoods"
            ));
        }
        if cols.max(rows) > cfg.position_embedding_size {
            return bad(format!(
                "an image {cols} patches wide and {rows} high exceeds the {} positions the tower embeds",
                cfg.position_embedding_size
            ));
        }
        let dt = self.dtype;
        let hidden = cfg.hidden_size as i32;

        // Patches (1, real, p·p·3): rows of patches, each patch row by row, channels last.
        let x = pixel_values
            .as_dtype(dt)?
            .reshape(&[1, 3, rows as i32, p, cols as i32, p])?;
        let x = x
            .transpose_axes(&[0, 2, 4, 3, 5, 1])?
            .reshape(&[1, real as i32, 3 * p * p])?;
        let x = ops::multiply(scalar(2.0, dt)?, ops::subtract(&x, scalar(0.5, dt)?)?)?;
        let x = self.input_proj.forward(&x)?;
        let grid = patch_grid(rows, cols);
        let col_ids: Vec<i32> = grid.iter().map(|&(c, _)| c as i32).collect();
        let row_ids: Vec<i32> = grid.iter().map(|&(_, r)| r as i32).collect();
        let table = ops::split_equal(&self.position_table, 2, 0)?;
        let embed = |t: &Array, ids: &[i32]| -> Result<Array> {
            let ids = Array::from_slice(ids, &[real as i32]);
            Ok(t.reshape(&[cfg.position_embedding_size as i32, hidden])?
                .take_axis(&ids, 0)?)
        };
        let pos = ops::add(embed(&table[0], &col_ids)?, embed(&table[1], &row_ids)?)?;
        let mut h = ops::add(&x, pos.expand_dims(0)?)?;
        // The real patches alone, as mlx-vlm runs an image (`max_patches = num_real`): padding up to the
        // tower's budget would be masked out of everything, and cost the blocks up to 4× the work for a
        // small image or a 70-token video frame.
        let mut cols_f = vec![0f32; real];
        let mut rows_f = vec![0f32; real];
        for (i, &(c, r)) in grid.iter().enumerate() {
            cols_f[i] = c as f32;
            rows_f[i] = r as f32;
        }
        let rotary = self.rotary(&[cols_f, rows_f], dt)?;
        for b in &self.blocks {
            h = self.block(b, &h, &rotary)?;
        }

        // Pool k×k neighbourhoods of patches (k = `pooling_kernel_size`; mlx-vlm's output length
        // `num_real / k²`) into soft tokens.
        let length = real / (k * k);
        let (pooled, keep): (Array, Vec<i32>) = if k == 1 {
            (h, (0..real as i32).collect())
        } else {
            // Neighbourhood (c / k, r / k), numbered row by row over `cols / k` per row; a neighbourhood
            // number past `length` is dropped, as one_hot drops it in mlx-vlm.
            let per_row = cols / k;
            let mut weights = vec![0f32; length * real];
            let mut covered = vec![false; length];
            let w = 1.0 / (k * k) as f32;
            for (i, &(c, r)) in grid.iter().enumerate() {
                let idx = c / k + per_row * (r / k);
                if idx < length {
                    weights[idx * real + i] = w;
                    covered[idx] = true;
                }
            }
            let weights = Array::from_slice(&weights, &[1, length as i32, real as i32]);
            let out = ops::matmul(&weights, &h.as_dtype(Dtype::Float32)?)?.as_dtype(dt)?;
            let keep = covered
                .iter()
                .enumerate()
                .filter(|(_, c)| **c)
                .map(|(i, _)| i as i32)
                .collect();
            (out, keep)
        };
        let pooled = ops::multiply(&pooled, scalar((cfg.hidden_size as f32).sqrt(), dt)?)?;
        let n = keep.len() as i32;
        let mut out = pooled.take_axis(Array::from_slice(&keep, &[n]), 1)?;
        if let Some((bias, scale)) = &self.standardize {
            out = ops::multiply(ops::subtract(&out, bias)?, scale)?;
        }
        let normed = fast::rms_norm(&out, None, cfg.rms_norm_eps)?;
        self.projection.forward(&normed)
    }

    /// cos and sin of every patch's rotary angles: for each spatial axis (columns, then rows) a
    /// `head_dim / 2`-wide part with frequencies `theta^-(2j / part)`, j < part / 2, duplicated.
    fn rotary(&self, positions: &[Vec<f32>; 2], dt: Dtype) -> Result<Rotary> {
        let part = (self.cfg.head_dim / 2) as i32;
        let half = part / 2;
        let l = positions[0].len() as i32;
        let exps = ops::multiply(
            ops::arange::<_, f32>(0, half, None)?,
            Array::from_f32(2.0 / part as f32),
        )?;
        let timescale = ops::power(Array::from_f32(self.cfg.rope_theta()), &exps)?;
        let (mut cos, mut sin) = (vec![], vec![]);
        for axis in positions {
            let pos = Array::from_slice(axis, &[1, l, 1]);
            let angle = ops::divide(&pos, &timescale)?;
            let (c, s) = (ops::cos(&angle)?, ops::sin(&angle)?);
            cos.push(ops::concatenate(&[c.clone(), c], -1)?);
            sin.push(ops::concatenate(&[s.clone(), s], -1)?);
        }
        let shape = [1, l, 1, self.cfg.head_dim as i32];
        Ok(Rotary {
            cos: ops::concatenate(&cos, -1)?.reshape(&shape)?.as_dtype(dt)?,
            sin: ops::concatenate(&sin, -1)?.reshape(&shape)?.as_dtype(dt)?,
        })
    }

    fn block(&self, b: &Block, x: &Array, rot: &Rotary) -> Result<Array> {
        let cfg = &self.cfg;
        let eps = cfg.rms_norm_eps;
        let l = x.shape()[1];
        let hd = cfg.head_dim as i32;
        let normed = fast::rms_norm(x, Some(&b.input_layernorm), eps)?;
        let heads = |a: Array, n: usize| a.reshape(&[1, l, n as i32, hd]);
        let q = heads(b.q_proj.forward(&normed)?, cfg.num_attention_heads)?;
        let k = heads(b.k_proj.forward(&normed)?, cfg.num_key_value_heads)?;
        let v = heads(b.v_proj.forward(&normed)?, cfg.num_key_value_heads)?;
        let q = rotate(&fast::rms_norm(&q, Some(&b.q_norm), eps)?, rot)?;
        let k = rotate(&fast::rms_norm(&k, Some(&b.k_norm), eps)?, rot)?;
        let v = fast::rms_norm(&v, None, eps)?;
        let t = |a: Array| a.transpose_axes(&[0, 2, 1, 3]);
        let attn = fast::scaled_dot_product_attention(
            t(q)?,
            t(k)?,
            t(v)?,
            1.0,
            // Every patch is real: each sees every other.
            None::<ScaledDotProductAttentionMask<'_>>,
            None,
        )?;
        let attn = attn.transpose_axes(&[0, 2, 1, 3])?.reshape(&[1, l, -1])?;
        let attn = b.o_proj.forward(&attn)?;
        let attn = fast::rms_norm(&attn, Some(&b.post_attention_layernorm), eps)?;
        let h = ops::add(x, &attn)?;
        let normed = fast::rms_norm(&h, Some(&b.pre_feedforward_layernorm), eps)?;
        let gate = gelu_approx(&b.gate_proj.forward(&normed)?)?;
        let ff = b
            .down_proj
            .forward(&ops::multiply(&gate, b.up_proj.forward(&normed)?)?)?;
        let ff = fast::rms_norm(&ff, Some(&b.post_feedforward_layernorm), eps)?;
        Ok(ops::add(&h, &ff)?)
    }
}

/// `x cos + rotate_half(x) sin`, with `rotate_half` within each spatial axis's part of the head.
fn rotate(x: &Array, rot: &Rotary) -> Result<Array> {
    let p = ops::split_equal(x, 4, -1)?;
    let rotated = ops::concatenate(
        &[
            ops::negative(&p[1])?,
            p[0].clone(),
            ops::negative(&p[3])?,
            p[2].clone(),
        ],
        -1,
    )?;
    Ok(ops::add(
        ops::multiply(x, &rot.cos)?,
        ops::multiply(&rotated, &rot.sin)?,
    )?)
}

/// `nn.gelu_approx` (tanh form), as the text model computes it.
fn gelu_approx(x: &Array) -> Result<Array> {
    let dt = x.dtype();
    let cube = ops::power(x, scalar(3.0, dt)?)?;
    let inner = ops::add(x, ops::multiply(scalar(0.044715, dt)?, &cube)?)?;
    let t = ops::tanh(ops::multiply(
        scalar((2.0f64 / std::f64::consts::PI).sqrt() as f32, dt)?,
        &inner,
    )?)?;
    Ok(ops::multiply(
        ops::multiply(scalar(0.5, dt)?, x)?,
        ops::add(scalar(1.0, dt)?, &t)?,
    )?)
}

/// Whether a checkpoint key (HF `model.vision_tower.…`, MLX `vision_tower.…`) belongs to the vision tower or
/// its projection; its canonical name (without `model.`) when it does.
pub fn tower_key(key: &str) -> Option<&str> {
    let k = key.strip_prefix("model.").unwrap_or(key);
    (k.starts_with("vision_tower.") || k.starts_with("embed_vision.")).then_some(k)
}

/// Whether the checkpoint in `dir` has a vision tower (a `vision_config` and tower tensors), read from its
/// config and safetensors headers without loading anything. False when unreadable.
pub fn sees_images(dir: &std::path::Path) -> bool {
    super::has_tower(dir, "vision_config", tower_key)
}

/// Whether the checkpoint in `dir` sees video: it sees images ([`sees_images`]) and its config names a
/// video token (`video_token_id`), whose runs hold the frames' soft tokens.
pub fn sees_video(dir: &std::path::Path) -> bool {
    sees_images(dir)
        && std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v.get("video_token_id").is_some_and(|i| i.is_u64()))
}

/// Loads the vision tower of the Gemma 4 checkpoint in `dir` (its `config.json` `vision_config` and the
/// `vision_tower.*` / `embed_vision.*` tensors; every one of them used). `dtype`: None keeps the checkpoint's
/// (that of `patch_embedder.input_proj`). None when the checkpoint has no vision tower.
///
/// Errors: an unreadable checkpoint, a misshapen or unused tower tensor, a bad `vision_config`.
pub fn load_tower(dir: &std::path::Path, dtype: Option<Dtype>) -> Result<Option<VisionTower>> {
    let Some(t) = super::read_tower::<VisionConfig>(dir, "vision_config", tower_key)? else {
        return Ok(None);
    };
    let dtype = match dtype {
        Some(d) => d,
        None => t
            .tensors
            .get("vision_tower.patch_embedder.input_proj.weight")
            .or_else(|| {
                t.tensors
                    .get("vision_tower.patch_embedder.input_proj.scales")
            })
            .map(|a| a.dtype())
            .unwrap_or(Dtype::Float32),
    };
    let mut store = WeightStore::new(
        t.tensors,
        super::config::Quantization::default(),
        Some(dtype),
    );
    let tower = VisionTower::load(&t.cfg, t.text_hidden, &mut store, dtype)?;
    store.finish()?;
    Ok(Some(tower))
}
