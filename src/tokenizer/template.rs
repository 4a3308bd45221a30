//! Chat templates: the model's Jinja template (`tokenizer.chat_template`) rendered with minijinja
//! in a sandbox, or ChatML when the model has none.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value as GgufValue;
use minijinja::value::{Enumerator, Kwargs, Object, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::vocab::{Meta, TokenType};
use super::{Tokenizer, TokenizerError};

const KEY_TEMPLATE: &str = "tokenizer.chat_template";
const NAME: &str = "chat_template";

/// Used when the GGUF has no template: ChatML.
const CHATML: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";


/// Assistant text used to find the end-of-turn marker; unlikely to merge with template text.
const PROBE: &str = "\u{1F}helpline-end-of-turn-probe\u{1F}";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A message as the template sees it: a map with keys in Hugging Face's order (`role`, then
/// `content`), so `message | tojson` renders like it does in Python. minijinja's own maps are
/// sorted by key.
#[derive(Debug)]
struct MessageObject(ChatMessage);

impl Object for MessageObject {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.0.role.as_str())),
            "content" => Some(Value::from(self.0.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// A compiled chat template. Rendering is sandboxed: no loader (so `include`, `import` and
/// `extends` fail), no I/O, a fuel limit and an output cap; exceeding a limit is an error.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    fallback: bool,
    max_output: usize,
    /// sha256 (hex) of the template source, for audit records.
    sha256: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("fallback", &self.fallback)
            .field("fuel", &self.env.fuel())
            .field("max_output", &self.max_output)
            .finish()
    }
}

impl ChatTemplate {
    /// Default evaluation budget. minijinja charges one unit per instruction and per 64 bytes of
    /// data created, so this bounds both the time and the memory of a render.
    pub const DEFAULT_FUEL: u64 = 2_000_000;
    /// Default cap on rendered output, in bytes.
    pub const DEFAULT_MAX_OUTPUT: usize = 1 << 20;

    /// sha256 (hex) of the template's source text (names exactly which template rendered a prompt).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// From `tokenizer.chat_template`; ChatML when the key is absent.
    pub fn from_metadata(md: &HashMap<String, GgufValue>) -> Result<Self, TokenizerError> {
        match Meta(md).str(KEY_TEMPLATE)? {
            Some(src) => Self::from_source(src),
            None => {
                let mut t = Self::from_source(CHATML)?;
                t.fallback = true;
                Ok(t)
            }
        }
    }

    /// Compiles a Jinja template; syntax errors are reported with their location.
    pub fn from_source(src: &str) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        // Hugging Face renders chat templates with trim_blocks and lstrip_blocks.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TokenizerError::TemplateCompile(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_fuel(Some(Self::DEFAULT_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, src.to_string()).map_err(|e| TokenizerError::TemplateCompile(describe(&e)))?;
        let sha256 = {
            use sha2::Digest;
            format!("{:x}", sha2::Sha256::digest(src.as_bytes()))
        };
        Ok(ChatTemplate { env, fallback: false, max_output: Self::DEFAULT_MAX_OUTPUT, sha256 })
    }

    /// Replaces the fuel budget and output cap (bytes).
    pub fn with_limits(mut self, fuel: u64, max_output: usize) -> Self {
        self.env.set_fuel(Some(fuel));
        self.max_output = max_output;
        self
    }

    /// True when the model had no template and ChatML is used.
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    /// Renders the conversation. Variables: `messages`, `add_generation_prompt`, `bos_token`,
    /// `eos_token`; functions `raise_exception(msg)` and `strftime_now(fmt)`; Python string/dict/list
    /// methods via minijinja-contrib's pycompat; a Python-compatible `tojson`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, TokenizerError> {
        let tmpl = self.env.get_template(NAME).map_err(|e| TokenizerError::TemplateRender(describe(&e)))?;
        let msgs: Vec<Value> = messages.iter().map(|m| Value::from_object(MessageObject(m.clone()))).collect();
        let ctx = minijinja::context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        };
        let mut out = CappedWriter { buf: Vec::new(), cap: self.max_output, exceeded: false };
        let result = tmpl.render_captured_to(ctx, &mut out);
        if out.exceeded {
            return Err(TokenizerError::TemplateLimit(format!("output larger than {} bytes", self.max_output)));
        }
        match result {
            Ok(_) => String::from_utf8(out.buf).map_err(|e| TokenizerError::TemplateRender(e.to_string())),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => {
                let fuel = self.env.fuel().unwrap_or_default();
                Err(TokenizerError::TemplateLimit(format!("ran out of fuel ({fuel} units)")))
            }
            Err(e) => Err(TokenizerError::TemplateRender(describe(&e))),
        }
    }

    /// End-of-turn token ids implied by the template: renders `[user, assistant(PROBE)]`, tokenizes
    /// what follows the assistant text with special tokens parsed, and returns the control tokens
    /// that come directly after it (e.g. `<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`).
    /// Empty if the template fails, drops the assistant text, or nothing special follows it.
    pub fn end_of_turn_ids(&self, tok: &Tokenizer) -> Vec<u32> {
        let text_of = |id: Option<u32>| id.map(|i| String::from_utf8_lossy(tok.token_bytes(i)).into_owned()).unwrap_or_default();
        let messages = [ChatMessage::new("user", "Hello"), ChatMessage::new("assistant", PROBE)];
        let Ok(rendered) = self.render(&messages, false, &text_of(tok.bos_id()), &text_of(tok.eos_id())) else {
            return Vec::new();
        };
        let Some(pos) = rendered.rfind(PROBE) else { return Vec::new() };
        let Ok(ids) = tok.encode(&rendered[pos + PROBE.len()..], true) else { return Vec::new() };
        // Only control tokens: user-defined ones (e.g. Gemma's "\n") stand for ordinary text.
        ids.into_iter().take_while(|&id| tok.token_type(id) == Some(TokenType::Control)).collect()
    }
}

