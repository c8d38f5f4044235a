//! Explainable request classifier: picks the tier (fast, primary, heavy) that should answer a request.
//!
//! The classifier is a short list of ordered, deterministic rules rather than a model, so that every decision
//! comes with a one-line human-readable reason (logged, returned in a response header, shown in the UI) and
//! costs microseconds. The first rule that applies wins:
//!
//! 1. **Model field.** `fast`, `primary` or `heavy` (case-insensitive) picks that tier as is ("explicit tier");
//!    an id in [`ClassifierConfig::model_aliases`] picks its tier. `auto`, an id in
//!    [`ClassifierConfig::auto_models`], an empty string or no model at all go on to the rules below. Any other
//!    id is [`ClassifyError::UnknownModel`], so the caller decides what an unknown id means.
//! 2. **Images** or **video** → [`ClassifierConfig::vision_tier`]; **audio** → [`ClassifierConfig::audio_tier`].
//! 3. **Long prompt**: more than [`ClassifierConfig::long_prompt_tokens`] → heavy.
//! 4. **Heavy keyword** in the last user message → heavy.
//! 5. **Primary keyword**, **code-like content** in the last user message, or **tools** in the request → primary.
//! 6. **Small talk** → fast: a greeting made only of [`ClassifierConfig::greeting_words`]; then, unless earlier
//!    turns of the conversation contain a code fence (→ primary, so a coding session is not handed to the small
//!    model for "now make it async"), a short message without a reasoning cue.
//! 7. [`ClassifierConfig::default_tier`].
//!
//! After rules 2–7 the chosen tier must also hold the request: if the prompt (plus `max_tokens` when
//! [`ClassifierConfig::reserve_max_tokens`] is set) exceeds its context limit, the request is bumped to the next
//! larger tier until it fits, and the reason says so. An explicit tier or alias is never bumped: the client asked
//! for that model.
//!
//! ## Keyword matching
//!
//! Matching is case-insensitive and on whole words, where a word is a run of Unicode letters and digits; other
//! characters (spaces, punctuation, hyphens) separate words, so `in-depth` also matches "in depth". A keyword
//! matches its word and common English inflections of it: `code` matches "code", "codes", "coded", "coder",
//! "coding"; `debug` matches "debugging"; `summary` matches "summaries". It never matches inside another word:
//! `code` does not match "encoded", "barcode", "decoder" or "codec", and `fix` does not match "prefix" or
//! "fixture". Multi-word keywords (`compare and contrast`) match consecutive words, inflecting only the last.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A serving tier. Ordered by size, so `Tier::Fast < Tier::Primary < Tier::Heavy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Gemma 4 E2B, small and local: greetings and quick answers.
    Fast,
    /// Gemma 4 E4B, local: the everyday default, code and text work.
    Primary,
    /// The 26B MoE on a cloud GPU: long prompts and hard reasoning.
    Heavy,
}

impl Tier {
    /// Every tier, smallest first.
    pub const ALL: [Tier; 3] = [Tier::Fast, Tier::Primary, Tier::Heavy];

    /// Lowercase name as used in config, model ids, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::Primary => "primary",
            Self::Heavy => "heavy",
        }
    }

    /// The next larger tier, used when a request does not fit this tier's context; `None` for heavy.
    pub fn next_larger(self) -> Option<Tier> {
        match self {
            Self::Fast => Some(Self::Primary),
            Self::Primary => Some(Self::Heavy),
            Self::Heavy => None,
        }
    }

    /// The next smaller tier, used when falling back from an unavailable tier; `None` for fast.
    pub fn next_smaller(self) -> Option<Tier> {
        match self {
            Self::Fast => None,
            Self::Primary => Some(Self::Fast),
            Self::Heavy => Some(Self::Primary),
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error from parsing a string that is not a tier name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseTierError(pub String);

impl fmt::Display for ParseTierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown tier '{}' (expected fast, primary or heavy)",
            self.0
        )
    }
}

impl std::error::Error for ParseTierError {}

impl FromStr for Tier {
    type Err = ParseTierError;

    /// Parses `fast`, `primary` or `heavy`, ignoring case and surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        Tier::ALL
            .into_iter()
            .find(|tier| tier.as_str().eq_ignore_ascii_case(t))
            .ok_or_else(|| ParseTierError(s.to_owned()))
    }
}

/// The tiers to try, in order, for a request classified as `start`: the tier itself, then each smaller one
/// (heavy → `[heavy, primary, fast]`, primary → `[primary, fast]`, fast → `[fast]`). Smaller tiers are always
/// local, so degrading is better than failing; when all are down the gateway answers 503.
pub fn fallback_chain(start: Tier) -> Vec<Tier> {
    std::iter::successors(Some(start), |t| t.next_smaller()).collect()
}

/// Which rule produced a [`Decision`]: a small, fixed set suitable as a metrics label (the reason string, which
/// embeds keywords and numbers, is not).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The model field named a tier.
    ExplicitTier,
    /// The model field matched [`ClassifierConfig::model_aliases`].
    ModelAlias,
    /// The request has images.
    Vision,
    /// The request has audio.
    Audio,
    /// The prompt is longer than [`ClassifierConfig::long_prompt_tokens`].
    LongPrompt,
    /// The chosen tier's context was too small, so the request was moved to a larger one.
    ContextLimit,
    /// A heavy keyword appeared in the last user message.
    HeavyKeyword,
    /// A primary keyword appeared in the last user message.
    PrimaryKeyword,
    /// The last user message looks like code.
    Code,
    /// The request carries tool definitions.
    Tools,
    /// The last user message is a greeting or small talk.
    Greeting,
    /// An earlier turn contains a code fence.
    CodeInConversation,
    /// The last user message is short and has no reasoning cue.
    ShortMessage,
    /// No rule applied.
    Default,
    /// An earlier turn of the conversation was answered by a larger tier, and a conversation only moves up
    /// ([`crate::route::TierRouter`] applies it after the rules above).
    Conversation,
}

