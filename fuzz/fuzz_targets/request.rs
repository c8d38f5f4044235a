//! The request parser and validator: any bytes → a clean error or a validated request, never a panic.
#![no_main]

use jemma_router::api::{ChatCompletionRequest, CompletionRequest, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(req) = serde_json::from_slice::<ChatCompletionRequest>(data) {
        let _ = req.validate(&limits);
    }
    if let Ok(req) = serde_json::from_slice::<CompletionRequest>(data) {
        let _ = req.validate(&limits);
    }
});
