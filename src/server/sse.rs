//! Shaping answers into OpenAI responses: one JSON body, or a server-sent-event stream
//! (`chat.completion.chunk` / `text_completion` events, then `data: [DONE]`).
//!
//! Chat answers come from the turn ([`crate::turn::Answer`]) already checked and recorded; this
//! module only formats them. Text completions come straight from the engine.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use super::dto::{
    AssistantMessage, AssistantRole, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionChunkObject,
    ChatCompletionObject, ChatDelta, ErrorDetail, ErrorResponse, FinishReason, HelplineInfo, TextChoice, TextCompletion, TextCompletionObject,
    TimingsOut, Usage,
};
use super::SharedState;
use crate::engine::{Event, Timings};
use crate::turn::{Answer, Finished, TurnEvent};

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
}

impl Meta {
    /// The non-streamed chat answer.
    pub fn chat_whole(&self, f: Finished) -> Response {
        let message = AssistantMessage {
            role: AssistantRole::Assistant,
            content: (!f.content_null).then(|| f.text.clone()),
            refusal: f.refusal.clone(),
            tool_calls: (!f.tool_calls.is_empty()).then(|| f.tool_calls.iter().map(call_out).collect()),
        };
        Json(ChatCompletion {
            id: self.id.clone(),
            object: ChatCompletionObject::ChatCompletion,
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChatChoice { index: 0, message, logprobs: None, finish_reason: f.reason }],
            usage: f.usage,
            system_fingerprint: self.system_fingerprint.clone(),
            helpline: f.info,
        })
        .into_response()
    }

    /// The non-streamed text completion.
    pub fn text_whole(&self, text: String, reason: FinishReason, completion_tokens: usize, timings: &Timings) -> Response {
        Json(TextCompletion {
            id: self.id.clone(),
            object: TextCompletionObject::TextCompletion,
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.system_fingerprint.clone(),
            choices: vec![TextChoice { text, index: 0, logprobs: None, finish_reason: Some(reason) }],
            usage: Some(Some(Usage::new(self.prompt_tokens, completion_tokens))),
            helpline: Some(plain_info(timings)),
        })
        .into_response()
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
                let delta = ChatDelta { role: Some(AssistantRole::Assistant), content: Some(String::new()), refusal: None, tool_calls: None };
                Some(json_event(&self.chat_chunk(vec![chat_choice(delta, None)], None, None)))
            }
            Flavor::Text => None,
        }
    }

    fn content(&self, text: String) -> SseEvent {
        match self.flavor {
            Flavor::Chat => {
                let delta = ChatDelta { role: None, content: Some(text), refusal: None, tool_calls: None };
                json_event(&self.chat_chunk(vec![chat_choice(delta, None)], None, None))
            }
            Flavor::Text => json_event(&self.text_chunk(vec![text_choice(text, None)], None, None)),
        }
    }

    fn finish_with(&self, reason: FinishReason, helpline: HelplineInfo) -> SseEvent {
        let helpline = Some(helpline);
        match self.flavor {
            Flavor::Chat => json_event(&self.chat_chunk(vec![chat_choice(ChatDelta::default(), Some(reason))], None, helpline)),
            Flavor::Text => json_event(&self.text_chunk(vec![text_choice(String::new(), Some(reason))], None, helpline)),
        }
    }

    /// A call as two deltas of its index: the id, type and name, then the arguments.
    fn tool_call(&self, index: usize, call: &crate::turn::tools::ToolCall) -> [SseEvent; 2] {
        use super::dto::{FunctionCallIo, ToolCallDelta};
        let head = ToolCallDelta { index, id: Some(call.id.clone()), kind: Some("function".into()), function: FunctionCallIo { name: Some(call.name.clone()), arguments: Some(String::new()) } };
        let args = ToolCallDelta { index, id: None, kind: None, function: FunctionCallIo { name: None, arguments: Some(call.arguments.clone()) } };
        [head, args].map(|d| {
            let delta = ChatDelta { role: None, content: None, refusal: None, tool_calls: Some(vec![d]) };
            json_event(&self.chat_chunk(vec![chat_choice(delta, None)], None, None))
        })
    }

    /// The refusal text as its own delta (OpenAI's `delta.refusal`).
    fn refusal(&self, text: String) -> SseEvent {
        let delta = ChatDelta { role: None, content: None, refusal: Some(text), tool_calls: None };
        json_event(&self.chat_chunk(vec![chat_choice(delta, None)], None, None))
    }

    fn usage(&self, usage: Usage) -> SseEvent {
        match self.flavor {
            Flavor::Chat => json_event(&self.chat_chunk(Vec::new(), Some(usage), None)),
            Flavor::Text => json_event(&self.text_chunk(Vec::new(), Some(usage), None)),
        }
    }
}

