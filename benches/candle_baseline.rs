//! The floor for `helpline bench`: the same pp/tg protocol on candle-transformers' own quantized
//! llama model (a plain candle generation loop), on the same GGUF file and thread count.
//! Run: `RAYON_NUM_THREADS=2 cargo bench --bench candle_baseline -- [MODEL.gguf] [N_PROMPT] [N_GEN] [REPS]`

use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let path = args.first().cloned().unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let n_prompt: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(512);
    let n_gen: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let reps: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let dev = Device::Cpu;
    let mut file = std::fs::File::open(&path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let pristine = ModelWeights::from_gguf(content, &mut file, &dev)?;
    let vocab = 49152u32;
    let tokens = |n: usize, salt: u32| (0..n as u32).map(|i| (i * 7919 + salt * 104729) % vocab).collect::<Vec<u32>>();

    let mut warm = pristine.clone();
    warm.forward(&Tensor::new(tokens(8, 0).as_slice(), &dev)?.unsqueeze(0)?, 0)?;

    let mut pp = Vec::new();
    for r in 0..reps {
        let mut m = pristine.clone();
        let input = Tensor::new(tokens(n_prompt, r as u32).as_slice(), &dev)?.unsqueeze(0)?;
        let start = Instant::now();
        m.forward(&input, 0)?;
        pp.push(n_prompt as f64 / start.elapsed().as_secs_f64());
    }
    let mut tg = Vec::new();
    for r in 0..reps {
        let mut m = pristine.clone();
        let start = Instant::now();
        for (pos, t) in tokens(n_gen, r as u32 + 100).into_iter().enumerate() {
            m.forward(&Tensor::new(&[t], &dev)?.unsqueeze(0)?, pos)?;
        }
        tg.push(n_gen as f64 / start.elapsed().as_secs_f64());
    }
    let show = |name: String, s: &[f64]| {
        let mean = s.iter().sum::<f64>() / s.len() as f64;
        let sd = (s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (s.len().max(2) - 1) as f64).sqrt();
        println!("candle-transformers quantized_llama {name}: {mean:.2} ± {sd:.2} t/s");
    };
    show(format!("pp{n_prompt}"), &pp);
    show(format!("tg{n_gen}"), &tg);
    Ok(())
}
