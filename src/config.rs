//! `helpline serve` configuration: flags, environment variables and an optional TOML file resolve
//! into one validated [`ServeConfig`]. Precedence: flag > environment > file > default.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Validated server configuration. Built only through the loader, so every value is in range.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// `--model` as given (local path, `hf:` spec, or none for the default model).
    pub model: Option<String>,
    /// The id clients use in `model` and that `/v1/models` lists.
    pub model_id: String,
    pub host: IpAddr,
    pub port: u16,
    pub threads: usize,
    /// sha256 digests of the accepted API keys; empty = no authentication.
    pub api_key_hashes: Vec<[u8; 32]>,
    /// Allowed CORS origins; empty = CORS off.
    pub cors_origins: Vec<String>,
    /// Host names (lower case, no port) the `Host` header may carry, besides IP literals and
    /// `localhost` (a DNS-rebinding page presents its own name). `*` allows any.
    pub allowed_hosts: Vec<String>,
    /// Requests waiting for a decoding slot before 429.
    pub queue_capacity: usize,
    /// Sequences decoded concurrently.
    pub max_concurrent: usize,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    /// Connections open at once, overall (more are answered 503 and closed).
    pub max_connections: usize,
    /// Connections open at once from one client address (more are answered 429 and closed).
    pub max_connections_per_ip: usize,
    /// A request body must arrive whole within this time (else 408).
    pub body_read_timeout: Duration,
    /// Longest a write to a client may stall (a reader that stopped reading a stream is cut).
    pub write_timeout: Duration,
    /// Characters one chat message may have (else 413 naming the message).
    pub max_message_chars: usize,
    /// Messages one chat request may hold (else 413).
    pub max_messages: usize,
    /// Turns one stored conversation may grow to (else 422: start a new conversation).
    pub max_conversation_turns: i64,
    /// Requests being validated and prepared (grammars, templates, tokenizing) at once, before
    /// the engine's queue; more get 429.
    pub max_preparing: usize,
    /// Most prompt tokens accepted (besides the model's context).
    pub max_prompt_tokens: usize,
    /// Most tokens a request may ask to generate (`max_tokens`).
    pub max_tokens_limit: usize,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: usize,
    /// `temperature` and `top_p` when the request gives none (greedy unless configured: OpenAI's
    /// temperature 1 makes a support answer change with each ask).
    pub default_temperature: f32,
    pub default_top_p: f32,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Duration,
    /// Interval of SSE keep-alive comments.
    pub keep_alive: Duration,
    pub config_file: Option<PathBuf>,
    pub grounding: GroundingConfig,
    pub grammar: GrammarLimits,
    pub conversations: ConversationsConfig,
    pub access: AccessConfig,
}

/// Who may do what: the admin scope's keys, which request fields a customer may use, and how
/// customers are identified.
#[derive(Debug, Clone)]
pub struct AccessConfig {
    /// sha256 digests of the admin keys: index and policy reload, metrics, raw completions,
    /// tokenize. With none configured those routes are refused.
    pub admin_key_hashes: Vec<[u8; 32]>,
    /// Customers may send `helpline.grounding: false`.
    pub customer_grounding_off: bool,
    /// Customers may send `response_format` or `helpline.grammar`.
    pub customer_structured_outputs: bool,
    /// Customers may send `system` and `developer` messages.
    pub customer_system_messages: bool,
    /// Customers may choose `helpline.answer_mode` (or `helpline.quote`) within
    /// `allowed_answer_modes`; otherwise they get the server's mode.
    pub customer_answer_mode: bool,
    /// Chat without a verified customer token: the customer's details are taken as asserted, and
    /// conversation ids are the server's (a conversation cannot be taken over by naming it).
    pub anonymous_chat: bool,
    /// HS256 secret customer tokens are signed with (the company's site signs them).
    pub customer_token_secret: Option<String>,
    /// Demo accounts the chat page may sign in as (`GET /demo/sign-in/{account}` mints a short
    /// signed token with `customer_token_secret`); empty (the default): no demo sign-in.
    pub demo_accounts: Vec<String>,
    /// Or a PEM public key file: Ed25519 (EdDSA) or RSA (RS256).
    pub customer_token_public_key: Option<PathBuf>,
    /// That file's contents, read (and checked) when the config is loaded.
    pub customer_token_public_key_pem: Option<Vec<u8>>,
    /// Required `iss` and `aud` claims, when set.
    pub customer_token_issuer: Option<String>,
    pub customer_token_audience: Option<String>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            admin_key_hashes: Vec::new(),
            customer_grounding_off: false,
            customer_structured_outputs: false,
            customer_system_messages: false,
            customer_answer_mode: false,
            anonymous_chat: true,
            customer_token_secret: None,
            demo_accounts: Vec::new(),
            customer_token_public_key: None,
            customer_token_public_key_pem: None,
            customer_token_issuer: None,
            customer_token_audience: None,
        }
    }
}

/// Where conversations are stored, who may read them, and where handoffs are sent.
#[derive(Debug, Clone)]
pub struct ConversationsConfig {
    /// SQLite's directory (`helpline.db` inside), and where KB drafts' approvals are recorded.
    pub data_dir: PathBuf,
    /// `postgres://...` to share one database between replicas; none: SQLite in `data_dir`.
    pub database_url: Option<String>,
    /// SQLite `synchronous`: `full` (default: every commit reaches the disk) or `normal`.
    pub store_sync: String,
    /// Conversations untouched for this many days are purged (0: kept until deleted).
    pub retention_days: u64,
    /// A stable name for this replica (pod or host name) when several share PostgreSQL: a restarted
    /// replica then marks its own cut-off answers interrupted at once. None: `local` for SQLite, a
    /// random name for PostgreSQL (leftovers are then interrupted after 10 minutes).
    pub instance_id: Option<String>,
    /// sha256 digests of the agent keys: agent routes (conversations, assist, KB drafts, audit)
    /// need one of them; with none configured those routes are refused.
    pub agent_key_hashes: Vec<[u8; 32]>,
    /// Handoff summaries are POSTed here (signed); none: not sent.
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
    pub webhook_max_attempts: u32,
    pub webhook_initial_backoff: Duration,
    pub webhook_max_backoff: Duration,
    pub webhook_timeout: Duration,
}

impl Default for ConversationsConfig {
    fn default() -> Self {
        ConversationsConfig {
            data_dir: PathBuf::from("data"),
            database_url: None,
            store_sync: "full".into(),
            retention_days: 365,
            instance_id: None,
            agent_key_hashes: Vec::new(),
            webhook_url: None,
            webhook_secret: None,
            webhook_max_attempts: 8,
            webhook_initial_backoff: Duration::from_millis(500),
            webhook_max_backoff: Duration::from_secs(300),
            webhook_timeout: Duration::from_secs(10),
        }
    }
}

/// Bounds on the structured-output constraints clients send (`response_format`, `helpline.grammar`):
/// past any of them the request is a 400 naming the bound.
#[derive(Debug, Clone, PartialEq)]
pub struct GrammarLimits {
    /// Size of a schema (serialized), regex or Lark grammar, in bytes.
    pub max_bytes: usize,
    /// Nesting of JSON subschemas, or of brackets in a regex or Lark grammar.
    pub max_depth: usize,
    /// Time to compile one, including its first mask (interrupted when it runs out).
    pub compile_budget: Duration,
    /// Time for each later step of a client's constraint during decoding (interrupted too).
    pub mask_budget: Duration,
}

