//! Greedy decoding against llama.cpp's reference outputs on the real model files.

use helpline::model::Model;
use helpline::sampler::argmax;

use crate::support::{self, GreedyCase};

/// Greedy ids straight from the model (no tokenizer involved): up to `n` tokens, ending after `eos`
/// (the reference lists include the end-of-generation token).
fn greedy(model: &Model, prompt: &[u32], n: usize, eos: u32) -> Vec<u32> {
    let w = &model.weights;
    let mut cache = w.new_cache();
    let mut logits: Vec<f32> = w.forward(prompt, &mut cache).unwrap().to_vec1().unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let id = argmax(&logits);
        out.push(id);
        if id == eos {
            break;
        }
        logits = w.forward(&[id], &mut cache).unwrap().to_vec1().unwrap();
    }
    out
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn agreement(model: &Model, cases: &[GreedyCase]) -> Vec<(usize, usize, bool)> {
    let eos = model.file.get_u32("tokenizer.ggml.eos_token_id").unwrap();
    cases
        .iter()
        .map(|c| {
            let got = greedy(model, &c.prompt_ids, 32, eos);
            let prefix = common_prefix(&got, &c.greedy_ids);
            let full = got == c.greedy_ids;
            eprintln!("prefix {prefix:2}/{:2} full={full} {:?}\n got {:?}\n ref {:?}", c.greedy_ids.len(), &c.greedy_text[..c.greedy_text.len().min(40)], &got[prefix.saturating_sub(2)..], &c.greedy_ids[prefix.saturating_sub(2)..]);
            (prefix, c.greedy_ids.len(), full)
        })
        .collect()
}

#[test]
fn smollm2_greedy_matches_llama_cpp() {
    let cases = support::greedy_cases("smollm2-public");
    assert_eq!(cases.len(), 10);
    let res = agreement(support::smollm2(), &cases);
    let full = res.iter().filter(|r| r.2).count();
    assert!(full >= 7, "only {full}/10 prompts match all tokens: {res:?}");
    for (i, (prefix, len, _)) in res.iter().enumerate() {
        assert!(*prefix >= 8.min(*len), "prompt {i} diverges after {prefix} tokens");
    }
}

#[test]
fn gemma3_greedy_matches_llama_cpp() {
    let cases = support::greedy_cases("gemma3-public");
    let res = agreement(support::gemma3(), &cases);
    let first8 = res.iter().filter(|(p, len, _)| *p >= 8.min(*len)).count();
    assert!(first8 >= 8, "only {first8}/10 prompts match their first 8 tokens: {res:?}");
}
