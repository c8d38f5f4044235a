//! Server-sent events in OpenAI's chunk format: a role chunk, content / reasoning / tool-call deltas, a final
//! chunk with `finish_reason` and `_routing`, when asked (`stream_options.include_usage`) one more chunk with
//! `"choices": []` and `usage` (the only place usage appears, so a client adding it up counts it once), then
//! `data: [DONE]`. Keep-alive comments flow while a
//! cold tier wakes up. A failure after the stream started becomes an `error` event (the status is already
//! sent), never a silent truncation.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use jemma_router::api::{
    ChatCompletionChunk, ChoiceLogprobs, ChunkChoice, CompletionLogprobs, Delta, FunctionCallDelta,
    FunctionType, TextChoice, TextCompletion, TextOffsets, ToolCallDelta,
};
use jemma_router::backend::{Chunk, FinishReason};
use jemma_router::route::Output;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::ApiError;
use crate::ids::{call_id, completion_id, now_secs};

struct Ctx {
    id: String,
    created: u64,
    model: String,
    tool_index: usize,
}

impl Ctx {
    fn chunk(&self, delta: Delta, finish: Option<FinishReason>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish,
                ..Default::default()
            }],
            usage: None,
            routing: None,
        }
    }
}

fn data(v: &impl serde::Serialize) -> Event {
    Event::default().data(serde_json::to_string(v).unwrap_or_default())
}

/// What a stream's renderer makes of one router output.
enum Rendered {
    /// Send these events and go on.
    Send(Vec<Event>),
    /// Nothing to send for this output.
    Skip,
    /// Send these events, then `[DONE]`, and stop.
    End(Vec<Event>),
}

