//! OpenAI-compatible request and response types, and request validation.
//!
//! Validation happens here, once, and reports the offending field (`param`) so the HTTP layer can answer
//! with OpenAI's error shape. Unknown fields are accepted and ignored, as OpenAI does.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::RouterError;

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    /// As a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct StreamOptions {
    /// Send a final chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ChatCompletionRequest {
    /// Tier (`fast|primary|heavy`), a model id, or `auto`.
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<Value>,
    /// Deprecated OpenAI name of `max_completion_tokens`.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Upper bound of generated tokens.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k sampling (extension).
    #[serde(default)]
    pub top_k: Option<i32>,
    /// Min-p sampling (extension).
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Sampling seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Presence penalty.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Repetition penalty (extension).
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Token id (as string) → bias.
    #[serde(default)]
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// Return log-probabilities.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// How many alternatives per token.
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    /// Tools the model may call.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// `none`, `auto`, `required` or a specific function.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Whether the model may call several tools in one answer (OpenAI's default: true).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `{"type": "json_object"}` etc.
    #[serde(default)]
    pub response_format: Option<Value>,
    /// End-user id (logged, not used).
    #[serde(default)]
    pub user: Option<String>,
    /// Server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Number of choices (only 1 is supported).
    #[serde(default)]
    pub n: Option<u32>,
    /// Gemma 4 thinking (extension; also accepted as chat_template_kwargs.enable_thinking).
    #[serde(default)]
    pub enable_thinking: Option<bool>,
    /// vLLM-style template arguments (enable_thinking).
    #[serde(default)]
    pub chat_template_kwargs: Option<BTreeMap<String, Value>>,
}

/// A validated, normalised request as backends receive it.
#[derive(Debug, Clone, Serialize)]
pub struct ChatRequest {
    /// What the client asked for in `model` (for echoing back).
    pub requested_model: String,
    /// Messages (content parts kept; tool_call arguments normalised to JSON strings).
    pub messages: Vec<Value>,
    /// Tools.
    pub tools: Option<Vec<Value>>,
    /// Tool choice, checked against `tools` (None: the client did not say, which means `auto`).
    pub tool_choice: Option<ToolChoice>,
    /// Whether several tool calls may come in one answer (None: the client did not say; OpenAI's default
    /// is true).
    pub parallel_tool_calls: Option<bool>,
    /// Effective max tokens (None: the tier's default).
    pub max_tokens: Option<u32>,
    /// Temperature (None: backend default).
    pub temperature: Option<f32>,
    /// top_p.
    pub top_p: Option<f32>,
    /// top_k.
    pub top_k: Option<i32>,
    /// min_p.
    pub min_p: Option<f32>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Seed.
    pub seed: Option<u64>,
    /// Presence penalty.
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// Repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// Token bias.
    pub logit_bias: Vec<(u32, f32)>,
    /// Log-probabilities wanted.
    pub logprobs: bool,
    /// Alternatives per token.
    pub top_logprobs: u32,
    /// What the answer must be (`response_format`).
    pub response_format: ResponseFormat,
    /// Thinking on/off.
    pub enable_thinking: Option<bool>,
    /// Streaming.
    pub stream: bool,
    /// Usage chunk in streams.
    pub include_usage: bool,
    /// Whether any message carries an image part.
    pub has_images: bool,
    /// Text of the conversation for the classifier (system + user turns).
    pub text: String,
    /// Text of the last user turn.
    pub last_user: String,
    /// Rough prompt length in tokens (4 chars/token) for routing before the tokenizer runs.
    pub prompt_tokens_estimate: usize,
    /// `/v1/completions`: a plain prompt, no chat template (messages then hold it as one user turn for
    /// backends that only speak chat).
    pub raw_prompt: Option<String>,
}

impl ChatRequest {
    /// Whether the answer is held to a grammar: JSON (`response_format`) or forced tool calls
    /// (`tool_choice` `required` or a named function).
    pub fn is_constrained(&self) -> bool {
        self.response_format.is_json()
            || matches!(
                self.tool_choice,
                Some(ToolChoice::Required | ToolChoice::Function(_))
            )
    }
}

/// `response_format`, checked.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum ResponseFormat {
    /// Free text (`{"type": "text"}`, or none given).
    #[default]
    Text,
    /// One JSON object (`{"type": "json_object"}`).
    JsonObject,
    /// JSON valid against `schema` (`{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`).
    JsonSchema {
        /// `json_schema.name`.
        name: String,
        /// `json_schema.schema` (an empty schema, `{}`, when absent: any JSON value).
        schema: Value,
        /// `json_schema.strict` (enforced either way here: the schema is a grammar).
        strict: bool,
    },
}

