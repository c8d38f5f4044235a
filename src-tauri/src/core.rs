//! The app's backend: the same gateway and engines as `jemma serve`, hosted on Tauri's tokio runtime, plus
//! the settings file. Everything the tray and commands show comes from cheap snapshots of this.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jemma_router::classify::Tier;
use jemma_router::config::{Config, EndpointConfig, EndpointKind, TierConfig, TierKind};
use jemma_router::discovery::{Candidate, PeerNode};
use jemma_router::membership::Membership;
use jemma_router::route::TierRouter;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// User settings (non-secret; secrets live in the OS keychain). Saved as JSON in the app's config dir.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Settings {
    /// The heavy tier's OpenAI-compatible URL (the Cloud Run service).
    pub heavy_url: String,
    /// Model directory per local tier.
    pub models: Models,
    /// Unload an idle model after this many seconds; -1 = never.
    pub keep_alive: i64,
    /// Other Jemma nodes' tiers serving in this node's pools (the tray's Peers menu), joined again at
    /// every start.
    pub peers: Vec<JoinedPeer>,
}

/// A peer's tier that serves in this node's tier of the same name.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct JoinedPeer {
    /// The tier (`fast`, `primary`, `heavy`): the peer's and this node's.
    pub tier: String,
    /// The peer's tailnet host name: the endpoint's name in `/health` and `_routing.endpoint`.
    pub node: String,
    /// Its gateway's base URL.
    pub url: String,
}

/// Keychain account of the key this node sends to its peers (the Settings window stores it).
pub const PEER_KEY_ACCOUNT: &str = "peer_api_key";

/// The endpoint a joined peer is in a pool: a Jemma node asked for the same tier, with the key from
/// `[peers] api_key`, else the keychain's `peer_api_key` when one is stored.
pub fn peer_endpoint(p: &JoinedPeer, cfg: &Config, key_stored: bool) -> EndpointConfig {
    EndpointConfig {
        kind: Some(EndpointKind::Jemma),
        name: Some(p.node.clone()),
        url: Some(p.url.clone()),
        api_key: cfg.peers.api_key.clone().or_else(|| {
            key_stored.then(|| format!("keyring:{KEYCHAIN_SERVICE}/{PEER_KEY_ACCOUNT}"))
        }),
        model: Some(p.tier.clone()),
        ..EndpointConfig::default()
    }
}

/// Model per local tier.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Models {
    /// Fast tier (Gemma 4 E2B).
    pub fast: String,
    /// Primary tier (Gemma 4 E4B).
    pub primary: String,
}

/// The running gateway and what the UI needs around it.
pub struct Core {
    /// Tiers and routing.
    pub router: Arc<TierRouter>,
    /// The gateway's API keys (shared with its auth layer: a key created here is valid at once).
    pub keys: Arc<std::sync::Mutex<jemma_gateway::auth::KeyStore>>,
    /// Where the gateway listens.
    pub url: String,
    /// Its port.
    pub port: u16,
    shutdown: watch::Sender<bool>,
    served: Mutex<Option<tokio::task::JoinHandle<()>>>,
    settings_path: PathBuf,
    /// Current settings.
    pub settings: Mutex<Settings>,
    /// Adds peers' tiers to this node's pools while it serves.
    membership: Arc<Membership>,
    /// The configuration served (for `[peers]`).
    cfg: Config,
}

/// Keychain service name for the app's secrets.
pub const KEYCHAIN_SERVICE: &str = "ai.jemma";

fn load_settings(path: &PathBuf) -> Settings {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Settings {
            keep_alive: 300,
            ..Default::default()
        })
}

