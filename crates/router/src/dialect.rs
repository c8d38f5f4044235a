//! What an OpenAI-compatible upstream calls the fields OpenAI's API has no name for, and which fields it
//! reads at all.
//!
//! Jemma takes, besides OpenAI's own fields, `top_k`, `min_p`, `repetition_penalty`, Gemma 4's thinking
//! switch (`enable_thinking`, `chat_template_kwargs.enable_thinking`) and `thinking_token_budget`, under
//! vLLM's names. Upstream servers differ in what they read:
//!
//! - another Jemma node reads everything Jemma reads;
//! - vLLM reads those names as they are (`protocol.py`), SGLang all but the budget;
//! - llama-server reads `repeat_penalty` for `repetition_penalty`, over its last `repeat_last_n` tokens (64
//!   unless its command line says otherwise; Jemma's engines use mlx-lm's 20), and `thinking_budget_tokens`
//!   for the budget (`tools/server/server-common.cpp`, `server-task.cpp`);
//! - OpenAI refuses keys it does not know;
//! - Ollama's OpenAI endpoint reads neither those nor `logit_bias`, `tool_choice` or
//!   `parallel_tool_calls` (`openai/openai.go`), and ignores what it does not read.
//!
//! None of them but a Jemma node shows a `json_schema` format's `description` to its model except OpenAI.
//!
//! vLLM does not constrain a call that `tool_choice` forces (`required`, or a named function) when its tool
//! parser reads a model's own call syntax, as Gemma 4's does (`supports_required_and_named = False`,
//! `tool_parsers/gemma4_engine_tool_parser.py`, 0.32): the model may answer without the call. So a vLLM
//! upstream is asked for the call as JSON under its structured outputs, as vLLM itself asks parsers that
//! read JSON ([`ForcedCall`]), and the gateway turns that JSON back into the call.
//!
//! An upstream that ignores a field the client set would break the API's promise that a field accepted
//! is a field honoured. So each upstream tier speaks a [`Dialect`]: the fields are sent under its names,
//! a format's description goes into the system instruction where the server would not show it
//! ([`Dialect::shows_format_description`]), and a field it does not read is refused with a 400 naming it
//! before anything is sent ([`Dialect::unread_fields`]; an automatic route moves on to a tier that reads
//! it). `auto` (the default) learns the dialect from the upstream's `GET /v1/models` (`owned_by`:
//! [`Dialect::from_owned_by`]); a server it does not know is taken as OpenAI's, which refuses rather than
//! drops.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::RouterError;
use crate::api::{ChatRequest, ToolChoice};

/// Which fields an OpenAI-compatible upstream reads, and under which names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dialect {
    /// Learned from the upstream's `GET /v1/models` ([`Dialect::from_owned_by`]) the first time it
    /// matters.
    #[default]
    Auto,
    /// Another Jemma node: every field as Jemma took it.
    Jemma,
    /// vLLM: every field as Jemma took it (Jemma's names are vLLM's).
    Vllm,
    /// SGLang: as vLLM, but it has no thinking budget.
    Sglang,
    /// llama-server: `repeat_penalty` and `repeat_last_n`, `thinking_budget_tokens`.
    LlamaServer,
    /// Ollama's OpenAI endpoint: OpenAI's fields but `logit_bias`, `tool_choice` (other than `auto` or
    /// `none`) and `parallel_tool_calls: false`.
    Ollama,
    /// OpenAI's fields only (OpenAI, and any server not known to read more): `reasoning_effort` goes as it
    /// came.
    Openai,
}

impl Dialect {
    /// The dialect of a server whose `/v1/models` entries say `owned_by`: llama-server `llamacpp`, vLLM
    /// `vllm`, SGLang `sglang`, Jemma `jemma`, Ollama `library` (its own models' namespace) or `ollama`;
    /// anything else is OpenAI's, which refuses a field it cannot honour rather than dropping it. Never
    /// [`Dialect::Auto`].
    pub fn from_owned_by(owned_by: &str) -> Dialect {
        match owned_by.to_ascii_lowercase().as_str() {
            "llamacpp" | "llama.cpp" | "llama-cpp" => Dialect::LlamaServer,
            "vllm" => Dialect::Vllm,
            "sglang" => Dialect::Sglang,
            "jemma" => Dialect::Jemma,
            "library" | "ollama" => Dialect::Ollama,
            _ => Dialect::Openai,
        }
    }

