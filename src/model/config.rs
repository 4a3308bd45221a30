//! Hyper-parameters of a transformer, read from GGUF metadata for each supported architecture.

use super::gguf::GgufFile;
use super::ModelError;

/// The architectures Helpline runs, selected from `general.architecture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama family: Llama 2/3, SmolLM2, Mistral (GGUF files name it `llama`).
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
    Phi3,
}

impl Arch {
    pub fn from_name(name: &str) -> Result<Self, ModelError> {
        Ok(match name {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3" => Arch::Gemma3,
            "phi3" => Arch::Phi3,
            other => return Err(ModelError::UnsupportedArch(other.to_string())),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
        }
    }
}

/// How rotary position embeddings pair up dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (x0,x1),(x2,x3)... — llama.cpp's "norm" rope; GGUF llama files permute q/k for it.
    Interleaved,
    /// First half against second half — llama.cpp's "neox" rope.
    Neox,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (Gemma).
    GeluTanh,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub rope_style: RopeStyle,
    pub rope_base: f32,
    /// Rope base of sliding-window layers where it differs (Gemma 3).
    pub rope_base_local: f32,
    /// Linear rope scaling: positions are divided by this factor (global layers only for Gemma 3).
    pub rope_scale: f32,
    pub rms_eps: f64,
    pub context_length: usize,
    /// Sliding-window size and which layers use it: layer `i` is windowed when `i % pattern < pattern - 1`.
    pub sliding_window: Option<(usize, usize)>,
    pub activation: Activation,
    /// Multiply token embeddings by sqrt(n_embd) (Gemma).
    pub scale_embeddings: bool,
    pub attn_scale: f64,
    /// Round cached keys and values to f16, as llama.cpp's default f16 KV cache does.
    pub kv_f16: bool,
}

impl ModelConfig {
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let arch = Arch::from_name(file.architecture()?)?;
        let key = |k: &str| format!("{}.{k}", arch.name());
        let n_layer = file.get_u32(&key("block_count"))? as usize;
        let n_embd = file.get_u32(&key("embedding_length"))? as usize;
        let n_head = file.get_u32(&key("attention.head_count"))? as usize;
        let n_head_kv = file.get_opt_u32(&key("attention.head_count_kv"))?.map(|v| v as usize).unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 || !n_head.is_multiple_of(n_head_kv) {
            return Err(ModelError::BadConfig(format!(
                "attention.head_count ({n_head}) must be a positive multiple of attention.head_count_kv ({n_head_kv})"
            )));
        }
        let head_dim = match file.get_opt_u32(&key("attention.key_length"))? {
            Some(v) => v as usize,
            None => {
                if !n_embd.is_multiple_of(n_head) {
                    return Err(ModelError::BadConfig(format!(
                        "embedding_length ({n_embd}) is not a multiple of attention.head_count ({n_head})"
                    )));
                }
                n_embd / n_head
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(ModelError::BadConfig(format!("head dimension {head_dim} must be even and positive")));
        }
        let rope_dim = file.get_opt_u32(&key("rope.dimension_count"))?.map(|v| v as usize).unwrap_or(head_dim);
        if rope_dim == 0 || rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(ModelError::BadConfig(format!(
                "rope.dimension_count ({rope_dim}) must be even and at most the head dimension ({head_dim})"
            )));
        }
        let default_base = if arch == Arch::Gemma3 { 1_000_000.0 } else { 10_000.0 };
        let rope_base = file.get_opt_f32(&key("rope.freq_base"))?.unwrap_or(default_base);
        let rope_scale = match file.get_opt_str(&key("rope.scaling.type"))? {
            None | Some("none") => 1.0,
            Some("linear") => file.get_opt_f32(&key("rope.scaling.factor"))?.unwrap_or(1.0),
            Some(other) => {
                return Err(ModelError::BadConfig(format!("unsupported rope scaling type `{other}` (supported: linear)")))
            }
        };
        let rms_eps = file.get_f32(&key("attention.layer_norm_rms_epsilon"))? as f64;
        let context_length = file.get_opt_u32(&key("context_length"))?.map(|v| v as usize).unwrap_or(4096);
        let (sliding_window, rope_base_local) = if arch == Arch::Gemma3 {
            // Gemma 3: five local (windowed) layers then one global; local layers use rope base 10k.
            let window = file.get_opt_u32(&key("attention.sliding_window"))?.map(|v| v as usize);
            let pattern = file.get_opt_u32(&key("attention.sliding_window_pattern"))?.map(|v| v as usize).unwrap_or(6);
            let local_base = file.get_opt_f32(&key("rope.local_freq_base"))?.unwrap_or(10_000.0);
            (window.filter(|w| *w > 0).map(|w| (w, pattern.max(1))), local_base)
        } else {
            (None, rope_base)
        };
        let (rope_style, activation) = match arch {
            Arch::Llama => (RopeStyle::Interleaved, Activation::Silu),
            Arch::Gemma3 => (RopeStyle::Neox, Activation::GeluTanh),
            Arch::Qwen2 | Arch::Qwen3 | Arch::Phi3 => (RopeStyle::Neox, Activation::Silu),
        };
        Ok(ModelConfig {
            arch,
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            rope_dim,
            rope_style,
            rope_base,
            rope_base_local,
            rope_scale,
            rms_eps,
            context_length,
            sliding_window,
            activation,
            scale_embeddings: arch == Arch::Gemma3,
            attn_scale: 1.0 / (head_dim as f64).sqrt(),
            // Measured against llama.cpp's greedy outputs (tests/reference): Gemma 3 follows them on
            // 9 of 10 prompts with an f16 cache and 7 of 10 with f32; SmolLM2 (llama) agrees fully
            // on 7 of 10 with f32 and 6 of 10 with f16. Each architecture keeps the closer setting.
            kv_f16: arch == Arch::Gemma3,
        })
    }

    /// Window size of layer `layer`, if it attends only to recent positions.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .and_then(|(window, pattern)| (pattern > 1 && layer % pattern < pattern - 1).then_some(window))
    }
}
