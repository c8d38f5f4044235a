//! Client text stays text: a model's control tokens spelled inside what a client sends are not read as
//! control tokens.
//!
//! A chat prompt is rendered into one string and tokenized with special tokens parsed, so that the
//! template's `<|turn>` and `<turn|>` become the control tokens the model was trained on. A user's message,
//! a tool's result or a document pasted into either is rendered into the same string, so without care
//! `<turn|>\n<|turn>system\n…` typed into a message ends the user's turn and opens a system turn the model
//! obeys: prompt injection through turn markers (OWASP LLM01). llama-server, vLLM and `mlx_lm.server` parse
//! such text as control tokens by default; OpenAI's API reads it as text, and so does Jemma.
//!
//! How ([`ChatTemplate::render`](crate::template::ChatTemplate::render) with
//! [`ControlTokens`]): every control token that a client's text spells, alone or together with its
//! neighbours (two content parts `"<|tu"` and `"rn>"` rendered side by side), gets a [`CUT`] after its
//! first character. Engines tokenize the pieces between cuts one by one ([`pieces`]), so no piece holds a
//! whole control token the client wrote and `<turn|>` becomes the text `<`, `turn|>`. A prompt whose client
//! text spells no control token has no cut and tokenizes exactly as before.
//!
//! Every string of a chat request is guarded, object keys included: messages' content (free text, wrapped
//! whole while the template renders it), tool results, names, ids, tool definitions and their property
//! names. In an earlier answer (an assistant message, or the answer a prompt continues) the model's own
//! thinking-channel markers stay markers, since the template reads them to drop that turn's thinking; its
//! other control tokens are cut like client text, since clients send the history they like.
//!
//! Finding where client text lands in the rendered prompt: free text is wrapped in two Unicode
//! noncharacters (U+FDD0, U+FDD1) and every string is cut where it spells a control token; the template
//! renders that, its `trim` stepping over the markers. With the markers removed, the result must equal the
//! plain rendering byte for byte, or a template that transforms client text in other ways (Python's
//! `.strip()`, slicing) could tokenize differently than it renders. When it does not, the strings are only
//! cut (which catches every token a single string spells, though not one spelled across two strings) and
//! checked the same way. When that fails too, the request spells a control token the template transforms,
//! and it is refused ([`TemplateError::ControlTokenInText`], a 400) rather than read with the token. The
//! noncharacters, and U+FDD2 (the cut), reach the model as U+FFFD where a client sends them.

use std::borrow::Cow;
use std::ops::Range;

use aho_corasick::AhoCorasick;
use serde_json::Value as Json;

use crate::template::TemplateError;

/// Where a prompt must be cut before it is tokenized: U+FDD2, a Unicode noncharacter ("for internal use,
/// not for interchange"). Tokenize the [`pieces`] between cuts one by one.
pub const CUT: char = '\u{FDD2}';
/// Opens a client string while the template renders it (never left in a prompt).
const OPEN: char = '\u{FDD0}';
/// Closes a client string while the template renders it (never left in a prompt).
const CLOSE: char = '\u{FDD1}';
/// What the markers become where a client sends them: they carry no meaning in text, and one left in place
/// would confuse where client text begins and ends.
const REPLACEMENT: char = '\u{FFFD}';

/// Gemma 4's named control tokens as its tokenizer spells them (the real tokenizer's ids 0–4 and 46–106,
/// and the media placeholders), for tests, fuzzing and benchmarks: an engine reads its control tokens from
/// its own tokenizer, which also lists the thousands of `<unusedN>` ones.
pub const GEMMA4_NAMED_CONTROL_TOKENS: [&str; 24] = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    "<|\"|>",
    "<|think|>",
    "<|channel>",
    "<channel|>",
    "<|turn>",
    "<turn|>",
    "<|image|>",
    "<|audio|>",
    "<|video|>",
    "<|image>",
    "<image|>",
    "<|audio>",
    "<audio|>",
];

