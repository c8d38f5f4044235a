//! KV caches, replicating mlx-lm's `KVCache` and `RotatingKVCache` exactly.
//!
//! Exactness matters beyond the attended set: the order of keys in the buffer is the summation order of the
//! attention softmax, so the rotating cache keeps mlx-lm's concat/in-place/rotate layout step for step.

use mlx_rs::{
    Array,
    ops::{self, indexing::TryIndexMutOp, indexing::TryIndexOp},
};

use crate::Result;

/// Buffers grow in steps of this many positions (mlx-lm's `step`).
const STEP: i32 = 256;

fn zeros_like_heads(like: &Array, len: i32) -> Result<Array> {
    let s = like.shape();
    Ok(ops::zeros_dtype(&[s[0], s[1], len, s[3]], like.dtype())?)
}

/// A cache's key and value buffers after the update that has just set them. Both are always there by then;
/// a missing one is a bug, reported as [`crate::EngineError::Internal`] rather than a panic on the model
/// thread.
fn buffers<'a, T>(
    keys: &'a mut Option<T>,
    values: &'a mut Option<T>,
) -> Result<(&'a mut T, &'a mut T)> {
    match (keys.as_mut(), values.as_mut()) {
        (Some(k), Some(v)) => Ok((k, v)),
        _ => Err(crate::EngineError::Internal(
            "KV cache buffers missing after an update".into(),
        )),
    }
}

fn slice_len(a: &Array, start: i32, end: i32) -> Result<Array> {
    Ok(a.try_index((.., .., start..end, ..))?)
}

/// Growing cache for full-attention layers. Cloning is cheap (MLX arrays are shared, immutable values: the
/// clone keeps the old contents when the original is written to).
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    keys: Option<Array>,
    values: Option<Array>,
    /// Number of positions stored.
    pub offset: i32,
}

impl KvCache {
    /// Appends (B, heads, L, D) keys/values and returns everything cached so far.
    pub fn update_and_fetch(&mut self, k: &Array, v: &Array) -> Result<(Array, Array)> {
        let prev = self.offset;
        let l = k.shape()[2];
        let need_grow = match &self.keys {
            None => true,
            Some(keys) => prev + l > keys.shape()[2],
        };
        if need_grow {
            let n_steps = (STEP + l - 1) / STEP;
            let new_k = zeros_like_heads(k, n_steps * STEP)?;
            let new_v = zeros_like_heads(v, n_steps * STEP)?;
            match (self.keys.take(), self.values.take()) {
                (Some(mut keys), Some(mut values)) => {
                    if prev % STEP != 0 {
                        keys = slice_len(&keys, 0, prev)?;
                        values = slice_len(&values, 0, prev)?;
                    }
                    self.keys = Some(ops::concatenate(&[keys, new_k], 2)?);
                    self.values = Some(ops::concatenate(&[values, new_v], 2)?);
                }
                _ => {
                    self.keys = Some(new_k);
                    self.values = Some(new_v);
                }
            }
        }
        self.offset += l;
        let (keys, values) = buffers(&mut self.keys, &mut self.values)?;
        keys.try_index_mut((.., .., prev..self.offset, ..), k)?;
        values.try_index_mut((.., .., prev..self.offset, ..), v)?;
        Ok((
            slice_len(keys, 0, self.offset)?,
            slice_len(values, 0, self.offset)?,
        ))
    }

    /// Arrays to evaluate after a prefill chunk.
    pub fn state(&self) -> Vec<&Array> {
        self.keys.iter().chain(self.values.iter()).collect()
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.state().iter().map(|a| a.nbytes()).sum()
    }

    /// The keys and values held, (B, heads, offset, D) each; None when empty.
    pub fn view(&self) -> Result<Option<(Array, Array)>> {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) if self.offset > 0 => Ok(Some((
                slice_len(k, 0, self.offset)?,
                slice_len(v, 0, self.offset)?,
            ))),
            _ => Ok(None),
        }
    }

    /// Forgets the last `n` positions (mlx-lm `KVCache.trim`): the buffer stays and the next update
    /// overwrites them. Returns how many were dropped (at most `offset`).
    pub fn trim(&mut self, n: i32) -> i32 {
        let n = n.clamp(0, self.offset);
        self.offset -= n;
        n
    }
}

