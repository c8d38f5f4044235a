//! Typed chat messages, tools, `tool_choice` and `response_format`: the parts of a chat request that used to
//! be walked as `Value`s. One set of types reads the client's request, is sent to an OpenAI-compatible
//! upstream and (serialised) is what the chat template sees.
//!
//! Errors carry the field's path relative to the type (`content[1]: ...`), so that the body reader can
//! name the whole path (`messages[2].content[1]`) in the 400's `param`; see [`join_path`].

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// One message of a conversation, tagged by `role` (OpenAI's `ChatCompletionRequestMessage`).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Message {
    /// The system instruction.
    System(InstructionMessage),
    /// OpenAI's newer name for the system instruction; Gemma 4's template renders it as `system`, the only
    /// instruction role the model was trained on.
    Developer(InstructionMessage),
    /// A user turn.
    User(UserMessage),
    /// An earlier model turn: text, thinking and tool calls.
    Assistant(AssistantMessage),
    /// The result of a tool call.
    Tool(ToolMessage),
}

/// The roles a message may have.
pub const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

impl<'de> Deserialize<'de> for Message {
    /// Routes on `role` by hand (instead of serde's internally tagged enum, which buffers the body and so
    /// loses the path of an error inside it) and names the offending field relative to the message.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut v = Value::deserialize(d)?;
        let Some(fields) = v.as_object_mut() else {
            return Err(D::Error::custom("each message must be an object"));
        };
        let role = match fields.remove("role") {
            Some(Value::String(r)) => r,
            _ => String::new(),
        };
        if role == "assistant" {
            replayed_answer(fields).map_err(D::Error::custom)?;
        }
        let m = match role.as_str() {
            "system" => body(v).map(Message::System),
            "developer" => body(v).map(Message::Developer),
            "user" => body(v).map(Message::User),
            "assistant" => body(v).map(Message::Assistant),
            "tool" => body(v).map(Message::Tool),
            other => Err(format!("role: must be one of {ROLES:?}, got {other:?}")),
        };
        m.map_err(D::Error::custom)
    }
}

/// An assistant message as a client appends a response to its history carries the response message's
/// other fields. Fields no message has are ignored, as OpenAI and vLLM ignore them in messages (SDKs and
/// agent frameworks add their own: `parsed`, `provider_specific_fields`, ids); but those that would carry
/// part of the turn are not lost: a refusal's text is the turn's text (what the model said), and an
/// earlier spoken answer or a deprecated `function_call` cannot be replayed and is refused by name.
fn replayed_answer(fields: &mut serde_json::Map<String, Value>) -> Result<(), String> {
    for key in ["audio", "function_call"] {
        match fields.remove(key) {
            None | Some(Value::Null) => {}
            Some(_) if key == "audio" => {
                return Err(
                    "audio: an earlier spoken answer cannot be replayed here (send its transcript as \
                     content)"
                        .into(),
                );
            }
            Some(_) => {
                return Err(
                    "function_call: the deprecated single call is not supported (send tool_calls)"
                        .into(),
                );
            }
        }
    }
    match fields.remove("annotations") {
        None | Some(Value::Null | Value::Array(_)) => {}
        Some(_) => return Err("annotations: must be an array".into()),
    }
    match fields.remove("refusal") {
        None | Some(Value::Null) => {}
        Some(Value::String(r)) => {
            let text = match fields.get("content") {
                None | Some(Value::Null) => r,
                Some(Value::String(c)) if c.is_empty() => r,
                Some(Value::String(c)) => format!("{c}\n{r}"),
                Some(_) => {
                    return Err("refusal: comes with a string content or none".into());
                }
            };
            if !text.is_empty() {
                fields.insert("content".into(), Value::String(text));
            }
        }
        Some(_) => return Err("refusal: must be a string".into()),
    }
    Ok(())
}

/// Deserialises `v` as `T`; an error reads `<path relative to v>: <what is wrong>`.
fn body<T: DeserializeOwned>(v: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(v)
        .map_err(|e| join_path(&e.path().to_string(), &e.inner().to_string()))
}

