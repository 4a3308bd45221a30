//! The read side: [`KnowledgeBase`] answers ranked [`Passage`]s from a built index.
//!
//! User text is never given to tantivy's query parser: it goes through the same analyzer as the
//! documents and becomes a bag of terms, so `title:(`, `AND` or quotes are just words. Every query
//! carries mandatory `status == approved` and `kind == chunk` clauses, and every stored document is
//! checked again before it becomes a `Passage`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use tantivy::collector::{DocSetCollector, TopDocs};
use tantivy::query::{BooleanQuery, BoostQuery, ConstScoreQuery, Occur, Query, TermQuery};
use tantivy::schema::{IndexRecordOption, Term, Value};
use tantivy::snippet::SnippetGenerator;
use tantivy::tokenizer::TextAnalyzer;
use tantivy::{Index, IndexReader, ReloadPolicy, Searcher, TantivyDocument, TantivyError};

use std::time::Instant;

use super::evidence::{self, EvidenceTable, Unit};
use super::index::IndexMeta;
use crate::embed::Embedder;
use super::schema::{self, Fields, KIND_CHUNK, KIND_META, SCHEMA_VERSION};
use super::{Filters, Passage, RetrievalError};

/// Score multipliers per field. Title and heading words already count more than body words without
/// a multiplier: they score in their own short field (high BM25 length normalisation) on top of any
/// match in the body. Extra boosts crowded the top ranks with several chunks of one article and
/// lowered recall on the eval set (recall@3 0.859 at 1/1, 0.831 at 2/1, 0.838 at 2/1.5), so both
/// stay at 1; the knobs remain for other corpora.
pub const TITLE_BOOST: f32 = 1.0;
pub const SECTION_BOOST: f32 = 1.0;

/// Weight of the terms of the customer's previous message in [`KnowledgeBase::search_turn`]
/// (the current message's terms weigh 1); each older message weighs [`EARLIER_TURN_DECAY`] times
/// the one after it. Calibrated on the eval set (see docs/grounding.md).
pub const EARLIER_TURN_WEIGHT: f32 = 0.5;
pub const EARLIER_TURN_DECAY: f32 = 0.5;

/// At most this many chunks of one document in a result list, and a document's second chunk only
/// after every other matching document's first: distinct documents raised recall@3 on the eval set
/// from 0.845 (two per document in score order) to 0.859.
pub const MAX_CHUNKS_PER_DOC: usize = 2;

/// Bounds on user text: longer input is cut (at a char boundary) and only the first distinct
/// terms are used, so a pasted 10 kB message costs no more than a long question.
const MAX_QUERY_BYTES: usize = 16 * 1024;
const MAX_QUERY_TERMS: usize = 48;

/// Words (after stemming) shorter than this are never treated as typos.
const MIN_TYPO_CHARS: usize = 5;

/// Maps the gate's evidence (`score * sqrt(coverage)`, unbounded) into [0, 1): evidence equal to
/// this scale gives relevance 0.5. Set to the evidence level calibrated as the refusal threshold
/// on the eval set, so that the default gate is `relevance >= 0.5`.
pub const RELEVANCE_SCALE: f32 = 3.5;

/// Reciprocal-rank fusion: a candidate at rank r (from 0) of a list adds `weight / (RRF_K + r + 1)`.
pub const RRF_K: f32 = 10.0;
pub const LEXICAL_WEIGHT: f32 = 1.0;
/// Weight of the conversation's vector next to the latest message's in a follow-up's query vector.
pub const FOLLOW_UP_CONTEXT: f32 = 0.8;
/// Least cosine similarity of a chunk's best unit for it to be a dense candidate.
pub const DENSE_FLOOR: f32 = 0.4;
pub const DENSE_WEIGHT: f32 = 1.0;

/// Cosine similarity between a question and its best sentence below which the semantic half of the
/// gate gives nothing, and the span over which it rises to 1.
pub const SEMANTIC_FLOOR: f32 = 0.25;
pub const SEMANTIC_SPAN: f32 = 0.5;
/// Share of the gate's measure that comes from the lexical side.
pub const LEXICAL_SHARE: f32 = 0.5;

/// The relevance gate's measure from its two sides, in [0, 1].
pub fn combined_relevance(lexical: f32, semantic: f32) -> f32 {
    let s = ((semantic - SEMANTIC_FLOOR) / SEMANTIC_SPAN).clamp(0.0, 1.0);
    LEXICAL_SHARE * lexical + (1.0 - LEXICAL_SHARE) * s
}

/// Longest snippet, in characters.
pub const SNIPPET_CHARS: usize = 200;

