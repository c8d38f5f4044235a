//! The OpenAI request bodies and their validation into the [`ChatRequest`] every backend receives.
//!
//! Validation happens here, once, and reports the offending field (`param`) so the HTTP layer can answer
//! with OpenAI's error shape. A field the API does not define is refused by name, as OpenAI refuses an
//! unrecognized argument ([`refuse_extra`]): a field accepted is a field honoured.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::message::{InputAudio, Message, MessageContent, ResponseFormat, Tool, ToolChoice};
use crate::RouterError;
use jemma_media::Modality;

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, ToSchema)]
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

/// `stream_options` (read with `stream: true`; without it there is nothing they could change, and they
/// are ignored, as vLLM and llama-server ignore them).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a final chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
    /// OpenAI's padding of each chunk against length side channels: `false` is honoured (none is sent);
    /// `true` is refused (nothing here pads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_obfuscation: Option<bool>,
}

impl StreamOptions {
    /// The options checked against the request's `stream`.
    fn check(&self, stream: bool) -> Result<(), RouterError> {
        if stream && self.include_obfuscation == Some(true) {
            return Err(RouterError::invalid(
                "stream_options.include_obfuscation: true cannot be honoured (chunks are not padded)",
                "stream_options.include_obfuscation",
            ));
        }
        Ok(())
    }
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// Tier (`fast|primary|heavy`), a model id, or `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The conversation.
    #[schema(min_items = 1)]
    pub messages: Vec<Message>,
    /// Deprecated OpenAI name of `max_completion_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    /// Most tokens to generate, thinking included (≥ 1; absent: the tier's default, lowered to what the
    /// context leaves after the prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature, 0–2: 0 is greedy (the most likely token), higher flattens the distribution.
    /// Absent: 0 on an in-process tier; an upstream applies its own default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: draw from the smallest set of tokens whose probability reaches this mass,
    /// in (0, 1] (absent or 1: off).
    #[serde(
        default,
        deserialize_with = "positive_f32",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f32>,
    /// Draw from the k most likely tokens only (≥ 0; absent or 0: off). An extension, as in vLLM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub top_k: Option<i32>,
    /// Drop tokens less likely than `min_p` × the most likely one's probability, in [0, 1] (absent or 0:
    /// off). An extension, as in vLLM and mlx-lm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 1)]
    pub min_p: Option<f32>,
    /// Strings that end the answer where they first appear, not included in it (one, or a list of at most
    /// 8; `_routing` and Anthropic's `stop_sequence` name the one that matched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Seeds the sampler: the same seed, request and tier give the same answer (absent: a fresh draw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Subtracted once from the logit of every token already in the recent context, −2 to 2 (absent: 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f32>,
    /// Subtracted from a token's logit once per time it is in the recent context, −2 to 2 (absent: 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f32>,
    /// Divides (or, for a negative logit, multiplies) the logits of tokens in the last 20 generated or
    /// prompt tokens, > 0 (absent or 1: off). An extension, as mlx-lm's `repetition_penalty`.
    #[serde(
        default,
        deserialize_with = "positive_f32",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(exclusive_minimum = 0)]
    pub repetition_penalty: Option<f32>,
    /// Added to a token's logit before sampling: token id (as a string) → bias in [−100, 100]; −100 bans
    /// the token, 100 all but forces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// Return each generated token's log-probability under the model: the log-softmax of its raw logits,
    /// before `logit_bias`, penalties, `response_format` and temperature (vLLM's default; see
    /// `jemma_chat::logprobs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// How many most likely alternatives per token, best first (0–20; needs `logprobs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 20)]
    pub top_logprobs: Option<u32>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// `none`, `auto`, `required` or a specific function (which must be one of `tools`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// Whether the model may call several tools in one answer (OpenAI's default: true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// What the answer must be: text, any JSON object, or JSON valid against a schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    /// End-user id (accepted as OpenAI's, which uses it for abuse monitoring; not used here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Number of choices (only 1 is supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<u32>,
    /// Gemma 4 thinking (extension; also accepted as chat_template_kwargs.enable_thinking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_thinking: Option<bool>,
    /// vLLM-style template arguments (enable_thinking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub chat_template_kwargs: Option<BTreeMap<String, Value>>,
    /// How hard the model thinks: `none`, `minimal` or `low` answer without thinking, `medium`, `high`,
    /// `xhigh` or `max` think first (Gemma 4 thinks or not; as the Responses API's `reasoning.effort`).
    /// `enable_thinking` wins when both are sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
    /// Most tokens the answer may spend thinking (vLLM's `thinking_token_budget`; Anthropic's
    /// `thinking.budget_tokens` arrives here too). Once a thought holds this many tokens the engine
    /// makes the next one Gemma 4's end of thinking (`<channel|>`), so the model answers; a thought
    /// opened after that closes at once. 0: no thought has any tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking_token_budget: Option<u32>,
    /// The fields this API does not define, kept to be refused by name ([`refuse_extra`]).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(ignore)]
    pub extra: BTreeMap<String, Value>,
}

/// Which body [`refuse_extra`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Chat,
    Completion,
}

/// Refuses the fields of a body that its type does not define (400, `param` naming the field), as OpenAI
/// refuses an unrecognized argument, except those of OpenAI's that ask for nothing Jemma leaves undone:
/// `store: false`, `metadata` (kept only with a stored completion), `service_tier` `auto` or `default`,
/// the hints `prompt_cache_key`, `prompt_cache_retention` and `safety_identifier` (the prefix cache
/// works without them), `functions: []` and `function_call` `none` or `auto` with no functions,
/// `modalities: ["text"]` and `verbosity: "medium"`; and on `/v1/completions` `best_of: 1` and an
/// empty `suffix`. A null stands for an absent field. Those OpenAI defines that Jemma cannot honour are
/// refused with the reason (`functions`: send `tools`; audio output, predicted outputs, web search;
/// completion `suffix` and `best_of` above 1).
fn refuse_extra(extra: &BTreeMap<String, Value>, body: Body) -> Result<(), RouterError> {
    for (k, v) in extra.iter().filter(|(_, v)| !v.is_null()) {
        let fine = match (k.as_str(), body) {
            ("store", _) => v == &Value::Bool(false),
            ("metadata", _) => v.is_object(),
            ("service_tier", _) => matches!(v.as_str(), Some("auto" | "default")),
            ("prompt_cache_key" | "prompt_cache_retention" | "safety_identifier", _) => {
                v.is_string()
            }
            // No functions offered, none called: nothing asked.
            ("functions", Body::Chat) => v.as_array().is_some_and(Vec::is_empty),
            ("function_call", Body::Chat) => {
                matches!(v.as_str(), Some("none" | "auto"))
                    && extra
                        .get("functions")
                        .is_none_or(|f| f.is_null() || f.as_array().is_some_and(Vec::is_empty))
            }
            ("modalities", Body::Chat) => v == &serde_json::json!(["text"]),
            ("verbosity", Body::Chat) => v.as_str() == Some("medium"),
            ("best_of", Body::Completion) => v.as_u64() == Some(1),
            ("suffix", Body::Completion) => v.as_str() == Some(""),
            _ => false,
        };
        if fine {
            continue;
        }
        let why = match (k.as_str(), body) {
            ("store", _) => "store: Jemma keeps no completions (store must be false)".into(),
            ("metadata", _) => "metadata must be an object".into(),
            ("service_tier", _) => {
                "service_tier: this server has one service tier (auto or default)".into()
            }
            ("prompt_cache_key" | "prompt_cache_retention" | "safety_identifier", _) => {
                format!("{k} must be a string")
            }
            ("functions" | "function_call", Body::Chat) => {
                format!("{k} (deprecated) is not supported: send tools and tool_choice")
            }
            ("modalities" | "audio", Body::Chat) => {
                format!("{k}: Gemma answers in text only (modalities [\"text\"])")
            }
            ("verbosity", Body::Chat) => "verbosity cannot be honoured (only medium)".into(),
            ("prediction", Body::Chat) => "prediction (predicted outputs) is not supported".into(),
            ("web_search_options", Body::Chat) => {
                "web_search_options: this server has no web search".into()
            }
            ("best_of", Body::Completion) => "only best_of=1 is supported".into(),
            ("suffix", Body::Completion) => "suffix (insertion) is not supported".into(),
            _ => format!("Unrecognized request argument supplied: {k}"),
        };
        return Err(RouterError::invalid(why, k.as_str()));
    }
    Ok(())
}