/// Joins the path at which serde failed (`serde_path_to_error`'s form: `.` for the root, `a.b[2]`) with
/// an error message that may itself start with a deeper relative path (`content[1]: ...`, from a nested
/// [`body`]), into `<path>: <message>`.
pub fn join_path(path: &str, message: &str) -> String {
    let (rel, rest) = split_path(message).unwrap_or(("", message));
    let path = if path == "." { "" } else { path };
    let full = match (path.is_empty(), rel.is_empty(), rel.starts_with('[')) {
        (true, _, _) => rel.to_string(),
        (false, true, _) => path.to_string(),
        (false, false, true) => format!("{path}{rel}"),
        (false, false, false) => format!("{path}.{rel}"),
    };
    if full.is_empty() {
        rest.to_string()
    } else {
        format!("{full}: {rest}")
    }
}

/// Splits `a.b[1]: message` into its path and its message; None when the text starts with no path.
pub fn split_path(message: &str) -> Option<(&str, &str)> {
    let (p, rest) = message.split_once(": ")?;
    let is_path = !p.is_empty()
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '[' | ']' | '.'))
        && p.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '[');
    is_path.then_some((p, rest))
}

/// A `system` or `developer` message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstructionMessage {
    /// The instruction: a string or text parts.
    pub content: MessageContent,
    /// An optional participant name (not shown to the model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A `user` message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UserMessage {
    /// A string, or text and image parts.
    pub content: MessageContent,
    /// An optional participant name (not shown to the model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// An `assistant` message: an earlier answer, replayed as history.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct AssistantMessage {
    /// The answer's text; null when the turn only called tools.
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// The turn's thinking (vLLM's and DeepSeek's name). Gemma 4's template drops it from the history
    /// except in an unfinished tool-calling turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// The same under vLLM's newer name; the template reads either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// The calls the turn made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// An optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Gemma's own form of tool results, embedded in the assistant turn (`[{name, response}]`); passed to
    /// the template as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_responses: Option<Vec<Value>>,
}

/// A `tool` message: one call's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ToolMessage {
    /// The result: a string or text parts.
    pub content: MessageContent,
    /// The `id` of the call this answers (the template uses it to name the function).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The function's name, for clients that send it instead of an id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    /// A system message with `text`.
    pub fn system(text: impl Into<String>) -> Self {
        Self::System(InstructionMessage {
            content: MessageContent::Text(text.into()),
            name: None,
        })
    }

    /// A user message with `text`.
    pub fn user(text: impl Into<String>) -> Self {
        Self::User(UserMessage {
            content: MessageContent::Text(text.into()),
            name: None,
        })
    }

    /// An assistant message with `text` (None: the turn only called tools) and `calls`.
    pub fn assistant(text: Option<String>, calls: Vec<ToolCall>) -> Self {
        Self::Assistant(AssistantMessage {
            content: text.map(MessageContent::Text),
            tool_calls: (!calls.is_empty()).then_some(calls),
            ..Default::default()
        })
    }

    /// A tool result for call `id`.
    pub fn tool(id: impl Into<String>, text: impl Into<String>) -> Self {
        Self::Tool(ToolMessage {
            content: MessageContent::Text(text.into()),
            tool_call_id: Some(id.into()),
            name: None,
        })
    }

    /// The role's wire name.
    pub fn role(&self) -> &'static str {
        match self {
            Self::System(_) => "system",
            Self::Developer(_) => "developer",
            Self::User(_) => "user",
            Self::Assistant(_) => "assistant",
            Self::Tool(_) => "tool",
        }
    }

    /// The message's content, when it has any.
    pub fn content(&self) -> Option<&MessageContent> {
        match self {
            Self::System(m) | Self::Developer(m) => Some(&m.content),
            Self::User(m) => Some(&m.content),
            Self::Assistant(m) => m.content.as_ref(),
            Self::Tool(m) => Some(&m.content),
        }
    }

    /// As the JSON object the chat template reads.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// `content`: one string, or a list of parts.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Text, image, audio and video parts, in order.
    Parts(Vec<ContentPart>),
}

impl<'de> Deserialize<'de> for MessageContent {
    /// By hand rather than serde's untagged enum, whose only error is "did not match any variant": a bad
    /// part is named (`[1]: unknown variant ...`).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self::Text(s)),
            v @ Value::Array(_) => body(v).map(Self::Parts).map_err(D::Error::custom),
            _ => Err(D::Error::custom(
                "content must be a string or an array of parts",
            )),
        }
    }
}

