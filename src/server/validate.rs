//! Raw requests -> validated, tokenized engine jobs. Every refusal is an [`ApiError`] naming the
//! field and the bound; nothing here is silently corrected except `max_tokens`, which is clamped
//! to the room the prompt leaves in the model's context (the answer then ends with `length`).

use crate::config::ServeConfig;
use crate::engine::{Job, JobGuard, ModelBundle};
use crate::guard::grammar::{Constraint, GuardError, GuardLimits};
use crate::retrieval::Filters;
use crate::sampler::{ParamError, SamplingParams};
use crate::tokenizer::ChatMessage;

use super::dto::{
    ChatCompletionRequest, ChatMessageIn, CompletionRequest, MessageContent, Prompt, RetrieveFilters, RetrieveRequest, Role, SamplingFields, Stop,
};
use super::error::ApiError;
use super::Loaded;

/// Most stop strings a request may give (as OpenAI).
pub const MAX_STOP_STRINGS: usize = 4;

/// A generation request ready for [`crate::engine::Engine::submit`].
#[derive(Debug, Clone)]
pub struct ValidGeneration {
    /// Prompt ids, sampling parameters, stop strings and `max_tokens` already clamped to the context.
    pub job: Job,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

/// The sampling part of a request, checked but not yet fitted to a prompt.
#[derive(Debug, Clone)]
pub struct ValidSampling {
    pub params: SamplingParams,
    /// As asked (or the server default), before clamping to the context.
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// `response_format` / `helpline.grammar`, checked but not compiled.
    pub structure: Option<StructureSpec>,
}

/// A client's structured-output request (`response_format` or `helpline.grammar`).
#[derive(Debug, Clone)]
pub struct StructureSpec {
    pub constraint: Constraint,
    /// The request field it came from, named in errors.
    pub param: &'static str,
    /// `json_object`, `json_schema`, `regex` or `lark`.
    pub kind: &'static str,
}

pub use crate::turn::Structured;

/// A chat request checked: the turn to run, and how to answer it.
#[derive(Debug, Clone)]
pub struct ValidChat {
    pub turn: crate::turn::Request,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

/// `POST /v1/chat/completions`: model, sampling, messages, the grounding choice and the answer mode.
pub fn chat(req: &ChatCompletionRequest, cfg: &ServeConfig, loaded: &Loaded, caller: &super::auth::Caller) -> Result<ValidChat, ApiError> {
    check_model(req.model.as_deref(), cfg, &loaded.bundle)?;
    let sampling = sampling(&req.sampling(), cfg)?;
    let messages = chat_messages(req.messages.as_deref().unwrap_or_default())?;
    message_bounds(&messages, cfg)?;
    let ext = req.helpline.clone().unwrap_or_default();
    customer_may(req, &ext, cfg, caller, sampling.structure.as_ref())?;
    let grounded = ext.grounding.unwrap_or(cfg.grounding.enabled);
    let tools = tools(req, grounded)?;
    let active = tools.as_ref().filter(|t| t.active());
    if active.is_some() && sampling.structure.is_some() {
        let mut e = ApiError::invalid_field("response_format", "tools and a structured output cannot be combined: the answer is either calls or the structure");
        e.param = Some(sampling.structure.as_ref().map(|s| s.param).unwrap_or("response_format").to_string());
        return Err(e);
    }
    let structured = match active {
        Some(t) => Some(compile_structure(&StructureSpec { constraint: Constraint::Lark(t.grammar()), param: "tools", kind: "tools" }, cfg, loaded)?),
        None => sampling.structure.as_ref().map(|s| compile_structure(s, cfg, loaded)).transpose()?,
    };
    let mode = answer_mode(&ext, grounded, structured.is_some(), cfg)?;
    let grounding = if grounded {
        if messages.last().map(|m| m.role.as_str()) != Some("user") {
            return Err(ApiError::invalid_field(
                "messages",
                "with grounding on, the last message must be the customer's (role `user`); \
                 send `helpline.grounding: false` to continue another role's message",
            ));
        }
        Some(filters(ext.filters.as_ref())?)
    } else {
        if ext.filters.is_some() {
            return Err(ApiError::invalid_field("helpline.filters", "`helpline.filters` needs grounding on (`helpline.grounding: true`)"));
        }
        None
    };
    let mut conversation = conversation(&ext)?;
    conversation.max_turns = Some(cfg.max_conversation_turns);
    let turn = crate::turn::Request {
        messages,
        sampling: crate::turn::Sampling { params: sampling.params, max_tokens: sampling.max_tokens, stop: sampling.stop },
        grounding,
        mode,
        structured,
        conversation: Some(conversation),
        audit_request: serde_json::to_value(req).unwrap_or_default(),
        for_agent: false,
        dry_run_actions: false,
        tools: tools.map(std::sync::Arc::new),
    };
    Ok(ValidChat { turn, stream: sampling.stream, include_usage: sampling.include_usage })
}

/// The most tools one request may declare.
pub const MAX_TOOLS: usize = 32;

/// `tools`, `tool_choice` and `parallel_tool_calls`, checked: each tool a function with a valid,
/// unique name and an object schema; the choice one of the four forms, naming a declared function.
fn tools(req: &ChatCompletionRequest, grounded: bool) -> Result<Option<crate::turn::tools::ToolSpec>, ApiError> {
    use crate::turn::tools::{Choice, Function, ToolSpec};
    let Some(list) = &req.tools else {
        if let Some(c) = &req.tool_choice {
            if c.as_str() != Some("none") {
                return Err(ApiError::invalid_field("tool_choice", "`tool_choice` needs `tools`"));
            }
        }
        return Ok(None);
    };
    if grounded {
        return Err(ApiError::invalid_field("tools", "tools are for ungrounded chat: send `helpline.grounding: false` with them (grounded answers come from the docs, not from calls)"));
    }
    if list.is_empty() || list.len() > MAX_TOOLS {
        return Err(ApiError::invalid_field("tools", format!("`tools` must hold 1 to {MAX_TOOLS} functions (got {})", list.len())));
    }
    let mut functions: Vec<Function> = Vec::new();
    for (i, t) in list.iter().enumerate() {
        let at = |f: &str| format!("tools[{i}].{f}");
        if t.kind.as_deref().is_some_and(|k| k != "function") {
            return Err(ApiError::invalid_field(&at("type"), format!("`{}` must be \"function\"", at("type"))));
        }
        let f = t.function.as_ref().ok_or_else(|| ApiError::invalid_field(&at("function"), format!("`{}` is required", at("function"))))?;
        let name = f.name.clone().unwrap_or_default();
        if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(ApiError::invalid_field(&at("function.name"), format!("`{}` must be 1 to 64 of a-z A-Z 0-9 _ -", at("function.name"))));
        }
        if functions.iter().any(|x| x.name == name) {
            return Err(ApiError::invalid_field(&at("function.name"), format!("`{name}` is declared twice")));
        }
        let description = f.description.clone().unwrap_or_default();
        if description.chars().count() > 2000 {
            return Err(ApiError::invalid_field(&at("function.description"), format!("`{}` has more than 2000 characters", at("function.description"))));
        }
        let parameters = f.parameters.clone().unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}}));
        let is_object = parameters.as_object().is_some_and(|m| m.get("type").is_none_or(|t| t == "object"));
        if !is_object {
            return Err(ApiError::invalid_field(&at("function.parameters"), format!("`{}` must be a JSON schema of an object", at("function.parameters"))));
        }
        functions.push(Function { name, description, parameters });
    }
    let choice = match &req.tool_choice {
        None => Choice::Auto,
        Some(serde_json::Value::String(s)) => match s.as_str() {
            "none" => Choice::None,
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            other => return Err(ApiError::invalid_field("tool_choice", format!("`tool_choice` must be \"none\", \"auto\", \"required\" or a named function (got {other:?})"))),
        },
        Some(v) => {
            let name = v.get("function").and_then(|f| f.get("name")).and_then(serde_json::Value::as_str);
            match (v.get("type").and_then(serde_json::Value::as_str), name) {
                (Some("function"), Some(n)) if functions.iter().any(|f| f.name == n) => Choice::Named(n.to_string()),
                (Some("function"), Some(n)) => return Err(ApiError::invalid_field("tool_choice.function.name", format!("`{n}` is not one of the declared tools"))),
                _ => return Err(ApiError::invalid_field("tool_choice", "a named `tool_choice` is {\"type\": \"function\", \"function\": {\"name\": ...}}")),
            }
        }
    };
    Ok(Some(ToolSpec { functions, choice, parallel: req.parallel_tool_calls.unwrap_or(true) }))
}

