//! Splitting Gemma 4 output into content, reasoning and tool calls.
//!
//! Gemma 4 writes its thoughts as `<|channel>thought\n…<channel|>` and its tool calls as
//! `<|tool_call>call:NAME{key:value,…}<tool_call|>`, where strings are quoted with the literal token `<|"|>`
//! and keys are bare. Special tokens must therefore be decoded as text. [`parse_tool_calls`] converts the call
//! DSL to JSON exactly as mlx-lm 0.32.2 does for well-formed input and, unlike mlx-lm, also repairs the
//! malformations small models produce (spaces before keys, truncation, trailing commas, JSON or
//! single-quoted strings). [`OutputParser`] does the splitting incrementally over streamed text deltas.

use Action::{Go, Skip};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use std::fmt;

/// Gemma 4's string delimiter inside the tool-call DSL.
const QUOTE: &str = "<|\"|>";
/// Deeper nesting is refused rather than risking the stack on garbage such as `[[[[…`.
const MAX_DEPTH: usize = 128;

/// One function call requested by the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The function's name, as the model wrote it.
    pub name: String,
    /// The arguments; always a JSON object.
    pub arguments: Value,
}

/// A tool call that could not be parsed even with repairs, or that was cut off where a repair is not
/// wanted ([`OutputParser::unrepaired_cut_calls`]), kept so that it is not silently lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallError {
    /// The text of the failed call as the model wrote it.
    pub raw: String,
    /// Why it could not be parsed.
    pub error: String,
}

impl ToolCallError {
    fn new(raw: &str, error: impl Into<String>) -> Self {
        Self {
            raw: raw.to_owned(),
            error: error.into(),
        }
    }
}

impl fmt::Display for ToolCallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unparseable tool call ({}): {:?}", self.error, self.raw)
    }
}

impl std::error::Error for ToolCallError {}

/// Parses the body of a tool-call block (the text between `<|tool_call>` and `<tool_call|>`), which may hold
/// several `call:NAME{…}` calls back to back. Calls that cannot be parsed are skipped, as mlx-lm does; use
/// [`parse_tool_block`] to see them.
pub fn parse_tool_calls(text: &str) -> Vec<ToolCall> {
    parse_tool_block(text)
        .into_iter()
        .filter_map(Result::ok)
        .collect()
}

/// Like [`parse_tool_calls`], but reports each call that could not be parsed. Text between calls is ignored,
/// as in mlx-lm. A body that is a JSON call object (`{"name":…,"arguments":…}`) or an array of them is
/// accepted too; a non-blank body without any call is an error.
pub fn parse_tool_block(text: &str) -> Vec<Result<ToolCall, ToolCallError>> {
    parse_block(text).into_iter().map(|(r, _)| r).collect()
}

/// [`parse_tool_block`], with, for each call that parsed only after a repair that may have changed where
/// it ends (a guessed closer or string end: the call may have been cut off), where its text starts.
fn parse_block(text: &str) -> Vec<(Result<ToolCall, ToolCallError>, Option<usize>)> {
    let next_call = |from: usize| text[from..].find("call:").map(|i| from + i);
    let clean = |at: usize| matches!(parse_call(text, at), (Ok(_), _, false));
    if text.trim_start().starts_with(['{', '['])
        && let Some(calls) = json_calls(text.trim())
    {
        return calls.into_iter().map(|r| (r, None)).collect();
    }
    let mut out = Vec::new();
    // Where the next clean (repair-free) call starts. A repaired call is parsed only up to there, so a
    // truncated call never swallows a well-formed one after it, which mlx-lm would have found.
    let mut limit = 0;
    let mut pos = 0;
    while let Some(start) = next_call(pos) {
        let mut parsed = parse_call(text, start);
        if !matches!(parsed, (Ok(_), _, false)) {
            if limit <= start {
                let mut later = std::iter::successors(next_call(start + 1), |&n| next_call(n + 1));
                limit = later.find(|&n| clean(n)).unwrap_or(text.len());
            }
            parsed = parse_call(&text[..limit], start);
        }
        pos = match parsed.0 {
            Ok(call) => {
                out.push((Ok(call), parsed.2.then_some(start)));
                parsed.1
            }
            Err(error) => {
                let next = next_call(start + 1).unwrap_or(text.len());
                out.push((
                    Err(ToolCallError::new(text[start..next].trim_end(), error)),
                    None,
                ));
                next
            }
        };
    }
    if out.is_empty() && !text.trim().is_empty() {
        out.push((
            Err(ToolCallError::new(text, "no `call:NAME{…}` found")),
            None,
        ));
    }
    out
}

