//! Reading a GGUF's metadata without loading it, to refuse layouts llama.cpp cannot run before llama.cpp
//! gets a chance to abort the process on them. llama-cpp-2's GGUF API does not expose array values (the
//! per-layer sliding-window pattern is one), hence this small reader of the documented format
//! (magic, version, counts, then typed key/value pairs).

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::{CacheTypes, FlashAttention, KvCacheType, LlamaError, Result, cache_type_name};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any integer type.
    Int(i64),
    /// f32 / f64.
    Float(f64),
    /// bool.
    Bool(bool),
    /// string.
    Str(String),
    /// array.
    Array(Vec<Value>),
}

struct R<T: Read>(T);

impl<T: Read> R<T> {
    fn bytes<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.0.read_exact(&mut b)?;
        Ok(b)
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> std::io::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn string(&mut self) -> std::io::Result<String> {
        let n = self.u64()?;
        if n > 1 << 26 {
            return Err(std::io::Error::other("string too long"));
        }
        let mut b = vec![0u8; n as usize];
        self.0.read_exact(&mut b)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> std::io::Result<Value> {
        Ok(match ty {
            0 => Value::Int(self.bytes::<1>()?[0] as i64),
            1 => Value::Int(self.bytes::<1>()?[0] as i8 as i64),
            2 => Value::Int(u16::from_le_bytes(self.bytes()?) as i64),
            3 => Value::Int(i16::from_le_bytes(self.bytes()?) as i64),
            4 => Value::Int(self.u32()? as i64),
            5 => Value::Int(i32::from_le_bytes(self.bytes()?) as i64),
            6 => Value::Float(f32::from_le_bytes(self.bytes()?) as f64),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 if depth < 4 => {
                let ity = self.u32()?;
                let n = self.u64()?;
                if n > 1 << 24 {
                    return Err(std::io::Error::other("array too long"));
                }
                let mut v = Vec::with_capacity(n.min(4096) as usize);
                for _ in 0..n {
                    v.push(self.value(ity, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::Int(self.u64()? as i64),
            11 => Value::Int(i64::from_le_bytes(self.bytes()?)),
            12 => Value::Float(f64::from_le_bytes(self.bytes()?)),
            _ => {
                return Err(std::io::Error::other(format!(
                    "unknown GGUF value type {ty}"
                )));
            }
        })
    }
}

/// The metadata of a GGUF file.
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, Value>> {
    let bad = |e: std::io::Error| LlamaError::InvalidModel(format!("{}: {e}", path.display()));
    let f = std::fs::File::open(path).map_err(bad)?;
    let mut r = R(BufReader::new(f));
    if &r.bytes::<4>().map_err(bad)? != b"GGUF" {
        return Err(LlamaError::InvalidModel(format!(
            "{}: not a GGUF file",
            path.display()
        )));
    }
    let version = r.u32().map_err(bad)?;
    if version < 2 {
        return Err(LlamaError::InvalidModel(format!(
            "{}: GGUF version {version} is too old",
            path.display()
        )));
    }
    let _tensors = r.u64().map_err(bad)?;
    let n_kv = r.u64().map_err(bad)?;
    let mut out = BTreeMap::new();
    for _ in 0..n_kv.min(1 << 20) {
        let key = r.string().map_err(bad)?;
        let ty = r.u32().map_err(bad)?;
        let v = r.value(ty, 0).map_err(bad)?;
        out.insert(key, v);
    }
    Ok(out)
}

/// Whether the vocabulary of the GGUF at `path` holds `token` (`tokenizer.ggml.tokens`); false for a file
/// that cannot be read.
pub fn has_token(path: &Path, token: &str) -> bool {
    match read_metadata(path).map(|mut m| m.remove("tokenizer.ggml.tokens")) {
        Ok(Some(Value::Array(tokens))) => tokens
            .iter()
            .any(|t| matches!(t, Value::Str(s) if s == token)),
        _ => false,
    }
}

/// Refuses Gemma 4 layouts llama.cpp cannot run: it requires the last layer with its own KV cache to be a
/// full-attention layer and the one before it a sliding one (true of E2B/E4B/26B; a random or pruned model
/// may differ, and llama.cpp aborts on it instead of returning an error).
pub fn check_layout(meta: &BTreeMap<String, Value>) -> Result<()> {
    let Some(Value::Str(arch)) = meta.get("general.architecture") else {
        return Err(LlamaError::InvalidModel(
            "GGUF has no general.architecture".into(),
        ));
    };
    if arch != "gemma4" {
        return Ok(());
    }
    let int = |k: &str| match meta.get(&format!("gemma4.{k}")) {
        Some(Value::Int(v)) => Some(*v),
        _ => None,
    };
    let layers = int("block_count").unwrap_or(0);
    let shared = int("attention.shared_kv_layers").unwrap_or(0);
    let Some(Value::Array(pattern)) = meta.get("gemma4.attention.sliding_window_pattern") else {
        return Ok(());
    };
    let sliding: Vec<bool> = pattern
        .iter()
        .map(|v| matches!(v, Value::Bool(true)))
        .collect();
    let own = (layers - shared).max(0) as usize;
    if own < 2 || sliding.len() < own {
        return Err(LlamaError::InvalidModel(format!(
            "Gemma 4 GGUF with {layers} layers, {shared} KV-shared: too few layers with their own KV cache"
        )));
    }
    if sliding[own - 1] || !sliding[own - 2] {
        return Err(LlamaError::InvalidModel(format!(
            "unsupported Gemma 4 layout for llama.cpp: the last layer with its own KV cache (layer {}) must \
             be full attention and the one before it sliding; this model has {} and {}. Serve it with the \
             MLX engine instead",
            own - 1,
            if sliding[own - 1] { "sliding" } else { "full" },
            if sliding[own - 2] { "sliding" } else { "full" },
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pattern: &[bool], layers: i64, shared: i64) -> BTreeMap<String, Value> {
        let mut m = BTreeMap::new();
        m.insert("general.architecture".into(), Value::Str("gemma4".into()));
        m.insert("gemma4.block_count".into(), Value::Int(layers));
        m.insert(
            "gemma4.attention.shared_kv_layers".into(),
            Value::Int(shared),
        );
        m.insert(
            "gemma4.attention.sliding_window_pattern".into(),
            Value::Array(pattern.iter().map(|b| Value::Bool(*b)).collect()),
        );
        m
    }

    #[test]
    fn layouts() {
        // E2B-like: 35 layers, 20 shared, every 5th full.
        let e2b: Vec<bool> = (0..35).map(|i| i % 5 != 4).collect();
        check_layout(&meta(&e2b, 35, 20)).unwrap();
        check_layout(&meta(&[true, true, true, false, true, false], 6, 2)).unwrap();
        let err = check_layout(&meta(&[true, false, false, true], 4, 0)).unwrap_err();
        assert!(err.to_string().contains("must be full attention"), "{err}");
        assert!(check_layout(&meta(&[true, true, false, false], 4, 0)).is_err());
        let mut other = meta(&[true], 1, 0);
        other.insert("general.architecture".into(), Value::Str("llama".into()));
        check_layout(&other).unwrap();
    }

    #[test]
    fn rejects_non_gguf() {
        let dir = std::env::temp_dir().join(format!("jemma-gguf-test-{}", std::process::id()));
        std::fs::write(&dir, b"not a gguf at all").unwrap();
        assert!(
            read_metadata(&dir)
                .unwrap_err()
                .to_string()
                .contains("not a GGUF")
        );
        let _ = std::fs::remove_file(&dir);
    }
}

/// The context a GGUF is served at: the configured one, else its training context capped at 32,768 tokens
/// (to bound the KV cache), never above the training context.
pub fn served_context(train: u32, configured: Option<u32>) -> u32 {
    let train = train.max(1);
    configured.unwrap_or(train.min(32768)).min(train)
}

/// The context a GGUF is served at ([`served_context`] of its training context), from its metadata.
///
/// Errors: an unreadable GGUF.
pub fn served_context_of(path: &Path, configured: Option<u32>) -> Result<u32> {
    let meta = read_metadata(path)?;
    let train = match meta.get("general.architecture") {
        Some(Value::Str(arch)) => match meta.get(&format!("{arch}.context_length")) {
            Some(Value::Int(v)) => *v as u32,
            _ => 4096,
        },
        _ => 4096,
    };
    Ok(served_context(train, configured))
}

/// Estimated bytes a GGUF takes once loaded at its served context: the weights (the file, mmap'd), the KV
/// cache and llama.cpp's compute buffers. Reserved from the memory budget before loading.
///
/// The KV cache follows llama.cpp's `llama_kv_cache_iswa` sizing as the engine configures it (K and V of
/// the `cache` types, `swa_full = true`): every attention layer holds `n_ctx` cells, sliding-window layers
/// included, and layers that share another layer's cache (Gemma 4's `shared_kv_layers`) none. Each cell
/// holds `n_head_kv × key_length` values of the K type and `n_head_kv × value_length` of the V type
/// (ggml's `ggml_row_size`: whole blocks of `ggml_blck_size` values, `ggml_type_size` bytes each), which
/// differ between full and sliding layers where the GGUF says so (`key_length_swa`); with
/// `flash_attention` off, V is stored transposed and every layer's V row is as wide as the widest layer's
/// (`n_embd_v_gqa_max`). The sliding pattern is the GGUF's `sliding_window_pattern` where present, Gemma
/// 3's fixed one (every 6th layer global) for `gemma3`. The compute buffers are approximated as
/// `n_ubatch × max(embedding, feed-forward) × 4 B × 8` plus a row of logits per sequence. With `n_seq`
/// sequences (one KV stream each, `kv_unified = false`) every stream holds the cells above.
///
/// Errors: the file cannot be read, it lacks `general.architecture` / `<arch>.block_count`, a quantized
/// cache type's blocks do not divide a layer's key or value length (llama.cpp cannot store such rows:
/// a debug ggml asserts, a release one reads across blocks), or an MLA model is given different K and V
/// types.
pub fn footprint(
    path: &Path,
    context_length: Option<u32>,
    n_ubatch: u32,
    n_seq: u32,
    cache: CacheTypes,
    flash_attention: FlashAttention,
) -> Result<u64> {
    let e = estimate(path, context_length, n_ubatch, cache, flash_attention)?;
    let n_seq = n_seq.max(1) as u64;
    Ok(e.file_bytes + n_seq * (e.kv_per_sequence + e.logits_per_sequence) + e.compute)
}

/// The model's sliding window (`<arch>.attention.sliding_window`), tokens; None for a model without one.
///
/// Errors: the file cannot be read, or it lacks `general.architecture`.
pub fn sliding_window(path: &Path) -> Result<Option<u32>> {
    let meta = read_metadata(path)?;
    let Some(Value::Str(arch)) = meta.get("general.architecture") else {
        return Err(LlamaError::InvalidModel(
            "GGUF has no general.architecture".into(),
        ));
    };
    Ok(
        match meta.get(&format!("{arch}.attention.sliding_window")) {
            Some(Value::Int(w)) if *w > 0 => Some(*w as u32),
            _ => None,
        },
    )
}

/// Bytes of KV cache one sequence holds at the served context, as [`footprint`] counts them (the
/// unit llama.cpp's per-sequence KV streams are sized in).
///
/// Errors: as [`footprint`].
pub fn kv_bytes_per_sequence(
    path: &Path,
    context_length: Option<u32>,
    n_ubatch: u32,
    cache: CacheTypes,
    flash_attention: FlashAttention,
) -> Result<u64> {
    Ok(estimate(path, context_length, n_ubatch, cache, flash_attention)?.kv_per_sequence)
}

/// Checks that the model's caches can take the `cache` types, before llama.cpp is asked to: a quantized
/// type's blocks must divide every layer's K (and V) head width, and an MLA model's K and V must have one
/// type.
///
/// Errors: as [`footprint`], naming the setting.
pub fn check_cache_types(path: &Path, cache: CacheTypes) -> Result<()> {
    estimate(path, Some(1), 1, cache, FlashAttention::Auto).map(|_| ())
}

/// Bytes `n` values of `t` take (ggml's `ggml_row_size`), or None where `t`'s blocks do not divide `n`
/// (where a debug ggml asserts) or `t` is not one of ggml's types.
fn row_bytes(t: KvCacheType, n: u64) -> Option<u64> {
    let t: llama_cpp_sys_2::ggml_type = t.into();
    if t >= llama_cpp_sys_2::GGML_TYPE_COUNT {
        return None;
    }
    // SAFETY: both index ggml's static type table, which `t` (checked above) is within.
    let (block, size) = unsafe {
        (
            llama_cpp_sys_2::ggml_blck_size(t).max(1) as u64,
            llama_cpp_sys_2::ggml_type_size(t) as u64,
        )
    };
    n.is_multiple_of(block).then(|| n / block * size)
}

/// What [`footprint`] adds up.
struct Estimate {
    file_bytes: u64,
    kv_per_sequence: u64,
    logits_per_sequence: u64,
    compute: u64,
}

fn estimate(
    path: &Path,
    context_length: Option<u32>,
    n_ubatch: u32,
    cache: CacheTypes,
    flash_attention: FlashAttention,
) -> Result<Estimate> {
    if !path.is_file() {
        return Err(LlamaError::InvalidModel(format!(
            "{}: no such GGUF file",
            path.display()
        )));
    }
    let meta = read_metadata(path)?;
    let file_bytes = std::fs::metadata(path)
        .map_err(|e| LlamaError::InvalidModel(format!("{}: {e}", path.display())))?
        .len();
    let Some(Value::Str(arch)) = meta.get("general.architecture") else {
        return Err(LlamaError::InvalidModel(
            "GGUF has no general.architecture".into(),
        ));
    };
    let get = |k: &str| meta.get(&format!("{arch}.{k}"));
    let int = |k: &str| match get(k) {
        Some(Value::Int(v)) => Some(*v as u64),
        _ => None,
    };
    // Some keys are per-layer arrays (Gemma 4's feed_forward_length, head_count_kv in some converters).
    let int_at = |k: &str, layer: usize| match get(k) {
        Some(Value::Int(v)) => Some(*v as u64),
        Some(Value::Array(a)) => match a.get(layer) {
            Some(Value::Int(v)) => Some(*v as u64),
            _ => None,
        },
        _ => None,
    };
    let n_layer = int("block_count")
        .ok_or_else(|| LlamaError::InvalidModel(format!("GGUF has no {arch}.block_count")))?
        as usize;
    let n_ctx = served_context(int("context_length").unwrap_or(4096) as u32, context_length) as u64;
    let n_swa = int("attention.sliding_window");
    let shared = int("attention.shared_kv_layers").unwrap_or(0) as usize;
    let embd = int("embedding_length").unwrap_or(0);
    let head_dim = embd / int("attention.head_count").unwrap_or(1).max(1);
    let is_swa = |il: usize| match get("attention.sliding_window_pattern") {
        Some(Value::Array(p)) => matches!(p.get(il), Some(Value::Bool(true))),
        _ => n_swa.is_some() && arch == "gemma3" && !(il + 1).is_multiple_of(6),
    };
    // Each layer's K and V widths and KV heads.
    let layers: Vec<(u64, u64, u64)> = (0..n_layer)
        .map(|il| {
            let (k_len, v_len) = if is_swa(il) {
                (
                    int("attention.key_length_swa").or(int("attention.key_length")),
                    int("attention.value_length_swa").or(int("attention.value_length")),
                )
            } else {
                (int("attention.key_length"), int("attention.value_length"))
            };
            // llama.cpp's default for a missing head_count_kv is head_count (no grouped-query attention).
            let heads = int_at("attention.head_count_kv", il)
                .or(int_at("attention.head_count", il))
                .unwrap_or(1);
            (k_len.unwrap_or(head_dim), v_len.unwrap_or(head_dim), heads)
        })
        .collect();
    // Without flash attention llama.cpp stores V transposed, every layer as wide as the widest
    // (`n_embd_v_gqa_max`, its TAG_V_CACHE_VARIABLE).
    let v_transposed = flash_attention == FlashAttention::Off;
    let v_max = layers.iter().map(|&(_, v, h)| v * h).max().unwrap_or(0);
    // MLA models (DeepSeek's latent attention) keep K and V in one latent row: llama.cpp refuses
    // different types there, with no more than a null context to show for it.
    if get("attention.key_length_mla").is_some() && cache.k != cache.v {
        return Err(LlamaError::InvalidModel(format!(
            "this {arch} model keeps K and V in one latent cache (MLA): cache_type_k ({}) and \
             cache_type_v ({}) must be the same",
            cache_type_name(cache.k),
            cache_type_name(cache.v)
        )));
    }
    let mut kv = 0u64;
    for (il, &(k_len, v_len, heads)) in layers.iter().enumerate() {
        if il >= n_layer.saturating_sub(shared) {
            continue;
        }
        // `swa_full`: a sliding layer keeps every cell too (see `LlamaRunner::load` for why).
        let cells = n_ctx;
        // A quantized row is stored per head, in whole blocks: llama.cpp's views of a head would cut
        // through a block otherwise (an assert in a debug build of ggml, wrong reads in a release one).
        let row = |t: KvCacheType, n: u64, which: &str| {
            row_bytes(t, n).ok_or_else(|| {
                LlamaError::InvalidModel(format!(
                    "a {which} cache of {} cannot hold layer {il}'s rows of {n} values (its blocks do not \
                     divide them): choose another cache_type_{}",
                    cache_type_name(t),
                    which.to_lowercase()
                ))
            })
        };
        let k = heads * row(cache.k, k_len, "K")?;
        let v = if v_transposed {
            row(cache.v, v_max, "V")?
        } else {
            heads * row(cache.v, v_len, "V")?
        };
        kv += cells * (k + v);
    }
    let ff = (0..n_layer)
        .map(|il| int_at("feed_forward_length", il).unwrap_or(0))
        .max()
        .unwrap_or(0);
    let n_vocab = match meta.get("tokenizer.ggml.tokens") {
        Some(Value::Array(t)) => t.len() as u64,
        _ => 0,
    };
    Ok(Estimate {
        file_bytes,
        kv_per_sequence: kv,
        logits_per_sequence: n_vocab * 4,
        compute: n_ubatch as u64 * embd.max(ff) * 4 * 8,
    })
}

#[cfg(test)]
mod footprint_tests {
    use super::*;

    /// Rows take ggml's sizes, and a row that the type's blocks do not divide (which llama.cpp's kernels
    /// assert on) is refused, naming the setting.
    #[test]
    fn cache_rows_take_ggmls_sizes() {
        assert_eq!(row_bytes(KvCacheType::F16, 256), Some(512));
        assert_eq!(row_bytes(KvCacheType::F32, 80), Some(320));
        assert_eq!(row_bytes(KvCacheType::Q8_0, 256), Some(272));
        assert_eq!(row_bytes(KvCacheType::Q4_0, 64), Some(36));
        assert_eq!(row_bytes(KvCacheType::Q5_1, 32), Some(24));
        assert_eq!(row_bytes(KvCacheType::Q8_0, 80), None);
        let path = jemma_fixtures::root().join("gguf/gemma-3-270m-q4_k_m.gguf");
        let q = |k, v| {
            footprint(
                &path,
                Some(512),
                64,
                1,
                CacheTypes { k, v },
                FlashAttention::Auto,
            )
        };
        let f16 = q(KvCacheType::F16, KvCacheType::F16).unwrap();
        let q4 = q(KvCacheType::F16, KvCacheType::Q4_0).unwrap();
        // 18 bytes per 32 values instead of 64: only V's half shrinks.
        let kv16 = kv_bytes_per_sequence(
            &path,
            Some(512),
            64,
            CacheTypes::default(),
            FlashAttention::Auto,
        )
        .unwrap();
        assert_eq!(f16 - q4, kv16 / 2 - kv16 / 2 * 18 / 64);
        assert_eq!(cache_type_name(KvCacheType::Q4_0), "q4_0");
        assert_eq!(row_bytes(KvCacheType::Unknown(10_000), 32), None);
        assert_eq!(
            cache_type_name(KvCacheType::Unknown(10_000)),
            "ggml type 10000"
        );
    }

    /// Without flash attention llama.cpp pads every layer's V to the widest layer's (it stores V
    /// transposed): more KV for the Gemma 4 fixture, whose full layers' heads are twice its sliding
    /// layers', and the same for Gemma 3, whose layers are all alike.
    #[test]
    fn without_flash_attention_v_rows_are_as_wide_as_the_widest() {
        let kv = |name: &str, fa| {
            let path = jemma_fixtures::root().join(format!("gguf/{name}.gguf"));
            kv_bytes_per_sequence(&path, Some(64), 64, CacheTypes::default(), fa).unwrap()
        };
        for name in ["tiny-f32", "gemma-3-270m-q4_k_m"] {
            assert_eq!(kv(name, FlashAttention::On), kv(name, FlashAttention::Auto));
        }
        assert!(kv("tiny-f32", FlashAttention::Off) > kv("tiny-f32", FlashAttention::Auto));
        assert_eq!(
            kv("gemma-3-270m-q4_k_m", FlashAttention::Off),
            kv("gemma-3-270m-q4_k_m", FlashAttention::Auto)
        );
    }

    #[test]
    fn served_context_caps_at_32k_and_the_training_context() {
        assert_eq!(served_context(131072, None), 32768);
        assert_eq!(served_context(2048, None), 2048);
        assert_eq!(served_context(2048, Some(4096)), 2048);
        assert_eq!(served_context(131072, Some(1000)), 1000);
    }

    /// The default pool holds one slot's KV, but no more than the pool's entries of one window each for a
    /// model with a sliding window (the pool keeps only conversations within the window), and at most
    /// 8 GiB. The window is the GGUF's: 512 for the real Gemma 3 270M.
    #[test]
    fn the_default_pool_holds_what_the_window_lets_it_keep() {
        let path = jemma_fixtures::root().join("gguf/gemma-3-270m-q4_k_m.gguf");
        assert_eq!(sliding_window(&path).unwrap(), Some(512));
        let window = kv_bytes_per_sequence(
            &path,
            Some(512),
            256,
            CacheTypes::default(),
            FlashAttention::Auto,
        )
        .unwrap();
        let pool = |kv| crate::default_prefix_cache_bytes(kv, Some(window));
        assert_eq!(pool(10 * window), 10 * window);
        assert_eq!(pool(100 * window), 64 * window);
        assert_eq!(
            crate::default_prefix_cache_bytes(100 * window, None),
            100 * window
        );
        assert_eq!(crate::default_prefix_cache_bytes(u64::MAX, None), 8 << 30);
    }
}
