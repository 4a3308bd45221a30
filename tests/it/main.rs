//! One integration-test binary; one module per area.
mod support;
mod gguf_malformed;
mod tokenizer;
mod models;
mod generation;
mod engine;
mod cli;
mod fetch;
mod bench_serve;
mod server_ops;
mod server_support;
mod server_api;
mod kernels;
mod grounding;
mod webdriver;
mod web_chat;
mod retrieval;
