//! `config.json` of Gemma 4 checkpoints, read the way mlx-lm's `gemma4.py` / `gemma4_text.py` read it.
//!
//! Both layouts are accepted: `model_type: "gemma4"` (multimodal wrapper, text settings nested in
//! `text_config`; the top-level `vocab_size` wins) and `model_type: "gemma4_text"` (flat). Defaults are mlx-lm's,
//! including the surprising ones (`num_kv_shared_layers` 20 and `hidden_size_per_layer_input` 256 when absent).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::{EngineError, Result};

/// The attention kind of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// Sliding-window attention (rotating KV cache of `sliding_window` entries).
    Sliding,
    /// Global attention over the whole context.
    Full,
}

/// RoPE settings of one layer type (`rope_parameters[layer_type]`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RopeParameters {
    /// `default` or `proportional` (the only kinds Gemma 4 ships).
    #[serde(default = "default_rope_type", alias = "type")]
    pub rope_type: String,
    /// Base of the rotary frequencies.
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    /// Share of the head dimension that rotates (proportional RoPE only).
    #[serde(default = "one")]
    pub partial_rotary_factor: f32,
    /// Frequency scaling factor (proportional RoPE only).
    #[serde(default = "one")]
    pub factor: f32,
}

fn default_rope_type() -> String {
    "default".into()
}
fn default_theta() -> f32 {
    10000.0
}
fn one() -> f32 {
    1.0
}

/// The text model's hyper-parameters (`gemma4_text.ModelArgs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    /// Residual stream width.
    pub hidden_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Dense MLP width (doubled on KV-shared layers when `use_double_wide_mlp`).
    pub intermediate_size: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Head dimension of sliding layers.
    pub head_dim: usize,
    /// Head dimension of full layers (0 = same as `head_dim`).
    pub global_head_dim: Option<usize>,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f32,
    /// Vocabulary size (rows of `embed_tokens`).
    pub vocab_size: usize,
    /// Rows of the per-layer embedding table.
    pub vocab_size_per_layer_input: usize,
    /// KV heads of sliding layers (and of full layers without k_eq_v).
    pub num_key_value_heads: usize,
    /// KV heads of full layers when `attention_k_eq_v`.
    pub num_global_key_value_heads: Option<usize>,
    /// The last this-many layers reuse the K/V of an earlier layer of their type.
    pub num_kv_shared_layers: usize,
    /// Width of the per-layer input embeddings (PLE); 0 or null disables them.
    pub hidden_size_per_layer_input: Option<usize>,
    /// Traditional (interleaved) RoPE pairs.
    pub rope_traditional: bool,
    /// RoPE per layer type.
    pub rope_parameters: Option<BTreeMap<String, RopeParameters>>,
    /// Sliding window length in tokens.
    pub sliding_window: usize,
    /// Period of the sliding/full pattern when `layer_types` is absent.
    pub sliding_window_pattern: usize,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Full layers use the K projection for V too (no `v_proj`).
    pub attention_k_eq_v: bool,
    /// `tanh(x / c) * c` on the logits; null disables.
    pub final_logit_softcapping: Option<f32>,
    /// KV-shared layers have a twice-as-wide MLP.
    pub use_double_wide_mlp: bool,
    /// Layers carry a mixture-of-experts block beside the dense MLP.
    pub enable_moe_block: bool,
    /// Number of experts.
    pub num_experts: Option<usize>,
    /// Experts used per token.
    pub top_k_experts: Option<usize>,
    /// Width of each expert's MLP.
    pub moe_intermediate_size: Option<usize>,
    /// `sliding_attention` / `full_attention` per layer.
    pub layer_types: Option<Vec<String>>,
    /// The LM head is the transposed token embedding.
    pub tie_word_embeddings: bool,
    /// `"vision"`: the soft tokens of one image attend to each other both ways while the prompt is read
    /// (the rest stays causal).
    pub use_bidirectional_attention: Option<String>,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1536,
            num_hidden_layers: 35,
            intermediate_size: 6144,
            num_attention_heads: 8,
            head_dim: 256,
            global_head_dim: Some(512),
            rms_norm_eps: 1e-6,
            vocab_size: 262144,
            vocab_size_per_layer_input: 262144,
            num_key_value_heads: 1,
            num_global_key_value_heads: None,
            num_kv_shared_layers: 20,
            hidden_size_per_layer_input: Some(256),
            rope_traditional: false,
            rope_parameters: None,
            sliding_window: 512,
            sliding_window_pattern: 5,
            max_position_embeddings: 131072,
            attention_k_eq_v: false,
            final_logit_softcapping: Some(30.0),
            use_double_wide_mlp: true,
            enable_moe_block: false,
            num_experts: None,
            top_k_experts: None,
            moe_intermediate_size: None,
            layer_types: None,
            tie_word_embeddings: true,
            use_bidirectional_attention: None,
        }
    }
}

