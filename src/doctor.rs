//! `jemma doctor`: what this machine is, what it can run, and a configuration to start from.

use std::path::PathBuf;

use jemma_models::Catalog;
use jemma_models::hardware::{Hardware, Recommendation, recommend};
use jemma_models::hub::{Hub, HubConfig, Selection, default_cache_dir};
use serde::Serialize;

/// Arguments of `jemma doctor`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also estimate the memory this model directory needs when served (weights, KV cache, activations).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Context length for the estimate (default: the model's maximum).
    #[arg(long)]
    context: Option<usize>,
    /// Also check this configuration's pools: every endpoint of a tier with `[[endpoints]]` is probed as
    /// the gateway probes it (a Jemma node's /health, an OpenAI server's /v1/models).
    #[arg(long, env = "JEMMA_CONFIG")]
    config: Option<PathBuf>,
}

/// One endpoint of a pool, as probed now.
#[derive(Serialize)]
struct PoolEndpoint {
    tier: String,
    name: String,
    kind: String,
    url: Option<String>,
    weight: f64,
    max_concurrency: usize,
    /// `up` (with the dialect an OpenAI-compatible server reads, `up (reads the llama-server dialect)`),
    /// `down: <why>`, or `local` (this node's engine; `jemma serve` loads it).
    status: String,
}

/// Probes one remote endpoint as its pool would; returns the dialect it speaks, once known (configured,
/// or learned from its `/v1/models`: see `jemma_router::dialect`).
async fn probe_endpoint(
    tier: jemma_router::classify::Tier,
    e: &jemma_router::config::EndpointConfig,
) -> anyhow::Result<Option<jemma_router::dialect::Dialect>> {
    use jemma_router::backend::{Backend, OpenAiBackend, OpenAiConfig, Probe};
    use jemma_router::config::{EndpointKind, resolve_secret};
    let api_key = match &e.api_key {
        Some(k) => Some(resolve_secret(k, &|r| jemma_platform::secrets::resolve(r))?),
        None => None,
    };
    let model = e.model.clone().unwrap_or_else(|| tier.to_string());
    let probe = if e.kind() == EndpointKind::Jemma {
        Probe::Jemma {
            tier: model.clone(),
        }
    } else {
        Probe::Models
    };
    let b = OpenAiBackend::new(OpenAiConfig {
        url: e.url.clone().unwrap_or_default(),
        api_key,
        model,
        connect_timeout: std::time::Duration::from_secs(5),
        default_max_tokens: 1,
        probe,
        dialect: e.dialect,
    })?;
    b.probe().await?;
    Ok(b.health().dialect)
}

/// Probes every endpoint of the configuration's pools.
async fn probe_pools(cfg: &jemma_router::config::Config) -> Vec<PoolEndpoint> {
    use jemma_router::config::EndpointKind;
    let mut out = vec![];
    for (tier, c) in &cfg.tiers {
        for e in &c.endpoints {
            let kind = e.kind();
            let status = match kind {
                EndpointKind::Local => "local".to_string(),
                // A scale-to-zero service: a probe would wake (and bill) an instance.
                _ if !e.probe => "not probed (probe = false)".to_string(),
                EndpointKind::Jemma | EndpointKind::Openai => {
                    match probe_endpoint(*tier, e).await {
                        Ok(Some(d)) => format!("up (reads the {} dialect)", d.as_str()),
                        Ok(None) => "up".to_string(),
                        Err(err) => format!("down: {err}"),
                    }
                }
            };
            out.push(PoolEndpoint {
                tier: tier.to_string(),
                name: e.label(),
                kind: format!("{kind:?}").to_lowercase(),
                url: e.url.clone(),
                weight: e.weight,
                max_concurrency: e.concurrency(),
                status,
            });
        }
    }
    out
}