/// A quantized tensor as MLX stores it: packed uint32 values, per-group scales and biases.
#[derive(Debug, Clone)]
pub struct QTensor {
    /// Packed values.
    pub w: Array,
    /// Scales.
    pub scales: Array,
    /// Biases.
    pub biases: Array,
}

impl QTensor {
    fn quantize(x: &Array, group_size: i32, bits: i32) -> Result<Self> {
        let (w, scales, biases) = ops::quantize(x, group_size, bits)?;
        Ok(Self { w, scales, biases })
    }

    fn map(&self, f: impl Fn(&Array) -> Result<Array>) -> Result<Self> {
        Ok(Self {
            w: f(&self.w)?,
            scales: f(&self.scales)?,
            biases: f(&self.biases)?,
        })
    }

    fn parts(&self) -> [&Array; 3] {
        [&self.w, &self.scales, &self.biases]
    }
}

/// Full-attention cache with MLX-quantized keys and values (`QuantizedKVCache`): what `kv_bits` turns the
/// growing caches into once the context passes `quantized_kv_start`. Sliding-window caches stay in full
/// precision: they are bounded by the window (and mlx-lm cannot quantize them either).
#[derive(Debug, Clone)]
pub struct QuantizedKvCache {
    keys: Option<QTensor>,
    values: Option<QTensor>,
    /// Positions stored.
    pub offset: i32,
    /// Quantization group size.
    pub group_size: i32,
    /// Bits per element.
    pub bits: i32,
    /// The offset it was quantized at ([`QuantizedKvCache::from_full`]): positions from here on were
    /// written quantized, as they are read.
    pub quantized_at: i32,
}

impl QuantizedKvCache {
    /// Quantizes what a full-precision cache holds (its whole buffer, as mlx-lm's `to_quantized`).
    pub fn from_full(c: &KvCache, group_size: i32, bits: i32) -> Result<Self> {
        Ok(Self {
            keys: c
                .keys
                .as_ref()
                .map(|k| QTensor::quantize(k, group_size, bits))
                .transpose()?,
            values: c
                .values
                .as_ref()
                .map(|v| QTensor::quantize(v, group_size, bits))
                .transpose()?,
            offset: c.offset,
            group_size,
            bits,
            quantized_at: c.offset,
        })
    }

    /// Forgets the last `n` positions, clamped to those written quantized (from
    /// [`QuantizedKvCache::quantized_at`]; mlx-lm's `QuantizedKVCache.trim` clamps only to what is held);
    /// returns how many were dropped. Their slots are overwritten by the next write. Each position is
    /// quantized on its own (groups run along the head dimension), so what is kept is what writing only
    /// those positions left.
    pub fn trim(&mut self, n: i32) -> i32 {
        let n = n.clamp(0, self.offset - self.quantized_at);
        self.offset -= n;
        n
    }

