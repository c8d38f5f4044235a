//! The model host: one thread owns the model (MLX arrays and llama.cpp contexts are not meant to hop between
//! threads), requests arrive over a bounded queue, events stream back over a bounded channel per request,
//! and a dropped receiver cancels its request at the next event. Around that, the lifecycle every engine
//! shares: preload or lazy load, the memory-budget reservation before a byte is read, unload after the
//! idle keep-alive or when the memory governor asks, and a transparent reload at the next request.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use jemma_chat::event::{EngineFailure, Event};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::memory::MemoryGovernor;

/// Where the host's model is in its life.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum EngineState {
    /// Loading weights.
    Loading {
        /// Share of the weights read (0 to 1).
        progress: f32,
    },
    /// Serving.
    Ready,
    /// Not in memory (lazy, idle keep-alive, memory pressure, or a refused load); the next request loads it.
    Unloaded,
    /// Loading failed for good.
    Failed {
        /// Why.
        error: String,
    },
}

/// Live figures of a host for `/health`, `/metrics` and the tray; `info` holds the engine's own figures
/// (flattened into the same JSON object).
#[derive(Debug, Clone, Serialize)]
pub struct Status<I> {
    /// State.
    #[serde(flatten)]
    pub state: EngineState,
    /// Model name.
    pub model: String,
    /// Requests completed.
    pub requests: u64,
    /// Tokens generated in total.
    pub generated_tokens: u64,
    /// Prompt tokens of all completed requests.
    pub prompt_tokens: u64,
    /// Of those, the ones served from the prefix cache (the hit rate is their share).
    pub cached_prompt_tokens: u64,
    /// Decode speed of the last request, tokens/s.
    pub last_decode_tps: f64,
    /// Prefill speed of the last request, tokens/s.
    pub last_prefill_tps: f64,
    /// Requests waiting for the model thread.
    pub queued: usize,
    /// Requests in the running batch.
    pub running: usize,
    /// Requests the running batch may hold (0 until the model is loaded).
    pub max_sequences: usize,
    /// Context length served, tokens (0 until known).
    pub context_length: usize,
    /// The last load problem (e.g. a refusal for lack of memory); cleared by a successful load.
    pub last_error: Option<String>,
    /// The engine's own figures.
    #[serde(flatten)]
    pub info: I,
}

/// Settings of a host.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Model name (status, logs, the memory budget's ledger).
    pub name: String,
    /// Name of the model thread.
    pub thread_name: String,
    /// Requests that may wait for the model thread before submissions are refused.
    pub queue_capacity: usize,
    /// Events buffered per request before the model thread waits for the consumer.
    pub event_buffer: usize,
    /// Release the model after this long without a request (None: keep it loaded).
    pub keep_alive: Option<Duration>,
    /// Load at start (true) or at the first request (false).
    pub preload: bool,
    /// The process-wide memory budget the model's footprint is reserved from (None: no check).
    pub memory: Option<Arc<MemoryGovernor>>,
    /// Cancel a running request whose client has taken none of its events for this long (engines use
    /// [`STALL_TIMEOUT`]).
    pub stall_timeout: Duration,
}

/// Why a load did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// Not now (not enough memory): the host stays unloaded and tries again at the next request.
    #[error("{0}")]
    Refused(String),
    /// The model cannot be loaded (missing or broken files, unsupported architecture).
    #[error("{0}")]
    Failed(String),
}

/// Reports a load's progress (share of the weights read, 0 to 1).
pub type Progress = Arc<dyn Fn(f32) + Send + Sync>;

/// What a finished request adds to the host's figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Of those, the ones served from the prefix cache.
    pub cached_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prefill speed, tokens/s.
    pub prefill_tps: f64,
    /// Decode speed, tokens/s.
    pub decode_tps: f64,
}

/// What one step did for one sequence: the events it produced, in order, and, when the sequence ended, its
/// outcome (the host sends the final [`Event::Done`] or [`Event::Error`] itself, after these events).
#[derive(Debug)]
pub struct SeqOutput<S> {
    /// Events for the client (`Started`, text, logprobs, tool calls), in order.
    pub events: Vec<Event<S>>,
    /// Set when the sequence ended: its summary, or why it failed.
    pub end: Option<Result<S, EngineFailure>>,
}

impl<S> Default for SeqOutput<S> {
    fn default() -> Self {
        Self {
            events: vec![],
            end: None,
        }
    }
}

impl<S> SeqOutput<S> {
    /// Queues an event.
    pub fn send(&mut self, event: impl Into<Event<S>>) {
        self.events.push(event.into());
    }

    /// Ends the sequence with its summary.
    pub fn finish(&mut self, summary: S) {
        self.end = Some(Ok(summary));
    }

