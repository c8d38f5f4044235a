//! Jemma's models: the catalog of per-tier checkpoints (`models.toml`), downloads from the Hugging Face Hub
//! into the standard cache (shared with mlx-lm and the HF CLI) with resume and verification, and the
//! hardware check that says which tiers a machine can hold. No HTTP server or UI code lives here.
#![deny(missing_docs)]

pub mod catalog;
pub mod hardware;
pub mod hub;
pub mod url;

pub use catalog::{Catalog, Entry, Format};
pub use hub::{Hub, HubConfig, PullPlan};

/// Progress of a pull (from the Hub or a URL), over all files.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PullProgress {
    /// File being transferred.
    pub file: String,
    /// Bytes done (cached files count as done).
    pub done_bytes: u64,
    /// Bytes in all.
    pub total_bytes: u64,
}

impl PullProgress {
    /// Share done, 0 to 1 (1 when there is nothing to transfer).
    pub fn fraction(&self) -> f32 {
        if self.total_bytes == 0 {
            1.0
        } else {
            (self.done_bytes as f64 / self.total_bytes as f64).min(1.0) as f32
        }
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    /// The catalog file is invalid.
    #[error("catalog: {0}")]
    Catalog(String),
    /// A model reference names nothing known.
    #[error(
        "unknown model {0:?}: not a directory, a catalog name (see `jemma pull --list`) or a Hugging Face repo id (owner/name)"
    )]
    UnknownModel(String),
    /// The Hub refused access (gated or private repo).
    #[error(
        "{repo}: access denied (HTTP {status}). If the repo is gated, accept its license at {url} and store a Hugging Face token (the app's Settings, `HF_TOKEN`, or `huggingface-cli login`)"
    )]
    Denied {
        /// Repo id.
        repo: String,
        /// HTTP status.
        status: u16,
        /// Where to accept the license.
        url: String,
    },
    /// The repo, revision or file does not exist.
    #[error("{0}: not found on the Hub")]
    NotFound(String),
    /// A transfer or Hub API call failed.
    #[error("download: {0}")]
    Download(String),
    /// A downloaded file does not match the Hub's size or hash (it was removed; pull again).
    #[error("verification failed for {file}: {why}")]
    Verify {
        /// File name in the repo.
        file: String,
        /// What differed.
        why: String,
    },
    /// Local file system.
    #[error("{path}: {source}")]
    Io {
        /// Path involved.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Shorthand for this crate's results.
pub type Result<T, E = ModelsError> = std::result::Result<T, E>;