    /// Appends (B, heads, L, D) keys/values; returns the quantized contents.
    pub fn update_and_fetch(&mut self, k: &Array, v: &Array) -> Result<(QTensor, QTensor)> {
        let s = k.shape();
        let (b, h, l, kd) = (s[0], s[1], s[2], s[3]);
        let vd = v.shape()[3];
        let prev = self.offset;
        let cap = self.keys.as_ref().map(|q| q.w.shape()[2]).unwrap_or(0);
        if self.keys.is_none() || prev + l > cap {
            let el_per_int = 32 / self.bits;
            let new_steps = (STEP + l - 1) / STEP * STEP;
            let init = |dim: i32, like: &Array| -> Result<QTensor> {
                Ok(QTensor {
                    w: ops::zeros_dtype(
                        &[b, h, new_steps, dim / el_per_int],
                        mlx_rs::Dtype::Uint32,
                    )?,
                    scales: ops::zeros_dtype(
                        &[b, h, new_steps, dim / self.group_size],
                        like.dtype(),
                    )?,
                    biases: ops::zeros_dtype(
                        &[b, h, new_steps, dim / self.group_size],
                        like.dtype(),
                    )?,
                })
            };
            let expand = |q: &QTensor| -> Result<QTensor> {
                let q = if prev % STEP != 0 {
                    q.map(|x| slice_len(x, 0, prev))?
                } else {
                    q.clone()
                };
                q.map(|x| {
                    let sh = x.shape();
                    let z = ops::zeros_dtype(&[sh[0], sh[1], new_steps, sh[3]], x.dtype())?;
                    Ok(ops::concatenate(&[x.clone(), z], 2)?)
                })
            };
            match (self.keys.take(), self.values.take()) {
                (Some(kq), Some(vq)) => {
                    self.keys = Some(expand(&kq)?);
                    self.values = Some(expand(&vq)?);
                }
                _ => {
                    self.keys = Some(init(kd, k)?);
                    self.values = Some(init(vd, v)?);
                }
            }
        }
        self.offset += l;
        let kq = QTensor::quantize(k, self.group_size, self.bits)?;
        let vq = QTensor::quantize(v, self.group_size, self.bits)?;
        let (keys, values) = buffers(&mut self.keys, &mut self.values)?;
        for (dst, src) in [
            (&mut keys.w, &kq.w),
            (&mut keys.scales, &kq.scales),
            (&mut keys.biases, &kq.biases),
        ] {
            dst.try_index_mut((.., .., prev..self.offset, ..), src)?;
        }
        for (dst, src) in [
            (&mut values.w, &vq.w),
            (&mut values.scales, &vq.scales),
            (&mut values.biases, &vq.biases),
        ] {
            dst.try_index_mut((.., .., prev..self.offset, ..), src)?;
        }
        let off = self.offset;
        if keys.w.shape()[2] == off {
            Ok((keys.clone(), values.clone()))
        } else {
            Ok((
                keys.map(|x| slice_len(x, 0, off))?,
                values.map(|x| slice_len(x, 0, off))?,
            ))
        }
    }

    /// What it holds, as its next query would attend over it: the quantized keys and values (B, heads, S,
    /// D / (32 / bits) packed, with their scales and biases), S its positions. None when empty.
    ///
    /// Errors: MLX failures.
    pub fn view(&self) -> Result<Option<(QTensor, QTensor)>> {
        let (Some(k), Some(v)) = (&self.keys, &self.values) else {
            return Ok(None);
        };
        if self.offset == 0 {
            return Ok(None);
        }
        let off = self.offset;
        Ok(Some((
            k.map(|x| slice_len(x, 0, off))?,
            v.map(|x| slice_len(x, 0, off))?,
        )))
    }

    /// Arrays to evaluate.
    pub fn state(&self) -> Vec<&Array> {
        self.keys
            .iter()
            .chain(self.values.iter())
            .flat_map(|q| q.parts())
            .collect()
    }
}

/// Sliding-window cache (`RotatingKVCache(max_size=window, keep=0)`).
#[derive(Debug, Clone)]
pub struct RotatingKvCache {
    keys: Option<Array>,
    values: Option<Array>,
    /// Number of positions seen (not stored).
    pub offset: i32,
    /// Window length.
    pub max_size: i32,
    idx: i32,
}

impl RotatingKvCache {
    /// An empty cache for a window of `max_size` positions.
    pub fn new(max_size: i32) -> Self {
        Self {
            keys: None,
            values: None,
            offset: 0,
            max_size,
            idx: 0,
        }
    }

    fn trim(trim_size: i32, v: &Array, append: Option<&Array>) -> Result<Array> {
        let mut parts: Vec<Array> = Vec::with_capacity(2);
        if trim_size > 0 {
            parts.push(v.try_index((.., .., trim_size.., ..))?);
        } else {
            parts.push(v.clone());
        }
        if let Some(a) = append {
            parts.push(a.clone());
        }
        Ok(ops::concatenate(&parts, 2)?)
    }

    fn temporal_order(&self, v: &Array) -> Result<Array> {
        let len = v.shape()[2];
        if self.idx == len {
            Ok(v.clone())
        } else if self.idx < self.offset {
            Ok(ops::concatenate(
                &[
                    v.try_index((.., .., self.idx.., ..))?,
                    slice_len(v, 0, self.idx)?,
                ],
                2,
            )?)
        } else {
            slice_len(v, 0, self.idx)
        }
    }

