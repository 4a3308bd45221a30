//! Actions the operator declares (`docs-corpus/actions.toml`): what the bot may do for a customer
//! by calling the company's own backend, and exactly how. This module reads and validates the
//! file and turns a declared action plus its arguments into a request, and a backend's answer into
//! the text the customer may see. It knows nothing of the engine, the server or the network: the
//! turn decides when an action runs, and the caller sends the request.
//!
//! The rules the file is held to:
//! - every action names its arguments as a JSON schema of flat, typed properties;
//! - the identity arguments come from the verified customer token (`from_customer`), never from
//!   the model or the message, and an action with any is never run for an anonymous customer;
//! - secrets (any header that authenticates) are references, `${env:NAME}` or `${file:PATH}`,
//!   resolved when the file is loaded; a literal credential in the file is refused;
//! - a write names the question that confirms it, and is never retried;
//! - what of a result may be shown is a template over named fields of the backend's JSON answer:
//!   the model never words a result.
//!
//! Every problem names the action and the field (`action "send-password-reset": path: ...`).

pub mod intent;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// The most actions one file may declare.
pub const MAX_ACTIONS: usize = 64;
/// The most arguments one action may take.
pub const MAX_ARGUMENTS: usize = 16;
const MAX_TEXT: usize = 2000;

/// Why an actions file was refused: where (the action and field) and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid actions file{}: {at}: {message}", source_name.as_deref().map(|s| format!(" {s}")).unwrap_or_default())]
pub struct ActionsError {
    pub source_name: Option<String>,
    /// e.g. `action "send-password-reset": path`, `backend "tallyworks": base_url`, `the file`.
    pub at: String,
    pub message: String,
}

impl ActionsError {
    fn new(at: impl Into<String>, message: impl Into<String>) -> Self {
        ActionsError { source_name: None, at: at.into(), message: message.into() }
    }
}

/// Read an action only fetches; a write changes something and is confirmed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Read,
    Write,
}

/// The HTTP methods an action may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    backends: BTreeMap<String, RawBackend>,
    #[serde(default, rename = "action")]
    actions: Vec<RawAction>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    base_url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    name: String,
    description: String,
    #[serde(default)]
    examples: Vec<String>,
    effect: Effect,
    #[serde(default)]
    confirm: Option<String>,
    #[serde(default)]
    public: bool,
    backend: String,
    method: Method,
    path: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    arguments: Option<toml::Value>,
    #[serde(default)]
    from_customer: BTreeMap<String, String>,
    #[serde(default)]
    body: Vec<String>,
    show: String,
    #[serde(default)]
    each: Option<RawEach>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    retries: Option<u32>,
    #[serde(default)]
    rate_limit_per_hour: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEach {
    field: String,
    item: String,
    #[serde(default)]
    max: Option<usize>,
}

/// One argument's type, as its JSON schema property says.
#[derive(Debug, Clone, PartialEq)]
pub struct Argument {
    pub name: String,
    pub kind: ArgKind,
    pub description: String,
    pub required: bool,
    /// `Some(claim)` when it is filled from the verified customer token.
    pub from_customer: Option<Claim>,
    /// The property's schema as written (for the grammar that fills it).
    pub schema: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    String,
    Integer,
    Number,
    Boolean,
}

/// A claim of the verified customer token an argument may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Sub,
    AccountId,
    Plan,
    Locale,
    Attribute(String),
}

impl Claim {
    /// The claim's name in the token (`sub`, `account_id`, `attributes.NAME`...).
    pub fn name(&self) -> String {
        match self {
            Claim::Sub => "sub".into(),
            Claim::AccountId => "account_id".into(),
            Claim::Plan => "plan".into(),
            Claim::Locale => "locale".into(),
            Claim::Attribute(a) => format!("attributes.{a}"),
        }
    }

    fn parse(s: &str) -> Option<Claim> {
        Some(match s {
            "sub" => Claim::Sub,
            "account_id" => Claim::AccountId,
            "plan" => Claim::Plan,
            "locale" => Claim::Locale,
            _ => {
                let name = s.strip_prefix("attributes.")?;
                if !is_name(name) {
                    return None;
                }
                Claim::Attribute(name.to_string())
            }
        })
    }
}

/// A list in a result: `field` is an array of objects, each shown with `item`, at most `max`.
#[derive(Debug, Clone, PartialEq)]
pub struct Each {
    pub field: String,
    pub item: Template,
    pub max: usize,
}

