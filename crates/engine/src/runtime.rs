//! The engine host: the model lives on its own thread (MLX arrays and streams are not meant to hop between
//! threads), requests arrive over a bounded queue, events stream back over a bounded channel, and a dropped
//! receiver cancels the request at the next token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mlx_rs::Dtype;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::device::{DeviceKind, MlxMemory, mlx_memory, select_device};
use crate::generate::{
    FinishReason, GenerateOptions, Generation, GenerationStats, MediaRun, ROLLBACK_POINTS,
    RoundStart,
};
use crate::memory::MemoryGovernor;
use crate::models::gemma4::audio::AudioTower;
use crate::models::gemma4::vision::{VisionConfig, VisionTower, load_tower};
use crate::models::gemma4::{self, Gemma4, LoadReport};
use crate::models::gemma4::{Cache, Checkpoint, KvQuant};
use crate::template::ChatTemplate;
use crate::tokenizer::{DecodeStream, Tokenizer};
use crate::{EngineError, Result};
use jemma_chat::answer::OutputProcessor;
use jemma_chat::event::EngineFailure;
use jemma_chat::guard::ControlTokens;
use jemma_chat::logprobs::TokenLogprob;
use jemma_chat::template::NO_CHAT_TEMPLATE;
use jemma_serve::budget::{MIN_CUT_READ, prompt_read};
use jemma_serve::host::{Host, HostConfig, LoadError, ModelRunner, Progress, SeqOutput, Tally};
use jemma_serve::prefix::{EntryKind, PrefixPool, common_prefix_len, waits_for_shared_read};
pub use jemma_serve::speculative::SpeculativeInfo;
use jemma_serve::speculative::{Controller, SpeculativeConfig, SpeculativeStats};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::models::gemma4::Gemma4Assistant;
use crate::models::gemma4::assistant::AssistantConfig;
use crate::speculative::{DraftState, ModelBatchDrafter, MtpBatchDrafter};

/// What to generate from (the same type for every engine).
pub use jemma_chat::prompt::Prompt;

/// One generation request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Input.
    pub prompt: Prompt,
    /// Sampling, length and logprob options.
    pub options: GenerateOptions,
    /// Strings that end generation; the matched text is not returned.
    pub stop: Vec<String>,
    /// Parse Gemma 4 tool calls and thinking out of the text (chat requests).
    pub parse_output: bool,
    /// What the answer must be (`response_format` JSON or a schema, forced tool calls), enforced token by
    /// token; None: free text.
    pub constraint: Option<jemma_constrain::Constraint>,
    /// The most tokens the answer may spend thinking (`thinking_token_budget`): past it the engine ends
    /// the thought (Gemma 4's `<channel|>`). A model without Gemma 4's thought markers never thinks in
    /// them, so the budget holds without a check.
    pub thinking_token_budget: Option<usize>,
    /// Whether several tool calls may come in one answer (`parallel_tool_calls`); when false the answer
    /// ends after its first call.
    pub parallel_tool_calls: bool,
    /// `options.max_tokens` is a default, not the client's: lower it to the room the prompt leaves in the
    /// context (vLLM's default of `max_model_len - prompt_len`) instead of refusing the request.
    pub fit_context: bool,
    /// The prompt's images, in the order of their placeholders (`<|image|>` where a chat's image parts
    /// are; for [`Prompt::Ids`], runs of the image token already one per soft token).
    pub images: Vec<jemma_media::DecodedImage>,
    /// The prompt's audio clips (16 kHz mono), in the order of their placeholders (`<|audio|>` where a
    /// chat's audio parts are; for [`Prompt::Ids`], runs of the audio token already one per soft token).
    pub audio: Vec<jemma_media::audio::DecodedAudio>,
    /// The prompt's videos (sampled frames and audio track), in the order of their placeholders
    /// (`<|video|>` where a chat's video parts are; a chat or text prompt only).
    pub videos: Vec<jemma_media::video::DecodedVideo>,
}

/// What the engine sends back for a request (shared with the llama.cpp engine).
pub type Event = jemma_chat::event::Event<Summary>;

/// Final statistics of a request.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Token counts and timings.
    pub stats: GenerationStats,
    /// Prompt tokens whose KV was kept from the previous request (not prefilled again).
    pub cached_tokens: usize,
    /// Generated token ids (the stop token excluded).
    pub tokens: Vec<u32>,
    /// Whether any tool call was emitted (OpenAI finish_reason "tool_calls").
    pub tool_calls: bool,
    /// The stop string that ended the answer, if one did (Anthropic's `stop_sequence`).
    pub stop_sequence: Option<String>,
    /// Of the generated tokens, those spent thinking ([`jemma_chat::answer::OutputProcessor::reasoning_tokens`]).
    pub reasoning_tokens: usize,
    /// Of the prompt tokens, the soft tokens of its clips and videos' sound (markers excluded).
    pub audio_tokens: usize,
    /// MLX memory after the request.
    pub memory: MlxMemory,
    /// Prefill tokens/s.
    pub prefill_tps: f64,
    /// Decode tokens/s.
    pub decode_tps: f64,
    /// What speculative decoding did for this request (None: it did not speculate).
    pub speculative: Option<SpeculativeStats>,
    /// Of its context when it first drafted, the tokens the draft model resumed from the prefix cache (the
    /// draft's cache of the conversation it continues) instead of reading them; 0 without a draft model.
    pub draft_cached_tokens: usize,
    /// Images, video frames and clips whose tower ran for this request.
    pub encoded_media: usize,
    /// Images, video frames and clips the reused prefix held (read from the prefix cache: neither
    /// preprocessed nor encoded again).
    pub cached_media: usize,
}

/// Life-cycle of the engine host (the serving core's).
pub use jemma_serve::host::{EngineState, SubmitError};

/// The MLX engine's own figures in its status.
#[derive(Debug, Clone, Serialize)]
pub struct MlxInfo {
    /// Model directory.
    pub model_dir: PathBuf,
    /// Load report, once loaded.
    pub load: Option<LoadReport>,
    /// MLX memory.
    pub memory: MlxMemory,
    /// Resident memory of the whole process.
    pub process_rss_bytes: u64,
    /// Device.
    pub device: DeviceKind,
    /// Estimated footprint of the model at the served context (once estimated).
    pub footprint: Option<crate::footprint::Footprint>,
    /// Caches the prefix cache holds (finished conversations and shared system-prompt checkpoints).
    pub prefix_cache_entries: usize,
    /// Bytes they hold.
    pub prefix_cache_bytes: u64,
    /// The most sequences decoded in one batched forward since the model loaded.
    pub largest_decode_batch: usize,
    /// The most sequences whose speculative drafts were verified in one batched forward since the model
    /// loaded (0: none speculated; above 1 needs `max_batch` above 1).
    pub largest_verify_batch: usize,
    /// The most prompts read in one forward (one chunk each, packed) since the model loaded.
    pub largest_prefill_batch: usize,
    /// What the model takes in: text, images when the checkpoint has a vision tower (and video when its
    /// config also names a video token), audio when it has an audio tower (known from the model directory
    /// before loading).
    pub input_modalities: Vec<jemma_media::Modality>,
    /// Whether the checkpoint ships a chat template (read from the model directory at start; None: it
    /// could not be read): a base model has none and answers `/v1/completions` only.
    pub chat_template: Option<bool>,
    /// Speculative decoding since the model loaded (None: no draft model configured).
    pub speculative: Option<SpeculativeInfo>,
}

/// Speculative decoding for an MLX engine (`[tiers.X.speculative]`).
#[derive(Debug, Clone)]
pub struct SpeculativeSettings {
    /// The draft model: a smaller Gemma with the same tokenizer (E2B for E4B), or a Gemma 4 assistant
    /// (MTP) drafter made for the target (`model_type: "gemma4_assistant"`, found by its config).
    pub draft_model: PathBuf,
    /// Draft length, batch limit and adaptivity.
    pub config: SpeculativeConfig,
    /// A drafter found next to the model rather than configured: when it cannot be used (a partial
    /// download, a checkpoint that does not fit), the model serves without it, with a warning, instead of
    /// failing to load.
    pub optional: bool,
}

/// What drafts from `dir`, as `/health` names it: an MTP assistant or a draft model.
fn drafter_kind(dir: &Path) -> &'static str {
    if AssistantConfig::is_assistant(dir) {
        "mtp_assistant"
    } else {
        "draft_model"
    }
}

/// Live figures for `/health`, `/metrics` and the tray: the serving core's, with [`MlxInfo`] flattened in.
pub type EngineStatus = jemma_serve::host::Status<MlxInfo>;

/// Settings of an engine host.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Model directory (HF layout).
    pub model_dir: PathBuf,
    /// Activation dtype: None = per-device default (f32 on CPU, checkpoint dtype on GPU).
    pub dtype: Option<Dtype>,
    /// Requests that may wait for the model thread before submissions are refused.
    pub queue_capacity: usize,
    /// Events buffered per request before the model thread waits for the consumer.
    pub event_buffer: usize,
    /// Release the weights after this long without a request (None = keep them loaded).
    pub keep_alive: Option<std::time::Duration>,
    /// Load at start (true) or at the first request (false).
    pub preload: bool,
    /// Name shown for the model (default: the directory's name).
    pub name: Option<String>,
    /// Serve at most this many tokens of context (None = the model's maximum); also what the memory
    /// estimate is made for.
    pub context_length: Option<usize>,
    /// The process-wide memory budget this engine reserves its footprint from (None = no check).
    pub memory: Option<Arc<MemoryGovernor>>,
    /// Requests decoded together (continuous batching; at least 1), each with its own KV cache: the
    /// footprint reserves this many caches at the served context.
    pub max_sequences: usize,
    /// Bytes the prefix cache may hold together with the running requests' caches (None: the footprint's
    /// KV reservation, `max_sequences` caches at the served context; mlx_lm.server's
    /// `--prompt-cache-bytes`).
    pub prefix_cache_bytes: Option<u64>,
    /// Speculative decoding with a draft model (None: off).
    pub speculative: Option<SpeculativeSettings>,
}

impl EngineConfig {
    /// Defaults for a model directory.
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        Self {
            model_dir: model_dir.into(),
            dtype: None,
            queue_capacity: 16,
            event_buffer: 64,
            keep_alive: None,
            preload: true,
            name: None,
            context_length: None,
            memory: None,
            max_sequences: DEFAULT_MAX_SEQUENCES,
            prefix_cache_bytes: None,
            speculative: None,
        }
    }
}

/// Default [`EngineConfig::max_sequences`]: decode reads every weight once per step whatever the batch, so a
/// few sequences cost little more than one (llama-server's default is 4 slots too).
pub const DEFAULT_MAX_SEQUENCES: usize = 4;

/// A cheap, clonable handle to the engine thread (the serving core's host running [`MlxRunner`]).
#[derive(Clone)]
pub struct Engine {
    host: Host<MlxRunner>,
}

