//! Tokenizer built from GGUF metadata, streaming detokenizer, chat template.
//!
//! Token ids match llama.cpp's: the GGUF vocabulary is tokenized with re-implementations of
//! llama.cpp's SentencePiece (`llama`) and byte-level BPE (`gpt2`) algorithms, including its
//! special-token partition step. A `tokenizer.json` next to the model overrides the GGUF
//! vocabulary and is handled by the `tokenizers` crate.

mod bpe;
mod hf;
mod spm;
mod stream;
mod template;
mod vocab;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;

pub use stream::{StopFilter, StreamDecoder};
pub use template::{civil_from_days, ChatMessage, ChatTemplate};
pub use vocab::TokenType;

use bpe::Bpe;
use hf::HfModel;
use spm::Spm;
use vocab::{Fragment, Meta, Vocab};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("missing GGUF metadata key `{0}`")]
    MissingKey(String),
    #[error("GGUF metadata key `{key}` has the wrong type (expected {expected})")]
    WrongType { key: String, expected: &'static str },
    #[error("unsupported tokenizer.ggml.model \"{0}\" (supported: \"llama\", \"gpt2\")")]
    UnsupportedModel(String),
    #[error("unsupported pre-tokenizer \"{0}\" (tokenizer.ggml.pre)")]
    UnsupportedPreTokenizer(String),
    #[error("bad tokenizer.json at {path}: {reason}")]
    BadTokenizerJson { path: String, reason: String },
    #[error("invalid vocabulary: {0}")]
    InvalidVocab(String),
    #[error("unknown token id {0}")]
    UnknownTokenId(u32),
    #[error("pre-tokenizer regex failed: {0}")]
    Regex(String),
    #[error("tokenization failed: {0}")]
    Encode(String),
    #[error("chat template does not compile: {0}")]
    TemplateCompile(String),
    #[error("chat template failed to render: {0}")]
    TemplateRender(String),
    #[error("chat template exceeded its limits: {0}")]
    TemplateLimit(String),
}

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TYPES: &str = "tokenizer.ggml.token_type";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_MERGES: &str = "tokenizer.ggml.merges";

enum Model {
    Spm(Spm),
    Bpe(Bpe),
    /// Boxed: two `tokenizers::Tokenizer`s are large.
    Hf(Box<HfModel>),
}

/// Special ids and flags read from GGUF metadata.
struct Specials {
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    add_bos: bool,
    add_space_prefix: bool,
}

impl Specials {
    /// `kind` is `tokenizer.ggml.model` when known; it picks llama.cpp's defaults.
    fn read(md: &Meta, kind: Option<&str>, n_vocab: usize) -> Result<Self, TokenizerError> {
        let spm = kind == Some("llama");
        let add_bos_default = if spm {
            true
        } else {
            bpe::pre_config(md.str(KEY_PRE)?).is_some_and(|c| c.add_bos)
        };
        let id = |key: &str, default: Option<u32>| -> Result<Option<u32>, TokenizerError> {
            let v = md.u32(key)?.or(default);
            Ok(match v {
                Some(id) if id as usize >= n_vocab => {
                    tracing::warn!(key, id, n_vocab, "special token id out of vocabulary range; ignored");
                    None
                }
                other => other,
            })
        };
        Ok(Specials {
            // llama.cpp's defaults for SentencePiece vocabularies are bos=1, eos=2.
            bos: id("tokenizer.ggml.bos_token_id", spm.then_some(1))?,
            eos: id("tokenizer.ggml.eos_token_id", spm.then_some(2))?,
            eot: id("tokenizer.ggml.eot_token_id", None)?,
            eom: id("tokenizer.ggml.eom_token_id", None)?,
            add_bos: md.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(add_bos_default),
            add_space_prefix: md.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(spm),
        })
    }
}

/// Text <-> token ids for one model. Cheap to clone (the tables are shared).
#[derive(Clone)]
pub struct Tokenizer {
    vocab: Arc<Vocab>,
    model: Arc<Model>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_space_prefix: bool,
    eog: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match *self.model {
            Model::Spm(_) => "spm",
            Model::Bpe(_) => "bpe",
            Model::Hf(_) => "tokenizer.json",
        };
        f.debug_struct("Tokenizer")
            .field("kind", &kind)
            .field("vocab_size", &self.vocab.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("eog", &self.eog)
            .finish()
    }
}

