//! The project's tokenizer as llguidance sees it: a [`toktrie::TokEnv`].
//!
//! Built once per tokenizer (it walks the whole vocabulary and builds a byte trie) and cheap to
//! clone afterwards (an `Arc`). Token bytes follow toktrie's conventions:
//!
//! - normal, byte and user-defined tokens: the bytes they stand for (user-defined tokens are text);
//! - control and unknown tokens (`<|im_end|>`, `<eos>`, BOS, ...): toktrie's special-token marker
//!   byte `0xFF` followed by their text. `0xFF` never occurs in UTF-8, so no text lexeme of a
//!   grammar can produce them; only the EOS set (and grammars that name them explicitly) can;
//! - unused / undefined tokens: no bytes, which toktrie never allows.
//!
//! EOS for the grammar is the tokenizer's whole end-of-generation set ([`Tokenizer::eog_ids`]:
//! eos, eot, eom and the chat template's end-of-turn ids).

use std::sync::Arc;

use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::tokenizer::{TokenType, Tokenizer};

use super::grammar::GuardError;

/// Builds the [`TokEnv`] for `tokenizer`. Fails when the tokenizer has no end-of-generation id
/// (a grammar could then never end) or an id outside the vocabulary.
pub fn tok_env(tokenizer: &Arc<Tokenizer>) -> Result<TokEnv, GuardError> {
    let n = tokenizer.vocab_size();
    let vocab_size = u32::try_from(n).map_err(|_| GuardError::Tokenizer(format!("vocabulary of {n} tokens is too large")))?;
    let eog: Vec<TokenId> = tokenizer.eog_ids().to_vec();
    let Some(&first_eos) = eog.first() else {
        return Err(GuardError::Tokenizer("the tokenizer has no end-of-generation token (eos/eot), so no grammar could end".into()));
    };
    if let Some(bad) = eog.iter().find(|&&id| id >= vocab_size) {
        return Err(GuardError::Tokenizer(format!("end-of-generation id {bad} is outside the vocabulary of {n}")));
    }
    let words: Vec<Vec<u8>> = (0..vocab_size).map(|id| token_word(tokenizer, id)).collect();
    let mut info = TokRxInfo::new(vocab_size, first_eos);
    info.tok_bos = tokenizer.bos_id();
    let trie = TokTrie::from(&info, &words).with_eos_tokens(&eog);
    Ok(Arc::new(HelplineEnv { trie, tokenizer: Arc::clone(tokenizer) }))
}

/// The bytes toktrie stores for token `id` (see the module doc).
fn token_word(tokenizer: &Tokenizer, id: u32) -> Vec<u8> {
    let bytes = tokenizer.token_bytes(id);
    match tokenizer.token_type(id) {
        Some(TokenType::Control | TokenType::Unknown) => {
            let mut w = Vec::with_capacity(bytes.len() + 1);
            w.push(TokTrie::SPECIAL_TOKEN_MARKER);
            // An empty special token still needs a distinct, unproducible spelling.
            if bytes.is_empty() {
                w.extend_from_slice(format!("[{id}]").as_bytes());
            } else {
                w.extend_from_slice(bytes);
            }
            w
        }
        Some(TokenType::Unused | TokenType::Undefined) | None => Vec::new(),
        Some(TokenType::Normal | TokenType::Byte | TokenType::UserDefined) => bytes.to_vec(),
    }
}

struct HelplineEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for HelplineEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Our tokenizer's encoding when it spells exactly `s` (SentencePiece's space prefix or
    /// invalid UTF-8 would not); otherwise the trie's greedy tokenization, which always does.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        if let Ok(text) = std::str::from_utf8(s) {
            if let Ok(ids) = self.tokenizer.encode(text, false) {
                let spelled: usize = ids.iter().map(|&id| self.trie.token(id).len()).sum();
                let exact = spelled == s.len() && {
                    let mut joined = Vec::with_capacity(s.len());
                    ids.iter().for_each(|&id| joined.extend_from_slice(self.trie.token(id)));
                    joined == s
                };
                if exact {
                    return ids;
                }
            }
        }
        self.trie.greedy_tokenize(s)
    }

    /// Not canonical on purpose: llguidance then never narrows a forced stretch of bytes to one
    /// tokenization, so every tokenization of allowed text stays allowed and the guarantees are
    /// purely about bytes.
    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}