/// Parses `call:NAME{…}` at `start`, returning the outcome, where parsing stopped and whether it needed
/// repairs.
fn parse_call(text: &str, start: usize) -> (Result<ToolCall, String>, usize, bool) {
    let mut p = Args {
        s: text,
        pos: start + "call:".len(),
        open: Vec::new(),
        repaired: false,
    };
    p.skip_ws();
    let rest = p.rest();
    let name_len = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or(rest.len());
    let name = rest[..name_len].to_owned();
    p.pos += name_len;
    p.skip_ws();
    let result = if name.is_empty() {
        Err("missing function name after `call:`".into())
    } else if p.eat("{") {
        p.object().map(|arguments| ToolCall { name, arguments })
    } else {
        // Even a call without arguments is written `call:NAME{}`, so a bare name is more likely cut off
        // (`call:get_wea`) than complete: calling it could run the wrong tool.
        Err(format!("expected `{{` after `call:{name}`"))
    };
    (result, p.pos, p.repaired)
}

/// The fallback for models that write a JSON call object instead of the DSL.
fn json_calls(text: &str) -> Option<Vec<Result<ToolCall, ToolCallError>>> {
    fn one(v: Value) -> Option<ToolCall> {
        let Value::Object(mut obj) = v else {
            return None;
        };
        let name = obj.remove("name")?.as_str()?.to_owned();
        let arguments = match obj.remove("arguments").or_else(|| obj.remove("parameters")) {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(Value::String(s)) => serde_json::from_str(&s).ok()?,
            Some(v) => v,
        };
        arguments
            .is_object()
            .then_some(ToolCall { name, arguments })
    }
    let calls = match serde_json::from_str(text).ok()? {
        Value::Array(items) => items.into_iter().map(one).collect::<Option<Vec<_>>>()?,
        v => vec![one(v)?],
    };
    Some(calls.into_iter().map(Ok).collect())
}

/// A forgiving recursive-descent parser for the argument DSL. On well-formed input it yields what mlx-lm's
/// "stash strings, quote keys, `json.loads`" pipeline yields; on malformed input it repairs what it can.
struct Args<'a> {
    s: &'a str,
    pos: usize,
    /// The closers of the containers currently open, outermost first.
    open: Vec<u8>,
    /// Whether a repair may have changed where the call ends (a guessed closer or string end, a bare
    /// string), as opposed to harmless ones such as a trailing comma.
    repaired: bool,
}

