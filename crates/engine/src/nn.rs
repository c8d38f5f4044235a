//! The few layer kinds Gemma 4 needs, dense or MLX-quantized, and a strict weight store.
//!
//! mlx-rs's own modules are not used on purpose: their loader silently ignores missing and unexpected keys
//! and does no shape check, while a model that runs on half-loaded random weights is the worst failure an
//! inference server can have. Here every tensor is taken by name, shape-checked, and the store must be empty
//! at the end.

use std::collections::{BTreeMap, HashMap};

use mlx_rs::{Array, Dtype, ops};

use crate::models::gemma4::config::{QuantParams, Quantization};
use crate::{EngineError, Result};

/// Bytes per element of an activation dtype.
pub fn dtype_bytes(d: Dtype) -> u64 {
    use Dtype::*;
    match d {
        Float64 | Int64 | Uint64 | Complex64 => 8,
        Float32 | Int32 | Uint32 => 4,
        Float16 | Bfloat16 | Int16 | Uint16 => 2,
        _ => 1,
    }
}

/// A scalar in the activation dtype. MLX's Python API rounds Python floats to the array's dtype ("weak"
/// scalars); mlx-rs makes float32 scalars, which would silently promote bf16 activations to f32 and change
/// every rounding. All model constants go through this.
pub fn scalar(v: f32, dt: Dtype) -> Result<Array> {
    Ok(Array::from_f32(v).as_dtype(dt)?)
}

/// A quantized weight: packed uint32 `weight`, per-group `scales` and `biases` (MLX affine mode).
#[derive(Debug)]
pub struct QuantWeight {
    /// Packed weights.
    pub weight: Array,
    /// Per-group scales.
    pub scales: Array,
    /// Per-group biases.
    pub biases: Array,
    /// Group size and bit width.
    pub params: QuantParams,
}

/// `y = x Wᵀ` with a dense or quantized `W` of shape (out, in). No bias: Gemma 4 has none.
#[derive(Debug)]
pub enum Linear {
    /// Plain weight (out, in).
    Dense(Array),
    /// MLX-quantized weight.
    Quantized(QuantWeight),
}

impl Linear {
    /// Applies the layer to the last axis of `x`.
    pub fn forward(&self, x: &Array) -> Result<Array> {
        Ok(match self {
            Linear::Dense(w) => ops::matmul(x, w.t())?,
            Linear::Quantized(q) => ops::quantized_matmul(
                x,
                &q.weight,
                &q.scales,
                &q.biases,
                true,
                q.params.group_size,
                q.params.bits,
            )?,
        })
    }
}

/// Token embedding table (V, H), dense or quantized; `as_linear` is the tied LM head.
#[derive(Debug)]
pub struct Embedding(pub Linear);

impl Embedding {
    /// Looks up rows for integer ids of any shape; output has one more axis.
    pub fn forward(&self, ids: &Array) -> Result<Array> {
        match &self.0 {
            Linear::Dense(w) => Ok(w.take_axis(ids, 0)?),
            Linear::Quantized(q) => {
                // As mlx.nn.QuantizedEmbedding: gather packed rows and their groups, then dequantize.
                let shape = ids.shape().to_vec();
                let flat = ids.flatten(None, None)?;
                let out = ops::dequantize(
                    q.weight.take_axis(&flat, 0)?,
                    q.scales.take_axis(&flat, 0)?,
                    &q.biases.take_axis(&flat, 0)?,
                    q.params.group_size,
                    q.params.bits,
                )?;
                let mut s = shape;
                s.push(-1);
                Ok(out.reshape(&s)?)
            }
        }
    }

    /// `x Eᵀ`: the tied LM head.
    pub fn as_linear(&self, x: &Array) -> Result<Array> {
        self.0.forward(x)
    }
}

/// Mixture-of-experts projection: a stack of E matrices (E, out, in) applied per routed expert.
#[derive(Debug)]
pub enum SwitchLinear {
    /// Plain (E, out, in).
    Dense(Array),
    /// MLX-quantized.
    Quantized(QuantWeight),
}

