//! Building the tier router from a [`Config`]: one engine per local model (tiers naming the same model share
//! it), one HTTP client per OpenAI-compatible upstream, one memory budget for all engines. Local models may
//! be directories, catalog names or Hugging Face repos; those not in the cache yet are downloaded in the
//! background while the tier shows "downloading n%". Used by `jemma serve` and the app.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use jemma_engine::memory::{MemoryConfig, MemoryGovernor, PressureSource};
use jemma_engine::runtime::{Engine, EngineConfig};
use jemma_models::hub::{Hub, HubConfig, ModelRef, cli_token};
use jemma_models::{Catalog, PullProgress};

use crate::RouterError;
use crate::backend::{Backend, OpenAiBackend, OpenAiConfig};
use crate::config::{Config, TierConfig, TierKind, resolve_secret};
use crate::local::{LocalBackend, ModelResolver};
use crate::route::{TierRouter, TierSettings};

/// Checkpoint formats the local engines of this build serve.
pub const LOCAL_FORMATS: &[jemma_models::Format] = &[jemma_models::Format::Mlx];

/// Keychain account of the Hugging Face token (the app's Settings window stores it there).
pub const HF_TOKEN_KEYCHAIN: &str = "ai.jemma/hf_token";

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

/// The process-wide memory budget described by `[memory]` (its pressure monitor running).
pub fn memory_governor(cfg: &Config) -> Arc<MemoryGovernor> {
    let m = &cfg.memory;
    let pressure = match m.pressure.as_str() {
        "system" => PressureSource::System,
        "off" | "" => PressureSource::Off,
        path => PressureSource::PsiFile(path.into()),
    };
    let g = MemoryGovernor::new(MemoryConfig {
        limit_bytes: m.limit.map(|b| b.0),
        headroom_bytes: m.headroom.0,
        pressure,
        poll: Duration::from_secs_f64(m.poll_secs.max(0.05)),
        warn_idle: Duration::from_secs_f64(m.warn_idle_secs.max(0.0)),
    });
    g.start_monitor();
    g
}

/// The Hugging Face token: `[models] token`, else `HF_TOKEN`, else the keychain, else the HF CLI's file.
pub fn hf_token(cfg: &Config, keyring: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    if let Some(t) = &cfg.models.token {
        return resolve_secret(t, keyring).ok();
    }
    std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| keyring(HF_TOKEN_KEYCHAIN))
        .or_else(cli_token)
}

/// Resolves model references with the catalog and the Hugging Face cache, downloading when asked.
pub struct HubResolver {
    catalog: Catalog,
    hub: Hub,
}

