//! Fault tests: the heavy tier's upstream returns 500s, hangs, or drops the connection mid-stream. The breaker
//! must open after the configured failures, fallbacks must answer, the half-open probe must close it again,
//! and no request may hang or be lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::support::{Server, fixture, get_text, sse_answer};

const OK: u8 = 0;
const FAIL_500: u8 = 1;
const HANG: u8 = 2;
const DROP_MID_STREAM: u8 = 3;

#[derive(Clone)]
struct Upstream {
    mode: Arc<AtomicU8>,
    hits: Arc<AtomicUsize>,
}

async fn upstream_chat(axum::extract::State(u): axum::extract::State<Upstream>) -> Response {
    u.hits.fetch_add(1, Ordering::SeqCst);
    match u.mode.load(Ordering::SeqCst) {
        FAIL_500 => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": {"message": "GPU fell over"}})),
        )
            .into_response(),
        HANG => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            unreachable!()
        }
        mode => sse_answer(
            &["Partial ", "answer "],
            Duration::from_millis(25),
            (mode == DROP_MID_STREAM).then_some(2),
        ),
    }
}

async fn start_upstream() -> (String, Upstream) {
    let u = Upstream {
        mode: Arc::new(AtomicU8::new(OK)),
        hits: Arc::new(AtomicUsize::new(0)),
    };
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(upstream_chat))
        .with_state(u.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), u)
}

async fn ask(client: &reqwest::Client, gw: &str, stream: bool) -> (String, Value) {
    let body = json!({"model": "heavy", "stream": stream, "max_tokens": 6,
        "messages": [{"role": "user", "content": "Analyze this in depth"}]});
    let t0 = Instant::now();
    let r = client
        .post(format!("{gw}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let out = if stream {
        let text = r.text().await.unwrap();
        let mut content = String::new();
        let mut routing = Value::Null;
        for l in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if l == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(l).unwrap();
            assert!(v.get("error").is_none(), "stream error: {v}");
            content.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
            if v.get("_routing").is_some() {
                routing = v["_routing"].clone();
            }
        }
        assert!(
            text.trim_end().ends_with("data: [DONE]"),
            "stream not terminated: {text}"
        );
        (content, routing)
    } else {
        let v: Value = r.json().await.unwrap();
        (
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            v["_routing"].clone(),
        )
    };
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "request took {:?}",
        t0.elapsed()
    );
    out
}