impl Tokenizer {
    /// Build from the GGUF's own metadata (tokenizer.ggml.* keys).
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self, TokenizerError> {
        let md = Meta(md);
        let kind = md.required_str(KEY_MODEL)?;
        if kind != "llama" && kind != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(kind.to_string()));
        }
        let tokens = md.str_array(KEY_TOKENS)?.ok_or_else(|| TokenizerError::MissingKey(KEY_TOKENS.into()))?;
        let n = tokens.len();
        if n == 0 {
            return Err(TokenizerError::InvalidVocab(format!("`{KEY_TOKENS}` is empty")));
        }
        let types = match md.i64_array(KEY_TYPES)? {
            Some(t) if t.len() < n => {
                return Err(TokenizerError::InvalidVocab(format!("{} token types for {n} tokens", t.len())))
            }
            Some(t) => t[..n].iter().map(|&v| TokenType::from_gguf(v)).collect(),
            None => vec![TokenType::Normal; n],
        };
        let texts: Vec<String> = tokens.iter().map(|s| s.to_string()).collect();

        let (vocab, model) = if kind == "llama" {
            let scores = match md.f32_array(KEY_SCORES)? {
                Some(s) if s.len() < n => {
                    return Err(TokenizerError::InvalidVocab(format!("{} scores for {n} tokens", s.len())))
                }
                Some(mut s) => {
                    s.truncate(n);
                    s
                }
                None => vec![0.0; n],
            };
            let vocab = Vocab::new(texts, types, spm_piece)?;
            let spm = Spm::new(&vocab, scores);
            (vocab, Model::Spm(spm))
        } else {
            let pre_name = md.str(KEY_PRE)?;
            let pre = bpe::pre_config(pre_name)
                .ok_or_else(|| TokenizerError::UnsupportedPreTokenizer(pre_name.unwrap_or_default().to_string()))?;
            let merges = md.str_array(KEY_MERGES)?.ok_or_else(|| TokenizerError::MissingKey(KEY_MERGES.into()))?;
            let vocab = Vocab::new(texts, types, bpe_piece)?;
            let bpe = Bpe::new(&vocab, &merges, &pre)?;
            (vocab, Model::Bpe(bpe))
        };
        let specials = Specials::read(&md, Some(kind), vocab.len())?;
        Ok(Self::assemble(vocab, model, specials))
    }

    /// Load for a model file: if a `tokenizer.json` exists in the same directory as the GGUF, it
    /// overrides the GGUF vocabulary; special ids (bos/eos/eot/eom) still come from the GGUF metadata.
    pub fn for_model(gguf_path: &Path, md: &HashMap<String, Value>) -> Result<Self, TokenizerError> {
        match gguf_path.parent().map(|dir| dir.join("tokenizer.json")) {
            Some(json) if json.is_file() => Self::from_tokenizer_json(&json, md),
            _ => Self::from_gguf_metadata(md),
        }
    }

    /// Uses a Hugging Face `tokenizer.json` for the vocabulary and tokenization, and the GGUF
    /// metadata for special ids and the add-BOS flag.
    pub fn from_tokenizer_json(path: &Path, md: &HashMap<String, Value>) -> Result<Self, TokenizerError> {
        let (hf, vocab) = HfModel::load(path)?;
        let md = Meta(md);
        let specials = Specials::read(&md, md.str(KEY_MODEL)?, vocab.len())?;
        Ok(Self::assemble(vocab, Model::Hf(Box::new(hf)), specials))
    }

    fn assemble(vocab: Vocab, model: Model, s: Specials) -> Self {
        // The space prefix is a SentencePiece step; tokenizer.json handles its own normalization.
        let add_space_prefix = s.add_space_prefix && matches!(model, Model::Spm(_));
        let mut tok = Tokenizer {
            vocab: Arc::new(vocab),
            model: Arc::new(model),
            bos: s.bos,
            eos: s.eos,
            add_bos: s.add_bos,
            add_space_prefix,
            eog: Vec::new(),
        };
        let eog: Vec<u32> = [s.eos, s.eot, s.eom].into_iter().flatten().collect();
        tok.add_eog_ids(&eog);
        tok
    }

    /// Token ids for text. No BOS is added. With `parse_special == false`, control-token text
    /// (e.g. "<|im_start|>") is tokenized as plain text; with `true` it maps to the token id.
    /// User-defined tokens are matched either way, as llama.cpp does.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        if let Model::Hf(hf) = &*self.model {
            return hf.encode(text, parse_special);
        }
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_fragments(self.vocab.partition(text, parse_special), &mut out)?;
        Ok(out)
    }

    /// Token ids for text made of parts, each with its own `parse_special`: the chat template's
    /// own text (its turn markers are special tokens) and the messages' contents (never parsed for
    /// control tokens: a customer typing `<|im_end|>` gets those characters, not a turn marker).
    /// Text on both sides of a part boundary is tokenized together, as one string would be.
    pub fn encode_parts(&self, parts: &[(&str, bool)]) -> Result<Vec<u32>, TokenizerError> {
        if let Model::Hf(hf) = &*self.model {
            let mut out = Vec::new();
            for (text, special) in parts {
                out.extend(hf.encode(text, *special)?);
            }
            return Ok(out);
        }
        // One fragment list: each part partitioned with its flag, adjacent text joined.
        let mut frags: Vec<OwnedFragment> = Vec::new();
        for (text, special) in parts {
            for f in self.vocab.partition(text, *special) {
                match (f, frags.last_mut()) {
                    (Fragment::Text(t), Some(OwnedFragment::Text(prev))) => prev.push_str(t),
                    (Fragment::Text(t), _) => frags.push(OwnedFragment::Text(t.to_string())),
                    (Fragment::Token(id), _) => frags.push(OwnedFragment::Token(id)),
                }
            }
        }
        let mut out = Vec::with_capacity(frags.len() * 4);
        let borrowed = frags.iter().map(|f| match f {
            OwnedFragment::Text(t) => Fragment::Text(t),
            OwnedFragment::Token(id) => Fragment::Token(*id),
        });
        self.encode_fragments(borrowed, &mut out)?;
        Ok(out)
    }

    /// Tokenizes partitioned input (SentencePiece or BPE): special tokens as they are, text
    /// through the model (SentencePiece prefixes a space after a special token when the vocabulary
    /// asks for it).
    fn encode_fragments<'t>(&self, frags: impl IntoIterator<Item = Fragment<'t>>, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        match &*self.model {
            Model::Spm(spm) => {
                let mut prev_special = true;
                let mut buf = String::new();
                for frag in frags {
                    match frag {
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                        Fragment::Text(s) => {
                            buf.clear();
                            if self.add_space_prefix && prev_special {
                                buf.push(' ');
                            }
                            buf.push_str(s);
                            spm.encode(&self.vocab, &spm::escape_whitespace(&buf), out);
                            prev_special = false;
                        }
                    }
                }
            }
            Model::Bpe(bpe) => {
                for frag in frags {
                    match frag {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(s) => bpe.encode(&self.vocab, s, out)?,
                    }
                }
            }
            Model::Hf(_) => unreachable!("Hugging Face tokenizers encode whole texts"),
        }
        Ok(())
    }

    /// The raw bytes token `id` stands for (byte-level BPE decoded, SentencePiece '▁' as ' ',
    /// `<0xAB>` as the byte 0xAB). Control, unknown and user-defined tokens: their text. Unused
    /// tokens and unknown ids: empty.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.vocab.piece(id)
    }

    /// Detokenizes to (lossy) UTF-8. `skip_special` drops control and unknown tokens (BOS, EOS,
    /// "<|im_end|>", ...); user-defined tokens are always rendered, as they stand for text.
    /// For SentencePiece vocabularies with `add_space_prefix`, the space that encoding prefixed
    /// is removed from the first token, so `decode(encode(s))` gives back `s`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        let mut first = true;
        for &id in ids {
            if skip_special && self.is_skippable(id) {
                continue;
            }
            let mut piece = self.token_bytes(id);
            if first && self.add_space_prefix && self.vocab.token_type(id) == Some(TokenType::Normal) {
                piece = piece.strip_prefix(b" ").unwrap_or(piece);
            }
            first = false;
            bytes.extend_from_slice(piece);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Tokens that `skip_special` leaves out.
    pub(crate) fn is_skippable(&self, id: u32) -> bool {
        matches!(self.vocab.token_type(id), Some(TokenType::Control | TokenType::Unknown))
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Control (token_type 3) and user-defined (4) tokens.
    pub fn is_special(&self, id: u32) -> bool {
        matches!(self.vocab.token_type(id), Some(TokenType::Control | TokenType::UserDefined))
    }

    /// The token's type; `None` for ids outside the vocabulary.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.vocab.token_type(id)
    }

    /// The token's text as stored in the vocabulary (e.g. "Ġthe", "▁the", "<0x0A>").
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.text(id)
    }

    /// Exact token-text lookup.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.id(text)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// `tokenizer.ggml.add_bos_token` (default: true for llama/SPM and Llama-3 BPE, false otherwise).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-generation ids: eos, eot and eom from the metadata plus whatever
    /// [`add_eog_ids`](Self::add_eog_ids) added (end-of-turn ids derived from the chat template).
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Adds end-of-generation ids; duplicates and ids outside the vocabulary are ignored.
    pub fn add_eog_ids(&mut self, ids: &[u32]) {
        for &id in ids {
            if (id as usize) < self.vocab.len() && !self.eog.contains(&id) {
                self.eog.push(id);
            }
        }
    }
}

/// Decoded bytes of a SentencePiece token.
fn spm_piece(text: &str, ty: TokenType) -> Vec<u8> {
    match ty {
        TokenType::Normal => text.replace(spm::SPACE_MARK, " ").into_bytes(),
        TokenType::Byte => spm::parse_byte_token(text).map(|b| vec![b]).unwrap_or_default(),
        TokenType::Control | TokenType::Unknown | TokenType::UserDefined => text.as_bytes().to_vec(),
        TokenType::Unused | TokenType::Undefined => Vec::new(),
    }
}

/// Decoded bytes of a byte-level BPE token.
fn bpe_piece(text: &str, ty: TokenType) -> Vec<u8> {
    match ty {
        TokenType::Normal => bpe::decode_byte_level(text),
        TokenType::Byte => spm::parse_byte_token(text).map(|b| vec![b]).unwrap_or_default(),
        TokenType::Control | TokenType::Unknown | TokenType::UserDefined => text.as_bytes().to_vec(),
        TokenType::Unused | TokenType::Undefined => Vec::new(),
    }
}

/// A fragment of [`Tokenizer::encode_parts`]'s input, owning its text (parts' texts are joined).
enum OwnedFragment {
    Text(String),
    Token(u32),
}
