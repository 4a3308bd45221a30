//! Shaping engine events into OpenAI answers: one JSON body, or a server-sent-event stream
//! (`chat.completion.chunk` / `text_completion` events, then `data: [DONE]`), plus the
//! per-request latency metrics.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use super::dto::{
    AssistantMessage, AssistantRole, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionChunkObject,
    ChatCompletionObject, ChatDelta, ErrorDetail, ErrorResponse, FinishReason, GroundingStatus, HelplineInfo, TextChoice, TextCompletion,
    TextCompletionObject, TimingsOut, Usage,
};
use super::grounding::{Closing, GroundingCtx};
use super::record::Recorder;
use super::SharedState;
use crate::engine::{Event, Timings};
use crate::prompt::CitationFilter;

/// Which OpenAI endpoint the answer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Text,
}

impl Flavor {
    pub fn id_prefix(self) -> &'static str {
        match self {
            Flavor::Chat => "chatcmpl-",
            Flavor::Text => "cmpl-",
        }
    }
}

pub fn system_fingerprint() -> String {
    format!("helpline-{}", env!("CARGO_PKG_VERSION"))
}

/// What every chunk of one answer repeats.
#[derive(Debug, Clone)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub flavor: Flavor,
    pub prompt_tokens: usize,
    pub include_usage: bool,
    /// Chat answers: how the answer is grounded (reported in the final chunk).
    pub grounding: Option<GroundingCtx>,
    /// The answer is a fixed text (a refusal or handoff), not the model's.
    pub fixed: bool,
    /// Chat answers: the stored conversation and answer.
    pub conversation_id: Option<String>,
    pub answer_id: Option<String>,
}

impl Meta {
    /// The non-streaming answer.
    pub fn whole(
        &self,
        text: String,
        reason: FinishReason,
        completion_tokens: usize,
        timings: &Timings,
        closing: Option<Closing>,
    ) -> Response {
        let helpline = self.helpline(timings, closing);
        self.respond(text, reason, completion_tokens, helpline)
    }

    /// The non-streaming answer with its `helpline` object already made.
    pub fn respond(&self, text: String, reason: FinishReason, completion_tokens: usize, helpline: HelplineInfo) -> Response {
        let usage = Usage::new(self.prompt_tokens, completion_tokens);
        let message = match self.structured_refusal(reason, &text) {
            Some(refusal) => AssistantMessage { role: AssistantRole::Assistant, content: None, refusal: Some(refusal) },
            None => AssistantMessage {
                role: AssistantRole::Assistant,
                refusal: (reason == FinishReason::ContentFilter).then(|| text.clone()),
                content: Some(text.clone()),
            },
        };
        match self.flavor {
            Flavor::Chat => Json(ChatCompletion {
                id: self.id.clone(),
                object: ChatCompletionObject::ChatCompletion,
                created: self.created,
                model: self.model.clone(),
                choices: vec![ChatChoice {
                    index: 0,
                    message,
                    logprobs: None,
                    finish_reason: reason,
                }],
                usage,
                system_fingerprint: self.system_fingerprint.clone(),
                helpline,
            })
            .into_response(),
            Flavor::Text => Json(TextCompletion {
                id: self.id.clone(),
                object: TextCompletionObject::TextCompletion,
                created: self.created,
                model: self.model.clone(),
                system_fingerprint: self.system_fingerprint.clone(),
                choices: vec![TextChoice { text, index: 0, logprobs: None, finish_reason: Some(reason) }],
                usage: Some(Some(usage)),
                helpline: Some(helpline),
            })
            .into_response(),
        }
    }

    /// The `helpline` object of the answer's last chunk (or of the whole answer).
    pub fn helpline(&self, timings: &Timings, closing: Option<Closing>) -> HelplineInfo {
        let timings = TimingsOut::from(timings);
        let (conversation_id, answer_id) = (self.conversation_id.clone(), self.answer_id.clone());
        match &self.grounding {
            None => HelplineInfo { timings, grounding: None, citations: None, handoff: None, guard: None, conversation_id, answer_id },
            Some(g) => {
                let closing = closing.unwrap_or_else(|| g.close(None, ""));
                let grounding = (closing.info.status != GroundingStatus::Skipped).then_some(closing.info);
                HelplineInfo {
                    timings,
                    grounding,
                    citations: closing.citations,
                    handoff: g.handoff.clone(),
                    guard: closing.guard,
                    conversation_id,
                    answer_id,
                }
            }
        }
    }

