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
use jemma_models::hub::{Hub, HubConfig, ModelRef, Selection, cli_token};
use jemma_models::{Catalog, PullProgress};

use crate::in_process::EngineBackend;
use jemma_router::RouterError;
use jemma_router::backend::{Backend, BackendState, OpenAiConfig, Probe};
use jemma_router::classify::Tier;
use jemma_router::config::{
    Config, EndpointKind, FlashAttention, TierConfig, TierKind, resolve_secret,
};
use jemma_router::membership::{remote_endpoint, upstream_backend};
use jemma_router::pool::{EndpointSpec, Pool, PoolConfig};
use jemma_router::route::{TierRouter, TierSettings};
use jemma_router::tier::{BackendFactory, LocalTier, ModelResolver};

/// Checkpoint formats the local engines of this build serve.
#[cfg(feature = "llama")]
pub const LOCAL_FORMATS: &[jemma_models::Format] =
    &[jemma_models::Format::Mlx, jemma_models::Format::Gguf];
/// Checkpoint formats the local engines of this build serve.
#[cfg(not(feature = "llama"))]
pub const LOCAL_FORMATS: &[jemma_models::Format] = &[jemma_models::Format::Mlx];

/// Keychain account of the Hugging Face token (the app's Settings window stores it there).
pub const HF_TOKEN_KEYCHAIN: &str = "ai.jemma/hf_token";

/// Router settings of one configured tier.
pub fn settings(c: &TierConfig, cfg: &Config) -> TierSettings {
    TierSettings {
        enabled: c.enabled,
        max_concurrency: c.concurrency(),
        max_queue: c.max_queue,
        first_token_timeout: Duration::from_secs_f64(c.first_token_timeout_secs),
        idle_timeout: Duration::from_secs_f64(c.idle_timeout_secs),
        breaker: c.breaker.clone().unwrap_or_else(|| cfg.breaker.clone()),
        aliases: c.aliases.clone(),
        max_tokens: c.max_tokens_ceiling,
        video_frames: c.video_frames,
        video_seconds: c.video_seconds,
    }
}

/// How the pool of a tier with `[[endpoints]]` times out, judges and probes them: the tier's timeouts and
/// breaker settings, per endpoint.
pub fn pool_config(tier: Tier, c: &TierConfig, cfg: &Config) -> PoolConfig {
    let s = settings(c, cfg);
    PoolConfig {
        first_token_timeout: s.first_token_timeout,
        idle_timeout: s.idle_timeout,
        breaker: s.breaker,
        probe_interval: Duration::from_secs_f64(c.probe_interval_secs),
        unhealthy_threshold: c.unhealthy_threshold,
        healthy_threshold: c.healthy_threshold,
        ..PoolConfig::new(tier.as_str())
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
    /// Where URL downloads go (`$JEMMA_MODEL_DIR`, else `jemma-models` beside the Hub cache).
    url_dir: PathBuf,
}

impl HubResolver {
    /// From `[models]`.
    pub fn from_config(
        cfg: &Config,
        keyring: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, RouterError> {
        let catalog = Catalog::load(cfg.models.catalog.as_deref())
            .map_err(|e| RouterError::Config(e.to_string()))?;
        let hub = Hub::new(HubConfig {
            endpoint: cfg.models.endpoint.clone(),
            token: hf_token(cfg, keyring),
            cache_dir: cfg.models.cache_dir.as_ref().map(PathBuf::from),
            chunk_size: None,
        })
        .map_err(|e| RouterError::Config(e.to_string()))?;
        let url_dir = std::env::var_os("JEMMA_MODEL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let c = hub.cache_dir();
                c.parent().unwrap_or(c).join("jemma-models")
            });
        Ok(Self {
            catalog,
            hub,
            url_dir,
        })
    }

    /// The directory (or GGUF file) and display name of `model` if it is on disk already (no network).
    pub fn local(&self, model: &str) -> Result<Option<(PathBuf, String)>, String> {
        let r = ModelRef::parse(model, &self.catalog).map_err(|e| e.to_string())?;
        let name = display_name(&r);
        if let ModelRef::Path(p) = r {
            return Ok(Some((p, name)));
        }
        if let ModelRef::Url(u) = &r {
            // A finished download (partial ones keep a .part suffix) is served without asking the server.
            let file = jemma_models::url::http_url(u)
                .ok()
                .and_then(|h| h.rsplit('/').next().map(|f| self.url_dir.join(f)))
                .filter(|f| f.is_file());
            return Ok(file.map(|f| (f, name)));
        }
        let (repo, rev, sel) = r.hub_target(&self.catalog).ok_or("no hub target")?;
        Ok(self.hub.cached(&repo, &rev, &sel).map(|p| (p, name)))
    }

    /// The mmproj GGUF the catalog pairs with the GGUF `model` (a file in the Hub cache), if it is
    /// downloaded ([`jemma_models::Entry::mmproj`]): `jemma pull` fetches it beside the model.
    pub fn mmproj_for(&self, model: &std::path::Path) -> Option<PathBuf> {
        let repo = self.hub.repo_of(model)?;
        let file = model.file_name()?.to_str()?;
        let e = self
            .catalog
            .models
            .values()
            .find(|e| e.repo.eq_ignore_ascii_case(&repo) && e.file.as_deref() == Some(file))?;
        let mmproj = e.mmproj.clone()?;
        self.hub.cached(
            &e.repo,
            &e.revision,
            &jemma_models::hub::Selection::File(mmproj),
        )
    }

    /// The Gemma 4 assistant (MTP) drafter beside the GGUF `model` ([`assistant_beside`]), looking above
    /// the model's directory up to its snapshot's root when it is in the Hub cache.
    pub fn assistant_for(&self, model: &std::path::Path) -> Option<PathBuf> {
        assistant_beside(model, self.hub.snapshot_of(model).as_deref())
    }

    /// The Gemma 4 assistant (MTP) drafter on disk next to the MLX model in `model`, if one is: for a
    /// model in the Hub cache, the drafter the catalog pairs it with ([`jemma_models::Entry::drafter`]),
    /// then cached repos named as its drafter; for a directory elsewhere, directories beside it named so.
    /// Named so means Google's and mlx-community's convention, `<model up to "-it">-it-assistant…`
    /// (gemma-4-E4B-it-4bit → gemma-4-E4B-it-assistant-bf16), or `<model>-assistant…`. A candidate
    /// counts only if its config says it drafts for this model
    /// ([`AssistantConfig::check_target_dir`](jemma_engine::models::gemma4::assistant::AssistantConfig::check_target_dir)).
    pub fn drafter_for(&self, model: &std::path::Path) -> Option<PathBuf> {
        let mut candidates = vec![];
        let name_of = |p: &std::path::Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        if let Some(repo) = self.hub.repo_of(model) {
            if let Some((_, d)) = self
                .catalog
                .by_repo(&repo)
                .and_then(|(n, _)| self.catalog.drafter_of(n))
            {
                let sel = jemma_models::hub::Selection::of(d);
                candidates.extend(self.hub.cached(&d.repo, &d.revision, &sel));
            }
            let own = repo.rsplit('/').next().unwrap_or(&repo);
            for r in self.hub.cached_repos() {
                if named_as_drafter_of(own, r.rsplit('/').next().unwrap_or(&r)) {
                    candidates.extend(self.hub.cached(
                        &r,
                        "main",
                        &jemma_models::hub::Selection::Mlx,
                    ));
                }
            }
        } else if let Some(parent) = model.parent() {
            let own = name_of(model);
            let mut beside: Vec<PathBuf> = std::fs::read_dir(parent)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir() && named_as_drafter_of(&own, &name_of(p)))
                .collect();
            beside.sort();
            candidates.extend(beside);
        }
        candidates.into_iter().find(|d| {
            jemma_engine::models::gemma4::assistant::AssistantConfig::check_target_dir(d, model)
                .inspect_err(|e| {
                    tracing::warn!(drafter = %d.display(), model = %model.display(), error = %e,
                        "not using the drafter next to the model");
                })
                .is_ok()
        })
    }

    /// The catalog name of the drafter paired with `model` (a catalog name, or the Hub repo of an entry).
    fn paired_drafter(&self, model: &ModelRef) -> Option<String> {
        let name = match model {
            ModelRef::Catalog(n) => n.clone(),
            ModelRef::Repo {
                repo, file: None, ..
            } => self.catalog.by_repo(repo)?.0.clone(),
            _ => return None,
        };
        self.catalog.drafter_of(&name).map(|(d, _)| d.clone())
    }
}

