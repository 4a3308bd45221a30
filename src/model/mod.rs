//! GGUF models: safe file parsing, fetching the default models, and the transformer itself.
pub mod config;
pub mod fetch;
pub mod gguf;
pub mod kernels;
pub mod transformer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use config::{Arch, ModelConfig};
pub use transformer::{BatchItem, KvCache, Weights};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error("unsupported model architecture `{0}` (supported: llama, mistral, gemma3, qwen2, qwen3, phi3)")]
    UnsupportedArch(String),
    #[error("model file is missing tensor `{0}`")]
    MissingTensor(String),
    #[error("cannot load tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    #[error("invalid model metadata: {0}")]
    BadConfig(String),
    #[error("invalid input: {0}")]
    BadInput(String),
    #[error("context full: {needed} positions needed, the model holds {max}")]
    ContextFull { needed: usize, max: usize },
    #[error("cannot read {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// A loaded model: the parsed file (metadata) and its shared weights.
#[derive(Clone)]
pub struct Model {
    pub file: Arc<gguf::GgufFile>,
    pub weights: Arc<Weights>,
}

impl Model {
    pub fn load(path: &Path, device: &candle_core::Device) -> Result<Self, ModelError> {
        let file = gguf::GgufFile::open(path)?;
        let weights = Weights::load(&file, device)?;
        Ok(Model { file: Arc::new(file), weights: Arc::new(weights) })
    }
}
