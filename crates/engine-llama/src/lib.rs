//! Gemma 4 through llama.cpp, via the `llama-cpp-2` crate: GGUF models (mmap'd) on the CPU, on CUDA (the
//! Cloud Run heavy tier, feature `cuda`) or on Metal (feature `metal`), with every layer offloaded when a
//! GPU backend is built in.
//!
//! The engine runs on the serving core's host (jemma-serve): one model thread owns the llama.cpp model and
//! context, requests arrive through a bounded queue, up to `parallel` of them are decoded together (one
//! llama.cpp sequence each, in one `llama_batch`), events leave through a bounded channel, and dropping the
//! receiver cancels the request at the next step. Each sequence's slot keeps its KV for prefix reuse.
//! Prompts are rendered with the model's own chat template (the GGUF's `tokenizer.chat_template`, through
//! jemma-chat's Jinja renderer, so both engines format conversations byte-identically) and outputs are
//! parsed with the same Gemma 4 parser (thinking channel, tool calls). This crate knows nothing of HTTP or
//! UI.
#![deny(missing_docs)]

pub mod gguf;
mod media;
mod speculative;

pub use jemma_serve::speculative::SpeculativeInfo;
pub use media::{DEFAULT_IMAGE_SOFT_TOKENS, towers};
pub use speculative::LlamaSpeculative;

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use jemma_chat::answer::OutputProcessor;
use jemma_chat::event::EngineFailure;
use jemma_chat::logprobs::{MAX_TOP_LOGPROBS, TokenLogprob, log_softmax_top};
use jemma_chat::template::ChatTemplate;
use jemma_chat::template::NO_CHAT_TEMPLATE;
use jemma_serve::host::{Host, HostConfig, LoadError, ModelRunner, Progress, SeqOutput, Tally};
use jemma_serve::prefix::{CacheSlot, EntryKind, PrefixPool, PrefixSlot, choose_slot};
use jemma_serve::speculative::{Controller, SpeculativeStats};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::{LlamaStateSeqFlags, SeqState};
use serde::Serialize;
use tokio::sync::mpsc;

/// Everything this engine can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlamaError {
    /// The GGUF could not be loaded (missing file, unknown architecture, unsupported layout).
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// llama.cpp failed while running (context creation, decode).
    #[error("llama.cpp: {0}")]
    Runtime(String),
    /// The request cannot be served as given.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl From<LlamaError> for jemma_chat::event::EngineFailure {
    /// A request problem is the client's; everything else is the engine's fault.
    fn from(e: LlamaError) -> Self {
        match e {
            LlamaError::InvalidRequest(m) => Self::InvalidRequest(m),
            other => Self::Fault(other.to_string()),
        }
    }
}

/// Shorthand for this crate's results.
pub type Result<T, E = LlamaError> = std::result::Result<T, E>;

/// The process-wide llama.cpp backend (initialising it twice is an error in llama.cpp).
fn backend() -> Result<&'static LlamaBackend> {
    static BACKEND: OnceLock<std::result::Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let b = LlamaBackend::init().map_err(|e| e.to_string())?;
            // llama.cpp logs every tensor at load, and libmtmd every image it encodes, to stderr and
            // stdout; keep the process's logs to tracing's (JEMMA_LLAMA_LOG: all of theirs too).
            llama_cpp_2::send_logs_to_tracing(
                llama_cpp_2::LogOptions::default()
                    .with_logs_enabled(std::env::var_os("JEMMA_LLAMA_LOG").is_some()),
            );
            Ok(b)
        })
        .as_ref()
        .map_err(|e| LlamaError::Runtime(e.clone()))
}

/// Whether this build offloads to a GPU (CUDA or Metal).
pub const GPU_OFFLOAD: bool = cfg!(any(feature = "cuda", feature = "metal"));

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
    /// Layers on the GPU (None: all when built with a GPU backend, else 0).
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
    /// a request takes over a slot, the conversation the slot held is saved here, and a later prompt that
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
        }
    }
}

/// Host memory kept for saved sequence caches by default, bytes: one slot's KV (`kv_per_sequence`, as
/// much as a full-context conversation or several shorter ones hold), at most 8 GiB (llama-server's
/// `--cache-ram` default). It is reserved with the model, so more would cost slots on a tight budget.
pub fn default_prefix_cache_bytes(kv_per_sequence: u64) -> u64 {
    kv_per_sequence.min(8 << 30)
}

/// Decode threads by default: every core but one above 4 cores (the gateway and the OS keep one), all of
/// them up to 4. Decoding is memory-bound, so more threads than cores only adds contention.
pub fn default_threads() -> i32 {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    if n > 4 { n - 1 } else { n }
}

/// The most sequences one context may decode together.
pub const MAX_PARALLEL: u32 = 64;

/// Requests decoded together by default: 8 with CUDA (the heavy tier: a data-centre GPU has the memory
/// bandwidth and VRAM for more), else 4. Decoding one token reads every weight once, so a batch of `n`
/// sequences costs little more than one until compute becomes the bound — on a CPU or an Apple GPU around 4
/// to 8 rows — while each sequence's KV cache is reserved in full (llama-server's default is 4 slots).
pub fn default_parallel() -> u32 {
    if cfg!(feature = "cuda") { 8 } else { 4 }
}

/// Sampling parameters: the same type as the MLX engine's, so a request means the same on every tier.
pub use jemma_chat::sampling::SamplingParams as Sampling;

/// What to generate from (the same type for every engine).
pub use jemma_chat::prompt::Prompt;

/// One generation request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt.
    pub prompt: Prompt,
    /// Sampling.
    pub sampling: Sampling,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Split thinking and tool calls out of the text (chat requests).
    pub parse_output: bool,
    /// What the answer must be (JSON, a schema, forced tool calls), enforced token by token with
    /// llguidance; None: free text.
    pub constraint: Option<jemma_constrain::Constraint>,
    /// Whether several tool calls may come in one answer (`parallel_tool_calls`); when false the answer
    /// ends after its first call.
    pub parallel_tool_calls: bool,
    /// `max_tokens` is a default, not the client's: lower it to the room the prompt leaves in the context
    /// (vLLM's default of `n_ctx - prompt_len`) instead of refusing the request.
    pub fit_context: bool,
    /// Generate past the model's end-of-generation tokens, to `max_tokens` or a stop string (benchmarks,
    /// and vLLM's `ignore_eos`); false stops at them, as every API request does.
    pub ignore_eos: bool,
    /// Report each generated token's log-probability (`Event::Logprobs`).
    pub logprobs: bool,
    /// With `logprobs`, also this many most likely alternatives per token (at most
    /// [`jemma_chat::logprobs::MAX_TOP_LOGPROBS`]).
    pub top_logprobs: usize,
    /// The prompt's images, in the order of their placeholders (`<|image|>`); they need an mmproj
    /// ([`LlamaConfig::mmproj_path`]) with a vision tower.
    pub images: Vec<jemma_media::DecodedImage>,
    /// The prompt's audio clips (16 kHz mono), in the order of their placeholders (`<|audio|>`); they need
    /// an mmproj with an audio tower.
    pub audio: Vec<jemma_media::audio::DecodedAudio>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// End-of-generation token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The consumer went away.
    Cancelled,
}

/// The end of a request.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Of those, the ones whose KV cache was kept from the previous request (not prefilled again).
    pub cached_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Why it ended.
    pub finish: Finish,
    /// Whether tool calls were emitted.
    pub tool_calls: bool,
    /// The stop string that ended the answer, if one did (Anthropic's `stop_sequence`).
    pub stop_sequence: Option<String>,
    /// Of the generated tokens, those spent thinking ([`jemma_chat::answer::OutputProcessor::reasoning_tokens`]).
    pub reasoning_tokens: usize,
    /// Prompt tokens/s.
    pub prefill_tps: f64,
    /// Generated tokens/s (after the first).
    pub decode_tps: f64,
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// What speculative decoding did for this request (None: it did not speculate).
    pub speculative: Option<SpeculativeStats>,
}

/// What a request produces, in order (shared with the MLX engine).
pub type Event = jemma_chat::event::Event<Summary>;

/// Life-cycle of the engine (the serving core's).
pub use jemma_serve::host::{EngineState, SubmitError};

/// The llama.cpp engine's own figures in its status.
#[derive(Debug, Clone, Serialize)]
pub struct LlamaInfo {
    /// GGUF path.
    pub model_path: PathBuf,
    /// Layers offloaded to a GPU.
    pub gpu_layers: u32,
    /// Decode threads.
    pub threads: i32,
    /// Model size in bytes.
    pub model_bytes: u64,
    /// Estimated footprint at the served context (weights + KV cache + compute buffers), bytes; with a
    /// draft model, its share included.
    pub footprint_bytes: Option<u64>,
    /// Speculative decoding since the model loaded (None: no draft model configured).
    pub speculative: Option<SpeculativeInfo>,
    /// The most sequences whose drafts one step verified together since the model loaded (in one decode
    /// when their positions fit `batch_size`; 0: none speculated; above 1 needs `max_batch` above 1).
    pub largest_verify_batch: usize,
    /// Sequence caches saved in host memory beyond the slots ([`LlamaConfig::prefix_cache_bytes`]).
    pub prefix_cache_entries: usize,
    /// Bytes those saved caches hold.
    pub prefix_cache_bytes: u64,
    /// What the model takes in: `text`, and `image` and `audio` as its mmproj's towers allow (read at
    /// start, before the model loads).
    pub input_modalities: Vec<String>,
}

/// Figures for `/health` and the tray: the serving core's, with [`LlamaInfo`] flattened in.
pub type EngineStatus = jemma_serve::host::Status<LlamaInfo>;