    /// For a structured output the bot did not give (a fixed refusal or handoff, or the constraints
    /// reaching a dead end): the text for `refusal`, with `content` left null so that `content`,
    /// when present, always parses.
    fn structured_refusal(&self, reason: FinishReason, text: &str) -> Option<String> {
        let g = self.grounding.as_ref().filter(|g| g.structured)?;
        if self.fixed {
            Some(text.to_string())
        } else if reason == FinishReason::ContentFilter {
            Some(g.refusal_text.clone().unwrap_or_default())
        } else {
            None
        }
    }

    /// Ends a grounded answer: its closing report (see [`GroundingCtx::close`]).
    pub fn close(&self, filter: Option<&CitationFilter>, answer: &str) -> Option<Closing> {
        self.grounding.as_ref().map(|g| g.close(filter, answer))
    }

    /// `usage` of a streamed chunk: absent unless asked for, then null until the usage chunk.
    fn chunk_usage(&self, usage: Option<Usage>) -> Option<Option<Usage>> {
        self.include_usage.then_some(usage)
    }

    fn chat_chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>, helpline: Option<HelplineInfo>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: ChatCompletionChunkObject::ChatCompletionChunk,
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.system_fingerprint.clone(),
            choices,
            usage: self.chunk_usage(usage),
            helpline,
        }
    }

    fn text_chunk(&self, choices: Vec<TextChoice>, usage: Option<Usage>, helpline: Option<HelplineInfo>) -> TextCompletion {
        TextCompletion {
            id: self.id.clone(),
            object: TextCompletionObject::TextCompletion,
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.system_fingerprint.clone(),
            choices,
            usage: self.chunk_usage(usage),
            helpline,
        }
    }

    /// The chat stream opens with the assistant role and empty content, as OpenAI's does.
    fn opening(&self) -> Option<SseEvent> {
        match self.flavor {
            Flavor::Chat => {
                let delta = ChatDelta { role: Some(AssistantRole::Assistant), content: Some(String::new()), refusal: None };
                Some(json_event(&self.chat_chunk(vec![chat_choice(delta, None)], None, None)))
            }
            Flavor::Text => None,
        }
    }

    fn content(&self, text: String) -> SseEvent {
        match self.flavor {
            Flavor::Chat => {
                let delta = ChatDelta { role: None, content: Some(text), refusal: None };
                json_event(&self.chat_chunk(vec![chat_choice(delta, None)], None, None))
            }
            Flavor::Text => json_event(&self.text_chunk(vec![text_choice(text, None)], None, None)),
        }
    }

    fn finish(&self, reason: FinishReason, timings: &Timings, closing: Option<Closing>) -> SseEvent {
        self.finish_with(reason, self.helpline(timings, closing))
    }

    fn finish_with(&self, reason: FinishReason, helpline: HelplineInfo) -> SseEvent {
        let helpline = Some(helpline);
        match self.flavor {
            Flavor::Chat => json_event(&self.chat_chunk(vec![chat_choice(ChatDelta::default(), Some(reason))], None, helpline)),
            Flavor::Text => json_event(&self.text_chunk(vec![text_choice(String::new(), Some(reason))], None, helpline)),
        }
    }

    /// The refusal text as its own delta (OpenAI's `delta.refusal`), after it was streamed as content.
    fn refusal(&self, text: String) -> SseEvent {
        let delta = ChatDelta { role: None, content: None, refusal: Some(text) };
        json_event(&self.chat_chunk(vec![chat_choice(delta, None)], None, None))
    }

    fn usage(&self, usage: Usage) -> SseEvent {
        match self.flavor {
            Flavor::Chat => json_event(&self.chat_chunk(Vec::new(), Some(usage), None)),
            Flavor::Text => json_event(&self.text_chunk(Vec::new(), Some(usage), None)),
        }
    }
}

/// What the store keeps about an answer: the `helpline` object's fields, the finish reason and usage.
pub fn detail(info: &HelplineInfo, reason: FinishReason, usage: Usage) -> serde_json::Value {
    // Through text, so f32 scores keep the short form the client saw (to_value widens them).
    let mut v: serde_json::Value = serde_json::to_string(info).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("finish_reason".into(), serde_json::json!(reason.as_str()));
        m.insert("usage".into(), serde_json::to_value(usage).unwrap_or_default());
    }
    v
}