    /// The name the configuration and `/health` use (`auto`, `jemma`, `vllm`, `sglang`, `llama-server`,
    /// `ollama`, `openai`).
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Auto => "auto",
            Dialect::Jemma => "jemma",
            Dialect::Vllm => "vllm",
            Dialect::Sglang => "sglang",
            Dialect::LlamaServer => "llama-server",
            Dialect::Ollama => "ollama",
            Dialect::Openai => "openai",
        }
    }

    /// Whether the server shows a `json_schema` format's `description` to its model itself (a Jemma node,
    /// OpenAI, and a dialect not learned yet, which is sent the request as it came); where it does not,
    /// the gateway puts it into the system instruction ([`crate::api::ResponseFormat::instruction`]).
    pub fn shows_format_description(self) -> bool {
        matches!(self, Dialect::Auto | Dialect::Jemma | Dialect::Openai)
    }

    /// The fields `req` sets that this dialect's server does not read, by the name the client used (empty
    /// for [`Dialect::Auto`], not learned yet).
    pub fn unread_fields(self, req: &ChatRequest) -> Vec<&'static str> {
        match self {
            Dialect::Auto | Dialect::Jemma | Dialect::LlamaServer => vec![],
            // A forced call is asked for as JSON ([`ForcedCall`]); a strict function's call the model
            // opens itself is not constrained by vLLM's Gemma 4 tool parser (it has no structural tag).
            // A JSON format holds the whole answer there: with tools under `auto` no call could start,
            // and a forced call is itself asked for as the format.
            Dialect::Vllm => {
                let mut out = vec![];
                if strict_unforced(req) {
                    out.push("tools.function.strict");
                }
                if req.response_format != crate::api::ResponseFormat::Text {
                    if !unforced_tools(req).is_empty() {
                        out.push("response_format");
                    } else if forces_a_call(req) {
                        out.push("tool_choice");
                    }
                }
                out
            }
            Dialect::Sglang => req
                .thinking_token_budget
                .map(|_| vec!["thinking_token_budget"])
                .unwrap_or_default(),
            Dialect::Openai => extension_fields(req),
            Dialect::Ollama => {
                let mut out = extension_fields(req);
                if !req.logit_bias.is_empty() {
                    out.push("logit_bias");
                }
                if matches!(
                    req.tool_choice,
                    Some(ToolChoice::Required | ToolChoice::Function(_))
                ) {
                    out.push("tool_choice");
                }
                if req.parallel_tool_calls == Some(false) {
                    out.push("parallel_tool_calls");
                }
                out
            }
        }
    }

    /// Rewrites `body`, the upstream request built from `req` under Jemma's (vLLM's) names, into this
    /// dialect's names. [`Dialect::Auto`] (not learned yet) leaves it as it is. Returns the call that
    /// `tool_choice` forces where the server is asked for it as JSON ([`Dialect::forced_call`]): its answer
    /// is to be read back with [`ForcedCall::calls`].
    ///
    /// Errors: a field `req` sets that this dialect's server does not read, as a 400 naming it (the first,
    /// in the order of [`Dialect::unread_fields`]); those of [`Dialect::forced_call`].
    pub fn adapt(
        self,
        req: &ChatRequest,
        body: &mut Map<String, Value>,
    ) -> Result<Option<ForcedCall>, RouterError> {
        if let Some(param) = self.unread_fields(req).first() {
            let why = match (self, *param) {
                (Dialect::Vllm, "response_format") => {
                    "applies it to the whole answer, so none of the tools offered under tool_choice \
                     auto could be called"
                }
                (Dialect::Vllm, "tool_choice") => {
                    "is asked for a forced call as its response format, so it cannot follow \
                     response_format as well"
                }
                _ => "does not read it, so it would not be honoured there",
            };
            return Err(RouterError::invalid(
                format!(
                    "{param}: this tier's upstream ({} dialect) {why}; leave it out, name a tier that \
                     reads it (a local one), or set the tier's `dialect` if its server does read it{}",
                    self.as_str(),
                    match *param {
                        "enable_thinking" =>
                            " (set by enable_thinking, chat_template_kwargs, or Anthropic's thinking or effort; OpenAI's own is reasoning_effort)",
                        "thinking_token_budget" => " (also Anthropic's thinking.budget_tokens)",
                        "tools.function.strict" =>
                            " (a call the model opens itself is not constrained there; a call tool_choice forces is)",
                        "response_format" =>
                            " (or send tool_choice \"none\" to answer in the format, or force the call)",
                        _ => "",
                    }
                ),
                param,
            ));
        }
        match self {
            Dialect::Auto | Dialect::Jemma | Dialect::Sglang => {}
            Dialect::Vllm => {
                let forced = self.forced_call(req)?;
                if let Some(forced) = &forced {
                    // The tools stay in the prompt (vLLM renders them under `none` too, unless started
                    // with --exclude-tools-when-tool-choice-none); the call comes as the answer's JSON.
                    body.insert("tool_choice".into(), Value::String("none".into()));
                    body.insert(
                        "response_format".into(),
                        serde_json::json!({"type": "json_schema", "json_schema": {
                            "name": forced.function.as_deref().unwrap_or("tool_calls"),
                            "schema": forced.schema, "strict": true}}),
                    );
                }
                return Ok(forced);
            }
            Dialect::LlamaServer => {
                if let Some(p) = body.remove("repetition_penalty") {
                    body.insert("repeat_penalty".into(), p);
                }
                if let Some(b) = body.remove("thinking_token_budget") {
                    body.insert("thinking_budget_tokens".into(), b);
                }
                // Jemma's penalties look at the last 20 tokens (mlx-lm's window, which both engines use);
                // llama-server's at its `repeat_last_n`, 64 unless its command line says otherwise.
                if req.has_penalties() {
                    body.insert(
                        "repeat_last_n".into(),
                        jemma_chat::sampling::SamplingParams::default()
                            .penalty_context
                            .into(),
                    );
                }
            }
            Dialect::Openai | Dialect::Ollama => {
                // What OpenAI has no name for, at its neutral value, is left out (OpenAI refuses an
                // unknown key even as 0 or null); the thinking switch goes as the effort it came as.
                for k in [
                    "top_k",
                    "min_p",
                    "repetition_penalty",
                    "chat_template_kwargs",
                ] {
                    body.remove(k);
                }
                if let Some(e) = &req.reasoning_effort {
                    body.insert("reasoning_effort".into(), Value::String(e.clone()));
                }
            }
        }
        Ok(None)
    }
}

