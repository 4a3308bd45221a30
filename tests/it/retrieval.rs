//! Retrieval: indexing (formats, per-file errors, incremental and atomic commits), search over the
//! real docs-corpus (status filtering, filters, injection, follow-ups), the eval thresholds, and the
//! `index` / `search` / `eval` commands.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use helpline::retrieval::{
    build_index, eval, FileStatus, Filters, IndexOptions, IndexReport, KnowledgeBase, RetrievalError, DEFAULT_MIN_SCORE,
};
use tempfile::TempDir;

use crate::support::{self, helpline_bin, root};

fn article(id: &str, status: &str, body: &str) -> String {
    format!("---\nid: {id}\ntitle: Title of {id}\nstatus: {status}\nupdated: 2026-01-15\nproduct_area: billing\n---\n{body}")
}

fn write(dir: &Path, rel: &str, content: impl AsRef<[u8]>) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

struct Fixture {
    _tmp: TempDir,
    docs: PathBuf,
    index: PathBuf,
}

impl Fixture {
    fn new(files: &[(&str, String)]) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let docs = tmp.path().join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        for (rel, content) in files {
            write(&docs, rel, content);
        }
        let index = tmp.path().join("index");
        Fixture { _tmp: tmp, docs, index }
    }
    fn opts(&self) -> IndexOptions {
        support::index_options(&self.docs.clone(), &self.index.clone())
    }
    fn build(&self) -> IndexReport {
        build_index(&self.opts()).unwrap()
    }
    fn kb(&self) -> KnowledgeBase {
        support::open_kb(&self.index).unwrap()
    }
}

fn status_of<'a>(report: &'a IndexReport, path: &str) -> &'a FileStatus {
    &report.files.iter().find(|f| f.path == path).unwrap_or_else(|| panic!("{path} not in report: {report:#?}")).status
}

fn skip_reason(report: &IndexReport, path: &str) -> String {
    match status_of(report, path) {
        FileStatus::Skipped { reason } => reason.clone(),
        other => panic!("{path}: expected skipped, got {other:?}"),
    }
}

/// Long enough per section that the chunker keeps sections apart.
const FILLER: &str = "Each export keeps the workspace currency and time zone, lists the filters that were applied, and \
names the person who ran it, so accountants can check later exactly what the figures contained.";

const HTML: &str = "<!DOCTYPE html><html><head><title>Page title</title><style>.x { color: red }</style>\
<script>var secret = 'scriptword';</script></head><body><h1>Title of pdf-export</h1>\
<p>Reports download as PDF from Reports &rarr; Export. Profit &amp; loss works too.</p>\
<h2>Too large</h2><p>A PDF holds at most <strong>2,000 rows</strong>; shorten the range.</p><p>FILLER</p>\
<h3>Timeouts</h3><ul><li>Wait a minute</li><li>Try again</li></ul><p>FILLER</p></body></html>";

const TXT: &str = "Clients get polite reminders before an invoice falls due.\n\n## Turn on reminders\n\n\
Go to Settings and switch on automatic reminders for every invoice.\n\n## When reminders stop\n\nReminders stop when the invoice is paid.\n";