impl Engine {
    /// Starts the engine thread; the model loads in the background (see [`Engine::status`]).
    pub fn start(config: EngineConfig) -> Result<Self> {
        let device = select_device()?;
        let name = config.name.clone().unwrap_or_else(|| {
            config
                .model_dir
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let info = MlxInfo {
            model_dir: config.model_dir.clone(),
            load: None,
            memory: MlxMemory::default(),
            process_rss_bytes: 0,
            device,
            footprint: None,
            prefix_cache_entries: 0,
            prefix_cache_bytes: 0,
            largest_decode_batch: 0,
            largest_verify_batch: 0,
            largest_prefill_batch: 0,
            input_modalities: {
                use jemma_media::Modality;
                let mut m = vec![Modality::Text];
                if crate::models::gemma4::vision::sees_images(&config.model_dir) {
                    m.push(Modality::Image);
                    if crate::models::gemma4::vision::sees_video(&config.model_dir) {
                        m.push(Modality::Video);
                    }
                }
                if crate::models::gemma4::audio::hears_audio(&config.model_dir) {
                    m.push(Modality::Audio);
                }
                m
            },
            // Unknown until the checkpoint is there to read (a model still downloading is not a base model).
            chat_template: config
                .model_dir
                .join("config.json")
                .is_file()
                .then(|| ChatTemplate::from_model_dir(&config.model_dir).ok())
                .flatten()
                .map(|t| t.is_some()),
            speculative: config.speculative.as_ref().map(|sp| {
                let drafter = drafter_kind(&sp.draft_model);
                SpeculativeInfo::new(sp.draft_model.clone(), drafter)
            }),
        };
        let host_config = HostConfig {
            name: name.clone(),
            thread_name: "jemma-mlx".into(),
            queue_capacity: config.queue_capacity,
            event_buffer: config.event_buffer,
            keep_alive: config.keep_alive,
            preload: config.preload,
            memory: config.memory.clone(),
            stall_timeout: jemma_serve::host::STALL_TIMEOUT,
        };
        let runner = MlxRunner {
            dtype: config.dtype.or(default_dtype(device)),
            device,
            pool: PrefixPool::new(PREFIX_CACHE_ENTRIES),
            kv_budget: config.prefix_cache_bytes.unwrap_or(u64::MAX),
            live_bytes: 0,
            largest_batch: 0,
            largest_verify: 0,
            largest_prefill: 0,
            sequences: config.max_sequences.max(1),
            speculated: SpeculativeStats::default(),
            config,
        };
        let host = Host::start(host_config, runner, info).map_err(|e| {
            EngineError::Unsupported(format!("cannot start the engine thread: {e}"))
        })?;
        Ok(Self { host })
    }

    /// A snapshot of the engine's state and figures (never blocks on the model thread).
    pub fn status(&self) -> EngineStatus {
        let mut s = self.host.status();
        s.info.process_rss_bytes = crate::device::process_rss_bytes();
        s
    }

    /// Queues a request; events arrive on the returned receiver. Dropping it cancels the request.
    pub fn submit(
        &self,
        request: Request,
    ) -> std::result::Result<mpsc::Receiver<Event>, SubmitError> {
        self.host.submit(request)
    }

    /// Queues a request whose prompt is only counted: the reply is its length in tokens, after the chat
    /// template (Anthropic's `count_tokens`). See [`jemma_serve::host::Host::count`].
    pub fn count(
        &self,
        request: Request,
    ) -> std::result::Result<jemma_serve::host::CountReply, SubmitError> {
        self.host.count(request)
    }

    /// Resolves when the engine thread has ended: every handle was dropped, the requests it had accepted
    /// are answered, and the model's memory is released.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.host.stopped()
    }

    /// Drops this handle and waits (at most `limit`) for the engine thread to end and free the model; see
    /// [`jemma_serve::host::Host::shutdown`]. True when it ended.
    pub fn shutdown(self, limit: std::time::Duration) -> bool {
        self.host.shutdown(limit)
    }

    /// Waits (blocking) until the model is loaded or failed; for CLIs and tests.
    pub fn wait_ready(&self) -> Result<()> {
        self.host.wait_ready().map_err(EngineError::InvalidModel)
    }

    /// Blocks until `done` holds of the engine's status as its model thread publishes it (state,
    /// running sequences, token counts; woken by each change, never polling) or `limit` passes; true when
    /// it held. For tests and CLIs that wait for an unload, a reload or a cancel. `done` runs under the
    /// status lock: it must not call [`Engine::status`]; the figures that call adds on top (memory,
    /// process RSS) are not current in what `done` sees.
    pub fn wait_until(
        &self,
        limit: std::time::Duration,
        done: impl Fn(&EngineStatus) -> bool,
    ) -> bool {
        self.host.wait_until(limit, done)
    }
}

/// A model with its tokenizer and chat template: everything needed to turn a [`Prompt`] into tokens and
/// tokens into text. Used by the engine thread and by `jemma generate`.
pub struct ModelBundle {
    /// The decoder.
    pub model: Gemma4,
    /// Its tokenizer and stop ids.
    pub tokenizer: Tokenizer,
    /// Its chat template, if it ships one.
    pub template: Option<ChatTemplate>,
    /// What loading found.
    pub report: LoadReport,
    /// The vision tower, when the checkpoint has one.
    pub vision: Option<VisionTower>,
    /// Where images go in a prompt and how they are sized, when the model sees them.
    pub images: Option<ImageSpec>,
    /// The audio tower, when the checkpoint has one.
    pub audio: Option<AudioTower>,
    /// Where audio goes in a prompt and how it is featurised, when the model hears.
    pub audio_spec: Option<AudioSpec>,
    /// The drafter of speculative decoding, when one is configured.
    pub draft: Option<Draft>,
    /// The model directory's `tokenizer.json`, for [`ModelBundle::vocabulary`].
    tokenizer_json: std::path::PathBuf,
    vocabulary: std::sync::OnceLock<std::result::Result<Arc<jemma_constrain::Vocabulary>, String>>,
}

/// What drafts for a target in speculative decoding.
pub enum Draft {
    /// A smaller model with the same tokenizer, with a cache of its own per sequence.
    Model(Gemma4),
    /// A Gemma 4 assistant (MTP) drafter, reading the target's K/V and hidden state.
    Assistant(Gemma4Assistant),
}

/// The image placeholders of a model that sees images (`config.json`'s `image_token_id`, `boi_token_id`,
/// `eoi_token_id`) and how its processor sizes images (`processor_config.json`, else the vision config).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSpec {
    /// The placeholder token: one per soft token.
    pub image_id: u32,
    /// Opens an image.
    pub boi_id: u32,
    /// Closes an image.
    pub eoi_id: u32,
    /// Patch size, soft-token budget and pooling kernel.
    pub params: jemma_media::ImageParams,
    /// The video placeholder (`video_token_id`), whose runs hold video frames' soft tokens; None when the
    /// checkpoint names none.
    pub video_id: Option<u32>,
    /// How video frames are sized (`processor_config.json`'s `video_processor`; Gemma 4: 70 soft tokens,
    /// a quarter of an image's budget, which is also the default).
    pub video_params: jemma_media::ImageParams,
}

impl ImageSpec {
    /// How `img` is sized: the model's settings, with a quarter of the budget at low detail.
    pub fn params_for(&self, img: &jemma_media::DecodedImage) -> jemma_media::ImageParams {
        if img.low_detail {
            self.params.low_detail()
        } else {
            self.params
        }
    }

    /// Reads the spec of the checkpoint in `dir` whose tower is configured as `vision`.
    ///
    /// Errors: an unreadable `config.json`.
    pub fn from_model_dir(dir: &Path, vision: &VisionConfig) -> Result<Self> {
        let (cfg, proc) = processor_files(dir)?;
        let id = |k: &str, default: u32| {
            cfg.get(k)
                .and_then(serde_json::Value::as_u64)
                .map_or(default, |v| v as u32)
        };
        // transformers writes the processor's settings at the top level or under "image_processor".
        let setting = |k: &str, default: usize| {
            proc.get(k)
                .or_else(|| proc.pointer(&format!("/image_processor/{k}")))
                .and_then(serde_json::Value::as_u64)
                .map_or(default, |v| v as usize)
        };
        let params = jemma_media::ImageParams {
            patch_size: setting("patch_size", vision.patch_size),
            // The tower pools into at most `default_output_length` soft tokens: a larger budget in the
            // processor's config would size images the tower then refuses.
            max_soft_tokens: setting("max_soft_tokens", vision.default_output_length)
                .min(vision.default_output_length),
            pooling_kernel_size: setting("pooling_kernel_size", vision.pooling_kernel_size),
        };
        let video = |k: &str, default: usize| {
            proc.pointer(&format!("/video_processor/{k}"))
                .and_then(serde_json::Value::as_u64)
                .map_or(default, |v| v as usize)
        };
        Ok(Self {
            // mlx-vlm's defaults: the real Gemma 4 tokenizer's ids.
            image_id: id("image_token_id", 258_880),
            boi_id: id("boi_token_id", 255_999),
            eoi_id: id("eoi_token_id", 258_882),
            video_id: cfg
                .get("video_token_id")
                .and_then(serde_json::Value::as_u64)
                .map(|v| v as u32),
            video_params: jemma_media::ImageParams {
                patch_size: video("patch_size", params.patch_size),
                max_soft_tokens: video("max_soft_tokens", params.low_detail().max_soft_tokens)
                    .min(vision.default_output_length),
                pooling_kernel_size: video("pooling_kernel_size", params.pooling_kernel_size),
            },
            params,
        })
    }
}

/// A JSON file of the model directory; None when absent or unreadable.
fn read_json(dir: &Path, name: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join(name)).ok()?).ok()
}

/// The model directory's `config.json` and `processor_config.json` (empty when absent): where the media
/// placeholders' ids and the processors' settings are.
///
/// Errors: an unreadable `config.json`.
fn processor_files(dir: &Path) -> Result<(serde_json::Value, serde_json::Value)> {
    let cfg = read_json(dir, "config.json")
        .ok_or_else(|| EngineError::InvalidModel("config.json is unreadable".into()))?;
    Ok((
        cfg,
        read_json(dir, "processor_config.json").unwrap_or_default(),
    ))
}

/// An image placed in a prompt: its preprocessed pixels from position `start`.
#[derive(Debug)]
pub struct PromptImage {
    /// First placeholder position.
    pub start: usize,
    /// The tower's input.
    pub pixels: jemma_media::Pixels,
    /// The digest of its bytes.
    pub digest: u64,
}

/// An audio clip placed in a prompt: its features and soft-token count from position `start`.
#[derive(Debug)]
pub struct PromptAudio {
    /// First placeholder position.
    pub start: usize,
    /// Placeholders (the processor's count).
    pub soft_tokens: usize,
    /// The audio tower's input.
    pub features: jemma_media::audio::AudioFeatures,
    /// The digest of its bytes.
    pub digest: u64,
}

/// An image, video frame or clip placed in a prompt, before preprocessing: the engine preprocesses and
/// encodes it only when the prefill reaches it ([`Generation::media_to_encode`]), so media a cached
/// prefix holds cost nothing again (as llama.cpp's engine evaluates a media span only when it reads it).
#[derive(Clone)]
struct Placement {
    /// First soft-token position.
    start: usize,
    /// Soft tokens (placeholder positions), by the processor's arithmetic.
    len: usize,
    /// The digest of its bytes.
    digest: u64,
    /// What the tower takes, before preprocessing.
    input: MediaInput,
}

/// What a placed medium's tower takes, before preprocessing.
#[derive(Clone)]
enum MediaInput {
    /// An image or frame, sized with `params`.
    Image {
        rgb: Arc<jemma_media::Rgb>,
        params: jemma_media::ImageParams,
    },
    /// A clip's 16 kHz mono samples.
    Audio(Arc<[f32]>),
}

impl MediaInput {
    /// Preprocessing: an image resized and rescaled ([`jemma_media::preprocess`]), a clip's features
    /// (`extractor`: the model's; None for a model that does not hear).
    ///
    /// Errors ([`EngineError::InvalidRequest`]): an image that cannot be sized, a clip for a model that
    /// does not hear.
    fn preprocess(
        &self,
        extractor: Option<&jemma_media::audio::FeatureExtractor>,
    ) -> Result<TowerInput> {
        match self {
            Self::Image { rgb, params } => jemma_media::preprocess(rgb, params)
                .map(TowerInput::Pixels)
                .map_err(|e| EngineError::InvalidRequest(e.to_string())),
            Self::Audio(samples) => extractor
                .map(|x| TowerInput::Audio(x.extract(samples)))
                .ok_or_else(|| EngineError::InvalidRequest("this model takes no audio".into())),
        }
    }
}

/// What a tower takes, preprocessed.
enum TowerInput {
    /// An image's or frame's pixels.
    Pixels(jemma_media::Pixels),
    /// A clip's features.
    Audio(jemma_media::audio::AudioFeatures),
}

/// Preprocessed results a sequence's media thread may hold ready ahead of the prefill (each an image's
/// pixels or a clip's features: a few MB at most).
const MEDIA_AHEAD: usize = 2;