/// MLX quantization of one module (`config.json` `quantization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct QuantParams {
    /// Input elements per scale/bias group.
    pub group_size: i32,
    /// Bits per weight.
    pub bits: i32,
}

/// The checkpoint's quantization: defaults plus per-module overrides (e.g. the 8-bit MoE router).
#[derive(Debug, Clone, Default)]
pub struct Quantization {
    /// Top-level defaults, if the checkpoint is quantized.
    pub default: Option<QuantParams>,
    /// Quantization mode (only `affine` is supported by this engine).
    pub mode: String,
    /// Per-module settings keyed by canonical module path (`layers.0.router.proj`).
    pub overrides: BTreeMap<String, QuantParams>,
}

/// Everything the engine needs from `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// `gemma4` or `gemma4_text`.
    pub model_type: String,
    /// The text model.
    pub text: TextConfig,
    /// Weight quantization.
    pub quantization: Quantization,
    /// Stop token ids from config.json (generation_config.json overrides these when present).
    pub eos_token_ids: Vec<u32>,
    /// The media placeholder ids of a multimodal checkpoint (`image_token_id`, `audio_token_id`,
    /// `video_token_id` of a config with a `vision_config` or `audio_config`): wherever they stand, even
    /// generated, their per-layer embeddings are the padding token's, as mlx-vlm reads them. Empty for a
    /// text checkpoint (mlx-lm's reading).
    pub media_token_ids: Vec<u32>,
}

/// Per-layer values derived from the config, as mlx-lm's layers compute them.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    /// Sliding or full.
    pub layer_type: LayerType,
    /// Head dimension.
    pub head_dim: usize,
    /// KV heads.
    pub n_kv_heads: usize,
    /// V comes from the K projection.
    pub k_eq_v: bool,
    /// Has its own K/V (else reads `kv_source`'s).
    pub has_kv: bool,
    /// Layer whose K/V this layer attends over (itself when `has_kv`).
    pub kv_source: usize,
    /// Dense MLP width.
    pub intermediate_size: usize,
    /// RoPE of this layer.
    pub rope: RopeParameters,
}

impl TextConfig {
    /// Layer types, derived from `sliding_window_pattern` when the config has no list.
    pub fn layer_types(&self) -> Result<Vec<LayerType>> {
        let names: Vec<String> = match &self.layer_types {
            Some(v) => v.clone(),
            None => {
                let p = self.sliding_window_pattern.max(1);
                (0..self.num_hidden_layers)
                    .map(|i| {
                        if i % p == p - 1 {
                            "full_attention".into()
                        } else {
                            "sliding_attention".into()
                        }
                    })
                    .collect()
            }
        };
        if names.len() != self.num_hidden_layers {
            return Err(EngineError::InvalidModel(format!(
                "layer_types has {} entries for {} layers",
                names.len(),
                self.num_hidden_layers
            )));
        }
        names
            .iter()
            .map(|n| match n.as_str() {
                "sliding_attention" => Ok(LayerType::Sliding),
                "full_attention" => Ok(LayerType::Full),
                other => Err(EngineError::Unsupported(format!("layer type {other:?}"))),
            })
            .collect()
    }

    /// Width of the per-layer inputs, 0 when disabled.
    pub fn ple_dim(&self) -> usize {
        self.hidden_size_per_layer_input.unwrap_or(0)
    }

