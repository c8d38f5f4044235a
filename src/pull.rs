//! `jemma pull`: download models from the Hugging Face Hub into the standard cache, with a progress bar.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use jemma_models::hardware::{Hardware, recommend};
use jemma_models::hub::{Hub, HubConfig, ModelRef, Selection, default_cache_dir};
use jemma_models::{Catalog, PullProgress};
use jemma_router::config::Config;

/// Arguments of `jemma pull`.
#[derive(clap::Args)]
pub struct Args {
    /// Catalog names (`gemma-4-e2b`), Hub repos (`owner/name[@revision]`) or GGUF files
    /// (`owner/name/file.gguf`). None: the models `jemma doctor` recommends for this machine.
    models: Vec<String>,
    /// List the catalog and what is already downloaded, then exit.
    #[arg(long)]
    list: bool,
    /// Hugging Face token for gated repos (default: HF_TOKEN, the keychain entry ai.jemma/hf_token, then
    /// the HF CLI's token file).
    #[arg(long, env = "JEMMA_HF_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Hub cache directory (default: $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Hub URL (default: $HF_ENDPOINT, else https://huggingface.co).
    #[arg(long)]
    endpoint: Option<String>,
    /// A configuration whose [models] section (catalog, cache, endpoint, token) applies.
    #[arg(long, env = "JEMMA_CONFIG")]
    config: Option<PathBuf>,
    /// One JSON line per progress update instead of a bar (for scripts and the app).
    #[arg(long)]
    json: bool,
    /// Skip the models' assistant (MTP) drafters: those the catalog pairs with them, and a GGUF repo's
    /// `mtp-…gguf` sidecar (llama.cpp's convention). Fetched by default: a tier speculates with its
    /// model's drafter when it is on disk.
    #[arg(long)]
    no_drafters: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let catalog = Catalog::load(cfg.models.catalog.as_deref())?;
    let token = if args.list {
        None
    } else {
        args.token
            .clone()
            .or_else(|| jemma_node::setup::hf_token(&cfg, &|r| jemma_platform::secrets::resolve(r)))
    };
    let cache_dir = args
        .cache_dir
        .clone()
        .or_else(|| cfg.models.cache_dir.as_ref().map(PathBuf::from))
        .unwrap_or_else(default_cache_dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let hub = rt.block_on(async {
        Hub::new(HubConfig {
            endpoint: args.endpoint.clone().or(cfg.models.endpoint.clone()),
            token,
            cache_dir: Some(cache_dir.clone()),
            chunk_size: None,
        })
    })?;
    if args.list {
        let width = catalog.models.keys().map(String::len).max().unwrap_or(0);
        for (name, e) in &catalog.models {
            let sel = Selection::of(e);
            let here = hub.cached(&e.repo, &e.revision, &sel);
            // A drafter serves no tier: say whose drafter it is.
            let drafts_for: Vec<&str> = catalog
                .models
                .iter()
                .filter(|(_, m)| m.drafter.as_deref() == Some(name.as_str()))
                .map(|(n, _)| n.as_str())
                .collect();
            println!(
                "{name:<width$} {:<8} {:<5} {:>7.1} GB  {}{}{}",
                e.tier,
                format!("{:?}", e.format).to_lowercase(),
                e.download_bytes as f64 / 1e9,
                e.repo,
                if drafts_for.is_empty() {
                    String::new()
                } else {
                    format!("  (drafter of {})", drafts_for.join(", "))
                },
                match here {
                    Some(p) => format!("  [downloaded: {}]", p.display()),
                    None => "  [not downloaded]".to_string(),
                }
            );
        }
        return Ok(());
    }
    let wanted = if args.models.is_empty() {
        let hw = Hardware::detect(&cache_dir);
        let metal = jemma_engine::device::mlx_info()
            .map(|i| i.metal_available)
            .unwrap_or(false);
        let rec = recommend(&catalog, &hw, metal, jemma_node::setup::LOCAL_FORMATS);
        let mut picks: Vec<String> = ["fast", "primary"]
            .iter()
            .filter_map(|t| rec.pick(t))
            .collect();
        picks.dedup();
        if picks.is_empty() {
            bail!("no catalog model fits this machine (see `jemma doctor`)");
        }
        eprintln!("pulling what fits this machine: {}", picks.join(", "));
        picks
    } else {
        args.models.clone()
    };
    let asked = wanted.clone();
    let wanted = if args.no_drafters {
        wanted
    } else {
        with_drafters(&catalog, wanted)
    };
    let mut failed = 0;
    for m in &wanted {
        // A drafter that was not asked for by name only speeds its model up: its failure is a warning.
        let optional = !asked.contains(m);
        match rt.block_on(pull_one(&hub, &catalog, m, args.json)) {
            Ok(path) => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({"model": m, "done": true, "path": path})
                    );
                } else {
                    println!("{m}: {}", path.display());
                }
                // A GGUF model's towers: without them it serves text, so their failure is a warning.
                if let Some(mmproj) = mmproj_of(&catalog, m) {
                    match rt.block_on(pull_one(&hub, &catalog, &mmproj, args.json)) {
                        Ok(p) if args.json => println!(
                            "{}",
                            serde_json::json!({"model": m, "mmproj": p, "done": true})
                        ),
                        Ok(p) => println!("{m} (its mmproj): {}", p.display()),
                        Err(e) if args.json => println!(
                            "{}",
                            serde_json::json!({"model": m, "warning": format!("mmproj: {e:#}")})
                        ),
                        Err(e) => eprintln!(
                            "{m}: its mmproj {mmproj} (images and audio): {e:#}; the model serves text"
                        ),
                    }
                }
                // A GGUF repo's assistant drafter, by llama.cpp's sidecar convention (`mtp-…gguf`, what
                // `llama-server -hf` fetches): a tier serving the model finds it beside the model.
                if !args.no_drafters
                    && let Some((repo, rev, file)) = gguf_of(&catalog, m)
                {
                    // JSON progress lines name the model (their `file` says which), a bar the drafter.
                    let label = if args.json {
                        m.clone()
                    } else {
                        format!("{m} (its drafter)")
                    };
                    let side = rt.block_on(async {
                        match hub.mtp_sidecar(&repo, &rev, &file).await? {
                            Some(f) => {
                                let sel = Selection::File(f);
                                pull_target(&hub, &repo, &rev, &sel, &label, args.json)
                                    .await
                                    .map(Some)
                            }
                            None => Ok(None),
                        }
                    });
                    match side {
                        Ok(None) => {}
                        Ok(Some(p)) if args.json => println!(
                            "{}",
                            serde_json::json!({"model": m, "drafter": p, "done": true})
                        ),
                        Ok(Some(p)) => println!("{m} (its drafter): {}", p.display()),
                        Err(e) if args.json => println!(
                            "{}",
                            serde_json::json!({"model": m, "warning": format!("drafter: {e:#}")})
                        ),
                        Err(e) => {
                            eprintln!("{m} (its drafter): {e:#}; the model serves without it")
                        }
                    }
                }
            }
            Err(e) => {
                let (key, note) = if optional {
                    (
                        "warning",
                        " (the drafter of a model above; it serves without)",
                    )
                } else {
                    failed += 1;
                    ("error", "")
                };
                if args.json {
                    println!("{}", serde_json::json!({"model": m, key: format!("{e:#}")}));
                } else {
                    eprintln!("{m}{note}: {e:#}");
                }
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} downloads failed", asked.len());
    }
    Ok(())
}

