//! The in-process MLX engine as a tier (feature `local`, on by default; off for builds that must not link
//! MLX, such as the fuzz targets).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use jemma_engine::runtime::{Engine, EngineConfig};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::api::{ChatRequest, Usage};
use crate::backend::{Backend, BackendError, BackendHealth, Chunk, ChunkStream, with_continuation};

/// Turns a model reference (directory, catalog name, Hub repo) into a local directory, downloading it when
/// needed; `progress` receives a share (0 to 1) while downloading. Implemented by [`crate::setup`] on top of
/// jemma-models, so this module stays free of download code.
#[async_trait]
pub trait ModelResolver: Send + Sync {
    /// The directory of `model`, fetching it first if needed.
    async fn resolve(
        &self,
        model: &str,
        progress: Arc<dyn Fn(f32) + Send + Sync>,
    ) -> Result<(PathBuf, String), String>;
}

enum Current {
    /// Serving (or able to reload) this engine.
    Engine(Engine),
    /// No engine yet: downloading or about to load (`state` is shown in /health).
    Pending {
        state: String,
        error: Option<String>,
        target: String,
    },
}

/// The in-process MLX engine as a tier. The engine can be swapped for another model while the gateway
/// runs: the new one loads beside the old (which keeps answering) and takes over when ready; the old
/// engine finishes the requests it already accepted, then frees its memory.
pub struct LocalBackend {
    current: RwLock<Current>,
    /// What the engine for a new model directory is started with.
    template: EngineConfig,
    default_max_tokens: u32,
    kv_quant: Option<jemma_engine::models::gemma4::KvQuant>,
    resolver: Option<Arc<dyn ModelResolver>>,
    /// A swap in progress: (target, state) for /health.
    swap: Mutex<Option<(String, String)>>,
    swap_lock: tokio::sync::Mutex<()>,
}

impl LocalBackend {
    /// Wraps a started engine.
    pub fn new(engine: Engine, default_max_tokens: u32) -> Self {
        Self::build(Current::Engine(engine), default_max_tokens)
    }

    /// A tier whose model `target` is not available yet (`state`: "downloading 0%", "not downloaded");
    /// see [`LocalBackend::attach`] and [`Backend::set_model`].
    pub fn pending(state: &str, target: &str, default_max_tokens: u32) -> Self {
        Self::build(
            Current::Pending {
                state: state.into(),
                error: None,
                target: target.into(),
            },
            default_max_tokens,
        )
    }