impl<'a> Args<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn skip_ws(&mut self) {
        self.pos = self.s.len() - self.rest().trim_start().len();
    }

    /// Skips whitespace and commas: doubled and trailing commas are harmless.
    fn skip_sep(&mut self) {
        self.pos = self.s.len()
            - self
                .rest()
                .trim_start_matches(|c: char| c == ',' || c.is_whitespace())
                .len();
    }

    fn eat(&mut self, token: &str) -> bool {
        let hit = self.rest().starts_with(token);
        if hit {
            self.pos += token.len();
        }
        hit
    }

    fn enter(&mut self, closer: u8) -> Result<(), String> {
        if self.open.len() >= MAX_DEPTH {
            return Err("arguments nested too deeply".into());
        }
        self.open.push(closer);
        Ok(())
    }

    /// Whether the innermost container ends here. End of input closes it (the model was cut off), and so does
    /// an outer container's closer (the model forgot this one); a closer nobody opened is skipped.
    fn close(&mut self) -> bool {
        loop {
            let ours = self.open.last().copied();
            match self.rest().bytes().next() {
                None => self.repaired = true,
                Some(c) if Some(c) == ours => self.pos += 1,
                Some(c @ (b'}' | b']')) if !self.open.contains(&c) => {
                    self.repaired = true;
                    self.pos += 1;
                    self.skip_sep();
                    continue;
                }
                Some(b'}' | b']') => self.repaired = true,
                Some(_) => return false,
            }
            self.open.pop();
            return true;
        }
    }

    fn object(&mut self) -> Result<Value, String> {
        self.enter(b'}')?;
        let mut map = Map::new();
        loop {
            self.skip_sep();
            if self.close() {
                return Ok(Value::Object(map));
            }
            let key = self.key()?;
            let value = self.value()?;
            map.insert(key, value);
        }
    }

    fn array(&mut self) -> Result<Value, String> {
        self.enter(b']')?;
        let mut items = Vec::new();
        loop {
            self.skip_sep();
            if self.close() {
                return Ok(Value::Array(items));
            }
            items.push(self.value()?);
        }
    }

    fn key(&mut self) -> Result<String, String> {
        let key = if self.eat(QUOTE) {
            self.gemma_string()
        } else if let Some(q @ ('"' | '\'')) = self.rest().chars().next() {
            self.quoted(q)
        } else {
            let rest = self.rest();
            let len = rest
                .find([':', ',', '{', '}', '[', ']'])
                .unwrap_or(rest.len());
            if rest[..len].trim().is_empty() {
                let found = rest
                    .chars()
                    .next()
                    .map_or("end of input".into(), |c| format!("`{c}`"));
                return Err(format!("expected a key, found {found}"));
            }
            self.pos += len;
            rest[..len].trim().to_owned()
        };
        self.skip_ws();
        if self.eat(":") {
            Ok(key)
        } else {
            Err(format!("expected `:` after key {key:?}"))
        }
    }

    fn value(&mut self) -> Result<Value, String> {
        self.skip_ws();
        if self.eat(QUOTE) {
            return Ok(Value::String(self.gemma_string()));
        }
        match self.rest().chars().next() {
            None => Err("missing value at end of input".into()),
            Some('{') => {
                self.pos += 1;
                self.object()
            }
            Some('[') => {
                self.pos += 1;
                self.array()
            }
            Some(q @ ('"' | '\'')) => Ok(Value::String(self.quoted(q))),
            Some(':') => Err("expected a value, found `:`".into()),
            Some(_) => {
                let rest = self.rest();
                let len = rest.find([',', '}', ']']).unwrap_or(rest.len());
                self.pos += len;
                match rest[..len].trim() {
                    "" => Err("missing value".into()),
                    token => {
                        let value = bare_value(token);
                        self.repaired |= value.is_string();
                        Ok(value)
                    }
                }
            }
        }
    }

    /// The body of a `<|"|>` string (opening delimiter already eaten). As in mlx-lm there are no escapes.
    fn gemma_string(&mut self) -> String {
        match self.rest().find(QUOTE) {
            Some(len) => {
                let s = self.rest()[..len].to_owned();
                self.pos += len + QUOTE.len();
                s
            }
            None => self.unterminated(0),
        }
    }

    /// A `"…"` or `'…'` string. It ends at an unescaped quote followed by a delimiter, so that stray quotes
    /// inside survive. Valid JSON escapes are decoded; a string serde rejects is kept verbatim.
    fn quoted(&mut self, q: char) -> String {
        let body = &self.rest()[1..];
        let mut escaped = false;
        let end = body.char_indices().find(|&(i, c)| {
            let hit = !escaped && c == q && {
                let after = body[i + 1..].trim_start();
                after.is_empty() || after.starts_with([',', '}', ']', ':'])
            };
            escaped = !escaped && c == '\\';
            hit
        });
        let Some((len, _)) = end else {
            return self.unterminated(1);
        };
        let literal = &self.rest()[..len + 2];
        let raw = body[..len].to_owned();
        self.pos += len + 2;
        let decoded = if q == '"' {
            serde_json::from_str(literal).ok()
        } else {
            None
        };
        self.repaired |= decoded.is_none();
        decoded.unwrap_or(raw)
    }

    /// A string cut off by the end of input. Trailing closers are taken as the containers' own (ollama's
    /// repair), so `{a:<|"|>Paris}` gives `"Paris"`, not `"Paris}"`.
    fn unterminated(&mut self, skip: usize) -> String {
        let text = &self.rest()[skip..];
        self.pos = self.s.len();
        self.repaired = true;
        let n = self.open.len();
        (1..=n)
            .rev()
            .find_map(|k| {
                // The last character closes the outermost of the k innermost containers.
                self.open[n - k..]
                    .iter()
                    .try_fold(text, |t, &c| t.trim_end().strip_suffix(c as char))
            })
            .unwrap_or(text)
            .to_owned()
    }
}

/// An unquoted value: a JSON literal or number when it is one, else (a repair) the text as a string.
fn bare_value(token: &str) -> Value {
    match token {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        "null" => Value::Null,
        _ => serde_json::from_str::<Number>(token)
            .map_or_else(|_| Value::String(token.into()), Value::Number),
    }
}

/// A piece of parsed model output, as [`OutputParser`] produces it (the engines turn it into
/// [`crate::event::Event`]s).
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// Text meant for the user.
    Content(String),
    /// Text from the thinking channel.
    Reasoning(String),
    /// A parsed tool call.
    ToolCall(ToolCall),
    /// A tool call that could not be parsed (or was cut off, under a grammar).
    ToolCallError(ToolCallError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    Normal,
    Reasoning,
    Tool,
}

/// What a marker does; markers themselves never reach the output.
#[derive(Clone, Copy)]
enum Action {
    Skip,
    Go(State),
}

