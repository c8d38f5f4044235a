//! A local tier whose model can change while the gateway runs: it wraps whichever engine backend serves the
//! current model (MLX or llama.cpp), shows "downloading n%" while its model is fetched, and swaps models
//! warm: the new one loads beside the old (which keeps answering) and takes over when ready; the old one
//! finishes the requests it accepted, then frees its memory. When both do not fit, the old one goes first.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;

use crate::api::ChatRequest;
use crate::backend::{Backend, BackendError, BackendHealth, BackendState, ChunkStream};

/// Turns a model reference (directory, catalog name, Hub repo) into a local path and display name,
/// downloading it when needed; `progress` receives a share (0 to 1) while downloading. Implemented by
/// [`crate::setup`] on top of jemma-models, so this module stays free of download code.
#[async_trait]
pub trait ModelResolver: Send + Sync {
    /// The path of `model`, fetching it first if needed.
    async fn resolve(
        &self,
        model: &str,
        progress: Arc<dyn Fn(f32) + Send + Sync>,
    ) -> Result<(PathBuf, String), String>;
}

/// Starts the engine backend for a model path (the engine is picked by the path: `.gguf` → llama.cpp).
pub type BackendFactory =
    Arc<dyn Fn(PathBuf, String) -> Result<Arc<dyn Backend>, String> + Send + Sync>;

enum Current {
    Ready(Arc<dyn Backend>),
    /// No engine yet: downloading or waiting for a download (`state` is shown in /health).
    Pending {
        state: BackendState,
        error: Option<String>,
        target: String,
    },
}

/// A swappable local tier.
pub struct LocalTier {
    current: RwLock<Current>,
    factory: Option<BackendFactory>,
    resolver: Option<Arc<dyn ModelResolver>>,
    /// A swap in progress: (target, state) for /health.
    swap: Mutex<Option<(String, BackendState)>>,
    swap_lock: tokio::sync::Mutex<()>,
}