/// An answer that does not come from the model (the grounding refusal): the same events a generated
/// answer has (role, content, final chunk with `helpline`, usage when asked, `[DONE]`).
/// A `content_filter` answer carries its text in `delta.refusal` as well as in `delta.content`.
pub fn fixed_answer(meta: Meta, text: String, finish: FinishReason, keep_alive: Duration) -> Response {
    let timings = Timings::default();
    let mut events: Vec<SseEvent> = meta.opening().into_iter().collect();
    if let Some(refusal) = meta.structured_refusal(finish, &text) {
        let delta = ChatDelta { role: None, content: None, refusal: Some(refusal) };
        events.push(json_event(&meta.chat_chunk(vec![chat_choice(delta, None)], None, None)));
    } else if finish == FinishReason::ContentFilter && meta.flavor == Flavor::Chat {
        let delta = ChatDelta { role: None, content: Some(text.clone()), refusal: Some(text) };
        events.push(json_event(&meta.chat_chunk(vec![chat_choice(delta, None)], None, None)));
    } else {
        events.push(meta.content(text));
    }
    events.push(meta.finish(finish, &timings, None));
    if meta.include_usage {
        events.push(meta.usage(Usage::new(meta.prompt_tokens, 0)));
    }
    events.push(SseEvent::default().data("[DONE]"));
    let events = stream::iter(events.into_iter().map(Ok::<_, Infallible>));
    if keep_alive.is_zero() {
        Sse::new(events).into_response()
    } else {
        Sse::new(events).keep_alive(KeepAlive::new().interval(keep_alive)).into_response()
    }
}

fn chat_choice(delta: ChatDelta, finish_reason: Option<FinishReason>) -> ChatChunkChoice {
    ChatChunkChoice { index: 0, delta, logprobs: None, finish_reason }
}

fn text_choice(text: String, finish_reason: Option<FinishReason>) -> TextChoice {
    TextChoice { text, index: 0, logprobs: None, finish_reason }
}

fn json_event<T: Serialize>(value: &T) -> SseEvent {
    // Serializing these plain structs cannot fail.
    SseEvent::default().data(serde_json::to_string(value).unwrap_or_default())
}

/// The error event a stream ends with when generation fails after the headers went out.
fn error_event() -> SseEvent {
    json_event(&ErrorResponse {
        error: ErrorDetail {
            message: "the server failed to finish this answer".into(),
            kind: "server_error".into(),
            code: "internal_error".into(),
            param: None,
        },
    })
}

/// Per-request token metrics: time to first token (from submission, so queueing counts) and the
/// gaps between consecutive tokens.
pub struct Tracker {
    state: SharedState,
    submitted: Instant,
    last: Option<Instant>,
    tokens: usize,
}

impl Tracker {
    pub fn new(state: SharedState, submitted: Instant) -> Self {
        Tracker { state, submitted, last: None, tokens: 0 }
    }

    pub fn on_token(&mut self) {
        let now = Instant::now();
        let metrics = &self.state.metrics;
        match self.last {
            None => metrics.observe_ttft((now - self.submitted).as_secs_f64()),
            Some(prev) => metrics.observe_itl((now - prev).as_secs_f64()),
        }
        metrics.add_generated_tokens(1);
        self.last = Some(now);
        self.tokens += 1;
    }

    /// The answer is complete: counts the citation markers that were removed.
    pub fn on_citations(&self, filter: &CitationFilter) {
        self.state.metrics.add_invalid_citations(filter.invalid() as u64);
    }

