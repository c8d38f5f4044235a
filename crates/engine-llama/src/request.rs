//! What a request to the engine is ([`Request`]) and what comes back: events, the summary, and the status
//! the engine reports ([`LlamaInfo`]).

use super::*;

/// Sampling parameters: the same type as the MLX engine's, so a request means the same on every tier.
pub use jemma_chat::sampling::SamplingParams as Sampling;

/// What to generate from (the same type for every engine).
pub use jemma_chat::prompt::Prompt;

/// One generation request.
#[derive(Debug, Clone)]
pub struct Request {
    /// What to generate from: chat messages (rendered with the model's template), text, or token ids.
    pub prompt: Prompt,
    /// Temperature, top-k/p, min-p, penalties, bias and seed (the same type and meaning as the MLX
    /// engine's).
    pub sampling: Sampling,
    /// Most tokens to generate (≥ 1; lowered to the context's room with `fit_context`).
    pub max_tokens: usize,
    /// Strings that end the answer where they first appear; the text stops before them.
    pub stop: Vec<String>,
    /// Split thinking and tool calls out of the text (chat requests).
    pub parse_output: bool,
    /// What the answer must be (JSON, a schema, forced tool calls), enforced token by token with
    /// llguidance; None: free text.
    pub constraint: Option<jemma_constrain::Constraint>,
    /// The most tokens the answer may spend thinking (`thinking_token_budget`): past it the engine ends
    /// the thought (Gemma 4's `<channel|>`). A model without Gemma 4's thought markers never thinks in
    /// them, so the budget holds without a check.
    pub thinking_token_budget: Option<usize>,
    /// Whether several tool calls may come in one answer (`parallel_tool_calls`); when false the answer
    /// ends after its first call.
    pub parallel_tool_calls: bool,
    /// `max_tokens` is a default, not the client's: lower it to the room the prompt leaves in the context
    /// (vLLM's default of `n_ctx - prompt_len`) instead of refusing the request.
    pub fit_context: bool,
    /// Generate past the model's end-of-generation tokens, to `max_tokens` or a stop string (benchmarks,
    /// and vLLM's `ignore_eos`); false stops at them, as every API request does.
    pub ignore_eos: bool,
    /// Report each generated token's log-probability under the model (`Event::Logprobs`; raw logits,
    /// before bias, penalties, grammar and temperature: see `jemma_chat::logprobs`).
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
    /// The prompt's videos, sampled (frames, and the sound track for a model that hears), in the order of
    /// their placeholders (`<|video|>`, Gemma 4's); they need an mmproj with a vision tower. Each frame is
    /// shown as Gemma 4's processor shows it, stamped with its time (see [`crate::media`]).
    pub videos: Vec<jemma_media::video::DecodedVideo>,
}

impl Request {
    /// A plain completion of `prompt`: greedy, at most `max_tokens` tokens, stopping at the model's
    /// end-of-generation tokens, no stop strings, output as raw text (no thinking or tool-call parsing),
    /// no constraint, logprobs or media. Callers change what they need with struct update syntax.
    pub fn new(prompt: Prompt, max_tokens: usize) -> Self {
        Self {
            prompt,
            sampling: Sampling::default(),
            max_tokens,
            stop: vec![],
            parse_output: false,
            constraint: None,
            thinking_token_budget: None,
            parallel_tool_calls: true,
            fit_context: false,
            ignore_eos: false,
            logprobs: false,
            top_logprobs: 0,
            images: vec![],
            audio: vec![],
            videos: vec![],
        }
    }
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
    /// Of the prompt tokens, the soft tokens of its clips and videos' sound (markers excluded).
    pub audio_tokens: usize,
    /// Prompt tokens/s.
    pub prefill_tps: f64,
    /// Generated tokens/s (after the first).
    pub decode_tps: f64,
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// What speculative decoding did for this request (None: it did not speculate).
    pub speculative: Option<SpeculativeStats>,
    /// Of its context at its first speculative round, the tokens the draft model did not read again: held
    /// by its slot's draft sequence or copied from another slot's (0 without a draft model).
    pub draft_cached_tokens: usize,
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
    /// The K cache's element type, by ggml's name (`f16`, `q8_0`; [`LlamaConfig::cache`]).
    pub cache_type_k: String,
    /// The V cache's element type, likewise.
    pub cache_type_v: String,
    /// What the model takes in: text, and images and audio as its mmproj's towers allow (read at start,
    /// before the model loads).
    pub input_modalities: Vec<Modality>,
    /// Whether the GGUF carries a chat template (`tokenizer.chat_template`, read at start; None: the file
    /// could not be read): a base model has none and answers `/v1/completions` only.
    pub chat_template: Option<bool>,
}

/// Figures for `/health` and the tray: the serving core's, with [`LlamaInfo`] flattened in.
pub type EngineStatus = jemma_serve::host::Status<LlamaInfo>;
