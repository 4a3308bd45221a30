//! Answers that are right: the chat turn end to end (server and `helpline ask`), assembled answers
//! that quote the approved articles and state the labelled facts, decisions answered with the rule
//! and a person, generated sentences checked against the evidence, the README's examples as
//! printed, the embeddings against an independent forward pass, and clear errors for bad input.

use std::collections::HashSet;

use serde_json::{json, Value};

use helpline::answer_eval as ae;
use helpline::config::ServeConfig;
use helpline::tokenizer::ChatMessage;
use helpline::turn::{self, Deps, Mode};

use crate::server_support::{start_server, TestServer};
use crate::support::{self, helpline_bin, root};

fn config() -> ServeConfig {
    ServeConfig { max_concurrent: 2, ..ServeConfig::default() }
}

fn request(mode: Mode, messages: Vec<ChatMessage>) -> turn::Request {
    turn::Request {
        messages,
        sampling: turn::Sampling { params: helpline::sampler::SamplingParams::greedy(), max_tokens: 120, stop: Vec::new() },
        grounding: Some(helpline::retrieval::Filters::default()),
        mode,
        structured: None,
        conversation: None,
        audit_request: Value::Null,
        for_agent: false,
        dry_run_actions: false,
        tools: None,
    }
}

async fn ask(deps: &Deps, mode: Mode, question: &str) -> turn::Finished {
    turn::run(deps, request(mode, vec![ChatMessage::new("user", question)])).await.expect("the turn runs").collect().await.expect("the answer finishes")
}

/// The fixed words an assembled answer may hold besides its quotes (lead-ins, connectives, the
/// long-list note, the pack's closing and decision texts).
fn is_fixed_wording(line: &str, policy: &helpline::guard::ActivePolicy) -> bool {
    let pack = &policy.pack;
    let m = &pack.messages;
    line.starts_with("Here are the steps from our help center article “")
        || line.starts_with("Here's what our help center article “")
        || line.starts_with("And from “")
        || line == "Also:"
        || line == "Step by step:"
        || line.starts_with("(That list has ")
        || line == m.closing.trim()
        || line == m.decision_offer.trim()
        || pack.decisions.iter().any(|d| line == d.reply.trim() || d.offer.as_deref().is_some_and(|o| line == o.trim()))
}

