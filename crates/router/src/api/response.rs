//! What the OpenAI endpoints answer: completions, stream chunks, usage, the model list and errors. The
//! gateway writes these types, the upstream backend reads an upstream's chunks with them, and the OpenAPI
//! description at `/openapi.json` is generated from them, so the three cannot drift apart.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::message::{FunctionType, ToolCall};
use crate::backend::FinishReason;

/// `finish_reason`'s values, for the OpenAPI description ([`FinishReason`] lives in `jemma-chat`, which
/// knows nothing of schemas).
#[derive(ToSchema)]
#[schema(as = FinishReason)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum FinishReasonSchema {
    Stop,
    Length,
    ToolCalls,
    ContentFilter,
}

/// Reads an upstream's `finish_reason` leniently ([`FinishReason::from_wire`]: servers invent values).
fn lenient_finish<'de, D: Deserializer<'de>>(d: D) -> Result<Option<FinishReason>, D::Error> {
    Ok(Value::deserialize(d)?.as_str().map(FinishReason::from_wire))
}

/// Reads a field of an upstream's chunk that may come in another shape (null, another type, a server's
/// own variant): what does not fit is the field's default, not an error. An answer is not failed, nor a
/// tier's breaker charged, over a field the gateway does not need in the form it expects.
fn lenient<'de, D: Deserializer<'de>, T: serde::de::DeserializeOwned + Default>(
    d: D,
) -> Result<T, D::Error> {
    Ok(serde_json::from_value(Value::deserialize(d)?).unwrap_or_default())
}

/// `chat.completion`: a whole answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model that answered.
    pub model: String,
    /// The one choice (`n` is 1).
    pub choices: Vec<Choice>,
    /// Token counts.
    pub usage: Usage,
    /// How the gateway routed the request (Jemma's extension).
    #[serde(rename = "_routing")]
    pub routing: Routing,
}

/// One choice of a [`ChatCompletion`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Choice {
    /// Always 0.
    pub index: u32,
    /// The answer.
    pub message: ResponseMessage,
    /// Why it ended: `tool_calls` if and only if `message.tool_calls` is present.
    #[schema(value_type = FinishReasonSchema)]
    pub finish_reason: FinishReason,
    /// Per-token log-probabilities, when asked (`logprobs: true`).
    pub logprobs: Option<ChoiceLogprobs>,
}

/// The answer's message.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResponseMessage {
    /// Always `assistant`.
    pub role: String,
    /// The answer text; null when the answer is only tool calls.
    pub content: Option<String>,
    /// The model's thinking (vLLM's name for it), when thinking was on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// The calls the model made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// `logprobs` of a choice.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChoiceLogprobs {
    /// One entry per token: `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`.
    #[schema(value_type = Vec<Object>)]
    pub content: Option<Vec<Value>>,
}

/// `chat.completion.chunk`: one server-sent event of a streamed answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionChunk {
    /// The same id in every chunk of one answer.
    #[serde(default, deserialize_with = "lenient")]
    pub id: String,
    /// Always `chat.completion.chunk`.
    #[serde(default, deserialize_with = "lenient")]
    pub object: String,
    /// Unix seconds.
    #[serde(default, deserialize_with = "lenient")]
    pub created: u64,
    /// The model.
    #[serde(default, deserialize_with = "lenient")]
    pub model: String,
    /// One choice, or none in the last chunk that carries `usage`.
    #[serde(default, deserialize_with = "lenient")]
    pub choices: Vec<ChunkChoice>,
    /// Only in the last chunk, with `choices: []`, when `stream_options.include_usage` asked for it.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub usage: Option<Usage>,
    /// In the chunk that carries `finish_reason` (Jemma's extension).
    #[serde(
        rename = "_routing",
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub routing: Option<Routing>,
}

/// One choice of a [`ChatCompletionChunk`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ChunkChoice {
    /// Always 0.
    #[serde(default, deserialize_with = "lenient")]
    pub index: u32,
    /// What this chunk adds.
    #[serde(default, deserialize_with = "lenient")]
    pub delta: Delta,
    /// Set in the answer's last choice chunk.
    #[serde(default, deserialize_with = "lenient_finish")]
    #[schema(value_type = Option<FinishReasonSchema>)]
    pub finish_reason: Option<FinishReason>,
    /// The log-probabilities of this chunk's tokens.
    #[serde(default, deserialize_with = "lenient")]
    pub logprobs: Option<ChoiceLogprobs>,
    /// vLLM's and SGLang's `stop_reason`: the stop string that ended the answer (a token id when a stop
    /// token did). Read from upstreams; not sent.
    #[serde(default, deserialize_with = "lenient", skip_serializing)]
    #[schema(ignore)]
    pub stop_reason: Option<Value>,
}