/// The `helpline` object of an answer that is neither grounded nor guarded (text completions).
pub fn plain_info(timings: &Timings) -> HelplineInfo {
    HelplineInfo { timings: TimingsOut::from(timings), grounding: None, citations: None, handoff: None, guard: None, action: None, conversation_id: None, answer_id: None }
}

fn call_out(c: &crate::turn::tools::ToolCall) -> super::dto::ToolCallIo {
    super::dto::ToolCallIo {
        id: Some(c.id.clone()),
        kind: Some("function".into()),
        function: Some(super::dto::FunctionCallIo { name: Some(c.name.clone()), arguments: Some(c.arguments.clone()) }),
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

/// The error event a stream ends with when an answer fails after the headers went out.
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

fn sse_response<S>(events: S, keep_alive: Duration) -> Response
where
    S: Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
{
    if keep_alive.is_zero() {
        Sse::new(events).into_response()
    } else {
        Sse::new(events).keep_alive(KeepAlive::new().interval(keep_alive)).into_response()
    }
}

/// A chat turn's answer as an SSE stream. The stream owns the answer: when the client goes away,
/// hyper drops the body, the answer goes with it (the engine drops the sequence, the record is
/// stored as `disconnected`).
pub fn chat_stream(answer: Answer, meta: Meta, keep_alive: Duration) -> Response {
    let pending: VecDeque<SseEvent> = meta.opening().into_iter().collect();
    let state = (answer, meta, pending, false);
    let events = stream::unfold(state, |(mut answer, meta, mut pending, mut done)| async move {
        loop {
            if let Some(ev) = pending.pop_front() {
                return Some((Ok::<_, Infallible>(ev), (answer, meta, pending, done)));
            }
            if done {
                return None;
            }
            match answer.events.next().await {
                Some(TurnEvent::Text(t)) => pending.push_back(meta.content(t)),
                Some(TurnEvent::Done(f)) => {
                    for (i, call) in f.tool_calls.iter().enumerate() {
                        pending.extend(meta.tool_call(i, call));
                    }
                    if let Some(r) = &f.refusal {
                        pending.push_back(meta.refusal(r.clone()));
                    }
                    pending.push_back(meta.finish_with(f.reason, f.info.clone()));
                    if meta.include_usage {
                        pending.push_back(meta.usage(f.usage));
                    }
                    pending.push_back(SseEvent::default().data("[DONE]"));
                    done = true;
                }
                Some(TurnEvent::Failed(e)) => {
                    tracing::error!(id = %meta.id, detail = %e, "the answer failed mid-stream");
                    pending.push_back(error_event());
                    done = true;
                }
                None => {
                    pending.push_back(error_event());
                    done = true;
                }
            }
        }
    });
    sse_response(events, keep_alive)
}

/// Per-request token metrics of a text completion: time to first token (from submission, so
/// queueing counts) and the gaps between consecutive tokens.
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

    /// Tokens generated so far (the answer's `completion_tokens`).
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// A text completion as an SSE stream, with a keep-alive comment after every `keep_alive` without
/// an event (zero: none). The stream owns `rx`; dropping the response body (client gone) drops it.
pub fn text_stream(rx: UnboundedReceiver<Event>, meta: Meta, tracker: Tracker, keep_alive: Duration) -> Response {
    let state = (Some(rx), meta, tracker, VecDeque::<SseEvent>::new());
    let events = stream::unfold(state, |(mut rx, meta, mut tracker, mut pending)| async move {
        loop {
            if let Some(ev) = pending.pop_front() {
                return Some((Ok::<_, Infallible>(ev), (rx, meta, tracker, pending)));
            }
            let r = rx.as_mut()?;
            match r.recv().await {
                Some(Event::Token { text, .. }) => {
                    tracker.on_token();
                    if !text.is_empty() {
                        pending.push_back(meta.content(text));
                    }
                }
                Some(Event::Done { reason, text, timings }) => {
                    rx = None;
                    if !text.is_empty() {
                        pending.push_back(meta.content(text));
                    }
                    pending.push_back(meta.finish_with(reason.into(), plain_info(&timings)));
                    if meta.include_usage {
                        pending.push_back(meta.usage(Usage::new(meta.prompt_tokens, tracker.tokens())));
                    }
                    pending.push_back(SseEvent::default().data("[DONE]"));
                }
                Some(Event::Error(e)) => {
                    tracing::error!(id = %meta.id, detail = %e, "generation failed mid-stream");
                    rx = None;
                    pending.push_back(error_event());
                }
                None => {
                    tracing::error!(id = %meta.id, "the engine dropped a streamed request before it finished");
                    rx = None;
                    pending.push_back(error_event());
                }
            }
        }
    });
    sse_response(events, keep_alive)
}
