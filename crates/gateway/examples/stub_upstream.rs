//! A minimal, fast OpenAI-compatible upstream for scripts/bench-gateway: answers every chat completion
//! instantly with a fixed reply (JSON or SSE), so a benchmark measures the proxy in front of it.
//! Usage: cargo run --release -p jemma-gateway --example stub_upstream -- [PORT]

use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use serde_json::json;

async fn chat(body: Bytes) -> Response {
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
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(chat))
        .route("/chat/completions", axum::routing::post(chat));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    println!(
        "stub upstream listening on http://{}",
        listener.local_addr().expect("addr")
    );
    axum::serve(listener, app).await.expect("serve");
}