/// A sequence's media, preprocessed in prompt order on a thread of its own while the model thread reads
/// the prompt before them, so that resizing an image or computing a clip's features (tens of ms each)
/// holds up neither the batch's decoding nor the towers (vLLM and text-generation-inference also prepare
/// inputs outside the engine loop). Results wait in a channel of [`MEDIA_AHEAD`]; the thread ends when
/// its work is done or the sequence drops its receiver.
struct MediaWorker {
    rx: std::sync::mpsc::Receiver<(usize, Result<TowerInput>)>,
    /// A result received past the one asked for, kept for its turn.
    ahead: Option<(usize, Result<TowerInput>)>,
}

impl MediaWorker {
    /// Starts preprocessing `work` (media run index, input), in that order; None when no thread could be
    /// started (the model thread then preprocesses).
    fn start(
        work: Vec<(usize, MediaInput)>,
        extractor: Option<Arc<jemma_media::audio::FeatureExtractor>>,
    ) -> Option<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(MEDIA_AHEAD);
        std::thread::Builder::new()
            .name("jemma-media".into())
            .spawn(move || {
                for (i, input) in work {
                    if tx
                        .send((i, input.preprocess(extractor.as_deref())))
                        .is_err()
                    {
                        return;
                    }
                }
            })
            .ok()?;
        Some(Self { rx, ahead: None })
    }

    /// The preprocessed input of media run `index`, waiting for it when it is not ready; results for
    /// earlier runs (since read from the prefix cache) are dropped. None when the thread has no result
    /// for it.
    fn take(&mut self, index: usize) -> Option<Result<TowerInput>> {
        loop {
            let (j, r) = match self.ahead.take() {
                Some(got) => got,
                None => self.rx.recv().ok()?,
            };
            match j.cmp(&index) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => return Some(r),
                std::cmp::Ordering::Greater => {
                    self.ahead = Some((j, r));
                    return None;
                }
            }
        }
    }
}

/// The audio placeholders of a model that hears (`config.json`'s `audio_token_id`, `boa_token_id`,
/// `eoa_token_id` or `eoa_token_index`), the most soft tokens a clip takes (`processor_config.json`'s
/// `audio_seq_length`) and its feature extractor (the `feature_extractor` settings there, else
/// `preprocessor_config.json`'s, else transformers' defaults).
pub struct AudioSpec {
    /// The placeholder token: one per soft token.
    pub audio_id: u32,
    /// Opens a clip.
    pub boa_id: u32,
    /// Closes a clip.
    pub eoa_id: u32,
    /// Soft tokens a clip takes at most (750: 30 s).
    pub max_tokens: usize,
    /// Gemma 4's audio feature extractor.
    pub extractor: Arc<jemma_media::audio::FeatureExtractor>,
}

impl std::fmt::Debug for AudioSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioSpec")
            .field("audio_id", &self.audio_id)
            .field("max_tokens", &self.max_tokens)
            .field("extractor", self.extractor.params())
            .finish()
    }
}

impl AudioSpec {
    /// Soft tokens `clip` takes ([`jemma_media::audio::FeatureExtractor::soft_tokens`]).
    pub fn soft_tokens(&self, clip: &jemma_media::audio::DecodedAudio) -> usize {
        self.extractor
            .soft_tokens(clip.samples.len(), self.max_tokens)
    }

    /// `clip` checked: heard whole (not longer than the extractor's `max_length`, which it would cut) and
    /// long enough for one soft token; its soft-token count.
    ///
    /// Errors: [`EngineError::InvalidRequest`] otherwise.
    pub fn check(&self, clip: &jemma_media::audio::DecodedAudio) -> Result<usize> {
        let max = self.extractor.params().max_length;
        let rate = jemma_media::audio::SAMPLE_RATE as f64;
        if clip.samples.len() > max {
            return Err(EngineError::InvalidRequest(format!(
                "an audio clip of {:.1} s: this model hears {:.0} s at once",
                clip.samples.len() as f64 / rate,
                max as f64 / rate
            )));
        }
        match self.soft_tokens(clip) {
            0 => Err(EngineError::InvalidRequest(
                "an audio clip too short to hear".into(),
            )),
            n => Ok(n),
        }
    }

    /// Reads the spec of the checkpoint in `dir`.
    ///
    /// Errors: an unreadable `config.json`; feature extractor settings that cannot work.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let (cfg, proc) = processor_files(dir)?;
        let id = |k: &str, default: u32| {
            cfg.get(k)
                .and_then(serde_json::Value::as_u64)
                .map_or(default, |v| v as u32)
        };
        let setting = |k: &str, default: usize| {
            proc.get(k)
                .and_then(serde_json::Value::as_u64)
                .map_or(default, |v| v as usize)
        };
        let fe = proc
            .get("feature_extractor")
            .cloned()
            .or_else(|| {
                read_json(dir, "preprocessor_config.json")
                    .filter(|p| p.get("feature_size").is_some())
            })
            .unwrap_or_else(|| serde_json::json!({}));
        let params: jemma_media::audio::FeatureParams = serde_json::from_value(fe)
            .map_err(|e| EngineError::InvalidModel(format!("audio feature extractor: {e}")))?;
        if params.sampling_rate != jemma_media::audio::SAMPLE_RATE
            || params.feature_size != crate::models::gemma4::audio::MEL_BINS
        {
            return Err(EngineError::InvalidModel(format!(
                "audio feature extractor at {} Hz with {} bins; the tower takes 16 kHz and 128",
                params.sampling_rate, params.feature_size
            )));
        }
        let extractor = jemma_media::audio::FeatureExtractor::new(params)
            .map(Arc::new)
            .map_err(|e| EngineError::InvalidModel(e.to_string()))?;
        Ok(Self {
            // mlx-vlm's defaults: the real Gemma 4 tokenizer's ids.
            audio_id: id("audio_token_id", 258_881),
            boa_id: id("boa_token_id", 256_000),
            // transformers' config calls it `eoa_token_index`.
            eoa_id: cfg
                .get("eoa_token_id")
                .or_else(|| cfg.get("eoa_token_index"))
                .and_then(serde_json::Value::as_u64)
                .map_or(258_883, |v| v as u32),
            max_tokens: setting("audio_seq_length", 750),
            extractor,
        })
    }
}

/// The activation dtype the engine uses by default on `device`: float32 on MLX's CPU backend (bf16 is
/// several times slower there), the checkpoint's own dtype on the GPU.
pub fn default_dtype(device: DeviceKind) -> Option<Dtype> {
    match device {
        DeviceKind::Cpu => Some(Dtype::Float32),
        DeviceKind::Gpu => None,
    }
}

impl ModelBundle {
    /// Loads a model directory. `dtype` None keeps the checkpoint's dtype (mlx-lm's behaviour).
    pub fn load(dir: &Path, dtype: Option<Dtype>) -> Result<Self> {
        Self::load_with_progress(dir, dtype, &mut |_| {})
    }

    /// [`ModelBundle::load`] with a progress callback (share of weight bytes read).
    pub fn load_with_progress(
        dir: &Path,
        dtype: Option<Dtype>,
        progress: &mut dyn FnMut(f32),
    ) -> Result<Self> {
        let (model, cfg, report) = gemma4::load_with_progress(dir, dtype, progress)?;
        let vision = load_tower(dir, Some(model.dtype()))?;
        let images = vision
            .as_ref()
            .map(|v| ImageSpec::from_model_dir(dir, v.config()))
            .transpose()?;
        let audio = crate::models::gemma4::audio::load_tower(dir, Some(model.dtype()))?;
        let audio_spec = audio
            .as_ref()
            .map(|_| AudioSpec::from_model_dir(dir))
            .transpose()?;
        let tokenizer = Tokenizer::from_model_dir(dir, &cfg.eos_token_ids)?;
        let template = ChatTemplate::from_model_dir(dir)
            .map_err(|e| EngineError::InvalidModel(format!("chat template: {e}")))?
            .map(|t| t.with_control_tokens(ControlTokens::new(tokenizer.special_texts())));
        Ok(Self {
            model,
            tokenizer,
            template,
            report,
            vision,
            images,
            audio,
            audio_spec,
            draft: None,
            tokenizer_json: dir.join("tokenizer.json"),
            vocabulary: std::sync::OnceLock::new(),
        })
    }

    /// The vocabulary as llguidance reads it, for constrained decoding: built from `tokenizer.json` on the
    /// first constrained request (~0.1 s for Gemma's 262,144 tokens), then kept.
    ///
    /// Errors: the tokenizer could not be read for it ([`EngineError::Constraint`]; every later call says the
    /// same).
    pub fn vocabulary(&self) -> Result<Arc<jemma_constrain::Vocabulary>> {
        self.vocabulary
            .get_or_init(|| {
                let text = std::fs::read_to_string(&self.tokenizer_json)
                    .map_err(|e| format!("{}: {e}", self.tokenizer_json.display()))?;
                let json: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| e.to_string())?;
                jemma_constrain::Vocabulary::from_tokenizer_json(
                    &json,
                    self.model.config().vocab_size,
                    &self.tokenizer.eos_ids,
                )
                .map(Arc::new)
                .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(EngineError::Constraint)
    }

    /// Context length in tokens.
    pub fn context_length(&self) -> usize {
        self.model.config().max_position_embeddings
    }

    /// Where a chat prompt `ids` is checkpointed while it is read, as (system, turn):
    /// - system: for a chat that opens with system (or developer) messages, how many leading tokens render
    ///   them: the prefix every conversation with the same system prompt (and tools) shares, found as
    ///   mlx_lm.server does, by rendering the system messages before an empty user turn;
    /// - turn: for a chat with thinking on that ends with a user or tool turn, how many leading tokens the
    ///   conversation fills without the generation prompt that asks for the answer (mlx_lm.server's "user"
    ///   segment, which it too saves only before a thinking tail): a checkpoint there serves the
    ///   conversation's next turn, whose history the template renders without the answer's thinking, and
    ///   a regenerated answer, once the sliding window has filled and the finished turn's cache can no
    ///   longer be cut back. Not without thinking: the next turn then continues the finished turn's own
    ///   cache, and the checkpoint would cost every request a copy of its cache (measured: warm TTFT 0.31 s
    ///   instead of ~0.2 s for a 4,588-token chat on the CPU).
    ///
    /// Each is None for other prompts, or when the rendering does not give a usable prefix of `ids`.
    pub fn checkpoints_of(&self, prompt: &Prompt, ids: &[u32]) -> (Option<usize>, Option<usize>) {
        let (
            Prompt::Chat {
                messages,
                tools,
                enable_thinking,
            },
            Some(template),
        ) = (prompt, self.template.as_ref())
        else {
            return (None, None);
        };
        let k = messages
            .iter()
            .take_while(|m| {
                matches!(
                    m.get("role").and_then(|r| r.as_str()),
                    Some("system" | "developer")
                )
            })
            .count();
        let system = (k > 0 && k < messages.len())
            .then(|| {
                let mut head = messages[..k].to_vec();
                head.push(serde_json::json!({"role": "user", "content": ""}));
                template
                    .render(&jemma_chat::template::RenderRequest {
                        messages: &head,
                        tools: tools.as_deref(),
                        add_generation_prompt: false,
                        enable_thinking: *enable_thinking,
                        extra: None,
                    })
                    .ok()
            })
            .flatten()
            .and_then(|text| self.checkpoint_len(&text, ids, false));
        let turn = (*enable_thinking == Some(true))
            .then(|| template.render_turns(messages, tools.as_deref(), *enable_thinking))
            .flatten()
            .and_then(|text| self.checkpoint_len(&text, ids, true));
        (system, turn)
    }

    /// How many leading tokens of `ids` the rendered `text` spells, as a checkpoint's length: None below
    /// [`MIN_CHECKPOINT_TOKENS`] (a chat header alone is not worth a checkpoint and a short prefill chunk),
    /// when no prompt token would follow it, or, with `whole`, when only part of `text` matches.
    fn checkpoint_len(&self, text: &str, ids: &[u32], whole: bool) -> Option<usize> {
        let head_ids = self.tokenizer.encode_prompt(text).ok()?;
        let n = jemma_serve::prefix::common_prefix_len(&head_ids, ids);
        ((!whole || n == head_ids.len()) && n >= MIN_CHECKPOINT_TOKENS && n + 1 < ids.len())
            .then_some(n)
    }

    /// How many leading tokens of the chat prompt `ids` the conversation itself fills, without the
    /// generation prompt that asks for the answer (mlx_lm.server's "user" segment): a checkpoint there
    /// serves the conversation's next turn even when the answer is not rendered back as it was generated
    /// (Gemma 4's template drops a turn's thinking from the history), and a regenerated answer, once the
    /// sliding window has filled and the finished turn's cache can no longer be cut back. None for a prompt
    /// that is not a chat ending with a user or tool turn, or where the rendering does not agree with
    /// `ids`.
    pub fn conversation_prefix_len(&self, prompt: &Prompt, ids: &[u32]) -> Option<usize> {
        let Prompt::Chat {
            messages,
            tools,
            enable_thinking,
        } = prompt
        else {
            return None;
        };
        let text =
            self.template
                .as_ref()?
                .render_turns(messages, tools.as_deref(), *enable_thinking)?;
        self.checkpoint_len(&text, ids, true)
    }

    /// Token ids of a prompt: chat messages through the model's template (which writes `<bos>`), text with
    /// a BOS prepended unless it starts with one, ids as given.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        Ok(match prompt {
            Prompt::Ids(ids) => ids.clone(),
            Prompt::Text(t) => {
                let bos = self.tokenizer.bos_token.as_deref();
                let mut ids = self.tokenizer.encode(t, false)?;
                if let Some(b) = bos.filter(|b| !t.starts_with(b))
                    && let Some(id) = self.tokenizer.token_id(b)
                {
                    ids.insert(0, id);
                }
                ids
            }
            Prompt::Chat {
                messages,
                tools,
                enable_thinking,
            } => {
                let text = self.render_chat(messages, tools.as_deref(), *enable_thinking)?;
                self.tokenizer.encode_prompt(&text)?
            }
        })
    }

    /// A chat rendered by the model's template, ready for the answer.
    ///
    /// Errors: no template ([`EngineError::InvalidRequest`]); the template's refusal of the messages (a
    /// client error) or its own failure ([`EngineError::InvalidModel`]).
    fn render_chat(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        enable_thinking: Option<bool>,
    ) -> Result<String> {
        let tpl = self
            .template
            .as_ref()
            .ok_or_else(|| EngineError::InvalidRequest(NO_CHAT_TEMPLATE.into()))?;
        tpl.render_for_generation(messages, tools, enable_thinking)
            .map_err(|e| {
                if e.is_client_error() {
                    EngineError::InvalidRequest(e.to_string())
                } else {
                    EngineError::InvalidModel(format!("chat template: {e}"))
                }
            })
    }
}

