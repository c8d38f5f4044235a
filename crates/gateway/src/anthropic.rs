//! `POST /v1/messages`: Anthropic's Messages API over the same router. The translation both ways lives in
//! [`jemma_router::anthropic`]; this module only reads the body, runs the request and writes JSON, named
//! server-sent events, or an error in Anthropic's shape.

use std::convert::Infallible;

use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use jemma_router::RouterError;
use jemma_router::anthropic::{
    EventStream, MessageBuilder, MessagesRequest, ThinkingDisplay, error_body, error_parts,
};
use jemma_router::route::Output;
use tokio::sync::mpsc;

use crate::AppState;
use crate::auth::Caller;

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
    let bytes = to_bytes(body, state.max_body_bytes).await.map_err(|_| {
        RouterError::TooLarge(format!(
            "request body exceeds {} bytes",
            state.max_body_bytes
        ))
    })?;
    let req: MessagesRequest =
        serde_json::from_slice(&bytes).map_err(|e| RouterError::InvalidRequest {
            message: format!("invalid JSON body: {e}"),
            param: None,
        })?;
    let model = req.model.clone();
    let stream = req.stream;
    let (chat, display) = req.to_chat(&state.limits)?;
    state.charge(&caller, chat.has_images)?;
    let mut rx = state.router.chat(chat)?;
    if stream {
        // The first output decides the status: failures before any token keep their own.
        let first = match rx.recv().await {
            Some(Output::Error(e)) => return Err(e),
            None => {
                return Err(RouterError::AllTiersDown {
                    fallback: vec![],
                    retry_after_secs: None,
                });
            }
            Some(first) => first,
        };
        return Ok(event_stream(&state, model, display, first, rx));
    }
    let mut message = MessageBuilder::new(display);
    while let Some(o) = rx.recv().await {
        match o {
            Output::Chunk(c) => message.push(c),
            Output::Waiting => {}
            Output::Error(e) => return Err(e),
            Output::End {
                finish_reason,
                usage,
                stop_sequence,
                ..
            } => {
                let body = message.finish(&model, finish_reason, &usage, stop_sequence.as_deref());
                return Ok((StatusCode::OK, axum::Json(body)).into_response());
            }
        }
    }
    Err(RouterError::AllTiersDown {
        fallback: vec!["answer incomplete".into()],
        retry_after_secs: None,
    })
}

/// The answer as Anthropic's named events. A client that goes away drops `rx`, which cancels routing and
/// the engine.
fn event_stream(
    state: &AppState,
    model: String,
    display: ThinkingDisplay,
    first: Output,
    mut rx: mpsc::Receiver<Output>,
) -> Response {
    let (tx, out) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let mut events = EventStream::new(model, display);
        let mut next = Some(first);
        loop {
            let o = match next.take() {
                Some(o) => o,
                None => rx.recv().await.unwrap_or_else(|| {
                    Output::Error(RouterError::AllTiersDown {
                        fallback: vec!["stream ended early".into()],
                        retry_after_secs: None,
                    })
                }),
            };
            let (evs, done) = events.on(o);
            for (name, data) in evs {
                if tx
                    .send(Ok(Event::default().event(name).data(data.to_string())))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if done {
                return;
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out))
        .keep_alive(KeepAlive::new().interval(state.keep_alive).text("ping"))
        .into_response()
}