// Longer variants swallow the newline the template puts inside a thought block. A bare `<|channel>` not
// followed by `thought` opens no channel Gemma knows, so it is dropped. Stray closers and `<|tool_response>`
// (a stop token, present only if the caller keeps stop text) are dropped too.
const NORMAL: &[(&str, Action)] = &[
    ("<|channel>thought\n", Go(State::Reasoning)),
    ("<|channel>thought", Go(State::Reasoning)),
    ("<|channel>", Skip),
    ("<channel|>", Skip),
    ("<|tool_call>", Go(State::Tool)),
    ("<tool_call|>", Skip),
    ("<|tool_response>", Skip),
];
const REASONING: &[(&str, Action)] = &[
    ("\n<channel|>", Go(State::Normal)),
    ("<channel|>", Go(State::Normal)),
    ("<|tool_call>", Go(State::Tool)),
    ("<|channel>thought\n", Skip),
    ("<|channel>thought", Skip),
    ("<|channel>", Skip),
    ("<tool_call|>", Skip),
    ("<|tool_response>", Skip),
];
// A request that declares no tools reads these two as text like any other (the model cannot call a tool the
// client does not have, so what it writes is passed on as written).
const TOOL_CALL_MARKERS: [&str; 2] = ["<|tool_call>", "<tool_call|>"];
// A new `<|tool_call>` or `<|tool_response>` also ends a call whose closer the model forgot.
const TOOL: &[(&str, Action)] = &[
    ("<tool_call|>", Go(State::Normal)),
    ("<|tool_response>", Go(State::Normal)),
    ("<|tool_call>", Go(State::Tool)),
];

/// Splits streamed Gemma 4 output into [`Parsed`]s, stripping the channel and tool-call markers.
///
/// Text is passed on as soon as it cannot be part of a marker: only a suffix that may still grow into one
/// (such as a trailing `<|chan`) is held back until the next delta. Tool calls are emitted when their block
/// closes, or at [`finish`](Self::finish) if it never does.
#[derive(Debug, Clone, Default)]
pub struct OutputParser {
    state: State,
    pending: String,
    tool_body: String,
    events: Vec<Parsed>,
    /// A thinking block or a tool call just closed: the line breaks that follow separate it from what
    /// comes next (the template's own newlines between blocks), so they are not answer text.
    after_block: bool,
    /// The request declared no tools: tool-call markers are text ([`OutputParser::without_tools`]).
    no_tools: bool,
    /// A call cut off at the end is not completed ([`OutputParser::unrepaired_cut_calls`]).
    no_cut_repairs: bool,
}

impl OutputParser {
    /// A parser for output that starts as plain content.
    pub fn new() -> Self {
        Self::default()
    }

    /// A parser for output that continues a prompt ending in `<|channel>thought\n` (thinking on, after a tool
    /// result), so the model's first words are reasoning.
    pub fn starting_in_reasoning() -> Self {
        Self {
            state: State::Reasoning,
            ..Self::new()
        }
    }

    /// This parser for a request that declares no tools: a tool call the model writes anyway is passed on
    /// as the text it is (markers included), not as a call the client has no tool for. Thinking is parsed
    /// as always.
    pub fn without_tools(mut self) -> Self {
        self.no_tools = true;
        self
    }

    /// This parser for an answer whose calls a grammar enforced: a call the end of the answer cut off
    /// (`max_tokens`, a stop string) is passed on as text ([`Parsed::ToolCallError`]) rather than completed by a repair,
    /// which would invent a call its schema may refuse (required arguments missing) that looks finished.
    /// Under a grammar nothing else can need a repair.
    pub fn unrepaired_cut_calls(mut self) -> Self {
        self.no_cut_repairs = true;
        self
    }

    /// Whether the text fed so far ends inside a thinking block.
    pub fn in_reasoning(&self) -> bool {
        self.state == State::Reasoning
    }

    /// Whether the text fed so far ends in plain content (not thinking, not a tool call).
    pub fn in_content(&self) -> bool {
        self.state == State::Normal
    }

    /// Feeds the next piece of decoded text and returns the events it completes.
    pub fn push(&mut self, delta: &str) -> Vec<Parsed> {
        self.pending.push_str(delta);
        self.drain(false);
        std::mem::take(&mut self.events)
    }

    /// Ends the stream: flushes held-back text and parses an unterminated tool-call block with repairs.
    /// Unterminated reasoning has already been emitted as reasoning.
    pub fn finish(mut self) -> Vec<Parsed> {
        self.drain(true);
        if self.state == State::Tool {
            self.flush_tool(self.no_cut_repairs);
        }
        self.events
    }

