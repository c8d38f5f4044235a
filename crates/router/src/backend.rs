//! The tier trait, [`Backend`], with the helpers every in-process engine's adapter shares (`jemma-node`'s
//! `in_process`: events to chunks, sampling, errors), and the `openai` kind: any OpenAI-compatible upstream
//! over HTTP (the Cloud Run heavy tier, a llama.cpp or vLLM server, another Jemma).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

pub use jemma_chat::event::{EngineFailure, FinishReason};
pub use jemma_media::Modality;

use crate::api::{
    ChatCompletionChunk, ChatCompletionRequest, ChatRequest, CompletionRequest, Message,
    ResponseFormat, Stop, StreamOptions, Usage,
};
use crate::dialect::Dialect;

/// One piece of an answer, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    /// The backend accepted the prompt.
    Started {
        /// Prompt tokens, when known.
        prompt_tokens: u64,
        /// Of those, the ones served from the prefix cache.
        cached_tokens: u64,
        /// How much of each video the model was given (`_routing.videos`); empty without videos, or
        /// from a backend that does not sample them itself.
        videos: Vec<crate::api::VideoSeen>,
    },
    /// Answer text.
    Content(String),
    /// Thinking text.
    Reasoning(String),
    /// A complete tool call.
    ToolCall {
        /// Function name.
        name: String,
        /// JSON-string arguments.
        arguments: String,
    },
    /// OpenAI `logprobs.content` entries for the tokens just sent.
    Logprobs(Vec<Value>),
    /// The answer advanced without anything for the client: tokens whose text is held back (a tool call is
    /// sent whole once it closes), or a local engine's prompt chunk read. The tier's stall deadline starts
    /// over ([`crate::config::TierConfig::idle_timeout_secs`]). Never sent to a client.
    Progress,
    /// The end.
    Done {
        /// Why it ended.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
        /// Decode tokens/s, when the backend knows it.
        decode_tps: Option<f64>,
        /// The stop string that ended the answer, when the backend knows it did (Anthropic's
        /// `stop_sequence`; None for an end-of-sequence token, a length cut, or an upstream that does not
        /// say).
        stop_sequence: Option<String>,
        /// Which endpoint of a pool answered, and the endpoints tried before it (None: not a pool).
        served_by: Option<ServedBy>,
        /// What speculative decoding did for this answer (None: the backend did not speculate).
        speculative: Option<crate::api::Speculation>,
    },
}

/// Where in a pool an answer came from ([`crate::pool`]): `_routing.endpoint`, and retries within the tier
/// for `_routing.fallback`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServedBy {
    /// The pool endpoint that finished the answer; None from a backend that is not a pool (an upstream
    /// saying which model answered).
    pub endpoint: Option<String>,
    /// The model that answered: an upstream's own name for it (the `model` of its response: a Jemma
    /// peer's served model rather than the tier it was asked for), else the endpoint's configured one.
    pub model: String,
    /// Each earlier attempt in this tier as (endpoint, what happened), e.g. (`node-a`, `upstream error
    /// 500: boom`); a mid-stream failure says it was continued.
    pub retries: Vec<(String, String)>,
}

/// How a backend failed. Only some failures are the tier's fault (they feed its breaker and trigger
/// fallback); a bad request is the client's and goes straight back.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum BackendError {
    /// The request cannot be served as given by this model (template error, context overflow, …).
    #[error("{0}")]
    BadRequest(String),
    /// The request is refused as given, with the status the error carries (an image too large, 413, or in
    /// a format this build cannot read, 415).
    #[error("{0}")]
    Refused(crate::RouterError),
    /// The upstream would not read a field the request sets (its dialect has no name for it,
    /// [`crate::dialect`]); nothing was sent. Refused (400) on a tier the client named; an automatic
    /// choice, and a pool, go on to one that reads it (no breaker counts it).
    #[error("{0}")]
    Unread(crate::RouterError),
    /// The tier is busy (queue full).
    #[error("tier busy: {0}")]
    Busy(String),
    /// The tier cannot serve now (loading, failed, unreachable, auth rejected).
    #[error("tier unavailable: {0}")]
    Unavailable(String),
    /// No answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The upstream answered with an error status.
    #[error("upstream error {status}: {message}")]
    Upstream {
        /// HTTP status.
        status: u16,
        /// Its message.
        message: String,
        /// Its `Retry-After` in seconds (either form: seconds, or an HTTP date, counted from now), if it
        /// sent one.
        retry_after_secs: Option<u64>,
    },
    /// The answer broke off mid-way.
    #[error("stream broken: {0}")]
    Broken(String),
}

impl BackendError {
    /// Whether the failure is the tier's (counts against its breaker, tries the next tier).
    pub fn is_tier_failure(&self) -> bool {
        !matches!(
            self,
            BackendError::BadRequest(_) | BackendError::Refused(_) | BackendError::Unread(_)
        )
    }

    /// Whether the backend turned the request away as busy or rate limited (429): not failing, so no
    /// breaker counts it.
    pub fn is_throttle(&self) -> bool {
        matches!(
            self,
            BackendError::Busy(_) | BackendError::Upstream { status: 429, .. }
        )
    }
}

/// Stream of chunks from a backend; dropping it cancels the work.
pub type ChunkStream = mpsc::Receiver<Result<Chunk, BackendError>>;

/// Where a tier's backend is in its life: one type for local engines (MLX, llama.cpp), pending downloads and
/// remote upstreams. Serialised to the strings `/health` has always shown (`"ready"`, `"loading 42%"`,
/// `"downloading 7%"`, `"not downloaded"`, …), which the tray and clients read.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum BackendState {
    /// Serving.
    Ready,
    /// Loading weights; `progress` is the share read (0 to 1).
    Loading {
        /// 0 to 1.
        progress: f32,
    },
    /// Weights released (idle keep-alive, memory pressure, or a refused load); the next request loads
    /// them again, so the tier still counts as available.
    Unloaded,
    /// Loading failed for good, or a pending model could not be fetched.
    Failed,
    /// A remote tier not contacted yet: it can serve until it fails (its breaker says so).
    #[default]
    Unknown,
    /// A remote tier that could not be reached at the last request.
    Unreachable,
    /// A remote tier that answered the last request with an error status.
    Error,
    /// The tier's model is not on disk and no download was asked for.
    NotDownloaded,
    /// The tier's model is being downloaded; `progress` is the share fetched (0 to 1).
    Downloading {
        /// 0 to 1.
        progress: f32,
    },
    /// A model change is looking up its model.
    Resolving,
    /// A cold model change: the old model is draining before the new one loads.
    Swapping,
}

impl BackendState {
    /// Whether the tier is on its way to serving (loading, downloading, resolving or swapping a model).
    pub fn is_starting(self) -> bool {
        matches!(
            self,
            Self::Loading { .. } | Self::Downloading { .. } | Self::Resolving | Self::Swapping
        )
    }

    /// Whether a request sent now can be served (at once, or after a transparent reload).
    pub fn can_serve(self) -> bool {
        matches!(self, Self::Ready | Self::Unknown | Self::Unloaded)
    }
}

impl std::fmt::Display for BackendState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ready => f.write_str("ready"),
            Self::Loading { progress } => write!(f, "loading {:.0}%", progress * 100.0),
            Self::Unloaded => f.write_str("unloaded"),
            Self::Failed => f.write_str("failed"),
            Self::Unknown => f.write_str("unknown"),
            Self::Unreachable => f.write_str("unreachable"),
            Self::Error => f.write_str("error"),
            Self::NotDownloaded => f.write_str("not downloaded"),
            Self::Downloading { progress } => write!(f, "downloading {:.0}%", progress * 100.0),
            Self::Resolving => f.write_str("resolving"),
            Self::Swapping => f.write_str("swapping"),
        }
    }
}

impl Serialize for BackendState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A backend's own view of its health.
#[derive(Debug, Clone, Serialize, Default)]
pub struct BackendHealth {
    /// Where the backend is in its life (serialised as today's strings: `ready`, `loading 42%`, …).
    pub state: BackendState,
    /// Model served.
    pub model: String,
    /// Whether weights are in memory (local) / the upstream answered recently (remote).
    pub model_loaded: bool,
    /// Last decode speed.
    pub tokens_per_second: f64,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// Context length, when known.
    pub context_length: Option<usize>,
    /// What the model takes in; empty when not known (an upstream says so only by answering).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub input_modalities: Vec<Modality>,
    /// Whether the model has a chat template, when known (false: a base model, which answers
    /// `/v1/completions` only; None: not known, as of an upstream, and taken to chat).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat: Option<bool>,
    /// An upstream's dialect ([`crate::dialect`]): configured, learned, or `auto` until learned (None: an
    /// in-process engine, which reads every field).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dialect: Option<Dialect>,
    /// Extra figures (memory, queue).
    pub details: Value,
}