/// The request fields a customer may use only when the operator allows it (agents and admins may
/// use them all): turning grounding off, structured outputs, system messages. Refused with 403
/// `field_not_allowed` naming the field and the setting.
fn customer_may(
    req: &ChatCompletionRequest,
    ext: &super::dto::HelplineSampling,
    cfg: &ServeConfig,
    caller: &super::auth::Caller,
    structure: Option<&StructureSpec>,
) -> Result<(), ApiError> {
    if caller.is_trusted() {
        return Ok(());
    }
    let a = &cfg.access;
    let refuse = |field: &str, setting: &str, what: &str| {
        let mut e = ApiError::forbidden("field_not_allowed", format!("`{field}`: {what} is not open to customers on this server (the `{setting}` setting)"));
        e.param = Some(field.to_string());
        e
    };
    if ext.grounding == Some(false) && !a.customer_grounding_off {
        return Err(refuse("helpline.grounding", "customer_grounding_off", "turning grounding off"));
    }
    if !a.customer_answer_mode {
        if ext.answer_mode.is_some() {
            return Err(refuse("helpline.answer_mode", "customer_answer_mode", "choosing the answer mode"));
        }
        if ext.quote.is_some() {
            return Err(refuse("helpline.quote", "customer_answer_mode", "choosing the answer mode"));
        }
    }
    if let Some(s) = structure {
        if !a.customer_structured_outputs {
            let field = if s.param.starts_with("response_format") { "response_format" } else { "helpline.grammar" };
            return Err(refuse(field, "customer_structured_outputs", "a structured output"));
        }
    }
    // A customer's request ends with the customer's message: the bot's words are not theirs to
    // begin (an assistant prefix would be the customer writing the bot's answer).
    let msgs = req.messages.as_deref().unwrap_or_default();
    if let Some((i, last)) = msgs.iter().enumerate().last() {
        // A tool's result answering the model's call is the client's data too.
        let tool_result = last.role == Role::Tool && req.tools.is_some();
        if last.role != Role::User && !tool_result {
            return Err(ApiError::invalid_field(
                "messages",
                format!("the last message must be the customer's (role `user`); messages[{i}] is `{}`", last.role.template_name()),
            ));
        }
    }
    if !a.customer_system_messages {
        for (i, m) in msgs.iter().enumerate() {
            if matches!(m.role, Role::System | Role::Developer) {
                return Err(refuse(&format!("messages[{i}].role"), "customer_system_messages", "a system message"));
            }
        }
    }
    Ok(())
}