impl ResponseFormat {
    /// Reads OpenAI's `response_format`. Errors name the field.
    pub fn parse(v: &Value) -> Result<Self, RouterError> {
        match v.get("type").and_then(Value::as_str) {
            Some("text") => Ok(Self::Text),
            Some("json_object") => Ok(Self::JsonObject),
            Some("json_schema") => {
                let js = v
                    .get("json_schema")
                    .and_then(Value::as_object)
                    .ok_or_else(|| {
                        invalid(
                            "response_format.json_schema is required for type json_schema",
                            "response_format.json_schema",
                        )
                    })?;
                let name = js
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        invalid(
                            "response_format.json_schema.name is required",
                            "response_format.json_schema.name",
                        )
                    })?
                    .to_string();
                let schema = js
                    .get("schema")
                    .cloned()
                    .unwrap_or_else(|| Value::Object(Default::default()));
                if !schema.is_object() {
                    return Err(invalid(
                        "response_format.json_schema.schema must be a JSON Schema object",
                        "response_format.json_schema.schema",
                    ));
                }
                let strict = js.get("strict").and_then(Value::as_bool).unwrap_or(false);
                Ok(Self::JsonSchema {
                    name,
                    schema,
                    strict,
                })
            }
            _ => Err(invalid(
                "response_format.type must be text, json_object or json_schema",
                "response_format",
            )),
        }
    }

    /// Whether the answer is JSON (its text is not parsed for tool calls or thinking).
    pub fn is_json(&self) -> bool {
        !matches!(self, Self::Text)
    }

    /// The OpenAI wire form (for an upstream); None for plain text.
    pub fn to_value(&self) -> Option<Value> {
        match self {
            Self::Text => None,
            Self::JsonObject => Some(serde_json::json!({"type": "json_object"})),
            Self::JsonSchema {
                name,
                schema,
                strict,
            } => Some(serde_json::json!({"type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": strict}})),
        }
    }
}

impl Serialize for ResponseFormat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

/// `tool_choice`, checked: OpenAI's four forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model must not call a tool.
    None,
    /// The model decides.
    Auto,
    /// The model must call at least one tool.
    Required,
    /// The model must call this function (one of `tools`).
    Function(String),
}

impl ToolChoice {
    /// Reads `tool_choice` and checks it against the request's tools: a call can only be required when
    /// there are tools, and a named function must be one of them (`none` and `auto` without tools are
    /// accepted, as vLLM and llama.cpp do: no call is made either way). Errors name the field.
    pub fn parse(v: &Value, tools: Option<&[Value]>) -> Result<Self, RouterError> {
        let tools = tools.unwrap_or_default();
        let choice = Self::read(v, tools)?;
        if tools.is_empty() && matches!(choice, Self::Required | Self::Function(_)) {
            return Err(invalid(
                "tool_choice requires a tool call, but no tools are specified",
                "tool_choice",
            ));
        }
        Ok(choice)
    }

    fn read(v: &Value, tools: &[Value]) -> Result<Self, RouterError> {
        match v {
            Value::String(s) => match s.as_str() {
                "none" => Ok(Self::None),
                "auto" => Ok(Self::Auto),
                "required" => Ok(Self::Required),
                other => Err(invalid(
                    format!(
                        "tool_choice must be none, auto, required or a function, got {other:?}"
                    ),
                    "tool_choice",
                )),
            },
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
                let name = o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        invalid("tool_choice.function.name is required", "tool_choice")
                    })?;
                let offered = tools.iter().any(|t| {
                    t.get("function")
                        .and_then(|f| f.get("name"))
                        .and_then(Value::as_str)
                        == Some(name)
                });
                if !offered {
                    return Err(invalid(
                        format!("tool_choice names function {name:?}, which is not in tools"),
                        "tool_choice.function.name",
                    ));
                }
                Ok(Self::Function(name.to_string()))
            }
            _ => Err(invalid(
                "tool_choice must be \"none\", \"auto\", \"required\" or \
                 {\"type\": \"function\", \"function\": {\"name\": ...}}",
                "tool_choice",
            )),
        }
    }

    /// The OpenAI wire form (for an upstream).
    pub fn to_value(&self) -> Value {
        match self {
            Self::None => Value::from("none"),
            Self::Auto => Value::from("auto"),
            Self::Required => Value::from("required"),
            Self::Function(name) => {
                serde_json::json!({"type": "function", "function": {"name": name}})
            }
        }
    }
}

