//! Endpoints built from configuration outside the engines: an OpenAI-compatible upstream or another Jemma
//! node as a tier's backend or a pool member, and [`Membership`], which adds such endpoints to tiers' pools
//! while the gateway serves (the tray's peers, `POST /admin/tiers/{tier}/endpoints`). Free of the engines,
//! so the gateway and the app use it whatever the build links.

use std::sync::Arc;

use crate::RouterError;
use crate::backend::{Backend, OpenAiBackend, OpenAiConfig, Probe};
use crate::classify::Tier;
use crate::config::{Config, EndpointConfig, EndpointKind, TierConfig, TierKind, resolve_secret};
use crate::pool::EndpointSpec;
use crate::route::TierRouter;

/// An OpenAI-compatible upstream of tier `tier` (a tier's one backend or a pool member) as `cfg` says,
/// its `api_key` a literal, `env:VAR` or `keyring:` reference, resolved here through `keyring`.
///
/// Errors: an unresolvable key or an invalid client configuration ([`RouterError::Config`]).
pub fn upstream_backend(
    tier: Tier,
    mut cfg: OpenAiConfig,
    keyring: &dyn Fn(&str) -> Option<String>,
) -> Result<Arc<dyn Backend>, RouterError> {
    if let Some(k) = &cfg.api_key {
        cfg.api_key = Some(
            resolve_secret(k, keyring)
                .map_err(|e| RouterError::Config(format!("tier {tier}: api_key: {e}")))?,
        );
    }
    Ok(Arc::new(OpenAiBackend::new(cfg).map_err(|e| {
        RouterError::Config(format!("tier {tier}: {e}"))
    })?))
}

/// The backend of a remote member (`jemma` or `openai`) of tier `tier`'s pool, configured as `c`: a
/// Jemma node is asked for its tier `model` (default: this tier's name) and probed on `/health`; an
/// OpenAI-compatible server is asked for `model` (default: the tier's) and probed on `/v1/models`.
///
/// Errors: a local endpoint (it is built with the engines), a key that does not resolve, a bad URL.
pub fn remote_endpoint(
    tier: Tier,
    c: &TierConfig,
    e: &EndpointConfig,
    default_max_tokens: u32,
    keyring: &dyn Fn(&str) -> Option<String>,
) -> Result<Arc<dyn Backend>, RouterError> {
    let url = e.url.as_deref().unwrap_or_default();
    let or_tier = |m: &str| {
        if m.is_empty() {
            tier.to_string()
        } else {
            m.to_string()
        }
    };
    match e.kind() {
        EndpointKind::Local => Err(RouterError::Config(format!(
            "tier {tier}: a local endpoint is not remote"
        ))),
        EndpointKind::Jemma => {
            let peer_tier = e.model.clone().unwrap_or_else(|| tier.to_string());
            let probe = Probe::Jemma {
                tier: peer_tier.clone(),
            };
            upstream_backend(
                tier,
                OpenAiConfig {
                    api_key: e.api_key.clone(),
                    ..OpenAiConfig::new(url, peer_tier, probe, default_max_tokens)
                },
                keyring,
            )
        }
        EndpointKind::Openai => {
            let model = e.model.clone().unwrap_or_else(|| or_tier(&c.model));
            upstream_backend(
                tier,
                OpenAiConfig {
                    api_key: e.api_key.clone(),
                    dialect: e.dialect,
                    ..OpenAiConfig::new(url, model, Probe::Models, default_max_tokens)
                },
                keyring,
            )
        }
    }
}

/// Endpoints joining and leaving tiers' pools while the gateway serves (the tray's peers, `POST
/// /admin/tiers/{tier}/endpoints`): built from the same configuration as the rest of the router, so a
/// joined endpoint gets the tier's defaults and its key resolves as a configured one would.
pub struct Membership {
    cfg: Config,
    keyring: Keyring,
}

/// Resolves a `keyring:SERVICE/ACCOUNT` reference (the OS keychain in `jemma serve` and the app).
pub type Keyring = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

impl Membership {
    /// Membership for a router built from `cfg`, resolving `keyring:` keys through `keyring`.
    pub fn new(cfg: Config, keyring: Keyring) -> Self {
        Self { cfg, keyring }
    }

    /// Adds the remote endpoint `e` to `tier`'s pool (the tier becomes one if it is a single backend);
    /// returns its name (`e.label()`).
    ///
    /// Errors: the tier is not configured; `e` is local, lacks a url, has a weight that is not positive
    /// or `max_concurrency` 0; a member has its name; its key does not resolve. Call within a Tokio
    /// runtime.
    pub fn join(
        &self,
        router: &TierRouter,
        tier: Tier,
        e: &EndpointConfig,
    ) -> Result<String, RouterError> {
        let bad = |message: String, param: &str| RouterError::InvalidRequest {
            message,
            param: Some(param.into()),
        };
        let c = self
            .cfg
            .tiers
            .get(&tier)
            .ok_or_else(|| RouterError::UnknownModel(tier.to_string()))?;
        if e.kind() == EndpointKind::Local {
            return Err(bad(
                "an endpoint that joins at run time is another node: kind jemma or openai, with a url"
                    .into(),
                "url",
            ));
        }
        let url = e.url.as_deref().unwrap_or("");
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(bad("url must be an http(s) URL".into(), "url"));
        }
        if e.kind() == EndpointKind::Jemma && e.dialect != crate::dialect::Dialect::Auto {
            return Err(bad(
                "a Jemma node speaks Jemma's own dialect; remove dialect (or give kind openai)"
                    .into(),
                "dialect",
            ));
        }
        if !(e.weight > 0.0 && e.weight.is_finite()) {
            return Err(bad("weight must be positive".into(), "weight"));
        }
        if e.max_concurrency == Some(0) {
            return Err(bad(
                "max_concurrency must be >= 1".into(),
                "max_concurrency",
            ));
        }
        let max_tokens = c
            .default_max_tokens
            .unwrap_or(self.cfg.limits.default_max_tokens)
            .min(c.max_tokens_ceiling.unwrap_or(u32::MAX));
        let backend = remote_endpoint(tier, c, e, max_tokens, &*self.keyring)
            .map_err(|err| bad(err.to_string(), "url"))?;
        let name = e.label();
        // A tier that is one backend becomes a pool of it and the newcomer: its engine is probed (a
        // cheap local check); an upstream is not, as before (a Cloud Run service must not be kept up).
        let first = if c.endpoints.is_empty() {
            match c.kind {
                TierKind::Local => ("local".to_string(), true),
                TierKind::Openai => (
                    EndpointConfig {
                        url: c.url.clone(),
                        ..EndpointConfig::default()
                    }
                    .label(),
                    false,
                ),
            }
        } else {
            (String::new(), true)
        };
        router.join(
            tier,
            (&first.0, first.1),
            EndpointSpec {
                name: name.clone(),
                backend,
                weight: e.weight,
                max_concurrency: e.concurrency(),
                probe: e.probe,
            },
        )?;
        Ok(name)
    }
}
