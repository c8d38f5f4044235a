//! The engine's one error type.

use std::path::PathBuf;

/// Everything that can go wrong inside the engine. Callers map it to their own surface (HTTP status, CLI
/// exit code) in exactly one place.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// An MLX operation failed (shape mismatch, out of memory, unsupported op on this device, …).
    #[error("MLX: {0}")]
    Mlx(#[from] mlx_rs::error::Exception),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The model directory or its configuration is not something this engine can run.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// The model's files are inconsistent (missing or unexpected tensors, bad shapes, bad JSON).
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// The model does not fit the memory this process may use (nothing was loaded).
    #[error("insufficient memory: {0}")]
    InsufficientMemory(String),
    /// The caller's request cannot be served as given (empty prompt, context overflow, bad parameter).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Constrained decoding failed part-way (the vocabulary could not be read for llguidance, or its
    /// matcher refused a token it had allowed): an engine fault, not the request's.
    #[error("constrained decoding: {0}")]
    Constraint(String),
    /// An invariant of the engine's own bookkeeping did not hold (a bug, never the request's fault): the
    /// request fails instead of the model thread panicking.
    #[error("internal: {0}")]
    Internal(String),
    /// Speculative decoding went wrong part-way (a verification of the wrong shape, a cache that could not
    /// be rolled back): an engine fault.
    #[error("speculative decoding: {0}")]
    Speculative(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl From<EngineError> for jemma_chat::event::EngineFailure {
    /// A request problem is the client's; everything else is the engine's fault.
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidRequest(m) => Self::InvalidRequest(m),
            other => Self::Fault(other.to_string()),
        }
    }
}