/// Thinking asked for with OpenAI's `reasoning_effort` (or the Responses API's `reasoning.effort`):
/// Gemma 4 thinks or not, so the lower efforts answer without it. Errors: another value, as a 400 on
/// `param`.
pub(crate) fn thinking_for_effort(effort: &str, param: &str) -> Result<bool, RouterError> {
    match effort {
        "none" | "minimal" | "low" => Ok(false),
        "medium" | "high" | "xhigh" | "max" => Ok(true),
        _ => Err(RouterError::invalid(
            format!("{param} must be none, minimal, low, medium, high, xhigh or max"),
            param,
        )),
    }
}

/// A validated, normalised request as backends receive it.
#[derive(Debug, Clone, Serialize)]
pub struct ChatRequest {
    /// What the client asked for in `model` (for echoing back).
    pub requested_model: String,
    /// Messages (content parts kept; tool_call arguments normalised to JSON strings).
    pub messages: Vec<Message>,
    /// Tools (None when there are none).
    pub tools: Option<Vec<Tool>>,
    /// Tool choice, checked against `tools` (None: the client did not say, which means `auto`).
    pub tool_choice: Option<ToolChoice>,
    /// Whether several tool calls may come in one answer (None: the client did not say; OpenAI's default
    /// is true).
    pub parallel_tool_calls: Option<bool>,
    /// Most tokens to generate (`max_completion_tokens`, else `max_tokens`; None: the tier's default).
    pub max_tokens: Option<u32>,
    /// Temperature, 0–2 (None: 0 in process, the upstream's default otherwise).
    pub temperature: Option<f32>,
    /// Nucleus mass, in (0, 1] (None: off).
    pub top_p: Option<f32>,
    /// Top-k, ≥ 0 (None or 0: off).
    pub top_k: Option<i32>,
    /// Min-p, in [0, 1] (None or 0: off).
    pub min_p: Option<f32>,
    /// Stop strings, at most [`Limits::max_stop`].
    pub stop: Vec<String>,
    /// Sampler seed (None: a fresh draw).
    pub seed: Option<u64>,
    /// Presence penalty, −2 to 2 (None: 0).
    pub presence_penalty: Option<f32>,
    /// Frequency penalty, −2 to 2 (None: 0).
    pub frequency_penalty: Option<f32>,
    /// Repetition penalty, > 0 (None or 1: off).
    pub repetition_penalty: Option<f32>,
    /// (token id, bias in [−100, 100]) pairs, ids checked against the request's form only (the engine
    /// checks them against its vocabulary).
    pub logit_bias: Vec<(u32, f32)>,
    /// Whether each generated token's log-probability is reported (see `jemma_chat::logprobs` for which
    /// distribution).
    pub logprobs: bool,
    /// Alternatives reported per token with `logprobs`, 0–20.
    pub top_logprobs: u32,
    /// What the answer must be (`response_format`).
    pub response_format: ResponseFormat,
    /// Thinking on/off.
    pub enable_thinking: Option<bool>,
    /// OpenAI's `reasoning_effort` (or the Responses API's `reasoning.effort`) as the client gave it,
    /// when `enable_thinking` came from it (None: it did not, or none was given). An upstream that
    /// speaks only OpenAI's API is sent this rather than the thinking switch (see [`crate::dialect`]).
    pub reasoning_effort: Option<String>,
    /// Most tokens the answer may spend thinking (`thinking_token_budget`), enforced by the engines.
    pub thinking_token_budget: Option<u32>,
    /// Streaming.
    pub stream: bool,
    /// Usage chunk in streams.
    pub include_usage: bool,
    /// Whether any message carries an image part.
    pub has_images: bool,
    /// The messages' images, fetched and decoded, in message order (what a local engine sees); filled by
    /// [`ChatRequest::decode_images`]. An upstream tier is sent the parts as they came.
    #[serde(skip)]
    pub images: Vec<jemma_media::DecodedImage>,
    /// Whether any message carries an audio part.
    pub has_audio: bool,
    /// The messages' audio clips, decoded to 16 kHz mono, in message order (what a local engine hears);
    /// filled by [`ChatRequest::decode_audio`]. An upstream tier is sent the parts as they came.
    #[serde(skip)]
    pub audio: Vec<jemma_media::audio::DecodedAudio>,
    /// Whether any message carries a video part.
    pub has_videos: bool,
    /// The messages' videos, sampled (frames and audio track), in message order; filled by
    /// [`ChatRequest::decode_videos`] for a local engine. An upstream tier is sent the parts as they came.
    #[serde(skip)]
    pub videos: Vec<jemma_media::video::DecodedVideo>,
    /// How the tier trying the request samples videos (frames over how many seconds); set by the router
    /// for each tier it tries (None: [`jemma_media::video::VideoParams::default`]).
    #[serde(skip)]
    pub video_sampling: Option<jemma_media::video::VideoParams>,
    /// Text of the conversation for the classifier (system + user turns).
    pub text: String,
    /// Text of the last user turn.
    pub last_user: String,
    /// Rough prompt length in tokens (4 chars/token) for routing before the tokenizer runs.
    pub prompt_tokens_estimate: usize,
    /// `/v1/completions`: a plain prompt, read with no chat template, by the local engines and by an
    /// upstream's own `/v1/completions` (messages also hold it as one user turn, for the classifier).
    pub raw_prompt: Option<String>,
    /// Sent here by another Jemma node's pool (`x-jemma-forwarded`): served by this node's own tier
    /// only, with no fallback and no forwarding to further peers, so that nodes pooling each other
    /// cannot pass a request around.
    pub forwarded: bool,
}

