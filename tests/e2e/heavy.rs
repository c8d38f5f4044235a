//! The heavy tier as it runs on Cloud Run, on loopback: `jemma serve --config cloud/heavy/jemma.toml` (the
//! shipped file) with the llama.cpp engine, the model fetched at start from a slow `MODEL_URL` (a simulated
//! cold start: /health stays 503 "starting" until it is loaded), bearer-key auth, and a Mac-side gateway
//! forwarding its heavy tier there. Also: GGUF models as local tiers (the default engine on Linux).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Server, fixture, post_json, post_sse, root, ureq_get};

fn gguf(name: &str) -> std::path::PathBuf {
    let p = fixture("tiny").parent().unwrap().join("gguf").join(name);
    assert!(
        p.exists(),
        "{} missing: run scripts/fixtures.sh",
        p.display()
    );
    p
}

/// Serves one file slowly over HTTP (HEAD and GET with ranges), like a bucket far away.
async fn slow_file_server(data: Vec<u8>, chunk_delay: Duration) -> String {
    use axum::body::Body;
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::Response;
    let data = std::sync::Arc::new(data);
    let d2 = data.clone();
    let app = axum::Router::new().route(
        "/models/{name}",
        axum::routing::get(move |headers: HeaderMap| {
            let data = d2.clone();
            async move {
                let start = headers
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
                    .unwrap_or(0);
                let body = data[start..].to_vec();
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
                tokio::spawn(async move {
                    for c in body.chunks(256 << 10) {
                        tokio::time::sleep(chunk_delay).await;
                        if tx.send(Ok(c.to_vec())).await.is_err() {
                            return;
                        }
                    }
                });
                Response::builder()
                    .status(if start > 0 {
                        StatusCode::PARTIAL_CONTENT
                    } else {
                        StatusCode::OK
                    })
                    .header(header::CONTENT_LENGTH, data.len() - start)
                    .body(Body::from_stream(
                        tokio_stream::wrappers::ReceiverStream::new(rx),
                    ))
                    .unwrap()
            }
        })
        .head(move || {
            let n = data.len();
            async move {
                Response::builder()
                    .header(header::CONTENT_LENGTH, n)
                    .body(Body::empty())
                    .unwrap()
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    url
}

async fn chat(client: &reqwest::Client, url: &str, key: Option<&str>, model: &str) -> (u16, Value) {
    let mut r = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Hello!"}]}));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_server_mode_cold_start_auth_and_the_gateway_in_front() {
    let model = std::fs::read(gguf("tiny-f32.gguf")).unwrap();
    let files = slow_file_server(model.clone(), Duration::from_millis(150)).await;
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("models");
    let cfg = std::fs::read_to_string(root().join("cloud/heavy/jemma.toml")).unwrap();
    let keys_file = dir.path().join("keys.json");
    let env = [
        ("HEAVY_API_KEY", "sk-heavy-test"),
        (
            "JEMMA_HEAVY_MODEL",
            &format!("{files}/models/gemma-4-tiny.gguf"),
        ),
        ("JEMMA_MODEL_DIR", model_dir.to_str().unwrap()),
        ("HF_HOME", dir.path().to_str().unwrap()),
        ("JEMMA_KEYS_FILE", keys_file.to_str().unwrap()),
    ];
    let heavy = Server::spawn_with(&["--host", "127.0.0.1"], Some(&cfg), &env, None);
    // Cold start: the startup probe sees 503 "starting" while the model downloads, then 200.
    let (code, body) = ureq_get(&format!("{}/health", heavy.url)).unwrap();
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((code, h["status"].as_str()), (503, Some("starting")), "{h}");
    let t0 = Instant::now();
    let mut saw_progress = false;
    loop {
        let (code, body) = ureq_get(&format!("{}/health", heavy.url)).unwrap();
        let h: Value = serde_json::from_str(&body).unwrap();
        let state = h["tiers"]["heavy"]["backend"]["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        saw_progress |= state.starts_with("downloading") && state != "downloading 0%";
        if code == 200 {
            assert_eq!(state, "ready");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "heavy never became ready: {h}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(saw_progress, "download progress visible in /health");
    assert!(
        t0.elapsed() > Duration::from_secs(1),
        "the slow load was observed"
    );
    assert_eq!(
        std::fs::read(model_dir.join("gemma-4-tiny.gguf")).unwrap(),
        model
    );

    let client = crate::support::client();
    // Every caller needs the key, loopback included (Cloud Run's front end is not loopback anyway).
    assert_eq!(chat(&client, &heavy.url, None, "heavy").await.0, 401);
    assert_eq!(
        chat(&client, &heavy.url, Some("wrong"), "heavy").await.0,
        401
    );
    let (code, body) = chat(
        &client,
        &heavy.url,
        Some("sk-heavy-test"),
        "gemma-4-26b-a4b",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["_routing"]["tier"], "heavy");
    assert_eq!(body["_routing"]["model"], "gemma-4-tiny");
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() >= 1);

    // The Mac side: a gateway whose heavy tier is this server (an OpenAI-compatible upstream with the key).
    let mac = format!(
        "[tiers.fast]\nmodel = \"{}\"\n[tiers.heavy]\nkind = \"openai\"\nurl = \"{}/v1\"\napi_key = \"env:JEMMA_TEST_HEAVY_KEY\"\n",
        fixture("tiny").display(),
        heavy.url
    );
    let gw = Server::start_with(
        &[],
        Some(&mac),
        &[("JEMMA_TEST_HEAVY_KEY", "sk-heavy-test")],
        None,
    );
    let (code, body) = chat(&client, &gw.url, None, "heavy").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["_routing"]["tier"], "heavy");
    assert!(body["choices"][0]["message"]["content"].is_string());
    // Streaming through both hops.
    let r = client
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&json!({"model": "heavy", "stream": true, "max_tokens": 6, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(
        text.contains("\"tier\":\"heavy\"") && text.trim_end().ends_with("data: [DONE]"),
        "{text}"
    );
    // Fields OpenAI's API lacks reach the heavy server under the names it reads: the gateway learns from
    // its /v1/models (owned_by "jemma") that it speaks Jemma's own, so a sampled answer with top_k and a
    // repetition penalty is the one the heavy server gives to the same request asked directly.
    let sampled =
        |url: String, key: Option<&'static str>| {
            let client = client.clone();
            async move {
                let mut rb = client.post(format!("{url}/v1/chat/completions")).json(&json!({
                "model": "heavy", "max_tokens": 8, "temperature": 1.0, "seed": 7, "top_k": 3,
                "min_p": 0.05, "repetition_penalty": 1.5, "enable_thinking": false,
                "messages": [{"role": "user", "content": "Count with me"}]
            }));
                if let Some(k) = key {
                    rb = rb.bearer_auth(k);
                }
                let v: Value = rb.send().await.unwrap().json().await.unwrap();
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{v}"))
                    .to_string()
            }
        };
    assert_eq!(
        sampled(gw.url.clone(), None).await,
        sampled(heavy.url.clone(), Some("sk-heavy-test")).await
    );
    let (_, health) = ureq_get(&format!("{}/health", gw.url)).unwrap();
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(
        health["tiers"]["heavy"]["backend"]["dialect"], "jemma",
        "{health}"
    );
    // A plain prompt (/v1/completions) is read upstream as it is, by the upstream's own /v1/completions:
    // the same greedy text as asking the heavy server directly (as a chat, its template would wrap it).
    let complete = |url: String, key: Option<&'static str>| {
        let client = client.clone();
        async move {
            let mut rb = client.post(format!("{url}/v1/completions")).json(&json!({
                "model": "heavy", "prompt": "The capital of France is", "max_tokens": 8,
                "temperature": 0, "logprobs": 2
            }));
            if let Some(k) = key {
                rb = rb.bearer_auth(k);
            }
            let r = rb.send().await.unwrap();
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            (
                v["choices"][0]["text"].as_str().unwrap().to_string(),
                v["choices"][0]["logprobs"].clone(),
            )
        }
    };
    let direct = complete(heavy.url.clone(), Some("sk-heavy-test")).await;
    assert!(!direct.0.is_empty());
    assert_eq!(
        direct.1["tokens"].as_array().map(Vec::len),
        Some(8),
        "{}",
        direct.1
    );
    // The text, and its logprobs in this API's shape, read back from the upstream's (the second read
    // of the prompt is a warm one, its numbers within rounding of the cold one's).
    let through = complete(gw.url.clone(), None).await;
    assert_eq!(through.0, direct.0);
    for key in ["tokens", "text_offset"] {
        assert_eq!(through.1[key], direct.1[key], "{key}");
    }
    let numbers = |v: &Value| -> Vec<f64> {
        let mut n: Vec<f64> = v["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        for top in v["top_logprobs"].as_array().unwrap() {
            n.extend(
                top.as_object()
                    .unwrap()
                    .values()
                    .map(|x| x.as_f64().unwrap()),
            );
        }
        n
    };
    let (a, b) = (numbers(&through.1), numbers(&direct.1));
    assert_eq!(a.len(), b.len());
    assert!(
        a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-3),
        "{a:?} vs {b:?}"
    );
    // A gateway with the wrong key falls back to its local tier and says why.
    drop(gw);
    let gw = Server::start_with(&[], Some(&mac), &[("JEMMA_TEST_HEAVY_KEY", "nope")], None);
    let (code, body) = chat(&client, &gw.url, None, "heavy").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["_routing"]["tier"], "fast");
    assert!(
        body["_routing"]["fallback"].to_string().contains("401"),
        "{body}"
    );
}

#[test]
fn heavy_server_refuses_to_start_without_its_key() {
    let cfg = std::fs::read_to_string(root().join("cloud/heavy/jemma.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("jemma.toml");
    std::fs::write(&f, cfg).unwrap();
    let out = crate::support::output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_jemma"))
            .args(["serve", "--port", "0", "--config"])
            .arg(&f)
            .env_remove("HEAVY_API_KEY")
            .env("JEMMA_HEAVY_MODEL", gguf("tiny-f32.gguf")),
        crate::support::CMD_DEADLINE,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HEAVY_API_KEY"), "{err}");
}

/// Tiers naming one model share its engine, started with the first tier's settings: a second tier that
/// sets them otherwise is refused at start, naming the settings, rather than silently served with the
/// first tier's (the other tests serve fast and primary from one model with the same settings).
#[test]
fn tiers_sharing_a_model_must_agree_on_its_engine_settings() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("jemma.toml");
    let m = gguf("tiny-q8_0.gguf");
    std::fs::write(
        &f,
        format!(
            "[tiers.fast]\nmodel = \"{m}\"\npreload = false\n\
             [tiers.primary]\nmodel = \"{m}\"\npreload = false\ncontext_length = 256\n\
             default_max_tokens = 32\n",
            m = m.display()
        ),
    )
    .unwrap();
    let out = crate::support::output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_jemma"))
            .args(["serve", "--port", "0", "--config"])
            .arg(&f),
        crate::support::CMD_DEADLINE,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tier primary")
            && err.contains("context_length, default_max_tokens")
            && err.contains("share its engine"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gguf_models_serve_as_local_tiers_through_llama_cpp() {
    let s = Server::start(&["--model", gguf("tiny-q8_0.gguf").to_str().unwrap()], None);
    let (_, body) = ureq_get(&format!("{}/health", s.url)).unwrap();
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        h["tiers"]["fast"]["backend"]["details"]["engine"], "llama.cpp",
        "{h}"
    );
    let client = crate::support::client();
    let (code, body) = chat(&client, &s.url, None, "fast").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["_routing"]["model"], "tiny-q8_0");
    // JSON mode through llama.cpp's grammar.
    let r = client
        .post(format!("{}/v1/chat/completions", s.url))
        .json(
            &json!({"model": "fast", "max_tokens": 48, "temperature": 0.7, "seed": 3,
            "response_format": {"type": "json_object"},
            "messages": [{"role": "user", "content": "Give me JSON"}]}),
        )
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.trim_start().starts_with('{'), "{content:?}");
}

/// One request's `logprobs.content`, non-streaming and streaming (concatenated over the SSE chunks).
async fn logprobs_of(client: &reqwest::Client, url: &str, model: &str) -> (Vec<Value>, Vec<Value>) {
    let url = format!("{url}/v1/chat/completions");
    let mut body = json!({"model": model, "max_tokens": 6, "temperature": 0, "logprobs": true,
        "top_logprobs": 3, "messages": [{"role": "user", "content": "Hello!"}]});
    let v = post_json(client, &url, &body).await;
    let plain = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("{model}: no logprobs in {v}"))
        .clone();
    body["stream"] = json!(true);
    let streamed = post_sse(client, &url, &body)
        .await
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    (plain, streamed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_look_and_agree_the_same_on_both_engines() {
    // The same random weights on MLX (fast) and, converted to an f32 GGUF, on llama.cpp (primary).
    let cfg = format!(
        "[tiers.fast]\nmodel = \"{}\"\n[tiers.primary]\nmodel = \"{}\"\n",
        fixture("tiny").display(),
        gguf("tiny-f32.gguf").display()
    );
    let s = Server::start(&[], Some(&cfg));
    let client = crate::support::client();
    let (mlx, mlx_stream) = logprobs_of(&client, &s.url, "fast").await;
    let (llama, llama_stream) = logprobs_of(&client, &s.url, "primary").await;
    for (engine, plain, streamed) in [
        ("mlx", &mlx, &mlx_stream),
        ("llama.cpp", &llama, &llama_stream),
    ] {
        assert!(!plain.is_empty(), "{engine}: no entries");
        // The same tokens and texts; logprobs to 1e-3, not to the bit: the second request reuses the
        // first one's prompt KV (the llama.cpp engine's prefix cache) and evaluates only its last token,
        // in a batch of one, and llama.cpp's CPU kernels round a one-row batch differently.
        assert_eq!(plain.len(), streamed.len(), "{engine}: JSON and SSE differ");
        for (p, q) in plain.iter().zip(streamed.iter()) {
            assert_eq!(p["token"], q["token"], "{engine}: JSON and SSE differ");
            assert_eq!(p["bytes"], q["bytes"], "{engine}: JSON and SSE differ");
            let (a, b) = (
                p["logprob"].as_f64().unwrap(),
                q["logprob"].as_f64().unwrap(),
            );
            assert!(
                (a - b).abs() < 1e-3,
                "{engine}: JSON and SSE differ: {p} vs {q}"
            );
            let tops = |v: &Value| -> Vec<Value> {
                v["top_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t["token"].clone())
                    .collect()
            };
            assert_eq!(tops(p), tops(q), "{engine}: JSON and SSE differ");
        }
        for e in plain {
            let top = e["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 3, "{engine}: {e}");
            // Greedy: the chosen token is the best alternative, with the same text, bytes and logprob.
            assert_eq!(top[0]["token"], e["token"], "{engine}: {e}");
            assert_eq!(top[0]["bytes"], e["bytes"], "{engine}: {e}");
            assert_eq!(top[0]["logprob"], e["logprob"], "{engine}: {e}");
            let bytes: Vec<u8> = e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
                .collect();
            assert_eq!(
                String::from_utf8_lossy(&bytes),
                e["token"].as_str().unwrap()
            );
            assert!(e["logprob"].as_f64().unwrap() <= 0.0, "{engine}: {e}");
        }
    }
    // Same prompt (one chat template), same weights: the first token's distribution agrees across engines.
    let (a, b) = (&mlx[0], &llama[0]);
    assert_eq!(
        a["token"], b["token"],
        "first token: mlx {a} vs llama.cpp {b}"
    );
    for (x, y) in a["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(b["top_logprobs"].as_array().unwrap())
    {
        let (px, py) = (
            x["logprob"].as_f64().unwrap(),
            y["logprob"].as_f64().unwrap(),
        );
        assert!((px - py).abs() < 0.02, "mlx {x} vs llama.cpp {y}");
    }
}
