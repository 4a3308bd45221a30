//! Tokenizer built from GGUF metadata, streaming detokenizer, chat template.
//!
//! Token ids are checked against llama.cpp's output for the two bundled models
//! (tests/reference/*.jsonl).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::gguf_file::{Content, Value};
use helpline::tokenizer::{
    ChatMessage, ChatTemplate, StopFilter, StreamDecoder, TokenType, Tokenizer, TokenizerError,
};

const SMOLLM: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GEMMA: &str = "gemma-3-270m-Q4_K_M.gguf";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Loaded {
    md: HashMap<String, Value>,
    tok: Arc<Tokenizer>,
}

fn load(file: &str) -> Loaded {
    let path = root().join("models").join(file);
    let mut f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let md = Content::read(&mut f).unwrap_or_else(|e| panic!("read {}: {e}", path.display())).metadata;
    let tok = Tokenizer::for_model(&path, &md).unwrap_or_else(|e| panic!("tokenizer for {file}: {e}"));
    Loaded { md, tok: Arc::new(tok) }
}

fn smollm() -> &'static Loaded {
    static M: OnceLock<Loaded> = OnceLock::new();
    M.get_or_init(|| load(SMOLLM))
}

fn gemma() -> &'static Loaded {
    static M: OnceLock<Loaded> = OnceLock::new();
    M.get_or_init(|| load(GEMMA))
}

fn reference(name: &str) -> Vec<serde_json::Value> {
    let path = root().join("tests/reference").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn messages_of(v: &serde_json::Value) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Encodes every reference string (no BOS, special text as plain text) and lists mismatches.
fn check_reference_tokenization(tok: &Tokenizer, file: &str) {
    let cases = reference(file);
    assert_eq!(cases.len(), 30, "{file}: expected 30 reference lines");
    let mut failures = Vec::new();
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        let want = ids_of(&case["ids"]);
        let got = tok.encode(text, false).unwrap();
        if got != want {
            failures.push(format!("  {text:?}\n    want {want:?}\n    got  {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{file}: {} of {} strings differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn smollm_matches_llama_cpp_reference_ids() {
    check_reference_tokenization(&smollm().tok, "smollm2-public.tokenize.jsonl");
}

#[test]
fn gemma_matches_llama_cpp_reference_ids() {
    check_reference_tokenization(&gemma().tok, "gemma3-public.tokenize.jsonl");
}

#[test]
fn decode_of_encode_round_trips_reference_strings() {
    for (tok, file) in [(&smollm().tok, "smollm2-public.tokenize.jsonl"), (&gemma().tok, "gemma3-public.tokenize.jsonl")] {
        for case in reference(file) {
            let text = case["text"].as_str().unwrap();
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids, false), text, "{file}: round trip");
            // The reference ids decode to the same text too.
            assert_eq!(tok.decode(&ids_of(&case["ids"]), true), text, "{file}: reference ids decode");
        }
    }
}

#[test]
fn vocabulary_facts_come_from_metadata() {
    let s = &smollm().tok;
    assert_eq!(s.vocab_size(), 49152);
    assert_eq!((s.bos_id(), s.eos_id(), s.add_bos()), (Some(1), Some(2), false));
    assert_eq!(s.token_id("<|im_start|>"), Some(1));
    assert!(s.is_special(1) && !s.is_special(4093));
    assert_eq!(s.token_bytes(2), b"<|im_end|>");
    assert_eq!(s.token_bytes(198), b"\n"); // "Ċ"

    let g = &gemma().tok;
    assert_eq!(g.vocab_size(), 262144);
    assert_eq!((g.bos_id(), g.eos_id(), g.add_bos()), (Some(2), Some(1), true));
    assert_eq!(g.token_type(238), Some(TokenType::Byte));
    assert_eq!(g.token_bytes(238 + 0xAB), &[0xAB]); // <0xAB>
    assert_eq!(g.token_type(107), Some(TokenType::UserDefined));
    assert!(g.is_special(107)); // "\n" is user-defined
    let space_word = g.token_id("\u{2581}password").expect("▁password in vocab");
    assert_eq!(g.token_bytes(space_word), b" password");
    assert_eq!(g.token_bytes(u32::MAX), b"");
}

#[test]
fn parse_special_controls_special_token_matching() {
    let s = &smollm().tok;
    let plain = s.encode("<|im_start|>user", false).unwrap();
    assert!(!plain.contains(&1), "{plain:?}");
    assert_eq!(s.decode(&plain, false), "<|im_start|>user");
    let parsed = s.encode("<|im_start|>user", true).unwrap();
    assert_eq!(parsed[0], 1);
    assert_eq!(s.decode(&parsed, true), "user");

    let g = &gemma().tok;
    assert_eq!(g.encode("<start_of_turn>", true).unwrap(), vec![105]);
    assert_ne!(g.encode("<start_of_turn>", false).unwrap(), vec![105]);
}

#[test]
fn smollm_chat_prompts_match_llama_cpp() {
    let Loaded { md, tok } = smollm();
    let template = ChatTemplate::from_metadata(md).unwrap();
    assert!(!template.is_fallback());
    let cases = reference("smollm2-public.greedy.jsonl");
    assert_eq!(cases.len(), 10);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let rendered = template.render(&messages_of(&case["messages"]), true, "<|im_start|>", "<|im_end|>").unwrap();
        assert_eq!(rendered, prompt);
        let mut ids: Vec<u32> = tok.bos_id().filter(|_| tok.add_bos()).into_iter().collect();
        ids.extend(tok.encode(&rendered, true).unwrap());
        assert_eq!(ids, ids_of(&case["prompt_ids"]), "prompt {prompt:?}");
    }
}

#[test]
fn gemma_plain_chatml_prompts_match_llama_cpp() {
    let tok = &gemma().tok;
    let cases = reference("gemma3-public.greedy.jsonl");
    assert_eq!(cases.len(), 10);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let mut ids = vec![tok.bos_id().unwrap()];
        ids.extend(tok.encode(prompt, true).unwrap());
        assert_eq!(ids, ids_of(&case["prompt_ids"]), "prompt {prompt:?}");
    }
}

