//! Stop strings over a token stream: text that might be the start of a stop string is held back until it
//! is known not to be, and the answer is cut at the first complete one (OpenAI's `stop`). Shared by every
//! engine so that all tiers cut identically.

/// Holds back text that might be the start of a stop string, and cuts at a complete one.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    matched: Option<String>,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            matched: None,
        }
    }

    /// Returns (text safe to emit, whether a stop string was hit).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_string(), false);
        }
        self.held.push_str(text);
        // The stop string that starts first (the longest where several start at once).
        if let Some((pos, stop)) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|p| (p, s)))
            .min_by_key(|&(p, s)| (p, std::cmp::Reverse(s.len())))
        {
            self.matched = Some(stop.clone());
            let out = self.held[..pos].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.held.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// What is still held back (the stream ended without a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The stop string that ended the text, once one has (Anthropic's `stop_sequence`).
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    #[test]
    fn stop_strings_across_pieces() {
        let mut m = StopMatcher::new(&["END".into(), "\n\n".into(), String::new()]);
        let mut out = String::new();
        let mut hit = false;
        for p in ["Hello E", "N", "o", " wor", "ld\n", "\nmore"] {
            let (t, h) = m.push(p);
            out.push_str(&t);
            if h {
                hit = true;
                break;
            }
        }
        assert!(hit);
        assert_eq!(out, "Hello ENo world");
    }

    #[test]
    fn held_text_is_released_at_the_end() {
        let mut m = StopMatcher::new(&["STOP".into()]);
        assert_eq!(m.push("a ST").0, "a ");
        assert_eq!(m.finish(), "ST");
        let mut none = StopMatcher::new(&[]);
        assert_eq!(none.push("x").0, "x");
    }
}