/// A chunk's delta: the next piece of the answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Delta {
    /// `assistant`, in the first chunk.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub role: Option<String>,
    /// Answer text.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub content: Option<String>,
    /// Thinking text.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub reasoning_content: Option<String>,
    /// Thinking text under vLLM's newer name (read from upstreams, which may send both; not sent).
    #[serde(default, deserialize_with = "lenient", skip_serializing)]
    #[schema(ignore)]
    pub reasoning: Option<String>,
    /// Tool calls: Jemma sends each whole in one delta; upstreams may send them in pieces by `index`.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// A tool call, or a piece of one, in a [`Delta`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ToolCallDelta {
    /// Which call of the answer this piece belongs to.
    #[serde(default, deserialize_with = "lenient")]
    pub index: u32,
    /// The call's id (first piece).
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub id: Option<String>,
    /// `function` (first piece).
    #[serde(
        rename = "type",
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub kind: Option<FunctionType>,
    /// Name and (a piece of) the arguments.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub function: Option<FunctionCallDelta>,
}

/// A piece of a call's function.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct FunctionCallDelta {
    /// The function's name (first piece).
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub name: Option<String>,
    /// A piece of the JSON-string arguments.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub arguments: Option<String>,
}

/// `text_completion`: an answer of `/v1/completions`, whole or one streamed chunk.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TextCompletion {
    /// `cmpl-...`.
    pub id: String,
    /// Always `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model.
    pub model: String,
    /// One choice, or none in a stream's last chunk that carries `usage`.
    pub choices: Vec<TextChoice>,
    /// Token counts: always in a whole answer; in a stream only in the last chunk, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// In the whole answer and the stream's chunk that carries `finish_reason` (Jemma's extension).
    #[serde(rename = "_routing", default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<Routing>,
}

/// One choice of a [`TextCompletion`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TextChoice {
    /// Always 0.
    pub index: u32,
    /// The text (a piece of it, when streamed).
    pub text: String,
    /// Set when the answer ended.
    #[schema(value_type = Option<FinishReasonSchema>)]
    pub finish_reason: Option<FinishReason>,
    /// The generated tokens' log-probabilities, when the request's `logprobs` asked for them (null
    /// otherwise).
    pub logprobs: Option<CompletionLogprobs>,
}

/// `/v1/completions`' `logprobs`, in that API's own shape (OpenAI's legacy one, as vLLM and
/// llama-cpp-python return it): for each generated token, its text, its log-probability, the most likely
/// tokens at its position with theirs, and where its text starts. The numbers are those chat completions
/// return (see `jemma_chat::logprobs`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CompletionLogprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Each token's log-probability (null where an upstream sent none).
    pub token_logprobs: Vec<Option<f64>>,
    /// Per token: the `logprobs` most likely tokens → their log-probabilities, and the chosen token (as
    /// vLLM adds it), so `logprobs: 0` gives the chosen token alone.
    pub top_logprobs: Vec<std::collections::BTreeMap<String, f64>>,
    /// Each token's first character in the prompt followed by the completion, as OpenAI counts it
    /// (with or without `echo`; [`TextOffsets`]).
    pub text_offset: Vec<usize>,
}

/// OpenAI's log-probability for "no chance" (its answers use it rather than −∞, which JSON cannot carry).
const NO_CHANCE: f64 = -9999.0;

/// Counts [`CompletionLogprobs::text_offset`]: characters of the prompt, then of the tokens' UTF-8 bytes
/// so far. A character split across tokens counts once, when whole (counting each token's text would
/// count a U+FFFD per piece); an invalid byte counts as the one U+FFFD it decodes to.
#[derive(Debug, Clone, Default)]
pub struct TextOffsets {
    chars: usize,
    pending: Vec<u8>,
}

impl TextOffsets {
    /// Offsets after `prompt`.
    pub fn after(prompt: &str) -> Self {
        Self {
            chars: prompt.chars().count(),
            pending: vec![],
        }
    }

    /// The offset of a token whose bytes are `token`, and the count moved past it.
    fn next(&mut self, token: &[u8]) -> usize {
        let at = self.chars;
        self.pending.extend_from_slice(token);
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    self.chars += s.chars().count();
                    self.pending.clear();
                    return at;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    self.chars +=
                        std::str::from_utf8(&self.pending[..good]).map_or(0, |s| s.chars().count());
                    match e.error_len() {
                        Some(bad) => {
                            self.chars += 1;
                            self.pending.drain(..good + bad);
                        }
                        // A character not whole yet: the next token completes it.
                        None => {
                            self.pending.drain(..good);
                            return at;
                        }
                    }
                }
            }
        }
    }
}