/// A clonable handle to the llama.cpp model thread (the serving core's host running the llama.cpp runner).
#[derive(Clone)]
pub struct LlamaEngine {
    host: Host<LlamaRunner>,
}

impl LlamaEngine {
    /// Starts the model thread; with `preload` the GGUF loads in the background.
    pub fn start(config: LlamaConfig) -> Result<Self> {
        let name = config.name.clone().unwrap_or_else(|| {
            config
                .model_path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let threads = config.threads.unwrap_or_else(default_threads);
        let mut input_modalities = vec!["text".to_string()];
        if let Some(mm) = &config.mmproj_path {
            match towers(mm) {
                Ok((sees, hears)) => {
                    input_modalities.extend(sees.then(|| "image".to_string()));
                    input_modalities.extend(hears.then(|| "audio".to_string()));
                }
                Err(e) if config.mmproj_optional => {
                    tracing::warn!(mmproj = %mm.display(), "the mmproj found for the model is unusable, so it serves text: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        let info = LlamaInfo {
            input_modalities,
            model_path: config.model_path.clone(),
            gpu_layers: 0,
            threads,
            model_bytes: 0,
            footprint_bytes: None,
            speculative: config
                .speculative
                .as_ref()
                .map(|sp| SpeculativeInfo::new(sp.draft_model.clone(), "draft_model")),
            largest_verify_batch: 0,
            prefix_cache_entries: 0,
            prefix_cache_bytes: 0,
        };
        let host_config = HostConfig {
            name,
            thread_name: "jemma-llama".into(),
            queue_capacity: config.queue_capacity,
            event_buffer: config.event_buffer,
            keep_alive: config.keep_alive,
            preload: config.preload,
            memory: config.memory.clone(),
            stall_timeout: jemma_serve::host::STALL_TIMEOUT,
        };
        let host = Host::start(
            host_config,
            LlamaRunner {
                planned: config.parallel,
                config,
                threads,
                speculated: SpeculativeStats::default(),
                largest_verify: 0,
                pool_budget: 0,
                pool_held: (0, 0),
            },
            info,
        )
        .map_err(|e| LlamaError::Runtime(format!("cannot start the model thread: {e}")))?;
        Ok(Self { host })
    }

    /// A snapshot of the state and figures.
    pub fn status(&self) -> EngineStatus {
        self.host.status()
    }

    /// Queues a request; dropping the receiver cancels it.
    pub fn submit(&self, request: Request) -> Result<mpsc::Receiver<Event>, SubmitError> {
        self.host.submit(request)
    }

    /// Queues a request whose prompt is only counted: the reply is its length in tokens, after the chat
    /// template. See [`jemma_serve::host::Host::count`].
    pub fn count(&self, request: Request) -> Result<jemma_serve::host::CountReply, SubmitError> {
        self.host.count(request)
    }

    /// Resolves when the model thread has ended and the model's memory is released.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.host.stopped()
    }

    /// Waits (blocking) until loaded (or ready to load lazily) or failed; for CLIs and tests.
    pub fn wait_ready(&self) -> Result<()> {
        self.host.wait_ready().map_err(LlamaError::InvalidModel)
    }
}

/// A loaded model with its template: what the thread keeps between requests.
pub struct Loaded {
    /// The model.
    pub model: LlamaModel,
    /// Its chat template (from the GGUF), if any.
    pub template: Option<ChatTemplate>,
    /// BOS text (for raw prompts).
    pub bos: Option<String>,
    /// Context length served.
    pub n_ctx: u32,
    /// The sliding window of the model's sliding-attention layers, tokens (None: no such layers).
    pub n_swa: Option<u32>,
    /// The vocabulary as llguidance reads it (constrained decoding), built on first use.
    vocabulary: OnceLock<std::result::Result<Arc<jemma_constrain::Vocabulary>, String>>,
}

impl Loaded {
    /// Every token's bytes by id with whether it is special, and the end-of-generation ids: what
    /// [`Loaded::vocabulary`] builds llguidance's trie from. Special: control tokens, and the
    /// user-defined ones shaped like Gemma's markers (`<|tool_call>`, `<tool_call|>`, `<|"|>`, which
    /// tokenizer.json marks special): no text spells them, a grammar names them. Other user-defined tokens
    /// (Gemma's "\n", runs of spaces, `<td>`) are text, as the MLX engine's tokenizer.json has them.
    pub fn token_table(&self) -> (Vec<(Vec<u8>, bool)>, Vec<u32>) {
        let vocab = self.model.vocab();
        let n = self.model.n_vocab();
        let tokens = (0..n)
            .map(|i| {
                let t = LlamaToken(i);
                let piece = vocab.token_to_piece(t, true, None);
                let marker = piece.starts_with(b"<|") || piece.ends_with(b"|>");
                let special = vocab.is_control(t)
                    || (marker
                        && vocab
                            .attr(t)
                            .contains(llama_cpp_2::token_type::LlamaTokenAttr::UserDefined));
                (piece, special)
            })
            .collect();
        let eos = (0..n)
            .filter(|&i| vocab.is_eog(LlamaToken(i)))
            .map(|i| i as u32)
            .collect();
        (tokens, eos)
    }

    /// The vocabulary as llguidance reads it, for constrained decoding: every token's bytes (control tokens
    /// and Gemma's marker tokens marked special, as `tokenizer.json` marks them for the MLX engine) and the end-of-generation
    /// tokens, read from the GGUF's vocabulary on the first constrained request, then kept.
    ///
    /// Errors: [`LlamaError::Runtime`] when llguidance cannot use it (every later call says the same).
    pub fn vocabulary(&self) -> Result<Arc<jemma_constrain::Vocabulary>> {
        self.vocabulary
            .get_or_init(|| {
                let (tokens, eos) = self.token_table();
                jemma_constrain::Vocabulary::from_tokens(tokens, &eos)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| LlamaError::Runtime(format!("constrained decoding: {e}")))
    }
}

/// Loads a GGUF with all layers on the GPU when one is built in.
pub fn load(config: &LlamaConfig, progress: impl FnMut(f32) -> bool + 'static) -> Result<Loaded> {
    let backend = backend()?;
    if !config.model_path.is_file() {
        return Err(LlamaError::InvalidModel(format!(
            "{}: no such GGUF file",
            config.model_path.display()
        )));
    }
    gguf::check_layout(&gguf::read_metadata(&config.model_path)?)?;
    let gpu_layers = config
        .gpu_layers
        .unwrap_or(if GPU_OFFLOAD { u32::MAX } else { 0 });
    let params = LlamaModelParams::default()
        .with_n_gpu_layers(gpu_layers)
        .with_progress_callback(progress);
    let model = LlamaModel::load_from_file(backend, &config.model_path, &params).map_err(|e| {
        LlamaError::InvalidModel(format!(
            "{}: {e} (llama.cpp could not load it; is it a GGUF of a supported architecture?)",
            config.model_path.display()
        ))
    })?;
    let arch = model
        .meta_val_str("general.architecture")
        .unwrap_or_default();
    if !arch.starts_with("gemma") {
        tracing::warn!(%arch, "not a Gemma GGUF: the chat template and output parsing assume Gemma 4");
    }
    let vocab = model.vocab();
    let text =
        |t: LlamaToken| String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned();
    let bos = Some(text(vocab.bos())).filter(|b| !b.is_empty());
    let eos = text(vocab.eos());
    let template = match model.meta_val_str("tokenizer.chat_template") {
        Ok(src) => Some(
            ChatTemplate::from_source(&src, bos.as_deref().unwrap_or(""), &eos)
                .map_err(|e| LlamaError::InvalidModel(format!("chat template: {e}")))?,
        ),
        Err(_) => None,
    };
    check_turn_markers(&model, &config.model_path)?;
    let n_ctx = gguf::served_context(model.n_ctx_train(), config.context_length);
    let n_swa = model
        .meta_val_str(&format!("{arch}.attention.sliding_window"))
        .ok()
        .and_then(|w| w.parse().ok())
        .filter(|&w: &u32| w > 0);
    Ok(Loaded {
        model,
        template,
        bos,
        n_ctx,
        n_swa,
        vocabulary: OnceLock::new(),
    })
}

/// Refuses a GGUF whose tokenizer would not parse Gemma 4's turn markers out of a rendered chat prompt.
/// llama.cpp parses only CONTROL and USER_DEFINED tokens as such; a converter that typed `<|turn>` NORMAL
/// (it does when the checkpoint's tokenizer_config does not list it as special) makes every chat prompt
/// reach the model as the characters "<", "|", "tu", … — garbage answers with nothing to say why.
fn check_turn_markers(model: &LlamaModel, path: &std::path::Path) -> Result<()> {
    let vocab = model.vocab();
    for marker in ["<|turn>", "<turn|>"] {
        let as_text = vocab.tokenize(marker.as_bytes(), false, false);
        let parsed = vocab.tokenize(marker.as_bytes(), false, true);
        // A vocabulary without the marker (not a Gemma 4 chat model) has nothing to check.
        let in_vocab = parsed.len() == 1
            || (0..model.n_vocab())
                .any(|i| vocab.token_to_piece(LlamaToken(i), true, None) == marker.as_bytes());
        if in_vocab && parsed.len() != 1 && parsed == as_text {
            return Err(LlamaError::InvalidModel(format!(
                "{}: its tokenizer does not treat the chat marker {marker} as a control token (token \
                 type NORMAL), so chat prompts would be read as plain text; re-convert it with \
                 llama.cpp's convert_hf_to_gguf.py from a checkpoint whose tokenizer lists {marker} as \
                 a special token",
                path.display()
            )));
        }
    }
    Ok(())
}

/// A loaded GGUF with its llama.cpp context (which borrows the model: one self-referential cell), and one
/// slot per llama.cpp sequence: the serving core's record of the tokens whose KV that sequence holds (its
/// prefix cache entry) and whether a request is using it.
struct Serving {
    /// The mmproj's towers; declared before `cell` so that it is dropped before the model it points to.
    mtmd: Option<media::Mtmd>,
    cell: SessionCell,
    /// The draft model, when speculative decoding is configured.
    drafts: Option<speculative::Drafts>,
    slots: Vec<Slot>,
    /// Advances at each admission; orders the slots by last use.
    clock: u64,
    /// Sequence caches saved in host memory when their slot was taken over (llama-server's `--cache-ram`).
    pool: PrefixPool<Saved>,
    /// Bytes the pool may hold ([`LlamaConfig::prefix_cache_bytes`]).
    pool_budget: u64,
    /// A KV stream copy was queued (llama.cpp applies it at the next decode) and no step has decoded
    /// since: set by [`share_prefix`], cleared by a step that succeeds. While set, nothing reads or writes
    /// a stream's buffer outside a decode (saves to and restores from the pool), which the copy could
    /// land on afterwards. Only a failed step leaves it set.
    copy_pending: bool,
}

/// A sequence's cache saved in host memory (the pool's entry): llama.cpp's serialised state of that
/// sequence, which any slot can be restored from.
#[derive(Clone)]
struct Saved {
    state: Arc<SeqState>,
    /// The lowest position the restored sliding-window layers hold: llama.cpp serialises only the cells
    /// inside the window of the sequence's last position, so a restored cache can be cut back only as far
    /// as that window allows (see [`window_holds`]).
    window_start: i32,
}

/// Entries the host-memory pool holds at most (it is bounded in bytes first).
const POOL_ENTRIES: usize = 64;

/// A slot's conversation is saved to the pool when a request takes the slot over only if it holds at
/// least this many tokens that the request does not keep: a shorter one is cheaper to read again than to
/// save and restore.
const MIN_SAVED_TOKENS: usize = 64;

/// A prefill takes another sequence's or the pool's cache only for at least this many more prompt tokens
/// than its own slot keeps, and for at least 1/64 of the context: a copy moves a whole KV stream (every
/// cell of every layer, whatever the prefix's length), which for a few tokens costs more than reading
/// them. A heuristic: memory copies at ~10 GB/s against prefill at a few hundred to a few thousand tokens
/// per second.
const MIN_SHARED_GAIN: usize = 32;

/// [`MIN_SHARED_GAIN`] for a context of `n_ctx` tokens.
fn min_shared_gain(n_ctx: u32) -> usize {
    MIN_SHARED_GAIN.max(n_ctx as usize / 64)
}

/// Whether a sequence whose sliding-window layers hold positions from `window_start` on can keep its
/// first `keep` positions and go on from there: the next position's window must still be there
/// (llama-server's check, `pos_min > max(0, n_past - n_swa)` refuses). Always for a model without
/// sliding-window layers.
fn window_holds(window_start: i32, keep: usize, n_swa: Option<u32>) -> bool {
    n_swa.is_none_or(|w| window_start <= (keep as i64 - w as i64).max(0) as i32)
}

/// One llama.cpp sequence (its own KV stream, `kv_unified = false`) is one of the core's cache slots.
type Slot = CacheSlot;

type Context<'a> = llama_cpp_2::context::LlamaContext<'a>;

self_cell::self_cell!(
    struct SessionCell {
        owner: Loaded,
        #[covariant]
        dependent: Context,
    }
);

/// The llama.cpp engine as the serving core drives it: up to `parallel` sequences in one context, decoded
/// together.
struct LlamaRunner {
    config: LlamaConfig,
    threads: i32,
    /// Sequences the next load serves: `config.parallel`, halved while the memory budget refuses that
    /// many ([`ModelRunner::shrink`]); set again from the configuration at each plan.
    planned: u32,
    /// What speculative decoding did since the model loaded.
    speculated: SpeculativeStats,
    /// The most sequences verified together since the model loaded.
    largest_verify: usize,
    /// Host memory for saved sequence caches at the current plan, bytes.
    pool_budget: u64,
    /// The pool's entries and bytes after the last admission or step, for [`ModelRunner::refresh`].
    pool_held: (usize, u64),
}

impl LlamaRunner {
    fn parallel(&self) -> u32 {
        self.planned.clamp(1, MAX_PARALLEL)
    }

    /// Tokens one `llama_decode` takes: the prefill chunk, and at least one decode row per sequence and,
    /// with an mmproj, one whole image and its two markers (an image is decoded in one batch: its soft
    /// tokens attend to each other on the larger Gemma 4 models).
    fn batch(&self) -> u32 {
        let image = if self.config.mmproj_path.is_some() {
            self.config.image_soft_tokens as u32 + 2
        } else {
            0
        };
        self.config.batch_size.max(self.parallel()).max(image)
    }

    fn footprint(&self) -> Result<u64, LoadError> {
        let target = gguf::footprint(
            &self.config.model_path,
            self.config.context_length,
            self.batch(),
            self.parallel(),
        )
        .map_err(|e| LoadError::Failed(e.to_string()))?;
        // The draft's weights and a context of the target's shape (one sequence per slot).
        let draft = match &self.config.speculative {
            Some(sp) => gguf::footprint(
                &sp.draft_model,
                Some(
                    gguf::served_context_of(&self.config.model_path, self.config.context_length)
                        .map_err(|e| LoadError::Failed(e.to_string()))?,
                ),
                self.config.batch_size,
                self.parallel(),
            )
            .map_err(|e| {
                LoadError::Failed(format!("draft model {}: {e}", sp.draft_model.display()))
            })?,
            None => 0,
        };
        // The mmproj's towers: their weights and what encoding one image takes.
        let mmproj = match &self.config.mmproj_path {
            Some(mm) => match media::footprint(mm, self.config.image_soft_tokens) {
                Ok(b) => b,
                Err(_) if self.config.mmproj_optional => 0,
                Err(e) => return Err(LoadError::Failed(e.to_string())),
            },
            None => 0,
        };
        Ok(target + draft + mmproj + self.pool_budget()?)
    }

    /// Host memory for saved sequence caches at the current plan ([`LlamaConfig::prefix_cache_bytes`]).
    fn pool_budget(&self) -> Result<u64, LoadError> {
        match self.config.prefix_cache_bytes {
            Some(b) => Ok(b),
            None => gguf::kv_bytes_per_sequence(
                &self.config.model_path,
                self.config.context_length,
                self.config.batch_size,
            )
            .map(default_prefix_cache_bytes)
            .map_err(|e| LoadError::Failed(e.to_string())),
        }
    }
}

impl ModelRunner for LlamaRunner {
    type Model = Serving;
    type Request = Request;
    type Summary = Summary;
    type Info = LlamaInfo;
    type Sequence = LlamaSequence;

    fn plan(&mut self, info: &mut LlamaInfo) -> Result<Option<u64>, LoadError> {
        self.planned = self.config.parallel;
        let bytes = self.footprint()?;
        info.footprint_bytes = Some(bytes);
        // With layers on a discrete GPU (CUDA: the heavy tier) the weights and KV cache live in VRAM, which
        // the host's budget does not govern, while the saved caches stay in host memory; Metal shares the
        // host's memory, so there everything counts.
        if cfg!(feature = "cuda") && self.config.gpu_layers != Some(0) {
            return Ok(Some(self.pool_budget()?));
        }
        Ok(Some(bytes))
    }

    fn shrink(&mut self, info: &mut LlamaInfo) -> Option<u64> {
        if self.parallel() <= 1 {
            return None;
        }
        self.planned = self.parallel() / 2;
        let bytes = self.footprint().ok()?;
        info.footprint_bytes = Some(bytes);
        Some(bytes)
    }

    fn load(
        &mut self,
        progress: &Progress,
        info: &mut LlamaInfo,
    ) -> Result<(Serving, usize), LoadError> {
        let progress = progress.clone();
        let loaded = load(&self.config, move |p| {
            progress(p);
            true
        })
        .map_err(|e| LoadError::Failed(e.to_string()))?;
        let threads = self.threads;
        let batch_threads = self
            .config
            .batch_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()) as i32);
        let parallel = self.parallel();
        // One KV stream per sequence (kv_unified = false), each holding the whole served context: a
        // sequence's cells sit where they would if it ran alone, so batched answers equal lone ones, and
        // attention reads only the sequence's own cells (llama.cpp's advice when sequences do not share a
        // long prefix). llama.cpp divides n_ctx among the streams.
        let ctx_params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(loaded.n_ctx * parallel))
            .with_n_seq_max(parallel)
            .with_kv_unified(false)
            // Sliding-window layers keep every cell (the C API's default, made explicit), not just their
            // window and a batch (llama-server's `swa_full = false`): then a trim back past the window
            // stays exact, and a saved state restores exactly; with a ring, measured on Gemma 3 270M,
            // llama.cpp restored a state whose ring had wrapped (a sequence longer than window + batch)
            // with logprobs off by up to 0.3. The cost is KV memory, which the footprint counts
            // (`gguf::footprint`).
            .with_swa_full(true)
            // A decode step carries one token per sequence: the batch must hold them all.
            .with_n_batch(self.batch())
            .with_n_ubatch(self.batch())
            .with_n_threads(threads)
            .with_n_threads_batch(batch_threads);
        let backend = backend().map_err(|e| LoadError::Failed(e.to_string()))?;
        let n_ctx = loaded.n_ctx;
        let gpu = self
            .config
            .gpu_layers
            .unwrap_or(if GPU_OFFLOAD {
                loaded.model.n_layer()
            } else {
                0
            })
            .min(loaded.model.n_layer());
        let bytes = loaded.model.size();
        let cell =
            SessionCell::try_new(loaded, |l| l.model.new_context(backend, ctx_params.clone()))
                .map_err(|e| {
                    LoadError::Failed(format!(
                        "creating the context ({n_ctx} tokens × {parallel} sequences): {e}"
                    ))
                })?;
        tracing::info!(model = %self.config.model_path.display(), n_ctx, parallel, threads, gpu_layers = gpu, "GGUF loaded");
        info.gpu_layers = gpu;
        info.threads = threads;
        info.model_bytes = bytes;
        let drafts = match &self.config.speculative {
            None => None,
            Some(sp) => {
                let why = |e: String| {
                    LoadError::Failed(format!("draft model {}: {e}", sp.draft_model.display()))
                };
                let draft_config = LlamaConfig {
                    model_path: sp.draft_model.clone(),
                    context_length: Some(n_ctx),
                    speculative: None,
                    ..self.config.clone()
                };
                let d = load(&draft_config, |_| true).map_err(|e| why(e.to_string()))?;
                speculative::check_vocabulary(cell.borrow_owner(), &d)
                    .map_err(|e| why(e.to_string()))?;
                let cell = speculative::DraftCell::try_new(d, |l| {
                    l.model.new_context(backend, ctx_params)
                })
                .map_err(|e| why(format!("creating its context: {e}")))?;
                tracing::info!(draft = %sp.draft_model.display(), "draft GGUF loaded");
                Some(speculative::Drafts {
                    cell,
                    held: vec![vec![]; parallel as usize],
                    config: sp.config.clone(),
                    batch_size: self.config.batch_size as usize,
                })
            }
        };
        let mtmd = match &self.config.mmproj_path {
            Some(mm) => match media::Mtmd::load(
                mm,
                &cell.borrow_owner().model,
                batch_threads,
                self.config.image_soft_tokens,
                self.batch(),
            ) {
                Ok(m) => Some(m),
                Err(e) if self.config.mmproj_optional => {
                    tracing::warn!(mmproj = %mm.display(), "the mmproj found for the model did not load, so it serves text: {e}");
                    None
                }
                Err(e) => return Err(LoadError::Failed(e.to_string())),
            },
            None => None,
        };
        // What the loaded towers take (the metadata read at start may promise more than loaded).
        info.input_modalities = std::iter::once("text")
            .chain(mtmd.as_ref().map_or(vec![], |m| {
                let (sees, hears) = m.modalities();
                [sees.then_some("image"), hears.then_some("audio")]
                    .into_iter()
                    .flatten()
                    .collect()
            }))
            .map(String::from)
            .collect();
        let slots = (0..parallel).map(|_| Slot::default()).collect();
        self.pool_budget = self.pool_budget()?;
        Ok((
            Serving {
                mtmd,
                cell,
                drafts,
                slots,
                clock: 0,
                pool: PrefixPool::new(POOL_ENTRIES),
                pool_budget: self.pool_budget,
                copy_pending: false,
            },
            n_ctx as usize,
        ))
    }

    fn max_sequences(&self, model: &Serving) -> usize {
        model.slots.len()
    }

    fn admit(
        &mut self,
        model: &mut Serving,
        request: Request,
        _context_length: usize,
    ) -> Result<LlamaSequence, EngineFailure> {
        let Serving {
            mtmd,
            cell,
            slots,
            clock,
            drafts,
            pool,
            pool_budget,
            copy_pending,
        } = model;
        *clock += 1;
        let now = *clock;
        // No saves while a stream copy may still land on a slot (see `Serving::copy_pending`).
        let budget = if *copy_pending { 0 } else { *pool_budget };
        let admitted = cell.with_dependent_mut(|loaded, ctx| {
            LlamaSequence::admit(
                loaded,
                mtmd.as_ref(),
                ctx,
                slots,
                (pool, budget),
                now,
                request,
            )
        });
        self.pool_held = (pool.len(), pool.bytes());
        let mut seq = admitted.map_err(EngineFailure::from)?;
        // A seeded sampled request decodes plainly: a verification's batch rounds the logits otherwise than
        // a one-token step, which can move a seeded draw, and a seed promises the same tokens every time.
        // A grammar-constrained request decodes plainly too, as on the MLX engine (its mask is built per
        // position on the host).
        // A prompt with media too: the draft model cannot see or hear it.
        if !(seq.sampled && seq.seeded) && seq.grammar.is_none() && seq.media.is_empty() {
            seq.spec = drafts.as_ref().map(|d| Controller::new(d.config.clone()));
        }
        Ok(seq)
    }

    fn prompt_tokens(
        &mut self,
        model: &mut Serving,
        request: &Request,
    ) -> Result<usize, EngineFailure> {
        placed_ids(model.cell.borrow_owner(), model.mtmd.as_ref(), request)
            .map(|(ids, _)| ids.len())
            .map_err(Into::into)
    }

    fn step(
        &mut self,
        model: &mut Serving,
        batch: &mut [&mut LlamaSequence],
        out: &mut [SeqOutput<Summary>],
    ) -> Result<(), EngineFailure> {
        let chunk = self.config.batch_size as usize;
        let Serving {
            mtmd,
            cell,
            drafts,
            slots,
            pool,
            copy_pending,
            ..
        } = model;
        let (speculated, largest_verify) = (&mut self.speculated, &mut self.largest_verify);
        let result = cell.with_dependent_mut(|loaded, ctx| {
            step(
                loaded,
                (ctx, mtmd.as_mut()),
                (drafts.as_mut(), speculated, largest_verify),
                Shared {
                    slots,
                    pool,
                    copy_pending: &mut *copy_pending,
                },
                batch,
                out,
                chunk,
            )
        });
        self.pool_held = (pool.len(), pool.bytes());
        if result.is_ok() {
            *copy_pending = false;
        }
        if result.is_err() {
            // What the failed decode left in these sequences' KV is unknown: their slots start clean.
            for seq in batch.iter_mut() {
                seq.poisoned = true;
            }
        }
        result.map_err(Into::into)
    }

    fn release(&mut self, model: &mut Serving, seq: LlamaSequence) {
        let slot = &mut model.slots[seq.slot];
        slot.busy = false;
        if seq.poisoned {
            model.cell.with_dependent_mut(|_, ctx| {
                let _ = ctx.clear_kv_cache_seq(Some(seq.slot as u32), None, None);
            });
        } else {
            // Finished or cancelled cleanly: the record describes the sequence's KV again.
            slot.cached.commit(seq.kv);
        }
    }

    fn unload(&mut self, model: Serving) {
        // The pool goes with the model: `/health` says so at the next refresh.
        self.pool_held = (0, 0);
        drop(model);
    }

    fn refresh(&mut self, info: &mut LlamaInfo) {
        if let Some(sp) = &mut info.speculative {
            sp.update(self.speculated);
        }
        info.largest_verify_batch = self.largest_verify;
        (info.prefix_cache_entries, info.prefix_cache_bytes) = self.pool_held;
    }

    fn tally(s: &Summary) -> Tally {
        Tally {
            prompt_tokens: s.prompt_tokens,
            cached_tokens: s.cached_tokens,
            completion_tokens: s.completion_tokens,
            prefill_tps: s.prefill_tps,
            decode_tps: s.decode_tps,
        }
    }
}

/// The prompt of `request` as the sequence holds it: its token ids with each image and clip in the place
/// of its placeholder ([`media::Mtmd::place`]), and where they are.
///
/// Errors: a prompt that does not tokenize; media without an mmproj that takes it, or not matching the
/// placeholders.
fn placed_ids(
    loaded: &Loaded,
    mtmd: Option<&media::Mtmd>,
    request: &Request,
) -> Result<(Vec<LlamaToken>, Vec<media::MediaSpan>)> {
    let ids = loaded.prompt_ids(&request.prompt)?;
    let n_vocab = loaded.model.n_vocab();
    if let Some(bad) = ids.iter().find(|t| t.0 < 0 || t.0 >= n_vocab) {
        return Err(LlamaError::InvalidRequest(format!(
            "token id {} is outside the vocabulary ({n_vocab})",
            bad.0
        )));
    }
    if request.images.is_empty() && request.audio.is_empty() {
        return Ok((ids, vec![]));
    }
    let Some(mtmd) = mtmd else {
        return Err(LlamaError::InvalidRequest(format!(
            "this model cannot take {}: it is served without an mmproj GGUF (its vision and audio \
             towers; set the tier's `mmproj`)",
            if request.images.is_empty() {
                "audio"
            } else {
                "images"
            }
        )));
    };
    let (sees, hears) = mtmd.modalities();
    if (!request.images.is_empty() && !sees) || (!request.audio.is_empty() && !hears) {
        return Err(LlamaError::InvalidRequest(format!(
            "this model cannot take {}: its mmproj has no {} tower",
            if sees { "audio" } else { "images" },
            if sees { "audio" } else { "vision" }
        )));
    }
    let (ids, spans) = mtmd.place(ids, &request.images, &request.audio)?;
    if spans.last().is_some_and(|s| s.end() == ids.len()) {
        return Err(LlamaError::InvalidRequest(
            "the prompt ends with media: the model reads the next token from the text after it"
                .into(),
        ));
    }
    Ok((ids, spans))
}

impl Loaded {
    /// Token ids of a prompt (chat through the template, which writes `<bos>`).
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<LlamaToken>> {
        let vocab = self.model.vocab();
        let text = match prompt {
            Prompt::Ids(ids) => return Ok(ids.iter().map(|&i| LlamaToken(i as i32)).collect()),
            Prompt::Text(t) => match &self.bos {
                Some(b) if !t.starts_with(b.as_str()) => format!("{b}{t}"),
                _ => t.clone(),
            },
            Prompt::Chat {
                messages,
                tools,
                enable_thinking,
            } => {
                let tpl = self
                    .template
                    .as_ref()
                    .ok_or_else(|| LlamaError::InvalidRequest(NO_CHAT_TEMPLATE.into()))?;
                tpl.render_for_generation(messages, tools.as_deref(), *enable_thinking)
                    .map_err(|e| {
                        if e.is_client_error() {
                            LlamaError::InvalidRequest(e.to_string())
                        } else {
                            LlamaError::InvalidModel(format!("chat template: {e}"))
                        }
                    })?
            }
        };
        // Special tokens in the text (<bos>, <|turn>) are parsed as such; nothing is added.
        Ok(vocab.tokenize(text.as_bytes(), false, true))
    }
}

fn sampler(loaded: &Loaded, s: &Sampling) -> Result<LlamaSampler> {
    let n_vocab = loaded.model.n_vocab();
    let mut chain = vec![];
    if !s.logit_bias.is_empty() {
        let biases: Vec<LlamaLogitBias> = s
            .logit_bias
            .iter()
            .map(|&(t, b)| LlamaLogitBias::new(LlamaToken(t as i32), b))
            .collect();
        chain.push(LlamaSampler::logit_bias(n_vocab, &biases));
    }
    let rep = s.repetition_penalty.unwrap_or(1.0);
    if rep != 1.0 || s.presence_penalty != 0.0 || s.frequency_penalty != 0.0 {
        // The same window as the MLX engine (mlx-lm's 20 tokens by default).
        chain.push(LlamaSampler::penalties(
            n_vocab,
            s.penalty_context as i32,
            rep,
            s.frequency_penalty,
            s.presence_penalty,
        ));
    }
    if s.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if s.top_k > 0 {
            chain.push(LlamaSampler::top_k(s.top_k));
        }
        if s.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(s.top_p, 1));
        }
        if s.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(s.min_p, 1));
        }
        chain.push(LlamaSampler::temp(s.temperature));
        let seed = s.seed.map_or_else(rand_seed, |v| v as u32);
        chain.push(LlamaSampler::dist(seed));
    }
    Ok(LlamaSampler::chain_simple(chain))
}

