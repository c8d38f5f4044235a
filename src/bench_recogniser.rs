//! The hand-written JSON-mode recogniser that llguidance replaced (issue 16), kept only so that
//! `jemma bench --mask-gguf` measures it in the same run as its replacement: a byte-level JSON recogniser
//! whose mask is a scan of the whole vocabulary each step (what the issue measured against). Never used by
//! the engines. Copied from `crates/engine/src/constrain.rs` as of 39234a1.

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
pub(crate) struct JsonRecognizer {
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
    pub(crate) fn new() -> Self {
        Self {
            stack: [0; MAX_DEPTH],
            depth: 0,
            state: State::Start,
            ws: 0,
        }
    }

    /// Whether the object is complete (generation may stop).
    pub(crate) fn is_done(&self) -> bool {
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
    pub(crate) fn feed(&mut self, b: u8) -> bool {
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
    pub(crate) fn feed_all(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.feed(b))
    }
}

/// The recogniser's additive mask for the next token over `tokens` (each token's output bytes; special
/// tokens empty): a scan of the whole vocabulary, feeding each token's bytes to a copy of `r`.
pub(crate) fn scan_mask(tokens: &[Vec<u8>], r: &JsonRecognizer, stop_tokens: &[u32]) -> Vec<f32> {
    let mut m = vec![f32::NEG_INFINITY; tokens.len()];
    if r.is_done() {
        for &s in stop_tokens {
            if let Some(x) = m.get_mut(s as usize) {
                *x = 0.0;
            }
        }
        return m;
    }
    for (i, b) in tokens.iter().enumerate() {
        if b.is_empty() {
            continue;
        }
        let mut c = *r;
        if c.feed_all(b) {
            m[i] = 0.0;
        }
    }
    m
}
