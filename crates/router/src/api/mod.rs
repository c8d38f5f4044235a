//! OpenAI's wire format, typed, in one place: request bodies with typed messages ([`message`]), their
//! validation into the [`ChatRequest`] backends receive ([`request`]), and answers, stream chunks, usage
//! and errors ([`response`]). The gateway, the upstream backend and the tests all use these types, and
//! the OpenAPI description served at `/openapi.json` is generated from them (utoipa's `ToSchema`).
//!
//! Jemma writes these types itself rather than using a client crate's (async-openai's), as vLLM, TGI
//! and mistral.rs do: a server must accept what clients actually send (arguments as objects, `developer`
//! messages, vLLM's extensions), name the bad field in a 400, and describe the result as OpenAPI.

pub mod message;
pub mod request;
pub mod response;

pub use message::{
    AssistantMessage, ContentPart, FunctionCall, FunctionDefinition, FunctionType, ImageUrl,
    InputAudio, InstructionMessage, JsonSchemaFormat, Message, MessageContent, ResponseFormat,
    Tool, ToolCall, ToolChoice, ToolMessage, UserMessage, VideoUrl, with_system_note,
};
pub use request::{
    ChatCompletionRequest, ChatRequest, CompletionRequest, Limits, Stop, StreamOptions,
};
pub use response::{
    ChatCompletion, ChatCompletionChunk, Choice, ChoiceLogprobs, ChunkChoice, CompletionLogprobs,
    CompletionTokensDetails, Delta, ErrorObject, ErrorResponse, FunctionCallDelta, Model,
    ModelList, PromptTokensDetails, ResponseMessage, Routing, Speculation, TextChoice,
    TextCompletion, TextOffsets, ToolCallDelta, Usage, VideoSeen, VideoSound,
};

/// Seconds since the Unix epoch: the `created` of every answer, in each API (0 on a clock before 1970).
pub fn unix_now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