/// A validated action.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub name: String,
    pub description: String,
    pub examples: Vec<String>,
    pub effect: Effect,
    /// For a write: the question that confirms it, over the arguments.
    pub confirm: Option<Template>,
    pub public: bool,
    pub method: Method,
    /// The backend's base URL joined with the path template.
    pub url: Template,
    /// Headers with their secrets resolved; `secret` marks those never to be logged.
    pub headers: Vec<Header>,
    pub arguments: Vec<Argument>,
    /// Arguments sent as a JSON body (the rest go only into the URL).
    pub body: Vec<String>,
    pub show: Template,
    pub each: Option<Each>,
    pub timeout: Duration,
    pub retries: u32,
    pub rate_limit_per_hour: u32,
}

#[derive(Clone, PartialEq)]
pub struct Header {
    pub name: String,
    pub value: String,
    pub secret: bool,
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = if self.secret { "[redacted]" } else { self.value.as_str() };
        f.debug_struct("Header").field("name", &self.name).field("value", &value).finish()
    }
}

/// The validated file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Actions {
    pub actions: Vec<Action>,
}

/// Text with `{name}` placeholders (`{{` and `}}` for braces).
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Field(String),
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("`{{{name}` is not closed with `}}`")),
                        }
                    }
                    if !name.split('.').all(is_name) {
                        return Err(format!("`{{{name}}}` is not a field name (letters, digits and _, dotted for nested fields)"));
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Field(name));
                }
                '}' => return Err("a lone `}` (write `}}` for a brace)".into()),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Text(lit));
        }
        Ok(Template { parts })
    }

    /// The field names the template uses, in order.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f.as_str()),
            Part::Text(_) => None,
        })
    }

    /// Fills the template; `value` gives a field's text, or `None` when it is missing.
    pub fn render(&self, mut value: impl FnMut(&str) -> Option<String>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => out.push_str(&value(f).ok_or_else(|| format!("the field `{f}` is missing"))?),
            }
        }
        Ok(out)
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') && !s.as_bytes()[0].is_ascii_digit()
}

fn is_action_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && s.as_bytes()[0].is_ascii_lowercase()
}

fn check_text(at: &str, text: &str, max: usize) -> Result<(), ActionsError> {
    let n = text.trim().chars().count();
    if n == 0 || n > max {
        return Err(ActionsError::new(at, format!("must have 1 to {max} characters (has {n})")));
    }
    Ok(())
}

/// Headers that carry credentials: their values must be secret references.
fn authenticates(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n == "authorization" || n == "cookie" || n == "proxy-authorization" || ["key", "token", "secret", "auth", "password"].iter().any(|w| n.contains(w))
}

/// Where secrets come from: the environment and files, looked up when the actions are loaded.
pub trait SecretSource {
    fn env(&self, name: &str) -> Option<String>;
    fn file(&self, path: &str) -> std::io::Result<String>;
}

/// The process environment and the file system.
pub struct SystemSecrets;

impl SecretSource for SystemSecrets {
    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn file(&self, path: &str) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

/// Replaces `${env:NAME}` and `${file:PATH}` in `value`; returns the text and whether it held a
/// reference (so a secret).
fn resolve(at: &str, value: &str, secrets: &dyn SecretSource) -> Result<(String, bool), ActionsError> {
    let mut out = String::new();
    let mut rest = value;
    let mut referenced = false;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after.find('}').ok_or_else(|| ActionsError::new(at, "a `${` reference is not closed with `}`"))?;
        let reference = &after[..end];
        let text = match reference.split_once(':') {
            Some(("env", name)) if !name.is_empty() => {
                secrets.env(name).ok_or_else(|| ActionsError::new(at, format!("the environment variable {name} is not set")))?
            }
            Some(("file", path)) if !path.is_empty() => secrets
                .file(path)
                .map_err(|e| ActionsError::new(at, format!("the secret file {path} cannot be read: {e}")))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            _ => return Err(ActionsError::new(at, format!("`${{{reference}}}` is not `${{env:NAME}}` or `${{file:PATH}}`"))),
        };
        if text.is_empty() || text.chars().any(|c| c.is_control()) {
            return Err(ActionsError::new(at, format!("the secret from `${{{reference}}}` is empty or holds control characters")));
        }
        out.push_str(&text);
        referenced = true;
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok((out, referenced))
}

fn headers(at: &str, raw: &BTreeMap<String, String>, secrets: &dyn SecretSource) -> Result<Vec<Header>, ActionsError> {
    let mut out = Vec::new();
    for (name, value) in raw {
        let at = format!("{at}: headers.{name}");
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(ActionsError::new(&at, "a header name is letters, digits, - and _"));
        }
        let (value, referenced) = resolve(&at, value, secrets)?;
        if authenticates(name) && !referenced {
            return Err(ActionsError::new(
                &at,
                "a credential is never written in the file: use `${env:NAME}` or `${file:PATH}` (e.g. \"Bearer ${env:BACKEND_TOKEN}\")",
            ));
        }
        out.push(Header { name: name.clone(), value, secret: referenced || authenticates(name) });
    }
    Ok(out)
}