/// A placeholder run found in a prompt: where, how long, and which medium it is.
enum Run {
    /// The `i`-th image.
    Image(usize),
    /// The `i`-th audio clip.
    Audio(usize),
}

impl ModelBundle {
    /// Runs of `id` in `ids`: one token each, or, for a prompt of expanded ids (`pre`), whole runs.
    fn runs(ids: &[u32], id: u32, pre: bool) -> Vec<(usize, usize)> {
        let mut runs = vec![];
        let mut i = 0;
        while i < ids.len() {
            if ids[i] == id {
                let s = i;
                i += 1;
                while pre && i < ids.len() && ids[i] == id {
                    i += 1;
                }
                runs.push((s, i - s));
            } else {
                i += 1;
            }
        }
        runs
    }

    /// The placeholder runs of `prompt`'s `ids` for `images` and `audio`, in prompt order, checked against
    /// what the model can take.
    ///
    /// Errors ([`EngineError::InvalidRequest`]): media of a kind the model has no tower for; placeholders
    /// and media that do not pair up.
    fn media_runs(
        &self,
        prompt: &Prompt,
        ids: &[u32],
        images: usize,
        audio: usize,
    ) -> Result<Vec<(usize, usize, Run)>> {
        let bad = |m: String| EngineError::InvalidRequest(m);
        let pre = matches!(prompt, Prompt::Ids(_));
        let mut runs = vec![];
        for (n, spec_id, what, tower) in [
            (
                images,
                self.images
                    .as_ref()
                    .filter(|_| self.vision.is_some())
                    .map(|s| s.image_id),
                "image",
                "vision tower: it cannot see images",
            ),
            (
                audio,
                self.audio_spec
                    .as_ref()
                    .filter(|_| self.audio.is_some())
                    .map(|s| s.audio_id),
                "audio",
                "audio tower: it cannot hear audio",
            ),
        ] {
            // A text-only prompt that spells a placeholder reads it as the token it is.
            if n == 0 {
                continue;
            }
            let Some(id) = spec_id else {
                return Err(bad(format!(
                    "this model has no {tower} (serve a Gemma 4 checkpoint with one; /v1/models lists each \
                     tier's input_modalities)"
                )));
            };
            let found = Self::runs(ids, id, pre);
            if found.len() != n {
                return Err(bad(format!(
                    "the prompt has {} {what} placeholder(s) for {n} {what} input(s) (the model's chat template \
                     shows no media in system messages)",
                    found.len()
                )));
            }
            runs.extend(found.into_iter().enumerate().map(|(i, (s, len))| {
                let run = if what == "image" {
                    Run::Image(i)
                } else {
                    Run::Audio(i)
                };
                (s, len, run)
            }));
        }
        runs.sort_by_key(|r| r.0);
        Ok(runs)
    }

    /// The prompt as text (a chat rendered by its template; a text prompt with the BOS token `prompt_ids`
    /// adds). None for [`Prompt::Ids`].
    fn prompt_text(&self, prompt: &Prompt) -> Result<Option<String>> {
        Ok(match prompt {
            Prompt::Ids(_) => None,
            Prompt::Text(t) => Some(match self.tokenizer.bos_token.as_deref() {
                Some(b) if !t.starts_with(b) && self.tokenizer.token_id(b).is_some() => {
                    format!("{b}{t}")
                }
                _ => t.clone(),
            }),
            Prompt::Chat {
                messages,
                tools,
                enable_thinking,
            } => Some(self.render_chat(messages, tools.as_deref(), *enable_thinking)?),
        })
    }

    /// The prompt's ids with each `<|video|>` expanded in its text, as Gemma 4's processor expands it
    /// before tokenizing: per frame `"mm:ss <|image>"`, one video token per soft token, `"<image|>"`, the
    /// frames joined by spaces. Returns the ids and, per video, its frames' soft-token counts.
    ///
    /// Errors ([`EngineError::InvalidRequest`]): a model that cannot see video; a prompt of ids; placeholders
    /// and videos that do not pair up; a frame that cannot be sized.
    fn ids_with_videos(
        &self,
        prompt: &Prompt,
        videos: &[jemma_media::video::DecodedVideo],
    ) -> Result<(Vec<u32>, Vec<Vec<usize>>)> {
        let bad = |m: String| EngineError::InvalidRequest(m);
        let spec = self
            .images
            .as_ref()
            .filter(|_| self.vision.is_some())
            .ok_or_else(|| bad("this model has no vision tower: it cannot see video".into()))?;
        let vid = spec
            .video_id
            .ok_or_else(|| bad("this model names no video token: it cannot see video".into()))?;
        let Some(text) = self.prompt_text(prompt)? else {
            return Err(bad(
                "videos need a chat or text prompt (their frames are stamped with their times in text)"
                    .into(),
            ));
        };
        // The placeholder strings, as this tokenizer spells the ids.
        let spelled =
            |s: &str, id: u32| (self.tokenizer.token_id(s) == Some(id)).then(|| s.to_string());
        let (Some(video), Some(boi), Some(eoi)) = (
            spelled("<|video|>", vid),
            spelled("<|image>", spec.boi_id),
            spelled("<image|>", spec.eoi_id),
        ) else {
            return Err(EngineError::InvalidModel(
                "the tokenizer does not spell the video placeholders <|video|>, <|image>, <image|>"
                    .into(),
            ));
        };
        let parts: Vec<&str> = text.split(video.as_str()).collect();
        if parts.len() - 1 != videos.len() {
            return Err(bad(format!(
                "the prompt has {} video placeholder(s) for {} video(s) (the model's chat template shows \
                 no media in system messages)",
                parts.len() - 1,
                videos.len()
            )));
        }
        let mut expanded = String::with_capacity(text.len());
        let mut counts = vec![];
        for (k, part) in parts.iter().enumerate() {
            expanded.push_str(part);
            let Some(v) = videos.get(k) else { break };
            let mut frames = vec![];
            for (j, f) in v.frames.iter().enumerate() {
                let n = jemma_media::soft_tokens(
                    f.image.rgb.height,
                    f.image.rgb.width,
                    &spec.video_params,
                )
                .map_err(|e| bad(e.to_string()))?;
                if j > 0 {
                    expanded.push(' ');
                }
                expanded.push_str(&jemma_media::video::timestamp(f.seconds));
                expanded.push(' ');
                expanded.push_str(&boi);
                expanded.push_str(&video.repeat(n));
                expanded.push_str(&eoi);
                frames.push(n);
            }
            counts.push(frames);
        }
        // A chat's text may hold the guard's cuts; a raw prompt is read whole, as given.
        let ids = match prompt {
            Prompt::Chat { .. } => self.tokenizer.encode_prompt(&expanded)?,
            _ => self.tokenizer.encode(&expanded, false)?,
        };
        Ok((ids, counts))
    }

    /// The prompt's token ids with its images, audio and videos in place: for a chat or text prompt each
    /// `<|image|>` placeholder becomes `<|image>`, one image token per soft token, `<image|>`; each
    /// `<|audio|>` becomes `<|audio>`, one audio token per soft token, `<audio|>` (the processor's
    /// expansion); each `<|video|>` becomes its frames ([`ModelBundle::ids_with_videos`]) and then, for a
    /// model that hears, its audio track as a clip (`<|audio>`, its soft tokens, `<audio|>`). For
    /// [`Prompt::Ids`] each run of image or audio tokens must already have its medium's length (videos
    /// need text). Images and frames are preprocessed for the vision tower, audio turned into the audio
    /// tower's features.
    ///
    /// Errors ([`EngineError::InvalidRequest`]): media for a model without the tower to take them;
    /// placeholders and media that do not pair up; an image that cannot be sized; a clip too long or short.
    pub fn prompt_with_media(
        &self,
        prompt: &Prompt,
        images: &[jemma_media::DecodedImage],
        audio: &[jemma_media::audio::DecodedAudio],
        videos: &[jemma_media::video::DecodedVideo],
    ) -> Result<(Vec<u32>, Vec<PromptImage>, Vec<PromptAudio>)> {
        let (ids, placed) = self.place_media(prompt, images, audio, videos)?;
        let extractor = self.audio_spec.as_ref().map(|a| &*a.extractor);
        let (mut placed_images, mut placed_audio) = (vec![], vec![]);
        for p in placed {
            match p.input.preprocess(extractor)? {
                TowerInput::Pixels(pixels) => placed_images.push(PromptImage {
                    start: p.start,
                    pixels,
                    digest: p.digest,
                }),
                TowerInput::Audio(features) => placed_audio.push(PromptAudio {
                    start: p.start,
                    soft_tokens: p.len,
                    features,
                    digest: p.digest,
                }),
            }
        }
        Ok((ids, placed_images, placed_audio))
    }

    /// The soft tokens of a placed image, frame or clip (1, `len`, hidden): preprocessing and its tower.
    ///
    /// Errors: a model without the tower ([`EngineError::InvalidRequest`]), an image that cannot be
    /// sized, an MLX failure.
    fn encode(&self, placed: &Placement) -> Result<mlx_rs::Array> {
        let extractor = self.audio_spec.as_ref().map(|a| &*a.extractor);
        self.encode_input(placed, placed.input.preprocess(extractor)?)
    }

    /// The soft tokens of a placed image, frame or clip whose input is preprocessed already (see
    /// [`MediaWorker`]).
    ///
    /// Errors: a model without the tower ([`EngineError::InvalidRequest`]), an MLX failure.
    fn encode_input(&self, placed: &Placement, input: TowerInput) -> Result<mlx_rs::Array> {
        let bad = |m: &str| EngineError::InvalidRequest(m.into());
        match input {
            TowerInput::Pixels(pixels) => self
                .vision
                .as_ref()
                .ok_or_else(|| bad("this model takes no images"))?
                .encode_pixels(&pixels),
            TowerInput::Audio(features) => self
                .audio
                .as_ref()
                .ok_or_else(|| bad("this model takes no audio"))?
                .encode_features(&features, placed.len),
        }
    }