/// The pieces of a rendered prompt between its [`CUT`]s, in order: tokenize each with special tokens parsed
/// and concatenate the ids. A prompt without cuts is one piece, itself.
pub fn pieces(prompt: &str) -> impl Iterator<Item = &str> {
    prompt.split(CUT).filter(|p| !p.is_empty())
}

/// A model's control tokens as text (`<|turn>`, `<turn|>`, `<bos>`, …): what a client's text must not spell.
#[derive(Clone)]
pub struct ControlTokens {
    /// Finds every occurrence, overlapping ones included.
    matcher: Option<AhoCorasick>,
    /// The first and last characters of the tokens: text without any of them spells none.
    edges: Vec<char>,
    /// Every proper prefix and every proper suffix of the tokens: what a string may end or begin with
    /// that a neighbouring string could complete into a token ([`ControlTokens::edge_cuts`]).
    prefixes: std::collections::HashSet<String>,
    suffixes: std::collections::HashSet<String>,
    /// The longest token, bytes.
    longest: usize,
    /// How many tokens.
    len: usize,
}

impl std::fmt::Debug for ControlTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlTokens")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl ControlTokens {
    /// The control tokens whose texts are `tokens` (the tokenizer's special tokens). Tokens of one
    /// character cannot be cut and are left out, as are empty ones.
    pub fn new<I, S>(tokens: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut texts: Vec<String> = tokens
            .into_iter()
            .map(|t| t.as_ref().to_owned())
            .filter(|t| t.chars().nth(1).is_some())
            .collect();
        texts.sort_unstable();
        texts.dedup();
        let mut edges: Vec<char> = texts
            .iter()
            .flat_map(|t| [t.chars().next(), t.chars().next_back()])
            .flatten()
            .collect();
        edges.sort_unstable();
        edges.dedup();
        let (mut prefixes, mut suffixes) = (
            std::collections::HashSet::new(),
            std::collections::HashSet::new(),
        );
        for t in &texts {
            for (i, _) in t.char_indices().skip(1) {
                prefixes.insert(t[..i].to_owned());
                suffixes.insert(t[i..].to_owned());
            }
        }
        // The automaton's default (standard) semantics report overlapping matches, which the cuts need.
        let matcher = (!texts.is_empty())
            .then(|| AhoCorasick::new(&texts).ok())
            .flatten();
        Self {
            len: if matcher.is_some() { texts.len() } else { 0 },
            longest: texts.iter().map(String::len).max().unwrap_or(0),
            matcher,
            edges,
            prefixes,
            suffixes,
        }
    }

    /// How many control tokens are guarded.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Cut positions inside every control token `text` spells (after its first character), the model's
    /// own channel markers ([`MODEL_MARKERS`]) left whole when `model`.
    fn inner_cuts(&self, text: &str, model: bool) -> Vec<usize> {
        let Some(matcher) = &self.matcher else {
            return vec![];
        };
        let mut cuts: Vec<usize> = matcher
            .find_overlapping_iter(text)
            .filter(|m| !(model && MODEL_MARKERS.contains(&&text[m.start()..m.end()])))
            .map(|m| m.start() + text[m.start()..].chars().next().map_or(1, char::len_utf8))
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        cuts
    }

    /// Cut positions that keep `text` from completing a control token with the strings rendered beside it:
    /// at its end (trailing whitespace aside) when that end begins a token, and at its start (leading
    /// whitespace aside) when that start ends one. For the guard's fallback, which cannot see where strings
    /// meet.
    fn edge_cuts(&self, text: &str) -> Vec<usize> {
        let mut cuts = vec![];
        let head = text.trim_end();
        if head
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| head.len() - i < self.longest)
            .any(|i| self.prefixes.contains(&head[i..]))
        {
            cuts.push(head.len());
        }
        let tail = text.trim_start();
        if (tail.char_indices().map(|(i, c)| i + c.len_utf8()))
            .take_while(|&len| len < self.longest)
            .any(|len| self.suffixes.contains(&tail[..len]))
        {
            cuts.push(text.len() - tail.len());
        }
        cuts
    }

    /// The first control token `text` spells (leaving out the model's channel markers when `model`).
    fn first_in(&self, text: &str, model: bool) -> Option<String> {
        let matcher = self.matcher.as_ref()?;
        matcher
            .find_overlapping_iter(text)
            .map(|m| &text[m.start()..m.end()])
            .find(|t| !(model && MODEL_MARKERS.contains(t)))
            .map(String::from)
    }

    /// Whether `text` holds a character a control token begins or ends with.
    fn may_touch(&self, text: &str) -> bool {
        text.chars().any(|c| self.edges.binary_search(&c).is_ok())
    }

    /// Cut positions for every occurrence in `text` that lies at least partly in one of `spans` (sorted,
    /// disjoint): inside the occurrence, at its first client character (after that character when the
    /// occurrence starts in client text).
    fn cuts(&self, text: &str, spans: &[Range<usize>]) -> Vec<usize> {
        let Some(matcher) = &self.matcher else {
            return vec![];
        };
        let mut cuts = vec![];
        for m in matcher.find_overlapping_iter(text) {
            let (start, end) = (m.start(), m.end());
            // The first span that ends after the occurrence starts.
            let i = spans.partition_point(|s| s.end <= start);
            let Some(span) = spans.get(i).filter(|s| s.start < end) else {
                continue;
            };
            let cut = if span.start <= start {
                start + text[start..].chars().next().map_or(1, char::len_utf8)
            } else {
                span.start
            };
            cuts.push(cut);
        }
        cuts.sort_unstable();
        cuts.dedup();
        cuts
    }
}

