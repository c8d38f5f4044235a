//! Gemma 4 (text): configuration, weights and the decoder.

pub mod assistant;
pub mod audio;
pub mod config;
pub mod model;
pub mod vision;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use mlx_rs::{Array, Dtype, ops};

pub use assistant::{DraftRow, Gemma4Assistant};
pub use config::ModelConfig;
pub use model::{Cache, Checkpoint, Gemma4, KvQuant, Placed};

use crate::nn::WeightStore;
use crate::{EngineError, Result};

/// What loading found, for logs and `/health`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    /// Tensors read from the checkpoint.
    pub tensors: usize,
    /// Bytes of all tensors as stored.
    pub bytes: u64,
    /// Tensors deliberately not used, by reason.
    pub skipped: BTreeMap<String, usize>,
    /// Activation dtype.
    pub dtype: String,
    /// Whether any layer is quantized.
    pub quantized: bool,
}

/// The safetensors files of a checkpoint: the shards named by `model.safetensors.index.json`, else every
/// `*.safetensors` file except references and adapters.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let s = std::fs::read_to_string(&index).map_err(|source| EngineError::Io {
            path: index.clone(),
            source,
        })?;
        let v: serde_json::Value = serde_json::from_str(&s)
            .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                EngineError::InvalidModel(format!("{} has no weight_map", index.display()))
            })?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let mut files = vec![];
    let rd = std::fs::read_dir(dir).map_err(|source| EngineError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") && name.starts_with("model") {
            files.push(e.path());
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(EngineError::InvalidModel(format!(
            "no model*.safetensors in {}",
            dir.display()
        )));
    }
    Ok(files)
}

/// mlx-lm's sanitize rules, on canonical keys: drop rotary caches and clip ranges, drop the K/V projections
/// of KV-shared layers, split HF's fused `experts.gate_up_proj`, rename `experts.down_proj`.
/// Why the loader drops a (canonical) checkpoint tensor, if it does: rotary caches and activation clip
/// ranges are recomputed or unused, and KV-shared layers read another layer's K/V. Shared with the footprint
/// estimate, which must count exactly what the loader keeps.
pub fn dropped_at_load(key: &str, first_shared: usize) -> Option<&'static str> {
    if [
        "self_attn.rotary_emb",
        "input_max",
        "input_min",
        "output_max",
        "output_min",
    ]
    .iter()
    .any(|s| key.contains(s))
    {
        return Some("rotary cache / activation clip range");
    }
    let layer = key
        .strip_prefix("layers.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse::<usize>().ok());
    if layer.is_some_and(|l| l >= first_shared)
        && [
            ".self_attn.k_proj",
            ".self_attn.v_proj",
            ".self_attn.k_norm",
        ]
        .iter()
        .any(|s| key.contains(s))
    {
        return Some("K/V projection of a KV-shared layer");
    }
    None
}

fn sanitize(raw: HashMap<String, Array>, cfg: &ModelConfig, store: &mut WeightStore) -> Result<()> {
    let first_shared = cfg.text.num_hidden_layers - cfg.text.num_kv_shared_layers;
    for (key, v) in raw {
        let Some(k) = config::canonical_key(&key) else {
            store.skip("vision/audio tower (text-only engine)");
            continue;
        };
        if let Some(why) = dropped_at_load(&k, first_shared) {
            store.skip(why);
            continue;
        }
        if let Some(base) = k.strip_suffix(".experts.gate_up_proj") {
            let Ok([gate, up]) = <[Array; 2]>::try_from(ops::split_equal(&v, 2, -2)?) else {
                return Err(EngineError::InvalidModel(format!("{k}: not two halves")));
            };
            store.insert(format!("{base}.experts.switch_glu.gate_proj.weight"), gate);
            store.insert(format!("{base}.experts.switch_glu.up_proj.weight"), up);
            continue;
        }
        if let Some(base) = k.strip_suffix(".experts.down_proj") {
            store.insert(format!("{base}.experts.switch_glu.down_proj.weight"), v);
            continue;
        }
        store.insert(k, v);
    }
    Ok(())
}

/// Loads a Gemma 4 checkpoint directory. `compute_dtype`: None keeps the checkpoint's dtype (mlx-lm's
/// behaviour), Some(dt) casts float weights and activations to `dt`.
pub fn load(dir: &Path, compute_dtype: Option<Dtype>) -> Result<(Gemma4, ModelConfig, LoadReport)> {
    load_with_progress(dir, compute_dtype, &mut |_| {})
}

