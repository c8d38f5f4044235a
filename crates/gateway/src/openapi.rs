//! `GET /openapi.json`: the gateway's OpenAPI 3.1 description, generated (utoipa) from the wire types in
//! [`jemma_router::api`] and the Anthropic and Responses request types, so that it cannot drift from what
//! the handlers read and write. Clients generate SDKs from it; the suite fuzzes the gateway against it
//! (schemathesis). The operations are described here rather than on the handlers, which stay thin.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use jemma_router::anthropic::MessagesRequest;
use jemma_router::api::{
    ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, CompletionRequest, ErrorResponse,
    Limits, Model, ModelList, TextCompletion,
};
use jemma_router::responses::ResponsesRequest;
use serde_json::Value;
use utoipa::OpenApi;

use crate::AppState;

/// The description's root.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Jemma",
        description = "A private AI node: Gemma 4 served locally (MLX, llama.cpp) behind an \
                       OpenAI-compatible gateway, with Anthropic's Messages and OpenAI's Responses APIs \
                       on the same tiers. `model` is a tier (`fast`, `primary`, `heavy`), a model id, or \
                       `auto`."
    ),
    paths(
        chat_completions,
        completions,
        messages,
        count_tokens,
        responses,
        models,
        model,
        health
    ),
    components(schemas(ChatCompletionChunk))
)]
pub struct ApiDoc;

/// `GET /openapi.json`: the description, with this gateway's configured limits (`[limits]`) written into
/// the request schemas, so that a client (or a fuzzer) knows them before a 400 tells it.
pub async fn openapi_json(State(state): State<AppState>) -> Response {
    axum::Json(described(&state.limits)).into_response()
}

/// [`ApiDoc`] as JSON, with `limits` as the schemas' bounds.
pub fn described(limits: &Limits) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let schemas = &mut doc["components"]["schemas"];
    for (schema, field) in [
        ("ChatCompletionRequest", "max_tokens"),
        ("ChatCompletionRequest", "max_completion_tokens"),
        ("CompletionRequest", "max_tokens"),
    ] {
        if let Some(p) = schemas[schema]["properties"][field].as_object_mut() {
            p.insert("maximum".into(), limits.max_tokens_ceiling.into());
        }
    }
    // A field these bodies do not define is refused (400): the description says so, so that a client
    // or a fuzzer does not take an extra field for one that is read. OpenAI's fields that ask for nothing
    // left undone are accepted with the values that ask for nothing (`refuse_extra` in
    // jemma_router::api::request), and described with those values only.
    let nothing_asked = |values: Value, what: &str| serde_json::json!({"enum": values, "description": format!("Accepted as OpenAI's: {what}.")});
    let string = |what: &str| serde_json::json!({"type": ["string", "null"], "description": format!("Accepted as OpenAI's: {what}.")});
    let accepted = [
        (
            "ChatCompletionRequest",
            vec![
                (
                    "store",
                    nothing_asked(serde_json::json!([false, null]), "no completion is kept"),
                ),
                (
                    "metadata",
                    serde_json::json!({"type": ["object", "null"],
                        "description": "Accepted as OpenAI's: kept only with a stored completion, and none is."}),
                ),
                (
                    "service_tier",
                    nothing_asked(
                        serde_json::json!(["auto", "default", null]),
                        "one service tier",
                    ),
                ),
                (
                    "prompt_cache_key",
                    string("a hint; the prefix cache needs no key"),
                ),
                (
                    "prompt_cache_retention",
                    string("a hint; the prefix cache keeps what fits"),
                ),
                ("safety_identifier", string("not used")),
                (
                    "modalities",
                    nothing_asked(serde_json::json!([["text"], null]), "the answer is text"),
                ),
                (
                    "verbosity",
                    nothing_asked(serde_json::json!(["medium", null]), "the model's own"),
                ),
                (
                    "functions",
                    serde_json::json!({"type": ["array", "null"], "maxItems": 0,
                    "description": "Deprecated; accepted empty only: send tools."}),
                ),
                (
                    "function_call",
                    nothing_asked(
                        serde_json::json!(["none", "auto", null]),
                        "with no functions",
                    ),
                ),
            ],
        ),
        (
            "CompletionRequest",
            vec![
                (
                    "best_of",
                    nothing_asked(serde_json::json!([1, null]), "one completion"),
                ),
                (
                    "suffix",
                    nothing_asked(serde_json::json!(["", null]), "no insertion"),
                ),
            ],
        ),
    ];
    for (schema, fields) in accepted {
        if let Some(s) = schemas[schema].as_object_mut() {
            s.insert("additionalProperties".into(), false.into());
        }
        if let Some(p) = schemas[schema]["properties"].as_object_mut() {
            for (name, v) in fields {
                p.insert(name.into(), v);
            }
        }
    }
    if let Some(p) = schemas["ChatCompletionRequest"]["properties"]["messages"].as_object_mut() {
        p.insert("maxItems".into(), limits.max_messages.into());
    }
    // A stream's schema is that of each server-sent event (OpenAPI 3.2's reading of
    // `text/event-stream`): `{event, data}` where `data` is the chunk's JSON as a string, or the OpenAI
    // streams' closing `[DONE]`.
    // utoipa can only say "this type", so the chunk type is moved into `data`'s `contentSchema`.
    if let Some(paths) = doc["paths"].as_object_mut() {
        for op in paths.values_mut().filter_map(Value::as_object_mut) {
            for method in op.values_mut() {
                if let Some(sse) =
                    method.pointer_mut("/responses/200/content/text~1event-stream/schema")
                {
                    *sse = serde_json::json!({
                        "type": "object",
                        "required": ["data"],
                        "properties": {
                            "event": {"type": "string"},
                            "id": {"type": "string"},
                            "data": {"anyOf": [
                                {"const": "[DONE]"},
                                {
                                    "type": "string",
                                    "contentMediaType": "application/json",
                                    "contentSchema": sse.take(),
                                },
                            ]},
                        },
                    });
                }
            }
        }
    }
    doc
}

