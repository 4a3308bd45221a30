//! The fast quantized matmul kernels against candle's own quantizer and `QMatMul`.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use helpline::model::kernels::{quantize_q8_1_bytes, FastQMatMul, KernelPath};

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Activation-like rows: mixed magnitudes per block (including all-zero and tiny blocks, whose
/// scales are f16 subnormals) and a few outliers, as after RMS norm or the SiLU gate.
fn activations(m: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut x = values(m * k, seed);
    for (b, block) in x.chunks_mut(32).enumerate() {
        let scale = match (b + 4) % 7 {
            0 => 0.0,
            1 => 1e-6,
            2 => 3e-3,
            3 => 40.0,
            _ => 1.0 + b as f32 % 3.0,
        };
        for v in block.iter_mut() {
            *v *= scale;
        }
        if b % 5 == 4 {
            block[b % 32] = 120.0;
        }
    }
    x
}

fn quantized(n: usize, k: usize, dtype: GgmlDType, seed: u64) -> Arc<QTensor> {
    let w = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu).unwrap();
    Arc::new(QTensor::quantize(&w, dtype).unwrap())
}

#[test]
fn q8_1_activations_are_bit_identical_to_candle() {
    for (i, k) in [32usize, 576, 1536].into_iter().enumerate() {
        let mut x = activations(3, k, 100 + i as u64);
        // exact halves after scaling (amax 127 → d = 1): rounding ties go away from zero
        for (j, v) in x[..32].iter_mut().enumerate() {
            *v = if j == 0 { -127.0 } else { j as f32 - 15.5 };
        }
        let t = Tensor::from_vec(x.clone(), (3, k), &Device::Cpu).unwrap();
        let want = QTensor::quantize(&t, GgmlDType::Q8_1).unwrap().data().unwrap().into_owned();
        for path in KernelPath::available() {
            let got = quantize_q8_1_bytes(&x, path);
            assert_eq!(got.len(), want.len());
            if let Some(b) = (0..want.len() / 36).find(|b| got[b * 36..][..36] != want[b * 36..][..36]) {
                panic!("{path:?}, k={k}: block {b} differs\n got {:?}\nwant {:?}", &got[b * 36..][..36], &want[b * 36..][..36]);
            }
        }
    }
}

/// Q8_0 matrices with n % 16 == 0 and k % 256 == 0 go, on x86-64 with VNNI, to candle's own
/// tiles, which quantize activations per 256 values (Q8_K): a different (coarser) computation.
fn candle_uses_q8k_tiles(dtype: GgmlDType, n: usize, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let vnni = is_x86_feature_detected!("avx512vnni") || is_x86_feature_detected!("avxvnni");
        dtype == GgmlDType::Q8_0 && vnni && n.is_multiple_of(16) && k.is_multiple_of(256)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dtype, n, k);
        false
    }
}

/// Whether candle's CPU path for this matmul is the one the fast kernels reproduce bit for bit:
/// on x86-64 with AVX2, its scalar Q4_1 loop and its AVX2 Q4_0/Q8_0 `vec_dot`s.
fn candle_path_is_reproduced(dtype: GgmlDType, n: usize, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    avx2 && !candle_uses_q8k_tiles(dtype, n, k)
}

