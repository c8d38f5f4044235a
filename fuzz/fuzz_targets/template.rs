//! Rendering Google's Gemma 4 chat template with arbitrary messages/tools: an error or a prompt, never a
//! panic or a hang.
#![no_main]

use jemma_chat::template::{ChatTemplate, RenderRequest};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const TEMPLATE: &str = include_str!("../../crates/chat/templates/gemma4-e2b-e4b.jinja");

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static T: ChatTemplate = ChatTemplate::from_source(TEMPLATE, "<bos>", "<eos>").expect("template compiles");
    }
    let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
    let messages: Vec<Value> = match v.get("messages") {
        Some(Value::Array(m)) => m.clone(),
        _ => return,
    };
    let tools: Option<Vec<Value>> = v.get("tools").and_then(|t| t.as_array().cloned());
    let thinking = v.get("enable_thinking").and_then(Value::as_bool);
    T.with(|t| {
        let _ = t.render(&RenderRequest {
            messages: &messages,
            tools: tools.as_deref(),
            add_generation_prompt: true,
            enable_thinking: thinking,
            extra: None,
        });
    });
});