#[test]
fn chatml_fallback_when_metadata_has_no_template() {
    let template = ChatTemplate::from_metadata(&HashMap::new()).unwrap();
    assert!(template.is_fallback());
    let msgs = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")];
    assert_eq!(
        template.render(&msgs, true, "", "").unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        template.render(&msgs[1..], false, "", "").unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n"
    );
    // Gemma's GGUF carries no template.
    assert!(ChatTemplate::from_metadata(&gemma().md).unwrap().is_fallback());

    let mut md = HashMap::new();
    md.insert("tokenizer.chat_template".to_string(), Value::U32(3));
    let err = ChatTemplate::from_metadata(&md).unwrap_err().to_string();
    assert!(err.contains("tokenizer.chat_template"), "{err}");
}

#[test]
fn end_of_turn_ids_come_from_the_template() {
    let Loaded { md, tok } = smollm();
    let template = ChatTemplate::from_metadata(md).unwrap();
    assert_eq!(template.end_of_turn_ids(tok), vec![2]);
    let mut t = (**tok).clone();
    t.add_eog_ids(&template.end_of_turn_ids(tok));
    assert_eq!(t.eog_ids(), &[2]);

    // ChatML text is not special in Gemma's vocabulary, so nothing is found.
    let g = &gemma().tok;
    let fallback = ChatTemplate::from_metadata(&gemma().md).unwrap();
    assert_eq!(fallback.end_of_turn_ids(g), Vec::<u32>::new());
    assert_eq!(g.eog_ids(), &[1]);
    // A Gemma-style template yields <end_of_turn>, not the user-defined "\n" after it.
    let gemma_style = ChatTemplate::from_source(
        "{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}",
    )
    .unwrap();
    assert_eq!(gemma_style.end_of_turn_ids(g), vec![106]);
}

