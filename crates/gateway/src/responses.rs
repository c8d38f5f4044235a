//! `POST /v1/responses`: OpenAI's Responses API, stateless, over the same router. The translation both ways
//! lives in [`jemma_router::responses`]; this module reads the body, runs the request and writes the
//! `response` object or its named server-sent events. Errors are OpenAI's.

use std::convert::Infallible;

use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use jemma_router::RouterError;
use jemma_router::responses::{Echo, EventStream, ResponseBuilder, ResponsesRequest};
use jemma_router::route::Output;
use tokio::sync::mpsc;

use crate::auth::Caller;
use crate::{ApiError, AppState};

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
    let bytes = to_bytes(body, state.max_body_bytes).await.map_err(|_| {
        RouterError::TooLarge(format!(
            "request body exceeds {} bytes",
            state.max_body_bytes
        ))
    })?;
    let req: ResponsesRequest =
        serde_json::from_slice(&bytes).map_err(|e| RouterError::InvalidRequest {
            message: format!("invalid JSON body: {e}"),
            param: None,
        })?;
    let stream = req.stream;
    let (chat, echo) = req.to_chat(&state.limits)?;
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
        return Ok(event_stream(&state, echo, first, rx));
    }
    let mut b = ResponseBuilder::default();
    while let Some(o) = rx.recv().await {
        match o {
            Output::Chunk(c) => b.push(c),
            Output::Waiting => {}
            Output::Error(e) => return Err(e),
            Output::End {
                finish_reason,
                usage,
                ..
            } => {
                let body = b.finish(&echo, finish_reason, &usage);
                return Ok((StatusCode::OK, axum::Json(body)).into_response());
            }
        }
    }
    Err(RouterError::AllTiersDown {
        fallback: vec!["answer incomplete".into()],
        retry_after_secs: None,
    })
}

/// The answer as Responses events, each named by its `type`. A client that goes away drops `rx`, which
/// cancels routing and the engine.
fn event_stream(
    state: &AppState,
    echo: Echo,
    first: Output,
    mut rx: mpsc::Receiver<Output>,
) -> Response {
    let (tx, out) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let mut events = EventStream::new(echo);
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
            for data in evs {
                let name = data["type"].as_str().unwrap_or("message").to_string();
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
        .keep_alive(
            KeepAlive::new()
                .interval(state.keep_alive)
                .text("keep-alive"),
        )
        .into_response()
}
