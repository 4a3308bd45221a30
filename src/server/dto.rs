//! Wire types of the HTTP API. Requests follow OpenAI's shapes; Helpline's own additions live only
//! under a `helpline` key. Request fields are read leniently (unknown fields are ignored, numbers
//! are range-checked in `validate`, not by serde) so every out-of-range value gets the same 422.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use crate::turn::report::{
    BudgetOut, CitedBy, Dropped, FinishReason, GroundingInfo, GroundingStatus, GuardAction, GuardInfo, HandoffInfo, HelplineInfo, PassageOut,
    SentenceChecks, StructureInfo, TimingsOut, Usage,
};

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// Declares a generation request: its own fields plus the sampling fields both endpoints share
/// (kept flat, as OpenAI has them, without `serde(flatten)` so errors name the field at fault).
macro_rules! generation_request {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            /// Stream the answer as server-sent events, ending with `data: [DONE]`.
            pub stream: Option<bool>,
            pub stream_options: Option<StreamOptions>,
            /// Most tokens to generate (default: the server's `default_max_tokens`; at most its
            /// `max_tokens_limit`). When the prompt leaves less room in the model's context,
            /// generation stops there with `finish_reason: "length"`.
            #[schema(minimum = 1)]
            pub max_tokens: Option<i64>,
            /// Same as `max_tokens`; takes precedence when both are given.
            #[schema(minimum = 1)]
            pub max_completion_tokens: Option<i64>,
            /// 0 is greedy. Default 1.
            #[schema(minimum = 0, maximum = 2)]
            pub temperature: Option<f64>,
            /// Nucleus sampling mass. Default 1 (off).
            #[schema(exclusive_minimum = 0, maximum = 1)]
            pub top_p: Option<f64>,
            /// Seed of the sampler's random stream: the same seed and request give the same answer.
            /// Without one, a random seed is drawn.
            #[schema(minimum = 0)]
            pub seed: Option<u64>,
            /// Up to 4 non-empty strings; generation stops before the first one, which is not returned.
            pub stop: Option<Stop>,
            #[schema(minimum = -2, maximum = 2)]
            pub presence_penalty: Option<f64>,
            #[schema(minimum = -2, maximum = 2)]
            pub frequency_penalty: Option<f64>,
            /// Number of choices; only 1 is supported.
            #[schema(minimum = 1, maximum = 1)]
            pub n: Option<i64>,
            /// End-user identifier; accepted and ignored.
            pub user: Option<String>,
            /// Structured output: `{"type": "json_object"}` (any JSON object) or
            /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` (JSON valid
            /// against the schema); `{"type": "text"}` is the default. Enforced while decoding, so
            /// a complete answer always parses; the policy pack still applies inside it.
            pub response_format: Option<ResponseFormat>,
            /// Helpline's sampling extensions.
            pub helpline: Option<HelplineSampling>,
        }

        impl $name {
            /// The shared sampling fields.
            pub fn sampling(&self) -> SamplingFields {
                SamplingFields {
                    stream: self.stream,
                    stream_options: self.stream_options.clone(),
                    max_tokens: self.max_tokens,
                    max_completion_tokens: self.max_completion_tokens,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    seed: self.seed,
                    stop: self.stop.clone(),
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    n: self.n,
                    response_format: self.response_format.clone(),
                    helpline: self.helpline.clone(),
                }
            }
        }
    };
}

generation_request! {
    /// `POST /v1/chat/completions`.
    pub struct ChatCompletionRequest {
        /// The served model's id (or its file name). Optional: the one loaded model answers either way.
        pub model: Option<String>,
        /// The conversation, oldest first. At least one message.
        #[schema(value_type = Vec<ChatMessageIn>, required = true, min_items = 1)]
        pub messages: Option<Vec<ChatMessageIn>>,
        /// Functions the model may call (`{"type": "function", "function": {name, description,
        /// parameters}}`), at most 32. Needs grounding off (`helpline.grounding: false`). Calls are
        /// forced valid against each function's `parameters` while decoding (docs/tools.md).
        pub tools: Option<Vec<ToolIn>>,
        /// `"none"`, `"auto"` (the default with tools), `"required"`, or
        /// `{"type": "function", "function": {"name": ...}}`. Always honoured.
        #[schema(value_type = Option<Object>)]
        pub tool_choice: Option<serde_json::Value>,
        /// Several calls in one answer (default true).
        pub parallel_tool_calls: Option<bool>,
    }
}

/// A tool of a chat request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ToolIn {
    /// Only `"function"`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: Option<FunctionIn>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct FunctionIn {
    /// 1 to 64 of a-z A-Z 0-9 _ -.
    pub name: Option<String>,
    pub description: Option<String>,
    /// JSON schema of the arguments (an object); none: no arguments.
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<serde_json::Value>,
    /// Accepted; arguments are always forced valid.
    pub strict: Option<bool>,
}