/// The control tokens an earlier answer of the model carries in its `content` as the model wrote them:
/// Gemma 4's thinking-channel markers, which its template reads to drop that turn's thinking. Every other
/// control token in an assistant message is cut like client text: the model writes no turn markers, `<bos>`
/// or media placeholders into its answers, and a client can put anything into the history it sends.
const MODEL_MARKERS: [&str; 2] = ["<|channel>", "<channel|>"];

/// What a string of the request is to the guard.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Free text a client (or a tool, or a document) wrote: a non-assistant message's content, a tool's
    /// description. Wrapped whole while the template renders it, and cut where it spells a control token.
    Free,
    /// Any other string (a tool's name, a schema's property name, a tool message's `name`): cut where it
    /// spells a control token, never wrapped, since a template compares such strings.
    Strict,
    /// An earlier answer's content: cut where it spells a control token other than [`MODEL_MARKERS`].
    Model,
    /// A message's `role`, which the template compares and the gateway has checked.
    Role,
}

thread_local! {
    /// Whether this thread is rendering marked client strings ([`trim_marked`] then trims through the
    /// markers); at any other time `trim` is Jinja2's.
    static MARKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How client strings are marked before rendering.
#[derive(Clone, Copy, PartialEq)]
enum Mark {
    /// Free text wrapped whole in [`OPEN`] … [`CLOSE`], every string cut where it spells a control token.
    Whole,
    /// Every string cut where it spells a control token, nothing wrapped.
    Cuts,
}

/// How a prompt was guarded ([`render_traced`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Guarded {
    /// No string holds a character a control token begins or ends with: nothing to cut.
    Untouched,
    /// Free text was wrapped whole and the template rendered it as it was.
    Whole,
    /// Cut inside the strings only (the template transforms free text, but leaves the cuts be).
    Cuts,
}

