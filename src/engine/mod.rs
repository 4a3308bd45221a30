//! The generation engine: one OS thread owns the model weights and every sequence's KV state.
//!
//! Callers submit a [`Job`] through a bounded queue (full queue = immediate [`SubmitError::QueueFull`],
//! never a wait) and receive [`Event`]s on the job's own channel. A job whose receiver is dropped is
//! removed before its next decoding step. Several sequences are interleaved token by token, each
//! with its own [`KvCache`] over the shared weights; long prompts are prefilled in chunks so they do
//! not stall the sequences already decoding.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use serde::Serialize;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

mod bundle;
pub use bundle::{BundleError, ModelBundle};

use crate::guard::grammar::GuardMatcher;
use crate::model::{BatchItem, KvCache, Model, ModelError, Weights};
use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::{StopFilter, StreamDecoder, Tokenizer};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Jobs waiting for a decoding slot; beyond this, submissions are refused at once.
    pub queue_capacity: usize,
    /// Sequences decoded concurrently.
    pub max_active: usize,
    /// Prompt tokens processed per step of one sequence, so others keep decoding meanwhile.
    pub prefill_chunk: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { queue_capacity: 64, max_active: 4, prefill_chunk: 256 }
    }
}

/// What exists once a model has loaded: its files, the engine thread that owns it, and the
/// compiler of output constraints for its tokenizer (built once: it walks the vocabulary).
pub struct Loaded {
    pub bundle: ModelBundle,
    pub engine: Engine,
    pub guard: Arc<crate::guard::grammar::GuardCompiler>,
}

/// One generation request, already tokenized and validated.
#[derive(Debug, Clone)]
pub struct Job {
    /// Full prompt ids (BOS and special tokens included).
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Drop special tokens (e.g. end-of-turn markers) from the streamed text.
    pub skip_special: bool,
    /// A decode-time constraint: before each token is sampled, every token it does not allow gets
    /// a logit of minus infinity (greedy and sampled decoding alike), so nothing it forbids can be
    /// generated or streamed. A token the constraint then refuses ends the job with an error.
    pub guard: Option<JobGuard>,
}

/// The per-sequence constraint of a [`Job`].
#[derive(Clone)]
pub struct JobGuard(pub Box<GuardMatcher>);

impl std::fmt::Debug for JobGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobGuard")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// The output constraints (a client's structured output and the policy pack) left no token
    /// that satisfies both: the answer ends here rather than break either.
    ContentFilter,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_ms: f64,
    pub generation_ms: f64,
    pub prompt_tokens_per_second: f64,
    pub generation_tokens_per_second: f64,
    /// Time from admission to the first generated token.
    pub time_to_first_token_ms: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token and the text it completes (may be empty: partial UTF-8 or a possible stop string is held back).
    Token { id: u32, text: String },
    /// The job ended; `text` is the final flush of held-back text.
    Done { reason: FinishReason, text: String, timings: Timings },
    Error(String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the queue is full ({capacity} jobs waiting); retry later")]
    QueueFull { capacity: usize },
    #[error("the prompt has {prompt_tokens} tokens; the model's context holds {max} (at least one position must remain for the answer)")]
    PromptTooLong { prompt_tokens: usize, max: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("invalid sampling parameter: {0}")]
    BadParams(#[from] crate::sampler::ParamError),
    #[error("the engine has stopped")]
    Stopped,
}

/// Live counters, readable from any thread.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
    pub prompt_tokens_total: AtomicU64,
    pub generated_tokens_total: AtomicU64,
    pub completed_total: AtomicU64,
    pub cancelled_total: AtomicU64,
    pub rejected_total: AtomicU64,
    /// Token masks computed for constrained sequences, and the time they took (nanoseconds).
    pub masks_total: AtomicU64,
    pub mask_nanos_total: AtomicU64,
    pub mask_nanos_max: AtomicU64,
}

impl EngineStats {
    fn record_mask(&self, elapsed: Duration) {
        let nanos = elapsed.as_nanos().min(u64::MAX as u128) as u64;
        self.masks_total.fetch_add(1, Ordering::Relaxed);
        self.mask_nanos_total.fetch_add(nanos, Ordering::Relaxed);
        self.mask_nanos_max.fetch_max(nanos, Ordering::Relaxed);
    }

