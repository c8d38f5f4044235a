//! OpenAI's Responses API (`POST /v1/responses`), stateless, on the same tiers: the request turned into the
//! router's [`ChatRequest`] (validated by the same code as a chat request), and the router's output turned
//! back into a `response` object or its stream of events (`response.created` … `response.completed`),
//! which newer OpenAI clients use by default.
//!
//! Input: a string, or items — messages (`user`, `system`, `developer`, `assistant`; `input_text` and
//! `output_text` parts, and `input_image` parts as `image_url` parts in user messages), `function_call` and `function_call_output` items (a tool round
//! trip), `reasoning` items (the thought of the assistant turn after them — its `reasoning_text`, or the
//! `encrypted_content` this gateway gave, or its summary —, which Gemma's template shows while that turn is
//! under way and drops from earlier turns). `instructions` is the
//! system prompt; `tools` are function tools; `tool_choice`, `parallel_tool_calls`, `max_tool_calls: 1`,
//! `text.format` (`text`, `json_object`, `json_schema`: enforced by the grammar), `reasoning.effort` (`none`,
//! `minimal` and `low` answer without thinking, higher think), `reasoning.summary` (`auto` or `detailed`:
//! Gemma writes no summary, so each reasoning item's one summary part is the thought itself, streamed with
//! the `response.reasoning_summary_*` events; `concise` is refused), `reasoning.context` (`current_turn`:
//! earlier thoughts are not shown again), `include: ["reasoning.encrypted_content"]` (the thought, base64,
//! as an opaque field a stateless client passes back), `max_output_tokens`, `temperature`, `top_p`. An item
//! `max_output_tokens` cut is `incomplete`, as the response is.
//!
//! Nothing is stored: `store: true`, `previous_response_id`, `conversation`, `background` and the other
//! fields this gateway cannot honour are refused by name (HTTP 400), never dropped.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::RouterError;
use crate::api::{
    AssistantMessage, ChatCompletionRequest, ChatRequest, ContentPart, FunctionCall, FunctionType,
    ImageUrl, InstructionMessage, Limits, Message, MessageContent, ResponseFormat, StreamOptions,
    Tool, ToolCall, ToolChoice, Usage, UserMessage,
};
use crate::backend::{Chunk, FinishReason};
use crate::route::Output;

/// `POST /v1/responses` body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct ResponsesRequest {
    /// Tier, model id or `auto`.
    #[serde(default)]
    pub model: Option<String>,
    /// A string, or input items.
    pub input: Value,
    /// System instructions.
    #[serde(default)]
    pub instructions: Option<String>,
    /// Most tokens to generate.
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass, in (0, 1] (absent: off).
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Function tools: `{type: function, name, description, parameters, strict}` (`strict`, true unless
    /// given false as on OpenAI: any call follows `parameters`).
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// `none`, `auto`, `required` or `{type: function, name}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Several calls in one answer.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// At most this many tool calls (1 is honoured).
    #[serde(default)]
    pub max_tool_calls: Option<u32>,
    /// `{format: {type: text | json_object | json_schema}}`.
    #[serde(default)]
    pub text: Option<Value>,
    /// `{effort, summary, context, mode}` (`generate_summary`: `summary`'s old name).
    #[serde(default)]
    pub reasoning: Option<Value>,
    /// Server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options: `include_obfuscation: false` (nothing here pads chunks).
    #[serde(default)]
    pub stream_options: Option<Value>,
    /// `false` (or absent): nothing is stored here either way.
    #[serde(default)]
    pub store: Option<bool>,
    /// Echoed back.
    #[serde(default)]
    pub metadata: Option<Value>,
    /// Attribution and cache hints: accepted (the prefix cache is automatic).
    #[serde(default)]
    pub user: Option<String>,
    /// Attribution: accepted.
    #[serde(default)]
    pub safety_identifier: Option<String>,
    /// A cache hint: accepted (every prompt prefix is cached here).
    #[serde(default)]
    pub prompt_cache_key: Option<String>,
    /// `disabled` (a prompt too long is an error, never cut).
    #[serde(default)]
    #[schema(pattern = "^disabled$")]
    pub truncation: Option<String>,
    /// `auto` or `default`: there is one tier of service here.
    #[serde(default)]
    #[schema(pattern = "^(auto|default)$")]
    pub service_tier: Option<String>,
    /// Extra output to include: `reasoning.encrypted_content` (each reasoning item's thought, opaque).
    #[serde(default)]
    pub include: Option<Vec<String>>,
    /// Anything else: refused by name.
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: serde_json::Map<String, Value>,
}

/// What the answer echoes of its request.
#[derive(Debug, Clone, Default)]
pub struct Echo {
    /// `model` as asked.
    pub model: String,
    /// `instructions`.
    pub instructions: Option<String>,
    /// `metadata`.
    pub metadata: Value,
    /// `tools` as sent.
    pub tools: Vec<Value>,
    /// `tool_choice` as sent.
    pub tool_choice: Value,
    /// `parallel_tool_calls`.
    pub parallel_tool_calls: bool,
    /// `temperature`, `top_p`, `max_output_tokens`.
    pub temperature: Option<f32>,
    /// `top_p`.
    pub top_p: Option<f32>,
    /// `max_output_tokens`.
    pub max_output_tokens: Option<u32>,
    /// `text` as sent.
    pub text: Value,
    /// `reasoning` as honoured: `{effort, summary}`.
    pub reasoning: Value,
    /// `reasoning.summary` asked for one: each reasoning item also carries the thought as its summary.
    pub summary: bool,
    /// `include: ["reasoning.encrypted_content"]`: each reasoning item carries its thought as that opaque
    /// field (base64, not encrypted: the thought is the client's to read anyway).
    pub encrypted_content: bool,
}

/// The parts of message content: a string, or `input_text` / `output_text` parts and `input_image` parts
/// (OpenAI's `image_url` parts, checked as any: size, SSRF, a model that cannot see).
fn parts(content: &Value, param: &str) -> Result<Vec<ContentPart>, RouterError> {
    let text = |text: String| ContentPart::Text { text };
    match content {
        Value::String(s) => Ok(vec![text(s.clone())]),
        Value::Array(ps) => ps
            .iter()
            .enumerate()
            .map(|(k, p)| {
                let pp = format!("{param}[{k}]");
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => Ok(text(
                        p.get("text")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    )),
                    Some("refusal") => Ok(text(
                        p.get("refusal")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    )),
                    Some("input_image") => input_image(p, &pp),
                    other => Err(RouterError::invalid(
                        format!("content part type {other:?} is not supported"),
                        &format!("{pp}.type"),
                    )),
                }
            })
            .collect(),
        _ => Err(RouterError::invalid(
            "content must be a string or parts",
            param,
        )),
    }
}