impl Default for GrammarLimits {
    fn default() -> Self {
        let g = crate::guard::grammar::GuardLimits::default();
        GrammarLimits { max_bytes: g.max_grammar_bytes, max_depth: g.max_depth, compile_budget: g.compile_budget, mask_budget: Duration::from_millis(200) }
    }
}

/// Retrieval and grounded answers.
#[derive(Debug, Clone)]
pub struct GroundingConfig {
    /// The approved documentation (`docs-corpus` by default).
    pub docs_dir: PathBuf,
    /// Where the tantivy index lives (`index` by default).
    pub index_dir: PathBuf,
    /// Bring the index up to date with `docs_dir` at start-up (incremental; off: use the index as found).
    pub auto_index: bool,
    /// Ground chat answers unless a request turns it off (`helpline.grounding: false`).
    pub enabled: bool,
    /// Passages retrieved per turn (before the token budget).
    pub passages: usize,
    /// Relevance gate: below it the bot refuses without calling the model.
    pub min_relevance: f32,
    /// Tokens the passages may take in the prompt; passages beyond it are dropped and reported.
    pub passage_tokens: usize,
    /// Tokens earlier turns may take in the prompt; older turns beyond it are dropped and reported.
    pub history_tokens: usize,
    /// What the bot says when the documentation does not cover the question.
    pub refusal_message: String,
    /// How a customer reaches a human (shown with refusals and on the chat page).
    pub handoff_message: String,
    /// The policy pack (forbidden commitments, escalation triggers, out-of-scope topics).
    pub policy_file: PathBuf,
    /// The declared actions (`docs-corpus/actions.toml` for the Tallyworks demo); none: no actions.
    pub actions_file: Option<PathBuf>,
    /// How grounded answers are made unless a request asks otherwise (`answer_mode`; the older
    /// `quote_mode = true` means `quote`).
    pub answer_mode: crate::turn::Mode,
    /// The modes a request may ask for (`helpline.answer_mode`).
    pub allowed_modes: Vec<crate::turn::Mode>,
}

impl Default for GroundingConfig {
    fn default() -> Self {
        GroundingConfig {
            docs_dir: PathBuf::from("docs-corpus"),
            index_dir: PathBuf::from("index"),
            auto_index: true,
            enabled: true,
            passages: 3,
            min_relevance: crate::turn::GATE_THRESHOLD,
            passage_tokens: 1024,
            history_tokens: 768,
            refusal_message: "I'm sorry, I can't answer that from our help center documentation, and I don't want to guess. \
                              Would you like me to connect you with a member of our support team?"
                .into(),
            handoff_message: "To talk to a person, email support@tallyworks.example or choose \"Talk to a human\"; \
                              our team answers within one business day."
                .into(),
            policy_file: PathBuf::from("docs-corpus/policy.toml"),
            actions_file: None,
            answer_mode: crate::turn::Mode::Assembled,
            allowed_modes: vec![crate::turn::Mode::Assembled, crate::turn::Mode::Generative, crate::turn::Mode::Quote],
        }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            model: None,
            model_id: "smollm2-135m-instruct".into(),
            host: IpAddr::from([127, 0, 0, 1]),
            port: 8080,
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            api_key_hashes: Vec::new(),
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            queue_capacity: 64,
            max_concurrent: 4,
            max_body_bytes: 1 << 20,
            max_header_bytes: 16 << 10,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_connections_per_ip: 256,
            body_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
            max_message_chars: 32_000,
            max_messages: 256,
            max_conversation_turns: 1000,
            max_preparing: 16,
            max_prompt_tokens: 8192,
            max_tokens_limit: 4096,
            default_max_tokens: 512,
            default_temperature: 0.0,
            default_top_p: 1.0,
            shutdown_grace: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            config_file: None,
            grounding: GroundingConfig::default(),
            grammar: GrammarLimits::default(),
            conversations: ConversationsConfig::default(),
            access: AccessConfig::default(),
        }
    }
}


