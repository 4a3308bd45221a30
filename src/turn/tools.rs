//! OpenAI tool calling for the chat API, for developers building their own flows.
//!
//! The served model's chat template (SmolLM2's) has no tool format, so Helpline uses a documented
//! generic one (docs/tools.md): the functions are described in a system message, and a call is
//! written as one line per call
//!
//! ```text
//! <tool_call>{"name": "get_order", "arguments": {"id": "A-17"}}</tool_call>
//! ```
//!
//! Calls are forced by a grammar while decoding: the name is one of the declared functions and the
//! arguments are JSON valid against that function's `parameters` schema, so every call parses
//! and validates. `tool_choice` decides what the grammar allows: `none` (text only, no tools in
//! the prompt), `auto` (text, or calls), `required` (at least one call), or one named function
//! (exactly that one). `parallel_tool_calls: false` allows one call only. Earlier calls in the
//! history are rendered back in the same format, and `tool` messages as the results of the call
//! they name.

use serde::Serialize;
use serde_json::Value;

/// One declared function.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub name: String,
    pub description: String,
    /// JSON schema of the arguments (an object schema).
    pub parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

impl Choice {
    pub fn as_str(&self) -> &str {
        match self {
            Choice::None => "none",
            Choice::Auto => "auto",
            Choice::Required => "required",
            Choice::Named(n) => n,
        }
    }
}

/// A request's tools, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub functions: Vec<Function>,
    pub choice: Choice,
    pub parallel: bool,
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (OpenAI sends them as a string).
    pub arguments: String,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

fn lark_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// One call as it stands in the model's text (and in the history).
pub fn render_call(name: &str, arguments: &str) -> String {
    let args: Value = serde_json::from_str(arguments).unwrap_or(Value::Object(Default::default()));
    format!("{OPEN}{}{CLOSE}", serde_json::json!({"name": name, "arguments": args}))
}

/// How a tool's result is put in the history for the model.
pub fn render_result(name: Option<&str>, content: &str) -> String {
    match name {
        Some(n) => format!("<tool_response name={}>{content}</tool_response>", lark_string(n)),
        None => format!("<tool_response>{content}</tool_response>"),
    }
}

impl ToolSpec {
    /// Whether the model may call anything in this request.
    pub fn active(&self) -> bool {
        self.choice != Choice::None
    }

    fn allowed(&self) -> Vec<&Function> {
        match &self.choice {
            Choice::Named(n) => self.functions.iter().filter(|f| &f.name == n).collect(),
            _ => self.functions.iter().collect(),
        }
    }

    /// The system text that describes the functions and the call format.
    pub fn system_text(&self) -> String {
        let mut out = String::from("You can call functions. To call one, answer with exactly\n<tool_call>{\"name\": NAME, \"arguments\": ARGUMENTS}</tool_call>\n");
        match &self.choice {
            Choice::Required => out.push_str("You must call at least one function.\n"),
            Choice::Named(n) => out.push_str(&format!("You must call `{n}`.\n")),
            _ => out.push_str("Otherwise answer in plain text.\n"),
        }
        if self.parallel {
            out.push_str("Several calls go on separate lines.\n");
        }
        out.push_str("Functions:\n");
        for f in self.allowed() {
            out.push_str(&format!("- {}: {} Arguments (JSON schema): {}\n", f.name, f.description, f.parameters));
        }
        out
    }

    /// The Lark grammar (llguidance's dialect) the answer is decoded under.
    pub fn grammar(&self) -> String {
        let mut rules = Vec::new();
        let mut alts = Vec::new();
        for (i, f) in self.allowed().iter().enumerate() {
            let mut schema = f.parameters.clone();
            if let Value::Object(m) = &mut schema {
                // Compact JSON, and schema keywords llguidance does not enforce ignored (not refused).
                m.insert("x-guidance".into(), serde_json::json!({"whitespace_flexible": false, "lenient": true}));
            }
            rules.push(format!("args_{i}: %json {schema}"));
            rules.push(format!("call_{i}: {} args_{i} \"}}\"", lark_string(&format!("{OPEN}{{\"name\": \"{}\", \"arguments\": ", f.name))));
            alts.push(format!("call_{i}"));
        }
        let one = format!("({}) {}", alts.join(" | "), lark_string(CLOSE));
        let calls = if self.parallel { format!("call: {one}\ncalls: call (\"\\n\" call)*") } else { format!("call: {one}\ncalls: call") };
        let start = match self.choice {
            // Text never starts with `<` (that is how a call begins), then anything.
            Choice::Auto => "start: calls | TEXT\nTEXT: /[^<](.|\n)*/",
            _ => "start: calls",
        };
        format!("{start}\n{calls}\n{}\n", rules.join("\n"))
    }

    /// The calls in a generated answer (empty: it is text). Ids are `call_<answer>_<n>`.
    pub fn parse(&self, text: &str, answer: &str) -> Vec<ToolCall> {
        let t = text.trim_start();
        if !t.starts_with(OPEN) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (n, piece) in t.split(CLOSE).enumerate() {
            let Some(body) = piece.trim().strip_prefix(OPEN) else { continue };
            let Ok(v) = serde_json::from_str::<Value>(body) else { continue };
            let (Some(name), Some(args)) = (v.get("name").and_then(Value::as_str), v.get("arguments")) else { continue };
            out.push(ToolCall { id: format!("call_{answer}_{n}"), name: name.to_string(), arguments: args.to_string() });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(choice: Choice, parallel: bool) -> ToolSpec {
        ToolSpec {
            functions: vec![
                Function { name: "get_order".into(), description: "Look up an order.".into(), parameters: json!({"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}) },
                Function { name: "refund".into(), description: "Refund.".into(), parameters: json!({"type": "object", "properties": {"amount": {"type": "integer"}}, "required": ["amount"]}) },
            ],
            choice,
            parallel,
        }
    }

    #[test]
    fn calls_round_trip_through_the_format() {
        let s = spec(Choice::Auto, true);
        let text = format!("{}\n{}", render_call("get_order", r#"{"id":"A-1"}"#), render_call("refund", r#"{"amount":5}"#));
        let calls = s.parse(&text, "x");
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[0].name.as_str(), calls[0].arguments.as_str(), calls[0].id.as_str()), ("get_order", r#"{"id":"A-1"}"#, "call_x_0"));
        assert!(s.parse("Plain text answer.", "x").is_empty());
    }

    #[test]
    fn the_grammar_names_only_the_allowed_functions() {
        let g = spec(Choice::Named("refund".into()), false).grammar();
        assert!(g.contains("refund") && !g.contains("get_order"), "{g}");
        assert!(g.contains("calls: call\n"), "{g}");
        assert!(spec(Choice::Auto, true).grammar().contains("start: calls | TEXT"));
        assert!(spec(Choice::Required, true).grammar().starts_with("start: calls\n"));
    }
}
