//! Handler tests with `oneshot`: status codes, OpenAI error shapes, SSE framing, models/health/metrics.
//! A scripted backend stands in for the engines (they are not what these tests are about).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode};
use jemma_gateway::{AppState, router};
use jemma_router::api::Limits;
use jemma_router::backend::Backend;
use jemma_router::breaker::BreakerConfig;
use jemma_router::classify::{ClassifierConfig, Tier};
use jemma_router::route::{TierRouter, TierSettings};
use jemma_router::testing::{Script, Scripted};
use serde_json::{Value, json};
use tower::ServiceExt;

/// The shared test double, echoing the question back with a tool call (or hanging after it starts).
fn echo(hang: bool) -> Arc<dyn Backend> {
    Scripted::new("echo", if hang { Script::Hang } else { Script::Echo })
}

fn settings(max_concurrency: usize, max_queue: usize) -> TierSettings {
    TierSettings {
        enabled: true,
        max_concurrency,
        max_queue,
        first_token_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        breaker: BreakerConfig::default(),
        aliases: vec![],
        max_tokens: None,
        video_frames: None,
        video_seconds: None,
    }
}

fn app(hang: bool, queue: usize) -> axum::Router {
    app_over([echo(hang), echo(hang)], queue)
}

/// The app over `[fast, primary]`, one request at a time each, `queue` waiting.
fn app_over(backends: [Arc<dyn Backend>; 2], queue: usize) -> axum::Router {
    let tiers = [Tier::Fast, Tier::Primary]
        .into_iter()
        .zip(backends)
        .map(|(t, b)| (t, b, settings(1, queue)))
        .collect();
    let r = Arc::new(TierRouter::new(ClassifierConfig::default(), tiers));
    router(AppState::new(
        r,
        Limits::default(),
        64 * 1024,
        Duration::from_secs(1),
    ))
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: &str,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    send(app, req).await
}

/// Runs `req` through `app`: (status, headers, body as text).
async fn send(
    app: &axum::Router,
    req: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn error_of(body: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap();
    let e = v["error"].clone();
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "error lacks {k}: {body}");
    }
    e
}

#[tokio::test]
async fn chat_json_has_message_tool_calls_usage_and_routing() {
    let a = app(false, 4);
    let (st, h, body) = call(
        &a,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"fast","messages":[{"role":"user","content":"hello there"}]}"#,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(h["x-jemma-tier"], "fast");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "hello there");
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "lookup"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(v["usage"]["total_tokens"], 7);
    assert_eq!(v["_routing"]["tier"], "fast");
    assert_eq!(v["_routing"]["reason"], "explicit tier");
}

/// A step with nothing to show (here a tool call being written) goes to another Jemma node as an empty
/// chunk, which that node's deadlines read as progress; a client gets nothing for it.
#[tokio::test]
async fn progress_reaches_a_peer_as_empty_chunks_and_a_client_not_at_all() {
    let held: Arc<dyn Backend> = Scripted::new(
        "held",
        Script::HeldCall {
            held: 3,
            every_ms: 1,
        },
    );
    let a = app_over([held, echo(false)], 4);
    let body = r#"{"model":"fast","stream":true,"messages":[{"role":"user","content":"write"}]}"#;
    for (headers, empty) in [(vec![("x-jemma-forwarded", "1")], 3), (vec![], 0)] {
        let (st, _, text) =
            call_at(&a, "127.0.0.1:5000", "/v1/chat/completions", &headers, body).await;
        assert_eq!(st, StatusCode::OK);
        let chunks: Vec<Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let n = chunks
            .iter()
            .filter(|c| {
                c["choices"][0]["delta"] == json!({}) && c["choices"][0]["finish_reason"].is_null()
            })
            .count();
        assert_eq!(n, empty, "{headers:?}: {chunks:?}");
        assert!(
            chunks
                .iter()
                .any(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "lookup")
        );
    }
}

