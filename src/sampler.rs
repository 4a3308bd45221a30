//! Sampling parameters and the logits -> token step (penalties, top-k, top-p, min-p, temperature, seed).
//!
//! The order follows llama.cpp's default chain: penalties, top-k, top-p, min-p, temperature, draw.
//! Temperature 0 is greedy (argmax after penalties).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1 disables top-p.
    pub top_p: f32,
    /// 0 disables min-p.
    pub min_p: f32,
    pub seed: u64,
    /// Multiplicative penalty on logits of tokens seen in the last `repeat_last_n` tokens; 1 disables.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// OpenAI-style additive penalties over the generated tokens.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

/// A parameter outside its bounds; the message names the field and the bound.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{field}` must be {bound} (got {value})")]
pub struct ParamError {
    pub field: &'static str,
    pub bound: &'static str,
    pub value: String,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn validate(&self) -> Result<(), ParamError> {
        let check = |ok: bool, field: &'static str, bound: &'static str, value: f32| {
            if ok {
                Ok(())
            } else {
                Err(ParamError { field, bound, value: value.to_string() })
            }
        };
        let t = self.temperature;
        check(t.is_finite() && (0.0..=2.0).contains(&t), "temperature", "in [0, 2]", t)?;
        check(self.top_p > 0.0 && self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)?;
        check((0.0..=1.0).contains(&self.min_p), "min_p", "in [0, 1]", self.min_p)?;
        check(
            self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0 && self.repeat_penalty <= 10.0,
            "repeat_penalty",
            "in (0, 10]",
            self.repeat_penalty,
        )?;
        check((-2.0..=2.0).contains(&self.presence_penalty), "presence_penalty", "in [-2, 2]", self.presence_penalty)?;
        check((-2.0..=2.0).contains(&self.frequency_penalty), "frequency_penalty", "in [-2, 2]", self.frequency_penalty)?;
        if self.repeat_last_n > 1 << 20 {
            return Err(ParamError {
                field: "repeat_last_n",
                bound: "at most 1048576",
                value: self.repeat_last_n.to_string(),
            });
        }
        Ok(())
    }
}

/// Per-sequence sampler: parameters plus its own seeded random stream.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch buffer of (token, logit) candidates, reused between steps.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng, candidates: Vec::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `context` is the whole sequence so far (prompt and generated),
    /// `generated` the number of its trailing tokens that were generated.
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32], generated: usize) -> u32 {
        self.apply_penalties(logits, context, generated);
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let p = &self.params;
        self.candidates.clear();
        self.candidates.extend(logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l)));
        if self.candidates.is_empty() {
            return argmax(logits);
        }
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            self.candidates.truncate(p.top_k);
        }
        self.candidates.sort_unstable_by(by_logit_desc);

        // Probabilities at temperature 1 drive the top-p / min-p cut, as in llama.cpp.
        let probs = softmax(self.candidates.iter().map(|c| c.1));
        let mut keep = self.candidates.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, pr) in probs.iter().enumerate() {
                cum += pr;
                if cum >= p.top_p {
                    keep = keep.min(i + 1);
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let threshold = probs[0] * p.min_p;
            let n = probs.iter().take_while(|&&pr| pr >= threshold).count().max(1);
            keep = keep.min(n);
        }
        self.candidates.truncate(keep);

        let probs = softmax(self.candidates.iter().map(|c| c.1 / p.temperature));
        let r: f32 = self.rng.gen();
        let mut cum = 0.0;
        for (c, pr) in self.candidates.iter().zip(&probs) {
            cum += pr;
            if r < cum {
                return c.0;
            }
        }
        self.candidates.last().map(|c| c.0).unwrap_or(0)
    }

    fn apply_penalties(&self, logits: &mut [f32], context: &[u32], generated: usize) {
        let p = &self.params;
        if p.repeat_penalty != 1.0 && p.repeat_last_n > 0 {
            let window = &context[context.len().saturating_sub(p.repeat_last_n)..];
            let mut seen = std::collections::HashSet::new();
            for &id in window {
                if seen.insert(id) {
                    if let Some(l) = logits.get_mut(id as usize) {
                        *l = if *l > 0.0 { *l / p.repeat_penalty } else { *l * p.repeat_penalty };
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &id in &context[context.len().saturating_sub(generated)..] {
                *counts.entry(id).or_default() += 1;
            }
            for (id, n) in counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn softmax(logits: impl Iterator<Item = f32> + Clone) -> Vec<f32> {
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&mut logits(), &[], 0), 1);
    }

    #[test]
    fn same_seed_same_draws_other_seed_differs() {
        let params = SamplingParams { temperature: 1.5, seed: 42, ..Default::default() };
        let draw = |params: SamplingParams| {
            let mut s = Sampler::new(params);
            (0..64).map(|_| s.sample(&mut logits(), &[], 0)).collect::<Vec<_>>()
        };
        assert_eq!(draw(params.clone()), draw(params.clone()));
        assert_ne!(draw(params.clone()), draw(SamplingParams { seed: 7, ..params }));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_k_limits_choices() {
        let mut s = Sampler::new(SamplingParams { temperature: 2.0, top_k: 1, seed: 3, ..Default::default() });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits(), &[], 0), 1);
        }
        let mut s = Sampler::new(SamplingParams { temperature: 2.0, top_k: 2, seed: 3, ..Default::default() });
        for _ in 0..50 {
            assert!([1, 4].contains(&s.sample(&mut logits(), &[], 0)));
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.5, seed: 1, ..Default::default() });
        for _ in 0..50 {
            assert!([1, 4].contains(&s.sample(&mut logits(), &[], 0)));
        }
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, min_p: 0.5, seed: 1, ..Default::default() });
        for _ in 0..50 {
            assert!([1, 2, 4].contains(&s.sample(&mut logits(), &[], 0)));
        }
    }

    #[test]
    fn penalties_change_the_choice() {
        let mut s = Sampler::new(SamplingParams { repeat_penalty: 2.0, ..Default::default() });
        assert_eq!(s.sample(&mut logits(), &[1], 0), 4);
        let mut s = Sampler::new(SamplingParams { presence_penalty: 0.5, ..Default::default() });
        assert_eq!(s.sample(&mut logits(), &[1], 1), 4);
        // presence/frequency look only at generated tokens
        let mut s = Sampler::new(SamplingParams { frequency_penalty: 0.5, ..Default::default() });
        assert_eq!(s.sample(&mut logits(), &[1], 0), 1);
    }

    #[test]
    fn validation_names_field_and_bound() {
        let e = SamplingParams { top_p: 1.5, ..Default::default() }.validate().unwrap_err();
        assert_eq!(e.to_string(), "`top_p` must be in (0, 1] (got 1.5)");
        assert!(SamplingParams { temperature: -1.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