    /// The prompt's ids with its media in place, and each image, frame and clip's place and input (not
    /// yet preprocessed: see [`ModelBundle::encode`]), in prompt order.
    ///
    /// Errors: as [`ModelBundle::prompt_with_media`].
    fn place_media(
        &self,
        prompt: &Prompt,
        images: &[jemma_media::DecodedImage],
        audio: &[jemma_media::audio::DecodedAudio],
        videos: &[jemma_media::video::DecodedVideo],
    ) -> Result<(Vec<u32>, Vec<Placement>)> {
        let (ids, frame_counts) = if videos.is_empty() {
            (self.prompt_ids(prompt)?, vec![])
        } else {
            self.ids_with_videos(prompt, videos)?
        };
        if images.is_empty() && audio.is_empty() && videos.is_empty() {
            return Ok((ids, vec![]));
        }
        let bad = |m: String| EngineError::InvalidRequest(m);
        let pre = matches!(prompt, Prompt::Ids(_));
        // What happens where in `ids`: placeholder runs to expand, video frame runs to place as they are,
        // video audio tracks to insert after a video's last frame.
        enum At {
            Run(usize, Run),
            Frame(usize),
            Track,
        }
        let mut events: Vec<(usize, At)> = self
            .media_runs(prompt, &ids, images.len(), audio.len())?
            .into_iter()
            .map(|(s, n, r)| (s, At::Run(n, r)))
            .collect();
        if !videos.is_empty() {
            let vid = self
                .images
                .as_ref()
                .and_then(|s| s.video_id)
                .ok_or_else(|| bad("this model takes no video".into()))?;
            let mut runs = ModelBundle::runs(&ids, vid, true).into_iter();
            for (v, counts) in videos.iter().zip(&frame_counts) {
                for (j, &n) in counts.iter().enumerate() {
                    let (s, len) = runs
                        .next()
                        .filter(|&(_, len)| len == n)
                        .ok_or_else(|| bad("the prompt spells a video token of its own".into()))?;
                    events.push((s, At::Frame(len)));
                    if j + 1 == counts.len() && v.audio.is_some() && self.audio.is_some() {
                        // After the frame's <image|>.
                        events.push((s + len + 1, At::Track));
                    }
                }
            }
        }
        events.sort_by_key(|(s, e)| (*s, !matches!(e, At::Track)));
        let mut out = Vec::with_capacity(ids.len());
        let mut placed = vec![];
        let (mut frames, mut tracks) = (
            videos.iter().flat_map(|v| v.frames.iter()),
            videos.iter().filter_map(|v| v.audio.as_ref()),
        );
        let mut at = 0;
        for (s, event) in events {
            out.extend_from_slice(&ids[at..s]);
            at = s;
            match event {
                At::Frame(len) => {
                    let f = frames.next().ok_or_else(|| {
                        EngineError::Internal("more video frames placed than sampled".into())
                    })?;
                    let spec = self
                        .images
                        .as_ref()
                        .ok_or_else(|| bad("this model takes no images".into()))?;
                    placed.push(Placement {
                        start: out.len(),
                        len,
                        digest: f.image.digest,
                        input: MediaInput::Image {
                            rgb: f.image.rgb.clone(),
                            params: spec.video_params,
                        },
                    });
                    out.extend_from_slice(&ids[s..s + len]);
                    at = s + len;
                }
                At::Track => {
                    let clip = tracks.next().ok_or_else(|| {
                        EngineError::Internal("more video sound tracks placed than decoded".into())
                    })?;
                    let a = self
                        .audio_spec
                        .as_ref()
                        .ok_or_else(|| bad("this model takes no audio".into()))?;
                    let t = a.check(clip)?;
                    out.push(a.boa_id);
                    placed.push(Placement {
                        start: out.len(),
                        len: t,
                        digest: clip.digest,
                        input: MediaInput::Audio(clip.samples.clone()),
                    });
                    out.extend(std::iter::repeat_n(a.audio_id, t));
                    out.push(a.eoa_id);
                }
                At::Run(n, run) => {
                    at = s + n;
                    let (open, id, close, tokens) = match run {
                        Run::Image(i) => {
                            let spec = self
                                .images
                                .as_ref()
                                .ok_or_else(|| bad("this model takes no images".into()))?;
                            let img = &images[i];
                            let params = spec.params_for(img);
                            let t =
                                jemma_media::soft_tokens(img.rgb.height, img.rgb.width, &params)
                                    .map_err(|e| bad(e.to_string()))?;
                            placed.push(Placement {
                                start: out.len() + usize::from(!pre),
                                len: t,
                                digest: img.digest,
                                input: MediaInput::Image {
                                    rgb: img.rgb.clone(),
                                    params,
                                },
                            });
                            (spec.boi_id, spec.image_id, spec.eoi_id, t)
                        }
                        Run::Audio(i) => {
                            let spec = self
                                .audio_spec
                                .as_ref()
                                .ok_or_else(|| bad("this model takes no audio".into()))?;
                            let clip = &audio[i];
                            let t = spec.check(clip)?;
                            placed.push(Placement {
                                start: out.len() + usize::from(!pre),
                                len: t,
                                digest: clip.digest,
                                input: MediaInput::Audio(clip.samples.clone()),
                            });
                            (spec.boa_id, spec.audio_id, spec.eoa_id, t)
                        }
                    };
                    if pre && n != tokens {
                        return Err(bad(format!(
                            "a placeholder run of {n} tokens for media of {tokens} soft tokens"
                        )));
                    }
                    if pre {
                        out.extend(std::iter::repeat_n(id, tokens));
                    } else {
                        out.push(open);
                        out.extend(std::iter::repeat_n(id, tokens));
                        out.push(close);
                    }
                }
            }
        }
        out.extend_from_slice(&ids[at..]);
        Ok((out, placed))
    }

    /// How many tokens `prompt` takes with `images`, `audio` and `videos` in place (without preprocessing
    /// them).
    ///
    /// Errors: as [`ModelBundle::prompt_with_media`].
    pub fn count_with_media(
        &self,
        prompt: &Prompt,
        images: &[jemma_media::DecodedImage],
        audio: &[jemma_media::audio::DecodedAudio],
        videos: &[jemma_media::video::DecodedVideo],
    ) -> Result<usize> {
        Ok(self.place_media(prompt, images, audio, videos)?.0.len())
    }
}

/// The generations of the sequences at `rows` (indices into `batch`), in batch order.
fn generations<'a>(batch: &'a mut [&mut MlxSequence], rows: &[usize]) -> Vec<&'a mut Generation> {
    (batch.iter_mut().enumerate())
        .filter(|(i, _)| rows.contains(i))
        .map(|(_, s)| &mut s.generation)
        .collect()
}

/// Ends the sequences at `rows` with `e`, a failure of a forward that read them all: their caches are in
/// an unknown state, so none is kept.
fn fail_rows(
    batch: &mut [&mut MlxSequence],
    out: &mut [SeqOutput<Summary>],
    rows: &[usize],
    e: EngineError,
) {
    let failure = EngineFailure::from(e);
    for &i in rows {
        batch[i].poisoned = true;
        out[i].fail(failure.clone());
    }
}

/// Fewest tokens a checkpoint (the end of a system prompt or of a user turn) holds.
const MIN_CHECKPOINT_TOKENS: usize = 8;

/// Fewest tokens a new prompt must gain by waiting a step for a checkpoint that a prompt read before it is
/// about to take ([`waits_for_shared_read`]): any checkpoint worth taking. Starting from one costs nothing
/// here (a copy shares the arrays until written), unlike llama.cpp's stream copies.
const MIN_WAIT_GAIN: usize = MIN_CHECKPOINT_TOKENS;

/// Most caches the MLX prefix cache keeps (mlx_lm.server's `--prompt-cache-size` default).
pub const PREFIX_CACHE_ENTRIES: usize = 10;

/// The MLX engine as the serving core drives it: Gemma 4 on mlx-rs, up to `max_sequences` requests decoded
/// together.
struct MlxRunner {
    config: EngineConfig,
    device: DeviceKind,
    dtype: Option<Dtype>,
    /// The prefix cache (the serving core's [`PrefixPool`]): finished requests' caches, which the next
    /// turn of a conversation continues (it resends everything: only what is new is read), and copies
    /// taken at the end of chat system prompts, which new conversations with the same system prompt start
    /// from (mlx_lm.server's "system" entries).
    pool: PrefixPool<PoolCache>,
    /// Bytes the pool and the running requests' caches may hold together.
    kv_budget: u64,
    /// Sequences decoded together: `max_sequences`, or fewer when the memory budget refused that many
    /// caches ([`ModelRunner::shrink`]).
    sequences: usize,
    /// What the running requests' caches hold (as of each one's last step).
    live_bytes: u64,
    /// The most sequences decoded in one forward since the model loaded.
    largest_batch: usize,
    /// The most sequences verified in one forward since the model loaded.
    largest_verify: usize,
    /// The most prompts read in one forward since the model loaded.
    largest_prefill: usize,
    /// What speculative decoding did since the model loaded.
    speculated: SpeculativeStats,
}

impl MlxRunner {
    /// Before `seq` reads any of its prompt: starts it from the pool's longest entry for its prompt when
    /// that holds more than it started from. Requests admitted together all missed the prefix cache; one
    /// read before this may since have checkpointed the system prompt they share, which this one then
    /// reads no more.
    fn adopt_pooled(&mut self, seq: &mut MlxSequence) {
        let (kv, keys) = (seq.kv, seq.generation.cache_keys());
        let fits = |c: &PoolCache| c.kv == kv;
        let cut = |c: &PoolCache, keep: usize| c.cut_to(keep);
        let start = seq.generation.reused();
        if self
            .pool
            .peek_nearest(keys, fits, cut)
            .is_none_or(|n| n <= start)
        {
            return;
        }
        let Some(hit) = self.pool.take_nearest(keys, fits, cut) else {
            return;
        };
        let mut entry = hit.cache;
        if hit.excess != 0 && !entry.cut(hit.reused) {
            return;
        }
        let PoolCache {
            cache,
            draft,
            rollback,
            ..
        } = entry;
        match seq.generation.adopt_cached(cache, hit.reused) {
            Ok(()) => {
                seq.adopt_draft(draft);
                seq.inherited = PoolCache::inherited(rollback, hit.reused);
            }
            Err(cache) => {
                // Refused (a cut inside an image): an entry the take moved out goes back.
                let tokens = seq.generation.cache_keys()[..hit.reused].to_vec();
                let entry = PoolCache {
                    cache,
                    kv: seq.kv,
                    draft,
                    rollback: PoolCache::inherited(rollback, hit.reused),
                };
                let bytes = entry.nbytes();
                self.pool.insert(tokens, entry, bytes, EntryKind::Owned);
            }
        }
    }

    /// Bytes of the draft model, when speculative decoding is configured: its weights and a cache at the
    /// served context for each sequence that may speculate at once.
    /// The draft of `sp` for the loaded `target`, checked against it. Errors: why it cannot draft,
    /// naming it.
    fn load_draft(
        &self,
        sp: &SpeculativeSettings,
        target: &ModelBundle,
    ) -> std::result::Result<Draft, String> {
        let named =
            |e: &dyn std::fmt::Display| format!("draft model {}: {e}", sp.draft_model.display());
        if AssistantConfig::is_assistant(&sp.draft_model) {
            let d = Gemma4Assistant::load(&sp.draft_model, self.dtype)
                .and_then(|d| d.check_target(&target.model).map(|()| d))
                .map_err(|e| named(&e))?;
            tracing::info!(draft = %sp.draft_model.display(), "MTP assistant drafter loaded");
            return Ok(Draft::Assistant(d));
        }
        let d = ModelBundle::load(&sp.draft_model, self.dtype).map_err(|e| named(&e))?;
        crate::speculative::check_draft_vocabulary(&target.tokenizer, &d.tokenizer).map_err(
            |e| {
                named(&format!(
                    "{e}; use a model with the same tokenizer (E2B for E4B)"
                ))
            },
        )?;
        let (a, b) = (
            target.model.config().vocab_size,
            d.model.config().vocab_size,
        );
        if a != b {
            // Same tokens but padded embeddings: the laws would not line up.
            return Err(named(&format!(
                "its vocabulary has {b} entries, the target's {a}"
            )));
        }
        tracing::info!(draft = %sp.draft_model.display(), "draft model loaded");
        Ok(Draft::Model(d.model))
    }

