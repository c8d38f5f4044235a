//! The heavy tier in front of a real llama-server: llama.cpp's own OpenAI-compatible server (built by
//! scripts/setup-llama-server.sh from the llama.cpp that the llama-cpp-python 0.3.36 sdist vendors) serving
//! the real Gemma 3 270M. The recorded upstreams of the router's unit tests say what Jemma sends; only the
//! real server says whether it reads it: the dialect is learned from its `/v1/models`, and each field OpenAI
//! has no name for (`repetition_penalty`, as llama-server's `repeat_penalty` over Jemma's 20-token window)
//! or that Ollama would not read (`logit_bias`) changes the answer as the server's own names do. And a Gemma 4
//! chat (system prompt, tools, an earlier call and its result, the thinking switch) is rendered by its
//! Jinja engine into the very prompt Jemma's own template renders.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Server, health, post_json, tier};

/// The llama-server binary scripts/setup-llama-server.sh builds, in the user's cache
/// ([`crate::support::jemma_cache`]).
fn llama_server_bin() -> PathBuf {
    let bin = crate::support::jemma_cache().join("llama-server-0.3.36/bin/llama-server");
    assert!(
        bin.exists(),
        "{} missing: run scripts/setup-llama-server.sh (or scripts/fixtures.sh)",
        bin.display()
    );
    bin
}

/// A llama-server child on a loopback port, killed when dropped (its log printed if the test failed).
struct LlamaServer {
    child: Child,
    url: String,
    log: tempfile::NamedTempFile,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!(
                "--- the log of llama-server {} ---\n{}",
                self.url,
                tail.join("\n")
            );
        }
    }
}