impl BackendHealth {
    /// Whether the model is known not to see images (an unknown model may).
    pub fn refuses_images(&self) -> bool {
        self.refuses_any(&[Modality::Image])
    }

    /// Whether the model is known to have no chat template (a base model).
    pub fn refuses_chat(&self) -> bool {
        self.chat == Some(false)
    }

    /// Whether the backend is known not to read a field `req` sets (an upstream whose dialect has no name
    /// for it, [`Dialect::unread_fields`]; an in-process engine or an upstream not learned yet may).
    pub fn refuses_fields_of(&self, req: &ChatRequest) -> bool {
        self.dialect
            .is_some_and(|d| !d.unread_fields(req).is_empty())
    }

    /// Whether the model is known not to take one of `modalities` (an unknown model may take them all).
    pub fn refuses_any(&self, modalities: &[Modality]) -> bool {
        !self.input_modalities.is_empty()
            && modalities
                .iter()
                .any(|m| !self.input_modalities.contains(m))
    }
}

/// A tier's engine: local or remote, one interface.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Model id this backend serves.
    fn model(&self) -> String;
    /// Starts an answer. `continuation` is assistant text already sent to the client by another tier: the
    /// backend continues it rather than starting over.
    async fn start(
        &self,
        req: &ChatRequest,
        continuation: Option<&str>,
    ) -> Result<ChunkStream, BackendError>;
    /// Current health (cheap, never blocks on generation).
    fn health(&self) -> BackendHealth;
    /// How many requests the backend runs at once now, where it knows: an in-process engine's batch size
    /// while its model is loaded, which the memory budget may have made smaller than the tier's
    /// `max_concurrency`. None: not known (an upstream, an engine with no model loaded).
    fn capacity(&self) -> Option<usize> {
        None
    }
    /// Switches the tier to another model without a restart (local tiers: a directory, catalog name or
    /// Hub repo, downloaded if needed, loaded beside the current one, then swapped in).
    async fn set_model(&self, model: &str) -> Result<(), BackendError> {
        let _ = model;
        Err(BackendError::BadRequest(
            "this tier's model is set by its upstream; change the tier's configuration".into(),
        ))
    }
    /// How many tokens `req`'s prompt takes on this tier (its chat template and tokenizer), without running
    /// it: Anthropic's `count_tokens`. None: this backend cannot count (an OpenAI-compatible upstream has no
    /// standard way to).
    async fn count_tokens(&self, req: &ChatRequest) -> Option<Result<u64, BackendError>> {
        let _ = req;
        None
    }
    /// An active health check for a pool's prober ([`crate::pool`]): Ok when a request sent now could be
    /// served. The default reads [`Backend::health`] (an in-process engine); an upstream asks over HTTP.
    async fn probe(&self) -> Result<(), BackendError> {
        let h = self.health();
        if h.state.can_serve() {
            Ok(())
        } else {
            Err(BackendError::Unavailable(format!(
                "{}{}",
                h.state,
                h.last_error.map(|e| format!(": {e}")).unwrap_or_default()
            )))
        }
    }
    /// Whether this backend is another Jemma node (a request forwarded to this node is not sent on to one:
    /// see [`FORWARDED_HEADER`]).
    fn is_peer(&self) -> bool {
        false
    }
    /// Whether this backend applies the tier's first-token and idle timeouts itself (a pool, which must
    /// time out one endpoint and go on to the next within the same answer); the router then does not.
    fn manages_timeouts(&self) -> bool {
        false
    }
    /// This backend as a pool, when it is one (so that endpoints can join and leave it at run time).
    fn as_pool(&self) -> Option<&crate::pool::Pool> {
        None
    }
    /// Resolves once this backend's engine has stopped and released its memory, after every handle to it
    /// is dropped (immediately for backends without one).
    fn stopped(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async {})
    }
}

/// The request's sampling parameters, as both in-process engines take them.
pub fn sampling_of(req: &ChatRequest) -> jemma_chat::sampling::SamplingParams {
    jemma_chat::sampling::SamplingParams {
        temperature: req.temperature.unwrap_or(0.0),
        top_p: req.top_p.unwrap_or(1.0),
        top_k: req.top_k.unwrap_or(0),
        min_p: req.min_p.unwrap_or(0.0),
        repetition_penalty: req.repetition_penalty,
        presence_penalty: req.presence_penalty.unwrap_or(0.0),
        frequency_penalty: req.frequency_penalty.unwrap_or(0.0),
        logit_bias: req.logit_bias.clone(),
        seed: req.seed,
        ..Default::default()
    }
}

/// Forwards an in-process engine's events as chunks from a task. Dropping the returned stream ends the task
/// at its next event, which drops `events` and so cancels the engine's work.
pub fn forward_events<E: Send + 'static>(
    mut events: mpsc::Receiver<E>,
    mut map: impl FnMut(E) -> Result<Chunk, BackendError> + Send + 'static,
) -> ChunkStream {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if tx.send(map(ev)).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// How an in-process engine's request ended, read off its summary.
pub struct Finished {
    /// Generated tokens.
    pub completion_tokens: u64,
    /// Whether tool calls were emitted (finish_reason "tool_calls").
    pub tool_calls: bool,
    /// Whether `max_tokens` ended it (finish_reason "length").
    pub hit_length: bool,
    /// Decode speed, for the tray's live tok/s.
    pub decode_tps: f64,
    /// The stop string that ended it, if one did.
    pub stop_sequence: Option<String>,
    /// Of the generated tokens, those spent thinking.
    pub reasoning_tokens: u64,
    /// Of the prompt's tokens, those holding audio (`prompt_tokens_details.audio_tokens`).
    pub audio_tokens: u64,
    /// What speculative decoding did (None: the engine did not speculate).
    pub speculative: Option<crate::api::Speculation>,
}

/// The chunk stream of an in-process engine (MLX or llama.cpp): both send the same events and differ only
/// in their summary, which `finished` reads. `videos` (how much of each video the model was given) goes
/// out with `Started`.
pub fn engine_chunks<S: Send + 'static>(
    events: mpsc::Receiver<jemma_chat::event::Event<S>>,
    videos: Vec<crate::api::VideoSeen>,
    finished: impl Fn(S) -> Finished + Send + 'static,
) -> ChunkStream {
    use jemma_chat::event::Event;
    let mut videos = videos;
    let mut prompt_tokens = 0u64;
    let mut cached = 0u64;
    forward_events(events, move |ev| match ev {
        Event::Started {
            prompt_tokens: p,
            cached_tokens,
        } => {
            prompt_tokens = p as u64;
            cached = cached_tokens as u64;
            Ok(Chunk::Started {
                prompt_tokens,
                cached_tokens: cached,
                videos: std::mem::take(&mut videos),
            })
        }
        Event::Content(c) => Ok(Chunk::Content(c)),
        Event::Reasoning(r) => Ok(Chunk::Reasoning(r)),
        Event::ToolCall(tc) => Ok(Chunk::ToolCall {
            name: tc.name,
            arguments: tc.arguments.to_string(),
        }),
        // Serialising a struct of strings, numbers and byte lists cannot fail.
        Event::Logprobs(t) => Ok(Chunk::Logprobs(
            serde_json::to_value(&t).into_iter().collect(),
        )),
        Event::Progress => Ok(Chunk::Progress),
        Event::Done(s) => Ok(done_chunk(prompt_tokens, cached, finished(s))),
        Event::Error(e) => Err(engine_error(e)),
    })
}

fn done_chunk(prompt_tokens: u64, cached_tokens: u64, f: Finished) -> Chunk {
    // `max_tokens` cutting the answer is `length` even inside a tool call, as OpenAI reports it: the call
    // the parser closed with repairs was not finished by the model.
    let finish = match (f.tool_calls, f.hit_length) {
        (_, true) => FinishReason::Length,
        (true, false) => FinishReason::ToolCalls,
        (false, false) => FinishReason::Stop,
    };
    Chunk::Done {
        finish_reason: finish,
        usage: Usage::new(
            prompt_tokens,
            f.completion_tokens,
            cached_tokens,
            f.reasoning_tokens,
        )
        .with_audio_tokens(f.audio_tokens),
        decode_tps: Some(f.decode_tps),
        stop_sequence: f.stop_sequence,
        served_by: None,
        speculative: f.speculative,
    }
}

/// An in-process engine's failure as a backend error: a request problem is the client's (HTTP 400, the
/// breaker untouched); anything else is the tier's failure.
pub fn engine_error(failure: EngineFailure) -> BackendError {
    match failure {
        EngineFailure::InvalidRequest(m) => BackendError::BadRequest(m),
        EngineFailure::Fault(m) => BackendError::Broken(m),
    }
}