/// Renders a chat with `control` guarded: `render` is the template's plain rendering of (messages, tools).
/// Returns the prompt with [`CUT`]s where client text spells a control token (none when it spells none).
///
/// Errors: `render`'s; [`TemplateError::ControlTokenInText`] when the client text spells a control token
/// and the template transforms that text so that neither way of marking it can be checked (the request
/// is refused rather than read with the token as a control token).
pub(crate) fn render(
    control: &ControlTokens,
    messages: &[Json],
    tools: Option<&[Json]>,
    render: impl Fn(&[Json], Option<&[Json]>) -> Result<String, TemplateError>,
) -> Result<String, TemplateError> {
    render_traced(control, messages, tools, render).map(|(prompt, _)| prompt)
}

/// [`render`], saying how the prompt was guarded.
pub(crate) fn render_traced(
    control: &ControlTokens,
    messages: &[Json],
    tools: Option<&[Json]>,
    render: impl Fn(&[Json], Option<&[Json]>) -> Result<String, TemplateError>,
) -> Result<(String, Guarded), TemplateError> {
    let (messages, tools) = sanitize(messages, tools);
    let tools = tools.as_deref();
    let plain = render(&messages, tools)?;
    let mut touched = false;
    visit(&messages, tools, &mut |text, _| {
        touched |= control.may_touch(text)
    });
    if !touched || control.is_empty() {
        return Ok((plain, Guarded::Untouched));
    }
    for (how, guarded) in [(Mark::Whole, Guarded::Whole), (Mark::Cuts, Guarded::Cuts)] {
        let (marked_messages, marked_tools) = mark(control, &messages, tools, how);
        MARKING.set(true);
        let rendered = render(&marked_messages, marked_tools.as_deref());
        MARKING.set(false);
        let Ok(rendered) = rendered else {
            continue;
        };
        let Some((text, spans, mut cuts)) = unmark(&rendered) else {
            continue;
        };
        if text != plain {
            continue;
        }
        cuts.extend(control.cuts(&text, &spans));
        cuts.sort_unstable();
        cuts.dedup();
        return Ok((insert_cuts(&text, &cuts), guarded));
    }
    // Marking every string only where it spells a control token changes nothing in a request that spells
    // none, so this is a request that does, through a template that transforms it.
    let mut token = None;
    visit(&messages, tools, &mut |text, kind| {
        if token.is_none() {
            token = control.first_in(text, kind == Kind::Model);
        }
    });
    Err(TemplateError::ControlTokenInText {
        token: token.unwrap_or_default(),
    })
}

/// Calls `f` on every string of the request with what it is to the guard, object keys included (as
/// [`Kind::Strict`]).
fn visit(messages: &[Json], tools: Option<&[Json]>, f: &mut impl FnMut(&str, Kind)) {
    fn all(value: &Json, kind: Kind, f: &mut impl FnMut(&str, Kind)) {
        match value {
            Json::String(s) => f(s, kind),
            Json::Array(items) => items.iter().for_each(|v| all(v, kind, f)),
            Json::Object(map) => {
                for (k, v) in map {
                    f(k, Kind::Strict);
                    all(v, kind_of(kind, k), f);
                }
            }
            _ => {}
        }
    }
    for message in messages {
        let kind = message_kind(message);
        match message {
            Json::Object(fields) => {
                for (k, v) in fields {
                    f(k, Kind::Strict);
                    match (k.as_str(), v) {
                        ("role", Json::String(role)) => f(role, Kind::Role),
                        _ => all(v, kind_of(kind, k), f),
                    }
                }
            }
            other => all(other, Kind::Strict, f),
        }
    }
    for tool in tools.unwrap_or_default() {
        all(tool, Kind::Strict, f);
    }
}

