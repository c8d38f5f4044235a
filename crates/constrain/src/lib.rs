//! Constrained decoding: what a request's `response_format` or `tool_choice` promises, enforced token by token
//! on both engines with [llguidance](https://github.com/guidance-ai/llguidance) (the engine behind llama.cpp's
//! JSON-schema support, mistral.rs and LM Studio's structured output).
//!
//! An engine builds one [`Vocabulary`] per model (the token trie of its `tokenizer.json`, ~0.1 s for Gemma's
//! 262,144 tokens), then one [`TokenMatcher`] per constrained request. Each decode step it asks the matcher
//! which tokens may come next ([`TokenMatcher::allowed`]), masks the others out of the logits before
//! sampling, and tells the matcher which token was sampled ([`TokenMatcher::commit`]). Once the grammar is
//! complete only the model's end-of-sequence tokens are allowed, so the answer ends there.
//!
//! The constraints ([`Constraint`]):
//! - `response_format: {"type": "json_object"}`: one JSON object;
//! - `response_format: {"type": "json_schema"}`: JSON valid against the schema (llguidance's JSON Schema
//!   compiler; a keyword it does not support is a client error naming it);
//! - `tool_choice: "required"` or a named function: Gemma 4 tool calls in the model's own format
//!   (`<|tool_call>call:NAME{key:value,…}<tool_call|>`, strings between `<|"|>` tokens), only to the
//!   allowed functions, with arguments that satisfy each function's `parameters` schema (the subset of JSON
//!   Schema that OpenAI's function calling documents; other keywords are refused by name);
//! - `tool_choice: "auto"` with `strict` functions: free text until the model opens a call, then calls as
//!   above (a lazy grammar, as llama.cpp's `grammar_lazy`; [`TokenMatcher::is_free`] says when no mask is
//!   needed);
//! - a JSON `response_format` with tools under `auto`: the JSON answer or calls.
//!
//! JSON is generated compactly with OpenAI's separators (`", "`, `": "`), no free whitespace: a weak model
//! cannot pad its answer with blank lines until `max_tokens`.

#![deny(missing_docs)]

use std::fmt::Write as _;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

/// What an answer must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// One JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against `schema` (`response_format.json_schema`). `strict` (OpenAI's flag): a keyword
    /// llguidance cannot enforce is an error; otherwise it is left unenforced (OpenAI's best effort).
    JsonSchema {
        /// The schema.
        schema: Value,
        /// Refuse what cannot be enforced.
        strict: bool,
    },
    /// One or more Gemma 4 tool calls, each to one of `tools` with arguments valid against its parameters,
    /// and nothing else (`tool_choice: "required"`, or a named function with `tools` holding just it). At
    /// most one call when `parallel` is false (`parallel_tool_calls: false`).
    ToolCalls {
        /// The functions that may be called.
        tools: Vec<ToolSpec>,
        /// Whether several calls may follow one another.
        parallel: bool,
    },
    /// `tool_choice: "auto"` with `strict` functions (OpenAI's promise that a call's arguments follow its
    /// schema): the answer is free until the model opens a call with Gemma 4's `<|tool_call>` token, then
    /// only calls as [`Constraint::ToolCalls`] allows, to the end of the answer. This is llama.cpp's lazy
    /// grammar (`grammar_lazy` with a trigger token): text and thinking cost no mask, and nothing but the
    /// call is constrained. `tools` holds every function offered; one that is not strict takes any object
    /// as its arguments (`{"type": "object"}`).
    LazyToolCalls {
        /// The functions that may be called.
        tools: Vec<ToolSpec>,
        /// Whether several calls may follow one another.
        parallel: bool,
    },
    /// `response_format` JSON together with tools under `tool_choice: "auto"`: either the JSON answer
    /// (`json`: [`Constraint::JsonObject`] or [`Constraint::JsonSchema`]) or tool calls as
    /// [`Constraint::ToolCalls`] allows, as OpenAI lets a model answer in the format or call a tool.
    /// `tools` holds every function offered; one that is not strict takes any object.
    JsonOrToolCalls {
        /// The JSON answer's constraint.
        json: Box<Constraint>,
        /// The functions that may be called.
        tools: Vec<ToolSpec>,
        /// Whether several calls may follow one another.
        parallel: bool,
    },
    /// The inner constraint after an optional Gemma 4 thinking block (`<|channel>thought\n…<channel|>`,
    /// free text, then any line breaks): a request with thinking on may think before its JSON or its
    /// forced call, as vLLM applies structured output only after the reasoning ends.
    AfterThinking(Box<Constraint>),
}

/// A function a [`Constraint::ToolCalls`] answer may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    /// `function.name`.
    pub name: String,
    /// `function.parameters`: a JSON Schema object (`Value::Null` when the tool takes none).
    pub parameters: Value,
}

impl ToolSpec {
    /// The tool specs of OpenAI `tools` entries (`{"type": "function", "function": {"name", "parameters"}}`),
    /// keeping those whose name passes `keep`.
    pub fn from_openai(tools: &[Value], keep: impl Fn(&str) -> bool) -> Vec<ToolSpec> {
        tools
            .iter()
            .filter_map(|t| {
                let f = t.get("function")?;
                let name = f.get("name")?.as_str()?;
                keep(name).then(|| ToolSpec {
                    name: name.to_string(),
                    parameters: f.get("parameters").cloned().unwrap_or(Value::Null),
                })
            })
            .collect()
    }
}