impl LocalTier {
    /// Serving `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self::build(Current::Ready(backend))
    }

    /// Waiting for `target` (`state`: downloading, not downloaded); see [`LocalTier::attach`].
    pub fn pending(state: BackendState, target: &str) -> Self {
        Self::build(Current::Pending {
            state,
            error: None,
            target: target.into(),
        })
    }

    fn build(current: Current) -> Self {
        Self {
            current: RwLock::new(current),
            factory: None,
            resolver: None,
            swap: Mutex::new(None),
            swap_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// How to start an engine for a new model, and how to find models (enables [`Backend::set_model`]).
    pub fn with_swapping(
        mut self,
        factory: BackendFactory,
        resolver: Arc<dyn ModelResolver>,
    ) -> Self {
        self.factory = Some(factory);
        self.resolver = Some(resolver);
        self
    }

    /// Updates a pending tier's displayed state (download progress) or records why it failed.
    pub fn set_pending(&self, state: BackendState, error: Option<String>) {
        let mut c = self.current.write().unwrap_or_else(|e| e.into_inner());
        if let Current::Pending { target, .. } = &*c {
            *c = Current::Pending {
                state,
                error,
                target: target.clone(),
            };
        }
    }

    /// Installs a backend (a finished download, or a swap); the previous one drains and stops.
    pub fn attach(&self, backend: Arc<dyn Backend>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Current::Ready(backend);
    }

    /// Starts the engine for `path` with this tier's factory and installs it.
    pub fn start_engine(&self, path: PathBuf, name: String) -> Result<(), String> {
        let f = self
            .factory
            .as_ref()
            .ok_or("this tier has no engine factory")?;
        self.attach(f(path, name)?);
        Ok(())
    }

    fn backend(&self) -> Result<Arc<dyn Backend>, BackendError> {
        match &*self.current.read().unwrap_or_else(|e| e.into_inner()) {
            Current::Ready(b) => Ok(b.clone()),
            Current::Pending { state, error, .. } => Err(BackendError::Unavailable(match error {
                Some(e) => format!("model unavailable: {e}"),
                None => format!("model not ready ({state})"),
            })),
        }
    }

    fn set_swap(&self, v: Option<(String, BackendState)>) {
        *self.swap.lock().unwrap_or_else(|e| e.into_inner()) = v;
    }

    /// Waits until `b` serves; Err with its reason if it failed or was refused.
    async fn wait_loaded(b: &Arc<dyn Backend>, on: impl Fn(BackendState)) -> Result<(), String> {
        loop {
            let h = b.health();
            match h.state {
                BackendState::Ready => return Ok(()),
                BackendState::Failed => {
                    return Err(h.last_error.unwrap_or_else(|| "failed".into()));
                }
                // Loaded lazily or refused (a refusal records why).
                BackendState::Unloaded => {
                    return match h.last_error {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                }
                s => on(s),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn swap_to(
        &self,
        resolver: &Arc<dyn ModelResolver>,
        t: &str,
    ) -> Result<(), BackendError> {
        let factory = self.factory.clone().ok_or_else(|| {
            BackendError::BadRequest("this tier was not set up for model changes".into())
        })?;
        let share = Arc::new(Mutex::new(None::<f32>));
        let progress: Arc<dyn Fn(f32) + Send + Sync> = {
            let share = share.clone();
            Arc::new(move |p| *share.lock().unwrap_or_else(|e| e.into_inner()) = Some(p))
        };
        // Downloads report through `progress`; mirror it into the swap state while resolving.
        let (path, name) = {
            let fut = resolver.resolve(t, progress);
            tokio::pin!(fut);
            loop {
                tokio::select! {
                    r = &mut fut => break r,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        if let Some(p) = *share.lock().unwrap_or_else(|e| e.into_inner()) {
                            self.set_swap(Some((t.to_string(), BackendState::Downloading { progress: p })));
                        }
                    }
                }
            }
        }
        .map_err(BackendError::BadRequest)?;
        let shown = |s: BackendState| self.set_swap(Some((t.to_string(), s)));
        shown(BackendState::Loading { progress: 0.0 });
        let next = factory(path.clone(), name.clone()).map_err(BackendError::Unavailable)?;
        match Self::wait_loaded(&next, shown).await {
            Ok(()) => {
                tracing::info!(model = %t, "warm swap: new model loaded, taking over");
                self.attach(next);
                Ok(())
            }
            Err(e) if e.contains("insufficient memory") => {
                // Both models do not fit at once: let the old one go first (requests fall back to other
                // tiers meanwhile), then load the new one alone.
                drop(next);
                tracing::warn!(model = %t, "not enough memory to swap warm; swapping cold");
                let old = std::mem::replace(
                    &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
                    Current::Pending {
                        state: BackendState::Swapping,
                        error: None,
                        target: t.to_string(),
                    },
                );
                if let Current::Ready(old) = old {
                    // Wait for its accepted requests to finish and its memory to be released.
                    let stopped = old.stopped();
                    drop(old);
                    let _ = tokio::time::timeout(Duration::from_secs(300), stopped).await;
                }
                shown(BackendState::Loading { progress: 0.0 });
                let next = factory(path, name).map_err(BackendError::Unavailable)?;
                let r = Self::wait_loaded(&next, shown).await;
                // Even a refused engine is installed, so /health shows why and a request can retry.
                self.attach(next);
                r.map_err(BackendError::Unavailable)
            }
            Err(e) => Err(BackendError::BadRequest(format!(
                "the new model failed to load: {e}"
            ))),
        }
    }
}

#[async_trait]
impl Backend for LocalTier {
    fn model(&self) -> String {
        match &*self.current.read().unwrap_or_else(|e| e.into_inner()) {
            Current::Ready(b) => b.model(),
            Current::Pending { .. } => String::new(),
        }
    }

    async fn start(
        &self,
        req: &ChatRequest,
        continuation: Option<&str>,
    ) -> Result<ChunkStream, BackendError> {
        let b = self.backend()?;
        b.start(req, continuation).await
    }

    fn capacity(&self) -> Option<usize> {
        self.backend().ok()?.capacity()
    }

    async fn count_tokens(&self, req: &ChatRequest) -> Option<Result<u64, BackendError>> {
        match self.backend() {
            Ok(b) => b.count_tokens(req).await,
            Err(e) => Some(Err(e)),
        }
    }

    fn health(&self) -> BackendHealth {
        let swap = self.swap.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let swap_json = swap
            .as_ref()
            .map(|(to, state)| json!({"to": to, "state": state}));
        let pending = match &*self.current.read().unwrap_or_else(|e| e.into_inner()) {
            Current::Ready(b) => Err(b.clone()),
            Current::Pending {
                state,
                error,
                target,
            } => Ok((*state, error.clone(), target.clone())),
        };
        match pending {
            Err(b) => {
                let mut h = b.health();
                if let Some(obj) = h.details.as_object_mut() {
                    obj.insert("swap".into(), swap_json.unwrap_or_default());
                }
                h
            }
            Ok((state, error, target)) => {
                // A download started by a model change shows as the tier's state.
                let state = match (swap.map(|(_, s)| s), &error) {
                    (Some(st), _) => st,
                    (None, Some(_)) => BackendState::Failed,
                    (None, None) => state,
                };
                BackendHealth {
                    state,
                    model: target,
                    model_loaded: false,
                    tokens_per_second: 0.0,
                    last_error: error,
                    context_length: None,
                    input_modalities: vec![],
                    chat: None,
                    dialect: None,
                    details: json!({"swap": swap_json}),
                }
            }
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
        self.set_swap(Some((model.to_string(), BackendState::Resolving)));
        let result = self.swap_to(&resolver, model).await;
        self.set_swap(None);
        result
    }

    fn stopped(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        match self.backend() {
            Ok(b) => b.stopped(),
            Err(_) => Box::pin(async {}),
        }
    }
}