/// minijinja's error text; it names the problem and the line ("(in chat_template:3)").
fn describe(e: &Error) -> String {
    e.to_string()
}

/// An `io::Write` that refuses to grow past `cap` bytes.
struct CappedWriter {
    buf: Vec<u8>,
    cap: usize,
    exceeded: bool,
}

impl io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > self.cap {
            self.exceeded = true;
            return Err(io::Error::other("chat template output cap exceeded"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(format)`: the current UTC time, formatted with common strftime directives
/// (`%Y %y %m %d %e %H %I %M %S %p %B %b %h %A %a %j %F %T %Z %z %%`, `-` flag for no padding).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, secs)
}

const MONTHS: [&str; 12] =
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

/// Civil date (year, month 1-12, day 1-31) of a day count since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn strftime(format: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + u32::from(leap && month > 2);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let num = |out: &mut String, v: i64, width: usize| {
            if no_pad {
                let _ = write!(out, "{v}");
            } else {
                let _ = write!(out, "{v:0width$}");
            }
        };
        match chars.next() {
            Some('Y') => {
                let _ = write!(out, "{year}");
            }
            Some('y') => num(&mut out, year.rem_euclid(100), 2),
            Some('m') => num(&mut out, month as i64, 2),
            Some('d') => num(&mut out, day as i64, 2),
            Some('e') => {
                let _ = if no_pad { write!(out, "{day}") } else { write!(out, "{day:>2}") };
            }
            Some('H') => num(&mut out, hour, 2),
            Some('I') => num(&mut out, hour12, 2),
            Some('M') => num(&mut out, minute, 2),
            Some('S') => num(&mut out, second, 2),
            Some('j') => num(&mut out, yday as i64, 3),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('F') => {
                let _ = write!(out, "{year}-{month:02}-{day:02}");
            }
            Some('T') => {
                let _ = write!(out, "{hour:02}:{minute:02}:{second:02}");
            }
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            // Unknown directive: keep it verbatim.
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// `tojson` as Hugging Face defines it: Python's `json.dumps(x, ensure_ascii=False, indent=indent)`,
/// i.e. `", "` and `": "` separators and raw non-ASCII characters (minijinja's built-in one
/// produces compact, HTML-escaped JSON, which would change the prompt).
fn tojson(value: &Value, indent: Option<usize>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    // Accepted for compatibility; output is always ensure_ascii=False, unsorted.
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    let _: Option<Value> = kwargs.get("sort_keys")?;
    let _: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_py_json(value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_py_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) -> Result<(), Error> {
    // Nesting deeper than this is almost certainly a cycle or abuse.
    if depth > 128 {
        return Err(Error::new(ErrorKind::InvalidOperation, "tojson: value nested too deeply"));
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', width * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                let _ = write!(out, "{v}");
            } else {
                let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else {
                    let _ = write!(out, "{f:?}");
                }
            }
        }
        ValueKind::String => write_json_string(v.as_str().unwrap_or_default(), out),
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                match key.as_str() {
                    Some(k) => write_json_string(k, out),
                    None => write_json_string(&key.to_string(), out),
                }
                out.push_str(": ");
                write_py_json(&v.get_item(key)?, indent, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(item, indent, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        _ => write_json_string(&v.to_string(), out),
    }
    Ok(())
}

fn write_json_string(s: &str, out: &mut String) {
    // serde_json escapes exactly what Python does with ensure_ascii=False.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday, day 60 of a leap year.
        let t = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(strftime("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(strftime("%A %B %-d, %j %I%p %%", t), "Thursday February 29, 060 01PM %");
        assert_eq!(strftime("%F %T %q", 0), "1970-01-01 00:00:00 %q");
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::from_source(
            "{{ {'a': [1, 2.5, none, true], 'b': 'é\"\\n'} | tojson }}|{{ [1, {'k': []}] | tojson(indent=2) }}",
        )
        .unwrap();
        let out = t.render(&[], false, "", "").unwrap();
        assert_eq!(out, "{\"a\": [1, 2.5, null, true], \"b\": \"é\\\"\\n\"}|[\n  1,\n  {\n    \"k\": []\n  }\n]");
    }

    #[test]
    fn messages_behave_like_python_dicts() {
        let src = "{{ messages | tojson }}|{{ messages[0]['role'] }}|{{ messages[0].content }}|\
                   {{ messages[0].tool_calls is defined }}|{{ 'content' in messages[0] }}|\
                   {% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}";
        let t = ChatTemplate::from_source(src).unwrap();
        let out = t.render(&[ChatMessage::new("user", "hi")], false, "", "").unwrap();
        assert_eq!(out, "[{\"role\": \"user\", \"content\": \"hi\"}]|user|hi|False|True|role=user;content=hi;");
    }

    #[test]
    fn pycompat_methods_and_trim_blocks_work() {
        let src = "{% for m in messages %}\n{{ m.content.strip().upper() }}{% if m.role.startswith('us') %}!{% endif %}\n{% endfor %}";
        let t = ChatTemplate::from_source(src).unwrap();
        let out = t.render(&[ChatMessage::new("user", "  hi ")], false, "", "").unwrap();
        // trim_blocks eats the newline after each block tag, as in Hugging Face's Jinja setup.
        assert_eq!(out, "HI!");
    }
}
