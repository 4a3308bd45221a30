//! Backend for a `tokenizer.json` found next to the GGUF (Hugging Face `tokenizers`).

use std::path::Path;
use std::str::FromStr;

use super::bpe::decode_byte_level;
use super::spm::{parse_byte_token, SPACE_MARK};
use super::vocab::{TokenType, Vocab};
use super::TokenizerError;

pub(crate) struct HfModel {
    /// Splits special added tokens out of the text (parse_special = true).
    parse_special: tokenizers::Tokenizer,
    /// Same tokenizer with special added tokens treated as plain text (parse_special = false).
    /// Non-special added tokens are still split out, which matches llama.cpp's handling of
    /// user-defined tokens.
    plain: tokenizers::Tokenizer,
}

/// How token strings of the model map back to bytes.
#[derive(Clone, Copy)]
enum PieceStyle {
    /// GPT-2 byte-level alphabet.
    ByteLevel,
    /// SentencePiece style: U+2581 is a space, `<0xAB>` a raw byte when byte fallback is on.
    Metaspace { byte_fallback: bool },
}

/// True if `v` (any JSON subtree) contains an object with `"type": ty`.
fn mentions_type(v: &serde_json::Value, ty: &str) -> bool {
    match v {
        serde_json::Value::Object(map) => {
            map.get("type").and_then(|t| t.as_str()) == Some(ty) || map.values().any(|x| mentions_type(x, ty))
        }
        serde_json::Value::Array(items) => items.iter().any(|x| mentions_type(x, ty)),
        _ => false,
    }
}

impl HfModel {
    pub fn load(path: &Path) -> Result<(HfModel, Vocab), TokenizerError> {
        let bad = |reason: String| TokenizerError::BadTokenizerJson { path: path.display().to_string(), reason };
        let json = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let raw: serde_json::Value = serde_json::from_str(&json).map_err(|e| bad(e.to_string()))?;
        let parse_special = tokenizers::Tokenizer::from_str(&json).map_err(|e| bad(e.to_string()))?;
        let mut plain = parse_special.clone();
        plain.set_encode_special_tokens(true);

        let style = if mentions_type(&raw["decoder"], "ByteLevel") || mentions_type(&raw["pre_tokenizer"], "ByteLevel") {
            PieceStyle::ByteLevel
        } else {
            let byte_fallback = raw["model"]["byte_fallback"].as_bool().unwrap_or(false);
            PieceStyle::Metaspace { byte_fallback }
        };

        let added = parse_special.get_added_tokens_decoder();
        let n = parse_special.get_vocab_size(true);
        let mut texts = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        for id in 0..n as u32 {
            let (text, ty) = match added.get(&id) {
                Some(tok) if tok.special => (tok.content.clone(), TokenType::Control),
                Some(tok) => (tok.content.clone(), TokenType::UserDefined),
                None => match parse_special.id_to_token(id) {
                    Some(text) => {
                        let byte = matches!(style, PieceStyle::Metaspace { byte_fallback: true })
                            && parse_byte_token(&text).is_some();
                        (text, if byte { TokenType::Byte } else { TokenType::Normal })
                    }
                    // Holes in the id space.
                    None => (String::new(), TokenType::Undefined),
                },
            };
            texts.push(text);
            types.push(ty);
        }
        let vocab = Vocab::new(texts, types, |text, ty| match (ty, style) {
            (TokenType::Normal, PieceStyle::ByteLevel) => decode_byte_level(text),
            (TokenType::Normal, PieceStyle::Metaspace { .. }) => text.replace(SPACE_MARK, " ").into_bytes(),
            (TokenType::Byte, _) => parse_byte_token(text).map(|b| vec![b]).unwrap_or_default(),
            _ => text.as_bytes().to_vec(),
        })
        .map_err(|e| bad(e.to_string()))?;
        Ok((HfModel { parse_special, plain }, vocab))
    }

    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let tok = if parse_special { &self.parse_special } else { &self.plain };
        let enc = tok.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }
}