    fn update_concat(&mut self, k: &Array, v: &Array) -> Result<(Array, Array)> {
        match (self.keys.take(), self.values.take()) {
            (Some(keys), Some(values)) => {
                let keys = self.temporal_order(&keys)?;
                let values = self.temporal_order(&values)?;
                self.idx = keys.shape()[2];
                // Keep max_size - 1 old positions so every new token sees a full window.
                let trim_size = self.idx - self.max_size + 1;
                self.keys = Some(Self::trim(trim_size, &keys, Some(k))?);
                self.values = Some(Self::trim(trim_size, &values, Some(v))?);
            }
            _ => {
                self.keys = Some(k.clone());
                self.values = Some(v.clone());
            }
        }
        self.offset += k.shape()[2];
        let (keys, values) = buffers(&mut self.keys, &mut self.values)?;
        let (keys, values) = (keys.clone(), values.clone());
        self.idx = keys.shape()[2];
        Ok((keys, values))
    }

    fn update_in_place(&mut self, k: &Array, v: &Array) -> Result<(Array, Array)> {
        let s = k.shape()[2];
        let prev = self.offset;
        let grow = match &self.keys {
            None => true,
            Some(keys) => prev >= keys.shape()[2] && keys.shape()[2] < self.max_size,
        };
        if grow {
            let new_size = STEP.min(self.max_size - prev);
            let new_k = zeros_like_heads(k, new_size)?;
            let new_v = zeros_like_heads(v, new_size)?;
            match (self.keys.take(), self.values.take()) {
                (Some(keys), Some(values)) => {
                    self.keys = Some(ops::concatenate(&[keys, new_k], 2)?);
                    self.values = Some(ops::concatenate(&[values, new_v], 2)?);
                }
                _ => {
                    self.keys = Some(new_k);
                    self.values = Some(new_v);
                }
            }
            self.idx = prev;
        }
        let (keys, values) = buffers(&mut self.keys, &mut self.values)?;
        let len = keys.shape()[2];
        let trim_size = len - self.max_size;
        if trim_size > 0 {
            let (k, v) = (
                Self::trim(trim_size, keys, None)?,
                Self::trim(trim_size, values, None)?,
            );
            (self.keys, self.values) = (Some(k), Some(v));
            self.idx = self.max_size;
        }
        if self.idx == self.max_size {
            self.idx = 0;
        }
        let (keys, values) = buffers(&mut self.keys, &mut self.values)?;
        keys.try_index_mut((.., .., self.idx..self.idx + s, ..), k)?;
        values.try_index_mut((.., .., self.idx..self.idx + s, ..), v)?;
        self.offset += s;
        self.idx += s;
        let len = keys.shape()[2];
        if self.offset < len {
            Ok((
                slice_len(keys, 0, self.offset)?,
                slice_len(values, 0, self.offset)?,
            ))
        } else {
            Ok((keys.clone(), values.clone()))
        }
    }

    /// The keys and values held, in temporal order (the oldest position first), with the absolute position
    /// of the first: the last `min(offset, held)` positions, (B, heads, S, D) each. None when empty.
    pub fn view(&self) -> Result<Option<(Array, Array, i32)>> {
        match (&self.keys, &self.values) {
            (Some(k), Some(v)) if self.offset > 0 => {
                let (k, v) = (self.temporal_order(k)?, self.temporal_order(v)?);
                let held = k.shape()[2].min(self.offset);
                let from = k.shape()[2] - held;
                Ok(Some((
                    k.try_index((.., .., from.., ..))?,
                    v.try_index((.., .., from.., ..))?,
                    self.offset - held,
                )))
            }
            _ => Ok(None),
        }
    }