impl SwitchLinear {
    /// `x @ W[idx]ᵀ` for each index, as mlx-lm's SwitchLinear / QuantizedSwitchLinear.
    pub fn forward(&self, x: &Array, idx: &Array, sorted: bool) -> Result<Array> {
        Ok(match self {
            SwitchLinear::Dense(w) => {
                ops::gather_mm(x, w.swap_axes(-1, -2)?, None, Some(idx), sorted)?
            }
            SwitchLinear::Quantized(q) => ops::gather_qmm(
                x,
                &q.weight,
                &q.scales,
                &q.biases,
                None,
                Some(idx),
                true,
                q.params.group_size,
                q.params.bits,
                sorted,
            )?,
        })
    }
}

/// Tensors of a checkpoint by canonical name, taken out one by one with shape checks.
pub struct WeightStore {
    tensors: HashMap<String, Array>,
    quant: Quantization,
    /// Float tensors are cast to this dtype on load (None keeps the checkpoint's dtype, as mlx-lm does).
    compute_dtype: Option<Dtype>,
    /// Keys deliberately not used (vision/audio towers, K/V of shared layers, rotary caches, clip ranges).
    pub skipped: BTreeMap<String, usize>,
}

impl WeightStore {
    /// Wraps loaded tensors.
    pub fn new(
        tensors: HashMap<String, Array>,
        quant: Quantization,
        compute_dtype: Option<Dtype>,
    ) -> Self {
        Self {
            tensors,
            quant,
            compute_dtype,
            skipped: BTreeMap::new(),
        }
    }

    /// Records a knowingly skipped tensor group (for the load report).
    pub fn skip(&mut self, why: &str) {
        *self.skipped.entry(why.to_string()).or_default() += 1;
    }

    /// Whether a tensor exists.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The stored dtype of a tensor, if present.
    pub fn peek_dtype(&self, name: &str) -> Option<Dtype> {
        self.tensors.get(name).map(|a| a.dtype())
    }

    /// Removes a tensor (no checks).
    pub fn remove(&mut self, name: &str) -> Option<Array> {
        self.tensors.remove(name)
    }

    /// Inserts a tensor (used by sanitize rules that split or rename).
    pub fn insert(&mut self, name: String, a: Array) {
        self.tensors.insert(name, a);
    }

    /// All names still in the store.
    pub fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn cast(&self, a: Array) -> Result<Array> {
        match self.compute_dtype {
            Some(dt) if a.dtype().is_float() && a.dtype() != dt => {
                // Materialise now so the checkpoint-dtype copy is freed at load, not at the first request.
                let c = a.as_dtype(dt)?;
                c.eval()?;
                Ok(c)
            }
            _ => Ok(a),
        }
    }