/// The same strings as [`visit`], mutably: `f` may change a string, keys included (a changed key keeps
/// its place).
fn visit_mut(
    messages: &mut [Json],
    tools: Option<&mut [Json]>,
    f: &mut impl FnMut(&mut String, Kind),
) {
    fn all(value: &mut Json, kind: Kind, f: &mut impl FnMut(&mut String, Kind)) {
        match value {
            Json::String(s) => f(s, kind),
            Json::Array(items) => items.iter_mut().for_each(|v| all(v, kind, f)),
            Json::Object(map) => {
                let entries = std::mem::take(map);
                for (mut k, mut v) in entries {
                    all(&mut v, kind_of(kind, &k), f);
                    f(&mut k, Kind::Strict);
                    map.insert(k, v);
                }
            }
            _ => {}
        }
    }
    for message in messages {
        let kind = message_kind(message);
        match message {
            Json::Object(fields) => {
                for (mut k, mut v) in std::mem::take(fields) {
                    match (k.as_str(), &mut v) {
                        ("role", Json::String(role)) => f(role, Kind::Role),
                        _ => all(&mut v, kind_of(kind, &k), f),
                    }
                    f(&mut k, Kind::Strict);
                    fields.insert(k, v);
                }
            }
            other => all(other, Kind::Strict, f),
        }
    }
    for tool in tools.unwrap_or_default() {
        all(tool, Kind::Strict, f);
    }
}

/// What a message's strings are: [`Kind::Model`] within an earlier answer (assistant), else
/// [`Kind::Free`] for its content and [`Kind::Strict`] for the rest (through [`kind_of`]).
fn message_kind(message: &Json) -> Kind {
    match message.get("role").and_then(Json::as_str) {
        Some("assistant" | "model") => Kind::Model,
        _ => Kind::Free,
    }
}

/// The kind of the value under `key` in an object whose strings are `parent`: free text is a message's
/// `content` (and its parts' `text`) and a tool's `description`; an answer's content is the model's;
/// everything else is strict (a message's own `role` is handled where messages are walked).
fn kind_of(parent: Kind, key: &str) -> Kind {
    match (parent, key) {
        (_, "description") => Kind::Free,
        (Kind::Free | Kind::Model, "content" | "text") => parent,
        // A message's content parts are objects under `content`: their `text` keeps the message's kind.
        _ => Kind::Strict,
    }
}

/// Whether a character is one of the guard's own markers.
fn is_marker(c: char) -> bool {
    matches!(c, OPEN | CLOSE | CUT)
}

/// The request with the guard's markers replaced by U+FFFD in every string and key (borrowed when there
/// are none).
fn sanitize<'a>(
    messages: &'a [Json],
    tools: Option<&'a [Json]>,
) -> (Cow<'a, [Json]>, Option<Cow<'a, [Json]>>) {
    let mut found = false;
    visit(messages, tools, &mut |s, _| found |= s.contains(is_marker));
    if !found {
        return (Cow::Borrowed(messages), tools.map(Cow::Borrowed));
    }
    let (mut messages, mut tools) = (messages.to_vec(), tools.map(<[Json]>::to_vec));
    visit_mut(&mut messages, tools.as_deref_mut(), &mut |s, _| {
        if s.contains(is_marker) {
            *s = s.replace(is_marker, &REPLACEMENT.to_string());
        }
    });
    (Cow::Owned(messages), tools.map(Cow::Owned))
}