    /// The same cache holding its window alone, in buffers of its own. After a multi-position update the
    /// buffer also holds the positions that update read (up to a prefill chunk past the window), and a
    /// slice of it would keep all of it alive; what any later update leaves is the same either way (the
    /// next multi-position update keeps `max_size - 1` old positions, a single one rotates from the oldest).
    /// The copy is `× 1` in the cache's dtype, exact for every value, since MLX's `copy` shares buffers.
    pub fn compacted(&self) -> Result<Self> {
        let len = self.keys.as_ref().map_or(0, |k| k.shape()[2]);
        if self.idx != len || len <= self.max_size {
            return Ok(self.clone());
        }
        let own = |a: &Option<Array>| -> Result<Option<Array>> {
            a.as_ref()
                .map(|a| {
                    let tail = a.try_index((.., .., len - self.max_size.., ..))?;
                    let one = Array::from_f32(1.0).as_dtype(tail.dtype())?;
                    let copy = ops::multiply(&tail, &one)?;
                    mlx_rs::transforms::eval([&copy])?;
                    Ok(copy)
                })
                .transpose()
        };
        Ok(Self {
            keys: own(&self.keys)?,
            values: own(&self.values)?,
            offset: self.offset,
            max_size: self.max_size,
            idx: self.max_size,
        })
    }

    /// Whether [`RotatingKvCache::trim_end`] can drop positions: only while the window has never been
    /// full, since a full window has overwritten the positions a shorter history would still see
    /// (mlx-lm `RotatingKVCache.is_trimmable`: `offset < max_size`).
    pub fn is_trimmable(&self) -> bool {
        self.offset < self.max_size
    }

    /// Forgets the last `n` positions of a cache that [`RotatingKvCache::is_trimmable`] (mlx-lm
    /// `RotatingKVCache.trim`: the write index moves back with the offset, which for a window never
    /// filled is the number of positions stored), or that [`RotatingKvCache::can_trim`] `n`. Returns how
    /// many were dropped (0 when neither holds).
    pub fn trim_end(&mut self, n: i32) -> i32 {
        let n = n.clamp(0, self.offset);
        if self.is_trimmable() {
            self.offset -= n;
            self.idx -= n;
            return n;
        }
        if !self.can_trim(n) {
            return 0;
        }
        // After a multi-position update the buffer is in temporal order and longer than the window:
        // dropping its tail leaves what reading the shorter history would have left (at least a full
        // window, which the next update trims from the front as usual).
        let keep = self.idx - n;
        if let (Some(k), Some(v)) = (&self.keys, &self.values)
            && let (Ok(k), Ok(v)) = (slice_len(k, 0, keep), slice_len(v, 0, keep))
        {
            self.keys = Some(k);
            self.values = Some(v);
            self.offset -= n;
            self.idx = keep;
            return n;
        }
        0
    }

    /// Whether the last `n` positions can be forgotten exactly: always while the window has never been
    /// full ([`RotatingKvCache::is_trimmable`]), and after it has, right after a multi-position update
    /// (speculative decoding's verification), whose buffer holds `max_size - 1` older positions and the new
    /// ones in temporal order: up to all but one of the new ones can go, leaving a full window (all of
    /// them while the buffer still holds every position seen).
    pub fn can_trim(&self, n: i32) -> bool {
        if n <= 0 || self.is_trimmable() {
            return true;
        }
        let len = self.keys.as_ref().map_or(0, |k| k.shape()[2]);
        // In temporal order, and either nothing ever dropped (the buffer holds every position) or a full
        // window left after the cut.
        self.idx == len && (len == self.offset || len - n >= self.max_size)
    }

    /// Adds (B, heads, L, D) keys/values and returns what the new queries attend over.
    pub fn update_and_fetch(&mut self, k: &Array, v: &Array) -> Result<(Array, Array)> {
        if k.shape()[2] == 1 {
            self.update_in_place(k, v)
        } else {
            self.update_concat(k, v)
        }
    }

    /// Arrays to evaluate after a prefill chunk.
    pub fn state(&self) -> Vec<&Array> {
        self.keys.iter().chain(self.values.iter()).collect()
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.state().iter().map(|a| a.nbytes()).sum()
    }
}

/// Keys and values as a layer attends over them.
#[derive(Debug, Clone)]
pub enum Kv {
    /// Full precision.
    Plain(Array, Array),
    /// MLX-quantized (group size, bits).
    Quantized(QTensor, QTensor, i32, i32),
}

/// The cache of one non-shared layer.
#[derive(Debug, Clone)]
pub enum LayerCache {
    /// Full attention.
    Full(KvCache),
    /// Full attention, quantized (`kv_bits`).
    Quantized(QuantizedKvCache),
    /// Sliding window.
    Rotating(RotatingKvCache),
}