    /// Takes a float tensor of exactly `shape`.
    pub fn take(&mut self, name: &str, shape: &[i32]) -> Result<Array> {
        let a = self
            .tensors
            .remove(name)
            .ok_or_else(|| EngineError::InvalidModel(format!("missing tensor {name}")))?;
        if a.shape() != shape {
            return Err(EngineError::InvalidModel(format!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                a.shape()
            )));
        }
        self.cast(a)
    }

    fn quant_params(
        &self,
        path: &str,
        in_dims: i32,
        packed_cols: i32,
        scale_cols: i32,
    ) -> Result<QuantParams> {
        if let Some(p) = self.quant.overrides.get(path) {
            return Ok(*p);
        }
        // mlx-lm's infer_quant_config: from tensor shapes, not from the top-level defaults.
        if scale_cols <= 0 || in_dims % scale_cols != 0 || (packed_cols * 32) % in_dims != 0 {
            return Err(EngineError::InvalidModel(format!(
                "{path}: cannot infer quantization from packed width {packed_cols} and {scale_cols} groups for {in_dims} inputs"
            )));
        }
        Ok(QuantParams {
            group_size: in_dims / scale_cols,
            bits: packed_cols * 32 / in_dims,
        })
    }

    fn take_quant(&mut self, path: &str, lead: &[i32], in_dims: i32) -> Result<QuantWeight> {
        let w = self
            .tensors
            .remove(&format!("{path}.weight"))
            .ok_or_else(|| EngineError::InvalidModel(format!("missing tensor {path}.weight")))?;
        let scales = self
            .remove(&format!("{path}.scales"))
            .ok_or_else(|| EngineError::InvalidModel(format!("missing tensor {path}.scales")))?;
        let biases = self.remove(&format!("{path}.biases")).ok_or_else(|| {
            EngineError::InvalidModel(format!(
                "missing tensor {path}.biases (only affine quantization is supported)"
            ))
        })?;
        let nd = lead.len();
        let ok_lead = |a: &Array| a.ndim() == nd + 1 && &a.shape()[..nd] == lead;
        if !ok_lead(&w) || !ok_lead(&scales) || scales.shape() != biases.shape() {
            return Err(EngineError::InvalidModel(format!(
                "{path}: quantized shapes weight {:?} scales {:?} biases {:?} do not fit {lead:?}x{in_dims}",
                w.shape(),
                scales.shape(),
                biases.shape()
            )));
        }
        if w.dtype() != Dtype::Uint32 {
            return Err(EngineError::InvalidModel(format!(
                "{path}.weight is {:?}, expected packed uint32",
                w.dtype()
            )));
        }
        let params = self.quant_params(path, in_dims, w.shape()[nd], scales.shape()[nd])?;
        if in_dims % params.group_size != 0
            || scales.shape()[nd] != in_dims / params.group_size
            || w.shape()[nd] != in_dims * params.bits / 32
        {
            return Err(EngineError::InvalidModel(format!(
                "{path}: {params:?} does not match shapes weight {:?} scales {:?}",
                w.shape(),
                scales.shape()
            )));
        }
        Ok(QuantWeight {
            weight: w,
            scales: self.cast(scales)?,
            biases: self.cast(biases)?,
            params,
        })
    }

    /// A linear layer at `path` with logical weight (out, in), quantized if the checkpoint has scales.
    pub fn linear(&mut self, path: &str, out: usize, inp: usize) -> Result<Linear> {
        if self.has(&format!("{path}.scales")) {
            Ok(Linear::Quantized(self.take_quant(
                path,
                &[out as i32],
                inp as i32,
            )?))
        } else {
            Ok(Linear::Dense(self.take(
                &format!("{path}.weight"),
                &[out as i32, inp as i32],
            )?))
        }
    }

    /// An embedding table at `path` of logical shape (rows, dims).
    pub fn embedding(&mut self, path: &str, rows: usize, dims: usize) -> Result<Embedding> {
        Ok(Embedding(self.linear(path, rows, dims)?))
    }

    /// A stack of expert matrices (E, out, in) at `path`.
    pub fn switch_linear(
        &mut self,
        path: &str,
        e: usize,
        out: usize,
        inp: usize,
    ) -> Result<SwitchLinear> {
        if self.has(&format!("{path}.scales")) {
            Ok(SwitchLinear::Quantized(self.take_quant(
                path,
                &[e as i32, out as i32],
                inp as i32,
            )?))
        } else {
            Ok(SwitchLinear::Dense(self.take(
                &format!("{path}.weight"),
                &[e as i32, out as i32, inp as i32],
            )?))
        }
    }

    /// Fails if any tensor was neither used nor knowingly skipped.
    pub fn finish(self) -> Result<BTreeMap<String, usize>> {
        if self.tensors.is_empty() {
            return Ok(self.skipped);
        }
        let mut left: Vec<_> = self.tensors.into_keys().collect();
        left.sort();
        let n = left.len();
        left.truncate(8);
        Err(EngineError::InvalidModel(format!(
            "{n} checkpoint tensors are not used by the model (first: {})",
            left.join(", ")
        )))
    }
}