impl Actions {
    /// Reads and validates an actions file, resolving its secrets from the environment and files.
    pub fn load(path: &Path) -> Result<Actions, ActionsError> {
        let named = |mut e: ActionsError| {
            e.source_name = Some(path.display().to_string());
            e
        };
        let text = std::fs::read_to_string(path).map_err(|e| named(ActionsError::new("the file", format!("cannot be read: {e}"))))?;
        Actions::parse(&text, &SystemSecrets).map_err(named)
    }

    /// Parses and validates actions text. The first problem is returned, naming where it is.
    pub fn parse(text: &str, secrets: &dyn SecretSource) -> Result<Actions, ActionsError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ActionsError::new("the file", format!("not a valid actions file: {}", e.message())))?;
        if raw.actions.len() > MAX_ACTIONS {
            return Err(ActionsError::new("the file", format!("declares {} actions; at most {MAX_ACTIONS} are allowed", raw.actions.len())));
        }
        let mut backends = BTreeMap::new();
        for (name, b) in &raw.backends {
            let at = format!("backend \"{name}\"");
            if !is_name(name) {
                return Err(ActionsError::new(&at, "a backend name is letters, digits and _"));
            }
            let (base, _) = resolve(&format!("{at}: base_url"), &b.base_url, secrets)?;
            let base = base.trim_end_matches('/').to_string();
            let scheme_ok = base.strip_prefix("http://").or_else(|| base.strip_prefix("https://")).is_some_and(|h| !h.is_empty() && !h.contains(['?', '#', ' ', '{', '}']));
            if !scheme_ok {
                return Err(ActionsError::new(format!("{at}: base_url"), format!("{base:?} is not an http:// or https:// URL")));
            }
            backends.insert(name.clone(), (base, headers(&at, &b.headers, secrets)?));
        }
        let mut names = BTreeSet::new();
        let mut actions = Vec::new();
        for a in raw.actions {
            let at = format!("action \"{}\"", a.name);
            if !is_action_name(&a.name) {
                return Err(ActionsError::new(&at, "the name must be 1 to 64 characters of a-z 0-9 _ starting with a letter (snake_case)"));
            }
            if a.name == "none" {
                return Err(ActionsError::new(&at, "`none` is the name of choosing no action"));
            }
            if !names.insert(a.name.clone()) {
                return Err(ActionsError::new(&at, "another action has the same name"));
            }
            actions.push(action(&at, a, &backends, secrets)?);
        }
        Ok(Actions { actions })
    }

    pub fn get(&self, name: &str) -> Option<&Action> {
        self.actions.iter().find(|a| a.name == name)
    }
}

