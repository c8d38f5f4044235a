//! The engine host: the model lives on its own thread (MLX arrays and streams are not meant to hop between
//! threads), requests arrive over a bounded queue, events stream back over a bounded channel, and a dropped
//! receiver cancels the request at the next token.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mlx_rs::Dtype;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::device::{DeviceKind, MlxMemory, mlx_memory, select_device};
use crate::generate::{FinishReason, GenerateOptions, GenerationStats, generate};
use crate::memory::MemoryGovernor;
use crate::models::gemma4::{self, Gemma4, LoadReport};
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use crate::tools::Event as ParseEvent;
use crate::{EngineError, Result};
use jemma_chat::answer::Answer;
use jemma_chat::logprobs::TokenLogprob;

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Raw text, tokenized with the tokenizer's special-token rules (BOS added unless present).
    Text(String),
    /// Token ids as given.
    Ids(Vec<u32>),
    /// OpenAI-style messages rendered with the model's own chat template.
    Chat {
        /// Messages (role, content, tool_calls, …).
        messages: Vec<Value>,
        /// OpenAI `tools` array.
        tools: Option<Vec<Value>>,
        /// Thinking mode for templates that support it.
        enable_thinking: Option<bool>,
    },
}

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
    /// Constrain the output to one JSON object (`response_format: json_object`).
    pub json_mode: bool,
}

/// What the engine sends back for a request (shared with the llama.cpp engine).
pub type Event = jemma_chat::event::Event<Summary>;

/// Final statistics of a request.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Token counts and timings.
    pub stats: GenerationStats,
    /// Whether any tool call was emitted (OpenAI finish_reason "tool_calls").
    pub tool_calls: bool,
    /// MLX memory after the request.
    pub memory: MlxMemory,
    /// Prefill tokens/s.
    pub prefill_tps: f64,
    /// Decode tokens/s.
    pub decode_tps: f64,
}

/// Life-cycle of the engine host.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum EngineState {
    /// Loading weights.
    Loading {
        /// Share of weight bytes read (0 to 1).
        progress: f32,
    },
    /// Serving.
    Ready,
    /// Weights released after the idle keep-alive; the next request reloads them.
    Unloaded,
    /// Loading failed.
    Failed {
        /// Why.
        error: String,
    },
}

/// Live figures for `/health`, `/metrics` and the tray.
#[derive(Debug, Clone, Serialize)]
pub struct EngineStatus {
    /// State.
    #[serde(flatten)]
    pub state: EngineState,
    /// Model directory.
    pub model_dir: PathBuf,
    /// Model name (directory name).
    pub model: String,
    /// Load report, once loaded.
    pub load: Option<LoadReport>,
    /// Requests completed.
    pub requests: u64,
    /// Tokens generated in total.
    pub generated_tokens: u64,
    /// Decode speed of the last request.
    pub last_decode_tps: f64,
    /// Prefill speed of the last request.
    pub last_prefill_tps: f64,
    /// Requests waiting or running.
    pub queued: usize,
    /// MLX memory.
    pub memory: MlxMemory,
    /// Resident memory of the whole process.
    pub process_rss_bytes: u64,
    /// Device.
    pub device: DeviceKind,
    /// Context length served (the configured one, else the model's).
    pub context_length: usize,
    /// Estimated footprint of the model at that context (once estimated).
    pub footprint: Option<crate::footprint::Footprint>,
    /// The last load problem (e.g. a refusal for lack of memory); cleared by a successful load.
    pub last_error: Option<String>,
}

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
        }
    }
}

struct Job {
    request: Request,
    events: mpsc::Sender<Event>,
}

/// A cheap, clonable handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    status: Arc<Mutex<EngineStatus>>,
    event_buffer: usize,
    /// Becomes true when the engine thread has ended (its memory is released).
    stopped: tokio::sync::watch::Receiver<bool>,
}

/// Submitting failed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full: try later (HTTP 429).
    #[error("the model queue is full")]
    QueueFull,
    /// The engine is not serving (still loading, failed, or shut down).
    #[error("the engine is not available: {0}")]
    Unavailable(String),
}