/// The configuration the app serves: `JEMMA_CONFIG` (or `jemma.toml` in the app's config dir) with the
/// Settings window's choices applied on top.
pub fn effective_config(
    config_dir: &std::path::Path,
    settings: &Settings,
) -> anyhow::Result<Config> {
    let path = std::env::var_os("JEMMA_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| config_dir.join("jemma.toml"));
    let mut cfg = if path.exists() {
        Config::load(&path)?
    } else {
        Config::default()
    };
    for (tier, model) in [
        (Tier::Fast, &settings.models.fast),
        (Tier::Primary, &settings.models.primary),
    ] {
        if model.is_empty() {
            continue;
        }
        match cfg.tiers.get_mut(&tier) {
            // A pool from jemma.toml keeps its endpoints: the model is what its local endpoint serves.
            // A local tier keeps its settings (context, keep-alive, …): only the model is chosen here.
            Some(t) if !t.endpoints.is_empty() || t.kind == TierKind::Local => {
                t.model = model.clone()
            }
            _ => {
                cfg.tiers.insert(
                    tier,
                    TierConfig {
                        kind: TierKind::Local,
                        model: model.clone(),
                        ..Default::default()
                    },
                );
            }
        }
    }
    if cfg.tiers.is_empty() {
        // First launch with nothing configured: the models that fit this machine (the hardware check),
        // downloaded only when the user asks (the tray's "Download models").
        let cache = cfg
            .models
            .cache_dir
            .as_ref()
            .map(PathBuf::from)
            .unwrap_or_else(jemma_models::hub::default_cache_dir);
        let hw = jemma_models::hardware::Hardware::detect(&cache);
        let metal = jemma_engine::device::mlx_info()
            .map(|i| i.metal_available)
            .unwrap_or(false);
        let catalog =
            jemma_models::Catalog::with_overrides(jemma_models::Catalog::user_path().as_deref())?;
        let rec = jemma_models::hardware::recommend(
            &catalog,
            &hw,
            metal,
            jemma_node::setup::LOCAL_FORMATS,
        );
        tracing::info!(
            ?hw,
            "first launch: no models configured; recommending for this machine"
        );
        for (tier, name) in [(Tier::Fast, "fast"), (Tier::Primary, "primary")] {
            if let Some(model) = rec.pick(name).or_else(|| rec.pick("fast")) {
                cfg.tiers.insert(
                    tier,
                    TierConfig {
                        kind: TierKind::Local,
                        model,
                        ..Default::default()
                    },
                );
            }
        }
        cfg.models.auto_download = false;
    }
    // The Settings window's keep-alive applies to every tier this node's engine serves (0 means "use the
    // config's"); a pool of other nodes only has none to keep (and refuses the setting).
    if settings.keep_alive != 0 {
        let engine_serves = |t: &TierConfig| {
            t.kind == TierKind::Local
                && (t.endpoints.is_empty()
                    || t.endpoints.iter().any(|e| e.kind() == EndpointKind::Local))
        };
        for t in cfg.tiers.values_mut().filter(|t| engine_serves(t)) {
            t.keep_alive_secs = settings.keep_alive;
        }
    }
    let heavy_pool = cfg
        .tiers
        .get(&Tier::Heavy)
        .is_some_and(|t| !t.endpoints.is_empty());
    if heavy_pool && !settings.heavy_url.is_empty() {
        // The configuration's pool names its endpoints itself; one URL from Settings would replace them.
        tracing::warn!(
            "the heavy tier is a pool in jemma.toml; the heavy URL from Settings is not used"
        );
    } else if !settings.heavy_url.is_empty() {
        let enabled = cfg
            .tiers
            .get(&Tier::Heavy)
            .map(|t| t.enabled)
            .unwrap_or(false);
        cfg.tiers.insert(
            Tier::Heavy,
            TierConfig {
                kind: TierKind::Openai,
                url: Some(settings.heavy_url.clone()),
                api_key: Some(format!("keyring:{KEYCHAIN_SERVICE}/heavy_api_key")),
                model: "gemma-4-26b-a4b".into(),
                enabled,
                first_token_timeout_secs: 600.0,
                ..Default::default()
            },
        );
    }
    cfg.apply_env(|k| std::env::var(k).ok())?;
    // Peers joined from the tray serve in their tier's pool again; one whose tier is gone is skipped.
    let key_stored = !settings.peers.is_empty()
        && jemma_platform::secrets::Secrets::new(KEYCHAIN_SERVICE).is_set(PEER_KEY_ACCOUNT);
    for p in &settings.peers {
        let Ok(tier) = p.tier.parse::<Tier>() else {
            continue;
        };
        let e = peer_endpoint(p, &cfg, key_stored);
        match cfg.tiers.get_mut(&tier) {
            Some(t) if !t.endpoints.iter().any(|x| x.label() == p.node) => t.join(e),
            _ => {
                tracing::warn!(tier = %p.tier, node = %p.node, "a joined peer's tier is not served here; skipped")
            }
        }
    }
    cfg.check()?;
    Ok(cfg)
}

/// The port in `WEBKIT_INSPECTOR_SERVER` (`host:port`), which WebKitWebDriver sets when it launches the app
/// for automation: WebKit binds its remote inspector there when the first webview is created.
fn inspector_port(var: Option<&str>) -> Option<u16> {
    var?.rsplit_once(':')?.1.parse().ok().filter(|p| *p != 0)
}

/// Binds the gateway with `bind`. When the port asked for is 0 (ephemeral) and the kernel hands out `avoid`
/// (the inspector's port), the listener is kept while another is drawn, then dropped.
///
/// Why: WebKitWebDriver picks the inspector port by binding port 0 and closing the socket, then launches the
/// app with that port. The gateway binds before the first webview, so its own port-0 bind can draw the same
/// just-freed port (about 1 in 7,000 on Linux). WebKit then fails to start the inspector ("Address already in
/// use"), the driver connects to the gateway instead and waits forever for a handshake: the app E2E hang of
/// issue 12. An explicitly configured port is kept as it is.
async fn bind_gateway<F, Fut>(
    mut bind: F,
    requested: u16,
    avoid: Option<u16>,
) -> std::io::Result<tokio::net::TcpListener>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<tokio::net::TcpListener>>,
{
    let mut held = Vec::new();
    loop {
        let l = bind().await?;
        let port = l.local_addr()?.port();
        if requested != 0 || Some(port) != avoid || held.len() >= 8 {
            return Ok(l);
        }
        tracing::info!(
            port,
            "the gateway drew the WebKit inspector's port; drawing another"
        );
        held.push(l);
    }
}

impl Core {
    /// Loads settings, builds the tiers and starts the gateway.
    pub async fn start(config_dir: PathBuf) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&config_dir).ok();
        let settings_path = config_dir.join("settings.json");
        let settings = load_settings(&settings_path);
        let cfg = effective_config(&config_dir, &settings)?;
        let router = if cfg.tiers.is_empty() {
            // No models yet: the gateway still runs (and says so) so the UI can guide the user.
            Arc::new(TierRouter::new(cfg.classifier.clone(), vec![]))
        } else {
            jemma_node::setup::build_router(&cfg, &|r| jemma_platform::secrets::resolve(r))?
        };
        let membership = Arc::new(Membership::new(
            cfg.clone(),
            Arc::new(|r: &str| jemma_platform::secrets::resolve(r)),
        ));
        let state = jemma_gateway::AppState::new(
            router.clone(),
            cfg.limits.clone(),
            cfg.server.max_body_bytes,
            Duration::from_secs_f64(cfg.server.sse_keep_alive_secs),
        )
        .with_cors_origins(cfg.server.cors_origins.clone())
        .with_access(jemma_gateway::auth::AccessPolicy::from_config(&cfg)?)
        .with_membership(membership.clone());
        let keys = state.access.keys.clone();
        let _ = &membership;
        let host = cfg.server.host.clone();
        let listener = bind_gateway(
            || tokio::net::TcpListener::bind((host.as_str(), cfg.server.port)),
            cfg.server.port,
            inspector_port(std::env::var("WEBKIT_INSPECTOR_SERVER").ok().as_deref()),
        )
        .await?;
        let addr = listener.local_addr()?;
        let (tx, mut rx) = watch::channel(false);
        let served = tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.wait_for(|v| *v).await;
            };
            if let Err(e) =
                jemma_gateway::serve(listener, jemma_gateway::router(state), shutdown).await
            {
                tracing::error!(error = %e, "gateway stopped");
            }
        });
        tracing::info!(%addr, tiers = ?cfg.tiers.keys().collect::<Vec<_>>(), "gateway listening");
        Ok(Arc::new(Self {
            router,
            keys,
            url: format!("http://{addr}"),
            port: addr.port(),
            shutdown: tx,
            served: Mutex::new(Some(served)),
            settings_path,
            settings: Mutex::new(settings),
            membership,
            cfg,
        }))
    }

    /// Makes sure tailnet callers can authenticate: when no API key exists yet, creates one and keeps the plain
    /// key in the OS keychain (`gateway_api_key`) so the user can copy it to their devices; returns whether a
    /// key was created.
    pub fn ensure_remote_key(&self) -> anyhow::Result<bool> {
        let mut store = self
            .keys
            .lock()
            .map_err(|_| anyhow::anyhow!("key store poisoned"))?;
        if !store.keys.is_empty() {
            return Ok(false);
        }
        let (_, key) = store.create("jemma-app")?;
        jemma_platform::secrets::Secrets::new(KEYCHAIN_SERVICE).set("gateway_api_key", &key)?;
        Ok(true)
    }

    /// Saves new settings from the Settings window (applied at the next start: models and URLs change
    /// which engines run). The joined peers are the tray's, not the window's: they are kept.
    pub fn save_settings(&self, s: Settings) -> anyhow::Result<()> {
        self.update_settings(|cur| {
            let peers = std::mem::take(&mut cur.peers);
            *cur = Settings { peers, ..s };
        })
    }

    /// The Jemma nodes on the tailnet (its online machines that answer the `/health` handshake on
    /// `[peers] port`). Errors: no Tailscale CLI, or not connected.
    pub async fn find_peers(&self) -> anyhow::Result<Vec<PeerNode>> {
        let port = self.cfg.peers.port;
        let status = jemma_platform::tailscale::Tailscale::detect()?
            .status()
            .await?;
        anyhow::ensure!(
            status.is_running(),
            "Tailscale is not connected ({})",
            status.backend_state
        );
        let candidates: Vec<Candidate> = status
            .online_peer_urls(port)
            .into_iter()
            .map(|(name, url)| Candidate { name, url })
            .collect();
        let timeout = Duration::from_secs_f64(self.cfg.peers.timeout_secs.max(0.1));
        Ok(jemma_router::discovery::identify(&candidates, timeout).await)
    }

    /// Whether `node` serves in this node's `tier` pool now.
    pub fn is_joined(&self, tier: Tier, node: &str) -> bool {
        self.router.endpoints(tier).iter().any(|e| e == node)
    }

    /// `peer`'s tier joins this node's tier of the same name now (the tier becomes a pool if it is not
    /// one) and at every later start. Call within the Tokio runtime.
    pub fn join_peer(&self, peer: JoinedPeer) -> anyhow::Result<()> {
        let tier: Tier = peer
            .tier
            .parse()
            .map_err(|_| anyhow::anyhow!("unknown tier {}", peer.tier))?;
        let key_stored =
            jemma_platform::secrets::Secrets::new(KEYCHAIN_SERVICE).is_set(PEER_KEY_ACCOUNT);
        let e = peer_endpoint(&peer, &self.cfg, key_stored);
        self.membership.join(&self.router, tier, &e)?;
        self.update_settings(|s| {
            s.peers
                .retain(|p| !(p.tier == peer.tier && p.node == peer.node));
            s.peers.push(peer.clone());
        })
    }

    /// `node` leaves this node's `tier` pool now and is not joined again at the next start.
    pub fn leave_peer(&self, tier: Tier, node: &str) -> anyhow::Result<()> {
        self.router.leave(tier, node)?;
        self.update_settings(|s| {
            s.peers
                .retain(|p| !(p.tier == tier.as_str() && p.node == node))
        })
    }

    fn update_settings(&self, f: impl FnOnce(&mut Settings)) -> anyhow::Result<()> {
        let mut cur = self
            .settings
            .lock()
            .map_err(|_| anyhow::anyhow!("settings poisoned"))?;
        f(&mut cur);
        std::fs::write(&self.settings_path, serde_json::to_string_pretty(&*cur)?)?;
        Ok(())
    }

    /// Stops accepting requests and waits (bounded) for in-flight ones and open streams to finish.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let handle = self.served.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle
            && tokio::time::timeout(grace, h).await.is_err()
        {
            tracing::warn!("in-flight requests still running after {grace:?}; quitting anyway");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Settings window's choices go on top of jemma.toml without dropping its settings or making it
    /// refused: a chosen model keeps the tier's context, and the keep-alive reaches the tiers this node's
    /// engine serves but not a pool of other nodes (which refuses it).
    #[test]
    fn settings_apply_on_top_of_the_config_file() {
        let dir = std::env::temp_dir().join(format!("jemma-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("jemma.toml"),
            "[tiers.fast]\nmodel = \"/m/a\"\ncontext_length = 1024\n\
             [tiers.heavy]\n[[tiers.heavy.endpoints]]\nkind = \"openai\"\nurl = \"http://x\"\n",
        )
        .unwrap();
        let settings = Settings {
            keep_alive: 60,
            models: Models {
                fast: "/m/b".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let cfg = effective_config(&dir, &settings).unwrap();
        let fast = &cfg.tiers[&Tier::Fast];
        assert_eq!(
            (
                fast.model.as_str(),
                fast.context_length,
                fast.keep_alive_secs
            ),
            ("/m/b", Some(1024), 60)
        );
        assert_eq!(
            cfg.tiers[&Tier::Heavy].keep_alive_secs,
            TierConfig::default().keep_alive_secs
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn inspector_port_parses_host_and_port() {
        assert_eq!(inspector_port(Some("127.0.0.1:41234")), Some(41234));
        assert_eq!(inspector_port(Some("[::1]:5000")), Some(5000));
        assert_eq!(inspector_port(Some("127.0.0.1")), None);
        assert_eq!(inspector_port(Some("127.0.0.1:0")), None);
        assert_eq!(inspector_port(None), None);
    }

    #[tokio::test]
    async fn an_ephemeral_gateway_port_never_takes_the_inspectors() {
        // The first draw is the collision: a listener on the port the inspector was given.
        let colliding = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let avoid = colliding.local_addr().unwrap().port();
        let mut first = Some(colliding);
        let l = bind_gateway(
            || {
                let pre = first.take();
                async move {
                    match pre {
                        Some(l) => Ok(l),
                        None => tokio::net::TcpListener::bind("127.0.0.1:0").await,
                    }
                }
            },
            0,
            Some(avoid),
        )
        .await
        .unwrap();
        assert_ne!(l.local_addr().unwrap().port(), avoid);
        // The colliding listener was released: WebKit can bind the inspector there now.
        drop(std::net::TcpListener::bind(("127.0.0.1", avoid)).unwrap());
    }

    #[tokio::test]
    async fn an_explicit_port_is_kept() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let mut pre = Some(l);
        let got = bind_gateway(
            || {
                let l = pre.take().unwrap();
                async move { Ok(l) }
            },
            port,
            Some(port),
        )
        .await
        .unwrap();
        assert_eq!(got.local_addr().unwrap().port(), port);
    }
}
