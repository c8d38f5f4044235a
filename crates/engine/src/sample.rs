//! Sampling and logits processing, in mlx-lm's order and arithmetic (`sample_utils.py`).
//!
//! Everything stays on the device and lazy, so the generation loop can build step n+1 before token n is read
//! back (mlx-lm's pipelining); the token history used by penalties is a lazy array too.

use mlx_rs::{
    Array, Dtype,
    ops::{
        self,
        indexing::{TryIndexOp, argmax_axis, put_along_axis, take_along_axis},
    },
    random::{self, RandomState},
};

use crate::nn::scalar;
use crate::{EngineError, Result};

pub use jemma_chat::sampling::SamplingParams;

/// Per-request sampler state: the RNG and precomputed bias.
pub struct Sampler {
    params: SamplingParams,
    rng: RandomState,
    bias: Option<Array>,
    vocab: i32,
    dtype: Dtype,
}

impl Sampler {
    /// Prepares a sampler for logits of `vocab` entries in `dtype`.
    pub fn new(params: SamplingParams, vocab: usize, dtype: Dtype) -> Result<Self> {
        params
            .validate(vocab)
            .map_err(EngineError::InvalidRequest)?;
        let rng = match params.seed {
            Some(s) => RandomState::with_seed(s)?,
            // Seedless requests differ run to run, as OpenAI's do: a fresh seed from the OS-seeded
            // thread RNG (two requests in the same clock tick still differ).
            None => RandomState::with_seed(rand::random())?,
        };
        let bias = if params.logit_bias.is_empty() {
            None
        } else {
            // A dense bias vector (zeros elsewhere) adds exactly what mlx-lm's `at[:, ids].add` adds.
            let mut v = vec![0f32; vocab];
            for (id, b) in &params.logit_bias {
                v[*id as usize] += b;
            }
            Some(Array::from_slice(&v, &[1, vocab as i32]).as_dtype(dtype)?)
        };
        Ok(Self {
            params,
            rng,
            bias,
            vocab: vocab as i32,
            dtype,
        })
    }

    /// Applies logit bias and penalties (mlx-lm `make_logits_processors` order). `history` is the lazy
    /// int32 array of prompt + generated tokens.
    pub fn process(&self, logits: &Array, history: Option<&Array>) -> Result<Array> {
        let mut logits = logits.clone();
        if let Some(b) = &self.bias {
            logits = ops::add(&logits, b)?;
        }
        let Some(hist) = history.filter(|_| self.params.has_penalties()) else {
            return Ok(logits);
        };
        let n = hist.shape()[0];
        let ctx = self.params.penalty_context as i32;
        let recent = if n > ctx {
            hist.try_index((n - ctx)..)?
        } else {
            hist.clone()
        };
        // One-hot of the recent tokens against the vocabulary: (ctx, V) → counts per token.
        let onehot = recent
            .reshape(&[-1, 1])?
            .eq(Array::arange::<_, i32>(0, self.vocab, 1)?.reshape(&[1, -1])?)?;
        let counts = onehot.as_dtype(Dtype::Int32)?.sum_axis(0, true)?; // (1, V)
        let seen = counts.gt(Array::from_int(0))?;
        if let Some(r) = self.params.repetition_penalty.filter(|r| *r != 1.0) {
            let pen = scalar(r, self.dtype)?;
            let neg = logits.lt(scalar(0.0, self.dtype)?)?;
            let penalised = ops::select(
                &neg,
                ops::multiply(&logits, &pen)?,
                ops::divide(&logits, &pen)?,
            )?;
            logits = ops::select(&seen, &penalised, &logits)?;
        }
        if self.params.presence_penalty != 0.0 {
            let p = scalar(self.params.presence_penalty, self.dtype)?;
            logits = ops::select(&seen, ops::subtract(&logits, &p)?, &logits)?;
        }
        if self.params.frequency_penalty != 0.0 {
            let p = scalar(self.params.frequency_penalty, self.dtype)?;
            let sub = ops::multiply(counts.as_dtype(self.dtype)?, &p)?;
            logits = ops::subtract(&logits, &sub)?;
        }
        Ok(logits)
    }

