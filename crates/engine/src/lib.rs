//! Jemma's in-process Gemma 4 engine on MLX (`mlx-rs`).
//!
//! The same code runs on Metal on an Apple-Silicon Mac and on MLX's CPU backend elsewhere (used here for
//! correctness tests). This crate knows nothing of HTTP or UI: the gateway and the app drive it through the
//! types it exports.
#![deny(missing_docs)]

pub mod cache;
pub mod device;
pub mod error;
pub mod footprint;
pub mod generate;
pub mod models;
pub mod nn;
pub mod runtime;
pub mod sample;
pub mod speculative;
pub mod tokenizer;

pub use error::{EngineError, Result};
pub use jemma_chat::{template, tools};
/// The process-wide memory budget (in the serving core, shared with the llama.cpp engine).
pub use jemma_serve::memory;