/// A call `tool_choice` forces, asked of a server as JSON under its structured outputs (a `json_schema`
/// response format) where the server would not force it itself ([`Dialect::forced_call`]); the answer's
/// JSON is read back into the call by [`ForcedCall::calls`].
#[derive(Debug, Clone, PartialEq)]
pub struct ForcedCall {
    /// The function `tool_choice` names (the answer is its arguments); None: `required` (the answer is
    /// `[{"name": ..., "parameters": {...}}, ...]`, one item or more: any of the tools).
    pub function: Option<String>,
    /// The JSON Schema the answer follows: the named function's `parameters`, or for `required` vLLM's
    /// own (`_get_json_schema_from_tools`, `vllm/tool_parsers/utils.py`): an array of at least one (at most
    /// one under `parallel_tool_calls: false`) of the tools' `{name, parameters}`, their `$defs` merged at
    /// the top.
    pub schema: Value,
}

impl ForcedCall {
    /// The calls in `text`, the upstream's answer, as (name, arguments as compact JSON); None when it is
    /// not such JSON (cut short: by `max_tokens`, the answer then goes to the client as content, as an
    /// in-process engine's cut call does; otherwise the upstream did not honour the call).
    pub fn calls(&self, text: &str) -> Option<Vec<(String, String)>> {
        match &self.function {
            Some(name) => match serde_json::from_str::<Value>(text.trim()) {
                Ok(args @ Value::Object(_)) => Some(vec![(name.clone(), args.to_string())]),
                _ => None,
            },
            None => {
                #[derive(Deserialize)]
                struct Call {
                    name: String,
                    #[serde(default)]
                    parameters: Value,
                }
                let calls: Vec<Call> = serde_json::from_str(text.trim()).ok()?;
                (!calls.is_empty()).then(|| {
                    calls
                        .into_iter()
                        .map(|c| {
                            let args = match c.parameters {
                                Value::Null => Value::Object(Map::new()),
                                v => v,
                            };
                            (c.name, args.to_string())
                        })
                        .collect()
                })
            }
        }
    }
}