    fn drain(&mut self, at_end: bool) {
        loop {
            let found = self.find_marker(at_end);
            let at = found.map_or(self.pending.len(), |(at, _)| at);
            let rest = self.pending.split_off(at);
            let text = std::mem::replace(&mut self.pending, rest);
            self.emit_text(&text);
            let Some((_, Some((len, action)))) = found else {
                return;
            };
            self.pending.drain(..len);
            if let Go(next) = action {
                if self.state == State::Tool {
                    self.flush_tool(false);
                }
                self.after_block = next == State::Normal && self.state != State::Normal;
                self.state = next;
            }
        }
    }

    /// The first position where a marker starts, with the longest marker matching there, or `None` in place
    /// of the marker when more input could still change which one (or whether one) matches.
    fn find_marker(&self, at_end: bool) -> Option<(usize, Option<(usize, Action)>)> {
        let markers = match self.state {
            State::Normal => NORMAL,
            State::Reasoning => REASONING,
            State::Tool => TOOL,
        }
        .iter()
        .filter(|(m, _)| !(self.no_tools && TOOL_CALL_MARKERS.contains(m)));
        self.pending.match_indices(['<', '\n']).find_map(|(at, _)| {
            let tail = &self.pending[at..];
            if !at_end
                && markers
                    .clone()
                    .any(|(m, _)| m.len() > tail.len() && m.starts_with(tail))
            {
                return Some((at, None));
            }
            let best = markers
                .clone()
                .filter(|(m, _)| tail.starts_with(m))
                .max_by_key(|(m, _)| m.len());
            best.map(|&(m, action)| (at, Some((m.len(), action))))
        })
    }

    fn emit_text(&mut self, text: &str) {
        let text = if self.state == State::Normal && self.after_block {
            // Only the line breaks: an answer may start with indentation (a code block).
            let t = text.trim_start_matches(['\n', '\r']);
            self.after_block = t.is_empty();
            t
        } else {
            text
        };
        if text.is_empty() {
            return;
        }
        match (self.state, self.events.last_mut()) {
            (State::Tool, _) => self.tool_body.push_str(text),
            (State::Normal, Some(Parsed::Content(s)))
            | (State::Reasoning, Some(Parsed::Reasoning(s))) => s.push_str(text),
            (State::Normal, _) => self.events.push(Parsed::Content(text.to_owned())),
            (State::Reasoning, _) => self.events.push(Parsed::Reasoning(text.to_owned())),
        }
    }

    /// Parses the tool-call block read so far; `cut`: it was cut off, and the first call that needs a
    /// repair to end is refused instead, with everything after it: under a grammar only the last call can
    /// be unfinished, so what follows its start (even text that looks like a call, inside a string) is its.
    fn flush_tool(&mut self, cut: bool) {
        let body = std::mem::take(&mut self.tool_body);
        for r in parse_block(&body) {
            let event = match r {
                (Ok(_), Some(start)) if cut => {
                    self.events.push(Parsed::ToolCallError(ToolCallError::new(
                        body[start..].trim_end(),
                        "cut off before its end (a call under a grammar is not completed)",
                    )));
                    return;
                }
                (Ok(call), _) => Parsed::ToolCall(call),
                (Err(e), _) => Parsed::ToolCallError(e),
            };
            self.events.push(event);
        }
    }
}

/// Splits a complete output into `(content, reasoning, tool_calls)`. Reasoning is `None` when the model wrote
/// none; unparseable tool calls are dropped (use [`OutputParser`] to see them).
pub fn split_output(text: &str) -> (String, Option<String>, Vec<ToolCall>) {
    let mut parser = OutputParser::new();
    let mut events = parser.push(text);
    events.extend(parser.finish());
    collect(events)
}

fn collect(events: Vec<Parsed>) -> (String, Option<String>, Vec<ToolCall>) {
    let (mut content, mut reasoning, mut calls) = (String::new(), None::<String>, Vec::new());
    for event in events {
        match event {
            Parsed::Content(s) => content.push_str(&s),
            Parsed::Reasoning(s) => reasoning.get_or_insert_default().push_str(&s),
            Parsed::ToolCall(c) => calls.push(c),
            Parsed::ToolCallError(_) => {}
        }
    }
    (content, reasoning, calls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Runs a table of `input ⇒ expected` lines, with `⏎` standing for a newline on both sides.
    fn table(cases: &str, run: impl Fn(&str) -> String) {
        for line in cases.lines().filter(|l| !l.trim().is_empty()) {
            let (input, want) = line.split_once(" ⇒ ").expect("a ⇒ in every case");
            let got = run(&input.replace('⏎', "\n")).replace('\n', "⏎");
            // JSON is compared as values: key order depends on serde_json's `preserve_order` feature.
            match (
                serde_json::from_str::<Value>(&got),
                serde_json::from_str::<Value>(want),
            ) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "for {input}"),
                _ => assert_eq!(got, want, "for {input}"),
            }
        }
    }

    /// `[name, arguments]` per parsed call and `"error"` per failed one.
    fn summary(body: &str) -> String {
        let calls = parse_tool_block(body).into_iter();
        let calls = calls.map(|r| r.map_or(json!("error"), |c| json!([c.name, c.arguments])));
        Value::Array(calls.collect()).to_string()
    }

    #[test]
    fn converts_like_mlx_lm() {
        // The mlx-lm examples, then the official template's rendering of a call.
        table(CONVERSIONS, summary);
    }

    const CONVERSIONS: &str = r#"
