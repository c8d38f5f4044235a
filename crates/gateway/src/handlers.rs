//! HTTP handlers: thin adapters between axum and the tier router.

use axum::body::{Body, to_bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use jemma_router::RouterError;
use jemma_router::api::{
    ChatCompletion, ChatCompletionRequest, Choice, ChoiceLogprobs, CompletionLogprobs,
    CompletionRequest, ErrorObject, ErrorResponse, FunctionCall, FunctionType, ModelList,
    ResponseMessage, TextChoice, TextCompletion, TextOffsets, ToolCall,
};
use jemma_router::backend::Chunk;
use jemma_router::breaker::BreakerState;
use jemma_router::classify::Tier;
use jemma_router::route::model_entry;
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::ids::{call_id, completion_id, now_secs};
use crate::{ApiError, AppState, sse};

/// Reads and parses the body ourselves so that oversize and malformed bodies get OpenAI-shaped errors.
async fn parse_body(state: &AppState, body: Body) -> Result<ChatCompletionRequest, ApiError> {
    Ok(sse::read_json(body, state.max_body_bytes).await?)
}

fn caller_of(c: Option<axum::Extension<Caller>>) -> Caller {
    c.map(|e| e.0).unwrap_or(Caller::Loopback)
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    match chat_inner(state, caller_of(caller), forwarded(&headers), body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Whether another Jemma node's pool sent this request ([`jemma_router::backend::FORWARDED_HEADER`]).
fn forwarded(headers: &axum::http::HeaderMap) -> bool {
    headers.contains_key(jemma_router::backend::FORWARDED_HEADER)
}

/// A request under way: a stream already answering, or the router's outputs for a whole answer.
enum Started {
    Streaming(Response),
    Whole(tokio::sync::mpsc::Receiver<jemma_router::route::Output>),
}

/// Charges the caller and routes `req`. A stream waits for its first output before committing to a 200
/// (failures before any token — no tier, busy, a bad request — keep their own status) and is rendered
/// by `render` (from the keep-alive interval, the requested model, whether usage comes last, the first
/// output and the rest); otherwise the outputs come back to be read whole.
async fn start(
    state: &AppState,
    caller: &Caller,
    forwarded: bool,
    mut req: jemma_router::api::ChatRequest,
    render: impl FnOnce(
        std::time::Duration,
        String,
        bool,
        jemma_router::route::Output,
        tokio::sync::mpsc::Receiver<jemma_router::route::Output>,
    ) -> Response,
) -> Result<Started, ApiError> {
    req.forwarded = forwarded;
    state.charge(caller, !req.media_modalities().is_empty())?;
    let (stream, include_usage) = (req.stream, req.include_usage);
    let model = req.requested_model.clone();
    let mut rx = state.router.chat(req)?;
    if !stream {
        return Ok(Started::Whole(rx));
    }
    let first = sse::first_output(&mut rx).await?;
    Ok(Started::Streaming(render(
        state.keep_alive,
        model,
        include_usage,
        first,
        rx,
    )))
}

async fn chat_inner(
    state: AppState,
    caller: Caller,
    forwarded: bool,
    body: Body,
) -> Result<Response, ApiError> {
    let req = parse_body(&state, body).await?.validate(&state.limits)?;
    let mut rx = match start(&state, &caller, forwarded, req, sse::stream_response).await? {
        Started::Streaming(r) => return Ok(r),
        Started::Whole(rx) => rx,
    };
    let mut content = String::new();
    let mut reasoning = String::new();
    let mut tool_calls: Vec<ToolCall> = vec![];
    let mut logprobs: Vec<Value> = vec![];
    let sse::Ended {
        finish_reason,
        usage,
        routing,
        ..
    } = sse::collect(&mut rx, |c| match c {
        Chunk::Content(c) => content.push_str(&c),
        Chunk::Reasoning(r) => reasoning.push_str(&r),
        Chunk::ToolCall { name, arguments } => tool_calls.push(ToolCall {
            id: call_id(),
            kind: FunctionType::Function,
            function: FunctionCall { name, arguments },
        }),
        Chunk::Logprobs(l) => logprobs.extend(l),
        _ => {}
    })
    .await?;
    let finish_reason = sse::answer_finish(finish_reason, !tool_calls.is_empty());
    let message = ResponseMessage {
        role: "assistant".into(),
        content: (!content.is_empty() || tool_calls.is_empty()).then_some(content),
        reasoning_content: (!reasoning.is_empty()).then_some(reasoning),
        tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
    };
    let tier = routing.tier.clone();
    let body = ChatCompletion {
        id: completion_id(),
        object: "chat.completion".into(),
        created: now_secs(),
        model: routing.model.clone(),
        choices: vec![Choice {
            index: 0,
            message,
            finish_reason,
            logprobs: (!logprobs.is_empty()).then_some(ChoiceLogprobs {
                content: Some(logprobs),
            }),
        }],
        usage,
        routing,
    };
    Ok(with_tier_header(axum::Json(body), &tier))
}

/// `POST /v1/completions`: a plain prompt, no chat template.
pub async fn completions(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    match completions_inner(state, caller_of(caller), forwarded(&headers), body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(
    state: AppState,
    caller: Caller,
    forwarded: bool,
    body: Body,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = sse::read_json(body, state.max_body_bytes).await?;
    let shape = sse::CompletionShape {
        top_logprobs: req.logprobs.map(|n| n as usize),
        echo: req.echo == Some(true),
        prompt: String::new(),
    };
    let req = req.validate(&state.limits)?;
    let shape = sse::CompletionShape {
        prompt: req.raw_prompt.clone().unwrap_or_default(),
        ..shape
    };
    let render = {
        let shape = shape.clone();
        move |keep_alive, model, usage, first, rx| {
            sse::completion_stream(keep_alive, model, usage, first, rx, shape)
        }
    };
    let mut rx = match start(&state, &caller, forwarded, req, render).await? {
        Started::Streaming(r) => return Ok(r),
        Started::Whole(rx) => rx,
    };
    // `echo` puts the prompt before the completion.
    let mut text = if shape.echo {
        shape.prompt.clone()
    } else {
        String::new()
    };
    let mut logprobs: Vec<Value> = vec![];
    let sse::Ended {
        finish_reason,
        usage,
        routing,
        ..
    } = sse::collect(&mut rx, |c| match c {
        Chunk::Content(c) => text.push_str(&c),
        Chunk::Logprobs(l) => logprobs.extend(l),
        _ => {}
    })
    .await?;
    let tier = routing.tier.clone();
    let body = TextCompletion {
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        object: "text_completion".into(),
        created: now_secs(),
        model: routing.model.clone(),
        choices: vec![TextChoice {
            index: 0,
            text,
            finish_reason: Some(finish_reason),
            logprobs: shape.top_logprobs.map(|n| {
                CompletionLogprobs::from_chat(&logprobs, n, &mut TextOffsets::after(&shape.prompt))
            }),
        }],
        usage: Some(usage),
        routing: Some(routing),
    };
    Ok(with_tier_header(axum::Json(body), &tier))
}

/// A 200 with `body` and the `x-jemma-tier` header naming the tier that answered.
fn with_tier_header(body: impl IntoResponse, tier: &str) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    if let Ok(v) = HeaderValue::from_str(tier) {
        r.headers_mut().insert("x-jemma-tier", v);
    }
    r
}

/// `GET /v1/models`.
pub async fn models(State(state): State<AppState>) -> Response {
    let data = state.router.status().iter().map(model_entry).collect();
    axum::Json(ModelList {
        object: "list".into(),
        data,
    })
    .into_response()
}

/// `GET /v1/models/{id}`.
pub async fn model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.router.status().iter().find(|s| s.tier.as_str() == id) {
        Some(s) => axum::Json(model_entry(s)).into_response(),
        None => ApiError(RouterError::UnknownModel(id)).into_response(),
    }
}

/// `GET /health`: per-tier state, breaker, model, last error, tok/s.
pub async fn health(State(state): State<AppState>) -> Response {
    let tiers = state.router.status();
    // A remote tier not contacted yet is "unknown": it can serve until it fails (its breaker says so).
    let serving = |t: &&jemma_router::route::TierStatus| {
        t.enabled && t.breaker.state == BreakerState::Closed && t.backend.state.can_serve()
    };
    let ready = tiers.iter().filter(serving).count();
    let status = if ready == tiers.len() && ready > 0 {
        "ok"
    } else if ready > 0 {
        "degraded"
    } else if tiers.iter().any(|t| t.backend.state.is_starting()) {
        "starting"
    } else {
        "down"
    };
    let map: serde_json::Map<String, Value> = tiers
        .iter()
        .map(|t| {
            (
                t.tier.to_string(),
                serde_json::to_value(t).unwrap_or(Value::Null),
            )
        })
        .collect();
    let code = if ready > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // `jemma` identifies a Jemma node to its peers (a pool's `jemma` endpoints check for it).
    let mut body = json!({
        "status": status,
        "jemma": {"version": env!("CARGO_PKG_VERSION")},
        "tiers": map,
    });
    if let Some(m) = state.router.memory_status() {
        body["memory"] = m;
    }
    (code, axum::Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(state): State<AppState>) -> Response {
    // Refresh gauges that are derived from state rather than events.
    for t in state.router.status() {
        metrics::gauge!("jemma_tier_enabled", "tier" => t.tier.as_str()).set(if t.enabled {
            1.0
        } else {
            0.0
        });
        metrics::gauge!("jemma_tier_in_flight", "tier" => t.tier.as_str()).set(t.in_flight as f64);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// The tier and the small JSON body of an admin request (None body when it is not JSON).
async fn admin_request(tier: String, body: Body) -> Result<(Tier, Option<Value>), Response> {
    let tier: Tier = tier
        .parse()
        .map_err(|_| ApiError(RouterError::UnknownModel(tier)).into_response())?;
    let v = to_bytes(body, 4096)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    Ok((tier, v))
}

/// `POST /admin/tiers/{tier}` with `{"enabled": bool, "warm_up": bool}`: the tray's heavy toggle.
pub async fn set_tier(
    State(state): State<AppState>,
    Path(tier): Path<String>,
    body: Body,
) -> Response {
    let (tier, v) = match admin_request(tier, body).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let Some(v) = v else {
        return ApiError(RouterError::InvalidRequest {
            message: "expected {\"enabled\": bool}".into(),
            param: None,
        })
        .into_response();
    };
    let Some(enabled) = v.get("enabled").and_then(Value::as_bool) else {
        return ApiError(RouterError::InvalidRequest {
            message: "enabled must be a boolean".into(),
            param: Some("enabled".into()),
        })
        .into_response();
    };
    if let Err(e) = state.router.set_enabled(tier, enabled) {
        return ApiError(e).into_response();
    }
    if enabled && v.get("warm_up").and_then(Value::as_bool).unwrap_or(false) {
        let r = state.router.clone();
        tokio::spawn(async move {
            let ok = r.warm_up(tier).await.unwrap_or(false);
            tracing::info!(%tier, ok, "warm-up finished");
        });
    }
    axum::Json(json!({"tier": tier, "enabled": enabled})).into_response()
}

/// `POST /admin/tiers/{tier}/model` with `{"model": "<dir | catalog name | owner/repo>", "wait": bool}`:
/// switches the tier's model without a restart (downloading it first if needed). Without `wait` the answer
/// is 202 at once and `/health` shows the swap's progress; with it, 200 once the new model serves.
pub async fn set_tier_model(
    State(state): State<AppState>,
    Path(tier): Path<String>,
    body: Body,
) -> Response {
    let (tier, v) = match admin_request(tier, body).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let Some(model) = v
        .as_ref()
        .and_then(|v| v.get("model"))
        .and_then(Value::as_str)
        .filter(|m| !m.trim().is_empty())
        .map(str::to_string)
    else {
        return ApiError(RouterError::InvalidRequest {
            message: "expected {\"model\": \"<directory, catalog name or owner/repo>\"}".into(),
            param: Some("model".into()),
        })
        .into_response();
    };
    let wait = v
        .as_ref()
        .and_then(|v| v.get("wait"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let router = state.router.clone();
    if wait {
        return match router.set_model(tier, &model).await {
            Ok(()) => {
                axum::Json(json!({"tier": tier, "model": model, "state": "ready"})).into_response()
            }
            Err(e) => ApiError(e).into_response(),
        };
    }
    let m = model.clone();
    tokio::spawn(async move {
        if let Err(e) = router.set_model(tier, &m).await {
            tracing::warn!(%tier, model = %m, error = %e, "model change failed");
        }
    });
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({"tier": tier, "model": model, "state": "switching"})),
    )
        .into_response()
}

/// `POST /admin/tiers/{tier}/endpoints` with one `[[tiers.X.endpoints]]` entry as JSON (`kind` `jemma`
/// or `openai`, `url`, `key`, `model`, `name`, `weight`, `max_concurrency`, `probe`): the endpoint joins
/// the tier's pool now (a tier that is one backend becomes a pool of it and the newcomer), until the
/// gateway stops or it leaves. 201 with the pool's members.
pub async fn join_endpoint(
    State(state): State<AppState>,
    Path(tier): Path<String>,
    body: Body,
) -> Response {
    let Ok(tier) = tier.parse::<Tier>() else {
        return ApiError(RouterError::UnknownModel(tier)).into_response();
    };
    let Some(m) = state.membership.clone() else {
        return ApiError(RouterError::InvalidRequest {
            message: "this gateway does not take endpoints at run time".into(),
            param: None,
        })
        .into_response();
    };
    let e: jemma_router::config::EndpointConfig = match to_bytes(body, 16 * 1024)
        .await
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(e) => e,
        Err(why) => {
            return ApiError(RouterError::InvalidRequest {
                message: format!("expected one endpoint as JSON (kind, url, key, model, name, weight, max_concurrency, probe): {why}"),
                param: None,
            })
            .into_response();
        }
    };
    // A key joined over HTTP is the key itself: a reference would have this machine read one of its own
    // secrets (a keychain entry, an environment variable) and send it to the URL given.
    if e.api_key
        .as_deref()
        .is_some_and(|k| k.starts_with("env:") || k.starts_with("keyring:"))
    {
        return ApiError(RouterError::InvalidRequest {
            message: "key must be the key itself here, not an env: or keyring: reference".into(),
            param: Some("key".into()),
        })
        .into_response();
    }
    match m.join(&state.router, tier, &e) {
        Ok(name) => (
            StatusCode::CREATED,
            axum::Json(
                json!({"tier": tier, "endpoint": name, "endpoints": state.router.endpoints(tier)}),
            ),
        )
            .into_response(),
        Err(e) => ApiError(e).into_response(),
    }
}

/// `DELETE /admin/tiers/{tier}/endpoints/{name}`: the endpoint leaves the tier's pool (its running
/// answers finish). 404 when it is not a member.
pub async fn leave_endpoint(
    State(state): State<AppState>,
    Path((tier, name)): Path<(String, String)>,
) -> Response {
    let Ok(tier) = tier.parse::<Tier>() else {
        return ApiError(RouterError::UnknownModel(tier)).into_response();
    };
    match state.router.leave(tier, &name) {
        Ok(true) => axum::Json(
            json!({"tier": tier, "removed": name, "endpoints": state.router.endpoints(tier)}),
        )
        .into_response(),
        Ok(false) => {
            let body = ErrorResponse {
                error: ErrorObject {
                    message: format!("the {tier} tier has no endpoint named {name}"),
                    kind: "invalid_request_error".into(),
                    param: Some("name".into()),
                    code: Some("endpoint_not_found".into()),
                    fallback: None,
                },
            };
            (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
        }
        Err(e) => ApiError(e).into_response(),
    }
}

/// Unknown paths: OpenAI-style 404.
pub async fn not_found() -> Response {
    let body = ErrorResponse {
        error: ErrorObject {
            message: "unknown endpoint".into(),
            kind: "invalid_request_error".into(),
            param: None,
            code: Some("not_found".into()),
            fallback: None,
        },
    };
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}
