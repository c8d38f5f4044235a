//! `jemma keys create|list|revoke`: API keys for callers that are not on this machine. Keys are shown once
//! and stored hashed; `jemma serve` refuses a non-loopback bind while no key exists.

use std::path::PathBuf;

use anyhow::{Context, bail};
use jemma_gateway::auth::{AccessPolicy, KeyStore};
use jemma_router::config::Config;

/// Arguments of `jemma keys`.
#[derive(clap::Args)]
pub struct Args {
    /// Key file (default: $JEMMA_KEYS_FILE or ~/.config/jemma/keys.json).
    #[arg(long, global = true)]
    file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Create a key and print it once.
    Create {
        /// A label for the key's owner (e.g. "iphone", "laptop").
        #[arg(long)]
        name: String,
    },
    /// List keys (ids and names; the keys themselves are not stored).
    List,
    /// Revoke a key by id or name.
    Revoke {
        /// Key id or name.
        key: String,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let path = args.file.unwrap_or_else(KeyStore::default_path);
    let mut store = KeyStore::load(&path).with_context(|| format!("reading {}", path.display()))?;
    match args.cmd {
        Cmd::Create { name } => {
            let (id, key) = store
                .create(&name)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("created key {id} ({name}); store it now, it is not shown again:");
            println!("{key}");
        }
        Cmd::List => {
            for k in &store.keys {
                println!("{}  {}  created {}", k.id, k.name, k.created);
            }
            if store.keys.is_empty() {
                eprintln!("no keys in {}", path.display());
            }
        }
        Cmd::Revoke { key } => {
            if !store.revoke(&key)? {
                bail!("no key with id or name {key:?}");
            }
            eprintln!("revoked {key}");
        }
    }
    Ok(())
}

/// The gateway's access policy from `[auth]` and `[rate_limits]`. A non-loopback bind without any key would
/// expose the models to the network unauthenticated: refused.
pub fn access_policy(cfg: &Config) -> anyhow::Result<AccessPolicy> {
    let policy = AccessPolicy::from_config(cfg).context("reading the API key file")?;
    // All of 127.0.0.0/8 is this machine, not only 127.0.0.1.
    let host = cfg.server.host.as_str();
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback && !policy.has_keys() {
        bail!(
            "binding {} exposes the gateway: create an API key first with `jemma keys create --name <who>`",
            cfg.server.host
        );
    }
    Ok(policy)
}