/// `helpline.answer_mode` (or the older `helpline.quote`), within the modes the operator allows;
/// the server's `answer_mode` otherwise.
fn answer_mode(ext: &super::dto::HelplineSampling, grounded: bool, structured: bool, cfg: &ServeConfig) -> Result<crate::turn::Mode, ApiError> {
    use crate::turn::Mode;
    let asked = match (&ext.answer_mode, ext.quote) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_field("helpline.quote", "give either `helpline.answer_mode` or `helpline.quote`, not both"));
        }
        (Some(m), None) => Some(Mode::parse(m).ok_or_else(|| {
            ApiError::invalid_field("helpline.answer_mode", format!("`helpline.answer_mode` must be `assembled`, `generative` or `quote` (got {m:?})"))
        })?),
        (None, Some(true)) => Some(Mode::Quote),
        (None, Some(false)) => Some(if cfg.grounding.answer_mode == Mode::Quote { Mode::Assembled } else { cfg.grounding.answer_mode }),
        (None, None) => None,
    };
    let field = if ext.quote.is_some() { "helpline.quote" } else { "helpline.answer_mode" };
    if let Some(m) = asked {
        if !grounded && m != Mode::Generative {
            return Err(ApiError::invalid_field(field, format!("`{field}` {} needs grounding on: answers are built from the documentation", m.as_str())));
        }
        if structured && m != Mode::Generative {
            return Err(ApiError::invalid_field(
                field,
                format!("`{field}` {} cannot be combined with `response_format` or `helpline.grammar`: the answer is text", m.as_str()),
            ));
        }
        if !cfg.grounding.allowed_modes.contains(&m) {
            let allowed: Vec<&str> = cfg.grounding.allowed_modes.iter().map(|m| m.as_str()).collect();
            return Err(ApiError::invalid_field(field, format!("`{field}` {} is not allowed on this server (allowed: {})", m.as_str(), allowed.join(", "))));
        }
        return Ok(m);
    }
    Ok(if structured { Mode::Generative } else { cfg.grounding.answer_mode })
}

/// Most entries in one retrieval filter list.
pub const MAX_FILTER_VALUES: usize = 32;

