//! Architecture coverage on tiny GGUF files written here: every supported architecture loads and
//! runs; prefill and incremental decoding agree (the KV cache is right); unsupported things fail clearly.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use helpline::model::{Model, ModelError};

const VOCAB: usize = 64;
const EMBD: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const FF: usize = 64;
const LAYERS: usize = 6;

/// Deterministic pseudo-random weights in [-0.5, 0.5).
fn weights(shape: &[usize], seed: u64) -> QTensor {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect();
    let t = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
    // Matrices whose rows are a multiple of 32 are stored as Q8_0 to exercise quantized matmuls.
    let dtype = if shape.len() == 2 && shape[1].is_multiple_of(32) { GgmlDType::Q8_0 } else { GgmlDType::F32 };
    QTensor::quantize(&t, dtype).unwrap()
}

fn ones(n: usize) -> QTensor {
    QTensor::quantize(&Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap()
}

/// Writes a tiny model of architecture `arch` (names and shapes as llama.cpp writes them).
pub fn write_tiny(dir: &Path, arch: &str) -> PathBuf {
    write_tiny_with(dir, arch, "", Vec::new())
}

/// Like [`write_tiny`], with extra tensors; `tag` keeps the file names apart.
fn write_tiny_with(dir: &Path, arch: &str, tag: &str, extra: Vec<(String, QTensor)>) -> PathBuf {
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), Value::U32(LAYERS as u32)),
        (format!("{arch}.embedding_length"), Value::U32(EMBD as u32)),
        (format!("{arch}.feed_forward_length"), Value::U32(FF as u32)),
        (format!("{arch}.attention.head_count"), Value::U32(HEADS as u32)),
        (format!("{arch}.attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (format!("{arch}.context_length"), Value::U32(256)),
        (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
    ];
    if arch == "gemma3" || arch == "qwen3" {
        md.push((format!("{arch}.attention.key_length"), Value::U32(HEAD_DIM as u32)));
        md.push((format!("{arch}.attention.value_length"), Value::U32(HEAD_DIM as u32)));
    }
    if arch == "gemma3" {
        // A window shorter than the test sequence, so windowed layers really drop old keys.
        md.push((format!("{arch}.attention.sliding_window"), Value::U32(4)));
    }
    let q_out = HEADS * HEAD_DIM;
    let kv_out = KV_HEADS * HEAD_DIM;
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), weights(&[VOCAB, EMBD], 1)),
        ("output_norm.weight".into(), ones(EMBD)),
    ];
    if arch == "phi3" || arch == "qwen2" {
        tensors.push(("output.weight".into(), weights(&[VOCAB, EMBD], 2)));
    }
    for l in 0..LAYERS {
        let p = format!("blk.{l}");
        let s = 100 * (l as u64 + 1);
        tensors.push((format!("{p}.attn_norm.weight"), ones(EMBD)));
        tensors.push((format!("{p}.ffn_norm.weight"), ones(EMBD)));
        tensors.push((format!("{p}.attn_output.weight"), weights(&[EMBD, q_out], s + 1)));
        tensors.push((format!("{p}.ffn_down.weight"), weights(&[EMBD, FF], s + 2)));
        if arch == "phi3" {
            tensors.push((format!("{p}.attn_qkv.weight"), weights(&[q_out + 2 * kv_out, EMBD], s + 3)));
            tensors.push((format!("{p}.ffn_up.weight"), weights(&[2 * FF, EMBD], s + 4)));
        } else {
            tensors.push((format!("{p}.attn_q.weight"), weights(&[q_out, EMBD], s + 5)));
            tensors.push((format!("{p}.attn_k.weight"), weights(&[kv_out, EMBD], s + 6)));
            tensors.push((format!("{p}.attn_v.weight"), weights(&[kv_out, EMBD], s + 7)));
            tensors.push((format!("{p}.ffn_gate.weight"), weights(&[FF, EMBD], s + 8)));
            tensors.push((format!("{p}.ffn_up.weight"), weights(&[FF, EMBD], s + 9)));
        }
        if arch == "qwen2" {
            tensors.push((format!("{p}.attn_q.bias"), weights(&[q_out], s + 10)));
            tensors.push((format!("{p}.attn_k.bias"), weights(&[kv_out], s + 11)));
            tensors.push((format!("{p}.attn_v.bias"), weights(&[kv_out], s + 12)));
        }
        if arch == "qwen3" || arch == "gemma3" {
            tensors.push((format!("{p}.attn_q_norm.weight"), ones(HEAD_DIM)));
            tensors.push((format!("{p}.attn_k_norm.weight"), ones(HEAD_DIM)));
        }
        if arch == "gemma3" {
            tensors.push((format!("{p}.post_attention_norm.weight"), ones(EMBD)));
            tensors.push((format!("{p}.post_ffw_norm.weight"), ones(EMBD)));
        }
    }
    tensors.extend(extra);
    let path = dir.join(format!("tiny-{arch}{tag}.gguf"));
    let mut f = std::fs::File::create(&path).unwrap();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
    path
}

