//! In-process engines as tiers: one adapter, [`EngineBackend`], for every engine on the serving core — MLX,
//! and llama.cpp with feature `llama`. What differs per engine (its request type, how its summary reads, its
//! status figures) is the small [`InProcess`] trait; the prompt, the request's fields, admission errors, the
//! event stream and `/health` are written once here.

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;
use jemma_chat::event::Event;
use jemma_chat::prompt::Prompt;
use jemma_chat::sampling::SamplingParams;
use jemma_serve::host::{Status, SubmitError};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use jemma_media::Modality;
use jemma_router::api::{ChatRequest, Tool};
use jemma_router::backend::{
    Backend, BackendError, BackendHealth, BackendState, ChunkStream, Finished, engine_chunks,
    engine_error, sampling_of, with_continuation,
};

/// One request in the terms every engine shares: built once from the OpenAI request.
#[derive(Debug, Clone)]
pub struct Job {
    /// The conversation (rendered by the engine with the model's template), or a raw completion prompt.
    pub prompt: Prompt,
    /// The request's sampling ([`jemma_router::backend::sampling_of`]).
    pub sampling: SamplingParams,
    /// Most tokens to generate (the client's, or the tier's default with `fit_context`).
    pub max_tokens: usize,
    /// Strings that end the answer where they first appear; the text stops before them.
    pub stop: Vec<String>,
    /// Split thinking and tool calls out of the text.
    pub parse_output: bool,
    /// What the answer must be (JSON, a schema, forced tool calls), enforced token by token.
    pub constraint: Option<jemma_constrain::Constraint>,
    /// The most tokens the answer may spend thinking (`thinking_token_budget`), enforced by the engine.
    pub thinking_token_budget: Option<usize>,
    /// Whether several tool calls may come in one answer (`parallel_tool_calls`); when not, the answer ends
    /// after its first call.
    pub parallel_tool_calls: bool,
    /// `max_tokens` is the tier's default (the client set none): it shrinks to fit the context.
    pub fit_context: bool,
    /// Report each token's log-probability.
    pub logprobs: bool,
    /// With `logprobs`, this many alternatives per token.
    pub top_logprobs: usize,
    /// The prompt's images, decoded, in the order of their parts.
    pub images: Vec<jemma_media::DecodedImage>,
    /// The prompt's audio clips, decoded to 16 kHz mono, in the order of their parts.
    pub audio: Vec<jemma_media::audio::DecodedAudio>,
    /// The prompt's videos, sampled (frames, audio track), in the order of their parts.
    pub videos: Vec<jemma_media::video::DecodedVideo>,
}

/// What an in-process engine must enforce for `req`: forced tool calls (`tool_choice` "required" or a
/// named function: calls to the offered functions, or to that one, with schema-valid arguments), else the
/// `response_format`'s JSON (or, with tools under "auto", that JSON or calls), else, when a function is
/// `strict` under `tool_choice` "auto", any call the model opens (a lazy grammar: the rest of the answer
/// is free); None for free text. With `tool_choice` "none" the tools are not shown at all. With thinking
/// on, the model may think first: the grammar starts after its thinking block.
pub fn constraint_of(req: &ChatRequest) -> Option<jemma_constrain::Constraint> {
    let c = answer_constraint(req)?;
    Some(
        if req.enable_thinking == Some(true)
            && !matches!(c, jemma_constrain::Constraint::LazyToolCalls { .. })
        {
            jemma_constrain::Constraint::AfterThinking(Box::new(c))
        } else {
            c
        },
    )
}