/// Retrieval filters: each list at most [`MAX_FILTER_VALUES`] values of 1 to 64 characters of
/// `a-z 0-9 - _`; the locale likewise (e.g. `en`, `pt-br`).
pub fn filters(f: Option<&RetrieveFilters>) -> Result<Filters, ApiError> {
    let Some(f) = f else { return Ok(Filters::default()) };
    fn values(field: &str, list: Option<&Vec<String>>) -> Result<Vec<String>, ApiError> {
        let list = list.cloned().unwrap_or_default();
        if list.len() > MAX_FILTER_VALUES {
            return Err(ApiError::invalid_field(field, format!("`{field}` must hold at most {MAX_FILTER_VALUES} values (got {})", list.len())));
        }
        for v in &list {
            check_filter_value(field, v)?;
        }
        Ok(list)
    }
    let locale = match &f.locale {
        Some(l) => {
            check_filter_value("helpline.filters.locale", l)?;
            Some(l.clone())
        }
        None => None,
    };
    Ok(Filters {
        product_area: values("helpline.filters.product_area", f.product_area.as_ref())?,
        locale,
        doc_id: values("helpline.filters.doc_id", f.doc_id.as_ref())?,
    })
}

fn check_filter_value(field: &str, v: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_field(field, format!("`{field}` values must be 1 to 64 characters of a-z 0-9 - _ (got {v:?})")))
    }
}

/// Longest `/v1/retrieve` query, in characters.
pub const MAX_QUERY_CHARS: usize = 2000;
/// Most passages `/v1/retrieve` returns.
pub const MAX_RETRIEVE_K: i64 = 50;

/// `POST /v1/retrieve`: query, k and filters.
pub fn retrieve(req: &RetrieveRequest) -> Result<(String, usize, Filters), ApiError> {
    let query = req.query.as_deref().ok_or_else(|| ApiError::invalid_field("query", "`query` is required"))?;
    let n = query.chars().count();
    if query.trim().is_empty() || n > MAX_QUERY_CHARS {
        return Err(ApiError::invalid_field("query", format!("`query` must have 1 to {MAX_QUERY_CHARS} characters, not all blank (got {n})")));
    }
    let k = match req.k {
        None => 5,
        Some(k) if !(1..=MAX_RETRIEVE_K).contains(&k) => return Err(out_of_range("k", format_args!("in [1, {MAX_RETRIEVE_K}]"), k)),
        Some(k) => k as usize,
    };
    Ok((query.to_string(), k, filters(req.filters.as_ref())?))
}

/// `POST /v1/completions`: model, sampling, text or token-id prompt -> prompt that fits.
pub fn completion(req: &CompletionRequest, cfg: &ServeConfig, loaded: &Loaded) -> Result<ValidGeneration, ApiError> {
    check_model(req.model.as_deref(), cfg, &loaded.bundle)?;
    if req.echo == Some(true) {
        return Err(ApiError::invalid_field("echo", "`echo` is not supported (only false)"));
    }
    let sampling = sampling(&req.sampling(), cfg)?;
    let ext = req.helpline.clone().unwrap_or_default();
    if ext.grounding == Some(true)
        || ext.filters.is_some()
        || ext.quote.is_some()
        || ext.answer_mode.is_some()
        || ext.conversation_id.is_some()
        || ext.customer.is_some()
    {
        let field = if ext.filters.is_some() {
            "helpline.filters"
        } else if ext.quote.is_some() {
            "helpline.quote"
        } else if ext.answer_mode.is_some() {
            "helpline.answer_mode"
        } else if ext.conversation_id.is_some() {
            "helpline.conversation_id"
        } else if ext.customer.is_some() {
            "helpline.customer"
        } else {
            "helpline.grounding"
        };
        return Err(ApiError::invalid_field(field, format!("`{field}` applies to chat completions only; text completions are never grounded or stored")));
    }
    let prompt = match &req.prompt {
        None => return Err(ApiError::invalid_field("prompt", "`prompt` is required")),
        Some(Prompt::Text(text)) => loaded.bundle.text_prompt(text).map_err(ApiError::internal)?,
        Some(Prompt::Tokens(ids)) => token_ids("prompt", ids, loaded.bundle.tokenizer.vocab_size())?,
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid_field("prompt", "`prompt` must not be empty"));
    }
    let structured = sampling.structure.as_ref().map(|s| compile_structure(s, cfg, loaded)).transpose()?;
    let mut valid = finish(prompt, sampling, cfg, loaded.engine.max_positions())?;
    // Text completions are for developers: the client's constraint alone (the policy pack governs
    // the support bot's chat answers).
    valid.job.guard = structured.map(|s| JobGuard(Box::new(s.guard.matcher())));
    Ok(valid)
}