/// Whether the directory or repo named `candidate` is named as the assistant drafter of the model named
/// `model` (see [`HubResolver::drafter_for`]); without case, as the Hub compares names.
fn named_as_drafter_of(model: &str, candidate: &str) -> bool {
    let (m, c) = (model.to_ascii_lowercase(), candidate.to_ascii_lowercase());
    // The name up to its instruction-tuned marker: quantization suffixes differ between a model and its
    // drafter (a 4-bit model, a bf16 drafter).
    let base = m
        .rfind("-it")
        .filter(|&i| m[i + 3..].is_empty() || m[i + 3..].starts_with('-'))
        .map_or(m.as_str(), |i| &m[..i + 3]);
    c != m
        && (c.starts_with(&format!("{base}-assistant")) || c.starts_with(&format!("{m}-assistant")))
}

fn display_name(r: &ModelRef) -> String {
    match r {
        // A GGUF is named without its extension, as llama.cpp tools name models.
        ModelRef::Path(p) if p.extension().is_some_and(|e| e == "gguf") => p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        ModelRef::Path(p) => p
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        ModelRef::Catalog(n) => n.clone(),
        ModelRef::Url(u) => u
            .rsplit('/')
            .next()
            .unwrap_or(u)
            .trim_end_matches(".gguf")
            .to_string(),
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
        if let ModelRef::Url(u) = &r {
            tracing::info!(url = %u, dir = %self.url_dir.display(), "downloading model");
            let path = jemma_models::url::download(u, &self.url_dir, None, logged(progress))
                .await
                .map_err(|e| e.to_string())?;
            return Ok((path, display_name(&r)));
        }
        // The model's drafter comes with it, as `jemma pull` fetches it: a tier serving the model
        // speculates with it. Its failure leaves the model to serve alone.
        let drafter = self.paired_drafter(&r);
        let (repo, rev, sel) = r.hub_target(&self.catalog).ok_or("no hub target")?;
        let plan = self
            .hub
            .plan(&repo, &rev, &sel)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(%model, %repo, bytes = plan.total_bytes(), "downloading model");
        let path = self
            .hub
            .pull(&plan, logged(progress.clone()))
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(%model, path = %path.display(), "model downloaded");
        // A GGUF model's towers come with it too (`jemma pull` fetches them): without them its tier
        // serves text.
        if let ModelRef::Catalog(n) = &r
            && let Some(e) = self.catalog.models.get(n)
            && let Some(mmproj) = &e.mmproj
        {
            let sel = jemma_models::hub::Selection::File(mmproj.clone());
            let quiet: Arc<dyn Fn(f32) + Send + Sync> = Arc::new(|_| {});
            let fetched = match self.hub.plan(&e.repo, &e.revision, &sel).await {
                Ok(plan) => self.hub.pull(&plan, logged(quiet)).await,
                Err(e) => Err(e),
            };
            match fetched {
                Ok(p) => tracing::info!(%model, mmproj = %p.display(), "mmproj downloaded"),
                Err(e) => tracing::warn!(%model, %mmproj, error = %e,
                    "the model's mmproj did not download; it serves text only"),
            }
        }
        // So does a GGUF repo's assistant drafter, by llama.cpp's sidecar convention (`mtp-…gguf`), as
        // `jemma pull` fetches it: a tier serving the model finds it beside the model.
        if let Selection::File(file) = &sel
            && jemma_models::hub::gguf_is_model(file)
        {
            let quiet: Arc<dyn Fn(f32) + Send + Sync> = Arc::new(|_| {});
            let fetched = match self.hub.mtp_sidecar(&repo, &rev, file).await {
                Ok(Some(side)) => {
                    let sel = Selection::File(side);
                    match self.hub.plan(&repo, &rev, &sel).await {
                        Ok(plan) => self.hub.pull(&plan, logged(quiet)).await.map(Some),
                        Err(e) => Err(e),
                    }
                }
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            match fetched {
                Ok(Some(p)) => tracing::info!(%model, drafter = %p.display(), "drafter downloaded"),
                Ok(None) => {}
                Err(e) => tracing::warn!(%model, error = %e,
                    "the model's drafter did not download; serving without it"),
            }
        }
        if let Some(d) = drafter.filter(|d| matches!(self.local(d), Ok(None))) {
            // Logged, not shown: the tier's progress ended at the model's 100 %.
            let quiet: Arc<dyn Fn(f32) + Send + Sync> = Arc::new(|_| {});
            match Box::pin(self.resolve(&d, quiet)).await {
                Ok((p, _)) => tracing::info!(%model, drafter = %p.display(), "drafter downloaded"),
                Err(e) => tracing::warn!(%model, drafter = %d, error = %e,
                    "the model's drafter did not download; serving without it"),
            }
        }
        Ok((path, display_name(&r)))
    }
}

/// Forwards download progress and logs a line per 5 %, so a headless server's logs (Cloud Run's cold start)
/// show how far the download is.
fn logged(progress: Arc<dyn Fn(f32) + Send + Sync>) -> Arc<dyn Fn(PullProgress) + Send + Sync> {
    let last = std::sync::Mutex::new(-1i64);
    Arc::new(move |p: PullProgress| {
        progress(p.fraction());
        let step = (p.fraction() * 20.0) as i64;
        let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
        if step != *l {
            *l = step;
            tracing::info!(file = %p.file, done = p.done_bytes, total = p.total_bytes, "downloading {}%", step * 5);
        }
    })
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

/// Where a local tier's draft model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DraftSource {
    /// No speculation: `enabled = false`.
    Off,
    /// The assistant (MTP) drafter found next to the tier's model, if one is: for an MLX model
    /// [`HubResolver::drafter_for`], for a GGUF [`assistant_beside`].
    Found,
    /// `draft_model`: a path, catalog name, Hub repo or URL, resolved as a tier's `model` is.
    Named(String),
}

impl DraftSource {
    fn of(c: &TierConfig) -> Self {
        match &c.speculative {
            Some(sp) if !sp.enabled => Self::Off,
            Some(sp) if !sp.draft_model.is_empty() => Self::Named(sp.draft_model.clone()),
            Some(_) | None => Self::Found,
        }
    }
}

/// The llama.cpp cache types a GGUF tier's `cache_type_k` and `cache_type_v` (or `jemma generate`'s and
/// `jemma bench`'s flags) name, F16 where unset.
#[cfg(feature = "llama")]
pub fn llama_cache_types(
    k: Option<jemma_router::config::CacheType>,
    v: Option<jemma_router::config::CacheType>,
) -> jemma_engine_llama::CacheTypes {
    use jemma_engine_llama::KvCacheType;
    use jemma_router::config::CacheType;
    let of = |t: Option<CacheType>| match t.unwrap_or_default() {
        CacheType::F32 => KvCacheType::F32,
        CacheType::F16 => KvCacheType::F16,
        CacheType::Bf16 => KvCacheType::BF16,
        CacheType::Q8_0 => KvCacheType::Q8_0,
        CacheType::Q4_0 => KvCacheType::Q4_0,
        CacheType::Q4_1 => KvCacheType::Q4_1,
        CacheType::Iq4_nl => KvCacheType::IQ4_NL,
        CacheType::Q5_0 => KvCacheType::Q5_0,
        CacheType::Q5_1 => KvCacheType::Q5_1,
    };
    jemma_engine_llama::CacheTypes { k: of(k), v: of(v) }
}

/// The engine for a model path: llama.cpp for a `.gguf` file, else MLX. Engines started through one factory
/// call for the same path are shared by the tiers that name it (`shared` holds weak references, so an engine
/// no tier uses any more stops and frees its memory).
/// The engines started, by model (and draft, attention and towers), each with the engine settings of the
/// tier that started it ([`engine_settings`]).
type SharedEngines = Arc<std::sync::Mutex<BTreeMap<PathBuf, SharedEngine>>>;

/// One started engine that tiers naming its model share, and the settings it was started with.
type SharedEngine = (std::sync::Weak<dyn Backend>, Vec<(&'static str, String)>);

/// A tier's settings that its engine, once started, holds for every tier sharing it, by TOML name, with
/// their values as written (defaults included).
fn engine_settings(c: &TierConfig, default_max_tokens: u32) -> Vec<(&'static str, String)> {
    let sp = c.speculative.clone().unwrap_or_default();
    [
        ("context_length", format!("{:?}", c.context_length)),
        ("kv_bits", format!("{:?}", c.kv_bits)),
        ("kv_group_size", c.kv_group_size.to_string()),
        ("quantized_kv_start", c.quantized_kv_start.to_string()),
        (
            "cache_type_k",
            format!("{:?}", c.cache_type_k.unwrap_or_default()),
        ),
        (
            "cache_type_v",
            format!("{:?}", c.cache_type_v.unwrap_or_default()),
        ),
        ("keep_alive_secs", c.keep_alive_secs.to_string()),
        ("preload", c.preload.to_string()),
        ("max_queue", c.max_queue.to_string()),
        ("max_concurrency", c.concurrency().to_string()),
        ("default_max_tokens", default_max_tokens.to_string()),
        ("speculative.enabled", sp.enabled.to_string()),
        (
            "speculative.max_draft_tokens",
            sp.max_draft_tokens.to_string(),
        ),
        ("speculative.max_batch", sp.max_batch.to_string()),
        ("speculative.adaptive", sp.adaptive.to_string()),
    ]
    .into()
}

fn factory(
    c: &TierConfig,
    default_max_tokens: u32,
    limits: jemma_router::api::Limits,
    memory: &Arc<MemoryGovernor>,
    shared: SharedEngines,
    resolver: Arc<HubResolver>,
) -> BackendFactory {
    let template = engine_config(c, memory);
    let source = DraftSource::of(c);
    let asked = c.speculative.is_some();
    let sp = c.speculative.clone().unwrap_or_default();
    let spec_config = jemma_serve::speculative::SpeculativeConfig {
        max_draft_tokens: sp.max_draft_tokens,
        max_batch: sp.max_batch,
        adaptive: sp.adaptive,
    };
    // The MLX engine's KV quantization, as the tier writes it (for the refusal on a GGUF tier).
    let kv_settings = {
        let d = TierConfig::default();
        [
            ("kv_bits", c.kv_bits.is_some()),
            ("kv_group_size", c.kv_group_size != d.kv_group_size),
            (
                "quantized_kv_start",
                c.quantized_kv_start != d.quantized_kv_start,
            ),
        ]
        .into_iter()
        .find_map(|(k, set)| set.then_some(k))
    };
    let kv = c.kv_bits.map(|bits| jemma_engine::models::gemma4::KvQuant {
        bits,
        group_size: c.kv_group_size,
        start: c.quantized_kv_start,
    });
    let context = c.context_length;
    let queue = template.queue_capacity;
    let parallel = c.concurrency().clamp(1, 64) as u32;
    let (mmproj, image_tokens, video_tokens) = (c.mmproj.clone(), c.image_tokens, c.video_tokens);
    let flash_attention = c.flash_attention;
    let cache_types = (c.cache_type_k, c.cache_type_v);
    let settings = engine_settings(c, default_max_tokens);
    Arc::new(move |path: PathBuf, name: String| {
        let is_gguf = path.extension().is_some_and(|e| e == "gguf");
        let draft = match &source {
            DraftSource::Off => None,
            DraftSource::Named(r) => Some(
                resolver
                    .local(r)
                    .map_err(|e| format!("draft model {r}: {e}"))?
                    .ok_or_else(|| {
                        format!(
                            "draft model {r} is not downloaded (the log says why a download failed): run \
                             `jemma pull {r}` where the Hub is reachable, or remove draft_model \
                             (enabled = false turns speculation off)"
                        )
                    })?
                    .0,
            ),
            DraftSource::Found if is_gguf => match resolver.assistant_for(&path) {
                Some(d) => {
                    tracing::info!(model = %path.display(), drafter = %d.display(),
                        "speculating with the assistant drafter found next to the model");
                    Some(d)
                }
                // Asked for by a [speculative] section: a draft must then be found or named.
                None if asked => {
                    return Err(format!(
                        "{}: no assistant drafter beside this GGUF (a gemma4-assistant .gguf named \
                         `mtp-…` or `<model up to \"-it\">-it-assistant…`): set draft_model in the tier's \
                         [tiers.<tier>.speculative] section to the model's Gemma 4 assistant as a .gguf or \
                         to a smaller .gguf with the same vocabulary, or remove that section",
                        path.display()
                    ));
                }
                None => None,
            },
            DraftSource::Found => resolver.drafter_for(&path).inspect(|d| {
                tracing::info!(model = %path.display(), drafter = %d.display(),
                    "speculating with the assistant drafter found next to the model");
            }),
        };
        let mut template = template.clone();
        template.speculative = draft.map(|d| jemma_engine::runtime::SpeculativeSettings {
            draft_model: d,
            config: spec_config.clone(),
            optional: source == DraftSource::Found,
        });
        if let Some(sp) = &template.speculative {
            // A draft runs on its target's engine: a GGUF drafts for a GGUF, an MLX directory for MLX.
            let draft_gguf = sp.draft_model.extension().is_some_and(|e| e == "gguf");
            if is_gguf != draft_gguf {
                return Err(format!(
                    "the tier's model {} is {}, so its draft model must be one too (the same engine runs \
                     both); {} is not",
                    path.display(),
                    if is_gguf {
                        "a .gguf file (llama.cpp)"
                    } else {
                        "an MLX model directory"
                    },
                    sp.draft_model.display(),
                ));
            }
        }
        // A draft model is the engine's, not a tier's: tiers share an engine only when they also agree on
        // its draft (a tier without one must not get another tier's speculation, nor the reverse).
        // The GGUF engine's settings on an MLX tier would be silently ignored: refused instead (an MLX
        // checkpoint carries its towers and its processor's image budget).
        if !is_gguf && (mmproj.is_some() || image_tokens.is_some() || video_tokens.is_some()) {
            return Err(format!(
                "{}: `mmproj`, `image_tokens` and `video_tokens` are settings of GGUF tiers (the llama.cpp \
                 engine); an MLX model reads its towers and budgets from its own checkpoint: remove them",
                path.display()
            ));
        }
        // llama.cpp quantizes its cache by type (llama-server's --cache-type-k), not by MLX's bits and
        // groups, and MLX by bits: either's settings would be silently ignored on the other's tier.
        if let Some(key) = kv_settings.filter(|_| is_gguf) {
            return Err(format!(
                "{}: `{key}` is a setting of MLX tiers (mlx-lm's quantized KV cache); the llama.cpp \
                 engine's cache is quantized by type: set cache_type_k and cache_type_v (q8_0, q4_0, …) \
                 instead",
                path.display()
            ));
        }
        if !is_gguf && (cache_types.0.is_some() || cache_types.1.is_some()) {
            return Err(format!(
                "{}: `cache_type_k` and `cache_type_v` are settings of GGUF tiers (llama.cpp's cache \
                 types); an MLX tier's KV cache is quantized by kv_bits (and kv_group_size): set those \
                 instead",
                path.display()
            ));
        }
        if !is_gguf && flash_attention.is_some() {
            return Err(format!(
                "{}: `flash_attention` is a setting of GGUF tiers (llama.cpp's); MLX runs its own \
                 attention: remove it",
                path.display()
            ));
        }
        // A named mmproj must load; a found one that does not leaves the model serving text.
        let (mmproj, mmproj_optional) = match &mmproj {
            Some(m) if is_gguf => (Some(m.clone()), false),
            _ if is_gguf => (
                resolver.mmproj_for(&path).or_else(|| mmproj_beside(&path)),
                true,
            ),
            _ => (None, false),
        };
        let mut key = match &template.speculative {
            Some(sp) => PathBuf::from(format!(
                "{}\u{0}draft={}",
                path.display(),
                sp.draft_model.display()
            )),
            None => path.clone(),
        };
        // Nor do tiers with another attention policy (an explicit `auto` is the default's)...
        if let Some(fa) = flash_attention.filter(|&fa| fa != FlashAttention::Auto) {
            key = PathBuf::from(format!("{}\u{0}flash_attention={fa:?}", key.display()));
        }
        // ...nor tiers with other towers (or other image budgets).
        if mmproj.is_some() || image_tokens.is_some() || video_tokens.is_some() {
            key = PathBuf::from(format!(
                "{}\u{0}mmproj={:?}\u{0}image_tokens={image_tokens:?}\u{0}video_tokens={video_tokens:?}",
                key.display(),
                mmproj
            ));
        }
        if let Some((b, theirs)) = (shared.lock().unwrap_or_else(|e| e.into_inner()))
            .get(&key)
            .and_then(|(b, s)| Some((b.upgrade()?, s.clone())))
        {
            // The engine is the first tier's: another tier's settings for it would be silently dropped.
            let differ: Vec<&str> = (theirs.iter().zip(&settings))
                .filter(|(a, b)| a != b)
                .map(|(a, _)| a.0)
                .collect();
            if !differ.is_empty() {
                return Err(format!(
                    "{}: another tier serves this model, and tiers naming one model share its engine, \
                     whose settings are the first tier's; set {} alike on both (or serve a copy of the \
                     model under another path)",
                    path.display(),
                    differ.join(", ")
                ));
            }
            return Ok(b);
        }
        let b: Arc<dyn Backend> = if is_gguf {
            #[cfg(feature = "llama")]
            {
                let mut lc = jemma_engine_llama::LlamaConfig::new(path);
                lc.name = Some(name);
                // The same lifecycle as MLX tiers: keep-alive, preload and the memory budget.
                lc.context_length = context.map(|c| c as u32);
                lc.queue_capacity = queue;
                lc.parallel = parallel;
                lc.keep_alive = template.keep_alive;
                lc.preload = template.preload;
                lc.memory = template.memory.clone();
                if let Some(mm) = &mmproj {
                    tracing::info!(model = %lc.model_path.display(), mmproj = %mm.display(), "GGUF with its mmproj");
                }
                lc.mmproj_path = mmproj;
                lc.mmproj_optional = mmproj_optional;
                lc.image_soft_tokens =
                    image_tokens.unwrap_or(jemma_engine_llama::DEFAULT_IMAGE_SOFT_TOKENS);
                lc.video_soft_tokens =
                    video_tokens.unwrap_or(jemma_engine_llama::DEFAULT_VIDEO_SOFT_TOKENS);
                lc.flash_attention = match flash_attention.unwrap_or_default() {
                    FlashAttention::Auto => jemma_engine_llama::FlashAttention::Auto,
                    FlashAttention::On => jemma_engine_llama::FlashAttention::On,
                    FlashAttention::Off => jemma_engine_llama::FlashAttention::Off,
                };
                lc.cache = llama_cache_types(cache_types.0, cache_types.1);
                lc.speculative =
                    template
                        .speculative
                        .as_ref()
                        .map(|sp| jemma_engine_llama::LlamaSpeculative {
                            draft_model: sp.draft_model.clone(),
                            config: sp.config.clone(),
                            optional: sp.optional,
                        });
                let e = jemma_engine_llama::LlamaEngine::start(lc).map_err(|e| e.to_string())?;
                Arc::new(EngineBackend::new(e, default_max_tokens).with_limits(limits.clone()))
            }
            #[cfg(not(feature = "llama"))]
            {
                let _ = (
                    name,
                    context,
                    queue,
                    parallel,
                    mmproj,
                    mmproj_optional,
                    flash_attention,
                    cache_types,
                );
                return Err(format!(
                    "{}: a GGUF model needs the llama.cpp engine, which this build does not include",
                    path.display()
                ));
            }
        } else {
            let mut ec = template.clone();
            ec.model_dir = path;
            ec.name = Some(name);
            ec.max_sequences = parallel as usize;
            let e = Engine::start(ec).map_err(|e| format!("starting the engine: {e}"))?;
            Arc::new(
                EngineBackend::new(
                    crate::in_process::Mlx {
                        engine: e,
                        kv_quant: kv,
                    },
                    default_max_tokens,
                )
                .with_limits(limits.clone()),
            )
        };
        shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (Arc::downgrade(&b), settings.clone()));
        Ok(b)
    })
}

/// The Gemma 4 assistant (MTP) drafter beside a GGUF model, whose architecture is llama.cpp's
/// `gemma4-assistant`:
/// - llama.cpp's sidecar (`mtp-…gguf`, what `llama-server -hf` and `jemma pull` fetch with a model) in the
///   model's directory, or, for a model inside a Hub snapshot (`snapshot`: that snapshot's root), in a
///   directory above it up to the snapshot's root (outside a snapshot, only in a directory that holds no
///   other model: whose sidecar it is cannot be told otherwise), picked as llama.cpp picks it
///   ([`jemma_models::hub::best_sibling`] with the model's tag: the deepest, then the model's own
///   quantization, then the closest);
/// - else a `.gguf` in its directory named as its drafter (the MLX convention of
///   [`HubResolver::drafter_for`] on file stems: `gemma-4-E4B-it-Q4_K_M.gguf` →
///   `gemma-4-E4B-it-assistant-Q8_0.gguf`), the first by name when several are.
///
/// Whether it drafts for this model (the hidden size it reads) is checked when it loads; one that does
/// not leaves the model decoding plainly.
fn assistant_beside(
    model: &std::path::Path,
    snapshot: Option<&std::path::Path>,
) -> Option<PathBuf> {
    #[cfg(feature = "llama")]
    {
        let stem = |p: &std::path::Path| {
            p.file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let dir = model.parent()?;
        // The directories a sidecar may sit in, relative to the top one: the model's own, and those above
        // it inside its snapshot.
        let top = snapshot.filter(|s| dir.starts_with(s)).unwrap_or(dir);
        let mut files = vec![];
        let mut d = Some(dir);
        while let Some(here) = d.filter(|h| h.starts_with(top)) {
            for e in std::fs::read_dir(here).into_iter().flatten().flatten() {
                let p = e.path();
                if let Ok(rel) = p.strip_prefix(top)
                    && p.is_file()
                {
                    files.push(rel.to_string_lossy().into_owned());
                }
            }
            d = here.parent();
        }
        // In one order whatever the filesystem's: of equal candidates, the first by name wins.
        files.sort();
        let own = model.strip_prefix(top).ok()?.to_string_lossy().into_owned();
        let tag = jemma_models::hub::gguf_tag(&own);
        let is_assistant =
            |p: &std::path::Path| jemma_engine_llama::is_assistant(p).unwrap_or(false);
        // A repo's sidecar belongs to the repo's model. Outside a Hub snapshot, a directory of several
        // models cannot say whose a sidecar is (as `mmproj_beside`): only the naming below can.
        let models = (files.iter())
            .filter(|f| !f.contains('/') && jemma_models::hub::gguf_is_model(f))
            .filter(|f| !f.to_ascii_lowercase().contains("-assistant"))
            .count();
        let repo_like = snapshot.is_some_and(|s| dir.starts_with(s)) || models <= 1;
        // Sidecars best first: a sidecar that is no assistant (an Eagle head) is passed over.
        let mut sidecars: Vec<String> = files
            .iter()
            .filter(|f| {
                repo_like && f.contains(jemma_models::hub::MTP_SIDECAR) && f.ends_with(".gguf")
            })
            .cloned()
            .collect();
        while let Some(best) =
            jemma_models::hub::best_sibling(&sidecars, &own, jemma_models::hub::MTP_SIDECAR, &tag)
        {
            if is_assistant(&top.join(&best)) {
                return Some(top.join(best));
            }
            sidecars.retain(|f| *f != best);
        }
        let own = stem(model);
        let mut beside: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
                    && named_as_drafter_of(&own, &stem(p))
            })
            .collect();
        beside.sort();
        beside.into_iter().find(|p| is_assistant(p))
    }
    #[cfg(not(feature = "llama"))]
    {
        let _ = (model, snapshot);
        None
    }
}

/// The mmproj GGUF beside the GGUF `model` in a model's own directory (as a Hub download is): the
/// directory holds that one model and exactly one `mmproj*.gguf` (as llama.cpp's converter names them).
/// None otherwise — no mmproj, several, or a directory of several models, where which mmproj goes with
/// which model cannot be told (then the tier's `mmproj` says). An assistant drafter beside it
/// (`mtp-…`, `…-assistant…`) does not count as another model.
fn mmproj_beside(model: &std::path::Path) -> Option<PathBuf> {
    let dir = model.parent()?;
    let (mut mmproj, mut models) = (vec![], 0);
    for e in std::fs::read_dir(dir).ok()? {
        let p = e.ok()?.path();
        let Some(name) = p
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_ascii_lowercase)
        else {
            continue;
        };
        if !name.ends_with(".gguf") {
            continue;
        }
        if name.starts_with("mmproj") {
            mmproj.push(p);
        } else if jemma_models::hub::gguf_is_model(&name) && !name.contains("-assistant") {
            // An assistant drafter beside the model (`mtp-…`, `…-assistant…`) is not another model the
            // mmproj could be for.
            models += 1;
        }
    }
    (models == 1 && mmproj.len() == 1).then(|| mmproj.remove(0))
}

