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
//! Client text is every string of a non-assistant message's `content` (and of its text parts) and every
//! string in `tools`. An assistant's own earlier output is not: the template reads its thinking channel
//! markers to drop them from the history, and clients send those turns back as the model wrote them.
//!
//! Finding where client text lands in the rendered prompt: each client string is wrapped in two Unicode
//! noncharacters (U+FDD0, U+FDD1) and rendered; the template's `trim` keeps them. With them removed, the
//! result must equal the unwrapped rendering byte for byte, or a template that transforms client text in
//! other ways (Python's `.strip()`, slicing) could tokenize differently than it renders. When it does not,
//! the cuts go into the client strings themselves (which catches every token a single string spells,
//! though not one spelled across two), checked the same way; when that fails too, the prompt is the plain
//! rendering and a warning is logged.

use std::borrow::Cow;
use std::ops::Range;

use aho_corasick::AhoCorasick;
use serde_json::Value as Json;

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
        // The automaton's default (standard) semantics report overlapping matches, which the cuts need.
        let matcher = (!texts.is_empty())
            .then(|| AhoCorasick::new(&texts).ok())
            .flatten();
        Self {
            len: if matcher.is_some() { texts.len() } else { 0 },
            matcher,
            edges,
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

/// How client strings are marked before rendering.
#[derive(Clone, Copy, PartialEq)]
enum Mark {
    /// Wrapped whole in [`OPEN`] … [`CLOSE`] (free text only; other strings in `tools` are cut as with
    /// `Cuts`, since a template compares them).
    Whole,
    /// Cut where they spell a control token.
    Cuts,
}

/// How a prompt was guarded ([`render_traced`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Guarded {
    /// No client string holds a character a control token begins or ends with: nothing to cut.
    Untouched,
    /// Client strings were wrapped whole and the template rendered them as they were.
    Whole,
    /// Cut inside client strings (the template transforms client text, but leaves the cuts be).
    Cuts,
    /// The template transforms client text so that neither way could be checked: the plain rendering.
    Unguarded,
}

/// Renders a chat with `control` guarded: `render` is the template's plain rendering of (messages, tools).
/// Returns the prompt with [`CUT`]s where client text spells a control token (none when it spells none).
pub(crate) fn render<E>(
    control: &ControlTokens,
    messages: &[Json],
    tools: Option<&[Json]>,
    render: impl Fn(&[Json], Option<&[Json]>) -> Result<String, E>,
) -> Result<String, E> {
    let (prompt, how) = render_traced(control, messages, tools, render)?;
    if how == Guarded::Unguarded {
        tracing::warn!(
            "the chat template transforms client text in a way the control-token guard cannot follow: \
             this prompt is tokenized with any control tokens its messages spell"
        );
    }
    Ok(prompt)
}

/// [`render`], saying how the prompt was guarded.
pub(crate) fn render_traced<E>(
    control: &ControlTokens,
    messages: &[Json],
    tools: Option<&[Json]>,
    render: impl Fn(&[Json], Option<&[Json]>) -> Result<String, E>,
) -> Result<(String, Guarded), E> {
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
        let Ok(rendered) = render(&marked_messages, marked_tools.as_deref()) else {
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
    Ok((plain, Guarded::Unguarded))
}

/// Calls `f` on every client string: `true` for free text (a message's content, a tool's `description`).
fn visit(messages: &[Json], tools: Option<&[Json]>, f: &mut impl FnMut(&str, bool)) {
    fn all(value: &Json, key: Option<&str>, f: &mut impl FnMut(&str, bool)) {
        match value {
            Json::String(s) => f(s, key == Some("description")),
            Json::Array(items) => items.iter().for_each(|v| all(v, key, f)),
            Json::Object(map) => map.iter().for_each(|(k, v)| all(v, Some(k), f)),
            _ => {}
        }
    }
    for message in messages.iter().filter(|m| !from_model(m)) {
        match message.get("content") {
            Some(Json::String(s)) => f(s, true),
            Some(Json::Array(parts)) => {
                for text in parts.iter().filter_map(|p| p.get("text")?.as_str()) {
                    f(text, true);
                }
            }
            _ => {}
        }
    }
    for tool in tools.unwrap_or_default() {
        all(tool, None, f);
    }
}

/// The same strings as [`visit`], mutably.
fn visit_mut(
    messages: &mut [Json],
    tools: Option<&mut [Json]>,
    f: &mut impl FnMut(&mut String, bool),
) {
    fn all(value: &mut Json, key: Option<&str>, f: &mut impl FnMut(&mut String, bool)) {
        match value {
            Json::String(s) => f(s, key == Some("description")),
            Json::Array(items) => items.iter_mut().for_each(|v| all(v, key, f)),
            Json::Object(map) => map.iter_mut().for_each(|(k, v)| all(v, Some(k), f)),
            _ => {}
        }
    }
    for message in messages.iter_mut().filter(|m| !from_model(m)) {
        match message.get_mut("content") {
            Some(Json::String(s)) => f(s, true),
            Some(Json::Array(parts)) => {
                for part in parts {
                    if let Some(Json::String(text)) = part.get_mut("text") {
                        f(text, true);
                    }
                }
            }
            _ => {}
        }
    }
    for tool in tools.unwrap_or_default() {
        all(tool, None, f);
    }
}

/// An assistant's (the model's) own turn, which the template reads as the model wrote it.
fn from_model(message: &Json) -> bool {
    matches!(
        message.get("role").and_then(Json::as_str),
        Some("assistant" | "model")
    )
}

/// Whether a character is one of the guard's own markers.
fn is_marker(c: char) -> bool {
    matches!(c, OPEN | CLOSE | CUT)
}

/// The request with the guard's markers replaced in client strings (borrowed when there are none).
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

/// Copies of `messages` and `tools` with their client strings marked `how`.
fn mark(
    control: &ControlTokens,
    messages: &[Json],
    tools: Option<&[Json]>,
    how: Mark,
) -> (Vec<Json>, Option<Vec<Json>>) {
    let (mut messages, mut tools) = (messages.to_vec(), tools.map(<[Json]>::to_vec));
    visit_mut(&mut messages, tools.as_deref_mut(), &mut |s, free| {
        if how == Mark::Whole && free {
            if !s.is_empty() {
                *s = format!("{OPEN}{s}{CLOSE}");
            }
        } else {
            let whole = 0..s.len();
            let cuts = control.cuts(s, std::slice::from_ref(&whole));
            if !cuts.is_empty() {
                *s = insert_cuts(s, &cuts);
            }
        }
    });
    (messages, tools)
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
    if !text.contains([OPEN, CLOSE]) {
        return Cow::Borrowed(text.trim_matches(strip));
    }
    let chars: Vec<char> = text.chars().collect();
    let skip = |c: &char| strip(*c) || matches!(*c, OPEN | CLOSE);
    let head = chars.iter().take_while(|c| skip(c)).count();
    let tail = if head == chars.len() {
        0
    } else {
        chars.iter().rev().take_while(|c| skip(c)).count()
    };
    let kept = |range: &[char]| -> String {
        range
            .iter()
            .filter(|c| matches!(**c, OPEN | CLOSE))
            .collect()
    };
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