/// `x · Wᵀ` in f32 on the dequantized weights and the Q8_0-dequantized activations: the math the
/// fast kernels perform, up to float rounding.
fn dequantized_product(q: &QTensor, x: &Tensor) -> Vec<f32> {
    let (m, k) = (x.elem_count() / q.shape().dims2().unwrap().1, q.shape().dims2().unwrap().1);
    let x = x.reshape((m, k)).unwrap();
    let xq = QTensor::quantize(&x, GgmlDType::Q8_0).unwrap().dequantize(&Device::Cpu).unwrap();
    let w = q.dequantize(&Device::Cpu).unwrap();
    xq.matmul(&w.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Runs every available kernel path against candle's `QMatMul`: bit-identical where candle's path
/// is reproduced, else within 1e-4 of the output scale (of the dequantized product where candle
/// computes something else); and the paths agree with each other exactly.
fn compare(dtype: GgmlDType, n: usize, k: usize, m: usize, seed: u64) {
    let q = quantized(n, k, dtype, seed);
    let fast = FastQMatMul::new(&q).expect("supported type");
    assert_eq!(fast.shape(), (n, k));
    assert_eq!(fast.dtype(), dtype);
    let reference = QMatMul::from_arc(q.clone()).unwrap();
    let x = Tensor::from_vec(activations(m, k, seed + 1), (1, m, k), &Device::Cpu).unwrap();
    let want: Vec<f32> = if candle_uses_q8k_tiles(dtype, n, k) {
        dequantized_product(&q, &x)
    } else {
        reference.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    assert!(scale > 0.0);
    let exact = candle_path_is_reproduced(dtype, n, k);
    let mut outputs = Vec::new();
    for path in KernelPath::available() {
        let y = fast.forward_with(&x, path).unwrap();
        assert_eq!(y.dims(), &[1, m, n]);
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let (i, err) = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).enumerate().fold((0, 0f32), |b, e| if e.1 > b.1 { e } else { b });
        let what = format!("{dtype:?} n={n} k={k} m={m} {path:?}: output {i} is {} vs candle's {}", got[i], want[i]);
        if exact {
            assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()), "not bit-identical: {what}");
        } else {
            assert!(err <= 1e-4 * scale, "{what} (output scale {scale:e})");
        }
        outputs.push((path, got));
    }
    for (path, got) in &outputs[1..] {
        assert!(got == &outputs[0].1, "{dtype:?} n={n} k={k} m={m}: {path:?} differs from {:?}", outputs[0].0);
    }
}

#[test]
fn q4_1_matches_candle_qmatmul() {
    for m in [1, 3, 17, 64] {
        compare(GgmlDType::Q4_1, 576, 576, m, m as u64);
        compare(GgmlDType::Q4_1, 1536, 576, m, 10 + m as u64);
        compare(GgmlDType::Q4_1, 576, 1536, m, 20 + m as u64);
    }
}

#[test]
fn q4_1_odd_shapes_match_candle_qmatmul() {
    // n_out not a multiple of the 16-row tile, a single block, more rows than one work chunk.
    for (n, k, m) in [(1, 32, 1), (37, 96, 5), (50, 64, 67), (193, 160, 130), (7, 1024, 2)] {
        compare(GgmlDType::Q4_1, n, k, m, (n * k + m) as u64);
    }
}

#[test]
fn q4_0_and_q8_0_match_candle_qmatmul() {
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0] {
        // (64, 512) is a shape candle sends to its own Q8_0 tiles (compared within tolerance).
        for (n, k, m) in [(576, 576, 1), (192, 576, 3), (37, 96, 17), (100, 256, 64), (256, 640, 7), (64, 512, 5)] {
            compare(dtype, n, k, m, (n + k + m) as u64);
        }
    }
}

#[test]
fn unsupported_weights_are_declined() {
    // k-quants, float weights and rows that are not whole blocks stay on candle's path.
    assert!(FastQMatMul::new(&quantized(16, 256, GgmlDType::Q4K, 1)).is_none());
    assert!(FastQMatMul::new(&quantized(16, 64, GgmlDType::F32, 1)).is_none());
    let v = Tensor::from_vec(values(48, 3), 48, &Device::Cpu).unwrap();
    assert!(FastQMatMul::new(&Arc::new(QTensor::quantize(&v, GgmlDType::F32).unwrap())).is_none());
}

#[test]
fn input_shapes_and_errors() {
    let fast = FastQMatMul::new(&quantized(20, 64, GgmlDType::Q4_1, 5)).unwrap();
    let x = Tensor::from_vec(activations(6, 64, 9), (2, 3, 64), &Device::Cpu).unwrap();
    assert_eq!(fast.forward(&x).unwrap().dims(), &[2, 3, 20]);
    // A non-contiguous input gives the same result as its contiguous copy.
    let t = Tensor::from_vec(activations(6, 64, 9), (64, 6), &Device::Cpu).unwrap().t().unwrap();
    let a: Vec<f32> = fast.forward(&t).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = fast.forward(&t.contiguous().unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a, b);
    // Wrong inner dimension is an error, not a panic.
    let bad = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(fast.forward(&bad).is_err());
}