/// Why a constraint could not be built or followed.
#[derive(Debug, thiserror::Error)]
pub enum ConstrainError {
    /// The request's schema or tools cannot be enforced (a client error, HTTP 400): the message names the
    /// field and the keyword.
    #[error("{0}")]
    Invalid(String),
    /// The tokenizer could not be read, or the matcher failed part-way through an answer (an engine fault).
    #[error("constrained decoding: {0}")]
    Engine(String),
}

/// Longest token (bytes) llguidance's trie holds.
const MAX_TOKEN_BYTES: usize = 1024;

/// A model's vocabulary as llguidance sees it: every token's bytes (special tokens marked so that no text
/// can spell them) in a trie, and the end-of-sequence tokens a complete grammar allows.
pub struct Vocabulary {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for Vocabulary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vocabulary")
            .field("tokens", &self.factory.tok_env().tok_trie().vocab_size())
            .finish()
    }
}

impl Vocabulary {
    /// From a Hugging Face `tokenizer.json` (parsed), the model's vocabulary size (its embedding rows: ids past
    /// the tokenizer's are padding and never allowed; tokenizer ids past it can never be sampled and are
    /// dropped) and its end-of-sequence token ids (at least one).
    ///
    /// Errors: [`ConstrainError::Engine`] for a tokenizer llguidance cannot read or no end-of-sequence id.
    pub fn from_tokenizer_json(
        tokenizer: &Value,
        vocab_size: usize,
        eos: &[u32],
    ) -> Result<Self, ConstrainError> {
        let tokens = llguidance::token_bytes_from_tokenizer_json(tokenizer)
            .map_err(|e| ConstrainError::Engine(format!("reading tokenizer.json: {e}")))?;
        Self::build(tokens, vocab_size, eos)
    }

    /// From each token's bytes and whether it is a special (control) token, by id (a GGUF vocabulary, read
    /// through llama.cpp), and the end-of-sequence ids.
    ///
    /// Errors: [`ConstrainError::Engine`] when there is no end-of-sequence id.
    pub fn from_tokens(
        tokens: impl IntoIterator<Item = (Vec<u8>, bool)>,
        eos: &[u32],
    ) -> Result<Self, ConstrainError> {
        let tokens: Vec<Vec<u8>> = tokens
            .into_iter()
            .map(|(mut bytes, special)| {
                if special {
                    bytes.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
                }
                bytes
            })
            .collect();
        let n = tokens.len();
        Self::build(tokens, n, eos)
    }