    /// Ends the sequence with a failure.
    pub fn fail(&mut self, failure: impl Into<EngineFailure>) {
        self.end = Some(Err(failure.into()));
    }
}

/// An engine as the host drives it: the model-runner half of the scheduler / model-runner split
/// (vLLM's `ModelRunner`, text-generation-inference's backend, mistral.rs's pipeline). The host owns
/// admission, the running batch, cancellation and the lifecycle; the runner owns the model and one cache
/// per sequence, and advances a batch of sequences one step at a time — prompt chunks for sequences still
/// reading their prompts (how many per step is the engine's choice), one token for each decoding one. Every method runs on the model thread.
pub trait ModelRunner: Send + 'static {
    /// What loading produces; lives on the model thread only.
    type Model;
    /// A request as this engine takes it.
    type Request: Send + 'static;
    /// The final summary of a request (sent as [`Event::Done`]).
    type Summary: Send + 'static;
    /// The engine's own status figures.
    type Info: Clone + Send + Serialize + 'static;
    /// One admitted request: its cache slot, sampler and decoding state. Lives on the model thread only.
    type Sequence;

    /// Called once on the model thread before anything else (e.g. to pick the thread's default device).
    fn init(&mut self) {}

    /// Bytes the next load will take (weights plus caches at the served context), reserved from the memory
    /// budget before a byte is read; may record what it estimated in `info`. `Ok(None)`: no estimate.
    fn plan(&mut self, info: &mut Self::Info) -> Result<Option<u64>, LoadError>;

    /// After the memory budget refused what [`ModelRunner::plan`] asked for: the bytes of a smaller plan
    /// (fewer sequences decoded together, each with its cache), which the host tries next; None when there
    /// is none (the load is refused). A default of several sequences thus never stops a model that fits
    /// with one from loading.
    fn shrink(&mut self, info: &mut Self::Info) -> Option<u64> {
        let _ = info;
        None
    }

    /// Loads the model, reporting the share read (0 to 1) through `progress` (shareable, so that an
    /// engine's own `'static` callback can hold it); returns it with the context length it serves (tokens).
    fn load(
        &mut self,
        progress: &Progress,
        info: &mut Self::Info,
    ) -> Result<(Self::Model, usize), LoadError>;

    /// How many sequences may run at once (the batch size); more requests wait in the queue. 1 serves one
    /// request at a time.
    fn max_sequences(&self, model: &Self::Model) -> usize {
        let _ = model;
        1
    }

    /// Admits a request into the running batch: checks it (a refusal here is the client's error or the
    /// engine's fault, and the request ends with it), tokenizes it and gives it a cache slot (one of at most
    /// [`ModelRunner::max_sequences`] in use).
    fn admit(
        &mut self,
        model: &mut Self::Model,
        request: Self::Request,
        context_length: usize,
    ) -> Result<Self::Sequence, EngineFailure>;

    /// Advances each sequence of `batch` by one step, writing what it produced to the `out` entry of the
    /// same index (`out.len() == batch.len()`, each empty on entry). The host passes every running
    /// sequence whose client keeps up, in admission order. An `Err` fails the whole batch (e.g. the engine
    /// ran out of KV cells): each of its sequences ends with that failure.
    fn step(
        &mut self,
        model: &mut Self::Model,
        batch: &mut [&mut Self::Sequence],
        out: &mut [SeqOutput<Self::Summary>],
    ) -> Result<(), EngineFailure>;

    /// Ends a sequence — finished, failed, or cancelled because its client went away — and frees its cache
    /// slot (an engine with a prefix cache keeps what a later request may reuse).
    fn release(&mut self, model: &mut Self::Model, sequence: Self::Sequence) {
        let _ = (model, sequence);
    }

    /// What a summary adds to the host's figures.
    fn tally(summary: &Self::Summary) -> Tally;

    /// Refreshes `info` after a request or an unload (e.g. the device's memory figures).
    fn refresh(&mut self, info: &mut Self::Info) {
        let _ = info;
    }

    /// How many tokens `request`'s prompt takes (its chat template rendered and tokenized, as
    /// [`ModelRunner::admit`] would), without admitting it: Anthropic's `count_tokens`. The default says the
    /// engine cannot.
    fn prompt_tokens(
        &mut self,
        model: &mut Self::Model,
        request: &Self::Request,
    ) -> Result<usize, EngineFailure> {
        let _ = (model, request);
        Err(EngineFailure::InvalidRequest(
            "this engine cannot count prompt tokens".into(),
        ))
    }

    /// Answers a count ([`Host::count`]) on `reply`. By default with [`ModelRunner::prompt_tokens`], here on
    /// the model thread between two steps; an engine whose count needs slow work (preparing media to learn
    /// how many positions they take) overrides it to do that work off the model thread and reply when done,
    /// so that the running streams do not wait for a count.
    fn count(
        &mut self,
        model: &mut Self::Model,
        request: Self::Request,
        reply: oneshot::Sender<Result<usize, EngineFailure>>,
    ) {
        let _ = reply.send(self.prompt_tokens(model, &request));
    }

    /// Releases a model (dropping it by default; engines with caches of their own clear them too).
    fn unload(&mut self, model: Self::Model) {
        drop(model);
    }
}

