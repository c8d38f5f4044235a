//! The tier registry and the request path: classify, walk the fallback chain past disabled tiers and open
//! breakers, enforce per-tier concurrency and timeouts, and keep one uninterrupted answer for the client even
//! when a tier fails mid-stream (the next tier continues from the text already sent).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};

use crate::RouterError;
use crate::api::{ChatRequest, Routing, Usage};
use crate::backend::{Backend, BackendError, BackendHealth, Chunk};
use crate::breaker::{BreakerConfig, BreakerSnapshot, BreakerState, CircuitBreaker};
use crate::classify::{
    Classifier, ClassifierConfig, ClassifyError, ClassifyInput, Decision, Rule, Tier,
    fallback_chain,
};
use crate::pool::{EndpointSpec, Pool, PoolConfig, conversation_key};

/// What the client receives, in order: answer pieces, then exactly one `End` (or an `Error` when nothing
/// could answer).
#[derive(Debug, Clone)]
pub enum Output {
    /// A piece of the answer.
    Chunk(Chunk),
    /// Still waiting for a tier (SSE keep-alive opportunity).
    Waiting,
    /// The answer is complete.
    End {
        /// Why it ended.
        finish_reason: crate::backend::FinishReason,
        /// Token usage (prompt of the answering tier, completion over all tiers).
        usage: Usage,
        /// Routing metadata.
        routing: Routing,
        /// The stop string that ended the answer, when the answering tier says one did.
        stop_sequence: Option<String>,
    },
    /// No tier could answer.
    Error(RouterError),
}

/// Per-tier settings the router needs.
#[derive(Debug, Clone)]
pub struct TierSettings {
    /// Takes requests.
    pub enabled: bool,
    /// Parallel requests.
    pub max_concurrency: usize,
    /// Waiting requests before "busy".
    pub max_queue: usize,
    /// Time to first token.
    pub first_token_timeout: Duration,
    /// Time between chunks.
    pub idle_timeout: Duration,
    /// Breaker settings.
    pub breaker: BreakerConfig,
    /// Model ids that select this tier.
    pub aliases: Vec<String>,
    /// Largest `max_tokens` this tier accepts: an explicit request above it is a 400; on a fallback the
    /// request is clamped to it.
    pub max_tokens: Option<u32>,
    /// Frames a video is sampled into here (None: the tier's default, [`video_sampling`]).
    pub video_frames: Option<usize>,
    /// Seconds from a video's start the frames are spread over (None: the tier's default).
    pub video_seconds: Option<f64>,
}

/// How `tier` samples a video: `video_frames` frames over the first `video_seconds`, by default the
/// original design's table (fast 4 frames over 30 s, primary 8 over 60 s, heavy 16 over 120 s: the larger
/// the model, the more of the video it is shown).
pub fn video_sampling(tier: Tier, s: &TierSettings) -> jemma_media::video::VideoParams {
    let (frames, seconds) = match tier {
        Tier::Fast => (4, 30.0),
        Tier::Primary => (8, 60.0),
        Tier::Heavy => (16, 120.0),
    };
    jemma_media::video::VideoParams {
        frames: s.video_frames.unwrap_or(frames).max(1),
        max_seconds: s.video_seconds.unwrap_or(seconds),
        ..Default::default()
    }
}

struct TierSlot {
    tier: Tier,
    /// Replaced when the tier becomes a pool at run time ([`TierRouter::join`]); a request holds the one
    /// it started on.
    backend: std::sync::RwLock<Arc<dyn Backend>>,
    /// The most requests the tier runs at once: `max_concurrency`, grown and shrunk as endpoints join and
    /// leave its pool.
    ceiling: AtomicUsize,
    breaker: CircuitBreaker,
    enabled: AtomicBool,
    waking: AtomicBool,
    served: std::sync::atomic::AtomicU64,
    slots: Arc<Semaphore>,
    /// How many run slots `slots` has now: `max_concurrency`, or fewer while the backend runs fewer at
    /// once ([`TierSlot::fit_slots`]).
    limit: std::sync::Mutex<usize>,
    queue: Arc<Semaphore>,
    settings: TierSettings,
}

/// A held run slot; given back when the request leaves the tier, or retired then if the backend now runs
/// fewer requests at once than the tier has slots.
struct RunSlot {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    slot: Arc<TierSlot>,
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        let Some(p) = self.permit.take() else { return };
        let Some(cap) = self.slot.backend().capacity() else {
            return;
        };
        let want = cap.clamp(1, self.slot.ceiling.load(Ordering::Relaxed).max(1));
        let mut limit = self.slot.limit.lock().unwrap_or_else(|e| e.into_inner());
        if want < *limit {
            p.forget();
            *limit -= 1;
        }
    }
}

