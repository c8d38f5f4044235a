//! Identifiers and timestamps of answers, shared by the handlers and the SSE writer (kept apart from both so
//! that neither module reaches into the other).

pub(crate) use jemma_router::api::unix_now_secs as now_secs;

/// A chat completion's id, as OpenAI forms them: `chatcmpl-` and 32 hex digits.
pub(crate) fn completion_id() -> String {
    format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())
}

/// A tool call's id: `call_` and 24 hex digits.
pub(crate) fn call_id() -> String {
    format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}
