//! Decode-time guard cost: mask computation per token with the real SmolLM2 tokenizer
//! (49k tokens), answers forced token by token through a fresh matcher, so every step computes
//! a full mask. Prints one table. `cargo bench --bench guard`

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use helpline::guard::grammar::{CompiledGuard, Constraint, Forbidden, GuardCompiler, PolicyGrammar, Shape};
use helpline::tokenizer::{ChatTemplate, Tokenizer};

const ROUNDS: usize = 5;

const ANSWERS: &[&str] = &[
    "Refunds go back to the original payment method [1]. They usually arrive within 5 to 10 business days, depending on your bank.",
    "Downgrades take effect at the end of the current billing period [2]. You keep the higher plan's features until then, and we do not issue credits for the unused part of a period [2].",
    "To connect your accounting tool, open Settings > Integrations and choose it from the list [3].\n\n1. Sign in as an admin.\n2. Click \"Connect\".\n3. Approve the requested permissions.",
    "Service credits are your sole and exclusive remedy for missed uptime targets [1]. If you think you are owed a credit, reply with the incident date and we'll check it.",
];

const JSONS: &[&str] = &[
    r#"{"order_id": "A-1234", "refund": false, "reason": "The customer asked about a duplicate charge on the March invoice.", "tags": ["billing", "invoice"]}"#,
    r#"{"order_id": "Z-0001", "refund": true, "reason": "Charged twice.", "tags": []}"#,
];

fn tokenizer(path: &Path) -> Arc<Tokenizer> {
    let mut file = std::fs::File::open(path).expect("default model present: run `helpline models pull`");
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).expect("gguf");
    let mut tok = Tokenizer::for_model(path, &content.metadata).expect("tokenizer");
    let template = ChatTemplate::from_metadata(&content.metadata).expect("template");
    let eot = template.end_of_turn_ids(&tok);
    tok.add_eog_ids(&eot);
    Arc::new(tok)
}

/// Per-token mask times over all texts, each forced token by token through a fresh matcher:
/// the first round (cold: the compiled guard's lexer and mask caches start empty) and the later
/// `ROUNDS - 1` rounds (warm: the caches a long-lived compiled guard builds up are shared by its
/// matchers).
fn mask_times(guard: &CompiledGuard, tok: &Tokenizer, texts: &[&str]) -> (Vec<Duration>, Vec<Duration>) {
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    let mut logits = vec![0.0f32; tok.vocab_size()];
    for round in 0..ROUNDS {
        for text in texts {
            let mut m = guard.matcher();
            for id in tok.encode(text, false).expect("encode") {
                logits.fill(0.0);
                let stats = m.fill_mask(&mut logits).expect("mask");
                assert!(logits[id as usize].is_finite(), "{text:?} must be allowed");
                if round == 0 { cold.push(stats.elapsed) } else { warm.push(stats.elapsed) }
                m.accept(id).expect("accept");
            }
            assert!(m.is_accepting(), "{text:?} is complete");
        }
    }
    (cold, warm)
}

fn row(name: &str, compile: Duration, mut t: Vec<Duration>) {
    t.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = t.iter().map(|&d| us(d)).sum::<f64>() / t.len() as f64;
    let pct = |p: f64| us(t[((t.len() - 1) as f64 * p).round() as usize]);
    println!(
        "{name:<34} {:>10.1} {:>7} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
        compile.as_secs_f64() * 1e3,
        t.len(),
        mean,
        pct(0.5),
        pct(0.99),
        us(*t.last().unwrap())
    );
}

fn main() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let tok = tokenizer(&path);
    let t0 = Instant::now();
    let compiler = GuardCompiler::new(&tok).expect("compiler");
    let setup = t0.elapsed();

    let forbidden = ["full refund", "we guarantee", "I have approved", "QuickBooks", "100% uptime", "waive the fee", "lifetime discount"]
        .iter()
        .map(|p| Forbidden::phrase("no-promises", p))
        .chain([Forbidden::regex("no-sla-numbers", r"99\.9+\s*%")])
        .collect();
    let policy = PolicyGrammar {
        forbidden,
        citations: 5,
        refusal: "I can't answer that from the approved documentation, so I've passed your question to our support team.".into(),
        shape: Shape::Answer,
    };
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "pattern": "^[A-Z]-[0-9]{4}$"},
            "refund": {"type": "boolean"},
            "reason": {"type": "string", "maxLength": 200},
            "tags": {"type": "array", "items": {"enum": ["billing", "invoice", "account", "api"]}}
        },
        "required": ["order_id", "refund", "reason", "tags"],
        "additionalProperties": false
    });

    println!("tokenizer: SmolLM2-135M-Instruct ({} tokens); token env + factory built in {:.1} ms", tok.vocab_size(), setup.as_secs_f64() * 1e3);
    println!("mask = compute the allowed set and write -inf into a {}-float logits vector; answers forced token by token, {ROUNDS} rounds", tok.vocab_size());
    println!();
    println!("{:<34} {:>10} {:>7} {:>10} {:>10} {:>10} {:>10}", "constraint", "compile ms", "masks", "mean us", "p50 us", "p99 us", "max us");
    // The shipped pack, as the server compiles it (every phrase and pattern of its forbidden rules).
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pack = helpline::guard::policy::PolicyPack::load(&root.join("docs-corpus/policy.toml")).expect("shipped pack");
    let shipped = PolicyGrammar {
        forbidden: pack
            .forbidden
            .iter()
            .flat_map(|r| r.phrases.iter().map(|p| Forbidden::phrase(&r.id, p)).chain(r.patterns.iter().map(|p| Forbidden::regex(&r.id, p))))
            .collect(),
        citations: 5,
        refusal: pack.messages.refusal.clone(),
        shape: Shape::Answer,
    };
    let shipped_name = format!("shipped pack ({} phrases)", shipped.forbidden.len());
    // The pack's bounds, as their own grammar (run beside the answer grammar).
    let bounds = PolicyGrammar {
        forbidden: pack.bounds.iter().flat_map(helpline::guard::bounds::forbidden).collect(),
        citations: 0,
        refusal: String::new(),
        shape: Shape::Filter { json: false },
    };
    let bounds_name = format!("shipped bounds ({} patterns)", bounds.forbidden.len());
    for (name, constraint, texts) in [
        (bounds_name.as_str(), Constraint::Policy(bounds), ANSWERS),
        ("policy (8 rules, [1]..[5])", Constraint::Policy(policy), ANSWERS),
        (shipped_name.as_str(), Constraint::Policy(shipped), ANSWERS),
        ("json_schema (4 fields)", Constraint::JsonSchema { schema, strict: true }, JSONS),
        ("json_object", Constraint::JsonObject, JSONS),
    ] {
        let t = Instant::now();
        let guard = compiler.compile(&constraint).expect("compiles");
        let compile = t.elapsed();
        let (cold, warm) = mask_times(&guard, &tok, texts);
        row(&format!("{name}, cold"), compile, cold);
        row(&format!("{name}, warm"), compile, warm);
    }
}
