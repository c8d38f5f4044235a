//! Anthropic's Messages API (`POST /v1/messages`) on the same tiers: the request turned into the router's
//! [`ChatRequest`] (validated by the same code as OpenAI requests), and the router's output turned back into
//! an Anthropic message, or its stream of events (`message_start`, `content_block_start`,
//! `content_block_delta`, `content_block_stop`, `message_delta`, `message_stop`). Many coding agents and
//! SDKs speak only this API.
//!
//! What maps to what (Anthropic → the OpenAI shape the tiers take):
//! - `system` (a string or text blocks) → a system message;
//! - `text` and `image` blocks (user) → content parts (an image as an `image_url` part); `tool_use` blocks (assistant) → `tool_calls`;
//!   `tool_result` blocks (user) → `tool` messages, before the user's own text; `thinking` blocks
//!   (assistant) → the turn's `reasoning_content`, which Gemma's template shows in the turn under way (a
//!   tool loop, as Anthropic asks thinking blocks to be passed back there) and drops from earlier turns;
//!   `redacted_thinking` (another model's encrypted thought, which nothing here can read) is left out;
//! - `tools[].input_schema` → `parameters`; `tool_choice` `auto` / `any` / `tool` / `none` → `auto` /
//!   `required` / the named function / `none`, `disable_parallel_tool_use` → `parallel_tool_calls: false`;
//! - `thinking: {"type": "enabled"}` → Gemma 4 thinking on, `budget_tokens` (checked as Anthropic checks
//!   it) → `thinking_token_budget`, which the engines enforce; `{"type": "disabled"}` → off;
//! - `stop_sequences` → `stop`; `max_tokens` (required), `temperature`, `top_p`, `top_k` as they are.
//!
//! - `output_config.format` (`json_schema`) → `response_format` `json_schema`, enforced by the grammar;
//!   `output_config.effort` `low` → thinking off, higher → on (Gemma 4 thinks or not);
//! - `thinking` `adaptive` and `between_tools` → thinking on; `display: omitted` leaves the thoughts out;
//! - `cache_control` is accepted: every prompt prefix is cached here anyway (bounded by bytes, not TTL).
//!
//! Fields this gateway cannot honour are refused by name (HTTP 400), never dropped: `document` and other
//! unknown block types, `service_tier` other than `auto`, `speed: fast`, `container`, `mcp_servers`,
//! `inference_geo`, `diagnostics`, and any other field it does not know.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::RouterError;
use crate::api::{
    ChatCompletionRequest, ChatRequest, ContentPart, FunctionCall, FunctionType, Limits, Message,
    MessageContent, ResponseFormat, Stop, StreamOptions, Tool, ToolCall, ToolChoice, Usage,
    UserMessage,
};
use crate::backend::{Chunk, FinishReason};
use crate::route::Output;

/// `POST /v1/messages` body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct MessagesRequest {
    /// Tier, model id or `auto`.
    pub model: String,
    /// Most tokens to generate (required by the API).
    pub max_tokens: Option<u32>,
    /// The conversation: `user` and `assistant` turns.
    pub messages: Vec<Value>,
    /// System prompt: a string or text blocks.
    #[serde(default)]
    pub system: Option<Value>,
    /// Strings that end the answer where they first appear (`stop_reason: stop_sequence` names which).
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    /// Server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Sampling temperature (0–1).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass, in (0, 1] (absent: off).
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k sampling.
    #[serde(default)]
    pub top_k: Option<i32>,
    /// Tools: `{name, description, input_schema, strict}` (`strict`: any call follows `input_schema`).
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// `{type: auto | any | tool | none, name, disable_parallel_tool_use}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// `{type: enabled, budget_tokens}`, `{type: adaptive}`, `{type: between_tools}` or
    /// `{type: disabled}`; `display: omitted` leaves the thoughts out of the answer.
    #[serde(default)]
    pub thinking: Option<Value>,
    /// `{format: {type: json_schema, schema}, effort}`: structured output, and how hard to think.
    #[serde(default)]
    pub output_config: Option<Value>,
    /// `{type: ephemeral}`: accepted and kept, as every prompt's prefix is cached here (for as long as
    /// the byte budget allows, not for a fixed TTL).
    #[serde(default)]
    pub cache_control: Option<Value>,
    /// `standard` (`fast` is refused: there is no faster mode here).
    #[serde(default)]
    #[schema(pattern = "^standard$")]
    pub speed: Option<String>,
    /// `{user_id}`: accepted, not used (as OpenAI's `user`).
    #[serde(default)]
    pub metadata: Option<Value>,
    /// Attribution only: accepted, not used.
    #[serde(default)]
    pub user_profile_id: Option<String>,
    /// Attribution only: accepted, not used.
    #[serde(default)]
    pub workspace_id: Option<String>,
    /// `auto` (or `standard_only`): accepted, there is one tier of service here.
    #[serde(default)]
    #[schema(pattern = "^(auto|standard_only)$")]
    pub service_tier: Option<String>,
    /// Anything else: refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: serde_json::Map<String, Value>,
}

