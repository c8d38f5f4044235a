//! The prefix cache's bookkeeping, engine-agnostic, in the two shapes Jemma's engines need:
//! - slots ([`PrefixSlot`], [`CacheSlot`], [`choose_slot`]): an engine whose sequences share one context
//!   (llama.cpp) keeps its KV per sequence slot; which tokens a slot holds, how much of a new prompt it can
//!   keep, which free slot a request takes, and the rule that a request which fails leaves nothing stale
//!   behind (llama-server's `cache_prompt` per slot). The engine only trims and appends KV.
//! - a pool ([`PrefixPool`]): an engine whose caches are separate objects (MLX) keeps whole caches, finished
//!   conversations and shared checkpoints, in an LRU bounded in bytes (mlx_lm.server's `LRUPromptCache`);
//!   the llama.cpp engine keeps there, in host memory, the saved state of conversations whose slot another
//!   request took over (llama-server's `--cache-ram`).

/// Length of the longest common prefix of `a` and `b`.
pub fn common_prefix_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// In-batch prefix sharing (SGLang's): whether a new prompt, which can start from `have` cached tokens
/// now, should wait while a prompt read before it in the same step leaves a cache it can start from
/// holding `ahead` of its tokens. Requests sent together with one preamble (a system prompt, an agent's
/// tool list) then read it once, not once each, and each answers as it would alone. Only when that saves
/// at least `min_gain` tokens: the wait costs the prompt a step. It cannot starve: the prompts read first
/// progress every step, and once they are past the shared part there is nothing left to wait for.
pub fn waits_for_shared_read(have: usize, ahead: usize, min_gain: usize) -> bool {
    ahead >= have + min_gain.max(1)
}

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
        common_prefix_len(&self.tokens, prompt).min(prompt.len().saturating_sub(1))
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

    /// The tokens held, in position order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
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
/// continues that slot's conversation, however much longer it grew) wins, the longest such, wherever it is:
/// the request takes it at once, so no other request admitted before its prefill can take it over. A
/// shorter match — every chat prompt shares its first few tokens (`<bos><|turn>user`) with every cached
/// conversation — is not worth wrecking that slot's cache for (whatever the slot chosen below holds in common
/// with the prompt is still kept).
///
/// Otherwise the slot that splits the running sequences' ids least ([`split_cost`]): with one KV stream per
/// sequence, llama.cpp puts only consecutive sequence ids in one ubatch (`split_equal`), so a decode step over
/// sequences 0, 1, 2 is one pass over the weights while one over 0, 2, 5 is three. Among equal ones, a slot
/// inside the span of busy ones (a hole, which a later request may close), then the least recently used (an
/// empty slot first: it was never used). A running sequence that a hit put apart is moved next to the others
/// later ([`compaction_move`]). None: every slot is busy.
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
    let busy: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].busy).collect();
    let span = busy.first().zip(busy.last());
    free.into_iter().min_by_key(|&(i, _)| {
        let inside = span.is_some_and(|(&lo, &hi)| (lo..=hi).contains(&i));
        (split_cost(slots, i), !inside, slots[i].last_used)
    })
}

/// How much taking free slot `i` splits the busy slots' ids into more runs of consecutive ids: 0 when it
/// joins two runs (a one-slot hole), 1 when it extends one, 2 when it starts a run of its own.
pub fn split_cost(slots: &[CacheSlot], i: usize) -> u8 {
    let busy = |j: Option<usize>| j.and_then(|j| slots.get(j)).is_some_and(|s| s.busy);
    2 - u8::from(busy(i.checked_sub(1))) - u8::from(busy(i.checked_add(1)))
}

/// Runs of consecutive values in the sorted, deduplicated `ids`: the ubatches llama.cpp splits a decode step
/// over those sequence ids into when each sequence has its own KV stream.
pub fn id_runs(ids: &[usize]) -> usize {
    usize::from(!ids.is_empty()) + ids.windows(2).filter(|w| w[1] != w[0] + 1).count()
}

