//! `helpline serve` configuration: flags, environment variables and an optional TOML file resolve
//! into one validated [`ServeConfig`]. Precedence: flag > environment > file > default.

use std::net::IpAddr;
use std::path::PathBuf;
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
    /// Requests waiting for a decoding slot before 429.
    pub queue_capacity: usize,
    /// Sequences decoded concurrently.
    pub max_concurrent: usize,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    /// Most prompt tokens accepted (besides the model's context).
    pub max_prompt_tokens: usize,
    /// Most tokens a request may ask to generate (`max_tokens`).
    pub max_tokens_limit: usize,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: usize,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Duration,
    /// Interval of SSE keep-alive comments.
    pub keep_alive: Duration,
    pub config_file: Option<PathBuf>,
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
            queue_capacity: 64,
            max_concurrent: 4,
            max_body_bytes: 1 << 20,
            max_header_bytes: 16 << 10,
            header_read_timeout: Duration::from_secs(10),
            max_prompt_tokens: 8192,
            max_tokens_limit: 4096,
            default_max_tokens: 512,
            shutdown_grace: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            config_file: None,
        }
    }
}

/// `helpline serve` flags (the loader turns them, the environment and the TOML file into a [`ServeConfig`]).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// Address to bind (default 127.0.0.1; another address must be asked for).
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long)]
    pub port: Option<u16>,
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
}
