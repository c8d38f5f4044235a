//! The prefix cache's bookkeeping, engine-agnostic: which tokens a sequence's KV cache holds, how much of a
//! new prompt can be kept, and the rule that a request which fails leaves nothing stale behind. An engine
//! keeps one [`PrefixSlot`] per cached sequence and does only the cache operations (trim the KV from a
//! position on, append). This is llama-server's `cache_prompt` per slot and mlx_lm.server's prompt-cache
//! reuse, written once for both of Jemma's engines.

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