call:get_weather{location:<|"|>Paris, {FR}<|"|>,unit:<|"|>celsius<|"|>} ⇒ [["get_weather",{"location":"Paris, {FR}","unit":"celsius"}]]
call:add{a:1,b:2.5,flag:true,items:[1,2],nested:{x:<|"|>y<|"|>}} ⇒ [["add",{"a":1,"b":2.5,"flag":true,"items":[1,2],"nested":{"x":"y"}}]]
call:f{a:1}call:g-h{b:<|"|>q"uote<|"|>} ⇒ [["f",{"a":1}],["g-h",{"b":"q\"uote"}]]
call:f{} ⇒ [["f",{}]]
call:get_weather{Days:3,flag:true,list:[<|"|>a<|"|>,1,{k:<|"|>v<|"|>}],location:<|"|>Paris<|"|>,nested:{a:<|"|>x<|"|>,B:1},none:null,off:false,ratio:2.5,uni:<|"|>héllo "q" {br}<|"|>,unit:<|"|>celsius<|"|>,whole:1.0} ⇒ [["get_weather",{"Days":3,"flag":true,"list":["a",1,{"k":"v"}],"location":"Paris","nested":{"B":1,"a":"x"},"none":null,"off":false,"ratio":2.5,"uni":"héllo \"q\" {br}","unit":"celsius","whole":1.0}]]
call:f{s:<|"|>a\nb⏎c<|"|>,<|"|>quoted key<|"|>:-1e3} ⇒ [["f",{"quoted key":-1000.0,"s":"a\\nb\nc"}]]
"#;

    #[test]
    fn repairs_malformed_calls() {
        table(REPAIRS, summary);
    }

    const REPAIRS: &str = r#"