impl MessageContent {
    /// The text parts joined by new lines (media left out).
    pub fn text(&self) -> String {
        match self {
            Self::Text(s) => s.clone(),
            Self::Parts(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    ContentPart::Text { text } => Some(text.as_str()),
                    ContentPart::ImageUrl { .. }
                    | ContentPart::InputAudio { .. }
                    | ContentPart::VideoUrl { .. } => None,
                })
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    /// The image parts.
    pub fn images(&self) -> impl Iterator<Item = &ImageUrl> {
        let parts = match self {
            Self::Text(_) => &[][..],
            Self::Parts(p) => &p[..],
        };
        parts.iter().filter_map(|p| match p {
            ContentPart::ImageUrl { image_url } => Some(image_url),
            _ => None,
        })
    }

    /// The video parts.
    pub fn videos(&self) -> impl Iterator<Item = &VideoUrl> {
        let parts = match self {
            Self::Text(_) => &[][..],
            Self::Parts(p) => &p[..],
        };
        parts.iter().filter_map(|p| match p {
            ContentPart::VideoUrl { video_url } => Some(video_url),
            _ => None,
        })
    }

    /// The audio parts.
    pub fn audio(&self) -> impl Iterator<Item = &InputAudio> {
        let parts = match self {
            Self::Text(_) => &[][..],
            Self::Parts(p) => &p[..],
        };
        parts.iter().filter_map(|p| match p {
            ContentPart::InputAudio { input_audio } => Some(input_audio),
            _ => None,
        })
    }
}

/// `messages` with `note` at the end of the system instruction: appended, after a blank line, to a
/// first `system` or `developer` message (as a last text part where its content is parts), else as a
/// `system` message before them all. Gemma 4's template renders one system turn, first.
pub fn with_system_note(mut messages: Vec<Message>, note: &str) -> Vec<Message> {
    match messages.first_mut() {
        Some(Message::System(m) | Message::Developer(m)) => match &mut m.content {
            MessageContent::Text(t) if t.trim().is_empty() => *t = note.to_string(),
            MessageContent::Text(t) => *t = format!("{}\n\n{note}", t.trim_end()),
            // Gemma 4's template trims each text part of the system turn and joins them with a space.
            MessageContent::Parts(parts) => parts.push(ContentPart::Text {
                text: note.to_string(),
            }),
        },
        _ => messages.insert(0, Message::system(note)),
    }
    messages
}

/// One part of a message's content, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// An image by URL: `https://...` or `data:image/...;base64,...`.
    ImageUrl {
        /// The image.
        image_url: ImageUrl,
    },
    /// An audio clip inline (OpenAI's `input_audio`).
    InputAudio {
        /// The clip.
        input_audio: InputAudio,
    },
    /// A video by URL (vLLM's `video_url` extension): `https://...` or `data:video/...;base64,...`.
    VideoUrl {
        /// The video.
        video_url: VideoUrl,
    },
}

/// A video reference (vLLM's `video_url` part).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VideoUrl {
    /// `http(s)://` or a base64 `data:video/*` URL (MP4, MOV, WebM, MKV, AVI: whatever the server's
    /// FFmpeg reads).
    #[schema(pattern = "^(https?://|data:video/[^;,]+;base64,)")]
    pub url: String,
}

/// An audio clip (OpenAI's `input_audio` part): base64 bytes and their format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InputAudio {
    /// The encoded clip, base64.
    pub data: String,
    /// Its format: `wav` or `mp3` (OpenAI's), or `flac`, `m4a`, `aac`, `ogg` (Ogg Vorbis), `opus` (Ogg
    /// Opus) or `webm` (WebM Opus, what browsers record). A hint: the container is probed.
    #[schema(example = "wav")]
    pub format: String,
}