impl TierSlot {
    /// The backend serving the tier now.
    fn backend(&self) -> Arc<dyn Backend> {
        self.backend
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Matches the run slots to what the backend runs at once now ([`Backend::capacity`], at most
    /// `max_concurrency`): when an engine's memory budget gave it a smaller batch, the requests beyond it
    /// wait here, told they are waiting and with no first-token clock running, rather than in the
    /// engine's own queue. Slots held by running requests are taken away as those requests end
    /// ([`RunSlot`]).
    fn fit_slots(&self) {
        let Some(cap) = self.backend().capacity() else {
            return;
        };
        let want = cap.clamp(1, self.ceiling.load(Ordering::Relaxed).max(1));
        let mut limit = self.limit.lock().unwrap_or_else(|e| e.into_inner());
        if want > *limit {
            self.slots.add_permits(want - *limit);
            *limit = want;
        } else if want < *limit {
            *limit -= self.slots.forget_permits(*limit - want);
        }
    }
}

/// Snapshot of one tier for `/health`, `/v1/models` and the tray.
#[derive(Debug, Clone, Serialize)]
pub struct TierStatus {
    /// Tier name.
    pub tier: Tier,
    /// Whether it takes requests.
    pub enabled: bool,
    /// Waking from a cold start (warm-up in flight).
    pub waking: bool,
    /// Breaker.
    pub breaker: BreakerSnapshot,
    /// Backend's own health.
    pub backend: BackendHealth,
    /// Requests running now.
    pub in_flight: usize,
    /// Requests this tier answered since start.
    pub served: u64,
}

/// The tier registry and request router.
pub struct TierRouter {
    tiers: BTreeMap<Tier, Arc<TierSlot>>,
    classifier: Classifier,
    memory: Option<MemoryStatusFn>,
    /// Conversation ([`conversation_key`]) → the largest tier that answered it: a later turn the rules
    /// would send lower stays there (its warm prefix, its voice), as LiteLLM's and Bifrost's complexity
    /// routers keep a session's tier.
    conversations: std::sync::Mutex<lru::LruCache<u64, Tier>>,
}

/// Conversations whose tier is remembered.
const CONVERSATIONS: usize = 8192;

/// Reads the shared memory budget's figures (for `/health`).
pub type MemoryStatusFn = Arc<dyn Fn() -> Value + Send + Sync>;

fn client_error(e: &BackendError) -> RouterError {
    match e {
        BackendError::Refused(r) | BackendError::Unread(r) => r.clone(),
        e => RouterError::InvalidRequest {
            message: e.to_string(),
            param: None,
        },
    }
}

/// The key a conversation's tier is remembered under: its opening ([`conversation_key`]: the system prompt
/// and first user message) and its first answer's text, so that two conversations that open alike (every
/// "hi") are still two. A request with an answer in its history is keyed by that answer; a first turn has
/// none, so it is looked up under nothing (it starts where the rules say) and remembered under the answer
/// it got (`answer`). None: nothing to key on.
fn tier_key(req: &ChatRequest, answer: Option<&str>) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let opening = conversation_key(req)?;
    let first_answer = req.messages.iter().find_map(|m| match m {
        crate::api::Message::Assistant(a) => {
            Some(a.content.as_ref().map(|c| c.text()).unwrap_or_default())
        }
        _ => None,
    });
    let text = match (first_answer, answer) {
        (Some(t), _) => t,
        (None, Some(a)) => a.to_string(),
        (None, None) => return None,
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (opening, text.trim()).hash(&mut h);
    Some(h.finish())
}

/// Waits that a backend bounds itself ([`Backend::manages_timeouts`]).
const UNBOUNDED: Duration = Duration::from_secs(365 * 24 * 3600);

/// Milliseconds since `t`, on the router's clock ([`crate::breaker::now`], which a test may pause).
fn elapsed_ms(t: Instant) -> u64 {
    crate::breaker::now()
        .saturating_duration_since(t)
        .as_millis() as u64
}

impl TierRouter {
    /// Builds a router over configured backends.
    pub fn new(
        classifier: ClassifierConfig,
        tiers: Vec<(Tier, Arc<dyn Backend>, TierSettings)>,
    ) -> Self {
        let mut map = BTreeMap::new();
        let mut cc = classifier;
        for (tier, backend, settings) in tiers {
            for a in &settings.aliases {
                cc.model_aliases.insert(a.clone(), tier);
            }
            cc.model_aliases.entry(backend.model()).or_insert(tier);
            let breaker = CircuitBreaker::new(settings.breaker.clone());
            let t = tier;
            breaker.on_transition(Box::new(move |from, to| {
                tracing::warn!(tier = %t, from, to, "circuit breaker transition");
                metrics::counter!("jemma_breaker_transitions_total", "tier" => t.as_str(), "to" => to.to_string()).increment(1);
            }));
            map.insert(
                tier,
                Arc::new(TierSlot {
                    tier,
                    enabled: AtomicBool::new(settings.enabled),
                    waking: AtomicBool::new(false),
                    served: std::sync::atomic::AtomicU64::new(0),
                    slots: Arc::new(Semaphore::new(settings.max_concurrency)),
                    limit: std::sync::Mutex::new(settings.max_concurrency),
                    queue: Arc::new(Semaphore::new(
                        settings.max_concurrency + settings.max_queue,
                    )),
                    backend: std::sync::RwLock::new(backend),
                    ceiling: AtomicUsize::new(settings.max_concurrency),
                    breaker,
                    settings,
                }),
            );
        }
        Self {
            tiers: map,
            classifier: Classifier::new(cc),
            memory: None,
            conversations: std::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(CONVERSATIONS).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
        }
    }

    /// Reports the local models' memory budget in [`TierRouter::memory_status`].
    pub fn with_memory_status(mut self, f: MemoryStatusFn) -> Self {
        self.memory = Some(f);
        self
    }

    /// Memory budget figures (limit, reserved, available, pressure), when local tiers exist.
    pub fn memory_status(&self) -> Option<Value> {
        self.memory.as_ref().map(|f| f())
    }

    /// Switches a tier to another model without restarting (see [`Backend::set_model`]); returns when the
    /// new model serves.
    pub async fn set_model(&self, tier: Tier, model: &str) -> Result<(), RouterError> {
        let s = self
            .tiers
            .get(&tier)
            .ok_or_else(|| RouterError::UnknownModel(tier.to_string()))?
            .clone();
        tracing::info!(%tier, %model, "changing the tier's model");
        s.backend().set_model(model).await.map_err(|e| match e {
            BackendError::BadRequest(m) => RouterError::InvalidRequest {
                message: m,
                param: Some("model".into()),
            },
            BackendError::Busy(_) => RouterError::Busy {
                retry_after_secs: 5,
            },
            other => RouterError::AllTiersDown {
                fallback: vec![format!("{tier}: {other}")],
                retry_after_secs: None,
            },
        })?;
        // A new model starts with a clean record.
        s.breaker.reset();
        Ok(())
    }

    /// Adds `endpoint` to `tier`'s pool while the gateway serves (a peer's tier joining this node's). A
    /// tier served by one backend becomes a pool of that backend (`first`: its name and whether it is
    /// probed) and the newcomer, with the tier's timeouts and breaker settings. The tier runs the
    /// newcomer's `max_concurrency` more requests at once (its queue keeps its length).
    ///
    /// Errors: an unknown tier; a member with the newcomer's name. Call within a Tokio runtime (the pool's
    /// prober runs on it).
    pub fn join(
        &self,
        tier: Tier,
        first: (&str, bool),
        endpoint: EndpointSpec,
    ) -> Result<(), RouterError> {
        let s = self
            .tiers
            .get(&tier)
            .ok_or_else(|| RouterError::UnknownModel(tier.to_string()))?;
        let add = endpoint.max_concurrency.max(1);
        let invalid = |message: String| RouterError::InvalidRequest {
            message,
            param: Some("name".into()),
        };
        let mut b = s.backend.write().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = b.as_pool() {
            pool.add_endpoint(endpoint).map_err(invalid)?;
        } else {
            if endpoint.name == first.0 {
                return Err(invalid(format!(
                    "the {tier} tier's own backend is named {}",
                    first.0
                )));
            }
            let cfg = PoolConfig {
                first_token_timeout: s.settings.first_token_timeout,
                idle_timeout: s.settings.idle_timeout,
                breaker: s.settings.breaker.clone(),
                ..PoolConfig::new(tier.as_str())
            };
            let own = EndpointSpec {
                name: first.0.to_string(),
                backend: b.clone(),
                weight: 1.0,
                max_concurrency: s.ceiling.load(Ordering::Relaxed).max(1),
                probe: first.1,
            };
            tracing::info!(%tier, "the tier becomes a pool");
            *b = Arc::new(Pool::new(cfg, vec![own, endpoint]));
        }
        drop(b);
        s.ceiling.fetch_add(add, Ordering::Relaxed);
        s.queue.add_permits(add);
        s.fit_slots();
        Ok(())
    }

    /// Takes the endpoint `name` out of `tier`'s pool (its running answers finish); returns whether it was
    /// a member. The tier stays a pool, of the members left.
    ///
    /// Errors: an unknown tier; `name` is the pool's last member.
    pub fn leave(&self, tier: Tier, name: &str) -> Result<bool, RouterError> {
        let s = self
            .tiers
            .get(&tier)
            .ok_or_else(|| RouterError::UnknownModel(tier.to_string()))?;
        let b = s.backend();
        let Some(pool) = b.as_pool() else {
            return Ok(false);
        };
        let Some(n) =
            pool.remove_endpoint(name)
                .map_err(|message| RouterError::InvalidRequest {
                    message,
                    param: Some("name".into()),
                })?
        else {
            return Ok(false);
        };
        let _ = s
            .ceiling
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some(c.saturating_sub(n).max(1))
            });
        // Queue places free now are taken away at once, those in use as their requests leave.
        let rest = n - s.queue.forget_permits(n);
        if rest > 0 {
            let q = s.queue.clone();
            tokio::spawn(async move {
                for _ in 0..rest {
                    match q.clone().acquire_owned().await {
                        Ok(p) => p.forget(),
                        Err(_) => return,
                    }
                }
            });
        }
        s.fit_slots();
        Ok(true)
    }

