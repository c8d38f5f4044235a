//! JSON mode (`response_format: {"type": "json_object"}`): constrained decoding that only lets the model
//! emit tokens keeping the output a prefix of a valid JSON object, and lets it stop only once the object is
//! complete.
//!
//! Written here rather than taken from a grammar library: what is needed is one small byte-level JSON
//! recognizer that is `Copy` (so checking a candidate token costs no allocation) and a vocabulary scan per
//! step; the general grammar engines (llguidance, outlines-core) pull in far more than this.

use crate::tokenizer::Tokenizer;

const MAX_DEPTH: usize = 64;
/// Consecutive whitespace bytes allowed between tokens: a model stuck on newlines must move on.
const MAX_WS_RUN: u8 = 16;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

impl Num {
    fn terminal(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Before the top-level object (only `{` or whitespace).
    Start,
    /// A value is expected.
    Value,
    /// After `[`: a value or `]`.
    ArrFirst,
    /// After `{`: a key or `}`.
    ObjFirst,
    /// After `,` in an object: a key.
    Key,
    /// Inside a string; `key` says what follows it, `esc` counts escape progress (0 none, 1 after `\`,
    /// 2..=5 hex digits of `\u` still expected as 6 - esc).
    Str { key: bool, esc: u8 },
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or a closer.
    After,
    /// Inside a number.
    Number(Num),
    /// Inside `true`/`false`/`null`: which literal and how far.
    Lit { which: u8, pos: u8 },
    /// The top-level object is complete.
    Done,
}

const LITS: [&[u8]; 3] = [b"true", b"false", b"null"];

/// A byte-level recognizer of JSON object prefixes. `Copy`, so candidates are checked on copies.
#[derive(Clone, Copy, Debug)]
pub struct JsonRecognizer {
    stack: [u8; MAX_DEPTH],
    depth: usize,
    state: State,
    ws: u8,
}

impl Default for JsonRecognizer {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonRecognizer {
    /// Expects one JSON object.
    pub fn new() -> Self {
        Self {
            stack: [0; MAX_DEPTH],
            depth: 0,
            state: State::Start,
            ws: 0,
        }
    }

    /// Whether the object is complete (generation may stop).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    fn push(&mut self, c: u8) -> bool {
        if self.depth == MAX_DEPTH {
            return false;
        }
        self.stack[self.depth] = c;
        self.depth += 1;
        true
    }

    fn close_value(&mut self) {
        self.state = if self.depth == 0 {
            State::Done
        } else {
            State::After
        };
    }

    fn start_value(&mut self, b: u8) -> bool {
        match b {
            b'{' => {
                self.state = State::ObjFirst;
                self.push(b'{')
            }
            b'[' => {
                self.state = State::ArrFirst;
                self.push(b'[')
            }
            b'"' => {
                self.state = State::Str { key: false, esc: 0 };
                true
            }
            b'-' => {
                self.state = State::Number(Num::Minus);
                true
            }
            b'0' => {
                self.state = State::Number(Num::Zero);
                true
            }
            b'1'..=b'9' => {
                self.state = State::Number(Num::Int);
                true
            }
            b't' | b'f' | b'n' => {
                let which = match b {
                    b't' => 0,
                    b'f' => 1,
                    _ => 2,
                };
                self.state = State::Lit { which, pos: 1 };
                true
            }
            _ => false,
        }
    }

    fn close(&mut self, b: u8) -> bool {
        let want = if b == b'}' { b'{' } else { b'[' };
        if self.depth == 0 || self.stack[self.depth - 1] != want {
            return false;
        }
        self.depth -= 1;
        self.close_value();
        true
    }

    /// Feeds one byte; false if it cannot continue a valid object.
    pub fn feed(&mut self, b: u8) -> bool {
        let ws = matches!(b, b' ' | b'\n' | b'\r' | b'\t');
        let structural = !matches!(
            self.state,
            State::Str { .. } | State::Number(_) | State::Lit { .. }
        );
        if ws && structural {
            if self.ws >= MAX_WS_RUN {
                return false;
            }
            self.ws += 1;
            return true;
        }
        self.ws = 0;
        match self.state {
            State::Start => {
                b == b'{' && {
                    self.state = State::ObjFirst;
                    self.push(b'{')
                }
            }
            State::Value => self.start_value(b),
            State::ArrFirst => b == b']' && self.close(b) || self.start_value(b),
            State::ObjFirst => {
                if b == b'}' {
                    self.close(b)
                } else if b == b'"' {
                    self.state = State::Str { key: true, esc: 0 };
                    true
                } else {
                    false
                }
            }
            State::Key => {
                b == b'"' && {
                    self.state = State::Str { key: true, esc: 0 };
                    true
                }
            }
            State::Colon => {
                b == b':' && {
                    self.state = State::Value;
                    true
                }
            }
            State::After => match b {
                b',' => {
                    self.state = if self.stack[self.depth - 1] == b'{' {
                        State::Key
                    } else {
                        State::Value
                    };
                    true
                }
                b'}' | b']' => self.close(b),
                _ => false,
            },
            State::Str { key, esc } => match esc {
                0 => match b {
                    b'"' => {
                        if key {
                            self.state = State::Colon;
                        } else {
                            self.close_value();
                        }
                        true
                    }
                    b'\\' => {
                        self.state = State::Str { key, esc: 1 };
                        true
                    }
                    0..=0x1f => false,
                    _ => true,
                },
                1 => match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                        self.state = State::Str { key, esc: 0 };
                        true
                    }
                    b'u' => {
                        self.state = State::Str { key, esc: 2 };
                        true
                    }
                    _ => false,
                },
                n => {
                    b.is_ascii_hexdigit() && {
                        self.state = State::Str {
                            key,
                            esc: if n == 5 { 0 } else { n + 1 },
                        };
                        true
                    }
                }
            },
            State::Number(n) => {
                let next = match (n, b) {
                    (Num::Minus, b'0') => Some(Num::Zero),
                    (Num::Minus, b'1'..=b'9') => Some(Num::Int),
                    (Num::Int, b'0'..=b'9') => Some(Num::Int),
                    (Num::Zero | Num::Int, b'.') => Some(Num::Dot),
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Some(Num::E),
                    (Num::E, b'+' | b'-') => Some(Num::ESign),
                    (Num::E | Num::ESign | Num::Exp, b'0'..=b'9') => Some(Num::Exp),
                    _ => None,
                };
                match next {
                    Some(n) => {
                        self.state = State::Number(n);
                        true
                    }
                    // The number ended: this byte belongs to what follows it.
                    None if n.terminal() && self.depth > 0 => {
                        self.state = State::After;
                        self.feed(b)
                    }
                    None => false,
                }
            }
            State::Lit { which, pos } => {
                let lit = LITS[which as usize];
                if lit[pos as usize] != b {
                    return false;
                }
                if pos as usize + 1 == lit.len() {
                    self.close_value();
                } else {
                    self.state = State::Lit {
                        which,
                        pos: pos + 1,
                    };
                }
                true
            }
            State::Done => false,
        }
    }

    /// Feeds bytes; false (and the recognizer is then meaningless) if any is rejected.
    pub fn feed_all(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.feed(b))
    }
}