/// The default of [`HostConfig::stall_timeout`]: how long a running request's client may take none of its
/// events before the request is cancelled: it
/// holds a cache slot that queued requests may be waiting for. Generous (a client that reads slowly is not
/// stalled: any event taken resets it), so only one that holds its stream open without reading is cut.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Submitting failed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full: try later (HTTP 429).
    #[error("the model queue is full")]
    QueueFull,
    /// The engine is not serving (still loading, failed, or shut down).
    #[error("the engine is not available: {0}")]
    Unavailable(String),
}

/// What the queue carries: a request to run, or one whose prompt is only counted.
enum Job<R: ModelRunner> {
    /// Generate: admitted into the running batch.
    Generate {
        request: R::Request,
        events: mpsc::Sender<Event<R::Summary>>,
    },
    /// Count the prompt's tokens ([`ModelRunner::prompt_tokens`]): answered between steps, taking no
    /// sequence slot.
    Count {
        request: R::Request,
        reply: oneshot::Sender<Result<usize, EngineFailure>>,
    },
}

/// The answer to [`Host::count`]: the prompt's tokens, or why they could not be counted.
pub type CountReply = oneshot::Receiver<Result<usize, EngineFailure>>;

/// What the model thread publishes: its status, and whether it has ended. Every change rings `changed`, so
/// a waiter ([`Host::wait_until`], [`Host::wait_ready`], [`Host::shutdown`]) wakes on the change it waits
/// for instead of polling.
struct Shared<I> {
    published: Mutex<Published<I>>,
    changed: Condvar,
}

struct Published<I> {
    status: Status<I>,
    ended: bool,
}

impl<I> Shared<I> {
    fn lock(&self) -> MutexGuard<'_, Published<I>> {
        // A panic while holding the lock leaves plain data behind: still readable.
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the status and wakes every waiter.
    fn update(&self, f: impl FnOnce(&mut Status<I>)) {
        f(&mut self.lock().status);
        self.changed.notify_all();
    }

    /// Reads the status under the lock.
    fn read<T>(&self, f: impl FnOnce(&Status<I>) -> T) -> T {
        f(&self.lock().status)
    }

    /// Blocks until `done` holds of what is published or `limit` passes; true when it held.
    fn wait(&self, limit: Duration, mut done: impl FnMut(&Published<I>) -> bool) -> bool {
        let (guard, timeout) = self
            .changed
            .wait_timeout_while(self.lock(), limit, |p| !done(p))
            .unwrap_or_else(PoisonError::into_inner);
        drop(guard);
        !timeout.timed_out()
    }

    /// Blocks (no limit) until `done` holds, then reads `then` of what is published under the same lock
    /// (nothing can change between the two).
    fn wait_then<T>(
        &self,
        mut done: impl FnMut(&Published<I>) -> bool,
        then: impl FnOnce(&Published<I>) -> T,
    ) -> T {
        let guard = self
            .changed
            .wait_while(self.lock(), |p| !done(p))
            .unwrap_or_else(PoisonError::into_inner);
        then(&guard)
    }

    /// Marks the model thread ended and wakes every waiter.
    fn end(&self) {
        self.lock().ended = true;
        self.changed.notify_all();
    }
}

/// Marks the model thread ended when dropped: when it returns, and also when it unwinds from a panic (a
/// runner that panics while loading must not leave [`Host::wait_ready`] waiting forever).
struct EndOnDrop<I>(Arc<Shared<I>>);