impl Serialize for ToolChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

fn invalid(msg: impl Into<String>, param: &str) -> RouterError {
    RouterError::InvalidRequest {
        message: msg.into(),
        param: Some(param.to_string()),
    }
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

fn content_text(
    content: &Value,
    idx: usize,
    has_images: &mut bool,
    limits: &Limits,
) -> Result<String, RouterError> {
    match content {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            let mut images = 0;
            for (j, p) in parts.iter().enumerate() {
                let param = format!("messages[{idx}].content[{j}]");
                let ty = p
                    .get("type")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid("content part needs a type", &param))?;
                match ty {
                    "text" => {
                        let t = p
                            .get("text")
                            .and_then(Value::as_str)
                            .ok_or_else(|| invalid("text part needs a text string", &param))?;
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(t);
                    }
                    "image_url" => {
                        let url = p
                            .get("image_url")
                            .and_then(|u| u.get("url").or(Some(u)))
                            .and_then(Value::as_str)
                            .ok_or_else(|| invalid("image_url part needs image_url.url", &param))?;
                        validate_image_url(url, &param, limits)?;
                        images += 1;
                        *has_images = true;
                    }
                    other => {
                        return Err(invalid(
                            format!("unsupported content part type {other:?}"),
                            &param,
                        ));
                    }
                }
            }
            if images > limits.max_images {
                return Err(invalid(
                    format!("at most {} images per message", limits.max_images),
                    &format!("messages[{idx}].content"),
                ));
            }
            Ok(text)
        }
        _ => Err(invalid(
            "content must be a string or an array of parts",
            &format!("messages[{idx}].content"),
        )),
    }
}

fn validate_image_url(url: &str, param: &str, limits: &Limits) -> Result<(), RouterError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| invalid("malformed data URL", param))?;
        if !meta.starts_with("image/") || !meta.ends_with(";base64") {
            return Err(invalid("data URL must be base64 image/* data", param));
        }
        // base64 is 4 chars per 3 bytes
        let bytes = data.len() / 4 * 3;
        if bytes > limits.max_image_bytes {
            return Err(RouterError::TooLarge(format!(
                "{param}: image of ~{bytes} bytes exceeds the {} byte limit",
                limits.max_image_bytes
            )));
        }
        if data.bytes().any(|b| {
            !(b.is_ascii_alphanumeric()
                || b == b'+'
                || b == b'/'
                || b == b'='
                || b == b'\n'
                || b == b'\r')
        }) {
            return Err(invalid("data URL is not valid base64", param));
        }
        Ok(())
    } else if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(invalid(
            "image_url.url must be an http(s) or data: URL",
            param,
        ))
    }
}

/// Request limits (configurable in `[limits]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Limits {
    /// Most messages in one request.
    pub max_messages: usize,
    /// Largest accepted `max_tokens`.
    pub max_tokens_ceiling: u32,
    /// Default `max_tokens` when the client gives none.
    pub default_max_tokens: u32,
    /// Images per message.
    pub max_images: usize,
    /// Bytes per inline image.
    pub max_image_bytes: usize,
    /// Most stop strings.
    pub max_stop: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_messages: 1024,
            max_tokens_ceiling: 32768,
            default_max_tokens: 1024,
            max_images: 8,
            max_image_bytes: 20 << 20,
            max_stop: 8,
        }
    }
}