/// `helpline.conversation_id` and `helpline.customer`, checked against their bounds.
pub fn conversation(ext: &super::dto::HelplineSampling) -> Result<crate::turn::ConversationRef, ApiError> {
    if let Some(id) = &ext.conversation_id {
        if !crate::store::is_valid_id(id) {
            return Err(ApiError::invalid_field(
                "helpline.conversation_id",
                "`helpline.conversation_id` must be 1 to 64 characters of A-Z a-z 0-9 _ . : -",
            ));
        }
    }
    let mut customer = crate::store::Customer::default();
    if let Some(c) = &ext.customer {
        let text = |field: &str, v: &Option<String>| -> Result<Option<String>, ApiError> {
            match v {
                Some(s) if s.trim().is_empty() || s.chars().count() > 128 => {
                    Err(ApiError::invalid_field(field, format!("`{field}` must have 1 to 128 characters, not all blank")))
                }
                other => Ok(other.clone()),
            }
        };
        customer.id = text("helpline.customer.id", &c.id)?;
        customer.account_id = text("helpline.customer.account_id", &c.account_id)?;
        customer.plan = text("helpline.customer.plan", &c.plan)?;
        customer.locale = text("helpline.customer.locale", &c.locale)?;
        if let Some(attrs) = &c.attributes {
            let size = serde_json::to_string(attrs).map(|t| t.len()).unwrap_or(usize::MAX);
            if attrs.len() > 32 || size > 4096 {
                return Err(ApiError::invalid_field(
                    "helpline.customer.attributes",
                    format!("`helpline.customer.attributes` must have at most 32 keys and 4096 bytes as JSON (got {} keys, {size} bytes)", attrs.len()),
                ));
            }
            customer.attributes = attrs.clone();
        }
    }
    Ok(crate::turn::ConversationRef { id: ext.conversation_id.clone(), customer, claim: crate::turn::Claim::Operator, max_turns: None })
}

/// `response_format` and `helpline.grammar`: at most one, of a known type, with what it needs.
pub fn structure(f: &SamplingFields) -> Result<Option<StructureSpec>, ApiError> {
    let grammar = f.helpline.as_ref().and_then(|h| h.grammar.as_ref());
    let format = f.response_format.as_ref().filter(|r| r.kind.as_deref() != Some("text"));
    let spec = match (format, grammar) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_field(
                "helpline.grammar",
                "give either `response_format` or `helpline.grammar`, not both",
            ))
        }
        (None, None) => return Ok(None),
        (Some(rf), None) => match rf.kind.as_deref() {
            None => return Err(ApiError::invalid_field("response_format.type", "`response_format.type` is required: `text`, `json_object` or `json_schema`")),
            Some("json_object") => StructureSpec { constraint: Constraint::JsonObject, param: "response_format", kind: "json_object" },
            Some("json_schema") => {
                let js = rf.json_schema.as_ref().ok_or_else(|| {
                    ApiError::invalid_field("response_format.json_schema", "`response_format.json_schema` is required with `type: json_schema`")
                })?;
                if let Some(name) = &js.name {
                    let ok = (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                    if !ok {
                        return Err(ApiError::invalid_field(
                            "response_format.json_schema.name",
                            "`response_format.json_schema.name` must be 1 to 64 characters of a-z A-Z 0-9 _ -",
                        ));
                    }
                }
                let schema = js.schema.clone().ok_or_else(|| {
                    ApiError::invalid_field("response_format.json_schema.schema", "`response_format.json_schema.schema` is required")
                })?;
                if !(schema.is_object() || schema.is_boolean()) {
                    return Err(ApiError::invalid_field(
                        "response_format.json_schema.schema",
                        "`response_format.json_schema.schema` must be a JSON Schema (an object)",
                    ));
                }
                let strict = js.strict.unwrap_or(false);
                StructureSpec { constraint: Constraint::JsonSchema { schema, strict }, param: "response_format.json_schema.schema", kind: "json_schema" }
            }
            Some(other) => {
                return Err(ApiError::invalid_field(
                    "response_format.type",
                    format!("`response_format.type` must be `text`, `json_object` or `json_schema` (got {other:?})"),
                ))
            }
        },
        (None, Some(g)) => match (&g.regex, &g.lark) {
            (Some(rx), None) => StructureSpec { constraint: Constraint::Regex(rx.clone()), param: "helpline.grammar.regex", kind: "regex" },
            (None, Some(lark)) => StructureSpec { constraint: Constraint::Lark(lark.clone()), param: "helpline.grammar.lark", kind: "lark" },
            _ => return Err(ApiError::invalid_field("helpline.grammar", "`helpline.grammar` needs exactly one of `regex` and `lark`")),
        },
    };
    Ok(Some(spec))
}