    /// Tokens generated so far (the answer's `completion_tokens`).
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

struct StreamState {
    /// `None` once the answer is complete: the receiver is dropped as soon as it is no longer needed.
    rx: Option<UnboundedReceiver<Event>>,
    meta: Meta,
    tracker: Tracker,
    pending: VecDeque<SseEvent>,
    /// Grounded answers: removes citation markers that name no given passage before they are sent.
    citations: Option<CitationFilter>,
    /// The text sent so far, for the closing report (support, attribution, the refusal branch).
    answer: String,
    /// Chat turns: the stored answer, completed before the final chunk goes out.
    recorder: Option<Recorder>,
}

/// The SSE answer, with a keep-alive comment after every `keep_alive` without an event (zero: none).
/// The stream owns `rx`; dropping the response body (client gone) drops it.
pub fn stream(rx: UnboundedReceiver<Event>, meta: Meta, tracker: Tracker, keep_alive: Duration, recorder: Option<Recorder>) -> Response {
    let events = events(rx, meta, tracker, recorder);
    if keep_alive.is_zero() {
        Sse::new(events).into_response()
    } else {
        Sse::new(events).keep_alive(KeepAlive::new().interval(keep_alive)).into_response()
    }
}

fn events(
    rx: UnboundedReceiver<Event>,
    meta: Meta,
    tracker: Tracker,
    recorder: Option<Recorder>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let pending: VecDeque<SseEvent> = meta.opening().into_iter().collect();
    let citations = meta.grounding.as_ref().and_then(GroundingCtx::citation_filter);
    let state = StreamState { rx: Some(rx), meta, tracker, pending, citations, answer: String::new(), recorder };
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(ev) = s.pending.pop_front() {
                return Some((Ok(ev), s));
            }
            let rx = s.rx.as_mut()?;
            match rx.recv().await {
                Some(Event::Token { text, .. }) => {
                    s.tracker.on_token();
                    let text = match s.citations.as_mut() {
                        Some(f) => f.push(&text),
                        None => text,
                    };
                    s.answer.push_str(&text);
                    if let Some(r) = s.recorder.as_mut() {
                        r.push(&text);
                    }
                    if !text.is_empty() {
                        s.pending.push_back(s.meta.content(text));
                    }
                }
                Some(Event::Done { reason, text, timings }) => {
                    s.rx = None;
                    let mut text = match s.citations.as_mut() {
                        Some(f) => {
                            let mut t = f.push(&text);
                            t.push_str(&f.finish());
                            s.tracker.on_citations(f);
                            t
                        }
                        None => text,
                    };
                    s.answer.push_str(&text);
                    let closing = s.meta.close(s.citations.as_ref(), &s.answer);
                    let mut reason: FinishReason = reason.into();
                    if let Some(c) = &closing {
                        text.push_str(&c.suffix);
                        if c.refused {
                            // The model took the policy grammar's refusal branch.
                            reason = FinishReason::ContentFilter;
                        }
                    }
                    if let Some(r) = s.recorder.as_mut() {
                        r.push(&text);
                    }
                    let whole = format!("{}{}", s.answer, closing.as_ref().map(|c| c.suffix.as_str()).unwrap_or(""));
                    if !text.is_empty() {
                        s.pending.push_back(s.meta.content(text));
                    }
                    if reason == FinishReason::ContentFilter {
                        let refusal = s.meta.structured_refusal(reason, &s.answer).unwrap_or_else(|| s.answer.clone());
                        s.pending.push_back(s.meta.refusal(refusal));
                    }
                    let info = s.meta.helpline(&timings, closing);
                    if let Some(r) = s.recorder.as_mut() {
                        // The answer is stored before the client is told it is complete.
                        let usage = Usage::new(s.meta.prompt_tokens, s.tracker.tokens());
                        if let Err(e) = r.finish(&whole, reason.as_str(), detail(&info, reason, usage)).await {
                            tracing::error!(id = %s.meta.id, error = %e.message, "cannot store the finished answer");
                            r.fail("the answer could not be stored").await;
                            s.pending.push_back(error_event());
                            continue;
                        }
                    }
                    s.pending.push_back(s.meta.finish_with(reason, info));
                    if s.meta.include_usage {
                        s.pending.push_back(s.meta.usage(Usage::new(s.meta.prompt_tokens, s.tracker.tokens())));
                    }
                    s.pending.push_back(SseEvent::default().data("[DONE]"));
                }
                Some(Event::Error(e)) => {
                    tracing::error!(id = %s.meta.id, detail = %e, "generation failed mid-stream");
                    s.rx = None;
                    if let Some(r) = s.recorder.as_mut() {
                        r.fail("generation failed").await;
                    }
                    s.pending.push_back(error_event());
                }
                None => {
                    tracing::error!(id = %s.meta.id, "the engine dropped a streamed request before it finished");
                    s.rx = None;
                    if let Some(r) = s.recorder.as_mut() {
                        r.fail("the engine dropped the request").await;
                    }
                    s.pending.push_back(error_event());
                }
            }
        }
    })
}