impl ChatCompletionRequest {
    /// Checks every field and produces the normalised request.
    pub fn validate(self, limits: &Limits) -> Result<ChatRequest, RouterError> {
        if self.messages.is_empty() {
            return Err(invalid("messages must not be empty", "messages"));
        }
        if self.messages.len() > limits.max_messages {
            return Err(invalid(
                format!("at most {} messages", limits.max_messages),
                "messages",
            ));
        }
        if let Some(n) = self.n
            && n != 1
        {
            return Err(invalid("only n=1 is supported", "n"));
        }
        let mut has_images = false;
        let mut text = String::new();
        let mut last_user = String::new();
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            let Value::Object(mut obj) = m else {
                return Err(invalid(
                    "each message must be an object",
                    &format!("messages[{i}]"),
                ));
            };
            let role = obj
                .get("role")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if !ROLES.contains(&role.as_str()) {
                return Err(invalid(
                    format!("role must be one of {ROLES:?}, got {role:?}"),
                    &format!("messages[{i}].role"),
                ));
            }
            let content = obj.get("content").cloned().unwrap_or(Value::Null);
            let t = content_text(&content, i, &mut has_images, limits)?;
            if role == "user" || role == "system" || role == "developer" {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&t);
            }
            if role == "user" {
                last_user = t;
            }
            if role == "assistant" {
                if let Some(Value::Array(calls)) = obj.get_mut("tool_calls") {
                    for (j, c) in calls.iter_mut().enumerate() {
                        let p = format!("messages[{i}].tool_calls[{j}]");
                        let f = c
                            .get_mut("function")
                            .ok_or_else(|| invalid("tool call needs a function", &p))?;
                        if f.get("name").and_then(Value::as_str).is_none() {
                            return Err(invalid("tool call function needs a name", &p));
                        }
                        // Arguments may come as a JSON string (OpenAI) or an object; keep a string, and reject
                        // strings that are not JSON so the template never sees garbage.
                        match f.get("arguments") {
                            Some(Value::String(s)) => {
                                serde_json::from_str::<Value>(s).map_err(|e| {
                                    invalid(format!("arguments are not JSON: {e}"), &p)
                                })?;
                            }
                            Some(v @ Value::Object(_)) => {
                                let s = v.to_string();
                                f["arguments"] = Value::String(s);
                            }
                            None => f["arguments"] = Value::String("{}".into()),
                            _ => {
                                return Err(invalid(
                                    "arguments must be a JSON string or object",
                                    &p,
                                ));
                            }
                        }
                    }
                }
            } else if content.is_null() {
                return Err(invalid(
                    "content is required",
                    &format!("messages[{i}].content"),
                ));
            }
            messages.push(Value::Object(obj));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if let Some(m) = max_tokens {
            if m == 0 {
                return Err(invalid("max_tokens must be at least 1", "max_tokens"));
            }
            if m > limits.max_tokens_ceiling {
                return Err(invalid(
                    format!("max_tokens must be at most {}", limits.max_tokens_ceiling),
                    "max_tokens",
                ));
            }
        }
        if let Some(t) = self.temperature
            && !(t.is_finite() && (0.0..=2.0).contains(&t))
        {
            return Err(invalid(
                "temperature must be between 0 and 2",
                "temperature",
            ));
        }
        if let Some(p) = self.top_p
            && !(p.is_finite() && p > 0.0 && p <= 1.0)
        {
            return Err(invalid("top_p must be in (0, 1]", "top_p"));
        }
        if let Some(k) = self.top_k
            && k < 0
        {
            return Err(invalid("top_k must be >= 0", "top_k"));
        }
        if let Some(p) = self.min_p
            && !(p.is_finite() && (0.0..=1.0).contains(&p))
        {
            return Err(invalid("min_p must be in [0, 1]", "min_p"));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && (-2.0..=2.0).contains(&v))
            {
                return Err(invalid(format!("{name} must be between -2 and 2"), name));
            }
        }
        if let Some(r) = self.repetition_penalty
            && !(r.is_finite() && r > 0.0)
        {
            return Err(invalid(
                "repetition_penalty must be > 0",
                "repetition_penalty",
            ));
        }
        let stop = self.stop.map(|s| s.to_vec()).unwrap_or_default();
        if stop.len() > limits.max_stop {
            return Err(invalid(
                format!("at most {} stop sequences", limits.max_stop),
                "stop",
            ));
        }
        let mut logit_bias = vec![];
        for (k, v) in self.logit_bias.unwrap_or_default() {
            let id: u32 = k.parse().map_err(|_| {
                invalid(
                    format!("logit_bias key {k:?} is not a token id"),
                    "logit_bias",
                )
            })?;
            if !(v.is_finite() && (-100.0..=100.0).contains(&v)) {
                return Err(invalid(
                    "logit_bias values must be between -100 and 100",
                    "logit_bias",
                ));
            }
            logit_bias.push((id, v));
        }
        let top_logprobs = self.top_logprobs.unwrap_or(0);
        if top_logprobs as usize > jemma_chat::logprobs::MAX_TOP_LOGPROBS {
            return Err(invalid(
                format!(
                    "top_logprobs must be at most {}",
                    jemma_chat::logprobs::MAX_TOP_LOGPROBS
                ),
                "top_logprobs",
            ));
        }
        if let Some(tools) = &self.tools {
            for (i, t) in tools.iter().enumerate() {
                let p = format!("tools[{i}]");
                if t.get("type").and_then(Value::as_str) != Some("function") {
                    return Err(invalid("only function tools are supported", &p));
                }
                if t.get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .is_none()
                {
                    return Err(invalid("tool function needs a name", &p));
                }
            }
        }
        let tool_choice = self
            .tool_choice
            .as_ref()
            .map(|v| ToolChoice::parse(v, self.tools.as_deref()))
            .transpose()?;
        let response_format = self
            .response_format
            .as_ref()
            .map(ResponseFormat::parse)
            .transpose()?
            .unwrap_or_default();
        let enable_thinking = self.enable_thinking.or_else(|| {
            self.chat_template_kwargs
                .as_ref()
                .and_then(|k| k.get("enable_thinking"))
                .and_then(Value::as_bool)
        });
        let chars: usize = messages.iter().map(|m| m.to_string().len()).sum();
        Ok(ChatRequest {
            requested_model: self.model.unwrap_or_else(|| "auto".into()),
            messages,
            tools: self.tools.filter(|t| !t.is_empty()),
            tool_choice,
            parallel_tool_calls: self.parallel_tool_calls,
            max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            stop,
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            logit_bias,
            logprobs: self.logprobs.unwrap_or(false),
            top_logprobs,
            response_format,
            enable_thinking,
            stream: self.stream,
            include_usage: self
                .stream_options
                .map(|o| o.include_usage)
                .unwrap_or(false),
            has_images,
            text,
            last_user,
            prompt_tokens_estimate: chars / 4 + 1,
            raw_prompt: None,
        })
    }
}