impl Dialect {
    /// The call `req`'s `tool_choice` forces, where this dialect's server is asked for it as JSON (vLLM:
    /// see the module's docs); None where the server is sent `tool_choice` as it came, or nothing is
    /// forced.
    ///
    /// Errors (400, naming the field): a forced call with a `response_format` too (the call is that
    /// format here); `required` with tools whose `$defs` give one name two schemas.
    pub fn forced_call(self, req: &ChatRequest) -> Result<Option<ForcedCall>, RouterError> {
        if self != Dialect::Vllm {
            return Ok(None);
        }
        let tools = req.tools.as_deref().unwrap_or_default();
        // No parameters, or `{}`, is a function without arguments (as vLLM reads it): an empty object.
        let parameters = |t: &crate::api::Tool| match &t.function.parameters {
            Some(Value::Object(p)) if !p.is_empty() => Value::Object(p.clone()),
            _ => serde_json::json!({"type": "object", "properties": {}}),
        };
        let function = match &req.tool_choice {
            Some(ToolChoice::Function(name)) => Some(name.clone()),
            Some(ToolChoice::Required) => None,
            _ => return Ok(None),
        };
        if tools.is_empty() {
            return Ok(None);
        }
        if req.response_format != crate::api::ResponseFormat::Text {
            return Err(RouterError::invalid(
                "tool_choice: this tier's upstream (vllm dialect) is asked for a forced call as its \
                 response format, so it cannot follow response_format as well; leave one out, or name a \
                 tier that reads both (a local one)",
                "tool_choice",
            ));
        }
        let schema = match &function {
            Some(name) => match tools.iter().find(|t| &t.function.name == name) {
                Some(t) => parameters(t),
                None => return Ok(None),
            },
            None => {
                let mut defs = Map::new();
                let mut items = vec![];
                for t in tools {
                    let mut params = parameters(t);
                    match params.as_object_mut().and_then(|p| p.remove("$defs")) {
                        None => {}
                        Some(Value::Object(d)) => {
                            for (k, v) in d {
                                if defs.get(&k).is_some_and(|old| old != &v) {
                                    return Err(RouterError::invalid(
                                        format!(
                                            "tools: two tools define $defs/{k} differently; a forced \
                                         call on this tier's upstream (vllm dialect) needs one schema \
                                         for all"
                                        ),
                                        "tools",
                                    ));
                                }
                                defs.insert(k, v);
                            }
                        }
                        Some(_) => {
                            return Err(RouterError::invalid(
                                format!(
                                    "tools: {}'s parameters have a $defs that is not an object",
                                    t.function.name
                                ),
                                "tools",
                            ));
                        }
                    }
                    items.push(serde_json::json!({
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "enum": [t.function.name]},
                            "parameters": params
                        },
                        "required": ["name", "parameters"]
                    }));
                }
                let mut schema = serde_json::json!({
                    "type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}
                });
                if req.parallel_tool_calls == Some(false) {
                    schema["maxItems"] = 1.into();
                }
                if !defs.is_empty() {
                    schema["$defs"] = Value::Object(defs);
                }
                schema
            }
        };
        Ok(Some(ForcedCall { function, schema }))
    }
}

/// Whether `req` sets anything dialects name or read differently (so that an upstream's dialect must be
/// known before it is sent): one of the fields OpenAI lacks (even at its neutral value: OpenAI refuses the
/// key), a penalty (llama-server's window differs), a thinking switch, a format description, or one of
/// the fields vLLM or Ollama does not read.
pub fn depends_on_dialect(req: &ChatRequest) -> bool {
    !Dialect::Vllm.unread_fields(req).is_empty()
        || req.top_k.is_some()
        || req.min_p.is_some()
        || req.repetition_penalty.is_some()
        || req.thinking_token_budget.is_some()
        || req.enable_thinking.is_some()
        || req.has_penalties()
        || req.response_format.instruction().is_some()
        || !Dialect::Ollama.unread_fields(req).is_empty()
}