impl Engine {
    /// Starts the engine thread; the model loads in the background (see [`Engine::status`]).
    pub fn start(config: EngineConfig) -> Result<Self> {
        let device = select_device()?;
        let status = Arc::new(Mutex::new(EngineStatus {
            state: if config.preload {
                EngineState::Loading { progress: 0.0 }
            } else {
                EngineState::Unloaded
            },
            model: config.name.clone().unwrap_or_else(|| {
                config
                    .model_dir
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }),
            model_dir: config.model_dir.clone(),
            load: None,
            requests: 0,
            generated_tokens: 0,
            last_decode_tps: 0.0,
            last_prefill_tps: 0.0,
            queued: 0,
            memory: MlxMemory::default(),
            process_rss_bytes: 0,
            device,
            context_length: 0,
            footprint: None,
            last_error: None,
        }));
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let st = status.clone();
        let (stopped_tx, stopped) = tokio::sync::watch::channel(false);
        std::thread::Builder::new()
            .name("jemma-mlx".into())
            .spawn(move || {
                engine_thread(config, device, rx, st);
                let _ = stopped_tx.send(true);
            })
            .map_err(|e| {
                EngineError::Unsupported(format!("cannot start the engine thread: {e}"))
            })?;
        Ok(Self {
            jobs: tx,
            status,
            event_buffer: 64,
            stopped,
        })
    }

    /// A snapshot of the engine's state and figures (never blocks on the model thread).
    pub fn status(&self) -> EngineStatus {
        let mut s = self
            .status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|e| e.into_inner().clone());
        s.queued = self.jobs.max_capacity() - self.jobs.capacity();
        s.process_rss_bytes = crate::device::process_rss_bytes();
        s
    }

    /// Queues a request; events arrive on the returned receiver. Dropping it cancels the request.
    pub fn submit(
        &self,
        request: Request,
    ) -> std::result::Result<mpsc::Receiver<Event>, SubmitError> {
        match &self.status().state {
            EngineState::Ready | EngineState::Unloaded => {}
            EngineState::Loading { .. } => {
                return Err(SubmitError::Unavailable("model is loading".into()));
            }
            EngineState::Failed { error } => return Err(SubmitError::Unavailable(error.clone())),
        }
        let (etx, erx) = mpsc::channel(self.event_buffer);
        self.jobs
            .try_send(Job {
                request,
                events: etx,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => {
                    SubmitError::Unavailable("engine thread stopped".into())
                }
            })?;
        Ok(erx)
    }

    /// Resolves when the engine thread has ended: every handle was dropped, the requests it had accepted
    /// are answered, and the model's memory is released.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stopped.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Waits (blocking) until the model is loaded or failed; for CLIs and tests.
    pub fn wait_ready(&self) -> Result<()> {
        loop {
            match self.status().state {
                EngineState::Ready | EngineState::Unloaded => return Ok(()),
                EngineState::Failed { error } => return Err(EngineError::InvalidModel(error)),
                EngineState::Loading { .. } => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
            }
        }
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
    json_tokens: std::sync::OnceLock<Arc<crate::constrain::TokenBytes>>,
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
        let tokenizer = Tokenizer::from_model_dir(dir, &cfg.eos_token_ids)?;
        let template = ChatTemplate::from_model_dir(dir)
            .map_err(|e| EngineError::InvalidModel(format!("chat template: {e}")))?;
        Ok(Self {
            model,
            tokenizer,
            template,
            report,
            json_tokens: std::sync::OnceLock::new(),
        })
    }

    /// The vocabulary as bytes for JSON mode (built on first use, then kept).
    pub fn json_tokens(&self) -> Arc<crate::constrain::TokenBytes> {
        self.json_tokens
            .get_or_init(|| {
                Arc::new(crate::constrain::TokenBytes::new(
                    &self.tokenizer,
                    self.model.config().vocab_size,
                ))
            })
            .clone()
    }

    /// Context length in tokens.
    pub fn context_length(&self) -> usize {
        self.model.config().max_position_embeddings
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
                let tpl = self.template.as_ref().ok_or_else(|| {
                    EngineError::InvalidRequest("this model has no chat template".into())
                })?;
                let text = tpl
                    .render_for_generation(messages, tools.as_deref(), *enable_thinking)
                    .map_err(|e| {
                        if e.is_client_error() {
                            EngineError::InvalidRequest(e.to_string())
                        } else {
                            EngineError::InvalidModel(format!("chat template: {e}"))
                        }
                    })?;
                self.tokenizer.encode(&text, false)?
            }
        })
    }
}

/// Applies an update to the shared status.
type StatusSetter<'a> = dyn Fn(&dyn Fn(&mut EngineStatus)) + 'a;