/// `helpline serve` flags. Every flag can also come from the environment (`HELPLINE_<NAME>`, e.g.
/// `HELPLINE_MAX_BODY_BYTES`) or from the TOML file given by `--config` (the same names in snake_case,
/// e.g. `max_body_bytes = 65536`). Precedence: flag > environment > file > default.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// Address to bind (default 127.0.0.1; another address must be asked for).
    #[arg(long)]
    pub host: Option<String>,
    /// Port to bind (default 8080; 0 picks a free port, printed in the listening line).
    #[arg(long)]
    pub port: Option<u16>,
    /// TOML configuration file (env HELPLINE_CONFIG).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Accept this API key as `Authorization: Bearer KEY` (repeatable; 16-512 visible ASCII characters).
    /// HELPLINE_API_KEY may hold a comma-separated list. Without any key, no authentication is asked.
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_key: Vec<String>,
    /// File of accepted API keys as sha256 hex digests, one per line (`#` starts a comment).
    /// Make a line with `printf %s KEY | sha256sum`.
    #[arg(long, value_name = "FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Allow browser requests from this origin, e.g. https://support.example.com (repeatable; `*` is refused).
    /// CORS is off unless at least one origin is given.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origin: Vec<String>,
    /// A host name clients reach the server by, e.g. support.example.com (repeatable; env
    /// HELPLINE_ALLOWED_HOST as a comma-separated list; `*` allows any). IP addresses and
    /// localhost are always accepted; other `Host` headers are refused (DNS rebinding).
    #[arg(long = "allowed-host", value_name = "HOST")]
    pub allowed_host: Vec<String>,
    /// Requests that may wait for a decoding slot; beyond this the server answers 429 (default 64).
    #[arg(long)]
    pub queue_capacity: Option<usize>,
    /// Sequences decoded at the same time (default 4).
    #[arg(long)]
    pub max_concurrent: Option<usize>,
    /// Largest accepted request body in bytes (default 1048576).
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// Largest accepted request line plus headers in bytes; larger gets 431 (default 16384).
    #[arg(long)]
    pub max_header_bytes: Option<usize>,
    /// Seconds a client has to send its complete request headers (default 10).
    #[arg(long)]
    pub header_read_timeout_secs: Option<u64>,
    /// Connections open at once, overall (default 1024); more are answered 503.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Connections open at once from one client address (default 256); more are answered 429.
    #[arg(long)]
    pub max_connections_per_ip: Option<usize>,
    /// Seconds a client has to send a whole request body (default 30); else 408.
    #[arg(long)]
    pub body_read_timeout_secs: Option<u64>,
    /// Seconds a write to a client may stall before the connection is closed (default 60).
    #[arg(long)]
    pub write_timeout_secs: Option<u64>,
    /// Characters one chat message may have (default 32000).
    #[arg(long)]
    pub max_message_chars: Option<usize>,
    /// Messages one chat request may hold (default 256).
    #[arg(long)]
    pub max_messages: Option<usize>,
    /// Turns a stored conversation may grow to (default 1000).
    #[arg(long)]
    pub max_conversation_turns: Option<u64>,
    /// Requests being prepared (grammar, template, tokenizing) at once before the queue (default 16).
    #[arg(long)]
    pub max_preparing: Option<usize>,
    /// Most prompt tokens accepted per request (default 8192).
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Most tokens a request may ask to generate (default 4096).
    #[arg(long)]
    pub max_tokens_limit: Option<usize>,
    /// Tokens generated when a request gives no `max_tokens` (default 512).
    #[arg(long)]
    pub default_max_tokens: Option<usize>,
    /// Seconds in-flight requests may run after SIGTERM/Ctrl-C before they are cut (default 30).
    #[arg(long)]
    pub shutdown_grace_secs: Option<u64>,
    /// Model id that clients send and /v1/models lists (default: smollm2-135m-instruct for the default
    /// model, else the model file's name without `.gguf`).
    #[arg(long)]
    pub model_id: Option<String>,
    /// The approved documentation to answer from (default docs-corpus).
    #[arg(long, value_name = "DIR")]
    pub docs_dir: Option<PathBuf>,
    /// The search index directory (default index).
    #[arg(long, value_name = "DIR")]
    pub index_dir: Option<PathBuf>,
    /// `true` (default): bring the index up to date with the docs at start-up; `false`: serve the index as found.
    #[arg(long, value_name = "BOOL")]
    pub auto_index: Option<bool>,
    /// `true` (default): ground chat answers in the docs unless a request says otherwise.
    #[arg(long, value_name = "BOOL")]
    pub grounding: Option<bool>,
    /// Passages retrieved per chat turn (default 3).
    #[arg(long)]
    pub retrieve_k: Option<usize>,
    /// Relevance gate in [0, 1]: below it the bot says the docs do not cover the question (default: calibrated).
    #[arg(long)]
    pub min_relevance: Option<f64>,
    /// Prompt tokens the retrieved passages may take (default 1024).
    #[arg(long)]
    pub passage_token_budget: Option<usize>,
    /// Prompt tokens earlier turns may take (default 768).
    #[arg(long)]
    pub history_token_budget: Option<usize>,
    /// What the bot answers when the docs do not cover a question.
    #[arg(long)]
    pub refusal_message: Option<String>,
    /// How customers reach a human (shown with refusals and on the chat page).
    #[arg(long)]
    pub handoff_message: Option<String>,
    /// The policy pack TOML (default docs-corpus/policy.toml); validated at start-up and on reload.
    #[arg(long, value_name = "FILE")]
    pub policy_file: Option<PathBuf>,
    /// The actions the bot may take for verified customers (e.g. docs-corpus/actions.toml, see
    /// docs/actions.md); validated at start-up and on policy reload. Default: none.
    #[arg(long, value_name = "FILE")]
    pub actions_file: Option<PathBuf>,
    /// `true`: grounded answers are made in quote mode (the model copying sentences under a grammar);
    /// the same as `--answer-mode quote`. Kept for older configurations.
    #[arg(long, value_name = "BOOL")]
    pub quote_mode: Option<bool>,
    /// How grounded answers are made unless a request asks otherwise: `assembled` (default; quotes
    /// of the approved articles between fixed connectives, no model), `generative` (the model's
    /// wording, every sentence checked against the evidence before it is sent) or `quote`.
    #[arg(long, value_name = "MODE")]
    pub answer_mode: Option<String>,
    /// The answer modes a request may ask for with `helpline.answer_mode` (comma-separated;
    /// default all three).
    #[arg(long, value_name = "MODES")]
    pub allowed_answer_modes: Option<String>,
    /// `temperature` of requests that give none (default 0: greedy).
    #[arg(long)]
    pub default_temperature: Option<f64>,
    /// `top_p` of requests that give none (default 1).
    #[arg(long)]
    pub default_top_p: Option<f64>,
    /// Largest structured-output constraint (JSON schema, regex or Lark grammar) a request may send, in bytes (default 131072).
    #[arg(long)]
    pub max_grammar_bytes: Option<usize>,
    /// Deepest nesting of a request's JSON schema or grammar (default 32).
    #[arg(long)]
    pub max_grammar_depth: Option<usize>,
    /// Longest a request's structured-output constraint may take to compile, in milliseconds (default 500).
    #[arg(long)]
    pub grammar_compile_ms: Option<u64>,
    /// Longest one decoding step of a request's constraint may take, in milliseconds (default 200).
    #[arg(long)]
    pub grammar_mask_ms: Option<u64>,
    /// Where conversations are stored with SQLite (default data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// `postgres://user@host/db` to store conversations in PostgreSQL (several replicas); default: SQLite in data_dir.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// SQLite durability: `full` (default) or `normal`.
    #[arg(long)]
    pub store_sync: Option<String>,
    /// Purge conversations untouched for this many days (default 365; 0 keeps them until deleted).
    #[arg(long)]
    pub retention_days: Option<u64>,
    /// This replica's stable name (e.g. the pod name) when replicas share PostgreSQL.
    #[arg(long)]
    pub instance_id: Option<String>,
    /// Accept this key for agent routes (conversations, assist, KB drafts, audit); repeatable. Without one
    /// those routes are refused.
    #[arg(long = "agent-api-key", value_name = "KEY")]
    pub agent_api_key: Vec<String>,
    /// File of agent keys as sha256 hex digests, one per line.
    #[arg(long, value_name = "FILE")]
    pub agent_api_keys_file: Option<PathBuf>,
    /// Accept this key for admin routes (index and policy reload, metrics, raw completions,
    /// tokenize); repeatable. Without one those routes are refused.
    #[arg(long = "admin-api-key", value_name = "KEY")]
    pub admin_api_key: Vec<String>,
    /// File of admin keys as sha256 hex digests, one per line.
    #[arg(long, value_name = "FILE")]
    pub admin_api_keys_file: Option<PathBuf>,
    /// `true`: customers may send `helpline.grounding: false` (default false).
    #[arg(long, value_name = "BOOL")]
    pub customer_grounding_off: Option<bool>,
    /// `true`: customers may send `response_format` / `helpline.grammar` (default false).
    #[arg(long, value_name = "BOOL")]
    pub customer_structured_outputs: Option<bool>,
    /// `true`: customers may send `system` and `developer` messages (default false).
    #[arg(long, value_name = "BOOL")]
    pub customer_system_messages: Option<bool>,
    /// `true`: customers may choose `helpline.answer_mode` (default false).
    #[arg(long, value_name = "BOOL")]
    pub customer_answer_mode: Option<bool>,
    /// `true` (default): chat without a verified customer token is allowed, the customer's details
    /// taken as asserted; `false`: every chat needs a customer token.
    #[arg(long, value_name = "BOOL")]
    pub anonymous_chat: Option<bool>,
    /// HS256 secret (at least 32 bytes) customer tokens are signed with.
    #[arg(long)]
    pub customer_token_secret: Option<String>,
    /// Demo only: account ids (comma-separated) the chat page may sign in as at
    /// /demo/sign-in/{account}, with a short token signed by `customer_token_secret`.
    #[arg(long, value_name = "ACCOUNTS")]
    pub demo_accounts: Option<String>,
    /// PEM public key (Ed25519 for EdDSA, RSA for RS256) customer tokens are signed for.
    #[arg(long, value_name = "FILE")]
    pub customer_token_public_key: Option<PathBuf>,
    /// Required `iss` claim of customer tokens.
    #[arg(long)]
    pub customer_token_issuer: Option<String>,
    /// Required `aud` claim of customer tokens.
    #[arg(long)]
    pub customer_token_audience: Option<String>,
    /// POST handoff summaries to this http:// URL (signed with handoff_webhook_secret).
    #[arg(long, value_name = "URL")]
    pub handoff_webhook_url: Option<String>,
    /// Secret (at least 16 bytes) the webhook signature is made with.
    #[arg(long)]
    pub handoff_webhook_secret: Option<String>,
    /// Attempts before a webhook delivery is dead-lettered (default 8).
    #[arg(long)]
    pub webhook_max_attempts: Option<u64>,
    /// First retry delay in milliseconds, doubled per attempt (default 500).
    #[arg(long)]
    pub webhook_initial_backoff_ms: Option<u64>,
    /// Longest retry delay in milliseconds (default 300000).
    #[arg(long)]
    pub webhook_max_backoff_ms: Option<u64>,
    /// Time allowed per webhook attempt in milliseconds (default 10000).
    #[arg(long)]
    pub webhook_timeout_ms: Option<u64>,
}

