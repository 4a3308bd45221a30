//! A model with everything needed to talk to it: weights, tokenizer, chat template and the
//! end-of-generation ids they imply.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

use crate::model::{Model, ModelError};
use crate::tokenizer::{ChatMessage, ChatTemplate, Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

pub struct ModelBundle {
    pub path: PathBuf,
    pub model: Model,
    pub tokenizer: Arc<Tokenizer>,
    pub template: ChatTemplate,
}

/// Markers of a message's content in the rendered template (private-use characters, removed from
/// message text before rendering would be needed only if a message held them: they are matched in
/// pairs with the index between them).
const CONTENT_OPEN: char = '\u{F8F0}';
const CONTENT_CLOSE: char = '\u{F8F1}';

impl ModelBundle {
    pub fn load(path: &Path, device: &Device) -> Result<Self, BundleError> {
        let model = Model::load(path, device)?;
        let metadata = &model.file.content.metadata;
        let mut tokenizer = Tokenizer::for_model(path, metadata)?;
        let template = ChatTemplate::from_metadata(metadata)?;
        let end_of_turn = template.end_of_turn_ids(&tokenizer);
        tokenizer.add_eog_ids(&end_of_turn);
        Ok(ModelBundle { path: path.to_path_buf(), model, tokenizer: Arc::new(tokenizer), template })
    }

    /// Prompt ids for a conversation, ending with the assistant's turn opened: the chat template
    /// rendered, special tokens parsed, BOS added when the model asks for it and the template did not.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, TokenizerError> {
        let tok = &self.tokenizer;
        let text_of = |id: Option<u32>| id.map(|i| String::from_utf8_lossy(tok.token_bytes(i)).into_owned()).unwrap_or_default();
        let bos = text_of(tok.bos_id());
        let eos = text_of(tok.eos_id());
        // Each message's content stands in the rendered text as a marker; the template's own text
        // is tokenized with its control tokens, the contents never are (`encode_parts`).
        let marked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage { role: m.role.clone(), content: format!("{CONTENT_OPEN}{i}{CONTENT_CLOSE}") })
            .collect();
        let text = self.template.render(&marked, true, &bos, &eos)?;
        let mut parts: Vec<(&str, bool)> = Vec::new();
        let mut rest = text.as_str();
        while let Some(open) = rest.find(CONTENT_OPEN) {
            parts.push((&rest[..open], true));
            let after = &rest[open + CONTENT_OPEN.len_utf8()..];
            let Some(close) = after.find(CONTENT_CLOSE) else { break };
            let i: usize = after[..close].parse().map_err(|_| TokenizerError::TemplateRender("a message marker was altered by the template".into()))?;
            let content = messages.get(i).map(|m| m.content.as_str()).unwrap_or("");
            parts.push((content, false));
            rest = &after[close + CONTENT_CLOSE.len_utf8()..];
        }
        parts.push((rest, true));
        let mut ids = Vec::new();
        if let Some(bos_id) = tok.bos_id() {
            if tok.add_bos() && (bos.is_empty() || !text.starts_with(&bos)) {
                ids.push(bos_id);
            }
        }
        ids.extend(tok.encode_parts(&parts)?);
        Ok(ids)
    }

    /// Prompt ids for plain text (no template): BOS when the model asks for it, special text as plain text.
    pub fn text_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let tok = &self.tokenizer;
        let mut ids: Vec<u32> = tok.bos_id().filter(|_| tok.add_bos()).into_iter().collect();
        ids.extend(tok.encode(text, false)?);
        Ok(ids)
    }
}
