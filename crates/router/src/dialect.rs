//! What an OpenAI-compatible upstream calls the fields OpenAI's API has no name for.
//!
//! Jemma takes, besides OpenAI's own fields, `top_k`, `min_p`, `repetition_penalty`, Gemma 4's thinking
//! switch (`enable_thinking`, `chat_template_kwargs.enable_thinking`) and `thinking_token_budget`, under
//! vLLM's names. Upstream servers differ in what they read:
//!
//! - vLLM, SGLang and another Jemma node read those names as they are.
//! - llama-server (and LM Studio) read `repeat_penalty` for `repetition_penalty`, over their last
//!   `repeat_last_n` tokens (64 by default; Jemma's engines use mlx-lm's 20), and llama-server reads
//!   `thinking_budget_tokens` for the budget (`tools/server/server-common.cpp`); they ignore keys they do
//!   not know.
//! - OpenAI refuses keys it does not know; Ollama's and most other OpenAI-compatible endpoints ignore
//!   them.
//!
//! An upstream that ignores a field the client set would break the API's promise that a field accepted
//! is a field honoured. So each upstream tier speaks a [`Dialect`]: the fields are sent under its names,
//! and a field it has no name for is refused with a 400 naming it before anything is sent. `auto` (the
//! default) learns the dialect from the upstream's `GET /v1/models` (`owned_by`: `llamacpp`, `vllm`,
//! `sglang`, `jemma`; anything else is taken as OpenAI's, which refuses rather than drops).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::RouterError;
use crate::api::ChatRequest;

/// Which names an OpenAI-compatible upstream reads for the fields OpenAI's API lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dialect {
    /// Learned from the upstream's `GET /v1/models` ([`Dialect::from_owned_by`]) the first time it
    /// matters.
    #[default]
    Auto,
    /// vLLM's names (vLLM, SGLang, another Jemma node): every field sent as Jemma took it.
    Vllm,
    /// llama-server's names (also LM Studio's): `repeat_penalty` and `repeat_last_n`,
    /// `thinking_budget_tokens`.
    LlamaServer,
    /// OpenAI's fields only (OpenAI, Ollama, and any server not known to read more): `reasoning_effort`
    /// goes as it came; `top_k`, `min_p`, `repetition_penalty`, a thinking switch set without
    /// `reasoning_effort`, and `thinking_token_budget` are refused.
    Openai,
}

impl Dialect {
    /// The dialect of a server whose `/v1/models` entries say `owned_by` (llama-server: `llamacpp`; vLLM:
    /// `vllm`; SGLang: `sglang`; Jemma: `jemma`); anything else is OpenAI's, which refuses a field it
    /// cannot honour rather than dropping it. Never [`Dialect::Auto`].
    pub fn from_owned_by(owned_by: &str) -> Dialect {
        match owned_by.to_ascii_lowercase().as_str() {
            "llamacpp" | "llama.cpp" | "llama-cpp" => Dialect::LlamaServer,
            "vllm" | "sglang" | "jemma" => Dialect::Vllm,
            _ => Dialect::Openai,
        }
    }

    /// The name the configuration and `/health` use (`auto`, `vllm`, `llama-server`, `openai`).
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Auto => "auto",
            Dialect::Vllm => "vllm",
            Dialect::LlamaServer => "llama-server",
            Dialect::Openai => "openai",
        }
    }

    /// Rewrites `body`, the upstream request built from `req` under Jemma's (vLLM's) names, into this
    /// dialect's names. [`Dialect::Auto`] (not resolved yet) leaves it as it is.
    ///
    /// Errors: a field `req` sets that this dialect has no name for, as a 400 naming it (the first, in
    /// the order of [`extension_fields`]).
    pub fn adapt(
        self,
        req: &ChatRequest,
        body: &mut Map<String, Value>,
    ) -> Result<(), RouterError> {
        match self {
            Dialect::Auto | Dialect::Vllm => {}
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
            Dialect::Openai => {
                if let Some(param) = extension_fields(req).first() {
                    return Err(RouterError::invalid(
                        format!(
                            "{param}: this tier's upstream speaks OpenAI's API, which has no such field, so \
                             it would not be honoured there; leave it out, name a tier that takes it (a \
                             local one), or set the tier's `dialect` if its server reads it"
                        ),
                        param,
                    ));
                }
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
        Ok(())
    }
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
    use crate::api::{ChatCompletionRequest, Limits};

    fn req(extra: Value) -> ChatRequest {
        let mut v = serde_json::json!({"messages": [{"role": "user", "content": "hi"}]});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value::<ChatCompletionRequest>(v)
            .unwrap()
            .validate(&Limits::default())
            .unwrap()
    }

    #[test]
    fn owned_by_names_the_server() {
        assert_eq!(Dialect::from_owned_by("llamacpp"), Dialect::LlamaServer);
        assert_eq!(Dialect::from_owned_by("vllm"), Dialect::Vllm);
        assert_eq!(Dialect::from_owned_by("sglang"), Dialect::Vllm);
        assert_eq!(Dialect::from_owned_by("jemma"), Dialect::Vllm);
        // OpenAI's, Ollama's (`library`), LM Studio's: not known to read more than OpenAI's fields.
        for o in ["openai", "system", "library", "organization_owner", ""] {
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
    }
}