/// A query term with its weight (1 for the current message, less for earlier turns).
#[derive(Debug, Clone, PartialEq)]
struct WeightedTerm {
    text: String,
    weight: f32,
    /// Set when the customer's word was not in the index and `text` is its typo correction: the
    /// correction finds articles, but the gate counts the word as only partly covered, since it may
    /// not have been a typo at all ("payroll" is not a misspelled "payout").
    corrected: bool,
}

/// Most searchable words (after stop words) a follow-up may have and still lean on earlier turns.
pub const FOLLOW_UP_MAX_TERMS: usize = 4;

/// Share of a corrected word's idf that a passage containing its correction covers.
pub const CORRECTED_CREDIT: f32 = 0.5;

/// What retrieval found for one question (see [`KnowledgeBase::retrieve`]).
#[derive(Debug, Clone)]
pub struct Retrieval {
    /// Fused, diversified passages, best first.
    pub passages: Vec<Passage>,
    /// The question's unit vector.
    pub query_vector: Vec<f32>,
    /// Every evidence unit's cosine similarity to the question (read in context), in unit order.
    pub similarities: Vec<f32>,
    /// The evidence of the version searched.
    pub evidence: Arc<EvidenceTable>,
    /// Analyzed query terms with their weights (1 for the latest message, less for earlier ones).
    pub terms: Vec<(String, f32)>,
    /// The message was read as a follow-up of the conversation.
    pub follow_up: bool,
    /// Share of the latest message's searchable words the index does not know (after typo
    /// correction): a question about something the docs never mention has many.
    pub unknown: f32,
    /// Time spent embedding the question.
    pub embed_ms: f64,
}

impl Retrieval {
    /// Unit `i`'s text alone against the question (computed on demand: only the units of the
    /// candidate articles need it).
    pub fn plain_similarity(&self, i: usize) -> f32 {
        self.evidence.plain_similarity(i, &self.query_vector)
    }
}

/// A searchable, cheaply clonable handle on a built index. The reader reloads by itself shortly
/// after another process commits; [`reload`](Self::reload) forces it now.
#[derive(Clone)]
pub struct KnowledgeBase {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    reader: IndexReader,
    embedder: Arc<Embedder>,
    fields: Fields,
    analyzer: TextAnalyzer,
    /// What was derived from the last searcher generation used (bookkeeping, vocabulary).
    snapshot: Mutex<Option<Arc<Snapshot>>>,
}

/// Facts about one searcher generation, computed on first use and reused until a reload.
struct Snapshot {
    generation: u64,
    meta: Option<IndexMeta>,
    /// Every indexed word (title, section, text) with its largest document frequency over those
    /// fields; built only when a query has a word the index does not know.
    vocabulary: OnceLock<HashMap<String, u64>>,
    /// The evidence units and vectors of this version, read on first use.
    evidence: OnceLock<Result<Arc<EvidenceTable>, String>>,
}

fn tantivy_err(e: TantivyError) -> RetrievalError {
    RetrievalError::Tantivy(e.to_string())
}

impl std::fmt::Debug for KnowledgeBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnowledgeBase").field("path", &self.inner.path).finish_non_exhaustive()
    }
}