impl ChatRequest {
    /// Whether a penalty is set past its neutral value (`presence_penalty` or `frequency_penalty` other
    /// than 0, `repetition_penalty` other than 1), as [`jemma_chat::sampling::SamplingParams::has_penalties`].
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty.is_some_and(|r| r != 1.0)
            || self.presence_penalty.is_some_and(|p| p != 0.0)
            || self.frequency_penalty.is_some_and(|f| f != 0.0)
    }

    /// Fetches the messages' http(s) image URLs ([`crate::media::ImageFetcher`]: public addresses only unless
    /// `fetch_private_media_urls`, `image/*`, within `max_image_bytes` and the timeout) and decodes every
    /// image (off the async runtime: a large JPEG takes a while), so that a bad image is refused before any
    /// tier is tried, in the API's own terms: corrupt bytes, an unreachable or private URL 400, over
    /// `max_image_bytes` or the pixel limit 413, a format this build cannot read (HEIC) 415.
    ///
    /// Errors: as above, naming the message part.
    pub async fn decode_images(&mut self, limits: &Limits) -> Result<(), RouterError> {
        if !self.has_images {
            return Ok(());
        }
        let mut urls = vec![];
        let mut low = vec![];
        for (at, p) in self.content_parts() {
            if let super::message::ContentPart::ImageUrl { image_url } = p {
                urls.push((format!("{at}.image_url.url"), image_url.url.clone()));
                low.push(image_url.detail.as_deref() == Some("low"));
            }
        }
        let max_bytes = limits.max_image_bytes;
        // http(s) images are fetched first (concurrently), then everything is decoded off the runtime.
        let fetcher = crate::media::fetcher(
            std::time::Duration::from_secs_f64(limits.media_fetch_timeout_secs.max(0.1)),
            limits.fetch_private_media_urls,
        )
        .map_err(|e| RouterError::Config(format!("image fetcher: {e}")))?;
        // At most 4 fetches at once, in order.
        use futures_util::StreamExt;
        let jobs: Vec<(String, String, crate::media::ImageFetcher)> = urls
            .iter()
            .map(|(at, url)| (at.clone(), url.clone(), fetcher.clone()))
            .collect();
        let fetched: Vec<_> =
            futures_util::stream::iter(jobs.into_iter().map(|(at, url, f)| async move {
                if url.starts_with("data:") {
                    return Ok(None);
                }
                f.fetch(&url, max_bytes)
                    .await
                    .map(Some)
                    .map_err(|e| match e {
                        crate::media::FetchError::TooLarge(_) => {
                            RouterError::too_large(format!("{at}: {e}"), Some(&at))
                        }
                        e => RouterError::invalid(format!("{at}: {e}"), &at),
                    })
            }))
            .buffered(4)
            .collect()
            .await;
        let max_pixels = limits.max_request_pixels;
        let mut inputs = vec![];
        for ((at, url), f) in urls.into_iter().zip(fetched) {
            inputs.push((at, url, f?));
        }
        let decoded = tokio::task::spawn_blocking(move || {
            let mut out = vec![];
            let mut pixels = 0u64;
            for (at, url, fetched) in inputs {
                let fail = |e: jemma_media::MediaError| media_refusal(&at, &at, e);
                let encoded = match fetched {
                    Some(bytes) => jemma_media::EncodedImage(bytes.into()),
                    None => jemma_media::decode_data_url(&url, max_bytes).map_err(fail)?,
                };
                let limits = jemma_media::Limits {
                    max_bytes,
                    ..Default::default()
                };
                let img = encoded.decode(&limits).map_err(fail)?;
                pixels += (img.rgb.width * img.rgb.height) as u64;
                if pixels > max_pixels {
                    return Err(RouterError::too_large(
                        format!("{at}: the request's images come to more than {max_pixels} pixels"),
                        Some(&at),
                    ));
                }
                out.push(img);
            }
            Ok::<_, RouterError>(out)
        })
        .await
        .map_err(|e| RouterError::InvalidRequest {
            message: format!("decoding the images failed: {e}"),
            param: None,
        })??;
        self.images = decoded
            .into_iter()
            .zip(low)
            .map(|(img, low)| if low { img.at_low_detail() } else { img })
            .collect();
        Ok(())
    }

    /// Decodes the messages' audio parts (base64, then the clip, off the async runtime) into 16 kHz mono,
    /// for a local engine that hears (an upstream tier is sent the parts as they came), before the engine
    /// is asked: corrupt bytes or a clip under 40 ms 400, over `max_audio_bytes` or `max_audio_seconds`
    /// 413, a codec or container this build cannot decode (AIFF, CAF, Opus beyond stereo) 415. A no-op when the
    /// audio is decoded already.
    ///
    /// Errors: as above, naming the message part.
    pub async fn decode_audio(&mut self, limits: &Limits) -> Result<(), RouterError> {
        if !self.has_audio || !self.audio.is_empty() {
            return Ok(());
        }
        // Each part with where it is, for the error's `param`.
        let located: Vec<_> = self
            .content_parts()
            .filter_map(|(at, p)| match p {
                super::message::ContentPart::InputAudio { input_audio } => {
                    Some((format!("{at}.input_audio"), input_audio.clone()))
                }
                _ => None,
            })
            .collect();
        let audio_limits = jemma_media::audio::AudioLimits {
            max_bytes: limits.max_audio_bytes,
            max_seconds: limits.max_audio_seconds,
        };
        let decoded = tokio::task::spawn_blocking(move || {
            let mut out = vec![];
            for (at, a) in located {
                let bytes = jemma_media::audio::decode_base64(&a.data).map_err(|e| {
                    RouterError::invalid(format!("{at}.data: {e}"), &format!("{at}.data"))
                })?;
                let clip = jemma_media::audio::decode_audio(&bytes, Some(&a.format), &audio_limits)
                    .map_err(|e| media_refusal(&at, &format!("{at}.data"), e))?;
                out.push(clip);
            }
            Ok::<_, RouterError>(out)
        })
        .await
        .map_err(|e| RouterError::InvalidRequest {
            message: format!("decoding the audio failed: {e}"),
            param: None,
        })??;
        self.audio = decoded;
        Ok(())
    }

    /// What the request needs a model to take in beyond text, in [`Modality`]'s order.
    pub fn media_modalities(&self) -> Vec<Modality> {
        let mut m = vec![];
        if self.has_images {
            m.push(Modality::Image);
        }
        if self.has_audio {
            m.push(Modality::Audio);
        }
        if self.has_videos {
            m.push(Modality::Video);
        }
        m
    }

    /// Where the first part of `modality` is, as an error's `param`: `messages[i].content[j]`.
    pub fn first_part(&self, modality: Modality) -> Option<String> {
        self.content_parts()
            .find(|(_, p)| match p {
                super::message::ContentPart::ImageUrl { .. } => modality == Modality::Image,
                super::message::ContentPart::InputAudio { .. } => modality == Modality::Audio,
                super::message::ContentPart::VideoUrl { .. } => modality == Modality::Video,
                super::message::ContentPart::Text { .. } => false,
            })
            .map(|(at, _)| at)
    }

    /// Every content part of the messages, in order, with where it is: `messages[i].content[j]`.
    fn content_parts(&self) -> impl Iterator<Item = (String, &super::message::ContentPart)> {
        self.messages.iter().enumerate().flat_map(|(i, m)| {
            let parts = match m.content() {
                Some(MessageContent::Parts(ps)) => ps.as_slice(),
                _ => &[],
            };
            parts
                .iter()
                .enumerate()
                .map(move |(j, p)| (format!("messages[{i}].content[{j}]"), p))
        })
    }

    /// The request's media in words, for routing reasons and errors: "images", "audio", "video", "images
    /// and audio", … (None without media).
    pub fn media_words(&self) -> Option<String> {
        let words: Vec<&str> = self
            .media_modalities()
            .into_iter()
            .map(Modality::words)
            .collect();
        match words.as_slice() {
            [] => None,
            [one] => Some(one.to_string()),
            [rest @ .., last] => Some(format!("{} and {last}", rest.join(", "))),
        }
    }

    /// The messages' `video_url` parts in order, as (where, URL): `messages[i].content[j].video_url`.
    pub fn video_parts(&self) -> Vec<(String, &str)> {
        self.content_parts()
            .filter_map(|(at, p)| match p {
                super::message::ContentPart::VideoUrl { video_url } => {
                    Some((format!("{at}.video_url"), video_url.url.as_str()))
                }
                _ => None,
            })
            .collect()
    }

    /// How much of each sampled video (`videos`, [`ChatRequest::decode_videos`]) a model is given: what
    /// `_routing.videos` reports. `hears` says whether the model takes audio. Empty before sampling.
    pub fn videos_seen(&self, hears: bool) -> Vec<super::VideoSeen> {
        use super::VideoSound;
        self.video_parts()
            .into_iter()
            .zip(&self.videos)
            .map(|((part, _), v)| {
                let (sound, seconds_heard) = match &v.audio {
                    Some(a) => (
                        VideoSound::Heard,
                        a.samples.len() as f64 / jemma_media::audio::SAMPLE_RATE as f64,
                    ),
                    None if v.has_audio_track && !hears => (VideoSound::NotHeard, 0.0),
                    None => (VideoSound::NoTrack, 0.0),
                };
                super::VideoSeen {
                    part,
                    duration_seconds: v.duration,
                    seconds_seen: v.span,
                    frames: v.frames.len(),
                    sound,
                    seconds_heard,
                }
            })
            .collect()
    }

    /// Samples the messages' videos (fetching http(s) URLs as images are fetched, `video/*`) through the
    /// ffmpeg CLI, off the async runtime, with `params` (the tier's frames and seconds; the audio track
    /// only when `audio_seconds` > 0): a video that cannot be read 400, over `max_video_bytes` 413, no
    /// ffmpeg on this server 415. A no-op when sampled already.
    ///
    /// Errors: as above, naming the message part.
    pub async fn decode_videos(
        &mut self,
        limits: &Limits,
        params: jemma_media::video::VideoParams,
    ) -> Result<(), RouterError> {
        if !self.has_videos || !self.videos.is_empty() {
            return Ok(());
        }
        let located: Vec<(String, String)> = self
            .video_parts()
            .into_iter()
            .map(|(at, url)| (format!("{at}.url"), url.to_string()))
            .collect();
        let Some(ffmpeg) = jemma_media::video::Ffmpeg::find() else {
            let at = located.first().map_or("video_url", |l| l.0.as_str());
            return Err(RouterError::unsupported_media(
                format!(
                    "{at}: video cannot be read on this server: ffmpeg was not found (install ffmpeg, or \
                     set JEMMA_FFMPEG_DIR to the folder that holds ffmpeg and ffprobe)"
                ),
                at,
            ));
        };
        let max_bytes = limits.max_video_bytes;
        let fetcher = crate::media::fetcher(
            std::time::Duration::from_secs_f64(limits.media_fetch_timeout_secs.max(0.1)),
            limits.fetch_private_media_urls,
        )
        .map_err(|e| RouterError::Config(format!("media fetcher: {e}")))?;
        let mut inputs = vec![];
        for (at, url) in located {
            let bytes = if url.starts_with("data:") {
                jemma_media::decode_data_url(&url, max_bytes)
                    .map_err(|e| media_refusal(&at, &at, e))?
                    .0
                    .to_vec() as Vec<u8>
            } else {
                fetcher
                    .fetch_kind(&url, max_bytes, "video/")
                    .await
                    .map_err(|e| match e {
                        crate::media::FetchError::TooLarge(_) => {
                            RouterError::too_large(format!("{at}: {e}"), Some(&at))
                        }
                        e => RouterError::invalid(format!("{at}: {e}"), &at),
                    })?
            };
            inputs.push((at, bytes));
        }
        let media_limits = jemma_media::Limits {
            max_bytes,
            ..Default::default()
        };
        let max_pixels = limits.max_request_pixels;
        // A client that goes away drops this future: the guard then stops the sampling (ffmpeg killed
        // within milliseconds) instead of letting it run to its deadline for nobody.
        let cancelled = Arc::new(AtomicBool::new(false));
        let _stop_when_dropped = CancelOnDrop(cancelled.clone());
        let decoded = tokio::task::spawn_blocking(move || {
            inputs
                .into_iter()
                .map(|(at, bytes)| {
                    ffmpeg
                        .decode_cancellable(&bytes, &params, &media_limits, max_pixels, &cancelled)
                        .map_err(|e| media_refusal(&at, &at, e))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| RouterError::InvalidRequest {
            message: format!("sampling the videos failed: {e}"),
            param: None,
        })??;
        self.videos = decoded;
        Ok(())
    }

    /// Whether the answer is held to a grammar: JSON (`response_format`), forced tool calls
    /// (`tool_choice` `required` or a named function), or a strict function's calls under `auto` (a
    /// continuation on another tier would not know where the first left its call).
    pub fn is_constrained(&self) -> bool {
        self.response_format.is_json()
            || matches!(
                self.tool_choice,
                Some(ToolChoice::Required | ToolChoice::Function(_))
            )
            || (self
                .tool_choice
                .as_ref()
                .is_none_or(|c| *c == ToolChoice::Auto)
                && self
                    .tools
                    .iter()
                    .flatten()
                    .any(|t| t.function.strict == Some(true)))
    }
}

/// Reads a number that must be above 0 (`top_p`, `repetition_penalty`) into an f32 without losing that: a
/// double too small for an f32 (JSON numbers are doubles) becomes the smallest positive f32, not 0, which
/// validation would then refuse although the client sent a valid value.
fn positive_f32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.map(|v| {
        let f = v as f32;
        if v > 0.0 && f == 0.0 {
            f32::MIN_POSITIVE
        } else {
            f
        }
    }))
}