    fn draft_bytes(&self) -> std::result::Result<u64, LoadError> {
        let Some(sp) = &self.config.speculative else {
            return Ok(0);
        };
        match self.draft_bytes_of(sp) {
            Err(e) if sp.optional => {
                // Found, not configured: the load will try it and do without it if it fails.
                tracing::warn!(error = %e, "sizing the drafter found next to the model");
                Ok(0)
            }
            r => r,
        }
    }

    fn draft_bytes_of(&self, sp: &SpeculativeSettings) -> std::result::Result<u64, LoadError> {
        if AssistantConfig::is_assistant(&sp.draft_model) {
            return crate::footprint::assistant_bytes(
                &sp.draft_model,
                self.dtype.map(crate::footprint::dtype_bytes),
            )
            .map_err(|e| {
                LoadError::Failed(format!("draft model {}: {e}", sp.draft_model.display()))
            });
        }
        let fp = crate::footprint::estimate(
            &sp.draft_model,
            self.dtype.map(crate::footprint::dtype_bytes),
            self.config.context_length,
            crate::generate::DEFAULT_PREFILL_STEP,
            Some(crate::generate::DEFAULT_ATTENTION_BUDGET),
        )
        .map_err(|e| LoadError::Failed(format!("draft model {}: {e}", sp.draft_model.display())))?;
        let seqs = sp
            .config
            .max_batch
            .clamp(1, self.config.max_sequences.max(1));
        Ok(fp.weights_bytes + fp.kv_cache_bytes * seqs as u64)
    }
}

impl MlxRunner {
    /// Counts a finished speculative round in the sequence's controller and the engine's figures, then
    /// hands its tokens on; a failure ends the sequence.
    fn round_done(
        &mut self,
        model: &ModelBundle,
        seq: &mut MlxSequence,
        round: crate::generate::Round,
        out: &mut SeqOutput<Summary>,
    ) {
        if let Some(sp) = &mut seq.spec {
            sp.controller.record_round(
                round.drafted,
                round.accepted,
                round.draft_time,
                round.verify_time,
            );
            sp.after_round = true;
            self.speculated
                .add(&SpeculativeStats::round(round.drafted, round.accepted));
        }
        if let Err(e) = seq.emit_round(model, round.steps, out) {
            seq.poisoned = true;
            out.fail(EngineFailure::from(e));
        }
    }
}

impl ModelRunner for MlxRunner {
    type Model = ModelBundle;
    type Request = Request;
    type Summary = Summary;
    type Info = MlxInfo;
    type Sequence = MlxSequence;

    fn init(&mut self) {
        mlx_rs::Device::set_default(&self.device.device());
    }

    fn plan(&mut self, info: &mut MlxInfo) -> std::result::Result<Option<u64>, LoadError> {
        let fp = crate::footprint::estimate(
            &self.config.model_dir,
            self.dtype.map(crate::footprint::dtype_bytes),
            self.config.context_length,
            crate::generate::DEFAULT_PREFILL_STEP,
            Some(crate::generate::DEFAULT_ATTENTION_BUDGET),
        )
        .map_err(|e| LoadError::Failed(e.to_string()))?
        .for_sequences(self.config.max_sequences)
        .with_draft(self.draft_bytes()?);
        self.sequences = fp.sequences;
        info.footprint = Some(fp);
        self.kv_budget = self.config.prefix_cache_bytes.unwrap_or(fp.kv_cache_bytes);
        // The process's own overhead is already in use; only the model's memory is new.
        Ok(Some(fp.device_bytes()))
    }

    fn load(
        &mut self,
        progress: &Progress,
        info: &mut MlxInfo,
    ) -> std::result::Result<(ModelBundle, usize), LoadError> {
        let l = ModelBundle::load_with_progress(&self.config.model_dir, self.dtype, &mut |p| {
            progress(p)
        })
        .map_err(|e| match e {
            EngineError::InsufficientMemory(_) => LoadError::Refused(e.to_string()),
            e => LoadError::Failed(e.to_string()),
        })?;
        tracing::info!(tensors = l.report.tensors, dtype = %l.report.dtype, "MLX model loaded");
        let mut l = l;
        if let Some(sp) = &self.config.speculative {
            match self.load_draft(sp, &l) {
                Ok(d) => {
                    l.draft = Some(d);
                    info.speculative.get_or_insert_with(|| {
                        SpeculativeInfo::new(sp.draft_model.clone(), drafter_kind(&sp.draft_model))
                    });
                }
                Err(e) if sp.optional => {
                    tracing::warn!(error = %e, "serving without the drafter found next to the model");
                    info.speculative = None;
                }
                Err(e) => return Err(LoadError::Failed(e)),
            }
        }
        info.load = Some(l.report.clone());
        let ctx = self
            .config
            .context_length
            .map_or(l.context_length(), |c| c.min(l.context_length()));
        Ok((l, ctx))
    }

    fn shrink(&mut self, info: &mut MlxInfo) -> Option<u64> {
        let fp = info.footprint?;
        if fp.sequences <= 1 {
            return None;
        }
        let fp = fp.for_sequences(fp.sequences / 2);
        self.sequences = fp.sequences;
        // The draft's share stays as planned (its weights and the caches of the sequences that speculate).
        self.kv_budget = self.config.prefix_cache_bytes.unwrap_or(fp.kv_cache_bytes);
        info.footprint = Some(fp);
        Some(fp.device_bytes())
    }

    fn max_sequences(&self, _: &ModelBundle) -> usize {
        self.sequences
    }

    fn admit(
        &mut self,
        model: &mut ModelBundle,
        request: Request,
        context_length: usize,
    ) -> std::result::Result<MlxSequence, EngineFailure> {
        let mut seq = MlxSequence::new(model, request, context_length, &mut self.pool)?;
        if self.kv_budget == 0 {
            seq.generation.without_rollback_points();
        }
        if let Some(sp) = &self.config.speculative
            && model.draft.is_some()
        {
            // A seeded request samples plainly: speculation draws other random numbers, and a seed
            // promises the same tokens alone or batched.
            let sampling = &seq.generation.options().sampling;
            if sampling.temperature == 0.0 || sampling.seed.is_none() {
                // The assistant drafter reads the hidden state each step ends on.
                seq.generation
                    .keep_hidden(matches!(model.draft, Some(Draft::Assistant(_))));
                seq.spec = Some(SeqSpec {
                    controller: Controller::new(sp.config.clone()),
                    // The draft model's cache of the conversation this request continues, when the
                    // prefix cache kept one.
                    draft: match seq.draft_hit.take() {
                        Some((cache, fed)) => DraftState::resume(cache, fed),
                        None => DraftState::default(),
                    },
                    rng: StdRng::from_os_rng(),
                    after_round: false,
                });
            }
        }
        Ok(seq)
    }

    fn prompt_tokens(
        &mut self,
        model: &mut ModelBundle,
        request: &Request,
    ) -> std::result::Result<usize, EngineFailure> {
        model
            .count_with_media(
                &request.prompt,
                &request.images,
                &request.audio,
                &request.videos,
            )
            .map_err(Into::into)
    }