/// Compiles a client's constraint under the operator's limits. Every failure is a 400 naming the
/// field and the problem (and the setting, for a limit); generation never runs without it.
pub fn compile_structure(spec: &StructureSpec, cfg: &ServeConfig, loaded: &Loaded) -> Result<Structured, ApiError> {
    let limits = GuardLimits {
        max_grammar_bytes: cfg.grammar.max_bytes,
        max_depth: cfg.grammar.max_depth,
        compile_budget: cfg.grammar.compile_budget,
        mask_budget: Some(cfg.grammar.mask_budget),
        // llguidance's own limits as it ships them (sized for JSON schemas), not the raised fuel
        // the operator's pack needs: a client's grammar is stopped early.
        parser: llguidance::api::ParserLimits { verbose_errors: false, ..Default::default() },
        ..GuardLimits::default()
    };
    let guard = loaded.guard.compile_within(&spec.constraint, &limits).map_err(|e| {
        let (code, hint) = match &e {
            GuardError::TooLarge { .. } => ("grammar_too_large", " (the server's `max_grammar_bytes` setting)"),
            GuardError::TooDeep { .. } => ("grammar_too_deep", " (the server's `max_grammar_depth` setting)"),
            GuardError::TooSlow { .. } => ("grammar_too_slow", " (the server's `grammar_compile_ms` setting); simplify it"),
            GuardError::Regex(_) | GuardError::Lark(_) | GuardError::JsonSchema(_) | GuardError::Empty => ("invalid_grammar", ""),
            _ => return ApiError::internal(format!("compiling `{}` failed: {e}", spec.param)),
        };
        let mut err = ApiError::bad_request(code, format!("`{}`: {e}{hint}", spec.param));
        err.param = Some(spec.param.to_string());
        err
    })?;
    Ok(Structured { kind: spec.kind, json: matches!(spec.constraint, Constraint::JsonObject | Constraint::JsonSchema { .. }), guard })
}

fn finish(prompt: Vec<u32>, s: ValidSampling, cfg: &ServeConfig, max_positions: usize) -> Result<ValidGeneration, ApiError> {
    let max_tokens = fit_context(prompt.len(), s.max_tokens, cfg, max_positions)?;
    Ok(ValidGeneration {
        job: Job { prompt, params: s.params, max_tokens, stop: s.stop, skip_special: true, guard: None },
        stream: s.stream,
        include_usage: s.include_usage,
    })
}

/// The prompt is never truncated: over the limit is a 400 `context_length_exceeded` stating both
/// counts. The limit is the server's `max_prompt_tokens`, and the model's context less the one
/// position the answer needs. Returns `max_tokens` clamped to the room the prompt leaves.
pub fn fit_context(prompt_tokens: usize, max_tokens: usize, cfg: &ServeConfig, max_positions: usize) -> Result<usize, ApiError> {
    let model_fit = max_positions.saturating_sub(1);
    let fit = cfg.max_prompt_tokens.min(model_fit);
    if prompt_tokens > fit {
        let why = if cfg.max_prompt_tokens < model_fit {
            format!("the server accepts at most {fit} prompt tokens")
        } else {
            format!("the model's context holds {max_positions} tokens and at least one must remain for the answer, so at most {fit} fit")
        };
        return Err(ApiError::bad_request(
            "context_length_exceeded",
            format!("the prompt has {prompt_tokens} tokens, but {why}; shorten the messages or the prompt"),
        ));
    }
    Ok(max_tokens.min(max_positions - prompt_tokens))
}

/// `model` is optional; when given it must name the served model: its id or its file name (with
/// or without the `.gguf` extension). Otherwise 404 `model_not_found`.
pub fn check_model(requested: Option<&str>, cfg: &ServeConfig, bundle: &ModelBundle) -> Result<(), ApiError> {
    match requested {
        Some(name) if !model_matches(name, cfg, bundle) => Err(model_not_found(name, cfg)),
        _ => Ok(()),
    }
}

pub fn model_matches(name: &str, cfg: &ServeConfig, bundle: &ModelBundle) -> bool {
    if name == cfg.model_id {
        return true;
    }
    let file_name = bundle.path.file_name().map(|n| n.to_string_lossy());
    let stem = bundle.path.file_stem().map(|n| n.to_string_lossy());
    !name.is_empty() && (file_name.as_deref() == Some(name) || stem.as_deref() == Some(name))
}

pub fn model_not_found(name: &str, cfg: &ServeConfig) -> ApiError {
    let mut e = ApiError::not_found("model_not_found", format!("the model `{name}` does not exist; this server serves `{}`", cfg.model_id));
    e.param = Some("model".into());
    e
}

/// The message format of [`ParamError`], for bounds that are not `'static`.
fn out_of_range(field: &str, bound: impl std::fmt::Display, got: impl std::fmt::Display) -> ApiError {
    ApiError::invalid_field(field, format!("`{field}` must be {bound} (got {got})"))
}