fn logits(model: &Model, tokens: &[u32], cache: &mut helpline::model::KvCache) -> Vec<f32> {
    model.weights.forward(tokens, cache).unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn every_architecture_loads_and_prefill_matches_incremental_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<u32> = vec![3, 17, 42, 5, 9, 60, 1, 33, 8, 21];
    let mut firsts = Vec::new();
    for arch in ["llama", "qwen2", "qwen3", "gemma3", "phi3"] {
        let model = Model::load(&write_tiny(dir.path(), arch), &Device::Cpu).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(model.weights.vocab_size(), VOCAB);
        // All tokens in one forward pass...
        let mut cache = model.weights.new_cache();
        let batch = logits(&model, &tokens, &mut cache);
        assert_eq!(batch.len(), VOCAB, "{arch}");
        assert!(batch.iter().all(|x| x.is_finite()), "{arch}: non-finite logits");
        assert_eq!(cache.len(), tokens.len());
        // ...must equal feeding them one at a time (and in uneven chunks) through the KV cache.
        let mut cache = model.weights.new_cache();
        let mut step = Vec::new();
        for t in &tokens {
            step = logits(&model, &[*t], &mut cache);
        }
        let mut cache = model.weights.new_cache();
        logits(&model, &tokens[..3], &mut cache);
        let chunked = logits(&model, &tokens[3..], &mut cache);
        let (d1, d2) = (max_abs_diff(&batch, &step), max_abs_diff(&batch, &chunked));
        assert!(d1 < 1e-3 && d2 < 1e-3, "{arch}: prefill vs incremental differ by {d1} / {d2}");
        firsts.push(batch[0]);
    }
    // The architectures really differ (biases, norms, fused projections, activations).
    for i in 0..firsts.len() {
        for j in i + 1..firsts.len() {
            assert_ne!(firsts[i], firsts[j]);
        }
    }
}

#[test]
fn two_sequences_share_weights_without_sharing_state() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&write_tiny(dir.path(), "llama"), &Device::Cpu).unwrap();
    let fork = model.clone();
    assert!(std::sync::Arc::ptr_eq(&model.weights, &fork.weights));
    let (mut a, mut b) = (model.weights.new_cache(), fork.weights.new_cache());
    let alone = logits(&model, &[1, 2, 3], &mut model.weights.new_cache());
    logits(&model, &[7, 7, 7, 7], &mut a);
    let interleaved = logits(&fork, &[1, 2, 3], &mut b);
    assert_eq!(alone, interleaved);
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny(dir.path(), "llama");
    // Same file, other architecture name: rewrite the string value in place (same length).
    let bytes = std::fs::read(&path).unwrap();
    let patched = replace_once(&bytes, b"llama", b"mamba");
    let bad = dir.path().join("mamba.gguf");
    std::fs::write(&bad, patched).unwrap();
    let err = Model::load(&bad, &Device::Cpu).err().expect("must fail");
    assert!(matches!(err, ModelError::UnsupportedArch(ref a) if a == "mamba"), "{err}");
    assert!(err.to_string().contains("unsupported model architecture `mamba`"), "{err}");
}