#[test]
fn markdown_text_and_html_are_parsed_into_sectioned_chunks() {
    let md = "Intro line about refunds.\n\n## Annual plans\n\nAnnual **plans** get a [pro-rated](https://x.example) refund.\n\n### Who approves\n\nA billing manager approves `exceptions`.\n";
    let fx = Fixture::new(&[
        ("billing/refunds.md", article("refunds", "approved", md)),
        ("billing/reminders.txt", article("reminders", "approved", TXT)),
        ("reports/pdf-export.html", article("pdf-export", "approved", &HTML.replace("FILLER", FILLER))),
    ]);
    let report = fx.build();
    assert_eq!(report.skipped(), 0, "{report}");
    assert_eq!((report.documents, report.indexed()), (3, 3));
    let kb = fx.kb();

    let md = kb.document("refunds").unwrap().unwrap();
    let all: String = md.iter().map(|p| format!("{} | {}\n", p.section, p.text)).collect();
    assert!(all.contains("Annual plans get a pro-rated refund."), "{all}");
    assert!(!all.contains("**") && !all.contains("](") && !all.contains('`'), "{all}");
    assert!(md.iter().all(|p| p.source == "billing/refunds.md" && p.title == "Title of refunds" && p.locale == "en"));
    assert!(md.iter().enumerate().all(|(i, p)| p.chunk_id == format!("refunds#{i}")));

    let txt = kb.document("reminders").unwrap().unwrap();
    let sections: Vec<&str> = txt.iter().map(|p| p.section.as_str()).collect();
    assert!(sections.contains(&"Turn on reminders"), "{sections:?}");

    let html = kb.document("pdf-export").unwrap().unwrap();
    let text: String = html.iter().map(|p| format!("{}\n{}\n", p.section, p.text)).collect();
    assert!(text.contains("Reports → Export. Profit & loss works too."), "{text}");
    assert!(text.contains("- Wait a minute\n- Try again"), "{text}");
    let sections: Vec<&str> = html.iter().map(|p| p.section.as_str()).collect();
    assert_eq!(sections, ["Too large", "Too large > Timeouts"], "{text}");
    for banned in ["<", "scriptword", "color: red", "Page title", "&amp;"] {
        assert!(!text.contains(banned), "{banned:?} leaked into {text}");
    }
    // Script content is not searchable either.
    assert!(kb.search_lexical("scriptword", 5, &Filters::default()).unwrap().is_empty());
    // The title is searchable, and passages carry bounded plain-text snippets.
    let hits = kb.search("2,000 rows PDF", 3, &Filters::default()).unwrap();
    assert_eq!(hits[0].doc_id, "pdf-export");
    assert!(!hits[0].snippet.is_empty() && hits[0].snippet.chars().count() <= helpline::retrieval::SNIPPET_CHARS + 1);
    assert!(!hits[0].snippet.contains('<'));
}

#[test]
fn every_per_file_error_is_reported_naming_the_file_and_the_rest_still_indexes() {
    let ok = article("good-one", "approved", "Refunds take ten days.\n");
    let fx = Fixture::new(&[
        ("a/good-one.md", ok),
        ("a/dup-first.md", article("same-id", "approved", "first copy\n")),
        ("b/dup-second.md", article("same-id", "approved", "second copy\n")),
        ("bad/latin1.md", String::new()),
        ("bad/unclosed.md", "---\nid: unclosed\ntitle: T\n".into()),
        ("bad/missing.md", "---\nid: missing\nstatus: approved\nupdated: 2026-01-01\nproduct_area: x\n---\nbody\n".into()),
        ("bad/empty.md", "---\nid: empty\ntitle: \"\"\nstatus: approved\nupdated: 2026-01-01\nproduct_area: x\n---\nbody\n".into()),
        ("bad/status.md", article("status", "published", "body\n")),
        ("bad/date.md", "---\nid: date\ntitle: T\nstatus: approved\nupdated: 01/02/2026\nproduct_area: x\n---\nbody\n".into()),
        ("bad/id.md", article("Not_Kebab", "approved", "body\n")),
        ("bad/no-front-matter.md", "# Just notes\n\nNo front matter here.\n".into()),
        ("bad/manual.pdf", "%PDF-1.4".into()),
        ("README.md", "# About this folder\n".into()),
        ("a/.hidden.md", "junk".into()),
        ("drafts/draft.md", article("some-draft", "draft", "Proposal.\n")),
        ("drafts/old.md", article("some-old", "retired", "Old policy.\n")),
    ]);
    write(&fx.docs, "bad/latin1.md", b"---\nid: latin\ntitle: Caf\xe9\n---\n");
    let report = fx.build();

    assert!(skip_reason(&report, "bad/latin1.md").contains("not valid UTF-8"));
    assert!(skip_reason(&report, "bad/unclosed.md").contains("no closing `---`"));
    assert!(skip_reason(&report, "bad/missing.md").contains("missing required key `title`"));
    assert!(skip_reason(&report, "bad/empty.md").contains("key `title` is empty"));
    assert!(skip_reason(&report, "bad/status.md").contains("\"published\" is not one of approved, draft, retired"));
    assert!(skip_reason(&report, "bad/date.md").contains("not an ISO date"));
    assert!(skip_reason(&report, "bad/id.md").contains("kebab-case"));
    assert!(skip_reason(&report, "bad/no-front-matter.md").contains("not an article: no front matter"));
    assert!(skip_reason(&report, "bad/manual.pdf").contains("unsupported file type"));
    // The first file in path order keeps a duplicated id; the later one names it.
    assert_eq!(status_of(&report, "a/dup-first.md"), &FileStatus::Indexed { chunks: 1 });
    assert!(skip_reason(&report, "b/dup-second.md").contains("duplicate id `same-id`: already used by a/dup-first.md"));
    // READMEs without front matter and hidden files are ignored by design, not reported.
    assert!(report.files.iter().all(|f| f.path != "README.md" && !f.path.contains(".hidden")));
    assert_eq!(status_of(&report, "drafts/draft.md"), &FileStatus::Excluded { doc_status: "draft".into() });
    assert_eq!(status_of(&report, "drafts/old.md"), &FileStatus::Excluded { doc_status: "retired".into() });

    assert_eq!((report.indexed(), report.excluded(), report.skipped(), report.unchanged(), report.removed()), (2, 2, 10, 0, 0));
    assert_eq!((report.documents, report.chunks), (2, 2));
    let summary = report.to_string();
    assert!(summary.starts_with("2 indexed, 0 unchanged, 0 removed, 2 excluded (draft/retired), 10 skipped"), "{summary}");
    assert!(summary.contains("skipped bad/date.md: broken front matter: updated \"01/02/2026\""), "{summary}");

    let json = serde_json::to_value(&report).unwrap();
    let first = json["files"].as_array().unwrap().iter().find(|f| f["path"] == "b/dup-second.md").unwrap().clone();
    assert_eq!(first["status"], "skipped");
    assert_eq!(first["doc_id"], "same-id");

    let kb = fx.kb();
    assert_eq!(kb.search("refunds ten days", 3, &Filters::default()).unwrap()[0].doc_id, "good-one");
    assert!(kb.document("some-draft").unwrap().is_none());
}