    fn build(
        mut tokens: Vec<Vec<u8>>,
        vocab_size: usize,
        eos: &[u32],
    ) -> Result<Self, ConstrainError> {
        let engine = |e: String| ConstrainError::Engine(e);
        tokens.resize(vocab_size, vec![]);
        // llguidance's trie holds tokens of up to 1,024 bytes (real tokenizers stay well below; GLM-4's
        // longest is 1,024 spaces). A longer one is left out: a constrained answer never uses it.
        for t in tokens.iter_mut().filter(|t| t.len() > MAX_TOKEN_BYTES) {
            t.clear();
        }
        let eos: Vec<u32> = eos
            .iter()
            .copied()
            .filter(|&t| (t as usize) < vocab_size)
            .collect();
        let first = *eos
            .first()
            .ok_or_else(|| engine("the model has no end-of-sequence token".into()))?;
        // The trie builder asserts on shapes it cannot hold: a tokenizer is not worth a crashed engine.
        let trie = std::panic::catch_unwind(|| {
            TokTrie::from(&TokRxInfo::new(vocab_size as u32, first), &tokens).with_eos_tokens(&eos)
        })
        .map_err(|_| engine("llguidance cannot build a token trie for this vocabulary".into()))?;
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| engine(e.to_string()))?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
        })
    }

    /// The id of the special (control) token spelled `name` (such as `<|tool_call>`), if the vocabulary
    /// has one.
    pub fn special_token(&self, name: &str) -> Option<u32> {
        self.factory.tok_env().tok_trie().get_special_token(name)
    }

    /// Compiles `constraint` for one answer.
    ///
    /// Errors: [`ConstrainError::Invalid`] when the schema or tools cannot be enforced (an unsupported
    /// keyword, an unsatisfiable schema), naming what, or for [`Constraint::LazyToolCalls`] on a model
    /// without Gemma 4's `<|tool_call>` token.
    pub fn matcher(&self, constraint: &Constraint) -> Result<TokenMatcher, ConstrainError> {
        let mut trigger = None;
        let grammar = match constraint {
            Constraint::JsonObject | Constraint::JsonSchema { .. } => {
                TopLevelGrammar::from_json_schema(json_schema(constraint)?)
            }
            Constraint::ToolCalls { tools, parallel } => {
                TopLevelGrammar::from_lark(tool_call_grammar(tools, *parallel)?)
            }
            // Thinking is free text before the trigger, so a lazy grammar needs no thinking rule.
            Constraint::LazyToolCalls { tools, parallel } => {
                trigger = Some(self.special_token(TOOL_CALL).ok_or_else(|| {
                    ConstrainError::Invalid(format!(
                        "tools: strict function calling needs the model's {TOOL_CALL} token, which this \
                         model's vocabulary does not have"
                    ))
                })?);
                TopLevelGrammar::from_lark(tool_call_grammar(tools, *parallel)?)
            }
            Constraint::JsonOrToolCalls { .. } => {
                TopLevelGrammar::from_lark(format!("start: body\n{}", body_rule(constraint)?))
            }
            Constraint::AfterThinking(inner) => match &**inner {
                Constraint::LazyToolCalls { .. } => return self.matcher(inner),
                Constraint::AfterThinking(_) => {
                    return Err(ConstrainError::Invalid(
                        "a constraint cannot follow thinking twice".into(),
                    ));
                }
                inner => TopLevelGrammar::from_lark(format!(
                    "start: think? body\n{THINK}{}",
                    body_rule(inner)?
                )),
            },
        };
        let what = match constraint {
            Constraint::ToolCalls { .. } | Constraint::LazyToolCalls { .. } => "tools",
            Constraint::AfterThinking(inner) if matches!(**inner, Constraint::ToolCalls { .. }) => {
                "tools"
            }
            Constraint::JsonOrToolCalls { .. } => "response_format.json_schema or tools",
            Constraint::AfterThinking(inner)
                if matches!(**inner, Constraint::JsonOrToolCalls { .. }) =>
            {
                "response_format.json_schema or tools"
            }
            _ => "response_format.json_schema",
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| ConstrainError::Invalid(format!("{what}: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstrainError::Invalid(format!("{what}: {e}")));
        }
        Ok(TokenMatcher {
            matcher,
            trigger,
            vocab_size: self.factory.tok_env().tok_trie().vocab_size(),
        })
    }
}

/// A Lark grammar whose rule `body` is `c` (JSON, tool calls, or either), for a grammar that starts with
/// it or after a thinking block.
fn body_rule(c: &Constraint) -> Result<String, ConstrainError> {
    Ok(match c {
        Constraint::ToolCalls { tools, parallel } => {
            tool_call_grammar(tools, *parallel)?.replacen("start:", "body:", 1)
        }
        Constraint::JsonOrToolCalls {
            json,
            tools,
            parallel,
        } => format!(
            "body: answer | calls\nanswer: %json {}\n{}",
            json_schema(json)?,
            tool_call_grammar(tools, *parallel)?.replacen("start:", "calls:", 1)
        ),
        Constraint::JsonObject | Constraint::JsonSchema { .. } => {
            format!("body: %json {}\n", json_schema(c)?)
        }
        Constraint::LazyToolCalls { .. } | Constraint::AfterThinking(_) => {
            return Err(ConstrainError::Invalid(
                "this constraint cannot be a grammar's body".into(),
            ));
        }
    })
}

/// Gemma 4's token that opens a tool call: the trigger of [`Constraint::LazyToolCalls`].
const TOOL_CALL: &str = "<|tool_call>";

/// Gemma 4's thinking block as a Lark rule: its channel markers are special tokens, so no thought can
/// spell the closing one. The channel's name (`thought\n`) is part of the thought's text rather than a
/// literal, so that a thinking budget may close a thought at any token, even before its name.
const THINK: &str = "think: <|channel> THOUGHT? <channel|> BREAKS?\n\
                     THOUGHT: /(.|\\n)+/\n\
                     BREAKS: /\\n+/\n";

/// The JSON Schema (with layout options) a JSON constraint compiles.
fn json_schema(c: &Constraint) -> Result<Value, ConstrainError> {
    match c {
        Constraint::JsonObject => Ok(compact(json!({"type": "object"}), true)),
        Constraint::JsonSchema { schema, strict } => {
            if !schema.is_object() && !schema.is_boolean() {
                return Err(ConstrainError::Invalid(
                    "response_format.json_schema.schema must be a JSON Schema object".into(),
                ));
            }
            Ok(compact(schema.clone(), *strict))
        }
        _ => Err(ConstrainError::Invalid("not a JSON constraint".into())),
    }
}

/// The schema with llguidance's JSON layout options: OpenAI's separators, no free whitespace, and (when
/// not `strict`) unsupported keywords ignored rather than refused.
fn compact(schema: Value, strict: bool) -> Value {
    match schema {
        Value::Object(mut o) => {
            o.insert(
                "x-guidance".into(),
                json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": ",
                       "lenient": !strict}),
            );
            Value::Object(o)
        }
        other => other,
    }
}

/// One answer's place in its grammar.
pub struct TokenMatcher {
    matcher: Matcher,
    /// A lazy grammar's trigger token while it has not been sampled: until then every token is allowed.
    trigger: Option<u32>,
    vocab_size: usize,
}

impl std::fmt::Debug for TokenMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenMatcher")
            .field("stopped", &self.matcher.is_stopped())
            .field("free", &self.is_free())
            .finish()
    }
}

impl TokenMatcher {
    /// Whether the next token is unconstrained: a lazy grammar ([`Constraint::LazyToolCalls`]) before its
    /// trigger. An engine then samples as it would without a grammar (no mask to build), and still
    /// commits each token, so that the grammar starts at the trigger.
    pub fn is_free(&self) -> bool {
        self.trigger.is_some()
    }

    /// The tokens allowed next: what continues the grammar, and the end-of-sequence tokens where it may
    /// end (only those once it is complete); every token while [`TokenMatcher::is_free`].
    ///
    /// Errors: [`ConstrainError::Engine`] when the matcher has failed.
    pub fn allowed(&mut self) -> Result<Allowed, ConstrainError> {
        if self.is_free() {
            return Ok(Allowed(SimpleVob::alloc_ones(self.vocab_size)));
        }
        self.matcher
            .compute_mask_or_eos()
            .map(Allowed)
            .map_err(|e| ConstrainError::Engine(e.to_string()))
    }