fn rand_seed() -> u32 {
    // Seedless requests differ run to run, as OpenAI's do; the clock is random enough for sampling.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() ^ d.as_secs() as u32)
}

/// Runs the prompt through `ctx` (cleared first) and returns the logits of its last position; used by
/// parity tests against mlx-lm.
pub fn prompt_logits(
    loaded: &Loaded,
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    ids: &[LlamaToken],
    batch_size: usize,
) -> Result<Vec<f32>> {
    prefill(ctx, ids, batch_size)?;
    let _ = loaded;
    Ok(ctx
        .get_logits_ith(ids.len() as i32 - 1 - last_chunk_start(ids.len(), batch_size) as i32)
        .to_vec())
}

fn last_chunk_start(n: usize, batch: usize) -> usize {
    (n.saturating_sub(1) / batch.max(1)) * batch.max(1)
}

fn prefill(
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    ids: &[LlamaToken],
    batch_size: usize,
) -> Result<LlamaBatch<'static>> {
    ctx.clear_kv_cache();
    decode_from(ctx, ids, 0, batch_size)
}

/// Decodes `ids[from..]` into sequence 0 at their positions, in batches of `batch_size`, with logits for
/// the last prompt token only (at the returned batch's last index).
fn decode_from(
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    ids: &[LlamaToken],
    from: usize,
    batch_size: usize,
) -> Result<LlamaBatch<'static>> {
    let mut batch = LlamaBatch::new(batch_size.max(1), 1);
    for (c, chunk) in ids[from..].chunks(batch_size.max(1)).enumerate() {
        batch.clear();
        let base = from + c * batch_size;
        for (i, &t) in chunk.iter().enumerate() {
            let pos = base + i;
            batch
                .add(t, pos as i32, &[0], pos == ids.len() - 1)
                .map_err(|e| LlamaError::Runtime(e.to_string()))?;
        }
        ctx.decode(&mut batch)
            .map_err(|e| LlamaError::Runtime(format!("decode: {e}")))?;
    }
    Ok(batch)
}