#[derive(Serialize)]
struct Report {
    hardware: Hardware,
    mlx: Option<jemma_engine::device::MlxInfo>,
    mlx_error: Option<String>,
    hf_cache: PathBuf,
    downloaded: Vec<String>,
    recommendation: Recommendation,
    footprint: Option<jemma_engine::footprint::Footprint>,
    /// The configuration's pools (with `--config`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pools: Vec<PoolEndpoint>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cache = default_cache_dir();
    let hw = Hardware::detect(&cache);
    let (mlx, mlx_error) = match jemma_engine::device::mlx_info() {
        Ok(info) => (Some(info), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let catalog = Catalog::with_overrides(Catalog::user_path().as_deref())?;
    let metal = mlx.as_ref().is_some_and(|m| m.metal_available);
    let recommendation = recommend(&catalog, &hw, metal, jemma_node::setup::LOCAL_FORMATS);
    // The cache lookup needs no network; the client only reads the directory layout.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let hub = rt.block_on(async {
        Hub::new(HubConfig {
            cache_dir: Some(cache.clone()),
            ..Default::default()
        })
    })?;
    let downloaded = catalog
        .models
        .iter()
        .filter(|(_, e)| {
            hub.cached(&e.repo, &e.revision, &Selection::of(e))
                .is_some()
        })
        .map(|(n, _)| n.clone())
        .collect();
    let footprint = match &args.model {
        Some(dir) => {
            let dtype = mlx.as_ref().and_then(|m| {
                jemma_engine::runtime::default_dtype(m.device)
                    .map(jemma_engine::footprint::dtype_bytes)
            });
            Some(
                jemma_engine::footprint::estimate(
                    dir,
                    dtype,
                    args.context,
                    jemma_engine::generate::DEFAULT_PREFILL_STEP,
                    Some(jemma_engine::generate::DEFAULT_ATTENTION_BUDGET),
                )?
                // A tier's default batch: one KV cache per sequence decoded together.
                .for_sequences(jemma_engine::runtime::DEFAULT_MAX_SEQUENCES),
            )
        }
        None => None,
    };
    let pools = match &args.config {
        Some(p) => {
            let cfg = jemma_router::config::Config::load(p)?;
            rt.block_on(probe_pools(&cfg))
        }
        None => vec![],
    };
    let report = Report {
        pools,
        hardware: hw,
        mlx,
        mlx_error,
        hf_cache: cache,
        downloaded,
        recommendation,
        footprint,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let h = &report.hardware;
    println!("os           {} ({})", h.os, h.arch);
    println!(
        "chip         {} ({} cores{})",
        h.chip,
        h.cores,
        if h.apple_silicon {
            ", Apple Silicon"
        } else {
            ""
        }
    );
    println!(
        "memory       {:.1} GiB total, {:.1} GiB available",
        gib(h.total_memory_bytes),
        gib(h.available_memory_bytes)
    );
    match h.disk_free_bytes {
        Some(d) => println!(
            "disk         {:.1} GiB free for {}",
            gib(d),
            report.hf_cache.display()
        ),
        None => println!("disk         unknown ({})", report.hf_cache.display()),
    }
    match (&report.mlx, &report.mlx_error) {
        (Some(m), _) => {
            println!(
                "mlx          {} on {:?} (metal available: {}), compute dtype {}",
                m.mlx_version, m.device, m.metal_available, m.compute_dtype
            );
            if m.device == jemma_engine::device::DeviceKind::Cpu {
                println!(
                    "             MLX's CPU backend is for correctness; llama.cpp is the faster local engine here"
                );
            }
        }
        (None, Some(e)) => println!("mlx          unavailable: {e}"),
        (None, None) => {}
    }
    println!();
    println!("models (catalog: {} entries)", catalog.models.len());
    for f in &report.recommendation.fits {
        let mark = if !f.fits {
            "no "
        } else if f.preferred {
            "yes"
        } else {
            "ok "
        };
        let have = if report.downloaded.contains(&f.model) {
            " [downloaded]"
        } else {
            ""
        };
        println!("  {mark} {:<18} {:<8} {}{have}", f.model, f.tier, f.reason);
    }
    if !report.pools.is_empty() {
        println!();
        println!("pools (probed now, as the gateway probes them)");
        for e in &report.pools {
            println!(
                "  {:<8} {:<22} {:<6} {:<40} weight {} max_concurrency {}  {}",
                e.tier,
                e.name,
                e.kind,
                e.url.as_deref().unwrap_or("-"),
                e.weight,
                e.max_concurrency,
                e.status
            );
        }
    }
    if let Some(fp) = &report.footprint {
        println!();
        println!("footprint    {}", fp.describe());
    }
    println!();
    println!(
        "recommended jemma.toml (models are downloaded at the first `jemma serve`, or now with `jemma pull`):"
    );
    print!("{}", report.recommendation.config_toml);
    Ok(())
}
