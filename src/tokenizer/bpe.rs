//! Byte-level BPE ("gpt2" in GGUF), reproducing llama.cpp's `llm_tokenizer_bpe`: split the text
//! with the model's pre-tokenizer regexes, map each word's bytes to GPT-2's printable alphabet,
//! then repeatedly apply the lowest-ranked merge (ties: leftmost).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use fancy_regex::Regex;

use super::vocab::Vocab;
use super::TokenizerError;

// The regexes below are the ones llama.cpp uses for each pre-tokenizer family.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const SINGLE_DIGITS: &str = r"\p{N}";
// llama.cpp's fallback for "default" (and for GGUFs without tokenizer.ggml.pre).
const DEFAULT_PUNCT: &str = r"[\p{P}\$\+<=>\^~\|]+";
const DEFAULT_NUMBERS: &str = r"\p{N}+";
const DEFAULT_TRIPLES: &str = r"[0-9][0-9][0-9]";

/// How a `tokenizer.ggml.pre` value configures the BPE tokenizer.
pub(crate) struct PreConfig {
    pub regexes: &'static [&'static str],
    /// Llama-3 style: a word that is itself a token is emitted whole, without merging.
    pub ignore_merges: bool,
    /// Default for `add_bos` when the GGUF does not say.
    pub add_bos: bool,
}

