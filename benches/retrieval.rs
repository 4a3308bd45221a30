//! Retrieval benchmark: full index builds with embeddings (documents/s, MB/s, vectors computed and
//! the time per vector), search latency (p50/p99 of `search_turn` over the eval questions, the
//! question's embedding included), and the embedding cost of one question, on the default
//! docs-corpus and on a synthetic corpus 100x its size generated from it.
//!
//! Every build starts with an empty embedding cache (nothing on disk, nothing in memory), so the
//! build times include embedding every unit. `cargo bench --bench retrieval` prints a table;
//! `-- --json` one JSON object per corpus; `-- --quick` builds the synthetic corpus at 10x.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use helpline::embed::Embedder;

use helpline::retrieval::{build_index, eval, Filters, IndexOptions, KnowledgeBase};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const BUILDS: usize = 3;

struct Row {
    corpus: String,
    files: usize,
    documents: usize,
    chunks: usize,
    megabytes: f64,
    build_s: f64,
    units: usize,
    vectors: usize,
    ms_per_vector: f64,
    query_embed_ms_p50: f64,
    searches: usize,
    p50_us: f64,
    p99_us: f64,
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let corpus = root.join("docs-corpus");
    let cases = eval::load_cases(&root.join("eval/grounding.jsonl")).expect("eval/grounding.jsonl");
    let tmp = tempfile::tempdir().expect("temp dir");

    let synthetic = tmp.path().join("synthetic");
    let copies = if std::env::args().any(|a| a == "--quick") { 10 } else { 100 };
    let generated = generate(&corpus, &synthetic, copies, 7);
    let rows = vec![
        measure("docs-corpus", &corpus, tmp.path(), &cases, 30, BUILDS),
        measure(&format!("synthetic {copies}x ({generated} files)"), &synthetic, tmp.path(), &cases, 5, 1),
    ];
    if json {
        for r in &rows {
            let v = serde_json::json!({
                "corpus": r.corpus, "files": r.files, "documents": r.documents, "chunks": r.chunks,
                "megabytes": r.megabytes, "build_s": r.build_s, "units": r.units, "vectors": r.vectors,
                "embed_ms_per_vector": r.ms_per_vector, "query_embed_ms_p50": r.query_embed_ms_p50,
                "docs_per_s": r.documents as f64 / r.build_s, "mb_per_s": r.megabytes / r.build_s,
                "searches": r.searches, "search_p50_us": r.p50_us, "search_p99_us": r.p99_us,
            });
            println!("{v}");
        }
    } else {
        println!("| corpus | files | docs | chunks | units | vectors | MB | build s | docs/s | ms per vector | question embedding p50 ms | searches | search p50 µs | p99 µs |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for r in &rows {
            println!(
                "| {} | {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.0} | {:.2} | {:.1} | {} | {:.0} | {:.0} |",
                r.corpus,
                r.files,
                r.documents,
                r.chunks,
                r.units,
                r.vectors,
                r.megabytes,
                r.build_s,
                r.documents as f64 / r.build_s,
                r.ms_per_vector,
                r.query_embed_ms_p50,
                r.searches,
                r.p50_us,
                r.p99_us
            );
        }
    }
}

/// A fresh embedder: no disk cache, an empty memory cache.
fn embedder() -> Arc<Embedder> {
    let spec = helpline::model::fetch::EMBEDDING_MODEL;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join(spec.dir_name);
    Arc::new(Embedder::load(&dir, spec.embed_files()).expect("the embedding model: run `helpline models pull`"))
}

