//! Routing behaviour with scripted backends (the backends are not what these tests are about: the fallback
//! chain, breakers, continuation and cancellation are).
//!
//! Every test runs on tokio's paused clock: a `sleep` here advances virtual time (as soon as every task is
//! idle) and the router's deadlines and cooldowns read that clock (`jemma_router::breaker::now`), so the
//! tests neither wait on nor race the wall clock.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use jemma_router::RouterError;
use jemma_router::api::{ChatCompletionRequest, ChatRequest, Limits, Usage};
use jemma_router::backend::{Backend, BackendError, BackendHealth, Chunk, ChunkStream, Modality};
use jemma_router::breaker::BreakerConfig;
use jemma_router::classify::{ClassifierConfig, Tier};
use jemma_router::route::{Output, TierRouter, TierSettings};
use jemma_router::testing::{Script, Scripted};
use tokio::sync::mpsc;

fn settings(first_token_ms: u64) -> TierSettings {
    TierSettings {
        enabled: true,
        max_concurrency: 2,
        max_queue: 4,
        first_token_timeout: Duration::from_millis(first_token_ms),
        idle_timeout: Duration::from_millis(first_token_ms),
        breaker: BreakerConfig {
            failure_threshold: 3,
            window_secs: 30.0,
            cooldown_secs: 0.3,
        },
        aliases: vec![],
        max_tokens: None,
        video_frames: None,
        video_seconds: None,
    }
}

fn request(model: &str, text: &str) -> ChatRequest {
    ChatCompletionRequest {
        model: Some(model.into()),
        messages: vec![jemma_router::api::Message::user(text)],
        ..Default::default()
    }
    .validate(&Limits::default())
    .unwrap()
}

struct Answer {
    text: String,
    routing: Option<jemma_router::api::Routing>,
    error: Option<RouterError>,
}

async fn collect(mut rx: mpsc::Receiver<Output>) -> Answer {
    let mut a = Answer {
        text: String::new(),
        routing: None,
        error: None,
    };
    while let Some(o) = rx.recv().await {
        match o {
            Output::Chunk(Chunk::Content(c)) => a.text.push_str(&c),
            Output::End { routing, .. } => a.routing = Some(routing),
            Output::Error(e) => a.error = Some(e),
            _ => {}
        }
    }
    a
}

/// A validated one-message request to `model` whose user turn is `parts` (OpenAI content parts).
fn with_parts(model: &str, parts: Vec<serde_json::Value>) -> ChatRequest {
    ChatCompletionRequest {
        model: Some(model.into()),
        messages: vec![
            serde_json::from_value(serde_json::json!({"role": "user", "content": parts})).unwrap(),
        ],
        ..Default::default()
    }
    .validate(&Limits::default())
    .unwrap()
}

fn text_part(text: &str) -> serde_json::Value {
    serde_json::json!({"type": "text", "text": text})
}

/// An image part by URL (never fetched: routing looks at the part only).
fn cat() -> serde_json::Value {
    serde_json::json!({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}})
}

fn router(tiers: Vec<(Tier, Arc<Scripted>, TierSettings)>) -> Arc<TierRouter> {
    Arc::new(TierRouter::new(
        ClassifierConfig::default(),
        tiers
            .into_iter()
            .map(|(t, b, s)| (t, b as Arc<dyn Backend>, s))
            .collect(),
    ))
}

#[tokio::test(start_paused = true)]
async fn explicit_tier_answers_with_routing_metadata() {
    let fast = Scripted::new("e2b", Script::Answer(vec!["Hi", "!"]));
    let r = router(vec![(Tier::Fast, fast.clone(), settings(1000))]);
    let a = collect(r.chat(request("fast", "hello")).unwrap()).await;
    assert_eq!(a.text, "Hi!");
    let routing = a.routing.unwrap();
    assert_eq!(
        (routing.tier.as_str(), routing.model.as_str()),
        ("fast", "e2b")
    );
    assert_eq!(routing.completion_tokens, 2);
    assert!(routing.fallback.is_empty());
}

#[tokio::test(start_paused = true)]
async fn heavy_failure_before_first_token_falls_back_transparently() {
    let heavy = Scripted::new("26b", Script::Fail);
    let primary = Scripted::new("e4b", Script::Answer(vec!["fine"]));
    let r = router(vec![
        (Tier::Heavy, heavy.clone(), settings(1000)),
        (Tier::Primary, primary.clone(), settings(1000)),
    ]);
    let a = collect(r.chat(request("heavy", "analyze this")).unwrap()).await;
    assert_eq!(a.text, "fine");
    let routing = a.routing.unwrap();
    assert_eq!(routing.tier, "primary");
    assert_eq!(routing.fallback.len(), 1);
    assert!(
        routing.fallback[0].starts_with("heavy→primary"),
        "{:?}",
        routing.fallback
    );
}

#[tokio::test(start_paused = true)]
async fn mid_stream_failure_continues_on_the_next_tier_from_the_sent_text() {
    let primary = Scripted::new("e4b", Script::BreakAfter(vec!["The answer ", "is "]));
    let fast = Scripted::new("e2b", Script::Answer(vec!["42."]));
    let r = router(vec![
        (Tier::Primary, primary.clone(), settings(1000)),
        (Tier::Fast, fast.clone(), settings(1000)),
    ]);
    let a = collect(r.chat(request("primary", "question")).unwrap()).await;
    assert_eq!(a.text, "The answer is 42.", "one uninterrupted answer");
    assert_eq!(
        fast.continuations.lock().unwrap()[0].as_deref(),
        Some("The answer is ")
    );
    let routing = a.routing.unwrap();
    assert_eq!(routing.tier, "fast");
    assert!(
        routing.fallback[0].contains("continued"),
        "{:?}",
        routing.fallback
    );
    assert_eq!(
        routing.completion_tokens, 3,
        "tokens of both tiers are counted"
    );
}