#[test]
fn missing_docs_dir_and_locked_index_are_fatal() {
    let fx = Fixture::new(&[("a.md", article("a", "approved", "x\n"))]);
    let bad = support::index_options(&fx.docs.join("nope"), &fx.index.clone());
    assert!(matches!(build_index(&bad), Err(RetrievalError::DocsDir { .. })));
    assert!(matches!(support::open_kb(&fx.index), Err(RetrievalError::NoIndex { .. })));

    fx.build();
    let index = tantivy::Index::open_in_dir(&fx.index).unwrap();
    let writer: tantivy::IndexWriter = index.writer(20_000_000).unwrap();
    match build_index(&fx.opts()) {
        Err(e @ RetrievalError::Locked { .. }) => assert!(e.to_string().contains("try again")),
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(writer);
    assert!(build_index(&fx.opts()).is_ok());
}

#[test]
fn rebuild_is_incremental_and_versioned() {
    let fx = Fixture::new(&[
        ("one.md", article("one", "approved", "Alpha topic words.\n")),
        ("two.md", article("two", "approved", "Beta topic words.\n")),
        ("three.txt", article("three", "approved", "Gamma topic words.\n")),
    ]);
    let first = fx.build();
    assert!(first.committed && first.indexed() == 3);
    let kb = fx.kb();
    assert_eq!(kb.version(), first.version);
    assert_eq!((kb.num_documents(), kb.num_chunks()), (3, 3));

    // No change: nothing re-indexed, no commit, same version.
    let again = fx.build();
    assert_eq!((again.unchanged(), again.indexed(), again.committed), (3, 0, false));
    assert_eq!(again.version, first.version);

    // One file edited: only it is re-indexed; the version changes; the old text is gone.
    write(&fx.docs, "two.md", article("two", "approved", "Delta replaced words.\n"));
    let edited = fx.build();
    assert_eq!(status_of(&edited, "two.md"), &FileStatus::Indexed { chunks: 1 });
    assert_eq!((edited.unchanged(), edited.indexed()), (2, 1));
    assert_ne!(edited.version, first.version);
    kb.reload().unwrap();
    assert_eq!(kb.version(), edited.version);
    assert!(kb.search_lexical("beta", 5, &Filters::default()).unwrap().is_empty());
    assert_eq!(kb.search("delta", 5, &Filters::default()).unwrap()[0].doc_id, "two");
    assert_eq!(kb.num_chunks(), 3);

    // Deleted file: reported as removed with its id, its chunks deleted.
    std::fs::remove_file(fx.docs.join("three.txt")).unwrap();
    let removed = fx.build();
    let outcome = removed.files.iter().find(|f| f.path == "three.txt").unwrap();
    assert_eq!((&outcome.status, outcome.doc_id.as_deref()), (&FileStatus::Removed, Some("three")));
    kb.reload().unwrap();
    assert!(kb.document("three").unwrap().is_none());
    assert_eq!((kb.num_documents(), removed.documents), (2, 2));

    // An approved article turned draft leaves the index; a broken one too, saying so.
    write(&fx.docs, "one.md", article("one", "draft", "Alpha topic words.\n"));
    write(&fx.docs, "two.md", "---\nid: two\n");
    let demoted = fx.build();
    assert_eq!(status_of(&demoted, "one.md"), &FileStatus::Excluded { doc_status: "draft".into() });
    assert!(skip_reason(&demoted, "two.md").contains("previously indexed version was removed"));
    kb.reload().unwrap();
    assert_eq!(kb.num_documents(), 0);
    assert!(kb.search("alpha delta", 5, &Filters::default()).unwrap().is_empty());
}

#[test]
fn an_index_from_another_analyzer_version_is_refused_then_fully_rebuilt() {
    let fx = Fixture::new(&[("one.md", article("one", "approved", "Alpha.\n")), ("two.md", article("two", "approved", "Beta.\n"))]);
    fx.build();
    {
        // Rewrite the payload as an older build would have left it.
        let index = tantivy::Index::open_in_dir(&fx.index).unwrap();
        let mut writer: tantivy::IndexWriter = index.writer(20_000_000).unwrap();
        let mut prepared = writer.prepare_commit().unwrap();
        prepared.set_payload(r#"{"schema":"helpline-retrieval-0","files":{}}"#);
        prepared.commit().unwrap();
    }
    let err = support::open_kb(&fx.index).unwrap_err();
    assert!(err.to_string().contains("helpline index"), "{err}");
    let report = fx.build();
    assert_eq!((report.indexed(), report.unchanged()), (2, 0));
    let kb = fx.kb();
    assert_eq!(kb.num_chunks(), 2);
    // Old documents were replaced, not duplicated.
    assert_eq!(kb.search_lexical("alpha", 10, &Filters::default()).unwrap().len(), 1);
}

#[test]
fn readers_keep_answering_during_a_rebuild_and_see_it_after_reload() {
    let files: Vec<(String, String)> =
        (0..30).map(|i| (format!("doc-{i}.md"), article(&format!("doc-{i}"), "approved", &format!("Original content number {i} about invoices.\n")))).collect();
    let refs: Vec<(&str, String)> = files.iter().map(|(p, c)| (p.as_str(), c.clone())).collect();
    let fx = Fixture::new(&refs);
    let first = fx.build();
    let kb = fx.kb();
    for (path, _) in &files {
        let id = path.trim_end_matches(".md");
        write(&fx.docs, path, article(id, "approved", &format!("Revised content for {id} about payments.\n")));
    }
    let reader = {
        let kb = kb.clone();
        std::thread::spawn(move || {
            // Every answer is all-old or all-new: 30 hits for exactly one of the two words.
            for _ in 0..300 {
                let old = kb.search_lexical("original", 50, &Filters::default()).unwrap().len();
                let new = kb.search("revised", 50, &Filters::default()).unwrap().len();
                assert!(old == 30 || new == 30, "half-built state: {old} old, {new} new");
            }
        })
    };
    let second = fx.build();
    reader.join().unwrap();
    assert_eq!(second.indexed(), 30);
    kb.reload().unwrap();
    assert_eq!(kb.version(), second.version);
    assert_ne!(first.version, second.version);
    assert_eq!(kb.search("revised payments", 50, &Filters::default()).unwrap().len(), 30);
    assert!(kb.search_lexical("original", 50, &Filters::default()).unwrap().is_empty());
}

/// The real docs-corpus, indexed once per test run.
fn corpus() -> &'static (KnowledgeBase, IndexReport) {
    static KB: OnceLock<(KnowledgeBase, IndexReport)> = OnceLock::new();
    KB.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("retrieval-corpus-index");
        let _ = std::fs::remove_dir_all(&dir);
        let report = build_index(&support::index_options(&root().join("docs-corpus"), &dir.clone())).unwrap();
        (support::open_kb(&dir).unwrap(), report)
    })
}

