//! Stop strings: generation ends at the first occurrence, which is never emitted. While
//! streaming, text that could be the beginning of a stop string is held back until the next
//! tokens show whether it is one.

#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet emitted. Any stop string that will ever match starts in it:
    /// whatever was emitted had no stop-string prefix left at its end.
    pending: String,
}

/// What one piece of new text releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// A stop string matched; `text` ends right before it.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
        }
    }

    /// Adds text. With `check` false (before `min_tokens`) stop strings do not end the
    /// generation, but possible prefixes are still held back.
    pub fn push(&mut self, text: &str, check: bool) -> Released {
        self.pending.push_str(text);
        if check {
            let first = self
                .stops
                .iter()
                .filter_map(|s| self.pending.find(s.as_str()))
                .min();
            if let Some(at) = first {
                let text = self.pending[..at].to_string();
                self.pending.clear();
                return Released {
                    text,
                    stopped: true,
                };
            }
        }
        let keep = self.held_suffix();
        let emit = self.pending.len() - keep;
        let text = self.pending[..emit].to_string();
        self.pending.drain(..emit);
        Released {
            text,
            stopped: false,
        }
    }

    /// The held-back text, released because generation ended for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn held_suffix(&self) -> usize {
        let p = &self.pending;
        self.stops
            .iter()
            .filter_map(|s| {
                (1..s.len().min(p.len() + 1))
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && p.ends_with(&s[..k]))
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p, true);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_string_split_across_pieces_is_never_emitted() {
        assert_eq!(
            feed(&["END"], &["abc E", "N", "D tail"]),
            ("abc ".into(), true)
        );
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(
            m.push("abc EN", true).text,
            "abc ",
            "possible prefix held back"
        );
        assert_eq!(
            m.push("x", true).text,
            "ENx",
            "released once it cannot match"
        );
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(feed(&["yz", "b"], &["abcxyz"]), ("a".into(), true));
    }

    #[test]
    fn no_stop_flushes_everything() {
        assert_eq!(feed(&["zz"], &["az", "b", "z"]), ("azbz".into(), false));
    }

    #[test]
    fn unchecked_text_is_held_but_does_not_stop() {
        let mut m = StopMatcher::new(vec!["ab".into()]);
        let r = m.push("xab", false);
        assert!(!r.stopped);
        assert_eq!(r.text, "xab");
        assert_eq!(m.push("a", false).text, "");
        assert!(m.push("b", true).stopped);
    }

    #[test]
    fn multibyte_stop_prefixes_respect_char_boundaries() {
        assert_eq!(feed(&["é!"], &["café", "!"]), ("caf".into(), true));
    }
}
