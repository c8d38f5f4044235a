//! Times chat-template rendering for scripts/bench-template: the official Gemma 4 (E2B/E4B) template on two
//! long conversations (40 turns of prose; 40 turns of code, whose `<` and `>` make the control-token guard
//! render twice), plain and with Gemma-sized control tokens guarded. Prints one JSON line: milliseconds per
//! render (median of `reps`), the rendered bytes, and the guard's set-up time.
//!
//! `cargo run --release -p jemma-chat --example bench_render -- [reps]`
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed unwrap is a failed run

use std::time::Instant;

use jemma_chat::guard::{ControlTokens, GEMMA4_NAMED_CONTROL_TOKENS};
use jemma_chat::template::{ChatTemplate, RenderRequest};
use serde_json::{Value, json};

const TEMPLATE: &str = include_str!("../templates/gemma4-e2b-e4b.jinja");

/// The conversation scripts/bench-template renders in Python too: a system prompt, 40 user/assistant turns
/// of `text`, a last question.
fn conversation(text: &str) -> Vec<Value> {
    let mut messages = vec![json!({"role": "system", "content": "You are a helpful assistant."})];
    for i in 0..40 {
        messages.push(json!({"role": "user", "content": format!("{i}: {text}")}));
        messages.push(json!({"role": "assistant", "content": format!("answer {i}: {text}")}));
    }
    messages.push(json!({"role": "user", "content": "and now?"}));
    messages
}

/// Median milliseconds of `reps` renders of `messages` by `t`.
fn time(t: &ChatTemplate, messages: &[Value], reps: usize) -> f64 {
    let req = RenderRequest {
        messages,
        add_generation_prompt: true,
        ..Default::default()
    };
    let mut ms: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            std::hint::black_box(t.render(&req).unwrap());
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .map_or(20, |r| r.parse().expect("reps"));
    // Gemma's named control tokens and its thousands of unused ones, as a real tokenizer lists them.
    let mut specials: Vec<String> = GEMMA4_NAMED_CONTROL_TOKENS.map(String::from).to_vec();
    specials.extend((0..6000).map(|i| format!("<unused{i}>")));
    let t0 = Instant::now();
    let control = ControlTokens::new(&specials);
    let setup_ms = t0.elapsed().as_secs_f64() * 1e3;
    let plain = ChatTemplate::from_source(TEMPLATE, "<bos>", "<eos>").unwrap();
    let guarded = ChatTemplate::from_source(TEMPLATE, "<bos>", "<eos>")
        .unwrap()
        .with_control_tokens(control);
    let prose = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    let code = "fn f<T: Clone>(x: Vec<T>) -> Option<T> { if a < b && c > d { x.first().cloned() } else { None } }\n"
        .repeat(20);
    let mut out = json!({"guard_setup_ms": setup_ms, "control_tokens": specials.len()});
    for (name, text) in [("prose", prose), ("code", code)] {
        let messages = conversation(&text);
        let bytes = plain
            .render(&RenderRequest {
                messages: &messages,
                add_generation_prompt: true,
                ..Default::default()
            })
            .unwrap()
            .len();
        out[name] = json!({
            "bytes": bytes,
            "plain_ms": time(&plain, &messages, reps),
            "guarded_ms": time(&guarded, &messages, reps),
        });
    }
    println!("{out}");
}