/// An `input_image` part as OpenAI's `image_url` part: `image_url` (an http(s) or data URL) and an
/// optional `detail`; a `file_id` is refused, since this gateway keeps no files.
fn input_image(p: &Value, param: &str) -> Result<ContentPart, RouterError> {
    if p.get("file_id").is_some_and(|f| !f.is_null()) {
        return Err(RouterError::invalid(
            "file_id is not supported (this gateway keeps no files): send the image as image_url, an \
             http(s) or data: URL",
            &format!("{param}.file_id"),
        ));
    }
    let url = p.get("image_url").and_then(Value::as_str).ok_or_else(|| {
        RouterError::invalid(
            "an input_image needs image_url",
            &format!("{param}.image_url"),
        )
    })?;
    let detail = match p.get("detail") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => {
            return Err(RouterError::invalid(
                "detail must be a string",
                &format!("{param}.detail"),
            ));
        }
    };
    Ok(ContentPart::ImageUrl {
        image_url: ImageUrl {
            url: url.to_string(),
            detail,
        },
    })
}

/// The text of `parts` (of a message that takes text only: an instruction, an answer, a tool's output);
/// an image among them is a 400 naming it, not silently left out.
fn text_of(parts: &[ContentPart], param: &str) -> Result<String, RouterError> {
    let mut out = String::new();
    for (k, part) in parts.iter().enumerate() {
        match part {
            ContentPart::Text { text } => out.push_str(text),
            _ => {
                return Err(RouterError::invalid(
                    "only user messages may hold images",
                    &format!("{param}[{k}]"),
                ));
            }
        }
    }
    Ok(out)
}

