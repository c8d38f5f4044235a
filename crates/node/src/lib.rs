//! One Jemma node, assembled: the composition root that turns a [`jemma_router::config::Config`] into a
//! running [`jemma_router::route::TierRouter`] ([`setup::build_router`]), and the adapter that puts the
//! in-process engines behind the router's [`jemma_router::backend::Backend`] trait ([`in_process`]).
//!
//! The router is policy only (classifier, breakers, pools, fallback) and links no engine; this crate is
//! where MLX (always) and llama.cpp (feature `llama`) come in. `jemma serve`, the app and the tests build
//! their router here.
#![deny(missing_docs)]

pub mod in_process;
pub mod setup;

/// The llama.cpp engine (feature `llama`), for callers that drive it directly (`jemma generate`).
#[cfg(feature = "llama")]
pub use jemma_engine_llama as llama;
/// Whether this build includes the llama.cpp engine (GGUF tiers).
pub const LLAMA: bool = cfg!(feature = "llama");
