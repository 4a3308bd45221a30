//! Helpline: a self-hosted support assistant.
//!
//! Layering (inner modules never import outer ones):
//! `model`, `tokenizer` -> know nothing of `engine` or `cli`;
//! `sampler` -> pure logits processing; `engine` -> owns the model on one thread;
//! `cli` -> the only place that knows everything.

pub mod model;
pub mod embed;
pub mod prompt;
pub mod tokenizer;
pub mod guard;
pub mod retrieval;
pub mod sampler;
pub mod engine;
pub mod turn;
pub mod bench;
pub mod bench_serve;
pub mod answer_eval;
pub mod actions_eval;
pub mod cli;
pub mod config;
pub mod server;
pub mod webhook;
pub mod httpc;
pub mod actions;
pub mod store;