/// How many leading tokens of `ids` sequence `seq` can keep: what its [`PrefixSlot`] says is reusable (the
/// longest prefix it holds, never the last prompt token, whose logits start the answer), or 0 when the
/// sliding-window layers no longer hold that prefix's window, so that it cannot be restored exactly and
/// the whole prompt is prefilled again — the check llama-server makes (`pos_min > max(0, n_past - n_swa)`).
/// The engine's contexts keep every sliding cell (`swa_full`), so a sequence the engine decoded always
/// passes; one restored from the pool holds only the window its state was saved with
/// (`llama_state_seq_get_data` drops sliding cells outside it), and there the check decides.
fn reusable(
    ctx: &llama_cpp_2::context::LlamaContext<'_>,
    seq: u32,
    cached: &PrefixSlot,
    (ids, media): (&[u32], &[media::MediaSpan]),
    n_swa: Option<u32>,
) -> usize {
    // Never into an image or clip (read whole), and cut back before the window is checked.
    let keep = media::whole_spans(cached.reusable(ids), media);
    if keep == 0 {
        return 0;
    }
    let pos_min = ctx.kv_cache_seq_pos_min(seq as i32);
    let window_lost = n_swa.is_some_and(|w| pos_min > (keep as i64 - w as i64).max(0) as i32);
    if pos_min < 0 || window_lost { 0 } else { keep }
}