fn action(at: &str, a: RawAction, backends: &BTreeMap<String, (String, Vec<Header>)>, secrets: &dyn SecretSource) -> Result<Action, ActionsError> {
    let f = |field: &str| format!("{at}: {field}");
    check_text(&f("description"), &a.description, MAX_TEXT)?;
    if a.examples.len() > 32 {
        return Err(ActionsError::new(f("examples"), format!("{} examples; at most 32", a.examples.len())));
    }
    for (i, e) in a.examples.iter().enumerate() {
        check_text(&f(&format!("examples[{i}]")), e, 500)?;
    }
    match (a.effect, &a.confirm) {
        (Effect::Write, None) => return Err(ActionsError::new(f("confirm"), "a write needs `confirm`: the question the customer answers before it runs")),
        (Effect::Write, Some(c)) => check_text(&f("confirm"), c, MAX_TEXT)?,
        (Effect::Read, Some(_)) => return Err(ActionsError::new(f("confirm"), "only a write is confirmed; remove `confirm` or make it `effect = \"write\"`")),
        (Effect::Read, None) => {}
    }
    let retries = a.retries.unwrap_or(if a.effect == Effect::Read { 1 } else { 0 });
    if a.effect == Effect::Write && retries > 0 {
        return Err(ActionsError::new(f("retries"), "a write is never retried (it might run twice); set 0 or leave it out"));
    }
    if retries > 5 {
        return Err(ActionsError::new(f("retries"), format!("must be 0 to 5 (got {retries})")));
    }
    let timeout_ms = a.timeout_ms.unwrap_or(5000);
    if !(100..=60_000).contains(&timeout_ms) {
        return Err(ActionsError::new(f("timeout_ms"), format!("must be 100 to 60000 (got {timeout_ms})")));
    }
    let rate = a.rate_limit_per_hour.unwrap_or(20);
    if !(1..=10_000).contains(&rate) {
        return Err(ActionsError::new(f("rate_limit_per_hour"), format!("must be 1 to 10000 (got {rate})")));
    }
    let (base, backend_headers) =
        backends.get(&a.backend).ok_or_else(|| ActionsError::new(f("backend"), format!("no [backends.{}] is declared", a.backend)))?;

    // Arguments: a flat object schema.
    let schema = match &a.arguments {
        None => serde_json::json!({"type": "object", "properties": {}}),
        Some(v) => serde_json::to_value(v).map_err(|e| ActionsError::new(f("arguments"), e.to_string()))?,
    };
    let arguments = arguments(&f("arguments"), &schema, &a.from_customer)?;
    if !a.public && arguments.iter().all(|x| x.from_customer.is_none()) && a.effect == Effect::Write {
        // A write that no verified identity scopes could act on anyone's account.
        return Err(ActionsError::new(f("from_customer"), "a write that is not public acts on the verified customer: name the argument that comes from the token"));
    }
    if a.public && arguments.iter().any(|x| x.from_customer.is_some()) {
        return Err(ActionsError::new(f("public"), "a public action runs for anonymous customers, so it cannot take arguments from the customer token"));
    }
    let known: BTreeSet<&str> = arguments.iter().map(|x| x.name.as_str()).collect();
    let confirm = match &a.confirm {
        None => None,
        Some(c) => {
            let t = Template::parse(c).map_err(|e| ActionsError::new(f("confirm"), e))?;
            if let Some(field) = t.fields().find(|x| !known.contains(x)) {
                return Err(ActionsError::new(f("confirm"), format!("`{{{field}}}` is not one of the arguments")));
            }
            Some(t)
        }
    };

    if !a.path.starts_with('/') {
        return Err(ActionsError::new(f("path"), "must start with `/` (it is joined to the backend's base_url)"));
    }
    // The base URL holds no braces (checked with the backend), so every placeholder is the path's.
    let url = Template::parse(&format!("{base}{}", a.path)).map_err(|e| ActionsError::new(f("path"), e))?;
    for field in url.fields() {
        if !known.contains(field) {
            return Err(ActionsError::new(f("path"), format!("`{{{field}}}` is not one of the arguments")));
        }
    }
    for b in &a.body {
        if !known.contains(b.as_str()) {
            return Err(ActionsError::new(f("body"), format!("`{b}` is not one of the arguments")));
        }
    }
    if a.method == Method::Get && !a.body.is_empty() {
        return Err(ActionsError::new(f("body"), "a GET sends no body; put the arguments in the path"));
    }
    let show = Template::parse(&a.show).map_err(|e| ActionsError::new(f("show"), e))?;
    check_text(&f("show"), &a.show, MAX_TEXT)?;
    let each = match a.each {
        None => None,
        Some(e) => {
            if !e.field.split('.').all(is_name) {
                return Err(ActionsError::new(f("each.field"), format!("{:?} is not a field name", e.field)));
            }
            let item = Template::parse(&e.item).map_err(|m| ActionsError::new(f("each.item"), m))?;
            let max = e.max.unwrap_or(10);
            if !(1..=50).contains(&max) {
                return Err(ActionsError::new(f("each.max"), format!("must be 1 to 50 (got {max})")));
            }
            Some(Each { field: e.field, item, max })
        }
    };
    let mut all_headers = backend_headers.clone();
    for h in headers(at, &a.headers, secrets)? {
        all_headers.retain(|x| !x.name.eq_ignore_ascii_case(&h.name));
        all_headers.push(h);
    }
    Ok(Action {
        name: a.name,
        description: a.description,
        examples: a.examples,
        effect: a.effect,
        confirm,
        public: a.public,
        method: a.method,
        url,
        headers: all_headers,
        arguments,
        body: a.body,
        show,
        each,
        timeout: Duration::from_millis(timeout_ms),
        retries,
        rate_limit_per_hour: rate,
    })
}

