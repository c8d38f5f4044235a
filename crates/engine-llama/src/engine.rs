//! The handle callers hold ([`LlamaEngine`]): submits requests to the serving core's host and reads its
//! status.

use super::*;

/// A clonable handle to the llama.cpp model thread (the serving core's host running the llama.cpp runner).
#[derive(Clone)]
pub struct LlamaEngine {
    pub(crate) host: Host<LlamaRunner>,
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
        let mut input_modalities = vec![Modality::Text];
        if let Some(mm) = &config.mmproj_path {
            match towers(mm) {
                Ok((sees, hears)) => {
                    input_modalities.extend(sees.then_some(Modality::Image));
                    input_modalities.extend(hears.then_some(Modality::Audio));
                    // Before the model loads (what the loaded towers take replaces this): video where
                    // the vocabulary spells Gemma 4's <|video|>.
                    if sees && gguf::has_token(&config.model_path, "<|video|>") {
                        input_modalities.push(Modality::Video);
                    }
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
            speculative: config.speculative.as_ref().map(|sp| {
                let drafter = if crate::mtp::is_assistant(&sp.draft_model).unwrap_or(false) {
                    "mtp_assistant"
                } else {
                    "draft_model"
                };
                SpeculativeInfo::new(sp.draft_model.clone(), drafter)
            }),
            largest_verify_batch: 0,
            prefix_cache_entries: 0,
            prefix_cache_bytes: 0,
            cache_type_k: cache_type_name(config.cache.k),
            cache_type_v: cache_type_name(config.cache.v),
            // Unknown when the GGUF cannot be read (its load fails then, and says why).
            chat_template: gguf::read_metadata(&config.model_path)
                .ok()
                .map(|m| m.contains_key("tokenizer.chat_template")),
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

    /// Drops this handle and waits (at most `limit`) for the model thread to end and free the model; see
    /// [`jemma_serve::host::Host::shutdown`]. True when it ended. A CLI calls it before returning from
    /// `main`: with CUDA, a context the model thread frees while the process exits meets a CUDA runtime
    /// already torn down, and ggml aborts (seen on an H200: `jemma generate` exited with SIGABRT after
    /// printing its answer).
    pub fn shutdown(self, limit: Duration) -> bool {
        self.host.shutdown(limit)
    }

    /// Waits (blocking) until loaded (or ready to load lazily) or failed; for CLIs and tests.
    pub fn wait_ready(&self) -> Result<()> {
        self.host.wait_ready().map_err(LlamaError::InvalidModel)
    }
}
