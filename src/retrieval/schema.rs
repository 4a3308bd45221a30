//! The tantivy schema, its field handles (resolved once) and the English analyzer shared by the
//! indexer and the query side, so both turn text into the same terms.

use tantivy::schema::{Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST, INDEXED, STORED, STRING};
use tantivy::tokenizer::{AsciiFoldingFilter, Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, StopWordFilter, TextAnalyzer};
use tantivy::Index;

/// Bump whenever the analyzer, the chunker or the stored layout changes: an index built under
/// another value is rebuilt from scratch by the next `build_index` and refused by
/// `KnowledgeBase::open` until then.
pub const SCHEMA_VERSION: &str = "helpline-retrieval-3";

/// Name under which the analyzer is registered on every opened index (tantivy does not persist
/// analyzers, only their names).
pub const ANALYZER: &str = "helpline_en";

/// Value of the `kind` field: article chunks, and the single bookkeeping document per commit.
pub const KIND_CHUNK: &str = "chunk";
pub const KIND_META: &str = "meta";

/// Tokens longer than this are dropped: base64 blobs and URLs-as-one-token are noise, and a
/// pasted 10 kB string must not produce giant terms.
const MAX_TOKEN_BYTES: usize = 40;

/// English function words plus the filler of support questions ("how do I", "can you", "my").
/// Removing them keeps the relevance measure about content words; tantivy's built-in list (the
/// Lucene one) keeps pronouns and question words. Contraction remnants (`don`, `t`, `m`, ...) are
/// here because the tokenizer splits at apostrophes.
const STOP_WORDS: &[&str] = &[
    "a", "about", "after", "all", "also", "am", "an", "and", "any", "are", "as", "at", "be", "been", "being", "but",
    "by", "can", "could", "d", "did", "didn", "do", "does", "doesn", "don", "for", "from", "had", "has", "have",
    "hello", "hey", "hi", "how", "i", "if", "in", "into", "is", "isn", "it", "its", "just", "ll", "m", "me", "my",
    "of", "on", "or", "our", "ours", "please", "re", "s", "should", "so", "some", "such", "t", "than", "thank",
    "thanks", "that", "the", "their", "them", "then", "there", "these", "they", "this", "those", "to", "too", "us",
    "ve", "was", "wasn", "we", "were", "what", "when", "where", "which", "who", "why", "will", "with", "won",
    "would", "you", "your", "yours",
    // Chat spellings without apostrophes and filler that says nothing about the topic.
    "cant", "dont", "doesnt", "didnt", "isnt", "wont", "wasnt", "im", "ive", "youre", "whats", "thats", "theres",
    "u", "ur", "pls", "plz", "guys", "ok", "okay", "hey", "help", "need", "want", "know", "like", "really",
    "actually", "now", "get", "got", "anyway",
];

pub fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(MAX_TOKEN_BYTES))
        .filter(LowerCaser)
        .filter(AsciiFoldingFilter)
        .filter(StopWordFilter::remove(STOP_WORDS.iter().map(|w| w.to_string())))
        .filter(Stemmer::new(Language::English))
        .build()
}

/// Runs the analyzer over `text`, in order (duplicates kept).
pub fn analyze(analyzer: &mut TextAnalyzer, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stream = analyzer.token_stream(text);
    while stream.advance() {
        out.push(stream.token().text.clone());
    }
    out
}

#[derive(Debug, Clone, Copy)]
pub struct Fields {
    pub kind: Field,
    pub chunk_id: Field,
    pub doc_id: Field,
    pub ordinal: Field,
    pub title: Field,
    pub section: Field,
    pub text: Field,
    pub source: Field,
    pub status: Field,
    pub updated: Field,
    pub product_area: Field,
    pub locale: Field,
    /// Stored only: the bookkeeping document's JSON (version and counts).
    pub meta: Field,
}

pub fn schema() -> Schema {
    let mut b = Schema::builder();
    let analyzed = TextOptions::default()
        .set_indexing_options(TextFieldIndexing::default().set_tokenizer(ANALYZER).set_index_option(IndexRecordOption::WithFreqs))
        .set_stored();
    b.add_text_field("kind", STRING | STORED);
    b.add_text_field("chunk_id", STRING | STORED);
    b.add_text_field("doc_id", STRING | STORED);
    b.add_u64_field("ordinal", INDEXED | STORED | FAST);
    b.add_text_field("title", analyzed.clone());
    b.add_text_field("section", analyzed.clone());
    b.add_text_field("text", analyzed);
    b.add_text_field("source", STRING | STORED);
    b.add_text_field("status", STRING | STORED);
    b.add_text_field("updated", STRING | STORED);
    b.add_text_field("product_area", STRING | STORED);
    b.add_text_field("locale", STRING | STORED);
    b.add_text_field("meta", STORED);
    b.build()
}

impl Fields {
    /// Resolves the handles; fails when the index was built with another schema.
    pub fn resolve(schema: &Schema) -> tantivy::Result<Fields> {
        let f = |name: &str| schema.get_field(name);
        Ok(Fields {
            kind: f("kind")?,
            chunk_id: f("chunk_id")?,
            doc_id: f("doc_id")?,
            ordinal: f("ordinal")?,
            title: f("title")?,
            section: f("section")?,
            text: f("text")?,
            source: f("source")?,
            status: f("status")?,
            updated: f("updated")?,
            product_area: f("product_area")?,
            locale: f("locale")?,
            meta: f("meta")?,
        })
    }
}

pub fn register_analyzer(index: &Index) {
    index.tokenizers().register(ANALYZER, analyzer());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn analyzer_drops_filler_and_stems() {
        let mut a = analyzer();
        assert_eq!(analyze(&mut a, "How do I reset my Passwords?"), ["reset", "password"]);
        assert_eq!(analyze(&mut a, "I'm locked out, don't know why"), ["lock", "out"]);
        assert!(analyze(&mut a, &"x".repeat(100)).is_empty());
    }
}