/// Where a setting's value came from; errors name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env,
    File(PathBuf),
}

/// A setting that cannot be used: which one, where its value came from, and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The setting in snake_case, e.g. `max_body_bytes` (or `config` for the file itself).
    pub setting: String,
    /// Where the bad value came from (`None` for checks across settings).
    pub source: Option<Source>,
    pub message: String,
}

impl ConfigError {
    fn new(setting: &str, source: Option<Source>, message: impl Into<String>) -> Self {
        ConfigError { setting: setting.to_string(), source, message: message.into() }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.setting;
        match &self.source {
            Some(Source::Flag) => write!(f, "invalid `{s}` (from flag --{}): {}", s.replace('_', "-"), self.message),
            Some(Source::Env) => write!(f, "invalid `{s}` (from env {}): {}", env_name(s), self.message),
            Some(Source::File(p)) => write!(f, "invalid `{s}` (from file {}): {}", p.display(), self.message),
            None => write!(f, "invalid `{s}`: {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every setting the file and the environment may give, in snake_case.
pub const SETTINGS: &[&str] = &[
    "host",
    "port",
    "api_key",
    "api_keys_file",
    "cors_origin",
    "allowed_host",
    "queue_capacity",
    "max_concurrent",
    "max_body_bytes",
    "max_header_bytes",
    "header_read_timeout_secs",
    "max_connections",
    "max_connections_per_ip",
    "body_read_timeout_secs",
    "write_timeout_secs",
    "max_message_chars",
    "max_messages",
    "max_conversation_turns",
    "max_preparing",
    "max_prompt_tokens",
    "max_tokens_limit",
    "default_max_tokens",
    "shutdown_grace_secs",
    "model_id",
    "docs_dir",
    "index_dir",
    "auto_index",
    "grounding",
    "retrieve_k",
    "min_relevance",
    "passage_token_budget",
    "history_token_budget",
    "refusal_message",
    "handoff_message",
    "policy_file",
    "actions_file",
    "quote_mode",
    "answer_mode",
    "allowed_answer_modes",
    "default_temperature",
    "default_top_p",
    "max_grammar_bytes",
    "max_grammar_depth",
    "grammar_compile_ms",
    "grammar_mask_ms",
    "data_dir",
    "database_url",
    "store_sync",
    "retention_days",
    "instance_id",
    "agent_api_key",
    "agent_api_keys_file",
    "admin_api_key",
    "admin_api_keys_file",
    "customer_grounding_off",
    "customer_structured_outputs",
    "customer_system_messages",
    "customer_answer_mode",
    "anonymous_chat",
    "customer_token_secret",
    "demo_accounts",
    "customer_token_public_key",
    "customer_token_issuer",
    "customer_token_audience",
    "handoff_webhook_url",
    "handoff_webhook_secret",
    "webhook_max_attempts",
    "webhook_initial_backoff_ms",
    "webhook_max_backoff_ms",
    "webhook_timeout_ms",
];

/// The environment variable for a setting: `HELPLINE_` + its name in upper case.
pub fn env_name(setting: &str) -> String {
    format!("HELPLINE_{}", setting.to_ascii_uppercase())
}

/// Resolves flags, the process environment and the optional TOML file into a validated config.
pub fn load(model: Option<String>, threads: usize, args: &ServeArgs) -> Result<ServeConfig, ConfigError> {
    load_with_env(model, threads, args, &|name| std::env::var(name).ok())
}

/// [`load`] with the environment given as a lookup (tests use a map instead of the process environment).
pub fn load_with_env(
    model: Option<String>,
    threads: usize,
    args: &ServeArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ServeConfig, ConfigError> {
    let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let config_file = match (&args.config, env("HELPLINE_CONFIG")) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(p)) => Some(PathBuf::from(p)),
        (None, None) => None,
    };
    let file = match &config_file {
        Some(path) => read_file(path)?,
        None => toml::Table::new(),
    };
    let r = Resolver { args, env: &env, file: &file, file_path: config_file.as_deref() };
    let defaults = ServeConfig::default();

    let host = match r.pick("host") {
        Some((raw, src)) => parse_host(&raw.single("host", &src)?).map_err(|m| ConfigError::new("host", Some(src), m))?,
        None => defaults.host,
    };
    let port = r.int("port", 0, u16::MAX as u64)?.map(|p| p as u16).unwrap_or(defaults.port);

    let mut api_key_hashes = Vec::new();
    if let Some((raw, src)) = r.pick("api_key") {
        for key in raw.list("api_key", &src)? {
            check_key(&key).map_err(|m| ConfigError::new("api_key", Some(src.clone()), m))?;
            api_key_hashes.push(crate::server::auth::digest(&key));
        }
    }
    if let Some((raw, src)) = r.pick("api_keys_file") {
        let path = PathBuf::from(raw.single("api_keys_file", &src)?);
        let hashes = read_key_digests(&path).map_err(|m| ConfigError::new("api_keys_file", Some(src), m))?;
        api_key_hashes.extend(hashes);
    }
    api_key_hashes.sort_unstable();
    api_key_hashes.dedup();

    let mut cors_origins = Vec::new();
    if let Some((raw, src)) = r.pick("cors_origin") {
        for origin in raw.list("cors_origin", &src)? {
            let o = parse_origin(&origin).map_err(|m| ConfigError::new("cors_origin", Some(src.clone()), m))?;
            if !cors_origins.contains(&o) {
                cors_origins.push(o);
            }
        }
    }

    let mut allowed_hosts = Vec::new();
    if let Some((raw, src)) = r.pick("allowed_host") {
        for host in raw.list("allowed_host", &src)? {
            let h = host.trim().trim_end_matches('.').to_ascii_lowercase();
            let ok = h == "*" || (!h.is_empty() && h.len() <= 253 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
            if !ok {
                return Err(ConfigError::new("allowed_host", Some(src.clone()), format!("{host:?} is not a host name (letters, digits, - and . only, no port), or `*`")));
            }
            if !allowed_hosts.contains(&h) {
                allowed_hosts.push(h);
            }
        }
    }

    const MIB: u64 = 1 << 20;
    let get = |name: &str, lo: u64, hi: u64, default: usize| -> Result<usize, ConfigError> {
        Ok(r.int(name, lo, hi)?.map(|v| v as usize).unwrap_or(default))
    };
    let queue_capacity = get("queue_capacity", 1, 65_536, defaults.queue_capacity)?;
    let max_concurrent = get("max_concurrent", 1, 256, defaults.max_concurrent)?;
    let max_body_bytes = get("max_body_bytes", 1024, 64 * MIB, defaults.max_body_bytes)?;
    let max_header_bytes = get("max_header_bytes", 1024, MIB, defaults.max_header_bytes)?;
    let header_read_timeout =
        r.int("header_read_timeout_secs", 1, 300)?.map(Duration::from_secs).unwrap_or(defaults.header_read_timeout);
    let max_connections = get("max_connections", 1, 1 << 20, defaults.max_connections)?;
    let max_connections_per_ip = get("max_connections_per_ip", 1, 1 << 20, defaults.max_connections_per_ip)?;
    let body_read_timeout = r.int("body_read_timeout_secs", 1, 3600)?.map(Duration::from_secs).unwrap_or(defaults.body_read_timeout);
    let write_timeout = r.int("write_timeout_secs", 1, 3600)?.map(Duration::from_secs).unwrap_or(defaults.write_timeout);
    let max_message_chars = get("max_message_chars", 1, 1 << 24, defaults.max_message_chars)?;
    let max_messages = get("max_messages", 1, 1 << 16, defaults.max_messages)?;
    let max_conversation_turns = get("max_conversation_turns", 2, 1 << 30, defaults.max_conversation_turns as usize)? as i64;
    let max_preparing = get("max_preparing", 1, 4096, defaults.max_preparing)?;
    let max_prompt_tokens = get("max_prompt_tokens", 1, 1 << 20, defaults.max_prompt_tokens)?;
    let max_tokens_limit = get("max_tokens_limit", 1, 1 << 20, defaults.max_tokens_limit)?;
    let default_max_tokens = match r.pick("default_max_tokens") {
        Some(_) => get("default_max_tokens", 1, max_tokens_limit as u64, defaults.default_max_tokens)?,
        None if defaults.default_max_tokens > max_tokens_limit => max_tokens_limit,
        None => defaults.default_max_tokens,
    };
    let shutdown_grace = r.int("shutdown_grace_secs", 0, 3600)?.map(Duration::from_secs).unwrap_or(defaults.shutdown_grace);

    let model_id = match r.pick("model_id") {
        Some((raw, src)) => {
            let id = raw.single("model_id", &src)?;
            check_model_id(&id).map_err(|m| ConfigError::new("model_id", Some(src), m))?;
            id
        }
        None => default_model_id(model.as_deref()).unwrap_or(defaults.model_id),
    };

    let g = defaults.grounding.clone();
    let path = |name: &str| -> Result<Option<PathBuf>, ConfigError> { Ok(r.text(name, 4096)?.map(PathBuf::from)) };
    let grounding = GroundingConfig {
        docs_dir: path("docs_dir")?.unwrap_or(g.docs_dir),
        index_dir: path("index_dir")?.unwrap_or(g.index_dir),
        auto_index: r.bool("auto_index")?.unwrap_or(g.auto_index),
        enabled: r.bool("grounding")?.unwrap_or(g.enabled),
        passages: get("retrieve_k", 1, 32, g.passages)?,
        min_relevance: r.float("min_relevance", 0.0, 1.0)?.map(|v| v as f32).unwrap_or(g.min_relevance),
        passage_tokens: get("passage_token_budget", 64, 1 << 16, g.passage_tokens)?,
        history_tokens: get("history_token_budget", 0, 1 << 16, g.history_tokens)?,
        refusal_message: r.text("refusal_message", 2000)?.unwrap_or(g.refusal_message),
        handoff_message: r.text("handoff_message", 2000)?.unwrap_or(g.handoff_message),
        policy_file: path("policy_file")?.unwrap_or(g.policy_file),
        actions_file: path("actions_file")?.or(g.actions_file),
        answer_mode: {
            let quote = r.bool("quote_mode")?;
            match r.pick("answer_mode") {
                Some((raw, src)) => {
                    let v = raw.single("answer_mode", &src)?;
                    let m = crate::turn::Mode::parse(v.trim()).ok_or_else(|| {
                        ConfigError::new("answer_mode", Some(src.clone()), format!("expected `assembled`, `generative` or `quote` (got `{}`)", shown(&v)))
                    })?;
                    if quote == Some(true) && m != crate::turn::Mode::Quote {
                        return Err(ConfigError::new("quote_mode", Some(src), "`quote_mode = true` contradicts `answer_mode`; give only `answer_mode`"));
                    }
                    m
                }
                None if quote == Some(true) => crate::turn::Mode::Quote,
                None => g.answer_mode,
            }
        },
        allowed_modes: match r.pick("allowed_answer_modes") {
            Some((raw, src)) => {
                let items: Vec<String> = match raw {
                    Raw::List(l) => l,
                    other => other.single("allowed_answer_modes", &src)?.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect(),
                };
                let mut modes = Vec::new();
                for it in &items {
                    let m = crate::turn::Mode::parse(it).ok_or_else(|| {
                        ConfigError::new("allowed_answer_modes", Some(src.clone()), format!("`{}` is not `assembled`, `generative` or `quote`", shown(it)))
                    })?;
                    if !modes.contains(&m) {
                        modes.push(m);
                    }
                }
                if modes.is_empty() {
                    return Err(ConfigError::new("allowed_answer_modes", Some(src), "list at least one mode"));
                }
                modes
            }
            None => g.allowed_modes,
        },
    };
    if !grounding.allowed_modes.contains(&grounding.answer_mode) {
        return Err(ConfigError::new("allowed_answer_modes", None, format!("must include the default `answer_mode` ({})", grounding.answer_mode.as_str())));
    }
    let default_temperature = r.float("default_temperature", 0.0, 2.0)?.map(|v| v as f32).unwrap_or(defaults.default_temperature);
    let default_top_p = match r.float("default_top_p", 0.0, 1.0)? {
        Some(v) if v <= 0.0 => return Err(ConfigError::new("default_top_p", None, "must be in (0, 1]")),
        Some(v) => v as f32,
        None => defaults.default_top_p,
    };
    let cd = defaults.conversations.clone();
    let mut agent_key_hashes = Vec::new();
    if let Some((raw, src)) = r.pick("agent_api_key") {
        for key in raw.list("agent_api_key", &src)? {
            check_key(&key).map_err(|m| ConfigError::new("agent_api_key", Some(src.clone()), m))?;
            agent_key_hashes.push(crate::server::auth::digest(&key));
        }
    }
    if let Some((raw, src)) = r.pick("agent_api_keys_file") {
        let path = PathBuf::from(raw.single("agent_api_keys_file", &src)?);
        let hashes = read_key_digests(&path).map_err(|m| ConfigError::new("agent_api_keys_file", Some(src), m))?;
        agent_key_hashes.extend(hashes);
    }
    agent_key_hashes.sort_unstable();
    agent_key_hashes.dedup();
    let mut admin_key_hashes = Vec::new();
    if let Some((raw, src)) = r.pick("admin_api_key") {
        for key in raw.list("admin_api_key", &src)? {
            check_key(&key).map_err(|m| ConfigError::new("admin_api_key", Some(src.clone()), m))?;
            admin_key_hashes.push(crate::server::auth::digest(&key));
        }
    }
    if let Some((raw, src)) = r.pick("admin_api_keys_file") {
        let path = PathBuf::from(raw.single("admin_api_keys_file", &src)?);
        let hashes = read_key_digests(&path).map_err(|m| ConfigError::new("admin_api_keys_file", Some(src), m))?;
        admin_key_hashes.extend(hashes);
    }
    admin_key_hashes.sort_unstable();
    admin_key_hashes.dedup();
    let ad = defaults.access.clone();
    let customer_token_secret = r.text("customer_token_secret", 4096)?;
    if let Some(secret) = &customer_token_secret {
        if secret.len() < 32 {
            return Err(ConfigError::new("customer_token_secret", None, "must be at least 32 bytes (an HS256 key shorter than its hash is weak)"));
        }
    }
    let customer_token_public_key = path("customer_token_public_key")?;
    if customer_token_secret.is_some() && customer_token_public_key.is_some() {
        return Err(ConfigError::new("customer_token_public_key", None, "give `customer_token_secret` or `customer_token_public_key`, not both"));
    }
    let anonymous_chat = r.bool("anonymous_chat")?.unwrap_or(ad.anonymous_chat);
    if !anonymous_chat && customer_token_secret.is_none() && customer_token_public_key.is_none() {
        return Err(ConfigError::new(
            "anonymous_chat",
            None,
            "`anonymous_chat = false` needs customer tokens: set `customer_token_secret` or `customer_token_public_key`",
        ));
    }
    let demo_accounts: Vec<String> = match r.pick("demo_accounts") {
        Some((raw, src)) => {
            let items: Vec<String> = match raw {
                Raw::List(l) => l,
                other => other.single("demo_accounts", &src)?.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect(),
            };
            if let Some(bad) = items.iter().find(|a| a.len() > 64 || !a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')) {
                return Err(ConfigError::new("demo_accounts", Some(src), format!("`{}` is not an account id (letters, digits, - and _, at most 64)", shown(bad))));
            }
            if !items.is_empty() && customer_token_secret.is_none() {
                return Err(ConfigError::new("demo_accounts", Some(src), "demo sign-in signs tokens with `customer_token_secret`: set it too"));
            }
            items
        }
        None => Vec::new(),
    };
    let customer_token_public_key_pem = match &customer_token_public_key {
        Some(p) => Some(std::fs::read(p).map_err(|e| ConfigError::new("customer_token_public_key", None, format!("cannot read {}: {e}", p.display())))?),
        None => None,
    };
    let access = AccessConfig {
        customer_token_public_key_pem,
        admin_key_hashes,
        customer_grounding_off: r.bool("customer_grounding_off")?.unwrap_or(ad.customer_grounding_off),
        customer_structured_outputs: r.bool("customer_structured_outputs")?.unwrap_or(ad.customer_structured_outputs),
        customer_system_messages: r.bool("customer_system_messages")?.unwrap_or(ad.customer_system_messages),
        customer_answer_mode: r.bool("customer_answer_mode")?.unwrap_or(ad.customer_answer_mode),
        anonymous_chat,
        customer_token_secret,
        demo_accounts,
        customer_token_public_key,
        customer_token_issuer: r.text("customer_token_issuer", 512)?,
        customer_token_audience: r.text("customer_token_audience", 512)?,
    };
    crate::server::identity::check_config(&access).map_err(|m| ConfigError::new("customer_token_public_key", None, m))?;
    let database_url = match r.pick("database_url") {
        Some((raw, src)) => {
            let url = raw.single("database_url", &src)?;
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(ConfigError::new(
                    "database_url",
                    Some(src),
                    "expected a PostgreSQL URL (postgres://user@host:port/db); leave it out to use SQLite in data_dir",
                ));
            }
            Some(url)
        }
        None => None,
    };
    let store_sync = match r.pick("store_sync") {
        Some((raw, src)) => {
            let v = raw.single("store_sync", &src)?;
            if v != "full" && v != "normal" {
                return Err(ConfigError::new("store_sync", Some(src), format!("expected `full` or `normal` (got `{}`)", shown(&v))));
            }
            v
        }
        None => cd.store_sync.clone(),
    };
    let webhook_url = r.text("handoff_webhook_url", 2048)?;
    let webhook_secret = r.text("handoff_webhook_secret", 512)?;
    let ms = |name: &str, lo: u64, hi: u64, default: Duration| -> Result<Duration, ConfigError> {
        Ok(r.int(name, lo, hi)?.map(Duration::from_millis).unwrap_or(default))
    };
    let conversations = ConversationsConfig {
        data_dir: path("data_dir")?.unwrap_or(cd.data_dir),
        database_url,
        store_sync,
        retention_days: r.int("retention_days", 0, 36_500)?.unwrap_or(cd.retention_days),
        instance_id: match r.pick("instance_id") {
            Some((raw, src)) => {
                let v = raw.single("instance_id", &src)?;
                if !crate::store::is_valid_id(&v) {
                    return Err(ConfigError::new("instance_id", Some(src), "expected 1 to 64 characters of A-Z a-z 0-9 _ . : -"));
                }
                Some(v)
            }
            None => None,
        },
        agent_key_hashes,
        webhook_url,
        webhook_secret,
        webhook_max_attempts: r.int("webhook_max_attempts", 1, 100)?.map(|v| v as u32).unwrap_or(cd.webhook_max_attempts),
        webhook_initial_backoff: ms("webhook_initial_backoff_ms", 1, 3_600_000, cd.webhook_initial_backoff)?,
        webhook_max_backoff: ms("webhook_max_backoff_ms", 1, 86_400_000, cd.webhook_max_backoff)?,
        webhook_timeout: ms("webhook_timeout_ms", 1, 600_000, cd.webhook_timeout)?,
    };
    if conversations.webhook_url.is_some() != conversations.webhook_secret.is_some() {
        return Err(ConfigError::new(
            "handoff_webhook_secret",
            None,
            "give `handoff_webhook_url` and `handoff_webhook_secret` together (the payload is signed with the secret)",
        ));
    }
    let gl = defaults.grammar.clone();
    let grammar = GrammarLimits {
        max_bytes: get("max_grammar_bytes", 64, 16 * MIB, gl.max_bytes)?,
        max_depth: get("max_grammar_depth", 1, 256, gl.max_depth)?,
        compile_budget: r.int("grammar_compile_ms", 1, 60_000)?.map(Duration::from_millis).unwrap_or(gl.compile_budget),
        mask_budget: r.int("grammar_mask_ms", 1, 10_000)?.map(Duration::from_millis).unwrap_or(gl.mask_budget),
    };

    Ok(ServeConfig {
        grounding,
        grammar,
        conversations,
        access,
        model,
        model_id,
        host,
        port,
        threads: threads.max(1),
        api_key_hashes,
        cors_origins,
        allowed_hosts,
        queue_capacity,
        max_concurrent,
        max_body_bytes,
        max_header_bytes,
        header_read_timeout,
        max_connections,
        max_connections_per_ip,
        body_read_timeout,
        write_timeout,
        max_message_chars,
        max_messages,
        max_conversation_turns,
        max_preparing,
        max_prompt_tokens,
        max_tokens_limit,
        default_max_tokens,
        default_temperature,
        default_top_p,
        shutdown_grace,
        keep_alive: defaults.keep_alive,
        config_file,
    })
}

/// A value before it is checked: flags arrive typed, the environment as text, the file as TOML.
#[derive(Debug, Clone)]
enum Raw {
    Int(i64),
    Text(String),
    List(Vec<String>),
}

impl Raw {
    fn single(self, setting: &str, src: &Source) -> Result<String, ConfigError> {
        match self {
            Raw::Text(s) if s.starts_with('\u{0}') => {
                Err(ConfigError::new(setting, Some(src.clone()), format!("expected text, found `{}`", shown(&s))))
            }
            Raw::Text(s) => Ok(s),
            Raw::Int(i) => Ok(i.to_string()),
            Raw::List(_) => Err(ConfigError::new(setting, Some(src.clone()), "expected a single value, found a list")),
        }
    }

    /// Text from the environment is a comma-separated list.
    fn list(self, setting: &str, src: &Source) -> Result<Vec<String>, ConfigError> {
        let items: Vec<String> = match self {
            Raw::List(v) => v,
            Raw::Text(s) if *src == Source::Env => s.split(',').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect(),
            Raw::Text(s) => vec![s],
            Raw::Int(_) => return Err(ConfigError::new(setting, Some(src.clone()), "expected text or a list of text")),
        };
        if items.is_empty() {
            return Err(ConfigError::new(setting, Some(src.clone()), "the list is empty"));
        }
        if let Some(bad) = items.iter().find(|i| i.starts_with('\u{0}')) {
            return Err(ConfigError::new(setting, Some(src.clone()), format!("expected text, found `{}`", shown(bad))));
        }
        Ok(items)
    }
}

struct Resolver<'a> {
    args: &'a ServeArgs,
    env: &'a dyn Fn(&str) -> Option<String>,
    file: &'a toml::Table,
    file_path: Option<&'a Path>,
}

impl Resolver<'_> {
    fn flag(&self, name: &str) -> Option<Raw> {
        let a = self.args;
        let int = |v: Option<u64>| v.map(|v| Raw::Int(v.min(i64::MAX as u64) as i64));
        let list = |v: &Vec<String>| (!v.is_empty()).then(|| Raw::List(v.clone()));
        match name {
            "host" => a.host.clone().map(Raw::Text),
            "port" => int(a.port.map(u64::from)),
            "api_key" => list(&a.api_key),
            "api_keys_file" => a.api_keys_file.as_ref().map(|p| Raw::Text(p.to_string_lossy().into_owned())),
            "cors_origin" => list(&a.cors_origin),
            "allowed_host" => list(&a.allowed_host),
            "queue_capacity" => int(a.queue_capacity.map(|v| v as u64)),
            "max_concurrent" => int(a.max_concurrent.map(|v| v as u64)),
            "max_body_bytes" => int(a.max_body_bytes.map(|v| v as u64)),
            "max_header_bytes" => int(a.max_header_bytes.map(|v| v as u64)),
            "header_read_timeout_secs" => int(a.header_read_timeout_secs),
            "max_connections" => int(a.max_connections.map(|v| v as u64)),
            "max_connections_per_ip" => int(a.max_connections_per_ip.map(|v| v as u64)),
            "body_read_timeout_secs" => int(a.body_read_timeout_secs),
            "write_timeout_secs" => int(a.write_timeout_secs),
            "max_message_chars" => int(a.max_message_chars.map(|v| v as u64)),
            "max_messages" => int(a.max_messages.map(|v| v as u64)),
            "max_conversation_turns" => int(a.max_conversation_turns),
            "max_preparing" => int(a.max_preparing.map(|v| v as u64)),
            "max_prompt_tokens" => int(a.max_prompt_tokens.map(|v| v as u64)),
            "max_tokens_limit" => int(a.max_tokens_limit.map(|v| v as u64)),
            "default_max_tokens" => int(a.default_max_tokens.map(|v| v as u64)),
            "shutdown_grace_secs" => int(a.shutdown_grace_secs),
            "model_id" => a.model_id.clone().map(Raw::Text),
            "docs_dir" => a.docs_dir.as_ref().map(|p| Raw::Text(p.to_string_lossy().into_owned())),
            "index_dir" => a.index_dir.as_ref().map(|p| Raw::Text(p.to_string_lossy().into_owned())),
            "auto_index" => a.auto_index.map(|b| Raw::Text(b.to_string())),
            "grounding" => a.grounding.map(|b| Raw::Text(b.to_string())),
            "retrieve_k" => int(a.retrieve_k.map(|v| v as u64)),
            "min_relevance" => a.min_relevance.map(|v| Raw::Text(v.to_string())),
            "passage_token_budget" => int(a.passage_token_budget.map(|v| v as u64)),
            "history_token_budget" => int(a.history_token_budget.map(|v| v as u64)),
            "refusal_message" => a.refusal_message.clone().map(Raw::Text),
            "handoff_message" => a.handoff_message.clone().map(Raw::Text),
            "policy_file" => a.policy_file.as_ref().map(|p| Raw::Text(p.to_string_lossy().into_owned())),
            "actions_file" => a.actions_file.as_ref().map(|p| Raw::Text(p.to_string_lossy().into_owned())),
            "quote_mode" => a.quote_mode.map(|b| Raw::Text(b.to_string())),
            "answer_mode" => a.answer_mode.clone().map(Raw::Text),
            "allowed_answer_modes" => a.allowed_answer_modes.clone().map(Raw::Text),
            "default_temperature" => a.default_temperature.map(|v| Raw::Text(v.to_string())),
            "default_top_p" => a.default_top_p.map(|v| Raw::Text(v.to_string())),
            "max_grammar_bytes" => int(a.max_grammar_bytes.map(|v| v as u64)),
            "max_grammar_depth" => int(a.max_grammar_depth.map(|v| v as u64)),
            "grammar_compile_ms" => int(a.grammar_compile_ms),
            "grammar_mask_ms" => int(a.grammar_mask_ms),
            "data_dir" => a.data_dir.as_ref().map(|p| Raw::Text(p.to_string_lossy().into_owned())),
            "database_url" => a.database_url.clone().map(Raw::Text),
            "store_sync" => a.store_sync.clone().map(Raw::Text),
            "retention_days" => int(a.retention_days),
            "instance_id" => a.instance_id.clone().map(Raw::Text),
            "agent_api_key" => list(&a.agent_api_key),
            "agent_api_keys_file" => a.agent_api_keys_file.as_ref().map(|p| Raw::Text(p.to_string_lossy().into_owned())),
            "admin_api_key" => list(&a.admin_api_key),
            "admin_api_keys_file" => a.admin_api_keys_file.as_ref().map(|p| Raw::Text(p.to_string_lossy().into_owned())),
            "customer_grounding_off" => a.customer_grounding_off.map(|b| Raw::Text(b.to_string())),
            "customer_structured_outputs" => a.customer_structured_outputs.map(|b| Raw::Text(b.to_string())),
            "customer_system_messages" => a.customer_system_messages.map(|b| Raw::Text(b.to_string())),
            "customer_answer_mode" => a.customer_answer_mode.map(|b| Raw::Text(b.to_string())),
            "anonymous_chat" => a.anonymous_chat.map(|b| Raw::Text(b.to_string())),
            "customer_token_secret" => a.customer_token_secret.clone().map(Raw::Text),
            "demo_accounts" => a.demo_accounts.clone().map(Raw::Text),
            "customer_token_public_key" => a.customer_token_public_key.as_ref().map(|p| Raw::Text(p.to_string_lossy().into_owned())),
            "customer_token_issuer" => a.customer_token_issuer.clone().map(Raw::Text),
            "customer_token_audience" => a.customer_token_audience.clone().map(Raw::Text),
            "handoff_webhook_url" => a.handoff_webhook_url.clone().map(Raw::Text),
            "handoff_webhook_secret" => a.handoff_webhook_secret.clone().map(Raw::Text),
            "webhook_max_attempts" => int(a.webhook_max_attempts),
            "webhook_initial_backoff_ms" => int(a.webhook_initial_backoff_ms),
            "webhook_max_backoff_ms" => int(a.webhook_max_backoff_ms),
            "webhook_timeout_ms" => int(a.webhook_timeout_ms),
            _ => None,
        }
    }

    /// The value of a setting and its source, by precedence.
    fn pick(&self, name: &str) -> Option<(Raw, Source)> {
        if let Some(raw) = self.flag(name) {
            return Some((raw, Source::Flag));
        }
        if let Some(text) = (self.env)(&env_name(name)) {
            return Some((Raw::Text(text.trim().to_string()), Source::Env));
        }
        let value = self.file.get(name)?;
        let src = Source::File(self.file_path.unwrap_or(Path::new("")).to_path_buf());
        let raw = match value {
            toml::Value::Integer(i) => Raw::Int(*i),
            toml::Value::String(s) => Raw::Text(s.clone()),
            toml::Value::Float(f) => Raw::Text(f.to_string()),
            toml::Value::Boolean(b) => Raw::Text(b.to_string()),
            toml::Value::Array(items) => Raw::List(
                items.iter().map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| format!("\u{0}{v}"))).collect(),
            ),
            other => Raw::Text(format!("\u{0}{other}")),
        };
        Some((raw, src))
    }

    /// `true` or `false`, or `None` when the setting is not given.
    fn bool(&self, name: &str) -> Result<Option<bool>, ConfigError> {
        let Some((raw, src)) = self.pick(name) else { return Ok(None) };
        let text = raw.single(name, &src)?;
        match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(Some(true)),
            "false" | "0" | "no" | "off" => Ok(Some(false)),
            _ => Err(ConfigError::new(name, Some(src), format!("`{}` is not true or false", shown(&text)))),
        }
    }

    /// A finite number in `lo..=hi`, or `None` when the setting is not given.
    fn float(&self, name: &str, lo: f64, hi: f64) -> Result<Option<f64>, ConfigError> {
        let Some((raw, src)) = self.pick(name) else { return Ok(None) };
        let text = raw.single(name, &src)?;
        let err = |m: String| ConfigError::new(name, Some(src.clone()), m);
        let v: f64 = text.trim().parse().map_err(|_| err(format!("`{}` is not a number; allowed {lo}..={hi}", shown(&text))))?;
        if !(v.is_finite() && (lo..=hi).contains(&v)) {
            return Err(err(format!("{v} is out of range; allowed {lo}..={hi}")));
        }
        Ok(Some(v))
    }

    /// Text of 1 to `max` characters, or `None` when the setting is not given.
    fn text(&self, name: &str, max: usize) -> Result<Option<String>, ConfigError> {
        let Some((raw, src)) = self.pick(name) else { return Ok(None) };
        let text = raw.single(name, &src)?;
        let n = text.trim().chars().count();
        if n == 0 || n > max {
            return Err(ConfigError::new(name, Some(src), format!("must have 1 to {max} characters (has {n})")));
        }
        Ok(Some(text.trim().to_string()))
    }

    /// A whole number in `lo..=hi`, or `None` when the setting is not given.
    fn int(&self, name: &str, lo: u64, hi: u64) -> Result<Option<u64>, ConfigError> {
        let Some((raw, src)) = self.pick(name) else { return Ok(None) };
        let err = |m: String| ConfigError::new(name, Some(src.clone()), m);
        let value: i128 = match &raw {
            Raw::Int(i) => *i as i128,
            Raw::Text(t) => {
                let shown = t.trim_start_matches('\u{0}');
                t.trim().parse::<i128>().map_err(|_| err(format!("`{shown}` is not a whole number; allowed {lo}..={hi}")))?
            }
            Raw::List(_) => return Err(err(format!("expected a whole number in {lo}..={hi}, found a list"))),
        };
        if value < lo as i128 || value > hi as i128 {
            return Err(err(format!("{value} is out of range; allowed {lo}..={hi}")));
        }
        Ok(Some(value as u64))
    }
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let src = Some(Source::File(path.to_path_buf()));
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("config", src.clone(), format!("cannot read the file: {e}")))?;
    let table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| ConfigError::new("config", src.clone(), format!("not valid TOML: {e}")))?;
    for key in table.keys() {
        if !SETTINGS.contains(&key.as_str()) {
            return Err(ConfigError::new(
                key,
                src.clone(),
                format!("unknown setting `{key}`; known settings: {}", SETTINGS.join(", ")),
            ));
        }
    }
    Ok(table)
}