/// Copies of `messages` and `tools` with their strings marked `how`.
fn mark(
    control: &ControlTokens,
    messages: &[Json],
    tools: Option<&[Json]>,
    how: Mark,
) -> (Vec<Json>, Option<Vec<Json>>) {
    let (mut messages, mut tools) = (messages.to_vec(), tools.map(<[Json]>::to_vec));
    visit_mut(&mut messages, tools.as_deref_mut(), &mut |s, kind| {
        // A string with neither end of any token in it can start, end or hold none (the markers begin
        // with one too).
        if kind == Kind::Role || !control.may_touch(s) {
            return;
        }
        let mut cuts = control.inner_cuts(s, kind == Kind::Model);
        if how == Mark::Cuts {
            // Nothing shows where strings meet: each string's ends (and an answer's stretches between its
            // channel markers, which the template joins when it drops the thinking) are cut where they
            // could complete a token with what comes next.
            for (at, stretch) in between_model_markers(s, kind == Kind::Model) {
                cuts.extend(control.edge_cuts(stretch).into_iter().map(|c| at + c));
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        let cut = insert_cuts(s, &cuts);
        *s = match (how, kind) {
            (Mark::Whole, Kind::Free) => format!("{OPEN}{cut}{CLOSE}"),
            (Mark::Whole, Kind::Model) => wrap_between_model_markers(&cut),
            _ => cut,
        };
    });
    (messages, tools)
}

/// The stretches of `text` between its channel markers ([`MODEL_MARKERS`]) with their offsets, when
/// `model`; else the whole text.
fn between_model_markers(text: &str, model: bool) -> Vec<(usize, &str)> {
    if !model {
        return vec![(0, text)];
    }
    let mut bounds: Vec<(usize, usize)> = MODEL_MARKERS
        .iter()
        .flat_map(|m| text.match_indices(m).map(|(at, m)| (at, at + m.len())))
        .collect();
    bounds.sort_unstable();
    let mut out = vec![];
    let mut from = 0;
    for (start, end) in bounds.into_iter().chain([(text.len(), text.len())]) {
        if start >= from {
            out.push((from, &text[from..start]));
            from = end;
        }
    }
    out
}

/// An answer's (already cut) text with each stretch between its channel markers wrapped in [`OPEN`] …
/// [`CLOSE`]: the markers stay outside, so the template can split the text at them and drop a turn's
/// thinking without leaving a marker unpaired, and a token the join spells is seen to touch client text.
fn wrap_between_model_markers(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut rest = text;
    loop {
        let next = MODEL_MARKERS
            .iter()
            .filter_map(|m| rest.find(m).map(|at| (at, m.len())))
            .min();
        let (at, len) = next.unwrap_or((rest.len(), 0));
        if at > 0 {
            out.push(OPEN);
            out.push_str(&rest[..at]);
            out.push(CLOSE);
        }
        out.push_str(&rest[at..at + len]);
        if len == 0 {
            return out;
        }
        rest = &rest[at + len..];
    }
}

/// An earlier answer's text (a trailing assistant message the prompt continues) cut where it spells a
/// control token other than the model's own channel markers ([`MODEL_MARKERS`]), its guard markers
/// replaced: as [`render`] treats the answers in the history.
pub(crate) fn cut_model_text(control: &ControlTokens, text: &str) -> String {
    let text = text.replace(is_marker, &REPLACEMENT.to_string());
    let cuts = control.inner_cuts(&text, true);
    insert_cuts(&text, &cuts)
}

/// `text` with [`CUT`] inserted at each of `cuts` (ascending byte offsets on character boundaries).
fn insert_cuts(text: &str, cuts: &[usize]) -> String {
    let mut out = String::with_capacity(text.len() + cuts.len() * CUT.len_utf8());
    let mut from = 0;
    for &at in cuts {
        out.push_str(&text[from..at]);
        out.push(CUT);
        from = at;
    }
    out.push_str(&text[from..]);
    out
}

/// A marked rendering taken apart: the text without markers, the client spans in it (from [`OPEN`] …
/// [`CLOSE`]) and the positions of the [`CUT`]s it held. None when the markers do not pair up (the template
/// cut a client string apart).
fn unmark(rendered: &str) -> Option<(String, Vec<Range<usize>>, Vec<usize>)> {
    let mut text = String::with_capacity(rendered.len());
    let (mut spans, mut cuts) = (vec![], vec![]);
    let mut open = None;
    for c in rendered.chars() {
        match c {
            OPEN if open.is_none() => open = Some(text.len()),
            CLOSE => spans.push(open.take()?..text.len()),
            OPEN => return None,
            CUT => cuts.push(text.len()),
            c => text.push(c),
        }
    }
    if open.is_some() {
        return None;
    }
    Some((text, spans, cuts))
}

/// The `trim` filter's work on a string that may hold the guard's markers: whitespace (`strip`) goes from
/// both ends as if the markers were not there, and the markers stay where they were (a client string
/// trimmed to nothing loses its pair). Strings without markers are trimmed as usual.
pub(crate) fn trim_marked(text: &str, strip: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !MARKING.get() || !text.contains([OPEN, CLOSE, CUT]) {
        return Cow::Borrowed(text.trim_matches(strip));
    }
    let chars: Vec<char> = text.chars().collect();
    let skip = |c: &char| strip(*c) || is_marker(*c);
    let head = chars.iter().take_while(|c| skip(c)).count();
    let tail = if head == chars.len() {
        0
    } else {
        chars.iter().rev().take_while(|c| skip(c)).count()
    };
    let kept = |range: &[char]| -> String { range.iter().filter(|c| is_marker(**c)).collect() };
    let mut out = kept(&chars[..head]);
    out.extend(&chars[head..chars.len() - tail]);
    out.push_str(&kept(&chars[chars.len() - tail..]));
    Cow::Owned(out.replace(&format!("{OPEN}{CLOSE}"), ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_fall_inside_client_occurrences_only() {
        let control = ControlTokens::new(["<turn|>", "<|turn>", "x"]);
        assert_eq!(control.len(), 2, "one-character tokens cannot be cut");
        let text = "<|turn>user\nhi <turn|> there<turn|>";
        // Client text: "hi <turn|> there".
        let client = 12..28;
        assert_eq!(&text[client.clone()], "hi <turn|> there");
        assert_eq!(control.cuts(text, std::slice::from_ref(&client)), vec![16]);
        // An occurrence that starts in template text and ends in client text is cut where the client's begins.
        let text = "<|tu|rn>";
        let control = ControlTokens::new(["<|tu|rn>"]);
        assert_eq!(control.cuts(text, std::slice::from_ref(&(4..8))), vec![4]);
    }

    #[test]
    fn unmark_takes_spans_and_cuts_and_refuses_unpaired_markers() {
        let (text, spans, cuts) = unmark("a\u{FDD0}b\u{FDD2}c\u{FDD1}d").unwrap();
        assert_eq!((text.as_str(), cuts), ("abcd", vec![2]));
        assert_eq!((spans.len(), spans[0].clone()), (1, 1..3));
        assert!(unmark("a\u{FDD0}b").is_none());
        assert!(unmark("a\u{FDD1}b").is_none());
        assert!(unmark("\u{FDD0}a\u{FDD0}b\u{FDD1}").is_none());
    }

    #[test]
    fn trim_keeps_markers_and_drops_emptied_pairs() {
        let ws = char::is_whitespace;
        // Outside the guard's marked rendering, trim is Jinja2's: the markers are not whitespace.
        assert_eq!(trim_marked(" \u{FDD0} a ", ws), "\u{FDD0} a");
        MARKING.set(true);
        assert_eq!(trim_marked("  a b  ", ws), "a b");
        assert_eq!(
            trim_marked("\u{FDD0}  a b \u{FDD1} ", ws),
            "\u{FDD0}a b\u{FDD1}"
        );
        assert_eq!(trim_marked(" \u{FDD0}   \u{FDD1} ", ws), "");
        assert_eq!(
            trim_marked("\u{FDD0} a\u{FDD1}\u{FDD0}b \u{FDD1}", ws),
            "\u{FDD0}a\u{FDD1}\u{FDD0}b\u{FDD1}"
        );
    }

    #[test]
    fn pieces_split_at_cuts() {
        assert_eq!(pieces("ab").collect::<Vec<_>>(), ["ab"]);
        assert_eq!(pieces("a\u{FDD2}b\u{FDD2}").collect::<Vec<_>>(), ["a", "b"]);
    }
}