/// The shared SSE loop: `prelude` first, then each router output through `render`; waiting becomes a
/// keep-alive comment, errors (and an early end) an OpenAI error event; always closed by `[DONE]`. A client
/// that goes away stops the loop, which drops `rx` and so cancels routing and the engine.
fn sse_loop<F>(
    keep_alive: Duration,
    prelude: Vec<Event>,
    first: Output,
    mut rx: mpsc::Receiver<Output>,
    mut render: F,
) -> Response
where
    F: FnMut(Output) -> Rendered + Send + 'static,
{
    let (tx, out) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        for ev in prelude {
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
        }
        let mut next = Some(first);
        loop {
            let o = next_output(&mut next, &mut rx).await;
            let (events, end) = match o {
                Output::Waiting => (vec![Event::default().comment("waiting for a tier")], false),
                Output::Error(e) => (vec![data(&ApiError(e).body())], true),
                other => match render(other) {
                    Rendered::Send(v) => (v, false),
                    Rendered::Skip => continue,
                    Rendered::End(v) => (v, true),
                },
            };
            for ev in events {
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            if end {
                let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
                return;
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out))
        .keep_alive(KeepAlive::new().interval(keep_alive).text("keep-alive"))
        .into_response()
}

/// Turns router output into a chat-completion SSE response. `first` was already received by the handler.
pub fn stream_response(
    keep_alive: Duration,
    model: String,
    include_usage: bool,
    first: Output,
    rx: mpsc::Receiver<Output>,
) -> Response {
    let mut ctx = Ctx {
        id: completion_id(),
        created: now_secs(),
        model,
        tool_index: 0,
    };
    let prelude = vec![data(&ctx.chunk(
        Delta {
            role: Some("assistant".into()),
            content: Some(String::new()),
            ..Default::default()
        },
        None,
    ))];
    sse_loop(keep_alive, prelude, first, rx, move |o| match o {
        Output::Chunk(Chunk::Content(c)) => Rendered::Send(vec![data(&ctx.chunk(
            Delta {
                content: Some(c),
                ..Default::default()
            },
            None,
        ))]),
        Output::Chunk(Chunk::Reasoning(r)) => Rendered::Send(vec![data(&ctx.chunk(
            Delta {
                reasoning_content: Some(r),
                ..Default::default()
            },
            None,
        ))]),
        Output::Chunk(Chunk::ToolCall { name, arguments }) => {
            let index = ctx.tool_index as u32;
            ctx.tool_index += 1;
            let call = ToolCallDelta {
                index,
                id: Some(call_id()),
                kind: Some(FunctionType::Function),
                function: Some(FunctionCallDelta {
                    name: Some(name),
                    arguments: Some(arguments),
                }),
            };
            Rendered::Send(vec![data(&ctx.chunk(
                Delta {
                    tool_calls: Some(vec![call]),
                    ..Default::default()
                },
                None,
            ))])
        }
        // Only to another Jemma node (the router passes it on to no one else): a chunk with nothing in
        // it, which that node reads as progress for its deadlines.
        Output::Chunk(Chunk::Progress) => {
            Rendered::Send(vec![data(&ctx.chunk(Delta::default(), None))])
        }
        Output::Chunk(Chunk::Logprobs(l)) => {
            let mut c = ctx.chunk(Delta::default(), None);
            c.choices[0].logprobs = Some(ChoiceLogprobs { content: Some(l) });
            Rendered::Send(vec![data(&c)])
        }
        Output::End {
            finish_reason,
            usage,
            routing,
            ..
        } => {
            ctx.model = routing.model.clone();
            let finish = answer_finish(finish_reason, ctx.tool_index > 0);
            let mut c = ctx.chunk(Delta::default(), Some(finish));
            c.routing = Some(routing);
            let mut v = vec![data(&c)];
            if include_usage {
                let mut u = ctx.chunk(Delta::default(), None);
                u.choices.clear();
                u.usage = Some(usage);
                v.push(data(&u));
            }
            Rendered::End(v)
        }
        _ => Rendered::Skip,
    })
}

/// The finish reason a response states: `tool_calls` if and only if it carries tool calls (a backend that
/// says `tool_calls` with none parsed answered `stop`; one that returned calls under another reason, such
/// as an upstream's `stop`, called tools). `length` and `content_filter` stand: a call may have been cut.
pub fn answer_finish(reason: FinishReason, has_calls: bool) -> FinishReason {
    match (reason, has_calls) {
        (FinishReason::ToolCalls, false) => FinishReason::Stop,
        (FinishReason::Stop, true) => FinishReason::ToolCalls,
        (r, _) => r,
    }
}

/// What a `/v1/completions` answer holds besides its text: the prompt first (`echo`), and each token's
/// log-probabilities with this many alternatives (`logprobs`), offsets counted from the prompt's start.
#[derive(Debug, Clone)]
pub struct CompletionShape {
    /// The request's prompt.
    pub prompt: String,
    /// Whether the text starts with the prompt.
    pub echo: bool,
    /// `logprobs`: alternatives per token (None: no log-probabilities).
    pub top_logprobs: Option<usize>,
}

/// SSE for `/v1/completions`: `text_completion` chunks, a final chunk with `finish_reason` and `_routing`,
/// then, when `stream_options.include_usage` asks for it, one chunk with `"choices": []` and `usage` (as
/// OpenAI sends it: usage nowhere else), then `[DONE]`. Chunks carry `model` (the requested name, as chat
/// chunks do; the final one the answering tier's model, as in `_routing`).
pub fn completion_stream(
    keep_alive: Duration,
    model: String,
    include_usage: bool,
    first: Output,
    rx: mpsc::Receiver<Output>,
    shape: CompletionShape,
) -> Response {
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let created = now_secs();
    let chunk = move |text: &str, finish: Option<FinishReason>, model: &str| TextCompletion {
        id: id.clone(),
        object: "text_completion".into(),
        created,
        model: model.to_string(),
        choices: vec![TextChoice {
            index: 0,
            text: text.to_string(),
            finish_reason: finish,
            logprobs: None,
        }],
        usage: None,
        routing: None,
    };
    // `echo`: the prompt comes first, in a chunk of its own.
    let prelude = if shape.echo {
        vec![data(&chunk(&shape.prompt, None, &model))]
    } else {
        vec![]
    };
    let mut offsets = TextOffsets::after(&shape.prompt);
    sse_loop(keep_alive, prelude, first, rx, move |o| match o {
        Output::Chunk(Chunk::Content(c)) => Rendered::Send(vec![data(&chunk(&c, None, &model))]),
        // Only to another Jemma node: an empty piece, read there as progress.
        Output::Chunk(Chunk::Progress) => Rendered::Send(vec![data(&chunk("", None, &model))]),
        // The tokens' log-probabilities in a chunk of their own, as chat streams send them.
        Output::Chunk(Chunk::Logprobs(l)) => match shape.top_logprobs {
            Some(n) => {
                let lp = CompletionLogprobs::from_chat(&l, n, &mut offsets);
                let mut c = chunk("", None, &model);
                c.choices[0].logprobs = Some(lp);
                Rendered::Send(vec![data(&c)])
            }
            None => Rendered::Skip,
        },
        Output::End {
            finish_reason,
            usage,
            routing,
            ..
        } => {
            let mut c = chunk("", Some(finish_reason), &routing.model);
            let mut u = chunk("", None, &routing.model);
            c.routing = Some(routing);
            let mut v = vec![data(&c)];
            if include_usage {
                u.choices.clear();
                u.usage = Some(usage);
                v.push(data(&u));
            }
            Rendered::End(v)
        }
        _ => Rendered::Skip,
    })
}

/// Reads a JSON body of at most `max_bytes` into `T`: an oversize body is [`RouterError::TooLarge`], a
/// malformed one [`RouterError::InvalidRequest`] whose `param` names the field that does not fit (the
/// whole path, e.g. `messages[2].content[1]`), so that each API answers in its own error shape.
///
/// [`RouterError::TooLarge`]: jemma_router::RouterError::TooLarge
/// [`RouterError::InvalidRequest`]: jemma_router::RouterError::InvalidRequest
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    body: axum::body::Body,
    max_bytes: usize,
) -> Result<T, jemma_router::RouterError> {
    use jemma_router::RouterError;
    let bytes = axum::body::to_bytes(body, max_bytes).await.map_err(|_| {
        RouterError::too_large(format!("request body exceeds {max_bytes} bytes"), None)
    })?;
    parse_json(&bytes)
}

