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
    if s.has_penalties() {
        // The same window as the MLX engine (mlx-lm's 20 tokens by default), over the prompt's tail and
        // the answer: the runner accepts the prompt's last tokens into the chain before the first step.
        chain.push(LlamaSampler::penalties(
            n_vocab,
            s.penalty_context as i32,
            s.repetition_penalty.unwrap_or(1.0),
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
        let seed = s.seed.map_or_else(rand_seed, seed32);
        chain.push(LlamaSampler::dist(seed));
    }
    Ok(LlamaSampler::chain_simple(chain))
}

/// llama.cpp's samplers take a 32-bit seed: the high half of the request's 64 bits is folded in, so that
/// seeds 2^32 apart draw differently (as they do on the MLX engine), and a seed below 2^32 is itself,
/// except the one value llama.cpp reads as "no seed, draw one" (`LLAMA_DEFAULT_SEED`, 0xFFFFFFFF), which
/// would leave a seeded request unseeded: it becomes 0xFFFFFFFE.
pub(crate) fn seed32(seed: u64) -> u32 {
    match (seed ^ (seed >> 32)) as u32 {
        u32::MAX => u32::MAX - 1,
        s => s,
    }
}

pub(crate) fn rand_seed() -> u32 {
    // Seedless requests differ run to run, as OpenAI's do: a fresh seed from the OS-seeded thread RNG
    // (two requests in the same clock tick still differ).
    rand::random()
}

/// Lanes of [`argmax`]'s first pass: 16 `f32`s, one AVX-512 register or four SSE ones, enough independent
/// maxima that the loop is bound by memory rather than by a compare's latency.
const LANES: usize = 16;

/// The index of the first largest value of `v` (logits: `n_vocab` floats), as llama.cpp's greedy sampler
/// picks it, except that a NaN is never the largest (llama.cpp's keeps index 0 when its logit is NaN); a
/// row with nothing above negative infinity gives 0.
///
/// Two passes the compiler vectorises: the maximum over [`LANES`] independent lanes, then the first index
/// holding it. A fold carrying its index is one long chain of dependent compares (~1 ns a logit); on Gemma's
/// 262,144-entry vocabulary that was ~0.3 ms per sequence per step on the serving thread, 4 % of an
/// 8-sequence decode step on a 2-core CPU (perf, `scripts/bench-serving`).
pub(crate) fn argmax(v: &[f32]) -> u32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            // `x > m`, not `f32::max`: a NaN is skipped as the scalar fold skips it, and this shape maps to
            // one `maxps`.
            *m = if x > *m { x } else { *m };
        }
    }
    let best = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if best == f32::NEG_INFINITY {
        return 0;
    }
    v.iter().position(|&x| x == best).unwrap_or(0) as u32
}

/// Logits each thread of [`argmax_rows`] reads at least: one Gemma row (262,144), which one core reads in
/// longer than a scoped thread takes to start (tens of µs), so fewer logits are read where they are.
const LOGITS_PER_THREAD: usize = 1 << 18;

/// [`argmax`] of each row (one sequence's logits each), the rows split into runs over at most `threads`
/// threads, [`LOGITS_PER_THREAD`] logits or more each; the calling thread reads the first run. The result is
/// the same as row by row.
///
/// Why: with every layer on a GPU the host reads each greedy sequence's logits (1 MiB on Gemma) while the
/// GPU waits for the next step. Read one row after another on the serving thread, they cost an H200 run of
/// 32 streams ~6 ms of a 14.5 ms step (Jemma at 0.59x llama-batched-bench's decode, which samples nothing;
/// docs/BENCHMARKS.md, "The heavy tier on CUDA").
pub(crate) fn argmax_rows(rows: &[&[f32]], threads: usize) -> Vec<u32> {
    let total: usize = rows.iter().map(|r| r.len()).sum();
    let threads = threads
        .min(rows.len())
        .min(total / LOGITS_PER_THREAD)
        .max(1);
    if threads <= 1 {
        return rows.iter().map(|r| argmax(r)).collect();
    }
    let mut out = vec![0u32; rows.len()];
    let per = rows.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut runs = rows.chunks(per).zip(out.chunks_mut(per));
        let read = |(rows, out): (&[&[f32]], &mut [u32])| {
            for (o, r) in out.iter_mut().zip(rows) {
                *o = argmax(r);
            }
        };
        let first = runs.next();
        for run in runs {
            scope.spawn(move || read(run));
        }
        if let Some(run) = first {
            read(run);
        }
    });
    out
}

/// The cores, read once: `available_parallelism` reads cgroup files on Linux at every call.
pub(crate) fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[cfg(test)]
mod tests {
    use super::{argmax, argmax_rows, seed32};

    /// Seeds 2^32 apart are different seeds to llama.cpp too; a small seed is passed as it is.
    #[test]
    fn every_bit_of_a_seed_counts() {
        assert_eq!(seed32(7), 7);
        assert_ne!(seed32(7), seed32(7 + (1 << 32)));
        assert_ne!(seed32(1 << 40), seed32(0));
        // llama.cpp would draw a random seed for this one (llama.h's LLAMA_DEFAULT_SEED, a macro bindgen
        // leaves out).
        assert_ne!(seed32(u64::from(u32::MAX)), 0xFFFF_FFFF);
    }

    /// Spread over threads or not, every row's argmax is its own, in order.
    #[test]
    fn argmax_rows_is_argmax_row_by_row() {
        let rows: Vec<Vec<f32>> = (0..7)
            .map(|k| {
                (0..262_144usize)
                    .map(|i| ((i * 7919 + k * 104_729) % 1_000_003) as f32)
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        let want: Vec<u32> = refs.iter().map(|r| argmax(r)).collect();
        // The rows' maxima sit at different places, so a mixed-up row would show.
        assert!(want.windows(2).any(|w| w[0] != w[1]));
        for threads in [1, 2, 3, 16] {
            assert_eq!(argmax_rows(&refs, threads), want, "{threads} threads");
        }
        assert!(argmax_rows(&[], 4).is_empty());
    }

    /// The definition: the first index whose value beats every earlier one.
    fn scalar(v: &[f32]) -> u32 {
        v.iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
                if x > bv { (i, x) } else { (bi, bv) }
            })
            .0 as u32
    }

    #[test]
    fn argmax_is_the_first_largest_and_never_a_nan() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for len in [0usize, 1, 2, 15, 16, 17, 31, 33, 100, 1000, 4099] {
            for _ in 0..20 {
                // Few distinct values, so ties for the largest are common and the first must win.
                let mut v: Vec<f32> = (0..len).map(|_| (next() % 7) as f32 - 3.0).collect();
                if len > 0 && next() % 3 == 0 {
                    let i = (next() as usize) % len;
                    v[i] = f32::NAN;
                }
                assert_eq!(argmax(&v), scalar(&v), "{v:?}");
            }
        }
        let nan_first = [f32::NAN, f32::NEG_INFINITY, -1.0, f32::NAN, -1.0];
        assert_eq!(argmax(&nan_first), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
        let mut big = vec![0.5f32; 262_144];
        big[262_143] = f32::INFINITY;
        big[7] = f32::INFINITY;
        assert_eq!(argmax(&big), 7);
    }
}