/// The mmproj GGUF the catalog pairs with `model` (a catalog name), as a Hub file reference
/// (`owner/name/file.gguf`, `@revision` when not main); None for other models.
fn mmproj_of(catalog: &Catalog, model: &str) -> Option<String> {
    let Ok(ModelRef::Catalog(name)) = ModelRef::parse(model, catalog) else {
        return None;
    };
    let e = catalog.models.get(&name)?;
    let file = e.mmproj.as_ref()?;
    Some(if e.revision == "main" {
        format!("{}/{file}", e.repo)
    } else {
        format!("{}/{file}@{}", e.repo, e.revision)
    })
}

/// The Hub repo, revision and file of `model` when it is a GGUF model (a catalog entry or
/// `owner/name/file.gguf`); None for other models.
fn gguf_of(catalog: &Catalog, model: &str) -> Option<(String, String, String)> {
    match ModelRef::parse(model, catalog).ok()?.hub_target(catalog)? {
        (repo, rev, Selection::File(f)) if jemma_models::hub::gguf_is_model(&f) => {
            Some((repo, rev, f))
        }
        _ => None,
    }
}

/// `wanted` with, after each model the catalog pairs with an assistant drafter (by name or Hub repo), that
/// drafter (once).
fn with_drafters(catalog: &Catalog, wanted: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for m in wanted {
        let entry = match ModelRef::parse(&m, catalog) {
            Ok(ModelRef::Catalog(n)) => Some(n),
            Ok(ModelRef::Repo {
                repo, file: None, ..
            }) => catalog.by_repo(&repo).map(|(n, _)| n.clone()),
            _ => None,
        };
        let drafter = entry.and_then(|n| catalog.drafter_of(&n).map(|(d, _)| d.clone()));
        for x in std::iter::once(m).chain(drafter) {
            if !out.contains(&x) {
                out.push(x);
            }
        }
    }
    out
}

async fn pull_one(
    hub: &Hub,
    catalog: &Catalog,
    model: &str,
    json: bool,
) -> anyhow::Result<PathBuf> {
    let r = ModelRef::parse(model, catalog)?;
    let Some((repo, rev, sel)) = r.hub_target(catalog) else {
        bail!("{model} is a local path; nothing to download");
    };
    pull_target(hub, &repo, &rev, &sel, model, json).await
}

/// Downloads `sel` of `repo@rev`, showing progress under `label`.
async fn pull_target(
    hub: &Hub,
    repo: &str,
    rev: &str,
    sel: &Selection,
    label: &str,
    json: bool,
) -> anyhow::Result<PathBuf> {
    let model = label;
    let plan = hub
        .plan(repo, rev, sel)
        .await
        .with_context(|| format!("asking the Hub about {repo}"))?;
    let total = plan.total_bytes();
    let sink: Arc<dyn Fn(PullProgress) + Send + Sync> = if json {
        let last = std::sync::Mutex::new(-1i64);
        let model = model.to_string();
        Arc::new(move |p: PullProgress| {
            // One line per percent, not per chunk.
            let pct = (p.fraction() * 100.0) as i64;
            let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
            if pct != *l {
                *l = pct;
                println!(
                    "{}",
                    serde_json::json!({"model": model, "file": p.file, "done_bytes": p.done_bytes, "total_bytes": p.total_bytes})
                );
            }
        })
    } else {
        let bar = ProgressBar::new(total);
        #[expect(clippy::expect_used, reason = "the template is a constant")]
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(model.to_string());
        Arc::new(move |p: PullProgress| {
            bar.set_position(p.done_bytes);
            if p.done_bytes >= p.total_bytes {
                bar.finish();
            }
        })
    };
    Ok(hub.pull(&plan, sink).await?)
}
