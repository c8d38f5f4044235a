//! The Gemma 4 output parser (thinking channel, tool calls with repair), fed in arbitrary pieces: never
//! panics, and streaming gives the same result as one shot.
#![no_main]

use jemma_chat::tools::{Parsed, OutputParser, parse_tool_calls};
use libfuzzer_sys::fuzz_target;

fn run(pieces: &[&str]) -> Vec<Parsed> {
    let mut p = OutputParser::new();
    let mut out = vec![];
    for piece in pieces {
        out.extend(p.push(piece));
    }
    out.extend(p.finish());
    out
}

/// Merges adjacent text events so split points do not change the comparison.
fn normalise(events: Vec<Parsed>) -> Vec<Parsed> {
    let mut out: Vec<Parsed> = vec![];
    for e in events {
        match (out.last_mut(), e) {
            (Some(Parsed::Content(a)), Parsed::Content(b)) => a.push_str(&b),
            (Some(Parsed::Reasoning(a)), Parsed::Reasoning(b)) => a.push_str(&b),
            (_, e) => out.push(e),
        }
    }
    out.retain(|e| !matches!(e, Parsed::Content(s) | Parsed::Reasoning(s) if s.is_empty()));
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let _ = parse_tool_calls(text);
    let step = (step as usize % 7) + 1;
    let mut pieces = vec![];
    let mut start = 0;
    let mut i = 0;
    for (idx, _) in text.char_indices().skip(1) {
        i += 1;
        if i % step == 0 {
            pieces.push(&text[start..idx]);
            start = idx;
        }
    }
    pieces.push(&text[start..]);
    assert_eq!(normalise(run(&pieces)), normalise(run(&[text])), "streaming changed the result");
});
