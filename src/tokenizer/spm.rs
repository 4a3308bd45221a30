//! SentencePiece-style ("llama") tokenization, reproducing llama.cpp's `llm_tokenizer_spm`:
//! start from single UTF-8 characters and keep merging the adjacent pair whose concatenation is a
//! vocabulary token with the highest score (ties: leftmost); symbols that never became tokens are
//! emitted as byte-fallback tokens.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::vocab::Vocab;

/// U+2581, SentencePiece's visible space.
pub(crate) const SPACE_MARK: char = '\u{2581}';

pub(crate) struct Spm {
    scores: Vec<f32>,
    /// Token for each byte value: `<0xAB>` if present, else the one-byte text itself.
    byte_tokens: Vec<Option<u32>>,
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of symbols `left` and `left`'s successor.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged text, to detect candidates made stale by other merges.
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

impl Spm {
    pub fn new(vocab: &Vocab, scores: Vec<f32>) -> Self {
        let byte_tokens = (0..=255u8)
            .map(|b| {
                vocab.id(&format!("<0x{b:02X}>")).or_else(|| {
                    // Some vocabularies store plain ASCII bytes as themselves.
                    std::str::from_utf8(&[b]).ok().and_then(|s| vocab.id(s))
                })
            })
            .collect();
        Spm { scores, byte_tokens }
    }

    /// Tokenizes one raw-text fragment. `text` must already have spaces escaped to U+2581.
    pub fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, ch) in text.char_indices() {
            let idx = symbols.len();
            symbols.push(Symbol {
                start,
                len: ch.len_utf8(),
                prev: idx.checked_sub(1),
                next: if start + ch.len_utf8() < text.len() { Some(idx + 1) } else { None },
            });
        }
        if symbols.is_empty() {
            return;
        }

        let mut queue = BinaryHeap::new();
        for i in 1..symbols.len() {
            self.push_bigram(vocab, text, &symbols, i - 1, i, &mut queue);
        }

        while let Some(bigram) = queue.pop() {
            let (l, r) = (symbols[bigram.left], symbols[bigram.right]);
            // Skip candidates whose symbols changed since they were queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != bigram.size {
                continue;
            }
            symbols[bigram.left].len += r.len;
            symbols[bigram.right].len = 0;
            symbols[bigram.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(bigram.left);
            }
            if let Some(p) = l.prev {
                self.push_bigram(vocab, text, &symbols, p, bigram.left, &mut queue);
            }
            if let Some(n) = r.next {
                self.push_bigram(vocab, text, &symbols, bigram.left, n, &mut queue);
            }
        }

        // Every merged symbol is a token by construction; only single characters can be missing.
        let mut cur = Some(0);
        while let Some(i) = cur {
            let sym = symbols[i];
            let piece = &text[sym.start..sym.start + sym.len];
            match vocab.id(piece) {
                Some(id) => out.push(id),
                None => {
                    // llama.cpp throws when a byte token is missing; we skip the byte instead.
                    out.extend(piece.bytes().filter_map(|b| self.byte_tokens[b as usize]));
                }
            }
            cur = sym.next;
        }
    }

    fn push_bigram(
        &self,
        vocab: &Vocab,
        text: &str,
        symbols: &[Symbol],
        left: usize,
        right: usize,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let (l, r) = (symbols[left], symbols[right]);
        let size = l.len + r.len;
        let Some(id) = vocab.id(&text[l.start..l.start + size]) else { return };
        let Some(&score) = self.scores.get(id as usize) else { return };
        queue.push(Bigram { score, left, right, size });
    }
}

/// SentencePiece's whitespace escaping.
pub(crate) fn escape_whitespace(text: &str) -> String {
    text.replace(' ', "\u{2581}")
}

/// Bytes of a `<0xAB>` byte-fallback token text.
pub(crate) fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::super::vocab::{TokenType, Vocab};
    use super::*;

    fn setup(entries: &[(&str, f32)]) -> (Vocab, Spm) {
        let mut texts: Vec<String> = entries.iter().map(|(t, _)| t.to_string()).collect();
        let mut scores: Vec<f32> = entries.iter().map(|(_, s)| *s).collect();
        let mut types = vec![TokenType::Normal; texts.len()];
        for b in 0..=255u8 {
            texts.push(format!("<0x{b:02X}>"));
            scores.push(0.0);
            types.push(TokenType::Byte);
        }
        let vocab = Vocab::new(texts, types, |t, _| t.as_bytes().to_vec()).unwrap();
        let spm = Spm::new(&vocab, scores);
        (vocab, spm)
    }

    fn encode(vocab: &Vocab, spm: &Spm, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        spm.encode(vocab, &escape_whitespace(text), &mut out);
        out
    }

    #[test]
    fn merges_highest_score_first() {
        // "abc": "ab" (-1) beats "bc" (-2), then "abc" is not in the vocab.
        let (v, s) = setup(&[("a", -5.0), ("b", -5.0), ("c", -5.0), ("ab", -1.0), ("bc", -2.0)]);
        assert_eq!(encode(&v, &s, "abc"), vec![3, 2]);
        // With "bc" scoring higher the other pair wins.
        let (v, s) = setup(&[("a", -5.0), ("b", -5.0), ("c", -5.0), ("ab", -3.0), ("bc", -2.0)]);
        assert_eq!(encode(&v, &s, "abc"), vec![0, 4]);
    }

    #[test]
    fn ties_go_to_the_leftmost_pair() {
        let (v, s) = setup(&[("a", -5.0), ("aa", -1.0)]);
        assert_eq!(encode(&v, &s, "aaa"), vec![1, 0]);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes() {
        let (v, s) = setup(&[("\u{2581}", -1.0), ("x", -1.0)]);
        let ids = encode(&v, &s, "x é");
        // 'é' is U+00E9 = C3 A9; byte tokens start at id 2.
        assert_eq!(ids, vec![1, 0, 2 + 0xC3, 2 + 0xA9]);
    }

    #[test]
    fn byte_token_text_parses() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0xff>"), Some(255));
        assert_eq!(parse_byte_token("<0x0A"), None);
        assert_eq!(parse_byte_token("<0x123>"), None);
    }
}
