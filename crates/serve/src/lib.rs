//! Jemma's serving core: what every in-process engine needs around its model, written once. Engines (MLX in
//! `jemma-engine`, llama.cpp in `jemma-engine-llama`) implement [`host::ModelRunner`] — plan a load, load,
//! run a request, release — and get from [`host::Host`] the model thread, the bounded admission queue (full:
//! HTTP 429), cancellation when a receiver is dropped, the model's lifecycle (preload or lazy load,
//! keep-alive unload, memory-pressure unload, transparent reload) and live status; from [`memory`] the
//! process-wide memory budget; from [`prefix`] the prefix cache's bookkeeping.
//!
//! The split follows text-generation-inference (router vs backends), vLLM (scheduler vs model runner) and
//! mistral.rs (engine loop vs pipelines), but today's runner contract is whole requests, one at a time on
//! the model thread, as in mlx_lm.server and a single llama-server slot. Continuous batching (issue 13)
//! turns it into the step-level contract of those anchors: prefill chunks, one decode step for a batch.
//! Knows nothing of HTTP, UI, MLX or llama.cpp.
#![deny(missing_docs)]

pub mod host;
pub mod memory;
pub mod prefix;