/// `message` with any quoted value longer than 80 characters cut short: serde quotes the value it could
/// not take, which for a media part is megabytes of base64 the error must not send back.
fn shortened(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(1024));
    let mut rest = message;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('"') else {
            rest = after;
            break;
        };
        let quoted = &after[..close];
        if quoted.chars().count() > 80 {
            out.extend(quoted.chars().take(60));
            out.push_str(&format!("… ({} characters)", quoted.chars().count()));
        } else {
            out.push_str(quoted);
        }
        out.push('"');
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// [`read_json`]'s parsing: a syntax error is `invalid JSON body`; a body of the wrong shape names the
/// field's path (values the message quotes are cut short).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, jemma_router::RouterError> {
    use jemma_router::RouterError;
    use jemma_router::api::message::{join_path, split_path};
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let syntax = |e: &serde_json::Error| RouterError::InvalidRequest {
        message: format!("invalid JSON body: {e}"),
        param: None,
    };
    let e = match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => return de.end().map(|()| v).map_err(|e| syntax(&e)),
        Err(e) => e,
    };
    if e.inner().is_syntax() || e.inner().is_eof() {
        return Err(syntax(e.inner()));
    }
    let full = join_path(&e.path().to_string(), &shortened(&e.inner().to_string()));
    let (param, message) = match split_path(&full) {
        Some((p, m)) => (Some(p.to_string()), format!("{p}: {m}")),
        None => (None, full.clone()),
    };
    Err(RouterError::InvalidRequest { message, param })
}