/// A tool call, in an assistant message of the history or of an answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ToolCallIo {
    pub id: Option<String>,
    /// `"function"`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: Option<FunctionCallIo>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct FunctionCallIo {
    pub name: Option<String>,
    /// The arguments as JSON text.
    pub arguments: Option<String>,
}

/// A tool call delta of a streamed answer: `index` says which call it continues.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub function: FunctionCallIo,
}

generation_request! {
    /// `POST /v1/completions`.
    pub struct CompletionRequest {
        /// The served model's id (or its file name). Optional.
        pub model: Option<String>,
        /// Plain text (no chat template; BOS added when the model asks for it), or token ids used as given.
        #[schema(value_type = Prompt, required = true)]
        pub prompt: Option<Prompt>,
        /// Not supported: `true` is refused.
        pub echo: Option<bool>,
    }
}

/// The sampling fields of a generation request (not a wire type of its own).
#[derive(Debug, Clone, Default)]
pub struct SamplingFields {
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub n: Option<i64>,
    pub response_format: Option<ResponseFormat>,
    pub helpline: Option<HelplineSampling>,
}

/// OpenAI's `response_format`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ResponseFormat {
    /// `text` (default), `json_object` or `json_schema`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: Option<String>,
    /// Required with `type: json_schema`.
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct JsonSchemaFormat {
    /// A name for the schema (1 to 64 characters of a-z A-Z 0-9 _ -); optional here.
    pub name: Option<String>,
    pub description: Option<String>,
    /// The JSON Schema the answer must validate against.
    #[schema(value_type = Object)]
    pub schema: Option<serde_json::Value>,
    /// `true`: a schema keyword Helpline cannot enforce is a 400. `false` (default): such keywords
    /// are ignored (the answer is still JSON of the schema's shape, possibly looser).
    pub strict: Option<bool>,
}

/// `helpline.grammar`: the answer must match a regex, or a Lark grammar (llguidance's dialect).
/// Give exactly one.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct GrammarIn {
    /// The whole answer must match this regex (Rust `regex` syntax, no anchors needed).
    pub regex: Option<String>,
    /// A Lark grammar with a `start` rule.
    pub lark: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send one more chunk before `[DONE]` with `usage` and empty `choices`.
    pub include_usage: Option<bool>,
}

/// Sampling knobs OpenAI does not define.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct HelplineSampling {
    /// Keep only the k most likely tokens; 0 (default) disables.
    #[schema(minimum = 0)]
    pub top_k: Option<i64>,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 (default) disables.
    #[schema(minimum = 0, maximum = 1)]
    pub min_p: Option<f64>,
    /// Multiplicative penalty on recently seen tokens; 1 (default) disables.
    #[schema(exclusive_minimum = 0, maximum = 10)]
    pub repeat_penalty: Option<f64>,
    /// Chat only: answer from the approved documentation (default: the server's `grounding`
    /// setting, on unless the operator turned it off). `false` gives a plain, ungrounded completion.
    pub grounding: Option<bool>,
    /// Chat only, with grounding: restrict which articles may be retrieved.
    pub filters: Option<RetrieveFilters>,
    /// Chat only, with grounding: quote mode (default: the server's `quote_mode`). The answer's
    /// sentences are copied verbatim from the retrieved passages, each followed by its marker, with
    /// at most 8 words of connective text between quotes.
    pub quote: Option<bool>,
    /// Chat only, with grounding: how the answer is made (default: the server's `answer_mode`).
    /// `assembled`: the facts are quotes of the approved articles' sentences and list items, between
    /// fixed connectives, each with its marker (no model). `generative`: the model words the answer
    /// from the evidence and every sentence is checked before it is sent (a sentence that states a
    /// number, name or label the evidence does not hold, or commits to anything, is replaced by the
    /// evidence or dropped). `quote`: the model copies sentences under a grammar.
    pub answer_mode: Option<String>,
    /// Constrain the answer to a regex or a Lark grammar (instead of `response_format`).
    pub grammar: Option<GrammarIn>,
    /// Chat only: the conversation this turn belongs to (1 to 64 characters of A-Z a-z 0-9 _ . : -).
    /// Created when new; the answer reports it. Without one, a new conversation is started.
    pub conversation_id: Option<String>,
    /// Chat only: who the customer is, as the calling system knows them; kept with the conversation.
    pub customer: Option<CustomerIn>,
}

/// The customer, as the calling system identifies them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CustomerIn {
    /// The customer's id in the calling system (1 to 128 characters); decides who owns the conversation.
    pub id: Option<String>,
    pub account_id: Option<String>,
    pub plan: Option<String>,
    pub locale: Option<String>,
    /// Other facts to keep with the conversation (at most 32 keys, 4 KiB as JSON).
    #[schema(value_type = Object)]
    pub attributes: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Restrictions on retrieval. Draft and retired articles are never retrieved, whatever the filters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct RetrieveFilters {
    /// Only these product areas (e.g. `billing`, `security`).
    pub product_area: Option<Vec<String>>,
    /// Only articles in this locale (e.g. `en`).
    pub locale: Option<String>,
    /// Only these articles.
    pub doc_id: Option<Vec<String>>,
}

