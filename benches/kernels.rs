//! The fast quantized matmul (`helpline::model::kernels`) against candle's `QMatMul` on the
//! default model's projection shapes, for one row (decode) and for a 512-row prompt.
//! Run: `RAYON_NUM_THREADS=2 cargo bench --bench kernels [-- FILTER]`

use std::sync::Arc;
use std::time::Duration;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use helpline::model::kernels::{FastQMatMul, KernelPath};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn matmul(c: &mut Criterion) {
    // (n_out, k): attn_q/attn_output, attn_k/attn_v, ffn_gate/ffn_up, ffn_down of SmolLM2-135M.
    let shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)];
    let mut group = c.benchmark_group("q4_1_matmul");
    group.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(20);
    for (n, k) in shapes {
        let w = Tensor::from_vec(values(n * k, 1), (n, k), &Device::Cpu).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap());
        let fast = FastQMatMul::new(&q).unwrap();
        let candle = QMatMul::from_arc(q).unwrap();
        for m in [1usize, 4, 512] {
            let x = Tensor::from_vec(values(m * k, 2), (1, m, k), &Device::Cpu).unwrap();
            group.throughput(Throughput::Elements((m * n * k) as u64));
            let id = format!("{n}x{k}/m{m}");
            group.bench_function(format!("fast/{id}"), |b| b.iter(|| fast.forward(black_box(&x)).unwrap()));
            if m == 512 && KernelPath::best() != KernelPath::Avx2 && KernelPath::available().contains(&KernelPath::Avx2) {
                group.bench_function(format!("fast-avx2/{id}"), |b| {
                    b.iter(|| fast.forward_with(black_box(&x), KernelPath::Avx2).unwrap())
                });
            }
            if m < 512 || std::env::var_os("BENCH_CANDLE_PREFILL").is_some() {
                group.bench_function(format!("candle/{id}"), |b| b.iter(|| candle.forward(black_box(&x)).unwrap()));
            }
        }
    }
    group.finish();
}

/// Every projection of a 30-layer SmolLM2-135M-shaped stack for one token (m = 1) or a batch of
/// four, on distinct weights (66 MB of Q4_1: streamed from L3/DRAM as in real decoding).
fn decode_stack(c: &mut Criterion) {
    let shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)];
    let layers: Vec<(Arc<QTensor>, usize)> = (0..30)
        .flat_map(|l| shapes.iter().enumerate().map(move |(i, &(n, k))| (l, i, n, k)))
        .map(|(l, i, n, k)| {
            let w = Tensor::from_vec(values(n * k, (l * 7 + i) as u64), (n, k), &Device::Cpu).unwrap();
            (Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()), k)
        })
        .collect();
    let fast: Vec<(FastQMatMul, usize)> = layers.iter().map(|(q, k)| (FastQMatMul::new(q).unwrap(), *k)).collect();
    let candle: Vec<(QMatMul, usize)> = layers.iter().map(|(q, k)| (QMatMul::from_arc(q.clone()).unwrap(), *k)).collect();
    drop(layers);
    let mut group = c.benchmark_group("q4_1_decode_stack");
    group.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3)).sample_size(20);
    for m in [1usize, 4] {
        let xs: Vec<Tensor> = [576usize, 1536]
            .iter()
            .map(|&k| Tensor::from_vec(values(m * k, 3), (1, m, k), &Device::Cpu).unwrap())
            .collect();
        let input = |k: usize| if k == 576 { &xs[0] } else { &xs[1] };
        group.bench_function(format!("fast/m{m}"), |b| {
            b.iter(|| {
                for (w, k) in &fast {
                    black_box(w.forward(input(*k)).unwrap());
                }
            })
        });
        group.bench_function(format!("candle/m{m}"), |b| {
            b.iter(|| {
                for (w, k) in &candle {
                    black_box(w.forward(input(*k)).unwrap());
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, matmul, decode_stack);
criterion_main!(benches);