fn measure(name: &str, docs: &Path, tmp: &Path, cases: &[eval::EvalCase], reps: usize, builds: usize) -> Row {
    let mut times = Vec::new();
    let mut last = None;
    let mut per_vector = Vec::new();
    for i in 0..builds {
        // A fresh directory and embedder each time: a full build with every unit embedded.
        let index_dir = tmp.join(format!("index-{}-{i}", name.len()));
        let e = embedder();
        let start = Instant::now();
        let report = build_index(&IndexOptions { docs_dir: docs.to_path_buf(), index_dir: index_dir.clone(), embedder: e.clone() }).expect("build");
        times.push(start.elapsed().as_secs_f64());
        per_vector.push(report.embed_ms / report.embedded.max(1) as f64);
        last = Some((report, index_dir, e));
    }
    times.sort_by(f64::total_cmp);
    per_vector.sort_by(f64::total_cmp);
    let (report, index_dir, e) = last.expect("at least one build");
    // One question's embedding (a fresh embedder, so nothing is cached).
    let fresh = embedder();
    let mut q_ms: Vec<f64> = cases
        .iter()
        .map(|c| {
            let t = Instant::now();
            std::hint::black_box(fresh.embed_one(c.turns.last().expect("turns")).expect("embed"));
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    q_ms.sort_by(f64::total_cmp);
    let kb = KnowledgeBase::open(&index_dir, e).expect("open");
    let mut latencies = Vec::new();
    let none = Filters::default();
    for _ in 0..reps {
        for case in cases {
            let (question, earlier) = case.turns.split_last().expect("turns");
            let earlier: Vec<&str> = earlier.iter().map(String::as_str).collect();
            let start = Instant::now();
            let hits = kb.search_turn(question, &earlier, 5, &none).expect("search");
            latencies.push(start.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(hits);
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    Row {
        corpus: name.to_string(),
        files: report.files.len(),
        documents: report.documents,
        chunks: report.chunks,
        megabytes: report.bytes_read as f64 / 1e6,
        build_s: times[times.len() / 2],
        units: report.units,
        vectors: report.embedded,
        ms_per_vector: per_vector[per_vector.len() / 2],
        query_embed_ms_p50: q_ms[q_ms.len() / 2],
        searches: latencies.len(),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    }
}

/// Writes `copies` variants of every article under `src` into `dst`: new ids, sections and
/// paragraphs shuffled, and about one word in eight replaced by another word of the corpus, so the
/// copies differ in content and term statistics rather than repeating one another. Returns the
/// number of files written.
fn generate(src: &Path, dst: &Path, copies: usize, seed: u64) -> usize {
    let mut articles = Vec::new();
    collect(src, src, &mut articles);
    let vocabulary: Vec<String> = articles
        .iter()
        .flat_map(|(_, text)| text.split_whitespace().filter(|w| w.chars().all(char::is_alphabetic) && w.len() > 3).map(str::to_string).collect::<Vec<_>>())
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut written = 0;
    for c in 0..copies {
        for (rel, text) in &articles {
            let Some((front, body)) = split_front_matter(text) else { continue };
            let Some(id) = front.lines().find_map(|l| l.strip_prefix("id:")).map(str::trim) else { continue };
            let new_id = format!("{id}-v{c}");
            let front = front.replacen(&format!("id: {id}"), &format!("id: {new_id}"), 1);
            let body = if rel.ends_with(".md") || rel.ends_with(".txt") { shuffle_sections(body, &mut rng) } else { body.to_string() };
            let body = vary_words(&body, &vocabulary, &mut rng);
            let ext = rel.rsplit('.').next().unwrap_or("md");
            let path = dst.join(format!("copy-{c:03}")).join(format!("{new_id}.{ext}"));
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, format!("---\n{front}---\n{body}")).expect("write");
            written += 1;
        }
    }
    written
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read corpus").filter_map(Result::ok).map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(root, &path, out);
        } else if let Ok(text) = std::fs::read_to_string(&path) {
            if text.starts_with("---") {
                out.push((path.strip_prefix(root).expect("under root").to_string_lossy().into_owned(), text));
            }
        }
    }
}

/// (front matter lines with trailing newline, body)
fn split_front_matter(text: &str) -> Option<(&str, &str)> {
    let rest = text.strip_prefix("---\n")?;
    let end = rest.find("\n---\n")?;
    Some((&rest[..end + 1], &rest[end + 5..]))
}

fn shuffle_sections(body: &str, rng: &mut StdRng) -> String {
    let mut parts: Vec<&str> = body.split("\n## ").collect();
    let intro = parts.remove(0);
    let mut sections: Vec<String> = parts
        .into_iter()
        .map(|s| {
            let (heading, text) = s.split_once('\n').unwrap_or((s, ""));
            let mut paragraphs: Vec<&str> = text.split("\n\n").filter(|p| !p.trim().is_empty()).collect();
            paragraphs.shuffle(rng);
            format!("{heading}\n\n{}", paragraphs.join("\n\n"))
        })
        .collect();
    sections.shuffle(rng);
    let mut out = intro.to_string();
    for s in sections {
        out.push_str("\n## ");
        out.push_str(&s);
        out.push('\n');
    }
    out
}

fn vary_words(body: &str, vocabulary: &[String], rng: &mut StdRng) -> String {
    let mut out = String::with_capacity(body.len());
    for (i, line) in body.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        // Markup lines (headings, HTML tags) keep their shape; only words of prose are swapped.
        let words: Vec<String> = line
            .split(' ')
            .map(|w| if w.chars().all(char::is_alphabetic) && w.len() > 3 && rng.gen_ratio(1, 8) { vocabulary[rng.gen_range(0..vocabulary.len())].clone() } else { w.to_string() })
            .collect();
        out.push_str(&words.join(" "));
    }
    out
}
