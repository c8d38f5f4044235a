//! Loading a GGUF ([`load`], [`Loaded`]): the model, its chat template and turn markers, tokenizing, and
//! the llama.cpp context parameters.

use super::*;

/// A loaded model with its template: what the thread keeps between requests.
pub struct Loaded {
    /// The model.
    pub model: LlamaModel,
    /// Its chat template (from the GGUF), if any.
    pub template: Option<ChatTemplate>,
    /// BOS text (for raw prompts).
    pub bos: Option<String>,
    /// Context length served.
    pub n_ctx: u32,
    /// The sliding window of the model's sliding-attention layers, tokens (None: no such layers).
    pub n_swa: Option<u32>,
    /// Whether layers run on a GPU ([`gpu_offload`] and at least one layer asked for).
    pub offloaded: bool,
    /// The vocabulary as llguidance reads it (constrained decoding), built on first use.
    pub(crate) vocabulary: OnceLock<std::result::Result<Arc<jemma_constrain::Vocabulary>, String>>,
}

impl Loaded {
    /// Every token's bytes by id with whether it is special, and the end-of-generation ids: what
    /// [`Loaded::vocabulary`] builds llguidance's trie from. Special: control tokens, and the
    /// user-defined ones shaped like Gemma's markers (`<|tool_call>`, `<tool_call|>`, `<|"|>`, which
    /// tokenizer.json marks special): no text spells them, a grammar names them. Other user-defined tokens
    /// (Gemma's "\n", runs of spaces, `<td>`) are text, as the MLX engine's tokenizer.json has them.
    pub fn token_table(&self) -> (Vec<(Vec<u8>, bool)>, Vec<u32>) {
        let vocab = self.model.vocab();
        let n = self.model.n_vocab();
        let tokens = (0..n)
            .map(|i| {
                let piece = vocab.token_to_piece(LlamaToken(i), true, None);
                let special = is_special(&self.model, LlamaToken(i), &piece);
                (piece, special)
            })
            .collect();
        let eos = (0..n)
            .filter(|&i| vocab.is_eog(LlamaToken(i)))
            .map(|i| i as u32)
            .collect();
        (tokens, eos)
    }

    /// The vocabulary as llguidance reads it, for constrained decoding: every token's bytes (control tokens
    /// and Gemma's marker tokens marked special, as `tokenizer.json` marks them for the MLX engine) and the end-of-generation
    /// tokens, read from the GGUF's vocabulary on the first constrained request, then kept.
    ///
    /// Errors: [`LlamaError::Runtime`] when llguidance cannot use it (every later call says the same).
    pub fn vocabulary(&self) -> Result<Arc<jemma_constrain::Vocabulary>> {
        self.vocabulary
            .get_or_init(|| {
                let (tokens, eos) = self.token_table();
                jemma_constrain::Vocabulary::from_tokens(tokens, &eos)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| LlamaError::Runtime(format!("constrained decoding: {e}")))
    }
}

/// Whether token `t` (whose text is `piece`) is special: a control token, or a user-defined one shaped like
/// Gemma's markers (`<|tool_call>`, `<tool_call|>`, `<|"|>`, which tokenizer.json marks special).
fn is_special(model: &LlamaModel, t: LlamaToken, piece: &[u8]) -> bool {
    let vocab = model.vocab();
    let marker = piece.starts_with(b"<|") || piece.ends_with(b"|>");
    vocab.is_control(t)
        || (marker
            && vocab
                .attr(t)
                .contains(llama_cpp_2::token_type::LlamaTokenAttr::UserDefined))
}

/// The texts of a model's special tokens ([`is_special`]): what its chat template keeps out of client
/// text ([`ControlTokens`]). Reads the whole vocabulary (tens of milliseconds for Gemma's 262,144 tokens).
fn control_tokens(model: &LlamaModel) -> ControlTokens {
    let vocab = model.vocab();
    ControlTokens::new((0..model.n_vocab()).filter_map(|i| {
        let piece = vocab.token_to_piece(LlamaToken(i), true, None);
        is_special(model, LlamaToken(i), &piece)
            .then(|| String::from_utf8(piece).ok())
            .flatten()
    }))
}

/// Loads a GGUF with all layers on the GPU when one is built in.
pub fn load(config: &LlamaConfig, progress: impl FnMut(f32) -> bool + 'static) -> Result<Loaded> {
    let backend = backend()?;
    if !config.model_path.is_file() {
        return Err(LlamaError::InvalidModel(format!(
            "{}: no such GGUF file",
            config.model_path.display()
        )));
    }
    gguf::check_layout(&gguf::read_metadata(&config.model_path)?)?;
    let gpu_layers = config
        .gpu_layers
        .unwrap_or(if gpu_offload() { u32::MAX } else { 0 });
    let params = LlamaModelParams::default()
        .with_n_gpu_layers(gpu_layers)
        .with_progress_callback(progress);
    let model = LlamaModel::load_from_file(backend, &config.model_path, &params).map_err(|e| {
        LlamaError::InvalidModel(format!(
            "{}: {e} (llama.cpp could not load it; is it a GGUF of a supported architecture?)",
            config.model_path.display()
        ))
    })?;
    let arch = model
        .meta_val_str("general.architecture")
        .unwrap_or_default();
    if !arch.starts_with("gemma") {
        tracing::warn!(%arch, "not a Gemma GGUF: the chat template and output parsing assume Gemma 4");
    }
    let vocab = model.vocab();
    let text =
        |t: LlamaToken| String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned();
    let bos = Some(text(vocab.bos())).filter(|b| !b.is_empty());
    let eos = text(vocab.eos());
    let template = match model.meta_val_str("tokenizer.chat_template") {
        Ok(src) => Some(
            ChatTemplate::from_source(&src, bos.as_deref().unwrap_or(""), &eos)
                .map_err(|e| LlamaError::InvalidModel(format!("chat template: {e}")))?
                .with_control_tokens(control_tokens(&model)),
        ),
        Err(_) => None,
    };
    check_turn_markers(&model, &config.model_path)?;
    let n_ctx = gguf::served_context(model.n_ctx_train(), config.context_length);
    let n_swa = model
        .meta_val_str(&format!("{arch}.attention.sliding_window"))
        .ok()
        .and_then(|w| w.parse().ok())
        .filter(|&w: &u32| w > 0);
    Ok(Loaded {
        model,
        template,
        bos,
        n_ctx,
        n_swa,
        offloaded: gpu_layers > 0 && gpu_offload(),
        vocabulary: OnceLock::new(),
    })
}

/// Refuses a GGUF whose tokenizer would not parse Gemma 4's turn markers out of a rendered chat prompt.
/// llama.cpp parses only CONTROL and USER_DEFINED tokens as such; a converter that typed `<|turn>` NORMAL
/// (it does when the checkpoint's tokenizer_config does not list it as special) makes every chat prompt
/// reach the model as the characters "<", "|", "tu", … — garbage answers with nothing to say why.
pub(crate) fn check_turn_markers(model: &LlamaModel, path: &std::path::Path) -> Result<()> {
    let vocab = model.vocab();
    for marker in ["<|turn>", "<turn|>"] {
        let as_text = vocab.tokenize(marker.as_bytes(), false, false);
        let parsed = vocab.tokenize(marker.as_bytes(), false, true);
        // A vocabulary without the marker (not a Gemma 4 chat model) has nothing to check.
        let in_vocab = parsed.len() == 1
            || (0..model.n_vocab())
                .any(|i| vocab.token_to_piece(LlamaToken(i), true, None) == marker.as_bytes());
        if in_vocab && parsed.len() != 1 && parsed == as_text {
            return Err(LlamaError::InvalidModel(format!(
                "{}: its tokenizer does not treat the chat marker {marker} as a control token (token \
                 type NORMAL), so chat prompts would be read as plain text; re-convert it with \
                 llama.cpp's convert_hf_to_gguf.py from a checkpoint whose tokenizer lists {marker} as \
                 a special token",
                path.display()
            )));
        }
    }
    Ok(())
}

impl Loaded {
    /// Token ids of a prompt (chat through the template, which writes `<bos>`).
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<LlamaToken>> {
        if let Prompt::Ids(ids) = prompt {
            return Ok(ids.iter().map(|&i| LlamaToken(i as i32)).collect());
        }
        let text = self.prompt_text(prompt)?.unwrap_or_default();
        Ok(self.tokenize_prompt(prompt, &text))
    }