impl<I> Drop for EndOnDrop<I> {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A cheap, clonable handle to a model thread. The thread ends, releasing the model, when every handle is
/// dropped and the requests it accepted are answered.
pub struct Host<R: ModelRunner> {
    jobs: mpsc::Sender<Job<R>>,
    shared: Arc<Shared<R::Info>>,
    event_buffer: usize,
    stopped: watch::Receiver<bool>,
    /// True while the preload at start runs: requests are refused then (the router falls back), while
    /// during a later (lazy or re-) load they wait in the queue.
    preloading: Arc<AtomicBool>,
    /// Requests (not counts) submitted and not yet admitted or refused, whether still in the channel or
    /// taken out of it by the thread to wait for a slot: what `queue_capacity` bounds.
    waiting: Arc<AtomicUsize>,
    queue_capacity: usize,
}

/// Room in the queue for counts beyond `queue_capacity` requests: a full queue of requests does not turn
/// counts away, which the thread answers between steps.
const COUNT_ROOM: usize = 16;

/// Counts answered between two steps at most: each renders and tokenizes a whole prompt on the model
/// thread, so a burst of them (an agent counting before every turn) must not hold up the running streams.
const COUNTS_PER_STEP: usize = 2;

impl<R: ModelRunner> Clone for Host<R> {
    fn clone(&self) -> Self {
        Self {
            jobs: self.jobs.clone(),
            shared: self.shared.clone(),
            event_buffer: self.event_buffer,
            stopped: self.stopped.clone(),
            preloading: self.preloading.clone(),
            waiting: self.waiting.clone(),
            queue_capacity: self.queue_capacity,
        }
    }
}

impl<R: ModelRunner> Host<R> {
    /// Starts the model thread; with `preload` the model loads in the background (see [`Host::status`]).
    ///
    /// Errors: the thread could not be spawned.
    pub fn start(config: HostConfig, runner: R, info: R::Info) -> std::io::Result<Self> {
        let status = Status {
            state: if config.preload {
                EngineState::Loading { progress: 0.0 }
            } else {
                EngineState::Unloaded
            },
            model: config.name.clone(),
            requests: 0,
            generated_tokens: 0,
            prompt_tokens: 0,
            cached_prompt_tokens: 0,
            last_decode_tps: 0.0,
            last_prefill_tps: 0.0,
            queued: 0,
            running: 0,
            max_sequences: 0,
            context_length: 0,
            last_error: None,
            info,
        };
        let shared = Arc::new(Shared {
            published: Mutex::new(Published {
                status,
                ended: false,
            }),
            changed: Condvar::new(),
        });
        let queue_capacity = config.queue_capacity.max(1);
        let (tx, rx) = mpsc::channel(queue_capacity + COUNT_ROOM);
        let waiting = Arc::new(AtomicUsize::new(0));
        let w = waiting.clone();
        let (stopped_tx, stopped) = watch::channel(false);
        let event_buffer = config.event_buffer.max(1);
        let st = shared.clone();
        let preloading = Arc::new(AtomicBool::new(config.preload));
        let pre = preloading.clone();
        std::thread::Builder::new()
            .name(config.thread_name.clone())
            .spawn(move || {
                // Dropped after the thread's state (runner and model) on return and on unwinding.
                let _ended = EndOnDrop(st.clone());
                Thread {
                    config,
                    runner,
                    shared: st,
                    ever_loaded: false,
                    waiting: w,
                    idle_timer: None,
                }
                .run(rx, &pre);
                let _ = stopped_tx.send(true);
            })?;
        Ok(Self {
            jobs: tx,
            shared,
            event_buffer,
            stopped,
            preloading,
            waiting,
            queue_capacity,
        })
    }

    /// A snapshot of the state and figures (never blocks on the model thread).
    pub fn status(&self) -> Status<R::Info> {
        let mut s = self.shared.read(Status::clone);
        s.queued = self.waiting.load(Ordering::Acquire);
        s
    }

    /// Blocks until `done` holds of the status (woken by each change the model thread makes, never
    /// polling) or `limit` passes; true when it held. `queued` is not kept current in what `done` sees
    /// (it is counted by the handles, not the thread). `done` runs under the status lock: it must not call
    /// [`Host::status`].
    pub fn wait_until(&self, limit: Duration, done: impl Fn(&Status<R::Info>) -> bool) -> bool {
        self.shared.wait(limit, |p| done(&p.status))
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver cancels it.
    ///
    /// Errors: [`SubmitError::QueueFull`] when `queue_capacity` requests already wait;
    /// [`SubmitError::Unavailable`] during the preload at start, after a failed load, or once the thread
    /// has stopped. During a lazy load or a reload, requests wait in the queue.
    pub fn submit(
        &self,
        request: R::Request,
    ) -> Result<mpsc::Receiver<Event<R::Summary>>, SubmitError> {
        let (etx, erx) = mpsc::channel(self.event_buffer);
        self.enqueue(Job::Generate {
            request,
            events: etx,
        })?;
        Ok(erx)
    }

    /// Queues a request whose prompt is only tokenized, not run: the reply says how many tokens it takes.
    /// It waits in the same queue as [`Host::submit`]'s requests (loading the model if it is not in
    /// memory) but takes no sequence slot: a full batch does not hold it up.
    ///
    /// Errors: as [`Host::submit`].
    pub fn count(&self, request: R::Request) -> Result<CountReply, SubmitError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(Job::Count { request, reply: tx })?;
        Ok(rx)
    }