const NEVER_SERVED: &[&str] =
    &["refund-policy-2024", "uptime-sla-draft-100", "api-rate-limits-v1", "support-fee-waivers-draft", "cancellation-data-deletion-2023", "sso-all-plans-draft"];

#[test]
fn the_real_corpus_indexes_cleanly() {
    let (kb, report) = corpus();
    assert_eq!(report.skipped(), 0, "{report}");
    assert_eq!(report.excluded(), NEVER_SERVED.len(), "{report}");
    assert!(report.documents >= 50, "{report}");
    assert_eq!((kb.num_documents(), kb.num_chunks(), kb.version()), (report.documents, report.chunks, report.version.clone()));
}

#[test]
fn drafts_and_retired_articles_are_never_returned() {
    let (kb, _) = corpus();
    let queries = [
        "60 days no questions asked refund money-back guarantee",
        "100% uptime guarantee",
        "old per-hour API rate limits per key",
        "support can waive fees",
        "data is deleted on cancellation",
        "SSO on every plan",
        "refund to a different card or bank account within 2 business days",
    ];
    for q in queries {
        for passages in [kb.search(q, 20, &Filters::default()).unwrap(), kb.search_turn(q, &["refund policy 2024 draft"], 20, &Filters::default()).unwrap()] {
            assert!(!passages.is_empty(), "{q}");
            for p in passages {
                assert!(!NEVER_SERVED.contains(&p.doc_id.as_str()), "{q}: got {}", p.doc_id);
            }
        }
    }
    for id in NEVER_SERVED {
        assert!(kb.document(id).unwrap().is_none(), "{id}");
        assert!(kb.passage(&format!("{id}#0")).unwrap().is_none(), "{id}");
        let only = Filters { doc_id: vec![id.to_string()], ..Filters::default() };
        assert!(kb.search("refund uptime sso fees", 10, &only).unwrap().is_empty(), "{id}");
    }
}