call:f{a:1, b:2} ⇒ [["f",{"a":1,"b":2}]]
call: f {  a : 1 ,⏎ b:[ 1 , 2 ] } ⇒ [["f",{"a":1,"b":[1,2]}]]
call:f{a:<|"|>Paris ⇒ [["f",{"a":"Paris"}]]
call:f{a:<|"|>Paris} ⇒ [["f",{"a":"Paris"}]]
call:f{a:[<|"|>x]} ⇒ [["f",{"a":["x"]}]]
call:f{a:{b:[1,<|"|>x} ⇒ [["f",{"a":{"b":[1,"x}"]}}]]
call:f{a:{b:[1,2 ⇒ [["f",{"a":{"b":[1,2]}}]]
call:f{a:[1,2} ⇒ [["f",{"a":[1,2]}]]
call:f{a:1}}] ⇒ [["f",{"a":1}]]
call:f{a:1,,b:[1,2,],} ⇒ [["f",{"a":1,"b":[1,2]}]]
call:f{"a":1,"b":"x\"y\n"} ⇒ [["f",{"a":1,"b":"x\"y\n"}]]
call:f{"a": "say "hi" now", "b": "\q"} ⇒ [["f",{"a":"say \"hi\" now","b":"\\q"}]]
call:f{"a":"cut ⇒ [["f",{"a":"cut"}]]
call:f{'a': 'it's', b:'x'} ⇒ [["f",{"a":"it's","b":"x"}]]
call:f{city:Paris, n:1.2.3} ⇒ [["f",{"city":"Paris","n":"1.2.3"}]]
call:f{a:<|"|>x<|"|> b:2} ⇒ [["f",{"a":"x","b":2}]]
call:f{a:1call:g{b:2} ⇒ [["f",{"a":1}],["g",{"b":2}]]
 {"name": "f", "arguments": "{\"a\": \"call:x\"}"} ⇒ [["f",{"a":"call:x"}]]
[{"name":"f","parameters":{"a":1}},{"name":"g"}] ⇒ [["f",{"a":1}],["g",{}]]
call:f{a}call:g{x:1} ⇒ ["error",["g",{"x":1}]]
call:{a:1} ⇒ ["error"]
call:f(a=1) ⇒ ["error"]
call:get_wea ⇒ ["error"]
call:f{a:} ⇒ ["error"]
call:f{a:1,b ⇒ ["error"]
call:f{:1} ⇒ ["error"]
[1] ⇒ ["error"]
 ⏎ ⇒ []
"#;

    #[test]
    fn errors_keep_the_raw_call() {
        let r = parse_tool_block("call:f{a}call:g{x:1}");
        let error = ToolCallError::new("call:f{a}", "expected `:` after key \"a\"");
        assert_eq!(r[0], Err(error));
    }

    /// Feeds `¦`-separated deltas and renders each push's events, then finish's, separated by `/`.
    fn stream_with(mut parser: OutputParser, input: &str) -> String {
        let mut batches: Vec<Vec<Parsed>> = input.split('¦').map(|d| parser.push(d)).collect();
        batches.push(parser.finish());
        let render = |e: &Parsed| match e {
            Parsed::Content(s) => format!("C[{s}]"),
            Parsed::Reasoning(s) => format!("R[{s}]"),
            Parsed::ToolCall(c) => format!("T[{}{}]", c.name, c.arguments),
            Parsed::ToolCallError(e) => format!("E[{}: {}]", e.raw, e.error),
        };
        let batches = batches
            .iter()
            .map(|b| b.iter().map(render).collect::<String>());
        batches.collect::<Vec<_>>().join("/")
    }

    #[test]
    fn stream_cases() {
        table(STREAMS, |input| stream_with(OutputParser::new(), input));
        let resumed = stream_with(
            OutputParser::starting_in_reasoning(),
            "plan¦\n<channel|>done",
        );
        assert_eq!(resumed, "R[plan]/C[done]/");
    }

    const STREAMS: &str = r#"
Hi <|chan¦nel>thou¦ght⏎hm¦m⏎¦x<¦channel|>ok <b>¦ ⇒ C[Hi ]//R[hm]/R[m]/R[⏎x]/C[ok <b>]//
<|channel>thought⏎<channel|>Hi ⇒ C[Hi]/
a<|channel>b<channel|>c<|tool_response> ⇒ C[abc]/
x<|channel> ⇒ C[x]/
<|channel>thought⏎unterminated ⇒ R[unterminated]/
<|channel>thought⏎hm<|tool_call>call:f{}<tool_call|> ⇒ R[hm]T[f{}]/
ok<|tool_call>call:f{a:<|"|>Paris ⇒ C[ok]/T[f{"a":"Paris"}]
<|tool_call>call:f{}<|tool_call>call:g{}<|tool_response> ⇒ T[f{}]T[g{}]/
<|tool_call>I will call a tool<tool_call|>after ⇒ E[I will call a tool: no `call:NAME{…}` found]C[after]/
<|tool_call> <tool_call|>¦ ⇒ //
<|tool_call>call:a{}<tool_call|>⏎<|tool_call>call:b{x:1}<tool_call|> ⇒ T[a{}]T[b{"x":1}]/
<|tool_call>call:a{}<tool_call|>⏎¦⏎Done. ⇒ T[a{}]/C[Done.]/
<|channel>thought⏎x<channel|>⏎    code ⇒ R[x]C[    code]/
<|channel>thought⏎Multiply.<channel|>⏎⏎7 * 8 = 56 ⇒ R[Multiply.]C[7 * 8 = 56]/
<|channel>thought⏎Multiply.<channel|>⏎¦⏎7 ¦⏎8 ⇒ R[Multiply.]/C[7 ]/C[⏎8]/
héllo 🌍 ¦世界 ⇒ C[héllo 🌍 ]/C[世界]/
"#;

    const OUTPUT: &str = concat!(
        "<|channel>thought\nThe user wants weather. <|\"|> Use tools.\n<channel|>",
        "Let me check — ☀️ 東京.<|tool_call>call:get_weather{location:<|\"|>Tōkyō, {JP}<|\"|>,",
        "days:3}<tool_call|><|tool_call>call:send-mail{to:[<|\"|>a@b.c<|\"|>],opts:{urgent:false}}",
        "<tool_call|><|tool_response>",
    );

    fn stream(pieces: &[&str]) -> (String, Option<String>, Vec<ToolCall>) {
        let mut parser = OutputParser::new();
        let mut events: Vec<Parsed> = pieces.iter().flat_map(|p| parser.push(p)).collect();
        events.extend(parser.finish());
        collect(events)
    }

    fn boundaries(s: &str) -> impl Iterator<Item = usize> + '_ {
        (0..=s.len()).filter(|&i| s.is_char_boundary(i))
    }

    #[test]
    fn streaming_matches_one_shot_at_every_split() {
        let (content, reasoning, calls) = split_output(OUTPUT);
        assert_eq!(content, "Let me check — ☀️ 東京.");
        assert_eq!(
            reasoning.as_deref(),
            Some("The user wants weather. <|\"|> Use tools.")
        );
        let args = json!({"to": ["a@b.c"], "opts": {"urgent": false}});
        assert_eq!(
            calls[1],
            ToolCall {
                name: "send-mail".into(),
                arguments: args
            }
        );
        assert_eq!(calls.len(), 2);
        let expected = split_output(OUTPUT);
        for i in boundaries(OUTPUT) {
            for j in boundaries(OUTPUT).filter(|&j| j >= i).step_by(5) {
                let pieces = [&OUTPUT[..i], &OUTPUT[i..j], &OUTPUT[j..]];
                assert_eq!(stream(&pieces), expected, "split at {i} and {j}");
            }
        }
        let chars: Vec<String> = OUTPUT.chars().map(String::from).collect();
        assert_eq!(
            stream(&chars.iter().map(String::as_str).collect::<Vec<_>>()),
            expected
        );
    }

    /// A xorshift generator, so the garbage tests need no extra crate and are reproducible.
    fn rng(mut state: u64) -> impl FnMut(usize) -> usize {
        move |n| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        }
    }

    #[test]
    fn a_cut_call_under_a_grammar_is_text_not_a_repaired_call() {
        let run = |text: &str, grammar: bool| {
            let mut p = OutputParser::new();
            if grammar {
                p = p.unrepaired_cut_calls();
            }
            let mut evs = p.push(text);
            evs.extend(p.finish());
            evs
        };
        // Cut inside the arguments: repaired into a call that looks finished, unless a grammar made it.
        let cut = "<|tool_call>call:f{a:1}call:get_time{zone:<|\"|>Eur";
        assert_eq!(
            run(cut, false),
            [
                Parsed::ToolCall(ToolCall {
                    name: "f".into(),
                    arguments: json!({"a": 1})
                }),
                Parsed::ToolCall(ToolCall {
                    name: "get_time".into(),
                    arguments: json!({"zone": "Eur"})
                }),
            ]
        );
        let evs = run(cut, true);
        assert!(
            matches!(&evs[0], Parsed::ToolCall(c) if c.name == "f"),
            "{evs:?}"
        );
        assert!(
            matches!(&evs[1], Parsed::ToolCallError(e) if e.raw == "call:get_time{zone:<|\"|>Eur"),
            "{evs:?}"
        );
        assert_eq!(evs.len(), 2);
        // Text that looks like a call inside the cut call's string is the cut call's, not a call.
        let inside = "<|tool_call>call:f{a:<|\"|>see call:g{}";
        assert_eq!(
            run(inside, true),
            [Parsed::ToolCallError(ToolCallError::new(
                "call:f{a:<|\"|>see call:g{}",
                "cut off before its end (a call under a grammar is not completed)"
            ))]
        );
        // A call that is whole but for the block's closer is a call either way.
        let whole = "<|tool_call>call:get_time{zone:<|\"|>UTC<|\"|>}";
        assert_eq!(run(whole, true), run(whole, false));
        assert!(matches!(&run(whole, true)[..], [Parsed::ToolCall(_)]));
        // A block closed by its marker is never "cut", whatever the flag.
        let closed = "<|tool_call>call:f{a:1,}<tool_call|>";
        assert_eq!(run(closed, true), run(closed, false));
    }

    #[test]
    fn garbage_never_panics() {
        for text in [
            OUTPUT,
            r#"call:f{"a": "x\"y", 'b': 'c', d:[{e:<|"|>}<|"|>}]}"#,
        ] {
            for i in boundaries(text) {
                split_output(&text[..i]);
                parse_tool_block(&text[i..]);
            }
        }
        let atoms = "<|\"|> { } [ ] : , call: f a 1 - \" ' \\ é true <|channel> thought <channel|> \
            <|tool_call> <tool_call|> < | ⏎";
        let atoms: Vec<String> = atoms
            .split(' ')
            .map(|a| a.replace('⏎', "\n") + " ")
            .collect();
        let mut next = rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            let text: String = (0..next(40))
                .map(|_| atoms[next(atoms.len())].as_str())
                .collect();
            let text = text.replacen(' ', "", next(30));
            parse_tool_block(&text);
            let split = boundaries(&text)
                .nth(next(text.chars().count() + 1))
                .unwrap();
            stream(&[&text[..split], &text[split..]]);
        }
        for _ in 0..2_000 {
            let bytes: Vec<u8> = (0..next(64)).map(|_| next(256) as u8).collect();
            split_output(&String::from_utf8_lossy(&bytes));
        }
        let deep = format!("call:f{{a:{}", "[{a:".repeat(100_000));
        assert_eq!(summary(&deep), r#"["error"]"#);
    }
}