impl CompletionLogprobs {
    /// From chat completions' entries (`{token, logprob, bytes, top_logprobs: [{token, logprob}]}`, as
    /// the backends send them), keeping `top` alternatives each, the offsets counted on by `offsets`.
    pub fn from_chat(entries: &[Value], top: usize, offsets: &mut TextOffsets) -> Self {
        let mut out = Self::default();
        for e in entries {
            let token = e["token"].as_str().unwrap_or_default().to_string();
            let logprob = e["logprob"].as_f64().unwrap_or(NO_CHANCE);
            let mut alternatives: std::collections::BTreeMap<String, f64> =
                (e["top_logprobs"].as_array().into_iter().flatten().take(top))
                    .filter_map(|t| {
                        Some((t["token"].as_str()?.to_string(), t["logprob"].as_f64()?))
                    })
                    .collect();
            alternatives.insert(token.clone(), logprob);
            let bytes: Vec<u8> = match e["bytes"].as_array() {
                Some(b) => b
                    .iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u8)
                    .collect(),
                None => token.as_bytes().to_vec(),
            };
            out.text_offset.push(offsets.next(&bytes));
            out.tokens.push(token);
            out.token_logprobs.push(Some(logprob));
            out.top_logprobs.push(alternatives);
        }
        out
    }

    /// Back into chat completions' entries (what an upstream's `/v1/completions` answered, as the
    /// backends pass it on), the alternatives most likely first.
    pub fn to_chat(&self) -> Vec<Value> {
        (0..self.tokens.len())
            .map(|i| {
                let mut top: Vec<(&String, &f64)> = self
                    .top_logprobs
                    .get(i)
                    .map(|m| m.iter().collect())
                    .unwrap_or_default();
                top.sort_by(|a, b| b.1.total_cmp(a.1));
                serde_json::json!({
                    "token": self.tokens[i],
                    "logprob": self.token_logprobs.get(i).copied().flatten().unwrap_or(NO_CHANCE),
                    "bytes": Value::Null,
                    "top_logprobs": top
                        .into_iter()
                        .map(|(t, l)| serde_json::json!({"token": t, "logprob": l, "bytes": Value::Null}))
                        .collect::<Vec<_>>(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod completion_logprobs_tests {
    use super::*;

    /// Offsets count characters after the prompt; a character split across two tokens counts once
    /// (é is 0xC3 0xA9), and the chosen token joins its alternatives.
    #[test]
    fn offsets_count_whole_characters_after_the_prompt() {
        let entry = |t: &str, b: &[u8], lp: f64| {
            serde_json::json!({"token": t, "logprob": lp, "bytes": b,
                "top_logprobs": [{"token": "x", "logprob": -1.0}, {"token": "y", "logprob": -2.0}]})
        };
        let entries = [
            entry("ab", b"ab", -0.5),
            entry("\u{fffd}", &[0xC3], -0.1),
            entry("\u{fffd}", &[0xA9], -0.2),
            entry("c", b"c", -0.3),
        ];
        let mut offsets = TextOffsets::after("Héllo");
        let lp = CompletionLogprobs::from_chat(&entries[..2], 1, &mut offsets);
        let rest = CompletionLogprobs::from_chat(&entries[2..], 1, &mut offsets);
        assert_eq!(lp.text_offset, [5, 7]);
        assert_eq!(rest.text_offset, [7, 8], "é counted once, when whole");
        assert_eq!(
            lp.top_logprobs[0].len(),
            2,
            "one alternative and the chosen token"
        );
        assert_eq!(lp.top_logprobs[0]["ab"], -0.5);
        // An invalid byte is one character, and the count goes on.
        let mut offsets = TextOffsets::after("");
        let bad = [entry("?", &[0xFF], -1.0), entry("z", b"z", -1.0)];
        assert_eq!(
            CompletionLogprobs::from_chat(&bad, 0, &mut offsets).text_offset,
            [0, 1]
        );
    }
}

/// Token usage (OpenAI's `usage` object).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Generated tokens, thinking included.
    pub completion_tokens: u64,
    /// Sum.
    pub total_tokens: u64,
    /// How much of the prompt came from the prefix cache.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// How much of the answer was thinking.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

/// OpenAI's `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV cache was reused from an earlier request instead of being prefilled.
    #[serde(default, deserialize_with = "lenient")]
    pub cached_tokens: u64,
    /// Prompt tokens that hold audio: the soft tokens of the request's clips and of its videos' sound, as
    /// the answering model's audio tower produced them (one per 40 ms for Gemma 4), markers excluded.
    #[serde(default, deserialize_with = "lenient")]
    pub audio_tokens: u64,
}

/// OpenAI's `usage.completion_tokens_details`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CompletionTokensDetails {
    /// Generated tokens spent thinking: those inside Gemma 4's thinking channel, its markers included.
    #[serde(default, deserialize_with = "lenient")]
    pub reasoning_tokens: u64,
}

impl Usage {
    /// Usage from counts: `cached` of the prompt's tokens came from the prefix cache and `reasoning` of the
    /// completion's were thinking.
    pub fn new(prompt: u64, completion: u64, cached: u64, reasoning: u64) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: Some(PromptTokensDetails {
                cached_tokens: cached,
                audio_tokens: 0,
            }),
            completion_tokens_details: Some(CompletionTokensDetails {
                reasoning_tokens: reasoning,
            }),
        }
    }

    /// This usage with `audio` of its prompt tokens holding audio
    /// (`prompt_tokens_details.audio_tokens`).
    pub fn with_audio_tokens(mut self, audio: u64) -> Self {
        self.prompt_tokens_details
            .get_or_insert_with(Default::default)
            .audio_tokens = audio;
        self
    }

    /// Prompt tokens that hold audio (0 when the backend did not say).
    pub fn audio_tokens(&self) -> u64 {
        self.prompt_tokens_details.map_or(0, |d| d.audio_tokens)
    }

    /// Prompt tokens served from the prefix cache (0 when the backend did not say).
    pub fn cached_tokens(&self) -> u64 {
        self.prompt_tokens_details.map_or(0, |d| d.cached_tokens)
    }

    /// Generated tokens that were thinking (0 when the backend did not say).
    pub fn reasoning_tokens(&self) -> u64 {
        self.completion_tokens_details
            .map_or(0, |d| d.reasoning_tokens)
    }
}

/// `_routing`: how the gateway answered.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Routing {
    /// Tier that produced the answer.
    pub tier: String,
    /// Model that produced it.
    pub model: String,
    /// Why this tier was chosen first.
    pub reason: String,
    /// Wall time of the whole request, in milliseconds.
    pub latency_ms: u64,
    /// Time to the first content token, in milliseconds.
    pub ttft_ms: Option<u64>,
    /// Prompt tokens (of the answering tier).
    pub prompt_tokens: u64,
    /// Of those, the ones served from the answering tier's prefix cache.
    #[serde(default)]
    pub cached_tokens: u64,
    /// Generated tokens (all tiers, for a continued stream).
    pub completion_tokens: u64,
    /// Fallback hops, e.g. `["heavy→primary: breaker open"]`; a pool's retries within a tier read
    /// `primary[node-a]: upstream error 500: …`.
    pub fallback: Vec<String>,
    /// The endpoint of a pooled tier that answered (its `name`, else its URL's host:port); absent for a
    /// tier of one backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Decode speed of the answering tier, in tokens per second, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// What speculative decoding did for this answer; absent when the tier did not speculate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculative: Option<Speculation>,
    /// How much of each video the answering model was shown and heard, in the order of the request's
    /// `video_url` parts (the tier that finished the answer: each tier samples a video its own way);
    /// absent without videos, and for an upstream tier (sent the parts as they came).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub videos: Vec<VideoSeen>,
}

/// How much of one video the answering model was given (`_routing.videos`). A tier samples a clip into
/// `video_frames` frames spread over at most its first `video_seconds` (fast 4 over 30 s, primary 8 over
/// 60 s, heavy 16 over 120 s by default) and, for a model that hears, up to 30 s of its sound: a longer clip
/// is seen in part, and that is said here rather than left for the client to guess.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VideoSeen {
    /// The request part the video came in, e.g. `messages[0].content[1].video_url`.
    pub part: String,
    /// The clip's length, seconds (as its container states it).
    pub duration_seconds: f64,
    /// Seconds from the clip's start its frames were taken over (≤ `duration_seconds`): frame `j` of `n`
    /// shows `seconds_seen · j / n`.
    pub seconds_seen: f64,
    /// Frames the model was shown.
    pub frames: usize,
    /// What became of the clip's sound.
    pub sound: VideoSound,
    /// Seconds of the sound the model heard, from the clip's start (0 unless `sound` is `heard`).
    pub seconds_heard: f64,
}

