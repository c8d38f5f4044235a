//! What a generation starts from, the same for every engine.

use serde_json::Value;

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// OpenAI messages rendered through the model's own chat template (a trailing assistant message is a
    /// prefix to continue).
    Chat {
        /// Messages (role, content, tool_calls, …).
        messages: Vec<Value>,
        /// OpenAI `tools` array.
        tools: Option<Vec<Value>>,
        /// Gemma 4's thinking switch, for templates that support it.
        enable_thinking: Option<bool>,
    },
    /// Raw text (`/v1/completions`), tokenized with special tokens parsed; BOS is prepended unless present.
    Text(String),
    /// Token ids as given.
    Ids(Vec<u32>),
}