fn arguments(at: &str, schema: &Value, from_customer: &BTreeMap<String, String>) -> Result<Vec<Argument>, ActionsError> {
    let obj = schema.as_object().ok_or_else(|| ActionsError::new(at, "must be a JSON schema object"))?;
    if obj.get("type").and_then(Value::as_str) != Some("object") {
        return Err(ActionsError::new(format!("{at}.type"), "must be \"object\""));
    }
    for k in obj.keys() {
        if !matches!(k.as_str(), "type" | "properties" | "required" | "additionalProperties" | "description") {
            return Err(ActionsError::new(format!("{at}.{k}"), "is not supported here (type, properties, required, additionalProperties, description)"));
        }
    }
    let empty = serde_json::Map::new();
    let props = match obj.get("properties") {
        None => &empty,
        Some(p) => p.as_object().ok_or_else(|| ActionsError::new(format!("{at}.properties"), "must be a table of properties"))?,
    };
    if props.len() > MAX_ARGUMENTS {
        return Err(ActionsError::new(format!("{at}.properties"), format!("{} arguments; at most {MAX_ARGUMENTS}", props.len())));
    }
    let required: Vec<&str> = match obj.get("required") {
        None => Vec::new(),
        Some(r) => r
            .as_array()
            .and_then(|r| r.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
            .ok_or_else(|| ActionsError::new(format!("{at}.required"), "must be a list of argument names"))?,
    };
    for r in &required {
        if !props.contains_key(*r) {
            return Err(ActionsError::new(format!("{at}.required"), format!("`{r}` is not one of the properties")));
        }
    }
    for (arg, claim) in from_customer {
        if !props.contains_key(arg) {
            return Err(ActionsError::new(format!("{at}: from_customer.{arg}"), "is not one of the arguments' properties"));
        }
        if Claim::parse(claim).is_none() {
            return Err(ActionsError::new(
                format!("{at}: from_customer.{arg}"),
                format!("{claim:?} is not a token claim (`sub`, `account_id`, `plan`, `locale` or `attributes.NAME`)"),
            ));
        }
    }
    let mut out = Vec::new();
    for (name, p) in props {
        let pat = format!("{at}.properties.{name}");
        if !is_name(name) {
            return Err(ActionsError::new(&pat, "an argument name is letters, digits and _, not starting with a digit"));
        }
        let p = p.as_object().ok_or_else(|| ActionsError::new(&pat, "must be a schema table"))?;
        let kind = match p.get("type").and_then(Value::as_str) {
            Some("string") => ArgKind::String,
            Some("integer") => ArgKind::Integer,
            Some("number") => ArgKind::Number,
            Some("boolean") => ArgKind::Boolean,
            _ => return Err(ActionsError::new(format!("{pat}.type"), "must be \"string\", \"integer\", \"number\" or \"boolean\"")),
        };
        for k in p.keys() {
            let ok = match k.as_str() {
                "type" | "description" | "enum" => true,
                "pattern" | "maxLength" | "minLength" | "format" => kind == ArgKind::String,
                "minimum" | "maximum" => matches!(kind, ArgKind::Integer | ArgKind::Number),
                _ => false,
            };
            if !ok {
                return Err(ActionsError::new(format!("{pat}.{k}"), "is not supported for this type"));
            }
        }
        if let Some(rx) = p.get("pattern") {
            let rx = rx.as_str().ok_or_else(|| ActionsError::new(format!("{pat}.pattern"), "must be a string"))?;
            regex::Regex::new(rx).map_err(|e| ActionsError::new(format!("{pat}.pattern"), format!("does not compile: {e}")))?;
        }
        if let Some(fmt) = p.get("format") {
            if fmt.as_str() != Some("email") {
                return Err(ActionsError::new(format!("{pat}.format"), "only \"email\" is supported"));
            }
        }
        let description = p.get("description").and_then(Value::as_str).unwrap_or_default().to_string();
        let from_customer = from_customer.get(name).and_then(|c| Claim::parse(c));
        if from_customer.is_none() && kind == ArgKind::String && p.get("pattern").is_none() && p.get("enum").is_none() && p.get("format").is_none() && p.get("maxLength").is_none() {
            return Err(ActionsError::new(&pat, "a string the model fills needs a bound: `pattern`, `enum`, `format` or `maxLength`"));
        }
        out.push(Argument { name: name.clone(), kind, description, required: required.contains(&name.as_str()), from_customer, schema: Value::Object(p.clone()) });
    }
    Ok(out)
}

/// A request ready to send: method, URL (arguments percent-encoded), headers, JSON body.
#[derive(Clone, PartialEq)]
pub struct Request {
    pub method: Method,
    pub url: String,
    pub headers: Vec<Header>,
    pub body: Option<Value>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request").field("method", &self.method).field("url", &self.url).field("headers", &self.headers).field("body", &self.body).finish()
    }
}