/// Every line of an assembled answer is fixed wording or verbatim evidence (list markers, row
/// bullets and citation markers aside).
fn assert_only_quotes(text: &str, kb: &helpline::retrieval::KnowledgeBase, policy: &helpline::guard::ActivePolicy) {
    let table = kb.evidence().unwrap();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // Fixed wording may lead a line: a lead-in, a connective, a decision's reply.
        let mut l = line.to_string();
        for d in &policy.pack.decisions {
            if let Some(rest) = l.strip_prefix(d.reply.trim()) {
                l = rest.trim().to_string();
            }
        }
        for (start, end) in [("Here's what our help center article “", "” says:"), ("Here are the steps from our help center article “", "”:"), ("And from “", "”:")] {
            if l.starts_with(start) {
                if let Some(at) = l.find(end) {
                    l = l[at + end.len()..].trim().to_string();
                }
            }
        }
        for prefix in ["Also:", "Step by step:"] {
            if let Some(rest) = l.strip_prefix(prefix) {
                l = rest.trim().to_string();
            }
        }
        if l.trim().is_empty() || is_fixed_wording(&l, policy) {
            continue;
        }
        // A list item keeps its marker; a table row is shown as a bullet.
        let body = l.trim_start_matches("- ");
        let body = match body.split_once(". ") {
            Some((n, rest)) if n.chars().all(|c| c.is_ascii_digit()) => rest,
            _ => body,
        };
        let whole = table.is_verbatim(body);
        let sentences = helpline::retrieval::evidence::sentences(body);
        let each = !sentences.is_empty()
            && sentences.iter().all(|s| {
                table.is_verbatim(s) || table.units.iter().any(|u| helpline::retrieval::evidence::normalize_quote(&u.text).contains(&helpline::retrieval::evidence::normalize_quote(s)))
            });
        assert!(whole || each, "not a verbatim quote or fixed wording: {line:?}\nin:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_curl_examples_run_as_printed_give_correct_cited_answers() {
    let server = start_server(config()).await;
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    // The curl commands of the README, joined across their line continuations.
    let mut commands: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in readme.lines() {
        let t = line.trim_end();
        if current.is_empty() && !t.trim_start().starts_with("curl ") {
            continue;
        }
        current.push_str(t.trim_end_matches('\\'));
        current.push(' ');
        if !t.ends_with('\\') {
            commands.push(std::mem::take(&mut current));
        }
    }
    let chat: Vec<&String> = commands.iter().filter(|c| c.contains("/v1/chat/completions")).collect();
    assert!(chat.len() >= 2, "the README shows a plain and a streamed chat example: {commands:#?}");
    let run = |cmd: &str| {
        let cmd = cmd.replace("http://127.0.0.1:8080", &server.base_url);
        let out = std::process::Command::new("sh").arg("-c").arg(&cmd).output().expect("sh runs");
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let first = run(chat[0]);
    let v: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first}"));
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    for fact in ["Forgot password?", "Send reset link", "60 minutes"] {
        assert!(content.contains(fact), "the README's password question states {fact:?}: {content}");
    }
    assert!(content.contains("[1]"), "{content}");
    assert_eq!(v["helpline"]["citations"][0]["doc_id"], "password-reset", "{}", v["helpline"]);
    assert_eq!(v["helpline"]["grounding"]["mode"], "assembled");
    // Run as printed twice: the same answer (no temperature-1 sampling by default).
    let again: Value = serde_json::from_str(&run(chat[0])).unwrap();
    assert_eq!(again["choices"][0]["message"]["content"], v["choices"][0]["message"]["content"]);

    let streamed = run(chat[1]);
    let mut text = String::new();
    let mut done = false;
    for line in streamed.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(line).unwrap();
        if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    assert!(done, "{streamed}");
    assert_eq!(text, support::policy().pack.messages.greeting, "a greeting is answered with the pack's greeting");
    server.shutdown().await;
}

#[test]
fn helpline_ask_is_grounded_and_guarded_by_default() {
    let index = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = helpline_bin().env("HELPLINE_INDEX_DIR", index.path()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let answer = run(&["ask", "How long is the password reset link valid?"]);
    assert!(answer.contains("60 minutes") && answer.contains("[1]"), "{answer}");
    let decision = run(&["ask", "I paid for my monthly plan 20 days ago, can I get a refund?"]);
    assert!(decision.contains("14 days") && decision.contains("connect you"), "{decision}");
    assert!(!decision.to_lowercase().starts_with("yes") && !decision.to_lowercase().starts_with("no"), "{decision}");
    let out = helpline_bin().env("HELPLINE_INDEX_DIR", index.path()).args(["ask", "--report", "What's the weather in Berlin tomorrow?"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("can't answer that from our help center"), "{stdout}");
    let report: Value = serde_json::from_str(&String::from_utf8_lossy(&out.stderr)[String::from_utf8_lossy(&out.stderr).find('{').unwrap()..]).unwrap();
    assert_eq!(report["grounding"]["status"], "no_relevant_docs");
    // With grounding off the model answers (still under the pack).
    let bare = run(&["ask", "--no-grounding", "--max-tokens", "12", "Say hello."]);
    assert!(!bare.trim().is_empty());
    let bad = helpline_bin().env("HELPLINE_INDEX_DIR", index.path()).args(["ask", "--mode", "poetic", "hi"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--mode must be assembled, generative or quote"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assembled_answers_state_the_labelled_facts_and_quote_only_approved_text() {
    let server = start_server(config()).await;
    let deps = server.state.turn_deps().unwrap();
    let cases = ae::load(&root().join("eval/grounding.jsonl")).unwrap();
    let outcomes = ae::run(&deps, &cases, Mode::Assembled, None).await.unwrap();
    let f = ae::question_figures(&outcomes);
    eprintln!("{f}");
    // A little under the measured figures (docs/grounding.md): 0.746 stated, 0.928 relevant.
    assert!(f.fact_stated as f64 >= 0.70 * f.answerable as f64, "{f}");
    assert!(f.cited_relevant as f64 >= 0.88 * f.answered_answerable as f64, "{f}");
    assert_eq!(f.repeated_sentences, 0, "{f}");
    let kb = deps.knowledge.clone().unwrap();
    for o in outcomes.iter().filter(|o| o.status == "grounded") {
        assert_only_quotes(&o.text, &kb, &deps.policy);
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_are_answered_with_the_rule_and_a_person_never_a_verdict() {
    let server = start_server(config()).await;
    let body = json!({"messages": [{"role": "user", "content": "Can I get a refund on my monthly plan? I paid 20 days ago."}]});
    let r = server.post_json("/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let h = &v["helpline"];
    assert_eq!(h["guard"]["action"], "decision", "{h}");
    assert_eq!(h["guard"]["reason"], "refund_decision");
    assert_eq!(h["handoff"]["offered"], true);
    assert_eq!(h["handoff"]["reason"], "refund_decision");
    assert!(h["citations"].as_array().unwrap().iter().all(|c| c["doc_id"] == "refund-policy"), "{h}");
    assert!(text.contains("14 days"), "the rule is quoted: {text}");
    let verdicts = ae::Matcher::load(&root().join("eval/verdicts.json")).unwrap();
    assert!(verdicts.hits(&text).is_empty(), "no eligibility verdict: {:?} in {text}", verdicts.hits(&text));
    assert_only_quotes(&text, &server.state.knowledge().unwrap(), &server.state.policy().unwrap());
    let metrics = server.admin_get("/metrics").await.text();
    assert!(metrics.contains("helpline_guard_rules_total{rule=\"refund-eligibility\",action=\"decision\"} 1"), "{metrics}");
    // The audit record names the decision rule.
    let answer_id = h["answer_id"].as_str().unwrap();
    let turn = server.state.store().unwrap().get_turn(answer_id).await.unwrap();
    assert_eq!(turn.audit.unwrap()["guard"]["rules"][0], "refund-eligibility");

    // The customer accepts the offer: the conversation goes to a person.
    let conv = h["conversation_id"].as_str().unwrap();
    let body = json!({"messages": [
        {"role": "user", "content": "Can I get a refund on my monthly plan? I paid 20 days ago."},
        {"role": "assistant", "content": text},
        {"role": "user", "content": "yes please"}
    ], "helpline": {"conversation_id": conv}});
    let v = server.post_json("/v1/chat/completions", &body).await.json();
    assert_eq!(v["helpline"]["guard"]["action"], "handoff", "{}", v["helpline"]);
    assert_eq!(v["helpline"]["handoff"]["reason"], "customer_request");
    let (c, _) = server.state.store().unwrap().get_conversation(conv).await.unwrap();
    assert_eq!(c.status, helpline::store::ConversationStatus::HandedOff);

    // Over the decision set: every answer free of verdicts; decision requests mostly recognised,
    // informational questions never treated as decisions.
    let deps = server.state.turn_deps().unwrap();
    let cases = ae::load(&root().join("eval/decisions.jsonl")).unwrap();
    let outcomes = ae::run(&deps, &cases, Mode::Assembled, Some(&verdicts)).await.unwrap();
    let docs = cases.iter().filter_map(|c| Some((c.id.clone(), c.rule_doc.clone()?))).collect();
    let d = ae::decision_figures(&outcomes, &docs);
    eprintln!("{d}");
    assert_eq!(d.verdicts, 0, "{d}");
    assert_eq!(d.informational_as_decision, 0, "{d}");
    assert!(d.as_decision as f64 >= 0.85 * d.decisions as f64, "{d}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_sentences_never_state_a_number_the_evidence_lacks() {
    let server = start_server(config()).await;
    let deps = server.state.turn_deps().unwrap();
    let questions = [
        "How long is the password reset link valid?",
        "How many failed sign-in attempts before my account is locked, and for how long?",
        "How much does the Starter plan cost per user?",
        "How long do refunds take to show up on my card?",
        "What is the uptime commitment on the Business plan?",
        "How many invoices can I send on the Free plan?",
        "How far back can bank feeds import transactions?",
        "What's the API rate limit on Starter?",
    ];
    let (mut replaced, mut dropped, mut kept) = (0, 0, 0);
    for q in questions {
        let f = ask(&deps, Mode::Generative, q).await;
        let g = f.info.grounding.as_ref().unwrap();
        if g.status != helpline::turn::report::GroundingStatus::Grounded || f.refusal.is_some() {
            continue;
        }
        let evidence: String = g.evidence.iter().map(|e| e.text.clone()).chain(g.passages.iter().map(|p| format!("{} {}", p.title, p.section))).collect::<Vec<_>>().join("\n");
        let known: HashSet<String> = helpline::turn::check::numbers(&evidence).into_iter().collect();
        // Markers aside, every number sent is one the evidence states.
        let sent: String = regex::Regex::new(r"\[\d+(, \d+)*\]").unwrap().replace_all(&f.text, "").into_owned();
        for n in helpline::turn::check::numbers(&sent) {
            assert!(known.contains(&n), "{q}: {n} is not in the evidence\nanswer: {}\nevidence: {evidence}", f.text);
        }
        let c = g.checks.as_ref().expect("generated answers report their checks");
        (replaced, dropped, kept) = (replaced + c.replaced, dropped + c.dropped, kept + c.kept);
    }
    eprintln!("sentence checks over {} questions: kept {kept}, replaced {replaced}, dropped {dropped}", questions.len());
    assert!(replaced + dropped > 0, "the 135M model states something unsupported on these questions, and the check catches it");
    let metrics = server.admin_get("/metrics").await.text();
    assert!(metrics.contains("helpline_checked_sentences_total{outcome=\"kept\"}"), "{metrics}");
    server.shutdown().await;
}

#[test]
fn embeddings_match_an_independent_forward_pass() {
    let sentences = [
        "How do I reset my password?",
        "Refunds go back to the original payment method only.",
        "Go to Settings → Billing → Invoices and choose Request refund.",
        "The lock lifts automatically after 15 minutes.",
        "Können Sie mir helfen? Ça marche très bien.",
        "At least 12 characters.",
        "Business: 99.9% (about 43 minutes of downtime per 30-day month)",
    ];
    let dir = root().join("models").join(helpline::model::fetch::EMBEDDING_MODEL.dir_name);
    let mut child = std::process::Command::new("python3")
        .arg(root().join("scripts/minilm_reference.py"))
        .arg("--model-dir")
        .arg(&dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (numpy is installed by the test command)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for s in sentences {
            writeln!(stdin, "{s}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the reference script failed");
    let reference: Vec<Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(reference.len(), sentences.len());
    let e = support::embedder();
    let ours = e.embed(&sentences).unwrap();
    for ((s, r), v) in sentences.iter().zip(&reference).zip(&ours) {
        let ids: Vec<u32> = r["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(e.token_ids(s).unwrap(), ids, "{s}: word pieces differ");
        let rv: Vec<f32> = r["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let cos = helpline::embed::dot(v, &rv) / (helpline::embed::dot(&rv, &rv).sqrt() * helpline::embed::dot(v, v).sqrt());
        assert!(cos >= 0.999, "{s}: cosine {cos}");
    }
}

fn write(path: &std::path::Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

const FRONT: &str = "---\nid: ID\ntitle: TITLE\nstatus: approved\nupdated: 2026-01-01\nproduct_area: account\n---\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_nothing_is_cut_silently() {
    // An approved article with nothing to quote is skipped, naming what to change.
    let docs = tempfile::tempdir().unwrap();
    let index = tempfile::tempdir().unwrap();
    write(&docs.path().join("empty.md"), &format!("{}\n# Only a heading\n\n## And another\n", FRONT.replace("ID", "empty-article").replace("TITLE", "Empty")));
    let items: String = (1..=40).map(|i| format!("- Integration number {i} connects the Zorblax {i} service.\n")).collect();
    write(
        &docs.path().join("long.md"),
        &format!("{}\nThese are the Zorblax services you can connect:\n\n{items}", FRONT.replace("ID", "zorblax-services").replace("TITLE", "Zorblax services")),
    );
    let report = helpline::retrieval::build_index(&support::index_options(docs.path(), index.path())).unwrap();
    let skipped: Vec<_> = report.files.iter().filter(|f| matches!(f.status, helpline::retrieval::FileStatus::Skipped { .. })).collect();
    assert_eq!(skipped.len(), 1, "{report}");
    assert_eq!(skipped[0].path, "empty.md");
    assert!(report.to_string().contains("has no sentence, list item or table row to quote"), "{report}");
    let out = helpline_bin().args(["index", "--docs"]).arg(docs.path()).arg("--index").arg(index.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a skipped file is exit code 2");

    // A very long list is quoted in part with a line saying so, never cut silently.
    let server = start_server(config()).await;
    let mut deps = server.state.turn_deps().unwrap();
    deps.knowledge = Some(support::open_kb(index.path()).unwrap());
    let f = ask(&deps, Mode::Assembled, "Which Zorblax services can I connect? Is Zorblax 33 one of them?").await;
    assert!(f.text.contains("(That list has 40 items in all; the article “Zorblax services” shows every one.)"), "{}", f.text);
    assert!(f.text.contains("Zorblax 33"), "the item asked about is quoted: {}", f.text);
    server.shutdown().await;

    // The embedding model missing, or with the wrong hash: errors that say what to do.
    let empty = tempfile::tempdir().unwrap();
    let files = helpline::model::fetch::EMBEDDING_MODEL.embed_files();
    let err = helpline::embed::Embedder::load(empty.path(), files).unwrap_err().to_string();
    assert!(err.contains("embedding model is missing") && err.contains("helpline models pull minilm-l6"), "{err}");
    let src = root().join("models").join(helpline::model::fetch::EMBEDDING_MODEL.dir_name);
    std::fs::copy(src.join("model.safetensors"), empty.path().join("model.safetensors")).unwrap();
    let mut tok = std::fs::read(src.join("tokenizer.json")).unwrap();
    tok.push(b'\n');
    std::fs::write(empty.path().join("tokenizer.json"), tok).unwrap();
    let err = helpline::embed::Embedder::load(empty.path(), files).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json has sha256") && err.contains("--force"), "{err}");
    // Through the command line, offline with no models: the message names the fix.
    let out = helpline_bin()
        .env("HELPLINE_MODELS_DIR", empty.path().join("none"))
        .env("HELPLINE_OFFLINE", "1")
        .args(["index", "--docs"])
        .arg(docs.path())
        .arg("--index")
        .arg(index.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sentence-embedding model") && stderr.contains("helpline models pull minilm-l6"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_misses_and_off_topic_questions_are_refused_with_the_offer_of_a_person() {
    let server: TestServer = start_server(config()).await;
    for q in ["Who won the football world cup in 2014?", "Can you recommend a good recipe for banana bread?", "Is there a version for the Apple Watch?"] {
        let v = server.post_json("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": q}]})).await.json();
        assert_eq!(v["helpline"]["grounding"]["status"], "no_relevant_docs", "{q}: {}", v["helpline"]);
        assert_eq!(v["helpline"]["handoff"]["offered"], true);
        assert!(v["choices"][0]["message"]["content"].as_str().unwrap().contains("connect you with a member of our support team"));
        assert_eq!(v["helpline"]["citations"], json!([]));
    }
    server.shutdown().await;
}