/// Per-model token texts for masking: the bytes each token contributes to the output, or `None` for
/// special tokens (never allowed in JSON mode).
pub struct TokenBytes {
    bytes: Vec<Option<Vec<u8>>>,
}

impl TokenBytes {
    /// Builds the table from a SentencePiece-style vocabulary (Gemma's): `<0xNN>` byte-fallback tokens, `▁`
    /// for spaces, added/special tokens excluded.
    pub fn new(tok: &Tokenizer, vocab: usize) -> Self {
        let bytes = (0..vocab as u32)
            .map(|id| {
                let t = tok.token_text(id)?;
                if tok.is_special(id) {
                    return None;
                }
                if t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') {
                    return u8::from_str_radix(&t[3..5], 16).ok().map(|b| vec![b]);
                }
                Some(t.replace('\u{2581}', " ").into_bytes())
            })
            .collect();
        Self { bytes }
    }

    /// Additive mask for the next token: 0 where allowed, −∞ elsewhere; stop tokens are allowed only when
    /// the object is complete (then nothing else is).
    pub fn mask(&self, r: &JsonRecognizer, stop_tokens: &[u32]) -> Vec<f32> {
        let mut m = vec![f32::NEG_INFINITY; self.bytes.len()];
        if r.is_done() {
            for &s in stop_tokens {
                if let Some(x) = m.get_mut(s as usize) {
                    *x = 0.0;
                }
            }
            return m;
        }
        for (i, b) in self.bytes.iter().enumerate() {
            let Some(b) = b.as_deref().filter(|b| !b.is_empty()) else {
                continue;
            };
            let mut c = *r;
            if c.feed_all(b) {
                m[i] = 0.0;
            }
        }
        m
    }

    /// The bytes of a token (None for special tokens).
    pub fn get(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize)?.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(s: &str) -> (bool, bool) {
        let mut r = JsonRecognizer::new();
        let ok = r.feed_all(s.as_bytes());
        (ok, ok && r.is_done())
    }

    #[test]
    fn valid_objects_are_accepted_and_complete() {
        for s in [
            r#"{}"#,
            r#"{"a":1}"#,
            r#" { "a" : [1, -2.5e+3, 0, true, false, null, "x\"y\\u00e9"] , "b": {"c": {}} } "#,
            r#"{"k":"東京 😀"}"#,
            r#"{"n":0.5,"m":[[],[{}]]}"#,
        ] {
            assert_eq!(accepts(s.trim_end()), (true, true), "{s}");
        }
    }

    #[test]
    fn prefixes_are_accepted_but_not_complete() {
        let s = r#"{"a": [1, {"b": "c"}], "d": 12.5}"#;
        for i in 1..s.len() {
            let (ok, done) = accepts(&s[..i]);
            assert!(ok, "prefix {:?}", &s[..i]);
            assert!(!done, "prefix {:?} is not complete", &s[..i]);
        }
    }

    #[test]
    fn invalid_json_is_rejected() {
        for s in [
            "[1]",
            "\"x\"",
            "1",
            "{a:1}",
            "{\"a\" 1}",
            "{\"a\":01}",
            "{\"a\":1,}x",
            "{\"a\":tru3}",
            "{\"a\":\"\n\"}",
            "{\"a\":1]",
            "{}{}",
            "{\"a\":\"\\x\"}",
            "{\"a\":-}",
            "{\"a\":1.}",
            "{\"a\":[1,]}",
        ] {
            let (ok, done) = accepts(s);
            assert!(!(ok && done), "{s:?} must not be a complete object");
            if s != "{\"a\":1.}" && s != "{\"a\":-}" {
                assert!(!ok, "{s:?} must be rejected");
            }
        }
    }

    #[test]
    fn whitespace_runs_are_bounded_and_depth_is_capped() {
        let mut r = JsonRecognizer::new();
        assert!(r.feed_all(b"{"));
        assert!(r.feed_all(&[b' '; 16]));
        assert!(!r.feed(b' '));
        let mut r = JsonRecognizer::new();
        assert!(r.feed_all(b"{\"a\":"));
        assert!(r.feed_all(&[b'['; MAX_DEPTH - 1]));
        assert!(!r.feed(b'['));
    }
}