impl ResponsesRequest {
    /// Checks the request and turns it into the router's request, with what the answer echoes. Errors
    /// name the field.
    pub fn to_chat(self, limits: &Limits) -> Result<(ChatRequest, Echo), RouterError> {
        if let Some(k) = self.other.keys().next() {
            return Err(RouterError::invalid(
                format!("{k} is not supported by this gateway (it keeps no state)"),
                k.as_str(),
            ));
        }
        if self.store == Some(true) {
            return Err(RouterError::invalid(
                "this gateway stores no responses: send store: false",
                "store",
            ));
        }
        if let Some(t) = self.truncation.as_deref()
            && t != "disabled"
        {
            return Err(RouterError::invalid(
                "truncation must be disabled: a prompt too long is an error here, never cut",
                "truncation",
            ));
        }
        if let Some(t) = self.service_tier.as_deref()
            && t != "auto"
            && t != "default"
        {
            return Err(RouterError::invalid(
                format!("service_tier {t:?} is not available (auto or default)"),
                "service_tier",
            ));
        }
        // `reasoning.encrypted_content` is what a stateless client (Codex, with `store: false`) asks for to
        // pass a turn's reasoning back with the next one: each reasoning item carries its thought as that
        // opaque field, and reading it back is dropping it, as Gemma's template drops earlier thoughts.
        let mut encrypted = false;
        for (i, what) in self.include.iter().flatten().enumerate() {
            if what == "reasoning.encrypted_content" {
                encrypted = true;
            } else {
                return Err(RouterError::invalid(
                    format!("include {what:?}: only reasoning.encrypted_content is available"),
                    &format!("include[{i}]"),
                ));
            }
        }
        let parallel = match self.max_tool_calls {
            None => self.parallel_tool_calls,
            Some(1) => Some(false),
            Some(_) => {
                return Err(RouterError::invalid(
                    "max_tool_calls: only 1 can be enforced here",
                    "max_tool_calls",
                ));
            }
        };
        let mut messages: Vec<Message> = vec![];
        if let Some(i) = &self.instructions {
            messages.push(Message::system(i.clone()));
        }
        match &self.input {
            Value::String(s) => messages.push(Message::user(s.clone())),
            Value::Array(items) => {
                // A reasoning item's thought, for the assistant turn that follows it.
                let mut thought: Option<String> = None;
                for (i, item) in items.iter().enumerate() {
                    let p = format!("input[{i}]");
                    let before = messages.len();
                    let ty = item
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("message");
                    match ty {
                        "message" => {
                            let role = item.get("role").and_then(Value::as_str).unwrap_or("");
                            if !["user", "system", "developer", "assistant"].contains(&role) {
                                return Err(RouterError::invalid(
                                    format!(
                                        "role must be user, system, developer or assistant, got {role:?}"
                                    ),
                                    &format!("{p}.role"),
                                ));
                            }
                            let content = item.get("content").ok_or_else(|| {
                                RouterError::invalid("content is required", &format!("{p}.content"))
                            })?;
                            let ps = parts(content, &format!("{p}.content"))?;
                            let text =
                                || text_of(&ps, &format!("{p}.content")).map(MessageContent::Text);
                            messages.push(match role {
                                "user" => Message::User(UserMessage {
                                    content: MessageContent::Parts(ps),
                                    name: None,
                                }),
                                "assistant" => Message::Assistant(AssistantMessage {
                                    content: Some(text()?),
                                    ..Default::default()
                                }),
                                r => {
                                    let m = InstructionMessage {
                                        content: text()?,
                                        name: None,
                                    };
                                    if r == "system" {
                                        Message::System(m)
                                    } else {
                                        Message::Developer(m)
                                    }
                                }
                            });
                        }
                        "function_call" => {
                            let name =
                                item.get("name").and_then(Value::as_str).ok_or_else(|| {
                                    RouterError::invalid(
                                        "a function_call needs a name",
                                        &format!("{p}.name"),
                                    )
                                })?;
                            // OpenAI's arguments are a JSON string; another value is refused, not
                            // replaced by an empty call.
                            let arguments = match item.get("arguments") {
                                None | Some(Value::Null) => "{}",
                                Some(Value::String(a)) => a.as_str(),
                                Some(_) => {
                                    return Err(RouterError::invalid(
                                        "arguments must be a string of JSON",
                                        &format!("{p}.arguments"),
                                    ));
                                }
                            };
                            if serde_json::from_str::<Value>(arguments).is_err() {
                                return Err(RouterError::invalid(
                                    "arguments are not JSON",
                                    &format!("{p}.arguments"),
                                ));
                            }
                            let call = ToolCall {
                                id: item
                                    .get("call_id")
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_string(),
                                kind: FunctionType::Function,
                                function: FunctionCall {
                                    name: name.to_string(),
                                    arguments: arguments.to_string(),
                                },
                            };
                            // Consecutive calls are one assistant turn.
                            match messages.last_mut() {
                                Some(Message::Assistant(AssistantMessage {
                                    tool_calls: Some(calls),
                                    ..
                                })) => calls.push(call),
                                _ => messages.push(Message::assistant(None, vec![call])),
                            }
                        }
                        "function_call_output" => {
                            let id =
                                item.get("call_id").and_then(Value::as_str).ok_or_else(|| {
                                    RouterError::invalid(
                                        "call_id is required",
                                        &format!("{p}.call_id"),
                                    )
                                })?;
                            let output = match item.get("output") {
                                Some(Value::String(s)) => s.clone(),
                                Some(v @ Value::Array(_)) => text_of(
                                    &parts(v, &format!("{p}.output"))?,
                                    &format!("{p}.output"),
                                )?,
                                None | Some(Value::Null) => String::new(),
                                Some(_) => {
                                    return Err(RouterError::invalid(
                                        "output must be a string or a list of content parts",
                                        &format!("{p}.output"),
                                    ));
                                }
                            };
                            messages.push(Message::tool(id, output));
                        }
                        // The thought of the assistant turn that follows: the template shows it while
                        // that turn is under way (a tool loop) and drops it from earlier turns.
                        "reasoning" => {
                            if let Some(t) = reasoning_text(item) {
                                let all = thought.get_or_insert_with(String::new);
                                if !all.is_empty() {
                                    all.push('\n');
                                }
                                all.push_str(&t);
                            }
                        }
                        other => {
                            return Err(RouterError::invalid(
                                format!("input item type {other:?} is not supported"),
                                &format!("{p}.type"),
                            ));
                        }
                    }
                    // The first assistant turn after a reasoning item takes its thought; any other
                    // message in between (a user's) ends that turn, and the thought with it.
                    if messages.len() > before {
                        let t = thought.take();
                        if let (Some(Message::Assistant(a)), Some(t)) = (messages.last_mut(), t) {
                            a.reasoning_content = Some(t);
                        }
                    }
                }
            }
            _ => {
                return Err(RouterError::invalid(
                    "input must be a string or a list of items",
                    "input",
                ));
            }
        }
        let tools = self
            .tools
            .as_ref()
            .map(|ts| {
                ts.iter()
                    .enumerate()
                    .map(|(i, t)| {
                        if t.get("type").and_then(Value::as_str) != Some("function") {
                            return Err(RouterError::invalid(
                                "only function tools are supported",
                                &format!("tools[{i}].type"),
                            ));
                        }
                        let name = t.get("name").and_then(Value::as_str).ok_or_else(|| {
                            RouterError::invalid(
                                "a function tool needs a name",
                                &format!("tools[{i}].name"),
                            )
                        })?;
                        // The Responses API's functions are strict unless they say otherwise (OpenAI:
                        // "Default true").
                        let strict = match t.get("strict") {
                            None | Some(Value::Null) => true,
                            Some(Value::Bool(b)) => *b,
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
                            t.get("parameters")
                                .cloned()
                                .unwrap_or_else(|| json!({"type": "object"})),
                        )
                        .with_strict(Some(strict)))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let tool_choice = match &self.tool_choice {
            Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("function") => {
                let name = o.get("name").and_then(Value::as_str).ok_or_else(|| {
                    RouterError::invalid("tool_choice.name is required", "tool_choice.name")
                })?;
                Some(ToolChoice::Function(name.to_string()))
            }
            None => None,
            Some(other) => Some(
                serde_json::from_value(other.clone())
                    .map_err(|e| RouterError::invalid(e.to_string(), "tool_choice"))?,
            ),
        };
        let response_format = match self.text.as_ref().and_then(|t| t.get("format")) {
            None | Some(Value::Null) => None,
            Some(f) => match f.get("type").and_then(Value::as_str) {
                Some("text") => None,
                Some("json_object") => Some(ResponseFormat::JsonObject),
                // The same fields as chat's `json_schema` (`name`, `description`, `schema`, `strict`),
                // flattened beside `type`; any other is a 400 naming it.
                Some("json_schema") => {
                    let mut fields = f.as_object().cloned().unwrap_or_default();
                    fields.remove("type");
                    // A null is the field left out (SDKs send `name: null`), as elsewhere.
                    fields.retain(|_, v| !v.is_null());
                    fields
                        .entry("name")
                        .or_insert_with(|| Value::String("output".into()));
                    fields.entry("schema").or_insert_with(|| json!({}));
                    fields.entry("strict").or_insert(Value::Bool(false));
                    let json_schema = serde_json::from_value::<crate::api::JsonSchemaFormat>(
                        Value::Object(fields),
                    )
                    .map_err(|e| {
                        RouterError::invalid(format!("text.format: {e}"), "text.format")
                    })?;
                    Some(ResponseFormat::JsonSchema { json_schema })
                }
                other => {
                    return Err(RouterError::invalid(
                        format!(
                            "text.format.type must be text, json_object or json_schema, got {other:?}"
                        ),
                        "text.format.type",
                    ));
                }
            },
        };
        if let Some(v) = self
            .text
            .as_ref()
            .and_then(|t| t.get("verbosity"))
            .filter(|v| !v.is_null() && v.as_str() != Some("medium"))
        {
            return Err(RouterError::invalid(
                format!("text.verbosity {v} cannot be honoured (medium)"),
                "text.verbosity",
            ));
        }
        let reasoning = Reasoning::read(self.reasoning.as_ref())?;
        let enable_thinking = match reasoning.effort.as_deref() {
            None => None,
            Some(e) => Some(crate::api::request::thinking_for_effort(
                e,
                "reasoning.effort",
            )?),
        };
        let echo = Echo {
            model: self.model.clone().unwrap_or_else(|| "auto".into()),
            instructions: self.instructions.clone(),
            metadata: self.metadata.clone().unwrap_or_else(|| json!({})),
            tools: self.tools.clone().unwrap_or_default(),
            tool_choice: self.tool_choice.clone().unwrap_or_else(|| json!("auto")),
            parallel_tool_calls: parallel.unwrap_or(true),
            temperature: self.temperature,
            top_p: self.top_p,
            max_output_tokens: self.max_output_tokens,
            text: self
                .text
                .clone()
                .unwrap_or_else(|| json!({"format": {"type": "text"}})),
            reasoning: json!({"effort": reasoning.effort, "summary": reasoning.summary}),
            summary: reasoning.summary.is_some(),
            encrypted_content: encrypted,
        };
        let _ = (self.user, self.safety_identifier, self.prompt_cache_key);
        // Its one option is chunk padding, which nothing here does.
        match &self.stream_options {
            None | Some(Value::Null) => {}
            Some(Value::Object(o))
                if o.iter().all(|(k, v)| {
                    k == "include_obfuscation" && matches!(v, Value::Bool(false) | Value::Null)
                }) => {}
            Some(_) => {
                return Err(RouterError::invalid(
                    "stream_options: only include_obfuscation: false can be honoured (chunks are not \
                     padded)",
                    "stream_options",
                ));
            }
        }
        let chat = ChatCompletionRequest {
            model: self.model,
            messages,
            max_tokens: self.max_output_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            tools,
            tool_choice,
            parallel_tool_calls: parallel,
            response_format,
            stream: self.stream,
            stream_options: self.stream.then_some(StreamOptions {
                include_usage: true,
                include_obfuscation: None,
            }),
            enable_thinking,
            ..Default::default()
        };
        let mut chat = chat.validate(limits)?;
        // The effort as given, for an upstream that speaks only OpenAI's API (`crate::dialect`).
        chat.reasoning_effort = reasoning.effort.clone();
        Ok((chat, echo))
    }
}

/// The `reasoning` object, read field by field: what cannot be honoured is refused by name.
#[derive(Debug, Default)]
struct Reasoning {
    effort: Option<String>,
    /// `auto` or `detailed`: the thought itself is the summary.
    summary: Option<String>,
}

impl Reasoning {
    fn read(v: Option<&Value>) -> Result<Self, RouterError> {
        let mut out = Self::default();
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(out);
        };
        let Some(fields) = v.as_object() else {
            return Err(RouterError::invalid(
                "reasoning must be an object",
                "reasoning",
            ));
        };
        let text = |key: &str, v: &Value| -> Result<Option<String>, RouterError> {
            match v {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s.clone())),
                _ => Err(RouterError::invalid(
                    format!("reasoning.{key} must be a string"),
                    &format!("reasoning.{key}"),
                )),
            }
        };
        for (key, v) in fields {
            let param = format!("reasoning.{key}");
            if !matches!(
                key.as_str(),
                "effort" | "summary" | "generate_summary" | "context" | "mode"
            ) {
                return Err(RouterError::invalid(
                    format!("{param} cannot be honoured by this gateway"),
                    &param,
                ));
            }
            let value = text(key, v)?;
            match (key.as_str(), value.as_deref()) {
                (_, None) => {}
                ("effort", Some(_)) => out.effort = value,
                // Gemma writes no summary of its thought: the thought itself is the most detailed one,
                // and `auto` leaves the choice to the server. A concise one cannot be promised (OpenAI
                // refuses it for models that cannot give one too). `none`: older clients' "no summary".
                ("summary" | "generate_summary", Some("auto" | "detailed")) => out.summary = value,
                ("summary" | "generate_summary", Some("none")) => out.summary = None,
                ("summary" | "generate_summary", Some("concise")) => {
                    return Err(RouterError::invalid(
                        format!(
                            "{param} \"concise\" cannot be honoured: Gemma writes no summary, so the \
                             summary is the thought itself (\"auto\" or \"detailed\")"
                        ),
                        &param,
                    ));
                }
                ("summary" | "generate_summary", Some(_)) => {
                    return Err(RouterError::invalid(
                        format!("{param} must be auto, concise or detailed"),
                        &param,
                    ));
                }
                // Earlier thoughts are never shown to the model again (Gemma's template drops them).
                ("context", Some("auto" | "current_turn")) | ("mode", Some("standard")) => {}
                ("context", Some(c)) => {
                    return Err(RouterError::invalid(
                        format!(
                            "{param} {c:?} cannot be honoured: earlier turns' reasoning is not shown to \
                             Gemma (its template drops it); use \"current_turn\""
                        ),
                        &param,
                    ));
                }
                (_, Some(m)) => {
                    return Err(RouterError::invalid(
                        format!("{param} {m:?} cannot be honoured (standard)"),
                        &param,
                    ));
                }
            }
        }
        Ok(out)
    }
}