impl KnowledgeBase {
    /// Opens the index built by [`build_index`](super::build_index) at `index_dir`.
    pub fn open(index_dir: &Path, embedder: Arc<Embedder>) -> Result<Self, RetrievalError> {
        if !index_dir.join("meta.json").is_file() {
            return Err(RetrievalError::NoIndex { path: index_dir.to_path_buf() });
        }
        let stale = |why: String| {
            RetrievalError::Tantivy(format!("the index at {} {why}; rebuild it with `helpline index`", index_dir.display()))
        };
        let index = Index::open_in_dir(index_dir).map_err(tantivy_err)?;
        if index.schema() != schema::schema() {
            return Err(stale("was built by another version of helpline".into()));
        }
        let payload = index.load_metas().map_err(tantivy_err)?.payload.unwrap_or_default();
        let built_with = serde_json::from_str::<serde_json::Value>(&payload).ok().and_then(|v| v["schema"].as_str().map(str::to_string));
        match built_with.as_deref() {
            Some(SCHEMA_VERSION) => {}
            Some(other) => return Err(stale(format!("was built with analyzer {other:?}, this build uses {SCHEMA_VERSION:?}"))),
            None => return Err(stale("has no manifest (a build did not complete)".into())),
        }
        schema::register_analyzer(&index);
        let fields = Fields::resolve(&index.schema()).map_err(tantivy_err)?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::OnCommitWithDelay).try_into().map_err(tantivy_err)?;
        let kb = KnowledgeBase {
            inner: Arc::new(Inner { path: index_dir.to_path_buf(), reader, embedder, fields, analyzer: schema::analyzer(), snapshot: Mutex::new(None) }),
        };
        // Fail at open, not on the first question, when the evidence of this version is missing.
        kb.evidence()?;
        Ok(kb)
    }

    /// The evidence units of the version being searched, with their vectors.
    pub fn evidence(&self) -> Result<Arc<EvidenceTable>, RetrievalError> {
        let searcher = self.inner.reader.searcher();
        self.evidence_of(&searcher)
    }

    fn evidence_of(&self, searcher: &Searcher) -> Result<Arc<EvidenceTable>, RetrievalError> {
        let snapshot = self.snapshot(searcher);
        let loaded = snapshot.evidence.get_or_init(|| {
            let version = snapshot.meta.as_ref().map(|m| m.version.clone()).unwrap_or_default();
            let path = evidence::file_for(&self.inner.path, &version, self.inner.embedder.fingerprint());
            match EvidenceTable::read(&path) {
                Ok(t) if t.dim == self.inner.embedder.dim() => Ok(Arc::new(t)),
                Ok(_) => Err(format!("{} was made with another embedding size; rebuild the index with `helpline index`", path.display())),
                Err(e) if !path.exists() => Err(format!(
                    "the index at {} has no evidence file for version {version} and this embedding model ({e}); \
                     rebuild it with `helpline index`",
                    self.inner.path.display()
                )),
                Err(e) => Err(e.to_string()),
            }
        });
        loaded.clone().map_err(RetrievalError::Evidence)
    }

    /// The embedding model the index was opened with.
    pub fn embedder(&self) -> &Arc<Embedder> {
        &self.inner.embedder
    }

    /// Analyzed terms of `text` (lower case, stop words removed, stemmed), as the index holds them.
    pub fn analyze(&self, text: &str) -> Vec<String> {
        let mut analyzer = self.inner.analyzer.clone();
        schema::analyze(&mut analyzer, truncate(text, MAX_QUERY_BYTES))
    }

    /// Each term's idf over the chunks (a term the index does not know gets the highest).
    pub fn term_idf(&self, terms: &[String]) -> Result<Vec<f32>, RetrievalError> {
        let searcher = self.inner.reader.searcher();
        let weighted: Vec<WeightedTerm> = terms.iter().map(|t| WeightedTerm { text: t.clone(), weight: 1.0, corrected: false }).collect();
        self.idf(&searcher, &weighted)
    }

    /// The top `k` approved passages for `query` (at most [`MAX_CHUNKS_PER_DOC`] per document),
    /// best first: BM25 and dense (sentence-embedding) results fused. Text with no searchable words
    /// gives an empty list, not an error.
    pub fn search(&self, query: &str, k: usize, filters: &Filters) -> Result<Vec<Passage>, RetrievalError> {
        Ok(self.retrieve(query, &[], EARLIER_TURN_WEIGHT, k, filters)?.passages)
    }

    /// BM25 alone (no dense candidates): which passages contain the query's words.
    pub fn search_lexical(&self, query: &str, k: usize, filters: &Filters) -> Result<Vec<Passage>, RetrievalError> {
        let searcher = self.inner.reader.searcher();
        let evidence = self.evidence_of(&searcher)?;
        let terms = self.weighted_terms(query, &[], 0.0);
        if terms.is_empty() {
            return Ok(Vec::new());
        }
        let none = vec![f32::MIN; evidence.len()];
        self.search_hybrid(&searcher, &evidence, &terms, &none, k, filters)
    }

    /// Retrieval for a chat turn: `current` is the customer's latest message, `earlier` their
    /// previous messages, oldest first. Earlier messages add their terms at a lower weight, so a
    /// follow-up such as "and how long does that take?" still finds the topic of the conversation
    /// while a change of topic is led by the new message.
    pub fn search_turn(&self, current: &str, earlier: &[&str], k: usize, filters: &Filters) -> Result<Vec<Passage>, RetrievalError> {
        Ok(self.retrieve(current, earlier, EARLIER_TURN_WEIGHT, k, filters)?.passages)
    }

    /// [`search_turn`](Self::search_turn) with an explicit weight for the previous message (the
    /// tuning knob the eval measures).
    pub fn search_turn_weighted(
        &self,
        current: &str,
        earlier: &[&str],
        earlier_weight: f32,
        k: usize,
        filters: &Filters,
    ) -> Result<Vec<Passage>, RetrievalError> {
        Ok(self.retrieve(current, earlier, earlier_weight, k, filters)?.passages)
    }

    /// Everything a turn needs from retrieval: the fused passages, and what evidence selection
    /// scores sentences with (the question's vector and terms, every unit's similarity to it).
    pub fn retrieve(&self, current: &str, earlier: &[&str], earlier_weight: f32, k: usize, filters: &Filters) -> Result<Retrieval, RetrievalError> {
        let searcher = self.inner.reader.searcher();
        let evidence = self.evidence_of(&searcher)?;
        let own = self.weighted_terms(current, &[], 0.0);
        let follow_up = !earlier.is_empty() && self.is_elliptical(&own)?;
        let terms = if follow_up { self.weighted_terms(current, earlier, earlier_weight) } else { own };
        // The question's vector; a follow-up leans on the conversation: its vector is the latest
        // message read after the previous one.
        let embed_started = Instant::now();
        let own_vector = self.inner.embedder.embed_one(truncate(current, MAX_QUERY_BYTES))?;
        let query_vector = if follow_up {
            // The latest message leads; the conversation gives it its topic.
            let text = format!("{} {current}", earlier.last().copied().unwrap_or_default());
            let context = self.inner.embedder.embed_one(truncate(&text, MAX_QUERY_BYTES))?;
            let mut v: Vec<f32> = own_vector.iter().zip(&context).map(|(a, b)| a + FOLLOW_UP_CONTEXT * b).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
            v.iter_mut().for_each(|x| *x /= norm);
            v
        } else {
            own_vector
        };
        let embed_ms = embed_started.elapsed().as_secs_f64() * 1e3;
        let similarities = evidence.similarities(&query_vector);
        // Text with no searchable word (blank, stop words, punctuation) finds nothing.
        let passages = if terms.is_empty() { Vec::new() } else { self.search_hybrid(&searcher, &evidence, &terms, &similarities, k, filters)? };
        let unknown = {
            let mut own: Vec<WeightedTerm> = terms.iter().filter(|t| t.weight >= 1.0).cloned().collect();
            let n = own.len();
            self.correct_typos(&searcher, &mut own)?;
            let mut missing = 0;
            for t in &own {
                if !t.corrected && self.doc_freq(&searcher, &t.text)? == 0 {
                    missing += 1;
                }
            }
            if n == 0 { 0.0 } else { missing as f32 / n as f32 }
        };
        Ok(Retrieval {
            passages,
            query_vector,
            similarities,
            evidence,
            terms: terms.iter().map(|t| (t.text.clone(), t.weight)).collect(),
            follow_up,
            unknown,
            embed_ms,
        })
    }

    /// Whether a message reads as a follow-up that leans on the conversation ("and how long does
    /// that take?", "what about the annual plan?"): at most [`FOLLOW_UP_MAX_TERMS`] searchable words,
    /// every one of them known to the index. A message with a word the docs never use ("What is the
    /// capital of Mongolia?") or with more to say is taken on its own: its topic is its own, and the
    /// earlier turns must not lift it over the relevance gate.
    fn is_elliptical(&self, own: &[WeightedTerm]) -> Result<bool, RetrievalError> {
        if own.len() > FOLLOW_UP_MAX_TERMS {
            return Ok(false);
        }
        let searcher = self.inner.reader.searcher();
        for t in own {
            if self.doc_freq(&searcher, &t.text)? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The chunks of an approved document in order (score 0, empty snippet); `None` when there is
    /// no such approved document.
    pub fn document(&self, doc_id: &str) -> Result<Option<Vec<Passage>>, RetrievalError> {
        let f = &self.inner.fields;
        let query = BooleanQuery::new(vec![
            (Occur::Must, exact(f.status, "approved")),
            (Occur::Must, exact(f.kind, KIND_CHUNK)),
            (Occur::Must, exact(f.doc_id, doc_id)),
        ]);
        let searcher = self.inner.reader.searcher();
        let addresses = searcher.search(&query, &DocSetCollector).map_err(tantivy_err)?;
        let mut chunks: Vec<(u64, Passage)> = Vec::new();
        for addr in addresses {
            let doc: TantivyDocument = searcher.doc(addr).map_err(tantivy_err)?;
            if let Some(p) = self.to_passage(&doc, 0.0) {
                let ordinal = doc.get_first(f.ordinal).and_then(|v| v.as_u64()).unwrap_or(u64::MAX);
                chunks.push((ordinal, p));
            }
        }
        chunks.sort_by_key(|(o, _)| *o);
        Ok((!chunks.is_empty()).then(|| chunks.into_iter().map(|(_, p)| p).collect()))
    }

    /// One approved chunk by its id (`{doc_id}#{n}`).
    pub fn passage(&self, chunk_id: &str) -> Result<Option<Passage>, RetrievalError> {
        let f = &self.inner.fields;
        let query = BooleanQuery::new(vec![
            (Occur::Must, exact(f.status, "approved")),
            (Occur::Must, exact(f.kind, KIND_CHUNK)),
            (Occur::Must, exact(f.chunk_id, chunk_id)),
        ]);
        let searcher = self.inner.reader.searcher();
        let top = searcher.search(&query, &TopDocs::with_limit(1).order_by_score()).map_err(tantivy_err)?;
        for (_, addr) in top {
            let doc: TantivyDocument = searcher.doc(addr).map_err(tantivy_err)?;
            if let Some(p) = self.to_passage(&doc, 0.0) {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }

    /// Makes the latest commit visible now (it also becomes visible on its own shortly after).
    pub fn reload(&self) -> Result<(), RetrievalError> {
        self.inner.reader.reload().map_err(tantivy_err)
    }

    /// The content version of the commit being searched: a hash of the indexed files' manifest,
    /// equal to [`IndexReport::version`](super::IndexReport::version) of the build that made it.
    /// Empty if the index has no bookkeeping document (never the case for one built by
    /// `build_index`).
    pub fn version(&self) -> String {
        self.meta().map(|m| m.version).unwrap_or_default()
    }

    /// Approved chunks in the commit being searched.
    pub fn num_chunks(&self) -> usize {
        self.meta().map(|m| m.chunks).unwrap_or(0)
    }

    /// Approved documents in the commit being searched.
    pub fn num_documents(&self) -> usize {
        self.meta().map(|m| m.documents).unwrap_or(0)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn meta(&self) -> Option<IndexMeta> {
        let searcher = self.inner.reader.searcher();
        self.snapshot(&searcher).meta.clone()
    }

    fn snapshot(&self, searcher: &Searcher) -> Arc<Snapshot> {
        let generation = searcher.generation().generation_id();
        let mut cache = self.inner.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = cache.as_ref().filter(|s| s.generation == generation) {
            return s.clone();
        }
        let s = Arc::new(Snapshot { generation, meta: self.read_meta(searcher), vocabulary: OnceLock::new(), evidence: OnceLock::new() });
        *cache = Some(s.clone());
        s
    }

    fn read_meta(&self, searcher: &Searcher) -> Option<IndexMeta> {
        let query = TermQuery::new(Term::from_field_text(self.inner.fields.kind, KIND_META), IndexRecordOption::Basic);
        let top = searcher.search(&query, &TopDocs::with_limit(1).order_by_score()).ok()?;
        let (_, addr) = top.first()?;
        let doc: TantivyDocument = searcher.doc(*addr).ok()?;
        let json = doc.get_first(self.inner.fields.meta)?.as_str()?.to_string();
        serde_json::from_str(&json).ok()
    }

    fn vocabulary<'a>(&self, searcher: &Searcher, snapshot: &'a Snapshot) -> &'a HashMap<String, u64> {
        snapshot.vocabulary.get_or_init(|| {
            let f = &self.inner.fields;
            let mut vocab: HashMap<String, u64> = HashMap::new();
            for field in [f.title, f.section, f.text] {
                let mut per_field: HashMap<String, u64> = HashMap::new();
                for segment in searcher.segment_readers() {
                    let Ok(inverted) = segment.inverted_index(field) else { continue };
                    let Ok(mut stream) = inverted.terms().stream() else { continue };
                    while stream.advance() {
                        if let Ok(word) = std::str::from_utf8(stream.key()) {
                            *per_field.entry(word.to_string()).or_insert(0) += u64::from(stream.value().doc_freq);
                        }
                    }
                }
                for (word, df) in per_field {
                    let e = vocab.entry(word).or_insert(0);
                    *e = (*e).max(df);
                }
            }
            vocab
        })
    }

    /// Replaces each query word the index does not contain by the most frequent indexed word one
    /// edit away (insertion, deletion, substitution or swap of neighbours), so that "intergration"
    /// or "langauge" still find their articles. Short words are left alone: too many words are
    /// one edit from a three-letter word.
    fn correct_typos(&self, searcher: &Searcher, terms: &mut Vec<WeightedTerm>) -> Result<(), RetrievalError> {
        let mut snapshot = None;
        for t in terms.iter_mut() {
            if t.text.chars().count() < MIN_TYPO_CHARS {
                continue;
            }
            if self.doc_freq(searcher, &t.text)? > 0 {
                continue;
            }
            let snapshot = snapshot.get_or_insert_with(|| self.snapshot(searcher));
            let vocab = self.vocabulary(searcher, snapshot);
            let best = vocab
                .iter()
                .filter(|(w, _)| w.len().abs_diff(t.text.len()) <= 1 && within_one_edit(&t.text, w))
                .max_by(|(wa, da), (wb, db)| da.cmp(db).then_with(|| wb.cmp(wa)));
            if let Some((word, _)) = best {
                t.text = word.clone();
                t.corrected = true;
            }
        }
        // Two words may have been corrected to the same one.
        let mut seen = HashSet::new();
        terms.retain(|t| seen.insert(t.text.clone()));
        Ok(())
    }

    /// Analyzed, de-duplicated terms of the current message (weight 1) and of earlier messages
    /// (`earlier_weight` for the previous one, decaying for older ones); a term keeps its
    /// highest weight.
    fn weighted_terms(&self, current: &str, earlier: &[&str], earlier_weight: f32) -> Vec<WeightedTerm> {
        let mut terms: Vec<WeightedTerm> = Vec::new();
        let add = |text: &str, weight: f32, terms: &mut Vec<WeightedTerm>| {
            if weight <= 0.0 {
                return;
            }
            let mut analyzer = self.inner.analyzer.clone();
            let mut added = 0;
            for t in schema::analyze(&mut analyzer, truncate(text, MAX_QUERY_BYTES)) {
                match terms.iter_mut().find(|w| w.text == t) {
                    Some(w) => w.weight = w.weight.max(weight),
                    None if added < MAX_QUERY_TERMS => {
                        terms.push(WeightedTerm { text: t, weight, corrected: false });
                        added += 1;
                    }
                    None => {}
                }
            }
        };
        add(current, 1.0, &mut terms);
        let mut weight = earlier_weight;
        for turn in earlier.iter().rev() {
            add(turn, weight, &mut terms);
            weight *= EARLIER_TURN_DECAY;
        }
        terms
    }

    /// BM25 over chunks and dense similarity over evidence units, fused by reciprocal rank; then
    /// diversified (each document's best chunk first) and scored for the relevance gate.
    fn search_hybrid(
        &self,
        searcher: &Searcher,
        evidence: &EvidenceTable,
        terms: &[WeightedTerm],
        similarities: &[f32],
        k: usize,
        filters: &Filters,
    ) -> Result<Vec<Passage>, RetrievalError> {
        if k == 0 {
            return Ok(Vec::new());
        }
        let limit = (k * 4 + 16).min(400);
        let mut terms = terms.to_vec();
        // The gate weighs each word by its idf as the customer wrote it (a word the docs never use is
        // the rarest there is); corrections only help find passages.
        let written_idf: HashMap<String, f32> = {
            let idf = self.idf(searcher, &terms)?;
            terms.iter().map(|t| t.text.clone()).zip(idf).collect()
        };
        self.correct_typos(searcher, &mut terms)?;
        let terms = &terms[..];
        let f = &self.inner.fields;
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![(Occur::Must, exact(f.status, "approved")), (Occur::Must, exact(f.kind, KIND_CHUNK))];
        if let Some(any) = any_of(f.product_area, &filters.product_area) {
            clauses.push((Occur::Must, any));
        }
        let locale = filters.locale.as_deref().map(|l| l.trim().to_lowercase()).filter(|l| !l.is_empty());
        if let Some(locale) = &locale {
            clauses.push((Occur::Must, exact(f.locale, locale)));
        }
        if let Some(any) = any_of(f.doc_id, &filters.doc_id) {
            clauses.push((Occur::Must, any));
        }
        let mut should: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        for t in terms {
            for (field, boost) in [(f.title, TITLE_BOOST), (f.section, SECTION_BOOST), (f.text, 1.0)] {
                let q = TermQuery::new(Term::from_field_text(field, &t.text), IndexRecordOption::WithFreqs);
                should.push((Occur::Should, Box::new(BoostQuery::new(Box::new(q), boost * t.weight))));
            }
        }
        // Nested so that at least one term must match: next to Must clauses, plain Should clauses
        // would only add to the score.
        let query: Option<BooleanQuery> = (!should.is_empty()).then(|| {
            clauses.push((Occur::Must, Box::new(BooleanQuery::new(should))));
            BooleanQuery::new(clauses)
        });

        // Lexical candidates, best first.
        let mut lexical: Vec<Passage> = Vec::new();
        if let Some(query) = &query {
            for (score, addr) in searcher.search(query, &TopDocs::with_limit(limit).order_by_score()).map_err(tantivy_err)? {
                let doc: TantivyDocument = searcher.doc(addr).map_err(tantivy_err)?;
                if let Some(p) = self.to_passage(&doc, score) {
                    lexical.push(p);
                }
            }
        }
        // Dense candidates: a chunk scores its best unit's similarity.
        let allowed = |u: &Unit| {
            (filters.product_area.is_empty() || filters.product_area.iter().any(|a| a.trim().eq_ignore_ascii_case(&u.product_area)))
                && locale.as_ref().is_none_or(|l| &u.locale == l)
                && (filters.doc_id.is_empty() || filters.doc_id.iter().any(|d| d.trim().eq_ignore_ascii_case(&u.doc_id)))
        };
        // Units of one chunk are contiguous: one pass, one map entry per chunk that is close.
        let mut best_unit: HashMap<&str, f32> = HashMap::new();
        let mut i = 0;
        while i < evidence.units.len() {
            let chunk = evidence.units[i].chunk_id.as_str();
            let mut j = i;
            let mut best = f32::MIN;
            while j < evidence.units.len() && evidence.units[j].chunk_id == chunk {
                best = best.max(similarities.get(j).copied().unwrap_or(f32::MIN));
                j += 1;
            }
            if allowed(&evidence.units[i]) {
                best_unit.insert(chunk, best);
            }
            i = j;
        }
        // A chunk enters by similarity alone only when it is close enough: text with nothing in
        // common with the docs gets no nearest neighbours passed off as results.
        let mut dense: Vec<(&str, f32)> = best_unit.iter().filter(|(_, s)| **s >= DENSE_FLOOR).map(|(c, s)| (*c, *s)).collect();
        let order = |a: &(&str, f32), b: &(&str, f32)| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0));
        if dense.len() > limit {
            dense.select_nth_unstable_by(limit, order);
            dense.truncate(limit);
        }
        dense.sort_by(order);

        // Reciprocal-rank fusion.
        let knob = |name: &str, d: f32| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
        let (lexical_weight, dense_weight, rrf_k) = (knob("TUNE_LW", LEXICAL_WEIGHT), knob("TUNE_DW", DENSE_WEIGHT), knob("TUNE_K", RRF_K));
        let mut fused: HashMap<String, f32> = HashMap::new();
        for (rank, p) in lexical.iter().enumerate() {
            *fused.entry(p.chunk_id.clone()).or_insert(0.0) += lexical_weight / (rrf_k + rank as f32 + 1.0);
        }
        for (rank, (c, _)) in dense.iter().enumerate() {
            *fused.entry(c.to_string()).or_insert(0.0) += dense_weight / (rrf_k + rank as f32 + 1.0);
        }
        let mut order: Vec<(String, f32)> = fused.into_iter().collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));

        // Diversify: each document's best chunk first, in fused order; a document's next chunks
        // only fill places that no other document took.
        let mut by_id: HashMap<String, Passage> = lexical.into_iter().map(|p| (p.chunk_id.clone(), p)).collect();
        let mut per_doc: HashMap<String, usize> = HashMap::new();
        let mut rounds: Vec<Vec<Passage>> = vec![Vec::new(); MAX_CHUNKS_PER_DOC];
        for (chunk_id, _) in &order {
            let p = match by_id.remove(chunk_id) {
                Some(p) => p,
                None => match self.passage(chunk_id)? {
                    Some(p) => p,
                    None => continue,
                },
            };
            let n = per_doc.entry(p.doc_id.clone()).or_insert(0);
            if let Some(round) = rounds.get_mut(*n) {
                round.push(p);
            }
            *n += 1;
            if rounds[0].len() == k {
                break;
            }
        }
        let mut passages: Vec<Passage> = rounds.into_iter().flatten().take(k).collect();
        if passages.is_empty() {
            return Ok(passages);
        }
        let mut snippets = match &query {
            Some(q) => {
                let mut g = SnippetGenerator::create(searcher, q, f.text).map_err(tantivy_err)?;
                g.set_max_num_chars(SNIPPET_CHARS);
                Some(g)
            }
            None => None,
        };
        let idf: Vec<f32> = {
            let corrected_idf = self.idf(searcher, terms)?;
            terms.iter().zip(corrected_idf).map(|(t, i)| if t.corrected { written_idf.values().copied().fold(i, f32::max) } else { i }).collect()
        };
        let credit = |t: &WeightedTerm| if t.corrected { CORRECTED_CREDIT } else { 1.0 };
        let total: f32 = terms.iter().zip(&idf).map(|(t, idf)| t.weight * idf).sum();
        for p in &mut passages {
            let fragment = snippets.as_mut().map(|g| g.snippet(&p.text).fragment().to_string()).unwrap_or_default();
            p.snippet = plain_snippet(&fragment, &p.text);
            let mut analyzer = self.inner.analyzer.clone();
            let words: HashSet<String> = schema::analyze(&mut analyzer, &format!("{}\n{}\n{}", p.title, p.section, p.text)).into_iter().collect();
            let matched: f32 =
                terms.iter().zip(&idf).filter(|(t, _)| words.contains(&t.text)).map(|(t, idf)| credit(t) * t.weight * idf).sum();
            let coverage = if total > 0.0 { (matched / total).clamp(0.0, 1.0) } else { 0.0 };
            let evidence_score = p.score * coverage.sqrt();
            p.lexical = evidence_score / (evidence_score + RELEVANCE_SCALE);
            p.semantic = best_unit.get(p.chunk_id.as_str()).copied().unwrap_or(0.0).max(0.0);
            p.relevance = combined_relevance(p.lexical, p.semantic);
        }
        Ok(passages)
    }

    /// BM25's idf of each term over the chunks, taking the field where the term is most common
    /// (a word found only in titles is still a known word). Words absent from the corpus get the
    /// highest idf, which is what makes off-topic questions cover little of their query.
    fn idf(&self, searcher: &Searcher, terms: &[WeightedTerm]) -> Result<Vec<f32>, RetrievalError> {
        let n = searcher.num_docs() as f32;
        terms
            .iter()
            .map(|t| {
                let df = self.doc_freq(searcher, &t.text)? as f32;
                Ok((1.0 + (n - df + 0.5) / (df + 0.5)).ln())
            })
            .collect()
    }

    /// How many chunks hold an analyzed term, in the searchable field where it is most common
    /// (0: the index does not know the word).
    fn doc_freq(&self, searcher: &Searcher, term: &str) -> Result<u64, RetrievalError> {
        let f = &self.inner.fields;
        let mut df = 0u64;
        for field in [f.title, f.section, f.text] {
            df = df.max(searcher.doc_freq(&Term::from_field_text(field, term)).map_err(tantivy_err)?);
        }
        Ok(df)
    }

    /// A stored document as a passage, or `None` when it is not an approved chunk (the second
    /// check behind the query's mandatory clauses).
    fn to_passage(&self, doc: &TantivyDocument, score: f32) -> Option<Passage> {
        let f = &self.inner.fields;
        let get = |field| doc.get_first(field).and_then(|v| v.as_str()).unwrap_or("").to_string();
        if get(f.status) != "approved" || get(f.kind) != KIND_CHUNK {
            return None;
        }
        Some(Passage {
            chunk_id: get(f.chunk_id),
            doc_id: get(f.doc_id),
            title: get(f.title),
            section: get(f.section),
            source: get(f.source),
            product_area: get(f.product_area),
            locale: get(f.locale),
            updated: get(f.updated),
            text: get(f.text),
            snippet: String::new(),
            score,
            relevance: 0.0,
            lexical: 0.0,
            semantic: 0.0,
        })
    }
}