#[test]
fn user_text_cannot_break_or_steer_the_query() {
    let (kb, _) = corpus();
    let long = "refund ".repeat(1500) + &"ü".repeat(2000);
    for q in ["title:( AND OR", "", "   ", "\"unclosed", "*", "status:draft refund", "doc_id:refund-policy-2024", "NOT refund", long.as_str(), "🙂🙂"] {
        let hits = kb.search(q, 5, &Filters::default()).unwrap_or_else(|e| panic!("{q:?}: {e}"));
        assert!(hits.len() <= 5);
        assert!(hits.iter().all(|p| !NEVER_SERVED.contains(&p.doc_id.as_str())), "{q:?}");
    }
    assert!(kb.search("", 5, &Filters::default()).unwrap().is_empty());
    assert!(kb.search("refund", 0, &Filters::default()).unwrap().is_empty());
    assert!(kb.search("the and of", 5, &Filters::default()).unwrap().is_empty(), "stop words alone find nothing");
}

#[test]
fn filters_restrict_area_locale_and_documents() {
    let (kb, _) = corpus();
    let security = Filters { product_area: vec!["Security".into()], ..Filters::default() };
    let hits = kb.search("two-factor codes password reset", 10, &security).unwrap();
    assert!(!hits.is_empty() && hits.iter().all(|p| p.product_area == "security"), "{hits:?}");
    let english = Filters { locale: Some("en".into()), ..Filters::default() };
    assert!(!kb.search("refund", 5, &english).unwrap().is_empty());
    let french = Filters { locale: Some("fr".into()), ..Filters::default() };
    assert!(kb.search("refund", 5, &french).unwrap().is_empty());
    let docs = Filters { doc_id: vec!["webhooks".into(), "api-keys".into()], ..Filters::default() };
    let hits = kb.search("api", 10, &docs).unwrap();
    assert!(!hits.is_empty() && hits.iter().all(|p| p.doc_id == "webhooks" || p.doc_id == "api-keys"));
}

#[test]
fn results_are_bounded_diverse_and_addressable() {
    let (kb, _) = corpus();
    let hits = kb.search("refund annual plan cancel", 6, &Filters::default()).unwrap();
    assert_eq!(hits.len(), 6);
    assert!(hits.windows(2).take(3).all(|w| w[0].doc_id != w[1].doc_id));
    for p in &hits {
        assert_eq!(kb.passage(&p.chunk_id).unwrap().unwrap().text, p.text);
        let doc = kb.document(&p.doc_id).unwrap().unwrap();
        assert!(doc.iter().any(|c| c.chunk_id == p.chunk_id) && doc.iter().all(|c| c.score == 0.0 && c.snippet.is_empty()));
    }
    let refund = kb.document("refund-policy").unwrap().unwrap();
    assert!(refund.iter().any(|p| p.section == "Exceptions"), "{:?}", refund.iter().map(|p| &p.section).collect::<Vec<_>>());
}