/// Keeps the first `keep` positions of sequence `seq`'s KV (`llama_memory_seq_rm` from there on; all of it
/// for 0) and returns how many were kept (0 when llama.cpp cannot trim a partial range).
fn trim(ctx: &mut llama_cpp_2::context::LlamaContext<'_>, seq: u32, keep: usize) -> Result<usize> {
    if keep > 0 {
        let kept = ctx
            .clear_kv_cache_seq(Some(seq), Some(keep as u32), None)
            .map_err(|e| LlamaError::Runtime(format!("trimming the KV cache: {e}")))?;
        if kept {
            return Ok(keep);
        }
    }
    ctx.clear_kv_cache_seq(Some(seq), None, None)
        .map_err(|e| LlamaError::Runtime(format!("clearing the KV cache: {e}")))?;
    Ok(0)
}

/// Saves sequence `seq`'s cache, which holds the KV of `tokens`, in the pool as an owned entry, evicting
/// the least recently used entries beyond `budget` bytes. Nothing is saved when the cache and `tokens`
/// disagree, when the state alone exceeds the budget, or when llama.cpp cannot serialise it (logged).
fn save(
    ctx: &llama_cpp_2::context::LlamaContext<'_>,
    seq: u32,
    tokens: &[u32],
    n_swa: Option<u32>,
    pool: &mut PrefixPool<Saved>,
    budget: u64,
) {
    let (pos_min, pos_max) = (
        ctx.kv_cache_seq_pos_min(seq as i32),
        ctx.kv_cache_seq_pos_max(seq as i32),
    );
    if pos_min < 0 || pos_max + 1 != tokens.len() as i32 {
        tracing::warn!(
            seq,
            pos_min,
            pos_max,
            tokens = tokens.len(),
            "a slot's cache and its record disagree: not saved"
        );
        return;
    }
    let state = match ctx.state_seq_get(seq as i32, LlamaStateSeqFlags::empty()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(seq, "cannot save a sequence's cache: {e}");
            return;
        }
    };
    let bytes = state.byte_len() as u64;
    if bytes > budget {
        return;
    }
    // llama.cpp writes a sliding-window layer's cells only inside the window of the last position
    // (`is_masked_swa`: masked once `pos_max - pos >= n_swa`).
    let window_start = n_swa.map_or(0, |w| pos_min.max(pos_max + 1 - w as i32));
    pool.insert(
        tokens.to_vec(),
        Saved {
            state: Arc::new(state),
            window_start,
        },
        bytes,
        EntryKind::Owned,
    );
    pool.evict_to(budget);
}

/// Where [`share_prefix`] looks besides the running sequences: the idle slots' caches and the
/// host-memory pool.
struct Shared<'a> {
    slots: &'a mut [Slot],
    pool: &'a mut PrefixPool<Saved>,
    /// [`Serving::copy_pending`].
    copy_pending: &'a mut bool,
}

/// Where a longer prefix was found.
enum Source {
    /// In this llama.cpp sequence's KV (a running sequence or an idle slot).
    Sequence(usize),
    /// In the host-memory pool.
    Pool,
}