/// A reasoning item's thought: its `reasoning_text` content, else its `encrypted_content` as this gateway
/// writes it (the thought, base64), else its summary's text (none: a thought from elsewhere, sealed).
fn reasoning_text(item: &Value) -> Option<String> {
    use base64::Engine as _;
    let texts = |key: &str, ty: &str| -> Option<String> {
        let t: String = (item.get(key)?.as_array()?.iter())
            .filter(|p| p.get("type").and_then(Value::as_str) == Some(ty))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect();
        (!t.is_empty()).then_some(t)
    };
    texts("content", "reasoning_text")
        .or_else(|| {
            let blob = item.get("encrypted_content")?.as_str()?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(blob)
                .ok()?;
            String::from_utf8(bytes).ok().filter(|t| !t.is_empty())
        })
        .or_else(|| texts("summary", "summary_text"))
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

fn now() -> u64 {
    crate::api::unix_now_secs()
}

/// The Responses `usage` from the router's. Every prompt token read afresh is kept in the prefix cache,
/// so those are the cache writes. The thinking tokens are the tier's count
/// (`completion_tokens_details.reasoning_tokens`); for an upstream that does not say, `reasoning`, the
/// thinking pieces streamed: one per generated token, except where a piece carries several (a character
/// split across tokens), so at most the thinking tokens.
pub fn usage(u: &Usage, reasoning: u64) -> Value {
    let cached = u.prompt_tokens_details.map_or(0, |d| d.cached_tokens);
    let reasoning = u
        .completion_tokens_details
        .map_or(reasoning, |d| d.reasoning_tokens);
    json!({"input_tokens": u.prompt_tokens,
           "input_tokens_details": {"cached_tokens": cached,
                                    "cache_write_tokens": u.prompt_tokens.saturating_sub(cached)},
           "output_tokens": u.completion_tokens,
           "output_tokens_details": {"reasoning_tokens": reasoning.min(u.completion_tokens)},
           "total_tokens": u.prompt_tokens + u.completion_tokens})
}

/// The `response` object around `output`; `end` is None while it is in progress.
fn response(
    id: &str,
    created: u64,
    echo: &Echo,
    output: Vec<Value>,
    end: Option<(FinishReason, &Usage, u64)>,
) -> Value {
    let (status, incomplete, usage_) = match end {
        None => ("in_progress", Value::Null, Value::Null),
        Some((FinishReason::Length, u, r)) => (
            "incomplete",
            json!({"reason": "max_output_tokens"}),
            usage(u, r),
        ),
        Some((_, u, r)) => ("completed", Value::Null, usage(u, r)),
    };
    json!({"id": id, "object": "response", "created_at": created, "status": status,
           "completed_at": if end.is_some() { json!(now()) } else { Value::Null },
           "error": null, "incomplete_details": incomplete, "instructions": echo.instructions,
           "max_output_tokens": echo.max_output_tokens, "model": echo.model, "output": output,
           "parallel_tool_calls": echo.parallel_tool_calls, "previous_response_id": null,
           "reasoning": if echo.reasoning.is_null() { json!({"effort": null, "summary": null}) }
                        else { echo.reasoning.clone() },
           "store": false,
           "temperature": echo.temperature, "text": echo.text, "tool_choice": echo.tool_choice,
           "tools": echo.tools, "top_p": echo.top_p, "truncation": "disabled", "usage": usage_,
           "metadata": echo.metadata})
}

/// The output items of an answer, as they are built: an optional reasoning item, a message, function calls.
#[derive(Debug, Default)]
struct Items {
    /// Thinking pieces streamed (see [`usage`]).
    reasoning_pieces: u64,
    reasoning: Option<(String, String)>,
    message: Option<(String, String)>,
    calls: Vec<Value>,
}

impl Items {
    /// The items; `cut`: `max_output_tokens` ended the answer, so the text item written last (the message,
    /// else the thought, when no call follows) is `incomplete`.
    fn done(&self, echo: &Echo, cut: bool) -> Vec<Value> {
        let cut = cut && self.calls.is_empty();
        let status = |last: bool| {
            if cut && last {
                "incomplete"
            } else {
                "completed"
            }
        };
        let mut out = vec![];
        if let Some((id, text)) = &self.reasoning {
            out.push(reasoning_item(
                id,
                text,
                status(self.message.is_none()),
                echo,
            ));
        }
        if let Some((id, text)) = &self.message {
            out.push(message_item(id, text, status(true)));
        }
        out.extend(self.calls.iter().cloned());
        out
    }
}

/// A reasoning item: the thought as its `content`, as its one summary part when one was asked for, and
/// as its `encrypted_content` (base64) when that was.
fn reasoning_item(id: &str, text: &str, status: &str, echo: &Echo) -> Value {
    use base64::Engine as _;
    let mut item = json!({"type": "reasoning", "id": id, "status": status,
           "summary": if echo.summary { json!([summary_text(text)]) } else { json!([]) },
           "content": [{"type": "reasoning_text", "text": text}]});
    if echo.encrypted_content {
        item["encrypted_content"] = json!(base64::engine::general_purpose::STANDARD.encode(text));
    }
    item
}

fn summary_text(text: &str) -> Value {
    json!({"type": "summary_text", "text": text})
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
           "content": if status == "in_progress" && text.is_empty() { json!([]) }
                      else { json!([output_text(text)]) }})
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn call_item(name: &str, arguments: &str) -> Value {
    json!({"type": "function_call", "id": new_id("fc"), "call_id": new_id("call"), "name": name,
           "arguments": arguments, "status": "completed"})
}