/// A move that gathers the running sequences, in slots `running`, into fewer runs of consecutive ids: `(from,
/// to)`, the slot of one of the sequences in `movable` (those that may move now: the plain decoders, not
/// one reading its prompt or nearly done) and a free slot to move it to (the engine copies its KV stream
/// there; the slot it leaves keeps the copy it had, as an idle slot's cache). Runs are counted over every
/// running sequence, not just the movable ones, so a hole that a sequence still reading its prompt fills is
/// not "closed" by a move it makes pointless. Of the moves that leave the fewest runs ([`id_runs`]), one into
/// an empty slot first (nothing is lost), then into the least recently used. None: the ids are one run
/// already, or no free slot joins them. One move a step is enough to gather a batch within a few steps,
/// and each costs one stream copy.
pub fn compaction_move(
    slots: &[CacheSlot],
    running: &[usize],
    movable: &[usize],
) -> Option<(usize, usize)> {
    let mut ids = running.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let before = id_runs(&ids);
    if before <= 1 {
        return None;
    }
    // (runs after, `to` holds a conversation, `to`'s last use) and the move.
    type Ranked = ((usize, bool, u64), (usize, usize));
    let mut best: Option<Ranked> = None;
    for &from in movable.iter().filter(|f| ids.binary_search(f).is_ok()) {
        for to in (0..slots.len()).filter(|&t| !slots[t].busy) {
            let mut after: Vec<usize> = ids.iter().copied().filter(|&i| i != from).collect();
            after.push(to);
            after.sort_unstable();
            let runs = id_runs(&after);
            if runs >= before {
                continue;
            }
            let key = (runs, !slots[to].cached.is_empty(), slots[to].last_used);
            if best.is_none_or(|(k, _)| key < k) {
                best = Some((key, (from, to)));
            }
        }
    }
    best.map(|(_, m)| m)
}

/// How a [`PrefixPool`] entry is handed out on a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A finished request's cache (its prompt and answer): moved to the request that continues it, which
    /// grows it in place and returns it longer when it ends (mlx-lm's "assistant" entries).
    Owned,
    /// A checkpoint taken part-way through a prompt, such as the end of a chat's system prompt, which
    /// many conversations share: a hit gets a copy and the entry stays (mlx-lm's "system" entries).
    Shared,
    /// A checkpoint at the end of a conversation's last user turn, which its next turn and a regenerated
    /// answer share: a hit gets a copy and the entry stays; a later turn's checkpoint of the same
    /// conversation replaces it (mlx-lm's "user" entries).
    Turn,
}

/// What [`PrefixPool::take_nearest`] hands out.
#[derive(Debug)]
pub struct Hit<C> {
    /// The entry's cache: moved out of the pool, or a copy.
    pub cache: C,
    /// Prompt tokens whose KV the cache holds once `excess` positions are dropped from its end.
    pub reused: usize,
    /// Positions the cache holds past `reused`, which the caller must drop before reading the rest of
    /// the prompt (0 for an entry whose tokens are a prefix of the prompt).
    pub excess: usize,
}

struct PoolEntry<C> {
    tokens: Vec<u32>,
    cache: C,
    bytes: u64,
    kind: EntryKind,
    last_used: u64,
}

/// A prefix cache of whole caches, for an engine whose caches are separate objects rather than slots of
/// one context (the MLX engine): mlx_lm.server's `LRUPromptCache`, written once in the core. It holds
/// finished requests' caches and shared checkpoints, each with the tokens whose KV it holds, and hands a new
/// prompt the entry that holds the longest prefix of it. Bounded in bytes (the engine says how many each
/// entry holds, and what the running requests use) and in entries; the least recently used goes first.
///
/// A hit is the entry holding the longest prefix of the prompt (short of the prompt's last token, which
/// must be read for its logits); an entry that runs on past the common part serves it only if the engine
/// can drop positions from the end of its cache, which a sliding-window cache cannot once its window has
/// filled (see [`PrefixPool::take_nearest`]).
pub struct PrefixPool<C> {
    entries: Vec<PoolEntry<C>>,
    max_entries: usize,
    clock: u64,
    hits: u64,
    lookups: u64,
}