/// Messages with the continuation appended as a trailing assistant turn.
pub fn with_continuation(messages: &[Message], continuation: Option<&str>) -> Vec<Message> {
    let mut m = messages.to_vec();
    if let Some(c) = continuation.filter(|c| !c.is_empty()) {
        m.push(Message::assistant(Some(c.to_string()), vec![]));
    }
    m
}

/// The header a pool sends with requests to another Jemma node: that node serves them with its own tier
/// only (no fallback, no further peers), so nodes that pool each other cannot pass a request around.
pub const FORWARDED_HEADER: &str = "x-jemma-forwarded";

/// Settings of an OpenAI-compatible upstream.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Base URL (with or without `/v1`).
    pub url: String,
    /// Bearer key.
    pub api_key: Option<String>,
    /// Model name to send upstream.
    pub model: String,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Default max tokens.
    pub default_max_tokens: u32,
    /// How [`Backend::probe`] checks it.
    pub probe: Probe,
    /// What it calls the fields OpenAI's API lacks ([`Dialect::Auto`]: learned from its `/v1/models`;
    /// a Jemma node, [`Probe::Jemma`], speaks [`Dialect::Jemma`] whatever this says).
    pub dialect: Dialect,
}

impl OpenAiConfig {
    /// An upstream at `url` asked for `model`, probed as `probe`, with no key, a 10 s connect timeout
    /// and its dialect learned ([`Dialect::Auto`]); `default_max_tokens` when a request sets none.
    pub fn new(url: &str, model: String, probe: Probe, default_max_tokens: u32) -> Self {
        Self {
            url: url.to_string(),
            api_key: None,
            model,
            connect_timeout: Duration::from_secs(10),
            default_max_tokens,
            probe,
            dialect: Dialect::Auto,
        }
    }
}

/// How an OpenAI-compatible upstream is health-checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `GET /v1/models` answers 2xx (any OpenAI-compatible server).
    Models,
    /// `GET /health` of another Jemma node answers 2xx and shows `tier` serving (enabled, breaker
    /// closed, its backend ready, unloaded or not contacted yet).
    Jemma {
        /// The peer's tier this endpoint sends to.
        tier: String,
    },
}

/// Any OpenAI-compatible server as a tier.
pub struct OpenAiBackend {
    cfg: OpenAiConfig,
    client: reqwest::Client,
    health: Arc<std::sync::Mutex<BackendHealth>>,
    /// The dialect it speaks: the configured one, or [`Dialect::Auto`] until learned.
    dialect: std::sync::Mutex<Dialect>,
}

impl OpenAiBackend {
    /// Builds the client.
    pub fn new(cfg: OpenAiConfig) -> Result<Self, BackendError> {
        let client = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .build()
            .map_err(|e| BackendError::Unavailable(format!("HTTP client: {e}")))?;
        let health = BackendHealth {
            state: BackendState::Unknown,
            model: cfg.model.clone(),
            ..Default::default()
        };
        let dialect = match cfg.probe {
            Probe::Jemma { .. } => Dialect::Jemma,
            Probe::Models => cfg.dialect,
        };
        Ok(Self {
            cfg,
            client,
            health: Arc::new(std::sync::Mutex::new(health)),
            dialect: std::sync::Mutex::new(dialect),
        })
    }

