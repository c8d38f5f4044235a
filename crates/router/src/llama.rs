//! The llama.cpp engine as a tier (feature `llama`): GGUF models, the default local engine on Linux and
//! Intel machines and the engine of the Cloud Run heavy tier.

pub use jemma_engine_llama as engine;

use async_trait::async_trait;
use jemma_engine_llama::{LlamaEngine, Prompt, Request, SubmitError};
use serde_json::json;

use crate::api::ChatRequest;
use crate::backend::{
    Backend, BackendError, BackendHealth, ChunkStream, Finished, engine_health, pump_engine,
    sampling_of, with_continuation,
};

/// A llama.cpp engine serving one tier.
pub struct LlamaBackend {
    engine: LlamaEngine,
    default_max_tokens: u32,
}

impl LlamaBackend {
    /// Wraps a started engine.
    pub fn new(engine: LlamaEngine, default_max_tokens: u32) -> Self {
        Self {
            engine,
            default_max_tokens,
        }
    }
}

#[async_trait]
impl Backend for LlamaBackend {
    fn model(&self) -> String {
        self.engine.status().model
    }

    fn stopped(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        // A cold model swap waits on this before loading the next model into the memory it frees.
        Box::pin(self.engine.stopped())
    }

    async fn start(
        &self,
        req: &ChatRequest,
        continuation: Option<&str>,
    ) -> Result<ChunkStream, BackendError> {
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
            sampling: sampling_of(req),
            max_tokens: req.max_tokens.unwrap_or(self.default_max_tokens) as usize,
            stop: req.stop.clone(),
            parse_output: req.raw_prompt.is_none() && !req.json_mode,
            json_mode: req.json_mode,
            ignore_eos: false,
            logprobs: req.logprobs,
            top_logprobs: req.top_logprobs as usize,
        };
        let events = self.engine.submit(request).map_err(|e| match e {
            SubmitError::QueueFull => BackendError::Busy(e.to_string()),
            SubmitError::Unavailable(m) => BackendError::Unavailable(m),
        })?;
        Ok(pump_engine(events, |s| Finished {
            completion_tokens: s.completion_tokens as u64,
            tool_calls: s.tool_calls,
            hit_length: s.finish == jemma_engine_llama::Finish::Length,
            decode_tps: s.decode_tps,
        }))
    }

    fn health(&self) -> BackendHealth {
        let s = self.engine.status();
        let i = &s.info;
        engine_health(
            &s,
            json!({
                "engine": "llama.cpp",
                "gpu_layers": i.gpu_layers,
                "threads": i.threads,
                "model_bytes": i.model_bytes,
                "footprint_bytes": i.footprint_bytes,
            }),
        )
    }
}
