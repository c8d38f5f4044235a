//! Server-sent events in OpenAI's chunk format: a role chunk, content / reasoning / tool-call deltas, a final
//! chunk with `finish_reason`, `usage` and `_routing`, then `data: [DONE]`. Keep-alive comments flow while a
//! cold tier wakes up. A failure after the stream started becomes an `error` event (the status is already
//! sent), never a silent truncation.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use jemma_router::backend::Chunk;
use jemma_router::route::Output;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::ApiError;
use crate::handlers::{call_id, completion_id, now_secs};

struct Ctx {
    id: String,
    created: u64,
    model: String,
    tool_index: usize,
}

impl Ctx {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        })
    }
}

fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

/// Turns router output into an SSE response. `first` was already received by the handler.
pub fn stream_response(
    keep_alive: Duration,
    model: String,
    include_usage: bool,
    first: Output,
    mut rx: mpsc::Receiver<Output>,
) -> Response {
    let (tx, out) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let mut ctx = Ctx {
            id: completion_id(),
            created: now_secs(),
            model,
            tool_index: 0,
        };
        if tx
            .send(Ok(data(
                &ctx.chunk(json!({"role": "assistant", "content": ""}), None),
            )))
            .await
            .is_err()
        {
            return;
        }
        let mut next = Some(first);
        loop {
            let o = match next.take() {
                Some(o) => o,
                None => match rx.recv().await {
                    Some(o) => o,
                    None => {
                        let err = ApiError(jemma_router::RouterError::AllTiersDown {
                            fallback: vec!["stream ended early".into()],
                        });
                        let _ = tx.send(Ok(data(&err.body()))).await;
                        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
                        return;
                    }
                },
            };
            let ev = match o {
                Output::Waiting => Event::default().comment("waiting for a tier"),
                Output::Chunk(Chunk::Content(c)) => data(&ctx.chunk(json!({"content": c}), None)),
                Output::Chunk(Chunk::Reasoning(r)) => {
                    data(&ctx.chunk(json!({"reasoning_content": r}), None))
                }
                Output::Chunk(Chunk::ToolCall { name, arguments }) => {
                    let i = ctx.tool_index;
                    ctx.tool_index += 1;
                    data(&ctx.chunk(
                        json!({"tool_calls": [{"index": i, "id": call_id(), "type": "function",
                            "function": {"name": name, "arguments": arguments}}]}),
                        None,
                    ))
                }
                Output::Chunk(Chunk::Logprobs(l)) => {
                    let mut c = ctx.chunk(json!({}), None);
                    c["choices"][0]["logprobs"] = json!({"content": l});
                    data(&c)
                }
                Output::Chunk(Chunk::Started { .. }) | Output::Chunk(Chunk::Done { .. }) => {
                    continue;
                }
                Output::End {
                    finish_reason,
                    usage,
                    routing,
                } => {
                    ctx.model = routing.model.clone();
                    let mut c = ctx.chunk(json!({}), Some(&finish_reason));
                    c["usage"] = json!(usage);
                    c["_routing"] = json!(routing);
                    let _ = tx.send(Ok(data(&c))).await;
                    if include_usage {
                        let mut u = ctx.chunk(json!({}), None);
                        u["choices"] = json!([]);
                        u["usage"] = json!(usage);
                        let _ = tx.send(Ok(data(&u))).await;
                    }
                    let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
                    return;
                }
                Output::Error(e) => {
                    let _ = tx.send(Ok(data(&ApiError(e).body()))).await;
                    let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
                    return;
                }
            };
            if tx.send(Ok(ev)).await.is_err() {
                // Client disconnected: dropping `rx` cancels routing and the engine.
                return;
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out))
        .keep_alive(KeepAlive::new().interval(keep_alive).text("keep-alive"))
        .into_response()
}

/// SSE for `/v1/completions`: `text_completion` chunks, a final chunk with `finish_reason`, `usage` and
/// `_routing`, then `[DONE]`.
pub fn completion_stream(
    keep_alive: Duration,
    first: Output,
    mut rx: mpsc::Receiver<Output>,
) -> Response {
    let (tx, out) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
        let created = now_secs();
        let chunk = |text: &str, finish: Option<&str>, model: &str| {
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}]})
        };
        let mut next = Some(first);
        loop {
            let o = match next.take() {
                Some(o) => o,
                None => match rx.recv().await {
                    Some(o) => o,
                    None => return,
                },
            };
            let ev = match o {
                Output::Waiting => Event::default().comment("waiting for a tier"),
                Output::Chunk(Chunk::Content(c)) => data(&chunk(&c, None, "")),
                Output::Chunk(_) => continue,
                Output::End {
                    finish_reason,
                    usage,
                    routing,
                } => {
                    let mut c = chunk("", Some(&finish_reason), &routing.model);
                    c["usage"] = json!(usage);
                    c["_routing"] = json!(routing);
                    let _ = tx.send(Ok(data(&c))).await;
                    let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
                    return;
                }
                Output::Error(e) => {
                    let _ = tx.send(Ok(data(&ApiError(e).body()))).await;
                    let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
                    return;
                }
            };
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out))
        .keep_alive(KeepAlive::new().interval(keep_alive).text("keep-alive"))
        .into_response()
}