#[test]
fn follow_ups_find_the_topic_of_earlier_turns() {
    let (kb, _) = corpus();
    let none = Filters::default();
    let cases = [
        (&["How do I reset my password?"][..], "and how long is the link good for?", "password-reset"),
        (&["Can I export my data before I cancel?"][..], "how long do I have after cancelling?", "data-retention"),
        (&["We want to connect our bank account"][..], "how far back will it import transactions?", "bank-feeds"),
    ];
    for (earlier, current, want) in cases {
        let turn: Vec<String> = kb.search_turn(current, earlier, 3, &none).unwrap().into_iter().map(|p| p.doc_id).collect();
        assert!(turn.iter().any(|d| d == want), "{current:?} after {earlier:?}: {turn:?}");
    }
    // A change of topic is led by the new message.
    let switched = kb.search_turn("what are the API rate limits?", &["How do I reset my password?"], 1, &none).unwrap();
    assert_eq!(switched[0].doc_id, "api-rate-limits");
}

/// Thresholds sit a little below what hybrid retrieval (BM25 and sentence embeddings) measured on
/// this corpus and question set (recall@3 0.944, recall@5 0.965, MRR 0.876; see docs/grounding.md).
/// The refusal side is the turn's gate, measured by `helpline eval --answers` (tests/it/answers.rs).
#[test]
fn eval_set_recall_stays_above_thresholds() {
    let (kb, _) = corpus();
    let cases = eval::load_cases(&root().join("eval/grounding.jsonl")).unwrap();
    assert!(cases.len() >= 75);
    let r = eval::evaluate(kb, &cases, DEFAULT_MIN_SCORE).unwrap();
    let summary = r.to_string();
    assert!(r.recall_at_3 >= 0.92, "{summary}");
    assert!(r.recall_at_5 >= 0.95, "{summary}");
    assert!(r.mrr >= 0.85, "{summary}");
}

fn run(args: &[&str]) -> std::process::Output {
    helpline_bin().args(args).output().expect("binary runs")
}

#[test]
fn cli_index_search_and_eval_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("index");
    let index_s = index.to_str().unwrap();
    let corpus = root().join("docs-corpus");

    // Search before any index: exit 1, saying what to do.
    let out = run(&["search", "refund", "--index", index_s]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("helpline index"));

    let out = run(&["index", "--docs", corpus.to_str().unwrap(), "--index", index_s]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("indexed, 0 unchanged"));

    let out = run(&["index", "--docs", corpus.to_str().unwrap(), "--index", index_s, "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["committed"], false);
    assert!(report["files"].as_array().unwrap().iter().all(|f| f["status"] == "unchanged" || f["status"] == "excluded"));

    let out = run(&["search", "how do I get a refund on my annual plan", "-k", "3", "--index", index_s]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("[refund-policy#") && !text.contains("relevance gate"), "{text}");
    let out = run(&["search", "weather in paris tomorrow", "--index", index_s]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && (text.contains("relevance gate") || text.contains("no passages match")), "{text}");
    let out = run(&["search", "two factor", "--area", "security", "--json", "--index", index_s]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["passages"].as_array().unwrap().iter().all(|p| p["product_area"] == "security"));

    let out = run(&["eval", "--index", index_s, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["recall_at_3"].as_f64().unwrap() > 0.8);

    // A skipped file: the rest is indexed, exit 2, the file named.
    let docs = tmp.path().join("docs");
    write(&docs, "good.md", article("good", "approved", "fine\n"));
    write(&docs, "broken.md", "---\nid: broken\n");
    let out = run(&["index", "--docs", docs.to_str().unwrap(), "--index", tmp.path().join("i2").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("skipped broken.md: broken front matter"));

    // Fatal: unreadable docs dir, exit 1 with the fix.
    let out = run(&["index", "--docs", tmp.path().join("missing").to_str().unwrap(), "--index", index_s]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--docs"));
}