fn engine_thread(
    config: EngineConfig,
    device: DeviceKind,
    mut jobs: mpsc::Receiver<Job>,
    status: Arc<Mutex<EngineStatus>>,
) {
    mlx_rs::Device::set_default(&device.device());
    let set = |f: &dyn Fn(&mut EngineStatus)| {
        if let Ok(mut s) = status.lock() {
            f(&mut s);
        }
    };
    let dtype = config.dtype.or(default_dtype(device));
    let name = config.model_dir.display().to_string();
    let memory = config.memory.as_ref().map(|g| g.register(&name));
    let load = |set: &StatusSetter<'_>| -> Result<ModelBundle> {
        // Estimate and reserve before reading a byte: refusing is better than swapping the machine to death.
        let elem = dtype.map(crate::footprint::dtype_bytes);
        let fp = crate::footprint::estimate(
            &config.model_dir,
            elem,
            config.context_length,
            crate::generate::DEFAULT_PREFILL_STEP,
            Some(crate::generate::DEFAULT_ATTENTION_BUDGET),
        )?;
        set(&|s| {
            s.footprint = Some(fp);
            s.context_length = fp.context_length;
        });
        if let Some(h) = &memory {
            // The process's own overhead is already in use; only the model's memory is new.
            h.reserve(fp.device_bytes(), &format!("model {name}"))
                .map_err(|e| EngineError::InsufficientMemory(e.0))?;
        }
        set(&|s| s.state = EngineState::Loading { progress: 0.0 });
        let mut progress = |p: f32| set(&|s| s.state = EngineState::Loading { progress: p });
        let loaded = ModelBundle::load_with_progress(&config.model_dir, dtype, &mut progress);
        if loaded.is_err()
            && let Some(h) = &memory
        {
            h.release();
        }
        loaded
    };
    let try_load = |set: &StatusSetter<'_>, first: bool| -> Option<ModelBundle> {
        match load(set) {
            Ok(l) => {
                let report = l.report.clone();
                tracing::info!(model = %name, tensors = report.tensors, dtype = %report.dtype, "model loaded");
                let ctx = config
                    .context_length
                    .map_or(l.context_length(), |c| c.min(l.context_length()));
                set(&|s| {
                    s.state = EngineState::Ready;
                    s.load = Some(report.clone());
                    s.context_length = ctx;
                    s.memory = mlx_memory();
                    s.last_error = None;
                });
                Some(l)
            }
            Err(e) => {
                tracing::error!(model = %name, error = %e, "model failed to load");
                let msg = e.to_string();
                // A refusal for memory is retried at the next request (memory may have been freed by
                // then); a broken model directory stays failed.
                let retry = matches!(e, EngineError::InsufficientMemory(_)) || !first;
                set(&|s| {
                    s.last_error = Some(msg.clone());
                    s.state = if retry {
                        EngineState::Unloaded
                    } else {
                        EngineState::Failed { error: msg.clone() }
                    };
                });
                None
            }
        }
    };
    let unload = |loaded: &mut Option<ModelBundle>, why: &str| {
        *loaded = None;
        let _ = mlx_rs::memory::clear_cache();
        if let Some(h) = &memory {
            h.release();
        }
        tracing::info!(model = %name, why, "model unloaded");
        set(&|s| {
            s.state = EngineState::Unloaded;
            s.memory = mlx_memory();
        });
    };
    let mut loaded = None;
    if config.preload {
        loaded = try_load(&set, true);
        if loaded.is_none()
            && matches!(
                status.lock().map(|s| s.state.clone()),
                Ok(EngineState::Failed { .. })
            )
        {
            return;
        }
    }
    loop {
        let watch = config.keep_alive.is_some() || memory.is_some();
        let job = if loaded.is_some() && watch {
            // Idle: poll the queue so that the keep-alive and the governor's unload requests are noticed.
            let idle_since = Instant::now();
            if let Some(h) = &memory {
                h.set_idle(true);
            }
            loop {
                match jobs.try_recv() {
                    Ok(j) => break Some(j),
                    Err(mpsc::error::TryRecvError::Disconnected) => break None,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        let expired = config.keep_alive.is_some_and(|k| idle_since.elapsed() >= k);
                        let pressed = memory.as_ref().is_some_and(|h| h.unload_requested());
                        if expired || pressed {
                            unload(
                                &mut loaded,
                                if pressed {
                                    "memory pressure"
                                } else {
                                    "idle keep-alive"
                                },
                            );
                            break jobs.blocking_recv();
                        }
                        std::thread::sleep(std::time::Duration::from_millis(25))
                    }
                }
            }
        } else {
            jobs.blocking_recv()
        };
        let Some(job) = job else { break };
        if let Some(h) = &memory {
            h.set_idle(false);
        }
        if loaded.is_none() {
            // Lazy first load, or a transparent reload after an unload.
            loaded = try_load(&set, false);
            if loaded.is_none() {
                let why = status
                    .lock()
                    .ok()
                    .and_then(|s| s.last_error.clone())
                    .unwrap_or_else(|| "the model failed to load".into());
                let _ = job
                    .events
                    .blocking_send(Event::Error(jemma_chat::event::EngineFailure::Fault(why)));
                continue;
            }
        }
        let Some(bundle) = loaded.as_ref() else {
            continue;
        };
        let started = Instant::now();
        let ctx = status.lock().map(|s| s.context_length).unwrap_or(0);
        let result = run_job(bundle, &job, ctx);
        match result {
            Ok(summary) => {
                let st = &summary.stats;
                tracing::info!(
                    prompt_tokens = st.prompt_tokens,
                    completion_tokens = st.completion_tokens,
                    prefill_tps = format!("{:.1}", summary.prefill_tps),
                    decode_tps = format!("{:.1}", summary.decode_tps),
                    finish = ?st.finish_reason,
                    ms = started.elapsed().as_millis() as u64,
                    "request done"
                );
                set(&|s| {
                    s.requests += 1;
                    s.generated_tokens += summary.stats.completion_tokens as u64;
                    s.last_decode_tps = summary.decode_tps;
                    s.last_prefill_tps = summary.prefill_tps;
                    s.memory = summary.memory;
                });
                let _ = job.events.blocking_send(Event::Done(summary));
            }
            Err(e) => {
                tracing::warn!(error = %e, "request failed");
                let _ = job.events.blocking_send(Event::Error(e.into()));
            }
        }
    }
    if let Some(h) = &memory {
        h.release();
    }
}