    /// The members of `tier`'s pool (empty when the tier is one backend or unknown).
    pub fn endpoints(&self, tier: Tier) -> Vec<String> {
        self.tiers
            .get(&tier)
            .and_then(|s| s.backend().as_pool().map(Pool::endpoint_names))
            .unwrap_or_default()
    }

    /// Resolves when every tier's backend has stopped (for in-process engines: their model threads ended
    /// and freed their models), which needs every handle to them dropped first. A process awaits this
    /// before exiting so that no engine frees its model during exit.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let all: Vec<_> = self.tiers.values().map(|s| s.backend().stopped()).collect();
        async move {
            futures_util::future::join_all(all).await;
        }
    }

    /// Configured tiers.
    pub fn tiers(&self) -> Vec<Tier> {
        self.tiers.keys().copied().collect()
    }

    /// Status of every tier (cheap; never waits on a generation).
    pub fn status(&self) -> Vec<TierStatus> {
        self.tiers
            .values()
            .map(|s| {
                let snap = s.breaker.snapshot();
                metrics::gauge!("jemma_breaker_open", "tier" => s.tier.as_str()).set(
                    if snap.state == BreakerState::Closed {
                        0.0
                    } else {
                        1.0
                    },
                );
                TierStatus {
                    tier: s.tier,
                    enabled: s.enabled.load(Ordering::Relaxed),
                    waking: s.waking.load(Ordering::Relaxed),
                    breaker: snap,
                    backend: s.backend().health(),
                    in_flight: (*s.limit.lock().unwrap_or_else(|e| e.into_inner()))
                        .saturating_sub(s.slots.available_permits()),
                    served: s.served.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Turns a tier on or off (the tray's heavy toggle). Turning it on resets its breaker.
    pub fn set_enabled(&self, tier: Tier, on: bool) -> Result<(), RouterError> {
        let s = self
            .tiers
            .get(&tier)
            .ok_or_else(|| RouterError::UnknownModel(tier.to_string()))?;
        let was = s.enabled.swap(on, Ordering::SeqCst);
        if on && !was {
            s.breaker.reset();
        }
        tracing::info!(%tier, enabled = on, "tier toggled");
        Ok(())
    }

    /// Sends a one-token request so a cold tier (Cloud Run scale-to-zero) starts now; marks it `waking`
    /// until it answers. Returns whether it answered.
    pub async fn warm_up(&self, tier: Tier) -> Result<bool, RouterError> {
        let s = self
            .tiers
            .get(&tier)
            .ok_or_else(|| RouterError::UnknownModel(tier.to_string()))?
            .clone();
        s.waking.store(true, Ordering::SeqCst);
        let req = ChatRequest {
            requested_model: tier.to_string(),
            messages: vec![crate::api::Message::user("ping")],
            tools: None,
            tool_choice: None,
            parallel_tool_calls: None,
            max_tokens: Some(1),
            temperature: Some(0.0),
            top_p: None,
            top_k: None,
            min_p: None,
            stop: vec![],
            seed: None,
            presence_penalty: None,
            frequency_penalty: None,
            repetition_penalty: None,
            logit_bias: vec![],
            logprobs: false,
            top_logprobs: 0,
            response_format: Default::default(),
            // Not set: an upstream that reads only OpenAI's fields would refuse a thinking switch, and
            // Gemma 4's template does not think unless asked.
            enable_thinking: None,
            reasoning_effort: None,
            thinking_token_budget: None,
            stream: true,
            include_usage: false,
            has_images: false,
            images: vec![],
            has_audio: false,
            audio: vec![],
            has_videos: false,
            videos: vec![],
            video_sampling: None,
            text: "ping".into(),
            last_user: "ping".into(),
            prompt_tokens_estimate: 1,
            raw_prompt: None,
            forwarded: false,
        };
        let ok = match s.backend().start(&req, None).await {
            Ok(mut rx) => {
                let deadline = tokio::time::sleep(s.settings.first_token_timeout);
                tokio::pin!(deadline);
                let mut ok = false;
                loop {
                    tokio::select! {
                        _ = &mut deadline => break,
                        c = rx.recv() => match c {
                            Some(Ok(Chunk::Done { .. })) => { ok = true; break }
                            Some(Ok(_)) => {}
                            _ => break,
                        }
                    }
                }
                ok
            }
            Err(_) => false,
        };
        s.waking.store(false, Ordering::SeqCst);
        Ok(ok)
    }

    /// Routes a request. The returned receiver yields the answer; dropping it cancels the work (and does
    /// not count against any breaker).
    pub fn chat(self: &Arc<Self>, req: ChatRequest) -> Result<mpsc::Receiver<Output>, RouterError> {
        self.route(req).map(|(_, rx)| rx)
    }

    /// [`TierRouter::chat`], also returning the tier the classifier chose first (the answer's `_routing`
    /// says which tier finally answered).
    pub fn route(
        self: &Arc<Self>,
        req: ChatRequest,
    ) -> Result<(Tier, mpsc::Receiver<Output>), RouterError> {
        let (decision, chain) = self.plan(&req)?;
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        let first = chain.first().copied().unwrap_or(decision.tier);
        tokio::spawn(async move {
            let named = matches!(decision.rule, Rule::ExplicitTier | Rule::ModelAlias);
            me.drive(req, named, decision.reason, chain, tx).await;
        });
        Ok((first, rx))
    }

    /// How many tokens `req`'s prompt takes on the tier that would answer it (Anthropic's
    /// `count_tokens`), counted by that tier's own tokenizer and chat template without running the model.
    /// Tiers that cannot count (OpenAI-compatible upstreams) are passed over for the next one in the
    /// fallback chain, as are disabled ones: Gemma 4's models share one tokenizer and template.
    ///
    /// Errors: the request's own (400), a tier's failure (the last one, as [`RouterError::AllTiersDown`]),
    /// or no tier that can count.
    pub async fn count_tokens(&self, req: &ChatRequest) -> Result<(Tier, u64), RouterError> {
        let (_, chain) = self.plan(req)?;
        let mut fallback = vec![];
        for tier in chain {
            let slot = &self.tiers[&tier];
            if !slot.enabled.load(Ordering::Relaxed) {
                fallback.push(format!("{tier}: disabled"));
                continue;
            }
            match slot.backend().count_tokens(req).await {
                None => fallback.push(format!("{tier}: cannot count tokens")),
                Some(Ok(n)) => return Ok((tier, n)),
                Some(Err(e)) if !e.is_tier_failure() => return Err(client_error(&e)),
                Some(Err(e)) => fallback.push(format!("{tier}: {e}")),
            }
        }
        Err(RouterError::AllTiersDown {
            fallback,
            retry_after_secs: None,
        })
    }

    /// The first configured, enabled tier that is `able`, down `from`'s fallback chain and then up from it
    /// (the nearest larger first, so a small request is not sent to the largest model, which a conversation
    /// would then keep): where an automatic choice moves when its tier's model cannot serve the request.
    fn first_able(&self, from: Tier, able: impl Fn(&Tier) -> bool) -> Option<Tier> {
        fallback_chain(from)
            .into_iter()
            .chain(std::iter::successors(from.next_larger(), |t| {
                t.next_larger()
            }))
            .find(|t| {
                able(t)
                    && self
                        .tiers
                        .get(t)
                        .is_some_and(|s| s.enabled.load(Ordering::Relaxed))
            })
    }

    /// The tier the classifier chooses for `req` and the fallback chain from it, over configured tiers.
    fn plan(&self, req: &ChatRequest) -> Result<(Decision, Vec<Tier>), RouterError> {
        let mut decision = self
            .classifier
            .classify(&ClassifyInput {
                model: Some(req.requested_model.as_str()),
                text: &req.text,
                last_user: &req.last_user,
                prompt_tokens: req.prompt_tokens_estimate,
                has_images: req.has_images,
                has_audio: req.has_audio,
                has_video: req.has_videos,
                has_tools: req.tools.is_some(),
                max_tokens: req.max_tokens,
            })
            .map_err(|e| match e {
                ClassifyError::UnknownModel(m) => RouterError::UnknownModel(m),
            })?;
        // A conversation never moves down a tier on its own; a tier the client names is taken as named.
        if !matches!(decision.rule, Rule::ExplicitTier | Rule::ModelAlias)
            && let Some(k) = tier_key(req, None)
            && let Some(t) = self
                .conversations
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&k)
                .copied()
            && t > decision.tier
            && self.tiers.contains_key(&t)
        {
            decision = Decision {
                reason: format!(
                    "conversation continues on {t} (rules chose {}: {})",
                    decision.tier, decision.reason
                ),
                tier: t,
                rule: Rule::Conversation,
            };
        }
        // Images and audio go where a model can take them: an automatic choice whose tier's model is known
        // not to is moved to one that is not (a named tier is taken as named, and refuses them itself).
        let media = req.media_modalities();
        let sees = |t: &Tier| {
            self.tiers
                .get(t)
                .is_some_and(|s| !s.backend().health().refuses_any(&media))
        };
        if let Some(what) = req.media_words()
            && !matches!(decision.rule, Rule::ExplicitTier | Rule::ModelAlias)
            && self.tiers.contains_key(&decision.tier)
            && !sees(&decision.tier)
            && let Some(t) = self.first_able(decision.tier, sees)
        {
            decision = Decision {
                reason: format!(
                    "{what} → {t}: the {} tier's model cannot {}",
                    decision.tier,
                    match (req.has_images || req.has_videos, req.has_audio) {
                        (true, true) => "see and hear them",
                        (false, true) => "hear it",
                        _ if req.has_images => "see them",
                        _ => "see it",
                    }
                ),
                tier: t,
                rule: decision.rule,
            };
        }
        // A chat goes where a model can render it: an automatic choice whose tier serves a base model (no
        // chat template: it answers /v1/completions only) is moved to one that chats and takes its media.
        let chats = |t: &Tier| {
            self.tiers
                .get(t)
                .is_some_and(|s| !s.backend().health().refuses_chat())
        };
        if req.raw_prompt.is_none()
            && !matches!(decision.rule, Rule::ExplicitTier | Rule::ModelAlias)
            && self.tiers.contains_key(&decision.tier)
            && !chats(&decision.tier)
            && let Some(t) = self.first_able(decision.tier, |t| chats(t) && sees(t))
        {
            decision = Decision {
                reason: format!(
                    "chat → {t}: the {} tier's model has no chat template (a base model; {})",
                    decision.tier, decision.reason
                ),
                tier: t,
                rule: decision.rule,
            };
        }
        // Fields go where they are read: an automatic choice whose tier's upstream is known not to read
        // one the request sets (it would refuse it, `crate::dialect`) is moved to one that reads them, its
        // media and its chat. (One not learned yet refuses when asked, and the walk goes on from it.)
        let unread = |t: &Tier| {
            self.tiers
                .get(t)
                .and_then(|s| s.backend().health().dialect)
                .map(|d| d.unread_fields(req))
                .unwrap_or_default()
        };
        let reads = |t: &Tier| unread(t).is_empty();
        let moved_off = unread(&decision.tier);
        if !moved_off.is_empty()
            && !matches!(decision.rule, Rule::ExplicitTier | Rule::ModelAlias)
            && self.tiers.contains_key(&decision.tier)
            && let Some(t) = self.first_able(decision.tier, |t| {
                reads(t) && sees(t) && (req.raw_prompt.is_some() || chats(t))
            })
        {
            decision = Decision {
                reason: format!(
                    "{} → {t}: the {} tier's upstream does not read {} ({})",
                    moved_off.join(", "),
                    decision.tier,
                    if moved_off.len() == 1 { "it" } else { "them" },
                    decision.reason
                ),
                tier: t,
                rule: decision.rule,
            };
        }
        // An explicitly named tier that is not configured is a client error; an automatic choice walks down
        // to what exists.
        let explicit = decision.rule == Rule::ExplicitTier;
        if explicit && !self.tiers.contains_key(&decision.tier) {
            return Err(RouterError::UnknownModel(req.requested_model.clone()));
        }
        if explicit
            && let (Some(c), Some(m)) = (
                self.tiers[&decision.tier].settings.max_tokens,
                req.max_tokens,
            )
            && m > c
        {
            return Err(RouterError::InvalidRequest {
                message: format!(
                    "max_tokens {m} exceeds the {} tier's limit of {c}",
                    decision.tier
                ),
                param: Some("max_tokens".into()),
            });
        }
        let mut chain: Vec<Tier> = fallback_chain(decision.tier)
            .into_iter()
            .filter(|t| self.tiers.contains_key(t))
            .collect();
        // A request with media does not fall back to a tier that cannot take them (its answer would be a
        // 400, or worse, blind or deaf), unless no tier left can.
        if !media.is_empty() && chain.iter().any(sees) {
            chain.retain(|t| *t == decision.tier || sees(t));
        }
        // Nor does a chat fall back to a base model (a 400 that would end the walk), unless none left chats:
        // the chosen tier may be disabled, or fail, with a base model below it.
        if req.raw_prompt.is_none() && chain.iter().any(chats) {
            chain.retain(|t| *t == decision.tier || chats(t));
        }
        // Nor to a tier whose upstream is known not to read its fields.
        if chain.iter().any(|t| !reads(t)) && chain.iter().any(reads) {
            chain.retain(|t| *t == decision.tier || reads(t));
        }
        // A request another Jemma node forwarded is served by the tier it named or not at all: that node
        // falls back itself.
        if req.forwarded {
            return if self.tiers.contains_key(&decision.tier) {
                Ok((decision.clone(), vec![decision.tier]))
            } else {
                Err(RouterError::UnknownModel(req.requested_model.clone()))
            };
        }
        let chain = if chain.is_empty() {
            // e.g. auto chose fast but only heavy exists: try whatever is configured, largest first.
            self.tiers.keys().rev().copied().collect()
        } else {
            chain
        };
        Ok((decision, chain))
    }

    /// Records that `tier` answered `req`'s conversation with `answer` (keeping the largest tier seen).
    fn remember(&self, req: &ChatRequest, answer: &str, tier: Tier) {
        if let Some(k) = tier_key(req, Some(answer)) {
            let mut c = self.conversations.lock().unwrap_or_else(|e| e.into_inner());
            let t = c.get(&k).map_or(tier, |&t| t.max(tier));
            c.put(k, t);
        }
    }

    /// Walks `chain` for one request: the first tier that can take it answers, and one that fails hands
    /// over to the next (before its first token: from the start; after: continuing from the text sent).
    /// Sends every chunk to `tx`, then exactly one [`Output::End`] or [`Output::Error`]; returns early,
    /// dropping the tier's stream (which cancels its work), when the client goes away. `named`: the client
    /// named the tier (or an alias of it), which a conversation does not remember.
    async fn drive(
        &self,
        req: ChatRequest,
        named: bool,
        reason: String,
        chain: Vec<Tier>,
        tx: mpsc::Sender<Output>,
    ) {
        let mut walk = Walk::new();
        for (i, tier) in chain.iter().enumerate() {
            let slot = &self.tiers[tier];
            let next = chain.get(i + 1).map(|t| t.as_str()).unwrap_or("none");
            let hop = |why: &str| format!("{}→{}: {}", tier.as_str(), next, why);
            if !slot.enabled.load(Ordering::Relaxed) {
                walk.fallback.push(hop("disabled"));
                continue;
            }
            let Ok(_queued) = slot.queue.clone().try_acquire_owned() else {
                walk.fallback.push(hop("queue full"));
                continue;
            };
            let permit = match slot.breaker.try_acquire() {
                Ok(p) => p,
                Err(rejected) => {
                    walk.busy_only = false;
                    walk.throttled_only = false;
                    walk.soonest(rejected.retry_after_secs_ceil());
                    walk.fallback.push(hop("breaker open"));
                    continue;
                }
            };
            let Some(_run) = wait_for_run_slot(slot, &tx).await else {
                return;
            };
            walk.busy_only = false;
            let cont = (!walk.sent.is_empty()).then_some(walk.sent.as_str());
            if cont.is_some() && req.is_constrained() {
                // Another tier's grammar would start from the beginning, not where this answer broke
                // off: the joined answer would not be what the constraint promised.
                walk.fallback.push(hop(
                    "a constrained answer cannot be continued on another tier",
                ));
                break;
            }
            let req_t = request_for_tier(&req, slot);
            // A pool times out each of its endpoints itself and goes on to the next within the tier.
            let backend = slot.backend();
            let own_timeouts = backend.manages_timeouts();
            let first_limit = if own_timeouts {
                UNBOUNDED
            } else {
                slot.settings.first_token_timeout
            };
            let started = tokio::time::timeout(first_limit, backend.start(&req_t, cont)).await;
            let (run, relayed) = match started {
                Ok(Ok(rx)) => relay(slot, rx, own_timeouts, req.forwarded, &mut walk, &tx).await,
                Ok(Err(e)) => (TierRun::default(), Relayed::Failed(e)),
                Err(_) => (
                    TierRun::default(),
                    Relayed::Failed(BackendError::Timeout(
                        "no response before the first-token timeout".into(),
                    )),
                ),
            };
            match relayed {
                Relayed::ClientGone => return,
                Relayed::Done(end) => {
                    permit.success();
                    if !named {
                        self.remember(&req, &walk.sent, *tier);
                    }
                    slot.served.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(walk.finish(slot, &reason, run, end)).await;
                    return;
                }
                // This tier's upstream would not read a field the request sets: an automatic choice goes
                // on to a tier that may (nothing was sent; no breaker count). A named tier refuses it.
                Relayed::Failed(BackendError::Unread(r)) if !named && walk.sent.is_empty() => {
                    drop(permit);
                    walk.fallback.push(hop(&r.to_string()));
                    walk.unread.get_or_insert(r);
                }
                Relayed::Failed(e) if !e.is_tier_failure() => {
                    // The client's request, not the tier, is at fault: no fallback, no breaker count.
                    permit.success();
                    let _ = tx.send(Output::Error(client_error(&e))).await;
                    return;
                }
                Relayed::Failed(e) => {
                    if e.is_throttle() {
                        // Busy or rate limited: not a fault of the tier.
                        drop(permit);
                    } else {
                        permit.failure();
                        walk.throttled_only = false;
                    }
                    if let BackendError::Upstream {
                        retry_after_secs: Some(secs),
                        ..
                    } = &e
                    {
                        walk.soonest(*secs);
                    }
                    walk.completion_tokens += run.tier_tokens;
                    metrics::counter!("jemma_tier_errors_total", "tier" => tier.as_str())
                        .increment(1);
                    let why = if walk.sent.is_empty() || !run.streamed {
                        e.to_string()
                    } else {
                        format!("{e} after {} chars; continued", walk.sent.chars().count())
                    };
                    if run.streamed {
                        tracing::warn!(%tier, error = %e, "tier failed, falling back");
                    }
                    walk.fallback.push(hop(&why));
                    walk.last_err = Some(e);
                }
            }
        }
        metrics::counter!("jemma_requests_total", "tier" => "none", "status" => "error")
            .increment(1);
        let _ = tx.send(Output::Error(walk.error(chain.len()))).await;
    }
}

/// Waits for one of the tier's run slots, telling the client every 5 s that it is still queued. None: the
/// client went away while waiting (it takes no slot).
async fn wait_for_run_slot(slot: &Arc<TierSlot>, tx: &mpsc::Sender<Output>) -> Option<RunSlot> {
    slot.fit_slots();
    let run = loop {
        tokio::select! {
            // A client that gave up while queued takes no slot (checked first: a slot freed at the same
            // moment goes to the next request instead).
            biased;
            _ = tx.closed() => return None,
            p = slot.slots.clone().acquire_owned() => break p,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                if tx.send(Output::Waiting).await.is_err() { return None; }
            }
        }
    };
    let run = RunSlot {
        permit: Some(run.ok()?),
        slot: slot.clone(),
    };
    (!tx.is_closed()).then_some(run)
}

/// The request as this tier takes it. A client's max_tokens above the tier's ceiling is lowered to it (on
/// fallback: an explicit tier refuses it up front); none set leaves the tier's default, which is within the
/// ceiling and shrinks to fit the context. Videos are sampled as this tier samples them.
fn request_for_tier<'a>(
    req: &'a ChatRequest,
    slot: &TierSlot,
) -> std::borrow::Cow<'a, ChatRequest> {
    let clamp = slot
        .settings
        .max_tokens
        .filter(|c| req.max_tokens.is_some_and(|m| m > *c));
    if clamp.is_none() && !req.has_videos {
        return std::borrow::Cow::Borrowed(req);
    }
    std::borrow::Cow::Owned(ChatRequest {
        max_tokens: clamp.or(req.max_tokens),
        video_sampling: req
            .has_videos
            .then(|| video_sampling(slot.tier, &slot.settings)),
        // Frames sampled for another tier are sampled again for this one.
        videos: vec![],
        ..req.clone()
    })
}

