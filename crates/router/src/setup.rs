//! Building the tier router from a [`Config`]: one engine per local model directory (tiers naming the same
//! directory share it), one HTTP client per OpenAI-compatible upstream. Used by `jemma serve` and the app.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jemma_engine::runtime::{Engine, EngineConfig};

use crate::RouterError;
use crate::backend::{Backend, OpenAiBackend, OpenAiConfig};
use crate::config::{Config, TierConfig, TierKind, resolve_secret};
use crate::local::LocalBackend;
use crate::route::{TierRouter, TierSettings};

/// Router settings of one configured tier.
pub fn settings(c: &TierConfig, cfg: &Config) -> TierSettings {
    TierSettings {
        enabled: c.enabled,
        max_concurrency: c.max_concurrency,
        max_queue: c.max_queue,
        first_token_timeout: Duration::from_secs_f64(c.first_token_timeout_secs),
        idle_timeout: Duration::from_secs_f64(c.idle_timeout_secs),
        breaker: c.breaker.clone().unwrap_or_else(|| cfg.breaker.clone()),
        aliases: c.aliases.clone(),
        max_tokens: c.max_tokens_ceiling,
    }
}

/// Builds the tier backends of a configuration; local tiers naming the same model directory share one
/// engine (one copy of the weights in memory).
pub fn build_router(
    cfg: &Config,
    keyring: &dyn Fn(&str) -> Option<String>,
) -> Result<Arc<TierRouter>, RouterError> {
    let mut engines: BTreeMap<PathBuf, Arc<dyn Backend>> = BTreeMap::new();
    let mut tiers = vec![];
    for (tier, c) in &cfg.tiers {
        let backend: Arc<dyn Backend> = match c.kind {
            TierKind::Local => {
                let dir = PathBuf::from(&c.model);
                if let Some(b) = engines.get(&dir) {
                    b.clone()
                } else {
                    let mut ec = EngineConfig::new(&dir);
                    ec.queue_capacity = c.max_queue.max(1);
                    ec.keep_alive = (c.keep_alive_secs >= 0)
                        .then(|| Duration::from_secs(c.keep_alive_secs as u64));
                    let engine = Engine::start(ec).map_err(|e| {
                        RouterError::Config(format!("tier {tier}: starting the engine: {e}"))
                    })?;
                    let kv = c.kv_bits.map(|bits| jemma_engine::models::gemma4::KvQuant {
                        bits,
                        group_size: c.kv_group_size,
                        start: c.quantized_kv_start,
                    });
                    let b: Arc<dyn Backend> =
                        Arc::new(LocalBackend::new(engine, c.default_max_tokens).with_kv_quant(kv));
                    engines.insert(dir, b.clone());
                    b
                }
            }
            TierKind::Openai => {
                let key =
                    match &c.api_key {
                        Some(k) => Some(resolve_secret(k, keyring).map_err(|e| {
                            RouterError::Config(format!("tier {tier}: api_key: {e}"))
                        })?),
                        None => None,
                    };
                Arc::new(
                    OpenAiBackend::new(OpenAiConfig {
                        url: c.url.clone().unwrap_or_default(),
                        api_key: key,
                        model: if c.model.is_empty() {
                            tier.to_string()
                        } else {
                            c.model.clone()
                        },
                        connect_timeout: Duration::from_secs(10),
                        default_max_tokens: c.default_max_tokens,
                    })
                    .map_err(|e| RouterError::Config(format!("tier {tier}: {e}")))?,
                )
            }
        };
        tiers.push((*tier, backend, settings(c, cfg)));
    }
    if tiers.is_empty() {
        return Err(RouterError::Config(
            "no tiers configured: pass --model <dir> or a config with [tiers.*]".into(),
        ));
    }
    Ok(Arc::new(TierRouter::new(cfg.classifier.clone(), tiers)))
}