impl HubResolver {
    /// From `[models]`.
    pub fn from_config(
        cfg: &Config,
        keyring: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, RouterError> {
        let user = cfg
            .models
            .catalog
            .as_ref()
            .map(PathBuf::from)
            .or_else(Catalog::user_path);
        let catalog = Catalog::with_overrides(user.as_deref())
            .map_err(|e| RouterError::Config(e.to_string()))?;
        let hub = Hub::new(HubConfig {
            endpoint: cfg.models.endpoint.clone(),
            token: hf_token(cfg, keyring),
            cache_dir: cfg.models.cache_dir.as_ref().map(PathBuf::from),
            chunk_size: None,
        })
        .map_err(|e| RouterError::Config(e.to_string()))?;
        Ok(Self { catalog, hub })
    }

    /// The directory (or GGUF file) and display name of `model` if it is on disk already (no network).
    pub fn local(&self, model: &str) -> Result<Option<(PathBuf, String)>, String> {
        let r = ModelRef::parse(model, &self.catalog).map_err(|e| e.to_string())?;
        let name = display_name(&r);
        if let ModelRef::Path(p) = r {
            return Ok(Some((p, name)));
        }
        let (repo, rev, sel) = r.hub_target(&self.catalog).ok_or("no hub target")?;
        Ok(self.hub.cached(&repo, &rev, &sel).map(|p| (p, name)))
    }
}

fn display_name(r: &ModelRef) -> String {
    match r {
        ModelRef::Path(p) => p
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        ModelRef::Catalog(n) => n.clone(),
        ModelRef::Repo { repo, file, .. } => file
            .clone()
            .unwrap_or_else(|| repo.rsplit('/').next().unwrap_or(repo).to_string()),
    }
}

#[async_trait]
impl ModelResolver for HubResolver {
    async fn resolve(
        &self,
        model: &str,
        progress: Arc<dyn Fn(f32) + Send + Sync>,
    ) -> Result<(PathBuf, String), String> {
        if let Some(found) = self.local(model)? {
            return Ok(found);
        }
        let r = ModelRef::parse(model, &self.catalog).map_err(|e| e.to_string())?;
        let (repo, rev, sel) = r.hub_target(&self.catalog).ok_or("no hub target")?;
        let plan = self
            .hub
            .plan(&repo, &rev, &sel)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(%model, %repo, bytes = plan.total_bytes(), "downloading model");
        let sink: Arc<dyn Fn(PullProgress) + Send + Sync> =
            Arc::new(move |p: PullProgress| progress(p.fraction()));
        let path = self
            .hub
            .pull(&plan, sink)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(%model, path = %path.display(), "model downloaded");
        Ok((path, display_name(&r)))
    }
}

fn engine_config(c: &TierConfig, memory: &Arc<MemoryGovernor>) -> EngineConfig {
    let mut ec = EngineConfig::new("");
    ec.queue_capacity = c.max_queue.max(1);
    ec.keep_alive = (c.keep_alive_secs >= 0).then(|| Duration::from_secs(c.keep_alive_secs as u64));
    ec.preload = c.preload;
    ec.context_length = c.context_length;
    ec.memory = Some(memory.clone());
    ec
}

/// Builds the tier backends of a configuration.
pub fn build_router(
    cfg: &Config,
    keyring: &dyn Fn(&str) -> Option<String>,
) -> Result<Arc<TierRouter>, RouterError> {
    let memory = memory_governor(cfg);
    let resolver = Arc::new(HubResolver::from_config(cfg, keyring)?);
    // Tiers naming the same model share one engine (one copy of the weights); each tier still gets its own
    // backend so that swapping one tier's model leaves the other alone.
    let mut engines: BTreeMap<String, Engine> = BTreeMap::new();
    let mut downloads: BTreeMap<String, Vec<(Arc<LocalBackend>, EngineConfig)>> = BTreeMap::new();
    let mut tiers = vec![];
    for (tier, c) in &cfg.tiers {
        let backend: Arc<dyn Backend> = match c.kind {
            TierKind::Local => {
                let template = engine_config(c, &memory);
                let kv = c.kv_bits.map(|bits| jemma_engine::models::gemma4::KvQuant {
                    bits,
                    group_size: c.kv_group_size,
                    start: c.quantized_kv_start,
                });
                let local = resolver
                    .local(&c.model)
                    .map_err(|e| RouterError::Config(format!("tier {tier}: {e}")))?;
                let b = match local {
                    Some((dir, name)) => {
                        let engine = match engines.get(&c.model) {
                            Some(e) => e.clone(),
                            None => {
                                let mut ec = template.clone();
                                ec.model_dir = dir;
                                ec.name = Some(name);
                                let e = Engine::start(ec).map_err(|e| {
                                    RouterError::Config(format!(
                                        "tier {tier}: starting the engine: {e}"
                                    ))
                                })?;
                                engines.insert(c.model.clone(), e.clone());
                                e
                            }
                        };
                        LocalBackend::new(engine, c.default_max_tokens)
                    }
                    None if cfg.models.auto_download => {
                        LocalBackend::pending("downloading 0%", &c.model, c.default_max_tokens)
                    }
                    // Waits for an explicit download (`jemma pull`, the tray's "Download models", or a
                    // model change through /admin); until then its requests fall back.
                    None => LocalBackend::pending("not downloaded", &c.model, c.default_max_tokens),
                };
                let b = Arc::new(
                    b.with_kv_quant(kv)
                        .with_swapping(template.clone(), resolver.clone()),
                );
                if b.model().is_empty() && cfg.models.auto_download {
                    downloads
                        .entry(c.model.clone())
                        .or_default()
                        .push((b.clone(), template));
                }
                b
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
    for (model, waiting) in downloads {
        spawn_download(model, waiting, resolver.clone());
    }
    let status = move || serde_json::to_value(memory.status()).unwrap_or_default();
    Ok(Arc::new(
        TierRouter::new(cfg.classifier.clone(), tiers).with_memory_status(Arc::new(status)),
    ))
}

/// Downloads `model` in the background, showing progress on every tier waiting for it, then starts one
/// engine for all of them.
fn spawn_download(
    model: String,
    waiting: Vec<(Arc<LocalBackend>, EngineConfig)>,
    resolver: Arc<HubResolver>,
) {
    let shown = waiting.iter().map(|(b, _)| b.clone()).collect::<Vec<_>>();
    tokio::spawn(async move {
        let progress: Arc<dyn Fn(f32) + Send + Sync> = Arc::new(move |p| {
            for b in &shown {
                b.set_pending(&format!("downloading {:.0}%", p * 100.0), None);
            }
        });
        match resolver.resolve(&model, progress).await {
            Ok((dir, name)) => {
                let Some((_, template)) = waiting.first() else {
                    return;
                };
                let mut ec = template.clone();
                ec.model_dir = dir;
                ec.name = Some(name);
                match Engine::start(ec) {
                    Ok(engine) => {
                        for (b, _) in &waiting {
                            b.attach(engine.clone());
                        }
                    }
                    Err(e) => {
                        for (b, _) in &waiting {
                            b.set_pending("failed", Some(format!("starting the engine: {e}")));
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(%model, error = %e, "model download failed");
                for (b, _) in &waiting {
                    b.set_pending("failed", Some(e.clone()));
                }
            }
        }
    });
}
