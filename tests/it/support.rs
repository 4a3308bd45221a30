//! Shared helpers for the integration tests: model paths, reference data.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use helpline::model::Model;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn smollm2_path() -> PathBuf {
    root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn gemma3_path() -> PathBuf {
    root().join("models/gemma-3-270m-Q4_K_M.gguf")
}

/// The default model, loaded once per test binary (weights are shared; every test makes its own caches).
pub fn smollm2() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load(&smollm2_path(), &candle_core::Device::Cpu).expect("default model present: run `helpline models pull`"))
}

pub fn gemma3() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load(&gemma3_path(), &candle_core::Device::Cpu).expect("gemma3 test model present: run `helpline models pull`"))
}

#[derive(serde::Deserialize)]
pub struct GreedyCase {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_text: String,
}

pub fn greedy_cases(name: &str) -> Vec<GreedyCase> {
    let text = std::fs::read_to_string(root().join(format!("tests/reference/{name}.greedy.jsonl"))).unwrap();
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The default model with tokenizer and template, loaded once per test binary.
pub fn smollm2_bundle() -> &'static helpline::engine::ModelBundle {
    static B: OnceLock<helpline::engine::ModelBundle> = OnceLock::new();
    B.get_or_init(|| helpline::engine::ModelBundle::load(&smollm2_path(), &candle_core::Device::Cpu).expect("default model present"))
}

/// The helpline binary built for this test run.
pub fn helpline_bin() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_helpline"));
    cmd.current_dir(root()).env("HELPLINE_MODELS_DIR", root().join("models")).env_remove("HELPLINE_MODEL");
    cmd
}

/// The sentence-embedding model (all-MiniLM-L6-v2 from the models directory), loaded once per test
/// binary; its cache of embedded texts makes rebuilding indexes of the same docs cheap.
pub fn embedder() -> std::sync::Arc<helpline::embed::Embedder> {
    static E: OnceLock<std::sync::Arc<helpline::embed::Embedder>> = OnceLock::new();
    E.get_or_init(|| {
        let spec = helpline::model::fetch::EMBEDDING_MODEL;
        let dir = root().join("models").join(spec.dir_name);
        let e = helpline::embed::Embedder::load(&dir, spec.embed_files()).expect("embedding model present: run `helpline models pull`");
        std::sync::Arc::new(e.with_disk_cache(&dir.join(helpline::embed::CACHE_FILE)))
    })
    .clone()
}

/// Index options for `docs` into `index` with the test embedder.
pub fn index_options(docs: &std::path::Path, index: &std::path::Path) -> helpline::retrieval::IndexOptions {
    helpline::retrieval::IndexOptions { docs_dir: docs.to_path_buf(), index_dir: index.to_path_buf(), embedder: embedder() }
}

/// Opens an index with the test embedder.
pub fn open_kb(index: &std::path::Path) -> Result<helpline::retrieval::KnowledgeBase, helpline::retrieval::RetrievalError> {
    helpline::retrieval::KnowledgeBase::open(index, embedder())
}

/// The real default knowledge base: `docs-corpus/` indexed once per test binary into a temporary
/// directory (the same code path as `helpline index`). Returns the index directory and an open base.
pub fn knowledge() -> &'static (tempfile::TempDir, helpline::retrieval::KnowledgeBase) {
    static K: OnceLock<(tempfile::TempDir, helpline::retrieval::KnowledgeBase)> = OnceLock::new();
    K.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let opts = index_options(&root().join("docs-corpus"), dir.path());
        let report = helpline::retrieval::build_index(&opts).expect("docs-corpus indexes");
        assert_eq!(report.skipped(), 0, "every docs-corpus file indexes:\n{report}");
        let kb = open_kb(dir.path()).expect("index opens");
        (dir, kb)
    })
}

/// The shipped policy pack (`docs-corpus/policy.toml`), validated and compiled.
pub fn policy() -> helpline::guard::ActivePolicy {
    helpline::guard::ActivePolicy::load(&root().join("docs-corpus/policy.toml")).expect("the shipped policy pack is valid")
}

/// The output-constraint compiler for the default model's tokenizer, built once per test binary.
pub fn guard_compiler() -> std::sync::Arc<helpline::guard::grammar::GuardCompiler> {
    static G: OnceLock<std::sync::Arc<helpline::guard::grammar::GuardCompiler>> = OnceLock::new();
    G.get_or_init(|| std::sync::Arc::new(helpline::guard::grammar::GuardCompiler::new(&smollm2_bundle().tokenizer).expect("guard compiler")))
        .clone()
}
