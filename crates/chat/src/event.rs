//! What an in-process engine sends back for one request, the same for the MLX and llama.cpp engines so the
//! router maps both with one function; only the final summary differs (`S`). Also the typed contracts every
//! layer above the engines shares: why an answer ended ([`FinishReason`]) and whose fault a failure is
//! ([`EngineFailure`]).

use serde::{Deserialize, Serialize};

use crate::logprobs::TokenLogprob;
use crate::tools::{Parsed, ToolCall};

/// One request's events, in order: `Started` (after `Progress` for each step of a prompt read in several),
/// then text, tool calls, logprobs and progress, then `Done` or `Error`.
#[derive(Debug, Clone)]
pub enum Event<S> {
    /// The prompt was accepted (after template and tokenizer) and processed.
    Started {
        /// Prompt length in tokens.
        prompt_tokens: usize,
        /// How many of them were served from the prefix cache (not prefilled again).
        cached_tokens: usize,
    },
    /// Visible answer text.
    Content(String),
    /// Thinking text (Gemma 4 thought channel).
    Reasoning(String),
    /// A complete tool call.
    ToolCall(ToolCall),
    /// The request advanced a step that sent nothing else: a chunk of its prompt was read, or a token was
    /// generated whose text is held back (most often a tool call being written, which is sent whole once
    /// it closes). Nothing to show yet, but the answer is advancing: the serving core's host sends one per
    /// such step (before `Started` while the prompt is read), so that a consumer's stall deadlines (the
    /// router's `first_token_timeout_secs` and `idle_timeout_secs`) tell a long prompt or a long call from
    /// a stalled engine.
    Progress,
    /// The token just generated with its log-probabilities (only when asked for); sent before the text it
    /// completes.
    Logprobs(TokenLogprob),
    /// Finished, with the engine's summary.
    Done(S),
    /// Failed; nothing more follows.
    Error(EngineFailure),
}

/// Why an answer ended: OpenAI's `finish_reason`, serialised as its wire strings (`"stop"`, `"length"`,
/// `"tool_calls"`, `"content_filter"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` (or the context) was reached.
    Length,
    /// The model called one or more tools.
    ToolCalls,
    /// An upstream withheld content.
    ContentFilter,
}

impl FinishReason {
    /// The OpenAI wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
        }
    }

    /// An upstream's `finish_reason`. The legacy `"function_call"` is a tool call; a value this type does not
    /// know (servers invent their own, e.g. `"eos"`, `"abort"`) ends the answer as `Stop`, since the text
    /// the client received is complete either way.
    pub fn from_wire(s: &str) -> Self {
        match s {
            "length" => FinishReason::Length,
            "tool_calls" | "function_call" => FinishReason::ToolCalls,
            "content_filter" => FinishReason::ContentFilter,
            _ => FinishReason::Stop,
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an engine could not answer, typed by whose fault it is. The router decides on the variant (never on
/// the message's text): a client error goes back as HTTP 400 and leaves the tier's circuit breaker alone; a
/// fault counts against the tier and falls back to the next one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineFailure {
    /// The request cannot be served as given (template error, context overflow, bad parameter).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The engine failed (load failure, runtime error, out of memory).
    #[error("{0}")]
    Fault(String),
}

impl<S> From<Parsed> for Event<S> {
    fn from(e: Parsed) -> Self {
        match e {
            Parsed::Content(c) => Event::Content(c),
            Parsed::Reasoning(r) => Event::Reasoning(r),
            Parsed::ToolCall(tc) => Event::ToolCall(tc),
            // The output processor passes unparseable calls on as text already; kept total for completeness.
            Parsed::ToolCallError(e) => Event::Content(e.raw),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_reason_round_trips_the_wire_strings() {
        for f in [
            FinishReason::Stop,
            FinishReason::Length,
            FinishReason::ToolCalls,
            FinishReason::ContentFilter,
        ] {
            assert_eq!(serde_json::to_value(f).unwrap(), f.as_str());
            assert_eq!(FinishReason::from_wire(f.as_str()), f);
        }
        assert_eq!(
            FinishReason::from_wire("function_call"),
            FinishReason::ToolCalls
        );
        assert_eq!(FinishReason::from_wire("eos"), FinishReason::Stop);
    }
}
