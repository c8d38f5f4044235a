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

impl Prompt {
    /// Whether the model may call tools in its answer: a chat that declares some (`tools` not empty), or a
    /// raw prompt (text or ids), which declares them in its own text if at all. A chat without tools gets
    /// tool-call markup back as text ([`crate::answer::OutputProcessor::with_tools`]).
    pub fn declares_tools(&self) -> bool {
        match self {
            Prompt::Chat { tools, .. } => tools.as_ref().is_some_and(|t| !t.is_empty()),
            Prompt::Text(_) | Prompt::Ids(_) => true,
        }
    }
}