/// A block list or a string as text blocks.
fn blocks(v: &Value, param: &str) -> Result<Vec<Value>, RouterError> {
    match v {
        Value::String(s) => Ok(vec![json!({"type": "text", "text": s})]),
        Value::Array(a) => Ok(a.clone()),
        _ => Err(RouterError::invalid(
            "must be a string or a list of blocks",
            param,
        )),
    }
}

/// The text of a `tool_result`'s content (a string, or text blocks).
fn result_text(content: Option<&Value>, param: &str) -> Result<String, RouterError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (k, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        if !out.is_empty() {
                            out.push('\n');
                        }
                        out.push_str(p.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    other => {
                        return Err(RouterError::invalid(
                            format!("a tool_result may hold text blocks only, got {other:?}"),
                            &format!("{param}.content[{k}]"),
                        ));
                    }
                }
            }
            Ok(out)
        }
        Some(_) => Err(RouterError::invalid(
            "tool_result content must be a string or text blocks",
            &format!("{param}.content"),
        )),
    }
}

/// An `image` block as an OpenAI `image_url` part.
fn image_part(b: &Value, param: &str) -> Result<Value, RouterError> {
    let src = b
        .get("source")
        .ok_or_else(|| RouterError::invalid("an image block needs a source", param))?;
    let url = match src.get("type").and_then(Value::as_str) {
        Some("base64") => {
            let field = |k: &str| {
                src.get(k).and_then(Value::as_str).ok_or_else(|| {
                    RouterError::invalid(
                        format!("a base64 image source needs {k}"),
                        &format!("{param}.source.{k}"),
                    )
                })
            };
            format!("data:{};base64,{}", field("media_type")?, field("data")?)
        }
        Some("url") => src
            .get("url")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        other => {
            return Err(RouterError::invalid(
                format!("image source type {other:?} is not supported (base64 or url)"),
                &format!("{param}.source.type"),
            ));
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// Whether the answer shows its thinking (`thinking.display`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThinkingDisplay {
    /// Thinking blocks carry the thoughts.
    #[default]
    Summarized,
    /// Thoughts are left out of the answer.
    Omitted,
}

impl MessagesRequest {
    /// A `count_tokens` body (the same fields, `max_tokens` not required: nothing is generated) as the
    /// router's request whose prompt is counted. Errors as [`MessagesRequest::to_chat`].
    pub fn to_count(mut self, limits: &Limits) -> Result<ChatRequest, RouterError> {
        if self.max_tokens.is_none() {
            self.max_tokens = Some(limits.max_tokens_ceiling);
        }
        self.stream = false;
        self.to_chat(limits).map(|(chat, _)| chat)
    }

    /// Checks the request and turns it into the router's request (then validated by the same rules as
    /// an OpenAI chat request), with how thinking is to be shown. Errors name the field, in Anthropic's
    /// terms.
    pub fn to_chat(self, limits: &Limits) -> Result<(ChatRequest, ThinkingDisplay), RouterError> {
        if let Some((k, _)) = self.other.iter().find(|(_, v)| !v.is_null()) {
            return Err(RouterError::invalid(
                format!("{k} is not supported by this gateway"),
                k.as_str(),
            ));
        }
        if let Some(s) = self.speed.as_deref()
            && s != "standard"
        {
            return Err(RouterError::invalid(
                format!("speed {s:?} is not available (standard)"),
                "speed",
            ));
        }
        if let Some(t) = self.service_tier.as_deref()
            && t != "auto"
            && t != "standard_only"
        {
            return Err(RouterError::invalid(
                format!("service_tier {t:?} is not available (auto or standard_only)"),
                "service_tier",
            ));
        }
        let max_tokens = self
            .max_tokens
            .ok_or_else(|| RouterError::invalid("max_tokens is required", "max_tokens"))?;
        if let Some(t) = self.temperature
            && !(t.is_finite() && (0.0..=1.0).contains(&t))
        {
            return Err(RouterError::invalid(
                "temperature must be between 0 and 1",
                "temperature",
            ));
        }
        let mut messages = vec![];
        if let Some(system) = &self.system {
            let text: String = blocks(system, "system")?
                .iter()
                .enumerate()
                .map(|(k, b)| match b.get("type").and_then(Value::as_str) {
                    Some("text") => Ok(b
                        .get("text")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()),
                    other => Err(RouterError::invalid(
                        format!("system blocks must be text, got {other:?}"),
                        &format!("system[{k}]"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?
                .join("\n\n");
            if system.is_string() || !text.is_empty() {
                messages.push(Message::system(text));
            }
        }
        for (i, m) in self.messages.iter().enumerate() {
            let param = format!("messages[{i}]");
            let role = m.get("role").and_then(Value::as_str).unwrap_or("");
            if role != "user" && role != "assistant" {
                return Err(RouterError::invalid(
                    format!("role must be user or assistant, got {role:?}"),
                    &format!("{param}.role"),
                ));
            }
            let content = m.get("content").ok_or_else(|| {
                RouterError::invalid("content is required", &format!("{param}.content"))
            })?;
            let mut parts: Vec<ContentPart> = vec![];
            let mut calls: Vec<ToolCall> = vec![];
            let mut thoughts: Vec<String> = vec![];
            for (k, b) in blocks(content, &format!("{param}.content"))?
                .iter()
                .enumerate()
            {
                let bp = format!("{param}.content[{k}]");
                match (role, b.get("type").and_then(Value::as_str)) {
                    (_, Some("text")) => parts.push(ContentPart::Text {
                        text: b
                            .get("text")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    }),
                    // An image block becomes OpenAI's image_url part: the chat request's checks (size,
                    // SSRF, a model that cannot see it: a 400 naming the part) apply to it as to any.
                    ("user", Some("image")) => {
                        parts.push(serde_json::from_value(image_part(b, &bp)?).map_err(|e| {
                            RouterError::invalid(format!("image: {e}"), &format!("{bp}.source"))
                        })?)
                    }
                    ("user", Some("tool_result")) => {
                        let id = b
                            .get("tool_use_id")
                            .and_then(Value::as_str)
                            .ok_or_else(|| RouterError::invalid("tool_use_id is required", &bp))?;
                        let mut text = result_text(b.get("content"), &bp)?;
                        if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                            text = format!("Error: {text}");
                        }
                        messages.push(Message::tool(id, text));
                    }
                    ("assistant", Some("tool_use")) => {
                        let name = b.get("name").and_then(Value::as_str).ok_or_else(|| {
                            RouterError::invalid("a tool_use block needs a name", &bp)
                        })?;
                        let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                        let id = b.get("id").and_then(Value::as_str).ok_or_else(|| {
                            RouterError::invalid(
                                "a tool_use block needs an id",
                                &format!("{bp}.id"),
                            )
                        })?;
                        calls.push(ToolCall {
                            id: id.to_string(),
                            kind: FunctionType::Function,
                            function: FunctionCall {
                                name: name.to_string(),
                                arguments: input.to_string(),
                            },
                        });
                    }
                    // The turn's thought: the template shows it while the turn is under way (a tool
                    // loop), so the prompt is what the model wrote and its cached prefix still serves.
                    ("assistant", Some("thinking")) => {
                        let thought =
                            b.get("thinking").and_then(Value::as_str).ok_or_else(|| {
                                RouterError::invalid(
                                    "a thinking block needs its thinking text",
                                    &format!("{bp}.thinking"),
                                )
                            })?;
                        // An omitted thought (`display: omitted`) comes back empty: nothing to show.
                        if !thought.is_empty() {
                            thoughts.push(thought.to_string());
                        }
                    }
                    // Encrypted by the model that wrote it: there is nothing here to read.
                    ("assistant", Some("redacted_thinking")) => {}
                    (_, other) => {
                        return Err(RouterError::invalid(
                            format!("{role} content block type {other:?} is not supported"),
                            &format!("{bp}.type"),
                        ));
                    }
                }
            }
            if role == "assistant" {
                let text = (parts.iter())
                    .filter_map(|p| match p {
                        ContentPart::Text { text } => Some(text.as_str()),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                let text = (!text.is_empty() || calls.is_empty()).then_some(text);
                let mut turn = Message::assistant(text, calls);
                if let Message::Assistant(a) = &mut turn
                    && !thoughts.is_empty()
                {
                    a.reasoning_content = Some(thoughts.join("\n"));
                }
                messages.push(turn);
            } else if !parts.is_empty() {
                messages.push(Message::User(UserMessage {
                    content: MessageContent::Parts(parts),
                    name: None,
                }));
            }
        }
        let tools = self
            .tools
            .as_ref()
            .map(|ts| {
                ts.iter()
                    .enumerate()
                    .map(|(i, t)| {
                        if t.get("type")
                            .and_then(Value::as_str)
                            .is_some_and(|ty| ty != "custom")
                        {
                            return Err(RouterError::invalid(
                                "only client tools (name, input_schema) are supported",
                                &format!("tools[{i}].type"),
                            ));
                        }
                        let name = t.get("name").and_then(Value::as_str).ok_or_else(|| {
                            RouterError::invalid("a tool needs a name", &format!("tools[{i}].name"))
                        })?;
                        // Deferred loading needs a tool search this gateway does not have. `strict`
                        // is enforced as OpenAI's is: any call to the tool follows its input_schema.
                        if t.get("defer_loading") == Some(&Value::Bool(true)) {
                            return Err(RouterError::invalid(
                                "defer_loading: true cannot be honoured here",
                                &format!("tools[{i}].defer_loading"),
                            ));
                        }
                        let strict = match t.get("strict") {
                            None | Some(Value::Null) => None,
                            Some(Value::Bool(b)) => Some(*b),
                            Some(_) => {
                                return Err(RouterError::invalid(
                                    "strict must be a boolean",
                                    &format!("tools[{i}].strict"),
                                ));
                            }
                        };
                        Ok(Tool::function(
                            name,
                            t.get("description")
                                .and_then(Value::as_str)
                                .map(String::from),
                            t.get("input_schema")
                                .cloned()
                                .unwrap_or_else(|| json!({"type": "object"})),
                        )
                        .with_strict(strict))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let (tool_choice, parallel) = match &self.tool_choice {
            None => (None, None),
            Some(tc) => {
                let parallel = tc
                    .get("disable_parallel_tool_use")
                    .and_then(Value::as_bool)
                    .map(|d| !d);
                let choice = match tc.get("type").and_then(Value::as_str) {
                    Some("auto") => ToolChoice::Auto,
                    Some("any") => ToolChoice::Required,
                    Some("none") => ToolChoice::None,
                    Some("tool") => {
                        let name = tc.get("name").and_then(Value::as_str).ok_or_else(|| {
                            RouterError::invalid("tool_choice.name is required", "tool_choice.name")
                        })?;
                        ToolChoice::Function(name.to_string())
                    }
                    other => {
                        return Err(RouterError::invalid(
                            format!(
                                "tool_choice.type must be auto, any, tool or none, got {other:?}"
                            ),
                            "tool_choice.type",
                        ));
                    }
                };
                (Some(choice), parallel)
            }
        };
        let mut display = ThinkingDisplay::Summarized;
        if let Some(d) = self
            .thinking
            .as_ref()
            .and_then(|t| t.get("display"))
            .filter(|d| !d.is_null())
        {
            display = match d.as_str() {
                Some("summarized") => ThinkingDisplay::Summarized,
                Some("omitted") => ThinkingDisplay::Omitted,
                _ => {
                    return Err(RouterError::invalid(
                        "thinking.display must be summarized or omitted",
                        "thinking.display",
                    ));
                }
            };
        }
        let mut thinking_token_budget = None;
        let mut reasoning_effort = None;
        let mut enable_thinking = match &self.thinking {
            None => None,
            Some(t) => match t.get("type").and_then(Value::as_str) {
                Some("enabled") => {
                    let budget =
                        t.get("budget_tokens")
                            .and_then(Value::as_u64)
                            .ok_or_else(|| {
                                RouterError::invalid(
                                    "thinking.budget_tokens is required",
                                    "thinking.budget_tokens",
                                )
                            })?;
                    if budget < 1024 || budget >= u64::from(max_tokens) {
                        return Err(RouterError::invalid(
                            "thinking.budget_tokens must be at least 1024 and less than max_tokens",
                            "thinking.budget_tokens",
                        ));
                    }
                    // Below max_tokens, itself a u32: the cast keeps it.
                    thinking_token_budget = Some(budget as u32);
                    Some(true)
                }
                // Gemma 4 thinks or not per turn: letting it think is the nearest it has to deciding
                // for itself, or to thinking between tool calls (it thinks again each turn).
                Some("adaptive" | "between_tools") => Some(true),
                Some("disabled") => Some(false),
                other => {
                    return Err(RouterError::invalid(
                        format!(
                            "thinking.type must be enabled, adaptive, between_tools or disabled, got \
                             {other:?}"
                        ),
                        "thinking.type",
                    ));
                }
            },
        };
        let mut response_format = None;
        if let Some(oc) = self.output_config.as_ref().filter(|v| !v.is_null()) {
            let o = oc.as_object().ok_or_else(|| {
                RouterError::invalid("output_config must be an object", "output_config")
            })?;
            if let Some(k) = o.keys().find(|k| *k != "format" && *k != "effort") {
                return Err(RouterError::invalid(
                    format!("output_config.{k} is not supported by this gateway"),
                    &format!("output_config.{k}"),
                ));
            }
            if let Some(f) = o.get("format").filter(|v| !v.is_null()) {
                if f.get("type").and_then(Value::as_str) != Some("json_schema") {
                    return Err(RouterError::invalid(
                        "output_config.format.type must be json_schema",
                        "output_config.format.type",
                    ));
                }
                let schema = f.get("schema").cloned().ok_or_else(|| {
                    RouterError::invalid(
                        "output_config.format.schema is required",
                        "output_config.format.schema",
                    )
                })?;
                response_format = Some(ResponseFormat::json_schema("output", schema, true));
            }
            // Effort is how much the model thinks: Gemma 4 either thinks or not, so low effort answers
            // without thinking and the others think, unless `thinking` said otherwise. Where it decides,
            // it is also OpenAI's `reasoning_effort` for an upstream that reads only that (`max` is
            // OpenAI's `xhigh`).
            let effort = o.get("effort").filter(|v| !v.is_null()).map(Value::as_str);
            if enable_thinking.is_none()
                && let Some(Some(e)) = effort
            {
                reasoning_effort = Some(if e == "max" { "xhigh" } else { e }.to_string());
            }
            match effort {
                None => {}
                Some(Some("low")) => {
                    enable_thinking.get_or_insert(false);
                }
                Some(Some("medium" | "high" | "xhigh" | "max")) => {
                    enable_thinking.get_or_insert(true);
                }
                Some(_) => {
                    return Err(RouterError::invalid(
                        "output_config.effort must be low, medium, high, xhigh or max",
                        "output_config.effort",
                    ));
                }
            }
        }
        let chat = ChatCompletionRequest {
            model: Some(self.model),
            messages,
            max_tokens: Some(max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            stop: self.stop_sequences.map(Stop::Many),
            tools,
            tool_choice,
            parallel_tool_calls: parallel,
            stream: self.stream,
            stream_options: self.stream.then_some(StreamOptions {
                include_usage: true,
                include_obfuscation: None,
            }),
            enable_thinking,
            thinking_token_budget,
            response_format,
            ..Default::default()
        };
        let _ = (
            self.metadata,
            self.cache_control,
            self.user_profile_id,
            self.workspace_id,
        );
        let mut chat = chat.validate(limits)?;
        chat.reasoning_effort = reasoning_effort;
        Ok((chat, display))
    }
}

/// A new message id (`msg_…`).
pub fn message_id() -> String {
    format!("msg_{}", uuid::Uuid::new_v4().simple())
}

/// A new tool-use id (`toolu_…`).
pub fn tool_use_id() -> String {
    format!("toolu_{}", uuid::Uuid::new_v4().simple())
}

/// A call's arguments as `tool_use.input`, which must be an object: an upstream's arguments that are not
/// a JSON object become `{}` (local engines always give one).
fn tool_input(arguments: &str) -> Value {
    serde_json::from_str::<Value>(arguments)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}))
}

/// Anthropic's `stop_reason` for how an answer ended.
pub fn stop_reason(
    finish: FinishReason,
    tool_use: bool,
    stop_sequence: Option<&str>,
) -> &'static str {
    match finish {
        _ if tool_use => "tool_use",
        FinishReason::Length => "max_tokens",
        FinishReason::ContentFilter => "refusal",
        FinishReason::ToolCalls => "end_turn",
        _ if stop_sequence.is_some() => "stop_sequence",
        _ => "end_turn",
    }
}

/// Anthropic's `usage` from the router's.
pub fn usage(u: &Usage) -> Value {
    let cached = u.prompt_tokens_details.map_or(0, |d| d.cached_tokens);
    json!({"input_tokens": u.prompt_tokens.saturating_sub(cached), "output_tokens": u.completion_tokens,
           "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0})
}

/// Assembles a whole message (the non-streaming answer) from the router's output: its blocks in the order
/// they came, consecutive pieces of one kind in one block — the same blocks the stream ([`EventStream`])
/// would have sent.
#[derive(Debug, Default)]
pub struct MessageBuilder {
    display: ThinkingDisplay,
    content: Vec<Value>,
    tool_use: bool,
}

impl MessageBuilder {
    /// A message whose thinking is shown as `display` says.
    pub fn new(display: ThinkingDisplay) -> Self {
        Self {
            display,
            ..Default::default()
        }
    }

    /// Appends `piece` to the last block when it is of `kind` (`text` / `thinking`), else opens one.
    fn append(&mut self, kind: &str, piece: &str) {
        if self.content.last().and_then(|b| b["type"].as_str()) != Some(kind) {
            self.content.push(if kind == "thinking" {
                // Gemma's thoughts are not signed; the field is there for clients that expect it.
                json!({"type": "thinking", "thinking": "", "signature": ""})
            } else {
                json!({"type": "text", "text": ""})
            });
        }
        if let Some(Value::String(s)) = self.content.last_mut().and_then(|b| b.get_mut(kind)) {
            s.push_str(piece);
        }
    }

    /// Takes one piece of the answer.
    pub fn push(&mut self, c: Chunk) {
        match c {
            Chunk::Content(t) if !t.is_empty() => self.append("text", &t),
            // Omitted thoughts: the block is there, its text is not (as Anthropic's `display: omitted`).
            Chunk::Reasoning(r) if !r.is_empty() => match self.display {
                ThinkingDisplay::Summarized => self.append("thinking", &r),
                ThinkingDisplay::Omitted => self.append("thinking", ""),
            },
            Chunk::ToolCall { name, arguments } => {
                self.tool_use = true;
                self.content.push(json!({"type": "tool_use",
                    "id": tool_use_id(), "name": name, "input": tool_input(&arguments)}));
            }
            _ => {}
        }
    }

    /// The message, once the router's `End` arrived.
    pub fn finish(
        self,
        model: &str,
        finish: FinishReason,
        usage_: &Usage,
        stop_sequence: Option<&str>,
    ) -> Value {
        let reason = stop_reason(finish, self.tool_use, stop_sequence);
        json!({"id": message_id(), "type": "message", "role": "assistant", "model": model,
               "content": self.content, "stop_reason": reason,
               "stop_sequence": if reason == "stop_sequence" { json!(stop_sequence) } else { Value::Null },
               "usage": usage(usage_)})
    }
}

/// Turns the router's output into Anthropic stream events (`(event name, data)`), one content block at a
/// time: thinking, text and tool-use blocks each opened when their first piece arrives and closed when
/// another kind starts or the answer ends.
#[derive(Debug)]
pub struct EventStream {
    model: String,
    display: ThinkingDisplay,
    started: bool,
    /// The open block: its index and kind ("thinking", "text").
    open: Option<(usize, &'static str)>,
    next_index: usize,
    tool_use: bool,
    /// The prompt's size once the tier has read it (`Chunk::Started`), for `message_start`'s usage.
    input: Option<Usage>,
}

impl EventStream {
    /// A stream for a message answered under the name `model` (what the client asked for), its thinking
    /// shown as `display` says.
    pub fn new(model: String, display: ThinkingDisplay) -> Self {
        Self {
            model,
            display,
            started: false,
            open: None,
            next_index: 0,
            tool_use: false,
            input: None,
        }
    }

    fn start(&mut self, out: &mut Vec<(&'static str, Value)>) {
        if !self.started {
            self.started = true;
            out.push((
                "message_start",
                json!({"type": "message_start", "message": {
                "id": message_id(), "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": usage(&self.input.unwrap_or_default())}}),
            ));
        }
    }

    fn close(&mut self, out: &mut Vec<(&'static str, Value)>) {
        if let Some((i, kind)) = self.open.take() {
            if kind == "thinking" {
                // Gemma's thoughts are not signed; the field is there for clients that expect it.
                out.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": i,
                    "delta": {"type": "signature_delta", "signature": ""}}),
                ));
            }
            out.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": i}),
            ));
        }
    }

    fn delta(&mut self, kind: &'static str, text: String, out: &mut Vec<(&'static str, Value)>) {
        if self.open.map(|(_, k)| k) != Some(kind) {
            self.close(out);
            let i = self.next_index;
            self.next_index += 1;
            self.open = Some((i, kind));
            let block = if kind == "thinking" {
                json!({"type": "thinking", "thinking": "", "signature": ""})
            } else {
                json!({"type": "text", "text": ""})
            };
            out.push((
                "content_block_start",
                json!({"type": "content_block_start", "index": i,
                "content_block": block}),
            ));
        }
        let i = self.next_index - 1;
        // Omitted thoughts: the block is there, its text is not (as Anthropic's `display: omitted`).
        if kind == "thinking" && self.display == ThinkingDisplay::Omitted {
            return;
        }
        let d = if kind == "thinking" {
            json!({"type": "thinking_delta", "thinking": text})
        } else {
            json!({"type": "text_delta", "text": text})
        };
        out.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": i, "delta": d}),
        ));
    }

    /// The events for one router output; `done` is true once the stream is complete (`message_stop` or
    /// an error event was produced).
    pub fn on(&mut self, o: Output) -> (Vec<(&'static str, Value)>, bool) {
        let mut out = vec![];
        match o {
            Output::Waiting => {
                self.start(&mut out);
                out.push(("ping", json!({"type": "ping"})));
            }
            Output::Chunk(Chunk::Content(t)) if !t.is_empty() => {
                self.start(&mut out);
                self.delta("text", t, &mut out);
            }
            Output::Chunk(Chunk::Reasoning(r)) if !r.is_empty() => {
                self.start(&mut out);
                self.delta("thinking", r, &mut out);
            }
            Output::Chunk(Chunk::ToolCall { name, arguments }) => {
                self.start(&mut out);
                self.close(&mut out);
                self.tool_use = true;
                let i = self.next_index;
                self.next_index += 1;
                out.push(("content_block_start", json!({"type": "content_block_start", "index": i,
                    "content_block": {"type": "tool_use", "id": tool_use_id(), "name": name, "input": {}}})));
                out.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": i,
                    "delta": {"type": "input_json_delta",
                              "partial_json": tool_input(&arguments).to_string()}}),
                ));
                out.push((
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": i}),
                ));
            }
            // The tier has read the prompt: `message_start` can say how large it was (a cold tier that
            // made the stream start with pings first leaves it at 0 there; `message_delta` has it).
            Output::Chunk(Chunk::Started {
                prompt_tokens,
                cached_tokens,
                ..
            }) => {
                self.input = Some(Usage::new(prompt_tokens, 0, cached_tokens, 0));
                self.start(&mut out);
            }
            Output::Chunk(_) => {}
            Output::End {
                finish_reason,
                usage: u,
                stop_sequence,
                ..
            } => {
                self.start(&mut out);
                self.close(&mut out);
                let reason = stop_reason(finish_reason, self.tool_use, stop_sequence.as_deref());
                let mut usage_ = usage(&u);
                // The input side is known only now (the first event goes out before the prompt is read).
                usage_["output_tokens"] = json!(u.completion_tokens);
                out.push(("message_delta", json!({"type": "message_delta",
                    "delta": {"stop_reason": reason,
                              "stop_sequence": if reason == "stop_sequence" { json!(stop_sequence) } else { Value::Null }},
                    "usage": usage_})));
                out.push(("message_stop", json!({"type": "message_stop"})));
                return (out, true);
            }
            Output::Error(e) => {
                out.push(("error", error_body(&e)));
                return (out, true);
            }
        }
        (out, false)
    }
}

/// Anthropic's HTTP status and error type for a router error.
pub fn error_parts(e: &RouterError) -> (u16, &'static str) {
    match e {
        RouterError::InvalidRequest { .. } => (400, "invalid_request_error"),
        RouterError::TooLarge { .. } => (413, "request_too_large"),
        RouterError::UnsupportedMedia { .. } => (415, "invalid_request_error"),
        RouterError::UnknownModel(_) => (404, "not_found_error"),
        RouterError::RateLimited { .. } => (429, "rate_limit_error"),
        RouterError::Busy { .. } => (529, "overloaded_error"),
        RouterError::AllTiersDown { .. } => (503, "api_error"),
        RouterError::Timeout(_) => (504, "timeout_error"),
        RouterError::Config(_) => (500, "api_error"),
    }
}

/// Anthropic's error body: `{"type": "error", "error": {"type", "message"}}`.
pub fn error_body(e: &RouterError) -> Value {
    let (_, ty) = error_parts(e);
    let message = match e {
        RouterError::InvalidRequest {
            message,
            param: Some(p),
        } if !message.contains(p.as_str()) => format!("{p}: {message}"),
        other => other.to_string(),
    };
    json!({"type": "error", "error": {"type": ty, "message": message}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_message_keeps_its_blocks_in_the_order_they_came() {
        // An upstream that writes, calls a tool and writes again (text → tool → text), after a thought.
        let mut b = MessageBuilder::new(ThinkingDisplay::Summarized);
        for c in [
            Chunk::Reasoning("Let me ".into()),
            Chunk::Reasoning("look.".into()),
            Chunk::Content("Checking".into()),
            Chunk::Content("...".into()),
            Chunk::ToolCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            },
            Chunk::Content("Done.".into()),
        ] {
            b.push(c);
        }
        let m = b.finish("fast", FinishReason::Stop, &Usage::default(), None);
        let kinds: Vec<&str> = m["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["thinking", "text", "tool_use", "text"]);
        assert_eq!(m["content"][0]["thinking"], "Let me look.");
        assert_eq!(m["content"][1]["text"], "Checking...");
        assert_eq!(m["content"][2]["input"]["city"], "Paris");
        assert_eq!(m["stop_reason"], "tool_use");
    }

    fn req(v: Value) -> Result<ChatRequest, RouterError> {
        serde_json::from_value::<MessagesRequest>(v)
            .unwrap()
            .to_chat(&Limits::default())
            .map(|(c, _)| c)
    }

    #[test]
    fn a_tool_round_trip_becomes_openai_messages() {
        let r = req(json!({"model": "fast", "max_tokens": 64, "system": [{"type": "text", "text": "Be brief."}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object",
                "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "…", "signature": "x"},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "21 C"}]}, {"type": "text", "text": "And tomorrow?"}]}]}))
        .unwrap();
        let roles: Vec<&str> = r.messages.iter().map(|m| m.role()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
        assert_eq!(
            r.messages[2].to_value()["tool_calls"][0]["function"]["name"],
            "get_weather"
        );
        assert_eq!(r.messages[3].to_value()["tool_call_id"], "toolu_1");
        assert_eq!(r.tool_choice, Some(crate::api::ToolChoice::Required));
        assert_eq!(r.parallel_tool_calls, Some(false));
        assert_eq!(r.max_tokens, Some(64));
        assert_eq!(r.tools.as_ref().unwrap()[0].function.strict, None);
        // The turn's thinking block is its reasoning, which the template shows while the turn is under way.
        assert_eq!(r.messages[2].to_value()["reasoning_content"], "…");
    }

    /// `thinking.budget_tokens` becomes the engines' thinking budget.
    #[test]
    fn a_thinking_budget_reaches_the_engines() {
        let r = req(json!({"model": "fast", "max_tokens": 2048, "messages": [{"role": "user", "content": "x"}],
            "thinking": {"type": "enabled", "budget_tokens": 1500}}))
        .unwrap();
        assert_eq!(
            (r.enable_thinking, r.thinking_token_budget),
            (Some(true), Some(1500))
        );
    }

    /// A strict tool (Anthropic's strict tool use) carries its flag to the engines, which enforce any call
    /// to it; a flag that is not a boolean and deferred loading are refused by name.
    #[test]
    fn a_strict_tool_keeps_its_flag() {
        let with = |tool: Value| {
            req(json!({"model": "fast", "max_tokens": 8, "tools": [tool],
                "messages": [{"role": "user", "content": "x"}]}))
        };
        let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}});
        let r = with(json!({"name": "f", "input_schema": schema, "strict": true})).unwrap();
        assert_eq!(r.tools.unwrap()[0].function.strict, Some(true));
        for (k, v) in [("strict", json!("yes")), ("defer_loading", json!(true))] {
            let mut t = json!({"name": "f", "input_schema": schema});
            t[k] = v;
            match with(t) {
                Err(RouterError::InvalidRequest { param, .. }) => {
                    assert_eq!(param.as_deref(), Some(&*format!("tools[0].{k}")))
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let base = || json!({"model": "fast", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]});
        let param = |v: Value| match req(v) {
            Err(RouterError::InvalidRequest { param, .. }) => param.unwrap(),
            other => panic!("{other:?}"),
        };
        let mut v = base();
        v.as_object_mut().unwrap().remove("max_tokens");
        assert_eq!(param(v), "max_tokens");
        let mut v = base();
        v["mcp_servers"] = json!([]);
        assert_eq!(param(v), "mcp_servers");
        let mut v = base();
        v["messages"][0]["content"] = json!([{"type": "document", "source": {}}]);
        assert_eq!(param(v), "messages[0].content[0].type");
        let mut v = base();
        v["thinking"] = json!({"type": "enabled", "budget_tokens": 10});
        assert_eq!(param(v), "thinking.budget_tokens");
        let mut v = base();
        v["temperature"] = json!(1.5);
        assert_eq!(param(v), "temperature");
        // An image block is an image_url part; a source it cannot take and an image from the assistant are
        // refused by name.
        let mut v = base();
        v["messages"][0]["content"] = json!([{"type": "image", "source": {"type": "base64",
            "media_type": "image/png", "data": "iVBORw0KGgo="}}]);
        assert!(req(v).unwrap().has_images);
        let mut v = base();
        v["messages"][0]["content"] = json!([{"type": "image", "source": {"type": "file",
            "file_id": "f"}}]);
        assert_eq!(param(v), "messages[0].content[0].source.type");
        let mut v = base();
        v["messages"] = json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}]);
        assert_eq!(param(v), "messages[1].content[0].type");
        let mut v = base();
        v["inference_geo"] = json!("eu");
        assert_eq!(param(v), "inference_geo");
        let mut v = base();
        v["output_config"] = json!({"effort": "extreme"});
        assert_eq!(param(v), "output_config.effort");
        // Structured output and effort are honoured.
        let mut v = base();
        v["output_config"] = json!({"effort": "low", "format": {"type": "json_schema",
            "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}});
        v["cache_control"] = json!({"type": "ephemeral"});
        let r = req(v).unwrap();
        assert!(matches!(
            r.response_format,
            crate::api::ResponseFormat::JsonSchema { .. }
        ));
        assert_eq!(r.enable_thinking, Some(false));
        // The effort is also OpenAI's, for an upstream that reads only that; `thinking` overrides it.
        assert_eq!(r.reasoning_effort.as_deref(), Some("low"));
        let mut v = base();
        v["output_config"] = json!({"effort": "max"});
        assert_eq!(req(v).unwrap().reasoning_effort.as_deref(), Some("xhigh"));
        let mut v = base();
        v["output_config"] = json!({"effort": "high"});
        v["thinking"] = json!({"type": "disabled"});
        let r = req(v).unwrap();
        assert_eq!((r.enable_thinking, r.reasoning_effort), (Some(false), None));
    }
}
