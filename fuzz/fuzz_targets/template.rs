//! Rendering Google's Gemma 4 chat template with arbitrary messages/tools: an error or a prompt, never a
//! panic or a hang. With Gemma 4's control tokens guarded, the prompt is the plain one with cuts in it, or
//! the request is refused.
#![no_main]

use jemma_chat::guard::{CUT, ControlTokens, GEMMA4_NAMED_CONTROL_TOKENS};
use jemma_chat::template::{ChatTemplate, RenderRequest};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const TEMPLATE: &str = include_str!("../../crates/chat/templates/gemma4-e2b-e4b.jinja");

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static T: ChatTemplate = ChatTemplate::from_source(TEMPLATE, "<bos>", "<eos>").expect("template compiles");
        static G: ChatTemplate = ChatTemplate::from_source(TEMPLATE, "<bos>", "<eos>")
            .expect("template compiles")
            .with_control_tokens(ControlTokens::new(GEMMA4_NAMED_CONTROL_TOKENS));
    }
    let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
    let messages: Vec<Value> = match v.get("messages") {
        Some(Value::Array(m)) => m.clone(),
        _ => return,
    };
    let tools: Option<Vec<Value>> = v.get("tools").and_then(|t| t.as_array().cloned());
    let thinking = v.get("enable_thinking").and_then(Value::as_bool);
    let req = RenderRequest {
        messages: &messages,
        tools: tools.as_deref(),
        add_generation_prompt: true,
        enable_thinking: thinking,
        extra: None,
    };
    let plain = T.with(|t| t.render(&req));
    let guarded = G.with(|g| g.render(&req));
    // The guard's own markers in the input become U+FFFD, so only inputs without them compare.
    let markers = ['\u{FDD0}', '\u{FDD1}', CUT];
    if let (Ok(plain), Ok(guarded)) = (&plain, &guarded)
        && !v.to_string().contains(markers)
    {
        assert_eq!(&guarded.replace(CUT, ""), plain, "the guard changed the prompt");
    }
});
