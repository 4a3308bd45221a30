//! Decode-time guard: llguidance grammars on the real tokenizers.
//!
//! The central check: a forbidden phrase is blocked under every tokenization our tokenizer's
//! vocabulary can spell it with, in several casings, at the start of the answer, mid-answer,
//! starting in the middle of a token and spanning token boundaries. Tokenizations are enumerated
//! with a DP over the vocabulary by byte prefix (all of them when there are at most
//! `MAX_PATHS`, otherwise a uniform seeded sample of that many); for each one, the tokens before
//! the violating byte must be accepted and the token that completes the violation must be
//! rejected. On a subset, the mask itself is checked (that token's logit is -inf).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use helpline::guard::grammar::{CompiledGuard, Constraint, Forbidden, GuardCompiler, GuardError, GuardLimits, GuardMatcher, PolicyGrammar, Shape};
use helpline::tokenizer::{TokenType, Tokenizer};
use rand::{Rng, SeedableRng};

const MAX_PATHS: usize = 4000;
/// Paths per case whose final step is checked through `fill_mask` rather than `accept` alone.
const MASK_CHECKS: usize = 24;

const PHRASES: &[&str] = &["full refund", "we guarantee", "I have approved", "QuickBooks", "100% uptime"];
const REFUSAL: &str = "I can't answer that from the approved documentation, so I've passed your question to our support team.";

fn smollm2_tokenizer() -> &'static Arc<Tokenizer> {
    &crate::support::smollm2_bundle().tokenizer
}

fn smollm2_compiler() -> &'static GuardCompiler {
    static C: OnceLock<GuardCompiler> = OnceLock::new();
    C.get_or_init(|| GuardCompiler::new(smollm2_tokenizer()).expect("guard compiler for SmolLM2"))
}

fn policy(citations: usize) -> PolicyGrammar {
    PolicyGrammar {
        forbidden: PHRASES.iter().map(|p| Forbidden::phrase("no-promises", p)).collect(),
        citations,
        refusal: REFUSAL.to_string(),
        shape: Shape::Answer,
    }
}

fn smollm2_policy() -> &'static CompiledGuard {
    static G: OnceLock<CompiledGuard> = OnceLock::new();
    G.get_or_init(|| smollm2_compiler().compile(&Constraint::Policy(policy(3))).expect("policy compiles"))
}

fn casings(phrase: &str) -> Vec<String> {
    let title: String = phrase
        .split(' ')
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_uppercase().chain(c).collect::<String>()).unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ");
    let mixed: String = phrase
        .chars()
        .enumerate()
        .map(|(i, c)| if i % 2 == 0 { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
        .collect();
    let mut v = vec![phrase.to_string(), phrase.to_lowercase(), title, phrase.to_uppercase(), mixed];
    v.dedup();
    v.sort();
    v.dedup();
    v
}

/// Tokens that spell text (control/unknown/unused tokens never do), by their bytes.
struct Spellings {
    by_bytes: HashMap<Vec<u8>, Vec<u32>>,
    max_len: usize,
}

impl Spellings {
    fn new(tok: &Tokenizer) -> Self {
        let mut by_bytes: HashMap<Vec<u8>, Vec<u32>> = HashMap::new();
        let mut max_len = 0;
        for id in 0..tok.vocab_size() as u32 {
            if !matches!(tok.token_type(id), Some(TokenType::Normal | TokenType::Byte | TokenType::UserDefined)) {
                continue;
            }
            let b = tok.token_bytes(id);
            if !b.is_empty() {
                max_len = max_len.max(b.len());
                by_bytes.entry(b.to_vec()).or_default().push(id);
            }
        }
        Spellings { by_bytes, max_len }
    }

    /// Every token sequence whose bytes concatenate to `text` (or a uniform sample of
    /// `MAX_PATHS` of them), plus the total count.
    fn tokenizations(&self, text: &[u8], seed: u64) -> (Vec<Vec<u32>>, u128) {
        let n = text.len();
        // edges[i]: (token, end) for every token spelling text[i..end].
        let edges: Vec<Vec<(u32, usize)>> = (0..n)
            .map(|i| {
                let mut e = Vec::new();
                for end in i + 1..=n.min(i + self.max_len) {
                    if let Some(ids) = self.by_bytes.get(&text[i..end]) {
                        e.extend(ids.iter().map(|&id| (id, end)));
                    }
                }
                e
            })
            .collect();
        let mut count = vec![0u128; n + 1];
        count[n] = 1;
        for i in (0..n).rev() {
            count[i] = edges[i].iter().map(|&(_, end)| count[end]).fold(0u128, |a, b| a.saturating_add(b));
        }
        let total = count[0];
        let mut paths = Vec::new();
        if total <= MAX_PATHS as u128 {
            fn dfs(i: usize, edges: &[Vec<(u32, usize)>], cur: &mut Vec<u32>, out: &mut Vec<Vec<u32>>) {
                if i == edges.len() {
                    out.push(cur.clone());
                    return;
                }
                for &(id, end) in &edges[i] {
                    cur.push(id);
                    dfs(end, edges, cur, out);
                    cur.pop();
                }
            }
            dfs(0, &edges, &mut Vec::new(), &mut paths);
        } else {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            for _ in 0..MAX_PATHS {
                let (mut i, mut path) = (0, Vec::new());
                while i < n {
                    let mut pick = rng.gen_range(0..count[i]);
                    for &(id, end) in &edges[i] {
                        if pick < count[end] {
                            path.push(id);
                            i = end;
                            break;
                        }
                        pick -= count[end];
                    }
                }
                paths.push(path);
            }
        }
        (paths, total)
    }
}

fn spellings() -> &'static Spellings {
    static S: OnceLock<Spellings> = OnceLock::new();
    S.get_or_init(|| Spellings::new(smollm2_tokenizer()))
}

