//! Throughput benchmark in the manner of llama-bench: prompt processing (pp) and token generation
//! (tg) timed separately on random tokens; tokenization and sampling are not part of either.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::model::{BatchItem, ModelError, Weights};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub n_prompt: usize,
    pub n_gen: usize,
    pub reps: usize,
    pub threads: usize,
    /// Sequences decoded together in the tg test (1 = a single stream, as llama-bench).
    pub batch: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// `pp512`, `tg128`, ...
    pub test: String,
    pub threads: usize,
    pub n_tokens: usize,
    pub reps: usize,
    pub tokens_per_second: f64,
    pub stddev: f64,
    pub samples: Vec<f64>,
}

/// Runs the pp and tg tests (a test with 0 tokens is skipped) after one untimed warm-up.
pub fn run(weights: &Weights, cfg: &BenchConfig) -> Result<Vec<BenchResult>, ModelError> {
    let mut rng = StdRng::seed_from_u64(1234);
    let vocab = weights.vocab_size() as u32;
    let mut random_tokens = |n: usize| (0..n).map(|_| rng.gen_range(0..vocab)).collect::<Vec<u32>>();
    let max = weights.max_positions();
    if cfg.n_prompt >= max || cfg.n_gen >= max {
        return Err(ModelError::BadInput(format!("-p and -n must each be below the model's context ({max})")));
    }
    let reps = cfg.reps.max(1);

    // Warm-up: touches every weight once so page faults are not timed.
    weights.forward(&random_tokens(8), &mut weights.new_cache())?;

    let mut results = Vec::new();
    if cfg.n_prompt > 0 {
        let mut samples = Vec::with_capacity(reps);
        for _ in 0..reps {
            let tokens = random_tokens(cfg.n_prompt);
            let mut cache = weights.new_cache();
            let start = Instant::now();
            weights.forward(&tokens, &mut cache)?;
            samples.push(cfg.n_prompt as f64 / start.elapsed().as_secs_f64());
        }
        results.push(summarize(format!("pp{}", cfg.n_prompt), cfg, cfg.n_prompt, samples));
    }
    if cfg.n_gen > 0 {
        let batch = cfg.batch.max(1);
        let mut samples = Vec::with_capacity(reps);
        for _ in 0..reps {
            let streams: Vec<Vec<u32>> = (0..batch).map(|_| random_tokens(cfg.n_gen)).collect();
            let mut caches: Vec<_> = (0..batch).map(|_| weights.new_cache()).collect();
            let start = Instant::now();
            for step in 0..cfg.n_gen {
                let mut items: Vec<BatchItem> = streams
                    .iter()
                    .zip(caches.iter_mut())
                    .map(|(s, cache)| BatchItem { tokens: &s[step..step + 1], cache })
                    .collect();
                weights.forward_batch(&mut items)?;
            }
            // Aggregate tokens/s over all streams.
            samples.push((cfg.n_gen * batch) as f64 / start.elapsed().as_secs_f64());
        }
        let name = if batch == 1 { format!("tg{}", cfg.n_gen) } else { format!("tg{}x{batch}", cfg.n_gen) };
        results.push(summarize(name, cfg, cfg.n_gen * batch, samples));
    }
    Ok(results)
}

fn summarize(test: String, cfg: &BenchConfig, n_tokens: usize, samples: Vec<f64>) -> BenchResult {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = if samples.len() > 1 { samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    BenchResult {
        test,
        threads: cfg.threads,
        n_tokens,
        reps: samples.len(),
        tokens_per_second: mean,
        stddev: var.sqrt(),
        samples,
    }
}