impl<C: Clone> PrefixPool<C> {
    /// An empty pool of at most `max_entries` entries (at least 1).
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: vec![],
            max_entries: max_entries.max(1),
            clock: 0,
            hits: 0,
            lookups: 0,
        }
    }

    /// The cache whose tokens are the longest prefix of `prompt` (fewer tokens than the prompt), with how
    /// many tokens it holds: an [`EntryKind::Owned`] entry leaves the pool, a [`EntryKind::Shared`] one is
    /// copied (`C::clone`, which for MLX arrays shares the buffers until either side writes). None: no
    /// entry fits (an empty prompt never does).
    pub fn take_longest(&mut self, prompt: &[u32]) -> Option<(C, usize)> {
        self.take_nearest(prompt, |_| true, |_, _| None)
            .map(|h| (h.cache, h.reused))
    }

    /// The entry that holds the most of `prompt`'s tokens, among those whose cache `fits` (e.g. was built
    /// with the KV quantization the request asks for); mlx_lm.server's `fetch_nearest_cache`.
    ///
    /// An entry whose tokens are a prefix of the prompt (short of its last token, which must be read for
    /// its logits) is used as it is: an [`EntryKind::Owned`] entry leaves the pool, a
    /// [`EntryKind::Shared`] one is copied. An entry that runs on past where the prompt diverges from it,
    /// or past the prompt's last token (a regenerated answer, a repeated prompt, an edited last message),
    /// can serve the common part if the caller can cut its cache back: `cut(cache, keep)` is the most
    /// positions, at most `keep`, the caller can cut the cache back to (`keep` itself where it can drop
    /// positions from the end; the last rollback point before `keep` where it keeps those instead, as
    /// llama-server's sliding-window checkpoints; None: not at all). Such a hit is always a copy, the entry
    /// stays for the conversation it came from, and [`Hit::excess`] says how many positions the caller
    /// must drop. Between equal reuse, an entry needing no trim wins, then the most
    /// recently used. None: no entry shares a token with the prompt, or none of those fits.
    pub fn take_nearest(
        &mut self,
        prompt: &[u32],
        fits: impl Fn(&C) -> bool,
        cut: impl Fn(&C, usize) -> Option<usize>,
    ) -> Option<Hit<C>> {
        self.lookups += 1;
        let (i, reused, exact) = self.nearest(prompt, fits, cut)?;
        self.hits += 1;
        self.clock += 1;
        let e = &mut self.entries[i];
        e.last_used = self.clock;
        let excess = e.tokens.len() - reused;
        let cache = match (e.kind, exact) {
            (EntryKind::Owned, true) => self.entries.swap_remove(i).cache,
            _ => e.cache.clone(),
        };
        Some(Hit {
            cache,
            reused,
            excess,
        })
    }

    /// How many of `prompt`'s tokens [`PrefixPool::take_nearest`] would reuse with the same arguments,
    /// without taking anything (an engine weighing the pool against other sources first); None: no hit.
    pub fn peek_nearest(
        &self,
        prompt: &[u32],
        fits: impl Fn(&C) -> bool,
        cut: impl Fn(&C, usize) -> Option<usize>,
    ) -> Option<usize> {
        self.nearest(prompt, fits, cut).map(|(_, reused, _)| reused)
    }

    /// The best entry for `prompt`: (index, tokens reused, whether the entry is used whole).
    fn nearest(
        &self,
        prompt: &[u32],
        fits: impl Fn(&C) -> bool,
        cut: impl Fn(&C, usize) -> Option<usize>,
    ) -> Option<(usize, usize, bool)> {
        let limit = prompt.len().saturating_sub(1);
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let reused = common_prefix_len(&e.tokens, prompt).min(limit);
                if reused == 0 || !fits(&e.cache) {
                    return None;
                }
                let exact = reused == e.tokens.len();
                let reused = if exact {
                    reused
                } else {
                    cut(&e.cache, reused).filter(|&n| n > 0 && n <= reused)?
                };
                Some((i, reused, exact, e.last_used))
            })
            .max_by_key(|&(_, reused, exact, used)| (reused, exact, used))
            .map(|(i, reused, exact, _)| (i, reused, exact))
    }

    /// Keeps `cache`, which holds the KV of `tokens` in `bytes` bytes. An entry for the same tokens is
    /// replaced, except that a checkpoint is never replaced by an owned entry (a request that started
    /// from a checkpoint and ended before adding anything hands back what the checkpoint holds: the
    /// checkpoint stays); a shared entry for a prefix of an owned one stays (other conversations start
    /// from it); a turn checkpoint replaces the turn checkpoints for a prefix of it (the same
    /// conversation's earlier turns: without that a conversation of K turns would hold K copies of its
    /// history). Beyond `max_entries` an entry is evicted (see [`PrefixPool::evict_to`]).
    pub fn insert(&mut self, tokens: Vec<u32>, cache: C, bytes: u64, kind: EntryKind) {
        if tokens.is_empty()
            || (kind == EntryKind::Owned
                && self
                    .entries
                    .iter()
                    .any(|e| e.kind != EntryKind::Owned && e.tokens == tokens))
        {
            return;
        }
        self.entries.retain(|e| {
            e.tokens != tokens
                && !(kind == EntryKind::Turn
                    && e.kind == EntryKind::Turn
                    && tokens.starts_with(&e.tokens))
        });
        self.clock += 1;
        self.entries.push(PoolEntry {
            tokens,
            cache,
            bytes,
            kind,
            last_used: self.clock,
        });
        while self.entries.len() > self.max_entries {
            self.evict_one();
        }
    }

    /// Evicts entries until the pool holds at most `budget` bytes; returns how many went. Each goes by
    /// mlx-lm's `CacheOrder`: the kinds in the order owned, turn, shared; the first kind that has entries
    /// and at least as many as the next kind gives up its least recently used one, else the last kind
    /// does. So a busy stream of conversations pushes out finished turns before the system-prompt
    /// checkpoints they all start from.
    pub fn evict_to(&mut self, budget: u64) -> usize {
        let mut n = 0;
        while self.bytes() > budget && self.evict_one() {
            n += 1;
        }
        n
    }

    fn evict_one(&mut self) -> bool {
        const ORDER: [EntryKind; 3] = [EntryKind::Owned, EntryKind::Turn, EntryKind::Shared];
        let count = |k: EntryKind| self.entries.iter().filter(|e| e.kind == k).count();
        let kind = ORDER
            .windows(2)
            .find(|w| count(w[0]) > 0 && count(w[0]) >= count(w[1]))
            .map_or(EntryKind::Shared, |w| w[0]);
        let Some(i) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.kind == kind)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(i, _)| i)
        else {
            return false;
        };
        self.entries.swap_remove(i);
        true
    }

    /// Bytes held by all entries.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the pool holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops every entry (the model was unloaded).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// (lookups that found an entry, lookups).
    pub fn hit_counts(&self) -> (u64, u64) {
        (self.hits, self.lookups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_waits_only_for_a_shared_read_worth_a_step() {
        assert_eq!(common_prefix_len(&[1, 2, 3, 4], &[1, 2, 9]), 2);
        assert_eq!(common_prefix_len::<u32>(&[], &[1]), 0);
        assert_eq!(common_prefix_len(&[5, 6], &[5, 6, 7]), 2);
        // 40 shared tokens ahead, 8 cached now: waiting saves 32.
        assert!(waits_for_shared_read(8, 40, 32));
        assert!(!waits_for_shared_read(9, 40, 32));
        // Nothing ahead, or nothing more than it has: never waits, whatever the threshold.
        assert!(!waits_for_shared_read(0, 0, 0));
        assert!(!waits_for_shared_read(12, 12, 0));
        assert!(waits_for_shared_read(12, 13, 0));
    }

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
    fn a_prefix_hit_wins_then_the_slot_that_splits_the_batch_least() {
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
        // Busy 0 and 3, no hit: a slot beside a busy one (1, 2 or 4), inside the span first (the holes 1
        // and 2), the older of them; with slot 1 taken too, 2 closes the hole.
        let mut s = slots(&[true, false, false, true, false], &[0, 8, 3, 0, 1]);
        assert_eq!(choose_slot(&s, 40, |_, _| 0), Some((2, 0)));
        s[1].busy = true;
        s[2].last_used = 9;
        assert_eq!(choose_slot(&s, 40, |_, _| 0), Some((2, 0)));
        // A hit still wins wherever it is (a running sequence is moved next to the others later).
        assert_eq!(
            choose_slot(&s, 40, |i, _| if i == 4 { 39 } else { 0 }),
            Some((4, 39))
        );
        // Every slot busy: none.
        let s = slots(&[true; 3], &[0; 3]);
        assert_eq!(choose_slot(&s, 40, |_, _| 0), None);
    }

    #[test]
    fn compaction_gathers_the_decoding_slots_into_one_run() {
        assert_eq!(id_runs(&[]), 0);
        assert_eq!(id_runs(&[3]), 1);
        assert_eq!(id_runs(&[0, 1, 2]), 1);
        assert_eq!(id_runs(&[0, 2, 5, 7]), 4);
        // 0, 1 and 5 decode; 2 holds a conversation, 3 is empty: 5 moves into the hole at 2 (one run),
        // not into the empty 3 (still two).
        let mut s = slots(
            &[true, true, false, false, false, true],
            &[1, 2, 3, 0, 9, 4],
        );
        s[2].cached.extend(0..10);
        s[4].cached.extend(0..10);
        let all = |s: &[CacheSlot], ids: &[usize]| compaction_move(s, ids, ids);
        assert_eq!(all(&s, &[0, 1, 5]), Some((5, 2)));
        // Only 5 may move, as above; only 0 may move (5 is nearly done): no move of 0 makes fewer runs.
        assert_eq!(compaction_move(&s, &[0, 1, 5], &[5]), Some((5, 2)));
        assert_eq!(compaction_move(&s, &[0, 1, 5], &[0]), None);
        // Nothing may move.
        assert_eq!(compaction_move(&s, &[0, 1, 5], &[]), None);
        // 0 and 5 decode: 5 into 1 or 0 into 4 both make one run; the empty slot wins over the older one.
        s[1].busy = false;
        s[1].cached.extend(0..10);
        s[4].cached = PrefixSlot::new();
        assert_eq!(compaction_move(&s, &[0, 5], &[0, 5]), Some((0, 4)));
        // Two slots both holding conversations: the least recently used is taken.
        s[4].cached.extend(0..10);
        s[4].last_used = 0;
        assert_eq!(compaction_move(&s, &[0, 5], &[0, 5]), Some((0, 4)));
        s[4].last_used = 9;
        assert_eq!(compaction_move(&s, &[0, 5], &[0, 5]), Some((5, 1)));
        // 0 and 5 decode while 1 to 4 read prompts, 6 is free: the batch is one run already, nothing
        // moves; counted over the decoders alone, 0 would move to 6 and split the batch once the readers
        // decode.
        let mut busy = slots(&[true, true, true, true, true, true, false], &[0; 7]);
        assert_eq!(compaction_move(&busy, &[0, 1, 2, 3, 4, 5], &[0, 5]), None);
        assert_eq!(compaction_move(&busy, &[0, 5], &[0, 5]), Some((0, 6)));
        // 0 and 5 decode, 2 and 3 free, 1 and 4 busy outside the batch, 6 busy: 0 to 2 or 3 leaves two
        // runs, as now; nothing is gained.
        busy[2].busy = false;
        busy[3].busy = false;
        busy[6].busy = true;
        assert_eq!(compaction_move(&busy, &[0, 5], &[0, 5]), None);
        // One run already, or nothing free beside them: no move.
        s[1].busy = true;
        s[2].busy = true;
        s[3].busy = true;
        s[4].busy = true;
        assert_eq!(all(&s, &[0, 1, 5]), None);
        assert_eq!(all(&s, &[0, 1]), None);
        let full = slots(&[true, true, true], &[0; 3]);
        assert_eq!(compaction_move(&full, &[0, 2], &[0, 2]), None);
        // A lone sequence needs no company.
        assert_eq!(all(&s, &[5]), None);
    }

    #[test]
    fn the_pool_hands_out_the_longest_prefix_moves_owned_and_copies_shared() {
        let mut p: PrefixPool<&'static str> = PrefixPool::new(8);
        p.insert(vec![1, 2], "system", 10, EntryKind::Shared);
        p.insert(vec![1, 2, 3, 4], "chat a", 20, EntryKind::Owned);
        p.insert(vec![1, 9], "other", 5, EntryKind::Owned);
        assert_eq!(p.take_longest(&[1, 2, 3, 4, 5]), Some(("chat a", 4)));
        assert_eq!(p.len(), 2, "an owned entry leaves the pool");
        assert_eq!(p.take_longest(&[1, 2, 7]), Some(("system", 2)));
        assert_eq!(
            p.take_longest(&[1, 2, 8]),
            Some(("system", 2)),
            "shared stays"
        );
        assert_eq!(
            p.take_longest(&[1, 2]),
            None,
            "the last prompt token is always read"
        );
        assert_eq!(p.take_longest(&[5, 6, 7]), None);
        assert_eq!(p.take_longest(&[]), None);
        assert_eq!(p.hit_counts(), (3, 6));
    }

    #[test]
    fn a_shared_checkpoint_is_not_replaced_by_an_owned_copy_and_outlives_busy_turns() {
        let mut p: PrefixPool<&'static str> = PrefixPool::new(8);
        p.insert(vec![1, 2], "system", 10, EntryKind::Shared);
        // A request started from it and ended before adding a token.
        p.insert(vec![1, 2], "handed back", 10, EntryKind::Owned);
        assert_eq!(p.take_longest(&[1, 2, 3]), Some(("system", 2)));
        assert_eq!(p.len(), 1, "still shared");
        // Many finished turns, all more recent than the checkpoint: they go first.
        for k in 0..4u32 {
            p.insert(vec![1, 2, 10 + k], "turn", 10, EntryKind::Owned);
        }
        p.take_longest(&[9]);
        assert_eq!(p.evict_to(20), 3);
        assert_eq!(p.take_longest(&[1, 2, 3]), Some(("system", 2)));
        assert_eq!(
            p.take_nearest(&[1, 2, 13, 0], |c| *c != "turn", |_, _| None)
                .map(|h| (h.cache, h.reused)),
            Some(("system", 2))
        );
        assert_eq!(p.take_longest(&[1, 2, 13, 0]), Some(("turn", 3)));
    }

    #[test]
    fn an_entry_running_past_the_prompt_serves_the_common_part_as_a_trimmed_copy() {
        let mut p: PrefixPool<&str> = PrefixPool::new(4);
        p.insert(vec![1, 2, 3, 4, 5], "turn", 10, EntryKind::Owned);
        // Without trimming, a repeated prompt finds nothing.
        assert!(p.take_nearest(&[1, 2, 3], |_| true, |_, _| None).is_none());
        // A repeated prompt: all but its last token, and the entry stays for its conversation.
        let h = p
            .take_nearest(&[1, 2, 3], |_| true, |_, keep| Some(keep))
            .unwrap();
        assert_eq!((h.cache, h.reused, h.excess), ("turn", 2, 3));
        assert_eq!(p.len(), 1);
        // An edited message: the part before the edit.
        let h = p.take_nearest(&[1, 2, 3, 9, 9, 9], |_| true, |_, keep| Some(keep));
        assert_eq!(h.map(|h| (h.reused, h.excess)), Some((3, 2)));
        // The engine decides how far back it can cut.
        let h = p.take_nearest(
            &[1, 2, 3, 9, 9],
            |_| true,
            |_, keep| (keep < 3).then_some(keep),
        );
        assert!(h.is_none());
        // Or back to a rollback point short of the common part (the rest is read again).
        let h = p.take_nearest(&[1, 2, 3, 9, 9], |_| true, |_, keep| Some(keep.min(2)));
        assert_eq!(h.map(|h| (h.reused, h.excess)), Some((2, 3)));
        // A shared checkpoint that holds as much needs no trim and wins; a longer trimmed reuse beats it.
        p.insert(vec![1, 2], "system", 10, EntryKind::Shared);
        let h = p
            .take_nearest(&[1, 2, 7, 7], |_| true, |_, keep| Some(keep))
            .unwrap();
        assert_eq!((h.cache, h.reused, h.excess), ("system", 2, 0));
        let h = p
            .take_nearest(&[1, 2, 3, 4, 7], |_| true, |_, keep| Some(keep))
            .unwrap();
        assert_eq!((h.cache, h.reused, h.excess), ("turn", 4, 1));
        // A peek says what a take would reuse, and takes nothing.
        let peeked = p.peek_nearest(&[1, 2, 3, 4, 5, 6], |_| true, |_, keep| Some(keep));
        assert_eq!((peeked, p.len()), (Some(5), 2));
        assert_eq!(
            p.peek_nearest(&[9, 9], |_| true, |_, keep| Some(keep)),
            None
        );
        // A continuation still moves the owned entry out, untrimmed.
        let h = p
            .take_nearest(&[1, 2, 3, 4, 5, 6], |_| true, |_, keep| Some(keep))
            .unwrap();
        assert_eq!((h.cache, h.reused, h.excess), ("turn", 5, 0));
        assert_eq!(p.len(), 1);
        assert_eq!(p.hit_counts(), (6, 8));
    }

    #[test]
    fn a_turn_checkpoint_replaces_its_earlier_turns_and_goes_before_system_checkpoints() {
        let mut p: PrefixPool<&str> = PrefixPool::new(8);
        p.insert(vec![1, 2], "system", 10, EntryKind::Shared);
        p.insert(vec![1, 2, 3], "turn 1", 10, EntryKind::Turn);
        // The next turn's checkpoint supersedes the first's; the system checkpoint stays.
        p.insert(vec![1, 2, 3, 4, 5], "turn 2", 10, EntryKind::Turn);
        assert_eq!(p.len(), 2);
        // A regenerated answer gets a copy, and the checkpoint stays.
        let h = p.take_nearest(&[1, 2, 3, 4, 5, 6], |_| true, |_, _| None);
        assert_eq!(h.map(|h| (h.cache, h.reused)), Some(("turn 2", 5)));
        assert_eq!(p.len(), 2);
        // An owned entry for the same tokens does not replace it.
        p.insert(vec![1, 2, 3, 4, 5], "handed back", 10, EntryKind::Owned);
        assert_eq!(p.take_longest(&[1, 2, 3, 4, 5, 6]), Some(("turn 2", 5)));
        // Another conversation's turn stays; over budget, turns go before the system checkpoint.
        p.insert(vec![1, 2, 7], "other turn", 10, EntryKind::Turn);
        assert_eq!(p.evict_to(10), 2);
        assert_eq!(p.take_longest(&[1, 2, 9]), Some(("system", 2)));
    }

    #[test]
    fn the_pool_evicts_least_recently_used_under_its_byte_and_entry_bounds() {
        let mut p: PrefixPool<u32> = PrefixPool::new(3);
        p.insert(vec![1], 1, 100, EntryKind::Owned);
        p.insert(vec![2], 2, 100, EntryKind::Shared);
        p.insert(vec![3], 3, 100, EntryKind::Owned);
        // Using entry 2 makes entry 1 the least recently used.
        assert_eq!(p.take_longest(&[2, 0]), Some((2, 1)));
        p.insert(vec![4], 4, 100, EntryKind::Owned);
        assert_eq!(p.len(), 3);
        assert_eq!(p.take_longest(&[1, 0]), None, "entry 1 was evicted");
        assert_eq!(p.bytes(), 300);
        assert_eq!(p.evict_to(150), 2);
        assert_eq!(p.bytes(), 100);
        // Owned entries were at least as many as shared ones: they went first.
        assert_eq!(p.take_longest(&[4, 0]), None);
        assert_eq!(
            p.take_longest(&[2, 0]),
            Some((2, 1)),
            "the shared entry stays"
        );
        // The same tokens again replace the entry rather than adding one.
        p.insert(vec![2], 22, 50, EntryKind::Shared);
        p.insert(vec![2], 23, 60, EntryKind::Shared);
        assert_eq!(p.len(), 1);
        assert_eq!(p.bytes(), 60);
        p.clear();
        assert!(p.is_empty());
        assert_eq!(p.evict_to(0), 0);
    }
}