fn check_f64(field: &'static str, bound: &'static str, value: Option<f64>, ok: impl Fn(f64) -> bool) -> Result<Option<f64>, ApiError> {
    match value {
        Some(v) if !(v.is_finite() && ok(v)) => {
            let e = ParamError { field, bound, value: v.to_string() };
            Err(ApiError::invalid_field(field, e.to_string()))
        }
        other => Ok(other),
    }
}

/// Checks the shared sampling fields against their bounds and the server's limits.
pub fn sampling(f: &SamplingFields, cfg: &ServeConfig) -> Result<ValidSampling, ApiError> {
    if let Some(n) = f.n {
        if n != 1 {
            return Err(ApiError::invalid_field("n", format!("only `n` = 1 is supported (got {n})")));
        }
    }
    let limit = cfg.max_tokens_limit;
    let mut max_tokens = cfg.default_max_tokens.min(limit).max(1);
    for (field, value) in [("max_tokens", f.max_tokens), ("max_completion_tokens", f.max_completion_tokens)] {
        if let Some(v) = value {
            if v < 1 || v as u64 > limit as u64 {
                return Err(out_of_range(field, format_args!("in [1, {limit}]"), v));
            }
            max_tokens = v as usize;
        }
    }

    let temperature = check_f64("temperature", "in [0, 2]", f.temperature, |v| (0.0..=2.0).contains(&v))?;
    let top_p = check_f64("top_p", "in (0, 1]", f.top_p, |v| v > 0.0 && v <= 1.0)?;
    let presence = check_f64("presence_penalty", "in [-2, 2]", f.presence_penalty, |v| (-2.0..=2.0).contains(&v))?;
    let frequency = check_f64("frequency_penalty", "in [-2, 2]", f.frequency_penalty, |v| (-2.0..=2.0).contains(&v))?;
    let ext = f.helpline.clone().unwrap_or_default();
    let min_p = check_f64("helpline.min_p", "in [0, 1]", ext.min_p, |v| (0.0..=1.0).contains(&v))?;
    let repeat_penalty = check_f64("helpline.repeat_penalty", "in (0, 10]", ext.repeat_penalty, |v| v > 0.0 && v <= 10.0)?;
    let top_k = match ext.top_k {
        Some(k) if k < 0 => return Err(out_of_range("helpline.top_k", "at least 0", k)),
        Some(k) => k as usize,
        None => 0,
    };

    let defaults = SamplingParams::default();
    let params = SamplingParams {
        // The operator's defaults (greedy unless configured), not OpenAI's temperature 1: a support
        // answer should not change with each ask.
        temperature: temperature.map_or(cfg.default_temperature, |v| v as f32),
        top_k,
        top_p: top_p.map_or(cfg.default_top_p, |v| v as f32),
        min_p: min_p.map_or(defaults.min_p, |v| v as f32),
        seed: f.seed.unwrap_or_else(rand::random),
        repeat_penalty: repeat_penalty.map_or(defaults.repeat_penalty, |v| v as f32),
        repeat_last_n: defaults.repeat_last_n,
        presence_penalty: presence.map_or(defaults.presence_penalty, |v| v as f32),
        frequency_penalty: frequency.map_or(defaults.frequency_penalty, |v| v as f32),
    };
    // The sampler's own check (same messages) guards anything the f32 conversion could bend.
    params.validate().map_err(|e| {
        let field = if matches!(e.field, "min_p" | "repeat_penalty") { format!("helpline.{}", e.field) } else { e.field.to_string() };
        ApiError::invalid_field(&field, e.to_string())
    })?;

    Ok(ValidSampling {
        params,
        max_tokens,
        stop: stop_strings(f.stop.as_ref())?,
        stream: f.stream.unwrap_or(false),
        include_usage: f.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
        structure: structure(f)?,
    })
}

/// `stop`: a string or up to [`MAX_STOP_STRINGS`] strings, none empty.
pub fn stop_strings(stop: Option<&Stop>) -> Result<Vec<String>, ApiError> {
    let list = match stop {
        None => return Ok(Vec::new()),
        Some(Stop::One(s)) => std::slice::from_ref(s),
        Some(Stop::Many(v)) => v.as_slice(),
    };
    if list.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid_field("stop", format!("`stop` must hold at most {MAX_STOP_STRINGS} strings (got {})", list.len())));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid_field("stop", "`stop` strings must not be empty"));
    }
    Ok(list.to_vec())
}