fn answer_constraint(req: &ChatRequest) -> Option<jemma_constrain::Constraint> {
    use jemma_constrain::{Constraint, ToolSpec};
    use jemma_router::api::{ResponseFormat, ToolChoice};
    let specs = |keep: &dyn Fn(&str) -> bool| -> Vec<ToolSpec> {
        req.tools
            .iter()
            .flatten()
            .filter(|t| keep(&t.function.name))
            .map(|t| ToolSpec {
                name: t.function.name.clone(),
                parameters: t.function.parameters.clone().unwrap_or(Value::Null),
            })
            .collect()
    };
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    match &req.tool_choice {
        Some(ToolChoice::Required) => {
            return Some(Constraint::ToolCalls {
                tools: specs(&|_| true),
                parallel,
            });
        }
        // One call to the named function, as vLLM's guided decoding gives.
        Some(ToolChoice::Function(name)) => {
            return Some(Constraint::ToolCalls {
                tools: specs(&|n| n == name),
                parallel: false,
            });
        }
        _ => {}
    }
    // Under "auto" (given or implied) the model may call any function: a strict one's arguments follow
    // its schema, another's are any object (OpenAI's non-strict calling promises no more).
    let auto_tools = req
        .tool_choice
        .as_ref()
        .is_none_or(|c| *c == ToolChoice::Auto);
    let callable: Vec<ToolSpec> = req
        .tools
        .iter()
        .flatten()
        .map(|t| ToolSpec {
            name: t.function.name.clone(),
            parameters: match t.function.strict {
                Some(true) => t.function.parameters.clone().unwrap_or(Value::Null),
                _ => serde_json::json!({"type": "object"}),
            },
        })
        .collect();
    let json = match &req.response_format {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(Constraint::JsonObject),
        ResponseFormat::JsonSchema { json_schema } => Some(Constraint::JsonSchema {
            schema: json_schema
                .schema
                .clone()
                .unwrap_or_else(|| Value::Object(Default::default())),
            strict: json_schema.strict.unwrap_or(false),
        }),
    };
    match json {
        // The format or a call, as OpenAI lets a model answer in the format or call a tool.
        Some(json) if auto_tools && !callable.is_empty() => Some(Constraint::JsonOrToolCalls {
            json: Box::new(json),
            tools: callable,
            parallel,
        }),
        Some(json) => Some(json),
        // OpenAI's `strict` under "auto": whatever call the model makes has arguments its schema allows.
        None if auto_tools
            && req
                .tools
                .iter()
                .flatten()
                .any(|t| t.function.strict == Some(true)) =>
        {
            Some(Constraint::LazyToolCalls {
                tools: callable,
                parallel,
            })
        }
        None => None,
    }
}

/// An engine on the serving core, as [`EngineBackend`] drives it.
pub trait InProcess: Send + Sync + 'static {
    /// The engine's final summary of a request.
    type Summary: Send + 'static;
    /// The engine's own status figures.
    type Info;
    /// The engine's name in `/health` (`mlx`, `llama.cpp`).
    const NAME: &'static str;
    /// Whether the engine can put images before a model (the model must also have a vision tower, which
    /// the engine checks).
    const SEES_IMAGES: bool;
    /// Whether the engine can put audio before a model (the model must also have an audio tower).
    const HEARS_AUDIO: bool;
    /// What the engine's model takes in.
    fn input_modalities(info: &Self::Info) -> Vec<Modality> {
        let _ = info;
        vec![Modality::Text]
    }
    /// Whether the engine's model has a chat template (None: not known, taken to chat). A base model
    /// answers `/v1/completions` only; the router sends `model: auto` chats elsewhere.
    fn chats(info: &Self::Info) -> Option<bool> {
        let _ = info;
        None
    }
    /// Why the engine's model cannot take `modality` when its own words say more than "it has no vision
    /// tower" (None: that default).
    fn cannot_take(info: &Self::Info, modality: Modality) -> Option<String> {
        let _ = (info, modality);
        None
    }
    /// Queues a job (in the engine's own request type); dropping the receiver cancels it.
    ///
    /// Errors: the serving core's admission errors (queue full, not available).
    fn submit(&self, job: Job) -> Result<mpsc::Receiver<Event<Self::Summary>>, SubmitError>;
    /// Queues a job whose prompt is only counted ([`jemma_serve::host::Host::count`]).
    ///
    /// Errors: as [`InProcess::submit`].
    fn count(&self, job: Job) -> Result<jemma_serve::host::CountReply, SubmitError>;
    /// A snapshot of the engine's state and figures.
    fn status(&self) -> Status<Self::Info>;
    /// Resolves when the model thread has ended and its memory is released.
    fn stopped(&self) -> Pin<Box<dyn Future<Output = ()> + Send>>;
    /// How a request ended, read off its summary.
    fn finished(summary: &Self::Summary) -> Finished;
    /// The engine's own figures for `/health`'s details.
    fn details(info: &Self::Info) -> Value;
}