/// The errors of the OpenAI-shaped operations, in OpenAI's shape ([`ErrorResponse`]).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum OpenAiErrors {
    /// The request is invalid; `param` names the field (`messages[2].content[1].type`).
    #[response(status = 400)]
    BadRequest(ErrorResponse),
    /// An API key is required, or the one given is invalid.
    #[response(status = 401)]
    Unauthorized(ErrorResponse),
    /// No such model or tier.
    #[response(status = 404)]
    NotFound(ErrorResponse),
    /// The body, or an image in it, is too large.
    #[response(status = 413)]
    TooLarge(ErrorResponse),
    /// The caller's rate limit, or a busy tier (`Retry-After`).
    #[response(status = 429)]
    TooMany(ErrorResponse),
    /// The gateway's configuration is broken.
    #[response(status = 500)]
    Internal(ErrorResponse),
    /// No tier can answer (`Retry-After` when one said when it may).
    #[response(status = 503)]
    Unavailable(ErrorResponse),
    /// The tier timed out.
    #[response(status = 504)]
    Timeout(ErrorResponse),
}

/// The errors of the Anthropic-shaped operations: `{"type": "error", "error": {"type", "message"}}`.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum AnthropicErrors {
    /// `invalid_request_error`.
    #[response(status = 400)]
    BadRequest(serde_json::Value),
    /// `authentication_error`.
    #[response(status = 401)]
    Unauthorized(serde_json::Value),
    /// `not_found_error`.
    #[response(status = 404)]
    NotFound(serde_json::Value),
    /// `request_too_large`.
    #[response(status = 413)]
    TooLarge(serde_json::Value),
    /// `rate_limit_error`.
    #[response(status = 429)]
    TooMany(serde_json::Value),
    /// `api_error`: the gateway's configuration is broken.
    #[response(status = 500)]
    Internal(serde_json::Value),
    /// `api_error`: no tier can answer.
    #[response(status = 503)]
    Unavailable(serde_json::Value),
    /// `timeout_error`.
    #[response(status = 504)]
    Timeout(serde_json::Value),
    /// `overloaded_error`: the tier is busy.
    #[response(status = 529)]
    Overloaded(serde_json::Value),
}

/// A chat answer: JSON, or with `stream: true` server-sent `chat.completion.chunk` events ending in
/// `data: [DONE]`.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The answer (JSON), or its chunks (server-sent events)",
         content((ChatCompletion = "application/json"), (ChatCompletionChunk = "text/event-stream"))),
        OpenAiErrors,
    )
)]
#[allow(dead_code)]
fn chat_completions() {}

/// A plain-prompt completion (no chat template): JSON, or server-sent `text_completion` chunks.
#[utoipa::path(
    post,
    path = "/v1/completions",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion (JSON), or its chunks (server-sent events)",
         content((TextCompletion = "application/json"), (TextCompletion = "text/event-stream"))),
        OpenAiErrors,
    )
)]
#[allow(dead_code)]
fn completions() {}