fn run_job(l: &ModelBundle, job: &Job, ctx: usize) -> Result<Summary> {
    let req = &job.request;
    let ids = l.prompt_ids(&req.prompt)?;
    let ctx = if ctx == 0 { l.context_length() } else { ctx };
    if ids.len() + req.options.max_tokens > ctx {
        return Err(EngineError::InvalidRequest(format!(
            "prompt ({} tokens) + max_tokens ({}) exceeds the model's context of {ctx} tokens",
            ids.len(),
            req.options.max_tokens
        )));
    }
    if job
        .events
        .blocking_send(Event::Started {
            prompt_tokens: ids.len(),
        })
        .is_err()
    {
        return Err(EngineError::InvalidRequest("client went away".into()));
    }
    let mut opts = req.options.clone();
    if opts.stop_tokens.is_empty() {
        opts.stop_tokens = l.tokenizer.eos_ids.clone();
    }
    if req.json_mode {
        opts.json = Some(l.json_tokens());
    }
    let mut decoder = l.tokenizer.stream();
    let mut answer = Answer::new(&req.stop, req.parse_output);
    let mut failed: Option<EngineError> = None;
    let events = &job.events;
    let send = |evs: Vec<ParseEvent>| {
        evs.into_iter()
            .all(|e| events.blocking_send(e.into()).is_ok())
    };
    let stats = generate(&l.model, &ids, &opts, |step| {
        if events.is_closed() {
            return ControlFlow::Break(FinishReason::Cancelled);
        }
        let piece = match decoder.push(step.token) {
            Ok(p) => p,
            Err(e) => {
                failed = Some(e);
                return ControlFlow::Break(FinishReason::Cancelled);
            }
        };
        if let Some(lp) = &step.logprobs {
            let tok = &l.tokenizer;
            let entry = TokenLogprob::new(
                tok.token_bytes(step.token),
                lp.logprob,
                lp.top
                    .iter()
                    .map(|&(id, p)| (tok.token_bytes(id), p))
                    .collect(),
            );
            if events.blocking_send(Event::Logprobs(entry)).is_err() {
                return ControlFlow::Break(FinishReason::Cancelled);
            }
        }
        let (out, hit) = answer.push(&piece);
        if !send(out) {
            return ControlFlow::Break(FinishReason::Cancelled);
        }
        if hit {
            ControlFlow::Break(FinishReason::Stop)
        } else {
            ControlFlow::Continue(())
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    if stats.finish_reason != FinishReason::Cancelled {
        let by_string = stats.finish_reason == FinishReason::Stop && stats.stop_token.is_none();
        send(answer.finish(&decoder.finish()?, by_string));
    }
    let tool_calls = answer.tool_calls();
    Ok(Summary {
        prefill_tps: stats.prefill_tps(),
        decode_tps: stats.decode_tps(),
        stats,
        tool_calls,
        memory: mlx_memory(),
    })
}
