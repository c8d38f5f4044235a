//! The prefix cache's bookkeeping, engine-agnostic: which tokens a sequence's KV cache holds, how much of a
//! new prompt can be kept, and the rule that a request which fails leaves nothing stale behind. An engine
//! keeps one [`PrefixSlot`] per cached sequence and does only the cache operations (trim the KV from a
//! position on, append); an engine with several sequences picks a new request's with [`choose_slot`]. This
//! is llama-server's `cache_prompt` per slot and mlx_lm.server's prompt-cache reuse, written once for both
//! of Jemma's engines.

/// The tokens whose KV one sequence's cache holds, in order (position `i` holds `tokens[i]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixSlot {
    tokens: Vec<u32>,
}

impl PrefixSlot {
    /// An empty slot (a fresh or cleared cache).
    pub fn new() -> Self {
        Self::default()
    }

    /// How many leading tokens of `prompt` the cache can keep: the common prefix, but never the whole
    /// prompt, since the last prompt token must be evaluated for its logits. 0 for an empty prompt.
    pub fn reusable(&self, prompt: &[u32]) -> usize {
        let common = self
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        common.min(prompt.len().saturating_sub(1))
    }

    /// Starts a request: hands the slot's contents to it and leaves the slot empty, so that a request which
    /// fails before [`PrefixSlot::commit`] leaves an empty slot (the engine then clears its cache) rather than
    /// one that no longer describes the KV.
    pub fn begin(&mut self) -> PrefixSlot {
        std::mem::take(self)
    }