/// Looks up a pre-tokenizer name; `None` means unsupported.
pub(crate) fn pre_config(name: Option<&str>) -> Option<PreConfig> {
    let cfg = |regexes, ignore_merges, add_bos| Some(PreConfig { regexes, ignore_merges, add_bos });
    match name.unwrap_or("default") {
        "default" => cfg(&[DEFAULT_PUNCT, GPT2, DEFAULT_NUMBERS, DEFAULT_TRIPLES], false, false),
        "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" => cfg(&[GPT2], false, false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            cfg(&[SINGLE_DIGITS, GPT2], false, false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => cfg(&[LLAMA3], true, true),
        "dbrx" | "smaug-bpe" => cfg(&[LLAMA3], false, false),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" => cfg(&[QWEN2], false, false),
        _ => None,
    }
}

/// GPT-2's byte-to-printable-character mapping: printable Latin-1 bytes map to themselves, the
/// other 68 bytes to U+0100.. in byte order.
pub(crate) fn byte_to_char(b: u8) -> char {
    let shifted = match b {
        b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF => return b as char,
        0x00..=0x20 => b as u32,
        0x7F..=0xA0 => 33 + (b - 0x7F) as u32,
        0xAD => 67,
    };
    char::from_u32(256 + shifted).unwrap_or('\u{FFFD}')
}

/// Inverse of [`byte_to_char`]; `None` for characters outside the mapping.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let c = c as u32;
    match c {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(c as u8),
        256..=288 => Some((c - 256) as u8),
        289..=322 => Some((c - 289 + 0x7F) as u8),
        323 => Some(0xAD),
        _ => None,
    }
}

/// Bytes a byte-level token text stands for. Characters outside GPT-2's alphabet are kept as
/// their UTF-8 bytes (llama.cpp prints a marker instead; keeping the text is friendlier).
pub(crate) fn decode_byte_level(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

#[derive(Clone, Copy)]
struct Merge {
    rank: u32,
    /// Piece id of the merged string, if the string is known at all (it can only merge further
    /// if it appears on the left or right of some merge, or is a token).
    result: Option<u32>,
}

pub(crate) struct Bpe {
    regexes: Vec<Regex>,
    ignore_merges: bool,
    /// Strings that appear in merges but are not tokens get piece ids from `vocab.len()` on.
    extra_pieces: HashMap<String, u32>,
    merges: HashMap<(u32, u32), Merge>,
}

/// A queued merge candidate: (rank, left, right, left len, right len). Ordered as a min-heap on
/// (rank, left); the lengths identify the exact symbols it was built from.
type Candidate = Reverse<(u32, usize, usize, usize, usize)>;

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    piece: Option<u32>,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Bpe {
    pub fn new(vocab: &Vocab, merges: &[&str], pre: &PreConfig) -> Result<Self, TokenizerError> {
        let regexes = pre
            .regexes
            .iter()
            .map(|r| Regex::new(r).map_err(|e| TokenizerError::Regex(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;

        let mut bpe = Bpe { regexes, ignore_merges: pre.ignore_merges, extra_pieces: HashMap::new(), merges: HashMap::new() };
        let intern = |s: &str, extra: &mut HashMap<String, u32>| -> u32 {
            if let Some(id) = vocab.id(s) {
                return id;
            }
            let next = (vocab.len() + extra.len()) as u32;
            *extra.entry(s.to_string()).or_insert(next)
        };
        let mut pairs = Vec::with_capacity(merges.len());
        for (rank, line) in merges.iter().enumerate() {
            // Split at the first space after the first character (so a merge may start with a
            // space), as llama.cpp does; lines without one can never apply.
            let skip = line.chars().next().map_or(0, char::len_utf8);
            let Some(pos) = line[skip..].find(' ').map(|p| p + skip) else { continue };
            let (left, right) = (&line[..pos], &line[pos + 1..]);
            if left.is_empty() || right.is_empty() {
                continue;
            }
            let l = intern(left, &mut bpe.extra_pieces);
            let r = intern(right, &mut bpe.extra_pieces);
            pairs.push((l, r, rank as u32, format!("{left}{right}")));
        }
        for (l, r, rank, joined) in pairs {
            let result = vocab.id(&joined).or_else(|| bpe.extra_pieces.get(&joined).copied());
            // The first occurrence of a pair defines its rank.
            bpe.merges.entry((l, r)).or_insert(Merge { rank, result });
        }
        Ok(bpe)
    }

    fn piece_id(&self, vocab: &Vocab, s: &str) -> Option<u32> {
        vocab.id(s).or_else(|| self.extra_pieces.get(s).copied())
    }

    /// Pre-tokenizer: each regex splits every current piece into matches and the gaps between them.
    fn split<'t>(&self, text: &'t str) -> Result<Vec<&'t str>, TokenizerError> {
        let mut pieces = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for piece in pieces {
                let mut last = 0;
                for m in re.find_iter(piece) {
                    let m = m.map_err(|e| TokenizerError::Regex(e.to_string()))?;
                    if m.start() > last {
                        next.push(&piece[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < piece.len() {
                    next.push(&piece[last..]);
                }
            }
            pieces = next;
        }
        Ok(pieces)
    }

    /// Tokenizes one raw-text fragment.
    pub fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let mut word = String::new();
        for raw in self.split(text)? {
            word.clear();
            word.extend(raw.bytes().map(byte_to_char));
            self.encode_word(vocab, &word, out);
        }
        Ok(())
    }

    fn encode_word(&self, vocab: &Vocab, word: &str, out: &mut Vec<u32>) {
        if self.ignore_merges {
            if let Some(id) = vocab.id(word) {
                out.push(id);
                return;
            }
        }
        let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
        for (start, ch) in word.char_indices() {
            let idx = symbols.len();
            let len = ch.len_utf8();
            symbols.push(Symbol {
                start,
                len,
                piece: self.piece_id(vocab, &word[start..start + len]),
                prev: idx.checked_sub(1),
                next: if start + len < word.len() { Some(idx + 1) } else { None },
            });
        }
        if symbols.is_empty() {
            return;
        }

        // Candidates made stale by an earlier merge are recognised by their lengths and skipped.
        let mut queue: BinaryHeap<Candidate> = BinaryHeap::new();
        let push = |symbols: &[Symbol], l: usize, r: usize, queue: &mut BinaryHeap<Candidate>| {
            if let (Some(a), Some(b)) = (symbols[l].piece, symbols[r].piece) {
                if let Some(m) = self.merges.get(&(a, b)) {
                    queue.push(Reverse((m.rank, l, r, symbols[l].len, symbols[r].len)));
                }
            }
        };
        for i in 1..symbols.len() {
            push(&symbols, i - 1, i, &mut queue);
        }
        while let Some(Reverse((_, l, r, llen, rlen))) = queue.pop() {
            let (ls, rs) = (symbols[l], symbols[r]);
            if ls.len == 0 || rs.len == 0 || ls.len != llen || rs.len != rlen || ls.next != Some(r) {
                continue;
            }
            let merged = ls.piece.zip(rs.piece).and_then(|pair| self.merges.get(&pair)).and_then(|m| m.result);
            symbols[l].len += rs.len;
            symbols[l].piece = merged;
            symbols[l].next = rs.next;
            symbols[r].len = 0;
            if let Some(n) = rs.next {
                symbols[n].prev = Some(l);
            }
            if let Some(p) = ls.prev {
                push(&symbols, p, l, &mut queue);
            }
            if let Some(n) = rs.next {
                push(&symbols, l, n, &mut queue);
            }
        }

        let mut cur = Some(0);
        while let Some(i) = cur {
            let sym = symbols[i];
            let s = &word[sym.start..sym.start + sym.len];
            match vocab.id(s) {
                Some(id) => out.push(id),
                // Like llama.cpp: fall back to single-byte tokens where they exist.
                None => out.extend(s.bytes().filter(u8::is_ascii).filter_map(|b| vocab.id(&(b as char).to_string()))),
            }
            cur = sym.next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::vocab::TokenType;
    use super::*;

    #[test]
    fn byte_mapping_round_trips_and_matches_gpt2() {
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char(b)), Some(b), "byte {b}");
        }
        assert_eq!(byte_to_char(b' '), '\u{120}'); // 'Ġ'
        assert_eq!(byte_to_char(b'\n'), '\u{10A}'); // 'Ċ'
        assert_eq!(byte_to_char(0xAD), '\u{143}');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(decode_byte_level("Ġhello"), b" hello");
    }

    fn bpe(tokens: &[&str], merges: &[&str], pre: &str) -> (Vocab, Bpe) {
        let texts = tokens.iter().map(|s| s.to_string()).collect();
        let vocab = Vocab::new(texts, vec![TokenType::Normal; tokens.len()], |t, _| decode_byte_level(t)).unwrap();
        let bpe = Bpe::new(&vocab, merges, &pre_config(Some(pre)).unwrap()).unwrap();
        (vocab, bpe)
    }

    fn encode(v: &Vocab, b: &Bpe, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        b.encode(v, text, &mut out).unwrap();
        out
    }

    #[test]
    fn applies_merges_by_rank() {
        //            0    1    2    3     4     5      6
        let toks = ["a", "b", "c", "Ġ", "ab", "bc", "Ġab"];
        // "b c" outranks "a b": "abc" -> a + bc.
        let (v, b) = bpe(&toks, &["b c", "a b", "Ġ ab"], "gpt2");
        assert_eq!(encode(&v, &b, "abc"), vec![0, 5]);
        let (v, b) = bpe(&toks, &["a b", "b c", "Ġ ab"], "gpt2");
        assert_eq!(encode(&v, &b, "abc"), vec![4, 2]);
        // The regex keeps the space with the following word.
        assert_eq!(encode(&v, &b, "ab ab"), vec![4, 6]);
    }

    #[test]
    fn smollm_splits_digits_individually() {
        let toks = ["1", "2", "12", "Ġ", "x"];
        let (v, b) = bpe(&toks, &["1 2"], "smollm");
        assert_eq!(encode(&v, &b, "12"), vec![0, 1]);
        let (v, b) = bpe(&toks, &["1 2"], "gpt2");
        assert_eq!(encode(&v, &b, "12"), vec![2]);
    }

    #[test]
    fn regex_split_keeps_gaps_and_trailing_whitespace_rule() {
        let (_, b) = bpe(&["a"], &[], "gpt2");
        assert_eq!(b.split("hi  there  ").unwrap(), vec!["hi", " ", " there", "  "]);
        assert_eq!(b.split("it's 42!").unwrap(), vec!["it", "'s", " 42", "!"]);
        let (_, b) = bpe(&["a"], &[], "llama3");
        assert_eq!(b.split("12345 ok\n\n").unwrap(), vec!["123", "45", " ok", "\n\n"]);
    }

    #[test]
    fn unknown_pre_tokenizer_is_none() {
        assert!(pre_config(Some("nonsense")).is_none());
        assert!(pre_config(None).is_some());
    }
}
