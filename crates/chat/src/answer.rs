//! Turning a model's decoded text stream into what a client sees, identically for every engine: stop
//! strings cut the answer (text that may start one is held back), and for chat requests Gemma 4's output
//! format is parsed into answer text, thinking and tool calls. A tool call that cannot be parsed even with
//! repairs is passed through as text rather than lost.

use crate::stop::StopMatcher;
use crate::tools::{OutputParser, Parsed};

/// One request's output processor (vLLM's term): its decoded text becomes the answer's content, thinking and
/// tool calls, cut at stop strings.
#[derive(Debug)]
pub struct OutputProcessor {
    parser: Option<OutputParser>,
    stops: StopMatcher,
    tool_calls: bool,
    /// Most tool calls the answer may make (`parallel_tool_calls: false`: one); None for no limit.
    max_tool_calls: Option<usize>,
    calls: usize,
    /// Tokens spent thinking so far (see [`OutputProcessor::reasoning_tokens`]).
    reasoning_tokens: usize,
    /// Tokens pushed since the last one that was visibly content, thinking or a call: their text is held
    /// back (a marker's start, a stop string's) and belongs to whatever comes next.
    undecided: usize,
}

impl OutputProcessor {
    /// `stop`: OpenAI stop strings; `parse`: split thinking and tool calls out (chat requests).
    pub fn new(stop: &[String], parse: bool) -> Self {
        Self {
            parser: parse.then(OutputParser::new),
            stops: StopMatcher::new(stop),
            tool_calls: false,
            max_tool_calls: None,
            calls: 0,
            reasoning_tokens: 0,
            undecided: 0,
        }
    }

    /// For a request that declares no tools (`tools` false): tool-call markup the model writes is passed on
    /// as text ([`OutputParser::without_tools`]), and the answer never ends with `tool_calls`.
    pub fn with_tools(mut self, tools: bool) -> Self {
        if !tools {
            self.parser = self.parser.take().map(OutputParser::without_tools);
        }
        self
    }

    /// For an answer whose tool calls a grammar enforces (`constrained`): a call cut off by the end of the
    /// answer (`max_tokens`, a stop string) is passed on as text, not completed ([`OutputParser::unrepaired_cut_calls`]).
    pub fn with_constrained_calls(mut self, constrained: bool) -> Self {
        if constrained {
            self.parser = self.parser.take().map(OutputParser::unrepaired_cut_calls);
        }
        self
    }

    /// Ends the answer after its `n`-th tool call, as a stop string would (`parallel_tool_calls: false` is
    /// `Some(1)`): what the model writes after it is not sent.
    pub fn with_max_tool_calls(mut self, n: Option<usize>) -> Self {
        self.max_tool_calls = n;
        self
    }

    /// Feeds decoded text; returns what to send now (never an empty content piece or a tool-call error)
    /// and whether a stop string ended the answer.
    ///
    /// Engines push once per generated token, which is what [`OutputProcessor::reasoning_tokens`] counts.
    pub fn push(&mut self, text: &str) -> (Vec<Parsed>, bool) {
        let before = self.parser.as_ref().is_some_and(OutputParser::in_reasoning);
        let (out, hit) = self.stops.push(text);
        let mut events = self.parse(&out);
        self.count_reasoning(before, events.is_empty());
        if let Some(max) = self.max_tool_calls
            && self.calls >= max
        {
            // Keep everything up to the last allowed call; the answer ends there.
            let mut seen = self.calls
                - events
                    .iter()
                    .filter(|e| matches!(e, Parsed::ToolCall(_)))
                    .count();
            let cut = events
                .iter()
                .position(|e| {
                    if matches!(e, Parsed::ToolCall(_)) {
                        seen += 1;
                    }
                    seen >= max
                })
                .map_or(events.len(), |i| i + 1);
            events.truncate(cut);
            self.parser = None;
            return (events, true);
        }
        (events, hit)
    }

    /// The end of generation: `tail` is the decoder's remaining text; held-back text is released unless a
    /// stop string ended the answer (`stopped_by_string`). Returns the last pieces.
    pub fn finish(&mut self, tail: &str, stopped_by_string: bool) -> Vec<Parsed> {
        let rest = if stopped_by_string {
            String::new()
        } else {
            // The tail comes after the held-back text and may still complete a stop string.
            let (mut rest, hit) = self.stops.push(tail);
            if !hit {
                rest.push_str(&self.stops.finish());
            }
            rest
        };
        let mut out = self.parse(&rest);
        if let Some(p) = self.parser.take() {
            out.extend(p.finish().into_iter().filter_map(|e| self.clean(e)));
        }
        out
    }

    /// Generated tokens spent thinking: those pushed while Gemma 4's thinking channel was open, its
    /// opening and closing markers included (the tokens of an opening marker are counted once it
    /// completes). This is `usage.completion_tokens_details.reasoning_tokens`.
    pub fn reasoning_tokens(&self) -> usize {
        self.reasoning_tokens
    }

    fn count_reasoning(&mut self, before: bool, nothing_sent: bool) {
        let Some(p) = &self.parser else {
            return;
        };
        if before || p.in_reasoning() {
            self.reasoning_tokens += 1 + std::mem::take(&mut self.undecided);
        } else if nothing_sent && p.in_content() {
            self.undecided += 1;
        } else {
            self.undecided = 0;
        }
    }

    /// Whether any tool call was produced (finish_reason `tool_calls`).
    pub fn tool_calls(&self) -> bool {
        self.tool_calls
    }

    /// The stop string that ended the answer, if one did.
    pub fn stop_sequence(&self) -> Option<&str> {
        self.stops.matched()
    }