    fn build(current: Current, default_max_tokens: u32) -> Self {
        Self {
            current: RwLock::new(current),
            template: EngineConfig::new(""),
            default_max_tokens,
            kv_quant: None,
            resolver: None,
            swap: Mutex::new(None),
            swap_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Quantizes the full-attention KV caches of every request (`kv_bits`).
    pub fn with_kv_quant(mut self, q: Option<jemma_engine::models::gemma4::KvQuant>) -> Self {
        self.kv_quant = q;
        self
    }

    /// Engine settings (all but the model directory) and the resolver used by [`Backend::set_model`].
    pub fn with_swapping(
        mut self,
        template: EngineConfig,
        resolver: Arc<dyn ModelResolver>,
    ) -> Self {
        self.template = template;
        self.resolver = Some(resolver);
        self
    }

    /// Updates a pending tier's displayed state (download progress) or records why it failed.
    pub fn set_pending(&self, state: &str, error: Option<String>) {
        let mut c = self.current.write().unwrap_or_else(|e| e.into_inner());
        if let Current::Pending { target, .. } = &*c {
            *c = Current::Pending {
                state: state.into(),
                error,
                target: target.clone(),
            };
        }
    }

    /// Installs an engine (a finished download, or a swap); the previous one drains and stops.
    pub fn attach(&self, engine: Engine) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Current::Engine(engine);
    }

    fn engine(&self) -> Result<Engine, BackendError> {
        match &*self.current.read().unwrap_or_else(|e| e.into_inner()) {
            Current::Engine(e) => Ok(e.clone()),
            Current::Pending { state, error, .. } => Err(BackendError::Unavailable(match error {
                Some(e) => format!("model unavailable: {e}"),
                None => format!("model not ready ({state})"),
            })),
        }
    }

    fn set_swap(&self, v: Option<(String, String)>) {
        *self.swap.lock().unwrap_or_else(|e| e.into_inner()) = v;
    }

    async fn swap_to(
        &self,
        resolver: &Arc<dyn ModelResolver>,
        target: &str,
    ) -> Result<(), BackendError> {
        let t = target.to_string();
        let share = Arc::new(Mutex::new(None::<f32>));
        let progress: Arc<dyn Fn(f32) + Send + Sync> = {
            let share = share.clone();
            Arc::new(move |p| *share.lock().unwrap_or_else(|e| e.into_inner()) = Some(p))
        };
        // Downloads report through `progress`; mirror it into the swap state while resolving.
        let (dir, name) = {
            let fut = resolver.resolve(&t, progress);
            tokio::pin!(fut);
            loop {
                tokio::select! {
                    r = &mut fut => break r,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {
                        if let Some(p) = *share.lock().unwrap_or_else(|e| e.into_inner()) {
                            self.set_swap(Some((t.clone(), format!("downloading {:.0}%", p * 100.0))));
                        }
                    }
                }
            }
        }
        .map_err(BackendError::BadRequest)?;
        let mut cfg = self.template.clone();
        cfg.model_dir = dir;
        cfg.name = Some(name);
        cfg.preload = true;
        let start = |cfg: EngineConfig| {
            Engine::start(cfg)
                .map_err(|e| BackendError::Unavailable(format!("starting the engine: {e}")))
        };
        self.set_swap(Some((t.clone(), "loading 0%".into())));
        let engine = start(cfg.clone())?;
        let shown = |p: f32| self.set_swap(Some((t.clone(), format!("loading {:.0}%", p * 100.0))));
        match Self::wait_loaded(&engine, shown).await {
            Ok(()) => {
                tracing::info!(model = %t, "warm swap: new model loaded, taking over");
                self.attach(engine);
                Ok(())
            }
            Err(e) if e.starts_with("insufficient memory") => {
                // Both models do not fit at once: let the old one go first (requests fall back to other
                // tiers meanwhile), then load the new one alone.
                drop(engine);
                tracing::warn!(model = %t, "not enough memory to swap warm; swapping cold");
                let old = std::mem::replace(
                    &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
                    Current::Pending {
                        state: "swapping".into(),
                        error: None,
                        target: t.clone(),
                    },
                );
                let old_engine = match old {
                    Current::Engine(e) => Some(e),
                    Current::Pending { .. } => None,
                };
                if let Some(old) = old_engine {
                    // Wait for its accepted requests to finish and its memory to be released.
                    let stopped = old.stopped();
                    drop(old);
                    let _ =
                        tokio::time::timeout(std::time::Duration::from_secs(300), stopped).await;
                }
                self.set_swap(Some((t.clone(), "loading 0%".into())));
                let engine = start(cfg)?;
                let r = Self::wait_loaded(&engine, |p| {
                    self.set_swap(Some((t.clone(), format!("loading {:.0}%", p * 100.0))))
                })
                .await;
                // Even a failed engine is installed so that /health shows why (and a reload can retry).
                self.attach(engine);
                r.map_err(BackendError::Unavailable)
            }
            Err(e) => Err(BackendError::BadRequest(format!(
                "the new model failed to load: {e}"
            ))),
        }
    }

    async fn wait_loaded(engine: &Engine, on: impl Fn(f32)) -> Result<(), String> {
        use jemma_engine::runtime::EngineState;
        loop {
            let s = engine.status();
            match s.state {
                EngineState::Ready => return Ok(()),
                EngineState::Failed { error } => return Err(error),
                EngineState::Unloaded => {
                    return Err(s.last_error.unwrap_or_else(|| "not loaded".into()));
                }
                EngineState::Loading { progress } => on(progress),
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
fn logprob_entry(tok: &jemma_engine::runtime::TokenInfo) -> Option<Value> {
    let lp = tok.logprobs.as_ref()?;
    Some(json!({
        "token": tok.text,
        "logprob": lp.logprob,
        "bytes": tok.text.as_bytes(),
        "top_logprobs": lp.top.iter().map(|(id, p)| json!({"token": format!("<{id}>"), "logprob": p})).collect::<Vec<_>>(),
    }))
}

#[async_trait]
impl Backend for LocalBackend {
    fn model(&self) -> String {
        match &*self.current.read().unwrap_or_else(|e| e.into_inner()) {
            Current::Engine(e) => e.status().model,
            Current::Pending { .. } => String::new(),
        }
    }

    async fn set_model(&self, model: &str) -> Result<(), BackendError> {
        let resolver = self.resolver.clone().ok_or_else(|| {
            BackendError::BadRequest("this tier was not set up for model changes".into())
        })?;
        // One swap at a time per tier.
        let _guard = self.swap_lock.try_lock().map_err(|_| {
            BackendError::Busy("a model change is already in progress on this tier".into())
        })?;
        let target = model.to_string();
        self.set_swap(Some((target.clone(), "resolving".into())));
        let result = self.swap_to(&resolver, &target).await;
        self.set_swap(None);
        result
    }

    async fn start(
        &self,
        req: &ChatRequest,
        continuation: Option<&str>,
    ) -> Result<ChunkStream, BackendError> {
        use jemma_engine::generate::GenerateOptions;
        use jemma_engine::runtime::{Event, Prompt, Request, SubmitError};
        use jemma_engine::sample::SamplingParams;
        let sampling = SamplingParams {
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
        };
        let prompt = match &req.raw_prompt {
            Some(p) => Prompt::Text(format!("{p}{}", continuation.unwrap_or(""))),
            None => Prompt::Chat {
                messages: with_continuation(&req.messages, continuation),
                tools: req.tools.clone(),
                enable_thinking: req.enable_thinking,
            },
        };
        let request = Request {
            prompt,
            options: GenerateOptions {
                sampling,
                max_tokens: req.max_tokens.unwrap_or(self.default_max_tokens) as usize,
                logprobs: req.logprobs,
                top_logprobs: req.top_logprobs as usize,
                kv_quant: self.kv_quant,
                ..Default::default()
            },
            stop: req.stop.clone(),
            parse_output: req.raw_prompt.is_none() && !req.json_mode,
            json_mode: req.json_mode,
        };
        let mut events = self.engine()?.submit(request).map_err(|e| match e {
            SubmitError::QueueFull => BackendError::Busy(e.to_string()),
            SubmitError::Unavailable(m) => BackendError::Unavailable(m),
        })?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut prompt_tokens = 0u64;
            while let Some(ev) = events.recv().await {
                let out = match ev {
                    Event::Started { prompt_tokens: p } => {
                        prompt_tokens = p as u64;
                        Ok(Chunk::Started { prompt_tokens })
                    }
                    Event::Content(c) => Ok(Chunk::Content(c)),
                    Event::Reasoning(r) => Ok(Chunk::Reasoning(r)),
                    Event::ToolCall(tc) => Ok(Chunk::ToolCall {
                        name: tc.name,
                        arguments: tc.arguments.to_string(),
                    }),
                    Event::Tokens(toks) => Ok(Chunk::Logprobs(
                        toks.iter().filter_map(logprob_entry).collect(),
                    )),
                    Event::Done(s) => {
                        let finish = if s.tool_calls {
                            "tool_calls"
                        } else {
                            match s.stats.finish_reason {
                                jemma_engine::generate::FinishReason::Length => "length",
                                _ => "stop",
                            }
                        };
                        let completion = s.stats.completion_tokens as u64;
                        Ok(Chunk::Done {
                            finish_reason: finish.into(),
                            usage: Usage {
                                prompt_tokens,
                                completion_tokens: completion,
                                total_tokens: prompt_tokens + completion,
                            },
                            decode_tps: Some(s.decode_tps),
                        })
                    }
                    Event::Error(e) => Err(classify_engine_error(&e)),
                };
                if tx.send(out).await.is_err() {
                    // The consumer is gone: dropping `events` cancels the generation.
                    return;
                }
            }
        });
        Ok(rx)
    }

    fn health(&self) -> BackendHealth {
        use jemma_engine::runtime::EngineState;
        let swap = self
            .swap
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .map(|(to, state)| json!({"to": to, "state": state}));
        let engine = match self.engine() {
            Ok(e) => e,
            Err(_) => {
                let (state, error, target) =
                    match &*self.current.read().unwrap_or_else(|e| e.into_inner()) {
                        Current::Pending {
                            state,
                            error,
                            target,
                        } => (state.clone(), error.clone(), target.clone()),
                        Current::Engine(_) => Default::default(),
                    };
                // A download started by a model change shows as the tier's state.
                let swapping = self
                    .swap
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .map(|(_, st)| st);
                let state = match (swapping, &error) {
                    (Some(st), _) => st,
                    (None, Some(_)) => "failed".into(),
                    (None, None) => state,
                };
                return BackendHealth {
                    state,
                    model: target,
                    model_loaded: false,
                    tokens_per_second: 0.0,
                    last_error: error,
                    context_length: None,
                    details: json!({"engine": "mlx", "swap": swap}),
                };
            }
        };
        let s = engine.status();
        let (state, err) = match &s.state {
            EngineState::Loading { progress } => {
                (format!("loading {:.0}%", progress * 100.0), None)
            }
            EngineState::Ready => ("ready".to_string(), None),
            // Still serving: the next request reloads the weights (health counts it as available).
            EngineState::Unloaded => ("unloaded".to_string(), s.last_error.clone()),
            EngineState::Failed { error } => ("failed".to_string(), Some(error.clone())),
        };
        BackendHealth {
            state,
            model: s.model.clone(),
            model_loaded: matches!(s.state, EngineState::Ready),
            tokens_per_second: s.last_decode_tps,
            last_error: err,
            context_length: (s.context_length > 0).then_some(s.context_length),
            details: json!({
                "engine": "mlx",
                "device": s.device,
                "requests": s.requests,
                "generated_tokens": s.generated_tokens,
                "queued": s.queued,
                "mlx_active_bytes": s.memory.active_bytes,
                "mlx_peak_bytes": s.memory.peak_bytes,
                "process_rss_bytes": s.process_rss_bytes,
                "dtype": s.load.as_ref().map(|l| l.dtype.clone()),
                "footprint": s.footprint,
                "swap": swap,
            }),
        }
    }
}

fn classify_engine_error(msg: &str) -> BackendError {
    // The engine reports request problems as "invalid request: …"; anything else is the tier's failure.
    if let Some(m) = msg.strip_prefix("invalid request: ") {
        BackendError::BadRequest(m.to_string())
    } else {
        BackendError::Broken(msg.to_string())
    }
}