    /// RoPE settings of a layer type, with mlx-lm's defaults when the config has none.
    pub fn rope_for(&self, t: LayerType) -> RopeParameters {
        let key = match t {
            LayerType::Sliding => "sliding_attention",
            LayerType::Full => "full_attention",
        };
        match &self.rope_parameters {
            Some(m) => m.get(key).cloned().unwrap_or(RopeParameters {
                rope_type: "default".into(),
                rope_theta: 10000.0,
                partial_rotary_factor: 1.0,
                factor: 1.0,
            }),
            None => match t {
                LayerType::Full => RopeParameters {
                    rope_type: "proportional".into(),
                    rope_theta: 1_000_000.0,
                    partial_rotary_factor: 0.25,
                    factor: 1.0,
                },
                LayerType::Sliding => RopeParameters {
                    rope_type: "default".into(),
                    rope_theta: 10000.0,
                    partial_rotary_factor: 1.0,
                    factor: 1.0,
                },
            },
        }
    }

    /// Per-layer specs (head dims, KV sharing map, MLP widths, RoPE), validated.
    pub fn layer_specs(&self) -> Result<Vec<LayerSpec>> {
        let types = self.layer_types()?;
        let n = self.num_hidden_layers;
        if self.num_kv_shared_layers > n {
            return Err(EngineError::InvalidModel(format!(
                "num_kv_shared_layers {} > num_hidden_layers {n}",
                self.num_kv_shared_layers
            )));
        }
        let first_shared = n - self.num_kv_shared_layers;
        // The last non-shared layer of each type is the K/V source of the shared layers of that type.
        let mut last_of_type: BTreeMap<u8, usize> = BTreeMap::new();
        for (i, t) in types.iter().enumerate().take(first_shared) {
            last_of_type.insert(*t as u8, i);
        }
        let mut out = Vec::with_capacity(n);
        for (i, &t) in types.iter().enumerate() {
            let head_dim = match (t, self.global_head_dim) {
                (LayerType::Full, Some(g)) if g > 0 => g,
                _ => self.head_dim,
            };
            let k_eq_v = self.attention_k_eq_v && t == LayerType::Full;
            let n_kv_heads = match (k_eq_v, self.num_global_key_value_heads) {
                (true, Some(g)) => g,
                _ => self.num_key_value_heads,
            };
            let has_kv = i < first_shared;
            let kv_source = if has_kv {
                i
            } else {
                *last_of_type.get(&(t as u8)).ok_or_else(|| {
                    EngineError::InvalidModel(format!(
                        "layer {i} shares K/V but no earlier layer of type {t:?} has its own"
                    ))
                })?
            };
            let shared_mlp = i >= first_shared && first_shared > 0;
            let intermediate_size = self.intermediate_size
                * if self.use_double_wide_mlp && shared_mlp {
                    2
                } else {
                    1
                };
            let rope = self.rope_for(t);
            match rope.rope_type.as_str() {
                "default" | "proportional" => {}
                other => {
                    return Err(EngineError::Unsupported(format!(
                        "rope_type {other:?} (Gemma 4 uses default and proportional)"
                    )));
                }
            }
            if !self.num_attention_heads.is_multiple_of(n_kv_heads) {
                return Err(EngineError::InvalidModel(format!(
                    "{} attention heads are not a multiple of {n_kv_heads} KV heads",
                    self.num_attention_heads
                )));
            }
            out.push(LayerSpec {
                layer_type: t,
                head_dim,
                n_kv_heads,
                k_eq_v,
                has_kv,
                kv_source,
                intermediate_size,
                rope,
            });
        }
        if self.enable_moe_block
            && (self.num_experts.is_none()
                || self.top_k_experts.is_none()
                || self.moe_intermediate_size.is_none())
        {
            return Err(EngineError::InvalidModel(
                "enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size"
                    .into(),
            ));
        }
        Ok(out)
    }
}

/// Token ids from a JSON field that may hold one id or a list (`eos_token_id`).
pub(crate) fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