/// An image reference. The bare-string form (`"image_url": "https://..."`), which some clients send and
/// vLLM accepts, is read too. A key other than `url` and `detail` is refused.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
// For the schema (`additionalProperties: false`); the hand-written Deserialize below refuses them.
#[serde(deny_unknown_fields)]
pub struct ImageUrl {
    /// `http(s)://` or a base64 `data:image/*` URL.
    #[schema(pattern = "^(https?://|data:image/[^;,]+;base64,)")]
    pub url: String,
    /// `auto`, `low` or `high` (OpenAI's resolution hint): on a local engine `low` takes a quarter of the
    /// model's soft-token budget (70 of Gemma 4's 280); `auto` and `high` the whole budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl<'de> Deserialize<'de> for ImageUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Unknown keys are refused, naming the key, as inside `input_audio` and `video_url`: a setting
        // sent there (a size, a crop) would otherwise be silently dropped.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Object {
            url: String,
            #[serde(default)]
            detail: Option<String>,
        }
        match Value::deserialize(d)? {
            Value::String(url) => Ok(Self { url, detail: None }),
            v => body::<Object>(v)
                .map(|o| Self {
                    url: o.url,
                    detail: o.detail,
                })
                .map_err(D::Error::custom),
        }
    }
}

/// A tool call in an assistant message (OpenAI's `ChatCompletionMessageToolCall`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ToolCall {
    /// The call's id (tool messages answer it by `tool_call_id`; empty when the client sent none, and then
    /// left out when sent on).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type", default = "function_type")]
    pub kind: FunctionType,
    /// The function and its arguments.
    pub function: FunctionCall,
}

/// The only tool type: `function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FunctionType {
    /// A function tool.
    #[default]
    Function,
}

fn function_type() -> FunctionType {
    FunctionType::Function
}

/// A function's name and its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// The arguments as a JSON string. A JSON object is accepted too (some clients send one) and kept
    /// as its string; a string that is not JSON is refused, so the template never sees garbage.
    #[serde(default = "empty_arguments", deserialize_with = "arguments")]
    pub arguments: String,
}

fn empty_arguments() -> String {
    "{}".into()
}

fn arguments<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => match serde_json::from_str::<Value>(&s) {
            Ok(_) => Ok(s),
            Err(e) => Err(D::Error::custom(format!("arguments are not JSON: {e}"))),
        },
        v @ Value::Object(_) => Ok(v.to_string()),
        Value::Null => Ok(empty_arguments()),
        _ => Err(D::Error::custom(
            "arguments must be a JSON string or object",
        )),
    }
}

/// A tool the model may call (OpenAI's `ChatCompletionTool`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    /// Always `function`: the only kind there is.
    #[serde(rename = "type")]
    pub kind: FunctionType,
    /// The function.
    pub function: FunctionDefinition,
}

/// A function tool's description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionDefinition {
    /// Name the model calls it by.
    pub name: String,
    /// What it does (shown to the model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Its arguments as a JSON Schema object; enforced when a call is forced (`tool_choice` `required`
    /// or named), or when the function is `strict`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// OpenAI's strict flag: a call's arguments follow `parameters`. Forced calls are enforced either
    /// way; under `tool_choice` `auto` a strict function's call is enforced from the moment the model
    /// opens it (a lazy grammar; the answer is free until then). A keyword the grammar cannot enforce is
    /// a 400 naming it, as OpenAI refuses schemas strict mode does not support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

impl Tool {
    /// A function tool.
    pub fn function(
        name: impl Into<String>,
        description: Option<String>,
        parameters: Value,
    ) -> Self {
        Self {
            kind: FunctionType::Function,
            function: FunctionDefinition {
                name: name.into(),
                description,
                parameters: Some(parameters),
                strict: None,
            },
        }
    }

    /// This tool with OpenAI's `strict` flag set to `strict` (None: not given).
    pub fn with_strict(mut self, strict: Option<bool>) -> Self {
        self.function.strict = strict;
        self
    }

    /// As the JSON object the chat template reads.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// `tool_choice`: whether and which tool the model must call.
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

/// `tool_choice` as it travels: a mode or a named function.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // the schema's shape only: `ToolChoice` reads and writes the wire by hand
enum ToolChoiceWire {
    /// `none`, `auto` or `required`.
    Mode(ToolChoiceMode),
    /// `{"type": "function", "function": {"name": ...}}`.
    Named(NamedToolChoice),
}

#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum ToolChoiceMode {
    None,
    Auto,
    Required,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[allow(dead_code)]
struct NamedToolChoice {
    #[serde(rename = "type")]
    kind: FunctionType,
    function: FunctionName,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[allow(dead_code)]
struct FunctionName {
    name: String,
}

impl utoipa::PartialSchema for ToolChoice {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        ToolChoiceWire::schema()
    }
}

impl ToSchema for ToolChoice {
    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        ToolChoiceWire::schemas(schemas);
    }
}

