//! The in-process MLX engine as a tier (feature `local`, on by default; off for builds that must not link
//! MLX, such as the fuzz targets).

use async_trait::async_trait;
use jemma_engine::runtime::Engine;
use serde_json::json;

use crate::api::ChatRequest;
use crate::backend::{
    Backend, BackendError, BackendHealth, ChunkStream, Finished, engine_health, pump_engine,
    sampling_of, with_continuation,
};

/// The in-process MLX engine serving one model.
pub struct LocalBackend {
    engine: Engine,
    default_max_tokens: u32,
    kv_quant: Option<jemma_engine::models::gemma4::KvQuant>,
}

impl LocalBackend {
    /// Wraps a started engine.
    pub fn new(engine: Engine, default_max_tokens: u32) -> Self {
        Self {
            engine,
            default_max_tokens,
            kv_quant: None,
        }
    }

    /// Quantizes the full-attention KV caches of every request (`kv_bits`).
    pub fn with_kv_quant(mut self, q: Option<jemma_engine::models::gemma4::KvQuant>) -> Self {
        self.kv_quant = q;
        self
    }
}

#[async_trait]
impl Backend for LocalBackend {
    fn model(&self) -> String {
        self.engine.status().model
    }

    fn stopped(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(self.engine.stopped())
    }

    async fn start(
        &self,
        req: &ChatRequest,
        continuation: Option<&str>,
    ) -> Result<ChunkStream, BackendError> {
        use jemma_engine::generate::GenerateOptions;
        use jemma_engine::runtime::{Prompt, Request, SubmitError};
        let sampling = sampling_of(req);
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
        let events = self.engine.submit(request).map_err(|e| match e {
            SubmitError::QueueFull => BackendError::Busy(e.to_string()),
            SubmitError::Unavailable(m) => BackendError::Unavailable(m),
        })?;
        Ok(pump_engine(events, |s| Finished {
            completion_tokens: s.stats.completion_tokens as u64,
            tool_calls: s.tool_calls,
            hit_length: s.stats.finish_reason == jemma_engine::generate::FinishReason::Length,
            decode_tps: s.decode_tps,
        }))
    }

    fn health(&self) -> BackendHealth {
        let s = self.engine.status();
        let i = &s.info;
        engine_health(
            &s,
            json!({
                "engine": "mlx",
                "device": i.device,
                "mlx_active_bytes": i.memory.active_bytes,
                "mlx_peak_bytes": i.memory.peak_bytes,
                "process_rss_bytes": i.process_rss_bytes,
                "dtype": i.load.as_ref().map(|l| l.dtype.clone()),
                "footprint": i.footprint,
            }),
        )
    }
}
