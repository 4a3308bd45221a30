//! Decode speed with the policy pack's grammar on versus off, on the real default model and the
//! engine (mask before sampling, accept after), side by side in one run. Same prompts, greedy,
//! alternating guarded and unguarded runs so drift hits both. `cargo bench --bench guarded_decode`
//!
//! Reports generated tokens/s (generation time only, from the engine's timings) and the ratio.

use std::time::Instant;

use helpline::engine::{collect, Engine, EngineConfig, Job, JobGuard, ModelBundle};
use helpline::guard::grammar::GuardCompiler;
use helpline::guard::ActivePolicy;
use helpline::sampler::SamplingParams;
use helpline::tokenizer::ChatMessage;

const PROMPTS: &[&str] = &[
    "Write a short, friendly paragraph explaining how a customer can update the card on file for their subscription.",
    "Explain in a few sentences what happens to an account's invoices when the subscription is cancelled.",
    "Describe, step by step, how to invite a new user to a workspace and choose their role.",
    "Write a polite reply to a customer who says the app is slow today and asks what they can do.",
];
const TOKENS: usize = 96;
const ROUNDS: usize = 3;

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let bundle = ModelBundle::load(&root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"), &candle_core::Device::Cpu)
        .expect("default model present: run `helpline models pull`");
    let policy = ActivePolicy::load(&root.join("docs-corpus/policy.toml")).expect("shipped pack");
    let t = Instant::now();
    let compiler = GuardCompiler::new(&bundle.tokenizer).expect("guard compiler");
    let setup_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    // Everything the pack enforces on an answer: the answer grammar and the bounds (two lexers,
    // their masks computed in parallel).
    let guard = policy.answer_guard(&compiler, 3).expect("pack grammar");
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let engine = Engine::start(&bundle.model, bundle.tokenizer.clone(), EngineConfig { max_active: 1, ..Default::default() }).expect("engine");
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| bundle.chat_prompt(&[ChatMessage::new("user", *p)]).unwrap()).collect();

    let run = |guarded: bool| -> (usize, f64) {
        let (mut tokens, mut secs) = (0usize, 0.0f64);
        for p in &prompts {
            let job = Job {
                prompt: p.clone(),
                params: SamplingParams::greedy(),
                max_tokens: TOKENS,
                stop: vec![],
                skip_special: true,
                guard: guarded.then(|| JobGuard(Box::new(guard.matcher.clone()))),
            };
            let (_, ids, _, timings) = collect(engine.submit(job).expect("submit")).expect("generation");
            tokens += ids.len();
            secs += timings.generation_ms / 1e3;
        }
        (tokens, secs)
    };
    // Warm-up: the model's caches and the grammar's lexer states (a long-running server keeps both).
    run(true);
    run(false);
    let (mut g, mut u) = ((0usize, 0.0f64), (0usize, 0.0f64));
    for _ in 0..ROUNDS {
        let a = run(true);
        let b = run(false);
        g = (g.0 + a.0, g.1 + a.1);
        u = (u.0 + b.0, u.1 + b.1);
    }
    let stats = engine.stats();
    let masks = stats.masks_total.load(std::sync::atomic::Ordering::Relaxed);
    let mask_ns = stats.mask_nanos_total.load(std::sync::atomic::Ordering::Relaxed);
    let mask_max = stats.mask_nanos_max.load(std::sync::atomic::Ordering::Relaxed);
    let gt = g.0 as f64 / g.1;
    let ut = u.0 as f64 / u.1;
    println!("| decode | tokens | tokens/s |");
    println!("| --- | ---: | ---: |");
    println!("| unguarded | {} | {ut:.1} |", u.0);
    println!("| guarded (shipped pack, {} rules) | {} | {gt:.1} |", policy.pack.forbidden.len(), g.0);
    println!();
    println!("guarded / unguarded: {:.3}", gt / ut);
    println!(
        "guard setup {setup_ms:.0} ms (once per model), pack grammar compile {compile_ms:.1} ms (once per pack and citation count); \
         masks {masks}, mean {:.1} us, max {:.1} ms (warm-up included)",
        mask_ns as f64 / masks.max(1) as f64 / 1e3,
        mask_max as f64 / 1e6
    );
}