/// A tool call in a response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ToolCallOut {
    /// Call id.
    pub id: String,
    /// Always "function".
    #[serde(rename = "type")]
    pub kind: String,
    /// Name and JSON-string arguments.
    pub function: FunctionCall,
}

/// Function name and arguments.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments as a JSON string.
    pub arguments: String,
}

/// Token usage (OpenAI's `usage` object).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub completion_tokens: u64,
    /// Sum.
    pub total_tokens: u64,
    /// OpenAI's `prompt_tokens_details`: how much of the prompt came from the prefix cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// OpenAI's `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV cache was reused from an earlier request instead of being prefilled.
    #[serde(default)]
    pub cached_tokens: u64,
}

/// `_routing`: how the gateway answered.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Routing {
    /// Tier that produced the answer.
    pub tier: String,
    /// Model that produced it.
    pub model: String,
    /// Why this tier was chosen first.
    pub reason: String,
    /// Wall time of the whole request.
    pub latency_ms: u64,
    /// Time to the first content token.
    pub ttft_ms: Option<u64>,
    /// Prompt tokens (of the answering tier).
    pub prompt_tokens: u64,
    /// Of those, the ones served from the answering tier's prefix cache.
    #[serde(default)]
    pub cached_tokens: u64,
    /// Generated tokens (all tiers, for a continued stream).
    pub completion_tokens: u64,
    /// Fallback hops, e.g. `["heavy→primary: breaker open"]`.
    pub fallback: Vec<String>,
    /// Decode speed of the answering tier, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
}

/// `POST /v1/completions` body (legacy plain-prompt API).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct CompletionRequest {
    /// Tier, model id or `auto`.
    #[serde(default)]
    pub model: Option<String>,
    /// The prompt (one string, or a one-element list).
    pub prompt: Value,
    /// Upper bound of generated tokens (OpenAI's default for this API is 16).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k.
    #[serde(default)]
    pub top_k: Option<i32>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Presence penalty.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Stream as SSE.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options (`include_usage`: a last chunk with `usage`).
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Number of completions (only 1).
    #[serde(default)]
    pub n: Option<u32>,
}

impl CompletionRequest {
    /// Validates through the chat path (same limits and checks) and marks the prompt as raw.
    pub fn validate(self, limits: &Limits) -> Result<ChatRequest, RouterError> {
        let prompt = match &self.prompt {
            Value::String(s) => s.clone(),
            Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                a[0].as_str().unwrap_or_default().to_string()
            }
            Value::Array(_) => {
                return Err(invalid(
                    "only one prompt per request is supported",
                    "prompt",
                ));
            }
            _ => return Err(invalid("prompt must be a string", "prompt")),
        };
        if prompt.is_empty() {
            return Err(invalid("prompt must not be empty", "prompt"));
        }
        let chat = ChatCompletionRequest {
            model: self.model,
            messages: vec![serde_json::json!({"role": "user", "content": prompt.clone()})],
            max_tokens: Some(self.max_tokens.unwrap_or(16)),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            stop: self.stop,
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            stream: self.stream,
            stream_options: self.stream_options,
            n: self.n,
            ..Default::default()
        };
        let mut r = chat.validate(limits)?;
        r.raw_prompt = Some(prompt);
        Ok(r)
    }
}