/// [`load`], reporting the share of weight bytes read so far (0.0 to 1.0). Weights are read from disk here,
/// not lazily on the first request, so "ready" means ready.
pub fn load_with_progress(
    dir: &Path,
    compute_dtype: Option<Dtype>,
    progress: &mut dyn FnMut(f32),
) -> Result<(Gemma4, ModelConfig, LoadReport)> {
    let cfg = ModelConfig::load(dir)?;
    let files = weight_files(dir)?;
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum::<u64>()
        .max(1);
    let mut raw = HashMap::new();
    let mut bytes = 0u64;
    let mut read = 0u64;
    progress(0.0);
    for f in &files {
        let t = Array::load_safetensors(f)
            .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", f.display())))?;
        mlx_rs::transforms::eval(t.values())?;
        read += std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
        progress((read as f64 / total as f64).min(1.0) as f32);
        for (k, v) in t {
            bytes += v.nbytes() as u64;
            if raw.insert(k.clone(), v).is_some() {
                return Err(EngineError::InvalidModel(format!(
                    "tensor {k} appears in two shards"
                )));
            }
        }
    }
    let n_tensors = raw.len();
    let mut store = WeightStore::new(HashMap::new(), cfg.quantization.clone(), compute_dtype);
    sanitize(raw, &cfg, &mut store)?;
    let quantized =
        store.has("embed_tokens.scales") || store.names().iter().any(|n| n.ends_with(".scales"));
    // mlx-lm's activation dtype is the embedding output's: the weight's, or the scales' when quantized.
    let dtype = match compute_dtype {
        Some(dt) => dt,
        None => {
            let probe = if store.has("embed_tokens.scales") {
                "embed_tokens.scales"
            } else {
                "embed_tokens.weight"
            };
            store.peek_dtype(probe).unwrap_or(Dtype::Float32)
        }
    };
    let model = Gemma4::load(&cfg, &mut store, dtype)?;
    let skipped = store.finish()?;
    Ok((
        model,
        cfg,
        LoadReport {
            tensors: n_tensors,
            bytes,
            skipped,
            dtype: format!("{dtype:?}").to_lowercase(),
            quantized,
        },
    ))
}

/// A tower's part of a multimodal checkpoint (the vision or audio tower with its projection), read for
/// [`vision::load_tower`] and [`audio::load_tower`].
pub(crate) struct TowerCheckpoint<C> {
    /// The tower's config section (`vision_config`, `audio_config`).
    pub cfg: C,
    /// The text model's width (`text_config.hidden_size`): what the projection maps to.
    pub text_hidden: usize,
    /// The tower's tensors by canonical name (without `model.`).
    pub tensors: HashMap<String, Array>,
}

/// Reads the tower configured as `section` of the checkpoint in `dir`: its config and the tensors
/// `tower_key` claims (their canonical names). None when the config has no such section or the checkpoint
/// no such tensors.
///
/// Errors: an unreadable `config.json` or weight file; a section `C` cannot read; no
/// `text_config.hidden_size`.
pub(crate) fn read_tower<C: serde::de::DeserializeOwned>(
    dir: &Path,
    section: &str,
    tower_key: fn(&str) -> Option<&str>,
) -> Result<Option<TowerCheckpoint<C>>> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
        path: path.clone(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", path.display())))?;
    let Some(section_value) = v.get(section).filter(|c| !c.is_null()) else {
        return Ok(None);
    };
    let cfg: C = serde_json::from_value(section_value.clone())
        .map_err(|e| EngineError::InvalidModel(format!("{section}: {e}")))?;
    let text_hidden = v
        .pointer("/text_config/hidden_size")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| {
            EngineError::InvalidModel("config.json has no text_config.hidden_size".into())
        })? as usize;
    let mut tensors = HashMap::new();
    for f in weight_files(dir)? {
        let t = Array::load_safetensors(&f)
            .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", f.display())))?;
        for (k, a) in t {
            if let Some(name) = tower_key(&k) {
                tensors.insert(name.to_string(), a);
            }
        }
    }
    Ok((!tensors.is_empty()).then_some(TowerCheckpoint {
        cfg,
        text_hidden,
        tensors,
    }))
}

/// Whether the checkpoint in `dir` has the tower configured as `section` (the section and tensors
/// `tower_key` claims), from its config and safetensors headers without loading anything. False when
/// unreadable.
pub(crate) fn has_tower(dir: &Path, section: &str, tower_key: fn(&str) -> Option<&str>) -> bool {
    let has_config = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get(section).is_some_and(|c| !c.is_null()));
    has_config
        && weight_files(dir).is_ok_and(|files| {
            files.iter().any(|f| {
                crate::footprint::read_header(f)
                    .is_ok_and(|h| h.iter().any(|(k, _, _)| tower_key(k).is_some()))
            })
        })
}