#[test]
fn template_errors_are_reported_not_truncated() {
    let msgs = [ChatMessage::new("user", "hi")];

    let err = ChatTemplate::from_source("{% for m in messages %}unterminated").unwrap_err();
    assert!(matches!(err, TokenizerError::TemplateCompile(_)), "{err}");

    // Endless work: runs out of fuel.
    let spin = ChatTemplate::from_source(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    )
    .unwrap();
    let err = spin.render(&msgs, true, "", "").unwrap_err();
    assert!(matches!(err, TokenizerError::TemplateLimit(_)), "{err}");

    // Unbounded recursion.
    let recurse = ChatTemplate::from_source("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}").unwrap();
    assert!(recurse.render(&msgs, true, "", "").is_err());

    // Too much output (cheap in fuel, large in bytes): an error, not a truncated prompt.
    let big = ChatTemplate::from_source("{{ 'x' * 2000000 }}").unwrap();
    let err = big.render(&msgs, true, "", "").unwrap_err();
    assert!(matches!(err, TokenizerError::TemplateLimit(_)), "{err}");
    let small = ChatTemplate::from_source("{% for i in range(100) %}0123456789{% endfor %}").unwrap().with_limits(100_000, 999);
    assert!(matches!(small.render(&msgs, true, "", ""), Err(TokenizerError::TemplateLimit(_))));

    // No loader: include/import/extends cannot reach files.
    for src in ["{% include 'secrets.txt' %}", "{% import 'macros.j2' as m %}", "{% extends 'base.html' %}"] {
        let t = ChatTemplate::from_source(src).unwrap();
        assert!(t.render(&msgs, true, "", "").is_err(), "{src} rendered");
    }

    let raising = ChatTemplate::from_source("{{ raise_exception('Conversation roles must alternate') }}").unwrap();
    let err = raising.render(&msgs, true, "", "").unwrap_err().to_string();
    assert!(err.contains("Conversation roles must alternate"), "{err}");
}

#[test]
fn template_globals_are_provided() {
    let t = ChatTemplate::from_source(
        "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ strftime_now('%Y') | length }}|{{ messages[0].content.split(',') | join('+') }}",
    )
    .unwrap();
    let out = t.render(&[ChatMessage::new("user", "a,b")], true, "<s>", "</s>").unwrap();
    assert_eq!(out, "<s>|</s>|True|4|a+b");
}

#[test]
fn stream_decoder_never_emits_partial_characters() {
    // 𓀀 and ꙮ are not in Gemma's vocabulary, so they become byte-fallback tokens there.
    let text = "Prix: 12 € — 日本語 🙂 👨\u{200d}👩\u{200d}👧 𓀀 ꙮ ok";
    for tok in [&smollm().tok, &gemma().tok] {
        let ids = tok.encode(text, false).unwrap();
        // The test only means something if some token ends inside a character.
        assert!(
            ids.iter().any(|&id| std::str::from_utf8(tok.token_bytes(id)).is_err()),
            "no token splits a character: {ids:?}"
        );
        let mut dec = StreamDecoder::new(tok.clone(), false);
        let mut out = String::new();
        for &id in &ids {
            let piece = dec.push(id);
            assert!(!piece.contains('\u{FFFD}'), "partial character emitted after {id}");
            out.push_str(&piece);
        }
        out.push_str(&dec.finish());
        assert_eq!(out, text);
    }
}

#[test]
fn stream_decoder_skips_control_tokens_and_flushes_invalid_tails() {
    let tok = &smollm().tok;
    let mut dec = StreamDecoder::new(tok.clone(), true);
    let mut out = String::new();
    for id in tok.encode("<|im_start|>hi<|im_end|>", true).unwrap() {
        out.push_str(&dec.push(id));
    }
    assert_eq!(out, "hi");
    // Feed a token that ends inside a character, then finish: the stray bytes become U+FFFD.
    let ids = tok.encode("日本語", false).unwrap();
    let cut = ids.iter().position(|&id| std::str::from_utf8(tok.token_bytes(id)).is_err()).expect("a split character");
    let mut dec = StreamDecoder::new(tok.clone(), false);
    let before: String = ids[..=cut].iter().map(|&id| dec.push(id)).collect();
    assert!(!before.contains('\u{FFFD}'));
    assert!(dec.finish().ends_with('\u{FFFD}'));
}

#[test]
fn stop_filter_on_streamed_tokens_never_leaks_the_stop_string() {
    let tok = &smollm().tok;
    let text = "Sure thing. END_OF_ANSWER and more";
    let ids = tok.encode(text, false).unwrap();
    let mut dec = StreamDecoder::new(tok.clone(), false);
    let mut stops = StopFilter::new(vec!["END_OF_ANSWER".into()]);
    let mut emitted = String::new();
    let mut stopped = false;
    let mut pushes = 0;
    for &id in &ids {
        let (t, s) = stops.push(&dec.push(id));
        pushes += 1;
        emitted.push_str(&t);
        assert!(!emitted.contains("END"), "partial stop string leaked: {emitted:?}");
        if s {
            stopped = true;
            break;
        }
    }
    assert!(stopped);
    assert!(pushes > 3, "stop string should span several tokens");
    assert_eq!(emitted, "Sure thing. ");

    // Without a match everything comes out, the held-back tail via finish().
    let mut stops = StopFilter::new(vec!["<|im_end|>".into()]);
    let (a, _) = stops.push("value <|im");
    let (b, _) = stops.push("portant");
    assert_eq!(format!("{a}{b}{}", stops.finish()), "value <|important");
}