impl ToolChoice {
    /// The OpenAI wire form.
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

impl<'de> Deserialize<'de> for ToolChoice {
    /// Reads OpenAI's four forms with an error that says which are allowed. Whether a named function is
    /// offered is checked against `tools` in validation.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        match &v {
            Value::String(s) => match s.as_str() {
                "none" => Ok(Self::None),
                "auto" => Ok(Self::Auto),
                "required" => Ok(Self::Required),
                other => Err(D::Error::custom(format!(
                    "tool_choice must be none, auto, required or a function, got {other:?}"
                ))),
            },
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .map(|n| Self::Function(n.to_string()))
                .ok_or_else(|| D::Error::custom("function.name: is required")),
            _ => Err(D::Error::custom(
                "tool_choice must be \"none\", \"auto\", \"required\" or \
                 {\"type\": \"function\", \"function\": {\"name\": ...}}",
            )),
        }
    }
}

/// `response_format`: what the answer must be.
#[derive(Debug, Clone, PartialEq, Default, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Free text (also what no `response_format` means).
    #[default]
    Text,
    /// One JSON object.
    JsonObject,
    /// JSON valid against a schema.
    JsonSchema {
        /// The schema and its name.
        json_schema: JsonSchemaFormat,
    },
}

impl<'de> Deserialize<'de> for ResponseFormat {
    /// By hand: serde's internally tagged unit variant would ignore what else `json_object` carries. A
    /// `schema` there (llama-server's form) is honoured as a `json_schema` format; any other field is
    /// refused by name, as is one beside `json_schema`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let Value::Object(mut fields) = Value::deserialize(d)? else {
            return Err(D::Error::custom("response_format must be an object"));
        };
        let ty = match fields.remove("type") {
            Some(Value::String(t)) => t,
            _ => return Err(D::Error::custom("type: is required")),
        };
        let format = match ty.as_str() {
            "text" => Self::Text,
            "json_object" => match fields.remove("schema") {
                None | Some(Value::Null) => Self::JsonObject,
                Some(schema) => Self::json_schema("json_object", schema, false),
            },
            "json_schema" => {
                let spec = fields
                    .remove("json_schema")
                    .ok_or_else(|| D::Error::custom("json_schema: is required"))?;
                let json_schema = body::<JsonSchemaFormat>(spec)
                    .map_err(|e| D::Error::custom(join_path("json_schema", &e)))?;
                Self::JsonSchema { json_schema }
            }
            other => {
                return Err(D::Error::custom(format!(
                    "type: must be text, json_object or json_schema, got {other:?}"
                )));
            }
        };
        match fields.keys().next() {
            Some(k) => Err(D::Error::custom(format!(
                "{k}: unknown field for a {ty} response_format"
            ))),
            None => Ok(format),
        }
    }
}

/// `response_format.json_schema`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    /// The schema's name.
    pub name: String,
    /// What the schema is for: shown to the model at the end of the system instruction
    /// ([`ResponseFormat::instruction`]), as OpenAI's model is shown it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON Schema (absent: any JSON value). Enforced token by token: keywords that cannot be enforced
    /// are a 400 naming them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    /// OpenAI's strict mode. The schema is a grammar here, so it holds either way; strict also forbids
    /// properties the schema does not list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

impl ResponseFormat {
    /// What the model is told of the format: a `json_schema` format's `description` (OpenAI's reference:
    /// "used by the model to determine how to respond in the format"), as a sentence for the end of the
    /// system instruction ([`with_system_note`]); None for a format without one. The schema itself is
    /// not shown: the grammar enforces it token by token (as vLLM, llama-server and mlx-lm do).
    pub fn instruction(&self) -> Option<String> {
        match self {
            Self::JsonSchema { json_schema } => json_schema
                .description
                .as_deref()
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(|d| format!("Answer in the JSON format \"{}\": {d}", json_schema.name)),
            _ => None,
        }
    }

    /// Whether the answer is JSON (its text is not parsed for tool calls or thinking).
    pub fn is_json(&self) -> bool {
        !matches!(self, Self::Text)
    }