/// Builds the tier backends of a configuration.
pub fn build_router(
    cfg: &Config,
    keyring: &dyn Fn(&str) -> Option<String>,
) -> Result<Arc<TierRouter>, RouterError> {
    let memory = memory_governor(cfg);
    let resolver = Arc::new(HubResolver::from_config(cfg, keyring)?);
    // Tiers naming the same model share one engine (one copy of the weights) at start; each tier still
    // gets its own wrapper so that swapping one tier's model leaves the other alone.
    let shared: SharedEngines = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    // What to download in the background: each model once, with the named draft models not on disk yet of
    // the tiers waiting for it.
    let mut downloads: BTreeMap<String, (Vec<Arc<LocalTier>>, Vec<String>)> = BTreeMap::new();
    let mut tiers = vec![];
    // Within the tier's own ceiling: a default is never more than the tier would accept if asked.
    let default_max_tokens = |c: &TierConfig| {
        c.default_max_tokens
            .unwrap_or(cfg.limits.default_max_tokens)
            .min(c.max_tokens_ceiling.unwrap_or(u32::MAX))
    };
    for (tier, c) in &cfg.tiers {
        let mut local = |c: &TierConfig| -> Result<Arc<dyn Backend>, RouterError> {
            let f = factory(
                c,
                default_max_tokens(c),
                cfg.limits.clone(),
                &memory,
                shared.clone(),
                resolver.clone(),
            );
            let on_disk = resolver
                .local(&c.model)
                .map_err(|e| RouterError::Config(format!("tier {tier}: {e}")))?;
            // A named draft model not on disk yet downloads with the model (without auto_download the
            // engine's start says how to fetch it).
            let missing_draft = match DraftSource::of(c) {
                DraftSource::Named(r) => resolver
                    .local(&r)
                    .map_err(|e| RouterError::Config(format!("tier {tier}: draft model {r}: {e}")))?
                    .is_none()
                    .then_some(r),
                _ => None,
            };
            let t = match on_disk {
                Some((path, name)) if missing_draft.is_none() || !cfg.models.auto_download => {
                    let b = f(path, name)
                        .map_err(|e| RouterError::Config(format!("tier {tier}: {e}")))?;
                    LocalTier::new(b)
                }
                _ if cfg.models.auto_download => {
                    LocalTier::pending(BackendState::Downloading { progress: 0.0 }, &c.model)
                }
                // Waits for an explicit download (`jemma pull`, the tray's "Download models", or a
                // model change through /admin); until then its requests fall back.
                _ => LocalTier::pending(BackendState::NotDownloaded, &c.model),
            };
            let t = Arc::new(t.with_swapping(f, resolver.clone()));
            if t.model().is_empty() && cfg.models.auto_download {
                let (waiting, drafts) = downloads.entry(c.model.clone()).or_default();
                waiting.push(t.clone());
                drafts.extend(missing_draft.filter(|d| !drafts.contains(d)));
            }
            Ok(t)
        };
        let backend: Arc<dyn Backend> = if c.endpoints.is_empty() {
            match c.kind {
                TierKind::Local => local(c)?,
                TierKind::Openai => {
                    let model = if c.model.is_empty() {
                        tier.to_string()
                    } else {
                        c.model.clone()
                    };
                    let url = c.url.as_deref().unwrap_or_default();
                    upstream_backend(
                        *tier,
                        OpenAiConfig {
                            api_key: c.api_key.clone(),
                            dialect: c.dialect,
                            ..OpenAiConfig::new(url, model, Probe::Models, default_max_tokens(c))
                        },
                        keyring,
                    )?
                }
            }
        } else {
            let mut specs = vec![];
            for e in &c.endpoints {
                let backend = match e.kind() {
                    EndpointKind::Local => {
                        // This node's engine for the tier's model, running the endpoint's share.
                        let mut lc = c.clone();
                        lc.endpoints.clear();
                        lc.max_concurrency = Some(e.concurrency());
                        local(&lc)?
                    }
                    EndpointKind::Jemma | EndpointKind::Openai => {
                        remote_endpoint(*tier, c, e, default_max_tokens(c), keyring)?
                    }
                };
                specs.push(EndpointSpec {
                    name: e.label(),
                    backend,
                    weight: e.weight,
                    max_concurrency: e.concurrency(),
                    probe: e.probe,
                });
            }
            Arc::new(Pool::new(pool_config(*tier, c, cfg), specs))
        };
        tiers.push((*tier, backend, settings(c, cfg)));
    }
    if tiers.is_empty() {
        return Err(RouterError::Config(
            "no tiers configured: pass --model <dir> or a config with [tiers.*]".into(),
        ));
    }
    for (model, (waiting, drafts)) in downloads {
        spawn_download(model, drafts, waiting, resolver.clone());
    }
    let status = move || serde_json::to_value(memory.status()).unwrap_or_default();
    Ok(Arc::new(
        TierRouter::new(cfg.classifier.clone(), tiers).with_memory_status(Arc::new(status)),
    ))
}

