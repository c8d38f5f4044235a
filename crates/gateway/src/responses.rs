//! `POST /v1/responses`: OpenAI's Responses API, stateless, over the same router. The translation both ways
//! lives in [`jemma_router::responses`]; this module reads the body, runs the request and writes the
//! `response` object or its named server-sent events. Errors are OpenAI's.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use jemma_router::RouterError;
use jemma_router::responses::{EventStream, ResponseBuilder, ResponsesRequest};

use crate::auth::Caller;
use crate::{ApiError, AppState, sse};

/// `POST /v1/responses`.
pub async fn responses(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    body: Body,
) -> Response {
    let caller = caller.map(|e| e.0).unwrap_or(Caller::Loopback);
    match inner(state, caller, body).await {
        Ok(r) => r,
        Err(e) => ApiError(e).into_response(),
    }
}

async fn inner(state: AppState, caller: Caller, body: Body) -> Result<Response, RouterError> {
    let req: ResponsesRequest = sse::read_json(body, state.max_body_bytes).await?;
    let stream = req.stream;
    let (chat, echo) = req.to_chat(&state.limits)?;
    state.charge(&caller, !chat.media_modalities().is_empty())?;
    let mut rx = state.router.chat(chat)?;
    if stream {
        let first = sse::first_output(&mut rx).await?;
        let mut events = EventStream::new(echo);
        return Ok(sse::named_events(
            state.keep_alive,
            "keep-alive",
            first,
            rx,
            move |o| {
                let (evs, done) = events.on(o);
                let evs = evs
                    .into_iter()
                    .map(|d| (d["type"].as_str().unwrap_or("message").to_string(), d))
                    .collect();
                (evs, done)
            },
        ));
    }
    let mut b = ResponseBuilder::default();
    let end = sse::collect(&mut rx, |c| b.push(c)).await?;
    let body = b.finish(&echo, end.finish_reason, &end.usage);
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}
