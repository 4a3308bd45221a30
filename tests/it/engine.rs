//! The engine on the real default model: concurrency, cancellation, queueing, stop strings, seeds.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use helpline::engine::{collect, Engine, EngineConfig, Event, FinishReason, Job, SubmitError};
use helpline::sampler::SamplingParams;
use helpline::tokenizer::ChatMessage;

use crate::support;

fn engine(max_active: usize, queue_capacity: usize) -> Engine {
    let b = support::smollm2_bundle();
    Engine::start(&b.model, b.tokenizer.clone(), EngineConfig { queue_capacity, max_active, prefill_chunk: 16 }).unwrap()
}

fn prompt(question: &str) -> Vec<u32> {
    support::smollm2_bundle().chat_prompt(&[ChatMessage { role: "user".into(), content: question.into() }]).unwrap()
}

fn job(question: &str, params: SamplingParams, max_tokens: usize) -> Job {
    Job { prompt: prompt(question), params, max_tokens, stop: vec![], skip_special: true, guard: None }
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams { temperature: 1.0, top_k: 40, top_p: 0.95, seed, ..Default::default() }
}

#[test]
fn greedy_answer_ends_at_end_of_turn_with_reference_text() {
    let e = engine(1, 4);
    let (text, ids, reason, timings) = collect(e.submit(job("Hi!", SamplingParams::greedy(), 64)).unwrap()).unwrap();
    // llama.cpp's greedy answer for this prompt (tests/reference/smollm2-public.greedy.jsonl).
    assert_eq!(text, "Hello! How can I assist you today?");
    assert_eq!(reason, FinishReason::Stop);
    assert_eq!(timings.generated_tokens, ids.len());
    assert!(timings.prompt_tokens_per_second > 0.0 && timings.generation_tokens_per_second > 0.0);
}

#[test]
fn concurrent_jobs_produce_the_same_output_as_sequential_ones() {
    let questions = ["How do I reset my password?", "What is two-factor authentication?", "Can I get a refund?", "Hi!"];
    let params = |i: usize| if i.is_multiple_of(2) { SamplingParams::greedy() } else { sampled(i as u64) };
    let e = engine(1, 8);
    let sequential: Vec<_> =
        questions.iter().enumerate().map(|(i, q)| collect(e.submit(job(q, params(i), 24)).unwrap()).unwrap().1).collect();
    drop(e);
    let e = engine(4, 8);
    let receivers: Vec<_> = questions.iter().enumerate().map(|(i, q)| e.submit(job(q, params(i), 24)).unwrap()).collect();
    let concurrent: Vec<_> = receivers.into_iter().map(|rx| collect(rx).unwrap().1).collect();
    assert_eq!(sequential, concurrent);
    assert!(sequential.iter().all(|ids| !ids.is_empty()));
}

#[test]
fn same_seed_same_output_other_seed_differs() {
    let e = engine(2, 8);
    let run = |seed| collect(e.submit(job("Tell me about your plans and pricing.", sampled(seed), 32)).unwrap()).unwrap().1;
    let a = run(11);
    assert_eq!(a, run(11));
    assert_ne!(a, run(12));
}

#[test]
fn stop_string_split_across_tokens_is_never_streamed() {
    let e = engine(1, 4);
    // Greedy answer starts "To reset your password, you'll need to use a reputable online service".
    // The stop text starts inside the token " need" and ends inside " reputable".
    for (stop, expected) in [
        ("reputable online", "To reset your password, you'll need to use a "),
        ("eed to use a rep", "To reset your password, you'll n"),
    ] {
        let mut j = job("How do I reset my password?", SamplingParams::greedy(), 64);
        j.stop = vec![stop.to_string()];
        let mut rx = e.submit(j).unwrap();
        let mut streamed = String::new();
        let mut reason = None;
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Token { text, .. } => {
                    streamed.push_str(&text);
                    assert!(expected.starts_with(&streamed), "leaked past the stop: {streamed:?}");
                }
                Event::Done { reason: r, text, .. } => {
                    streamed.push_str(&text);
                    reason = Some(r);
                }
                Event::Error(e) => panic!("{e}"),
            }
        }
        assert_eq!(streamed, expected);
        assert_eq!(reason, Some(FinishReason::Stop));
    }
}