    /// The id of the special token spelled `text` (such as `<|channel>`), if the vocabulary has one.
    pub fn special_id(&self, text: &str) -> Option<u32> {
        match self.tokenize(text).as_slice() {
            [t] if self.model.vocab().token_to_piece(*t, true, None) == text.as_bytes() => {
                Some(t.0 as u32)
            }
            _ => None,
        }
    }

    /// Token ids of `text`: special tokens in it (<bos>, <|turn>) are parsed as such; nothing is added.
    pub fn tokenize(&self, text: &str) -> Vec<LlamaToken> {
        self.model.vocab().tokenize(text.as_bytes(), false, true)
    }

    /// Token ids of `text`, the text of `prompt` ([`Loaded::prompt_text`], its videos expanded or not): a
    /// chat's [`jemma_chat::guard::pieces`] one after another, so that a control token a client spelled
    /// (cut by the chat template's guard) is read as text; a raw prompt whole ([`Loaded::tokenize`]).
    pub fn tokenize_prompt(&self, prompt: &Prompt, text: &str) -> Vec<LlamaToken> {
        match prompt {
            Prompt::Chat { .. } => jemma_chat::guard::pieces(text)
                .flat_map(|piece| self.tokenize(piece))
                .collect(),
            _ => self.tokenize(text),
        }
    }

    /// The text a prompt is read from: a chat rendered with the model's template (which writes `<bos>`), a
    /// text prompt with `<bos>` before it; None for token ids.
    ///
    /// Errors: a chat for a model without a template, or one its template refuses.
    pub fn prompt_text(&self, prompt: &Prompt) -> Result<Option<String>> {
        let text = match prompt {
            Prompt::Ids(_) => return Ok(None),
            Prompt::Text(t) => match &self.bos {
                Some(b) if !t.starts_with(b.as_str()) => format!("{b}{t}"),
                _ => t.clone(),
            },
            Prompt::Chat {
                messages,
                tools,
                enable_thinking,
            } => {
                let tpl = self
                    .template
                    .as_ref()
                    .ok_or_else(|| LlamaError::InvalidRequest(NO_CHAT_TEMPLATE.into()))?;
                tpl.render_for_generation(messages, tools.as_deref(), *enable_thinking)
                    .map_err(|e| {
                        if e.is_client_error() {
                            LlamaError::InvalidRequest(e.to_string())
                        } else {
                            LlamaError::InvalidModel(format!("chat template: {e}"))
                        }
                    })?
            }
        };
        Ok(Some(text))
    }
}
