//! A tier served by a pool of endpoints: this node's engine, other Jemma nodes, any OpenAI-compatible
//! server. The pool is itself a [`Backend`], so the router's tier logic (queue, breaker, fallback to the
//! next tier) is unchanged above it; inside, it does what LiteLLM's router and SGLang's cache-aware
//! router do for a group of deployments:
//!
//! - **Balancing**: least outstanding requests per unit of `weight` among the endpoints that are up, not
//!   cooling down, with a closed breaker and a free slot (`max_concurrency`).
//! - **Cache affinity**: a conversation (keyed by [`conversation_key`]: its messages up to the first user
//!   turn) goes to the endpoint that answered it last, else to its weighted rendezvous hash (highest random
//!   weight), so its later turns find their prefix in that endpoint's prompt cache; a saturated preferred
//!   endpoint gives way to the least loaded one.
//! - **Health**: one circuit breaker per endpoint; an active probe ([`Backend::probe`]) every
//!   `probe_interval` takes an endpoint out after `unhealthy_threshold` failed probes (at once when a
//!   connection is refused) and back in after `healthy_threshold` answered ones.
//! - **Retries within the tier**: a failure before the first token goes to the next endpoint; one
//!   mid-stream continues on another endpoint from the text already sent (as the router continues across
//!   tiers), so the client sees one uninterrupted answer. Only when every endpoint failed does the error
//!   reach the router, which falls back to the next tier.
//! - **Retry-After**: an endpoint that answers 429 or 503 with `Retry-After` is not sent anything until
//!   it passes; when no endpoint is left, the soonest such time is what the router tells the client.

use std::hash::{Hash, Hasher};
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::api::{ChatRequest, Message};
use crate::backend::{
    Backend, BackendError, BackendHealth, BackendState, Chunk, ChunkStream, ServedBy,
};
use crate::breaker::{BreakerConfig, BreakerState, CircuitBreaker, Permit};

/// One member of a pool, as built by the host ([`crate::setup`]).
pub struct EndpointSpec {
    /// Label in `/health`, `/metrics` and `_routing.endpoint`.
    pub name: String,
    /// What serves it: a local engine tier or an OpenAI-compatible upstream.
    pub backend: Arc<dyn Backend>,
    /// Share of the load relative to the other endpoints (> 0).
    pub weight: f64,
    /// Requests sent to it at once (>= 1).
    pub max_concurrency: usize,
    /// Whether the prober asks it (false for a service that scales to zero: a probe would keep it up).
    pub probe: bool,
}

/// How a pool times out, judges and probes its endpoints.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The tier's name, for logs and metrics labels.
    pub tier: String,
    /// Time an endpoint has until its first chunk (then the next endpoint is tried).
    pub first_token_timeout: Duration,
    /// Time allowed between two chunks of an endpoint (then the answer continues on another).
    pub idle_timeout: Duration,
    /// Each endpoint's breaker.
    pub breaker: BreakerConfig,
    /// Time between two active probes of an endpoint.
    pub probe_interval: Duration,
    /// Consecutive failed probes that take an endpoint out.
    pub unhealthy_threshold: u32,
    /// Consecutive answered probes that bring it back.
    pub healthy_threshold: u32,
    /// Conversations whose endpoint is remembered (least recently used ones are forgotten).
    pub affinity_entries: usize,
}

impl PoolConfig {
    /// Defaults for `tier` (5 s probes, out after 2 failures, back after 1 success, 4096 conversations).
    pub fn new(tier: &str) -> Self {
        Self {
            tier: tier.into(),
            first_token_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(60),
            breaker: BreakerConfig::default(),
            probe_interval: Duration::from_secs(5),
            unhealthy_threshold: 2,
            healthy_threshold: 1,
            affinity_entries: 4096,
        }
    }
}

/// A stable 64-bit key for the conversation `req` belongs to: its messages up to and including the first
/// user message (the system prompt and the opening question, which every later turn resends unchanged),
/// or the first 512 bytes of a raw prompt. Two conversations that open identically share a key, which is
/// what prefix caching wants as well. None: nothing to key on.
pub fn conversation_key(req: &ChatRequest) -> Option<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Some(p) = &req.raw_prompt {
        let mut end = p.len().min(512);
        while !p.is_char_boundary(end) {
            end -= 1;
        }
        p[..end].hash(&mut h);
        return Some(h.finish());
    }
    if req.messages.is_empty() {
        return None;
    }
    for m in &req.messages {
        m.to_value().to_string().hash(&mut h);
        if matches!(m, Message::User(_)) {
            break;
        }
    }
    Some(h.finish())
}