    /// A `json_schema` format.
    pub fn json_schema(name: impl Into<String>, schema: Value, strict: bool) -> Self {
        Self::JsonSchema {
            json_schema: JsonSchemaFormat {
                name: name.into(),
                description: None,
                schema: Some(schema),
                strict: Some(strict),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_formats_description_ends_the_system_instruction() {
        let format = |description: Option<&str>| ResponseFormat::JsonSchema {
            json_schema: JsonSchemaFormat {
                name: "city".into(),
                description: description.map(String::from),
                schema: None,
                strict: None,
            },
        };
        assert_eq!(format(None).instruction(), None);
        assert_eq!(format(Some("  ")).instruction(), None);
        assert_eq!(ResponseFormat::JsonObject.instruction(), None);
        let note = format(Some("A city and its population."))
            .instruction()
            .unwrap();
        assert_eq!(
            note,
            "Answer in the JSON format \"city\": A city and its population."
        );
        let user = Message::user("hi");
        // No instruction: one is added, first.
        let m = with_system_note(vec![user.clone()], &note);
        assert_eq!(m, [Message::system(note.as_str()), user.clone()]);
        // A system (or developer) message keeps its text, the note after a blank line.
        let m = with_system_note(vec![Message::system("Be brief.\n"), user.clone()], &note);
        assert_eq!(m[0], Message::system(format!("Be brief.\n\n{note}")));
        assert_eq!(m.len(), 2);
        let dev: Message = serde_json::from_value(serde_json::json!(
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}
        ))
        .unwrap();
        let m = with_system_note(vec![dev, user.clone()], &note);
        let Message::Developer(d) = &m[0] else {
            panic!("{m:?}")
        };
        assert_eq!(
            d.content,
            MessageContent::Parts(vec![
                ContentPart::Text {
                    text: "Be brief.".into()
                },
                ContentPart::Text { text: note.clone() }
            ])
        );
        // A system message later in the conversation is not the instruction.
        let m = with_system_note(vec![user.clone(), Message::system("later")], &note);
        assert_eq!(m[0], Message::system(note.as_str()));
        assert_eq!(m.len(), 3);
    }

    use super::*;
    use serde_json::json;

    fn message(v: Value) -> Result<Message, String> {
        serde_json::from_value::<Message>(v).map_err(|e| e.to_string())
    }

    /// What the OpenAI SDK sends when a client appends a response's message to its history passes (fields
    /// no message has are ignored, as OpenAI does in messages), keeping what carries the turn; a field no
    /// tool has is refused by name: there a misspelling would drop a constraint.
    #[test]
    fn nested_fields_are_kept_or_refused_by_name() {
        let m = message(
            json!({"role": "assistant", "content": "Hi.", "refusal": null, "audio": null,
            "function_call": null, "annotations": [], "parsed": null, "tool_calls": [{"index": 0,
            "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}",
            "parsed_arguments": {}}}]}),
        )
        .unwrap();
        let Message::Assistant(a) = m else { panic!() };
        assert_eq!(a.tool_calls.unwrap()[0].function.name, "f");
        // A refusal is what the model said: the turn's text.
        let m =
            message(json!({"role": "assistant", "content": null, "refusal": "I can't."})).unwrap();
        assert_eq!(m.to_value()["content"], "I can't.");
        for (bad, says) in [
            (
                json!({"role": "assistant", "content": "x", "audio": {"id": "a1"}}),
                "audio:",
            ),
            (
                json!({"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}),
                "function_call:",
            ),
            (
                json!({"role": "assistant", "content": "x", "refusal": 3}),
                "refusal:",
            ),
        ] {
            let e = message(bad.clone()).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let tool =
            |f: Value| serde_json::from_value::<Tool>(json!({"type": "function", "function": f}));
        assert!(
            tool(json!({"name": "f", "paramters": {}}))
                .unwrap_err()
                .to_string()
                .contains("paramters")
        );
    }

    /// A `schema` beside `json_object` (llama-server's form) is a schema to follow; anything else beside a
    /// format is refused by name.
    #[test]
    fn response_formats_keep_what_they_carry() {
        let rf = |v: Value| serde_json::from_value::<ResponseFormat>(v).map_err(|e| e.to_string());
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}}});
        assert_eq!(
            rf(json!({"type": "json_object", "schema": schema})).unwrap(),
            ResponseFormat::json_schema("json_object", schema.clone(), false)
        );
        assert_eq!(
            rf(json!({"type": "json_object"})).unwrap(),
            ResponseFormat::JsonObject
        );
        assert_eq!(rf(json!({"type": "text"})).unwrap(), ResponseFormat::Text);
        let e = rf(json!({"type": "json_schema", "json_schema": {"name": "n", "shema": schema}}))
            .unwrap_err();
        assert!(e.starts_with("json_schema.shema: "), "{e}");
        let e = rf(json!({"type": "text", "strict": true})).unwrap_err();
        assert!(e.starts_with("strict: "), "{e}");
        let e = rf(json!({"type": "yaml"})).unwrap_err();
        assert!(e.starts_with("type: "), "{e}");
    }