/// Where `batch[i]` can find a longer prefix of its prompt than its own slot kept (by at least
/// [`MIN_SHARED_GAIN`] tokens): another running sequence, an idle slot or the pool, with how many prompt
/// tokens it holds; the longest wins. A cache whose sliding window has moved past the prefix cannot be
/// cut back exactly and does not count. None: nowhere.
fn find_prefix(
    ctx: &llama_cpp_2::context::LlamaContext<'_>,
    loaded: &Loaded,
    shared: &Shared<'_>,
    batch: &[&mut LlamaSequence],
    i: usize,
) -> Option<(usize, Source)> {
    let (n_swa, n_ctx) = (loaded.n_swa, loaded.n_ctx);
    let s = &*batch[i];
    let ids: Vec<u32> = s.ids.iter().map(|t| t.0 as u32).collect();
    // The last prompt token is read for its logits, never taken from a cache.
    let limit = ids.len().saturating_sub(1);
    // Never into an image or clip (read whole): cut back before any window is checked.
    let common = |t: &[u32]| {
        let n = t
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(limit);
        media::whole_spans(n, &s.media)
    };
    let holds = |seq: usize, keep: usize| {
        keep > 0 && window_holds(ctx.kv_cache_seq_pos_min(seq as i32), keep, n_swa)
    };
    let running = batch
        .iter()
        .enumerate()
        .filter(|(j, o)| *j != i && !o.poisoned)
        .map(|(_, o)| (common(o.kv.tokens()), o.slot));
    let idle = shared
        .slots
        .iter()
        .enumerate()
        .filter(|(_, slot)| !slot.busy)
        .map(|(k, slot)| (common(slot.cached.tokens()), k));
    let in_streams = running
        .chain(idle)
        .filter(|&(keep, seq)| holds(seq, keep))
        .max_by_key(|&(keep, _)| keep)
        .map(|(keep, seq)| (keep, Source::Sequence(seq)));
    // Not while a stream copy may still be queued (after a failed step): it would land on the restore.
    let can_trim = |e: &Saved, keep: usize| {
        window_holds(e.window_start, media::whole_spans(keep, &s.media), n_swa)
    };
    let in_pool = (!*shared.copy_pending)
        .then(|| shared.pool.peek_nearest(&ids, |_| true, can_trim))
        .flatten()
        .map(|keep| (media::whole_spans(keep, &s.media), Source::Pool));
    [in_streams, in_pool]
        .into_iter()
        .flatten()
        .filter(|(keep, _)| *keep >= s.prefilled + min_shared_gain(n_ctx))
        .max_by_key(|(keep, _)| *keep)
}

/// Copies what [`find_prefix`] found into `batch[i]`'s slot, cut back to the `keep` tokens it shares with
/// the prompt, so the sequence reads only the rest. A sequence's KV moves as its whole stream
/// (`llama_memory_seq_cp` between the per-sequence streams), which llama.cpp applies at the next decode:
/// the caller must decode before anything else writes to the streams involved. A pool entry is llama.cpp's
/// saved state of a sequence, restored at once (`llama_state_seq_set_data`). So concurrent requests that
/// open with one system prompt read it once, and a conversation whose slot was taken over comes back
/// without being read again (vLLM's and llama-server's prefix sharing). The copied KV is bit for bit the
/// source's, so an answer from it is the one the source's batches would give. A failed restore leaves the
/// sequence to read its whole prompt.
fn share_prefix(
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    n_swa: Option<u32>,
    shared: &mut Shared<'_>,
    s: &mut LlamaSequence,
    (keep, source): (usize, Source),
) -> Result<()> {
    let ids: Vec<u32> = s.ids.iter().map(|t| t.0 as u32).collect();
    let dst = s.slot as u32;
    let copied = match source {
        Source::Sequence(from) => {
            *shared.copy_pending = true;
            ctx.copy_kv_cache_seq(from as i32, dst as i32, None, None)
                .is_ok()
        }
        Source::Pool => {
            let can_trim = |e: &Saved, keep: usize| {
                window_holds(e.window_start, media::whole_spans(keep, &s.media), n_swa)
            };
            match shared.pool.take_nearest(&ids, |_| true, can_trim) {
                Some(hit) => match ctx.state_seq_set(&hit.cache.state, dst as i32) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(seq = dst, "cannot restore a saved cache: {e}");
                        false
                    }
                },
                None => false,
            }
        }
    };
    let kept = trim(ctx, dst, if copied { keep } else { 0 })?;
    s.kv = PrefixSlot::new();
    s.kv.extend(ids[..kept].iter().copied());
    s.prefilled = kept;
    s.reused = kept;
    Ok(())
}

/// Token text decoding that keeps multi-byte UTF-8 characters split across tokens intact.
struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let out = s.to_string();
                self.pending.clear();
                out
            }
            Err(e) if e.error_len().is_none() => {
                // An incomplete character at the end: emit what is complete, keep the rest.
                let valid = e.valid_up_to();
                let out = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                out
            }
            Err(_) => {
                let out = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                out
            }
        }
    }

    fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// One request in the running batch: its llama.cpp sequence (slot), prompt, sampler chain and decoding
/// state.
struct LlamaSequence {
    /// The llama.cpp sequence id (and index of its slot).
    slot: usize,
    ids: Vec<LlamaToken>,
    /// Prompt tokens whose KV is in the sequence (reused or prefilled).
    prefilled: usize,
    /// Prompt tokens reused from the slot's previous request.
    reused: usize,
    /// The tokens whose KV the sequence holds (committed to the slot at release).
    kv: PrefixSlot,
    sampler: LlamaSampler,
    /// The grammar the answer follows (constrained decoding): each step's logits are masked to what it
    /// allows before the sampler runs, and each sampled token advances it.
    grammar: Option<jemma_constrain::TokenMatcher>,
    /// Greedy with nothing that changes the logits (no grammar, bias or penalty): the argmax is read off
    /// the logits directly.
    plain_greedy: bool,
    text: Utf8Stream,
    answer: OutputProcessor,
    /// Generated tokens; the last one is decoded at the next step.
    tokens: Vec<u32>,
    max_tokens: usize,
    ignore_eos: bool,
    logprobs: bool,
    top_logprobs: usize,
    prefill_time: Duration,
    first_token_at: Option<Instant>,
    /// A failed decode left its KV unknown: the slot is cleared at release.
    poisoned: bool,
    /// Whether the sequence has looked for a longer cached prefix than its slot's, in the other
    /// sequences and the pool (once, just before its prompt is first read: see [`share_prefix`]).
    looked_up: bool,
    /// Speculative decoding's controller, when the engine has a draft model.
    spec: Option<Controller>,
    /// The request samples (temperature above 0).
    sampled: bool,
    /// The request names a seed.
    seeded: bool,
    /// The prompt's images and clips, in order: each is evaluated whole ([`media::MediaSpan::eval`]).
    media: Vec<media::MediaSpan>,
}

impl LlamaSequence {
    /// Checks and tokenizes a request and gives it the free slot whose cache keeps the most of its prompt
    /// (the least recently used one when none keeps anything: llama-server's slot choice), trimming that
    /// slot's KV to the reusable prefix.
    fn admit(
        loaded: &Loaded,
        mtmd: Option<&media::Mtmd>,
        ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
        slots: &mut [Slot],
        (pool, budget): (&mut PrefixPool<Saved>, u64),
        now: u64,
        mut req: Request,
    ) -> Result<Self> {
        let (ids, media) = placed_ids(loaded, mtmd, &req)?;
        if ids.is_empty() {
            return Err(LlamaError::InvalidRequest("the prompt is empty".into()));
        }
        let n_vocab = loaded.model.n_vocab();
        req.sampling
            .validate(n_vocab as usize)
            .map_err(LlamaError::InvalidRequest)?;
        let n_ctx = loaded.n_ctx as usize;
        if req.fit_context && ids.len() < n_ctx {
            req.max_tokens = req.max_tokens.min(n_ctx - ids.len());
        }
        if ids.len() + req.max_tokens > n_ctx {
            return Err(LlamaError::InvalidRequest(format!(
                "prompt ({} tokens) + max_tokens ({}) exceeds the context of {n_ctx} tokens",
                ids.len(),
                req.max_tokens
            )));
        }
        let sampler = sampler(loaded, &req.sampling)?;
        let grammar = match &req.constraint {
            None => None,
            Some(c) => Some(loaded.vocabulary()?.matcher(c).map_err(|e| match e {
                jemma_constrain::ConstrainError::Invalid(m) => LlamaError::InvalidRequest(m),
                e => LlamaError::Runtime(e.to_string()),
            })?),
        };
        let as_u32: Vec<u32> = ids.iter().map(|t| t.0 as u32).collect();
        let (slot, keep) = choose_slot(slots, ids.len(), |i, s| {
            reusable(ctx, i as u32, &s.cached, (&as_u32, &media), loaded.n_swa)
        })
        .ok_or_else(|| LlamaError::Runtime("no free sequence slot".into()))?;
        // What the slot holds beyond what this request keeps is another conversation: kept in host memory,
        // it can come back to any slot when that conversation does.
        let held = &slots[slot].cached;
        if held.len() >= keep + MIN_SAVED_TOKENS && budget > 0 {
            save(ctx, slot as u32, held.tokens(), loaded.n_swa, pool, budget);
        }
        // The KV is touched from here on: until this request ends cleanly the slot's record is empty, so a
        // failure leaves the next request a cleared sequence rather than a stale record.
        let keep = trim(ctx, slot as u32, keep)?;
        let mut kv = slots[slot].cached.begin();
        kv.truncate(keep);
        slots[slot].busy = true;
        slots[slot].last_used = now;
        Ok(Self {
            slot,
            ids,
            prefilled: keep,
            reused: keep,
            kv,
            sampler,
            plain_greedy: req.sampling.temperature <= 0.0
                && grammar.is_none()
                && req.sampling.logit_bias.is_empty()
                && req.sampling.repetition_penalty.unwrap_or(1.0) == 1.0
                && req.sampling.presence_penalty == 0.0
                && req.sampling.frequency_penalty == 0.0,
            grammar,
            text: Utf8Stream { pending: vec![] },
            answer: OutputProcessor::new(&req.stop, req.parse_output)
                .with_max_tool_calls((!req.parallel_tool_calls).then_some(1)),
            tokens: vec![],
            max_tokens: req.max_tokens,
            ignore_eos: req.ignore_eos,
            logprobs: req.logprobs,
            top_logprobs: req.top_logprobs,
            prefill_time: Duration::ZERO,
            first_token_at: None,
            poisoned: false,
            looked_up: false,
            spec: None,
            sampled: req.sampling.temperature > 0.0,
            seeded: req.sampling.seed.is_some(),
            media,
        })
    }

