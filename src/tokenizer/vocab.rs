//! The token table shared by every backend, typed access to GGUF metadata, and the
//! special-token partition step that runs before any model-specific tokenization.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use super::TokenizerError;

/// Token kinds as stored in `tokenizer.ggml.token_type` (llama.cpp's numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// Anything outside 1..=6 is treated as undefined, like llama.cpp does.
    pub fn from_gguf(v: i64) -> Self {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }
}

/// Typed, error-reporting view of a GGUF metadata map.
pub(crate) struct Meta<'a>(pub &'a HashMap<String, Value>);

fn as_i64(v: &Value) -> Option<i64> {
    Some(match *v {
        Value::U8(x) => x as i64,
        Value::I8(x) => x as i64,
        Value::U16(x) => x as i64,
        Value::I16(x) => x as i64,
        Value::U32(x) => x as i64,
        Value::I32(x) => x as i64,
        Value::U64(x) => i64::try_from(x).ok()?,
        Value::I64(x) => x,
        _ => return None,
    })
}

fn as_f32(v: &Value) -> Option<f32> {
    match *v {
        Value::F32(x) => Some(x),
        Value::F64(x) => Some(x as f32),
        _ => as_i64(v).map(|x| x as f32),
    }
}

impl<'a> Meta<'a> {
    fn wrong(key: &str, expected: &'static str) -> TokenizerError {
        TokenizerError::WrongType { key: key.to_string(), expected }
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(Self::wrong(key, "string")),
        }
    }

    pub fn required_str(&self, key: &str) -> Result<&'a str, TokenizerError> {
        self.str(key)?.ok_or_else(|| TokenizerError::MissingKey(key.to_string()))
    }

    pub fn u32(&self, key: &str) -> Result<Option<u32>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => as_i64(v)
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "unsigned 32-bit integer")),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(Self::wrong(key, "bool")),
        }
    }

    fn array(&self, key: &str, expected: &'static str) -> Result<Option<&'a [Value]>, TokenizerError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items.as_slice())),
            Some(_) => Err(Self::wrong(key, expected)),
        }
    }

    pub fn str_array(&self, key: &str) -> Result<Option<Vec<&'a str>>, TokenizerError> {
        const EXPECTED: &str = "array of strings";
        let Some(items) = self.array(key, EXPECTED)? else { return Ok(None) };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(Self::wrong(key, EXPECTED)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    pub fn i64_array(&self, key: &str) -> Result<Option<Vec<i64>>, TokenizerError> {
        const EXPECTED: &str = "array of integers";
        let Some(items) = self.array(key, EXPECTED)? else { return Ok(None) };
        items
            .iter()
            .map(|v| as_i64(v).ok_or_else(|| Self::wrong(key, EXPECTED)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    pub fn f32_array(&self, key: &str) -> Result<Option<Vec<f32>>, TokenizerError> {
        const EXPECTED: &str = "array of numbers";
        let Some(items) = self.array(key, EXPECTED)? else { return Ok(None) };
        items
            .iter()
            .map(|v| as_f32(v).ok_or_else(|| Self::wrong(key, EXPECTED)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// A piece of input after special-token partitioning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

/// Every token's text, type and decoded bytes, plus exact-text lookup.
pub(crate) struct Vocab {
    texts: Vec<String>,
    types: Vec<TokenType>,
    by_text: HashMap<String, u32>,
    /// Decoded bytes of all tokens, concatenated; token `i` is `piece_bytes[piece_ends[i-1]..piece_ends[i]]`.
    /// One flat buffer instead of 262k small vectors.
    piece_bytes: Vec<u8>,
    piece_ends: Vec<usize>,
    /// Control, user-defined and unknown tokens, longest text first: the order in which
    /// llama.cpp splits them out of the input.
    partition_order: Vec<u32>,
}

impl Vocab {
    /// `piece` turns a token's text and type into the bytes it stands for.
    /// Duplicate texts are rejected (llama.cpp refuses such vocabularies too); empty texts are
    /// kept as ids but can never be looked up or matched.
    pub fn new(
        texts: Vec<String>,
        types: Vec<TokenType>,
        piece: impl Fn(&str, TokenType) -> Vec<u8>,
    ) -> Result<Self, TokenizerError> {
        if texts.len() != types.len() {
            return Err(TokenizerError::InvalidVocab(format!(
                "{} tokens but {} token types",
                texts.len(),
                types.len()
            )));
        }
        if texts.len() > u32::MAX as usize {
            return Err(TokenizerError::InvalidVocab("more than 2^32 tokens".into()));
        }
        let mut by_text = HashMap::with_capacity(texts.len());
        let mut piece_bytes = Vec::new();
        let mut piece_ends = Vec::with_capacity(texts.len());
        for (id, (text, &ty)) in texts.iter().zip(&types).enumerate() {
            if !text.is_empty() {
                if let Some(prev) = by_text.insert(text.clone(), id as u32) {
                    return Err(TokenizerError::InvalidVocab(format!(
                        "duplicate token {text:?} (ids {prev} and {id})"
                    )));
                }
            }
            piece_bytes.extend_from_slice(&piece(text, ty));
            piece_ends.push(piece_bytes.len());
        }
        let mut partition_order: Vec<u32> = (0..texts.len() as u32)
            .filter(|&id| {
                let i = id as usize;
                !texts[i].is_empty()
                    && matches!(types[i], TokenType::Control | TokenType::UserDefined | TokenType::Unknown)
            })
            .collect();
        // Stable sort: equal lengths keep id order, which makes the result deterministic.
        partition_order.sort_by_key(|&id| std::cmp::Reverse(texts[id as usize].len()));
        Ok(Vocab { texts, types, by_text, piece_bytes, piece_ends, partition_order })
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    pub fn id(&self, text: &str) -> Option<u32> {
        self.by_text.get(text).copied()
    }

    pub fn piece(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i >= self.piece_ends.len() {
            return &[];
        }
        let start = if i == 0 { 0 } else { self.piece_ends[i - 1] };
        &self.piece_bytes[start..self.piece_ends[i]]
    }

    /// Splits `text` around special-token text, the way llama.cpp's `tokenizer_st_partition` does:
    /// token by token, longest first, every non-overlapping occurrence inside the remaining text
    /// fragments becomes a token fragment. User-defined tokens are always split out (as in HF
    /// tokenizers); control and unknown tokens only when `parse_special` is set.
    pub fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut frags = Vec::new();
        if text.is_empty() {
            return frags;
        }
        frags.push(Fragment::Text(text));
        for &id in &self.partition_order {
            let i = id as usize;
            if !parse_special && matches!(self.types[i], TokenType::Control | TokenType::Unknown) {
                continue;
            }
            let pat = self.texts[i].as_str();
            // Cheap global filter: most special tokens do not occur at all.
            if !text.contains(pat) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for frag in frags {
                let Fragment::Text(s) = frag else {
                    next.push(frag);
                    continue;
                };
                let mut last = 0;
                for (pos, _) in s.match_indices(pat) {
                    if pos > last {
                        next.push(Fragment::Text(&s[last..pos]));
                    }
                    next.push(Fragment::Token(id));
                    last = pos + pat.len();
                }
                if last < s.len() {
                    next.push(Fragment::Text(&s[last..]));
                }
            }
            frags = next;
        }
        frags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(entries: &[(&str, TokenType)]) -> Vocab {
        let texts = entries.iter().map(|(t, _)| t.to_string()).collect();
        let types = entries.iter().map(|(_, ty)| *ty).collect();
        Vocab::new(texts, types, |t, _| t.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn partition_respects_parse_special_and_length_order() {
        use TokenType::*;
        let v = vocab(&[("a", Normal), ("<s>", Control), ("<s>x", Control), ("\n\n", UserDefined), ("\n", UserDefined)]);
        let text = "a<s>x<s>\n\n\nb";
        assert_eq!(
            v.partition(text, true),
            vec![
                Fragment::Text("a"),
                Fragment::Token(2),
                Fragment::Token(1),
                Fragment::Token(3),
                Fragment::Token(4),
                Fragment::Text("b"),
            ]
        );
        // Control text stays text, user-defined tokens are still split out.
        assert_eq!(
            v.partition(text, false),
            vec![Fragment::Text("a<s>x<s>"), Fragment::Token(3), Fragment::Token(4), Fragment::Text("b")]
        );
        assert!(v.partition("", true).is_empty());
    }

    #[test]
    fn duplicate_tokens_are_rejected() {
        let err = Vocab::new(vec!["a".into(), "a".into()], vec![TokenType::Normal; 2], |t, _| t.as_bytes().to_vec())
            .err()
            .unwrap();
        assert!(err.to_string().contains("duplicate"), "{err}");
    }

    #[test]
    fn pieces_are_sliced_per_token() {
        let v = vocab(&[("ab", TokenType::Normal), ("", TokenType::Unused), ("c", TokenType::Normal)]);
        assert_eq!(v.piece(0), b"ab");
        assert_eq!(v.piece(1), b"");
        assert_eq!(v.piece(2), b"c");
        assert_eq!(v.piece(3), b"");
        assert_eq!(v.id(""), None);
    }

    #[test]
    fn meta_reports_missing_and_mistyped_keys() {
        let mut md = HashMap::new();
        md.insert("n".to_string(), Value::String("x".into()));
        md.insert("ids".to_string(), Value::Array(vec![Value::I32(1), Value::String("x".into())]));
        let m = Meta(&md);
        let e = m.u32("n").unwrap_err().to_string();
        assert!(e.contains("`n`") && e.contains("integer"), "{e}");
        let e = m.required_str("absent").unwrap_err().to_string();
        assert!(e.contains("absent"), "{e}");
        assert!(m.i64_array("ids").is_err());
        assert_eq!(m.bool("absent").unwrap(), None);
    }
}