    fn step(
        &mut self,
        model: &mut ModelBundle,
        batch: &mut [&mut MlxSequence],
        out: &mut [SeqOutput<Summary>],
    ) -> std::result::Result<(), EngineFailure> {
        // Prompt chunks, oldest sequence first, up to one prefill step of tokens in all (the first always
        // runs, so a long prompt progresses): a burst of short prompts is read in one packed forward (one
        // pass over the weights, not one each, as llama-server and vLLM read a step's prompts), a long one a
        // chunk a step, and the running streams wait for at most one step's chunk. A chunk's images and
        // clips count twice: their soft tokens are read like any, and their towers run this step too
        // (encoded with the chunk that reads them), which would otherwise stall the running streams
        // beyond the budget.
        let mut planned: Vec<usize> = vec![];
        let mut budget: Option<usize> = None;
        for i in 0..batch.len() {
            if batch[i].poisoned || batch[i].generation.prefilled_all() {
                continue;
            }
            if batch[i].generation.unread() {
                self.adopt_pooled(&mut *batch[i]);
                // A prompt that shares a checkpointed preamble with a prompt read before it this step
                // waits until that checkpoint is in the pool and starts from it (the core's
                // `waits_for_shared_read`): requests sent together with one system prompt read it once.
                let s = &*batch[i];
                let keys = s.generation.cache_keys();
                let ahead = (planned.iter())
                    .filter(|&&j| batch[j].kv == s.kv)
                    .flat_map(|&j| {
                        let other = batch[j].generation.cache_keys();
                        let common = common_prefix_len(other, keys);
                        (batch[j].generation.pending_checkpoints().iter())
                            .copied()
                            .filter(move |&c| c <= common && c < keys.len())
                    })
                    .max()
                    .unwrap_or(0);
                if self.kv_budget > 0
                    && waits_for_shared_read(s.generation.reused(), ahead, MIN_WAIT_GAIN)
                {
                    continue;
                }
            }
            // Once a chunk does not fit, it is cut to what is left, unless that is too little to be worth
            // a read or the cut would fall in an image (the core's `prompt_read`); then only those with
            // nothing left to read but their first step (which costs no prompt tokens) join this step.
            let g = &mut batch[i].generation;
            g.cap_next_chunk(None);
            let cost = |g: &Generation| {
                g.next_chunk(&model.model) + g.media_tokens_to_encode(&model.model)
            };
            let n = cost(g);
            let left = budget.get_or_insert(g.options().prefill_step.max(1));
            let take = prompt_read(n, *left, planned.is_empty(), true);
            if take < n {
                if take > 0 {
                    g.cap_next_chunk(Some(take));
                    // The cut may stop short of an image (a chunk never cuts one): then it must still
                    // be worth a read, and a rollback point.
                    let (cut, read) = (cost(g), g.next_chunk(&model.model));
                    if cut <= *left && read >= MIN_CUT_READ {
                        planned.push(i);
                    } else {
                        g.cap_next_chunk(None);
                    }
                }
                *left = 0;
                continue;
            }
            *left = left.saturating_sub(n);
            planned.push(i);
        }
        // A tower that fails leaves the cache as sound as it was: the request fails, and what it read is
        // kept for the next one. A chunk holding an image or clip is read alone.
        let mut text = Vec::with_capacity(planned.len());
        for &i in &planned {
            let seq = &mut *batch[i];
            let read = match seq.encode_media(model) {
                Err(e) => Err((e, false)),
                Ok(()) if seq.generation.next_chunk_has_media(&model.model) => {
                    seq.generation.prefill(&model.model).map_err(|e| (e, true))
                }
                Ok(()) => {
                    text.push(i);
                    continue;
                }
            };
            if let Err((e, poisoned)) = read {
                seq.poisoned = poisoned;
                out[i].fail(EngineFailure::from(e));
            }
        }
        if !text.is_empty() {
            let read = Generation::prefill_batch(&model.model, &mut generations(batch, &text));
            match read {
                Ok(report) => {
                    self.largest_prefill = self.largest_prefill.max(report.packed);
                    for (k, e) in report.failed {
                        let i = text[k];
                        batch[i].poisoned = true;
                        out[i].fail(EngineFailure::from(e));
                    }
                }
                // One forward read them all: none of their caches can be trusted.
                Err(e) => fail_rows(batch, out, &text, e),
            }
        }
        for &i in &planned {
            let seq = &mut *batch[i];
            if seq.poisoned {
                continue;
            }
            for (cache, tokens) in seq.generation.take_checkpoints() {
                let bytes = cache.nbytes() as u64;
                let kind = if Some(tokens.len()) == seq.turn_end {
                    EntryKind::Turn
                } else {
                    EntryKind::Shared
                };
                let entry = PoolCache::target(cache, seq.kv);
                self.pool.insert(tokens, entry, bytes, kind);
            }
        }
        // Keep the prefix cache inside what the running requests leave of the budget (those sitting this
        // step out count with what they held at their last one).
        for s in batch.iter_mut() {
            let now = s.cache_bytes();
            self.live_bytes = (self.live_bytes + now).saturating_sub(s.bytes);
            s.bytes = now;
        }
        self.pool
            .evict_to(self.kv_budget.saturating_sub(self.live_bytes));
        // Every sequence whose prompt is read decodes its next token, together.
        let ready: Vec<usize> = (0..batch.len())
            .filter(|&i| !batch[i].poisoned && batch[i].generation.prefilled_all())
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        // Speculative decoding for the sequences whose controller asks for drafts now (single streams by
        // default: a batch already reads the weights once for several tokens); the others decode plainly.
        // They draft together (one pass of the drafter per draft step), and their drafts are verified
        // together in one forward of the target.
        let mut ready = ready;
        let decoding = ready.len();
        if let Some(draft) = &model.draft {
            let n = ready.len();
            let mut plain = Vec::with_capacity(n);
            let mut wants = Vec::with_capacity(n);
            for i in ready {
                let seq = &mut *batch[i];
                let k = match &mut seq.spec {
                    Some(sp) if seq.generation.can_speculate() => {
                        sp.controller.next_k(n, seq.generation.room())
                    }
                    _ => 0,
                };
                if k == 0 {
                    plain.push(i);
                } else {
                    wants.push((i, k));
                }
            }
            // The drafter drafts for every speculating sequence at once: one pass of its weights per
            // draft step.
            let starts: Vec<(usize, Result<RoundStart>)> = {
                let (mut rows, mut states) = (vec![], vec![]);
                let mut wanted = wants.iter().peekable();
                for (i, s) in batch.iter_mut().enumerate() {
                    let Some(&(_, k)) = wanted.next_if(|(j, _)| *j == i) else {
                        continue;
                    };
                    let s = &mut **s;
                    if let Some(sp) = s.spec.as_mut() {
                        rows.push((&mut s.generation, k));
                        states.push(&mut sp.draft);
                    }
                }
                let started = match draft {
                    Draft::Assistant(d) => Generation::draft_rounds(
                        &model.model,
                        rows,
                        &mut MtpBatchDrafter { model: d, states },
                    ),
                    Draft::Model(d) => Generation::draft_rounds(
                        &model.model,
                        rows,
                        &mut ModelBatchDrafter { model: d, states },
                    ),
                };
                wants.iter().map(|w| w.0).zip(started).collect()
            };
            let mut drafted = vec![];
            for (i, start) in starts {
                let seq = &mut *batch[i];
                match start {
                    Ok(RoundStart::Drafted(d)) => drafted.push((i, d)),
                    Ok(RoundStart::Done(round)) => {
                        self.round_done(model, batch[i], round, &mut out[i])
                    }
                    Err(e) => {
                        seq.poisoned = true;
                        out[i].fail(EngineFailure::from(e));
                    }
                }
            }
            if !drafted.is_empty() {
                self.largest_verify = self.largest_verify.max(drafted.len());
                let order: Vec<usize> = drafted.iter().map(|(i, _)| *i).collect();
                let verified = {
                    let mut drafted = drafted.into_iter().peekable();
                    let rows: Vec<_> = batch
                        .iter_mut()
                        .enumerate()
                        .filter_map(|(i, s)| {
                            let (_, d) = drafted.next_if(|(j, _)| *j == i)?;
                            let s = &mut **s;
                            #[expect(
                                clippy::expect_used,
                                reason = "only a sequence with a drafter drafts"
                            )]
                            let sp = s.spec.as_mut().expect("a drafted sequence speculates");
                            Some((&mut s.generation, d, &mut sp.rng))
                        })
                        .collect();
                    Generation::verify_rounds(&model.model, rows)
                };
                match verified {
                    Ok(rounds) => {
                        for (i, round) in order.into_iter().zip(rounds) {
                            match round {
                                Ok(round) => self.round_done(model, batch[i], round, &mut out[i]),
                                Err(e) => {
                                    batch[i].poisoned = true;
                                    out[i].fail(EngineFailure::from(e));
                                }
                            }
                        }
                    }
                    // One forward failed for all of them: none of their caches can be trusted.
                    Err(e) => fail_rows(batch, out, &order, e),
                }
            }
            if plain.is_empty() {
                return Ok(());
            }
            ready = plain;
        }
        let started = std::time::Instant::now();
        let steps = Generation::decode_batch(&model.model, &mut generations(batch, &ready));
        if steps.is_ok() {
            // A plain step's cost at this batch size, which each speculating sequence's controller weighs
            // a round (whose times are the batch's too) against; not past `max_batch`, where speculation
            // is off and a step's cost says nothing of the batches it runs in.
            let elapsed = started.elapsed();
            for &i in &ready {
                if let Some(sp) = &mut batch[i].spec
                    && decoding <= sp.controller.config().max_batch
                {
                    if !std::mem::take(&mut sp.after_round) {
                        sp.controller.record_plain(elapsed);
                    }
                    self.speculated.plain_steps += 1;
                }
            }
        }
        match steps {
            Ok((steps, rows)) => {
                self.largest_batch = self.largest_batch.max(rows);
                for (i, step) in ready.into_iter().zip(steps) {
                    let failed = batch[i]
                        .emit(model, step, &mut out[i])
                        .err()
                        .or_else(|| batch[i].generation.take_failure());
                    if let Some(e) = failed {
                        batch[i].poisoned = true;
                        out[i].fail(EngineFailure::from(e));
                    }
                }
            }
            // The batch's caches are in an unknown state: every sequence in it ends.
            Err(e) => fail_rows(batch, out, &ready, e),
        }
        Ok(())
    }

    fn release(&mut self, _: &mut ModelBundle, seq: MlxSequence) {
        // A sequence that failed mid-step leaves a cache nothing can vouch for: it is dropped. A cancelled
        // one is kept: its cache holds exactly the tokens it records.
        self.live_bytes = self.live_bytes.saturating_sub(seq.bytes);
        let kv = seq.kv;
        // The draft model reads the placeholders of media as the ids they are, where the target's record
        // names media by their digests (`cache_keys`): its cache is settled against the raw context.
        let context = seq.generation.context().to_vec();
        let mut rollback = seq.inherited;
        rollback.extend(seq.generation.rollback_points().iter().cloned());
        rollback.sort_by_key(Checkpoint::offset);
        rollback.dedup_by_key(|cp| cp.offset());
        let rollback = rollback.split_off(rollback.len().saturating_sub(ROLLBACK_POINTS));
        if !seq.poisoned
            && let Ok((cache, fed)) = seq.generation.into_cache()
        {
            // The draft model's cache goes with it, holding what the target committed.
            let committed = &context[..fed.len().min(context.len())];
            let draft = match seq.spec {
                Some(sp) => sp.draft.into_cache(committed),
                None => seq
                    .draft_hit
                    .and_then(|(c, f)| DraftState::resume(c, f).into_cache(committed)),
            };
            let entry = PoolCache {
                cache,
                kv,
                draft,
                rollback,
            };
            let bytes = entry.nbytes();
            self.pool.insert(fed, entry, bytes, EntryKind::Owned);
            self.pool
                .evict_to(self.kv_budget.saturating_sub(self.live_bytes));
        }
    }

    fn tally(s: &Summary) -> Tally {
        Tally {
            prompt_tokens: s.stats.prompt_tokens,
            cached_tokens: s.cached_tokens,
            completion_tokens: s.stats.completion_tokens,
            prefill_tps: s.prefill_tps,
            decode_tps: s.decode_tps,
        }
    }

    fn refresh(&mut self, info: &mut MlxInfo) {
        info.memory = mlx_memory();
        info.prefix_cache_entries = self.pool.len();
        info.prefix_cache_bytes = self.pool.bytes();
        info.largest_decode_batch = self.largest_batch;
        info.largest_verify_batch = self.largest_verify;
        info.largest_prefill_batch = self.largest_prefill;
        if let Some(sp) = &mut info.speculative {
            sp.update(self.speculated);
        }
    }

    fn unload(&mut self, model: ModelBundle) {
        self.pool.clear();
        self.live_bytes = 0;
        self.largest_batch = 0;
        self.largest_verify = 0;
        self.largest_prefill = 0;
        self.speculated = SpeculativeStats::default();
        drop(model);
        // MLX keeps freed buffers in its cache: hand them back to the system.
        let _ = mlx_rs::memory::clear_cache();
    }
}

/// A prefix-cache entry: a cache and the KV quantization it was built with, and with speculative
/// decoding, the draft model's cache of the same request and the tokens it holds (a later request that
/// continues the conversation drafts from it instead of reading the conversation again).
#[derive(Clone)]
struct PoolCache {
    cache: Cache,
    kv: Option<KvQuant>,
    draft: Option<(Cache, Vec<u32>)>,
    /// Rollback points of the cache's sliding-window layers, ascending ([`Generation::rollback_points`]):
    /// where a prompt that parts from this entry can resume once the windows have filled.
    rollback: Vec<Checkpoint>,
}

impl PoolCache {
    /// An entry of the target's cache alone.
    fn target(cache: Cache, kv: Option<KvQuant>) -> Self {
        Self {
            cache,
            kv,
            draft: None,
            rollback: vec![],
        }
    }

    /// Bytes the entry holds (the draft's cache and the rollback points' windows included).
    fn nbytes(&self) -> u64 {
        (self.cache.nbytes()
            + self.draft.as_ref().map_or(0, |(c, _)| c.nbytes())
            + self.rollback.iter().map(Checkpoint::nbytes).sum::<usize>()) as u64
    }

    /// The most positions, at most `keep`, the cache can be cut back to: `keep` while it can be trimmed,
    /// else its latest rollback point at or before `keep` (the pool's `cut`).
    fn cut_to(&self, keep: usize) -> Option<usize> {
        if self.cache.is_trimmable() {
            return Some(keep);
        }
        self.rollback
            .iter()
            .map(Checkpoint::offset)
            .filter(|&o| o <= keep)
            .max()
    }

    /// Cuts the cache back to `keep` positions, a length [`PoolCache::cut_to`] offered: trimmed, or
    /// returned to the rollback point there. False, changing nothing, when it cannot.
    fn cut(&mut self, keep: usize) -> bool {
        if self.cache.is_trimmable() {
            return self.cache.trim_to(keep);
        }
        let Self {
            cache, rollback, ..
        } = self;
        rollback
            .iter()
            .find(|cp| cp.offset() == keep)
            .is_some_and(|cp| cache.rollback(cp))
    }

    /// The rollback points a request continuing this entry from `reused` positions inherits: those at or
    /// before it, which hold the same tokens.
    fn inherited(rollback: Vec<Checkpoint>, reused: usize) -> Vec<Checkpoint> {
        rollback
            .into_iter()
            .filter(|cp| cp.offset() <= reused)
            .collect()
    }
}

/// One request in the MLX engine: its generation (cache, sampler), detokenizer and answer parser.
struct MlxSequence {
    generation: Generation,
    /// Its KV quantization (what its cache may be reused for).
    kv: Option<KvQuant>,
    /// What its cache held at its last step (the runner's `live_bytes` share).
    bytes: u64,
    /// Generated token ids.
    tokens: Vec<u32>,
    /// A step failed: its cache is not kept.
    poisoned: bool,
    decoder: DecodeStream,
    answer: OutputProcessor,
    started: bool,
    /// Speculative decoding's state, when the engine has a draft model and the request may speculate.
    spec: Option<SeqSpec>,
    /// Where its last user turn ends, when a checkpoint is taken there (an [`EntryKind::Turn`] entry).
    turn_end: Option<usize>,
    /// The draft model's cache that came with the prefix-cache entry it continues, until speculation
    /// takes it (kept with its own cache when it does not speculate).
    draft_hit: Option<(Cache, Vec<u32>)>,
    /// The prompt's media in start order (as its generation's media runs), each until its tower runs.
    media: Vec<Option<Placement>>,
    /// Media whose tower ran.
    encoded_media: usize,
    /// Of its prompt, the soft tokens of its clips and videos' sound.
    audio_tokens: usize,
    /// Preprocesses the media ahead of the model thread (None: it preprocesses them itself).
    media_worker: Option<MediaWorker>,
    /// Rollback points of the prefix-cache entry it continues, at or before what it reused: its own
    /// entry keeps them with those its prefill takes.
    inherited: Vec<Checkpoint>,
}