    /// The RNG's state now: [`Sampler::set_rng_state`] with it draws the next keys again.
    pub fn rng_state(&self) -> RandomState {
        self.rng.clone()
    }

    /// Puts the RNG back to a state [`Sampler::rng_state`] returned.
    pub fn set_rng_state(&mut self, rng: RandomState) {
        self.rng = rng;
    }

    /// Picks the next token from log-probabilities (1, V): greedy, or filtered (top_p, min_p, top_k, in
    /// mlx-lm's order on the untempered values) then categorical at the temperature.
    pub fn sample(&mut self, logprobs: &Array) -> Result<Array> {
        let p = &self.params;
        if p.temperature == 0.0 {
            return Ok(argmax_axis(logprobs, -1, None)?);
        }
        let lp = self.filter(logprobs)?;
        let inv_t = scalar(1.0 / p.temperature, lp.dtype())?;
        let key = self.rng.next_key()?;
        Ok(random::categorical(
            ops::multiply(&lp, &inv_t)?,
            -1,
            None,
            Some(&key),
        )?)
    }

    /// The law [`Sampler::sample`] draws from, as log-probabilities (1, V): filtered and tempered, then
    /// renormalised (`-inf` where a filter dropped a token); greedy: all mass on the argmax. Speculative
    /// sampling compares these laws (see `jemma_serve::speculative::accept_sampled`).
    pub fn law(&self, logprobs: &Array) -> Result<Array> {
        let p = &self.params;
        if p.temperature == 0.0 {
            let v = logprobs.shape()[logprobs.ndim() - 1];
            let best = argmax_axis(logprobs, -1, Some(true))?;
            let onehot = Array::arange::<_, i32>(0, v, 1)?.eq(&best)?;
            let zero = scalar(0.0, logprobs.dtype())?;
            let neg_inf = scalar(f32::NEG_INFINITY, logprobs.dtype())?;
            return Ok(ops::select(&onehot, &zero, &neg_inf)?);
        }
        let lp = self.filter(logprobs)?;
        let inv_t = scalar(1.0 / p.temperature, lp.dtype())?;
        log_softmax(&ops::multiply(&lp, &inv_t)?)
    }

    /// Draws a token from a law made by [`Sampler::law`] (1, V) with this sampler's RNG.
    pub fn draw(&mut self, law: &Array) -> Result<Array> {
        let key = self.rng.next_key()?;
        Ok(random::categorical(law, -1, None, Some(&key))?)
    }

    /// top_p, min_p and top_k, in mlx-lm's order on the untempered log-probabilities (1, V).
    fn filter(&self, logprobs: &Array) -> Result<Array> {
        let p = &self.params;
        let mut lp = logprobs.clone();
        let neg_inf = scalar(f32::NEG_INFINITY, lp.dtype())?;
        if p.top_p > 0.0 && p.top_p < 1.0 {
            let sorted = ops::sort_axis(&lp, -1)?;
            let probs = ops::exp(sorted.as_dtype(Dtype::Float32)?)?;
            let mass_above = ops::cumsum(&probs, -1, true, false)?;
            let total = ops::add(
                mass_above.try_index((.., ..1))?,
                probs.try_index((.., ..1))?,
            )?;
            let dropped = mass_above
                .ge(ops::multiply(&total, Array::from_f32(p.top_p))?)?
                .as_dtype(Dtype::Int32)?
                .sum_axis(-1, true)?;
            let threshold = take_along_axis(&sorted, &dropped, -1)?;
            lp = ops::select(lp.lt(&threshold)?, &neg_inf, &lp)?;
        }
        if p.min_p > 0.0 {
            let top = lp.max_axis(-1, true)?;
            let scaled = ops::add(&top, scalar(p.min_p.ln(), lp.dtype())?)?;
            lp = ops::select(lp.lt(&scaled)?, &neg_inf, &lp)?;
        }
        if p.top_k > 0 && p.top_k < self.vocab {
            let idx = ops::argpartition_axis(ops::negative(&lp)?, p.top_k - 1, -1)?
                .try_index((.., p.top_k..))?;
            let fill = ops::broadcast_to(&neg_inf, idx.shape())?;
            lp = put_along_axis(&lp, &idx, &fill, -1)?;
        }
        Ok(lp)
    }
}