/// Sets its flag when dropped: how a request's blocking media work learns that the request is gone.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A decoder's refusal of the media part at `at`, in the API's terms: over a limit 413, a format this build
/// cannot read 415, anything else a 400; each with `param` as its `param`.
fn media_refusal(at: &str, param: &str, e: jemma_media::MediaError) -> RouterError {
    use jemma_media::MediaError as M;
    let m = format!("{at}: {e}");
    match e {
        M::TooLarge(_) => RouterError::too_large(m, Some(param)),
        M::Unsupported(_) | M::AudioUnsupported(_) | M::VideoUnsupported(_) => {
            RouterError::unsupported_media(m, param)
        }
        M::Corrupt(_) | M::AudioCorrupt(_) | M::VideoCorrupt(_) => RouterError::invalid(m, param),
    }
}

fn validate_image_url(url: &str, param: &str, limits: &Limits) -> Result<(), RouterError> {
    validate_media_url(url, param, "image", limits.max_image_bytes)
}

/// An `image_url` or `video_url` URL: http(s), or base64 `data:{kind}/…` within `max_bytes`.
fn validate_media_url(
    url: &str,
    param: &str,
    kind: &str,
    max_bytes: usize,
) -> Result<(), RouterError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| RouterError::invalid(format!("{param}: malformed data URL"), param))?;
        if !meta.starts_with(&format!("{kind}/")) || !meta.ends_with(";base64") {
            return Err(RouterError::invalid(
                format!("{param}: data URL must be base64 {kind}/* data"),
                param,
            ));
        }
        // base64 is 4 chars per 3 bytes
        let bytes = data.len() / 4 * 3;
        if bytes > max_bytes {
            return Err(RouterError::too_large(
                format!("{param}: {kind} of ~{bytes} bytes exceeds the {max_bytes} byte limit"),
                Some(param),
            ));
        }
        if data.bytes().any(|b| {
            !(b.is_ascii_alphanumeric()
                || b == b'+'
                || b == b'/'
                || b == b'='
                || b == b'\n'
                || b == b'\r')
        }) {
            return Err(RouterError::invalid(
                format!("{param}: data URL is not valid base64"),
                param,
            ));
        }
        Ok(())
    } else if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(RouterError::invalid(
            format!("{param}: {kind}_url.url must be an http(s) or data: URL"),
            param,
        ))
    }
}

fn validate_input_audio(a: &InputAudio, param: &str, limits: &Limits) -> Result<(), RouterError> {
    let format = a.format.to_ascii_lowercase();
    if !jemma_media::audio::FORMATS.contains(&format.as_str()) {
        return Err(RouterError::invalid(
            format!(
                "format must be one of {}, not {:?}",
                jemma_media::audio::FORMATS.join(", "),
                a.format
            ),
            &format!("{param}.format"),
        ));
    }
    let bytes = a.data.len() / 4 * 3;
    if bytes > limits.max_audio_bytes {
        return Err(RouterError::too_large(
            format!(
                "{param}: audio of ~{bytes} bytes exceeds the {} byte limit",
                limits.max_audio_bytes
            ),
            Some(&format!("{param}.data")),
        ));
    }
    if a.data.is_empty()
        || a.data.bytes().any(|b| {
            !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'\n' | b'\r'))
        })
    {
        return Err(RouterError::invalid(
            "data must be the clip's bytes in base64",
            &format!("{param}.data"),
        ));
    }
    Ok(())
}