    /// Advances past the sampled `token` (which [`TokenMatcher::allowed`] allowed). While the grammar is
    /// free only its trigger moves it: the trigger is the grammar's first token.
    ///
    /// Errors: [`ConstrainError::Engine`] for a token the grammar does not allow.
    pub fn commit(&mut self, token: u32) -> Result<(), ConstrainError> {
        match self.trigger {
            Some(t) if t != token => return Ok(()),
            Some(_) => self.trigger = None,
            None => {}
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| ConstrainError::Engine(e.to_string()))
    }

    /// Whether what was committed so far is a complete answer (any answer while free).
    pub fn is_complete(&mut self) -> bool {
        self.is_free() || self.matcher.is_accepting().unwrap_or(false)
    }
}

/// A set of allowed token ids.
#[derive(Debug, Clone)]
pub struct Allowed(SimpleVob);

impl Allowed {
    /// Whether `token` is allowed.
    pub fn contains(&self, token: u32) -> bool {
        (token as usize) < self.0.len() && self.0.is_allowed(token)
    }

    /// How many tokens are allowed.
    pub fn count(&self) -> usize {
        self.0.num_set()
    }

    /// An additive logit mask of `len` entries: 0 for an allowed token, -inf for the others.
    pub fn additive(&self, len: usize) -> Vec<f32> {
        (0..len)
            .map(|t| {
                if self.contains(t as u32) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect()
    }

    /// Sets every disallowed token's logit to -inf, in place.
    pub fn apply(&self, logits: &mut [f32]) {
        for (t, l) in logits.iter_mut().enumerate() {
            if !self.contains(t as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// JSON Schema keywords a tool's `parameters` may use in a forced call, and the grammar enforces: the
/// structure OpenAI's function calling documents (types, properties, required, items, enum, const), string
/// lengths, alternatives (`anyOf`, `oneOf`, OpenAPI's `nullable`) and local references (`$ref` into
/// `$defs` or `definitions`), as Pydantic and MCP servers write them.
const TOOL_KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "minLength",
    "maxLength",
    "anyOf",
    "oneOf",
    "allOf",
    "nullable",
    "$ref",
    "$defs",
    "definitions",
];

/// Keywords accepted without effect on the grammar: annotations, and value checks a grammar over Gemma's
/// argument format does not make (numeric bounds, formats, patterns, sizes), which the model's own
/// training keeps to in practice; OpenAI's non-strict function calling promises no more.
const TOOL_KEYWORDS_UNENFORCED: &[&str] = &[
    "description",
    "title",
    "default",
    "examples",
    "$schema",
    "$comment",
    "$id",
    "deprecated",
    "readOnly",
    "writeOnly",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "format",
    "pattern",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "contentEncoding",
    "contentMediaType",
    "strict",
];

/// A Lark grammar (llguidance's dialect) for Gemma 4 tool calls to `tools`.
///
/// The format is the one Gemma 4's chat template renders and its output parser reads (`jemma-chat`'s
/// `tools`): `<|tool_call>call:NAME{key:value,…}<tool_call|>`, keys bare, strings between `<|"|>` special
/// tokens, numbers, `true`, `false` and `null` bare, objects `{…}` and arrays `[…]` with `,` and no spaces.
/// Object properties come in the schema's order; required ones always, others optionally.
///
/// Errors: [`ConstrainError::Invalid`] naming a tool whose parameters use a keyword outside
/// [`TOOL_KEYWORDS`] or have a shape that is not a schema; no tools at all.
pub fn tool_call_grammar(tools: &[ToolSpec], parallel: bool) -> Result<String, ConstrainError> {
    if tools.is_empty() {
        return Err(ConstrainError::Invalid(
            "tool_choice: no tool to call".into(),
        ));
    }
    let mut calls = vec![];
    let mut rules = vec![];
    for (i, t) in tools.iter().enumerate() {
        let path = format!("tools[{i}].function.parameters");
        // Each tool's `$ref`s resolve within its own parameters; rule names stay unique across tools.
        let mut g = Lark {
            root: t.parameters.clone(),
            prefix: format!("t{i}_"),
            ..Default::default()
        };
        let args = match &t.parameters {
            Value::Null => "\"{}\"".to_string(),
            p => {
                if p.get("type").is_some_and(|ty| ty != "object") {
                    return Err(ConstrainError::Invalid(format!(
                        "{path}: a function's parameters must be an object schema"
                    )));
                }
                g.value(p, &path)?
            }
        };
        calls.push(format!("{} {args}", lit(&t.name)));
        rules.append(&mut g.rules);
    }
    let mut out = String::new();
    let _ = writeln!(out, "start: {}", if parallel { "call+" } else { "call" });
    let _ = writeln!(
        out,
        "call: <|tool_call> \"call:\" ({}) <tool_call|>",
        calls.join(" | ")
    );
    out.push_str(ANY_VALUE);
    for r in &rules {
        let _ = writeln!(out, "{r}");
    }
    Ok(out)
}

/// Any Gemma value (for schemas that do not say), and the terminals.
const ANY_VALUE: &str = r#"gv: gstr | NUMBER | "true" | "false" | "null" | gobj | garr
gstr: <|"|> GTEXT? <|"|>
gobj: "{" (gkv ("," gkv)*)? "}"
gkv: GKEY ":" gv
garr: "[" (gv ("," gv)*)? "]"
GTEXT: /(.|\n)+/
GKEY: /[A-Za-z_][A-Za-z0-9_\-]*/
NUMBER: /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/
INTEGER: /-?(0|[1-9][0-9]*)/
"#;

/// A Lark string literal for `s`.
fn lit(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// A value literal rendered as Gemma writes it.
fn gemma_literal(v: &Value, path: &str) -> Result<String, ConstrainError> {
    Ok(match v {
        Value::String(s) => format!("<|\"|> {} <|\"|>", lit(s)),
        Value::Number(_) | Value::Bool(_) | Value::Null => lit(&v.to_string()),
        _ => {
            return Err(ConstrainError::Invalid(format!(
                "{path}: only scalar enum and const values are supported in tool parameters"
            )));
        }
    })
}

#[derive(Default)]
struct Lark {
    /// The parameters schema `$ref`s resolve in.
    root: Value,
    /// Prefix of this tool's rule names.
    prefix: String,
    rules: Vec<String>,
    /// Rule names of the `$ref`s met so far (a recursive schema refers back to its rule).
    refs: std::collections::HashMap<String, String>,
}

impl Lark {
    fn rule(&mut self, body: String) -> String {
        let name = format!("{}r{}", self.prefix, self.rules.len());
        self.rules.push(format!("{name}: {body}"));
        name
    }

    /// The rule for a local `$ref` (`#/$defs/NAME`, `#/definitions/NAME`, `#`), made once.
    fn reference(&mut self, r: &str, path: &str) -> Result<String, ConstrainError> {
        if let Some(name) = self.refs.get(r) {
            return Ok(name.clone());
        }
        let target = r
            .strip_prefix('#')
            .and_then(|p| self.root.pointer(p))
            .cloned()
            .ok_or_else(|| {
                ConstrainError::Invalid(format!(
                    "{path}.$ref: {r:?} is not a local reference into this schema"
                ))
            })?;
        // Name the rule before building it, so that the schema may refer to itself.
        let name = format!("{}ref{}", self.prefix, self.refs.len());
        self.refs.insert(r.to_string(), name.clone());
        let body = self.value(&target, &format!("{path}.$ref"))?;
        self.rules.push(format!("{name}: {body}"));
        Ok(name)
    }

    /// An expression for a value valid against `schema`.
    fn value(&mut self, schema: &Value, path: &str) -> Result<String, ConstrainError> {
        let o = match schema {
            Value::Bool(true) => return Ok("gv".into()),
            Value::Object(o) => o,
            _ => {
                return Err(ConstrainError::Invalid(format!(
                    "{path}: not a JSON Schema object"
                )));
            }
        };
        if let Some(k) = o.keys().find(|k| {
            !TOOL_KEYWORDS.contains(&k.as_str()) && !TOOL_KEYWORDS_UNENFORCED.contains(&k.as_str())
        }) {
            return Err(ConstrainError::Invalid(format!(
                "{path}: JSON Schema keyword {k:?} is not supported in an enforced tool call"
            )));
        }
        if o.get("nullable") == Some(&Value::Bool(true)) {
            let mut inner = o.clone();
            inner.remove("nullable");
            let v = self.value(&Value::Object(inner), path)?;
            return Ok(format!("({v} | \"null\")"));
        }
        if let Some(r) = o.get("$ref") {
            let r = r
                .as_str()
                .ok_or_else(|| ConstrainError::Invalid(format!("{path}.$ref: must be a string")))?;
            return self.reference(r, path);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(alts) = o.get(key) {
                let alts = alts.as_array().filter(|a| !a.is_empty()).ok_or_else(|| {
                    ConstrainError::Invalid(format!("{path}.{key}: must be a non-empty array"))
                })?;
                let exprs = alts
                    .iter()
                    .enumerate()
                    .map(|(k, a)| self.value(a, &format!("{path}.{key}[{k}]")))
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(format!("({})", exprs.join(" | ")));
            }
        }
        if let Some(all) = o.get("allOf") {
            // One member (how Pydantic wraps a `$ref` with a description) is that member; an intersection
            // of several is not something a grammar over alternatives can build.
            return match all.as_array().map(Vec::as_slice) {
                Some([one]) => self.value(one, &format!("{path}.allOf[0]")),
                _ => Err(ConstrainError::Invalid(format!(
                    "{path}.allOf: only a single member is supported in an enforced tool call"
                ))),
            };
        }
        if let Some(c) = o.get("const") {
            return gemma_literal(c, &format!("{path}.const"));
        }
        if let Some(e) = o.get("enum") {
            let vals = e.as_array().filter(|a| !a.is_empty()).ok_or_else(|| {
                ConstrainError::Invalid(format!("{path}.enum: must be a non-empty array"))
            })?;
            let alts = vals
                .iter()
                .map(|v| gemma_literal(v, &format!("{path}.enum")))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(format!("({})", alts.join(" | ")));
        }
        let types: Vec<&str> = match o.get("type") {
            None => {
                // No type: what the other keywords describe, else anything.
                if o.contains_key("properties") {
                    vec!["object"]
                } else if o.contains_key("items") {
                    vec!["array"]
                } else {
                    return Ok("gv".into());
                }
            }
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            Some(_) => vec![],
        };
        if types.is_empty() {
            return Err(ConstrainError::Invalid(format!(
                "{path}.type: must be a type name or a list of them"
            )));
        }
        let mut alts = vec![];
        for t in types {
            alts.push(match t {
                "string" => self.string(o, path)?,
                "number" => "NUMBER".to_string(),
                "integer" => "INTEGER".to_string(),
                "boolean" => "(\"true\" | \"false\")".to_string(),
                "null" => "\"null\"".to_string(),
                "array" => {
                    let item = match o.get("items") {
                        None => "gv".to_string(),
                        Some(i) => self.value(i, &format!("{path}.items"))?,
                    };
                    self.rule(format!("\"[\" ({item} (\",\" {item})*)? \"]\""))
                }
                "object" => self.object(o, path)?,
                other => {
                    return Err(ConstrainError::Invalid(format!(
                        "{path}.type: unknown type {other:?}"
                    )));
                }
            });
        }
        Ok(if alts.len() == 1 {
            alts.remove(0)
        } else {
            format!("({})", alts.join(" | "))
        })
    }

    /// A Gemma string, its length (in characters) within `minLength` and `maxLength` when given.
    fn string(
        &mut self,
        o: &serde_json::Map<String, Value>,
        path: &str,
    ) -> Result<String, ConstrainError> {
        let bound = |k: &str| -> Result<Option<u64>, ConstrainError> {
            o.get(k)
                .map(|v| {
                    v.as_u64().ok_or_else(|| {
                        ConstrainError::Invalid(format!("{path}.{k}: must be a whole number"))
                    })
                })
                .transpose()
        };
        let (min, max) = (bound("minLength")?.unwrap_or(0), bound("maxLength")?);
        if min == 0 && max.is_none() {
            return Ok("gstr".into());
        }
        if max.is_some_and(|m| m < min) {
            return Err(ConstrainError::Invalid(format!(
                "{path}: maxLength is below minLength"
            )));
        }
        if max == Some(0) {
            return Ok("(<|\"|> <|\"|>)".into());
        }
        let max = max.map_or(String::new(), |m| m.to_string());
        // A lexeme may not match the empty string: an optional one covers length 0.
        let text = if min == 0 {
            format!("/(.|\\n){{1,{max}}}/?")
        } else {
            format!("/(.|\\n){{{min},{max}}}/")
        };
        Ok(self.rule(format!("<|\"|> {text} <|\"|>")))
    }

    /// An object with the schema's properties in order: required ones always, the others optionally.
    fn object(
        &mut self,
        o: &serde_json::Map<String, Value>,
        path: &str,
    ) -> Result<String, ConstrainError> {
        let props = match o.get("properties") {
            None => {
                return Ok(
                    if o.get("additionalProperties") == Some(&Value::Bool(false)) {
                        "\"{}\"".into()
                    } else {
                        "gobj".into()
                    },
                );
            }
            Some(Value::Object(p)) => p,
            Some(_) => {
                return Err(ConstrainError::Invalid(format!(
                    "{path}.properties: must be an object"
                )));
            }
        };
        let required: Vec<&str> = o
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut pairs = vec![];
        for (k, s) in props {
            let v = self.value(s, &format!("{path}.properties.{k}"))?;
            pairs.push((
                format!("{} {v}", lit(&format!("{k}:"))),
                required.contains(&k.as_str()),
            ));
        }
        // A required key the schema does not describe: present, with any value.
        for r in required.iter().filter(|r| !props.contains_key(**r)) {
            pairs.push((format!("{} gv", lit(&format!("{r}:"))), true));
        }
        // first(i): properties i.. when none has been written yet; rest(i): when one has (each written one
        // then starts with ","). Built from the end.
        let n = pairs.len();
        let (mut first, mut rest) = (String::new(), String::new());
        for i in (0..n).rev() {
            let (kv, req) = &pairs[i];
            let (f, r) = (first.clone(), rest.clone());
            rest = if *req {
                self.rule(format!("\",\" {kv} {r}"))
            } else {
                self.rule(format!("(\",\" {kv})? {r}"))
            };
            first = if *req {
                self.rule(format!("{kv} {r}"))
            } else if f.is_empty() {
                self.rule(format!("({kv} {r})?"))
            } else {
                self.rule(format!("{kv} {r} | {f}"))
            };
            // `r` and `f` were the empty expression for the last property.
            let _ = i;
        }
        Ok(self.rule(format!("\"{{\" {first} \"}}\"")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_grammar_keeps_the_schema_order_and_refuses_unknown_keywords() {
        let tools = vec![ToolSpec {
            name: "get_weather".into(),
            parameters: json!({"type": "object", "properties": {
                "city": {"type": "string"}, "days": {"type": "integer"},
                "unit": {"enum": ["c", "f"]}}, "required": ["city"]}),
        }];
        let g = tool_call_grammar(&tools, false).unwrap();
        assert!(g.contains("start: call\n"), "{g}");
        assert!(g.contains("\"get_weather\""), "{g}");
        let bad = vec![ToolSpec {
            name: "f".into(),
            parameters: json!({"type": "object", "properties": {"x": {"type": "string", "not": {}}}}),
        }];
        let e = tool_call_grammar(&bad, true).unwrap_err().to_string();
        assert!(e.contains("\"not\"") && e.contains("properties.x"), "{e}");
    }

    /// A synthetic tokenizer's 1,405-byte token (the engine benchmark's has one) would trip llguidance's
    /// trie builder: it is left out, and the rest works.
    #[test]
    fn an_overlong_token_is_left_out() {
        let mut tokens: Vec<(Vec<u8>, bool)> = (0..=255u8).map(|b| (vec![b], false)).collect();
        tokens.push((vec![b'a'; 1405], false));
        tokens.push((b"<eos>".to_vec(), true));
        let vocab = Vocabulary::from_tokens(tokens, &[257]).unwrap();
        let mut m = vocab.matcher(&Constraint::JsonObject).unwrap();
        let allowed = m.allowed().unwrap();
        assert!(allowed.contains(b'{' as u32) && !allowed.contains(256));
    }

    /// What Pydantic and MCP servers write: `$defs` with `$ref` (recursive too), `anyOf` with null for an
    /// optional field, `allOf` around one reference, validation keywords the grammar accepts as they are,
    /// a required key with no schema, an empty string.
    #[test]
    fn pydantic_style_schemas_compile() {
        let tools = vec![ToolSpec {
            name: "plan".into(),
            parameters: json!({"type": "object", "$defs": {
                "Step": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 0},
                    "next": {"anyOf": [{"$ref": "#/$defs/Step"}, {"type": "null"}]}},
                    "required": ["name"]}},
                "properties": {"first": {"allOf": [{"$ref": "#/$defs/Step"}], "description": "start"},
                    "budget": {"type": "integer", "minimum": 0, "nullable": true}},
                "required": ["first", "note"]}),
        }];
        // A byte-level vocabulary with Gemma's markers as special tokens: 256 `<|tool_call>`,
        // 257 `<tool_call|>`, 258 `<|"|>`, 259 the end of sequence.
        let mut tokens: Vec<(Vec<u8>, bool)> = (0..=255u8).map(|b| (vec![b], false)).collect();
        for m in ["<|tool_call>", "<tool_call|>", "<|\"|>", "<eos>"] {
            tokens.push((m.as_bytes().to_vec(), true));
        }
        let vocab = Vocabulary::from_tokens(tokens, &[259]).unwrap();
        let constraint = Constraint::ToolCalls {
            tools,
            parallel: false,
        };
        // Feeds text, with `«` `»` `"` standing for the markers; says whether every token was allowed and
        // whether the call is complete.
        let run = |text: &str| -> (bool, bool) {
            let mut m = vocab.matcher(&constraint).unwrap();
            for c in text.chars() {
                let t = match c {
                    '«' => 256,
                    '»' => 257,
                    '"' => 258,
                    c => c as u32,
                };
                if !m.allowed().unwrap().contains(t) || m.commit(t).is_err() {
                    return (false, false);
                }
            }
            (true, m.is_complete())
        };
        let ok = "«call:plan{first:{name:\"\",next:{name:\"\",next:null}},budget:7,note:[1]}»";
        assert_eq!(run(ok), (true, true), "{ok}");
        // The required `note` missing; a non-empty name; a second call.
        assert!(!run("«call:plan{first:{name:\"\"}}»").1);
        assert!(!run("«call:plan{first:{name:\"x").0);
        assert!(!run(&format!("{ok}«")).0);
    }
}

#[cfg(test)]
mod thinking_tests {
    use super::*;

    /// A byte-level vocabulary with Gemma's markers as special tokens: 256 `<|channel>`, 257 `<channel|>`,
    /// 258 the end of sequence, 259 `<|tool_call>`, 260 `<tool_call|>`, 261 `<|"|>`.
    fn vocab() -> Vocabulary {
        let mut tokens: Vec<(Vec<u8>, bool)> = (0..=255u8).map(|b| (vec![b], false)).collect();
        for m in [
            "<|channel>",
            "<channel|>",
            "<eos>",
            "<|tool_call>",
            "<tool_call|>",
            "<|\"|>",
        ] {
            tokens.push((m.as_bytes().to_vec(), true));
        }
        Vocabulary::from_tokens(tokens, &[258]).unwrap()
    }

    /// Feeds `text` (`«` `»` standing for the thinking markers, `‹` `›` `¦` for the tool-call ones):
    /// whether every token was allowed, and whether the answer is complete.
    fn run(vocab: &Vocabulary, c: &Constraint, text: &str) -> (bool, bool) {
        let mut m = vocab.matcher(c).unwrap();
        for ch in text.chars() {
            let t = match ch {
                '«' => 256,
                '»' => 257,
                '‹' => 259,
                '›' => 260,
                '¦' => 261,
                c => c as u32,
            };
            if !m.allowed().unwrap().contains(t) || m.commit(t).is_err() {
                return (false, false);
            }
        }
        (true, m.is_complete())
    }

    #[test]
    fn a_forced_call_may_follow_a_thinking_block() {
        let v = vocab();
        let c = Constraint::AfterThinking(Box::new(Constraint::ToolCalls {
            tools: vec![ToolSpec {
                name: "f".into(),
                parameters: json!({"type": "object", "properties": {"x": {"type": "string"}},
                    "required": ["x"]}),
            }],
            parallel: false,
        }));
        assert_eq!(
            run(&v, &c, "«thought\nCall f.»‹call:f{x:¦a¦}›"),
            (true, true)
        );
        assert_eq!(run(&v, &c, "‹call:f{x:¦a¦}›"), (true, true));
        assert!(
            !run(&v, &c, "«thought\nok»Sure").0,
            "only the call after the thought"
        );
        assert!(
            !run(&v, &c, "«thought\nok»‹call:g{").0,
            "only an offered function"
        );
    }

    /// A lazy grammar lets anything through (thinking, text, other special tokens) until the model opens a
    /// call; from there only a valid call to an offered function, and the end.
    #[test]
    fn a_lazy_tool_grammar_is_free_until_the_call_opens() {
        let v = vocab();
        let tools = vec![
            ToolSpec {
                name: "f".into(),
                parameters: json!({"type": "object", "properties": {"x": {"type": "integer"}},
                    "required": ["x"]}),
            },
            // Not strict: any object.
            ToolSpec {
                name: "g".into(),
                parameters: json!({"type": "object"}),
            },
        ];
        let c = Constraint::LazyToolCalls {
            tools: tools.clone(),
            parallel: false,
        };
        assert_eq!(v.special_token("<|tool_call>"), Some(259));
        let mut m = v.matcher(&c).unwrap();
        assert!(m.is_free() && m.is_complete());
        assert_eq!(m.allowed().unwrap().count(), 262, "everything while free");
        for t in [b'H' as u32, 256, 257, 260] {
            m.commit(t).unwrap();
        }
        assert!(m.is_free(), "only the trigger ends the free part");
        m.commit(259).unwrap();
        assert!(!m.is_free() && !m.is_complete());
        assert!(m.allowed().unwrap().contains(b'c' as u32));
        assert!(!m.allowed().unwrap().contains(b'H' as u32));

        assert_eq!(
            run(&v, &c, "«thought\nCall f.»Sure.‹call:f{x:12}›"),
            (true, true)
        );
        assert_eq!(run(&v, &c, "Just text, no call."), (true, true));
        assert_eq!(run(&v, &c, "‹call:g{a:¦b¦,c:[1]}›"), (true, true));
        assert!(!run(&v, &c, "‹call:f{x:¦a¦}›").0, "f's x is an integer");
        assert!(!run(&v, &c, "‹call:h{").0, "only an offered function");
        assert!(!run(&v, &c, "‹call:f{x:1}›‹").0, "one call unless parallel");
        let par = Constraint::LazyToolCalls {
            tools,
            parallel: true,
        };
        assert_eq!(run(&v, &par, "‹call:f{x:1}›‹call:g{}›"), (true, true));
        assert!(
            !run(&v, &par, "‹call:f{x:1}›more").0,
            "calls end the answer"
        );
        // Thinking on changes nothing: the thought is free text before the trigger.
        let after = Constraint::AfterThinking(Box::new(par));
        assert_eq!(run(&v, &after, "«thought\nhm»x‹call:g{}›"), (true, true));
        // A vocabulary without the trigger cannot keep the promise: refused, naming the field.
        let plain: Vec<(Vec<u8>, bool)> = (0..=255u8)
            .map(|b| (vec![b], false))
            .chain([(b"<eos>".to_vec(), true)])
            .collect();
        let e = Vocabulary::from_tokens(plain, &[256])
            .unwrap()
            .matcher(&c)
            .unwrap_err();
        assert!(matches!(e, ConstrainError::Invalid(_)) && e.to_string().contains("tools"));
    }

    /// A JSON response format with tools under auto: the JSON answer or calls, nothing else, after an
    /// optional thought.
    #[test]
    fn an_answer_may_be_the_json_or_calls() {
        let v = vocab();
        let c = Constraint::JsonOrToolCalls {
            json: Box::new(Constraint::JsonSchema {
                schema: json!({"type": "object", "properties": {"a": {"type": "integer"}},
                    "required": ["a"], "additionalProperties": false}),
                strict: true,
            }),
            tools: vec![ToolSpec {
                name: "f".into(),
                parameters: json!({"type": "object", "properties": {"x": {"type": "integer"}},
                    "required": ["x"]}),
            }],
            parallel: false,
        };
        assert_eq!(run(&v, &c, "{\"a\": 1}"), (true, true));
        assert_eq!(run(&v, &c, "‹call:f{x:3}›"), (true, true));
        assert!(!run(&v, &c, "Sure").0, "no free text");
        assert!(!run(&v, &c, "{\"a\": 1}‹").0, "not both");
        assert!(!run(&v, &c, "‹call:f{x:¦a¦}›").0, "the call's schema holds");
        let after = Constraint::AfterThinking(Box::new(c));
        assert_eq!(run(&v, &after, "«thought\nhm»‹call:f{x:3}›"), (true, true));
        assert_eq!(run(&v, &after, "«thought\nhm»{\"a\": 2}"), (true, true));
    }

    #[test]
    fn json_may_follow_a_thinking_block_and_nothing_else_may() {
        let v = vocab();
        let c = Constraint::AfterThinking(Box::new(Constraint::JsonSchema {
            schema: json!({"type": "object", "properties": {"a": {"type": "integer"}},
                "required": ["a"], "additionalProperties": false}),
            strict: true,
        }));
        assert_eq!(
            run(&v, &c, "«thought\nLet me think.\nOk»\n\n{\"a\": 1}"),
            (true, true)
        );
        assert_eq!(
            run(&v, &c, "{\"a\": 1}"),
            (true, true),
            "thinking is optional"
        );
        // A thinking budget may close a thought at once, before its name.
        assert_eq!(run(&v, &c, "«»{\"a\": 1}"), (true, true));
        assert!(
            !run(&v, &c, "Sure: {").0,
            "no free text outside the thought"
        );
        assert!(
            !run(&v, &c, "«thought\nhm»{\"b\"").0,
            "the schema holds after it"
        );
        assert!(
            !run(&v, &c, "«thought\nhm»{\"a\": 1}«").0,
            "one thought, before"
        );
    }
}