/// A filter clause: matches documents whose raw field equals `value`, adding nothing to the score.
fn exact(field: tantivy::schema::Field, value: &str) -> Box<dyn Query> {
    Box::new(ConstScoreQuery::new(Box::new(TermQuery::new(Term::from_field_text(field, value), IndexRecordOption::Basic)), 0.0))
}

/// Any of `values` (lower-cased, blanks ignored); `None` when there is no restriction.
fn any_of(field: tantivy::schema::Field, values: &[String]) -> Option<Box<dyn Query>> {
    let clauses: Vec<(Occur, Box<dyn Query>)> =
        values.iter().map(|v| v.trim().to_lowercase()).filter(|v| !v.is_empty()).map(|v| (Occur::Should, exact(field, &v))).collect();
    (!clauses.is_empty()).then(|| Box::new(BooleanQuery::new(clauses)) as Box<dyn Query>)
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The snippet as one line of plain text; the start of the chunk when no query word is in its body
/// (a match on the title or heading only).
fn plain_snippet(fragment: &str, text: &str) -> String {
    let source = if fragment.trim().is_empty() { text } else { fragment };
    let mut out = String::new();
    for word in source.split_whitespace() {
        if out.chars().count() + word.chars().count() + 1 > SNIPPET_CHARS {
            out.push('…');
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// Optimal string alignment distance <= 1: equal, or one insertion, deletion, substitution or swap
/// of two neighbouring characters.
fn within_one_edit(a: &str, b: &str) -> bool {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let (ra, rb) = (&a[prefix..], &b[prefix..]);
    match (ra.len(), rb.len()) {
        (0, 0) => true,
        (x, y) if x == y => ra[1..] == rb[1..] || (x >= 2 && ra[0] == rb[1] && ra[1] == rb[0] && ra[2..] == rb[2..]),
        (x, y) if x + 1 == y => ra == &rb[1..],
        (x, y) if y + 1 == x => &ra[1..] == rb,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_edit() {
        for (a, b) in [("langaug", "languag"), ("intergr", "integr"), ("swich", "switch"), ("refund", "refund"), ("refnud", "refund")] {
            assert!(within_one_edit(a, b), "{a} {b}");
        }
        for (a, b) in [("refund", "rebuild"), ("abc", "cba"), ("payrol", "pay")] {
            assert!(!within_one_edit(a, b), "{a} {b}");
        }
    }

    #[test]
    fn snippets_are_bounded_plain_text() {
        let long = "word ".repeat(200);
        let s = plain_snippet("", &long);
        assert!(s.chars().count() <= SNIPPET_CHARS + 1 && s.ends_with('…'));
        assert_eq!(plain_snippet("a\n\nb", "x"), "a b");
    }
}