#[test]
fn unsupported_quantization_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny(dir.path(), "llama");
    let mut bytes = std::fs::read(&path).unwrap();
    // Find the tensor info of output_norm.weight (1 dim, F32 = type 0) and set its type to 16 (IQ2_XXS).
    let name = b"output_norm.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let type_at = at + 4 + 8 * n_dims;
    bytes[type_at..type_at + 4].copy_from_slice(&16u32.to_le_bytes());
    let bad = dir.path().join("iq.gguf");
    std::fs::write(&bad, bytes).unwrap();
    let err = Model::load(&bad, &Device::Cpu).err().expect("must fail").to_string();
    assert!(err.contains("unsupported quantization type") && err.contains("output_norm.weight"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny(dir.path(), "qwen3");
    let bytes = std::fs::read(&path).unwrap();
    let bad = dir.path().join("noqnorm.gguf");
    // qwen3 weights without their k-norm are still loadable (k-norm is optional), so break a required name.
    std::fs::write(&bad, replace_once(&bytes, b"blk.0.ffn_down.weight", b"blk.0.ffn_dowX.weight")).unwrap();
    let err = Model::load(&bad, &Device::Cpu).err().expect("must fail").to_string();
    assert!(err.contains("blk.0.ffn_down.weight"), "{err}");
}

fn replace_once(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = haystack.windows(from.len()).position(|w| w == from).expect("pattern present");
    let mut out = haystack.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    out
}

#[test]
fn batched_forward_equals_one_sequence_at_a_time() {
    use helpline::model::BatchItem;
    let dir = tempfile::tempdir().unwrap();
    for arch in ["llama", "gemma3", "phi3"] {
        let model = Model::load(&write_tiny(dir.path(), arch), &Device::Cpu).unwrap();
        let w = &model.weights;
        let prompts: [&[u32]; 3] = [&[1, 2, 3, 4, 5, 6], &[9, 8], &[40, 41, 42, 43, 44, 45, 46, 47]];
        // Alone: prompt, then two decode steps each.
        let mut alone = Vec::new();
        for p in prompts {
            let mut c = w.new_cache();
            let mut outs = vec![logits(&model, p, &mut c)];
            outs.push(logits(&model, &[7], &mut c));
            outs.push(logits(&model, &[11], &mut c));
            alone.push(outs);
        }
        // Together: one batched prefill of all three, then batched decode steps.
        let mut caches: Vec<_> = prompts.iter().map(|_| w.new_cache()).collect();
        let mut together: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
        for step in [None, Some(7u32), Some(11u32)] {
            let toks: Vec<Vec<u32>> = prompts.iter().map(|p| step.map(|t| vec![t]).unwrap_or_else(|| p.to_vec())).collect();
            let mut items: Vec<BatchItem> =
                toks.iter().zip(caches.iter_mut()).map(|(t, cache)| BatchItem { tokens: t, cache }).collect();
            let out = w.forward_batch(&mut items).unwrap();
            for (i, l) in out.into_iter().enumerate() {
                together[i].push(l.to_vec1().unwrap());
            }
        }
        for i in 0..3 {
            for s in 0..3 {
                let d = max_abs_diff(&alone[i][s], &together[i][s]);
                assert!(d < 1e-4, "{arch}: sequence {i} step {s} differs by {d} when batched");
            }
        }
    }
}

fn factors(values: Vec<f32>) -> QTensor {
    let n = values.len();
    QTensor::quantize(&Tensor::from_vec(values, n, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap()
}

#[test]
fn rope_frequency_factors_are_applied_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = [3u32, 17, 42, 5, 9, 60];
    let run = |path: PathBuf| {
        let model = Model::load(&path, &Device::Cpu).map_err(|e| e.to_string())?;
        Ok::<_, String>(logits(&model, &tokens, &mut model.weights.new_cache()))
    };
    let plain = run(write_tiny(dir.path(), "llama")).unwrap();
    let ones = run(write_tiny_with(dir.path(), "llama", "-ones", vec![("rope_freqs.weight".into(), factors(vec![1.0; HEAD_DIM / 2]))])).unwrap();
    assert_eq!(plain, ones, "factors of 1 change nothing");
    let scaled = run(write_tiny_with(dir.path(), "llama", "-x8", vec![("rope_freqs.weight".into(), factors(vec![8.0; HEAD_DIM / 2]))])).unwrap();
    assert!(max_abs_diff(&plain, &scaled) > 1e-4, "factors must change the rotation");
    let err = run(write_tiny_with(dir.path(), "llama", "-short", vec![("rope_freqs.weight".into(), factors(vec![1.0; 3]))])).unwrap_err();
    assert!(err.contains("rope_freqs.weight must hold 4 positive factors"), "{err}");
    let err = run(write_tiny_with(dir.path(), "phi3", "-long", vec![("rope_factors_long.weight".into(), factors(vec![1.0; HEAD_DIM / 2]))])).unwrap_err();
    assert!(err.contains("longrope") && err.contains("not supported"), "{err}");
}