impl Rule {
    /// Stable snake_case name for metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ExplicitTier => "explicit_tier",
            Self::ModelAlias => "model_alias",
            Self::Vision => "vision",
            Self::Audio => "audio",
            Self::LongPrompt => "long_prompt",
            Self::ContextLimit => "context_limit",
            Self::HeavyKeyword => "heavy_keyword",
            Self::PrimaryKeyword => "primary_keyword",
            Self::Code => "code",
            Self::Tools => "tools",
            Self::Greeting => "greeting",
            Self::CodeInConversation => "code_in_conversation",
            Self::ShortMessage => "short_message",
            Self::Default => "default",
            Self::Conversation => "conversation",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the classifier looks at; built by the gateway from an OpenAI-style request.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClassifyInput<'a> {
    /// The request's `model` field, if any.
    pub model: Option<&'a str>,
    /// Concatenated user and system text of the conversation (at least the last user message). Only scanned for
    /// code fences, so that short follow-ups in a coding conversation stay off the fast tier; also used in place
    /// of `last_user` when that is empty.
    pub text: &'a str,
    /// The last user message: keyword, code and small-talk rules look only at it, since it says what is being
    /// asked now.
    pub last_user: &'a str,
    /// Estimated prompt size in tokens (see [`estimate_tokens`]).
    pub prompt_tokens: usize,
    /// Whether any message has image content.
    pub has_images: bool,
    /// Whether any message has audio content.
    pub has_audio: bool,
    /// Whether any message has video content (frames: the vision tier takes it).
    pub has_video: bool,
    /// Whether the request defines tools.
    pub has_tools: bool,
    /// The request's `max_tokens` (or `max_completion_tokens`), if given.
    pub max_tokens: Option<u32>,
}

/// The classifier's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The tier to try first (then [`fallback_chain`]).
    pub tier: Tier,
    /// Human-readable explanation, e.g. `keyword 'summarize' → primary`.
    pub reason: String,
    /// The rule that decided, for metrics.
    pub rule: Rule,
}

/// Why a request could not be classified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClassifyError {
    /// The model field is neither a tier, `auto`, an auto model nor an alias. The caller may map it itself
    /// (e.g. to a specific loaded model) or reject the request with 404 `model_not_found`.
    UnknownModel(String),
}

impl fmt::Display for ClassifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownModel(m) => write!(
                f,
                "unknown model '{m}' (expected auto, fast, primary, heavy or a configured alias)"
            ),
        }
    }
}

impl std::error::Error for ClassifyError {}

/// Classifier tuning, read from the gateway's config file. Every field is optional there and defaults to the
/// value below; a keyword list given in the file replaces the default list rather than extending it. Unknown
/// fields are an error, so that a misspelt setting is not silently ignored.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifierConfig {
    /// Context budget of the fast tier in tokens (default 8192).
    pub fast_max_prompt_tokens: usize,
    /// Context budget of the primary tier in tokens (default 32768). Heavy has no limit here: it is the last
    /// resort, and its backend reports its own overflow.
    pub primary_max_prompt_tokens: usize,
    /// Prompts with more tokens than this go to heavy (default 6000): long documents need the big model even
    /// when a smaller one could hold them.
    pub long_prompt_tokens: usize,
    /// Longest last user message, in characters, that the small-talk rule sends to fast (default 60).
    pub short_greeting_max_chars: usize,
    /// Longest prompt, in tokens, for which a short message without a reasoning cue still goes to fast (default
    /// 1024): a short follow-up at the end of a long conversation needs that conversation understood. Greetings
    /// are exempt.
    pub short_message_max_prompt_tokens: usize,
    /// Whether `max_tokens` counts against a tier's context limit along with the prompt (default true): a tier
    /// that cannot hold the requested output would truncate it.
    pub reserve_max_tokens: bool,
    /// Words that send a request to primary: text and code tasks the E4B handles well.
    pub primary_keywords: Vec<String>,
    /// Words that send a request to heavy: long-form writing and hard reasoning.
    pub heavy_keywords: Vec<String>,
    /// Small-talk vocabulary: a message made only of these words (up to `short_greeting_max_chars`) is a
    /// greeting and goes to fast even when it contains "how" ("hi, how are you?").
    pub greeting_words: Vec<String>,
    /// Words that mark a short message as needing reasoning ("why is the sky blue?"), keeping it off fast.
    pub reasoning_words: Vec<String>,
    /// Tier for requests with images (default primary).
    pub vision_tier: Tier,
    /// Tier for requests with audio (default primary: Gemma 4 E2B and E4B hear, 26B-A4B does not).
    pub audio_tier: Tier,
    /// Tier when no rule applies (default primary).
    pub default_tier: Tier,
    /// Model ids (matched case-insensitively) that mean "route automatically", besides `auto` and an empty
    /// model; e.g. the id a client is hard-wired to send.
    pub auto_models: Vec<String>,
    /// Model ids (matched case-insensitively) that map to a fixed tier, e.g. `"gemma-4-e2b": "fast"`. The tier
    /// names themselves always win over an alias of the same name.
    pub model_aliases: BTreeMap<String, Tier>,
}

/// The built-in word tables, data rather than code (`classifier.toml`, beside this crate's manifest).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Words {
    primary_keywords: Vec<String>,
    heavy_keywords: Vec<String>,
    greeting_words: Vec<String>,
    reasoning_words: Vec<String>,
}

#[expect(
    clippy::expect_used,
    reason = "the built-in tables are compiled in, and a unit test parses them"
)]
fn builtin_words() -> &'static Words {
    static WORDS: std::sync::OnceLock<Words> = std::sync::OnceLock::new();
    WORDS.get_or_init(|| {
        toml::from_str(include_str!("../classifier.toml"))
            .expect("the built-in classifier tables parse (tested)")
    })
}

fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        let words = builtin_words();
        Self {
            fast_max_prompt_tokens: 8192,
            primary_max_prompt_tokens: 32768,
            long_prompt_tokens: 6000,
            short_greeting_max_chars: 60,
            short_message_max_prompt_tokens: 1024,
            reserve_max_tokens: true,
            primary_keywords: words.primary_keywords.clone(),
            heavy_keywords: words.heavy_keywords.clone(),
            greeting_words: words.greeting_words.clone(),
            reasoning_words: words.reasoning_words.clone(),
            vision_tier: Tier::Primary,
            audio_tier: Tier::Primary,
            default_tier: Tier::Primary,
            auto_models: strings(&["auto"]),
            model_aliases: BTreeMap::new(),
        }
    }
}

/// Rough token count for when no tokenizer is at hand: about four ASCII characters per token, and one token per
/// non-ASCII character (CJK text and emoji tokenise far more densely than English).
pub fn estimate_tokens(text: &str) -> usize {
    let (ascii, other) = text.chars().fold((0usize, 0usize), |(a, o), c| {
        if c.is_ascii() { (a + 1, o) } else { (a, o + 1) }
    });
    ascii.div_ceil(4) + other
}

/// The request classifier. Build once from config (keyword tables are precomputed) and share; `classify` takes
/// `&self` and allocates only for the reason string and a lowercase copy of the message.
#[derive(Clone, Debug)]
pub struct Classifier {
    config: ClassifierConfig,
    primary: KeywordSet,
    heavy: KeywordSet,
    reasoning: KeywordSet,
    greeting: HashSet<String>,
    auto_models: HashSet<String>,
    aliases: HashMap<String, Tier>,
}

impl Default for Classifier {
    fn default() -> Self {
        Self::new(ClassifierConfig::default())
    }
}

impl Classifier {
    /// Builds a classifier, precomputing keyword tables.
    pub fn new(config: ClassifierConfig) -> Self {
        Self {
            primary: KeywordSet::new(&config.primary_keywords),
            heavy: KeywordSet::new(&config.heavy_keywords),
            reasoning: KeywordSet::new(&config.reasoning_words),
            greeting: config
                .greeting_words
                .iter()
                .map(|w| w.trim().to_lowercase())
                .collect(),
            auto_models: config
                .auto_models
                .iter()
                .map(|m| m.trim().to_lowercase())
                .collect(),
            aliases: config
                .model_aliases
                .iter()
                .map(|(k, v)| (k.trim().to_lowercase(), *v))
                .collect(),
            config,
        }
    }

    /// The configuration the classifier was built with.
    pub fn config(&self) -> &ClassifierConfig {
        &self.config
    }

    /// Picks a tier for a request (see the module docs for the rules).
    pub fn classify(&self, input: &ClassifyInput<'_>) -> Result<Decision, ClassifyError> {
        if let Some(decision) = self.classify_model(input.model)? {
            return Ok(decision);
        }
        let (tier, rule, reason) = self.classify_content(input);
        Ok(self.fit_context(input, tier, rule, reason))
    }

    /// Rule 1. `Ok(None)` means "route automatically".
    fn classify_model(&self, model: Option<&str>) -> Result<Option<Decision>, ClassifyError> {
        let Some(raw) = model else {
            return Ok(None);
        };
        let m = raw.trim();
        if m.is_empty() || m.eq_ignore_ascii_case("auto") {
            return Ok(None);
        }
        if let Ok(tier) = m.parse::<Tier>() {
            return Ok(Some(Decision {
                tier,
                reason: "explicit tier".to_owned(),
                rule: Rule::ExplicitTier,
            }));
        }
        let key = m.to_lowercase();
        if self.auto_models.contains(&key) {
            return Ok(None);
        }
        if let Some(&tier) = self.aliases.get(&key) {
            return Ok(Some(Decision {
                tier,
                reason: format!("model alias '{m}' → {tier}"),
                rule: Rule::ModelAlias,
            }));
        }
        Err(ClassifyError::UnknownModel(raw.to_owned()))
    }

    /// Rules 2–7, before the context check.
    fn classify_content(&self, input: &ClassifyInput<'_>) -> (Tier, Rule, String) {
        let cfg = &self.config;
        if input.has_images || input.has_video {
            let t = cfg.vision_tier;
            let what = if input.has_images { "images" } else { "video" };
            return (t, Rule::Vision, format!("{what} → {t}"));
        }
        if input.has_audio {
            let t = cfg.audio_tier;
            return (t, Rule::Audio, format!("audio → {t}"));
        }
        if input.prompt_tokens > cfg.long_prompt_tokens {
            return (
                Tier::Heavy,
                Rule::LongPrompt,
                format!(
                    "prompt {} tokens > {} → heavy",
                    input.prompt_tokens, cfg.long_prompt_tokens
                ),
            );
        }

        let message = if input.last_user.trim().is_empty() {
            input.text
        } else {
            input.last_user
        };
        let lower = message.to_lowercase();
        let words = words(&lower);

        if let Some(k) = self.heavy.find(&words) {
            return (
                Tier::Heavy,
                Rule::HeavyKeyword,
                format!("keyword '{k}' → heavy"),
            );
        }
        if let Some(k) = self.primary.find(&words) {
            return (
                Tier::Primary,
                Rule::PrimaryKeyword,
                format!("keyword '{k}' → primary"),
            );
        }
        if let Some(signal) = code_signal(message) {
            return (
                Tier::Primary,
                Rule::Code,
                format!("code-like content ({signal}) → primary"),
            );
        }
        if input.has_tools {
            return (
                Tier::Primary,
                Rule::Tools,
                "tools present → primary".to_owned(),
            );
        }

        let trimmed = message.trim();
        let chars = trimmed.chars().count();
        if chars > 0 && chars <= cfg.short_greeting_max_chars {
            if !words.is_empty() && words.iter().all(|w| self.greeting.contains(*w)) {
                return (Tier::Fast, Rule::Greeting, "greeting → fast".to_owned());
            }
            if input.text.contains("```") {
                return (
                    Tier::Primary,
                    Rule::CodeInConversation,
                    "code earlier in conversation → primary".to_owned(),
                );
            }
            // A reasoning cue ("why", "solve") keeps a short message off fast; the default tier decides.
            if input.prompt_tokens <= cfg.short_message_max_prompt_tokens
                && self.reasoning.find(&words).is_none()
            {
                return (
                    Tier::Fast,
                    Rule::ShortMessage,
                    format!(
                        "short message ({chars} chars ≤ {}, no reasoning cue) → fast",
                        cfg.short_greeting_max_chars
                    ),
                );
            }
        }
        let t = cfg.default_tier;
        (t, Rule::Default, format!("default → {t}"))
    }