pub(crate) fn parse_quantization(v: Option<&Value>) -> Result<Quantization> {
    let Some(Value::Object(m)) = v else {
        return Ok(Quantization::default());
    };
    let mut q = Quantization {
        mode: m
            .get("mode")
            .and_then(Value::as_str)
            .unwrap_or("affine")
            .to_string(),
        ..Default::default()
    };
    if let (Some(g), Some(b)) = (
        m.get("group_size").and_then(Value::as_i64),
        m.get("bits").and_then(Value::as_i64),
    ) {
        q.default = Some(QuantParams {
            group_size: g as i32,
            bits: b as i32,
        });
    }
    for (k, v) in m {
        if let Value::Object(o) = v {
            if let Some(mode) = o.get("mode").and_then(Value::as_str)
                && mode != "affine"
            {
                return Err(EngineError::Unsupported(format!(
                    "quantization mode {mode:?} for {k} (this engine runs affine MLX quantization)"
                )));
            }
            let p: QuantParams = serde_json::from_value(v.clone())
                .map_err(|e| EngineError::InvalidModel(format!("quantization entry {k}: {e}")))?;
            q.overrides.insert(canonical_key(k).unwrap_or_default(), p);
        }
    }
    if q.mode != "affine" {
        return Err(EngineError::Unsupported(format!(
            "quantization mode {:?} (this engine runs affine MLX quantization)",
            q.mode
        )));
    }
    Ok(q)
}

/// Maps a checkpoint key (HF `model.language_model.…`, MLX `language_model.model.…`, or `gemma4_text`
/// `model.…`) to the engine's canonical name (`layers.0.self_attn.q_proj.weight`, `lm_head.weight`).
/// `None` for the vision/audio towers, which this text engine skips knowingly.
pub fn canonical_key(key: &str) -> Option<String> {
    let k = key.strip_prefix("model.").unwrap_or(key);
    const TOWERS: [&str; 6] = [
        "vision_tower",
        "multi_modal_projector",
        "audio_tower",
        "embed_audio",
        "embed_vision",
        "vision_embedder",
    ];
    if TOWERS.iter().any(|t| k.starts_with(t)) {
        return None;
    }
    let k = k.strip_prefix("language_model.").unwrap_or(k);
    let k = k.strip_prefix("model.").unwrap_or(k);
    Some(k.to_string())
}