struct Endpoint {
    name: String,
    backend: Arc<dyn Backend>,
    weight: f64,
    max_concurrency: usize,
    probe: bool,
    breaker: CircuitBreaker,
    outstanding: AtomicUsize,
    up: AtomicBool,
    probe_failures: AtomicU32,
    probe_successes: AtomicU32,
    /// Not before this instant (an upstream's Retry-After), and whether a 429 set it.
    cooldown: Mutex<Option<(Instant, bool)>>,
    /// Bumped whenever a refused connection takes it out, so that a probe begun before cannot bring it
    /// back on an answer older than the refusal.
    epoch: AtomicU64,
    served: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Left the pool ([`Pool::remove_endpoint`]): never chosen again. Kept in place so that the indices
    /// held by affinity entries and running requests stay valid.
    removed: AtomicBool,
}

impl Endpoint {
    fn cooling(&self, now: Instant) -> Option<Duration> {
        let c = *self.cooldown.lock().unwrap_or_else(|e| e.into_inner());
        c.and_then(|(until, _)| until.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// Cooling down after a 429: throttled, not failing.
    fn throttled(&self, now: Instant) -> bool {
        let c = *self.cooldown.lock().unwrap_or_else(|e| e.into_inner());
        c.is_some_and(|(until, throttle)| throttle && until > now)
    }

    /// Requests it takes at once now: `max_concurrency`, or fewer while its engine runs fewer (a local
    /// engine whose memory budget gave it a smaller batch).
    fn limit(&self) -> usize {
        self.backend
            .capacity()
            .map_or(self.max_concurrency, |c| c.clamp(1, self.max_concurrency))
    }

    fn breaker_open(&self) -> bool {
        matches!(
            self.breaker.state(),
            BreakerState::Open { .. }
                | BreakerState::HalfOpen {
                    probe_in_flight: true
                }
        )
    }

    /// A member, up, not cooling down, breaker not refusing.
    fn eligible(&self, now: Instant) -> bool {
        !self.removed.load(Ordering::Relaxed)
            && self.up.load(Ordering::Relaxed)
            && self.cooling(now).is_none()
            && !self.breaker_open()
    }

    fn load(&self) -> f64 {
        (self.outstanding.load(Ordering::Relaxed) as f64 + 1.0) / self.weight
    }

    /// Takes one of its slots, if one is free.
    fn reserve(&self) -> bool {
        let limit = self.limit();
        self.outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn note_error(&self, e: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    fn set_up(&self, tier: &str, up: bool, why: &str) {
        if self.up.swap(up, Ordering::SeqCst) != up {
            if up {
                // It answers again: give it a clean record rather than wait out an old cooldown, and no
                // error in /health that reads like a live fault.
                self.breaker.reset();
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::info!(%tier, endpoint = %self.name, "endpoint back in the pool");
            } else {
                tracing::warn!(%tier, endpoint = %self.name, why, "endpoint out of the pool");
            }
            metrics::gauge!("jemma_endpoint_up", "tier" => tier.to_string(), "endpoint" => self.name.clone())
                .set(if up { 1.0 } else { 0.0 });
        }
    }

    fn status(&self, now: Instant) -> &'static str {
        if !self.up.load(Ordering::Relaxed) {
            "down"
        } else if self.cooling(now).is_some() {
            "cooldown"
        } else if self.breaker_open() {
            "breaker_open"
        } else {
            "up"
        }
    }
}

struct Inner {
    cfg: PoolConfig,
    /// Append-only (an endpoint that leaves is marked [`Endpoint::removed`]), so an index stays valid for
    /// the pool's life; replaced whole when one joins, so readers take a cheap snapshot ([`Inner::eps`]).
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    /// Conversation key → the endpoint that last answered it.
    affinity: Mutex<lru::LruCache<u64, usize>>,
    /// Signalled whenever an endpoint slot frees.
    freed: Notify,
    /// Rotates ties between equally loaded endpoints.
    turn: AtomicUsize,
}

/// A reserved endpoint slot; given back (and waiters woken) when dropped.
struct Lease {
    inner: Arc<Inner>,
    ep: Arc<Endpoint>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let ep = &self.ep;
        ep.outstanding.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("jemma_endpoint_in_flight", "tier" => self.inner.cfg.tier.clone(), "endpoint" => ep.name.clone()).decrement(1.0);
        self.inner.freed.notify_waiters();
    }
}

/// An endpoint streaming an answer.
struct Running {
    /// When its first chunk is due (the try's start plus the first-token timeout).
    first_due: tokio::time::Instant,
    /// Held for the answer's life: the endpoint slot it occupies.
    _lease: Lease,
    permit: Option<Permit>,
    rx: ChunkStream,
}

enum Choice {
    Go(usize),
    /// Every eligible endpoint is at its `max_concurrency`.
    Wait,
    /// None is eligible.
    NoneLeft,
}

/// What one request has tried so far.
#[derive(Default)]
struct Attempts {
    tried: Vec<usize>,
    retries: Vec<(String, String)>,
    /// Whether every failure so far was a 429 (throttling, not a fault).
    throttled_only: bool,
    last: Option<BackendError>,
    /// The first refusal of a field an endpoint's server would not read ([`BackendError::Unread`]), and
    /// how many endpoints refused so: the pool's answer when every endpoint it tried did.
    unread: Option<crate::RouterError>,
    unread_count: usize,
}

/// Whether an endpoint with `busy` requests outstanding is too far ahead of the least busy one (`least`)
/// to keep a conversation's affinity: more than [`BALANCE_ABS`] requests and [`BALANCE_REL`] times as
/// many, SGLang's `balance_abs_threshold` and `balance_rel_threshold` rule.
fn imbalanced(busy: usize, least: usize) -> bool {
    busy > least + BALANCE_ABS && busy as f64 > least as f64 * BALANCE_REL
}

/// Outstanding requests an endpoint may be ahead of the least busy one and keep affinity.
pub const BALANCE_ABS: usize = 4;
/// How many times the least busy one's load an endpoint may carry and keep affinity.
pub const BALANCE_REL: f64 = 1.5;

/// The longest an upstream's `Retry-After` keeps an endpoint out, in seconds.
pub const MAX_COOLDOWN_SECS: u64 = 300;

/// Weighted rendezvous (highest random weight) hashing: the endpoint that maximises `-w / ln(u)` where `u`
/// is a uniform hash of (key, endpoint) — Schindelhauer and Schomaker, "Weighted distributed hash tables"
/// (2005). Removing an endpoint moves only the conversations it held.
fn rendezvous(key: u64, endpoints: &[Arc<Endpoint>], among: &[usize]) -> Option<usize> {
    among.iter().copied().max_by(|&a, &b| {
        let score = |i: usize| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (key, &endpoints[i].name).hash(&mut h);
            let u = ((h.finish() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            -endpoints[i].weight / u.ln()
        };
        score(a).total_cmp(&score(b))
    })
}

impl Inner {
    /// The endpoints now (those that left included, marked).
    fn eps(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `peers`: whether other Jemma nodes may take it (not for a request a peer forwarded here);
    /// `media`: the modalities it holds beyond text (`image`, `audio`), which go to members whose models
    /// may take them (those known not to are passed over while another may); `chat`: it is a chat, which
    /// goes to members whose models have a chat template (base models are passed over while another may).
    fn choose(
        &self,
        key: Option<u64>,
        tried: &[usize],
        peers: bool,
        (media, chat, req): (&[crate::backend::Modality], bool, Option<&ChatRequest>),
    ) -> Choice {
        let now = crate::breaker::now();
        let eps = self.eps();
        let mut eligible: Vec<usize> = (0..eps.len())
            .filter(|&i| {
                let e = &eps[i];
                !tried.contains(&i) && e.eligible(now) && (peers || !e.backend.is_peer())
            })
            .collect();
        if !media.is_empty() || chat || req.is_some() {
            let able: Vec<usize> = eligible
                .iter()
                .copied()
                .filter(|&i| {
                    let h = eps[i].backend.health();
                    !(h.refuses_any(media)
                        || (chat && h.refuses_chat())
                        || req.is_some_and(|r| h.refuses_fields_of(r)))
                })
                .collect();
            if !able.is_empty() {
                eligible = able;
            }
        }
        if eligible.is_empty() {
            return Choice::NoneLeft;
        }
        let free = |i: usize| eps[i].outstanding.load(Ordering::Relaxed) < eps[i].limit();
        if let Some(k) = key {
            let remembered = self
                .affinity
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&k)
                .copied()
                .filter(|i| eligible.contains(i));
            // The endpoint with the conversation's prefix, unless it is full or much busier than the
            // least busy one (SGLang's cache-aware router balances the same way: a hot prefix must
            // not pin one endpoint while others idle).
            let least = eligible
                .iter()
                .map(|&i| eps[i].outstanding.load(Ordering::Relaxed))
                .min()
                .unwrap_or(0);
            if let Some(p) = remembered.or_else(|| rendezvous(k, &eps, &eligible))
                && free(p)
                && !imbalanced(eps[p].outstanding.load(Ordering::Relaxed), least)
            {
                return Choice::Go(p);
            }
        }
        // Least outstanding per unit of weight; ties rotate so equal endpoints share the load.
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        let n = eligible.len();
        (0..n)
            .map(|j| eligible[(start + j) % n])
            .filter(|&i| free(i))
            .min_by(|&a, &b| eps[a].load().total_cmp(&eps[b].load()))
            .map_or(Choice::Wait, Choice::Go)
    }

    /// The soonest time any endpoint may take requests again (cooldowns and open breakers), in whole
    /// seconds.
    fn soonest_secs(&self) -> Option<u64> {
        let now = crate::breaker::now();
        self.eps()
            .iter()
            .filter(|e| !e.removed.load(Ordering::Relaxed))
            .filter_map(|e| {
                let b = e
                    .breaker
                    .snapshot()
                    .retry_after_secs
                    .map(Duration::from_secs_f64);
                match (e.cooling(now), b) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                }
            })
            .min()
            .map(|d| d.as_secs_f64().ceil().max(1.0) as u64)
    }

    /// Records a tier failure of endpoint `i`: its breaker, its cooldown, taking it out when it cannot be
    /// reached.
    fn failed(&self, i: usize, permit: Option<Permit>, e: &BackendError) {
        let ep = self.eps()[i].clone();
        ep.note_error(&e.to_string());
        let tier = self.cfg.tier.clone();
        if e.is_throttle() {
            drop(permit);
            metrics::counter!("jemma_endpoint_requests_total", "tier" => tier, "endpoint" => ep.name.clone(), "status" => "throttled").increment(1);
        } else {
            if let Some(p) = permit {
                p.failure();
            }
            metrics::counter!("jemma_endpoint_requests_total", "tier" => tier, "endpoint" => ep.name.clone(), "status" => "error").increment(1);
        }
        let retry_after = match e {
            BackendError::Upstream {
                retry_after_secs: Some(s),
                ..
            } => Some(*s),
            // A 429 without Retry-After still means "not now".
            BackendError::Upstream { status: 429, .. } => Some(1),
            _ => None,
        };
        if let Some(s) = retry_after {
            // Capped, as Envoy caps an ejection: a mistaken `Retry-After: 86400` must not take an
            // endpoint out for a day.
            let s = s.min(MAX_COOLDOWN_SECS);
            *ep.cooldown.lock().unwrap_or_else(|p| p.into_inner()) = Some((
                crate::breaker::now() + Duration::from_secs(s),
                e.is_throttle(),
            ));
        }
        // Taken out until a probe finds it answering; one that is never probed is judged by its breaker
        // alone.
        if ep.probe && matches!(e, BackendError::Unavailable(_)) {
            // Refused or unreachable: out until a probe finds it answering again.
            ep.probe_successes.store(0, Ordering::Relaxed);
            ep.epoch.fetch_add(1, Ordering::SeqCst);
            ep.set_up(&self.cfg.tier, false, &e.to_string());
        }
    }

    /// Opens an answer on the best endpoint not tried yet, trying the next one on each failure.
    async fn open(
        self: &Arc<Self>,
        req: &ChatRequest,
        continuation: Option<&str>,
        key: Option<u64>,
        att: &mut Attempts,
    ) -> Result<(usize, Running), BackendError> {
        let deadline = tokio::time::Instant::now() + self.cfg.first_token_timeout;
        loop {
            // Registered before choosing, so a slot freed in between is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let needs = (
                &req.media_modalities()[..],
                req.raw_prompt.is_none(),
                Some(req),
            );
            let i = match self.choose(key, &att.tried, !req.forwarded, needs) {
                Choice::Go(i) => i,
                Choice::Wait => {
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(BackendError::Busy(format!(
                            "every endpoint of the {} pool is at its max_concurrency",
                            self.cfg.tier
                        )));
                    }
                    continue;
                }
                Choice::NoneLeft => return Err(self.exhausted(att, !req.forwarded)),
            };
            let ep = self.eps()[i].clone();
            if !ep.reserve() {
                continue;
            }
            metrics::gauge!("jemma_endpoint_in_flight", "tier" => self.cfg.tier.clone(), "endpoint" => ep.name.clone()).increment(1.0);
            let lease = Lease {
                inner: self.clone(),
                ep: ep.clone(),
            };
            let Ok(permit) = ep.breaker.try_acquire() else {
                att.tried.push(i);
                continue;
            };
            let first_due = tokio::time::Instant::now() + self.cfg.first_token_timeout;
            let started = tokio::time::timeout_at(first_due, ep.backend.start(req, continuation))
                .await
                .unwrap_or_else(|_| {
                    Err(BackendError::Timeout(
                        "no response before the first-token timeout".into(),
                    ))
                });
            match started {
                Ok(rx) => {
                    return Ok((
                        i,
                        Running {
                            first_due,
                            _lease: lease,
                            permit: Some(permit),
                            rx,
                        },
                    ));
                }
                // Its server would not read a field the request sets: another member's may (nothing
                // was sent; not the endpoint's fault).
                Err(BackendError::Unread(r)) => {
                    drop(permit);
                    att.retries
                        .push((self.eps()[i].name.clone(), r.to_string()));
                    att.tried.push(i);
                    att.unread.get_or_insert(r);
                    att.unread_count += 1;
                }
                Err(e) if !e.is_tier_failure() => {
                    permit.success();
                    return Err(e);
                }
                Err(e) => {
                    self.failed(i, Some(permit), &e);
                    self.record(att, i, &e, 0);
                }
            }
        }
    }

