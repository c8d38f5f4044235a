//! Jemma's serving core: what every in-process engine needs around its model, written once. Engines (MLX in
//! `jemma-engine`, llama.cpp in `jemma-engine-llama`) implement [`host::ModelRunner`] — plan a load, load,
//! admit a request into a cache slot, advance a batch of sequences one step, release a slot — and get from
//! [`host::Host`] the model thread, the bounded admission queue (full: HTTP 429), continuous batching (newcomers
//! join the running batch between steps, up to the runner's batch size; a client that stops reading sits out
//! without stalling the others), cancellation when a receiver is dropped, the model's lifecycle (preload or
//! lazy load, keep-alive unload, memory-pressure unload, transparent reload) and live status; from [`memory`]
//! the process-wide memory budget; from [`budget`] the rule a step's prompt reads are planned by; from [`prefix`] the prefix cache's bookkeeping; from [`speculative`] speculative decoding's acceptance rule and
//! draft-length controller; from [`thinking`] the thinking budget each sequence keeps.
//!
//! The split follows text-generation-inference (router vs backends), vLLM (scheduler vs model runner) and
//! mistral.rs (engine loop vs pipelines). Knows nothing of HTTP, UI, MLX or llama.cpp.
#![deny(missing_docs)]

pub mod budget;
pub mod host;
pub mod memory;
pub mod prefix;
pub mod speculative;
pub mod thinking;