impl LayerCache {
    /// What this layer holds, as its next query would attend over it: full-precision keys and values
    /// (B, heads, S, D) in temporal order and the absolute position of the first (0 unless a sliding
    /// window has dropped older ones). None when empty or quantized (`kv_bits`).
    ///
    /// Errors: MLX failures.
    pub fn view(&self) -> Result<Option<(Array, Array, i32)>> {
        Ok(match self {
            LayerCache::Full(c) => c.view()?.map(|(k, v)| (k, v, 0)),
            LayerCache::Rotating(c) => c.view()?,
            LayerCache::Quantized(_) => None,
        })
    }

    /// What this layer holds, as its next query attends over it, in the form it is held: full-precision
    /// keys and values ([`LayerCache::view`]) or, `kv_bits`' quantized ones, with the absolute position of
    /// the first. None when empty.
    ///
    /// Errors: MLX failures.
    pub fn kv(&self) -> Result<Option<(Kv, i32)>> {
        Ok(match self {
            LayerCache::Quantized(c) => c
                .view()?
                .map(|(k, v)| (Kv::Quantized(k, v, c.group_size, c.bits), 0)),
            _ => self.view()?.map(|(k, v, first)| (Kv::Plain(k, v), first)),
        })
    }

    /// Positions seen so far.
    pub fn offset(&self) -> i32 {
        match self {
            LayerCache::Full(c) => c.offset,
            LayerCache::Quantized(c) => c.offset,
            LayerCache::Rotating(c) => c.offset,
        }
    }

    /// Adds keys/values; returns the attended keys/values.
    pub fn update_and_fetch(&mut self, k: &Array, v: &Array) -> Result<Kv> {
        Ok(match self {
            LayerCache::Full(c) => {
                let (k, v) = c.update_and_fetch(k, v)?;
                Kv::Plain(k, v)
            }
            LayerCache::Quantized(c) => {
                let (k, v) = c.update_and_fetch(k, v)?;
                Kv::Quantized(k, v, c.group_size, c.bits)
            }
            LayerCache::Rotating(c) => {
                let (k, v) = c.update_and_fetch(k, v)?;
                Kv::Plain(k, v)
            }
        })
    }

    /// Whether [`LayerCache::trim`] can drop positions from the end: a full-precision full-attention
    /// cache always, a sliding-window one until its window has filled. A quantized cache is not trimmed:
    /// it was quantized at a length a shorter history would not have reached, so the result would not be
    /// what reading that history afresh gives.
    pub fn is_trimmable(&self) -> bool {
        match self {
            LayerCache::Full(_) => true,
            LayerCache::Quantized(_) => false,
            LayerCache::Rotating(c) => c.is_trimmable(),
        }
    }

    /// Forgets the last `n` positions (clamped to what is held); returns how many were dropped: 0 for a
    /// cache that is not [`LayerCache::is_trimmable`], except a quantized one, which drops what
    /// [`LayerCache::can_trim`] allows (or nothing).
    pub fn trim(&mut self, n: i32) -> i32 {
        match self {
            LayerCache::Full(c) => c.trim(n),
            LayerCache::Quantized(c) if n <= c.offset - c.quantized_at => c.trim(n),
            // A partial trim would leave a cache no history wrote: nothing, as `can_trim` says.
            LayerCache::Quantized(_) => 0,
            LayerCache::Rotating(c) => c.trim_end(n),
        }
    }

    /// Whether [`LayerCache::trim`] can drop the last `n` positions exactly now: a full-precision
    /// full-attention cache always, a sliding-window one as [`RotatingKvCache::can_trim`] says, a quantized
    /// one back to where it was quantized (positions before were written in full precision, which
    /// trimming cannot give back: speculative decoding's rollback, which trims only what its round
    /// wrote, quantizes after the trim).
    pub fn can_trim(&self, n: i32) -> bool {
        match self {
            LayerCache::Full(_) => true,
            LayerCache::Quantized(c) => n <= c.offset - c.quantized_at,
            LayerCache::Rotating(c) => c.can_trim(n),
        }
    }

