//! The one test double for [`Backend`] (feature `testing`, for tests only): [`Scripted`], a backend that
//! does what its [`Script`] says on each call and counts what it was asked. The router's tests script
//! failures, hangs and throttling with it; the gateway's tests use [`Script::Echo`], an answer built from
//! the request. Like tensorzero's dummy provider, one double serves every crate's tests, so a change to the
//! [`Backend`] contract is made in one place.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::api::{ChatRequest, Usage};
use crate::backend::{
    Backend, BackendError, BackendHealth, BackendState, Chunk, ChunkStream, FinishReason, Modality,
};
use crate::dialect::Dialect;

/// What a [`Scripted`] backend does on each call.
#[derive(Clone, Debug)]
pub enum Script {
    /// Answers with these pieces (3 prompt tokens, one completion token per piece, `stop`).
    Answer(Vec<&'static str>),
    /// Answers with the request's last user message, one piece per word, then a call of `lookup` with
    /// `{"q":1}` (5 prompt tokens, 2 completion tokens, `tool_calls`, 99 tok/s): every kind of chunk a
    /// front end renders.
    Echo,
    /// Fails before any token with a 500.
    Fail,
    /// Fails before any token with a 503 that says when to come back (an upstream's `Retry-After`, s).
    FailRetryAfter(u64),
    /// Sends these pieces, then breaks (a connection reset mid-stream).
    BreakAfter(Vec<&'static str>),
    /// Starts, then never answers; counts the stream's cancellation when the caller drops it.
    Hang,
    /// Writes a call of `lookup` with `{"q":1}` slowly, as a model writing a long call: `held` tokens whose
    /// text is held back ([`Chunk::Progress`]) `every_ms` apart, then the call (`tool_calls`).
    HeldCall {
        /// Tokens before the call closes.
        held: u64,
        /// Milliseconds between two of them.
        every_ms: u64,
    },
    /// Refuses with a 429 that says when to come back (s).
    Throttle(u64),
    /// Refuses before anything is sent, as an upstream whose dialect does not read the request's first
    /// field that OpenAI lacks ([`BackendError::Unread`]); answers a request with none with its name.
    Unread,
}

/// A backend that follows its [`Script`] and records its calls. Its fields are what tests read and set.
pub struct Scripted {
    /// The model name it reports (and answers as).
    pub name: &'static str,
    script: Mutex<Script>,
    /// Calls of [`Backend::start`].
    pub calls: AtomicUsize,
    /// The continuation each call was given (None: a fresh answer).
    pub continuations: Mutex<Vec<Option<String>>>,
    /// Streams of [`Script::Hang`] that the caller dropped.
    pub cancelled: Arc<AtomicUsize>,
    /// What it says it runs at once ([`Backend::capacity`]; None: does not say).
    pub capacity: Mutex<Option<usize>>,
    /// Whether its health (and so a pool's probe of it) says it serves.
    pub up: AtomicBool,
    /// Whether it stands for another Jemma node ([`Backend::is_peer`]).
    pub peer: AtomicBool,
    /// What its model takes in, as `/health` lists it (empty: not known).
    pub modalities: Mutex<Vec<Modality>>,
    /// Whether its model has a chat template, as `/health` says (None: not known).
    pub chat: Mutex<Option<bool>>,
    /// The upstream dialect its health reports (None: not known, or an in-process engine).
    pub dialect: Mutex<Option<Dialect>>,
}

/// A validated chat request to `model` whose one user message is `text`, with `extra` (a JSON object)
/// added to the body as a client would send it.
///
/// Errors: a body the API refuses, as the gateway would answer it.
pub fn chat_request(
    model: &str,
    text: &str,
    extra: serde_json::Value,
) -> Result<ChatRequest, crate::RouterError> {
    let mut body =
        serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    serde_json::from_value::<crate::api::ChatCompletionRequest>(body)
        .map_err(|e| crate::RouterError::invalid(e.to_string(), "body"))?
        .validate(&crate::api::Limits::default())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Scripted {
    /// A backend named `name` that follows `script`, up and not a peer.
    pub fn new(name: &'static str, script: Script) -> Arc<Self> {
        Arc::new(Self {
            name,
            script: Mutex::new(script),
            calls: AtomicUsize::new(0),
            continuations: Mutex::new(vec![]),
            cancelled: Arc::new(AtomicUsize::new(0)),
            capacity: Mutex::new(None),
            up: AtomicBool::new(true),
            peer: AtomicBool::new(false),
            modalities: Mutex::new(vec![]),
            chat: Mutex::new(None),
            dialect: Mutex::new(None),
        })
    }

    /// Says it is an upstream speaking `dialect` (as its `/health` would); returns it.
    pub fn speaking(self: Arc<Self>, dialect: Dialect) -> Arc<Self> {
        *lock(&self.dialect) = Some(dialect);
        self
    }

    /// Says its model is a base model, with no chat template (as its `/health` would); returns it.
    pub fn base_model(self: Arc<Self>) -> Arc<Self> {
        *lock(&self.chat) = Some(false);
        self
    }

    /// Says its model takes `modalities` (as its `/health` would list them); returns it, for chaining.
    pub fn taking(self: Arc<Self>, modalities: &[Modality]) -> Arc<Self> {
        *lock(&self.modalities) = modalities.to_vec();
        self
    }

    /// Replaces the script for the next calls.
    pub fn set(&self, s: Script) {
        *lock(&self.script) = s;
    }
}

fn done(finish_reason: FinishReason, prompt: u64, completion: u64, tps: f64) -> Chunk {
    Chunk::Done {
        stop_sequence: None,
        served_by: None,
        speculative: None,
        finish_reason,
        usage: Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: None,
            completion_tokens_details: None,
        },
        decode_tps: Some(tps),
    }
}

#[async_trait]
impl Backend for Scripted {
    fn model(&self) -> String {
        self.name.into()
    }

    async fn start(
        &self,
        req: &ChatRequest,
        continuation: Option<&str>,
    ) -> Result<ChunkStream, BackendError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        lock(&self.continuations).push(continuation.map(String::from));
        let script = lock(&self.script).clone();
        let refusal = |status: u16, message: &str, retry_after_secs| BackendError::Upstream {
            status,
            message: message.into(),
            retry_after_secs,
        };
        match script {
            Script::Fail => return Err(refusal(500, "boom", None)),
            Script::FailRetryAfter(secs) => return Err(refusal(503, "overloaded", Some(secs))),
            Script::Throttle(secs) => return Err(refusal(429, "slow down", Some(secs))),
            Script::Unread => {
                if let Some(field) = crate::dialect::extension_fields(req).first() {
                    return Err(BackendError::Unread(crate::RouterError::invalid(
                        format!("{field}: this tier's upstream does not read it"),
                        field,
                    )));
                }
            }
            _ => {}
        }
        let (tx, rx) = mpsc::channel(8);
        let cancelled = self.cancelled.clone();
        let last_user = req.last_user.clone();
        let name = self.name;
        tokio::spawn(async move {
            let prompt_tokens = if matches!(script, Script::Echo) { 5 } else { 3 };
            let _ = tx
                .send(Ok(Chunk::Started {
                    prompt_tokens,
                    cached_tokens: 0,
                    videos: vec![],
                }))
                .await;
            match script {
                Script::Answer(pieces) => {
                    for p in &pieces {
                        let _ = tx.send(Ok(Chunk::Content(p.to_string()))).await;
                    }
                    let n = pieces.len() as u64;
                    let _ = tx.send(Ok(done(FinishReason::Stop, 3, n, 10.0))).await;
                }
                Script::Echo => {
                    for w in last_user.split_inclusive(' ') {
                        let _ = tx.send(Ok(Chunk::Content(w.to_string()))).await;
                    }
                    let call = Chunk::ToolCall {
                        name: "lookup".into(),
                        arguments: "{\"q\":1}".into(),
                    };
                    let _ = tx.send(Ok(call)).await;
                    let _ = tx.send(Ok(done(FinishReason::ToolCalls, 5, 2, 99.0))).await;
                }
                Script::BreakAfter(pieces) => {
                    for p in pieces {
                        let _ = tx.send(Ok(Chunk::Content(p.to_string()))).await;
                    }
                    let broken = BackendError::Broken("connection reset".into());
                    let _ = tx.send(Err(broken)).await;
                }
                Script::HeldCall { held, every_ms } => {
                    for _ in 0..held {
                        tokio::time::sleep(std::time::Duration::from_millis(every_ms)).await;
                        if tx.send(Ok(Chunk::Progress)).await.is_err() {
                            return;
                        }
                    }
                    let call = Chunk::ToolCall {
                        name: "lookup".into(),
                        arguments: "{\"q\":1}".into(),
                    };
                    let _ = tx.send(Ok(call)).await;
                    let _ = tx
                        .send(Ok(done(FinishReason::ToolCalls, 3, held + 1, 10.0)))
                        .await;
                }
                Script::Hang => {
                    tx.closed().await;
                    cancelled.fetch_add(1, Ordering::SeqCst);
                }
                Script::Unread => {
                    let _ = tx.send(Ok(Chunk::Content(name.to_string()))).await;
                    let _ = tx.send(Ok(done(FinishReason::Stop, 3, 1, 10.0))).await;
                }
                // Refusals returned above.
                Script::Fail | Script::FailRetryAfter(_) | Script::Throttle(_) => {}
            }
        });
        Ok(rx)
    }

    fn capacity(&self) -> Option<usize> {
        *lock(&self.capacity)
    }

    fn is_peer(&self) -> bool {
        self.peer.load(Ordering::SeqCst)
    }

    fn health(&self) -> BackendHealth {
        BackendHealth {
            state: if self.up.load(Ordering::SeqCst) {
                BackendState::Ready
            } else {
                BackendState::Unreachable
            },
            model: self.name.into(),
            model_loaded: true,
            input_modalities: lock(&self.modalities).clone(),
            chat: *lock(&self.chat),
            dialect: *lock(&self.dialect),
            ..Default::default()
        }
    }
}