/// What one request's walk down the fallback chain has gathered: the `_routing.fallback` notes, the
/// answer text sent so far (what the next tier continues from), and what decides the final error.
struct Walk {
    t0: Instant,
    fallback: Vec<String>,
    sent: String,
    /// Generated tokens over every tier tried, for `usage` and `_routing`.
    completion_tokens: u64,
    /// Milliseconds from the request to its first token, on whichever tier it came.
    ttft: Option<u64>,
    /// No tier was tried (each disabled or with a full queue): the client gets a 429, not a 503.
    busy_only: bool,
    /// Whether every tier that failed was only throttling (429): then the client gets a 429 with the
    /// upstream's Retry-After rather than a 503.
    throttled_only: bool,
    last_err: Option<BackendError>,
    /// The first tier's refusal of a field its upstream would not read ([`BackendError::Unread`]): the
    /// answer (a 400) when no tier was left that failed otherwise.
    unread: Option<RouterError>,
    /// The soonest any tried tier said it may serve again (an open breaker's cooldown, an upstream's
    /// Retry-After), in whole seconds: what a 503 tells the client.
    retry_after: Option<u64>,
}

impl Walk {
    fn new() -> Self {
        Self {
            t0: crate::breaker::now(),
            fallback: vec![],
            sent: String::new(),
            completion_tokens: 0,
            ttft: None,
            busy_only: true,
            throttled_only: true,
            last_err: None,
            unread: None,
            retry_after: None,
        }
    }