    /// Keeps only the first `n` tokens (the engine removed the KV from position `n` on).
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
    }

    /// Records tokens whose KV the engine just appended.
    pub fn extend(&mut self, tokens: impl IntoIterator<Item = u32>) {
        self.tokens.extend(tokens);
    }

    /// Ends a request that succeeded (or was cancelled cleanly): `state` describes the KV again.
    pub fn commit(&mut self, state: PrefixSlot) {
        *self = state;
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the slot holds nothing.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// One sequence's cache slot in an engine that keeps several (llama.cpp's sequences): the tokens its KV
/// holds, whether a request is using it, and when one last did.
#[derive(Debug, Clone, Default)]
pub struct CacheSlot {
    /// The tokens whose KV the slot holds.
    pub cached: PrefixSlot,
    /// A request is using it.
    pub busy: bool,
    /// The admission clock when a request last took it (0: never).
    pub last_used: u64,
}

/// The slot a new request takes, with how many prompt tokens it keeps (`reuse(index, slot)`: what the
/// engine can keep of the prompt in that slot, e.g. 0 when its sliding-window layers lost the prefix).
///
/// A free slot whose kept prefix is at least half of the `prompt_len`-token prompt (llama-server's slot choice
/// with its default `--slot-prompt-similarity` of 0.5) or at least half of what the slot holds (the prompt
/// continues that slot's conversation, however much longer it grew) wins, the longest such. A shorter match — every chat
/// prompt shares its first few tokens (`<bos><|turn>user`) with every cached conversation — is not worth
/// wrecking that slot's cache for (whatever the slot chosen below holds in common with the prompt is still
/// kept). Otherwise the choice keeps the running sequences' ids contiguous: with one KV stream per sequence, llama.cpp puts only consecutive sequence ids
/// in one ubatch (`split_equal`), so a decode step over sequences 0, 1, 2 is one pass over the weights while
/// one over 0, 2, 5 is three. So: a free slot inside the span of busy ones (a hole), else one just beside
/// the span, else any; among those, the least recently used (an empty slot first: it was never used). None:
/// every slot is busy.
pub fn choose_slot(
    slots: &[CacheSlot],
    prompt_len: usize,
    reuse: impl Fn(usize, &CacheSlot) -> usize,
) -> Option<(usize, usize)> {
    let free: Vec<(usize, usize)> = slots
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.busy)
        .map(|(i, s)| (i, reuse(i, s)))
        .collect();
    if let Some(best) = free
        .iter()
        .filter(|(i, k)| *k > 0 && (2 * *k >= prompt_len || 2 * *k >= slots[*i].cached.len()))
        .max_by(|a, b| {
            a.1.cmp(&b.1)
                .then(slots[b.0].last_used.cmp(&slots[a.0].last_used))
        })
    {
        return Some(*best);
    }
    let lru = |c: &mut dyn Iterator<Item = &(usize, usize)>| {
        c.min_by_key(|(i, _)| slots[*i].last_used).copied()
    };
    let busy = || {
        slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.busy)
            .map(|(i, _)| i)
    };
    let (Some(lo), Some(hi)) = (busy().min(), busy().max()) else {
        return lru(&mut free.iter());
    };
    lru(&mut free.iter().filter(|(i, _)| (lo..=hi).contains(i)))
        .or_else(|| lru(&mut free.iter().filter(|(i, _)| *i + 1 == lo || *i == hi + 1)))
        .or_else(|| lru(&mut free.iter()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_common_prefix_but_always_evaluates_the_last_prompt_token() {
        let mut s = PrefixSlot::new();
        s.extend([1, 2, 3, 4, 5]);
        assert_eq!(s.reusable(&[1, 2, 3, 9]), 3, "diverges at the 4th token");
        assert_eq!(
            s.reusable(&[1, 2, 3, 4, 5, 6, 7]),
            5,
            "extends the cached tokens"
        );
        assert_eq!(
            s.reusable(&[1, 2, 3, 4, 5]),
            4,
            "the same prompt: its last token again"
        );
        assert_eq!(s.reusable(&[1, 2]), 1);
        assert_eq!(s.reusable(&[7, 8]), 0);
        assert_eq!(s.reusable(&[]), 0);
    }

    #[test]
    fn a_request_that_fails_leaves_an_empty_slot() {
        let mut slot = PrefixSlot::new();
        slot.extend([1, 2, 3]);
        let mut state = slot.begin();
        assert!(slot.is_empty(), "nothing to trust while a request runs");
        state.truncate(2);
        state.extend([7, 8]);
        // Failed: no commit; the next request sees an empty slot and starts from a cleared cache.
        assert_eq!(slot.reusable(&[1, 2, 7, 8, 9]), 0);
        slot.commit(state);
        assert_eq!(slot.len(), 4);
        assert_eq!(slot.reusable(&[1, 2, 7, 8, 9]), 4);
    }
}

#[cfg(test)]
mod slot_tests {
    use super::*;

    fn slots(busy: &[bool], last_used: &[u64]) -> Vec<CacheSlot> {
        busy.iter()
            .zip(last_used)
            .map(|(&busy, &last_used)| CacheSlot {
                cached: PrefixSlot::new(),
                busy,
                last_used,
            })
            .collect()
    }

    #[test]
    fn a_prefix_hit_wins_then_holes_then_neighbours_then_the_least_recently_used() {
        // Nothing busy, no hit: the least recently used slot.
        let s = slots(&[false; 4], &[5, 2, 9, 7]);
        assert_eq!(choose_slot(&s, 40, |_, _| 0), Some((1, 0)));
        // A prefix hit (here of a 40-token prompt) wins wherever it is.
        assert_eq!(
            choose_slot(&s, 40, |i, _| if i == 3 { 40 } else { 0 }),
            Some((3, 40))
        );
        assert_eq!(
            choose_slot(&s, 40, |i, _| [20, 30, 30, 0][i]),
            Some((1, 30)),
            "the longest hit; the least recently used of equal ones"
        );
        // A conversation that grew past twice its cached turn still continues its slot.
        let mut grown = slots(&[false; 2], &[1, 0]);
        grown[0].cached.extend(0..10);
        assert_eq!(choose_slot(&grown, 100, |i, _| [10, 0][i]), Some((0, 10)));
        // A few shared tokens (a chat header) with slots holding 40 are no hit: the LRU slot (keeping what
        // it shares).
        let mut s = s;
        for slot in &mut s {
            slot.cached.extend(0..40);
        }
        assert_eq!(choose_slot(&s, 40, |i, _| [3, 0, 3, 3][i]), Some((1, 0)));
        assert_eq!(choose_slot(&s, 40, |i, _| [3, 3, 0, 3][i]), Some((1, 3)));
        // Busy 0 and 3: the holes 1 and 2 come first (the older of them).
        let s = slots(
            &[true, false, false, true, false, false],
            &[0, 8, 3, 0, 1, 1],
        );
        assert_eq!(choose_slot(&s, 40, |_, _| 0), Some((2, 0)));
        // Busy 1 and 2: a neighbour (0 or 3, the older), not the older slot 5 far away.
        let s = slots(
            &[false, true, true, false, false, false],
            &[4, 0, 0, 6, 9, 1],
        );
        assert_eq!(choose_slot(&s, 40, |_, _| 0), Some((0, 0)));
        // Every slot busy: none.
        let s = slots(&[true; 3], &[0; 3]);
        assert_eq!(choose_slot(&s, 40, |_, _| 0), None);
    }
}