    fn enqueue(&self, job: Job<R>) -> Result<(), SubmitError> {
        match self.status().state {
            EngineState::Ready | EngineState::Unloaded => {}
            EngineState::Loading { .. } if !self.preloading.load(Ordering::Acquire) => {}
            EngineState::Loading { .. } => {
                return Err(SubmitError::Unavailable("model is loading".into()));
            }
            EngineState::Failed { error } => return Err(SubmitError::Unavailable(error)),
        }
        let request = matches!(job, Job::Generate { .. });
        if request
            && self
                .waiting
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.queue_capacity).then_some(n + 1)
                })
                .is_err()
        {
            return Err(SubmitError::QueueFull);
        }
        self.jobs.try_send(job).map_err(|e| {
            if request {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
            }
            match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => {
                    SubmitError::Unavailable("engine thread stopped".into())
                }
            }
        })
    }

    /// Resolves when the model thread has ended: every handle was dropped, the requests it had accepted are
    /// answered, and the model's memory is released.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stopped.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Drops this handle and waits (blocking, at most `limit`) for the model thread to end, so that a process
    /// does not exit while that thread still frees the model (MLX's buffers freed during process exit can
    /// corrupt its allocator). True when it ended; it cannot while another handle lives.
    pub fn shutdown(self, limit: Duration) -> bool {
        let shared = self.shared.clone();
        drop(self);
        shared.wait(limit, |p| p.ended)
    }

    /// Waits (blocking) until the model is loaded, unloaded-and-ready-to-load, or failed; for CLIs and
    /// tests. Errors with the failure's message.
    pub fn wait_ready(&self) -> Result<(), String> {
        self.shared.wait_then(
            |p| !matches!(p.status.state, EngineState::Loading { .. }) || p.ended,
            |p| match &p.status.state {
                EngineState::Failed { error } => Err(error.clone()),
                EngineState::Loading { .. } => Err("the model thread ended while loading".into()),
                EngineState::Ready | EngineState::Unloaded => Ok(()),
            },
        )
    }
}

/// The model thread's state.
struct Thread<R: ModelRunner> {
    config: HostConfig,
    runner: R,
    shared: Arc<Shared<R::Info>>,
    /// Whether a load ever succeeded: until one has, a hard failure is final (a broken model), after one
    /// a failed reload is retried at the next request.
    ever_loaded: bool,
    /// The handles' count of requests waiting ([`Host`]'s `waiting`): the thread takes one off as it
    /// admits, refuses or drops a request.
    waiting: Arc<AtomicUsize>,
    /// Waits for the queue while idle, a tick at a time (a current-thread runtime with a timer, built at
    /// the first idle wait; None if it could not be).
    idle_timer: Option<tokio::runtime::Runtime>,
}

/// How often an idle model thread looks at the keep-alive and the memory governor's unload requests.
const IDLE_TICK: Duration = Duration::from_millis(25);

impl<R: ModelRunner> Thread<R> {
    fn set(&self, f: impl FnOnce(&mut Status<R::Info>)) {
        self.shared.update(f);
    }

    fn info(&self) -> R::Info {
        self.shared.read(|s| s.info.clone())
    }

    /// Reserves memory and loads. A refusal for memory leaves the host unloaded (the next request tries
    /// again: memory may have been freed by then); a hard failure is final until a load has succeeded once
    /// (a broken model, preloaded or lazy), and retried at the next request after that.
    fn try_load(&mut self, memory: Option<&crate::memory::EngineHandle>) -> Option<R::Model> {
        let name = self.config.name.clone();
        let mut info = self.info();
        let result = (|| {
            // Estimate and reserve before reading a byte: refusing is better than swapping the machine to death.
            let need = self.runner.plan(&mut info)?;
            if let (Some(h), Some(mut bytes)) = (memory, need) {
                while let Err(e) = h.reserve(bytes, &format!("model {name}")) {
                    match self.runner.shrink(&mut info) {
                        Some(smaller) if smaller < bytes => {
                            tracing::warn!(
                                engine = %name,
                                "{}; serving fewer requests at once ({} instead)",
                                e.0,
                                crate::memory::gib(smaller)
                            );
                            bytes = smaller;
                        }
                        _ => {
                            return Err(LoadError::Refused(format!(
                                "insufficient memory: {}",
                                e.0
                            )));
                        }
                    }
                }
            }
            let published = info.clone();
            self.set(|s| {
                s.info = published;
                s.state = EngineState::Loading { progress: 0.0 };
            });
            let shared = self.shared.clone();
            let progress: Progress = Arc::new(move |p: f32| {
                shared.update(|s| s.state = EngineState::Loading { progress: p });
            });
            let loaded = self.runner.load(&progress, &mut info);
            if loaded.is_err()
                && let Some(h) = memory
            {
                h.release();
            }
            loaded
        })();
        match result {
            Ok((model, context_length)) => {
                tracing::info!(model = %name, context_length, "model loaded");
                self.ever_loaded = true;
                self.runner.refresh(&mut info);
                // Published with Ready, in one change: a waiter woken by Ready sees the batch size too.
                let max = self.runner.max_sequences(&model).max(1);
                self.set(|s| {
                    s.state = EngineState::Ready;
                    s.max_sequences = max;
                    s.context_length = context_length;
                    s.info = info;
                    s.last_error = None;
                });
                Some(model)
            }
            Err(e) => {
                tracing::error!(model = %name, error = %e, "model failed to load");
                let msg = e.to_string();
                let retry = matches!(e, LoadError::Refused(_)) || self.ever_loaded;
                self.set(|s| {
                    s.info = info;
                    s.last_error = Some(msg.clone());
                    s.state = if retry {
                        EngineState::Unloaded
                    } else {
                        EngineState::Failed { error: msg }
                    };
                });
                None
            }
        }
    }