    /// Turns a full-attention cache into a quantized one once it holds `start` positions (mlx-lm's
    /// `maybe_quantize_kv_cache`); other kinds are left as they are.
    pub fn maybe_quantize(&mut self, group_size: i32, bits: i32, start: i32) -> Result<()> {
        if let LayerCache::Full(c) = self
            && c.offset >= start
        {
            *self = LayerCache::Quantized(QuantizedKvCache::from_full(c, group_size, bits)?);
        }
        Ok(())
    }

    /// Arrays to evaluate.
    pub fn state(&self) -> Vec<&Array> {
        match self {
            LayerCache::Full(c) => c.state(),
            LayerCache::Quantized(c) => c.state(),
            LayerCache::Rotating(c) => c.state(),
        }
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.state().iter().map(|a| a.nbytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos_array(start: i32, len: i32) -> Array {
        // (1, 1, len, 1) holding the absolute positions, so the cache layout can be read back.
        let v: Vec<f32> = (start..start + len).map(|x| x as f32).collect();
        Array::from_slice(&v, &[1, 1, len, 1])
    }

    fn read(a: &Array) -> Vec<f32> {
        a.as_slice::<f32>().to_vec()
    }

    /// A quantized cache trimmed of what a speculative round wrote and written again holds, bit for bit,
    /// what writing only the kept positions leaves (each position is quantized on its own), across a
    /// buffer step; it never trims below where it was quantized.
    #[test]
    fn a_trimmed_quantized_cache_holds_what_the_kept_writes_left() {
        let rows = |start: i32, len: i32| -> Array {
            // (1, 2, len, 64): a value for each head, absolute position and element.
            let mut v = Vec::with_capacity((2 * len * 64) as usize);
            for h in 0..2 {
                for p in start..start + len {
                    v.extend((0..64).map(|d| (((h * 1000 + p) * 64 + d) as f32 * 0.37).sin()));
                }
            }
            Array::from_slice(&v, &[1, 2, len, 64])
        };
        let quantized = |first: i32| {
            let mut full = KvCache::default();
            full.update_and_fetch(&rows(0, first), &rows(0, first))
                .unwrap();
            QuantizedKvCache::from_full(&full, 64, 4).unwrap()
        };
        let flat = |q: &QTensor| -> (Vec<u32>, Vec<u32>, Vec<u32>) {
            // A contiguous copy of what may be a slice of the buffer.
            let c = |a: &Array| a.contiguous().unwrap();
            let bits = |a: &Array| c(a).as_slice::<f32>().iter().map(|x| x.to_bits()).collect();
            (
                c(&q.w).as_slice::<u32>().to_vec(),
                bits(&q.scales),
                bits(&q.biases),
            )
        };
        // Kept: 250 positions, then 9 written, 6 of them rejected, then 20 more (past the 256-step buffer).
        let mut spec = quantized(250);
        spec.update_and_fetch(&rows(250, 9), &rows(250, 9)).unwrap();
        assert_eq!(spec.trim(6), 6);
        let (k, v) = spec
            .update_and_fetch(&rows(253, 20), &rows(253, 20))
            .unwrap();
        let mut plain = quantized(250);
        plain
            .update_and_fetch(&rows(250, 3), &rows(250, 3))
            .unwrap();
        let (pk, pv) = plain
            .update_and_fetch(&rows(253, 20), &rows(253, 20))
            .unwrap();
        assert_eq!(spec.offset, 273);
        assert!(
            (flat(&k), flat(&v)) == (flat(&pk), flat(&pv)),
            "the trimmed cache differs from the plain one"
        );
        // Positions written in full precision before the quantization cannot be trimmed back.
        let mut q = quantized(100);
        q.update_and_fetch(&rows(100, 4), &rows(100, 4)).unwrap();
        assert_eq!(q.trim(10), 4);
        assert_eq!((q.offset, q.quantized_at), (100, 100));
        let mut layer = LayerCache::Quantized(quantized(100));
        assert!(layer.can_trim(0) && !layer.can_trim(1));
        assert_eq!(layer.trim(1), 0);
    }

    #[test]
    fn full_cache_appends_across_step_boundaries() {
        let mut c = KvCache::default();
        let (k, _) = c
            .update_and_fetch(&pos_array(0, 300), &pos_array(0, 300))
            .unwrap();
        assert_eq!(k.shape()[2], 300);
        let (k, _) = c
            .update_and_fetch(&pos_array(300, 1), &pos_array(300, 1))
            .unwrap();
        assert_eq!(
            read(&k.flatten(None, None).unwrap()),
            (0..301).map(|x| x as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn rotating_cache_keeps_the_window_in_mlx_lm_layout() {
        let w = 4;
        let mut c = RotatingKvCache::new(w);
        // prefill chunk longer than the window: kept whole
        let (k, _) = c
            .update_and_fetch(&pos_array(0, 6), &pos_array(0, 6))
            .unwrap();
        assert_eq!(read(&k), vec![0., 1., 2., 3., 4., 5.]);
        // second chunk: w-1 old positions in temporal order, then the new ones
        let (k, _) = c
            .update_and_fetch(&pos_array(6, 2), &pos_array(6, 2))
            .unwrap();
        assert_eq!(read(&k), vec![3., 4., 5., 6., 7.]);
        // decode: trimmed to the window, then rotating in place
        let (k, _) = c
            .update_and_fetch(&pos_array(8, 1), &pos_array(8, 1))
            .unwrap();
        assert_eq!(read(&k), vec![8., 5., 6., 7.]);
        let (k, _) = c
            .update_and_fetch(&pos_array(9, 1), &pos_array(9, 1))
            .unwrap();
        assert_eq!(read(&k), vec![8., 9., 6., 7.]);
        assert_eq!(c.offset, 10);
        // a multi-token chunk after decode restores temporal order first
        let (k, _) = c
            .update_and_fetch(&pos_array(10, 2), &pos_array(10, 2))
            .unwrap();
        assert_eq!(read(&k), vec![7., 8., 9., 10., 11.]);
    }

    /// Speculative decoding's rollback on a full window: after a multi-position update (the verification
    /// of drafts), dropping the rejected tail leaves exactly what reading only the kept positions leaves,
    /// for the next single-position step and the next multi-position one.
    #[test]
    fn rotating_cache_trims_a_verified_tail_after_the_window_filled() {
        let w = 4;
        let mut spec = RotatingKvCache::new(w);
        let mut plain = RotatingKvCache::new(w);
        for c in [&mut spec, &mut plain] {
            c.update_and_fetch(&pos_array(0, 6), &pos_array(0, 6))
                .unwrap();
            c.update_and_fetch(&pos_array(6, 1), &pos_array(6, 1))
                .unwrap();
        }
        assert!(!spec.is_trimmable());
        // Verify 4 positions (7..11), keep 2 of them: 2 dropped.
        spec.update_and_fetch(&pos_array(7, 4), &pos_array(7, 4))
            .unwrap();
        assert!(spec.can_trim(3) && !spec.can_trim(4));
        assert_eq!(spec.trim_end(2), 2);
        plain
            .update_and_fetch(&pos_array(7, 2), &pos_array(7, 2))
            .unwrap();
        assert_eq!(spec.offset, plain.offset);
        // Both now see the same window for a decode step and for a following chunk.
        let (a, _) = spec
            .update_and_fetch(&pos_array(9, 1), &pos_array(9, 1))
            .unwrap();
        let (b, _) = plain
            .update_and_fetch(&pos_array(9, 1), &pos_array(9, 1))
            .unwrap();
        let sorted = |a: &Array| {
            let mut v = read(a);
            v.sort_by(f32::total_cmp);
            v
        };
        assert_eq!(sorted(&a), sorted(&b));
        assert_eq!(sorted(&a), vec![6., 7., 8., 9.]);
        // Right after a single-position step on a full window nothing can go.
        assert!(!spec.can_trim(1));
        assert_eq!(spec.trim_end(1), 0);
        let (a, _) = spec
            .update_and_fetch(&pos_array(10, 3), &pos_array(10, 3))
            .unwrap();
        let (b, _) = plain
            .update_and_fetch(&pos_array(10, 3), &pos_array(10, 3))
            .unwrap();
        assert_eq!(read(&a), read(&b));
    }
}