/// `POST /v1/retrieve`: what the bot would see for a question.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct RetrieveRequest {
    /// The question, 1 to 2000 characters.
    #[schema(value_type = String, required = true)]
    pub query: Option<String>,
    /// Passages to return, 1 to 50 (default 5).
    #[schema(minimum = 1, maximum = 50)]
    pub k: Option<i64>,
    pub filters: Option<RetrieveFilters>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RetrieveResponse {
    pub object: ListObject,
    pub query: String,
    /// Changes whenever the indexed content changes.
    pub index_version: String,
    /// Whether the best passage passes the relevance gate (when false, chat refuses with `no_relevant_docs`).
    pub relevant: bool,
    pub min_relevance: f32,
    /// Ranked passages, best first.
    pub data: Vec<PassageOut>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<i64>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    /// OpenAI's newer name for `system`; treated as `system`.
    Developer,
    User,
    Assistant,
    /// A tool's result (`tool_call_id` names the call).
    Tool,
}

impl Role {
    pub fn template_name(self) -> &'static str {
        match self {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatMessageIn {
    pub role: Role,
    /// Text, or an array of text parts (joined with newlines). Only `assistant` messages may omit it.
    pub content: Option<MessageContent>,
    /// An assistant message's tool calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallIo>>,
    /// A `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ContentPart {
    /// Only `"text"` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// `POST /tokenize`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    #[schema(value_type = String, required = true)]
    pub content: Option<String>,
    /// Add BOS when the model asks for it. Default false.
    pub add_special: Option<bool>,
    /// Map special-token text (e.g. `<|im_start|>`) to its id instead of tokenizing it as plain text. Default false.
    pub parse_special: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenizeResponse {
    pub tokens: Vec<u32>,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    #[schema(value_type = Vec<i64>, required = true)]
    pub tokens: Option<Vec<i64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DetokenizeResponse {
    pub content: String,
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ChatCompletionObject {
    #[serde(rename = "chat.completion")]
    ChatCompletion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ChatCompletionChunkObject {
    #[serde(rename = "chat.completion.chunk")]
    ChatCompletionChunk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum TextCompletionObject {
    #[serde(rename = "text_completion")]
    TextCompletion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ListObject {
    #[serde(rename = "list")]
    List,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ModelObject {
    #[serde(rename = "model")]
    Model,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum AssistantRole {
    #[serde(rename = "assistant")]
    Assistant,
}

/// Non-streaming answer of `POST /v1/chat/completions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: ChatCompletionObject,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    pub system_fingerprint: String,
    pub helpline: HelplineInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    /// Always null: log probabilities are not supported.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<serde_json::Value>,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AssistantMessage {
    pub role: AssistantRole,
    /// The answer. Null only for a structured output (`response_format`, `helpline.grammar`) that
    /// the bot did not give: the refusal or handoff text is then in `refusal` alone, so `content`,
    /// when present, always parses.
    pub content: Option<String>,
    /// The refusal text when the policy pack made the bot refuse (`finish_reason: "content_filter"`);
    /// the same text is in `content` for clients that only read that (except structured outputs,
    /// see `content`). Otherwise null.
    pub refusal: Option<String>,
    /// The calls the model made (`finish_reason: "tool_calls"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallIo>>,
}

/// One server-sent event of a streaming chat completion.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: ChatCompletionChunkObject,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    /// One choice; empty in the closing usage chunk.
    pub choices: Vec<ChatChunkChoice>,
    /// Present only with `stream_options.include_usage`: null except in the closing usage chunk.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "nullable")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
    /// Timings, in the chunk that carries `finish_reason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helpline: Option<HelplineInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<serde_json::Value>,
    /// Null until the last content-bearing chunk.
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ChatDelta {
    /// Only in the first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<AssistantRole>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// The refusal text, once, when the policy pack made the bot refuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// Answer of `POST /v1/completions`; streaming sends the same shape per event (with
/// `finish_reason` null until the end, and `usage` as for chat chunks).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TextCompletion {
    pub id: String,
    pub object: TextCompletionObject,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<TextChoice>,
    /// Always present when not streaming; when streaming, as for chat chunks.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "nullable")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helpline: Option<HelplineInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TextChoice {
    pub text: String,
    pub index: u32,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<serde_json::Value>,
    pub finish_reason: Option<FinishReason>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    pub object: ListObject,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: ModelObject,
    /// Unix seconds (the model file's modification time when known).
    pub created: u64,
    pub owned_by: String,
}

/// Every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    /// Error class, e.g. `invalid_request_error`, `rate_limit_error`, `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Stable code, e.g. `invalid_value`, `model_not_found`, `context_length_exceeded`, `queue_full`.
    pub code: String,
    /// The request field at fault, if any.
    pub param: Option<String>,
}

/// Serde helper for `Option<Option<T>>`: outer `None` is skipped, `Some(None)` is `null`.
mod nullable {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(v: &Option<Option<T>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}