/// What became of a video's sound track ([`VideoSeen::sound`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VideoSound {
    /// The model heard it (its first `seconds_heard` seconds).
    Heard,
    /// The clip has no sound track, or none in the span that was seen.
    NoTrack,
    /// The clip has sound, but the answering model takes no audio: it saw the frames only.
    NotHeard,
}

/// Speculative decoding's figures for one answer (`_routing.speculative`), in vLLM's terms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Speculation {
    /// Verifications of drafted tokens by the answering model.
    pub verify_steps: u64,
    /// Tokens the draft model proposed.
    pub draft_tokens: u64,
    /// Of those, the ones that stood.
    pub accepted_tokens: u64,
    /// `accepted_tokens / draft_tokens` (0 to 1).
    pub acceptance_rate: f64,
    /// Tokens per verification: the drafts that stood plus the one after them (1 to k + 1).
    pub tokens_per_step: f64,
}

impl Speculation {
    /// The figures of `verify_steps` verifications of `draft_tokens` drafts, `accepted_tokens` standing.
    pub fn new(verify_steps: u64, draft_tokens: u64, accepted_tokens: u64) -> Self {
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        Self {
            verify_steps,
            draft_tokens,
            accepted_tokens,
            acceptance_rate: ratio(accepted_tokens, draft_tokens),
            tokens_per_step: ratio(accepted_tokens + verify_steps, verify_steps),
        }
    }
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    /// One entry per tier.
    pub data: Vec<Model>,
}