/// Request limits (configurable in `[limits]`; an unknown key is refused, as in every other section).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most messages in one request.
    pub max_messages: usize,
    /// Largest accepted `max_tokens`.
    pub max_tokens_ceiling: u32,
    /// Default `max_tokens` when the client gives none.
    pub default_max_tokens: u32,
    /// Images per message.
    pub max_images: usize,
    /// Images per request (each is fetched, decoded and held until the engine takes it).
    pub max_request_images: usize,
    /// Pixels of all of a request's images together, decoded (413 above; one image may have up to 64 MP).
    pub max_request_pixels: u64,
    /// Bytes per image (inline or fetched).
    pub max_image_bytes: usize,
    /// Let image and video URLs given as http(s) reach loopback, private and link-local addresses
    /// (default false: the gateway must not become a way into this machine's or its networks'
    /// services). Also read under its first name, `fetch_private_image_urls`.
    #[serde(alias = "fetch_private_image_urls")]
    pub fetch_private_media_urls: bool,
    /// Seconds an image or video URL has to be fetched (default 10). Also read under its first name,
    /// `image_fetch_timeout_secs`.
    #[serde(alias = "image_fetch_timeout_secs")]
    pub media_fetch_timeout_secs: f64,
    /// Audio clips per request (each is decoded and held until the engine takes it).
    pub max_request_audio: usize,
    /// Bytes per audio clip, encoded (default 20 MB: with base64's third it fits the default
    /// `[server] max_body_bytes` of 32 MiB, the only way a clip arrives, and holds 30 s even of 96 kHz
    /// 24-bit stereo WAV; the original design's 50 MB could never arrive through that body limit, which
    /// the configuration check now refuses).
    pub max_audio_bytes: usize,
    /// Seconds per audio clip (default 30: Gemma 4 hears 30 s at once; a longer clip would be cut, so it
    /// is refused with a 413 instead).
    pub max_audio_seconds: f64,
    /// Video parts per request (each is sampled by ffmpeg and held as frames until the engine takes it).
    pub max_request_videos: usize,
    /// Bytes per video, inline (data:) or fetched (default 100 MB; inline videos also count against
    /// `[server] max_body_bytes`).
    pub max_video_bytes: usize,
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
            max_request_images: 16,
            max_request_pixels: 128_000_000,
            max_image_bytes: 20 << 20,
            fetch_private_media_urls: false,
            media_fetch_timeout_secs: 10.0,
            max_request_audio: 4,
            max_audio_bytes: 20_000_000,
            max_audio_seconds: 30.0,
            max_request_videos: 2,
            max_video_bytes: 100_000_000,
            max_stop: 8,
        }
    }
}

impl ChatCompletionRequest {
    /// Checks every field and produces the normalised request. Errors: the first field found out of range
    /// or unsupported, as a 400 ([`RouterError::InvalidRequest`]) naming it in `param`, in the order the
    /// fields are listed here (messages and their media first).
    pub fn validate(self, limits: &Limits) -> Result<ChatRequest, RouterError> {
        if self.messages.is_empty() {
            return Err(RouterError::invalid(
                "messages must not be empty",
                "messages",
            ));
        }
        if self.messages.len() > limits.max_messages {
            return Err(RouterError::invalid(
                format!("at most {} messages", limits.max_messages),
                "messages",
            ));
        }
        if let Some(n) = self.n
            && n != 1
        {
            return Err(RouterError::invalid("only n=1 is supported", "n"));
        }
        refuse_extra(&self.extra, Body::Chat)?;
        if let Some(o) = &self.stream_options {
            o.check(self.stream)?;
        }
        let seen = check_messages(&self.messages, limits)?;
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if let Some(m) = max_tokens {
            if m == 0 {
                return Err(RouterError::invalid(
                    "max_tokens must be at least 1",
                    "max_tokens",
                ));
            }
            if m > limits.max_tokens_ceiling {
                return Err(RouterError::invalid(
                    format!("max_tokens must be at most {}", limits.max_tokens_ceiling),
                    "max_tokens",
                ));
            }
        }
        self.check_sampling()?;
        let stop = self.stop.map(|s| s.to_vec()).unwrap_or_default();
        if stop.len() > limits.max_stop {
            return Err(RouterError::invalid(
                format!("at most {} stop sequences", limits.max_stop),
                "stop",
            ));
        }
        let logit_bias = logit_bias(self.logit_bias.unwrap_or_default())?;
        let top_logprobs = self.top_logprobs.unwrap_or(0);
        // OpenAI's rule: the top ones come with the chosen token's, which only logprobs asks for.
        if top_logprobs > 0 && self.logprobs != Some(true) {
            return Err(RouterError::invalid(
                "top_logprobs needs logprobs: true",
                "top_logprobs",
            ));
        }
        if top_logprobs as usize > jemma_chat::logprobs::MAX_TOP_LOGPROBS {
            return Err(RouterError::invalid(
                format!(
                    "top_logprobs must be at most {}",
                    jemma_chat::logprobs::MAX_TOP_LOGPROBS
                ),
                "top_logprobs",
            ));
        }
        let tools = self.tools.unwrap_or_default();
        check_tool_choice(&tools, self.tool_choice.as_ref())?;
        let response_format = self.response_format.unwrap_or_default();
        if let ResponseFormat::JsonSchema { json_schema } = &response_format
            && json_schema.schema.as_ref().is_some_and(|s| !s.is_object())
        {
            return Err(RouterError::invalid(
                "response_format.json_schema.schema must be a JSON Schema object",
                "response_format.json_schema.schema",
            ));
        }
        // Gemma 4's template reads one argument; another would be silently dropped.
        for (k, v) in self.chat_template_kwargs.iter().flatten() {
            if k != "enable_thinking" {
                return Err(RouterError::invalid(
                    format!(
                        "chat_template_kwargs.{k}: Gemma 4's template takes enable_thinking only"
                    ),
                    &format!("chat_template_kwargs.{k}"),
                ));
            }
            if !v.is_boolean() && !v.is_null() {
                return Err(RouterError::invalid(
                    "chat_template_kwargs.enable_thinking must be true or false",
                    "chat_template_kwargs.enable_thinking",
                ));
            }
        }
        let effort = match &self.reasoning_effort {
            Some(e) => Some(thinking_for_effort(e, "reasoning_effort")?),
            None => None,
        };
        let switch = self.enable_thinking.or_else(|| {
            self.chat_template_kwargs
                .as_ref()
                .and_then(|k| k.get("enable_thinking"))
                .and_then(Value::as_bool)
        });
        let reasoning_effort = self.reasoning_effort.filter(|_| switch.is_none());
        let enable_thinking = switch.or(effort);
        Ok(ChatRequest {
            requested_model: self.model.unwrap_or_else(|| "auto".into()),
            messages: self.messages,
            tools: (!tools.is_empty()).then_some(tools),
            tool_choice: self.tool_choice,
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
            reasoning_effort,
            thinking_token_budget: self.thinking_token_budget,
            stream: self.stream,
            include_usage: self
                .stream_options
                .map(|o| o.include_usage)
                .unwrap_or(false),
            has_images: seen.images > 0,
            images: vec![],
            has_audio: seen.audio > 0,
            audio: vec![],
            has_videos: seen.videos > 0,
            videos: vec![],
            video_sampling: None,
            text: seen.text,
            last_user: seen.last_user,
            prompt_tokens_estimate: seen.chars / 4 + 1,
            raw_prompt: None,
            forwarded: false,
        })
    }

    /// The sampling fields' ranges (OpenAI's, and vLLM's for `top_k`, `min_p` and `repetition_penalty`).
    fn check_sampling(&self) -> Result<(), RouterError> {
        if let Some(t) = self.temperature
            && !(t.is_finite() && (0.0..=2.0).contains(&t))
        {
            return Err(RouterError::invalid(
                "temperature must be between 0 and 2",
                "temperature",
            ));
        }
        if let Some(p) = self.top_p
            && !(p.is_finite() && p > 0.0 && p <= 1.0)
        {
            return Err(RouterError::invalid("top_p must be in (0, 1]", "top_p"));
        }
        if let Some(k) = self.top_k
            && k < 0
        {
            return Err(RouterError::invalid("top_k must be >= 0", "top_k"));
        }
        if let Some(p) = self.min_p
            && !(p.is_finite() && (0.0..=1.0).contains(&p))
        {
            return Err(RouterError::invalid("min_p must be in [0, 1]", "min_p"));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && (-2.0..=2.0).contains(&v))
            {
                return Err(RouterError::invalid(
                    format!("{name} must be between -2 and 2"),
                    name,
                ));
            }
        }
        if let Some(r) = self.repetition_penalty
            && !(r.is_finite() && r > 0.0)
        {
            return Err(RouterError::invalid(
                "repetition_penalty must be a finite number > 0",
                "repetition_penalty",
            ));
        }
        Ok(())
    }
}

