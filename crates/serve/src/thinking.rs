//! A thinking budget: the most tokens an answer may spend thinking (vLLM's `thinking_token_budget`,
//! Anthropic's `thinking.budget_tokens`), enforced the way vLLM's thinking-budget logits processor and
//! llama.cpp's `--reasoning-budget` do: once a thought holds the budget's tokens, the next token is forced
//! to the thought's closing marker, so the model goes on to answer. Both engines keep one
//! [`ThinkingBudget`] per sequence, feed it every generated token, and ask it before each step whether the
//! step's token is forced.

/// The token ids a thought opens and closes with (Gemma 4: `<|channel>` and `<channel|>`; the opener is
/// followed by the channel's name, `thought`, which counts as thinking).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThoughtMarkers {
    /// The token that opens a thought.
    pub open: u32,
    /// The token that closes it.
    pub close: u32,
}

/// Gemma 4's thought markers, as token texts.
pub const GEMMA4_THOUGHT_MARKERS: (&str, &str) = ("<|channel>", "<channel|>");

/// One answer's thinking budget: how many tokens its thoughts hold so far, and whether the next token must
/// close the open thought. The budget is the answer's, across its thoughts, as Anthropic's `budget_tokens`
/// is (vLLM's processor counts each thought afresh; Gemma 4 thinks once per answer, where the two agree):
/// a thought opened after the budget is spent closes at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinkingBudget {
    markers: ThoughtMarkers,
    budget: usize,
    inside: bool,
    used: usize,
}

impl ThinkingBudget {
    /// A budget of `budget` tokens across the answer's thoughts (the markers themselves not counted), for a
    /// model whose thoughts open and close with `markers`.
    pub fn new(budget: usize, markers: ThoughtMarkers) -> Self {
        Self {
            markers,
            budget,
            inside: false,
            used: 0,
        }
    }

    /// Reads the prompt the answer follows: a prompt that ends inside a thought (an answer being
    /// continued, after a mid-stream fallback or from an assistant prefill) has spent the tokens after its
    /// last opener, as vLLM's processor reads a prompt. A closed thought (the history's, or the empty one
    /// a template writes when thinking is off) spends nothing.
    pub fn read_prompt(&mut self, prompt: &[u32]) {
        let open = prompt.iter().rposition(|&t| t == self.markers.open);
        let close = prompt.iter().rposition(|&t| t == self.markers.close);
        if let Some(o) = open
            && close.is_none_or(|c| c < o)
        {
            self.inside = true;
            self.used = prompt.len() - o - 1;
        }
    }

    /// The token the next step must produce: the closing marker when a thought is open and the budget is
    /// spent; None otherwise.
    pub fn forced(&self) -> Option<u32> {
        (self.inside && self.used >= self.budget).then_some(self.markers.close)
    }

    /// Accounts for one generated `token`, in order.
    pub fn push(&mut self, token: u32) {
        if !self.inside && token == self.markers.open {
            self.inside = true;
        } else if self.inside && token == self.markers.close {
            self.inside = false;
        } else if self.inside {
            self.used += 1;
        }
    }

    /// Tokens spent thinking so far (markers not counted).
    pub fn used(&self) -> usize {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: ThoughtMarkers = ThoughtMarkers { open: 1, close: 2 };

    #[test]
    fn a_thought_is_closed_once_it_holds_the_budget() {
        let mut b = ThinkingBudget::new(3, M);
        assert_eq!(b.forced(), None);
        for t in [7, 1, 8, 9] {
            b.push(t);
            assert_eq!(b.forced(), None, "free before the budget is spent");
        }
        b.push(10);
        assert_eq!(b.forced(), Some(2));
        b.push(2);
        assert_eq!(
            (b.forced(), b.used()),
            (None, 3),
            "the answer after the thought is free"
        );
        b.push(1);
        assert_eq!(b.forced(), Some(2), "a later thought closes at once");
        // A thought the model closes itself within the budget.
        let mut b = ThinkingBudget::new(5, M);
        for t in [1, 8, 2, 9, 9, 9] {
            b.push(t);
        }
        assert_eq!((b.forced(), b.used()), (None, 1));
        // Budget 0: an opened thought closes at once.
        let mut b = ThinkingBudget::new(0, M);
        b.push(1);
        assert_eq!(b.forced(), Some(2));
    }

    #[test]
    fn a_prompt_that_ends_inside_a_thought_has_spent_it() {
        let mut b = ThinkingBudget::new(3, M);
        b.read_prompt(&[5, 1, 8, 2, 6, 1, 8, 9]);
        assert_eq!((b.used(), b.forced()), (2, None));
        b.push(9);
        assert_eq!(b.forced(), Some(2));
        let mut b = ThinkingBudget::new(3, M);
        b.read_prompt(&[5, 1, 8, 9, 9, 2, 6]);
        assert_eq!(
            (b.used(), b.forced()),
            (0, None),
            "a closed thought spends nothing"
        );
    }
}