impl Request {
    /// The request as the audit keeps it: secret headers redacted.
    pub fn redacted(&self) -> Value {
        let headers: serde_json::Map<String, Value> =
            self.headers.iter().map(|h| (h.name.clone(), Value::String(if h.secret { "[redacted]".into() } else { h.value.clone() }))).collect();
        serde_json::json!({"method": self.method.as_str(), "url": self.url, "headers": headers, "body": self.body})
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for a path segment.
fn encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn lookup<'v>(v: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

impl Action {
    /// The arguments the model (or the customer's message) fills: those not from the token.
    pub fn filled_arguments(&self) -> impl Iterator<Item = &Argument> {
        self.arguments.iter().filter(|a| a.from_customer.is_none())
    }

    /// Whether the action acts on a verified customer (needs a token).
    pub fn needs_verified_customer(&self) -> bool {
        !self.public
    }

    /// Builds the request. `args` must hold every required argument, already checked against
    /// the schema (see [`Action::check_arguments`]); identity arguments are in `args` as the
    /// caller put them from the token.
    pub fn request(&self, args: &serde_json::Map<String, Value>) -> Result<Request, String> {
        let url = self.url.render(|f| args.get(f).map(|v| encode_segment(&text_of(v))))?;
        let body = if self.body.is_empty() {
            None
        } else {
            Some(Value::Object(self.body.iter().filter_map(|k| args.get(k).map(|v| (k.clone(), v.clone()))).collect()))
        };
        Ok(Request { method: self.method, url, headers: self.headers.clone(), body })
    }

    /// Checks filled arguments against their schema: types, enums, patterns, lengths, ranges;
    /// unknown and missing required ones. Returns the names of missing required arguments.
    pub fn check_arguments(&self, args: &serde_json::Map<String, Value>) -> Result<Vec<String>, String> {
        for k in args.keys() {
            if !self.arguments.iter().any(|a| &a.name == k) {
                return Err(format!("`{k}` is not an argument of `{}`", self.name));
            }
        }
        let mut missing = Vec::new();
        for a in &self.arguments {
            let Some(v) = args.get(&a.name) else {
                if a.required {
                    missing.push(a.name.clone());
                }
                continue;
            };
            let s = &a.schema;
            let ok = match a.kind {
                ArgKind::String => v.is_string(),
                ArgKind::Integer => v.is_i64() || v.is_u64(),
                ArgKind::Number => v.is_number(),
                ArgKind::Boolean => v.is_boolean(),
            };
            if !ok {
                return Err(format!("`{}` must be a {:?}", a.name, a.kind).to_lowercase());
            }
            if let Some(choices) = s.get("enum").and_then(Value::as_array) {
                if !choices.contains(v) {
                    return Err(format!("`{}` must be one of {}", a.name, Value::Array(choices.clone())));
                }
            }
            if let Some(t) = v.as_str() {
                let n = t.chars().count() as u64;
                if s.get("maxLength").and_then(Value::as_u64).is_some_and(|m| n > m) || s.get("minLength").and_then(Value::as_u64).is_some_and(|m| n < m) {
                    return Err(format!("`{}` has {n} characters, out of its bounds", a.name));
                }
                if let Some(rx) = s.get("pattern").and_then(Value::as_str) {
                    let anchored = format!("^(?:{rx})$");
                    if !regex::Regex::new(&anchored).map(|r| r.is_match(t)).unwrap_or(false) {
                        return Err(format!("`{}` does not match its pattern", a.name));
                    }
                }
                if s.get("format").and_then(Value::as_str) == Some("email") && !looks_like_email(t) {
                    return Err(format!("`{}` is not an email address", a.name));
                }
            }
            if let Some(x) = v.as_f64() {
                if s.get("minimum").and_then(Value::as_f64).is_some_and(|m| x < m) || s.get("maximum").and_then(Value::as_f64).is_some_and(|m| x > m) {
                    return Err(format!("`{}` is out of its range", a.name));
                }
            }
        }
        Ok(missing)
    }

    /// The text shown for a backend's JSON answer: `show`, with `each` listed where the template
    /// has `{items}`. A field the template names that the answer lacks is an error (the turn
    /// hands off rather than showing a half-filled text).
    pub fn render_result(&self, result: &Value) -> Result<String, String> {
        let items = match &self.each {
            None => None,
            Some(e) => {
                let list = lookup(result, &e.field).and_then(Value::as_array).ok_or_else(|| format!("the field `{}` is not a list", e.field))?;
                let lines = list.iter().take(e.max).map(|item| e.item.render(|f| lookup(item, f).map(text_of))).collect::<Result<Vec<_>, _>>()?;
                Some(lines.join("\n"))
            }
        };
        self.show.render(|f| if f == "items" { items.clone() } else { lookup(result, f).map(text_of) })
    }
}

fn looks_like_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else { return false };
    !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.') && !s.chars().any(|c| c.is_whitespace() || c.is_control()) && s.len() <= 254
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Fake;
    impl SecretSource for Fake {
        fn env(&self, name: &str) -> Option<String> {
            (name == "TOKEN").then(|| "s3cr3t-token".to_string())
        }
        fn file(&self, path: &str) -> std::io::Result<String> {
            if path == "/run/secret" {
                Ok("from-file\n".into())
            } else {
                Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"))
            }
        }
    }

    const GOOD: &str = r#"
[backends.accounts]
base_url = "http://127.0.0.1:9/api/"
headers = { Authorization = "Bearer ${env:TOKEN}", X-Client = "helpline" }

[[action]]
name = "change_billing_email"
description = "Change the billing email of the customer's account."
examples = ["change my billing email to ann@example.com"]
effect = "write"
confirm = "Change the billing email to {email}?"
backend = "accounts"
method = "POST"
path = "/accounts/{account_id}/billing-email"
body = ["email"]
from_customer = { account_id = "account_id" }
show = "Done: invoices now go to {billing_email}."
[action.arguments]
type = "object"
required = ["account_id", "email"]
[action.arguments.properties.account_id]
type = "string"
[action.arguments.properties.email]
type = "string"
format = "email"

[[action]]
name = "recent_invoices"
description = "List the customer's recent invoices."
effect = "read"
backend = "accounts"
method = "GET"
path = "/accounts/{account_id}/invoices"
from_customer = { account_id = "account_id" }
headers = { X-Api-Key = "${file:/run/secret}" }
show = "Your recent invoices:\n{items}"
each = { field = "invoices", item = "- {number}: {amount} ({url})", max = 2 }
arguments = { type = "object", required = ["account_id"], properties = { account_id = { type = "string" } } }
"#;

    #[test]
    fn a_good_file_loads_with_its_secrets_resolved_and_never_printed() {
        let a = Actions::parse(GOOD, &Fake).unwrap();
        assert_eq!(a.actions.len(), 2);
        let w = a.get("change_billing_email").unwrap();
        assert_eq!(w.retries, 0);
        assert_eq!(w.filled_arguments().map(|x| x.name.as_str()).collect::<Vec<_>>(), ["email"]);
        let auth = w.headers.iter().find(|h| h.name == "Authorization").unwrap();
        assert_eq!(auth.value, "Bearer s3cr3t-token");
        assert!(auth.secret);
        assert!(!format!("{a:?}").contains("s3cr3t"), "Debug never shows a secret");
        let r = a.get("recent_invoices").unwrap();
        assert_eq!(r.retries, 1, "reads retry once by default");
        assert_eq!(r.headers.iter().find(|h| h.name == "X-Api-Key").unwrap().value, "from-file");

        let mut args = serde_json::Map::new();
        args.insert("account_id".into(), json!("acct 1/2"));
        args.insert("email".into(), json!("ann@example.com"));
        assert_eq!(w.check_arguments(&args).unwrap(), Vec::<String>::new());
        let req = w.request(&args).unwrap();
        assert_eq!(req.url, "http://127.0.0.1:9/api/accounts/acct%201%2F2/billing-email", "arguments are encoded, never path syntax");
        assert_eq!(req.body, Some(json!({"email": "ann@example.com"})));
        let audit = req.redacted().to_string();
        assert!(!audit.contains("s3cr3t") && audit.contains("[redacted]") && audit.contains("helpline"), "{audit}");

        args.insert("email".into(), json!("not an email"));
        assert!(w.check_arguments(&args).unwrap_err().contains("email"));
        args.remove("email");
        assert_eq!(w.check_arguments(&args).unwrap(), ["email"]);
        args.insert("other".into(), json!(1));
        assert!(w.check_arguments(&args).is_err(), "unknown arguments are refused");

        let shown = r
            .render_result(&json!({"invoices": [{"number": "INV-1", "amount": "$10", "url": "https://x/1"}, {"number": "INV-2", "amount": "$12", "url": "https://x/2"}, {"number": "INV-3", "amount": "$1", "url": "u"}]}))
            .unwrap();
        assert_eq!(shown, "Your recent invoices:\n- INV-1: $10 (https://x/1)\n- INV-2: $12 (https://x/2)");
        assert!(w.render_result(&json!({"other": 1})).unwrap_err().contains("billing_email"), "a missing field is an error, not a blank");
    }

    /// Each mistake is refused naming the action and the field.
    #[test]
    fn each_bad_field_is_named() {
        let cases: &[(&str, &str, &str)] = &[
            ("name = \"change_billing_email\"", "name = \"Change-Email\"", "action \"Change-Email\""),
            ("confirm = \"Change the billing email to {email}?\"\n", "", "action \"change_billing_email\": confirm"),
            ("to {email}?", "to {mail}?", "action \"change_billing_email\": confirm"),
            ("effect = \"write\"", "effect = \"write\"\nretries = 2", "action \"change_billing_email\": retries"),
            ("backend = \"accounts\"\nmethod = \"POST\"", "backend = \"nope\"\nmethod = \"POST\"", "action \"change_billing_email\": backend"),
            ("/accounts/{account_id}/billing-email", "/accounts/{acct}/billing-email", "action \"change_billing_email\": path"),
            ("body = [\"email\"]", "body = [\"mail\"]", "action \"change_billing_email\": body"),
            ("from_customer = { account_id = \"account_id\" }\nshow = \"Done", "from_customer = { account_id = \"password\" }\nshow = \"Done", "from_customer.account_id"),
            ("format = \"email\"", "", "arguments.properties.email"),
            ("Bearer ${env:TOKEN}", "Bearer abc123", "backend \"accounts\": headers.Authorization"),
            ("Bearer ${env:TOKEN}", "Bearer ${env:MISSING}", "headers.Authorization"),
            ("${file:/run/secret}", "${file:/nope}", "action \"recent_invoices\": headers.X-Api-Key"),
            ("show = \"Done: invoices now go to {billing_email}.\"", "show = \"Done {billing_email\"", "action \"change_billing_email\": show"),
            ("max = 2", "max = 500", "action \"recent_invoices\": each.max"),
            ("http://127.0.0.1:9/api/", "ftp://x", "backend \"accounts\": base_url"),
            ("type = \"string\"\nformat", "type = \"date\"\nformat", "arguments.properties.email.type"),
        ];
        for (from, to, named) in cases {
            assert!(GOOD.contains(from), "case text not found: {from}");
            let text = GOOD.replacen(from, to, 1);
            let e = Actions::parse(&text, &Fake).expect_err(named).to_string();
            assert!(e.contains(named), "{named}: {e}");
        }
        let e = Actions::parse("[[action]]\nname = \"x\"\nbogus = 1", &Fake).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let twice = format!("{GOOD}\n{}", &GOOD[GOOD.find("[[action]]\nname = \"recent_invoices\"").unwrap()..]);
        assert!(Actions::parse(&twice, &Fake).unwrap_err().to_string().contains("same name"));
    }

    /// The shipped Tallyworks file is valid, and its writes are confirmed over their arguments.
    #[test]
    fn the_shipped_file_is_valid() {
        struct Env;
        impl SecretSource for Env {
            fn env(&self, name: &str) -> Option<String> {
                match name {
                    "TALLYWORKS_BACKEND_URL" => Some("http://127.0.0.1:8091".into()),
                    "TALLYWORKS_BACKEND_TOKEN" => Some("demo-token-0123456789".into()),
                    _ => None,
                }
            }
            fn file(&self, _: &str) -> std::io::Result<String> {
                Err(std::io::Error::other("no files"))
            }
        }
        let a = Actions::parse(include_str!("../../docs-corpus/actions.toml"), &Env).unwrap();
        let names: Vec<&str> = a.actions.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["send_password_reset", "lockout_status", "plan_and_next_invoice", "recent_invoices", "change_billing_email"]);
        for x in &a.actions {
            assert!(x.arguments.iter().any(|g| g.from_customer == Some(Claim::AccountId)), "{} acts on the verified account", x.name);
            assert_eq!(x.effect == Effect::Write, x.confirm.is_some());
        }
        let email = a.get("change_billing_email").unwrap();
        assert_eq!(email.filled_arguments().map(|g| g.name.as_str()).collect::<Vec<_>>(), ["email"]);
        let mut args = serde_json::Map::new();
        args.insert("email".into(), json!("ap@acme.example"));
        let q = email.confirm.as_ref().unwrap().render(|f| args.get(f).map(text_of)).unwrap();
        assert!(q.contains("ap@acme.example"), "{q}");
        let missing = Actions::parse(include_str!("../../docs-corpus/actions.toml"), &Fake).unwrap_err().to_string();
        assert!(missing.contains("TALLYWORKS_BACKEND_URL") && missing.contains("backend \"tallyworks\": base_url"), "{missing}");
    }

    #[test]
    fn templates_parse_and_render() {
        let t = Template::parse("a {x} {{literal}} {y.z}").unwrap();
        assert_eq!(t.fields().collect::<Vec<_>>(), ["x", "y.z"]);
        assert_eq!(t.render(|f| Some(f.to_uppercase())).unwrap(), "a X {literal} Y.Z");
        assert!(Template::parse("{x").is_err());
        assert!(Template::parse("x}").is_err());
        assert!(Template::parse("{a b}").is_err());
    }
}
