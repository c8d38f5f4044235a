//! Gemma 4 through llama.cpp, via the `llama-cpp-2` crate: GGUF models (mmap'd) on the CPU, on CUDA (the
//! Cloud Run heavy tier, feature `cuda`) or on Metal (feature `metal`), with every layer offloaded when a
//! GPU backend is built in.
//!
//! The engine runs on the serving core's host (jemma-serve): one model thread owns the llama.cpp model and
//! context, requests arrive through a bounded queue, up to `parallel` of them are decoded together (one
//! llama.cpp sequence each, in one `llama_batch`), events leave through a bounded channel, and dropping the
//! receiver cancels the request at the next step. Each sequence's slot keeps its KV for prefix reuse.
//! Prompts are rendered with the model's own chat template (the GGUF's `tokenizer.chat_template`, through
//! jemma-chat's Jinja renderer, so both engines format conversations byte-identically) and outputs are
//! parsed with the same Gemma 4 parser (thinking channel, tool calls). This crate knows nothing of HTTP or
//! UI.
#![deny(missing_docs)]

// One concern per module; they share this file's imports and each other's crate-private items through
// `use super::*`, as one namespace split by concern rather than layers with their own APIs.
mod config;
mod engine;
pub mod gguf;
mod kv;
mod load;
mod media;
mod mtp;
mod parity;
mod request;
mod runner;
mod sampler;
mod speculative;
mod utf8;

pub use config::*;
pub use engine::*;
use kv::*;
pub use load::*;
pub use parity::*;
pub use request::*;
use runner::*;
use sampler::*;
use utf8::*;

pub use jemma_serve::speculative::SpeculativeInfo;
pub use media::{DEFAULT_IMAGE_SOFT_TOKENS, DEFAULT_VIDEO_SOFT_TOKENS, towers};
pub use mtp::is_assistant;
pub use speculative::LlamaSpeculative;

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use jemma_chat::answer::OutputProcessor;
use jemma_chat::event::EngineFailure;
use jemma_chat::guard::ControlTokens;
use jemma_chat::logprobs::{MAX_TOP_LOGPROBS, TokenLogprob, log_softmax_top};
use jemma_chat::template::ChatTemplate;
use jemma_chat::template::NO_CHAT_TEMPLATE;
use jemma_media::Modality;
use jemma_serve::host::{Host, HostConfig, LoadError, ModelRunner, Progress, SeqOutput, Tally};
use jemma_serve::prefix::{
    CacheSlot, EntryKind, PrefixPool, PrefixSlot, choose_slot, common_prefix_len, compaction_move,
    waits_for_shared_read,
};
use jemma_serve::speculative::{Controller, SpeculativeStats};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::{LlamaStateSeqFlags, SeqState};
use serde::Serialize;
use tokio::sync::mpsc;

/// Everything this engine can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlamaError {
    /// The GGUF could not be loaded (missing file, unknown architecture, unsupported layout).
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// llama.cpp failed while running (context creation, decode).
    #[error("llama.cpp: {0}")]
    Runtime(String),
    /// The request cannot be served as given.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl From<LlamaError> for jemma_chat::event::EngineFailure {
    /// A request problem is the client's; everything else is the engine's fault.
    fn from(e: LlamaError) -> Self {
        match e {
            LlamaError::InvalidRequest(m) => Self::InvalidRequest(m),
            other => Self::Fault(other.to_string()),
        }
    }
}

/// Shorthand for this crate's results.
pub type Result<T, E = LlamaError> = std::result::Result<T, E>;

/// The process-wide llama.cpp backend (initialising it twice is an error in llama.cpp).
fn backend() -> Result<&'static LlamaBackend> {
    static BACKEND: OnceLock<std::result::Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let b = LlamaBackend::init().map_err(|e| e.to_string())?;
            // llama.cpp logs every tensor at load, and libmtmd every image it encodes, to stderr and
            // stdout; keep the process's logs to tracing's (JEMMA_LLAMA_LOG: all of theirs too).
            llama_cpp_2::send_logs_to_tracing(
                llama_cpp_2::LogOptions::default()
                    .with_logs_enabled(std::env::var_os("JEMMA_LLAMA_LOG").is_some()),
            );
            Ok(b)
        })
        .as_ref()
        .map_err(|e| LlamaError::Runtime(e.clone()))
}
