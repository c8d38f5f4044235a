//! Workspace end-to-end tests: the real `jemma` binary serving the real MLX engine on the fixture models,
//! a second `jemma serve`, llama.cpp's own llama-server and vLLM (the heavy tier's vLLM variant) as
//! OpenAI-compatible upstreams of the heavy tier, fault-injecting upstreams, and the unmodified OpenAI
//! Python SDK as the client.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

mod chaos;
mod cli;
#[path = "../../crates/models/tests/fake_hub/mod.rs"]
mod fake_hub;
mod faults;
mod heavy;
mod llama_server;
mod models;
mod openai_sdk;
mod pool;
mod real_model;
mod support;
mod vllm;