/// `logits − logsumexp(logits)`, as mlx-lm's generate_step (in the logits' dtype).
pub fn log_softmax(logits: &Array) -> Result<Array> {
    Ok(ops::subtract(logits, logits.logsumexp_axis(-1, true)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(v: &[f32]) -> Array {
        log_softmax(&Array::from_slice(v, &[1, v.len() as i32])).unwrap()
    }

    fn token(a: Array) -> i32 {
        a.reshape(&[-1])
            .unwrap()
            .as_dtype(Dtype::Int32)
            .unwrap()
            .as_slice::<i32>()[0]
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::default(), 4, Dtype::Float32).unwrap();
        assert_eq!(token(s.sample(&lp(&[0.1, 3.0, 2.0, -1.0])).unwrap()), 1);
    }

    #[test]
    fn top_k_one_is_greedy_even_when_hot() {
        let params = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(params, 4, Dtype::Float32).unwrap();
        for _ in 0..20 {
            assert_eq!(token(s.sample(&lp(&[0.1, 3.0, 2.9, -1.0])).unwrap()), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ≈ [0.64, 0.23, 0.09, 0.03]: top_p 0.5 keeps only token 0
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(3),
            ..Default::default()
        };
        let mut s = Sampler::new(params, 4, Dtype::Float32).unwrap();
        for _ in 0..20 {
            assert_eq!(token(s.sample(&lp(&[3.0, 2.0, 1.0, 0.0])).unwrap()), 0);
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let params = SamplingParams {
            temperature: 1.0,
            min_p: 0.5,
            seed: Some(4),
            ..Default::default()
        };
        let mut s = Sampler::new(params, 3, Dtype::Float32).unwrap();
        for _ in 0..20 {
            let t = token(s.sample(&lp(&[2.0, 1.9, -3.0])).unwrap());
            assert!(t == 0 || t == 1, "{t}");
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_varies() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(42),
            ..Default::default()
        };
        let run = || {
            let mut s = Sampler::new(params.clone(), 8, Dtype::Float32).unwrap();
            (0..30)
                .map(|_| token(s.sample(&lp(&[0.0; 8])).unwrap()))
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 3,
            "{a:?}"
        );
    }

    #[test]
    fn logit_bias_and_penalties() {
        let params = SamplingParams {
            logit_bias: vec![(2, 10.0)],
            presence_penalty: 1.0,
            frequency_penalty: 0.5,
            repetition_penalty: Some(2.0),
            ..Default::default()
        };
        let s = Sampler::new(params, 4, Dtype::Float32).unwrap();
        let logits = Array::from_slice(&[1.0f32, -1.0, 0.0, 4.0], &[1, 4]);
        let hist = Array::from_slice(&[1i32, 3, 3], &[3]);
        let out = s.process(&logits, Some(&hist)).unwrap();
        // token 1 (seen once, negative): -1*2 - 1 - 0.5 = -3.5; token 3 (seen twice): 4/2 - 1 - 1 = 0;
        // token 2: 0 + 10 bias; token 0 untouched.
        assert_eq!(out.as_slice::<f32>(), &[1.0, -3.5, 10.0, 0.0]);
    }

    #[test]
    fn invalid_params_are_rejected() {
        let bad = [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_k: -2,
                ..Default::default()
            },
            SamplingParams {
                logit_bias: vec![(99, 1.0)],
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: f32::NAN,
                ..Default::default()
            },
        ];
        for p in bad {
            assert!(p.validate(10).is_err(), "{p:?}");
        }
    }
}