    fn decoding(&self) -> bool {
        self.prefilled == self.ids.len()
    }

    /// Samples the next token from the logits at batch index `idx` and streams what it completes; ends the
    /// sequence in `out` at an end-of-generation token, a stop string or `max_tokens`.
    fn accept(
        &mut self,
        loaded: &Loaded,
        ctx: &llama_cpp_2::context::LlamaContext<'_>,
        idx: i32,
        out: &mut SeqOutput<Summary>,
    ) {
        let vocab = loaded.model.vocab();
        let tok = if let Some(g) = self.grammar.as_mut() {
            // The grammar's mask on a copy of the logits, then the request's sampler chain on what is left.
            let allowed = match g.allowed() {
                Ok(a) => a,
                Err(e) => {
                    self.poisoned = true;
                    return out.fail(LlamaError::Runtime(e.to_string()));
                }
            };
            let mut logits = ctx.get_logits_ith(idx).to_vec();
            allowed.apply(&mut logits);
            let mut cands = LlamaTokenDataArray::from_iter(
                logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)),
                false,
            );
            cands.apply_sampler(&mut self.sampler);
            let Some(tok) = cands.selected_token() else {
                self.poisoned = true;
                return out.fail(LlamaError::Runtime(
                    "the sampler selected no token under the grammar".into(),
                ));
            };
            self.sampler.accept(tok);
            tok
        } else if self.plain_greedy {
            // What llama.cpp's greedy sampler picks (the first largest logit), without its copy of the
            // whole vocabulary into a candidate array: 262,144 entries per sequence per step on Gemma.
            LlamaToken(argmax(ctx.get_logits_ith(idx)) as i32)
        } else {
            self.sampler.sample(ctx, idx)
        };
        if let Some(g) = self.grammar.as_mut()
            && !vocab.is_eog(tok)
            && let Err(e) = g.commit(tok.0 as u32)
        {
            self.poisoned = true;
            return out.fail(LlamaError::Runtime(e.to_string()));
        }
        if self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
        }
        if !self.ignore_eos && vocab.is_eog(tok) {
            return self.finish(Finish::Stop, false, out);
        }
        self.tokens.push(tok.0 as u32);
        let bytes = vocab.token_to_piece(tok, true, None);
        if self.logprobs {
            // The logits the sampler read: llama.cpp's samplers work on a copy, so these are the model's.
            let (lp, top) = log_softmax_top(
                ctx.get_logits_ith(idx),
                tok.0 as usize,
                self.top_logprobs.min(MAX_TOP_LOGPROBS),
            );
            let top = top
                .into_iter()
                .map(|(id, p)| (vocab.token_to_piece(LlamaToken(id as i32), true, None), p))
                .collect();
            out.send(Event::Logprobs(TokenLogprob::new(bytes.clone(), lp, top)));
        }
        let piece = self.text.push(&bytes);
        let (evs, hit) = self.answer.push(&piece);
        out.events.extend(evs.into_iter().map(Event::from));
        if hit {
            self.finish(Finish::Stop, true, out);
        } else if self.tokens.len() >= self.max_tokens {
            self.finish(Finish::Length, false, out);
        }
    }

    fn finish(&mut self, finish: Finish, by_string: bool, out: &mut SeqOutput<Summary>) {
        let evs = self.answer.finish(&self.text.finish(), by_string);
        out.events.extend(evs.into_iter().map(Event::from));
        let decode_time = self.first_token_at.map_or(Duration::ZERO, |t| t.elapsed());
        let n = self.tokens.len();
        let prefilled = self.ids.len() - self.reused;
        out.finish(Summary {
            prompt_tokens: self.ids.len(),
            cached_tokens: self.reused,
            completion_tokens: n,
            finish,
            tool_calls: self.answer.tool_calls(),
            stop_sequence: self.answer.stop_sequence().map(String::from),
            reasoning_tokens: self.answer.reasoning_tokens(),
            prefill_tps: prefilled as f64 / self.prefill_time.as_secs_f64().max(1e-9),
            decode_tps: if n > 1 {
                (n - 1) as f64 / decode_time.as_secs_f64().max(1e-9)
            } else {
                0.0
            },
            tokens: std::mem::take(&mut self.tokens),
            speculative: self.spec.as_ref().map(Controller::stats),
        });
    }
}

/// One scheduler step over the running batch: every decoding sequence's last token in one `llama_decode`
/// (one ubatch, a row per sequence), each sampled from its own row; then prompt chunks of the sequences
/// still reading their prompts, oldest first, up to one chunk's worth of tokens in all, so a newcomer's long
/// prompt delays running streams by one chunk per token rather than by the whole prompt. Each chunk is its
/// own `llama_decode` and starts where a lone request's would (at the reused prefix, every `chunk` tokens):
/// llama.cpp's CPU kernels depend on a batch's shape, so a prompt's KV is the same batched or alone.
fn step(
    loaded: &Loaded,
    // The context, and the mmproj's towers for the prompts' images and clips.
    (ctx, mut mtmd): (
        &mut llama_cpp_2::context::LlamaContext<'_>,
        Option<&mut media::Mtmd>,
    ),
    (drafts, speculated, largest_verify): (
        Option<&mut speculative::Drafts>,
        &mut SpeculativeStats,
        &mut usize,
    ),
    mut shared: Shared<'_>,
    batch: &mut [&mut LlamaSequence],
    out: &mut [SeqOutput<Summary>],
    chunk: usize,
) -> Result<()> {
    let mut decoding: Vec<usize> = (0..batch.len())
        .filter(|&i| batch[i].decoding() && !batch[i].tokens.is_empty())
        .collect();
    // Speculative rounds for the sequences whose controller asks for drafts now (single streams by default:
    // a batch already reads the weights once for several tokens); the others decode plainly below. Each
    // drafts on its own; their drafts are verified together.
    let n = decoding.len();
    if let Some(drafts) = drafts {
        let mut plain = Vec::with_capacity(n);
        let mut drafted = vec![];
        // By increasing slot, as the plain batch below (llama.cpp's per-stream split).
        decoding.sort_by_key(|&i| batch[i].slot);
        for i in decoding {
            let s = &mut *batch[i];
            // Tokens still allowed after the pending one: a round yields its drafts that stand and one more.
            let room = s.max_tokens.saturating_sub(s.tokens.len() + 1);
            // A verification reads k + 1 positions in one batch, which must fit llama.cpp's.
            let room = room.min(drafts.batch_size.saturating_sub(1));
            let k = s.spec.as_mut().map_or(0, |c| c.next_k(n, room));
            if k == 0 {
                plain.push(i);
                continue;
            }
            match speculative::draft(drafts, s, k) {
                Some((tokens, draft_time)) if !tokens.is_empty() => {
                    drafted.push(speculative::Drafted {
                        seq: i,
                        tokens,
                        draft_time,
                    });
                }
                Some(_) => plain.push(i),
                None => {
                    // The draft failed (logged): this sequence decodes plainly from now on.
                    s.spec = None;
                    plain.push(i);
                }
            }
        }
        *largest_verify = (*largest_verify).max(drafted.len());
        let rounds = speculative::verify(loaded, ctx, batch, out, &drafted, drafts.batch_size)?;
        for (d, r) in drafted.iter().zip(rounds) {
            let i = d.seq;
            if let Some(c) = batch[i].spec.as_mut() {
                c.record_round(r.drafted, r.accepted, r.draft_time, r.verify_time);
                speculated.add(&SpeculativeStats::round(r.drafted, r.accepted));
                // A round that ended the answer: its summary counts the round too.
                if let Some(Ok(summary)) = &mut out[i].end {
                    summary.speculative = Some(c.stats());
                }
            }
        }
        decoding = plain;
    }
    let started = Instant::now();
    // Increasing sequence ids: llama.cpp's per-stream split takes runs of consecutive ids into one ubatch.
    decoding.sort_by_key(|&i| batch[i].slot);
    if !decoding.is_empty() {
        let mut b = LlamaBatch::new(decoding.len(), 1);
        for &i in &decoding {
            let s = &batch[i];
            let pos = s.ids.len() + s.tokens.len() - 1;
            let tok = LlamaToken(*s.tokens.last().unwrap_or(&0) as i32);
            b.add(tok, pos as i32, &[s.slot as i32], true)
                .map_err(|e| LlamaError::Runtime(e.to_string()))?;
        }
        ctx.decode(&mut b)
            .map_err(|e| LlamaError::Runtime(format!("decode: {e}")))?;
        for (row, &i) in decoding.iter().enumerate() {
            let s = &mut batch[i];
            let last = *s.tokens.last().unwrap_or(&0);
            s.kv.extend([last]);
            s.accept(loaded, ctx, row as i32, &mut out[i]);
        }
        // A plain step's cost at this batch size, which each speculating sequence's controller weighs a
        // round (whose times are the batch's too) against; not past `max_batch`, where speculation is off.
        let elapsed = started.elapsed();
        for &i in &decoding {
            if let Some(c) = batch[i].spec.as_mut()
                && n <= c.config().max_batch
            {
                c.record_plain(elapsed);
                speculated.plain_steps += 1;
            }
        }
    }
    // Prompt chunks, oldest sequence first, up to `chunk` tokens in all (the first always runs, so a long
    // prompt progresses): several short prompts start in one step, a long one takes a chunk per step.
    let mut budget = chunk.max(1);
    for i in 0..batch.len() {
        if batch[i].decoding() {
            continue;
        }
        if !batch[i].looked_up {
            if let Some(found) = find_prefix(ctx, loaded, &shared, batch, i) {
                // A stream copy lands at the next decode, which must be this sequence's chunk (before any
                // other write to the streams involved): a chunk the budget would put off waits, with its
                // copy, for the next step.
                let s = &*batch[i];
                let n = chunk.max(1).min(s.ids.len() - found.0);
                if n > budget && budget < chunk.max(1) {
                    break;
                }
                share_prefix(ctx, loaded.n_swa, &mut shared, batch[i], found)?;
            }
            batch[i].looked_up = true;
        }
        let s = &mut *batch[i];
        // An image or clip is read whole, and counts against the budget as its length; text is read up to
        // the next one.
        if let Some(k) = s.media.iter().position(|m| m.start == s.prefilled) {
            let len = s.media[k].len;
            if len > budget && budget < chunk.max(1) {
                break;
            }
            budget = budget.saturating_sub(len);
            let mtmd = mtmd
                .as_deref_mut()
                .ok_or_else(|| LlamaError::Runtime("media in a prompt without an mmproj".into()))?;
            let t0 = Instant::now();
            // A tower that fails on one request's media ends that request alone (its slot is cleared
            // at release); the others' caches are untouched.
            if let Err(e) = s.media[k].eval(mtmd, ctx, s.slot as i32) {
                s.poisoned = true;
                out[i].fail(e);
                continue;
            }
            let end = s.media[k].end();
            s.kv.extend(s.ids[s.prefilled..end].iter().map(|t| t.0 as u32));
            s.prefilled = end;
            s.prefill_time += t0.elapsed();
            if budget == 0 {
                break;
            }
            continue;
        }
        let next_media = s
            .media
            .iter()
            .map(|m| m.start)
            .filter(|&start| start > s.prefilled)
            .min()
            .unwrap_or(s.ids.len());
        let n = chunk.max(1).min(next_media - s.prefilled);
        if n > budget && budget < chunk.max(1) {
            break;
        }
        budget = budget.saturating_sub(n);
        prefill_chunk(loaded, ctx, s, n, &mut out[i])?;
        if budget == 0 {
            break;
        }
    }
    Ok(())
}

