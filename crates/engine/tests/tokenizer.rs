//! Tokenizer and streaming detokenizer on the fixture tokenizer (SentencePiece-style BPE with byte fallback
//! and Gemma 4's special tokens at their real ids).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::path::PathBuf;

use jemma_engine::tokenizer::Tokenizer;

fn tiny() -> PathBuf {
    jemma_fixtures::fixture("tiny", "tokenizer.json")
}

#[test]
fn stop_ids_come_from_generation_config() {
    let t = Tokenizer::from_model_dir(&tiny(), &[1]).unwrap();
    assert_eq!(t.eos_ids, vec![1, 106, 50]);
    assert_eq!(t.token_id("<|turn>"), Some(105));
    assert_eq!(t.bos_token.as_deref(), Some("<bos>"));
}

#[test]
fn streaming_decode_never_splits_characters() {
    let t = Tokenizer::from_model_dir(&tiny(), &[]).unwrap();
    // Characters outside the trained vocabulary go through byte-fallback tokens, one byte each.
    let text = "Hello café 東京 🦀Ω <|turn>model\nok";
    let ids = t.encode(text, false).unwrap();
    assert_eq!(t.decode(&ids).unwrap(), text);
    let crab = t.encode("🦀", false).unwrap();
    assert_eq!(
        crab.len(),
        4,
        "🦀 is not in the trained vocabulary: four byte tokens"
    );
    let mut s = t.stream();
    let mut pieces = vec![];
    for id in &ids {
        let p = s.push(*id).unwrap();
        assert!(!p.contains('\u{FFFD}'), "split character in {p:?}");
        pieces.push(p);
    }
    pieces.push(s.finish().unwrap());
    assert_eq!(pieces.concat(), text);
    // the crab's four byte tokens produce output once, complete
    assert_eq!(pieces.iter().filter(|p| p.contains('🦀')).count(), 1);
    // A generation cut inside a character: what was held comes out at the end, as U+FFFD.
    let mut s = t.stream();
    let mut out = String::new();
    for id in t.encode("ok ", false).unwrap().iter().chain(&crab[..2]) {
        out.push_str(&s.push(*id).unwrap());
    }
    assert_eq!(out, "ok ");
    let held = s.finish().unwrap();
    // (byte fallback writes one U+FFFD per byte it cannot place, as `tokenizers`' decode does)
    assert!(
        !held.is_empty() && held.chars().all(|c| c == '\u{FFFD}'),
        "{held:?}"
    );
    assert_eq!(s.finish().unwrap(), "", "finish empties the decoder");
}

/// A sampled stream can rewrite its own text: byte fallback decodes a run of byte tokens as one, so "n"
/// as a byte token followed by bytes that make the run invalid turns back into U+FFFD. `tokenizers`'
/// `DecodeStream` refuses that stream; the decoder goes on, keeps what it emitted and loses no later
/// text.
#[test]
fn streaming_decode_survives_a_byte_run_that_turns_invalid() {
    let t = Tokenizer::from_model_dir(&tiny(), &[]).unwrap();
    let byte = |b: u8| t.token_id(&format!("<0x{b:02X}>")).unwrap();
    let mut ids = t.encode("Hi ", false).unwrap();
    ids.extend([byte(b'n'), byte(0xE3), byte(0x81)]);
    ids.extend(t.encode(" day.", false).unwrap());
    let mut s = t.stream();
    let pieces: Vec<String> = ids.iter().map(|id| s.push(*id).unwrap()).collect();
    let text = pieces.concat() + &s.finish().unwrap();
    // "n" once, one U+FFFD per invalid byte (byte fallback's rule), nothing lost after.
    assert_eq!(text, "Hi n\u{FFFD}\u{FFFD} day.");
    // Cut right after the invalid bytes: they come out at the end, and "n" is not repeated.
    let mut s = t.stream();
    let mut text = String::new();
    for id in &ids[..ids.len() - t.encode(" day.", false).unwrap().len()] {
        text.push_str(&s.push(*id).unwrap());
    }
    text.push_str(&s.finish().unwrap());
    assert_eq!(text, "Hi n\u{FFFD}\u{FFFD}");
}