    fn unload(
        &mut self,
        loaded: &mut Option<R::Model>,
        memory: Option<&crate::memory::EngineHandle>,
        why: &str,
    ) {
        if let Some(m) = loaded.take() {
            self.runner.unload(m);
        }
        if let Some(h) = memory {
            h.release();
        }
        tracing::info!(model = %self.config.name, why, "model unloaded");
        let mut info = self.info();
        self.runner.refresh(&mut info);
        self.set(|s| {
            s.state = EngineState::Unloaded;
            s.max_sequences = 0;
            s.info = info;
        });
    }

    /// Waits, idle, for the next job, unloading the model after the keep-alive or when the memory governor
    /// asks. None: every handle is gone.
    fn next_job(
        &mut self,
        jobs: &mut mpsc::Receiver<Job<R>>,
        loaded: &mut Option<R::Model>,
        memory: Option<&crate::memory::EngineHandle>,
    ) -> Option<Job<R>> {
        let watch = self.config.keep_alive.is_some() || memory.is_some();
        if loaded.is_none() || !watch {
            return jobs.blocking_recv();
        }
        // Idle: wait for the queue a tick at a time, so that the keep-alive and the governor's unload
        // requests are noticed. A job ends the wait at once: sleeping between polls instead delayed every
        // request that found the engine idle by half a tick on average (12 ms of time to first token).
        let idle_since = Instant::now();
        if let Some(h) = memory {
            h.set_idle(true);
        }
        if self.idle_timer.is_none() {
            self.idle_timer = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .inspect_err(|e| tracing::warn!(error = %e, "no idle timer: polling the queue"))
                .ok();
        }
        loop {
            let next = match &self.idle_timer {
                // The timer is made inside the runtime (its context is entered by `block_on`).
                Some(rt) => match rt
                    .block_on(async { tokio::time::timeout(IDLE_TICK, jobs.recv()).await })
                {
                    Ok(Some(j)) => Ok(j),
                    Ok(None) => Err(mpsc::error::TryRecvError::Disconnected),
                    Err(_) => Err(mpsc::error::TryRecvError::Empty),
                },
                None => jobs.try_recv(),
            };
            match next {
                Ok(j) => return Some(j),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    let expired = self
                        .config
                        .keep_alive
                        .is_some_and(|k| idle_since.elapsed() >= k);
                    let pressed = memory.is_some_and(|h| h.unload_requested());
                    if expired || pressed {
                        let why = if pressed {
                            "memory pressure"
                        } else {
                            "idle keep-alive"
                        };
                        self.unload(loaded, memory, why);
                        return jobs.blocking_recv();
                    }
                    if self.idle_timer.is_none() {
                        std::thread::sleep(IDLE_TICK)
                    }
                }
            }
        }
    }

    /// The model, loading it first if it is not in memory (a lazy first load, or a transparent reload
    /// after an unload); Err: why it could not be loaded.
    fn ensure_loaded<'m>(
        &mut self,
        loaded: &'m mut Option<R::Model>,
        memory: Option<&crate::memory::EngineHandle>,
    ) -> Result<&'m mut R::Model, EngineFailure> {
        if let Some(h) = memory {
            h.set_idle(false);
        }
        if loaded.is_none() {
            *loaded = self.try_load(memory);
        }
        loaded.as_mut().ok_or_else(|| {
            EngineFailure::Fault(
                self.shared
                    .read(|s| s.last_error.clone())
                    .unwrap_or_else(|| "the model failed to load".into()),
            )
        })
    }

    /// Takes a job from the queue: a request is admitted into the running batch, a count is answered now.
    fn dispatch(
        &mut self,
        job: Job<R>,
        loaded: &mut Option<R::Model>,
        memory: Option<&crate::memory::EngineHandle>,
        live: &mut Vec<Live<R>>,
    ) {
        match job {
            Job::Generate { request, events } => {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                self.admit(request, events, loaded, memory, live)
            }
            Job::Count { request, reply } => {
                if reply.is_closed() {
                    return;
                }
                match self.ensure_loaded(loaded, memory) {
                    Ok(model) => self.runner.count(model, request, reply),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    }

    /// Admits a request into the running batch, loading the model first if it is not in memory; a request
    /// that cannot be admitted is answered with the failure at once.
    fn admit(
        &mut self,
        request: R::Request,
        events: mpsc::Sender<Event<R::Summary>>,
        loaded: &mut Option<R::Model>,
        memory: Option<&crate::memory::EngineHandle>,
        live: &mut Vec<Live<R>>,
    ) {
        if events.is_closed() {
            // Its client gave up while it waited: do not load or touch a cache for it.
            return;
        }
        let admitted = match self.ensure_loaded(loaded, memory) {
            Ok(model) => {
                // Read after a lazy load, which sets it.
                let ctx = self.shared.read(|s| s.context_length);
                self.runner.admit(model, request, ctx)
            }
            Err(e) => Err(e),
        };
        match admitted {
            Ok(seq) => live.push(Live {
                seq: Some(seq),
                events,
                outbox: VecDeque::new(),
                started: Instant::now(),
                stalled_since: None,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "request refused");
                // A fresh channel has room for one event.
                let _ = events.try_send(Event::Error(e));
            }
        }
    }

    /// Records a finished request in the figures.
    fn record(&mut self, summary: &R::Summary, started: Instant) {
        let t = R::tally(summary);
        tracing::info!(
            prompt_tokens = t.prompt_tokens,
            cached_tokens = t.cached_tokens,
            completion_tokens = t.completion_tokens,
            prefill_tps = format!("{:.1}", t.prefill_tps),
            decode_tps = format!("{:.1}", t.decode_tps),
            ms = started.elapsed().as_millis() as u64,
            "request done"
        );
        let mut info = self.info();
        self.runner.refresh(&mut info);
        self.set(|s| {
            s.requests += 1;
            s.generated_tokens += t.completion_tokens as u64;
            s.prompt_tokens += t.prompt_tokens as u64;
            s.cached_prompt_tokens += t.cached_tokens as u64;
            s.last_decode_tps = t.decode_tps;
            s.last_prefill_tps = t.prefill_tps;
            s.info = info;
        });
    }

    /// The scheduler loop: admit queued requests into the running batch between steps (up to the runner's
    /// [`ModelRunner::max_sequences`]), deliver each sequence's events without letting one slow client stall
    /// the others (a sequence whose client has not taken its last events sits out the next step), drop the
    /// sequences whose clients went away, and step the rest; idle, wait for work under the keep-alive.
    fn run(mut self, mut jobs: mpsc::Receiver<Job<R>>, preloading: &AtomicBool) {
        self.runner.init();
        let memory = self
            .config
            .memory
            .clone()
            .map(|g| g.register(&self.config.name));
        let memory = memory.as_ref();
        let mut loaded = None;
        if self.config.preload {
            loaded = self.try_load(memory);
            preloading.store(false, Ordering::Release);
            if loaded.is_none()
                && self
                    .shared
                    .read(|s| matches!(s.state, EngineState::Failed { .. }))
            {
                return;
            }
        }
        let mut live: Vec<Live<R>> = vec![];
        let mut open = true;
        // Requests taken from the queue while the batch was full (the queue is read on to answer counts,
        // which take no slot): they join first, in order, as slots free. They still count as waiting
        // (`waiting`, which bounds submissions), until admitted or, their client gone, dropped.
        let mut parked: VecDeque<Job<R>> = VecDeque::new();
        loop {
            if live.is_empty() {
                let job = match parked.pop_front() {
                    Some(j) => j,
                    None if !open => break,
                    None => match self.next_job(&mut jobs, &mut loaded, memory) {
                        Some(j) => j,
                        None => break,
                    },
                };
                self.dispatch(job, &mut loaded, memory, &mut live);
            }
            // Newcomers join between steps, up to the batch size; counts are answered whatever the batch.
            // (The memory governor flags only idle engines for unloading, so a running batch is never cut
            // short for memory.)
            let mut counted = 0;
            parked.retain(|j| match j {
                Job::Generate { events, .. } if events.is_closed() => {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    false
                }
                _ => true,
            });
            loop {
                let full = loaded.as_ref().is_none_or(|m| {
                    live.iter().filter(|l| l.seq.is_some()).count()
                        >= self.runner.max_sequences(m).max(1)
                });
                if !full && let Some(j) = parked.pop_front() {
                    self.dispatch(j, &mut loaded, memory, &mut live);
                    continue;
                }
                if !open || counted >= COUNTS_PER_STEP {
                    break;
                }
                match jobs.try_recv() {
                    Ok(j @ Job::Generate { .. }) if full => parked.push_back(j),
                    Ok(j) => {
                        counted += usize::from(matches!(j, Job::Count { .. }));
                        self.dispatch(j, &mut loaded, memory, &mut live)
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            // Deliver what is pending; a closed channel cancels its sequence, and so does a client that has
            // taken nothing for the stall timeout (it holds a cache slot the queue may be waiting for).
            for l in live.iter_mut() {
                let gone = l.flush();
                let stalled = l
                    .stalled_since
                    .is_some_and(|t| t.elapsed() >= self.config.stall_timeout);
                if (gone || stalled)
                    && let (Some(seq), Some(model)) = (l.seq.take(), loaded.as_mut())
                {
                    if stalled {
                        tracing::warn!("request cancelled: its client stopped reading");
                        l.outbox.clear();
                    } else {
                        tracing::info!("request cancelled: the client went away");
                    }
                    self.runner.release(model, seq);
                }
            }
            live.retain(|l| l.seq.is_some() || !l.outbox.is_empty());
            let Some(model) = loaded.as_mut() else {
                live.clear();
                continue;
            };
            let mut ready: Vec<usize> = (0..live.len())
                .filter(|&i| live[i].seq.is_some() && live[i].outbox.is_empty())
                .collect();
            self.set(|s| s.running = live.iter().filter(|l| l.seq.is_some()).count());
            if ready.is_empty() {
                if !live.is_empty() {
                    // Every running sequence waits for its client to take its events.
                    std::thread::sleep(Duration::from_millis(1));
                }
                continue;
            }
            let mut out: Vec<SeqOutput<R::Summary>> =
                (0..ready.len()).map(|_| SeqOutput::default()).collect();
            let result = {
                let mut batch: Vec<&mut R::Sequence> = live
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| ready.contains(i))
                    .filter_map(|(_, l)| l.seq.as_mut())
                    .collect();
                self.runner.step(model, &mut batch, &mut out)
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, sequences = ready.len(), "step failed");
                for o in out.iter_mut() {
                    o.end = Some(Err(e.clone()));
                }
            }
            for (o, i) in out.into_iter().zip(ready.drain(..)) {
                let l = &mut live[i];
                if o.events.is_empty() && o.end.is_none() {
                    // A step that sent nothing (a prompt chunk read, a token held back inside a tool
                    // call) still moved the answer on: a consumer's stall deadline must see that.
                    l.outbox.push_back(Event::Progress);
                }
                l.outbox.extend(o.events);
                let Some(end) = o.end else { continue };
                if let Some(seq) = l.seq.take() {
                    self.runner.release(model, seq);
                }
                match end {
                    Ok(summary) => {
                        self.record(&summary, l.started);
                        l.outbox.push_back(Event::Done(summary));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "request failed");
                        l.outbox.push_back(Event::Error(e));
                    }
                }
                l.flush();
            }
        }
        self.set(|s| s.running = 0);
        if let Some(h) = memory {
            h.release();
        }
    }
}

/// A request in the running batch (or, once ended, one whose last events still wait for its client).
struct Live<R: ModelRunner> {
    /// None once ended.
    seq: Option<R::Sequence>,
    events: mpsc::Sender<Event<R::Summary>>,
    /// Events the client has not taken yet, in order.
    outbox: VecDeque<Event<R::Summary>>,
    started: Instant,
    /// Since when the client's channel has been full (None: it keeps up).
    stalled_since: Option<Instant>,
}

impl<R: ModelRunner> Live<R> {
    /// Hands pending events to the client as far as its channel has room. True when the client went away
    /// (what was pending is dropped).
    fn flush(&mut self) -> bool {
        if self.events.is_closed() {
            self.outbox.clear();
            return true;
        }
        let mut took = false;
        while let Some(e) = self.outbox.pop_front() {
            match self.events.try_send(e) {
                Ok(()) => took = true,
                Err(mpsc::error::TrySendError::Full(e)) => {
                    self.outbox.push_front(e);
                    // Stalled from the last time the client took anything.
                    if took || self.stalled_since.is_none() {
                        self.stalled_since = Some(Instant::now());
                    }
                    return false;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.outbox.clear();
                    return true;
                }
            }
        }
        self.stalled_since = None;
        false
    }
}