fn is_masked(m: &mut GuardMatcher, vocab: usize, token: u32) -> bool {
    let mut logits = vec![0.0f32; vocab];
    m.fill_mask(&mut logits).expect("mask");
    logits[token as usize] == f32::NEG_INFINITY
}

fn matcher_after(guard: &CompiledGuard, tok: &Tokenizer, prefix: &str) -> GuardMatcher {
    let mut m = guard.matcher();
    for id in tok.encode(prefix, false).unwrap() {
        m.accept(id).unwrap_or_else(|e| panic!("prefix {prefix:?} must be allowed: {e}"));
    }
    m
}

/// For every tokenization of `text` fed after `start`: the tokens that end at or before byte
/// `bad` are accepted, and the token that covers byte `bad` is rejected (and masked, on the
/// first `MASK_CHECKS` paths). Returns how many tokenizations were checked and how many exist.
fn assert_blocked(start: &GuardMatcher, tok: &Tokenizer, sp: &Spellings, text: &str, bad: usize) -> (usize, u128) {
    let bytes = text.as_bytes();
    let (paths, total) = sp.tokenizations(bytes, bad as u64 ^ bytes.len() as u64);
    assert!(!paths.is_empty(), "no tokenization of {text:?}");
    let vocab = tok.vocab_size();
    for (n, path) in paths.iter().enumerate() {
        let mut m = start.clone();
        let mut end = 0;
        for &id in path {
            end += tok.token_bytes(id).len();
            if end <= bad {
                m.accept(id).unwrap_or_else(|e| panic!("{text:?}: token {id} before byte {bad} must be allowed in {path:?}: {e}"));
                continue;
            }
            if n < MASK_CHECKS {
                assert!(is_masked(&mut m, vocab, id), "{text:?}: token {id} ({:?}) must be masked in {path:?}", tok.decode(&[id], false));
            }
            assert!(m.accept(id).is_err(), "{text:?}: token {id} completing the violation was accepted in {path:?}");
            break;
        }
    }
    (paths.len(), total)
}