/// The router's first output, awaited before a stream commits to a 200: a failure before any token
/// (no tier, busy, a bad request) keeps its own status.
pub(crate) async fn first_output(
    rx: &mut mpsc::Receiver<Output>,
) -> Result<Output, jemma_router::RouterError> {
    match rx.recv().await {
        Some(Output::Error(e)) => Err(e),
        None => Err(jemma_router::RouterError::AllTiersDown {
            fallback: vec![],
            retry_after_secs: None,
        }),
        Some(first) => Ok(first),
    }
}

/// How a whole (not streamed) answer ended: `Output::End`'s fields.
pub(crate) struct Ended {
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Token usage.
    pub usage: jemma_router::api::Usage,
    /// Routing metadata.
    pub routing: jemma_router::api::Routing,
    /// The stop string that ended it, when one did.
    pub stop_sequence: Option<String>,
}

/// Reads a whole answer for a non-streamed response: each chunk goes to `on_chunk`, in order, and the
/// end comes back. Errors: the router's error; a stream that closes without an end is a 503
/// ("answer incomplete"), never a short answer passed off as whole.
pub(crate) async fn collect(
    rx: &mut mpsc::Receiver<Output>,
    mut on_chunk: impl FnMut(Chunk),
) -> Result<Ended, jemma_router::RouterError> {
    while let Some(o) = rx.recv().await {
        match o {
            Output::Chunk(c) => on_chunk(c),
            Output::Waiting => {}
            Output::Error(e) => return Err(e),
            Output::End {
                finish_reason,
                usage,
                routing,
                stop_sequence,
            } => {
                return Ok(Ended {
                    finish_reason,
                    usage,
                    routing,
                    stop_sequence,
                });
            }
        }
    }
    Err(incomplete("answer incomplete"))
}

/// The output held back in `next` (the first, awaited before the 200), else the router's next one; a
/// router stream that closes without an end is an error, never a short answer passed off as whole.
async fn next_output(next: &mut Option<Output>, rx: &mut mpsc::Receiver<Output>) -> Output {
    match next.take() {
        Some(o) => o,
        None => rx
            .recv()
            .await
            .unwrap_or_else(|| Output::Error(incomplete("stream ended early"))),
    }
}

/// The 503 of an answer whose router stream closed before its end (`why` says where).
fn incomplete(why: &str) -> jemma_router::RouterError {
    jemma_router::RouterError::AllTiersDown {
        fallback: vec![why.into()],
        retry_after_secs: None,
    }
}

/// Server-sent events named by their type (Anthropic's Messages and OpenAI's Responses streams): `render`
/// turns each router output into `(event name, data)` pairs and says when the stream is complete. An early
/// end of the router's stream is rendered as the error it is. A client that goes away drops `rx`, which
/// cancels routing and the engine.
pub(crate) fn named_events<F>(
    keep_alive: Duration,
    keep_alive_text: &'static str,
    first: Output,
    mut rx: mpsc::Receiver<Output>,
    mut render: F,
) -> Response
where
    F: FnMut(Output) -> (Vec<(String, Value)>, bool) + Send + 'static,
{
    let (tx, out) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let mut next = Some(first);
        loop {
            let o = next_output(&mut next, &mut rx).await;
            let (events, done) = render(o);
            for (name, data) in events {
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
        .keep_alive(KeepAlive::new().interval(keep_alive).text(keep_alive_text))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_shape_is_named_without_sending_the_upload_back() {
        let data = "A".repeat(100_000);
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"video_url","video_url":"data:video/mp4;base64,{data}"}}]}}]}}"#
        );
        let err =
            parse_json::<jemma_router::api::ChatCompletionRequest>(body.as_bytes()).unwrap_err();
        let jemma_router::RouterError::InvalidRequest { message, param } = err else {
            panic!("not a 400: {err:?}");
        };
        assert!(message.len() < 400, "{} bytes of message", message.len());
        assert!(message.contains("characters)"), "{message}");
        assert_eq!(
            param.as_deref(),
            Some("messages[0].content[0]"),
            "{message}"
        );
        assert_eq!(shortened(r#"x "short" y"#), r#"x "short" y"#);
    }
}