/// Decodes the next `n` prompt tokens of `s` on their own (the chunk a lone request would decode), and once
/// the prompt is read samples the first token.
fn prefill_chunk(
    loaded: &Loaded,
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    s: &mut LlamaSequence,
    n: usize,
    out: &mut SeqOutput<Summary>,
) -> Result<()> {
    let t0 = Instant::now();
    let mut b = LlamaBatch::new(n, 1);
    for k in 0..n {
        let pos = s.prefilled + k;
        b.add(
            s.ids[pos],
            pos as i32,
            &[s.slot as i32],
            pos == s.ids.len() - 1,
        )
        .map_err(|e| LlamaError::Runtime(e.to_string()))?;
    }
    ctx.decode(&mut b)
        .map_err(|e| LlamaError::Runtime(format!("decode: {e}")))?;
    s.kv.extend(
        s.ids[s.prefilled..s.prefilled + n]
            .iter()
            .map(|t| t.0 as u32),
    );
    s.prefilled += n;
    s.prefill_time += t0.elapsed();
    if s.decoding() {
        out.send(Event::Started {
            prompt_tokens: s.ids.len(),
            cached_tokens: s.reused,
        });
        if s.max_tokens == 0 {
            s.finish(Finish::Length, false, out);
        } else {
            s.accept(loaded, ctx, n as i32 - 1, out);
        }
    }
    Ok(())
}

/// A loaded model with a context, for one-shot use (`jemma generate --engine llama`, parity tests).
pub struct Session {
    loaded: Loaded,
}

impl Session {
    /// Loads the GGUF.
    pub fn load(config: &LlamaConfig) -> Result<Self> {
        Ok(Self {
            loaded: load(config, |_| true)?,
        })
    }

    /// The loaded model.
    pub fn loaded(&self) -> &Loaded {
        &self.loaded
    }

    fn context(
        &self,
        n_ctx: usize,
        n_batch: usize,
        threads: i32,
    ) -> Result<llama_cpp_2::context::LlamaContext<'_>> {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx as u32))
            .with_n_batch(n_batch as u32)
            .with_n_ubatch(n_batch as u32)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        self.loaded
            .model
            .new_context(backend()?, params)
            .map_err(|e| LlamaError::Runtime(e.to_string()))
    }

    /// Logits of the last prompt position, and greedy continuation tokens, in one fresh context.
    pub fn logits_and_greedy(
        &self,
        ids: &[u32],
        steps: usize,
        threads: i32,
    ) -> Result<(Vec<f32>, Vec<u32>)> {
        let mut ctx = self.context(ids.len() + steps + 8, 512, threads)?;
        let toks: Vec<LlamaToken> = ids.iter().map(|&i| LlamaToken(i as i32)).collect();
        let logits = prompt_logits(&self.loaded, &mut ctx, &toks, 512)?;
        let mut out = vec![];
        let mut last = argmax(&logits);
        let mut batch = LlamaBatch::new(1, 1);
        for pos in toks.len()..toks.len() + steps {
            out.push(last);
            batch.clear();
            batch
                .add(LlamaToken(last as i32), pos as i32, &[0], true)
                .map_err(|e| LlamaError::Runtime(e.to_string()))?;
            ctx.decode(&mut batch)
                .map_err(|e| LlamaError::Runtime(format!("decode: {e}")))?;
            last = argmax(ctx.get_logits_ith(0));
        }
        Ok((logits, out))
    }
}

/// One step of [`Session::replay`].
#[derive(Debug, Clone)]
pub enum ReplayOp {
    /// Decode these tokens as one batch, at the positions following the sequence's current end.
    Decode(Vec<u32>),
    /// Remove the positions from this one on (`llama_memory_seq_rm`).
    Trim(usize),
}

impl Session {
    /// The logits of the last decoded token after running `ops` in a fresh context of `n_ctx` tokens: a
    /// cold reference with chosen batch boundaries. llama.cpp's CPU kernels depend on a batch's size (a
    /// different split changes the low bits), so comparing the prefix cache with a cold run is exact only
    /// when both split the prompt the same way.
    ///
    /// Errors: a decode or trim fails, or no token was decoded.
    pub fn replay(&self, ops: &[ReplayOp], n_ctx: usize, threads: i32) -> Result<Vec<f32>> {
        let widest = ops
            .iter()
            .map(|o| match o {
                ReplayOp::Decode(t) => t.len(),
                ReplayOp::Trim(_) => 0,
            })
            .max()
            .unwrap_or(1)
            .max(1);
        let mut ctx = self.context(n_ctx, widest, threads)?;
        let mut pos = 0usize;
        let mut last = None;
        for op in ops {
            match op {
                ReplayOp::Decode(toks) => {
                    let mut batch = LlamaBatch::new(toks.len().max(1), 1);
                    for (i, &t) in toks.iter().enumerate() {
                        batch
                            .add(
                                LlamaToken(t as i32),
                                (pos + i) as i32,
                                &[0],
                                i + 1 == toks.len(),
                            )
                            .map_err(|e| LlamaError::Runtime(e.to_string()))?;
                    }
                    ctx.decode(&mut batch)
                        .map_err(|e| LlamaError::Runtime(format!("decode: {e}")))?;
                    pos += toks.len();
                    last = Some(ctx.get_logits_ith(batch.n_tokens() - 1).to_vec());
                }
                ReplayOp::Trim(at) => {
                    ctx.clear_kv_cache_seq(Some(0), Some(*at as u32), None)
                        .map_err(|e| LlamaError::Runtime(e.to_string()))?;
                    pos = *at;
                }
            }
        }
        last.ok_or_else(|| LlamaError::InvalidRequest("nothing was decoded".into()))
    }
}

impl Session {
    /// For each position of `ids`, the argmax of the next-token logits and its margin over the runner-up
    /// (one forward pass over the whole sequence, teacher-forced). Parity tests use the margin to tell a
    /// real mismatch from a near-tie that float rounding may flip.
    pub fn teacher_forced(&self, ids: &[u32], threads: i32) -> Result<Vec<(u32, f32)>> {
        let n = ids.len();
        let mut ctx = self.context(n + 8, n.max(1), threads)?;
        let mut batch = LlamaBatch::new(n.max(1), 1);
        for (i, &t) in ids.iter().enumerate() {
            batch
                .add(LlamaToken(t as i32), i as i32, &[0], true)
                .map_err(|e| LlamaError::Runtime(e.to_string()))?;
        }
        ctx.decode(&mut batch)
            .map_err(|e| LlamaError::Runtime(format!("decode: {e}")))?;
        Ok((0..n)
            .map(|i| {
                let l = ctx.get_logits_ith(i as i32);
                let best = argmax(l);
                let second = l
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j as u32 != best)
                    .map(|(_, v)| *v)
                    .fold(f32::NEG_INFINITY, f32::max);
                (best, l[best as usize] - second)
            })
            .collect())
    }
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv { (i, x) } else { (bi, bv) }
        })
        .0 as u32
}
