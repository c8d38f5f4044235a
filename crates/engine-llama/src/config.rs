//! The engine's settings ([`LlamaConfig`]) and their defaults (threads, parallel sequences, prefix-cache
//! bytes).

use super::*;

/// Whether llama.cpp as linked offloads layers to a GPU, as llama-server decides
/// (`llama_supports_gpu_offload`): a GPU backend built in (the `cuda` and `metal` features) or, off macOS,
/// where llama.cpp is linked as shared libraries (`LLAMA_BUILD_SHARED_LIBS=1`), one found in the libraries
/// loaded at run time — so one host binary serves on a CUDA build of those libraries (scripts/bench-cuda).
/// On macOS llama-cpp-sys-2 compiles Metal into every build, so there only the `metal` feature turns it on
/// (MLX is the engine on a Mac's GPU). False if the backend cannot start (the load then fails on its own
/// error).
pub fn gpu_offload() -> bool {
    cfg!(any(feature = "cuda", feature = "metal"))
        || (!cfg!(target_os = "macos") && backend().is_ok_and(|b| b.supports_gpu_offload()))
}

/// Whether offloaded layers live in a discrete GPU's own memory (the heavy tier's CUDA GPU), which the
/// host's memory budget does not govern: built with CUDA, or offloading where llama.cpp lists a discrete GPU
/// device (not an integrated one, nor an RPC server, which `llama_supports_gpu_offload` also counts). Apple
/// Silicon's GPU shares the host's memory, so there everything counts.
pub fn discrete_gpu() -> bool {
    cfg!(feature = "cuda")
        || (!cfg!(target_os = "macos")
            && gpu_offload()
            && llama_cpp_2::list_llama_ggml_backend_devices()
                .iter()
                .any(|d| d.device_type == llama_cpp_2::LlamaBackendDeviceType::Gpu))
}

/// Settings of a llama.cpp engine.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// The GGUF file.
    pub model_path: PathBuf,
    /// Name shown for the model (default: the file name without `.gguf`).
    pub name: Option<String>,
    /// Context length (None: the model's training context, capped at 32768 to bound the KV cache).
    pub context_length: Option<u32>,
    /// Threads for decoding (None: see [`default_threads`]).
    pub threads: Option<i32>,
    /// Threads for prompt processing (None: all cores).
    pub batch_threads: Option<i32>,
    /// Layers on the GPU (None: all when llama.cpp offloads, see [`gpu_offload`]; else 0).
    pub gpu_layers: Option<u32>,
    /// Prompt tokens per decode call (the prefill chunk).
    pub batch_size: u32,
    /// Requests decoded together (llama.cpp sequences in one context, each with the whole served context;
    /// the KV cache grows with it). Default: [`default_parallel`].
    pub parallel: u32,
    /// Requests that may wait before submissions are refused.
    pub queue_capacity: usize,
    /// Events buffered per request.
    pub event_buffer: usize,
    /// Release the model after this long without a request (None: keep it loaded).
    pub keep_alive: Option<Duration>,
    /// Load at start (true) or at the first request (false).
    pub preload: bool,
    /// The process-wide memory budget the model's footprint is reserved from (None: no check).
    pub memory: Option<Arc<jemma_serve::memory::MemoryGovernor>>,
    /// Speculative decoding with a draft GGUF (None: off).
    pub speculative: Option<LlamaSpeculative>,
    /// Host memory for sequence caches kept beyond the slots (llama-server's `--cache-ram`), bytes: when
    /// a request takes over a slot, the conversation the slot held is saved here (if the model's sliding
    /// window holds all of it: llama.cpp restores a longer one inexactly), and a later prompt that
    /// continues it is restored from here instead of read again. Counted in the footprint the memory budget
    /// governs. None: [`default_prefix_cache_bytes`]; 0: off.
    pub prefix_cache_bytes: Option<u64>,
    /// The model's multimodal projector GGUF (llama.cpp's mmproj: its vision and audio towers), through
    /// which libmtmd puts images and audio before the model. None: text only.
    pub mmproj_path: Option<PathBuf>,
    /// The mmproj was found beside the model or paired by a catalog rather than named: if it cannot be
    /// read or loaded the model serves text (logged) instead of failing to load.
    pub mmproj_optional: bool,
    /// Soft tokens an image takes at most (Gemma 4's processor's `max_soft_tokens`; a quarter at
    /// `detail: "low"`). Default: [`DEFAULT_IMAGE_SOFT_TOKENS`].
    pub image_soft_tokens: usize,
    /// Soft tokens a video frame takes at most (Gemma 4's video processor's `max_soft_tokens`), capped at
    /// `image_soft_tokens`. Default: [`DEFAULT_VIDEO_SOFT_TOKENS`].
    pub video_soft_tokens: usize,
    /// llama.cpp's flash attention (llama-server's `--flash-attn`). On a CPU, `Off` makes batched answers
    /// equal lone ones to the bit where the weights allow it (see [`FlashAttention`]).
    pub flash_attention: FlashAttention,
    /// The element types of the KV cache (llama-server's `--cache-type-k` and `--cache-type-v`; F16
    /// both by default). A quantized V type needs flash attention (`Auto` turns it on for one; `Off`
    /// fails the load); the draft model's context takes the same types.
    pub cache: CacheTypes,
}