/// Downloads `model` (then `drafts`, named draft models of the tiers waiting for it) in the background,
/// showing progress on every tier waiting for it, then starts its engine (shared by the tiers that agree on
/// their draft).
fn spawn_download(
    model: String,
    drafts: Vec<String>,
    waiting: Vec<Arc<LocalTier>>,
    resolver: Arc<HubResolver>,
) {
    let shown = waiting.clone();
    tokio::spawn(async move {
        let progress: Arc<dyn Fn(f32) + Send + Sync> = Arc::new(move |p| {
            for t in &shown {
                t.set_pending(BackendState::Downloading { progress: p }, None);
            }
        });
        let resolved = resolver.resolve(&model, progress.clone()).await;
        if resolved.is_ok() {
            for d in &drafts {
                // A draft that did not come fails only the tiers naming it, when their engine starts
                // (the factory says how to fetch it); the reason is logged here.
                if let Err(e) = resolver.resolve(d, progress.clone()).await {
                    tracing::error!(%model, draft = %d, error = %e,
                        "draft model download failed: the tiers naming it cannot start until it is pulled");
                }
            }
        }
        match resolved {
            Ok((path, name)) => {
                for t in &waiting {
                    if let Err(e) = t.start_engine(path.clone(), name.clone()) {
                        t.set_pending(BackendState::Failed, Some(e));
                    }
                }
            }
            Err(e) => {
                tracing::error!(%model, error = %e, "the tier cannot start");
                for t in &waiting {
                    t.set_pending(BackendState::Failed, Some(e.clone()));
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    /// `mmproj`, `image_tokens`, `video_tokens`, `flash_attention` and the cache types on an MLX tier are
    /// refused when its engine starts, naming them, rather than ignored.
    #[test]
    fn gguf_media_settings_on_an_mlx_tier_are_refused() {
        let cfg = jemma_router::config::Config::default();
        for tier in [
            jemma_router::config::TierConfig {
                image_tokens: Some(70),
                ..Default::default()
            },
            jemma_router::config::TierConfig {
                video_tokens: Some(70),
                ..Default::default()
            },
            jemma_router::config::TierConfig {
                flash_attention: Some(jemma_router::config::FlashAttention::Off),
                ..Default::default()
            },
            jemma_router::config::TierConfig {
                cache_type_k: Some(jemma_router::config::CacheType::Q8_0),
                ..Default::default()
            },
            jemma_router::config::TierConfig {
                cache_type_v: Some(jemma_router::config::CacheType::F32),
                ..Default::default()
            },
        ] {
            refused_on_mlx(&cfg, &tier);
        }
    }

    /// MLX's KV quantization on a GGUF tier is refused, naming the setting, rather than ignored.
    #[test]
    fn mlx_kv_settings_on_a_gguf_tier_are_refused() {
        let cfg = jemma_router::config::Config::default();
        for (key, tier) in [
            (
                "kv_bits",
                jemma_router::config::TierConfig {
                    kv_bits: Some(8),
                    ..Default::default()
                },
            ),
            (
                "quantized_kv_start",
                jemma_router::config::TierConfig {
                    quantized_kv_start: 0,
                    ..Default::default()
                },
            ),
        ] {
            match factory_for(&cfg, &tier)("/nonexistent/model.gguf".into(), "t".into()) {
                Err(e) => assert!(
                    e.contains(key) && e.contains("MLX tiers") && e.contains("cache_type_k"),
                    "{e}"
                ),
                Ok(_) => panic!("a GGUF tier took {key}"),
            }
        }
    }

    fn factory_for(
        cfg: &jemma_router::config::Config,
        tier: &jemma_router::config::TierConfig,
    ) -> super::BackendFactory {
        super::factory(
            tier,
            64,
            jemma_router::api::Limits::default(),
            &super::memory_governor(cfg),
            Default::default(),
            std::sync::Arc::new(super::HubResolver::from_config(cfg, &|_| None).unwrap()),
        )
    }

    fn refused_on_mlx(cfg: &jemma_router::config::Config, tier: &jemma_router::config::TierConfig) {
        let f = factory_for(cfg, tier);
        let key = if tier.image_tokens.is_some() {
            "image_tokens"
        } else if tier.video_tokens.is_some() {
            "video_tokens"
        } else if tier.cache_type_k.is_some() || tier.cache_type_v.is_some() {
            "cache_type_k` and `cache_type_v"
        } else {
            "flash_attention"
        };
        match f("/nonexistent/mlx-model".into(), "t".into()) {
            Err(e) => assert!(e.contains(key) && e.contains("GGUF"), "{e}"),
            Ok(_) => panic!("an MLX tier took {key}"),
        }
    }

    /// An mmproj is paired with a GGUF found beside it only in the model's own folder: one model and one
    /// mmproj (an assistant drafter beside them aside); not among several models (which one it belongs to
    /// cannot be told), nor between two.
    #[test]
    fn an_mmproj_is_found_beside_its_model_only_in_the_models_own_folder() {
        let dir = tempfile::tempdir().unwrap();
        let touch = |n: &str| std::fs::write(dir.path().join(n), b"GGUF").unwrap();
        let model = dir.path().join("gemma-4-e2b-it-Q4_K_M.gguf");
        touch("gemma-4-e2b-it-Q4_K_M.gguf");
        touch("README.md");
        assert_eq!(super::mmproj_beside(&model), None, "no mmproj");
        touch("mmproj-F16.gguf");
        assert_eq!(
            super::mmproj_beside(&model),
            Some(dir.path().join("mmproj-F16.gguf"))
        );
        // An assistant drafter beside the model is not another model.
        touch("gemma-4-e2b-it-assistant-Q8_0.gguf");
        assert_eq!(
            super::mmproj_beside(&model),
            Some(dir.path().join("mmproj-F16.gguf"))
        );
        touch("mmproj-BF16.gguf");
        assert_eq!(super::mmproj_beside(&model), None, "two to choose from");
        std::fs::remove_file(dir.path().join("mmproj-BF16.gguf")).unwrap();
        touch("gemma-4-e4b-it-Q4_K_M.gguf");
        assert_eq!(super::mmproj_beside(&model), None, "two models");
    }

    /// Why the engine for `model` (a path) of a tier speculating with `sp`, under `cfg`, refused to start.
    fn refusal(
        cfg: &jemma_router::config::Config,
        sp: jemma_router::config::SpeculativeTierConfig,
        model: &str,
    ) -> String {
        let tier = jemma_router::config::TierConfig {
            speculative: Some(sp),
            ..Default::default()
        };
        let f = super::factory(
            &tier,
            64,
            jemma_router::api::Limits::default(),
            &super::memory_governor(cfg),
            Default::default(),
            std::sync::Arc::new(super::HubResolver::from_config(cfg, &|_| None).unwrap()),
        );
        match f(model.into(), "t".into()) {
            Err(e) => e,
            Ok(_) => panic!("{model} started"),
        }
    }

    /// A draft runs on its target's engine: a GGUF tier drafting with an MLX directory, or the reverse, is
    /// refused when the engine starts, naming both; a named draft not on disk says how to fetch it; a
    /// GGUF tier's section without a draft cannot be honoured.
    #[test]
    fn a_draft_on_another_engine_than_its_target_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("draft-mlx")).unwrap();
        std::fs::write(dir.path().join("draft.gguf"), b"").unwrap();
        let cfg = jemma_router::config::Config::parse(&format!(
            "[models]\ncache_dir = \"{}\"\n",
            dir.path().join("hf").display()
        ))
        .unwrap();
        let named = |d: &str| jemma_router::config::SpeculativeTierConfig {
            draft_model: d.into(),
            ..Default::default()
        };
        for (model, draft) in [("/m/tiny.gguf", "draft-mlx"), ("/m/tiny-mlx", "draft.gguf")] {
            let draft = dir.path().join(draft).to_string_lossy().into_owned();
            let e = refusal(&cfg, named(&draft), model);
            assert!(e.contains("same engine") && e.contains(&draft), "{e}");
        }
        let e = refusal(&cfg, named("gemma-4-e2b"), "/m/tiny-mlx");
        assert!(e.contains("jemma pull gemma-4-e2b"), "{e}");
        // A GGUF tier with none beside it: the section names what to set.
        let e = refusal(&cfg, Default::default(), "/m/tiny.gguf");
        assert!(
            e.contains("no assistant drafter beside") && e.contains("draft_model"),
            "{e}"
        );
    }

    /// Where a tier's draft comes from: the drafter found next to its model unless told otherwise, none
    /// with `enabled = false`.
    #[test]
    fn draft_sources() {
        use super::DraftSource;
        use jemma_router::config::{SpeculativeTierConfig, TierConfig};
        let with = |sp: Option<SpeculativeTierConfig>, kv_bits: Option<i32>| TierConfig {
            speculative: sp,
            kv_bits,
            ..Default::default()
        };
        let named = SpeculativeTierConfig {
            draft_model: "gemma-4-e2b".into(),
            ..Default::default()
        };
        assert_eq!(DraftSource::of(&with(None, None)), DraftSource::Found);
        // The assistant reads a `kv_bits` cache as the target does.
        assert_eq!(DraftSource::of(&with(None, Some(8))), DraftSource::Found);
        assert_eq!(
            DraftSource::of(&with(Some(Default::default()), None)),
            DraftSource::Found
        );
        assert_eq!(
            DraftSource::of(&with(Some(named.clone()), None)),
            DraftSource::Named("gemma-4-e2b".into())
        );
        let off = SpeculativeTierConfig {
            enabled: false,
            ..named
        };
        assert_eq!(DraftSource::of(&with(Some(off), None)), DraftSource::Off);
    }

    /// Drafters are named after their model up to its instruction-tuned marker (the quantization
    /// differs), or after the whole name.
    #[test]
    fn drafter_names() {
        use super::named_as_drafter_of as n;
        assert!(n("gemma-4-E4B-it-4bit", "gemma-4-E4B-it-assistant-bf16"));
        assert!(n(
            "gemma-4-26b-a4b-it-4bit",
            "gemma-4-26B-A4B-it-assistant-bf16"
        ));
        assert!(n("gemma-4-31B-it", "gemma-4-31B-it-assistant"));
        assert!(n("tiny", "tiny-assistant"));
        assert!(!n("gemma-4-E4B-it-4bit", "gemma-4-E2B-it-assistant-bf16"));
        assert!(!n("gemma-4-E4B-it-4bit", "gemma-4-E4B-it-8bit"));
        assert!(!n("tiny", "tiny-q4"));
        assert!(!n("gemma-4-e4b-item", "gemma-4-e4b-it-assistant"));
    }

    /// `[tiers.X.speculative]`'s defaults are the serving core's (written twice: the router's configuration
    /// builds without the engines).
    #[test]
    fn speculative_defaults_are_the_serving_cores() {
        let c = jemma_router::config::SpeculativeTierConfig::default();
        let d = jemma_serve::speculative::SpeculativeConfig::default();
        assert_eq!(
            (c.max_draft_tokens, c.max_batch, c.adaptive),
            (d.max_draft_tokens, d.max_batch, d.adaptive)
        );
    }
}
