//! A minimal, fast OpenAI-compatible upstream for scripts/bench-gateway and scripts/bench-pool: answers every
//! chat completion with a fixed reply (JSON or SSE), so a benchmark measures the proxy in front of it.
//! Optionally it behaves like a server of fixed capacity: each answer takes `--delay-ms` and at most
//! `--concurrency` are served at once (the rest wait their turn), as a model server with N slots does.
//! Usage: cargo run --release -p jemma-gateway --example stub_upstream -- [PORT] [--delay-ms MS] [--concurrency N]
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test tool: failing loudly is its job

use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Service time and slots.
#[derive(Clone)]
struct Capacity {
    delay: std::time::Duration,
    slots: Option<std::sync::Arc<tokio::sync::Semaphore>>,
}

async fn chat(axum::extract::State(c): axum::extract::State<Capacity>, body: Bytes) -> Response {
    let _slot = match &c.slots {
        Some(s) => s.clone().acquire_owned().await.ok(),
        None => None,
    };
    if !c.delay.is_zero() {
        tokio::time::sleep(c.delay).await;
    }
    let stream = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("stream").and_then(|s| s.as_bool()))
        .unwrap_or(false);
    if stream {
        let mut s = String::new();
        for piece in ["Hello", " from", " the", " stub", "."] {
            let c = json!({"id": "stub", "object": "chat.completion.chunk", "created": 0, "model": "stub",
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]});
            s.push_str(&format!("data: {c}\n\n"));
        }
        let fin = json!({"id": "stub", "object": "chat.completion.chunk", "created": 0, "model": "stub",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}});
        s.push_str(&format!("data: {fin}\n\ndata: [DONE]\n\n"));
        return ([("content-type", "text/event-stream")], s).into_response();
    }
    axum::Json(json!({"id": "stub", "object": "chat.completion", "created": 0, "model": "stub",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the stub."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}}))
    .into_response()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port: u16 = args.first().and_then(|p| p.parse().ok()).unwrap_or(0);
    let flag = |name: &str| -> Option<u64> {
        let i = args.iter().position(|a| a == name)?;
        args.get(i + 1)?.parse().ok()
    };
    let cap = Capacity {
        delay: std::time::Duration::from_millis(flag("--delay-ms").unwrap_or(0)),
        slots: flag("--concurrency")
            .map(|n| std::sync::Arc::new(tokio::sync::Semaphore::new(n.max(1) as usize))),
    };
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(chat))
        .route("/chat/completions", axum::routing::post(chat))
        // What a pool's health probe asks.
        .route(
            "/v1/models",
            axum::routing::get(|| async { axum::Json(json!({"object": "list", "data": []})) }),
        )
        .with_state(cap);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    println!(
        "stub upstream listening on http://{}",
        listener.local_addr().expect("addr")
    );
    axum::serve(listener, app).await.expect("serve");
}