/// An in-process engine serving one tier.
pub struct EngineBackend<E> {
    engine: E,
    default_max_tokens: u32,
    /// How images are fetched and bounded (`[limits]`).
    limits: jemma_router::api::Limits,
    /// This engine's number in the process, shown in `/health` so that the figures of tiers sharing one
    /// engine (the same model named twice) are read once, not added.
    id: u64,
}

static NEXT_ENGINE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl<E: InProcess> EngineBackend<E> {
    /// Fetches and bounds images as `limits` say (`[limits]`; the defaults otherwise).
    pub fn with_limits(mut self, limits: jemma_router::api::Limits) -> Self {
        self.limits = limits;
        self
    }

    /// `req` with its images fetched and decoded and its audio decoded, when it has any and an engine
    /// that takes them (only a local engine needs them: an upstream tier is sent the parts as they came).
    ///
    /// Errors: media of a kind this engine's model cannot take, refused before anything is fetched or
    /// decoded with a 400 naming the first such part and the model; the decoders' refusals.
    async fn with_media<'r>(
        &self,
        req: &'r ChatRequest,
    ) -> Result<std::borrow::Cow<'r, ChatRequest>, BackendError> {
        let needs = req.media_modalities();
        if !needs.is_empty() {
            let s = self.engine.status();
            let takes = Self::takes(&s.info);
            // A model that sees video on a server without ffmpeg: the server, not the model, is short.
            if needs.contains(&Modality::Video)
                && E::SEES_IMAGES
                && E::input_modalities(&s.info).contains(&Modality::Video)
                && jemma_media::video::Ffmpeg::find().is_none()
            {
                let at = req
                    .first_part(Modality::Video)
                    .unwrap_or_else(|| "video_url".into());
                return Err(BackendError::Refused(
                    jemma_router::RouterError::unsupported_media(
                        format!(
                            "{at}: video cannot be read on this server: ffmpeg was not found (install ffmpeg, \
                         or set JEMMA_FFMPEG_DIR to the folder that holds ffmpeg and ffprobe)"
                        ),
                        &at,
                    ),
                ));
            }
            if let Some(&m) = needs.iter().find(|m| !takes.contains(m)) {
                let (verb, tower, engine_can) = match m {
                    Modality::Image => ("see images", "vision tower", E::SEES_IMAGES),
                    Modality::Video => (
                        "see video",
                        "vision tower or no video token",
                        E::SEES_IMAGES,
                    ),
                    _ => ("hear audio", "audio tower", E::HEARS_AUDIO),
                };
                let why = if let Some(why) = E::cannot_take(&s.info, m) {
                    why
                } else if engine_can {
                    format!("it has no {tower}")
                } else {
                    format!("the {} engine serving it cannot show it {m}s yet", E::NAME)
                };
                let part = req.first_part(m);
                return Err(BackendError::Refused(
                    jemma_router::RouterError::InvalidRequest {
                        message: format!(
                            "{}the model {} cannot {verb}: {why} (/v1/models lists each model's \
                         input_modalities)",
                            part.as_deref()
                                .map(|p| format!("{p}: "))
                                .unwrap_or_default(),
                            s.model
                        ),
                        param: part,
                    },
                ));
            }
        }
        let images = req.has_images && E::SEES_IMAGES && req.images.is_empty();
        let audio = req.has_audio && E::HEARS_AUDIO && req.audio.is_empty();
        let videos = req.has_videos && E::SEES_IMAGES && req.videos.is_empty();
        if !images && !audio && !videos {
            return Ok(std::borrow::Cow::Borrowed(req));
        }
        let mut owned = req.clone();
        // Refused keeps the status and the `param` naming the media part.
        if images {
            owned
                .decode_images(&self.limits)
                .await
                .map_err(BackendError::Refused)?;
        }
        if audio {
            owned
                .decode_audio(&self.limits)
                .await
                .map_err(BackendError::Refused)?;
        }
        if videos {
            let mut params = req.video_sampling.unwrap_or_default();
            // A video's audio track is heard by a model that hears; for one that does not, it is not
            // decoded at all.
            let hears = Self::takes(&self.engine.status().info).contains(&Modality::Audio);
            if !hears {
                params.audio_seconds = 0.0;
            }
            owned
                .decode_videos(&self.limits, params)
                .await
                .map_err(BackendError::Refused)?;
        }
        Ok(std::borrow::Cow::Owned(owned))
    }

    /// What the engine's model takes in, less what the engine cannot put before it (and video, which is
    /// sampled through ffmpeg, where no ffmpeg is found).
    fn takes(info: &E::Info) -> Vec<Modality> {
        let mut m = E::input_modalities(info);
        m.retain(|m| match m {
            Modality::Image => E::SEES_IMAGES,
            Modality::Audio => E::HEARS_AUDIO,
            Modality::Video => E::SEES_IMAGES && jemma_media::video::Ffmpeg::find().is_some(),
            Modality::Text => true,
        });
        m
    }

    /// Wraps a started engine; `default_max_tokens` applies when a request sets none.
    pub fn new(engine: E, default_max_tokens: u32) -> Self {
        Self {
            engine,
            default_max_tokens,
            limits: jemma_router::api::Limits::default(),
            id: NEXT_ENGINE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

#[async_trait]
impl<E: InProcess> Backend for EngineBackend<E> {
    fn model(&self) -> String {
        self.engine.status().model
    }

    fn stopped(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        // A cold model swap waits on this before loading the next model into the memory it frees.
        self.engine.stopped()
    }

    async fn start(
        &self,
        req: &ChatRequest,
        continuation: Option<&str>,
    ) -> Result<ChunkStream, BackendError> {
        let req = self.with_media(req).await?;
        let job = self.job(&req, continuation)?;
        let hears = Self::takes(&self.engine.status().info).contains(&Modality::Audio);
        let videos = req.videos_seen(hears);
        let events = self.engine.submit(job).map_err(admission_error)?;
        Ok(engine_chunks(events, videos, |s| E::finished(&s)))
    }

    async fn count_tokens(&self, req: &ChatRequest) -> Option<Result<u64, BackendError>> {
        let counted = async {
            let req = self.with_media(req).await?;
            let reply = self
                .engine
                .count(self.job(&req, None)?)
                .map_err(admission_error)?;
            match reply.await {
                Ok(Ok(n)) => Ok(n as u64),
                Ok(Err(failure)) => Err(engine_error(failure)),
                Err(_) => Err(BackendError::Broken(
                    "the engine stopped before counting".into(),
                )),
            }
        };
        Some(counted.await)
    }

    fn capacity(&self) -> Option<usize> {
        let s = self.engine.status();
        (s.max_sequences > 0).then_some(s.max_sequences)
    }

    fn health(&self) -> BackendHealth {
        let s = self.engine.status();
        let mut details = E::details(&s.info);
        if let Some(d) = details.as_object_mut() {
            d.insert("engine".into(), json!(E::NAME));
            // Tiers with the same engine_id share one engine: its counts and prefix cache are one.
            d.insert("engine_id".into(), json!(self.id));
        }
        let mut h = engine_health(&s, details);
        h.input_modalities = Self::takes(&s.info);
        h.chat = E::chats(&s.info);
        h
    }
}

/// An in-process engine's health from the serving core's status: the lifecycle mapped to [`BackendState`]
/// (an unloaded model still serves: the next request reloads it), with the engine's own figures in
/// `details`.
pub fn engine_health<I>(s: &jemma_serve::host::Status<I>, details: Value) -> BackendHealth {
    use jemma_serve::host::EngineState;
    let (state, err) = match &s.state {
        EngineState::Loading { progress } => (
            BackendState::Loading {
                progress: *progress,
            },
            None,
        ),
        EngineState::Ready => (BackendState::Ready, None),
        EngineState::Unloaded => (BackendState::Unloaded, s.last_error.clone()),
        EngineState::Failed { error } => (BackendState::Failed, Some(error.clone())),
    };
    let mut details = details;
    if let Some(d) = details.as_object_mut() {
        d.insert("requests".into(), json!(s.requests));
        d.insert("generated_tokens".into(), json!(s.generated_tokens));
        d.insert("queued".into(), json!(s.queued));
        // Continuous batching: requests in the running batch, and how many it may hold.
        d.insert("running".into(), json!(s.running));
        d.insert("max_sequences".into(), json!(s.max_sequences));
        d.insert("prefill_tps".into(), json!(s.last_prefill_tps));
        d.insert(
            "prefix_cache".into(),
            json!({
                "prompt_tokens": s.prompt_tokens,
                "cached_tokens": s.cached_prompt_tokens,
                "hit_rate": if s.prompt_tokens > 0 {
                    s.cached_prompt_tokens as f64 / s.prompt_tokens as f64
                } else {
                    0.0
                },
            }),
        );
    }
    BackendHealth {
        state,
        model: s.model.clone(),
        model_loaded: matches!(s.state, EngineState::Ready),
        tokens_per_second: s.last_decode_tps,
        last_error: err,
        context_length: (s.context_length > 0).then_some(s.context_length),
        input_modalities: vec![],
        chat: None,
        dialect: None,
        details,
    }
}

/// The serving core's admission errors as a backend's.
fn admission_error(e: SubmitError) -> BackendError {
    match e {
        SubmitError::QueueFull => BackendError::Busy(e.to_string()),
        SubmitError::Unavailable(m) => BackendError::Unavailable(m),
    }
}

impl<E: InProcess> EngineBackend<E> {
    /// The engine job for `req` (with `continuation` as the start of the answer): the prompt, sampling,
    /// limits and constraint every engine takes.
    ///
    /// Errors: images or audio for an engine that cannot put them before its model (an answer that never
    /// saw an image or heard a clip must not pretend it did), or not decoded before
    /// ([`EngineBackend::with_media`]).
    fn job(&self, req: &ChatRequest, continuation: Option<&str>) -> Result<Job, BackendError> {
        if req.has_images && !E::SEES_IMAGES {
            return Err(BackendError::BadRequest(format!(
                "images are not supported by the {} engine serving this tier: the model cannot see them \
                 (serve a Gemma 4 checkpoint with a vision tower on the MLX engine; /v1/models lists each \
                 tier's input_modalities)",
                E::NAME
            )));
        }
        if req.has_images && req.images.is_empty() {
            return Err(BackendError::BadRequest(
                "the request's images were not decoded for the local engine".into(),
            ));
        }
        if req.has_audio && !E::HEARS_AUDIO {
            return Err(BackendError::BadRequest(format!(
                "audio is not supported by the {} engine serving this tier: the model cannot hear it \
                 (serve a Gemma 4 checkpoint with an audio tower, E2B or E4B, on the MLX engine; \
                 /v1/models lists each tier's input_modalities)",
                E::NAME
            )));
        }
        if req.has_videos && req.videos.is_empty() {
            return Err(BackendError::BadRequest(
                "the request's videos were not sampled for the local engine".into(),
            ));
        }
        if req.has_audio && req.audio.is_empty() {
            return Err(BackendError::BadRequest(
                "the request's audio was not decoded for the local engine".into(),
            ));
        }
        let prompt = match &req.raw_prompt {
            Some(p) => Prompt::Text(format!("{p}{}", continuation.unwrap_or(""))),
            None => Prompt::Chat {
                // What the answer's JSON is for, when the format says (OpenAI shows it to its model).
                messages: match req.response_format.instruction() {
                    Some(note) => jemma_router::api::with_system_note(
                        with_continuation(&req.messages, continuation),
                        &note,
                    ),
                    None => with_continuation(&req.messages, continuation),
                }
                .iter()
                .map(|m| without_payloads(m.to_value()))
                .collect(),
                // tool_choice "none": the model is not shown the tools, so it has nothing to call.
                tools: req
                    .tools
                    .as_ref()
                    .filter(|_| req.tool_choice != Some(jemma_router::api::ToolChoice::None))
                    .map(|ts| ts.iter().map(Tool::to_value).collect()),
                enable_thinking: req.enable_thinking,
            },
        };
        let constraint = constraint_of(req);
        // A JSON answer is not parsed for thinking or tool calls (its text could spell a marker); forced
        // tool calls are, and so is an answer that may think before its JSON (the thought is split out) or
        // call a tool instead of it.
        let json = matches!(
            constraint,
            Some(
                jemma_constrain::Constraint::JsonObject
                    | jemma_constrain::Constraint::JsonSchema { .. }
            )
        );
        Ok(Job {
            prompt,
            sampling: sampling_of(req),
            max_tokens: req.max_tokens.unwrap_or(self.default_max_tokens) as usize,
            stop: req.stop.clone(),
            parse_output: req.raw_prompt.is_none() && !json,
            constraint,
            thinking_token_budget: req.thinking_token_budget.map(|b| b as usize),
            parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
            fit_context: req.max_tokens.is_none(),
            logprobs: req.logprobs,
            top_logprobs: req.top_logprobs as usize,
            images: req.images.clone(),
            audio: req.audio.clone(),
            videos: req.videos.clone(),
        })
    }
}

/// A message as the chat template reads it, without its media's bytes: the template shows a part by its
/// `type` alone, and the engine takes the decoded media separately, so megabytes of base64 need not be
/// copied into the template's context. A `video_url` part becomes `{"type": "video"}`, the type Gemma 4's
/// template shows as `<|video|>`.
fn without_payloads(mut m: Value) -> Value {
    if let Some(parts) = m.get_mut("content").and_then(Value::as_array_mut) {
        for p in parts {
            if p.get("type").and_then(Value::as_str) == Some("video_url") {
                *p = json!({"type": "video"});
                continue;
            }
            if let Some(u) = p.pointer_mut("/image_url/url") {
                *u = Value::String(String::new());
            }
            if let Some(d) = p.pointer_mut("/input_audio/data") {
                *d = Value::String(String::new());
            }
        }
    }
    m
}

/// The MLX engine with the tier's KV-cache quantization (`kv_bits`), applied to every request.
pub struct Mlx {
    /// The engine.
    pub engine: jemma_engine::runtime::Engine,
    /// Quantize the full-attention KV caches (None: full precision).
    pub kv_quant: Option<jemma_engine::models::gemma4::KvQuant>,
}

impl InProcess for Mlx {
    type Summary = jemma_engine::runtime::Summary;
    type Info = jemma_engine::runtime::MlxInfo;
    const NAME: &'static str = "mlx";
    const SEES_IMAGES: bool = true;
    const HEARS_AUDIO: bool = true;

    fn input_modalities(info: &Self::Info) -> Vec<Modality> {
        info.input_modalities.clone()
    }

    fn chats(info: &Self::Info) -> Option<bool> {
        info.chat_template
    }

    fn submit(&self, job: Job) -> Result<mpsc::Receiver<Event<Self::Summary>>, SubmitError> {
        self.engine.submit(self.request(job))
    }

    fn count(&self, job: Job) -> Result<jemma_serve::host::CountReply, SubmitError> {
        self.engine.count(self.request(job))
    }

    fn status(&self) -> Status<Self::Info> {
        self.engine.status()
    }

    fn stopped(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(self.engine.stopped())
    }

    fn finished(s: &Self::Summary) -> Finished {
        Finished {
            completion_tokens: s.stats.completion_tokens as u64,
            tool_calls: s.tool_calls,
            hit_length: s.stats.finish_reason == jemma_engine::generate::FinishReason::Length,
            decode_tps: s.decode_tps,
            stop_sequence: s.stop_sequence.clone(),
            reasoning_tokens: s.reasoning_tokens as u64,
            audio_tokens: s.audio_tokens as u64,
            speculative: s
                .speculative
                .filter(|sp| sp.rounds > 0)
                .map(|sp| jemma_router::api::Speculation::new(sp.rounds, sp.drafted, sp.accepted)),
        }
    }

    fn details(i: &Self::Info) -> Value {
        json!({
            "speculative": i.speculative,
            "device": i.device,
            "mlx_active_bytes": i.memory.active_bytes,
            "mlx_peak_bytes": i.memory.peak_bytes,
            "process_rss_bytes": i.process_rss_bytes,
            "dtype": i.load.as_ref().map(|l| l.dtype.clone()),
            "footprint": i.footprint,
        })
    }
}

impl Mlx {
    /// The MLX engine's request for `job`.
    fn request(&self, job: Job) -> jemma_engine::runtime::Request {
        use jemma_engine::generate::GenerateOptions;
        jemma_engine::runtime::Request {
            prompt: job.prompt,
            options: GenerateOptions {
                sampling: job.sampling,
                max_tokens: job.max_tokens,
                logprobs: job.logprobs,
                top_logprobs: job.top_logprobs,
                kv_quant: self.kv_quant,
                ..Default::default()
            },
            stop: job.stop,
            parse_output: job.parse_output,
            constraint: job.constraint,
            thinking_token_budget: job.thinking_token_budget,
            parallel_tool_calls: job.parallel_tool_calls,
            fit_context: job.fit_context,
            images: job.images,
            audio: job.audio,
            videos: job.videos,
        }
    }
}

/// The llama.cpp engine (GGUF models): the default local engine on Linux and Intel machines and the engine
/// of the Cloud Run heavy tier.
#[cfg(feature = "llama")]
impl InProcess for jemma_engine_llama::LlamaEngine {
    type Summary = jemma_engine_llama::Summary;
    type Info = jemma_engine_llama::LlamaInfo;
    const NAME: &'static str = "llama.cpp";
    // Through libmtmd, with the model's mmproj GGUF (`input_modalities` says which towers it has).
    const SEES_IMAGES: bool = true;
    const HEARS_AUDIO: bool = true;

    fn input_modalities(info: &Self::Info) -> Vec<Modality> {
        info.input_modalities.clone()
    }

    fn chats(info: &Self::Info) -> Option<bool> {
        info.chat_template
    }

    fn cannot_take(info: &Self::Info, modality: Modality) -> Option<String> {
        Some(match modality {
            _ if info.input_modalities.len() == 1 => {
                "it is served without an mmproj GGUF (its vision and audio towers: set the tier's \
                 `mmproj`)"
                    .into()
            }
            Modality::Image => "its mmproj has no vision tower".into(),
            Modality::Video if info.input_modalities.contains(&Modality::Image) => {
                "its vocabulary has no <|video|> token (video is shown as Gemma 4 shows it)".into()
            }
            Modality::Video => "its mmproj has no vision tower".into(),
            _ => "its mmproj has no audio tower".into(),
        })
    }

    fn submit(&self, job: Job) -> Result<mpsc::Receiver<Event<Self::Summary>>, SubmitError> {
        jemma_engine_llama::LlamaEngine::submit(self, llama_request(job))
    }

    fn count(&self, job: Job) -> Result<jemma_serve::host::CountReply, SubmitError> {
        jemma_engine_llama::LlamaEngine::count(self, llama_request(job))
    }

    fn status(&self) -> Status<Self::Info> {
        jemma_engine_llama::LlamaEngine::status(self)
    }

    fn stopped(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(jemma_engine_llama::LlamaEngine::stopped(self))
    }

    fn finished(s: &Self::Summary) -> Finished {
        Finished {
            completion_tokens: s.completion_tokens as u64,
            tool_calls: s.tool_calls,
            hit_length: s.finish == jemma_engine_llama::Finish::Length,
            decode_tps: s.decode_tps,
            stop_sequence: s.stop_sequence.clone(),
            reasoning_tokens: s.reasoning_tokens as u64,
            audio_tokens: s.audio_tokens as u64,
            speculative: s
                .speculative
                .filter(|sp| sp.rounds > 0)
                .map(|sp| jemma_router::api::Speculation::new(sp.rounds, sp.drafted, sp.accepted)),
        }
    }

    fn details(i: &Self::Info) -> Value {
        json!({
            "speculative": i.speculative,
            "gpu_layers": i.gpu_layers,
            "threads": i.threads,
            "model_bytes": i.model_bytes,
            "footprint_bytes": i.footprint_bytes,
            "cache_type_k": i.cache_type_k,
            "cache_type_v": i.cache_type_v,
        })
    }
}

/// The llama.cpp engine's request for `job`.
#[cfg(feature = "llama")]
fn llama_request(job: Job) -> jemma_engine_llama::Request {
    jemma_engine_llama::Request {
        prompt: job.prompt,
        sampling: job.sampling,
        max_tokens: job.max_tokens,
        stop: job.stop,
        parse_output: job.parse_output,
        constraint: job.constraint,
        thinking_token_budget: job.thinking_token_budget,
        parallel_tool_calls: job.parallel_tool_calls,
        fit_context: job.fit_context,
        ignore_eos: false,
        logprobs: job.logprobs,
        top_logprobs: job.top_logprobs,
        images: job.images,
        audio: job.audio,
        videos: job.videos,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test
    use jemma_constrain::Constraint;
    use jemma_router::api::{ChatCompletionRequest, Limits};
    use serde_json::{Value, json};

    fn constraint(extra: Value) -> Option<Constraint> {
        let mut body = json!({"messages": [{"role": "user", "content": "x"}], "tools": [
            {"type": "function", "function": {"name": "f", "strict": true, "parameters": {"type": "object",
                "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
            {"type": "function", "function": {"name": "g", "parameters": {"type": "object",
                "properties": {"b": {"type": "string"}}}}}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let req = serde_json::from_value::<ChatCompletionRequest>(body)
            .unwrap()
            .validate(&Limits::default())
            .unwrap();
        super::constraint_of(&req)
    }

    /// A strict function under "auto" (given or implied) makes a lazy grammar over every function: the
    /// strict one with its schema, the other with any object; thinking does not wrap it (the thought is
    /// free text before the call). "none" and a JSON response format keep their own meaning.
    #[test]
    fn a_strict_function_under_auto_is_enforced_lazily() {
        for extra in [
            json!({}),
            json!({"tool_choice": "auto"}),
            json!({"reasoning_effort": "high"}),
        ] {
            let Some(Constraint::LazyToolCalls { tools, parallel }) = constraint(extra.clone())
            else {
                panic!("{extra}: {:?}", constraint(extra.clone()));
            };
            assert!(parallel);
            assert_eq!(tools[0].parameters["required"], json!(["a"]));
            assert_eq!(tools[1].parameters, json!({"type": "object"}));
        }
        assert_eq!(constraint(json!({"tool_choice": "none"})), None);
        assert!(matches!(
            constraint(json!({"tool_choice": "required"})),
            Some(Constraint::ToolCalls { .. })
        ));
        // A JSON format with tools under auto: the format or a call.
        let Some(Constraint::JsonOrToolCalls { json, tools, .. }) =
            constraint(json!({"response_format": {"type": "json_object"}}))
        else {
            panic!("JSON or calls")
        };
        assert_eq!((*json, tools.len()), (Constraint::JsonObject, 2));
        assert_eq!(
            constraint(json!({"response_format": {"type": "json_object"}, "tool_choice": "none"})),
            Some(Constraint::JsonObject)
        );
        assert!(matches!(
            constraint(json!({"parallel_tool_calls": false})),
            Some(Constraint::LazyToolCalls {
                parallel: false,
                ..
            })
        ));
    }
}