/// Anthropic's Messages API on the same tiers: a `message` object, or named server-sent events
/// (`message_start` … `message_stop`). Errors are in Anthropic's shape (`{"type": "error", "error": {…}}`).
#[utoipa::path(
    post,
    path = "/v1/messages",
    request_body = MessagesRequest,
    responses(
        (status = 200, description = "The message (JSON), or its events (server-sent events)",
         content((Object = "application/json"), (String = "text/event-stream"))),
        AnthropicErrors,
    )
)]
#[allow(dead_code)]
fn messages() {}

/// How many input tokens a Messages request's prompt takes: `{"input_tokens": n}`, counted with the
/// tier's own tokenizer and chat template.
#[utoipa::path(
    post,
    path = "/v1/messages/count_tokens",
    request_body = MessagesRequest,
    responses(
        (status = 200, description = "`{\"input_tokens\": n}`", body = Object),
        AnthropicErrors,
    )
)]
#[allow(dead_code)]
fn count_tokens() {}

/// OpenAI's Responses API, stateless: a `response` object, or named server-sent events
/// (`response.created` … `response.completed`).
#[utoipa::path(
    post,
    path = "/v1/responses",
    request_body = ResponsesRequest,
    responses(
        (status = 200, description = "The response (JSON), or its events (server-sent events)",
         content((Object = "application/json"), (String = "text/event-stream"))),
        OpenAiErrors,
    )
)]
#[allow(dead_code)]
fn responses() {}

/// The tiers, as models.
#[utoipa::path(
    get,
    path = "/v1/models",
    responses(
        (status = 200, description = "One entry per tier", body = ModelList),
        (status = 401, description = "An API key is required or invalid", body = ErrorResponse),
    )
)]
#[allow(dead_code)]
fn models() {}

/// One tier, as a model.
#[utoipa::path(
    get,
    path = "/v1/models/{id}",
    params(("id" = String, Path, description = "A tier: fast, primary or heavy")),
    responses(
        (status = 200, description = "The tier", body = Model),
        (status = 401, description = "An API key is required or invalid", body = ErrorResponse),
        (status = 404, description = "No such tier", body = ErrorResponse),
    )
)]
#[allow(dead_code)]
fn model() {}

/// Each tier's state, breaker, model, last error and speed; 503 when no tier can serve.
#[utoipa::path(
    get,
    path = "/health",
    responses(
        (status = 200, description = "`{status, jemma: {version}, tiers: {<tier>: {...}}, memory}`; `jemma` identifies a Jemma node to its peers; a pooled tier lists its endpoints in `tiers.<tier>.backend.details.endpoints`", body = Object),
        (status = 503, description = "No tier can serve", body = Object),
    )
)]
#[allow(dead_code)]
fn health() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_names_every_operation_and_its_schemas() {
        let limits = Limits {
            max_tokens_ceiling: 64,
            ..Default::default()
        };
        let doc = described(&limits);
        assert_eq!(
            doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["max_tokens"]["maximum"],
            64
        );
        // The bodies refuse fields they do not define, and say so; the catch-all that finds them is not
        // a field.
        let chat = &doc["components"]["schemas"]["ChatCompletionRequest"];
        assert_eq!(chat["additionalProperties"], false);
        assert!(chat["properties"]["reasoning_effort"].is_object());
        assert!(chat["properties"].get("extra").is_none());
        assert_eq!(
            chat["properties"]["store"]["enum"],
            serde_json::json!([false, null])
        );
        assert_eq!(
            doc["components"]["schemas"]["CompletionRequest"]["additionalProperties"],
            false
        );
        for p in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/messages",
            "/v1/messages/count_tokens",
            "/v1/responses",
            "/v1/models",
            "/health",
        ] {
            assert!(doc["paths"][p].is_object(), "{p} missing");
        }
        let schemas = &doc["components"]["schemas"];
        for s in [
            "ChatCompletionRequest",
            "Message",
            "ChatCompletion",
            "ChatCompletionChunk",
            "Usage",
        ] {
            assert!(schemas[s].is_object(), "{s} missing");
        }
        // A stream is described event by event: each one's data is the chunk, as JSON text.
        let sse = &doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]
            ["schema"];
        assert_eq!(
            sse["properties"]["data"]["anyOf"][1]["contentSchema"]["$ref"],
            "#/components/schemas/ChatCompletionChunk"
        );
        assert!(
            doc["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]
                .get("text/event-stream")
                .is_none()
        );
        // Messages are told apart by role, as the wire does.
        let message = serde_json::to_string(&schemas["Message"]).unwrap();
        assert!(
            message.contains("\"role\"") && message.contains("assistant"),
            "{message}"
        );
    }
}