/// A sequence's speculative decoding: how many tokens to draft, the draft model's cache, and the RNG of
/// the acceptance rule.
struct SeqSpec {
    controller: Controller,
    draft: DraftState,
    rng: StdRng,
    /// The last step was a round: the next plain step starts on a token already read, so its time is not
    /// a plain step's.
    after_round: bool,
}

impl MlxSequence {
    /// Checks and tokenizes a request and continues the prefix-cache entry that holds the most of its
    /// prompt (short of its last token; an entry running on past the common part is copied and trimmed
    /// back to it where its cache can be); a chat with a system prompt asks for a checkpoint where
    /// the system prompt ends.
    fn new(
        l: &ModelBundle,
        req: Request,
        ctx: usize,
        pool: &mut PrefixPool<PoolCache>,
    ) -> Result<Self> {
        let (ids, mut placed) = l.place_media(&req.prompt, &req.images, &req.audio, &req.videos)?;
        let ctx = if ctx == 0 { l.context_length() } else { ctx };
        let mut req = req;
        if req.fit_context && ids.len() < ctx {
            req.options.max_tokens = req.options.max_tokens.min(ctx - ids.len());
        }
        if ids.len() + req.options.max_tokens > ctx {
            return Err(EngineError::InvalidRequest(format!(
                "prompt ({} tokens) + max_tokens ({}) exceeds the model's context of {ctx} tokens",
                ids.len(),
                req.options.max_tokens
            )));
        }
        let mut opts = req.options;
        if opts.stop_tokens.is_empty() {
            opts.stop_tokens = l.tokenizer.eos_ids.clone();
        }
        let constrained = req.constraint.is_some();
        if let Some(c) = req.constraint {
            opts.constraint = Some((l.vocabulary()?, c));
        }
        let (open, close) = jemma_serve::thinking::GEMMA4_THOUGHT_MARKERS;
        if let (Some(budget), Some(open), Some(close)) = (
            req.thinking_token_budget,
            l.tokenizer.token_id(open),
            l.tokenizer.token_id(close),
        ) {
            opts.thinking = Some(jemma_serve::thinking::ThinkingBudget::new(
                budget,
                jemma_serve::thinking::ThoughtMarkers { open, close },
            ));
        }
        let (system, turns) = l.checkpoints_of(&req.prompt, &ids);
        let kv = opts.kv_quant;
        // Each image, frame and clip's place; their towers run when the prefill reaches them (never for
        // those the reused prefix holds).
        placed.sort_by_key(|p| p.start);
        let audio_tokens = (placed.iter())
            .filter(|p| matches!(p.input, MediaInput::Audio(_)))
            .map(|p| p.len)
            .sum();
        let media: Vec<MediaRun> = placed
            .iter()
            .map(|p| MediaRun {
                start: p.start,
                len: p.len,
                features: None,
                digest: p.digest,
                bidirectional: matches!(p.input, MediaInput::Image { .. }),
            })
            .collect();
        let keys = crate::generate::cache_keys(&ids, &media);
        // Only a cache built with the KV quantization this request asks for (tiers sharing an engine may
        // ask for different ones), and only once the request has been checked.
        let (mut draft_hit, mut inherited) = (None, vec![]);
        let mut generation = Generation::resume_with_media(&l.model, &ids, media, opts, || {
            let hit = pool.take_nearest(&keys, |c| c.kv == kv, |c, keep| c.cut_to(keep))?;
            // The pool only offers a longer entry when the cache can be cut back to `reused`.
            let mut entry = hit.cache;
            if hit.excess > 0 && !entry.cut(hit.reused) {
                return None;
            }
            let PoolCache {
                cache,
                draft,
                rollback,
                ..
            } = entry;
            draft_hit = draft;
            inherited = PoolCache::inherited(rollback, hit.reused);
            Some((cache, hit.reused))
        })?;
        for n in [system, turns].into_iter().flatten() {
            generation.checkpoint_at(n);
        }
        // The media past what the cache holds are preprocessed off this thread, in the order the prefill
        // reaches them.
        let reused = generation.reused();
        let work: Vec<(usize, MediaInput)> = placed
            .iter()
            .enumerate()
            .filter(|(_, p)| p.start + p.len > reused)
            .map(|(i, p)| (i, p.input.clone()))
            .collect();
        let media_worker = if work.is_empty() {
            None
        } else {
            MediaWorker::start(work, l.audio_spec.as_ref().map(|a| a.extractor.clone()))
        };
        let turn_end = turns.filter(|&n| Some(n) != system);
        Ok(Self {
            generation,
            kv,
            bytes: 0,
            tokens: vec![],
            poisoned: false,
            decoder: DecodeStream::default(),
            answer: OutputProcessor::new(&req.stop, req.parse_output)
                .with_tools(req.prompt.declares_tools())
                .with_max_tool_calls((!req.parallel_tool_calls).then_some(1))
                .with_constrained_calls(constrained),
            started: false,
            spec: None,
            turn_end,
            draft_hit,
            media_worker,
            inherited,
            media: placed.into_iter().map(Some).collect(),
            encoded_media: 0,
            audio_tokens,
        })
    }

    /// Runs the towers of the media the next prefill chunk reads (preprocessing included), once each.
    ///
    /// Errors: as [`ModelBundle::encode`]; a tower that disagrees with the processor on a medium's soft
    /// tokens ([`EngineError::InvalidModel`]).
    fn encode_media(&mut self, l: &ModelBundle) -> Result<()> {
        // Media the cache holds (at admission, or adopted since) are never encoded: their decoded pixels
        // go, and the worker with them once nothing is left to preprocess.
        let read = self.generation.prefilled();
        for p in &mut self.media {
            if p.as_ref().is_some_and(|p| p.start + p.len <= read) {
                *p = None;
            }
        }
        if self.media.iter().all(Option::is_none) {
            self.media_worker = None;
            return Ok(());
        }
        for i in self.generation.media_to_encode(&l.model) {
            let placed = self
                .media
                .get_mut(i)
                .and_then(Option::take)
                .ok_or_else(|| {
                    EngineError::Internal(format!("media run {i} encoded twice or never placed"))
                })?;
            let features = match self.media_worker.as_mut().and_then(|w| w.take(i)) {
                Some(input) => l.encode_input(&placed, input?)?,
                None => l.encode(&placed)?,
            };
            self.generation.set_media_features(i, features)?;
            self.encoded_media += 1;
        }
        Ok(())
    }

    /// Bytes its caches hold against the prefix cache's budget: its own, its rollback points' windows, and
    /// a draft cache it took from the prefix cache and holds without speculating (a speculating
    /// sequence's draft caches are the draft model's share of the memory plan).
    fn cache_bytes(&self) -> u64 {
        // Its own points: the inherited ones share their buffers with the entry they came from.
        let windows: usize = (self.generation.rollback_points().iter())
            .map(Checkpoint::nbytes)
            .sum();
        self.generation.cache_bytes()
            + self
                .draft_hit
                .as_ref()
                .map_or(0, |(c, _)| c.nbytes() as u64)
            + windows as u64
    }

    /// Media the reused prefix holds (never encoded for this sequence).
    fn cached_media(&self) -> usize {
        self.generation.media_within(self.generation.reused())
    }

    /// Takes the draft model's cache of the prefix-cache entry this sequence adopted after admission
    /// (see `MlxRunner::step`), which holds more of its prompt than what it was admitted with: its drafter
    /// resumes from it when it has not drafted yet. An entry without one changes nothing.
    fn adopt_draft(&mut self, draft: Option<(Cache, Vec<u32>)>) {
        let Some((cache, fed)) = draft else { return };
        match &mut self.spec {
            Some(sp) if !sp.draft.started() => sp.draft = DraftState::resume(cache, fed),
            Some(_) => {}
            None => self.draft_hit = Some((cache, fed)),
        }
    }

    /// Hands on the tokens of one speculative round, as [`MlxSequence::emit`] hands on one step's; a stop
    /// string inside the round ends the answer there, and the tokens after it are taken back from the
    /// cache.
    fn emit_round(
        &mut self,
        l: &ModelBundle,
        steps: Vec<crate::generate::SampledToken>,
        out: &mut SeqOutput<Summary>,
    ) -> Result<()> {
        self.start(out);
        let n = steps.len();
        for (i, step) in steps.into_iter().enumerate() {
            if self.absorb(l, step, out)? {
                if !self.generation.unsend(n - 1 - i) {
                    // The cache holds tokens the answer does not: it must not be reused.
                    self.poisoned = true;
                }
                break;
            }
        }
        self.finish_if_done(l, out)
    }

    /// Hands on what one step produced: `Started` once the prompt is read, then the token's text,
    /// logprobs, and any stop string or tool call it completes; ends the sequence in `out` when generation
    /// is over.
    fn emit(
        &mut self,
        l: &ModelBundle,
        step: Option<crate::generate::SampledToken>,
        out: &mut SeqOutput<Summary>,
    ) -> Result<()> {
        self.start(out);
        if let Some(step) = step {
            self.absorb(l, step, out)?;
        }
        self.finish_if_done(l, out)
    }

    /// Sends `Started` before the first token.
    fn start(&mut self, out: &mut SeqOutput<Summary>) {
        if !self.started {
            self.started = true;
            out.send(Event::Started {
                prompt_tokens: self.generation.stats().prompt_tokens,
                cached_tokens: self.generation.reused(),
            });
        }
    }

    /// Hands on one token: its text, logprobs, and any stop string or tool call it completes. True when a
    /// stop string ended the answer (the generation is stopped).
    fn absorb(
        &mut self,
        l: &ModelBundle,
        step: crate::generate::SampledToken,
        out: &mut SeqOutput<Summary>,
    ) -> Result<bool> {
        self.tokens.push(step.token);
        let piece = self.decoder.push(&l.tokenizer, step.token)?;
        if let Some(lp) = &step.logprobs {
            let tok = &l.tokenizer;
            out.send(Event::Logprobs(TokenLogprob::new(
                tok.token_bytes(step.token),
                lp.logprob,
                lp.top
                    .iter()
                    .map(|&(id, p)| (tok.token_bytes(id), p))
                    .collect(),
            )));
        }
        let (evs, hit) = self.answer.push(&piece);
        out.events.extend(evs.into_iter().map(Event::from));
        if hit {
            self.generation.stop(FinishReason::Stop);
        }
        Ok(hit)
    }

    /// Ends the sequence in `out` once generation is over.
    fn finish_if_done(&mut self, l: &ModelBundle, out: &mut SeqOutput<Summary>) -> Result<()> {
        if self.generation.is_finished() {
            let stats = self.generation.stats().clone();
            let by_string = stats.finish_reason == FinishReason::Stop && stats.stop_token.is_none();
            let tail = self.decoder.finish(&l.tokenizer)?;
            out.events.extend(
                self.answer
                    .finish(&tail, by_string)
                    .into_iter()
                    .map(Event::from),
            );
            out.finish(Summary {
                cached_tokens: self.generation.reused(),
                tokens: std::mem::take(&mut self.tokens),
                prefill_tps: stats.prefill_tps(),
                decode_tps: stats.decode_tps(),
                stats,
                tool_calls: self.answer.tool_calls(),
                stop_sequence: self.answer.stop_sequence().map(String::from),
                reasoning_tokens: self.answer.reasoning_tokens(),
                audio_tokens: self.audio_tokens,
                memory: mlx_memory(),
                speculative: self.spec.as_ref().map(|sp| sp.controller.stats()),
                draft_cached_tokens: self.spec.as_ref().map_or(0, |sp| sp.draft.reused()),
                encoded_media: self.encoded_media,
                cached_media: self.cached_media(),
            });
        }
        Ok(())
    }
}