/// What the messages hold, gathered while checking them.
#[derive(Default)]
struct Seen {
    images: usize,
    audio: usize,
    videos: usize,
    /// System, developer and user text, one message per line: what the classifier reads.
    text: String,
    last_user: String,
    /// Bytes of text and tool-call arguments: the prompt-size estimate's base (about 4 per token).
    chars: usize,
}

/// Checks the message list and every media part in it against `limits`: counts per message and per
/// request, each part's URL or data, and `detail`.
fn check_messages(messages: &[Message], limits: &Limits) -> Result<Seen, RouterError> {
    let mut seen = Seen::default();
    for (i, m) in messages.iter().enumerate() {
        if let Some(c) = m.content() {
            let images = c.images().count();
            if images > limits.max_images {
                return Err(RouterError::invalid(
                    format!("at most {} images per message", limits.max_images),
                    &format!("messages[{i}].content"),
                ));
            }
            if let MessageContent::Parts(parts) = c {
                for (j, p) in parts.iter().enumerate() {
                    let at = format!("messages[{i}].content[{j}]");
                    // OpenAI's API takes text only in system and developer messages, and Gemma's chat
                    // template shows no media there: refused here, naming the part, rather than by the
                    // engine after it has decoded the media.
                    if matches!(m, Message::System(_) | Message::Developer(_))
                        && !matches!(p, super::message::ContentPart::Text { .. })
                    {
                        return Err(RouterError::invalid(
                            format!(
                                "{at}: a {} message takes text only; send images, audio and video in a \
                                 user message",
                                m.role()
                            ),
                            &at,
                        ));
                    }
                    check_media_part(p, &at, limits, &mut seen)?;
                }
            }
            seen.images += images;
            if seen.images > limits.max_request_images {
                return Err(RouterError::invalid(
                    format!("at most {} images per request", limits.max_request_images),
                    &format!("messages[{i}].content"),
                ));
            }
            let t = c.text();
            seen.chars += t.len();
            if matches!(
                m,
                Message::System(_) | Message::Developer(_) | Message::User(_)
            ) {
                if !seen.text.is_empty() {
                    seen.text.push('\n');
                }
                seen.text.push_str(&t);
            }
            if matches!(m, Message::User(_)) {
                seen.last_user = t;
            }
        }
        if let Message::Assistant(a) = m {
            for c in a.tool_calls.iter().flatten() {
                seen.chars += c.function.name.len() + c.function.arguments.len();
            }
        }
    }
    Ok(seen)
}