#[tokio::test(start_paused = true)]
async fn breaker_opens_after_three_failures_then_half_open_probe_closes_it() {
    let heavy = Scripted::new("26b", Script::Fail);
    let primary = Scripted::new("e4b", Script::Answer(vec!["ok"]));
    let r = router(vec![
        (Tier::Heavy, heavy.clone(), settings(1000)),
        (Tier::Primary, primary.clone(), settings(1000)),
    ]);
    for _ in 0..3 {
        let a = collect(r.chat(request("heavy", "x")).unwrap()).await;
        assert_eq!(a.text, "ok");
    }
    assert_eq!(heavy.calls.load(Ordering::SeqCst), 3);
    let st = r
        .status()
        .into_iter()
        .find(|s| s.tier == Tier::Heavy)
        .unwrap();
    assert_eq!(st.breaker.state.as_str(), "open");
    // While open, heavy is skipped without being called.
    let a = collect(r.chat(request("heavy", "x")).unwrap()).await;
    assert_eq!(heavy.calls.load(Ordering::SeqCst), 3);
    assert!(a.routing.unwrap().fallback[0].contains("breaker open"));
    // After the cooldown one probe goes through; success closes the breaker.
    heavy.set(Script::Answer(vec!["back"]));
    tokio::time::sleep(Duration::from_millis(350)).await;
    let a = collect(r.chat(request("heavy", "x")).unwrap()).await;
    assert_eq!(a.text, "back");
    let st = r
        .status()
        .into_iter()
        .find(|s| s.tier == Tier::Heavy)
        .unwrap();
    assert_eq!(st.breaker.state.as_str(), "closed");
}

