//! Who may call the gateway: API keys (stored hashed, compared in constant time) for anyone who is not a
//! loopback caller, and per-caller rate limits (governor) for text and media requests.
//!
//! A request proxied by `tailscale serve` arrives from 127.0.0.1 but carries Tailscale's identity headers (or
//! `X-Forwarded-For`); it is treated as remote, so exposing the gateway on the tailnet never bypasses keys.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use jemma_router::api::{ErrorObject, ErrorResponse};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;

use crate::ids::now_secs;

/// One stored key: never the key itself, only its SHA-256 (keys are 256 random bits, so a plain hash is as
/// strong as a slow KDF would be, and verification stays cheap per request).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredKey {
    /// Short public id (shown in lists and logs).
    pub id: String,
    /// Owner's label.
    pub name: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
    /// Creation time (seconds since the epoch).
    pub created: u64,
}

/// The key file (JSON, 0600).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct KeyStore {
    /// Keys.
    pub keys: Vec<StoredKey>,
    /// Keys given by the configuration (`[auth] keys`, e.g. `env:HEAVY_API_KEY` on Cloud Run): accepted,
    /// never written to the key file.
    #[serde(skip)]
    pub configured: Vec<StoredKey>,
    #[serde(skip)]
    path: Option<PathBuf>,
}

fn sha256_hex(s: &str) -> String {
    let d = Sha256::digest(s.as_bytes());
    hex::encode(d)
}

impl KeyStore {
    /// The default location: `$JEMMA_KEYS_FILE`, else `<config dir>/jemma/keys.json`.
    pub fn default_path() -> PathBuf {
        if let Some(p) = std::env::var_os("JEMMA_KEYS_FILE") {
            return PathBuf::from(p);
        }
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .unwrap_or_else(|| PathBuf::from("."));
        base.join("jemma").join("keys.json")
    }

    /// Loads a key file (a missing file is an empty store).
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let mut s: KeyStore = match std::fs::read_to_string(path) {
            Ok(t) => serde_json::from_str(&t).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => KeyStore::default(),
            Err(e) => return Err(e),
        };
        s.path = Some(path.to_path_buf());
        Ok(s)
    }

    fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_string_pretty(self).map_err(std::io::Error::other)?,
        )?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::rename(tmp, path)
    }

    /// Creates a key; returns (id, the plain key — shown once, never stored).
    pub fn create(&mut self, name: &str) -> std::io::Result<(String, String)> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| std::io::Error::other(e.to_string()))?;
        let secret = hex::encode(raw);
        let key = format!("jm-{secret}");
        let id = key[3..11].to_string();
        let created = now_secs();
        self.keys.push(StoredKey {
            id: id.clone(),
            name: name.to_string(),
            sha256: sha256_hex(&key),
            created,
        });
        self.save()?;
        Ok((id, key))
    }

    /// Removes a key by id or name; returns whether one was removed.
    pub fn revoke(&mut self, id_or_name: &str) -> std::io::Result<bool> {
        let before = self.keys.len();
        self.keys
            .retain(|k| k.id != id_or_name && k.name != id_or_name);
        let removed = self.keys.len() != before;
        if removed {
            self.save()?;
        }
        Ok(removed)
    }

    /// The id of the key `presented` matches, comparing every stored hash in constant time.
    pub fn verify(&self, presented: &str) -> Option<String> {
        let h = sha256_hex(presented);
        let mut found = None;
        for k in self.keys.iter().chain(&self.configured) {
            // No early exit: timing does not reveal which (or whether a) key matched.
            if bool::from(k.sha256.as_bytes().ct_eq(h.as_bytes())) {
                found = Some(k.id.clone());
            }
        }
        found
    }
}

/// `[auth]` and `[rate_limits]` as the HTTP layer uses them.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    /// Loopback callers need no key.
    pub exempt_loopback: bool,
    /// Valid keys.
    pub keys: Arc<Mutex<KeyStore>>,
    /// Text requests per minute per caller (0 = unlimited).
    pub text_per_minute: u32,
    /// Media requests (with images) per minute per caller (0 = unlimited).
    pub media_per_minute: u32,
    /// Apply rate limits to loopback callers too.
    pub limit_loopback: bool,
    /// Text requests per caller per UTC day (0 = unlimited).
    pub daily_text: u32,
    /// Media requests per caller per UTC day (0 = unlimited).
    pub daily_media: u32,
    /// Where daily counts persist, so a restart does not reset them.
    pub quota_file: Option<PathBuf>,
}