    /// The dialect it speaks, once configured or learned ([`Dialect::Auto`]: not yet).
    fn known_dialect(&self) -> Dialect {
        *self
            .dialect
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Learns the dialect from a `/v1/models` answer: the `owned_by` of the entry for this tier's model,
    /// else of the first entry ([`Dialect::from_owned_by`]; none, or not a model list: OpenAI's). Each
    /// probe learns it again (the server behind a URL may change); a change is logged.
    fn learn_dialect(&self, models: &str) -> Dialect {
        let v: Value = serde_json::from_str(models).unwrap_or_default();
        let entries = v["data"].as_array().map(Vec::as_slice).unwrap_or_default();
        let owned_by = entries
            .iter()
            .find(|m| m["id"].as_str() == Some(self.cfg.model.as_str()))
            .or(entries.first())
            .and_then(|m| m["owned_by"].as_str())
            .unwrap_or_default();
        let d = Dialect::from_owned_by(owned_by);
        let was = std::mem::replace(
            &mut *self
                .dialect
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            d,
        );
        if was != d {
            tracing::info!(
                "the upstream at {} speaks the {} dialect (its /v1/models says owned_by {owned_by:?})",
                self.cfg.url,
                d.as_str()
            );
        }
        d
    }

    /// The dialect `req` is sent in: the known one; when `req` sets something dialects name or read
    /// differently ([`crate::dialect::depends_on_dialect`]) and none is known yet, learned now from `GET
    /// /v1/models` (a client error there, such as a 404 from a server without the route: OpenAI's). A
    /// request that sets nothing of the kind is sent as it is, without asking.
    ///
    /// Errors: the upstream cannot be reached, rejects the key (401, 403) or fails (5xx) on
    /// `/v1/models`.
    async fn dialect_for(&self, req: &ChatRequest) -> Result<Dialect, BackendError> {
        let known = self.known_dialect();
        if known != Dialect::Auto || !crate::dialect::depends_on_dialect(req) {
            return Ok(known);
        }
        let url = format!("{}/models", self.v1());
        let mut rb = self.client.get(&url);
        if let Some(k) = &self.cfg.api_key {
            rb = rb.bearer_auth(k);
        }
        let resp = rb.send().await.map_err(|e| {
            BackendError::Unavailable(format!(
                "cannot reach {url} to learn which fields the upstream reads: {e}"
            ))
        })?;
        let status = resp.status();
        if status.is_success() {
            Ok(self.learn_dialect(&resp.text().await.unwrap_or_default()))
        } else if status.is_client_error()
            && status != reqwest::StatusCode::UNAUTHORIZED
            && status != reqwest::StatusCode::FORBIDDEN
        {
            Ok(self.learn_dialect(""))
        } else {
            Err(BackendError::Unavailable(format!(
                "{url} answered {status}: cannot learn which fields the upstream reads"
            )))
        }
    }

    fn endpoint(&self) -> String {
        format!("{}/chat/completions", self.v1())
    }

    /// Where `req` goes upstream: a raw prompt (`/v1/completions`) to the upstream's own
    /// `/v1/completions`, which reads it as it is (as a chat, the upstream's template would wrap it).
    fn endpoint_for(&self, req: &ChatRequest) -> String {
        if req.raw_prompt.is_some() {
            format!("{}/completions", self.v1())
        } else {
            self.endpoint()
        }
    }

    /// The base URL ending in `/v1`.
    fn v1(&self) -> String {
        let base = self.cfg.url.trim_end_matches('/');
        if base.ends_with("/v1") {
            base.to_string()
        } else {
            format!("{base}/v1")
        }
    }

    /// The upstream request: the client's, validated, in the same wire types, with the upstream's model
    /// name, the tier's default `max_tokens`, and a stream that ends with usage. Absent options are left
    /// out (OpenAI refuses parameters it does not know, such as `top_k`, even as null).
    fn body(
        &self,
        req: &ChatRequest,
        continuation: Option<&str>,
        dialect: Dialect,
    ) -> ChatCompletionRequest {
        let mut messages = with_continuation(&req.messages, continuation);
        let mut response_format = req.response_format.clone();
        // A server that would not show the format's description to its model is sent it in the system
        // instruction instead, as the in-process engines show it.
        if !dialect.shows_format_description()
            && let Some(note) = req.response_format.instruction()
        {
            messages = crate::api::with_system_note(messages, &note);
            if let ResponseFormat::JsonSchema { json_schema } = &mut response_format {
                json_schema.description = None;
            }
        }
        ChatCompletionRequest {
            model: Some(self.cfg.model.clone()),
            messages,
            max_tokens: Some(req.max_tokens.unwrap_or(self.cfg.default_max_tokens)),
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            min_p: req.min_p,
            stop: (!req.stop.is_empty()).then(|| Stop::Many(req.stop.clone())),
            seed: req.seed,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            repetition_penalty: req.repetition_penalty,
            logit_bias: (!req.logit_bias.is_empty()).then(|| {
                req.logit_bias
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect()
            }),
            logprobs: req.logprobs.then_some(true),
            top_logprobs: req.logprobs.then_some(req.top_logprobs),
            tools: req.tools.clone(),
            tool_choice: req.tool_choice.clone(),
            parallel_tool_calls: req.parallel_tool_calls,
            response_format: (response_format != ResponseFormat::Text).then_some(response_format),
            chat_template_kwargs: req
                .enable_thinking
                .map(|t| [("enable_thinking".to_string(), Value::Bool(t))].into()),
            thinking_token_budget: req.thinking_token_budget,
            stream: true,
            stream_options: Some(StreamOptions {
                include_usage: true,
                include_obfuscation: None,
            }),
            ..Default::default()
        }
    }

    /// The upstream request for a raw prompt, `/v1/completions`' body: the prompt (with what an earlier
    /// tier already answered appended, for a continuation), and the sampling fields the client set.
    fn completion_body(
        &self,
        req: &ChatRequest,
        prompt: &str,
        continuation: Option<&str>,
    ) -> Value {
        // A plain prompt has no messages or format: the dialect changes nothing here.
        let chat = self.body(req, None, Dialect::Auto);
        let body = CompletionRequest {
            model: chat.model,
            prompt: Value::String(format!("{prompt}{}", continuation.unwrap_or_default())),
            max_tokens: chat.max_tokens,
            temperature: chat.temperature,
            top_p: chat.top_p,
            top_k: chat.top_k,
            stop: chat.stop,
            seed: chat.seed,
            presence_penalty: chat.presence_penalty,
            frequency_penalty: chat.frequency_penalty,
            stream: true,
            stream_options: chat.stream_options,
            min_p: chat.min_p,
            repetition_penalty: chat.repetition_penalty,
            logit_bias: chat.logit_bias,
            logprobs: req.logprobs.then_some(req.top_logprobs),
            ..Default::default()
        };
        wire_json(&body)
    }

    fn note(&self, state: BackendState, err: Option<String>) {
        if let Ok(mut h) = self.health.lock() {
            h.state = state;
            h.model_loaded = state == BackendState::Ready;
            if err.is_some() {
                h.last_error = err;
            }
        }
    }
}

/// `body` as the JSON value it is sent as. Through its text rather than `serde_json::to_value`, which would
/// widen an `f32` to the nearest `f64` (a `repetition_penalty` of 1.3 sent as 1.2999999523162842); the text
/// holds the shortest form that reads back as the same `f32`.
fn wire_json<T: Serialize>(body: &T) -> Value {
    serde_json::to_string(body)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

/// An upstream's body with invalid UTF-8 replaced by U+FFFD (as a browser's EventSource decodes it), keeping
/// a character split across reads whole. eventsource-stream would otherwise hold back everything after an
/// invalid byte, waiting for it to complete, and stall the answer until the idle timeout.
fn lossy_utf8<S, B, E>(body: S) -> impl futures_util::Stream<Item = Result<Vec<u8>, E>>
where
    S: futures_util::Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
{
    use futures_util::StreamExt;
    let mut pending: Vec<u8> = vec![];
    body.map(move |read| {
        read.map(|bytes| {
            pending.extend_from_slice(bytes.as_ref());
            let mut out = String::with_capacity(pending.len());
            loop {
                match std::str::from_utf8(&pending) {
                    Ok(s) => {
                        out.push_str(s);
                        pending.clear();
                        break;
                    }
                    Err(e) => {
                        let valid = e.valid_up_to();
                        out.push_str(&String::from_utf8_lossy(&pending[..valid]));
                        match e.error_len() {
                            // An invalid sequence: one replacement character, then go on after it.
                            Some(bad) => {
                                out.push('\u{FFFD}');
                                pending.drain(..valid + bad);
                            }
                            // A character cut off at the end of this read: wait for the rest.
                            None => {
                                pending.drain(..valid);
                                break;
                            }
                        }
                    }
                }
            }
            out.into_bytes()
        })
    })
}

/// A `/v1/completions` stream chunk (`choices[].text`, `text_completion`, the legacy `logprobs`) as the
/// chat chunk it stands for (`choices[].delta.content`, `logprobs.content`).
fn completion_as_chat_chunk(mut v: Value) -> Value {
    // `get_mut`, not indexing: indexing a payload that is not an object (`data: 1`) would panic.
    let choices = v.get_mut("choices").and_then(Value::as_array_mut);
    for choice in choices.into_iter().flatten() {
        if let Some(c) = choice.as_object_mut() {
            if let Some(lp) = c.remove("logprobs") {
                // llama-server answers /v1/completions with chat's shape (`content`); OpenAI, vLLM and
                // Jemma with the legacy one.
                let entries = match lp.get("content") {
                    Some(Value::Array(e)) => e.clone(),
                    _ => serde_json::from_value::<crate::api::CompletionLogprobs>(lp)
                        .map(|l| l.to_chat())
                        .unwrap_or_default(),
                };
                if !entries.is_empty() {
                    c.insert("logprobs".into(), serde_json::json!({ "content": entries }));
                }
            }
            if let Some(text) = c.remove("text") {
                c.insert("delta".into(), serde_json::json!({ "content": text }));
            }
        }
    }
    v
}

/// A `Retry-After` value in seconds from `now`: its delay form (`120`) or its HTTP-date form
/// (`Wed, 21 Oct 2026 07:28:00 GMT`, RFC 9110 §10.2.3), rounded up; a date already past is 0. None: neither.
pub fn retry_after(value: &str, now: std::time::SystemTime) -> Option<u64> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(secs);
    }
    let at = httpdate::parse_http_date(v).ok()?;
    let d = at.duration_since(now).unwrap_or_default();
    Some(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

#[async_trait]
impl Backend for OpenAiBackend {
    fn model(&self) -> String {
        self.cfg.model.clone()
    }

    async fn start(
        &self,
        req: &ChatRequest,
        continuation: Option<&str>,
    ) -> Result<ChunkStream, BackendError> {
        let raw = req.raw_prompt.is_some();
        let dialect = self.dialect_for(req).await?;
        let mut body = match &req.raw_prompt {
            Some(p) => self.completion_body(req, p, continuation),
            None => wire_json(&self.body(req, continuation, dialect)),
        };
        // A call the upstream is asked for as JSON: its content is read back into the call at the end.
        let forced = match &mut body {
            Value::Object(fields) => dialect.adapt(req, fields).map_err(BackendError::Unread)?,
            _ => None,
        };
        let mut rb = self.client.post(self.endpoint_for(req)).json(&body);
        if let Some(k) = &self.cfg.api_key {
            rb = rb.bearer_auth(k);
        }
        if self.is_peer() {
            rb = rb.header(FORWARDED_HEADER, "1");
        }
        let resp = rb.send().await.map_err(|e| {
            let err = if e.is_timeout() {
                BackendError::Timeout(e.to_string())
            } else {
                BackendError::Unavailable(format!("cannot reach {}: {e}", self.cfg.url))
            };
            self.note(BackendState::Unreachable, Some(err.to_string()));
            err
        })?;
        let status = resp.status();
        if !status.is_success() {
            let retry_after_secs = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry_after(v, std::time::SystemTime::now()));
            let text = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    v.pointer("/error/message")
                        .and_then(Value::as_str)
                        .map(String::from)
                })
                .unwrap_or(text);
            let err = match status.as_u16() {
                400 | 413 | 422 => BackendError::BadRequest(message),
                // A chat-only server (exo, Gemini's or Groq's OpenAI-compatible API) has no
                // /v1/completions: a plain prompt cannot be read there untemplated. That is the
                // request's limit on this tier, not the tier failing (its chats go on).
                404 if raw => BackendError::BadRequest(format!(
                    "this tier's upstream answered 404 at {} for model {:?} ({message}): it has no \
                     /v1/completions, so a plain prompt cannot be read there untemplated; send it as a \
                     chat, or to a local tier",
                    self.endpoint_for(req),
                    self.cfg.model
                )),
                // The client never names the upstream's model or path (the tier's configuration
                // does): a 404 is this upstream's fault, and a pool tries another endpoint.
                404 => BackendError::Upstream {
                    status: 404,
                    message: format!(
                        "the upstream does not serve model {:?} at {}: {message}",
                        self.cfg.model,
                        self.endpoint_for(req)
                    ),
                    retry_after_secs: None,
                },
                // Throttled: not the upstream's failure (no breaker count), but its Retry-After is a
                // cooldown a pool honours and the client is told.
                429 => BackendError::Upstream {
                    status: 429,
                    message,
                    retry_after_secs,
                },
                401 | 403 => BackendError::Unavailable(format!(
                    "upstream rejected the key ({status}): {message}"
                )),
                s => BackendError::Upstream {
                    status: s,
                    message,
                    retry_after_secs,
                },
            };
            if err.is_tier_failure() {
                self.note(BackendState::Error, Some(err.to_string()));
            }
            return Err(err);
        }
        self.note(BackendState::Ready, None);
        let peer = self.is_peer();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            use eventsource_stream::Eventsource;
            use futures_util::StreamExt;
            // Server-sent events as the WHATWG spec parses them: any line ending, events and UTF-8
            // split across reads, comments (keep-alives), multi-line data.
            let mut events = lossy_utf8(resp.bytes_stream()).eventsource();
            // Tool-call deltas arrive in pieces keyed by index; they are emitted whole at the end.
            let mut calls: Vec<(String, String)> = vec![];
            // The answer of a forced call asked for as JSON ([`crate::dialect::ForcedCall`]).
            let mut forced_text = String::new();
            let mut finish: Option<FinishReason> = None;
            // vLLM and SGLang say which stop string ended the answer (`stop_reason`, a string; a token id
            // when a stop token did); OpenAI does not.
            let mut stop_sequence: Option<String> = None;
            let mut usage = Usage::default();
            let mut started = false;
            // What the upstream calls the model that answered.
            let mut upstream_model: Option<String> = None;
            loop {
                let data = match events.next().await {
                    Some(Ok(event)) => event.data,
                    Some(Err(e)) => {
                        let _ = tx.send(Err(BackendError::Broken(e.to_string()))).await;
                        return;
                    }
                    None => {
                        let _ = tx
                            .send(Err(BackendError::Broken(
                                "upstream closed the stream before [DONE]".into(),
                            )))
                            .await;
                        return;
                    }
                };
                // An event with no data (a bare `data:` line, which some proxies send as a keep-alive)
                // carries nothing to parse.
                if data.trim().is_empty() {
                    continue;
                }
                if data.trim() == "[DONE]" {
                    if let Some(f) = &forced {
                        match f.calls(&forced_text) {
                            Some(c) => {
                                calls.extend(c);
                                if finish != Some(FinishReason::Length) {
                                    finish = Some(FinishReason::ToolCalls);
                                }
                            }
                            // Cut by max_tokens: the text, as an in-process engine's cut call.
                            None if finish == Some(FinishReason::Length) => {
                                let text = std::mem::take(&mut forced_text);
                                if !text.is_empty()
                                    && tx.send(Ok(Chunk::Content(text))).await.is_err()
                                {
                                    return;
                                }
                            }
                            // Anything else is a call the upstream did not make: a failure, not an
                            // answer (nothing was sent yet, so a route can fall back).
                            None => {
                                let _ = tx
                                    .send(Err(BackendError::Broken(format!(
                                        "the upstream's answer to a forced tool call is not the call's \
                                         JSON: {:?}",
                                        forced_text.chars().take(200).collect::<String>()
                                    ))))
                                    .await;
                                return;
                            }
                        }
                    }
                    for (name, arguments) in calls.drain(..) {
                        if tx
                            .send(Ok(Chunk::ToolCall { name, arguments }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    let decode_tps = None;
                    let _ = tx
                        .send(Ok(Chunk::Done {
                            finish_reason: finish.unwrap_or(FinishReason::Stop),
                            usage,
                            decode_tps,
                            stop_sequence: stop_sequence.take(),
                            speculative: None,
                            served_by: upstream_model.take().map(|model| ServedBy {
                                endpoint: None,
                                model,
                                retries: vec![],
                            }),
                        }))
                        .await;
                    return;
                }
                let Ok(v) = serde_json::from_str::<Value>(&data) else {
                    let _ = tx
                        .send(Err(BackendError::Broken(format!(
                            "bad SSE payload: {data}"
                        ))))
                        .await;
                    return;
                };
                if let Some(m) = v["model"].as_str().filter(|m| !m.is_empty()) {
                    upstream_model = Some(m.to_string());
                }
                if let Some(err) = v.get("error") {
                    let _ = tx
                        .send(Err(BackendError::Upstream {
                            status: 500,
                            message: err
                                .get("message")
                                .and_then(Value::as_str)
                                .unwrap_or("error")
                                .to_string(),
                            retry_after_secs: None,
                        }))
                        .await;
                    return;
                }
                if !started {
                    started = true;
                    if tx
                        .send(Ok(Chunk::Started {
                            prompt_tokens: 0,
                            cached_tokens: 0,
                            videos: vec![],
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                // A completion's chunk carries its text where a chat's carries its delta.
                let v = if raw { completion_as_chat_chunk(v) } else { v };
                let chunk = match serde_json::from_value::<ChatCompletionChunk>(v) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx
                            .send(Err(BackendError::Broken(format!(
                                "bad chunk from upstream: {e}: {data}"
                            ))))
                            .await;
                        return;
                    }
                };
                if let Some(u) = chunk.usage {
                    usage = u;
                }
                let Some(choice) = chunk.choices.into_iter().next() else {
                    continue;
                };
                // Another Jemma node's progress: a chunk with nothing in it (not its opening chunk, which
                // names the role, nor its last).
                let peer_progress =
                    peer && choice.delta.role.is_none() && choice.finish_reason.is_none();
                if let Some(f) = choice.finish_reason {
                    finish = Some(f);
                }
                if let Some(Value::String(s)) = choice.stop_reason {
                    stop_sequence = Some(s);
                }
                let delta = choice.delta;
                let mut out = vec![];
                // Whether this event added to a call held until it is whole.
                let mut held = false;
                if let Some(r) = delta
                    .reasoning_content
                    .or(delta.reasoning)
                    .filter(|s| !s.is_empty())
                {
                    out.push(Chunk::Reasoning(r));
                }
                if let Some(c) = delta.content.filter(|s| !s.is_empty()) {
                    match forced {
                        Some(_) => {
                            forced_text.push_str(&c);
                            held = true;
                        }
                        None => out.push(Chunk::Content(c)),
                    }
                }
                for tc in delta.tool_calls.into_iter().flatten() {
                    held = true;
                    let i = tc.index as usize;
                    while calls.len() <= i {
                        calls.push((String::new(), String::new()));
                    }
                    if let Some(f) = tc.function {
                        calls[i].0.push_str(f.name.as_deref().unwrap_or_default());
                        calls[i]
                            .1
                            .push_str(f.arguments.as_deref().unwrap_or_default());
                    }
                }
                if let Some(lp) = choice.logprobs.and_then(|l| l.content) {
                    out.push(Chunk::Logprobs(lp));
                }
                if (held || peer_progress) && out.is_empty() {
                    // A long call streams for longer than the idle deadline without a visible token.
                    out.push(Chunk::Progress);
                }
                for c in out {
                    if tx.send(Ok(c)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    fn health(&self) -> BackendHealth {
        let mut h = self.health.lock().map(|h| h.clone()).unwrap_or_default();
        // `auto` until learned: the key is there from the start.
        h.dialect = Some(self.known_dialect());
        h
    }

    fn is_peer(&self) -> bool {
        matches!(self.cfg.probe, Probe::Jemma { .. })
    }

    async fn probe(&self) -> Result<(), BackendError> {
        let v1 = self.v1();
        let url = match &self.cfg.probe {
            Probe::Models => format!("{v1}/models"),
            Probe::Jemma { .. } => format!("{}/health", v1.trim_end_matches("/v1")),
        };
        let mut rb = self.client.get(&url).timeout(Duration::from_secs(5));
        if let Some(k) = &self.cfg.api_key {
            rb = rb.bearer_auth(k);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| BackendError::Unavailable(format!("cannot reach {url}: {e}")))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if let Probe::Jemma { tier } = &self.cfg.probe {
            // A Jemma node's /health is 503 when none of its tiers serves, and says which do.
            let v: Value = serde_json::from_str(&body).map_err(|_| {
                BackendError::Unavailable(format!(
                    "{url} did not answer as a Jemma node ({status})"
                ))
            })?;
            if !v["jemma"]["version"].is_string() {
                return Err(BackendError::Unavailable(format!(
                    "{url} answered, but not as a Jemma node"
                )));
            }
            let t = &v["tiers"][tier.as_str()];
            if t.is_null() {
                return Err(BackendError::Unavailable(format!(
                    "the Jemma node at {} has no {tier} tier",
                    self.cfg.url
                )));
            }
            let state = t["backend"]["state"].as_str().unwrap_or("");
            // Half-open: its cooldown is over and its next request decides; this node's own breaker
            // for the endpoint judges that request.
            let serving = t["enabled"] == Value::Bool(true)
                && (t["breaker"]["state"] == "closed" || t["breaker"]["state"] == "half_open")
                && ["ready", "unloaded", "unknown"].contains(&state);
            return if serving {
                Ok(())
            } else {
                Err(BackendError::Unavailable(format!(
                    "the {tier} tier of {} is not serving ({state})",
                    self.cfg.url
                )))
            };
        }
        if status.is_success() {
            if self.cfg.dialect == Dialect::Auto && self.cfg.probe == Probe::Models {
                self.learn_dialect(&body);
            }
            Ok(())
        } else {
            Err(BackendError::Unavailable(format!(
                "{url} answered {status}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn max_tokens_cutting_a_tool_call_is_length() {
        let finished = |tool_calls, hit_length| Finished {
            completion_tokens: 10,
            tool_calls,
            hit_length,
            decode_tps: 1.0,
            stop_sequence: None,
            reasoning_tokens: 0,
            audio_tokens: 0,
            speculative: None,
        };
        let reason = |f| match done_chunk(5, 0, f) {
            Chunk::Done { finish_reason, .. } => finish_reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(finished(true, true)), FinishReason::Length);
        assert_eq!(reason(finished(true, false)), FinishReason::ToolCalls);
        assert_eq!(reason(finished(false, true)), FinishReason::Length);
        assert_eq!(reason(finished(false, false)), FinishReason::Stop);
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn backend_state_serialises_to_the_health_strings() {
        for (state, wire) in [
            (BackendState::Ready, "ready"),
            (BackendState::Loading { progress: 0.424 }, "loading 42%"),
            (BackendState::Unloaded, "unloaded"),
            (BackendState::Failed, "failed"),
            (BackendState::Unknown, "unknown"),
            (BackendState::Unreachable, "unreachable"),
            (BackendState::Error, "error"),
            (BackendState::NotDownloaded, "not downloaded"),
            (
                BackendState::Downloading { progress: 1.0 },
                "downloading 100%",
            ),
            (BackendState::Resolving, "resolving"),
            (BackendState::Swapping, "swapping"),
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), wire);
        }
        assert!(BackendState::Unloaded.can_serve() && !BackendState::Failed.can_serve());
        assert!(BackendState::Downloading { progress: 0.5 }.is_starting());
        assert!(!BackendState::Ready.is_starting());
    }

    #[test]
    fn engine_failures_map_by_variant_not_by_text() {
        // A fault whose message happens to read like a request error is still the tier's failure.
        let fault = engine_error(EngineFailure::Fault(
            "invalid request: looks like one".into(),
        ));
        assert!(fault.is_tier_failure());
        let client = engine_error(EngineFailure::InvalidRequest("prompt too long".into()));
        assert_eq!(client, BackendError::BadRequest("prompt too long".into()));
        assert!(!client.is_tier_failure());
    }

    #[test]
    fn retry_after_reads_both_forms() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2026 07:28:00 GMT").unwrap();
        assert_eq!(retry_after(" 120 ", now), Some(120));
        assert_eq!(retry_after("Wed, 21 Oct 2026 07:28:30 GMT", now), Some(30));
        assert_eq!(retry_after("Wed, 21 Oct 2026 07:27:00 GMT", now), Some(0));
        assert_eq!(retry_after("soon", now), None);
    }

    /// An upstream on loopback that answers one request: `head` (status line and headers), then
    /// `pieces`, as HTTP chunks when `chunked`. Its task returns the request's head as text.
    async fn upstream_once(
        head: &'static [u8],
        pieces: Vec<Vec<u8>>,
        chunked: bool,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut req = vec![0u8; 65536];
            let mut got = 0;
            while !req[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                got += sock.read(&mut req[got..]).await.unwrap();
            }
            sock.write_all(head).await.unwrap();
            for p in pieces {
                if chunked {
                    sock.write_all(format!("{:x}\r\n", p.len()).as_bytes())
                        .await
                        .unwrap();
                }
                sock.write_all(&p).await.unwrap();
                if chunked {
                    sock.write_all(b"\r\n").await.unwrap();
                }
                sock.flush().await.unwrap();
            }
            if chunked {
                sock.write_all(b"0\r\n\r\n").await.unwrap();
            }
            String::from_utf8_lossy(&req[..got]).to_string()
        });
        (addr, server)
    }

    /// What the backend reads (every chunk; an error fails the test) when it sends a one-message chat to
    /// [`upstream_once`] answering `head` and `pieces`, the upstream probed as `probe`.
    async fn read_upstream(
        head: &'static [u8],
        pieces: Vec<Vec<u8>>,
        chunked: bool,
        probe: Probe,
    ) -> Vec<Chunk> {
        use crate::api::{ChatCompletionRequest, Limits};
        let (addr, server) = upstream_once(head, pieces, chunked).await;
        let backend = OpenAiBackend::new(OpenAiConfig {
            url: format!("http://{addr}/v1"),
            api_key: None,
            model: "up".into(),
            connect_timeout: Duration::from_secs(5),
            default_max_tokens: 16,
            probe,
            dialect: Dialect::Auto,
        })
        .unwrap();
        let req = ChatCompletionRequest {
            messages: vec![Message::user("hi")],
            ..Default::default()
        }
        .validate(&Limits::default())
        .unwrap();
        let mut rx = backend.start(&req, None).await.unwrap();
        let mut chunks = vec![];
        while let Some(c) = rx.recv().await {
            chunks.push(c.unwrap());
        }
        server.await.unwrap();
        chunks
    }

    /// An upstream's stream over a real HTTP connection, in awkward pieces: a keep-alive comment, a
    /// character and a CRLF split across reads, a tool call in two deltas, a payload on two `data:`
    /// lines, an empty event and an invalid byte. The backend must see the events a browser's EventSource
    /// would.
    #[tokio::test]
    async fn an_upstream_stream_is_parsed_as_server_sent_events() {
        let pieces: Vec<Vec<u8>> = vec![
            b": keep-alive\r\n\r\n".to_vec(),
            [
                br#"data: {"model":"up-7b","choices":[{"index":0,"delta":{"content":"H"#.as_slice(),
                &"\u{e9}".as_bytes()[..1],
            ]
            .concat(),
            [&"\u{e9}".as_bytes()[1..], br#""}}]}"#.as_slice(), b"\r"].concat(),
            br#"

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":"{\"a\""}}]}}]}

data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]},
data: "finish_reason":"tool_calls"}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}

"#
            .to_vec(),
            // An empty event (a proxy's keep-alive), then an invalid byte inside a content delta.
            b"data:\n\n".to_vec(),
            [
                br#"data: {"choices":[{"index":0,"delta":{"content":"x"#.as_slice(),
                &[0xFF],
                br#"y"}}]}"#.as_slice(),
                b"\n\n",
            ]
            .concat(),
            b"data: [DONE]\n\n".to_vec(),
        ];
        let chunks = read_upstream(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            pieces,
            true,
            Probe::Models,
        )
        .await;
        assert!(matches!(chunks[0], Chunk::Started { .. }), "{chunks:?}");
        assert!(
            matches!(&chunks[1], Chunk::Content(c) if c == "H\u{e9}"),
            "{chunks:?}"
        );
        // Each delta of the call, held until it is whole, still says the answer is advancing.
        assert!(
            matches!(&chunks[2..4], [Chunk::Progress, Chunk::Progress]),
            "{chunks:?}"
        );
        // The invalid byte became U+FFFD and the stream went on (it used to stall until the idle timeout).
        assert!(
            matches!(&chunks[4], Chunk::Content(c) if c == "x\u{fffd}y"),
            "{chunks:?}"
        );
        assert!(
            matches!(&chunks[5], Chunk::ToolCall { name, arguments } if name == "f" && arguments == r#"{"a":1}"#),
            "{chunks:?}"
        );
        let Chunk::Done {
            finish_reason,
            usage,
            served_by,
            ..
        } = &chunks[6]
        else {
            panic!("{chunks:?}")
        };
        assert_eq!(*finish_reason, FinishReason::ToolCalls);
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 4));
        assert_eq!(served_by.as_ref().unwrap().model, "up-7b");
        assert_eq!(chunks.len(), 7, "{chunks:?}");
    }

    /// Another Jemma node sends an empty chunk for a step that had nothing to show (a prompt chunk read, a
    /// call being written): read as progress from a peer, so this node's deadlines see it working; its
    /// opening chunk (the role) is not progress, and from any other server an empty chunk means nothing.
    #[tokio::test]
    async fn a_peers_empty_chunks_are_progress() {
        let stream = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        for (probe, progress) in [
            (
                Probe::Jemma {
                    tier: "primary".into(),
                },
                2,
            ),
            (Probe::Models, 0),
        ] {
            let chunks = read_upstream(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
                vec![stream.as_bytes().to_vec()],
                false,
                probe,
            )
            .await;
            assert_eq!(
                chunks
                    .iter()
                    .filter(|c| matches!(c, Chunk::Progress))
                    .count(),
                progress,
                "{chunks:?}"
            );
            assert!(
                chunks
                    .iter()
                    .any(|c| matches!(c, Chunk::Content(t) if t == "Hi"))
            );
        }
    }

    /// A completion's chunk reads as the chat chunk it stands for, its logprobs in either shape
    /// upstreams send (the legacy one; llama-server's chat-shaped `content`); a payload that is not an
    /// object passes through untouched rather than panicking.
    #[test]
    fn completion_chunks_read_as_chat_chunks() {
        let legacy = completion_as_chat_chunk(
            serde_json::json!({"choices": [{"index": 0, "text": "Hi",
            "logprobs": {"tokens": ["Hi"], "token_logprobs": [-0.5], "top_logprobs": [{"Hi": -0.5, "Ho": -1.5}],
                "text_offset": [3]}}]}),
        );
        let c: ChatCompletionChunk = serde_json::from_value(legacy).unwrap();
        assert_eq!(c.choices[0].delta.content.as_deref(), Some("Hi"));
        let lp = c.choices[0].logprobs.clone().unwrap().content.unwrap();
        assert_eq!(lp[0]["logprob"], -0.5);
        assert_eq!(lp[0]["top_logprobs"][1]["token"], "Ho", "most likely first");
        let llama = completion_as_chat_chunk(serde_json::json!({"choices": [{"text": "x",
            "logprobs": {"content": [{"token": "x", "logprob": -0.25, "top_logprobs": []}]}}]}));
        assert_eq!(
            llama["choices"][0]["logprobs"]["content"][0]["logprob"],
            -0.25
        );
        for odd in [
            serde_json::json!(1),
            serde_json::json!([]),
            serde_json::json!({"choices": 3}),
        ] {
            assert_eq!(completion_as_chat_chunk(odd.clone()), odd);
        }
    }

    /// A plain prompt to an upstream without /v1/completions (a chat-only server: 404) is the request's
    /// limit there, not the tier failing: a 400 that says why, and the upstream's health unmarked.
    #[tokio::test]
    async fn a_plain_prompt_to_a_chat_only_upstream_is_refused_not_failed() {
        use crate::api::{CompletionRequest, Limits};
        let body = br#"{"error":{"message":"Not Found"}}"#;
        let head = format!(
            "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let (addr, server) =
            upstream_once(head.into_bytes().leak(), vec![body.to_vec()], false).await;
        let backend = OpenAiBackend::new(OpenAiConfig {
            url: format!("http://{addr}/v1"),
            api_key: None,
            model: "chat-only".into(),
            connect_timeout: Duration::from_secs(5),
            default_max_tokens: 16,
            probe: Probe::Models,
            dialect: Dialect::Auto,
        })
        .unwrap();
        let req =
            serde_json::from_value::<CompletionRequest>(serde_json::json!({"prompt": "Once"}))
                .unwrap()
                .validate(&Limits::default())
                .unwrap();
        let err = backend.start(&req, None).await.unwrap_err();
        let head = server.await.unwrap();
        assert!(head.starts_with("POST /v1/completions "), "{head}");
        assert!(
            matches!(&err, BackendError::BadRequest(m) if m.contains("no /v1/completions")),
            "{err:?}"
        );
        assert!(!err.is_tier_failure());
        assert_ne!(backend.health().state, BackendState::Error);
    }

    #[test]
    fn continuation_is_an_assistant_turn() {
        let m = vec![Message::user("hi")];
        assert_eq!(with_continuation(&m, None).len(), 1);
        let c = with_continuation(&m, Some("Hel"));
        assert_eq!(
            c[1].to_value(),
            json!({"role": "assistant", "content": "Hel"})
        );
    }

    /// An OpenAI-compatible server on loopback whose `/v1/models` lists one model `owned_by` as given
    /// (None: it has no `/v1/models`, 404), and whose chat and completions answer "ok"; it records each
    /// request as (method and path, JSON body). One request per connection (`connection: close`).
    async fn upstream_recording(
        owned_by: Option<&'static str>,
    ) -> (
        std::net::SocketAddr,
        Arc<std::sync::Mutex<Vec<(String, Value)>>>,
    ) {
        upstream_answering(owned_by, "ok", "stop").await
    }

    /// [`upstream_recording`] whose every answer is `content`, ended for `finish`.
    async fn upstream_answering(
        owned_by: Option<&'static str>,
        content: &'static str,
        finish: &'static str,
    ) -> (
        std::net::SocketAddr,
        Arc<std::sync::Mutex<Vec<(String, Value)>>>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(vec![]));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = vec![];
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let n = sock.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                while buf.len() < head_end + length {
                    let n = sock.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = serde_json::from_slice(&buf[head_end..]).unwrap_or(Value::Null);
                let line = head.lines().next().unwrap_or_default();
                let path = line
                    .rsplit_once(' ')
                    .map(|(p, _)| p)
                    .unwrap_or(line)
                    .to_string();
                log.lock().unwrap().push((path.clone(), body));
                let reply = if path.starts_with("GET /v1/models") {
                    match owned_by {
                        Some(o) => format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{}",
                            json!({"object": "list", "data": [{"id": "up", "object": "model", "owned_by": o}]})
                        ),
                        None => "HTTP/1.1 404 Not Found\r\nconnection: close\r\n\r\n".into(),
                    }
                } else {
                    let chunk = json!({"choices": [{"index": 0, "delta": {"content": content},
                        "text": content, "finish_reason": finish}]});
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n\
                         data: {chunk}\n\ndata: [DONE]\n\n"
                    )
                };
                sock.write_all(reply.as_bytes()).await.unwrap();
                let _ = sock.shutdown().await;
            }
        });
        (addr, seen)
    }

    fn upstream(addr: std::net::SocketAddr, dialect: Dialect) -> OpenAiBackend {
        OpenAiBackend::new(OpenAiConfig {
            url: format!("http://{addr}"),
            api_key: None,
            model: "up".into(),
            connect_timeout: Duration::from_secs(5),
            default_max_tokens: 16,
            probe: Probe::Models,
            dialect,
        })
        .unwrap()
    }

    fn chat(extra: Value) -> ChatRequest {
        crate::testing::chat_request("auto", "hi", extra).unwrap()
    }

    /// Sends `req` and reads the answer to its end; the error if it was refused before any token.
    async fn send(b: &OpenAiBackend, req: &ChatRequest) -> Result<(), BackendError> {
        let mut rx = b.start(req, None).await?;
        while let Some(c) = rx.recv().await {
            c?;
        }
        Ok(())
    }

    /// Sends `req` (it must be accepted) and reads every chunk of the answer, errors included.
    async fn answer(b: &OpenAiBackend, req: &ChatRequest) -> Vec<Result<Chunk, BackendError>> {
        let mut rx = b.start(req, None).await.unwrap();
        let mut got = vec![];
        while let Some(c) = rx.recv().await {
            got.push(c);
        }
        got
    }

    /// llama-server reads `repeat_penalty` (over its `repeat_last_n`) and `thinking_budget_tokens`:
    /// learned from its `/v1/models` (`owned_by: llamacpp`), the fields go under those names, with
    /// Jemma's penalty window, and the others (`top_k`, `min_p`, the thinking switch) as they are.
    #[tokio::test]
    async fn a_llama_server_upstream_is_sent_its_own_names() {
        let (addr, seen) = upstream_recording(Some("llamacpp")).await;
        let b = upstream(addr, Dialect::Auto);
        assert_eq!(b.health().dialect, Some(Dialect::Auto));
        // A Jemma node (a pool's `kind = "jemma"`) speaks Jemma's own without asking: it shows a format's
        // description itself, so the gateway must not add it too.
        let peer = OpenAiBackend::new(OpenAiConfig::new(
            "http://127.0.0.1:1",
            "fast".into(),
            Probe::Jemma {
                tier: "fast".into(),
            },
            16,
        ))
        .unwrap();
        assert_eq!(peer.health().dialect, Some(Dialect::Jemma));
        let req = chat(json!({
            "repetition_penalty": 1.3, "thinking_token_budget": 32, "enable_thinking": true,
            "top_k": 5, "min_p": 0.1
        }));
        send(&b, &req).await.unwrap();
        // Learned once: the second request goes straight to the chat.
        send(&b, &req).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        let paths: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "GET /v1/models",
                "POST /v1/chat/completions",
                "POST /v1/chat/completions"
            ]
        );
        let body = &seen[1].1;
        assert_eq!(body["repeat_penalty"], json!(1.3));
        assert_eq!(body["repeat_last_n"], 20);
        assert_eq!(body["thinking_budget_tokens"], 32);
        assert!(body.get("repetition_penalty").is_none(), "{body}");
        assert!(body.get("thinking_token_budget").is_none(), "{body}");
        assert_eq!(body["top_k"], 5);
        assert_eq!(body["chat_template_kwargs"]["enable_thinking"], true);
        assert_eq!(b.health().dialect, Some(Dialect::LlamaServer));
        assert_eq!(
            serde_json::to_value(b.health()).unwrap()["dialect"],
            "llama-server"
        );
    }

    /// A server not known to read more than OpenAI's fields (`owned_by: system`) is not sent a field it
    /// would drop or refuse: the request is refused, naming it, and nothing is sent. OpenAI's own fields
    /// go, `reasoning_effort` as given, and extensions at their neutral value are left out. Ollama
    /// (`owned_by: library`) does not read `logit_bias` either.
    #[tokio::test]
    async fn an_openai_dialect_upstream_refuses_what_it_does_not_read() {
        let (addr, seen) = upstream_recording(Some("system")).await;
        let b = upstream(addr, Dialect::Auto);
        for (field, value) in [
            ("top_k", json!(5)),
            ("min_p", json!(0.1)),
            ("repetition_penalty", json!(1.2)),
            ("thinking_token_budget", json!(64)),
            ("enable_thinking", json!(true)),
        ] {
            let err = send(&b, &chat(json!({ field: value }))).await.unwrap_err();
            match err {
                BackendError::Unread(crate::RouterError::InvalidRequest { param, message }) => {
                    assert_eq!(param.as_deref(), Some(field), "{message}");
                    assert!(message.contains("dialect"), "{message}");
                }
                other => panic!("{field}: {other:?}"),
            }
        }
        let req = chat(json!({
            "reasoning_effort": "high", "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
            "presence_penalty": 0.5
        }));
        assert_eq!(req.enable_thinking, Some(true));
        send(&b, &req).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        let paths: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["GET /v1/models", "POST /v1/chat/completions"]);
        let body = seen[1].1.as_object().unwrap();
        assert_eq!(body["reasoning_effort"], "high");
        assert_eq!(body["presence_penalty"], json!(0.5));
        for k in [
            "top_k",
            "min_p",
            "repetition_penalty",
            "chat_template_kwargs",
            "repeat_last_n",
        ] {
            assert!(!body.contains_key(k), "{k} in {body:?}");
        }

        let (addr, seen) = upstream_recording(Some("library")).await;
        let b = upstream(addr, Dialect::Auto);
        let err = send(&b, &chat(json!({"logit_bias": {"5": 2}})))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BackendError::Unread(crate::RouterError::InvalidRequest { param, .. })
                if param.as_deref() == Some("logit_bias")),
            "{err:?}"
        );
        assert_eq!(b.health().dialect, Some(Dialect::Ollama));
        assert_eq!(seen.lock().unwrap().len(), 1, "only /v1/models was asked");
    }

    /// A `json_schema` format's description reaches the upstream's model: in the system instruction for
    /// a server that would not show it (vLLM, llama-server, Ollama), as it came for one that does (a
    /// Jemma node, OpenAI).
    #[tokio::test]
    async fn a_formats_description_is_shown_where_the_server_would_not() {
        let req = chat(
            json!({"response_format": {"type": "json_schema", "json_schema": {
            "name": "city", "description": "A city.", "schema": {"type": "object"}}}}),
        );
        for (owned_by, shows) in [
            ("vllm", false),
            ("llamacpp", false),
            ("jemma", true),
            ("system", true),
        ] {
            let (addr, seen) = upstream_recording(Some(owned_by)).await;
            send(&upstream(addr, Dialect::Auto), &req).await.unwrap();
            let body = seen.lock().unwrap().last().unwrap().1.clone();
            let format = &body["response_format"]["json_schema"];
            let first = &body["messages"][0];
            if shows {
                assert_eq!(format["description"], "A city.", "{owned_by}");
                assert_eq!(first["role"], "user", "{owned_by}");
            } else {
                assert!(format.get("description").is_none(), "{owned_by}: {body}");
                assert_eq!(first["role"], "system", "{owned_by}");
                assert_eq!(
                    first["content"], "Answer in the JSON format \"city\": A city.",
                    "{owned_by}"
                );
            }
        }
    }

    /// vLLM (and another Jemma node) read Jemma's names: sent as they are. A server with no
    /// `/v1/models` (404) is taken as OpenAI's, and so is one whose list names no owner. A configured dialect is not asked for; nor is any when
    /// the request sets nothing dialects name differently.
    #[tokio::test]
    async fn the_dialect_is_asked_for_only_when_it_matters() {
        let req = chat(json!({"repetition_penalty": 1.2, "thinking_token_budget": 16}));
        let (addr, seen) = upstream_recording(Some("vllm")).await;
        let b = upstream(addr, Dialect::Auto);
        send(&b, &chat(json!({"temperature": 0.5, "seed": 3})))
            .await
            .unwrap();
        assert_eq!(b.health().dialect, Some(Dialect::Auto));
        send(&b, &req).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        let paths: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "POST /v1/chat/completions",
                "GET /v1/models",
                "POST /v1/chat/completions"
            ]
        );
        assert_eq!(seen[2].1["repetition_penalty"], json!(1.2));
        assert_eq!(seen[2].1["thinking_token_budget"], 16);

        let (addr, seen) = upstream_recording(None).await;
        let b = upstream(addr, Dialect::Auto);
        assert!(matches!(send(&b, &req).await, Err(BackendError::Unread(_))));
        assert_eq!(b.health().dialect, Some(Dialect::Openai));
        assert_eq!(seen.lock().unwrap().len(), 1);

        // Configured: llama-server's names without asking; also on /v1/completions.
        let (addr, seen) = upstream_recording(Some("vllm")).await;
        let b = upstream(addr, Dialect::LlamaServer);
        let completion = serde_json::from_value::<crate::api::CompletionRequest>(
            json!({"prompt": "Once", "repetition_penalty": 1.2}),
        )
        .unwrap()
        .validate(&crate::api::Limits::default())
        .unwrap();
        send(&b, &completion).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, "POST /v1/completions");
        assert_eq!(seen[0].1["repeat_penalty"], json!(1.2));
        assert_eq!(seen[0].1["repeat_last_n"], 20);
    }

    /// vLLM does not force a call itself with Gemma 4's tool parser: a forced `tool_choice` goes as `none`
    /// with the call's JSON Schema as the response format, and the JSON it answers comes back as the call.
    #[tokio::test]
    async fn a_forced_call_is_asked_of_vllm_as_json() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let (addr, seen) =
            upstream_answering(Some("vllm"), " {\"city\" : \"Paris\"}", "stop").await;
        let b = upstream(addr, Dialect::Auto);
        let req = chat(json!({"tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}));
        let got: Vec<Chunk> = answer(&b, &req)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let body = seen.lock().unwrap().last().unwrap().1.clone();
        assert_eq!(body["tool_choice"], "none", "{body}");
        assert_eq!(body["response_format"]["type"], "json_schema", "{body}");
        assert_eq!(
            body["response_format"]["json_schema"]["schema"],
            tools[0]["function"]["parameters"]
        );
        assert!(
            !got.iter().any(|c| matches!(c, Chunk::Content(_))),
            "{got:?}"
        );
        // The JSON held until it is whole still counts as progress for the idle deadline.
        assert!(got.iter().any(|c| matches!(c, Chunk::Progress)), "{got:?}");
        assert!(
            got.iter()
                .any(|c| matches!(c, Chunk::ToolCall { name, arguments }
                if name == "get_weather" && arguments == r#"{"city":"Paris"}"#)),
            "{got:?}"
        );
        assert!(
            got.iter().any(|c| matches!(
                c,
                Chunk::Done {
                    finish_reason: FinishReason::ToolCalls,
                    ..
                }
            )),
            "{got:?}"
        );

        // Not the call's JSON, and not cut by max_tokens: the upstream did not make the call, a failure
        // (not an answer without it); a llama-server is sent the choice as it came.
        let (addr, _) = upstream_answering(Some("vllm"), "{\"city\": \"Pa", "stop").await;
        let got = answer(&upstream(addr, Dialect::Auto), &req).await;
        assert!(
            matches!(got.last(), Some(Err(BackendError::Broken(m))) if m.contains("forced tool call")),
            "{got:?}"
        );
        assert!(
            !got.iter()
                .any(|c| matches!(c, Ok(Chunk::ToolCall { .. }) | Ok(Chunk::Content(_))))
        );
        // Cut by max_tokens: the text, as content, as an in-process engine's cut call.
        let (addr, _) = upstream_answering(Some("vllm"), "{\"city\": \"Pa", "length").await;
        let got: Vec<Chunk> = answer(&upstream(addr, Dialect::Auto), &req)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert!(
            got.iter()
                .any(|c| matches!(c, Chunk::Content(t) if t == "{\"city\": \"Pa")),
            "{got:?}"
        );
        assert!(!got.iter().any(|c| matches!(c, Chunk::ToolCall { .. })));
        let (addr, seen) = upstream_recording(Some("llamacpp")).await;
        send(&upstream(addr, Dialect::Auto), &req).await.unwrap();
        let body = seen.lock().unwrap().last().unwrap().1.clone();
        assert_eq!(body["tool_choice"]["function"]["name"], "get_weather");
        assert!(body.get("response_format").is_none(), "{body}");
    }
}