    /// Time the same step spent checking the sampled token against the other constraints (and,
    /// when one refused it, the full mask), added to the step's mask time.
    fn add_mask_time(&self, elapsed: Duration) {
        let nanos = elapsed.as_nanos().min(u64::MAX as u128) as u64;
        self.mask_nanos_total.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// Handle to the engine thread. Dropping it stops the thread once queued work is done.
pub struct Engine {
    tx: Option<Sender<(Job, UnboundedSender<Event>)>>,
    stats: Arc<EngineStats>,
    tokenizer: Arc<Tokenizer>,
    max_positions: usize,
    queue_capacity: usize,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    pub fn start(model: &Model, tokenizer: Arc<Tokenizer>, cfg: EngineConfig) -> Result<Engine, ModelError> {
        let (tx, rx) = crossbeam_channel::bounded(cfg.queue_capacity.max(1));
        let stats = Arc::new(EngineStats::default());
        let weights = model.weights.clone();
        let max_positions = weights.max_positions();
        let worker = Worker {
            weights,
            tokenizer: tokenizer.clone(),
            rx,
            stats: stats.clone(),
            max_active: cfg.max_active.max(1),
            prefill_chunk: cfg.prefill_chunk.max(1),
            active: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("helpline-engine".into())
            .spawn(move || worker.run())
            .map_err(|e| ModelError::BadInput(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            tx: Some(tx),
            stats,
            tokenizer,
            max_positions,
            queue_capacity: cfg.queue_capacity.max(1),
            thread: Some(thread),
        })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Whether the engine thread is alive and accepting jobs.
    pub fn is_running(&self) -> bool {
        self.tx.is_some() && self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Queues a job; returns its event stream, or refuses at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<UnboundedReceiver<Event>, SubmitError> {
        if job.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if job.prompt.len() >= self.max_positions {
            return Err(SubmitError::PromptTooLong { prompt_tokens: job.prompt.len(), max: self.max_positions });
        }
        job.params.validate()?;
        if job.max_tokens == 0 {
            return Err(SubmitError::BadParams(crate::sampler::ParamError {
                field: "max_tokens",
                bound: "at least 1",
                value: "0".into(),
            }));
        }
        let (etx, erx) = unbounded_channel();
        let tx = self.tx.as_ref().ok_or(SubmitError::Stopped)?;
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        match tx.try_send((job, etx)) {
            Ok(()) => Ok(erx),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                match e {
                    TrySendError::Full(_) => {
                        self.stats.rejected_total.fetch_add(1, Ordering::Relaxed);
                        Err(SubmitError::QueueFull { capacity: self.queue_capacity })
                    }
                    TrySendError::Disconnected(_) => Err(SubmitError::Stopped),
                }
            }
        }
    }

    /// Stops accepting jobs, lets the queued and active ones finish, and joins the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits for a job's events (blocking the calling thread) and collects its text, streamed ids,
/// finish reason and timings. Convenience for tests and simple callers.
pub fn collect(mut rx: UnboundedReceiver<Event>) -> Result<(String, Vec<u32>, FinishReason, Timings), String> {
    let mut text = String::new();
    let mut ids = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token { id, text: t } => {
                ids.push(id);
                text.push_str(&t);
            }
            Event::Done { reason, text: t, timings } => {
                text.push_str(&t);
                return Ok((text, ids, reason, timings));
            }
            Event::Error(e) => return Err(e),
        }
    }
    Err("the engine stopped before the job finished".into())
}

struct Sequence {
    events: UnboundedSender<Event>,
    context: Vec<u32>,
    prompt_len: usize,
    prefilled: usize,
    max_tokens: usize,
    cache: KvCache,
    sampler: Sampler,
    guard: Option<GuardMatcher>,
    decoder: StreamDecoder,
    stops: StopFilter,
    admitted: Instant,
    prompt_done: Option<Instant>,
    first_token: Option<Instant>,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.context.len() - self.prompt_len
    }
}

enum Step {
    Continue,
    Finished,
}

struct Worker {
    weights: Arc<Weights>,
    tokenizer: Arc<Tokenizer>,
    rx: Receiver<(Job, UnboundedSender<Event>)>,
    stats: Arc<EngineStats>,
    max_active: usize,
    prefill_chunk: usize,
    active: Vec<Sequence>,
}

impl Worker {
    fn run(mut self) {
        while self.admit() {
            let before = self.active.len();
            self.active.retain(|seq| {
                let gone = seq.events.is_closed();
                if gone {
                    self.stats.cancelled_total.fetch_add(1, Ordering::Relaxed);
                }
                !gone
            });
            if self.active.len() != before {
                self.stats.active.store(self.active.len(), Ordering::SeqCst);
            }
            if !self.active.is_empty() {
                self.step_all();
            }
        }
    }

    /// One batched step over every active sequence: each contributes a prefill chunk or its last
    /// token to a single forward pass; then each samples, streams, and maybe finishes.
    fn step_all(&mut self) {
        let chunk = self.prefill_chunk;
        let mut items = Vec::with_capacity(self.active.len());
        for seq in self.active.iter_mut() {
            let range = if seq.prefilled < seq.prompt_len {
                seq.prefilled..(seq.prefilled + chunk).min(seq.prompt_len)
            } else {
                seq.context.len() - 1..seq.context.len()
            };
            let Sequence { context, cache, .. } = seq;
            items.push(BatchItem { tokens: &context[range], cache });
        }
        let outcome = self.weights.forward_batch(&mut items);
        drop(items);
        let results: Vec<Result<Step, ModelError>> = match outcome {
            Ok(all_logits) => {
                let mut results = Vec::with_capacity(all_logits.len());
                for (i, logits) in all_logits.into_iter().enumerate() {
                    results.push(self.after_forward(i, logits));
                }
                results
            }
            Err(e) => {
                let msg = e.to_string();
                (0..self.active.len()).map(|_| Err(ModelError::BadInput(msg.clone()))).collect()
            }
        };
        // Remove finished sequences from the back so indices stay valid.
        for (i, result) in results.into_iter().enumerate().rev() {
            let finished = match result {
                Ok(Step::Continue) => false,
                Ok(Step::Finished) => {
                    self.stats.completed_total.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(e) => {
                    let _ = self.active[i].events.send(Event::Error(e.to_string()));
                    true
                }
            };
            if finished {
                self.active.remove(i);
            }
        }
        self.stats.active.store(self.active.len(), Ordering::SeqCst);
    }

    /// Moves queued jobs into free slots. Blocks when idle. Returns false once the engine is
    /// stopped and nothing is left to do.
    fn admit(&mut self) -> bool {
        while self.active.len() < self.max_active {
            let next = if self.active.is_empty() {
                match self.rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(job) => Some(job),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => return true,
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return false,
                }
            } else {
                match self.rx.try_recv() {
                    Ok(job) => Some(job),
                    Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => None,
                }
            };
            let Some((job, events)) = next else { break };
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            if events.is_closed() {
                self.stats.cancelled_total.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let room = self.weights.max_positions() - job.prompt.len();
            self.stats.prompt_tokens_total.fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
            self.active.push(Sequence {
                events,
                prompt_len: job.prompt.len(),
                context: job.prompt,
                prefilled: 0,
                max_tokens: job.max_tokens.min(room),
                cache: self.weights.new_cache(),
                sampler: Sampler::new(job.params),
                guard: job.guard.map(|g| *g.0),
                decoder: StreamDecoder::new(self.tokenizer.clone(), job.skip_special),
                stops: StopFilter::new(job.stop),
                admitted: Instant::now(),
                prompt_done: None,
                first_token: None,
            });
            self.stats.active.store(self.active.len(), Ordering::SeqCst);
        }
        true
    }

    /// Handles sequence `i` after the forward pass that gave `logits`: moves its prefill on, or
    /// samples, streams and checks the end conditions.
    fn after_forward(&mut self, i: usize, logits: candle_core::Tensor) -> Result<Step, ModelError> {
        let seq = &mut self.active[i];
        if seq.prefilled < seq.prompt_len {
            seq.prefilled = (seq.prefilled + self.prefill_chunk).min(seq.prompt_len);
            if seq.prefilled < seq.prompt_len {
                return Ok(Step::Continue);
            }
            seq.prompt_done = Some(Instant::now());
        }
        let mut logits: Vec<f32> = logits.to_vec1()?;
        // Several constraints: the first one's mask, then a check of the sampled token against
        // the others; the full mask only when they refuse it (see `GuardMatcher::fill_first_mask`).
        let backup = seq.guard.as_ref().filter(|g| g.parts() > 1).map(|_| logits.clone());
        if let Some(guard) = seq.guard.as_mut() {
            match guard.fill_first_mask(&mut logits) {
                Ok(m) => self.stats.record_mask(m.elapsed),
                Err(e) => return Ok(fail(seq, format!("the output constraint failed: {e}"))),
            }
        }
        let generated = seq.generated();
        let mut id = seq.sampler.sample(&mut logits, &seq.context, generated);
        if let (Some(guard), Some(mut full)) = (seq.guard.as_mut(), backup) {
            let started = Instant::now();
            match guard.others_allow(id) {
                Ok(true) => {}
                Ok(false) => match guard.fill_mask(&mut full) {
                    Ok(_) => id = seq.sampler.sample(&mut full, &seq.context, generated),
                    Err(crate::guard::grammar::GuardError::DeadEnd) => return Ok(finish(seq, FinishReason::ContentFilter)),
                    Err(e) => return Ok(fail(seq, format!("the output constraint failed: {e}"))),
                },
                Err(e) => return Ok(fail(seq, format!("the output constraint failed: {e}"))),
            }
            self.stats.add_mask_time(started.elapsed());
        }
        seq.first_token.get_or_insert_with(Instant::now);
        self.stats.generated_tokens_total.fetch_add(1, Ordering::Relaxed);
        if self.tokenizer.eog_ids().contains(&id) {
            return Ok(finish(seq, FinishReason::Stop));
        }
        if let Some(guard) = seq.guard.as_mut() {
            // Fail closed: a token the constraint refuses is never streamed.
            if let Err(e) = guard.accept(id) {
                return Ok(fail(seq, format!("the output constraint refused token {id}: {e}")));
            }
        }
        seq.context.push(id);
        let piece = seq.decoder.push(id);
        let (text, stopped) = seq.stops.push(&piece);
        if seq.events.send(Event::Token { id, text }).is_err() {
            // Receiver gone: the loop drops the sequence before its next step.
            return Ok(Step::Continue);
        }
        if stopped {
            return Ok(finish_without_flush(seq, FinishReason::Stop));
        }
        if seq.generated() >= seq.max_tokens {
            return Ok(finish(seq, FinishReason::Length));
        }
        if seq.guard.as_ref().is_some_and(GuardMatcher::is_stopped) {
            // The constraint's grammar is complete: nothing more may follow.
            return Ok(finish(seq, FinishReason::Stop));
        }
        Ok(Step::Continue)
    }
}

fn fail(seq: &mut Sequence, message: String) -> Step {
    let _ = seq.events.send(Event::Error(message));
    Step::Finished
}

fn finish(seq: &mut Sequence, reason: FinishReason) -> Step {
    let tail = seq.decoder.finish();
    let (mut text, stopped) = seq.stops.push(&tail);
    if !stopped {
        text.push_str(&seq.stops.finish());
    }
    send_done(seq, if stopped { FinishReason::Stop } else { reason }, text)
}

fn finish_without_flush(seq: &mut Sequence, reason: FinishReason) -> Step {
    send_done(seq, reason, String::new())
}

fn send_done(seq: &mut Sequence, reason: FinishReason, text: String) -> Step {
    let now = Instant::now();
    let prompt_done = seq.prompt_done.unwrap_or(now);
    let prompt_ms = ms(prompt_done - seq.admitted);
    let generation_ms = ms(now - prompt_done);
    let generated = seq.generated();
    let timings = Timings {
        prompt_tokens: seq.prompt_len,
        generated_tokens: generated,
        prompt_ms,
        generation_ms,
        prompt_tokens_per_second: per_second(seq.prompt_len, prompt_ms),
        generation_tokens_per_second: per_second(generated, generation_ms),
        time_to_first_token_ms: seq.first_token.map(|t| ms(t - seq.admitted)).unwrap_or(0.0),
    };
    let _ = seq.events.send(Event::Done { reason, text, timings });
    Step::Finished
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn per_second(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 * 1000.0 / ms
    } else {
        0.0
    }
}