#[test]
fn forbidden_phrases_are_blocked_under_every_tokenization_and_casing() {
    let tok = smollm2_tokenizer();
    let guard = smollm2_policy();
    let sp = spellings();
    let after_prefix = matcher_after(guard, tok, "Sure, ");
    let fresh = guard.matcher();
    let mut report = Vec::new();
    for phrase in PHRASES {
        for casing in casings(phrase) {
            let bad = casing.len() - 1;
            for (name, start) in [("after \"Sure, \"", &after_prefix), ("at the start", &fresh)] {
                let (checked, total) = assert_blocked(start, tok, sp, &casing, bad);
                report.push(format!("{casing:?} {name}: {checked} of {total} tokenizations"));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn forbidden_phrases_are_blocked_mid_token_across_boundaries_and_with_other_spacing() {
    let tok = smollm2_tokenizer();
    let guard = smollm2_policy();
    let sp = spellings();
    let fresh = guard.matcher();
    // (text, the forbidden phrase inside it): phrases that start inside a token ("awe",
    // "…fullrefund"), end inside one ("uptimes"), and use other separators.
    let cases = [
        ("Sure, awe guarantee is nice", "we guarantee"),
        ("You are eligible for a full refund today.", "full refund"),
        ("Yes, a Full-Refund applies", "Full-Refund"),
        ("Yes: FULL \n REFUND", "FULL \n REFUND"),
        ("Yes, a fullrefund", "fullrefund"),
        ("Our 100%uptimes are great", "100%uptime"),
        ("Sync with quickbooks online", "quickbooks"),
        ("OK, I have  approved it", "I have  approved"),
        ("We use QuickBooks_Online", "QuickBooks"),
    ];
    for (text, phrase) in cases {
        let start = text.find(phrase).unwrap_or_else(|| panic!("{phrase:?} in {text:?}"));
        let bad = start + phrase.len() - 1;
        let (checked, total) = assert_blocked(&fresh, tok, sp, text, bad);
        eprintln!("{text:?}: {checked} of {total} tokenizations blocked at byte {bad}");
        // The tokenizer's own encoding too, through the mask.
        let mut m = guard.matcher();
        let mut end = 0;
        for id in tok.encode(text, false).unwrap() {
            end += tok.token_bytes(id).len();
            if end <= bad {
                m.accept(id).unwrap();
            } else {
                assert!(is_masked(&mut m, tok.vocab_size(), id), "{text:?}: encoded token {id} must be masked");
                break;
            }
        }
    }
}

#[test]
fn realistic_answers_pass_token_by_token_and_end_with_eos() {
    let tok = smollm2_tokenizer();
    let guard = smollm2_policy();
    let answers = [
        "Refunds go back to the original payment method [1].",
        "Downgrades take effect at the end of the current billing period [2]. You keep the higher plan's features until then.",
        "Removing a seat reduces your seat count at the next renewal; no partial refund or credit is issued [1][3].",
        "Service credits are your sole and exclusive remedy for missed uptime targets [2]. We do not guarantee a specific number.",
        "To connect your accounting tool, open Settings > Integrations and choose it from the list (for example, Xero) [3].\n\n1. Sign in.\n2. Click \"Connect\".",
        "Sure! Your invoice (INV-2041) was paid on 3 March — thanks for checking.",
    ];
    for answer in answers {
        let ids = tok.encode(answer, false).unwrap();
        let mut m = guard.matcher();
        let mut widest = 0;
        for &id in &ids {
            let mut logits = vec![0.0f32; tok.vocab_size()];
            let stats = m.fill_mask(&mut logits).unwrap();
            widest = widest.max(stats.allowed);
            assert!(logits[id as usize].is_finite(), "{answer:?}: token {id} ({:?}) masked", tok.decode(&[id], false));
            m.accept(id).unwrap();
        }
        assert!(widest > tok.vocab_size() / 2, "free text leaves most of the vocabulary open ({widest})");
        assert!(m.is_accepting(), "{answer:?} is a complete answer");
        let mut logits = vec![0.0f32; tok.vocab_size()];
        let stats = m.fill_mask(&mut logits).unwrap();
        assert!(stats.eos_allowed);
        for &eos in m.eos_ids() {
            assert!(logits[eos as usize].is_finite(), "end of turn {eos} allowed after {answer:?}");
        }
        let eos = m.eos_ids()[0];
        m.accept(eos).unwrap();
        assert!(m.is_stopped());
    }
    // End of turn is not allowed before anything was said, nor inside a marker.
    let mut m = guard.matcher();
    assert!(!m.is_accepting());
    let eot = tok.token_id("<|im_end|>").expect("SmolLM2 has <|im_end|>");
    assert!(m.eos_ids().contains(&eot));
    assert!(is_masked(&mut m, tok.vocab_size(), eot));
    let mut m = matcher_after(guard, tok, "See the billing page [");
    assert!(!m.is_accepting());
    assert!(is_masked(&mut m, tok.vocab_size(), eot));
}

#[test]
fn control_tokens_are_never_text() {
    let tok = smollm2_tokenizer();
    let mut m = matcher_after(smollm2_policy(), tok, "Hello, ");
    let mut logits = vec![0.0f32; tok.vocab_size() + 64];
    m.fill_mask(&mut logits).unwrap();
    let im_start = tok.token_id("<|im_start|>").unwrap();
    assert_eq!(logits[im_start as usize], f32::NEG_INFINITY);
    assert!(logits[tok.vocab_size()..].iter().all(|&l| l == f32::NEG_INFINITY), "padded logits are masked");
    for &eos in m.eos_ids() {
        assert!(logits[eos as usize].is_finite(), "end of turn after a complete answer");
    }
}

#[test]
fn refusal_branch_is_reachable_from_the_start() {
    let tok = smollm2_tokenizer();
    // A refusal that free text could not produce (brackets), so passing proves the branch exists.
    let refusal = "I can't help with that [escalated to a human].";
    let p = PolicyGrammar { refusal: refusal.into(), ..policy(2) };
    let guard = smollm2_compiler().compile(&Constraint::Policy(p)).unwrap();
    let mut m = guard.matcher();
    for id in tok.encode(refusal, false).unwrap() {
        let mut logits = vec![0.0f32; tok.vocab_size()];
        m.fill_mask(&mut logits).unwrap();
        assert!(logits[id as usize].is_finite(), "refusal token {id} allowed");
        m.accept(id).unwrap();
    }
    assert!(m.is_accepting() || m.is_stopped());
    // After other text, the same bracket is not reachable.
    let after = matcher_after(&guard, tok, "Sure, I can't help with that ");
    assert_blocked(&after, tok, spellings(), "[escalated", 1);
    // The default policy's refusal is plain text: accepted from the start too.
    let mut m = smollm2_policy().matcher();
    for id in tok.encode(REFUSAL, false).unwrap() {
        m.accept(id).unwrap();
    }
    assert!(m.is_accepting());
    // A refusal that itself says a forbidden phrase is a policy error.
    let p = PolicyGrammar { refusal: "We guarantee a reply.".into(), ..policy(0) };
    let err = smollm2_compiler().compile(&Constraint::Policy(p)).unwrap_err();
    assert!(matches!(err, GuardError::Policy(_)), "{err}");
    assert!(err.to_string().contains("forbidden phrase"), "{err}");
}

#[test]
fn citation_markers_one_to_n_pass_others_are_masked() {
    let tok = smollm2_tokenizer();
    let guard = smollm2_policy(); // citations = 3
    let sp = spellings();
    for ok in ["[1]", "[2]", "[3]", "[1][2]", "[3] and [1]"] {
        let text = format!("Refunds take 5 days {ok}.");
        let mut m = guard.matcher();
        for id in tok.encode(&text, false).unwrap() {
            assert!(!is_masked(&mut m, tok.vocab_size(), id), "{text:?}");
            m.accept(id).unwrap();
        }
        assert!(m.is_accepting(), "{text:?}");
    }
    let start = matcher_after(guard, tok, "Refunds take 5 days ");
    for (bad_marker, bad) in [("[4]", 1), ("[0]", 1), ("[10]", 2), ("[12]", 2), ("[a]", 1), ("[]", 1), ("]", 0)] {
        let (checked, total) = assert_blocked(&start, tok, sp, bad_marker, bad);
        eprintln!("{bad_marker}: {checked} of {total} tokenizations blocked");
    }
    // No citations: no brackets at all.
    let none = smollm2_compiler().compile(&Constraint::Policy(policy(0))).unwrap();
    let start = matcher_after(&none, tok, "See ");
    assert_blocked(&start, tok, sp, "[1]", 0);
}

#[test]
fn quote_mode_allows_verbatim_sentences_with_their_marker_only() {
    let tok = smollm2_tokenizer();
    let passages = vec![
        "Refunds go back to the original payment method. They take 5 to 10 business days.".to_string(),
        "Downgrades take effect at the end of the current billing period. We guarantee nothing else.".to_string(),
    ];
    let p = PolicyGrammar { shape: Shape::Quote(passages), ..policy(2) };
    let guard = smollm2_compiler().compile(&Constraint::Policy(p)).unwrap();
    assert!(!guard.grammar_text().contains("We guarantee nothing"), "a sentence with a forbidden phrase is not quotable");
    let good = "According to our help center, \"Refunds go back to the original payment method.\" [1] Also, \"Downgrades take effect at the end of the current billing period.\" [2]";
    let mut m = guard.matcher();
    for id in tok.encode(good, false).unwrap() {
        assert!(!is_masked(&mut m, tok.vocab_size(), id), "{good:?}");
        m.accept(id).unwrap();
    }
    assert!(m.is_accepting());
    let sp = spellings();
    let fresh = guard.matcher();
    // Altered quote, wrong marker, connective text not in the list, the forbidden sentence.
    let altered = "\"Refunds go back to your card";
    assert_blocked(&fresh, tok, sp, altered, altered.find("your").unwrap());
    let wrong = "\"They take 5 to 10 business days.\" [2]";
    assert_blocked(&fresh, tok, sp, wrong, wrong.len() - 2);
    let chatty = "As the docs say, ";
    assert_blocked(&fresh, tok, sp, chatty, 1);
    let forbidden = "\"Downgrades take effect at the end of the current billing period. We";
    assert_blocked(&fresh, tok, sp, forbidden, forbidden.find(". We").unwrap() + 1);
}

#[test]
fn compile_errors_fail_closed_and_name_the_problem() {
    let c = smollm2_compiler();
    let err = c.compile(&Constraint::Regex("(unclosed".into())).unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, GuardError::Regex(_)), "{err}");
    assert!(err.to_string().starts_with("the regex does not compile"), "{err}");

    let err = c.compile(&Constraint::Lark("start: missing_rule\n".into())).unwrap_err();
    assert!(matches!(err, GuardError::Lark(_)), "{err}");
    eprintln!("{err}");

    let mut deep = serde_json::json!({"type": "string"});
    for _ in 0..69 {
        deep = serde_json::json!({"type": "object", "properties": {"a": deep}});
    }
    let err = c.compile(&Constraint::JsonSchema { schema: deep, strict: true }).unwrap_err();
    assert_eq!(err.to_string(), "the JSON schema is nested 70 deep; at most 32 levels are allowed");

    let props: serde_json::Map<String, serde_json::Value> =
        (0..6000).map(|i| (format!("field_{i}"), serde_json::json!({"type": "string"}))).collect();
    let big = serde_json::json!({"type": "object", "properties": props});
    let err = c.compile(&Constraint::JsonSchema { schema: big, strict: true }).unwrap_err();
    assert!(matches!(err, GuardError::TooLarge { what: "JSON schema", .. }), "{err}");

    let err = c.compile(&Constraint::JsonSchema { schema: serde_json::json!({"type": "frobnicate"}), strict: true }).unwrap_err();
    assert!(matches!(err, GuardError::JsonSchema(_)), "{err}");
    eprintln!("{err}");

    let err = c.compile(&Constraint::Regex(format!("{}a{}", "(".repeat(40), ")".repeat(40)))).unwrap_err();
    assert!(matches!(err, GuardError::TooDeep { depth: 40, max: 32, .. }), "{err}");

    let bad_rule = PolicyGrammar { forbidden: vec![Forbidden::regex("no-sla", "100%(uptime")], ..policy(1) };
    let err = c.compile(&Constraint::Policy(bad_rule)).unwrap_err();
    assert!(matches!(&err, GuardError::Forbidden { rule, .. } if rule == "no-sla"), "{err}");
    eprintln!("{err}");

    // Valid for the `regex` crate, not for llguidance's lexer (no look-around): still named.
    let lexer_rule = PolicyGrammar { forbidden: vec![Forbidden::phrase("no-promises", "full refund"), Forbidden::regex("no-guarantees", r"\bguarantee\b")], ..policy(1) };
    let err = c.compile(&Constraint::Policy(lexer_rule)).unwrap_err();
    eprintln!("{err}");
    assert!(matches!(&err, GuardError::Forbidden { rule, .. } if rule == "no-guarantees"), "{err}");

    let empty_rule = PolicyGrammar { forbidden: vec![Forbidden::regex("oops", "x*")], ..policy(1) };
    let err = c.compile(&Constraint::Policy(empty_rule)).unwrap_err();
    assert!(err.to_string().contains("empty text"), "{err}");

    let no_refusal = PolicyGrammar { refusal: " ".into(), ..policy(1) };
    assert!(matches!(c.compile(&Constraint::Policy(no_refusal)), Err(GuardError::Policy(_))));

    let too_many = PolicyGrammar { citations: 1000, ..policy(1) };
    assert!(matches!(c.compile(&Constraint::Policy(too_many)), Err(GuardError::Policy(_))));

    // A budget nothing can meet.
    let strict = GuardCompiler::with_limits(smollm2_tokenizer(), GuardLimits { compile_budget: std::time::Duration::ZERO, ..GuardLimits::default() }).unwrap();
    let err = strict.compile(&Constraint::JsonObject).unwrap_err();
    assert!(err.to_string().starts_with("compiling took longer than 0 ms"), "{err}");
    eprintln!("{err}");
}

/// Feeds `json` token by token (our encoding), checking each token against the mask.
fn drive(guard: &CompiledGuard, tok: &Tokenizer, json: &str) -> GuardMatcher {
    let mut m = guard.matcher();
    for id in tok.encode(json, false).unwrap() {
        assert!(!is_masked(&mut m, tok.vocab_size(), id), "{json:?}: token {id} ({:?})", tok.decode(&[id], false));
        m.accept(id).unwrap();
    }
    m
}

#[test]
fn json_object_and_json_schema_outputs() {
    let tok = smollm2_tokenizer();
    let c = smollm2_compiler();
    let sp = spellings();

    let obj = c.compile(&Constraint::JsonObject).unwrap();
    let m = drive(&obj, tok, r#"{"order_id": "A-1234", "items": [1, 2], "note": null}"#);
    assert!(m.is_accepting() || m.is_stopped());
    assert_blocked(&obj.matcher(), tok, sp, "[1]", 0);
    assert_blocked(&matcher_after(&obj, tok, r#"{"a": 1"#), tok, sp, "]", 0);

    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "pattern": "^[A-Z]-[0-9]{4}$"},
            "refund": {"type": "boolean"}
        },
        "required": ["order_id", "refund"],
        "additionalProperties": false
    });
    let guard = c.compile(&Constraint::JsonSchema { schema: schema.clone(), strict: true }).unwrap();
    assert_eq!(guard.hash().len(), 64);
    let again = c.compile(&Constraint::JsonSchema { schema, strict: true }).unwrap();
    assert_eq!(guard.hash(), again.hash(), "the hash is of the grammar text, so it is stable");
    let m = drive(&guard, tok, r#"{"order_id": "B-0042", "refund": false}"#);
    assert!(m.is_accepting() || m.is_stopped());
    let start = matcher_after(&guard, tok, r#"{"order_id": "B-"#);
    assert_blocked(&start, tok, sp, "x", 0);
    let start = matcher_after(&guard, tok, r#"{"order_id": "B-0042", "#);
    assert_blocked(&start, tok, sp, "\"extra", 1);
}

#[test]
fn gemma3_tokenizer_blocks_phrases_too() {
    let path = crate::support::gemma3_path();
    let mut file = std::fs::File::open(&path).expect("gemma3 test model present: run `helpline models pull`");
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut tok = Tokenizer::for_model(&path, &content.metadata).unwrap();
    let template = helpline::tokenizer::ChatTemplate::from_metadata(&content.metadata).unwrap();
    let eot = template.end_of_turn_ids(&tok);
    tok.add_eog_ids(&eot);
    let tok = Arc::new(tok);
    let compiler = GuardCompiler::new(&tok).unwrap();
    let guard = compiler.compile(&Constraint::Policy(policy(3))).unwrap();
    let sp = Spellings::new(&tok);
    let fresh = guard.matcher();
    for casing in casings("full refund").into_iter().chain(casings("QuickBooks")) {
        let text = format!("Yes, {casing}");
        let (checked, total) = assert_blocked(&fresh, &tok, &sp, &text, text.len() - 1);
        eprintln!("gemma3 {text:?}: {checked} of {total} tokenizations blocked");
    }
    let answer = "Refunds go back to the original payment method [1].";
    let m = drive(&guard, &tok, answer);
    assert!(m.is_accepting());
}


/// A whole-word pattern (`[^a-z]word[^a-z]`) also holds at the very start and end of the answer,
/// where there is no neighbouring character; the word inside another word stays allowed.
#[test]
fn whole_word_patterns_hold_at_the_edges_of_the_answer() {
    use helpline::guard::grammar::{Constraint, Forbidden, PolicyGrammar, Shape};
    let g = PolicyGrammar { forbidden: vec![Forbidden::regex("c", "[^a-z]sage[^a-z]")], citations: 0, refusal: "No.".into(), shape: Shape::Answer };
    let compiled = crate::support::guard_compiler().compile(&Constraint::Policy(g)).unwrap();
    let tok = &crate::support::smollm2_bundle().tokenizer;
    // (text, every token accepted, may end there)
    for (text, accepted, may_end) in
        [("Sage is", false, false), ("a Sage is", false, false), ("message me", true, true), ("usage notes", true, true), ("try Sage", true, false)]
    {
        let mut m = compiled.matcher();
        let all = tok.encode(text, false).unwrap().into_iter().all(|id| m.accept(id).is_ok());
        assert_eq!(all, accepted, "{text:?}");
        if all {
            assert_eq!(m.is_accepting(), may_end, "{text:?}");
        }
    }
}


/// Feeds `text` token by token; returns the matcher and whether every token was accepted.
fn feed(mut m: GuardMatcher, tok: &Tokenizer, text: &str) -> (GuardMatcher, bool) {
    for id in tok.encode(text, false).unwrap() {
        if m.accept(id).is_err() {
            return (m, false);
        }
    }
    (m, true)
}

/// The shipped pack's bounds: refund windows and amounts only as the refund policy states them,
/// enforced by the answer grammar itself, under every tokenization of the value.
#[test]
fn shipped_bounds_allow_the_documented_values_only() {
    let tok = smollm2_tokenizer();
    let policy = crate::support::policy();
    let compiler = crate::support::guard_compiler();
    let fresh = || policy.answer_guard(&compiler, 3).unwrap().matcher;
    for ok in [
        "Monthly plans can get a refund within 14 days of the charge [1].",
        "Annual plans have a 30-day refund window.",
        "Refunds arrive in about 5 business days.",
        "Refunds over $500 need approval from the billing lead.",
        "Refunds of $1,200. That is the limit for annual plans.",
        "Exports are kept for 60 days. Refunds follow the policy.",
    ] {
        let (m, all) = feed(fresh(), tok, ok);
        assert!(all && m.is_accepting(), "{ok:?} must pass");
    }
    let sp = spellings();
    for (bad, at) in [
        ("You can get a refund within 60 days.", "60 day"),
        ("Refunds are possible for 2 weeks.", "2 week"),
        ("A 45-day refund window applies.", "45-day refund"),
        // Blocked at the comma already: nothing after "$5," can be an allowed amount.
        ("Refunds of $5,000 are approved by support.", "$5,"),
        ("I can offer a refund within sixty days.", "sixty day"),
    ] {
        let (m, all) = feed(fresh(), tok, bad);
        assert!(!all || !m.is_accepting(), "{bad:?} must be blocked");
        // The byte where the violation completes: the last byte of `at`.
        let end = bad.find(at).unwrap() + at.len() - 1;
        let (checked, total) = assert_blocked(&fresh(), tok, sp, bad, end);
        eprintln!("{bad:?}: {checked} of {total} tokenizations blocked");
    }
    // An amount at the very end of the answer has no character after it: it may not end the
    // answer either (the lexer sees that no continuation can be allowed, and stops it early).
    let (m, all) = feed(fresh(), tok, "The refund limit is $5000");
    assert!(!all || !m.is_accepting(), "an out-of-bound amount may not end the answer");
    let (m, all) = feed(fresh(), tok, "The refund limit is $500");
    assert!(all && m.is_accepting(), "the documented amount may end the answer");
}

/// The pack's filter beside a client's constraint: JSON (with its escapes) and raw text.
#[test]
fn the_policy_filter_holds_inside_structured_outputs() {
    let tok = smollm2_tokenizer();
    let compiler = crate::support::guard_compiler();
    let policy = crate::support::policy();
    let obj = compiler.compile(&Constraint::JsonObject).unwrap();
    let both = || policy.structured_guard(&compiler, &obj, true).unwrap().matcher;

    let (m, all) = feed(both(), tok, r#"{"reply": "Refunds follow the refund policy [1].", "ok": true}"#);
    assert!(all && m.is_accepting(), "brackets and plain answers pass");
    let sp = spellings();
    let bad = r#"{"reply": "Good news, I will refund you."}"#;
    let end = bad.find("refund").unwrap() + "refund".len() - 1;
    assert_blocked(&both(), tok, sp, bad, end);
    // JSON escapes cannot spell a phrase past the filter: `\n` separates words, `\u` is refused.
    let bad = r#"{"reply": "I will\nrefund you"}"#;
    let end = bad.find("refund").unwrap() + "refund".len() - 1;
    assert_blocked(&both(), tok, sp, bad, end);
    let (_, all) = feed(both(), tok, r#"{"reply": "I will\u0020refund"}"#);
    assert!(!all, "\\u escapes are refused");

    // When the client's constraint can only continue into a forbidden phrase, the mask is a dead
    // end (the engine ends the answer with content_filter) rather than either constraint giving way.
    let forced = compiler.compile(&Constraint::Regex("We guarantee it".into())).unwrap();
    let mut m = policy.structured_guard(&compiler, &forced, false).unwrap().matcher;
    let mut logits = vec![0f32; tok.vocab_size()];
    let mut steps = 0;
    let err = loop {
        match m.fill_mask(&mut logits) {
            Ok(_) => {
                let id = logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, _)| i as u32).next().unwrap();
                m.accept(id).unwrap();
                logits.iter_mut().for_each(|l| *l = 0.0);
                steps += 1;
                assert!(steps < 40, "never reached the dead end");
            }
            Err(e) => break e,
        }
    };
    assert_eq!(err, GuardError::DeadEnd);
}

/// The shipped bounds and the approved docs agree: no sentence of an approved article trips a
/// bound (otherwise quoting the docs would be blocked, and the pack would contradict them).
#[test]
fn shipped_bounds_admit_every_approved_article() {
    let policy = crate::support::policy();
    let patterns: Vec<(String, regex::Regex)> = policy
        .pack
        .bounds
        .iter()
        .flat_map(helpline::guard::bounds::forbidden)
        .map(|f| (f.rule.clone(), regex::Regex::new(&format!("(?is){}", f.pattern)).unwrap()))
        .collect();
    let mut checked = 0;
    let mut stack = vec![crate::support::root().join("docs-corpus")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            if !text.contains("\nstatus: approved") {
                continue;
            }
            // As a model would copy it: without Markdown emphasis.
            let plain = text.replace("**", "");
            for line in plain.lines() {
                for (rule, rx) in &patterns {
                    assert!(!rx.is_match(line), "{}: bound `{rule}` blocks an approved line: {line:?}", path.display());
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 50, "{checked} approved articles");
}