impl LlamaServer {
    /// Starts llama-server on `model` with one slot and `args`, on a port the OS picks, and waits until it
    /// has loaded the model (it names its address then) and its `/health` answers 200. Fails at once if it
    /// exits, and after 180 s (two busy cores).
    fn start(model: &std::path::Path, args: &[&str]) -> LlamaServer {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(llama_server_bin())
            .args(["-m", model.to_str().unwrap()])
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["-c", "2048", "-np", "1", "-t", "2", "--no-webui"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("spawn llama-server");
        let t0 = Instant::now();
        let url = loop {
            let text = std::fs::read_to_string(log.path()).unwrap_or_default();
            if let Some(url) = text
                .lines()
                .find_map(|l| l.split("listening on ").nth(1))
                .map(|u| u.trim().trim_end_matches('/').to_string())
            {
                break url;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("llama-server exited ({status}):\n{text}");
            }
            if t0.elapsed() > Duration::from_secs(180) {
                let _ = child.kill();
                panic!("llama-server did not listen within 180 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let s = LlamaServer { child, url, log };
        let health = crate::support::ureq_get(&format!("{}/health", s.url));
        assert!(matches!(health, Ok((200, _))), "{health:?}");
        s
    }
}

/// llama-server on `model`, and a gateway with the same weights twice: on the local llama.cpp engine (tier
/// fast) and behind that llama-server (tier heavy, started with `args`), whose dialect is left to be
/// learned (`auto`, the default).
fn gateway_over(model: &std::path::Path, args: &[&str]) -> (LlamaServer, Server) {
    let upstream = LlamaServer::start(model, args);
    let cfg = format!(
        "[tiers.fast]\nmodel = \"{}\"\n[tiers.heavy]\nkind = \"openai\"\nurl = \"{}/v1\"\n\
         model = \"upstream\"\n",
        model.display(),
        upstream.url
    );
    let gw = Server::start(&[], Some(&cfg));
    (upstream, gw)
}

/// A greedy `/v1/completions` of `prompt` (24 tokens) at `base` (the gateway, or llama-server itself), with
/// `extra` merged into the body; its text.
async fn complete(client: &reqwest::Client, base: &str, prompt: &str, extra: Value) -> String {
    let mut body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0});
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    let v = post_json(client, &format!("{base}/v1/completions"), &body).await;
    match v["choices"][0]["text"].as_str() {
        Some(t) => t.to_string(),
        None => panic!("{v}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_llama_server_upstream_reads_the_fields_jemma_sends_it() {
    let (upstream, gw) = gateway_over(&crate::real_model::gemma3(), &[]);
    let client = crate::support::client();
    assert_eq!(
        tier(&health(&gw), "heavy")["dialect"],
        "auto",
        "not learned before a request needs it"
    );
    let paris = "Question: What is the capital of France?\nAnswer:";
    for m in ["heavy", "fast"] {
        let v = post_json(
            &client,
            &format!("{}/v1/completions", gw.url),
            &json!({"model": m, "prompt": paris, "max_tokens": 2, "temperature": 0}),
        )
        .await;
        assert!(
            v["choices"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .starts_with(" Paris"),
            "{v}"
        );
        assert_eq!(v["_routing"]["tier"], m, "{v}");
    }

    // A prompt the model goes on repeating. Each field through the gateway gives what llama-server gives
    // when asked directly under its own names, with Jemma's 20-token penalty window (the local engine's,
    // mlx-lm's); and a different answer than without it. (Not compared with the local engine's answers:
    // two llama.cpp builds' Q4_K kernels differ by up to ~0.1 in a logprob, as llama-server's own
    // weight repacking or flash attention switched off do, and this prompt has near ties.)
    let prompt = "red, red, red, red, red, red, red, red, red, red, red,";
    let heavy = |extra: Value| {
        let mut body = json!({"model": "heavy"});
        if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
            b.extend(e);
        }
        complete(&client, &gw.url, prompt, body)
    };
    let direct = |extra: Value| complete(&client, &upstream.url, prompt, extra);
    // Once first, so that every answer compared below reads the prompt from the slot's cache alike (the
    // first reading is a batch of its tokens, a cached one the last token alone: other kernel shapes).
    direct(json!({"max_tokens": 1})).await;
    let plain = heavy(json!({})).await;
    assert_eq!(plain, direct(json!({})).await);

    let penalised = heavy(json!({"repetition_penalty": 1.5})).await;
    assert_ne!(penalised, plain, "the penalty reached the server");
    assert_eq!(
        penalised,
        direct(json!({"repeat_penalty": 1.5, "repeat_last_n": 20})).await,
        "sent as repeat_penalty over Jemma's window"
    );
    assert_ne!(
        penalised,
        direct(json!({"repeat_penalty": 1.5})).await,
        "the window matters here: llama-server's own (64) gives another answer"
    );
    // The request that needed it taught the gateway the server's dialect, from its /v1/models.
    assert_eq!(tier(&health(&gw), "heavy")["dialect"], "llama-server");

    // OpenAI's frequency and presence penalties keep their names, over the same window (that the window
    // is sent for them alone is the router's unit test: on this prompt the two windows answer alike).
    let alpha = json!({"frequency_penalty": 1.0, "presence_penalty": 0.5});
    let penalised = heavy(alpha.clone()).await;
    assert_ne!(penalised, plain);
    let mut alpha20 = alpha;
    alpha20["repeat_last_n"] = json!(20);
    assert_eq!(penalised, direct(alpha20).await);

    // `logit_bias` by token id (those of " red", from the server's own tokenizer): banned there.
    let ids = post_json(
        &client,
        &format!("{}/tokenize", upstream.url),
        &json!({"content": " red"}),
    )
    .await;
    let ids = ids["tokens"].as_array().cloned().unwrap_or_default();
    assert!(!ids.is_empty(), "no tokens for \" red\"");
    let bias: serde_json::Map<String, Value> =
        ids.iter().map(|t| (t.to_string(), json!(-100))).collect();
    let ban = json!({ "logit_bias": bias });
    let banned = heavy(ban.clone()).await;
    assert!(!banned.contains(" red"), "{banned}");
    assert_eq!(banned, direct(ban).await);
}

/// A chat through the gateway: `body` with `model` set; the answer's prompt tokens and message.
async fn chat(client: &reqwest::Client, gw: &Server, model: &str, body: &Value) -> (u64, Value) {
    let mut body = body.clone();
    body["model"] = json!(model);
    let v = post_json(client, &format!("{}/v1/chat/completions", gw.url), &body).await;
    assert_eq!(v["_routing"]["tier"], model, "{v}");
    (
        v["usage"]["prompt_tokens"].as_u64().unwrap_or_default(),
        v["choices"][0]["message"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_llama_server_renders_gemma_4_chats_as_the_local_engine_does() {
    // The random-weight Gemma 4 fixture in float32 with its chat template: llama-server renders a chat with
    // its own Jinja engine, Jemma with minijinja; the same prompt gives the same greedy answer from the
    // same weights (float32: here the two llama.cpp builds agree).
    let model = crate::support::fixture("tiny")
        .parent()
        .unwrap()
        .join("gguf/tiny-f32.gguf");
    // Thinking off unless a request turns it on: what the gateway sends is then what turns it on.
    let (_upstream, gw) = gateway_over(&model, &["--reasoning", "off"]);
    let client = crate::support::client();
    // A system prompt, a tool, an earlier call and its result, and a new question, thinking off.
    let conversation = json!({
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"days\":2}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\":21,\"sky\":\"clear\"}"},
            {"role": "assistant", "content": "It is 21 and clear."},
            {"role": "user", "content": "And tomorrow?"}
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "description": "Get the weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "description": "City name"},
                           "days": {"type": "integer"}}, "required": ["city"]}}}],
        "max_tokens": 12, "temperature": 0, "reasoning_effort": "none"
    });
    let (heavy_tokens, heavy) = chat(&client, &gw, "heavy", &conversation).await;
    let (local_tokens, local) = chat(&client, &gw, "fast", &conversation).await;
    assert!(heavy_tokens > 200, "{heavy_tokens}");
    assert_eq!(heavy_tokens, local_tokens, "the same prompt");
    assert_eq!(heavy["content"], local["content"], "{heavy}\n{local}");
    assert_eq!(tier(&health(&gw), "heavy")["dialect"], "llama-server");

    // Thinking on (OpenAI's switch): the template's thinking turn, on both.
    let think = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                       "reasoning_effort": "high"});
    let off = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                     "reasoning_effort": "none"});
    let (heavy_on, _) = chat(&client, &gw, "heavy", &think).await;
    let (local_on, _) = chat(&client, &gw, "fast", &think).await;
    let (heavy_off, _) = chat(&client, &gw, "heavy", &off).await;
    assert_eq!(heavy_on, local_on);
    assert!(heavy_on > heavy_off, "{heavy_on} {heavy_off}");
}
