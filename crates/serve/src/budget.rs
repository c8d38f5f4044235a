//! A step's prompt budget, the rule both engines' runners plan their prompt reads by: each step reads the
//! sequences' next prompt chunks, oldest first, up to one prefill chunk of tokens in all, so that a
//! newcomer's long prompt delays the running streams by about one chunk a step.

/// Fewest prompt tokens a read cut to fit what a step's budget has left holds (the floor of the MLX
/// engine's attention-bounded chunks): below it the sequence waits for the next step, whose budget it
/// starts.
pub const MIN_CUT_READ: usize = 16;

/// How many of the `n` tokens a sequence's next prompt read would take a step reads, with `left` of its
/// budget unspent and `first` when nothing is planned yet:
/// - all `n` when they fit, or when the read is the step's first (a long prompt progresses: the first
///   read always runs);
/// - else, when `cut` allows it, the `left` tokens when they are at least [`MIN_CUT_READ`]: the read is
///   cut to what is left and the rest read later (vLLM's chunked prefill cuts the last request it
///   schedules the same way);
/// - else 0: it waits, and no later sequence is planned this step either (the older ones keep their
///   turn).
///
/// `cut`: whether a prompt read at other chunk boundaries gives the same numbers. It does on the MLX
/// engine, to rounding (a packed read already differs from a lone one by that much). It does not on the
/// llama.cpp engine, whose CPU kernels switch by row count: a request read beside others would then answer
/// otherwise than alone, which its batch-invariance test forbids, so its reads stay whole. A read that
/// cannot be cut (an image or clip, read whole) is the caller's to keep whole: it takes the result only
/// when it is `n`.
pub fn prompt_read(n: usize, left: usize, first: bool, cut: bool) -> usize {
    if n <= left || first {
        n
    } else if cut && left >= MIN_CUT_READ {
        left
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_fits_is_cut_or_waits() {
        assert_eq!(prompt_read(40, 48, false, true), 40, "fits");
        assert_eq!(prompt_read(400, 48, true, true), 400, "the first runs");
        assert_eq!(prompt_read(40, 22, false, true), 22, "cut to what is left");
        assert_eq!(prompt_read(40, 22, false, false), 0, "kept whole: waits");
        assert_eq!(prompt_read(40, 15, false, true), 0, "too little left");
        assert_eq!(prompt_read(0, 0, false, true), 0);
    }
}
