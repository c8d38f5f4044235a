//! Routing for Jemma's gateway: OpenAI request types and validation, the [`backend::Backend`] trait with
//! the OpenAI-compatible upstream backend, the classifier, per-tier circuit breakers, pools and the
//! fallback path.
//!
//! Nothing here knows HTTP servers or links an engine: the gateway crate maps [`RouterError`] to responses
//! in one place, and `jemma-node` puts the in-process engines behind [`backend::Backend`] and builds a
//! router from `jemma.toml`. This crate builds and tests without MLX or llama.cpp.
#![deny(missing_docs)]

pub mod anthropic;
pub mod api;
pub mod backend;
pub mod breaker;
pub mod classify;
pub mod config;
pub mod dialect;
pub mod discovery;
pub mod media;
pub mod membership;
pub mod pool;
pub mod responses;
pub mod route;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tier;

/// Everything routing can refuse or fail with.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum RouterError {
    /// Malformed or out-of-range request (HTTP 400).
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
        /// The offending field.
        param: Option<String>,
    },
    /// Request or part of it too large (HTTP 413).
    #[error("{message}")]
    TooLarge {
        /// What is too large, and the limit.
        message: String,
        /// The offending field (the media part), when one is.
        param: Option<String>,
    },
    /// Media in a format this build cannot read, such as HEIC off macOS (HTTP 415).
    #[error("{message}")]
    UnsupportedMedia {
        /// What cannot be read, and what can.
        message: String,
        /// The offending field (the media part).
        param: Option<String>,
    },
    /// `model` names nothing this gateway serves (HTTP 404).
    #[error("model {0:?} does not exist; use auto, fast, primary, heavy or a served model id")]
    UnknownModel(String),
    /// Every eligible tier is at its queue limit (HTTP 429).
    #[error("all eligible tiers are busy; retry after {retry_after_secs} s")]
    Busy {
        /// Suggested wait.
        retry_after_secs: u64,
    },
    /// The caller used up its request budget (HTTP 429).
    #[error("rate limit exceeded; retry after {retry_after_secs} s")]
    RateLimited {
        /// When the next request is allowed.
        retry_after_secs: u64,
    },
    /// No tier in the chain could answer (HTTP 503).
    #[error("no tier could answer ({})", fallback.join("; "))]
    AllTiersDown {
        /// What was tried.
        fallback: Vec<String>,
        /// When a tier may serve again, where one said (the shortest remaining breaker cooldown, or an
        /// upstream's own `Retry-After`), rounded up to whole seconds: the HTTP `Retry-After`.
        retry_after_secs: Option<u64>,
    },
    /// The upstream did not answer in time (HTTP 504).
    #[error("upstream timed out: {0}")]
    Timeout(String),
    /// Bad configuration (startup error).
    #[error("configuration: {0}")]
    Config(String),
}

impl RouterError {
    /// A 400 naming the offending field: `param` in OpenAI's dotted form (`messages[0].content[1].data`).
    pub fn invalid(message: impl Into<String>, param: &str) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }
}

impl RouterError {
    /// A 413 for `param` (None: the request as a whole).
    pub fn too_large(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::TooLarge {
            message: message.into(),
            param: param.map(str::to_string),
        }
    }

    /// A 415 for the media part `param`.
    pub fn unsupported_media(message: impl Into<String>, param: &str) -> Self {
        Self::UnsupportedMedia {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }
}
