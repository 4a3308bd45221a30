//! Streaming output: an incremental detokenizer that only emits whole UTF-8 characters, and a
//! stop-string filter that never emits text that might still turn into a stop string.

use std::sync::Arc;

use super::Tokenizer;

/// Incremental detokenizer. Owns an `Arc<Tokenizer>` so it can live next to the tokenizer in a
/// long-running sequence state.
///
/// Bytes of a character split across tokens are held back until the character is complete; bytes
/// that can never form a valid character become U+FFFD right away. Unlike
/// [`Tokenizer::decode`], no leading space is stripped: streamed text continues a prompt.
pub struct StreamDecoder {
    tok: Arc<Tokenizer>,
    skip_special: bool,
    pending: Vec<u8>,
}

impl std::fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("skip_special", &self.skip_special)
            .field("pending", &self.pending)
            .finish()
    }
}

impl StreamDecoder {
    /// `skip_special` drops control and unknown tokens, as in [`Tokenizer::decode`].
    pub fn new(tok: Arc<Tokenizer>, skip_special: bool) -> Self {
        StreamDecoder { tok, skip_special, pending: Vec::new() }
    }

    /// Feeds one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        if !(self.skip_special && self.tok.is_skippable(id)) {
            self.pending.extend_from_slice(self.tok.token_bytes(id));
        }
        self.drain_complete()
    }

    /// Flushes held-back bytes at the end of generation; an incomplete trailing character
    /// becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    fn drain_complete(&mut self) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, tail) = rest.split_at(e.valid_up_to());
                    // `valid` is UTF-8 by construction.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        // An invalid sequence: no later byte can fix it.
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &tail[n..];
                        }
                        // A character cut off at the end: wait for more bytes.
                        None => {
                            rest = tail;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let start = self.pending.len() - keep;
        self.pending.drain(..start);
        out
    }
}

/// Holds back streamed text while it could still be the start of a stop string.
#[derive(Debug, Clone)]
pub struct StopFilter {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopFilter {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        StopFilter { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new(), stopped: false }
    }

    /// Returns (text safe to emit now, stopped). When a stop string completes, the text before it
    /// is emitted and `stopped` is true; the stop string and anything after it are dropped, and
    /// later pushes return `("", true)`.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.held.push_str(text);
        // Earliest stop occurrence wins; among those starting at the same place, any is fine
        // since everything from there on is dropped.
        if let Some(pos) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            self.held.truncate(pos);
            self.stopped = true;
            return (std::mem::take(&mut self.held), true);
        }
        let keep = self.longest_partial_suffix();
        let emit_to = self.held.len() - keep;
        let rest = self.held.split_off(emit_to);
        (std::mem::replace(&mut self.held, rest), false)
    }

    /// Flushes held-back text at the end of generation (no stop matched).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop string.
    /// Such a suffix always starts on a character boundary, because stop strings start with one.
    fn longest_partial_suffix(&self) -> usize {
        let h = self.held.as_bytes();
        self.stops
            .iter()
            .map(|stop| {
                let s = stop.as_bytes();
                (1..s.len().min(h.len() + 1)).rev().find(|&n| h.ends_with(&s[..n])).unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(filter: &mut StopFilter, pushes: &[&str]) -> (String, bool) {
        let mut out = String::new();
        for p in pushes {
            let (t, stopped) = filter.push(p);
            out.push_str(&t);
            if stopped {
                return (out, true);
            }
        }
        (out, false)
    }

    #[test]
    fn stop_split_across_pushes_is_never_leaked() {
        let mut f = StopFilter::new(vec!["<|im_end|>".into()]);
        assert_eq!(f.push("Hello <|im"), ("Hello ".to_string(), false));
        assert_eq!(f.push("_en"), (String::new(), false));
        assert_eq!(f.push("d|> trailing"), (String::new(), true));
        assert_eq!(f.push("more"), (String::new(), true));
    }

    #[test]
    fn false_starts_are_released() {
        let mut f = StopFilter::new(vec!["STOP".into(), "".into()]);
        assert_eq!(run(&mut f, &["a ST", "OP"]), ("a ".to_string(), true));
        let mut f = StopFilter::new(vec!["STOP".into()]);
        assert_eq!(f.push("a ST"), ("a ".to_string(), false));
        assert_eq!(f.push("ART"), ("START".to_string(), false));
        assert_eq!(f.push("ST"), (String::new(), false));
        assert_eq!(f.finish(), "ST");
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_is_safe() {
        let mut f = StopFilter::new(vec!["bc".into(), "ab".into(), "é!".into()]);
        assert_eq!(run(&mut f, &["xabc"]), ("x".to_string(), true));
        let mut f = StopFilter::new(vec!["é!".into()]);
        assert_eq!(f.push("caf\u{e9}"), ("caf".to_string(), false));
        assert_eq!(f.push("?"), ("é?".to_string(), false));
    }

    #[test]
    fn no_stops_passes_everything() {
        let mut f = StopFilter::new(Vec::new());
        assert_eq!(f.push("abc"), ("abc".to_string(), false));
        assert_eq!(f.finish(), "");
    }
}