    fn parse(&mut self, text: &str) -> Vec<Parsed> {
        if text.is_empty() {
            return vec![];
        }
        let events = match &mut self.parser {
            Some(p) => p.push(text),
            None => vec![Parsed::Content(text.to_string())],
        };
        events.into_iter().filter_map(|e| self.clean(e)).collect()
    }

    fn clean(&mut self, e: Parsed) -> Option<Parsed> {
        match e {
            Parsed::Content(c) if c.is_empty() => None,
            Parsed::ToolCall(tc) => {
                self.tool_calls = true;
                self.calls += 1;
                Some(Parsed::ToolCall(tc))
            }
            // jemma-chat has no logging of its own: the unparsed call reaches the client as text.
            Parsed::ToolCallError(err) => Some(Parsed::Content(err.raw)),
            other => Some(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(evs: &[Parsed]) -> String {
        evs.iter()
            .map(|e| match e {
                Parsed::Content(c) => c.clone(),
                _ => String::new(),
            })
            .collect()
    }

    #[test]
    fn thinking_tokens_are_counted_with_their_markers() {
        // Gemma 4's tokens: the opener is three (`<|channel>`, `thought`, `\n`), the closer one.
        let mut a = OutputProcessor::new(&[], true);
        for t in [
            "<|channel>",
            "thought",
            "\n",
            "Multiply",
            ".",
            "<channel|>",
            "\n\n",
            "56",
            ".",
        ] {
            a.push(t);
        }
        let evs = a.finish("", false);
        assert_eq!(a.reasoning_tokens(), 6, "{evs:?}");
        // Without thinking, none; an unparsed answer (JSON mode) counts none either.
        let mut a = OutputProcessor::new(&[], true);
        for t in ["<", "b", ">", "7"] {
            a.push(t);
        }
        assert_eq!(a.reasoning_tokens(), 0);
        let mut a = OutputProcessor::new(&[], false);
        a.push("<|channel>");
        assert_eq!(a.reasoning_tokens(), 0);
    }

    #[test]
    fn plain_text_with_a_stop_string() {
        let mut a = OutputProcessor::new(&["END".into()], false);
        let mut out = String::new();
        for p in ["Hello E", "N", "o wor", "ldEN", "D more"] {
            let (evs, hit) = a.push(p);
            out.push_str(&text(&evs));
            if hit {
                out.push_str(&text(&a.finish("", true)));
                break;
            }
        }
        assert_eq!(out, "Hello ENo world");
    }

    #[test]
    fn held_text_is_released_at_the_end_and_tool_calls_are_counted() {
        let mut a = OutputProcessor::new(&["STOP".into()], true);
        let (evs, hit) = a.push("Sure ST");
        assert!(!hit);
        assert_eq!(text(&evs), "Sure ");
        assert_eq!(text(&a.finish("!", false)), "ST!");
        let mut a = OutputProcessor::new(&[], true);
        let mut evs = a
            .push("<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>}<tool_call|>")
            .0;
        evs.extend(a.finish("", false));
        assert!(a.tool_calls());
        assert!(
            evs.iter()
                .any(|e| matches!(e, Parsed::ToolCall(tc) if tc.name == "get_weather")),
            "{evs:?}"
        );
    }

    /// `parallel_tool_calls: false`: the answer ends with its first call, in whatever piece it arrives.
    #[test]
    fn one_tool_call_at_most_when_asked() {
        let two = "<|tool_call>call:a{}<tool_call|><|tool_call>call:b{}<tool_call|>more";
        let names = |evs: &[Parsed]| -> Vec<String> {
            evs.iter()
                .filter_map(|e| match e {
                    Parsed::ToolCall(tc) => Some(tc.name.clone()),
                    _ => None,
                })
                .collect()
        };
        let mut a = OutputProcessor::new(&[], true).with_max_tool_calls(Some(1));
        let (evs, hit) = a.push(two);
        assert!(hit);
        assert_eq!(names(&evs), ["a"]);
        assert!(a.finish("", true).is_empty());
        // Split across pieces.
        let mut a = OutputProcessor::new(&[], true).with_max_tool_calls(Some(1));
        let (mut evs, mut hit) = (vec![], false);
        for piece in two.as_bytes().chunks(7) {
            let (e, h) = a.push(std::str::from_utf8(piece).unwrap());
            evs.extend(e);
            if h {
                hit = true;
                break;
            }
        }
        assert!(hit);
        evs.extend(a.finish("", true));
        assert_eq!(names(&evs), ["a"]);
        // No limit: both.
        let mut a = OutputProcessor::new(&[], true);
        let mut evs = a.push(two).0;
        evs.extend(a.finish("", false));
        assert_eq!(names(&evs), ["a", "b"]);
    }

    #[test]
    fn without_tools_a_tool_call_is_text() {
        let written =
            "<|channel>thought\nhm<channel|>Sure <|tool_call>call:f{a:1}<tool_call|> done";
        let mut p = OutputProcessor::new(&[], true).with_tools(false);
        let mut evs = p.push(written).0;
        evs.extend(p.finish("", false));
        assert_eq!(text(&evs), "Sure <|tool_call>call:f{a:1}<tool_call|> done");
        assert!(
            evs.iter()
                .any(|e| matches!(e, Parsed::Reasoning(r) if r == "hm"))
        );
        assert!(!p.tool_calls());
        // With tools, the same output is a call.
        let mut p = OutputProcessor::new(&[], true).with_tools(true);
        let mut evs = p.push(written).0;
        evs.extend(p.finish("", false));
        assert!(p.tool_calls() && evs.iter().any(|e| matches!(e, Parsed::ToolCall(_))));
    }
}
