//! One integration-test binary; one module per area.
mod support;
mod gguf_malformed;
mod tokenizer;
mod models;
mod generation;
mod engine;
mod cli;
mod fetch;
