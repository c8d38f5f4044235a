//! Tokenizer (`tokenizer.json` through the `tokenizers` crate), stop ids, and a streaming decoder that never
//! splits a UTF-8 character.

use std::path::Path;

use serde_json::Value;

use crate::{EngineError, Result};

/// A model's tokenizer plus the ids that end generation.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: std::collections::HashSet<u32>,
    /// Stop ids: generation_config.json's `eos_token_id` (else config.json's), plus the tokenizer's eos token.
    pub eos_ids: Vec<u32>,
    /// The BOS token string, if the tokenizer has one.
    pub bos_token: Option<String>,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let s = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&s)
        .map(Some)
        .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", path.display())))
}

/// A special-token field of tokenizer_config.json: a string or `{ "content": … }`.
pub fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (+ tokenizer_config.json, generation_config.json) from a model directory.
    /// `config_eos` are the stop ids of config.json, used when generation_config.json has none.
    pub fn from_model_dir(dir: &Path, config_eos: &[u32]) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::InvalidModel(format!(
                "{} is missing (only tokenizer.json tokenizers are supported)",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", path.display())))?;
        let tcfg = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let gen_cfg = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let mut eos_ids = crate::models::gemma4::config::ids_of(gen_cfg.get("eos_token_id"));
        if eos_ids.is_empty() {
            eos_ids = config_eos.to_vec();
        }
        if let Some(eos) = token_string(tcfg.get("eos_token"))
            && let Some(id) = inner.token_to_id(&eos)
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
        let special = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        Ok(Self {
            inner,
            special,
            eos_ids,
            bos_token: token_string(tcfg.get("bos_token")),
        })
    }

    /// Token ids of `text`. Chat prompts are rendered by the template, which writes `<bos>` itself, so
    /// `add_special_tokens` is false for them (as mlx-lm does).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| EngineError::InvalidRequest(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of a chat prompt rendered by the template (special tokens parsed, nothing added): the ids
    /// of its [`jemma_chat::guard::pieces`] one after another, so that a control token a client spelled (cut
    /// by the chat template's guard) is read as text. A prompt without cuts gives [`Tokenizer::encode`]'s
    /// ids; a raw prompt (`/v1/completions`) goes through [`Tokenizer::encode`] whole.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = vec![];
        for piece in jemma_chat::guard::pieces(prompt) {
            ids.extend(self.encode(piece, false)?);
        }
        Ok(ids)
    }

    /// The texts of the special tokens (`<bos>`, `<|turn>`, `<|image|>`, …): what the chat template keeps
    /// out of client text ([`jemma_chat::guard::ControlTokens`]).
    pub fn special_texts(&self) -> Vec<String> {
        self.special
            .iter()
            .filter_map(|&id| self.inner.id_to_token(id))
            .collect()
    }

    /// Text of `ids`, special tokens kept (the output parser needs them).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| EngineError::InvalidModel(format!("tokenizer: {e}")))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The vocabulary string of a token id (SentencePiece form: `▁` for spaces, `<0xNN>` for bytes).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The bytes a token stands for: one byte for a byte-fallback token (`<0xNN>`), else its decoded text.
    /// For OpenAI `logprobs`, whose `bytes` carry the parts of a character that a token holds alone.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let text = self.token_text(id);
        let hex = text
            .as_deref()
            .and_then(|t| t.strip_prefix("<0x")?.strip_suffix('>'))
            .filter(|h| h.len() == 2);
        if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            return vec![b];
        }
        self.decode(&[id]).unwrap_or_default().into_bytes()
    }

    /// Whether a token is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains(&id)
    }

    /// The id of a token string, if it is a single token.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// A streaming decoder for one generation.
    pub fn stream(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tok: self,
            state: DecodeStream::default(),
        }
    }
}

/// Incremental detokenizer: each token's new, complete text; a token that ends inside a multi-byte
/// character (byte-fallback tokens) is held until the character completes. The work is `tokenizers`'
/// `DecodeStream` (the prefix/read-offset scheme of text-generation-inference), through its ownerless
/// form so that a sequence can outlive any borrow of the model.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    state: DecodeStream,
}

impl StreamDecoder<'_> {
    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.state.push(self.tok, id)
    }

    /// Flushes whatever is held back (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> Result<String> {
        self.state.finish(self.tok)
    }
}

/// The state of a [`StreamDecoder`] without the tokenizer it reads (given at each call), for a sequence
/// that outlives any borrow of the model (a scheduler's running batch): the fields of
/// `tokenizers::DecodeStream`, stepped by `tokenizers::step_decode_stream`.
#[derive(Debug, Clone, Default)]
pub struct DecodeStream {
    /// The ids still needed to decode the next piece: the window around `prefix`, then what is held.
    ids: Vec<u32>,
    /// The text of `ids[..prefix_index]` as last emitted, cut off the next decode of `ids`.
    prefix: String,
    prefix_index: usize,
}

impl DecodeStream {
    /// Adds a token; returns the text it completes (possibly empty).
    ///
    /// Errors: `EngineError::InvalidModel` when the tokenizer fails.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        match tokenizers::step_decode_stream(
            &tok.inner,
            vec![id],
            false,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        ) {
            Ok(piece) => Ok(piece.unwrap_or_default()),
            Err(e) if e.downcast_ref::<tokenizers::DecodeStreamError>().is_some() => {
                self.resync(tok)
            }
            Err(e) => Err(EngineError::InvalidModel(format!("tokenizer: {e}"))),
        }
    }

    /// Where `tokenizers` refuses the stream because the new token rewrote text already emitted. Byte
    /// fallback decodes a run of byte tokens as one: a valid byte (`<0x6E>`, "n") followed by bytes that
    /// make the run invalid UTF-8 turns back into U+FFFD, tokens a sampling model can produce. What was
    /// emitted stays as it was; the tokens not yet emitted (`ids[prefix_index..]`, the held ones and this
    /// one) are decoded on their own, which Gemma's decoder (byte fallback and `▁` → space, no strip)
    /// does piece by piece, and the window restarts after this token.
    fn resync(&mut self, tok: &Tokenizer) -> Result<String> {
        let text = self.unemitted(tok)?;
        *self = Self::default();
        Ok(text)
    }

    /// The text of the tokens not emitted yet, decoded on their own.
    fn unemitted(&self, tok: &Tokenizer) -> Result<String> {
        tok.decode(self.ids.get(self.prefix_index..).unwrap_or_default())
    }

    /// Flushes whatever is held back (an incomplete character becomes U+FFFD). `tokenizers` has no flush:
    /// the held ids decode past the last emitted text.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let text = tok.decode(&self.ids)?;
        // In context where the emitted text still reads the same; else (held bytes that rewrote it, as
        // in `resync`) on their own.
        let held = match text.strip_prefix(self.prefix.as_str()) {
            Some(held) => held.to_string(),
            None => self.unemitted(tok)?,
        };
        *self = Self::default();
        Ok(held)
    }
}