    fn soonest(&mut self, secs: u64) {
        self.retry_after = Some(self.retry_after.map_or(secs, |r| r.min(secs)));
    }

    /// The answer's last message: `usage` and `_routing` over the whole walk, and the tier's metrics.
    fn finish(mut self, slot: &TierSlot, reason: &str, run: TierRun, end: Ended) -> Output {
        let tier = slot.tier;
        let Ended {
            finish_reason,
            usage,
            decode_tps,
            stop_sequence,
        } = end;
        let TierRun {
            prompt_tokens,
            cached_tokens,
            tier_tokens,
            speculative,
            served_by,
            videos,
            ..
        } = run;
        self.completion_tokens += usage.completion_tokens.max(tier_tokens);
        let latency = elapsed_ms(self.t0);
        metrics::counter!("jemma_requests_total", "tier" => tier.as_str(), "status" => "ok")
            .increment(1);
        metrics::histogram!("jemma_request_duration_seconds", "tier" => tier.as_str())
            .record(latency as f64 / 1000.0);
        metrics::counter!("jemma_completion_tokens_total", "tier" => tier.as_str())
            .increment(usage.completion_tokens);
        metrics::counter!("jemma_prompt_tokens_total", "tier" => tier.as_str())
            .increment(prompt_tokens);
        if let Some(t) = decode_tps {
            metrics::gauge!("jemma_tokens_per_second", "tier" => tier.as_str()).set(t);
        }
        if let Some(t) = self.ttft {
            metrics::histogram!("jemma_time_to_first_token_seconds", "tier" => tier.as_str())
                .record(t as f64 / 1000.0);
        }
        if let Some(s) = &speculative {
            metrics::counter!("jemma_speculative_verify_steps_total", "tier" => tier.as_str())
                .increment(s.verify_steps);
            metrics::counter!("jemma_speculative_draft_tokens_total", "tier" => tier.as_str())
                .increment(s.draft_tokens);
            metrics::counter!("jemma_speculative_accepted_tokens_total", "tier" => tier.as_str())
                .increment(s.accepted_tokens);
        }
        metrics::counter!("jemma_prompt_cached_tokens_total", "tier" => tier.as_str())
            .increment(cached_tokens);
        let mut model = slot.backend().model();
        let endpoint = served_by.and_then(|b| {
            for (name, why) in b.retries {
                self.fallback.push(format!("{tier}[{name}]: {why}"));
            }
            model = b.model;
            b.endpoint
        });
        let routing = Routing {
            tier: tier.to_string(),
            model,
            endpoint,
            reason: reason.to_string(),
            latency_ms: latency,
            ttft_ms: self.ttft,
            prompt_tokens,
            cached_tokens,
            completion_tokens: self.completion_tokens,
            fallback: self.fallback,
            tokens_per_second: decode_tps,
            speculative,
            videos,
        };
        // Thinking is counted by the tier that finished (an earlier tier's tokens were continued, not
        // re-counted); an upstream that does not say leaves it out.
        let usage = Usage {
            prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: prompt_tokens + self.completion_tokens,
            prompt_tokens_details: Some(crate::api::PromptTokensDetails {
                cached_tokens,
                audio_tokens: usage.audio_tokens(),
            }),
            completion_tokens_details: usage.completion_tokens_details,
        };
        Output::End {
            finish_reason,
            usage,
            routing,
            stop_sequence,
        }
    }

