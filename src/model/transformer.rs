//! One decoder-only transformer covering every supported architecture.
//!
//! Weights are immutable and shared (`Arc`); the KV state lives in a separate [`KvCache`] that each
//! sequence owns, so many conversations run over one copy of the weights. `forward` takes the tokens
//! of one sequence and its cache; a batched variant can be added without touching the weights.

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_transformers::quantized_nn::RmsNorm;

use super::config::{Activation, Arch, ModelConfig, RopeStyle};
use super::gguf::GgufFile;
use super::kernels::{self, FastQMatMul};
use super::ModelError;

/// Longest position table precomputed; longer contexts are refused rather than silently wrapped.
const MAX_POSITIONS: usize = 1 << 17;

/// A layer projection: the fast CPU kernel of [`kernels`] where it supports the weight type,
/// candle's `QMatMul` otherwise.
enum Proj {
    Fast(FastQMatMul),
    Candle(QMatMul),
}

impl Proj {
    fn new(t: QTensor) -> candle_core::Result<Self> {
        let t = Arc::new(t);
        let candle = QMatMul::from_arc(t.clone())?;
        // Only where candle would multiply the quantized weights itself (it dequantizes float
        // types, or everything when asked to through its environment switches).
        if matches!(candle, QMatMul::QTensor(_)) && kernels::enabled() {
            if let Some(fast) = FastQMatMul::new(&t) {
                return Ok(Proj::Fast(fast));
            }
        }
        Ok(Proj::Candle(candle))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Proj::Fast(w) => w.forward(x),
            Proj::Candle(w) => w.forward(x),
        }
    }
}

struct Linear {
    weight: Proj,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.weight.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

enum AttnProj {
    Separate { q: Linear, k: Linear, v: Linear },
    /// Phi-3 packs q, k and v into one matrix.
    Fused(Linear),
}

enum FfnProj {
    Gated { gate: Proj, up: Proj },
    /// Phi-3 packs gate and up into one matrix: first half gate, second half up.
    FusedGateUp(Proj),
}

struct Layer {
    attn_norm: RmsNorm,
    attn: AttnProj,
    attn_out: Proj,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    ffn: FfnProj,
    ffn_down: Proj,
    post_ffn_norm: Option<RmsNorm>,
    window: Option<usize>,
    rope: Arc<Rope>,
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// `factors`: per-pair frequency divisors (Llama 3.1's `rope_freqs.weight`), applied as ggml does.
    fn new(cfg: &ModelConfig, base: f32, scale: f32, factors: Option<&[f32]>, device: &Device) -> candle_core::Result<Self> {
        let positions = cfg.context_length.clamp(1, MAX_POSITIONS);
        let half = cfg.rope_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let factor = factors.map_or(1.0, |f| f[i]);
                1.0 / base.powf(2.0 * i as f32 / cfg.rope_dim as f32) / factor
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let pos = Tensor::arange(0u32, positions as u32, device)?.to_dtype(DType::F32)?;
        let pos = (pos / scale as f64)?.reshape((positions, 1))?;
        let freqs = pos.broadcast_mul(&inv_freq)?;
        Ok(Rope { cos: freqs.cos()?, sin: freqs.sin()? })
    }

    fn positions(&self) -> usize {
        self.cos.dims()[0]
    }

    fn apply(&self, x: &Tensor, pos: usize, style: RopeStyle, rope_dim: usize) -> candle_core::Result<Tensor> {
        let (_, _, t, head_dim) = x.dims4()?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let rotate = |x: &Tensor| match style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, &cos, &sin),
            RopeStyle::Neox => candle_nn::rotary_emb::rope(x, &cos, &sin),
        };
        if rope_dim == head_dim {
            rotate(&x.contiguous()?)
        } else {
            let rotated = rotate(&x.narrow(D::Minus1, 0, rope_dim)?.contiguous()?)?;
            let rest = x.narrow(D::Minus1, rope_dim, head_dim - rope_dim)?;
            Tensor::cat(&[&rotated, &rest], D::Minus1)
        }
    }
}