impl AccessPolicy {
    /// From `[auth]` and `[rate_limits]`, loading the key file.
    pub fn from_config(cfg: &jemma_router::config::Config) -> std::io::Result<Self> {
        let path = cfg
            .auth
            .keys_file
            .as_ref()
            .map(PathBuf::from)
            .unwrap_or_else(KeyStore::default_path);
        let mut store = KeyStore::load(&path)?;
        for (i, r) in cfg.auth.keys.iter().enumerate() {
            // A configured key that cannot be resolved is a startup error: serving without the key the
            // operator meant to require would be worse.
            let key = jemma_router::config::resolve_secret(r, &|_| None)
                .map_err(|e| std::io::Error::other(format!("[auth] keys[{i}]: {e}")))?;
            if key.trim().is_empty() {
                return Err(std::io::Error::other(format!("[auth] keys[{i}] is empty")));
            }
            store.configured.push(StoredKey {
                id: format!("config-{i}"),
                name: r.split(':').next().unwrap_or("config").to_string(),
                sha256: sha256_hex(key.trim()),
                created: 0,
            });
        }
        Ok(Self {
            exempt_loopback: cfg.auth.exempt_loopback,
            keys: Arc::new(Mutex::new(store)),
            text_per_minute: cfg.rate_limits.text_per_minute,
            media_per_minute: cfg.rate_limits.media_per_minute,
            limit_loopback: cfg.rate_limits.limit_loopback,
            daily_text: cfg.rate_limits.daily_text,
            daily_media: cfg.rate_limits.daily_media,
            quota_file: Some(
                cfg.rate_limits
                    .quota_file
                    .as_ref()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| KeyStore::default_path().with_file_name("quotas.json")),
            ),
        })
    }

    /// Whether any key exists.
    pub fn has_keys(&self) -> bool {
        self.keys
            .lock()
            .map(|k| !k.keys.is_empty() || !k.configured.is_empty())
            .unwrap_or(false)
    }
}

impl Default for AccessPolicy {
    /// No keys, and `[auth]`'s and `[rate_limits]`' defaults (kept in one place, the config's);
    /// quotas kept in memory only.
    fn default() -> Self {
        let r = jemma_router::config::RateLimitConfig::default();
        Self {
            exempt_loopback: jemma_router::config::AuthConfig::default().exempt_loopback,
            keys: Arc::new(Mutex::new(KeyStore::default())),
            text_per_minute: r.text_per_minute,
            media_per_minute: r.media_per_minute,
            limit_loopback: r.limit_loopback,
            daily_text: r.daily_text,
            daily_media: r.daily_media,
            quota_file: None,
        }
    }
}

/// Who is calling, as decided by [`guard`]; handlers read it from the request extensions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// A local process (exempt when configured).
    Loopback,
    /// A remote caller with a valid key.
    Key(String),
    /// A remote caller allowed without a key (loopback exemption off and no keys required is not possible:
    /// this is only used for remote IPs when keys are not enforced, which the server refuses to start with).
    Ip(IpAddr),
}

/// Per-caller limiters.
pub struct Limiters {
    text: Option<DefaultKeyedRateLimiter<Caller>>,
    media: Option<DefaultKeyedRateLimiter<Caller>>,
    limit_loopback: bool,
    daily: DailyQuota,
}

/// Daily request counts per caller, persisted as JSON (atomic rewrite on each counted request: remote callers
/// are rate-limited to a few per minute, so this is cheap).
struct DailyQuota {
    text: u32,
    media: u32,
    path: Option<PathBuf>,
    state: Mutex<QuotaFile>,
}

#[derive(Default, Serialize, Deserialize)]
struct QuotaFile {
    /// Days since the Unix epoch (UTC) the counts belong to.
    day: u64,
    /// Caller → (text, media) requests today.
    used: std::collections::BTreeMap<String, (u32, u32)>,
}

impl DailyQuota {
    fn new(p: &AccessPolicy) -> Self {
        let state = p
            .quota_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Self {
            text: p.daily_text,
            media: p.daily_media,
            path: p.quota_file.clone(),
            state: Mutex::new(state),
        }
    }

    fn charge(&self, caller: &Caller, media: bool) -> Result<(), Duration> {
        let limit = if media { self.media } else { self.text };
        if limit == 0 {
            return Ok(());
        }
        let who = match caller {
            Caller::Loopback => return Ok(()),
            Caller::Key(id) => format!("key:{id}"),
            Caller::Ip(ip) => format!("ip:{ip}"),
        };
        let now = now_secs();
        let today = now / 86_400;
        let mut st = self.state.lock().map_err(|_| Duration::from_secs(60))?;
        if st.day != today {
            st.day = today;
            st.used.clear();
        }
        let e = st.used.entry(who).or_default();
        let used = if media { &mut e.1 } else { &mut e.0 };
        if *used >= limit {
            return Err(Duration::from_secs((today + 1) * 86_400 - now));
        }
        *used += 1;
        if let Some(path) = &self.path {
            let tmp = path.with_extension("json.tmp");
            let ok = serde_json::to_string(&*st)
                .ok()
                .and_then(|j| std::fs::write(&tmp, j).ok())
                .and_then(|_| std::fs::rename(&tmp, path).ok());
            if ok.is_none() {
                tracing::warn!(path = %path.display(), "cannot persist daily quotas");
            }
        }
        Ok(())
    }
}