    /// The error for a walk that no tier finished.
    fn error(self, chain_len: usize) -> RouterError {
        if let Some(r) = self.unread.filter(|_| self.last_err.is_none()) {
            r
        } else if self.busy_only && self.last_err.is_none() {
            RouterError::Busy {
                retry_after_secs: 1,
            }
        } else if self.throttled_only && self.last_err.is_some() {
            RouterError::Busy {
                retry_after_secs: self.retry_after.unwrap_or(1),
            }
        } else {
            match self.last_err {
                Some(BackendError::Timeout(m)) if chain_len == 1 => RouterError::Timeout(m),
                _ => RouterError::AllTiersDown {
                    fallback: self.fallback,
                    retry_after_secs: self.retry_after,
                },
            }
        }
    }
}

/// What one tier's stream reported besides its chunks.
#[derive(Default)]
struct TierRun {
    /// Whether the tier's stream started (a failure after that is logged as a fallback).
    streamed: bool,
    prompt_tokens: u64,
    cached_tokens: u64,
    /// Answer pieces this tier produced (what its `usage` says, when an upstream does not).
    tier_tokens: u64,
    speculative: Option<crate::api::Speculation>,
    served_by: Option<crate::backend::ServedBy>,
    /// How much of each video this tier's model was given.
    videos: Vec<crate::api::VideoSeen>,
}