#[tokio::test(start_paused = true)]
async fn disabled_tier_is_skipped_and_everything_down_is_503() {
    let heavy = Scripted::new("26b", Script::Answer(vec!["never"]));
    let primary = Scripted::new("e4b", Script::Fail);
    let fast = Scripted::new("e2b", Script::Fail);
    let r = router(vec![
        (Tier::Heavy, heavy.clone(), settings(1000)),
        (Tier::Primary, primary.clone(), settings(1000)),
        (Tier::Fast, fast.clone(), settings(1000)),
    ]);
    r.set_enabled(Tier::Heavy, false).unwrap();
    let a = collect(r.chat(request("heavy", "x")).unwrap()).await;
    assert_eq!(heavy.calls.load(Ordering::SeqCst), 0);
    match a.error {
        Some(RouterError::AllTiersDown { fallback, .. }) => {
            assert_eq!(fallback.len(), 3, "{fallback:?}");
            assert!(fallback[0].contains("disabled"));
        }
        other => panic!("expected AllTiersDown, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn first_token_timeout_falls_back_and_cancels_the_hung_tier() {
    let heavy = Scripted::new("26b", Script::Hang);
    let primary = Scripted::new("e4b", Script::Answer(vec!["ok"]));
    let r = router(vec![
        (Tier::Heavy, heavy.clone(), settings(150)),
        (Tier::Primary, primary, settings(1000)),
    ]);
    let a = tokio::time::timeout(
        Duration::from_secs(5),
        collect(r.chat(request("heavy", "x")).unwrap()),
    )
    .await
    .expect("no request may hang");
    assert_eq!(a.text, "ok");
    assert!(a.routing.unwrap().fallback[0].contains("timed out"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        heavy.cancelled.load(Ordering::SeqCst),
        1,
        "the hung backend's stream was dropped"
    );
}

/// A model writing a long tool call sends nothing the client sees until the call closes (it is sent
/// whole), for longer than the tier's deadlines: the held tokens keep it alive, so neither the first-token
/// nor the idle deadline fails it over, and none of them reaches the client.
#[tokio::test(start_paused = true)]
async fn a_long_tool_call_is_not_a_stall() {
    let primary = Scripted::new(
        "e4b",
        Script::HeldCall {
            held: 20,
            every_ms: 100,
        },
    );
    let fast = Scripted::new("e2b", Script::Answer(vec!["short"]));
    let r = router(vec![
        (Tier::Primary, primary.clone(), settings(250)),
        (Tier::Fast, fast.clone(), settings(250)),
    ]);
    let mut rx = r.chat(request("primary", "write the file")).unwrap();
    let (mut calls, mut routing) = (vec![], None);
    while let Some(o) = rx.recv().await {
        match o {
            Output::Chunk(Chunk::ToolCall { name, .. }) => calls.push(name),
            Output::Chunk(Chunk::Progress) => panic!("progress is not for the client"),
            Output::End { routing: r, .. } => routing = Some(r),
            Output::Error(e) => panic!("{e:?}"),
            _ => {}
        }
    }
    assert_eq!(calls, ["lookup"]);
    let routing = routing.unwrap();
    assert!(routing.fallback.is_empty(), "{:?}", routing.fallback);
    assert_eq!(fast.calls.load(Ordering::SeqCst), 0);

    // Silence is still a stall: the same tier going quiet for longer than its deadline fails over.
    primary.set(Script::HeldCall {
        held: 2,
        every_ms: 400,
    });
    let a = collect(r.chat(request("primary", "write the file")).unwrap()).await;
    assert_eq!(a.text, "short");
    assert!(a.routing.unwrap().fallback[0].contains("timed out"));
}

#[tokio::test(start_paused = true)]
async fn client_disconnect_cancels_without_tripping_the_breaker() {
    let fast = Scripted::new("e2b", Script::Hang);
    let r = router(vec![(Tier::Fast, fast.clone(), settings(60_000))]);
    for _ in 0..4 {
        let rx = r.chat(request("fast", "x")).unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(rx);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fast.cancelled.load(Ordering::SeqCst), 4);
    let st = r.status().into_iter().next().unwrap();
    assert_eq!(
        st.breaker.state.as_str(),
        "closed",
        "cancellations are not failures"
    );
    assert_eq!(st.in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn unknown_model_and_unconfigured_explicit_tier_are_404s() {
    let fast = Scripted::new("e2b", Script::Answer(vec!["x"]));
    let r = router(vec![(Tier::Fast, fast, settings(1000))]);
    assert!(matches!(
        r.chat(request("gpt-4", "x")),
        Err(RouterError::UnknownModel(_))
    ));
    assert!(matches!(
        r.chat(request("heavy", "x")),
        Err(RouterError::UnknownModel(_))
    ));
    // the model id of a backend selects its tier
    let a = collect(r.chat(request("e2b", "x")).unwrap()).await;
    assert_eq!(a.routing.unwrap().tier, "fast");
}

#[tokio::test(start_paused = true)]
async fn per_tier_max_tokens_ceiling_rejects_explicit_and_clamps_fallback() {
    struct Capture(Mutex<Vec<Option<u32>>>);
    #[async_trait]
    impl Backend for Capture {
        fn model(&self) -> String {
            "cap".into()
        }
        async fn start(
            &self,
            req: &ChatRequest,
            _c: Option<&str>,
        ) -> Result<ChunkStream, BackendError> {
            self.0.lock().unwrap().push(req.max_tokens);
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                let _ = tx
                    .send(Ok(Chunk::Done {
                        stop_sequence: None,
                        served_by: None,
                        speculative: None,
                        finish_reason: jemma_router::backend::FinishReason::Stop,
                        usage: Usage::default(),
                        decode_tps: None,
                    }))
                    .await;
            });
            Ok(rx)
        }
        fn health(&self) -> BackendHealth {
            BackendHealth::default()
        }
    }
    let heavy = Scripted::new("26b", Script::Fail);
    let fast = Arc::new(Capture(Mutex::new(vec![])));
    let mut small = settings(1000);
    small.max_tokens = Some(64);
    let r = Arc::new(TierRouter::new(
        ClassifierConfig::default(),
        vec![
            (Tier::Heavy, heavy as Arc<dyn Backend>, settings(1000)),
            (Tier::Fast, fast.clone() as Arc<dyn Backend>, small),
        ],
    ));
    let mut req = request("fast", "x");
    req.max_tokens = Some(500);
    match r.chat(req) {
        Err(RouterError::InvalidRequest { param, message }) => {
            assert_eq!(param.as_deref(), Some("max_tokens"));
            assert!(message.contains("64"), "{message}");
        }
        other => panic!("expected a 400, got {:?}", other.map(|_| ())),
    }
    let mut req = request("heavy", "x");
    req.max_tokens = Some(500);
    let a = collect(r.chat(req).unwrap()).await;
    assert!(a.routing.is_some());
    assert_eq!(
        fast.0.lock().unwrap().as_slice(),
        &[Some(64)],
        "the fallback tier got the clamped value"
    );
    // None set: the tier's own default applies (it is within the ceiling and fits the context), not
    // the ceiling as if the client had asked for it.
    let a = collect(r.chat(request("heavy", "x")).unwrap()).await;
    assert!(a.routing.is_some());
    assert_eq!(fast.0.lock().unwrap().as_slice(), &[Some(64), None]);
}

/// A backend that runs fewer requests at once than the tier's `max_concurrency` (an engine whose memory
/// budget shrank its batch) gets only that many; the rest wait in the router, and the slots come back when
/// the backend can take more.
#[tokio::test(start_paused = true)]
async fn run_slots_follow_what_the_backend_runs_at_once() {
    let fast = Scripted::new("e2b", Script::Hang);
    *fast.capacity.lock().unwrap() = Some(1);
    let mut s = settings(60_000);
    s.max_concurrency = 4;
    let r = router(vec![(Tier::Fast, fast.clone(), s)]);
    let rxs: Vec<_> = (0..3)
        .map(|_| r.chat(request("fast", "hello")).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fast.calls.load(Ordering::SeqCst), 1, "one runs, two wait");
    assert_eq!(r.status()[0].in_flight, 1);
    // The engine reloads with room for three: the next request gives the waiting ones their slots.
    *fast.capacity.lock().unwrap() = Some(3);
    let more = r.chat(request("fast", "hello")).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fast.calls.load(Ordering::SeqCst), 3);
    assert_eq!(r.status()[0].in_flight, 3);
    // The engine shrinks to one while three run: their slots retire as they end, so the next three
    // requests get one slot, not the three freed.
    *fast.capacity.lock().unwrap() = Some(1);
    drop((rxs, more));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(r.status()[0].in_flight, 0);
    let rxs: Vec<_> = (0..3)
        .map(|_| r.chat(request("fast", "hello")).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fast.calls.load(Ordering::SeqCst), 4, "one more runs");
    drop(rxs);
}

/// A 503 tells the client when to come back: the soonest any tried tier may serve again, from an open
/// breaker's remaining cooldown (rounded up to whole seconds) or an upstream's own Retry-After; nothing
/// when no tier said.
#[tokio::test(start_paused = true)]
async fn everything_down_says_when_a_tier_may_serve_again() {
    let retry = |a: Answer| match a.error {
        Some(RouterError::AllTiersDown {
            retry_after_secs, ..
        }) => retry_after_secs,
        other => panic!("expected AllTiersDown, got {other:?}"),
    };
    let heavy = Scripted::new("26b", Script::FailRetryAfter(7));
    let primary = Scripted::new("e4b", Script::Fail);
    let mut slow = settings(1000);
    slow.breaker.cooldown_secs = 30.0;
    let r = router(vec![
        (Tier::Heavy, heavy.clone(), settings(1000)),
        (Tier::Primary, primary.clone(), slow),
    ]);
    // The upstream's Retry-After; the plain 500 says nothing.
    assert_eq!(
        retry(collect(r.chat(request("heavy", "x")).unwrap()).await),
        Some(7)
    );
    assert_eq!(
        retry(collect(r.chat(request("primary", "x")).unwrap()).await),
        None
    );
    // Three failures open each breaker (heavy's requests fall back to primary, so both open): heavy's
    // 0.3 s cooldown is then the soonest, rounded up to 1 s.
    for _ in 0..2 {
        collect(r.chat(request("heavy", "x")).unwrap()).await;
    }
    assert_eq!(
        retry(collect(r.chat(request("heavy", "x")).unwrap()).await),
        Some(1)
    );
    // Only primary's 30 s breaker on the chain.
    let s = retry(collect(r.chat(request("primary", "x")).unwrap()).await);
    assert!(matches!(s, Some(29 | 30)), "{s:?}");
}

// ---- Pools: several endpoints behind one tier ----

use jemma_router::pool::{EndpointSpec, Pool, PoolConfig};

fn pool(endpoints: &[(&str, &Arc<Scripted>, f64)], first_token_ms: u64) -> Arc<Pool> {
    let mut cfg = PoolConfig::new("primary");
    cfg.first_token_timeout = Duration::from_millis(first_token_ms);
    cfg.idle_timeout = Duration::from_millis(first_token_ms);
    cfg.breaker = settings(first_token_ms).breaker;
    // Probed by hand in these tests.
    cfg.probe_interval = Duration::from_secs(3600);
    Arc::new(Pool::new(
        cfg,
        endpoints
            .iter()
            .map(|(name, b, weight)| EndpointSpec {
                name: name.to_string(),
                backend: (*b).clone() as Arc<dyn Backend>,
                weight: *weight,
                max_concurrency: 2,
                probe: true,
            })
            .collect(),
    ))
}

/// A pool's first-token deadline counts from the try's start: a call written slowly from the first token
/// on keeps its endpoint (held tokens are tokens), where silence fails over to the next one.
#[tokio::test(start_paused = true)]
async fn a_pool_keeps_an_endpoint_writing_a_long_call() {
    let a = Scripted::new(
        "e4b-a",
        Script::HeldCall {
            held: 20,
            every_ms: 100,
        },
    );
    let b = Scripted::new("e4b-b", Script::Answer(vec!["other"]));
    let p = pool(&[("a", &a, 1.0), ("b", &b, 0.0)], 250);
    let mut rx = pooled(&p)
        .chat(request("primary", "write the file"))
        .unwrap();
    let mut calls = vec![];
    while let Some(o) = rx.recv().await {
        match o {
            Output::Chunk(Chunk::ToolCall { name, .. }) => calls.push(name),
            Output::Chunk(Chunk::Progress) => panic!("progress is not for the client"),
            Output::Error(e) => panic!("{e:?}"),
            _ => {}
        }
    }
    assert_eq!(calls, ["lookup"]);
    assert_eq!(b.calls.load(Ordering::SeqCst), 0);
}

fn pooled(p: &Arc<Pool>) -> Arc<TierRouter> {
    let mut s = settings(1000);
    s.max_concurrency = 6;
    Arc::new(TierRouter::new(
        ClassifierConfig::default(),
        vec![(Tier::Primary, p.clone() as Arc<dyn Backend>, s)],
    ))
}

/// A request whose messages alternate user and assistant, starting with a user turn.
fn conversation(model: &str, turns: &[&str]) -> ChatRequest {
    use jemma_router::api::Message;
    ChatCompletionRequest {
        model: Some(model.into()),
        messages: turns
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if i % 2 == 0 {
                    Message::user(*t)
                } else {
                    Message::assistant(Some(t.to_string()), vec![])
                }
            })
            .collect(),
        ..Default::default()
    }
    .validate(&Limits::default())
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn pool_spreads_conversations_and_keeps_each_on_one_endpoint() {
    let eps: Vec<_> = (0..3)
        .map(|_| Scripted::new("e4b", Script::Answer(vec!["ok"])))
        .collect();
    let names = ["a", "b", "c"];
    let p = pool(
        &[
            (names[0], &eps[0], 1.0),
            (names[1], &eps[1], 1.0),
            (names[2], &eps[2], 1.0),
        ],
        1000,
    );
    let r = pooled(&p);
    // 30 different conversations spread over all three.
    for i in 0..30 {
        let a = collect(
            r.chat(request("primary", &format!("question {i}")))
                .unwrap(),
        )
        .await;
        assert_eq!(a.text, "ok");
    }
    for e in &eps {
        let n = e.calls.load(Ordering::SeqCst);
        assert!((3..=20).contains(&n), "uneven spread: {n}");
    }
    // Each conversation's later turns go where its first went.
    for c in 0..5 {
        let opening = format!("conversation {c}");
        let mut turns = vec![opening.clone()];
        let mut seen = None;
        for t in 0..6 {
            let refs: Vec<&str> = turns.iter().map(String::as_str).collect();
            let a = collect(r.chat(conversation("primary", &refs)).unwrap()).await;
            let ep = a
                .routing
                .unwrap()
                .endpoint
                .expect("a pool names its endpoint");
            assert!(names.contains(&ep.as_str()));
            assert_eq!(*seen.get_or_insert(ep.clone()), ep, "turn {t} moved");
            turns.push("ok".into());
            turns.push(format!("follow-up {t}"));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn pool_retries_another_endpoint_before_the_next_tier() {
    let bad = Scripted::new("e4b", Script::Fail);
    let good = Scripted::new("e4b", Script::Answer(vec!["fine"]));
    // The weights make `bad` the first choice of every request.
    let p = pool(&[("bad", &bad, 1e6), ("good", &good, 1e-6)], 1000);
    let r = pooled(&p);
    let a = collect(r.chat(request("primary", "x")).unwrap()).await;
    assert_eq!(a.text, "fine");
    let routing = a.routing.unwrap();
    assert_eq!(
        (routing.tier.as_str(), routing.endpoint.as_deref()),
        ("primary", Some("good"))
    );
    assert_eq!(
        routing.fallback,
        vec!["primary[bad]: upstream error 500: boom".to_string()]
    );
    // Three failures open bad's breaker: it is not tried while open, and the tier's own breaker, which
    // only hears of whole-pool failures, stays closed.
    // (New conversations each time: a conversation that `good` answered stays with it.)
    for i in 0..4 {
        collect(r.chat(request("primary", &format!("y{i}"))).unwrap()).await;
    }
    assert_eq!(bad.calls.load(Ordering::SeqCst), 3);
    let st = &r.status()[0];
    assert_eq!(st.breaker.state.as_str(), "closed");
    let eps = st.backend.details["endpoints"].as_array().unwrap().clone();
    assert_eq!(eps[0]["status"], "breaker_open");
    assert_eq!(eps[1]["status"], "up");
}

#[tokio::test(start_paused = true)]
async fn pool_continues_a_broken_stream_on_another_endpoint() {
    let broken = Scripted::new("e4b", Script::BreakAfter(vec!["Hel"]));
    let good = Scripted::new("e4b", Script::Answer(vec!["lo"]));
    let p = pool(&[("broken", &broken, 1e6), ("good", &good, 1e-6)], 1000);
    let r = pooled(&p);
    let a = collect(r.chat(request("primary", "x")).unwrap()).await;
    assert_eq!(a.text, "Hello", "{:?}", a.error);
    assert_eq!(
        *good.continuations.lock().unwrap(),
        vec![Some("Hel".to_string())]
    );
    let routing = a.routing.unwrap();
    assert_eq!(routing.endpoint.as_deref(), Some("good"));
    assert_eq!(
        routing.fallback,
        vec![
            "primary[broken]: stream broken: connection reset after 3 chars; continued".to_string()
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn pool_times_out_a_hung_endpoint_and_cancels_it() {
    let hung = Scripted::new("e4b", Script::Hang);
    let good = Scripted::new("e4b", Script::Answer(vec!["there"]));
    let p = pool(&[("hung", &hung, 1e6), ("good", &good, 1e-6)], 200);
    let r = pooled(&p);
    let t0 = tokio::time::Instant::now();
    let a = collect(r.chat(request("primary", "x")).unwrap()).await;
    assert_eq!(a.text, "there");
    assert!(t0.elapsed() < Duration::from_secs(2));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(hung.cancelled.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn pool_honours_retry_after_and_passes_it_on() {
    let throttled = Scripted::new("e4b", Script::Throttle(1));
    let good = Scripted::new("e4b", Script::Answer(vec!["ok"]));
    let p = pool(
        &[("throttled", &throttled, 1e6), ("good", &good, 1e-6)],
        1000,
    );
    let r = pooled(&p);
    for i in 0..3 {
        let q = format!("x{i}");
        assert_eq!(
            collect(r.chat(request("primary", &q)).unwrap()).await.text,
            "ok"
        );
    }
    // Asked once, then left alone for its Retry-After; a 429 is no fault (its breaker stays closed).
    assert_eq!(throttled.calls.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    throttled.set(Script::Answer(vec!["back"]));
    let a = collect(r.chat(request("primary", "new")).unwrap()).await;
    assert_eq!(a.text, "back");
    // Every endpoint throttling: the client gets a 429 with the soonest Retry-After.
    let t1 = Scripted::new("e4b", Script::Throttle(7));
    let t2 = Scripted::new("e4b", Script::Throttle(3));
    let r = pooled(&pool(&[("t1", &t1, 1.0), ("t2", &t2, 1.0)], 1000));
    let a = collect(r.chat(request("primary", "x")).unwrap()).await;
    assert_eq!(
        a.error,
        Some(RouterError::Busy {
            retry_after_secs: 3
        })
    );
    // Inside the cooldown nothing is asked, and the answer is still a 429, not a failure: the tier's
    // breaker stays closed however many clients retry.
    for i in 0..5 {
        let a = collect(r.chat(request("primary", &format!("again {i}"))).unwrap()).await;
        assert!(
            matches!(a.error, Some(RouterError::Busy { retry_after_secs }) if (1..=3).contains(&retry_after_secs)),
            "{:?}",
            a.error
        );
    }
    assert_eq!(
        (
            t1.calls.load(Ordering::SeqCst),
            t2.calls.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
    assert_eq!(r.status()[0].breaker.state.as_str(), "closed");
}

#[tokio::test(start_paused = true)]
async fn a_request_forwarded_by_a_peer_is_not_sent_on_to_peers_or_other_tiers() {
    let peer = Scripted::new("e4b", Script::Answer(vec!["peer"]));
    peer.peer.store(true, Ordering::SeqCst);
    let local = Scripted::new("e4b", Script::Answer(vec!["local"]));
    let p = pool(&[("peer", &peer, 1e6), ("local", &local, 1e-6)], 1000);
    let fast = Scripted::new("e2b", Script::Answer(vec!["fast"]));
    let r = Arc::new(TierRouter::new(
        ClassifierConfig::default(),
        vec![
            (Tier::Primary, p.clone() as Arc<dyn Backend>, settings(1000)),
            (Tier::Fast, fast.clone() as Arc<dyn Backend>, settings(1000)),
        ],
    ));
    let forwarded = |text: &str| {
        let mut q = request("primary", text);
        q.forwarded = true;
        q
    };
    // A client's request may go to the peer; a forwarded one is served here.
    assert_eq!(
        collect(r.chat(request("primary", "a")).unwrap()).await.text,
        "peer"
    );
    assert_eq!(collect(r.chat(forwarded("b")).unwrap()).await.text, "local");
    // With nothing local left, it fails rather than falling back to fast or going round the peers.
    local.set(Script::Fail);
    let a = collect(r.chat(forwarded("c")).unwrap()).await;
    assert!(a.error.is_some(), "{:?}", a.text);
    assert_eq!(fast.calls.load(Ordering::SeqCst), 0);
    assert_eq!(peer.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn pool_probes_take_an_endpoint_out_and_bring_it_back() {
    let a = Scripted::new("e4b", Script::Answer(vec!["a"]));
    let b = Scripted::new("e4b", Script::Answer(vec!["b"]));
    let p = pool(&[("a", &a, 1.0), ("b", &b, 1.0)], 1000);
    let r = pooled(&p);
    let status = |r: &Arc<TierRouter>| {
        r.status()[0].backend.details["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["status"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    a.up.store(false, Ordering::SeqCst);
    // Out after two failed probes (the default threshold), not one.
    p.probe_all().await;
    assert_eq!(status(&r), ["up", "up"]);
    p.probe_all().await;
    assert_eq!(status(&r), ["down", "up"]);
    for i in 0..6 {
        let ans = collect(r.chat(request("primary", &format!("q{i}"))).unwrap()).await;
        assert_eq!(ans.text, "b");
    }
    assert_eq!(r.status()[0].backend.state.to_string(), "ready");
    a.up.store(true, Ordering::SeqCst);
    p.probe_all().await;
    assert_eq!(status(&r), ["up", "up"]);
    // Back in, with no old error left to read like a live fault.
    assert!(r.status()[0].backend.details["endpoints"][0]["last_error"].is_null());
    let before = a.calls.load(Ordering::SeqCst);
    for i in 0..6 {
        collect(r.chat(request("primary", &format!("again {i}"))).unwrap()).await;
    }
    assert!(a.calls.load(Ordering::SeqCst) > before);
    // Everything out: the tier is unreachable and its requests fail over (503), not hang.
    a.up.store(false, Ordering::SeqCst);
    b.up.store(false, Ordering::SeqCst);
    p.probe_all().await;
    p.probe_all().await;
    assert_eq!(r.status()[0].backend.state.to_string(), "unreachable");
    let ans = collect(r.chat(request("primary", "x")).unwrap()).await;
    assert!(
        matches!(ans.error, Some(RouterError::AllTiersDown { .. })),
        "{:?}",
        ans.error
    );
}

#[tokio::test(start_paused = true)]
async fn a_conversation_keeps_its_tier_and_never_moves_down() {
    let fast = Scripted::new("e2b", Script::Answer(vec!["hi"]));
    let primary = Scripted::new("e4b", Script::Answer(vec!["Compilers..."]));
    let r = router(vec![
        (Tier::Fast, fast.clone(), settings(1000)),
        (Tier::Primary, primary.clone(), settings(1000)),
    ]);
    let opening = "Explain how a compiler turns source code into machine code";
    let a = collect(r.chat(conversation("auto", &[opening])).unwrap()).await;
    assert_eq!(a.routing.unwrap().tier, "primary");
    // "thanks" alone goes to fast ...
    let a = collect(r.chat(conversation("auto", &["thanks"])).unwrap()).await;
    assert_eq!(a.routing.unwrap().tier, "fast");
    // ... but not as the next turn of a primary conversation.
    let a = collect(
        r.chat(conversation("auto", &[opening, "Compilers...", "thanks"]))
            .unwrap(),
    )
    .await;
    let routing = a.routing.unwrap();
    assert_eq!(routing.tier, "primary");
    assert!(
        routing
            .reason
            .starts_with("conversation continues on primary"),
        "{}",
        routing.reason
    );
    // A tier the client names is taken as named (and a conversation moves up freely).
    let a = collect(
        r.chat(conversation("fast", &[opening, "Compilers...", "thanks"]))
            .unwrap(),
    )
    .await;
    assert_eq!(a.routing.unwrap().tier, "fast");
    // Another conversation that opens the same way but got another answer is another conversation.
    let a = collect(
        r.chat(conversation("auto", &[opening, "Something else", "thanks"]))
            .unwrap(),
    )
    .await;
    assert_eq!(a.routing.unwrap().tier, "fast");
    // A tier the client named is not remembered as the conversation's floor.
    let named = "Explain closures";
    collect(r.chat(conversation("primary", &[named])).unwrap()).await;
    let a = collect(
        r.chat(conversation("auto", &[named, "Compilers...", "thanks"]))
            .unwrap(),
    )
    .await;
    assert_eq!(a.routing.unwrap().tier, "fast");
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_that_scales_to_zero_is_not_probed() {
    // `probe = false` (a Cloud Run service): its health says nothing the prober may act on, and it stays in
    // the pool while its answers are good.
    let cold = Scripted::new("e4b", Script::Answer(vec!["cold"]));
    cold.up.store(false, Ordering::SeqCst);
    let mut cfg = PoolConfig::new("heavy");
    cfg.probe_interval = Duration::from_secs(3600);
    let p = Arc::new(Pool::new(
        cfg,
        vec![EndpointSpec {
            name: "run".into(),
            backend: cold.clone() as Arc<dyn Backend>,
            weight: 1.0,
            max_concurrency: 2,
            probe: false,
        }],
    ));
    for _ in 0..3 {
        p.probe_all().await;
    }
    let r = pooled(&p);
    let a = collect(r.chat(request("primary", "x")).unwrap()).await;
    assert_eq!(a.text, "cold");
    assert_eq!(
        r.status()[0].backend.details["endpoints"][0]["status"],
        "up"
    );
}

#[tokio::test(start_paused = true)]
async fn a_tier_becomes_a_pool_when_a_peer_joins_and_runs_more_at_once() {
    // One engine running one request at once, no queue: a second request at the same time is refused.
    let own = Scripted::new("e4b", Script::Hang);
    let mut s = settings(5000);
    s.max_concurrency = 1;
    s.max_queue = 0;
    let r = router(vec![(Tier::Primary, own.clone(), s)]);
    let first = r.chat(request("primary", "one")).unwrap();
    let mut refused = collect(r.chat(request("primary", "two")).unwrap()).await;
    assert!(
        matches!(refused.error.take(), Some(RouterError::Busy { .. })),
        "a second request while the only slot is taken"
    );
    drop(first);
    assert!(
        r.endpoints(Tier::Primary).is_empty(),
        "one backend, not a pool"
    );

    // A peer joins: the tier is now a pool of both, and runs one more request at once.
    let peer = Scripted::new("e4b", Script::Hang);
    peer.peer.store(true, Ordering::SeqCst);
    let spec = |b: &Arc<Scripted>| EndpointSpec {
        name: "mini-2".into(),
        backend: b.clone() as Arc<dyn Backend>,
        weight: 1.0,
        max_concurrency: 1,
        probe: true,
    };
    r.join(Tier::Primary, ("local", true), spec(&peer)).unwrap();
    assert_eq!(r.endpoints(Tier::Primary), ["local", "mini-2"]);
    let joined_again = r.join(Tier::Primary, ("local", true), spec(&peer));
    assert!(matches!(
        joined_again,
        Err(RouterError::InvalidRequest { .. })
    ));
    // The earlier request's slot is given back when its client goes.
    wait_until(|| r.status()[0].in_flight == 0).await;
    let a = r.chat(request("primary", "three")).unwrap();
    let b = r.chat(request("primary", "four")).unwrap();
    wait_until(|| own.calls.load(Ordering::SeqCst) == 2 && peer.calls.load(Ordering::SeqCst) == 1)
        .await;
    let mut third = collect(r.chat(request("primary", "five")).unwrap()).await;
    assert!(matches!(third.error.take(), Some(RouterError::Busy { .. })));
    drop((a, b));

    // It leaves: the tier is back to one request at once, all on its own engine.
    assert!(r.leave(Tier::Primary, "mini-2").unwrap());
    assert!(
        !r.leave(Tier::Primary, "mini-2").unwrap(),
        "not a member any more"
    );
    assert!(
        r.leave(Tier::Primary, "local").is_err(),
        "the last member stays"
    );
    assert_eq!(r.endpoints(Tier::Primary), ["local"]);
    wait_until(|| r.status()[0].in_flight == 0).await;
    let c = r.chat(request("primary", "six")).unwrap();
    wait_until(|| own.calls.load(Ordering::SeqCst) == 3).await;
    let mut d = collect(r.chat(request("primary", "seven")).unwrap()).await;
    assert!(matches!(d.error.take(), Some(RouterError::Busy { .. })));
    assert_eq!(
        peer.calls.load(Ordering::SeqCst),
        1,
        "a peer that left got a request"
    );
    drop(c);
}

/// Waits (up to 5 s) until `f` holds.
async fn wait_until(f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn images_go_to_a_tier_whose_model_can_see_them() {
    let text_only =
        |name| Scripted::new(name, Script::Answer(vec![name])).taking(&[Modality::Text]);
    let (fast, primary) = (text_only("e2b"), text_only("e4b"));
    let heavy = Scripted::new("26b", Script::Answer(vec!["26b"]));
    let r = router(vec![
        (Tier::Fast, fast.clone(), settings(1000)),
        (Tier::Primary, primary.clone(), settings(1000)),
        (Tier::Heavy, heavy.clone(), settings(1000)),
    ]);
    let image = |model: &str| with_parts(model, vec![text_part("what is this?"), cat()]);
    // auto: the vision tier (primary) is known not to see; heavy's model may.
    let a = collect(r.chat(image("auto")).unwrap()).await;
    let routing = a.routing.unwrap();
    assert_eq!(a.text, "26b");
    assert_eq!(routing.tier, "heavy");
    assert!(routing.reason.contains("cannot see"), "{}", routing.reason);
    // A tier the client names is taken as named.
    let a = collect(r.chat(image("primary")).unwrap()).await;
    assert_eq!(a.routing.unwrap().tier, "primary");
    // Once primary's model sees images, auto keeps it.
    *primary.modalities.lock().unwrap() = vec![Modality::Text, Modality::Image];
    let a = collect(r.chat(image("auto")).unwrap()).await;
    assert_eq!(a.routing.unwrap().tier, "primary");
    // Text is routed as before.
    let a = collect(r.chat(request("auto", "hi")).unwrap()).await;
    assert_eq!(a.routing.unwrap().tier, "fast");
}

#[tokio::test(start_paused = true)]
async fn fields_openai_lacks_go_to_a_tier_that_reads_them() {
    use jemma_router::dialect::Dialect;
    // Fast's upstream speaks only OpenAI's API (Ollama, say): it would refuse top_k.
    let fast = Scripted::new("ollama", Script::Answer(vec!["fast"])).speaking(Dialect::Openai);
    let primary = Scripted::new("e4b", Script::Answer(vec!["primary"]));
    let r = router(vec![
        (Tier::Fast, fast.clone(), settings(1000)),
        (Tier::Primary, primary.clone(), settings(1000)),
    ]);
    let with = |model: &str, extra: serde_json::Value| {
        jemma_router::testing::chat_request(model, "hi", extra).unwrap()
    };
    let a = collect(
        r.chat(with("auto", serde_json::json!({"top_k": 5})))
            .unwrap(),
    )
    .await;
    let routing = a.routing.unwrap();
    assert_eq!(
        (a.text.as_str(), routing.tier.as_str()),
        ("primary", "primary")
    );
    assert!(
        routing.reason.starts_with("top_k → primary"),
        "{}",
        routing.reason
    );
    // OpenAI's own fields (reasoning_effort among them) and neutral values stay where the rules send them.
    let plain = serde_json::json!({"top_k": 0, "reasoning_effort": "low", "temperature": 0.3});
    let a = collect(r.chat(with("auto", plain)).unwrap()).await;
    assert_eq!(a.routing.unwrap().tier, "fast");
    // A named tier is taken as named (its upstream refuses the field itself).
    let a = collect(
        r.chat(with("fast", serde_json::json!({"min_p": 0.1})))
            .unwrap(),
    )
    .await;
    assert_eq!(a.routing.unwrap().tier, "fast");
}

/// An upstream whose dialect is not learned yet refuses a field it does not read when asked: an automatic
/// choice goes on down its fallback chain (no breaker count, the refusal in `_routing.fallback`), a named
/// tier answers the refusal (400 naming the field), and so does a walk where every tier refused.
#[tokio::test(start_paused = true)]
async fn a_field_an_upstream_does_not_read_moves_an_automatic_choice_on() {
    let fast = Scripted::new("e2b", Script::Answer(vec!["fast"]));
    let primary = Scripted::new("ollama", Script::Unread);
    let r = router(vec![
        (Tier::Fast, fast.clone(), settings(1000)),
        (Tier::Primary, primary.clone(), settings(1000)),
    ]);
    let with = |model: &str, extra: serde_json::Value| {
        jemma_router::testing::chat_request(model, "Write code for a loop", extra).unwrap()
    };
    for _ in 0..4 {
        let a = collect(
            r.chat(with("auto", serde_json::json!({"top_k": 5})))
                .unwrap(),
        )
        .await;
        let routing = a.routing.unwrap_or_else(|| panic!("{:?}", a.error));
        assert_eq!((a.text.as_str(), routing.tier.as_str()), ("fast", "fast"));
        assert!(
            routing.fallback.iter().any(|f| f.contains("top_k")),
            "{:?}",
            routing.fallback
        );
    }
    // No breaker counted it: primary still answers what it reads.
    let a = collect(r.chat(with("auto", serde_json::json!({}))).unwrap()).await;
    assert_eq!(
        (a.text.as_str(), a.routing.unwrap().tier.as_str()),
        ("ollama", "primary")
    );
    // Named: the refusal, naming the field.
    let a = collect(
        r.chat(with("primary", serde_json::json!({"min_p": 0.2})))
            .unwrap(),
    )
    .await;
    match a.error {
        Some(RouterError::InvalidRequest { param, .. }) => {
            assert_eq!(param.as_deref(), Some("min_p"))
        }
        other => panic!("{other:?}"),
    }
    // Every tier refusing: the refusal, not a 503.
    let only = router(vec![(Tier::Primary, primary.clone(), settings(1000))]);
    let a = collect(
        only.chat(with("auto", serde_json::json!({"top_k": 5})))
            .unwrap(),
    )
    .await;
    assert!(
        matches!(a.error, Some(RouterError::InvalidRequest { ref param, .. }) if param.as_deref() == Some("top_k")),
        "{:?}",
        a.error
    );
}

/// A pool passes a request over to a member whose server reads its fields: one known not to (its dialect
/// learned) is not chosen, one not learned yet refuses and another is tried.
#[tokio::test(start_paused = true)]
async fn a_pool_sends_fields_to_members_that_read_them() {
    use jemma_router::dialect::Dialect;
    let top_k = ChatCompletionRequest {
        model: Some("primary".into()),
        messages: vec![jemma_router::api::Message::user("hi")],
        top_k: Some(5),
        ..Default::default()
    }
    .validate(&Limits::default())
    .unwrap();
    for learned in [true, false] {
        let ollama = Scripted::new("ollama", Script::Unread);
        if learned {
            *ollama.dialect.lock().unwrap() = Some(Dialect::Ollama);
        }
        let vllm = Scripted::new("vllm", Script::Answer(vec!["vllm"]));
        // The weights make the member that does not read top_k every request's first choice.
        let p = pool(&[("ollama", &ollama, 1e6), ("vllm", &vllm, 1e-6)], 1000);
        let r = pooled(&p);
        for _ in 0..3 {
            let a = collect(r.chat(top_k.clone()).unwrap()).await;
            assert_eq!(a.text, "vllm", "learned: {learned}: {:?}", a.error);
        }
        let a = collect(r.chat(request("primary", "no extension")).unwrap()).await;
        assert_eq!(a.text, "ollama", "others go by load and weight as before");
    }
}

#[tokio::test(start_paused = true)]
async fn a_pool_sends_images_to_members_that_can_see_them() {
    let blind = Scripted::new("e4b-text", Script::Answer(vec!["blind"])).taking(&[Modality::Text]);
    let seeing = Scripted::new("e4b", Script::Answer(vec!["seeing"]))
        .taking(&[Modality::Text, Modality::Image]);
    // The weights make the blind member every request's first choice.
    let p = pool(&[("blind", &blind, 1e6), ("seeing", &seeing, 1e-6)], 1000);
    let r = pooled(&p);
    let image = with_parts("primary", vec![text_part("what is this?"), cat()]);
    for _ in 0..4 {
        let a = collect(r.chat(image.clone()).unwrap()).await;
        assert_eq!(a.text, "seeing");
    }
    let a = collect(r.chat(request("primary", "text only")).unwrap()).await;
    assert_eq!(a.text, "blind", "text goes by load and weight as before");
}

#[tokio::test(start_paused = true)]
async fn audio_goes_to_a_tier_whose_model_hears_it() {
    // E2B and E4B hear; the 26B does not (it sees images only).
    let hears = |name: &'static str, answer: &'static str| {
        Scripted::new(name, Script::Answer(vec![answer])).taking(&[
            Modality::Text,
            Modality::Image,
            Modality::Audio,
        ])
    };
    let fast = hears("e2b", "e2b");
    let primary = Scripted::new("e4b-text", Script::Answer(vec!["e4b"])).taking(&[Modality::Text]);
    let heavy = Scripted::new("26b", Script::Answer(vec!["26b"]))
        .taking(&[Modality::Text, Modality::Image]);
    let r = router(vec![
        (Tier::Fast, fast.clone(), settings(1000)),
        (Tier::Primary, primary.clone(), settings(1000)),
        (Tier::Heavy, heavy.clone(), settings(1000)),
    ]);
    let clip = |model: &str, image: bool| {
        let mut parts = vec![
            text_part("what is said here?"),
            serde_json::json!({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}),
        ];
        if image {
            parts.push(cat());
        }
        with_parts(model, parts)
    };
    // auto: the audio tier (primary) is known not to hear; heavy's model neither; fast's does.
    let a = collect(r.chat(clip("auto", false)).unwrap()).await;
    let routing = a.routing.unwrap();
    assert_eq!((a.text.as_str(), routing.tier.as_str()), ("e2b", "fast"));
    assert!(
        routing.reason.starts_with("audio → fast"),
        "{}",
        routing.reason
    );
    assert!(
        routing.reason.contains("cannot hear it"),
        "{}",
        routing.reason
    );
    // An image and a clip: only a model that takes both.
    let a = collect(r.chat(clip("auto", true)).unwrap()).await;
    assert_eq!(a.routing.unwrap().tier, "fast");
    // Heavy named, failing: its fallback skips primary, which cannot hear.
    heavy.set(Script::Fail);
    let a = collect(r.chat(clip("heavy", false)).unwrap()).await;
    assert_eq!(a.text, "e2b");
}

#[tokio::test(start_paused = true)]
async fn a_chat_goes_past_a_tier_that_serves_a_base_model() {
    // A base model (no chat template: /v1/completions only) on primary, the default tier for a longer
    // message; a chat model on fast.
    let fast = Scripted::new("e2b", Script::Answer(vec!["e2b"]));
    let primary = Scripted::new("gemma-3-270m", Script::Answer(vec!["base"])).base_model();
    let r = router(vec![
        (Tier::Fast, fast.clone(), settings(1000)),
        (Tier::Primary, primary.clone(), settings(1000)),
    ]);
    let long = "Tell me about the history of the printing press, the people who built the first \
                presses and how the craft spread across the cities of Europe in its first century.";
    let a = collect(r.chat(request("auto", long)).unwrap()).await;
    let routing = a.routing.unwrap();
    assert_eq!((a.text.as_str(), routing.tier.as_str()), ("e2b", "fast"));
    assert!(
        routing
            .reason
            .starts_with("chat → fast: the primary tier's model has no chat template"),
        "{}",
        routing.reason
    );
    // Named, a tier is taken as named (its engine refuses the chat itself).
    let a = collect(r.chat(request("primary", long)).unwrap()).await;
    assert_eq!(a.text, "base");
    // A completion (a raw prompt) needs no template: it stays where the rules put it.
    let mut completion = request("auto", long);
    completion.raw_prompt = Some(long.into());
    let a = collect(r.chat(completion).unwrap()).await;
    assert_eq!(a.text, "base");
    // With the tier's model unknown (an upstream), a chat goes where the rules put it.
    *primary.chat.lock().unwrap() = None;
    let a = collect(r.chat(request("auto", long)).unwrap()).await;
    assert_eq!(a.text, "base");

    // Falling back, a chat passes over a base model: heavy (disabled) then fast, not primary's 400.
    let heavy = Scripted::new("26b", Script::Answer(vec!["never"]));
    let primary = Scripted::new("gemma-3-270m", Script::Answer(vec!["base"])).base_model();
    let r = router(vec![
        (Tier::Fast, fast.clone(), settings(1000)),
        (Tier::Primary, primary.clone(), settings(1000)),
        (Tier::Heavy, heavy.clone(), settings(1000)),
    ]);
    r.set_enabled(Tier::Heavy, false).unwrap();
    let a = collect(r.chat(request("heavy", long)).unwrap()).await;
    assert_eq!(a.text, "e2b");
    assert_eq!(primary.calls.load(Ordering::SeqCst), 0);

    // Moving up, the nearest larger tier: a greeting classified fast, where a base model serves, goes to
    // primary, not to heavy.
    let fast = Scripted::new("gemma-3-270m", Script::Answer(vec!["base"])).base_model();
    let primary = Scripted::new("e4b", Script::Answer(vec!["e4b"]));
    let r = router(vec![
        (Tier::Fast, fast, settings(1000)),
        (Tier::Primary, primary, settings(1000)),
        (Tier::Heavy, heavy, settings(1000)),
    ]);
    let a = collect(r.chat(request("auto", "hi")).unwrap()).await;
    assert_eq!(a.text, "e4b");
}

#[tokio::test(start_paused = true)]
async fn a_pool_sends_chats_to_members_that_chat() {
    // The base member weighs the most, so it would take every request by weight.
    let base = Scripted::new("gemma-3-270m", Script::Answer(vec!["base"])).base_model();
    let chat = Scripted::new("e4b", Script::Answer(vec!["e4b"]));
    let p = pool(&[("base", &base, 1e6), ("chat", &chat, 1e-6)], 1000);
    let r = pooled(&p);
    for _ in 0..4 {
        let a = collect(r.chat(request("primary", "a question")).unwrap()).await;
        assert_eq!(a.text, "e4b");
    }
    // A completion needs no template: it goes by weight as before.
    let mut completion = request("primary", "a question");
    completion.raw_prompt = Some("a question".into());
    let a = collect(r.chat(completion).unwrap()).await;
    assert_eq!(a.text, "base");
    // `/health`: unknown while no member says; chatting once one says it has a template.
    assert_eq!(p.health().chat, None);
    *chat.chat.lock().unwrap() = Some(true);
    assert_eq!(p.health().chat, Some(true));
}