async fn heavy_breaker(client: &reqwest::Client, gw: &str) -> String {
    let h: Value = client
        .get(format!("{gw}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    h["tiers"]["heavy"]["breaker"]["state"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_fallback_and_recovery_under_upstream_faults() {
    let (up_url, up) = start_upstream().await;
    let tiny = fixture("tiny");
    let config = format!(
        r#"
[breaker]
failure_threshold = 3
window_secs = 30
cooldown_secs = 1.5
[tiers.primary]
model = "{m}"
[tiers.heavy]
kind = "openai"
url = "{up_url}"
model = "heavy-sim"
first_token_timeout_secs = 2
idle_timeout_secs = 2
"#,
        m = tiny.display()
    );
    let gw = tokio::task::spawn_blocking(move || Server::start(&[], Some(&config)))
        .await
        .unwrap();
    let client = crate::support::client();

    // Healthy upstream: heavy answers.
    let (text, routing) = ask(&client, &gw.url, false).await;
    assert_eq!(routing["tier"], "heavy", "{routing}");
    assert_eq!(text, "Partial answer ");

    // 500s: every request is still answered (by primary); the third failure opens the breaker.
    up.mode.store(FAIL_500, Ordering::SeqCst);
    let before = up.hits.load(Ordering::SeqCst);
    for i in 0..3 {
        let (_, routing) = ask(&client, &gw.url, i % 2 == 0).await;
        assert_eq!(routing["tier"], "primary", "{routing}");
        assert!(
            routing["fallback"][0]
                .as_str()
                .unwrap()
                .starts_with("heavy→primary"),
            "{routing}"
        );
    }
    assert_eq!(up.hits.load(Ordering::SeqCst) - before, 3);
    assert_eq!(heavy_breaker(&client, &gw.url).await, "open");
    let (_, routing) = ask(&client, &gw.url, false).await;
    assert!(
        routing["fallback"][0]
            .as_str()
            .unwrap()
            .contains("breaker open"),
        "{routing}"
    );
    assert_eq!(
        up.hits.load(Ordering::SeqCst) - before,
        3,
        "an open breaker sends nothing upstream"
    );
    let metrics = get_text(&client, &format!("{}/metrics", gw.url)).await;
    assert!(
        metrics.contains("jemma_breaker_transitions_total"),
        "transitions are counted"
    );

    // Upstream recovers: after the cooldown one probe closes the breaker again.
    up.mode.store(OK, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (_, routing) = ask(&client, &gw.url, false).await;
    assert_eq!(routing["tier"], "heavy", "{routing}");
    assert_eq!(heavy_breaker(&client, &gw.url).await, "closed");

    // Connection dropped mid-stream: one uninterrupted answer, continued by primary.
    up.mode.store(DROP_MID_STREAM, Ordering::SeqCst);
    let (text, routing) = ask(&client, &gw.url, true).await;
    assert!(text.starts_with("Partial answer "), "{text:?}");
    assert!(
        text.len() > "Partial answer ".len(),
        "primary continued the answer: {text:?}"
    );
    assert_eq!(routing["tier"], "primary", "{routing}");
    assert!(
        routing["fallback"][0]
            .as_str()
            .unwrap()
            .contains("continued"),
        "{routing}"
    );

    // A hanging upstream: the first-token timeout falls back; nothing hangs.
    up.mode.store(HANG, Ordering::SeqCst);
    let t0 = Instant::now();
    let (_, routing) = ask(&client, &gw.url, false).await;
    assert_eq!(routing["tier"], "primary", "{routing}");
    assert!(
        routing["fallback"][0]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{routing}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));

    // Concurrent load while the upstream fails: no request is lost.
    up.mode.store(FAIL_500, Ordering::SeqCst);
    let mut handles = vec![];
    for i in 0..12 {
        let c = client.clone();
        let url = gw.url.clone();
        handles.push(tokio::spawn(async move { ask(&c, &url, i % 2 == 1).await }));
    }
    for h in handles {
        let (_, routing) = h.await.unwrap();
        assert_eq!(routing["tier"], "primary");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_health_or_metrics() {
    // The heavy upstream wants a bearer key; the gateway reads it from the environment. A caller also presents
    // a (wrong) API key. Neither may appear in debug logs, /health or /metrics.
    const HEAVY_KEY: &str = "sk-heavy-0123456789-secret";
    const CALLER_KEY: &str = "jm-caller-key-that-must-not-leak";
    let (up_url, up) = start_upstream().await;
    up.mode.store(FAIL_500, Ordering::SeqCst);
    let tiny = fixture("tiny");
    let config = format!(
        "[tiers.primary]\nmodel = \"{}\"\n[tiers.heavy]\nkind = \"openai\"\nurl = \"{up_url}\"\napi_key = \"env:JEMMA_TEST_HEAVY_KEY\"\n",
        tiny.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("gateway.log");
    let (log2, cfg2) = (log.clone(), config.clone());
    let gw = tokio::task::spawn_blocking(move || {
        Server::start_with(
            &[],
            Some(&cfg2),
            &[("JEMMA_TEST_HEAVY_KEY", HEAVY_KEY), ("JEMMA_LOG", "debug")],
            Some(&log2),
        )
    })
    .await
    .unwrap();
    let client = crate::support::client();
    for _ in 0..3 {
        let r = client
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(CALLER_KEY)
            .header("x-forwarded-for", "100.64.0.5")
            .json(&json!({"model": "heavy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            401,
            "a proxied caller with a wrong key is refused"
        );
        let (_, routing) = ask(&client, &gw.url, false).await;
        assert_eq!(routing["tier"], "primary");
    }
    let health = get_text(&client, &format!("{}/health", gw.url)).await;
    let metrics = get_text(&client, &format!("{}/metrics", gw.url)).await;
    drop(gw);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.len() > 200, "debug logs were captured");
    for (what, text) in [
        ("logs", &logs),
        ("/health", &health),
        ("/metrics", &metrics),
    ] {
        assert!(
            !text.contains(HEAVY_KEY),
            "the upstream key leaked into {what}"
        );
        assert!(
            !text.contains(CALLER_KEY),
            "the caller's key leaked into {what}"
        );
    }
}
