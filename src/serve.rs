//! `jemma serve`: the gateway on 127.0.0.1:8080 with the configured tiers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use jemma_gateway::AppState;
use jemma_router::classify::Tier;
use jemma_router::config::{Config, TierConfig, TierKind};

/// Arguments of `jemma serve`.
#[derive(clap::Args)]
pub struct Args {
    /// Configuration file (jemma.toml); every key has a default.
    #[arg(long, env = "JEMMA_CONFIG")]
    config: Option<PathBuf>,
    /// Serve this model (a Gemma 4 checkpoint directory for MLX, or a GGUF file for llama.cpp) as the fast and
    /// primary tiers (one engine), overriding the config's tiers.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Bind address (default 127.0.0.1; anything else exposes the gateway).
    #[arg(long)]
    host: Option<String>,
    /// Port (default 8080; 0 picks a free one and prints it).
    #[arg(long)]
    port: Option<u16>,
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
        let router =
            jemma_node::setup::build_router(&cfg, &|r| jemma_platform::secrets::resolve(r))?;
        let state = AppState::new(
            router,
            cfg.limits.clone(),
            cfg.server.max_body_bytes,
            Duration::from_secs_f64(cfg.server.sse_keep_alive_secs),
        )
        .with_cors_origins(cfg.server.cors_origins.clone())
        .with_access(crate::keys::access_policy(&cfg)?)
        .with_membership(Arc::new(jemma_router::membership::Membership::new(
            cfg.clone(),
            Arc::new(|r: &str| jemma_platform::secrets::resolve(r)),
        )));
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
                #[expect(
                    clippy::expect_used,
                    reason = "registering SIGTERM fails only without a signal driver, which this runtime has"
                )]
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
        let engines_stopped = state.router.stopped();
        jemma_gateway::serve(listener, jemma_gateway::router(state), shutdown).await?;
        // The gateway (and with it every handle to the engines) is gone: let the engine threads free their
        // models before the process exits (MLX buffers freed during exit can corrupt its allocator).
        if tokio::time::timeout(Duration::from_secs(10), engines_stopped)
            .await
            .is_err()
        {
            tracing::warn!("engines still running at exit");
        }
        Ok(())
    })
}