impl Limiters {
    /// Limiters for a policy.
    pub fn new(p: &AccessPolicy) -> Self {
        let mk = |n: u32| NonZeroU32::new(n).map(|n| RateLimiter::keyed(Quota::per_minute(n)));
        Self {
            text: mk(p.text_per_minute),
            media: mk(p.media_per_minute),
            limit_loopback: p.limit_loopback,
            daily: DailyQuota::new(p),
        }
    }

    /// Takes one request from the caller's budget; Err(wait) when over.
    pub fn check(&self, caller: &Caller, media: bool) -> Result<(), Duration> {
        if *caller == Caller::Loopback && !self.limit_loopback {
            return Ok(());
        }
        let l = if media { &self.media } else { &self.text };
        if let Some(l) = l {
            l.check_key(caller).map_err(|nu| {
                nu.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ))
            })?;
        }
        self.daily.charge(caller, media)
    }
}

fn is_proxied(h: &HeaderMap) -> bool {
    [
        "tailscale-user-login",
        "tailscale-user-name",
        "x-forwarded-for",
        "forwarded",
    ]
    .iter()
    .any(|k| h.contains_key(*k))
}

/// An `invalid_request_error` in OpenAI's shape with `code`.
fn openai_error(msg: &str, code: &str) -> ErrorResponse {
    ErrorResponse {
        error: ErrorObject {
            message: msg.into(),
            kind: "invalid_request_error".into(),
            param: None,
            code: Some(code.into()),
            fallback: None,
        },
    }
}

fn unauthorized(msg: &str, anthropic: bool) -> Response {
    let body = if anthropic {
        json!({"type": "error", "error": {"type": "authentication_error", "message": msg}})
    } else {
        serde_json::to_value(openai_error(msg, "invalid_api_key")).unwrap_or_default()
    };
    let mut r = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// Middleware: decides the [`Caller`]; remote callers need a valid key (`Authorization: Bearer`, or
/// Anthropic's `x-api-key`). `/health`, `/openapi.json` and the chat page (`/`, whose API calls carry a
/// key) stay open, `/admin/*` is for this machine only,
/// everything else is guarded.
pub async fn guard(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    // No peer address means an in-process call (tests, the app's own router): treat as loopback.
    let loopback = peer.is_none_or(|ip| ip.is_loopback()) && !is_proxied(req.headers());
    // The key as Bearer (OpenAI's SDKs) or `x-api-key` (Anthropic's); a client may send both, one of them
    // meant for somewhere else, so either may be the one that verifies.
    let keys: Vec<String> = [
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            }),
        req.headers().get("x-api-key").and_then(|v| v.to_str().ok()),
    ]
    .into_iter()
    .flatten()
    .map(str::trim)
    .filter(|k| !k.is_empty())
    .map(String::from)
    .collect();
    let anthropic = req.uri().path().starts_with("/v1/messages");
    if req.uri().path().starts_with("/admin/") && !loopback {
        // Tier toggles and model changes belong to the machine's owner (the app, the local CLI), not to
        // API-key holders on the tailnet.
        let body = openai_error(
            "admin endpoints are only available from this machine",
            "forbidden",
        );
        return (StatusCode::FORBIDDEN, axum::Json(body)).into_response();
    }
    if req.uri().path().starts_with("/admin/") {
        // A web page open in this machine's browser is a loopback caller too: admin calls must come from a
        // program (no Origin) or an allowed origin, and a POST must be JSON, which a page cannot send
        // across origins without a CORS preflight (refused for other origins).
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok());
        let foreign = origin.is_some_and(|o| !st.cors_origins.iter().any(|c| c == o));
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.trim_start().starts_with("application/json"));
        if foreign || (req.method() == axum::http::Method::POST && !json) {
            let body = openai_error(
                "admin calls take a JSON body (Content-Type: application/json) and are not made by web pages",
                "forbidden",
            );
            return (StatusCode::FORBIDDEN, axum::Json(body)).into_response();
        }
    }
    let caller = if loopback && st.access.exempt_loopback {
        Caller::Loopback
    } else if matches!(req.uri().path(), "/health" | "/openapi.json")
        || crate::web::is_page(req.uri().path())
    {
        Caller::Ip(peer.unwrap_or(IpAddr::from([127, 0, 0, 1])))
    } else {
        if keys.is_empty() {
            return unauthorized(
                "an API key is required (Authorization: Bearer …, or x-api-key); create one with \
                 `jemma keys create`",
                anthropic,
            );
        }
        let id = st
            .access
            .keys
            .lock()
            .ok()
            .and_then(|k| keys.iter().find_map(|key| k.verify(key)));
        match id {
            Some(id) => Caller::Key(id),
            None => {
                tracing::warn!(peer = ?peer, "rejected request with an invalid API key");
                return unauthorized("invalid API key", anthropic);
            }
        }
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}