/// Immutable model weights. Cheap to share between threads and sequences.
pub struct Weights {
    cfg: ModelConfig,
    embed: Arc<QTensor>,
    layers: Vec<Layer>,
    output_norm: RmsNorm,
    output: QMatMul,
    vocab_size: usize,
    device: Device,
}

/// Per-sequence attention state: keys and values of every layer, and the next position.
pub struct KvCache {
    layers: Vec<LayerKv>,
    pos: usize,
}

#[derive(Default)]
struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
    /// Absolute position of the first cached entry (windowed layers drop old entries).
    start: usize,
}

impl KvCache {
    /// Number of positions already processed.
    pub fn len(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }
}

/// One sequence's share of a batched forward pass: its new tokens and its cache.
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// Reads tensors by name, with errors that name the missing tensor.
struct TensorSource<'a> {
    file: &'a GgufFile,
    reader: BufReader<File>,
    device: &'a Device,
}

impl TensorSource<'_> {
    fn opt(&mut self, name: &str) -> Result<Option<QTensor>, ModelError> {
        if !self.file.content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        self.file
            .content
            .tensor(&mut self.reader, name, self.device)
            .map(Some)
            .map_err(|e| ModelError::Tensor { name: name.to_string(), msg: e.to_string() })
    }

    fn get(&mut self, name: &str) -> Result<QTensor, ModelError> {
        self.opt(name)?.ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    fn matmul(&mut self, name: &str) -> Result<Proj, ModelError> {
        let t = self.get(name)?;
        Ok(Proj::new(t)?)
    }

    fn linear(&mut self, prefix: &str) -> Result<Linear, ModelError> {
        let weight = self.matmul(&format!("{prefix}.weight"))?;
        let bias = match self.opt(&format!("{prefix}.bias"))? {
            Some(b) => Some(b.dequantize(self.device)?),
            None => None,
        };
        Ok(Linear { weight, bias })
    }

    fn norm(&mut self, name: &str, eps: f64) -> Result<RmsNorm, ModelError> {
        Ok(RmsNorm::from_qtensor(self.get(name)?, eps)?)
    }

    fn opt_norm(&mut self, name: &str, eps: f64) -> Result<Option<RmsNorm>, ModelError> {
        match self.opt(name)? {
            Some(t) => Ok(Some(RmsNorm::from_qtensor(t, eps)?)),
            None => Ok(None),
        }
    }
}

impl Weights {
    pub fn load(file: &GgufFile, device: &Device) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_gguf(file)?;
        let reader = BufReader::new(File::open(&file.path).map_err(|e| ModelError::Io(file.path.clone(), e))?);
        let mut src = TensorSource { file, reader, device };
        let eps = cfg.rms_eps;

        let embed = Arc::new(src.get("token_embd.weight")?);
        let (vocab_size, embd_width) = embed.shape().dims2()?;
        if embd_width != cfg.n_embd {
            return Err(ModelError::BadConfig(format!(
                "token_embd.weight has width {embd_width}, expected embedding_length {}",
                cfg.n_embd
            )));
        }
        let output = match src.opt("output.weight")? {
            Some(t) => QMatMul::from_qtensor(t)?,
            None => QMatMul::from_arc(embed.clone())?,
        };
        let output_norm = src.norm("output_norm.weight", eps)?;