impl ModelConfig {
    /// Parses a `config.json` value.
    pub fn from_value(v: &Value) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| EngineError::InvalidModel("config.json has no model_type".into()))?
            .to_string();
        let (mut text_value, quant_value) = match model_type.as_str() {
            "gemma4" | "gemma4_unified" => {
                let mut t = v
                    .get("text_config")
                    .cloned()
                    .unwrap_or(Value::Object(Default::default()));
                // mlx-lm: the wrapper's vocab_size (default 262144) always overrides text_config's.
                let vocab = v.get("vocab_size").cloned().unwrap_or(Value::from(262144));
                if let Value::Object(m) = &mut t {
                    m.insert("vocab_size".into(), vocab);
                    m.entry("num_attention_heads").or_insert(Value::from(8));
                    m.entry("num_key_value_heads").or_insert(Value::from(1));
                }
                let q = v
                    .get("quantization")
                    .or_else(|| t.get("quantization"))
                    .cloned();
                (t, q)
            }
            "gemma4_text" => (v.clone(), v.get("quantization").cloned()),
            other => {
                return Err(EngineError::Unsupported(format!(
                    "model_type {other:?}: Jemma's MLX engine runs Gemma 4 (gemma4, gemma4_text)"
                )));
            }
        };
        // Keys mlx-lm ignores (e.g. `quantization` itself) must not fail parsing.
        if let Value::Object(m) = &mut text_value {
            m.remove("quantization");
            m.remove("quantization_config");
        }
        let text: TextConfig = serde_json::from_value(text_value.clone())
            .map_err(|e| EngineError::InvalidModel(format!("config.json: {e}")))?;
        if text.hidden_size == 0 || text.num_hidden_layers == 0 || text.vocab_size == 0 {
            return Err(EngineError::InvalidModel(
                "config.json: hidden_size, num_hidden_layers and vocab_size must be positive"
                    .into(),
            ));
        }
        text.layer_specs()?;
        let eos = ids_of(
            v.get("eos_token_id")
                .or_else(|| text_value.get("eos_token_id")),
        );
        let towers = ["vision_config", "audio_config"]
            .iter()
            .any(|k| v.get(*k).is_some_and(|c| !c.is_null()));
        let media_token_ids = if towers {
            ["image_token_id", "audio_token_id", "video_token_id"]
                .iter()
                .filter_map(|k| v.get(*k).and_then(Value::as_u64).map(|i| i as u32))
                .collect()
        } else {
            vec![]
        };
        Ok(Self {
            model_type,
            text,
            quantization: parse_quantization(quant_value.as_ref())?,
            eos_token_ids: eos,
            media_token_ids,
        })
    }

    /// Reads `<dir>/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let s = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
            path: path.clone(),
            source,
        })?;
        let v: Value = serde_json::from_str(&s)
            .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", path.display())))?;
        Self::from_value(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn e2b_like_config_derives_kv_sharing_and_head_dims() {
        let v = json!({"model_type": "gemma4", "vocab_size": 262144, "text_config": {
            "hidden_size": 1536, "num_hidden_layers": 35, "num_kv_shared_layers": 20,
            "layer_types": (0..35).map(|i| if i % 5 == 4 {"full_attention"} else {"sliding_attention"}).collect::<Vec<_>>(),
            "vocab_size": 1000}});
        let c = ModelConfig::from_value(&v).unwrap();
        assert_eq!(c.text.vocab_size, 262144, "wrapper vocab_size wins");
        let s = c.text.layer_specs().unwrap();
        assert_eq!(s[4].head_dim, 512);
        assert_eq!(s[3].head_dim, 256);
        assert!(s[14].has_kv && !s[15].has_kv);
        assert_eq!(
            s[15].kv_source, 13,
            "shared sliding layers read the last non-shared sliding layer"
        );
        assert_eq!(
            s[19].kv_source, 14,
            "shared full layers read the last non-shared full layer"
        );
        assert_eq!(s[20].intermediate_size, 2 * s[0].intermediate_size);
        assert_eq!(s[4].rope.rope_type, "proportional");
    }

    #[test]
    fn defaults_match_mlx_lm() {
        let c = ModelConfig::from_value(&json!({"model_type": "gemma4_text"})).unwrap();
        assert_eq!(c.text.num_kv_shared_layers, 20);
        assert_eq!(c.text.ple_dim(), 256);
        assert_eq!(c.text.final_logit_softcapping, Some(30.0));
        let types = c.text.layer_types().unwrap();
        assert_eq!(types[4], LayerType::Full);
        assert_eq!(types[5], LayerType::Sliding);
    }

    #[test]
    fn unknown_model_type_is_a_clear_error() {
        let e = ModelConfig::from_value(&json!({"model_type": "llama"})).unwrap_err();
        assert!(e.to_string().contains("llama"), "{e}");
        let e = ModelConfig::from_value(&json!({})).unwrap_err();
        assert!(e.to_string().contains("model_type"), "{e}");
    }

    #[test]
    fn per_module_quantization_overrides_are_canonical() {
        let v = json!({"model_type": "gemma4", "text_config": {"num_kv_shared_layers": 0},
            "quantization": {"group_size": 64, "bits": 4, "mode": "affine",
                "language_model.model.layers.0.router.proj": {"group_size": 64, "bits": 8}}});
        let c = ModelConfig::from_value(&v).unwrap();
        assert_eq!(
            c.quantization.default,
            Some(QuantParams {
                group_size: 64,
                bits: 4
            })
        );
        assert_eq!(
            c.quantization.overrides.get("layers.0.router.proj"),
            Some(&QuantParams {
                group_size: 64,
                bits: 8
            })
        );
        let bad = json!({"model_type": "gemma4_text", "quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}});
        assert!(
            ModelConfig::from_value(&bad)
                .unwrap_err()
                .to_string()
                .contains("mxfp4")
        );
    }

    #[test]
    fn canonical_keys() {
        assert_eq!(
            canonical_key("model.language_model.layers.3.mlp.up_proj.weight").unwrap(),
            "layers.3.mlp.up_proj.weight"
        );
        assert_eq!(
            canonical_key("language_model.model.embed_tokens.scales").unwrap(),
            "embed_tokens.scales"
        );
        assert_eq!(canonical_key("model.norm.weight").unwrap(), "norm.weight");
        assert_eq!(
            canonical_key("language_model.lm_head.weight").unwrap(),
            "lm_head.weight"
        );
        assert!(canonical_key("model.vision_tower.encoder.x").is_none());
        assert!(canonical_key("audio_tower.x").is_none());
    }
}