    /// Context limit of a tier; heavy is unbounded here (see [`ClassifierConfig::primary_max_prompt_tokens`]).
    fn context_limit(&self, tier: Tier) -> Option<usize> {
        match tier {
            Tier::Fast => Some(self.config.fast_max_prompt_tokens),
            Tier::Primary => Some(self.config.primary_max_prompt_tokens),
            Tier::Heavy => None,
        }
    }

    /// Moves the decision to a larger tier while the request does not fit the chosen one's context.
    fn fit_context(
        &self,
        input: &ClassifyInput<'_>,
        mut tier: Tier,
        mut rule: Rule,
        mut reason: String,
    ) -> Decision {
        let reserved = if self.config.reserve_max_tokens {
            input.max_tokens.map_or(0, |m| m as usize)
        } else {
            0
        };
        let needed = input.prompt_tokens.saturating_add(reserved);
        let need_text = if reserved > 0 {
            format!(
                "needs {needed} tokens (prompt {} + max_tokens {reserved})",
                input.prompt_tokens
            )
        } else {
            format!("prompt {needed} tokens")
        };
        while let Some(limit) = self.context_limit(tier) {
            if needed <= limit {
                break;
            }
            let Some(bigger) = tier.next_larger() else {
                break;
            };
            reason.push_str(&format!("; {need_text} > {tier} limit {limit} → {bigger}"));
            tier = bigger;
            rule = Rule::ContextLimit;
        }
        Decision { tier, reason, rule }
    }
}

/// Splits lowercase text into words: maximal runs of Unicode letters and digits.
fn words(lower: &str) -> Vec<&str> {
    lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect()
}

/// Suffixes accepted after a keyword as written (`code` → `codes`, `coded`; `fix` → `fixes`, `fixing`).
const SUFFIXES: [&str; 8] = ["s", "es", "d", "ed", "ing", "ings", "er", "ers"];
/// Suffixes accepted after dropping a final `e` (`code` → `coding`, `coder`).
const E_DROP_SUFFIXES: [&str; 4] = ["ing", "ings", "ed", "er"];
/// Suffixes accepted after doubling a final consonant (`debug` → `debugging`, `plan` → `planned`).
const DOUBLING_SUFFIXES: [&str; 4] = ["ing", "ed", "er", "ers"];

/// The accepted forms of one keyword word: itself plus simple English inflections. Over-generation is harmless
/// ("fixd" never occurs in text); the point is that only whole words and their endings match, never substrings.
fn inflections(word: &str) -> Vec<String> {
    let mut forms = vec![word.to_owned()];
    forms.extend(SUFFIXES.iter().map(|s| format!("{word}{s}")));
    let mut rev = word.chars().rev();
    let last = rev.next();
    let before_last = rev.next();
    if let Some(stem) = word.strip_suffix('e')
        && !stem.is_empty()
    {
        forms.extend(E_DROP_SUFFIXES.iter().map(|s| format!("{stem}{s}")));
    }
    if let Some(stem) = word.strip_suffix('y')
        && let Some(b) = before_last
        && !is_vowel(b)
    {
        forms.push(format!("{stem}ies"));
        forms.push(format!("{stem}ied"));
    }
    if let (Some(l), Some(b)) = (last, before_last)
        && l.is_ascii_alphabetic()
        && !is_vowel(l)
        && !matches!(l, 'w' | 'x' | 'y')
        && is_vowel(b)
    {
        forms.extend(DOUBLING_SUFFIXES.iter().map(|s| format!("{word}{l}{s}")));
    }
    forms.sort();
    forms.dedup();
    forms
}

fn is_vowel(c: char) -> bool {
    matches!(c, 'a' | 'e' | 'i' | 'o' | 'u')
}

/// One configured keyword, split into words.
#[derive(Clone, Debug)]
struct Keyword {
    /// As configured (trimmed), for the reason string.
    display: String,
    /// Lowercase words; all but the last must match exactly.
    words: Vec<String>,
    /// Accepted forms of the last word.
    last_forms: HashSet<String>,
}

/// A keyword list indexed by the accepted forms of each keyword's first word, so that scanning a message costs
/// one hash lookup per word however many keywords are configured.
#[derive(Clone, Debug, Default)]
struct KeywordSet {
    keywords: Vec<Keyword>,
    by_first: HashMap<String, Vec<usize>>,
}

impl KeywordSet {
    fn new(list: &[String]) -> Self {
        let mut set = Self::default();
        for raw in list {
            let display = raw.trim().to_owned();
            let lower = display.to_lowercase();
            let kw_words: Vec<String> = words(&lower).into_iter().map(str::to_owned).collect();
            let Some(last) = kw_words.last() else {
                continue; // nothing matchable (empty or only punctuation)
            };
            let last_forms: HashSet<String> = inflections(last).into_iter().collect();
            let idx = set.keywords.len();
            let first_keys: Vec<String> = if kw_words.len() == 1 {
                last_forms.iter().cloned().collect()
            } else {
                vec![kw_words[0].clone()]
            };
            for key in first_keys {
                set.by_first.entry(key).or_default().push(idx);
            }
            set.keywords.push(Keyword {
                display,
                words: kw_words,
                last_forms,
            });
        }
        set
    }

    /// The keyword that occurs first in `words` (ties broken by config order), if any.
    fn find(&self, words: &[&str]) -> Option<&str> {
        for (i, word) in words.iter().enumerate() {
            let Some(candidates) = self.by_first.get(*word) else {
                continue;
            };
            for &k in candidates {
                let kw = &self.keywords[k];
                let n = kw.words.len();
                if n == 1 {
                    return Some(&kw.display);
                }
                let Some(window) = words.get(i..i + n) else {
                    continue;
                };
                let middle_ok = kw.words[1..n - 1]
                    .iter()
                    .zip(&window[1..n - 1])
                    .all(|(a, b)| a == b);
                if middle_ok && kw.last_forms.contains(window[n - 1]) {
                    return Some(&kw.display);
                }
            }
        }
        None
    }
}

