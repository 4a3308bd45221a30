//! Property tests: the GGUF reader, request validation, the grammar compiler and the chat
//! template never panic, and keep their bounds, on inputs generated at random. The number of cases
//! is small here (CI); `scripts/fuzz.sh` runs the same properties longer
//! (`HELPLINE_PROPTEST_CASES`).

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

use helpline::config::ServeConfig;
use helpline::model::gguf::GgufFile;
use helpline::server::auth::{Caller, Scope};
use helpline::tokenizer::ChatMessage;

use crate::support;

fn cases(default: u32) -> u32 {
    std::env::var("HELPLINE_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn runner(default: u32) -> TestRunner {
    TestRunner::new(Config { cases: cases(default), failure_persistence: None, ..Config::default() })
}

/// A small valid GGUF file (header, a few metadata kinds including arrays, one tensor).
fn valid_gguf() -> Vec<u8> {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, t: &str| {
        b.extend_from_slice(&(t.len() as u64).to_le_bytes());
        b.extend_from_slice(t.as_bytes());
    };
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    b.extend_from_slice(&3u64.to_le_bytes()); // metadata
    s(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "tokenizer.ggml.tokens");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&3u64.to_le_bytes());
    for t in ["a", "b", "<s>"] {
        s(&mut b, t);
    }
    s(&mut b, "tokenizer.ggml.token_type");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // u8 elements
    b.extend_from_slice(&3u64.to_le_bytes());
    b.extend_from_slice(&[1, 1, 3]);
    s(&mut b, "w");
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&4u64.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // F32
    b.extend_from_slice(&0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend_from_slice(&[0u8; 16]);
    b
}

/// Mutated GGUF files (bytes overwritten, truncated, counts made huge) are read or refused with an
/// error, never a panic, and quickly (no allocation follows a count before it is checked).
#[test]
fn gguf_reader_survives_mutated_files() {
    let base = valid_gguf();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, &base).unwrap();
    GgufFile::open(&path).expect("the base file is valid");
    let len = base.len();
    let edit = (proptest::collection::vec((0..len, any::<u8>()), 0..8), 0..=len, any::<bool>(), 0..len / 8);
    runner(256)
        .run(&edit, |(writes, cut, widen, at)| {
            let mut f = base.clone();
            for (i, v) in writes {
                f[i] = v;
            }
            if widen {
                // A count or length field made enormous.
                let i = (at * 8).min(len - 8);
                f[i..i + 8].copy_from_slice(&u64::MAX.wrapping_sub(at as u64).to_le_bytes());
            }
            f.truncate(cut.max(4));
            std::fs::write(&path, &f).unwrap();
            let start = Instant::now();
            let _ = GgufFile::open(&path);
            prop_assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
            Ok(())
        })
        .unwrap();
}

/// Random JSON values.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        "[a-z<>|_ \\[\\]{}()*+?.^$\\\\]{0,24}".prop_map(Value::from),
        prop_oneof![Just("user"), Just("assistant"), Just("system"), Just("tool"), Just("developer")].prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-z_]{1,10}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Chat requests: a valid one with random fields replaced by random values. Validation answers
/// each with a valid request or an error of the error table below 500, for a customer and for an
/// agent, and never panics.
#[test]
fn request_validation_never_fails_open_or_panics() {
    let cfg = ServeConfig::default();
    let loaded = crate::server_support::default_model(&cfg);
    const FIELDS: &[&str] = &[
        "model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stream", "stop", "seed", "n",
        "presence_penalty", "frequency_penalty", "response_format", "stream_options", "user",
    ];
    const EXT: &[&str] = &["grounding", "answer_mode", "quote", "grammar", "customer", "conversation_id", "filters", "top_k", "min_p"];
    let edit = (
        proptest::collection::vec((0..FIELDS.len(), json_value()), 0..4),
        proptest::collection::vec((0..EXT.len(), json_value()), 0..3),
        any::<bool>(),
    );
    runner(192)
        .run(&edit, |(top, ext, agent)| {
            let mut body = json!({"messages": [{"role": "user", "content": "How do I reset my password?"}], "max_tokens": 8, "helpline": {}});
            for (i, v) in top {
                body[FIELDS[i]] = v;
            }
            for (i, v) in ext {
                body["helpline"][EXT[i]] = v;
            }
            let Ok(req) = serde_json::from_value::<helpline::server::dto::ChatCompletionRequest>(body) else {
                return Ok(()); // a 400/422 from the JSON extractor
            };
            let caller = Caller { key: agent.then_some(Scope::Agent) };
            if let Err(e) = helpline::server::validate::chat(&req, &cfg, &loaded, &caller) {
                prop_assert!(e.status.as_u16() < 500, "{e:?}");
                prop_assert!(!e.message.is_empty());
            }
            Ok(())
        })
        .unwrap();
}

/// Random regexes and Lark grammars compile or are refused with an error, within a bounded
/// time, and never panic.
#[test]
fn grammar_compiler_is_bounded_on_random_grammars() {
    let compiler = support::guard_compiler();
    use helpline::guard::grammar::Constraint;
    let regex = "[a-z0-9()|*+?\\[\\]{},.\\\\^$&~ -]{0,40}".prop_map(Constraint::Regex);
    let lark = "(start: |start: \"[a-z]{0,6}\" |start: /[a-z()|*+?]{0,12}/ |x: start |%import )[a-z \"/|()*+?:]{0,30}".prop_map(Constraint::Lark);
    runner(96)
        .run(&prop_oneof![regex, lark], |c| {
            let start = Instant::now();
            let _ = compiler.compile(&c);
            // The budget is 500 ms; allow for a loaded machine, but not for unbounded work.
            prop_assert!(start.elapsed() < Duration::from_secs(20), "{c:?} took {:?}", start.elapsed());
            Ok(())
        })
        .unwrap();
}

/// The chat template over random conversations (roles, contents full of markers and template
/// syntax) renders without panicking, and only the template's own turn markers become special
/// tokens: one `<|im_start|>` per message plus the assistant's, whatever the contents hold.
#[test]
fn template_renders_contents_as_text() {
    let bundle = support::smollm2_bundle();
    let im_start = bundle.tokenizer.token_id("<|im_start|>").unwrap();
    let content = "(<\\|im_start\\|>|<\\|im_end\\|>|\\{\\{|\\}\\}|\\{%|%\\}|system|user|\n|[a-z ]){0,12}";
    let msgs = proptest::collection::vec((prop_oneof![Just("user"), Just("assistant"), Just("system")], content), 1..5);
    runner(128)
        .run(&msgs, |msgs| {
            let messages: Vec<ChatMessage> = msgs.iter().map(|(r, c)| ChatMessage::new(*r, c.clone())).collect();
            match bundle.chat_prompt(&messages) {
                Ok(ids) => {
                    let starts = ids.iter().filter(|&&t| t == im_start).count();
                    // The same conversation with plain contents has the template's markers only.
                    let plain: Vec<ChatMessage> = msgs.iter().map(|(r, _)| ChatMessage::new(*r, "x")).collect();
                    let expected = bundle.chat_prompt(&plain).unwrap().iter().filter(|&&t| t == im_start).count();
                    prop_assert_eq!(starts, expected, "turn markers for {:?}", msgs);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            Ok(())
        })
        .unwrap();
}