/// How a tier's `Done` ended the answer.
struct Ended {
    finish_reason: crate::backend::FinishReason,
    usage: Usage,
    /// Decode tokens/s, when the backend knows it.
    decode_tps: Option<f64>,
    /// The stop string that ended it.
    stop_sequence: Option<String>,
}

/// How relaying a tier's stream ended.
enum Relayed {
    Done(Ended),
    Failed(BackendError),
    ClientGone,
}

/// Relays one tier's stream to the client under the tier's first-token and idle deadlines (none for a
/// pool, which keeps its own per endpoint), recording the answer text in `walk` so that a next tier can
/// continue it. [`Chunk::Progress`] goes on only to another Jemma node (`to_peer`), whose own deadlines
/// need it; a client has nothing to see in it.
async fn relay(
    slot: &TierSlot,
    mut rx: crate::backend::ChunkStream,
    own_timeouts: bool,
    to_peer: bool,
    walk: &mut Walk,
    tx: &mpsc::Sender<Output>,
) -> (TierRun, Relayed) {
    let mut run = TierRun {
        streamed: true,
        ..TierRun::default()
    };
    let mut got_token = false;
    loop {
        let limit = if own_timeouts {
            UNBOUNDED
        } else if got_token {
            slot.settings.idle_timeout
        } else {
            slot.settings.first_token_timeout
        };
        let next = tokio::select! {
            r = tokio::time::timeout(limit, rx.recv()) => r,
            // Client gone: the caller drops the backend stream (cancelling the engine) and the breaker
            // permit unresolved.
            _ = tx.closed() => return (run, Relayed::ClientGone),
        };
        let item = match next {
            Err(_) => {
                let e = BackendError::Timeout(format!("no data for {:.0} s", limit.as_secs_f64()));
                return (run, Relayed::Failed(e));
            }
            Ok(None) => {
                let e = BackendError::Broken("backend ended without finishing".into());
                return (run, Relayed::Failed(e));
            }
            Ok(Some(Err(e))) => return (run, Relayed::Failed(e)),
            Ok(Some(Ok(c))) => c,
        };
        match item {
            Chunk::Started {
                prompt_tokens,
                cached_tokens,
                ref videos,
            } => {
                run.prompt_tokens = prompt_tokens;
                run.cached_tokens = cached_tokens;
                run.videos = videos.clone();
                // Before any answer went out, the client may show the prompt's size (Anthropic's
                // `message_start`); a continuing tier's prompt holds the continuation too.
                if prompt_tokens == 0 || !walk.sent.is_empty() || walk.ttft.is_some() {
                    continue;
                }
            }
            Chunk::Done {
                finish_reason,
                usage,
                decode_tps,
                stop_sequence,
                served_by,
                speculative,
            } => {
                run.served_by = served_by;
                run.speculative = speculative;
                if usage.prompt_tokens > 0 {
                    run.prompt_tokens = usage.prompt_tokens;
                }
                if let Some(d) = &usage.prompt_tokens_details {
                    run.cached_tokens = d.cached_tokens;
                }
                run.tier_tokens = usage.completion_tokens.max(run.tier_tokens);
                let end = Ended {
                    finish_reason,
                    usage,
                    decode_tps,
                    stop_sequence,
                };
                return (run, Relayed::Done(end));
            }
            Chunk::Content(ref c) => {
                got_token = true;
                run.tier_tokens += 1;
                walk.sent.push_str(c);
            }
            Chunk::Reasoning(_) | Chunk::ToolCall { .. } => got_token = true,
            Chunk::Logprobs(_) => {}
            // The answer moved without anything to show (a prompt chunk read, a tool call being written):
            // the idle deadline starts over, and the client, which has nothing to see yet, gets the
            // gateway's keep-alives meanwhile.
            Chunk::Progress => {
                got_token = true;
                if !to_peer {
                    continue;
                }
            }
        }
        if walk.ttft.is_none() && got_token && !matches!(item, Chunk::Progress) {
            walk.ttft = Some(elapsed_ms(walk.t0));
        }
        if tx.send(Output::Chunk(item)).await.is_err() {
            return (run, Relayed::ClientGone);
        }
    }
}

/// `/v1/models` entry for a tier.
pub fn model_entry(s: &TierStatus) -> crate::api::Model {
    let state = if !s.enabled {
        "disabled".to_string()
    } else if s.breaker.state != BreakerState::Closed {
        "breaker_open".to_string()
    } else {
        s.backend.state.to_string()
    };
    crate::api::Model {
        id: s.tier.as_str().into(),
        object: "model".into(),
        created: 0,
        owned_by: "jemma".into(),
        root: s.backend.model.clone(),
        state,
        input_modalities: s.backend.input_modalities.clone(),
    }
}