/// Checks one content part at `at` (`messages[i].content[j]`) if it is a video, audio clip or image;
/// counts videos and clips against the request's limits (images are counted per message by the caller).
fn check_media_part(
    p: &super::message::ContentPart,
    at: &str,
    limits: &Limits,
    seen: &mut Seen,
) -> Result<(), RouterError> {
    use super::message::ContentPart;
    match p {
        ContentPart::VideoUrl { video_url } => {
            validate_media_url(
                &video_url.url,
                &format!("{at}.video_url.url"),
                "video",
                limits.max_video_bytes,
            )?;
            seen.videos += 1;
            if seen.videos > limits.max_request_videos {
                return Err(RouterError::invalid(
                    format!("at most {} videos per request", limits.max_request_videos),
                    at,
                ));
            }
        }
        ContentPart::InputAudio { input_audio } => {
            validate_input_audio(input_audio, &format!("{at}.input_audio"), limits)?;
            seen.audio += 1;
            if seen.audio > limits.max_request_audio {
                return Err(RouterError::invalid(
                    format!(
                        "at most {} audio clips per request",
                        limits.max_request_audio
                    ),
                    at,
                ));
            }
        }
        ContentPart::ImageUrl { image_url } => {
            validate_image_url(&image_url.url, &format!("{at}.image_url.url"), limits)?;
            // OpenAI's resolution hint: low is a quarter of the soft-token budget.
            if let Some(d) = image_url
                .detail
                .as_deref()
                .filter(|d| !matches!(*d, "auto" | "low" | "high"))
            {
                return Err(RouterError::invalid(
                    format!("detail must be auto, low or high, not {d:?}"),
                    &format!("{at}.image_url.detail"),
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// `logit_bias` as (token id, bias) pairs; keys must be token ids and values within [-100, 100] (OpenAI's
/// range).
fn logit_bias(
    map: impl IntoIterator<Item = (String, f32)>,
) -> Result<Vec<(u32, f32)>, RouterError> {
    let mut out = vec![];
    for (k, v) in map {
        let id: u32 = k.parse().map_err(|_| {
            RouterError::invalid(
                format!("logit_bias key {k:?} is not a token id"),
                "logit_bias",
            )
        })?;
        if !(v.is_finite() && (-100.0..=100.0).contains(&v)) {
            return Err(RouterError::invalid(
                "logit_bias values must be between -100 and 100",
                "logit_bias",
            ));
        }
        out.push((id, v));
    }
    Ok(out)
}

/// `tool_choice` against the offered tools. `none` and `auto` without tools are accepted, as vLLM and
/// llama.cpp do (no call is made either way); a call cannot be required when there is nothing to call,
/// nor a function named that is not offered.
fn check_tool_choice(tools: &[Tool], choice: Option<&ToolChoice>) -> Result<(), RouterError> {
    if tools.is_empty() && matches!(choice, Some(ToolChoice::Required | ToolChoice::Function(_))) {
        return Err(RouterError::invalid(
            "tool_choice requires a tool call, but no tools are specified",
            "tool_choice",
        ));
    }
    if let Some(ToolChoice::Function(name)) = choice
        && !tools.iter().any(|t| &t.function.name == name)
    {
        return Err(RouterError::invalid(
            format!("tool_choice names function {name:?}, which is not in tools"),
            "tool_choice.function.name",
        ));
    }
    Ok(())
}

/// `POST /v1/completions` body (legacy plain-prompt API).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct CompletionRequest {
    /// Tier, model id or `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The prompt (one string, or a one-element list).
    #[schema(value_type = String, min_length = 1)]
    pub prompt: Value,
    /// Upper bound of generated tokens (OpenAI's default for this API is 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature, 0–2 (as in chat completions; absent: 0 in process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f32>,
    /// Nucleus mass, in (0, 1] (absent or 1: off).
    #[serde(
        default,
        deserialize_with = "positive_f32",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f32>,
    /// Draw from the k most likely tokens only (absent or 0: off; an extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub top_k: Option<i32>,
    /// Strings that end the text where they first appear, not included (one, or at most 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Seeds the sampler (absent: a fresh draw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Subtracted once from every recent token's logit, −2 to 2 (absent: 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f32>,
    /// Subtracted per occurrence of a recent token, −2 to 2 (absent: 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f32>,
    /// Stream as SSE.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options (`include_usage`: a last chunk with `usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Number of completions (only 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<u32>,
    /// Drop tokens below this fraction of the top token's probability, 0–1 (as in chat completions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 1)]
    pub min_p: Option<f32>,
    /// Divides (or, for a negative logit, multiplies) the logits of tokens in the last 20 generated or
    /// prompt tokens, > 0 (absent or 1: off; as in chat completions).
    #[serde(
        default,
        deserialize_with = "positive_f32",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(exclusive_minimum = 0)]
    pub repetition_penalty: Option<f32>,
    /// Token id (as a string) → bias added to its logit, −100 to 100 (as in chat completions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// End-user id (accepted as OpenAI's; not used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Return each generated token's log-probability and this many most likely alternatives, 0 to 20
    /// (in this API's own shape, [`crate::api::CompletionLogprobs`]; absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 20)]
    pub logprobs: Option<u32>,
    /// Return the prompt before the completion in `text` (not with `logprobs`: the prompt's own
    /// log-probabilities are not computed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    /// The fields this API does not define, kept to be refused by name ([`refuse_extra`]).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(ignore)]
    pub extra: BTreeMap<String, Value>,
}

impl CompletionRequest {
    /// Validates through the chat path (same limits and checks) and marks the prompt as raw.
    pub fn validate(self, limits: &Limits) -> Result<ChatRequest, RouterError> {
        refuse_extra(&self.extra, Body::Completion)?;
        if let Some(n) = self.logprobs
            && n as usize > jemma_chat::logprobs::MAX_TOP_LOGPROBS
        {
            return Err(RouterError::invalid(
                format!(
                    "logprobs must be at most {}",
                    jemma_chat::logprobs::MAX_TOP_LOGPROBS
                ),
                "logprobs",
            ));
        }
        if self.echo == Some(true) && self.logprobs.is_some() {
            return Err(RouterError::invalid(
                "echo with logprobs asks for the prompt's log-probabilities, which are not computed: \
                 send one of them",
                "echo",
            ));
        }
        let prompt = match &self.prompt {
            Value::String(s) => s.clone(),
            Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                a[0].as_str().unwrap_or_default().to_string()
            }
            Value::Array(_) => {
                return Err(RouterError::invalid(
                    "only one prompt per request is supported",
                    "prompt",
                ));
            }
            _ => return Err(RouterError::invalid("prompt must be a string", "prompt")),
        };
        if prompt.is_empty() {
            return Err(RouterError::invalid("prompt must not be empty", "prompt"));
        }
        let chat = ChatCompletionRequest {
            model: self.model,
            messages: vec![Message::user(prompt.clone())],
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
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            logit_bias: self.logit_bias,
            user: self.user,
            logprobs: self.logprobs.map(|_| true),
            top_logprobs: self.logprobs.filter(|&n| n > 0),
            ..Default::default()
        };
        let mut r = chat.validate(limits)?;
        r.raw_prompt = Some(prompt);
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::VideoSound;
    use jemma_media::video::DecodedVideo;

    /// A mono 16-bit PCM WAV of `seconds` of a 440 Hz tone at `rate`, base64.
    fn wav(seconds: f64, rate: u32) -> String {
        use base64::Engine as _;
        let n = (seconds * rate as f64) as u32;
        let mut b = vec![];
        b.extend_from_slice(b"RIFF");
        b.extend_from_slice(&(36 + 2 * n).to_le_bytes());
        b.extend_from_slice(b"WAVEfmt ");
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&rate.to_le_bytes());
        b.extend_from_slice(&(rate * 2).to_le_bytes());
        b.extend_from_slice(&2u16.to_le_bytes());
        b.extend_from_slice(&16u16.to_le_bytes());
        b.extend_from_slice(b"data");
        b.extend_from_slice(&(2 * n).to_le_bytes());
        for i in 0..n {
            let v = (i as f64 * 440.0 * std::f64::consts::TAU / rate as f64).sin() * 8000.0;
            b.extend_from_slice(&(v as i16).to_le_bytes());
        }
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    fn request(parts: Vec<Value>) -> Result<ChatRequest, RouterError> {
        let body = serde_json::json!({"messages": [{"role": "user", "content": parts}]});
        serde_json::from_value::<ChatCompletionRequest>(body)
            .unwrap()
            .validate(&Limits::default())
    }

    fn audio(data: &str, format: &str) -> Value {
        serde_json::json!({"type": "input_audio", "input_audio": {"data": data, "format": format}})
    }

    fn param(e: RouterError) -> Option<String> {
        match e {
            RouterError::InvalidRequest { param, .. } => param,
            e => panic!("not a 400: {e:?}"),
        }
    }

    /// A field the API does not define is a 400 naming it, as OpenAI answers; OpenAI's own fields that
    /// ask for nothing undone pass, and those that cannot be honoured say why.
    #[test]
    fn fields_the_api_does_not_define_are_refused_by_name() {
        let chat = |extra: Value| {
            let mut body = serde_json::json!({"messages": [{"role": "user", "content": "hi"}]});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            serde_json::from_value::<ChatCompletionRequest>(body)
                .unwrap()
                .validate(&Limits::default())
        };
        for ok in [
            serde_json::json!({"store": false, "metadata": {"k": "v"}, "service_tier": "auto"}),
            serde_json::json!({"prompt_cache_key": "c1", "safety_identifier": "u", "user": "u"}),
            serde_json::json!({"modalities": ["text"], "verbosity": "medium", "functions": null}),
            serde_json::json!({"functions": [], "function_call": "auto", "prompt_cache_retention": "24h"}),
        ] {
            assert!(chat(ok.clone()).is_ok(), "{ok}");
        }
        for (bad, name, says) in [
            (
                serde_json::json!({"cache_prompt": true}),
                "cache_prompt",
                "Unrecognized",
            ),
            (
                serde_json::json!({"store": true}),
                "store",
                "keeps no completions",
            ),
            (
                serde_json::json!({"functions": [{"name": "f"}]}),
                "functions",
                "send tools",
            ),
            (
                serde_json::json!({"modalities": ["text", "audio"]}),
                "modalities",
                "text only",
            ),
            (
                serde_json::json!({"service_tier": "flex"}),
                "service_tier",
                "one service tier",
            ),
            (
                serde_json::json!({"prediction": {"type": "content"}}),
                "prediction",
                "predicted",
            ),
            (
                serde_json::json!({"reasoning_effort": "extreme"}),
                "reasoning_effort",
                "none, minimal",
            ),
            (
                serde_json::json!({"stream": true, "stream_options": {"include_obfuscation": true}}),
                "stream_options.include_obfuscation",
                "not padded",
            ),
            (
                serde_json::json!({"top_logprobs": 3}),
                "top_logprobs",
                "logprobs: true",
            ),
            (
                serde_json::json!({"chat_template_kwargs": {"thinking": true}}),
                "chat_template_kwargs.thinking",
                "enable_thinking only",
            ),
            (
                serde_json::json!({"chat_template_kwargs": {"enable_thinking": "false"}}),
                "chat_template_kwargs.enable_thinking",
                "true or false",
            ),
        ] {
            let e = chat(bad.clone()).unwrap_err();
            assert!(e.to_string().contains(says), "{bad}: {e}");
            assert_eq!(param(e).as_deref(), Some(name), "{bad}");
        }
        // OpenAI's reasoning_effort is Gemma 4's thinking, on or off; enable_thinking wins.
        let think = |extra: Value| chat(extra).unwrap().enable_thinking;
        assert_eq!(
            think(serde_json::json!({"reasoning_effort": "low"})),
            Some(false)
        );
        assert_eq!(
            think(serde_json::json!({"reasoning_effort": "high"})),
            Some(true)
        );
        assert_eq!(
            think(serde_json::json!({"reasoning_effort": "high", "enable_thinking": false})),
            Some(false)
        );
        let completion = |extra: Value| {
            let mut body = serde_json::json!({"prompt": "Once"});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            serde_json::from_value::<CompletionRequest>(body)
                .unwrap()
                .validate(&Limits::default())
        };
        let r = completion(serde_json::json!({
            "echo": false, "best_of": 1, "suffix": "", "logprobs": 3, "user": "u",
            "min_p": 0.1, "repetition_penalty": 1.2, "logit_bias": {"7": -100}
        }))
        .unwrap();
        assert_eq!(
            (r.min_p, r.repetition_penalty, r.logit_bias),
            (Some(0.1), Some(1.2), vec![(7, -100.0)]),
            "the sampling fields chat takes are honoured on completions too"
        );
        assert_eq!((r.logprobs, r.top_logprobs), (true, 3));
        let r = completion(serde_json::json!({"logprobs": 0})).unwrap();
        assert_eq!((r.logprobs, r.top_logprobs), (true, 0));
        for (bad, name) in [
            (serde_json::json!({"logprobs": 21}), "logprobs"),
            (serde_json::json!({"echo": true, "logprobs": 1}), "echo"),
            (serde_json::json!({"best_of": 3}), "best_of"),
            (serde_json::json!({"suffix": "end"}), "suffix"),
            (serde_json::json!({"messages": []}), "messages"),
        ] {
            let e = completion(bad.clone()).unwrap_err();
            assert_eq!(param(e).as_deref(), Some(name), "{bad}");
        }
    }

    #[test]
    fn input_audio_is_checked_before_any_tier_is_tried() {
        let text = serde_json::json!({"type": "text", "text": "what is said?"});
        let ok = request(vec![text.clone(), audio("UklGRg==", "wav")]).unwrap();
        assert!(ok.has_audio && !ok.has_images);
        assert_eq!(ok.media_modalities(), [Modality::Audio]);
        assert_eq!(
            param(request(vec![text.clone(), audio("UklGRg==", "aiff")]).unwrap_err()).as_deref(),
            Some("messages[0].content[1].input_audio.format")
        );
        // Opus (Ogg, or WebM as browsers record it) is a format like the others.
        assert!(request(vec![audio("UklGRg==", "opus")]).is_ok());
        assert!(request(vec![audio("UklGRg==", "webm")]).is_ok());
        assert_eq!(
            param(request(vec![audio("not base64!", "wav")]).unwrap_err()).as_deref(),
            Some("messages[0].content[0].input_audio.data")
        );
        let five = vec![audio("UklGRg==", "wav"); 5];
        assert!(param(request(five).unwrap_err()).is_some());
        // An unknown field in the part is named rather than dropped.
        let extra = serde_json::json!({"type": "input_audio",
            "input_audio": {"data": "UklGRg==", "format": "wav", "rate": 8000}});
        let body = serde_json::json!({"messages": [{"role": "user", "content": [extra]}]});
        assert!(serde_json::from_value::<ChatCompletionRequest>(body).is_err());
        // Inside `image_url` too.
        let extra = serde_json::json!({"type": "image_url",
            "image_url": {"url": "https://example.com/a.png", "size": 512}});
        let body = serde_json::json!({"messages": [{"role": "user", "content": [extra]}]});
        let e = serde_json::from_value::<ChatCompletionRequest>(body).unwrap_err();
        assert!(e.to_string().contains("unknown field `size`"), "{e}");
    }

    /// OpenAI's system and developer messages take text parts only: media there is a 400 naming the
    /// part, before anything is decoded; text parts are fine, and so is media in the user's message.
    #[test]
    fn media_in_a_system_message_is_refused_naming_the_part() {
        let text = serde_json::json!({"type": "text", "text": "be brief"});
        let image = serde_json::json!({"type": "image_url",
            "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}});
        for (role, media) in [
            ("system", image.clone()),
            ("developer", audio("UklGRg==", "wav")),
            (
                "system",
                serde_json::json!({"type": "video_url",
                "video_url": {"url": "data:video/mp4;base64,AAAA"}}),
            ),
        ] {
            let body = serde_json::json!({"messages": [
                {"role": role, "content": [text.clone(), media]},
                {"role": "user", "content": "hi"}]});
            let e = serde_json::from_value::<ChatCompletionRequest>(body)
                .unwrap()
                .validate(&Limits::default())
                .unwrap_err();
            assert!(e.to_string().contains("takes text only"), "{e}");
            assert_eq!(
                param(e).as_deref(),
                Some("messages[0].content[1]"),
                "{role}"
            );
        }
        let body = serde_json::json!({"messages": [
            {"role": "system", "content": [text.clone(), text.clone()]},
            {"role": "user", "content": [text, image]}]});
        let ok = serde_json::from_value::<ChatCompletionRequest>(body)
            .unwrap()
            .validate(&Limits::default())
            .unwrap();
        assert!(ok.has_images);
    }

    /// A sampled clip of `duration` s seen over `span` s in `frames` frames, with `heard` s of its sound.
    fn sampled(duration: f64, span: f64, frames: usize, track: bool, heard: f64) -> DecodedVideo {
        use jemma_media::video::VideoFrame;
        let frame = |j: usize| VideoFrame {
            seconds: span * j as f64 / frames as f64,
            image: jemma_media::DecodedImage {
                rgb: std::sync::Arc::new(jemma_media::Rgb {
                    width: 2,
                    height: 2,
                    data: vec![0; 12],
                }),
                digest: j as u64,
                low_detail: false,
            },
        };
        DecodedVideo {
            frames: (0..frames).map(frame).collect(),
            audio: (heard > 0.0).then(|| jemma_media::audio::DecodedAudio {
                samples: vec![0.0; (heard * 16_000.0) as usize].into(),
                digest: 7,
            }),
            has_audio_track: track,
            duration,
            span,
        }
    }

    #[test]
    fn videos_seen_says_how_much_of_each_clip_was_seen_and_what_became_of_its_sound() {
        let video = |url: &str| serde_json::json!({"type": "video_url", "video_url": {"url": url}});
        let text = serde_json::json!({"type": "text", "text": "what happens?"});
        let mut r = request(vec![
            text,
            video("https://example.com/a.mp4"),
            video("https://example.com/b.mp4"),
        ])
        .unwrap();
        assert!(r.videos_seen(true).is_empty(), "nothing sampled yet");
        r.videos = vec![
            // 90 s, of which a tier that looks at 30 s heard 30.
            sampled(90.0, 30.0, 4, true, 30.0),
            // A silent clip, seen whole.
            sampled(5.0, 5.0, 4, false, 0.0),
        ];
        let seen = r.videos_seen(true);
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].part, "messages[0].content[1].video_url");
        assert_eq!(seen[1].part, "messages[0].content[2].video_url");
        assert_eq!(
            (
                seen[0].duration_seconds,
                seen[0].seconds_seen,
                seen[0].frames
            ),
            (90.0, 30.0, 4)
        );
        assert_eq!(
            (seen[0].sound, seen[0].seconds_heard),
            (VideoSound::Heard, 30.0)
        );
        assert_eq!(seen[1].sound, VideoSound::NoTrack);
        assert_eq!(r.videos_seen(false)[1].sound, VideoSound::NoTrack);
        // Sound that was not decoded: for a model that hears, none in the span that was seen; for one
        // that does not, not heard.
        r.videos[1] = sampled(5.0, 5.0, 4, true, 0.0);
        assert_eq!(r.videos_seen(true)[1].sound, VideoSound::NoTrack);
        let deaf = r.videos_seen(false);
        assert_eq!(
            (deaf[1].sound, deaf[1].seconds_heard),
            (VideoSound::NotHeard, 0.0)
        );
        let wire = serde_json::to_value(&deaf[1]).unwrap();
        assert_eq!(wire["sound"], "not_heard", "{wire}");
    }

    #[tokio::test]
    async fn input_audio_decodes_to_16_khz_or_is_refused_in_the_apis_terms() {
        let mut r = request(vec![audio(&wav(0.5, 8000), "wav")]).unwrap();
        r.decode_audio(&Limits::default()).await.unwrap();
        assert_eq!(r.audio.len(), 1);
        let n = r.audio[0].samples.len();
        assert!((7900..=8100).contains(&n), "{n} samples at 16 kHz");
        // Not audio: a 400 naming the part's data.
        let mut r = request(vec![audio("AAAAAAAA", "wav")]).unwrap();
        let e = r.decode_audio(&Limits::default()).await.unwrap_err();
        assert_eq!(
            param(e).as_deref(),
            Some("messages[0].content[0].input_audio.data")
        );
        // Longer than the model hears at once: a 413.
        let mut r = request(vec![audio(&wav(31.0, 8000), "wav")]).unwrap();
        let e = r.decode_audio(&Limits::default()).await.unwrap_err();
        assert!(
            matches!(e, RouterError::TooLarge { message, param: Some(p) }
            if message.contains("30 s") && p == "messages[0].content[0].input_audio.data")
        );
    }
}