#[tokio::test]
async fn chat_stream_is_openai_sse() {
    let a = app(false, 4);
    let (st, h, body) = call(
        &a,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"primary","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"a b"}]}"#,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "a b");
    let fin = chunks
        .iter()
        .find(|c| c["choices"][0]["finish_reason"].is_string())
        .unwrap();
    assert_eq!(fin["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(fin["_routing"]["tier"], "primary");
    // Usage only in the last chunk (a client adding it up counts it once).
    assert!(fin["usage"].is_null(), "{fin}");
    assert_eq!(
        chunks.iter().filter(|c| !c["usage"].is_null()).count(),
        1,
        "{chunks:?}"
    );
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "lookup")
    );
    let usage_only = chunks.last().unwrap();
    assert_eq!(usage_only["choices"], json!([]));
    assert_eq!(usage_only["usage"]["total_tokens"], 7);
    assert_eq!(usage_only["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn bad_input_gets_openai_errors() {
    let a = app(false, 4);
    let (st, _, body) = call(&a, "POST", "/v1/chat/completions", "{not json").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["type"], "invalid_request_error");
    let (st, _, body) = call(&a, "POST", "/v1/chat/completions", r#"{"messages":[]}"#).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "messages");
    let (st, _, body) = call(
        &a,
        "POST",
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"x"}],"temperature":9}"#,
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "temperature");
    let (st, _, body) = call(
        &a,
        "POST",
        "/v1/chat/completions",
        r#"{"messages":[{"role":"wizard","content":"x"}]}"#,
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "messages[0].role");
    let (st, _, body) = call(
        &a,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&body)["code"], "model_not_found");
    let big = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(70 * 1024)
    );
    let (st, _, body) = call(&a, "POST", "/v1/chat/completions", &big).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    error_of(&body);
    let (st, _, body) = call(&a, "POST", "/v1/chat/completions", r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"ftp://x"}}]}]}"#).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    // A field deep in the typed body is named by its whole path (an agent replaying a history with a
    // malformed tool call, a client sending a content part type it invented).
    for (body, param) in [
        (
            r#"{"messages":[{"role":"user","content":"x"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"file"}]}]}"#,
            "messages[1].content[1].type",
        ),
        (
            r#"{"messages":[{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{oops"}}]}]}"#,
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"tool_choice":"sometimes"}"#,
            "tool_choice",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"yaml"}}"#,
            "response_format.type",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}"#,
            "max_tokens",
        ),
    ] {
        let (st, _, out) = call(&a, "POST", "/v1/chat/completions", body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{out}");
        let e = error_of(&out);
        assert_eq!(e["param"], param, "{out}");
        assert!(e["message"].as_str().unwrap().starts_with(param), "{out}");
    }
    let (st, _, _) = call(&a, "GET", "/v2/nothing", "").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn openapi_json_describes_the_typed_wire_format() {
    let a = app(false, 4);
    let (st, _, body) = call(&a, "GET", "/openapi.json", "").await;
    assert_eq!(st, StatusCode::OK);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let op = &doc["paths"]["/v1/chat/completions"]["post"];
    assert_eq!(
        op["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/ChatCompletionRequest"
    );
    assert!(op["responses"]["200"]["content"]["text/event-stream"].is_object());
    // What a whole answer is described as is what the gateway sends: each required field is there.
    let (_, _, answer) = call(
        &a,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"fast","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    let answer: Value = serde_json::from_str(&answer).unwrap();
    for f in doc["components"]["schemas"]["ChatCompletion"]["required"]
        .as_array()
        .unwrap()
    {
        assert!(
            answer.get(f.as_str().unwrap()).is_some(),
            "{f} missing: {answer}"
        );
    }
}

#[tokio::test]
async fn full_queue_is_429_with_retry_after() {
    let hanging = [
        Scripted::new("echo", Script::Hang),
        Scripted::new("echo", Script::Hang),
    ];
    let a = app_over(hanging.clone().map(|b| b as Arc<dyn Backend>), 0);
    // One request occupies each tier's only slot (hanging); the next finds no room anywhere.
    let a1 = a.clone();
    let a2 = a.clone();
    let h1 = tokio::spawn(async move {
        call(
            &a1,
            "POST",
            "/v1/chat/completions",
            r#"{"model":"primary","messages":[{"role":"user","content":"x"}]}"#,
        )
        .await
    });
    let h2 = tokio::spawn(async move {
        call(
            &a2,
            "POST",
            "/v1/chat/completions",
            r#"{"model":"fast","messages":[{"role":"user","content":"x"}]}"#,
        )
        .await
    });
    // Both slots are taken once both backends have started their request.
    tokio::time::timeout(Duration::from_secs(10), async {
        while hanging.iter().any(|b| b.calls.load(Ordering::SeqCst) == 0) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("both tiers took their request");
    let (st, h, body) = call(
        &a,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"primary","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(h.contains_key("retry-after"));
    assert_eq!(error_of(&body)["type"], "rate_limit_error");
    h1.abort();
    h2.abort();
}

#[tokio::test]
async fn models_health_metrics_and_tier_toggle() {
    let a = app(false, 4);
    let (st, _, body) = call(&a, "GET", "/v1/models", "").await;
    assert_eq!(st, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["fast", "primary"]);
    let (st, _, body) = call(&a, "GET", "/health", "").await;
    assert_eq!(st, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["tiers"]["fast"]["breaker"]["state"], "closed");
    let (st, _, _) = call(&a, "POST", "/admin/tiers/fast", r#"{"enabled":false}"#).await;
    assert_eq!(st, StatusCode::OK);
    let (_, _, body) = call(&a, "GET", "/health", "").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["tiers"]["fast"]["enabled"], false);
    assert_eq!(v["status"], "degraded");
    let (st, _, _) = call(&a, "POST", "/admin/tiers/fast", r#"{"enabled":"yes"}"#).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    // A web page in this machine's browser is loopback too: what it can send without a preflight (a
    // text/plain body), or anything with a foreign Origin, is refused.
    for (ctype, origin) in [
        ("text/plain", None),
        ("application/json", Some("https://evil.example")),
    ] {
        let mut req = Request::builder()
            .method("POST")
            .uri("/admin/tiers/fast")
            .header("content-type", ctype);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        let resp = a
            .clone()
            .oneshot(req.body(Body::from(r#"{"enabled":true}"#)).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{ctype} {origin:?}");
    }
    let (_, _, body) = call(&a, "GET", "/health", "").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["tiers"]["fast"]["enabled"], false,
        "a refused call changed nothing"
    );
    call(
        &a,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"primary","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    let (st, _, body) = call(&a, "GET", "/metrics", "").await;
    assert_eq!(st, StatusCode::OK);
    for name in [
        "jemma_requests_total",
        "jemma_request_duration_seconds",
        "jemma_tier_enabled",
        "jemma_completion_tokens_total",
    ] {
        assert!(body.contains(name), "metrics lack {name}:\n{body}");
    }
}

#[tokio::test]
async fn cors_allows_only_the_apps_origin() {
    let a = app(false, 4);
    let preflight = |origin: &str| {
        Request::builder()
            .method("OPTIONS")
            .uri("/v1/chat/completions")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .body(Body::empty())
            .unwrap()
    };
    let r = a
        .clone()
        .oneshot(preflight("tauri://localhost"))
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "tauri://localhost"
    );
    let r = a
        .clone()
        .oneshot(preflight("https://evil.example"))
        .await
        .unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));
}

fn app_with_access(access: jemma_gateway::auth::AccessPolicy) -> axum::Router {
    let tiers = vec![(Tier::Fast, echo(false), settings(4, 4))];
    let r = Arc::new(TierRouter::new(ClassifierConfig::default(), tiers));
    router(
        AppState::new(r, Limits::default(), 64 * 1024, Duration::from_secs(1)).with_access(access),
    )
}

async fn call_from(
    app: &axum::Router,
    peer: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, axum::http::HeaderMap, String) {
    call_at(app, peer, "/v1/chat/completions", headers, body).await
}

async fn call_at(
    app: &axum::Router,
    peer: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut b = Request::builder()
        .method("POST")
        .uri(uri)
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let mut req = b.body(Body::from(body.to_string())).unwrap();
    let addr: std::net::SocketAddr = peer.parse().unwrap();
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(addr));
    send(app, req).await
}

const CHAT: &str = r#"{"model":"fast","messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test]
async fn remote_callers_need_a_valid_key_and_loopback_is_exempt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut store = jemma_gateway::auth::KeyStore::load(&path).unwrap();
    let (_, key) = store.create("laptop").unwrap();
    let raw = std::fs::read_to_string(&path).unwrap();
    assert!(!raw.contains(&key), "the key file holds only hashes");
    let access = jemma_gateway::auth::AccessPolicy {
        keys: Arc::new(std::sync::Mutex::new(
            jemma_gateway::auth::KeyStore::load(&path).unwrap(),
        )),
        ..Default::default()
    };
    let a = app_with_access(access);
    let (st, _, _) = call_from(&a, "127.0.0.1:5000", &[], CHAT).await;
    assert_eq!(st, StatusCode::OK, "loopback is exempt");
    let (st, h, body) = call_from(&a, "100.64.0.7:5000", &[], CHAT).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(h["www-authenticate"], "Bearer");
    assert_eq!(error_of(&body)["code"], "invalid_api_key");
    let (st, _, _) = call_from(
        &a,
        "100.64.0.7:5000",
        &[("authorization", "Bearer jm-wrong")],
        CHAT,
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let bearer = format!("Bearer {key}");
    let (st, _, _) = call_from(&a, "100.64.0.7:5000", &[("authorization", &bearer)], CHAT).await;
    assert_eq!(st, StatusCode::OK, "a valid key is accepted");
    // tailscale serve proxies from 127.0.0.1 with identity headers: that is a remote caller.
    let (st, _, _) = call_from(
        &a,
        "127.0.0.1:5000",
        &[("tailscale-user-login", "alice@example.com")],
        CHAT,
    )
    .await;
    assert_eq!(
        st,
        StatusCode::UNAUTHORIZED,
        "proxied requests are never exempt"
    );
    // Anthropic's Messages API: the key as x-api-key, errors in Anthropic's shape.
    let msg = r#"{"model":"fast","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#;
    let (st, _, body) = call_at(&a, "100.64.0.7:5000", "/v1/messages", &[], msg).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["error"]["type"].as_str()),
        (Some("error"), Some("authentication_error")),
        "{body}"
    );
    let (st, _, body) = call_at(
        &a,
        "100.64.0.7:5000",
        "/v1/messages",
        // A Bearer token meant for somewhere else does not hide the valid x-api-key.
        &[
            ("x-api-key", &key),
            ("anthropic-version", "2023-06-01"),
            ("authorization", "Bearer sk-elsewhere"),
        ],
        msg,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["type"], "message", "{body}");
    assert_eq!(v["content"][0]["type"], "text", "{body}");
    // revoking takes effect for a reloaded store
    let mut store = jemma_gateway::auth::KeyStore::load(&path).unwrap();
    assert!(store.revoke("laptop").unwrap());
    assert!(store.verify(&key).is_none());
}

#[tokio::test]
async fn remote_rate_limits_answer_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut store = jemma_gateway::auth::KeyStore::load(&path).unwrap();
    let (_, key) = store.create("phone").unwrap();
    let access = jemma_gateway::auth::AccessPolicy {
        keys: Arc::new(std::sync::Mutex::new(store)),
        text_per_minute: 3,
        media_per_minute: 1,
        ..Default::default()
    };
    let a = app_with_access(access);
    let bearer = format!("Bearer {key}");
    let auth = [("authorization", bearer.as_str())];
    for _ in 0..3 {
        assert_eq!(
            call_from(&a, "100.64.0.9:1", &auth, CHAT).await.0,
            StatusCode::OK
        );
    }
    let (st, h, body) = call_from(&a, "100.64.0.9:1", &auth, CHAT).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(error_of(&body)["code"], "rate_limit_exceeded");
    let image = r#"{"model":"fast","messages":[{"role":"user","content":[{"type":"text","text":"x"},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8IWfDwMDAxMDAwMDAAAAOTgEmR2hJIgAAAABJRU5ErkJggg=="}}]}]}"#;
    assert_eq!(
        call_from(&a, "100.64.0.9:1", &auth, image).await.0,
        StatusCode::OK,
        "media has its own budget"
    );
    assert_eq!(
        call_from(&a, "100.64.0.9:1", &auth, image).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // loopback callers are not limited by default
    for _ in 0..5 {
        assert_eq!(
            call_from(&a, "127.0.0.1:1", &[], CHAT).await.0,
            StatusCode::OK
        );
    }
}

#[tokio::test]
async fn daily_quotas_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = jemma_gateway::auth::KeyStore::load(&dir.path().join("keys.json")).unwrap();
    let (_, key) = store.create("tablet").unwrap();
    let quota_file = dir.path().join("quotas.json");
    let policy = |store: jemma_gateway::auth::KeyStore| jemma_gateway::auth::AccessPolicy {
        keys: Arc::new(std::sync::Mutex::new(store)),
        daily_text: 2,
        quota_file: Some(quota_file.clone()),
        ..Default::default()
    };
    let bearer = format!("Bearer {key}");
    let auth = [("authorization", bearer.as_str())];
    let a = app_with_access(policy(store.clone()));
    assert_eq!(
        call_from(&a, "100.64.0.3:1", &auth, CHAT).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call_from(&a, "100.64.0.3:1", &auth, CHAT).await.0,
        StatusCode::OK
    );
    let (st, h, _) = call_from(&a, "100.64.0.3:1", &auth, CHAT).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() <= 86_400);
    // A restarted gateway (new state, same file) still counts today's requests.
    let b = app_with_access(policy(store));
    assert_eq!(
        call_from(&b, "100.64.0.3:1", &auth, CHAT).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert!(
        std::fs::read_to_string(&quota_file)
            .unwrap()
            .contains("key:")
    );
}

#[tokio::test]
async fn the_chat_page_is_open_to_remote_browsers_and_its_api_calls_are_not() {
    let a = app_with_access(jemma_gateway::auth::AccessPolicy::default());
    for (path, ty, marker) in [
        ("/", "text/html", "id=\"api-key\""),
        ("/chat.js", "text/javascript", "Authorization"),
        ("/style.css", "text/css", "#key-form"),
        ("/lib/sse.js", "text/javascript", "export class SSEParser"),
    ] {
        let mut req = Request::builder()
            .method("GET")
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let peer: std::net::SocketAddr = "100.64.0.7:5000".parse().unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let resp = a.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let h = resp.headers().clone();
        assert!(
            h["content-type"].to_str().unwrap().starts_with(ty),
            "{path}"
        );
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["x-content-type-options"], "nosniff");
        let body = to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        // The page asks for a key, and its script sends it.
        assert!(String::from_utf8_lossy(&body).contains(marker), "{path}");
    }
    let (st, _, _) = call_from(&a, "100.64.0.7:5000", &[], CHAT).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}
