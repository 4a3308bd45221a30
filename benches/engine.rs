//! Criterion micro-benchmarks, one group per area. The llama-bench style throughput numbers
//! (pp/tg) come from `helpline bench`; these track the pieces around the model.
//! Run: `cargo bench --bench engine` (needs the default model in models/).

use std::path::PathBuf;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use helpline::model::Model;
use helpline::sampler::{Sampler, SamplingParams};
use helpline::tokenizer::Tokenizer;

fn default_model() -> Model {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    Model::load(&path, &candle_core::Device::Cpu).expect("run `helpline models pull` first")
}

fn tokenizer(c: &mut Criterion) {
    let model = default_model();
    let tok = Tokenizer::from_gguf_metadata(&model.file.content.metadata).unwrap();
    let text = "My invoice #INV-2024-0042 shows $1,299.99 but I was quoted $999. Can I get a refund? ".repeat(20);
    c.bench_function("tokenizer/encode_2k_chars", |b| b.iter(|| tok.encode(black_box(&text), false).unwrap()));
}

fn sampler(c: &mut Criterion) {
    let logits: Vec<f32> = (0..49152).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
    let mut greedy = Sampler::new(SamplingParams::greedy());
    c.bench_function("sampler/greedy_49k", |b| b.iter(|| greedy.sample(&mut logits.clone(), &[1, 2, 3], 0)));
    let params = SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.95, min_p: 0.05, seed: 1, ..Default::default() };
    let mut s = Sampler::new(params);
    c.bench_function("sampler/topk_topp_minp_49k", |b| b.iter(|| s.sample(&mut logits.clone(), &[1, 2, 3], 0)));
}

fn model(c: &mut Criterion) {
    let model = default_model();
    let w = &model.weights;
    let mut group = c.benchmark_group("model");
    group.sample_size(20);
    group.bench_function("decode_step_at_64", |b| {
        let mut cache = w.new_cache();
        w.forward(&(0..64).collect::<Vec<u32>>(), &mut cache).unwrap();
        b.iter_batched(
            || {
                let mut c = w.new_cache();
                w.forward(&(0..64).collect::<Vec<u32>>(), &mut c).unwrap();
                c
            },
            |mut c| w.forward(&[42], &mut c).unwrap(),
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, tokenizer, sampler, model);
criterion_main!(benches);