#[test]
fn streamed_text_is_complete_utf8_and_equals_the_decoded_ids() {
    let e = engine(1, 4);
    let rx = e.submit(job("Translate to French: Your ticket has been escalated.", SamplingParams::greedy(), 48)).unwrap();
    let (text, ids, _, _) = collect(rx).unwrap();
    assert!(text.contains("déjà"), "{text}");
    assert!(!text.contains('\u{FFFD}'));
    assert_eq!(text, support::smollm2_bundle().tokenizer.decode(&ids, true));
}

#[test]
fn max_tokens_ends_with_length() {
    let e = engine(1, 4);
    let (_, ids, reason, _) = collect(e.submit(job("Write a long story about a ticket.", SamplingParams::greedy(), 5)).unwrap()).unwrap();
    assert_eq!(ids.len(), 5);
    assert_eq!(reason, FinishReason::Length);
}

#[test]
fn dropped_receiver_frees_the_sequence_within_one_step() {
    let e = engine(2, 8);
    let stats = e.stats().clone();
    let mut rx = e.submit(job("Write a long story about a ticket.", SamplingParams::greedy(), 400)).unwrap();
    for _ in 0..3 {
        assert!(matches!(rx.blocking_recv(), Some(Event::Token { .. })));
    }
    drop(rx);
    let at_drop = stats.generated_tokens_total.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.active.load(Ordering::SeqCst) > 0 {
        assert!(Instant::now() < deadline, "sequence still active after its receiver was dropped");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = stats.generated_tokens_total.load(Ordering::SeqCst);
    assert!(after - at_drop <= 1, "kept generating after the receiver was dropped: {} more tokens", after - at_drop);
    assert_eq!(stats.cancelled_total.load(Ordering::SeqCst), 1);

    // Many streams opened and dropped: nothing keeps generating.
    let receivers: Vec<_> = (0..6).map(|_| e.submit(job("Tell me a long story.", SamplingParams::greedy(), 400)).unwrap()).collect();
    drop(receivers);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.active.load(Ordering::SeqCst) > 0 || stats.queued.load(Ordering::SeqCst) > 0 {
        assert!(Instant::now() < deadline, "streams still alive after being dropped");
        std::thread::sleep(Duration::from_millis(5));
    }
    let settled = stats.generated_tokens_total.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stats.generated_tokens_total.load(Ordering::SeqCst), settled);
    assert_eq!(stats.cancelled_total.load(Ordering::SeqCst), 7);
}

#[test]
fn full_queue_refuses_at_once() {
    let e = engine(1, 1);
    let _running = e.submit(job("Write a long story about a ticket.", SamplingParams::greedy(), 200)).unwrap();
    let start = Instant::now();
    let results: Vec<_> = (0..3).map(|_| e.submit(job("Hi!", SamplingParams::greedy(), 4))).collect();
    assert!(start.elapsed() < Duration::from_millis(500), "submission waited");
    assert!(results.iter().any(|r| matches!(r, Err(SubmitError::QueueFull { capacity: 1 }))));
    assert!(e.stats().rejected_total.load(Ordering::SeqCst) >= 1);
}

#[test]
fn bad_jobs_are_refused_with_what_to_change() {
    let e = engine(1, 4);
    let max = e.max_positions();
    let long = Job { prompt: vec![1; max], params: SamplingParams::greedy(), max_tokens: 1, stop: vec![], skip_special: true, guard: None };
    let err = e.submit(long).unwrap_err();
    assert_eq!(err, SubmitError::PromptTooLong { prompt_tokens: max, max });
    assert!(err.to_string().contains(&format!("{max} tokens")));
    let err = e.submit(job("Hi!", SamplingParams { top_p: 0.0, ..Default::default() }, 4)).unwrap_err();
    assert!(err.to_string().contains("`top_p` must be in (0, 1]"), "{err}");
    let empty = Job { prompt: vec![], params: SamplingParams::greedy(), max_tokens: 1, stop: vec![], skip_special: true, guard: None };
    assert_eq!(e.submit(empty).unwrap_err(), SubmitError::EmptyPrompt);
}
