//! Retrieval over the approved documentation: documents (front matter + Markdown, plain text or
//! HTML) are split into heading-aware chunks and indexed with tantivy; a [`KnowledgeBase`] answers
//! ranked [`Passage`]s for a query or a conversation turn.
//!
//! Knows nothing of the engine or the server.
//!
//! CONTRACT (written first so the server, the prompt builder and the web page can be built against
//! it while this module is filled in): the public names below are used elsewhere; keep them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

mod chunk;
mod document;
pub mod eval;
pub mod evidence;
mod html;
mod index;
mod schema;
mod search;

pub use chunk::{MAX_WORDS as CHUNK_MAX_WORDS, MIN_WORDS as CHUNK_MIN_WORDS};
pub use document::is_kebab_case;
pub use eval::{evaluate, load_cases, EvalCase, EvalError, Miss, RetrievalEval};
pub use index::{build_index, FileOutcome, FileStatus, IndexOptions, IndexReport};
pub use schema::SCHEMA_VERSION;
pub use search::{combined_relevance, KnowledgeBase, Retrieval, EARLIER_TURN_DECAY, EARLIER_TURN_WEIGHT, MAX_CHUNKS_PER_DOC, RELEVANCE_SCALE, SECTION_BOOST, SNIPPET_CHARS, TITLE_BOOST};

/// One chunk of an approved article, as the model sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Passage {
    /// Stable id of the chunk: `{doc_id}#{n}` (n = chunk ordinal within the document, from 0).
    pub chunk_id: String,
    pub doc_id: String,
    pub title: String,
    /// Heading path inside the article, e.g. `Annual plans` or `Exceptions > Who approves`;
    /// empty for text before the first heading.
    pub section: String,
    /// Path of the source file relative to the docs directory, `/`-separated.
    pub source: String,
    pub product_area: String,
    pub locale: String,
    /// ISO date from the front matter.
    pub updated: String,
    /// The chunk's whole text (markup dropped), what goes into the prompt.
    pub text: String,
    /// A short excerpt around the query terms (plain text, no markup), for citations.
    pub snippet: String,
    /// BM25 score from tantivy (higher is better; not normalized).
    pub score: f32,
    /// The relevance gate's measure, in [0, 1): `e / (e + RELEVANCE_SCALE)` with evidence
    /// `e = score * sqrt(coverage)`, where coverage in [0, 1] is the idf-weighted share of the
    /// query's terms (after stop words, stemming and typo correction; earlier turns at their lower
    /// weight) found in the chunk's title, section or text. Coverage damps chunks that match only a
    /// corner of a long question; on the eval set this separated answerable from unanswerable
    /// questions better than raw BM25 or coverage alone (see docs/grounding.md). See [`is_relevant`].
    #[serde(default)]
    pub relevance: f32,
    /// The lexical side of the gate: `e / (e + RELEVANCE_SCALE)` as above.
    #[serde(default)]
    pub lexical: f32,
    /// The semantic side: the best cosine similarity between the question and one of the chunk's
    /// evidence units (sentence embeddings).
    #[serde(default)]
    pub semantic: f32,
}

/// The relevance gate's default threshold on [`Passage::relevance`], calibrated on
/// `eval/grounding.jsonl` against the default corpus (docs/grounding.md has the sweep): there it
/// refuses 11 of 168 questions, 9 of them unanswerable, and wrongly refuses 2 of the 142
/// answerable ones. BM25 scores depend on the corpus: recalibrate with `helpline eval --sweep`.
pub const DEFAULT_MIN_SCORE: f32 = 0.5;

/// The relevance gate: whether the best passage matches the question well enough to answer from
/// (`relevance >= min_score` for some passage). When it says no, the bot refuses
/// (`no_relevant_docs`) without calling the model.
pub fn is_relevant(passages: &[Passage], min_score: f32) -> bool {
    passages.iter().any(|p| p.relevance >= min_score)
}

/// Restrictions on a search. Empty vectors mean "no restriction". Status is not a filter: only
/// approved documents are ever returned.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Filters {
    pub product_area: Vec<String>,
    pub locale: Option<String>,
    pub doc_id: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RetrievalError {
    #[error("no index at {path}: run `helpline index` to build one")]
    NoIndex { path: PathBuf },
    #[error("the docs directory {path} cannot be read: {reason}")]
    DocsDir { path: PathBuf, reason: String },
    #[error("the index at {path} is being written by another process; try again when it finishes")]
    Locked { path: PathBuf },
    #[error("invalid query: {0}")]
    Query(String),
    #[error("index error: {0}")]
    Tantivy(String),
    #[error("evidence error: {0}")]
    Evidence(String),
    #[error(transparent)]
    Embed(#[from] crate::embed::EmbedError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