    #[test]
    fn paths_join_into_one_field_name() {
        assert_eq!(join_path(".", "content: bad"), "content: bad");
        assert_eq!(join_path("content", "[1]: bad"), "content[1]: bad");
        assert_eq!(
            join_path("messages[2]", "content[1]: bad"),
            "messages[2].content[1]: bad"
        );
        assert_eq!(
            join_path("messages[2]", "bad thing"),
            "messages[2]: bad thing"
        );
        assert_eq!(join_path(".", "plain"), "plain");
        // A message that merely contains ": " is not taken for a path.
        assert_eq!(split_path("expected `,` or `}`: at line 1"), None);
    }

    #[test]
    fn messages_read_by_role_and_name_the_bad_field() {
        let m: Message = serde_json::from_value(json!({"role": "assistant", "content": null,
            "tool_calls": [{"id": "c1", "type": "function",
                            "function": {"name": "f", "arguments": {"x": 1}}}]}))
        .unwrap();
        let Message::Assistant(a) = &m else {
            panic!("{m:?}")
        };
        assert_eq!(
            a.tool_calls.as_ref().unwrap()[0].function.arguments,
            r#"{"x":1}"#
        );
        let err = |v: Value| {
            serde_json::from_value::<Message>(v)
                .unwrap_err()
                .to_string()
        };
        assert!(err(json!({"role": "bot", "content": "x"})).starts_with("role: must be one of"));
        let e = err(
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "video"}]}),
        );
        assert!(
            e.starts_with("content[1].type: unknown variant `video`"),
            "{e}"
        );
        let e = err(
            json!({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}),
        );
        assert!(
            e.starts_with("tool_calls[0].function.arguments: arguments are not JSON"),
            "{e}"
        );
        assert!(err(json!({"role": "user"})).contains("missing field `content`"));
        // The bare-string image form some clients send.
        let m: Message = serde_json::from_value(json!({"role": "user", "content": [
            {"type": "image_url", "image_url": "https://example.com/a.png"}]}))
        .unwrap();
        assert_eq!(
            m.content().unwrap().images().next().unwrap().url,
            "https://example.com/a.png"
        );
        // What the template sees: the role tag back, absent options left out.
        assert_eq!(
            Message::user("hi").to_value(),
            json!({"role": "user", "content": "hi"})
        );
    }

    #[test]
    fn tool_choice_and_response_format_read_openai_forms() {
        let tc = |v: Value| serde_json::from_value::<ToolChoice>(v);
        assert_eq!(tc(json!("required")).unwrap(), ToolChoice::Required);
        assert_eq!(
            tc(json!({"type": "function", "function": {"name": "f"}})).unwrap(),
            ToolChoice::Function("f".into())
        );
        assert!(tc(json!("sometimes")).is_err());
        assert_eq!(
            serde_json::to_value(ToolChoice::Function("f".into())).unwrap()["function"]["name"],
            "f"
        );
        let rf: ResponseFormat = serde_json::from_value(json!({"type": "json_schema",
            "json_schema": {"name": "city", "schema": {"type": "object"}, "strict": true}}))
        .unwrap();
        assert_eq!(
            rf,
            ResponseFormat::json_schema("city", json!({"type": "object"}), true)
        );
        assert!(serde_json::from_value::<ResponseFormat>(json!({"type": "yaml"})).is_err());
    }
}