/// Why a message looks like code, if it does. Cheap structural signals only; each is rare in prose.
fn code_signal(s: &str) -> Option<&'static str> {
    if s.contains("```") {
        return Some("``` fence");
    }
    let mut terminated_lines = 0usize;
    for line in s.lines() {
        let t = line.trim();
        if t.starts_with("def ") && t.contains('(') && t.ends_with(':') {
            return Some("def");
        }
        if [
            "fn ",
            "pub fn ",
            "async fn ",
            "pub async fn ",
            "pub(crate) fn ",
        ]
        .iter()
        .any(|p| t.starts_with(p))
            && t.contains('(')
        {
            return Some("fn");
        }
        if (t.starts_with("function ") || t.starts_with("function(")) && t.contains(')') {
            return Some("function");
        }
        if t.starts_with("#include") {
            return Some("#include");
        }
        if t.starts_with("from ") && t.contains(" import ") {
            return Some("import");
        }
        if t.starts_with("class ") && (t.ends_with(':') || t.ends_with('{')) {
            return Some("class");
        }
        if t.len() > 1 && (t.ends_with(';') || t.ends_with('{') || t.ends_with('}')) {
            terminated_lines += 1;
        }
    }
    if terminated_lines >= 2 {
        return Some("lines ending in ; { }");
    }
    let lower = s.to_lowercase();
    if let Some(sel) = lower.find("select ")
        && let Some(from) = lower[sel..].find(" from ")
    {
        let rest = &lower[sel..];
        if rest[..from].contains('*') || rest.contains(" where ") || rest.contains(';') {
            return Some("SQL");
        }
    }
    let (symbols, non_ws) = s.chars().fold((0usize, 0usize), |(sym, nw), c| {
        (
            sym + usize::from(matches!(c, '{' | '}' | ';')),
            nw + usize::from(!c.is_whitespace()),
        )
    });
    // Four or more braces/semicolons making up at least 2% of the visible characters: one-line code pasted
    // without newlines ("int x = 1; if (x) { y(); }").
    if symbols >= 4 && symbols * 50 >= non_ws {
        return Some("{ } ; density");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built-in tables are data (`classifier.toml`), parsed whole into the defaults.
    #[test]
    fn builtin_word_tables_are_data() {
        let c = ClassifierConfig::default();
        let w = super::builtin_words();
        assert_eq!(c.primary_keywords, w.primary_keywords);
        assert!(c.primary_keywords.contains(&"unit test".to_string()));
        assert!(
            c.greeting_words.contains(&"hello".to_string())
                || c.greeting_words.contains(&"hi".to_string())
        );
        for t in [&c.heavy_keywords, &c.reasoning_words] {
            assert!(!t.is_empty());
        }
    }

    fn classify(input: ClassifyInput<'_>) -> Decision {
        Classifier::default().classify(&input).unwrap()
    }

    /// Classifies a lone user message with a matching token estimate.
    fn msg(text: &str) -> Decision {
        classify(ClassifyInput {
            text,
            last_user: text,
            prompt_tokens: estimate_tokens(text),
            ..ClassifyInput::default()
        })
    }

    // ---- Tier -------------------------------------------------------------------------------------------

    #[test]
    fn tier_names_parse_display_serde() {
        for t in Tier::ALL {
            assert_eq!(t.as_str().parse::<Tier>().unwrap(), t);
            assert_eq!(t.to_string(), t.as_str());
            assert_eq!(
                serde_json::to_string(&t).unwrap(),
                format!("\"{}\"", t.as_str())
            );
        }
        assert_eq!(" HeAvY ".parse::<Tier>().unwrap(), Tier::Heavy);
        assert_eq!(
            "huge".parse::<Tier>().unwrap_err(),
            ParseTierError("huge".into())
        );
        assert_eq!(
            serde_json::from_str::<Tier>("\"primary\"").unwrap(),
            Tier::Primary
        );
        assert!(serde_json::from_str::<Tier>("\"Primary\"").is_err());
        assert!(Tier::Fast < Tier::Primary && Tier::Primary < Tier::Heavy);
    }

    #[test]
    fn fallback_chain_degrades_to_smaller_tiers() {
        assert_eq!(
            fallback_chain(Tier::Heavy),
            [Tier::Heavy, Tier::Primary, Tier::Fast]
        );
        assert_eq!(fallback_chain(Tier::Primary), [Tier::Primary, Tier::Fast]);
        assert_eq!(fallback_chain(Tier::Fast), [Tier::Fast]);
        assert_eq!(Tier::Fast.next_larger(), Some(Tier::Primary));
        assert_eq!(Tier::Heavy.next_larger(), None);
    }

    // ---- Rule 1: model field ----------------------------------------------------------------------------

    #[test]
    fn explicit_tier_wins_over_everything() {
        let d = classify(ClassifyInput {
            model: Some("FAST"),
            last_user: "Write a comprehensive essay",
            prompt_tokens: 50_000,
            has_images: true,
            has_tools: true,
            ..ClassifyInput::default()
        });
        assert_eq!(d.tier, Tier::Fast);
        assert_eq!(d.reason, "explicit tier");
        assert_eq!(d.rule, Rule::ExplicitTier);
        assert_eq!(
            classify(ClassifyInput {
                model: Some(" heavy "),
                ..ClassifyInput::default()
            })
            .tier,
            Tier::Heavy
        );
    }

    #[test]
    fn auto_none_and_empty_route_by_content() {
        for model in [None, Some(""), Some("  "), Some("auto"), Some("AUTO")] {
            let d = classify(ClassifyInput {
                model,
                last_user: "hello",
                text: "hello",
                prompt_tokens: 2,
                ..ClassifyInput::default()
            });
            assert_eq!(d.rule, Rule::Greeting, "model {model:?}");
        }
    }

    #[test]
    fn unknown_model_is_an_error() {
        let err = Classifier::default()
            .classify(&ClassifyInput {
                model: Some("gpt-4o"),
                ..ClassifyInput::default()
            })
            .unwrap_err();
        assert_eq!(err, ClassifyError::UnknownModel("gpt-4o".into()));
        assert!(err.to_string().contains("gpt-4o"));
    }

    #[test]
    fn aliases_and_auto_models() {
        let mut cfg = ClassifierConfig::default();
        cfg.model_aliases.insert("Gemma-4-E2B".into(), Tier::Fast);
        cfg.model_aliases.insert("primary".into(), Tier::Heavy); // shadowed by the tier name
        cfg.auto_models.push("jemma".into());
        let c = Classifier::new(cfg);
        let d = c
            .classify(&ClassifyInput {
                model: Some("gemma-4-e2b"),
                ..ClassifyInput::default()
            })
            .unwrap();
        assert_eq!(d.tier, Tier::Fast);
        assert_eq!(d.rule, Rule::ModelAlias);
        assert_eq!(d.reason, "model alias 'gemma-4-e2b' → fast");
        let d = c
            .classify(&ClassifyInput {
                model: Some("primary"),
                ..ClassifyInput::default()
            })
            .unwrap();
        assert_eq!((d.tier, d.rule), (Tier::Primary, Rule::ExplicitTier));
        let d = c
            .classify(&ClassifyInput {
                model: Some("Jemma"),
                last_user: "thanks!",
                ..ClassifyInput::default()
            })
            .unwrap();
        assert_eq!(d.rule, Rule::Greeting);
    }

    // ---- Rule 2: images ---------------------------------------------------------------------------------

    #[test]
    fn images_go_to_vision_tier_before_keywords_and_length() {
        let input = ClassifyInput {
            last_user: "analyze this chart in depth",
            prompt_tokens: 7000,
            has_images: true,
            ..ClassifyInput::default()
        };
        let d = classify(input);
        assert_eq!(d.tier, Tier::Primary);
        assert_eq!(d.reason, "images → primary");
        assert_eq!(d.rule, Rule::Vision);
        let c = Classifier::new(ClassifierConfig {
            vision_tier: Tier::Heavy,
            ..ClassifierConfig::default()
        });
        assert_eq!(c.classify(&input).unwrap().tier, Tier::Heavy);
    }

    #[test]
    fn audio_goes_to_the_audio_tier_after_images() {
        let input = ClassifyInput {
            last_user: "transcribe this and explain it in depth",
            prompt_tokens: 7000,
            has_audio: true,
            ..ClassifyInput::default()
        };
        let d = classify(input);
        assert_eq!((d.tier, d.rule), (Tier::Primary, Rule::Audio));
        assert_eq!(d.reason, "audio → primary");
        let c = Classifier::new(ClassifierConfig {
            audio_tier: Tier::Fast,
            ..ClassifierConfig::default()
        });
        assert_eq!(c.classify(&input).unwrap().tier, Tier::Fast);
        // Images and audio together: the images' rule decides (the router then moves the request off a
        // tier whose model cannot take both).
        let both = classify(ClassifyInput {
            has_images: true,
            ..input
        });
        assert_eq!(both.rule, Rule::Vision);
    }

    // ---- Rule 3: length and context ---------------------------------------------------------------------

    #[test]
    fn long_prompt_goes_heavy() {
        let d = classify(ClassifyInput {
            last_user: "hi",
            prompt_tokens: 7200,
            ..ClassifyInput::default()
        });
        assert_eq!(d.tier, Tier::Heavy);
        assert_eq!(d.reason, "prompt 7200 tokens > 6000 → heavy");
        assert_eq!(d.rule, Rule::LongPrompt);
        // The threshold itself is not "more than".
        let d = classify(ClassifyInput {
            last_user: "hi",
            prompt_tokens: 6000,
            ..ClassifyInput::default()
        });
        assert_eq!(d.tier, Tier::Fast);
    }

    #[test]
    fn context_overflow_bumps_to_larger_tier() {
        let c = Classifier::new(ClassifierConfig {
            long_prompt_tokens: 1_000_000, // disable rule 3 to reach the context check
            ..ClassifierConfig::default()
        });
        let d = c
            .classify(&ClassifyInput {
                last_user: "hello",
                prompt_tokens: 9000,
                ..ClassifyInput::default()
            })
            .unwrap();
        assert_eq!(d.tier, Tier::Primary);
        assert_eq!(d.rule, Rule::ContextLimit);
        assert_eq!(
            d.reason,
            "greeting → fast; prompt 9000 tokens > fast limit 8192 → primary"
        );
        let d = c
            .classify(&ClassifyInput {
                last_user: "hello",
                prompt_tokens: 40_000,
                ..ClassifyInput::default()
            })
            .unwrap();
        assert_eq!(d.tier, Tier::Heavy);
        assert_eq!(
            d.reason,
            "greeting → fast; prompt 40000 tokens > fast limit 8192 → primary; \
             prompt 40000 tokens > primary limit 32768 → heavy"
        );
    }

    #[test]
    fn max_tokens_counts_against_context_when_configured() {
        let input = ClassifyInput {
            last_user: "hey",
            prompt_tokens: 10,
            max_tokens: Some(16_384),
            ..ClassifyInput::default()
        };
        let d = classify(input);
        assert_eq!(d.tier, Tier::Primary);
        assert_eq!(
            d.reason,
            "greeting → fast; needs 16394 tokens (prompt 10 + max_tokens 16384) > fast limit 8192 → primary"
        );
        let c = Classifier::new(ClassifierConfig {
            reserve_max_tokens: false,
            ..ClassifierConfig::default()
        });
        assert_eq!(c.classify(&input).unwrap().tier, Tier::Fast);
    }

    // ---- Rule 4: heavy keywords -------------------------------------------------------------------------

    #[test]
    fn heavy_keywords() {
        let d = msg("Please ANALYZE the attached quarterly numbers");
        assert_eq!(d.tier, Tier::Heavy);
        assert_eq!(d.reason, "keyword 'analyze' → heavy");
        assert_eq!(d.rule, Rule::HeavyKeyword);
        assert_eq!(
            msg("Give me a step-by-step plan").reason,
            "keyword 'step-by-step plan' → heavy"
        );
        assert_eq!(msg("give me a step by step plan").tier, Tier::Heavy);
        assert_eq!(
            msg("an in depth look at rust").reason,
            "keyword 'in-depth' → heavy"
        );
        assert_eq!(
            msg("Compare and contrast X and Y").reason,
            "keyword 'compare and contrast' → heavy"
        );
        assert_eq!(msg("researching the topic").tier, Tier::Heavy);
        // Phrase words must be consecutive.
        assert_ne!(
            msg("compare these and then contrast").rule,
            Rule::HeavyKeyword
        );
    }

    #[test]
    fn heavy_beats_primary_and_first_occurrence_is_reported() {
        let d = msg("explain the code, then write an essay about it");
        assert_eq!(d.tier, Tier::Heavy);
        assert_eq!(d.reason, "keyword 'essay' → heavy");
        let d = msg("rewrite and then summarize this");
        assert_eq!(d.reason, "keyword 'rewrite' → primary");
    }

    // ---- Rule 5: primary keywords, code, tools ----------------------------------------------------------

    #[test]
    fn primary_keywords() {
        let d = msg("summarize this article for me please");
        assert_eq!(d.tier, Tier::Primary);
        assert_eq!(d.reason, "keyword 'summarize' → primary");
        assert_eq!(d.rule, Rule::PrimaryKeyword);
        assert_eq!(
            msg("Translate to French: good night").reason,
            "keyword 'translate' → primary"
        );
        assert_eq!(
            msg("write a unit test").reason,
            "keyword 'unit test' → primary"
        );
        assert_eq!(
            msg("write unit tests").reason,
            "keyword 'unit test' → primary"
        );
    }

    #[test]
    fn keyword_word_boundaries_and_inflections() {
        for matching in [
            "code",
            "Code!",
            "codes",
            "coded",
            "coder",
            "CODING",
            "(code)",
            "code-review",
        ] {
            assert_eq!(
                msg(matching).reason,
                "keyword 'code' → primary",
                "{matching}"
            );
        }
        for not_matching in ["encoded", "barcode", "decoder", "codec", "unicode"] {
            assert_ne!(
                msg(not_matching).rule,
                Rule::PrimaryKeyword,
                "{not_matching}"
            );
        }
        assert_eq!(msg("debugging").reason, "keyword 'debug' → primary");
        assert_eq!(msg("it got debugged").reason, "keyword 'debug' → primary");
        assert_eq!(msg("fixes").reason, "keyword 'fix' → primary");
        assert_eq!(msg("two summaries").reason, "keyword 'summary' → primary");
        for not_matching in ["prefix", "fixture", "suffix", "bugle"] {
            assert_ne!(
                msg(not_matching).rule,
                Rule::PrimaryKeyword,
                "{not_matching}"
            );
        }
        // "proofread" is its own primary keyword, not heavy's "proof".
        assert_eq!(
            msg("proofread this").reason,
            "keyword 'proofread' → primary"
        );
    }

    #[test]
    fn inflection_table() {
        let f = inflections("code");
        for w in ["code", "codes", "coded", "coding", "coder"] {
            assert!(f.contains(&w.to_owned()), "{w}");
        }
        assert!(inflections("plan").contains(&"planning".to_owned()));
        assert!(inflections("summary").contains(&"summaries".to_owned()));
        assert!(!inflections("fix").contains(&"fixxing".to_owned()));
    }

    #[test]
    fn code_like_content() {
        let cases = [
            ("here:\n```\nprint(1)\n```", "``` fence"),
            ("def add(a, b):\n    return a + b", "def"),
            ("pub fn main() {\n}", "fn"),
            ("function f(x) { return x }", "function"),
            ("#include <stdio.h>", "#include"),
            ("from os import path", "import"),
            ("class Foo:\n  pass", "class"),
            ("int x = 1;\nint y = 2;", "lines ending in ; { }"),
            ("SELECT * FROM users", "SQL"),
            ("select name from t where id = 3", "SQL"),
            ("int x=1; if(x){y();} z;", "{ } ; density"),
        ];
        for (text, signal) in cases {
            assert_eq!(code_signal(text), Some(signal), "{text}");
            assert_eq!(msg(text).tier, Tier::Primary, "{text}");
        }
        // Through the classifier, when no keyword fires first.
        let d = msg("def add(a, b):\n    return a + b");
        assert_eq!(d.rule, Rule::Code);
        assert_eq!(d.reason, "code-like content (def) → primary");
        // "function" is also a primary keyword, which is checked first.
        assert_eq!(
            msg("function f(x) { return x }").reason,
            "keyword 'function' → primary"
        );
        for prose in [
            "let me know how it goes tomorrow",
            "select the best option from the list",
            "I went to class today",
            "functional programming (FP) is neat",
            "first; second",
        ] {
            assert!(code_signal(prose).is_none(), "{prose}");
        }
    }

    #[test]
    fn tools_go_primary() {
        let d = classify(ClassifyInput {
            last_user: "hi",
            has_tools: true,
            ..ClassifyInput::default()
        });
        assert_eq!(d.tier, Tier::Primary);
        assert_eq!(d.reason, "tools present → primary");
        // Heavy keywords still win over tools.
        let d = classify(ClassifyInput {
            last_user: "do a rigorous analysis",
            has_tools: true,
            ..ClassifyInput::default()
        });
        assert_eq!(d.tier, Tier::Heavy);
    }

    // ---- Rule 6: small talk -----------------------------------------------------------------------------

    #[test]
    fn greetings_go_fast() {
        for g in [
            "hi",
            "Hello!",
            "hey there :)",
            "Good morning, Jemma!",
            "thanks!",
            "Thank you so much",
            "hi, how are you?",
            "what's up",
        ] {
            let d = msg(g);
            assert_eq!(d.tier, Tier::Fast, "{g}");
            assert_eq!(d.reason, "greeting → fast", "{g}");
        }
    }

    #[test]
    fn short_messages_without_reasoning_go_fast() {
        let d = msg("capital of France?");
        assert_eq!(d.tier, Tier::Fast);
        assert_eq!(
            d.reason,
            "short message (18 chars ≤ 60, no reasoning cue) → fast"
        );
        assert_eq!(d.rule, Rule::ShortMessage);
        for reasoning in [
            "why is the sky blue?",
            "how do magnets work",
            "solve 3x + 5 = 20",
        ] {
            let d = msg(reasoning);
            assert_eq!(d.rule, Rule::Default, "{reasoning}");
            assert_eq!(d.reason, "default → primary");
        }
    }

    #[test]
    fn long_or_contextual_messages_are_not_small_talk() {
        let long_greeting = "hello hello hello hello hello hello hello hello hello hello hello";
        assert!(long_greeting.chars().count() > 60);
        assert_eq!(msg(long_greeting).rule, Rule::Default);
        // A short follow-up deep into a conversation is not sent to fast.
        let d = classify(ClassifyInput {
            last_user: "and the second one?",
            prompt_tokens: 3000,
            ..ClassifyInput::default()
        });
        assert_eq!(d.rule, Rule::Default);
        // ... nor is one in a coding conversation, though a greeting there still is.
        let text = "user: ```rust\nfn main() {}\n```\nuser: now make it async";
        let d = classify(ClassifyInput {
            text,
            last_user: "now make it async",
            prompt_tokens: 40,
            ..ClassifyInput::default()
        });
        assert_eq!(d.reason, "code earlier in conversation → primary");
        let d = classify(ClassifyInput {
            text,
            last_user: "thanks!",
            prompt_tokens: 40,
            ..ClassifyInput::default()
        });
        assert_eq!(d.rule, Rule::Greeting);
    }

    // ---- Rule 7: default --------------------------------------------------------------------------------

    #[test]
    fn default_tier_applies_and_is_configurable() {
        let text =
            "I would like to hear about the history of the printing press in Europe, please.";
        let d = msg(text);
        assert_eq!(d.tier, Tier::Primary);
        assert_eq!(d.reason, "default → primary");
        let c = Classifier::new(ClassifierConfig {
            default_tier: Tier::Heavy,
            ..ClassifierConfig::default()
        });
        let d = c
            .classify(&ClassifyInput {
                last_user: text,
                ..ClassifyInput::default()
            })
            .unwrap();
        assert_eq!(d.reason, "default → heavy");
        // Empty input is not small talk.
        assert_eq!(classify(ClassifyInput::default()).rule, Rule::Default);
    }

    #[test]
    fn empty_last_user_falls_back_to_text() {
        let d = classify(ClassifyInput {
            text: "please summarize the following",
            last_user: "   ",
            prompt_tokens: 10,
            ..ClassifyInput::default()
        });
        assert_eq!(d.reason, "keyword 'summarize' → primary");
    }

    // ---- Robustness -------------------------------------------------------------------------------------

    #[test]
    fn unicode_text_never_panics() {
        let samples = [
            "こんにちは",
            "👋",
            "🤖🤖🤖 code 🤖",
            "İSTANBUL'da kod yaz",
            "Ünïcödé ÇODE",
            "مرحبا، كيف حالك؟",
            "e\u{301}\u{301}\u{301}",
            "\u{0}\u{feff}\u{200b}",
            "ß".repeat(10_000).as_str(),
            "select 😀 from",
            "ǅ ǈ ǋ",
        ]
        .map(str::to_owned);
        for s in &samples {
            let _ = msg(s);
            let _ = code_signal(s);
        }
        // Non-ASCII words around an ASCII keyword still match it; inside one they do not.
        assert_eq!(
            msg("日本語 summarize 日本語").reason,
            "keyword 'summarize' → primary"
        );
        assert_eq!(msg("日本語summarize").rule, Rule::ShortMessage);
        assert_eq!(msg("👋").rule, Rule::ShortMessage);
    }

    #[test]
    fn odd_keyword_config_is_tolerated() {
        let c = Classifier::new(ClassifierConfig {
            primary_keywords: strings(&["", "  ", "--", "C++", "Ärger"]),
            ..ClassifierConfig::default()
        });
        let d = c
            .classify(&ClassifyInput {
                last_user: "ärgerlich ÄRGER",
                ..ClassifyInput::default()
            })
            .unwrap();
        assert_eq!(d.reason, "keyword 'Ärger' → primary");
    }

    #[test]
    fn config_serde_defaults() {
        let cfg: ClassifierConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, ClassifierConfig::default());
        let cfg: ClassifierConfig = serde_json::from_str(
            r#"{"vision_tier": "heavy", "heavy_keywords": ["ponder"], "model_aliases": {"gpt-4o": "heavy"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.vision_tier, Tier::Heavy);
        assert_eq!(cfg.heavy_keywords, ["ponder"]);
        assert_eq!(cfg.fast_max_prompt_tokens, 8192);
        let c = Classifier::new(cfg);
        assert_eq!(
            c.classify(&ClassifyInput {
                last_user: "analyze it",
                ..ClassifyInput::default()
            })
            .unwrap()
            .rule,
            Rule::ShortMessage,
            "the configured list replaces the default one"
        );
        assert!(serde_json::from_str::<ClassifierConfig>(r#"{"vison_tier": "heavy"}"#).is_err());
        let json = serde_json::to_value(ClassifierConfig::default()).unwrap();
        assert_eq!(json["default_tier"], "primary");
    }

    #[test]
    fn decision_serialises() {
        let json = serde_json::to_value(msg("hi")).unwrap();
        assert_eq!(json["tier"], "fast");
        assert_eq!(json["rule"], "greeting");
        assert_eq!(json["reason"], "greeting → fast");
    }

    #[test]
    fn estimate_tokens_is_rough_but_sane() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
        assert_eq!(estimate_tokens("日本語"), 3);
    }
}