    fn record(&self, att: &mut Attempts, i: usize, e: &BackendError, sent_chars: usize) {
        let name = &self.eps()[i].name;
        tracing::warn!(tier = %self.cfg.tier, endpoint = %name, error = %e, "endpoint failed, trying another");
        att.retries.push((
            name.clone(),
            if sent_chars > 0 {
                format!("{e} after {sent_chars} chars; continued")
            } else {
                e.to_string()
            },
        ));
        if att.tried.is_empty() {
            att.throttled_only = true;
        }
        att.throttled_only &= e.is_throttle();
        att.tried.push(i);
        att.last = Some(e.clone());
    }

    /// The error when no endpoint is left: every attempt named, with the soonest time one may serve.
    fn exhausted(&self, att: &Attempts, peers: bool) -> BackendError {
        if let Some(r) = &att.unread
            && att.unread_count == att.retries.len()
        {
            return BackendError::Unread(r.clone());
        }
        let now = crate::breaker::now();
        // Every endpoint left untried is cooling down after a 429 (and every one tried throttled too):
        // the pool is rate limited, not failing, and says so (429) rather than 503.
        let eps = self.eps();
        let untried: Vec<&Arc<Endpoint>> = (0..eps.len())
            .filter(|i| !att.tried.contains(i))
            .map(|i| &eps[i])
            .filter(|e| !e.removed.load(Ordering::Relaxed) && (peers || !e.backend.is_peer()))
            .collect();
        let throttled = (att.retries.is_empty() || att.throttled_only)
            && untried.iter().all(|e| e.throttled(now))
            && (!att.retries.is_empty() || !untried.is_empty());
        let what = if att.retries.is_empty() {
            if throttled {
                format!(
                    "every endpoint of the {} pool is rate limited",
                    self.cfg.tier
                )
            } else {
                format!("no endpoint of the {} pool is up", self.cfg.tier)
            }
        } else {
            att.retries
                .iter()
                .map(|(n, e)| format!("{n}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let retry_after_secs = self.soonest_secs();
        match &att.last {
            Some(BackendError::Timeout(_)) if att.retries.len() == 1 => BackendError::Timeout(what),
            _ if throttled => BackendError::Upstream {
                status: 429,
                message: what,
                retry_after_secs,
            },
            _ => BackendError::Upstream {
                status: 503,
                message: what,
                retry_after_secs,
            },
        }
    }

    /// Forwards an answer, continuing it on another endpoint when the one serving it fails.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        self: Arc<Self>,
        req: ChatRequest,
        mut continuation: Option<String>,
        key: Option<u64>,
        mut att: Attempts,
        mut index: usize,
        mut run: Running,
        tx: mpsc::Sender<Result<Chunk, BackendError>>,
    ) {
        let mut sent = String::new();
        let mut got_token = false;
        loop {
            // Until the first token: the try's own deadline (its start counted); then the idle limit.
            let (due, limit) = if got_token {
                (
                    tokio::time::Instant::now() + self.cfg.idle_timeout,
                    self.cfg.idle_timeout,
                )
            } else {
                (run.first_due, self.cfg.first_token_timeout)
            };
            let next = tokio::select! {
                r = tokio::time::timeout_at(due, run.rx.recv()) => r,
                // The client is gone: dropping the stream cancels the endpoint's work.
                _ = tx.closed() => return,
            };
            let err = match next {
                Ok(Some(Ok(chunk))) => {
                    let chunk = match chunk {
                        Chunk::Done {
                            finish_reason,
                            usage,
                            decode_tps,
                            stop_sequence,
                            served_by,
                            speculative,
                        } => {
                            let ep = self.eps()[index].clone();
                            if let Some(p) = run.permit.take() {
                                p.success();
                            }
                            ep.served.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!("jemma_endpoint_requests_total", "tier" => self.cfg.tier.clone(), "endpoint" => ep.name.clone(), "status" => "ok").increment(1);
                            if let Some(k) = key {
                                self.affinity
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .put(k, index);
                            }
                            let done = Chunk::Done {
                                finish_reason,
                                usage,
                                decode_tps,
                                stop_sequence,
                                speculative,
                                served_by: Some(ServedBy {
                                    endpoint: Some(ep.name.clone()),
                                    model: served_by
                                        .map(|b| b.model)
                                        .unwrap_or_else(|| ep.backend.model()),
                                    retries: std::mem::take(&mut att.retries),
                                }),
                            };
                            let _ = tx.send(Ok(done)).await;
                            return;
                        }
                        Chunk::Content(c) => {
                            got_token = true;
                            sent.push_str(&c);
                            Chunk::Content(c)
                        }
                        c @ (Chunk::Reasoning(_)
                        | Chunk::ToolCall { .. }
                        | Chunk::Logprobs(_)
                        | Chunk::Progress) => {
                            got_token = true;
                            c
                        }
                        c => c,
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Ok(Some(Err(e))) if !e.is_tier_failure() => {
                    if let Some(p) = run.permit.take() {
                        p.success();
                    }
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Ok(Some(Err(e))) => e,
                Ok(None) => BackendError::Broken("endpoint ended without finishing".into()),
                Err(_) => {
                    BackendError::Timeout(format!("no data for {:.0} s", limit.as_secs_f64()))
                }
            };
            self.failed(index, run.permit.take(), &err);
            self.record(&mut att, index, &err, sent.chars().count());
            drop(run);
            if !sent.is_empty() && req.is_constrained() {
                // A grammar starts over on another endpoint: the joined answer would not be constrained.
                let _ = tx.send(Err(err)).await;
                return;
            }
            // Continue from everything sent so far, this tier's earlier endpoints included.
            let cont = match (&continuation, sent.is_empty()) {
                (None, true) => None,
                (c, _) => Some(format!("{}{sent}", c.as_deref().unwrap_or(""))),
            };
            match self.open(&req, cont.as_deref(), key, &mut att).await {
                Ok((i, r)) => {
                    index = i;
                    run = r;
                    got_token = false;
                    // What the next endpoint is asked to continue is now part of its prompt.
                    continuation = cont;
                    sent.clear();
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    }
}

/// A tier served by several endpoints (see the module docs).
pub struct Pool {
    inner: Arc<Inner>,
}

fn endpoint(cfg: &PoolConfig, s: EndpointSpec) -> Arc<Endpoint> {
    metrics::gauge!("jemma_endpoint_up", "tier" => cfg.tier.clone(), "endpoint" => s.name.clone())
        .set(1.0);
    Arc::new(Endpoint {
        breaker: CircuitBreaker::new(cfg.breaker.clone()),
        name: s.name,
        backend: s.backend,
        weight: s.weight,
        max_concurrency: s.max_concurrency.max(1),
        probe: s.probe,
        outstanding: AtomicUsize::new(0),
        up: AtomicBool::new(true),
        probe_failures: AtomicU32::new(0),
        probe_successes: AtomicU32::new(0),
        cooldown: Mutex::new(None),
        epoch: AtomicU64::new(0),
        served: AtomicU64::new(0),
        last_error: Mutex::new(None),
        removed: AtomicBool::new(false),
    })
}

impl Pool {
    /// A pool of `endpoints` (at least one); starts its prober when called within a Tokio runtime.
    pub fn new(cfg: PoolConfig, endpoints: Vec<EndpointSpec>) -> Self {
        let entries = NonZeroUsize::new(cfg.affinity_entries.max(1)).unwrap_or(NonZeroUsize::MIN);
        let endpoints = endpoints.into_iter().map(|s| endpoint(&cfg, s)).collect();
        let inner = Arc::new(Inner {
            cfg,
            endpoints: RwLock::new(Arc::new(endpoints)),
            affinity: Mutex::new(lru::LruCache::new(entries)),
            freed: Notify::new(),
            turn: AtomicUsize::new(0),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(probe_loop(Arc::downgrade(&inner)));
        }
        Self { inner }
    }

    /// Probes every endpoint once now (the prober does this every `probe_interval`).
    pub async fn probe_all(&self) {
        probe_once(&self.inner).await;
    }

    /// Adds an endpoint while the pool serves (a peer's tier joining): it takes requests at once and is
    /// probed like the others. Rendezvous hashing moves to it only its share of conversations.
    ///
    /// Errors: an endpoint of that name is already a member.
    pub fn add_endpoint(&self, spec: EndpointSpec) -> Result<(), String> {
        let mut eps = self
            .inner
            .endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if eps
            .iter()
            .any(|e| e.name == spec.name && !e.removed.load(Ordering::Relaxed))
        {
            return Err(format!(
                "the {} pool already has an endpoint named {}",
                self.inner.cfg.tier, spec.name
            ));
        }
        tracing::info!(tier = %self.inner.cfg.tier, endpoint = %spec.name, "endpoint joined the pool");
        let mut next = eps.as_ref().clone();
        next.push(endpoint(&self.inner.cfg, spec));
        *eps = Arc::new(next);
        drop(eps);
        // Requests waiting for a free slot may take one of the newcomer's.
        self.inner.freed.notify_waiters();
        Ok(())
    }

    /// Takes the endpoint named `name` out for good: it gets no new requests; the ones it runs finish.
    /// Returns its `max_concurrency`, or None when no member has that name.
    ///
    /// Errors: `name` is the last member (a pool serves through at least one).
    pub fn remove_endpoint(&self, name: &str) -> Result<Option<usize>, String> {
        // Under the write lock, so that two removals cannot both see a member (or both leave none).
        let eps = self
            .inner
            .endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let members: Vec<&Arc<Endpoint>> = eps
            .iter()
            .filter(|e| !e.removed.load(Ordering::SeqCst))
            .collect();
        let Some(ep) = members.iter().find(|e| e.name == name) else {
            return Ok(None);
        };
        if members.len() == 1 {
            return Err(format!(
                "{name} is the last endpoint of the {} pool",
                self.inner.cfg.tier
            ));
        }
        ep.removed.store(true, Ordering::SeqCst);
        metrics::gauge!("jemma_endpoint_up", "tier" => self.inner.cfg.tier.clone(), "endpoint" => name.to_string()).set(0.0);
        tracing::info!(tier = %self.inner.cfg.tier, endpoint = %name, "endpoint left the pool");
        Ok(Some(ep.max_concurrency))
    }

    /// The members' names, in the order they joined.
    pub fn endpoint_names(&self) -> Vec<String> {
        self.inner
            .eps()
            .iter()
            .filter(|e| !e.removed.load(Ordering::Relaxed))
            .map(|e| e.name.clone())
            .collect()
    }

    /// The members' request capacity together (what the tier above may send at once).
    pub fn max_concurrency(&self) -> usize {
        self.inner
            .eps()
            .iter()
            .filter(|e| !e.removed.load(Ordering::Relaxed))
            .map(|e| e.max_concurrency)
            .sum()
    }
}

async fn probe_once(inner: &Inner) {
    let limit = inner
        .cfg
        .probe_interval
        .clamp(Duration::from_secs(1), Duration::from_secs(10));
    let eps = inner.eps();
    let probed: Vec<&Arc<Endpoint>> = eps
        .iter()
        .filter(|e| e.probe && !e.removed.load(Ordering::Relaxed))
        .collect();
    let epochs: Vec<u64> = probed
        .iter()
        .map(|e| e.epoch.load(Ordering::SeqCst))
        .collect();
    let probes = probed
        .iter()
        .map(|e| tokio::time::timeout(limit, e.backend.probe()));
    let results = futures_util::future::join_all(probes).await;
    for ((ep, r), epoch) in probed.into_iter().zip(results).zip(epochs) {
        let r = r.unwrap_or_else(|_| Err(BackendError::Timeout("health probe timed out".into())));
        match r {
            // Answered before a refusal that took it out since: stale, not evidence it is back.
            Ok(()) if ep.epoch.load(Ordering::SeqCst) != epoch => {}
            Ok(()) => {
                ep.probe_failures.store(0, Ordering::Relaxed);
                let ok = ep.probe_successes.fetch_add(1, Ordering::Relaxed) + 1;
                if ok >= inner.cfg.healthy_threshold {
                    ep.set_up(&inner.cfg.tier, true, "");
                }
            }
            Err(e) => {
                ep.probe_successes.store(0, Ordering::Relaxed);
                ep.note_error(&e.to_string());
                let bad = ep.probe_failures.fetch_add(1, Ordering::Relaxed) + 1;
                if bad >= inner.cfg.unhealthy_threshold {
                    ep.set_up(&inner.cfg.tier, false, &e.to_string());
                }
            }
        }
    }
}

/// Probes until the pool is dropped.
async fn probe_loop(inner: Weak<Inner>) {
    loop {
        let Some(interval) = inner.upgrade().map(|i| i.cfg.probe_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(i) = inner.upgrade() else { return };
        probe_once(&i).await;
    }
}

#[async_trait]
impl Backend for Pool {
    fn model(&self) -> String {
        let eps = self.inner.eps();
        // The first member's model (this node's engine, when it is one).
        eps.iter()
            .find(|e| !e.removed.load(Ordering::Relaxed))
            .unwrap_or(&eps[0])
            .backend
            .model()
    }

    async fn start(
        &self,
        req: &ChatRequest,
        continuation: Option<&str>,
    ) -> Result<ChunkStream, BackendError> {
        let key = conversation_key(req);
        let mut att = Attempts::default();
        let (index, run) = self.inner.open(req, continuation, key, &mut att).await?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.inner.clone().forward(
            req.clone(),
            continuation.map(String::from),
            key,
            att,
            index,
            run,
            tx,
        ));
        Ok(rx)
    }

    fn health(&self) -> BackendHealth {
        let now = crate::breaker::now();
        let all = self.inner.eps();
        let eps: Vec<&Arc<Endpoint>> = all
            .iter()
            .filter(|e| !e.removed.load(Ordering::Relaxed))
            .collect();
        let healths: Vec<BackendHealth> = eps.iter().map(|e| e.backend.health()).collect();
        let serving: Vec<usize> = (0..eps.len()).filter(|&i| eps[i].eligible(now)).collect();
        let state = if serving
            .iter()
            .any(|&i| healths[i].state == BackendState::Ready)
        {
            BackendState::Ready
        } else if let Some(&i) = serving.first() {
            match healths[i].state {
                s if s.can_serve() => s,
                _ => BackendState::Unknown,
            }
        } else if let Some(h) = healths.iter().find(|h| h.state.is_starting()) {
            h.state
        } else {
            BackendState::Unreachable
        };
        let endpoints: Vec<Value> = eps
            .iter()
            .zip(&healths)
            .map(|(e, h)| {
                json!({
                    "name": e.name,
                    "status": e.status(now),
                    "in_flight": e.outstanding.load(Ordering::Relaxed),
                    "max_concurrency": e.max_concurrency,
                    "weight": e.weight,
                    "served": e.served.load(Ordering::Relaxed),
                    "cooldown_secs": e.cooling(now).map(|d| d.as_secs_f64()),
                    "breaker": e.breaker.snapshot(),
                    "last_error": *e.last_error.lock().unwrap_or_else(|p| p.into_inner()),
                    "backend": h,
                })
            })
            .collect();
        let best = serving.first().map(|&i| &healths[i]);
        BackendHealth {
            state,
            model: self.model(),
            model_loaded: serving.iter().any(|&i| healths[i].model_loaded),
            tokens_per_second: healths
                .iter()
                .map(|h| h.tokens_per_second)
                .fold(0.0, f64::max),
            last_error: best.and_then(|h| h.last_error.clone()).or_else(|| {
                eps.iter()
                    .find_map(|e| e.last_error.lock().ok().and_then(|l| l.clone()))
            }),
            context_length: healths.iter().filter_map(|h| h.context_length).min(),
            // What every member takes (a request may go to any); unknown if one member's is.
            input_modalities: if !healths.is_empty()
                && healths.iter().all(|h| !h.input_modalities.is_empty())
            {
                let mut m = healths[0].input_modalities.clone();
                m.retain(|x| healths.iter().all(|h| h.input_modalities.contains(x)));
                m
            } else {
                vec![]
            },
            // A chat goes to a member that chats (`choose` passes over base models): the pool chats if one
            // member does, and is a base model only if every member is.
            chat: if healths.iter().any(|h| h.chat == Some(true)) {
                Some(true)
            } else if !healths.is_empty() && healths.iter().all(|h| h.chat == Some(false)) {
                Some(false)
            } else {
                None
            },
            // Each member speaks its own; `endpoints[].backend.dialect` says which.
            dialect: None,
            details: json!({"endpoints": endpoints}),
        }
    }

    fn capacity(&self) -> Option<usize> {
        // What the endpoints that can take requests run together; at least one slot stays so that a
        // request can find out (and fall back) while all are out.
        let now = crate::breaker::now();
        Some(
            self.inner
                .eps()
                .iter()
                .filter(|e| e.eligible(now))
                .map(|e| e.limit())
                .sum::<usize>()
                .max(1),
        )
    }

    async fn count_tokens(&self, req: &ChatRequest) -> Option<Result<u64, BackendError>> {
        for e in self
            .inner
            .eps()
            .iter()
            .filter(|e| !e.removed.load(Ordering::Relaxed))
        {
            if let Some(r) = e.backend.count_tokens(req).await {
                return Some(r);
            }
        }
        None
    }

    async fn probe(&self) -> Result<(), BackendError> {
        let now = crate::breaker::now();
        if self.inner.eps().iter().any(|e| e.eligible(now)) {
            Ok(())
        } else {
            Err(BackendError::Unavailable(format!(
                "no endpoint of the {} pool is up",
                self.inner.cfg.tier
            )))
        }
    }

    fn manages_timeouts(&self) -> bool {
        true
    }

    fn as_pool(&self) -> Option<&Pool> {
        Some(self)
    }

    async fn set_model(&self, model: &str) -> Result<(), BackendError> {
        // This node's engine is the member whose model can change; the others are set where they run.
        let eps = self.inner.eps();
        let mut first = None;
        for e in eps.iter().filter(|e| !e.removed.load(Ordering::Relaxed)) {
            match e.backend.set_model(model).await {
                Ok(()) => return Ok(()),
                Err(err) => {
                    first.get_or_insert(err);
                }
            }
        }
        Err(first.unwrap_or_else(|| BackendError::BadRequest("the pool has no endpoint".into())))
    }

    fn stopped(&self) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let all: Vec<_> = self
            .inner
            .eps()
            .iter()
            .map(|e| e.backend.stopped())
            .collect();
        Box::pin(async move {
            futures_util::future::join_all(all).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ChatCompletionRequest, Limits};

    fn req(messages: Vec<Message>) -> ChatRequest {
        ChatCompletionRequest {
            messages,
            ..Default::default()
        }
        .validate(&Limits::default())
        .unwrap()
    }

    #[test]
    fn a_conversation_keeps_its_key_as_it_grows() {
        let sys = Message::system("be brief");
        let first = req(vec![sys.clone(), Message::user("hi")]);
        let later = req(vec![
            sys.clone(),
            Message::user("hi"),
            Message::assistant(Some("hello".into()), vec![]),
            Message::user("more"),
        ]);
        let other = req(vec![sys, Message::user("bye")]);
        assert_eq!(conversation_key(&first), conversation_key(&later));
        assert_ne!(conversation_key(&first), conversation_key(&other));
    }

    #[test]
    fn affinity_gives_way_only_to_a_real_imbalance() {
        assert!(!imbalanced(3, 0), "within the absolute threshold");
        assert!(!imbalanced(12, 10), "within the relative threshold");
        assert!(imbalanced(5, 0));
        assert!(imbalanced(20, 10));
    }
}