/// Assembles the whole `response` (the non-streaming answer) from the router's output.
#[derive(Debug, Default)]
pub struct ResponseBuilder {
    items: Items,
}

impl ResponseBuilder {
    /// Takes one piece of the answer.
    pub fn push(&mut self, c: Chunk) {
        match c {
            Chunk::Content(t) => {
                self.items
                    .message
                    .get_or_insert_with(|| (new_id("msg"), String::new()))
                    .1
                    .push_str(&t);
            }
            Chunk::Reasoning(r) => {
                self.items.reasoning_pieces += 1;
                self.items
                    .reasoning
                    .get_or_insert_with(|| (new_id("rs"), String::new()))
                    .1
                    .push_str(&r);
            }
            Chunk::ToolCall { name, arguments } => {
                self.items.calls.push(call_item(&name, &arguments));
            }
            _ => {}
        }
    }

    /// The response, once the router's `End` arrived.
    pub fn finish(self, echo: &Echo, finish: FinishReason, usage_: &Usage) -> Value {
        response(
            &new_id("resp"),
            now(),
            echo,
            self.items.done(echo, finish == FinishReason::Length),
            Some((finish, usage_, self.items.reasoning_pieces)),
        )
    }
}

/// Turns the router's output into Responses stream events (each `{"type": …, "sequence_number": n, …}`),
/// one output item at a time: reasoning, message text and function calls, each added when its first piece
/// arrives and done when another starts or the answer ends.
#[derive(Debug)]
pub struct EventStream {
    id: String,
    created: u64,
    echo: Echo,
    seq: u64,
    started: bool,
    /// The open item: (output index, kind "reasoning" | "message", id, text so far).
    open: Option<(usize, &'static str, String, String)>,
    done: Vec<Value>,
    reasoning_pieces: u64,
}

impl EventStream {
    /// A stream for a response echoing `echo`.
    pub fn new(echo: Echo) -> Self {
        Self {
            id: new_id("resp"),
            created: now(),
            echo,
            seq: 0,
            started: false,
            open: None,
            done: vec![],
            reasoning_pieces: 0,
        }
    }

    fn ev(&mut self, mut v: Value, out: &mut Vec<Value>) {
        v["sequence_number"] = json!(self.seq);
        self.seq += 1;
        out.push(v);
    }

    fn start(&mut self, out: &mut Vec<Value>) {
        if !self.started {
            self.started = true;
            let r = response(&self.id, self.created, &self.echo, vec![], None);
            self.ev(
                json!({"type": "response.created", "response": r.clone()}),
                out,
            );
            self.ev(json!({"type": "response.in_progress", "response": r}), out);
        }
    }

    /// Closes the open item; `cut`: `max_output_tokens` ended it (status `incomplete`).
    fn close(&mut self, out: &mut Vec<Value>, cut: bool) {
        let Some((index, kind, id, text)) = self.open.take() else {
            return;
        };
        let status = if cut { "incomplete" } else { "completed" };
        let item = if kind == "reasoning" {
            self.ev(
                json!({"type": "response.reasoning_text.done", "item_id": id, "output_index": index,
                "content_index": 0, "text": text}),
                out,
            );
            if self.echo.summary {
                self.ev(
                    json!({"type": "response.reasoning_summary_text.done", "item_id": id,
                    "output_index": index, "summary_index": 0, "text": text}),
                    out,
                );
                let mut done = json!({"type": "response.reasoning_summary_part.done", "item_id": id,
                    "output_index": index, "summary_index": 0, "part": summary_text(&text)});
                if cut {
                    done["status"] = json!("incomplete");
                }
                self.ev(done, out);
            }
            reasoning_item(&id, &text, status, &self.echo)
        } else {
            self.ev(
                json!({"type": "response.output_text.done", "item_id": id, "output_index": index,
                "content_index": 0, "text": text, "logprobs": []}),
                out,
            );
            self.ev(
                json!({"type": "response.content_part.done", "item_id": id, "output_index": index,
                "content_index": 0, "part": output_text(&text)}),
                out,
            );
            message_item(&id, &text, status)
        };
        self.ev(json!({"type": "response.output_item.done", "output_index": index, "item": item.clone()}), out);
        self.done.push(item);
    }