#[test]
fn metadata_errors_name_the_problem() {
    let base = |model: &str| {
        let mut md = HashMap::new();
        md.insert("tokenizer.ggml.model".to_string(), Value::String(model.into()));
        md.insert(
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
        );
        md.insert("tokenizer.ggml.merges".to_string(), Value::Array(vec![Value::String("a b".into())]));
        md
    };
    let msg = |md: &HashMap<String, Value>| Tokenizer::from_gguf_metadata(md).unwrap_err().to_string();

    assert!(msg(&base("bert")).contains("\"bert\""));

    let mut md = base("gpt2");
    md.insert("tokenizer.ggml.pre".to_string(), Value::String("tekken-9000".into()));
    assert!(msg(&md).contains("\"tekken-9000\""), "{}", msg(&md));

    let mut md = base("gpt2");
    md.remove("tokenizer.ggml.tokens");
    assert!(msg(&md).contains("tokenizer.ggml.tokens"));

    let mut md = base("gpt2");
    md.insert("tokenizer.ggml.tokens".to_string(), Value::String("a".into()));
    assert!(msg(&md).contains("wrong type"));

    let mut md = base("gpt2");
    md.remove("tokenizer.ggml.merges");
    assert!(msg(&md).contains("tokenizer.ggml.merges"));

    let mut md = base("llama");
    md.insert("tokenizer.ggml.scores".to_string(), Value::Array(vec![Value::F32(0.0)]));
    assert!(msg(&md).contains("scores"));

    let mut md = base("llama");
    md.remove("tokenizer.ggml.model");
    assert!(msg(&md).contains("tokenizer.ggml.model"));

    // A minimal valid vocabulary works, and out-of-range special ids are dropped.
    let mut md = base("gpt2");
    md.insert("tokenizer.ggml.eos_token_id".to_string(), Value::U32(99));
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    assert_eq!(tok.eos_id(), None);
    // "ab" is not a token, so the merge cannot be used and the pieces come out as they are.
    assert_eq!(tok.encode("ab", false).unwrap(), vec![0, 1]);
}

#[test]
fn tokenizer_json_next_to_the_model_overrides_the_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let json = r#"{
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<|end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": {"<|end|>": 0, "h": 1, "i": 2, "Ġ": 3, "hi": 4, "Ġhi": 5, "!": 6, "<": 7, "|": 8, "e": 9, "n": 10, "d": 11, ">": 12},
                  "merges": ["h i", "Ġ hi"]}
    }"#;
    std::fs::write(dir.path().join("tokenizer.json"), json).unwrap();
    let gguf = dir.path().join("model.gguf");
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".to_string(), Value::String("gpt2".into()));
    md.insert("tokenizer.ggml.bos_token_id".to_string(), Value::U32(0));
    md.insert("tokenizer.ggml.eos_token_id".to_string(), Value::U32(0));

    let tok = Tokenizer::for_model(&gguf, &md).unwrap();
    assert_eq!(tok.vocab_size(), 13);
    assert_eq!(tok.encode("hi hi!", false).unwrap(), vec![4, 5, 6]);
    assert_eq!(tok.encode("hi<|end|>", true).unwrap(), vec![4, 0]);
    assert!(!tok.encode("hi<|end|>", false).unwrap().contains(&0));
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.eog_ids()), (Some(0), Some(0), &[0][..]));
    assert!(tok.is_special(0));
    assert_eq!(tok.token_bytes(5), b" hi");
    assert_eq!(tok.decode(&[4, 5, 0], true), "hi hi");

    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    let err = Tokenizer::for_model(&gguf, &md).unwrap_err();
    assert!(matches!(err, TokenizerError::BadTokenizerJson { .. }), "{err}");
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    fn assert_traits<T: Send + Sync + Clone + 'static>() {}
    assert_traits::<Tokenizer>();
    assert_traits::<ChatTemplate>();
    fn assert_send<T: Send>() {}
    assert_send::<StreamDecoder>();
    assert_send::<StopFilter>();

    let tok = smollm().tok.clone();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let tok = tok.clone();
            std::thread::spawn(move || tok.encode(&format!("thread {i} says hello"), false).unwrap())
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let ids = h.join().unwrap();
        assert_eq!(tok.decode(&ids, false), format!("thread {i} says hello"));
    }
}