        // Phi-3 "longrope" needs separate long/short factors and an attention scale, which this
        // transformer does not implement: refuse rather than run with the wrong positions.
        if src.file.content.tensor_infos.contains_key("rope_factors_long.weight") {
            return Err(ModelError::BadConfig(
                "rope_factors_long/short (Phi-3 longrope scaling) is not supported".into(),
            ));
        }
        let factors = match src.opt("rope_freqs.weight")? {
            Some(t) => {
                let f: Vec<f32> = t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
                if f.len() != cfg.rope_dim / 2 || f.iter().any(|x| !x.is_finite() || *x <= 0.0) {
                    return Err(ModelError::BadConfig(format!(
                        "rope_freqs.weight must hold {} positive factors (has {})",
                        cfg.rope_dim / 2,
                        f.len()
                    )));
                }
                Some(f)
            }
            None => None,
        };
        let rope_global = Arc::new(Rope::new(&cfg, cfg.rope_base, cfg.rope_scale, factors.as_deref(), device)?);
        let rope_local = if cfg.sliding_window.is_some() {
            Arc::new(Rope::new(&cfg, cfg.rope_base_local, 1.0, None, device)?)
        } else {
            rope_global.clone()
        };

        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("blk.{i}");
            let attn = if cfg.arch == Arch::Phi3 {
                AttnProj::Fused(src.linear(&format!("{p}.attn_qkv"))?)
            } else {
                AttnProj::Separate {
                    q: src.linear(&format!("{p}.attn_q"))?,
                    k: src.linear(&format!("{p}.attn_k"))?,
                    v: src.linear(&format!("{p}.attn_v"))?,
                }
            };
            let ffn = if cfg.arch == Arch::Phi3 {
                FfnProj::FusedGateUp(src.matmul(&format!("{p}.ffn_up.weight"))?)
            } else {
                FfnProj::Gated {
                    gate: src.matmul(&format!("{p}.ffn_gate.weight"))?,
                    up: src.matmul(&format!("{p}.ffn_up.weight"))?,
                }
            };
            let window = cfg.layer_window(i);
            layers.push(Layer {
                attn_norm: src.norm(&format!("{p}.attn_norm.weight"), eps)?,
                attn,
                attn_out: src.matmul(&format!("{p}.attn_output.weight"))?,
                q_norm: src.opt_norm(&format!("{p}.attn_q_norm.weight"), eps)?,
                k_norm: src.opt_norm(&format!("{p}.attn_k_norm.weight"), eps)?,
                post_attn_norm: src.opt_norm(&format!("{p}.post_attention_norm.weight"), eps)?,
                ffn_norm: src.norm(&format!("{p}.ffn_norm.weight"), eps)?,
                ffn,
                ffn_down: src.matmul(&format!("{p}.ffn_down.weight"))?,
                post_ffn_norm: src.opt_norm(&format!("{p}.post_ffw_norm.weight"), eps)?,
                window,
                rope: if window.is_some() { rope_local.clone() } else { rope_global.clone() },
            });
        }
        Ok(Weights { cfg, embed, layers, output_norm, output, vocab_size, device: device.clone() })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Longest sequence (prompt plus generated tokens) this model accepts.
    pub fn max_positions(&self) -> usize {
        self.layers.first().map(|l| l.rope.positions()).unwrap_or(0)
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: (0..self.layers.len()).map(|_| LayerKv::default()).collect(), pos: 0 }
    }

    /// Runs `tokens` of one sequence after what `cache` already holds; returns the logits (f32,
    /// length vocab) of the last token and advances the cache.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor, ModelError> {
        let mut items = [BatchItem { tokens, cache }];
        Ok(self.forward_batch(&mut items)?.swap_remove(0))
    }

    /// One forward pass over several sequences: their tokens are stacked into one row dimension so
    /// every projection and feed-forward runs once for all of them; attention runs per sequence
    /// over its own cache. Returns each sequence's last-token logits, in order. Each row is
    /// computed exactly as it would be alone, so batching never changes a sequence's output.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Tensor>, ModelError> {
        let max = self.max_positions();
        let mut all = Vec::new();
        for item in items.iter() {
            let (t, pos) = (item.tokens.len(), item.cache.pos);
            if t == 0 {
                return Err(ModelError::BadInput("forward called with no tokens".into()));
            }
            if pos + t > max {
                return Err(ModelError::ContextFull { needed: pos + t, max });
            }
            if let Some(&bad) = item.tokens.iter().find(|&&id| id as usize >= self.vocab_size) {
                return Err(ModelError::BadInput(format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    self.vocab_size
                )));
            }
            all.extend_from_slice(item.tokens);
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let ids = Tensor::new(all.as_slice(), &self.device)?;
        let mut x = self.embed.embedding(&ids)?;
        if self.cfg.scale_embeddings {
            x = (x * (self.cfg.n_embd as f64).sqrt())?;
        }
        let mut x = x.unsqueeze(0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let (q, k, v) = self.project_qkv(layer, &h)?;
            let mut parts = Vec::with_capacity(items.len());
            let mut offset = 0;
            for item in items.iter_mut() {
                let t = item.tokens.len();
                let pos = item.cache.pos;
                let kv = &mut item.cache.layers[li];
                let (q, k, v) = (q.narrow(1, offset, t)?, k.narrow(1, offset, t)?, v.narrow(1, offset, t)?);
                parts.push(self.attention(layer, &q, &k, &v, pos, kv)?);
                offset += t;
            }
            let y = if parts.len() == 1 { parts.pop().expect("one part") } else { Tensor::cat(&parts, 1)? };
            let mut a = layer.attn_out.forward(&y)?;
            if let Some(n) = &layer.post_attn_norm {
                a = n.forward(&a)?;
            }
            x = (x + a)?;
            let h = layer.ffn_norm.forward(&x)?;
            let mut f = self.feed_forward(layer, &h)?;
            if let Some(n) = &layer.post_ffn_norm {
                f = n.forward(&f)?;
            }
            x = (x + f)?;
        }
        let mut lasts = Vec::with_capacity(items.len());
        let mut offset = 0;
        for item in items.iter_mut() {
            let t = item.tokens.len();
            item.cache.pos += t;
            offset += t;
            lasts.push(x.narrow(1, offset - 1, 1)?);
        }
        let last = if lasts.len() == 1 { lasts.pop().expect("one row") } else { Tensor::cat(&lasts, 1)? };
        let logits = self.output.forward(&self.output_norm.forward(&last)?)?.squeeze(0)?.to_dtype(DType::F32)?;
        (0..items.len()).map(|i| Ok(logits.get(i)?)).collect()
    }

    fn feed_forward(&self, layer: &Layer, h: &Tensor) -> candle_core::Result<Tensor> {
        let (gate, up) = match &layer.ffn {
            FfnProj::Gated { gate, up } => (gate.forward(h)?, up.forward(h)?),
            FfnProj::FusedGateUp(w) => {
                let gu = w.forward(h)?;
                let n = gu.dim(D::Minus1)? / 2;
                (gu.narrow(D::Minus1, 0, n)?, gu.narrow(D::Minus1, n, n)?)
            }
        };
        let gate = match self.cfg.activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            Activation::GeluTanh => gate.gelu()?,
        };
        layer.ffn_down.forward(&(gate * up)?)
    }

    fn project_qkv(&self, layer: &Layer, h: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let cfg = &self.cfg;
        Ok(match &layer.attn {
            AttnProj::Separate { q, k, v } => (q.forward(h)?, k.forward(h)?, v.forward(h)?),
            AttnProj::Fused(qkv) => {
                let all = qkv.forward(h)?;
                let (nq, nkv) = (cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim);
                (all.narrow(D::Minus1, 0, nq)?, all.narrow(D::Minus1, nq, nkv)?, all.narrow(D::Minus1, nq + nkv, nkv)?)
            }
        })
    }

    /// Attention of one sequence: its projected q, k, v rows (1, t, *) at positions `pos..pos+t`
    /// against its cache, which is extended. Returns (1, t, n_head * head_dim).
    fn attention(
        &self,
        layer: &Layer,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos: usize,
        kv: &mut LayerKv,
    ) -> Result<Tensor, ModelError> {
        let cfg = &self.cfg;
        let (b, t, _) = q.dims3()?;
        let hd = cfg.head_dim;
        let q = q.reshape((b, t, cfg.n_head, hd))?.transpose(1, 2)?;
        let k = k.reshape((b, t, cfg.n_head_kv, hd))?.transpose(1, 2)?;
        let v = v.reshape((b, t, cfg.n_head_kv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = match &layer.q_norm {
            Some(n) => n.forward(&q.contiguous()?)?,
            None => q,
        };
        let k = match &layer.k_norm {
            Some(n) => n.forward(&k.contiguous()?)?,
            None => k,
        };
        let q = layer.rope.apply(&q, pos, cfg.rope_style, cfg.rope_dim)?;
        let k = layer.rope.apply(&k, pos, cfg.rope_style, cfg.rope_dim)?;
        // Keys and values at f16 precision where the model is tuned against llama.cpp's f16 cache.
        let (k, v) = if cfg.kv_f16 { (round_f16(&k)?, round_f16(&v)?) } else { (k, v) };

        let (k, v) = match (&kv.k, &kv.v) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            _ => (k, v),
        };
        let kv_start = kv.start;
        let kv_len = k.dim(2)?;

        // Grouped-query attention without copying keys: fold the query heads that share a KV head
        // into the row dimension, (b, n_kv, n_rep * t, hd) x (b, n_kv, hd, s).
        let n_rep = cfg.n_head / cfg.n_head_kv;
        let q = q.contiguous()?.reshape((b, cfg.n_head_kv, n_rep * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * cfg.attn_scale)?;
        let scores = match attention_mask(pos, t, kv_start, kv_len, layer.window, n_rep, &self.device)? {
            Some(mask) => scores.broadcast_add(&mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = probs.matmul(&v)?; // (b, n_kv, n_rep * t, hd)
        let y = y.reshape((b, cfg.n_head, t, hd))?.transpose(1, 2)?.reshape((b, t, cfg.n_head * hd))?;

        // Windowed layers keep only what a later query can still see.
        match layer.window {
            Some(w) if kv_len > w.saturating_sub(1) => {
                let keep = w.saturating_sub(1);
                kv.k = Some(k.narrow(2, kv_len - keep, keep)?);
                kv.v = Some(v.narrow(2, kv_len - keep, keep)?);
                kv.start = kv_start + kv_len - keep;
            }
            _ => {
                kv.k = Some(k);
                kv.v = Some(v);
            }
        }
        Ok(y)
    }
}

fn round_f16(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F16)?.to_dtype(DType::F32)
}

/// Additive mask (0 or -inf) of shape (n_rep * t, kv_len) for queries at positions `pos..pos+t`
/// over keys at `kv_start..kv_start+kv_len`; `None` when every key is visible to every query.
fn attention_mask(
    pos: usize,
    t: usize,
    kv_start: usize,
    kv_len: usize,
    window: Option<usize>,
    n_rep: usize,
    device: &Device,
) -> candle_core::Result<Option<Tensor>> {
    let visible = |qi: usize, kj: usize| kj <= qi && window.is_none_or(|w| qi - kj < w);
    let all_visible = (0..t).all(|i| visible(pos + i, kv_start) && visible(pos + i, kv_start + kv_len - 1));
    if all_visible {
        return Ok(None);
    }
    let mut row_block = Vec::with_capacity(t * kv_len);
    for i in 0..t {
        for j in 0..kv_len {
            row_block.push(if visible(pos + i, kv_start + j) { 0f32 } else { f32::NEG_INFINITY });
        }
    }
    let mut mask = Vec::with_capacity(n_rep * t * kv_len);
    for _ in 0..n_rep {
        mask.extend_from_slice(&row_block);
    }
    Ok(Some(Tensor::from_vec(mask, (n_rep * t, kv_len), device)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_is_causal_and_windowed() {
        let dev = Device::Cpu;
        assert!(attention_mask(5, 1, 0, 6, None, 1, &dev).unwrap().is_none());
        let m = attention_mask(0, 3, 0, 3, None, 1, &dev).unwrap().unwrap();
        let v: Vec<Vec<f32>> = m.to_vec2().unwrap();
        assert_eq!(v[0][1], f32::NEG_INFINITY);
        assert_eq!(v[2][0], 0.0);
        // window 2: query 2 sees keys 1 and 2 only
        let m = attention_mask(0, 3, 0, 3, Some(2), 2, &dev).unwrap().unwrap();
        let v: Vec<Vec<f32>> = m.to_vec2().unwrap();
        assert_eq!(v.len(), 6);
        assert_eq!(v[2], vec![f32::NEG_INFINITY, 0.0, 0.0]);
        assert_eq!(v[5], vec![f32::NEG_INFINITY, 0.0, 0.0]);
    }
}
