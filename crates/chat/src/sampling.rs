//! Sampling parameters of a request, shared by every engine so that a request means the same on each tier
//! (the MLX engine applies them in mlx-lm's order, the llama.cpp engine through its sampler chain).

use serde::{Deserialize, Serialize};

/// Sampling parameters of one request (OpenAI fields plus mlx-lm's extras).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 disables.
    pub top_k: i32,
    /// Drop tokens below `min_p` × the top probability; 0 disables.
    pub min_p: f32,
    /// Multiplicative penalty on tokens seen in the last `penalty_context` tokens of the prompt and the
    /// answer together (1 or None disables).
    pub repetition_penalty: Option<f32>,
    /// Subtracted once from every token seen in the same window (OpenAI presence_penalty; OpenAI counts the
    /// whole answer, mlx-lm and llama-server a window that reaches into the prompt, as here).
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the same window (OpenAI frequency_penalty).
    pub frequency_penalty: f32,
    /// How many recent tokens, prompt and answer together, the penalties look at (mlx-lm's
    /// `repetition_context_size`, 20; llama-server's `repeat_last_n`, which also reads the prompt).
    pub penalty_context: usize,
    /// Additive bias per token id.
    pub logit_bias: Vec<(u32, f32)>,
    /// Seed for reproducible sampling.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_context: 20,
            logit_bias: vec![],
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Whether any penalty changes the logits (repetition not 1, presence or frequency not 0).
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty.is_some_and(|r| r != 1.0)
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }

    /// Rejects values that would make sampling meaningless or crash a kernel (the message is for the client).
    pub fn validate(&self, vocab: usize) -> Result<(), String> {
        let bad = |m: String| Err(m);
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k < 0 {
            return bad(format!("top_k must be >= 0, got {}", self.top_k));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if let Some(r) = self.repetition_penalty
            && !(r.is_finite() && r > 0.0)
        {
            return bad(format!("repetition_penalty must be > 0, got {r}"));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(v.is_finite() && (-2.0..=2.0).contains(&v)) {
                return bad(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        for (id, b) in &self.logit_bias {
            if *id as usize >= vocab {
                return bad(format!(
                    "logit_bias token {id} is outside the vocabulary ({vocab})"
                ));
            }
            if !(b.is_finite() && (-100.0..=100.0).contains(b)) {
                return bad(format!(
                    "logit_bias value {b} for token {id} must be in [-100, 100]"
                ));
            }
        }
        Ok(())
    }
}
