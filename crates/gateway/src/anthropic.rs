//! `POST /v1/messages`: Anthropic's Messages API over the same router. The translation both ways lives in
//! [`jemma_router::anthropic`]; this module only reads the body, runs the request and writes JSON, named
//! server-sent events, or an error in Anthropic's shape.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use jemma_router::RouterError;
use jemma_router::anthropic::{
    EventStream, MessageBuilder, MessagesRequest, error_body, error_parts,
};

use crate::auth::Caller;
use crate::{AppState, sse};

/// A router error as Anthropic's API answers it (status, `{"type": "error", "error": {…}}`, and
/// `Retry-After` where the OpenAI surface sends one).
pub(crate) fn error_response(e: RouterError) -> Response {
    let (status, _) = error_parts(&e);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, axum::Json(error_body(&e))).into_response();
    if let Some(secs) = crate::error::retry_after(&e)
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// `POST /v1/messages`.
pub async fn messages(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    body: Body,
) -> Response {
    let caller = caller.map(|e| e.0).unwrap_or(Caller::Loopback);
    match messages_inner(state, caller, body).await {
        Ok(r) => r,
        Err(e) => error_response(e),
    }
}

async fn messages_inner(
    state: AppState,
    caller: Caller,
    body: Body,
) -> Result<Response, RouterError> {
    let req: MessagesRequest = sse::read_json(body, state.max_body_bytes).await?;
    let model = req.model.clone();
    let stream = req.stream;
    let (chat, display) = req.to_chat(&state.limits)?;
    state.charge(&caller, !chat.media_modalities().is_empty())?;
    let mut rx = state.router.chat(chat)?;
    if stream {
        let first = sse::first_output(&mut rx).await?;
        let mut events = EventStream::new(model, display);
        return Ok(sse::named_events(
            state.keep_alive,
            "ping",
            first,
            rx,
            move |o| {
                let (evs, done) = events.on(o);
                let evs = evs.into_iter().map(|(n, d)| (n.to_string(), d)).collect();
                (evs, done)
            },
        ));
    }
    let mut message = MessageBuilder::new(display);
    let end = sse::collect(&mut rx, |c| message.push(c)).await?;
    let body = message.finish(
        &model,
        end.finish_reason,
        &end.usage,
        end.stop_sequence.as_deref(),
    );
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}

/// `POST /v1/messages/count_tokens`: `{"input_tokens": n}`, counted by the tier the request would go to
/// with its own tokenizer and chat template (system prompt, tools and all), without generating.
pub async fn count_tokens(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    body: Body,
) -> Response {
    let caller = caller.map(|e| e.0).unwrap_or(Caller::Loopback);
    let counted = async {
        let req: MessagesRequest = sse::read_json(body, state.max_body_bytes).await?;
        let chat = req.to_count(&state.limits)?;
        state.charge(&caller, !chat.media_modalities().is_empty())?;
        state.router.count_tokens(&chat).await
    };
    match counted.await {
        Ok((tier, n)) => {
            let mut r = axum::Json(serde_json::json!({ "input_tokens": n })).into_response();
            if let Ok(v) = HeaderValue::from_str(tier.as_str()) {
                r.headers_mut().insert("x-jemma-tier", v);
            }
            r
        }
        Err(e) => error_response(e),
    }
}
