//! `jemma serve`: the gateway on 127.0.0.1:8080 with the configured tiers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use jemma_engine::runtime::{Engine, EngineConfig};
use jemma_gateway::AppState;
use jemma_router::backend::{Backend, LocalBackend, OpenAiBackend, OpenAiConfig};
use jemma_router::classify::Tier;
use jemma_router::config::{Config, TierConfig, TierKind, resolve_secret};
use jemma_router::route::{TierRouter, TierSettings};

/// Arguments of `jemma serve`.
#[derive(clap::Args)]
pub struct Args {
    /// Configuration file (jemma.toml); every key has a default.
    #[arg(long, env = "JEMMA_CONFIG")]
    config: Option<PathBuf>,
    /// Serve this model directory as the fast and primary tiers (one engine), overriding the config's tiers.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Bind address (default 127.0.0.1; anything else exposes the gateway).
    #[arg(long)]
    host: Option<String>,
    /// Port (default 8080; 0 picks a free one and prints it).
    #[arg(long)]
    port: Option<u16>,
}

fn settings(c: &TierConfig, cfg: &Config) -> TierSettings {
    TierSettings {
        enabled: c.enabled,
        max_concurrency: c.max_concurrency,
        max_queue: c.max_queue,
        first_token_timeout: Duration::from_secs_f64(c.first_token_timeout_secs),
        idle_timeout: Duration::from_secs_f64(c.idle_timeout_secs),
        breaker: c.breaker.clone().unwrap_or_else(|| cfg.breaker.clone()),
        aliases: c.aliases.clone(),
    }
}

/// Builds the tier backends of a configuration; local tiers naming the same model directory share one
/// engine (one copy of the weights in memory).
pub fn build_router(cfg: &Config) -> anyhow::Result<Arc<TierRouter>> {
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
                    let engine = Engine::start(ec)
                        .with_context(|| format!("tier {tier}: starting the engine"))?;
                    let b: Arc<dyn Backend> =
                        Arc::new(LocalBackend::new(engine, c.default_max_tokens));
                    engines.insert(dir, b.clone());
                    b
                }
            }
            TierKind::Openai => {
                let key = match &c.api_key {
                    Some(k) => Some(
                        resolve_secret(k, &|_| None)
                            .with_context(|| format!("tier {tier}: api_key"))?,
                    ),
                    None => None,
                };
                Arc::new(OpenAiBackend::new(OpenAiConfig {
                    url: c.url.clone().unwrap_or_default(),
                    api_key: key,
                    model: if c.model.is_empty() {
                        tier.to_string()
                    } else {
                        c.model.clone()
                    },
                    connect_timeout: Duration::from_secs(10),
                    default_max_tokens: c.default_max_tokens,
                })?)
            }
        };
        tiers.push((*tier, backend, settings(c, cfg)));
    }
    if tiers.is_empty() {
        bail!("no tiers configured: pass --model <dir> or a config with [tiers.*]");
    }
    Ok(Arc::new(TierRouter::new(cfg.classifier.clone(), tiers)))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    cfg.apply_env(|k| std::env::var(k).ok())?;
    if let Some(m) = &args.model {
        let dir = m.to_string_lossy().into_owned();
        for t in [Tier::Fast, Tier::Primary] {
            cfg.tiers.insert(
                t,
                TierConfig {
                    kind: TierKind::Local,
                    model: dir.clone(),
                    ..Default::default()
                },
            );
        }
    }
    if let Some(h) = args.host {
        cfg.server.host = h;
    }
    if let Some(p) = args.port {
        cfg.server.port = p;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let router = build_router(&cfg)?;
        let state = AppState::new(
            router,
            cfg.limits.clone(),
            cfg.server.max_body_bytes,
            Duration::from_secs_f64(cfg.server.keep_alive_secs),
        )
        .with_cors_origins(cfg.server.cors_origins.clone());
        let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        // Scripts and tests read this line to find the port (with --port 0).
        println!("jemma gateway listening on http://{local}");
        tracing::info!(%local, tiers = ?cfg.tiers.keys().collect::<Vec<_>>(), "gateway listening");
        let shutdown = async {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            }
            #[cfg(not(unix))]
            {
                let _ = ctrl_c.await;
            }
            tracing::info!("shutting down: draining in-flight requests");
        };
        jemma_gateway::serve(listener, jemma_gateway::router(state), shutdown).await?;
        Ok(())
    })
}