/// A tier as a model.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Model {
    /// The tier's name (`fast`, `primary`, `heavy`): what `model` takes.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Always 0: tiers have no creation date.
    pub created: u64,
    /// Always `jemma`.
    pub owned_by: String,
    /// The model the tier serves.
    pub root: String,
    /// `ready`, `loading 42%`, `disabled`, `breaker_open`, ...
    pub state: String,
    /// What the tier's model takes in (`text`, `image`), when known; absent for an upstream, which says
    /// what it takes only by answering.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>, example = json!(["text", "image"]))]
    pub input_modalities: Vec<jemma_media::Modality>,
}

/// OpenAI's error body: `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorObject,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorObject {
    /// For people.
    pub message: String,
    /// `invalid_request_error`, `rate_limit_error`, `service_unavailable`, `timeout`, `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault (`messages[2].content[1]`), when one is.
    pub param: Option<String>,
    /// A stable code (`invalid_request`, `model_not_found`, `tier_busy`, `all_tiers_down`, ...).
    pub code: Option<String>,
    /// With `all_tiers_down`: what each tier said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_chunks_in_other_servers_shapes_are_read_not_refused() {
        // vLLM (reasoning under both names, stop_reason, nulls), llama-server (a timings object, a
        // float created), TGI (a system_fingerprint and a null usage), and fields in shapes Jemma does
        // not expect: none fails the answer.
        for (raw, content, reasoning, finish) in [
            (
                r#"{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,
                "delta":{"reasoning_content":"hm","reasoning":"hm","content":null},"logprobs":null,
                "finish_reason":null,"stop_reason":null}]}"#,
                None,
                Some("hm"),
                None,
            ),
            (
                r#"{"choices":[{"finish_reason":"stop","index":0,"delta":{"content":"ok"}}],
                "created":1717171717.5,"id":null,"model":"g","object":"chat.completion.chunk",
                "timings":{"predicted_n":3}}"#,
                Some("ok"),
                None,
                Some(FinishReason::Stop),
            ),
            (
                r#"{"id":"","object":"chat.completion.chunk","created":1,"model":"m",
                "system_fingerprint":"3.0","usage":null,"choices":[{"index":0,"delta":null,
                "finish_reason":{"odd":true}}]}"#,
                None,
                None,
                None,
            ),
        ] {
            let c: ChatCompletionChunk = serde_json::from_str(raw).unwrap();
            let choice = &c.choices[0];
            assert_eq!(choice.delta.content.as_deref(), content, "{raw}");
            assert_eq!(
                choice
                    .delta
                    .reasoning_content
                    .as_deref()
                    .or(choice.delta.reasoning.as_deref()),
                reasoning
            );
            assert_eq!(choice.finish_reason, finish, "{raw}");
        }
        // Usage with a null detail keeps its counts.
        let c: ChatCompletionChunk = serde_json::from_str(
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,
            "prompt_tokens_details":{"cached_tokens":null}}}"#,
        )
        .unwrap();
        let u = c.usage.unwrap();
        assert_eq!((u.prompt_tokens, u.cached_tokens()), (5, 0));
    }
}