    fn delta(&mut self, kind: &'static str, text: String, out: &mut Vec<Value>) {
        if self.open.as_ref().map(|o| o.1) != Some(kind) {
            self.close(out, false);
            let index = self.done.len();
            let id = new_id(if kind == "reasoning" { "rs" } else { "msg" });
            let item = if kind == "reasoning" {
                json!({"type": "reasoning", "id": id, "summary": [], "status": "in_progress", "content": []})
            } else {
                message_item(&id, "", "in_progress")
            };
            self.ev(
                json!({"type": "response.output_item.added", "output_index": index, "item": item}),
                out,
            );
            if kind == "message" {
                self.ev(json!({"type": "response.content_part.added", "item_id": id, "output_index": index,
                    "content_index": 0, "part": output_text("")}), out);
            } else if self.echo.summary {
                self.ev(
                    json!({"type": "response.reasoning_summary_part.added", "item_id": id,
                    "output_index": index, "summary_index": 0, "part": summary_text("")}),
                    out,
                );
            }
            self.open = Some((index, kind, id, String::new()));
        }
        #[expect(
            clippy::expect_used,
            reason = "the item was opened just above when none was"
        )]
        let (index, _, id, acc) = self.open.as_mut().expect("opened above");
        acc.push_str(&text);
        let (index, id) = (*index, id.clone());
        let ty = if kind == "reasoning" {
            "response.reasoning_text.delta"
        } else {
            "response.output_text.delta"
        };
        let mut d = json!({"type": ty, "item_id": id, "output_index": index, "content_index": 0,
            "delta": text});
        if kind == "message" {
            d["logprobs"] = json!([]);
        }
        self.ev(d, out);
        if kind == "reasoning" && self.echo.summary {
            self.ev(
                json!({"type": "response.reasoning_summary_text.delta", "item_id": id,
                "output_index": index, "summary_index": 0, "delta": text}),
                out,
            );
        }
    }

    /// The events for one router output; `done` is true once the stream is complete.
    pub fn on(&mut self, o: Output) -> (Vec<Value>, bool) {
        let mut out = vec![];
        match o {
            Output::Waiting => self.start(&mut out),
            Output::Chunk(Chunk::Content(t)) if !t.is_empty() => {
                self.start(&mut out);
                self.delta("message", t, &mut out);
            }
            Output::Chunk(Chunk::Reasoning(r)) if !r.is_empty() => {
                self.start(&mut out);
                self.reasoning_pieces += 1;
                self.delta("reasoning", r, &mut out);
            }
            Output::Chunk(Chunk::ToolCall { name, arguments }) => {
                self.start(&mut out);
                self.close(&mut out, false);
                let index = self.done.len();
                let item = call_item(&name, &arguments);
                let id = item["id"].clone();
                let mut added = item.clone();
                added["arguments"] = json!("");
                added["status"] = json!("in_progress");
                self.ev(json!({"type": "response.output_item.added", "output_index": index, "item": added}), &mut out);
                self.ev(
                    json!({"type": "response.function_call_arguments.delta", "item_id": id,
                    "output_index": index, "delta": arguments}),
                    &mut out,
                );
                self.ev(
                    json!({"type": "response.function_call_arguments.done", "item_id": id,
                    "output_index": index, "name": name, "arguments": arguments}),
                    &mut out,
                );
                self.ev(json!({"type": "response.output_item.done", "output_index": index, "item": item.clone()}), &mut out);
                self.done.push(item);
            }
            Output::Chunk(_) => {}
            Output::End {
                finish_reason,
                usage: u,
                ..
            } => {
                self.start(&mut out);
                self.close(&mut out, finish_reason == FinishReason::Length);
                let r = response(
                    &self.id,
                    self.created,
                    &self.echo,
                    self.done.clone(),
                    Some((finish_reason, &u, self.reasoning_pieces)),
                );
                let ty = if r["status"] == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                self.ev(json!({"type": ty, "response": r}), &mut out);
                return (out, true);
            }
            Output::Error(e) => {
                self.start(&mut out);
                let (code, param) = match &e {
                    RouterError::InvalidRequest { param, .. } => ("invalid_request", param.clone()),
                    _ => ("server_error", None),
                };
                self.ev(json!({"type": "error", "code": code, "message": e.to_string(), "param": param}), &mut out);
                let mut r = response(&self.id, self.created, &self.echo, self.done.clone(), None);
                r["status"] = json!("failed");
                r["error"] = json!({"code": code, "message": e.to_string()});
                self.ev(json!({"type": "response.failed", "response": r}), &mut out);
                return (out, true);
            }
        }
        (out, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> Result<ChatRequest, RouterError> {
        serde_json::from_value::<ResponsesRequest>(v)
            .unwrap()
            .to_chat(&Limits::default())
            .map(|(c, _)| c)
    }

    /// `text.format`'s `description` is shown to the model as chat's is; a field it does not have is a
    /// 400 naming the format (a misspelt `schema` would drop the constraint).
    #[test]
    fn a_json_schema_formats_fields_are_read_or_refused() {
        let r = req(
            json!({"input": "hi", "text": {"format": {"type": "json_schema", "name": "city",
            "description": "A city.", "schema": {"type": "object"}, "strict": true}}}),
        )
        .unwrap();
        assert_eq!(
            r.response_format.instruction().as_deref(),
            Some("Answer in the JSON format \"city\": A city.")
        );
        let r = req(
            json!({"input": "hi", "text": {"format": {"type": "json_schema", "name": null,
            "description": null, "schema": {"type": "object"}, "strict": null}}}),
        );
        assert!(r.unwrap().response_format.is_json());
        let e = req(
            json!({"input": "hi", "text": {"format": {"type": "json_schema", "name": "city",
            "schmea": {"type": "object"}}}}),
        )
        .unwrap_err();
        match e {
            RouterError::InvalidRequest { param, message } => {
                assert_eq!(param.as_deref(), Some("text.format"));
                assert!(message.contains("schmea"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_function_round_trip_becomes_chat_messages() {
        let r = req(json!({"model": "fast", "instructions": "Be brief.", "input": [
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "21 C"},
            {"role": "user", "content": [{"type": "input_text", "text": "And tomorrow?"}]}],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"}, "max_tool_calls": 1,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
            "reasoning": {"effort": "low"}, "store": false}))
        .unwrap();
        let roles: Vec<&str> = r.messages.iter().map(|m| m.role()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
        assert_eq!(
            r.tool_choice,
            Some(crate::api::ToolChoice::Function("get_weather".into()))
        );
        assert_eq!(r.parallel_tool_calls, Some(false));
        assert!(r.response_format.is_json());
        assert_eq!(r.enable_thinking, Some(false));
        // Kept as given, for an upstream that reads only OpenAI's fields.
        assert_eq!(r.reasoning_effort.as_deref(), Some("low"));
        // A function is strict unless it says otherwise, as OpenAI's Responses API has it: the engines
        // enforce any call to it. A flag that is not a boolean is refused by name.
        assert_eq!(r.tools.as_ref().unwrap()[0].function.strict, Some(true));
        let with = |strict: Value| {
            req(
                json!({"model": "fast", "input": "x", "tools": [{"type": "function",
                "name": "f", "parameters": {"type": "object"}, "strict": strict}]}),
            )
        };
        assert_eq!(
            with(json!(false)).unwrap().tools.unwrap()[0]
                .function
                .strict,
            Some(false)
        );
        assert_eq!(
            with(Value::Null).unwrap().tools.unwrap()[0].function.strict,
            Some(true)
        );
        match with(json!("yes")) {
            Err(RouterError::InvalidRequest { param, .. }) => {
                assert_eq!(param.as_deref(), Some("tools[0].strict"))
            }
            other => panic!("{other:?}"),
        }
    }

    /// A reasoning item passed back is the thought of the assistant turn after it, read from its text, or
    /// from the `encrypted_content` this gateway gave, or from its summary; before a user's message it
    /// belongs to no turn.
    #[test]
    fn a_reasoning_item_passed_back_is_the_next_turns_thought() {
        use base64::Engine as _;
        let blob = base64::engine::general_purpose::STANDARD.encode("Look it up.");
        for (reasoning, want) in [
            (
                json!({"type": "reasoning", "content": [{"type": "reasoning_text", "text": "Look it up."}],
                    "summary": []}),
                "Look it up.",
            ),
            (
                json!({"type": "reasoning", "summary": [], "encrypted_content": blob}),
                "Look it up.",
            ),
            (
                json!({"type": "reasoning", "summary": [{"type": "summary_text", "text": "Lookup."}],
                    "encrypted_content": "sealed elsewhere"}),
                "Lookup.",
            ),
        ] {
            let r = req(json!({"model": "fast", "input": [
                {"role": "user", "content": "Weather in Paris?"},
                reasoning,
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "21 C"}],
                "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]}))
            .unwrap();
            let turn = r.messages[1].to_value();
            assert_eq!(turn["reasoning_content"], want, "{turn}");
            assert_eq!(turn["tool_calls"][0]["function"]["name"], "get_weather");
        }
        let r = req(json!({"model": "fast", "input": [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Hm."}]},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}]}))
        .unwrap();
        assert!(
            r.messages
                .iter()
                .all(|m| m.to_value().get("reasoning_content").is_none())
        );
    }

    fn to_echo(v: Value) -> Result<Echo, RouterError> {
        serde_json::from_value::<ResponsesRequest>(v)
            .unwrap()
            .to_chat(&Limits::default())
            .map(|(_, e)| e)
    }

    #[test]
    fn the_reasoning_object_is_read_field_by_field() {
        let refused =
            |reasoning: Value| match to_echo(json!({"input": "x", "reasoning": reasoning})) {
                Err(RouterError::InvalidRequest { param, .. }) => param.unwrap(),
                other => panic!("{other:?}"),
            };
        assert_eq!(refused(json!({"summary": "concise"})), "reasoning.summary");
        assert_eq!(refused(json!({"summary": "brief"})), "reasoning.summary");
        assert_eq!(
            refused(json!({"generate_summary": "concise"})),
            "reasoning.generate_summary"
        );
        assert_eq!(
            refused(json!({"context": "all_turns"})),
            "reasoning.context"
        );
        assert_eq!(refused(json!({"mode": "pro"})), "reasoning.mode");
        assert_eq!(refused(json!({"effort": 3})), "reasoning.effort");
        assert_eq!(refused(json!({"budget": "high"})), "reasoning.budget");
        assert_eq!(
            refused(json!({"budget_tokens": 1000})),
            "reasoning.budget_tokens"
        );
        assert_eq!(
            refused(json!({"budget_tokens": null})),
            "reasoning.budget_tokens"
        );
        assert_eq!(refused(json!("high")), "reasoning");
        // What is kept is echoed back as honoured; `max` thinks, as `high` does.
        let e = to_echo(
            json!({"input": "x", "reasoning": {"effort": "max", "summary": "auto",
            "context": "current_turn", "mode": "standard"}}),
        )
        .unwrap();
        assert!(e.summary);
        assert_eq!(e.reasoning, json!({"effort": "max", "summary": "auto"}));
        assert_eq!(
            req(json!({"input": "x", "reasoning": {"effort": "max"}}))
                .unwrap()
                .enable_thinking,
            Some(true)
        );
        for none in [json!(null), json!("none")] {
            let e = to_echo(json!({"input": "x", "reasoning": {"summary": none}})).unwrap();
            assert!(!e.summary);
        }
        // Codex's stateless turns ask for the reasoning's encrypted_content; nothing else can be included.
        let e = to_echo(json!({"input": "x", "include": ["reasoning.encrypted_content"]})).unwrap();
        assert!(e.encrypted_content);
        match to_echo(
            json!({"input": "x", "include": ["reasoning.encrypted_content",
            "message.output_text.logprobs"]}),
        ) {
            Err(RouterError::InvalidRequest { param, .. }) => {
                assert_eq!(param.as_deref(), Some("include[1]"))
            }
            other => panic!("{other:?}"),
        }
    }

    /// Events and the final response for a thought, then an answer, under `echo`, ended by `finish`.
    fn answer_ending(echo: Echo, finish: FinishReason) -> (Vec<Value>, Value) {
        let mut s = EventStream::new(echo.clone());
        let mut events = vec![];
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
            total_tokens: 7,
            ..Default::default()
        };
        let mut whole = ResponseBuilder::default();
        for c in [
            Chunk::Reasoning("Two ".into()),
            Chunk::Reasoning("and two.".into()),
            Chunk::Content("Four".into()),
            Chunk::Content(".".into()),
        ] {
            whole.push(c.clone());
            events.extend(s.on(Output::Chunk(c)).0);
        }
        let end = Output::End {
            finish_reason: finish,
            usage,
            routing: Default::default(),
            stop_sequence: None,
        };
        let (last, done) = s.on(end);
        assert!(done);
        events.extend(last);
        (events, whole.finish(&echo, finish, &usage))
    }

    fn answer(echo: Echo) -> (Vec<Value>, Value) {
        answer_ending(echo, FinishReason::Stop)
    }

    #[test]
    fn a_summary_asked_for_is_the_thought_in_both_shapes() {
        let echo =
            to_echo(json!({"input": "x", "reasoning": {"effort": "high", "summary": "detailed"}}))
                .unwrap();
        let (events, whole) = answer(echo);
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        // OpenAI's order: the part opens after its item, its text streams, closes before its item does.
        let at = |t: &str| {
            types
                .iter()
                .position(|&x| x == t)
                .unwrap_or_else(|| panic!("{t} in {types:?}"))
        };
        assert!(at("response.output_item.added") < at("response.reasoning_summary_part.added"));
        assert!(
            at("response.reasoning_summary_part.added")
                < at("response.reasoning_summary_text.delta")
        );
        assert!(
            at("response.reasoning_summary_text.done") < at("response.reasoning_summary_part.done")
        );
        let item_done = types
            .iter()
            .position(|&x| x == "response.output_item.done")
            .unwrap();
        assert!(at("response.reasoning_summary_part.done") < item_done);
        let deltas: String = events
            .iter()
            .filter(|e| e["type"] == "response.reasoning_summary_text.delta")
            .map(|e| e["delta"].as_str().unwrap())
            .collect();
        assert_eq!(deltas, "Two and two.");
        for e in events.iter().filter(|e| {
            e["type"]
                .as_str()
                .unwrap()
                .starts_with("response.reasoning_summary")
        }) {
            assert_eq!(e["summary_index"], 0, "{e}");
            assert_eq!(e["output_index"], 0, "{e}");
            assert!(e["item_id"].as_str().unwrap().starts_with("rs_"), "{e}");
        }
        let done = &events[at("response.reasoning_summary_part.done")];
        assert_eq!(
            done["part"],
            json!({"type": "summary_text", "text": "Two and two."})
        );
        let completed = &events.last().unwrap()["response"];
        for r in [completed, &whole] {
            let item = &r["output"][0];
            assert_eq!(
                item["summary"],
                json!([{"type": "summary_text", "text": "Two and two."}]),
                "{r}"
            );
            assert_eq!(item["content"][0]["text"], "Two and two.");
            assert_eq!(
                r["reasoning"],
                json!({"effort": "high", "summary": "detailed"})
            );
            assert_eq!(r["output"][1]["content"][0]["text"], "Four.");
        }
        // Without one, no summary events and an empty summary.
        let (events, whole) =
            answer(to_echo(json!({"input": "x", "reasoning": {"effort": "high"}})).unwrap());
        assert!(
            !events
                .iter()
                .any(|e| e["type"].as_str().unwrap().contains("summary"))
        );
        assert_eq!(whole["output"][0]["summary"], json!([]));
        assert_eq!(
            whole["reasoning"],
            json!({"effort": "high", "summary": null})
        );
        assert!(whole["output"][0].get("encrypted_content").is_none());
    }

    #[test]
    fn the_thought_passes_back_opaque_and_a_cut_item_is_incomplete() {
        use base64::Engine as _;
        let echo = to_echo(json!({"input": "x", "reasoning": {"summary": "auto"},
            "include": ["reasoning.encrypted_content"]}))
        .unwrap();
        let (events, whole) = answer_ending(echo.clone(), FinishReason::Length);
        let completed = &events.last().unwrap()["response"];
        assert_eq!(events.last().unwrap()["type"], "response.incomplete");
        for r in [completed, &whole] {
            let blob = r["output"][0]["encrypted_content"].as_str().unwrap();
            let thought = base64::engine::general_purpose::STANDARD
                .decode(blob)
                .unwrap();
            assert_eq!(thought, b"Two and two.");
            // The thought closed before the answer began; the answer is what max_output_tokens cut.
            assert_eq!(r["output"][0]["status"], "completed", "{r}");
            assert_eq!(r["output"][1]["status"], "incomplete", "{r}");
        }
        // A thought cut before any answer: its item and its summary part say so.
        let mut s = EventStream::new(echo);
        let mut events = s.on(Output::Chunk(Chunk::Reasoning("Hmm".into()))).0;
        events.extend(
            s.on(Output::End {
                finish_reason: FinishReason::Length,
                usage: Usage::default(),
                routing: Default::default(),
                stop_sequence: None,
            })
            .0,
        );
        let part = events
            .iter()
            .find(|e| e["type"] == "response.reasoning_summary_part.done")
            .unwrap();
        assert_eq!(part["status"], "incomplete");
        assert_eq!(
            events.last().unwrap()["response"]["output"][0]["status"],
            "incomplete"
        );
    }

    #[test]
    fn state_and_what_cannot_be_honoured_are_refused_by_name() {
        let param = |extra: Value| {
            let mut v = json!({"model": "fast", "input": "hi"});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            match req(v) {
                Err(RouterError::InvalidRequest { param, .. }) => param.unwrap(),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(param(json!({"store": true})), "store");
        // Images: a file_id (no files kept here), and an image where only text goes.
        assert_eq!(
            param(
                json!({"input": [{"role": "user", "content": [{"type": "input_image",
                "file_id": "file-1"}]}]})
            ),
            "input[0].content[0].file_id"
        );
        assert_eq!(
            param(
                json!({"input": [{"role": "system", "content": [{"type": "input_image",
                "image_url": "data:image/png;base64,iVBORw0KGgo="}]}]})
            ),
            "input[0].content[0]"
        );
        assert_eq!(
            param(json!({"previous_response_id": "resp_1"})),
            "previous_response_id"
        );
        assert_eq!(param(json!({"background": true})), "background");
        assert_eq!(param(json!({"max_tool_calls": 3})), "max_tool_calls");
        assert_eq!(param(json!({"truncation": "auto"})), "truncation");
        assert_eq!(
            param(json!({"tools": [{"type": "web_search"}]})),
            "tools[0].type"
        );
        // A call's arguments and its output are refused when malformed, not replaced by empty ones.
        assert_eq!(
            param(
                json!({"input": [{"type": "function_call", "call_id": "c", "name": "f",
                "arguments": {"city": "Paris"}}]})
            ),
            "input[0].arguments"
        );
        assert_eq!(
            param(
                json!({"input": [{"type": "function_call_output", "call_id": "c", "output": 21}]})
            ),
            "input[0].output"
        );
    }
}