/// At most `max_messages` messages of at most `max_message_chars` characters each (413 naming
/// the message and the bound): checked before anything costly, and before anything is stored.
pub fn message_bounds(messages: &[ChatMessage], cfg: &ServeConfig) -> Result<(), ApiError> {
    if messages.len() > cfg.max_messages {
        return Err(ApiError::too_large(
            "too_many_messages",
            "messages",
            format!("`messages` holds {} messages; at most {} are accepted (`max_messages`)", messages.len(), cfg.max_messages),
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        let n = m.content.chars().count();
        if n > cfg.max_message_chars {
            let field = format!("messages[{i}].content");
            return Err(ApiError::too_large(
                "message_too_long",
                &field,
                format!("`{field}` has {n} characters; at most {} are accepted (`max_message_chars`)", cfg.max_message_chars),
            ));
        }
    }
    Ok(())
}

/// OpenAI messages -> template messages. Text parts are joined with newlines; only `assistant`
/// messages may leave `content` out (it is then empty).
pub fn chat_messages(messages: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_field("messages", "`messages` must hold at least one message"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match &m.content {
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for (j, p) in parts.iter().enumerate() {
                        if p.kind != "text" {
                            let field = format!("messages[{i}].content[{j}].type");
                            return Err(ApiError::invalid_field(
                                &field,
                                format!("`{field}` must be \"text\" (got {:?}); only text content is supported", p.kind),
                            ));
                        }
                        match &p.text {
                            Some(t) => texts.push(t.as_str()),
                            None => {
                                let field = format!("messages[{i}].content[{j}].text");
                                return Err(ApiError::invalid_field(&field, format!("`{field}` is required")));
                            }
                        }
                    }
                    texts.join("\n")
                }
                None if m.role == Role::Assistant => String::new(),
                None => {
                    let field = format!("messages[{i}].content");
                    return Err(ApiError::invalid_field(&field, format!("`{field}` is required")));
                }
            };
            let content = tool_parts(messages, i, m, content)?;
            Ok(ChatMessage { role: m.role.template_name().to_string(), content })
        })
        .collect()
}

/// An assistant message's earlier calls and a tool message's result, in the generic tool format
/// the model reads them in (docs/tools.md).
fn tool_parts(messages: &[ChatMessageIn], i: usize, m: &ChatMessageIn, mut content: String) -> Result<String, ApiError> {
    use crate::turn::tools::{render_call, render_result};
    if let Some(calls) = &m.tool_calls {
        if m.role != Role::Assistant {
            return Err(ApiError::invalid_field(&format!("messages[{i}].tool_calls"), "only an assistant message has `tool_calls`"));
        }
        for (j, c) in calls.iter().enumerate() {
            let f = c.function.as_ref().ok_or_else(|| ApiError::invalid_field(&format!("messages[{i}].tool_calls[{j}].function"), "`function` is required"))?;
            let name = f.name.as_deref().ok_or_else(|| ApiError::invalid_field(&format!("messages[{i}].tool_calls[{j}].function.name"), "`name` is required"))?;
            let args = f.arguments.as_deref().unwrap_or("{}");
            if serde_json::from_str::<serde_json::Value>(args).is_err() {
                return Err(ApiError::invalid_field(&format!("messages[{i}].tool_calls[{j}].function.arguments"), "`arguments` must be JSON text"));
            }
            if !content.is_empty() {
                content.push('\n');
            }
            content.push_str(&render_call(name, args));
        }
    }
    if m.role == Role::Tool {
        let id = m.tool_call_id.as_deref().ok_or_else(|| ApiError::invalid_field(&format!("messages[{i}].tool_call_id"), "a `tool` message names the call it answers in `tool_call_id`"))?;
        // The call's function, from the assistant message that made it.
        let name = messages[..i]
            .iter()
            .rev()
            .filter_map(|p| p.tool_calls.as_ref())
            .flatten()
            .find(|c| c.id.as_deref() == Some(id))
            .and_then(|c| c.function.as_ref()?.name.clone())
            .or_else(|| m.name.clone());
        if name.is_none() {
            return Err(ApiError::invalid_field(&format!("messages[{i}].tool_call_id"), format!("no earlier assistant message made the call `{id}`")));
        }
        content = render_result(name.as_deref(), &content);
    }
    Ok(content)
}

/// Token ids from a request: each in `[0, vocab_size)`, else 422 naming `field`.
pub fn token_ids(field: &str, ids: &[i64], vocab_size: usize) -> Result<Vec<u32>, ApiError> {
    ids.iter()
        .enumerate()
        .map(|(i, &id)| {
            if id < 0 || id as u64 >= vocab_size as u64 {
                Err(ApiError::invalid_field(
                    field,
                    format!("`{field}` token ids must be in [0, {}] (got {id} at index {i})", vocab_size.saturating_sub(1)),
                ))
            } else {
                Ok(id as u32)
            }
        })
        .collect()
}
