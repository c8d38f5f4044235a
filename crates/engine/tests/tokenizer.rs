//! Tokenizer and streaming detokenizer on the fixture tokenizer (SentencePiece-style BPE with byte fallback
//! and Gemma 4's special tokens at their real ids).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::path::PathBuf;

use jemma_engine::tokenizer::Tokenizer;

fn tiny() -> PathBuf {
    let root = std::env::var("JEMMA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"));
    let d = root.join("tiny");
    assert!(d.join("tokenizer.json").exists(), "run scripts/fixtures.sh");
    d
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
}
