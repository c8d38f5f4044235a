//! `jemma peers`: the other Jemma nodes on this tailnet, found through `tailscale status --json` and each
//! machine's `/health` handshake, with the `jemma.toml` lines that add one of their tiers to this node's
//! pool.

use std::time::Duration;

use jemma_platform::tailscale::Tailscale;
use jemma_router::discovery::{Candidate, identify};

/// Arguments of `jemma peers`.
#[derive(clap::Args)]
pub struct Args {
    /// The port other nodes' gateways listen on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Seconds each machine has to answer.
    #[arg(long, default_value_t = 2.0)]
    timeout: f64,
    /// Print one JSON array instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let ts = Tailscale::detect()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = rt.block_on(ts.status())?;
    anyhow::ensure!(
        status.is_running(),
        "Tailscale is not connected ({})",
        status.backend_state
    );
    let candidates: Vec<Candidate> = status
        .online_peer_urls(args.port)
        .into_iter()
        .map(|(name, url)| Candidate { name, url })
        .collect();
    let nodes = rt.block_on(identify(
        &candidates,
        Duration::from_secs_f64(args.timeout.max(0.1)),
    ));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(());
    }
    println!(
        "{} Jemma node(s) among {} online machine(s) on the tailnet",
        nodes.len(),
        candidates.len()
    );
    for n in &nodes {
        println!(
            "\n{}  {}  jemma {}  ({})",
            n.name, n.url, n.version, n.status
        );
        for (t, tier) in &n.tiers {
            println!(
                "  {t:<8} {:<28} {}{}",
                tier.model,
                tier.state,
                if tier.enabled { "" } else { " (disabled)" }
            );
        }
    }
    if let Some(n) = nodes.first()
        && let Some((t, _)) = n.tiers.iter().next()
    {
        println!(
            "\nTo add a node's tier to this node's pool, add to jemma.toml (its API key from `jemma keys create` on it;\n\
             keep this node's own engine in the pool with a [[tiers.{t}.endpoints]] kind = \"local\" entry):\n\
             [[tiers.{t}.endpoints]]\nkind = \"jemma\"\nname = \"{}\"\nurl = \"{}\"\nkey = \"env:{}_KEY\"",
            n.name,
            n.url,
            n.name.to_uppercase().replace('-', "_")
        );
    }
    Ok(())
}
