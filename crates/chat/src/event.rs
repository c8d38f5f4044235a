//! What an in-process engine sends back for one request, the same for the MLX and llama.cpp engines so the
//! router maps both with one function; only the final summary differs (`S`).

use crate::logprobs::TokenLogprob;
use crate::tools::{Event as ParseEvent, ToolCall};

/// One request's events, in order: `Started`, then text, tool calls and logprobs, then `Done` or `Error`.
#[derive(Debug, Clone)]
pub enum Event<S> {
    /// The prompt was accepted (after template and tokenizer) and processed.
    Started {
        /// Prompt length in tokens.
        prompt_tokens: usize,
    },
    /// Visible answer text.
    Content(String),
    /// Thinking text (Gemma 4 thought channel).
    Reasoning(String),
    /// A complete tool call.
    ToolCall(ToolCall),
    /// The token just generated with its log-probabilities (only when asked for); sent before the text it
    /// completes.
    Logprobs(TokenLogprob),
    /// Finished, with the engine's summary.
    Done(S),
    /// Failed; nothing more follows.
    Error(String),
}

impl<S> From<ParseEvent> for Event<S> {
    fn from(e: ParseEvent) -> Self {
        match e {
            ParseEvent::Content(c) => Event::Content(c),
            ParseEvent::Reasoning(r) => Event::Reasoning(r),
            ParseEvent::ToolCall(tc) => Event::ToolCall(tc),
            // Answer passes unparseable calls on as text already; kept total for completeness.
            ParseEvent::ToolCallError(e) => Event::Content(e.raw),
        }
    }
}