fn parse_host(text: &str) -> Result<IpAddr, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::from([127, 0, 0, 1]));
    }
    let t = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(t);
    t.parse::<IpAddr>()
        .map_err(|_| format!("`{}` is not an IP address (e.g. 127.0.0.1, 0.0.0.0, ::1) or `localhost`", shown(text)))
}

/// The text of a value for an error message: a non-text TOML value (marked with a leading NUL) shows as TOML.
fn shown(text: &str) -> String {
    let t = text.trim_start_matches('\u{0}');
    if t.chars().count() > 80 {
        format!("{}…", t.chars().take(80).collect::<String>())
    } else {
        t.to_string()
    }
}

fn check_key(key: &str) -> Result<(), String> {
    let n = key.chars().count();
    if !(16..=512).contains(&n) {
        return Err(format!("an API key must have 16 to 512 characters (this one has {n})"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("an API key may hold only visible ASCII characters (no spaces)".into());
    }
    Ok(())
}

/// Reads a keys file: one sha256 hex digest per line; blank lines and `#` comments are skipped.
pub fn read_key_digests(path: &Path) -> Result<Vec<[u8; 32]>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        // `sha256sum` prints "DIGEST  -"; accept its output as is.
        let digest = line.split_whitespace().next().unwrap_or("");
        let parsed = parse_hex32(digest).ok_or_else(|| {
            format!("{} line {}: expected a sha256 hex digest (64 hex digits; make one with `printf %s KEY | sha256sum`)", path.display(), i + 1)
        })?;
        out.push(parsed);
    }
    if out.is_empty() {
        return Err(format!("{} holds no key digests", path.display()));
    }
    Ok(out)
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Checks a CORS origin (`http(s)://host[:port]`, nothing else) and returns it in lower case.
pub fn parse_origin(text: &str) -> Result<String, String> {
    let t = text.trim();
    if t == "*" {
        return Err("`*` (any origin) is not allowed; list each origin, e.g. https://support.example.com".into());
    }
    let bad = || format!("`{}` is not an origin of the form http(s)://host[:port] (no path, no trailing slash)", shown(t));
    let lower = t.to_ascii_lowercase();
    let rest = lower.strip_prefix("https://").or_else(|| lower.strip_prefix("http://")).ok_or_else(bad)?;
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let end = v6.find(']').ok_or_else(bad)?;
        v6[..end].parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        (&rest[..end + 2], &v6[end + 1..])
    } else {
        match rest.find(':') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        }
    };
    let host_ok = host.starts_with('[')
        || (!host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            }));
    if !host_ok {
        return Err(bad());
    }
    if !port.is_empty() {
        let digits = port.strip_prefix(':').ok_or_else(bad)?;
        match digits.parse::<u16>() {
            Ok(p) if p > 0 && !digits.starts_with('0') => {}
            _ => return Err(bad()),
        }
    }
    Ok(lower)
}

fn check_model_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(format!("`{}` is not a model id: use 1 to 128 of A-Z a-z 0-9 . _ - : /", shown(id)))
    }
}

/// The id of a model given by `--model`: its file name without `.gguf`.
fn default_model_id(model: Option<&str>) -> Option<String> {
    let m = model?;
    let name = m.rsplit(['/', '\\']).next().unwrap_or(m);
    let stem = name.strip_suffix(".gguf").unwrap_or(name);
    check_model_id(stem).ok().map(|_| stem.to_string())
}
