//! llama.cpp's sampler chain built from a request's sampling settings.

use super::*;

pub(crate) fn sampler(loaded: &Loaded, s: &Sampling) -> Result<LlamaSampler> {
    let n_vocab = loaded.model.n_vocab();
    let mut chain = vec![];
    if !s.logit_bias.is_empty() {
        let biases: Vec<LlamaLogitBias> = s
            .logit_bias
            .iter()
            .map(|&(t, b)| LlamaLogitBias::new(LlamaToken(t as i32), b))
            .collect();
        chain.push(LlamaSampler::logit_bias(n_vocab, &biases));
    }
    let rep = s.repetition_penalty.unwrap_or(1.0);
    if rep != 1.0 || s.presence_penalty != 0.0 || s.frequency_penalty != 0.0 {
        // The same window as the MLX engine (mlx-lm's 20 tokens by default).
        chain.push(LlamaSampler::penalties(
            n_vocab,
            s.penalty_context as i32,
            rep,
            s.frequency_penalty,
            s.presence_penalty,
        ));
    }
    if s.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if s.top_k > 0 {
            chain.push(LlamaSampler::top_k(s.top_k));
        }
        if s.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(s.top_p, 1));
        }
        if s.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(s.min_p, 1));
        }
        chain.push(LlamaSampler::temp(s.temperature));
        let seed = s.seed.map_or_else(rand_seed, |v| v as u32);
        chain.push(LlamaSampler::dist(seed));
    }
    Ok(LlamaSampler::chain_simple(chain))
}

pub(crate) fn rand_seed() -> u32 {
    // Seedless requests differ run to run, as OpenAI's do: a fresh seed from the OS-seeded thread RNG
    // (two requests in the same clock tick still differ).
    rand::random()
}
