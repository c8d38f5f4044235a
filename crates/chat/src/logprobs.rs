//! OpenAI `logprobs` entries, built the same way by both engines so a client sees one shape whichever engine
//! served it: the token as text, its raw bytes (a token may hold part of a UTF-8 character), its
//! log-probability under the model and the most likely alternatives, best first.
//!
//! "Under the model" means the log-softmax of the model's raw logits: before `logit_bias`, the repetition,
//! presence and frequency penalties, a `response_format` mask, temperature and top-k/p/min-p. That is
//! vLLM's default (`logprobs_mode = "raw_logprobs"`) and what llama.cpp's logits give; mlx-lm reports
//! after its logits processors instead. Both engines are held to it by a test that biases the runner-up
//! (`logprobs_are_the_models_own_before_logit_bias` in each engine's tests).

use serde::Serialize;

/// Most alternatives a request may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One alternative token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    /// The token's text (lossy when it holds part of a character).
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// The generated token, its log-probability and the `top_logprobs` alternatives: serialises to exactly one
/// element of OpenAI's `choices[].logprobs.content`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    /// The token's text (lossy when it holds part of a character).
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at this position, best first (empty unless asked for).
    pub top_logprobs: Vec<TopLogprob>,
}

impl TokenLogprob {
    /// Builds an entry from token bytes; `top` pairs each alternative's bytes with its log-probability.
    pub fn new(bytes: Vec<u8>, logprob: f32, top: Vec<(Vec<u8>, f32)>) -> Self {
        Self {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            logprob,
            bytes,
            top_logprobs: top
                .into_iter()
                .map(|(bytes, logprob)| TopLogprob {
                    token: String::from_utf8_lossy(&bytes).into_owned(),
                    logprob,
                    bytes,
                })
                .collect(),
        }
    }
}

/// Log-softmax of `logits` read at `chosen`, and the `k` most likely ids with their log-probabilities, best
/// first (ties by lower id, so the order is deterministic). For engines that hand back logits on the CPU
/// (llama.cpp); the MLX engine does the same on the device. Non-finite logits (masked tokens) get
/// `-inf`; `chosen` outside `logits` gets `-inf` too rather than a panic.
pub fn log_softmax_top(logits: &[f32], chosen: usize, k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return (f32::NEG_INFINITY, vec![]);
    }
    // Summed in f64: a 262k-entry vocabulary loses digits in an f32 running sum.
    let sum: f64 = logits
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| f64::from(x - max).exp())
        .sum();
    let log_z = max + sum.ln() as f32;
    let lp = |x: f32| {
        if x.is_finite() {
            x - log_z
        } else {
            f32::NEG_INFINITY
        }
    };
    let chosen_lp = logits.get(chosen).map_or(f32::NEG_INFINITY, |&x| lp(x));
    let k = k.min(logits.len());
    if k == 0 {
        return (chosen_lp, vec![]);
    }
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut all: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, if x.is_finite() { x } else { f32::NEG_INFINITY }))
        .collect();
    // Partial selection first: a full sort of a 262k vocabulary per token would cost more than the rest.
    all.select_nth_unstable_by(k - 1, order);
    all.truncate(k);
    all.sort_by(order);
    (
        chosen_lp,
        all.into_iter().map(|(i, x)| (i, lp(x))).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_matches_the_definition() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let z: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum();
        let (lp, top) = log_softmax_top(&logits, 2, 3);
        assert!((f64::from(lp) - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2, 0]);
        for (i, p) in &top {
            let want = f64::from(logits[*i as usize]) - z.ln();
            assert!((f64::from(*p) - want).abs() < 1e-6, "{i}: {p} vs {want}");
        }
        let total: f64 = (0..4)
            .map(|i| f64::from(log_softmax_top(&logits, i, 0).0).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn ties_masked_tokens_and_bad_indices() {
        let logits = [0.5f32, f32::NEG_INFINITY, 0.5, f32::NAN];
        let (lp, top) = log_softmax_top(&logits, 1, 10);
        assert_eq!(lp, f32::NEG_INFINITY);
        assert_eq!(top.len(), 4);
        assert_eq!((top[0].0, top[1].0), (0, 2), "ties ordered by id");
        assert!((top[0].1 - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(log_softmax_top(&logits, 99, 0).0, f32::NEG_INFINITY);
        assert_eq!(log_softmax_top(&[], 0, 5), (f32::NEG_INFINITY, vec![]));
    }

    #[test]
    fn serialises_as_an_openai_entry() {
        let e = TokenLogprob::new(vec![0xE2, 0x82], -0.25, vec![(b" hi".to_vec(), -1.5)]);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["token"], "\u{FFFD}");
        assert_eq!(v["bytes"], serde_json::json!([226, 130]));
        assert_eq!(v["logprob"], -0.25);
        assert_eq!(v["top_logprobs"][0]["token"], " hi");
        assert_eq!(
            v["top_logprobs"][0]["bytes"],
            serde_json::json!([32, 104, 105])
        );
    }
}