pub use llama_cpp_2::context::params::KvCacheType;

/// The element types of a context's K and V caches (llama.cpp's `type_k` and `type_v`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheTypes {
    /// The K cache's type.
    pub k: KvCacheType,
    /// The V cache's type.
    pub v: KvCacheType,
}

impl Default for CacheTypes {
    /// llama.cpp's default: F16 both.
    fn default() -> Self {
        Self {
            k: KvCacheType::F16,
            v: KvCacheType::F16,
        }
    }
}

/// ggml's name of a cache type (`q8_0`), as llama-server's `--cache-type-k` takes it.
pub fn cache_type_name(t: KvCacheType) -> String {
    let t: llama_cpp_sys_2::ggml_type = t.into();
    if t >= llama_cpp_sys_2::GGML_TYPE_COUNT {
        return format!("ggml type {t}");
    }
    // SAFETY: `t` is within ggml's type table (checked above), whose names are static C strings (NULL
    // for the slots of removed types).
    let name = unsafe { llama_cpp_sys_2::ggml_type_name(t) };
    if name.is_null() {
        return format!("ggml type {t}");
    }
    // SAFETY: non-null, static and NUL-terminated (above).
    unsafe { std::ffi::CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned()
}

/// llama.cpp's flash attention policy (`llama_flash_attn_type`; llama-server's `--flash-attn
/// on|off|auto`).
///
/// On a CPU, flash attention decodes a ubatch that holds one row of one sequence over a KV view of 512 cells
/// or more by splitting the view across the threads (`use_split_kv_path` in ggml-cpu's
/// `ggml_compute_forward_flash_attn_ext_f16`); a ubatch of several sequences takes the per-row kernel. So a
/// sequence past 256 cells (views are padded to 256) sums its attention in other pieces when it decodes
/// alone than beside another, and its answer can leave its lone twin at a near-tie. Without flash attention
/// each decode row's attention is a dot product over the view, the masked cells adding exactly 0, whatever
/// else the ubatch holds: batched answers then equal lone ones to the bit where the weights' kernels do not
/// depend on the rows in a step either (on x86-64, Q8_0; docs/BENCHMARKS.md, "Batch invariance"). The
/// cost, measured on the real Gemma 3 270M on 2 cores: 1-4 % of prefill and decode at a 256-token prompt,
/// 9-12 % at 2,048.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FlashAttention {
    /// llama.cpp decides (on wherever its backend runs it, CPUs included).
    #[default]
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

impl FlashAttention {
    /// The `llama_flash_attn_type` value.
    pub fn llama_type(self) -> llama_cpp_sys_2::llama_flash_attn_type {
        match self {
            Self::Auto => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO,
            Self::On => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            Self::Off => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }
    }
}

impl LlamaConfig {
    /// Defaults for a GGUF file.
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            name: None,
            context_length: None,
            threads: None,
            batch_threads: None,
            gpu_layers: None,
            batch_size: 512,
            parallel: default_parallel(),
            queue_capacity: 16,
            event_buffer: 64,
            keep_alive: None,
            preload: true,
            memory: None,
            speculative: None,
            prefix_cache_bytes: None,
            mmproj_path: None,
            mmproj_optional: false,
            image_soft_tokens: DEFAULT_IMAGE_SOFT_TOKENS,
            video_soft_tokens: DEFAULT_VIDEO_SOFT_TOKENS,
            flash_attention: FlashAttention::Auto,
            cache: CacheTypes::default(),
        }
    }
}

/// Host memory kept for saved sequence caches by default, bytes: one slot's KV (`kv_per_sequence`, as
/// much as a full-context conversation or several shorter ones hold), at most 8 GiB (llama-server's
/// `--cache-ram` default), and for a model with a sliding window at most what the pool can hold of the
/// conversations it keeps (`kv_per_window`: one window's KV, times the pool's entries). It is reserved
/// with the model, so more would cost slots on a tight budget.
pub fn default_prefix_cache_bytes(kv_per_sequence: u64, kv_per_window: Option<u64>) -> u64 {
    let pool = kv_per_window.map_or(u64::MAX, |w| w.saturating_mul(crate::POOL_ENTRIES as u64));
    kv_per_sequence.min(pool).min(8 << 30)
}

/// Decode threads by default: every core but one above 4 cores (the gateway and the OS keep one), all of
/// them up to 4. Decoding is memory-bound, so more threads than cores only adds contention.
pub fn default_threads() -> i32 {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    if n > 4 { n - 1 } else { n }
}

/// The most sequences one context may decode together.
pub const MAX_PARALLEL: u32 = 64;

/// Requests decoded together by default: 8 on a discrete GPU (CUDA, the heavy tier: a data-centre GPU has the memory
/// bandwidth and VRAM for more), else 4. Decoding one token reads every weight once, so a batch of `n`
/// sequences costs little more than one until compute becomes the bound — on a CPU or an Apple GPU around 4
/// to 8 rows — while each sequence's KV cache is reserved in full (llama-server's default is 4 slots).
pub fn default_parallel() -> u32 {
    if discrete_gpu() { 8 } else { 4 }
}
