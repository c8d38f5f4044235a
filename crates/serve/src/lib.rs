//! Jemma's serving core: what every in-process engine needs around its model, written once. Engines (MLX in
//! `jemma-engine`, llama.cpp in `jemma-engine-llama`) implement [`host::ModelRunner`] — plan a load, load,
//! run a request, release — and get from [`host::Host`] the model thread, the bounded admission queue (full:
//! HTTP 429), cancellation when a receiver is dropped, the model's lifecycle (preload or lazy load,
//! keep-alive unload, memory-pressure unload, transparent reload) and live status; from [`memory`] the
//! process-wide memory budget.
//!
//! This is the scheduler / model-runner split of text-generation-inference (router vs backends), vLLM
//! (scheduler vs model runner) and mistral.rs (engine loop vs pipelines). The runner contract is whole
//! requests today; continuous batching and the prefix cache (issue 13) extend it to steps.
//! Knows nothing of HTTP, UI, MLX or llama.cpp.
#![deny(missing_docs)]

pub mod host;
pub mod memory;