/// Whether `req`'s tools are the model's to call or not: a `tool_choice` of `auto`, or none given.
fn unforced_tools(req: &ChatRequest) -> &[crate::api::Tool] {
    match req.tool_choice {
        Some(ToolChoice::None | ToolChoice::Required | ToolChoice::Function(_)) => &[],
        _ => req.tools.as_deref().unwrap_or_default(),
    }
}

/// Whether `req` offers a `strict` function under a `tool_choice` that does not force a call (`auto`, or
/// none given): the call's arguments are enforced from the moment the model opens it.
fn strict_unforced(req: &ChatRequest) -> bool {
    unforced_tools(req)
        .iter()
        .any(|t| t.function.strict == Some(true))
}

/// Whether `tool_choice` forces a call (`required` or a named function) of tools `req` offers.
fn forces_a_call(req: &ChatRequest) -> bool {
    matches!(
        req.tool_choice,
        Some(ToolChoice::Required | ToolChoice::Function(_))
    ) && req.tools.as_deref().is_some_and(|t| !t.is_empty())
}

/// The fields `req` sets, to other than their neutral value, that OpenAI's API has no name for, by the
/// name the client used: `top_k` (above 0), `min_p` (above 0), `repetition_penalty` (other than 1),
/// `thinking_token_budget`, and `enable_thinking` when the thinking switch did not come from
/// `reasoning_effort` (OpenAI's name for it).
pub fn extension_fields(req: &ChatRequest) -> Vec<&'static str> {
    let mut out = vec![];
    if req.top_k.is_some_and(|k| k > 0) {
        out.push("top_k");
    }
    if req.min_p.is_some_and(|p| p > 0.0) {
        out.push("min_p");
    }
    if req.repetition_penalty.is_some_and(|p| p != 1.0) {
        out.push("repetition_penalty");
    }
    if req.thinking_token_budget.is_some() {
        out.push("thinking_token_budget");
    }
    if req.enable_thinking.is_some() && req.reasoning_effort.is_none() {
        out.push("enable_thinking");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(extra: Value) -> ChatRequest {
        crate::testing::chat_request("auto", "hi", extra).unwrap()
    }

    #[test]
    fn owned_by_names_the_server() {
        assert_eq!(Dialect::from_owned_by("llamacpp"), Dialect::LlamaServer);
        assert_eq!(Dialect::from_owned_by("vllm"), Dialect::Vllm);
        assert_eq!(Dialect::from_owned_by("sglang"), Dialect::Sglang);
        assert_eq!(Dialect::from_owned_by("jemma"), Dialect::Jemma);
        assert_eq!(Dialect::from_owned_by("library"), Dialect::Ollama);
        // OpenAI's, LM Studio's, none: not known to read more than OpenAI's fields.
        for o in ["openai", "system", "organization_owner", ""] {
            assert_eq!(Dialect::from_owned_by(o), Dialect::Openai, "{o}");
        }
    }

    #[test]
    fn only_fields_set_past_their_neutral_value_count() {
        let none = req(serde_json::json!({
            "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "reasoning_effort": "low",
            "temperature": 0.5, "presence_penalty": 0.5
        }));
        assert!(extension_fields(&none).is_empty());
        // Neutral values still need the dialect known: OpenAI refuses the keys themselves.
        assert!(depends_on_dialect(&none));
        assert!(!depends_on_dialect(&req(
            serde_json::json!({"temperature": 0.5})
        )));
        let all = req(serde_json::json!({
            "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "thinking_token_budget": 64,
            "chat_template_kwargs": {"enable_thinking": true}
        }));
        assert_eq!(
            extension_fields(&all),
            [
                "top_k",
                "min_p",
                "repetition_penalty",
                "thinking_token_budget",
                "enable_thinking"
            ]
        );
        assert!(Dialect::Vllm.unread_fields(&all).is_empty());
        assert!(Dialect::LlamaServer.unread_fields(&all).is_empty());
        assert_eq!(
            Dialect::Sglang.unread_fields(&all),
            ["thinking_token_budget"]
        );
    }

    /// Every penalty is counted over Jemma's window on llama-server, OpenAI's alone too (its default
    /// window, 64, would penalise more: tests/e2e/llama_server.rs shows the answer changes).
    #[test]
    fn llama_server_is_sent_jemmas_window_for_every_penalty() {
        for extra in [
            serde_json::json!({"repetition_penalty": 1.5}),
            serde_json::json!({"frequency_penalty": 0.5}),
            serde_json::json!({"presence_penalty": 0.5}),
        ] {
            let mut body = Map::new();
            Dialect::LlamaServer
                .adapt(&req(extra.clone()), &mut body)
                .unwrap();
            assert_eq!(body["repeat_last_n"], 20, "{extra}");
        }
        let mut body = Map::new();
        Dialect::LlamaServer
            .adapt(
                &req(serde_json::json!({"presence_penalty": 0.0})),
                &mut body,
            )
            .unwrap();
        assert!(body.get("repeat_last_n").is_none(), "no penalty: {body:?}");
    }

    #[test]
    fn ollama_reads_neither_the_bias_nor_the_tool_choice() {
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
        let r = req(serde_json::json!({
            "logit_bias": {"5": 1}, "tools": tools, "tool_choice": "required",
            "parallel_tool_calls": false
        }));
        assert_eq!(
            Dialect::Ollama.unread_fields(&r),
            ["logit_bias", "tool_choice", "parallel_tool_calls"]
        );
        assert!(Dialect::Openai.unread_fields(&r).is_empty());
        let auto = req(serde_json::json!({"tools": tools, "tool_choice": "auto"}));
        assert!(Dialect::Ollama.unread_fields(&auto).is_empty());
    }

    /// A forced call on vLLM: the named function's parameters, or for `required` vLLM's own array of
    /// `{name, parameters}` (one at most without parallel calls, `$defs` at the top); read back from JSON.
    #[test]
    fn a_forced_call_is_asked_of_vllm_as_json() {
        let tools = serde_json::json!([
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                "properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"type": "integer"}}}}},
            {"type": "function", "function": {"name": "g"}}
        ]);
        let named = req(serde_json::json!({"tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "g"}}}));
        let f = Dialect::Vllm.forced_call(&named).unwrap().unwrap();
        assert_eq!(f.function.as_deref(), Some("g"));
        assert_eq!(
            f.schema,
            serde_json::json!({"type": "object", "properties": {}})
        );
        assert_eq!(
            f.calls(" {\"x\": [1, 2]} "),
            Some(vec![("g".into(), r#"{"x":[1,2]}"#.into())])
        );
        assert_eq!(f.calls("[1]"), None, "arguments are an object");
        assert_eq!(f.calls("{\"x\": "), None);
        let mut body = Map::new();
        Dialect::Vllm.adapt(&named, &mut body).unwrap();
        assert_eq!(body["tool_choice"], "none");
        assert_eq!(body["response_format"]["json_schema"]["name"], "g");
        for d in [
            Dialect::Jemma,
            Dialect::Sglang,
            Dialect::LlamaServer,
            Dialect::Openai,
            Dialect::Auto,
        ] {
            assert_eq!(d.forced_call(&named).unwrap(), None, "{d:?}");
        }

        let required = req(
            serde_json::json!({"tools": tools, "tool_choice": "required",
            "parallel_tool_calls": false}),
        );
        let f = Dialect::Vllm.forced_call(&required).unwrap().unwrap();
        assert_eq!(f.function, None);
        assert_eq!(f.schema["maxItems"], 1);
        assert_eq!(f.schema["$defs"]["A"]["type"], "integer");
        let items = f.schema["items"]["anyOf"].as_array().unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["properties"]["name"]["enum"][0], "f");
        assert!(items[0]["properties"]["parameters"].get("$defs").is_none());
        assert_eq!(
            f.calls(r#"[{"name": "f", "parameters": {"a": 1}}, {"name": "g"}]"#),
            Some(vec![
                ("f".into(), r#"{"a":1}"#.into()),
                ("g".into(), "{}".into())
            ])
        );
        assert_eq!(f.calls("[]"), None);
        let parallel = req(serde_json::json!({"tools": tools, "tool_choice": "required"}));
        let f = Dialect::Vllm.forced_call(&parallel).unwrap().unwrap();
        assert!(f.schema.get("maxItems").is_none());

        // Nothing forced: as it came.
        let auto = req(serde_json::json!({"tools": tools, "tool_choice": "auto"}));
        assert_eq!(Dialect::Vllm.forced_call(&auto).unwrap(), None);
        // A format as well: refused, naming tool_choice.
        let both = req(
            serde_json::json!({"tools": tools, "tool_choice": "required",
            "response_format": {"type": "json_object"}}),
        );
        let err = Dialect::Vllm.forced_call(&both).unwrap_err();
        assert!(
            matches!(&err, RouterError::InvalidRequest { param, .. } if param.as_deref() == Some("tool_choice")),
            "{err:?}"
        );
        // `{}` is a function without arguments, as no parameters are.
        let empty = req(serde_json::json!({"tool_choice": "required", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {}}}]}));
        let f = Dialect::Vllm.forced_call(&empty).unwrap().unwrap();
        assert_eq!(
            f.schema["items"]["anyOf"][0]["properties"]["parameters"],
            serde_json::json!({"type": "object", "properties": {}})
        );
        // A strict function under `auto`: its call is not constrained there, so refused (learned first);
        // forced, it is asked for as JSON.
        let strict = serde_json::json!([{"type": "function", "function": {"name": "f", "strict": true,
            "parameters": {"type": "object", "properties": {}, "additionalProperties": false}}}]);
        let auto = req(serde_json::json!({"tools": strict}));
        assert_eq!(
            Dialect::Vllm.unread_fields(&auto),
            ["tools.function.strict"]
        );
        assert!(depends_on_dialect(&auto));
        assert!(Dialect::Jemma.unread_fields(&auto).is_empty());
        let forced = req(serde_json::json!({"tools": strict, "tool_choice": "required"}));
        assert!(Dialect::Vllm.unread_fields(&forced).is_empty());
        // A JSON format with tools the model may call: vLLM would hold the whole answer to the format
        // (no call possible), so refused, naming response_format (learned first); under `none`, or with
        // no tools, the format is the answer's.
        let format = serde_json::json!({"type": "json_schema", "json_schema": {"name": "a",
            "schema": {"type": "object"}}});
        let both = req(serde_json::json!({"tools": tools, "response_format": format}));
        assert!(depends_on_dialect(&both));
        // Known before a run slot is taken, so an automatic route goes elsewhere at once.
        assert_eq!(Dialect::Vllm.unread_fields(&both), ["response_format"]);
        let forced = req(
            serde_json::json!({"tools": tools, "tool_choice": "required",
            "response_format": format}),
        );
        assert_eq!(Dialect::Vllm.unread_fields(&forced), ["tool_choice"]);
        let err = Dialect::Vllm
            .adapt(&both, &mut serde_json::Map::new())
            .unwrap_err();
        assert!(
            matches!(&err, RouterError::InvalidRequest { param, .. } if param.as_deref() == Some("response_format")),
            "{err:?}"
        );
        for ok in [
            serde_json::json!({"tools": tools, "tool_choice": "none", "response_format": format}),
            serde_json::json!({"response_format": {"type": "json_object"}}),
        ] {
            let r = req(ok);
            assert_eq!(
                Dialect::Vllm.adapt(&r, &mut serde_json::Map::new()),
                Ok(None)
            );
        }
        for other in [Dialect::Jemma, Dialect::LlamaServer, Dialect::Auto] {
            assert_eq!(other.adapt(&both, &mut serde_json::Map::new()), Ok(None));
        }
        // One name, two schemas.
        let clash = req(serde_json::json!({"tool_choice": "required", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"$defs": {"A": {"type": "integer"}}}}},
            {"type": "function", "function": {"name": "g", "parameters": {"$defs": {"A": {"type": "string"}}}}}
        ]}));
        let err = Dialect::Vllm.forced_call(&clash).unwrap_err();
        assert!(
            matches!(&err, RouterError::InvalidRequest { param, .. } if param.as_deref() == Some("tools")),
            "{err:?}"
        );
    }
}
